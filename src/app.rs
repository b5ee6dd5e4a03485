//! The composition root: the only place that builds, runs and stops the service.
//!
//! [`AppBuilder`] takes the configuration and the few choices the binary and the tests make —
//! which ingest source feeds the engine (the XMPP component, the demo simulator, or nothing),
//! and which listener the API serves on — and [`AppBuilder::start`] wires the layers together:
//!
//! ```text
//! registry ─┬─▶ store::open (Postgres + spool writer)      ── sink ──┐
//!           ├─▶ presence::Engine (sequencer) ◀────────────────────────┘
//!           ├─▶ sources (xmpp component | simulator) ── events ──▶ engine
//!           └─▶ api::serve (REST, WebSocket, /metrics, dashboard) ── reads ──▶ engine, store
//! ```
//!
//! The running [`App`] owns every task: the sequencer, the store writer, the XMPP supervisor,
//! the HTTP server, and — through one [`TaskTracker`] — every WebSocket session, resync round,
//! the simulator and the dashboard sampler. [`App::shutdown`] stops them in dependency order
//! under one deadline: sources and WebSocket sessions first (1001 close frames written), then
//! the HTTP server, then the sequencer (after the last queued event), then the writer, which
//! flushes to Postgres or the spool.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use prometheus::Registry;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::auth::Auth;
use crate::api::{self, AppState, LeaderParts};
use crate::cluster::{self, ClusterError, LeaderSinks, Leadership, Step};
use crate::config::{Config, ConfigError};
use crate::presence::{ChangeSink, Engine, EngineMetrics, EngineOptions};
use crate::sources::amqp::{self, AmqpMetrics};
use crate::sources::reconcile::{ReconcileMetrics, Reconciler};
use crate::sources::simulator::Simulator;
use crate::sources::xmpp::{self, ComponentHandle, FatalError, SpawnOptions, XmppMetrics};
use crate::store::memory::MemoryHistory;
use crate::store::{self, StoreError, StoreHandle, StoreMetrics};
use crate::webhooks::outbox::Outbox;
use crate::webhooks::{self, WebhookSink, Webhooks};

/// How long the parts other than the store flush may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What feeds the presence engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// The XEP-0114 component configured in `[xmpp]` (the service).
    Xmpp,
    /// The demo's simulated population.
    Simulated {
        /// Users.
        users: usize,
        /// RNG seed.
        seed: u64,
        /// Hours of simulated history made before going live (`demo --backfill-hours`).
        backfill_hours: u32,
    },
    /// Nothing: events come from the caller through [`App::engine`] (tests, benchmarks).
    None,
}

/// Why the service could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The API address could not be bound.
    #[error("cannot listen on {addr} (http.bind): {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server could not start.
    #[error("cannot start the HTTP server: {0}")]
    Http(std::io::Error),
    /// The XMPP server refused the component for good.
    #[error("fatal: {0}")]
    Xmpp(#[from] FatalError),
    /// The cluster (contract §11) could not start, or this replica cannot go on.
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// A task panicked.
    #[error("{what} failed: {cause}")]
    Task {
        /// Which task.
        what: &'static str,
        /// The panic.
        cause: String,
    },
}

impl AppError {
    /// The process exit code of contract §1: 2 for bad configuration, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => 2,
            AppError::Store(e) if e.is_config() => 2,
            _ => 1,
        }
    }
}

/// Builds the service. See the module docs.
#[derive(Debug)]
pub struct AppBuilder {
    cfg: Config,
    ingest: Ingest,
    listener: Option<TcpListener>,
    engine: Option<Engine>,
}

