//! The veto window: an automatic power action is announced with a countdown before it is
//! sent, an operator can hold it, a heartbeat cancels it, and a viewer cannot touch it.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::proxmox::{history, report_vm, start, vm, wait_rounds};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

async fn announced(srv: &TestServer, id: i64) -> Value {
    wait_for("the announced action", Duration::from_secs(20), || async {
        let v = vm(srv, id).await;
        (v["remediation_phase"] == "reset_scheduled").then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_announced_action_waits_out_its_window_then_is_sent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("RESET_VETO_SECONDS", "3")]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let v = announced(&srv, id).await;
    // Announced, not sent: the countdown is on the VM for every page and script to show.
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    let until = v["next_action_ms"].as_i64().unwrap();
    let left = until - server::now_ms();
    assert!((0..=3_000).contains(&left), "{left} ms left");
    assert!(
        v["phase_reason"]
            .as_str()
            .unwrap()
            .starts_with("reboot in 3 s unless held"),
        "{v}"
    );
    wait_for("the reboot", Duration::from_secs(20), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    assert!(server::now_ms() >= until, "sent before its window ended");
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    srv.stop().await;
}

async fn a_held_action_is_never_sent(backend: Backend) {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(backend, &fake, &[("RESET_VETO_SECONDS", "30")]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    announced(&srv, id).await;
    let hold = format!("/api/vms/{id}/hold");

    // A viewer's token cannot hold it.
    let viewer = token_for(&srv, "vera", "viewer").await;
    let operator = token_for(&srv, "otto", "operator").await;
    let (status, _) = srv.send(Method::POST, &hold, Some(&viewer), None).await;
    assert_eq!(status, 403);
    assert_eq!(vm(&srv, id).await["remediation_phase"], "reset_scheduled");

    let (status, body) = srv.send(Method::POST, &hold, Some(&operator), None).await;
    assert_eq!(status, 204, "{body}");
    let v = vm(&srv, id).await;
    assert_eq!(v["remediation_phase"], "manual", "{v}");
    assert_eq!(v["status"], "down");
    // Holding twice: nothing is announced any more.
    let (status, body) = srv.send(Method::POST, &hold, Some(&operator), None).await;
    assert_eq!(status, 409, "{body}");

    // Rounds go by; nothing reaches Proxmox and the VM waits for an operator.
    wait_rounds(&srv, 20).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    assert_eq!(vm(&srv, id).await["remediation_phase"], "manual");
    let h = history(&srv, id).await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["outcome"], "left_alone");
    assert_eq!(h[0]["requested_by"], "otto");
    let (_, overview) = srv.get("/api/remediation").await;
    assert!(
        overview["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reset_held"),
        "{overview}"
    );
    let (_, audit) = srv.get("/api/audit").await;
    let holds: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "hold")
        .collect();
    let outcomes: Vec<&str> = holds
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.contains(&"held"), "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o.starts_with("refused")),
        "{outcomes:?}"
    );

    // It recovers by itself: a heartbeat ends the incident.
    report_vm(&srv, 100, "pve1", 10).await;
    wait_for("the VM back to ok", Duration::from_secs(10), || async {
        (vm(&srv, id).await["remediation_phase"] == "ok").then_some(())
    })
    .await;
    srv.stop().await;
}
crate::both_backends!(a_held_action_is_never_sent);

/// A user with `role` and an API token of theirs.
async fn token_for(srv: &TestServer, username: &str, role: &str) -> String {
    let user =
        serde_json::json!({"username": username, "password": "long enough password", "role": role});
    let (status, body) = srv
        .send(Method::POST, "/api/users", Some(ADMIN_TOKEN), Some(user))
        .await;
    assert_eq!(status, 201, "{body}");
    let token = serde_json::json!({"username": username, "label": "test", "role": role});
    let (status, body) = srv
        .send(Method::POST, "/api/tokens", Some(ADMIN_TOKEN), Some(token))
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_during_the_window_cancels_the_action() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("RESET_VETO_SECONDS", "4")]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let v = announced(&srv, id).await;
    let until = v["next_action_ms"].as_i64().unwrap();
    report_vm(&srv, 100, "pve1", 5010).await;
    let v = vm(&srv, id).await;
    assert_eq!(v["remediation_phase"], "ok", "{v}");
    // Well past the announced time, the agent reporting on its interval: nothing was sent.
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    while server::now_ms() <= until + 1_000 {
        interval.tick().await;
        report_vm(&srv, 100, "pve1", 5011).await;
    }
    wait_rounds(&srv, 5).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    srv.stop().await;
}

/// A window shorter than the time the evidence takes still ends in the action: the round
/// that picked the VM counts, not the time the evidence came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_window_with_slow_evidence_still_acts() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(
        Backend::Sqlite,
        &fake,
        &[
            ("RESET_VETO_SECONDS", "1"),
            ("EVIDENCE_INTERVAL_MS", "2500"),
        ],
    )
    .await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    announced(&srv, id).await;
    wait_for("the reboot", Duration::from_secs(30), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    srv.stop().await;
}
