//! Presence stanza → engine event (or roster-handshake action), per design.md "Presence rules".
//!
//! Pure functions of a parsed stanza and the receive time: no I/O, no shared state, so every
//! shape the lab report lists is a unit test here and the fuzz target can hammer it.

use std::collections::HashSet;

use chrono::{DateTime, Duration as ChronoDuration, NaiveDateTime, Utc};
use minidom::Element;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::message::Message;
use xmpp_parsers::presence::{Presence, Show as XShow, Type};

use crate::config::XmppConfig;
use crate::presence::model::{
    Availability, Cause, EventKind, PresenceEvent, Show, UserJid, new_event_id,
};

const NS_CAPS: &str = "http://jabber.org/protocol/caps";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_LEGACY_DELAY: &str = "jabber:x:delay";
const NS_IDLE: &str = "urn:xmpp:idle:1";
const NS_LAST: &str = "jabber:iq:last";
/// XEP-0356 namespaces we understand (v1 is ejabberd's, v2 Prosody's).
pub const NS_PRIVILEGE: [&str; 2] = ["urn:xmpp:privilege:1", "urn:xmpp:privilege:2"];

/// What a presence stanza asks of the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A presence change for the engine.
    Event(PresenceEvent),
    /// A user asks to subscribe to the component: answer `subscribed` and subscribe back.
    Subscribe(UserJid),
    /// A user approved our subscription request.
    Subscribed(UserJid),
    /// A user cancels their subscription to the component: answer `unsubscribed`.
    Unsubscribe(UserJid),
    /// A user revoked our subscription: we will stop receiving their presence.
    Unsubscribed(UserJid),
    /// Someone asks for the component's presence: answer with it (to this full or bare JID).
    Probe(jid::Jid),
}

/// Why a stanza was dropped (each reason is counted by the component).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// No `from` attribute.
    #[error("presence without from")]
    NoFrom,
    /// From a server or component JID (no local part): not a user's presence.
    #[error("presence from non-user JID {0}")]
    NotUser(String),
    /// From a domain outside `xmpp.domains`.
    #[error("presence from untracked domain {0}")]
    ForeignDomain(String),
    /// Available/unavailable from a bare JID: a resource is needed to track it.
    #[error("presence without resource from {0}")]
    NoResource(String),
    /// Past the configured size limits.
    #[error("oversized presence: {0}")]
    Oversized(&'static str),
}

/// The translation context: which domains are ours and the size limits.
#[derive(Debug, Clone)]
pub struct Translator {
    domains: HashSet<String>,
    max_status_bytes: usize,
    max_payloads: usize,
    status_languages: Vec<String>,
}

/// The reason inside the status text a server writes into an unavailable it generates itself
/// when a session ends without the client's own unavailable: MongooseIM `Shutdown by reason:
/// socket_closed` / `stream_end` / `system_shutdown`, Prosody `Disconnected: closed`. That text
/// is an end cause, not what the user said.
pub fn server_end_reason(status: &str) -> Option<&str> {
    ["Shutdown by reason: ", "Disconnected: "]
        .iter()
        .find_map(|p| status.strip_prefix(p))
        .map(str::trim)
        .filter(|r| !r.is_empty() && r.len() <= 200)
}

impl Translator {
    /// From the `[xmpp]` config.
    pub fn new(cfg: &XmppConfig) -> Self {
        Self {
            domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
            max_status_bytes: cfg.max_status_bytes,
            max_payloads: cfg.max_payloads,
            status_languages: cfg
                .status_languages
                .iter()
                .map(|l| l.to_lowercase())
                .collect(),
        }
    }

    /// The status text to show. The parser gives a `<status/>` without `xml:lang` the
    /// stanza's inherited language and does not keep the stanza's own `xml:lang`, so "the
    /// stanza's default language" is: the only status; else one with no language at all; else
    /// the first of `xmpp.status_languages` present; else the first in language order.
    /// Control characters other than newline and tab are removed.
    fn default_status(&self, p: &Presence) -> Option<String> {
        let text = if p.statuses.len() == 1 {
            p.statuses.values().next()
        } else {
            p.statuses
                .get("")
                .or_else(|| {
                    self.status_languages.iter().find_map(|l| {
                        p.statuses
                            .iter()
                            .find(|(k, _)| k.to_lowercase() == *l)
                            .map(|(_, v)| v)
                    })
                })
                .or_else(|| p.statuses.values().next())
        }?;
        let clean: String = text
            .chars()
            .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
            .collect();
        let trimmed = clean.trim();
        (!trimmed.is_empty()).then(|| trimmed.to_owned())
    }

