//! Sign-in and sign-out, the first admin, users, per-user API tokens and the audit log.

use super::error::ApiError;
use super::extract::{
    Actor, Admin, FormBody, IdPath, JsonBody, NO_STORE, NoStore, QueryParams, Viewer, label,
};
use crate::accounts::{self, LoginError, SetupError};
use crate::auth;
use crate::config::Secret;
use crate::db::people::{self, ApiTokenView, AuditView, UserView};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::request::Parts;
use domain::UserRole;
use serde::{Deserialize, Serialize};
use tower_sessions::Session;

/// How an API token starts, wherever it is made (the API, the users page, the command line).
pub const API_TOKEN_PREFIX: &str = "vmhc_api_";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
}

/// Who is signed in.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Me {
    username: String,
    role: UserRole,
}

fn session_of(parts: &Parts) -> Result<Session, ApiError> {
    parts
        .extensions
        .get::<Session>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("no session layer on this route".into()))
}

fn same_origin(parts: &Parts) -> Result<(), ApiError> {
    if accounts::same_origin(&parts.method, &parts.headers) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "a cross-site sign-in is refused".into(),
        ))
    }
}

/// Signs in with a name and password; the answer sets the session cookie.
#[utoipa::path(
    post,
    path = "/api/login",
    tag = "people",
    request_body = LoginRequest,
    responses((status = 200, description = "Signed in; the answer sets the session cookie", body = Me)),
    security(())
)]
pub async fn login(
    State(state): State<AppState>,
    parts: Parts,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<Json<Me>, ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    let from = accounts::source(&parts.extensions);
    match accounts::login(
        &state,
        &session,
        &request.username,
        &request.password,
        &from,
    )
    .await
    {
        Ok(who) => Ok(Json(Me {
            username: who.name,
            role: who.role,
        })),
        Err(LoginError::Invalid) => Err(ApiError::Unauthorized),
        Err(LoginError::Throttled(ms)) => Err(ApiError::TooManyRequests(ms / 1000 + 1)),
        Err(LoginError::Unavailable) => Err(ApiError::Unavailable),
    }
}

#[utoipa::path(
    post,
    path = "/api/logout",
    tag = "people",
    responses((status = 204, description = "Signed out"))
)]
pub async fn logout(State(state): State<AppState>, parts: Parts) -> Result<StatusCode, ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    accounts::logout(&state, &session, &accounts::source(&parts.extensions)).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/api/me",
    tag = "people",
    responses((status = 200, description = "Who the caller is", body = Me))
)]
pub async fn me(Viewer(actor): Viewer) -> Json<Me> {
    Json(Me {
        username: actor.who.name,
        role: actor.who.role,
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    setup_code: String,
    username: String,
    password: String,
}

/// Creates the first admin with the one-time setup code; refused once any user exists.
#[utoipa::path(
    post,
    path = "/api/setup",
    tag = "people",
    request_body = SetupRequest,
    responses((status = 201, description = "The first admin, signed in", body = Me)),
    security(())
)]
pub async fn setup(
    State(state): State<AppState>,
    parts: Parts,
    JsonBody(request): JsonBody<SetupRequest>,
) -> Result<(StatusCode, Json<Me>), ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    let from = accounts::source(&parts.extensions);
    let result = accounts::setup(
        &state,
        &session,
        &Secret::new(request.setup_code),
        &request.username,
        &Secret::new(request.password),
        &from,
    )
    .await;
    match result {
        Ok(who) => Ok((
            StatusCode::CREATED,
            Json(Me {
                username: who.name,
                role: who.role,
            }),
        )),
        Err(SetupError::Done) => Err(ApiError::Conflict("setup is done: sign in".into())),
        Err(SetupError::WrongCode) => Err(ApiError::Forbidden(
            "wrong setup code (see data/setup-code or the server log)".into(),
        )),
        Err(SetupError::Invalid(field, message)) => Err(ApiError::field(field, message)),
        Err(SetupError::Unavailable) => Err(ApiError::Unavailable),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub role: UserRole,
}

