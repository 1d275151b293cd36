//! Extractors: who is calling, which VM a path names, query strings and size-limited bodies.
//!
//! Each rejects with an [`ApiError`], so every failure answers in the API's JSON.

use super::error::{ApiError, FieldError};
use crate::accounts::{self, Principal, Via};
use crate::auth::{Caller, Role, bearer_token};
use crate::enrolment::Presented;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use domain::UserRole;
use domain::heartbeat::MAX_REPORT_BYTES;
use domain::{InvalidId, VmId};
use serde::de::DeserializeOwned;

/// Checks the request\'s bearer token against `role`\'s shared credential.
fn authenticate(state: &AppState, parts: &Parts, role: Role) -> Result<Caller, ApiError> {
    state
        .credentials
        .authenticate(role, &parts.headers)
        .ok_or(ApiError::Unauthorized)
}

/// Who made a request and from where.
#[derive(Clone, Debug)]
pub struct Actor {
    pub who: Principal,
    /// The peer address, for the audit log.
    pub from: String,
}

/// The caller, holding at least `role`: 401 without a session or token, 403 with too
/// little a role or a cookie-borne write from another site.
async fn require(state: &AppState, parts: &Parts, role: UserRole) -> Result<Actor, ApiError> {
    let who = accounts::principal(state, parts)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if who.via == Via::Session && !accounts::same_origin(&parts.method, &parts.headers) {
        return Err(ApiError::Forbidden(
            "a cross-site request with a session cookie is refused".into(),
        ));
    }
    if who.role < role {
        return Err(ApiError::Forbidden(format!("this needs the {role} role")));
    }
    Ok(Actor {
        who,
        from: accounts::source(&parts.extensions),
    })
}

impl Actor {
    /// Records in the audit log that this caller did `action` on `target`, successfully.
    pub async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        detail: Option<&str>,
    ) {
        accounts::audit_quietly(
            state,
            &self.who.name,
            action,
            target,
            &self.from,
            "success",
            detail,
        )
        .await;
    }
}

/// Defines an extractor for callers holding at least one role.
macro_rules! role_extractor {
    ($(#[$meta:meta])* $name:ident, $role:expr) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        pub struct $name(pub Actor);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &AppState,
            ) -> Result<Self, ApiError> {
                require(state, parts, $role).await.map($name)
            }
        }
    };
}

role_extractor!(
    /// Anyone signed in (or holding an API token): reads.
    Viewer,
    UserRole::Viewer
);
role_extractor!(
    /// Resets, shutdowns, acknowledgements, link approvals, per-VM auto-reset.
    Operator,
    UserRole::Operator
);
role_extractor!(
    /// Configuration, users, tokens and agent credentials.
    Admin,
    UserRole::Admin
);

/// The header of answers that carry a secret shown once: no cache may keep them.
pub type NoStore = [(axum::http::header::HeaderName, &'static str); 1];
pub const NO_STORE: NoStore = [(axum::http::header::CACHE_CONTROL, "no-store")];

const MAX_LABEL_CHARS: usize = 100;

/// A label for a token: trimmed, 1 to 100 printable characters; else a 400 naming `label`.
pub fn label(raw: &str) -> Result<&str, ApiError> {
    let label = raw.trim();
    if label.is_empty()
        || label.chars().count() > MAX_LABEL_CHARS
        || label.chars().any(char::is_control)
    {
        return Err(ApiError::field(
            "label",
            format!("1 to {MAX_LABEL_CHARS} printable characters"),
        ));
    }
    Ok(label)
}

/// A positive integer id from a path segment; else a 400 naming `id`.
pub fn positive_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::field("id", "must be a positive integer"))
}

/// The client's address (through a trusted proxy if there is one), as text.
#[derive(Clone, Debug)]
pub struct ClientAddress(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(ClientAddress(accounts::source(&parts.extensions)))
    }
}

/// What an agent's report carries: the fleet token, a VM credential or an enrolment
/// token. Which VM it names (if any) is decided by the writer, inside its transaction; no
/// bearer at all is a 401 here.
#[derive(Clone, Debug)]
pub struct AgentBearer(pub Presented);

