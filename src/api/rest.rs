//! REST endpoints (contract §4). Every handler that shows presence takes a scoped
//! permissions extractor, and filters by the token's `domains`.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, post, route, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AdminScope, HistoryRead, Permissions, PresenceRead};
use super::error::ApiError;
use super::lookup;
use crate::presence::{Show, UserJid, UserPresence};
use crate::store::StoreMode;
use crate::store::reads::{self, HistoryQuery};

type State = web::Data<AppState>;

/// Parses a user JID from a path or body, or answers 400 `invalid_jid`.
pub fn parse_jid(s: &str) -> Result<UserJid, ApiError> {
    UserJid::parse(s).map_err(|_| ApiError::invalid_jid(s))
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process runs: `{\"status\":\"ok\"}`", body = Health)))]
#[route("/healthz", method = "GET", method = "HEAD")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// `/healthz` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// `/readyz` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Ready {
    /// `connected` / `disconnected` (`simulated` in demo mode).
    pub xmpp: &'static str,
    /// `ok` / `spooling` / `memory`.
    pub store: &'static str,
    /// Events waiting in the spool.
    pub spooled_events: u64,
    /// Presence is not being fed (disconnected after having been connected).
    pub stale: bool,
    /// A resync round is running.
    pub resyncing: bool,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Since when the XMPP state holds.
    #[serde(with = "crate::presence::model::rfc3339_millis::option")]
    pub xmpp_since: Option<DateTime<Utc>>,
    /// XEP-0356 permissions granted, as `access:type`.
    pub privileges: Vec<String>,
    /// `connected` / `disconnected`, when `[amqp]` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<&'static str>,
    /// The identity provider's keys, when `auth.jwks_url` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<super::jwks::JwksStatus>,
    /// The engine's epoch and seq.
    pub epoch: String,
    /// Last seq.
    pub seq: u64,
    /// `leader` / `follower`, when `[cluster]` is set (contract §11).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<crate::presence::Role>,
    /// The leader's `cluster.node_id`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// This replica's `cluster.node_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Stream messages this replica has not applied yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_lag: Option<u64>,
    /// Connected to NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<&'static str>,
}

/// `GET /readyz`.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Connected and the store accepts writes", body = Ready), (status = 503, description = "Not ready (XMPP disconnected, or no key from auth.jwks_url yet)", body = Ready)))]
#[route("/readyz", method = "GET", method = "HEAD")]
pub async fn readyz(st: State) -> HttpResponse {
    let status = st.component().map(|c| c.status());
    let amqp = st.amqp().map(|a| a.status().connected);
    let cluster = st.cluster.as_ref().map(|c| c.status());
    let follower = cluster
        .as_ref()
        .is_some_and(|c| c.role != crate::presence::Role::Leader);
    let (xmpp, xmpp_ok) = match (&status, amqp) {
        // A follower: the leader holds the component; it is ready while it reads the stream.
        _ if follower => ("replica", cluster.as_ref().is_some_and(|c| c.nats)),
        (Some(s), _) if s.connected => ("connected", true),
        (Some(_), _) => ("disconnected", false),
        // The event pusher alone: ready while it consumes.
        (None, Some(a)) => ("disabled", a),
        (None, None) => ("simulated", true),
    };
    let store_status = st.store.as_ref().map(|s| s.status());
    let (store, spooled) = match &store_status {
        None => ("memory", 0),
        Some(s) => (
            if s.mode == StoreMode::Spooling {
                "spooling"
            } else {
                "ok"
            },
            s.spooled_events,
        ),
    };
    let body = Ready {
        xmpp,
        store,
        spooled_events: spooled,
        stale: status.as_ref().is_some_and(|s| s.stale),
        resyncing: status.as_ref().is_some_and(|s| s.resyncing),
        reconnects: status.as_ref().map_or(0, |s| s.reconnects),
        xmpp_since: status.as_ref().and_then(|s| s.since),
        privileges: status
            .map(|s| {
                s.privileges
                    .iter()
                    .map(|(a, t)| format!("{a}:{t}"))
                    .collect()
            })
            .unwrap_or_default(),
        amqp: amqp.map(|a| if a { "connected" } else { "disconnected" }),
        jwks: st.jwks.as_ref().map(|j| j.status()),
        epoch: st.engine.epoch().to_string(),
        seq: st.engine.seq(),
        role: cluster.as_ref().map(|c| c.role),
        leader: cluster.as_ref().and_then(|c| c.leader.clone()),
        node: cluster.as_ref().map(|c| c.node.clone()),
        stream_lag: cluster.as_ref().map(|c| c.lag),
        nats: cluster
            .as_ref()
            .map(|c| if c.nats { "connected" } else { "disconnected" }),
    };
    // Spooling still accepts writes (durably, on disk): the bridge stays ready. Without any
    // key from its identity provider it cannot authenticate anyone's tokens: not ready.
    let jwks_ok = body.jwks.as_ref().is_none_or(|j| j.state != "unavailable");
    let code = if xmpp_ok && jwks_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    HttpResponse::build(code).json(body)
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
#[route("/metrics", method = "GET", method = "HEAD")]
pub async fn metrics(st: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(super::metrics::render(&st.registry))
}

/// A bare JID in a path (`local@domain`, lower-cased on the way in; a trailing root dot is
/// the same user). The OpenAPI format `jid` means an RFC 7622 bare JID: a localpart (PRECIS
/// UsernameCaseMapped) and a domain (IDNA), which no regular expression captures exactly;
/// anything else is answered 400 `invalid_jid`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JidPath {
    /// Bare JID.
    #[param(format = "jid", example = "alice@example.com")]
    pub jid: String,
}

