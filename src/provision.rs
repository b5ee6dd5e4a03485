//! `presence-bridge provision`: put the bridge's component in every user's roster with a
//! subscription that lets it see their presence (`from` or `both`), through the server's own
//! admin API. Idempotent (users that already have it are skipped), rate-limited, `--dry-run`,
//! and a summary at the end; exit 0 when no user failed.
//!
//! - **ejabberd**: REST `registered_users` per domain, `get_roster` to skip the provisioned,
//!   `add_rosteritem` with `subs: "from"` (works whether the bridge is connected or not).
//! - **MongooseIM**: GraphQL `account.listUsers(domain)` and `roster.listContacts(user)`; then,
//!   *with the bridge connected*, the REST admin API: `PUT /contacts/{user}/{component}`
//!   `{"action":"subscribe"}` (the bridge answers `subscribed` and subscribes back), then
//!   `{"action":"subscribed"}` (the user approves it) — subscription `both`. GraphQL's roster
//!   mutations cannot do this: they refuse a domain-only contact (`jid_without_local_part`),
//!   verified against MongooseIM 6.2.1. The user's clients briefly see a subscription request.

use std::time::Duration;

use serde_json::{Value, json};

use crate::sources::http_client;

/// Which server's admin API to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerKind {
    /// ejabberd's REST API (mod_http_api).
    Ejabberd,
    /// MongooseIM's GraphQL admin API + REST admin API.
    Mongooseim,
}

/// What to provision and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server.
    pub kind: ServerKind,
    /// ejabberd: the REST API base (`http://127.0.0.1:5280/api`); MongooseIM: the REST admin
    /// API base (`http://127.0.0.1:8088/api`).
    pub api: String,
    /// MongooseIM: the GraphQL admin endpoint (`http://127.0.0.1:5551/api/graphql`).
    pub graphql: Option<String>,
    /// HTTP basic auth for both APIs.
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// The bridge's component domain.
    pub component: String,
    /// User domains.
    pub domains: Vec<String>,
    /// Users per second, at most.
    pub rate: u32,
    /// Only report what would be done.
    pub dry_run: bool,
}

/// The end result.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Users seen.
    pub users: u64,
    /// Given the component now (or, with `--dry-run`, that would be).
    pub provisioned: u64,
    /// Already had it.
    pub already: u64,
    /// Failed (each logged with its reason).
    pub failed: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} users: {} provisioned, {} already had the component, {} failed",
            self.users, self.provisioned, self.already, self.failed
        )
    }
}

/// A failure that stops the whole run (listing users); per-user failures are counted instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProvisionError(String);

