//! What a batch of heartbeats does to each VM's state: computed here, applied by storage.

use crate::enums::{RemediationPhase, VmStatus};
use crate::heartbeat::Heartbeat;
use crate::ids::VmId;
use crate::policy::{FreshReport, report_ends_incident};
use crate::status::{self, LatestReport, StatusConfig, Verdict};
use std::collections::BTreeMap;

/// What storage holds about a VM before the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredVm {
    pub status: VmStatus,
    pub status_since_ms: i64,
    pub observed_at_ms: Option<i64>,
    pub cpu_percent: Option<f64>,
    pub ram_used_bytes: Option<i64>,
    pub ram_total_bytes: Option<i64>,
    pub disk_max_percent: Option<f64>,
    pub uptime_seconds: Option<i64>,
    pub phase: RemediationPhase,
    pub attempts: i64,
    pub last_reset_ms: Option<i64>,
}

/// The new state of one VM after a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StateUpdate {
    /// The newest report is newer than what is stored, so it sets the live figures; a
    /// replayed older report only refreshes liveness.
    pub takes_figures: bool,
    pub last_seen_ms: i64,
    pub verdict: Verdict,
    pub status_since_ms: i64,
    /// `(from, to)` when the status changed.
    pub change: Option<(VmStatus, VmStatus)>,
    /// The reason, when this report ends the VM's remediation incident.
    pub ends_incident: Option<String>,
    /// What was seen, when the guest restarted by itself since its previous report.
    pub rebooted: Option<String>,
}

/// Per VM of a batch: the report with the newest observation and the newest receipt time.
pub fn newest_per_vm<'a>(batch: &[(VmId, &'a Heartbeat)]) -> BTreeMap<VmId, (&'a Heartbeat, i64)> {
    let mut newest: BTreeMap<VmId, (&Heartbeat, i64)> = BTreeMap::new();
    for &(id, report) in batch {
        let entry = newest.entry(id).or_insert((report, report.received_ms));
        entry.1 = entry.1.max(report.received_ms);
        if report.observed_ms >= entry.0.observed_ms {
            entry.0 = report;
        }
    }
    newest
}

/// Decides what `newest` (received last at `last_seen_ms`) changes for a stored VM.
pub fn plan(
    vm: &StoredVm,
    newest: &Heartbeat,
    last_seen_ms: i64,
    cfg: &StatusConfig,
) -> StateUpdate {
    plan_batch(vm, newest, &[newest], last_seen_ms, cfg)
}

/// Like `plan`, for a batch holding several reports of the VM: any of them may end its
/// incident (after a reset, a report spooled before the hang can carry the newest sample
/// time while the fresh one carries a guest clock that is behind).
pub fn plan_batch(
    vm: &StoredVm,
    newest: &Heartbeat,
    reports: &[&Heartbeat],
    last_seen_ms: i64,
    cfg: &StatusConfig,
) -> StateUpdate {
    let takes_figures = vm.observed_at_ms.is_none_or(|t| newest.observed_ms >= t);
    let latest = if takes_figures {
        LatestReport {
            last_seen_ms,
            cpu_percent: newest.cpu_percent,
            ram_used_bytes: newest.ram_used_bytes,
            ram_total_bytes: newest.ram_total_bytes,
            disk_max_percent: newest.disk_max_percent,
        }
    } else {
        LatestReport {
            last_seen_ms,
            cpu_percent: vm.cpu_percent.unwrap_or(newest.cpu_percent),
            ram_used_bytes: vm.ram_used_bytes.unwrap_or(newest.ram_used_bytes),
            ram_total_bytes: vm.ram_total_bytes.unwrap_or(newest.ram_total_bytes),
            disk_max_percent: vm.disk_max_percent,
        }
    };
    let verdict = status::evaluate(Some(&latest), cfg, last_seen_ms);
    let changed = vm.status != verdict.status;
    let ends_incident = reports
        .iter()
        .find(|r| {
            report_ends_incident(
                vm.phase,
                vm.attempts,
                vm.last_reset_ms,
                FreshReport {
                    observed_ms: r.observed_ms,
                    received_ms: r.received_ms,
                    uptime_seconds: r.uptime_seconds,
                },
            )
        })
        .map(|r| recovery_reason(vm.last_reset_ms, r.uptime_seconds, last_seen_ms));
    StateUpdate {
        takes_figures,
        last_seen_ms,
        status_since_ms: if changed {
            last_seen_ms
        } else {
            vm.status_since_ms
        },
        change: changed.then_some((vm.status, verdict.status)),
        verdict,
        rebooted: if takes_figures && ends_incident.is_none() {
            unexpected_reboot(vm, newest)
        } else {
            None
        },
        ends_incident,
    }
}

