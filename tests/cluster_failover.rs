//! Three `presence-bridge run` processes on one machine (contract §11), with a real ejabberd,
//! a real Postgres and a private NATS: the leader is killed (SIGKILL) or paused past its lease
//! (SIGSTOP, then SIGCONT) while real clients keep changing presence.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::Value;

/// One replica process; killed on drop.
struct Bridge {
    node: String,
    port: u16,
    child: Child,
    _spool: tempfile::TempDir,
}

impl Bridge {
    fn start(
        node: &str,
        xmpp: &presence_bridge::config::XmppConfig,
        pg: &Pg,
        nats: &Nats,
    ) -> Bridge {
        let spool = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!(
            "presence-bridge-test/cluster-{node}-{}.log",
            std::process::id()
        )))
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
            .current_dir(std::env::temp_dir())
            .arg("run")
            .env("PRESENCE_BRIDGE__XMPP__SERVER", &xmpp.server)
            .env("PRESENCE_BRIDGE__XMPP__COMPONENT", &xmpp.component)
            .env("PRESENCE_BRIDGE__XMPP__PASSWORD", SECRET)
            .env("PRESENCE_BRIDGE__XMPP__DOMAINS", "[localhost]")
            .env("PRESENCE_BRIDGE__XMPP__RECONNECT_MIN_SECS", "0.2")
            .env("PRESENCE_BRIDGE__XMPP__RECONNECT_MAX_SECS", "1")
            .env("PRESENCE_BRIDGE__XMPP__RESYNC_GRACE_SECS", "2")
            .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
            .env("PRESENCE_BRIDGE__STORE__SPOOL_DIR", spool.path())
            .env("PRESENCE_BRIDGE__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", API_SECRET)
            .env("PRESENCE_BRIDGE__CLUSTER__NATS_URL", nats.url())
            .env("PRESENCE_BRIDGE__CLUSTER__NODE_ID", node)
            .env("PRESENCE_BRIDGE__CLUSTER__FAILOVER_SECS", "3")
            .env("PRESENCE_BRIDGE__CLUSTER__SNAPSHOT_SECS", "2")
            .env("PRESENCE_BRIDGE__LOG__LEVEL", "presence_bridge=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Bridge {
            node: node.into(),
            port,
            child,
            _spool: spool,
        }
    }

    fn readyz(&self) -> Option<Value> {
        try_request(self.port, "GET", "/readyz", &[], None)
            .ok()
            .map(|r| r.json())
    }

    fn role(&self) -> Option<String> {
        self.readyz()
            .and_then(|r| r["role"].as_str().map(str::to_owned))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.node);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until exactly one of `bridges` (by index) says it leads with a connected component.
async fn leader(bridges: &[&Bridge]) -> usize {
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let leaders: Vec<usize> = (0..bridges.len())
            .filter(|&i| {
                bridges[i]
                    .readyz()
                    .is_some_and(|r| r["role"] == "leader" && r["xmpp"] == "connected")
            })
            .collect();
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "no single connected leader: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket subscriber that records every change it sees (after its snapshot).
struct Recorder {
    changes: Arc<Mutex<Vec<Value>>>,
    epoch: String,
    _task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(port: u16) -> Recorder {
        let t = token("presence:read", None);
        let mut ws = ws_connect(port, &format!("token={t}"), None).await.unwrap();
        let snap = next_frame(&mut ws).await;
        assert_eq!(snap["type"], "snapshot");
        let changes = Arc::new(Mutex::new(Vec::new()));
        let sink = changes.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                    let f: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(
                        f["type"], "diff",
                        "a follower's subscriber must not resync: {f}"
                    );
                    sink.lock()
                        .unwrap()
                        .extend(f["changes"].as_array().unwrap().iter().cloned());
                }
            }
        });
        Recorder {
            changes,
            epoch: snap["epoch"].as_str().unwrap().to_owned(),
            _task: task,
        }
    }

    fn seqs(&self) -> Vec<u64> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect()
    }

    /// The last state per user seen in the changes.
    fn last_status(&self) -> HashMap<String, Option<String>> {
        let mut out = HashMap::new();
        for c in self.changes.lock().unwrap().iter() {
            out.insert(
                c["jid"].as_str().unwrap().to_owned(),
                c["presence"]["status"].as_str().map(str::to_owned),
            );
        }
        out
    }
}

