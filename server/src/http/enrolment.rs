//! Agent credentials and enrolment tokens: issue, list and revoke (admin).
//!
//! Credentials and tokens are shown once, in the answer that creates them, and stored only
//! as hashes; every such answer says `Cache-Control: no-store`.

use super::error::{ApiError, FieldError};
use super::extract::{Actor, Admin, IdPath, JsonBody, NO_STORE, NoStore, VmPath, label};
use crate::auth;
use crate::db::identity::{self, NewToken, TokenRow};
use crate::enrolment::CREDENTIAL_PREFIX;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use domain::{GuestKind, NodeName, VmId, Vmid};
use serde::{Deserialize, Serialize};

/// Prefix of admin-created enrolment tokens.
const TOKEN_PREFIX: &str = "vmhc_enrol_";
const MAX_EXPIRY_HOURS: i64 = 24 * 366;
const MAX_USES: i64 = 100_000;

#[derive(Serialize, utoipa::ToSchema)]
pub struct IssuedCredential {
    vm_id: VmId,
    credential: String,
}

/// A new credential for a VM: the old one stops working at once. For a VM whose agent
/// must be moved to a new credential by hand (`vm-healthcheck-agent --set-credential`).
#[utoipa::path(
    post,
    operation_id = "rotate_credential",
    path = "/api/vms/{id}/credential",
    tag = "agents",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "A new credential for the VM's agent, shown this once", body = IssuedCredential))
)]
pub async fn rotate(
    State(state): State<AppState>,
    Admin(actor): Admin,
    VmPath(id): VmPath,
) -> Result<(NoStore, Json<IssuedCredential>), ApiError> {
    let secret = auth::generate_secret(CREDENTIAL_PREFIX);
    let stored = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        identity::rotate_credential(
            &mut conn,
            id,
            &auth::hash_token(secret.expose()),
            crate::now_ms(),
        )
        .await?
    };
    if !stored {
        return Err(ApiError::NotFound);
    }
    tracing::info!(vm_id = %id, by = %actor.who.name, "agent credential rotated");
    actor
        .audit(&state, "rotate_credential", Some(&format!("vm {id}")), None)
        .await;
    Ok((
        NO_STORE,
        Json(IssuedCredential {
            vm_id: id,
            credential: secret.expose().to_owned(),
        }),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Revoked {
    vm_id: VmId,
    revoked: usize,
}

/// Revokes a VM's credentials: its reports are refused (401) until it enrols again with
/// a valid enrolment token.
#[utoipa::path(
    delete,
    operation_id = "revoke_credential",
    path = "/api/vms/{id}/credential",
    tag = "agents",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "Revoked", body = Revoked))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(actor): Admin,
    VmPath(id): VmPath,
) -> Result<Json<Revoked>, ApiError> {
    let revoked = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        identity::revoke_credentials(&mut conn, id, crate::now_ms()).await?
    };
    tracing::info!(vm_id = %id, revoked, by = %actor.who.name, "agent credentials revoked");
    actor
        .audit(
            &state,
            "revoke_credential",
            Some(&format!("vm {id}")),
            Some(&format!("{revoked} revoked")),
        )
        .await;
    Ok(Json(Revoked { vm_id: id, revoked }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestBinding {
    pub node: String,
    pub vmid: i64,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub label: String,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8784)]
    pub expires_in_hours: Option<i64>,
    /// 1 for a token bound to a guest.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_uses: Option<i64>,
    /// Bind the token to one guest: the VM that enrols with it is linked to that guest.
    #[serde(default)]
    pub guest: Option<GuestBinding>,
}

/// An enrolment token as listed (never its value).
#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: i64,
    pub label: String,
    pub created_by: String,
    pub created_ms: i64,
    #[schema(required)]
    pub expires_ms: Option<i64>,
    #[schema(required)]
    pub max_uses: Option<i64>,
    pub uses: i64,
    #[schema(required)]
    pub last_used_ms: Option<i64>,
    #[schema(required)]
    pub revoked_ms: Option<i64>,
    #[schema(required)]
    pub guest: Option<GuestView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct GuestView {
    pub node: String,
    pub vmid: i64,
    #[serde(rename = "type")]
    pub kind: String,
}

