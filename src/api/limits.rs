//! Rate limits on `/api/v1`: per token (per IP for a request without one) and per IP, with
//! governor's keyed GCRA limiters, checked by one middleware.
//!
//! A rejection must cost less than serving. It is one map lookup per limiter and a small JSON
//! answer whose `Retry-After` is computed with the limiter's own clock: building a clock per
//! answer (what actix-governor does) reads CPUID, a hypervisor trap on virtual machines, and
//! made a 429 three times as expensive as a served request (docs/benchmarks.md).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use governor::clock::{Clock, QuantaClock, QuantaInstant};
use governor::{DefaultKeyedRateLimiter, NotUntil, Quota};

use super::auth;
use super::error::ErrorBody;
use crate::config::HttpConfig;

type Limiter<K> = Arc<DefaultKeyedRateLimiter<K>>;

/// The limiters of one server (shared by its workers).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Keyed by a hash of the bearer token, or by the peer IP without one.
    per_token: Option<Limiter<TokenKey>>,
    /// Keyed by the peer IP.
    per_ip: Option<Limiter<IpAddr>>,
    /// Hashes tokens into keys with a per-process random key (the token itself is not kept).
    hasher: std::collections::hash_map::RandomState,
}

/// A per-token limiter key: the token's hash, or the IP of a request without a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TokenKey {
    Token(u64),
    Ip(IpAddr),
}

/// `rate` requests a second with `burst` at once; `None` when `rate` is 0 (disabled).
fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    (rate > 0).then(|| {
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
    })
}

impl Limits {
    /// The limiters `[http]` asks for (the per-IP burst is twice the per-token one).
    pub fn new(http: &HttpConfig) -> Limits {
        Limits {
            per_token: quota(http.rate_limit_per_token, http.rate_limit_burst)
                .map(|q| Arc::new(DefaultKeyedRateLimiter::keyed(q))),
            per_ip: quota(
                http.rate_limit_per_ip,
                http.rate_limit_burst.saturating_mul(2),
            )
            .map(|q| Arc::new(DefaultKeyedRateLimiter::keyed(q))),
            hasher: Default::default(),
        }
    }

    /// Forgets the keys whose quota has fully replenished; returns the live keys per limiter.
    pub fn prune(&self) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        if let Some(l) = &self.per_token {
            l.retain_recent();
            l.shrink_to_fit();
            out.push(("token", l.len()));
        }
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
            out.push(("ip", l.len()));
        }
        out
    }

    /// True when no limiter is configured.
    pub fn is_empty(&self) -> bool {
        self.per_token.is_none() && self.per_ip.is_none()
    }
}

/// The middleware: the per-IP limit first, then the per-token one; a rejected request never
/// reaches the handler (nor token verification).
pub async fn enforce(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if let Some(limits) = req.app_data::<web::Data<Limits>>() {
        let ip = req.peer_addr().map(|a| a.ip());
        if let (Some(l), Some(ip)) = (&limits.per_ip, ip)
            && let Err(no) = l.check_key(&ip)
        {
            let wait = wait_secs(&no, l.clock());
            return Ok(req.into_response(limited(wait)).map_into_right_body());
        }
        if let Some(l) = &limits.per_token {
            let key = match auth::bearer(req.request(), true) {
                Some(t) => Some(TokenKey::Token(limits.hasher.hash_one(t))),
                None => ip.map(TokenKey::Ip),
            };
            if let Some(key) = key
                && let Err(no) = l.check_key(&key)
            {
                let wait = wait_secs(&no, l.clock());
                return Ok(req.into_response(limited(wait)).map_into_right_body());
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn wait_secs(no: &NotUntil<QuantaInstant>, clock: &QuantaClock) -> u64 {
    no.wait_time_from(clock.now()).as_secs().max(1)
}

/// 429 `rate_limited` with `Retry-After`.
fn limited(wait: u64) -> HttpResponse {
    HttpResponse::TooManyRequests()
        .insert_header(("Retry-After", wait.to_string()))
        .json(ErrorBody {
            error: "rate_limited".into(),
            message: format!("too many requests; retry in {wait} s"),
        })
}
