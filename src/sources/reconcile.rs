//! The reconciler (contract §10): compares the presence map with the XMPP server's own session
//! list and corrects the difference.
//!
//! - **found**: a user the server has a session for whose resource the map lacks. With an XMPP
//!   component the user is probed (its answer enters the map with cause `reconcile`, carrying
//!   the real show/status); with no component (the AMQP source alone) the resource is applied
//!   as `available` with the server's priority.
//! - **closed**: a resource the map has, the server lacks, and whose user has not changed for a
//!   full interval before the list was fetched (so a session that began or ended while the
//!   list was being fetched is never "corrected"): unavailable, cause `reconcile`.
//!
//! Runs right after every XMPP (re)connect — on MongooseIM a session that started while the
//! component was away is silent until probed, and on every server a user the bridge never saw
//! is not among the probes of a resync — then every `interval_secs`, and on
//! `POST /api/v1/admin/reconcile`. Bounded: one run at a time, a timeout and a size limit on the
//! server's answer, corrections at most `max_corrections_per_sec`, no "closed" corrections while
//! a resync round is still deciding, and none at all while the XMPP component is disconnected
//! (the map is stale then, and a probe could not go out).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prometheus::{IntCounter, IntCounterVec, Registry};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::parse_full_jid;
use super::xmpp::ComponentHandle;
use crate::config::{ReconcileConfig, ReconcileKind};
use crate::presence::{
    Availability, Cause, Engine, EventKind, PresenceEvent, Show, UserJid, model::new_event_id,
};
use crate::telemetry;

/// Why a run failed. Messages never carry the password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReconcileError {
    /// The server could not be reached or did not answer in time.
    #[error("reconcile: request to {url} failed: {reason}")]
    Unreachable {
        /// The URL asked (no credentials in it).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The server answered, but not with a session list.
    #[error("reconcile: {url} answered {detail}")]
    BadAnswer {
        /// The URL asked.
        url: String,
        /// Status and the start of the body, or the parse error.
        detail: String,
    },
    /// The XMPP component is disconnected: the map is stale and probes cannot go out.
    #[error("reconcile: the XMPP component is disconnected; nothing is corrected until it is back")]
    Disconnected,
    /// The bridge is shutting down.
    #[error("reconcile: the presence engine has stopped")]
    Stopped,
}

/// What one run did (`POST /api/v1/admin/reconcile`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    /// Sessions the server listed in the tracked domains.
    pub checked: u64,
    /// Users probed (or, without an XMPP component, resources applied) because the map lacked
    /// one of their sessions.
    pub probed: u64,
    /// Resources closed because the server had no session for them.
    pub closed: u64,
}

/// The reconciler's metrics.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    runs: IntCounterVec,
    found: IntCounter,
    closed: IntCounter,
}

impl ReconcileMetrics {
    /// Registers them in `r`.
    pub fn new(r: &Registry) -> Self {
        let corrections = telemetry::counter_vec(
            r,
            "presence_bridge_reconcile_corrections_total",
            "Corrections made by the reconciler, by direction (found = probed/applied, closed)",
            &["direction"],
        );
        Self {
            runs: telemetry::counter_vec(
                r,
                "presence_bridge_reconcile_runs_total",
                "Reconcile runs, by result (ok, error, skipped)",
                &["result"],
            ),
            found: corrections.with_label_values(&["found"]),
            closed: corrections.with_label_values(&["closed"]),
        }
    }
}

/// One session the server reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSession {
    /// The user.
    pub jid: UserJid,
    /// Its resource.
    pub resource: String,
    /// The session's priority, when the server says.
    pub priority: i8,
}

/// The reconciler. Cheap to share (`Arc`); `run` serialises itself.
#[derive(Debug)]
pub struct Reconciler {
    cfg: ReconcileConfig,
    domains: HashSet<String>,
    client: reqwest::Client,
    engine: Engine,
    component: Option<ComponentHandle>,
    metrics: ReconcileMetrics,
    running: tokio::sync::Mutex<()>,
}

