//! The REST API: heartbeat ingest, fleet reads, history and runtime configuration.

use crate::auth::Role;
use crate::cache::CacheHealth;
use crate::db::incidents;
use crate::db::store::{self, MetricPoint, ResetAttempt, StatusChange};
use crate::error::ApiError;
use crate::ingest::{refresh_cache, IngestError};
use crate::proxmox::{GuestKind, PowerAction};
use crate::remediation::ActionError;
use crate::report::{parse_report, MAX_REPORT_BYTES};
use crate::state::AppState;
use crate::status::validate_config;
use app::types::{StatusConfig, StatusCounts, VmView};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route(
            "/api/health/report",
            post(report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)),
        )
        .route("/api/vms", get(list_vms))
        .route("/api/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/api/vms/{id}/metrics", get(metrics))
        .route("/api/vms/{id}/reset-history", get(reset_history))
        .route("/api/vms/{id}/reset", post(reset_vm))
        .route("/api/vms/{id}/shutdown", post(shutdown_vm))
        .route("/api/vms/{id}/acknowledge", post(acknowledge))
        .route("/api/vms/{id}/proxmox", put(link_vm))
        .route("/api/vms/{id}/auto-reset", put(set_auto_reset))
        .route("/api/remediation", get(remediation))
        .route("/api/status", get(status_summary))
        .route("/api/status/config", get(get_config).put(put_config))
        .route("/api/{*rest}", any(|| async { ApiError::NotFound }))
        // Other bodies are small JSON documents.
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
}

fn require(state: &AppState, role: Role, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.credentials.allows(role, headers) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::BadRequest("id: must be a positive integer".into()))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(MAX_REPORT_BYTES)
        } else {
            ApiError::BadRequest(format!("body: {}", rejection.body_text()))
        }
    })
}

#[derive(Serialize)]
struct HealthReport {
    status: &'static str,
    database: ComponentHealth,
    redis: &'static str,
    remediation: app::types::RemediationSummary,
    version: &'static str,
}

#[derive(Serialize)]
struct ComponentHealth {
    backend: &'static str,
    ok: bool,
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let db_ok = match state.db.conn().await {
        Ok(mut conn) => store::ping(&mut conn).await.is_ok(),
        Err(_) => false,
    };
    let redis = match state.cache.health() {
        CacheHealth::InProcess => "not configured",
        CacheHealth::RedisUp => "up",
        CacheHealth::RedisDown => "down",
    };
    let status = match (db_ok, redis) {
        (false, _) => "unavailable",
        (true, "down") => "degraded",
        (true, _) => "ok",
    };
    let code = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthReport {
        status,
        database: ComponentHealth {
            backend: state.db.backend_name(),
            ok: db_ok,
        },
        redis,
        remediation: state.engine.summary(crate::now_ms()),
        version: env!("CARGO_PKG_VERSION"),
    };
    (code, Json(body))
}

#[derive(Serialize)]
struct ReportAccepted {
    vm_id: i64,
    status: app::types::VmStatus,
    report_interval_seconds: i64,
}

