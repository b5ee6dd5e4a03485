//! Analytics and replay (contract §6, scope `history:read`): online time, concurrency, clients,
//! and the presence map as it was at an instant — answered from Postgres, or in memory-only
//! mode from this run's history, through the same definitions ([`crate::presence::analytics`]).
//! Every query is bounded: a window, a row bound (400 `window_too_large` beyond it), a
//! statement timeout, and at most 10,000 points.

use std::collections::HashSet;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, route, web};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{HistoryRead, Permissions};
use super::error::ApiError;
use super::rest::parse_time;
use crate::presence::analytics::{self, Group, Span};
use crate::presence::{UserJid, UserPresence};
use crate::store::memory::HistoryFilter;
use crate::store::{reads, rollup};

type State = web::Data<AppState>;

/// Sessions one query may read; beyond it the window must be narrowed.
const MAX_SPANS: usize = 2_000_000;
/// Points one concurrency answer may hold.
const MAX_POINTS: i64 = 10_000;

fn window_too_large() -> ApiError {
    ApiError::bad_request(
        "window_too_large",
        "the window holds more sessions than one query may read; narrow it (from/to) or filter by domain",
    )
}

fn disabled() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "history_disabled",
        "this bridge keeps no history (no Postgres, and the engine was started elsewhere)",
    )
}

/// `from`/`to`: `to` defaults to now, `from` to `to` − 24 h; `from` must be before `to`.
pub(crate) fn window(
    from: &Option<String>,
    to: &Option<String>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = parse_time("to", to)?.unwrap_or_else(Utc::now);
    let from = parse_time("from", from)?.unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to",
        ));
    }
    Ok((from, to))
}

/// The earliest instant the Postgres history still holds: the start of the oldest day that
/// `store.retention_days` keeps (older event partitions are dropped, and older sessions with
/// them).
pub(crate) fn retention_horizon(retention_days: u32, now: DateTime<Utc>) -> DateTime<Utc> {
    let day = now.date_naive() - Duration::days(i64::from(retention_days));
    day.and_time(chrono::NaiveTime::MIN).and_utc()
}

/// 400 `outside_retention` for a window or instant before the history kept (Postgres only:
/// the in-memory history answers what its ring still holds).
pub(crate) fn retained(st: &AppState, from: DateTime<Utc>) -> Result<(), ApiError> {
    if st.store.is_none() {
        return Ok(());
    }
    let horizon = retention_horizon(st.retention_days, Utc::now());
    if from < horizon {
        return Err(ApiError::bad_request(
            "outside_retention",
            format!(
                "history is kept for {} days (store.retention_days): the earliest instant is {}",
                st.retention_days,
                horizon.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ));
    }
    Ok(())
}

/// A `domain` parameter: a DNS name (lower-cased), else 400 `invalid_parameter`.
pub(crate) fn domain_param(domain: &Option<String>) -> Result<Option<String>, ApiError> {
    match domain {
        None => Ok(None),
        Some(d) => {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && d.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
            if ok {
                Ok(Some(d.to_ascii_lowercase()))
            } else {
                Err(ApiError::bad_request(
                    "invalid_parameter",
                    "domain must be a domain name, e.g. example.com",
                ))
            }
        }
    }
}

fn filter(p: &Permissions, domain: &Option<String>) -> Result<HistoryFilter, ApiError> {
    Ok(HistoryFilter {
        token_domains: p.domain_list(),
        domain: domain_param(domain)?,
        jid: None,
    })
}

/// The sessions overlapping the window, from whichever history this bridge keeps.
async fn spans(
    st: &AppState,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    f: &HistoryFilter,
) -> Result<Vec<Span>, ApiError> {
    let rows = if let Some(store) = &st.store {
        reads::spans(store.pool(), from, to, f, MAX_SPANS)
            .await
            .map_err(ApiError::store)?
    } else if let Some(h) = &st.history {
        h.sessions(from, to, Utc::now(), f, MAX_SPANS)
    } else {
        return Err(disabled());
    };
    Ok(rows
        .ok_or_else(window_too_large)?
        .into_iter()
        .map(|r| r.span)
        .collect())
}

fn seconds(millis: i64) -> f64 {
    millis as f64 / 1000.0
}

/// Query of `online-time`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OnlineTimeParams {
    /// Start (RFC 3339, inclusive; default `to` − 24 h; must be before `to`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
    /// `user` (default), `domain` or `client`.
    #[param(value_type = Option<GroupParam>)]
    pub group: Option<String>,
    /// Rows.
    #[param(minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<i64>,
}

