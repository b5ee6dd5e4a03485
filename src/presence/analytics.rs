//! The definitions of contract §6, as pure functions over sessions and events. The Postgres
//! and the in-memory history both fetch the sessions (and, for replay, the events) of a window
//! and answer through these, so every client gets the same numbers from either.
//!
//! - A **session** is one resource's online interval `[start, end)`; an open one (`end` =
//!   `None`) lasts until `now`.
//! - `online_time`: seconds inside `[from, to)` during which the key was online — for a user
//!   the union of their sessions (two devices at once count once), for a domain the sum over its
//!   users, for a client the sum of its sessions; `sessions` = sessions overlapping the window.
//! - `concurrency`: the window cut into steps `[t, t+step)`; each point's users/resources are
//!   the maximum online at one instant within the step; `peak` = the highest `users` and the
//!   first instant it was reached.
//! - `replay`: the users online at `T`, each resource as it was at `T`, aggregated by §3.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};

use super::aggregate::best_resource;
use super::model::{ResourcePresence, Show, UserJid, UserPresence};

/// `[start, end)`.
type Interval = (DateTime<Utc>, DateTime<Utc>);

/// One resource's online interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The user (bare JID).
    pub jid: UserJid,
    /// The resource.
    pub resource: String,
    /// Client software (XEP-0115), if known.
    pub client: Option<String>,
    /// When it came online.
    pub start: DateTime<Utc>,
    /// When it went offline; `None` while open.
    pub end: Option<DateTime<Utc>>,
}

impl Span {
    /// The part of the span inside `[from, to)`, open spans ending at `now`; `None` if empty.
    fn clip(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let end = self.end.unwrap_or(now).min(to);
        let start = self.start.max(from);
        (start < end).then_some((start, end))
    }
}

/// What `online_time` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Per user: the union of their sessions.
    User,
    /// Per domain: the sum of its users' unions.
    Domain,
    /// Per client: the sum of its sessions.
    Client,
}

/// The client key of a span (`unknown` when no caps were seen).
pub fn client_key(c: &Option<String>) -> &str {
    c.as_deref().unwrap_or("unknown")
}

fn ms(d: Duration) -> i64 {
    d.num_milliseconds()
}

/// Total length of the union of intervals, in ms.
fn union_ms(mut iv: Vec<Interval>) -> i64 {
    iv.sort();
    let mut total = 0;
    let mut cur: Option<Interval> = None;
    for (s, e) in iv {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ms(ce - cs);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = cur {
        total += ms(ce - cs);
    }
    total
}

/// One `online-time` row: milliseconds online and overlapping sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeRow {
    /// User JID, domain, or client name.
    pub key: String,
    /// Milliseconds online inside the window.
    pub millis: i64,
    /// Sessions overlapping the window.
    pub sessions: u64,
}

/// Online time per key, sorted by time (desc), then key; at most `limit` rows.
pub fn online_time(
    spans: &[Span],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
    group: Group,
    limit: usize,
) -> Vec<TimeRow> {
    let mut per_user: HashMap<&UserJid, Vec<Interval>> = HashMap::new();
    let mut sessions: HashMap<String, u64> = HashMap::new();
    let mut client_ms: HashMap<String, i64> = HashMap::new();
    for s in spans {
        let Some(c) = s.clip(from, to, now) else {
            continue;
        };
        let key = match group {
            Group::User => s.jid.as_str().to_owned(),
            Group::Domain => s.jid.domain().to_owned(),
            Group::Client => client_key(&s.client).to_owned(),
        };
        *sessions.entry(key.clone()).or_default() += 1;
        match group {
            Group::Client => *client_ms.entry(key).or_default() += ms(c.1 - c.0),
            _ => per_user.entry(&s.jid).or_default().push(c),
        }
    }
    let mut totals: HashMap<String, i64> = client_ms;
    for (jid, iv) in per_user {
        let key = match group {
            Group::Domain => jid.domain().to_owned(),
            _ => jid.as_str().to_owned(),
        };
        *totals.entry(key).or_default() += union_ms(iv);
    }
    let mut rows: Vec<TimeRow> = totals
        .into_iter()
        .map(|(key, millis)| TimeRow {
            sessions: sessions.get(&key).copied().unwrap_or(0),
            key,
            millis,
        })
        .collect();
    rows.sort_by(|a, b| b.millis.cmp(&a.millis).then_with(|| a.key.cmp(&b.key)));
    rows.truncate(limit);
    rows
}

