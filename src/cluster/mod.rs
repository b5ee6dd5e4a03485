//! Several replicas on NATS JetStream (contract §11).
//!
//! Everything shared lives in JetStream, under names derived from `cluster.stream` (`S`):
//!
//! - the stream `S` (subject `presence-bridge.S.changes`): one message per batch of changes,
//!   and a `term` message each time a replica takes over ([`wire`]);
//! - the KV bucket `S_lease`, whose entries live [`lease_ttl`] (`cluster.failover_secs` less a
//!   follower's retry interval and half a second): the key `leader` names the leader; it is created by the replica that takes over, renewed (a
//!   compare-and-set on its revision) every third of its life, deleted on a clean stop;
//! - the KV bucket `S_meta`: the cluster's `epoch`, created once by whichever replica first
//!   starts, so that every replica and every leader shows the same epoch;
//! - the object store `S_snapshots`: the leader's latest snapshot of the map (`latest`), from
//!   which a replica that starts late catches up before reading the stream's tail.
//!
//! **Fencing.** The lease says who *should* publish; the stream enforces who *can*. Every
//! message is published with `Nats-Expected-Last-Sequence`: the stream sequence its
//! publisher believes is the last. A new leader first reads the stream to its end, then
//! publishes its `term` message, expecting that end. From then on, a message from the old
//! leader (stopped, paused, cut off; its lease lapsed without its knowing) names a stale last
//! sequence and the stream refuses it; the old leader then drops every change not confirmed
//! (they never happened) and follows. It also refuses to publish on its own once its lease,
//! by its own clock, has run out.
//!
//! **Publish before visible.** The leader's engine hands each batch of changes to the
//! [`Gate`] and shows them (map, hub, Postgres writer, webhooks) only once the stream
//! confirmed them. Batches are pipelined: up to [`WINDOW`] are in flight, each expecting the
//! sequence after its predecessor's.
//!
//! The replica's role decides which parts run: the [`Leadership`] (implemented by the
//! composition root) starts the leader-only parts (component, AMQP, reconciler, webhooks)
//! when this replica takes over and stops them when it steps down.

pub mod wire;

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, kv, object_store, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::presence::{ChangeSink, Engine, EngineClosed, Gate, GateRequest, Refused, Role};
use crate::telemetry;

/// Batches a leader has at the stream, unconfirmed, at most.
pub const WINDOW: usize = 64;

/// The key of the lease in `S_lease`.
const LEASE_KEY: &str = "leader";

/// Why the cluster could not start or a replica had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// NATS could not be reached or refused a request.
    #[error("NATS (cluster.nats_url): {0}")]
    Nats(String),
    /// The stream does not continue this replica's state (changes were lost to it).
    #[error(
        "the stream does not continue this replica's state ({0}); restart it to load the latest snapshot"
    )]
    Gap(String),
    /// A stream message this replica cannot read (written by something else, or by a
    /// newer version): following on could skip changes.
    #[error("stream message {stream_seq} cannot be read ({reason}); this replica stops following")]
    Undecodable {
        /// Its stream sequence.
        stream_seq: u64,
        /// Why.
        reason: String,
    },
    /// The stream belongs to another epoch.
    #[error("the stream holds epoch {found}, this cluster's is {ours} (cluster.stream is shared?)")]
    Epoch {
        /// The cluster's epoch.
        ours: String,
        /// The message's.
        found: String,
    },
}

