//! The AMQP source (contract §9) against real RabbitMQ: the machine's broker (each test its own
//! exchange and queue) or, for the restart, a private node of Debian's rabbitmq-server.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::config::{AmqpConfig, Config, DbUrl};
use presence_bridge::presence::Show;

fn amqp_cfg(url: &str, exchange: &str, queue: &str) -> AmqpConfig {
    AmqpConfig {
        url: DbUrl::new(url),
        exchange: exchange.into(),
        queue: queue.into(),
        reconnect_min_secs: Duration::from_millis(200),
        reconnect_max_secs: Duration::from_secs(1),
        ..AmqpConfig::default()
    }
}

/// The bridge with the event pusher as its only source.
async fn amqp_only(amqp: AmqpConfig) -> TestApp {
    let cfg = Config {
        amqp: Some(amqp),
        ..test_config()
    };
    TestApp::start(cfg, Ingest::Xmpp).await
}

async fn wait_amqp(app: &TestApp, want: &str) {
    eventually(&format!("/readyz amqp {want}"), || {
        app.get("/readyz", None).1["amqp"] == want
    })
    .await;
}

fn amqp_metric(app: &TestApp, result: &str) -> u64 {
    metric(
        &metrics_text(app.port),
        &format!("presence_bridge_amqp_messages_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_pusher_sessions_of_several_resources_and_malformed_messages() {
    init_logs();
    let (exchange, queue) = amqp_names("amqp");
    let app = amqp_only(amqp_cfg(SHARED_AMQP, &exchange, &queue)).await;
    wait_amqp(&app, "connected").await;
    let (code, ready, _) = app.get("/readyz", None);
    assert_eq!((code, ready["xmpp"].as_str()), (200, Some("disabled")));
    assert_eq!(
        metric(&metrics_text(app.port), "presence_bridge_amqp_connected"),
        1
    );
    let push = Pusher::connect(SHARED_AMQP, &exchange).await;
    let user = unique_user("amqp");

    push.session(&user, "phone", true).await;
    push.session(&user, "laptop", true).await;
    let p = app
        .wait_user(&user, "two resources", |p| p.resources.len() == 2)
        .await;
    assert_eq!(
        (p.online, p.show, p.status.as_deref()),
        (true, Show::Available, None)
    );
    let seq = app.engine().barrier().await.unwrap();

    // The same session start again: no change.
    push.session(&user, "phone", true).await;
    eventually("third message applied", || {
        amqp_metric(&app, "applied") == 3
    })
    .await;
    assert_eq!(
        app.engine().barrier().await.unwrap(),
        seq,
        "a repeated start is no change"
    );

    // Malformed and foreign messages are counted, acked, and the consumer goes on.
    push.raw("x", b"not json").await;
    push.raw("x", br#"{"user_id":"nobody"}"#).await;
    push.raw(
        "x",
        br#"{"user_id":"eve@elsewhere.example/r","present":true}"#,
    )
    .await;
    push.session(&user, "phone", false).await;
    app.wait_user(&user, "phone gone", |p| p.resources.len() == 1)
        .await;
    assert_eq!(amqp_metric(&app, "malformed"), 2);
    assert_eq!(amqp_metric(&app, "foreign_domain"), 1);
    push.session(&user, "laptop", false).await;
    let p = app.wait_user(&user, "offline", |p| !p.online).await;
    assert!(p.last_seen.is_some());

    // Acked means gone from the queue: a second consumer of the same queue gets nothing old.
    app.stop().await;
    let again = amqp_only(amqp_cfg(SHARED_AMQP, &exchange, &queue)).await;
    wait_amqp(&again, "connected").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        amqp_metric(&again, "malformed"),
        0,
        "malformed messages are not redelivered"
    );
    assert_eq!(
        amqp_metric(&again, "applied"),
        0,
        "applied messages are not redelivered"
    );
    again.stop().await;
    push.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_reconnects_and_loses_nothing_the_broker_kept() {
    init_logs();
    let rabbit = Rabbit::private();
    let (exchange, queue) = amqp_names("restart");
    // A durable exchange (MongooseIM: presence_exchange.durable = true), so that the exchange,
    // the durable queue and its binding survive the restart.
    let cfg = AmqpConfig {
        exchange_durable: true,
        ..amqp_cfg(&rabbit.url(), &exchange, &queue)
    };
    let app = amqp_only(cfg).await;
    wait_amqp(&app, "connected").await;
    let push = Pusher::connect_durable(&rabbit.url(), &exchange).await;
    let user = unique_user("restart");
    push.session(&user, "a", true).await;
    app.wait_user(&user, "a online", |p| p.online).await;
    push.close().await;

    rabbit.stop();
    wait_amqp(&app, "disconnected").await;
    assert_eq!(
        metric(&metrics_text(app.port), "presence_bridge_amqp_connected"),
        0
    );
    let (code, _, _) = app.get("/readyz", None);
    assert_eq!(code, 503, "the only source is down: not ready");
    rabbit.start();

    // Published while the bridge may still be backing off: the durable queue keeps them.
    let push = Pusher::connect_durable(&rabbit.url(), &exchange).await;
    push.session(&user, "b", true).await;
    push.session(&user, "c", true).await;
    push.session(&user, "a", false).await;
    wait_amqp(&app, "connected").await;
    let p = app
        .wait_user(&user, "b and c online, a gone", |p| {
            let mut r: Vec<&str> = p.resources.iter().map(|r| r.resource.as_str()).collect();
            r.sort();
            r == ["b", "c"]
        })
        .await;
    assert!(p.online);
    assert_eq!(amqp_metric(&app, "applied"), 4);
    assert!(
        metric(
            &metrics_text(app.port),
            "presence_bridge_amqp_reconnects_total"
        ) >= 1,
        "reconnected"
    );
    app.stop().await;
    push.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sources_xmpp_gives_show_amqp_confirms_without_duplicate_changes() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("both", &lease.domain);
    let (exchange, queue) = amqp_names("both");
    let cfg = Config {
        xmpp: xmpp_cfg(&ej, &lease),
        amqp: Some(amqp_cfg(SHARED_AMQP, &exchange, &queue)),
        ..test_config()
    };
    let app = TestApp::start(cfg, Ingest::Xmpp).await;
    app.connected().await;
    wait_amqp(&app, "connected").await;
    let push = Pusher::connect(SHARED_AMQP, &exchange).await;

    // XMPP first: away / "lunch"; then the event pusher's start of the same session.
    let mut phone = Client::login(ej.c2s, &user, "phone").await;
    phone.presence(Some("away"), Some("lunch"), 1, None).await;
    app.wait_user(&user, "away", |p| p.show == Show::Away).await;
    let seq = app.engine().barrier().await.unwrap();
    push.session(&user, "phone", true).await;
    eventually("applied", || amqp_metric(&app, "applied") == 1).await;
    assert_eq!(
        app.engine().barrier().await.unwrap(),
        seq,
        "no duplicate change"
    );
    let p = app.wait_user(&user, "still away", |p| p.online).await;
    assert_eq!((p.show, p.status.as_deref()), (Show::Away, Some("lunch")));

    // The event pusher first (a session whose presence has not arrived yet), then XMPP's
    // word replaces the placeholder.
    push.session(&user, "laptop", true).await;
    app.wait_user(&user, "laptop", |p| p.resources.len() == 2)
        .await;
    let mut laptop = Client::login(ej.c2s, &user, "laptop").await;
    laptop.presence(Some("dnd"), Some("focus"), 5, None).await;
    let p = app
        .wait_user(&user, "laptop dnd", |p| p.show == Show::Dnd)
        .await;
    assert_eq!(p.status.as_deref(), Some("focus"));

    // XMPP's unavailable, then the event pusher's end of the same session: one change.
    laptop.unavailable(None).await;
    app.wait_user(&user, "laptop gone", |p| p.resources.len() == 1)
        .await;
    let seq = app.engine().barrier().await.unwrap();
    push.session(&user, "laptop", false).await;
    eventually("applied", || amqp_metric(&app, "applied") == 3).await;
    assert_eq!(
        app.engine().barrier().await.unwrap(),
        seq,
        "no duplicate change"
    );
    phone.unavailable(None).await;
    app.wait_user(&user, "offline", |p| !p.online).await;
    app.stop().await;
    push.delete(&queue).await;
}
