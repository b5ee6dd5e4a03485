//! Persistence: presence history, sessions and last-seen in Postgres, with an on-disk spool so
//! that nothing is lost while Postgres is down.
//!
//! Data flow: the sequencer pushes one [`StoredEvent`] per resource-level change into the
//! [`StoreSink`] (a mutex-guarded queue: never blocks, never drops, keeps order). The writer
//! task ([`writer`]) takes batches (by size or time), and writes each in one transaction:
//! events by binary COPY, sessions opened/closed, last-seen upserted once per user. When
//! Postgres fails, is slower than `store.write_timeout_secs`, or the queue is past
//! `store.queue_capacity`, the batch goes to the [`spool`] instead; once Postgres answers again
//! the spool is replayed in order (idempotently) before new batches.

pub mod memory;
pub mod pg;
pub mod reads;
pub mod rollup;
pub mod spool;
pub mod writer;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prometheus::{Histogram, IntCounter, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::StoreConfig;
use crate::presence::{Applied, Cause, ChangeSink, EventKind, Show, UserPresence};
use crate::telemetry;

/// A store failure. Messages never contain the connection string.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL does not parse.
    #[error("store.postgres_url is not a valid Postgres connection string: {0}")]
    Url(String),
    /// No connection could be had.
    #[error("cannot connect to Postgres: {0}")]
    Connect(String),
    /// A query failed.
    #[error("Postgres query failed: {}", pg::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] refinery::Error),
    /// A write did not finish within `store.write_timeout_secs`.
    #[error("write took longer than store.write_timeout_secs")]
    Timeout,
    /// The spool directory is unusable.
    #[error("invalid config: store.spool_dir: {path}: {source}")]
    Spool {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A history cursor that this bridge did not issue.
    #[error("invalid cursor")]
    BadCursor,
    /// A rollup could not be built or read.
    #[error("rollup: {0}")]
    Rollup(String),
}

impl StoreError {
    /// True for errors in the configuration (exit code 2), as opposed to runtime failures.
    pub fn is_config(&self) -> bool {
        matches!(self, StoreError::Url(_) | StoreError::Spool { .. })
    }
}

/// What [`open`] found in Postgres about the previous run.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Known users (last-seen rows with their open sessions): the engine's seed.
    pub known: Vec<UserPresence>,
    /// When the previous run stopped (presence was last known to be current).
    pub stopped_at: Option<DateTime<Utc>>,
}

/// Opens the configured Postgres store: pool, migrations, what the previous run left, and the
/// writer task. Postgres being down is not an error (the writer spools and migrates once it is
/// back); an unusable URL or spool directory is.
pub async fn open(
    cfg: &StoreConfig,
    url: &str,
    metrics: StoreMetrics,
) -> Result<(StoreHandle, JoinHandle<()>, Recovered), StoreError> {
    let pool = pg::pool(url, cfg.pool_size, cfg.connect_timeout_secs)?;
    let mut recovered = Recovered::default();
    match pg::migrate(&pool).await {
        Ok(applied) => {
            if !applied.is_empty() {
                tracing::info!(?applied, "store: migrations applied");
            }
            match reads::load_known(&pool).await {
                Ok(users) => {
                    tracing::info!(
                        users = users.len(),
                        online = users.iter().filter(|u| u.online).count(),
                        "store: known users loaded; they will be probed"
                    );
                    recovered.known = users;
                }
                Err(e) => tracing::warn!(error = %e, "store: cannot load known users"),
            }
            if let Ok(c) = pg::client(&pool).await
                && let Ok(Some(t)) = pg::get_state(&c, "stopped_at").await
            {
                recovered.stopped_at = DateTime::parse_from_rfc3339(&t)
                    .ok()
                    .map(|t| t.with_timezone(&Utc));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "store: Postgres not usable at start-up; events are spooled until it is")
        }
    }
    let (handle, task) = writer::start(cfg, pool, metrics)?;
    Ok((handle, task, recovered))
}