/// How often a follower tries the lease.
fn tick(cfg: &ClusterConfig) -> Duration {
    (cfg.failover_secs / 5).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// How long the lease lives after its last renewal: short enough that a follower's next try
/// after it lapses, the takeover and the component's connect fit in `failover_secs`.
pub fn lease_ttl(cfg: &ClusterConfig) -> Duration {
    cfg.failover_secs
        .saturating_sub(tick(cfg) + Duration::from_millis(500))
        .max(Duration::from_secs(1))
}

fn nats(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Nats(e.to_string())
}

fn nats_at(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ClusterError {
    move |e| ClusterError::Nats(format!("{what}: {e}"))
}

/// What a replica shows about itself (`/readyz`, the dashboard, `/metrics`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// This replica's `node_id`.
    pub node: String,
    /// `leader` or `follower`.
    pub role: Role,
    /// The leader's `node_id`, when known.
    pub leader: Option<String>,
    /// Connected to NATS.
    pub nats: bool,
    /// Stream messages this replica has not applied yet (0 on the leader).
    pub lag: u64,
    /// The last stream message applied (or, on the leader, confirmed).
    pub stream_seq: u64,
    /// Since when the role holds.
    #[serde(with = "crate::presence::model::rfc3339_millis::option")]
    pub since: Option<DateTime<Utc>>,
}

/// The cluster's metrics.
#[derive(Debug, Clone)]
struct Metrics {
    leader: IntGauge,
    lag: IntGauge,
    published: IntCounter,
    applied: IntCounter,
    takeovers: IntCounter,
    step_downs: IntCounter,
    snapshots: IntCounter,
}

impl Metrics {
    fn new(r: &Registry) -> Self {
        Self {
            leader: telemetry::gauge(
                r,
                "presence_bridge_cluster_leader",
                "1 while this replica is the leader, else 0",
            ),
            lag: telemetry::gauge(
                r,
                "presence_bridge_cluster_stream_lag",
                "Stream messages this replica has not applied yet",
            ),
            published: telemetry::counter(
                r,
                "presence_bridge_cluster_published_changes_total",
                "Changes this replica published to the stream as leader (confirmed)",
            ),
            applied: telemetry::counter(
                r,
                "presence_bridge_cluster_applied_changes_total",
                "Changes this replica applied from the stream as follower",
            ),
            takeovers: telemetry::counter(
                r,
                "presence_bridge_cluster_takeovers_total",
                "Times this replica became the leader",
            ),
            step_downs: telemetry::counter(
                r,
                "presence_bridge_cluster_step_downs_total",
                "Times this replica stopped leading without being asked (lease lost, fenced)",
            ),
            snapshots: telemetry::counter(
                r,
                "presence_bridge_cluster_snapshots_total",
                "Snapshots this replica stored as leader",
            ),
        }
    }
}

/// A boxed future of a [`Leadership`] step.
pub type Step<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The sinks only a leader feeds.
pub type LeaderSinks = Vec<Arc<dyn ChangeSink>>;

/// What the composition root does when this replica's role changes.
pub trait Leadership: Send + Sync + 'static {
    /// Before leading: starts the leader-only sinks (webhooks) and returns every sink only
    /// the leader feeds (the store writer, webhooks).
    fn take_over(&self) -> Step<'_, LeaderSinks>;
    /// The engine leads: starts the sources (component, AMQP, reconciler).
    fn started(&self) -> Step<'_, ()>;
    /// No longer the leader: stops the sources and the leader-only parts.
    fn step_down(&self) -> Step<'_, ()>;
}

/// The connection and the JetStream objects of one replica.
#[derive(Clone)]
pub struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    lease: kv::Store,
    snapshots: object_store::ObjectStore,
    subject: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// What a replica starts from: the cluster's epoch and the latest snapshot.
#[derive(Debug)]
pub struct Bootstrap {
    /// The connection.
    pub conn: Conn,
    /// The cluster's epoch.
    pub epoch: Arc<str>,
    /// The snapshot's seq (0: none).
    pub seq: u64,
    /// The snapshot's users.
    pub seed: Vec<crate::presence::UserPresence>,
    /// Where to read the stream from.
    stream_from: u64,
}

