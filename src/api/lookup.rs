//! Last-seen and history answers (contract §4): the live map first (exact for this run), then
//! Postgres rows, shaped for JSON here rather than in the store.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::presence::model::rfc3339_millis;
use crate::presence::{Engine, UserJid, UserPresence};
use crate::store::reads::{self, HistoryPage, HistoryQuery, LastSeenRow};
use crate::store::{StoreError, StoreHandle};

/// `GET /api/v1/last-seen/{jid}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
        let asked: HashMap<&str, &str> = ask.iter().map(|a| (*a, *a)).collect();
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

/// One history entry (contract §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEvent {
    /// When it happened.
    #[serde(with = "rfc3339_millis")]
    pub at: DateTime<Utc>,
    /// Resource.
    pub resource: String,
    /// `available` / `unavailable`.
    pub kind: String,
    /// Show (available only).
    pub show: Option<String>,
    /// Status text.
    pub status: Option<String>,
    /// Priority (available only).
    pub priority: Option<i16>,
    /// Why (stanza, probe, resync, shutdown): an extension of the contract's shape.
    pub cause: String,
}

/// A page of history (contract §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryBody {
    /// Events in the requested order.
    pub events: Vec<HistoryEvent>,
    /// Cursor for the next page, if there is one.
    pub next_cursor: Option<String>,
}

impl From<HistoryPage> for HistoryBody {
    fn from(p: HistoryPage) -> Self {
        HistoryBody {
            events: p
                .events
                .into_iter()
                .map(|e| HistoryEvent {
                    at: e.at,
                    resource: e.resource,
                    kind: e.kind,
                    show: e.show,
                    status: e.status,
                    priority: e.priority,
                    cause: e.cause,
                })
                .collect(),
            next_cursor: p.next_cursor,
        }
    }
}

/// One user's history page from Postgres.
pub async fn history(
    store: &StoreHandle,
    jid: &UserJid,
    q: &HistoryQuery,
) -> Result<HistoryBody, StoreError> {
    Ok(reads::history(store.pool(), jid, q).await?.into())
}
