//! Events and exports (contract §6, scope `history:read`): `GET /api/v1/events` pages every
//! user's events in a window; `GET /api/v1/export/{events,sessions}` stream a window as CSV
//! (RFC 4180) or NDJSON in constant memory — from Postgres page by page (keyset, 5,000 rows a
//! page), or from this run's in-memory history (itself bounded).

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{HttpResponse, route, web};
use chrono::{DateTime, Utc};
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::analytics::retained;
use super::auth::{HistoryRead, Permissions};
use super::error::ApiError;
use crate::presence::model::rfc3339_millis;
use crate::store::memory::HistoryFilter;
use crate::store::reads::{self, EventRow, ExportCursor, Order, SessionExportRow};

type State = web::Data<AppState>;

/// Rows per `FETCH` (and per chunk of the in-memory export) while streaming.
const EXPORT_PAGE: usize = 5000;
/// Postgres exports running at once: each holds a connection of its own for its life.
const EXPORT_SLOTS: usize = 4;

/// A slot for one Postgres export, else 429 `too_many_exports`.
fn export_slot() -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(EXPORT_SLOTS)))
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_exports",
                format!("{EXPORT_SLOTS} exports are running; try again when one has finished"),
            );
            e.retry_after = Some(5);
            e
        })
}

fn window(
    from: &Option<String>,
    to: &Option<String>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    super::analytics::window(from, to)
}

/// `Event` of contract §6.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventBody {
    /// When it happened.
    #[serde(with = "rfc3339_millis")]
    pub at: DateTime<Utc>,
    /// Bare JID.
    pub jid: String,
    /// Resource.
    pub resource: String,
    /// `available` or `unavailable`.
    pub kind: &'static str,
    /// Show (`offline` for an unavailable event).
    pub show: &'static str,
    /// Status text.
    pub status: Option<String>,
    /// Priority (available only).
    pub priority: Option<i8>,
    /// Client software.
    pub client: Option<String>,
}

impl From<EventRow> for EventBody {
    fn from(r: EventRow) -> Self {
        Self {
            at: r.at,
            jid: r.jid,
            resource: r.resource,
            kind: if r.available {
                "available"
            } else {
                "unavailable"
            },
            show: if r.available {
                r.show.map_or("available", |s| s.as_str())
            } else {
                "offline"
            },
            status: r.status,
            priority: if r.available { r.priority } else { None },
            client: r.client,
        }
    }
}

/// `GET /api/v1/events` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsBody {
    /// The page.
    pub events: Vec<EventBody>,
    /// Cursor of the next page (absent on the last).
    pub next_cursor: Option<String>,
}

/// Query of `events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Start (RFC 3339, inclusive; default `to` − 24 h; must be before `to`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Only this user.
    #[param(value_type = Option<String>, format = "jid")]
    pub jid: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    pub limit: Option<i64>,
    /// Oldest first (`asc`, the default) or newest first (`desc`).
    #[param(value_type = Option<super::rest::Order>)]
    pub order: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^[0-9a-f]{1,15}\.[0-9a-f]{32}$")]
    pub cursor: Option<String>,
}

/// Query of the exports.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    /// Start (RFC 3339, inclusive; default `to` − 24 h; must be before `to`).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub to: Option<String>,
    /// Only this domain.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")]
    pub domain: Option<String>,
    /// `csv` (default) or `ndjson`.
    #[param(value_type = Option<FormatParam>)]
    pub format: Option<String>,
}

/// Export formats, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum FormatParam {
    /// RFC 4180 CSV with a header line.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

fn filter(
    p: &Permissions,
    jid: &Option<String>,
    domain: &Option<String>,
) -> Result<HistoryFilter, ApiError> {
    let jid = match jid {
        Some(j) => {
            let j = super::rest::parse_jid(j)?;
            if !p.can_see(&j) {
                return Err(ApiError::forbidden("this token may not see that domain"));
            }
            Some(j)
        }
        None => None,
    };
    Ok(HistoryFilter {
        token_domains: p.domain_list(),
        domain: super::analytics::domain_param(domain)?,
        jid,
    })
}

fn disabled() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "history_disabled",
        "this bridge keeps no history (no Postgres, and the engine was started elsewhere)",
    )
}

