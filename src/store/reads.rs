//! Reads: last-seen rows, history pages, and the start-up load of known users. These return
//! plain rows; the API shapes them (and merges them with the live map) for contract §4.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::StoreError;
use super::pg;
use crate::presence::{ResourcePresence, Show, UserJid, UserPresence};

/// One `presence_last_seen` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastSeenRow {
    /// Bare JID.
    pub jid: String,
    /// Online at the last write.
    pub online: bool,
    /// Since when (online only).
    pub online_since: Option<DateTime<Utc>>,
    /// When the last resource left.
    pub last_seen: Option<DateTime<Utc>>,
    /// Last status text.
    pub status: Option<String>,
}

impl LastSeenRow {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            jid: r.get(0),
            online: r.get(1),
            online_since: r.get(2),
            last_seen: r.get(3),
            status: r.get(4),
        }
    }
}

/// The last-seen rows of these JIDs (any order; unknown JIDs have no row).
pub async fn last_seen(pool: &Pool, jids: &[&str]) -> Result<Vec<LastSeenRow>, StoreError> {
    if jids.is_empty() {
        return Ok(Vec::new());
    }
    let c = pg::client(pool).await?;
    let rows = c
        .query(
            "SELECT jid, online, online_since, last_seen, status FROM presence_last_seen WHERE jid = ANY($1)",
            &[&jids],
        )
        .await?;
    Ok(rows.iter().map(LastSeenRow::from_row).collect())
}

/// Sort order of a history page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first (default).
    Desc,
}

/// A history query.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    /// From (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// To (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// Order.
    pub order: Order,
    /// Page size (1..=1000).
    pub limit: i64,
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
}

/// One history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEvent {
    /// When it happened.
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

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Events in the requested order.
    pub events: Vec<HistoryEvent>,
    /// Cursor for the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// Cursor = `<microseconds since epoch>.<event uuid>` in hex: opaque to clients, stable.
fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{:x}.{}", at.timestamp_micros(), id.simple())
}

fn decode_cursor(s: &str) -> Result<(DateTime<Utc>, Uuid), StoreError> {
    let (t, id) = s.split_once('.').ok_or(StoreError::BadCursor)?;
    let micros = i64::from_str_radix(t, 16).map_err(|_| StoreError::BadCursor)?;
    let at = DateTime::from_timestamp_micros(micros).ok_or(StoreError::BadCursor)?;
    let id = Uuid::try_parse(id).map_err(|_| StoreError::BadCursor)?;
    Ok((at, id))
}

/// History of one JID (keyset pagination on `(at, event_id)`).
pub async fn history(
    pool: &Pool,
    jid: &UserJid,
    q: &HistoryQuery,
) -> Result<HistoryPage, StoreError> {
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let limit = q.limit.clamp(1, 1000);
    let (from, to) = (q.from, q.to);
    let (cmp, dir) = match q.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let (c_at, c_id) = match cursor {
        Some((a, i)) => (Some(a), Some(i)),
        None => (None, None),
    };
    let sql = format!(
        "SELECT at, resource, kind, show, status, priority, cause, event_id FROM presence_events \
         WHERE jid = $1 AND ($2::timestamptz IS NULL OR at >= $2) AND ($3::timestamptz IS NULL OR at < $3) \
           AND ($4::timestamptz IS NULL OR (at, event_id) {cmp} ($4, $5::uuid)) \
         ORDER BY at {dir}, event_id {dir} LIMIT $6"
    );
    let c = pg::client(pool).await?;
    let rows = c
        .query(
            &sql,
            &[&jid.as_str(), &from, &to, &c_at, &c_id, &(limit + 1)],
        )
        .await?;
    let more = rows.len() as i64 > limit;
    let mut events = Vec::with_capacity(rows.len());
    let mut last: Option<(DateTime<Utc>, Uuid)> = None;
    for r in rows.into_iter().take(limit as usize) {
        let at: DateTime<Utc> = r.get(0);
        let id: Uuid = r.get(7);
        last = Some((at, id));
        events.push(HistoryEvent {
            at,
            resource: r.get(1),
            kind: r.get(2),
            show: r.get(3),
            status: r.get(4),
            priority: r.get(5),
            cause: r.get(6),
        });
    }
    Ok(HistoryPage {
        events,
        next_cursor: if more {
            last.map(|(a, i)| encode_cursor(a, i))
        } else {
            None
        },
    })
}

