//! The webhook outbox: one log of records (a presence change or an alert, with the endpoints
//! whose filters want it), one cursor per endpoint, and a delivery log. Fan-out on read:
//! accepting a change costs one record whatever the number of endpoints; each endpoint's
//! worker reads the records after its cursor that are for it.
//!
//! In Postgres (schema V7) when a store is configured — a record is accepted once its batch is
//! committed, and survives restarts — otherwise in memory (bounded).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::{Endpoint, Source};
use crate::config::{Secret, WebhookConfig};

/// Records kept in memory mode: beyond it the oldest go, and the endpoints that had not
/// finished with them count them as dropped.
const MEMORY_RECORDS: usize = 100_000;
/// Delivery log entries kept per endpoint in memory mode.
const MEMORY_LOG: usize = 1_000;

/// What a record's JSON body is made from.
#[derive(Debug, Clone)]
pub enum BodySource {
    /// Written already (alerts).
    Ready(Arc<str>),
    /// A presence change, written when needed: Postgres writes it when the record is
    /// accepted; memory mode when it is first delivered, so a burst costs no serialising.
    Presence {
        /// The change.
        change: crate::presence::Change,
        /// Its event's time.
        at: DateTime<Utc>,
        /// The engine's epoch.
        epoch: Arc<str>,
    },
}

/// One record of the log, before it is accepted.
#[derive(Debug, Clone)]
pub struct Record {
    /// Random; with an endpoint's salt it makes that endpoint's `webhook-id`.
    pub rid: u128,
    /// The event type.
    pub kind: &'static str,
    /// The JSON body (the same for every endpoint).
    pub body: BodySource,
    /// The user it is about (erasure removes the record).
    pub jid: Option<crate::presence::UserJid>,
    /// The endpoints whose filters want it (never empty).
    pub targets: Arc<[Arc<Endpoint>]>,
}

/// A message waiting for delivery to one endpoint.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The record's place in the log.
    pub seq: i64,
    /// `webhook-id`, the same on every attempt.
    pub id: String,
    /// Event type.
    pub kind: String,
    /// JSON body.
    pub body: Arc<str>,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before.
    pub next_attempt_at: DateTime<Utc>,
}

/// One delivery attempt, as the log shows it (contract §7).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// `webhook-id`.
    pub message_id: String,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// 1 for the first.
    pub attempt: u32,
    /// When.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub at: DateTime<Utc>,
    /// `delivered`, `retrying` or `failed`.
    pub status: &'static str,
    /// The endpoint's HTTP status, when it answered.
    pub response_status: Option<u16>,
    /// Why it did not deliver.
    pub error: Option<String>,
}

/// What a worker reports after some attempts: one store write for many deliveries.
#[derive(Debug, Default)]
pub struct Progress {
    /// The attempts, in order.
    pub attempts: Vec<Attempt>,
    /// Every record up to this one is finished (delivered or failed) for the endpoint.
    pub finished_through: Option<i64>,
    /// The head message is waiting for a retry: (its seq, attempts so far, not before).
    pub retry: Option<(i64, u32, DateTime<Utc>)>,
}

impl Progress {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty() && self.finished_through.is_none() && self.retry.is_none()
    }
}

/// An endpoint's place in the log.
#[derive(Debug)]
struct Cursor {
    /// Every record up to this one is finished for the endpoint.
    after: i64,
    /// The record the retry state is about.
    head: i64,
    attempts: u32,
    next_at: DateTime<Utc>,
    log: VecDeque<Attempt>,
}

impl Cursor {
    fn at(after: i64) -> Cursor {
        Cursor {
            after,
            head: 0,
            attempts: 0,
            next_at: Utc::now(),
            log: VecDeque::new(),
        }
    }
}

/// A record in memory (erasure empties its targets and body in place).
#[derive(Debug)]
struct MemRecord {
    seq: i64,
    rid: u128,
    kind: &'static str,
    /// Its source until the first delivery writes it.
    source: Option<BodySource>,
    body: Option<Arc<str>>,
    jid: Option<crate::presence::UserJid>,
    targets: Arc<[Arc<Endpoint>]>,
}

/// The log and the cursors in memory mode.
#[derive(Debug, Default)]
pub struct MemLog {
    records: VecDeque<MemRecord>,
    /// The seq the next record gets (the first is 1).
    last_seq: i64,
    cursors: HashMap<String, Cursor>,
}

