//! Configuration: defaults → TOML file → `PRESENCE_BRIDGE__SECTION__KEY` environment variables.
//!
//! Secrets (`xmpp.password`, `auth.jwt_secret`, `store.postgres_url`) may also come from a file
//! named by the matching `*_file` key, so they can live in a mounted secret instead of the TOML.
//! They are wrapped in [`Secret`], whose `Debug`, `Display` and `Serialize` never show the value:
//! a config printed by `check-config` or logged by accident shows `***`.
//!
//! Unknown keys are an error, not a warning: a typo such as `pasword` would otherwise silently
//! leave the default in force, which is the worst kind of misconfiguration to debug.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, Serializer};

/// Environment variable prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "PRESENCE_BRIDGE__";

/// A configuration error, always naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value of `key` is unusable.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `xmpp.server`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read or parsed.
    #[error("invalid config: {0}")]
    Load(String),
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A string that must never be shown: `Debug`, `Display` and `Serialize` print `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

/// The secret keys: read from the environment as raw strings (never parsed as numbers or
/// booleans), and never echoed in an error.
pub const SECRET_KEYS: [(&str, &str); 6] = [
    ("xmpp", "password"),
    ("auth", "jwt_secret"),
    ("store", "postgres_url"),
    ("amqp", "url"),
    ("reconcile", "password"),
    ("cluster", "nats_url"),
];

/// Reads a secret as text. A TOML integer or boolean is taken as its text (`123456`, `true`);
/// a float is refused (its text would not survive), and no error shows the value.
struct SecretText;

impl serde::de::Visitor<'_> for SecretText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string (quote it)")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
        Err(E::custom("a number with a fraction; quote it as a string"))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretText).map(Secret)
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used (handshake, signing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no secret was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// A Postgres URL: shown with its password masked (`postgres://user:***@host/db`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DbUrl(String);

impl<'de> Deserialize<'de> for DbUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretText).map(DbUrl)
    }
}

impl DbUrl {
    /// Wraps a connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub fn masked(&self) -> String {
        mask_url_password(&self.0)
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl Serialize for DbUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

/// Masks every password in a Postgres connection string, URL or libpq key=value form. It
/// errs on the side of hiding: in a URL the user info ends at the *last* `@`, so a password
/// holding `/`, `?` or `@` is hidden whole (a query holding `@` would hide the host too, which
/// is harmless); `password=` query parameters are masked as well.
pub fn mask_url_password(url: &str) -> String {
    match url.find("://") {
        Some(i) => mask_uri(&url[..i + 3], &url[i + 3..]),
        None => mask_keyword_values(url),
    }
}

fn mask_uri(scheme: &str, rest: &str) -> String {
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at..]),
        None => (None, rest),
    };
    let mut out = String::from(scheme);
    if let Some(u) = userinfo {
        match u.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***");
            }
            None => out.push_str(u),
        }
    }
    match after.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(after),
    }
    out
}

/// libpq `key = value` pairs; values may be single-quoted with `\'` and `\\` escapes. A
/// string that does not parse cleanly is not shown at all (a half-understood string could
/// show part of a password).
fn mask_keyword_values(s: &str) -> String {
    const UNPARSEABLE: &str = "(not a valid connection string; not shown)";
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // Whitespace between pairs, kept as is.
        let start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        out.push_str(&s[start..i]);
        if i == b.len() {
            break;
        }
        // The key, up to `=` or whitespace.
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        // Spaces, `=`, spaces.
        let eq_start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if key.is_empty() || i == b.len() || b[i] != b'=' {
            return UNPARSEABLE.into();
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let separator = &s[eq_start..i];
        // The value: quoted (with escapes) or up to whitespace.
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            if i >= b.len() {
                return UNPARSEABLE.into();
            }
            i += 1;
            if i < b.len() && !b[i].is_ascii_whitespace() {
                return UNPARSEABLE.into();
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        out.push_str(key);
        out.push_str(separator);
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(s.get(value_start..i).unwrap_or(""));
        }
    }
    out
}

