//! The change hub: a ring of recent changes (for `since=` resume) and a broadcast feed with lag
//! detection.
//!
//! The sequencer is the only writer. Readers never block it: the ring lock is held for a push
//! or a copy of a range of `Arc`s, and the broadcast channel drops the oldest entries for a
//! receiver that falls behind, which that receiver sees as [`Lagged`] and answers with a
//! resync.
//!
//! The feed carries *chunks* of changes (whatever the sequencer applied since it last found
//! its queue empty, at most [`MAX_CHUNK`]): with a thousand subscribers each broadcast
//! receive, and each reference count it touches, is paid per chunk rather than per change.
//! A subscriber reads the changes of a chunk by reference ([`Subscription::take_ready`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::model::Change;

/// The most changes the sequencer gathers before it publishes them: at 20,000 changes/s a
/// chunk waits at most ~3 ms.
pub const MAX_CHUNK: usize = 64;

/// The subscriber fell behind by more than the feed's buffer; it must resync from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscriber lagged behind by {0} changes")]
pub struct Lagged(pub u64);

/// A chunk of consecutive changes, in seq order.
type Chunk = Arc<[Arc<Change>]>;

/// See the module docs.
#[derive(Debug)]
pub struct Hub {
    /// Recent changes, oldest first. A std `Mutex`: critical sections are tiny and never
    /// cross an `.await`.
    ring: Mutex<VecDeque<Arc<Change>>>,
    ring_size: usize,
    feed: broadcast::Sender<Chunk>,
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
    /// A hub keeping `ring_size` recent changes; each subscriber may fall `feed_size`
    /// chunks behind.
    pub fn new(ring_size: usize, feed_size: usize) -> Self {
        let (feed, _) = broadcast::channel(feed_size.max(1));
        Self {
            ring: Mutex::new(VecDeque::with_capacity(ring_size.min(1 << 16))),
            ring_size,
            feed,
        }
    }

    /// Called by the sequencer only, with consecutive changes in seq order.
    pub(crate) fn publish(&self, changes: Vec<Arc<Change>>) {
        if changes.is_empty() {
            return;
        }
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            for c in &changes {
                if ring.len() == self.ring_size {
                    ring.pop_front();
                }
                ring.push_back(c.clone());
            }
        }
        // No receivers is fine.
        let _ = self.feed.send(changes.into());
    }

    /// Subscribes to changes published from now on. Subscribe *before* taking a snapshot or
    /// reading the ring, then drop feed entries with `seq <=` what the snapshot covered.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.feed.subscribe(),
            after: 0,
            chunk: None,
            pos: 0,
        }
    }

    /// The changes after `seq`, if the ring still has all of them. `current` is the engine's
    /// latest seq (a seq in the future is not resumable either). Changes the sequencer has
    /// applied but not yet published are not in the ring yet: they come on the feed.
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
    rx: broadcast::Receiver<Chunk>,
    /// Changes with `seq <= after` are already covered (by a snapshot or replay) and skipped.
    after: u64,
    /// The chunk being read, and the position of its next change.
    chunk: Option<Chunk>,
    pos: usize,
}

impl Subscription {
    /// Skips every change with `seq <= seq` from now on.
    pub fn skip_through(&mut self, seq: u64) {
        self.after = self.after.max(seq);
    }

    /// True when the current chunk has a change not covered yet (skipping those that are).
    fn has_unseen(&mut self) -> bool {
        if let Some(chunk) = &self.chunk {
            while self.pos < chunk.len() && chunk[self.pos].seq <= self.after {
                self.pos += 1;
            }
            if self.pos < chunk.len() {
                return true;
            }
        }
        self.chunk = None;
        false
    }

