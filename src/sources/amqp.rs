//! The AMQP source (contract §9): MongooseIM's `mod_event_pusher_rabbit` publishes one message
//! per session start and end to a topic exchange (`presence`), routing key = the user's bare
//! JID, body `{"user_id":"alice@localhost/res1","present":true|false}` (full JID, lower case).
//!
//! One task owns the connection: connect → declare the exchange (as MongooseIM does) and a
//! durable queue bound to it → consume with manual acks and a prefetch window. Each message
//! becomes one event: `present:true` is [`EventKind::Present`] — available (show `available`,
//! no status) *unless the resource is online already*, decided by the sequencer, so XMPP's
//! show/status is never overwritten and the two sources together make no duplicate change;
//! `present:false` is unavailable. A message is acked once the engine has accepted its event;
//! a malformed one is counted and acked (never redelivered forever); one of an untracked
//! domain is counted and acked. On any loss the consumer reconnects with capped, jittered
//! backoff; unacked messages stay in the queue and are redelivered.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::parse_full_jid;
use super::xmpp::component::backoff_delay;
use crate::config::AmqpConfig;
use crate::presence::{
    Availability, Cause, Engine, EventKind, PresenceEvent, Show, UserJid, model::new_event_id,
};
use crate::telemetry;

/// The consumer's state (`/readyz` `amqp`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AmqpStatus {
    /// Consuming.
    pub connected: bool,
    /// Since when the state holds.
    pub since: Option<DateTime<Utc>>,
    /// Successful reconnections after the first connection.
    pub reconnects: u64,
    /// Why the last connection ended or failed (credentials masked).
    pub last_error: Option<String>,
}

/// The AMQP source's metrics.
#[derive(Debug, Clone)]
pub struct AmqpMetrics {
    applied: IntCounter,
    malformed: IntCounter,
    foreign: IntCounter,
    connected: IntGauge,
    reconnects: IntCounter,
}

impl AmqpMetrics {
    /// Registers them in `r`.
    pub fn new(r: &Registry) -> Self {
        let messages: IntCounterVec = telemetry::counter_vec(
            r,
            "presence_bridge_amqp_messages_total",
            "Event pusher messages consumed, by result (applied, malformed, foreign_domain)",
            &["result"],
        );
        Self {
            applied: messages.with_label_values(&["applied"]),
            malformed: messages.with_label_values(&["malformed"]),
            foreign: messages.with_label_values(&["foreign_domain"]),
            connected: telemetry::gauge(
                r,
                "presence_bridge_amqp_connected",
                "1 while the AMQP consumer is connected",
            ),
            reconnects: telemetry::counter(
                r,
                "presence_bridge_amqp_reconnects_total",
                "Successful AMQP reconnections",
            ),
        }
    }
}

/// Handle to the running consumer.
#[derive(Debug, Clone)]
pub struct AmqpHandle {
    status: watch::Receiver<AmqpStatus>,
}

impl AmqpHandle {
    /// The current state.
    pub fn status(&self) -> AmqpStatus {
        self.status.borrow().clone()
    }
}

/// What one message says, or why it is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A session of a tracked user started (`true`) or ended (`false`).
    Session {
        /// The user.
        jid: UserJid,
        /// The resource.
        resource: String,
        /// Started or ended.
        present: bool,
    },
    /// A user of a domain not in `xmpp.domains`.
    Foreign(String),
    /// Not a message of the documented shape.
    Malformed(String),
}

/// Unknown fields are ignored: a newer MongooseIM may add some.
#[derive(Deserialize)]
struct Body {
    user_id: String,
    present: bool,
}

