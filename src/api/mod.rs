//! The HTTP API: REST (contract §4), the WebSocket feed (§5), metrics, OpenAPI.
//!
//! One actix-web server, started from an already-bound listener (tests bind port 0), with TLS
//! (rustls) when `http.tls_cert`/`http.tls_key` are set. JSON errors everywhere, a request
//! body limit, rate limits per token and per IP on `/api/v1`, and a graceful stop that closes
//! WebSockets with 1001.

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod error;
pub mod export;
pub mod jwks;
pub mod limits;
pub mod lookup;
pub mod metrics;
pub mod rest;
pub mod webhooks;
pub mod ws;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{Compress, Next, from_fn};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use dashmap::DashMap;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;

use self::auth::Auth;
use self::error::{ApiError, ErrorBody};
use self::metrics::ApiMetrics;
use crate::config::HttpConfig;
use crate::presence::Engine;
use crate::sources::xmpp::ComponentHandle;
use crate::store::StoreHandle;

/// Everything the handlers need.
#[derive(Debug)]
pub struct AppState {
    /// The presence engine (map, hub, snapshot).
    pub engine: Engine,
    /// What only a leader runs (everything, on a single bridge): see [`AppState::component`].
    pub leader: std::sync::RwLock<LeaderParts>,
    /// This replica's place in the cluster, when `[cluster]` is set (contract §11).
    pub cluster: Option<crate::cluster::ClusterHandle>,
    /// The store (None in memory-only mode).
    pub store: Option<StoreHandle>,
    /// The registry every layer registered its metrics in; `/metrics` renders it.
    pub registry: Registry,
    /// The API's own metrics.
    pub metrics: ApiMetrics,
    /// `[http]`.
    pub http: HttpConfig,
    /// Open WebSocket connections per token subject.
    pub ws_conns: DashMap<String, usize>,
    /// Cancelled on shutdown: WebSocket sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Owns every WebSocket session task and the sampler: shutdown waits for them (so the
    /// 1001 close frames are written before the runtime stops).
    pub tasks: TaskTracker,
    /// Online counts sampled every [`SAMPLE_EVERY`] over the last hour (dashboard sparkline).
    pub samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
    /// This run's history in memory, when there is no Postgres.
    pub history: Option<crate::store::memory::MemoryHistory>,
    /// `store.retention_days`: how far back replay looks for an online stretch.
    pub retention_days: u32,
    /// The open WebSocket sessions by id (contract §8's subscribers list).
    pub subscribers: DashMap<String, Arc<ws::Subscriber>>,
    /// The identity provider's keys, when `auth.jwks_url` is set.
    pub jwks: Option<Arc<jwks::Jwks>>,
}

/// The parts a replica runs only while it leads; a single bridge's, set once at start.
#[derive(Debug, Default, Clone)]
pub struct LeaderParts {
    /// The XMPP component (None in demo mode).
    pub component: Option<ComponentHandle>,
    /// The AMQP consumer, when `[amqp]` is set.
    pub amqp: Option<crate::sources::amqp::AmqpHandle>,
    /// The reconciler, when `[reconcile]` is set.
    pub reconciler: Option<Arc<crate::sources::reconcile::Reconciler>>,
    /// Webhooks and alerts (absent when the engine belongs to someone else).
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

/// How often the concurrency is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept (one hour).
const SAMPLES_KEPT: usize = 360;

/// One concurrency sample.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub at: chrono::DateTime<chrono::Utc>,
    /// Online users then.
    pub online_users: u64,
    /// Online resources then.
    pub online_resources: u64,
}

impl AppState {
    fn parts(&self) -> std::sync::RwLockReadGuard<'_, LeaderParts> {
        self.leader.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the leader's parts (the composition root, when the role changes).
    pub fn set_leader_parts(&self, parts: LeaderParts) {
        *self.leader.write().unwrap_or_else(|p| p.into_inner()) = parts;
    }

    /// The XMPP component, if this bridge runs it now.
    pub fn component(&self) -> Option<ComponentHandle> {
        self.parts().component.clone()
    }

    /// The AMQP consumer, if this bridge runs it now.
    pub fn amqp(&self) -> Option<crate::sources::amqp::AmqpHandle> {
        self.parts().amqp.clone()
    }

