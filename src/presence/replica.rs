//! The engine's seam for running as one of several replicas (contract §11).
//!
//! A **leader** engine sequences events as a single bridge does, but a change is made visible
//! (map, counters, hub, sinks) only once the [`Gate`] it leads through says the change is
//! durable elsewhere (the cluster stream): a change the gate refused never happened. A
//! **follower** engine sequences nothing: it applies [`Entry`]s the leader already
//! sequenced, with the leader's `seq`, through the same commit path (so the map, the hub's
//! ring and feed, snapshots and counters behave exactly as on the leader).
//!
//! `presence` knows nothing of NATS: the cluster layer owns the other end of the gate.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::model::{Change, PresenceEvent};

/// One sequenced change as replicas exchange it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The change (its `seq`, the user's state after it).
    pub change: Arc<Change>,
    /// The event behind it, as the leader applied it (its time clamped); `None` for an
    /// erasure (contract §8): the user is removed from the map, not kept offline.
    pub event: Option<Arc<PresenceEvent>>,
}

impl Entry {
    /// This entry erases its user.
    pub fn is_erasure(&self) -> bool {
        self.event.is_none()
    }
}

/// Why a gate refused a batch: the leader lost its lease, or the stream would not take it
/// before the lease ran out. The leader's engine then drops every change not yet confirmed
/// and stops sequencing (it becomes a follower).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// One batch handed to the gate, and where to say whether it is durable.
pub type GateRequest = (Arc<[Entry]>, oneshot::Sender<Result<(), Refused>>);

/// The leader's way out: batches go in, in `seq` order; each is answered in the same order.
#[derive(Debug, Clone)]
pub struct Gate {
    tx: mpsc::UnboundedSender<GateRequest>,
}

impl Gate {
    /// A gate and the receiving end its owner (the cluster publisher) answers.
    pub fn channel() -> (Gate, mpsc::UnboundedReceiver<GateRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Gate { tx }, rx)
    }

    /// Hands a batch over; the receiver resolves when the gate has answered for it (an
    /// answer dropped unsent counts as a refusal).
    pub(crate) fn submit(&self, batch: Arc<[Entry]>) -> oneshot::Receiver<Result<(), Refused>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, reply))) = self.tx.send((batch, tx)) {
            let _ = reply.send(Err(Refused("the cluster publisher has stopped".into())));
        }
        rx
    }
}

/// A follower got entries that do not continue its sequence (it must reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replica gap: expected seq {expected}, got {got}")]
pub struct Gap {
    /// The seq the follower needed next.
    pub expected: u64,
    /// The first seq it was given past the ones it already had.
    pub got: u64,
}

/// The engine's current role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A single bridge: changes are visible at once.
    Single,
    /// Sequences, and shows a change once the gate confirmed it.
    Leader,
    /// Applies the leader's entries; refuses events.
    Follower,
}
