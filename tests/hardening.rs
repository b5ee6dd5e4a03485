//! The holes an attacker or a careless client could find (issue 9), each closed and proven
//! through the public interface: real HTTP and WebSocket clients on a real socket.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use presence_bridge::app::Ingest;
use presence_bridge::presence::Show;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn app() -> TestApp {
    TestApp::start(test_config(), Ingest::None).await
}

/// Reads until the server closes; returns the text frames seen and the close code.
async fn until_close(ws: &mut Ws) -> (Vec<serde_json::Value>, Option<u16>) {
    let mut frames = Vec::new();
    let code = tokio::time::timeout(PATIENCE, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => frames.push(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("until_close: the stream failed: {e}");
                    return None;
                }
            }
        }
        None
    })
    .await
    .expect("the server closes the session");
    (frames, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_is_cut_off_with_an_error_frame_and_1008() {
    init_logs();
    let app = app().await;
    for i in 0..300u64 {
        app.engine()
            .apply(event(
                u128::from(i),
                &format!("u{i}@flood.test"),
                "r",
                chrono::Utc::now(),
                available(Show::Chat, "here", 0, None),
            ))
            .await
            .unwrap();
    }
    app.engine().barrier().await.unwrap();
    let t = token("presence:read", None);
    let mut ws = app.ws(&format!("token={t}"), None).await;
    // Thousands of subscribes as fast as the socket takes them.
    let sub = json!({"type": "subscribe"}).to_string();
    let started = std::time::Instant::now();
    for _ in 0..2000 {
        if ws.send(Message::text(sub.clone())).await.is_err() {
            break;
        }
    }
    let (frames, code) = until_close(&mut ws).await;
    // The budget: one snapshot on connect, a burst of 20 messages, then 10 a second.
    let budget = 1 + 20 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    let snapshots = frames.iter().filter(|f| f["type"] == "snapshot").count();
    assert!(
        snapshots <= budget,
        "snapshots are bounded by the message budget ({budget}), not by the 2000 messages sent: {snapshots}"
    );
    let last = frames.last().expect("an error frame before the close");
    assert_eq!(
        (last["type"].as_str(), last["error"].as_str(), code),
        (Some("error"), Some("rate_limited"), Some(1008)),
        "{} frames",
        frames.len()
    );
    // Everyone else is served.
    assert_eq!(app.get("/api/v1/stats", Some(&t)).0, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_get_405_or_404_and_never_add_metric_series() {
    init_logs();
    let app = app().await;
    let before = metrics_text(app.port);
    for i in 0..200 {
        let method = format!("X{}{i}", "Y".repeat(500));
        let r = request(app.port, &method, "/api/v1/stats", &[], None);
        assert_eq!(r.status, 405, "{}", r.head);
        assert!(
            r.head.to_lowercase().contains("allow: get, head"),
            "{}",
            r.head
        );
        assert_eq!(r.json()["error"], "method_not_allowed");
        let r = request(app.port, &method, "/nowhere", &[], None);
        assert_eq!(r.status, 404);
    }
    let after = metrics_text(app.port);
    assert!(
        !after.contains("YYYY"),
        "no made-up method becomes a label value"
    );
    let series = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("presence_bridge_http_requests_total{"))
            .count()
    };
    assert!(
        series(&after) <= series(&before) + 3,
        "a bounded number of new series: {} → {}",
        series(&before),
        series(&after)
    );
    assert!(after.contains("method=\"other\""));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_like_get_without_a_body_and_wrong_methods_get_405_with_allow() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    let auth = format!("Bearer {t}");
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/stats", "/"] {
        let r = request(app.port, "HEAD", path, &[("Authorization", &auth)], None);
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.head);
        assert!(r.text.is_empty(), "HEAD {path} has no body");
    }
    let r = request(app.port, "DELETE", "/api/v1/presence/a@b.test", &[], None);
    assert_eq!(r.status, 405);
    assert!(
        r.head.to_lowercase().contains("allow: get, head"),
        "{}",
        r.head
    );
    let r = request(app.port, "GET", "/api/v1/last-seen", &[], None);
    assert_eq!(r.status, 405);
    assert!(r.head.to_lowercase().contains("allow: post"), "{}", r.head);
    assert_eq!(r.json()["error"], "method_not_allowed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {t}");
        let r = request(
            app.port,
            "GET",
            "/api/v1/stats",
            &[("Authorization", &auth)],
            None,
        );
        assert_eq!(r.status, 200, "{scheme}");
    }
    let r = request(
        app.port,
        "GET",
        "/api/v1/stats",
        &[("Authorization", &format!("Basic {t}"))],
        None,
    );
    assert_eq!(r.status, 401);
    app.stop().await;
}

