//! Status policy: a pure function of (latest report, config, now), plus config validation.

use crate::enums::VmStatus;
use serde::{Deserialize, Serialize};

/// The thresholds and timeouts that decide a VM's status; editable at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusConfig {
    pub cpu_threshold: f64,
    pub ram_threshold: f64,
    pub disk_threshold: f64,
    pub stale_timeout_ms: i64,
    pub report_interval_seconds: i64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            cpu_threshold: 80.0,
            ram_threshold: 90.0,
            disk_threshold: 90.0,
            stale_timeout_ms: 300_000,
            report_interval_seconds: 30,
        }
    }
}

/// `part` as a percentage of `whole`; 0 when `whole` is not positive.
pub fn percent_of(part: i64, whole: i64) -> f64 {
    if whole <= 0 {
        return 0.0;
    }
    approx_f64(part) * 100.0 / approx_f64(whole)
}

/// A count as a float, for ratios and display. Exact up to 2^53 (8 PiB in bytes).
pub fn approx_f64(value: i64) -> f64 {
    #[expect(clippy::as_conversions, reason = "i64 to f64 has no lossless From")]
    let value = value as f64;
    value
}

/// How many VMs are in each status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusCounts {
    pub total: u64,
    pub healthy: u64,
    pub warning: u64,
    pub down: u64,
    pub unknown: u64,
}

impl StatusCounts {
    pub fn from_statuses(statuses: impl IntoIterator<Item = VmStatus>) -> Self {
        Self::from_tallies(statuses.into_iter().map(|s| (s, 1)))
    }

    /// From (status, how many) pairs, as a `GROUP BY status` answers.
    pub fn from_tallies(tallies: impl IntoIterator<Item = (VmStatus, u64)>) -> Self {
        let mut counts = Self::default();
        for (status, n) in tallies {
            counts.total += n;
            match status {
                VmStatus::Healthy => counts.healthy += n,
                VmStatus::Warning => counts.warning += n,
                VmStatus::Down => counts.down += n,
                VmStatus::Unknown => counts.unknown += n,
            }
        }
        counts
    }
}

/// The parts of a VM's latest report that decide its status.
#[derive(Clone, Debug, PartialEq)]
pub struct LatestReport {
    /// Server receive time of the last report; liveness never trusts the agent's clock.
    pub last_seen_ms: i64,
    pub cpu_percent: f64,
    pub ram_used_bytes: i64,
    pub ram_total_bytes: i64,
    /// The fullest filesystem's usage, in percent; `None` when no disk was reported.
    pub disk_max_percent: Option<f64>,
}

/// A status together with the reason a person would want to read.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub status: VmStatus,
    pub reason: String,
}

/// Decides a VM's status.
pub fn evaluate(latest: Option<&LatestReport>, cfg: &StatusConfig, now_ms: i64) -> Verdict {
    let Some(report) = latest else {
        return verdict(VmStatus::Unknown, "no report yet".into());
    };
    let silent_ms = now_ms.saturating_sub(report.last_seen_ms);
    if silent_ms >= cfg.stale_timeout_ms {
        return verdict(
            VmStatus::Down,
            format!("no heartbeat for {}s", silent_ms / 1000),
        );
    }
    let mut reasons = Vec::new();
    if report.cpu_percent > cfg.cpu_threshold {
        reasons.push(format!(
            "CPU {:.0}% > {:.0}%",
            report.cpu_percent, cfg.cpu_threshold
        ));
    }
    let ram_percent = percent_of(report.ram_used_bytes, report.ram_total_bytes);
    if ram_percent > cfg.ram_threshold {
        reasons.push(format!("RAM {ram_percent:.0}% > {:.0}%", cfg.ram_threshold));
    }
    if let Some(disk) = report.disk_max_percent.filter(|d| *d > cfg.disk_threshold) {
        reasons.push(format!("disk {disk:.0}% > {:.0}%", cfg.disk_threshold));
    }
    if reasons.is_empty() {
        verdict(VmStatus::Healthy, "reporting normally".into())
    } else {
        verdict(VmStatus::Warning, reasons.join(", "))
    }
}

fn verdict(status: VmStatus, reason: String) -> Verdict {
    Verdict { status, reason }
}

/// A configuration value out of range; `field` names it as the API spells it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidConfig {
    pub field: &'static str,
    pub message: String,
}

