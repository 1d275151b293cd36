//! The dashboard's back end: app's server-only `Backend` trait, served from the shared state.

use crate::state::AppState;
use app::backend::{Backend, BoxFuture, RequestInfo};
use app::error::AppError;
use domain::status::StatusCounts;
use domain::view::FleetSnapshot;
use std::fmt::Display;

/// Answers the dashboard's server functions from [`AppState`]; web.rs provides it as context.
pub struct ServerBackend {
    state: AppState,
}

impl ServerBackend {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl Backend for ServerBackend {
    fn fleet<'a>(
        &'a self,
        caller: &'a RequestInfo,
    ) -> BoxFuture<'a, Result<FleetSnapshot, AppError>> {
        Box::pin(async move {
            let vms = crate::http::fleet(&self.state)
                .await
                .map_err(|err| unavailable("fleet", caller, err))?;
            let now_ms = crate::now_ms();
            Ok(FleetSnapshot {
                now_ms,
                remediation: self.state.engine.summary(now_ms),
                counts: StatusCounts::from_statuses(vms.iter().map(|v| v.status)),
                vms,
            })
        })
    }
}

/// Logs an internal failure with what was asked and by which request; the browser only learns
/// that the service is unavailable.
fn unavailable(what: &'static str, caller: &RequestInfo, err: impl Display) -> AppError {
    tracing::warn!(
        error = %err,
        call = what,
        method = %caller.method(),
        path = caller.uri().path(),
        "dashboard request failed"
    );
    AppError::Unavailable
}
