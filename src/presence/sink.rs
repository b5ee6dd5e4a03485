//! What the engine emits, for the layers above it.
//!
//! Every change the sequencer makes is handed, in `seq` order and synchronously, to each
//! [`ChangeSink`] it was started with. A sink must never block the sequencer: the store writer
//! pushes onto an in-memory queue; the webhook outbox and the cluster stream will do the same.
//! Subscribers that may fall behind (WebSocket sessions) read the hub instead, at their own pace.
//! `presence` defines this seam so that it knows nothing of who listens.

use super::model::{Change, PresenceEvent, UserPresence};

/// One applied event and what it did.
#[derive(Debug, Clone, Copy)]
pub struct Applied<'a> {
    /// The event as the source gave it.
    pub event: &'a PresenceEvent,
    /// The user's state before (None: never seen).
    pub before: Option<&'a UserPresence>,
    /// The change it produced (the user's state after, its `seq`).
    pub change: &'a Change,
}

/// A consumer of every change, called on the sequencer task. Must return at once.
pub trait ChangeSink: Send + Sync + std::fmt::Debug {
    /// Takes one change. Called in `seq` order, exactly once per change.
    fn accept(&self, applied: Applied<'_>);
}