/// The whole configuration. Every key is documented in `config/bridge.example.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seconds a webhook endpoint has to answer 2xx (contract §7).
    #[serde(with = "secs")]
    pub webhooks_timeout_secs: Duration,
    /// Attempts per webhook message before it is `failed`.
    pub webhooks_max_attempts: u32,
    /// XMPP component connection.
    pub xmpp: XmppConfig,
    /// HTTP/WebSocket server.
    pub http: HttpConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Persistence.
    pub store: StoreConfig,
    /// Presence engine tuning.
    pub presence: PresenceConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[amqp]`: MongooseIM's event pusher as a second ingest source (contract §9).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<AmqpConfig>,
    /// `[reconcile]`: comparison with the server's own session list (contract §10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<ReconcileConfig>,
    /// `[alerts]`: flapping and login-storm thresholds (contract §7).
    pub alerts: AlertsConfig,
    /// `[cluster]`: run as one of several replicas on NATS JetStream (contract §11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// `[[webhooks]]`: endpoints from the config file (contract §7).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            webhooks_timeout_secs: Duration::from_secs(10),
            webhooks_max_attempts: 10,
            xmpp: XmppConfig::default(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            store: StoreConfig::default(),
            presence: PresenceConfig::default(),
            log: LogConfig::default(),
            amqp: None,
            cluster: None,
            reconcile: None,
            alerts: AlertsConfig::default(),
            webhooks: Vec::new(),
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// A user going online↔offline this many times (0: off)...
    pub flapping_transitions: u32,
    /// ...within this many seconds: one `alert.flapping`, then quiet for a window.
    pub flapping_window_secs: u64,
    /// This many users of one domain coming online (0: off)...
    pub storm_logins: u32,
    /// ...within this many seconds: one `alert.storm`, then quiet for a window.
    pub storm_window_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            flapping_transitions: 6,
            flapping_window_secs: 60,
            storm_logins: 1000,
            storm_window_secs: 10,
        }
    }
}

/// One `[[webhooks]]` endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Its id (letters, digits, `.`, `_`, `-`; at most 64).
    pub id: String,
    /// Where messages are POSTed.
    pub url: String,
    /// `whsec_` + base64 of at least 24 bytes.
    pub secret: Secret,
    /// File holding the secret (alternative to `secret`).
    pub secret_file: Option<PathBuf>,
    /// Event types: presence.online/.offline/.update, alert.flapping, alert.storm.
    pub events: Vec<String>,
    /// Only users of these domains (empty: all).
    pub domains: Vec<String>,
    /// Only these users (empty: all).
    pub jids: Vec<String>,
}

/// The webhook event types (contract §7).
pub const WEBHOOK_EVENTS: [&str; 5] = [
    "presence.online",
    "presence.offline",
    "presence.update",
    "alert.flapping",
    "alert.storm",
];

impl WebhookConfig {
    /// Checks one endpoint; `key` names it in errors (`webhooks[0]`).
    pub fn check(&self, key: &str) -> Result<(), ConfigError> {
        let ok_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok_id {
            return Err(ConfigError::invalid(
                &format!("{key}.id"),
                "letters, digits, '.', '_' or '-', 1 to 64 of them",
            ));
        }
        let url_ok = reqwest::Url::parse(&self.url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        }) && !self.url.chars().any(char::is_control);
        if !url_ok {
            return Err(ConfigError::invalid(
                &format!("{key}.url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        if let Some(bad) = self.domains.iter().find(|d| {
            d.is_empty()
                || d.len() > 253
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }) {
            return Err(ConfigError::invalid(
                &format!("{key}.domains"),
                format!("{bad:?} is not a domain name"),
            ));
        }
        if let Err(e) = decode_webhook_secret(self.secret.expose()) {
            return Err(ConfigError::invalid(&format!("{key}.secret"), e));
        }
        if self.events.is_empty() {
            return Err(ConfigError::invalid(
                &format!("{key}.events"),
                "at least one event type",
            ));
        }
        if let Some(bad) = self
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return Err(ConfigError::invalid(
                &format!("{key}.events"),
                format!(
                    "unknown event type {bad:?}: use {}",
                    WEBHOOK_EVENTS.join(", ")
                ),
            ));
        }
        if let Some(bad) = self
            .jids
            .iter()
            .find(|j| crate::presence::UserJid::parse(j).is_err())
        {
            return Err(ConfigError::invalid(
                &format!("{key}.jids"),
                format!("{bad:?} is not a bare JID"),
            ));
        }
        Ok(())
    }
}

/// The HMAC key of a Standard Webhooks secret: `whsec_` + base64 of at least 24 bytes.
pub fn decode_webhook_secret(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let b64 = s
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_ (Standard Webhooks)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the part after whsec_ must be base64".to_owned())?;
    if key.len() < 24 {
        return Err(format!("the key is {} bytes; at least 24", key.len()));
    }
    Ok(key)
}

/// `[amqp]`: consume `mod_event_pusher_rabbit`'s presence exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (`amqps://` for TLS); shown masked.
    pub url: DbUrl,
    /// File holding the URL (alternative to `url`).
    pub url_file: Option<PathBuf>,
    /// The topic exchange MongooseIM publishes presence to.
    pub exchange: String,
    /// Declare the exchange durable. MongooseIM declares it non-durable by default
    /// (`presence_exchange.durable = false`); both sides must agree or the broker refuses.
    pub exchange_durable: bool,
    /// The durable queue this bridge binds to the exchange and consumes.
    pub queue: String,
    /// Binding key (`#` = every user).
    pub binding_key: String,
    /// Unacknowledged messages in flight (AMQP prefetch).
    pub prefetch: u16,
    /// First reconnect delay (doubles per failure, with jitter).
    #[serde(with = "secs")]
    pub reconnect_min_secs: Duration,
    /// Upper bound of the reconnect delay.
    #[serde(with = "secs")]
    pub reconnect_max_secs: Duration,
    /// Largest accepted message body in bytes; a bigger one is malformed.
    pub max_message_bytes: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: DbUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            url_file: None,
            exchange: "presence".into(),
            exchange_durable: false,
            queue: "presence-bridge".into(),
            binding_key: "#".into(),
            prefetch: 200,
            reconnect_min_secs: Duration::from_millis(500),
            reconnect_max_secs: Duration::from_secs(30),
            max_message_bytes: 4096,
        }
    }
}

