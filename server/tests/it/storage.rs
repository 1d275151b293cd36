//! Stored enums: the database refuses unknown values, and one that gets in anyway (an older
//! or newer version, a hand edit) stops remediation for that fleet instead of resetting.

use crate::both_backends;
use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use diesel_async::SimpleAsyncConnection;
use serde_json::json;
use std::time::Duration;

async fn exec(srv: &TestServer, sql: &str) -> Result<(), String> {
    let mut conn = srv.state().db.conn().await.unwrap();
    server::with_conn!(conn, |c| c.batch_execute(sql).await).map_err(|e| e.to_string())
}

fn drop_phase_check(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "DROP TRIGGER vms_remediation_phase_check_update",
        Backend::Postgres => "ALTER TABLE vms DROP CONSTRAINT vms_remediation_phase_check",
    }
}

async fn unknown_values_are_refused_and_never_reset(backend: Backend) {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut env: Vec<(&str, String)> = fake.env();
    env.extend([
        ("SCHEDULER_INTERVAL_MS", "100".to_owned()),
        ("STALE_TIMEOUT_MS", "1500".to_owned()),
        ("REPORT_INTERVAL_SECONDS", "1".to_owned()),
        ("LINK_REFRESH_MS", "200".to_owned()),
    ]);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let srv = TestServer::start(backend, &refs).await;
    let mut report = report_for("guest-100");
    report["vmid"] = json!(100);
    let (status, body) = srv.report(&report).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();

    for sql in [
        format!("UPDATE vms SET remediation_phase = 'rebooting' WHERE id = {id}"),
        format!("UPDATE vms SET status = 'dead' WHERE id = {id}"),
        format!("UPDATE vms SET proxmox_type = 'vmware' WHERE id = {id}"),
        format!(
            "INSERT INTO reset_attempts (vm_id, action, trigger_source, mode, outcome, created_ms) \
             VALUES ({id}, 'destroy', 'scheduler', 'live', 'pending', 0)"
        ),
        format!(
            "INSERT INTO reset_attempts (vm_id, action, trigger_source, mode, outcome, created_ms) \
             VALUES ({id}, 'reset', 'scheduler', 'live', 'maybe', 0)"
        ),
    ] {
        let refused = exec(&srv, &sql).await;
        assert!(refused.is_err(), "accepted: {sql}");
    }

    // With the check gone, an unknown phase gets in: the VM must be left alone.
    exec(&srv, drop_phase_check(backend)).await.unwrap();
    exec(
        &srv,
        &format!("UPDATE vms SET remediation_phase = 'rebooting' WHERE id = {id}"),
    )
    .await
    .unwrap();
    let target = srv.state().engine.ticks() + 40;
    wait_for(
        "engine rounds past the stale timeout",
        Duration::from_secs(30),
        || async { (srv.state().engine.ticks() >= target).then_some(()) },
    )
    .await;
    assert!(
        fake.posts().is_empty(),
        "reset sent for an unreadable state: {:?}",
        fake.posts()
    );
}
both_backends!(unknown_values_are_refused_and_never_reset);