/// `GET /api/v1/events`.
#[utoipa::path(get, path = "/api/v1/events", params(EventsParams), responses((status = 200, description = "A page of every user's events in the window", body = EventsBody), (status = 400, description = "`outside_retention`, `invalid_range`, `invalid_parameter`, `invalid_jid` or `invalid_cursor`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read, or may not see that JID", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody), (status = 503, description = "The store is unavailable", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/events", method = "GET", method = "HEAD")]
pub async fn events(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<EventsParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    retained(&st, from)?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "limit must be 1..=10000",
        ));
    }
    let order = match q.order.as_deref() {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(o) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("order must be asc or desc; got {o:?}"),
            ));
        }
    };
    let f = filter(&p, &q.jid, &q.domain)?;
    let page = if let Some(store) = &st.store {
        reads::events_page(
            store.pool(),
            from,
            to,
            &f,
            order,
            limit,
            q.cursor.as_deref(),
        )
        .await
        .map_err(ApiError::from)?
    } else if let Some(h) = &st.history {
        let cursor = q
            .cursor
            .as_deref()
            .map(reads::parse_event_cursor)
            .transpose()
            .map_err(ApiError::from)?;
        let mut rows: Vec<EventRow> = h
            .events(from, to, &f, usize::MAX)
            .unwrap_or_default()
            .iter()
            .map(EventRow::from_stored)
            .collect();
        if order == Order::Desc {
            rows.reverse();
        }
        let after = |r: &EventRow| match (cursor, order) {
            (None, _) => true,
            (Some(c), Order::Asc) => (r.at, r.id) > c,
            (Some(c), Order::Desc) => (r.at, r.id) < c,
        };
        let mut page: Vec<EventRow> = rows
            .into_iter()
            .filter(|r| after(r))
            .take(limit as usize + 1)
            .collect();
        let more = page.len() as i64 > limit;
        page.truncate(limit as usize);
        reads::EventPage {
            next_cursor: if more {
                page.last().map(reads::event_cursor)
            } else {
                None
            },
            events: page,
        }
    } else {
        return Err(disabled());
    };
    Ok(HttpResponse::Ok().json(EventsBody {
        events: page.events.into_iter().map(EventBody::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
}

fn format(q: &ExportParams) -> Result<Format, ApiError> {
    match q.format.as_deref() {
        None | Some("csv") => Ok(Format::Csv),
        Some("ndjson") => Ok(Format::Ndjson),
        Some(f) => Err(ApiError::bad_request(
            "invalid_parameter",
            format!("format must be csv or ndjson; got {f:?}"),
        )),
    }
}

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(out: &mut String, v: &str) {
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

fn csv_line(fields: &[&str]) -> String {
    let mut s = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        csv_field(&mut s, f);
    }
    s.push_str("\r\n");
    s
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn event_line(e: EventRow, fmt: Format) -> String {
    let b = EventBody::from(e);
    match fmt {
        Format::Ndjson => serde_json::to_string(&b).unwrap_or_default() + "\n",
        Format::Csv => csv_line(&[
            &time(b.at),
            &b.jid,
            &b.resource,
            b.kind,
            b.show,
            b.status.as_deref().unwrap_or(""),
            &b.priority.map(|p| p.to_string()).unwrap_or_default(),
            b.client.as_deref().unwrap_or(""),
        ]),
    }
}

/// A session as the NDJSON export shows it.
#[derive(Debug, Serialize)]
struct SessionBody<'a> {
    jid: &'a str,
    resource: &'a str,
    client: Option<&'a str>,
    #[serde(with = "rfc3339_millis")]
    start: DateTime<Utc>,
    #[serde(with = "rfc3339_millis::option")]
    end: Option<DateTime<Utc>>,
    end_cause: Option<&'a str>,
}

fn session_line(s: &SessionExportRow, fmt: Format) -> String {
    match fmt {
        Format::Ndjson => {
            serde_json::to_string(&SessionBody {
                jid: &s.jid,
                resource: &s.resource,
                client: s.client.as_deref(),
                start: s.start,
                end: s.end,
                end_cause: s.end_cause.as_deref(),
            })
            .unwrap_or_default()
                + "\n"
        }
        Format::Csv => csv_line(&[
            &s.jid,
            &s.resource,
            s.client.as_deref().unwrap_or(""),
            &time(s.start),
            &s.end.map(time).unwrap_or_default(),
            s.end_cause.as_deref().unwrap_or(""),
        ]),
    }
}

fn streamed(
    name: &str,
    fmt: Format,
    header: &'static str,
    body: impl Stream<Item = Result<Bytes, ApiError>> + 'static,
) -> HttpResponse {
    let (ct, ext) = match fmt {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Ndjson => ("application/x-ndjson", "ndjson"),
    };
    let head = match fmt {
        Format::Csv => Some(Ok(Bytes::from_static(header.as_bytes()))),
        Format::Ndjson => None,
    };
    HttpResponse::Ok()
        .content_type(ct)
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{name}.{ext}\""),
        ))
        .streaming(stream::iter(head).chain(body))
}