/// Query of `GET /api/v1/presence`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only users of this domain.
    pub domain: Option<String>,
    /// Only users with this aggregate show.
    #[param(value_type = Option<crate::presence::Show>)]
    pub show: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    pub limit: Option<usize>,
    /// Cursor from the previous page (`next_cursor`).
    #[param(pattern = "^([0-9a-fA-F]{2})*$")]
    pub cursor: Option<String>,
}

/// Online users page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PresenceList {
    /// The epoch of `seq`.
    pub epoch: String,
    /// The snapshot's seq.
    pub seq: u64,
    /// Online users, sorted by JID.
    #[schema(value_type = Vec<crate::presence::UserPresence>)]
    pub users: Vec<Arc<UserPresence>>,
    /// Cursor for the next page.
    pub next_cursor: Option<String>,
}

fn parse_show(s: &str) -> Result<Show, ApiError> {
    Show::ALL
        .into_iter()
        .find(|x| x.as_str() == s)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_parameter",
                format!("show must be one of chat, available, away, xa, dnd, offline; got {s:?}"),
            )
        })
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    Some(String::from_utf8_lossy(&bytes?).into_owned())
}

/// `GET /api/v1/presence`.
#[utoipa::path(get, path = "/api/v1/presence", params(ListQuery), responses((status = 200, description = "Online users, one page", body = PresenceList), (status = 400, description = "A bad parameter, JID or body (`invalid_parameter`, `invalid_jid`, `invalid_cursor`, `invalid_body`)", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/presence", method = "GET", method = "HEAD")]
pub async fn list(
    st: State,
    PresenceRead(p): PresenceRead,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let show = q.show.as_deref().map(parse_show).transpose()?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "limit must be 1..=10000",
        ));
    }
    // The cursor is the last JID of the previous page in hex; the next page starts after it
    // in JID order. Any hex text is a position (an empty one is the start).
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(unhex(c).ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor is not one this bridge issued")
        })?),
        None => None,
    };
    let domain = q.domain.as_deref().map(str::to_lowercase);
    let snap = st.engine.snapshot().await.map_err(ApiError::internal)?;
    // A page starts at the cursor (a range query on the ordered snapshot), not at the top.
    let from: Box<dyn Iterator<Item = &Arc<UserPresence>>> = match &after {
        Some(a) => Box::new(snap.after(a)),
        None => Box::new(snap.iter()),
    };
    let mut users: Vec<Arc<UserPresence>> = from
        .filter(|u| p.can_see(&u.jid))
        .filter(|u| domain.as_deref().is_none_or(|d| u.jid.domain() == d))
        .filter(|u| show.is_none_or(|s| u.show == s))
        .take(limit + 1)
        .cloned()
        .collect();
    let next_cursor = if users.len() > limit {
        users.truncate(limit);
        users.last().map(|u| hex(u.jid.as_str()))
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(PresenceList {
        epoch: snap.epoch.to_string(),
        seq: snap.seq,
        users,
        next_cursor,
    }))
}

