//! Alerts (contract §7): a user flapping (online↔offline transitions within a window) and a
//! login storm (users of one domain coming online within a window). Pure detection over the
//! change stream; the caller turns alerts into webhook messages, metrics and the dashboard's
//! alert strip. One alert per burst, then quiet for a window.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::AlertsConfig;
use crate::presence::{Op, UserJid};

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(tag = "type")]
pub enum Alert {
    /// A user went online↔offline `transitions` times within `window_secs`.
    #[serde(rename = "alert.flapping")]
    Flapping {
        /// The user.
        #[schema(value_type = String)]
        jid: UserJid,
        /// Transitions counted.
        transitions: u32,
        /// The window.
        window_secs: u64,
        /// When it fired.
        #[serde(with = "crate::presence::model::rfc3339_millis")]
        at: DateTime<Utc>,
    },
    /// `logins` users of `domain` came online within `window_secs`.
    #[serde(rename = "alert.storm")]
    Storm {
        /// The domain.
        domain: String,
        /// Logins counted.
        logins: u32,
        /// The window.
        window_secs: u64,
        /// When it fired.
        #[serde(with = "crate::presence::model::rfc3339_millis")]
        at: DateTime<Utc>,
    },
}

impl Alert {
    /// The webhook event type.
    pub fn kind(&self) -> &'static str {
        match self {
            Alert::Flapping { .. } => "alert.flapping",
            Alert::Storm { .. } => "alert.storm",
        }
    }

    /// The webhook `data` (contract §7).
    pub fn data(&self) -> serde_json::Value {
        match self {
            Alert::Flapping {
                jid,
                transitions,
                window_secs,
                ..
            } => {
                serde_json::json!({"jid": jid, "transitions": transitions, "window_secs": window_secs})
            }
            Alert::Storm {
                domain,
                logins,
                window_secs,
                ..
            } => {
                serde_json::json!({"domain": domain, "logins": logins, "window_secs": window_secs})
            }
        }
    }

    /// The user it is about, if any (for erasure).
    pub fn jid(&self) -> Option<&UserJid> {
        match self {
            Alert::Flapping { jid, .. } => Some(jid),
            Alert::Storm { .. } => None,
        }
    }
}

#[derive(Debug, Default)]
struct Window {
    times: VecDeque<DateTime<Utc>>,
    quiet_until: Option<DateTime<Utc>>,
}

impl Window {
    /// Records one occurrence at `t`; `Some(count)` when it reaches `threshold` outside a
    /// quiet period (which then starts).
    fn hit(&mut self, t: DateTime<Utc>, window: Duration, threshold: u32) -> Option<u32> {
        while self.times.front().is_some_and(|x| *x <= t - window) {
            self.times.pop_front();
        }
        self.times.push_back(t);
        // Never more than the threshold is needed to decide.
        while self.times.len() > threshold as usize {
            self.times.pop_front();
        }
        if self.quiet_until.is_some_and(|q| t < q) {
            return None;
        }
        if self.times.len() >= threshold as usize {
            self.quiet_until = Some(t + window);
            let n = self.times.len() as u32;
            self.times.clear();
            return Some(n);
        }
        None
    }

    fn idle(&self, now: DateTime<Utc>, window: Duration) -> bool {
        self.times.back().is_none_or(|t| *t <= now - window)
            && self.quiet_until.is_none_or(|q| q <= now)
    }
}

/// The detector; fed every change on the sequencer, so every step is O(1) amortised.
#[derive(Debug)]
pub struct Detector {
    cfg: AlertsConfig,
    users: HashMap<UserJid, Window>,
    domains: HashMap<String, Window>,
    fed: u64,
}

impl Detector {
    /// A detector with these thresholds.
    pub fn new(cfg: AlertsConfig) -> Self {
        Self {
            cfg,
            users: HashMap::new(),
            domains: HashMap::new(),
            fed: 0,
        }
    }

