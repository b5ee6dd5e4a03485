//! Persistence against a real Postgres: exactly-once bursts, outage → spool → replay, torn
//! spool records, retention, bridge restart with history and last-seen intact.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use deadpool_postgres::Pool;
use presence_bridge::app::Ingest;
use presence_bridge::config::{Config, DbUrl, StoreConfig, XmppConfig};
use presence_bridge::presence::{Engine, EventKind, PresenceEvent, Show, UserJid};
use presence_bridge::store::{StoreHandle, StoreMode, pg, reads};

/// The service with a store (and the given source), its spool in a temporary directory.
struct Rig {
    app: TestApp,
    _spool: tempfile::TempDir,
}

fn store_cfg(url: &str, spool: &std::path::Path) -> StoreConfig {
    StoreConfig {
        postgres_url: Some(DbUrl::new(url)),
        spool_dir: spool.to_owned(),
        write_timeout_secs: Duration::from_secs(2),
        retry_secs: Duration::from_millis(300),
        connect_timeout_secs: Duration::from_secs(1),
        ..StoreConfig::default()
    }
}

async fn rig(url: &str, tweak: impl FnOnce(&mut StoreConfig)) -> Rig {
    rig_in(url, tempfile::tempdir().unwrap(), tweak, None).await
}

/// The service with a store in `spool`, fed by the XMPP component `xmpp` if given.
async fn rig_in(
    url: &str,
    spool: tempfile::TempDir,
    tweak: impl FnOnce(&mut StoreConfig),
    xmpp: Option<XmppConfig>,
) -> Rig {
    let mut store = store_cfg(url, spool.path());
    tweak(&mut store);
    let ingest = if xmpp.is_some() {
        Ingest::Xmpp
    } else {
        Ingest::None
    };
    let cfg = Config {
        store,
        xmpp: xmpp.unwrap_or_default(),
        ..test_config()
    };
    Rig {
        app: TestApp::start(cfg, ingest).await,
        _spool: spool,
    }
}

impl Rig {
    fn engine(&self) -> &Engine {
        self.app.engine()
    }
    fn store(&self) -> &StoreHandle {
        self.app.store()
    }
    fn pool(&self) -> &Pool {
        self.app.store().pool()
    }
    async fn stop(self) {
        self.app.stop().await;
    }
}

const T0: i64 = 1_795_000_000_000; // ms

fn at(i: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(T0 + i as i64).unwrap()
}

/// Event `i` of a burst: for each (user, resource) the steps cycle away → dnd → unavailable,
/// so every event is a real change and produces exactly one stored row with id `i + 1`.
fn burst_event(i: u64) -> PresenceEvent {
    let user = i % 50;
    let res = (i / 50) % 3;
    let step = (i / 150) % 3;
    let kind = match step {
        0 => available(Show::Away, &format!("s{i}"), 1, Some("Gajim")),
        1 => available(Show::Dnd, &format!("s{i}"), 1, Some("Gajim")),
        _ => unavailable(&format!("bye{i}")),
    };
    event(
        u128::from(i) + 1,
        &format!("burst{user}@localhost"),
        &format!("r{res}"),
        at(i),
        kind,
    )
}

async fn feed(engine: &Engine, range: std::ops::Range<u64>) {
    for i in range {
        engine.apply(burst_event(i)).await.unwrap();
    }
    engine.barrier().await.unwrap();
}

fn count(pg: &Pg) -> u64 {
    pg.query("SELECT count(*) FROM presence_events")
        .parse()
        .unwrap()
}

