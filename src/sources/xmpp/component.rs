//! The XEP-0114 component supervisor.
//!
//! One task owns the connection: connect → stream header → handshake → read loop, and on any
//! loss, capped exponential backoff with jitter, then again. A rejected secret or an unknown
//! component domain is fatal (retrying cannot fix configuration). tokio-xmpp's `Component`
//! hides *why* its stream ended, so we drive `tokio_xmpp::xmlstream` directly, which tells a bad
//! stanza (skip it) from a soft timeout (send a keepalive) from a dead connection (reconnect).
//!
//! After every handshake the session starts a resync round (see [`crate::presence::Engine::resync_begin`])
//! *before* it reads the first stanza, then probes every known user at a bounded rate; after
//! the grace period, resources nobody confirmed go offline. While disconnected the presence map
//! is left alone and marked stale: no offline storm reaches subscribers.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use minidom::Element;
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Registry};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_xmpp::Stanza;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmppStream, XmppStreamElement,
    initiate_stream,
};
use xmpp_parsers::component::Handshake;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::ping::Ping;
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use xmpp_parsers::stream_error::DefinedCondition as StreamCondition;

use super::translate::{self, Dropped, Inbound, Translator};
use crate::config::XmppConfig;
use crate::presence::{Cause, Engine, UserJid};
use crate::telemetry;

type Stream = XmppStream<BufStream<TcpStream>>;

/// A failure that reconnecting cannot fix. The message names the config key to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FatalError {
    /// The server answered the handshake with `not-authorized` (ejabberd also answers so for a
    /// component domain it does not serve).
    #[error(
        "the XMPP server rejected the component handshake for {component:?} (not-authorized): check xmpp.password, and that xmpp.component is a domain of the server's component listener"
    )]
    NotAuthorized {
        /// The component domain we tried.
        component: String,
    },
    /// The server does not serve this component domain.
    #[error(
        "the XMPP server does not know the component domain {component:?} (host-unknown): check xmpp.component"
    )]
    HostUnknown {
        /// The component domain we tried.
        component: String,
    },
}

/// Connection state, visible to the rest of the program (`/readyz`, metrics, logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStatus {
    /// Handshake done and the stream is up.
    pub connected: bool,
    /// When the current state began.
    pub since: Option<DateTime<Utc>>,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Failed connection attempts in a row (0 while connected).
    pub failed_attempts: u64,
    /// The presence map is not being fed (disconnected after having been connected).
    pub stale: bool,
    /// A resync round is running (probes out, grace period not over).
    pub resyncing: bool,
    /// XEP-0356 permissions advertised by the server: `(access, type)`.
    pub privileges: Vec<(String, String)>,
    /// Why the last connection ended or failed (no secrets in it).
    pub last_error: Option<String>,
}

/// The XMPP source's metrics, updated in the read loop and on every status change.
#[derive(Debug, Clone)]
pub struct XmppMetrics {
    /// `<presence/>` stanzas read.
    pub presence_in: IntCounter,
    /// `<message/>` stanzas read.
    pub message_in: IntCounter,
    /// `<iq/>` stanzas read.
    pub iq_in: IntCounter,
    /// Stanzas that failed to parse (skipped).
    pub parse_errors: IntCounter,
    /// Presence from domains not in `xmpp.domains` (dropped).
    pub dropped_foreign: IntCounter,
    /// Presence dropped as oversized.
    pub dropped_oversized: IntCounter,
    /// Presence dropped for other reasons (no from, no resource, from a server JID).
    pub dropped_other: IntCounter,
    /// Probes sent during resyncs.
    pub probes_sent: IntCounter,
    /// Keepalive pings sent.
    pub keepalives_sent: IntCounter,
    /// `<conflict/>` stream errors (another connection holds the component domain).
    pub conflicts: IntCounter,
    connected: IntGauge,
    stale: IntGauge,
    reconnects: IntCounter,
    privileges: IntGaugeVec,
}