impl AppBuilder {
    /// The service as `cfg` describes it, fed by the XMPP component, serving on `http.bind`.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            ingest: Ingest::Xmpp,
            listener: None,
            engine: None,
        }
    }

    /// Chooses the ingest source.
    pub fn ingest(mut self, ingest: Ingest) -> Self {
        self.ingest = ingest;
        self
    }

    /// Serves on an already-bound listener instead of binding `http.bind`.
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Feeds an engine that outlives this App (its owner keeps it running; shutdown leaves it
    /// alone). The engine's sinks were fixed when it started, so this cannot be combined with
    /// a configured store. Used to restart a source on a live map (and, later, by a replica
    /// taking over as leader).
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Opens the store, starts the engine, the source, the API, and returns the running App.
    pub async fn start(self) -> Result<App, AppError> {
        let AppBuilder {
            cfg,
            ingest,
            listener,
            engine: external,
        } = self;
        let registry = Registry::new();
        let auth = Auth::from_config_in(&cfg.auth, &registry)?;
        if !auth.configured() {
            tracing::warn!(
                "none of auth.jwt_secret, auth.jwt_public_key_file, auth.jwks_url is set: every authenticated request gets 401"
            );
        }
        let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
            // The message names the key (http.tls_cert / http.tls_key).
            (Some(c), Some(k)) => Some(api::tls_config(c, k).map_err(ConfigError::Load)?),
            _ => None,
        };
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&cfg.http.bind).map_err(|source| AppError::Bind {
                addr: cfg.http.bind.clone(),
                source,
            })?,
        };
        let addr = listener.local_addr().map_err(|source| AppError::Bind {
            addr: cfg.http.bind.clone(),
            source,
        })?;

        // The store first: the engine starts with what the previous run left.
        let (store, store_task, recovered) = match &cfg.store.postgres_url {
            Some(_) if external.is_some() => {
                return Err(ConfigError::Invalid {
                    key: "store.postgres_url".into(),
                    reason: "cannot be combined with an engine started elsewhere".into(),
                }
                .into());
            }
            Some(url) => {
                let (h, t, r) =
                    store::open(&cfg.store, url.expose(), StoreMetrics::new(&registry)).await?;
                (Some(h), Some(t), r)
            }
            None => {
                if ingest == Ingest::Xmpp {
                    tracing::warn!(
                        "store.postgres_url is not set: presence is kept in memory only (no history; last-seen only for this run)"
                    );
                }
                (None, None, store::Recovered::default())
            }
        };

        // Memory-only: this run's history in memory (contract §6).
        let memory_history = (store.is_none() && external.is_none())
            .then(|| MemoryHistory::new(cfg.store.memory_history_events));
        // A replica (contract §11): the cluster's epoch and latest snapshot first.
        let cluster_boot = match &cfg.cluster {
            Some(_) if external.is_some() => {
                return Err(ConfigError::Invalid {
                    key: "cluster".into(),
                    reason: "cannot be combined with an engine started elsewhere".into(),
                }
                .into());
            }
            Some(c) => {
                let node = c.node();
                tracing::info!(%node, stream = %c.stream, nats = %c.nats_url.masked(), "joining the cluster");
                Some((c.clone(), node.clone(), cluster::bootstrap(c, &node).await?))
            }
            _ => None,
        };
        // Webhooks and alerts (contract §7): their own tasks, stopped after the engine so that
        // the last changes still reach the outbox. A replica starts them when it first leads.
        let webhook_cancel = CancellationToken::new();
        let webhook_tasks = TaskTracker::new();
        let hooks = WebhookStarter {
            cfg: cfg.clone(),
            registry: registry.clone(),
            tasks: webhook_tasks.clone(),
            cancel: webhook_cancel.clone(),
        };
        let webhooks = match (&external, &cluster_boot) {
            (None, None) => Some(hooks.start().await?),
            _ => None,
        };
        let (engine, engine_task) = match external {
            Some(e) => (e, None),
            None => {
                let mut sinks: Vec<Arc<dyn ChangeSink>> = Vec::new();
                if let Some(h) = &memory_history {
                    sinks.push(Arc::new(h.clone()));
                }
                let opts = match &cluster_boot {
                    // A replica follows until it takes over; its store writer and webhooks
                    // are the leader's sinks (cluster::Leadership::take_over).
                    Some((c, _, boot)) => {
                        if !recovered.known.is_empty() {
                            tracing::info!(
                                users = recovered.known.len(),
                                "cluster: the map comes from the stream, not from the store's last-seen rows"
                            );
                        }
                        EngineOptions {
                            sinks,
                            seed: boot.seed.clone(),
                            metrics: EngineMetrics::new(&registry),
                            epoch: Some(boot.epoch.clone()),
                            seq: boot.seq,
                            follower: true,
                            takeover_replay: c.takeover_replay,
                        }
                    }
                    None => {
                        if let Some(s) = &store {
                            sinks.insert(0, Arc::new(s.sink().clone()));
                        }
                        if let Some(w) = &webhooks {
                            sinks.push(Arc::new(WebhookSink(w.clone())));
                        }
                        EngineOptions {
                            sinks,
                            seed: recovered.known,
                            metrics: EngineMetrics::new(&registry),
                            ..Default::default()
                        }
                    }
                };
                let (e, t) = Engine::start_with(&cfg.presence, opts);
                (e, Some(t))
            }
        };
        if let Some(w) = &webhooks {
            w.set_epoch(engine.epoch().clone());
        }

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let sources = Sources::new(&cfg, ingest, engine.clone(), &registry, tasks.clone());
        let (mut parts, component_task) = match &cluster_boot {
            Some(_) => (LeaderParts::default(), None),
            None => sources.start(cancel.clone(), recovered.stopped_at)?,
        };
        parts.webhooks = webhooks.clone();

        let mut state = AppState::new(
            engine.clone(),
            None,
            store.clone(),
            registry.clone(),
            cfg.http.clone(),
            cancel.clone(),
            tasks.clone(),
        );
        state.set_leader_parts(parts);
        state.history = memory_history;
        state.retention_days = cfg.store.retention_days;
        if let Some(j) = auth.jwks() {
            // Keys are fetched in the background: until the first fetch, tokens with a kid
            // get 401 and /readyz says the JWKS is unavailable.
            state.jwks = Some(j.clone());
            tasks.spawn(j.clone().run(cancel.clone()));
        }
        let (fatal_tx, fatal_rx) = tokio::sync::mpsc::unbounded_channel();
        let cluster_cancel = CancellationToken::new();
        let mut starter = None;
        let mut replica = None;
        if let Some((c, node, boot)) = cluster_boot {
            let lead = Arc::new(Replica {
                sources,
                hooks,
                store_sink: store.as_ref().map(|s| s.sink().clone()),
                state: std::sync::OnceLock::new(),
                webhooks: tokio::sync::Mutex::new(None),
                running: tokio::sync::Mutex::new(None),
                app_cancel: cancel.clone(),
                fatal: fatal_tx,
            });
            let (handle, s) = cluster::prepare(
                boot,
                c,
                node,
                engine.clone(),
                lead.clone(),
                &registry,
                cluster_cancel.clone(),
            );
            state.cluster = Some(handle);
            starter = Some(s);
            replica = Some(lead);
        }
        let state = Arc::new(state);
        let cluster_task = match (starter, &replica) {
            (Some(s), Some(r)) => {
                let _ = r.state.set(state.clone());
                Some(s.start())
            }
            _ => None,
        };
        api::spawn_sampler(state.clone());
        let server = api::serve(listener, state.clone(), auth, tls).map_err(AppError::Http)?;
        let server_handle = server.handle();
        let server_task = tokio::spawn(server);
        tracing::info!(%addr, tls = cfg.http.tls_cert.is_some(), "HTTP API listening");

        Ok(App {
            addr,
            engine,
            component: state.component(),
            store,
            state,
            cancel,
            tasks,
            server: server_handle,
            server_task,
            component_task,
            engine_task,
            store_task,
            flush_timeout: cfg.store.flush_timeout_secs,
            webhooks,
            webhook_cancel,
            webhook_tasks,
            cluster_task,
            cluster_cancel,
            replica,
            fatal: fatal_rx,
        })
    }
}

