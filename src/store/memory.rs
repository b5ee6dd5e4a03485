//! History in memory (contract §6): in memory-only mode (and so in `demo`) the bridge keeps the
//! events and sessions of this run, bounded by `store.memory_history_events` (the oldest go
//! first), and answers the history and analytics endpoints from them. It is a [`ChangeSink`]:
//! the sequencer hands it every change, as it does the Postgres writer's queue; it takes a
//! short lock and returns.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use super::{StoredEvent, stored_events};
use crate::presence::analytics::{Span, StateEvent};
use crate::presence::{Applied, ChangeSink, UserJid};

/// One session kept in memory.
#[derive(Debug, Clone)]
struct MemSession {
    /// The id of the event that opened it.
    id: u128,
    jid: UserJid,
    resource: String,
    client: Option<String>,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    end_cause: Option<&'static str>,
    end_reason: Option<String>,
    /// Sequence number of the event that opened it (sessions are evicted with their events).
    opened_by: u64,
    /// Erased on request (contract §8): kept as a placeholder so positions stay valid, never
    /// shown.
    erased: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// (sequence number, event), oldest first.
    events: VecDeque<(u64, StoredEvent)>,
    sessions: VecDeque<MemSession>,
    /// Index into `sessions` (offset by `evicted_sessions`) of each open session.
    open: HashMap<(UserJid, String), u64>,
    next: u64,
    evicted_sessions: u64,
}

/// The in-memory history; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct MemoryHistory {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

/// A session row as the exports and analytics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The span itself.
    pub span: Span,
    /// Why it ended (`stanza`, `resync`, …), if it did.
    pub end_cause: Option<String>,
}

impl MemoryHistory {
    /// At most `capacity` events (and the sessions they opened).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the store's view of one applied event (also used to backfill the demo).
    pub fn record(&self, evs: Vec<StoredEvent>) {
        let mut g = self.lock();
        for e in evs {
            let seq = g.next;
            g.next += 1;
            let Ok(jid) = UserJid::parse(&e.jid) else {
                continue;
            };
            let key = (jid.clone(), e.resource.clone());
            if e.closed
                && let Some(i) = g.open.remove(&key)
                && let Some(idx) = i.checked_sub(g.evicted_sessions)
                && let Some(s) = g.sessions.get_mut(idx as usize)
            {
                s.end = Some(e.at);
                s.end_cause = Some(super::pg::cause_name(e.cause));
                s.end_reason.clone_from(&e.end_reason);
            }
            if e.opened {
                let index = g.evicted_sessions + g.sessions.len() as u64;
                g.sessions.push_back(MemSession {
                    id: e.id,
                    jid,
                    resource: e.resource.clone(),
                    client: e.client.clone(),
                    start: e.at,
                    end: None,
                    end_cause: None,
                    end_reason: None,
                    opened_by: seq,
                    erased: false,
                });
                g.open.insert(key, index);
            }
            g.events.push_back((seq, e));
        }
        while g.events.len() > self.capacity {
            let Some((oldest, _)) = g.events.pop_front() else {
                break;
            };
            while g.sessions.front().is_some_and(|s| s.opened_by <= oldest) {
                if let Some(s) = g.sessions.pop_front() {
                    g.evicted_sessions += 1;
                    if s.end.is_none() {
                        g.open.remove(&(s.jid, s.resource));
                    }
                }
            }
        }
    }

    /// Erases everything about one user (contract §8): their events go, their sessions become
    /// placeholders nothing shows. Returns (events, sessions) erased.
    pub fn erase(&self, jid: &UserJid) -> (usize, usize) {
        let mut g = self.lock();
        let before = g.events.len();
        g.events.retain(|(_, e)| e.jid != jid.as_str());
        let events = before - g.events.len();
        let mut sessions = 0;
        let placeholder = UserJid::parse("erased@erased.invalid").ok();
        for s in g.sessions.iter_mut().filter(|s| s.jid == *jid && !s.erased) {
            s.erased = true;
            if let Some(p) = &placeholder {
                s.jid = p.clone();
            }
            s.resource.clear();
            s.client = None;
            s.end_reason = None;
            sessions += 1;
        }
        g.open.retain(|(j, _), _| j != jid);
        (events, sessions)
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// True when nothing is kept yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions overlapping `[from, to)` (open ones last until `now`), optionally of one
    /// domain or one user, at most `max` (`None` = more than `max`).
    pub fn sessions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
        filter: &HistoryFilter,
        max: usize,
    ) -> Option<Vec<SessionRow>> {
        let g = self.lock();
        let mut out = Vec::new();
        for s in &g.sessions {
            if s.erased || s.start >= to || s.end.unwrap_or(now) <= from || !filter.matches(&s.jid)
            {
                continue;
            }
            if out.len() == max {
                return None;
            }
            out.push(SessionRow {
                span: Span {
                    jid: s.jid.clone(),
                    resource: s.resource.clone(),
                    client: s.client.clone(),
                    start: s.start,
                    end: s.end,
                },
                end_cause: s.end_cause.map(str::to_owned),
            });
        }
        Some(out)
    }