/// Parses one message body (at most `max_bytes`).
pub fn parse(body: &[u8], max_bytes: usize, domains: &[String]) -> Message {
    if body.len() > max_bytes {
        return Message::Malformed(format!("{} bytes (limit {max_bytes})", body.len()));
    }
    let b: Body = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return Message::Malformed(format!("not {{\"user_id\",\"present\"}}: {e}")),
    };
    let Some((jid, resource)) = parse_full_jid(&b.user_id) else {
        return Message::Malformed("user_id is not a user's JID".into());
    };
    if !domains.iter().any(|d| d.eq_ignore_ascii_case(jid.domain())) {
        return Message::Foreign(jid.domain().to_owned());
    }
    let Some(resource) = resource else {
        return Message::Malformed("user_id has no resource".into());
    };
    Message::Session {
        jid,
        resource,
        present: b.present,
    }
}

/// Starts the consumer as a task of `tasks`; it ends only on `cancel`.
pub fn spawn(
    cfg: AmqpConfig,
    domains: Vec<String>,
    engine: Engine,
    cancel: CancellationToken,
    metrics: AmqpMetrics,
    tasks: &TaskTracker,
) -> AmqpHandle {
    let (tx, rx) = watch::channel(AmqpStatus {
        since: Some(Utc::now()),
        ..AmqpStatus::default()
    });
    let consumer = Consumer {
        cfg,
        domains,
        engine,
        cancel,
        metrics,
        status: tx,
    };
    tasks.spawn(consumer.run());
    AmqpHandle { status: rx }
}

struct Consumer {
    cfg: AmqpConfig,
    domains: Vec<String>,
    engine: Engine,
    cancel: CancellationToken,
    metrics: AmqpMetrics,
    status: watch::Sender<AmqpStatus>,
}

enum End {
    Cancelled,
    Lost(String),
}

