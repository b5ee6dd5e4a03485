//! JWT verification → a permissions value; scoped extractors that handlers must take.
//!
//! The algorithm comes from the configuration (HS256 for `auth.jwt_secret`; RS256 or ES256
//! from the key type of `auth.jwt_public_key_file`; for a token with a `kid`, the type of that
//! key in the `auth.jwks_url` document), never from the token's header alone, and `none` is
//! never accepted. `exp` is required; `nbf` is enforced; `iss`/`aud` (a string or an array in
//! the token) are checked when configured.

/// A set probed on hot paths (per change per subscriber): seeded foldhash, not SipHash.
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::config::{AuthConfig, ConfigError};
use crate::presence::UserJid;

/// Clock skew tolerated on `exp`/`nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Verified tokens remembered (beyond it the cache starts over): a dashboard or a service
/// sends the same token many times, and verifying it is most of a last-seen request's cost.
const CACHE_TOKENS: usize = 10_000;

/// Token claims (contract §4).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: who the token is for.
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Space-separated scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The domains this token may see (absent = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<String>>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Not before (seconds since the epoch), enforced with the same leeway as `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Audience: one string or an array of them (RFC 7519 §4.1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: identity providers issue both forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "x"`.
    One(String),
    /// `"aud": ["x", "y"]`.
    Many(Vec<String>),
}

/// A scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `presence:read`.
    PresenceRead,
    /// `history:read`.
    HistoryRead,
    /// `admin` (implies every other scope).
    Admin,
}

impl Scope {
    fn word(self) -> &'static str {
        match self {
            Scope::PresenceRead => "presence:read",
            Scope::HistoryRead => "history:read",
            Scope::Admin => "admin",
        }
    }
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Permissions {
    /// The token's subject.
    pub sub: String,
    scopes: Vec<Scope>,
    /// Lower-cased domains the token is limited to (`None` = all).
    domains: Option<Arc<HashSet<String>>>,
}

impl Permissions {
    /// True when the token carries `scope` (or `admin`).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// A token's permissions without a token (unit tests).
    #[cfg(test)]
    pub(crate) fn for_test(scopes: Vec<Scope>, domains: Option<&[&str]>) -> Permissions {
        Permissions {
            sub: "test".into(),
            scopes,
            domains: domains.map(|d| Arc::new(d.iter().map(|x| x.to_string()).collect())),
        }
    }

    /// True when the token may see this user.
    pub fn can_see(&self, jid: &UserJid) -> bool {
        self.domains
            .as_ref()
            .is_none_or(|d| d.contains(jid.domain()))
    }

    /// True when the token may see this domain.
    pub fn can_see_domain(&self, domain: &str) -> bool {
        self.domains
            .as_ref()
            .is_none_or(|d| d.contains(&domain.to_lowercase()))
    }

    /// The domains the token is limited to (`None` = all), sorted.
    pub fn domain_list(&self) -> Option<Vec<String>> {
        self.domains.as_ref().map(|d| {
            let mut v: Vec<String> = d.iter().cloned().collect();
            v.sort();
            v
        })
    }

    /// True when the token is limited to some domains.
    pub fn is_restricted(&self) -> bool {
        self.domains.is_some()
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("a bearer token is required")]
    Missing,
    /// The token does not verify (bad signature, wrong algorithm, expired, malformed...).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// No verification key is configured.
    #[error(
        "authentication is not configured on this bridge (auth.jwt_secret or auth.jwt_public_key_file)"
    )]
    NotConfigured,
}

/// The verifier, built once from `[auth]`.
#[derive(Clone)]
pub struct Auth {
    key: Option<DecodingKey>,
    validation: Validation,
    jwks: Option<Arc<super::jwks::Jwks>>,
    /// Tokens that verified, with what they grant, until their `exp` (only successes; a
    /// token verified under a JWKS key set that has since changed is verified again).
    /// Keyed by the whole token: hashed with seeded foldhash, not SipHash (every request).
    verified: dashmap::DashMap<Box<str>, Verified, foldhash::fast::RandomState>,
}

#[derive(Debug, Clone)]
struct Verified {
    permissions: Permissions,
    /// `exp` (seconds since the epoch).
    exp: u64,
    /// The JWKS generation it was verified under (0 without JWKS).
    generation: u64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("configured", &self.key.is_some())
            .field("algorithms", &self.validation.algorithms)
            .field("jwks", &self.jwks.is_some())
            .finish()
    }
}