/// Known users at start-up: every last-seen row, with the resources of their open sessions,
/// so the first resync probes them and confirms (or closes) what was online at the last stop.
pub async fn load_known(pool: &Pool) -> Result<Vec<UserPresence>, StoreError> {
    let c = pg::client(pool).await?;
    let users = c
        .query(
            "SELECT jid, online, online_since, last_seen, show, status, updated_at FROM presence_last_seen",
            &[],
        )
        .await?;
    let open = c
        .query(
            "SELECT jid, resource, client, started_at FROM presence_sessions WHERE ended_at IS NULL ORDER BY jid, resource",
            &[],
        )
        .await?;
    let mut resources: HashMap<String, Vec<ResourcePresence>> = HashMap::new();
    for r in open {
        let jid: String = r.get(0);
        resources.entry(jid).or_default().push(ResourcePresence {
            resource: r.get(1),
            show: Show::Available,
            status: None,
            priority: 0,
            client: r.get(2),
            since: r.get(3),
            idle_since: None,
            touched: 0,
        });
    }
    let mut out = Vec::with_capacity(users.len());
    for r in users {
        let jid: String = r.get(0);
        let Ok(user) = UserJid::parse(&jid) else {
            continue;
        };
        let online: bool = r.get(1);
        let show: String = r.get(4);
        let res = resources.remove(&jid).unwrap_or_default();
        let online = online && !res.is_empty();
        let show = if online {
            parse_show(&show)
        } else {
            Show::Offline
        };
        let mut res = if online { res } else { Vec::new() };
        // The aggregate's show/status belong to the best resource; without per-resource detail
        // in the table, give every resource the aggregate until the probe answers.
        let status: Option<String> = r.get(5);
        for x in &mut res {
            x.show = show;
            x.status.clone_from(&status);
        }
        out.push(UserPresence {
            jid: user,
            online,
            show,
            status,
            priority: 0,
            online_since: if online { r.get(2) } else { None },
            last_change: r.get(6),
            last_seen: if online { None } else { r.get(3) },
            resources: res,
        });
    }
    Ok(out)
}

fn parse_show(s: &str) -> Show {
    match s {
        "chat" => Show::Chat,
        "away" => Show::Away,
        "xa" => Show::Xa,
        "dnd" => Show::Dnd,
        "offline" => Show::Offline,
        _ => Show::Available,
    }
}

/// Sessions overlapping `[from, to)` (open ones last until now), optionally of one user or of
/// some domains, at most `max` rows (`Ok(None)` = more than `max`: the caller narrows the
/// window). Runs under a statement timeout.
pub async fn spans(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    filter: &super::memory::HistoryFilter,
    max: usize,
) -> Result<Option<Vec<super::memory::SessionRow>>, StoreError> {
    let mut c = pg::client(pool).await?;
    let tx = c.transaction().await?;
    tx.batch_execute(STATEMENT_TIMEOUT).await?;
    let rows = spans_on(&tx, from, to, filter, max).await?;
    tx.commit().await?;
    Ok(rows)
}

/// [`spans`] on a connection or inside a transaction of the caller's.
pub(crate) async fn spans_on(
    c: &impl deadpool_postgres::GenericClient,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    filter: &super::memory::HistoryFilter,
    max: usize,
) -> Result<Option<Vec<super::memory::SessionRow>>, StoreError> {
    let (domains, jid) = filter_params(filter);
    let rows = c.query("SELECT jid, resource, client, started_at, ended_at, end_cause FROM presence_sessions \
             WHERE tstzrange(started_at, CASE WHEN ended_at IS NULL THEN NULL ELSE greatest(started_at, ended_at) END, '[)') && tstzrange($1, $2, '[)') \
               AND ($3::text[] IS NULL OR split_part(jid, '@', 2) = ANY($3)) \
               AND ($4::text IS NULL OR jid = $4) \
             ORDER BY started_at LIMIT $5",
            &[&from, &to, &domains, &jid, &(max as i64 + 1)]).await?;
    if rows.len() > max {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .filter_map(|r| {
                Some(super::memory::SessionRow {
                    span: crate::presence::analytics::Span {
                        jid: UserJid::parse(r.get::<_, &str>(0)).ok()?,
                        resource: r.get(1),
                        client: r.get(2),
                        start: r.get(3),
                        end: r.get(4),
                    },
                    end_cause: r.get(5),
                })
            })
            .collect(),
    ))
}

