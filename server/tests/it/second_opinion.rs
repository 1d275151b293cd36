//! The second opinion before a power action and the escalation ladder, through the real
//! server against the fake Proxmox: guest-agent pings, I/O counters, io-error, a token
//! without the guest-agent privilege, a guest that ignores ACPI.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm, GuestAgent};
use crate::proxmox::{history, report_vm, start, vm, wait_active, wait_rounds};
use serde_json::Value;
use std::time::{Duration, Instant};

async fn events(srv: &TestServer) -> Vec<Value> {
    srv.get("/api/remediation").await.1["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn evidence(attempt: &Value) -> Value {
    serde_json::from_str(attempt["evidence_json"].as_str().unwrap()).unwrap()
}

async fn phase_of(srv: &TestServer, id: i64, phase: &str) -> Value {
    wait_for(phase, Duration::from_secs(20), || async {
        let v = vm(srv, id).await;
        (v["remediation_phase"] == phase).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_whose_agent_answers_is_not_reset_and_says_why() {
    let mut alive = FakeVm::running(100, "pve1");
    alive.guest_agent = GuestAgent::Answers;
    let fake = FakePve::start(vec![alive]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let v = phase_of(&srv, id, "agent_silent").await;
    assert_eq!(v["status"], "down");
    assert!(
        v["phase_reason"]
            .as_str()
            .unwrap()
            .contains("guest agent answered"),
        "{v}"
    );
    let kinds: Vec<Value> = events(&srv)
        .await
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert!(kinds.contains(&Value::from("agent_silent")), "{kinds:?}");
    let h = history(&srv, id).await;
    assert_eq!(h[0]["outcome"], "left_alone");
    assert_eq!(
        evidence(&h[0])["evidence"]["guest_agent"]["result"],
        "answered"
    );
    // It stays so: rounds go by without a power action or another look.
    wait_rounds(&srv, 20).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    assert!(
        !fake
            .calls()
            .iter()
            .filter(|c| c.path.ends_with("/agent/ping"))
            .count()
            > 1,
        "one look, then the state holds"
    );
    // Its agent reports again: healthy, the state ends.
    report_vm(&srv, 100, "pve1", 6000).await;
    let v = vm(&srv, id).await;
    assert_eq!(
        (v["status"].clone(), v["remediation_phase"].clone()),
        ("healthy".into(), "ok".into())
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn io_without_a_guest_agent_is_life_under_strict_and_not_under_lenient() {
    for (setting, reset) in [("strict", false), ("lenient", true)] {
        let mut busy = FakeVm::running(100, "pve1");
        busy.agent = false;
        busy.io_moving = true;
        let fake = FakePve::start(vec![busy]).await;
        let mut srv = start(Backend::Sqlite, &fake, &[("HANG_EVIDENCE", setting)]).await;
        let id = report_vm(&srv, 100, "pve1", 5000).await;
        if reset {
            wait_for("the first rung", Duration::from_secs(20), || async {
                (!fake.posts().is_empty()).then_some(())
            })
            .await;
            assert_eq!(fake.posts(), vec!["reboot 100"]);
        } else {
            let v = phase_of(&srv, id, "agent_silent").await;
            assert!(v["phase_reason"].as_str().unwrap().contains("I/O"), "{v}");
            let e = evidence(&history(&srv, id).await[0]);
            assert_eq!(e["evidence"]["guest_agent"]["result"], "not_configured");
            assert!(
                fake.calls()
                    .iter()
                    .all(|c| !c.path.ends_with("/agent/ping")),
                "no ping to a guest without agent: 1"
            );
            wait_rounds(&srv, 10).await;
            assert!(fake.posts().is_empty(), "{setting}: {:?}", fake.posts());
        }
        srv.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_guest_is_rebooted_with_its_evidence_and_a_slow_agent_delays_no_other_vm() {
    // The guest agent of 100 never answers: Proxmox gives up after 10 s.
    let mut hung = FakeVm::running(100, "pve1");
    hung.guest_agent = GuestAgent::Silent(Duration::from_secs(10));
    // On another node: two stale VMs of one node would trip the breaker (rightly).
    let other = FakeVm::running(101, "pve2");
    let fake = FakePve::start(vec![hung, other]).await;
    let mut srv = start(
        Backend::Sqlite,
        &fake,
        &[
            ("GUEST_AGENT_TIMEOUT_MS", "15000"),
            ("STORM_PERCENT", "100"),
        ],
    )
    .await;
    let a = report_vm(&srv, 100, "pve1", 5000).await;
    let b = report_vm(&srv, 101, "pve2", 5000).await;
    wait_active(&srv).await;
    // Keep 101 alive until 100's ping is under way, then let it go silent.
    let ping_started = wait_for("the guest-agent ping", Duration::from_secs(20), || async {
        report_vm(&srv, 101, "pve2", 5000).await;
        fake.calls()
            .iter()
            .any(|c| c.path == "/nodes/pve1/qemu/100/agent/ping")
            .then(Instant::now)
    })
    .await;
    let silent_from = Instant::now();
    let down = wait_for("101 to be judged down", Duration::from_secs(20), || async {
        (vm(&srv, b).await["status"] == "down").then(Instant::now)
    })
    .await;
    assert!(
        down.duration_since(silent_from) < Duration::from_millis(1500 + 1000),
        "101 was judged down {:?} after its last report, stale timeout 1.5 s",
        down.duration_since(silent_from)
    );
    assert!(
        down.duration_since(ping_started) < Duration::from_secs(10),
        "detection waited for the other VM's guest agent"
    );
    assert!(fake.posts().is_empty(), "100's ping has not answered yet");
    // The ping times out; with no I/O, 100 gets the first rung, its evidence kept.
    let h = wait_for(
        "100's reboot to be recorded",
        Duration::from_secs(30),
        || async {
            let h = history(&srv, a).await;
            h.iter().any(|r| r["action"] == "reboot").then_some(h)
        },
    )
    .await;
    let reboot = h.iter().find(|r| r["action"] == "reboot").unwrap();
    let e = evidence(reboot);
    assert_eq!(e["evidence"]["guest_agent"]["result"], "timed_out");
    assert!(
        e["decision"].as_str().unwrap().contains("no sign of life"),
        "{e}"
    );
    assert!(
        e["evidence"]["second"]["Ok"]["io"]["diskwrite"].is_u64(),
        "{e}"
    );
    assert!(fake.posts().contains(&"reboot 100".to_owned()));
    let forms = fake.state.lock().unwrap().forms.clone();
    assert_eq!(
        forms[0], "timeout=60",
        "the graceful reboot's deadline goes to Proxmox"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_stopped_on_an_io_error_is_never_reset() {
    let mut broken = FakeVm::running(100, "pve1");
    broken.qmpstatus = "io-error";
    let fake = FakePve::start(vec![broken]).await;
    let mut srv = start(Backend::Postgres, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let v = phase_of(&srv, id, "guest_fault").await;
    assert!(
        v["phase_reason"].as_str().unwrap().contains("io-error"),
        "{v}"
    );
    let kinds: Vec<Value> = events(&srv)
        .await
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert!(kinds.contains(&Value::from("guest_fault")), "{kinds:?}");
    wait_rounds(&srv, 10).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_guest_agent_privilege_the_decision_falls_back_and_says_so() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.deny("/vms", "VM.GuestAgent.Audit");
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let h = wait_for("the first rung", Duration::from_secs(20), || async {
        let h = history(&srv, id).await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    let e = evidence(&h[0]);
    assert_eq!(e["evidence"]["guest_agent"]["result"], "unavailable");
    assert_eq!(e["evidence"]["guest_agent"]["detail"], "permission");
    assert!(
        e["decision"]
            .as_str()
            .unwrap()
            .contains("unavailable: permission"),
        "{e}"
    );
    let ping = fake
        .calls()
        .into_iter()
        .find(|c| c.path.ends_with("/agent/ping"))
        .unwrap();
    assert_eq!(ping.status, 403);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_that_ignores_the_acpi_reboot_gets_a_reset_next() {
    let mut deaf = FakeVm::running(100, "pve1");
    deaf.ignores_acpi = true;
    let fake = FakePve::start(vec![deaf]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    wait_for("the reset rung", Duration::from_secs(30), || async {
        (fake.posts().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(fake.posts(), vec!["reboot 100", "reset 100"]);
    let h = history(&srv, id).await;
    let reboot = h.iter().find(|r| r["action"] == "reboot").unwrap();
    assert_eq!(reboot["outcome"], "failed");
    assert!(
        reboot["error"]
            .as_str()
            .unwrap()
            .contains("powerdown failed"),
        "{reboot}"
    );
    srv.stop().await;
}