/// `GET /api/v1/export/events`.
#[utoipa::path(get, path = "/api/v1/export/events", params(ExportParams), responses((status = 200, description = "The window's events, streamed: CSV `at,jid,resource,kind,show,status,priority,client` or NDJSON", content((String = "text/csv"), (String = "application/x-ndjson"))), (status = 400, description = "`outside_retention`, `invalid_range` or `invalid_parameter`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/export/events", method = "GET", method = "HEAD")]
pub async fn export_events(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<ExportParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    retained(&st, from)?;
    let fmt = format(&q)?;
    let f = filter(&p, &None, &q.domain)?;
    const HEADER: &str = "at,jid,resource,kind,show,status,priority,client\r\n";
    if let Some(store) = &st.store {
        let permit = export_slot()?;
        let mut cur = ExportCursor::events(store.pool(), from, to, &f)
            .await
            .map_err(ApiError::store)?;
        // The first rows before the answer starts, so that a failing store is a clean 503
        // and not a broken stream.
        let first = cur
            .next_events(EXPORT_PAGE)
            .await
            .map_err(ApiError::store)?;
        let first_text: String = first.into_iter().map(|e| event_line(e, fmt)).collect();
        // Then from the same cursor: one batch in memory at a time, whatever the window.
        let rest = stream::unfold(Some((cur, permit)), move |state| async move {
            let (mut cur, permit) = state?;
            if cur.is_done() {
                return None;
            }
            match cur.next_events(EXPORT_PAGE).await {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let text: String = rows.into_iter().map(|e| event_line(e, fmt)).collect();
                    Some((Ok(Bytes::from(text)), Some((cur, permit))))
                }
                Err(e) => Some((Err(ApiError::store(e)), None)),
            }
        });
        let body = stream::iter([Ok(Bytes::from(first_text))]).chain(rest);
        return Ok(streamed("events", fmt, HEADER, body));
    }
    let Some(h) = &st.history else {
        return Err(disabled());
    };
    let rows: Vec<EventRow> = h
        .events(from, to, &f, usize::MAX)
        .unwrap_or_default()
        .iter()
        .map(EventRow::from_stored)
        .collect();
    let chunks = stream::iter(
        rows.chunks(EXPORT_PAGE)
            .map(|c| c.to_vec())
            .collect::<Vec<_>>(),
    )
    .map(move |c| {
        Ok(Bytes::from(
            c.into_iter()
                .map(|e| event_line(e, fmt))
                .collect::<String>(),
        ))
    });
    Ok(streamed("events", fmt, HEADER, chunks))
}

/// `GET /api/v1/export/sessions`.
#[utoipa::path(get, path = "/api/v1/export/sessions", params(ExportParams), responses((status = 200, description = "The sessions overlapping the window, streamed: CSV `jid,resource,client,start,end,end_cause` (`end` empty while open) or NDJSON", content((String = "text/csv"), (String = "application/x-ndjson"))), (status = 400, description = "`outside_retention`, `invalid_range` or `invalid_parameter`", body = super::error::ErrorBody), (status = 401, description = "No token, or an invalid or expired one", body = super::error::ErrorBody), (status = 403, description = "The token lacks history:read", body = super::error::ErrorBody), (status = 429, description = "Rate limited", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))), (status = 501, description = "No history is kept", body = super::error::ErrorBody)), security(("bearer" = [])))]
#[route("/export/sessions", method = "GET", method = "HEAD")]
pub async fn export_sessions(
    st: State,
    HistoryRead(p): HistoryRead,
    q: web::Query<ExportParams>,
) -> Result<HttpResponse, ApiError> {
    let (from, to) = window(&q.from, &q.to)?;
    retained(&st, from)?;
    let fmt = format(&q)?;
    let f = filter(&p, &None, &q.domain)?;
    const HEADER: &str = "jid,resource,client,start,end,end_cause\r\n";
    if let Some(store) = &st.store {
        let permit = export_slot()?;
        let mut cur = ExportCursor::sessions(store.pool(), from, to, &f)
            .await
            .map_err(ApiError::store)?;
        let first = cur
            .next_sessions(EXPORT_PAGE)
            .await
            .map_err(ApiError::store)?;
        let first_text: String = first.iter().map(|s| session_line(s, fmt)).collect();
        let rest = stream::unfold(Some((cur, permit)), move |state| async move {
            let (mut cur, permit) = state?;
            if cur.is_done() {
                return None;
            }
            match cur.next_sessions(EXPORT_PAGE).await {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let text: String = rows.iter().map(|s| session_line(s, fmt)).collect();
                    Some((Ok(Bytes::from(text)), Some((cur, permit))))
                }
                Err(e) => Some((Err(ApiError::store(e)), None)),
            }
        });
        let body = stream::iter([Ok(Bytes::from(first_text))]).chain(rest);
        return Ok(streamed("sessions", fmt, HEADER, body));
    }
    let Some(h) = &st.history else {
        return Err(disabled());
    };
    let rows = h.export_sessions(from, to, Utc::now(), &f);
    let text: Vec<Result<Bytes, ApiError>> = rows
        .chunks(EXPORT_PAGE)
        .map(|c| {
            Ok(Bytes::from(
                c.iter().map(|s| session_line(s, fmt)).collect::<String>(),
            ))
        })
        .collect();
    Ok(streamed("sessions", fmt, HEADER, stream::iter(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_follows_rfc_4180() {
        assert_eq!(csv_line(&["a", "b"]), "a,b\r\n");
        assert_eq!(
            csv_line(&["say \"hi\"", "x,y", "two\nlines", ""]),
            "\"say \"\"hi\"\"\",\"x,y\",\"two\nlines\",\r\n"
        );
    }
}