fn assert_exactly_once_in_order(pg: &Pg, n: u64) {
    assert_eq!(count(pg), n, "rows");
    let distinct: u64 = pg
        .query("SELECT count(DISTINCT event_id) FROM presence_events")
        .parse()
        .unwrap();
    assert_eq!(distinct, n, "no duplicates");
    // Event i has id i+1 and at = T0 + i ms: ordered by time, the ids are 1..=n in order.
    let misordered: u64 = pg
        .query(
            "SELECT count(*) FROM (SELECT event_id, row_number() OVER (ORDER BY at, event_id) AS rn FROM presence_events) x \
             WHERE x.event_id <> ('00000000-0000-0000-0000-' || lpad(to_hex(x.rn), 12, '0'))::uuid",
        )
        .parse()
        .unwrap();
    assert_eq!(misordered, 0, "order by time matches the burst order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_lands_exactly_once_with_sessions_and_last_seen() {
    init_logs();
    let pg = Pg::shared("burst");
    let r = rig(&pg.url(), |c| c.batch_size = 700).await;
    let n = 4500; // 10 full away/dnd/unavailable cycles of 150 (user, resource) pairs
    feed(r.engine(), 0..n).await;
    eventually("all events written", || count(&pg) == n).await;
    assert_exactly_once_in_order(&pg, n);
    // Sessions: one per "away" step (opened), all closed by the "unavailable" step.
    let sessions: u64 = pg
        .query("SELECT count(*) FROM presence_sessions")
        .parse()
        .unwrap();
    assert_eq!(sessions, n / 3);
    let open: u64 = pg
        .query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NULL")
        .parse()
        .unwrap();
    assert_eq!(open, 0);
    let bad: u64 = pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at < started_at OR end_cause <> 'stanza'").parse().unwrap();
    assert_eq!(bad, 0);
    // Last-seen: one row per user, offline, last_seen = the time of their last unavailable.
    assert_eq!(pg.query("SELECT count(*) FROM presence_last_seen"), "50");
    let last = pg.query("SELECT online, last_seen = to_timestamp(1795000004.499), show, status FROM presence_last_seen WHERE jid = 'burst49@localhost'");
    assert_eq!(last, "f|t|offline|bye4499");
    let jid = UserJid::parse("burst49@localhost").unwrap();
    let page = reads::history(
        r.pool(),
        &jid,
        &reads::HistoryQuery {
            from: None,
            to: None,
            order: reads::Order::Desc,
            limit: 5,
            cursor: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(page.events.len(), 5);
    assert_eq!(page.events[0].kind, "unavailable");
    assert_eq!(page.events[0].status.as_deref(), Some("bye4499"));
    assert!(page.events.windows(2).all(|w| w[0].at >= w[1].at));
    // Walk the whole history of one user with the cursor, ascending: 90 events, no repeats.
    let mut cursor = None;
    let mut seen = Vec::new();
    loop {
        let q = reads::HistoryQuery {
            from: None,
            to: None,
            order: reads::Order::Asc,
            limit: 7,
            cursor: cursor.clone(),
        };
        let p = reads::history(r.pool(), &jid, &q).await.unwrap();
        seen.extend(p.events.iter().map(|e| e.at));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 90);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    let bad = reads::HistoryQuery {
        from: None,
        to: None,
        order: reads::Order::Asc,
        limit: 7,
        cursor: Some("garbage".into()),
    };
    assert!(matches!(
        reads::history(r.pool(), &jid, &bad).await,
        Err(presence_bridge::store::StoreError::BadCursor)
    ));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_spools_then_replays_everything_once() {
    init_logs();
    let pg = Pg::private("outage");
    let r = rig(&pg.url(), |c| c.batch_size = 500).await;
    feed(r.engine(), 0..1500).await;
    eventually("first part written", || count(&pg) == 1500).await;
    assert_eq!(r.store().status().mode, StoreMode::Ok);

    pg.stop();
    feed(r.engine(), 1500..4500).await;
    eventually("second part spooled", || {
        let s = r.store().status();
        s.mode == StoreMode::Spooling && s.spooled_events == 3000 && r.store().queue_depth() == 0
    })
    .await;
    let st = r.store().status();
    assert!(
        st.oldest_spooled_at.is_some() && st.last_error.is_some(),
        "{st:?}"
    );
    assert!(
        !st.last_error.unwrap_or_default().contains("postgres://"),
        "no connection string in errors"
    );

    pg.start();
    eventually("spool replayed", || {
        r.store().status().mode == StoreMode::Ok
    })
    .await;
    eventually("all rows", || count(&pg) == 4500).await;
    assert_exactly_once_in_order(&pg, 4500);
    assert_eq!(r.store().status().spooled_events, 0);
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NULL"),
        "0"
    );
    // New events after the outage go straight to Postgres again.
    feed(r.engine(), 4500..4650).await;
    eventually("after recovery", || count(&pg) == 4650).await;
    r.stop().await;
}

fn stored(i: u64) -> presence_bridge::store::StoredEvent {
    stored_event(
        u128::from(i) + 1,
        &format!("spool{}@localhost", i % 5),
        at(i),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_spool_record_is_skipped_and_the_rest_replayed_idempotently() {
    init_logs();
    let pg = Pg::shared("torn");
    let spool_dir = tempfile::tempdir().unwrap();
    let batch = |r: std::ops::Range<u64>| r.map(stored).collect::<Vec<_>>();
    // The second batch twice (a batch written twice must leave one copy); the last one torn.
    torn_spool(
        spool_dir.path(),
        &[
            batch(0..100),
            batch(100..250),
            batch(100..250),
            batch(250..300),
        ],
    );

    let r = rig_in(&pg.url(), spool_dir, |_| {}, None).await;
    let store = r.store();
    assert_eq!(
        store.status().mode,
        StoreMode::Spooling,
        "a spool from a previous run is pending"
    );
    eventually("replayed", || store.status().mode == StoreMode::Ok).await;
    assert_eq!(
        count(&pg),
        250,
        "the torn batch is skipped, the duplicate batch is stored once"
    );
    assert_eq!(store.metrics().spool_records_skipped.get(), 1);
    assert_eq!(
        std::fs::read_dir(r._spool.path()).unwrap().count(),
        0,
        "replayed segments are deleted"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_partitions_only() {
    init_logs();
    let pg = Pg::shared("retention");
    let pool = pg::pool(&pg.url(), 4, Duration::from_secs(2)).unwrap();
    pg::migrate(&pool).await.unwrap();
    let now = Utc::now();
    let mut old = stored(1);
    old.at = now - chrono::Duration::days(100);
    let mut recent = stored(2);
    recent.at = now - chrono::Duration::days(3);
    let mut today = stored(3);
    today.at = now;
    let batch = vec![old, recent, today];
    let mut c = pg::client(&pool).await.unwrap();
    pg::ensure_partitions(&c, &pg::batch_days(&batch))
        .await
        .unwrap();
    pg::write_batch(&mut c, &batch, false).await.unwrap();
    assert_eq!(count(&pg), 3);
    let dropped = pg::drop_old_partitions(&c, 30, now).await.unwrap();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(count(&pg), 2);
    assert_eq!(
        pg::drop_old_partitions(&c, 30, now).await.unwrap().len(),
        0,
        "idempotent"
    );
    // Sessions that ended before the first day kept go too; open ones and recent ones stay.
    pg.query(
        "DELETE FROM presence_sessions; INSERT INTO presence_sessions (session_id, jid, resource, started_at, ended_at) VALUES \
         (gen_random_uuid(), 'old@x.example', 'r', now() - interval '101 days', now() - interval '100 days'), \
         (gen_random_uuid(), 'recent@x.example', 'r', now() - interval '4 days', now() - interval '3 days'), \
         (gen_random_uuid(), 'open@x.example', 'r', now() - interval '100 days', NULL)",
    );
    assert_eq!(pg::drop_old_sessions(&c, 30, now).await.unwrap(), 1);
    assert_eq!(
        pg.query("SELECT string_agg(jid, ',' ORDER BY jid) FROM presence_sessions"),
        "open@x.example,recent@x.example"
    );
    // Writing the same batch again through the direct path fails on the unique key; the
    // idempotent path accepts it and keeps one copy.
    let again = vec![batch[1].clone(), batch[2].clone()];
    assert!(pg::write_batch(&mut c, &again, false).await.is_err());
    pg::write_batch(&mut c, &again, true).await.unwrap();
    assert_eq!(count(&pg), 2);
}

#[test]
fn migrate_twice_is_a_no_op() {
    let pg = Pg::shared("migrate");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .args(["migrate", "--config", "/dev/null/none.toml"])
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
            .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
            .output()
            .unwrap()
    };
    // A config path that does not exist is bad usage (exit 2): use the environment only.
    let out = run();
    assert_eq!(out.status.code(), Some(2));
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .current_dir(std::env::temp_dir())
            .arg("migrate")
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
            .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
            .output()
            .unwrap()
    };
    let first = run();
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains(
        "applied 7 migration(s): V1__presence, V2__hot_updates, V3__end_reason_and_new_causes, V4__analytics_indexes, V5__rollups, V6__webhooks, V7__webhook_log"
    ));
    let second = run();
    assert_eq!(second.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&second.stdout).contains("schema up to date"));
    assert_eq!(
        pg.query("SELECT count(*) FROM refinery_schema_history"),
        "7"
    );
    // `rollup` builds every complete day of the retention; again, nothing; `--rebuild`
    // forgets them all and builds them again (the repair path).
    let rollup = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .current_dir(std::env::temp_dir())
            .arg("rollup")
            .args(extra)
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
            .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
            .env("PRESENCE_BRIDGE__STORE__RETENTION_DAYS", "7")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = rollup(&[]);
    assert!(first.contains("built the rollups of"), "{first}");
    let built = pg.query("SELECT count(*) FROM presence_rollup_days");
    assert!(built == "7" || built == "6", "{built} days built");
    assert!(rollup(&[]).contains("every complete day is built already"));
    let again = rollup(&["--rebuild"]);
    assert!(
        again.contains(&format!("forgot {built} built day(s)")),
        "{again}"
    );
    assert_eq!(pg.query("SELECT count(*) FROM presence_rollup_days"), built);
    // Without a database configured, migrate says which key is missing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("migrate")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.postgres_url"));
}

/// The whole bridge with a store, restarted: history and last-seen survive, the users who were
/// online at the stop are probed and confirmed without a single change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_restart_keeps_history_and_last_seen_and_probes_known_users() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let pg = Pg::shared("restart");
    let stays = ej.user("stays", &lease.domain);
    let leaves = ej.user("leaves", &lease.domain);

    // Run 1.
    let spool1 = tempfile::tempdir().unwrap();
    let r1 = rig_in(&pg.url(), spool1, |_| {}, Some(xmpp_cfg(&ej, &lease))).await;
    let b1 = &r1.app;
    b1.connected().await;
    let mut s = Client::login(ej.c2s, &stays, "desk").await;
    s.presence(Some("dnd"), Some("focus"), 4, Some("https://gajim.org"))
        .await;
    let mut l = Client::login(ej.c2s, &leaves, "phone").await;
    l.presence(None, Some("hi"), 0, None).await;
    b1.wait_user(&stays, "online", |p| p.online).await;
    b1.wait_user(&leaves, "online", |p| p.online).await;
    l.unavailable(Some("gone home")).await;
    l.close().await;
    let left = b1.wait_user(&leaves, "offline", |p| !p.online).await;
    r1.stop().await;
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NULL"),
        "1",
        "the desk session stays open across the restart"
    );

    // Run 2: a new process's state, loaded from Postgres.
    let spool2 = tempfile::tempdir().unwrap();
    let r2 = rig_in(&pg.url(), spool2, |_| {}, Some(xmpp_cfg(&ej, &lease))).await;
    let b2 = &r2.app;
    let stays_jid = UserJid::parse(&format!("{stays}@localhost")).unwrap();
    let leaves_jid = UserJid::parse(&format!("{leaves}@localhost")).unwrap();
    let seeded = r2.engine().get(&stays_jid).expect("known after restart");
    assert!(seeded.online);
    assert_eq!(
        seeded
            .resources
            .iter()
            .map(|r| r.resource.as_str())
            .collect::<Vec<_>>(),
        vec!["desk"]
    );
    let (code, ls, _) = b2.get(
        &format!("/api/v1/last-seen/{leaves_jid}"),
        Some(&token("presence:read", None)),
    );
    assert_eq!(code, 200, "{ls}");
    assert_eq!(ls["online"], false);
    let ls_at = chrono::DateTime::parse_from_rfc3339(ls["last_seen"].as_str().unwrap()).unwrap();
    assert_eq!(
        Some(ls_at.timestamp_millis()),
        left.last_seen.map(|t| t.timestamp_millis())
    );
    assert_eq!(ls["status"], "gone home");
    b2.connected().await;
    b2.wait_status("resync over", |s| !s.resyncing).await;
    let probes = b2.component().metrics().probes_sent.get();
    assert!(probes >= 2, "both known users probed: {probes}");
    let p = b2.wait_user(&stays, "still online", |p| p.online).await;
    assert_eq!(p.resources[0].resource, "desk");
    // The probe answer carries the real show/status; it refines the seeded aggregate.
    let p = b2
        .wait_user(&stays, "probe answer applied", |p| {
            p.status.as_deref() == Some("focus")
        })
        .await;
    assert_eq!((p.show, p.priority), (Show::Dnd, 4));
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NULL"),
        "1",
        "no session closed or reopened by the restart"
    );

    // History from run 1 is there.
    let h = reads::history(
        r2.pool(),
        &leaves_jid,
        &reads::HistoryQuery {
            from: None,
            to: None,
            order: reads::Order::Asc,
            limit: 100,
            cursor: None,
        },
    )
    .await
    .unwrap();
    let kinds: Vec<_> = h.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["available", "unavailable"]);
    s.unavailable(None).await;
    b2.wait_user(&stays, "offline", |p| !p.online).await;
    r2.stop().await;
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NULL"),
        "0"
    );
}

