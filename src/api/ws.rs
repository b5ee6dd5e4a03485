//! `GET /api/v1/ws` (contract §5): snapshot, then batched diffs; resume with `since`+`epoch`;
//! `jids`/`domains` filters and the `subscribe` message; lag → `resync` + snapshot for that
//! client only; server pings; per-token connection cap.
//!
//! One task per session, one `select!` over the socket, the change feed, the ping timer and
//! shutdown. Every write has a deadline: a client that stops reading is closed, and because
//! each session reads the hub at its own pace nothing on the change path ever waits for it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, get, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{Permissions, Scope, authenticate, require};
use super::error::ApiError;
use crate::presence::{Change, Resume, UserJid, UserPresence};

/// Most changes in one diff frame. Under a burst everything waiting would otherwise go into a
/// single frame (tens of MB after a busy second), more than clients accept in one message
/// (tungstenite's default limit is 16 MiB) and a long stall for a browser.
const MAX_CHANGES_PER_FRAME: usize = 512;

/// Client messages (text, binary, ping) a session may send: a burst of this many...
const CLIENT_BURST: f64 = 20.0;
/// ...then this many a second. Each `subscribe` costs a snapshot; beyond the budget the
/// session gets an `error` frame and is closed (1008), so one connection cannot make the
/// bridge build snapshots in a loop.
const CLIENT_PER_SEC: f64 = 10.0;

/// A token bucket for one session's client messages.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new() -> Self {
        Self {
            tokens: CLIENT_BURST,
            at: Instant::now(),
        }
    }

    /// Takes one token; false when the budget is spent.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * CLIENT_PER_SEC;
        self.tokens = (self.tokens + refill).min(CLIENT_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Longest a server-initiated close waits for the client to stop sending.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// Quiet that tells the client has stopped sending.
const CLOSE_QUIET: Duration = Duration::from_millis(100);

/// `Retry-After` when a token is at its connection cap: a slot frees when one of its sessions
/// ends, which the bridge cannot predict; a few seconds keeps retries from hammering.
const CAP_RETRY_AFTER_SECS: u64 = 5;

/// Query of `GET /api/v1/ws`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WsQuery {
    /// The token (browsers cannot set the Authorization header on a WebSocket).
    #[serde(default)]
    #[allow(dead_code)]
    token: Option<String>,
    /// Resume after this seq (with `epoch`).
    since: Option<u64>,
    /// The epoch of `since`.
    epoch: Option<String>,
    /// Only these users (comma-separated bare JIDs).
    jids: Option<String>,
    /// Only these domains (comma-separated).
    domains: Option<String>,
}

/// What a session shows: the token's domains always, narrowed by the client's filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    jids: Option<HashSet<UserJid>>,
    domains: Option<HashSet<String>>,
}

impl Filter {
    fn new(jids: Option<Vec<String>>, domains: Option<Vec<String>>) -> Result<Filter, String> {
        let jids = jids
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.iter()
                    .map(|s| UserJid::parse(s.trim()).map_err(|_| s.clone()))
                    .collect::<Result<HashSet<_>, _>>()
            })
            .transpose()?;
        let domains = domains
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().map(|d| d.trim().to_lowercase()).collect());
        Ok(Filter { jids, domains })
    }

    /// The filter as the subscribers list shows it: (jids, domains), sorted; `None` = any.
    fn describe(&self) -> FilterBody {
        let mut jids: Option<Vec<String>> = self
            .jids
            .as_ref()
            .map(|j| j.iter().map(|x| x.as_str().to_owned()).collect());
        let mut domains: Option<Vec<String>> =
            self.domains.as_ref().map(|d| d.iter().cloned().collect());
        if let Some(j) = &mut jids {
            j.sort();
        }
        if let Some(d) = &mut domains {
            d.sort();
        }
        FilterBody { jids, domains }
    }

    fn passes(&self, p: &Permissions, jid: &UserJid) -> bool {
        if !p.can_see(jid) {
            return false;
        }
        match (&self.jids, &self.domains) {
            (None, None) => true,
            (j, d) => {
                j.as_ref().is_some_and(|j| j.contains(jid))
                    || d.as_ref().is_some_and(|d| d.contains(jid.domain()))
            }
        }
    }
}

