//! Webhooks and alerts (contract §7), to the Standard Webhooks specification.
//!
//! - [`WebhookSink`] is a [`ChangeSink`]: on the sequencer it pushes each change onto an
//!   in-memory queue — it never waits.
//! - The outbox task turns the queue into records — each change, and each alert the
//!   [`alerts::Detector`] raises from it, with the endpoints whose filters want it — and
//!   appends them to the [`outbox::Outbox`] in batches: Postgres tables when a store is
//!   configured (a message counts once committed; a restart loses nothing committed), memory
//!   otherwise. One record per change whatever the number of endpoints (fan-out on read).
//! - One delivery task per endpoint reads the records for it after its cursor and sends them
//!   in order, recording many deliveries in one write: `POST` with `webhook-id`
//!   (the same on every retry), `webhook-timestamp` and `webhook-signature: v1,<base64
//!   HMAC-SHA256 of "id.timestamp.body">`; a 2xx within `webhooks_timeout_secs` delivers;
//!   anything else is retried with exponential backoff and jitter (1 s doubling, capped at 10
//!   min) up to `webhooks_max_attempts`, then marked `failed`, and the next message goes. A
//!   slow or dead endpoint only holds up its own task.

pub mod alerts;
pub mod outbox;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use prometheus::{IntCounterVec, Registry};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AlertsConfig, WebhookConfig, decode_webhook_secret};
use crate::presence::{Applied, ChangeSink, Op, UserJid};
use crate::telemetry;
use outbox::{Attempt, BodySource, Outbox, Pending, Progress, Record};

/// The first retry delay; it doubles per attempt.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(600);
/// Largest response body read from an endpoint (the rest is dropped).
const MAX_RESPONSE_BYTES: usize = 64 << 10;
/// How long the outbox task lets changes gather after the first one wakes it.
const GATHER: Duration = Duration::from_millis(5);
/// Changes per [`GATHER`] that mean the engine is in a burst (50,000 changes/s).
const BURST_PER_GATHER: usize = 250;
/// The longest the outbox task defers its work during a burst.
const MAX_DEFER: Duration = Duration::from_secs(1);
/// Alerts kept for the dashboard's strip.
const RECENT_ALERTS: usize = 50;
/// Changes waiting to become messages, at most (beyond it the oldest are dropped and counted:
/// the outbox cannot keep up, e.g. Postgres is down for long).
const MAX_QUEUED: usize = 1_000_000;

/// Where an endpoint comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[[webhooks]]` in the config file.
    Config,
    /// `POST /api/v1/webhooks`.
    Api,
}

/// One endpoint.
#[derive(Clone)]
pub struct Endpoint {
    /// Its id.
    pub id: String,
    /// Where messages go.
    pub url: String,
    /// `whsec_…` (never shown after creation).
    secret: String,
    key: Vec<u8>,
    /// Event types wanted.
    pub events: Vec<String>,
    /// Only these domains (empty: all).
    pub domains: Vec<String>,
    /// Only these users (empty: all).
    pub jids: Vec<String>,
    /// Config file or API.
    pub source: Source,
    /// Mixed into each record's id to make this endpoint's `webhook-id`s.
    salt: u128,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("url", &crate::config::mask_url_password(&self.url))
            .field("events", &self.events)
            .finish()
    }
}

impl Endpoint {
    /// An endpoint from its parts (the secret is checked).
    pub fn new(cfg: &WebhookConfig, source: Source) -> Result<Endpoint, String> {
        let key = decode_webhook_secret(cfg.secret.expose())?;
        Ok(Endpoint {
            id: cfg.id.clone(),
            url: cfg.url.clone(),
            secret: cfg.secret.expose().to_owned(),
            key,
            events: cfg.events.clone(),
            domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
            jids: cfg
                .jids
                .iter()
                .filter_map(|j| UserJid::parse(j).ok())
                .map(|j| j.as_str().to_owned())
                .collect(),
            source,
            salt: {
                let d = <Sha256 as sha2::Digest>::digest(format!("webhook-id {}", cfg.id));
                let mut b = [0u8; 16];
                b.copy_from_slice(&d[..16]);
                u128::from_le_bytes(b)
            },
        })
    }

