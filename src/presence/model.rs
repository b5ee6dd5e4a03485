//! The presence data model: what an event says, what a user's state is, what a change is.
//!
//! JSON shapes follow contract §3 exactly; fields the contract does not list are internal and
//! skipped when serialising.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

/// A normalised bare JID (`local@domain`, lower-cased), the key of the presence map.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct UserJid(Arc<str>);

/// Why a string is not a user JID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    /// Not a JID at all.
    #[error("not a valid JID: {0}")]
    Invalid(String),
    /// A domain-only JID: presence is tracked for users, not servers or components.
    #[error("JID has no local part: {0}")]
    NoLocalPart(String),
}

impl UserJid {
    /// Parses and normalises (nodeprep/nameprep via the `jid` crate, then lower-case local and
    /// domain parts). A resource, if present, is dropped.
    ///
    /// A fully qualified domain with its root dot (`user@example.com.`, RFC 7622 §3.2) is the
    /// same user as without it: the dot is removed before parsing (the `jid` crate keeps it on
    /// some paths and moves it into the resource on others).
    pub fn parse(s: &str) -> Result<Self, JidError> {
        if let Some(j) = Self::parse_simple(s) {
            return Ok(j);
        }
        Self::parse_full(s)
    }

    /// The common case without the `jid` crate's normalisation: `local@domain` in ASCII
    /// letters, digits and `._-` (local part) and dot-separated labels of letters, digits
    /// and inner `-`, not `--` in the 3rd and 4th places (domain), which normalisation leaves as they are but for case. Anything
    /// else takes [`UserJid::parse_full`]; a property test checks that both agree wherever
    /// this one answers.
    fn parse_simple(s: &str) -> Option<Self> {
        let (local, domain) = s.split_once('@')?;
        let local_ok = (1..=64).contains(&local.len())
            && local
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let domain_ok = (1..=253).contains(&domain.len())
            && domain.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    // IDNA reserves "--" in the 3rd and 4th places ("xn--" and friends).
                    && l.get(2..4) != Some("--")
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        (local_ok && domain_ok).then(|| Self(Arc::from(s.to_ascii_lowercase())))
    }

    /// The full parse: the `jid` crate, then the bare JID, lower-cased.
    fn parse_full(s: &str) -> Result<Self, JidError> {
        let normal = strip_root_dot(s);
        let jid = jid::Jid::new(&normal).map_err(|e| JidError::Invalid(format!("{s:?}: {e}")))?;
        Self::from_jid(&jid).ok_or_else(|| JidError::NoLocalPart(s.to_owned()))
    }

    /// The user part of an already parsed JID; `None` for a domain JID (or a domain that
    /// still ends in a dot after the root dot is removed).
    pub fn from_jid(jid: &jid::Jid) -> Option<Self> {
        let node = jid.node()?;
        let domain = jid.domain().as_str();
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.ends_with('.') {
            return None;
        }
        let s = format!("{}@{}", node.as_str().to_lowercase(), domain.to_lowercase());
        Some(Self(Arc::from(s)))
    }

    /// `local@domain`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The domain part.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or(&self.0)
    }
}

/// `local@domain./resource` → `local@domain/resource` (one root dot, RFC 7622 §3.2).
fn strip_root_dot(s: &str) -> std::borrow::Cow<'_, str> {
    let (bare, resource) = match s.find('/') {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    match bare.strip_suffix('.') {
        Some(b) if !b.ends_with('.') && !b.ends_with('@') && !b.is_empty() => {
            std::borrow::Cow::Owned(format!("{b}{resource}"))
        }
        _ => std::borrow::Cow::Borrowed(s),
    }
}

/// A `UserJid` orders, compares and hashes exactly as its text does (the derives go through
/// `Arc<str>`), so maps keyed by it can be searched with any `&str` — a page cursor, say.
impl std::borrow::Borrow<str> for UserJid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserJid {
    type Error = JidError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl fmt::Display for UserJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for UserJid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Availability, ordered from most to least available (the RFC 6121 tie-break order).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Show {
    /// Free for chat.
    Chat,
    /// Plain available (no `<show/>`).
    Available,
    /// Away.
    Away,
    /// Extended away.
    Xa,
    /// Do not disturb.
    Dnd,
    /// No resource online.
    Offline,
}

impl Show {
    /// All values, in availability order.
    pub const ALL: [Show; 6] = [
        Show::Chat,
        Show::Available,
        Show::Away,
        Show::Xa,
        Show::Dnd,
        Show::Offline,
    ];

