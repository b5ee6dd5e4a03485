//! Tokens from an identity provider (contract §8): a local JWKS server with RSA, EC P-256 and
//! Ed25519 keys (test keys in tests/fixtures/jwks/), keys picked by `kid`, `aud` as a string
//! or an array, `nbf`, key rotation mid-run, unknown `kid`s (one refresh per 10 s at most), a
//! JWKS that starts failing (the last good keys stay), and one that is never reachable.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use presence_bridge::app::Ingest;
use presence_bridge::config::{AuthConfig, Config, Secret};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo().join("tests/fixtures/jwks").join(name)).unwrap()
}

fn jwk(name: &str) -> Value {
    serde_json::from_str(&fixture(&format!("{name}.jwk.json"))).unwrap()
}

/// A token signed by test key `key` (its file name), with `kid` in the header.
fn sign(key: &str, kid: &str, alg: Algorithm, claims: &Value) -> String {
    let pem = fixture(&format!("{key}.pem"));
    let enc = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
    }
    .unwrap();
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &enc).unwrap()
}

fn claims(aud: Value) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": "idp-user", "exp": now + 300, "iat": now, "scope": "presence:read", "aud": aud})
}

/// A JWKS server whose answer the test changes: (status, document).
async fn jwks_server(keys: &[&str]) -> (FakeHttp, Arc<Mutex<(u16, String)>>) {
    let doc = Arc::new(Mutex::new((200u16, set(keys))));
    let d = doc.clone();
    let server = FakeHttp::start(move |_| d.lock().unwrap().clone()).await;
    (server, doc)
}