#[utoipa::path(
    post,
    path = "/api/users",
    tag = "people",
    request_body = NewUser,
    responses((status = 201, description = "Created", body = UserView))
)]
pub async fn create_user(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(request): JsonBody<NewUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = add_user(&state, &actor, request).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Creates a user (both doors: `POST /api/users` and the users page).
pub async fn add_user(
    state: &AppState,
    actor: &Actor,
    request: NewUser,
) -> Result<UserView, ApiError> {
    accounts::check_username(&request.username).map_err(|e| ApiError::field("username", e))?;
    accounts::check_password(&request.password).map_err(|e| ApiError::field("password", e))?;
    let hash = accounts::hash_password(&request.password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let row = {
        let mut conn = state.db.conn().await?;
        people::create_user(
            &mut conn,
            &request.username,
            &hash,
            request.role,
            crate::now_ms(),
        )
        .await?
    };
    let Some(row) = row else {
        return Err(ApiError::Conflict("that username is taken".into()));
    };
    actor
        .audit(
            state,
            "create_user",
            Some(&row.username),
            Some(request.role.as_str()),
        )
        .await;
    Ok(row.into())
}

#[utoipa::path(
    get,
    path = "/api/users",
    tag = "people",
    responses((status = 200, description = "Every user (admin)", body = [UserView]))
)]
pub async fn list_users(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<UserView>>, ApiError> {
    Ok(Json(users(&state).await?))
}

pub async fn users(state: &AppState) -> Result<Vec<UserView>, ApiError> {
    let mut conn = state.db.conn().await?;
    Ok(people::list_users(&mut conn).await?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    password: String,
}

/// Sets a user's password (admin); every session of that user ends, on every replica.
#[utoipa::path(
    put,
    path = "/api/users/{id}/password",
    tag = "people",
    params(("id" = i64, Path, description = "The user's id", minimum = 1)),
    request_body = PasswordChange,
    responses((status = 204, description = "Changed"))
)]
pub async fn set_password(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
    JsonBody(request): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    change_password(&state, &actor, id, request.password).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of a password change: `PUT /api/users/:id/password` and the users page.
pub async fn change_password(
    state: &AppState,
    actor: &Actor,
    id: i64,
    password: String,
) -> Result<(), ApiError> {
    let request = PasswordChange { password };
    accounts::check_password(&request.password).map_err(|e| ApiError::field("password", e))?;
    let hash = accounts::hash_password(&request.password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut conn = state.db.conn().await?;
    if !people::set_password(&mut conn, id, &hash, crate::now_ms()).await? {
        return Err(ApiError::NotFound);
    }
    drop(conn);
    actor
        .audit(state, "set_password", Some(&format!("user {id}")), None)
        .await;
    Ok(())
}

#[utoipa::path(
    delete,
    path = "/api/users/{id}",
    tag = "people",
    params(("id" = i64, Path, description = "The user's id", minimum = 1)),
    responses((status = 204, description = "Deleted; the user's sessions and tokens end"))
)]
pub async fn delete_user(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    remove_user(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/users/:id`.
pub async fn remove_user(state: &AppState, actor: &Actor, id: i64) -> Result<(), ApiError> {
    let mut conn = state.db.conn().await?;
    if !people::delete_user(&mut conn, id).await? {
        return Err(ApiError::NotFound);
    }
    drop(conn);
    actor
        .audit(state, "delete_user", Some(&format!("user {id}")), None)
        .await;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiToken {
    /// The user the token acts as.
    pub username: String,
    pub label: String,
    pub role: UserRole,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedApiToken {
    pub id: i64,
    pub token: String,
}

/// A token for scripts, acting as a user with at most that user's role; shown once.
#[utoipa::path(
    post,
    path = "/api/tokens",
    tag = "people",
    request_body = NewApiToken,
    responses((status = 201, description = "Created; the value is shown this once", body = CreatedApiToken))
)]
pub async fn create_api_token(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(request): JsonBody<NewApiToken>,
) -> Result<(StatusCode, NoStore, Json<CreatedApiToken>), ApiError> {
    let created = issue_api_token(&state, &actor, request).await?;
    Ok((StatusCode::CREATED, NO_STORE, Json(created)))
}

/// Both doors of `POST /api/tokens`.
pub async fn issue_api_token(
    state: &AppState,
    actor: &Actor,
    request: NewApiToken,
) -> Result<CreatedApiToken, ApiError> {
    let label = label(&request.label)?;
    let mut conn = state.db.conn().await?;
    let owner = people::user_by_name(&mut conn, &request.username)
        .await?
        .ok_or_else(|| ApiError::field("username", "no such user"))?;
    if request.role > owner.role.0 {
        return Err(ApiError::field(
            "role",
            format!("{} is only a {}", owner.username, owner.role.0),
        ));
    }
    let secret = auth::generate_secret(API_TOKEN_PREFIX);
    let id = people::create_api_token(
        &mut conn,
        owner.id,
        &auth::hash_token(secret.expose()),
        label,
        request.role,
        crate::now_ms(),
    )
    .await?;
    drop(conn);
    actor
        .audit(
            state,
            "create_api_token",
            Some(&owner.username),
            Some(&format!("{label} ({})", request.role)),
        )
        .await;
    Ok(CreatedApiToken {
        id,
        token: secret.expose().to_owned(),
    })
}

#[utoipa::path(
    get,
    path = "/api/tokens",
    tag = "people",
    responses((status = 200, description = "Every API token (never its value)", body = [ApiTokenView]))
)]
pub async fn list_api_tokens(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<ApiTokenView>>, ApiError> {
    Ok(Json(api_tokens(&state).await?))
}

pub async fn api_tokens(state: &AppState) -> Result<Vec<ApiTokenView>, ApiError> {
    let mut conn = state.db.conn().await?;
    Ok(people::list_api_tokens(&mut conn).await?)
}

#[utoipa::path(
    delete,
    path = "/api/tokens/{id}",
    tag = "people",
    params(("id" = i64, Path, description = "The token's id", minimum = 1)),
    responses((status = 204, description = "Revoked"))
)]
pub async fn revoke_api_token(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    withdraw_api_token(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/tokens/:id`.
pub async fn withdraw_api_token(state: &AppState, actor: &Actor, id: i64) -> Result<(), ApiError> {
    let mut conn = state.db.conn().await?;
    if !people::revoke_api_token(&mut conn, id, crate::now_ms()).await? {
        return Err(ApiError::NotFound);
    }
    drop(conn);
    actor
        .audit(
            state,
            "revoke_api_token",
            Some(&format!("token {id}")),
            None,
        )
        .await;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries older than this id (the last one of the previous page).
    pub before: Option<i64>,
    /// Entries on one page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only this user's entries (exact name).
    #[serde(default)]
    pub actor: Option<String>,
    /// Only this action (exact, e.g. `reset`, `create_user`).
    #[serde(default)]
    pub action: Option<String>,
    /// Only entries whose target contains this text (`vm 12`, a username).
    #[serde(default)]
    pub target: Option<String>,
}

/// The audit log, newest first; `?before=ID` pages back, `actor`, `action` and `target`
/// narrow it.
#[utoipa::path(
    get,
    operation_id = "audit_log",
    path = "/api/audit",
    tag = "people",
    params(AuditQuery),
    responses((status = 200, description = "Audit entries, newest first", body = [AuditView]))
)]
pub async fn audit(
    State(state): State<AppState>,
    _admin: Admin,
    QueryParams(query): QueryParams<AuditQuery>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    Ok(Json(audit_entries(&state, query).await?))
}

