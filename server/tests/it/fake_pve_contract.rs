//! The Proxmox client against the strict fake: what the fake refuses and what the client promises.

use crate::common::wait_for;
use crate::fake_pve::{ActionCall, Call, FakePve, FakeVm, GATE_REFUSAL, SECRET, TOKEN_ID, USER};
use domain::{GuestKind, GuestRef, PowerAction, Vmid};
use proxmox::{ProxmoxApi, PveClient, PveError, PveSettings, TaskState, TlsTrust};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_secs(1);
const RELAXED: Duration = Duration::from_secs(15);

fn client_at(host: &str, token_id: &str, timeout: Duration) -> PveClient {
    PveClient::new(&PveSettings {
        host: host.into(),
        user: USER.into(),
        token_id: token_id.into(),
        secret: server::config::Secret::new(SECRET.into()),
        trust: TlsTrust::System,
        timeout,
    })
    .unwrap()
}

fn client(fake: &FakePve, timeout: Duration) -> PveClient {
    client_at(&fake.base, TOKEN_ID, timeout)
}

fn guest(node: &str, vmid: i64, kind: GuestKind) -> GuestRef {
    GuestRef {
        node: node.parse().unwrap(),
        vmid: Vmid::try_from(vmid).unwrap(),
        kind,
    }
}

/// Fails the test instead of letting a step hang it.
async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 30 s"))
}

