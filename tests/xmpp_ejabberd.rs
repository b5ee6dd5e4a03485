//! The XMPP component against a real ejabberd (Debian 23.01), driven by real XMPP clients.
//! Every step asserts the exact aggregate the engine publishes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use presence_bridge::config::PresenceConfig;
use presence_bridge::presence::{Engine, Op, Show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_resource_lifecycle_exact_aggregates() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("life", &lease.domain);
    let bridge = TestApp::xmpp(xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let mut sub = bridge.engine().hub().subscribe();

    // 1. phone: chat / "on my phone" / priority 5, Conversations caps.
    let t0 = Utc::now();
    let mut phone = Client::login(ej.c2s, &user, "phone").await;
    phone
        .presence(
            Some("chat"),
            Some("on my phone"),
            5,
            Some("http://conversations.im"),
        )
        .await;
    let c = next_change(&mut sub, &user).await;
    let t1 = Utc::now();
    assert_eq!((c.seq, c.op), (1, Op::Online));
    let p = &c.presence;
    assert_eq!(
        (p.online, p.show, p.status.as_deref(), p.priority),
        (true, Show::Chat, Some("on my phone"), 5)
    );
    assert_eq!(p.resources.len(), 1);
    let r = &p.resources[0];
    assert_eq!(
        (r.resource.as_str(), r.show, r.priority, r.client.as_deref()),
        ("phone", Show::Chat, 5, Some("Conversations"))
    );
    assert!(
        t0 <= r.since && r.since <= t1,
        "since {} not within [{t0}, {t1}]",
        r.since
    );
    assert_eq!(p.online_since, Some(r.since));
    assert_eq!(p.last_seen, None);
    let online_since = p.online_since;
    let phone_since = r.since;

    // 2. laptop: available / "at my desk" / priority 10 → laptop wins on priority.
    let mut laptop = Client::login(ej.c2s, &user, "laptop").await;
    laptop
        .presence(None, Some("at my desk"), 10, Some("https://gajim.org"))
        .await;
    let c = next_change(&mut sub, &user).await;
    assert_eq!((c.seq, c.op), (2, Op::Update));
    let p = &c.presence;
    assert_eq!(
        (p.show, p.status.as_deref(), p.priority),
        (Show::Available, Some("at my desk"), 10)
    );
    let names: Vec<_> = p
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.client.as_deref()))
        .collect();
    assert_eq!(
        names,
        vec![("laptop", Some("Gajim")), ("phone", Some("Conversations"))]
    );
    assert_eq!(
        p.online_since, online_since,
        "online_since stays with the first resource"
    );

    // 3. phone → away "walking": aggregate still the laptop's.
    phone
        .presence(
            Some("away"),
            Some("walking"),
            5,
            Some("http://conversations.im"),
        )
        .await;
    let c = next_change(&mut sub, &user).await;
    assert_eq!((c.seq, c.op), (3, Op::Update));
    let p = &c.presence;
    assert_eq!(
        (p.show, p.status.as_deref(), p.priority),
        (Show::Available, Some("at my desk"), 10)
    );
    let ph = p.resources.iter().find(|r| r.resource == "phone").unwrap();
    assert_eq!(
        (ph.show, ph.status.as_deref(), ph.since),
        (Show::Away, Some("walking"), phone_since)
    );

    // 4. laptop → dnd "in a meeting".
    laptop
        .presence(
            Some("dnd"),
            Some("in a meeting"),
            10,
            Some("https://gajim.org"),
        )
        .await;
    let c = next_change(&mut sub, &user).await;
    assert_eq!(
        (
            c.seq,
            c.presence.show,
            c.presence.status.as_deref(),
            c.presence.priority
        ),
        (4, Show::Dnd, Some("in a meeting"), 10)
    );

    // 5. status-only change.
    laptop
        .presence(
            Some("dnd"),
            Some("meeting until 15:00"),
            10,
            Some("https://gajim.org"),
        )
        .await;
    let c = next_change(&mut sub, &user).await;
    assert_eq!(
        (c.seq, c.op, c.presence.show, c.presence.status.as_deref()),
        (5, Op::Update, Show::Dnd, Some("meeting until 15:00"))
    );

    // 6. phone leaves with an explicit unavailable.
    phone.unavailable(Some("bye from phone")).await;
    let c = next_change(&mut sub, &user).await;
    assert_eq!((c.seq, c.op), (6, Op::Update));
    assert_eq!(
        c.presence
            .resources
            .iter()
            .map(|r| r.resource.as_str())
            .collect::<Vec<_>>(),
        vec!["laptop"]
    );
    assert_eq!((c.presence.show, c.presence.priority), (Show::Dnd, 10));
    phone.close().await;

    // 7. laptop closes the stream without an unavailable: the server's roster broadcast
    //    still tells us (lab §4.3).
    let before_close = Utc::now();
    laptop.close().await;
    let c = next_change(&mut sub, &user).await;
    let after_close = Utc::now();
    assert_eq!((c.seq, c.op), (7, Op::Offline));
    let p = &c.presence;
    assert_eq!(
        (p.online, p.show, p.priority, p.online_since),
        (false, Show::Offline, 0, None)
    );
    assert!(p.resources.is_empty());
    let seen = p.last_seen.unwrap();
    assert!(
        before_close <= seen && seen <= after_close,
        "last_seen {seen} not within [{before_close}, {after_close}]"
    );
    assert_eq!(
        bridge.engine().get(&c.jid).unwrap(),
        c.presence,
        "map agrees with the change"
    );

    // Nothing else happened: seq is gap-free and complete; the stream is still the first one.
    assert_eq!(bridge.engine().barrier().await.unwrap(), 7);
    let st = bridge.component().status();
    assert_eq!((st.connected, st.reconnects, st.stale), (true, 0, false));
    assert_eq!(bridge.component().metrics().parse_errors.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_abort_goes_offline() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("abort", &lease.domain);
    let bridge = TestApp::xmpp(xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let mut c = Client::login(ej.c2s, &user, "desktop").await;
    c.presence(Some("xa"), Some("gone fishing"), -1, None).await;
    let p = bridge.wait_user(&user, "online", |p| p.online).await;
    assert_eq!(
        (p.show, p.priority, p.status.as_deref()),
        (Show::Xa, -1, Some("gone fishing"))
    );
    assert_eq!(p.resources[0].client, None);

    let before = Utc::now();
    c.abort();
    let p = bridge
        .wait_user(&user, "offline after TCP abort", |p| !p.online)
        .await;
    assert!(p.last_seen.unwrap() >= before);
    assert_eq!((p.show, p.resources.len()), (Show::Offline, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_online_while_bridge_away_is_found_by_probe_with_real_since() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("probe", &lease.domain);

    // The bridge sees the user once (so it is a known user), then goes away; the map lives
    // on in an engine the test owns.
    let (engine, _engine_task) = Engine::start(&PresenceConfig::default());
    let bridge = TestApp::xmpp_on(engine.clone(), xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let mut c = Client::login(ej.c2s, &user, "old").await;
    c.presence(None, None, 0, None).await;
    bridge.wait_user(&user, "online", |p| p.online).await;
    c.unavailable(None).await;
    c.close().await;
    bridge.wait_user(&user, "offline", |p| !p.online).await;
    bridge.stop().await;
    let seq_before = engine.seq();

    // While the bridge is away the user logs in on two devices; their presence is lost for
    // the bridge (the server bounces it).
    let t0 = Utc::now();
    let mut tablet = Client::login(ej.c2s, &user, "tablet").await;
    tablet
        .presence(
            Some("away"),
            Some("on the train"),
            3,
            Some("https://dino.im"),
        )
        .await;
    let mut pc = Client::login(ej.c2s, &user, "pc").await;
    pc.presence(Some("dnd"), Some("deep work"), 3, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = Utc::now();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The bridge comes back: the probe answers (with delay stamps) restore both resources
    // with the time they really changed, not the time the bridge heard about them.
    let bridge = TestApp::xmpp_on(engine.clone(), xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let p = bridge
        .wait_user(&user, "both resources back", |p| p.resources.len() == 2)
        .await;
    for r in &p.resources {
        assert!(
            t0 <= r.since && r.since <= t1,
            "{}: since {} not within [{t0}, {t1}] (delay stamp)",
            r.resource,
            r.since
        );
    }
    let min_since = p.resources.iter().map(|r| r.since).min();
    assert_eq!(p.online_since, min_since);
    // Equal priority: away beats dnd on availability.
    assert_eq!(
        (p.show, p.status.as_deref(), p.priority),
        (Show::Away, Some("on the train"), 3)
    );
    let tab = p.resources.iter().find(|r| r.resource == "tablet").unwrap();
    assert_eq!(tab.client.as_deref(), Some("Dino"));
    let st = bridge.component().status();
    assert!(
        bridge.component().metrics().probes_sent.get() >= 1,
        "{st:?}"
    );

    // After the grace period nothing is expired: both resources answered.
    bridge.wait_status("resync over", |s| !s.resyncing).await;
    assert_eq!(bridge.engine().get(&p.jid).unwrap().resources.len(), 2);
    assert_eq!(
        bridge.engine().barrier().await.unwrap(),
        seq_before + 2,
        "one change per resource found"
    );
    tablet.unavailable(None).await;
    pc.abort();
    bridge.wait_user(&user, "offline", |p| !p.online).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_presence_is_skipped_and_the_connection_survives() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = ej.user("bad", &lease.domain);
    let bridge = TestApp::xmpp(xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let mut c = Client::login(ej.c2s, &user, "r").await;
    c.presence(Some("chat"), Some("fine"), 1, None).await;
    bridge.wait_user(&user, "online", |p| p.online).await;
    // Whatever the server makes of these, the bridge must neither crash nor drop the stream.
    c.send("<presence><show>sleeping</show><status>bad show</status></presence>")
        .await;
    c.send("<presence><priority>300</priority><status>bad priority</status></presence>")
        .await;
    c.oversized_presence().await;
    c.presence(Some("away"), Some("after garbage"), 1, None)
        .await;
    let p = bridge
        .wait_user(&user, "valid presence after garbage", |p| {
            p.status.as_deref() == Some("after garbage")
        })
        .await;
    assert_eq!(p.show, Show::Away);
    let st = bridge.component().status();
    assert_eq!((st.connected, st.reconnects), (true, 0), "{st:?}");
    let k = bridge.component().metrics();
    let skipped = k.parse_errors.get() + k.dropped_oversized.get();
    eprintln!(
        "parse_errors={} oversized={}",
        k.parse_errors.get(),
        k.dropped_oversized.get()
    );
    assert!(
        skipped >= 1,
        "the oversized status at least must be counted"
    );
    c.unavailable(None).await;
    bridge.wait_user(&user, "offline", |p| !p.online).await;
}

/// A private server: first frozen (SIGSTOP: the TCP peer is alive but silent — only the
/// keepalive can notice), then crashed and restarted. The bridge reconnects each time, keeps
/// its state (stale) while disconnected, and after the resync only the users who really came
/// back are online: no ghosts, no offline storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_freeze_and_restart_reconnect_resync_no_ghosts() {
    init_logs();
    let ej = Ejabberd::private("restart", false);
    let alice = ej.user("alice", "bridge.localhost");
    let bob = ej.user("bob", "bridge.localhost");
    let mut cfg = xmpp_cfg_private(&ej);
    cfg.keepalive_secs = Duration::from_secs(1);
    cfg.keepalive_timeout_secs = Duration::from_secs(1);
    let bridge = TestApp::xmpp(cfg).await;
    bridge.connected().await;

    let mut a1 = Client::login(ej.c2s, &alice, "phone").await;
    a1.presence(Some("away"), Some("a-phone"), 1, None).await;
    let mut a2 = Client::login(ej.c2s, &alice, "laptop").await;
    a2.presence(None, Some("a-laptop"), 2, None).await;
    let mut b1 = Client::login(ej.c2s, &bob, "pc").await;
    b1.presence(Some("chat"), Some("b-pc"), 0, None).await;
    bridge
        .wait_user(&alice, "two resources", |p| p.resources.len() == 2)
        .await;
    bridge.wait_user(&bob, "online", |p| p.online).await;
    // Idle for a few keepalive periods: pings keep the stream up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let k = bridge.component().metrics();
    assert!(k.keepalives_sent.get() >= 1);
    assert_eq!(
        bridge.component().status().reconnects,
        0,
        "keepalives keep an idle stream alive"
    );
    let seq0 = bridge.engine().barrier().await.unwrap();

    // 1. Freeze the server: the connection is dead but no FIN ever comes.
    let pid = ej.pid();
    let sig = |s: &str| {
        let ok = std::process::Command::new("kill")
            .args([s, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {s} {pid}");
    };
    sig("-STOP");
    bridge
        .wait_status("dead peer noticed", |s| !s.connected && s.stale)
        .await;
    assert!(
        bridge
            .engine()
            .get(&presence_bridge::presence::UserJid::parse(&format!("{alice}@localhost")).unwrap())
            .unwrap()
            .online,
        "state kept while stale"
    );
    sig("-CONT");
    bridge
        .wait_status("reconnected", |s| s.connected && s.reconnects == 1)
        .await;
    bridge.wait_status("resync over", |s| !s.resyncing).await;
    // Everyone answered the probes with what the bridge already had: not a single change.
    assert_eq!(
        bridge.engine().barrier().await.unwrap(),
        seq0,
        "resync after a freeze changes nothing"
    );

    // 2. Crash the server: all clients are gone with it.
    ej.kill();
    bridge
        .wait_status("disconnected", |s| !s.connected && s.stale)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        bridge.engine().barrier().await.unwrap(),
        seq0,
        "no offline storm while disconnected"
    );
    assert_eq!(bridge.engine().stats().online_users, 2);
    drop((a1, a2, b1));
    let lost_at = Utc::now();

    ej.start();
    bridge
        .wait_status("reconnected after restart", |s| {
            s.connected && s.reconnects == 2
        })
        .await;
    // Bob comes back; alice does not.
    let mut b2 = Client::login(ej.c2s, &bob, "pc").await;
    b2.presence(Some("dnd"), Some("b-back"), 0, None).await;
    bridge.wait_status("resync over", |s| !s.resyncing).await;
    let a = bridge
        .wait_user(&alice, "offline after grace", |p| !p.online)
        .await;
    assert!(a.resources.is_empty());
    let seen = a.last_seen.unwrap();
    assert!(
        seen <= lost_at,
        "last_seen {seen} is when the bridge lost sight of her (<= {lost_at})"
    );
    let b = bridge
        .wait_user(&bob, "back online", |p| {
            p.status.as_deref() == Some("b-back")
        })
        .await;
    assert_eq!((b.online, b.show, b.resources.len()), (true, Show::Dnd, 1));
    let st = bridge.engine().stats();
    assert_eq!((st.online_users, st.online_resources), (1, 1));
    b2.unavailable(None).await;
    bridge.wait_user(&bob, "offline", |p| !p.online).await;
}

/// XEP-0356 on ejabberd: the advertisement is parsed and recorded; with the roster route on
/// as well every presence arrives twice, and the duplicate produces no change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privilege_advertisement_and_duplicate_routes() {
    init_logs();
    let ej = Ejabberd::private("priv", true);
    let user = ej.user("dup", "bridge.localhost");
    let bridge = TestApp::xmpp(xmpp_cfg_private(&ej)).await;
    bridge.connected().await;
    bridge
        .wait_status("privileges", |s| !s.privileges.is_empty())
        .await;
    let privs = bridge.component().status().privileges;
    assert!(
        privs.contains(&("presence".into(), "managed_entity".into())),
        "{privs:?}"
    );
    assert!(
        privs.contains(&("roster".into(), "both".into())),
        "{privs:?}"
    );

    let k = bridge.component().metrics().clone();
    let presences = || k.presence_in.get();
    let mut c = Client::login(ej.c2s, &user, "r1").await;
    c.presence(Some("chat"), Some("one"), 0, None).await;
    bridge.wait_user(&user, "online", |p| p.online).await;
    c.presence(Some("away"), Some("two"), 0, None).await;
    bridge
        .wait_user(&user, "away", |p| p.status.as_deref() == Some("two"))
        .await;
    // Both copies of the second presence must have arrived before we count.
    let deadline = std::time::Instant::now() + PATIENCE;
    while presences() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        presences() >= 4,
        "each presence arrives by both routes: {}",
        presences()
    );
    assert_eq!(
        bridge.engine().barrier().await.unwrap(),
        2,
        "two presences, two changes, duplicates none"
    );
    c.unavailable(None).await;
    bridge.wait_user(&user, "offline", |p| !p.online).await;
    assert_eq!(bridge.engine().barrier().await.unwrap(), 3);
}

/// The other way in: no server-side provisioning, the user subscribes to the component. The
/// bridge approves, subscribes back; once the user approves, their presence flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_subscribing_to_the_component_gets_approved_and_tracked() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let user = unique_user("sub");
    ej.register(&user);
    let bridge = TestApp::xmpp(xmpp_cfg(&ej, &lease)).await;
    bridge.connected().await;
    let mut c = Client::login(ej.c2s, &user, "web").await;
    let domain = lease.domain.clone();
    // A real client is available before it manages subscriptions (the server holds presence
    // stanzas for resources that are not).
    c.presence(None, None, 0, None).await;
    c.send(&format!("<presence type='subscribe' to='{domain}'/>"))
        .await;
    // The bridge answers `subscribed` and asks back with `subscribe`.
    let got = c.expect(&["subscribed", "type='subscribe'"]).await;
    assert!(got.contains(&domain), "{got}");
    c.send(&format!("<presence type='subscribed' to='{domain}'/>"))
        .await;
    c.presence(
        Some("chat"),
        Some("hello bridge"),
        2,
        Some("https://conversejs.org"),
    )
    .await;
    let p = bridge
        .wait_user(&user, "tracked after subscribing", |p| {
            p.status.as_deref() == Some("hello bridge")
        })
        .await;
    assert_eq!(
        (p.show, p.priority, p.resources[0].client.as_deref()),
        (Show::Chat, 2, Some("Converse.js"))
    );
    // The roster item now exists server-side, both ways.
    let roster = ej.api(
        "get_roster",
        serde_json::json!({"user": user, "host": "localhost"}),
    );
    let item = roster
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["jid"] == domain.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(item["subscription"], "both", "{roster}");
    c.unavailable(None).await;
    bridge.wait_user(&user, "offline", |p| !p.online).await;
}