impl MemLog {
    fn index_of(&self, seq: i64) -> usize {
        let first = self.records.front().map_or(self.last_seq + 1, |r| r.seq);
        usize::try_from(seq - first)
            .unwrap_or(0)
            .min(self.records.len())
    }

    /// Whether `ep` has not finished with record `r`.
    fn owes(&self, ep: &Endpoint, r: &MemRecord) -> bool {
        self.cursors.get(&ep.id).is_some_and(|c| c.after < r.seq)
    }
}

/// Where messages wait.
#[derive(Debug)]
pub enum Outbox {
    /// This run only.
    Memory(Mutex<MemLog>),
    /// Durable.
    Postgres(Pool),
}

type R<T> = Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn rid_hex(rid: u128) -> String {
    format!("{rid:032x}")
}

impl Outbox {
    /// An in-memory outbox.
    pub fn memory() -> Outbox {
        Outbox::Memory(Mutex::default())
    }

    fn mem(m: &Mutex<MemLog>) -> std::sync::MutexGuard<'_, MemLog> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives an endpoint its cursor, at the end of the log (it receives what is accepted from
    /// now on); an endpoint that has one keeps it. Before any record can be for it.
    pub async fn register(&self, ep: &Endpoint) -> R<()> {
        match self {
            Outbox::Memory(m) => {
                let mut g = Self::mem(m);
                let end = g.last_seq;
                g.cursors
                    .entry(ep.id.clone())
                    .or_insert_with(|| Cursor::at(end));
                Ok(())
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                c.execute(
                    "INSERT INTO webhook_cursors (endpoint_id, after_seq) \
                     VALUES ($1, (SELECT coalesce(max(seq), 0) FROM webhook_log)) \
                     ON CONFLICT (endpoint_id) DO NOTHING",
                    &[&ep.id],
                )
                .await
                .map_err(e)?;
                Ok(())
            }
        }
    }