impl Reconciler {
    /// A reconciler for the users of `domains`.
    pub fn new(
        cfg: ReconcileConfig,
        domains: &[String],
        engine: Engine,
        component: Option<ComponentHandle>,
        metrics: ReconcileMetrics,
    ) -> Result<Self, ReconcileError> {
        let client =
            super::http_client(cfg.timeout_secs).map_err(|e| ReconcileError::Unreachable {
                url: cfg.url.clone(),
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(Self {
            domains: domains.iter().map(|d| d.to_lowercase()).collect(),
            cfg,
            client,
            engine,
            component,
            metrics,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// One run: fetch, compare, correct. Waits for a run in progress to finish first.
    pub async fn run(&self) -> Result<Outcome, ReconcileError> {
        let _one_at_a_time = self.running.lock().await;
        let r = self.run_locked().await;
        let label = match &r {
            Ok(_) => "ok",
            Err(ReconcileError::Disconnected) => "skipped",
            Err(_) => "error",
        };
        self.metrics.runs.with_label_values(&[label]).inc();
        match &r {
            Ok(o) if o.probed + o.closed > 0 => {
                tracing::info!(
                    checked = o.checked,
                    probed = o.probed,
                    closed = o.closed,
                    "reconcile: corrected the presence map"
                )
            }
            Ok(o) => tracing::debug!(checked = o.checked, "reconcile: map agrees with the server"),
            Err(e) => tracing::warn!("{e}"),
        }
        r
    }

    async fn run_locked(&self) -> Result<Outcome, ReconcileError> {
        let status = self.component.as_ref().map(|c| c.status());
        if status.as_ref().is_some_and(|s| !s.connected) {
            return Err(ReconcileError::Disconnected);
        }
        let resyncing = status.as_ref().is_some_and(|s| s.resyncing);
        let fetched_at = Utc::now();
        let sessions = self.fetch().await?;
        let mut outcome = Outcome {
            checked: sessions.len() as u64,
            ..Outcome::default()
        };
        let mut server: HashMap<UserJid, Vec<&ServerSession>> = HashMap::new();
        for s in &sessions {
            server.entry(s.jid.clone()).or_default().push(s);
        }
        let snapshot = self
            .engine
            .snapshot()
            .await
            .map_err(|_| ReconcileError::Stopped)?;

        let mut found: Vec<(UserJid, Vec<&ServerSession>)> = Vec::new();
        for (jid, list) in &server {
            let have: HashSet<&str> = match snapshot.users.get(jid) {
                Some(u) => u.resources.iter().map(|r| r.resource.as_str()).collect(),
                None => HashSet::new(),
            };
            let missing: Vec<&ServerSession> = list
                .iter()
                .copied()
                .filter(|s| !have.contains(s.resource.as_str()))
                .collect();
            if !missing.is_empty() {
                found.push((jid.clone(), missing));
            }
        }
        let quiet_before = fetched_at
            - chrono::Duration::from_std(self.cfg.interval_secs).unwrap_or(chrono::Duration::MAX);
        let mut gone: Vec<(UserJid, String)> = Vec::new();
        if !resyncing {
            for user in snapshot.iter() {
                if !self.domains.contains(user.jid.domain()) || user.last_change > quiet_before {
                    continue;
                }
                let on_server = server.get(&user.jid);
                for r in &user.resources {
                    let listed =
                        on_server.is_some_and(|l| l.iter().any(|s| s.resource == r.resource));
                    if !listed {
                        gone.push((user.jid.clone(), r.resource.clone()));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));

        // Corrections at a bounded rate: per 100 ms tick, a tenth of the per-second budget.
        let per_tick = (self.cfg.max_corrections_per_sec / 10).max(1) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut budget = 0usize;
        let mut pace = async || {
            if budget == 0 {
                tick.tick().await;
                budget = per_tick;
            }
            budget -= 1;
        };
        for (jid, missing) in found {
            pace().await;
            match &self.component {
                Some(c) => {
                    if !c.probe(&jid) {
                        tracing::warn!(jid = %jid, "reconcile: probe queue full; the next run tries again");
                        continue;
                    }
                    tracing::info!(jid = %jid, resources = missing.len(), "reconcile: the server has a session the map lacks: probing");
                }
                None => {
                    for s in missing {
                        tracing::info!(jid = %jid, resource = %s.resource, "reconcile: the server has a session the map lacks: marking it available");
                        self.apply(
                            &jid,
                            &s.resource,
                            EventKind::Available(Availability {
                                show: Show::Available,
                                status: None,
                                priority: s.priority,
                                client: None,
                                idle_since: None,
                            }),
                        )
                        .await?;
                    }
                }
            }
            self.metrics.found.inc();
            outcome.probed += 1;
        }
        for (jid, resource) in gone {
            pace().await;
            tracing::info!(jid = %jid, resource = %resource, "reconcile: the server has no session for this resource: closing it");
            self.apply(
                &jid,
                &resource,
                EventKind::Unavailable {
                    status: None,
                    reason: Some("not_on_server".into()),
                },
            )
            .await?;
            self.metrics.closed.inc();
            outcome.closed += 1;
        }
        Ok(outcome)
    }

    async fn apply(
        &self,
        jid: &UserJid,
        resource: &str,
        kind: EventKind,
    ) -> Result<(), ReconcileError> {
        let now = Utc::now();
        self.engine
            .apply(PresenceEvent {
                id: new_event_id(),
                jid: jid.clone(),
                resource: resource.to_owned(),
                kind,
                at: now,
                received_at: now,
                cause: Cause::Reconcile,
            })
            .await
            .map_err(|_| ReconcileError::Stopped)
    }

    /// The server's sessions in the tracked domains.
    pub async fn fetch(&self) -> Result<Vec<ServerSession>, ReconcileError> {
        match self.cfg.kind {
            ReconcileKind::Ejabberd => {
                let url = format!(
                    "{}/connected_users_info",
                    self.cfg.url.trim_end_matches('/')
                );
                let body: serde_json::Value = self.post(&url, &serde_json::json!({})).await?;
                self.parse_ejabberd(&url, body)
            }
            ReconcileKind::Mongooseim => {
                let mut all = Vec::new();
                let mut domains: Vec<&String> = self.domains.iter().collect();
                domains.sort();
                for d in domains {
                    // Domains are validated as plain DNS names, so the literal is safe; a
                    // literal (not a variable) also works whether the schema types the
                    // argument `String` or `DomainName`.
                    let query = format!(
                        "query {{ session {{ listSessions(domain: {}) {{ user priority }} }} }}",
                        serde_json::Value::String(d.clone())
                    );
                    let body = self
                        .post(&self.cfg.url, &serde_json::json!({ "query": query }))
                        .await?;
                    all.extend(self.parse_mongooseim(&self.cfg.url, body)?);
                }
                Ok(all)
            }
        }
    }

    async fn post(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ReconcileError> {
        let unreachable = |e: reqwest::Error| ReconcileError::Unreachable {
            url: url.to_owned(),
            reason: e.without_url().to_string(),
        };
        let mut req = self.client.post(url).json(body);
        if let Some(user) = &self.cfg.user {
            req = req.basic_auth(user, Some(self.cfg.password.expose()));
        }
        let mut resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if bytes.len() + chunk.len() > self.cfg.max_response_bytes {
                return Err(ReconcileError::BadAnswer {
                    url: url.to_owned(),
                    detail: format!(
                        "more than reconcile.max_response_bytes ({} bytes)",
                        self.cfg.max_response_bytes
                    ),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let start: String = text.chars().take(200).collect();
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                " (check reconcile.user / reconcile.password and the server's API permissions)"
            } else {
                ""
            };
            return Err(ReconcileError::BadAnswer {
                url: url.to_owned(),
                detail: format!("{status}{hint}: {start}"),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ReconcileError::BadAnswer {
            url: url.to_owned(),
            detail: format!("no JSON: {e}"),
        })
    }

    fn tracked(&self, full: &str, priority: Option<i64>) -> Option<ServerSession> {
        let (jid, resource) = parse_full_jid(full)?;
        if !self.domains.contains(jid.domain()) {
            return None;
        }
        let resource = resource?;
        Some(ServerSession {
            jid,
            resource,
            priority: priority.and_then(|p| i8::try_from(p).ok()).unwrap_or(0),
        })
    }

    /// ejabberd `connected_users_info`: `[{"jid":"alice@localhost/phone","priority":5,…}]`.
    fn parse_ejabberd(
        &self,
        url: &str,
        body: serde_json::Value,
    ) -> Result<Vec<ServerSession>, ReconcileError> {
        let list = body.as_array().ok_or_else(|| ReconcileError::BadAnswer {
            url: url.to_owned(),
            detail: format!("not a session list: {}", truncate(&body)),
        })?;
        Ok(list
            .iter()
            .filter_map(|s| {
                let jid = s.get("jid")?.as_str()?;
                self.tracked(jid, s.get("priority").and_then(|p| p.as_i64()))
            })
            .collect())
    }

    /// MongooseIM GraphQL: `{"data":{"session":{"listSessions":[{"user":"alice@localhost/res1",
    /// "priority":0}]}}}`; `{"errors":[{"message":…}]}` is a failure.
    fn parse_mongooseim(
        &self,
        url: &str,
        body: serde_json::Value,
    ) -> Result<Vec<ServerSession>, ReconcileError> {
        if let Some(errors) = body.get("errors").and_then(|e| e.as_array())
            && !errors.is_empty()
        {
            let msgs: Vec<&str> = errors
                .iter()
                .filter_map(|e| e.get("message")?.as_str())
                .collect();
            return Err(ReconcileError::BadAnswer {
                url: url.to_owned(),
                detail: format!("GraphQL errors: {}", msgs.join("; ")),
            });
        }
        let list = body
            .pointer("/data/session/listSessions")
            .and_then(|l| l.as_array())
            .ok_or_else(|| ReconcileError::BadAnswer {
                url: url.to_owned(),
                detail: format!("no data.session.listSessions: {}", truncate(&body)),
            })?;
        Ok(list
            .iter()
            .filter_map(|s| {
                let jid = s.get("user")?.as_str()?;
                self.tracked(jid, s.get("priority").and_then(|p| p.as_i64()))
            })
            .collect())
    }

    /// Runs every `interval_secs`, and shortly after every XMPP (re)connect, until `cancel`.
    pub fn spawn(self: Arc<Self>, cancel: CancellationToken, tasks: &TaskTracker) {
        tasks.spawn(async move {
            let mut connected = self.component.as_ref().map(|c| c.watch());
            let mut was_connected = false;
            let mut tick = tokio::time::interval(self.cfg.interval_secs);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let changed = async {
                    match connected.as_mut() {
                        Some(w) => w.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {
                        let _ = self.run().await;
                    }
                    alive = changed => {
                        if !alive {
                            connected = None;
                            continue;
                        }
                        let now = connected.as_ref().is_some_and(|w| w.borrow().connected);
                        if now && !was_connected {
                            // Right after a (re)connect: sessions that began while the
                            // component was away, and users the bridge never saw.
                            let _ = self.run().await;
                            tick.reset();
                        }
                        was_connected = now;
                    }
                }
            }
        });
    }
}

fn truncate(v: &serde_json::Value) -> String {
    v.to_string().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PresenceConfig;

    fn reconciler(kind: ReconcileKind) -> Reconciler {
        let (engine, _task) = Engine::start(&PresenceConfig::default());
        Reconciler::new(
            ReconcileConfig {
                kind,
                ..ReconcileConfig::default()
            },
            &["localhost".into()],
            engine,
            None,
            ReconcileMetrics::new(&Registry::new()),
        )
        .expect("reconciler")
    }

    #[tokio::test]
    async fn parses_ejabberd_sessions_of_tracked_domains_only() {
        let r = reconciler(ReconcileKind::Ejabberd);
        let body = serde_json::json!([
            {"jid":"Alice@LocalHost/phone","connection":"c2s","ip":"127.0.0.1","port":45444,"priority":5,"node":"n@localhost","uptime":16,"status":"away","resource":"phone","statustext":"walking"},
            {"jid":"bob@other.example/x","priority":0},
            {"jid":"no-resource@localhost","priority":0},
            {"jid":"carol@localhost/laptop","priority":999},
            {"no":"jid"}
        ]);
        let s = r.parse_ejabberd("u", body).expect("parsed");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].jid.as_str(), "alice@localhost");
        assert_eq!((s[0].resource.as_str(), s[0].priority), ("phone", 5));
        assert_eq!((s[1].resource.as_str(), s[1].priority), ("laptop", 0));
        assert!(
            r.parse_ejabberd("u", serde_json::json!({"status":"error"}))
                .is_err()
        );
    }

    #[tokio::test]
    async fn parses_mongooseim_sessions_and_errors() {
        let r = reconciler(ReconcileKind::Mongooseim);
        let body = serde_json::json!({"data":{"session":{"listSessions":[
            {"user":"alice@localhost/res1","priority":0},
            {"user":"bob@localhost/res2"}
        ]}}});
        let s = r.parse_mongooseim("u", body).expect("parsed");
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].jid.as_str(), "bob@localhost");
        let err = r
            .parse_mongooseim(
                "u",
                serde_json::json!({"errors":[{"message":"denied"}],"data":null}),
            )
            .expect_err("errors");
        assert!(err.to_string().contains("denied"), "{err}");
        assert!(
            r.parse_mongooseim("u", serde_json::json!({"data":{}}))
                .is_err()
        );
    }
}