async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReportAccepted>, ApiError> {
    require(&state, Role::Agent, &headers)?;
    let body = body_bytes(body)?;
    let prepared =
        parse_report(&body, crate::now_ms()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let stored = state
        .ingest
        .submit(prepared)
        .await
        .map_err(|err| match err {
            IngestError::Busy | IngestError::Unavailable => ApiError::Unavailable,
        })?;
    Ok(Json(ReportAccepted {
        vm_id: stored.vm_id,
        status: stored.status,
        report_interval_seconds: state.status_config.get().report_interval_seconds,
    }))
}

/// Every VM, from the cache when it is serving, else from the database.
pub async fn fleet(state: &AppState) -> Result<Vec<VmView>, ApiError> {
    let mut vms = match state.cache.snapshot().await {
        Some(vms) => vms,
        None => {
            let mut conn = state.db.conn().await?;
            store::list_vms(&mut conn).await?
        }
    };
    vms.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
    Ok(vms)
}

async fn list_vms(State(state): State<AppState>) -> Result<Json<Vec<VmView>>, ApiError> {
    Ok(Json(fleet(&state).await?))
}

#[derive(Serialize)]
struct VmDetail {
    #[serde(flatten)]
    vm: VmView,
    status_changes: Vec<StatusChange>,
}

async fn get_vm(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<VmDetail>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.db.conn().await?;
    let vm = store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let status_changes = store::status_changes_for(&mut conn, id).await?;
    Ok(Json(VmDetail { vm, status_changes }))
}

async fn delete_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&state, Role::Admin, &headers)?;
    let id = parse_id(&id)?;
    let deleted = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        store::delete_vm(&mut conn, id).await?
    };
    if !deleted {
        return Err(ApiError::NotFound);
    }
    state.cache.remove(id).await;
    tracing::info!(vm_id = id, "VM deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Longest history one request may cover, and most points it may ask for.
const MAX_RANGE_MS: i64 = 400 * 86_400_000;
const MAX_POINTS: i64 = 2_000;

#[derive(Serialize)]
struct MetricHistory {
    vm_id: i64,
    from_ms: i64,
    to_ms: i64,
    points: Vec<MetricPoint>,
}

async fn metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<MetricHistory>, ApiError> {
    let id = parse_id(&id)?;
    let now = crate::now_ms();
    let to_ms = time_param(&query, "to")?.unwrap_or(now);
    let from_ms = time_param(&query, "from")?.unwrap_or(to_ms - 86_400_000);
    if from_ms >= to_ms {
        return Err(ApiError::BadRequest("from: must be before to".into()));
    }
    if to_ms - from_ms > MAX_RANGE_MS {
        return Err(ApiError::BadRequest(
            "from: range longer than 400 days".into(),
        ));
    }
    let points = match query.get("points") {
        None => 300,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=MAX_POINTS).contains(p))
            .ok_or_else(|| ApiError::BadRequest("points: must be between 1 and 2000".into()))?,
    };
    let mut conn = state.db.conn().await?;
    store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let points = store::metric_history(&mut conn, id, from_ms, to_ms, points).await?;
    Ok(Json(MetricHistory {
        vm_id: id,
        from_ms,
        to_ms,
        points,
    }))
}

/// Accepts epoch milliseconds or an RFC 3339 time.
fn time_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(raw) = query.get(name) else {
        return Ok(None);
    };
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(Some(ms));
    }
    time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|_| {
            ApiError::BadRequest(format!("{name}: must be epoch milliseconds or RFC 3339"))
        })
}

async fn reset_history(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<ResetAttempt>>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.db.conn().await?;
    store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(store::reset_history(&mut conn, id).await?))
}

#[derive(Serialize)]
struct StatusSummary {
    counts: StatusCounts,
    config: StatusConfig,
}

async fn status_summary(State(state): State<AppState>) -> Result<Json<StatusSummary>, ApiError> {
    let vms = fleet(&state).await?;
    Ok(Json(StatusSummary {
        counts: StatusCounts::from_statuses(vms.iter().map(|v| v.status)),
        config: state.status_config.get(),
    }))
}

async fn get_config(State(state): State<AppState>) -> Json<StatusConfig> {
    Json(state.status_config.get())
}

/// A partial update: fields left out keep their current value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigPatch {
    cpu_threshold: Option<f64>,
    ram_threshold: Option<f64>,
    disk_threshold: Option<f64>,
    stale_timeout_ms: Option<i64>,
    report_interval_seconds: Option<i64>,
}

async fn put_config(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&state, Role::Admin, &headers)?;
    let body = body_bytes(body)?;
    let patch: ConfigPatch = parse_json(&body)?;
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
        store::reevaluate(&mut conn, &updated, now, false).await?
    };
    refresh_cache(&state.db, &state.cache, &changed).await;
    tracing::info!(config = ?updated, changed_vms = changed.len(), "status configuration updated");
    Ok(Json(
        json!({ "config": updated, "changed_vms": changed.len() }),
    ))
}

fn action_error(err: ActionError) -> ApiError {
    match err {
        ActionError::NotFound => ApiError::NotFound,
        ActionError::InFlight => {
            ApiError::Conflict("an action is already in flight for this VM".into())
        }
        ActionError::NotLinked => ApiError::Conflict(
            "the VM is not linked to a Proxmox guest; link it with PUT /api/vms/:id/proxmox".into(),
        ),
        ActionError::Unavailable(reason) => {
            ApiError::Conflict(format!("remediation is unavailable: {reason}"))
        }
        ActionError::Proxmox(e) => ApiError::BadGateway(format!("Proxmox refused: {e}")),
        ActionError::Db(e) => e.into(),
    }
}