    /// The reconciler, if this bridge runs it now.
    pub fn reconciler(&self) -> Option<Arc<crate::sources::reconcile::Reconciler>> {
        self.parts().reconciler.clone()
    }

    /// Webhooks and alerts, if this bridge runs them now.
    pub fn webhooks(&self) -> Option<Arc<crate::webhooks::Webhooks>> {
        self.parts().webhooks.clone()
    }

    /// 503 `not_leader` when this is a follower replica (what only the leader can do: it
    /// holds the component, sequences, and writes).
    pub fn leader_only(&self) -> Result<(), ApiError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let s = c.status();
        if s.role == crate::presence::Role::Leader {
            return Ok(());
        }
        Err(ApiError::new(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            match s.leader {
                Some(l) => format!("this replica is a follower; the leader is {l}"),
                None => "this replica is a follower; no leader is known yet".to_owned(),
            },
        ))
    }

    /// A state with no sessions and no samples yet; the API registers its metrics in
    /// `registry`.
    pub fn new(
        engine: Engine,
        component: Option<ComponentHandle>,
        store: Option<StoreHandle>,
        registry: Registry,
        http: HttpConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> AppState {
        AppState {
            metrics: ApiMetrics::new(&registry),
            engine,
            leader: std::sync::RwLock::new(LeaderParts {
                component,
                ..LeaderParts::default()
            }),
            cluster: None,
            store,
            registry,
            http,
            ws_conns: DashMap::new(),
            shutdown,
            tasks,
            samples: Default::default(),
            history: None,
            retention_days: 30,
            subscribers: DashMap::new(),
            jwks: None,
        }
    }

    fn sample(&self) {
        let s = self.engine.stats();
        let mut v = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() == SAMPLES_KEPT {
            v.pop_front();
        }
        v.push_back(Sample {
            at: chrono::Utc::now(),
            online_users: s.online_users,
            online_resources: s.online_resources,
        });
    }
}

/// Samples the online counts every [`SAMPLE_EVERY`] until shutdown (a task of `state.tasks`).
pub fn spawn_sampler(state: Arc<AppState>) {
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tick.tick() => state.sample(),
            }
        }
    });
}

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");
/// Everything the dashboard loads comes from the bridge itself.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'";

