//! An identity provider's signing keys (`auth.jwks_url`, contract §8): a JWKS document fetched
//! at start, every `auth.jwks_refresh_secs`, and when a token names an unknown `kid` (at most
//! once per [`UNKNOWN_KID_EVERY`]). Keys are picked by `kid`; each key's algorithm comes from
//! its own type (RSA → RS256, EC P-256 → ES256, OKP Ed25519 → EdDSA; a JWK `alg` other than
//! that is refused), never from the token. A failed fetch keeps the last good keys, and is
//! visible in `/readyz` and the metrics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus::{IntCounterVec, IntGauge, Registry};
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// An unknown `kid` triggers at most one refresh in this time.
pub const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_BYTES: usize = 1 << 20;
/// One fetch may take this long.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One usable key.
#[derive(Clone)]
pub struct Key {
    /// The verification key.
    pub key: DecodingKey,
    /// The one algorithm it verifies.
    pub algorithm: Algorithm,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// What `/readyz` shows.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct JwksStatus {
    /// `ok` (the last fetch worked), `stale` (it failed: the last good keys are used) or
    /// `unavailable` (no key was ever fetched).
    pub state: &'static str,
    /// Keys in use.
    pub keys: usize,
    /// When keys were last fetched.
    #[serde(with = "crate::presence::model::rfc3339_millis::option")]
    pub fetched_at: Option<DateTime<Utc>>,
    /// Why the last fetch failed (when it did).
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    fetched_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

/// The key set and its refresher.
pub struct Jwks {
    url: String,
    every: Duration,
    client: reqwest::Client,
    state: RwLock<State>,
    /// Serialises fetches; holds when the last unknown-kid refresh started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    fetches: IntCounterVec,
    keys_gauge: IntGauge,
    /// Successful fetches so far: tokens verified under an older key set are verified again.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &crate::config::mask_url_password(&self.url))
            .field("keys", &self.status().keys)
            .finish()
    }
}

impl Jwks {
    /// A key set for `url` (nothing is fetched yet: see [`Jwks::run`]).
    pub fn new(url: &str, every: Duration, registry: &Registry) -> Result<Jwks, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            // A key document that moves elsewhere is an error, not a hop to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("presence-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Jwks {
            url: url.to_owned(),
            every,
            client,
            state: RwLock::default(),
            fetching: tokio::sync::Mutex::new(None),
            fetches: telemetry::counter_vec(
                registry,
                "presence_bridge_jwks_fetches_total",
                "JWKS fetches, by result (ok, error)",
                &["result"],
            ),
            keys_gauge: telemetry::gauge(
                registry,
                "presence_bridge_jwks_keys",
                "Signing keys in use from auth.jwks_url",
            ),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Changes whenever a fetch replaces the key set.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key with this `kid`.
    pub fn key(&self, kid: &str) -> Option<Key> {
        self.read().keys.get(kid).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// For `/readyz`.
    pub fn status(&self) -> JwksStatus {
        let s = self.read();
        JwksStatus {
            state: match (s.keys.is_empty() && s.fetched_at.is_none(), &s.last_error) {
                (true, _) => "unavailable",
                (false, Some(_)) => "stale",
                (false, None) => "ok",
            },
            keys: s.keys.len(),
            fetched_at: s.fetched_at,
            last_error: s.last_error.clone(),
        }
    }

    /// Fetches the document now; on failure keeps the keys it has. Returns the keys in use.
    pub async fn refresh(&self) -> Result<usize, String> {
        let result = self.fetch().await;
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(keys) => {
                self.fetches.with_label_values(&["ok"]).inc();
                s.keys = keys;
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                s.fetched_at = Some(Utc::now());
                s.last_error = None;
                self.keys_gauge.set(s.keys.len() as i64);
                Ok(s.keys.len())
            }
            Err(e) => {
                self.fetches.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, keys_kept = s.keys.len(), "auth: JWKS fetch failed; keeping the last good keys");
                s.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// A token named a `kid` we do not have: refresh, unless one started less than
    /// [`UNKNOWN_KID_EVERY`] ago (a flood of made-up `kid`s costs one fetch per 10 s).
    /// Concurrent callers wait for the same fetch.
    pub async fn refresh_for_unknown_kid(&self) {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.refresh().await;
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, String> {
        let masked = crate::config::mask_url_password(&self.url);
        let mut resp = self
            .client
            .get(&self.url)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("{masked}: {}", without_url(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("{masked}: HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("{masked}: {}", without_url(&e)))?
        {
            if body.len() + chunk.len() > MAX_BYTES {
                return Err(format!("{masked}: document larger than {MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| format!("{masked}: not a JWKS document: {e}"))?;
        let keys = parse(&set);
        if keys.is_empty() {
            return Err(format!(
                "{masked}: no usable signing key (RS256, ES256 or EdDSA with a kid)"
            ));
        }
        Ok(keys)
    }

    /// Fetches at start, then every `auth.jwks_refresh_secs` (sooner, every 10 s, while no key
    /// was ever fetched), until cancelled.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let ok = self.refresh().await.is_ok();
            let wait = if ok || self.status().keys > 0 {
                self.every
            } else {
                UNKNOWN_KID_EVERY.min(self.every)
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A reqwest error without the URL (which may carry credentials; the caller names it masked).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    if let Some(src) = std::error::Error::source(e) {
        text.push_str(&format!(": {src}"));
    }
    text
}

/// The usable keys of a set: signing keys with a `kid` of a supported type, whose `alg` (when
/// given) matches their type. Others are skipped (symmetric keys above all: a public document
/// must never hold a shared secret).
pub fn parse(set: &JwkSet) -> HashMap<String, Key> {
    let mut out = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            _ => continue,
        };
        let declared = jwk.common.key_algorithm;
        let matches = match declared {
            None => true,
            Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
            Some(KeyAlgorithm::EdDSA) => algorithm == Algorithm::EdDSA,
            Some(_) => false,
        };
        if !matches {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        out.insert(kid, Key { key, algorithm });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_supported_signing_keys_only() {
        let doc = serde_json::json!({"keys": [
            {"kty":"RSA","kid":"r","alg":"RS256","n":"sXch","e":"AQAB"},
            {"kty":"RSA","kid":"r-wrong-alg","alg":"HS256","n":"sXch","e":"AQAB"},
            {"kty":"RSA","n":"sXch","e":"AQAB"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"sXch","e":"AQAB"},
            {"kty":"oct","kid":"shared","k":"c2VjcmV0"},
            {"kty":"EC","kid":"p384","crv":"P-384","x":"AA","y":"AA"},
        ]});
        let set: JwkSet = serde_json::from_value(doc).unwrap();
        let keys = parse(&set);
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["r"]);
        assert_eq!(keys["r"].algorithm, Algorithm::RS256);
    }
}
