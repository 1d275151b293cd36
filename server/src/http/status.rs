//! `/api/status`: fleet counts, and the status thresholds read and changed at run time.

use super::error::ApiError;
use super::extract::{Admin, JsonBody, Viewer};
use crate::cache::refresh as refresh_cache;
use crate::db::store;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use domain::status::{StatusConfig, StatusCounts, validate_config};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
pub struct StatusSummary {
    counts: StatusCounts,
    config: StatusConfig,
}

pub async fn summary(
    State(state): State<AppState>,
    _viewer: Viewer,
) -> Result<Json<StatusSummary>, ApiError> {
    let vms = super::fleet(&state).await?;
    Ok(Json(StatusSummary {
        counts: StatusCounts::from_statuses(vms.iter().map(|v| v.status)),
        config: state.status_config.get(),
    }))
}

pub async fn get_config(State(state): State<AppState>, _viewer: Viewer) -> Json<StatusConfig> {
    Json(state.status_config.get())
}

/// A partial update: fields left out keep their current value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    cpu_threshold: Option<f64>,
    ram_threshold: Option<f64>,
    disk_threshold: Option<f64>,
    stale_timeout_ms: Option<i64>,
    report_interval_seconds: Option<i64>,
}

/// The configuration now in force, and how many VMs changed status under it.
#[derive(Serialize)]
pub struct ConfigUpdated {
    config: StatusConfig,
    changed_vms: usize,
}

/// Saves the new thresholds and re-judges every VM under them at once.
pub async fn put_config(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(patch): JsonBody<ConfigPatch>,
) -> Result<Json<ConfigUpdated>, ApiError> {
    let current = state.status_config.get();
    let updated = StatusConfig {
        cpu_threshold: patch.cpu_threshold.unwrap_or(current.cpu_threshold),
        ram_threshold: patch.ram_threshold.unwrap_or(current.ram_threshold),
        disk_threshold: patch.disk_threshold.unwrap_or(current.disk_threshold),
        stale_timeout_ms: patch.stale_timeout_ms.unwrap_or(current.stale_timeout_ms),
        report_interval_seconds: patch
            .report_interval_seconds
            .unwrap_or(current.report_interval_seconds),
    };
    validate_config(&updated).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let now = crate::now_ms();
    let changed = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        store::save_status_config(&mut conn, &updated, now).await?;
        state.status_config.set(updated.clone());
        let rows = store::list_rows(&mut conn).await?;
        let verdicts = crate::scheduler::judge(&rows, &updated, now);
        store::apply_verdicts(&mut conn, &verdicts, now).await?
    };
    refresh_cache(&state.db, &state.cache, &changed).await;
    tracing::info!(
        config = ?updated,
        changed_vms = changed.len(),
        by = %actor.who.name,
        "status configuration updated"
    );
    actor
        .audit(
            &state,
            "configure",
            Some("status thresholds"),
            Some(&format!("{updated:?}")),
        )
        .await;
    Ok(Json(ConfigUpdated {
        config: updated,
        changed_vms: changed.len(),
    }))
}
