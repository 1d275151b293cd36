//! The one application state shared by handlers, server functions and jobs.

use crate::auth::Credentials;
use crate::cache::StateCache;
use crate::config::Config;
use crate::db::Db;
use crate::health::JobHealth;
use crate::ingest::Ingest;
use crate::remediation::Engine;
use crate::settings::{SharedRemediation, SharedStatusConfig};
use axum::extract::FromRef;
use leptos::prelude::LeptosOptions;
use std::sync::Arc;

/// Cloned for every request that extracts it: one reference count, nothing more.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

/// What the dashboard's routes take from the state (only those routes pay for the copy).
impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.inner.leptos_options.clone()
    }
}

pub struct Inner {
    pub leptos_options: LeptosOptions,
    pub config: Config,
    pub db: Db,
    pub cache: Arc<StateCache>,
    pub credentials: Credentials,
    pub status_config: SharedStatusConfig,
    pub remediation: SharedRemediation,
    pub ingest: Ingest,
    pub engine: Arc<Engine>,
    pub health: JobHealth,
    /// Sends notifications (the background loop and the "send a test" button).
    pub deliverer: Arc<crate::delivery::Deliverer>,
    /// When this process started (epoch ms).
    pub started_ms: i64,
    /// Failed sign-ins per account and per address (per replica).
    pub login_throttle: crate::throttle::LoginThrottle,
    /// Reports per VM credential (per replica): one VM cannot flood the writer.
    pub report_limiter: governor::DefaultKeyedRateLimiter<String>,
    /// Reports without a VM credential or with one not yet admitted here, per client
    /// address (per replica).
    pub enrolment_limiter: governor::DefaultKeyedRateLimiter<String>,
    /// Which credentials `report_limiter` counts by.
    pub known_credentials: crate::enrolment::KnownCredentials,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}