    /// Accepts a batch of records (in Postgres: one statement, one transaction). Returns how
    /// many messages memory mode dropped to stay within its bound (Postgres never drops).
    pub async fn append(&self, batch: &[Record]) -> R<u64> {
        match self {
            Outbox::Memory(m) => {
                let mut g = Self::mem(m);
                let mut dropped = 0;
                // Records every endpoint has finished with go first.
                let done = g
                    .cursors
                    .values()
                    .map(|c| c.after)
                    .min()
                    .unwrap_or(g.last_seq);
                while g.records.front().is_some_and(|r| r.seq <= done) {
                    g.records.pop_front();
                }
                for r in batch {
                    if g.records.len() >= MEMORY_RECORDS
                        && let Some(old) = g.records.pop_front()
                    {
                        dropped += old.targets.iter().filter(|t| g.owes(t, &old)).count() as u64;
                    }
                    g.last_seq += 1;
                    let seq = g.last_seq;
                    g.records.push_back(MemRecord {
                        seq,
                        rid: r.rid,
                        kind: r.kind,
                        source: Some(r.body.clone()),
                        body: None,
                        jid: r.jid.clone(),
                        targets: r.targets.clone(),
                    });
                }
                Ok(dropped)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let rids: Vec<String> = batch.iter().map(|r| rid_hex(r.rid)).collect();
                let kinds: Vec<&str> = batch.iter().map(|r| r.kind).collect();
                let bodies: Vec<Arc<str>> = batch.iter().map(|r| super::render(&r.body)).collect();
                let bodies: Vec<&str> = bodies.iter().map(|b| &**b).collect();
                let jids: Vec<Option<&str>> = batch
                    .iter()
                    .map(|r| r.jid.as_ref().map(|j| j.as_str()))
                    .collect();
                // Targets as one text per record (a 2-D array needs equal lengths).
                let targets: Vec<String> = batch
                    .iter()
                    .map(|r| {
                        r.targets
                            .iter()
                            .map(|t| t.id.as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .collect();
                // Identity values are drawn in the order of the array: the changes' order.
                c.execute(
                    "INSERT INTO webhook_log (rid, type, body, jid, targets) \
                     SELECT r, t, b, j, string_to_array(g, E'\\n') \
                       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                       WITH ORDINALITY AS x(r, t, b, j, g, n) ORDER BY n",
                    &[&rids, &kinds, &bodies, &jids, &targets],
                )
                .await
                .map_err(e)?;
                Ok(0)
            }
        }
    }

    /// The next `n` messages for an endpoint, in order.
    pub async fn next(&self, ep: &Arc<Endpoint>, n: usize) -> R<Vec<Pending>> {
        match self {
            Outbox::Memory(m) => {
                let mut g = Self::mem(m);
                let Some(c) = g.cursors.get(&ep.id) else {
                    return Ok(Vec::new());
                };
                let (after, head, attempts, next_at) = (c.after, c.head, c.attempts, c.next_at);
                let mut out = Vec::new();
                let mut scanned_to = after;
                let from = g.index_of(after + 1);
                for r in g.records.range_mut(from..) {
                    if r.seq <= after {
                        continue;
                    }
                    if out.len() == n {
                        break;
                    }
                    if r.targets.iter().any(|t| Arc::ptr_eq(t, ep)) {
                        let first = out.is_empty() && r.seq == head;
                        if r.body.is_none() {
                            r.body = r.source.take().map(|s| super::render(&s));
                        }
                        out.push(Pending {
                            seq: r.seq,
                            id: ep.message_id(r.rid),
                            kind: r.kind.to_owned(),
                            body: r.body.clone().unwrap_or_else(|| Arc::from("")),
                            attempts: if first { attempts } else { 0 },
                            next_attempt_at: if first { next_at } else { Utc::now() },
                        });
                    } else if out.is_empty() {
                        // Not for this endpoint and nothing of its own before it: finished.
                        scanned_to = r.seq;
                    }
                }
                if let Some(c) = g.cursors.get_mut(&ep.id) {
                    c.after = c.after.max(scanned_to);
                }
                Ok(out)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let rows = c
                    .query(
                        "SELECT l.seq, l.rid, l.msg_id, l.type, l.body, \
                                CASE WHEN l.seq = c.head_seq THEN c.attempts ELSE 0 END, \
                                CASE WHEN l.seq = c.head_seq THEN c.next_attempt_at ELSE now() END \
                           FROM webhook_cursors c JOIN webhook_log l ON l.seq > c.after_seq \
                          WHERE c.endpoint_id = $1 AND $1 = ANY (l.targets) \
                          ORDER BY l.seq LIMIT $2",
                        &[&ep.id, &(n as i64)],
                    )
                    .await
                    .map_err(e)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let id = r.get::<_, Option<String>>(2).unwrap_or_else(|| {
                            ep.message_id(u128::from_str_radix(r.get(1), 16).unwrap_or(0))
                        });
                        Pending {
                            seq: r.get(0),
                            id,
                            kind: r.get(3),
                            body: Arc::from(r.get::<_, &str>(4)),
                            attempts: r.get::<_, i32>(5).max(0) as u32,
                            next_attempt_at: r.get(6),
                        }
                    })
                    .collect())
            }
        }
    }

    /// Records what a worker did: its attempts in the delivery log, how far it finished, and
    /// the head's retry state. One transaction in Postgres, for any number of deliveries.
    pub async fn record(&self, endpoint: &str, p: &Progress) -> R<()> {
        match self {
            Outbox::Memory(mm) => {
                let mut g = Self::mem(mm);
                let Some(c) = g.cursors.get_mut(endpoint) else {
                    return Ok(());
                };
                for a in &p.attempts {
                    if c.log.len() >= MEMORY_LOG {
                        c.log.pop_front();
                    }
                    c.log.push_back(a.clone());
                }
                if let Some(t) = p.finished_through {
                    c.after = c.after.max(t);
                }
                (c.head, c.attempts, c.next_at) = p.retry.unwrap_or((0, 0, Utc::now()));
                Ok(())
            }
            Outbox::Postgres(pool) => {
                let mut c = pool.get().await.map_err(e)?;
                let tx = c.transaction().await.map_err(e)?;
                // An attempt's record need not wait for the disk: lost in a crash, the message
                // is only delivered again (at least once), never lost.
                tx.batch_execute("SET LOCAL synchronous_commit = off")
                    .await
                    .map_err(e)?;
                if !p.attempts.is_empty() {
                    let ids: Vec<&str> = p.attempts.iter().map(|a| a.message_id.as_str()).collect();
                    let kinds: Vec<&str> = p.attempts.iter().map(|a| a.kind.as_str()).collect();
                    let nums: Vec<i32> = p.attempts.iter().map(|a| a.attempt as i32).collect();
                    let ats: Vec<DateTime<Utc>> = p.attempts.iter().map(|a| a.at).collect();
                    let sts: Vec<&str> = p.attempts.iter().map(|a| a.status).collect();
                    let codes: Vec<Option<i32>> = p
                        .attempts
                        .iter()
                        .map(|a| a.response_status.map(i32::from))
                        .collect();
                    let errs: Vec<Option<&str>> =
                        p.attempts.iter().map(|a| a.error.as_deref()).collect();
                    tx.execute(
                        "INSERT INTO webhook_deliveries (endpoint_id, message_id, type, attempt, at, status, response_status, error) \
                         SELECT $1, i, t, n, a, s, r, x FROM unnest($2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::text[], $7::int4[], $8::text[]) \
                           AS u(i, t, n, a, s, r, x)",
                        &[&endpoint, &ids, &kinds, &nums, &ats, &sts, &codes, &errs],
                    )
                    .await
                    .map_err(e)?;
                }
                let (head, attempts, next_at) = p.retry.unwrap_or((0, 0, Utc::now()));
                tx.execute(
                    "UPDATE webhook_cursors SET after_seq = greatest(after_seq, coalesce($2, after_seq)), \
                            head_seq = $3, attempts = $4, next_attempt_at = $5 \
                      WHERE endpoint_id = $1",
                    &[&endpoint, &p.finished_through, &head, &(attempts as i32), &next_at],
                )
                .await
                .map_err(e)?;
                tx.commit().await.map_err(e)
            }
        }
    }