    /// Translates one presence stanza read at `received_at`. A XEP-0203 `<delay>` moves the
    /// event back in time only when `delay` is [`Delay::Trusted`]: a client can put any stamp in
    /// its own live presence (its `from` does not tell a server's stamp from a client's).
    pub fn presence(
        &self,
        p: &Presence,
        received_at: DateTime<Utc>,
        delay: Delay,
    ) -> Result<Inbound, Dropped> {
        let from = p.from.as_ref().ok_or(Dropped::NoFrom)?;
        let user = UserJid::from_jid(from).ok_or_else(|| Dropped::NotUser(from.to_string()))?;
        if !self.domains.contains(user.domain()) {
            return Err(Dropped::ForeignDomain(user.domain().to_owned()));
        }
        if p.payloads.len() > self.max_payloads {
            return Err(Dropped::Oversized("too many child elements"));
        }
        if p.statuses.values().any(|s| s.len() > self.max_status_bytes) {
            return Err(Dropped::Oversized("status text too long"));
        }
        let resource = resource_of(from);
        let stamp = match delay {
            Delay::Trusted => delay_stamp(&p.payloads),
            Delay::Untrusted => None,
        };
        let event = |resource: String, kind: EventKind| {
            let (at, cause) = match stamp {
                // A stamp in the future is clock skew: never let it move time forward.
                Some(stamp) => (stamp.min(received_at), Cause::Probe),
                None => (received_at, Cause::Stanza),
            };
            Inbound::Event(PresenceEvent {
                id: new_event_id(),
                jid: user.clone(),
                resource,
                kind,
                at,
                received_at,
                cause,
            })
        };
        Ok(match p.type_ {
            Type::None => {
                let resource = resource.ok_or_else(|| Dropped::NoResource(user.to_string()))?;
                let at = stamp.map_or(received_at, |s| s.min(received_at));
                let availability = Availability {
                    show: match p.show {
                        None => Show::Available,
                        Some(XShow::Chat) => Show::Chat,
                        Some(XShow::Away) => Show::Away,
                        Some(XShow::Xa) => Show::Xa,
                        Some(XShow::Dnd) => Show::Dnd,
                    },
                    status: self.default_status(p),
                    priority: p.priority.0,
                    client: client_name(&p.payloads),
                    idle_since: idle_since(&p.payloads, at),
                };
                event(resource, EventKind::Available(availability))
            }
            Type::Unavailable => {
                let resource = resource.ok_or_else(|| Dropped::NoResource(user.to_string()))?;
                let status = self.default_status(p);
                let kind = match status.as_deref().and_then(server_end_reason) {
                    Some(reason) => EventKind::Unavailable {
                        status: None,
                        reason: Some(reason.to_owned()),
                    },
                    None => EventKind::Unavailable {
                        status,
                        reason: None,
                    },
                };
                event(resource, kind)
            }
            // RFC 6121 / MongooseIM: an error from the user's JID means that resource (or,
            // from the bare JID, the whole user) is unreachable: it is gone.
            Type::Error => match resource {
                Some(r) => event(
                    r,
                    EventKind::Unavailable {
                        status: None,
                        reason: Some("presence_error".into()),
                    },
                ),
                None => event(String::new(), EventKind::AllUnavailable { status: None }),
            },
            Type::Probe => Inbound::Probe(from.clone()),
            Type::Subscribe => Inbound::Subscribe(user),
            Type::Subscribed => Inbound::Subscribed(user),
            Type::Unsubscribe => Inbound::Unsubscribe(user),
            Type::Unsubscribed => Inbound::Unsubscribed(user),
        })
    }
}

/// Whether a presence's `<delay>` stamp may say when it really happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// The server is answering the bridge (a probe answer, or the state a server pushes right
    /// after connect): the stamp is the server's record of the resource's last change.
    Trusted,
    /// Live presence: the stamp is whatever the client wrote; the receive time is used.
    Untrusted,
}

