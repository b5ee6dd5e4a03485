//! The simulator source behind `presence-bridge demo`: the real engine, API and dashboard are
//! fed by it instead of an XMPP server (`Ingest::Simulated` of the composition root).
//!
//! The simulator builds real `<presence/>` stanzas (xmpp-parsers types: show, status, priority,
//! XEP-0115 caps, XEP-0319 idle) and hands them to the same [`Translator`] the XMPP component
//! uses, then to the engine: the demo exercises the production path, not a shortcut into the
//! map. Its population: users on one to three devices with different clients and priorities,
//! show changes with plausible dwell times, status texts, idle, log-ins and log-outs following a
//! compressed "day" (one day every ten minutes), and one user who flaps.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use minidom::Element;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use tokio_util::sync::CancellationToken;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::presence::{Presence, Show as XShow, Type};

use super::xmpp::translate::{Delay, Inbound, Translator};
use crate::config::XmppConfig;
use crate::presence::Engine;

/// The simulated user domains.
pub const DOMAINS: [&str; 3] = ["example.com", "example.org", "ops.example.net"];

/// Length of the simulated day.
pub const DAY: Duration = Duration::from_secs(600);

struct Device {
    resource: &'static str,
    node: &'static str,
    priority: i8,
}

const DEVICES: [Device; 6] = [
    Device {
        resource: "phone",
        node: "http://conversations.im",
        priority: 0,
    },
    Device {
        resource: "laptop",
        node: "https://gajim.org",
        priority: 10,
    },
    Device {
        resource: "desktop",
        node: "https://dino.im",
        priority: 8,
    },
    Device {
        resource: "iphone",
        node: "https://github.com/monal-im/Monal",
        priority: 1,
    },
    Device {
        resource: "web",
        node: "https://conversejs.org",
        priority: 5,
    },
    Device {
        resource: "terminal",
        node: "https://profanity-im.github.io",
        priority: 3,
    },
];

const NAMES: [&str; 40] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yusuf", "zoe",
    "amara", "bao", "chen", "dmitri", "elif", "farah", "goran", "hana", "ines", "jonas", "kofi",
    "lena", "mateo", "noor", "oskar", "priya", "quinn", "rosa", "sami",
];

const STATUSES: [(&str, &[&str]); 5] = [
    (
        "chat",
        &["Happy to help", "Free to talk", "Ask me anything"],
    ),
    (
        "",
        &[
            "Working on the release",
            "At my desk",
            "Reviewing PRs",
            "On call this week",
            "",
        ],
    ),
    (
        "away",
        &[
            "Lunch",
            "In a meeting",
            "Back in 15",
            "Walking the dog",
            "Commuting",
        ],
    ),
    (
        "xa",
        &["On holiday until Monday", "Gone for the day", "Travelling"],
    ),
    (
        "dnd",
        &["Focus time", "Presenting", "Do not disturb: deploying"],
    ),
];

struct SimUser {
    jid: String,
    devices: Vec<usize>,
    /// Online resources: device index → (show index into STATUSES, next change at simulated
    /// second).
    online: HashMap<usize, (usize, f64)>,
    /// How eager this user is to be online (0..1).
    diligence: f64,
    flapper: bool,
}

