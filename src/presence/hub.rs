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
//!
//! A subscriber interested in a few users or domains takes a [`Routed`] feed instead: the
//! sequencer puts each change into the queues of the subscribers routed to its JID or its
//! domain (two hash lookups per change, whatever the number of subscribers), so such a
//! subscriber wakes only for its own users, not for every chunk.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

use super::model::{Change, UserJid};

/// The most changes the sequencer gathers before it publishes them: at 20,000 changes/s a
/// chunk waits at most ~3 ms.
pub const MAX_CHUNK: usize = 64;

/// The subscriber fell behind by more than the feed's buffer; it must resync from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscriber fell behind: {0} feed entries (chunks, or routed changes) lost")]
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
    routes: Arc<Routes>,
    /// How many changes a routed subscriber may fall behind before it lags.
    routed_capacity: usize,
}

/// The routed subscribers by JID and by domain.
#[derive(Debug, Default)]
struct Routes {
    table: RwLock<RouteTable>,
    /// Routed subscribers alive: publishing skips the table when there are none.
    live: AtomicUsize,
}

#[derive(Debug, Default)]
struct RouteTable {
    by_jid: HashMap<UserJid, Vec<Arc<Mailbox>>, foldhash::fast::RandomState>,
    by_domain: HashMap<String, Vec<Arc<Mailbox>>, foldhash::fast::RandomState>,
}

/// One routed subscriber's queue.
#[derive(Debug)]
struct Mailbox {
    state: Mutex<MailboxState>,
    notify: tokio::sync::Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct MailboxState {
    changes: VecDeque<Arc<Change>>,
    /// Changes dropped because the queue was full (the subscriber must resync).
    lost: u64,
    /// The seq of the last change routed here.
    last_seq: u64,
}

impl Mailbox {
    /// Queues `c` unless it is here already (routed by its JID and by its domain). True when
    /// it is the first change of the chunk starting at `chunk_start` this mailbox gets, so
    /// that the publisher wakes each mailbox once without searching a list.
    fn push(&self, c: &Arc<Change>, chunk_start: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if c.seq <= st.last_seq {
            return false;
        }
        let first = st.last_seq < chunk_start;
        st.last_seq = c.seq;
        if st.lost > 0 || st.changes.len() >= self.capacity {
            st.lost += 1;
            st.changes.clear();
        } else {
            st.changes.push_back(c.clone());
        }
        first
    }
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
            routes: Arc::default(),
            routed_capacity: ring_size.max(16),
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
        if self.routes.live.load(Ordering::Acquire) > 0 {
            self.route(&changes);
        }
        // No receivers is fine.
        let _ = self.feed.send(changes.into());
    }

    /// Puts each change into the mailboxes routed to its JID or domain (once per mailbox),
    /// then wakes each mailbox that got something, once. Linear in the deliveries: a
    /// thousand sessions watching one user cost a thousand pushes per change of that user.
    fn route(&self, changes: &[Arc<Change>]) {
        let Some(chunk_start) = changes.first().map(|c| c.seq) else {
            return;
        };
        let table = self.routes.table.read().unwrap_or_else(|p| p.into_inner());
        let mut woken: Vec<&Arc<Mailbox>> = Vec::new();
        for c in changes {
            let by_jid = table.by_jid.get(&c.jid).into_iter().flatten();
            let by_domain = table.by_domain.get(c.jid.domain()).into_iter().flatten();
            for mb in by_jid.chain(by_domain) {
                if mb.push(c, chunk_start) {
                    woken.push(mb);
                }
            }
        }
        for mb in woken {
            mb.notify.notify_one();
        }
    }

