//! The sequencer: one task that applies events in arrival order, stamps each resulting change
//! with the next `seq`, and publishes it to the map, the counters and the hub.
//!
//! Only this task writes presence state, so everything it publishes is consistent with its
//! `seq`; a snapshot is taken *by* this task, between two events, and is therefore exactly the
//! state at its `seq`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use prometheus::{IntCounter, IntGauge, Registry};

use super::aggregate;
use super::hub::Hub;
use super::model::{
    Cause, Change, EventKind, PresenceEvent, Show, UserJid, UserPresence, new_event_id,
};
use super::sink::{Applied, ChangeSink};
use crate::config::PresenceConfig;
use crate::telemetry;

/// The engine's task has stopped (the process is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("presence engine stopped")]
pub struct EngineClosed;

/// Online counts, maintained incrementally by the sequencer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Seq of the last change these counts include.
    pub seq: u64,
    /// Users with at least one resource online.
    pub online_users: u64,
    /// Online resources.
    pub online_resources: u64,
    /// Online users by aggregate show.
    pub by_show: std::collections::BTreeMap<Show, u64>,
    /// Online users by domain.
    pub by_domain: std::collections::BTreeMap<String, u64>,
}

impl Stats {
    /// Adds (`sign` 1) or removes (`sign` -1) one user's presence; offline users count for
    /// nothing.
    pub fn account(&mut self, p: &UserPresence, sign: i64) {
        if !p.online {
            return;
        }
        let add = |v: &mut u64, d: i64| *v = v.saturating_add_signed(d);
        add(&mut self.online_users, sign);
        add(&mut self.online_resources, sign * p.resources.len() as i64);
        let s = self.by_show.entry(p.show).or_default();
        add(s, sign);
        if *s == 0 {
            self.by_show.remove(&p.show);
        }
        let d = self.by_domain.entry(p.jid.domain().to_owned()).or_default();
        add(d, sign);
        if *d == 0 {
            self.by_domain.remove(p.jid.domain());
        }
    }
}

/// The online users, ordered by JID, as a persistent map: cloning it is O(1) and shares
/// structure with the sequencer's own copy.
pub type OnlineMap = imbl::OrdMap<UserJid, Arc<UserPresence>>;

/// All online users at one `seq`. Cheap to clone; taking one costs the sequencer O(1), and
/// whatever a reader does with it (filter, page, serialise) happens on the reader's task.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The epoch of `seq`.
    pub epoch: Arc<str>,
    /// The last change included.
    pub seq: u64,
    /// Online users by JID.
    pub users: OnlineMap,
}

impl Snapshot {
    /// Online users in JID order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<UserPresence>> {
        self.users.values()
    }

    /// Online users whose JID sorts after `text` (which need not be a JID: a page cursor),
    /// in JID order.
    pub fn after<'a>(&'a self, text: &'a str) -> impl Iterator<Item = &'a Arc<UserPresence>> {
        use std::ops::Bound;
        self.users
            .range::<_, str>((Bound::Excluded(text), Bound::Unbounded))
            .map(|(_, u)| u)
    }
}

/// The engine's metrics, updated by the sequencer as it applies events.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    events: IntCounter,
    changes: IntCounter,
    online_users: IntGauge,
    online_resources: IntGauge,
    known_users: IntGauge,
}

impl EngineMetrics {
    /// Registers the engine's metrics in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            events: telemetry::counter(
                r,
                "presence_bridge_events_total",
                "Presence events handed to the engine (by any source)",
            ),
            changes: telemetry::counter(
                r,
                "presence_bridge_changes_total",
                "Changes emitted by the engine",
            ),
            online_users: telemetry::gauge(
                r,
                "presence_bridge_online_users",
                "Users with at least one resource online",
            ),
            online_resources: telemetry::gauge(
                r,
                "presence_bridge_online_resources",
                "Online resources",
            ),
            known_users: telemetry::gauge(
                r,
                "presence_bridge_known_users",
                "Users in the presence map (online or not)",
            ),
        }
    }
}