    /// This endpoint's `webhook-id` for a record: stable across attempts and restarts, and
    /// different for each endpoint.
    pub fn message_id(&self, rid: u128) -> String {
        format!("msg_{:032x}", rid ^ self.salt)
    }

    /// The secret, for storing an API-made endpoint.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    fn wants(&self, kind: &str, jid: Option<&UserJid>, domain: Option<&str>) -> bool {
        if !self.events.iter().any(|e| e == kind) {
            return false;
        }
        let domain = jid.map(|j| j.domain()).or(domain);
        let by_jid = jid.is_some_and(|j| self.jids.iter().any(|x| x == j.as_str()));
        let by_domain = domain.is_some_and(|d| self.domains.iter().any(|x| x == d));
        match (self.jids.is_empty(), self.domains.is_empty()) {
            (true, true) => true,
            _ => by_jid || by_domain,
        }
    }

    /// `webhook-signature` for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        sign(&self.key, id, timestamp, body)
    }
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` (Standard Webhooks).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// A fresh `whsec_` secret (32 random bytes).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The webhook metrics.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Delivery attempts by result.
    pub attempts: IntCounterVec,
    /// Alerts raised by type.
    pub alerts: IntCounterVec,
    /// Messages accepted into the outbox.
    pub accepted: prometheus::IntCounter,
    /// Changes dropped before becoming messages (queue full).
    pub dropped: prometheus::IntCounter,
}

impl WebhookMetrics {
    /// Registers them in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            attempts: telemetry::counter_vec(
                r,
                "presence_bridge_webhook_attempts_total",
                "Webhook delivery attempts, by result (delivered, retrying, failed)",
                &["result"],
            ),
            alerts: telemetry::counter_vec(
                r,
                "presence_bridge_alerts_total",
                "Alerts raised, by type (flapping, storm)",
                &["type"],
            ),
            accepted: telemetry::counter(
                r,
                "presence_bridge_webhook_messages_total",
                "Webhook messages accepted into the outbox",
            ),
            dropped: telemetry::counter(
                r,
                "presence_bridge_webhook_dropped_total",
                "Webhook work dropped: changes past 1,000,000 waiting to become records, or (memory mode) messages of records past the log's 100,000 that an endpoint had not finished",
            ),
        }
    }
}

/// Everything webhooks: endpoints, the queue from the sequencer, the outbox, the workers.
pub struct Webhooks {
    endpoints: DashMap<String, (Arc<Endpoint>, CancellationToken)>,
    /// Changes from the sequencer, not yet turned into messages (the turning happens on the
    /// outbox task: the sequencer only pushes).
    queue: Mutex<Queue>,
    /// Changes the outbox task has taken off `queue` and not yet turned into records: it
    /// swaps the whole queue out in O(1), so the sequencer never waits on a lock held while
    /// this (lowest-priority) thread copies a batch.
    taken: Mutex<VecDeque<(crate::presence::Change, DateTime<Utc>)>>,
    queued: Notify,
    /// The batch being appended (kept on a failed append): one appender at a time, so the
    /// outbox receives messages in the order of the changes.
    appending: tokio::sync::Mutex<Vec<Record>>,
    /// Wakes an endpoint's worker when its messages are in the outbox.
    wake: DashMap<String, Arc<Notify>>,
    outbox: Outbox,
    detector: Mutex<alerts::Detector>,
    /// Alerts are configured on (a threshold is not 0).
    alerts_on: bool,
    recent: Mutex<VecDeque<alerts::Alert>>,
    epoch: Mutex<Arc<str>>,
    client: reqwest::Client,
    timeout: Duration,
    max_attempts: u32,
    metrics: WebhookMetrics,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// The webhook tasks' own runtime: one worker thread at the lowest CPU priority (nice 19),
    /// so that turning changes into messages and delivering them only uses CPU the engine,
    /// the sources and the API leave (see docs/benchmarks.md).
    runtime: Background,
}

/// A runtime that shuts down in the background when dropped (it may be dropped on another
/// runtime's thread).
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn new() -> Result<Background, String> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pb-webhooks")
            .on_thread_start(|| {
                // Linux: SCHED_IDLE (runs when the engine's threads leave a core idle, and
                // yields to them the moment they wake); elsewhere, or if refused, nice 19.
                // Neither needs privileges.
                #[cfg(target_os = "linux")]
                let idle = thread_priority::unix::set_thread_priority_and_policy(
                    thread_priority::unix::thread_native_id(),
                    thread_priority::ThreadPriority::Min,
                    thread_priority::unix::ThreadSchedulePolicy::Normal(
                        thread_priority::unix::NormalThreadSchedulePolicy::Idle,
                    ),
                )
                .is_ok();
                #[cfg(not(target_os = "linux"))]
                let idle = false;
                if !idle {
                    let _ = thread_priority::set_current_thread_priority(
                        thread_priority::ThreadPriority::Min,
                    );
                }
            })
            .enable_all()
            .build()
            .map(|rt| Background(Some(rt)))
            .map_err(|e| format!("cannot start the webhook runtime: {e}"))
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(|r| r.handle())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

/// Changes from the sequencer waiting for the outbox task.
#[derive(Default)]
struct Queue {
    items: VecDeque<(crate::presence::Change, DateTime<Utc>)>,
    /// When the first of `items` was queued.
    since: Option<std::time::Instant>,
}

/// The sequencer's end: a [`ChangeSink`] that never waits.
#[derive(Debug, Clone)]
pub struct WebhookSink(pub Arc<Webhooks>);

/// What [`Webhooks::start`] needs.
#[derive(Debug)]
pub struct Settings {
    /// `[[webhooks]]`.
    pub endpoints: Vec<WebhookConfig>,
    /// `[alerts]`.
    pub alerts: AlertsConfig,
    /// `webhooks_timeout_secs`.
    pub timeout: Duration,
    /// `webhooks_max_attempts`.
    pub max_attempts: u32,
}

impl Webhooks {
    /// Starts the outbox task and one worker per endpoint (config ones, then the ones made
    /// through the API and kept in Postgres).
    pub async fn start(
        settings: Settings,
        outbox: Outbox,
        registry: &Registry,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Arc<Webhooks>, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // Never to another host: a receiver that redirects is answering non-2xx.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("presence-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        let w = Arc::new(Webhooks {
            endpoints: DashMap::new(),
            queue: Mutex::new(Queue::default()),
            taken: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            appending: tokio::sync::Mutex::new(Vec::new()),
            wake: DashMap::new(),
            outbox,
            alerts_on: settings.alerts.flapping_transitions > 0 || settings.alerts.storm_logins > 0,
            detector: Mutex::new(alerts::Detector::new(settings.alerts)),
            recent: Mutex::new(VecDeque::new()),
            epoch: Mutex::new(Arc::from("")),
            client,
            timeout: settings.timeout,
            max_attempts: settings.max_attempts,
            metrics: WebhookMetrics::new(registry),
            tasks: tasks.clone(),
            cancel: cancel.clone(),
            runtime: Background::new()?,
        });
        for c in &settings.endpoints {
            let e = Endpoint::new(c, Source::Config)?;
            w.add(e);
        }
        match w.outbox.load_endpoints().await {
            Ok(list) => {
                for e in list {
                    if w.endpoints.contains_key(&e.id) {
                        tracing::warn!(id = %e.id, "webhooks: an API endpoint has the id of a config one; the config one wins");
                        continue;
                    }
                    w.add(e);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: cannot load the endpoints made through the API")
            }
        }
        w.spawn(w.clone().outbox_task());
        Ok(w)
    }

    /// The epoch the presence messages carry (set once the engine exists).
    pub fn set_epoch(&self, epoch: Arc<str>) {
        *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) = epoch;
    }

    fn add(self: &Arc<Self>, e: Endpoint) {
        let stop = self.cancel.child_token();
        let e = Arc::new(e);
        self.wake.insert(e.id.clone(), Arc::new(Notify::new()));
        self.endpoints
            .insert(e.id.clone(), (e.clone(), stop.clone()));
        self.spawn(self.clone().worker(e, stop));
    }

    /// Runs a task on the webhook runtime, tracked for shutdown.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        match self.runtime.handle() {
            Some(h) => {
                self.tasks.spawn_on(f, h);
            }
            None => {
                self.tasks.spawn(f);
            }
        }
    }

    /// The endpoints, by id.
    pub fn list(&self) -> Vec<Arc<Endpoint>> {
        let mut v: Vec<Arc<Endpoint>> =
            self.endpoints.iter().map(|e| e.value().0.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The outbox (pending counts, delivery logs, erasure).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The last alerts, newest first.
    pub fn recent_alerts(&self) -> Vec<alerts::Alert> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// Creates an endpoint through the API (kept in Postgres when configured).
    pub async fn create(
        self: &Arc<Self>,
        cfg: WebhookConfig,
    ) -> Result<Arc<Endpoint>, CreateError> {
        if self.endpoints.contains_key(&cfg.id) {
            return Err(CreateError::Exists);
        }
        let e = Endpoint::new(&cfg, Source::Api).map_err(CreateError::Invalid)?;
        // Its cursor first: records for it may follow as soon as it is in the set.
        self.outbox.register(&e).await.map_err(CreateError::Store)?;
        if let Err(err) = self.outbox.save_endpoint(&e).await {
            let _ = self.outbox.delete_endpoint(&e.id).await;
            return Err(CreateError::Store(err));
        }
        let e2 = e.clone();
        self.add(e);
        Ok(Arc::new(e2))
    }

    /// Deletes an API endpoint with its pending messages.
    pub async fn delete(&self, id: &str) -> Result<(), DeleteError> {
        let source = self
            .endpoints
            .get(id)
            .map(|e| e.value().0.source)
            .ok_or(DeleteError::Unknown)?;
        if source == Source::Config {
            return Err(DeleteError::FromConfig);
        }
        self.outbox
            .delete_endpoint(id)
            .await
            .map_err(DeleteError::Store)?;
        if let Some((_, (_, stop))) = self.endpoints.remove(id) {
            stop.cancel();
        }
        self.wake.remove(id);
        Ok(())
    }

    /// Takes up to `n` queued changes and turns them into records (alerts included).
    fn take(&self, n: usize) -> Option<Vec<Record>> {
        let items: Vec<(crate::presence::Change, DateTime<Utc>)> = {
            let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
            if taken.is_empty() {
                // The sequencer pushes under this lock: one swap, O(1) whatever the backlog
                // (the sequencer gets the empty buffer back, with its capacity).
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut q.items, &mut *taken);
                q.since = None;
            }
            let k = n.min(taken.len());
            taken.drain(..k).collect()
        };
        if items.is_empty() {
            return None;
        }
        // Once per batch: the endpoints and the epoch.
        let eps: Arc<[Arc<Endpoint>]> = self
            .endpoints
            .iter()
            .map(|e| e.value().0.clone())
            .collect::<Vec<_>>()
            .into();
        let epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut records = Vec::new();
        for (c, at) in items {
            self.records_for(c, at, &eps, &epoch, &mut records);
        }
        Some(records)
    }

    /// Appends the next batch (or the one a failed append left): `Ok(false)` when nothing
    /// was queued.
    async fn pump(&self) -> Result<bool, String> {
        let mut batch = self.appending.lock().await;
        if batch.is_empty() {
            match self.take(5_000) {
                Some(b) => *batch = b,
                None => return Ok(false),
            }
        }
        if batch.is_empty() {
            return Ok(true);
        }
        let dropped = self.outbox.append(&batch).await?;
        let messages: usize = batch.iter().map(|r| r.targets.len()).sum();
        self.metrics.accepted.inc_by(messages as u64);
        if dropped > 0 {
            self.metrics.dropped.inc_by(dropped);
            tracing::warn!(
                dropped,
                "webhooks: the in-memory outbox holds 100,000 records; the oldest were dropped before every endpoint had them"
            );
        }
        let mut woken: Vec<&str> = batch
            .iter()
            .flat_map(|r| r.targets.iter().map(|t| t.id.as_str()))
            .collect();
        woken.sort_unstable();
        woken.dedup();
        for id in woken {
            if let Some(n) = self.wake.get(id) {
                n.notify_one();
            }
        }
        batch.clear();
        Ok(true)
    }

    /// Moves queued changes into the outbox as messages, in batches, then wakes their workers.
    async fn outbox_task(self: Arc<Self>) {
        // Every endpoint has its cursor before a record can be for it (a new one starts at the
        // end of the log; a known one keeps its place).
        let known: Vec<Arc<Endpoint>> = self.list();
        for ep in known {
            while let Err(e) = self.outbox.register(&ep).await {
                tracing::warn!(error = %e, endpoint = %ep.id, "webhooks: cannot register the endpoint's cursor; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = self.cancel.cancelled() => return,
                }
            }
        }
        let mut maintenance = tokio::time::interval(Duration::from_secs(600));
        loop {
            match self.pump().await {
                Ok(true) => {
                    // Stopped: what is left is flushed by whoever stops the service.
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    if self.taken_is_empty() {
                        self.settle().await;
                    }
                    continue;
                }
                Ok(false) => {
                    tokio::select! {
                        () = self.queued.notified() => self.settle().await,
                        _ = maintenance.tick() => {
                            let live: Vec<String> = self.endpoints.iter().map(|e| e.key().clone()).collect();
                            if let Err(e) = self.outbox.prune(&live).await {
                                tracing::debug!(error = %e, "webhooks: prune failed");
                            }
                        }
                        () = self.cancel.cancelled() => return,
                    }
                }
                Err(e) => {
                    // The batch stays; try again shortly (the store may be down).
                    tracing::warn!(error = %e, "webhooks: outbox write failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.cancel.cancelled() => return,
                    }
                }
            }
        }
    }

    fn taken_is_empty(&self) -> bool {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Lets changes gather before they are taken, and keeps out of the engine's way during a
    /// burst: while the queue grows faster than [`BURST_PER_GATHER`] per [`GATHER`], the work
    /// waits, for at most [`MAX_DEFER`] after the oldest change was queued. Turning changes
    /// into records needs CPU the engine is using during a burst (measured: on 2 busy cores,
    /// running it alongside halves the ingest rate; deferred, it costs the engine nothing).
    async fn settle(&self) {
        let len = || {
            let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            (q.items.len(), q.since)
        };
        let mut last = len().0;
        loop {
            tokio::time::sleep(GATHER).await;
            let (now, since) = len();
            let grew = now.saturating_sub(last);
            last = now;
            if grew < BURST_PER_GATHER || since.is_none_or(|t| t.elapsed() >= MAX_DEFER) {
                return;
            }
        }
    }

    /// One endpoint's deliveries, in order, until cancelled. Finished deliveries are recorded
    /// together (up to 100, or after 250 ms, or before any wait): one store write for many.
    /// A crash before a write only delivers those messages again (at least once).
    async fn worker(self: Arc<Self>, ep: Arc<Endpoint>, stop: CancellationToken) {
        let wake = self
            .wake
            .get(&ep.id)
            .map(|n| n.value().clone())
            .unwrap_or_default();
        while let Err(e) = self.outbox.register(&ep).await {
            tracing::debug!(error = %e, endpoint = %ep.id, "webhooks: cannot register the cursor; retrying");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
        let mut batch: VecDeque<Pending> = VecDeque::new();
        let mut done = Progress::default();
        let mut since = std::time::Instant::now();
        loop {
            if stop.is_cancelled() {
                // Best effort: what was delivered is not sent again after a restart.
                if !done.is_empty() {
                    let _ = self.outbox.record(&ep.id, &done).await;
                }
                return;
            }
            if batch.is_empty() {
                if !self.write_progress(&ep, &mut done, &stop).await {
                    return;
                }
                match self.outbox.next(&ep, 100).await {
                    Ok(b) => batch = b.into(),
                    Err(e) => {
                        tracing::debug!(error = %e, endpoint = %ep.id, "webhooks: outbox read failed");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => return,
                        }
                        continue;
                    }
                }
            }
            let Some(m) = batch.front().cloned() else {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            };
            let wait = (m.next_attempt_at - Utc::now())
                .to_std()
                .unwrap_or_default();
            if !wait.is_zero() {
                if !self.write_progress(&ep, &mut done, &stop).await {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
            let attempt = m.attempts + 1;
            let (ok, status, error) = self.deliver(&ep, &m).await;
            let outcome = if ok {
                "delivered"
            } else if attempt >= self.max_attempts {
                "failed"
            } else {
                "retrying"
            };
            self.metrics.attempts.with_label_values(&[outcome]).inc();
            if outcome == "failed" {
                tracing::warn!(endpoint = %ep.id, message = %m.id, attempts = attempt, "webhooks: message failed after the last attempt");
            }
            done.attempts.push(Attempt {
                message_id: m.id.clone(),
                kind: m.kind.clone(),
                attempt,
                at: Utc::now(),
                status: outcome,
                response_status: status,
                error,
            });
            if outcome == "retrying" {
                let next =
                    Utc::now() + chrono::Duration::from_std(backoff(attempt)).unwrap_or_default();
                done.retry = Some((m.seq, attempt, next));
                if let Some(front) = batch.front_mut() {
                    front.attempts = attempt;
                    front.next_attempt_at = next;
                }
                // A retry is written at once: the log shows it while the message waits.
                if !self.write_progress(&ep, &mut done, &stop).await {
                    return;
                }
            } else {
                done.finished_through = Some(m.seq);
                done.retry = None;
                batch.pop_front();
                if done.attempts.len() >= 100
                    || since.elapsed() >= Duration::from_millis(250)
                    || batch.is_empty()
                {
                    if !self.write_progress(&ep, &mut done, &stop).await {
                        return;
                    }
                    since = std::time::Instant::now();
                }
            }
        }
    }

    /// Writes a worker's progress (retrying until the store takes it); `false` when stopped.
    async fn write_progress(
        &self,
        ep: &Endpoint,
        done: &mut Progress,
        stop: &CancellationToken,
    ) -> bool {
        if done.is_empty() {
            return true;
        }
        loop {
            match self.outbox.record(&ep.id, done).await {
                Ok(()) => {
                    *done = Progress::default();
                    return true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "webhooks: cannot record attempts; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => return false,
                    }
                }
            }
        }
    }

    /// One POST: (2xx, HTTP status, error text).
    async fn deliver(&self, ep: &Endpoint, m: &Pending) -> (bool, Option<u16>, Option<String>) {
        let ts = Utc::now().timestamp();
        let sig = ep.sign(&m.id, ts, &m.body);
        let sent = self
            .client
            .post(&ep.url)
            .header("content-type", "application/json")
            .header("webhook-id", &m.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(m.body.to_string())
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("no answer within {} s", self.timeout.as_secs())
                } else if e.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "request failed".to_owned()
                };
                return (false, None, Some(why));
            }
        };
        let status = resp.status().as_u16();
        // Read (and drop) at most MAX_RESPONSE_BYTES of the answer, within the timeout.
        let mut read = 0usize;
        let drained = tokio::time::timeout(self.timeout, async {
            while let Ok(Some(c)) = resp.chunk().await {
                read += c.len();
                if read > MAX_RESPONSE_BYTES {
                    break;
                }
            }
        })
        .await;
        let ok = resp.status().is_success() && drained.is_ok();
        let error = (!ok).then(|| {
            if drained.is_err() {
                "answer body not finished within the timeout".to_owned()
            } else {
                format!("HTTP {status}")
            }
        });
        (ok, Some(status), error)
    }

    /// Moves whatever is queued into the outbox now (shutdown, after the engine stopped; an
    /// erasure, before it deletes the user's pending messages).
    pub async fn flush(&self) {
        loop {
            match self.pump().await {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    tracing::error!(error = %e, "webhooks: messages not accepted");
                    return;
                }
            }
        }
    }
}

/// Why a create failed.
#[derive(Debug)]
pub enum CreateError {
    /// The id is taken.
    Exists,
    /// A bad field.
    Invalid(String),
    /// The store refused.
    Store(String),
}

/// Why a delete failed.
#[derive(Debug)]
pub enum DeleteError {
    /// No such endpoint.
    Unknown,
    /// It comes from the config file.
    FromConfig,
    /// The store refused.
    Store(String),
}

/// `min · 2^(attempt-1)` capped at [`RETRY_MAX`], with equal jitter (uniform in the upper
/// half), so that receivers that come back are not hit in step.
pub fn backoff(attempt: u32) -> Duration {
    let exp = RETRY_MIN.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(RETRY_MAX);
    let half = d / 2;
    half + Duration::from_secs_f64(half.as_secs_f64() * rand::random::<f64>())
}

#[derive(Serialize)]
struct Body<'a, D: Serialize> {
    r#type: &'a str,
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    timestamp: DateTime<Utc>,
    data: D,
}

#[derive(Serialize)]
struct PresenceData<'a> {
    #[serde(flatten)]
    change: &'a crate::presence::Change,
    epoch: &'a str,
}

/// The endpoints of `eps` that `want` something: `eps` itself (one reference count) when all
/// of them do, the common case.
fn matching(eps: &Arc<[Arc<Endpoint>]>, want: impl Fn(&Endpoint) -> bool) -> Arc<[Arc<Endpoint>]> {
    let mut some: Option<Vec<Arc<Endpoint>>> = None;
    for (i, e) in eps.iter().enumerate() {
        match (&mut some, want(e)) {
            (None, true) | (Some(_), false) => {}
            (None, false) => some = Some(eps[..i].to_vec()),
            (Some(v), true) => v.push(e.clone()),
        }
    }
    match some {
        None => eps.clone(),
        Some(v) => v.into(),
    }
}

/// A record's JSON body from its source.
fn render(src: &BodySource) -> Arc<str> {
    match src {
        BodySource::Ready(b) => b.clone(),
        BodySource::Presence { change, at, epoch } => {
            let kind = match change.op {
                Op::Online => "presence.online",
                Op::Offline => "presence.offline",
                Op::Update => "presence.update",
            };
            let mut buf = Vec::with_capacity(512);
            let _ = serde_json::to_writer(
                &mut buf,
                &Body {
                    r#type: kind,
                    timestamp: *at,
                    data: PresenceData { change, epoch },
                },
            );
            Arc::from(String::from_utf8(buf).unwrap_or_default())
        }
    }
}

impl ChangeSink for WebhookSink {
    /// On the sequencer: one push, nothing else (matching, alerts and serialisation happen on
    /// the outbox task).
    fn accept(&self, applied: Applied<'_>) {
        let w = &self.0;
        // Nothing would come of it: no endpoint and no alert to detect.
        if !w.alerts_on && w.endpoints.is_empty() {
            return;
        }
        let mut q = w.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.items.len() >= MAX_QUEUED {
            q.items.pop_front();
            w.metrics.dropped.inc();
        }
        let was_empty = q.items.is_empty();
        if was_empty {
            q.since = Some(std::time::Instant::now());
        }
        q.items
            .push_back((applied.change.clone(), applied.event.at));
        drop(q);
        // Only the first change into an empty queue wakes the outbox task (which then lets
        // the queue fill for a moment): waking another thread per change costs the sequencer
        // more than the change itself.
        if was_empty {
            w.queued.notify_one();
        }
    }
}

impl Webhooks {
    /// The records one change makes: its presence event for the endpoints that want it, and
    /// the alerts it raises. The body is written once, whatever the number of endpoints, and
    /// not here: the outbox writes it (Postgres, at once; memory, when first delivered).
    fn records_for(
        &self,
        c: crate::presence::Change,
        at: DateTime<Utc>,
        eps: &Arc<[Arc<Endpoint>]>,
        epoch: &Arc<str>,
        out: &mut Vec<Record>,
    ) {
        let kind = match c.op {
            Op::Online => "presence.online",
            Op::Offline => "presence.offline",
            Op::Update => "presence.update",
        };
        let raised = if self.alerts_on {
            self.detector
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .feed(&c.jid, c.op, at)
        } else {
            Vec::new()
        };
        let targets = matching(eps, |e| e.wants(kind, Some(&c.jid), None));
        if !targets.is_empty() {
            out.push(Record {
                rid: rand::random(),
                kind,
                jid: Some(c.jid.clone()),
                body: BodySource::Presence {
                    change: c,
                    at,
                    epoch: epoch.clone(),
                },
                targets,
            });
        }
        for a in raised {
            let label = if a.kind() == "alert.flapping" {
                "flapping"
            } else {
                "storm"
            };
            self.metrics.alerts.with_label_values(&[label]).inc();
            tracing::info!(alert = a.kind(), data = %a.data(), "alert raised");
            let domain = match &a {
                alerts::Alert::Storm { domain, .. } => Some(domain.as_str()),
                alerts::Alert::Flapping { .. } => None,
            };
            let targets = matching(eps, |e| e.wants(a.kind(), a.jid(), domain));
            if !targets.is_empty() {
                let body = serde_json::to_string(&Body {
                    r#type: a.kind(),
                    timestamp: at,
                    data: a.data(),
                })
                .unwrap_or_default();
                out.push(Record {
                    rid: rand::random(),
                    kind: a.kind(),
                    body: BodySource::Ready(Arc::from(body)),
                    jid: a.jid().cloned(),
                    targets,
                });
            }
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() == RECENT_ALERTS {
                r.pop_front();
            }
            r.push_back(a);
        }
    }
}

/// Pending counts per endpoint, for the list.
pub type PendingCounts = HashMap<String, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example: secret, id, timestamp, payload and the
    /// signature it gives.
    #[test]
    fn signature_matches_the_specification_example() {
        let key = decode_webhook_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn matching_shares_the_whole_set_when_every_endpoint_wants_it() {
        let ep = |id: &str| {
            Arc::new(
                Endpoint::new(
                    &WebhookConfig {
                        id: id.into(),
                        url: "http://127.0.0.1:1/".into(),
                        secret: crate::config::Secret::new(
                            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                        ),
                        events: vec!["presence.online".into()],
                        ..WebhookConfig::default()
                    },
                    Source::Config,
                )
                .unwrap(),
            )
        };
        let eps: Arc<[Arc<Endpoint>]> = vec![ep("a"), ep("b"), ep("c")].into();
        assert!(Arc::ptr_eq(&matching(&eps, |_| true), &eps));
        let ids = |v: &Arc<[Arc<Endpoint>]>| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&matching(&eps, |e| e.id != "b")), ["a", "c"]);
        assert_eq!(ids(&matching(&eps, |e| e.id != "a")), ["b", "c"]);
        assert!(matching(&eps, |_| false).is_empty());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        for a in 1..30 {
            let d = backoff(a);
            let full = RETRY_MIN
                .saturating_mul(1u32 << (a - 1).min(20))
                .min(RETRY_MAX);
            assert!(d >= full / 2 && d <= full, "{a}: {d:?}");
        }
        assert!(backoff(40) <= RETRY_MAX);
    }

    #[test]
    fn secrets_are_checked() {
        assert!(decode_webhook_secret(&new_secret()).unwrap().len() == 32);
        assert!(decode_webhook_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(decode_webhook_secret("whsec_c2hvcnQ=").is_err());
        assert!(decode_webhook_secret("whsec_!!!").is_err());
    }
}
