//! Webhook endpoints and alerts over the API (contract §7): list, create (the secret is shown
//! once), delete, the delivery log (scope `admin`), and the recent alerts for the dashboard's
//! strip (scope `presence:read`).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, delete, post, route, web};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{AdminScope, PresenceRead};
use super::error::ApiError;
use crate::config::{Secret, WebhookConfig};
use crate::webhooks::outbox::Attempt;
use crate::webhooks::{CreateError, DeleteError, Source, Webhooks, alerts::Alert, new_secret};

type State = web::Data<AppState>;

fn hooks(st: &AppState) -> Result<std::sync::Arc<Webhooks>, ApiError> {
    st.leader_only()?;
    st.webhooks().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "webhooks_unavailable",
            "this bridge runs no webhooks (its engine belongs to another component)",
        )
    })
}

fn store_error(e: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!(
            "the webhook store is unavailable: {}",
            crate::config::mask_url_password(&e)
        ),
    )
}

/// One endpoint as listed (never its secret).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookBody {
    /// Id.
    pub id: String,
    /// Where messages go.
    pub url: String,
    /// Event types.
    pub events: Vec<String>,
    /// Only these domains (empty: all).
    pub domains: Vec<String>,
    /// Only these users (empty: all).
    pub jids: Vec<String>,
    /// `config` or `api`.
    pub source: Source,
    /// Messages waiting.
    pub pending: u64,
}

/// `GET /api/v1/webhooks` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhooksBody {
    /// By id.
    pub webhooks: Vec<WebhookBody>,
}

/// `GET /api/v1/webhooks`.
#[utoipa::path(get, path = "/api/v1/webhooks", responses((status = 200, description = "The endpoints (no secrets)", body = WebhooksBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "`store_unavailable`", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/webhooks", method = "GET", method = "HEAD")]
pub async fn list(st: State, _admin: AdminScope) -> Result<HttpResponse, ApiError> {
    let w = hooks(&st)?;
    let mut out = Vec::new();
    for e in w.list() {
        let pending = w.outbox().pending(&e).await.map_err(store_error)?;
        out.push(WebhookBody {
            id: e.id.clone(),
            url: e.url.clone(),
            events: e.events.clone(),
            domains: e.domains.clone(),
            jids: e.jids.clone(),
            source: e.source,
            pending,
        });
    }
    Ok(HttpResponse::Ok().json(WebhooksBody { webhooks: out }))
}

/// `POST /api/v1/webhooks` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where messages go (`http://` or `https://`).
    #[schema(
        format = "uri",
        pattern = r"^https?://[^\s]+$",
        example = "https://hooks.example.com/presence"
    )]
    pub url: String,
    /// Event types (at least one).
    #[schema(min_items = 1, value_type = Vec<EventType>)]
    pub events: Vec<String>,
    /// Only these domains.
    #[serde(default)]
    #[schema(value_type = Vec<DomainText>)]
    pub domains: Vec<String>,
    /// Only these users.
    #[serde(default)]
    #[schema(value_type = Vec<super::rest::BareJidText>)]
    pub jids: Vec<String>,
    /// An id of your choosing (default: generated): letters, digits, `.`, `_`, `-`.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub id: Option<String>,
}

/// A domain name, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$", example = "example.com")]
pub struct DomainText(#[allow(dead_code)] String);

/// A webhook event type, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
pub enum EventType {
    /// A user came online.
    #[schema(rename = "presence.online")]
    PresenceOnline,
    /// A user's last resource left.
    #[schema(rename = "presence.offline")]
    PresenceOffline,
    /// An online user changed.
    #[schema(rename = "presence.update")]
    PresenceUpdate,
    /// A user flapped.
    #[schema(rename = "alert.flapping")]
    AlertFlapping,
    /// A login storm.
    #[schema(rename = "alert.storm")]
    AlertStorm,
}

/// `POST /api/v1/webhooks` answer: the endpoint and its secret, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedWebhook {
    /// Id.
    pub id: String,
    /// `whsec_…`: keep it; it is never shown again.
    pub secret: String,
    /// Where messages go.
    pub url: String,
    /// Event types.
    pub events: Vec<String>,
    /// Only these domains.
    pub domains: Vec<String>,
    /// Only these users.
    pub jids: Vec<String>,
    /// `api`.
    pub source: Source,
}