/// The `(domains, jid)` parameters of a filter: domains lower-cased, the token's narrowed by
/// the query's `domain`.
pub(crate) fn filter_params(
    f: &super::memory::HistoryFilter,
) -> (Option<Vec<String>>, Option<String>) {
    let domains = match (&f.token_domains, &f.domain) {
        (Some(ds), Some(d)) => Some(
            ds.iter()
                .filter(|x| x.eq_ignore_ascii_case(d))
                .map(|x| x.to_lowercase())
                .collect(),
        ),
        (Some(ds), None) => Some(ds.iter().map(|x| x.to_lowercase()).collect()),
        (None, Some(d)) => Some(vec![d.to_lowercase()]),
        (None, None) => None,
    };
    (domains, f.jid.as_ref().map(|j| j.as_str().to_owned()))
}

/// What replay needs from Postgres, read in one snapshot: the sessions open at `at` and, for
/// their users, the sessions of the unbroken online stretch that contains `at` (for
/// `online_since`; found by walking back, one index probe per user and step, through sessions
/// that reach the stretch's start, never past `lookback`); for each open session its last
/// available event at or before `at`; for each user their last event at or before `at` (as an
/// unavailable [`StateEvent`]: it only sets `last_change`). `Ok(None)` beyond `max` sessions.
pub async fn replay_state(
    pool: &Pool,
    at: DateTime<Utc>,
    lookback: DateTime<Utc>,
    filter: &super::memory::HistoryFilter,
    max: usize,
) -> Result<
    Option<(
        Vec<crate::presence::analytics::Span>,
        Vec<crate::presence::analytics::StateEvent>,
    )>,
    StoreError,
