//! The sequencer: one task that applies events in arrival order, stamps each resulting change
//! with the next `seq`, and publishes it to the map, the counters and the hub.
//!
//! Only this task writes presence state, so everything it publishes is consistent with its
//! `seq`; a snapshot is taken *by* this task, between two events, and is therefore exactly the
//! state at its `seq`.

use std::collections::{HashMap, HashSet, VecDeque};
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
use super::replica::{Entry, Gap, Gate, Refused, Role};
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
    /// The epoch to use (a replica continues the cluster's); `None`: a fresh one.
    pub epoch: Option<Arc<str>>,
    /// The seq the state starts at (a replica loaded from a snapshot); 0 for a fresh engine.
    pub seq: u64,
    /// Start as a follower (contract §11): refuse events, apply [`Engine::replicate`].
    pub follower: bool,
    /// A follower keeps this many of the last entries it applied, with the state before
    /// each; on taking over as leader it hands them to its sinks again (the old leader's
    /// writer may have died with them queued; the store writes them idempotently).
    pub takeover_replay: usize,
}

/// Batches a leader may have at its gate, unconfirmed, before it waits for the oldest.
const MAX_INFLIGHT: usize = 32;

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
    Replicate(Vec<Entry>, oneshot::Sender<Result<u64, Gap>>),
    Lead {
        gate: Gate,
        sinks: Vec<Arc<dyn ChangeSink>>,
        reply: oneshot::Sender<u64>,
    },
    Follow(oneshot::Sender<u64>),
    Dump(oneshot::Sender<(u64, Vec<Arc<UserPresence>>)>),
}

