//! The XMPP side: the XEP-0114 component supervisor and the stanza translator.

pub mod component;
pub mod translate;

pub use component::{ComponentHandle, ConnectionStatus, Counters, FatalError, spawn};
pub use translate::{Dropped, Inbound, Translator};