> {
    use crate::presence::analytics::{Span, StateEvent};
    let (domains, jid) = filter_params(filter);
    let mut c = pg::client(pool).await?;
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(STATEMENT_TIMEOUT).await?;
    let rows = tx.query("WITH RECURSIVE open AS ( \
                 SELECT jid, resource, client, started_at, ended_at FROM presence_sessions \
                 WHERE tstzrange(started_at, CASE WHEN ended_at IS NULL THEN NULL ELSE greatest(started_at, ended_at) END, '[)') @> $1::timestamptz \
                   AND ($3::text[] IS NULL OR split_part(jid, '@', 2) = ANY($3)) \
                   AND ($4::text IS NULL OR jid = $4)), \
             chain(jid, since) AS ( \
                 SELECT jid, min(started_at) FROM open GROUP BY jid \
               UNION \
                 SELECT c.jid, x.since FROM chain c CROSS JOIN LATERAL ( \
                   SELECT min(s.started_at) AS since FROM presence_sessions s \
                   WHERE s.jid = c.jid \
                     AND tstzrange(s.started_at, CASE WHEN s.ended_at IS NULL THEN NULL ELSE greatest(s.started_at, s.ended_at) END, '[)') \
                         && tstzrange(c.since - interval '1 microsecond', c.since, '[]') \
                     AND s.started_at < c.since AND s.started_at >= $2) x \
                 WHERE x.since IS NOT NULL), \
             stretch AS (SELECT jid, min(since) AS since FROM chain GROUP BY jid) \
             SELECT jid, resource, client, started_at, ended_at, true FROM open \
             UNION ALL \
             SELECT s.jid, s.resource, s.client, s.started_at, s.ended_at, false FROM stretch t \
               CROSS JOIN LATERAL (SELECT * FROM presence_sessions s \
                 WHERE s.jid = t.jid AND s.ended_at >= t.since AND s.ended_at <= $1 AND s.started_at >= t.since) s \
             LIMIT $5",
            &[&at, &lookback, &domains, &jid, &(max as i64 + 1)]).await?;
    if rows.len() > max {
        return Ok(None);
    }
    let mut spans = Vec::with_capacity(rows.len());
    let mut open: Vec<usize> = Vec::new();
    for r in &rows {
        let Ok(j) = UserJid::parse(r.get::<_, &str>(0)) else {
            continue;
        };
        if r.get::<_, bool>(5) {
            open.push(spans.len());
        }
        spans.push(Span {
            jid: j,
            resource: r.get(1),
            client: r.get(2),
            start: r.get(3),
            end: r.get(4),
        });
    }
    let o_jid: Vec<&str> = open.iter().map(|&i| spans[i].jid.as_str()).collect();
    let o_res: Vec<&str> = open.iter().map(|&i| spans[i].resource.as_str()).collect();
    let o_start: Vec<DateTime<Utc>> = open.iter().map(|&i| spans[i].start).collect();
    // Each open session's last available event (a few index entries back from `at`).
    let states = tx
        .query(
            "SELECT o.jid, o.resource, e.at, e.show, e.status, e.priority, e.client \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[]) o(jid, resource, started) \
             CROSS JOIN LATERAL (SELECT at, show, status, priority, client FROM presence_events e \
               WHERE e.jid = o.jid AND e.at <= $4 AND e.at >= o.started \
                 AND e.resource = o.resource AND e.kind = 'available' \
               ORDER BY e.at DESC, e.event_id DESC LIMIT 1) e",
            &[&o_jid, &o_res, &o_start, &at],
        )
        .await?;
    // Each user's last event (any resource), from the start of their stretch.
    let mut since: HashMap<&str, DateTime<Utc>> = HashMap::new();
    for s in &spans {
        let e = since.entry(s.jid.as_str()).or_insert(s.start);
        *e = (*e).min(s.start);
    }
    let (u_jid, u_since): (Vec<&str>, Vec<DateTime<Utc>>) = since.into_iter().unzip();
    let last = tx
        .query(
            "SELECT u.jid, x.at FROM unnest($1::text[], $2::timestamptz[]) u(jid, since) \
             CROSS JOIN LATERAL (SELECT at FROM presence_events e \
               WHERE e.jid = u.jid AND e.at <= $3 AND e.at >= u.since \
               ORDER BY e.at DESC LIMIT 1) x",
            &[&u_jid, &u_since, &at],
        )
        .await?;
    tx.commit().await?;
    let mut events = Vec::with_capacity(states.len() + last.len());
    for r in &states {
        let Ok(j) = UserJid::parse(r.get::<_, &str>(0)) else {
            continue;
        };
        let show: Option<&str> = r.get(3);
        let priority: Option<i16> = r.get(5);
        events.push(StateEvent {
            jid: j,
            resource: r.get(1),
            at: r.get(2),
            available: true,
            show: show.and_then(Show::parse),
            status: r.get(4),
            priority: priority.and_then(|p| i8::try_from(p).ok()),
            client: r.get(6),
        });
    }
    for r in &last {
        let Ok(j) = UserJid::parse(r.get::<_, &str>(0)) else {
            continue;
        };
        events.push(StateEvent {
            jid: j,
            resource: String::new(),
            at: r.get(1),
            available: false,
            show: None,
            status: None,
            priority: None,
            client: None,
        });
    }
    Ok(Some((spans, events)))
}

/// Every window query of §6 runs under this statement timeout, in its own transaction.
pub(crate) const STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '10s'";