impl XmppMetrics {
    /// Registers the XMPP source's metrics in `r`.
    pub fn new(r: &Registry) -> Self {
        let stanzas = telemetry::counter_vec(
            r,
            "presence_bridge_stanzas_in_total",
            "Stanzas read from the XMPP server, by type",
            &["type"],
        );
        let dropped = telemetry::counter_vec(
            r,
            "presence_bridge_presence_dropped_total",
            "Presence stanzas dropped, by reason",
            &["reason"],
        );
        Self {
            presence_in: stanzas.with_label_values(&["presence"]),
            message_in: stanzas.with_label_values(&["message"]),
            iq_in: stanzas.with_label_values(&["iq"]),
            parse_errors: telemetry::counter(
                r,
                "presence_bridge_stanza_parse_errors_total",
                "Stanzas that failed to parse (skipped)",
            ),
            dropped_foreign: dropped.with_label_values(&["foreign_domain"]),
            dropped_oversized: dropped.with_label_values(&["oversized"]),
            dropped_other: dropped.with_label_values(&["other"]),
            probes_sent: telemetry::counter(
                r,
                "presence_bridge_probes_sent_total",
                "Presence probes sent during resyncs",
            ),
            keepalives_sent: telemetry::counter(
                r,
                "presence_bridge_xmpp_keepalives_sent_total",
                "Keepalive pings sent to the XMPP server",
            ),
            conflicts: telemetry::counter(
                r,
                "presence_bridge_xmpp_conflicts_total",
                "Component connections refused or ended by the server with <conflict/>",
            ),
            connected: telemetry::gauge(
                r,
                "presence_bridge_xmpp_connected",
                "1 while the XMPP component is connected",
            ),
            stale: telemetry::gauge(
                r,
                "presence_bridge_xmpp_stale",
                "1 while presence is stale (disconnected after having been connected)",
            ),
            reconnects: telemetry::counter(
                r,
                "presence_bridge_xmpp_reconnects_total",
                "Successful XMPP reconnections",
            ),
            privileges: telemetry::gauge_vec(
                r,
                "presence_bridge_xmpp_privilege",
                "XEP-0356 permissions granted (1)",
                &["access", "type"],
            ),
        }
    }

    /// Mirrors a status into the gauges.
    fn observe(&self, s: &ConnectionStatus) {
        self.connected.set(i64::from(s.connected));
        self.stale.set(i64::from(s.stale));
        self.privileges.reset();
        for (access, ty) in &s.privileges {
            self.privileges.with_label_values(&[access, ty]).set(1);
        }
    }
}

impl Default for XmppMetrics {
    /// Metrics in a private registry nobody renders (unit tests).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

/// Handle to the running component: its status and metrics.
#[derive(Debug, Clone)]
pub struct ComponentHandle {
    status: watch::Receiver<ConnectionStatus>,
    metrics: XmppMetrics,
    probes: mpsc::Sender<UserJid>,
    resyncs: mpsc::Sender<()>,
}

impl ComponentHandle {
    /// The current connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.status.borrow().clone()
    }
    /// A receiver to wait for status changes.
    pub fn watch(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.clone()
    }
    /// The metrics.
    pub fn metrics(&self) -> &XmppMetrics {
        &self.metrics
    }
    /// Queues a probe of `user` for the connected session (the reconciler's "found" direction):
    /// its answers enter the map with cause `reconcile`. `false` when the queue is full or
    /// the supervisor has ended; probes queued while disconnected go out after the handshake.
    pub fn probe(&self, user: &UserJid) -> bool {
        self.probes.try_send(user.clone()).is_ok()
    }
    /// Asks the connected session for a resync round now (as after a reconnect: every known
    /// user probed; resources not confirmed within `xmpp.resync_grace_secs` go offline).
    /// `false` when the supervisor has ended. A request made while one is already waiting
    /// joins it; one made while disconnected runs after the next handshake's own round.
    pub fn resync_now(&self) -> bool {
        match self.resyncs.try_send(()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => true,
            Err(mpsc::error::TrySendError::Closed(())) => false,
        }
    }
}

/// Queued reconciler probes (beyond that, `probe` refuses and the next run tries again).
const PROBE_QUEUE: usize = 65_536;

/// What the supervisor needs besides its config and the engine.
#[derive(Debug, Default)]
pub struct SpawnOptions {
    /// When presence was last known to be current (the previous run's stop), used as
    /// `last_seen` for users the first resync finds gone.
    pub lost_at: Option<DateTime<Utc>>,
    /// Where it counts.
    pub metrics: XmppMetrics,
    /// Owns the per-session helper tasks (resync rounds); the caller waits for it on shutdown.
    pub tasks: TaskTracker,
}

