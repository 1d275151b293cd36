//! `POST /api/health/report`: an agent's heartbeat, validated here and queued for the writer.

use super::error::ApiError;
use super::extract::{AgentBearer, ClientAddress, NO_STORE, NoStore, RawBody};
use crate::enrolment::Presented;
use crate::ingest::Submission;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use domain::heartbeat::parse_report;
use domain::{VmId, VmStatus};
use serde::Serialize;

/// What an agent learns from a stored report: its id, its status, when to report next,
/// and which parts of the report were dropped.
#[derive(Serialize, utoipa::ToSchema)]
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

#[utoipa::path(
    post,
    path = "/api/health/report",
    tag = "agents",
    // `Conventions` puts the heartbeat contract in place of this free-form body.
    request_body = Object,
    responses((status = 200, description = "Stored; names the VM and any parts of the report that were dropped", body = ReportAccepted)),
    security(("agent" = []))
)]
pub async fn report(
    State(state): State<AppState>,
    AgentBearer(presented): AgentBearer,
    ClientAddress(client): ClientAddress,
    RawBody(body): RawBody,
) -> Result<(NoStore, Json<ReportAccepted>), ApiError> {
    let known_credential = match &presented {
        Presented::Credential { hash } if state.known_credentials.contains(hash) => {
            within_rate(&state.report_limiter, hash)?;
            None
        }
        // Enrolments, made-up bearers and credentials not admitted here yet are counted
        // per client address (a credential against its own limit as well).
        Presented::Credential { hash } => {
            within_rate(&state.enrolment_limiter, &client)?;
            within_rate(&state.report_limiter, hash)?;
            Some(hash.clone())
        }
        Presented::FleetToken | Presented::EnrolmentToken { .. } => {
            within_rate(&state.enrolment_limiter, &client)?;
            None
        }
    };
    let accepted =
        parse_report(&body, crate::now_ms()).map_err(|e| ApiError::field(&e.field, e.message))?;
    let warnings: Vec<String> = accepted.warnings.iter().map(ToString::to_string).collect();
    let stored = state
        .ingest
        .submit(Submission {
            report: accepted.heartbeat,
            presented,
        })
        .await?;
    if let Some(hash) = known_credential {
        state.known_credentials.insert(&hash);
    }
    if !warnings.is_empty() {
        tracing::info!(vm_id = %stored.vm_id, dropped = warnings.len(), "report stored without some of its parts");
    }
    Ok((
        // The answer may carry a credential: no cache may keep it.
        NO_STORE,
        Json(ReportAccepted {
            vm_id: stored.vm_id,
            status: stored.status,
            report_interval_seconds: state.status_config.get().report_interval_seconds,
            warnings,
            credential: stored.credential.map(|c| c.expose().to_owned()),
        }),
    ))
}

/// Most distinct credentials the limiter keeps before it forgets idle ones (a spray of
/// made-up credentials must not grow it without bound).
const MAX_LIMITER_KEYS: usize = 200_000;

/// 429 when `key` (a credential's hash, or a client address) sends faster than its limit.
fn within_rate(
    limiter: &governor::DefaultKeyedRateLimiter<String>,
    key: &str,
) -> Result<(), ApiError> {
    if limiter.len() > MAX_LIMITER_KEYS {
        limiter.retain_recent();
    }
    limiter.check_key(&key.to_owned()).map_err(|not_until| {
        use governor::clock::Clock;
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        let seconds = i64::try_from(wait.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(1);
        ApiError::TooManyRequests(seconds)
    })
}
