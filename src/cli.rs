//! The command line (contract §1). Exit codes: 0 ok, 1 runtime failure, 2 bad usage or
//! invalid config (with a one-line reason naming the key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::auth;
use crate::app::{AppBuilder, Ingest};
use crate::config::{AuthConfig, Config, HttpConfig, LogFormat, Secret};
use crate::store::pg;
use crate::{shutdown, telemetry};

/// Longest lifetime `token --ttl` accepts: ten years (a larger one would overflow `exp` or
/// outlive any key rotation).
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Default config path when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "config/bridge.toml";

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
    /// Build the analytics rollups of every complete day now (the running service does it every
    /// 10 minutes), after migrating; `--rebuild` first forgets every built day (the repair
    /// path: all days are computed again from the sessions).
    Rollup {
        /// Config file (default: config/bridge.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Forget every built day first.
        #[arg(long)]
        rebuild: bool,
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
        /// Hours of simulated history made (fast, before going live) so that analytics and
        /// replay have a past at once.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(0..=168))]
        backfill_hours: u32,
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
    /// Give the bridge's component to every user's roster (subscription from/both) through
    /// the server's admin API; idempotent, rate-limited. See xmpp/README.md.
    Provision(ProvisionArgs),
}

/// `presence-bridge provision`'s arguments.
#[derive(Debug, clap::Args)]
struct ProvisionArgs {
    /// The server: ejabberd (REST API) or mongooseim (GraphQL + REST admin API; the bridge
    /// must be connected).
    #[arg(long, value_enum)]
    server: crate::provision::ServerKind,
    /// ejabberd: REST API base (http://127.0.0.1:5280/api); MongooseIM: REST admin API
    /// base (http://127.0.0.1:8088/api).
    #[arg(long)]
    api: String,
    /// MongooseIM: GraphQL admin endpoint (http://127.0.0.1:5551/api/graphql).
    #[arg(long)]
    graphql: Option<String>,
    /// HTTP basic auth user for the admin APIs; the password is read from
    /// PRESENCE_BRIDGE_PROVISION_PASSWORD or --password-file (never from the command line).
    #[arg(long)]
    user: Option<String>,
    /// File holding the admin API password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// The component domain (default: xmpp.component of the config).
    #[arg(long)]
    component: Option<String>,
    /// A user domain (repeatable; default: xmpp.domains of the config).
    #[arg(long = "domain")]
    domains: Vec<String>,
    /// Users provisioned per second, at most.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rate: u32,
    /// Only list what would be done.
    #[arg(long)]
    dry_run: bool,
    /// Config file to take the defaults from (default: config/bridge.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
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
        Command::Demo {
            users,
            bind,
            backfill_hours,
        } => {
            telemetry::init(cli.log_format.unwrap_or_default(), "info");
            block_on(demo(users as usize, bind, backfill_hours))
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
        Command::Rollup { config, rebuild } => {
            with_config(config, cli.log_format, move |cfg| rollup(cfg, rebuild))
        }
        Command::Provision(args) => {
            telemetry::init(cli.log_format.unwrap_or_default(), "warn");
            provision(args)
        }
    }
}