/// Starts the supervisor. The task ends with `Ok(())` on cancellation and with the fatal error
/// otherwise; it never ends on a transient failure.
pub fn spawn(
    cfg: XmppConfig,
    engine: Engine,
    cancel: CancellationToken,
    opts: SpawnOptions,
) -> (ComponentHandle, JoinHandle<Result<(), FatalError>>) {
    let (status_tx, status_rx) = watch::channel(ConnectionStatus {
        since: Some(Utc::now()),
        ..ConnectionStatus::default()
    });
    let (probes_tx, probes_rx) = mpsc::channel(PROBE_QUEUE);
    let (resyncs_tx, resyncs_rx) = mpsc::channel(1);
    let sup = Supervisor {
        resyncs: resyncs_rx,
        translator: Translator::new(&cfg),
        cfg,
        engine,
        status: status_tx,
        metrics: opts.metrics.clone(),
        cancel,
        generation: 0,
        tasks: opts.tasks,
        probes: probes_rx,
        reconcile_probed: std::collections::HashMap::new(),
    };
    let task = tokio::spawn(sup.run(opts.lost_at));
    (
        ComponentHandle {
            status: status_rx,
            metrics: opts.metrics,
            probes: probes_tx,
            resyncs: resyncs_tx,
        },
        task,
    )
}

/// Reconnect delay: `min · 2^attempt`, capped at `max`, with "equal jitter" (a uniform draw in
/// the upper half) so that a fleet of bridges restarted together does not reconnect in step.
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(20));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(rand::random::<f64>())
}

enum ConnectError {
    Fatal(FatalError),
    /// `<conflict/>`: another connection holds the component domain.
    Conflict,
    Transient(String),
}

enum SessionEnd {
    Cancelled,
    Lost(String),
    /// The server ended the session with `<conflict/>` (MongooseIM `kick_old`: a newer
    /// connection for the same domain took over).
    Conflict,
    Fatal(FatalError),
}

/// What a `<conflict/>` means and what to do about it (logged and shown in `/readyz`).
fn conflict_message(component: &str, delay: Duration) -> String {
    format!(
        "the XMPP server refused or dropped component {component:?} with <conflict/>: another \
         connection holds this domain (a second bridge with the same xmpp.component, or the \
         server still holds this bridge's previous connection). Run one bridge per component \
         domain (replicas: [cluster]); on MongooseIM set conflict_behaviour = \"kick_old\" on the \
         component listener. Retrying in {}s",
        delay.as_secs()
    )
}

struct Supervisor {
    cfg: XmppConfig,
    translator: Translator,
    engine: Engine,
    status: watch::Sender<ConnectionStatus>,
    metrics: XmppMetrics,
    cancel: CancellationToken,
    generation: u64,
    tasks: TaskTracker,
    probes: mpsc::Receiver<UserJid>,
    /// Operator requests for a resync round (`POST /api/v1/admin/resync`).
    resyncs: mpsc::Receiver<()>,
    /// Users probed for the reconciler, and until when their answers count as `reconcile`.
    reconcile_probed: std::collections::HashMap<UserJid, Instant>,
}

impl Supervisor {
    /// Changes the status and keeps the gauges in step with it.
    fn set_status(&self, f: impl FnOnce(&mut ConnectionStatus)) {
        self.status.send_modify(|s| {
            f(s);
            self.metrics.observe(s);
        });
    }

