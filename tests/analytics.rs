//! Analytics and replay (contract §6) end to end: a scripted day of sessions with known
//! intervals, answered exactly — from Postgres and from the in-memory history (memory-only
//! mode), which must agree — and domain-narrowed tokens seeing only their domains.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::config::{Config, DbUrl, StoreConfig};
use presence_bridge::presence::{EventKind, Show};
use serde_json::{Value, json};

fn gone() -> EventKind {
    EventKind::Unavailable {
        status: None,
        reason: None,
    }
}

/// alice@a.example: phone (Conversations) [0, 60 min), pc (Gajim) [30, 90 min);
/// bob@b.example: laptop (no caps) from 45 min, still online.
async fn script(app: &TestApp, t0: DateTime<Utc>) {
    let m = |min: i64| t0 + Duration::minutes(min);
    let evs = vec![
        event(
            1,
            "alice@a.example",
            "phone",
            m(0),
            available(Show::Chat, "on phone", 5, Some("Conversations")),
        ),
        event(
            2,
            "alice@a.example",
            "pc",
            m(30),
            available(Show::Away, "desk", 1, Some("Gajim")),
        ),
        event(
            3,
            "bob@b.example",
            "laptop",
            m(45),
            available(Show::Away, "lunch", 0, None),
        ),
        event(4, "alice@a.example", "phone", m(60), gone()),
        event(5, "alice@a.example", "pc", m(90), gone()),
    ];
    for e in evs {
        app.engine().apply(e).await.unwrap();
    }
    app.engine().barrier().await.unwrap();
}

/// Waits until the writer has committed everything queued so far: events, sessions and
/// last-seen (they go in three parallel transactions, so counting events alone is not enough).
async fn settled(app: &TestApp) {
    let sink = app.store().sink();
    assert!(
        sink.settled_through(sink.pushed(), PATIENCE).await,
        "the writer settled within {PATIENCE:?}"
    );
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A streamed export: 200, an attachment, the body text.
fn export(app: &TestApp, path: &str, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let r = request(app.port, "GET", path, &[("Authorization", &auth)], None);
    assert_eq!(r.status, 200, "{path}: {}", r.text);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-disposition: attachment"),
        "{}",
        r.head
    );
    r.text
}

fn get(app: &TestApp, path: &str, token: &str) -> Value {
    let (code, body, _) = app.get(path, Some(token));
    assert_eq!(code, 200, "{path}: {body}");
    body
}