impl AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let u = self.url.expose();
        if !(u.starts_with("amqp://") || u.starts_with("amqps://")) {
            return Err(ConfigError::invalid(
                "amqp.url",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        for (key, v) in [
            ("amqp.exchange", &self.exchange),
            ("amqp.queue", &self.queue),
            ("amqp.binding_key", &self.binding_key),
        ] {
            if v.trim().is_empty() || v.len() > 255 {
                return Err(ConfigError::invalid(key, "must be 1..=255 characters"));
            }
        }
        at_least_one("amqp.prefetch", self.prefetch as usize)?;
        at_least_one("amqp.max_message_bytes", self.max_message_bytes)?;
        if self.reconnect_max_secs < self.reconnect_min_secs {
            return Err(ConfigError::invalid(
                "amqp.reconnect_max_secs",
                "must be >= amqp.reconnect_min_secs",
            ));
        }
        Ok(())
    }
}

/// `[cluster]`: several replicas sharing one change stream (contract §11).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `nats://[user:pass@]host:port` of a NATS server with JetStream; shown masked.
    pub nats_url: DbUrl,
    /// The JetStream stream of changes (its KV bucket and object store take this name as a
    /// prefix).
    pub stream: String,
    /// This replica's name, unique in the cluster (default: host name + process id).
    pub node_id: String,
    /// A new leader takes over within this many seconds of the old one's death: the lease
    /// lives this long after its last renewal (renewed every third of it).
    #[serde(with = "secs")]
    pub failover_secs: Duration,
    /// The leader stores a snapshot of the map (for replicas that start late) this often.
    #[serde(with = "secs")]
    pub snapshot_secs: Duration,
    /// The stream keeps changes this many hours (a replica that starts later loads a
    /// snapshot).
    pub max_age_hours: u32,
    /// A follower keeps this many of the last changes to write them again if it takes over
    /// (whatever the dead leader's writer had not written yet).
    pub takeover_replay: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: DbUrl::new("nats://127.0.0.1:4222"),
            stream: "PRESENCE".into(),
            node_id: String::new(),
            failover_secs: Duration::from_secs(10),
            snapshot_secs: Duration::from_secs(60),
            max_age_hours: 24,
            takeover_replay: 50_000,
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let u = self.nats_url.expose();
        if !(u.starts_with("nats://") || u.starts_with("tls://")) {
            return Err(ConfigError::invalid(
                "cluster.nats_url",
                "must be a nats:// or tls:// URL",
            ));
        }
        let name_ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.stream) {
            return Err(ConfigError::invalid(
                "cluster.stream",
                "must be 1..=64 of A-Z a-z 0-9 - _",
            ));
        }
        if !self.node_id.is_empty() && !name_ok(&self.node_id) {
            return Err(ConfigError::invalid(
                "cluster.node_id",
                "must be 1..=64 of A-Z a-z 0-9 - _ (or empty: host name + pid)",
            ));
        }
        if self.failover_secs < Duration::from_secs(2) {
            return Err(ConfigError::invalid(
                "cluster.failover_secs",
                "must be at least 2",
            ));
        }
        at_least_one(
            "cluster.snapshot_secs",
            self.snapshot_secs.as_secs() as usize,
        )?;
        if !(1..=24 * 365).contains(&self.max_age_hours) {
            return Err(ConfigError::invalid(
                "cluster.max_age_hours",
                "must be 1..=8760",
            ));
        }
        if self.snapshot_secs * 2 > self.max_age() {
            return Err(ConfigError::invalid(
                "cluster.snapshot_secs",
                "must be at most half of cluster.max_age_hours",
            ));
        }
        Ok(())
    }

    /// How long the stream keeps changes.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_age_hours) * 3600)
    }

    /// `node_id`, or the host name and process id.
    pub fn node(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| {
                h.trim()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "bridge".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Which server's session list the reconciler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileKind {
    /// ejabberd's REST API: `POST {url}/connected_users_info`.
    #[default]
    Ejabberd,
    /// MongooseIM's GraphQL admin API: `session.listSessions(domain)` at `{url}`.
    Mongooseim,
}

/// `[reconcile]`: compare the presence map with the server's own session list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// `ejabberd` or `mongooseim`.
    pub kind: ReconcileKind,
    /// ejabberd: the REST API base (`http://127.0.0.1:5280/api`); MongooseIM: the GraphQL
    /// admin endpoint (`http://127.0.0.1:5551/api/graphql`).
    pub url: String,
    /// HTTP basic auth user (when set).
    pub user: Option<String>,
    /// HTTP basic auth password.
    pub password: Secret,
    /// File holding the password (alternative to `password`).
    pub password_file: Option<PathBuf>,
    /// Seconds between runs (a run also follows every XMPP (re)connect).
    #[serde(with = "secs")]
    pub interval_secs: Duration,
    /// Seconds one request to the server may take.
    #[serde(with = "secs")]
    pub timeout_secs: Duration,
    /// Corrections (probes or closes) per second, at most: no correction storm.
    pub max_corrections_per_sec: u32,
    /// Largest accepted answer in bytes.
    pub max_response_bytes: usize,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            kind: ReconcileKind::Ejabberd,
            url: "http://127.0.0.1:5280/api".into(),
            user: None,
            password: Secret::default(),
            password_file: None,
            interval_secs: Duration::from_secs(60),
            timeout_secs: Duration::from_secs(10),
            max_corrections_per_sec: 100,
            max_response_bytes: 64 << 20,
        }
    }
}

impl ReconcileConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "reconcile.url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.user.is_none() && !self.password.is_empty() {
            return Err(ConfigError::invalid(
                "reconcile.user",
                "is required when reconcile.password is set",
            ));
        }
        at_least_one(
            "reconcile.max_corrections_per_sec",
            self.max_corrections_per_sec as usize,
        )?;
        at_least_one("reconcile.max_response_bytes", self.max_response_bytes)
    }
}