fn visible(p: &Permissions, jid: &UserJid) -> Result<(), ApiError> {
    // A JID outside the token's domains is indistinguishable from an unknown one.
    if p.can_see(jid) {
        Ok(())
    } else {
        Err(ApiError::unknown_jid(jid.as_str()))
    }
}

/// `GET /api/v1/presence/{jid}`.
#[utoipa::path(get, path = "/api/v1/presence/{jid}", params(JidPath), responses((status = 200, description = "The user's presence", body = crate::presence::UserPresence), (status = 400, description = "A bad parameter, JID or body (`invalid_parameter`, `invalid_jid`, `invalid_cursor`, `invalid_body`)", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 404, description = "Never seen (or outside the token's domains): `unknown_jid`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/presence/{jid}", method = "GET", method = "HEAD")]
pub async fn one(
    st: State,
    PresenceRead(p): PresenceRead,
    jid: web::Path<JidPath>,
) -> Result<HttpResponse, ApiError> {
    let jid = parse_jid(&jid.jid)?;
    visible(&p, &jid)?;
    let u = st
        .engine
        .get(&jid)
        .ok_or_else(|| ApiError::unknown_jid(jid.as_str()))?;
    Ok(HttpResponse::Ok().json(u))
}

/// `GET /api/v1/last-seen/{jid}`.
#[utoipa::path(get, path = "/api/v1/last-seen/{jid}", params(JidPath), responses((status = 200, description = "When the user was last seen", body = super::lookup::LastSeen), (status = 400, description = "A bad parameter, JID or body (`invalid_parameter`, `invalid_jid`, `invalid_cursor`, `invalid_body`)", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 404, description = "Never seen (or outside the token's domains): `unknown_jid`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "The history store is unavailable (`store_unavailable`)", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/last-seen/{jid}", method = "GET", method = "HEAD")]
pub async fn last_seen(
    st: State,
    PresenceRead(p): PresenceRead,
    jid: web::Path<JidPath>,
) -> Result<HttpResponse, ApiError> {
    let jid = parse_jid(&jid.jid)?;
    visible(&p, &jid)?;
    lookup::last_seen_one(&st.engine, st.store.as_ref(), &jid)
        .await?
        .map(|ls| HttpResponse::Ok().json(ls))
        .ok_or_else(|| ApiError::unknown_jid(jid.as_str()))
}

/// Body of `POST /api/v1/last-seen`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// Up to 1000 bare JIDs.
    #[schema(max_items = 1000, value_type = Vec<BareJidText>, example = json!(["alice@example.com", "bob@example.com"]))]
    pub jids: Vec<String>,
}

/// A bare JID as text (`local@domain`), for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[schema(value_type = String, format = "jid", example = "alice@example.com")]
pub struct BareJidText(#[allow(dead_code)] String);

/// Answer of `POST /api/v1/last-seen`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkAnswer {
    /// The known users, in request order.
    pub results: Vec<super::lookup::LastSeen>,
    /// The JIDs never seen (or outside the token's domains).
    #[schema(value_type = Vec<String>)]
    pub unknown: Vec<UserJid>,
}

/// Most JIDs per bulk request.
pub const BULK_MAX: usize = 1000;

