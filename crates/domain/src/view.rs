//! What the pages and the REST API show: one shape for the browser and the server.

use crate::enums::{
    AttemptOutcome, EventKind, GuestKind, LinkSource, Mode, PowerAction, RemediationPhase,
    TriggerSource, UserRole, VmStatus,
};
use crate::ids::{AttemptId, NodeName, VmId, Vmid};
use crate::status::StatusCounts;
use serde::{Deserialize, Serialize};

/// One filesystem as the agent reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskUsage {
    pub mount: String,
    pub used_bytes: i64,
    pub total_bytes: i64,
}

/// The latest known state of one monitored VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmView {
    pub id: VmId,
    pub hostname: String,
    pub os: String,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub machine_id: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub agent_version: Option<String>,
    pub status: VmStatus,
    pub status_since_ms: i64,
    pub status_reason: String,
    pub first_seen_ms: i64,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub last_seen_ms: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub observed_at_ms: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub cpu_percent: Option<f64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub ram_used_bytes: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub ram_total_bytes: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_used_bytes: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_total_bytes: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_max_percent: Option<f64>,
    pub disks: Vec<DiskUsage>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub uptime_seconds: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_node: Option<NodeName>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_vmid: Option<Vmid>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_type: Option<GuestKind>,
    /// How the Proxmox link was found.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_link_source: Option<LinkSource>,
    /// False while the link is only a proposal waiting for an operator's approval: such a
    /// VM is never reset.
    pub link_verified: bool,
    /// False when an operator opted this VM out of automatic resets.
    pub auto_reset: bool,
    pub remediation_phase: RemediationPhase,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub phase_reason: Option<String>,
    pub incident_attempts: i64,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub last_reset_ms: Option<i64>,
    /// When the round looks at this VM again; in `reset_scheduled`, when the announced
    /// power action is sent unless an operator holds it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_action_ms: Option<i64>,
}

/// Whether automatic remediation is acting, and why not when it is not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemediationSummary {
    pub active: bool,
    /// `live`, `shadow` or `off`.
    pub mode: String,
    pub reason: String,
}

/// Who is signed in, as the pages show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedIn {
    pub username: String,
    pub role: UserRole,
}

/// How many VMs are in each remediation state worth a glance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseCounts {
    pub scheduled: u64,
    pub reset_pending: u64,
    pub recovering: u64,
    pub manual: u64,
    pub link_pending: u64,
}

/// Rows of the fleet table per page: a page of a large fleet renders and travels in
/// milliseconds; the summary above it still counts the whole fleet.
pub const FLEET_PAGE: usize = 200;

/// Everything the fleet page shows, taken at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    pub now_ms: i64,
    /// The whole fleet's, whatever the filter.
    pub counts: StatusCounts,
    pub phases: PhaseCounts,
    /// Every Proxmox node a VM is linked to, each once, in order (the node filter's choices).
    pub nodes: Vec<String>,
    /// One page (at most [`FLEET_PAGE`]) of the VMs the page's filter admits, in its order.
    pub vms: Vec<VmView>,
    /// How many VMs the filter admits in all, and the position of this page's first.
    pub matching: u64,
    pub offset: u64,
    pub remediation: RemediationSummary,
}

/// One downsampled point of a VM's metric history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricPoint {
    /// Earliest time in the point that held a sample.
    pub t_ms: i64,
    pub samples: i64,
    pub cpu_min: f64,
    pub cpu_avg: f64,
    pub cpu_max: f64,
    pub ram_percent_min: f64,
    pub ram_percent_avg: f64,
    pub ram_percent_max: f64,
    /// The fullest disk; absent when no sample in the point reported disks.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_percent_min: Option<f64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_percent_avg: Option<f64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub disk_percent_max: Option<f64>,
    pub uptime_max: i64,
}

impl From<crate::history::PointAggregate> for MetricPoint {
    fn from(p: crate::history::PointAggregate) -> Self {
        let disk = (p.disk.count > 0).then_some(p.disk);
        MetricPoint {
            t_ms: p.t_ms,
            samples: p.cpu.count,
            cpu_min: p.cpu.min,
            cpu_avg: p.cpu.avg().unwrap_or_default(),
            cpu_max: p.cpu.max,
            ram_percent_min: p.ram.min,
            ram_percent_avg: p.ram.avg().unwrap_or_default(),
            ram_percent_max: p.ram.max,
            disk_percent_min: disk.map(|d| d.min),
            disk_percent_avg: disk.and_then(|d| d.avg()),
            disk_percent_max: disk.map(|d| d.max),
            uptime_max: p.uptime_max,
        }
    }
}

/// A VM's metric history as a chart draws it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricHistory {
    pub vm_id: VmId,
    /// Start of the first point (aligned to the tier's rows).
    pub from_ms: i64,
    pub to_ms: i64,
    /// Where the points come from: raw samples, minute or hour rollups.
    pub tier: crate::history::Tier,
    /// The time one point covers; a missing point means the VM was silent.
    pub point_ms: i64,
    pub points: Vec<MetricPoint>,
}

/// Everything a VM's page shows besides its charts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmPage {
    pub now_ms: i64,
    pub vm: VmView,
    /// Newest first.
    pub status_changes: Vec<StatusChange>,
    /// Newest first.
    pub history: Vec<ResetAttempt>,
}

/// One recorded status change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusChange {
    pub id: i64,
    pub vm_id: VmId,
    pub from_status: VmStatus,
    pub to_status: VmStatus,
    pub at_ms: i64,
    pub reason: String,
}

/// One reset or shutdown attempt, as the history shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResetAttempt {
    pub id: AttemptId,
    pub vm_id: VmId,
    pub action: PowerAction,
    pub trigger_source: TriggerSource,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub requested_by: Option<String>,
    pub mode: Mode,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_node: Option<NodeName>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub proxmox_vmid: Option<Vmid>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub upid: Option<String>,
    pub outcome: AttemptOutcome,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    /// What the decision was based on (JSON), for automatic attempts.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub evidence_json: Option<String>,
    pub created_ms: i64,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub sent_ms: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub finished_ms: Option<i64>,
}

/// One fleet-level event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub id: i64,
    pub at_ms: i64,
    pub kind: EventKind,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub vm_id: Option<VmId>,
    pub message: String,
}
