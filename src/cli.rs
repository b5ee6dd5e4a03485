//! The command line (contract §1). Exit codes: 0 ok, 1 runtime failure, 2 bad usage or
//! invalid config (with a one-line reason naming the key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::api::auth::{self, Auth};
use crate::api::metrics::Metrics;
use crate::api::{self, AppState};
use crate::config::{Config, LogFormat};
use crate::presence::Engine;
use crate::store::{StoreSink, pg, reads, writer};
use crate::{shutdown, telemetry, xmpp};

/// Default config path when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "config/bridge.toml";

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "presence-bridge",
    version,
    about = "Mirrors XMPP presence into live dashboards, history and last-seen lookups"
)]
struct Cli {
    /// Log format (overrides `log.format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: XMPP component + presence engine.
    Run {
        /// Config file (default: config/bridge.toml; optional when every key comes from the environment).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply the SQL migrations in schema/ to the configured Postgres and exit.
    Migrate {
        /// Config file (default: config/bridge.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Self-contained demo: simulated presence, in-memory store, dashboard. Needs no XMPP server
    /// and no database.
    Demo {
        /// Simulated users.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        users: u32,
        /// Dashboard and API address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: String,
    },
    /// Print a JWT signed with the configured HS256 secret (auth.jwt_secret).
    Token {
        /// Subject (who the token is for).
        #[arg(long)]
        sub: String,
        /// Space-separated scopes: presence:read, history:read, admin.
        #[arg(long, default_value = "presence:read")]
        scope: String,
        /// Comma-separated domains the token may see (default: all).
        #[arg(long)]
        domains: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Config file (default: config/bridge.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the config and print it with secrets masked; exit 0 if valid, 1 if not.
    CheckConfig {
        /// Config file (default: config/bridge.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig { config } => {
            let (path, required) = config_path(config);
            match Config::load(&path, required) {
                Ok(cfg) => {
                    println!(
                        "# effective configuration ({}; secrets masked)",
                        path.display()
                    );
                    print!("{}", cfg.to_masked_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("presence-bridge: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { config } => with_config(config, cli.log_format, run),
        Command::Demo { users, bind } => {
            telemetry::init(cli.log_format.unwrap_or_default(), "info");
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let code = rt.block_on(demo(users as usize, bind));
                    rt.shutdown_timeout(Duration::from_secs(1));
                    code
                }
                Err(e) => {
                    eprintln!("presence-bridge: cannot start the runtime: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Token {
            sub,
            scope,
            domains,
            ttl,
            config,
        } => match load(config) {
            Ok(cfg) => token(&cfg, &sub, &scope, domains.as_deref(), ttl),
            Err(code) => code,
        },
        Command::Migrate { config } => with_config(config, cli.log_format, migrate),
    }
}

/// Loads and validates the config, or says why on one line and gives exit code 2.
fn load(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    let (path, required) = config_path(config);
    Config::load(&path, required).map_err(|e| {
        eprintln!("presence-bridge: {e}");
        ExitCode::from(2)
    })
}

/// Loads the config (exit 2 if invalid), sets up logging and a runtime, runs `f`.
fn with_config<F, Fut>(config: Option<PathBuf>, log_format: Option<LogFormat>, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init(log_format.unwrap_or(cfg.log.format), &cfg.log.level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presence-bridge: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(f(cfg));
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// `presence-bridge demo`.
pub async fn demo(users: usize, bind: String) -> ExitCode {
    let listener = match std::net::TcpListener::bind(&bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("presence-bridge: cannot listen on {bind} (--bind): {e}");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(bind);
    // A fresh secret per run: the printed token is the only way in.
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let auth_cfg = crate::config::AuthConfig {
        jwt_secret: crate::config::Secret::new(secret.clone()),
        ..Default::default()
    };
    let auth = match Auth::from_config(&auth_cfg) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            return ExitCode::from(1);
        }
    };
    let token = match auth::mint(
        &secret,
        &auth::claims("demo-admin", "admin", None, 24 * 3600, &auth_cfg),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("presence-bridge: cannot sign the demo token: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    shutdown::on_signals(cancel.clone());
    let (engine, engine_task) = Engine::start(&crate::config::PresenceConfig::default());
    let sim = crate::demo::Simulator::new(users, rand::random());
    let sim_task = tokio::spawn(sim.run(engine.clone(), cancel.clone()));
    let http = crate::config::HttpConfig {
        bind: addr.clone(),
        ..Default::default()
    };
    let state = Arc::new(AppState::new(
        engine.clone(),
        None,
        None,
        None,
        Arc::new(Metrics::new()),
        http,
        cancel.clone(),
    ));
    api::spawn_sampler(state.clone());
    let server = match api::serve(listener, state, auth, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("presence-bridge: cannot start the HTTP server: {e}");
            return ExitCode::from(1);
        }
    };
    let handle = server.handle();
    let server_task = tokio::spawn(server);
    drop(engine);
    // One write, errors ignored: a closed stdout (a supervisor that stopped reading) must not
    // take the demo down the way println! would.
    let banner = format!(
        "presence-bridge demo: {users} simulated users, in-memory store (no XMPP server, no database)\n\n  \
         Dashboard:  http://{addr}/#token={token}\n  API token:  {token}\n              \
         (admin scope, valid 24 h, only for this run)\n\n  \
         Try:  curl -H \"Authorization: Bearer $TOKEN\" http://{addr}/api/v1/stats\nCtrl-C stops the demo.\n"
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }
    cancel.cancelled().await;
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, handle.stop(true)).await;
    let _ = server_task.await;
    let _ = sim_task.await;
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, engine_task).await;
    ExitCode::SUCCESS
}

/// `presence-bridge token`.
fn token(cfg: &Config, sub: &str, scope: &str, domains: Option<&str>, ttl: u64) -> ExitCode {
    if cfg.auth.jwt_secret.is_empty() {
        eprintln!(
            "presence-bridge: invalid config: auth.jwt_secret: required by token (tokens for RS256/ES256 keys come from your identity provider)"
        );
        return ExitCode::from(2);
    }
    if let Some(bad) = scope
        .split_whitespace()
        .find(|s| !["presence:read", "history:read", "admin"].contains(s))
    {
        eprintln!(
            "presence-bridge: unknown scope {bad:?} (--scope): use presence:read, history:read, admin"
        );
        return ExitCode::from(2);
    }
    if sub.trim().is_empty() || ttl == 0 {
        eprintln!("presence-bridge: --sub must not be empty and --ttl must be positive");
        return ExitCode::from(2);
    }
    let domains = domains.map(|d| {
        d.split(',')
            .map(|x| x.trim().to_lowercase())
            .filter(|x| !x.is_empty())
            .collect()
    });
    match auth::mint(
        cfg.auth.jwt_secret.expose(),
        &auth::claims(sub, scope, domains, ttl, &cfg.auth),
    ) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presence-bridge: cannot sign the token: {e}");
            ExitCode::from(1)
        }
    }
}

/// `presence-bridge migrate`.
pub async fn migrate(cfg: Config) -> ExitCode {
    let Some(url) = &cfg.store.postgres_url else {
        eprintln!("presence-bridge: invalid config: store.postgres_url: required by migrate");
        return ExitCode::from(2);
    };
    let pool = match pg::pool(
        url.expose(),
        1,
        Duration::from_secs_f64(cfg.store.connect_timeout_secs),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    match pg::migrate(&pool).await {
        Ok(applied) if applied.is_empty() => {
            println!("schema up to date (no migrations to apply)");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!(
                "applied {} migration(s): {}",
                applied.len(),
                applied.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            ExitCode::from(1)
        }
    }
}

fn config_path(arg: Option<PathBuf>) -> (PathBuf, bool) {
    match arg {
        Some(p) => (p, true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

/// The service. Returns when a signal arrives (exit 0) or on a fatal error (exit 1).
pub async fn run(cfg: Config) -> ExitCode {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        server = %cfg.xmpp.server,
        component = %cfg.xmpp.component,
        domains = ?cfg.xmpp.domains,
        "presence-bridge starting"
    );
    tracing::debug!(config = ?cfg, "effective configuration (secrets masked)");
    let cancel = CancellationToken::new();
    shutdown::on_signals(cancel.clone());

    // The store: migrate, load known users, start the writer. Postgres being down is not
    // fatal: the writer spools and migrates once it is back.
    let mut seed = Vec::new();
    let mut lost_at = None;
    let mut store = None;
    if let Some(url) = &cfg.store.postgres_url {
        let timeout = Duration::from_secs_f64(cfg.store.connect_timeout_secs);
        let pool = match pg::pool(url.expose(), cfg.store.pool_size, timeout) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("presence-bridge: {e}");
                return ExitCode::from(2);
            }
        };
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
                        seed = users;
                    }
                    Err(e) => tracing::warn!(error = %e, "store: cannot load known users"),
                }
                if let Ok(c) = pg::client(&pool).await
                    && let Ok(Some(t)) = pg::get_state(&c, "stopped_at").await
                {
                    lost_at = chrono::DateTime::parse_from_rfc3339(&t)
                        .ok()
                        .map(|t| t.with_timezone(&chrono::Utc));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "store: Postgres not usable at start-up; events are spooled until it is")
            }
        }
        let sink = StoreSink::new();
        match writer::start(&cfg.store, pool.clone(), sink.clone()) {
            Ok((handle, task)) => store = Some((sink, handle, task, pool)),
            Err(e) => {
                eprintln!(
                    "presence-bridge: invalid config: store.spool_dir: {}: {e}",
                    cfg.store.spool_dir.display()
                );
                return ExitCode::from(2);
            }
        }
    } else {
        tracing::warn!(
            "store.postgres_url is not set: presence is kept in memory only (no history; last-seen only for this run)"
        );
    }

    let auth = match Auth::from_config(&cfg.auth) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    if !auth.configured() {
        tracing::warn!(
            "neither auth.jwt_secret nor auth.jwt_public_key_file is set: every authenticated request gets 401"
        );
    }
    let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
        (Some(c), Some(k)) => match api::tls_config(c, k) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("presence-bridge: invalid config: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let listener = match std::net::TcpListener::bind(&cfg.http.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "presence-bridge: cannot listen on {} (http.bind): {e}",
                cfg.http.bind
            );
            return ExitCode::from(1);
        }
    };

    let (engine, engine_task) =
        Engine::start_with(&cfg.presence, store.as_ref().map(|s| s.0.clone()), seed);
    let (component, mut component_task) =
        xmpp::component::spawn_with(cfg.xmpp.clone(), engine.clone(), cancel.clone(), lost_at);
    let metrics = Arc::new(Metrics::new());
    if let Some((_, handle, _, _)) = &store {
        let _ = handle.counters().batch_histograms.set((
            metrics.store_batch_size.clone(),
            metrics.store_batch_latency.clone(),
        ));
    }
    let state = Arc::new(AppState {
        engine: engine.clone(),
        component: Some(component),
        store: store.as_ref().map(|s| s.1.clone()),
        pool: store.as_ref().map(|s| s.3.clone()),
        metrics,
        http: cfg.http.clone(),
        ws_conns: Default::default(),
        shutdown: cancel.clone(),
        samples: Default::default(),
    });
    api::spawn_sampler(state.clone());
    let server = match api::serve(listener, state, auth, tls) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("presence-bridge: cannot start the HTTP server: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(bind = %cfg.http.bind, tls = cfg.http.tls_cert.is_some(), "HTTP API listening");
    let server_handle = server.handle();
    let server_task = tokio::spawn(server);
    drop(engine);

    let code = tokio::select! {
        r = &mut component_task => match r {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(fatal)) => {
                eprintln!("presence-bridge: fatal: {fatal}");
                ExitCode::from(1)
            }
            Err(e) => {
                tracing::error!(error = %e, "XMPP component task failed");
                ExitCode::from(1)
            }
        },
        _ = cancel.cancelled() => {
            if tokio::time::timeout(SHUTDOWN_DEADLINE, &mut component_task).await.is_err() {
                tracing::warn!("XMPP component did not stop within the shutdown deadline");
            }
            ExitCode::SUCCESS
        }
    };
    // Stop accepting, close WebSockets with 1001 (they watch `cancel`), finish requests.
    cancel.cancel();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, server_handle.stop(true))
        .await
        .is_err()
    {
        tracing::warn!("HTTP server did not stop within the shutdown deadline");
    }
    let _ = server_task.await;
    // The sequencer ends once every engine handle is gone; then the writer drains its queue
    // (to Postgres, or the spool past store.flush_timeout_secs).
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, engine_task).await;
    if let Some((_, handle, task, _)) = store {
        handle.close();
        let deadline =
            Duration::from_secs_f64(cfg.store.flush_timeout_secs) + Duration::from_secs(5);
        if tokio::time::timeout(deadline, task).await.is_err() {
            tracing::error!(
                queued = handle.queue_depth(),
                "store writer did not finish flushing in time"
            );
        }
    }
    tracing::info!("presence-bridge stopped");
    code
}
