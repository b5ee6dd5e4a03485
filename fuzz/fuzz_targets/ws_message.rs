//! The WebSocket client-message parser: any text → a message or an error frame's reason.
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run ws_message
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence_bridge::api::ws::parse_client_message;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_client_message(text);
    }
});
