//! Ingest sources: each turns its input into [`crate::presence::PresenceEvent`]s for the engine,
//! and knows nothing of the store or the API.
//!
//! - [`xmpp`]: the XEP-0114 component (supervisor + translator) — the primary source.
//! - [`amqp`]: MongooseIM's event pusher (`mod_event_pusher_rabbit`) over AMQP (contract §9).
//! - [`reconcile`]: compares the map with the server's own session list (contract §10).
//! - [`simulator`]: `demo`'s simulated population, which builds real `<presence/>` stanzas and
//!   sends them through the XMPP translator, so the demo exercises the same rules.
//!
//! A new source is a new module here, started by the composition root (`app`).

pub mod amqp;
pub mod reconcile;
pub mod simulator;
pub mod xmpp;

use crate::presence::UserJid;

/// An HTTP client for talking to an XMPP server's admin APIs (reconciler, provisioning).
/// reqwest is built without a crypto provider of its own: it uses the one rustls already has
/// here for the HTTPS listener (ring); installing it twice is harmless.
pub fn http_client(timeout: std::time::Duration) -> Result<reqwest::Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("presence-bridge/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Splits a JID as a server reports it (`alice@localhost/phone`) into the normalised user and
/// the resource (`None` for a bare JID). `None` for anything that is not a user's JID.
pub fn parse_full_jid(s: &str) -> Option<(UserJid, Option<String>)> {
    let jid = jid::Jid::new(s.trim()).ok()?;
    let user = UserJid::from_jid(&jid)?;
    let resource = jid
        .resource()
        .map(|r| r.as_str().to_owned())
        .filter(|r| !r.is_empty());
    Some((user, resource))
}
