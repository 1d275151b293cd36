//! The REST API: its route table, and the fleet read the dashboard shares with it.
//!
//! Handlers are grouped by resource; [`extract`] holds what they take (caller, VM id, body)
//! and [`error`] the one mapping from failures to status codes.

pub mod enrolment;
pub mod error;
pub mod extract;
mod health;
mod live;
mod metrics;
pub mod notify;
pub mod openapi;
pub mod people;
mod remediation;
mod report;
mod status;
pub mod vms;

pub use error::ApiError;

use crate::db::store;
use crate::state::AppState;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post, put};
use domain::heartbeat::MAX_REPORT_BYTES;
use domain::view::VmView;
use tower::limit::GlobalConcurrencyLimitLayer;

/// The API's routes. `read_slots` bounds the history reads running at once (they hold a
/// database connection each): reads queue, they never starve the ingest writer.
pub fn router(read_slots: usize) -> Router<AppState> {
    let reads = GlobalConcurrencyLimitLayer::new(read_slots.max(1));
    Router::new()
        .route("/api/health", get(health::health))
        .route("/api/health/report", post(report::report))
        .route("/api/login", post(people::login))
        .route("/api/logout", post(people::logout))
        .route("/api/setup", post(people::setup))
        .route("/api/me", get(people::me))
        .route(
            "/api/users",
            get(people::list_users).post(people::create_user),
        )
        .route("/api/users/{id}", delete(people::delete_user))
        .route("/api/users/{id}/password", put(people::set_password))
        .route(
            "/api/tokens",
            get(people::list_api_tokens).post(people::create_api_token),
        )
        .route("/api/tokens/{id}", delete(people::revoke_api_token))
        .route("/api/audit", get(people::audit).layer(reads.clone()))
        .route("/auth/login", post(people::form_login))
        .route("/auth/logout", post(people::form_logout))
        .route("/auth/setup", post(people::form_setup))
        .route("/api/vms", get(vms::list))
        .route(
            "/api/vms/{id}",
            get(vms::get).layer(reads.clone()).delete(vms::delete),
        )
        .route(
            "/api/vms/{id}/metrics",
            get(vms::metrics).layer(reads.clone()),
        )
        .route(
            "/api/vms/{id}/reset-history",
            get(vms::reset_history).layer(reads.clone()),
        )
        .route("/api/vms/{id}/proxmox", put(vms::link))
        .route("/api/vms/{id}/proxmox/approve", post(vms::approve_link))
        .route("/api/vms/{id}/auto-reset", put(vms::set_auto_reset))
        .route(
            "/api/vms/{id}/credential",
            post(enrolment::rotate).delete(enrolment::revoke),
        )
        .route(
            "/api/enrolment-tokens",
            get(enrolment::list_tokens).post(enrolment::create_token),
        )
        .route(
            "/api/enrolment-tokens/{id}",
            delete(enrolment::revoke_token),
        )
        .route("/api/vms/{id}/reset", post(remediation::reset))
        .route("/api/vms/{id}/shutdown", post(remediation::shutdown))
        .route("/api/vms/{id}/acknowledge", post(remediation::acknowledge))
        .route("/api/vms/{id}/hold", post(remediation::hold))
        .route(
            "/api/remediation",
            get(remediation::overview).layer(reads.clone()),
        )
        .route("/api/live", get(live::stream))
        .route("/api/proxmox/check", get(status::proxmox_check))
        .route("/api/status", get(status::summary))
        .route(
            "/api/status/config",
            get(status::get_config).put(status::put_config),
        )
        .route(
            "/api/settings",
            get(status::get_settings).put(status::put_settings),
        )
        .route(
            "/api/vms/{id}/tags",
            get(notify::get_tags).put(notify::put_tags),
        )
        .route("/api/vms/{id}/snooze", post(notify::snooze))
        .route(
            "/api/notify/channels",
            get(notify::list_channels).post(notify::create_channel),
        )
        .route("/api/notify/channels/{id}", delete(notify::delete_channel))
        .route("/api/notify/channels/{id}/test", post(notify::test_channel))
        .route(
            "/api/notify/rules",
            get(notify::list_rules).post(notify::create_rule),
        )
        .route("/api/notify/rules/{id}", delete(notify::delete_rule))
        .route(
            "/api/notify/messages",
            get(notify::messages).layer(reads.clone()),
        )
        .route(
            "/api/maintenance",
            get(notify::list_windows).post(notify::create_window),
        )
        .route("/api/maintenance/{id}", delete(notify::delete_window))
        .route("/metrics", get(metrics::metrics).layer(reads.clone()))
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/docs", get(openapi::docs))
        .route("/api/{*rest}", any(|| async { ApiError::NotFound }))
        // Reports are the largest bodies; the rest are small JSON documents. `RawBody`
        // reports this limit when a body exceeds it.
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
}

/// Every VM, sorted by hostname: from the cache when it is serving, else from the database.
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