/// The exact answers for the script; the same for every backend.
fn check(app: &TestApp, t0: DateTime<Utc>) {
    let tok = token("history:read", None);
    let (from, to) = (ts(t0), ts(t0 + Duration::minutes(120)));
    let w = format!("from={from}&to={to}");
    let b = get(app, &format!("/api/v1/analytics/online-time?{w}"), &tok);
    assert_eq!(
        b["rows"],
        json!([
            {"key": "alice@a.example", "seconds": 5400.0, "sessions": 2},
            {"key": "bob@b.example", "seconds": 4500.0, "sessions": 1}
        ]),
        "{b}"
    );
    assert_eq!(
        (b["group"].as_str(), b["from"].as_str()),
        (Some("user"), Some(from.as_str()))
    );
    let b = get(
        app,
        &format!("/api/v1/analytics/online-time?{w}&group=domain"),
        &tok,
    );
    assert_eq!(
        b["rows"][0],
        json!({"key": "a.example", "seconds": 5400.0, "sessions": 2})
    );
    let b = get(
        app,
        &format!("/api/v1/analytics/online-time?{w}&group=client"),
        &tok,
    );
    assert_eq!(
        b["rows"],
        json!([
            {"key": "unknown", "seconds": 4500.0, "sessions": 1},
            {"key": "Conversations", "seconds": 3600.0, "sessions": 1},
            {"key": "Gajim", "seconds": 3600.0, "sessions": 1}
        ])
    );
    let b = get(
        app,
        &format!("/api/v1/analytics/concurrency?{w}&step=1800"),
        &tok,
    );
    let points: Vec<(u64, u64)> = b["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["users"].as_u64().unwrap(),
                p["resources"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(points, vec![(1, 1), (2, 3), (2, 2), (1, 1)], "{b}");
    assert_eq!(
        b["peak"],
        json!({"t": ts(t0 + Duration::minutes(45)), "users": 2})
    );
    assert_eq!(b["points"][1]["t"], ts(t0 + Duration::minutes(30)));
    let b = get(app, &format!("/api/v1/analytics/clients?{w}"), &tok);
    assert_eq!(
        b["rows"],
        json!([
            {"client": "unknown", "users": 1, "resources": 1, "seconds": 4500.0},
            {"client": "Conversations", "users": 1, "resources": 1, "seconds": 3600.0},
            {"client": "Gajim", "users": 1, "resources": 1, "seconds": 3600.0}
        ])
    );
    // Replay at +50 min: alice on two devices (the phone's priority wins), bob since +45.
    let b = get(
        app,
        &format!("/api/v1/replay?at={}", ts(t0 + Duration::minutes(50))),
        &tok,
    );
    let users = b["users"].as_array().unwrap();
    assert_eq!(users.len(), 2, "{b}");
    let alice = &users[0];
    assert_eq!(
        (
            alice["jid"].as_str(),
            alice["show"].as_str(),
            alice["status"].as_str(),
            alice["priority"].as_i64()
        ),
        (
            Some("alice@a.example"),
            Some("chat"),
            Some("on phone"),
            Some(5)
        )
    );
    assert_eq!(alice["online_since"], ts(t0));
    assert_eq!(alice["last_change"], ts(t0 + Duration::minutes(30)));
    assert_eq!(alice["resources"].as_array().unwrap().len(), 2);
    assert_eq!(users[1]["online_since"], ts(t0 + Duration::minutes(45)));
    assert_eq!(users[1]["show"], "away");
    // At +100 min only bob; before the script nobody.
    let b = get(
        app,
        &format!("/api/v1/replay?at={}", ts(t0 + Duration::minutes(100))),
        &tok,
    );
    assert_eq!(b["users"].as_array().unwrap().len(), 1);
    let b = get(
        app,
        &format!("/api/v1/replay?at={}", ts(t0 - Duration::minutes(1))),
        &tok,
    );
    assert_eq!(b["users"], json!([]));

    // Every event of the window, paged.
    let b = get(app, &format!("/api/v1/events?{w}"), &tok);
    let evs = b["events"].as_array().unwrap();
    assert_eq!(evs.len(), 5, "{b}");
    assert_eq!(b["next_cursor"], Value::Null);
    assert_eq!(
        evs[0],
        json!({"at": ts(t0), "jid": "alice@a.example", "resource": "phone", "kind": "available",
               "show": "chat", "status": "on phone", "priority": 5, "client": "Conversations"})
    );
    assert_eq!(
        (evs[3]["kind"].as_str(), evs[3]["show"].as_str()),
        (Some("unavailable"), Some("offline"))
    );
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let b = get(
            app,
            &format!("/api/v1/events?{w}&limit=2&order=desc{cursor}"),
            &tok,
        );
        seen.extend(
            b["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["at"].as_str().unwrap().to_owned()),
        );
        match b["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let mut want: Vec<String> = evs
        .iter()
        .map(|e| e["at"].as_str().unwrap().to_owned())
        .collect();
    want.reverse();
    assert_eq!(seen, want, "desc pages of 2 cover every event once");
    let b = get(app, &format!("/api/v1/events?{w}&jid=bob@b.example"), &tok);
    assert_eq!(b["events"].as_array().unwrap().len(), 1);

    // §4's history of one user: the same from memory as from Postgres.
    let b = get(
        app,
        "/api/v1/history/alice@a.example?order=asc&limit=3",
        &tok,
    );
    let h = b["events"].as_array().unwrap();
    assert_eq!(h.len(), 3, "{b}");
    assert_eq!(
        h[0],
        json!({"at": ts(t0), "resource": "phone", "kind": "available", "show": "chat",
               "status": "on phone", "priority": 5, "cause": "stanza"})
    );
    let next = b["next_cursor"].as_str().unwrap();
    let b = get(
        app,
        &format!("/api/v1/history/alice@a.example?order=asc&limit=3&cursor={next}"),
        &tok,
    );
    assert_eq!(b["events"].as_array().unwrap().len(), 1);
    assert_eq!(b["events"][0]["kind"], "unavailable");
    assert_eq!(b["next_cursor"], Value::Null);

    // Exports: CSV with the contract's header, NDJSON, attachments.
    let csv = export(app, &format!("/api/v1/export/events?{w}"), &tok);
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], "at,jid,resource,kind,show,status,priority,client");
    assert_eq!(lines.len(), 6, "{csv}");
    assert_eq!(
        lines[1],
        format!(
            "{},alice@a.example,phone,available,chat,on phone,5,Conversations",
            ts(t0)
        )
    );
    assert_eq!(
        lines[4],
        format!(
            "{},alice@a.example,phone,unavailable,offline,,,",
            ts(t0 + Duration::minutes(60))
        )
    );
    let nd = export(
        app,
        &format!("/api/v1/export/events?{w}&format=ndjson"),
        &tok,
    );
    let objs: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 5);
    assert_eq!(objs[0], evs[0]);
    let csv = export(app, &format!("/api/v1/export/sessions?{w}"), &tok);
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        vec![
            "jid,resource,client,start,end,end_cause".to_string(),
            format!(
                "alice@a.example,phone,Conversations,{},{},stanza",
                ts(t0),
                ts(t0 + Duration::minutes(60))
            ),
            format!(
                "alice@a.example,pc,Gajim,{},{},stanza",
                ts(t0 + Duration::minutes(30)),
                ts(t0 + Duration::minutes(90))
            ),
            format!("bob@b.example,laptop,,{},,", ts(t0 + Duration::minutes(45))),
        ]
    );

    // A token narrowed to a.example sees a.example only, everywhere.
    let narrow = token("history:read", Some(vec!["a.example"]));
    let b = get(app, &format!("/api/v1/analytics/online-time?{w}"), &narrow);
    assert_eq!(b["rows"].as_array().unwrap().len(), 1);
    assert_eq!(b["rows"][0]["key"], "alice@a.example");
    let b = get(
        app,
        &format!("/api/v1/analytics/concurrency?{w}&step=1800"),
        &narrow,
    );
    assert_eq!(b["peak"]["users"], 1);
    let b = get(app, &format!("/api/v1/analytics/clients?{w}"), &narrow);
    assert!(
        b["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["client"] != "unknown")
    );
    let b = get(
        app,
        &format!("/api/v1/replay?at={}", ts(t0 + Duration::minutes(50))),
        &narrow,
    );
    assert_eq!(b["users"].as_array().unwrap().len(), 1);
    let csv = export(app, &format!("/api/v1/export/sessions?{w}"), &narrow);
    assert!(
        !csv.contains("bob@b.example") && csv.contains("alice@a.example"),
        "{csv}"
    );
    let b = get(app, &format!("/api/v1/events?{w}"), &narrow);
    assert_eq!(b["events"].as_array().unwrap().len(), 4);
    let (c, _, _) = app.get(
        &format!("/api/v1/events?{w}&jid=bob@b.example"),
        Some(&narrow),
    );
    assert_eq!(c, 403);
    // …and asking for another domain gives nothing, not an error.
    let b = get(
        app,
        &format!("/api/v1/analytics/online-time?{w}&domain=b.example"),
        &narrow,
    );
    assert_eq!(b["rows"], json!([]));

    // Bad input: the error shapes, never a 500.
    for (path, code, error) in [
        (format!("/api/v1/analytics/online-time?from={to}&to={from}"), 400, "invalid_range"),
        (format!("/api/v1/analytics/online-time?{w}&group=planet"), 400, "invalid_parameter"),
        (format!("/api/v1/analytics/online-time?{w}&limit=0"), 400, "invalid_parameter"),
        (format!("/api/v1/analytics/concurrency?{w}&step=0"), 400, "invalid_parameter"),
        ("/api/v1/analytics/concurrency?from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z&step=1".into(), 400, "too_many_points"),
        ("/api/v1/replay?at=yesterday".into(), 400, "invalid_parameter"),
        (format!("/api/v1/export/events?{w}&format=xlsx"), 400, "invalid_parameter"),
        (format!("/api/v1/events?{w}&cursor=nonsense"), 400, "invalid_cursor"),
        (format!("/api/v1/events?{w}&limit=10001"), 400, "invalid_parameter"),
        (format!("/api/v1/events?{w}&jid=not%20a%20jid"), 400, "invalid_jid"),
    ] {
        let (c, body, _) = app.get(&path, Some(&tok));
        assert_eq!((c, body["error"].as_str()), (code, Some(error)), "{path}: {body}");
    }
    let (c, _, _) = app.get(
        &format!("/api/v1/analytics/online-time?{w}"),
        Some(&token("presence:read", None)),
    );
    assert_eq!(c, 403, "history:read is required");
    let (c, _, _) = app.get(&format!("/api/v1/replay?{w}"), None);
    assert_eq!(c, 401);
}

fn start_of_window() -> DateTime<Utc> {
    (Utc::now() - Duration::hours(3))
        .duration_trunc(Duration::minutes(1))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_history_answers_every_analytics_question_exactly() {
    init_logs();
    let app = TestApp::start(test_config(), Ingest::None).await;
    let t0 = start_of_window();
    script(&app, t0).await;
    check(&app, t0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_history_gives_the_same_answers() {
    init_logs();
    let pg = Pg::shared("analytics");
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_path_buf(),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::None).await;
    let t0 = start_of_window();
    script(&app, t0).await;
    settled(&app).await;
    assert_eq!(pg.query("SELECT count(*) FROM presence_events"), "5");
    check(&app, t0);
    // Before the history kept (store.retention_days, 30): 400 outside_retention everywhere.
    let t = token("history:read", None);
    let old = ts(Utc::now() - Duration::days(40));
    let w = format!("from={old}&to={}", ts(Utc::now() - Duration::days(35)));
    for path in [
        format!("/api/v1/analytics/online-time?{w}"),
        format!("/api/v1/analytics/concurrency?{w}&step=3600"),
        format!("/api/v1/analytics/clients?{w}"),
        format!("/api/v1/events?{w}"),
        format!("/api/v1/export/events?{w}"),
        format!("/api/v1/export/sessions?{w}"),
        format!("/api/v1/replay?at={old}"),
    ] {
        let (c, body, _) = app.get(&path, Some(&t));
        assert_eq!(c, 400, "{path}: {body}");
        assert_eq!(body["error"], "outside_retention", "{path}");
        assert!(
            body["message"].as_str().unwrap().contains("30 days"),
            "{body}"
        );
    }
    app.stop().await;
}

/// Random scripts fed to both backends: every analytics answer must be the same JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_memory_agree_on_random_histories() {
    use rand::{Rng, SeedableRng};
    init_logs();
    let pg = Pg::shared("agree");
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_path_buf(),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    let db = TestApp::start(cfg, Ingest::None).await;
    let mem = TestApp::start(test_config(), Ingest::None).await;
    let tok = token("history:read", None);
    let t0 = start_of_window() - Duration::hours(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261201);
    let mut at = t0;
    let shows = [Show::Chat, Show::Available, Show::Away, Show::Xa, Show::Dnd];
    let clients = [Some("Gajim"), Some("Dino"), None];
    for id in 1..=300u128 {
        at += Duration::seconds(rng.random_range(1..90));
        let user = format!(
            "u{}@d{}.example",
            rng.random_range(0..6),
            rng.random_range(0..2)
        );
        let res = format!("r{}", rng.random_range(0..3));
        let kind = if rng.random_bool(0.35) {
            gone()
        } else {
            available(
                shows[rng.random_range(0..shows.len())],
                &format!("s{}", rng.random_range(0..4)),
                rng.random_range(-1..6),
                clients[rng.random_range(0..clients.len())],
            )
        };
        for app in [&db, &mem] {
            app.engine()
                .apply(event(id, &user, &res, at, kind.clone()))
                .await
                .unwrap();
        }
    }
    let seq = db.engine().barrier().await.unwrap();
    assert_eq!(mem.engine().barrier().await.unwrap(), seq);
    // Every record the memory history holds reaches Postgres (the same records, one writer).
    let expected = mem.state().history.as_ref().unwrap().len().to_string();
    settled(&db).await;
    assert_eq!(pg.query("SELECT count(*) FROM presence_events"), expected);
    let end = at;
    let mut queries = Vec::new();
    for _ in 0..12 {
        let a = t0 + Duration::seconds(rng.random_range(0..(end - t0).num_seconds()));
        let b = a + Duration::seconds(rng.random_range(1..(end - t0).num_seconds().max(2)));
        let w = format!("from={}&to={}", ts(a), ts(b.min(end)));
        if a >= b.min(end) {
            continue;
        }
        let step = rng.random_range(30..1800);
        queries.push(format!("/api/v1/analytics/online-time?{w}"));
        queries.push(format!("/api/v1/analytics/online-time?{w}&group=domain"));
        queries.push(format!(
            "/api/v1/analytics/online-time?{w}&group=client&domain=d1.example"
        ));
        queries.push(format!("/api/v1/analytics/concurrency?{w}&step={step}"));
        queries.push(format!("/api/v1/analytics/clients?{w}"));
        queries.push(format!("/api/v1/replay?at={}", ts(a)));
        queries.push(format!("/api/v1/events?{w}&limit=10000"));
    }
    assert!(queries.len() > 40);
    for q in &queries {
        let x = get(&db, q, &tok);
        let y = get(&mem, q, &tok);
        assert_eq!(x, y, "{q}");
    }
    db.stop().await;
    mem.stop().await;
}

/// Rollups (schema V5): three past days of random history, built into day rollups, answer
/// exactly what the in-memory history answers from events; a late event in a built day
/// unmarks it (the answers stay right, from sessions), and building again gives them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_of_past_days_agree_and_follow_late_events() {
    use presence_bridge::store::rollup;
    use rand::{Rng, SeedableRng};
    init_logs();
    let pg = Pg::shared("rollups");
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_path_buf(),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    let db = TestApp::start(cfg, Ingest::None).await;
    let mem = TestApp::start(test_config(), Ingest::None).await;
    let tok = token("history:read", None);
    let day0 = (Utc::now() - Duration::days(4))
        .duration_trunc(Duration::days(1))
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut at = day0;
    let clients = [Some("Gajim"), Some("Dino"), None];
    let mut id = 0u128;
    while at < day0 + Duration::days(3) {
        id += 1;
        at += Duration::seconds(rng.random_range(1..900));
        let user = format!(
            "u{}@d{}.example",
            rng.random_range(0..6),
            rng.random_range(0..2)
        );
        let res = format!("r{}", rng.random_range(0..3));
        let kind = if rng.random_bool(0.4) {
            gone()
        } else {
            available(
                Show::Available,
                "",
                0,
                clients[rng.random_range(0..clients.len())],
            )
        };
        for app in [&db, &mem] {
            app.engine()
                .apply(event(id, &user, &res, at, kind.clone()))
                .await
                .unwrap();
        }
    }
    db.engine().barrier().await.unwrap();
    mem.engine().barrier().await.unwrap();
    let expected = mem.state().history.as_ref().unwrap().len().to_string();
    settled(&db).await;
    assert_eq!(pg.query("SELECT count(*) FROM presence_events"), expected);
    let pool = db.state().store.as_ref().unwrap().pool().clone();
    let built = rollup::build_due(&pool, 30, Utc::now()).await.unwrap();
    let days: Vec<_> = (0..3)
        .map(|i| (day0 + Duration::days(i)).date_naive())
        .collect();
    for d in &days {
        assert_eq!(
            pg.query(&format!(
                "SELECT count(*) FROM presence_rollup_days WHERE day = '{d}'"
            )),
            "1",
            "{d} built (this run built {built:?})"
        );
    }
    assert_ne!(
        pg.query("SELECT count(*) FROM presence_rollup_user_day"),
        "0"
    );
    // Windows: whole days (rollups only), days with partial ends (rollups + sessions), and
    // random ones; steps of whole minutes (the minute rollups) and not.
    let mut windows = vec![
        (day0, day0 + Duration::days(3)),
        (day0 + Duration::days(1), day0 + Duration::days(2)),
        (
            day0 + Duration::hours(7),
            day0 + Duration::days(2) + Duration::hours(5),
        ),
        (day0 - Duration::hours(1), day0 + Duration::days(3)),
    ];
    for _ in 0..6 {
        let a = day0 + Duration::minutes(rng.random_range(0..3 * 1440));
        // Windows end before now: open sessions count until the request's now, which two
        // bridges never share to the millisecond.
        let b =
            (a + Duration::minutes(rng.random_range(1..3 * 1440))).min(day0 + Duration::days(3));
        if a < b {
            windows.push((a, b));
        }
    }
    let queries = |windows: &[(DateTime<Utc>, DateTime<Utc>)]| {
        let mut q = Vec::new();
        for (a, b) in windows {
            let w = format!("from={}&to={}", ts(*a), ts(*b));
            for g in ["user", "domain", "client"] {
                q.push(format!("/api/v1/analytics/online-time?{w}&group={g}"));
                q.push(format!(
                    "/api/v1/analytics/online-time?{w}&group={g}&domain=d1.example"
                ));
            }
            for step in [60, 600, 3600, 90] {
                q.push(format!("/api/v1/analytics/concurrency?{w}&step={step}"));
                q.push(format!(
                    "/api/v1/analytics/concurrency?{w}&step={step}&domain=d0.example"
                ));
            }
            q.push(format!("/api/v1/replay?at={}", ts(*a)));
        }
        q
    };
    let compare = |label: &str| {
        for q in queries(&windows) {
            let x = get(&db, &q, &tok);
            let y = get(&mem, &q, &tok);
            assert_eq!(x, y, "{label}: {q}");
        }
    };
    compare("built");
    // A late session in the middle day (as a spool replay would bring).
    let late_at = day0 + Duration::days(1) + Duration::hours(12);
    for app in [&db, &mem] {
        let e = |n: u128, t, k| event(1_000_000 + n, "late@d1.example", "x", t, k);
        app.engine()
            .apply(e(1, late_at, available(Show::Dnd, "", 0, Some("Late"))))
            .await
            .unwrap();
        app.engine()
            .apply(e(2, late_at + Duration::hours(20), gone()))
            .await
            .unwrap();
        app.engine().barrier().await.unwrap();
    }
    eventually("late events written", || {
        pg.query("SELECT count(*) FROM presence_events WHERE jid = 'late@d1.example'") == "2"
    })
    .await;
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM presence_rollup_days WHERE day >= '{}'",
            days[1]
        )),
        "0",
        "the late batch unmarked its day and every later one"
    );
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM presence_rollup_days WHERE day = '{}'",
            days[0]
        )),
        "1",
        "earlier days stay built"
    );
    compare("after the late event");
    let again = rollup::build_due(&pool, 30, Utc::now()).await.unwrap();
    assert!(
        again.contains(&days[1]) && again.contains(&days[2]),
        "{again:?}"
    );
    compare("rebuilt");
    // The answers really come from the rollups: a changed rollup row shows.
    let day1 = format!(
        "/api/v1/analytics/online-time?from={}&to={}",
        ts(day0 + Duration::days(1)),
        ts(day0 + Duration::days(2))
    );
    let before = get(&db, &day1, &tok);
    pg.query(&format!(
        "UPDATE presence_rollup_user_day SET millis = millis + 1000 WHERE day = '{}'",
        days[1]
    ));
    assert_ne!(get(&db, &day1, &tok), before, "online-time read the rollup");
    pg.query(&format!(
        "UPDATE presence_rollup_user_day SET millis = millis - 1000 WHERE day = '{}'",
        days[1]
    ));
    let conc = format!(
        "/api/v1/analytics/concurrency?from={}&to={}&step=600",
        ts(day0 + Duration::days(1)),
        ts(day0 + Duration::days(2))
    );
    let before = get(&db, &conc, &tok);
    pg.query(&format!(
        "UPDATE presence_rollup_minute SET users = users + 100 WHERE scope = '' AND minute >= '{}' AND minute < '{}'",
        ts(day0 + Duration::days(1)),
        ts(day0 + Duration::days(2))
    ));
    assert_ne!(get(&db, &conc, &tok), before, "concurrency read the rollup");
    let late_day = get(
        &db,
        &format!(
            "/api/v1/analytics/online-time?from={}&to={}&group=client",
            ts(day0 + Duration::days(1)),
            ts(day0 + Duration::days(2))
        ),
        &tok,
    );
    assert!(
        late_day["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"] == "Late" && r["seconds"] == 12.0 * 3600.0),
        "{late_day}"
    );
    db.stop().await;
    mem.stop().await;
}

