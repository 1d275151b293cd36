//! `POST /api/health/report`: an agent's heartbeat, validated here and queued for the writer.

use super::error::ApiError;
use super::extract::{Agent, RawBody};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use domain::heartbeat::parse_report;
use domain::{VmId, VmStatus};
use serde::Serialize;

/// What an agent learns from a stored report: its id, its status and when to report next.
#[derive(Serialize)]
pub struct ReportAccepted {
    vm_id: VmId,
    status: VmStatus,
    report_interval_seconds: i64,
}

pub async fn report(
    State(state): State<AppState>,
    _agent: Agent,
    RawBody(body): RawBody,
) -> Result<Json<ReportAccepted>, ApiError> {
    let prepared =
        parse_report(&body, crate::now_ms()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let stored = state.ingest.submit(prepared).await?;
    Ok(Json(ReportAccepted {
        vm_id: stored.vm_id,
        status: stored.status,
        report_interval_seconds: state.status_config.get().report_interval_seconds,
    }))
}