    /// Waits until a change is ready for [`Subscription::take_ready`]. `Ok(false)` when the
    /// hub is gone. Cancel-safe: what it received stays in the subscription.
    pub async fn wait(&mut self) -> Result<bool, Lagged> {
        loop {
            if self.has_unseen() {
                return Ok(true);
            }
            match self.rx.recv().await {
                Ok(chunk) => {
                    self.chunk = Some(chunk);
                    self.pos = 0;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Ok(false),
            }
        }
    }

    /// Hands up to `max` changes that are ready, in seq order, to `f` by reference, without
    /// waiting; returns how many.
    pub fn take_ready(
        &mut self,
        max: usize,
        mut f: impl FnMut(&Arc<Change>),
    ) -> Result<usize, Lagged> {
        let mut n = 0;
        while n < max {
            if !self.has_unseen() {
                match self.rx.try_recv() {
                    Ok(chunk) => {
                        self.chunk = Some(chunk);
                        self.pos = 0;
                        continue;
                    }
                    Err(broadcast::error::TryRecvError::Lagged(k)) => return Err(Lagged(k)),
                    Err(_) => break,
                }
            }
            let Some(c) = self.chunk.as_ref().and_then(|ch| ch.get(self.pos)) else {
                break;
            };
            self.pos += 1;
            self.after = c.seq;
            f(c);
            n += 1;
        }
        Ok(n)
    }

    /// The next change, waiting for one. `Ok(None)` when the hub is gone.
    pub async fn recv(&mut self) -> Result<Option<Arc<Change>>, Lagged> {
        if !self.wait().await? {
            return Ok(None);
        }
        let mut got = None;
        self.take_ready(1, |c| got = Some(c.clone()))?;
        Ok(got)
    }

    /// Everything already waiting (up to `max`), without blocking.
    pub fn drain_ready(&mut self, out: &mut Vec<Arc<Change>>, max: usize) -> Result<(), Lagged> {
        let room = max.saturating_sub(out.len());
        self.take_ready(room, |c| out.push(c.clone())).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Op, Show, UserJid, UserPresence};
    use chrono::Utc;

    fn change(seq: u64) -> Arc<Change> {
        let jid = UserJid::parse(&format!("u{seq}@x.test")).unwrap();
        let now = Utc::now();
        Arc::new(Change {
            seq,
            jid: jid.clone(),
            op: Op::Online,
            presence: Arc::new(UserPresence {
                jid,
                online: true,
                show: Show::Chat,
                status: None,
                priority: 0,
                online_since: Some(now),
                last_change: now,
                last_seen: None,
                resources: Vec::new(),
            }),
            received_at: now,
            encoded: Default::default(),
        })
    }

    fn chunk(seqs: std::ops::RangeInclusive<u64>) -> Vec<Arc<Change>> {
        seqs.map(change).collect()
    }

    fn take(sub: &mut Subscription, max: usize) -> Result<Vec<u64>, Lagged> {
        let mut out = Vec::new();
        sub.take_ready(max, |c| out.push(c.seq))?;
        Ok(out)
    }

    #[tokio::test]
    async fn chunks_are_read_in_order_across_boundaries_up_to_max() {
        let hub = Hub::new(100, 16);
        let mut sub = hub.subscribe();
        hub.publish(chunk(1..=3));
        hub.publish(Vec::new());
        hub.publish(chunk(4..=8));
        assert!(sub.wait().await.unwrap());
        assert_eq!(take(&mut sub, 2).unwrap(), vec![1, 2]);
        assert_eq!(take(&mut sub, 4).unwrap(), vec![3, 4, 5, 6]);
        assert_eq!(take(&mut sub, 100).unwrap(), vec![7, 8]);
        assert_eq!(take(&mut sub, 100).unwrap(), Vec::<u64>::new());
        // recv and drain_ready over the same chunks.
        hub.publish(chunk(9..=12));
        assert_eq!(sub.recv().await.unwrap().unwrap().seq, 9);
        let mut v = Vec::new();
        sub.drain_ready(&mut v, 2).unwrap();
        assert_eq!(v.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![10, 11]);
        // The ring has them all, chunk by chunk.
        match hub.since(5, 12) {
            Resume::Changes(c) => {
                assert_eq!(
                    c.iter().map(|c| c.seq).collect::<Vec<_>>(),
                    (6..=12).collect::<Vec<_>>()
                )
            }
            Resume::TooOld => panic!("in the ring"),
        }
    }

    #[tokio::test]
    async fn covered_changes_are_skipped_even_inside_a_chunk() {
        let hub = Hub::new(100, 16);
        let mut sub = hub.subscribe();
        hub.publish(chunk(1..=5));
        hub.publish(chunk(6..=7));
        // A snapshot at seq 6 covers the first chunk and half of the second.
        sub.skip_through(6);
        assert!(sub.wait().await.unwrap());
        assert_eq!(take(&mut sub, 100).unwrap(), vec![7]);
        // Nothing left: wait blocks until the next chunk.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), sub.wait()).await;
        assert!(pending.is_err(), "nothing to read");
        hub.publish(chunk(8..=8));
        assert!(sub.wait().await.unwrap());
        assert_eq!(take(&mut sub, 100).unwrap(), vec![8]);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_a_feed_behind_lags_and_a_closed_hub_ends() {
        let hub = Hub::new(100, 4);
        let mut sub = hub.subscribe();
        for i in 0..6 {
            hub.publish(chunk(i * 2 + 1..=i * 2 + 2));
        }
        // Six chunks into a feed of four: the two oldest are gone (counted in chunks).
        assert_eq!(sub.wait().await, Err(Lagged(2)));
        let mut fresh = hub.subscribe();
        drop(hub);
        assert!(!fresh.wait().await.unwrap());
        assert!(fresh.recv().await.unwrap().is_none());
    }
}