/// Real clients through the shared ejabberd, with known overlaps: online-time equals each
/// session the bridge recorded (to the millisecond), the peak is the two users at the instant
/// the second came online, and replay inside each phase shows exactly who was online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_ejabberd_give_exact_analytics() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let pg = Pg::shared("anaej");
    let a = ej.user("ana", &lease.domain);
    let b = ej.user("anb", &lease.domain);
    let (ja, jb) = (format!("{a}@localhost"), format!("{b}@localhost"));
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_path_buf(),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    let tok = token("presence:read history:read", None);
    let online = |jid: &str, want: bool| {
        let (app, jid, tok) = (&app, jid.to_owned(), tok.clone());
        async move {
            eventually("presence", || {
                let (_, body, _) = app.get(&format!("/api/v1/presence/{jid}"), Some(&tok));
                body["online"] == want
            })
            .await;
        }
    };
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(300));
    let t0 = Utc::now();
    let mut pa = Client::login(ej.c2s, &a, "phone").await;
    pa.presence(Some("chat"), Some("a here"), 1, None).await;
    online(&ja, true).await;
    pause().await;
    let m1 = Utc::now();
    let mut pb = Client::login(ej.c2s, &b, "laptop").await;
    pb.presence(Some("away"), Some("b here"), 0, None).await;
    online(&jb, true).await;
    pause().await;
    let m2 = Utc::now();
    pa.unavailable(None).await;
    online(&ja, false).await;
    pause().await;
    let m3 = Utc::now();
    pb.unavailable(None).await;
    online(&jb, false).await;
    let t1 = Utc::now() + Duration::seconds(1);
    eventually("sessions written", || {
        pg.query("SELECT count(*) FROM presence_sessions WHERE ended_at IS NOT NULL") == "2"
    })
    .await;
    let exact = |jid: &str, what: &str| {
        pg.query(&format!(
            "SELECT {what} FROM presence_sessions WHERE jid = '{jid}'"
        ))
    };
    let ms = |jid: &str| {
        exact(
            jid,
            "floor(extract(epoch FROM (ended_at - started_at)) * 1000)::bigint",
        )
        .parse::<i64>()
        .unwrap()
    };
    let w = format!("from={}&to={}", ts(t0), ts(t1));
    let ot = get(&app, &format!("/api/v1/analytics/online-time?{w}"), &tok);
    let rows = ot["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{ot}");
    for (jid, r) in [(&ja, ms(&ja)), (&jb, ms(&jb))] {
        let row = rows.iter().find(|x| x["key"] == **jid).unwrap();
        assert_eq!(
            row["seconds"].as_f64().unwrap(),
            r as f64 / 1000.0,
            "{jid}: {ot}"
        );
        assert_eq!(row["sessions"], 1);
    }
    let conc = get(
        &app,
        &format!("/api/v1/analytics/concurrency?{w}&step=3600"),
        &tok,
    );
    assert_eq!(conc["peak"]["users"], 2, "{conc}");
    let b_start = exact(
        &jb,
        "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
    );
    assert_eq!(
        conc["peak"]["t"], b_start,
        "the peak is reached when b comes online"
    );
    let at = |t: DateTime<Utc>| {
        let r = get(&app, &format!("/api/v1/replay?at={}", ts(t)), &tok);
        r["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["jid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut both = vec![ja.clone(), jb.clone()];
    both.sort();
    assert_eq!(at(m1), vec![ja.clone()]);
    assert_eq!(at(m2), both);
    assert_eq!(at(m3), vec![jb.clone()]);
    let r = get(&app, &format!("/api/v1/replay?at={}", ts(m2)), &tok);
    let ua = r["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["jid"] == *ja)
        .unwrap();
    assert_eq!(
        (ua["show"].as_str(), ua["status"].as_str()),
        (Some("chat"), Some("a here"))
    );
    pb.close().await;
    pa.close().await;
    app.stop().await;
}