/// Connects, creates (or finds) the stream, the buckets and the epoch, and loads the latest
/// snapshot.
pub async fn bootstrap(cfg: &ClusterConfig, node: &str) -> Result<Bootstrap, ClusterError> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("presence-bridge {node}"))
        .connection_timeout(Duration::from_secs(5))
        .connect(cfg.nats_url.expose())
        .await
        .map_err(|e| ClusterError::Nats(format!("cannot connect: {e}")))?;
    // Requests (publish acks included) give up after this: the leader's lease outlives it.
    let mut js = jetstream::new(client.clone());
    js.set_timeout((cfg.failover_secs / 4).max(Duration::from_secs(1)));
    let subject = format!("presence-bridge.{}.changes", cfg.stream);
    // Created, or updated to this config (a changed max_age_hours takes effect).
    js.create_or_update_stream(stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![subject.clone()],
        max_age: cfg.max_age(),
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        description: Some("presence-bridge: changes, in seq order".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| nats_at("the stream")(&e))?;
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| nats_at("the stream")(&e))?;
    let lease = key_value(
        &js,
        &format!("{}_lease", cfg.stream),
        lease_ttl(cfg),
        "the leader lease",
    )
    .await
    .map_err(|e| nats_at("the lease bucket")(&e))?;
    let meta = key_value(
        &js,
        &format!("{}_meta", cfg.stream),
        Duration::ZERO,
        "the cluster's epoch",
    )
    .await
    .map_err(|e| nats_at("the meta bucket")(&e))?;
    // The object store's stream, as async-nats would make it.
    let bucket = format!("{}_snapshots", cfg.stream);
    js.get_or_create_stream(stream::Config {
        name: format!("OBJ_{bucket}"),
        description: Some("presence-bridge: the latest snapshot of the map".into()),
        subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_at("the snapshot store")(&e))?;
    let snapshots = js
        .get_object_store(&bucket)
        .await
        .map_err(|e| nats_at("the snapshot store")(&e))?;
    let fresh = crate::presence::new_epoch();
    let epoch: Arc<str> = match meta.create("epoch", Bytes::from(fresh.to_string())).await {
        Ok(_) => fresh,
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let v = meta
                .get("epoch")
                .await
                .map_err(nats)?
                .ok_or_else(|| ClusterError::Nats("the epoch key vanished".into()))?;
            Arc::from(String::from_utf8_lossy(&v).into_owned())
        }
        Err(e) => return Err(nats(e)),
    };
    let conn = Conn {
        client,
        js,
        stream,
        lease,
        snapshots,
        subject,
    };
    let (seq, seed, stream_from) = match load_snapshot(&conn, &epoch).await? {
        Some(doc) => {
            let (seq, from) = (doc.seq, doc.stream_from);
            tracing::info!(
                seq,
                users = doc.users(),
                "cluster: starting from the latest snapshot"
            );
            (seq, doc.into_users(), from)
        }
        None => (0, Vec::new(), 1),
    };
    Ok(Bootstrap {
        conn,
        epoch,
        seq,
        seed,
        stream_from,
    })
}

/// A KV bucket (history 1), its stream made as async-nats's `create_key_value` would make it
/// (which first queries the account in a shape NATS 2.9 does not answer), or updated to this
/// config: a changed `failover_secs` changes the lease's TTL.
async fn key_value(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    what: &str,
) -> Result<kv::Store, async_nats::Error> {
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(format!("presence-bridge: {what}")),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(bucket).await?)
}

async fn load_snapshot(
    conn: &Conn,
    epoch: &str,
) -> Result<Option<wire::SnapshotDoc>, ClusterError> {
    let mut obj = match conn.snapshots.get("latest").await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(nats(e)),
    };
    let mut buf = Vec::new();
    obj.read_to_end(&mut buf).await.map_err(nats)?;
    let doc: wire::SnapshotDoc = serde_json::from_slice(&buf)
        .map_err(|e| ClusterError::Nats(format!("the snapshot does not decode: {e}")))?;
    if doc.epoch != epoch {
        tracing::warn!(snapshot = %doc.epoch, %epoch, "cluster: the snapshot is of another epoch; ignored");
        return Ok(None);
    }
    Ok(Some(doc))
}

/// A running replica, as the API sees it.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    status: watch::Receiver<Status>,
    client: async_nats::Client,
}

impl ClusterHandle {
    /// The replica's current status.
    pub fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.nats = self.client.connection_state() == async_nats::connection::State::Connected;
        s
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
}

/// A replica ready to start (see [`prepare`]).
pub struct Starter(Replica);

impl std::fmt::Debug for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Starter")
            .field("node", &self.0.node)
            .finish_non_exhaustive()
    }
}

impl Starter {
    /// Starts the replica's task: follows the stream, takes over when the lease is free,
    /// leads until it loses the lease or its `cancel` (a shutdown, after the engine has
    /// closed: its last changes are published first).
    pub fn start(self) -> JoinHandle<Result<(), ClusterError>> {
        tokio::spawn(self.0.run())
    }
}