    /// The contract's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Show::Chat => "chat",
            Show::Available => "available",
            Show::Away => "away",
            Show::Xa => "xa",
            Show::Dnd => "dnd",
            Show::Offline => "offline",
        }
    }

    /// The value for a contract word (`None` for anything else).
    pub fn parse(word: &str) -> Option<Show> {
        Show::ALL.into_iter().find(|s| s.as_str() == word)
    }

    /// Rank for aggregation: higher is more available.
    pub fn availability(self) -> u8 {
        match self {
            Show::Chat => 5,
            Show::Available => 4,
            Show::Away => 3,
            Show::Xa => 2,
            Show::Dnd => 1,
            Show::Offline => 0,
        }
    }
}

/// Serialises a time as RFC 3339 UTC with milliseconds (`2026-11-22T10:00:00.123Z`).
pub mod rfc3339_millis {
    use super::*;

    /// For `DateTime<Utc>`.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    /// For `Option<DateTime<Utc>>`.
    pub mod option {
        use super::*;
        /// Serialise `None` as `null`.
        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
                None => s.serialize_none(),
            }
        }
    }
}

/// What one resource says about itself (the content of an available presence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// `<show/>`, or `Available` when absent.
    pub show: Show,
    /// The status text in the stanza's default language.
    pub status: Option<String>,
    /// −128..127, default 0.
    pub priority: i8,
    /// Client name derived from XEP-0115 caps.
    pub client: Option<String>,
    /// XEP-0319 idle since.
    pub idle_since: Option<DateTime<Utc>>,
}

/// Where an event came from (recorded with history by the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// A live presence stanza.
    Stanza,
    /// An answer to our probe (or a server's initial state push), carrying a delay stamp.
    Probe,
    /// Inferred by the bridge: not confirmed by a probe within the grace period.
    Resync,
    /// Closed by the bridge on shutdown.
    Shutdown,
    /// Found or closed by comparing with the server's own session list (contract §10).
    Reconcile,
    /// From MongooseIM's event pusher over AMQP (contract §9).
    Amqp,
}

/// What happened to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The resource is (still) online with this availability.
    Available(Availability),
    /// The resource is online; this availability applies only if it was not online already
    /// (a source that knows *that* a session exists, not its show/status: MongooseIM's event
    /// pusher). Decided by the sequencer, so it never overwrites what XMPP said.
    Present(Availability),
    /// The resource is gone; `status` is the goodbye text, if any.
    Unavailable {
        /// Status text of the unavailable presence (what the user said).
        status: Option<String>,
        /// The server's reason when the server generated the unavailable itself
        /// (MongooseIM `Shutdown by reason: socket_closed`, Prosody `Disconnected: closed`):
        /// the session's end cause, not something the user said.
        reason: Option<String>,
    },
    /// Every resource of the user is gone (presence error from the bare JID).
    AllUnavailable {
        /// Why, if known.
        status: Option<String>,
    },
}

/// One input to the engine: a translated presence stanza (or an inferred one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// Unique id (time-ordered), so that stores can de-duplicate replays.
    pub id: u128,
    /// The user.
    pub jid: UserJid,
    /// The resource (empty only for `AllUnavailable`).
    pub resource: String,
    /// What happened.
    pub kind: EventKind,
    /// When it happened (XEP-0203 delay stamp if present, else `received_at`).
    pub at: DateTime<Utc>,
    /// When the bridge read it.
    pub received_at: DateTime<Utc>,
    /// Where it came from.
    pub cause: Cause,
}

