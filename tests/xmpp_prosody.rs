//! The component against a real Prosody 0.12 (Debian) with prosody-modules' mod_privilege
//! (XEP-0356, presence `managed_entity`): live presence, a bridge restart, and a server crash —
//! the scenarios the README claims for Prosody. Each test runs its own Prosody.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use presence_bridge::config::PresenceConfig;
use presence_bridge::presence::{Engine, Show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_presence_privileges_and_server_generated_unavailable() {
    init_logs();
    let user = unique_user("prlive");
    let pr = Prosody::private("live", &[&user]);
    let app = TestApp::xmpp(xmpp_cfg_at(pr.component_port, "bridge.localhost")).await;
    app.connected().await;
    app.wait_status("privileges advertised", |s| {
        s.privileges
            .contains(&("presence".into(), "managed_entity".into()))
    })
    .await;

    // No roster entry needed: the privilege forwards every user's presence.
    let mut phone = Client::login(pr.c2s, &user, "phone").await;
    phone
        .presence(Some("chat"), Some("on my phone"), 5, None)
        .await;
    let mut laptop = Client::login(pr.c2s, &user, "laptop").await;
    laptop
        .presence(Some("away"), Some("meeting"), 1, None)
        .await;
    let p = app
        .wait_user(&user, "two resources", |p| p.resources.len() == 2)
        .await;
    assert_eq!(
        (p.show, p.status.as_deref(), p.priority),
        (Show::Chat, Some("on my phone"), 5),
        "the highest priority wins"
    );
    laptop.presence(Some("dnd"), Some("focus"), 9, None).await;
    app.wait_user(&user, "laptop wins", |p| p.show == Show::Dnd)
        .await;

    // A TCP reset: Prosody generates a bare `unavailable`.
    laptop.abort();
    let p = app
        .wait_user(&user, "laptop gone", |p| p.resources.len() == 1)
        .await;
    assert_eq!(
        (p.show, p.status.as_deref()),
        (Show::Chat, Some("on my phone"))
    );
    // A stream closed without an unavailable: Prosody 0.12.3 generates a bare unavailable
    // here too (no "Disconnected: …" text; that text, where a server sends it, is an end
    // cause: see the translator's tests).
    phone.close().await;
    let p = app.wait_user(&user, "offline", |p| !p.online).await;
    assert_eq!((p.show, p.status.as_deref()), (Show::Offline, None));
    assert!(p.last_seen.is_some());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_restart_finds_who_came_and_forgets_who_left() {
    init_logs();
    let stays = unique_user("prstay");
    let leaves = unique_user("prleave");
    let comes = unique_user("prcome");
    let pr = Prosody::private("restart", &[&stays, &leaves, &comes]);
    let (engine, _task) = Engine::start(&PresenceConfig::default());
    let app = TestApp::xmpp_on(
        engine.clone(),
        xmpp_cfg_at(pr.component_port, "bridge.localhost"),
    )
    .await;
    app.connected().await;
    let mut s = Client::login(pr.c2s, &stays, "r").await;
    s.presence(Some("away"), Some("here all day"), 0, None)
        .await;
    let mut l = Client::login(pr.c2s, &leaves, "r").await;
    l.presence(None, None, 0, None).await;
    app.wait_user(&stays, "online", |p| p.online).await;
    app.wait_user(&leaves, "online", |p| p.online).await;
    app.stop().await;

    // While the bridge is away: one user leaves, one arrives.
    l.unavailable(None).await;
    l.close().await;
    let mut c = Client::login(pr.c2s, &comes, "r").await;
    c.presence(Some("xa"), Some("back later"), 0, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Prosody pushes the current presence of every online resource at connect; the resync
    // expires what nobody confirmed.
    let app = TestApp::xmpp_on(
        engine.clone(),
        xmpp_cfg_at(pr.component_port, "bridge.localhost"),
    )
    .await;
    app.connected().await;
    let p = app
        .wait_user(&comes, "found at connect", |p| p.online)
        .await;
    assert_eq!(
        (p.show, p.status.as_deref()),
        (Show::Xa, Some("back later"))
    );
    app.wait_status("resync over", |s| !s.resyncing).await;
    app.wait_user(&leaves, "no ghost", |p| !p.online).await;
    let p = app.wait_user(&stays, "still online", |p| p.online).await;
    assert_eq!(p.show, Show::Away);
    s.unavailable(None).await;
    c.unavailable(None).await;
    app.wait_user(&comes, "offline", |p| !p.online).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crash_and_restart_leaves_no_ghosts() {
    init_logs();
    let user = unique_user("prcrash");
    let later = unique_user("prlater");
    let pr = Prosody::private("crash", &[&user, &later]);
    let mut xmpp = xmpp_cfg_at(pr.component_port, "bridge.localhost");
    xmpp.reconnect_max_secs = Duration::from_secs(1);
    let app = TestApp::xmpp(xmpp).await;
    app.connected().await;
    let mut c = Client::login(pr.c2s, &user, "desk").await;
    c.presence(None, Some("working"), 0, None).await;
    app.wait_user(&user, "online", |p| p.online).await;
    let seq = app.engine().barrier().await.unwrap();

    pr.kill();
    app.wait_status("disconnected and stale", |s| !s.connected && s.stale)
        .await;
    // Disconnected: the map is left alone (no offline storm); readiness says so.
    assert_eq!(app.engine().barrier().await.unwrap(), seq);
    assert_eq!(app.get("/readyz", None).0, 503);
    drop(c);

    pr.start();
    app.wait_status("reconnected", |s| s.connected && s.reconnects == 1)
        .await;
    app.wait_status("resync over", |s| !s.resyncing).await;
    // The crash ended the session and nobody confirmed it: offline, no ghost.
    app.wait_user(&user, "offline after resync", |p| !p.online)
        .await;
    let mut n = Client::login(pr.c2s, &later, "r").await;
    n.presence(Some("chat"), None, 0, None).await;
    app.wait_user(&later, "a new session is seen", |p| p.show == Show::Chat)
        .await;
    app.stop().await;
}