    async fn run(mut self, mut lost_at: Option<DateTime<Utc>>) -> Result<(), FatalError> {
        let min = self.cfg.reconnect_min_secs;
        let max = self.cfg.reconnect_max_secs;
        let mut attempt: u32 = 0;
        let mut conflicts: u32 = 0;
        let mut ever_connected = false;
        loop {
            let connected = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                r = tokio::time::timeout(self.cfg.connect_timeout_secs, self.connect()) => r,
            };
            match connected {
                Ok(Ok(stream)) => {
                    let started = Instant::now();
                    let probe = self.cfg.probe_on_connect;
                    tracing::info!(server = %self.cfg.server, component = %self.cfg.component, "XMPP component connected");
                    if ever_connected {
                        self.metrics.reconnects.inc();
                    }
                    self.set_status(|s| {
                        s.connected = true;
                        s.since = Some(Utc::now());
                        if ever_connected {
                            s.reconnects += 1;
                        }
                        s.failed_attempts = 0;
                        s.stale = false;
                        // Set together with `connected` so nobody sees a connected,
                        // not-yet-resyncing state in between.
                        s.resyncing = probe;
                        s.privileges.clear();
                    });
                    ever_connected = true;
                    let end = self.session(stream, lost_at).await;
                    let now = Utc::now();
                    lost_at = Some(now);
                    self.set_status(|s| {
                        s.connected = false;
                        s.since = Some(now);
                        s.stale = true;
                        s.resyncing = false;
                    });
                    let mut conflicted = false;
                    match end {
                        SessionEnd::Cancelled => return Ok(()),
                        SessionEnd::Conflict => conflicted = true,
                        SessionEnd::Fatal(e) => {
                            self.set_status(|s| s.last_error = Some(e.to_string()));
                            return Err(e);
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(reason = %why, "XMPP component connection lost; presence is stale until reconnected");
                            self.set_status(|s| s.last_error = Some(why));
                        }
                    }
                    // A session that lived long was healthy: start backing off from scratch.
                    if started.elapsed() >= max {
                        attempt = 0;
                    }
                    if !conflicted {
                        conflicts = 0;
                    } else if self.conflict_wait(&mut conflicts).await {
                        return Ok(());
                    } else {
                        continue;
                    }
                }
                Ok(Err(ConnectError::Conflict)) => {
                    self.set_status(|s| s.failed_attempts += 1);
                    if self.conflict_wait(&mut conflicts).await {
                        return Ok(());
                    }
                    continue;
                }
                Ok(Err(ConnectError::Fatal(e))) => {
                    tracing::error!("{e}");
                    self.set_status(|s| s.last_error = Some(e.to_string()));
                    return Err(e);
                }
                Ok(Err(ConnectError::Transient(why))) => {
                    tracing::warn!(server = %self.cfg.server, reason = %why, attempt, "XMPP connect failed");
                    self.set_status(|s| {
                        s.failed_attempts += 1;
                        s.last_error = Some(why);
                    });
                }
                Err(_) => {
                    let why = format!(
                        "connect + handshake took longer than {:?}",
                        self.cfg.connect_timeout_secs
                    );
                    tracing::warn!(server = %self.cfg.server, reason = %why, attempt, "XMPP connect failed");
                    self.set_status(|s| {
                        s.failed_attempts += 1;
                        s.last_error = Some(why);
                    });
                }
            }
            let delay = backoff_delay(min, max, attempt);
            attempt = attempt.saturating_add(1);
            tracing::debug!(?delay, "reconnecting after delay");
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Logs a conflict, then waits the conflict backoff. `true` = cancelled meanwhile.
    async fn conflict_wait(&self, conflicts: &mut u32) -> bool {
        self.metrics.conflicts.inc();
        let base = self
            .cfg
            .conflict_backoff_secs
            .max(self.cfg.reconnect_min_secs);
        let delay = backoff_delay(base, base.saturating_mul(8), *conflicts);
        *conflicts = conflicts.saturating_add(1);
        let why = conflict_message(&self.cfg.component, delay);
        tracing::error!(conflicts_in_a_row = *conflicts, "{why}");
        self.set_status(|s| s.last_error = Some(why));
        tokio::select! {
            _ = self.cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            read_timeout: self.cfg.keepalive_secs,
            response_timeout: self.cfg.keepalive_timeout_secs,
        }
    }

    async fn connect(&self) -> Result<Stream, ConnectError> {
        let tcp = TcpStream::connect(&self.cfg.server).await.map_err(|e| {
            ConnectError::Transient(format!(
                "TCP connect to {} (xmpp.server): {e}",
                self.cfg.server
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        let header = StreamHeader {
            to: Some(self.cfg.component.clone().into()),
            from: None,
            id: None,
        };
        let mut pending = initiate_stream(
            BufStream::new(tcp),
            xmpp_parsers::ns::COMPONENT,
            header,
            self.timeouts(),
        )
        .await
        .map_err(|e| ConnectError::Transient(format!("stream header: {e}")))?;
        let id = pending.take_header().id;
        let mut stream: Stream = pending.skip_features();
        let Some(id) = id else {
            // ejabberd sends a header without id followed by a stream error for an unknown host.
            return Err(match read_stream_error(&mut stream).await {
                Some(cond) => self.classify(cond),
                None => ConnectError::Transient("server sent no stream id".into()),
            });
        };
        stream
            .send(&XmppStreamElement::ComponentHandshake(
                Handshake::from_stream_id_and_password(id.into_owned(), self.cfg.password.expose()),
            ))
            .await
            .map_err(|e| ConnectError::Transient(format!("sending handshake: {e}")))?;
        loop {
            match stream.next().await {
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::ComponentHandshake(_)))) => {
                    return Ok(stream);
                }
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                    return Err(self.classify(e.0.condition));
                }
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Ok(other)) => {
                    return Err(ConnectError::Transient(format!(
                        "unexpected element before handshake reply: {other:?}"
                    )));
                }
                Some(Err(e)) => return Err(ConnectError::Transient(format!("handshake: {e}"))),
                None => {
                    return Err(ConnectError::Transient(
                        "stream ended during handshake".into(),
                    ));
                }
            }
        }
    }

