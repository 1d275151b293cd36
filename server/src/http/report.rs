//! `POST /api/health/report`: an agent's heartbeat, validated here and queued for the writer.

use super::error::ApiError;
use super::extract::{AgentBearer, RawBody};
use crate::ingest::Submission;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use domain::heartbeat::parse_report;
use domain::{VmId, VmStatus};
use serde::Serialize;

/// What an agent learns from a stored report: its id, its status, when to report next,
/// and which parts of the report were dropped.
#[derive(Serialize)]
pub struct ReportAccepted {
    vm_id: VmId,
    status: VmStatus,
    report_interval_seconds: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    /// The VM's own credential, in the answer to the report that enrolled it and nowhere
    /// else; the agent stores it and reports with it from then on.
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<String>,
}

pub async fn report(
    State(state): State<AppState>,
    AgentBearer(presented): AgentBearer,
    RawBody(body): RawBody,
) -> Result<
    (
        [(header::HeaderName, &'static str); 1],
        Json<ReportAccepted>,
    ),
    ApiError,
> {
    let accepted =
        parse_report(&body, crate::now_ms()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let warnings: Vec<String> = accepted.warnings.iter().map(ToString::to_string).collect();
    let stored = state
        .ingest
        .submit(Submission {
            report: accepted.heartbeat,
            presented,
        })
        .await?;
    if !warnings.is_empty() {
        tracing::info!(vm_id = %stored.vm_id, dropped = warnings.len(), "report stored without some of its parts");
    }
    Ok((
        // The answer may carry a credential: no cache may keep it.
        [(header::CACHE_CONTROL, "no-store")],
        Json(ReportAccepted {
            vm_id: stored.vm_id,
            status: stored.status,
            report_interval_seconds: state.status_config.get().report_interval_seconds,
            warnings,
            credential: stored.credential.map(|c| c.expose().to_owned()),
        }),
    ))
}