fn assert_gap_free(what: &str, seqs: &[u64]) {
    assert!(!seqs.is_empty(), "{what}: no changes");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: one gap-free sequence: {seqs:?}");
    }
}

/// Changes every client's presence `rounds` times (status `r{round}`), then once more to
/// its final status `final`.
async fn churn(clients: &mut [Client], from: usize, rounds: usize) {
    for r in from..from + rounds {
        for c in clients.iter_mut() {
            let show = ["chat", "away", "dnd", "xa"][r % 4];
            c.presence(Some(show), Some(&format!("r{r}")), 1, None)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// The shared ejabberd with a leased component domain, a fresh database, a private NATS and
/// three replica processes a, b, c.
struct Three {
    ej: Ejabberd,
    lease: ComponentLease,
    pg: Pg,
    nats: Nats,
    bridges: Vec<Bridge>,
}

impl Three {
    fn start(tag: &str) -> Three {
        init_logs();
        let ej = Ejabberd::shared();
        let lease = lease_component();
        let pg = Pg::shared(tag);
        let nats = Nats::private();
        let xmpp = xmpp_cfg(&ej, &lease);
        let bridges = ["a", "b", "c"]
            .iter()
            .map(|n| Bridge::start(n, &xmpp, &pg, &nats))
            .collect();
        Three {
            ej,
            lease,
            pg,
            nats,
            bridges,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_stream_loses_nothing_and_breaks_no_sequence() {
    // Every part bound: an unbound one would be dropped (stopped) here.
    let Three {
        ej,
        lease,
        pg,
        nats: _nats,
        bridges,
    } = Three::start("clusterkill");
    let refs: Vec<&Bridge> = bridges.iter().collect();
    let l = leader(&refs).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &f in &followers {
        eventually("a follower is ready", || {
            bridges[f].readyz().is_some_and(|r| r["role"] == "follower")
        })
        .await;
    }
    let recorders = [
        Recorder::start(bridges[followers[0]].port).await,
        Recorder::start(bridges[followers[1]].port).await,
    ];
    assert_eq!(recorders[0].epoch, recorders[1].epoch);
    // And one on the leader: all three see the same epoch and the same changes.
    let on_leader = Recorder::start(bridges[l].port).await;
    assert_eq!(on_leader.epoch, recorders[0].epoch);

    let users: Vec<String> = (0..5).map(|_| ej.user("clk", &lease.domain)).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(Client::login(ej.c2s, u, "desk").await);
    }
    churn(&mut clients, 0, 10).await;
    // Everything the leader showed so far reached the followers' subscribers, identically.
    let before_kill = on_leader.changes.lock().unwrap().clone();
    assert!(!before_kill.is_empty());
    eventually(
        "the followers' subscribers saw what the leader's did",
        || {
            recorders
                .iter()
                .all(|r| r.changes.lock().unwrap().len() >= before_kill.len())
        },
    )
    .await;
    for r in &recorders {
        assert_eq!(
            r.changes.lock().unwrap()[..before_kill.len()],
            before_kill[..],
            "identical epoch/seq and changes on all three replicas"
        );
    }
    let killed_at = Instant::now();
    bridges[l].signal("-KILL");
    churn(&mut clients, 10, 10).await;
    let rest: Vec<&Bridge> = followers.iter().map(|&i| &bridges[i]).collect();
    leader(&rest).await;
    let took = killed_at.elapsed();
    eprintln!("failover: a new connected leader {took:?} after SIGKILL");
    churn(&mut clients, 20, 5).await;
    for (i, c) in clients.iter_mut().enumerate() {
        c.presence(Some("chat"), Some(&format!("final{i}")), 1, None)
            .await;
    }

    // The final states agree with what the clients last said, on both replicas.
    for (i, u) in users.iter().enumerate() {
        let want = format!("final{i}");
        for b in &rest {
            let t = token("presence:read", None);
            let path = format!("/api/v1/presence/{u}@localhost");
            let deadline = Instant::now() + PATIENCE;
            loop {
                let (code, body, _) = http::api(b.port, "GET", &path, Some(&t), None);
                if code == 200 && body["status"] == want.as_str() && body["online"] == true {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} on {}: {code} {body}",
                    u,
                    b.node
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Subscribers on both survivors saw one gap-free sequence with the same changes.
    eventually("both subscribers saw the same changes", || {
        recorders[0].seqs() == recorders[1].seqs()
    })
    .await;
    assert_gap_free("the follower's subscriber", &recorders[0].seqs());
    let c0 = recorders[0].changes.lock().unwrap().clone();
    let c1 = recorders[1].changes.lock().unwrap().clone();
    assert_eq!(c0, c1, "identical changes on both replicas");
    let last = recorders[0].last_status();
    for (i, u) in users.iter().enumerate() {
        assert_eq!(
            last.get(&format!("{u}@localhost")).cloned().flatten(),
            Some(format!("final{i}")),
            "the subscriber's view of {u}"
        );
    }

    // Postgres: every event once. Each change of these users is one event (one resource
    // each); the writer of whichever replica led wrote it, the new leader rewrote what the
    // dead one may not have (idempotently).
    let jids = users
        .iter()
        .map(|u| format!("'{u}@localhost'"))
        .collect::<Vec<_>>()
        .join(",");
    let per_user: BTreeMap<String, usize> = {
        let mut m = BTreeMap::new();
        for c in &c0 {
            let j = c["jid"].as_str().unwrap();
            if users.iter().any(|u| format!("{u}@localhost") == j) {
                *m.entry(j.to_owned()).or_default() += 1;
            }
        }
        m
    };
    let expected: usize = per_user.values().sum();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n: usize = pg
            .query(&format!(
                "SELECT count(*) FROM presence_events WHERE jid IN ({jids})"
            ))
            .parse()
            .unwrap();
        if n == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence_events has {n} rows for the users, the subscribers saw {expected} changes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pg.query(&format!(
            "SELECT count(DISTINCT event_id) FROM presence_events WHERE jid IN ({jids})"
        )),
        expected.to_string(),
        "no event twice"
    );
    for c in clients {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_never_publishes_again() {
    let Three {
        ej,
        lease,
        pg: _pg,
        nats,
        bridges,
    } = Three::start("clusterstop");
    let refs: Vec<&Bridge> = bridges.iter().collect();
    let l = leader(&refs).await;
    let old = &bridges[l];
    let users: Vec<String> = (0..3).map(|_| ej.user("cst", &lease.domain)).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(Client::login(ej.c2s, u, "desk").await);
    }
    churn(&mut clients, 0, 3).await;

    old.signal("-STOP");
    let rest: Vec<&Bridge> = bridges.iter().filter(|b| b.node != old.node).collect();
    let nl = leader(&rest).await;
    let new_node = rest[nl].node.clone();
    // Presence while the old leader sleeps: ejabberd hands some stanzas to its (still open)
    // connection; it reads them when it wakes.
    churn(&mut clients, 3, 5).await;
    old.signal("-CONT");
    eventually("the old leader follows", || {
        old.role().as_deref() == Some("follower")
    })
    .await;
    churn(&mut clients, 8, 3).await;
    eventually("the old leader's /readyz names the new leader", || {
        old.readyz()
            .is_some_and(|r| r["leader"].as_str() == Some(new_node.as_str()))
    })
    .await;

    // The stream: after the new leader's term, only the new leader wrote.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("PRESENCE").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut writers = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        writers.push((
            v["type"].as_str().unwrap().to_owned(),
            v["node"].as_str().unwrap().to_owned(),
        ));
    }
    let term = writers
        .iter()
        .rposition(|(t, n)| t == "term" && *n == new_node)
        .expect("the new leader's term");
    assert!(
        writers[term + 1..].iter().all(|(_, n)| *n == new_node),
        "after the new term only {new_node} writes: {writers:?}"
    );
    assert!(
        writers[..term].iter().all(|(_, n)| *n == old.node),
        "before it only {} wrote: {writers:?}",
        old.node
    );
    let m = metrics_text(old.port);
    assert_eq!(
        metric(&m, "presence_bridge_cluster_step_downs_total"),
        1,
        "{m}"
    );
    assert_eq!(metric(&m, "presence_bridge_cluster_leader"), 0);
    for c in clients {
        c.close().await;
    }
}