/// The simulator. `run` feeds the engine until `cancel`.
pub struct Simulator {
    users: Vec<SimUser>,
    translator: Translator,
    rng: StdRng,
    /// Simulated seconds since `origin` at the current step.
    secs: f64,
    /// Seconds per step: 0.25 live; coarser while backfilling.
    step_secs: f64,
    /// The flapper's next toggle (simulated second).
    next_flap: f64,
    /// Where the simulated day started.
    origin: DateTime<Utc>,
    /// The simulated clock while backfilling (`None`: live, the real clock).
    clock: Option<DateTime<Utc>>,
    /// The population is online already (warm-up or backfill done).
    warmed: bool,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Ticks per second.
const TICK: Duration = Duration::from_millis(250);
/// The simulated step while backfilling.
const BACKFILL_STEP: Duration = Duration::from_secs(5);

impl Simulator {
    /// A population of `n` users (deterministic for a given seed).
    pub fn new(n: usize, seed: u64) -> Simulator {
        let mut rng = StdRng::seed_from_u64(seed);
        let users = (0..n)
            .map(|i| {
                let name = NAMES[i % NAMES.len()];
                let suffix = i / NAMES.len();
                let local = if suffix == 0 {
                    name.to_string()
                } else {
                    format!("{name}{suffix}")
                };
                let domain = DOMAINS[if i % 7 == 0 { 2 } else { i % 2 }];
                let k = rng.random_range(1..=3usize);
                let mut devices: Vec<usize> = (0..DEVICES.len()).collect();
                devices.sort_by_key(|_| rng.random::<u32>());
                devices.truncate(k);
                SimUser {
                    jid: format!("{local}@{domain}"),
                    devices,
                    online: HashMap::new(),
                    diligence: rng.random_range(0.2..1.0),
                    flapper: i == 3,
                }
            })
            .collect();
        let cfg = XmppConfig {
            domains: DOMAINS.iter().map(|d| d.to_string()).collect(),
            ..XmppConfig::default()
        };
        Simulator {
            users,
            translator: Translator::new(&cfg),
            rng,
            secs: 0.0,
            step_secs: TICK.as_secs_f64(),
            next_flap: 0.0,
            origin: Utc::now(),
            clock: None,
            warmed: false,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.unwrap_or_else(Utc::now)
    }

    /// Fraction of users who want to be online now: a compressed day (night low, day high).
    fn wave(&self) -> f64 {
        let elapsed = (self.now() - self.origin).num_milliseconds() as f64 / 1000.0;
        let phase = (elapsed / DAY.as_secs_f64()) * std::f64::consts::TAU;
        0.45 + 0.3 * phase.sin()
    }

    /// One presence stanza, as a client would send it (and ejabberd forward it).
    fn stanza(&mut self, u: usize, d: usize, show: Option<usize>) -> Presence {
        let dev = &DEVICES[d];
        let from: Jid = match BareJid::new(&self.users[u].jid)
            .ok()
            .and_then(|b| b.with_resource_str(dev.resource).ok())
        {
            Some(f) => f.into(),
            None => return Presence::new(Type::None),
        };
        let Some(si) = show else {
            return Presence::new(Type::Unavailable).with_from(from);
        };
        let (word, texts) = STATUSES[si];
        let mut p = Presence::new(Type::None)
            .with_from(from)
            .with_priority(dev.priority);
        p.show = match word {
            "chat" => Some(XShow::Chat),
            "away" => Some(XShow::Away),
            "xa" => Some(XShow::Xa),
            "dnd" => Some(XShow::Dnd),
            _ => None,
        };
        if let Some(text) = texts.choose(&mut self.rng).filter(|t| !t.is_empty()) {
            p.set_status("", *text);
        }
        let caps = format!(
            "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{}' ver='sim'/>",
            dev.node
        );
        if let Ok(el) = caps.parse::<Element>() {
            p.payloads.push(el);
        }
        if word == "away" || word == "xa" {
            let mins = self.rng.random_range(2..90);
            let since = (Utc::now() - chrono::Duration::minutes(mins))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            if let Ok(el) =
                format!("<idle xmlns='urn:xmpp:idle:1' since='{since}'/>").parse::<Element>()
            {
                p.payloads.push(el);
            }
        }
        p
    }

    fn dwell(&mut self) -> f64 {
        // Mean ~40 s between show changes, some much longer.
        let secs = -45.0 * (1.0 - self.rng.random::<f64>()).ln();
        self.secs + secs.max(1.0)
    }

    fn pick_show(&mut self) -> usize {
        // available and away are the common states.
        *[1, 1, 1, 1, 2, 2, 0, 4, 3]
            .choose(&mut self.rng)
            .unwrap_or(&1)
    }

    /// The stanzas of one tick.
    fn step(&mut self) -> Vec<Presence> {
        self.secs = (self.now() - self.origin).num_milliseconds() as f64 / 1000.0;
        let wave = self.wave();
        let mut out = Vec::new();
        for u in 0..self.users.len() {
            let user = &self.users[u];
            if user.flapper {
                // Online/offline every ~3 s.
                if self.secs >= self.next_flap {
                    self.next_flap = self.secs + 3.0;
                    let d = user.devices[0];
                    let show = if user.online.contains_key(&d) {
                        None
                    } else {
                        Some(1)
                    };
                    match show {
                        Some(s) => {
                            let due = self.secs + 3.0;
                            self.users[u].online.insert(d, (s, due));
                        }
                        None => {
                            self.users[u].online.remove(&d);
                        }
                    }
                    out.push(self.stanza(u, d, show));
                }
                continue;
            }
            let want = wave * user.diligence * 1.6 > 0.5;
            let r: f64 = self.rng.random();
            // Log in / out slowly towards what the wave wants (about one decision a minute).
            // About one log-in/out decision a minute, whatever the step.
            if r < 0.004 * self.step_secs / TICK.as_secs_f64() {
                let devices = self.users[u].devices.clone();
                if want {
                    if let Some(&d) = devices
                        .iter()
                        .find(|d| !self.users[u].online.contains_key(d))
                    {
                        let s = self.pick_show();
                        let due = self.dwell();
                        self.users[u].online.insert(d, (s, due));
                        out.push(self.stanza(u, d, Some(s)));
                    }
                } else if let Some(&d) = devices
                    .iter()
                    .find(|d| self.users[u].online.contains_key(d))
                {
                    self.users[u].online.remove(&d);
                    out.push(self.stanza(u, d, None));
                }
            }
            // Show/status changes when a resource's dwell time is over.
            let due: Vec<usize> = self.users[u]
                .online
                .iter()
                .filter(|(_, (_, t))| *t <= self.secs)
                .map(|(d, _)| *d)
                .collect();
            for d in due {
                let s = self.pick_show();
                let next = self.dwell();
                self.users[u].online.insert(d, (s, next));
                out.push(self.stanza(u, d, Some(s)));
            }
        }
        out
    }

    /// Brings about `wave` of the users online at once (a demo should not start empty).
    fn warm_up(&mut self) -> Vec<Presence> {
        let wave = self.wave();
        let mut out = Vec::new();
        for u in 0..self.users.len() {
            if self.users[u].diligence * wave * 1.6 > 0.5 || self.users[u].flapper {
                let devices = self.users[u].devices.clone();
                for d in devices {
                    if self.rng.random::<f64>() < 0.7 || d == self.users[u].devices[0] {
                        let s = self.pick_show();
                        let due = self.dwell();
                        self.users[u].online.insert(d, (s, due));
                        out.push(self.stanza(u, d, Some(s)));
                    }
                }
            }
        }
        out
    }

    async fn feed(&self, engine: &Engine, stanzas: Vec<Presence>) -> bool {
        let now = self.now();
        for p in stanzas {
            if let Ok(Inbound::Event(ev)) = self.translator.presence(&p, now, Delay::Untrusted)
                && engine.apply(ev).await.is_err()
            {
                return false;
            }
        }
        true
    }

    /// Simulates the `hours` before now as fast as the engine takes it, with the same rules
    /// and a simulated clock, so that history and analytics have a past the moment the demo
    /// starts (contract §6, `demo --backfill-hours`). `false` if the engine stopped.
    pub async fn backfill(
        &mut self,
        engine: &Engine,
        hours: u32,
        cancel: &CancellationToken,
    ) -> bool {
        if hours == 0 {
            return true;
        }
        let end = Utc::now();
        let start = end - chrono::Duration::hours(i64::from(hours));
        self.origin = start;
        self.clock = Some(start);
        let first = self.warm_up();
        self.warmed = true;
        if !self.feed(engine, first).await {
            return false;
        }
        // Coarse steps (5 s) while backfilling: the same rates, 20x fewer steps.
        self.step_secs = BACKFILL_STEP.as_secs_f64();
        let step =
            chrono::Duration::from_std(BACKFILL_STEP).unwrap_or(chrono::Duration::seconds(5));
        while let Some(t) = self.clock.filter(|t| *t + step < end) {
            if cancel.is_cancelled() {
                return false;
            }
            self.clock = Some(t + step);
            let stanzas = self.step();
            if !self.feed(engine, stanzas).await {
                return false;
            }
        }
        self.clock = None;
        self.step_secs = TICK.as_secs_f64();
        tracing::info!(
            hours,
            events = engine.seq(),
            "demo: simulated history backfilled"
        );
        true
    }

    /// Runs until cancelled (after an optional backfill of `hours` of history).
    pub async fn run(mut self, engine: Engine, backfill_hours: u32, cancel: CancellationToken) {
        if !self.backfill(&engine, backfill_hours, &cancel).await {
            return;
        }
        if !self.warmed {
            let first = self.warm_up();
            if !self.feed(&engine, first).await {
                return;
            }
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let stanzas = self.step();
                    if !self.feed(&engine, stanzas).await {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PresenceConfig;

    #[tokio::test]
    async fn backfill_makes_a_past_with_the_same_rules() {
        let (engine, _t) = Engine::start(&PresenceConfig::default());
        let mut sim = Simulator::new(50, 3);
        let t0 = Utc::now();
        assert!(sim.backfill(&engine, 1, &CancellationToken::new()).await);
        engine.barrier().await.unwrap_or_default();
        let snap = engine.snapshot().await.unwrap();
        assert!(engine.seq() > 200, "an hour of changes: {}", engine.seq());
        // Online since times are spread over the past hour, not all "now".
        let sinces: Vec<DateTime<Utc>> = snap.iter().filter_map(|u| u.online_since).collect();
        assert!(
            sinces
                .iter()
                .any(|s| *s < t0 - chrono::Duration::minutes(30)),
            "{sinces:?}"
        );
        assert!(sinces.iter().all(|s| *s <= Utc::now()));
    }

    #[tokio::test]
    async fn simulator_goes_through_the_translator_and_produces_a_lively_population() {
        let (engine, _t) = Engine::start(&PresenceConfig::default());
        let mut sim = Simulator::new(200, 7);
        // A simulated clock: 400 live steps of 250 ms, run as fast as they go.
        let origin = Utc::now() - chrono::Duration::minutes(5);
        sim.origin = origin;
        sim.clock = Some(origin);
        let first = sim.warm_up();
        assert!(
            first.len() > 50,
            "a demo starts with people online: {}",
            first.len()
        );
        assert!(sim.feed(&engine, first).await);
        for i in 1..=400 {
            sim.clock = Some(origin + chrono::Duration::milliseconds(250 * i));
            let s = sim.step();
            assert!(sim.feed(&engine, s).await);
        }
        engine.barrier().await.unwrap_or_default();
        let stats = engine.stats();
        assert!(stats.online_users > 20, "{stats:?}");
        assert!(
            stats.online_resources > stats.online_users,
            "several devices per user: {stats:?}"
        );
        assert!(stats.by_show.len() >= 3, "several shows: {stats:?}");
        assert!(stats.by_domain.len() == 3, "{stats:?}");
        let snap = engine.snapshot().await.unwrap();
        assert!(snap.iter().any(|u| {
            u.resources
                .iter()
                .any(|r| r.client.as_deref() == Some("Conversations"))
        }));
        assert!(
            snap.iter()
                .any(|u| u.resources.iter().any(|r| r.idle_since.is_some()))
        );
        assert!(engine.seq() > 300, "changes keep coming: {}", engine.seq());
    }
}