/// The running service. Dropping it without [`App::shutdown`] cancels its sources and sessions
/// but does not wait for the writer's flush.
#[derive(Debug)]
pub struct App {
    addr: SocketAddr,
    engine: Engine,
    component: Option<ComponentHandle>,
    store: Option<StoreHandle>,
    state: Arc<AppState>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    server: ServerHandle,
    server_task: JoinHandle<std::io::Result<()>>,
    component_task: Option<JoinHandle<Result<(), FatalError>>>,
    /// None when the engine belongs to someone else ([`AppBuilder::engine`]).
    engine_task: Option<JoinHandle<()>>,
    store_task: Option<JoinHandle<()>>,
    flush_timeout: Duration,
    webhooks: Option<Arc<Webhooks>>,
    webhook_cancel: CancellationToken,
    webhook_tasks: TaskTracker,
    /// A replica's task (contract §11).
    cluster_task: Option<JoinHandle<Result<(), ClusterError>>>,
    /// Cancelled once the engine has closed (a leader's last changes are published first).
    cluster_cancel: CancellationToken,
    replica: Option<Arc<Replica>>,
    /// A replica's component failed for good while it led.
    fatal: tokio::sync::mpsc::UnboundedReceiver<AppError>,
}

impl App {
    /// The API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The presence engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The XMPP component (None unless the ingest is [`Ingest::Xmpp`]).
    pub fn component(&self) -> Option<&ComponentHandle> {
        self.component.as_ref()
    }