impl Auth {
    /// From the config, with the JWKS metrics in a private registry (tests, tools).
    pub fn from_config(cfg: &AuthConfig) -> Result<Auth, ConfigError> {
        Self::from_config_in(cfg, &prometheus::Registry::new())
    }

    /// The JWKS keys, when `auth.jwks_url` is set (the app runs its refresh loop).
    pub fn jwks(&self) -> Option<&Arc<super::jwks::Jwks>> {
        self.jwks.as_ref()
    }

    /// From the config, registering the JWKS metrics in `registry`; a key file that cannot be
    /// read or parsed names its key.
    pub fn from_config_in(
        cfg: &AuthConfig,
        registry: &prometheus::Registry,
    ) -> Result<Auth, ConfigError> {
        let (key, alg) = if let Some(path) = &cfg.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|e| ConfigError::Invalid {
                key: "auth.jwt_public_key_file".into(),
                reason: format!("cannot read {}: {}", path.display(), e.kind()),
            })?;
            if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Some(k), Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Some(k), Algorithm::ES256)
            } else {
                return Err(ConfigError::Invalid {
                    key: "auth.jwt_public_key_file".into(),
                    reason: "not an RSA or EC (P-256) public key in PEM form".into(),
                });
            }
        } else if !cfg.jwt_secret.is_empty() {
            (
                Some(DecodingKey::from_secret(cfg.jwt_secret.expose().as_bytes())),
                Algorithm::HS256,
            )
        } else {
            (None, Algorithm::HS256)
        };
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // A configured issuer or audience must be in the token, not merely not contradicted.
        let mut required = vec!["exp", "sub"];
        if cfg.issuer.is_some() {
            required.push("iss");
        }
        if cfg.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match &cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let jwks = cfg
            .jwks_url
            .as_ref()
            .map(|url| {
                super::jwks::Jwks::new(url, cfg.jwks_refresh_secs, registry)
                    .map(Arc::new)
                    .map_err(|reason| ConfigError::Invalid {
                        key: "auth.jwks_url".into(),
                        reason,
                    })
            })
            .transpose()?;
        Ok(Auth {
            key,
            validation,
            jwks,
            verified: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
        })
    }

    /// True when tokens can be verified at all.
    pub fn configured(&self) -> bool {
        self.key.is_some() || self.jwks.is_some()
    }

    /// Verifies a token: one with a `kid` against the JWKS keys when `auth.jwks_url` is set
    /// (refreshing them once when the `kid` is unknown, at most every 10 s), any other with
    /// the configured secret or public key.
    pub async fn verify_async(&self, token: &str) -> Result<Permissions, AuthError> {
        let now = Utc::now().timestamp().max(0) as u64;
        if let Some(p) = self.remembered(token, now) {
            return Ok(p);
        }
        let generation = self.jwks.as_ref().map_or(0, |j| j.generation());
        let p = self.verify_uncached(token).await?;
        self.remember(token, &p, generation);
        Ok(p)
    }

    /// A token verified before, still before its `exp` and under the same JWKS key set.
    fn remembered(&self, token: &str, now: u64) -> Option<Permissions> {
        let v = self.verified.get(token)?;
        let generation = self.jwks.as_ref().map_or(0, |j| j.generation());
        // Expiry is checked as a full verification would, with no leeway added: stricter.
        if now < v.exp && v.generation == generation {
            return Some(v.permissions.clone());
        }
        drop(v);
        self.verified.remove(token);
        None
    }

    fn remember(&self, token: &str, p: &Permissions, generation: u64) {
        // `exp` is required and was just validated; read it without verifying again.
        let Some(exp) = token_exp(token) else {
            return;
        };
        if self.verified.len() >= CACHE_TOKENS {
            self.verified.clear();
        }
        self.verified.insert(
            token.into(),
            Verified {
                permissions: p.clone(),
                exp,
                generation,
            },
        );
    }

    async fn verify_uncached(&self, token: &str) -> Result<Permissions, AuthError> {
        if let Some(jwks) = &self.jwks
            && let Ok(header) = jsonwebtoken::decode_header(token)
            && let Some(kid) = header.kid.as_deref()
        {
            let key = match jwks.key(kid) {
                Some(k) => k,
                None => {
                    jwks.refresh_for_unknown_kid().await;
                    jwks.key(kid)
                        .ok_or_else(|| AuthError::Invalid("unknown key id".into()))?
                }
            };
            let mut v = self.validation.clone();
            v.algorithms = vec![key.algorithm];
            return self.permissions(token, &key.key, &v);
        }
        self.verify(token)
    }

    /// Verifies a token with the configured secret or public key (no JWKS lookup).
    pub fn verify(&self, token: &str) -> Result<Permissions, AuthError> {
        let Some(key) = self.key.as_ref() else {
            return Err(if self.jwks.is_some() {
                AuthError::Invalid("no key id (kid) in the token header".into())
            } else {
                AuthError::NotConfigured
            });
        };
        self.permissions(token, key, &self.validation)
    }

    fn permissions(
        &self,
        token: &str,
        key: &DecodingKey,
        validation: &Validation,
    ) -> Result<Permissions, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let c = data.claims;
        if c.sub.trim().is_empty() {
            // Connection caps and audit lines are per subject: a blank one would be shared.
            return Err(AuthError::Invalid("empty sub".into()));
        }
        let scopes = c
            .scope
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|s| match s {
                "presence:read" => Some(Scope::PresenceRead),
                "history:read" => Some(Scope::HistoryRead),
                "admin" => Some(Scope::Admin),
                _ => None,
            })
            .collect();
        let domains = c
            .domains
            .map(|d| Arc::new(d.into_iter().map(|x| x.to_lowercase()).collect()));
        Ok(Permissions {
            sub: c.sub,
            scopes,
            domains,
        })
    }
}