    /// One change: what it raises.
    pub fn feed(&mut self, jid: &UserJid, op: Op, at: DateTime<Utc>) -> Vec<Alert> {
        let mut out = Vec::new();
        if op == Op::Update {
            return out;
        }
        let fw = Duration::seconds(self.cfg.flapping_window_secs as i64);
        if self.cfg.flapping_transitions > 0
            && let Some(n) = self.users.entry(jid.clone()).or_default().hit(
                at,
                fw,
                self.cfg.flapping_transitions,
            )
        {
            out.push(Alert::Flapping {
                jid: jid.clone(),
                transitions: n,
                window_secs: self.cfg.flapping_window_secs,
                at,
            });
        }
        let sw = Duration::seconds(self.cfg.storm_window_secs as i64);
        if op == Op::Online
            && self.cfg.storm_logins > 0
            && let Some(n) = self
                .domains
                .entry(jid.domain().to_owned())
                .or_default()
                .hit(at, sw, self.cfg.storm_logins)
        {
            out.push(Alert::Storm {
                domain: jid.domain().to_owned(),
                logins: n,
                window_secs: self.cfg.storm_window_secs,
                at,
            });
        }
        // Forget idle users now and then: memory follows the active users only.
        self.fed += 1;
        if self.fed.is_multiple_of(65_536) {
            self.users.retain(|_, w| !w.idle(at, fw));
            self.domains.retain(|_, w| !w.idle(at, sw));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AlertsConfig {
        AlertsConfig {
            flapping_transitions: 4,
            flapping_window_secs: 60,
            storm_logins: 3,
            storm_window_secs: 10,
        }
    }

    #[test]
    fn flapping_fires_once_per_window() {
        let mut d = Detector::new(cfg());
        let j = UserJid::parse("a@x.example").unwrap();
        let t0 = Utc::now();
        let mut fired = Vec::new();
        for i in 0..12 {
            let op = if i % 2 == 0 { Op::Online } else { Op::Offline };
            fired.extend(d.feed(&j, op, t0 + Duration::seconds(i)));
        }
        // 12 transitions in 12 s: one alert at the 4th, then quiet until t0+3+60.
        let flaps: Vec<_> = fired
            .iter()
            .filter(|a| a.kind() == "alert.flapping")
            .collect();
        assert_eq!(flaps.len(), 1, "{fired:?}");
        // Slow transitions never fire.
        let k = UserJid::parse("b@x.example").unwrap();
        for i in 0..20 {
            let op = if i % 2 == 0 { Op::Online } else { Op::Offline };
            assert!(
                d.feed(&k, op, t0 + Duration::seconds(i * 30))
                    .iter()
                    .all(|a| a.kind() != "alert.flapping")
            );
        }
        // Updates are not transitions.
        let u = UserJid::parse("c@y.example").unwrap();
        for i in 0..10 {
            assert!(d.feed(&u, Op::Update, t0 + Duration::seconds(i)).is_empty());
        }
    }

    #[test]
    fn storm_counts_logins_per_domain() {
        let mut d = Detector::new(cfg());
        let t0 = Utc::now();
        let mut storms = Vec::new();
        for i in 0..3 {
            let j = UserJid::parse(&format!("u{i}@a.example")).unwrap();
            storms.extend(d.feed(&j, Op::Online, t0 + Duration::seconds(i)));
            // Another domain, interleaved: never reaches the threshold alone.
            let k = UserJid::parse(&format!("u{i}@b.example")).unwrap();
            if i < 2 {
                storms.extend(d.feed(&k, Op::Online, t0 + Duration::seconds(i)));
            }
        }
        let storms: Vec<_> = storms
            .into_iter()
            .filter(|a| a.kind() == "alert.storm")
            .collect();
        assert_eq!(storms.len(), 1);
        assert_eq!(storms[0].data()["domain"], "a.example");
        assert_eq!(storms[0].data()["logins"], 3);
    }
}