fn split(s: &Option<String>) -> Option<Vec<String>> {
    s.as_ref().map(|s| {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// Origin check: requests without Origin (non-browser clients) pass; a browser's Origin
/// must be in `http.allowed_origins` (`*` allows any) or be this server itself: the scheme
/// it serves and the address the connection arrived on (`localhost` too on a loopback
/// address). The `Host` header is not trusted (a DNS-rebinding page controls it), nor are
/// `X-Forwarded-Host`/`Forwarded` unless `http.trust_forwarded_headers` says a proxy sets them.
fn origin_ok(req: &HttpRequest, http: &crate::config::HttpConfig) -> bool {
    let Some(origin) = req
        .headers()
        .get(actix_web::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if http
        .allowed_origins
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let scheme = if http.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let local = req.app_config().local_addr();
    let mut same = vec![format!("{scheme}://{local}")];
    if local.ip().is_loopback() {
        same.push(format!("{scheme}://localhost:{}", local.port()));
    }
    if http.trust_forwarded_headers {
        let info = req.connection_info();
        same.push(format!("{}://{}", info.scheme(), info.host()));
    }
    same.iter().any(|s| s.eq_ignore_ascii_case(origin))
}

/// Holds one of a token's connection slots; released on drop.
struct Slot {
    st: web::Data<AppState>,
    sub: String,
}

impl Slot {
    fn acquire(st: &web::Data<AppState>, sub: &str) -> Option<Slot> {
        let mut n = st.ws_conns.entry(sub.to_owned()).or_insert(0);
        if *n >= st.http.ws_max_per_token {
            return None;
        }
        *n += 1;
        Some(Slot {
            st: st.clone(),
            sub: sub.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let gone = match self.st.ws_conns.get_mut(&self.sub) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            self.st.ws_conns.remove_if(&self.sub, |_, n| *n == 0);
        }
    }
}

/// A session's filter in the subscribers list (`null` = no narrowing).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FilterBody {
    /// Only these users.
    pub jids: Option<Vec<String>>,
    /// Only these domains.
    pub domains: Option<Vec<String>>,
}

/// One open WebSocket session, as an operator sees it (contract §8).
#[derive(Debug)]
pub struct Subscriber {
    /// Random id, for `DELETE /api/v1/admin/subscribers/{id}`.
    pub id: String,
    /// The token's subject.
    pub sub: String,
    /// The peer's address.
    pub remote_addr: Option<String>,
    /// When the session opened.
    pub connected_at: chrono::DateTime<Utc>,
    filter: std::sync::Mutex<FilterBody>,
    frames_sent: std::sync::atomic::AtomicU64,
    resyncs: std::sync::atomic::AtomicU64,
    /// Cancelled by an operator: the session says `closed_by_admin` and closes with 1008.
    kick: tokio_util::sync::CancellationToken,
}

/// `GET /api/v1/admin/subscribers` row.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriberBody {
    /// Session id.
    pub id: String,
    /// The token's subject.
    pub sub: String,
    /// The peer's address.
    pub remote_addr: Option<String>,
    /// When the session opened.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub connected_at: chrono::DateTime<Utc>,
    /// Its current filter.
    pub filter: FilterBody,
    /// Frames sent to it.
    pub frames_sent: u64,
    /// Times it fell behind and got a fresh snapshot.
    pub resyncs: u64,
}

impl Subscriber {
    /// What the subscribers list shows.
    pub fn body(&self) -> SubscriberBody {
        use std::sync::atomic::Ordering::Relaxed;
        SubscriberBody {
            id: self.id.clone(),
            sub: self.sub.clone(),
            remote_addr: self.remote_addr.clone(),
            connected_at: self.connected_at,
            filter: self
                .filter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            frames_sent: self.frames_sent.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
        }
    }

    /// Asks the session to close (`closed_by_admin`, 1008).
    pub fn close(&self) {
        self.kick.cancel();
    }

    fn set_filter(&self, f: &Filter) {
        *self.filter.lock().unwrap_or_else(|p| p.into_inner()) = f.describe();
    }
}

/// Keeps a session in `AppState::subscribers` for its life.
struct Registered {
    st: Arc<AppState>,
    info: Arc<Subscriber>,
}

impl Registered {
    fn new(st: Arc<AppState>, sub: &str, remote_addr: Option<String>, filter: &Filter) -> Self {
        let info = Arc::new(Subscriber {
            id: format!("{:016x}", rand::random::<u64>()),
            sub: sub.to_owned(),
            remote_addr,
            connected_at: Utc::now(),
            filter: std::sync::Mutex::new(filter.describe()),
            frames_sent: Default::default(),
            resyncs: Default::default(),
            kick: tokio_util::sync::CancellationToken::new(),
        });
        st.subscribers.insert(info.id.clone(), info.clone());
        Registered { st, info }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.st.subscribers.remove(&self.info.id);
    }
}

/// `GET /api/v1/ws`: the live feed (contract §5). Upgrades to a WebSocket; see the README
/// for the frames.
#[utoipa::path(get, path = "/api/v1/ws", params(WsQuery), responses(
    (status = 101, description = "Switching to the WebSocket protocol"),
    (status = 400, description = "Not a WebSocket handshake, or a bad parameter or JID", body = super::error::ErrorBody),
    (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody),
    (status = 403, description = "The token lacks the scope, or the Origin is not allowed", body = super::error::ErrorBody),
    (status = 429, description = "Rate limited, or too many connections for this token", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
), security(("bearer" = [])))]
#[get("/ws")]
pub async fn ws(
    req: HttpRequest,
    body: web::Payload,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let perms = require(authenticate(&req, true).await?, Scope::PresenceRead)?;
    if !origin_ok(&req, &st.http) {
        return Err(
            ApiError::forbidden("this Origin is not allowed (http.allowed_origins)")
                .with_code("forbidden_origin"),
        );
    }
    let q = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?
        .into_inner();
    let filter =
        Filter::new(split(&q.jids), split(&q.domains)).map_err(|j| ApiError::invalid_jid(&j))?;
    let slot = Slot::acquire(&st, &perms.sub).ok_or_else(|| ApiError {
        retry_after: Some(CAP_RETRY_AFTER_SECS),
        ..ApiError::new(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "at most {} WebSocket connections per token",
                st.http.ws_max_per_token
            ),
        )
    })?;
    let (resp, session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request("not_websocket", e.to_string()))?;
    // One limit for a client message, whether it comes in one frame or in continuations:
    // `http.body_limit_bytes`, the same as a request body.
    let limit = st.http.body_limit_bytes;
    let stream = stream
        .max_frame_size(limit)
        .aggregate_continuations()
        .max_continuation_size(limit);
    let resume = match (q.since, q.epoch) {
        (Some(s), Some(e)) => Some((s, e)),
        _ => None,
    };
    // The session runs on this actix worker's runtime, owned by the app's task tracker:
    // shutdown waits for it (and so for its 1001 close frame).
    let tasks = st.tasks.clone();
    let remote = req.peer_addr().map(|a| a.to_string());
    actix_web::rt::spawn(tasks.track_future(run(
        st.into_inner(),
        perms,
        filter,
        resume,
        session,
        stream,
        (slot, remote),
    )));
    Ok(resp)
}