/// The resource of a full JID. The `jid` crate parses `user@example.com./r` (a root dot,
/// RFC 7622 §3.2) as resource `/r`; a resource can legally begin with `/` only as `a@b//r`,
/// which no server assigns, so one leading `/` is taken for that artefact and removed.
fn resource_of(from: &Jid) -> Option<String> {
    let r = from.resource()?.as_str();
    let r = r.strip_prefix('/').unwrap_or(r);
    (!r.is_empty()).then(|| r.to_owned())
}

/// XEP-0203 `<delay stamp>` (or legacy XEP-0091 `jabber:x:delay`), UTC.
fn delay_stamp(payloads: &[Element]) -> Option<DateTime<Utc>> {
    for el in payloads {
        if el.is("delay", NS_DELAY)
            && let Some(t) = el.attr("stamp").and_then(parse_datetime)
        {
            return Some(t);
        }
    }
    payloads
        .iter()
        .find(|el| el.is("x", NS_LEGACY_DELAY))
        .and_then(|el| el.attr("stamp"))
        .and_then(|s| NaiveDateTime::parse_from_str(s, "%Y%m%dT%H:%M:%S").ok())
        .map(|n| n.and_utc())
}

/// XEP-0319 `<idle since>`, else XEP-0256 `jabber:iq:last` seconds before `at`.
fn idle_since(payloads: &[Element], at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Some(t) = payloads
        .iter()
        .find(|el| el.is("idle", NS_IDLE))
        .and_then(|el| el.attr("since"))
        .and_then(parse_datetime)
    {
        return Some(t.min(at));
    }
    let secs: i64 = payloads
        .iter()
        .find(|el| el.is("query", NS_LAST))?
        .attr("seconds")?
        .parse()
        .ok()?;
    (secs > 0 && secs < 10 * 365 * 86_400).then(|| at - ChronoDuration::seconds(secs))
}

/// XEP-0082 date-time (RFC 3339 profile, fractional seconds optional).
fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Well-known XEP-0115 caps nodes → client names. Unknown nodes fall back to the node's host
/// and path, which still tells an operator which software it is.
const KNOWN_CLIENTS: &[(&str, &str)] = &[
    ("conversations.im", "Conversations"),
    ("gajim.org", "Gajim"),
    ("dino.im", "Dino"),
    ("psi-im.org", "Psi"),
    ("psi-plus.com", "Psi+"),
    ("pidgin.im", "Pidgin"),
    ("poez.io", "Poezio"),
    ("monal-im.org", "Monal"),
    ("github.com/monal-im", "Monal"),
    ("siskin.im", "Siskin IM"),
    ("beagle.im", "BeagleIM"),
    ("blabber.im", "blabber.im"),
    ("cheogram.com", "Cheogram"),
    ("movim.eu", "Movim"),
    ("jitsi.org", "Jitsi"),
    ("swift.im", "Swift"),
    ("kaidan.im", "Kaidan"),
    ("profanity-im.github.io", "Profanity"),
    ("profanity.im", "Profanity"),
    ("tkabber.jabber.ru", "Tkabber"),
    ("miranda-ng.org", "Miranda NG"),
    ("slixmpp.com", "slixmpp"),
    ("poez.io/", "Poezio"),
    ("converse.js", "Converse.js"),
    ("conversejs.org", "Converse.js"),
    ("mcabber.com", "mcabber"),
    ("xabber.com", "Xabber"),
    ("yaxim.org", "yaxim"),
    ("bruno.yaxim.org", "Bruno"),
    ("adium.im", "Adium"),
    ("trillian.im", "Trillian"),
    ("igniterealtime.org/projects/spark", "Spark"),
    ("www.igniterealtime.org/projects/smack", "Smack"),
    ("mongooseim", "MongooseIM"),
];

