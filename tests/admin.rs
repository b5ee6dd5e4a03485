//! Operator control (contract §8): the subscribers list and closing one session, resync on
//! demand through a real ejabberd, the right to erasure against Postgres and the in-memory
//! history, and every admin endpoint refusing a token without `admin`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use presence_bridge::api::auth;
use presence_bridge::app::Ingest;
use presence_bridge::config::{AuthConfig, Config, DbUrl, Secret, StoreConfig};
use presence_bridge::presence::{EventKind, Show};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// A token for another subject than the usual `tester`.
fn token_for(sub: &str, scope: &str) -> String {
    let cfg = AuthConfig {
        jwt_secret: Secret::new(API_SECRET),
        ..AuthConfig::default()
    };
    auth::mint(API_SECRET, &auth::claims(sub, scope, None, 300, &cfg)).unwrap()
}

fn delete(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    let (c, body, _) = http::api(app.port, "DELETE", path, Some(token), None);
    (c, body)
}

fn gone() -> EventKind {
    EventKind::Unavailable {
        status: None,
        reason: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_other_scopes() {
    init_logs();
    let app = TestApp::start(test_config(), Ingest::None).await;
    for scope in [
        "presence:read",
        "history:read",
        "presence:read history:read",
    ] {
        let t = token(scope, None);
        for (method, path) in [
            ("GET", "/api/v1/admin/subscribers"),
            ("DELETE", "/api/v1/admin/subscribers/0123456789abcdef"),
            ("POST", "/api/v1/admin/resync"),
            ("POST", "/api/v1/admin/reconcile"),
            ("DELETE", "/api/v1/users/alice@example.com"),
        ] {
            let (c, body, _) = http::api(app.port, method, path, Some(&t), None);
            assert_eq!(c, 403, "{scope}: {method} {path}: {body}");
            assert_eq!(body["error"], "forbidden", "{body}");
            let (c, _, _) = http::api(app.port, method, path, None, None);
            assert_eq!(c, 401, "{method} {path} without a token");
        }
    }
    // Without an XMPP component (memory, no ingest) a resync cannot be done.
    let admin = token("admin", None);
    let (c, body, _) = app.post("/api/v1/admin/resync", Some(&admin), "");
    assert_eq!(
        (c, body["error"].as_str()),
        (501, Some("resync_unavailable"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_listed_and_an_operator_closes_one() {
    init_logs();
    let app = TestApp::start(test_config(), Ingest::None).await;
    let admin = token("admin", None);
    let t1 = token_for("wallboard", "presence:read");
    let t2 = token_for("webapp", "presence:read");
    let mut w1 = app.ws(&format!("token={t1}"), None).await;
    assert_eq!(next_frame(&mut w1).await["type"], "snapshot");
    let mut w2 = app
        .ws(&format!("token={t2}&domains=example.org"), None)
        .await;
    assert_eq!(next_frame(&mut w2).await["type"], "snapshot");
    let list = || {
        let (c, body, _) = app.get("/api/v1/admin/subscribers", Some(&admin));
        assert_eq!(c, 200, "{body}");
        body["subscribers"].as_array().unwrap().clone()
    };
    let subs = list();
    assert_eq!(subs.len(), 2, "{subs:?}");
    assert_eq!(subs[0]["sub"], "wallboard");
    assert_eq!(subs[1]["sub"], "webapp");
    assert!(subs[0]["filter"]["domains"].is_null());
    assert_eq!(subs[0]["mode"], "diffs");
    assert_eq!(
        subs[1]["filter"]["domains"],
        serde_json::json!(["example.org"])
    );
    for s in &subs {
        assert_eq!(s["frames_sent"], 1, "the snapshot: {s}");
        assert_eq!(s["resyncs"], 0);
        assert!(s["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(s["id"].as_str().unwrap().len(), 16);
    }
    // A change of filter shows in the list.
    w1.send(Message::Text(
        r#"{"type":"subscribe","jids":["bob@example.com"]}"#.into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut w1).await["type"], "snapshot");
    eventually("filter listed", || {
        list()[0]["filter"]["jids"] == serde_json::json!(["bob@example.com"])
    })
    .await;
    assert_eq!(list()[0]["frames_sent"], 2);
    // Closing one: it gets closed_by_admin and 1008; the other stays.
    let id = subs[1]["id"].as_str().unwrap().to_owned();
    let (c, _) = delete(&app, &format!("/api/v1/admin/subscribers/{id}"), &admin);
    assert_eq!(c, 204);
    let frame = next_frame(&mut w2).await;
    assert_eq!(frame["type"], "error");
    assert_eq!(frame["error"], "closed_by_admin");
    let code = tokio::time::timeout(PATIENCE, async {
        loop {
            match w2.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1008));
    eventually("closed session unlisted", || list().len() == 1).await;
    assert_eq!(list()[0]["sub"], "wallboard");
    let (c, body) = delete(&app, &format!("/api/v1/admin/subscribers/{id}"), &admin);
    assert_eq!(
        (c, body["error"].as_str()),
        (404, Some("unknown_subscriber"))
    );
    let m = http::metrics_text(app.port);
    assert!(
        m.contains(r#"presence_bridge_ws_closed_total{reason="closed_by_admin"} 1"#),
        "{m}"
    );
    app.stop().await;
}

/// Erasure against Postgres: the user's history, sessions, last-seen and per-user rollups go,
/// everybody else's stay; live subscribers see the user leave; the bridge forgets them until
/// their next presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_everything_about_a_user_from_postgres() {
    init_logs();
    let pg = Pg::shared("erase");
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
    let admin = token("admin", None);
    let reader = token("presence:read history:read", None);
    let t0 = chrono::Utc::now() - chrono::Duration::hours(2);
    let m = |min: i64| t0 + chrono::Duration::minutes(min);
    let evs = vec![
        event(
            1,
            "alice@a.example",
            "phone",
            m(0),
            available(Show::Chat, "secret plans", 1, Some("Conversations")),
        ),
        event(
            2,
            "bob@a.example",
            "pc",
            m(1),
            available(Show::Away, "", 0, None),
        ),
        event(3, "alice@a.example", "phone", m(10), gone()),
        event(
            4,
            "alice@a.example",
            "pc",
            m(20),
            available(Show::Dnd, "still here", 0, Some("Gajim")),
        ),
    ];
    for e in evs {
        app.engine().apply(e).await.unwrap();
    }
    app.engine().barrier().await.unwrap();
    eventually("written", || {
        pg.query("SELECT count(*) FROM presence_events") == "4"
    })
    .await;
    // Per-user rollup rows (the builder's first pass must be over, or it would replace them).
    eventually("first rollup pass", || {
        pg.query("SELECT count(*) FROM presence_rollup_days")
            .parse::<u32>()
            .unwrap()
            >= 29
    })
    .await;
    pg.query(
        "INSERT INTO presence_rollup_user_day VALUES (current_date - 3, 'alice@a.example', 1000, 1), (current_date - 3, 'bob@a.example', 1000, 1)",
    );
    let mut ws = app.ws(&format!("token={reader}"), None).await;
    let snap = next_frame(&mut ws).await;
    assert_eq!(snap["users"].as_array().unwrap().len(), 2);
    let (c, _) = delete(&app, "/api/v1/users/alice@a.example", &admin);
    assert_eq!(c, 204);
    for table in [
        "presence_events",
        "presence_sessions",
        "presence_last_seen",
        "presence_rollup_user_day",
    ] {
        assert_eq!(
            pg.query(&format!(
                "SELECT count(*) FROM {table} WHERE jid = 'alice@a.example'"
            )),
            "0",
            "{table}"
        );
        assert_ne!(
            pg.query(&format!(
                "SELECT count(*) FROM {table} WHERE jid = 'bob@a.example'"
            )),
            "0",
            "{table} keeps bob"
        );
    }
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_events WHERE status = 'secret plans'"),
        "0"
    );
    // Subscribers see alice leave; the bridge no longer knows her.
    let diff = next_frame(&mut ws).await;
    assert_eq!(diff["type"], "diff");
    assert_eq!(diff["changes"][0]["jid"], "alice@a.example");
    assert_eq!(diff["changes"][0]["op"], "offline");
    assert!(diff["changes"][0]["presence"]["status"].is_null());
    let (c, body, _) = app.get("/api/v1/presence/alice@a.example", Some(&reader));
    assert_eq!(
        (c, body["error"].as_str()),
        (404, Some("unknown_jid")),
        "{body}"
    );
    let (c, body, _) = app.get("/api/v1/last-seen/alice@a.example", Some(&reader));
    assert_eq!(c, 404, "{body}");
    let (c, body, _) = app.get("/api/v1/history/alice@a.example", Some(&reader));
    assert!(
        c == 404 || body["events"].as_array().is_some_and(|e| e.is_empty()),
        "{c} {body}"
    );
    let (_, stats, _) = app.get("/api/v1/stats", Some(&reader));
    assert_eq!(stats["online_users"], 1);
    // Erasing again (or a user never seen) is still 204.
    assert_eq!(delete(&app, "/api/v1/users/alice@a.example", &admin).0, 204);
    assert_eq!(
        delete(&app, "/api/v1/users/nobody@a.example", &admin).0,
        204
    );
    assert_eq!(delete(&app, "/api/v1/users/not a jid", &admin).0, 400);
    // Her next presence makes her new.
    app.engine()
        .apply(event(
            5,
            "alice@a.example",
            "phone",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    app.engine().barrier().await.unwrap();
    let (c, body, _) = app.get("/api/v1/presence/alice@a.example", Some(&reader));
    assert_eq!((c, body["online"].as_bool()), (200, Some(true)));
    eventually("new history", || {
        pg.query("SELECT count(*) FROM presence_events WHERE jid = 'alice@a.example'") == "1"
    })
    .await;
    // A domain-narrowed admin may not erase outside its domains.
    let narrow = token("admin", Some(vec!["b.example"]));
    assert_eq!(delete(&app, "/api/v1/users/bob@a.example", &narrow).0, 403);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_from_memory_history_and_refused_while_postgres_is_down() {
    init_logs();
    let app = TestApp::start(test_config(), Ingest::None).await;
    let admin = token("admin", None);
    let reader = token("history:read presence:read", None);
    let now = chrono::Utc::now();
    app.engine()
        .apply(event(
            1,
            "carol@a.example",
            "r",
            now - chrono::Duration::minutes(5),
            available(Show::Chat, "x", 0, None),
        ))
        .await
        .unwrap();
    app.engine()
        .apply(event(
            2,
            "carol@a.example",
            "r",
            now - chrono::Duration::minutes(4),
            gone(),
        ))
        .await
        .unwrap();
    app.engine()
        .apply(event(
            3,
            "dave@a.example",
            "r",
            now - chrono::Duration::minutes(3),
            available(Show::Chat, "y", 0, None),
        ))
        .await
        .unwrap();
    app.engine().barrier().await.unwrap();
    let w = format!(
        "from={}&to={}",
        (now - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        (now + chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    let (_, before, _) = app.get(&format!("/api/v1/events?{w}"), Some(&reader));
    assert_eq!(before["events"].as_array().unwrap().len(), 3);
    assert_eq!(delete(&app, "/api/v1/users/carol@a.example", &admin).0, 204);
    let (_, after, _) = app.get(&format!("/api/v1/events?{w}"), Some(&reader));
    let evs = after["events"].as_array().unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["jid"], "dave@a.example");
    let (_, ot, _) = app.get(&format!("/api/v1/analytics/online-time?{w}"), Some(&reader));
    let rows = ot["rows"].as_array().unwrap();
    assert!(rows.iter().all(|r| r["key"] != "carol@a.example"), "{ot}");
    let auth = format!("Bearer {reader}");
    for what in ["sessions", "events"] {
        let r = http::request(
            app.port,
            "GET",
            &format!("/api/v1/export/{what}?{w}"),
            &[("Authorization", &auth)],
            None,
        );
        assert_eq!(r.status, 200);
        assert!(r.text.contains("dave@a.example"), "{}", r.text);
        assert!(!r.text.contains("carol"), "{}", r.text);
        assert!(
            !r.text.contains("erased"),
            "placeholders never show: {}",
            r.text
        );
    }
    app.stop().await;

    // Postgres unreachable: the store spools, and an erasure is refused (nothing erased).
    let dead = free_port();
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(format!(
                "postgres://postgres@127.0.0.1:{dead}/none"
            ))),
            spool_dir: spool.path().to_path_buf(),
            connect_timeout_secs: Duration::from_millis(300),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::None).await;
    app.engine()
        .apply(event(
            1,
            "erin@a.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    eventually("spooling", || app.store().status().spooled_events > 0).await;
    let (c, body) = delete(&app, "/api/v1/users/erin@a.example", &admin);
    assert_eq!(
        (c, body["error"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("retry"));
    // The bridge still knows her: nothing was half-done.
    let (c, _, _) = app.get("/api/v1/presence/erin@a.example", Some(&reader));
    assert_eq!(c, 200);
    app.stop().await;
}

/// Resync on demand through the shared ejabberd: a resource the server no longer has (a
/// ghost) goes offline after the round's grace period; the one really online stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_on_demand_probes_and_drops_ghosts() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("rsy", &lease.domain);
    let jid = format!("{user}@localhost");
    let mut xmpp = xmpp_cfg(&ej, &lease);
    xmpp.resync_grace_secs = Duration::from_secs(1);
    let app = TestApp::start(
        Config {
            xmpp,
            ..test_config()
        },
        Ingest::Xmpp,
    )
    .await;
    app.connected().await;
    app.wait_status("first resync over", |s| !s.resyncing).await;
    let mut c = Client::login(ej.c2s, &user, "real").await;
    c.presence(Some("chat"), Some("here"), 1, None).await;
    app.wait_user(&user, "real online", |p| p.online).await;
    // A ghost: a resource the server never had.
    app.engine()
        .apply(event(
            77,
            &jid,
            "ghost",
            chrono::Utc::now(),
            available(Show::Away, "", 0, None),
        ))
        .await
        .unwrap();
    app.wait_user(&user, "ghost present", |p| p.resources.len() == 2)
        .await;
    let admin = token("admin", None);
    let probes_before = http::metric(
        &http::metrics_text(app.port),
        "presence_bridge_probes_sent_total",
    );
    let (c2, body, _) = app.post("/api/v1/admin/resync", Some(&admin), "");
    assert_eq!(
        (c2, body["resync"].as_str()),
        (202, Some("started")),
        "{body}"
    );
    let p = app
        .wait_user(&user, "ghost dropped", |p| p.resources.len() == 1)
        .await;
    assert_eq!(p.resources[0].resource, "real");
    assert!(
        http::metric(
            &http::metrics_text(app.port),
            "presence_bridge_probes_sent_total"
        ) > probes_before
    );
    c.close().await;
    app.stop().await;
}