/// Builds a replica and its handle; nothing runs before [`Starter::start`].
pub fn prepare(
    boot: Bootstrap,
    cfg: ClusterConfig,
    node: String,
    engine: Engine,
    leadership: Arc<dyn Leadership>,
    registry: &Registry,
    cancel: CancellationToken,
) -> (ClusterHandle, Starter) {
    let (tx, rx) = watch::channel(Status {
        node: node.clone(),
        role: Role::Follower,
        leader: None,
        nats: true,
        lag: 0,
        stream_seq: boot.stream_from.saturating_sub(1),
        since: Some(Utc::now()),
    });
    let handle = ClusterHandle {
        status: rx,
        client: boot.conn.client.clone(),
    };
    let replica = Replica {
        applied: boot.stream_from.saturating_sub(1),
        conn: boot.conn,
        epoch: boot.epoch,
        cfg,
        node,
        engine,
        leadership,
        status: tx,
        metrics: Metrics::new(registry),
        cancel,
    };
    (handle, Starter(replica))
}

struct Replica {
    conn: Conn,
    epoch: Arc<str>,
    cfg: ClusterConfig,
    node: String,
    engine: Engine,
    leadership: Arc<dyn Leadership>,
    status: watch::Sender<Status>,
    metrics: Metrics,
    cancel: CancellationToken,
    /// The last stream sequence whose changes are in the engine.
    applied: u64,
}

enum Led {
    /// Shutting down.
    Cancelled,
    /// Lost the lease or was fenced: follow again.
    Lost,
}

type Messages = consumer::pull::Ordered;

impl Replica {
    async fn run(mut self) -> Result<(), ClusterError> {
        loop {
            let Some(revision) = self.follow().await? else {
                return Ok(());
            };
            match self.lead(revision).await? {
                Led::Cancelled => return Ok(()),
                Led::Lost => continue,
            }
        }
    }

    fn set_role(&self, role: Role, leader: Option<String>) {
        self.metrics.leader.set(i64::from(role == Role::Leader));
        self.status.send_modify(|s| {
            if s.role != role {
                s.since = Some(Utc::now());
            }
            s.role = role;
            s.leader = leader;
            s.stream_seq = self.applied;
            if role == Role::Leader {
                s.lag = 0;
            }
        });
        if role == Role::Leader {
            self.metrics.lag.set(0);
        }
    }

    fn tick(&self) -> Duration {
        tick(&self.cfg)
    }