/// The client name from a `<c xmlns='http://jabber.org/protocol/caps' node='...'/>` child.
pub fn client_name(payloads: &[Element]) -> Option<String> {
    let node = payloads
        .iter()
        .find(|el| el.is("c", NS_CAPS))?
        .attr("node")?
        .trim();
    if node.is_empty() {
        return None;
    }
    let bare = node
        .split_once("://")
        .map_or(node, |(_, rest)| rest)
        .trim_end_matches('/');
    let lower = bare.to_lowercase();
    let host = lower.split('/').next().unwrap_or("");
    for (pat, name) in KNOWN_CLIENTS {
        if host == *pat || host.ends_with(&format!(".{pat}")) || lower.starts_with(pat) {
            return Some((*name).to_owned());
        }
    }
    // Unknown: "host/path", bounded so a silly node cannot bloat every frame.
    Some(bare.chars().take(64).collect())
}

/// The permissions granted by a XEP-0356 advertisement: `(access, type)` pairs such as
/// `("presence", "managed_entity")`. `None` if the message carries no privilege element.
pub fn privileges(msg: &Message) -> Option<Vec<(String, String)>> {
    let el = msg
        .payloads
        .iter()
        .find(|el| el.name() == "privilege" && NS_PRIVILEGE.contains(&el.ns().as_str()))?;
    Some(
        el.children()
            .filter(|c| c.name() == "perm")
            .filter_map(|c| Some((c.attr("access")?.to_owned(), c.attr("type")?.to_owned())))
            .collect(),
    )
}