/// Postgres up but stuck (a lock held by another session): writes pass the deadline, batches
/// go to the spool, `/readyz` would say spooling; once the lock is gone everything lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_postgres_past_the_deadline_spools_then_catches_up() {
    init_logs();
    let pg = Pg::shared("slow");
    let r = rig(&pg.url(), |c| {
        c.write_timeout_secs = Duration::from_millis(500);
        c.batch_size = 300;
    })
    .await;
    feed(r.engine(), 0..300).await;
    eventually("warm-up written", || count(&pg) == 300).await;

    // Another session takes an exclusive lock on last-seen: every batch write blocks.
    let (locker, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE presence_last_seen IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    feed(r.engine(), 300..1200).await;
    eventually("spooling while stuck", || {
        r.store().status().mode == StoreMode::Spooling
    })
    .await;
    eventually("all stuck events accepted (spooled)", || {
        r.store().status().spooled_events == 900 && r.store().queue_depth() == 0
    })
    .await;
    assert!(
        r.store()
            .status()
            .last_error
            .unwrap_or_default()
            .contains("store.write_timeout_secs")
    );

    locker.batch_execute("ROLLBACK").await.unwrap();
    eventually("caught up", || r.store().status().mode == StoreMode::Ok).await;
    eventually("all rows", || count(&pg) == 1200).await;
    assert_exactly_once_in_order(&pg, 1200);
    r.stop().await;
}

