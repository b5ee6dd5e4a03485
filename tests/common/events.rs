//! The one event builder of the tests.

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
    }
}
