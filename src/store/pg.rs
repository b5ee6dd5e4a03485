//! Postgres access: pool, migrations, partitions, retention, and the batch write.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::pin_mut;
use tokio_postgres::NoTls;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{StoreError, StoredEvent};
use crate::presence::{Cause, Show};

mod embedded {
    refinery::embed_migrations!("schema");
}

/// A Postgres error as text: the server's message and SQLSTATE for a database error (the
/// `Display` of tokio-postgres says only "db error"), else the client's own description.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// True when the error is a unique violation (SQLSTATE 23505).
pub fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| *d.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// A pool of `size` connections; connecting is lazy (the first `get`).
pub fn pool(url: &str, size: usize, connect_timeout: Duration) -> Result<Pool, StoreError> {
    let mut cfg =
        tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
    cfg.connect_timeout(connect_timeout);
    if cfg.get_application_name().is_none() {
        cfg.application_name("presence-bridge");
    }
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size.max(1))
        .wait_timeout(Some(connect_timeout))
        .create_timeout(Some(connect_timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Connect(e.to_string()))
}

/// A connection from the pool.
pub async fn client(pool: &Pool) -> Result<Object, StoreError> {
    pool.get()
        .await
        .map_err(|e| StoreError::Connect(strip_url(&e.to_string())))
}

/// Error texts from the pool can echo the config; keep only the first clause.
fn strip_url(s: &str) -> String {
    s.split(" for ").next().unwrap_or(s).to_owned()
}

/// Applies pending migrations; returns the versions applied now (empty = nothing to do).
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, StoreError> {
    migrate_to(pool, None).await
}

/// Applies pending migrations up to `version` (all when `None`): upgrade tests build a
/// database as an older release left it.
pub async fn migrate_to(pool: &Pool, version: Option<i32>) -> Result<Vec<String>, StoreError> {
    let mut obj = client(pool).await?;
    let client: &mut tokio_postgres::Client = &mut obj;
    let mut runner = embedded::migrations::runner();
    if let Some(v) = version {
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let report = runner.run_async(client).await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

fn partition_name(day: NaiveDate) -> String {
    format!("presence_events_{}", day.format("%Y%m%d"))
}

/// Creates the daily partitions for `days` (idempotent).
pub async fn ensure_partitions(
    client: &tokio_postgres::Client,
    days: &BTreeSet<NaiveDate>,
) -> Result<(), StoreError> {
    for day in days {
        let next = day.checked_add_days(Days::new(1)).unwrap_or(*day);
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF presence_events FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00')",
            partition_name(*day),
            day.format("%Y-%m-%d"),
            next.format("%Y-%m-%d")
        );
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// History rows.
    pub events: u64,
    /// Session rows.
    pub sessions: u64,
    /// Last-seen rows (0 or 1).
    pub last_seen: u64,
}

/// Erases one user (contract §8, right to erasure) in one transaction: history, sessions,
/// last-seen, and their per-user rollup rows (the per-client and per-minute rollups are counts
/// with no identity in them and stay).
pub async fn erase_user(
    client: &mut tokio_postgres::Client,
    jid: &str,
) -> Result<Erased, StoreError> {
    let tx = client.transaction().await?;
    let events = tx
        .execute("DELETE FROM presence_events WHERE jid = $1", &[&jid])
        .await?;
    let sessions = tx
        .execute("DELETE FROM presence_sessions WHERE jid = $1", &[&jid])
        .await?;
    let last_seen = tx
        .execute("DELETE FROM presence_last_seen WHERE jid = $1", &[&jid])
        .await?;
    tx.execute(
        "DELETE FROM presence_rollup_user_day WHERE jid = $1",
        &[&jid],
    )
    .await?;
    tx.commit().await?;
    Ok(Erased {
        events,
        sessions,
        last_seen,
    })
}

/// Deletes the sessions that ended before the first day `retention_days` keeps (their events
/// are gone with their partitions); returns how many.
pub async fn drop_old_sessions(
    client: &tokio_postgres::Client,
    retention_days: u32,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let cutoff = now
        .date_naive()
        .checked_sub_days(Days::new(u64::from(retention_days)))
        .unwrap_or(NaiveDate::MIN);
    let cutoff = Utc.from_utc_datetime(&cutoff.and_time(chrono::NaiveTime::MIN));
    Ok(client
        .execute(
            "DELETE FROM presence_sessions WHERE ended_at < $1",
            &[&cutoff],
        )
        .await?)
}

/// Drops the daily partitions that end before `now - retention_days`; returns their names.
pub async fn drop_old_partitions(
    client: &tokio_postgres::Client,
    retention_days: u32,
    now: DateTime<Utc>,
) -> Result<Vec<String>, StoreError> {
    let cutoff = now
        .date_naive()
        .checked_sub_days(Days::new(u64::from(retention_days)))
        .unwrap_or(NaiveDate::MIN);
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'presence_events'",
            &[],
        )
        .await?;
    let mut dropped = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let Some(day) = name
            .strip_prefix("presence_events_")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
        else {
            continue;
        };
        // The partition covers [day, day+1): drop it when all of it is older than the cutoff.
        if day
            .checked_add_days(Days::new(1))
            .is_some_and(|end| end <= cutoff)
        {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                .await?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

fn show_str(s: Show) -> &'static str {
    s.as_str()
}

/// The stored name of a cause.
pub fn cause_name(c: Cause) -> &'static str {
    cause_str(c)
}

fn cause_str(c: Cause) -> &'static str {
    match c {
        Cause::Stanza => "stanza",
        Cause::Probe => "probe",
        Cause::Resync => "resync",
        Cause::Shutdown => "shutdown",
        Cause::Reconcile => "reconcile",
        Cause::Amqp => "amqp",
    }
}