fn asset(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

async fn index() -> HttpResponse {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

async fn app_js() -> HttpResponse {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn style_css() -> HttpResponse {
    asset(STYLE_CSS, "text/css; charset=utf-8")
}

#[derive(OpenApi)]
#[openapi(
    info(title = "presence-bridge", description = "Live XMPP presence: REST and WebSocket (contract v1)"),
    paths(rest::healthz, rest::readyz, rest::metrics, rest::list, rest::one, rest::last_seen, rest::last_seen_bulk, rest::history, rest::stats, rest::concurrency, rest::admin_reconcile, admin::subscribers, admin::close_subscriber, admin::resync, admin::erase_user, webhooks::list, webhooks::create, webhooks::remove, webhooks::deliveries, webhooks::alerts, analytics::online_time, analytics::concurrency, analytics::clients, analytics::replay, export::events, export::export_events, export::export_sessions, ws::ws, openapi_doc),
    components(schemas(ErrorBody, rest::Health, rest::Ready, rest::PresenceList, rest::BulkBody, rest::BulkAnswer, rest::StatsBody, rest::ConcurrencyBody, rest::Order, rest::BareJidText, Sample, crate::presence::UserPresence, crate::presence::ResourcePresence, crate::presence::Show, lookup::LastSeen, lookup::HistoryBody, lookup::HistoryEntry, crate::sources::reconcile::Outcome, analytics::OnlineTimeBody, analytics::OnlineTimeRow, analytics::ConcurrencyAnswer, analytics::PointBody, analytics::PeakBody, analytics::ClientsBody, analytics::ClientRowBody, analytics::ReplayBody, export::EventsBody, export::EventBody, analytics::GroupParam, export::FormatParam, admin::SubscribersBody, admin::ResyncBody, jwks::JwksStatus, webhooks::WebhookBody, webhooks::WebhooksBody, webhooks::NewWebhook, webhooks::EventType, webhooks::DomainText, webhooks::CreatedWebhook, webhooks::DeliveriesBody, webhooks::AlertsBody, crate::webhooks::outbox::Attempt, crate::webhooks::Source, crate::webhooks::alerts::Alert, ws::SubscriberBody, ws::FilterBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /api/v1/openapi.json`: this document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "The OpenAPI document of this API", body = Object, content_type = "application/json")))]
async fn openapi_doc() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi_json())
}

/// A route answering GET and HEAD (HEAD gets the headers without the body).
fn get_or_head() -> actix_web::Route {
    web::route().guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
}

/// Every route and the methods it answers: for `405 Method Not Allowed` with `Allow` (actix
/// itself sends every unmatched request to the default service, method or path alike).
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET, HEAD"),
    ("/app.js", "GET, HEAD"),
    ("/style.css", "GET, HEAD"),
    ("/healthz", "GET, HEAD"),
    ("/readyz", "GET, HEAD"),
    ("/metrics", "GET, HEAD"),
    ("/api/v1/openapi.json", "GET, HEAD"),
    ("/api/v1/presence", "GET, HEAD"),
    ("/api/v1/presence/{jid}", "GET, HEAD"),
    ("/api/v1/last-seen", "POST"),
    ("/api/v1/last-seen/{jid}", "GET, HEAD"),
    ("/api/v1/history/{jid}", "GET, HEAD"),
    ("/api/v1/stats", "GET, HEAD"),
    ("/api/v1/stats/concurrency", "GET, HEAD"),
    ("/api/v1/ws", "GET"),
    ("/api/v1/admin/reconcile", "POST"),
    ("/api/v1/admin/resync", "POST"),
    ("/api/v1/admin/subscribers", "GET, HEAD"),
    ("/api/v1/admin/subscribers/{id}", "DELETE"),
    ("/api/v1/users/{jid}", "DELETE"),
    ("/api/v1/webhooks", "GET, HEAD, POST"),
    ("/api/v1/webhooks/{id}", "DELETE"),
    ("/api/v1/webhooks/{id}/deliveries", "GET, HEAD"),
    ("/api/v1/alerts", "GET, HEAD"),
    ("/api/v1/analytics/online-time", "GET, HEAD"),
    ("/api/v1/analytics/concurrency", "GET, HEAD"),
    ("/api/v1/analytics/clients", "GET, HEAD"),
    ("/api/v1/replay", "GET, HEAD"),
    ("/api/v1/events", "GET, HEAD"),
    ("/api/v1/export/events", "GET, HEAD"),
    ("/api/v1/export/sessions", "GET, HEAD"),
];

/// The methods `path` answers, if it is a route at all.
fn allowed_methods(path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find_map(|(pattern, methods)| {
        let pat: Vec<&str> = pattern.split('/').collect();
        let same = pat.len() == segs.len()
            && pat
                .iter()
                .zip(&segs)
                .all(|(p, s)| *p == *s || (p.starts_with('{') && !s.is_empty()));
        same.then_some(*methods)
    })
}

/// The methods the label of `presence_bridge_http_requests_total` may take; anything else is
/// `other` (a client must not be able to mint series).
fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    if let Some(allow) = allowed_methods(req.path()) {
        let mut r = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} answers {allow}", req.path()),
        )
        .error_response();
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(allow) {
            r.headers_mut().insert(actix_web::http::header::ALLOW, v);
        }
        return r;
    }
    let shown: String = req.path().chars().take(200).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", shown),
    )
    .error_response()
}

/// Counts requests and latency by route pattern (not by raw path: JIDs are unbounded).
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = method_label(req.method());
    let res = next.call(req).await?;
    if let Some(m) = state.as_ref().map(|s| &s.metrics) {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let status = res.status().as_u16().to_string();
        m.http_requests
            .with_label_values(&[route.as_str(), method, status.as_str()])
            .inc();
        m.http_latency
            .with_label_values(&[route.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

fn json_error(code: &'static str) -> impl Fn(String, StatusCode) -> actix_web::Error + Clone {
    move |msg, status| ApiError::new(status, code, msg).into()
}

/// Builds the TLS config from PEM files.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("http.tls_cert: {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("http.tls_cert: {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("http.tls_key: {}: {e}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("http.tls_cert/http.tls_key: {e}"))
}

/// Starts the server on `listener`. Stop it with the returned handle (graceful) after
/// cancelling `state.shutdown` (which closes WebSockets with 1001).
pub fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    auth: Auth,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<Server> {
    let http = state.http.clone();
    let state_for_pruning = state.clone();
    let data = web::Data::from(state);
    let auth = web::Data::new(auth);
    let limits = web::Data::new(self::limits::Limits::new(&http));
    spawn_limiter_pruning(&state_for_pruning, limits.clone());
    let body_limit = http.body_limit_bytes;
    let server = HttpServer::new(move || {
        let api = web::scope("/api/v1")
            .wrap(from_fn(self::limits::enforce))
            .service(rest::list)
            .service(rest::one)
            .service(rest::last_seen)
            .service(rest::last_seen_bulk)
            .service(rest::history)
            .service(rest::concurrency)
            .service(rest::stats)
            .service(rest::admin_reconcile)
            .service(admin::subscribers)
            .service(admin::close_subscriber)
            .service(admin::resync)
            .service(admin::erase_user)
            .service(webhooks::list)
            .service(webhooks::create)
            .service(webhooks::remove)
            .service(webhooks::deliveries)
            .service(webhooks::alerts)
            .service(analytics::online_time)
            .service(analytics::concurrency)
            .service(analytics::clients)
            .service(analytics::replay)
            .service(export::events)
            .service(export::export_events)
            .service(export::export_sessions)
            .service(ws::ws)
            .route("/openapi.json", get_or_head().to(openapi_doc));
        App::new()
            .app_data(data.clone())
            .app_data(auth.clone())
            .app_data(limits.clone())
            .app_data(web::JsonConfig::default().limit(body_limit).error_handler({
                let f = json_error("invalid_body");
                move |e, _| {
                    let status = match &e {
                        actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
                        | actix_web::error::JsonPayloadError::Overflow { .. } => {
                            StatusCode::PAYLOAD_TOO_LARGE
                        }
                        actix_web::error::JsonPayloadError::ContentType => {
                            StatusCode::UNSUPPORTED_MEDIA_TYPE
                        }
                        _ => StatusCode::BAD_REQUEST,
                    };
                    let code_msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                        format!(
                            "request body larger than {body_limit} bytes (http.body_limit_bytes)"
                        )
                    } else {
                        e.to_string()
                    };
                    f(code_msg, status)
                }
            }))
            .app_data(web::PayloadConfig::default().limit(body_limit))
            .app_data(web::QueryConfig::default().error_handler({
                let f = json_error("invalid_parameter");
                move |e, _| f(e.to_string(), StatusCode::BAD_REQUEST)
            }))
            .app_data(web::PathConfig::default().error_handler({
                let f = json_error("invalid_parameter");
                move |e, _| f(e.to_string(), StatusCode::BAD_REQUEST)
            }))
            .wrap(from_fn(observe))
            .wrap(Compress::default())
            .route("/", get_or_head().to(index))
            .route("/app.js", get_or_head().to(app_js))
            .route("/style.css", get_or_head().to(style_css))
            .service(rest::healthz)
            .service(rest::readyz)
            .service(rest::metrics)
            .service(api)
            .default_service(web::to(not_found))
    })
    .workers(http.workers.max(1))
    .disable_signals()
    .shutdown_timeout(5);
    let server = match tls {
        Some(cfg) => server.listen_rustls_0_23(listener, cfg)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}

/// Every `http.rate_limit_prune_secs`, forgets the rate-limit keys whose quota has fully
/// replenished (a key is a token hash or an IP: without this, every token ever seen stays in
/// memory), and reports how many are live. A task of `state.tasks`, ended by shutdown.
fn spawn_limiter_pruning(state: &Arc<AppState>, limits: web::Data<self::limits::Limits>) {
    if limits.is_empty() {
        return;
    }
    let state = state.clone();
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(state.http.rate_limit_prune_secs);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tick.tick() => {
                    for (name, live) in limits.prune() {
                        state.metrics.rate_limiter_keys.with_label_values(&[name]).set(live as i64);
                    }
                }
            }
        }
    });
}