/// Query of `concurrency`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConcurrencyParams {
    /// Start (RFC 3339, inclusive; default `to` − 24 h; must be before `to`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
    /// Seconds per point; at most 10,000 points per window (else 400 `too_many_points`).
    #[param(minimum = 1, maximum = 31622400, default = 60)]
    pub step: Option<i64>,
}

/// Query of `clients`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClientsParams {
    /// Start (RFC 3339, inclusive; default `to` − 24 h; must be before `to`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
}

/// What `online-time` groups by, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum GroupParam {
    /// Per user.
    User,
    /// Per domain.
    Domain,
    /// Per client.
    Client,
}

/// One `online-time` row.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OnlineTimeRow {
    /// User JID, domain or client.
    pub key: String,
    /// Seconds online inside the window.
    pub seconds: f64,
    /// Sessions overlapping the window.
    pub sessions: u64,
}

/// `GET /api/v1/analytics/online-time` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OnlineTimeBody {
    /// Window start.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub from: DateTime<Utc>,
    /// Window end.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub to: DateTime<Utc>,
    /// `user`, `domain` or `client`.
    pub group: String,
    /// By seconds, descending.
    pub rows: Vec<OnlineTimeRow>,
}

/// `GET /api/v1/analytics/online-time`.
#[utoipa::path(get, path = "/api/v1/analytics/online-time", params(OnlineTimeParams), responses((status = 200, description = "Online time per user, domain or client", body = OnlineTimeBody), (status = 400, description = "`outside_retention`, `invalid_range`, `invalid_parameter` or `window_too_large`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody), (status = 503, description = "The store is unavailable", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/analytics/online-time", method = "GET", method = "HEAD")]
pub async fn online_time(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<OnlineTimeParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    retained(&st, from)?;
    let (group, name) = match q.group.as_deref() {
        None | Some("user") => (Group::User, "user"),
        Some("domain") => (Group::Domain, "domain"),
        Some("client") => (Group::Client, "client"),
        Some(g) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("group must be user, domain or client; got {g:?}"),
            ));
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "limit must be 1..=10000",
        ));
    }
    let f = filter(&p, &q.domain)?;
    let now = Utc::now();
    let rows = if let Some(store) = &st.store {
        // Built days from the rollups, the rest from sessions.
        rollup::online_time(
            store.pool(),
            from,
            to,
            now,
            group,
            &f,
            limit as usize,
            MAX_SPANS,
        )
        .await
        .map_err(ApiError::store)?
        .ok_or_else(window_too_large)?
    } else {
        let spans = spans(&st, from, to, &f).await?;
        analytics::online_time(&spans, from, to, now, group, limit as usize)
    };
    Ok(HttpResponse::Ok().json(OnlineTimeBody {
        from,
        to,
        group: name.into(),
        rows: rows
            .into_iter()
            .map(|r| OnlineTimeRow {
                key: r.key,
                seconds: seconds(r.millis),
                sessions: r.sessions,
            })
            .collect(),
    }))
}

/// One concurrency point.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PointBody {
    /// Step start.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub t: DateTime<Utc>,
    /// Most users online at one instant of the step.
    pub users: u64,
    /// Most resources online at one instant of the step.
    pub resources: u64,
}

/// The peak of a window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PeakBody {
    /// The first instant the peak was reached.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub t: DateTime<Utc>,
    /// Users online then.
    pub users: u64,
}

/// `GET /api/v1/analytics/concurrency` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConcurrencyAnswer {
    /// Window start.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub from: DateTime<Utc>,
    /// Window end.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub to: DateTime<Utc>,
    /// Seconds per point.
    pub step: i64,
    /// One point per step.
    pub points: Vec<PointBody>,
    /// The highest `users` and when it was first reached.
    pub peak: PeakBody,
}

/// `GET /api/v1/analytics/concurrency`.
#[utoipa::path(get, path = "/api/v1/analytics/concurrency", params(ConcurrencyParams), responses((status = 200, description = "Most users and resources online per step, and the peak", body = ConcurrencyAnswer), (status = 400, description = "`outside_retention`, `invalid_range`, `invalid_parameter`, `too_many_points` or `window_too_large`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody), (status = 503, description = "The store is unavailable", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/analytics/concurrency", method = "GET", method = "HEAD")]
pub async fn concurrency(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<ConcurrencyParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    let step = q.step.unwrap_or(60);
    if !(1..=86_400 * 366).contains(&step) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "step must be a number of seconds, at least 1",
        ));
    }
    let span_ms = (to - from).num_milliseconds();
    let points = (span_ms + step * 1000 - 1) / (step * 1000);
    if points > MAX_POINTS {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!("{points} points; at most {MAX_POINTS}: widen the step or narrow the window"),
        ));
    }
    retained(&st, from)?;
    let f = filter(&p, &q.domain)?;
    let now = Utc::now();
    let rolled = match &st.store {
        Some(store) => rollup::concurrency(
            store.pool(),
            from,
            to,
            Duration::seconds(step),
            now,
            &f,
            MAX_SPANS,
        )
        .await
        .map_err(ApiError::store)?,
        None => None,
    };
    let c = match rolled {
        Some(c) => c.ok_or_else(window_too_large)?,
        None => {
            let spans = spans(&st, from, to, &f).await?;
            analytics::concurrency(&spans, from, to, Duration::seconds(step), now)
        }
    };
    Ok(HttpResponse::Ok().json(ConcurrencyAnswer {
        from,
        to,
        step,
        points: c
            .points
            .into_iter()
            .map(|p| PointBody {
                t: p.t,
                users: p.users,
                resources: p.resources,
            })
            .collect(),
        peak: PeakBody {
            t: c.peak.0,
            users: c.peak.1,
        },
    }))
}

