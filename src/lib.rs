//! presence-bridge: mirrors XMPP presence into a live presence map, history and dashboards.
//!
//! # Layout
//!
//! The folders follow the data flow: `xmpp` → `presence` → (`store`, `api`, later issues).
//!
//! - [`config`]: layered configuration (defaults → TOML → `PRESENCE_BRIDGE__…` env), secrets
//!   from `*_file` keys, validation that names the bad key, and masking of secrets wherever
//!   the config is printed or logged.
//! - [`xmpp`]: the XEP-0114 component. [`xmpp::component`] is a supervisor task that connects,
//!   handshakes, reads stanzas, keeps the stream alive, reconnects with capped backoff and
//!   jitter, and resyncs by probing known users after every (re)connect.
//!   [`xmpp::translate`] turns a presence stanza into an engine event or a roster-handshake
//!   action, as a pure function.
//! - [`presence`]: the engine. One sequencer task ([`presence::engine`]) applies events in
//!   arrival order through the pure rules of [`presence::aggregate`], stamps every resulting
//!   change with a gap-free `seq`, and publishes it to a concurrent map (O(1) reads by JID),
//!   online counters, and the change [`presence::hub`] (a ring of recent changes for resume plus
//!   a broadcast feed with lag detection). Nothing downstream can slow the sequencer.
//! - [`store`]: persistence. The sequencer pushes one record per resource-level change into a
//!   never-blocking queue; the writer batches them into Postgres (COPY for events, sessions
//!   opened/closed, last-seen upserted once per user per batch) and spools batches to disk
//!   (checksummed, fsync'd) while Postgres is down or slow, replaying them in order later.
//!   [`store::reads`] answers last-seen and history and loads known users at start-up.
//! - [`api`]: one actix-web server: REST (last-seen, presence, history, stats), the WebSocket
//!   feed (snapshot + batched diffs, resume, filters, lag → resync), JWT auth turned into a
//!   permissions value that scoped handlers must take, rate limits, Prometheus metrics and an
//!   OpenAPI document generated from the handlers.
//! - [`demo`]: `presence-bridge demo`: a simulator that builds real presence stanzas and feeds
//!   them through the translator into the engine, with the API and the dashboard (embedded
//!   static assets served at `/`) and no XMPP server or database.
//! - [`telemetry`]: tracing setup (text or JSON).
//! - [`shutdown`]: SIGTERM/SIGINT → one `CancellationToken` for every task.
//! - [`cli`]: the `presence-bridge` subcommands.

pub mod api;
pub mod cli;
pub mod config;
pub mod demo;
pub mod presence;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod xmpp;