fn set(keys: &[&str]) -> String {
    json!({"keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()}).to_string()
}

fn config(url: String, refresh: Duration) -> Config {
    let mut cfg = test_config();
    cfg.auth = AuthConfig {
        jwt_secret: Secret::new(API_SECRET),
        audience: Some("presence-bridge".into()),
        jwks_url: Some(url),
        jwks_refresh_secs: refresh,
        ..AuthConfig::default()
    };
    cfg
}

fn stats(app: &TestApp, token: &str) -> (u16, String) {
    let (c, body, _) = app.get("/api/v1/stats", Some(token));
    (c, body["message"].as_str().unwrap_or("").to_owned())
}

async fn ready_jwks(app: &TestApp, state: &str) -> (u16, Value) {
    let mut last = (0, Value::Null);
    eventually(&format!("jwks {state}"), || {
        let (c, body, _) = app.get("/readyz", None);
        let ok = body["jwks"]["state"] == state;
        last = (c, body);
        ok
    })
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_by_kid_audiences_nbf_rotation_and_unknown_kids() {
    init_logs();
    let (server, doc) = jwks_server(&["rsa1", "ec1", "ed1"]).await;
    let app = TestApp::start(
        config(server.url("/jwks"), Duration::from_secs(300)),
        Ingest::None,
    )
    .await;
    let (code, ready) = ready_jwks(&app, "ok").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["jwks"]["keys"], 3);
    let fetched = || server.requests().len();
    assert_eq!(fetched(), 1);

    // One key of each kind; aud as an array holding ours.
    let aud = json!(["another-api", "presence-bridge"]);
    // This very token is used again after the rotation: accepted now (and remembered as
    // verified), refused once its key is retired.
    let rsa1_token = sign("rsa1", "rsa1", Algorithm::RS256, &claims(aud.clone()));
    assert_eq!(stats(&app, &rsa1_token).0, 200);
    assert_eq!(stats(&app, &rsa1_token).0, 200);
    for (key, alg) in [
        ("rsa1", Algorithm::RS256),
        ("ec1", Algorithm::ES256),
        ("ed1", Algorithm::EdDSA),
    ] {
        assert_eq!(
            stats(&app, &sign(key, key, alg, &claims(aud.clone()))).0,
            200,
            "{key}"
        );
    }
    // aud as a string; a wrong audience; nbf in the future; an algorithm the key is not for;
    // a key that is not the kid's.
    assert_eq!(
        stats(
            &app,
            &sign(
                "rsa1",
                "rsa1",
                Algorithm::RS256,
                &claims(json!("presence-bridge"))
            )
        )
        .0,
        200
    );
    assert_eq!(
        stats(
            &app,
            &sign("rsa1", "rsa1", Algorithm::RS256, &claims(json!("other")))
        ),
        (401, "invalid token: wrong audience".into())
    );
    let mut early = claims(json!("presence-bridge"));
    early["nbf"] = json!(chrono::Utc::now().timestamp() + 600);
    assert_eq!(
        stats(&app, &sign("rsa1", "rsa1", Algorithm::RS256, &early)),
        (401, "invalid token: not valid yet".into())
    );
    assert_eq!(
        stats(
            &app,
            &sign(
                "rsa1",
                "rsa1",
                Algorithm::RS384,
                &claims(json!("presence-bridge"))
            )
        )
        .0,
        401,
        "RS384 with an RS256 key"
    );
    assert_eq!(
        stats(
            &app,
            &sign(
                "rsa2",
                "rsa1",
                Algorithm::RS256,
                &claims(json!("presence-bridge"))
            )
        ),
        (401, "invalid token: bad signature".into())
    );
    // The static secret keeps working for tokens without a kid.
    assert_eq!(
        stats(&app, &token("presence:read", None)).0,
        401,
        "our own tokens have no aud"
    );
    assert_eq!(fetched(), 1, "known kids never fetch");

    // Rotation: the provider now publishes rsa2 (and no longer rsa1). A token with the new kid
    // makes the bridge refresh at once and passes.
    doc.lock().unwrap().1 = set(&["rsa2", "ec1"]);
    assert_eq!(
        stats(
            &app,
            &sign(
                "rsa2",
                "rsa2",
                Algorithm::RS256,
                &claims(json!("presence-bridge"))
            )
        )
        .0,
        200
    );
    assert_eq!(fetched(), 2);
    // The retired key is gone (no new fetch: one per 10 s for unknown kids).
    assert_eq!(
        stats(
            &app,
            &sign(
                "rsa1",
                "rsa1",
                Algorithm::RS256,
                &claims(json!("presence-bridge"))
            )
        ),
        (401, "invalid token: unknown key id".into())
    );
    assert_eq!(
        stats(&app, &rsa1_token),
        (401, "invalid token: unknown key id".into()),
        "a token verified under the old key set is verified again"
    );
    for i in 0..5 {
        let t = sign(
            "rsa2",
            &format!("made-up-{i}"),
            Algorithm::RS256,
            &claims(json!("presence-bridge")),
        );
        assert_eq!(
            stats(&app, &t),
            (401, "invalid token: unknown key id".into())
        );
    }
    assert_eq!(
        fetched(),
        2,
        "a flood of unknown kids costs at most one fetch per 10 s"
    );
    let m = http::metrics_text(app.port);
    assert!(
        m.contains(r#"presence_bridge_jwks_fetches_total{result="ok"} 2"#),
        "{m}"
    );
    assert!(m.contains("presence_bridge_jwks_keys 2"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_jwks_keeps_the_last_good_keys_and_says_so() {
    init_logs();
    let (server, doc) = jwks_server(&["ec1"]).await;
    let app = TestApp::start(
        config(server.url("/jwks"), Duration::from_secs(1)),
        Ingest::None,
    )
    .await;
    ready_jwks(&app, "ok").await;
    let t = sign(
        "ec1",
        "ec1",
        Algorithm::ES256,
        &claims(json!("presence-bridge")),
    );
    assert_eq!(stats(&app, &t).0, 200);
    doc.lock().unwrap().0 = 500;
    let (code, ready) = ready_jwks(&app, "stale").await;
    assert_eq!(code, 200, "keys are kept: still ready: {ready}");
    assert_eq!(ready["jwks"]["keys"], 1);
    assert!(
        ready["jwks"]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{ready}"
    );
    assert_eq!(stats(&app, &t).0, 200, "the last good key still verifies");
    let m = http::metrics_text(app.port);
    assert!(
        http::metric(&m, r#"presence_bridge_jwks_fetches_total{result="error"}"#) >= 1,
        "{m}"
    );
    // Recovery.
    doc.lock().unwrap().0 = 200;
    let (_, ready) = ready_jwks(&app, "ok").await;
    assert!(ready["jwks"]["last_error"].is_null());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_jwks_is_not_ready_and_static_keys_still_work() {
    init_logs();
    let dead = free_port();
    let mut cfg = config(
        format!("http://127.0.0.1:{dead}/jwks"),
        Duration::from_secs(300),
    );
    cfg.auth.audience = None;
    let app = TestApp::start(cfg, Ingest::None).await;
    eventually("first fetch failed", || {
        let (_, body, _) = app.get("/readyz", None);
        body["jwks"]["last_error"].is_string()
    })
    .await;
    let (code, ready, _) = app.get("/readyz", None);
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["jwks"]["state"], "unavailable");
    assert!(
        ready["jwks"]["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{ready}"
    );
    let mut c = claims(json!("x"));
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        stats(&app, &sign("rsa1", "rsa1", Algorithm::RS256, &c)),
        (401, "invalid token: unknown key id".into())
    );
    assert_eq!(
        stats(&app, &token("presence:read", None)).0,
        200,
        "HS256 without a kid"
    );
    // A bad URL is a config error naming the key.
    let mut bad = test_config();
    bad.xmpp.password = Secret::new("x");
    bad.auth.jwks_url = Some("http://idp.example.com/jwks".into());
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("auth.jwks_url"), "{err}");
    app.stop().await;
}
