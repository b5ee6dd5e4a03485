//! The one event builder of the tests (engine events, and the writer's stored events).

use std::path::Path;

use presence_bridge::store::spool::Spool;
use presence_bridge::store::{StoredEvent, UserAfter};

use chrono::{DateTime, Utc};
use presence_bridge::presence::{Availability, Cause, EventKind, PresenceEvent, Show, UserJid};

/// An event `id` for `jid`/`resource` at `at`, as if read from a stanza.
pub fn event(
    id: u128,
    jid: &str,
    resource: &str,
    at: DateTime<Utc>,
    kind: EventKind,
) -> PresenceEvent {
    PresenceEvent {
        id,
        jid: UserJid::parse(jid).expect("test JID"),
        resource: resource.into(),
        kind,
        at,
        received_at: at,
        cause: Cause::Stanza,
    }
}

/// Available with `show`, `status`, `priority` and `client`.
pub fn available(show: Show, status: &str, priority: i8, client: Option<&str>) -> EventKind {
    EventKind::Available(Availability {
        show,
        status: Some(status.into()),
        priority,
        client: client.map(str::to_owned),
        idle_since: None,
    })
}

/// Unavailable with `status`.
pub fn unavailable(status: &str) -> EventKind {
    EventKind::Unavailable {
        status: Some(status.into()),
        reason: None,
    }
}

/// A stored "chat" event `id` of `jid` at `at` (as the writer queues it).
pub fn stored_event(id: u128, jid: &str, at: DateTime<Utc>) -> StoredEvent {
    StoredEvent {
        id,
        jid: jid.into(),
        resource: "r".into(),
        available: true,
        show: Some(Show::Chat),
        status: None,
        priority: Some(0),
        client: None,
        idle_since: None,
        at,
        received_at: at,
        cause: Cause::Stanza,
        opened: false,
        closed: false,
        end_reason: None,
        user: UserAfter {
            online: true,
            online_since: Some(at),
            last_seen: None,
            show: Show::Chat,
            status: None,
        },
    }
}

/// Writes `batches` into a fresh spool in `dir`, then cuts the last record short (a crash
/// mid-write), as a previous run would have left it.
pub fn torn_spool(dir: &Path, batches: &[Vec<StoredEvent>]) {
    let mut s = Spool::open(dir, 1 << 20).expect("spool");
    for b in batches {
        s.append(b).expect("append");
    }
    drop(s);
    let seg = std::fs::read_dir(dir)
        .expect("spool dir")
        .next()
        .expect("a segment")
        .expect("entry")
        .path();
    let len = std::fs::metadata(&seg).expect("segment").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(len - 10))
        .expect("truncate the segment");
}