/// One request as the wire carries it: status, reason phrase, JSON body (Null if empty).
async fn raw(fake: &FakePve, method: reqwest::Method, path: &str) -> (u16, String, Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{}/api2/json{path}", fake.base))
        .header(
            "Authorization",
            format!("PVEAPIToken={USER}!{TOKEN_ID}={SECRET}"),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_default();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        reason,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn calls_to(fake: &FakePve, method: &str, path_part: &str) -> Vec<Call> {
    fake.calls()
        .into_iter()
        .filter(|c| c.method == method && c.path.contains(path_part))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reached_through_the_wrong_type_is_refused() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::container(101, "pve1"),
    ])
    .await;
    let pve = client(&fake, RELAXED);
    let ct_as_vm = guest("pve1", 101, GuestKind::Qemu);
    let vm_as_ct = guest("pve1", 100, GuestKind::Lxc);

    assert_eq!(
        within("status", pve.guest_state(&ct_as_vm))
            .await
            .unwrap_err(),
        PveError::VmNotFound(
            "Configuration file 'nodes/pve1/qemu-server/101.conf' does not exist".into()
        )
    );
    assert_eq!(
        within("status", pve.guest_state(&vm_as_ct))
            .await
            .unwrap_err(),
        PveError::VmNotFound("Configuration file 'nodes/pve1/lxc/100.conf' does not exist".into())
    );
    assert_eq!(
        within(
            "config",
            pve.smbios_uuid(&"pve1".parse().unwrap(), Vmid::try_from(101).unwrap())
        )
        .await
        .unwrap_err(),
        PveError::VmNotFound(
            "Configuration file 'nodes/pve1/qemu-server/101.conf' does not exist".into()
        )
    );
    assert_eq!(
        within("reset", pve.power_action(&ct_as_vm, PowerAction::Reset))
            .await
            .unwrap_err(),
        PveError::VmNotFound("unable to find configuration file for VM 101 on node 'pve1'".into())
    );
    // pve-container checks only for a running container of that id, and says "VM".
    assert_eq!(
        within("reboot", pve.power_action(&vm_as_ct, PowerAction::Reboot))
            .await
            .unwrap_err(),
        PveError::NotRunning("VM 100 not running".into())
    );
    let (status, reason, _) = raw(&fake, reqwest::Method::GET, "/nodes/pve1/lxc/100/config").await;
    assert_eq!(
        (status, reason.as_str()),
        (
            500,
            "Configuration file 'nodes/pve1/lxc/100.conf' does not exist"
        )
    );
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    assert_eq!(fake.action_attempts(), ["reset 101", "reboot 100"]);

    // Through the right type both work, and a container's task is a vz task.
    let (status, _, config) = raw(&fake, reqwest::Method::GET, "/nodes/pve1/lxc/101/config").await;
    assert_eq!(
        (status, &config["data"]["hostname"]),
        (200, &json!("ct101"))
    );
    let ct = guest("pve1", 101, GuestKind::Lxc);
    let state = within("status", pve.guest_state(&ct)).await.unwrap();
    assert_eq!(state.power, domain::policy::GuestPower::Running);
    let upid = within("reboot", pve.power_action(&ct, PowerAction::Reboot))
        .await
        .unwrap();
    assert!(upid.contains(":vzreboot:101:"), "{upid}");
    assert_eq!(fake.posts(), ["reboot 101"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_read_on_its_own_node_only() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(200, "pve2"),
    ])
    .await;
    let pve = client(&fake, RELAXED);
    let upid = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap();
    assert!(upid.starts_with("UPID:pve1:"), "{upid}");
    wait_for("the task to end", Duration::from_secs(10), || async {
        match pve.task_state(&upid).await.unwrap() {
            TaskState::Running => None,
            done => {
                assert_eq!(done, TaskState::Succeeded("OK".into()));
                Some(())
            }
        }
    })
    .await;
    let polls = calls_to(&fake, "GET", "/status");
    assert!(!polls.is_empty());
    assert!(
        polls
            .iter()
            .all(|c| c.path == format!("/nodes/pve1/tasks/{upid}/status") && c.status == 200),
        "{polls:?}"
    );

    let (status, reason, body) = raw(
        &fake,
        reqwest::Method::GET,
        &format!("/nodes/pve2/tasks/{upid}/status"),
    )
    .await;
    assert_eq!(
        (status, reason.as_str()),
        (400, "Parameter verification failed.")
    );
    assert_eq!(body["errors"]["upid"], "no such task", "{body}");

    // A UPID naming a node that never ran it: the client asks that node, which has no task.
    let elsewhere = upid.replacen("UPID:pve1:", "UPID:pve2:", 1);
    assert_eq!(
        within("poll", pve.task_state(&elsewhere))
            .await
            .unwrap_err(),
        PveError::BadRequest("Parameter verification failed. (upid: no such task)".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_is_a_clear_403_and_the_post_is_not_resent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let pve = client(&fake, RELAXED);
    let vm = guest("pve1", 100, GuestKind::Qemu);
    fake.deny("/vms/100", "VM.PowerMgmt");

    let err = within("reset", pve.power_action(&vm, PowerAction::Reset))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        PveError::Forbidden("Permission check failed (/vms/100, VM.PowerMgmt)".into())
    );
    assert_eq!(
        err.to_string(),
        "permission denied: Permission check failed (/vms/100, VM.PowerMgmt)"
    );
    assert_eq!(fake.action_attempts(), ["reset 100"]);
    assert_eq!(calls_to(&fake, "POST", "/status/reset")[0].status, 403);
    assert!(fake.posts().is_empty());
    // Reading needs only VM.Audit, which the token still has.
    within("status", pve.guest_state(&vm)).await.unwrap();

    // On the wire: the reason phrase and the message, as pve-http-server sends them.
    let (status, reason, body) = raw(
        &fake,
        reqwest::Method::POST,
        "/nodes/pve1/qemu/100/status/reset",
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(reason, "Permission check failed (/vms/100, VM.PowerMgmt)");
    assert_eq!(
        body,
        json!({"data": null, "message": "Permission check failed (/vms/100, VM.PowerMgmt)\n"})
    );

    // Without VM.Audit on /vms the guest is left out of the list and its status refused once.
    fake.deny("/vms", "VM.Audit");
    assert!(
        within("list", pve.cluster_guests())
            .await
            .unwrap()
            .is_empty()
    );
    let reads_before = calls_to(&fake, "GET", "/status/current").len();
    assert_eq!(
        within("status", pve.guest_state(&vm)).await.unwrap_err(),
        PveError::Forbidden("Permission check failed (/vms/100, VM.Audit)".into())
    );
    assert_eq!(
        calls_to(&fake, "GET", "/status/current").len(),
        reads_before + 1
    );
}

/// 596: the node proxy forwarded the request and lost the answer. The reset ran; the client
/// finds its task instead of sending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_596_is_resolved_through_the_task_list_and_not_resent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.state.lock().unwrap().lost_answers = 1;
    let pve = client(&fake, RELAXED);
    let upid = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap();
    assert!(upid.contains(":qmreset:100:"), "{upid}");
    assert_eq!(
        fake.action_attempts(),
        ["reset 100"],
        "the reset was sent twice"
    );
    assert_eq!(fake.posts(), ["reset 100"]);
    let calls = fake.calls();
    let post = calls.iter().position(|c| c.method == "POST").unwrap();
    assert_eq!(calls[post].status, 596);
    assert!(
        calls[post..]
            .iter()
            .any(|c| c.path == "/nodes/pve1/tasks" && c.status == 200),
        "{calls:?}"
    );
}

/// No answer before the timeout and no task to be found: the outcome is unknown, and the
/// POST is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_action_ends_unknown_after_the_timeout_and_is_not_resent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.hang_on("POST ");
    let pve = client(&fake, SHORT);
    let started = Instant::now();
    let err = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(&err, PveError::Ambiguous(m) if m.contains("no reset task found")),
        "{err:?}"
    );
    assert!(elapsed >= SHORT, "{elapsed:?}");
    // One timed-out POST and one prompt task-list read.
    assert!(elapsed < SHORT * 2 + Duration::from_secs(2), "{elapsed:?}");
    assert_eq!(
        fake.action_attempts(),
        ["reset 100"],
        "the reset was sent twice"
    );
    assert_eq!(calls_to(&fake, "POST", "/status/reset")[0].status, 0);
    assert!(fake.posts().is_empty());
}

