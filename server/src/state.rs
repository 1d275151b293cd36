//! The one application state shared by handlers, server functions and jobs.

use crate::auth::Credentials;
use crate::cache::StateCache;
use crate::config::Config;
use crate::db::Db;
use crate::ingest::Ingest;
use crate::remediation::Engine;
use app::types::StatusConfig;
use axum::extract::FromRef;
use leptos::prelude::LeptosOptions;
use std::sync::{Arc, RwLock};

/// The status configuration in force, replaced as a whole when an operator changes it.
#[derive(Clone)]
pub struct SharedStatusConfig(Arc<RwLock<StatusConfig>>);

impl SharedStatusConfig {
    pub fn new(cfg: StatusConfig) -> Self {
        Self(Arc::new(RwLock::new(cfg)))
    }

    pub fn get(&self) -> StatusConfig {
        match self.0.read() {
            Ok(cfg) => cfg.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, cfg: StatusConfig) {
        match self.0.write() {
            Ok(mut current) => *current = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
    }
}

#[derive(Clone, FromRef)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub inner: Arc<Inner>,
}

pub struct Inner {
    pub config: Config,
    pub db: Db,
    pub cache: Arc<StateCache>,
    pub credentials: Credentials,
    pub status_config: SharedStatusConfig,
    pub ingest: Ingest,
    pub engine: Arc<Engine>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}