#[derive(Serialize)]
struct SnapshotFrame<'a> {
    r#type: &'static str,
    epoch: &'a str,
    seq: u64,
    users: Vec<&'a Arc<UserPresence>>,
}

#[derive(Serialize)]
struct DiffFrame<'a> {
    r#type: &'static str,
    changes: &'a [Arc<Change>],
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMsg {
    Subscribe {
        #[serde(default)]
        jids: Option<Vec<String>>,
        #[serde(default)]
        domains: Option<Vec<String>>,
    },
    Ping,
}

/// A message a WebSocket client may send (contract §5).
#[derive(Debug)]
pub enum ClientMessage {
    /// Replace the filter (answered with a new snapshot).
    Subscribe(Filter),
    /// Answered with `{"type":"pong"}`.
    Ping,
}

/// Parses one client text message into what the session does, or the `(code, message)` of
/// the `error` frame it answers with. Never panics (fuzzed: `fuzz/fuzz_targets/ws_message.rs`).
pub fn parse_client_message(text: &str) -> Result<ClientMessage, (&'static str, String)> {
    match serde_json::from_str::<ClientMsg>(text) {
        Ok(ClientMsg::Ping) => Ok(ClientMessage::Ping),
        Ok(ClientMsg::Subscribe { jids, domains }) => Filter::new(jids, domains)
            .map(ClientMessage::Subscribe)
            .map_err(|bad| {
                (
                    "invalid_jid",
                    format!("{bad:?} is not a valid user JID; filter unchanged"),
                )
            }),
        Err(e) => Err((
            "bad_message",
            format!("expected {{\"type\":\"subscribe\"|\"ping\",...}}: {e}"),
        )),
    }
}

enum End {
    Closed,
    Slow,
}

struct Conn {
    st: Arc<AppState>,
    info: Arc<Subscriber>,
    session: Session,
    send_timeout: Duration,
    /// The client sent its Close first: answering it completes the closing handshake.
    peer_closed: bool,
}

impl Conn {
    async fn send(&mut self, text: String) -> Result<(), End> {
        let n = text.len() as u64;
        match tokio::time::timeout(self.send_timeout, self.session.text(text)).await {
            Ok(Ok(())) => {
                self.info
                    .frames_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.st.metrics.ws_frames.inc();
                self.st.metrics.ws_bytes.inc_by(n);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Closed),
            Err(_) => Err(End::Slow),
        }
    }