/// One `concurrency` point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Start of the step.
    pub t: DateTime<Utc>,
    /// Most users online at one instant of the step.
    pub users: u64,
    /// Most resources online at one instant of the step.
    pub resources: u64,
    /// The first instant of the step with `users` online.
    pub users_at: DateTime<Utc>,
}

/// `concurrency`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    /// One point per step.
    pub points: Vec<Point>,
    /// The highest `users` of the window and the first instant it was reached.
    pub peak: (DateTime<Utc>, u64),
}

/// Max users/resources online per step of `[from, to)`. `step` must be positive; the caller
/// bounds the number of points.
pub fn concurrency(
    spans: &[Span],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
    now: DateTime<Utc>,
) -> Concurrency {
    // Boundaries: (time, 0 = end | 1 = start, span index). Ends first at the same instant:
    // a session over [a, t) is not online at t.
    let mut marks: Vec<(DateTime<Utc>, u8, usize)> = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        // Only the instants inside the window matter; clipping to the window keeps the state
        // at `from` right and ignores everything after `to`.
        let end = s.end.unwrap_or(now);
        if s.start >= to || end <= from || s.start >= end {
            continue;
        }
        marks.push((s.start.max(from), 1, i));
        if end < to {
            marks.push((end, 0, i));
        }
    }
    marks.sort();
    let mut per_user: HashMap<&UserJid, u64> = HashMap::new();
    let (mut users, mut resources) = (0u64, 0u64);
    let mut points = Vec::new();
    let mut peak = (from, 0u64);
    let mut m = 0;
    let mut t = from;
    while t < to {
        let step_end = (t + step).min(to);
        let mut best = Point {
            t,
            users: 0,
            resources: 0,
            users_at: t,
        };
        let mut first = true;
        // The state at each distinct instant in [t, step_end): after every mark at that time.
        loop {
            let at = if first {
                t
            } else if m < marks.len() && marks[m].0 < step_end {
                marks[m].0
            } else {
                break;
            };
            while m < marks.len() && marks[m].0 <= at {
                let (_, kind, i) = marks[m];
                let c = per_user.entry(&spans[i].jid).or_default();
                if kind == 1 {
                    resources += 1;
                    *c += 1;
                    if *c == 1 {
                        users += 1;
                    }
                } else {
                    resources -= 1;
                    *c -= 1;
                    if *c == 0 {
                        users -= 1;
                    }
                }
                m += 1;
            }
            first = false;
            if users > best.users {
                best.users = users;
                best.users_at = at;
            }
            best.resources = best.resources.max(resources);
            if users > peak.1 {
                peak = (at, users);
            }
        }
        points.push(best);
        t = step_end;
    }
    Concurrency { points, peak }
}

/// One `clients` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRow {
    /// Client name (`unknown` without caps).
    pub client: String,
    /// Distinct users with a session of this client in the window.
    pub users: u64,
    /// Distinct resources (user + resource) of this client in the window.
    pub resources: u64,
    /// Milliseconds of its sessions inside the window.
    pub millis: i64,
}