    /// Messages waiting for an endpoint.
    pub async fn pending(&self, ep: &Arc<Endpoint>) -> R<u64> {
        match self {
            Outbox::Memory(m) => {
                let g = Self::mem(m);
                let Some(after) = g.cursors.get(&ep.id).map(|c| c.after) else {
                    return Ok(0);
                };
                Ok(g.records
                    .range(g.index_of(after + 1)..)
                    .filter(|r| r.seq > after && r.targets.iter().any(|t| Arc::ptr_eq(t, ep)))
                    .count() as u64)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let r = c
                    .query_one(
                        "SELECT count(*) FROM webhook_cursors c JOIN webhook_log l ON l.seq > c.after_seq \
                          WHERE c.endpoint_id = $1 AND $1 = ANY (l.targets)",
                        &[&ep.id],
                    )
                    .await
                    .map_err(e)?;
                Ok(r.get::<_, i64>(0).max(0) as u64)
            }
        }
    }

    /// The newest `limit` attempts of an endpoint, newest first.
    pub async fn deliveries(&self, endpoint: &str, limit: usize) -> R<Vec<Attempt>> {
        match self {
            Outbox::Memory(m) => Ok(Self::mem(m)
                .cursors
                .get(endpoint)
                .map(|c| c.log.iter().rev().take(limit).cloned().collect())
                .unwrap_or_default()),
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let rows = c
                    .query(
                        "SELECT message_id, type, attempt, at, status, response_status, error FROM webhook_deliveries \
                         WHERE endpoint_id = $1 ORDER BY at DESC, attempt DESC LIMIT $2",
                        &[&endpoint, &(limit as i64)],
                    )
                    .await
                    .map_err(e)?;
                Ok(rows
                    .iter()
                    .map(|r| Attempt {
                        message_id: r.get(0),
                        kind: r.get(1),
                        attempt: r.get::<_, i32>(2).max(0) as u32,
                        at: r.get(3),
                        status: match r.get::<_, &str>(4) {
                            "delivered" => "delivered",
                            "failed" => "failed",
                            _ => "retrying",
                        },
                        response_status: r
                            .get::<_, Option<i32>>(5)
                            .and_then(|s| u16::try_from(s).ok()),
                        error: r.get(6),
                    })
                    .collect())
            }
        }
    }

    /// Removes every record about a user (erasure): pending messages and what was kept of
    /// delivered ones. Returns how many messages were still pending.
    pub async fn erase_jid(&self, jid: &str) -> R<u64> {
        match self {
            Outbox::Memory(m) => {
                let mut g = Self::mem(m);
                let g = &mut *g;
                let mut n = 0;
                // One pass over the log, whatever its length.
                for r in g.records.iter_mut() {
                    if r.jid.as_ref().map(|j| j.as_str()) != Some(jid) {
                        continue;
                    }
                    n += r
                        .targets
                        .iter()
                        .filter(|t| g.cursors.get(&t.id).is_some_and(|c| c.after < r.seq))
                        .count() as u64;
                    r.targets = Arc::from(Vec::new());
                    r.source = None;
                    r.body = None;
                    r.jid = None;
                }
                Ok(n)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let r = c
                    .query_one(
                        "WITH d AS (DELETE FROM webhook_log WHERE jid = $1 RETURNING seq, targets) \
                         SELECT count(*) FROM d CROSS JOIN LATERAL unnest(d.targets) AS t(id) \
                           JOIN webhook_cursors c ON c.endpoint_id = t.id AND d.seq > c.after_seq",
                        &[&jid],
                    )
                    .await
                    .map_err(e)?;
                Ok(r.get::<_, i64>(0).max(0) as u64)
            }
        }
    }

    /// The endpoints made through the API (Postgres only).
    pub async fn load_endpoints(&self) -> R<Vec<Endpoint>> {
        let Outbox::Postgres(pool) = self else {
            return Ok(Vec::new());
        };
        let c = pool.get().await.map_err(e)?;
        let rows = c
            .query(
                "SELECT id, url, secret, events, domains, jids FROM webhook_endpoints ORDER BY id",
                &[],
            )
            .await
            .map_err(e)?;
        rows.iter()
            .map(|r| {
                let cfg = WebhookConfig {
                    id: r.get(0),
                    url: r.get(1),
                    secret: Secret::new(r.get::<_, String>(2)),
                    secret_file: None,
                    events: r.get(3),
                    domains: r.get(4),
                    jids: r.get(5),
                };
                Endpoint::new(&cfg, Source::Api)
            })
            .collect()
    }

    /// Keeps an API endpoint (Postgres only; memory mode keeps it in the running set).
    pub async fn save_endpoint(&self, ep: &Endpoint) -> R<()> {
        let Outbox::Postgres(pool) = self else {
            return Ok(());
        };
        let c = pool.get().await.map_err(e)?;
        c.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, events, domains, jids) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&ep.id, &ep.url, &ep.secret(), &ep.events, &ep.domains, &ep.jids],
        )
        .await
        .map_err(e)?;
        Ok(())
    }

    /// Forgets an API endpoint: its cursor (so its pending messages), its log, itself.
    pub async fn delete_endpoint(&self, id: &str) -> R<()> {
        match self {
            Outbox::Memory(m) => {
                Self::mem(m).cursors.remove(id);
                Ok(())
            }
            Outbox::Postgres(pool) => {
                let mut c = pool.get().await.map_err(e)?;
                let tx = c.transaction().await.map_err(e)?;
                for sql in [
                    "DELETE FROM webhook_cursors WHERE endpoint_id = $1",
                    "DELETE FROM webhook_deliveries WHERE endpoint_id = $1",
                    "DELETE FROM webhook_endpoints WHERE id = $1",
                ] {
                    tx.execute(sql, &[&id]).await.map_err(e)?;
                }
                tx.commit().await.map_err(e)
            }
        }
    }

    /// Forgets the cursors of endpoints that are gone (`live` are the ids in use), drops the
    /// records every endpoint has finished with, and log entries after a week.
    pub async fn prune(&self, live: &[String]) -> R<()> {
        let Outbox::Postgres(pool) = self else {
            return Ok(());
        };
        let c = pool.get().await.map_err(e)?;
        c.execute(
            "DELETE FROM webhook_cursors WHERE endpoint_id <> ALL ($1)",
            &[&live],
        )
        .await
        .map_err(e)?;
        c.execute(
            "DELETE FROM webhook_log WHERE seq <= coalesce((SELECT min(after_seq) FROM webhook_cursors), \
                                                        (SELECT max(seq) FROM webhook_log))",
            &[],
        )
        .await
        .map_err(e)?;
        c.execute(
            "DELETE FROM webhook_deliveries WHERE at < now() - interval '7 days'",
            &[],
        )
        .await
        .map_err(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str) -> Arc<Endpoint> {
        let cfg = WebhookConfig {
            id: id.into(),
            url: "http://127.0.0.1:1/".into(),
            secret: Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            events: vec!["presence.online".into()],
            ..WebhookConfig::default()
        };
        Arc::new(Endpoint::new(&cfg, Source::Config).unwrap())
    }

    fn record(i: u128, jid: &str, targets: &[&Arc<Endpoint>]) -> Record {
        Record {
            rid: i,
            kind: "presence.online",
            body: BodySource::Ready(Arc::from(format!("{{\"n\":{i}}}"))),
            jid: crate::presence::UserJid::parse(jid).ok(),
            targets: targets
                .iter()
                .map(|t| Arc::clone(t))
                .collect::<Vec<_>>()
                .into(),
        }
    }

    fn delivered(p: &Pending) -> Attempt {
        Attempt {
            message_id: p.id.clone(),
            kind: p.kind.clone(),
            attempt: p.attempts + 1,
            at: Utc::now(),
            status: "delivered",
            response_status: Some(204),
            error: None,
        }
    }

    #[tokio::test]
    async fn each_endpoint_reads_its_own_records_after_its_own_cursor() {
        let o = Outbox::memory();
        let (a, b) = (endpoint("a"), endpoint("b"));
        o.register(&a).await.unwrap();
        // Before b exists: nothing of this is for b.
        o.append(&[record(1, "u@x.example", &[&a])]).await.unwrap();
        o.register(&b).await.unwrap();
        o.append(&[
            record(2, "u@x.example", &[&a, &b]),
            record(3, "v@x.example", &[&b]),
            record(4, "v@x.example", &[&a]),
        ])
        .await
        .unwrap();
        let na = o.next(&a, 10).await.unwrap();
        let nb = o.next(&b, 10).await.unwrap();
        assert_eq!(
            na.iter().map(|p| &*p.body).collect::<Vec<_>>(),
            [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":4}"#]
        );
        assert_eq!(
            nb.iter().map(|p| &*p.body).collect::<Vec<_>>(),
            [r#"{"n":2}"#, r#"{"n":3}"#]
        );
        // One record, two endpoints: two webhook-ids, each stable.
        assert_ne!(na[1].id, nb[0].id);
        assert_eq!(o.next(&b, 1).await.unwrap()[0].id, nb[0].id);
        assert_eq!(o.pending(&a).await.unwrap(), 3);
        // a finishes two and is retrying its third; b is untouched.
        o.record(
            "a",
            &Progress {
                attempts: vec![delivered(&na[0]), delivered(&na[1])],
                finished_through: Some(na[1].seq),
                retry: Some((na[2].seq, 1, Utc::now() + chrono::Duration::seconds(30))),
            },
        )
        .await
        .unwrap();
        let na = o.next(&a, 10).await.unwrap();
        assert_eq!(na.len(), 1);
        assert_eq!(
            na[0].attempts, 1,
            "the retry state comes back with the head"
        );
        assert!(na[0].next_attempt_at > Utc::now());
        assert_eq!(o.pending(&b).await.unwrap(), 2);
        assert_eq!(o.deliveries("a", 10).await.unwrap().len(), 2);
        // Erasure: v's records go; one was pending for b, one for a.
        assert_eq!(o.erase_jid("v@x.example").await.unwrap(), 2);
        assert!(o.next(&a, 10).await.unwrap().is_empty());
        assert_eq!(o.next(&b, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn memory_mode_drops_the_oldest_beyond_its_bound_and_says_how_many() {
        let o = Outbox::memory();
        let (a, b) = (endpoint("a"), endpoint("b"));
        o.register(&a).await.unwrap();
        o.register(&b).await.unwrap();
        let batch: Vec<Record> = (0..MEMORY_RECORDS as u128 + 5)
            .map(|i| record(i, "a@x.example", &[&a, &b]))
            .collect();
        // 5 records dropped, each owed to both endpoints.
        assert_eq!(o.append(&batch).await.unwrap(), 10);
        assert_eq!(o.pending(&a).await.unwrap(), MEMORY_RECORDS as u64);
        let next = o.next(&a, 1).await.unwrap();
        assert_eq!(&*next[0].body, r#"{"n":5}"#, "the oldest went first");
        assert_eq!(
            o.erase_jid("a@x.example").await.unwrap(),
            2 * MEMORY_RECORDS as u64
        );
        // Records both endpoints have finished with are let go at the next append.
        for ep in [&a, &b] {
            o.record(
                &ep.id,
                &Progress {
                    finished_through: Some(MEMORY_RECORDS as i64 + 5),
                    ..Progress::default()
                },
            )
            .await
            .unwrap();
        }
        o.append(&[record(9, "c@x.example", &[&a])]).await.unwrap();
        let Outbox::Memory(m) = &o else {
            unreachable!()
        };
        assert_eq!(m.lock().unwrap().records.len(), 1);
    }
}