    /// Applies the stream until this replica holds the lease (its revision) or is cancelled.
    async fn follow(&mut self) -> Result<Option<u64>, ClusterError> {
        let leader = self.status.borrow().leader.clone();
        self.set_role(Role::Follower, leader);
        let mut ticks = tokio::time::interval(self.tick());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut messages: Option<Messages> = None;
        // An ephemeral consumer does not survive a NATS restart; the client's reconnect
        // count says when to make a new one (rather than waiting for missed heartbeats).
        let stats = self.conn.client.statistics();
        let connects = move || stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        let mut made_at = connects();
        loop {
            if messages.is_some() && connects() != made_at {
                tracing::info!("cluster: reconnected to NATS; reading the stream again");
                messages = None;
            }
            if messages.is_none() {
                made_at = connects();
                match self.consumer().await {
                    Ok(m) => messages = Some(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot read the stream; retrying");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return Ok(None),
                            _ = tokio::time::sleep(self.tick()) => continue,
                        }
                    }
                }
            }
            let Some(m) = messages.as_mut() else {
                continue;
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                _ = ticks.tick() => {
                    if let Some(rev) = self.try_acquire().await {
                        return Ok(Some(rev));
                    }
                }
                msg = m.next() => match msg {
                    Some(Ok(msg)) => {
                        let Ok(info) = msg.info() else { continue };
                        let (seq, pending) = (info.stream_sequence, info.pending);
                        if !self.apply(seq, &msg.payload).await? {
                            return Ok(None);
                        }
                        self.metrics.lag.set(pending as i64);
                        self.status.send_modify(|s| {
                            s.lag = pending;
                            s.stream_seq = seq;
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: the stream consumer failed; recreating it");
                        messages = None;
                    }
                    None => messages = None,
                }
            }
        }
    }

    async fn consumer(&self) -> Result<Messages, ClusterError> {
        let c = self
            .conn
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.conn.subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.applied + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        c.messages().await.map_err(nats)
    }

    /// Applies one stream message; `false` if the engine has stopped.
    async fn apply(&mut self, stream_seq: u64, payload: &[u8]) -> Result<bool, ClusterError> {
        if stream_seq <= self.applied {
            return Ok(true);
        }
        match wire::decode(payload) {
            Ok(wire::Message::Term { node, epoch, seq }) => {
                self.check_epoch(&epoch)?;
                tracing::info!(leader = %node, after_seq = seq, "cluster: a new leader took over");
                self.status.send_modify(|s| s.leader = Some(node));
            }
            Ok(wire::Message::Changes {
                node,
                epoch,
                changes,
            }) => {
                self.check_epoch(&epoch)?;
                let entries = wire::entries(changes).map_err(|e| ClusterError::Undecodable {
                    stream_seq,
                    reason: e.to_string(),
                })?;
                let n = entries.len() as u64;
                match self.engine.replicate(entries).await {
                    Ok(Ok(_)) => self.metrics.applied.inc_by(n),
                    Ok(Err(gap)) => return Err(ClusterError::Gap(gap.to_string())),
                    Err(EngineClosed) => return Ok(false),
                }
                if self.status.borrow().leader.as_deref() != Some(&node) {
                    self.status.send_modify(|s| s.leader = Some(node));
                }
            }
            Err(e) => {
                // Skipping it could skip changes: this replica cannot follow any further.
                return Err(ClusterError::Undecodable {
                    stream_seq,
                    reason: e.to_string(),
                });
            }
        }
        self.applied = stream_seq;
        Ok(true)
    }

    fn check_epoch(&self, epoch: &str) -> Result<(), ClusterError> {
        if epoch != &*self.epoch {
            return Err(ClusterError::Epoch {
                ours: self.epoch.to_string(),
                found: epoch.to_owned(),
            });
        }
        Ok(())
    }

    /// Takes the lease if it is free; else notes who holds it.
    async fn try_acquire(&self) -> Option<u64> {
        match self
            .conn
            .lease
            .create(LEASE_KEY, Bytes::from(self.node.clone()))
            .await
        {
            Ok(rev) => Some(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                if let Ok(Some(v)) = self.conn.lease.get(LEASE_KEY).await {
                    let holder = String::from_utf8_lossy(&v).into_owned();
                    if self.status.borrow().leader.as_deref() != Some(&holder) {
                        self.status.send_modify(|s| s.leader = Some(holder));
                    }
                }
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "cluster: cannot reach the lease");
                None
            }
        }
    }