    /// Subscribes to the changes of these users and of the users of these domains only,
    /// published from now on (the same rules as [`Hub::subscribe`] for snapshots).
    pub fn subscribe_routed(&self, jids: Vec<UserJid>, domains: Vec<String>) -> Routed {
        let mailbox = Arc::new(Mailbox {
            state: Mutex::default(),
            notify: tokio::sync::Notify::new(),
            capacity: self.routed_capacity,
        });
        {
            let mut t = self.routes.table.write().unwrap_or_else(|p| p.into_inner());
            for j in &jids {
                t.by_jid.entry(j.clone()).or_default().push(mailbox.clone());
            }
            for d in &domains {
                t.by_domain
                    .entry(d.clone())
                    .or_default()
                    .push(mailbox.clone());
            }
        }
        self.routes.live.fetch_add(1, Ordering::AcqRel);
        Routed {
            mailbox,
            routes: self.routes.clone(),
            jids,
            domains,
            after: 0,
        }
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

    fn change(seq: u64) -> Arc<Change> {
        Change::for_test(seq, &format!("u{seq}@x.test"), "", 0)
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

    fn for_user(seq: u64, jid: &str) -> Arc<Change> {
        Change::for_test(seq, jid, "", 0)
    }

    fn take_routed(r: &mut Routed) -> Result<Vec<(u64, String)>, Lagged> {
        let mut out = Vec::new();
        r.take_ready(1000, |c| out.push((c.seq, c.jid.as_str().to_owned())))?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_routed_feed_gets_its_users_and_domains_once_each_and_nothing_else() {
        let hub = Hub::new(100, 16);
        let mut r = hub.subscribe_routed(
            vec![UserJid::parse("a@x.test").unwrap()],
            vec!["y.test".into(), "x.test".into()],
        );
        let mut only_b = hub.subscribe_routed(vec![UserJid::parse("b@z.test").unwrap()], vec![]);
        let mut all = hub.subscribe();
        hub.publish(vec![
            for_user(1, "a@x.test"),
            for_user(2, "b@z.test"),
            for_user(3, "c@y.test"),
            for_user(4, "d@w.test"),
        ]);
        assert!(r.wait().await.unwrap());
        // a@x.test matches by JID and by domain: once.
        assert_eq!(
            take_routed(&mut r).unwrap(),
            vec![(1, "a@x.test".into()), (3, "c@y.test".into())]
        );
        assert!(only_b.wait().await.unwrap());
        assert_eq!(
            take_routed(&mut only_b).unwrap(),
            vec![(2, "b@z.test".into())]
        );
        assert!(all.wait().await.unwrap());
        assert_eq!(take(&mut all, 100).unwrap(), vec![1, 2, 3, 4]);
        // Nothing for it: it does not wake.
        hub.publish(vec![for_user(5, "d@w.test")]);
        let idle = tokio::time::timeout(std::time::Duration::from_millis(50), r.wait()).await;
        assert!(idle.is_err(), "woken for a change that is not its own");
        // A snapshot at seq 6 covers what came before.
        hub.publish(vec![for_user(6, "a@x.test"), for_user(7, "a@x.test")]);
        r.skip_through(6);
        assert!(r.wait().await.unwrap());
        assert_eq!(take_routed(&mut r).unwrap(), vec![(7, "a@x.test".into())]);
    }

    #[tokio::test]
    async fn a_routed_feed_that_falls_behind_lags_and_dropping_it_unregisters() {
        let hub = Hub::new(16, 16);
        let mut r = hub.subscribe_routed(vec![], vec!["x.test".into()]);
        hub.publish((1..=20).map(|i| for_user(i, "a@x.test")).collect());
        assert!(matches!(r.wait().await, Err(Lagged(_))));
        assert!(take_routed(&mut r).is_err());
        assert_eq!(hub.routes.live.load(Ordering::Acquire), 1);
        drop(r);
        assert_eq!(hub.routes.live.load(Ordering::Acquire), 0);
        let t = hub.routes.table.read().unwrap();
        assert!(t.by_jid.is_empty() && t.by_domain.is_empty());
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

/// A routed subscriber's feed: only the changes of its users and domains (see the module
/// docs). Unregisters on drop.
#[derive(Debug)]
pub struct Routed {
    mailbox: Arc<Mailbox>,
    routes: Arc<Routes>,
    jids: Vec<UserJid>,
    domains: Vec<String>,
    after: u64,
}

impl Drop for Routed {
    fn drop(&mut self) {
        let mut t = self.routes.table.write().unwrap_or_else(|p| p.into_inner());
        fn remove<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<Arc<Mailbox>>, foldhash::fast::RandomState>,
            key: &K,
            mb: &Arc<Mailbox>,
        ) {
            if let Some(v) = map.get_mut(key) {
                v.retain(|m| !Arc::ptr_eq(m, mb));
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
        for j in &self.jids {
            remove(&mut t.by_jid, j, &self.mailbox);
        }
        for d in &self.domains {
            remove(&mut t.by_domain, d, &self.mailbox);
        }
        self.routes.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Routed {
    /// Skips every change with `seq <= seq` from now on.
    pub fn skip_through(&mut self, seq: u64) {
        self.after = self.after.max(seq);
    }

    /// Waits until a change is ready for [`Routed::take_ready`]. Cancel-safe.
    pub async fn wait(&mut self) -> Result<bool, Lagged> {
        loop {
            {
                let mut st = self.mailbox.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.lost > 0 {
                    return Err(Lagged(st.lost));
                }
                while st.changes.front().is_some_and(|c| c.seq <= self.after) {
                    st.changes.pop_front();
                }
                if !st.changes.is_empty() {
                    return Ok(true);
                }
            }
            // A wake-up that came while nobody waited is kept (a permit): none is missed.
            self.mailbox.notify.notified().await;
        }
    }

    /// Hands up to `max` ready changes, in seq order, to `f`, without waiting.
    pub fn take_ready(
        &mut self,
        max: usize,
        mut f: impl FnMut(&Arc<Change>),
    ) -> Result<usize, Lagged> {
        let taken: Vec<Arc<Change>> = {
            let mut st = self.mailbox.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.lost > 0 {
                return Err(Lagged(st.lost));
            }
            let n = st.changes.len().min(max);
            st.changes.drain(..n).collect()
        };
        let mut n = 0;
        for c in &taken {
            if c.seq <= self.after {
                continue;
            }
            self.after = c.seq;
            f(c);
            n += 1;
        }
        Ok(n)
    }
}

/// What a session reads: every change ([`Subscription`]) or only its own ([`Routed`]).
#[derive(Debug)]
pub enum Feed {
    /// The broadcast feed.
    All(Subscription),
    /// A routed feed.
    Routed(Routed),
}

impl Feed {
    /// See [`Subscription::skip_through`].
    pub fn skip_through(&mut self, seq: u64) {
        match self {
            Feed::All(s) => s.skip_through(seq),
            Feed::Routed(r) => r.skip_through(seq),
        }
    }

    /// See [`Subscription::wait`].
    pub async fn wait(&mut self) -> Result<bool, Lagged> {
        match self {
            Feed::All(s) => s.wait().await,
            Feed::Routed(r) => r.wait().await,
        }
    }

    /// See [`Subscription::take_ready`].
    pub fn take_ready(&mut self, max: usize, f: impl FnMut(&Arc<Change>)) -> Result<usize, Lagged> {
        match self {
            Feed::All(s) => s.take_ready(max, f),
            Feed::Routed(r) => r.take_ready(max, f),
        }
    }
}