/// A fresh, time-ordered, practically unique event id: milliseconds since the epoch in the top
/// 48 bits, then 80 random bits (the layout of a UUIDv7 without the version bits).
pub fn new_event_id() -> u128 {
    let ms = Utc::now().timestamp_millis().max(0) as u128;
    (ms << 80) | (rand::random::<u128>() & ((1u128 << 80) - 1))
}

/// The presence of one resource of a user (contract §3 `resources[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ResourcePresence {
    /// Resource part of the full JID.
    pub resource: String,
    /// Availability.
    pub show: Show,
    /// Status text.
    pub status: Option<String>,
    /// Priority.
    pub priority: i8,
    /// Client name (from caps).
    pub client: Option<String>,
    /// When this resource came online.
    #[serde(with = "rfc3339_millis")]
    pub since: DateTime<Utc>,
    /// XEP-0319 idle since.
    #[serde(with = "rfc3339_millis::option")]
    pub idle_since: Option<DateTime<Utc>>,
    /// Engine-local order of the resource's last change: "most recent" tie-break. Not part of
    /// the contract, so not serialised.
    #[serde(skip)]
    pub touched: u64,
}

/// The aggregated presence of one bare JID (contract §3 `UserPresence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UserPresence {
    /// Bare JID.
    #[schema(value_type = String, example = "alice@example.com")]
    pub jid: UserJid,
    /// At least one resource online.
    pub online: bool,
    /// Aggregate show (`offline` exactly when not online).
    pub show: Show,
    /// Aggregate status text (for an offline user: the text of the last unavailable).
    pub status: Option<String>,
    /// Aggregate priority (0 when offline).
    pub priority: i8,
    /// When the user last went from offline to online.
    #[serde(with = "rfc3339_millis::option")]
    pub online_since: Option<DateTime<Utc>>,
    /// When anything about the user last changed.
    #[serde(with = "rfc3339_millis")]
    pub last_change: DateTime<Utc>,
    /// When the last resource went unavailable; `null` while online.
    #[serde(with = "rfc3339_millis::option")]
    pub last_seen: Option<DateTime<Utc>>,
    /// Online resources, sorted by resource name; empty when offline.
    pub resources: Vec<ResourcePresence>,
}

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Was offline (or unknown), now online.
    Online,
    /// Still online, something changed.
    Update,
    /// Last resource gone.
    Offline,
}

/// One step of the change stream (contract §3 `Change`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Gap-free sequence number within the epoch.
    pub seq: u64,
    /// The user.
    pub jid: UserJid,
    /// What kind of change.
    pub op: Op,
    /// The user's complete new state.
    pub presence: Arc<UserPresence>,
    /// When the bridge read the stanza behind this change (for end-to-end latency; not part
    /// of the contract).
    #[serde(skip)]
    pub received_at: DateTime<Utc>,
    /// This change's JSON, encoded once by the first subscriber that sends it and shared by
    /// all the others (see [`Change::json`]).
    #[serde(skip)]
    pub encoded: std::sync::OnceLock<Box<str>>,
}

impl Change {
    /// An `Op::Update` for `jid`, online with `status`, read `age_secs` ago (unit tests).
    #[cfg(test)]
    pub(crate) fn for_test(seq: u64, jid: &str, status: &str, age_secs: i64) -> Arc<Change> {
        let jid = UserJid::parse(jid).expect("a valid test JID");
        let now = Utc::now();
        Arc::new(Change {
            seq,
            jid: jid.clone(),
            op: Op::Update,
            presence: Arc::new(UserPresence {
                jid,
                online: true,
                show: Show::Away,
                status: Some(status.into()),
                priority: 3,
                online_since: Some(now),
                last_change: now,
                last_seen: None,
                resources: Vec::new(),
            }),
            received_at: now - chrono::Duration::seconds(age_secs),
            encoded: Default::default(),
        })
    }