/// Both doors of `GET /api/audit`.
pub async fn audit_entries(
    state: &AppState,
    query: AuditQuery,
) -> Result<Vec<AuditView>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "from 1 to 1000"));
    }
    let blank_is_none =
        |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let filter = people::AuditFilter {
        before: query.before,
        limit,
        actor: blank_is_none(query.actor),
        action: blank_is_none(query.action),
        target: blank_is_none(query.target),
    };
    if filter.target.as_ref().is_some_and(|t| t.len() > 200) {
        return Err(ApiError::field("target", "at most 200 characters"));
    }
    let mut conn = state.db.conn().await?;
    Ok(people::audit_entries(&mut conn, &filter).await?)
}

/// The sign-in page's form (works without JavaScript).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct LoginForm {
    username: String,
    password: String,
}

/// `POST /auth/login` from the sign-in page: back to the fleet, or to the page with why.
#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "people",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the dashboard, or to the sign-in page with the reason")),
    security(())
)]
pub async fn form_login(
    State(state): State<AppState>,
    parts: Parts,
    FormBody(form): FormBody<LoginForm>,
) -> Result<axum::response::Redirect, ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    let from = accounts::source(&parts.extensions);
    let to = match accounts::login(&state, &session, &form.username, &form.password, &from).await {
        Ok(_) => "/",
        Err(LoginError::Invalid) => "/login?error=invalid",
        Err(LoginError::Throttled(_)) => "/login?error=throttled",
        Err(LoginError::Unavailable) => "/login?error=unavailable",
    };
    Ok(axum::response::Redirect::to(to))
}

#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "people",
    responses((status = 303, description = "To the sign-in page"))
)]
pub async fn form_logout(
    State(state): State<AppState>,
    parts: Parts,
) -> Result<axum::response::Redirect, ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    accounts::logout(&state, &session, &accounts::source(&parts.extensions)).await;
    Ok(axum::response::Redirect::to("/login"))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct SetupForm {
    setup_code: String,
    username: String,
    password: String,
}

#[utoipa::path(
    post,
    path = "/auth/setup",
    tag = "people",
    request_body(content = SetupForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "To the dashboard, or back to the setup page with the reason")),
    security(())
)]
pub async fn form_setup(
    State(state): State<AppState>,
    parts: Parts,
    FormBody(form): FormBody<SetupForm>,
) -> Result<axum::response::Redirect, ApiError> {
    same_origin(&parts)?;
    let session = session_of(&parts)?;
    let from = accounts::source(&parts.extensions);
    let result = accounts::setup(
        &state,
        &session,
        &Secret::new(form.setup_code),
        &form.username,
        &Secret::new(form.password),
        &from,
    )
    .await;
    let to = match result {
        Ok(_) => "/",
        Err(SetupError::Done) => "/login",
        Err(SetupError::WrongCode) => "/setup?error=code",
        Err(SetupError::Invalid(..)) => "/setup?error=invalid",
        Err(SetupError::Unavailable) => "/setup?error=unavailable",
    };
    Ok(axum::response::Redirect::to(to))
}
