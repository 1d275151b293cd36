//! The settings in force (thresholds and remediation rails), shared by ingest, the scheduler,
//! the engine and the API; `configure.rs` changes them.

use crate::db::store::StoredSetting;
use domain::policy::RemediationConfig;
use domain::settings::{RemediationTuning, Settings};
use domain::status::StatusConfig;
use std::sync::{Arc, RwLock};

/// A value read by many and replaced as a whole when an admin changes it.
pub struct Shared<T>(Arc<RwLock<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Clone> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(RwLock::new(value)))
    }

    pub fn get(&self) -> T {
        match self.0.read() {
            Ok(value) => value.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, value: T) {
        match self.0.write() {
            Ok(mut current) => *current = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

pub type SharedStatusConfig = Shared<StatusConfig>;

/// The remediation configuration in force: the environment's, with the saved rails over it.
#[derive(Clone)]
pub struct SharedRemediation {
    base: Arc<RemediationConfig>,
    current: Shared<RemediationConfig>,
    /// Held while settings are saved or reloaded, so a reload that read the database before a
    /// save committed cannot put the older rails back over the newer ones.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl SharedRemediation {
    pub fn new(base: RemediationConfig) -> Self {
        Self {
            current: Shared::new(base.clone()),
            base: Arc::new(base),
            turn: Arc::default(),
        }
    }

    /// Taken around a save or a reload of the settings.
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    /// Puts the rails stored in the database in force: a row this version cannot read, or one
    /// that fails its checks, turns automatic remediation off (logged), never on.
    pub fn apply_stored(&self, stored: StoredSetting<RemediationTuning>) {
        match stored {
            StoredSetting::Absent => {}
            StoredSetting::Readable(tuning) => {
                let valid = Settings {
                    status: StatusConfig::default(),
                    remediation: tuning.clone(),
                }
                .validate();
                match valid {
                    Ok(()) => {
                        if tuning != self.tuning() {
                            self.tune(&tuning);
                        }
                    }
                    Err(err) => {
                        if self.get().enabled {
                            tracing::error!(error = %err, "stored remediation settings fail their checks; auto-reset is off until an admin saves them again");
                            self.fail_closed();
                        }
                    }
                }
            }
            StoredSetting::Unreadable => {
                if self.get().enabled {
                    tracing::error!(
                        "stored remediation settings cannot be read; auto-reset is off until an admin saves them again"
                    );
                    self.fail_closed();
                }
            }
        }
    }

    /// Automatic remediation off, the rest as the environment has it: what a stored setting
    /// this version cannot read, or that fails its checks, comes to. Never a reset on doubt.
    pub fn fail_closed(&self) {
        let mut cfg = (*self.base).clone();
        cfg.enabled = false;
        self.current.set(cfg);
    }

    pub fn get(&self) -> RemediationConfig {
        self.current.get()
    }

    pub fn tuning(&self) -> RemediationTuning {
        RemediationTuning::of(&self.current.get())
    }

    /// Puts `tuning` in force over the environment's configuration.
    pub fn tune(&self, tuning: &RemediationTuning) {
        self.current.set(tuning.apply(&self.base));
    }
}