    /// The store (None in memory-only mode).
    pub fn store(&self) -> Option<&StoreHandle> {
        self.store.as_ref()
    }

    /// What the API handlers see.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Cancel it to start a shutdown (what a signal does); [`App::wait`] then returns.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs until the shutdown token is cancelled (Ok) or the XMPP component fails for good.
    pub async fn wait(&mut self) -> Result<(), AppError> {
        if let Some(task) = &mut self.cluster_task {
            let ended = tokio::select! {
                r = task => r,
                Some(e) = self.fatal.recv() => return Err(e),
                _ = self.cancel.cancelled() => return Ok(()),
            };
            self.cluster_task = None;
            return match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(AppError::Task {
                    what: "the cluster replica",
                    cause: e.to_string(),
                }),
            };
        }
        let Some(task) = &mut self.component_task else {
            self.cancel.cancelled().await;
            return Ok(());
        };
        let ended = tokio::select! {
            r = task => r,
            _ = self.cancel.cancelled() => return Ok(()),
        };
        self.component_task = None;
        component_ended(ended)
    }

    /// Stops everything, in dependency order, under one deadline (10 s plus
    /// `store.flush_timeout_secs` for the writer's flush). Returns the XMPP component's fatal
    /// error if it failed while stopping.
    pub async fn shutdown(mut self) -> Result<(), AppError> {
        let mut result = Ok(());
        let deadline = Instant::now() + STOP_GRACE + self.flush_timeout + Duration::from_secs(5);
        // Sources, WebSocket sessions (1001), the sampler and resync rounds watch this token.
        self.cancel.cancel();
        if let Some(t) = self.component_task.take() {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(ended) => result = component_ended(ended),
                Err(_) => {
                    tracing::warn!("the XMPP component did not stop within the shutdown deadline")
                }
            }
        }
        self.tasks.close();
        stop_by(
            deadline,
            "WebSocket sessions and background tasks",
            self.tasks.wait(),
        )
        .await;
        let server = self.server.clone();
        let server_task = &mut self.server_task;
        stop_by(deadline, "the HTTP server", async move {
            server.stop(true).await;
            let _ = server_task.await;
        })
        .await;
        // Every source has stopped: the sequencer applies what is queued, then ends.
        if let Some(t) = self.engine_task.take() {
            self.engine.close().await;
            stop_by(deadline, "the presence engine", t).await;
        }
        // A replica: its last changes are published; a leader hands the lease over.
        self.cluster_cancel.cancel();
        if let Some(t) = self.cluster_task.take() {
            stop_by(deadline, "the cluster replica", t).await;
        }
        let replica_hooks = match &self.replica {
            Some(r) => r.webhooks.lock().await.clone(),
            None => None,
        };
        // The last changes' webhook messages reach the outbox; deliveries stop.
        if let Some(w) = self.webhooks.as_ref().or(replica_hooks.as_ref()) {
            stop_by(deadline, "the webhook outbox", w.flush()).await;
        }
        self.webhook_cancel.cancel();
        self.webhook_tasks.close();
        stop_by(deadline, "webhook deliveries", self.webhook_tasks.wait()).await;
        // The writer drains its queue (to Postgres, or the spool past the flush timeout).
        if let (Some(store), Some(t)) = (&self.store, self.store_task.take()) {
            store.close();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::error!(
                    queued = store.queue_depth(),
                    "store writer did not finish flushing in time"
                );
            }
        }
        result
    }
}

