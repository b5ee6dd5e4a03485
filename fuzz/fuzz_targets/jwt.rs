//! The token path: any string → a verdict (permissions or a reason), never a panic, for the
//! HS256 configuration with an issuer and an audience.
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run jwt
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use presence_bridge::api::auth::Auth;
use presence_bridge::config::{AuthConfig, Secret};

static AUTH: LazyLock<Option<Auth>> = LazyLock::new(|| {
    Auth::from_config(&AuthConfig {
        jwt_secret: Secret::new("fuzz-secret"),
        issuer: Some("https://idp.example".into()),
        audience: Some("presence-bridge".into()),
        ..AuthConfig::default()
    })
    .ok()
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(auth) = AUTH.as_ref() {
        let _ = auth.verify(token);
    }
});