/// Client software used in the window, by time (desc), then name.
pub fn clients(
    spans: &[Span],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<ClientRow> {
    type Acc<'a> = (HashSet<&'a str>, HashSet<(&'a str, &'a str)>, i64);
    let mut acc: BTreeMap<&str, Acc<'_>> = BTreeMap::new();
    for s in spans {
        let Some((a, b)) = s.clip(from, to, now) else {
            continue;
        };
        let e = acc.entry(client_key(&s.client)).or_default();
        e.0.insert(s.jid.as_str());
        e.1.insert((s.jid.as_str(), s.resource.as_str()));
        e.2 += ms(b - a);
    }
    let mut rows: Vec<ClientRow> = acc
        .into_iter()
        .map(|(c, (u, r, millis))| ClientRow {
            client: c.to_owned(),
            users: u.len() as u64,
            resources: r.len() as u64,
            millis,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.millis
            .cmp(&a.millis)
            .then_with(|| a.client.cmp(&b.client))
    });
    rows
}

/// What one resource said, as history records it (the available events of a session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEvent {
    /// The user.
    pub jid: UserJid,
    /// The resource.
    pub resource: String,
    /// When.
    pub at: DateTime<Utc>,
    /// `true` for available.
    pub available: bool,
    /// Show (available only).
    pub show: Option<Show>,
    /// Status.
    pub status: Option<String>,
    /// Priority (available only).
    pub priority: Option<i8>,
    /// Client.
    pub client: Option<String>,
}

