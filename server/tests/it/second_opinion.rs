//! The second opinion before a power action and the escalation ladder, through the real
//! server against the fake Proxmox: guest-agent pings, I/O counters, io-error, a token
//! without the guest-agent privilege, a guest that ignores ACPI.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm, GuestAgent};
use crate::proxmox::{
    history, report_guest, report_vm, start, start_on, vm, wait_active, wait_rounds,
};
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
    let pings = fake
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/agent/ping"))
        .count();
    assert_eq!(pings, 1, "one look, then the state holds");
    assert_eq!(vm(&srv, id).await["remediation_phase"], "agent_silent");
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
            assert!(
                events(&srv)
                    .await
                    .iter()
                    .any(|e| e["kind"] == "agent_silent" && e["vm_id"] == id),
                "an agent_silent event"
            );
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

/// Settings under which a guest that never reports again climbs the ladder quickly.
const NEVER_BACK: &[(&str, &str)] = &[("RECOVERY_TIMEOUT_MS", "1500"), ("STORM_PERCENT", "100")];

/// Rungs of the VM's history, oldest first, with the time each was recorded.
async fn rungs(srv: &TestServer, id: i64) -> Vec<(String, i64)> {
    history(srv, id)
        .await
        .iter()
        .rev()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["created_ms"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_that_never_comes_back_climbs_every_rung_once_then_is_left_to_a_person() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, NEVER_BACK).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let v = phase_of(&srv, id, "manual").await;
    assert!(
        v["phase_reason"].as_str().unwrap().contains("3 of 3"),
        "{v}"
    );
    assert_eq!(
        fake.posts(),
        vec!["reboot 100", "reset 100", "stop 100", "start 100"]
    );
    let rungs = rungs(&srv, id).await;
    let actions: Vec<&str> = rungs.iter().map(|(a, _)| a.as_str()).collect();
    // The third rung is two actions: a stop, then a start once the stop's task ended.
    assert_eq!(actions, ["reboot", "reset", "stop", "start"], "{rungs:?}");
    // Each rung waits out the recovery window, then the doubling pause (300 ms, 600 ms).
    assert!(rungs[1].1 - rungs[0].1 >= 1500 + 300, "{rungs:?}");
    assert!(rungs[2].1 - rungs[1].1 >= 1500 + 600, "{rungs:?}");
    wait_rounds(&srv, 15).await;
    assert_eq!(
        fake.posts().len(),
        4,
        "manual is latched: nothing more is sent"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_in_the_middle_of_the_ladder_resumes_on_the_next_rung() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    // Recovery is waited for long enough to restart the server inside the window.
    let slow = [("RECOVERY_TIMEOUT_MS", "6000"), ("STORM_PERCENT", "100")];
    let mut srv = start(Backend::Postgres, &fake, &slow).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    phase_of(&srv, id, "recovering").await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    srv.stop().await;
    let mut srv = start_on(srv.db, &fake, NEVER_BACK).await;
    wait_for("the next rung", Duration::from_secs(40), || async {
        (fake.posts().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(fake.posts(), vec!["reboot 100", "reset 100"]);
    let actions: Vec<String> = rungs(&srv, id).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions, ["reboot", "reset"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_that_never_comes_back_is_rebooted_then_stopped_and_started() {
    let fake = FakePve::start(vec![FakeVm::container(200, "pve1")]).await;
    let mut srv = start(
        Backend::Sqlite,
        &fake,
        &[
            ("RECOVERY_TIMEOUT_MS", "1500"),
            ("STORM_PERCENT", "100"),
            ("MAX_RESET_ATTEMPTS", "2"),
        ],
    )
    .await;
    let id = report_guest(&srv, 200, "pve1", "lxc", 5000).await;
    phase_of(&srv, id, "manual").await;
    assert_eq!(fake.posts(), vec!["reboot 200", "stop 200", "start 200"]);
    let actions: Vec<String> = rungs(&srv, id).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions, ["reboot", "stop", "start"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_back_without_its_agent_ends_the_ladder_and_says_so() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, NEVER_BACK).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    phase_of(&srv, id, "recovering").await;
    // The rebooted guest's OS is up (guest agent answers, disks busy); our agent is not yet.
    fake.with_vm(100, |vm| {
        vm.guest_agent = GuestAgent::Answers;
        vm.io_moving = true;
    });
    let v = wait_for(
        "the incident to end on the guest's own signs",
        Duration::from_secs(20),
        || async {
            let v = vm(&srv, id).await;
            (v["remediation_phase"] != "recovering").then_some(v)
        },
    )
    .await;
    assert!(
        v["phase_reason"]
            .as_str()
            .unwrap()
            .contains("guest back, agent not yet"),
        "{v}"
    );
    assert!(
        events(&srv).await.iter().any(|e| e["kind"] == "guest_back"),
        "a guest_back event"
    );
    wait_rounds(&srv, 20).await;
    assert_eq!(fake.posts(), vec!["reboot 100"], "no further rung");
    srv.stop().await;
}
