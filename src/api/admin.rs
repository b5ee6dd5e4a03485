//! Operator control (contract §8, scope `admin`): the open WebSocket sessions (list, close),
//! a resync on demand, and the right to erasure. `POST /admin/reconcile` lives with the
//! reconciler's other surface in `rest`.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, delete, post, route, web};
use serde::Serialize;

use super::AppState;
use super::auth::AdminScope;
use super::error::ApiError;
use super::rest::parse_jid;
use super::ws::SubscriberBody;
use crate::store::StoreMode;

type State = web::Data<AppState>;

/// How long an erasure waits for the writer to settle what was queued before it.
const ERASE_SETTLE: Duration = Duration::from_secs(15);

/// `GET /api/v1/admin/subscribers` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscribersBody {
    /// The open WebSocket sessions, oldest first.
    pub subscribers: Vec<SubscriberBody>,
}

/// `GET /api/v1/admin/subscribers`: the open WebSocket sessions.
#[utoipa::path(get, path = "/api/v1/admin/subscribers", responses((status = 200, description = "The open WebSocket sessions", body = SubscribersBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[route("/admin/subscribers", method = "GET", method = "HEAD")]
pub async fn subscribers(st: State, _admin: AdminScope) -> HttpResponse {
    let mut subscribers: Vec<SubscriberBody> =
        st.subscribers.iter().map(|s| s.value().body()).collect();
    subscribers.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then(a.id.cmp(&b.id)));
    HttpResponse::Ok().json(SubscribersBody { subscribers })
}

/// `DELETE /api/v1/admin/subscribers/{id}`: closes one session (it gets an error frame
/// `closed_by_admin` and a close with code 1008).
#[utoipa::path(delete, path = "/api/v1/admin/subscribers/{id}", params(("id" = String, Path, description = "The session's id from the list")), responses((status = 204, description = "The session is closing"), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 404, description = "`unknown_subscriber`: no open session has this id", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait")))), security(("bearer" = [])))]
#[delete("/admin/subscribers/{id}")]
pub async fn close_subscriber(
    st: State,
    AdminScope(p): AdminScope,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let Some(s) = st.subscribers.get(id.as_str()).map(|s| s.value().clone()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_subscriber",
            "no open WebSocket session has this id",
        ));
    };
    tracing::info!(by = %p.sub, id = %s.id, subscriber = %s.sub, "admin: closing a WebSocket session");
    s.close();
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/admin/resync` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResyncBody {
    /// `started`.
    pub resync: &'static str,
}

/// `POST /api/v1/admin/resync`: every known user is probed now, as after a reconnect.
#[utoipa::path(post, path = "/api/v1/admin/resync", responses((status = 202, description = "A resync round starts (probes go out at `xmpp.probe_rate_per_sec`; `/readyz` shows `resyncing` until the grace period ends)", body = ResyncBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "`resync_unavailable`: no XMPP component (demo, or AMQP alone)", body = super::error::ErrorBody), (status = 503, description = "`xmpp_disconnected`: the component is down (the next connect resyncs anyway)", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[post("/admin/resync")]
pub async fn resync(st: State, AdminScope(p): AdminScope) -> Result<HttpResponse, ApiError> {
    st.leader_only()?;
    let Some(c) = st.component() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "resync_unavailable",
            "this bridge has no XMPP component to probe through (demo, or [amqp] alone)",
        ));
    };
    if !c.status().connected || !c.resync_now() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "xmpp_disconnected",
            "the XMPP component is disconnected; the next connect resyncs anyway",
        ));
    }
    tracing::info!(sub = %p.sub, "admin: resync requested");
    Ok(HttpResponse::Accepted().json(ResyncBody { resync: "started" }))
}

/// `DELETE /api/v1/users/{jid}`: the right to erasure. The engine forgets the user first (so
/// nothing more about them is queued), the writer settles what was queued before, then the
/// user's history, sessions, last-seen and per-user rollups are deleted in one transaction
/// (or from the in-memory history). Logged with the token's `sub`.
#[utoipa::path(delete, path = "/api/v1/users/{jid}", params(super::rest::JidPath), responses((status = 204, description = "Erased (also when nothing was known)"), (status = 400, description = "`invalid_jid`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks the admin scope, or may not see that JID", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 503, description = "`store_unavailable`: Postgres is unreachable or the spool is not replayed yet; nothing was erased from it — retry", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[delete("/users/{jid}")]
pub async fn erase_user(
    st: State,
    AdminScope(p): AdminScope,
    jid: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let jid = parse_jid(&jid)?;
    if !p.can_see(&jid) {
        return Err(ApiError::forbidden(
            "this token may not see that JID's domain",
        ));
    }
    let unavailable = |why: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{why}; nothing was erased from Postgres: retry later"),
        )
    };
    if let Some(store) = &st.store {
        let s = store.status();
        if s.mode != StoreMode::Ok || s.spooled_events > 0 {
            return Err(unavailable(
                "Postgres is unreachable or the spool is being replayed",
            ));
        }
    }
    // The erasure goes through the stream: only the leader sequences it.
    st.leader_only()?;
    let known = st.engine.forget(&jid).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the bridge is stopping",
        )
    })?;
    let mut erased = crate::store::pg::Erased::default();
    if let Some(h) = &st.history {
        let (events, sessions) = h.erase(&jid);
        erased.events += events as u64;
        erased.sessions += sessions as u64;
    }
    if let Some(store) = &st.store {
        // Everything about the user that was queued before the engine forgot them.
        let mark = store.sink().pushed();
        if !store.sink().settled_through(mark, ERASE_SETTLE).await {
            return Err(unavailable("the store writer is behind"));
        }
        let s = store.status();
        if s.mode != StoreMode::Ok || s.spooled_events > 0 {
            return Err(unavailable("events were spooled"));
        }
        let mut c = crate::store::pg::client(store.pool())
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let e = crate::store::pg::erase_user(&mut c, jid.as_str())
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        erased.events += e.events;
        erased.sessions += e.sessions;
        erased.last_seen += e.last_seen;
    }
    // Pending webhook messages about the user go too (those still queued first reach the
    // outbox, so none slips past).
    let mut messages = 0;
    if let Some(w) = st.webhooks() {
        w.flush().await;
        messages = w
            .outbox()
            .erase_jid(jid.as_str())
            .await
            .map_err(|e| unavailable(&e))?;
    }
    tracing::warn!(
        by = %p.sub,
        jid = %jid,
        known,
        webhook_messages = messages,
        events = erased.events,
        sessions = erased.sessions,
        last_seen = erased.last_seen,
        "admin: user erased (right to erasure)"
    );
    Ok(HttpResponse::NoContent().finish())
}