/// One bounded read: a transaction with [`STATEMENT_TIMEOUT`], the query, its rows.
async fn bounded_query(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let mut c = pg::client(pool).await?;
    let tx = c.transaction().await?;
    tx.batch_execute(STATEMENT_TIMEOUT).await?;
    let rows = tx.query(sql, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// One event of the history as `GET /api/v1/events` and the exports show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Event id (keyset tie-break).
    pub id: Uuid,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Bare JID.
    pub jid: String,
    /// Resource.
    pub resource: String,
    /// Available (else unavailable).
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

impl EventRow {
    /// The row of a stored event (the in-memory history's events).
    pub fn from_stored(e: &super::StoredEvent) -> Self {
        Self {
            id: Uuid::from_u128(e.id),
            at: e.at,
            jid: e.jid.clone(),
            resource: e.resource.clone(),
            available: e.available,
            show: e.show,
            status: e.status.clone(),
            priority: e.priority,
            client: e.client.clone(),
        }
    }
}

/// A page of events: the rows and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// Rows in the requested order.
    pub events: Vec<EventRow>,
    /// Cursor for the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// A cursor for the event after `r` in keyset order.
pub fn event_cursor(r: &EventRow) -> String {
    encode_cursor(r.at, r.id)
}

/// Decodes an events cursor (issued by [`event_cursor`]).
pub fn parse_event_cursor(s: &str) -> Result<(DateTime<Utc>, Uuid), StoreError> {
    decode_cursor(s)
}

/// Events in `[from, to)` matching `filter`, keyset-paged on `(at, event_id)`.
pub async fn events_page(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    filter: &super::memory::HistoryFilter,
    order: Order,
    limit: i64,
    cursor: Option<&str>,
) -> Result<EventPage, StoreError> {
    let cursor = cursor.map(decode_cursor).transpose()?;
    let (c_at, c_id) = match cursor {
        Some((a, i)) => (Some(a), Some(i)),
        None => (None, None),
    };
    let (cmp, dir) = match order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let (domains, jid) = filter_params(filter);
    let sql = format!(
        "SELECT event_id, at, jid, resource, kind, show, status, priority, client FROM presence_events \
         WHERE at >= $1 AND at < $2 \
           AND ($3::text[] IS NULL OR split_part(jid, '@', 2) = ANY($3)) \
           AND ($4::text IS NULL OR jid = $4) \
           AND ($5::timestamptz IS NULL OR (at, event_id) {cmp} ($5, $6::uuid)) \
         ORDER BY at {dir}, event_id {dir} LIMIT $7"
    );
    let rows = bounded_query(
        pool,
        &sql,
        &[&from, &to, &domains, &jid, &c_at, &c_id, &(limit + 1)],
    )
    .await?;
    let more = rows.len() as i64 > limit;
    let events: Vec<EventRow> = rows.iter().take(limit as usize).map(event_row).collect();
    let next_cursor = if more {
        events.last().map(event_cursor)
    } else {
        None
    };
    Ok(EventPage {
        events,
        next_cursor,
    })
}

/// One session as the sessions export shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionExportRow {
    /// Session id (keyset tie-break).
    pub id: Uuid,
    /// Bare JID.
    pub jid: String,
    /// Resource.
    pub resource: String,
    /// Client.
    pub client: Option<String>,
    /// Start.
    pub start: DateTime<Utc>,
    /// End (`None` while open).
    pub end: Option<DateTime<Utc>>,
    /// The server's reason when it ended the session itself, else the cause of the end.
    pub end_cause: Option<String>,
}

/// The columns `event_id, at, jid, resource, kind, show, status, priority, client`.
fn event_row(r: &tokio_postgres::Row) -> EventRow {
    let show: Option<&str> = r.get(5);
    let priority: Option<i16> = r.get(7);
    EventRow {
        id: r.get(0),
        at: r.get(1),
        jid: r.get(2),
        resource: r.get(3),
        available: r.get::<_, &str>(4) == "available",
        show: show.and_then(Show::parse),
        status: r.get(6),
        priority: priority.and_then(|p| i8::try_from(p).ok()),
        client: r.get(8),
    }
}

/// The columns `session_id, jid, resource, client, started_at, ended_at, cause`.
fn session_export_row(r: &tokio_postgres::Row) -> SessionExportRow {
    SessionExportRow {
        id: r.get(0),
        jid: r.get(1),
        resource: r.get(2),
        client: r.get(3),
        start: r.get(4),
        end: r.get(5),
        end_cause: r.get(6),
    }
}

/// An export's rows, read through one server-side cursor (`DECLARE … FETCH`) in one
/// read-only transaction, so that a window of any size streams in constant memory with one
/// plan and one index scan. Each `FETCH` runs under the statement timeout. The connection is
/// taken out of the pool for the export's life and closed at its end (an export dropped
/// half-way must not hand back a connection inside a transaction).
pub struct ExportCursor {
    client: deadpool_postgres::ClientWrapper,
    done: bool,
}

impl std::fmt::Debug for ExportCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportCursor")
            .field("done", &self.done)
            .finish()
    }
}