/// `provision`: defaults from the config when it loads (explicit flags need none); the admin
/// password from a file or the environment, never from the command line.
fn provision(a: ProvisionArgs) -> ExitCode {
    let (path, required) = config_path(a.config);
    let cfg = Config::load(&path, required).ok();
    let component = a
        .component
        .or_else(|| cfg.as_ref().map(|c| c.xmpp.component.clone()));
    let domains = if a.domains.is_empty() {
        cfg.as_ref()
            .map(|c| c.xmpp.domains.clone())
            .unwrap_or_default()
    } else {
        a.domains
    };
    let Some(component) = component.filter(|_| !domains.is_empty()) else {
        eprintln!(
            "presence-bridge: provision needs --component and --domain (or a config with xmpp.component and xmpp.domains)"
        );
        return ExitCode::from(2);
    };
    let password = match a.password_file {
        Some(f) => match std::fs::read_to_string(&f) {
            Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                eprintln!("presence-bridge: --password-file {}: {e}", f.display());
                return ExitCode::from(2);
            }
        },
        None => std::env::var("PRESENCE_BRIDGE_PROVISION_PASSWORD").ok(),
    };
    let dry_run = a.dry_run;
    let opts = crate::provision::Options {
        kind: a.server,
        api: a.api,
        graphql: a.graphql,
        user: a.user,
        password,
        component,
        domains,
        rate: a.rate,
        dry_run,
    };
    block_on(async move {
        match crate::provision::provision(opts).await {
            Ok(s) => {
                println!("{}{s}", if dry_run { "dry run: " } else { "" });
                if s.failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("presence-bridge: provision: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// Loads and validates the config, or says why on one line and gives exit code 2.
fn load(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    let (path, required) = config_path(config);
    Config::load(&path, required).map_err(|e| {
        eprintln!("presence-bridge: {e}");
        ExitCode::from(2)
    })
}

/// Runs `fut` to completion on a fresh multi-threaded runtime (exit 1 if none can start).
fn block_on(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(fut);
            rt.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Err(e) => {
            eprintln!("presence-bridge: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
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
    block_on(f(cfg))
}

/// Starts the service, runs it until a signal (exit 0) or a fatal error (exit 1), and stops
/// it within its deadline; a second signal exits at once with 130.
async fn serve(builder: AppBuilder, on_started: impl FnOnce(std::net::SocketAddr)) -> ExitCode {
    // Caught from here on: a signal while starting stops the service once it has started
    // (so the writer, the spool and the stop record are in order), not the process at once.
    let mut signals = shutdown::Signals::new();
    let start = builder.start();
    tokio::pin!(start);
    let mut early = None;
    let started = loop {
        tokio::select! {
            r = &mut start => break r,
            sig = signals.next() => {
                if early.is_some() {
                    tracing::warn!(signal = sig, "second signal while starting: exiting immediately");
                    std::process::exit(130);
                }
                tracing::info!(signal = sig, "signal while starting: stopping as soon as started");
                early = Some(sig);
            }
        }
    };
    let mut app = match started {
        Ok(a) => a,
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    on_started(app.addr());
    let result = match early {
        Some(sig) => {
            tracing::info!(signal = sig, "shutting down");
            Ok(())
        }
        None => tokio::select! {
            r = app.wait() => r,
            sig = signals.next() => {
                tracing::info!(signal = sig, "shutting down");
                Ok(())
            }
        },
    };
    let stopped = tokio::select! {
        r = app.shutdown() => r,
        sig = signals.next() => {
            tracing::warn!(signal = sig, "second signal: exiting immediately");
            std::process::exit(130);
        }
    };
    match result.and(stopped) {
        Ok(()) => {
            tracing::info!("presence-bridge stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `presence-bridge demo`: the service with the simulator as its source, the memory store,
/// and a fresh signing secret whose admin token is printed.
pub async fn demo(users: usize, bind: String, backfill_hours: u32) -> ExitCode {
    let listener = match std::net::TcpListener::bind(&bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("presence-bridge: cannot listen on {bind} (--bind): {e}");
            return ExitCode::from(1);
        }
    };
    // A fresh secret per run: the printed token is the only way in.
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let cfg = Config {
        auth: AuthConfig {
            jwt_secret: Secret::new(secret.clone()),
            ..Default::default()
        },
        http: HttpConfig {
            bind,
            ..Default::default()
        },
        ..Default::default()
    };
    let token = match auth::mint(
        &secret,
        &auth::claims("demo-admin", "admin", None, 24 * 3600, &cfg.auth),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("presence-bridge: cannot sign the demo token: {e}");
            return ExitCode::from(1);
        }
    };
    let builder = AppBuilder::new(cfg)
        .ingest(Ingest::Simulated {
            users,
            seed: rand::random(),
            backfill_hours,
        })
        .listener(listener);
    serve(builder, |addr| {
        // One write, errors ignored: a closed stdout (a supervisor that stopped reading) must
        // not take the demo down the way println! would.
        let banner = format!(
            "presence-bridge demo: {users} simulated users, in-memory store (no XMPP server, no database)\n\n  \
             Dashboard:  http://{addr}/#token={token}\n  API token:  {token}\n              \
             (admin scope, valid 24 h, only for this run)\n\n  \
             Try:  curl -H \"Authorization: Bearer $TOKEN\" http://{addr}/api/v1/stats\nCtrl-C stops the demo.\n"
        );
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    })
    .await
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
    if sub.trim().is_empty() {
        eprintln!("presence-bridge: --sub must not be empty");
        return ExitCode::from(2);
    }
    if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        eprintln!(
            "presence-bridge: --ttl must be 1..={MAX_TOKEN_TTL_SECS} seconds (ten years); got {ttl}"
        );
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
/// `presence-bridge rollup [--rebuild]`.
pub async fn rollup(cfg: Config, rebuild: bool) -> ExitCode {
    let Some(url) = &cfg.store.postgres_url else {
        eprintln!("presence-bridge: invalid config: store.postgres_url: required by rollup");
        return ExitCode::from(2);
    };
    let pool = match pg::pool(url.expose(), 2, cfg.store.connect_timeout_secs) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    let run = async {
        pg::migrate(&pool).await?;
        let forgotten = if rebuild {
            crate::store::rollup::rebuild(&pool).await?
        } else {
            0
        };
        let t = std::time::Instant::now();
        let built =
            crate::store::rollup::build_due(&pool, cfg.store.retention_days, chrono::Utc::now())
                .await?;
        Ok::<_, crate::store::StoreError>((forgotten, built, t.elapsed()))
    };
    match run.await {
        Ok((forgotten, built, took)) => {
            if rebuild {
                println!("forgot {forgotten} built day(s)");
            }
            match (built.first(), built.last()) {
                (Some(a), Some(b)) => println!(
                    "built the rollups of {} day(s), {a} to {b}, in {:.1} s",
                    built.len(),
                    took.as_secs_f64()
                ),
                _ => println!("every complete day is built already"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presence-bridge: {e}");
            ExitCode::from(1)
        }
    }
}

pub async fn migrate(cfg: Config) -> ExitCode {
    let Some(url) = &cfg.store.postgres_url else {
        eprintln!("presence-bridge: invalid config: store.postgres_url: required by migrate");
        return ExitCode::from(2);
    };
    let pool = match pg::pool(url.expose(), 1, cfg.store.connect_timeout_secs) {
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

/// `presence-bridge run`: the service as configured.
pub async fn run(cfg: Config) -> ExitCode {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "presence-bridge starting"
    );
    tracing::debug!(config = ?cfg, "effective configuration (secrets masked)");
    serve(AppBuilder::new(cfg), |_| {}).await
}
