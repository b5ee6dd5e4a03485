//! JSON errors everywhere: `{"error": "<code>", "message": "<human text>"}`. Internal causes
//! are logged, never returned.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use super::auth::AuthError;

/// The error body (contract §4).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `invalid_jid`.
    pub error: String,
    /// Human-readable text.
    pub message: String,
}

/// An HTTP error with its status, code and public message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Code.
    pub code: &'static str,
    /// Public message.
    pub message: String,
    /// Seconds for `Retry-After`, if any.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// Any status/code/message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The same error with another code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 400 `invalid_jid`.
    pub fn invalid_jid(jid: &str) -> Self {
        let shown: String = jid.chars().take(100).collect();
        Self::bad_request(
            "invalid_jid",
            format!("{shown:?} is not a valid user JID (local@domain)"),
        )
    }
    /// 401.
    pub fn unauthorized(e: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404 `unknown_jid`.
    pub fn unknown_jid(jid: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_jid",
            format!("{jid} has never been seen"),
        )
    }
    /// 500; `cause` is logged, not returned.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the bridge's log",
        )
    }
    /// 503 for a store failure; `cause` is logged, not returned.
    pub fn store(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(%cause, "store read failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the history store is unavailable; try again later",
        )
    }
}

impl From<crate::store::StoreError> for ApiError {
    /// A bad cursor is the client's error; anything else is the store's, logged here with its
    /// cause and answered 503 without it.
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::BadCursor => {
                Self::bad_request("invalid_cursor", "cursor is not one this bridge issued")
            }
            other => Self::store(other),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        r.json(ErrorBody {
            error: self.code.to_owned(),
            message: self.message.clone(),
        })
    }
}