/// `[xmpp]`: the XEP-0114 component connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppConfig {
    /// `host:port` of the server's component listener.
    pub server: String,
    /// The component's JID (a domain).
    pub component: String,
    /// Shared secret of the component listener.
    pub password: Secret,
    /// File holding the shared secret (alternative to `password`).
    pub password_file: Option<PathBuf>,
    /// User domains whose presence is tracked.
    pub domains: Vec<String>,
    /// Probe known users after every (re)connect.
    pub probe_on_connect: bool,
    /// Seconds to wait for probe answers before unconfirmed resources go offline.
    #[serde(with = "secs")]
    pub resync_grace_secs: Duration,
    /// Seconds of silence before the bridge pings the server (keepalive).
    #[serde(with = "secs")]
    pub keepalive_secs: Duration,
    /// Seconds to wait for any data after a keepalive before the connection is declared dead.
    #[serde(with = "secs")]
    pub keepalive_timeout_secs: Duration,
    /// Seconds allowed for TCP connect + stream + handshake.
    #[serde(with = "secs")]
    pub connect_timeout_secs: Duration,
    /// First reconnect delay in seconds (doubles per failure, with jitter).
    #[serde(with = "secs")]
    pub reconnect_min_secs: Duration,
    /// Upper bound of the reconnect delay in seconds.
    #[serde(with = "secs")]
    pub reconnect_max_secs: Duration,
    /// First delay after a `<conflict/>` stream error (another connection holds the component
    /// domain); doubles per conflict in a row up to 8×. Longer than the normal backoff: two
    /// bridges under MongooseIM's `kick_old` would otherwise kick each other every few seconds.
    #[serde(with = "secs")]
    pub conflict_backoff_secs: Duration,
    /// Probes sent per second during a resync (protects the server from a probe storm).
    pub probe_rate_per_sec: u32,
    /// Longest accepted `<status/>` text in bytes; a longer one marks the stanza oversized.
    pub max_status_bytes: usize,
    /// Most child elements accepted in one presence; more marks the stanza oversized.
    pub max_payloads: usize,
    /// Preferred `<status xml:lang>` when a presence carries several status texts.
    pub status_languages: Vec<String>,
}

impl Default for XmppConfig {
    fn default() -> Self {
        Self {
            server: "127.0.0.1:5347".into(),
            component: "bridge.localhost".into(),
            password: Secret::default(),
            password_file: None,
            domains: vec!["localhost".into()],
            probe_on_connect: true,
            resync_grace_secs: Duration::from_secs(10),
            keepalive_secs: Duration::from_secs(30),
            keepalive_timeout_secs: Duration::from_secs(20),
            connect_timeout_secs: Duration::from_secs(10),
            reconnect_min_secs: Duration::from_millis(500),
            reconnect_max_secs: Duration::from_secs(30),
            conflict_backoff_secs: Duration::from_secs(60),
            probe_rate_per_sec: 2000,
            max_status_bytes: 4096,
            max_payloads: 32,
            status_languages: vec!["en".into()],
        }
    }
}

impl XmppConfig {
    fn validate_domains(&self) -> Result<(), ConfigError> {
        if self.domains.is_empty() {
            return Err(ConfigError::invalid(
                "xmpp.domains",
                "must list at least one user domain",
            ));
        }
        if let Some(d) = self.domains.iter().find(|d| !is_domain(d)) {
            return Err(ConfigError::invalid(
                "xmpp.domains",
                format!("{d:?} is not a domain"),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.server.rsplit_once(':') {
            Some((host, port)) if !host.trim().is_empty() && port.parse::<u16>().is_ok() => {}
            _ => {
                return Err(ConfigError::invalid(
                    "xmpp.server",
                    format!("{:?} is not host:port", self.server),
                ));
            }
        }
        if !is_domain(&self.component) {
            return Err(ConfigError::invalid(
                "xmpp.component",
                format!("{:?} is not a domain JID", self.component),
            ));
        }
        if self.password.is_empty() {
            return Err(ConfigError::invalid(
                "xmpp.password",
                "is required (or xmpp.password_file; or configure [amqp] to run without XMPP)",
            ));
        }
        self.validate_domains()?;
        if self.reconnect_max_secs < self.reconnect_min_secs {
            return Err(ConfigError::invalid(
                "xmpp.reconnect_max_secs",
                "must be >= xmpp.reconnect_min_secs",
            ));
        }
        at_least_one("xmpp.probe_rate_per_sec", self.probe_rate_per_sec as usize)
    }
}

/// A JID with no local part (a domain).
fn is_domain(s: &str) -> bool {
    jid::BareJid::new(s).is_ok_and(|j| j.node().is_none())
}

fn at_least_one(key: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(key, "must be at least 1"));
    }
    Ok(())
}

/// `[http]`: the REST/WebSocket server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address.
    pub bind: String,
    /// WebSocket Origin allow-list (the public origins of the dashboard, e.g.
    /// `https://presence.example.com`); the bridge's own address is always allowed.
    pub allowed_origins: Vec<String>,
    /// Take the public host and scheme from `X-Forwarded-Host`/`X-Forwarded-Proto`/`Forwarded`
    /// for the same-origin check: only behind a reverse proxy that sets them.
    pub trust_forwarded_headers: bool,
    /// PEM certificate chain; with `tls_key`, the server speaks HTTPS/WSS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Largest accepted request body in bytes (413 beyond).
    pub body_limit_bytes: usize,
    /// Requests per second allowed per token (or per IP for requests without one) on
    /// `/api/v1`; 0 disables.
    pub rate_limit_per_token: u32,
    /// Requests per second allowed per client IP on `/api/v1`; 0 disables.
    pub rate_limit_per_ip: u32,
    /// Burst allowance of the per-token limit (the per-IP burst is twice this).
    pub rate_limit_burst: u32,
    /// How often the rate limiters forget keys whose quota has fully replenished.
    #[serde(with = "secs")]
    pub rate_limit_prune_secs: Duration,
    /// Concurrent WebSocket connections per token subject.
    pub ws_max_per_token: usize,
    /// Seconds between server pings on WebSockets; a peer silent for three intervals is closed.
    #[serde(with = "secs")]
    pub ws_ping_secs: Duration,
    /// A WebSocket write that cannot complete within this many seconds closes the session.
    #[serde(with = "secs")]
    pub ws_send_timeout_secs: Duration,
    /// HTTP worker threads.
    pub workers: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            allowed_origins: Vec::new(),
            trust_forwarded_headers: false,
            tls_cert: None,
            tls_key: None,
            body_limit_bytes: 256 * 1024,
            rate_limit_per_token: 2000,
            rate_limit_per_ip: 5000,
            rate_limit_burst: 4000,
            rate_limit_prune_secs: Duration::from_secs(60),
            ws_max_per_token: 32,
            ws_ping_secs: Duration::from_secs(20),
            ws_send_timeout_secs: Duration::from_secs(10),
            workers: 2,
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "http.bind",
                format!("{:?} is not ip:port", self.bind),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::invalid(
                "http.tls_key",
                "set both http.tls_cert and http.tls_key, or neither",
            ));
        }
        if self.body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "http.body_limit_bytes",
                "must be at least 1024",
            ));
        }
        at_least_one("http.ws_max_per_token", self.ws_max_per_token)?;
        at_least_one("http.workers", self.workers)
    }
}

