//! The HTTP API and the WebSocket feed, served for real on 127.0.0.1:0 and driven by real
//! HTTP and WebSocket clients (and, for the live flow, a real ejabberd and Postgres).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use futures::{SinkExt, StreamExt};
use presence_bridge::api;
use presence_bridge::api::auth::{self, Auth};
use presence_bridge::app::Ingest;
use presence_bridge::config::{AuthConfig, Config, DbUrl, HttpConfig, PresenceConfig, StoreConfig};
use presence_bridge::presence::{Engine, PresenceEvent, Show};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn open_http() -> HttpConfig {
    test_config().http
}

/// The service fed by nothing but the test (events go straight into its engine).
async fn start(presence: PresenceConfig, http: HttpConfig) -> TestApp {
    TestApp::start(
        Config {
            presence,
            http,
            ..test_config()
        },
        Ingest::None,
    )
    .await
}

fn ev(i: u64, user: &str, res: &str, show: Option<Show>, status: &str) -> PresenceEvent {
    let kind = match show {
        Some(s) => available(s, status, 0, None),
        None => unavailable(status),
    };
    event(u128::from(i) + (1 << 100), user, res, Utc::now(), kind)
}

/// A change for `user` with a fresh status text each time.
async fn change(engine: &Engine, i: u64, user: &str) {
    engine
        .apply(ev(i, user, "r", Some(Show::Chat), &format!("s{i}")))
        .await
        .unwrap();
}

