//! What travels on the cluster stream: one JSON message per batch of changes, and a `term`
//! message each time a replica takes over as leader (it fences the old leader: see
//! `docs/architecture.md` § Replicas).
//!
//! The shapes here are the replicas' own, not the public contract: they carry what a
//! follower needs to be exactly the leader's state (the resources' tie-break order, the event
//! behind each change for the sinks a new leader replays), and are checked on the way in.

use std::sync::Arc;

use chrono::serde::{ts_nanoseconds, ts_nanoseconds_option};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::presence::{
    Availability, Cause, Change, Entry, EventKind, Op, PresenceEvent, ResourcePresence, Show,
    UserJid, UserPresence,
};

/// One message of the stream, as read.
#[derive(Debug)]
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

/// The message's JSON, read without buffering (an internally tagged enum made serde buffer
/// every message into an intermediate tree first: half a follower's time).
#[derive(Deserialize)]
struct MessageIn {
    #[serde(rename = "type")]
    kind: MessageKind,
    node: String,
    epoch: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    changes: Option<Vec<WireChange>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum MessageKind {
    Changes,
    Term,
}

/// The same message, as written: borrowed from the engine's changes (no copies), times as
/// integer nanoseconds (chrono's RFC 3339 text was most of the encoding's cost).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Out<'a> {
    Changes {
        node: &'a str,
        epoch: &'a str,
        changes: Vec<OutChange<'a>>,
    },
    Term {
        node: &'a str,
        epoch: &'a str,
        seq: u64,
    },
}

/// A change and the event behind it.
#[derive(Debug, Deserialize)]
pub struct WireChange {
    seq: u64,
    op: Op,
    p: WirePresence,
    /// When the leader read the stanza (end-to-end latency on every replica).
    #[serde(with = "ts_nanoseconds")]
    rx: DateTime<Utc>,
    /// `None`: an erasure.
    ev: Option<WireEvent>,
}

#[derive(Serialize)]
struct OutChange<'a> {
    seq: u64,
    op: Op,
    p: OutPresence<'a>,
    #[serde(with = "ts_nanoseconds")]
    rx: DateTime<Utc>,
    ev: Option<OutEvent<'a>>,
}

#[derive(Debug, Deserialize)]
struct WirePresence {
    jid: UserJid,
    online: bool,
    show: Show,
    status: Option<String>,
    prio: i8,
    #[serde(with = "ts_nanoseconds_option")]
    since: Option<DateTime<Utc>>,
    #[serde(with = "ts_nanoseconds")]
    changed: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds_option")]
    seen: Option<DateTime<Utc>>,
    res: Vec<WireResource>,
}

#[derive(Serialize)]
struct OutPresence<'a> {
    jid: &'a str,
    online: bool,
    show: Show,
    status: Option<&'a str>,
    prio: i8,
    #[serde(with = "ts_nanoseconds_option")]
    since: Option<DateTime<Utc>>,
    #[serde(with = "ts_nanoseconds")]
    changed: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds_option")]
    seen: Option<DateTime<Utc>>,
    res: Vec<OutResource<'a>>,
}

#[derive(Debug, Deserialize)]
struct WireResource {
    r: String,
    show: Show,
    status: Option<String>,
    prio: i8,
    client: Option<String>,
    #[serde(with = "ts_nanoseconds")]
    since: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds_option")]
    idle: Option<DateTime<Utc>>,
    /// The leader's tie-break order ("most recent" among equal priorities).
    t: u64,
}

#[derive(Serialize)]
struct OutResource<'a> {
    r: &'a str,
    show: Show,
    status: Option<&'a str>,
    prio: i8,
    client: Option<&'a str>,
    #[serde(with = "ts_nanoseconds")]
    since: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds_option")]
    idle: Option<DateTime<Utc>>,
    t: u64,
}

/// An event: its kind (`k`) and that kind's fields side by side (no nested tagged enum:
/// serde would buffer it).
#[derive(Debug, Deserialize)]
struct WireEvent {
    /// The event id's high and low 64 bits (JSON numbers stop short of a u128).
    id: [u64; 2],
    r: String,
    k: Kind,
    show: Option<Show>,
    status: Option<String>,
    prio: Option<i8>,
    client: Option<String>,
    #[serde(default, with = "ts_nanoseconds_option")]
    idle: Option<DateTime<Utc>>,
    reason: Option<String>,
    #[serde(with = "ts_nanoseconds")]
    at: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds")]
    rx: DateTime<Utc>,
    cause: Cause,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Available,
    Present,
    Unavailable,
    All,
}

