//! Webhooks and alerts (contract §7) against a real receiver that verifies every delivery with
//! the `standardwebhooks` package: presence events in order with the right data; retries with
//! growing delays and the same webhook-id until the receiver recovers; `failed` after the last
//! attempt; a hanging endpoint never delays a healthy one; SIGKILL with pending messages and
//! delivery after the restart (Postgres); flapping and storm alerts from real XMPP clients;
//! the API (create with a one-time secret, list, delete, deliveries); erasure of pending
//! messages about a user.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::config::{AlertsConfig, Config, DbUrl, Secret, StoreConfig, WebhookConfig};
use presence_bridge::presence::{EventKind, Show};
use serde_json::Value;

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGhlLXdlYmhvb2stdGVzdHM=";

fn hook(id: &str, url: String, secret: &str, events: &[&str]) -> WebhookConfig {
    WebhookConfig {
        id: id.into(),
        url,
        secret: Secret::new(secret),
        events: events.iter().map(|e| e.to_string()).collect(),
        ..WebhookConfig::default()
    }
}

fn gone() -> EventKind {
    EventKind::Unavailable {
        status: None,
        reason: None,
    }
}

/// Counts the records still pending for endpoint `ep` (plus an extra condition on `l`).
fn pending_sql(ep: &str, and: &str) -> String {
    format!(
        "SELECT count(*) FROM webhook_cursors c JOIN webhook_log l ON l.seq > c.after_seq \
          WHERE c.endpoint_id = '{ep}' AND '{ep}' = ANY (l.targets) {and}"
    )
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    eventually(what, &mut f).await;
}

