//! The presence rules as a pure function: previous state + event → new state (or nothing).
//!
//! Kept free of I/O and shared state so that the property tests can run it against a
//! reference model, and so that the sequencer stays a thin loop around it.

use chrono::{DateTime, Utc};

#[cfg(test)]
use super::model::UserJid;

use super::model::{EventKind, Op, PresenceEvent, ResourcePresence, Show, UserPresence};

/// The resource RFC 6121 would pick: highest priority, then most available, then most recent.
pub fn best_resource(resources: &[ResourcePresence]) -> Option<&ResourcePresence> {
    resources
        .iter()
        .max_by_key(|r| (r.priority, r.show.availability(), r.touched))
}

/// The earliest time `ev` may claim: a resource cannot have come online before the user was
/// last seen going offline (a stale or backdated `<delay>` stamp would otherwise rewrite
/// history and `online_since`). `Some(t)` when `ev.at` must move forward to `t`.
pub fn not_before(prev: Option<&UserPresence>, ev: &PresenceEvent) -> Option<DateTime<Utc>> {
    let p = prev?;
    let (EventKind::Available(_) | EventKind::Present(_)) = ev.kind else {
        return None;
    };
    if p.resources.iter().any(|r| r.resource == ev.resource) {
        return None;
    }
    p.last_seen.filter(|seen| *seen > ev.at)
}

/// Applies `ev` to `prev` (the user's current state, if known).
///
/// Returns `None` when the event changes nothing (a duplicate, an unavailable for a resource
/// that is not online); otherwise the kind of change and the complete new state. `touch` is the
/// engine's monotonically increasing counter used as the "most recent" tie-break.
pub fn apply(
    prev: Option<&UserPresence>,
    ev: &PresenceEvent,
    touch: u64,
) -> Option<(Op, UserPresence)> {
    let was_online = prev.is_some_and(|p| p.online);
    let mut resources: Vec<ResourcePresence> =
        prev.map(|p| p.resources.clone()).unwrap_or_default();
    let mut goodbye_status = None;

    match &ev.kind {
        EventKind::Present(_) if resources.iter().any(|r| r.resource == ev.resource) => {
            return None;
        }
        EventKind::Available(a) | EventKind::Present(a) => {
            match resources.iter_mut().find(|r| r.resource == ev.resource) {
                Some(r) => {
                    if r.show == a.show
                        && r.status == a.status
                        && r.priority == a.priority
                        && r.client == a.client
                        && r.idle_since == a.idle_since
                    {
                        return None;
                    }
                    r.show = a.show;
                    r.status.clone_from(&a.status);
                    r.priority = a.priority;
                    r.client.clone_from(&a.client);
                    r.idle_since = a.idle_since;
                    r.touched = touch;
                }
                None => {
                    resources.push(ResourcePresence {
                        resource: ev.resource.clone(),
                        show: a.show,
                        status: a.status.clone(),
                        priority: a.priority,
                        client: a.client.clone(),
                        since: ev.at,
                        idle_since: a.idle_since,
                        touched: touch,
                    });
                    resources.sort_by(|x, y| x.resource.cmp(&y.resource));
                }
            }
        }
        EventKind::Unavailable { status, reason } => {
            let pos = resources.iter().position(|r| r.resource == ev.resource)?;
            let gone = resources.remove(pos);
            // A server-generated unavailable says nothing of the user: keep what they said last.
            goodbye_status = match (status, reason) {
                (None, Some(_)) => gone.status,
                _ => status.clone(),
            };
        }
        EventKind::AllUnavailable { status } => {
            if resources.is_empty() {
                return None;
            }
            resources.clear();
            goodbye_status = status.clone();
        }
    }

    let last_change = match prev {
        Some(p) if p.last_change > ev.at => p.last_change,
        _ => ev.at,
    };
    let online = !resources.is_empty();
    let next = if online {
        let earliest: Option<DateTime<Utc>> = resources.iter().map(|r| r.since).min();
        let online_since = match (was_online, prev.and_then(|p| p.online_since)) {
            (true, Some(s)) => earliest.map_or(s, |e| e.min(s)),
            _ => earliest.unwrap_or(ev.at),
        };
        let best = best_resource(&resources)?;
        UserPresence {
            jid: ev.jid.clone(),
            online: true,
            show: best.show,
            status: best.status.clone(),
            priority: best.priority,
            online_since: Some(online_since),
            last_change,
            last_seen: None,
            resources,
        }
    } else {
        UserPresence {
            jid: ev.jid.clone(),
            online: false,
            show: Show::Offline,
            status: goodbye_status,
            priority: 0,
            online_since: None,
            last_change,
            last_seen: Some(ev.at),
            resources,
        }
    };
    let op = match (was_online, online) {
        (false, true) => Op::Online,
        (true, true) => Op::Update,
        (true, false) => Op::Offline,
        (false, false) => return None,
    };
    Some((op, next))
}