/// One `clients` row.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClientRowBody {
    /// Client software (XEP-0115), `unknown` when none.
    pub client: String,
    /// Distinct users.
    pub users: u64,
    /// Distinct resources.
    pub resources: u64,
    /// Seconds of its sessions inside the window.
    pub seconds: f64,
}

/// `GET /api/v1/analytics/clients` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClientsBody {
    /// Window start.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub from: DateTime<Utc>,
    /// Window end.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub to: DateTime<Utc>,
    /// By seconds, descending.
    pub rows: Vec<ClientRowBody>,
}

/// `GET /api/v1/analytics/clients`.
#[utoipa::path(get, path = "/api/v1/analytics/clients", params(ClientsParams), responses((status = 200, description = "Client software used in the window", body = ClientsBody), (status = 400, description = "`outside_retention`, `invalid_range`, `invalid_parameter` or `window_too_large`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody), (status = 503, description = "The store is unavailable", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/analytics/clients", method = "GET", method = "HEAD")]
pub async fn clients(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<ClientsParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    retained(&st, from)?;
    let spans = spans(&st, from, to, &filter(&p, &q.domain)?).await?;
    let rows = analytics::clients(&spans, from, to, Utc::now());
    Ok(HttpResponse::Ok().json(ClientsBody {
        from,
        to,
        rows: rows
            .into_iter()
            .map(|r| ClientRowBody {
                client: r.client,
                users: r.users,
                resources: r.resources,
                seconds: seconds(r.millis),
            })
            .collect(),
    }))
}

/// Query of `replay`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReplayParams {
    /// The instant (RFC 3339; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub at: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
}

/// `GET /api/v1/replay` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReplayBody {
    /// The instant.
    #[serde(with = "crate::presence::model::rfc3339_millis")]
    pub at: DateTime<Utc>,
    /// Every user online at `at`, by JID.
    pub users: Vec<UserPresence>,
}

/// `GET /api/v1/replay`.
#[utoipa::path(get, path = "/api/v1/replay", params(ReplayParams), responses((status = 200, description = "The presence map as it was at `at`", body = ReplayBody), (status = 400, description = "`invalid_parameter`, `outside_retention` or `window_too_large`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody), (status = 503, description = "The store is unavailable", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/replay", method = "GET", method = "HEAD")]
pub async fn replay(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<ReplayParams>,
) -> Result<HttpResponse, ApiError> {
    let at = parse_time("at", &q.at)?.unwrap_or_else(Utc::now);
    retained(&st, at)?;
    let f = filter(&p, &q.domain)?;
    let (spans, events) = if let Some(store) = &st.store {
        // The online stretch containing `at` cannot reach back beyond the history kept.
        let lookback = at - Duration::days(i64::from(st.retention_days.max(1)));
        reads::replay_state(store.pool(), at, lookback, &f, MAX_SPANS)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(window_too_large)?
    } else if let Some(h) = &st.history {
        let far = DateTime::<Utc>::MIN_UTC;
        let spans: Vec<Span> = h
            .sessions(
                far,
                at + Duration::milliseconds(1),
                Utc::now(),
                &f,
                MAX_SPANS,
            )
            .ok_or_else(window_too_large)?
            .into_iter()
            .map(|r| r.span)
            .filter(|s| s.start <= at)
            .collect();
        let users: HashSet<UserJid> = spans.iter().map(|s| s.jid.clone()).collect();
        let earliest = spans.iter().map(|s| s.start).min().unwrap_or(at);
        let events = h.state_events(&users, earliest, at);
        (spans, events)
    } else {
        return Err(disabled());
    };
    Ok(HttpResponse::Ok().json(ReplayBody {
        at,
        users: analytics::replay(&spans, &events, at),
    }))
}