fn diff_seqs(frame: &Value) -> Vec<u64> {
    assert_eq!(frame["type"], "diff", "{frame}");
    frame["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect()
}

/// The next change (reading frames as needed), checking the seq is the next one.
async fn next_change(
    ws: &mut Ws,
    pending: &mut std::collections::VecDeque<Value>,
    got: &mut Vec<Value>,
    seq: &mut u64,
    jid: &str,
) {
    while pending.is_empty() {
        let f = next_frame(ws).await;
        assert_eq!(f["type"], "diff", "{f}");
        pending.extend(f["changes"].as_array().unwrap().iter().cloned());
    }
    let c = pending.pop_front().unwrap();
    *seq += 1;
    assert_eq!(c["seq"].as_u64(), Some(*seq), "gap-free seq");
    assert_eq!(c["jid"], jid);
    got.push(c);
}

/// Reads diff frames until `last` seq has been seen; returns all seqs in order.
async fn collect_until(ws: &mut Ws, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.last().is_none_or(|s| *s < last) {
        seqs.extend(diff_seqs(&next_frame(ws).await));
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_flow_real_ejabberd_ws_diffs_and_rest_agree() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let pg = Pg::shared("apilive");
    let user = ej.user("live", &lease.domain);
    let jid = format!("{user}@localhost");

    let spool = tempfile::tempdir().unwrap();
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_owned(),
            ..Default::default()
        },
        ..test_config()
    };
    let api = TestApp::start(cfg, Ingest::Xmpp).await;
    api.connected().await;
    let engine = api.engine().clone();

    let (code, ready, _) = api.get("/readyz", None);
    assert_eq!(
        (code, ready["xmpp"].as_str(), ready["store"].as_str()),
        (200, Some("connected"), Some("ok"))
    );

    let t = token("presence:read history:read", None);
    let mut ws = api.ws(&format!("token={t}"), None).await;
    let snap = next_frame(&mut ws).await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["epoch"].as_str(), Some(&**engine.epoch()));
    let mut expected_seq = snap["seq"].as_u64().unwrap();

    // Each step waits for its diff: ejabberd does not order stanzas across two sessions.
    let mut got: Vec<Value> = Vec::new();
    let mut pending: std::collections::VecDeque<Value> = Default::default();
    let mut phone = Client::login(ej.c2s, &user, "phone").await;
    phone
        .presence(
            Some("chat"),
            Some("on my phone"),
            5,
            Some("http://conversations.im"),
        )
        .await;
    next_change(&mut ws, &mut pending, &mut got, &mut expected_seq, &jid).await;
    let mut laptop = Client::login(ej.c2s, &user, "laptop").await;
    laptop
        .presence(Some("dnd"), Some("in a meeting"), 10, None)
        .await;
    next_change(&mut ws, &mut pending, &mut got, &mut expected_seq, &jid).await;
    phone
        .presence(
            Some("away"),
            Some("walking"),
            5,
            Some("http://conversations.im"),
        )
        .await;
    next_change(&mut ws, &mut pending, &mut got, &mut expected_seq, &jid).await;
    phone.unavailable(None).await;
    next_change(&mut ws, &mut pending, &mut got, &mut expected_seq, &jid).await;
    laptop.close().await;
    next_change(&mut ws, &mut pending, &mut got, &mut expected_seq, &jid).await;
    // Expected aggregates, step by step: (op, show, status, priority, resources).
    let steps = [
        ("online", "chat", Some("on my phone"), 5, vec!["phone"]),
        (
            "update",
            "dnd",
            Some("in a meeting"),
            10,
            vec!["laptop", "phone"],
        ),
        (
            "update",
            "dnd",
            Some("in a meeting"),
            10,
            vec!["laptop", "phone"],
        ),
        ("update", "dnd", Some("in a meeting"), 10, vec!["laptop"]),
        ("offline", "offline", None, 0, vec![]),
    ];
    for (c, (op, show, status, prio, res)) in got.iter().zip(steps.iter()) {
        let p = &c["presence"];
        assert_eq!(c["op"], *op, "{c}");
        assert_eq!(
            (
                p["show"].as_str(),
                p["status"].as_str(),
                p["priority"].as_i64()
            ),
            (Some(*show), *status, Some(*prio)),
            "{c}"
        );
        let names: Vec<_> = p["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["resource"].as_str().unwrap())
            .collect();
        assert_eq!(&names, res, "{c}");
    }
    let last = &got[4]["presence"];
    assert!(last["last_seen"].is_string());

    // REST agrees with the last diff.
    let (code, p, _) = api.get(&format!("/api/v1/presence/{jid}"), Some(&t));
    assert_eq!(code, 200);
    assert_eq!(&p, last);
    let (code, ls, _) = api.get(&format!("/api/v1/last-seen/{jid}"), Some(&t));
    assert_eq!(code, 200);
    assert_eq!(
        (ls["online"].as_bool(), ls["last_seen"].as_str()),
        (Some(false), last["last_seen"].as_str())
    );
    assert!(ls["seconds_ago"].as_i64().unwrap() >= 0);
    // History: 5 events (2 available phone, 1 available laptop... as stored), newest first.
    let deadline = std::time::Instant::now() + PATIENCE;
    let hist = loop {
        let (code, h, _) = api.get(&format!("/api/v1/history/{jid}?order=asc"), Some(&t));
        assert_eq!(code, 200, "{h}");
        if h["events"].as_array().unwrap().len() >= 5 || std::time::Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kinds: Vec<_> = hist["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["resource"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("phone".into(), "available".into()),
            ("laptop".into(), "available".into()),
            ("phone".into(), "available".into()),
            ("phone".into(), "unavailable".into()),
            ("laptop".into(), "unavailable".into())
        ]
    );
    let m = metrics_text(api.port);
    assert!(
        metric(&m, "presence_bridge_stanza_to_ws_seconds_count") >= 5,
        "end-to-end latency recorded"
    );
    assert!(metric(&m, "presence_bridge_stanzas_in_total{type=\"presence\"}") >= 5);
    assert_eq!(metric(&m, "presence_bridge_xmpp_connected"), 1);
    api.stop().await;
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_gets_exactly_the_missed_changes() {
    init_logs();
    let api = start(
        PresenceConfig {
            ring_size: 64,
            queue_size: 1024,
        },
        open_http(),
    )
    .await;
    let engine = api.engine().clone();
    let t = token("presence:read", None);
    let mut ws = api.ws(&format!("token={t}"), None).await;
    let snap = next_frame(&mut ws).await;
    assert_eq!(
        (snap["type"].as_str(), snap["seq"].as_u64()),
        (Some("snapshot"), Some(0))
    );
    for i in 0..5 {
        change(&engine, i, "a@x.test").await;
    }
    assert_eq!(collect_until(&mut ws, 5).await, vec![1, 2, 3, 4, 5]);
    drop(ws);

    for i in 5..12 {
        change(&engine, i, "b@x.test").await;
    }
    let epoch = engine.epoch().to_string();
    let mut ws = api
        .ws(&format!("token={t}&since=5&epoch={epoch}"), None)
        .await;
    let first = next_frame(&mut ws).await;
    assert_eq!(
        first["type"], "diff",
        "a resumable since gets diffs, not a snapshot: {first}"
    );
    let mut seqs = diff_seqs(&first);
    if seqs.last() != Some(&12) {
        seqs.extend(collect_until(&mut ws, 12).await);
    }
    assert_eq!(
        seqs,
        (6..=12).collect::<Vec<_>>(),
        "exactly the missed changes, in order"
    );
    change(&engine, 99, "c@x.test").await;
    assert_eq!(
        collect_until(&mut ws, 13).await,
        vec![13],
        "then live, gap-free"
    );

    // Another epoch: never replayed.
    let mut ws = api
        .ws(&format!("token={t}&since=5&epoch=not-this-one"), None)
        .await;
    let f = next_frame(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64()),
        (Some("snapshot"), Some(13))
    );
    assert_eq!(f["users"].as_array().unwrap().len(), 3);
    // Too old for the ring (64): snapshot.
    for i in 100..200 {
        change(&engine, i, "d@x.test").await;
    }
    // Applied, not just queued: only then is seq 2 out of the ring.
    engine.barrier().await.unwrap();
    let mut ws = api
        .ws(&format!("token={t}&since=2&epoch={epoch}"), None)
        .await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_rest_and_ws() {
    init_logs();
    let api = start(PresenceConfig::default(), open_http()).await;
    let engine = api.engine().clone();
    engine
        .apply(ev(1, "a@a.test", "r", Some(Show::Away), "in a"))
        .await
        .unwrap();
    engine
        .apply(ev(2, "b@b.test", "r", Some(Show::Dnd), "in b"))
        .await
        .unwrap();
    engine.barrier().await.unwrap();
    let read = token("presence:read", None);

    // 401: none, garbage, wrong key, expired, alg none.
    let wrong_key = auth::mint(
        "another-secret",
        &auth::claims(
            "x",
            "admin",
            None,
            300,
            &AuthConfig {
                jwt_secret: presence_bridge::config::Secret::new(API_SECRET),
                ..AuthConfig::default()
            },
        ),
    )
    .unwrap();
    let mut old = auth::claims(
        "x",
        "admin",
        None,
        1,
        &AuthConfig {
            jwt_secret: presence_bridge::config::Secret::new(API_SECRET),
            ..AuthConfig::default()
        },
    );
    old.exp -= 3600;
    let expired = auth::mint(API_SECRET, &old).unwrap();
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5LCJzY29wZSI6ImFkbWluIn0.";
    for (what, tok) in [
        ("none", None),
        ("garbage", Some("garbage")),
        ("wrong key", Some(wrong_key.as_str())),
        ("expired", Some(expired.as_str())),
        ("alg none", Some(alg_none)),
    ] {
        let (code, body, _) = api.get("/api/v1/presence", tok);
        assert_eq!(code, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}");
        assert!(!body["message"].as_str().unwrap().contains(API_SECRET));
    }
    // 403: valid token without the scope.
    let (code, body, _) = api.get("/api/v1/history/a@a.test", Some(&read));
    assert_eq!((code, body["error"].as_str()), (403, Some("forbidden")));
    let (code, _, _) = api.get("/api/v1/presence", Some(&token("history:read", None)));
    assert_eq!(code, 403);
    // admin implies everything.
    let (code, _, _) = api.get("/api/v1/presence", Some(&token("admin", None)));
    assert_eq!(code, 200);

    // domains narrow every answer.
    let narrow = token("presence:read", Some(vec!["a.test"]));
    let (_, list, _) = api.get("/api/v1/presence", Some(&narrow));
    let jids: Vec<_> = list["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["jid"].as_str().unwrap())
        .collect();
    assert_eq!(jids, vec!["a@a.test"]);
    let (_, list, _) = api.get("/api/v1/presence", Some(&read));
    assert_eq!(list["users"].as_array().unwrap().len(), 2);
    assert_eq!(api.get("/api/v1/presence/b@b.test", Some(&narrow)).0, 404);
    assert_eq!(api.get("/api/v1/last-seen/b@b.test", Some(&narrow)).0, 404);
    let (_, stats, _) = api.get("/api/v1/stats", Some(&narrow));
    assert_eq!(
        (
            stats["online_users"].as_u64(),
            stats["by_domain"].as_object().unwrap().len()
        ),
        (Some(1), 1)
    );
    let (_, bulk, _) = api.post(
        "/api/v1/last-seen",
        Some(&narrow),
        r#"{"jids":["a@a.test","b@b.test"]}"#,
    );
    assert_eq!(bulk["results"].as_array().unwrap().len(), 1);
    assert_eq!(bulk["unknown"], json!(["b@b.test"]));

    // WebSocket: no token → 401, bad origin → 403, query token works, domains narrow.
    let e = ws_connect(api.port, "", None)
        .await
        .err()
        .unwrap_or_default();
    assert!(e.contains("401"), "{e}");
    let e = ws_connect(
        api.port,
        &format!("token={read}"),
        Some("https://evil.example"),
    )
    .await
    .err()
    .unwrap_or_default();
    assert!(e.contains("403"), "{e}");
    let mut same = api
        .ws(
            &format!("token={read}"),
            Some(&format!("http://127.0.0.1:{}", api.port)),
        )
        .await;
    assert_eq!(
        next_frame(&mut same).await["users"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "same origin is allowed"
    );
    let mut ws = api
        .ws(&format!("token={narrow}&domains=b.test,a.test"), None)
        .await;
    let snap = next_frame(&mut ws).await;
    let users: Vec<_> = snap["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["jid"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        vec!["a@a.test"],
        "the token's domains win over the filter"
    );
    engine
        .apply(ev(3, "b@b.test", "r", Some(Show::Chat), "b changes"))
        .await
        .unwrap();
    engine
        .apply(ev(4, "a@a.test", "r", Some(Show::Chat), "a changes"))
        .await
        .unwrap();
    let f = next_frame(&mut ws).await;
    let jids: Vec<_> = f["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["jid"].as_str().unwrap())
        .collect();
    assert_eq!(
        jids,
        vec!["a@a.test"],
        "b's change is never sent to this token"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_contract_errors_and_the_service_stays_up() {
    init_logs();
    let api = start(
        PresenceConfig::default(),
        HttpConfig {
            body_limit_bytes: 64 * 1024,
            ..open_http()
        },
    )
    .await;
    let engine = api.engine().clone();
    engine
        .apply(ev(1, "a@x.test", "r", Some(Show::Away), "hi"))
        .await
        .unwrap();
    let t = token("presence:read history:read", None);
    for bad in ["nodomain", "a@b@c", "@x.test", "x.test"] {
        let (code, body, _) = api.get(&format!("/api/v1/presence/{bad}"), Some(&t));
        assert_eq!(
            (code, body["error"].as_str()),
            (400, Some("invalid_jid")),
            "{bad}"
        );
    }
    let (code, body, _) = api.get("/api/v1/last-seen/never@x.test", Some(&t));
    assert_eq!((code, body["error"].as_str()), (404, Some("unknown_jid")));
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}@x.test")).collect();
    let (code, body, _) = api.post(
        "/api/v1/last-seen",
        Some(&t),
        &json!({"jids": many}).to_string(),
    );
    assert_eq!((code, body["error"].as_str()), (400, Some("too_many_jids")));
    let ok: Vec<String> = (0..1000).map(|i| format!("u{i}@x.test")).collect();
    let (code, body, _) = api.post(
        "/api/v1/last-seen",
        Some(&t),
        &json!({"jids": ok}).to_string(),
    );
    assert_eq!(
        (code, body["unknown"].as_array().map(|a| a.len())),
        (200, Some(1000))
    );
    let (code, body, _) = api.post(
        "/api/v1/last-seen",
        Some(&t),
        r#"{"jids":["a@x.test","bad@@jid"]}"#,
    );
    assert_eq!((code, body["error"].as_str()), (400, Some("invalid_jid")));
    let huge = format!(r#"{{"jids":["{}"]}}"#, "x".repeat(100 * 1024));
    let (code, body, _) = api.post("/api/v1/last-seen", Some(&t), &huge);
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["error"], "invalid_body");
    let (code, body, _) = api.post("/api/v1/last-seen", Some(&t), "{not json");
    assert_eq!((code, body["error"].as_str()), (400, Some("invalid_body")));
    let (code, body, _) = api.get("/api/v1/presence?show=sleeping", Some(&t));
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_parameter"))
    );
    let (code, body, _) = api.get("/api/v1/history/a@x.test?limit=5000", Some(&t));
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_parameter"))
    );
    let (code, body, _) = api.get("/api/v1/history/a@x.test", Some(&t));
    assert_eq!(
        (code, body["events"].as_array().map(Vec::len)),
        (200, Some(1)),
        "memory-only mode answers from this run's history: {body}"
    );
    let (code, _, _) = api.get("/api/v1/nothing-here", Some(&t));
    assert_eq!(code, 404);

    // Garbage on the WebSocket: error frames, the session survives.
    let mut ws = api.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(next_frame(&mut ws).await["error"], "bad_message");
    ws.send(Message::Binary(vec![0, 159, 146, 150].into()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["error"], "bad_message");
    ws.send(Message::Text(
        r#"{"type":"subscribe","jids":["bad@@jid"]}"#.into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut ws).await["error"], "invalid_jid");
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "pong");
    ws.send(Message::Text(
        r#"{"type":"subscribe","jids":["a@x.test"]}"#.into(),
    ))
    .await
    .unwrap();
    let snap = next_frame(&mut ws).await;
    assert_eq!(
        (
            snap["type"].as_str(),
            snap["users"].as_array().map(|u| u.len())
        ),
        (Some("snapshot"), Some(1))
    );
    let (code, body, _) = api.get("/healthz", None);
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_does_not_delay_another_and_is_resynced_or_closed() {
    init_logs();
    let api = start(
        PresenceConfig {
            ring_size: 1024,
            queue_size: 4096,
        },
        HttpConfig {
            ws_send_timeout_secs: Duration::from_secs(2),
            ..open_http()
        },
    )
    .await;
    let engine = api.engine().clone();
    let t = token("presence:read", None);
    let rss_before = rss_kib();

    // The slow one: handshakes, then never reads another byte.
    let mut slow = api.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut slow).await["type"], "snapshot");
    let mut fast = api.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut fast).await["type"], "snapshot");

    // More than the feed (128 chunks of up to 64 changes) and the socket buffers can hold.
    let n = 20_000u64;
    let big = "x".repeat(2000);
    let producer = {
        let engine = engine.clone();
        tokio::spawn(async move {
            for i in 0..n {
                engine
                    .apply(ev(
                        i,
                        &format!("u{}@x.test", i % 100),
                        "r",
                        Some(Show::Chat),
                        &format!("{i}{big}"),
                    ))
                    .await
                    .unwrap();
                if i % 200 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // The fast subscriber reaches the final seq (through diffs, or a resync + snapshot).
    let mut reached = 0;
    while reached < n {
        let f = next_frame(&mut fast).await;
        match f["type"].as_str() {
            Some("diff") => reached = *diff_seqs(&f).last().unwrap(),
            Some("snapshot") => reached = f["seq"].as_u64().unwrap(),
            Some("resync") => {}
            other => panic!("{other:?}"),
        }
    }
    producer.await.unwrap();
    // The slow one was resynced (it lagged) or closed (its writes timed out).
    let body = metrics_text(api.port);
    let closed_slow = metric(&body, "presence_bridge_ws_closed_total{reason=\"slow\"}");
    let resyncs = metric(&body, "presence_bridge_ws_resyncs_total{reason=\"lagged\"}");
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut ok = closed_slow + resyncs > 0;
    while !ok && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = metrics_text(api.port);
        ok = metric(&b, "presence_bridge_ws_closed_total{reason=\"slow\"}")
            + metric(&b, "presence_bridge_ws_resyncs_total{reason=\"lagged\"}")
            > 0;
    }
    assert!(
        ok,
        "the slow subscriber was neither resynced nor closed:\n{body}"
    );
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 400 * 1024,
        "memory grew by {grown} KiB for 40 MB of changes: not bounded"
    );
    drop(slow);
    api.stop().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after_and_never_limits_health() {
    init_logs();
    let api = start(
        PresenceConfig::default(),
        HttpConfig {
            rate_limit_per_token: 2,
            rate_limit_burst: 3,
            ..open_http()
        },
    )
    .await;
    let t = token("presence:read", None);
    let codes: Vec<(u16, Value, String)> = (0..10)
        .map(|_| api.get("/api/v1/stats", Some(&t)))
        .collect();
    let limited: Vec<_> = codes.iter().filter(|(c, _, _)| *c == 429).collect();
    assert!(
        !limited.is_empty(),
        "{:?}",
        codes.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    let (_, body, head) = limited[0];
    assert_eq!(body["error"], "rate_limited");
    assert!(head.to_lowercase().contains("retry-after:"), "{head}");
    // Health is never rate limited.
    assert!((0..10).all(|_| api.get("/healthz", None).0 == 200));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_websockets_with_1001() {
    init_logs();
    let t = token("presence:read", None);
    // The real shutdown path: every WebSocket session gets 1001 before the server stops.
    let api2 = start(PresenceConfig::default(), open_http()).await;
    let mut ws = api2.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    let stopping = tokio::spawn(api2.stop());
    let close = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(close, Some(1001));
    stopping.await.unwrap();
}

#[test]
fn token_subcommand_mints_tokens_the_api_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .args([
            "token",
            "--sub",
            "dashboard",
            "--scope",
            "presence:read history:read",
            "--domains",
            "A.test,b.test",
            "--ttl",
            "120",
        ])
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", API_SECRET)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let p = Auth::from_config(&AuthConfig {
        jwt_secret: presence_bridge::config::Secret::new(API_SECRET),
        ..AuthConfig::default()
    })
    .unwrap()
    .verify(&tok)
    .unwrap();
    assert_eq!(p.sub, "dashboard");
    assert!(p.has(auth::Scope::HistoryRead) && !p.has(auth::Scope::Admin));
    assert!(p.can_see_domain("a.test") && !p.can_see_domain("c.test"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .args(["token", "--sub", "x", "--scope", "root"])
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", API_SECRET)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .args(["token", "--sub", "x"])
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("auth.jwt_secret"));
}

#[test]
fn openapi_document_lists_the_contract_routes() {
    let doc: Value = serde_json::from_str(&api::openapi_json()).unwrap();
    for p in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/presence",
        "/api/v1/presence/{jid}",
        "/api/v1/last-seen/{jid}",
        "/api/v1/last-seen",
        "/api/v1/history/{jid}",
        "/api/v1/stats",
        "/api/v1/stats/concurrency",
        "/api/v1/ws",
        "/api/v1/openapi.json",
    ] {
        assert!(doc["paths"].get(p).is_some(), "missing {p}");
    }
    // Every operation documents its answers; every JSON answer has a schema; every
    // authenticated operation documents 401, 403 and 429 (with Retry-After).
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}");
            for (code, r) in responses {
                if let Some(json) = r["content"].get("application/json") {
                    assert!(
                        json.get("schema").is_some(),
                        "{method} {path} {code}: no schema"
                    );
                }
            }
            if op.get("security").is_some() {
                for code in ["401", "403", "429"] {
                    assert!(responses.contains_key(code), "{method} {path}: no {code}");
                }
                assert!(
                    responses["429"]["headers"].get("Retry-After").is_some(),
                    "{method} {path}: 429 without Retry-After"
                );
            }
        }
    }
    for jid_path in [
        "/api/v1/presence/{jid}",
        "/api/v1/last-seen/{jid}",
        "/api/v1/history/{jid}",
    ] {
        let params = doc["paths"][jid_path]["get"]["parameters"]
            .as_array()
            .unwrap();
        let jid = params.iter().find(|p| p["name"] == "jid").unwrap();
        assert_eq!(jid["schema"]["format"], "jid", "{jid_path}");
    }
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_keys_pin_the_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &p("rsa.key"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &p("rsa.key"),
        "-pubout",
        "-out",
        &p("rsa.pub"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p("ec.key"),
    ]);
    openssl(&["pkey", "-in", &p("ec.key"), "-pubout", "-out", &p("ec.pub")]);
    let claims = auth::claims("svc", "presence:read", None, 300, &AuthConfig::default());
    for (key, public, alg) in [
        ("rsa.key", "rsa.pub", jsonwebtoken::Algorithm::RS256),
        ("ec.key", "ec.pub", jsonwebtoken::Algorithm::ES256),
    ] {
        let pem = std::fs::read(p(key)).unwrap();
        let enc = match alg {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let good = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &enc).unwrap();
        let cfg = AuthConfig {
            jwt_public_key_file: Some(p(public).into()),
            ..AuthConfig::default()
        };
        let a = Auth::from_config(&cfg).unwrap();
        assert!(a.verify(&good).is_ok(), "{alg:?}");
        // An HS256 token "signed" with the public key text (the classic confusion attack).
        let public_pem = std::fs::read(p(public)).unwrap();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&public_pem),
        )
        .unwrap();
        assert!(
            a.verify(&forged).is_err(),
            "{alg:?}: the token's alg header must not choose the algorithm"
        );
    }
    let bad = AuthConfig {
        jwt_public_key_file: Some(p("rsa.key").replace("rsa.key", "missing.pem").into()),
        ..AuthConfig::default()
    };
    assert!(
        Auth::from_config(&bad)
            .unwrap_err()
            .to_string()
            .contains("auth.jwt_public_key_file")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_and_wss() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("cert.pem"),
    ]);
    let mut cfg = test_config();
    cfg.http.tls_cert = Some(p("cert.pem").into());
    cfg.http.tls_key = Some(p("key.pem").into());
    let app = TestApp::start(cfg, Ingest::None).await;
    let port = app.port;
    let cert = p("cert.pem");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &cert,
                &format!("https://127.0.0.1:{port}/healthz"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r#"{"status":"ok"}"#,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP on the TLS port gets nothing useful.
    assert!(
        try_request(port, "GET", "/healthz", &[], None)
            .map(|r| r.status)
            .unwrap_or(0)
            != 200
    );
    assert!(
        api::tls_config(
            std::path::Path::new("/nonexistent.pem"),
            std::path::Path::new("/nonexistent.key")
        )
        .unwrap_err()
        .contains("http.tls_cert")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_in_memory_mode_is_ready_with_the_memory_store() {
    init_logs();
    let api = start(PresenceConfig::default(), open_http()).await;
    let (code, ready, _) = api.get("/readyz", None);
    assert_eq!(
        (
            code,
            ready["xmpp"].as_str(),
            ready["store"].as_str(),
            ready["spooled_events"].as_u64()
        ),
        (200, Some("simulated"), Some("memory"), Some(0))
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_connection_cap_is_per_token_subject_and_frees_slots_on_close() {
    init_logs();
    let api = start(
        PresenceConfig::default(),
        HttpConfig {
            ws_max_per_token: 2,
            ..open_http()
        },
    )
    .await;
    let t = token("presence:read", None);
    let mut a = api.ws(&format!("token={t}"), None).await;
    let mut b = api.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut a).await["type"], "snapshot");
    assert_eq!(next_frame(&mut b).await["type"], "snapshot");
    let e = ws_connect(api.port, &format!("token={t}"), None)
        .await
        .err()
        .unwrap_or_default();
    assert!(
        e.contains("429"),
        "a third connection for the same token is refused: {e}"
    );
    // Another subject has its own slots.
    let other = auth::mint(
        API_SECRET,
        &auth::claims(
            "someone-else",
            "presence:read",
            None,
            300,
            &AuthConfig {
                jwt_secret: presence_bridge::config::Secret::new(API_SECRET),
                ..AuthConfig::default()
            },
        ),
    )
    .unwrap();
    let mut c = api.ws(&format!("token={other}"), None).await;
    assert_eq!(next_frame(&mut c).await["type"], "snapshot");
    // Closing frees the slots.
    drop(a);
    drop(b);
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut d = loop {
        match ws_connect(api.port, &format!("token={t}"), None).await {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "slots never freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(next_frame(&mut d).await["type"], "snapshot");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_peer_silent_for_three_pings_is_closed_as_dead() {
    init_logs();
    let api = start(
        PresenceConfig::default(),
        HttpConfig {
            ws_ping_secs: Duration::from_millis(300),
            ..open_http()
        },
    )
    .await;
    let t = token("presence:read", None);
    let mut a = api.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut a).await["type"], "snapshot");
    // `a` stops answering (never reads, so never pongs): the server closes it as dead.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // The client library may surface the close as an error (its queued pong cannot be
    // written any more); either way the stream ends, and the server says why.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match a.next().await {
                Some(Ok(Message::Close(f))) => {
                    return format!("close {:?}", f.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return format!("error {e}"),
                None => return "end".to_string(),
            }
        }
    })
    .await
    .unwrap();
    assert!(
        ended == "close Some(1008)" || ended.starts_with("error") || ended == "end",
        "{ended}"
    );
    assert!(
        metric(
            &metrics_text(api.port),
            "presence_bridge_ws_closed_total{reason=\"dead_peer\"}"
        ) >= 1
    );
    api.stop().await;
}

