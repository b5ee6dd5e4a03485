//! The change hub: a ring of recent changes (for `since=` resume) and a broadcast feed with lag
//! detection.
//!
//! The sequencer is the only writer. Readers never block it: the ring lock is held for a push
//! or a copy of a range of `Arc`s, and the broadcast channel drops the oldest entries for a
//! receiver that falls behind, which that receiver sees as [`Lagged`] and answers with a
//! resync.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::model::Change;

/// The subscriber fell behind by more than the feed's buffer; it must resync from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscriber lagged behind by {0} changes")]
pub struct Lagged(pub u64);

/// See the module docs.
#[derive(Debug)]
pub struct Hub {
    /// Recent changes, oldest first. A std `Mutex`: critical sections are tiny and never
    /// cross an `.await`.
    ring: Mutex<VecDeque<Arc<Change>>>,
    ring_size: usize,
    feed: broadcast::Sender<Arc<Change>>,
}

/// What a resume request gets.
#[derive(Debug)]
pub enum Resume {
    /// The missed changes (possibly none), in seq order.
    Changes(Vec<Arc<Change>>),
    /// The requested seq is no longer (or not yet) covered: take a snapshot.
    TooOld,
}

impl Hub {
    /// A hub keeping `ring_size` recent changes; each subscriber may fall `feed_size` behind.
    pub fn new(ring_size: usize, feed_size: usize) -> Self {
        let (feed, _) = broadcast::channel(feed_size.max(1));
        Self {
            ring: Mutex::new(VecDeque::with_capacity(ring_size.min(1 << 16))),
            ring_size,
            feed,
        }
    }

    /// Called by the sequencer only, in seq order.
    pub(crate) fn publish(&self, change: Arc<Change>) {
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == self.ring_size {
                ring.pop_front();
            }
            ring.push_back(change.clone());
        }
        // No receivers is fine.
        let _ = self.feed.send(change);
    }

    /// Subscribes to changes published from now on. Subscribe *before* taking a snapshot or
    /// reading the ring, then drop feed entries with `seq <=` what the snapshot covered.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.feed.subscribe(),
            after: 0,
        }
    }

    /// The changes after `seq`, if the ring still has all of them. `current` is the engine's
    /// latest seq (a seq in the future is not resumable either).
    pub fn since(&self, seq: u64, current: u64) -> Resume {
        if seq > current {
            return Resume::TooOld;
        }
        if seq == current {
            return Resume::Changes(Vec::new());
        }
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        match ring.front() {
            Some(first) if first.seq <= seq + 1 => {
                let skip = (seq + 1 - first.seq) as usize;
                Resume::Changes(ring.iter().skip(skip).cloned().collect())
            }
            _ => Resume::TooOld,
        }
    }

    /// Number of live subscribers.
    pub fn subscribers(&self) -> usize {
        self.feed.receiver_count()
    }
}

/// A subscriber's view of the feed.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Change>>,
    /// Changes with `seq <= after` are already covered (by a snapshot or replay) and skipped.
    after: u64,
}

impl Subscription {
    /// Skips every change with `seq <= seq` from now on.
    pub fn skip_through(&mut self, seq: u64) {
        self.after = self.after.max(seq);
    }

    /// The next change, waiting for one. `Ok(None)` when the hub is gone.
    pub async fn recv(&mut self) -> Result<Option<Arc<Change>>, Lagged> {
        loop {
            match self.rx.recv().await {
                Ok(c) if c.seq <= self.after => continue,
                Ok(c) => {
                    self.after = c.seq;
                    return Ok(Some(c));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Everything already waiting, without blocking (for batching into one frame).
    pub fn drain_ready(&mut self, out: &mut Vec<Arc<Change>>, max: usize) -> Result<(), Lagged> {
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(c) if c.seq <= self.after => continue,
                Ok(c) => {
                    self.after = c.seq;
                    out.push(c);
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => return Err(Lagged(n)),
                Err(_) => break,
            }
        }
        Ok(())
    }
}