impl FromRequestParts<AppState> for AgentBearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if authenticate(state, parts, Role::Agent).is_ok() {
            return Ok(AgentBearer(Presented::FleetToken));
        }
        let token = bearer_token(&parts.headers).ok_or(ApiError::Unauthorized)?;
        Ok(AgentBearer(Presented::of_bearer(token)))
    }
}

/// The text of a route's one `{id}` segment; an undecodable one is a 400 naming `id`.
async fn id_segment<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, ApiError> {
    match Path::<String>::from_request_parts(parts, state).await {
        Ok(Path(raw)) => Ok(raw),
        // A route without exactly one parameter: our bug, not the client's.
        Err(rejection) if rejection.status().is_server_error() => Err(ApiError::Internal(format!(
            "an id extractor on a route it does not fit: {}",
            rejection.body_text()
        ))),
        // Undecodable segments (bad percent-encoding, not UTF-8) are not ids either.
        Err(_) => Err(ApiError::field(
            "id",
            InvalidId("must be a positive integer"),
        )),
    }
}

/// The VM named by a route's one `{id}` segment; anything but a positive integer is a 400
/// naming `id`.
#[derive(Clone, Copy, Debug)]
pub struct VmPath(pub VmId);

impl<S: Send + Sync> FromRequestParts<S> for VmPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        id_segment(parts, state)
            .await?
            .parse::<VmId>()
            .field("id")
            .map(VmPath)
    }
}

/// Any other row a route's one `{id}` segment names (a user, a token, a channel, a rule, a
/// window); anything but a positive integer is a 400 naming `id`.
#[derive(Clone, Copy, Debug)]
pub struct IdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        positive_id(&id_segment(parts, state).await?).map(IdPath)
    }
}

/// Query parameters; a malformed query string is a 400 in the API's JSON.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| QueryParams(value))
            .map_err(|rejection| ApiError::field("query", rejection.body_text()))
    }
}

/// The raw request body, within the route's `DefaultBodyLimit`; over it is a 413.
#[derive(Debug)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    // Every API route shares this limit (see `super::router`).
                    ApiError::PayloadTooLarge(MAX_REPORT_BYTES)
                } else {
                    ApiError::field("body", rejection.body_text())
                }
            })
    }
}

/// A JSON body; errors name the field that was wrong (`"cpu_threshold: invalid type..."`).
/// The content type is not checked: agents and scripts send JSON without always saying so.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(body) = RawBody::from_request(req, state).await?;
        parse_json(&body).map(JsonBody)
    }
}

/// A form body (`application/x-www-form-urlencoded`, the pages' forms); a wrong or missing
/// content type or a form that does not fit is a 400 in the API's JSON, like every refusal.
#[derive(Debug)]
pub struct FormBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FormBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Form::<T>::from_request(req, state)
            .await
            .map(|axum::Form(value)| FormBody(value))
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(MAX_REPORT_BYTES)
                } else {
                    ApiError::field("body", rejection.body_text())
                }
            })
    }
}

/// Deserializes `body`, naming the path of the first wrong field, or `body` for the whole.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // Broken JSON has no field to name (serde_path_to_error says `?` or `.`).
        if path == "." || path == "?" || inner.is_syntax() || inner.is_eof() {
            ApiError::field("body", inner)
        } else {
            ApiError::field(&path, inner)
        }
    })?;
    // One document per body: `{...} garbage` is refused, not half read.
    deserializer.end().map_err(|e| ApiError::field("body", e))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        cpu_threshold: Option<f64>,
    }

    #[test]
    fn json_errors_name_the_field() {
        let ok = parse_json::<Patch>(br#"{"cpu_threshold": 1}"#).unwrap();
        assert_eq!(ok.cpu_threshold, Some(1.0));
        let err = parse_json::<Patch>(br#"{"cpu_threshold": "high"}"#).unwrap_err();
        assert!(err.public_message().starts_with("cpu_threshold: "), "{err}");
        let err = parse_json::<Patch>(b"{").unwrap_err();
        assert!(err.public_message().starts_with("body: "), "{err}");
        let err = parse_json::<Patch>(br#"{} {}"#).unwrap_err();
        assert!(err.public_message().starts_with("body: trailing"), "{err}");
    }
}
