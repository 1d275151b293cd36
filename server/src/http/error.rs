//! The REST API's error type and its one mapping to HTTP status codes and JSON bodies.

use crate::db::DbError;
use crate::ingest::IngestError;
use crate::remediation::ActionError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use diesel::result::Error as DieselError;
use domain::{InvalidId, UnknownValue};
use serde::Serialize;
use std::fmt::Display;

/// Every way a REST request can fail.
///
/// `Display` is for logs and may carry internal detail; clients only ever see
/// [`ApiError::public_message`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong; the message names the field (`"id: ..."`).
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid token")]
    Unauthorized,
    /// Signed in, but not allowed this.
    #[error("{0}")]
    Forbidden(String),
    /// Too many attempts; retry after this many seconds.
    #[error("too many attempts, retry later")]
    TooManyRequests(i64),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Proxmox refused or could not be reached; its answer is the operator's to read.
    #[error("{0}")]
    BadGateway(String),
    /// Storage is down or overloaded; a retry may succeed.
    #[error("storage unavailable, retry later")]
    Unavailable,
    /// A bug or corrupt data: logged with its detail, answered generically.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every error response's body.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Seconds a client should wait after a 503.
const RETRY_AFTER_SECONDS: &str = "5";

impl ApiError {
    /// A bad request naming the input `field` that was wrong.
    pub fn field(field: &str, err: impl Display) -> Self {
        ApiError::BadRequest(format!("{field}: {err}"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client is told: everything but internal errors says what went wrong.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Input conversions that fail name the field: `.field("node")?`.
pub trait FieldError<T> {
    fn field(self, name: &str) -> Result<T, ApiError>;
}

impl<T> FieldError<T> for Result<T, InvalidId> {
    fn field(self, name: &str) -> Result<T, ApiError> {
        self.map_err(|e| ApiError::field(name, e))
    }
}

impl<T> FieldError<T> for Result<T, UnknownValue> {
    fn field(self, name: &str) -> Result<T, ApiError> {
        self.map_err(|e| ApiError::field(name, e))
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "storage unavailable");
            return ApiError::Unavailable;
        }
        match err {
            // A stored value this version cannot read (an unknown enum spelling, say): no
            // retry will cure it, so it is a 500 for the operator to look into, not a 503.
            DbError::Query(DieselError::DeserializationError(e)) => {
                ApiError::Internal(format!("unreadable stored value: {e}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::Busy | IngestError::Unavailable => ApiError::Unavailable,
            IngestError::Unauthorized => ApiError::Unauthorized,
            IngestError::IdentityTaken => ApiError::Conflict(
                "this VM's identity is already enrolled with another credential; an admin can \
                 revoke it (DELETE /api/vms/:id/credential) or issue a new one"
                    .into(),
            ),
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(err: ActionError) -> Self {
        match err {
            ActionError::NotFound => ApiError::NotFound,
            ActionError::InFlight => {
                ApiError::Conflict("an action is already in flight for this VM".into())
            }
            ActionError::NotLinked => ApiError::Conflict(
                "the VM is not linked to a Proxmox guest; link it with PUT /api/vms/:id/proxmox"
                    .into(),
            ),
            ActionError::NothingLatched => ApiError::Conflict(
                "the VM is not waiting for manual intervention (manual, agent silent or guest fault)"
                    .into(),
            ),
            ActionError::NothingAnnounced => ApiError::Conflict(
                "no automatic action is announced for this VM (none was, or it was already sent)"
                    .into(),
            ),
            ActionError::LinkPending => ApiError::Conflict(
                "the VM's Proxmox link is only proposed (a VMID or name the agent reported); \
                 confirm it with PUT /api/vms/:id/proxmox"
                    .into(),
            ),
            ActionError::LinkChanged | ActionError::LinkContested(_) => {
                ApiError::Conflict(err.to_string())
            }
            ActionError::Unavailable(reason) => {
                ApiError::Conflict(format!("remediation is unavailable: {reason}"))
            }
            ActionError::Proxmox(e) => ApiError::BadGateway(format!("Proxmox refused: {e}")),
            ActionError::Db(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let body = ErrorBody {
            error: self.public_message(),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            ApiError::TooManyRequests(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::configure::SettingsError> for ApiError {
    fn from(err: crate::configure::SettingsError) -> Self {
        match err {
            crate::configure::SettingsError::Invalid(field) => {
                ApiError::BadRequest(field.to_string())
            }
            crate::configure::SettingsError::Db(db) => db.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_rows_are_internal_not_unavailable() {
        let err = DbError::Query(DieselError::DeserializationError(
            "unknown remediation phase: \"bogus\"".into(),
        ));
        let api = ApiError::from(err);
        assert!(matches!(api, ApiError::Internal(_)), "{api:?}");
        assert_eq!(api.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(api.public_message(), "internal error");
        let response = api.into_response();
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn lost_storage_is_unavailable_with_retry_after() {
        let api = ApiError::from(DbError::Unavailable("pool timed out".into()));
        assert!(matches!(api, ApiError::Unavailable));
        let response = api.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
    }

    #[test]
    fn field_errors_name_the_field() {
        let id: Result<domain::VmId, _> = "0".parse();
        let err = id.field("id").unwrap_err();
        assert_eq!(err.public_message(), "id: must be a positive integer");
        let kind: Result<domain::GuestKind, _> = "vm".parse();
        assert!(
            kind.field("type")
                .unwrap_err()
                .public_message()
                .starts_with("type: ")
        );
    }
}
