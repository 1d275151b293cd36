//! `GET /api/health`: storage, cache, background jobs and remediation at a glance.

use crate::cache::CacheHealth;
use crate::db::store;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use domain::view::RemediationSummary;
use serde::Serialize;

#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthReport {
    #[schema(schema_with = status_schema)]
    status: &'static str,
    database: ComponentHealth,
    #[schema(schema_with = redis_schema)]
    redis: &'static str,
    remediation: RemediationSummary,
    jobs: JobsHealth,
    version: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ComponentHealth {
    #[schema(schema_with = backend_schema)]
    backend: &'static str,
    ok: bool,
}

/// Seconds since each background job last did its work (`None`: not yet).
#[derive(Serialize, utoipa::ToSchema)]
struct JobsHealth {
    ok: bool,
    #[schema(required)]
    scheduler_round_age_s: Option<i64>,
    /// How long the last round took (its database work, mostly).
    #[schema(required)]
    scheduler_round_took_ms: Option<i64>,
    #[schema(required)]
    writer_commit_age_s: Option<i64>,
    /// Seconds since the notifier last read and queued (it stops when storage does).
    #[schema(required)]
    notifier_pass_age_s: Option<i64>,
    restarts: i64,
}

fn status_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    domain::openapi::string_enum(&["ok", "degraded", "unavailable"])
}

fn redis_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    domain::openapi::string_enum(&["not configured", "up", "down"])
}

fn backend_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    domain::openapi::string_enum(&["sqlite", "postgresql"])
}

fn age_s(now_ms: i64, mark_ms: i64) -> Option<i64> {
    (mark_ms > 0).then(|| now_ms.saturating_sub(mark_ms) / 1000)
}

/// What an anonymous caller learns: only whether the service is up.
// `deny_unknown_fields` only tells the document that nothing else is in it, so that the
// two answers below are told apart (serialization ignores it).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublicHealth {
    #[schema(schema_with = status_schema)]
    status: &'static str,
}

/// The details for a caller with a credential, the status alone for anyone else.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum HealthAnswer {
    Detailed(HealthReport),
    Public(PublicHealth),
}

/// 200 while storage answers and the scheduler runs, else 503 (a load balancer's signal).
/// Signed-in callers and tokens get the details; anyone else only the status.
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "service",
    responses((status = 200, description = "Storage answers and the scheduler runs (details for a signed-in caller or token)", body = HealthAnswer), (status = 503, description = "Not serving", body = HealthAnswer)),
    security(())
)]
pub async fn health(
    State(state): State<AppState>,
    parts: axum::http::request::Parts,
) -> (StatusCode, Json<HealthAnswer>) {
    let (code, report) = health_report(&state).await;
    let answer = match crate::accounts::principal(&state, &parts).await {
        Ok(Some(_)) => HealthAnswer::Detailed(report),
        _ => HealthAnswer::Public(PublicHealth {
            status: report.status,
        }),
    };
    (code, Json(answer))
}

async fn health_report(state: &AppState) -> (StatusCode, HealthReport) {
    let db_ok = match state.db.conn().await {
        Ok(mut conn) => store::ping(&mut conn).await.is_ok(),
        Err(_) => false,
    };
    let redis = match state.cache.health() {
        CacheHealth::InProcess => "not configured",
        CacheHealth::RedisUp => "up",
        CacheHealth::RedisDown => "down",
    };
    let now = crate::now_ms();
    // The scheduler runs every few seconds; ten missed rounds (or a minute) means it died.
    let interval_ms =
        i64::try_from(state.config.scheduler_interval.as_millis()).unwrap_or(i64::MAX);
    let round_limit_ms = interval_ms.saturating_mul(10).max(60_000);
    let last_round = state.health.last_round_ms();
    let scheduler_ok = last_round == 0 && now.saturating_sub(state.started_ms) < round_limit_ms
        || last_round > 0 && now.saturating_sub(last_round) < round_limit_ms;
    let jobs = JobsHealth {
        ok: scheduler_ok,
        scheduler_round_age_s: age_s(now, last_round),
        scheduler_round_took_ms: (last_round > 0).then(|| state.health.last_round_took_ms()),
        writer_commit_age_s: age_s(now, state.health.last_commit_ms()),
        notifier_pass_age_s: age_s(now, state.health.last_notifier_pass_ms()),
        restarts: state.health.restarts(),
    };
    let status = match (db_ok && jobs.ok, redis) {
        (false, _) => "unavailable",
        (true, "down") => "degraded",
        (true, _) => "ok",
    };
    let code = if db_ok && jobs.ok {
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
        remediation: state.engine.summary(now),
        jobs,
        version: env!("CARGO_PKG_VERSION"),
    };
    (code, body)
}