/// The `exp` claim of a token already verified (the payload, base64url-decoded).
fn token_exp(token: &str) -> Option<u64> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct Exp {
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Exp>(&bytes).ok().map(|e| e.exp)
}

/// A short reason without echoing the token.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm => "algorithm not accepted".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        K::ImmatureSignature => "not valid yet".into(),
        _ => "malformed".into(),
    }
}

/// Mints an HS256 token (the `token` subcommand, tests, the demo).
pub fn mint(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Claims for `sub` with `scope`, `domains`, valid for `ttl_secs` from now.
pub fn claims(
    sub: &str,
    scope: &str,
    domains: Option<Vec<String>>,
    ttl_secs: u64,
    cfg: &AuthConfig,
) -> Claims {
    let now = Utc::now().timestamp().max(0) as u64;
    Claims {
        sub: sub.to_owned(),
        exp: now.saturating_add(ttl_secs),
        iat: Some(now),
        scope: Some(scope.to_owned()),
        domains,
        iss: cfg.issuer.clone(),
        nbf: None,
        aud: cfg.audience.clone().map(Audience::One),
    }
}

/// The bearer token of a request: `Authorization: Bearer …`, or `?token=` when `allow_query`.
pub fn bearer(req: &HttpRequest, allow_query: bool) -> Option<String> {
    // The scheme is case-insensitive (RFC 9110 §11.1).
    if let Some(h) = req.headers().get(actix_web::http::header::AUTHORIZATION)
        && let Ok(v) = h.to_str()
        && let Some((scheme, t)) = v.trim_start().split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(t.trim().to_owned());
    }
    if allow_query {
        return web::Query::<TokenQuery>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.into_inner().token);
    }
    None
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Authenticates a request: 401 without a valid token.
pub async fn authenticate(req: &HttpRequest, allow_query: bool) -> Result<Permissions, ApiError> {
    let auth = req
        .app_data::<web::Data<Auth>>()
        .ok_or_else(|| ApiError::internal("auth not configured"))?
        .clone();
    let token = bearer(req, allow_query).ok_or(ApiError::unauthorized(AuthError::Missing))?;
    auth.verify_async(&token)
        .await
        .map_err(ApiError::unauthorized)
}

/// Requires `scope`: 403 without it.
pub fn require(p: Permissions, scope: Scope) -> Result<Permissions, ApiError> {
    if p.has(scope) {
        Ok(p)
    } else {
        Err(ApiError::forbidden(format!(
            "this token lacks the {} scope",
            scope.word()
        )))
    }
}

macro_rules! scoped_extractor {
    ($name:ident, $scope:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name(pub Permissions);

        impl FromRequest for $name {
            type Error = ApiError;
            type Future = futures::future::LocalBoxFuture<'static, Result<Self, ApiError>>;
            fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
                let req = req.clone();
                Box::pin(async move {
                    authenticate(&req, false)
                        .await
                        .and_then(|p| require(p, $scope))
                        .map($name)
                })
            }
        }
    };
}