    fn classify(&self, cond: StreamCondition) -> ConnectError {
        let component = self.cfg.component.clone();
        match cond {
            StreamCondition::NotAuthorized => {
                ConnectError::Fatal(FatalError::NotAuthorized { component })
            }
            StreamCondition::HostUnknown | StreamCondition::ImproperAddressing => {
                ConnectError::Fatal(FatalError::HostUnknown { component })
            }
            StreamCondition::Conflict => ConnectError::Conflict,
            other => ConnectError::Transient(format!("stream error: {other:?}")),
        }
    }

    async fn session(&mut self, mut stream: Stream, lost_at: Option<DateTime<Utc>>) -> SessionEnd {
        // Resync round: registered with the engine before the first stanza is read, so every
        // presence of this session counts as a confirmation.
        self.generation += 1;
        let generation = self.generation;
        let session_cancel = self.cancel.child_token();
        let _stop_resync = session_cancel.clone().drop_guard();
        let (out_tx, mut out_rx) = mpsc::channel::<Element>(256);
        if self.cfg.probe_on_connect {
            if self.engine.resync_begin(generation).await.is_err() {
                return SessionEnd::Cancelled;
            }
            self.tasks.spawn(resync(
                self.engine.clone(),
                self.cfg.clone(),
                self.metrics.clone(),
                self.status.clone(),
                out_tx.clone(),
                generation,
                lost_at.unwrap_or_else(Utc::now),
                session_cancel.clone(),
            ));
        }
        let component: Jid = match BareJid::new(&self.cfg.component) {
            Ok(j) => j.into(),
            Err(e) => return SessionEnd::Lost(format!("component JID: {e}")),
        };
        let server_domain: Option<Jid> = self
            .cfg
            .domains
            .first()
            .and_then(|d| BareJid::new(d).ok())
            .map(Into::into);
        let mut ping_id: u64 = 0;
        let trust_until = Instant::now() + self.cfg.resync_grace_secs;

        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
                    return SessionEnd::Cancelled;
                }
                Some(stanza) = out_rx.recv() => {
                    if let Err(e) = stream.send(&stanza).await {
                        return SessionEnd::Lost(format!("write failed: {e}"));
                    }
                }
                Some(()) = self.resyncs.recv() => {
                    self.generation += 1;
                    let generation = self.generation;
                    tracing::info!(generation, "resync: requested by an operator");
                    if self.engine.resync_begin(generation).await.is_err() {
                        return SessionEnd::Cancelled;
                    }
                    self.status.send_modify(|s| s.resyncing = true);
                    self.tasks.spawn(resync(
                        self.engine.clone(),
                        self.cfg.clone(),
                        self.metrics.clone(),
                        self.status.clone(),
                        out_tx.clone(),
                        generation,
                        Utc::now(),
                        session_cancel.clone(),
                    ));
                }
                Some(user) = self.probes.recv() => {
                    let Ok(to) = BareJid::new(user.as_str()) else { continue };
                    let probe = Presence::new(PresenceType::Probe).with_from(component.clone()).with_to(to);
                    if let Err(e) = stream.send(&outbound(probe)).await {
                        return SessionEnd::Lost(format!("write failed: {e}"));
                    }
                    self.metrics.probes_sent.inc();
                    let now = Instant::now();
                    if self.reconcile_probed.len() >= PROBE_QUEUE {
                        self.reconcile_probed.retain(|_, until| *until > now);
                    }
                    self.reconcile_probed.insert(user, now + self.cfg.resync_grace_secs);
                }
                item = stream.next() => {
                    let el = match item {
                        None => return SessionEnd::Lost("stream closed".into()),
                        Some(Err(ReadError::SoftTimeout)) => {
                            // Silence: ask the server something so that a live peer answers and
                            // a dead one trips the hard timeout.
                            ping_id += 1;
                            self.metrics.keepalives_sent.inc();
                            let mut iq = Iq::from_get(format!("keepalive-{ping_id}"), Ping).with_from(component.clone());
                            if let Some(to) = &server_domain {
                                iq = iq.with_to(to.clone());
                            }
                            if let Err(e) = stream.send(&XmppStreamElement::Stanza(iq.into())).await {
                                return SessionEnd::Lost(format!("keepalive write failed: {e}"));
                            }
                            continue;
                        }
                        Some(Err(ReadError::HardError(e))) => return SessionEnd::Lost(format!("connection error: {e}")),
                        Some(Err(ReadError::StreamFooterReceived)) => return SessionEnd::Lost("server closed the stream".into()),
                        Some(Err(ReadError::ParseError(e))) => {
                            self.metrics.parse_errors.inc();
                            tracing::debug!(error = %e, "skipping unparsable element");
                            continue;
                        }
                        Some(Ok(FallibleStreamElement::Err(e))) => {
                            self.metrics.parse_errors.inc();
                            tracing::debug!(error = %e, "skipping invalid stanza");
                            continue;
                        }
                        Some(Ok(FallibleStreamElement::Ok(el))) => el,
                    };
                    match el {
                        XmppStreamElement::Stanza(Stanza::Presence(p)) => {
                            self.metrics.presence_in.inc();
                            let replies = match self.on_presence(&p, trust_until).await {
                                Ok(r) => r,
                                Err(()) => return SessionEnd::Cancelled,
                            };
                            for r in replies {
                                if let Err(e) = stream.send(&outbound(r.with_from(component.clone()))).await {
                                    return SessionEnd::Lost(format!("write failed: {e}"));
                                }
                            }
                        }
                        XmppStreamElement::Stanza(Stanza::Message(m)) => {
                            self.metrics.message_in.inc();
                            if let Some(perms) = translate::privileges(&m) {
                                tracing::info!(?perms, from = ?m.from.as_ref().map(|j| j.to_string()), "XEP-0356 privileges granted");
                                self.set_status(|s| s.privileges = perms);
                            }
                        }
                        XmppStreamElement::Stanza(Stanza::Iq(iq)) => {
                            self.metrics.iq_in.inc();
                            if let Some(reply) = answer_iq(iq, &component)
                                && let Err(e) = stream.send(&XmppStreamElement::Stanza(reply.into())).await
                            {
                                return SessionEnd::Lost(format!("write failed: {e}"));
                            }
                        }
                        XmppStreamElement::StreamError(e) => {
                            return match self.classify(e.0.condition.clone()) {
                                ConnectError::Fatal(f) => SessionEnd::Fatal(f),
                                ConnectError::Conflict => SessionEnd::Conflict,
                                ConnectError::Transient(_) => SessionEnd::Lost(format!("stream error from server: {e}")),
                            };
                        }
                        other => tracing::debug!(element = ?other, "ignoring stream element"),
                    }
                }
            }
        }
    }

    /// Translates and applies one presence; returns the stanzas to send back (without `from`).
    /// Delay stamps are trusted only while the server is answering the bridge: during the
    /// resync round after a connect (probe answers; Prosody's pushed state) or, without
    /// probes, for `xmpp.resync_grace_secs` after the connect.
    async fn on_presence(&self, p: &Presence, trust_until: Instant) -> Result<Vec<Presence>, ()> {
        let delay = if self.status.borrow().resyncing || Instant::now() < trust_until {
            translate::Delay::Trusted
        } else {
            translate::Delay::Untrusted
        };
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(stanza = %String::from(&Element::from(p.clone())), "presence in");
        }
        let inbound = match self.translator.presence(p, Utc::now(), delay) {
            Ok(i) => i,
            Err(d) => {
                match d {
                    Dropped::ForeignDomain(_) => &self.metrics.dropped_foreign,
                    Dropped::Oversized(_) => &self.metrics.dropped_oversized,
                    _ => &self.metrics.dropped_other,
                }
                .inc();
                tracing::debug!(reason = %d, "dropped presence");
                return Ok(Vec::new());
            }
        };
        let to = |j: &UserJid| -> Option<Jid> { BareJid::new(j.as_str()).ok().map(Into::into) };
        Ok(match inbound {
            Inbound::Event(mut ev) => {
                if ev.cause == Cause::Probe
                    && self
                        .reconcile_probed
                        .get(&ev.jid)
                        .is_some_and(|until| *until > Instant::now())
                {
                    ev.cause = Cause::Reconcile;
                }
                self.engine.apply(ev).await.map_err(|_| ())?;
                Vec::new()
            }
            Inbound::Subscribe(j) => {
                tracing::info!(jid = %j, "subscription request: approving and subscribing back");
                let Some(jid) = to(&j) else {
                    return Ok(Vec::new());
                };
                vec![
                    Presence::subscribed().with_to(jid.clone()),
                    Presence::subscribe().with_to(jid.clone()),
                    Presence::available().with_to(jid),
                ]
            }
            Inbound::Unsubscribe(j) => {
                tracing::info!(jid = %j, "user unsubscribed from the bridge");
                to(&j)
                    .map(|jid| vec![Presence::new(PresenceType::Unsubscribed).with_to(jid)])
                    .unwrap_or_default()
            }
            Inbound::Subscribed(j) => {
                tracing::info!(jid = %j, "user approved the bridge's subscription");
                Vec::new()
            }
            Inbound::Unsubscribed(j) => {
                tracing::warn!(jid = %j, "user revoked the bridge's subscription: their presence will no longer be seen");
                Vec::new()
            }
            Inbound::Probe(from) => vec![Presence::available().with_to(from)],
        })
    }
}