/// Convenience for tests and tools: a `UserJid` that must parse.
#[cfg(test)]
pub(crate) fn jid(s: &str) -> UserJid {
    UserJid::parse(s).unwrap_or_else(|e| panic!("bad test jid {s}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::model::{Availability, Cause};
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .unwrap_or_default()
    }

    fn avail(res: &str, show: Show, prio: i8, status: &str, at: i64) -> PresenceEvent {
        PresenceEvent {
            id: at as u128,
            jid: jid("alice@localhost"),
            resource: res.into(),
            kind: EventKind::Available(Availability {
                show,
                status: Some(status.into()),
                priority: prio,
                client: None,
                idle_since: None,
            }),
            at: t(at),
            received_at: t(at),
            cause: Cause::Stanza,
        }
    }

    fn gone(res: &str, at: i64) -> PresenceEvent {
        PresenceEvent {
            id: at as u128,
            jid: jid("alice@localhost"),
            resource: res.into(),
            kind: EventKind::Unavailable {
                status: Some("bye".into()),
                reason: None,
            },
            at: t(at),
            received_at: t(at),
            cause: Cause::Stanza,
        }
    }

    #[test]
    fn present_only_brings_a_resource_online_never_overwrites_it() {
        let mut confirm = avail("phone", Show::Available, 0, "", 300);
        let EventKind::Available(a) = confirm.kind.clone() else {
            unreachable!()
        };
        confirm.kind = EventKind::Present(Availability { status: None, ..a });
        // XMPP said away first: the event pusher's "present" changes nothing.
        let (_, away) = apply(None, &avail("phone", Show::Away, 0, "lunch", 100), 1).expect("on");
        assert!(apply(Some(&away), &confirm, 2).is_none());
        // Nothing known yet: it brings the resource online as available.
        let (op, on) = apply(None, &confirm, 3).expect("on");
        assert_eq!(
            (op, on.show, on.online),
            (Op::Online, Show::Available, true)
        );
        // And XMPP's later word still wins.
        let (op, away) =
            apply(Some(&on), &avail("phone", Show::Away, 0, "lunch", 400), 4).expect("update");
        assert_eq!((op, away.show), (Op::Update, Show::Away));
    }

    #[test]
    fn a_server_generated_unavailable_keeps_the_users_last_status() {
        let (_, online) =
            apply(None, &avail("phone", Show::Away, 0, "In a meeting", 100), 1).expect("on");
        let mut dropped = gone("phone", 200);
        dropped.kind = EventKind::Unavailable {
            status: None,
            reason: Some("socket_closed".into()),
        };
        let (op, offline) = apply(Some(&online), &dropped, 2).expect("off");
        assert_eq!(op, Op::Offline);
        assert_eq!(offline.status.as_deref(), Some("In a meeting"));
        // A user's own goodbye text still wins.
        let (_, offline) = apply(Some(&online), &gone("phone", 200), 2).expect("off");
        assert_eq!(offline.status.as_deref(), Some("bye"));
    }

    #[test]
    fn a_stamp_before_the_last_offline_is_moved_to_it() {
        let (_, online) = apply(None, &avail("phone", Show::Chat, 0, "hi", 100), 1).expect("on");
        let (_, offline) = apply(Some(&online), &gone("phone", 200), 2).expect("off");
        // A probe answer stamped long before the user was last seen offline.
        let stale = avail("laptop", Show::Away, 0, "old", 50);
        assert_eq!(not_before(Some(&offline), &stale), Some(t(200)));
        assert_eq!(
            not_before(Some(&offline), &avail("laptop", Show::Away, 0, "new", 300)),
            None
        );
        assert_eq!(not_before(None, &stale), None);
        // An update of a resource that is online keeps its own `since`.
        let (_, back) =
            apply(Some(&offline), &avail("laptop", Show::Away, 0, "x", 300), 3).expect("back");
        assert_eq!(
            not_before(Some(&back), &avail("laptop", Show::Dnd, 0, "y", 10)),
            None
        );
    }

    #[test]
    fn lab_sequence() {
        // The lab client's script: phone chat/5, laptop available/10, phone→away,
        // laptop→dnd, laptop status text, phone leaves, laptop leaves.
        let (op, s) =
            apply(None, &avail("phone", Show::Chat, 5, "on my phone", 1), 1).expect("change");
        assert_eq!(op, Op::Online);
        assert_eq!((s.show, s.priority), (Show::Chat, 5));
        assert_eq!(s.online_since, Some(t(1)));

        let (op, s) = apply(
            Some(&s),
            &avail("laptop", Show::Available, 10, "at my desk", 2),
            2,
        )
        .expect("change");
        assert_eq!(op, Op::Update);
        assert_eq!(
            (s.show, s.priority, s.status.as_deref()),
            (Show::Available, 10, Some("at my desk"))
        );
        assert_eq!(s.resources.len(), 2);
        assert_eq!(s.online_since, Some(t(1)));

        // duplicate: no change
        assert!(
            apply(
                Some(&s),
                &avail("laptop", Show::Available, 10, "at my desk", 3),
                3
            )
            .is_none()
        );

        let (_, s) =
            apply(Some(&s), &avail("phone", Show::Away, 5, "walking", 4), 4).expect("change");
        assert_eq!(s.show, Show::Available, "laptop (prio 10) still wins");
        let (_, s) = apply(
            Some(&s),
            &avail("laptop", Show::Dnd, 10, "in a meeting", 5),
            5,
        )
        .expect("change");
        assert_eq!(
            (s.show, s.status.as_deref()),
            (Show::Dnd, Some("in a meeting"))
        );
        let (_, s) = apply(
            Some(&s),
            &avail("laptop", Show::Dnd, 10, "meeting until 15:00", 6),
            6,
        )
        .expect("change");
        assert_eq!(s.status.as_deref(), Some("meeting until 15:00"));
        assert_eq!(s.last_change, t(6));

        let (op, s) = apply(Some(&s), &gone("phone", 7), 7).expect("change");
        assert_eq!(op, Op::Update);
        assert_eq!(s.resources.len(), 1);
        assert!(
            apply(Some(&s), &gone("phone", 8), 8).is_none(),
            "second unavailable is a no-op"
        );

        let (op, s) = apply(Some(&s), &gone("laptop", 9), 9).expect("change");
        assert_eq!(op, Op::Offline);
        assert_eq!((s.online, s.show, s.priority), (false, Show::Offline, 0));
        assert_eq!(s.last_seen, Some(t(9)));
        assert_eq!(s.online_since, None);
        assert_eq!(s.status.as_deref(), Some("bye"));
        assert!(s.resources.is_empty());
    }

    #[test]
    fn ties_break_by_show_then_recency() {
        let (_, s) = apply(None, &avail("a", Show::Away, 0, "a", 1), 1).expect("change");
        let (_, s) = apply(Some(&s), &avail("b", Show::Chat, 0, "b", 2), 2).expect("change");
        assert_eq!(
            s.status.as_deref(),
            Some("b"),
            "chat beats away at equal priority"
        );
        let (_, s) = apply(Some(&s), &avail("c", Show::Chat, 0, "c", 3), 3).expect("change");
        assert_eq!(
            s.status.as_deref(),
            Some("c"),
            "most recent wins a full tie"
        );
        let (_, s) = apply(Some(&s), &avail("b", Show::Chat, 0, "b2", 4), 4).expect("change");
        assert_eq!(s.status.as_deref(), Some("b2"));
        let (_, s) = apply(Some(&s), &avail("a", Show::Dnd, 1, "a2", 5), 5).expect("change");
        assert_eq!(s.status.as_deref(), Some("a2"), "priority beats show");
    }

    #[test]
    fn negative_priority_still_counts_as_online() {
        let (op, s) = apply(None, &avail("bot", Show::Available, -5, "x", 1), 1).expect("change");
        assert_eq!(op, Op::Online);
        assert_eq!(s.priority, -5);
    }

    #[test]
    fn unavailable_of_unknown_user_is_no_change() {
        assert!(apply(None, &gone("phone", 1), 1).is_none());
    }
}
