//! The presence engine: model, rules, sequencer, concurrent map and change hub.

pub mod aggregate;
pub mod analytics;
pub mod engine;
pub mod hub;
pub mod model;
pub mod replica;
pub mod sink;

pub use engine::{
    Engine, EngineClosed, EngineMetrics, EngineOptions, OnlineMap, Snapshot, Stats, new_epoch,
};
pub use hub::{Feed, Hub, Lagged, Resume, Routed, Subscription};
pub use model::{
    Availability, Cause, Change, EventKind, Op, PresenceEvent, ResourcePresence, Show, UserJid,
    UserPresence,
};
pub use replica::{Entry, Gap, Gate, GateRequest, Refused, Role};
pub use sink::{Applied, ChangeSink};

#[cfg(test)]
mod proptests {
    //! Snapshot(S) + changes after S = live state, against a simple reference model.

    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use super::engine::replay;
    use super::*;
    use crate::config::PresenceConfig;

    #[derive(Debug, Clone)]
    enum Step {
        Avail {
            user: u8,
            res: u8,
            show: u8,
            prio: i8,
            status: u8,
        },
        Gone {
            user: u8,
            res: u8,
        },
        AllGone {
            user: u8,
        },
        Snapshot,
        Repeat,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..4, 0u8..3, 0u8..5, -2i8..3, 0u8..3).prop_map(|(user, res, show, prio, status)| Step::Avail { user, res, show, prio, status }),
            3 => (0u8..4, 0u8..3).prop_map(|(user, res)| Step::Gone { user, res }),
            1 => (0u8..4).prop_map(|user| Step::AllGone { user }),
            1 => Just(Step::Snapshot),
            1 => Just(Step::Repeat),
        ]
    }

    const SHOWS: [Show; 5] = [Show::Chat, Show::Available, Show::Away, Show::Xa, Show::Dnd];

    fn user(u: u8) -> UserJid {
        UserJid::parse(&format!("user{u}@d{}.test", u % 2)).unwrap()
    }

    /// (show, prio, status, last-touched counter) of one resource.
    type Res = (Show, i8, String, u64);

    /// Reference: user → resource → state.
    #[derive(Default)]
    struct Model {
        users: BTreeMap<UserJid, BTreeMap<String, Res>>,
        clock: u64,
    }

    impl Model {
        /// Applies and says whether anything changed.
        fn apply(&mut self, s: &Step) -> bool {
            self.clock += 1;
            match *s {
                Step::Avail {
                    user: u,
                    res,
                    show,
                    prio,
                    status,
                } => {
                    let r = self.users.entry(user(u)).or_default();
                    let v = (SHOWS[show as usize], prio, format!("s{status}"));
                    match r.get_mut(&format!("r{res}")) {
                        Some(cur) if (cur.0, cur.1, cur.2.clone()) == v => false,
                        Some(cur) => {
                            *cur = (v.0, v.1, v.2, self.clock);
                            true
                        }
                        None => {
                            r.insert(format!("r{res}"), (v.0, v.1, v.2, self.clock));
                            true
                        }
                    }
                }
                Step::Gone { user: u, res } => self
                    .users
                    .get_mut(&user(u))
                    .is_some_and(|r| r.remove(&format!("r{res}")).is_some()),
                Step::AllGone { user: u } => self.users.get_mut(&user(u)).is_some_and(|r| {
                    let had = !r.is_empty();
                    r.clear();
                    had
                }),
                Step::Snapshot | Step::Repeat => false,
            }
        }

        fn expected(&self) -> HashMap<UserJid, (Show, i8, String, usize)> {
            self.users
                .iter()
                .filter(|(_, r)| !r.is_empty())
                .filter_map(|(j, r)| {
                    let best = r
                        .values()
                        .max_by_key(|(show, prio, _, t)| (*prio, show.availability(), *t))?;
                    Some((j.clone(), (best.0, best.1, best.2.clone(), r.len())))
                })
                .collect()
        }
    }

    fn event(s: &Step, n: u64) -> Option<PresenceEvent> {
        let at = Utc.timestamp_opt(1_700_000_000 + n as i64, 0).single()?;
        let (u, resource, kind) = match *s {
            Step::Avail {
                user,
                res,
                show,
                prio,
                status,
            } => (
                user,
                format!("r{res}"),
                EventKind::Available(Availability {
                    show: SHOWS[show as usize],
                    status: Some(format!("s{status}")),
                    priority: prio,
                    client: None,
                    idle_since: None,
                }),
            ),
            Step::Gone { user, res } => (
                user,
                format!("r{res}"),
                EventKind::Unavailable {
                    status: None,
                    reason: None,
                },
            ),
            Step::AllGone { user } => (
                user,
                String::new(),
                EventKind::AllUnavailable { status: None },
            ),
            _ => return None,
        };
        Some(PresenceEvent {
            id: n as u128,
            jid: user(u),
            resource,
            kind,
            at,
            received_at: at,
            cause: Cause::Stanza,
        })
    }

    fn view(
        state: &HashMap<UserJid, Arc<UserPresence>>,
    ) -> HashMap<UserJid, (Show, i8, String, usize)> {
        state
            .iter()
            .map(|(j, p)| {
                (
                    j.clone(),
                    (
                        p.show,
                        p.priority,
                        p.status.clone().unwrap_or_default(),
                        p.resources.len(),
                    ),
                )
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn snapshot_plus_changes_equals_live_state(steps in proptest::collection::vec(step(), 1..120)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
            rt.block_on(async {
                let (engine, _task) = Engine::start(&PresenceConfig { ring_size: 4096, queue_size: 1024 });
                let mut sub = engine.hub().subscribe();
                let mut model = Model::default();
                let mut expected_changes = 0u64;
                let mut snapshots: Vec<Arc<Snapshot>> = Vec::new();
                let mut last: Option<Step> = None;
                for (n, s) in steps.iter().enumerate() {
                    let s = match s { Step::Repeat => match &last { Some(l) => l.clone(), None => continue }, other => other.clone() };
                    if let Step::Snapshot = s {
                        snapshots.push(engine.snapshot().await.map_err(|e| TestCaseError::fail(e.to_string()))?);
                        continue;
                    }
                    if model.apply(&s) { expected_changes += 1; }
                    if let Some(ev) = event(&s, n as u64) {
                        engine.apply(ev).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    last = Some(s);
                }
                let final_seq = engine.barrier().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(final_seq, expected_changes, "a change exactly when the model changed");

                // Gap-free seq on the feed.
                let mut changes = Vec::new();
                sub.drain_ready(&mut changes, usize::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(changes.len() as u64, final_seq);
                for (i, c) in changes.iter().enumerate() {
                    prop_assert_eq!(c.seq, i as u64 + 1);
                }

                // Live state matches the reference model.
                let live = engine.snapshot().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let live_map: HashMap<_, _> = live.iter().map(|u| (u.jid.clone(), u.clone())).collect();
                prop_assert_eq!(view(&live_map), model.expected());
                for u in live.iter() {
                    prop_assert_eq!(Some(u.clone()), engine.get(&u.jid));
                }
                let stats = engine.stats();
                prop_assert_eq!(stats.online_users as usize, live.users.len());
                prop_assert_eq!(stats.online_resources as usize, live.iter().map(|u| u.resources.len()).sum::<usize>());

                // Every snapshot + the changes after it (from the ring) = the live state.
                for snap in snapshots.iter().chain(std::iter::once(&live)) {
                    let after = match engine.hub().since(snap.seq, final_seq) {
                        Resume::Changes(c) => c,
                        Resume::TooOld => return Err(TestCaseError::fail("ring too small")),
                    };
                    let rebuilt = replay(snap, &after);
                    prop_assert_eq!(rebuilt, live_map.clone());
                }
                Ok(())
            })?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// A leader shows a change only once its gate confirms it; a follower applying what
        /// the gate saw is the leader's state, seq for seq; a refused batch never happened.
        #[test]
        fn a_follower_applying_the_gate_equals_its_leader(
            steps in proptest::collection::vec(step(), 1..120),
            refuse_at in proptest::option::of(0usize..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
            rt.block_on(async {
                let cfg = PresenceConfig { ring_size: 4096, queue_size: 1024 };
                let (leader, _t1) = Engine::start_with(&cfg, EngineOptions { follower: true, ..Default::default() });
                let (follower, _t2) = Engine::start_with(&cfg, EngineOptions {
                    follower: true,
                    epoch: Some(leader.epoch().clone()),
                    ..Default::default()
                });
                let (gate, mut rx) = Gate::channel();
                leader.lead(gate, Vec::new()).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(leader.role(), Role::Leader);
                // The "stream": confirms batches (all, or up to `refuse_at`) and hands the
                // confirmed ones to the follower.
                let f = follower.clone();
                let stream = tokio::spawn(async move {
                    let mut n = 0usize;
                    let mut refused = false;
                    while let Some((batch, reply)) = rx.recv().await {
                        if refused || refuse_at == Some(n) {
                            refused = true;
                            let _ = reply.send(Err(Refused("test".into())));
                            continue;
                        }
                        n += 1;
                        f.replicate(batch.to_vec()).await.expect("open").expect("no gap");
                        let _ = reply.send(Ok(()));
                    }
                });
                for (n, s) in steps.iter().enumerate() {
                    if let Some(ev) = event(s, n as u64) {
                        leader.apply(ev).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
                let seq = leader.barrier().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let fseq = follower.barrier().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(seq, fseq, "the follower is at the leader's seq");
                let a = leader.snapshot().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let b = follower.snapshot().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(a.users.clone(), b.users.clone());
                prop_assert_eq!(leader.stats(), follower.stats());
                if refuse_at.is_some() && leader.role() == Role::Follower {
                    // Refused: the leader stopped sequencing; later events change nothing.
                    leader.apply(event(&Step::AllGone { user: 0 }, 999).expect("event")).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(leader.barrier().await.map_err(|e| TestCaseError::fail(e.to_string()))?, seq);
                }
                drop(leader);
                let _ = stream.await;
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn a_leaders_lone_change_reaches_subscribers_once_confirmed() {
        let cfg = PresenceConfig {
            ring_size: 64,
            queue_size: 64,
        };
        let (leader, _t) = Engine::start_with(
            &cfg,
            EngineOptions {
                follower: true,
                ..Default::default()
            },
        );
        let (gate, mut rx) = Gate::channel();
        leader.lead(gate, Vec::new()).await.unwrap();
        let mut sub = leader.hub().subscribe();
        let s = Step::Avail {
            user: 1,
            res: 0,
            show: 1,
            prio: 0,
            status: 0,
        };
        leader.apply(event(&s, 1).expect("event")).await.unwrap();
        // Not visible before the gate answers.
        let (batch, reply) = rx.recv().await.expect("a batch at the gate");
        assert_eq!(batch.len(), 1);
        assert_eq!(leader.seq(), 0);
        assert!(leader.get(&user(1)).is_none());
        reply.send(Ok(())).unwrap();
        // No further command: the confirmed change still reaches the feed.
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), sub.recv())
            .await
            .expect("the change is published without waiting for another command")
            .unwrap()
            .unwrap();
        assert_eq!(c.seq, 1);
        assert_eq!(leader.seq(), 1);
    }

    #[tokio::test]
    async fn resync_expires_unconfirmed_resources_only() {
        let (engine, _task) = Engine::start(&PresenceConfig {
            ring_size: 64,
            queue_size: 64,
        });
        let at = Utc::now();
        for (n, (u, res)) in [(0u8, 0u8), (0, 1), (1, 0)].into_iter().enumerate() {
            let s = Step::Avail {
                user: u,
                res,
                show: 1,
                prio: 0,
                status: 0,
            };
            engine
                .apply(event(&s, n as u64).expect("event"))
                .await
                .unwrap();
        }
        engine.resync_begin(1).await.unwrap();
        // user0/r0 confirmed by a duplicate (no change), the others not.
        let s = Step::Avail {
            user: 0,
            res: 0,
            show: 1,
            prio: 0,
            status: 0,
        };
        engine.apply(event(&s, 0).expect("event")).await.unwrap();
        engine.resync_end(2, at).await.unwrap(); // stale generation: ignored
        assert_eq!(engine.barrier().await.unwrap_or_default(), 3);
        engine.resync_end(1, at).await.unwrap();
        assert_eq!(engine.barrier().await.unwrap_or_default(), 5);
        let u0 = engine.get(&user(0)).expect("user0");
        assert_eq!(u0.resources.len(), 1);
        assert_eq!(u0.resources[0].resource, "r0");
        let u1 = engine.get(&user(1)).expect("user1");
        assert!(!u1.online);
        assert_eq!(u1.last_seen, Some(at));
    }
}
