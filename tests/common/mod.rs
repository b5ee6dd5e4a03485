//! Test harness, one module per concern:
//!
//! - [`app`]: the service under test, started through the production builder;
//! - [`ejabberd`]: real ejabberd nodes and their REST provisioning;
//! - [`xmpp_client`]: a real XMPP client over TCP;
//! - [`pg`]: Postgres databases and private clusters;
//! - [`http`]: HTTP, WebSocket and metrics helpers;
//! - [`events`]: the event builder;
//! - [`fake_http`]: a local HTTP server for admin APIs that cannot run here (MongooseIM);
//! - [`nats`]: private NATS servers with JetStream (the replica tests);
//! - [`prosody`]: private Prosody instances;
//! - [`rabbit`]: RabbitMQ (the machine's broker or a private node) and an event pusher;
//! - [`webhook_receiver`]: a webhook receiver that verifies with the `standardwebhooks` package.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod ejabberd;
pub mod events;
pub mod fake_http;
pub mod http;
pub mod nats;
pub mod pg;
pub mod prosody;
pub mod rabbit;
pub mod webhook_receiver;
pub mod xmpp_client;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use app::*;
pub use ejabberd::*;
pub use events::*;
pub use fake_http::*;
pub use http::*;
pub use nats::*;
pub use pg::*;
pub use prosody::*;
pub use rabbit::*;
pub use webhook_receiver::*;
pub use xmpp_client::*;

/// Generous upper bound for anything to happen; tests never assert on wall-clock time, they
/// only give up after this.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn init_logs() {
    presence_bridge::telemetry::init(
        presence_bridge::config::LogFormat::Text,
        "presence_bridge=debug,presence_bridge::sources::xmpp::component=trace,info",
    );
}

/// A free TCP port on 127.0.0.1 (bound then released: good enough on a test machine).
///
/// Picked below the kernel's ephemeral range (32768–60999 here), never from it: a port the
/// kernel hands out for `bind(0)` is also what it hands out as the local port of outgoing
/// connections, and one did take a private ejabberd's port between the pick and the bind
/// (the load-tool tests open thousands of client connections). 10000–24999 holds none of the
/// machine's services (Postgres 5432, RabbitMQ 5672/15672/25672, NATS 4222/8222, the shared
/// ejabberd's 252xx/253xx).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *PORT_BASE.get_or_init(|| rand::random::<u32>() % 15_000);
    for _ in 0..15_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + ((start + n * 7) % 15_000) as u16;
        if port == 15_672 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 10000-24999")
}

static PORT_BASE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// A unique user name for this process and tag. The shared ejabberd node outlives test runs,
/// and pids wrap (pid_max 32768 here): a pid alone once reused the name of an earlier run's
/// user whose session the server still held, so a per-process random part is added.
pub fn unique_user(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    static RUN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| rand::random::<u32>() & 0xff_ffff);
    format!(
        "{tag}{}x{}r{run:06x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns true (PATIENCE), with a message.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timeout waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
