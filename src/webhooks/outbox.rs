//! The webhook outbox: messages per endpoint in order, their delivery state and a delivery
//! log. In Postgres (schema V6) when a store is configured — a message is accepted once its
//! batch is committed, and survives restarts — otherwise in memory (bounded).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::{Endpoint, Message, Source};
use crate::config::{Secret, WebhookConfig};

/// Pending messages kept per endpoint in memory mode (the oldest are dropped beyond it).
const MEMORY_PENDING: usize = 100_000;
/// Delivery log entries kept per endpoint in memory mode.
const MEMORY_LOG: usize = 1_000;

/// A message waiting for delivery.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Order within its endpoint.
    pub ord: i64,
    /// `webhook-id`.
    pub id: String,
    /// Event type.
    pub kind: String,
    /// JSON body (shared by the endpoints of one change in memory mode).
    pub body: std::sync::Arc<str>,
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

/// One endpoint's messages and log in memory mode.
#[derive(Debug, Default)]
pub struct MemEndpoint {
    pending: VecDeque<Pending>,
    jids: HashMap<String, String>,
    log: VecDeque<Attempt>,
    next_ord: i64,
}

/// Where messages wait.
#[derive(Debug)]
pub enum Outbox {
    /// This run only.
    Memory(Mutex<HashMap<String, MemEndpoint>>),
    /// Durable.
    Postgres(Pool),
}

type R<T> = Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

impl Outbox {
    /// An in-memory outbox.
    pub fn memory() -> Outbox {
        Outbox::Memory(Mutex::default())
    }

    fn mem(
        m: &Mutex<HashMap<String, MemEndpoint>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, MemEndpoint>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a batch (in Postgres: one transaction). Returns how many older pending
    /// messages memory mode dropped to stay within its bound (Postgres never drops).
    pub async fn append(&self, batch: &[Message]) -> R<u64> {
        match self {
            Outbox::Memory(m) => {
                let mut g = Self::mem(m);
                let mut dropped = 0;
                for msg in batch {
                    let ep = g.entry(msg.endpoint.clone()).or_default();
                    ep.next_ord += 1;
                    if ep.pending.len() >= MEMORY_PENDING
                        && let Some(old) = ep.pending.pop_front()
                    {
                        ep.jids.remove(&old.id);
                        dropped += 1;
                    }
                    if let Some(j) = &msg.jid {
                        ep.jids.insert(msg.id.clone(), j.clone());
                    }
                    let ord = ep.next_ord;
                    ep.pending.push_back(Pending {
                        ord,
                        id: msg.id.clone(),
                        kind: msg.kind.to_owned(),
                        body: msg.body.clone(),
                        attempts: 0,
                        next_attempt_at: Utc::now(),
                    });
                }
                Ok(dropped)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let eps: Vec<&str> = batch.iter().map(|m| m.endpoint.as_str()).collect();
                let ids: Vec<&str> = batch.iter().map(|m| m.id.as_str()).collect();
                let kinds: Vec<&str> = batch.iter().map(|m| m.kind).collect();
                let bodies: Vec<&str> = batch.iter().map(|m| &*m.body).collect();
                let jids: Vec<Option<&str>> = batch.iter().map(|m| m.jid.as_deref()).collect();
                // Identity values are drawn in the order of the array: the endpoint's order.
                c.execute(
                    "INSERT INTO webhook_messages (endpoint_id, id, type, body, jid) \
                     SELECT e, i, t, b, j FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                       WITH ORDINALITY AS x(e, i, t, b, j, n) ORDER BY n",
                    &[&eps, &ids, &kinds, &bodies, &jids],
                )
                .await
                .map_err(e)?;
                Ok(0)
            }
        }
    }

    /// The next `n` pending messages of an endpoint, in order.
    pub async fn next(&self, endpoint: &str, n: usize) -> R<Vec<Pending>> {
        match self {
            Outbox::Memory(m) => Ok(Self::mem(m)
                .get(endpoint)
                .map(|ep| ep.pending.iter().take(n).cloned().collect())
                .unwrap_or_default()),
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let rows = c
                    .query(
                        "SELECT ord, id, type, body, attempts, next_attempt_at FROM webhook_messages \
                         WHERE endpoint_id = $1 AND status = 'pending' ORDER BY ord LIMIT $2",
                        &[&endpoint, &(n as i64)],
                    )
                    .await
                    .map_err(e)?;
                Ok(rows
                    .iter()
                    .map(|r| Pending {
                        ord: r.get(0),
                        id: r.get(1),
                        kind: r.get(2),
                        body: std::sync::Arc::from(r.get::<_, &str>(3)),
                        attempts: r.get::<_, i32>(4).max(0) as u32,
                        next_attempt_at: r.get(5),
                    })
                    .collect())
            }
        }
    }