/// A presence as the bridge sends it. xmpp-parsers always writes `<priority>0</priority>`;
/// RFC 6121 §4.7.2.3 makes 0 the default, and a probe or a subscription answer has no business
/// carrying a priority at all, so a zero priority is left out.
fn outbound(p: Presence) -> Element {
    let mut el: Element = p.into();
    if el
        .get_child("priority", xmpp_parsers::ns::DEFAULT_NS)
        .is_some_and(|c| c.text().trim() == "0")
    {
        el.remove_child("priority", xmpp_parsers::ns::DEFAULT_NS);
    }
    el
}

/// Reads until a stream error arrives (used when the server refused our header).
async fn read_stream_error(stream: &mut Stream) -> Option<StreamCondition> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e))))) => {
                return Some(e.0.condition);
            }
            Ok(Some(Err(ReadError::SoftTimeout))) | Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

const DISCO_INFO_XML: &str = "<query xmlns='http://jabber.org/protocol/disco#info'><identity category='component' type='presence' name='presence-bridge'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='urn:xmpp:ping'/></query>";

/// Answers server-originated IQs: XEP-0199 ping, XEP-0030 disco#info; anything else of type
/// get/set gets `service-unavailable` (RFC 6120 §8.4). Results and errors (the answers to our
/// keepalives) need no answer.
fn answer_iq(iq: Iq, component: &Jid) -> Option<Iq> {
    let (from, id, payload) = match iq {
        Iq::Get {
            from, id, payload, ..
        }
        | Iq::Set {
            from, id, payload, ..
        } => (from, id, payload),
        _ => return None,
    };
    let reply = if payload.is("ping", xmpp_parsers::ns::PING) {
        Iq::Result {
            from: None,
            to: None,
            id,
            payload: None,
        }
    } else if payload.is("query", xmpp_parsers::ns::DISCO_INFO) {
        let info: Element = DISCO_INFO_XML.parse().ok()?;
        Iq::Result {
            from: None,
            to: None,
            id,
            payload: Some(info),
        }
    } else {
        Iq::Error {
            from: None,
            to: None,
            id,
            error: StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "presence-bridge does not handle this request",
            ),
            payload: None,
        }
    };
    let mut reply = reply.with_from(component.clone());
    if let Some(f) = from {
        reply = reply.with_to(f);
    }
    Some(reply)
}