    /// Sessions overlapping `[from, to)` as the sessions export shows them, by start.
    pub fn export_sessions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
        filter: &HistoryFilter,
    ) -> Vec<super::reads::SessionExportRow> {
        let g = self.lock();
        let mut out: Vec<super::reads::SessionExportRow> = g
            .sessions
            .iter()
            .filter(|s| {
                !s.erased && s.start < to && s.end.unwrap_or(now) > from && filter.matches(&s.jid)
            })
            .map(|s| super::reads::SessionExportRow {
                id: uuid::Uuid::from_u128(s.id),
                jid: s.jid.as_str().to_owned(),
                resource: s.resource.clone(),
                client: s.client.clone(),
                start: s.start,
                end: s.end,
                end_cause: s
                    .end_reason
                    .clone()
                    .or_else(|| s.end_cause.map(str::to_owned)),
            })
            .collect();
        out.sort_by(|a, b| a.start.cmp(&b.start).then(a.id.cmp(&b.id)));
        out
    }

    /// Events in `[from, to)` matching `filter`, in time order (ties by id), at most `max`
    /// (`None` = more than `max`).
    pub fn events(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        filter: &HistoryFilter,
        max: usize,
    ) -> Option<Vec<StoredEvent>> {
        let g = self.lock();
        let mut out: Vec<StoredEvent> = Vec::new();
        for (_, e) in &g.events {
            if e.at < from || e.at >= to {
                continue;
            }
            if !UserJid::parse(&e.jid).is_ok_and(|j| filter.matches(&j)) {
                continue;
            }
            if out.len() == max {
                return None;
            }
            out.push(e.clone());
        }
        out.sort_by(|a, b| a.at.cmp(&b.at).then(a.id.cmp(&b.id)));
        Some(out)
    }

    /// The available/unavailable events of `users` in `[from, at]` (replay's inputs).
    pub fn state_events(
        &self,
        users: &std::collections::HashSet<UserJid>,
        from: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Vec<StateEvent> {
        let g = self.lock();
        g.events
            .iter()
            .filter(|(_, e)| e.at >= from && e.at <= at)
            .filter_map(|(_, e)| {
                let jid = UserJid::parse(&e.jid).ok()?;
                users.contains(&jid).then(|| StateEvent {
                    jid,
                    resource: e.resource.clone(),
                    at: e.at,
                    available: e.available,
                    show: e.show,
                    status: e.status.clone(),
                    priority: e.priority,
                    client: e.client.clone(),
                })
            })
            .collect()
    }
}

impl ChangeSink for MemoryHistory {
    fn accept(&self, a: Applied<'_>) {
        self.record(stored_events(a.event, a.before, &a.change.presence));
    }
}

/// Which users a history query covers: a token's domains, a `domain` parameter, a `jid`.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only these domains (the token's `domains` claim; `None` = all).
    pub token_domains: Option<Vec<String>>,
    /// Only this domain.
    pub domain: Option<String>,
    /// Only this user.
    pub jid: Option<UserJid>,
}

impl HistoryFilter {
    /// Does `jid` pass?
    pub fn matches(&self, jid: &UserJid) -> bool {
        self.token_domains
            .as_ref()
            .is_none_or(|ds| ds.iter().any(|d| d.eq_ignore_ascii_case(jid.domain())))
            && self
                .domain
                .as_ref()
                .is_none_or(|d| d.eq_ignore_ascii_case(jid.domain()))
            && self.jid.as_ref().is_none_or(|j| j == jid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Cause;
    use crate::presence::Show;
    use crate::store::UserAfter;

    fn ev(id: u128, jid: &str, res: &str, at: i64, open: bool) -> StoredEvent {
        StoredEvent {
            id,
            jid: jid.into(),
            resource: res.into(),
            available: open,
            show: open.then_some(Show::Chat),
            status: None,
            priority: open.then_some(0),
            client: Some("Gajim".into()),
            idle_since: None,
            at: DateTime::from_timestamp(at, 0).unwrap(),
            received_at: DateTime::from_timestamp(at, 0).unwrap(),
            cause: Cause::Stanza,
            opened: open,
            closed: !open,
            end_reason: None,
            user: UserAfter {
                online: open,
                online_since: None,
                last_seen: None,
                show: Show::Chat,
                status: None,
            },
        }
    }

    #[test]
    fn sessions_follow_events_and_are_evicted_with_them() {
        let h = MemoryHistory::new(3);
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        h.record(vec![ev(1, "a@x", "r", 10, true)]);
        h.record(vec![ev(2, "a@x", "r", 20, false)]);
        h.record(vec![ev(3, "b@x", "r", 30, true)]);
        let all = HistoryFilter::default();
        let s = h.sessions(t(0), t(100), t(50), &all, 10).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].span.start, s[0].span.end), (t(10), Some(t(20))));
        assert_eq!(s[0].end_cause.as_deref(), Some("stanza"));
        assert_eq!(s[1].span.end, None);
        // A fourth event pushes out the first, and the session it opened.
        h.record(vec![ev(4, "b@x", "r", 40, false)]);
        let s = h.sessions(t(0), t(100), t(50), &all, 10).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].span.jid.as_str(), "b@x");
        assert_eq!(s[0].span.end, Some(t(40)));
        assert!(
            h.sessions(t(0), t(100), t(50), &all, 0).is_none(),
            "over the bound"
        );
        let only_a = HistoryFilter {
            jid: Some(UserJid::parse("a@x").unwrap()),
            ..HistoryFilter::default()
        };
        assert_eq!(h.events(t(0), t(100), &only_a, 10).unwrap().len(), 1);
    }
}
