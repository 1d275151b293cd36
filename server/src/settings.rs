//! The status configuration in force, shared by ingest, the scheduler and the API.

use domain::status::StatusConfig;
use std::sync::{Arc, RwLock};

/// Replaced as a whole when an operator changes it.
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
