//! The writer task: batches from the sink → Postgres, or → spool; spool replay; retention.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use deadpool_postgres::{Object, Pool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::spool::Spool;
use super::{
    StoreError, StoreHandle, StoreMetrics, StoreMode, StoreSink, StoreStatus, StoredEvent, pg,
};
use crate::config::StoreConfig;

/// Largest transaction used when replaying the spool (catch-up speed).
const REPLAY_CHUNK: usize = 20_000;

/// Starts the writer for a configured Postgres (see [`super::open`], which migrates first).
/// The returned handle's [`StoreHandle::sink`] is the engine's end of the queue.
pub fn start(
    cfg: &StoreConfig,
    pool: Pool,
    metrics: StoreMetrics,
) -> Result<(StoreHandle, JoinHandle<()>), StoreError> {
    let spool_err = |source| StoreError::Spool {
        path: cfg.spool_dir.display().to_string(),
        source,
    };
    let spool = Spool::open(&cfg.spool_dir, cfg.spool_segment_bytes).map_err(spool_err)?;
    let mut spooled = 0u64;
    for seg in spool.segments().map_err(spool_err)? {
        spooled += Spool::count_events(&seg).unwrap_or(0);
    }
    let pending = spool.has_pending();
    if pending {
        tracing::warn!(events = spooled, dir = %cfg.spool_dir.display(), "store: spool from a previous run will be replayed before new events");
    }
    let (status_tx, status_rx) = watch::channel(StoreStatus {
        mode: if pending {
            StoreMode::Spooling
        } else {
            StoreMode::Ok
        },
        spooled_events: spooled,
        oldest_spooled_at: pending.then(Utc::now),
        last_error: None,
    });
    metrics.spooled.set(spooled as i64);
    metrics.spooling.set(i64::from(pending));
    let sink = StoreSink::new(&metrics);
    let handle = StoreHandle {
        status: status_rx,
        metrics: metrics.clone(),
        sink: sink.clone(),
        pool: pool.clone(),
    };
    let w_pool = pool.clone();
    let w = Writer {
        cfg: cfg.clone(),
        pool,
        sink,
        spool,
        spool_pending: pending,
        spooled,
        next_retry: Instant::now(),
        partitions: BTreeSet::new(),
        status: status_tx,
        metrics,
        last_retention: None,
        migrated: false,
        closing_since: None,
        _rollups: {
            // The rollup builder lives as long as the writer.
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(super::rollup::run(w_pool, cfg.retention_days, stop.clone()));
            stop.drop_guard()
        },
    };
    Ok((handle, tokio::spawn(w.run())))
}

struct Writer {
    cfg: StoreConfig,
    pool: Pool,
    sink: StoreSink,
    spool: Spool,
    spool_pending: bool,
    spooled: u64,
    next_retry: Instant,
    partitions: BTreeSet<NaiveDate>,
    status: watch::Sender<StoreStatus>,
    metrics: StoreMetrics,
    last_retention: Option<Instant>,
    /// Migrations confirmed applied by this writer (Postgres may have been down at start-up).
    migrated: bool,
    /// When the sink was closed (shutdown): past `flush_timeout_secs`, batches go to the spool.
    closing_since: Option<Instant>,
    /// Stops the rollup builder when the writer ends.
    _rollups: tokio_util::sync::DropGuard,
}

impl Writer {
    /// Publishes a status change, keeping the spool gauges in step with it.
    fn set_status(&self, f: impl FnOnce(&mut StoreStatus)) {
        self.status.send_modify(|s| {
            f(s);
            self.metrics.spooled.set(s.spooled_events as i64);
            self.metrics
                .spooling
                .set(i64::from(s.mode == StoreMode::Spooling));
        });
    }

    async fn run(mut self) {
        let batch_wait = Duration::from_millis(self.cfg.batch_timeout_ms);
        let retry = self.cfg.retry_secs;
        loop {
            self.maintenance().await;
            if self.sink.depth() == 0 {
                if self.sink.is_closed() {
                    break;
                }
                tokio::select! {
                    _ = self.sink.inner.notify.notified() => {}
                    _ = tokio::time::sleep(retry) => {}
                }
                if self.sink.depth() == 0 {
                    // Idle wake-up: a chance to replay the spool.
                    if self.spool_pending && Instant::now() >= self.next_retry {
                        self.replay().await;
                    }
                    continue;
                }
            }
            // Batch window: collect for up to batch_timeout_ms unless a full batch is there.
            if self.sink.depth() < self.cfg.batch_size as u64 && !self.sink.is_closed() {
                tokio::select! {
                    _ = tokio::time::sleep(batch_wait) => {}
                    // Shutdown: flush now rather than at the end of the window.
                    _ = self.sink.closed() => {}
                }
            }
            // Under a backlog, larger transactions amortise the per-batch round trips.
            let take = if self.sink.depth() >= 4 * self.cfg.batch_size as u64 {
                4 * self.cfg.batch_size
            } else {
                self.cfg.batch_size
            };
            let batch = self.sink.take(take);
            self.handle(batch).await;
        }
        // Shutdown: everything is in Postgres or the spool now; remember when we stopped.
        if !self.spool_pending
            && let Ok(c) = pg::client(&self.pool).await
        {
            let _ = pg::set_state(&c, "stopped_at", &Utc::now().to_rfc3339()).await;
        }
        tracing::info!(spooled_events = self.spooled, "store writer stopped");
    }

