//! The fleet as the page holds it: the last good snapshot, indexed by VM id for keyed rows.

use domain::VmId;
use domain::status::StatusCounts;
use domain::view::{FleetSnapshot, RemediationSummary, VmView};
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// One snapshot, with its VMs reachable by id so each table row can follow its own VM.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetModel {
    pub now_ms: i64,
    pub counts: StatusCounts,
    pub remediation: RemediationSummary,
    /// VM ids in display order, each once.
    pub order: Vec<VmId>,
    vms: HashMap<VmId, VmView>,
}

impl FleetModel {
    pub fn vm(&self, id: VmId) -> Option<&VmView> {
        self.vms.get(&id)
    }
}

impl From<&FleetSnapshot> for FleetModel {
    fn from(snapshot: &FleetSnapshot) -> Self {
        let mut order = Vec::with_capacity(snapshot.vms.len());
        let mut vms = HashMap::with_capacity(snapshot.vms.len());
        for vm in &snapshot.vms {
            // Keyed rows need unique keys: the first VM with an id wins.
            if let Entry::Vacant(slot) = vms.entry(vm.id) {
                order.push(vm.id);
                slot.insert(vm.clone());
            }
        }
        Self {
            now_ms: snapshot.now_ms,
            counts: snapshot.counts.clone(),
            remediation: snapshot.remediation.clone(),
            order,
            vms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{RemediationPhase, VmStatus};

    fn vm(id: i64, hostname: &str) -> VmView {
        VmView {
            id: VmId(id),
            hostname: hostname.into(),
            os: "linux".into(),
            machine_id: None,
            agent_version: None,
            status: VmStatus::Healthy,
            status_since_ms: 0,
            status_reason: String::new(),
            first_seen_ms: 0,
            last_seen_ms: None,
            observed_at_ms: None,
            cpu_percent: None,
            ram_used_bytes: None,
            ram_total_bytes: None,
            disk_used_bytes: None,
            disk_total_bytes: None,
            disk_max_percent: None,
            disks: Vec::new(),
            uptime_seconds: None,
            proxmox_node: None,
            proxmox_vmid: None,
            proxmox_type: None,
            proxmox_link_source: None,
            link_verified: false,
            auto_reset: true,
            remediation_phase: RemediationPhase::Ok,
            phase_reason: None,
            incident_attempts: 0,
            last_reset_ms: None,
            next_action_ms: None,
        }
    }

    #[test]
    fn keeps_the_server_order_and_one_row_per_id() {
        let snapshot = FleetSnapshot {
            now_ms: 5,
            vms: vec![vm(2, "b"), vm(1, "a"), vm(2, "duplicate")],
            ..FleetSnapshot::default()
        };
        let model = FleetModel::from(&snapshot);
        assert_eq!(model.now_ms, 5);
        assert_eq!(model.order, vec![VmId(2), VmId(1)]);
        assert_eq!(model.vm(VmId(2)).map(|v| v.hostname.as_str()), Some("b"));
        assert!(model.vm(VmId(3)).is_none());
    }
}