impl Consumer {
    async fn run(self) {
        let mut attempt = 0u32;
        let mut ever = false;
        loop {
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = tokio::time::timeout(Duration::from_secs(15), self.connect()) => c,
            };
            let why = match conn {
                Ok(Ok((conn, consumer))) => {
                    tracing::info!(url = %self.cfg.url.masked(), queue = %self.cfg.queue, exchange = %self.cfg.exchange, "AMQP consumer connected");
                    if ever {
                        self.metrics.reconnects.inc();
                    }
                    self.metrics.connected.set(1);
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.since = Some(Utc::now());
                        if ever {
                            s.reconnects += 1;
                        }
                    });
                    ever = true;
                    attempt = 0;
                    let end = self.consume(consumer).await;
                    self.metrics.connected.set(0);
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.since = Some(Utc::now());
                    });
                    match end {
                        End::Cancelled => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(2),
                                conn.close(200, "presence-bridge stopping".into()),
                            )
                            .await;
                            return;
                        }
                        End::Lost(why) => why,
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => "connect + declare took longer than 15 s".into(),
            };
            let why = crate::config::mask_url_password(&why);
            tracing::warn!(reason = %why, attempt, "AMQP consumer disconnected; reconnecting");
            self.status.send_modify(|s| s.last_error = Some(why));
            let delay = backoff_delay(
                self.cfg.reconnect_min_secs,
                self.cfg.reconnect_max_secs,
                attempt,
            );
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self) -> Result<(Connection, lapin::Consumer), String> {
        let conn = Connection::connect(self.cfg.url.expose(), ConnectionProperties::default())
            .await
            .map_err(|e| format!("connecting to {} (amqp.url): {e}", self.cfg.url.masked()))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos: {e}"))?;
        ch.exchange_declare(
            self.cfg.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: self.cfg.exchange_durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            format!(
                "declaring topic exchange {:?} (durable = {}, amqp.exchange_durable; it must match how MongooseIM declares it): {e}",
                self.cfg.exchange, self.cfg.exchange_durable
            )
        })?;
        ch.queue_declare(
            self.cfg.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declaring queue {:?} (amqp.queue): {e}", self.cfg.queue))?;
        ch.queue_bind(
            self.cfg.queue.as_str().into(),
            self.cfg.exchange.as_str().into(),
            self.cfg.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            format!(
                "binding {:?} to {:?}: {e}",
                self.cfg.queue, self.cfg.exchange
            )
        })?;
        let consumer = ch
            .basic_consume(
                self.cfg.queue.as_str().into(),
                "presence-bridge".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("basic.consume: {e}"))?;
        Ok((conn, consumer))
    }

    async fn consume(&self, mut consumer: lapin::Consumer) -> End {
        loop {
            let delivery = tokio::select! {
                _ = self.cancel.cancelled() => return End::Cancelled,
                d = consumer.next() => d,
            };
            let delivery = match delivery {
                None => return End::Lost("the broker ended the consumer".into()),
                Some(Err(e)) => return End::Lost(format!("consumer: {e}")),
                Some(Ok(d)) => d,
            };
            match parse(&delivery.data, self.cfg.max_message_bytes, &self.domains) {
                Message::Session {
                    jid,
                    resource,
                    present,
                } => {
                    let now = Utc::now();
                    let kind = if present {
                        EventKind::Present(Availability {
                            show: Show::Available,
                            status: None,
                            priority: 0,
                            client: None,
                            idle_since: None,
                        })
                    } else {
                        EventKind::Unavailable {
                            status: None,
                            reason: None,
                        }
                    };
                    let ev = PresenceEvent {
                        id: new_event_id(),
                        jid,
                        resource,
                        kind,
                        at: now,
                        received_at: now,
                        cause: Cause::Amqp,
                    };
                    if self.engine.apply(ev).await.is_err() {
                        // Not acked: the broker redelivers it to the next run.
                        return End::Cancelled;
                    }
                    self.metrics.applied.inc();
                }
                Message::Foreign(domain) => {
                    self.metrics.foreign.inc();
                    tracing::debug!(%domain, "AMQP: user of an untracked domain");
                }
                Message::Malformed(why) => {
                    self.metrics.malformed.inc();
                    tracing::warn!(reason = %why, routing_key = %delivery.routing_key, "AMQP: malformed event pusher message (acked and skipped)");
                }
            }
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                return End::Lost(format!("ack: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec!["localhost".into()]
    }

    #[test]
    fn parses_the_event_pushers_shape() {
        let m = parse(
            br#"{"user_id":"alice@localhost/res1","present":true}"#,
            4096,
            &domains(),
        );
        let Message::Session {
            jid,
            resource,
            present,
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(
            (jid.as_str(), resource.as_str(), present),
            ("alice@localhost", "res1", true)
        );
        assert!(matches!(
            parse(
                br#"{"user_id":"Bob@LOCALHOST/x","present":false}"#,
                4096,
                &domains()
            ),
            Message::Session { present: false, .. }
        ));
        // A field a newer server may add does not make the message malformed.
        assert!(matches!(
            parse(
                br#"{"user_id":"bob@localhost/x","present":true,"ts":1}"#,
                4096,
                &domains()
            ),
            Message::Session { present: true, .. }
        ));
    }

    #[test]
    fn everything_else_is_malformed_or_foreign() {
        for bad in [
            &b"not json"[..],
            br#"{"user_id":"alice@localhost/r"}"#,
            br#"{"user_id":"alice@localhost/r","present":"yes"}"#,
            br#"{"user_id":"alice@localhost","present":true}"#,
            br#"{"user_id":"localhost/r","present":true}"#,
            br#"{"user_id":"@@@","present":true}"#,
            br#"[1,2]"#,
            b"",
        ] {
            assert!(
                matches!(parse(bad, 4096, &domains()), Message::Malformed(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!(
            r#"{{"user_id":"alice@localhost/{}","present":true}}"#,
            "r".repeat(5000)
        );
        assert!(matches!(
            parse(big.as_bytes(), 4096, &domains()),
            Message::Malformed(_)
        ));
        assert_eq!(
            parse(
                br#"{"user_id":"eve@elsewhere.example/r","present":true}"#,
                4096,
                &domains()
            ),
            Message::Foreign("elsewhere.example".into())
        );
    }
}