fn body(v: &Value) -> Value {
    serde_json::from_str(v["body"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_arrive_signed_in_order_with_their_data() {
    init_logs();
    let rx = Receiver::start();
    rx.set("/a", SECRET_A, "ok");
    rx.set("/only-b", SECRET_B, "ok");
    let mut cfg = test_config();
    cfg.webhooks = vec![
        hook(
            "all",
            rx.url("/a"),
            SECRET_A,
            &["presence.online", "presence.offline", "presence.update"],
        ),
        WebhookConfig {
            domains: vec!["b.example".into()],
            ..hook(
                "b-online",
                rx.url("/only-b"),
                SECRET_B,
                &["presence.online"],
            )
        },
    ];
    let app = TestApp::start(cfg, Ingest::None).await;
    let now = chrono::Utc::now();
    let script = [
        (
            "alice@a.example",
            "phone",
            available(Show::Chat, "hi", 1, Some("Conversations")),
        ),
        ("bob@b.example", "pc", available(Show::Away, "", 0, None)),
        (
            "alice@a.example",
            "phone",
            available(Show::Dnd, "busy", 1, None),
        ),
        ("carol@b.example", "pc", available(Show::Chat, "", 0, None)),
        ("alice@a.example", "phone", gone()),
    ];
    for (i, (jid, res, kind)) in script.into_iter().enumerate() {
        app.engine()
            .apply(event(
                i as u128 + 1,
                jid,
                res,
                now + chrono::Duration::milliseconds(i as i64),
                kind,
            ))
            .await
            .unwrap();
    }
    until("five deliveries", || rx.received("/a").len() == 5).await;
    let got = rx.received("/a");
    for d in &got {
        assert_eq!(d["verified"], true, "standardwebhooks verifies: {d}");
        assert!(d["id"].as_str().unwrap().starts_with("msg_"));
    }
    let bodies: Vec<Value> = got.iter().map(body).collect();
    let types: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "presence.online",
            "presence.online",
            "presence.update",
            "presence.online",
            "presence.offline"
        ]
    );
    let seqs: Vec<u64> = bodies
        .iter()
        .map(|b| b["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "in seq order");
    assert_eq!(bodies[0]["data"]["jid"], "alice@a.example");
    assert_eq!(bodies[0]["data"]["op"], "online");
    assert_eq!(bodies[0]["data"]["presence"]["show"], "chat");
    assert_eq!(bodies[2]["data"]["presence"]["status"], "busy");
    assert_eq!(
        bodies[0]["data"]["epoch"].as_str(),
        Some(&**app.engine().epoch())
    );
    assert!(bodies[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    // The filtered endpoint: online events of b.example only.
    until("two for b", || rx.received("/only-b").len() == 2).await;
    let b: Vec<Value> = rx.received("/only-b").iter().map(body).collect();
    assert_eq!(b[0]["data"]["jid"], "bob@b.example");
    assert_eq!(b[1]["data"]["jid"], "carol@b.example");
    assert!(rx.received("/only-b").iter().all(|d| d["verified"] == true));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_then_delivers_with_the_same_id_and_fails_after_the_last_attempt() {
    init_logs();
    let rx = Receiver::start();
    rx.set("/r", SECRET_A, "fail:3");
    rx.set("/f", SECRET_A, "fail");
    let mut cfg = test_config();
    cfg.webhooks_max_attempts = 3;
    cfg.webhooks = vec![
        hook("recovers", rx.url("/r"), SECRET_A, &["presence.online"]),
        hook("dead", rx.url("/f"), SECRET_A, &["presence.online"]),
    ];
    let app = TestApp::start(cfg, Ingest::None).await;
    let admin = token("admin", None);
    app.engine()
        .apply(event(
            1,
            "dora@a.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    // 500, 500, 500, then 204; max attempts is 3 for this bridge, so "recovers" needs its
    // receiver to recover within them: it answers 500 three times — its message fails too,
    // and the next message (below) is delivered at the first try.
    until("three attempts at /r", || rx.received("/r").len() == 3).await;
    let tries = rx.received("/r");
    let ids: Vec<&str> = tries.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "the same webhook-id on every retry: {ids:?}"
    );
    assert!(
        tries.iter().all(|d| d["verified"] == true),
        "every retry is signed afresh: {tries:?}"
    );
    // Growing delays (1 s doubling with equal jitter: [0.5, 1] then [1, 2]).
    let at: Vec<f64> = tries.iter().map(|d| d["at"].as_f64().unwrap()).collect();
    let (g1, g2) = (at[1] - at[0], at[2] - at[1]);
    assert!(
        g1 >= 0.45 && g2 >= 0.95 && g2 >= g1 * 0.9,
        "gaps {g1:.2} s, {g2:.2} s"
    );
    let log = |id: &str| {
        let (c, b, _) = app.get(&format!("/api/v1/webhooks/{id}/deliveries"), Some(&admin));
        assert_eq!(c, 200, "{b}");
        b["deliveries"].as_array().unwrap().clone()
    };
    until("failed recorded", || {
        log("recovers")
            .first()
            .is_some_and(|d| d["status"] == "failed")
    })
    .await;
    let l = log("recovers");
    let statuses: Vec<&str> = l.iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "retrying", "retrying"], "newest first");
    assert_eq!(l[0]["response_status"], 500);
    assert_eq!(l[0]["attempt"], 3);
    assert_eq!(l[0]["error"], "HTTP 500");
    assert_eq!(l[0]["type"], "presence.online");
    // The receiver of "recovers" now answers 204 (its fail:3 is used up): the next message
    // goes at once, after the failed one.
    app.engine()
        .apply(event(
            2,
            "ed@a.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    until("delivered", || {
        log("recovers")
            .first()
            .is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    let last = rx.received("/r").last().cloned().unwrap();
    assert_eq!(body(&last)["data"]["jid"], "ed@a.example");
    assert_eq!(last["status"], 204);
    // The dead endpoint: its messages fail one after the other; the list counts what waits.
    until("dead failed twice", || {
        log("dead")
            .iter()
            .filter(|d| d["status"] == "failed")
            .count()
            == 2
    })
    .await;
    let (_, list, _) = app.get("/api/v1/webhooks", Some(&admin));
    let dead = list["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "dead")
        .unwrap()
        .clone();
    assert_eq!(dead["pending"], 0);
    let m = http::metrics_text(app.port);
    assert!(
        http::metric(
            &m,
            r#"presence_bridge_webhook_attempts_total{result="failed"}"#
        ) >= 3,
        "{m}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_never_delays_a_healthy_one() {
    init_logs();
    let rx = Receiver::start();
    rx.set("/hang", SECRET_A, "hang");
    rx.set("/ok", SECRET_B, "ok");
    let mut cfg = test_config();
    cfg.webhooks_timeout_secs = Duration::from_secs(5);
    cfg.webhooks = vec![
        hook(
            "hanging",
            rx.url("/hang"),
            SECRET_A,
            &["presence.online", "presence.offline"],
        ),
        hook(
            "healthy",
            rx.url("/ok"),
            SECRET_B,
            &["presence.online", "presence.offline"],
        ),
    ];
    let app = TestApp::start(cfg, Ingest::None).await;
    let admin = token("admin", None);
    let now = chrono::Utc::now();
    for i in 0..20u128 {
        let kind = if i % 2 == 0 {
            available(Show::Chat, "", 0, None)
        } else {
            gone()
        };
        app.engine()
            .apply(event(
                i + 1,
                &format!("u{}@a.example", i / 2),
                "r",
                now,
                kind,
            ))
            .await
            .unwrap();
    }
    until("healthy got all 20", || rx.received("/ok").len() == 20).await;
    // Meanwhile the hanging endpoint is still on its first attempt: nothing was recorded.
    let (_, l, _) = app.get("/api/v1/webhooks/hanging/deliveries", Some(&admin));
    assert_eq!(l["deliveries"].as_array().unwrap().len(), 0, "{l}");
    assert_eq!(rx.received("/hang").len(), 1, "one request, hanging");
    // Later it times out and is retried (an attempt with an error, no status).
    until("hanging attempt recorded", || {
        let (_, l, _) = app.get("/api/v1/webhooks/hanging/deliveries", Some(&admin));
        !l["deliveries"].as_array().unwrap().is_empty()
    })
    .await;
    let (_, l, _) = app.get("/api/v1/webhooks/hanging/deliveries", Some(&admin));
    let d = &l["deliveries"][0];
    assert_eq!(d["status"], "retrying");
    assert!(d["response_status"].is_null());
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 5 s"),
        "{d}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_creates_lists_and_deletes_endpoints() {
    init_logs();
    let rx = Receiver::start();
    let mut cfg = test_config();
    cfg.webhooks = vec![hook(
        "from-config",
        rx.url("/c"),
        SECRET_A,
        &["alert.storm"],
    )];
    let app = TestApp::start(cfg, Ingest::None).await;
    let admin = token("admin", None);
    let body = serde_json::json!({"url": rx.url("/api"), "events": ["presence.online"], "jids": ["zoe@a.example"], "id": "mine"}).to_string();
    let (c, created, _) = app.post("/api/v1/webhooks", Some(&admin), &body);
    assert_eq!(c, 201, "{created}");
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(created["source"], "api");
    let (c, again, _) = app.post("/api/v1/webhooks", Some(&admin), &body);
    assert_eq!((c, again["error"].as_str()), (409, Some("webhook_exists")));
    for bad in [
        serde_json::json!({"url": "ftp://x", "events": ["presence.online"]}),
        serde_json::json!({"url": "https://v\u{cd}\u{0}", "events": ["presence.online"]}),
        serde_json::json!({"url": rx.url("/x"), "events": ["presence.online"], "domains": ["a b"]}),
        serde_json::json!({"url": rx.url("/x"), "events": ["presence.sometimes"]}),
        serde_json::json!({"url": rx.url("/x"), "events": []}),
        serde_json::json!({"url": rx.url("/x"), "events": ["presence.online"], "jids": ["not a jid"]}),
    ] {
        let (c, b, _) = app.post("/api/v1/webhooks", Some(&admin), &bad.to_string());
        assert_eq!(
            (c, b["error"].as_str()),
            (400, Some("invalid_parameter")),
            "{bad}: {b}"
        );
    }
    let (_, list, _) = app.get("/api/v1/webhooks", Some(&admin));
    let text = list.to_string();
    assert!(!text.contains("whsec_"), "no secrets in the list: {text}");
    let ids: Vec<&str> = list["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["from-config", "mine"]);
    // It works: zoe's presence is delivered, signed with the secret shown at creation.
    rx.set("/api", &secret, "ok");
    app.engine()
        .apply(event(
            1,
            "zoe@a.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    app.engine()
        .apply(event(
            2,
            "other@a.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    until("zoe delivered", || rx.received("/api").len() == 1).await;
    assert_eq!(rx.received("/api")[0]["verified"], true);
    let (c, b, _) = http::api(
        app.port,
        "DELETE",
        "/api/v1/webhooks/from-config",
        Some(&admin),
        None,
    );
    assert_eq!((c, b["error"].as_str()), (409, Some("webhook_from_config")));
    let (c, _, _) = http::api(
        app.port,
        "DELETE",
        "/api/v1/webhooks/mine",
        Some(&admin),
        None,
    );
    assert_eq!(c, 204);
    let (c, b, _) = http::api(
        app.port,
        "DELETE",
        "/api/v1/webhooks/mine",
        Some(&admin),
        None,
    );
    assert_eq!((c, b["error"].as_str()), (404, Some("unknown_webhook")));
    let (c, _, _) = app.get("/api/v1/webhooks/mine/deliveries", Some(&admin));
    assert_eq!(c, 404);
    for (m, p) in [
        ("GET", "/api/v1/webhooks"),
        ("POST", "/api/v1/webhooks"),
        ("DELETE", "/api/v1/webhooks/x"),
        ("GET", "/api/v1/webhooks/x/deliveries"),
    ] {
        let (c, _, _) = http::api(
            app.port,
            m,
            p,
            Some(&token("presence:read history:read", None)),
            Some("{}"),
        );
        assert_eq!(c, 403, "{m} {p}");
    }
    app.stop().await;
}

/// Postgres: endpoints made through the API and pending messages survive a SIGKILL; after the
/// restart the message goes out with the same webhook-id. Erasure drops a user's pending ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_messages_survive_sigkill_and_erasure_drops_them() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("whk", &lease.domain);
    let other = ej.user("whe", &lease.domain);
    let pg = Pg::shared("webhooks");
    let rx = Receiver::start();
    rx.set("/k", SECRET_A, "fail");
    let spool = tempfile::tempdir().unwrap();
    let port = free_port();
    let xmpp = xmpp_cfg(&ej, &lease);
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        format!(
            "webhooks_max_attempts = 50\n\
             [xmpp]\nserver = \"{}\"\ncomponent = \"{}\"\npassword = \"{}\"\ndomains = [\"localhost\"]\n\
             [http]\nbind = \"127.0.0.1:{port}\"\nrate_limit_per_token = 0\nrate_limit_per_ip = 0\n\
             [auth]\njwt_secret = \"{API_SECRET}\"\n\
             [store]\npostgres_url = \"{}\"\nspool_dir = \"{}\"\n\
             [[webhooks]]\nid = \"k\"\nurl = \"{}\"\nsecret = \"{SECRET_A}\"\nevents = [\"presence.online\", \"presence.offline\"]\n",
            xmpp.server,
            xmpp.component,
            xmpp.password.expose(),
            pg.url(),
            spool.path().display(),
            rx.url("/k"),
        ),
    )
    .unwrap();
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .args(["run", "--config"])
            .arg(conf.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let admin = token("admin", None);
    let ready =
        || http::try_request(port, "GET", "/readyz", &[], None).is_ok_and(|r| r.status == 200);
    let mut bridge = start();
    until("bridge ready", ready).await;
    let mut c = Client::login(ej.c2s, &user, "r").await;
    c.presence(Some("chat"), None, 0, None).await;
    let mut c2 = Client::login(ej.c2s, &other, "r").await;
    c2.presence(Some("chat"), None, 0, None).await;
    let jid = format!("{user}@localhost");
    let ojid = format!("{other}@localhost");
    let mine = |v: &Value, j: &str| body(v)["data"]["jid"] == j;
    until("attempted", || {
        rx.received("/k").iter().any(|d| mine(d, &jid))
    })
    .await;
    let first_id = rx.received("/k").iter().find(|d| mine(d, &jid)).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    until("both pending in Postgres", || {
        pg.query(&pending_sql("k", "")) == "2"
    })
    .await;
    // SIGKILL: no flush, no goodbye.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &bridge.id().to_string()])
        .status();
    let _ = bridge.wait();
    rx.set("/k", SECRET_A, "ok");
    bridge = start();
    until("bridge ready again", ready).await;
    until("delivered after the restart", || {
        rx.received("/k")
            .iter()
            .any(|d| d["id"] == first_id.as_str() && d["status"] == 204)
    })
    .await;
    // The receiver answers before the bridge records the attempt: wait for the record.
    until("delivery recorded", || {
        let (code, log, _) = http::api(
            port,
            "GET",
            "/api/v1/webhooks/k/deliveries",
            Some(&admin),
            None,
        );
        code == 200
            && log["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["message_id"] == first_id.as_str() && d["status"] == "delivered")
    })
    .await;
    // Erasure: with the receiver failing again, the other user's next message waits; erasing
    // them removes it.
    rx.set("/k", SECRET_A, "fail");
    c2.unavailable(None).await;
    until("other's offline pending", || {
        pg.query(&pending_sql("k", &format!("AND l.jid = '{ojid}'"))) != "0"
    })
    .await;
    let (code, _, _) = http::api(
        port,
        "DELETE",
        &format!("/api/v1/users/{ojid}"),
        Some(&admin),
        None,
    );
    assert_eq!(code, 204);
    // Every record about them went, delivered or not.
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM webhook_log WHERE jid = '{ojid}'"
        )),
        "0"
    );
    assert_eq!(pg.query(&pending_sql("k", "")), "0");
    c.close().await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &bridge.id().to_string()])
        .status();
    let _ = bridge.wait();
}

/// Real XMPP clients through ejabberd: one user flapping, then a burst of logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_and_storm_alerts_from_real_clients() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let rx = Receiver::start();
    rx.set("/alerts", SECRET_B, "ok");
    let users: Vec<String> = (0..3)
        .map(|i| ej.user(&format!("al{i}"), &lease.domain))
        .collect();
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        alerts: AlertsConfig {
            flapping_transitions: 4,
            flapping_window_secs: 60,
            storm_logins: 3,
            storm_window_secs: 60,
        },
        webhooks: vec![hook(
            "ops",
            rx.url("/alerts"),
            SECRET_B,
            &["alert.flapping", "alert.storm"],
        )],
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    // Flapping: online, offline, online, offline.
    for _ in 0..2 {
        let mut c = Client::login(ej.c2s, &users[0], "flap").await;
        c.presence(None, None, 0, None).await;
        app.wait_user(&users[0], "online", |p| p.online).await;
        c.unavailable(None).await;
        app.wait_user(&users[0], "offline", |p| !p.online).await;
        c.close().await;
    }
    until("flapping alert", || {
        rx.received("/alerts")
            .iter()
            .any(|d| body(d)["type"] == "alert.flapping")
    })
    .await;
    let flap = rx
        .received("/alerts")
        .into_iter()
        .find(|d| body(d)["type"] == "alert.flapping")
        .unwrap();
    assert_eq!(flap["verified"], true);
    let data = &body(&flap)["data"];
    assert_eq!(data["jid"], format!("{}@localhost", users[0]));
    assert_eq!(data["transitions"], 4);
    assert_eq!(data["window_secs"], 60);
    // Storm: three logins in the domain (users[0] counted twice already; the quiet window of
    // the storm has not started, so the third distinct login completes it).
    let mut clients = Vec::new();
    for u in &users[1..] {
        let mut c = Client::login(ej.c2s, u, "s").await;
        c.presence(None, None, 0, None).await;
        app.wait_user(u, "online", |p| p.online).await;
        clients.push(c);
    }
    until("storm alert", || {
        rx.received("/alerts")
            .iter()
            .any(|d| body(d)["type"] == "alert.storm")
    })
    .await;
    let storm = rx
        .received("/alerts")
        .into_iter()
        .find(|d| body(d)["type"] == "alert.storm")
        .unwrap();
    assert_eq!(body(&storm)["data"]["domain"], "localhost");
    assert_eq!(body(&storm)["data"]["logins"], 3);
    assert_eq!(storm["verified"], true);
    let m = http::metrics_text(app.port);
    assert!(
        m.contains(r#"presence_bridge_alerts_total{type="flapping"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"presence_bridge_alerts_total{type="storm"} 1"#),
        "{m}"
    );
    let (c, a, _) = app.get("/api/v1/alerts", Some(&token("presence:read", None)));
    assert_eq!(c, 200);
    let kinds: Vec<&str> = a["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["alert.storm", "alert.flapping"], "newest first");
    // A token of another domain sees neither.
    let (_, a, _) = app.get(
        "/api/v1/alerts",
        Some(&token("presence:read", Some(vec!["elsewhere.example"]))),
    );
    assert!(a["alerts"].as_array().unwrap().is_empty());
    for c in clients {
        c.close().await;
    }
    app.stop().await;
}

#[test]
fn bad_webhook_config_names_the_key() {
    let mut cfg = test_config();
    cfg.xmpp.password = Secret::new("x");
    cfg.webhooks = vec![hook(
        "x",
        "http://127.0.0.1:1/".into(),
        "whsec_c2hvcnQ=",
        &["presence.online"],
    )];
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("webhooks[0].secret"), "{err}");
    cfg.webhooks = vec![
        hook(
            "x",
            "http://127.0.0.1:1/".into(),
            SECRET_A,
            &["presence.online"],
        ),
        hook(
            "x",
            "http://127.0.0.1:2/".into(),
            SECRET_A,
            &["presence.online"],
        ),
    ];
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("webhooks[1].id") && err.contains("twice"),
        "{err}"
    );
    let _ = (DbUrl::new(""), StoreConfig::default());
}

/// A database as V6 left it, with messages still pending: after the upgrade to the log (V7)
/// they go out in order with their old webhook-ids, a delivered one does not go again, and new
/// changes follow with ids of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_messages_of_schema_v6_are_delivered_after_the_upgrade() {
    init_logs();
    let pg = Pg::shared("whupgrade");
    let pool = presence_bridge::store::pg::pool(&pg.url(), 2, Duration::from_secs(5)).unwrap();
    presence_bridge::store::pg::migrate_to(&pool, Some(6))
        .await
        .unwrap();
    pg.query(
        "INSERT INTO webhook_messages (endpoint_id, id, type, body, jid, status) VALUES \
         ('up', 'msg_old_delivered', 'presence.online', '{\"n\":0}', 'a@x.example', 'delivered'), \
         ('up', 'msg_old_1', 'presence.online', '{\"n\":1}', 'a@x.example', 'pending'), \
         ('other', 'msg_old_x', 'presence.online', '{\"n\":9}', 'a@x.example', 'pending'), \
         ('up', 'msg_old_2', 'presence.offline', '{\"n\":2}', 'a@x.example', 'pending')",
    );
    let rx = Receiver::start();
    rx.set("/up", SECRET_A, "ok");
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_path_buf(),
            ..StoreConfig::default()
        },
        webhooks: vec![hook(
            "up",
            rx.url("/up"),
            SECRET_A,
            &["presence.online", "presence.offline"],
        )],
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::None).await;
    assert_eq!(
        pg.query(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'webhook_messages'"
        ),
        "0",
        "V7 replaced the per-endpoint table"
    );
    until("the two carried-over messages", || {
        rx.received("/up").len() >= 2
    })
    .await;
    app.engine()
        .apply(event(
            1,
            "b@x.example",
            "r",
            chrono::Utc::now(),
            available(Show::Chat, "", 0, None),
        ))
        .await
        .unwrap();
    app.engine().barrier().await.unwrap();
    until("the new change", || rx.received("/up").len() >= 3).await;
    let got = rx.received("/up");
    let ids: Vec<&str> = got.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..2], ["msg_old_1", "msg_old_2"], "{got:?}");
    assert!(
        ids[2].starts_with("msg_") && ids[2].len() == 36,
        "{}",
        ids[2]
    );
    assert!(got.iter().all(|d| d["verified"] == true));
    assert_eq!(body(&got[2])["data"]["jid"], "b@x.example");
    assert_eq!(got.len(), 3, "nothing delivered twice: {got:?}");
    app.stop().await;
}