#[derive(Serialize)]
struct OutEvent<'a> {
    id: [u64; 2],
    r: &'a str,
    k: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    show: Option<Show>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prio: Option<i8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "ts_nanoseconds_option"
    )]
    idle: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(with = "ts_nanoseconds")]
    at: DateTime<Utc>,
    #[serde(with = "ts_nanoseconds")]
    rx: DateTime<Utc>,
    cause: Cause,
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
    let msg = Out::Changes {
        node,
        epoch,
        changes: entries.iter().map(to_wire).collect(),
    };
    // Serialising plain data to a Vec cannot fail.
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// Encodes a term message.
pub fn encode_term(node: &str, epoch: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Out::Term { node, epoch, seq }).unwrap_or_default()
}

/// Decodes a message (its changes still in wire form: see [`entries`]).
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    let m: MessageIn = serde_json::from_slice(payload)?;
    Ok(match m.kind {
        MessageKind::Changes => Message::Changes {
            node: m.node,
            epoch: m.epoch,
            changes: m
                .changes
                .ok_or(WireError::Invalid("changes without changes"))?,
        },
        MessageKind::Term => Message::Term {
            node: m.node,
            epoch: m.epoch,
            seq: m.seq.ok_or(WireError::Invalid("term without seq"))?,
        },
    })
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

fn to_wire(e: &Entry) -> OutChange<'_> {
    let c = &e.change;
    OutChange {
        seq: c.seq,
        op: c.op,
        p: out_presence(&c.presence),
        rx: c.received_at,
        ev: e.event.as_deref().map(out_event),
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

fn out_presence(p: &UserPresence) -> OutPresence<'_> {
    OutPresence {
        jid: p.jid.as_str(),
        online: p.online,
        show: p.show,
        status: p.status.as_deref(),
        prio: p.priority,
        since: p.online_since,
        changed: p.last_change,
        seen: p.last_seen,
        res: p
            .resources
            .iter()
            .map(|r| OutResource {
                r: &r.resource,
                show: r.show,
                status: r.status.as_deref(),
                prio: r.priority,
                client: r.client.as_deref(),
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

fn out_event(e: &PresenceEvent) -> OutEvent<'_> {
    let mut o = OutEvent {
        id: [(e.id >> 64) as u64, e.id as u64],
        r: &e.resource,
        k: Kind::All,
        show: None,
        status: None,
        prio: None,
        client: None,
        idle: None,
        reason: None,
        at: e.at,
        rx: e.received_at,
        cause: e.cause,
    };
    match &e.kind {
        EventKind::Available(a) | EventKind::Present(a) => {
            o.k = if matches!(e.kind, EventKind::Present(_)) {
                Kind::Present
            } else {
                Kind::Available
            };
            o.show = Some(a.show);
            o.status = a.status.as_deref();
            o.prio = Some(a.priority);
            o.client = a.client.as_deref();
            o.idle = a.idle_since;
        }
        EventKind::Unavailable { status, reason } => {
            o.k = Kind::Unavailable;
            o.status = status.as_deref();
            o.reason = reason.as_deref();
        }
        EventKind::AllUnavailable { status } => o.status = status.as_deref(),
    }
    o
}

fn event_from_wire(w: WireEvent, jid: UserJid) -> Result<PresenceEvent, WireError> {
    let avail = |w: &mut WireEvent| -> Result<Availability, WireError> {
        Ok(Availability {
            show: w
                .show
                .ok_or(WireError::Invalid("an available event without show"))?,
            status: w.status.take(),
            priority: w.prio.unwrap_or(0),
            client: w.client.take(),
            idle_since: w.idle,
        })
    };
    let mut w = w;
    let kind = match w.k {
        Kind::Available => EventKind::Available(avail(&mut w)?),
        Kind::Present => EventKind::Present(avail(&mut w)?),
        Kind::Unavailable => EventKind::Unavailable {
            status: w.status.take(),
            reason: w.reason.take(),
        },
        Kind::All => EventKind::AllUnavailable {
            status: w.status.take(),
        },
    };
    Ok(PresenceEvent {
        id: (u128::from(w.id[0]) << 64) | u128::from(w.id[1]),
        jid,
        resource: w.r,
        kind,
        at: w.at,
        received_at: w.rx,
        cause: w.cause,
    })
}

/// A snapshot of every known user at one seq (what a late replica starts from), as read.
#[derive(Debug, Deserialize)]
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

#[derive(Serialize)]
struct OutSnapshot<'a> {
    epoch: &'a str,
    seq: u64,
    stream_from: u64,
    users: Vec<OutPresence<'a>>,
}

/// Encodes a snapshot of `users` at `seq`.
pub fn encode_snapshot(
    epoch: &str,
    seq: u64,
    stream_from: u64,
    users: &[Arc<UserPresence>],
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&OutSnapshot {
        epoch,
        seq,
        stream_from,
        users: users.iter().map(|u| out_presence(u)).collect(),
    })
}

impl SnapshotDoc {
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
        p.resources.push(ResourcePresence {
            resource: "phone".into(),
            show: Show::Away,
            status: Some("hi".into()),
            priority: 3,
            client: Some("Gajim".into()),
            since: Utc::now(),
            idle_since: Some(Utc::now()),
            touched: 41,
        });
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