/// The node ran the reset but the answer never came: the client finds the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_whose_answer_hangs_is_found_not_resent() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.hang_answer_on("POST ");
    let pve = client(&fake, SHORT);
    let upid = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap();
    assert!(upid.contains(":qmreset:100:"), "{upid}");
    assert_eq!(
        fake.action_attempts(),
        ["reset 100"],
        "the reset was sent twice"
    );
    assert_eq!(fake.posts(), ["reset 100"]);
    assert_eq!(calls_to(&fake, "POST", "/status/reset")[0].status, 0);
}

/// 595: the node proxy could not reach the node, so nothing ran; resending is safe, and the
/// fake records every attempt before answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_node_is_retried_visibly_and_runs_nothing() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.state
        .lock()
        .unwrap()
        .offline_nodes
        .insert("pve1".into());
    let pve = client(&fake, RELAXED);
    let err = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap_err();
    assert_eq!(err, PveError::Transient("595 No route to host".into()));
    let attempts = fake.action_attempts();
    assert!(attempts.len() > 1, "no retry: {attempts:?}");
    assert!(attempts.iter().all(|a| a == "reset 100"), "{attempts:?}");
    assert!(
        calls_to(&fake, "POST", "/status/reset")
            .iter()
            .all(|c| c.status == 595)
    );
    assert!(fake.posts().is_empty());
    // Nothing was delivered, so there is no task to look for.
    assert!(calls_to(&fake, "GET", "/tasks").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_as_not_delivered() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let pve = client_at(&format!("http://{closed}"), TOKEN_ID, SHORT);
    let err = within(
        "reset",
        pve.power_action(&guest("pve1", 100, GuestKind::Qemu), PowerAction::Reset),
    )
    .await
    .unwrap_err();
    // Transient, not Ambiguous: the client knows the request never left.
    assert!(
        matches!(&err, PveError::Transient(m) if m.starts_with("connection failed")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_inside_the_client_timeout_succeeds() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let slow = Duration::from_millis(400);
    fake.delay(slow);
    let pve = client(&fake, Duration::from_secs(3));
    let started = Instant::now();
    let state = within(
        "status",
        pve.guest_state(&guest("pve1", 100, GuestKind::Qemu)),
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= slow, "{:?}", started.elapsed());
    assert_eq!(state.power, domain::policy::GuestPower::Running);
    let reads = calls_to(&fake, "GET", "/status/current");
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_status_read_fails_within_the_client_timeout() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.hang_on("GET /nodes/pve1/qemu/100/status/current");
    let pve = client(&fake, SHORT);
    let vm = guest("pve1", 100, GuestKind::Qemu);
    let started = Instant::now();
    let err = within("status", pve.guest_state(&vm)).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(err.is_transient(), "{err:?}");
    let reads = calls_to(&fake, "GET", "/status/current");
    assert!(reads.iter().all(|c| c.status == 0), "{reads:?}");
    // Each read gives up at the timeout; the retry pauses add under a second.
    let attempts = u32::try_from(reads.len()).unwrap();
    assert!(elapsed >= SHORT * attempts, "{elapsed:?}");
    assert!(
        elapsed < SHORT * attempts + Duration::from_secs(2),
        "{elapsed:?} for {attempts} reads"
    );
    // Only that path hangs.
    within("list", pve.cluster_guests()).await.unwrap();
    fake.hang(false);
    within("status", pve.guest_state(&vm)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_holds_the_answer_until_released() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.hang(true);
    let pve = client(&fake, RELAXED);
    let mut read =
        tokio::spawn(async move { pve.guest_state(&guest("pve1", 100, GuestKind::Qemu)).await });
    wait_for("the read to arrive", Duration::from_secs(10), || async {
        (!calls_to(&fake, "GET", "/status/current").is_empty()).then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut read)
            .await
            .is_err(),
        "answered while hung"
    );
    fake.hang(false);
    within("the released read", read).await.unwrap().unwrap();
    assert_eq!(calls_to(&fake, "GET", "/status/current")[0].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_status_reads_are_released_together() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.hold_status_until(2, Duration::from_secs(10));
    let pve = client(&fake, RELAXED);
    let vm = guest("pve1", 100, GuestKind::Qemu);
    let mut first = {
        let (pve, vm) = (pve.clone(), vm.clone());
        tokio::spawn(async move {
            let state = pve.guest_state(&vm).await;
            (state, Instant::now())
        })
    };
    wait_for(
        "the first read to arrive",
        Duration::from_secs(10),
        || async { (!calls_to(&fake, "GET", "/status/current").is_empty()).then_some(()) },
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut first)
            .await
            .is_err(),
        "the first read was not held"
    );
    let second_sent = Instant::now();
    within("the second read", pve.guest_state(&vm))
        .await
        .unwrap();
    let (state, first_done) = within("the first read", first).await.unwrap();
    state.unwrap();
    assert!(first_done >= second_sent);
    assert!(
        second_sent.elapsed() < Duration::from_secs(5),
        "released by the deadline, not the second arrival"
    );
    // One-shot: the next read is not held.
    let started = Instant::now();
    within("a later read", pve.guest_state(&vm)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_held_status_read_is_released_at_the_deadline() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let deadline = Duration::from_millis(1500);
    fake.hold_status_until(2, deadline);
    let pve = client(&fake, RELAXED);
    let vm = guest("pve1", 100, GuestKind::Qemu);
    let started = Instant::now();
    within("the held read", pve.guest_state(&vm)).await.unwrap();
    let held = started.elapsed();
    assert!(held >= deadline, "{held:?}");
    assert!(held < deadline + Duration::from_secs(3), "{held:?}");
    let started = Instant::now();
    within("a later read", pve.guest_state(&vm)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the barrier stayed armed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_gate_decides_before_the_action_is_accepted() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let pve = client(&fake, RELAXED);
    let vm = guest("pve1", 100, GuestKind::Qemu);
    let seen: Arc<Mutex<Vec<ActionCall>>> = Arc::default();
    {
        let seen = seen.clone();
        fake.gate_actions(Arc::new(move |call| {
            seen.lock().unwrap().push(call);
            Box::pin(async { false })
        }));
    }
    let err = within("reset", pve.power_action(&vm, PowerAction::Reset))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        PveError::Server {
            status: 500,
            message: GATE_REFUSAL.into()
        }
    );
    assert!(fake.posts().is_empty());
    assert_eq!(fake.action_attempts(), ["reset 100"]);
    let call = seen.lock().unwrap()[0].clone();
    assert_eq!(
        (
            call.node.as_str(),
            call.kind.as_str(),
            call.vmid,
            call.action.as_str(),
            call.token_id.as_str()
        ),
        ("pve1", "qemu", 100, "reset", TOKEN_ID)
    );

    // The gate runs without the fake's lock: it may look at the fake itself.
    {
        let observed = fake.clone();
        fake.gate_actions(Arc::new(move |_| {
            let observed = observed.clone();
            Box::pin(async move {
                tokio::task::yield_now().await;
                observed.action_attempts().len() == 2
            })
        }));
    }
    within("reset", pve.power_action(&vm, PowerAction::Reset))
        .await
        .unwrap();
    assert_eq!(fake.posts(), ["reset 100"]);
    fake.ungate_actions();
    within("reset", pve.power_action(&vm, PowerAction::Reset))
        .await
        .unwrap();
    assert_eq!(fake.posts(), ["reset 100", "reset 100"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_name_their_token_and_tasks_belong_to_theirs() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.allow_token("replica-b");
    assert!(
        fake.env_for_token("replica-b")
            .contains(&("PROXMOX_TOKEN", "replica-b".to_owned()))
    );
    let a = client(&fake, RELAXED);
    let b = client_at(&fake.base, "replica-b", RELAXED);
    let stranger = client_at(&fake.base, "stranger", RELAXED);
    within("list", a.cluster_guests()).await.unwrap();
    within("list", b.cluster_guests()).await.unwrap();
    assert_eq!(
        within("list", stranger.cluster_guests()).await.unwrap_err(),
        PveError::Unauthorized("Authentication failed!".into())
    );
    let who: Vec<(String, u16)> = fake
        .calls()
        .into_iter()
        .map(|c| (c.token_id, c.status))
        .collect();
    assert_eq!(
        who,
        [
            (TOKEN_ID.to_owned(), 200),
            ("replica-b".to_owned(), 200),
            ("stranger".to_owned(), 401)
        ]
    );

    // Without Sys.Audit on the node, a token sees only the tasks it started.
    fake.deny_token("replica-b", "/nodes/pve1", "Sys.Audit");
    let vm = guest("pve1", 100, GuestKind::Qemu);
    let since = server::now_ms() / 1000;
    let upid = within("reset", a.power_action(&vm, PowerAction::Reset))
        .await
        .unwrap();
    assert!(upid.ends_with(&format!("{USER}!{TOKEN_ID}:")), "{upid}");
    within("poll", a.task_state(&upid)).await.unwrap();
    assert_eq!(
        within("poll", b.task_state(&upid)).await.unwrap_err(),
        PveError::Forbidden("Permission check failed (/nodes/pve1, Sys.Audit)".into())
    );
    assert_eq!(
        within("tasks", a.find_task(&vm, PowerAction::Reset, since))
            .await
            .unwrap(),
        Some(upid)
    );
    assert_eq!(
        within("tasks", b.find_task(&vm, PowerAction::Reset, since))
            .await
            .unwrap(),
        None
    );
}

/// After an unanswered POST the client looks for its task; a reset of the same guest that
/// another token (another replica, a person) started is not taken for ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tokens_task_is_not_taken_for_ours() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.allow_token("replica-b");
    let target = guest("pve1", 100, GuestKind::Qemu);
    let theirs = within(
        "their reset",
        client_at(&fake.base, "replica-b", SHORT).power_action(&target, PowerAction::Reset),
    )
    .await
    .unwrap();
    assert!(theirs.contains("!replica-b:"), "{theirs}");
    fake.hang_on("POST ");
    let err = within(
        "our reset",
        client(&fake, SHORT).power_action(&target, PowerAction::Reset),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, PveError::Ambiguous(m) if m.contains("no reset task found")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_pings_are_told_apart_by_their_messages() {
    use crate::fake_pve::GuestAgent;
    use domain::evidence::AgentPing;
    let mut answers = FakeVm::running(100, "pve1");
    answers.guest_agent = GuestAgent::Answers;
    let not_running = FakeVm::running(101, "pve1");
    let mut no_agent = FakeVm::running(102, "pve1");
    no_agent.agent = false;
    let mut silent = FakeVm::running(103, "pve1");
    silent.guest_agent = GuestAgent::Silent(Duration::from_millis(300));
    let mut off = FakeVm::running(104, "pve1");
    (off.status, off.qmpstatus) = ("stopped", "stopped");
    let denied = FakeVm::running(105, "pve1");
    let fake = FakePve::start(vec![answers, not_running, no_agent, silent, off, denied]).await;
    fake.deny("/vms/105", "VM.GuestAgent.Audit");
    let pve = client(&fake, RELAXED);
    let cases = [
        (100, AgentPing::Answered),
        (101, AgentPing::NotRunning),
        (102, AgentPing::NotConfigured),
        (103, AgentPing::TimedOut),
        (104, AgentPing::Unavailable("VM 104 is not running".into())),
        (105, AgentPing::Unavailable("permission".into())),
    ];
    for (vmid, expected) in cases {
        let answer = within(
            "a ping",
            pve.agent_ping(&guest("pve1", vmid, GuestKind::Qemu)),
        )
        .await;
        assert_eq!(answer, Ok(expected), "VM {vmid}");
    }
    // A container has no QEMU guest agent: nothing is asked.
    let before = fake.calls().len();
    let ct = pve.agent_ping(&guest("pve1", 100, GuestKind::Lxc)).await;
    assert_eq!(ct, Ok(AgentPing::NotConfigured));
    assert_eq!(fake.calls().len(), before);
    // The wire as the reference gives it: a 500 whose message says why.
    let (status, _, body) = raw(
        &fake,
        reqwest::Method::POST,
        "/nodes/pve1/qemu/101/agent/ping",
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(body["message"], "QEMU guest agent is not running\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_carry_the_evidence_counters_and_a_graceful_reboot_its_timeout() {
    let mut busy = FakeVm::running(100, "pve1");
    busy.io_moving = true;
    let mut deaf = FakeVm::running(101, "pve1");
    deaf.ignores_acpi = true;
    deaf.agent = false;
    let fake = FakePve::start(vec![busy, deaf]).await;
    let pve = client(&fake, RELAXED);
    let g = guest("pve1", 100, GuestKind::Qemu);
    let first = pve.guest_state(&g).await.unwrap();
    let second = pve.guest_state(&g).await.unwrap();
    assert!(first.agent_configured);
    let (a, b) = (first.sample.io.unwrap(), second.sample.io.unwrap());
    assert!(
        b.diskwrite > a.diskwrite && b.netout > a.netout,
        "{a:?} {b:?}"
    );
    assert_eq!(first.sample.cpu, Some(0.0123));
    let deaf_state = pve
        .guest_state(&guest("pve1", 101, GuestKind::Qemu))
        .await
        .unwrap();
    assert!(!deaf_state.agent_configured);
    // The reboot's deadline travels in the form; a guest that ignores ACPI fails the task.
    let upid = pve
        .graceful_reboot(&guest("pve1", 101, GuestKind::Qemu), 60)
        .await
        .unwrap();
    assert_eq!(fake.state.lock().unwrap().forms, vec!["timeout=60"]);
    let end = wait_for("the reboot task to end", RELAXED, || async {
        match pve.task_state(&upid).await.unwrap() {
            TaskState::Running => None,
            other => Some(other),
        }
    })
    .await;
    assert_eq!(
        end,
        TaskState::Failed("VM quit/powerdown failed - got timeout".into())
    );
}