/// The admin credential is the only one that can ask; history names it so.
const ADMIN_REQUESTER: &str = "admin token";

async fn power(
    state: AppState,
    headers: HeaderMap,
    id: String,
    action: PowerAction,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    require(&state, Role::Admin, &headers)?;
    let id = parse_id(&id)?;
    let attempt_id = state
        .engine
        .manual_action(id, action, ADMIN_REQUESTER)
        .await
        .map_err(action_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "attempt_id": attempt_id, "action": action.as_str() })),
    ))
}

async fn reset_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    power(state, headers, id, PowerAction::Reset).await
}

async fn shutdown_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    power(state, headers, id, PowerAction::Shutdown).await
}

async fn acknowledge(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&state, Role::Admin, &headers)?;
    let id = parse_id(&id)?;
    {
        let mut conn = state.db.conn().await?;
        store::get_vm(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound)?;
    }
    if !state.engine.acknowledge(id).await? {
        return Err(ApiError::Conflict(
            "the VM is not waiting for manual intervention".into(),
        ));
    }
    Ok(Json(json!({ "vm_id": id, "remediation_phase": "ok" })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    node: Option<String>,
    vmid: Option<i64>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Links a VM to a Proxmox guest by hand; `{"node": null, "vmid": null}` unlinks it.
async fn link_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VmView>, ApiError> {
    require(&state, Role::Admin, &headers)?;
    let id = parse_id(&id)?;
    let body = body_bytes(body)?;
    let request: LinkRequest = parse_json(&body)?;
    let link = match (request.node.as_deref(), request.vmid) {
        (None, None) => None,
        (Some(node), Some(vmid)) => {
            if node.is_empty()
                || node.len() > 63
                || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(ApiError::BadRequest(
                    "node: must be a Proxmox node name".into(),
                ));
            }
            if !(100..=999_999_999).contains(&vmid) {
                return Err(ApiError::BadRequest(
                    "vmid: must be between 100 and 999999999".into(),
                ));
            }
            let kind = request.kind.as_deref().unwrap_or("qemu");
            let kind = GuestKind::parse(kind)
                .ok_or_else(|| ApiError::BadRequest("type: must be qemu or lxc".into()))?;
            Some((node.to_owned(), vmid, kind))
        }
        _ => {
            return Err(ApiError::BadRequest(
                "node: give node and vmid together, or both null to unlink".into(),
            ))
        }
    };
    let mut conn = state.db.conn().await?;
    let found = match &link {
        Some((node, vmid, kind)) => {
            incidents::set_link(
                &mut conn,
                id,
                Some((node, *vmid, kind.as_str())),
                Some("manual"),
            )
            .await?
        }
        None => incidents::set_link(&mut conn, id, None, None).await?,
    };
    if !found {
        return Err(ApiError::NotFound);
    }
    let vm = store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    drop(conn);
    refresh_cache(&state.db, &state.cache, &[id]).await;
    Ok(Json(vm))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoResetRequest {
    enabled: bool,
}

async fn set_auto_reset(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&state, Role::Admin, &headers)?;
    let id = parse_id(&id)?;
    let body = body_bytes(body)?;
    let request: AutoResetRequest = parse_json(&body)?;
    let mut conn = state.db.conn().await?;
    if !incidents::set_auto_reset(&mut conn, id, request.enabled).await? {
        return Err(ApiError::NotFound);
    }
    drop(conn);
    refresh_cache(&state.db, &state.cache, &[id]).await;
    Ok(Json(json!({ "vm_id": id, "auto_reset": request.enabled })))
}

async fn remediation(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut conn = state.db.conn().await?;
    let events = incidents::recent_events(&mut conn, 100).await?;
    Ok(Json(
        json!({ "summary": state.engine.summary(crate::now_ms()), "events": events }),
    ))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            ApiError::BadRequest(format!("body: {inner}"))
        } else {
            ApiError::BadRequest(format!("{path}: {inner}"))
        }
    })
}