/// `POST /api/v1/last-seen`.
#[utoipa::path(post, path = "/api/v1/last-seen", request_body = BulkBody, responses((status = 200, description = "The known users in request order, and the unknown JIDs", body = BulkAnswer), (status = 400, description = "A bad parameter, JID or body (`invalid_parameter`, `invalid_jid`, `invalid_cursor`, `invalid_body`)", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 413, description = "Body larger than `http.body_limit_bytes`", body = super::error::ErrorBody), (status = 415, description = "Body is not `application/json`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "The history store is unavailable (`store_unavailable`)", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[post("/last-seen")]
pub async fn last_seen_bulk(
    st: State,
    PresenceRead(p): PresenceRead,
    body: web::Json<BulkBody>,
) -> Result<HttpResponse, ApiError> {
    if body.jids.len() > BULK_MAX {
        return Err(ApiError::bad_request(
            "too_many_jids",
            format!(
                "at most {BULK_MAX} JIDs per request; got {}",
                body.jids.len()
            ),
        ));
    }
    let mut jids = Vec::with_capacity(body.jids.len());
    let mut hidden = Vec::new();
    for s in &body.jids {
        let j = parse_jid(s)?;
        if p.can_see(&j) {
            jids.push(j)
        } else {
            hidden.push(j)
        }
    }
    let (results, mut unknown) = lookup::last_seen(&st.engine, st.store.as_ref(), &jids).await?;
    unknown.extend(hidden);
    Ok(HttpResponse::Ok().json(BulkAnswer { results, unknown }))
}

/// Query of `GET /api/v1/history/{jid}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct HistoryParams {
    /// From (RFC 3339, inclusive).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// To (RFC 3339, exclusive).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    pub limit: Option<i64>,
    /// Oldest first (`asc`) or newest first (`desc`, the default).
    #[param(value_type = Option<Order>)]
    pub order: Option<String>,
    /// Cursor from the previous page (`next_cursor`).
    #[param(pattern = r"^[0-9a-f]{1,15}\.[0-9a-f]{32}$")]
    pub cursor: Option<String>,
}

pub(crate) fn parse_time(
    name: &str,
    v: &Option<String>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        format!("{name} must be an RFC 3339 time, e.g. 2026-11-22T10:00:00Z"),
                    )
                })
        })
        .transpose()
}

/// `GET /api/v1/history/{jid}`.
#[utoipa::path(get, path = "/api/v1/history/{jid}", params(JidPath, HistoryParams), responses((status = 200, description = "One page of the user's history", body = super::lookup::HistoryBody), (status = 400, description = "A bad parameter, JID or body (`invalid_parameter`, `invalid_jid`, `invalid_cursor`, `invalid_body`)", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 404, description = "Never seen (or outside the token's domains): `unknown_jid`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept (`history_disabled`): only when the engine was started elsewhere; memory-only mode answers from this run's history", body = super::error::ErrorBody), (status = 503, description = "The history store is unavailable (`store_unavailable`)", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/history/{jid}", method = "GET", method = "HEAD")]
pub async fn history(
    st: State,
    HistoryRead(p): HistoryRead,
    jid: web::Path<JidPath>,
    q: web::Query<HistoryParams>,
) -> Result<HttpResponse, ApiError> {
    let jid = parse_jid(&jid.jid)?;
    visible(&p, &jid)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "limit must be 1..=1000",
        ));
    }
    let order = match q.order.as_deref() {
        None | Some("desc") => reads::Order::Desc,
        Some("asc") => reads::Order::Asc,
        Some(o) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("order must be asc or desc; got {o:?}"),
            ));
        }
    };
    let query = HistoryQuery {
        from: parse_time("from", &q.from)?,
        to: parse_time("to", &q.to)?,
        order,
        limit,
        cursor: q.cursor.clone(),
    };
    if let Some(store) = &st.store {
        return Ok(HttpResponse::Ok().json(lookup::history(store, &jid, &query).await?));
    }
    // Memory-only mode: this run's history (contract §6).
    let Some(h) = &st.history else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "history_disabled",
            "this bridge keeps no history (no Postgres, and the engine was started elsewhere)",
        ));
    };
    Ok(HttpResponse::Ok().json(lookup::history_memory(h, &jid, &query)?))
}

