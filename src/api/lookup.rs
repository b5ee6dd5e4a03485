//! Last-seen and history answers (contract §4): the live map first (exact for this run), then
//! Postgres rows, shaped for JSON here rather than in the store.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::presence::model::rfc3339_millis;
use crate::presence::{Engine, UserJid, UserPresence};
use crate::store::reads::{self, HistoryEvent, HistoryPage, HistoryQuery, LastSeenRow};
use crate::store::{StoreError, StoreHandle};

/// `GET /api/v1/last-seen/{jid}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LastSeen {
    /// Bare JID.
    pub jid: String,
    /// Online now.
    pub online: bool,
    /// Since when (online only).
    #[serde(with = "rfc3339_millis::option")]
    pub online_since: Option<DateTime<Utc>>,
    /// When the last resource left (offline only).
    #[serde(with = "rfc3339_millis::option")]
    pub last_seen: Option<DateTime<Utc>>,
    /// Seconds since `last_seen`; 0 while online (XEP-0012 style).
    pub seconds_ago: i64,
    /// Current (or last) status text.
    pub status: Option<String>,
}

impl LastSeen {
    fn from_presence(p: &UserPresence, now: DateTime<Utc>) -> LastSeen {
        LastSeen {
            jid: p.jid.to_string(),
            online: p.online,
            online_since: p.online_since,
            last_seen: p.last_seen,
            seconds_ago: seconds_ago(p.online, p.last_seen, now),
            status: p.status.clone(),
        }
    }

    fn from_row(r: LastSeenRow, now: DateTime<Utc>) -> LastSeen {
        LastSeen {
            seconds_ago: seconds_ago(r.online, r.last_seen, now),
            jid: r.jid,
            online: r.online,
            online_since: r.online_since,
            last_seen: r.last_seen,
            status: r.status,
        }
    }
}

fn seconds_ago(online: bool, last_seen: Option<DateTime<Utc>>, now: DateTime<Utc>) -> i64 {
    if online {
        0
    } else {
        last_seen.map_or(0, |t| (now - t).num_seconds().max(0))
    }
}

/// Last-seen of one user (the hot path: no allocation beyond the answer when it is in memory).
pub async fn last_seen_one(
    engine: &Engine,
    store: Option<&StoreHandle>,
    jid: &UserJid,
) -> Result<Option<LastSeen>, StoreError> {
    let now = Utc::now();
    if let Some(p) = engine.get(jid) {
        return Ok(Some(LastSeen::from_presence(&p, now)));
    }
    let Some(store) = store else { return Ok(None) };
    let row = reads::last_seen(store.pool(), &[jid.as_str()]).await?.pop();
    Ok(row.map(|r| LastSeen::from_row(r, now)))
}

/// Last-seen of many users: the known ones (in request order) and the unknown JIDs.
pub async fn last_seen(
    engine: &Engine,
    store: Option<&StoreHandle>,
    jids: &[UserJid],
) -> Result<(Vec<LastSeen>, Vec<UserJid>), StoreError> {
    let now = Utc::now();
    let mut found: HashMap<&str, LastSeen> = HashMap::with_capacity(jids.len());
    let mut ask: Vec<&str> = Vec::new();
    for j in jids {
        match engine.get(j) {
            Some(p) => {
                found.insert(j.as_str(), LastSeen::from_presence(&p, now));
            }
            None => ask.push(j.as_str()),
        }
    }
    if let Some(store) = store {
        let rows = reads::last_seen(store.pool(), &ask).await?;
        // Rows come back in any order; key them by the request's own JID text.
        let asked: HashSet<&str> = ask.iter().copied().collect();
        for r in rows {
            if let Some(key) = asked.get(r.jid.as_str()) {
                found.insert(key, LastSeen::from_row(r, now));
            }
        }
    }
    let mut results = Vec::with_capacity(found.len());
    let mut unknown = Vec::new();
    for j in jids {
        match found.remove(j.as_str()) {
            Some(ls) => results.push(ls),
            None => unknown.push(j.clone()),
        }
    }
    Ok((results, unknown))
}

/// A page of history (contract §4): the store's rows, written in the contract's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HistoryBody {
    /// Events in the requested order.
    #[serde(serialize_with = "history_events")]
    #[schema(value_type = Vec<HistoryEntry>)]
    pub events: Vec<HistoryEvent>,
    /// Cursor for the next page, if there is one.
    pub next_cursor: Option<String>,
}

