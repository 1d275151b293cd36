//! Remediation scenarios: the real server against the fake Proxmox.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const FAST: &[(&str, &str)] = &[
    ("SCHEDULER_INTERVAL_MS", "100"),
    ("STALE_TIMEOUT_MS", "1500"),
    ("REPORT_INTERVAL_SECONDS", "1"),
    ("LINK_REFRESH_MS", "200"),
    ("TASK_POLL_MS", "50"),
    ("RECOVERY_TIMEOUT_MS", "10000"),
    ("RESET_BACKOFF_MS", "300"),
    ("RECHECK_INTERVAL_MS", "300"),
    ("EVIDENCE_INTERVAL_MS", "200"),
    ("GUEST_AGENT_TIMEOUT_MS", "2000"),
    // No veto window unless a test is about it: the scenarios count rounds to the action.
    ("RESET_VETO_SECONDS", "0"),
];

pub(crate) fn env_for(fake: &FakePve, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = FAST
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.extend(fake.env().into_iter().map(|(k, v)| (k.to_string(), v)));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

pub(crate) async fn start(backend: Backend, fake: &FakePve, extra: &[(&str, &str)]) -> TestServer {
    let vars = env_for(fake, extra);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(backend, &refs).await
}

pub(crate) async fn start_on(db: TestDb, fake: &FakePve, extra: &[(&str, &str)]) -> TestServer {
    let vars = env_for(fake, extra);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start_on(db, &refs).await
}

/// A report from the VM with this VMID (the agent was told its VMID and node), whose link
/// to that QEMU guest an operator confirmed.
pub(crate) async fn report_vm(srv: &TestServer, vmid: i64, node: &str, uptime: i64) -> i64 {
    report_guest(srv, vmid, node, "qemu", uptime).await
}

/// Like `report_vm`, for a guest of `kind` (`qemu` or `lxc`).
pub(crate) async fn report_guest(
    srv: &TestServer,
    vmid: i64,
    node: &str,
    kind: &str,
    uptime: i64,
) -> i64 {
    let mut r = report_for(&format!("guest-{vmid}"));
    r["vmid"] = json!(vmid);
    r["node"] = json!(node);
    r["uptime_seconds"] = json!(uptime);
    let (status, body) = srv.report(&r).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    // A reported VMID is only a proposal; the operator's confirmation makes it a link.
    let (status, body) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{id}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": node, "vmid": vmid, "type": kind})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    id
}

pub(crate) async fn vm(srv: &TestServer, id: i64) -> Value {
    srv.get(&format!("/api/vms/{id}")).await.1
}

pub(crate) async fn history(srv: &TestServer, id: i64) -> Vec<Value> {
    srv.get(&format!("/api/vms/{id}/reset-history"))
        .await
        .1
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the engine has completed `n` more rounds.
pub(crate) async fn wait_rounds(srv: &TestServer, n: u64) {
    let target = srv.state().engine.ticks() + n;
    wait_for("engine rounds", Duration::from_secs(30), || async {
        (srv.state().engine.ticks() >= target).then_some(())
    })
    .await;
}

pub(crate) async fn wait_active(srv: &TestServer) {
    wait_for(
        "the start-up amnesty to end",
        Duration::from_secs(20),
        || async {
            let (_, h) = srv.get("/api/health").await;
            (h["remediation"]["active"] == true).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_vm_is_reset_once_and_recovers() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;

    wait_for("the reset", Duration::from_secs(15), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    let done = wait_for(
        "the task to be followed to OK",
        Duration::from_secs(10),
        || async {
            let h = history(&srv, id).await;
            (h.first()?["outcome"] == "ok").then_some(h)
        },
    )
    .await;
    assert_eq!(done.len(), 1);
    assert!(done[0]["upid"].as_str().unwrap().starts_with("UPID:pve1:"));
    assert_eq!(done[0]["trigger_source"], "scheduler");
    let evidence: Value = serde_json::from_str(done[0]["evidence_json"].as_str().unwrap()).unwrap();
    assert_eq!(evidence["proxmox"]["status"], "running");
    assert!(evidence["last_heartbeat_ms"].is_i64());
    assert_eq!(vm(&srv, id).await["remediation_phase"], "recovering");

    // No second reset inside the recovery window.
    wait_rounds(&srv, 8).await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);

    // Back with a smaller uptime: healthy, incident closed.
    report_vm(&srv, 100, "pve1", 4).await;
    let after = vm(&srv, id).await;
    assert_eq!(after["status"], "healthy");
    assert_eq!(after["remediation_phase"], "ok");
    assert_eq!(after["incident_attempts"], 0);
    assert!(
        after["phase_reason"]
            .as_str()
            .unwrap()
            .contains("recovered")
    );
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_resets_end_manual_and_stay_manual_across_restart() {
    let mut failing = FakeVm::running(100, "pve1");
    failing.task_exit =
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout".into();
    let fake = FakePve::start(vec![failing]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("MAX_RESET_ATTEMPTS", "3")]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;

    wait_for("the manual state", Duration::from_secs(30), || async {
        (vm(&srv, id).await["remediation_phase"] == "manual").then_some(())
    })
    .await;
    let attempts = history(&srv, id).await;
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a["outcome"] == "failed"));
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("can't lock file")
    );
    // Newest first: the pause doubles (300 ms, then 600 ms, after each task ended).
    let created: Vec<i64> = attempts
        .iter()
        .rev()
        .map(|a| a["created_ms"].as_i64().unwrap())
        .collect();
    assert!(created[1] - created[0] >= 300, "{created:?}");
    assert!(created[2] - created[1] >= 600, "{created:?}");
    assert_eq!(fake.posts().len(), 3);

    srv.stop().await;
    let mut srv = start_on(srv.db, &fake, &[("MAX_RESET_ATTEMPTS", "3")]).await;
    wait_active(&srv).await;
    wait_rounds(&srv, 8).await;
    assert_eq!(vm(&srv, id).await["remediation_phase"], "manual");
    assert_eq!(fake.posts().len(), 3, "manual is latched: no more resets");
    let page = srv.page("/").await;
    assert!(
        page.contains("phase manual"),
        "the dashboard shows the manual state"
    );

    let path = format!("/api/vms/{id}/acknowledge");
    assert_eq!(srv.send(Method::POST, &path, None, None).await.0, 401);
    assert_eq!(
        srv.send(Method::POST, &path, Some(AGENT_TOKEN), None)
            .await
            .0,
        401
    );
    let (status, body) = srv.send(Method::POST, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    let now = vm(&srv, id).await;
    assert_ne!(now["remediation_phase"], "manual");
    assert_eq!(now["incident_attempts"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_with_every_vm_stale_resets_nothing_during_amnesty() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve2"),
    ])
    .await;
    // Long enough to observe the amnesty on a loaded machine.
    let extra = [("STORM_PERCENT", "100"), ("STALE_TIMEOUT_MS", "6000")];
    let mut srv = start(Backend::Sqlite, &fake, &extra).await;
    report_vm(&srv, 100, "pve1", 100).await;
    report_vm(&srv, 101, "pve2", 100).await;
    srv.stop().await;
    let stale_at = server::now_ms() + 6000;
    wait_for("the VMs to be stale", Duration::from_secs(10), || async {
        (server::now_ms() > stale_at).then_some(())
    })
    .await;

    let restarted_at = server::now_ms();
    let mut srv = start_on(srv.db, &fake, &extra).await;
    wait_rounds(&srv, 5).await;
    // Silence across our own downtime proves nothing (the agents' reports were refused
    // or spooled): nobody is judged down during the amnesty, let alone reset.
    let (_, vms) = srv.get("/api/vms").await;
    assert!(
        server::now_ms() < restarted_at + 6000,
        "test too slow to observe the amnesty"
    );
    let statuses: Vec<&Value> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["status"])
        .collect();
    assert!(
        statuses.iter().all(|s| *s != "down"),
        "judged during the amnesty: {statuses:?}"
    );
    assert!(
        fake.posts().is_empty(),
        "reset during the amnesty: {:?}",
        fake.posts()
    );
    let (_, health) = srv.get("/api/health").await;
    assert!(
        health["remediation"]["reason"]
            .as_str()
            .unwrap()
            .contains("after start-up"),
        "{health}"
    );

    // After one stale timeout of normal running, hung VMs are judged and handled again.
    wait_for("both VMs down", Duration::from_secs(15), || async {
        let (_, vms) = srv.get("/api/vms").await;
        vms.as_array()?
            .iter()
            .all(|v| v["status"] == "down")
            .then_some(())
    })
    .await;
    wait_for(
        "resets after the amnesty",
        Duration::from_secs(15),
        || async { (fake.posts().len() == 2).then_some(()) },
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mass_staleness_pauses_auto_reset_until_the_fleet_recovers() {
    let nodes = ["pve1", "pve2", "pve1", "pve2", "pve3"];
    let vms = (0..5)
        .map(|i| FakeVm::running(100 + i as i64, nodes[i]))
        .collect();
    let fake = FakePve::start(vms).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let mut ids = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        ids.push(report_vm(&srv, 100 + i as i64, node, 5000).await);
    }
    let opt = |id: i64, enabled: bool| {
        let srv = &srv;
        async move {
            let path = format!("/api/vms/{id}/auto-reset");
            let body = json!({ "enabled": enabled });
            let (status, _) = srv
                .send(Method::PUT, &path, Some(ADMIN_TOKEN), Some(body))
                .await;
            assert_eq!(status, 200);
        }
    };
    // Held for a whole round of reports, so VMs silenced together fall silent together.
    let alive: Arc<tokio::sync::Mutex<HashSet<i64>>> =
        Arc::new(tokio::sync::Mutex::new((100..105).collect()));
    let (base, http) = (srv.base.clone(), srv.http.clone());
    let keeper = {
        let alive = alive.clone();
        tokio::spawn(async move {
            loop {
                let ids = alive.lock().await;
                for &vmid in ids.iter() {
                    let mut r = report_for(&format!("guest-{vmid}"));
                    r["vmid"] = json!(vmid);
                    let _ = http
                        .post(format!("{base}/api/health/report"))
                        .bearer_auth(AGENT_TOKEN)
                        .json(&r)
                        .send()
                        .await;
                }
                drop(ids);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    wait_active(&srv).await;
    let events = || async { srv.get("/api/remediation").await.1["events"].clone() };

    // 40 % stale: the breaker trips. The two are opted out while they fall silent, so
    // neither is reset in the moment the first is stale and the second not yet.
    opt(ids[0], false).await;
    opt(ids[1], false).await;
    alive.lock().await.retain(|v| *v > 101);
    wait_for("the breaker", Duration::from_secs(10), || async {
        let e = events().await;
        e.as_array()?
            .iter()
            .any(|e| e["kind"] == "breaker_tripped")
            .then_some(())
    })
    .await;
    opt(ids[0], true).await;
    opt(ids[1], true).await;
    wait_rounds(&srv, 8).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    let (_, health) = srv.get("/api/health").await;
    assert!(
        health["remediation"]["reason"]
            .as_str()
            .unwrap()
            .contains("paused"),
        "{health}"
    );

    // They come back: the breaker resets.
    alive.lock().await.extend([100, 101]);
    wait_for("the breaker to reset", Duration::from_secs(10), || async {
        let e = events().await;
        e.as_array()?
            .iter()
            .any(|e| e["kind"] == "breaker_reset")
            .then_some(())
    })
    .await;

    // One VM hangs alone: auto-reset acts again.
    alive.lock().await.remove(&104);
    wait_for("the single reset", Duration::from_secs(15), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    assert_eq!(fake.posts(), vec!["reboot 104"]);
    keeper.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_paused_template_locked_and_ha_vms_are_never_reset() {
    let mut stopped = FakeVm::running(100, "pve1");
    (stopped.status, stopped.qmpstatus) = ("stopped", "stopped");
    let mut paused = FakeVm::running(101, "pve2");
    paused.qmpstatus = "paused";
    let mut template = FakeVm::running(102, "pve3");
    template.template = true;
    let mut locked = FakeVm::running(103, "pve4");
    locked.lock = Some("backup".into());
    let mut ha = FakeVm::running(104, "pve5");
    ha.ha_managed = true;
    let fake = FakePve::start(vec![stopped, paused, template, locked, ha]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("STORM_PERCENT", "100")]).await;
    let mut ids = Vec::new();
    for (vmid, node) in [
        (100, "pve1"),
        (101, "pve2"),
        (102, "pve3"),
        (103, "pve4"),
        (104, "pve5"),
    ] {
        ids.push(report_vm(&srv, vmid, node, 100).await);
    }
    let expected = [
        "stopped in Proxmox",
        "paused in Proxmox",
        "a template",
        "locked (backup)",
        "left to HA",
    ];
    for (id, reason) in ids.iter().zip(expected) {
        wait_for(reason, Duration::from_secs(15), || async {
            let v = vm(&srv, *id).await;
            v["phase_reason"].as_str()?.contains(reason).then_some(())
        })
        .await;
    }
    wait_rounds(&srv, 8).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    let ha_history = history(&srv, ids[4]).await;
    assert_eq!(ha_history.len(), 1, "recorded once, not once per look");
    assert_eq!(ha_history[0]["outcome"], "left_alone");
    assert!(ha_history[0]["error"].as_str().unwrap().contains("HA"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_mode_records_would_reset_and_calls_nothing() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("AUTO_RESET_MODE", "shadow")]).await;
    let id = report_vm(&srv, 100, "pve1", 100).await;
    let h = wait_for("a shadow entry", Duration::from_secs(15), || async {
        let h = history(&srv, id).await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(h[0]["outcome"], "would_reset");
    assert_eq!(h[0]["mode"], "shadow");
    wait_rounds(&srv, 5).await;
    assert!(fake.posts().is_empty());
    assert_eq!(
        srv.get("/api/health").await.1["remediation"]["mode"],
        "shadow"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_is_linked_through_its_smbios_uuid() {
    let mut target = FakeVm::running(100, "pve1");
    target.smbios_uuid = Some("7D2A1C3E-4B5F-4A6B-9C8D-1E2F3A4B5C6D".into());
    let mut other = FakeVm::running(101, "pve2");
    other.smbios_uuid = Some("00000000-0000-4000-8000-000000000001".into());
    let fake = FakePve::start(vec![target, other]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let mut r = report_for("no-vmid-here");
    r["machine_id"] = json!("7d2a1c3e-4b5f-4a6b-9c8d-1e2f3a4b5c6d");
    let (_, body) = srv.report(&r).await;
    let id = body["vm_id"].as_i64().unwrap();
    let linked = wait_for("the uuid link", Duration::from_secs(10), || async {
        let v = vm(&srv, id).await;
        (v["proxmox_vmid"] == 100).then_some(v)
    })
    .await;
    assert_eq!(linked["proxmox_node"], "pve1");
    assert_eq!(linked["proxmox_type"], "qemu");
    assert_eq!(linked["proxmox_link_source"], "smbios");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrated_vm_is_followed_and_admin_actions_share_the_executor() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.state.lock().unwrap().task_duration = Duration::from_secs(2);
    let mut srv = start(Backend::Sqlite, &fake, &[("AUTO_RESET_ENABLED", "false")]).await;
    let id = report_vm(&srv, 100, "pve1", 100).await;
    wait_for("the link", Duration::from_secs(5), || async {
        (vm(&srv, id).await["proxmox_vmid"] == 100).then_some(())
    })
    .await;
    fake.with_vm(100, |v| v.node = "pve2".into());

    let path = format!("/api/vms/{id}/reset");
    assert_eq!(srv.send(Method::POST, &path, None, None).await.0, 401);
    let (status, body) = srv.send(Method::POST, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = srv.send(Method::POST, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 409, "an action is in flight");
    assert_eq!(fake.posts(), vec!["reset 100"]);
    let v = vm(&srv, id).await;
    assert_eq!(v["proxmox_node"], "pve2", "the link follows the migration");
    let h = history(&srv, id).await;
    assert_eq!(h[0]["trigger_source"], "admin");
    assert_eq!(h[0]["requested_by"], "admin token");

    wait_for("the task to end", Duration::from_secs(15), || async {
        (vm(&srv, id).await["remediation_phase"] != "reset_pending").then_some(())
    })
    .await;
    // A node that is offline answers 595: nothing is sent and the error is clear.
    fake.state
        .lock()
        .unwrap()
        .offline_nodes
        .insert("pve2".into());
    let (status, body) = srv
        .send(
            Method::POST,
            &format!("/api/vms/{id}/shutdown"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(error_text(&body).contains("No route to host"), "{body}");
    assert_eq!(fake.posts(), vec!["reset 100"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_ca_file_or_the_pinned_fingerprint() {
    use proxmox::{PveClient, PveSettings, TlsTrust};
    use sha2::Digest;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_der = certified.cert.der().to_vec();
    let (fake, _) = FakePve::start_tls(
        vec![FakeVm::running(100, "pve1")],
        cert_der.clone(),
        certified.key_pair.serialize_der(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let settings = |trust: TlsTrust| PveSettings {
        host: fake.base.clone(),
        user: crate::fake_pve::USER.into(),
        token_id: crate::fake_pve::TOKEN_ID.into(),
        secret: server::config::Secret::new(crate::fake_pve::SECRET.into()),
        trust,
        timeout: Duration::from_secs(5),
    };
    let fingerprint: [u8; 32] = sha2::Sha256::digest(&cert_der).into();

    let with_ca = PveClient::new(&settings(TlsTrust::CaFile(ca))).unwrap();
    assert_eq!(with_ca.cluster_vms().await.unwrap()[0].vmid, 100);
    let pinned = PveClient::new(&settings(TlsTrust::Fingerprint(fingerprint))).unwrap();
    assert_eq!(pinned.cluster_vms().await.unwrap()[0].vmid, 100);

    let neither = PveClient::new(&settings(TlsTrust::System)).unwrap();
    let err = neither.cluster_vms().await.unwrap_err();
    // A certificate problem is its own error, never retried like an outage.
    assert!(
        matches!(&err, proxmox::PveError::Untrusted(m) if m.contains("UnknownIssuer")),
        "{err:?}"
    );
    let mut wrong = fingerprint;
    wrong[0] ^= 0xff;
    let mispinned = PveClient::new(&settings(TlsTrust::Fingerprint(wrong))).unwrap();
    let answered = fake.calls().len();
    let err = mispinned.cluster_vms().await.unwrap_err();
    // Refused for the pin itself, in the handshake: no request reached the server.
    assert!(
        matches!(&err, proxmox::PveError::Untrusted(m)
            if m.contains("certificate fingerprint does not match PROXMOX_FINGERPRINT")),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(fake.calls().len(), answered);

    // A wrong token is a clear authentication error, not a retry.
    let mut bad = settings(TlsTrust::Fingerprint(fingerprint));
    bad.secret = server::config::Secret::new("wrong".into());
    let err = PveClient::new(&bad)
        .unwrap()
        .cluster_vms()
        .await
        .unwrap_err();
    assert_eq!(
        err,
        proxmox::PveError::Unauthorized("Authentication failed!".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_attempts_are_reconciled_after_a_crash_without_a_duplicate() {
    use server::db::incidents::{self, Expected, NewAttempt};
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve2"),
    ])
    .await;
    let quiet = [("AUTO_RESET_ENABLED", "false")];
    let mut srv = start(Backend::Sqlite, &fake, &quiet).await;
    let sent_vm = report_vm(&srv, 100, "pve1", 100).await;
    let unsent_vm = report_vm(&srv, 101, "pve2", 100).await;

    // A reset that reached Proxmox (its UPID was stored) but whose outcome never was...
    let upid: Value = srv
        .http
        .post(format!(
            "{}/api2/json/nodes/pve1/qemu/100/status/reset",
            fake.base
        ))
        .header(
            "Authorization",
            format!(
                "PVEAPIToken={}!{}={}",
                crate::fake_pve::USER,
                crate::fake_pve::TOKEN_ID,
                crate::fake_pve::SECRET
            ),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upid = upid["data"].as_str().unwrap().to_owned();
    let intent = |vm_id: i64, vmid: i64, node: &str| NewAttempt {
        vm_id: domain::VmId(vm_id),
        action: domain::PowerAction::Reset,
        trigger_source: domain::TriggerSource::Scheduler,
        requested_by: None,
        mode: domain::Mode::Live,
        guest: Some(domain::GuestRef {
            node: node.parse().unwrap(),
            vmid: domain::Vmid::try_from(vmid).unwrap(),
            kind: domain::GuestKind::Qemu,
        }),
        outcome: domain::AttemptOutcome::Pending,
        error: None,
        evidence_json: None,
        created_ms: server::now_ms(),
    };
    {
        let mut conn = srv.state().db.conn().await.unwrap();
        let fresh = Expected {
            phase: domain::RemediationPhase::Ok,
            attempts: 0,
            last_reset_ms: None,
            still_down_since: None,
            linked_vmid: None,
        };
        let sent = incidents::begin_attempt(
            &mut conn,
            &fresh,
            true,
            "reset",
            &intent(sent_vm, 100, "pve1"),
        )
        .await
        .unwrap()
        .unwrap();
        incidents::mark_sent(&mut conn, sent, &upid, server::now_ms())
            .await
            .unwrap();
        // ...and one whose intent was written just before the process died.
        incidents::begin_attempt(
            &mut conn,
            &fresh,
            true,
            "reset",
            &intent(unsent_vm, 101, "pve2"),
        )
        .await
        .unwrap()
        .unwrap();
    }
    srv.stop().await;

    let mut srv = start_on(srv.db, &fake, &quiet).await;
    wait_for(
        "the sent task to be followed",
        Duration::from_secs(10),
        || async { (history(&srv, sent_vm).await.first()?["outcome"] == "ok").then_some(()) },
    )
    .await;
    assert_eq!(vm(&srv, sent_vm).await["remediation_phase"], "recovering");
    let unsent = wait_for(
        "the unsent intent to be closed",
        Duration::from_secs(10),
        || async {
            let h = history(&srv, unsent_vm).await;
            (h.first()?["outcome"] == "interrupted").then_some(h)
        },
    )
    .await;
    assert_eq!(unsent.len(), 1, "the record is kept, not dropped");
    assert_eq!(vm(&srv, unsent_vm).await["remediation_phase"], "recovering");
    wait_rounds(&srv, 5).await;
    assert_eq!(fake.posts(), vec!["reset 100"], "no duplicate reset");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_container_is_rebooted_not_reset() {
    let mut container = FakeVm::running(200, "pve1");
    container.kind = "lxc";
    let fake = FakePve::start(vec![container]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_guest(&srv, 200, "pve1", "lxc", 5000).await;
    wait_for("the reboot", Duration::from_secs(15), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    assert_eq!(fake.posts(), vec!["reboot 200"]);
    assert_eq!(vm(&srv, id).await["proxmox_type"], "lxc");
    let h = wait_for("the task outcome", Duration::from_secs(10), || async {
        let h = history(&srv, id).await;
        (h.first()?["outcome"] == "ok").then_some(h)
    })
    .await;
    assert_eq!(h[0]["action"], "reboot");
    srv.stop().await;
}

/// Behind the node proxy a 596 can arrive after the request was forwarded: the reset runs.
/// Sending it again would reset the VM twice; the client looks the task up instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_answered_596_after_forwarding_runs_once() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.state.lock().unwrap().lost_answers = 1;
    let srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let done = wait_for(
        "the reset's task to be found and followed",
        Duration::from_secs(20),
        || async {
            let h = history(&srv, id).await;
            (h.first()?["outcome"] == "ok").then_some(h)
        },
    )
    .await;
    assert!(done[0]["upid"].as_str().unwrap().starts_with("UPID:pve1:"));
    wait_rounds(&srv, 5).await;
    assert_eq!(fake.posts(), vec!["reboot 100"], "the reset was sent twice");
    assert_eq!(vm(&srv, id).await["remediation_phase"], "recovering");
}

/// A 596 and then no way to read the task list: the reset may have run. It is recorded as
/// interrupted and treated as sent (recovery window), never sent again after a backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_reset_whose_task_cannot_be_looked_up_is_treated_as_sent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    {
        let mut st = fake.state.lock().unwrap();
        st.lost_answers = 1;
        st.task_list_broken = true;
    }
    let srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let h = wait_for(
        "the attempt to be recorded",
        Duration::from_secs(20),
        || async {
            let h = history(&srv, id).await;
            (h.first()?["outcome"] == "interrupted").then_some(h)
        },
    )
    .await;
    assert!(
        h[0]["error"].as_str().unwrap().contains("outcome unknown"),
        "{h:?}"
    );
    assert_eq!(vm(&srv, id).await["remediation_phase"], "recovering");
    // Past the backoff a plain failure would have retried by now.
    wait_rounds(&srv, 10).await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);
}

/// A server ended by a signal (`wait`) shuts the engine down as `stop` does: no task
/// follower outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_ended_by_a_signal_stops_following_tasks() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.state.lock().unwrap().task_duration = Duration::from_secs(600);
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    report_vm(&srv, 100, "pve1", 5000).await;
    wait_for(
        "a reset being followed",
        Duration::from_secs(15),
        || async { (srv.state().engine.following() == 1).then_some(()) },
    )
    .await;
    let mut running = srv.server.take().unwrap();
    let engine = running.state.engine.clone();
    running.begin_shutdown();
    running.wait().await;
    assert_eq!(engine.following(), 0, "a follower outlived the server");
}