/// One resource-level presence event as stored (history row + what the writer needs for
/// sessions and last-seen). Also the spool's record format (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Unique event id (a UUID's 128 bits).
    pub id: u128,
    /// Bare JID.
    pub jid: String,
    /// Resource.
    pub resource: String,
    /// `true` = available, `false` = unavailable.
    pub available: bool,
    /// The resource's show (available only).
    pub show: Option<Show>,
    /// Status text.
    pub status: Option<String>,
    /// Priority (available only).
    pub priority: Option<i8>,
    /// Client name.
    pub client: Option<String>,
    /// XEP-0319 idle since.
    pub idle_since: Option<DateTime<Utc>>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// When the bridge read it.
    pub received_at: DateTime<Utc>,
    /// Why.
    pub cause: Cause,
    /// This event brought the resource online (opens a session).
    pub opened: bool,
    /// This event took the resource offline (closes its session).
    pub closed: bool,
    /// The server's reason for a session end it generated (e.g. `socket_closed`): recorded as
    /// the session's `end_reason`. Absent in spools written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// The user's aggregate after the event (for last-seen).
    pub user: UserAfter,
}

/// The user-level state after an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAfter {
    /// Any resource online.
    pub online: bool,
    /// Since when.
    pub online_since: Option<DateTime<Utc>>,
    /// When the last resource left (offline only).
    pub last_seen: Option<DateTime<Utc>>,
    /// Aggregate show.
    pub show: Show,
    /// Aggregate status.
    pub status: Option<String>,
}

/// Where the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// No Postgres configured.
    Memory,
    /// Writing to Postgres.
    Ok,
    /// Postgres unreachable, slow or overloaded: batches go to the spool.
    Spooling,
}

/// Store health, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStatus {
    /// Mode.
    pub mode: StoreMode,
    /// Events waiting in the spool.
    pub spooled_events: u64,
    /// When the oldest spooled batch was spooled.
    pub oldest_spooled_at: Option<DateTime<Utc>>,
    /// The last error talking to Postgres (no secrets).
    pub last_error: Option<String>,
}

/// The store's metrics, updated where the thing happens (sink push/take, writer, spool).
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Events waiting for the writer (pushed by the sequencer, taken by the writer).
    pub queue_depth: IntGauge,
    /// Events written to Postgres (direct or replayed).
    pub events_written: IntCounter,
    /// Events appended to the spool.
    pub events_spooled: IntCounter,
    /// Events replayed from the spool.
    pub events_replayed: IntCounter,
    /// Spool records skipped as torn/corrupt.
    pub spool_records_skipped: IntCounter,
    /// Events waiting in the spool.
    pub spooled: IntGauge,
    /// 1 while batches go to the spool.
    pub spooling: IntGauge,
    /// Events per batch written.
    pub batch_events: Histogram,
    /// Seconds per batch written.
    pub batch_seconds: Histogram,
}

impl StoreMetrics {
    /// Registers the store's metrics in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            queue_depth: telemetry::gauge(
                r,
                "presence_bridge_store_queue_depth",
                "Events waiting for the store writer",
            ),
            events_written: telemetry::counter(
                r,
                "presence_bridge_store_events_written_total",
                "Events written to Postgres",
            ),
            events_spooled: telemetry::counter(
                r,
                "presence_bridge_store_events_spooled_total",
                "Events appended to the spool",
            ),
            events_replayed: telemetry::counter(
                r,
                "presence_bridge_store_events_replayed_total",
                "Events replayed from the spool",
            ),
            spool_records_skipped: telemetry::counter(
                r,
                "presence_bridge_store_spool_records_skipped_total",
                "Torn or corrupt spool records skipped",
            ),
            spooled: telemetry::gauge(
                r,
                "presence_bridge_store_spooled_events",
                "Events waiting in the spool",
            ),
            spooling: telemetry::gauge(
                r,
                "presence_bridge_store_spooling",
                "1 while batches go to the spool",
            ),
            batch_events: telemetry::histogram(
                r,
                "presence_bridge_store_batch_events",
                "Events per batch written",
                &[
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
                ],
            ),
            batch_seconds: telemetry::histogram(
                r,
                "presence_bridge_store_batch_write_seconds",
                "Batch write latency",
                &telemetry::LATENCY_BUCKETS,
            ),
        }
    }
}

