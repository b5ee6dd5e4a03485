//! The command line (contract §1). Exit codes: 0 ok, 1 runtime failure, 2 bad usage or
//! invalid config (with a one-line reason naming the key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat};
use crate::presence::Engine;
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
        Command::Run { config } => {
            let (path, required) = config_path(config);
            let cfg = match Config::load(&path, required) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("presence-bridge: {e}");
                    return ExitCode::from(2);
                }
            };
            telemetry::init(cli.log_format.unwrap_or(cfg.log.format), &cfg.log.level);
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
            let code = rt.block_on(run(cfg));
            rt.shutdown_timeout(Duration::from_secs(1));
            code
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
    if cfg.store.postgres_url.is_none() {
        tracing::warn!(
            "store.postgres_url is not set: presence is kept in memory only (no history; last-seen only for this run)"
        );
    }
    let cancel = CancellationToken::new();
    shutdown::on_signals(cancel.clone());
    let (engine, engine_task) = Engine::start(&cfg.presence);
    let (_component, mut component_task) =
        xmpp::spawn(cfg.xmpp.clone(), engine.clone(), cancel.clone());
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
            match tokio::time::timeout(SHUTDOWN_DEADLINE, &mut component_task).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(_) => {
                    tracing::warn!("XMPP component did not stop within the shutdown deadline");
                    ExitCode::SUCCESS
                }
            }
        }
    };
    cancel.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, engine_task).await;
    tracing::info!("presence-bridge stopped");
    code
}