impl From<TokenRow> for TokenView {
    fn from(row: TokenRow) -> Self {
        let guest = match (row.guest_node, row.guest_vmid, row.guest_type) {
            (Some(node), Some(vmid), Some(kind)) => Some(GuestView { node, vmid, kind }),
            _ => None,
        };
        TokenView {
            id: row.id,
            label: row.label,
            created_by: row.created_by,
            created_ms: row.created_ms,
            expires_ms: row.expires_ms,
            max_uses: row.max_uses,
            uses: row.uses,
            last_used_ms: row.last_used_ms,
            revoked_ms: row.revoked_ms,
            guest,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    pub token: String,
}

#[utoipa::path(
    post,
    operation_id = "create_enrolment_token",
    path = "/api/enrolment-tokens",
    tag = "agents",
    request_body = TokenRequest,
    responses((status = 201, description = "Created; the value is shown this once", body = CreatedToken))
)]
pub async fn create_token(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<(StatusCode, NoStore, Json<CreatedToken>), ApiError> {
    let created = issue_enrolment_token(&state, &actor, request).await?;
    Ok((StatusCode::CREATED, NO_STORE, Json(created)))
}

/// Both doors of `POST /api/enrolment-tokens`: the API and the add-VM page.
pub async fn issue_enrolment_token(
    state: &AppState,
    actor: &Actor,
    request: TokenRequest,
) -> Result<CreatedToken, ApiError> {
    let label = label(&request.label)?;
    let now = crate::now_ms();
    let expires_ms = match request.expires_in_hours {
        None => None,
        Some(h) if (1..=MAX_EXPIRY_HOURS).contains(&h) => Some(now.saturating_add(h * 3_600_000)),
        Some(_) => {
            return Err(ApiError::field(
                "expires_in_hours",
                format!("from 1 to {MAX_EXPIRY_HOURS}"),
            ));
        }
    };
    let guest = match &request.guest {
        None => None,
        Some(g) => {
            let node = NodeName::try_from(g.node.clone()).field("guest.node")?;
            let vmid = Vmid::try_from(g.vmid).field("guest.vmid")?;
            let kind = g
                .kind
                .as_deref()
                .unwrap_or("qemu")
                .parse::<GuestKind>()
                .ok()
                .ok_or_else(|| ApiError::field("guest.type", "must be qemu or lxc"))?;
            Some((node, vmid, kind))
        }
    };
    let max_uses = match (request.max_uses, &guest) {
        // A token for one guest enrols one VM.
        (None | Some(1), Some(_)) => Some(1),
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "max_uses",
                "a token bound to a guest enrols exactly one VM",
            ));
        }
        (None, None) => None,
        (Some(n), None) if (1..=MAX_USES).contains(&n) => Some(n),
        (Some(_), None) => {
            return Err(ApiError::field("max_uses", format!("from 1 to {MAX_USES}")));
        }
    };
    let secret = auth::generate_secret(TOKEN_PREFIX);
    let hash = auth::hash_token(secret.expose());
    let row = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        identity::create_token(
            &mut conn,
            &NewToken {
                token_hash: &hash,
                label,
                created_by: &actor.who.name,
                created_ms: now,
                expires_ms,
                max_uses,
                guest_node: guest.as_ref().map(|(n, _, _)| n.as_str()),
                guest_vmid: guest.as_ref().map(|(_, v, _)| v.get()),
                guest_type: guest.as_ref().map(|(_, _, k)| k.as_str()),
            },
        )
        .await?
    };
    tracing::info!(
        token_id = row.id,
        by = %actor.who.name,
        "enrolment token created"
    );
    actor
        .audit(
            state,
            "create_enrolment_token",
            Some(&format!("token {}", row.id)),
            Some(&row.label),
        )
        .await;
    Ok(CreatedToken {
        view: row.into(),
        token: secret.expose().to_owned(),
    })
}

#[utoipa::path(
    get,
    operation_id = "list_enrolment_tokens",
    path = "/api/enrolment-tokens",
    tag = "agents",
    responses((status = 200, description = "Enrolment tokens (never their values)", body = Vec<TokenView>))
)]
pub async fn list_tokens(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(enrolment_tokens(&state).await?))
}

pub async fn enrolment_tokens(state: &AppState) -> Result<Vec<TokenView>, ApiError> {
    let mut conn = state.db.conn().await?;
    let rows = identity::list_tokens(&mut conn).await?;
    Ok(rows.into_iter().map(TokenView::from).collect())
}

#[utoipa::path(
    delete,
    operation_id = "revoke_enrolment_token",
    path = "/api/enrolment-tokens/{id}",
    tag = "agents",
    params(("id" = i64, Path, description = "The enrolment token's id", minimum = 1)),
    responses((status = 204, description = "Revoked"))
)]
pub async fn revoke_token(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    withdraw_enrolment_token(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/enrolment-tokens/:id`.
pub async fn withdraw_enrolment_token(
    state: &AppState,
    actor: &Actor,
    id: i64,
) -> Result<(), ApiError> {
    let revoked = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        identity::revoke_token(&mut conn, id, crate::now_ms()).await?
    };
    if !revoked {
        return Err(ApiError::NotFound);
    }
    tracing::info!(token_id = id, by = %actor.who.name, "enrolment token revoked");
    actor
        .audit(
            state,
            "revoke_enrolment_token",
            Some(&format!("token {id}")),
            None,
        )
        .await;
    Ok(())
}