/// `[auth]`: JWT verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret.
    pub jwt_secret: Secret,
    /// File holding the HS256 secret.
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256/ES256 (instead of `jwt_secret`).
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// An identity provider's JWKS document (contract §8): tokens with a `kid` are verified
    /// with that key (RS256, ES256, EdDSA). `https://`, or `http://` to a loopback address.
    pub jwks_url: Option<String>,
    /// Seconds between JWKS refreshes (also refreshed when an unknown `kid` arrives, at most
    /// once per 10 s).
    #[serde(with = "secs")]
    pub jwks_refresh_secs: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: Secret::default(),
            jwt_secret_file: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            jwks_url: None,
            jwks_refresh_secs: Duration::from_secs(300),
        }
    }
}

/// True for `https://…`, or `http://` to 127.0.0.1, `[::1]` or localhost.
fn secure_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let name = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        host.split(':').next().unwrap_or("").to_owned()
    };
    matches!(name.as_str(), "127.0.0.1" | "localhost" | "[::1]")
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.jwks_url
            && !secure_or_loopback(u)
        {
            return Err(ConfigError::invalid(
                "auth.jwks_url",
                "must be an https:// URL (http:// only to a loopback address)",
            ));
        }
        at_least_one(
            "auth.jwks_refresh_secs",
            self.jwks_refresh_secs.as_secs() as usize,
        )?;
        if !self.jwt_secret.is_empty() && self.jwt_public_key_file.is_some() {
            return Err(ConfigError::invalid(
                "auth.jwt_public_key_file",
                "set either auth.jwt_secret (HS256) or auth.jwt_public_key_file, not both",
            ));
        }
        Ok(())
    }
}

/// `[store]`: persistence.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Postgres URL; absent means memory only.
    pub postgres_url: Option<DbUrl>,
    /// File holding the Postgres URL.
    pub postgres_url_file: Option<PathBuf>,
    /// Directory of the on-disk spool used while Postgres is unreachable.
    pub spool_dir: PathBuf,
    /// Events per batch (a batch is written when full or after `batch_timeout_ms`).
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub batch_timeout_ms: u64,
    /// Events queued for the writer beyond which new batches go straight to the spool.
    pub queue_capacity: usize,
    /// A batch write slower than this (seconds) is abandoned and spooled.
    #[serde(with = "secs")]
    pub write_timeout_secs: Duration,
    /// Seconds between attempts to replay the spool while Postgres is failing.
    #[serde(with = "secs")]
    pub retry_secs: Duration,
    /// Days of history kept; older daily partitions are dropped.
    pub retention_days: u32,
    /// Postgres connections in the pool (the writer uses three at a time; reads share the rest).
    pub pool_size: usize,
    /// Seconds allowed to connect to Postgres.
    #[serde(with = "secs")]
    pub connect_timeout_secs: Duration,
    /// Spool segment size in bytes before a new segment starts.
    pub spool_segment_bytes: u64,
    /// Seconds the writer may take on shutdown to flush (to Postgres or the spool).
    #[serde(with = "secs")]
    pub flush_timeout_secs: Duration,
    /// Without Postgres: events of this run kept in memory for history and analytics (the
    /// oldest go first, with the sessions they opened).
    pub memory_history_events: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            postgres_url: None,
            postgres_url_file: None,
            spool_dir: PathBuf::from("data/spool"),
            batch_size: 5000,
            batch_timeout_ms: 50,
            queue_capacity: 262_144,
            write_timeout_secs: Duration::from_secs(5),
            retry_secs: Duration::from_secs(1),
            retention_days: 30,
            pool_size: 8,
            connect_timeout_secs: Duration::from_secs(5),
            spool_segment_bytes: 16 << 20,
            flush_timeout_secs: Duration::from_secs(10),
            memory_history_events: 1_000_000,
        }
    }
}

