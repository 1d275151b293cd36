//! Types shared by the server, the REST API and the browser.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A VM's health as the monitor judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Unknown,
    Healthy,
    Warning,
    Down,
}

impl VmStatus {
    pub const ALL: [VmStatus; 4] = [Self::Healthy, Self::Warning, Self::Down, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Warning => "warning",
            Self::Down => "down",
        }
    }

    /// Parses the stored form; anything unrecognised reads as `unknown`.
    pub fn parse(value: &str) -> Self {
        match value {
            "healthy" => Self::Healthy,
            "warning" => Self::Warning,
            "down" => Self::Down,
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One filesystem as the agent reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub mount: String,
    pub used_bytes: i64,
    pub total_bytes: i64,
}

/// The latest known state of one monitored VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub id: i64,
    pub hostname: String,
    pub os: String,
    pub machine_id: Option<String>,
    pub agent_version: Option<String>,
    pub status: VmStatus,
    pub status_since_ms: i64,
    pub status_reason: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: Option<i64>,
    pub observed_at_ms: Option<i64>,
    pub cpu_percent: Option<f64>,
    pub ram_used_bytes: Option<i64>,
    pub ram_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
    pub disk_max_percent: Option<f64>,
    pub disks: Vec<DiskUsage>,
    pub uptime_seconds: Option<i64>,
    pub proxmox_node: Option<String>,
    pub proxmox_vmid: Option<i64>,
    pub proxmox_type: Option<String>,
    /// How the Proxmox link was found: `report`, `smbios`, `name` or `manual`.
    pub proxmox_link_source: Option<String>,
    /// False when an operator opted this VM out of automatic resets.
    pub auto_reset: bool,
    pub remediation_phase: RemediationPhase,
    pub phase_reason: Option<String>,
    pub incident_attempts: i64,
    pub last_reset_ms: Option<i64>,
}

/// Where a VM stands in the auto-remediation cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemediationPhase {
    /// Nothing to do, or an incident waiting for its next attempt.
    Ok,
    /// A reset was decided and sent; its Proxmox task is being followed.
    ResetPending,
    /// The reset's task finished; waiting for the VM to report with a smaller uptime.
    Recovering,
    /// Automatic attempts are exhausted: an operator must look (acknowledge to clear).
    Manual,
}

impl RemediationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ResetPending => "reset_pending",
            Self::Recovering => "recovering",
            Self::Manual => "manual",
        }
    }

    pub fn parse(value: &str) -> Self {
        match value {
            "reset_pending" => Self::ResetPending,
            "recovering" => Self::Recovering,
            "manual" => Self::Manual,
            _ => Self::Ok,
        }
    }
}

/// Whether automatic remediation is acting, and why not when it is not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemediationSummary {
    pub active: bool,
    /// `live`, `shadow` or `off`.
    pub mode: String,
    pub reason: String,
}

/// How many VMs are in each status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub total: u64,
    pub healthy: u64,
    pub warning: u64,
    pub down: u64,
    pub unknown: u64,
}

impl StatusCounts {
    pub fn from_statuses(statuses: impl IntoIterator<Item = VmStatus>) -> Self {
        let mut counts = Self::default();
        for status in statuses {
            counts.total += 1;
            match status {
                VmStatus::Healthy => counts.healthy += 1,
                VmStatus::Warning => counts.warning += 1,
                VmStatus::Down => counts.down += 1,
                VmStatus::Unknown => counts.unknown += 1,
            }
        }
        counts
    }
}

/// Everything the fleet page shows, taken at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    pub now_ms: i64,
    pub counts: StatusCounts,
    pub vms: Vec<VmView>,
    pub remediation: RemediationSummary,
}

/// The thresholds and timeouts that decide a VM's status; editable at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
