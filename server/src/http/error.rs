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
    /// The request itself is wrong, in `field` when one input is to blame.
    #[error("{}{message}", .field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    BadRequest {
        field: Option<String>,
        message: String,
    },
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

/// Every error response's body: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `bad_request`, `unauthorized`, `forbidden`,
    /// `too_many_requests`, `not_found`, `conflict`, `payload_too_large`, `bad_gateway`,
    /// `unavailable` or `internal`.
    #[schema(schema_with = error_codes)]
    pub code: &'static str,
    /// For people: what went wrong and, where there is one, what to do.
    pub message: String,
    /// The input that was wrong (`"hours"`, `"status.cpu_threshold"`), on a bad request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Every `code` an error body may carry, as the document lists them.
pub const ERROR_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "forbidden",
    "too_many_requests",
    "not_found",
    "conflict",
    "payload_too_large",
    "bad_gateway",
    "unavailable",
    "internal",
];

fn error_codes() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    domain::openapi::string_enum(ERROR_CODES)
}

/// Seconds a client should wait after a 503.
const RETRY_AFTER_SECONDS: &str = "5";

impl ApiError {
    /// A bad request naming the input `field` that was wrong.
    pub fn field(field: &str, err: impl Display) -> Self {
        ApiError::BadRequest {
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: err.to_string(),
        }
    }

    /// A bad request no single input is to blame for.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: None,
            message: message.into(),
        }
    }

    /// The body's `code`: one word per kind of failure, for programs to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::NotFound => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::BadGateway(_) => "bad_gateway",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
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

    /// The response body: the message without the field's name, which has its own member.
    pub fn body(&self) -> ErrorBody {
        let (message, field) = match self {
            ApiError::BadRequest { field, message } => (message.clone(), field.clone()),
            other => (other.public_message(), None),
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                field,
            },
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
            IngestError::Conflicts => ApiError::Conflict(
                "this report conflicts with another VM's stored identity (its machine_id or \
                 host name is taken) or its VM was deleted meanwhile; it was not stored"
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
        let mut response = (status, Json(self.body())).into_response();
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
            crate::configure::SettingsError::Invalid(invalid) => {
                ApiError::field(&invalid.field, invalid.message)
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
    fn every_code_is_documented() {
        let every = [
            ApiError::bad_request("x"),
            ApiError::Unauthorized,
            ApiError::Forbidden("x".into()),
            ApiError::TooManyRequests(1),
            ApiError::NotFound,
            ApiError::Conflict("x".into()),
            ApiError::PayloadTooLarge(1),
            ApiError::BadGateway("x".into()),
            ApiError::Unavailable,
            ApiError::Internal("x".into()),
        ];
        for err in &every {
            assert!(ERROR_CODES.contains(&err.code()), "{}", err.code());
        }
        assert_eq!(every.len(), ERROR_CODES.len());
    }

    #[test]
    fn field_errors_name_the_field() {
        let id: Result<domain::VmId, _> = "0".parse();
        let err = id.field("id").unwrap_err();
        assert_eq!(err.public_message(), "id: must be a positive integer");
        let body = serde_json::to_value(err.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "code": "bad_request",
                "message": "must be a positive integer",
                "field": "id",
            }})
        );
        let plain = serde_json::to_value(ApiError::NotFound.body()).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"error": {"code": "not_found", "message": "not found"}})
        );
        let kind: Result<domain::GuestKind, _> = "vm".parse();
        assert!(
            kind.field("type")
                .unwrap_err()
                .public_message()
                .starts_with("type: ")
        );
    }
}
