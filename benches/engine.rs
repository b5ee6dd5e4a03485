//! The sequencer's ingest rate: 300,000 presence events over 20,000 users (every one a real
//! change: status texts differ), applied through `Engine::apply` with no sinks, timed until
//! `barrier()` confirms the last one. Uses only the engine API that has not changed since
//! the first round, so the same file measures older trees (A/B in docs/benchmarks.md).
//!   cargo bench --bench engine
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use chrono::Utc;
use presence_bridge::config::PresenceConfig;
use presence_bridge::presence::{
    Availability, Cause, Engine, EventKind, PresenceEvent, Show, UserJid,
};

const EVENTS: u64 = 300_000;
const USERS: u64 = 20_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let jids: Vec<UserJid> = (0..USERS)
        .map(|u| UserJid::parse(&format!("user{u}@example.com")).unwrap())
        .collect();
    let shows = [Show::Chat, Show::Available, Show::Away, Show::Xa, Show::Dnd];
    let events: Vec<PresenceEvent> = (0..EVENTS)
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
        .collect();
    for run in 1..=3 {
        let (engine, _task) = Engine::start(&PresenceConfig::default());
        let started = Instant::now();
        for ev in events.iter().cloned() {
            engine.apply(ev).await.unwrap();
        }
        let changes = engine.barrier().await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "run {run}: {EVENTS} events -> {changes} changes in {secs:.2} s = {:.0} changes/s",
            changes as f64 / secs
        );
    }
}