impl Default for StoreMetrics {
    /// Metrics in a private registry nobody renders (unit tests, benchmarks).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

/// The sequencer's end of the writer queue. Never blocks, never drops, keeps order.
#[derive(Debug, Clone)]
pub struct StoreSink {
    inner: Arc<SinkInner>,
}

#[derive(Debug)]
struct SinkInner {
    /// A std `Mutex`: the sequencer holds it for a push, the writer for a drain; never across
    /// an `.await`.
    queue: Mutex<VecDeque<StoredEvent>>,
    notify: Notify,
    /// The queue's length, readable without the lock (also the exported gauge).
    depth: IntGauge,
    /// Cancelled by [`StoreSink::close`]; wakes the writer out of a batch window at once.
    closed: CancellationToken,
    /// Events ever pushed, and ever settled by the writer (committed or spooled): an event
    /// pushed when `pushed` was N is settled once `settled` reaches N.
    pushed: std::sync::atomic::AtomicU64,
    settled: std::sync::atomic::AtomicU64,
    settled_notify: Notify,
}

impl StoreSink {
    /// A new, empty queue whose depth is the `presence_bridge_store_queue_depth` gauge.
    pub fn new(metrics: &StoreMetrics) -> StoreSink {
        StoreSink {
            inner: Arc::new(SinkInner {
                queue: Mutex::new(VecDeque::new()),
                notify: Notify::new(),
                depth: metrics.queue_depth.clone(),
                closed: CancellationToken::new(),
                pushed: Default::default(),
                settled: Default::default(),
                settled_notify: Notify::new(),
            }),
        }
    }

    /// Queues events (called by the sequencer).
    pub fn push(&self, events: impl IntoIterator<Item = StoredEvent>) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let before = q.len();
        q.extend(events);
        let added = q.len() - before;
        self.inner
            .pushed
            .fetch_add(added as u64, std::sync::atomic::Ordering::AcqRel);
        drop(q);
        if added > 0 {
            self.inner.depth.add(added as i64);
            self.inner.notify.notify_one();
        }
    }

    /// How many events were ever pushed: a mark for [`StoreSink::settled_through`].
    pub fn pushed(&self) -> u64 {
        self.inner.pushed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The writer settled (committed to Postgres or spooled) `n` more events.
    fn settle(&self, n: u64) {
        self.inner
            .settled
            .fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        self.inner.settled_notify.notify_waiters();
    }

    /// Waits until every event pushed before `mark` was taken is settled; `false` on timeout.
    pub async fn settled_through(&self, mark: u64, timeout: std::time::Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.settled_notify.notified();
                if self
                    .inner
                    .settled
                    .load(std::sync::atomic::Ordering::Acquire)
                    >= mark
                {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Events waiting for the writer.
    pub fn depth(&self) -> u64 {
        self.inner.depth.get().max(0) as u64
    }

    fn take(&self, max: usize) -> Vec<StoredEvent> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(max);
        let out: Vec<_> = q.drain(..n).collect();
        drop(q);
        self.inner.depth.sub(out.len() as i64);
        out
    }

    /// No more events will come: the writer drains the queue and stops.
    pub fn close(&self) {
        self.inner.closed.cancel();
        self.inner.notify.notify_one();
    }

    /// Puts a batch back at the front (when neither Postgres nor the spool took it).
    fn requeue_front(&self, batch: Vec<StoredEvent>) {
        let n = batch.len();
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        for e in batch.into_iter().rev() {
            q.push_front(e);
        }
        drop(q);
        self.inner.depth.add(n as i64);
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Resolves once the sink is closed.
    async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }
}

impl ChangeSink for StoreSink {
    fn accept(&self, a: Applied<'_>) {
        self.push(stored_events(a.event, a.before, &a.change.presence));
    }
}

/// The store's view of one applied event: one record per resource that changed (an
/// "all resources gone" error becomes one unavailable per resource that was online).
pub fn stored_events(
    ev: &crate::presence::PresenceEvent,
    prev: Option<&UserPresence>,
    next: &UserPresence,
) -> Vec<StoredEvent> {
    let user = UserAfter {
        online: next.online,
        online_since: next.online_since,
        last_seen: next.last_seen,
        show: next.show,
        status: next.status.clone(),
    };
    let had = |r: &str| prev.is_some_and(|p| p.resources.iter().any(|x| x.resource == r));
    let base = |resource: &str, id: u128| StoredEvent {
        id,
        jid: ev.jid.to_string(),
        resource: resource.to_owned(),
        available: false,
        show: None,
        status: None,
        priority: None,
        client: None,
        idle_since: None,
        at: ev.at,
        received_at: ev.received_at,
        cause: ev.cause,
        opened: false,
        closed: false,
        end_reason: None,
        user: user.clone(),
    };
    match &ev.kind {
        EventKind::Available(a) | EventKind::Present(a) => vec![StoredEvent {
            available: true,
            show: Some(a.show),
            status: a.status.clone(),
            priority: Some(a.priority),
            client: a.client.clone(),
            idle_since: a.idle_since,
            opened: !had(&ev.resource),
            ..base(&ev.resource, ev.id)
        }],
        EventKind::Unavailable { status, reason } => vec![StoredEvent {
            status: status.clone(),
            closed: true,
            end_reason: reason.clone(),
            ..base(&ev.resource, ev.id)
        }],
        EventKind::AllUnavailable { status } => prev
            .map(|p| p.resources.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, r)| StoredEvent {
                status: status.clone(),
                closed: true,
                // Derived ids stay unique: the low bits of an event id are random.
                ..base(&r.resource, ev.id ^ (i as u128 + 1))
            })
            .collect(),
    }
}

/// Handle to the running store: status, metrics, the read pool, and the writer's stop.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    status: watch::Receiver<StoreStatus>,
    metrics: StoreMetrics,
    sink: StoreSink,
    pool: Pool,
}

