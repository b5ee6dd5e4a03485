//! Webhooks (contract §7), two figures:
//! 1. the sequencer's ingest rate (300,000 events, 20,000 users, as `benches/engine.rs`) with
//!    the webhook sink and 10 endpoints configured, next to the same run with no endpoints
//!    (the target: within 10 %);
//! 2. delivery throughput to a local receiver (a minimal HTTP/1.1 server in this process that
//!    answers 204 with keep-alive): messages per second with 1 and with 10 endpoints, from the
//!    in-memory outbox and from Postgres (when it runs on 127.0.0.1:5432).
//!
//! Run: `cargo bench --bench webhooks`
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use presence_bridge::config::{AlertsConfig, PresenceConfig, Secret, WebhookConfig};
use presence_bridge::presence::{
    Availability, Cause, ChangeSink, Engine, EngineMetrics, EngineOptions, EventKind,
    PresenceEvent, Show, UserJid,
};
use presence_bridge::store::pg;
use presence_bridge::webhooks::outbox::Outbox;
use presence_bridge::webhooks::{Settings, WebhookSink, Webhooks};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const EVENTS: u64 = 300_000;
const USERS: u64 = 20_000;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn events(n: u64) -> Vec<PresenceEvent> {
    let jids: Vec<UserJid> = (0..USERS)
        .map(|u| UserJid::parse(&format!("user{u}@example.com")).unwrap())
        .collect();
    let shows = [Show::Chat, Show::Available, Show::Away, Show::Xa, Show::Dnd];
    (0..n)
        .map(|i| {
            let now = Utc::now();
            let kind = if i % 10 == 9 {
                EventKind::Unavailable {
                    status: None,
                    reason: None,
                }
            } else {
                EventKind::Available(Availability {
                    show: shows[(i % 5) as usize],
                    status: Some(format!("status {i}")),
                    priority: 0,
                    client: None,
                    idle_since: None,
                })
            };
            PresenceEvent {
                id: u128::from(i),
                jid: jids[(i % USERS) as usize].clone(),
                resource: format!("r{}", (i / USERS) % 2),
                kind,
                at: now,
                received_at: now,
                cause: Cause::Stanza,
            }
        })
        .collect()
}

/// A receiver that accepts connections and never answers (the deliveries wait on it, so an
/// ingest run measures what accepting messages costs, not the HTTP work).
async fn silent() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    port
}

#[path = "common/receiver.rs"]
mod receiver;

/// The shared benchmark receiver (answers 204, counts requests).
async fn receiver() -> (u16, Arc<AtomicU64>) {
    receiver::start().await.unwrap()
}

fn endpoints(n: usize, port: u16) -> Vec<WebhookConfig> {
    (0..n)
        .map(|i| WebhookConfig {
            id: format!("e{i}"),
            url: format!("http://127.0.0.1:{port}/e{i}"),
            secret: Secret::new(SECRET),
            events: vec![
                "presence.online".into(),
                "presence.offline".into(),
                "presence.update".into(),
            ],
            ..WebhookConfig::default()
        })
        .collect()
}

async fn webhooks(n: usize, port: u16, outbox: Outbox) -> (Arc<Webhooks>, CancellationToken) {
    let cancel = CancellationToken::new();
    let w = Webhooks::start(
        Settings {
            endpoints: endpoints(n, port),
            alerts: AlertsConfig::default(),
            timeout: Duration::from_secs(10),
            max_attempts: 10,
        },
        outbox,
        &prometheus::Registry::new(),
        TaskTracker::new(),
        cancel.clone(),
    )
    .await
    .unwrap();
    (w, cancel)
}

/// Events per second through the sequencer with these sinks.
async fn ingest(evs: &[PresenceEvent], sinks: Vec<Arc<dyn ChangeSink>>) -> f64 {
    let (engine, _t) = Engine::start_with(
        &PresenceConfig::default(),
        EngineOptions {
            sinks,
            seed: Vec::new(),
            metrics: EngineMetrics::new(&prometheus::Registry::new()),
            ..Default::default()
        },
    );
    let started = Instant::now();
    for ev in evs.iter().cloned() {
        engine.apply(ev).await.unwrap();
    }
    let changes = engine.barrier().await.unwrap();
    changes as f64 / started.elapsed().as_secs_f64()
}