impl ExportCursor {
    async fn open(
        pool: &Pool,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Self, StoreError> {
        let client = deadpool_postgres::Object::take(pg::client(pool).await?);
        client
            .batch_execute(&format!("BEGIN READ ONLY; {STATEMENT_TIMEOUT}"))
            .await?;
        client
            .execute(
                &format!("DECLARE export NO SCROLL CURSOR FOR {sql}"),
                params,
            )
            .await?;
        Ok(Self {
            client,
            done: false,
        })
    }

    /// The events of a window in time order.
    pub async fn events(
        pool: &Pool,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        filter: &super::memory::HistoryFilter,
    ) -> Result<Self, StoreError> {
        let (domains, jid) = filter_params(filter);
        Self::open(
            pool,
            "SELECT event_id, at, jid, resource, kind, show, status, priority, client FROM presence_events \
             WHERE at >= $1 AND at < $2 \
               AND ($3::text[] IS NULL OR split_part(jid, '@', 2) = ANY($3)) \
               AND ($4::text IS NULL OR jid = $4) \
             ORDER BY at, event_id",
            &[&from, &to, &domains, &jid],
        )
        .await
    }

    /// The sessions overlapping a window, by start.
    pub async fn sessions(
        pool: &Pool,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        filter: &super::memory::HistoryFilter,
    ) -> Result<Self, StoreError> {
        let (domains, jid) = filter_params(filter);
        Self::open(
            pool,
            "SELECT session_id, jid, resource, client, started_at, ended_at, coalesce(end_reason, end_cause) \
             FROM presence_sessions \
             WHERE tstzrange(started_at, CASE WHEN ended_at IS NULL THEN NULL ELSE greatest(started_at, ended_at) END, '[)') && tstzrange($1, $2, '[)') \
               AND ($3::text[] IS NULL OR split_part(jid, '@', 2) = ANY($3)) \
               AND ($4::text IS NULL OR jid = $4) \
             ORDER BY started_at, session_id",
            &[&from, &to, &domains, &jid],
        )
        .await
    }

    async fn fetch(&mut self, n: usize) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        if self.done {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(&format!("FETCH {n} FROM export"), &[])
            .await?;
        if rows.len() < n {
            self.done = true;
        }
        Ok(rows)
    }

    /// The next `n` events (fewer at the end; empty when done).
    pub async fn next_events(&mut self, n: usize) -> Result<Vec<EventRow>, StoreError> {
        Ok(self.fetch(n).await?.iter().map(event_row).collect())
    }

    /// The next `n` sessions (fewer at the end; empty when done).
    pub async fn next_sessions(&mut self, n: usize) -> Result<Vec<SessionExportRow>, StoreError> {
        Ok(self
            .fetch(n)
            .await?
            .iter()
            .map(session_export_row)
            .collect())
    }

    /// True once the last row was read.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_roundtrip_and_rejects_garbage() {
        let at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap_or_default();
        let id = Uuid::from_u128(0xdead_beef);
        let c = encode_cursor(at, id);
        assert_eq!(decode_cursor(&c).ok(), Some((at, id)));
        for bad in ["", "x", "zz.00", "1.not-a-uuid", "."] {
            assert!(
                matches!(decode_cursor(bad), Err(StoreError::BadCursor)),
                "{bad}"
            );
        }
    }
}