impl Default for EngineMetrics {
    /// Metrics in a private registry nobody renders (unit tests, benchmarks).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

/// How the engine starts: who listens, what it knows already, where it counts.
#[derive(Debug, Default)]
pub struct EngineOptions {
    /// Every change goes to each of these, in seq order (store writer, …).
    pub sinks: Vec<Arc<dyn ChangeSink>>,
    /// State loaded from the store: installed without changes (seq stays 0), confirmed or
    /// expired by the first resync.
    pub seed: Vec<UserPresence>,
    /// Where the engine counts.
    pub metrics: EngineMetrics,
}

enum Command {
    Apply(PresenceEvent),
    Close,
    Snapshot(oneshot::Sender<Arc<Snapshot>>),
    KnownUsers(oneshot::Sender<Vec<UserJid>>),
    ResyncBegin(u64),
    ResyncEnd {
        generation: u64,
        offline_at: DateTime<Utc>,
    },
    Barrier(oneshot::Sender<u64>),
    Forget(UserJid, oneshot::Sender<bool>),
}

/// State shared between the sequencer and readers.
#[derive(Debug)]
struct Shared {
    epoch: Arc<str>,
    /// Every user ever seen this run (online or not), for O(1) reads by JID. Hashed with
    /// seeded foldhash (hashbrown's own default), not SipHash: every event and every
    /// last-seen lookup probes it.
    map: DashMap<UserJid, Arc<UserPresence>, foldhash::fast::RandomState>,
    stats: RwLock<Stats>,
    seq: AtomicU64,
    hub: Hub,
    /// The last snapshot taken: requests at the same seq share it without asking the
    /// sequencer again.
    last_snapshot: std::sync::Mutex<Option<Arc<Snapshot>>>,
}

/// Handle to the engine. Cheap to clone; the sequencer stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the sequencer task with no sinks and no known users.
    pub fn start(cfg: &PresenceConfig) -> (Engine, JoinHandle<()>) {
        Self::start_with(cfg, EngineOptions::default())
    }

    /// Starts the sequencer task. The task ends after [`Engine::close`] (once everything
    /// queued before it is applied) or when every handle is dropped.
    pub fn start_with(cfg: &PresenceConfig, opts: EngineOptions) -> (Engine, JoinHandle<()>) {
        let EngineOptions {
            sinks,
            seed,
            metrics,
        } = opts;
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let epoch: Arc<str> = Arc::from(format!(
            "{:016x}",
            (new_event_id() >> 64) as u64 ^ rand::random::<u64>()
        ));
        let shared = Arc::new(Shared {
            epoch,
            map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            stats: RwLock::new(Stats::default()),
            seq: AtomicU64::new(0),
            // The feed holds chunks of up to MAX_CHUNK changes; an eighth of the ring in
            // chunks lets a subscriber fall at least that many changes (and, under load, up
            // to eight times the ring) behind before it must resync.
            hub: Hub::new(cfg.ring_size, (cfg.ring_size / 8).clamp(128, 8192)),
            last_snapshot: std::sync::Mutex::new(None),
        });
        let mut online = OnlineMap::new();
        {
            let mut stats = shared.stats.write().unwrap_or_else(|p| p.into_inner());
            for u in seed {
                stats.account(&u, 1);
                let u = Arc::new(u);
                if u.online {
                    online.insert(u.jid.clone(), u.clone());
                }
                shared.map.insert(u.jid.clone(), u);
            }
            metrics.online_users.set(stats.online_users as i64);
            metrics.online_resources.set(stats.online_resources as i64);
            metrics.known_users.set(shared.map.len() as i64);
        }
        let seq = Sequencer {
            shared: shared.clone(),
            online,
            touch: 0,
            resync: None,
            sinks,
            metrics,
            unpublished: Vec::with_capacity(super::hub::MAX_CHUNK),
        };
        let task = tokio::spawn(seq.run(rx));
        (Engine { tx, shared }, task)
    }