/// The presence map at `at`: every user with a session open at `at`, each such resource with
/// the show/status/priority/client of its last available event at or before `at` (within the
/// session), aggregated by the rules of §3. `spans` must hold every session of those users that
/// overlaps the online stretch containing `at` (for `online_since`); `events` every event of
/// those users at or before `at` that is not older than their stretch (for `last_change` and the
/// resources' state). Sorted by JID.
pub fn replay(spans: &[Span], events: &[StateEvent], at: DateTime<Utc>) -> Vec<UserPresence> {
    let open = |s: &Span| s.start <= at && s.end.is_none_or(|e| e > at);
    let online: HashSet<&UserJid> = spans.iter().filter(|s| open(s)).map(|s| &s.jid).collect();
    let mut by_user: BTreeMap<&UserJid, Vec<&Span>> = BTreeMap::new();
    for s in spans.iter().filter(|s| online.contains(&s.jid)) {
        by_user.entry(&s.jid).or_default().push(s);
    }
    let mut last_event: HashMap<(&UserJid, &str), &StateEvent> = HashMap::new();
    let mut last_change: HashMap<&UserJid, DateTime<Utc>> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.at <= at && online.contains(&e.jid))
    {
        let lc = last_change.entry(&e.jid).or_insert(e.at);
        *lc = (*lc).max(e.at);
        if e.available {
            let k = (&e.jid, e.resource.as_str());
            match last_event.get(&k) {
                Some(prev) if prev.at > e.at => {}
                _ => {
                    last_event.insert(k, e);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (jid, list) in by_user {
        // online_since: the start of the merged stretch of the user's sessions containing `at`.
        let iv: Vec<Interval> = list
            .iter()
            .filter(|s| s.start <= at)
            .map(|s| (s.start, s.end.unwrap_or(DateTime::<Utc>::MAX_UTC)))
            .collect();
        let mut since = at;
        // Walk back from `at`: any interval reaching `since` extends the stretch to its start.
        loop {
            let before = since;
            for (s, e) in &iv {
                if *e >= since && *s < since {
                    since = *s;
                }
            }
            if since == before {
                break;
            }
        }
        let mut resources: Vec<ResourcePresence> = Vec::new();
        for (n, s) in list.iter().filter(|s| open(s)).enumerate() {
            let ev = last_event
                .get(&(jid, s.resource.as_str()))
                .filter(|e| e.at >= s.start);
            resources.push(ResourcePresence {
                resource: s.resource.clone(),
                show: ev.and_then(|e| e.show).unwrap_or(Show::Available),
                status: ev.and_then(|e| e.status.clone()),
                priority: ev.and_then(|e| e.priority).unwrap_or(0),
                client: ev
                    .and_then(|e| e.client.clone())
                    .or_else(|| s.client.clone()),
                since: s.start,
                idle_since: None,
                // Most recent change wins ties, as in the live map.
                touched: ev.map_or(n as u64, |e| {
                    e.at.timestamp_millis().max(0) as u64 * 1024 + n as u64
                }),
            });
        }
        resources.sort_by(|a, b| a.resource.cmp(&b.resource));
        let Some(best) = best_resource(&resources) else {
            continue;
        };
        out.push(UserPresence {
            jid: (*jid).clone(),
            online: true,
            show: best.show,
            status: best.status.clone(),
            priority: best.priority,
            online_since: Some(since),
            last_change: last_change.get(jid).copied().unwrap_or(since).max(since),
            last_seen: None,
            resources,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn span(user: &str, res: &str, client: Option<&str>, a: i64, b: Option<i64>) -> Span {
        Span {
            jid: UserJid::parse(user).unwrap(),
            resource: res.into(),
            client: client.map(str::to_owned),
            start: t(a),
            end: b.map(t),
        }
    }

    #[test]
    fn two_devices_at_once_count_once_for_the_user_twice_for_clients() {
        let s = vec![
            span("a@x", "phone", Some("Conversations"), 0, Some(100)),
            span("a@x", "pc", Some("Gajim"), 50, Some(150)),
            span("b@y", "pc", None, 120, None),
        ];
        let users = online_time(&s, t(0), t(200), t(180), Group::User, 10);
        assert_eq!(
            users,
            vec![
                TimeRow {
                    key: "a@x".into(),
                    millis: 150_000,
                    sessions: 2
                },
                TimeRow {
                    key: "b@y".into(),
                    millis: 60_000,
                    sessions: 1
                },
            ]
        );
        let by_client = online_time(&s, t(0), t(200), t(180), Group::Client, 10);
        // Equal time: by name.
        assert_eq!(
            (by_client[0].key.as_str(), by_client[1].key.as_str()),
            ("Conversations", "Gajim")
        );
        assert_eq!(
            (by_client[0].millis, by_client[1].millis),
            (100_000, 100_000)
        );
        assert_eq!(
            by_client[2],
            TimeRow {
                key: "unknown".into(),
                millis: 60_000,
                sessions: 1
            }
        );
        let c = concurrency(&s, t(0), t(200), Duration::seconds(60), t(180));
        assert_eq!(
            c.points
                .iter()
                .map(|p| (p.users, p.resources))
                .collect::<Vec<_>>(),
            vec![(1, 2), (1, 2), (2, 2), (0, 0)]
        );
        assert_eq!(c.peak, (t(120), 2));
        let r = replay(&s, &[], t(60));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].resources.len(), 2);
        assert_eq!(r[0].online_since, Some(t(0)));
        let r = replay(&s, &[], t(150));
        assert_eq!(
            r.iter().map(|u| u.jid.as_str()).collect::<Vec<_>>(),
            vec!["b@y"]
        );
    }

    /// Brute force over whole seconds: the model the functions must match.
    fn online_at(spans: &[Span], sec: i64, now: i64) -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| {
                let a = (s.start - t(0)).num_seconds();
                let b = s.end.map_or(now, |e| (e - t(0)).num_seconds());
                a <= sec && sec < b
            })
            .collect()
    }

    prop_compose! {
        fn arb_span()(u in 0..4u8, r in 0..3u8, c in 0..3u8, a in 0..100i64, len in 1..60i64, open in 0..6u8)
            -> Span {
            span(&format!("u{u}@d{}", u % 2), &format!("r{r}"), (c > 0).then(|| format!("C{c}")).as_deref(), a, (open != 0).then_some(a + len))
        }
    }

    /// Sessions of one resource never overlap (the engine closes before it reopens).
    fn valid(mut spans: Vec<Span>, now: i64) -> Vec<Span> {
        spans.sort_by_key(|s| s.start);
        let mut last_end: HashMap<(UserJid, String), DateTime<Utc>> = HashMap::new();
        let mut out = Vec::new();
        for mut s in spans {
            let k = (s.jid.clone(), s.resource.clone());
            if last_end.get(&k).is_some_and(|e| *e > s.start) {
                continue;
            }
            if s.start >= t(now) {
                continue;
            }
            if s.end.is_some_and(|e| e > t(now)) {
                s.end = Some(t(now));
            }
            last_end.insert(k, s.end.unwrap_or(DateTime::<Utc>::MAX_UTC));
            out.push(s);
        }
        out
    }

    proptest! {
        #[test]
        fn every_definition_matches_the_brute_force_model(
            raw in proptest::collection::vec(arb_span(), 0..14),
            from in 0..80i64, len in 1..120i64, step in 1..40i64,
        ) {
            let now = 150i64;
            let spans = valid(raw, now);
            let to = from + len;
            // online-time by user: seconds with at least one resource online.
            let rows = online_time(&spans, t(from), t(to), t(now), Group::User, 100);
            let mut model: BTreeMap<String, i64> = BTreeMap::new();
            for sec in from..to.min(now) {
                let on: HashSet<&str> = online_at(&spans, sec, now).iter().map(|s| s.jid.as_str()).collect();
                for u in on { *model.entry(u.to_owned()).or_default() += 1000; }
            }
            let got: BTreeMap<String, i64> = rows.iter().map(|r| (r.key.clone(), r.millis)).collect();
            prop_assert_eq!(&got, &model);
            // by domain: the sum of its users.
            let dom = online_time(&spans, t(from), t(to), t(now), Group::Domain, 100);
            for d in &dom {
                let sum: i64 = model.iter().filter(|(u, _)| u.ends_with(&format!("@{}", d.key))).map(|(_, v)| v).sum();
                prop_assert_eq!(d.millis, sum);
            }
            // concurrency: max online at one second of each step.
            let c = concurrency(&spans, t(from), t(to), Duration::seconds(step), t(now));
            let mut s = from;
            let mut peak = (from, 0u64);
            for p in &c.points {
                prop_assert_eq!(p.t, t(s));
                let e = (s + step).min(to);
                let (mut mu, mut mr) = (0u64, 0u64);
                for sec in s..e {
                    let on = online_at(&spans, sec, now);
                    let users: HashSet<&str> = on.iter().map(|x| x.jid.as_str()).collect();
                    mu = mu.max(users.len() as u64);
                    mr = mr.max(on.len() as u64);
                    if users.len() as u64 > peak.1 { peak = (sec, users.len() as u64); }
                }
                prop_assert_eq!((p.users, p.resources), (mu, mr));
                s = e;
            }
            prop_assert_eq!(c.peak, (t(peak.0), peak.1));
            // replay: exactly the users and resources online at T.
            for at in [from, from + len / 2] {
                let r = replay(&spans, &[], t(at));
                let model: BTreeMap<&str, BTreeSet<&str>> = online_at(&spans, at, now).into_iter().fold(BTreeMap::new(), |mut m, s| {
                    m.entry(s.jid.as_str()).or_default().insert(s.resource.as_str()); m
                });
                let got: BTreeMap<&str, BTreeSet<&str>> = r.iter().map(|u| (u.jid.as_str(), u.resources.iter().map(|x| x.resource.as_str()).collect())).collect();
                prop_assert_eq!(got, model);
                for u in &r {
                    // online_since: the first second of the unbroken stretch containing T.
                    let mut since = at;
                    while since > 0 && online_at(&spans, since - 1, now).iter().any(|s| s.jid == u.jid) { since -= 1; }
                    prop_assert_eq!(u.online_since, Some(t(since)));
                }
            }
        }
    }

    use std::collections::BTreeSet;
}