scoped_extractor!(
    PresenceRead,
    Scope::PresenceRead,
    "A request whose token has `presence:read` (or `admin`)."
);
scoped_extractor!(
    HistoryRead,
    Scope::HistoryRead,
    "A request whose token has `history:read` (or `admin`)."
);
scoped_extractor!(
    AdminScope,
    Scope::Admin,
    "A request whose token has `admin`."
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn cfg() -> AuthConfig {
        AuthConfig {
            jwt_secret: Secret::new("k"),
            ..AuthConfig::default()
        }
    }

    #[tokio::test]
    async fn verified_tokens_are_remembered_until_exp_and_only_successes() {
        let a = Auth::from_config(&cfg()).unwrap();
        let t = mint("k", &claims("ops", "presence:read", None, 60, &cfg())).unwrap();
        let exp = token_exp(&t).unwrap();
        let now = Utc::now().timestamp() as u64;
        assert!(
            a.remembered(&t, now).is_none(),
            "nothing before the first verification"
        );
        let p = a.verify_async(&t).await.unwrap();
        let hit = a.remembered(&t, now).expect("remembered");
        assert_eq!(hit.sub, p.sub);
        assert!(hit.has(Scope::PresenceRead));
        // At its exp it is forgotten (and verified again, which then decides).
        assert!(a.remembered(&t, exp).is_none());
        assert!(a.remembered(&t, now).is_none(), "gone once expired");
        // A token that fails is not remembered, and fails every time.
        let bad = mint("other", &claims("x", "admin", None, 60, &cfg())).unwrap();
        assert!(a.verify_async(&bad).await.is_err());
        assert!(a.remembered(&bad, now).is_none());
        assert!(a.verify_async(&bad).await.is_err());
        // A tampered token is another key: it is verified (and refused).
        a.verify_async(&t).await.unwrap();
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = mint("k", &claims("ops", "admin", None, 60, &cfg()))
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap()
            .to_owned();
        let forged = parts.join(".");
        assert!(matches!(
            a.verify_async(&forged).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let a = Auth::from_config(&cfg()).unwrap();
        for i in 0..CACHE_TOKENS + 10 {
            let t = mint(
                "k",
                &claims(&format!("s{i}"), "presence:read", None, 60, &cfg()),
            )
            .unwrap();
            a.verify_async(&t).await.unwrap();
        }
        assert!(a.verified.len() <= CACHE_TOKENS);
        assert!(!a.verified.is_empty());
    }

    #[test]
    fn scopes_domains_and_expiry() {
        let a = Auth::from_config(&cfg()).unwrap();
        let t = mint(
            "k",
            &claims(
                "ops",
                "presence:read",
                Some(vec!["Example.com".into()]),
                60,
                &cfg(),
            ),
        )
        .unwrap_or_default();
        let p = a.verify(&t).unwrap();
        assert!(p.has(Scope::PresenceRead) && !p.has(Scope::HistoryRead));
        assert!(p.can_see(&UserJid::parse("a@example.com").unwrap()));
        assert!(!p.can_see(&UserJid::parse("a@other.org").unwrap()));
        let admin = a
            .verify(&mint("k", &claims("root", "admin", None, 60, &cfg())).unwrap_or_default())
            .unwrap();
        assert!(admin.has(Scope::HistoryRead) && !admin.is_restricted());

        let mut old = claims("x", "admin", None, 0, &cfg());
        old.exp -= 3600;
        assert_eq!(
            a.verify(&mint("k", &old).unwrap_or_default()).err(),
            Some(AuthError::Invalid("expired".into()))
        );
        assert_eq!(
            a.verify(&mint("other", &claims("x", "admin", None, 60, &cfg())).unwrap_or_default())
                .err(),
            Some(AuthError::Invalid("bad signature".into()))
        );
        assert!(a.verify("garbage").is_err());
    }

    #[test]
    fn alg_none_and_unconfigured_are_refused() {
        let a = Auth::from_config(&cfg()).unwrap();
        // {"alg":"none","typ":"JWT"} . {"sub":"x","exp":9999999999,"scope":"admin"} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5LCJzY29wZSI6ImFkbWluIn0.";
        assert!(a.verify(none).is_err());
        let unconfigured = Auth::from_config(&AuthConfig::default()).unwrap();
        assert_eq!(
            unconfigured.verify("x").err(),
            Some(AuthError::NotConfigured)
        );
    }
}