/// Messages per second delivered for `changes` changes to `n` endpoints.
async fn deliver(n: usize, changes: u64, outbox: Outbox) -> f64 {
    let (port, count) = receiver().await;
    let (w, cancel) = webhooks(n, port, outbox).await;
    let evs = events(changes);
    let (engine, _t) = Engine::start_with(
        &PresenceConfig::default(),
        EngineOptions {
            sinks: vec![Arc::new(WebhookSink(w.clone()))],
            seed: Vec::new(),
            metrics: EngineMetrics::new(&prometheus::Registry::new()),
            ..Default::default()
        },
    );
    let started = Instant::now();
    for ev in evs {
        engine.apply(ev).await.unwrap();
    }
    let made = engine.barrier().await.unwrap() * n as u64;
    while count.load(Ordering::Relaxed) < made {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = made as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let evs = events(EVENTS);
    let quiet = silent().await;
    let (port, _count) = receiver().await;
    // Each configuration 5 times, alone (its webhook runtime shut down and a pause before the
    // next run); the median.
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    // A Postgres outbox too, when the machine's Postgres answers.
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    let mut admin_client = None;
    let mut pool = None;
    if let Ok(p) = pg::pool(admin, 1, Duration::from_secs(2))
        && let Ok(c) = pg::client(&p).await
    {
        let _ = c
            .batch_execute("DROP DATABASE IF EXISTS pb_bench_webhooks WITH (FORCE)")
            .await;
        c.batch_execute("CREATE DATABASE pb_bench_webhooks")
            .await
            .unwrap();
        let p2 = pg::pool(
            "postgres://postgres@127.0.0.1:5432/pb_bench_webhooks",
            16,
            Duration::from_secs(2),
        )
        .unwrap();
        pg::migrate(&p2).await.unwrap();
        pool = Some(p2);
        admin_client = Some(c);
    }
    let mut base = Vec::new();
    let mut accepted = Vec::new();
    let mut delivering = Vec::new();
    let mut in_pg = Vec::new();
    for _ in 0..5 {
        base.push(ingest(&evs, Vec::new()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 10 endpoints whose receiver never answers: every change becomes 10 messages in the
        // outbox (the work of accepting them), no HTTP work.
        let (w, cancel) = webhooks(10, quiet, Outbox::memory()).await;
        accepted.push(ingest(&evs, vec![Arc::new(WebhookSink(w.clone()))]).await);
        cancel.cancel();
        drop(w);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A receiver that answers 204: deliveries (in this process, receiver included) run
        // while the sequencer ingests.
        let (w, cancel) = webhooks(10, port, Outbox::memory()).await;
        delivering.push(ingest(&evs, vec![Arc::new(WebhookSink(w.clone()))]).await);
        cancel.cancel();
        drop(w);
        if let Some(pool) = &pool {
            // 10 endpoints, the Postgres outbox (receiver never answers): the records are
            // committed in batches while the sequencer ingests.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (w, cancel) = webhooks(10, quiet, Outbox::Postgres(pool.clone())).await;
            in_pg.push(ingest(&evs, vec![Arc::new(WebhookSink(w.clone()))]).await);
            w.flush().await;
            cancel.cancel();
            drop(w);
            let c = pg::client(pool).await.unwrap();
            c.batch_execute("TRUNCATE webhook_log, webhook_cursors, webhook_deliveries")
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (b, a, d) = (
        median(base.clone()),
        median(accepted.clone()),
        median(delivering.clone()),
    );
    println!("| ingest, 300,000 events (median of 5) | events/s | vs no sink |");
    println!("|---|---|---|");
    println!("| no webhook sink | {b:.0} | 100 % |");
    println!(
        "| 10 endpoints, messages accepted into the outbox | {a:.0} | {:.1} % |",
        a / b * 100.0
    );
    println!(
        "| 10 endpoints, delivering to a local receiver | {d:.0} | {:.1} % |",
        d / b * 100.0
    );
    if !in_pg.is_empty() {
        let p = median(in_pg.clone());
        println!(
            "| 10 endpoints, records committed to the Postgres outbox | {p:.0} | {:.1} % |",
            p / b * 100.0
        );
    }
    println!(
        "(all runs: no sink {base:.0?}; accepted {accepted:.0?}; delivering {delivering:.0?}; postgres {in_pg:.0?})"
    );
    // Sustained: 1,500,000 events (several seconds flat out, longer than the outbox task
    // defers its work during a burst), median of 3.
    let long = events(1_500_000);
    let (mut lb, mut la) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        lb.push(ingest(&long, Vec::new()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (w, cancel) = webhooks(10, quiet, Outbox::memory()).await;
        la.push(ingest(&long, vec![Arc::new(WebhookSink(w.clone()))]).await);
        cancel.cancel();
        drop(w);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (lb, la) = (median(lb), median(la));
    println!("| sustained, 1,500,000 events, no webhook sink | {lb:.0} | 100 % |");
    println!(
        "| sustained, 1,500,000 events, 10 endpoints (memory outbox) | {la:.0} | {:.1} % |",
        la / lb * 100.0
    );
    drop(long);
    println!();
    println!("| outbox | endpoints | messages | delivered/s |");
    println!("|---|---|---|---|");
    for (n, changes) in [(1usize, 20_000u64), (10, 2_000)] {
        let r = deliver(n, changes, Outbox::memory()).await;
        println!("| memory | {n} | {} | {r:.0} |", changes * n as u64);
    }
    if let (Some(pool), Some(c)) = (pool, admin_client) {
        for (n, changes) in [(1usize, 20_000u64), (10, 2_000)] {
            let r = deliver(n, changes, Outbox::Postgres(pool.clone())).await;
            println!("| postgres | {n} | {} | {r:.0} |", changes * n as u64);
        }
        drop(pool);
        let _ = c
            .batch_execute("DROP DATABASE IF EXISTS pb_bench_webhooks WITH (FORCE)")
            .await;
    }
}
