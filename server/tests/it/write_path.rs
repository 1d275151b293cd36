//! The set-based write path (one statement per table per batch) stores exactly what the
//! one-VM-at-a-time reference stored: the same rows, statuses, status changes and incident
//! ends, with replayed older reports refreshing liveness but not the figures.

use crate::common::*;
use domain::status::StatusConfig;
use serde_json::{Value, json};
use server::db::{Db, store};
use server::ingest::{StatePath, Submission, write_batch_via};

const T0: i64 = 1_800_000_000_000;

fn beat(host: &str, cpu: f64, observed_ms: i64, received_ms: i64, extra: Value) -> Submission {
    let mut body = json!({
        "hostname": host,
        "os": "linux",
        "cpu_percent": cpu,
        "ram_used_bytes": 1_000_000_000i64,
        "ram_total_bytes": 4_000_000_000i64,
        "disks": [{"mount": "/", "used_bytes": 10_000_000_000i64, "total_bytes": 40_000_000_000i64}],
        "uptime_seconds": observed_ms / 1000 - T0 / 1000 + 60,
        "agent_version": "test",
        "observed_at": time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(observed_ms) * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
    });
    if let (Some(obj), Some(more)) = (body.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    let accepted =
        domain::heartbeat::parse_report(body.to_string().as_bytes(), received_ms).unwrap();
    Submission::fleet(accepted.heartbeat)
}

/// Batches that cross every branch: new VMs, several reports of one VM in a batch, a
/// replayed older report, thresholds crossed both ways, a VMID reported,
/// VMs back from down and from an incident.
fn batches() -> Vec<Vec<Submission>> {
    let hosts: Vec<String> = (0..40).map(|i| format!("vm-{i:02}")).collect();
    let mut all = Vec::new();
    all.push(
        hosts
            .iter()
            .map(|h| beat(h, 10.0, T0, T0, json!({})))
            .collect(),
    );
    let t1 = T0 + 30_000;
    let mut second = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        match i % 5 {
            0 => second.push(beat(h, 95.0, t1, t1, json!({}))),
            1 => {
                second.push(beat(h, 50.0, t1 - 1_000, t1, json!({})));
                second.push(beat(h, 20.0, t1, t1 + 5, json!({})));
            }
            // Replayed from a spool: older than what is stored.
            2 => second.push(beat(h, 99.0, T0 - 60_000, t1, json!({}))),
            3 => second.push(beat(
                h,
                12.0,
                t1,
                t1,
                json!({"vmid": 100 + i, "node": "pve1"}),
            )),
            _ => {}
        }
    }
    all.push(second);
    let t2 = T0 + 60_000;
    all.push(
        hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(i, h)| beat(h, if i % 4 == 0 { 15.0 } else { 85.0 }, t2, t2, json!({})))
            .collect(),
    );
    all
}

async fn run(backend: Backend, path: StatePath) -> (Vec<domain::view::VmView>, Vec<String>) {
    let test_db = fresh_db(backend).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    for (n, batch) in batches().into_iter().enumerate() {
        if n == 2 {
            // Some VMs are down or in an incident when their next reports arrive.
            let mut conn = db.conn().await.unwrap();
            server::with_conn!(conn, |c| {
                diesel_async::SimpleAsyncConnection::batch_execute(
                    c,
                    "UPDATE vms SET status = 'down', status_reason = 'stale' WHERE hostname IN ('vm-00', 'vm-04'); \
                     UPDATE vms SET remediation_phase = 'recovering', incident_attempts = 2, \
                     next_action_ms = 5, phase_reason = 'reset sent' WHERE hostname IN ('vm-00', 'vm-08', 'vm-09')",
                )
                .await
            })
            .unwrap();
        }
        let outcomes = write_batch_via(&db, &batch, &cfg, path).await.unwrap();
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    }
    let mut conn = db.conn().await.unwrap();
    let vms = store::list_vms(&mut conn).await.unwrap();
    let mut changes = Vec::new();
    for vm in &vms {
        for c in store::status_changes_for(&mut conn, vm.id).await.unwrap() {
            changes.push(format!("{} {c:?}", vm.hostname));
        }
    }
    (vms, changes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_set_based_write_stores_what_one_by_one_stored() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (set_vms, set_changes) = run(backend, StatePath::SetBased).await;
        let (ref_vms, ref_changes) = run(backend, StatePath::OneByOne).await;
        assert_eq!(set_vms.len(), 40);
        assert_eq!(set_vms, ref_vms, "{backend:?}: the VMs differ");
        assert_eq!(
            set_changes, ref_changes,
            "{backend:?}: the status changes differ"
        );

        // The scenario reached every branch it is meant to.
        let vm = |host: &str| set_vms.iter().find(|v| v.hostname == host).unwrap();
        assert_eq!(
            vm("vm-07").cpu_percent,
            Some(10.0),
            "a replay takes no figures"
        );
        assert_eq!(
            vm("vm-07").last_seen_ms,
            Some(T0 + 30_000),
            "but counts as alive"
        );
        assert_eq!(
            vm("vm-01").cpu_percent,
            Some(20.0),
            "the newest report of a batch wins"
        );
        assert_eq!(vm("vm-10").status, domain::VmStatus::Warning);
        assert!(
            set_changes.iter().any(|c| c.starts_with("vm-00 ")),
            "{set_changes:?}"
        );
        let phases: Vec<_> = ["vm-00", "vm-08", "vm-09"]
            .iter()
            .map(|h| (vm(h).remediation_phase, vm(h).incident_attempts))
            .collect();
        assert!(
            phases
                .iter()
                .any(|(p, _)| *p == domain::RemediationPhase::Ok)
                && phases
                    .iter()
                    .any(|(p, _)| *p != domain::RemediationPhase::Ok),
            "one incident ended by a report, one still open without one: {phases:?}"
        );
    }
}
