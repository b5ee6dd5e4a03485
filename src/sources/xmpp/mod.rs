//! The XMPP source: the XEP-0114 component supervisor and the stanza translator.

pub mod component;
pub mod translate;

pub use component::{
    ComponentHandle, ConnectionStatus, FatalError, SpawnOptions, XmppMetrics, spawn,
};
pub use translate::{Delay, Dropped, Inbound, Translator};
