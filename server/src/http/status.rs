//! `/api/status`: fleet counts, and the status thresholds read and changed at run time.

use super::error::ApiError;
use super::extract::{Admin, JsonBody, Viewer};
use crate::db::store;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use domain::settings::{ProxmoxCheck, Settings};
use domain::status::{StatusConfig, StatusCounts};
use serde::{Deserialize, Serialize};

#[derive(Serialize, utoipa::ToSchema)]
pub struct StatusSummary {
    counts: StatusCounts,
    config: StatusConfig,
}

#[utoipa::path(
    get,
    path = "/api/status",
    tag = "service",
    responses((status = 200, description = "Counts by status", body = StatusSummary))
)]
pub async fn summary(
    State(state): State<AppState>,
    _viewer: Viewer,
) -> Result<Json<StatusSummary>, ApiError> {
    // Counted by the database: the fleet is never loaded to be counted.
    let counts = {
        let mut conn = state.db.conn().await?;
        store::status_counts(&mut conn).await?
    };
    Ok(Json(StatusSummary {
        counts,
        config: state.status_config.get(),
    }))
}

#[utoipa::path(
    get,
    path = "/api/status/config",
    tag = "service",
    responses((status = 200, description = "Thresholds and the stale timeout", body = StatusConfig))
)]
pub async fn get_config(State(state): State<AppState>, _viewer: Viewer) -> Json<StatusConfig> {
    Json(state.status_config.get())
}

/// A partial update: fields left out keep their current value.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    cpu_threshold: Option<f64>,
    ram_threshold: Option<f64>,
    disk_threshold: Option<f64>,
    stale_timeout_ms: Option<i64>,
    report_interval_seconds: Option<i64>,
}

/// The configuration now in force, and how many VMs changed status under it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ConfigUpdated {
    config: StatusConfig,
    changed_vms: usize,
}

/// Saves new thresholds (the rails unchanged) and re-judges every VM under them at once.
#[utoipa::path(
    put,
    path = "/api/status/config",
    tag = "service",
    request_body = ConfigPatch,
    responses((status = 200, description = "Saved and applied", body = ConfigUpdated))
)]
pub async fn put_config(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(patch): JsonBody<ConfigPatch>,
) -> Result<Json<ConfigUpdated>, ApiError> {
    let current = crate::configure::current(&state);
    let status = StatusConfig {
        cpu_threshold: patch.cpu_threshold.unwrap_or(current.status.cpu_threshold),
        ram_threshold: patch.ram_threshold.unwrap_or(current.status.ram_threshold),
        disk_threshold: patch
            .disk_threshold
            .unwrap_or(current.status.disk_threshold),
        stale_timeout_ms: patch
            .stale_timeout_ms
            .unwrap_or(current.status.stale_timeout_ms),
        report_interval_seconds: patch
            .report_interval_seconds
            .unwrap_or(current.status.report_interval_seconds),
    };
    let changed =
        crate::configure::save(&state, &actor.who.name, &actor.from, status.clone(), None).await?;
    Ok(Json(ConfigUpdated {
        config: status,
        changed_vms: changed.len(),
    }))
}

/// Every runtime setting: thresholds and the remediation rails.
#[utoipa::path(
    get,
    path = "/api/settings",
    tag = "service",
    responses((status = 200, description = "Every runtime setting", body = Settings))
)]
pub async fn get_settings(State(state): State<AppState>, _admin: Admin) -> Json<Settings> {
    Json(crate::configure::current(&state))
}

/// Asks Proxmox for its release and this monitor's privileges, and says in plain words what
/// it found (admins): the token's name appears, never its secret.
#[utoipa::path(
    get,
    path = "/api/proxmox/check",
    tag = "service",
    responses((status = 200, description = "What each check asked and found", body = ProxmoxCheck))
)]
pub async fn proxmox_check(State(state): State<AppState>, _admin: Admin) -> Json<ProxmoxCheck> {
    Json(crate::configure::test_proxmox(&state).await)
}

/// The settings after a change, and how many VMs changed status under them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SettingsUpdated {
    settings: Settings,
    changed_vms: usize,
}

/// Replaces every runtime setting at once; a bad field is a 400 naming it and saves nothing.
#[utoipa::path(
    put,
    path = "/api/settings",
    tag = "service",
    request_body = Settings,
    responses((status = 200, description = "Saved and applied", body = SettingsUpdated))
)]
pub async fn put_settings(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(settings): JsonBody<Settings>,
) -> Result<Json<SettingsUpdated>, ApiError> {
    let changed = crate::configure::save(
        &state,
        &actor.who.name,
        &actor.from,
        settings.status.clone(),
        Some(settings.remediation.clone()),
    )
    .await?;
    Ok(Json(SettingsUpdated {
        settings,
        changed_vms: changed.len(),
    }))
}