const EVENT_COLUMNS: &str = "event_id, at, received_at, jid, resource, kind, show, status, priority, client, idle_since, cause";
const EVENT_TYPES: [Type; 12] = [
    Type::UUID,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
];

/// Binary COPY of event rows into `table` (the writer's fast path; also the benchmark's
/// raw-COPY baseline).
pub async fn copy_events(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    batch: &[StoredEvent],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx
        .copy_in(&format!(
            "COPY {table} ({EVENT_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &EVENT_TYPES);
    pin_mut!(writer);
    for e in batch {
        let id = Uuid::from_u128(e.id);
        let kind = if e.available {
            "available"
        } else {
            "unavailable"
        };
        let show = e.show.map(show_str);
        let prio = e.priority.map(i16::from);
        writer
            .as_mut()
            .write(&[
                &id,
                &e.at,
                &e.received_at,
                &e.jid,
                &e.resource,
                &kind,
                &show,
                &e.status,
                &prio,
                &e.client,
                &e.idle_since,
                &cause_str(e.cause),
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Writes one batch in one transaction: events (COPY), sessions, last-seen.
///
/// `idempotent = false` copies straight into the table (fast path; a duplicate event id fails
/// the batch with a unique violation, and the caller retries idempotently). `true` copies into
/// a temporary table and inserts with `ON CONFLICT DO NOTHING` (spool replays).
pub async fn write_batch(
    client: &mut tokio_postgres::Client,
    batch: &[StoredEvent],
    idempotent: bool,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if idempotent {
        tx.batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_events (LIKE presence_events) ON COMMIT DELETE ROWS",
        )
        .await?;
        copy_events(&tx, "stage_events", batch).await?;
        tx.execute(
            &format!("INSERT INTO presence_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM stage_events ON CONFLICT DO NOTHING"),
            &[],
        )
        .await?;
    } else {
        copy_events(&tx, "presence_events", batch).await?;
    }
    write_sessions(&tx, batch).await?;
    write_last_seen(&tx, batch).await?;
    tx.commit().await
}

/// Writes one batch as three concurrent transactions on three connections: events (COPY),
/// sessions, last-seen. They touch disjoint tables and each part is idempotent on replay
/// (events by id, sessions by opening event id, last-seen guarded by `updated_at`), so when
/// any part fails the caller spools the whole batch and the replay completes the rest. Batches
/// are still written one after the other, so a session's close never overtakes its open.
pub async fn write_batch_parallel(
    clients: [&mut tokio_postgres::Client; 3],
    batch: &[StoredEvent],
    idempotent: bool,
) -> Result<(), tokio_postgres::Error> {
    let [a, b, c] = clients;
    let events = async {
        let tx = a.transaction().await?;
        if idempotent {
            stage_and_insert(&tx, batch).await?;
        } else {
            copy_events(&tx, "presence_events", batch).await?;
        }
        tx.commit().await
    };
    let sessions = async {
        let tx = b.transaction().await?;
        write_sessions(&tx, batch).await?;
        tx.commit().await
    };
    let last_seen = async {
        let tx = c.transaction().await?;
        write_last_seen(&tx, batch).await?;
        tx.commit().await
    };
    futures::try_join!(events, sessions, last_seen).map(|_| ())
}

async fn stage_and_insert(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[StoredEvent],
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS stage_events (LIKE presence_events) ON COMMIT DELETE ROWS",
    )
    .await?;
    copy_events(tx, "stage_events", batch).await?;
    tx.execute(
        &format!("INSERT INTO presence_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM stage_events ON CONFLICT DO NOTHING"),
        &[],
    )
    .await?;
    Ok(())
}

struct SessionRow<'a> {
    id: Uuid,
    jid: String,
    resource: String,
    client: Option<String>,
    started: DateTime<Utc>,
    ended: Option<DateTime<Utc>>,
    cause: Option<&'static str>,
    reason: Option<&'a str>,
}

async fn write_sessions(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[StoredEvent],
) -> Result<(), tokio_postgres::Error> {
    // A late batch (or a spool replay) changes days whose rollups may be built.
    if let Some(earliest) = batch.iter().map(|e| e.at).min() {
        super::rollup::invalidate(tx, earliest, Utc::now()).await?;
    }
    let mut rows: Vec<SessionRow> = Vec::new();
    let mut open: HashMap<(&str, &str), usize> = HashMap::new();
    // Closes of sessions opened in an earlier batch: at most one per resource per batch
    // (a second close needs an open in between, which would be in this batch).
    type Close<'a> = (DateTime<Utc>, &'static str, Option<&'a str>);
    let mut closes: HashMap<(&str, &str), Close<'_>> = HashMap::new();
    for e in batch {
        let key = (e.jid.as_str(), e.resource.as_str());
        if e.closed {
            match open.remove(&key) {
                Some(i) => {
                    rows[i].ended = Some(e.at);
                    rows[i].cause = Some(cause_str(e.cause));
                    rows[i].reason = e.end_reason.as_deref();
                }
                None => {
                    closes.entry(key).or_insert((
                        e.at,
                        cause_str(e.cause),
                        e.end_reason.as_deref(),
                    ));
                }
            }
        }
        if e.opened {
            open.insert(key, rows.len());
            rows.push(SessionRow {
                id: Uuid::from_u128(e.id),
                jid: e.jid.clone(),
                resource: e.resource.clone(),
                client: e.client.clone(),
                started: e.at,
                ended: None,
                cause: None,
                reason: None,
            });
        }
    }
    if !closes.is_empty() {
        let (mut j, mut r, mut a, mut c, mut why) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((jid, res), (at, cause, reason)) in &closes {
            j.push(*jid);
            r.push(*res);
            a.push(*at);
            c.push(*cause);
            why.push(*reason);
        }
        tx.execute(
            "UPDATE presence_sessions s SET ended_at = u.at, end_cause = u.cause, end_reason = u.reason \
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS u(jid, resource, at, cause, reason) \
             WHERE s.jid = u.jid AND s.resource = u.resource AND s.ended_at IS NULL \
               AND s.started_at <= u.at",
            &[&j, &r, &a, &c, &why],
        )
        .await?;
    }
    if !rows.is_empty() {
        let ids: Vec<Uuid> = rows.iter().map(|s| s.id).collect();
        let jids: Vec<&str> = rows.iter().map(|s| s.jid.as_str()).collect();
        let res: Vec<&str> = rows.iter().map(|s| s.resource.as_str()).collect();
        let clients: Vec<Option<&str>> = rows.iter().map(|s| s.client.as_deref()).collect();
        let started: Vec<DateTime<Utc>> = rows.iter().map(|s| s.started).collect();
        let ended: Vec<Option<DateTime<Utc>>> = rows.iter().map(|s| s.ended).collect();
        let causes: Vec<Option<&str>> = rows.iter().map(|s| s.cause).collect();
        let reasons: Vec<Option<&str>> = rows.iter().map(|s| s.reason).collect();
        tx.execute(
            "INSERT INTO presence_sessions (session_id, jid, resource, client, started_at, ended_at, end_cause, end_reason) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[]) \
             ON CONFLICT (session_id) DO UPDATE SET \
               ended_at = COALESCE(presence_sessions.ended_at, EXCLUDED.ended_at), \
               end_cause = COALESCE(presence_sessions.end_cause, EXCLUDED.end_cause), \
               end_reason = COALESCE(presence_sessions.end_reason, EXCLUDED.end_reason)",
            &[&ids, &jids, &res, &clients, &started, &ended, &causes, &reasons],
        )
        .await?;
    }
    Ok(())
}

async fn write_last_seen(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[StoredEvent],
) -> Result<(), tokio_postgres::Error> {
    // The last event of each user in the batch carries the user's final state.
    let mut last: HashMap<&str, &StoredEvent> = HashMap::new();
    for e in batch {
        last.insert(e.jid.as_str(), e);
    }
    if last.is_empty() {
        return Ok(());
    }
    let mut jid = Vec::with_capacity(last.len());
    let mut online = Vec::with_capacity(last.len());
    let mut since = Vec::with_capacity(last.len());
    let mut seen = Vec::with_capacity(last.len());
    let mut show = Vec::with_capacity(last.len());
    let mut status = Vec::with_capacity(last.len());
    let mut updated = Vec::with_capacity(last.len());
    for (j, e) in &last {
        jid.push(*j);
        online.push(e.user.online);
        since.push(e.user.online_since);
        seen.push(e.user.last_seen);
        show.push(show_str(e.user.show));
        status.push(e.user.status.as_deref());
        updated.push(e.received_at);
    }
    tx.execute(
        "INSERT INTO presence_last_seen (jid, online, online_since, last_seen, show, status, updated_at) \
         SELECT * FROM UNNEST($1::text[], $2::bool[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[], $7::timestamptz[]) \
         ON CONFLICT (jid) DO UPDATE SET online = EXCLUDED.online, online_since = EXCLUDED.online_since, \
           last_seen = EXCLUDED.last_seen, show = EXCLUDED.show, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at \
         WHERE presence_last_seen.updated_at <= EXCLUDED.updated_at",
        &[&jid, &online, &since, &seen, &show, &status, &updated],
    )
    .await?;
    Ok(())
}

/// Days covered by a batch (for partition creation).
pub fn batch_days(batch: &[StoredEvent]) -> BTreeSet<NaiveDate> {
    batch.iter().map(|e| e.at.date_naive()).collect()
}

/// Records a fact about the bridge (e.g. `stopped_at`).
pub async fn set_state(
    client: &tokio_postgres::Client,
    key: &str,
    value: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO bridge_state (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value],
        )
        .await?;
    Ok(())
}

/// Reads a fact about the bridge.
pub async fn get_state(
    client: &tokio_postgres::Client,
    key: &str,
) -> Result<Option<String>, StoreError> {
    Ok(client
        .query_opt("SELECT value FROM bridge_state WHERE key = $1", &[&key])
        .await?
        .map(|r| r.get(0)))
}