/// A guest that restarted without a power action of ours: a newer report whose uptime went
/// backwards, while no incident of ours was open and no action was sent since the previous
/// report. The uptime, not the guest's clock, decides (a clock stepped by NTP is no reboot).
pub fn unexpected_reboot(vm: &StoredVm, newest: &Heartbeat) -> Option<String> {
    let (previous_observed, previous_uptime) = (vm.observed_at_ms?, vm.uptime_seconds?);
    let ours = vm.phase != RemediationPhase::Ok
        || vm.attempts > 0
        || vm.last_reset_ms.is_some_and(|t| t >= previous_observed);
    // Whole seconds on both sides: one second of slack for the rounding.
    let backwards = newest.uptime_seconds.saturating_add(1) < previous_uptime;
    (newest.observed_ms > previous_observed && backwards && !ours).then(|| {
        format!(
            "unexpected reboot: uptime went from {previous_uptime}s to {}s with no power action of the monitor",
            newest.uptime_seconds
        )
    })
}

/// Says whether the guest visibly restarted (its uptime began after the reset). One that
/// reports again without having restarted is alive all the same and ends the incident, but
/// its record must not claim the power action worked.
fn recovery_reason(last_reset_ms: Option<i64>, uptime_seconds: i64, last_seen_ms: i64) -> String {
    match last_reset_ms {
        Some(reset)
            if uptime_seconds.saturating_mul(1000)
                <= last_seen_ms.saturating_sub(reset).saturating_add(60_000) =>
        {
            format!("recovered: reporting again after the reset (uptime {uptime_seconds}s)")
        }
        _ => format!("recovered: reporting again without a restart (uptime {uptime_seconds}s)"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;
    use crate::enums::OsKind;

    const NOW: i64 = 1_000_000_000;

    fn beat(observed_ms: i64, cpu: f64, uptime: i64) -> Heartbeat {
        Heartbeat {
            hostname: "web".into(),
            os: OsKind::Linux,
            machine_id: None,
            vmid: None,
            node: None,
            agent_version: None,
            cpu_percent: cpu,
            ram_used_bytes: 10,
            ram_total_bytes: 100,
            disks: Vec::new(),
            disk_used_bytes: 0,
            disk_total_bytes: 0,
            disk_max_percent: None,
            uptime_seconds: uptime,
            observed_ms,
            received_ms: NOW,
        }
    }

    fn stored(status: VmStatus) -> StoredVm {
        StoredVm {
            status,
            status_since_ms: 5,
            observed_at_ms: Some(NOW - 30_000),
            cpu_percent: Some(95.0),
            ram_used_bytes: Some(10),
            ram_total_bytes: Some(100),
            disk_max_percent: None,
            uptime_seconds: Some(1000),
            phase: RemediationPhase::Ok,
            attempts: 0,
            last_reset_ms: None,
        }
    }

    #[test]
    fn plan_table() {
        let cfg = StatusConfig::default();
        let fresh = plan(&stored(VmStatus::Down), &beat(NOW, 5.0, 10), NOW, &cfg);
        assert!(fresh.takes_figures);
        assert_eq!(fresh.change, Some((VmStatus::Down, VmStatus::Healthy)));
        assert_eq!(fresh.status_since_ms, NOW);
        assert_eq!(fresh.ends_incident, None);

        // A replayed older report keeps the stored (hot) figures but refreshes liveness.
        let replay = plan(
            &stored(VmStatus::Down),
            &beat(NOW - 60_000, 5.0, 10),
            NOW,
            &cfg,
        );
        assert!(!replay.takes_figures);
        assert_eq!(replay.verdict.status, VmStatus::Warning);

        let unchanged = plan(&stored(VmStatus::Healthy), &beat(NOW, 5.0, 10), NOW, &cfg);
        assert_eq!((unchanged.change, unchanged.status_since_ms), (None, 5));
    }

    #[test]
    fn a_report_after_the_reset_ends_the_incident() {
        let cfg = StatusConfig::default();
        let recovering = StoredVm {
            phase: RemediationPhase::Recovering,
            attempts: 1,
            last_reset_ms: Some(NOW - 20_000),
            ..stored(VmStatus::Down)
        };
        let after = plan(&recovering, &beat(NOW, 5.0, 15), NOW, &cfg);
        assert_eq!(
            after.ends_incident.as_deref(),
            Some("recovered: reporting again after the reset (uptime 15s)")
        );
        // Spooled before the hang, replayed now: its uptime predates the reset too.
        let old = plan(&recovering, &beat(NOW - 30_000, 5.0, 100_000), NOW, &cfg);
        assert_eq!(
            old.ends_incident, None,
            "a replay from before the reset proves nothing"
        );
        // A guest whose clock is 100 s behind after the reset: its uptime says it restarted.
        let mut skewed = beat(NOW - 100_000, 5.0, 15);
        skewed.received_ms = NOW;
        let back = plan(&recovering, &skewed, NOW, &cfg);
        assert!(back.ends_incident.is_some(), "the uptime decides");
        // One batch: a report spooled before the hang (newest sample time, old uptime)
        // and the fresh one from a guest whose clock is behind.
        let spooled = beat(NOW - 25_000, 5.0, 100_000);
        let fresh = skewed.clone();
        let batch = plan_batch(&recovering, &spooled, &[&spooled, &fresh], NOW, &cfg);
        assert!(
            batch.ends_incident.is_some(),
            "any report of the batch may end it"
        );
        let no_restart = plan(&recovering, &beat(NOW, 5.0, 100_000), NOW, &cfg);
        assert_eq!(
            no_restart.ends_incident.as_deref(),
            Some("recovered: reporting again without a restart (uptime 100000s)")
        );
    }

    #[test]
    fn a_reboot_of_its_own_is_told_once_and_ours_never() {
        let cfg = StatusConfig::default();
        let up = StoredVm {
            uptime_seconds: Some(1000),
            ..stored(VmStatus::Healthy)
        };
        // Uptime 1000 s at the previous report; the next says 20 s.
        let rebooted = plan(&up, &beat(NOW, 5.0, 20), NOW, &cfg);
        assert!(
            rebooted
                .rebooted
                .as_deref()
                .unwrap()
                .contains("from 1000s to 20s"),
            "{rebooted:?}"
        );
        let table = [
            ("uptime grew", up.clone(), beat(NOW, 5.0, 1030), false),
            (
                "one second of rounding",
                up.clone(),
                beat(NOW, 5.0, 999),
                false,
            ),
            (
                "a replay of an older report",
                up.clone(),
                beat(NOW - 60_000, 5.0, 20),
                false,
            ),
            (
                "after our reset",
                StoredVm {
                    last_reset_ms: Some(NOW - 29_000),
                    ..up.clone()
                },
                beat(NOW, 5.0, 20),
                false,
            ),
            (
                "in an incident of ours",
                StoredVm {
                    phase: RemediationPhase::Recovering,
                    attempts: 1,
                    ..up.clone()
                },
                beat(NOW, 5.0, 20),
                false,
            ),
            (
                "no uptime stored yet",
                StoredVm {
                    uptime_seconds: None,
                    ..stored(VmStatus::Unknown)
                },
                beat(NOW, 5.0, 20),
                false,
            ),
            (
                "an old reset of ours is not this one",
                StoredVm {
                    last_reset_ms: Some(NOW - 3_600_000),
                    ..up.clone()
                },
                beat(NOW, 5.0, 20),
                true,
            ),
        ];
        for (what, vm, report, expected) in table {
            assert_eq!(
                plan(&vm, &report, NOW, &cfg).rebooted.is_some(),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn newest_observation_and_newest_receipt_per_vm() {
        let mut late = beat(NOW - 10, 1.0, 1);
        late.received_ms = NOW + 5;
        let early = beat(NOW, 2.0, 1);
        let batch = [(VmId(1), &late), (VmId(1), &early), (VmId(2), &early)];
        let newest = newest_per_vm(&batch);
        let (report, seen) = newest.get(&VmId(1)).unwrap();
        assert_eq!((report.cpu_percent, *seen), (2.0, NOW + 5));
        assert_eq!(newest.len(), 2);
    }
}