/// The real binary with a store: SIGTERM flushes and records the stop; the restart reads it.
#[test]
fn sigterm_flushes_the_writer_and_records_the_stop() {
    let pg = Pg::shared("sigterm");
    let spool = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("run")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .env(
            "PRESENCE_BRIDGE__XMPP__SERVER",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
        .env("PRESENCE_BRIDGE__STORE__SPOOL_DIR", spool.path())
        .env("PRESENCE_BRIDGE__HTTP__BIND", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while pg.query("SELECT count(*) FROM pg_tables WHERE tablename = 'presence_last_seen'") != "1" {
        assert!(std::time::Instant::now() < deadline, "run did not migrate");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("store writer stopped"), "{err}");
    assert!(
        !err.contains("postgres://postgres@"),
        "no connection string in logs: {err}"
    );
    let stopped = pg.query("SELECT value FROM bridge_state WHERE key = 'stopped_at'");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&stopped).is_ok(),
        "{stopped:?}"
    );
}

/// A SIGTERM while the service is still starting (here: its migration check waits on a lock)
/// neither kills the process nor is lost: once started, it stops cleanly and records the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_cleanly_once_started() {
    let pg = Pg::shared("sigstart");
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("migrate")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
        .output()
        .unwrap();
    assert_eq!(migrate.status.code(), Some(0));
    let (locker, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE refinery_schema_history IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let spool = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("run")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .env(
            "PRESENCE_BRIDGE__XMPP__SERVER",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
        .env("PRESENCE_BRIDGE__STORE__SPOOL_DIR", spool.path())
        .env("PRESENCE_BRIDGE__HTTP__BIND", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The bridge is starting: its migration check waits for the lock.
    eventually("the start waits on the lock", || {
        pg.query(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        ) != "0"
    })
    .await;
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("signal while starting"), "{err}");
    assert!(err.contains("store writer stopped"), "{err}");
    let stopped = pg.query("SELECT value FROM bridge_state WHERE key = 'stopped_at'");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&stopped).is_ok(),
        "{stopped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_end_reason_is_the_sessions_end_cause_and_last_seen_keeps_the_users_status() {
    init_logs();
    let pg = Pg::shared("endreason");
    let r = rig(&pg.url(), |_| {}).await;
    let user = "reason@localhost";
    let dropped = |status: Option<&str>, reason: Option<&str>| EventKind::Unavailable {
        status: status.map(str::to_owned),
        reason: reason.map(str::to_owned),
    };
    // Opened and closed in one batch (the server dropped the TCP connection)…
    r.engine()
        .apply(event(
            1,
            user,
            "phone",
            at(0),
            available(Show::Away, "In a meeting", 1, None),
        ))
        .await
        .unwrap();
    r.engine()
        .apply(event(
            2,
            user,
            "phone",
            at(10),
            dropped(None, Some("socket_closed")),
        ))
        .await
        .unwrap();
    r.engine().barrier().await.unwrap();
    eventually("first session closed", || {
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NOT NULL") == "1"
    })
    .await;
    // …then one closed in a later batch than it opened, by the user's own goodbye.
    r.engine()
        .apply(event(
            3,
            user,
            "laptop",
            at(20),
            available(Show::Chat, "back", 1, None),
        ))
        .await
        .unwrap();
    r.engine().barrier().await.unwrap();
    eventually("second session open", || {
        pg.query("SELECT count(*) FROM presence_sessions") == "2"
    })
    .await;
    r.engine()
        .apply(event(
            4,
            user,
            "laptop",
            at(30),
            dropped(Some("off to bed"), None),
        ))
        .await
        .unwrap();
    r.engine()
        .apply(event(
            5,
            user,
            "tablet",
            at(40),
            available(Show::Xa, "travelling", 1, None),
        ))
        .await
        .unwrap();
    r.engine()
        .apply(event(
            6,
            user,
            "tablet",
            at(50),
            dropped(None, Some("system_shutdown")),
        ))
        .await
        .unwrap();
    r.engine().barrier().await.unwrap();
    eventually("all closed", || {
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NOT NULL") == "3"
    })
    .await;
    assert_eq!(
        pg.query("SELECT string_agg(resource || ':' || end_cause || ':' || coalesce(end_reason, '-'), ',' ORDER BY started_at) FROM presence_sessions"),
        "phone:stanza:socket_closed,laptop:stanza:-,tablet:stanza:system_shutdown"
    );
    // The server's words never become the user's status: last-seen keeps "travelling".
    assert_eq!(
        pg.query("SELECT online, status FROM presence_last_seen WHERE jid = 'reason@localhost'"),
        "f|travelling"
    );
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_events WHERE status LIKE '%shutdown%' OR status LIKE '%socket%'"),
        "0"
    );
    r.stop().await;
}