impl From<HistoryPage> for HistoryBody {
    fn from(p: HistoryPage) -> Self {
        HistoryBody {
            events: p.events,
            next_cursor: p.next_cursor,
        }
    }
}

/// The shape [`history_events`] writes, for the OpenAPI document only.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct HistoryEntry {
    /// When it happened (RFC 3339, milliseconds).
    at: DateTime<Utc>,
    /// Resource.
    resource: String,
    /// `available` or `unavailable`.
    #[schema(pattern = "^(available|unavailable)$")]
    kind: String,
    /// Show of an available event.
    show: Option<crate::presence::Show>,
    /// Status text.
    status: Option<String>,
    /// Priority of an available event.
    priority: Option<i16>,
    /// Why: `stanza`, `probe`, `resync`, `shutdown`.
    cause: String,
}

/// `{"at","resource","kind","show","status","priority","cause"}` per row; `cause` (stanza,
/// probe, resync, shutdown) is an extension of the contract's shape.
fn history_events<S: Serializer>(rows: &[HistoryEvent], s: S) -> Result<S::Ok, S::Error> {
    struct Row<'a>(&'a HistoryEvent);
    impl Serialize for Row<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let e = self.0;
            let mut m = s.serialize_struct("HistoryEvent", 7)?;
            m.serialize_field("at", &e.at.to_rfc3339_opts(SecondsFormat::Millis, true))?;
            m.serialize_field("resource", &e.resource)?;
            m.serialize_field("kind", &e.kind)?;
            m.serialize_field("show", &e.show)?;
            m.serialize_field("status", &e.status)?;
            m.serialize_field("priority", &e.priority)?;
            m.serialize_field("cause", &e.cause)?;
            m.end()
        }
    }
    s.collect_seq(rows.iter().map(Row))
}

/// One user's history page from Postgres.
pub async fn history(
    store: &StoreHandle,
    jid: &UserJid,
    q: &HistoryQuery,
) -> Result<HistoryBody, StoreError> {
    Ok(reads::history(store.pool(), jid, q).await?.into())
}

/// One user's history page from this run's in-memory history (memory-only mode): the same
/// shape, order, paging and cursors as from Postgres.
pub fn history_memory(
    h: &crate::store::memory::MemoryHistory,
    jid: &UserJid,
    q: &HistoryQuery,
) -> Result<HistoryBody, StoreError> {
    let cursor = q
        .cursor
        .as_deref()
        .map(reads::parse_event_cursor)
        .transpose()?;
    let filter = crate::store::memory::HistoryFilter {
        jid: Some(jid.clone()),
        ..Default::default()
    };
    let from = q.from.unwrap_or(DateTime::<Utc>::MIN_UTC);
    let to = q.to.unwrap_or(DateTime::<Utc>::MAX_UTC);
    let mut rows: Vec<(reads::EventRow, crate::presence::Cause)> = h
        .events(from, to, &filter, usize::MAX)
        .unwrap_or_default()
        .iter()
        .map(|e| (reads::EventRow::from_stored(e), e.cause))
        .collect();
    let desc = q.order == reads::Order::Desc;
    if desc {
        rows.reverse();
    }
    let limit = q.limit.clamp(1, 1000) as usize;
    let mut page: Vec<(reads::EventRow, crate::presence::Cause)> = rows
        .into_iter()
        .filter(|(r, _)| match cursor {
            None => true,
            Some(c) if desc => (r.at, r.id) < c,
            Some(c) => (r.at, r.id) > c,
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    Ok(HistoryBody {
        next_cursor: if more {
            page.last().map(|(r, _)| reads::event_cursor(r))
        } else {
            None
        },
        events: page
            .into_iter()
            .map(|(r, cause)| HistoryEvent {
                at: r.at,
                resource: r.resource,
                kind: if r.available {
                    "available"
                } else {
                    "unavailable"
                }
                .into(),
                show: r.show.map(|s| s.as_str().to_owned()),
                status: r.status,
                priority: r.priority.map(i16::from),
                cause: crate::store::pg::cause_name(cause).into(),
            })
            .collect(),
    })
}