/// One resync round: probe every known user at a bounded rate, wait the grace period, then let
/// the engine drop what nobody confirmed.
#[allow(clippy::too_many_arguments)]
async fn resync(
    engine: Engine,
    cfg: XmppConfig,
    metrics: XmppMetrics,
    status: watch::Sender<ConnectionStatus>,
    out: mpsc::Sender<Element>,
    generation: u64,
    offline_at: DateTime<Utc>,
    cancel: CancellationToken,
) {
    let work = async {
        let users = engine.known_users().await.ok()?;
        let component: Jid = BareJid::new(&cfg.component).ok()?.into();
        tracing::info!(
            users = users.len(),
            generation,
            "resync: probing known users"
        );
        let per_tick = (cfg.probe_rate_per_sec / 10).max(1) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for chunk in users.chunks(per_tick) {
            tick.tick().await;
            for u in chunk {
                let Ok(to) = BareJid::new(u.as_str()) else {
                    continue;
                };
                let probe = Presence::new(PresenceType::Probe)
                    .with_from(component.clone())
                    .with_to(to);
                out.send(outbound(probe)).await.ok()?;
                metrics.probes_sent.inc();
            }
        }
        // What is still unconfirmed is decided after the grace period.
        tokio::time::sleep(cfg.resync_grace_secs).await;
        engine.resync_end(generation, offline_at).await.ok()?;
        status.send_modify(|s| s.resyncing = false);
        tracing::info!(generation, "resync: grace period over");
        Some(())
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = work => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let d = backoff_delay(min, max, attempt);
            let ceiling = min.saturating_mul(1 << attempt.min(20)).min(max);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            assert!(
                d >= ceiling / 2,
                "attempt {attempt}: {d:?} < half of {ceiling:?}"
            );
        }
        let draws: std::collections::HashSet<_> =
            (0..20).map(|_| backoff_delay(min, max, 10)).collect();
        assert!(draws.len() > 1, "jitter varies the delay");
    }

    #[test]
    fn outbound_presence_has_no_zero_priority() {
        let to: Jid = BareJid::new("alice@localhost").unwrap().into();
        for p in [
            Presence::new(PresenceType::Probe),
            Presence::subscribed(),
            Presence::subscribe(),
            Presence::available(),
            Presence::new(PresenceType::Unsubscribed),
        ] {
            let xml = String::from(&outbound(p.with_to(to.clone())));
            assert!(!xml.contains("priority"), "{xml}");
            assert!(xml.contains("to='alice@localhost'"), "{xml}");
        }
        let xml = String::from(&outbound(Presence::available().with_priority(5)));
        assert!(xml.contains("<priority>5</priority>"), "{xml}");
    }

    #[test]
    fn iq_answers() {
        let comp: Jid = BareJid::new("bridge.localhost").unwrap().into();
        let server: Jid = BareJid::new("localhost").unwrap().into();
        let ping = Iq::from_get("p1", Ping).with_from(server.clone());
        match answer_iq(ping, &comp) {
            Some(Iq::Result {
                id,
                to,
                from,
                payload: None,
            }) => {
                assert_eq!(id, "p1");
                assert_eq!(to, Some(server.clone()));
                assert_eq!(from, Some(comp.clone()));
            }
            other => panic!("{other:?}"),
        }
        let unknown = Iq::Get {
            from: Some(server.clone()),
            to: None,
            id: "v1".into(),
            payload: Element::bare("query", "jabber:iq:version"),
        };
        assert!(matches!(answer_iq(unknown, &comp), Some(Iq::Error { .. })));
        let result = Iq::Result {
            from: Some(server),
            to: None,
            id: "keepalive-1".into(),
            payload: None,
        };
        assert!(answer_iq(result, &comp).is_none());
    }
}
