//! The stanza path: bytes → XML → presence → engine event (with and without trusted delay
//! stamps). Must never panic.
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run translate      (see fuzz/README.md)
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence_bridge::config::XmppConfig;
use presence_bridge::sources::xmpp::translate::{Delay, Translator, parse_presence};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = parse_presence(text) {
        let t = Translator::new(&XmppConfig::default());
        let _ = t.presence(&p, chrono::Utc::now(), Delay::Trusted);
        let _ = t.presence(&p, chrono::Utc::now(), Delay::Untrusted);
    }
});
