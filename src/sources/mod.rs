//! Ingest sources: each turns its input into [`crate::presence::PresenceEvent`]s for the engine,
//! and knows nothing of the store or the API.
//!
//! - [`xmpp`]: the XEP-0114 component (supervisor + translator) — the primary source.
//! - [`simulator`]: `demo`'s simulated population, which builds real `<presence/>` stanzas and
//!   sends them through the XMPP translator, so the demo exercises the same rules.
//!
//! A new source (the AMQP consumer, the reconciler) is a new module here, started by
//! the composition root (`app`).

pub mod simulator;
pub mod xmpp;