    /// Queues an event (waits if the queue is full: backpressure on the input source).
    pub async fn apply(&self, ev: PresenceEvent) -> Result<(), EngineClosed> {
        self.tx
            .send(Command::Apply(ev))
            .await
            .map_err(|_| EngineClosed)
    }

    /// Stops the sequencer once every command queued before this one is done; later calls on
    /// any handle get [`EngineClosed`]. Sources must be stopped first (nothing they still
    /// send would be applied).
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }

    /// All online users, consistent with the returned `seq`: snapshot(S) + every change after
    /// S is the live state. At most one request per `seq` reaches the sequencer (which answers
    /// with an O(1) clone); the others share it.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, EngineClosed> {
        let seq = self.seq();
        if let Some(s) = self.cached_snapshot(seq) {
            return Ok(s);
        }
        let snap = self.ask(Command::Snapshot).await?;
        let mut last = self
            .shared
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_none_or(|l| l.seq < snap.seq) {
            *last = Some(snap.clone());
        }
        Ok(snap)
    }

    fn cached_snapshot(&self, seq: u64) -> Option<Arc<Snapshot>> {
        let last = self
            .shared
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|l| l.seq == seq).cloned()
    }

    /// Every user the engine knows (online or offline), for probing after a reconnect.
    pub async fn known_users(&self) -> Result<Vec<UserJid>, EngineClosed> {
        self.ask(Command::KnownUsers).await
    }

    /// Waits until every event queued before this call has been applied; returns the seq then.
    pub async fn barrier(&self) -> Result<u64, EngineClosed> {
        self.ask(Command::Barrier).await
    }

    /// Forgets a user (a right-to-erasure request, contract §8): removes them from the map,
    /// the counters and any resync round. If they were online, subscribers get one `offline`
    /// change for them (published to the hub only: the sinks record nothing about a user
    /// being erased). `true` if the user was known. Their next presence makes them new.
    pub async fn forget(&self, jid: &UserJid) -> Result<bool, EngineClosed> {
        let jid = jid.clone();
        self.ask(|reply| Command::Forget(jid, reply)).await
    }

    /// Starts a resync round: every resource online now must be confirmed (by any presence
    /// of that resource) before [`Engine::resync_end`] with the same generation, or it goes
    /// offline with cause `resync`.
    pub async fn resync_begin(&self, generation: u64) -> Result<(), EngineClosed> {
        self.tx
            .send(Command::ResyncBegin(generation))
            .await
            .map_err(|_| EngineClosed)
    }

    /// Ends a resync round; unconfirmed resources go offline at `offline_at`. A stale
    /// generation (a newer round began since) is ignored.
    pub async fn resync_end(
        &self,
        generation: u64,
        offline_at: DateTime<Utc>,
    ) -> Result<(), EngineClosed> {
        self.tx
            .send(Command::ResyncEnd {
                generation,
                offline_at,
            })
            .await
            .map_err(|_| EngineClosed)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineClosed> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| EngineClosed)?;
        rx.await.map_err(|_| EngineClosed)
    }

    /// The current state of one user (O(1)), online or offline; `None` if never seen.
    pub fn get(&self, jid: &UserJid) -> Option<Arc<UserPresence>> {
        self.shared.map.get(jid).map(|e| e.value().clone())
    }

    /// Online counts.
    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Users known to the map (online or not).
    pub fn known_count(&self) -> usize {
        self.shared.map.len()
    }

    /// The change hub (subscribe, resume).
    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// This process's epoch.
    pub fn epoch(&self) -> &Arc<str> {
        &self.shared.epoch
    }

    /// The seq of the last published change.
    pub fn seq(&self) -> u64 {
        self.shared.seq.load(Ordering::Acquire)
    }
}