    /// Leads from lease revision `rev` until cancelled or no longer the leader.
    async fn lead(&mut self, mut rev: u64) -> Result<Led, ClusterError> {
        let ttl = lease_ttl(&self.cfg);
        // 1. Everything in the stream is applied, then our term fences the old leader.
        let (term_seq, lease_until) = loop {
            let asked = Instant::now();
            match self.claim(rev).await {
                Ok(Some((seq, r))) => {
                    rev = r;
                    break (seq, asked + ttl);
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: could not take over; following again");
                    let _ = self
                        .conn
                        .lease
                        .delete_expect_revision(LEASE_KEY, Some(rev))
                        .await;
                    return Ok(Led::Lost);
                }
            }
        };
        self.applied = term_seq;
        self.metrics.takeovers.inc();
        // 2. The engine leads through the gate; the sources start.
        let sinks = self.leadership.take_over().await;
        let (gate, requests) = Gate::channel();
        let from = match self.engine.lead(gate, sinks).await {
            Ok(seq) => seq,
            Err(EngineClosed) => return Ok(Led::Cancelled),
        };
        tracing::info!(node = %self.node, seq = from, stream_seq = term_seq, "cluster: leading");
        let deadline = Arc::new(Mutex::new(lease_until));
        let acked = Arc::new(Mutex::new(VecDeque::new()));
        let publisher = Publisher {
            js: self.conn.js.clone(),
            stream: self.conn.stream.clone(),
            subject: self.conn.subject.clone(),
            node: self.node.clone(),
            epoch: self.epoch.clone(),
            deadline: deadline.clone(),
            acked: acked.clone(),
            published: self.metrics.published.clone(),
            status: self.status.clone(),
        };
        let mut publishing = tokio::spawn(publisher.run(requests, term_seq));
        self.set_role(Role::Leader, Some(self.node.clone()));
        self.leadership.started().await;
        // 3. Renew the lease; store snapshots; watch the publisher.
        let mut renew = tokio::time::interval(ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut snapshot = tokio::time::interval(self.cfg.snapshot_secs);
        snapshot.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        snapshot.tick().await;
        let mut last_snapshot = 0u64;
        let end = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break Led::Cancelled,
                r = &mut publishing => match r {
                    // The engine has closed: a shutdown; the lease is released below.
                    Ok(None) => break Led::Cancelled,
                    Ok(Some(why)) => {
                        tracing::warn!(reason = %why, "cluster: the stream refused this leader");
                        break Led::Lost;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: the publisher failed");
                        break Led::Lost;
                    }
                },
                _ = renew.tick() => {
                    // The lease's clock starts before the request: never later than NATS's.
                    let asked = Instant::now();
                    match self.conn.lease.update(LEASE_KEY, Bytes::from(self.node.clone()), rev).await {
                        Ok(r) => {
                            rev = r;
                            *deadline.lock().unwrap_or_else(|p| p.into_inner()) = asked + ttl;
                        }
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            tracing::warn!("cluster: the lease was taken by another replica");
                            break Led::Lost;
                        }
                        Err(e) => {
                            let until = *deadline.lock().unwrap_or_else(|p| p.into_inner());
                            if Instant::now() >= until {
                                tracing::warn!(error = %e, "cluster: the lease ran out unrenewed");
                                break Led::Lost;
                            }
                            tracing::warn!(error = %e, "cluster: cannot renew the lease yet");
                        }
                    }
                }
                _ = snapshot.tick() => {
                    if let Some(seq) = self.store_snapshot(term_seq, &acked, last_snapshot).await {
                        last_snapshot = seq;
                    }
                }
            }
        };
        match end {
            Led::Cancelled => {
                // The engine has closed (its last changes are confirmed): hand over at once.
                publishing.abort();
                self.leadership.step_down().await;
                let _ = self
                    .conn
                    .lease
                    .delete_expect_revision(LEASE_KEY, Some(rev))
                    .await;
                tracing::info!("cluster: released the lease");
            }
            Led::Lost => {
                self.metrics.step_downs.inc();
                let seq = self.engine.follow().await.unwrap_or(0);
                publishing.abort();
                self.leadership.step_down().await;
                // Follow from the first message the engine does not hold.
                let acked = acked.lock().unwrap_or_else(|p| p.into_inner());
                self.applied = acked
                    .iter()
                    .rev()
                    .find(|(last, _)| *last <= seq)
                    .map_or(term_seq, |(_, s)| *s);
                self.status.send_modify(|s| s.leader = None);
            }
        }
        Ok(end)
    }

    /// Reads the stream to its end and publishes a term message expecting that end. `None`:
    /// the stream moved meanwhile (try again). Also renews the lease first (a takeover that
    /// took too long must not go on).
    async fn claim(&mut self, rev: u64) -> Result<Option<(u64, u64)>, ClusterError> {
        let last = self
            .conn
            .stream
            .get_info()
            .await
            .map_err(nats)?
            .state
            .last_sequence;
        for seq in self.applied + 1..=last {
            let m = match self.conn.stream.get_raw_message(seq).await {
                Ok(m) => m,
                // Deleted (expired) messages: nothing to apply.
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => continue,
                Err(e) => return Err(nats(e)),
            };
            if !self.apply(seq, &m.payload).await? {
                return Err(ClusterError::Nats("the engine stopped".into()));
            }
        }
        self.applied = self.applied.max(last);
        let rev = self
            .conn
            .lease
            .update(LEASE_KEY, Bytes::from(self.node.clone()), rev)
            .await
            .map_err(nats)?;
        let seq = self.engine.seq();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Sequence", last.to_string().as_str());
        headers.insert(
            "Nats-Msg-Id",
            format!("{}:term:{}:{}", self.epoch, self.node, rev).as_str(),
        );
        let payload = Bytes::from(wire::encode_term(&self.node, &self.epoch, seq));
        let ack = async {
            self.conn
                .js
                .publish_with_headers(self.conn.subject.clone(), headers, payload)
                .await?
                .await
        }
        .await;
        match ack {
            Ok(a) => Ok(Some((a.sequence, rev))),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Stores a snapshot if the seq moved since `last`; returns its seq.
    async fn store_snapshot(
        &self,
        term_seq: u64,
        acked: &Mutex<VecDeque<(u64, u64)>>,
        last: u64,
    ) -> Option<u64> {
        let (seq, users) = self.engine.dump().await.ok()?;
        if seq == last {
            return None;
        }
        // The message after the one that ended at `seq` (or, if none ended there during this
        // leadership, after our term: everything before it is at or below `seq`).
        let stream_from = acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|(l, _)| *l <= seq)
            .map_or(term_seq, |(_, s)| *s)
            + 1;
        let bytes = match wire::encode_snapshot(&self.epoch, seq, stream_from, &users) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cluster: cannot encode a snapshot");
                return None;
            }
        };
        match self
            .conn
            .snapshots
            .put("latest", &mut bytes.as_slice())
            .await
        {
            Ok(_) => {
                self.metrics.snapshots.inc();
                tracing::debug!(
                    seq,
                    users = users.len(),
                    bytes = bytes.len(),
                    "cluster: snapshot stored"
                );
                Some(seq)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot store a snapshot");
                None
            }
        }
    }
}

