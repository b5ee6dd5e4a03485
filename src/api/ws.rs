//! `GET /api/v1/ws` (contract §5): snapshot, then batched diffs; resume with `since`+`epoch`;
//! `jids`/`domains` filters and the `subscribe` message; lag → `resync` + snapshot for that
//! client only; server pings; per-token connection cap.
//!
//! One task per session, one `select!` over the socket, the change feed, the ping timer and
//! shutdown. Every write has a deadline: a client that stops reading is closed, and because
//! each session reads the hub at its own pace nothing on the change path ever waits for it.

/// A set probed on hot paths (per change per subscriber): seeded foldhash, not SipHash.
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
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
use crate::presence::{Change, Feed, Resume, UserJid, UserPresence};

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
    /// `diffs` (default: snapshot, then every change) or `counts` (only the online counts,
    /// when they change, at most every 250 ms).
    mode: Option<Mode>,
}

/// What a session receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A snapshot, then diffs (contract §5).
    #[default]
    Diffs,
    /// `stats` frames only: for wallboards, which need the counts, not every change.
    Counts,
}

/// What a session shows: the token's domains always, narrowed by the client's filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    jids: Option<HashSet<UserJid>>,
    domains: Option<HashSet<String>>,
    mode: Mode,
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
        Ok(Filter {
            jids,
            domains,
            mode: Mode::Diffs,
        })
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

    /// The feed this filter needs: routed to its users and domains (or the token's domains)
    /// when it names any, else every change.
    fn feed(&self, hub: &crate::presence::Hub, p: &Permissions) -> Feed {
        let keys = match (&self.jids, &self.domains) {
            (None, None) => p.domain_list().map(|d| (Vec::new(), d)),
            (j, d) => Some((
                j.iter().flatten().cloned().collect(),
                d.iter().flatten().cloned().collect(),
            )),
        };
        match keys {
            Some((jids, domains)) => Feed::Routed(hub.subscribe_routed(jids, domains)),
            None => Feed::All(hub.subscribe()),
        }
    }

    /// Whether this filter and the token let everything through.
    fn is_everything(&self, p: &Permissions) -> bool {
        self.jids.is_none() && self.domains.is_none() && !p.is_restricted()
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
    filter: std::sync::Mutex<(FilterBody, Mode)>,
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
    /// `diffs` or `counts`.
    pub mode: Mode,
    /// Frames sent to it.
    pub frames_sent: u64,
    /// Times it fell behind and got a fresh snapshot.
    pub resyncs: u64,
}

impl Subscriber {
    /// What the subscribers list shows.
    pub fn body(&self) -> SubscriberBody {
        use std::sync::atomic::Ordering::Relaxed;
        let (filter, mode) = self
            .filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        SubscriberBody {
            id: self.id.clone(),
            sub: self.sub.clone(),
            remote_addr: self.remote_addr.clone(),
            connected_at: self.connected_at,
            filter,
            mode,
            frames_sent: self.frames_sent.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
        }
    }

    /// Asks the session to close (`closed_by_admin`, 1008).
    pub fn close(&self) {
        self.kick.cancel();
    }