/// `POST /api/v1/webhooks`.
#[utoipa::path(post, path = "/api/v1/webhooks", request_body = NewWebhook, responses((status = 201, description = "Created; the secret is shown this once", body = CreatedWebhook), (status = 400, description = "`invalid_body` or `invalid_parameter`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 409, description = "`webhook_exists`", body = super::error::ErrorBody), (status = 413, description = "Body too large", body = super::error::ErrorBody), (status = 415, description = "Body is not `application/json`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "`store_unavailable`", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[post("/webhooks")]
pub async fn create(
    st: State,
    AdminScope(p): AdminScope,
    body: web::Json<NewWebhook>,
) -> Result<HttpResponse, ApiError> {
    let w = hooks(&st)?;
    let b = body.into_inner();
    let secret = new_secret();
    let cfg = WebhookConfig {
        id: b
            .id
            .unwrap_or_else(|| format!("wh_{:016x}", rand::random::<u64>())),
        url: b.url,
        secret: Secret::new(secret.clone()),
        secret_file: None,
        events: b.events,
        domains: b.domains,
        jids: b.jids,
    };
    cfg.check("webhook").map_err(|e| {
        let text = e.to_string();
        ApiError::bad_request(
            "invalid_parameter",
            text.trim_start_matches("invalid config: ")
                .replacen("webhook.", "", 1),
        )
    })?;
    let e = w.create(cfg).await.map_err(|e| match e {
        CreateError::Exists => ApiError::new(
            StatusCode::CONFLICT,
            "webhook_exists",
            "an endpoint with this id exists",
        ),
        CreateError::Invalid(m) => ApiError::bad_request("invalid_parameter", m),
        CreateError::Store(m) => store_error(m),
    })?;
    tracing::info!(by = %p.sub, id = %e.id, events = ?e.events, "webhooks: endpoint created");
    Ok(HttpResponse::Created().json(CreatedWebhook {
        id: e.id.clone(),
        secret,
        url: e.url.clone(),
        events: e.events.clone(),
        domains: e.domains.clone(),
        jids: e.jids.clone(),
        source: e.source,
    }))
}

/// `DELETE /api/v1/webhooks/{id}`.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", params(("id" = String, Path, description = "The endpoint's id")), responses((status = 204, description = "Deleted with its pending messages"), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 404, description = "`unknown_webhook`", body = super::error::ErrorBody), (status = 409, description = "`webhook_from_config`: it comes from the config file", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "`store_unavailable`", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[delete("/webhooks/{id}")]
pub async fn remove(
    st: State,
    AdminScope(p): AdminScope,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let w = hooks(&st)?;
    w.delete(&id).await.map_err(|e| match e {
        DeleteError::Unknown => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_webhook",
            "no endpoint has this id",
        ),
        DeleteError::FromConfig => ApiError::new(
            StatusCode::CONFLICT,
            "webhook_from_config",
            "this endpoint comes from the config file ([[webhooks]]); remove it there",
        ),
        DeleteError::Store(m) => store_error(m),
    })?;
    tracing::info!(by = %p.sub, id = %id, "webhooks: endpoint deleted");
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /api/v1/webhooks/{id}/deliveries` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveriesBody {
    /// Recent attempts, newest first.
    pub deliveries: Vec<Attempt>,
}

/// `GET /api/v1/webhooks/{id}/deliveries`: the newest 100 attempts.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", params(("id" = String, Path, description = "The endpoint's id")), responses((status = 200, description = "Recent attempts, newest first", body = DeliveriesBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 404, description = "`unknown_webhook`", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "`store_unavailable`", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/webhooks/{id}/deliveries", method = "GET", method = "HEAD")]
pub async fn deliveries(
    st: State,
    _admin: AdminScope,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let w = hooks(&st)?;
    if !w.list().iter().any(|e| e.id == *id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_webhook",
            "no endpoint has this id",
        ));
    }
    let deliveries = w.outbox().deliveries(&id, 100).await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(DeliveriesBody { deliveries }))
}

/// `GET /api/v1/alerts` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AlertsBody {
    /// The last alerts (at most 50), newest first.
    pub alerts: Vec<Alert>,
}

/// `GET /api/v1/alerts`: the last alerts (the dashboard's strip). Alerts about users outside
/// the token's domains are left out.
#[utoipa::path(get, path = "/api/v1/alerts", responses((status = 200, description = "The last alerts, newest first", body = AlertsBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks presence:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/alerts", method = "GET", method = "HEAD")]
pub async fn alerts(st: State, PresenceRead(p): PresenceRead) -> HttpResponse {
    let alerts = st
        .webhooks()
        .map(|w| {
            w.recent_alerts()
                .into_iter()
                .filter(|a| match a {
                    Alert::Flapping { jid, .. } => p.can_see(jid),
                    Alert::Storm { domain, .. } => p.can_see_domain(domain),
                })
                .collect()
        })
        .unwrap_or_default();
    HttpResponse::Ok().json(AlertsBody { alerts })
}