type AckFuture =
    Pin<Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishErr>> + Send>>;
type PublishErr = jetstream::context::PublishError;

/// One batch at the stream.
struct InFlight {
    payload: Bytes,
    msg_id: String,
    /// The stream sequence it expects to follow.
    expected: u64,
    last_seq: u64,
    changes: u64,
    /// The ack on its way (taken out while it is being awaited).
    ack: Option<AckFuture>,
    /// Found stored by a repair.
    done: bool,
    reply: tokio::sync::oneshot::Sender<Result<(), Refused>>,
}

/// The leader's publisher: answers the engine's gate.
struct Publisher {
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    node: String,
    epoch: Arc<str>,
    deadline: Arc<Mutex<Instant>>,
    /// (last change seq, stream seq) of recently confirmed batches.
    acked: Arc<Mutex<VecDeque<(u64, u64)>>>,
    published: IntCounter,
    status: watch::Sender<Status>,
}

impl Publisher {
    /// Runs until refused (returns why) or the engine has stopped (`None`).
    async fn run(
        self,
        mut requests: mpsc::UnboundedReceiver<GateRequest>,
        mut last: u64,
    ) -> Option<Refused> {
        let mut pending: VecDeque<InFlight> = VecDeque::new();
        loop {
            let mut head = pending.front_mut().and_then(|p| p.ack.take());
            let room = pending.len() < WINDOW;
            tokio::select! {
                biased;
                r = async { match &mut head { Some(f) => f.await, None => std::future::pending().await } } => {
                    let outcome = match r {
                        Ok(ack) if ack.sequence == pending[0].expected + 1 => Ok(()),
                        Ok(ack) => Err(Refused(format!(
                            "the stream stored a batch at {} where {} was expected",
                            ack.sequence,
                            pending[0].expected + 1
                        ))),
                        Err(e) => {
                            tracing::warn!(error = %e, "cluster: publishing failed; repairing");
                            self.repair(&mut pending).await
                        }
                    };
                    if let Err(why) = outcome {
                        return Some(self.refuse_all(pending, &mut requests, why));
                    }
                    // The head, or (after a repair) every batch, is stored.
                    while let Some(p) = pending.pop_front() {
                        if p.ack.is_some() && !p.done {
                            pending.push_front(p);
                            break;
                        }
                        self.confirmed(p);
                    }
                }
                req = requests.recv(), if room => {
                    if let (Some(f), Some(p)) = (head.take(), pending.front_mut()) {
                        p.ack = Some(f);
                    }
                    let (batch, reply) = req?;
                    if Instant::now() >= *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) {
                        let why = Refused("the lease ran out: not publishing".into());
                        let _ = reply.send(Err(why.clone()));
                        return Some(self.refuse_all(pending, &mut requests, why));
                    }
                    let first = batch.first().map_or(0, |e| e.change.seq);
                    let last_seq = batch.last().map_or(0, |e| e.change.seq);
                    let mut p = InFlight {
                        payload: Bytes::from(wire::encode_changes(&self.node, &self.epoch, &batch)),
                        msg_id: format!("{}:{}", self.epoch, first),
                        expected: last,
                        last_seq,
                        changes: batch.len() as u64,
                        ack: None,
                        done: false,
                        reply,
                    };
                    last += 1;
                    match self.send(p.payload.clone(), &p.msg_id, p.expected).await {
                        Ok(f) => p.ack = Some(f),
                        Err(e) => {
                            // Sent nowhere: the repair path publishes it again.
                            tracing::warn!(error = %e, "cluster: cannot publish; repairing");
                            p.ack = Some(Box::pin(async move { Err(e) }));
                        }
                    }
                    pending.push_back(p);
                }
            }
        }
    }

    async fn send(
        &self,
        payload: Bytes,
        msg_id: &str,
        expected: u64,
    ) -> Result<AckFuture, PublishErr> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert("Nats-Expected-Last-Sequence", expected.to_string().as_str());
        let f = self
            .js
            .publish_with_headers(self.subject.clone(), headers, payload)
            .await?;
        Ok(Box::pin(f.into_future()))
    }

    fn confirmed(&self, p: InFlight) {
        let stream_seq = p.expected + 1;
        {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            if acked.len() >= 4096 {
                acked.pop_front();
            }
            acked.push_back((p.last_seq, stream_seq));
        }
        self.published.inc_by(p.changes);
        self.status.send_modify(|s| s.stream_seq = stream_seq);
        let _ = p.reply.send(Ok(()));
    }

    /// After a failure: every batch in flight is published again, one at a time, with the
    /// same id and expectation, until stored (or found stored) or refused for good.
    async fn repair(&self, pending: &mut VecDeque<InFlight>) -> Result<(), Refused> {
        let mut i = 0;
        while i < pending.len() {
            loop {
                if Instant::now() >= *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) {
                    return Err(Refused(
                        "the lease ran out before the stream took the changes".into(),
                    ));
                }
                let (payload, msg_id, expected) = {
                    let p = &pending[i];
                    (p.payload.clone(), p.msg_id.clone(), p.expected)
                };
                let r = match self.send(payload, &msg_id, expected).await {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(ack) if ack.sequence == expected + 1 => break,
                    Ok(ack) => {
                        return Err(Refused(format!(
                            "the stream stored a batch at {} where {} was expected",
                            ack.sequence,
                            expected + 1
                        )));
                    }
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        // Stored already (its ack was lost), or someone else wrote there.
                        match self.stream.get_raw_message(expected + 1).await {
                            Ok(m)
                                if m.headers
                                    .get("Nats-Msg-Id")
                                    .is_some_and(|v| v.as_str() == msg_id) =>
                            {
                                break;
                            }
                            Ok(_) => {
                                return Err(Refused(
                                    "another leader has written to the stream".into(),
                                ));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cluster: cannot check the stream");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cluster: publishing again"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pending[i].ack = None;
            pending[i].done = true;
            i += 1;
        }
        Ok(())
    }

    fn refuse_all(
        &self,
        pending: VecDeque<InFlight>,
        requests: &mut mpsc::UnboundedReceiver<GateRequest>,
        why: Refused,
    ) -> Refused {
        for p in pending {
            let _ = p.reply.send(Err(why.clone()));
        }
        requests.close();
        while let Ok((_, reply)) = requests.try_recv() {
            let _ = reply.send(Err(why.clone()));
        }
        why
    }
}
