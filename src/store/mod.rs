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

pub mod pg;
pub mod reads;
pub mod spool;
pub mod writer;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::presence::{Cause, Show};

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

/// Writer counters (monotonic) and gauges.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Events written to Postgres (direct or replayed).
    pub events_written: AtomicU64,
    /// Batches written.
    pub batches_written: AtomicU64,
    /// Events appended to the spool.
    pub events_spooled: AtomicU64,
    /// Events replayed from the spool.
    pub events_replayed: AtomicU64,
    /// Spool records skipped as torn/corrupt.
    pub spool_records_skipped: AtomicU64,
    /// Sum of batch write latencies in microseconds (with `batches_written`: the mean).
    pub write_micros: AtomicU64,
    /// Histograms the API's metrics registry installs: (events per batch, seconds per batch).
    pub batch_histograms: std::sync::OnceLock<(prometheus::Histogram, prometheus::Histogram)>,
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
    depth: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

impl StoreSink {
    /// A new, empty queue.
    pub fn new() -> StoreSink {
        StoreSink {
            inner: Arc::new(SinkInner {
                queue: Mutex::new(VecDeque::new()),
                notify: Notify::new(),
                depth: AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Queues events (called by the sequencer).
    pub fn push(&self, events: impl IntoIterator<Item = StoredEvent>) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let before = q.len();
        q.extend(events);
        let added = q.len() - before;
        drop(q);
        if added > 0 {
            self.inner.depth.fetch_add(added as u64, Ordering::Relaxed);
            self.inner.notify.notify_one();
        }
    }

    /// Events waiting for the writer.
    pub fn depth(&self) -> u64 {
        self.inner.depth.load(Ordering::Relaxed)
    }

    fn take(&self, max: usize) -> Vec<StoredEvent> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(max);
        let out: Vec<_> = q.drain(..n).collect();
        drop(q);
        self.inner
            .depth
            .fetch_sub(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// No more events will come: the writer drains the queue and stops.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
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
        self.inner.depth.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl Default for StoreSink {
    fn default() -> Self {
        Self::new()
    }
}

/// Handle to the store: status, counters, and a flush barrier.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    status: watch::Receiver<StoreStatus>,
    counters: Arc<StoreCounters>,
    sink: StoreSink,
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
    /// Counters.
    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
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
        let s = StoreSink::new();
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
