//! Every metric the README documents is exported by the real service with a live value.
//!
//! The service runs through the production builder against a private ejabberd node (with
//! XEP-0356, so the privilege gauge has something to show) and a private Postgres cluster
//! (so the test can take it away and watch the spool). Traffic drives every path once: real
//! clients' presence, a malformed and an oversized stanza, WebSocket subscribers (one that
//! reads, one that falls behind, one that breaks the protocol), a Postgres outage, a torn
//! spool record from a "previous run", a server restart (reconnect, probes) and idle time
//! (keepalives). A metric that is declared but never updated fails here.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use presence_bridge::app::Ingest;
use presence_bridge::config::{Config, DbUrl, StoreConfig};
use presence_bridge::presence::Show;
use presence_bridge::store::StoreMode;
use tokio_tungstenite::tungstenite::Message;

/// The `presence_bridge_*` names in the README's metrics paragraph.
fn documented_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let start = readme
        .find("Metrics (`/metrics`")
        .expect("README has a metrics paragraph");
    let para = &readme[start..];
    let para = &para[..para.find("\n\n").unwrap_or(para.len())];
    para.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("presence_bridge_"))
        .map(str::to_owned)
        .collect()
}

/// Sum of every sample of `name` (any labels); None if there is no sample at all.
fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = l.rsplit_once(' ')?;
        let metric = series.split('{').next().unwrap_or(series);
        if metric == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_with_a_live_value() {
    init_logs();
    let documented = documented_metrics();
    assert!(documented.len() >= 30, "{documented:?}");
    let ej = Ejabberd::private("metrics", true);
    let pg = Pg::private("metrics");
    let spool = tempfile::tempdir().unwrap();
    let ev = |i: u64| {
        let at = chrono::DateTime::from_timestamp(1_795_000_000 + i as i64, 0).unwrap();
        stored_event(
            (7 << 100) + u128::from(i),
            &format!("spooled{}@localhost", i % 3),
            at,
        )
    };
    let batch = |r: std::ops::Range<u64>| r.map(ev).collect::<Vec<_>>();
    torn_spool(spool.path(), &[batch(0..10), batch(10..20), batch(20..30)]);
    let user = ej.user("m", "bridge.localhost");

    let mut xmpp = xmpp_cfg_private(&ej);
    xmpp.keepalive_secs = Duration::from_millis(500);
    xmpp.keepalive_timeout_secs = Duration::from_secs(2);
    let mut cfg = Config {
        xmpp,
        store: StoreConfig {
            postgres_url: Some(DbUrl::new(pg.url())),
            spool_dir: spool.path().to_owned(),
            retry_secs: Duration::from_millis(300),
            write_timeout_secs: Duration::from_secs(2),
            connect_timeout_secs: Duration::from_secs(1),
            ..StoreConfig::default()
        },
        ..test_config()
    };
    cfg.http.ws_send_timeout_secs = Duration::from_secs(30);
    // The default rate limits, pruned often enough to be seen.
    let defaults = presence_bridge::config::HttpConfig::default();
    cfg.http.rate_limit_per_token = defaults.rate_limit_per_token;
    cfg.http.rate_limit_per_ip = defaults.rate_limit_per_ip;
    cfg.http.rate_limit_prune_secs = Duration::from_millis(200);
    // A feed of 1024 changes per subscriber, so that falling behind is quick to provoke.
    cfg.presence.ring_size = 1024;
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    app.wait_status("privileges", |s| !s.privileges.is_empty())
        .await;
    eventually("the previous run's spool replayed", || {
        app.store().status().mode == StoreMode::Ok
    })
    .await;
    let t = token("presence:read", None);

    // A subscriber that reads everything (frames, bytes, end-to-end latency).
    let mut reader = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut reader).await["type"], "snapshot");
    let reading = tokio::spawn(async move {
        let mut frames = 0u64;
        while let Some(Ok(m)) = reader.next().await {
            if matches!(m, Message::Text(_)) {
                frames += 1;
            }
        }
        frames
    });
    // A subscriber that breaks the rules (a message over the 256 KiB limit): closed by the server.
    let mut rude = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut rude).await["type"], "snapshot");
    use futures::SinkExt;
    let _ = rude.send(Message::text("x".repeat(300 << 10))).await;
    let closed = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(m)) = rude.next().await {
            if let Message::Close(f) = m {
                return f.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(1009), "the server closes the rude subscriber");

    // Real presence through ejabberd, plus a malformed and an oversized stanza.
    let mut c = Client::login(ej.c2s, &user, "phone").await;
    c.presence(
        Some("chat"),
        Some("hello"),
        1,
        Some("http://conversations.im"),
    )
    .await;
    app.wait_user(&user, "online", |p| p.online).await;
    c.send("<presence><show>sleeping</show><status>bad show</status></presence>")
        .await;
    // ejabberd decodes and re-encodes what it routes, so a malformed presence never reaches
    // the component; an IQ get without a payload does, and xmpp-parsers rejects it.
    c.send("<iq type='get' id='empty' to='bridge.localhost'/>")
        .await;
    eventually("the unparsable IQ is counted", || {
        app.component().metrics().parse_errors.get() >= 1
    })
    .await;
    c.oversized_presence().await;
    c.presence(Some("away"), Some("after garbage"), 1, None)
        .await;
    app.wait_user(&user, "away", |p| p.show == Show::Away).await;

    // A subscriber that falls behind: it stops reading while a flood of large changes goes
    // by (more than its socket buffers, the WebSocket's 32 queued frames of at most 512
    // changes, and its 1024-change feed can hold), then reads again and must be told to resync.
    let mut laggard = app.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut laggard).await["type"], "snapshot");
    let big = "s".repeat(4000);
    for i in 0..24_000u64 {
        let kind = available(Show::Chat, &format!("{i}{big}"), 0, None);
        let at = chrono::Utc::now();
        app.engine()
            .apply(event(
                (9 << 100) + u128::from(i),
                &format!("flood{}@localhost", i % 50),
                "r",
                at,
                kind,
            ))
            .await
            .unwrap();
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    app.engine().barrier().await.unwrap();
    let resynced = tokio::time::timeout(PATIENCE * 2, async {
        loop {
            match laggard.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"type\":\"resync\"") => return true,
                Some(Ok(_)) => continue,
                _ => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(resynced, "the laggard is resynced");
    drop(laggard);

    // Postgres goes away: batches are spooled, then replayed when it is back.
    pg.stop();
    c.presence(Some("dnd"), Some("while Postgres is down"), 1, None)
        .await;
    app.wait_user(&user, "dnd", |p| p.show == Show::Dnd).await;
    eventually("spooling", || {
        app.store().status().mode == StoreMode::Spooling && app.store().queue_depth() == 0
    })
    .await;
    pg.start();
    eventually("replayed", || app.store().status().mode == StoreMode::Ok).await;

    // The server restarts: reconnect, resync probes; idle time: keepalives.
    ej.stop();
    app.wait_status("disconnected", |s| !s.connected).await;
    ej.start();
    app.wait_status("reconnected", |s| s.connected && s.reconnects == 1)
        .await;
    app.wait_status("resync over", |s| !s.resyncing).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Some HTTP traffic of its own.
    assert_eq!(app.get("/api/v1/stats", Some(&t)).0, 200);

    let text = metrics_text(app.port);
    let gauges = [
        "presence_bridge_online_users",
        "presence_bridge_online_resources",
        "presence_bridge_known_users",
        "presence_bridge_xmpp_connected",
        "presence_bridge_xmpp_stale",
        "presence_bridge_xmpp_privilege",
        "presence_bridge_ws_sessions",
        "presence_bridge_rate_limiter_keys",
        "presence_bridge_store_queue_depth",
        "presence_bridge_store_spooled_events",
        "presence_bridge_store_spooling",
    ];
    let histograms = [
        "presence_bridge_stanza_to_ws_seconds",
        "presence_bridge_http_request_duration_seconds",
        "presence_bridge_store_batch_events",
        "presence_bridge_store_batch_write_seconds",
    ];
    let mut dead = Vec::new();
    for name in &documented {
        let live = if histograms.contains(&name.as_str()) {
            sample_sum(&text, &format!("{name}_count")).is_some_and(|v| v > 0.0)
        } else if gauges.contains(&name.as_str()) {
            sample_sum(&text, name).is_some()
        } else {
            assert!(
                name.ends_with("_total"),
                "{name}: not a counter, gauge or histogram"
            );
            sample_sum(&text, name).is_some_and(|v| v > 0.0)
        };
        if !live {
            dead.push(name.clone());
        }
    }
    assert!(dead.is_empty(), "dead metrics: {dead:?}\n{text}");
    // The gauges say what is true now.
    assert_eq!(metric(&text, "presence_bridge_xmpp_connected"), 1);
    assert_eq!(metric(&text, "presence_bridge_xmpp_stale"), 0);
    assert_eq!(metric(&text, "presence_bridge_store_spooling"), 0);
    // The server restart ended every session (the real user's included) and the resync
    // found none: nobody is online, and everybody seen is still known.
    assert_eq!(metric(&text, "presence_bridge_online_users"), 0);
    assert_eq!(metric(&text, "presence_bridge_online_resources"), 0);
    // (The previous run's spooled users went to Postgres, not into this run's map.)
    assert_eq!(metric(&text, "presence_bridge_known_users"), 1 + 50);
    assert!(
        text.contains(
            "presence_bridge_xmpp_privilege{access=\"presence\",type=\"managed_entity\"} 1"
        ),
        "{text}"
    );
    assert!(
        sample_sum(&text, "presence_bridge_ws_closed_total").unwrap_or(0.0) >= 1.0,
        "the rude subscriber was closed"
    );

    drop(c);
    app.stop().await;
    assert!(reading.await.unwrap() > 0);
}