/// Checks every field of a status configuration.
pub fn validate_config(cfg: &StatusConfig) -> Result<(), InvalidConfig> {
    let percent = |field: &'static str, value: f64| {
        if value.is_finite() && (0.0..=100.0).contains(&value) {
            Ok(())
        } else {
            Err(InvalidConfig {
                field,
                message: "must be a percentage between 0 and 100".into(),
            })
        }
    };
    percent("cpu_threshold", cfg.cpu_threshold)?;
    percent("ram_threshold", cfg.ram_threshold)?;
    percent("disk_threshold", cfg.disk_threshold)?;
    if !(1_000..=7 * 86_400_000).contains(&cfg.stale_timeout_ms) {
        return Err(InvalidConfig {
            field: "stale_timeout_ms",
            message: "must be between 1000 (1 s) and 604800000 (7 days)".into(),
        });
    }
    if !(1..=86_400).contains(&cfg.report_interval_seconds) {
        return Err(InvalidConfig {
            field: "report_interval_seconds",
            message: "must be between 1 and 86400".into(),
        });
    }
    if cfg.report_interval_seconds * 1000 >= cfg.stale_timeout_ms {
        return Err(InvalidConfig {
            field: "stale_timeout_ms",
            message: "must be longer than report_interval_seconds".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;

    const NOW: i64 = 1_000_000_000;

    fn report(age_ms: i64, cpu: f64, ram_percent: i64, disk: Option<f64>) -> LatestReport {
        LatestReport {
            last_seen_ms: NOW - age_ms,
            cpu_percent: cpu,
            ram_used_bytes: ram_percent * 10,
            ram_total_bytes: 1000,
            disk_max_percent: disk,
        }
    }

    #[test]
    fn status_table() {
        let cfg = StatusConfig::default();
        let cases: Vec<(&str, Option<LatestReport>, VmStatus)> = vec![
            ("never reported", None, VmStatus::Unknown),
            (
                "fresh and idle",
                Some(report(0, 5.0, 20, Some(10.0))),
                VmStatus::Healthy,
            ),
            (
                "cpu at threshold",
                Some(report(0, 80.0, 20, None)),
                VmStatus::Healthy,
            ),
            (
                "cpu above",
                Some(report(0, 80.5, 20, None)),
                VmStatus::Warning,
            ),
            (
                "ram at threshold",
                Some(report(0, 1.0, 90, None)),
                VmStatus::Healthy,
            ),
            (
                "ram above",
                Some(report(0, 1.0, 91, None)),
                VmStatus::Warning,
            ),
            (
                "disk above",
                Some(report(0, 1.0, 10, Some(95.0))),
                VmStatus::Warning,
            ),
            (
                "disk at threshold",
                Some(report(0, 1.0, 10, Some(90.0))),
                VmStatus::Healthy,
            ),
            (
                "just fresh",
                Some(report(299_999, 1.0, 10, None)),
                VmStatus::Healthy,
            ),
            (
                "exactly stale",
                Some(report(300_000, 1.0, 10, None)),
                VmStatus::Down,
            ),
            (
                "stale and hot",
                Some(report(900_000, 99.0, 99, None)),
                VmStatus::Down,
            ),
            (
                "clock in future",
                Some(report(-60_000, 1.0, 10, None)),
                VmStatus::Healthy,
            ),
        ];
        for (name, latest, expected) in cases {
            let got = evaluate(latest.as_ref(), &cfg, NOW);
            assert_eq!(got.status, expected, "case {name}: {}", got.reason);
        }
    }

    #[test]
    fn warning_reason_names_every_breach() {
        let v = evaluate(
            Some(&report(0, 95.0, 95, Some(99.0))),
            &StatusConfig::default(),
            NOW,
        );
        assert_eq!(v.status, VmStatus::Warning);
        assert!(v.reason.contains("CPU") && v.reason.contains("RAM") && v.reason.contains("disk"));
    }

    #[test]
    fn thresholds_come_from_config() {
        let cfg = StatusConfig {
            cpu_threshold: 10.0,
            ..StatusConfig::default()
        };
        let latest = report(0, 20.0, 10, None);
        assert_eq!(evaluate(Some(&latest), &cfg, NOW).status, VmStatus::Warning);
        assert_eq!(
            evaluate(Some(&latest), &StatusConfig::default(), NOW).status,
            VmStatus::Healthy
        );
    }

    #[test]
    fn config_validation_table() {
        let ok = StatusConfig::default();
        assert_eq!(validate_config(&ok), Ok(()));
        let bad: Vec<(&str, StatusConfig)> = vec![
            (
                "cpu_threshold",
                StatusConfig {
                    cpu_threshold: 101.0,
                    ..ok.clone()
                },
            ),
            (
                "cpu_threshold",
                StatusConfig {
                    cpu_threshold: f64::NAN,
                    ..ok.clone()
                },
            ),
            (
                "ram_threshold",
                StatusConfig {
                    ram_threshold: -1.0,
                    ..ok.clone()
                },
            ),
            (
                "disk_threshold",
                StatusConfig {
                    disk_threshold: f64::INFINITY,
                    ..ok.clone()
                },
            ),
            (
                "stale_timeout_ms",
                StatusConfig {
                    stale_timeout_ms: 999,
                    ..ok.clone()
                },
            ),
            (
                "report_interval_seconds",
                StatusConfig {
                    report_interval_seconds: 0,
                    ..ok.clone()
                },
            ),
            (
                "stale_timeout_ms",
                StatusConfig {
                    stale_timeout_ms: 20_000,
                    report_interval_seconds: 30,
                    ..ok.clone()
                },
            ),
        ];
        for (field, cfg) in bad {
            assert_eq!(validate_config(&cfg).map_err(|e| e.field), Err(field));
        }
    }
}