/// How the XMPP component's task ended, as the App reports it.
fn component_ended(
    r: Result<Result<(), FatalError>, tokio::task::JoinError>,
) -> Result<(), AppError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(fatal)) => Err(fatal.into()),
        Err(e) => Err(AppError::Task {
            what: "the XMPP component",
            cause: e.to_string(),
        }),
    }
}

/// Awaits `f` until `deadline`; past it, says which part was late and moves on.
async fn stop_by(deadline: Instant, what: &str, f: impl std::future::Future) {
    if tokio::time::timeout_at(deadline, f).await.is_err() {
        tracing::warn!("{what} did not stop within the shutdown deadline");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.webhook_cancel.cancel();
        self.cluster_cancel.cancel();
    }
}

/// Starts webhooks and alerts (contract §7) on demand: at start on a single bridge, when a
/// replica first leads.
#[derive(Debug)]
struct WebhookStarter {
    cfg: Config,
    registry: Registry,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl WebhookStarter {
    async fn start(&self) -> Result<Arc<Webhooks>, AppError> {
        let cfg = &self.cfg;
        // A pool of its own: its connections' I/O then runs on the webhook runtime (low
        // priority) and never on the writer's connections.
        let outbox = match &cfg.store.postgres_url {
            Some(url) => Outbox::Postgres(
                store::pg::pool(url.expose(), 4, cfg.store.connect_timeout_secs)
                    .map_err(AppError::from)?,
            ),
            None => Outbox::memory(),
        };
        let settings = webhooks::Settings {
            endpoints: cfg.webhooks.clone(),
            alerts: cfg.alerts.clone(),
            timeout: cfg.webhooks_timeout_secs,
            max_attempts: cfg.webhooks_max_attempts,
        };
        Webhooks::start(
            settings,
            outbox,
            &self.registry,
            self.tasks.clone(),
            self.cancel.clone(),
        )
        .await
        .map_err(|reason| {
            ConfigError::Invalid {
                key: "webhooks".into(),
                reason,
            }
            .into()
        })
    }
}

/// The sources a leader runs (all of them, on a single bridge): the component, the AMQP
/// consumer, the reconciler, or the demo's simulator. Their metrics are registered once.
#[derive(Debug)]
struct Sources {
    cfg: Config,
    ingest: Ingest,
    engine: Engine,
    tasks: TaskTracker,
    xmpp: Option<XmppMetrics>,
    amqp: Option<AmqpMetrics>,
    reconcile: Option<ReconcileMetrics>,
}

impl Sources {
    fn new(
        cfg: &Config,
        ingest: Ingest,
        engine: Engine,
        registry: &Registry,
        tasks: TaskTracker,
    ) -> Self {
        let xmpp_on = ingest == Ingest::Xmpp && cfg.xmpp_enabled();
        Self {
            xmpp: xmpp_on.then(|| XmppMetrics::new(registry)),
            amqp: (ingest == Ingest::Xmpp && cfg.amqp.is_some())
                .then(|| AmqpMetrics::new(registry)),
            reconcile: (ingest == Ingest::Xmpp && cfg.reconcile.is_some())
                .then(|| ReconcileMetrics::new(registry)),
            cfg: cfg.clone(),
            ingest,
            engine,
            tasks,
        }
    }

