//! Remediation: an operator's reset or shutdown, acknowledging a VM, and the recent events.

use super::error::ApiError;
use super::extract::{Actor, Operator, Viewer, VmPath};
use crate::actions;
use crate::db::incidents;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use domain::view::{Event, RemediationSummary};
use domain::{AttemptId, PowerAction, RemediationPhase, VmId};
use serde::Serialize;

/// A power action that was sent; its outcome lands in the VM's reset history.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PowerAccepted {
    attempt_id: AttemptId,
    action: PowerAction,
}

async fn power(
    state: &AppState,
    actor: Actor,
    id: VmId,
    action: PowerAction,
) -> Result<(StatusCode, Json<PowerAccepted>), ApiError> {
    // History records who asked: the signed-in user or the token's owner.
    let attempt_id = actions::power(state, &actor.who.name, &actor.from, id, action).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(PowerAccepted { attempt_id, action }),
    ))
}

#[utoipa::path(
    post,
    path = "/api/vms/{id}/reset",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 202, description = "Sent; the outcome lands in the reset history", body = PowerAccepted))
)]
pub async fn reset(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
) -> Result<(StatusCode, Json<PowerAccepted>), ApiError> {
    power(&state, actor, id, PowerAction::Reset).await
}

#[utoipa::path(
    post,
    path = "/api/vms/{id}/shutdown",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 202, description = "Sent; the outcome lands in the reset history", body = PowerAccepted))
)]
pub async fn shutdown(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
) -> Result<(StatusCode, Json<PowerAccepted>), ApiError> {
    power(&state, actor, id, PowerAction::Shutdown).await
}

/// Holds the automatic power action announced for a VM (its veto window): nothing is sent
/// and the VM waits for an operator. 409 when none is announced.
#[utoipa::path(
    post,
    path = "/api/vms/{id}/hold",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 204, description = "Held"))
)]
pub async fn hold(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
) -> Result<StatusCode, ApiError> {
    actions::hold(&state, &actor.who.name, &actor.from, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Acknowledged {
    vm_id: VmId,
    remediation_phase: RemediationPhase,
}

/// Clears a VM's latched `manual` state so automatic remediation may act on it again.
#[utoipa::path(
    post,
    path = "/api/vms/{id}/acknowledge",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "Cleared", body = Acknowledged))
)]
pub async fn acknowledge(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
) -> Result<Json<Acknowledged>, ApiError> {
    actions::acknowledge(&state, &actor.who.name, &actor.from, id).await?;
    Ok(Json(Acknowledged {
        vm_id: id,
        remediation_phase: RemediationPhase::Ok,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RemediationOverview {
    summary: RemediationSummary,
    events: Vec<Event>,
}

/// The engine's state and the last hundred events.
#[utoipa::path(
    get,
    path = "/api/remediation",
    tag = "remediation",
    responses((status = 200, description = "The engine's state and recent events", body = RemediationOverview))
)]
pub async fn overview(
    State(state): State<AppState>,
    _viewer: Viewer,
) -> Result<Json<RemediationOverview>, ApiError> {
    let mut conn = state.db.conn().await?;
    let events = incidents::recent_events(&mut conn, 100).await?;
    Ok(Json(RemediationOverview {
        summary: state.engine.summary(crate::now_ms()),
        events,
    }))
}