/// `[presence]`: engine tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Number of recent changes kept for resume (`since=`).
    pub ring_size: usize,
    /// Capacity of the engine's input queue (events waiting for the sequencer).
    pub queue_size: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ring_size: 65_536,
            queue_size: 65_536,
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.postgres_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://") || u.contains('='))
            {
                return Err(ConfigError::invalid(
                    "store.postgres_url",
                    "must be a postgres:// URL or a libpq key=value string",
                ));
            }
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(ConfigError::invalid(
                "store.batch_size",
                "must be 1..=100000",
            ));
        }
        at_least_one("store.batch_timeout_ms", self.batch_timeout_ms as usize)?;
        if self.queue_capacity < self.batch_size {
            return Err(ConfigError::invalid(
                "store.queue_capacity",
                "must be >= store.batch_size",
            ));
        }
        at_least_one("store.retention_days", self.retention_days as usize)?;
        at_least_one("store.memory_history_events", self.memory_history_events)?;
        at_least_one("store.pool_size", self.pool_size)
    }
}

impl PresenceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("presence.ring_size", self.ring_size),
            ("presence.queue_size", self.queue_size),
        ] {
            if v < 16 {
                return Err(ConfigError::invalid(key, "must be at least 16"));
            }
        }
        Ok(())
    }
}