impl StoreHandle {
    /// The current status.
    pub fn status(&self) -> StoreStatus {
        self.status.borrow().clone()
    }
    /// A receiver for status changes.
    pub fn watch(&self) -> watch::Receiver<StoreStatus> {
        self.status.clone()
    }
    /// The store's metrics.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
    /// The Postgres pool, for reads.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
    /// The sequencer's end of the writer queue (an engine sink).
    pub fn sink(&self) -> &StoreSink {
        &self.sink
    }
    /// Queue depth.
    pub fn queue_depth(&self) -> u64 {
        self.sink.depth()
    }
    /// Tells the writer that no more events will come (it drains the queue, then stops).
    pub fn close(&self) {
        self.sink.close();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    /// `n` alternating available/unavailable events for a few users, ids from `base`.
    pub(crate) fn sample_events(n: usize, base: u128) -> Vec<StoredEvent> {
        (0..n)
            .map(|i| {
                let at = Utc
                    .timestamp_opt(1_790_000_000 + i as i64, 0)
                    .single()
                    .unwrap_or_default();
                let available = i % 2 == 0;
                StoredEvent {
                    id: base + i as u128,
                    jid: format!("user{}@localhost", i % 7),
                    resource: "r".into(),
                    available,
                    show: available.then_some(Show::Away),
                    status: Some(format!("status {i}")),
                    priority: available.then_some(1),
                    client: None,
                    idle_since: None,
                    at,
                    received_at: at,
                    cause: Cause::Stanza,
                    opened: available,
                    closed: !available,
                    end_reason: None,
                    user: UserAfter {
                        online: available,
                        online_since: available.then_some(at),
                        last_seen: (!available).then_some(at),
                        show: if available { Show::Away } else { Show::Offline },
                        status: Some(format!("status {i}")),
                    },
                }
            })
            .collect()
    }

    #[test]
    fn sink_keeps_order_and_depth() {
        let s = StoreSink::new(&StoreMetrics::default());
        s.push(sample_events(5, 0));
        s.push(sample_events(3, 100));
        assert_eq!(s.depth(), 8);
        let a = s.take(6);
        assert_eq!(
            a.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 100]
        );
        assert_eq!(s.depth(), 2);
        assert_eq!(s.take(10).len(), 2);
        assert_eq!(s.depth(), 0);
    }
}
