//! The reconciler (contract §10): against the real ejabberd's `connected_users_info`, and for
//! MongooseIM's GraphQL `session.listSessions` against a local HTTP server answering with the
//! documented shapes (MongooseIM cannot run in CI).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::config::{Config, ReconcileConfig, ReconcileKind, Secret};
use presence_bridge::presence::{Show, UserJid};

fn reconcile_cfg(kind: ReconcileKind, url: String) -> ReconcileConfig {
    ReconcileConfig {
        kind,
        url,
        // Long: only the run after the connect and the ones the tests ask for.
        interval_secs: Duration::from_secs(3600),
        ..ReconcileConfig::default()
    }
}

/// A resource the map has and the server does not: `at` is its (and its user's) last change.
async fn ghost(app: &TestApp, user: &str, resource: &str, at: chrono::DateTime<Utc>) {
    let ev = event(
        presence_bridge::presence::model::new_event_id(),
        &format!("{user}@localhost"),
        resource,
        at,
        available(Show::Chat, "ghost", 0, None),
    );
    app.engine().apply(ev).await.unwrap();
    app.engine().barrier().await.unwrap();
}

fn corrections(app: &TestApp, direction: &str) -> u64 {
    metric(
        &metrics_text(app.port),
        &format!("presence_bridge_reconcile_corrections_total{{direction=\"{direction}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_session_list_finds_a_never_seen_user_and_closes_ghosts() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("recon", &lease.domain);

    // The user comes online while no bridge runs; this bridge never saw them (memory store,
    // fresh map), so a resync probes nobody — only the server's session list can find them.
    let mut phone = Client::login(ej.c2s, &user, "phone").await;
    phone
        .presence(Some("away"), Some("in a meeting"), 2, None)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        reconcile: Some(reconcile_cfg(
            ReconcileKind::Ejabberd,
            format!("http://127.0.0.1:{}/api", ej.http),
        )),
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    let p = app
        .wait_user(&user, "found by the reconcile run after the connect", |p| {
            p.online
        })
        .await;
    assert_eq!(
        (p.show, p.status.as_deref(), p.priority),
        (Show::Away, Some("in a meeting"), 2),
        "the probe answer carries the real show/status"
    );
    assert!(corrections(&app, "found") >= 1);

    // Ghosts: one quiet for longer than an interval (closed), one that changed just now (left
    // alone: it may have begun after the list was fetched). Nothing is closed while a resync
    // round is still deciding.
    app.wait_status("resync over", |s| !s.resyncing).await;
    let quiet = unique_user("quiet");
    let fresh = unique_user("fresh");
    ghost(&app, &quiet, "old", Utc::now() - chrono::Duration::hours(2)).await;
    ghost(&app, &fresh, "new", Utc::now()).await;
    let admin = token("admin", None);
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!(code, 200, "{body}");
    assert!(body["checked"].as_u64().unwrap() >= 1, "{body}");
    assert_eq!(body["closed"], 1, "{body}");
    let q = app.wait_user(&quiet, "closed", |p| !p.online).await;
    assert!(q.last_seen.is_some());
    assert!(
        app.engine()
            .get(&UserJid::parse(&format!("{fresh}@localhost")).unwrap())
            .unwrap()
            .online
    );
    assert!(
        app.engine().get(&p.jid).unwrap().online,
        "the real session stays"
    );
    assert_eq!(corrections(&app, "closed"), 1);

    // Scopes: admin only.
    let (code, _, _) = app.post(
        "/api/v1/admin/reconcile",
        Some(&token("presence:read history:read", None)),
        "",
    );
    assert_eq!(code, 403);
    phone.unavailable(None).await;
    app.wait_user(&user, "offline", |p| !p.online).await;
    app.stop().await;
}

/// A fake MongooseIM GraphQL endpoint answering every request with `answer`.
async fn fake_graphql(answer: Arc<Mutex<(u16, String)>>) -> FakeHttp {
    FakeHttp::start(move |_| answer.lock().unwrap().clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongooseim_graphql_session_list_with_basic_auth_and_failures() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let someone = unique_user("mim");
    // Recorded shape of MongooseIM 6.x `session.listSessions`.
    let sessions = serde_json::json!({"data":{"session":{"listSessions":[
        {"user": format!("{someone}@localhost/res1"), "priority": 0},
        {"user": "eve@elsewhere.example/x", "priority": 0}
    ]}}});
    let answer = Arc::new(Mutex::new((200u16, sessions.to_string())));
    let fake = fake_graphql(answer.clone()).await;
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        reconcile: Some(ReconcileConfig {
            user: Some("admin".into()),
            password: Secret::new("mim-admin-secret"),
            ..reconcile_cfg(ReconcileKind::Mongooseim, fake.url("/api/graphql"))
        }),
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    let admin = token("admin", None);
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["checked"], 1,
        "foreign domains are not tracked: {body}"
    );
    assert_eq!(body["probed"], 1, "the unknown session is probed: {body}");
    {
        let req = fake.requests().pop().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/api/graphql")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:mim-admin-secret");
        assert_eq!(
            req.header("authorization"),
            Some(format!("Basic {basic}").as_str())
        );
        let q: serde_json::Value = serde_json::from_str(&req.body).unwrap();
        let q = q["query"].as_str().unwrap();
        assert!(q.contains("listSessions(domain: \"localhost\")"), "{q}");
    }
    // The reconciler asks for the probe; the component sends it on its own task.
    eventually("the probe is sent", || {
        app.component().metrics().probes_sent.get() >= 1
    })
    .await;

    // A ghost the (fake) server does not list is closed (once the resync round is over).
    app.wait_status("resync over", |s| !s.resyncing).await;
    let quiet = unique_user("mimquiet");
    ghost(&app, &quiet, "r", Utc::now() - chrono::Duration::hours(2)).await;
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!((code, body["closed"].as_u64()), (200, Some(1)), "{body}");
    app.wait_user(&quiet, "closed", |p| !p.online).await;

    // Failures: a clear 502 naming what to check, never the password.
    *answer.lock().unwrap() = (401, r#"{"errors":[{"message":"unauthorized"}]}"#.into());
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!(
        (code, body["error"].as_str()),
        (502, Some("reconcile_failed")),
        "{body}"
    );
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("reconcile.password"), "{msg}");
    assert!(!msg.contains("mim-admin-secret"), "{msg}");
    *answer.lock().unwrap() = (
        200,
        r#"{"errors":[{"message":"domain not found"}],"data":null}"#.into(),
    );
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!(code, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("domain not found"),
        "{body}"
    );
    let text = metrics_text(app.port);
    assert!(
        metric(
            &text,
            "presence_bridge_reconcile_runs_total{result=\"error\"}"
        ) >= 2
    );
    assert!(metric(&text, "presence_bridge_reconcile_runs_total{result=\"ok\"}") >= 2);
    app.stop().await;

    // No [reconcile]: 501.
    let plain = TestApp::start(test_config(), Ingest::None).await;
    let (code, body, _) = plain.post("/api/v1/admin/reconcile", Some(&admin), "");
    assert_eq!(
        (code, body["error"].as_str()),
        (501, Some("reconcile_disabled"))
    );
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_corrected_while_the_component_is_disconnected() {
    init_logs();
    // A component listener that does not exist: the bridge never connects.
    let mut xmpp = xmpp_cfg_at(free_port(), "bridge.localhost");
    xmpp.reconnect_min_secs = Duration::from_secs(1);
    let answer = Arc::new(Mutex::new((200u16, "[]".to_string())));
    let fake = fake_graphql(answer).await;
    let cfg = Config {
        xmpp,
        reconcile: Some(reconcile_cfg(ReconcileKind::Ejabberd, fake.url("/api"))),
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    let quiet = unique_user("stale");
    ghost(&app, &quiet, "r", Utc::now() - chrono::Duration::hours(2)).await;
    let (code, body, _) = app.post("/api/v1/admin/reconcile", Some(&token("admin", None)), "");
    assert_eq!(
        (code, body["error"].as_str()),
        (503, Some("xmpp_disconnected")),
        "{body}"
    );
    assert!(fake.requests().is_empty(), "the server is not even asked");
    assert!(
        app.engine()
            .get(&UserJid::parse(&format!("{quiet}@localhost")).unwrap())
            .unwrap()
            .online
    );
    app.stop().await;
}
