//! Several replicas on NATS JetStream (contract §11): each test its own nats-server (free port,
//! temporary store), replicas started through the production builder in this process, or as
//! `presence-bridge run` processes where a test kills, pauses or resumes one.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::config::{ClusterConfig, Config, DbUrl, PresenceConfig};
use presence_bridge::presence::{Role, Show};
use serde_json::Value;

fn cluster_cfg(nats: &Nats, node: &str) -> Config {
    Config {
        cluster: Some(ClusterConfig {
            nats_url: DbUrl::new(nats.url()),
            stream: "PRESENCE".into(),
            node_id: node.into(),
            failover_secs: Duration::from_secs(2),
            snapshot_secs: Duration::from_secs(1),
            ..ClusterConfig::default()
        }),
        presence: PresenceConfig {
            ring_size: 4096,
            queue_size: 4096,
        },
        ..test_config()
    }
}

async fn replica(nats: &Nats, node: &str) -> TestApp {
    TestApp::start(cluster_cfg(nats, node), Ingest::None).await
}

fn role(app: &TestApp) -> Option<Role> {
    app.state().cluster.as_ref().map(|c| c.status().role)
}

/// Waits until exactly one of `apps` leads; its index.
async fn leader_of(apps: &[&TestApp]) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let leaders: Vec<usize> = (0..apps.len())
            .filter(|&i| role(apps[i]) == Some(Role::Leader))
            .collect();
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn change(app: &TestApp, i: u64, user: &str) {
    app.engine()
        .apply(event(
            u128::from(i) + (7 << 100),
            user,
            "r",
            Utc::now(),
            available(Show::Chat, &format!("s{i}"), 0, None),
        ))
        .await
        .expect("engine open");
}

/// Reads diff frames until the change with seq `last`; returns every change seen (checking
/// the epoch of each frame that carries one).
async fn changes_until(ws: &mut Ws, pending: &mut VecDeque<Value>, last: u64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        while let Some(c) = pending.pop_front() {
            let seq = c["seq"].as_u64().expect("seq");
            out.push(c);
            if seq >= last {
                return out;
            }
        }
        let f = next_frame(ws).await;
        assert_eq!(f["type"], "diff", "{f}");
        pending.extend(f["changes"].as_array().expect("changes").iter().cloned());
    }
}