    fn set_filter(&self, f: &Filter) {
        *self.filter.lock().unwrap_or_else(|p| p.into_inner()) = (f.describe(), f.mode);
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
            filter: std::sync::Mutex::new((filter.describe(), filter.mode)),
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
    let filter = Filter {
        mode: q.mode.unwrap_or_default(),
        ..Filter::new(split(&q.jids), split(&q.domains)).map_err(|j| ApiError::invalid_jid(&j))?
    };
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

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMsg {
    Subscribe {
        #[serde(default)]
        jids: Option<Vec<String>>,
        #[serde(default)]
        domains: Option<Vec<String>>,
        #[serde(default)]
        mode: Mode,
    },
    Ping,
}

/// A message a WebSocket client may send (contract §5).
#[derive(Debug)]
pub enum ClientMessage {
    /// Replace the filter and the mode (answered with a new snapshot, or the counts).
    Subscribe(Filter),
    /// Answered with `{"type":"pong"}`.
    Ping,
}

/// Parses one client text message into what the session does, or the `(code, message)` of
/// the `error` frame it answers with. Never panics (fuzzed: `fuzz/fuzz_targets/ws_message.rs`).
pub fn parse_client_message(text: &str) -> Result<ClientMessage, (&'static str, String)> {
    match serde_json::from_str::<ClientMsg>(text) {
        Ok(ClientMsg::Ping) => Ok(ClientMessage::Ping),
        Ok(ClientMsg::Subscribe {
            jids,
            domains,
            mode,
        }) => Filter::new(jids, domains)
            .map(|f| ClientMessage::Subscribe(Filter { mode, ..f }))
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
    async fn snapshot(&mut self, sub: &mut Feed, p: &Permissions, f: &Filter) -> Result<(), End> {
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

    /// Sends the changes that pass the token and the filter as one `diff` frame (none: no
    /// frame).
    async fn diff(
        &mut self,
        changes: &[Arc<Change>],
        p: &Permissions,
        f: &Filter,
    ) -> Result<(), End> {
        self.send_diff(diff_frame(changes, p, f)).await
    }

    async fn send_diff(
        &mut self,
        frame: Option<(String, chrono::DateTime<Utc>)>,
    ) -> Result<(), End> {
        let Some((text, oldest)) = frame else {
            return Ok(());
        };
        self.send(text).await?;
        // One observation per frame (its oldest change: the frame's worst latency), not one
        // per change per subscriber, which at a thousand subscribers was a hot atomic.
        let secs = (Utc::now() - oldest).num_microseconds().unwrap_or(0) as f64 / 1e6;
        self.st.metrics.e2e_latency.observe(secs.max(0.0));
        Ok(())
    }
}

/// A `diff` frame being built from the changes that pass the token and the filter. Each
/// change's JSON is encoded once for every subscriber ([`Change::json`]): a frame is only
/// their concatenation.
#[derive(Default)]
struct DiffFrame {
    text: String,
    /// When the bridge read the frame's oldest change.
    oldest: Option<chrono::DateTime<Utc>>,
}

impl DiffFrame {
    const HEAD: &str = r#"{"type":"diff","changes":["#;

    fn push(&mut self, c: &Change, p: &Permissions, f: &Filter) {
        if !f.passes(p, &c.jid) {
            return;
        }
        let json = c.json();
        if self.oldest.is_none() {
            self.oldest = Some(c.received_at);
            self.text.reserve(Self::HEAD.len() + 2 + json.len() * 8);
            self.text.push_str(Self::HEAD);
        } else {
            self.text.push(',');
        }
        self.text.push_str(json);
    }

    /// The frame and its oldest change's read time; `None` when no change passed.
    fn finish(mut self) -> Option<(String, chrono::DateTime<Utc>)> {
        let oldest = self.oldest?;
        self.text.push_str("]}");
        Some((self.text, oldest))
    }
}

/// The `diff` frame of these changes (see [`DiffFrame`]).
fn diff_frame(
    changes: &[Arc<Change>],
    p: &Permissions,
    f: &Filter,
) -> Option<(String, chrono::DateTime<Utc>)> {
    let mut frame = DiffFrame::default();
    for c in changes {
        frame.push(c, p, f);
    }
    frame.finish()
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

/// How often a counts-mode session looks for changed counts: at most this many `stats`
/// frames a second... one every 250 ms.
const COUNTS_EVERY: Duration = Duration::from_millis(250);

/// A counts-mode session's counts.
enum Counts {
    /// Filter and token let everything through: the engine's own counts, no feed needed.
    Everything,
    /// A narrower view: the visible online users, kept up to date from the feed.
    Tally {
        stats: crate::presence::Stats,
        users: std::collections::HashMap<UserJid, Arc<UserPresence>>,
    },
}

impl Counts {
    /// Starts counting for `f`; `feed` becomes what the counts need (none, or a subscription
    /// taken before the snapshot the tally starts from).
    async fn start(
        st: &AppState,
        p: &Permissions,
        f: &Filter,
        feed: &mut Option<Feed>,
    ) -> Result<Counts, End> {
        if f.is_everything(p) {
            *feed = None;
            return Ok(Counts::Everything);
        }
        let mut sub = f.feed(st.engine.hub(), p);
        let snap = st.engine.snapshot().await.map_err(|_| End::Closed)?;
        sub.skip_through(snap.seq);
        *feed = Some(sub);
        let mut stats = crate::presence::Stats {
            seq: snap.seq,
            ..Default::default()
        };
        let mut users = std::collections::HashMap::new();
        for u in snap.iter().filter(|u| f.passes(p, &u.jid)) {
            stats.account(u, 1);
            users.insert(u.jid.clone(), u.clone());
        }
        Ok(Counts::Tally { stats, users })
    }

    fn apply(&mut self, c: &Change, p: &Permissions, f: &Filter) {
        let Counts::Tally { stats, users } = self else {
            return;
        };
        stats.seq = c.seq;
        if !f.passes(p, &c.jid) {
            return;
        }
        if let Some(old) = users.remove(&c.jid) {
            stats.account(&old, -1);
        }
        if c.presence.online {
            stats.account(&c.presence, 1);
            users.insert(c.jid.clone(), c.presence.clone());
        }
    }

    /// The seq the counts include (cheap: no copy of the counts).
    fn seq(&self, st: &AppState) -> u64 {
        match self {
            Counts::Everything => st.engine.seq(),
            Counts::Tally { stats, .. } => stats.seq,
        }
    }

    fn current(&self, st: &AppState) -> crate::presence::Stats {
        match self {
            Counts::Everything => st.engine.stats(),
            Counts::Tally { stats, .. } => stats.clone(),
        }
    }
}

/// A `stats` frame: the body of `GET /api/v1/stats` with `"type":"stats"`.
#[derive(Serialize)]
struct StatsFrame {
    r#type: &'static str,
    #[serde(flatten)]
    body: super::rest::StatsBody,
}

/// Sends the counts if they differ from the last ones sent (the seq alone does not count).
/// Nothing happened since: nothing is copied or compared.
async fn send_counts(
    st: &AppState,
    conn: &mut Conn,
    counts: &Counts,
    last: &mut Option<crate::presence::Stats>,
) -> Result<(), End> {
    if last.as_ref().is_some_and(|l| l.seq == counts.seq(st)) {
        return Ok(());
    }
    let now = counts.current(st);
    let same = last.as_ref().is_some_and(|l| {
        l.online_users == now.online_users
            && l.online_resources == now.online_resources
            && l.by_show == now.by_show
            && l.by_domain == now.by_domain
    });
    *last = Some(now.clone());
    if same {
        // Remember the newer seq, so that the next tick can skip early.
        return Ok(());
    }
    let frame = StatsFrame {
        r#type: "stats",
        body: now.into(),
    };
    conn.send(serde_json::to_string(&frame).unwrap_or_default())
        .await
}

/// After reading the feed, a session waits this long before it reads it again. Under load
/// each wake then takes everything that came meanwhile into one frame, and a thousand
/// sessions wake a few hundred times a second each instead of once per published chunk;
/// when changes are rare it only delays a change that follows another within this gap.
const FEED_GAP: Duration = Duration::from_millis(5);

/// Waits for changes on the feed, if the session has one (else forever), not before `gate`.
async fn feed_ready(
    feed: &mut Option<Feed>,
    gate: Option<tokio::time::Instant>,
) -> Result<bool, crate::presence::Lagged> {
    if let Some(at) = gate {
        tokio::time::sleep_until(at).await;
    }
    match feed {
        Some(sub) => sub.wait().await,
        None => std::future::pending().await,
    }
}

/// Enters `filter`'s mode: a snapshot (diffs), or the counts (counts).
async fn start_mode(
    st: &AppState,
    conn: &mut Conn,
    perms: &Permissions,
    filter: &Filter,
    feed: &mut Option<Feed>,
    counts: &mut Option<Counts>,
    last_counts: &mut Option<crate::presence::Stats>,
) -> Result<(), End> {
    match filter.mode {
        Mode::Diffs => {
            *counts = None;
            // A fresh feed for the new filter, taken before the snapshot.
            let sub = feed.insert(filter.feed(st.engine.hub(), perms));
            conn.snapshot(sub, perms, filter).await
        }
        Mode::Counts => {
            let c = Counts::start(st, perms, filter, feed).await?;
            *last_counts = None;
            send_counts(st, conn, &c, last_counts).await?;
            *counts = Some(c);
            Ok(())
        }
    }
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
    let mut feed = None;
    let mut counts: Option<Counts> = None;
    let mut last_counts = None;
    if filter.mode == Mode::Diffs
        && let Some((since, epoch)) = resume
        && epoch == **st.engine.epoch()
    {
        // Subscribed before the ring is read, so that nothing falls between.
        let mut sub = filter.feed(hub, perms);
        if let Resume::Changes(missed) = hub.since(since, st.engine.seq()) {
            sub.skip_through(missed.last().map_or(since, |c| c.seq));
            conn.diff(&missed, perms, filter).await?;
            feed = Some(sub);
        }
    }
    // Not resumed: a snapshot (or the counts), on a feed taken before it.
    if feed.is_none() {
        start_mode(
            st,
            conn,
            perms,
            filter,
            &mut feed,
            &mut counts,
            &mut last_counts,
        )
        .await?;
    }
    let ping_every = st.http.ws_ping_secs;
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut counts_tick = tokio::time::interval(COUNTS_EVERY);
    counts_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut bucket = Bucket::new();
    let mut feed_gate = None;
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
                            start_mode(st, conn, perms, filter, &mut feed, &mut counts, &mut last_counts).await?;
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
            ready = feed_ready(&mut feed, feed_gate) => {
                feed_gate = Some(tokio::time::Instant::now() + FEED_GAP);
                let Some(sub) = feed.as_mut() else { continue };
                let lagged = match ready {
                    Ok(false) => return Ok(Some(CloseReason { code: CloseCode::Away, description: None })),
                    Err(_) => true,
                    // Everything already waiting goes into the same frame (or the tally).
                    Ok(true) => match &mut counts {
                        Some(c) => sub
                            .take_ready(MAX_CHANGES_PER_FRAME, |ch| c.apply(ch, perms, filter))
                            .is_err(),
                        None => {
                            let mut frame = DiffFrame::default();
                            let taken = sub.take_ready(MAX_CHANGES_PER_FRAME, |ch| frame.push(ch, perms, filter));
                            if taken.is_ok() {
                                conn.send_diff(frame.finish()).await?;
                            }
                            taken.is_err()
                        }
                    },
                };
                if lagged {
                    match &mut counts {
                        // Counts are absolute: a lagged tally starts again from a snapshot,
                        // and the next tick sends whatever differs.
                        Some(c) => {
                            lagged_metrics(st, conn);
                            *c = Counts::start(st, perms, filter, &mut feed).await?;
                        }
                        None => resync(st, conn, sub, perms, filter).await?,
                    }
                }
            },
            _ = counts_tick.tick(), if counts.is_some() => {
                if let Some(c) = &counts {
                    send_counts(st, conn, c, &mut last_counts).await?;
                }
            }
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

fn lagged_metrics(st: &AppState, conn: &Conn) {
    st.metrics.ws_resyncs.with_label_values(&["lagged"]).inc();
    conn.info
        .resyncs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The client fell behind the feed: tell it, then give it a fresh snapshot.
async fn resync(
    st: &Arc<AppState>,
    conn: &mut Conn,
    sub: &mut Feed,
    perms: &Permissions,
    filter: &Filter,
) -> Result<(), End> {
    lagged_metrics(st, conn);
    *sub = filter.feed(st.engine.hub(), perms);
    conn.send(r#"{"type":"resync","reason":"lagged"}"#.to_owned())
        .await?;
    conn.snapshot(sub, perms, filter).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, jid: &str, status: &str) -> Arc<Change> {
        Change::for_test(seq, jid, status, seq as i64)
    }

    /// The concatenated frame is exactly the serde encoding of `{"type":"diff","changes":[..]}`
    /// of the changes that pass, and reports the oldest one's read time.
    #[test]
    fn a_diff_frame_is_the_encoding_of_the_visible_changes() {
        let changes = vec![
            change(9, "a@x.test", "one \"quoted\" \u{1F600}"),
            change(7, "b@y.test", "two"),
            change(5, "c@x.test", "three\n"),
        ];
        let everyone = Permissions::for_test(vec![Scope::PresenceRead], None);
        let x_only = Permissions::for_test(vec![Scope::PresenceRead], Some(&["x.test"]));
        let all = Filter::default();
        let expect = |cs: &[&Arc<Change>]| serde_json::json!({"type": "diff", "changes": cs.iter().map(|c| serde_json::to_value(c).unwrap()).collect::<Vec<_>>()});
        let (text, oldest) = diff_frame(&changes, &everyone, &all).unwrap();
        let got: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, expect(&[&changes[0], &changes[1], &changes[2]]));
        assert_eq!(oldest, changes[0].received_at);
        // The token narrows; the encoding cached by the first frame is reused.
        let (text, oldest) = diff_frame(&changes, &x_only, &all).unwrap();
        let got: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, expect(&[&changes[0], &changes[2]]));
        assert_eq!(oldest, changes[0].received_at);
        // A filter that lets nothing through: no frame.
        let only_z = Filter::new(None, Some(vec!["z.test".into()])).unwrap();
        assert!(diff_frame(&changes, &everyone, &only_z).is_none());
        let only_b = Filter::new(Some(vec!["b@y.test".into()]), None).unwrap();
        assert!(diff_frame(&changes, &x_only, &only_b).is_none());
        let (text, oldest) = diff_frame(&changes, &everyone, &only_b).unwrap();
        let got: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, expect(&[&changes[1]]));
        assert_eq!(oldest, changes[1].received_at);
    }

    #[test]
    fn subscribe_messages_carry_the_mode() {
        match parse_client_message(r#"{"type":"subscribe","mode":"counts","domains":["x.test"]}"#) {
            Ok(ClientMessage::Subscribe(f)) => {
                assert_eq!(f.mode, Mode::Counts);
                assert!(f.domains.is_some_and(|d| d.contains("x.test")));
            }
            other => panic!("{other:?}"),
        }
        match parse_client_message(r#"{"type":"subscribe"}"#) {
            Ok(ClientMessage::Subscribe(f)) => assert_eq!(f.mode, Mode::Diffs),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_message(r#"{"type":"subscribe","mode":"all"}"#),
            Err(("bad_message", _))
        ));
    }
}