/// Online users, resources, and the two breakdowns of a `stats` frame.
fn counts(f: &Value) -> (u64, u64, Value, Value) {
    assert_eq!(f["type"], "stats", "{f}");
    (
        f["online_users"].as_u64().unwrap(),
        f["online_resources"].as_u64().unwrap(),
        f["by_show"].clone(),
        f["by_domain"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_mode_sends_the_narrowed_counts_only_when_they_change() {
    init_logs();
    let api = start(PresenceConfig::default(), open_http()).await;
    let engine = api.engine().clone();
    let online = |i: u64, user: &str, res: &str, show: Show| {
        let engine = engine.clone();
        let user = user.to_owned();
        let res = res.to_owned();
        async move {
            engine
                .apply(ev(i, &user, &res, Some(show), "here"))
                .await
                .unwrap();
        }
    };
    online(1, "alice@a.test", "phone", Show::Chat).await;
    online(2, "alice@a.test", "desk", Show::Chat).await;
    online(3, "bob@b.test", "r", Show::Away).await;

    let all = token("presence:read", None);
    let narrow = token("presence:read", Some(vec!["a.test"]));
    // Everything (the engine's own counts), a token narrowed to a.test, a domains filter.
    let mut w_all = api.ws(&format!("token={all}&mode=counts"), None).await;
    let mut w_narrow = api.ws(&format!("token={narrow}&mode=counts"), None).await;
    let mut w_b = api
        .ws(&format!("token={all}&mode=counts&domains=b.test"), None)
        .await;
    assert_eq!(
        counts(&next_frame(&mut w_all).await),
        (
            2,
            3,
            json!({"chat": 1, "away": 1}),
            json!({"a.test": 1, "b.test": 1})
        )
    );
    let f = next_frame(&mut w_narrow).await;
    assert_eq!(counts(&f), (1, 2, json!({"chat": 1}), json!({"a.test": 1})));
    assert!(f["seq"].as_u64().unwrap() >= 3, "{f}");
    assert_eq!(
        counts(&next_frame(&mut w_b).await),
        (1, 1, json!({"away": 1}), json!({"b.test": 1}))
    );

    // Status-only changes move no count: no frame. The next frame each session gets is
    // the one for carol coming online (a.test), so none was sent for the 50 updates.
    for i in 0..50 {
        engine
            .apply(ev(
                10 + i,
                "alice@a.test",
                "phone",
                Some(Show::Chat),
                &format!("s{i}"),
            ))
            .await
            .unwrap();
    }
    online(100, "carol@a.test", "r", Show::Dnd).await;
    assert_eq!(
        counts(&next_frame(&mut w_all).await),
        (
            3,
            4,
            json!({"chat": 1, "away": 1, "dnd": 1}),
            json!({"a.test": 2, "b.test": 1})
        )
    );
    assert_eq!(
        counts(&next_frame(&mut w_narrow).await),
        (2, 3, json!({"chat": 1, "dnd": 1}), json!({"a.test": 2}))
    );
    // bob goes offline: only b.test's view and the whole one change.
    engine
        .apply(ev(101, "bob@b.test", "r", None, "bye"))
        .await
        .unwrap();
    assert_eq!(
        counts(&next_frame(&mut w_b).await),
        (0, 0, json!({}), json!({}))
    );
    assert_eq!(counts(&next_frame(&mut w_all).await).0, 2);

    // A burst of 300 users coming online: the counts arrive coalesced (at most one frame
    // every 250 ms), and the last frame has them all.
    for i in 0..300u64 {
        online(200 + i, &format!("u{i}@a.test"), "r", Show::Chat).await;
    }
    let mut frames = 0;
    loop {
        let (users, ..) = counts(&next_frame(&mut w_narrow).await);
        frames += 1;
        if users == 302 {
            break;
        }
        assert!(users < 302, "{users}");
    }
    assert!(
        frames < 300,
        "{frames} frames for 300 changes: the counts were not coalesced"
    );

    // Switching modes with `subscribe`: diffs (a snapshot), then counts again with a filter.
    w_all
        .send(Message::text(r#"{"type":"subscribe"}"#))
        .await
        .unwrap();
    let snap = loop {
        let f = next_frame(&mut w_all).await;
        if f["type"] == "snapshot" {
            break f;
        }
        assert_eq!(f["type"], "stats", "{f}");
    };
    assert_eq!(snap["users"].as_array().unwrap().len(), 302);
    online(600, "dave@b.test", "r", Show::Xa).await;
    let d = next_frame(&mut w_all).await;
    assert_eq!(d["type"], "diff", "{d}");
    w_all
        .send(Message::text(
            r#"{"type":"subscribe","mode":"counts","domains":["b.test"]}"#,
        ))
        .await
        .unwrap();
    let f = loop {
        let f = next_frame(&mut w_all).await;
        if f["type"] == "stats" {
            break f;
        }
    };
    assert_eq!(counts(&f), (1, 1, json!({"xa": 1}), json!({"b.test": 1})));

    // Bad modes: a 400 at the handshake, an error frame (filter unchanged) in a message.
    let e = ws_connect(api.port, &format!("token={all}&mode=bogus"), None)
        .await
        .err()
        .unwrap_or_default();
    assert!(e.contains("400"), "{e}");
    w_b.send(Message::text(r#"{"type":"subscribe","mode":"bogus"}"#))
        .await
        .unwrap();
    let f = next_frame(&mut w_b).await;
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["error"], "bad_message", "{f}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_and_narrowed_sessions_get_exactly_their_users_changes_under_load() {
    init_logs();
    let api = start(PresenceConfig::default(), open_http()).await;
    let engine = api.engine().clone();
    let all = token("presence:read", None);
    let narrow = token("presence:read", Some(vec!["a.test"]));
    // (query, which JIDs the session may see)
    type Sees = fn(&str) -> bool;
    let sessions: Vec<(String, Sees)> = vec![
        (format!("token={all}&jids=u1@a.test,u7@b.test"), |j| {
            j == "u1@a.test" || j == "u7@b.test"
        }),
        (format!("token={all}&domains=b.test"), |j| {
            j.ends_with("@b.test")
        }),
        (format!("token={narrow}"), |j| j.ends_with("@a.test")),
        // The token's domains win over the filter's.
        (format!("token={narrow}&jids=u2@a.test,u3@b.test"), |j| {
            j == "u2@a.test"
        }),
        (format!("token={all}"), |_| true),
    ];
    let mut socks = Vec::new();
    for (q, _) in &sessions {
        let mut ws = api.ws(q, None).await;
        assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
        socks.push(ws);
    }
    let n = 3000u64;
    let user = |i: u64| {
        format!(
            "u{}@{}",
            i % 10,
            if (i / 10).is_multiple_of(2) {
                "a.test"
            } else {
                "b.test"
            }
        )
    };
    let producer = {
        let engine = engine.clone();
        tokio::spawn(async move {
            for i in 0..n {
                engine
                    .apply(ev(i, &user(i), "r", Some(Show::Chat), &format!("s{i}")))
                    .await
                    .unwrap();
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    for ((q, sees), ws) in sessions.iter().zip(socks.iter_mut()) {
        // Every change is a new status, so change i has seq i + 1.
        let expected: Vec<(u64, String)> = (0..n)
            .filter(|i| sees(&user(*i)))
            .map(|i| (i + 1, user(i)))
            .collect();
        let last = expected.last().unwrap().0;
        let mut got = Vec::new();
        while got.last().is_none_or(|(s, _): &(u64, String)| *s < last) {
            let f = next_frame(ws).await;
            assert_eq!(f["type"], "diff", "{q}: {f}");
            for c in f["changes"].as_array().unwrap() {
                got.push((
                    c["seq"].as_u64().unwrap(),
                    c["jid"].as_str().unwrap().to_owned(),
                ));
            }
        }
        assert_eq!(got, expected, "{q}");
    }
    producer.await.unwrap();
    api.stop().await;
}