    async fn error(&mut self, code: &str, message: &str) -> Result<(), End> {
        self.send(
            serde_json::json!({"type": "error", "error": code, "message": message}).to_string(),
        )
        .await
    }

    /// Sends a snapshot consistent with its seq and makes `sub` skip what it covers.
    async fn snapshot(
        &mut self,
        sub: &mut crate::presence::Subscription,
        p: &Permissions,
        f: &Filter,
    ) -> Result<(), End> {
        let snap = self.st.engine.snapshot().await.map_err(|_| End::Closed)?;
        sub.skip_through(snap.seq);
        let frame = SnapshotFrame {
            r#type: "snapshot",
            epoch: &snap.epoch,
            seq: snap.seq,
            users: snap.iter().filter(|u| f.passes(p, &u.jid)).collect(),
        };
        self.send(serde_json::to_string(&frame).unwrap_or_default())
            .await
    }

    async fn diff(
        &mut self,
        changes: &[Arc<Change>],
        p: &Permissions,
        f: &Filter,
    ) -> Result<(), End> {
        let visible: Vec<Arc<Change>> = changes
            .iter()
            .filter(|c| f.passes(p, &c.jid))
            .cloned()
            .collect();
        if visible.is_empty() {
            return Ok(());
        }
        let text = serde_json::to_string(&DiffFrame {
            r#type: "diff",
            changes: &visible,
        })
        .unwrap_or_default();
        self.send(text).await?;
        let now = Utc::now();
        for c in &visible {
            let secs = (now - c.received_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.st.metrics.e2e_latency.observe(secs.max(0.0));
        }
        Ok(())
    }
}

async fn run(
    st: Arc<AppState>,
    perms: Permissions,
    mut filter: Filter,
    resume: Option<(u64, String)>,
    session: Session,
    mut stream: actix_ws::AggregatedMessageStream,
    (_slot, remote): (Slot, Option<String>),
) {
    st.metrics.ws_sessions.inc();
    let registered = Registered::new(st.clone(), &perms.sub, remote, &filter);
    let mut conn = Conn {
        st: st.clone(),
        info: registered.info.clone(),
        session: session.clone(),
        send_timeout: st.http.ws_send_timeout_secs,
        peer_closed: false,
    };
    let end = session_loop(&st, &perms, &mut filter, resume, &mut conn, &mut stream).await;
    let reason = match end {
        Err(End::Slow) => {
            st.metrics.ws_closed.with_label_values(&["slow"]).inc();
            Some(CloseReason {
                code: CloseCode::Policy,
                description: Some("client too slow".into()),
            })
        }
        Ok(Some(r)) => Some(r),
        _ => None,
    };
    if !conn.peer_closed {
        // Before closing, let the client finish what it is sending: actix closes the socket
        // right after our Close frame, and a socket closed with unread input is answered with
        // a reset, which makes a client that is still sending (a flood, an oversized message)
        // lose the error and Close frames it has not read yet. Bounded: 100 ms of quiet, its
        // own Close, or CLOSE_DRAIN.
        let deadline = Instant::now() + CLOSE_DRAIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(CLOSE_QUIET.min(left), stream.next()).await {
                Ok(Some(Ok(AggregatedMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => continue,
                Err(_) => break,
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), session.close(reason)).await;
    st.metrics.ws_sessions.dec();
}

async fn session_loop(
    st: &Arc<AppState>,
    perms: &Permissions,
    filter: &mut Filter,
    resume: Option<(u64, String)>,
    conn: &mut Conn,
    stream: &mut actix_ws::AggregatedMessageStream,
) -> Result<Option<CloseReason>, End> {
    let hub = st.engine.hub();
    let mut sub = hub.subscribe();
    let mut resumed = false;
    if let Some((since, epoch)) = resume
        && epoch == **st.engine.epoch()
        && let Resume::Changes(missed) = hub.since(since, st.engine.seq())
    {
        sub.skip_through(missed.last().map_or(since, |c| c.seq));
        conn.diff(&missed, perms, filter).await?;
        resumed = true;
    }
    if !resumed {
        conn.snapshot(&mut sub, perms, filter).await?;
    }
    let ping_every = st.http.ws_ping_secs;
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let mut bucket = Bucket::new();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = st.shutdown.cancelled() => {
                return Ok(Some(CloseReason { code: CloseCode::Away, description: Some("server shutting down".into()) }));
            }
            _ = conn.info.kick.cancelled() => {
                st.metrics.ws_closed.with_label_values(&["closed_by_admin"]).inc();
                conn.error("closed_by_admin", "an operator closed this session").await?;
                return Ok(Some(CloseReason { code: CloseCode::Policy, description: Some("closed by an operator".into()) }));
            }
            msg = stream.next() => {
                last_heard = Instant::now();
                if matches!(msg, Some(Ok(AggregatedMessage::Text(_) | AggregatedMessage::Binary(_) | AggregatedMessage::Ping(_))))
                    && !bucket.take()
                {
                    st.metrics.ws_closed.with_label_values(&["rate_limited"]).inc();
                    conn.error("rate_limited", &format!("at most {CLIENT_BURST} messages at once and {CLIENT_PER_SEC} a second")).await?;
                    return Ok(Some(CloseReason { code: CloseCode::Policy, description: Some("too many messages".into()) }));
                }
                match msg {
                    Some(Ok(AggregatedMessage::Text(t))) => match parse_client_message(&t) {
                        Ok(ClientMessage::Ping) => conn.send(r#"{"type":"pong"}"#.to_owned()).await?,
                        Ok(ClientMessage::Subscribe(f)) => {
                            *filter = f;
                            conn.info.set_filter(filter);
                            conn.snapshot(&mut sub, perms, filter).await?;
                        }
                        Err((code, message)) => conn.error(code, &message).await?,
                    },
                    Some(Ok(AggregatedMessage::Binary(_))) => conn.error("bad_message", "binary frames are not supported").await?,
                    Some(Ok(AggregatedMessage::Ping(b))) => {
                        let _ = conn.session.pong(&b).await;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {}
                    // The client closes: answer with its code (RFC 6455 §5.5.1), 1000 without one.
                    Some(Ok(AggregatedMessage::Close(reason))) => {
                        conn.peer_closed = true;
                        return Ok(Some(CloseReason {
                            code: reason.map_or(CloseCode::Normal, |r| r.code),
                            description: None,
                        }));
                    }
                    None => {
                        conn.peer_closed = true;
                        return Ok(None);
                    }
                    Some(Err(e)) if too_big(&e) => {
                        st.metrics.ws_closed.with_label_values(&["too_big"]).inc();
                        let limit = st.http.body_limit_bytes;
                        conn.error("message_too_big", &format!("a client message may be at most {limit} bytes (http.body_limit_bytes)")).await?;
                        return Ok(Some(CloseReason { code: CloseCode::Size, description: Some("message too big".into()) }));
                    }
                    Some(Err(e)) => {
                        st.metrics.ws_closed.with_label_values(&["protocol"]).inc();
                        return Ok(Some(CloseReason { code: CloseCode::Protocol, description: Some(e.to_string()) }));
                    }
                }
            }
            next = sub.recv() => match next {
                Ok(Some(c)) => {
                    batch.clear();
                    batch.push(c);
                    // Everything already waiting goes into the same frame.
                    match sub.drain_ready(&mut batch, MAX_CHANGES_PER_FRAME) {
                        Ok(()) => conn.diff(&batch, perms, filter).await?,
                        Err(_) => resync(st, conn, &mut sub, perms, filter).await?,
                    }
                }
                Ok(None) => return Ok(Some(CloseReason { code: CloseCode::Away, description: None })),
                Err(_) => resync(st, conn, &mut sub, perms, filter).await?,
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    st.metrics.ws_closed.with_label_values(&["dead_peer"]).inc();
                    return Ok(Some(CloseReason { code: CloseCode::Policy, description: Some("no answer to pings".into()) }));
                }
                if conn.session.ping(b"pb").await.is_err() {
                    return Ok(None);
                }
            }
        }
    }
}

/// A frame over the frame limit, or continuations over the message limit (actix-ws reports
/// the latter as an I/O error with this text).
fn too_big(e: &actix_ws::ProtocolError) -> bool {
    match e {
        actix_ws::ProtocolError::Overflow => true,
        actix_ws::ProtocolError::Io(io) => io.to_string().contains("maximum continuation size"),
        _ => false,
    }
}

/// The client fell behind the feed: tell it, then give it a fresh snapshot.
async fn resync(
    st: &Arc<AppState>,
    conn: &mut Conn,
    sub: &mut crate::presence::Subscription,
    perms: &Permissions,
    filter: &Filter,
) -> Result<(), End> {
    st.metrics.ws_resyncs.with_label_values(&["lagged"]).inc();
    conn.info
        .resyncs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *sub = st.engine.hub().subscribe();
    conn.send(r#"{"type":"resync","reason":"lagged"}"#.to_owned())
        .await?;
    conn.snapshot(sub, perms, filter).await
}