struct Api {
    opts: Options,
    client: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: &Value,
    ) -> Result<Value, String> {
        let mut req = self.client.request(method, url).json(body);
        if let Some(u) = &self.opts.user {
            req = req.basic_auth(u, self.opts.password.as_deref());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{url}: {}", e.without_url()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{url}: {}", e.without_url()))?;
        if !status.is_success() {
            let start: String = text.chars().take(200).collect();
            return Err(format!("{url} answered {status}: {start}"));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).or(Ok(Value::String(text)))
    }

    async fn ejabberd(&self, cmd: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}/{cmd}", self.opts.api.trim_end_matches('/'));
        self.call(reqwest::Method::POST, &url, &body).await
    }

    async fn graphql(&self, query: String) -> Result<Value, String> {
        let url = self.opts.graphql.clone().unwrap_or_default();
        let v = self
            .call(reqwest::Method::POST, &url, &json!({ "query": query }))
            .await?;
        if let Some(errs) = v.get("errors").and_then(Value::as_array)
            && !errs.is_empty()
        {
            let msgs: Vec<&str> = errs
                .iter()
                .filter_map(|e| e.get("message")?.as_str())
                .collect();
            return Err(format!("GraphQL errors: {}", msgs.join("; ")));
        }
        Ok(v)
    }

    /// Every user of `domain`, as bare JIDs.
    async fn users(&self, domain: &str) -> Result<Vec<String>, String> {
        match self.opts.kind {
            ServerKind::Ejabberd => {
                let v = self
                    .ejabberd("registered_users", json!({ "host": domain }))
                    .await?;
                let list = v
                    .as_array()
                    .ok_or_else(|| format!("registered_users: not a list: {v}"))?;
                Ok(list
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|u| format!("{u}@{domain}"))
                    .collect())
            }
            ServerKind::Mongooseim => {
                let v = self
                    .graphql(format!(
                        "query {{ account {{ listUsers(domain: {}) }} }}",
                        Value::String(domain.into())
                    ))
                    .await?;
                let list = v
                    .pointer("/data/account/listUsers")
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("account.listUsers: no list: {v}"))?;
                Ok(list
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect())
            }
        }
    }

    /// The subscription the user's roster gives the component (`none` when absent).
    async fn subscription(&self, user: &str) -> Result<String, String> {
        let component = self.opts.component.as_str();
        match self.opts.kind {
            ServerKind::Ejabberd => {
                let (local, host) = user.split_once('@').unwrap_or((user, ""));
                let v = self
                    .ejabberd("get_roster", json!({ "user": local, "server": host }))
                    .await?;
                Ok(v.as_array()
                    .into_iter()
                    .flatten()
                    .find(|i| i.get("jid").and_then(Value::as_str) == Some(component))
                    .and_then(|i| i.get("subscription")?.as_str())
                    .unwrap_or("none")
                    .to_lowercase())
            }
            ServerKind::Mongooseim => {
                let v = self
                    .graphql(format!(
                        "query {{ roster {{ listContacts(user: {}) {{ jid subscription ask }} }} }}",
                        Value::String(user.into())
                    ))
                    .await?;
                Ok(v.pointer("/data/roster/listContacts")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|i| i.get("jid").and_then(Value::as_str) == Some(component))
                    .and_then(|i| i.get("subscription")?.as_str())
                    .unwrap_or("none")
                    .to_lowercase())
            }
        }
    }

    async fn give(&self, user: &str) -> Result<(), String> {
        let component = self.opts.component.as_str();
        match self.opts.kind {
            ServerKind::Ejabberd => {
                let (local, host) = user.split_once('@').unwrap_or((user, ""));
                let v = self
                    .ejabberd(
                        "add_rosteritem",
                        json!({"localuser": local, "localhost": host, "user": "",
                            "server": component, "nick": "presence-bridge", "group": "",
                            "subs": "from"}),
                    )
                    .await?;
                if v != json!(0) {
                    return Err(format!("add_rosteritem answered {v}"));
                }
                Ok(())
            }
            ServerKind::Mongooseim => {
                let url = format!(
                    "{}/contacts/{user}/{component}",
                    self.opts.api.trim_end_matches('/')
                );
                self.call(reqwest::Method::PUT, &url, &json!({"action": "subscribe"}))
                    .await?;
                // The bridge answers `subscribed` and subscribes back; give it a moment.
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.call(reqwest::Method::PUT, &url, &json!({"action": "subscribed"}))
                    .await?;
                Ok(())
            }
        }
    }
}

fn sees_presence(subscription: &str) -> bool {
    matches!(subscription, "from" | "both")
}

/// Runs the provisioning; prints one line per change and returns the summary.
pub async fn provision(opts: Options) -> Result<Summary, ProvisionError> {
    if opts.kind == ServerKind::Mongooseim && opts.graphql.is_none() {
        return Err(ProvisionError(
            "--graphql is required for MongooseIM (the GraphQL admin endpoint, e.g. http://127.0.0.1:5551/api/graphql)".into(),
        ));
    }
    let client = http_client(Duration::from_secs(15))
        .map_err(|e| ProvisionError(format!("HTTP client: {e}")))?;
    let api = Api {
        opts: opts.clone(),
        client,
    };
    let mut summary = Summary::default();
    let pause = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    for domain in &opts.domains {
        let users = api
            .users(domain)
            .await
            .map_err(|e| ProvisionError(format!("listing the users of {domain}: {e}")))?;
        tracing::info!(domain, users = users.len(), "provision: users listed");
        for user in users {
            summary.users += 1;
            match api.subscription(&user).await {
                Ok(s) if sees_presence(&s) => {
                    summary.already += 1;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    summary.failed += 1;
                    eprintln!("FAILED {user}: reading the roster: {e}");
                    continue;
                }
            }
            if opts.dry_run {
                summary.provisioned += 1;
                println!("would provision {user}");
                continue;
            }
            tokio::time::sleep(pause).await;
            let result = match api.give(&user).await {
                Ok(()) => verify(&api, &user).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(s) => {
                    summary.provisioned += 1;
                    println!("provisioned {user} (subscription {s})");
                }
                Err(e) => {
                    summary.failed += 1;
                    eprintln!("FAILED {user}: {e}");
                }
            }
        }
    }
    Ok(summary)
}

/// Reads the roster back until the component can see the user's presence (2 s at most).
async fn verify(api: &Api, user: &str) -> Result<String, String> {
    let mut last = String::new();
    for _ in 0..10 {
        last = api.subscription(user).await?;
        if sees_presence(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hint = if api.opts.kind == ServerKind::Mongooseim {
        " (the bridge must be connected: it answers the user's subscription request)"
    } else {
        ""
    };
    Err(format!(
        "the roster still gives the component subscription {last:?}{hint}"
    ))
}