struct Resync {
    generation: u64,
    pending: HashSet<(UserJid, String)>,
}

struct Sequencer {
    shared: Arc<Shared>,
    /// The online users, kept in step with `shared.map`; snapshots are clones of it.
    online: OnlineMap,
    touch: u64,
    resync: Option<Resync>,
    sinks: Vec<Arc<dyn ChangeSink>>,
    metrics: EngineMetrics,
    /// Changes applied but not yet on the hub's feed (see [`Sequencer::publish`]).
    unpublished: Vec<Arc<Change>>,
}

impl Sequencer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            // Changes go to the hub in chunks: when the queue is empty (so a lone change is
            // published at once), before any other command (a barrier or snapshot answer
            // never runs ahead of the feed), or at MAX_CHUNK.
            let cmd = match rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.flush();
                    match rx.recv().await {
                        Some(cmd) => cmd,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            if !matches!(cmd, Command::Apply(_)) {
                self.flush();
            }
            match cmd {
                Command::Apply(ev) => {
                    self.metrics.events.inc();
                    self.confirm(&ev);
                    self.apply(&ev);
                }
                Command::Close => break,
                Command::Snapshot(reply) => {
                    // O(1): the map is persistent; the reader pays for what it does with it.
                    let _ = reply.send(Arc::new(Snapshot {
                        epoch: self.shared.epoch.clone(),
                        seq: self.shared.seq.load(Ordering::Acquire),
                        users: self.online.clone(),
                    }));
                }
                Command::KnownUsers(reply) => {
                    let mut users: Vec<UserJid> =
                        self.shared.map.iter().map(|e| e.key().clone()).collect();
                    users.sort();
                    let _ = reply.send(users);
                }
                Command::Barrier(reply) => {
                    let _ = reply.send(self.shared.seq.load(Ordering::Acquire));
                }
                Command::Forget(jid, reply) => {
                    let known = self.forget(&jid);
                    let _ = reply.send(known);
                }
                Command::ResyncBegin(generation) => {
                    let pending = self
                        .shared
                        .map
                        .iter()
                        .flat_map(|e| {
                            let jid = e.key().clone();
                            e.value()
                                .resources
                                .iter()
                                .map(|r| (jid.clone(), r.resource.clone()))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    self.resync = Some(Resync {
                        generation,
                        pending,
                    });
                }
                Command::ResyncEnd {
                    generation,
                    offline_at,
                } => {
                    if self.resync.as_ref().map(|r| r.generation) != Some(generation) {
                        continue;
                    }
                    let Some(r) = self.resync.take() else {
                        continue;
                    };
                    let mut stale: Vec<_> = r.pending.into_iter().collect();
                    stale.sort();
                    if !stale.is_empty() {
                        tracing::info!(
                            resources = stale.len(),
                            "resync: resources not confirmed by probe within the grace period go offline"
                        );
                    }
                    let now = Utc::now();
                    for (jid, resource) in stale {
                        self.apply(&PresenceEvent {
                            id: new_event_id(),
                            jid,
                            resource,
                            kind: EventKind::Unavailable {
                                status: None,
                                reason: None,
                            },
                            at: offline_at,
                            received_at: now,
                            cause: Cause::Resync,
                        });
                    }
                }
            }
        }
        self.flush();
    }

    /// Queues a change for the hub; see `run` for when the queue is published.
    fn publish(&mut self, change: Arc<Change>) {
        self.unpublished.push(change);
        if self.unpublished.len() >= super::hub::MAX_CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.unpublished.is_empty() {
            let chunk = std::mem::replace(
                &mut self.unpublished,
                Vec::with_capacity(super::hub::MAX_CHUNK),
            );
            self.shared.hub.publish(chunk);
        }
    }

    fn forget(&mut self, jid: &UserJid) -> bool {
        if let Some(r) = &mut self.resync {
            r.pending.retain(|(j, _)| j != jid);
        }
        let Some((_, prev)) = self.shared.map.remove(jid) else {
            return false;
        };
        self.metrics.known_users.set(self.shared.map.len() as i64);
        if !prev.online {
            return true;
        }
        let seq = self.shared.seq.load(Ordering::Relaxed) + 1;
        {
            let mut stats = self.shared.stats.write().unwrap_or_else(|p| p.into_inner());
            stats.account(&prev, -1);
            stats.seq = seq;
            self.metrics.online_users.set(stats.online_users as i64);
            self.metrics
                .online_resources
                .set(stats.online_resources as i64);
        }
        self.online.remove(jid);
        let now = Utc::now();
        let gone = Arc::new(UserPresence {
            jid: jid.clone(),
            online: false,
            show: Show::Offline,
            status: None,
            priority: 0,
            online_since: None,
            last_change: now,
            last_seen: None,
            resources: Vec::new(),
        });
        self.shared.seq.store(seq, Ordering::Release);
        self.metrics.changes.inc();
        self.publish(Arc::new(Change {
            seq,
            jid: jid.clone(),
            op: super::model::Op::Offline,
            presence: gone,
            received_at: now,
            encoded: Default::default(),
        }));
        true
    }

    fn confirm(&mut self, ev: &PresenceEvent) {
        if let Some(r) = &mut self.resync {
            match ev.kind {
                EventKind::AllUnavailable { .. } => r.pending.retain(|(j, _)| *j != ev.jid),
                _ => {
                    r.pending.remove(&(ev.jid.clone(), ev.resource.clone()));
                }
            }
        }
    }

    fn apply(&mut self, ev: &PresenceEvent) {
        self.touch += 1;
        let prev = self.shared.map.get(&ev.jid).map(|e| e.value().clone());
        let clamped;
        let ev = match aggregate::not_before(prev.as_deref(), ev) {
            Some(at) => {
                clamped = PresenceEvent { at, ..ev.clone() };
                &clamped
            }
            None => ev,
        };
        let Some((op, next)) = aggregate::apply(prev.as_deref(), ev, self.touch) else {
            return;
        };
        let next = Arc::new(next);
        let seq = self.shared.seq.load(Ordering::Relaxed) + 1;
        {
            let mut stats = self.shared.stats.write().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = &prev {
                stats.account(p, -1);
            }
            stats.account(&next, 1);
            stats.seq = seq;
            self.metrics.online_users.set(stats.online_users as i64);
            self.metrics
                .online_resources
                .set(stats.online_resources as i64);
        }
        let change = Arc::new(Change {
            seq,
            jid: ev.jid.clone(),
            op,
            presence: next.clone(),
            received_at: ev.received_at,
            encoded: Default::default(),
        });
        for sink in &self.sinks {
            sink.accept(Applied {
                event: ev,
                before: prev.as_deref(),
                change: &change,
            });
        }
        if next.online {
            self.online.insert(ev.jid.clone(), next.clone());
        } else {
            self.online.remove(&ev.jid);
        }
        if self.shared.map.insert(ev.jid.clone(), next).is_none() {
            self.metrics.known_users.set(self.shared.map.len() as i64);
        }
        self.shared.seq.store(seq, Ordering::Release);
        self.metrics.changes.inc();
        self.publish(change);
    }
}

/// A reference map of the live state, rebuilt from a snapshot plus changes (used by tests and
/// by clients that mirror the stream).
pub fn replay(snapshot: &Snapshot, changes: &[Arc<Change>]) -> HashMap<UserJid, Arc<UserPresence>> {
    let mut state: HashMap<UserJid, Arc<UserPresence>> = snapshot
        .iter()
        .map(|u| (u.jid.clone(), u.clone()))
        .collect();
    for c in changes {
        if c.presence.online {
            state.insert(c.jid.clone(), c.presence.clone());
        } else {
            state.remove(&c.jid);
        }
    }
    state
}