    /// Starts them under `cancel`; the component's task says if it failed for good.
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        cancel: CancellationToken,
        lost_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(LeaderParts, Option<JoinHandle<Result<(), FatalError>>>), AppError> {
        let cfg = &self.cfg;
        let engine = &self.engine;
        let tasks = &self.tasks;
        let mut parts = LeaderParts::default();
        let mut component_task = None;
        match self.ingest {
            Ingest::Xmpp if !cfg.xmpp_enabled() => {
                tracing::info!(
                    "[amqp] is set and xmpp.password is not: running without the XMPP component"
                );
            }
            Ingest::Xmpp => {
                tracing::info!(
                    server = %cfg.xmpp.server,
                    component = %cfg.xmpp.component,
                    domains = ?cfg.xmpp.domains,
                    "starting the XMPP component"
                );
                let (h, t) = xmpp::spawn(
                    cfg.xmpp.clone(),
                    engine.clone(),
                    cancel.clone(),
                    SpawnOptions {
                        lost_at,
                        metrics: self.xmpp.clone().unwrap_or_default(),
                        tasks: tasks.clone(),
                    },
                );
                parts.component = Some(h);
                component_task = Some(t);
            }
            Ingest::Simulated {
                users,
                seed,
                backfill_hours,
            } => {
                tasks.spawn(Simulator::new(users, seed).run(
                    engine.clone(),
                    backfill_hours,
                    cancel.clone(),
                ));
            }
            Ingest::None => {}
        }
        if let (Some(a), Some(m)) = (&cfg.amqp, &self.amqp) {
            parts.amqp = Some(amqp::spawn(
                a.clone(),
                cfg.xmpp.domains.clone(),
                engine.clone(),
                cancel.clone(),
                m.clone(),
                tasks,
            ));
        }
        if let (Some(r), Some(m)) = (&cfg.reconcile, &self.reconcile) {
            let rec = Arc::new(
                Reconciler::new(
                    r.clone(),
                    &cfg.xmpp.domains,
                    engine.clone(),
                    parts.component.clone(),
                    m.clone(),
                )
                .map_err(|e| AppError::Task {
                    what: "the reconciler",
                    cause: e.to_string(),
                })?,
            );
            rec.clone().spawn(cancel, tasks);
            parts.reconciler = Some(rec);
        }
        Ok((parts, component_task))
    }
}

/// What this replica runs while it leads (contract §11), started and stopped by the cluster.
#[derive(Debug)]
struct Replica {
    sources: Sources,
    hooks: WebhookStarter,
    store_sink: Option<store::StoreSink>,
    state: std::sync::OnceLock<Arc<AppState>>,
    /// Started the first time this replica leads; kept (its deliveries go on) after.
    webhooks: tokio::sync::Mutex<Option<Arc<Webhooks>>>,
    running: tokio::sync::Mutex<Option<(CancellationToken, TaskTracker)>>,
    app_cancel: CancellationToken,
    fatal: tokio::sync::mpsc::UnboundedSender<AppError>,
}

impl Leadership for Replica {
    fn take_over(&self) -> Step<'_, LeaderSinks> {
        Box::pin(async move {
            let mut sinks: Vec<Arc<dyn ChangeSink>> = Vec::new();
            if let Some(s) = &self.store_sink {
                sinks.push(Arc::new(s.clone()));
            }
            let mut hooks = self.webhooks.lock().await;
            if hooks.is_none() {
                match self.hooks.start().await {
                    Ok(w) => {
                        if let Some(st) = self.state.get() {
                            w.set_epoch(st.engine.epoch().clone());
                        }
                        *hooks = Some(w);
                    }
                    Err(e) => tracing::error!(error = %e, "cluster: webhooks could not start"),
                }
            }
            if let Some(w) = hooks.as_ref() {
                sinks.push(Arc::new(WebhookSink(w.clone())));
            }
            sinks
        })
    }

    fn started(&self) -> Step<'_, ()> {
        Box::pin(async move {
            let cancel = self.app_cancel.child_token();
            let watch = TaskTracker::new();
            match self.sources.start(cancel.clone(), None) {
                Ok((mut parts, task)) => {
                    parts.webhooks = self.webhooks.lock().await.clone();
                    if let Some(st) = self.state.get() {
                        st.set_leader_parts(parts);
                    }
                    if let Some(t) = task {
                        let fatal = self.fatal.clone();
                        watch.spawn(async move {
                            if let Err(e) = component_ended(t.await) {
                                let _ = fatal.send(e);
                            }
                        });
                    }
                }
                Err(e) => {
                    let _ = self.fatal.send(e);
                }
            }
            *self.running.lock().await = Some((cancel, watch));
        })
    }

    fn step_down(&self) -> Step<'_, ()> {
        Box::pin(async move {
            if let Some((cancel, watch)) = self.running.lock().await.take() {
                cancel.cancel();
                watch.close();
                if tokio::time::timeout(STOP_GRACE, watch.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("cluster: the component did not stop within 10 s");
                }
            }
            if let Some(st) = self.state.get() {
                st.set_leader_parts(LeaderParts {
                    webhooks: self.webhooks.lock().await.clone(),
                    ..LeaderParts::default()
                });
            }
        })
    }
}
