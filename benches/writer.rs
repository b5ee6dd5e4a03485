//! Writer throughput against the local Postgres, next to raw binary COPY in the same run.
//!
//!   cargo bench --bench writer                 # needs Postgres on 127.0.0.1:5432 (trust)
//!   PB_BENCH_EVENTS=500000 cargo bench --bench writer
//!   PB_BENCH_DROP_INDEXES=presence_sessions_span,presence_sessions_jid_span cargo bench --bench writer
//!                                              # A/B: the cost of those indexes to the writer
//!
//! Creates (and drops) the database `pb_bench`. Prints a markdown table for docs/benchmarks.md.
//! Three figures: raw COPY of the event rows only; the writer sustained (events pushed as fast
//! as the sink takes them; each batch = COPY + sessions + last-seen in one transaction); and the
//! spool catch-up after an outage (replay of spooled batches, idempotent path).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use presence_bridge::config::StoreConfig;
use presence_bridge::presence::{Cause, Show};
use presence_bridge::store::spool::Spool;
use presence_bridge::store::{StoreMetrics, StoreMode, StoredEvent, UserAfter, pg, writer};

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const URL: &str = "postgres://postgres@127.0.0.1:5432/pb_bench";

/// `churn`: every event opens or closes a session or changes show (worst case: 2/3 of the
/// events are log-ins or log-outs). Otherwise a realistic mix: 1 in 10 events is a log-in, 1 in
/// 10 a log-out, the rest show/status changes of online resources.
fn events(n: u64, id_base: u64, churn: bool) -> Vec<StoredEvent> {
    let t0 = Utc::now().timestamp_millis();
    (0..n)
        .map(|i| {
            let at = DateTime::from_timestamp_millis(t0 + (i / 50) as i64).unwrap_or_default();
            let round = i / 20_000;
            let step = if churn {
                round % 3
            } else {
                match round % 10 {
                    0 => 0,
                    9 => 2,
                    _ => 1,
                }
            };
            let available = step != 2;
            StoredEvent {
                id: u128::from(id_base + i) << 16 | 0xbe,
                jid: format!("user{}@bench.example", i % 20_000),
                resource: if churn {
                    format!("res{}", (i / 20_000) % 2)
                } else {
                    format!("res{}", (i / 200_000) % 2)
                },
                available,
                show: available.then_some(if step == 0 { Show::Chat } else { Show::Away }),
                status: Some(format!("status text {}", i % 97)),
                priority: available.then_some(5),
                client: Some("Conversations".into()),
                idle_since: None,
                at,
                received_at: at,
                cause: Cause::Stanza,
                opened: step == 0,
                closed: step == 2,
                end_reason: None,
                user: UserAfter {
                    online: available,
                    online_since: available.then_some(at),
                    last_seen: (!available).then_some(at),
                    show: if available { Show::Away } else { Show::Offline },
                    status: Some("x".into()),
                },
            }
        })
        .collect()
}

async fn reset_db() {
    let (c, conn) = tokio_postgres::connect(ADMIN, tokio_postgres::NoTls)
        .await
        .expect("connect admin");
    tokio::spawn(conn);
    c.batch_execute("DROP DATABASE IF EXISTS pb_bench WITH (FORCE)")
        .await
        .expect("drop db");
    c.batch_execute("CREATE DATABASE pb_bench")
        .await
        .expect("create db");
}

async fn count(pool: &deadpool_postgres::Pool) -> i64 {
    let c = pg::client(pool).await.expect("client");
    c.query_one("SELECT count(*) FROM presence_events", &[])
        .await
        .expect("count")
        .get(0)
}

fn rate(n: u64, d: Duration) -> String {
    format!("{:.0}", n as f64 / d.as_secs_f64())
}

