//! History queries at scale (contract §6): 30 days of history for 10,000 users, generated in
//! Postgres, then the answers the API gives, timed (median of 5, after one warm-up).
//!
//!   cargo bench --bench analytics              # needs Postgres on 127.0.0.1:5432 (trust)
//!   PB_BENCH_USERS=2000 PB_BENCH_DAYS=7 cargo bench --bench analytics
//!   PB_BENCH_KEEP=1 cargo bench --bench analytics   # reuse pb_bench_analytics if it is there
//!
//! The data: per user 5 sessions a day on one of three resources (1.5 M sessions for 10,000
//! users × 30 days) and 10 events per session (15 M events), written with server-side
//! `INSERT … SELECT generate_series` into daily partitions, indexed as the migrations say.
//! Each figure is the whole work of the endpoint minus HTTP: the bounded window read and the
//! computation of `src/presence/analytics.rs`. Prints a markdown table for docs/benchmarks.md.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use presence_bridge::presence::analytics::{self, Group};
use presence_bridge::store::memory::HistoryFilter;
use presence_bridge::store::{pg, reads, rollup};

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const URL: &str = "postgres://postgres@127.0.0.1:5432/pb_bench_analytics";

fn env(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn timed<F, Fut, T>(runs: usize, mut f: F) -> (Duration, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = f().await; // warm-up
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        out = f().await;
        times.push(t.elapsed());
    }
    (median(times), out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let users = env("PB_BENCH_USERS", 10_000);
    let days = env("PB_BENCH_DAYS", 30);
    let keep = std::env::var("PB_BENCH_KEEP").is_ok_and(|v| v == "1");
    let admin = pg::pool(ADMIN, 1, Duration::from_secs(5)).expect("admin pool");
    let c = pg::client(&admin)
        .await
        .expect("Postgres on 127.0.0.1:5432");
    let exists = !c
        .query(
            "SELECT 1 FROM pg_database WHERE datname = 'pb_bench_analytics'",
            &[],
        )
        .await
        .expect("query")
        .is_empty();
    let fresh = !(keep && exists);
    if fresh {
        c.batch_execute("DROP DATABASE IF EXISTS pb_bench_analytics WITH (FORCE)")
            .await
            .expect("drop");
        c.batch_execute("CREATE DATABASE pb_bench_analytics")
            .await
            .expect("create");
    }
    let pool = pg::pool(URL, 4, Duration::from_secs(5)).expect("pool");
    pg::migrate(&pool).await.expect("migrate");
    let end: DateTime<Utc> = c
        .query_one("SELECT date_trunc('day', now())", &[])
        .await
        .expect("now")
        .get(0);
    let start = end - chrono::Duration::days(days);
    let db = pg::client(&pool).await.expect("client");
    if fresh {
        let t = Instant::now();
        // Daily partitions, today's included (the last sessions are still open).
        for d in 0..=days {
            let day = start + chrono::Duration::days(d);
            let next = day + chrono::Duration::days(1);
            db.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS presence_events_b{d} PARTITION OF presence_events \
                 FOR VALUES FROM ('{}') TO ('{}')",
                day.to_rfc3339(),
                next.to_rfc3339()
            ))
            .await
            .expect("partition");
        }
        // 5 sessions a day per user, 4.8 h apart (each user with its own phase), on resources
        // r0..r2 in turn (a resource's sessions never overlap), lasting 20 min to 3 h; the last
        // ones still open.
        db.execute(
            "INSERT INTO presence_sessions (session_id, jid, resource, client, started_at, ended_at, end_cause) \
             SELECT gen_random_uuid(), 'u' || u || '@d' || (u % 10) || '.example', 'r' || (k % 3), \
                    (ARRAY['Gajim','Dino','Conversations','Monal',NULL])[1 + (u + k) % 5], \
                    s, CASE WHEN s + d < now() THEN s + d END, CASE WHEN s + d < now() THEN 'stanza' END \
             FROM generate_series(1, $1::int) u, generate_series(0, $2::int * 5 - 1) k, \
                  LATERAL (SELECT $3::timestamptz + k * interval '4.8 hours' + (abs(hashint4(u)) % 17280) * interval '1 second' + (abs(hashint4(u * 7919 + k)) % 3600) * interval '1 second' AS s, \
                                  interval '20 minutes' + (abs(hashint4(u * 31 + k)) % 9600) * interval '1 second' AS d) x",
            &[&(users as i32), &(days as i32), &start],
        )
        .await
        .expect("sessions");
        let sessions_s = t.elapsed();
        // 10 events per session: available, 8 show changes spread over it, unavailable.
        db.execute(
            "INSERT INTO presence_events (event_id, at, received_at, jid, resource, kind, show, status, priority, client, idle_since, cause) \
             SELECT gen_random_uuid(), a, a, s.jid, s.resource, \
                    CASE WHEN i = 9 THEN 'unavailable' ELSE 'available' END, \
                    CASE WHEN i = 9 THEN NULL ELSE (ARRAY['chat','available','away','xa','dnd'])[1 + i % 5] END, \
                    'status ' || i, CASE WHEN i = 9 THEN NULL ELSE 1 END, s.client, NULL, 'stanza' \
             FROM presence_sessions s, generate_series(0, 9) i, \
                  LATERAL (SELECT s.started_at + (coalesce(s.ended_at, now()) - s.started_at) * i / 9 AS a) x \
             WHERE i < 9 OR s.ended_at IS NOT NULL",
            &[],
        )
        .await
        .expect("events");
        db.batch_execute("ANALYZE").await.expect("analyze");
        eprintln!(
            "generated in {:.1} s (sessions {:.1} s)",
            t.elapsed().as_secs_f64(),
            sessions_s.as_secs_f64()
        );
    }
    let n_sessions: i64 = db
        .query_one("SELECT count(*) FROM presence_sessions", &[])
        .await
        .expect("count")
        .get(0);
    let n_events: i64 = db
        .query_one("SELECT count(*) FROM presence_events", &[])
        .await
        .expect("count")
        .get(0);
    let all = HistoryFilter::default();
    let now = Utc::now();
    // The rollups of every complete day, as the builder makes them.
    let t = Instant::now();
    let built = rollup::build_due(&pool, days as u32, now)
        .await
        .expect("rollups");
    let rollup_s = t.elapsed();
    let week_from = end - chrono::Duration::days(8);
    let week_to = end - chrono::Duration::days(1);
    let online = |from, to| {
        let pool = pool.clone();
        let all = all.clone();
        async move {
            rollup::online_time(&pool, from, to, now, Group::User, &all, 100, 2_000_000)
                .await
                .expect("online-time")
                .expect("bounded")
                .len()
        }
    };
    let (t_online, rows) = timed(5, || online(week_from, week_to)).await;
    // The worst split: two almost-whole days at the ends come from sessions.
    let (t_online_ragged, _) = timed(5, || {
        online(
            week_from + chrono::Duration::minutes(1),
            week_to - chrono::Duration::minutes(1),
        )
    })
    .await;
    // Without rollups (the sessions alone), for comparison.
    let (t_online_raw, _) = timed(3, || async {
        let spans: Vec<_> = reads::spans(&pool, week_from, week_to, &all, 2_000_000)
            .await
            .expect("spans")
            .expect("bounded")
            .into_iter()
            .map(|r| r.span)
            .collect();
        analytics::online_time(&spans, week_from, week_to, now, Group::User, 100).len()
    })
    .await;
    let day_from = end - chrono::Duration::days(2);
    let day_to = end - chrono::Duration::days(1);
    let conc = |from, to| {
        let pool = pool.clone();
        let all = all.clone();
        async move {
            rollup::concurrency(
                &pool,
                from,
                to,
                chrono::Duration::seconds(60),
                now,
                &all,
                2_000_000,
            )
            .await
            .expect("concurrency")
            .expect("minute steps")
            .expect("bounded")
            .points
            .len()
        }
    };
    let (t_conc, points) = timed(5, || conc(day_from, day_to)).await;
    let (t_conc_ragged, _) = timed(5, || {
        conc(
            day_from + chrono::Duration::hours(12),
            day_to + chrono::Duration::hours(12),
        )
    })
    .await;
    let at = end - chrono::Duration::days(3) + chrono::Duration::hours(14);
    let (t_replay, online) = timed(5, || async {
        let (spans, events) =
            reads::replay_state(&pool, at, at - chrono::Duration::days(30), &all, 2_000_000)
                .await
                .expect("replay")
                .expect("bounded");
        analytics::replay(&spans, &events, at).len()
    })
    .await;
    let (t_export, exported) = timed(3, || async {
        let mut cur = reads::ExportCursor::events(&pool, day_from, day_to, &all)
            .await
            .expect("cursor");
        let mut n = 0usize;
        loop {
            let rows = cur.next_events(5000).await.expect("fetch");
            if rows.is_empty() {
                break;
            }
            n += rows.len();
        }
        n
    })
    .await;
    println!(
        "\n| history: {users} users × {days} days ({n_sessions} sessions, {n_events} events) | answer | time (median) |"
    );
    println!("|---|---|---|");
    println!(
        "| rollups of {} days built | {} days | {:.1} s |",
        days,
        built.len(),
        rollup_s.as_secs_f64()
    );
    println!(
        "| online-time, one week (whole days), by user | {rows} rows | {:.0} ms |",
        t_online.as_secs_f64() * 1000.0
    );
    println!(
        "| online-time, one week starting and ending 1 min inside a day | {rows} rows | {:.0} ms |",
        t_online_ragged.as_secs_f64() * 1000.0
    );
    println!(
        "| online-time, one week, from sessions only (no rollups) | {rows} rows | {:.0} ms |",
        t_online_raw.as_secs_f64() * 1000.0
    );
    println!(
        "| concurrency, one day (midnight to midnight), 60 s steps | {points} points | {:.0} ms |",
        t_conc.as_secs_f64() * 1000.0
    );
    println!(
        "| concurrency, one day from noon to noon, 60 s steps | {points} points | {:.0} ms |",
        t_conc_ragged.as_secs_f64() * 1000.0
    );
    println!(
        "| replay at an instant | {online} users online | {:.0} ms |",
        t_replay.as_secs_f64() * 1000.0
    );
    println!(
        "| export of one day's events (one cursor, FETCH 5,000) | {exported} rows | {:.0} rows/s |",
        exported as f64 / t_export.as_secs_f64()
    );
}