/// A token with the given claims, signed with the test secret.
fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(API_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_is_enforced_aud_may_be_an_array_and_sub_must_not_be_empty() {
    init_logs();
    let mut cfg = test_config();
    cfg.auth.audience = Some("presence-bridge".into());
    let app = TestApp::start(cfg, Ingest::None).await;
    let now = chrono::Utc::now().timestamp();
    let base = json!({"sub": "idp-user", "exp": now + 300, "scope": "presence:read"});
    let with = |extra: serde_json::Value| {
        let mut c = base.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        signed(c)
    };
    let status = |t: &str| app.get("/api/v1/stats", Some(t));
    assert_eq!(
        status(&with(json!({"aud": ["other-api", "presence-bridge"]}))).0,
        200,
        "aud as an array"
    );
    assert_eq!(status(&with(json!({"aud": "presence-bridge"}))).0, 200);
    let (code, body, _) = status(&with(json!({"aud": ["other-api"]})));
    assert_eq!(code, 401, "{body}");
    let (code, body, _) = status(&with(json!({"aud": "presence-bridge", "nbf": now + 3600})));
    assert_eq!(code, 401, "not valid for another hour: {body}");
    assert!(body["message"].as_str().unwrap().contains("not valid yet"));
    assert_eq!(
        status(&with(json!({"aud": "presence-bridge", "nbf": now - 10}))).0,
        200
    );
    let (code, body, _) = status(&with(json!({"aud": "presence-bridge", "sub": " "})));
    assert_eq!(code, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("empty sub"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3500_jid_subscribe_in_one_frame_is_served() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    let mut ws = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    let jids: Vec<String> = (0..3500)
        .map(|i| format!("someone-{i}@example.com"))
        .collect();
    let msg = json!({"type": "subscribe", "jids": jids}).to_string();
    assert!(msg.len() > 64 << 10, "more than the old 64 KiB frame limit");
    ws.send(Message::text(msg)).await.unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    ws.send(Message::text(json!({"type": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "pong");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_over_the_limit_gets_an_error_frame_and_1009() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    let mut ws = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    let _ = ws.send(Message::text("x".repeat(300 << 10))).await;
    let (frames, code) = until_close(&mut ws).await;
    let last = frames.last().expect("an error frame");
    assert_eq!(last["error"], "message_too_big");
    assert_eq!(code, Some(1009));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_its_code() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    let mut ws = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let (_, code) = until_close(&mut ws).await;
    assert_eq!(code, Some(1001));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_cap_answers_429_with_retry_after() {
    init_logs();
    let mut cfg = test_config();
    cfg.http.ws_max_per_token = 1;
    let app = TestApp::start(cfg, Ingest::None).await;
    let t = token("presence:read", None);
    let _first = app.ws(&format!("token={t}"), None).await;
    let r = request(
        app.port,
        "GET",
        &format!("/api/v1/ws?token={t}"),
        &[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        None,
    );
    assert_eq!(r.status, 429, "{}", r.head);
    assert!(r.head.to_lowercase().contains("retry-after:"), "{}", r.head);
    assert_eq!(r.json()["error"], "too_many_connections");
    app.stop().await;
}

#[test]
fn token_with_an_out_of_range_ttl_exits_2() {
    for ttl in ["18446744073709551615", "315360001", "0"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .current_dir(std::env::temp_dir())
            .args(["token", "--sub", "ops", "--ttl", ttl])
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "x")
            .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", "s3cret-for-tests")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}");
        assert!(out.stdout.is_empty(), "no token printed for --ttl {ttl}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
    }
}

#[test]
fn check_config_takes_numeric_secrets_from_the_environment_and_never_prints_them() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("check-config")
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "98765")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", "123456789")
        .env(
            "PRESENCE_BRIDGE__STORE__POSTGRES_URL",
            "postgres://app:pa/ss@w0rd@db.internal/presence?password=qu3ry",
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    for secret in ["98765", "123456789", "pa/ss", "w0rd", "qu3ry"] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    assert!(
        text.contains("postgres://app:***@db.internal/presence?password=***"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jid_with_the_root_dot_is_the_same_user() {
    init_logs();
    let app = app().await;
    app.engine()
        .apply(event(
            1,
            "dot@trail.test.",
            "r",
            chrono::Utc::now(),
            available(Show::Away, "here", 0, None),
        ))
        .await
        .unwrap();
    app.engine().barrier().await.unwrap();
    let t = token("presence:read", None);
    for path in [
        "/api/v1/presence/dot@trail.test",
        "/api/v1/presence/dot@trail.test.",
        "/api/v1/last-seen/DOT@Trail.Test.",
    ] {
        let (code, body, _) = app.get(path, Some(&t));
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(body["jid"], "dot@trail.test", "{path}");
    }
    assert_eq!(
        app.get("/api/v1/presence/dot@trail.test..", Some(&t)).0,
        400,
        "two dots is not a domain"
    );
    app.stop().await;
}

/// A raw WebSocket handshake with these extra headers: the status code (the connection is
/// dropped right after the status line; a 101 never ends on its own).
fn handshake(port: u16, token: &str, extra: &[(&str, &str)]) -> u16 {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!(
        "GET /api/v1/ws?token={token} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_check_trusts_neither_host_nor_forwarded_headers_and_checks_the_scheme() {
    init_logs();
    let app = app().await;
    let t = token("presence:read", None);
    let own = format!("http://127.0.0.1:{}", app.port);
    let evil = format!("evil.example:{}", app.port);
    let evil_origin = format!("http://{evil}");
    let local = format!("http://localhost:{}", app.port);
    let https_own = format!("https://127.0.0.1:{}", app.port);
    assert_eq!(handshake(app.port, &t, &[("Origin", &own)]), 101);
    assert_eq!(handshake(app.port, &t, &[("Origin", &local)]), 101);
    // DNS rebinding: the page's own name resolves to the bridge; Host and Origin agree.
    assert_eq!(
        handshake(app.port, &t, &[("Origin", &evil_origin), ("Host", &evil)]),
        403
    );
    assert_eq!(
        handshake(
            app.port,
            &t,
            &[("Origin", &evil_origin), ("X-Forwarded-Host", &evil)]
        ),
        403
    );
    assert_eq!(handshake(app.port, &t, &[("Origin", &https_own)]), 403);
    app.stop().await;

    // Behind a proxy that says so, the forwarded origin is the public one.
    let mut cfg = test_config();
    cfg.http.trust_forwarded_headers = true;
    let app = TestApp::start(cfg, Ingest::None).await;
    let public = "presence.example.com";
    assert_eq!(
        handshake(
            app.port,
            &t,
            &[
                ("Origin", "https://presence.example.com"),
                ("X-Forwarded-Host", public),
                ("X-Forwarded-Proto", "https")
            ]
        ),
        101
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_keys_are_forgotten_once_their_quota_is_back() {
    init_logs();
    let mut cfg = test_config();
    cfg.http.rate_limit_per_token = 1;
    cfg.http.rate_limit_burst = 5;
    cfg.http.rate_limit_prune_secs = std::time::Duration::from_millis(200);
    let app = TestApp::start(cfg, Ingest::None).await;
    let keys = || {
        metric(
            &metrics_text(app.port),
            "presence_bridge_rate_limiter_keys{limiter=\"token\"}",
        )
    };
    // 300 subjects, three requests each: 300 keys, each about three seconds from a full quota.
    for i in 0..300 {
        let t = presence_bridge::api::auth::mint(
            API_SECRET,
            &presence_bridge::api::auth::claims(
                &format!("client-{i}"),
                "presence:read",
                None,
                300,
                &presence_bridge::config::AuthConfig::default(),
            ),
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(app.get("/api/v1/stats", Some(&t)).0, 200);
        }
    }
    eventually("the live keys are counted", || keys() >= 50).await;
    eventually("replenished keys are forgotten", || keys() == 0).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_backdate_its_live_presence_with_a_delay_stamp() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("backdate", &lease.domain);
    let cfg = xmpp_cfg(&ej, &lease);
    let window = cfg.resync_grace_secs;
    let bridge = TestApp::xmpp(cfg).await;
    bridge.connected().await;
    bridge.wait_status("resync over", |s| !s.resyncing).await;
    // Past the window in which the server answers the bridge.
    tokio::time::sleep(window + std::time::Duration::from_millis(200)).await;
    let before = chrono::Utc::now();
    let mut c = Client::login(ej.c2s, &user, "r").await;
    c.send(
        "<presence><show>chat</show><delay xmlns='urn:xmpp:delay' from='localhost' stamp='1970-01-01T00:00:00Z'/></presence>",
    )
    .await;
    let p = bridge.wait_user(&user, "online", |p| p.online).await;
    let since = p.online_since.expect("online since");
    assert!(
        since >= before - chrono::Duration::seconds(1),
        "online_since is when the bridge heard it, not the client's stamp: {since}"
    );
    assert_eq!(p.resources[0].since, since);
    c.unavailable(None).await;
    bridge.wait_user(&user, "offline", |p| !p.online).await;
    bridge.stop().await;
}

/// A XEP-0114 listener standing in for MongooseIM: the first connection completes its
/// handshake and is then kicked with `<conflict/>` (as `kick_old` does when another bridge
/// connects); every later one is refused with `<conflict/>` at the handshake (the default
/// `disconnect` behaviour while another connection holds the domain). Records accept times.
async fn conflicting_server() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = accepts.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            seen.lock().unwrap().push(std::time::Instant::now());
            n += 1;
            let first = n == 1;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let mut read_until = async |pat: &str, buf: &mut Vec<u8>| loop {
                    if String::from_utf8_lossy(buf).contains(pat) {
                        return true;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                };
                if !read_until("<stream:stream", &mut buf).await {
                    return;
                }
                let _ = s.write_all(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' from='bridge.localhost' id='c0ffee'>").await;
                let mut buf = Vec::new();
                loop {
                    if String::from_utf8_lossy(&buf).contains("</handshake>") {
                        break;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                if first {
                    let _ = s.write_all(b"<handshake/>").await;
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                let _ = s.write_all(b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>").await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, accepts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_explained_and_backed_off_harder_than_other_errors() {
    init_logs();
    let (port, accepts) = conflicting_server().await;
    let mut xmpp = xmpp_cfg_at(port, "bridge.localhost");
    xmpp.reconnect_min_secs = std::time::Duration::from_millis(50);
    xmpp.reconnect_max_secs = std::time::Duration::from_millis(100);
    xmpp.conflict_backoff_secs = std::time::Duration::from_secs(2);
    let app = TestApp::xmpp(xmpp).await;
    // Kicked after the handshake, refused at the next: both are conflicts.
    app.connected().await;
    app.wait_status("kicked", |s| !s.connected).await;
    eventually("two attempts", || accepts.lock().unwrap().len() >= 3).await;
    let st = app.component().status();
    let why = st.last_error.clone().unwrap_or_default();
    assert!(
        why.contains("<conflict/>") && why.contains("kick_old"),
        "{why}"
    );
    assert!(
        metric(
            &metrics_text(app.port),
            "presence_bridge_xmpp_conflicts_total"
        ) >= 2,
        "{st:?}"
    );
    // The normal backoff here is 25–100 ms; after a conflict it is at least half of 2 s, and
    // doubles with each conflict in a row.
    let t = accepts.lock().unwrap().clone();
    let gaps: Vec<_> = t.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= std::time::Duration::from_secs(1)),
        "{gaps:?}"
    );
    let (code, body, _) = app.get("/readyz", None);
    assert_eq!((code, body["xmpp"].as_str()), (503, Some("disconnected")));
    app.stop().await;
}