/// Parses a presence from XML text in the component namespace (tests, fuzzing, tools).
pub fn parse_presence(xml: &str) -> Result<Presence, String> {
    let el: Element = xml.parse().map_err(|e| format!("not XML: {e}"))?;
    Presence::try_from(el).map_err(|e| format!("not a valid presence: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn tr() -> Translator {
        Translator::new(&XmppConfig {
            domains: vec!["localhost".into(), "Example.COM".into()],
            ..XmppConfig::default()
        })
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0)
            .single()
            .unwrap_or_default()
    }

    /// As a probe answer (delay stamps trusted).
    fn run(xml: &str) -> Result<Inbound, Dropped> {
        let p = parse_presence(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        tr().presence(&p, now(), Delay::Trusted)
    }

    fn event(xml: &str) -> PresenceEvent {
        match run(xml) {
            Ok(Inbound::Event(e)) => e,
            other => panic!("expected event, got {other:?} for {xml}"),
        }
    }

    fn avail(e: &PresenceEvent) -> &Availability {
        match &e.kind {
            EventKind::Available(a) => a,
            k => panic!("expected available, got {k:?}"),
        }
    }

    const NS: &str = "xmlns='jabber:component:accept'";

    #[test]
    fn lab_available_with_caps() {
        // Verbatim shape from the lab report §4.1.
        let e = event(&format!(
            "<presence {NS} xml:lang='en' to='bridge.localhost' from='alice@localhost/phone' id='f427'><c xmlns='http://jabber.org/protocol/caps' node='https://lab.invalid/presence-client/phone' hash='sha-1' ver='fxVFrxx/tY4nubVZA64epe60C1I='/><priority>5</priority><show>chat</show><status>on my phone</status></presence>"
        ));
        assert_eq!(e.jid.as_str(), "alice@localhost");
        assert_eq!(e.resource, "phone");
        assert_eq!(e.cause, Cause::Stanza);
        assert_eq!(e.at, now());
        let a = avail(&e);
        assert_eq!(a.show, Show::Chat);
        assert_eq!(a.priority, 5);
        assert_eq!(a.status.as_deref(), Some("on my phone"));
        assert_eq!(
            a.client.as_deref(),
            Some("lab.invalid/presence-client/phone")
        );
        assert_eq!(a.idle_since, None);
    }

    #[test]
    fn defaults_no_show_no_priority() {
        let e = event(&format!("<presence {NS} from='Alice@LOCALHOST/Laptop'/>"));
        assert_eq!(e.jid.as_str(), "alice@localhost");
        assert_eq!(e.resource, "Laptop", "resource keeps its case");
        let a = avail(&e);
        assert_eq!(
            (a.show, a.priority, a.status.clone(), a.client.clone()),
            (Show::Available, 0, None, None)
        );
    }

    #[test]
    fn every_show_value_and_priority_bounds() {
        for (word, show) in [
            ("chat", Show::Chat),
            ("away", Show::Away),
            ("xa", Show::Xa),
            ("dnd", Show::Dnd),
        ] {
            let e = event(&format!(
                "<presence {NS} from='a@localhost/r'><show>{word}</show><priority>-128</priority></presence>"
            ));
            assert_eq!(avail(&e).show, show);
            assert_eq!(avail(&e).priority, -128);
        }
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><priority>127</priority></presence>"
        ));
        assert_eq!(avail(&e).priority, 127);
    }

    #[test]
    fn probe_answer_with_delay_restores_time() {
        // Lab §4.3: probe answers carry <delay> with the time of the resource's last change.
        let e = event(&format!(
            "<presence {NS} xml:lang='en' to='bridge.localhost' from='alice@localhost/phone' id='70'><c xmlns='http://jabber.org/protocol/caps' node='http://conversations.im' hash='sha-1' ver='x'/><delay from='alice@localhost/phone' stamp='2026-11-22T02:22:51.058921Z' xmlns='urn:xmpp:delay'/><priority>5</priority><show>away</show><status>walking</status></presence>"
        ));
        assert_eq!(e.cause, Cause::Probe);
        assert_eq!(e.at.to_rfc3339(), "2026-11-22T02:22:51.058921+00:00");
        assert_eq!(e.received_at, now());
        assert_eq!(avail(&e).client.as_deref(), Some("Conversations"));
        // Prosody: second precision, server JID as delay from.
        let e = event(&format!(
            "<presence {NS} from='bob@localhost/laptop'><delay stamp='2026-11-22T02:17:38Z' xmlns='urn:xmpp:delay' from='localhost'/></presence>"
        ));
        assert_eq!(e.at.to_rfc3339(), "2026-11-22T02:17:38+00:00");
        // Legacy XEP-0091.
        let e = event(&format!(
            "<presence {NS} from='bob@localhost/laptop'><x xmlns='jabber:x:delay' stamp='20261122T01:02:03'/></presence>"
        ));
        assert_eq!(e.at.to_rfc3339(), "2026-11-22T01:02:03+00:00");
        // A future stamp (clock skew) is clamped to the receive time.
        let e = event(&format!(
            "<presence {NS} from='bob@localhost/laptop'><delay stamp='2030-01-01T00:00:00Z' xmlns='urn:xmpp:delay'/></presence>"
        ));
        assert_eq!(e.at, now());
        // A garbage stamp is ignored, the presence kept.
        let e = event(&format!(
            "<presence {NS} from='bob@localhost/laptop'><delay stamp='yesterday' xmlns='urn:xmpp:delay'/></presence>"
        ));
        assert_eq!((e.at, e.cause), (now(), Cause::Stanza));
    }

    #[test]
    fn live_presence_with_a_backdated_delay_is_taken_at_its_receive_time() {
        let xml = format!(
            "<presence {NS} from='mallory@localhost/r'><delay stamp='1970-01-01T00:00:00Z' xmlns='urn:xmpp:delay' from='localhost'/><show>chat</show></presence>"
        );
        let p = parse_presence(&xml).unwrap();
        match tr().presence(&p, now(), Delay::Untrusted) {
            Ok(Inbound::Event(e)) => {
                assert_eq!((e.at, e.cause), (now(), Cause::Stanza));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn idle_forms() {
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><show>away</show><idle xmlns='urn:xmpp:idle:1' since='2026-11-22T02:00:00+01:00'/></presence>"
        ));
        assert_eq!(
            avail(&e).idle_since.map(|t| t.to_rfc3339()),
            Some("2026-11-22T01:00:00+00:00".into())
        );
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><query xmlns='jabber:iq:last' seconds='60'/></presence>"
        ));
        assert_eq!(
            avail(&e).idle_since,
            Some(now() - ChronoDuration::seconds(60))
        );
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><idle xmlns='urn:xmpp:idle:1' since='garbage'/></presence>"
        ));
        assert_eq!(avail(&e).idle_since, None);
    }

    #[test]
    fn status_language_preference() {
        let e = event(&format!(
            "<presence {NS} xml:lang='en' from='a@localhost/r'><status xml:lang='de'>Besprechung</status><status>meeting</status></presence>"
        ));
        assert_eq!(avail(&e).status.as_deref(), Some("meeting"));
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><status xml:lang='fr'>réunion</status><status xml:lang='de'>Besprechung</status></presence>"
        ));
        assert_eq!(
            avail(&e).status.as_deref(),
            Some("Besprechung"),
            "first in language order"
        );
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><status xml:lang='fr'>réunion</status></presence>"
        ));
        assert_eq!(
            avail(&e).status.as_deref(),
            Some("réunion"),
            "the only status"
        );
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><status xml:lang='de'>Besprechung</status><status>meeting</status></presence>"
        ));
        assert_eq!(
            avail(&e).status.as_deref(),
            Some("meeting"),
            "no language at all beats a tagged one"
        );
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><status>  </status></presence>"
        ));
        assert_eq!(avail(&e).status, None, "blank status is no status");
    }

    #[test]
    fn unavailable_and_error() {
        // Lab §4.1: explicit unavailable; §4.7: Prosody's with a status.
        let e = event(&format!(
            "<presence {NS} xml:lang='en' to='bridge.localhost' from='alice@localhost/phone' type='unavailable' id='64e2'/>"
        ));
        assert_eq!(
            e.kind,
            EventKind::Unavailable {
                status: None,
                reason: None
            }
        );
        // The server's own text is an end cause, not the user's status.
        let e = event(&format!(
            "<presence {NS} to='bridge.localhost' type='unavailable' from='bob@localhost/laptop'><status>Disconnected: closed</status></presence>"
        ));
        assert_eq!(
            e.kind,
            EventKind::Unavailable {
                status: None,
                reason: Some("closed".into())
            }
        );
        // MongooseIM 6.2.1 (shared/xmpp-lab/mongooseim-6.2.1-facts.md).
        for reason in ["socket_closed", "stream_end", "system_shutdown"] {
            let e = event(&format!(
                "<presence {NS} from='carol@localhost/phone' to='bridge.localhost' type='unavailable'><status>Shutdown by reason: {reason}</status></presence>"
            ));
            assert_eq!(
                e.kind,
                EventKind::Unavailable {
                    status: None,
                    reason: Some(reason.into())
                }
            );
        }
        // What a user says is kept as said.
        let e = event(&format!(
            "<presence {NS} from='carol@localhost/phone' type='unavailable'><status>Gone fishing</status></presence>"
        ));
        assert_eq!(
            e.kind,
            EventKind::Unavailable {
                status: Some("Gone fishing".into()),
                reason: None
            }
        );
        let e = event(&format!(
            "<presence {NS} from='bob@localhost/laptop' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"
        ));
        assert_eq!(
            (e.resource.as_str(), e.kind.clone()),
            (
                "laptop",
                EventKind::Unavailable {
                    status: None,
                    reason: Some("presence_error".into())
                }
            )
        );
        let e = event(&format!(
            "<presence {NS} from='bob@localhost' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"
        ));
        assert_eq!(e.kind, EventKind::AllUnavailable { status: None });
    }

    #[test]
    fn roster_handshake() {
        assert_eq!(
            run(&format!(
                "<presence {NS} from='Bob@localhost' type='subscribe'/>"
            )),
            Ok(Inbound::Subscribe(UserJid::parse("bob@localhost").unwrap()))
        );
        assert!(matches!(
            run(&format!(
                "<presence {NS} from='bob@localhost' type='subscribed'/>"
            )),
            Ok(Inbound::Subscribed(_))
        ));
        assert!(matches!(
            run(&format!(
                "<presence {NS} from='bob@localhost' type='unsubscribe'/>"
            )),
            Ok(Inbound::Unsubscribe(_))
        ));
        assert!(matches!(
            run(&format!(
                "<presence {NS} from='bob@localhost' type='unsubscribed'/>"
            )),
            Ok(Inbound::Unsubscribed(_))
        ));
        match run(&format!(
            "<presence {NS} from='bob@localhost/x' type='probe'/>"
        )) {
            Ok(Inbound::Probe(j)) => assert_eq!(j.to_string(), "bob@localhost/x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dropped_shapes() {
        assert_eq!(run(&format!("<presence {NS}/>")), Err(Dropped::NoFrom));
        assert_eq!(
            run(&format!("<presence {NS} from='evil.org/x'/>")),
            Err(Dropped::NotUser("evil.org/x".into()))
        );
        assert_eq!(
            run(&format!("<presence {NS} from='a@evil.org/x'/>")),
            Err(Dropped::ForeignDomain("evil.org".into()))
        );
        assert!(
            matches!(
                run(&format!("<presence {NS} from='a@example.com/x'/>")),
                Ok(Inbound::Event(_))
            ),
            "configured domains are case-insensitive"
        );
        assert_eq!(
            run(&format!("<presence {NS} from='a@localhost'/>")),
            Err(Dropped::NoResource("a@localhost".into()))
        );
        assert_eq!(
            run(&format!(
                "<presence {NS} from='a@localhost' type='unavailable'/>"
            )),
            Err(Dropped::NoResource("a@localhost".into()))
        );
        // ejabberd's bounce while the component was down (lab §4.3): from the component domain.
        assert!(matches!(
            run(&format!(
                "<presence {NS} from='bridge.localhost' type='error'><error type='cancel'><remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"
            )),
            Err(Dropped::NotUser(_))
        ));
        let long = "x".repeat(5000);
        assert_eq!(
            run(&format!(
                "<presence {NS} from='a@localhost/r'><status>{long}</status></presence>"
            )),
            Err(Dropped::Oversized("status text too long"))
        );
        let many = "<x xmlns='urn:example'/>".repeat(40);
        assert_eq!(
            run(&format!(
                "<presence {NS} from='a@localhost/r'>{many}</presence>"
            )),
            Err(Dropped::Oversized("too many child elements"))
        );
    }

    #[test]
    fn malformed_shapes_fail_to_parse_without_panic() {
        // Lab §0 / stack-notes: these are rejected by the parser; the component counts them.
        for xml in [
            format!("<presence {NS} from='a@localhost/r'><show>sleeping</show></presence>"),
            format!("<presence {NS} from='a@localhost/r'><priority>300</priority></presence>"),
            format!("<presence {NS} from='a@localhost/r'><priority>high</priority></presence>"),
            format!("<presence {NS} from='a@@localhost/r'/>"),
            format!("<presence {NS} from='a@localhost/r' type='bogus'/>"),
            "<presence xmlns='jabber:client' from='a@localhost/r'/>".to_string(),
            "<presence".to_string(),
            String::new(),
        ] {
            assert!(parse_presence(&xml).is_err(), "should not parse: {xml}");
        }
    }

    #[test]
    fn control_characters_are_stripped() {
        let e = event(&format!(
            "<presence {NS} from='a@localhost/r'><status>line1\nline2\u{85}\u{9f}</status></presence>"
        ));
        assert_eq!(avail(&e).status.as_deref(), Some("line1\nline2"));
    }

    #[test]
    fn client_names() {
        let caps = |node: &str| -> Option<String> {
            let el: Element = format!(
                "<c xmlns='http://jabber.org/protocol/caps' node='{node}' hash='sha-1' ver='x'/>"
            )
            .parse()
            .ok()?;
            client_name(&[el])
        };
        assert_eq!(
            caps("http://conversations.im").as_deref(),
            Some("Conversations")
        );
        assert_eq!(caps("https://gajim.org").as_deref(), Some("Gajim"));
        assert_eq!(caps("https://dino.im").as_deref(), Some("Dino"));
        assert_eq!(caps("http://psi-im.org").as_deref(), Some("Psi"));
        assert_eq!(
            caps("https://github.com/monal-im/Monal").as_deref(),
            Some("Monal")
        );
        assert_eq!(
            caps("http://slixmpp.com/ver/1.17.0").as_deref(),
            Some("slixmpp")
        );
        assert_eq!(
            caps("https://example.org/mybot/").as_deref(),
            Some("example.org/mybot")
        );
        assert_eq!(caps("").as_deref(), None);
    }

    #[test]
    fn privilege_advertisements() {
        let m: Element = "<message xmlns='jabber:component:accept' to='bridge.localhost' from='localhost'><privilege xmlns='urn:xmpp:privilege:1'><perm type='none' access='message'/><perm type='both' access='roster'/><perm type='managed_entity' access='presence'/></privilege></message>".parse().unwrap();
        let m = Message::try_from(m).unwrap();
        assert_eq!(
            privileges(&m),
            Some(vec![
                ("message".into(), "none".into()),
                ("roster".into(), "both".into()),
                ("presence".into(), "managed_entity".into())
            ])
        );
        let m: Element = "<message xmlns='jabber:component:accept' from='localhost' to='bridge.localhost'><privilege xmlns='urn:xmpp:privilege:2'><perm access='roster' type='both'/><perm access='presence' type='managed_entity'/></privilege></message>".parse().unwrap();
        let m = Message::try_from(m).unwrap();
        assert_eq!(privileges(&m).map(|p| p.len()), Some(2));
        let m: Element =
            "<message xmlns='jabber:component:accept' from='localhost'><body>hi</body></message>"
                .parse()
                .unwrap();
        let m = Message::try_from(m).unwrap();
        assert_eq!(privileges(&m), None);
    }
}

#[cfg(test)]
mod robustness {
    //! Arbitrary input never panics the parse → translate path (the fuzz target in `fuzz/`
    //! goes further with coverage guidance; this runs in every test run).
    use super::*;
    use proptest::prelude::*;

    fn tr() -> Translator {
        Translator::new(&XmppConfig::default())
    }

    fn run(xml: &str) {
        if let Ok(p) = parse_presence(xml) {
            let _ = tr().presence(&p, Utc::now(), Delay::Trusted);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// The translator (stanzas) and the REST parser (`UserJid::parse`) agree on every
        /// user, with or without the root dot, in any case; the resource survives as sent.
        #[test]
        fn translator_and_rest_parser_agree_on_every_jid(
            local in "[a-zA-Z0-9_-]{1,12}",
            labels in proptest::collection::vec("[a-z0-9]{1,8}", 1..4),
            upper in any::<bool>(),
            dot in any::<bool>(),
            resource in "[a-zA-Z0-9][a-zA-Z0-9 ._-]{0,10}[a-zA-Z0-9]",
        ) {
            let mut domain = labels.join(".");
            if upper { domain = domain.to_uppercase(); }
            let dot = if dot { "." } else { "" };
            let cfg = XmppConfig { domains: vec![labels.join(".")], ..XmppConfig::default() };
            let xml = format!("<presence xmlns='jabber:component:accept' from='{local}@{domain}{dot}/{resource}' to='bridge.localhost'/>");
            let rest = UserJid::parse(&format!("{local}@{domain}{dot}")).unwrap();
            prop_assert_eq!(rest.as_str(), format!("{}@{}", local.to_lowercase(), labels.join(".")));
            let p = parse_presence(&xml).unwrap();
            match Translator::new(&cfg).presence(&p, Utc::now(), Delay::Untrusted) {
                Ok(Inbound::Event(ev)) => {
                    prop_assert_eq!(&ev.jid, &rest);
                    prop_assert_eq!(ev.resource, resource);
                }
                other => prop_assert!(false, "{xml}: {other:?}"),
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,400}") {
            run(&s);
        }

        #[test]
        fn arbitrary_fields_never_panic(
            from in "[a-zA-Z0-9@./ -]{0,40}",
            ty in prop::sample::select(vec!["", "unavailable", "error", "probe", "subscribe", "unsubscribed", "bogus"]),
            show in "[a-z]{0,8}",
            prio in "-?[0-9]{0,5}",
            status in "[^<&]{0,60}",
            stamp in "[0-9TZ:.+-]{0,30}",
            node in "[a-z:/.]{0,30}",
        ) {
            let ty = if ty.is_empty() { String::new() } else { format!(" type='{ty}'") };
            let from = from.replace('\'', "");
            let xml = format!(
                "<presence xmlns='jabber:component:accept' from='{from}'{ty}><show>{show}</show><priority>{prio}</priority><status>{status}</status><delay xmlns='urn:xmpp:delay' stamp='{stamp}'/><idle xmlns='urn:xmpp:idle:1' since='{stamp}'/><c xmlns='http://jabber.org/protocol/caps' node='{node}' hash='sha-1' ver='x'/></presence>"
            );
            run(&xml);
        }
    }
}