/// State shared between the sequencer and readers.
#[derive(Debug)]
struct Shared {
    epoch: Arc<str>,
    role: RwLock<Role>,
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
            epoch,
            seq,
            follower,
            takeover_replay,
        } = opts;
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let epoch = epoch.unwrap_or_else(new_epoch);
        let role = if follower {
            Role::Follower
        } else {
            Role::Single
        };
        let shared = Arc::new(Shared {
            epoch,
            role: RwLock::new(role),
            map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            stats: RwLock::new(Stats::default()),
            seq: AtomicU64::new(seq),
            // The feed holds chunks of up to MAX_CHUNK changes; an eighth of the ring in
            // chunks lets a subscriber fall at least that many changes (and, under load, up
            // to eight times the ring) behind before it must resync.
            hub: Hub::new(cfg.ring_size, (cfg.ring_size / 8).clamp(128, 8192)),
            last_snapshot: std::sync::Mutex::new(None),
        });
        let mut online = OnlineMap::new();
        {
            let mut stats = shared.stats.write().unwrap_or_else(|p| p.into_inner());
            stats.seq = seq;
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
        let touch = seed_touch(&shared);
        let sequencer = Sequencer {
            shared: shared.clone(),
            online,
            touch,
            resync: None,
            sinks,
            leader_sinks: Vec::new(),
            metrics,
            unpublished: Vec::with_capacity(super::hub::MAX_CHUNK),
            mode: if follower {
                Mode::Follower
            } else {
                Mode::Single
            },
            next_seq: seq,
            ahead: HashMap::new(),
            staged: Vec::new(),
            inflight: VecDeque::new(),
            takeover: VecDeque::new(),
            takeover_replay,
        };
        let task = tokio::spawn(sequencer.run(rx));
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

    /// Applies entries sequenced by the leader (a follower only). Entries at or below the
    /// current seq are skipped (a redelivery); the first one past it must be the next seq, or
    /// the whole call fails with the [`Gap`] and nothing after it is applied. Returns the seq
    /// after.
    pub async fn replicate(&self, entries: Vec<Entry>) -> Result<Result<u64, Gap>, EngineClosed> {
        self.ask(|reply| Command::Replicate(entries, reply)).await
    }

    /// Becomes the leader: from now on events are sequenced after the current seq, and each
    /// change is visible once `gate` confirmed it; `sinks` get every change from here on,
    /// after the entries this follower kept for a takeover. Returns the seq it leads from.
    pub async fn lead(
        &self,
        gate: Gate,
        sinks: Vec<Arc<dyn ChangeSink>>,
    ) -> Result<u64, EngineClosed> {
        self.ask(|reply| Command::Lead { gate, sinks, reply }).await
    }

    /// Stops leading: changes the gate has not confirmed are dropped (they will come back
    /// through [`Engine::replicate`] if they did reach the stream), the sinks are let go,
    /// events are refused. Returns the last visible seq.
    pub async fn follow(&self) -> Result<u64, EngineClosed> {
        self.ask(Command::Follow).await
    }

    /// Every user the map knows (online or not) and the seq they are exact at: a replica's
    /// snapshot. O(users) on the sequencer (Arc clones only).
    pub async fn dump(&self) -> Result<(u64, Vec<Arc<UserPresence>>), EngineClosed> {
        self.ask(Command::Dump).await
    }

    /// The engine's current role.
    pub fn role(&self) -> Role {
        *self.shared.role.read().unwrap_or_else(|p| p.into_inner())
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

/// How the sequencer makes a change visible.
enum Mode {
    /// At once (a single bridge).
    Single,
    /// Once the gate confirmed it.
    Leader(Gate),
    /// Never sequences; applies the leader's entries.
    Follower,
}

/// A change sequenced but not yet visible, with what its commit needs.
struct Staged {
    entry: Entry,
    before: Option<Arc<UserPresence>>,
}

type Ack = oneshot::Receiver<Result<(), Refused>>;

struct Sequencer {
    shared: Arc<Shared>,
    /// The online users, kept in step with `shared.map`; snapshots are clones of it.
    online: OnlineMap,
    touch: u64,
    resync: Option<Resync>,
    /// Sinks every change goes to, whatever the role.
    sinks: Vec<Arc<dyn ChangeSink>>,
    /// Sinks only a leader feeds (its store writer, its webhooks): given by
    /// [`Engine::lead`], let go when it stops leading.
    leader_sinks: Vec<Arc<dyn ChangeSink>>,
    metrics: EngineMetrics,
    /// Changes applied but not yet on the hub's feed (see [`Sequencer::publish`]).
    unpublished: Vec<Arc<Change>>,
    mode: Mode,
    /// The seq of the last change sequenced (visible or not).
    next_seq: u64,
    /// A leader's users whose latest state is not visible yet (`None`: erased).
    ahead: HashMap<UserJid, Option<Arc<UserPresence>>>,
    /// A leader's changes not yet handed to the gate.
    staged: Vec<Staged>,
    /// A leader's batches at the gate, oldest first.
    inflight: VecDeque<(Vec<Staged>, Ack)>,
    /// A follower's last entries, for its sinks if it takes over.
    takeover: VecDeque<Staged>,
    takeover_replay: usize,
}

impl Sequencer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            // Changes go to the hub (a leader's: to the gate) in chunks: when the queue is
            // empty (so a lone change is published at once), before any other command (a
            // barrier or snapshot answer never runs ahead of the feed), or at MAX_CHUNK.
            let cmd = match rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.flush().await;
                    match self.next(&mut rx).await {
                        Some(cmd) => cmd,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            if !matches!(cmd, Command::Apply(_)) {
                // Everything sequenced so far is visible (or refused) before the command.
                self.flush().await;
                self.settle().await;
            }
            match cmd {
                Command::Apply(ev) => {
                    if matches!(self.mode, Mode::Follower) {
                        tracing::debug!(jid = %ev.jid, "a follower refuses an event (only the leader sequences)");
                        continue;
                    }
                    self.metrics.events.inc();
                    self.confirm(&ev);
                    self.apply(ev);
                    if self.staged.len() >= super::hub::MAX_CHUNK {
                        self.flush().await;
                    }
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
                    // A leader's erasure happened only once the gate confirmed it.
                    self.flush().await;
                    self.settle().await;
                    let done = known && !self.shared.map.contains_key(&jid);
                    let _ = reply.send(done);
                }
                Command::Replicate(entries, reply) => {
                    let _ = reply.send(self.replicate(entries));
                }
                Command::Lead { gate, sinks, reply } => {
                    self.lead(gate, sinks);
                    let _ = reply.send(self.next_seq);
                }
                Command::Dump(reply) => {
                    let users = self.shared.map.iter().map(|e| e.value().clone()).collect();
                    let _ = reply.send((self.shared.seq.load(Ordering::Acquire), users));
                }
                Command::Follow(reply) => {
                    self.step_down("asked to follow");
                    let _ = reply.send(self.next_seq);
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
                    if matches!(self.mode, Mode::Follower) {
                        continue;
                    }
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
                        self.apply(PresenceEvent {
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
        self.flush().await;
        self.settle().await;
        self.publish_pending();
    }

    /// The next command; a leader commits the batches the gate confirms meanwhile.
    async fn next(&mut self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            let Some((_, ack)) = self.inflight.front_mut() else {
                return rx.recv().await;
            };
            tokio::select! {
                biased;
                r = ack => {
                    self.acked(r.unwrap_or_else(|_| Err(Refused("the cluster publisher has stopped".into()))));
                    // Confirmed changes reach subscribers now, not with the next command.
                    self.publish_pending();
                }
                cmd = rx.recv() => return cmd,
            }
        }
    }

    /// Hands what is staged to the gate (a leader), commits what the gate has confirmed, and
    /// publishes visible changes to the hub.
    async fn flush(&mut self) {
        if let Mode::Leader(gate) = &self.mode
            && !self.staged.is_empty()
        {
            let gate = gate.clone();
            let staged = std::mem::take(&mut self.staged);
            let mut it = staged.into_iter().peekable();
            while it.peek().is_some() {
                let part: Vec<Staged> = it.by_ref().take(super::hub::MAX_CHUNK).collect();
                let batch: Arc<[Entry]> = part.iter().map(|s| s.entry.clone()).collect();
                let ack = gate.submit(batch);
                self.inflight.push_back((part, ack));
            }
        }
        // Confirmed batches, without waiting; past the in-flight bound, wait for the oldest.
        loop {
            let over = self.inflight.len() > MAX_INFLIGHT;
            let Some((_, ack)) = self.inflight.front_mut() else {
                break;
            };
            let r = if over {
                ack.await
                    .unwrap_or_else(|_| Err(Refused("the cluster publisher has stopped".into())))
            } else {
                match ack.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Err(Refused("the cluster publisher has stopped".into()))
                    }
                }
            };
            self.acked(r);
        }
        self.publish_pending();
    }

    /// Waits until every batch at the gate is answered (and committed, or dropped).
    async fn settle(&mut self) {
        while let Some((_, ack)) = self.inflight.front_mut() {
            let r = ack
                .await
                .unwrap_or_else(|_| Err(Refused("the cluster publisher has stopped".into())));
            self.acked(r);
        }
        self.publish_pending();
    }

    /// The gate answered for the oldest batch at it.
    fn acked(&mut self, r: Result<(), Refused>) {
        match r {
            Ok(()) => {
                if let Some((batch, _)) = self.inflight.pop_front() {
                    for s in batch {
                        self.commit(s);
                    }
                }
            }
            Err(why) => self.step_down(&why.0),
        }
    }

    /// Drops every change not yet visible and stops sequencing.
    fn step_down(&mut self, why: &str) {
        let dropped = self.staged.len() + self.inflight.iter().map(|(b, _)| b.len()).sum::<usize>();
        if matches!(self.mode, Mode::Leader(_)) {
            tracing::warn!(
                dropped,
                reason = why,
                "no longer the leader: changes the stream did not confirm are dropped"
            );
        }
        self.staged.clear();
        self.inflight.clear();
        self.ahead.clear();
        self.leader_sinks.clear();
        self.takeover.clear();
        self.next_seq = self.shared.seq.load(Ordering::Acquire);
        self.mode = Mode::Follower;
        self.set_role(Role::Follower);
    }

    fn lead(&mut self, gate: Gate, sinks: Vec<Arc<dyn ChangeSink>>) {
        self.leader_sinks = sinks;
        // What the old leader's writer may not have written: the store writes it again
        // idempotently (an event id is written once).
        let replay = std::mem::take(&mut self.takeover);
        if !replay.is_empty() {
            tracing::info!(
                changes = replay.len(),
                "taking over: the last changes go to the sinks again"
            );
        }
        for s in &replay {
            if let Some(ev) = &s.entry.event {
                for sink in &self.leader_sinks {
                    sink.accept(Applied {
                        event: ev,
                        before: s.before.as_deref(),
                        change: &s.entry.change,
                    });
                }
            }
        }
        self.next_seq = self.shared.seq.load(Ordering::Acquire);
        self.mode = Mode::Leader(gate);
        self.set_role(Role::Leader);
    }

    fn set_role(&self, role: Role) {
        *self.shared.role.write().unwrap_or_else(|p| p.into_inner()) = role;
    }

    fn replicate(&mut self, entries: Vec<Entry>) -> Result<u64, Gap> {
        if !matches!(self.mode, Mode::Follower) {
            // A leader's own changes are already applied; it never reads them back.
            return Ok(self.shared.seq.load(Ordering::Acquire));
        }
        for entry in entries {
            let have = self.shared.seq.load(Ordering::Acquire);
            let seq = entry.change.seq;
            if seq <= have {
                continue;
            }
            if seq != have + 1 {
                self.publish_pending();
                return Err(Gap {
                    expected: have + 1,
                    got: seq,
                });
            }
            for r in &entry.change.presence.resources {
                self.touch = self.touch.max(r.touched);
            }
            let before = self
                .shared
                .map
                .get(&entry.change.jid)
                .map(|e| e.value().clone());
            self.commit(Staged { entry, before });
        }
        self.next_seq = self.shared.seq.load(Ordering::Acquire);
        self.publish_pending();
        Ok(self.next_seq)
    }

    /// Queues a change for the hub; see `run` for when the queue is published.
    fn publish(&mut self, change: Arc<Change>) {
        self.unpublished.push(change);
        if self.unpublished.len() >= super::hub::MAX_CHUNK {
            self.publish_pending();
        }
    }

    fn publish_pending(&mut self) {
        if !self.unpublished.is_empty() {
            let chunk = std::mem::replace(
                &mut self.unpublished,
                Vec::with_capacity(super::hub::MAX_CHUNK),
            );
            self.shared.hub.publish(chunk);
        }
    }

    /// The user's latest state as the sequencer knows it (a leader: possibly not visible yet).
    fn current(&self, jid: &UserJid) -> Option<Arc<UserPresence>> {
        match self.ahead.get(jid) {
            Some(latest) => latest.clone(),
            None => self.shared.map.get(jid).map(|e| e.value().clone()),
        }
    }

    /// Sequences one change: visible at once (single), or staged for the gate (leader).
    fn stage(&mut self, s: Staged) {
        match self.mode {
            Mode::Single => self.commit(s),
            Mode::Leader(_) => {
                let latest = (!s.entry.is_erasure()).then(|| s.entry.change.presence.clone());
                self.ahead.insert(s.entry.change.jid.clone(), latest);
                self.staged.push(s);
            }
            Mode::Follower => {}
        }
    }

    fn forget(&mut self, jid: &UserJid) -> bool {
        if let Some(r) = &mut self.resync {
            r.pending.retain(|(j, _)| j != jid);
        }
        let Some(prev) = self.current(jid) else {
            return false;
        };
        // A single bridge tells subscribers only if the user was online; replicas must all
        // hear of every erasure, so a leader always sends one.
        if !prev.online && matches!(self.mode, Mode::Single) {
            self.shared.map.remove(jid);
            self.metrics.known_users.set(self.shared.map.len() as i64);
            return true;
        }
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
        self.next_seq += 1;
        let change = Arc::new(Change {
            seq: self.next_seq,
            jid: jid.clone(),
            op: super::model::Op::Offline,
            presence: gone,
            received_at: now,
            encoded: Default::default(),
        });
        self.stage(Staged {
            entry: Entry {
                change,
                event: None,
            },
            before: Some(prev),
        });
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

    fn apply(&mut self, ev: PresenceEvent) {
        self.touch += 1;
        let prev = self.current(&ev.jid);
        let ev = match aggregate::not_before(prev.as_deref(), &ev) {
            Some(at) => PresenceEvent { at, ..ev },
            None => ev,
        };
        let Some((op, next)) = aggregate::apply(prev.as_deref(), &ev, self.touch) else {
            return;
        };
        self.next_seq += 1;
        let change = Arc::new(Change {
            seq: self.next_seq,
            jid: ev.jid.clone(),
            op,
            presence: Arc::new(next),
            received_at: ev.received_at,
            encoded: Default::default(),
        });
        self.stage(Staged {
            entry: Entry {
                change,
                event: Some(Arc::new(ev)),
            },
            before: prev,
        });
    }

    /// Makes one change visible: counters, sinks, map, seq, hub.
    fn commit(&mut self, s: Staged) {
        let Staged { entry, before } = s;
        let change = &entry.change;
        let seq = change.seq;
        let erase = entry.is_erasure();
        {
            let mut stats = self.shared.stats.write().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = &before {
                stats.account(p, -1);
            }
            if !erase {
                stats.account(&change.presence, 1);
            }
            stats.seq = seq;
            self.metrics.online_users.set(stats.online_users as i64);
            self.metrics
                .online_resources
                .set(stats.online_resources as i64);
        }
        if let Some(ev) = &entry.event {
            for sink in self.sinks.iter().chain(&self.leader_sinks) {
                sink.accept(Applied {
                    event: ev,
                    before: before.as_deref(),
                    change,
                });
            }
        }
        if change.presence.online && !erase {
            self.online
                .insert(change.jid.clone(), change.presence.clone());
        } else {
            self.online.remove(&change.jid);
        }
        if erase {
            self.shared.map.remove(&change.jid);
            self.metrics.known_users.set(self.shared.map.len() as i64);
        } else if self
            .shared
            .map
            .insert(change.jid.clone(), change.presence.clone())
            .is_none()
        {
            self.metrics.known_users.set(self.shared.map.len() as i64);
        }
        if let Some(latest) = self.ahead.get(&change.jid) {
            let same = match latest {
                Some(p) => !erase && Arc::ptr_eq(p, &change.presence),
                None => erase,
            };
            if same {
                self.ahead.remove(&change.jid);
            }
        }
        self.shared.seq.store(seq, Ordering::Release);
        self.metrics.changes.inc();
        let change = change.clone();
        if matches!(self.mode, Mode::Follower) && self.takeover_replay > 0 {
            if self.takeover.len() >= self.takeover_replay {
                self.takeover.pop_front();
            }
            self.takeover.push_back(Staged { entry, before });
        }
        self.publish(change);
    }
}

/// A fresh epoch: 64 random bits in hex.
pub fn new_epoch() -> Arc<str> {
    Arc::from(format!(
        "{:016x}",
        (new_event_id() >> 64) as u64 ^ rand::random::<u64>()
    ))
}

/// The tie-break counter continues above every resource the seed carries.
fn seed_touch(shared: &Shared) -> u64 {
    shared
        .map
        .iter()
        .flat_map(|e| {
            e.value()
                .resources
                .iter()
                .map(|r| r.touched)
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
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
