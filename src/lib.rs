//! presence-bridge: mirrors XMPP presence into a live presence map, history and dashboards.
//!
//! # Layout
//!
//! Dependencies point one way: `config` ← `presence` ← {`sources`, `store`, `webhooks`} ←
//! `cluster` ← `api` ← `app` ← `cli` (and `telemetry`, `shutdown` are utilities at the bottom). A module never imports
//! one to its right. `docs/architecture.md` has the data flow and the task tree.
//!
//! - [`config`]: layered configuration (defaults → TOML → `PRESENCE_BRIDGE__…` env), secrets
//!   from `*_file` keys, validation that names the bad key, and masking of secrets wherever
//!   the config is printed or logged.
//! - [`presence`]: the engine. One sequencer task ([`presence::engine`]) applies events in
//!   arrival order through the pure rules of [`presence::aggregate`], stamps every resulting
//!   change with a gap-free `seq`, and publishes it to a concurrent map (O(1) reads by JID),
//!   online counters, the change [`presence::hub`] (a ring of recent changes for resume plus a
//!   broadcast feed with lag detection), and every [`presence::ChangeSink`] it was started
//!   with. It knows nothing of who feeds it or who listens.
//! - [`sources`]: what feeds the engine. [`sources::xmpp`] is the XEP-0114 component: a
//!   supervisor task that connects, handshakes, reads stanzas, keeps the stream alive,
//!   reconnects with capped backoff and jitter, and resyncs by probing known users after
//!   every (re)connect, with a pure translator from stanza to event.
//!   [`sources::amqp`] consumes MongooseIM's event pusher (contract §9);
//!   [`sources::reconcile`] compares the map with the server's own session list (§10).
//!   [`sources::simulator`] is `demo`'s population, sent through the same translator.
//! - [`store`]: persistence. Its sink (a never-blocking queue the sequencer pushes to) feeds
//!   the writer, which batches into Postgres (COPY for events, sessions opened/closed,
//!   last-seen upserted once per user per batch) and spools batches to disk (checksummed,
//!   fsync'd) while Postgres is down or slow, replaying them in order later.
//!   [`store::reads`] returns rows (last-seen, history pages, known users at start-up).
//! - [`webhooks`]: contract §7 — a sink that turns changes (and the alerts it detects:
//!   flapping users, login storms) into messages for the configured endpoints, a durable
//!   outbox (Postgres, or memory), and one delivery task per endpoint (Standard Webhooks
//!   signatures, ordered, retried with backoff and jitter).
//! - [`cluster`]: contract §11 — replicas on NATS JetStream. The leader's engine shows a
//!   change only once the stream confirmed it ([`presence::Gate`]); followers apply the
//!   stream through the same commit path; the lease is a KV key with a TTL, fencing is the
//!   stream's expected-last-sequence check; snapshots for late replicas in an object store.
//! - [`api`]: one actix-web server: REST (last-seen, presence, history, stats), the WebSocket
//!   feed (snapshot + batched diffs, resume, filters, lag → resync), JWT auth turned into a
//!   permissions value that scoped handlers must take, rate limits, `/metrics` (rendering the
//!   registry every layer records into), the dashboard's embedded assets, and an OpenAPI
//!   document generated from the handlers. Response shapes live here ([`api::lookup`]).
//! - [`app`]: the composition root. [`app::AppBuilder`] is the only place that assembles the
//!   service — for `run`, `demo` and every integration test — and [`app::App`] owns every task
//!   and stops them in order under one deadline.
//! - [`provision`]: `presence-bridge provision` — puts the component in every user's roster
//!   through the server's admin API.
//! - [`cli`]: the `presence-bridge` subcommands: argument parsing, config loading, and
//!   mapping a typed error to the exit codes of contract §1.
//! - [`telemetry`]: tracing setup and the metric registration helpers.
//! - [`shutdown`]: waiting for SIGTERM/SIGINT.

pub mod api;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod presence;
pub mod provision;
pub mod shutdown;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod webhooks;
