//! API figures through the real binary and a real ejabberd, on this machine, in one run:
//!
//! 1. REST last-seen requests/s (wrk, keep-alive) against presence-bridge, next to ejabberd's
//!    own REST `get_last` for the same user;
//! 2. stanza → WebSocket latency: an XMPP client sends presences (its send time in the status
//!    text) through ejabberd; a WebSocket client measures when each change arrives.
//!
//!   cargo bench --bench api            (needs root for ejabberd; installs wrk if missing)
//!
//! Prints a markdown table for docs/benchmarks.md.
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const SECRET_KEY: &str = "bench-secret";

fn wrk(args: &[&str]) -> f64 {
    let out = Command::new("wrk").args(args).output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let non2xx = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .map(str::to_owned);
    assert!(
        non2xx.is_none(),
        "errors during the run: {non2xx:?}\n{text}"
    );
    rps
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ok = Command::new("bash")
        .arg(repo().join("scripts/install-deps.sh"))
        .arg("wrk")
        .status()
        .unwrap();
    assert!(ok.success(), "wrk is needed");
    let ej = Ejabberd::shared();
    // Component index 0 (bridge.localhost): tests never lease it.
    let user = ej.user("bench", "bridge.localhost");
    let jid = format!("{user}@localhost");
    let port = free_port();
    let mut bridge = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("run")
        .env(
            "PRESENCE_BRIDGE__XMPP__SERVER",
            format!("127.0.0.1:{}", ej.component_port),
        )
        .env("PRESENCE_BRIDGE__XMPP__COMPONENT", "bridge.localhost")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", SECRET)
        .env("PRESENCE_BRIDGE__HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_TOKEN", "0")
        .env("PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_IP", "0")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", SECRET_KEY)
        .env("PRESENCE_BRIDGE__LOG__LEVEL", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = String::from_utf8(
        Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .current_dir(std::env::temp_dir())
            .args([
                "token",
                "--sub",
                "bench",
                "--scope",
                "presence:read",
                "--ttl",
                "3600",
            ])
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", SECRET)
            .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", SECRET_KEY)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The WebSocket subscriber first, then the user's presences.
    let mut ws =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/api/v1/ws?token={token}"))
            .await
            .expect("ws")
            .0;
    let mut client = Client::login(ej.c2s, &user, "bench").await;
    let n = 2000u32;
    let reader = tokio::spawn(async move {
        let mut lat = Vec::new();
        while lat.len() < n as usize {
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "diff" {
                continue;
            }
            let now = chrono::Utc::now().timestamp_micros();
            for c in v["changes"].as_array().unwrap() {
                if let Some(sent) = c["presence"]["status"]
                    .as_str()
                    .and_then(|s| s.strip_prefix("t="))
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    lat.push((now - sent) as f64 / 1000.0);
                }
            }
        }
        lat
    });
    for i in 0..n {
        let show = if i % 2 == 0 { "away" } else { "chat" };
        let stamp = chrono::Utc::now().timestamp_micros();
        client
            .presence(Some(show), Some(&format!("t={stamp}")), 0, None)
            .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lat = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("all changes")
        .unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    client.unavailable(Some("bench done")).await;
    client.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // REST: the bridge (memory + Postgres-free last-seen) vs ejabberd get_last, same user.
    let url = format!("http://127.0.0.1:{port}/api/v1/last-seen/{jid}");
    let auth = format!("Authorization: Bearer {token}");
    let (code, _) = {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &auth,
                &url,
            ])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), ())
    };
    assert_eq!(code, "200", "last-seen answers before the load");
    let started = Instant::now();
    let bridge_rps = wrk(&["-t2", "-c64", "-d10s", "-H", &auth, &url]);
    let bridge_secs = started.elapsed().as_secs_f64();
    let lua = std::env::temp_dir().join("pb-get-last.lua");
    std::fs::write(
        &lua,
        format!("wrk.method = \"POST\"\nwrk.body = '{{\"user\":\"{user}\",\"host\":\"localhost\"}}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
    )
    .unwrap();
    let ej_rps = wrk(&[
        "-t2",
        "-c64",
        "-d10s",
        "-s",
        lua.to_str().unwrap(),
        &format!("http://127.0.0.1:{}/api/get_last", ej.http),
    ]);
    let _ = bridge.kill();
    let _ = bridge.wait();

    println!("| measure | value |");
    println!("|---|---|");
    println!("| REST last-seen, presence-bridge (wrk -t2 -c64, 10 s) | {bridge_rps:.0} req/s |");
    println!("| REST get_last, ejabberd 23.01 (same wrk, same user) | {ej_rps:.0} req/s |");
    println!("| ratio | {:.1}x |", bridge_rps / ej_rps.max(1.0));
    println!(
        "| stanza → WebSocket latency, {} presences through ejabberd: p50 | {:.2} ms |",
        lat.len(),
        pct(&lat, 0.5)
    );
    println!("| p99 | {:.2} ms |", pct(&lat, 0.99));
    println!("| max | {:.2} ms |", lat.last().copied().unwrap_or(0.0));
    let _ = bridge_secs;
}
