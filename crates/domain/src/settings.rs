//! What an admin changes at run time: thresholds and the remediation rails, checked whole
//! before anything is saved, each error naming the one field that is wrong.

use crate::enums::{AutoReset, Mode};
use crate::policy::RemediationConfig;
use crate::status::{StatusConfig, validate_config};
use serde::{Deserialize, Serialize};

/// The remediation rails that may change while the server runs. The rest (ladder, timings,
/// evidence) stay with the environment: they change how an attempt runs, not whether.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemediationTuning {
    pub auto_reset: AutoReset,
    /// Attempts per incident before the VM is latched `manual`.
    pub max_attempts: i64,
    /// Power actions in flight at once.
    pub max_concurrent: i64,
    /// Share of linked VMs down at once that pauses auto-reset.
    pub storm_percent: f64,
    /// Announcement before each automatic action; 0 sends at once.
    pub veto_seconds: i64,
}

impl RemediationTuning {
    /// The rails as `cfg` has them.
    pub fn of(cfg: &RemediationConfig) -> Self {
        Self {
            auto_reset: match (cfg.enabled, cfg.mode) {
                (false, _) => AutoReset::Off,
                (true, Mode::Shadow) => AutoReset::Shadow,
                (true, Mode::Live) => AutoReset::On,
            },
            max_attempts: cfg.max_attempts,
            max_concurrent: i64::try_from(cfg.max_concurrent).unwrap_or(i64::MAX),
            storm_percent: cfg.storm_percent,
            veto_seconds: cfg.veto_ms / 1000,
        }
    }

    /// `base` with these rails in force.
    pub fn apply(&self, base: &RemediationConfig) -> RemediationConfig {
        let mut cfg = base.clone();
        (cfg.enabled, cfg.mode) = match self.auto_reset {
            AutoReset::Off => (false, base.mode),
            AutoReset::Shadow => (true, Mode::Shadow),
            AutoReset::On => (true, Mode::Live),
        };
        cfg.max_attempts = self.max_attempts;
        cfg.max_concurrent = usize::try_from(self.max_concurrent).unwrap_or(1);
        cfg.storm_percent = self.storm_percent;
        cfg.veto_ms = self.veto_seconds.saturating_mul(1000);
        cfg
    }
}

/// Every runtime setting, as `GET /api/settings` answers and `PUT` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Settings {
    pub status: StatusConfig,
    pub remediation: RemediationTuning,
}

/// What a connection test found, in plain words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxmoxCheck {
    /// Whether every check passed.
    pub ok: bool,
    /// One line per check: what was asked and what came back.
    pub lines: Vec<String>,
}

/// One field that is wrong, named as the form and the API name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

impl Settings {
    /// The first field out of range, if any; nothing is saved unless every field passes.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_config(&self.status).map_err(|e| FieldError {
            field: format!("status.{}", e.field),
            message: e.message,
        })?;
        let r = &self.remediation;
        if !(1..=10).contains(&r.max_attempts) {
            return Err(field_error(
                "remediation.max_attempts",
                "must be between 1 and 10",
            ));
        }
        if !(1..=100).contains(&r.max_concurrent) {
            return Err(field_error(
                "remediation.max_concurrent",
                "must be between 1 and 100",
            ));
        }
        // The breaker trips above this share: at 100 it could never trip.
        if !(r.storm_percent.is_finite() && (1.0..=99.0).contains(&r.storm_percent)) {
            return Err(field_error(
                "remediation.storm_percent",
                "must be a percentage between 1 and 99",
            ));
        }
        if !(0..=3_600).contains(&r.veto_seconds) {
            return Err(field_error(
                "remediation.veto_seconds",
                "must be between 0 (off) and 3600",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn defaults() -> Settings {
        Settings {
            status: StatusConfig::default(),
            remediation: RemediationTuning::of(&RemediationConfig::default()),
        }
    }

    #[test]
    fn the_defaults_are_valid_and_round_trip() {
        let settings = defaults();
        assert_eq!(settings.validate(), Ok(()));
        assert_eq!(
            settings.remediation.apply(&RemediationConfig::default()),
            RemediationConfig::default()
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        type Spoil = fn(&mut Settings);
        let cases: &[(Spoil, &str)] = &[
            (|s| s.status.cpu_threshold = 150.0, "status.cpu_threshold"),
            (
                |s| s.status.cpu_threshold = f64::NAN,
                "status.cpu_threshold",
            ),
            (|s| s.status.ram_threshold = -1.0, "status.ram_threshold"),
            (
                |s| s.status.disk_threshold = f64::INFINITY,
                "status.disk_threshold",
            ),
            (|s| s.status.stale_timeout_ms = 0, "status.stale_timeout_ms"),
            // Shorter than the report interval: every VM would flap down between reports.
            (
                |s| s.status.stale_timeout_ms = 20_000,
                "status.stale_timeout_ms",
            ),
            (
                |s| s.status.report_interval_seconds = 0,
                "status.report_interval_seconds",
            ),
            (
                |s| s.remediation.max_attempts = 0,
                "remediation.max_attempts",
            ),
            (
                |s| s.remediation.max_concurrent = 1000,
                "remediation.max_concurrent",
            ),
            (
                |s| s.remediation.storm_percent = 0.0,
                "remediation.storm_percent",
            ),
            (
                |s| s.remediation.storm_percent = 100.0,
                "remediation.storm_percent",
            ),
            (
                |s| s.remediation.veto_seconds = -5,
                "remediation.veto_seconds",
            ),
        ];
        for (spoil, field) in cases {
            let mut settings = defaults();
            spoil(&mut settings);
            let err = settings.validate().unwrap_err();
            assert_eq!(err.field, *field, "{settings:?}: {err}");
        }
    }

    #[test]
    fn unknown_values_and_fields_are_refused_when_read() {
        let mut json = serde_json::to_value(defaults()).unwrap();
        json["remediation"]["auto_reset"] = "sometimes".into();
        assert!(serde_json::from_value::<Settings>(json).is_err());
        let mut json = serde_json::to_value(defaults()).unwrap();
        json["remediation"]["ladder"] = "reset".into();
        assert!(serde_json::from_value::<Settings>(json).is_err());
    }

    #[test]
    fn the_switch_maps_onto_enabled_and_mode() {
        let base = RemediationConfig::default();
        let mut tuning = RemediationTuning::of(&base);
        for (switch, enabled, mode) in [
            (AutoReset::Off, false, Mode::Live),
            (AutoReset::Shadow, true, Mode::Shadow),
            (AutoReset::On, true, Mode::Live),
        ] {
            tuning.auto_reset = switch;
            let cfg = tuning.apply(&base);
            assert_eq!((cfg.enabled, cfg.mode), (enabled, mode), "{switch}");
            assert_eq!(RemediationTuning::of(&cfg).auto_reset, switch);
        }
        tuning.veto_seconds = 0;
        assert_eq!(tuning.apply(&base).veto_ms, 0);
    }
}