/// `GET /api/v1/stats` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsBody {
    /// Seq the counts include.
    pub seq: u64,
    /// Online users.
    pub online_users: u64,
    /// Online resources.
    pub online_resources: u64,
    /// By aggregate show.
    pub by_show: BTreeMap<String, u64>,
    /// By domain.
    pub by_domain: BTreeMap<String, u64>,
}

impl From<crate::presence::Stats> for StatsBody {
    fn from(s: crate::presence::Stats) -> Self {
        StatsBody {
            seq: s.seq,
            online_users: s.online_users,
            online_resources: s.online_resources,
            by_show: s
                .by_show
                .into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), v))
                .collect(),
            by_domain: s.by_domain,
        }
    }
}

/// `GET /api/v1/stats`.
#[utoipa::path(get, path = "/api/v1/stats", responses((status = 200, description = "Online counts", body = StatsBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/stats", method = "GET", method = "HEAD")]
pub async fn stats(st: State, PresenceRead(p): PresenceRead) -> Result<HttpResponse, ApiError> {
    let body = if p.is_restricted() {
        // Counted from a snapshot, so that a narrowed token sees only its domains.
        let snap = st.engine.snapshot().await.map_err(ApiError::internal)?;
        let mut s = crate::presence::Stats {
            seq: snap.seq,
            ..Default::default()
        };
        for u in snap.iter().filter(|u| p.can_see(&u.jid)) {
            s.account(u, 1);
        }
        StatsBody::from(s)
    } else {
        StatsBody::from(st.engine.stats())
    };
    Ok(HttpResponse::Ok().json(body))
}

/// `GET /api/v1/stats/concurrency` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConcurrencyBody {
    /// Seconds between samples.
    pub interval_secs: u64,
    /// Samples, oldest first (none for a token limited to some domains).
    pub samples: Vec<super::Sample>,
}

/// A history order, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// `GET /api/v1/stats/concurrency`: online counts over the last hour (every 10 s), for the
/// dashboard's sparkline. Totals only: a token limited to some domains gets no samples.
#[utoipa::path(get, path = "/api/v1/stats/concurrency", responses((status = 200, description = "Online counts over the last hour", body = ConcurrencyBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/stats/concurrency", method = "GET", method = "HEAD")]
pub async fn concurrency(st: State, PresenceRead(p): PresenceRead) -> HttpResponse {
    let samples: Vec<super::Sample> = if p.is_restricted() {
        Vec::new()
    } else {
        st.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    };
    HttpResponse::Ok().json(ConcurrencyBody {
        interval_secs: super::SAMPLE_EVERY.as_secs(),
        samples,
    })
}

/// `POST /api/v1/admin/reconcile`: one reconcile run (contract §8, §10), waiting for a run in
/// progress to end first.
#[utoipa::path(post, path = "/api/v1/admin/reconcile", responses((status = 200, description = "What the run did", body = crate::sources::reconcile::Outcome), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "`reconcile_disabled`: no [reconcile] section", body = super::error::ErrorBody), (status = 502, description = "`reconcile_failed`: the server's session list could not be read", body = super::error::ErrorBody), (status = 503, description = "`xmpp_disconnected`: nothing can be corrected while the component is down", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[post("/admin/reconcile")]
pub async fn admin_reconcile(
    st: State,
    AdminScope(p): AdminScope,
) -> Result<HttpResponse, ApiError> {
    use crate::sources::reconcile::ReconcileError;
    st.leader_only()?;
    let Some(rec) = st.reconciler() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "reconcile_disabled",
            "no reconciler is configured ([reconcile] in the config)",
        ));
    };
    tracing::info!(sub = %p.sub, "admin: reconcile requested");
    match rec.run().await {
        Ok(outcome) => Ok(HttpResponse::Ok().json(outcome)),
        Err(ReconcileError::Disconnected) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "xmpp_disconnected",
            "the XMPP component is disconnected; nothing is corrected until it is back",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "reconcile_failed",
            crate::config::mask_url_password(&e.to_string()),
        )),
    }
}