/// Durations in the config are numbers of seconds (`keepalive_secs = 30`, `retry_secs = 0.3`):
/// read into a [`Duration`], refusing anything that is not a positive, finite number of
/// seconds below one day (the error names the key), and written back as seconds.
pub mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// The longest accepted duration.
    pub const MAX: Duration = Duration::from_secs(86_400);

    /// Reads seconds (integer or fraction) into a `Duration`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0 && v < MAX.as_secs_f64()) {
            return Err(serde::de::Error::custom(format!(
                "{v} is not a positive number of seconds below one day"
            )));
        }
        Ok(Duration::from_secs_f64(v))
    }

    /// Writes a `Duration` as seconds.
    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(v.as_secs_f64())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `presence_bridge=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads defaults, then `path` (if it exists, or an error if `required`), then the
    /// environment; resolves `*_file` secrets and validates.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if path.exists() {
            fig = fig.merge(Toml::file_exact(path));
        } else if required {
            return Err(ConfigError::Load(format!(
                "config file {} not found",
                path.display()
            )));
        }
        // Secrets from the environment are taken as raw text: figment would parse
        // `123456` as a number and `true` as a boolean (and echo them in a type error).
        let is_secret = |k: &str| {
            SECRET_KEYS
                .iter()
                .any(|(sec, key)| k.eq_ignore_ascii_case(&format!("{sec}__{key}")))
        };
        fig = fig.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(move |k| !is_secret(k.as_str()))
                .split("__"),
        );
        let mut raw = serde_json::Map::new();
        for (section, key) in SECRET_KEYS {
            let var = format!("{ENV_PREFIX}{}__{}", section, key).to_uppercase();
            if let Ok(v) = std::env::var(&var) {
                raw.insert(section.to_owned(), serde_json::json!({ key: v }));
            }
        }
        if !raw.is_empty() {
            fig = fig.merge(Serialized::defaults(serde_json::Value::Object(raw)));
        }
        Self::from_figment(&fig)
    }

    /// Extracts, resolves secrets from files and validates.
    pub fn from_figment(fig: &Figment) -> Result<Self, ConfigError> {
        let mut cfg: Config = fig.extract().map_err(figment_error)?;
        cfg.resolve_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.xmpp.password_file {
            if !self.xmpp.password.is_empty() {
                return Err(ConfigError::invalid(
                    "xmpp.password_file",
                    "set either xmpp.password or xmpp.password_file, not both",
                ));
            }
            self.xmpp.password = Secret::new(read_secret_file("xmpp.password_file", path)?);
        }
        if let Some(a) = &mut self.amqp
            && let Some(path) = &a.url_file
        {
            a.url = DbUrl(read_secret_file("amqp.url_file", path)?.trim().to_owned());
        }
        if let Some(r) = &mut self.reconcile
            && let Some(path) = &r.password_file
        {
            if !r.password.is_empty() {
                return Err(ConfigError::invalid(
                    "reconcile.password_file",
                    "set either reconcile.password or reconcile.password_file, not both",
                ));
            }
            r.password = Secret::new(read_secret_file("reconcile.password_file", path)?);
        }
        if let Some(path) = &self.auth.jwt_secret_file {
            if !self.auth.jwt_secret.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.jwt_secret_file",
                    "set either auth.jwt_secret or auth.jwt_secret_file, not both",
                ));
            }
            self.auth.jwt_secret = Secret::new(read_secret_file("auth.jwt_secret_file", path)?);
        }
        for (i, w) in self.webhooks.iter_mut().enumerate() {
            if let Some(path) = &w.secret_file {
                let key = format!("webhooks[{i}].secret_file");
                if !w.secret.is_empty() {
                    return Err(ConfigError::invalid(
                        &key,
                        "set either secret or secret_file, not both",
                    ));
                }
                w.secret = Secret::new(read_secret_file(&key, path)?.trim().to_owned());
            }
        }
        if let Some(path) = &self.store.postgres_url_file {
            if self.store.postgres_url.is_some() {
                return Err(ConfigError::invalid(
                    "store.postgres_url_file",
                    "set either store.postgres_url or store.postgres_url_file, not both",
                ));
            }
            self.store.postgres_url =
                Some(DbUrl(read_secret_file("store.postgres_url_file", path)?));
        }
        Ok(())
    }

    /// Checks every value that can be checked without connecting anywhere (durations are
    /// checked as they are read: see [`secs`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.xmpp_enabled() {
            self.xmpp.validate()?;
        } else {
            self.xmpp.validate_domains()?;
        }
        if let Some(a) = &self.amqp {
            a.validate()?;
        }
        if let Some(r) = &self.reconcile {
            r.validate()?;
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        self.http.validate()?;
        self.auth.validate()?;
        self.store.validate()?;
        self.presence.validate()?;
        let mut ids = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.check(&format!("webhooks[{i}]"))?;
            if !ids.insert(w.id.as_str()) {
                return Err(ConfigError::invalid(
                    &format!("webhooks[{i}].id"),
                    format!("{:?} is used twice", w.id),
                ));
            }
        }
        at_least_one("webhooks_max_attempts", self.webhooks_max_attempts as usize)?;
        at_least_one(
            "webhooks_timeout_secs",
            self.webhooks_timeout_secs.as_secs() as usize,
        )?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// The XMPP component runs unless `[amqp]` is set and `[xmpp]` has no password: an
    /// operator may run MongooseIM's event pusher alone (contract §9). `xmpp.domains` still
    /// says which users are tracked.
    pub fn xmpp_enabled(&self) -> bool {
        self.amqp.is_none() || !self.xmpp.password.is_empty()
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(cfg: &Config) -> String {
    // figment re-exports no TOML writer; serde_json → a small TOML rendering keeps deps lean.
    let value = serde_json::to_value(cfg).unwrap_or(serde_json::Value::Null);
    let mut out = String::new();
    let keys = |out: &mut String, body: &serde_json::Value| {
        if let serde_json::Value::Object(keys) = body {
            for (k, v) in keys {
                if v.is_null() {
                    out.push_str(&format!("# {k} = (unset)\n"));
                } else {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
        }
    };
    if let serde_json::Value::Object(entries) = value {
        // Top-level keys first (TOML puts them before any table), then tables, then arrays
        // of tables.
        for (k, v) in &entries {
            if !v.is_object() && !v.is_array() {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out.push('\n');
        for (section, body) in &entries {
            if body.is_object() {
                out.push_str(&format!("[{section}]\n"));
                keys(&mut out, body);
                out.push('\n');
            }
        }
        for (section, body) in &entries {
            if let serde_json::Value::Array(items) = body {
                for item in items {
                    out.push_str(&format!("[[{section}]]\n"));
                    keys(&mut out, item);
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(key, format!("cannot read {}: {}", path.display(), e.kind()))
    })?;
    let value = text.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(value)
}

/// Turns a figment error into a one-line message that names the key. For a secret key the
/// message never carries the value (figment's type errors quote what they found).
fn figment_error(e: figment::Error) -> ConfigError {
    let mut msgs = Vec::new();
    for err in e {
        let key = err.path.join(".");
        let secret = SECRET_KEYS
            .iter()
            .any(|(section, k)| key == format!("{section}.{k}"));
        let kind = if secret {
            "invalid value (not shown: it is a secret); write it as a string".to_owned()
        } else {
            err.kind.to_string()
        };
        if key.is_empty() {
            // unknown_field errors carry the field in the kind text.
            msgs.push(kind);
        } else {
            msgs.push(format!("{key}: {kind}"));
        }
    }
    ConfigError::Load(msgs.join("; "))
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        [xmpp]
        password = "s3cr3t-value"
    "#;

    #[test]
    fn defaults_plus_file_plus_env() {
        Jail::expect_with(|jail| {
            jail.create_file("bridge.toml", MINIMAL)?;
            jail.set_env("PRESENCE_BRIDGE__XMPP__SERVER", "10.0.0.1:6000");
            jail.set_env("PRESENCE_BRIDGE__STORE__SPOOL_DIR", "/var/spool/pb");
            let cfg = Config::load(Path::new("bridge.toml"), true).map_err(|e| e.to_string())?;
            assert_eq!(cfg.xmpp.server, "10.0.0.1:6000");
            assert_eq!(cfg.xmpp.password.expose(), "s3cr3t-value");
            assert_eq!(cfg.store.spool_dir, PathBuf::from("/var/spool/pb"));
            assert_eq!(cfg.xmpp.domains, vec!["localhost".to_string()]);
            Ok(())
        });
    }

    #[test]
    fn secret_from_file_and_conflict() {
        Jail::expect_with(|jail| {
            jail.create_file("pw.txt", "from-file\n")?;
            jail.create_file("bridge.toml", "[xmpp]\npassword_file = \"pw.txt\"\n")?;
            let cfg = Config::load(Path::new("bridge.toml"), true).map_err(|e| e.to_string())?;
            assert_eq!(cfg.xmpp.password.expose(), "from-file");

            jail.create_file(
                "both.toml",
                "[xmpp]\npassword = \"x\"\npassword_file = \"pw.txt\"\n",
            )?;
            let err = Config::load(Path::new("both.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("xmpp.password_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn durations_are_seconds_checked_as_they_are_read() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ok.toml",
                "[xmpp]\npassword = \"x\"\nkeepalive_secs = 0.25\nresync_grace_secs = 3\n",
            )?;
            let cfg = Config::load(Path::new("ok.toml"), true).unwrap();
            assert_eq!(cfg.xmpp.keepalive_secs, Duration::from_millis(250));
            assert_eq!(cfg.xmpp.resync_grace_secs, Duration::from_secs(3));
            let shown = cfg.to_masked_toml();
            assert!(shown.contains("keepalive_secs = 0.25"), "{shown}");
            for bad in ["0", "-1", "nan", "inf", "86400", "\"ten\""] {
                jail.create_file(
                    "bad.toml",
                    &format!("[store]\nretry_secs = {bad}\n[xmpp]\npassword = \"x\"\n"),
                )?;
                let err = Config::load(Path::new("bad.toml"), true)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(err.contains("store.retry_secs"), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[xmpp]\npassword = \"x\"\nserver = \"nope\"\n")?;
            let err = Config::load(Path::new("a.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("xmpp.server"), "{err}");

            jail.create_file("b.toml", "[xmpp]\npassword = \"x\"\npasword = \"y\"\n")?;
            let err = Config::load(Path::new("b.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("pasword"), "{err}");

            jail.create_file("c.toml", "[xmpp]\n")?;
            let err = Config::load(Path::new("c.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("xmpp.password"), "{err}");

            jail.create_file(
                "d.toml",
                "[xmpp]\npassword = \"x\"\ncomponent = \"user@host\"\n",
            )?;
            let err = Config::load(Path::new("d.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("xmpp.component"), "{err}");

            jail.create_file(
                "e.toml",
                "[xmpp]\npassword = \"x\"\nresync_grace_secs = -1\n",
            )?;
            let err = Config::load(Path::new("e.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("xmpp.resync_grace_secs"), "{err}");

            jail.set_env("PRESENCE_BRIDGE__XMPP__KEEPALIVE_SECS", "abc");
            jail.create_file("f.toml", MINIMAL)?;
            let err = Config::load(Path::new("f.toml"), true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("keepalive_secs"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked_everywhere() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "bridge.toml",
                r#"
                [xmpp]
                password = "hunter2-xmpp"
                [auth]
                jwt_secret = "hunter2-jwt"
                [store]
                postgres_url = "postgres://app:hunter2-db@127.0.0.1:5432/presence"
                "#,
            )?;
            let cfg = Config::load(Path::new("bridge.toml"), true).map_err(|e| e.to_string())?;
            let printed = cfg.to_masked_toml();
            let debugged = format!("{cfg:?}");
            for text in [&printed, &debugged] {
                assert!(!text.contains("hunter2"), "secret leaked: {text}");
            }
            assert!(printed.contains("postgres://app:***@127.0.0.1:5432/presence"));
            assert!(printed.contains("password = \"***\""));
            Ok(())
        });
    }

    #[test]
    fn secrets_from_the_environment_are_raw_text_and_never_echoed() {
        Jail::expect_with(|jail| {
            jail.set_env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", "123456789");
            jail.set_env("PRESENCE_BRIDGE__XMPP__PASSWORD", "007");
            let cfg = Config::load(Path::new("none.toml"), false).unwrap();
            assert_eq!(cfg.auth.jwt_secret.expose(), "123456789");
            assert_eq!(cfg.xmpp.password.expose(), "007", "not the number 7");
            jail.set_env("PRESENCE_BRIDGE__XMPP__PASSWORD", "true");
            let cfg = Config::load(Path::new("none.toml"), false).unwrap();
            assert_eq!(cfg.xmpp.password.expose(), "true");
            jail.set_env("PRESENCE_BRIDGE__XMPP__PASSWORD", "1.50");
            let cfg = Config::load(Path::new("none.toml"), false).unwrap();
            assert_eq!(cfg.xmpp.password.expose(), "1.50");
            Ok(())
        });
        Jail::expect_with(|jail| {
            // In a file: integers and booleans are their text; anything else is refused
            // without showing the value.
            jail.create_file("n.toml", "[xmpp]\npassword = 424242\n")?;
            let cfg = Config::load(Path::new("n.toml"), true).unwrap();
            assert_eq!(cfg.xmpp.password.expose(), "424242");
            jail.create_file("f.toml", "[xmpp]\npassword = 3.14159\n")?;
            let err = Config::load(Path::new("f.toml"), true)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("xmpp.password"), "{err}");
            assert!(!err.contains("3.14"), "the value is not echoed: {err}");
            jail.create_file(
                "a.toml",
                "[auth]\njwt_secret = [\"s3cr3t-in-array\"]\n[xmpp]\npassword = \"x\"\n",
            )?;
            let err = Config::load(Path::new("a.toml"), true)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("auth.jwt_secret"), "{err}");
            assert!(!err.contains("s3cr3t"), "the value is not echoed: {err}");
            Ok(())
        });
    }

    #[test]
    fn url_masking_variants() {
        for (url, shown) in [
            (
                "postgres://app:pa/ss?w@rd@db.internal:5432/presence",
                "postgres://app:***@db.internal:5432/presence",
            ),
            (
                "postgres://app@db/presence?sslmode=require&password=hunter2",
                "postgres://app@db/presence?sslmode=require&password=***",
            ),
            (
                "host=db user=app password = 'it''s a secret' dbname=presence",
                "(not a valid connection string; not shown)",
            ),
            (
                "host=db password='unterminated dbname=presence",
                "(not a valid connection string; not shown)",
            ),
            (
                "host=db password='with spaces and \\' quote' dbname=presence",
                "host=db password=*** dbname=presence",
            ),
            (
                "host=db PASSWORD=plain dbname=presence",
                "host=db PASSWORD=*** dbname=presence",
            ),
        ] {
            let masked = mask_url_password(url);
            assert_eq!(masked, shown, "{url}");
        }

        assert_eq!(
            mask_url_password("postgres://u@h/db"),
            "postgres://u@h/db".to_string()
        );
        assert_eq!(
            mask_url_password("postgresql://u:p@ss@h:5/db"),
            "postgresql://u:***@h:5/db".to_string()
        );
        assert_eq!(
            mask_url_password("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d".to_string()
        );
    }
}