    /// The change as contract §3 JSON. Encoded on first use and kept, so that a change sent
    /// to a thousand WebSocket subscribers is serialised once, not a thousand times.
    pub fn json(&self) -> &str {
        self.encoded.get_or_init(|| {
            serde_json::to_string(self)
                .unwrap_or_default()
                .into_boxed_str()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Wherever the fast path answers, the full parse gives the same JID.
        #[test]
        fn the_simple_jid_path_agrees_with_the_full_parse(
            local in "[a-zA-Z0-9._-]{0,70}",
            domain in "[a-zA-Z0-9.-]{0,20}(\\.[a-zA-Z0-9-]{0,64}){0,3}",
            resource in proptest::option::of("[a-z/]{0,4}"),
        ) {
            let s = format!("{local}@{domain}{}", resource.map(|r| format!("/{r}")).unwrap_or_default());
            if let Some(fast) = UserJid::parse_simple(&s) {
                proptest::prop_assert_eq!(UserJid::parse_full(&s).ok(), Some(fast), "{}", s);
            }
        }

        /// The same over a small alphabet, where dots and hyphens meet often.
        #[test]
        fn the_simple_jid_path_agrees_on_dense_punctuation(s in "[aA._-]{0,4}@[aZ0.-]{0,12}") {
            if let Some(fast) = UserJid::parse_simple(&s) {
                proptest::prop_assert_eq!(UserJid::parse_full(&s).ok(), Some(fast), "{}", s);
            }
        }
    }

    #[test]
    fn the_simple_jid_path_takes_the_common_case_and_only_that() {
        for ok in [
            "alice@example.com",
            "Bob.Smith_1-x@Mail-1.Example.ORG",
            "u1@localhost",
            "x@127.0.0.1",
        ] {
            let fast = UserJid::parse_simple(ok).unwrap_or_else(|| panic!("{ok}"));
            assert_eq!(Some(fast), UserJid::parse_full(ok).ok(), "{ok}");
        }
        for other in [
            "alice@example.com/phone",
            "alice@example.com.",
            "a@b..c",
            "a@-b.c",
            "a@b-.c",
            "@b.c",
            "a@",
            "a@b@c",
            "é@b.c",
            "a b@c",
            "a@b_c.d",
            "a@xn--nxasmq6b.com",
            "",
        ] {
            assert!(UserJid::parse_simple(other).is_none(), "{other}");
        }
    }

    #[test]
    fn jid_normalisation() {
        let j = UserJid::parse("Alice@LocalHost/Phone").expect("valid");
        assert_eq!(j.as_str(), "alice@localhost");
        assert_eq!(j.domain(), "localhost");
        assert!(matches!(
            UserJid::parse("localhost"),
            Err(JidError::NoLocalPart(_))
        ));
        assert!(matches!(UserJid::parse("a@b@c"), Err(JidError::Invalid(_))));
        assert!(matches!(UserJid::parse(""), Err(JidError::Invalid(_))));
    }

    #[test]
    fn json_shape_matches_contract() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123456Z")
            .expect("valid")
            .with_timezone(&Utc);
        let u = UserPresence {
            jid: UserJid::parse("alice@example.com").expect("valid"),
            online: true,
            show: Show::Away,
            status: Some("In a meeting".into()),
            priority: 5,
            online_since: Some(t),
            last_change: t,
            last_seen: None,
            resources: vec![ResourcePresence {
                resource: "phone".into(),
                show: Show::Away,
                status: Some("In a meeting".into()),
                priority: 5,
                client: Some("Conversations".into()),
                since: t,
                idle_since: None,
                touched: 7,
            }],
        };
        let v = serde_json::to_value(&u).expect("serialises");
        assert_eq!(
            v,
            serde_json::json!({
                "jid": "alice@example.com", "online": true, "show": "away",
                "status": "In a meeting", "priority": 5,
                "online_since": "2026-11-22T10:00:00.123Z",
                "last_change": "2026-11-22T10:00:00.123Z", "last_seen": null,
                "resources": [{"resource": "phone", "show": "away", "status": "In a meeting",
                    "priority": 5, "client": "Conversations",
                    "since": "2026-11-22T10:00:00.123Z", "idle_since": null}]
            })
        );
    }

    #[test]
    fn event_ids_are_unique_and_time_ordered() {
        let a = new_event_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_event_id();
        assert!(b > a);
        assert_ne!(new_event_id(), new_event_id());
    }
}