/// Migrates, then drops the indexes named in `PB_BENCH_DROP_INDEXES` (an A/B of their cost).
async fn migrate(pool: &deadpool_postgres::Pool) {
    pg::migrate(pool).await.expect("migrate");
    let drop = std::env::var("PB_BENCH_DROP_INDEXES").unwrap_or_default();
    let c = pg::client(pool).await.expect("client");
    for name in drop.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        c.batch_execute(&format!("DROP INDEX {name}"))
            .await
            .unwrap_or_else(|e| panic!("DROP INDEX {name}: {e}"));
        eprintln!("dropped index {name}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::var("PB_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let batch = 5000usize;
    let mut rows = Vec::new();

    // 1. Raw COPY of the event rows (same columns, same batch size), no sessions/last-seen.
    reset_db().await;
    let pool = pg::pool(URL, 4, Duration::from_secs(5)).expect("pool");
    migrate(&pool).await;
    let evs = events(n, 0, true);
    {
        let mut c = pg::client(&pool).await.expect("client");
        pg::ensure_partitions(&c, &pg::batch_days(&evs))
            .await
            .expect("partitions");
        let t = Instant::now();
        for chunk in evs.chunks(batch) {
            let tx = c.transaction().await.expect("tx");
            pg::copy_events(&tx, "presence_events", chunk)
                .await
                .expect("copy");
            tx.commit().await.expect("commit");
        }
        let d = t.elapsed();
        assert_eq!(count(&pool).await, n as i64);
        rows.push((
            "raw binary COPY, event rows only, 5k rows/transaction".to_string(),
            n,
            d,
        ));
    }

    for (mix, churn) in [
        ("realistic mix: 10% log-ins, 10% log-outs", false),
        ("churn worst case: 2/3 log-ins/outs", true),
    ] {
        // 2. The writer, sustained: everything pushed into the sink, time until all is in Postgres.
        reset_db().await;
        let pool = pg::pool(URL, 8, Duration::from_secs(5)).expect("pool");
        migrate(&pool).await;
        let spool_dir = tempfile::tempdir().expect("tmp");
        let cfg = StoreConfig {
            spool_dir: spool_dir.path().to_owned(),
            queue_capacity: n as usize + 1,
            ..StoreConfig::default()
        };
        {
            let (h, task) =
                writer::start(&cfg, pool.clone(), StoreMetrics::default()).expect("writer");
            let sink = h.sink().clone();
            let evs = events(n, 0, churn);
            let t = Instant::now();
            for chunk in evs.chunks(1000) {
                sink.push(chunk.iter().cloned());
                tokio::task::yield_now().await;
            }
            while h.metrics().events_written.get() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let d = t.elapsed();
            assert_eq!(h.status().mode, StoreMode::Ok, "nothing spooled");
            assert_eq!(count(&pool).await, n as i64);
            rows.push((format!("writer sustained, {mix}"), n, d));
            h.close();
            let _ = task.await;
        }

        // 3. Catch-up after an outage: n events in the spool, then the writer starts.
        reset_db().await;
        let pool = pg::pool(URL, 8, Duration::from_secs(5)).expect("pool");
        migrate(&pool).await;
        let spool_dir = tempfile::tempdir().expect("tmp");
        {
            let mut s = Spool::open(spool_dir.path(), 16 << 20).expect("spool");
            for chunk in events(n, 0, churn).chunks(batch) {
                s.append(chunk).expect("append");
            }
        }
        let cfg = StoreConfig {
            spool_dir: spool_dir.path().to_owned(),
            ..StoreConfig::default()
        };
        {
            let t = Instant::now();
            let (h, task) =
                writer::start(&cfg, pool.clone(), StoreMetrics::default()).expect("writer");
            let mut w = h.watch();
            let _ = w.wait_for(|s| s.mode == StoreMode::Ok).await;
            let d = t.elapsed();
            assert_eq!(count(&pool).await, n as i64);
            rows.push((format!("spool catch-up after an outage, {mix}"), n, d));
            h.close();
            let _ = task.await;
        }
    }
    reset_db().await;

    println!("| path | events | seconds | events/s |");
    println!("|---|---|---|---|");
    for (name, n, d) in rows {
        println!("| {name} | {n} | {:.2} | {} |", d.as_secs_f64(), rate(n, d));
    }
}
