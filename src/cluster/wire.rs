//! What travels on the cluster stream: one JSON message per batch of changes, and a `term`
//! message each time a replica takes over as leader (it fences the old leader: see
//! `docs/architecture.md` § Replicas).
//!
//! The shapes here are the replicas' own, not the public contract: they carry what a
//! follower needs to be exactly the leader's state (the resources' tie-break order, the event
//! behind each change for the sinks a new leader replays), and are checked on the way in.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::presence::{
    Availability, Cause, Change, Entry, EventKind, Op, PresenceEvent, ResourcePresence, Show,
    UserJid, UserPresence,
};

/// One message of the stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// Changes, in seq order, gap-free within the message.
    Changes {
        /// The leader that sequenced them.
        node: String,
        /// The cluster's epoch.
        epoch: String,
        /// The changes.
        changes: Vec<WireChange>,
    },
    /// A replica became leader; its changes continue after `seq`.
    Term {
        /// The new leader.
        node: String,
        /// The cluster's epoch.
        epoch: String,
        /// The last seq before its first change.
        seq: u64,
    },
}

/// A change and the event behind it.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireChange {
    seq: u64,
    op: Op,
    p: WirePresence,
    /// When the leader read the stanza (end-to-end latency on every replica).
    rx: DateTime<Utc>,
    /// `None`: an erasure.
    ev: Option<WireEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WirePresence {
    jid: UserJid,
    online: bool,
    show: Show,
    status: Option<String>,
    prio: i8,
    since: Option<DateTime<Utc>>,
    changed: DateTime<Utc>,
    seen: Option<DateTime<Utc>>,
    res: Vec<WireResource>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireResource {
    r: String,
    show: Show,
    status: Option<String>,
    prio: i8,
    client: Option<String>,
    since: DateTime<Utc>,
    idle: Option<DateTime<Utc>>,
    /// The leader's tie-break order ("most recent" among equal priorities).
    t: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireEvent {
    /// The event id, as 32 hex digits.
    id: String,
    r: String,
    kind: WireKind,
    at: DateTime<Utc>,
    rx: DateTime<Utc>,
    cause: Cause,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum WireKind {
    Available(WireAvail),
    Present(WireAvail),
    Unavailable {
        status: Option<String>,
        reason: Option<String>,
    },
    All {
        status: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct WireAvail {
    show: Show,
    status: Option<String>,
    prio: i8,
    client: Option<String>,
    idle: Option<DateTime<Utc>>,
}

/// A message that is not what a replica sends.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not JSON of the expected shape.
    #[error("undecodable stream message: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not consistent.
    #[error("inconsistent stream message: {0}")]
    Invalid(&'static str),
}

/// Encodes a batch of entries.
pub fn encode_changes(node: &str, epoch: &str, entries: &[Entry]) -> Vec<u8> {
    let msg = Message::Changes {
        node: node.to_owned(),
        epoch: epoch.to_owned(),
        changes: entries.iter().map(to_wire).collect(),
    };
    // Serialising plain data to a Vec cannot fail.
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// Encodes a term message.
pub fn encode_term(node: &str, epoch: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Message::Term {
        node: node.to_owned(),
        epoch: epoch.to_owned(),
        seq,
    })
    .unwrap_or_default()
}

/// Decodes a message (its changes still in wire form: see [`entries`]).
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    Ok(serde_json::from_slice(payload)?)
}

/// The entries of a `changes` message, checked: gap-free seqs, a change's user is its
/// presence's user, an event's user is the change's.
pub fn entries(changes: Vec<WireChange>) -> Result<Vec<Entry>, WireError> {
    let mut out = Vec::with_capacity(changes.len());
    let mut last: Option<u64> = None;
    for c in changes {
        if last.is_some_and(|l| c.seq != l + 1) {
            return Err(WireError::Invalid("seqs not consecutive"));
        }
        last = Some(c.seq);
        out.push(from_wire(c)?);
    }
    Ok(out)
}

fn to_wire(e: &Entry) -> WireChange {
    let c = &e.change;
    WireChange {
        seq: c.seq,
        op: c.op,
        p: wire_presence(&c.presence),
        rx: c.received_at,
        ev: e.event.as_deref().map(event_to_wire),
    }
}

fn from_wire(w: WireChange) -> Result<Entry, WireError> {
    let presence = presence_from_wire(w.p);
    let jid = presence.jid.clone();
    let event = match w.ev {
        Some(ev) => Some(Arc::new(event_from_wire(ev, jid.clone())?)),
        None => None,
    };
    Ok(Entry {
        change: Arc::new(Change {
            seq: w.seq,
            jid,
            op: w.op,
            presence: Arc::new(presence),
            received_at: w.rx,
            encoded: Default::default(),
        }),
        event,
    })
}

fn wire_presence(p: &UserPresence) -> WirePresence {
    WirePresence {
        jid: p.jid.clone(),
        online: p.online,
        show: p.show,
        status: p.status.clone(),
        prio: p.priority,
        since: p.online_since,
        changed: p.last_change,
        seen: p.last_seen,
        res: p
            .resources
            .iter()
            .map(|r| WireResource {
                r: r.resource.clone(),
                show: r.show,
                status: r.status.clone(),
                prio: r.priority,
                client: r.client.clone(),
                since: r.since,
                idle: r.idle_since,
                t: r.touched,
            })
            .collect(),
    }
}

fn presence_from_wire(w: WirePresence) -> UserPresence {
    UserPresence {
        jid: w.jid,
        online: w.online,
        show: w.show,
        status: w.status,
        priority: w.prio,
        online_since: w.since,
        last_change: w.changed,
        last_seen: w.seen,
        resources: w
            .res
            .into_iter()
            .map(|r| ResourcePresence {
                resource: r.r,
                show: r.show,
                status: r.status,
                priority: r.prio,
                client: r.client,
                since: r.since,
                idle_since: r.idle,
                touched: r.t,
            })
            .collect(),
    }
}

fn event_to_wire(e: &PresenceEvent) -> WireEvent {
    let avail = |a: &Availability| WireAvail {
        show: a.show,
        status: a.status.clone(),
        prio: a.priority,
        client: a.client.clone(),
        idle: a.idle_since,
    };
    WireEvent {
        id: format!("{:032x}", e.id),
        r: e.resource.clone(),
        kind: match &e.kind {
            EventKind::Available(a) => WireKind::Available(avail(a)),
            EventKind::Present(a) => WireKind::Present(avail(a)),
            EventKind::Unavailable { status, reason } => WireKind::Unavailable {
                status: status.clone(),
                reason: reason.clone(),
            },
            EventKind::AllUnavailable { status } => WireKind::All {
                status: status.clone(),
            },
        },
        at: e.at,
        rx: e.received_at,
        cause: e.cause,
    }
}

fn event_from_wire(w: WireEvent, jid: UserJid) -> Result<PresenceEvent, WireError> {
    let avail = |a: WireAvail| Availability {
        show: a.show,
        status: a.status,
        priority: a.prio,
        client: a.client,
        idle_since: a.idle,
    };
    let id = u128::from_str_radix(&w.id, 16).map_err(|_| WireError::Invalid("event id"))?;
    Ok(PresenceEvent {
        id,
        jid,
        resource: w.r,
        kind: match w.kind {
            WireKind::Available(a) => EventKind::Available(avail(a)),
            WireKind::Present(a) => EventKind::Present(avail(a)),
            WireKind::Unavailable { status, reason } => EventKind::Unavailable { status, reason },
            WireKind::All { status } => EventKind::AllUnavailable { status },
        },
        at: w.at,
        received_at: w.rx,
        cause: w.cause,
    })
}

/// A snapshot of every known user at one seq (what a late replica starts from).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotDoc {
    /// The cluster's epoch.
    pub epoch: String,
    /// The last change included.
    pub seq: u64,
    /// A stream sequence at or before the message holding change `seq + 1`: a replica
    /// loading this snapshot consumes from there (and skips what it already has).
    pub stream_from: u64,
    users: Vec<WirePresence>,
}

impl SnapshotDoc {
    /// A snapshot of `users` at `seq`.
    pub fn new(epoch: &str, seq: u64, stream_from: u64, users: &[Arc<UserPresence>]) -> Self {
        Self {
            epoch: epoch.to_owned(),
            seq,
            stream_from,
            users: users.iter().map(|u| wire_presence(u)).collect(),
        }
    }

    /// How many users it holds.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The users.
    pub fn into_users(self) -> Vec<UserPresence> {
        self.users.into_iter().map(presence_from_wire).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(jid: &UserJid, kind: EventKind) -> PresenceEvent {
        let at = Utc::now();
        PresenceEvent {
            id: crate::presence::model::new_event_id(),
            jid: jid.clone(),
            resource: "phone".into(),
            kind,
            at,
            received_at: at,
            cause: Cause::Probe,
        }
    }

    #[test]
    fn a_batch_survives_the_wire_with_everything_a_follower_needs() {
        let c = Change::for_test(7, "alice@example.com", "hi", 0);
        let mut p = (*c.presence).clone();
        for r in &mut p.resources {
            r.touched = 41;
        }
        let c = Arc::new(Change {
            presence: Arc::new(p),
            ..(*c).clone()
        });
        let ev = event(
            &c.jid,
            EventKind::Available(Availability {
                show: Show::Dnd,
                status: Some("busy".into()),
                priority: -3,
                client: Some("Conversations".into()),
                idle_since: Some(Utc::now()),
            }),
        );
        let gone = Arc::new(Change {
            seq: 8,
            ..(*c).clone()
        });
        let entries_in = vec![
            Entry {
                change: c.clone(),
                event: Some(Arc::new(ev.clone())),
            },
            Entry {
                change: gone,
                event: None,
            },
        ];
        let bytes = encode_changes("a", "e1", &entries_in);
        let Message::Changes {
            node,
            epoch,
            changes,
        } = decode(&bytes).unwrap()
        else {
            panic!("not a changes message")
        };
        assert_eq!((node.as_str(), epoch.as_str()), ("a", "e1"));
        let out = entries(changes).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(*out[0].change.presence, *c.presence);
        assert_eq!(out[0].change.presence.resources[0].touched, 41);
        assert_eq!(out[0].change.seq, 7);
        assert_eq!(out[0].event.as_deref(), Some(&ev));
        assert!(out[1].is_erasure());
    }

    #[test]
    fn gaps_inside_a_message_and_garbage_are_refused() {
        let a = Entry {
            change: Change::for_test(1, "a@example.com", "x", 0),
            event: None,
        };
        let b = Entry {
            change: Change::for_test(3, "b@example.com", "x", 0),
            event: None,
        };
        let Message::Changes { changes, .. } = decode(&encode_changes("n", "e", &[a, b])).unwrap()
        else {
            panic!("not a changes message")
        };
        assert!(matches!(entries(changes), Err(WireError::Invalid(_))));
        assert!(decode(b"{\"type\":\"changes\"}").is_err());
        assert!(decode(b"\xff").is_err());
        let Message::Term { seq, .. } = decode(&encode_term("n", "e", 9)).unwrap() else {
            panic!("not a term")
        };
        assert_eq!(seq, 9);
    }
}