fn seqs(changes: &[Value]) -> Vec<u64> {
    changes
        .iter()
        .map(|c| c["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_serve_one_sequence_and_a_follower_takes_over() {
    init_logs();
    let nats = Nats::private();
    let a = replica(&nats, "a").await;
    let b = replica(&nats, "b").await;
    let c = replica(&nats, "c").await;
    let apps = [&a, &b, &c];
    let l = leader_of(&apps).await;
    let leader = apps[l];
    let followers: Vec<&TestApp> = (0..3).filter(|&i| i != l).map(|i| apps[i]).collect();
    let t = token("presence:read", None);

    // /readyz: role, leader, node; followers are ready.
    let (code, r, _) = followers[0].get("/readyz", None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["role"], "follower", "{r}");
    assert_eq!(r["xmpp"], "replica", "{r}");
    let (_, lr, _) = leader.get("/readyz", None);
    assert_eq!(lr["role"], "leader", "{lr}");
    eventually("followers know the leader", || {
        followers
            .iter()
            .all(|f| f.get("/readyz", None).1["leader"] == lr["node"])
    })
    .await;

    // Every replica shows the cluster's epoch.
    let epochs: Vec<String> = apps
        .iter()
        .map(|a| a.engine().epoch().to_string())
        .collect();
    assert!(epochs.iter().all(|e| *e == epochs[0]), "{epochs:?}");

    let mut ws = Vec::new();
    for app in apps {
        let mut w = app.ws(&format!("token={t}"), None).await;
        let snap = next_frame(&mut w).await;
        assert_eq!(snap["type"], "snapshot");
        assert_eq!(snap["epoch"].as_str(), Some(epochs[0].as_str()));
        ws.push((w, VecDeque::new()));
    }
    let base = leader.engine().seq();
    for i in 0..200 {
        change(leader, i, &format!("u{}@x.test", i % 17)).await;
    }
    let last = leader.engine().barrier().await.unwrap();
    assert_eq!(last, base + 200);
    let mut seen = Vec::new();
    for (w, p) in &mut ws {
        let got = changes_until(w, p, last).await;
        assert_eq!(seqs(&got), (base + 1..=last).collect::<Vec<_>>());
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "identical changes on every replica");
    assert_eq!(seen[0], seen[2], "identical changes on every replica");
    for f in &followers {
        eventually("a follower applied everything", || f.engine().seq() == last).await;
        let jid = presence_bridge::presence::UserJid::parse("u3@x.test").unwrap();
        assert_eq!(f.engine().get(&jid), leader.engine().get(&jid));
    }
    // Metrics: the leader published, the followers applied, every replica says its role.
    let lm = metrics_text(leader.port);
    assert_eq!(metric(&lm, "presence_bridge_cluster_leader"), 1, "{lm}");
    assert!(metric(&lm, "presence_bridge_cluster_published_changes_total") >= 200);
    assert_eq!(metric(&lm, "presence_bridge_cluster_takeovers_total"), 1);
    for f in &followers {
        let fm = metrics_text(f.port);
        assert_eq!(metric(&fm, "presence_bridge_cluster_leader"), 0, "{fm}");
        assert!(metric(&fm, "presence_bridge_cluster_applied_changes_total") >= 200);
        for name in [
            "presence_bridge_cluster_stream_lag",
            "presence_bridge_cluster_step_downs_total",
            "presence_bridge_cluster_snapshots_total",
        ] {
            assert!(fm.contains(name), "{name} exported: {fm}");
        }
    }
    // Followers refuse what only the leader does.
    let admin = token("admin", None);
    let (code, body, _) = http::api(
        followers[0].port,
        "DELETE",
        "/api/v1/users/u3@x.test",
        Some(&admin),
        None,
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (503, Some("not_leader")),
        "{body}"
    );

    // The leader stops (SIGTERM's path): its lease is released, a follower takes over and
    // continues the same epoch and seq.
    let mut apps_left = Vec::new();
    let mut ws_left = Vec::new();
    let mut ws_iter = ws.into_iter();
    let mut leader_app = None;
    for (i, app) in [a, b, c].into_iter().enumerate() {
        let w = ws_iter.next().unwrap();
        if i == l {
            leader_app = Some(app);
        } else {
            apps_left.push(app);
            ws_left.push(w);
        }
    }
    leader_app.unwrap().stop().await;
    let refs: Vec<&TestApp> = apps_left.iter().collect();
    let nl = leader_of(&refs).await;
    let new_leader = refs[nl];
    assert_eq!(new_leader.engine().epoch().to_string(), epochs[0]);
    assert_eq!(
        new_leader.engine().seq(),
        last,
        "continues after the last change"
    );
    for i in 200..260 {
        change(new_leader, i, &format!("u{}@x.test", i % 17)).await;
    }
    let last2 = new_leader.engine().barrier().await.unwrap();
    assert_eq!(last2, last + 60);
    for (w, p) in &mut ws_left {
        let got = changes_until(w, p, last2).await;
        assert_eq!(
            seqs(&got),
            (last + 1..=last2).collect::<Vec<_>>(),
            "one unbroken sequence across the takeover"
        );
    }

    // A subscriber resumes on the other replica with since + epoch.
    let other = refs[1 - nl];
    eventually("the follower caught up", || other.engine().seq() == last2).await;
    let mut w = other
        .ws(
            &format!("token={t}&since={}&epoch={}", last + 10, epochs[0]),
            None,
        )
        .await;
    let mut p = VecDeque::new();
    let got = changes_until(&mut w, &mut p, last2).await;
    assert_eq!(seqs(&got), (last + 11..=last2).collect::<Vec<_>>());

    // Erasure on the leader reaches the follower.
    let (code, body, _) = http::api(
        new_leader.port,
        "DELETE",
        "/api/v1/users/u3@x.test",
        Some(&admin),
        None,
    );
    assert_eq!(code, 204, "{body}");
    let jid = presence_bridge::presence::UserJid::parse("u3@x.test").unwrap();
    eventually("the erasure reached the follower", || {
        other.engine().get(&jid).is_none()
    })
    .await;
    for app in apps_left {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_late_catches_up_from_the_snapshot_and_the_tail() {
    init_logs();
    let nats = Nats::private();
    let a = replica(&nats, "a").await;
    leader_of(&[&a]).await;
    for i in 0..300 {
        change(&a, i, &format!("v{}@x.test", i % 50)).await;
    }
    let mid = a.engine().barrier().await.unwrap();
    // A snapshot is stored every second (snapshot_secs = 1).
    eventually("a snapshot was stored", || {
        metric(
            &metrics_text(a.port),
            "presence_bridge_cluster_snapshots_total",
        ) > 0
    })
    .await;
    for i in 300..340 {
        change(&a, i, &format!("v{}@x.test", i % 50)).await;
    }
    let last = a.engine().barrier().await.unwrap();
    assert!(last > mid);
    let b = replica(&nats, "b").await;
    eventually("the late replica caught up", || b.engine().seq() == last).await;
    let sa = a.engine().snapshot().await.unwrap();
    let sb = b.engine().snapshot().await.unwrap();
    assert_eq!(sa.seq, sb.seq);
    assert_eq!(
        sa.iter().cloned().collect::<Vec<_>>(),
        sb.iter().cloned().collect::<Vec<_>>()
    );
    assert_eq!(a.engine().stats(), b.engine().stats());
    b.stop().await;
    a.stop().await;
}

/// The stream fences a leader that lost its lease without knowing (its renewal not due yet):
/// the change it sequences after the new leader's term is refused, never shown, and it
/// follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_fences_a_leader_whose_lease_was_taken() {
    init_logs();
    let nats = Nats::private();
    let slow = |node: &str| {
        let mut cfg = cluster_cfg(&nats, node);
        if let Some(c) = &mut cfg.cluster {
            // Renewed every 20 s: the old leader will not notice by itself during the test.
            c.failover_secs = Duration::from_secs(60);
            c.snapshot_secs = Duration::from_secs(60);
            c.max_age_hours = 1;
        }
        cfg
    };
    let a = TestApp::start(slow("a"), Ingest::None).await;
    leader_of(&[&a]).await;
    let b = TestApp::start(slow("b"), Ingest::None).await;
    for i in 0..5 {
        change(&a, i, "f@x.test").await;
    }
    let before = a.engine().barrier().await.unwrap();
    eventually("b follows", || b.engine().seq() == before).await;

    // The lease disappears (as if it had lapsed while `a` was cut off): `b` takes it.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value("PRESENCE_lease").await.unwrap();
    kv.purge("leader").await.unwrap();
    eventually("b leads", || role(&b) == Some(Role::Leader)).await;
    assert_eq!(role(&a), Some(Role::Leader), "a has not noticed yet");

    // `a` sequences one more change: the stream refuses it.
    change(&a, 99, "f@x.test").await;
    eventually("a was fenced and follows", || {
        role(&a) == Some(Role::Follower)
    })
    .await;
    assert_eq!(
        a.engine().seq(),
        before,
        "the refused change never became visible"
    );
    let jid = presence_bridge::presence::UserJid::parse("f@x.test").unwrap();
    assert_eq!(
        a.engine()
            .get(&jid)
            .and_then(|p| p.status.clone())
            .as_deref(),
        Some("s4")
    );
    assert_eq!(
        metric(
            &metrics_text(a.port),
            "presence_bridge_cluster_step_downs_total"
        ),
        1
    );
    // The new leader's changes reach the old one, which now follows.
    change(&b, 100, "f@x.test").await;
    let last = b.engine().barrier().await.unwrap();
    assert_eq!(
        last,
        before + 1,
        "b continues after the last change in the stream"
    );
    eventually("a applies b's change", || a.engine().seq() == last).await;
    assert_eq!(
        a.engine()
            .get(&jid)
            .and_then(|p| p.status.clone())
            .as_deref(),
        Some("s100")
    );
    b.stop().await;
    a.stop().await;
}

/// NATS restarts while the leader publishes: replicas reconnect, every change arrives once,
/// in order, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_stream_loses_nothing_and_repeats_no_seq() {
    init_logs();
    let nats = Nats::private();
    let mk = |node: &str| {
        let mut cfg = cluster_cfg(&nats, node);
        if let Some(c) = &mut cfg.cluster {
            // Long enough to outlive the restart: the leader stays the leader.
            c.failover_secs = Duration::from_secs(20);
        }
        cfg
    };
    let a = TestApp::start(mk("a"), Ingest::None).await;
    leader_of(&[&a]).await;
    let b = TestApp::start(mk("b"), Ingest::None).await;
    let t = token("presence:read", None);
    let mut ws = b.ws(&format!("token={t}"), None).await;
    assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
    let feeder = {
        let engine = a.engine().clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                engine
                    .apply(event(
                        u128::from(i) + (9 << 100),
                        &format!("n{}@x.test", i % 23),
                        "r",
                        Utc::now(),
                        available(Show::Away, &format!("s{i}"), 0, None),
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.start();
    feeder.await.unwrap();
    let last = tokio::time::timeout(PATIENCE, a.engine().barrier())
        .await
        .expect("the leader's changes were confirmed after the restart")
        .unwrap();
    assert_eq!(role(&a), Some(Role::Leader), "still the leader");
    eventually("the follower caught up", || b.engine().seq() == last).await;
    let mut p = VecDeque::new();
    let got = changes_until(&mut ws, &mut p, last).await;
    assert_eq!(
        seqs(&got),
        (1..=last).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    assert_eq!(a.engine().stats(), b.engine().stats());

    // The stream itself holds every seq exactly once.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("PRESENCE").await.unwrap();
    let n = stream.get_info().await.unwrap().state.last_sequence;
    let mut all = Vec::new();
    for s in 1..=n {
        let m = stream.get_raw_message(s).await.unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["type"] == "changes" {
            all.extend(
                v["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["seq"].as_u64().unwrap()),
            );
        }
    }
    assert_eq!(
        all,
        (1..=last).collect::<Vec<_>>(),
        "no seq twice in the stream"
    );
    b.stop().await;
    a.stop().await;
}

/// The lease's TTL and the stream's retention follow the config of the replica that starts
/// (an existing bucket is updated, not kept as it was made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_failover_secs_changes_the_lease_ttl() {
    init_logs();
    let nats = Nats::private();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for (secs, hours) in [(2u64, 1u32), (6, 2)] {
        let mut cfg = cluster_cfg(&nats, "a");
        let c = cfg.cluster.as_mut().unwrap();
        c.failover_secs = Duration::from_secs(secs);
        c.max_age_hours = hours;
        let want = presence_bridge::cluster::lease_ttl(c);
        let app = TestApp::start(cfg, Ingest::None).await;
        let lease = js.get_stream("KV_PRESENCE_lease").await.unwrap();
        assert_eq!(lease.get_info().await.unwrap().config.max_age, want);
        let changes = js.get_stream("PRESENCE").await.unwrap();
        assert_eq!(
            changes.get_info().await.unwrap().config.max_age,
            Duration::from_secs(u64::from(hours) * 3600)
        );
        app.stop().await;
    }
}

/// No NATS at `cluster.nats_url`: the service does not start, and says which key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_a_clear_start_error() {
    init_logs();
    let port = free_port();
    let mut cfg = test_config();
    cfg.cluster = Some(ClusterConfig {
        nats_url: DbUrl::new(format!("nats://127.0.0.1:{port}")),
        ..ClusterConfig::default()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = presence_bridge::app::AppBuilder::new(cfg)
        .ingest(Ingest::None)
        .listener(listener)
        .start()
        .await
        .expect_err("no NATS, no replica");
    let text = err.to_string();
    assert!(text.contains("cluster.nats_url"), "{text}");
    assert_eq!(err.exit_code(), 1);
}

/// A stream message no replica wrote: a follower stops following (its `wait` returns the
/// error, naming the message) rather than skip what could be changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stops_at_a_message_it_cannot_read() {
    init_logs();
    let nats = Nats::private();
    let a = replica(&nats, "a").await;
    leader_of(&[&a]).await;
    change(&a, 1, "g@x.test").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut b = presence_bridge::app::AppBuilder::new(cluster_cfg(&nats, "b"))
        .ingest(Ingest::None)
        .listener(listener)
        .start()
        .await
        .unwrap();
    eventually("b follows", || b.engine().seq() == 1).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("presence-bridge.PRESENCE.changes", "not a batch".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let ended = tokio::time::timeout(PATIENCE, b.wait())
        .await
        .expect("the follower stops");
    let text = ended.expect_err("an error, not a clean end").to_string();
    assert!(text.contains("cannot be read"), "{text}");
    assert_eq!(b.engine().seq(), 1, "nothing applied past it");
    let _ = b.shutdown().await;
    a.stop().await;
}
