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
use crate::api::{self, AppState};
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
        // Webhooks and alerts (contract §7): their own tasks, stopped after the engine so that
        // the last changes still reach the outbox.
        let webhook_cancel = CancellationToken::new();
        let webhook_tasks = TaskTracker::new();
        let webhooks = match external {
            Some(_) => None,
            None => {
                // A pool of its own: its connections' I/O then runs on the webhook runtime
                // (low priority) and never on the writer's connections.
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
                Some(
                    Webhooks::start(
                        settings,
                        outbox,
                        &registry,
                        webhook_tasks.clone(),
                        webhook_cancel.clone(),
                    )
                    .await
                    .map_err(|reason| ConfigError::Invalid {
                        key: "webhooks".into(),
                        reason,
                    })?,
                )
            }
        };
        let (engine, engine_task) = match external {
            Some(e) => (e, None),
            None => {
                let mut sinks: Vec<Arc<dyn ChangeSink>> = store
                    .iter()
                    .map(|s| Arc::new(s.sink().clone()) as Arc<dyn ChangeSink>)
                    .collect();
                if let Some(h) = &memory_history {
                    sinks.push(Arc::new(h.clone()));
                }
                if let Some(w) = &webhooks {
                    sinks.push(Arc::new(WebhookSink(w.clone())));
                }
                let (e, t) = Engine::start_with(
                    &cfg.presence,
                    EngineOptions {
                        sinks,
                        seed: recovered.known,
                        metrics: EngineMetrics::new(&registry),
                    },
                );
                (e, Some(t))
            }
        };
        if let Some(w) = &webhooks {
            w.set_epoch(engine.epoch().clone());
        }

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (component, component_task) = match ingest {
            Ingest::Xmpp if !cfg.xmpp_enabled() => {
                tracing::info!(
                    "[amqp] is set and xmpp.password is not: running without the XMPP component"
                );
                (None, None)
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
                        lost_at: recovered.stopped_at,
                        metrics: XmppMetrics::new(&registry),
                        tasks: tasks.clone(),
                    },
                );
                (Some(h), Some(t))
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
                (None, None)
            }
            Ingest::None => (None, None),
        };

        let amqp = match (&cfg.amqp, ingest) {
            (Some(a), Ingest::Xmpp) => Some(amqp::spawn(
                a.clone(),
                cfg.xmpp.domains.clone(),
                engine.clone(),
                cancel.clone(),
                AmqpMetrics::new(&registry),
                &tasks,
            )),
            _ => None,
        };
        let reconciler = match (&cfg.reconcile, ingest) {
            (Some(r), Ingest::Xmpp) => {
                let rec = Arc::new(
                    Reconciler::new(
                        r.clone(),
                        &cfg.xmpp.domains,
                        engine.clone(),
                        component.clone(),
                        ReconcileMetrics::new(&registry),
                    )
                    .map_err(|e| AppError::Task {
                        what: "the reconciler",
                        cause: e.to_string(),
                    })?,
                );
                rec.clone().spawn(cancel.clone(), &tasks);
                Some(rec)
            }
            _ => None,
        };

        let mut state = AppState::new(
            engine.clone(),
            component.clone(),
            store.clone(),
            registry,
            cfg.http.clone(),
            cancel.clone(),
            tasks.clone(),
        );
        state.amqp = amqp;
        state.history = memory_history;
        state.retention_days = cfg.store.retention_days;
        state.reconciler = reconciler;
        state.webhooks = webhooks.clone();
        if let Some(j) = auth.jwks() {
            // Keys are fetched in the background: until the first fetch, tokens with a kid
            // get 401 and /readyz says the JWKS is unavailable.
            state.jwks = Some(j.clone());
            tasks.spawn(j.clone().run(cancel.clone()));
        }
        let state = Arc::new(state);
        api::spawn_sampler(state.clone());
        let server = api::serve(listener, state.clone(), auth, tls).map_err(AppError::Http)?;
        let server_handle = server.handle();
        let server_task = tokio::spawn(server);
        tracing::info!(%addr, tls = cfg.http.tls_cert.is_some(), "HTTP API listening");

        Ok(App {
            addr,
            engine,
            component,
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
        // The last changes' webhook messages reach the outbox; deliveries stop.
        if let Some(w) = &self.webhooks {
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
    }
}