    /// Records one attempt: delivered or failed ends the message; retrying sets its next time.
    pub async fn record(
        &self,
        endpoint: &str,
        m: &Pending,
        a: &Attempt,
        next: DateTime<Utc>,
    ) -> R<()> {
        match self {
            Outbox::Memory(mm) => {
                let mut g = Self::mem(mm);
                let ep = g.entry(endpoint.to_owned()).or_default();
                if let Some(pos) = ep.pending.iter().position(|p| p.id == m.id) {
                    if a.status == "retrying" {
                        if let Some(p) = ep.pending.get_mut(pos) {
                            p.attempts = a.attempt;
                            p.next_attempt_at = next;
                        }
                    } else {
                        ep.pending.remove(pos);
                        ep.jids.remove(&m.id);
                    }
                }
                if ep.log.len() >= MEMORY_LOG {
                    ep.log.pop_front();
                }
                ep.log.push_back(a.clone());
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
                let status = if a.status == "retrying" {
                    "pending"
                } else {
                    a.status
                };
                tx.execute(
                    "UPDATE webhook_messages SET status = $3, attempts = $4, next_attempt_at = $5 \
                     WHERE endpoint_id = $1 AND ord = $2",
                    &[&endpoint, &m.ord, &status, &(a.attempt as i32), &next],
                )
                .await
                .map_err(e)?;
                tx.execute(
                    "INSERT INTO webhook_deliveries (endpoint_id, message_id, type, attempt, at, status, response_status, error) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &endpoint,
                        &a.message_id,
                        &a.kind,
                        &(a.attempt as i32),
                        &a.at,
                        &a.status,
                        &a.response_status.map(i32::from),
                        &a.error,
                    ],
                )
                .await
                .map_err(e)?;
                tx.commit().await.map_err(e)
            }
        }
    }

    /// Pending messages of an endpoint.
    pub async fn pending(&self, endpoint: &str) -> R<u64> {
        match self {
            Outbox::Memory(m) => Ok(Self::mem(m)
                .get(endpoint)
                .map_or(0, |ep| ep.pending.len() as u64)),
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                let r = c
                    .query_one(
                        "SELECT count(*) FROM webhook_messages WHERE endpoint_id = $1 AND status = 'pending'",
                        &[&endpoint],
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
                .get(endpoint)
                .map(|ep| ep.log.iter().rev().take(limit).cloned().collect())
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

    /// Removes every pending message about a user (erasure); how many.
    pub async fn erase_jid(&self, jid: &str) -> R<u64> {
        match self {
            Outbox::Memory(m) => {
                let mut n = 0;
                for ep in Self::mem(m).values_mut() {
                    // One pass over the pending messages, whatever their number.
                    let ids: std::collections::HashSet<String> = ep
                        .jids
                        .iter()
                        .filter(|(_, j)| *j == jid)
                        .map(|(i, _)| i.clone())
                        .collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let before = ep.pending.len();
                    ep.pending.retain(|p| !ids.contains(&p.id));
                    n += (before - ep.pending.len()) as u64;
                    ep.jids.retain(|i, _| !ids.contains(i));
                }
                Ok(n)
            }
            Outbox::Postgres(pool) => {
                let c = pool.get().await.map_err(e)?;
                c.execute(
                    "DELETE FROM webhook_messages WHERE jid = $1 AND status = 'pending'",
                    &[&jid],
                )
                .await
                .map_err(e)
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

    /// Forgets an API endpoint, its messages and its log.
    pub async fn delete_endpoint(&self, id: &str) -> R<()> {
        match self {
            Outbox::Memory(m) => {
                Self::mem(m).remove(id);
                Ok(())
            }
            Outbox::Postgres(pool) => {
                let mut c = pool.get().await.map_err(e)?;
                let tx = c.transaction().await.map_err(e)?;
                for sql in [
                    "DELETE FROM webhook_messages WHERE endpoint_id = $1",
                    "DELETE FROM webhook_deliveries WHERE endpoint_id = $1",
                    "DELETE FROM webhook_endpoints WHERE id = $1",
                ] {
                    tx.execute(sql, &[&id]).await.map_err(e)?;
                }
                tx.commit().await.map_err(e)
            }
        }
    }

    /// Drops delivered and failed messages after a day and log entries after a week.
    pub async fn prune(&self) -> R<()> {
        let Outbox::Postgres(pool) = self else {
            return Ok(());
        };
        let c = pool.get().await.map_err(e)?;
        c.execute(
            "DELETE FROM webhook_messages WHERE status <> 'pending' AND created_at < now() - interval '1 day'",
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

    #[tokio::test]
    async fn memory_mode_drops_the_oldest_beyond_its_bound_and_says_how_many() {
        let o = Outbox::memory();
        let body: std::sync::Arc<str> = std::sync::Arc::from("{}");
        let batch: Vec<Message> = (0..MEMORY_PENDING + 5)
            .map(|i| Message {
                endpoint: "e".into(),
                id: format!("msg_{i}"),
                kind: "presence.online",
                body: body.clone(),
                jid: Some("a@x.example".into()),
            })
            .collect();
        assert_eq!(o.append(&batch).await.unwrap(), 5);
        assert_eq!(o.pending("e").await.unwrap(), MEMORY_PENDING as u64);
        let next = o.next("e", 1).await.unwrap();
        assert_eq!(next[0].id, "msg_5", "the oldest went first");
        // Their erasure bookkeeping went with them.
        assert_eq!(
            o.erase_jid("a@x.example").await.unwrap(),
            MEMORY_PENDING as u64
        );
    }
}