    async fn handle(&mut self, batch: Vec<StoredEvent>) {
        if batch.is_empty() {
            return;
        }
        if self.sink.is_closed() {
            let since = *self.closing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.cfg.flush_timeout_secs {
                self.spool_batch(batch, Some("shutdown flush deadline passed".into()));
                return;
            }
        }
        if self.spool_pending && Instant::now() >= self.next_retry {
            self.replay().await;
        }
        if self.spool_pending {
            self.spool_batch(batch, None);
            return;
        }
        if self.sink.depth() > self.cfg.queue_capacity as u64 {
            // The writer is behind by more than the bound: shed to disk, catch up later.
            self.spool_batch(batch, Some("writer queue past store.queue_capacity".into()));
            return;
        }
        match self.write(&batch, false).await {
            Ok(()) => self.sink.settle(batch.len() as u64),
            Err(e) => {
                tracing::warn!(error = %e, events = batch.len(), "store: Postgres write failed; spooling");
                self.spool_batch(batch, Some(e.to_string()));
            }
        }
    }

    /// Writes one batch with the deadline; on a unique violation retries idempotently.
    async fn write(&mut self, batch: &[StoredEvent], idempotent: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        let deadline = self.cfg.write_timeout_secs;
        let get3 = async {
            let a = pg::client(&self.pool).await?;
            let b = pg::client(&self.pool).await?;
            let c = pg::client(&self.pool).await?;
            Ok::<_, StoreError>([a, b, c])
        };
        let [mut o1, mut o2, mut o3] = tokio::time::timeout(deadline, get3)
            .await
            .map_err(|_| StoreError::Timeout)??;
        let days = pg::batch_days(batch);
        let missing: BTreeSet<NaiveDate> = days.difference(&self.partitions).copied().collect();
        let pool = self.pool.clone();
        let migrated = self.migrated;
        let result = tokio::time::timeout(deadline, async {
            if !migrated {
                pg::migrate(&pool).await?;
            }
            if !missing.is_empty() {
                pg::ensure_partitions(&o1, &missing).await?;
            }
            let (c1, c2, c3): (
                &mut tokio_postgres::Client,
                &mut tokio_postgres::Client,
                &mut tokio_postgres::Client,
            ) = (&mut o1, &mut o2, &mut o3);
            match pg::write_batch_parallel([c1, c2, c3], batch, idempotent).await {
                Ok(()) => Ok(()),
                Err(e) if !idempotent && pg::is_unique_violation(&e) => {
                    tracing::debug!("store: duplicate event ids in batch; rewriting idempotently");
                    let (c1, c2, c3): (
                        &mut tokio_postgres::Client,
                        &mut tokio_postgres::Client,
                        &mut tokio_postgres::Client,
                    ) = (&mut o1, &mut o2, &mut o3);
                    Ok(pg::write_batch_parallel([c1, c2, c3], batch, true).await?)
                }
                Err(e) => Err(StoreError::from(e)),
            }
        })
        .await;
        match result {
            Ok(Ok(())) => {
                self.migrated = true;
                self.partitions.extend(missing);
                let m = &self.metrics;
                m.events_written.inc_by(batch.len() as u64);
                m.batch_events.observe(batch.len() as f64);
                m.batch_seconds.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Ok(Err(e)) => {
                for o in [o1, o2, o3] {
                    drop(Object::take(o));
                }
                Err(e)
            }
            Err(_) => {
                // The connections may be mid-COPY: never give them back to the pool.
                for o in [o1, o2, o3] {
                    drop(Object::take(o));
                }
                Err(StoreError::Timeout)
            }
        }
    }

    fn spool_batch(&mut self, batch: Vec<StoredEvent>, why: Option<String>) {
        match self.spool.append(&batch) {
            Ok(()) => {
                let n = batch.len() as u64;
                self.sink.settle(n);
                self.metrics.events_spooled.inc_by(n);
                self.spooled += n;
                if !self.spool_pending {
                    self.next_retry = Instant::now() + self.cfg.retry_secs;
                }
                self.spool_pending = true;
                let spooled = self.spooled;
                self.set_status(|s| {
                    s.mode = StoreMode::Spooling;
                    s.spooled_events = spooled;
                    s.oldest_spooled_at.get_or_insert_with(Utc::now);
                    if let Some(w) = why {
                        s.last_error = Some(w);
                    }
                });
            }
            Err(e) => {
                // Neither Postgres nor the disk: keep the batch in memory, at the front.
                tracing::error!(error = %e, dir = %self.cfg.spool_dir.display(), events = batch.len(), "store: cannot write the spool; keeping events in memory");
                self.sink.requeue_front(batch);
                self.next_retry = Instant::now() + self.cfg.retry_secs;
            }
        }
    }

    /// Replays the spool in order; stops at the first failure (retried later).
    async fn replay(&mut self) {
        self.spool.seal();
        let segments = match self.spool.segments() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "store: cannot list the spool");
                return;
            }
        };
        let started = Instant::now();
        let mut replayed = 0u64;
        // Decode the next segment on a blocking thread while the current one is written.
        let read = |p: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || (Spool::read_segment(&p), p))
        };
        let mut queue = segments.into_iter();
        let mut next = queue.next().map(read);
        while let Some(job) = next.take() {
            let Ok((read_result, seg)) = job.await else {
                self.next_retry = Instant::now() + self.cfg.retry_secs;
                return;
            };
            next = queue.next().map(read);
            let read = match read_result {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, file = %seg.display(), "store: cannot read a spool segment");
                    self.next_retry = Instant::now() + self.cfg.retry_secs;
                    return;
                }
            };
            if read.skipped > 0 {
                self.metrics
                    .spool_records_skipped
                    .inc_by(read.skipped as u64);
            }
            let total: u64 = read.batches.iter().map(|b| b.len() as u64).sum();
            let events: Vec<StoredEvent> = read.batches.into_iter().flatten().collect();
            for chunk in events.chunks(REPLAY_CHUNK) {
                // The fast path first: most spooled batches never reached Postgres. A batch
                // that partly did fails on the unique key and is rewritten idempotently.
                if let Err(e) = self.write(chunk, false).await {
                    tracing::warn!(error = %e, "store: spool replay failed; retrying later");
                    self.set_status(|s| s.last_error = Some(e.to_string()));
                    self.next_retry = Instant::now() + self.cfg.retry_secs;
                    return;
                }
            }
            if let Err(e) = self.spool.remove(&seg) {
                tracing::error!(error = %e, file = %seg.display(), "store: cannot delete a replayed spool segment");
                return;
            }
            replayed += total;
            self.metrics.events_replayed.inc_by(total);
            self.spooled = self.spooled.saturating_sub(total);
            let spooled = self.spooled;
            self.set_status(|s| s.spooled_events = spooled);
        }
        self.spool_pending = false;
        self.spooled = 0;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            events = replayed,
            secs,
            rate = (replayed as f64 / secs.max(1e-6)) as u64,
            "store: spool replayed; writing to Postgres again"
        );
        self.set_status(|s| {
            s.mode = StoreMode::Ok;
            s.spooled_events = 0;
            s.oldest_spooled_at = None;
            s.last_error = None;
        });
    }

    /// Hourly: drop partitions past retention.
    async fn maintenance(&mut self) {
        if self
            .last_retention
            .is_some_and(|t| t.elapsed() < Duration::from_secs(3600))
            || self.spool_pending
        {
            return;
        }
        self.last_retention = Some(Instant::now());
        let Ok(c) = pg::client(&self.pool).await else {
            return;
        };
        match pg::drop_old_partitions(&c, self.cfg.retention_days, Utc::now()).await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(
                    ?dropped,
                    "store: dropped history partitions past store.retention_days"
                );
                for d in &dropped {
                    if let Some(day) = d
                        .strip_prefix("presence_events_")
                        .and_then(|s| NaiveDate::parse_from_str(s, "%Y%m%d").ok())
                    {
                        self.partitions.remove(&day);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store: retention failed"),
        }
        // Sessions that ended before the oldest day kept go with their events.
        match pg::drop_old_sessions(&c, self.cfg.retention_days, Utc::now()).await {
            Ok(n) if n > 0 => {
                tracing::info!(
                    sessions = n,
                    "store: deleted sessions past store.retention_days"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store: session retention failed"),
        }
    }
}
