//! The safety rails the README promises, each shown on the real server against the fake
//! Proxmox: one leader, the compare-and-set, intent before the POST, linking, the breaker's
//! node rule, the concurrency cap, the full queue, the pause after our own outage, opt-out
//! and manual links.

use crate::both_backends;
use crate::common::*;
use crate::fake_pve::{ActionCall, FakePve, FakeVm, Gate};
use crate::proxmox::{FAST, history, report_vm, start, start_on, vm, wait_active, wait_rounds};
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Reports for `hosts` (hostname, reported VMID) every 200 ms until aborted; answers that
/// were 503 are counted by the time their request was sent, into `refused_sent_ms`.
pub(crate) fn keep_reporting(
    srv: &TestServer,
    hosts: Vec<(String, Option<i64>)>,
    refused_sent_ms: Option<Arc<std::sync::Mutex<Vec<i64>>>>,
) -> JoinHandle<()> {
    let (http, url) = (srv.http.clone(), srv.url("/api/health/report"));
    tokio::spawn(async move {
        loop {
            for (host, vmid) in &hosts {
                let mut body = report_for(host);
                if let Some(vmid) = vmid {
                    body["vmid"] = json!(vmid);
                    body["node"] = json!("pve1");
                }
                let sent = epoch_ms();
                let status = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if let (Ok(503), Some(log)) = (status, &refused_sent_ms) {
                    log.lock().unwrap().push(sent);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The VM's id, from a report without any Proxmox hint.
async fn report_plain(srv: &TestServer, hostname: &str, machine_id: Option<&str>) -> i64 {
    let mut r = report_for(hostname);
    if let Some(uuid) = machine_id {
        r["machine_id"] = json!(uuid);
    }
    let (status, body) = srv.report(&r).await;
    assert_eq!(status, 200, "{body}");
    body["vm_id"].as_i64().unwrap()
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn admin_conn() -> AsyncPgConnection {
    AsyncPgConnection::establish(&admin_pg_url()).await.unwrap()
}

fn db_name(srv: &TestServer) -> String {
    srv.db.url.rsplit('/').next().unwrap().to_owned()
}

/// Two replicas on one database, each with its own Proxmox token so the fake can tell who
/// called. The fake holds `status/current` until both asked (or 3 s): without the leader
/// lock both would read the same state at once and race to the compare-and-set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_act_through_one_leader_and_reset_once() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    fake.allow_token("replica-b");
    fake.hold_status_until(2, Duration::from_secs(3));
    let db = fresh_db(Backend::Postgres).await;
    let second_db = TestDb {
        url: db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut a = start_on(db, &fake, &[]).await;
    let mut b_vars: Vec<(String, String)> = FAST
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    b_vars.extend(
        fake.env_for_token("replica-b")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    let b_refs: Vec<(&str, &str)> = b_vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut b = TestServer::start_on(second_db, &b_refs).await;
    let id = report_vm(&a, 100, "pve1", 5000).await;

    let done = wait_for("the reset to finish", Duration::from_secs(20), || async {
        let h = history(&b, id).await;
        (h.first()?["outcome"] == "ok").then_some(h)
    })
    .await;
    wait_rounds(&a, 10).await;
    wait_rounds(&b, 10).await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    assert_eq!(done.len(), 1, "one winner of the compare-and-set: {done:?}");
    let askers: std::collections::BTreeSet<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.path.contains("/100/status/"))
        .map(|c| c.token_id)
        .collect();
    assert_eq!(askers.len(), 1, "only the leader asks and acts: {askers:?}");
    a.stop().await;
    b.stop().await;
}

fn attempt_at(vm_id: i64, at: i64, by: &str) -> server::db::incidents::NewAttempt {
    server::db::incidents::NewAttempt {
        vm_id: domain::VmId(vm_id),
        action: domain::PowerAction::Reset,
        trigger_source: domain::TriggerSource::Admin,
        requested_by: Some(by.into()),
        mode: domain::Mode::Live,
        guest: None,
        outcome: domain::AttemptOutcome::Pending,
        error: None,
        evidence_json: None,
        created_ms: at,
    }
}

/// Two writers that read the same incident state: exactly one moves it, the other is told
/// the state changed, and only one history row exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_attempts_on_the_same_expected_state_give_one_winner() {
    use server::db::incidents::{Expected, begin_attempt};
    let mut srv = TestServer::start(Backend::Postgres, &[]).await;
    let id = report_plain(&srv, "contested", None).await;
    let expected = Expected {
        phase: domain::RemediationPhase::Ok,
        attempts: 0,
        last_reset_ms: None,
        still_down_since: None,
        linked_vmid: None,
    };
    let mut first = srv.state().db.conn().await.unwrap();
    let mut second = srv.state().db.conn().await.unwrap();
    let (one, two) = (attempt_at(id, 1_000, "one"), attempt_at(id, 1_001, "two"));
    let (r1, r2) = tokio::join!(
        begin_attempt(&mut first, &expected, true, "by one", &one),
        begin_attempt(&mut second, &expected, true, "by two", &two),
    );
    let outcomes = [r1.unwrap().is_some(), r2.unwrap().is_some()];
    assert_eq!(
        outcomes.iter().filter(|won| **won).count(),
        1,
        "{outcomes:?}"
    );
    drop((first, second));
    let rows = history(&srv, id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let after = vm(&srv, id).await;
    assert_eq!(after["remediation_phase"], "reset_pending");
    assert_eq!(after["incident_attempts"], 1);
    srv.stop().await;
}

/// The fake accepts a power action only when the VM's history already holds the open
/// attempt: proof that the intent is written before Proxmox is called.
fn intent_first_gate(srv: &TestServer, vm_ids: Arc<std::sync::Mutex<Vec<(i64, i64)>>>) -> Gate {
    let (http, base) = (srv.http.clone(), srv.base.clone());
    Arc::new(move |call: ActionCall| {
        let (http, base, vm_ids) = (http.clone(), base.clone(), vm_ids.clone());
        Box::pin(async move {
            let Some(id) = vm_ids
                .lock()
                .unwrap()
                .iter()
                .find(|(vmid, _)| *vmid == call.vmid)
                .map(|(_, id)| *id)
            else {
                return false;
            };
            let url = format!("{base}/api/vms/{id}/reset-history");
            let Ok(resp) = http.get(url).bearer_auth(ADMIN_TOKEN).send().await else {
                return false;
            };
            let rows: Value = resp.json().await.unwrap_or(Value::Null);
            rows.get(0)
                .is_some_and(|r| r["outcome"] == "pending" && r["action"] == call.action)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_history_row_is_written_before_proxmox_is_called() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve1"),
    ])
    .await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    fake.gate_actions(intent_first_gate(&srv, ids.clone()));
    let hung = report_vm(&srv, 100, "pve1", 5000).await;
    let operated = report_vm(&srv, 101, "pve1", 5000).await;
    ids.lock().unwrap().extend([(100, hung), (101, operated)]);
    let reporter = keep_reporting(&srv, vec![("guest-101".into(), Some(101))], None);
    wait_for(
        "the link of the operated VM",
        Duration::from_secs(10),
        || async { (vm(&srv, operated).await["proxmox_vmid"] == 101).then_some(()) },
    )
    .await;

    let (status, body) = srv
        .send(
            Method::POST,
            &format!("/api/vms/{operated}/reset"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    for id in [hung, operated] {
        wait_for("the task to end OK", Duration::from_secs(20), || async {
            (history(&srv, id).await.first()?["outcome"] == "ok").then_some(())
        })
        .await;
    }
    reporter.abort();
    let mut posts = fake.posts();
    posts.sort();
    assert_eq!(
        posts,
        vec!["reboot 100", "reset 101"],
        "the ladder's reboot, the operator's reset"
    );
    assert_eq!(fake.action_attempts().len(), 2, "no refused POST");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unique_guest_name_links_and_a_shared_name_does_not() {
    let mut named = FakeVm::running(100, "pve1");
    named.name = "web01".into();
    let mut twin_a = FakeVm::running(101, "pve1");
    twin_a.name = "dup".into();
    let mut twin_b = FakeVm::running(102, "pve2");
    twin_b.name = "dup".into();
    let fake = FakePve::start(vec![named, twin_a, twin_b]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let web = report_plain(&srv, "web01.example.org", None).await;
    let dup = report_plain(&srv, "dup", None).await;

    let linked = wait_for("the name link", Duration::from_secs(10), || async {
        let v = vm(&srv, web).await;
        (v["proxmox_link_source"] == "name").then_some(v)
    })
    .await;
    assert_eq!(
        (
            linked["proxmox_vmid"].clone(),
            linked["proxmox_node"].clone()
        ),
        (json!(100), json!("pve1"))
    );
    // Several more link refreshes (every 200 ms): the shared name stays unlinked.
    wait_rounds(&srv, 15).await;
    let ambiguous = vm(&srv, dup).await;
    assert_eq!(ambiguous["proxmox_vmid"], Value::Null, "{ambiguous}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_uuid_two_guests_share_links_neither() {
    let shared = "4c4c4544-0000-1000-8000-000000000001";
    let unique = "4c4c4544-0000-1000-8000-000000000002";
    let mut original = FakeVm::running(100, "pve1");
    original.smbios_uuid = Some(shared.into());
    // A restore without "unique" keeps the uuid.
    let mut restored = FakeVm::running(101, "pve2");
    restored.smbios_uuid = Some(shared.into());
    let mut other = FakeVm::running(102, "pve1");
    other.smbios_uuid = Some(unique.into());
    let fake = FakePve::start(vec![original, restored, other]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let ambiguous = report_plain(&srv, "clone-a", Some(shared)).await;
    let single = report_plain(&srv, "single", Some(&unique.to_uppercase())).await;

    wait_for("the uuid link", Duration::from_secs(10), || async {
        let v = vm(&srv, single).await;
        (v["proxmox_link_source"] == "smbios" && v["proxmox_vmid"] == 102).then_some(())
    })
    .await;
    wait_rounds(&srv, 15).await;
    let v = vm(&srv, ambiguous).await;
    assert_eq!(v["proxmox_vmid"], Value::Null, "{v}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_vm_of_one_node_stale_pauses_auto_reset() {
    let mut guests: Vec<FakeVm> = (100..106).map(|v| FakeVm::running(v, "pve1")).collect();
    guests.extend([FakeVm::running(200, "pve2"), FakeVm::running(201, "pve2")]);
    let fake = FakePve::start(guests).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let healthy: Vec<(String, Option<i64>)> = (100..106)
        .map(|v| (format!("guest-{v}"), Some(v)))
        .collect();
    for vmid in 100..106 {
        report_vm(&srv, vmid, "pve1", 5000).await;
    }
    let reporter = keep_reporting(&srv, healthy, None);
    // Two of eight linked VMs (25 %, under STORM_PERCENT=30): only the node rule can trip.
    // They are opted out while they fall silent, so neither is reset in the moment the
    // first is stale and the second not yet; then opted in again.
    let mut silent = Vec::new();
    for vmid in [200, 201] {
        let id = report_vm(&srv, vmid, "pve2", 5000).await;
        let path = format!("/api/vms/{id}/auto-reset");
        let off = Some(json!({"enabled": false}));
        assert_eq!(
            srv.send(Method::PUT, &path, Some(ADMIN_TOKEN), off).await.0,
            200
        );
        silent.push(path);
    }

    let event = wait_for("the breaker event", Duration::from_secs(15), || async {
        let events = srv.get("/api/remediation").await.1["events"].clone();
        events
            .as_array()?
            .iter()
            .find(|e| e["kind"] == "breaker_tripped")
            .cloned()
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("all 2 VMs on node pve2"),
        "{event}"
    );
    for path in &silent {
        let on = Some(json!({"enabled": true}));
        assert_eq!(
            srv.send(Method::PUT, path, Some(ADMIN_TOKEN), on).await.0,
            200
        );
    }
    wait_rounds(&srv, 15).await;
    assert_eq!(fake.posts(), Vec::<String>::new());
    let (_, health) = srv.get("/api/health").await;
    assert_eq!(health["remediation"]["active"], false, "{health}");
    reporter.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resets_in_flight_never_exceed_the_cap() {
    // One VM per node, so the breaker's node rule stays out of the way.
    let node = |vmid: i64| format!("pve{}", vmid - 99);
    let fake = FakePve::start((100..103).map(|v| FakeVm::running(v, &node(v))).collect()).await;
    // The first task runs until the test lets it end, however slow the machine is.
    fake.state.lock().unwrap().task_duration = Duration::from_secs(3600);
    let mut srv = start(
        Backend::Sqlite,
        &fake,
        &[("MAX_CONCURRENT_RESETS", "1"), ("STORM_PERCENT", "100")],
    )
    .await;
    for vmid in 100..103 {
        report_vm(&srv, vmid, &node(vmid), 5000).await;
    }
    wait_for("the first reset", Duration::from_secs(15), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    // Ten rounds while the first task still runs: no second reset starts.
    wait_rounds(&srv, 10).await;
    assert_eq!(fake.posts().len(), 1, "{:?}", fake.posts());
    fake.state.lock().unwrap().task_duration = Duration::ZERO;
    wait_for("all three resets", Duration::from_secs(30), || async {
        (fake.posts().len() == 3).then_some(())
    })
    .await;
    srv.stop().await;
}

/// Blocks the writer with a table lock, fills the queue, and checks the overflow is told
/// to come back, stores nothing, and what was queued is stored once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_ingest_queue_answers_503_and_loses_nothing_acknowledged() {
    use diesel_async::RunQueryDsl;
    let mut srv = TestServer::start(
        Backend::Postgres,
        &[("INGEST_QUEUE_CAPACITY", "2"), ("INGEST_BATCH_MAX", "1")],
    )
    .await;
    let mut locker = AsyncPgConnection::establish(&srv.db.url).await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE metric_samples IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let send = |host: String| {
        let (http, url) = (srv.http.clone(), srv.url("/api/health/report"));
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(AGENT_TOKEN)
                .json(&report_for(&host))
                .send()
                .await
                .unwrap();
            let retry = resp.headers().get("retry-after").cloned();
            (host, resp.status().as_u16(), retry)
        })
    };
    let first = send("queued-0".into());
    let name = db_name(&srv);
    let admin = Arc::new(tokio::sync::Mutex::new(admin_conn().await));
    let sql = format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{name}' AND wait_event_type = 'Lock'"
    );
    wait_for(
        "the writer to wait on the lock",
        Duration::from_secs(10),
        || {
            let (admin, sql) = (admin.clone(), sql.clone());
            async move {
                let mut admin = admin.lock().await;
                let c: Count = diesel::sql_query(sql)
                    .get_result(&mut *admin)
                    .await
                    .unwrap();
                (c.n >= 1).then_some(())
            }
        },
    )
    .await;
    let rest: Vec<_> = (1..8).map(|i| send(format!("queued-{i}"))).collect();
    // Two fit in the queue; five are refused at once, while the lock is still held.
    let refused = wait_for("five refusals", Duration::from_secs(10), || async {
        let done = rest.iter().filter(|h| h.is_finished()).count();
        (done == 5).then_some(done)
    })
    .await;
    assert_eq!(refused, 5);
    locker.batch_execute("COMMIT").await.unwrap();
    let mut answers = vec![first.await.unwrap()];
    for handle in rest {
        answers.push(handle.await.unwrap());
    }
    let ok: Vec<&String> = answers
        .iter()
        .filter(|a| a.1 == 200)
        .map(|a| &a.0)
        .collect();
    let busy: Vec<_> = answers.iter().filter(|a| a.1 == 503).collect();
    assert_eq!((ok.len(), busy.len()), (3, 5), "{answers:?}");
    assert!(busy.iter().all(|a| a.2.as_ref().is_some_and(|v| v == "5")));
    assert_eq!(srv.metric_rows().await, 3);
    let (_, vms) = srv.get("/api/vms").await;
    let mut stored: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["hostname"].as_str().unwrap())
        .collect();
    stored.sort_unstable();
    let mut expected: Vec<&str> = ok.iter().map(|h| h.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(stored, expected);
    srv.stop().await;
}

/// Storage goes away for three seconds while a VM hangs: once it is back, the hung VM is
/// reset only after one full stale timeout of normal ingest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storage_outage_pauses_resets_for_one_stale_timeout() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Postgres, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    let hung = keep_reporting(&srv, vec![("guest-100".into(), Some(100))], None);
    wait_active(&srv).await;
    let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
    let observer = keep_reporting(&srv, vec![("observer".into(), None)], Some(refused.clone()));

    hung.abort();
    let name = db_name(&srv);
    let mut admin = admin_conn().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();
    // A deadline, not a timing: on a loaded machine the pool may take seconds to give up.
    wait_for("refused reports", Duration::from_secs(30), || async {
        (refused.lock().unwrap().len() >= 3).then_some(())
    })
    .await;
    let outage_ms = 3_000;
    tokio::time::sleep(Duration::from_millis(outage_ms)).await;
    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let reset = wait_for(
        "the reset after the pause",
        Duration::from_secs(20),
        || async { history(&srv, id).await.first().cloned() },
    )
    .await;
    observer.abort();
    let last_refused_sent = *refused.lock().unwrap().iter().max().unwrap();
    let stale_ms = 1_500;
    assert!(
        reset["created_ms"].as_i64().unwrap() >= last_refused_sent + stale_ms,
        "reset at {} but the last refused report was sent at {last_refused_sent}",
        reset["created_ms"]
    );
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opted_out_vm_is_never_reset_automatically() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve2"),
    ])
    .await;
    let mut srv = start(Backend::Sqlite, &fake, &[("STORM_PERCENT", "100")]).await;
    report_vm(&srv, 100, "pve1", 5000).await;
    let opted_out = report_vm(&srv, 101, "pve2", 5000).await;
    let (status, _) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{opted_out}/auto-reset"),
            Some(ADMIN_TOKEN),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    wait_for(
        "the reset of the other VM",
        Duration::from_secs(15),
        || async { (!fake.posts().is_empty()).then_some(()) },
    )
    .await;
    wait_rounds(&srv, 15).await;
    assert_eq!(fake.posts(), vec!["reboot 100"]);
    let v = vm(&srv, opted_out).await;
    assert_eq!(
        (v["status"].clone(), v["auto_reset"].clone()),
        (json!("down"), json!(false))
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_link_is_kept_and_used_and_unlinked_vms_cannot_be_reset() {
    let fake = FakePve::start(vec![FakeVm::running(105, "pve2")]).await;
    fake.state.lock().unwrap().task_duration = Duration::from_secs(2);
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let id = report_plain(&srv, "nameless", None).await;
    let link = format!("/api/vms/{id}/proxmox");
    let reset = format!("/api/vms/{id}/reset");

    let (status, body) = srv
        .send(Method::POST, &reset, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (
            409,
            json!("the VM is not linked to a Proxmox guest; link it with PUT /api/vms/:id/proxmox")
        )
    );
    let (status, body) = srv
        .send(
            Method::PUT,
            &link,
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve2"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = srv
        .send(
            Method::PUT,
            &link,
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve2", "vmid": 105, "type": "qemu"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["proxmox_link_source"], "manual");
    let (status, _) = srv
        .send(
            Method::PUT,
            "/api/vms/999999/proxmox",
            Some(ADMIN_TOKEN),
            Some(json!({"node": null, "vmid": null})),
        )
        .await;
    assert_eq!(status, 404);

    // Link refreshes find nothing for this hostname and must not drop the manual link.
    wait_for("the hung VM's reset", Duration::from_secs(15), || async {
        (fake.posts() == vec!["reboot 105"]).then_some(())
    })
    .await;
    let v = vm(&srv, id).await;
    assert_eq!(v["proxmox_link_source"], "manual", "{v}");
    let (status, body) = srv
        .send(Method::POST, &reset, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, 409, "an action is in flight: {body}");
    wait_for("the task to end", Duration::from_secs(15), || async {
        (history(&srv, id).await.first()?["outcome"] == "ok").then_some(())
    })
    .await;

    let (status, _) = srv
        .send(
            Method::PUT,
            &link,
            Some(ADMIN_TOKEN),
            Some(json!({"node": null, "vmid": null})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = srv
        .send(Method::POST, &reset, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (
            409,
            json!("the VM is not linked to a Proxmox guest; link it with PUT /api/vms/:id/proxmox")
        )
    );
    // The unlink stays, even while the agent claims the guest's VMID and refreshes run.
    let mut claim = report_for("nameless");
    claim["vmid"] = json!(105);
    assert_eq!(srv.report(&claim).await.0, 200);
    wait_rounds(&srv, 10).await;
    let v = vm(&srv, id).await;
    assert_eq!(v["proxmox_vmid"], Value::Null, "{v}");
    assert_eq!(fake.posts(), vec!["reboot 105"]);
    srv.stop().await;
}

/// The server binary killed with SIGKILL under load: every report answered 200 is in the
/// database afterwards, each stored once.
async fn acknowledged_reports_survive_a_kill_9(backend: Backend) {
    let db = fresh_db(backend).await;
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("DATA_DIR", db.dir.path())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("AGENT_TOKEN", AGENT_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "error")
        .env("TLS", "off")
        .env("ENROLMENT_RATE_PER_MINUTE", "1000000")
        .env("SITE_ROOT", workspace_root().join("target/site"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for("the server to answer", Duration::from_secs(30), || async {
        http.get(format!("{base}/api/health"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..16)
        .map(|client| {
            let (http, url, acked) = (
                http.clone(),
                format!("{base}/api/health/report"),
                acked.clone(),
            );
            tokio::spawn(async move {
                for n in 0.. {
                    let host = format!("crash-{client}-{n}");
                    let sent = http
                        .post(&url)
                        .bearer_auth(AGENT_TOKEN)
                        .json(&report_for(&host))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => acked.lock().unwrap().push(host),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    wait_for("acknowledged reports", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= 300).then_some(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let mut srv = TestServer::start_on(db, &[]).await;
    let (_, vms) = srv.get("/api/vms").await;
    let stored: std::collections::HashSet<String> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["hostname"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|h| !stored.contains(*h)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged reports lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert_eq!(
        srv.metric_rows().await,
        i64::try_from(stored.len()).unwrap(),
        "a report stored twice"
    );
    srv.stop().await;
}
both_backends!(acknowledged_reports_survive_a_kill_9);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_reset_switched_off_resets_nothing_and_says_why() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("AUTO_RESET_ENABLED", "false")]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    wait_for("the VM to go down", Duration::from_secs(10), || async {
        (vm(&srv, id).await["status"] == "down").then_some(())
    })
    .await;
    wait_rounds(&srv, 20).await;
    assert_eq!(fake.action_attempts(), Vec::<String>::new());
    let (_, health) = srv.get("/api/health").await;
    assert_eq!(
        health["remediation"]["reason"], "auto-reset off (settings page or AUTO_RESET_ENABLED)",
        "{health}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_proxmox_the_monitor_runs_and_says_auto_reset_is_off() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    assert_eq!(srv.report(&report_for("standalone")).await.0, 200);
    let (status, health) = srv.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["remediation"]["active"], false, "{health}");
    let reason = health["remediation"]["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("auto-reset off: "), "{reason}");
    let page = srv.page("/").await;
    assert!(
        page.contains(&reason),
        "the dashboard does not say: {reason}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ha_managed_guests_are_reset_only_when_allowed() {
    let mut ha = FakeVm::running(100, "pve1");
    ha.ha_managed = true;
    let fake = FakePve::start(vec![ha]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("REMEDIATE_HA_VMS", "true")]).await;
    report_vm(&srv, 100, "pve1", 5000).await;
    wait_for(
        "the reset of the HA guest",
        Duration::from_secs(15),
        || async { (fake.posts() == vec!["reboot 100"]).then_some(()) },
    )
    .await;
    srv.stop().await;
}

/// Two VMs linked to one guest (a store edited by hand; the link routes refuse to make such a
/// pair): the guest is never reset while both links stand, and the VM says why; once the
/// wrong link is removed, the right VM's silence is acted on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_linked_to_two_vms_is_never_reset() {
    let fake = FakePve::start(vec![FakeVm::running(108, "pve2")]).await;
    // The breaker off: one of two linked VMs down would otherwise pause everything.
    let mut srv = start(Backend::Sqlite, &fake, &[("STORM_PERCENT", "100")]).await;
    let right = report_vm(&srv, 108, "pve2", 5000).await;
    let (status, body) = srv.report(&report_for("twin")).await;
    assert_eq!(status, 200, "{body}");
    let twin = body["vm_id"].as_i64().unwrap();
    {
        use diesel_async::RunQueryDsl;
        let mut conn = srv.state().db.conn().await.unwrap();
        let sql = format!(
            "UPDATE vms SET proxmox_node = 'pve2', proxmox_vmid = 108, proxmox_type = 'qemu', \
             proxmox_link_source = 'manual', link_verified = true WHERE id = {twin}"
        );
        match &mut conn {
            server::db::Conn::Sqlite(c) => {
                diesel::sql_query(sql).execute(&mut **c).await.unwrap();
            }
            server::db::Conn::Postgres(c) => {
                diesel::sql_query(sql).execute(&mut **c).await.unwrap();
            }
        };
    }
    // The twin keeps reporting; the right VM falls silent (the stale timeout here is 1.5 s).
    let twin_alive = {
        let (http, url) = (srv.http.clone(), srv.url("/api/health/report"));
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for("twin"))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    wait_active(&srv).await;
    let reason = wait_for(
        "the VM to say why it is not acted on",
        Duration::from_secs(15),
        || async {
            let v = vm(&srv, right).await;
            let reason = v["phase_reason"].as_str().unwrap_or_default().to_owned();
            (v["status"] == "down" && reason.contains("also linked")).then_some(reason)
        },
    )
    .await;
    assert!(reason.contains(&format!("vm {twin}")), "{reason}");
    wait_rounds(&srv, 20).await;
    assert_eq!(
        fake.action_attempts(),
        Vec::<String>::new(),
        "nothing powered"
    );

    let (status, body) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{twin}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": null, "vmid": null})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the reset once unambiguous",
        Duration::from_secs(20),
        || async { (!fake.posts().is_empty()).then_some(()) },
    )
    .await;
    twin_alive.abort();
    srv.stop().await;
}

/// Root in one guest claims another guest's VMID (under fresh hostnames, again and again)
/// and falls silent: the claim is shown for approval and nothing is ever reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claimed_vmid_never_gets_a_guest_reset() {
    let fake = FakePve::start(vec![FakeVm::running(108, "pve2")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let forge = |hostname: &str| {
        let mut forged = report_for(hostname);
        forged["vmid"] = json!(108);
        forged["node"] = json!("pve2");
        forged
    };
    let down_with_claim = |id: i64| {
        let srv = &srv;
        async move {
            wait_for(
                "the claim to show as a proposal",
                Duration::from_secs(10),
                || async {
                    let v = vm(srv, id).await;
                    (v["status"] == "down" && v["proxmox_vmid"] == 108).then_some(v)
                },
            )
            .await
        }
    };
    let (status, body) = srv.report(&forge("zz1")).await;
    assert_eq!(status, 200, "{body}");
    let first = body["vm_id"].as_i64().unwrap();
    let v = down_with_claim(first).await;
    assert_eq!(
        (v["proxmox_link_source"].clone(), v["link_verified"].clone()),
        (json!("report"), json!(false)),
        "{v}"
    );
    wait_rounds(&srv, 20).await;
    assert_eq!(fake.action_attempts(), Vec::<String>::new());

    // A fresh hostname each time changes nothing.
    for hostname in ["zz2", "zz3"] {
        let (_, body) = srv.report(&forge(hostname)).await;
        let v = down_with_claim(body["vm_id"].as_i64().unwrap()).await;
        assert_eq!(v["link_verified"], false, "{v}");
    }
    wait_rounds(&srv, 10).await;
    assert_eq!(fake.action_attempts(), Vec::<String>::new());

    // An operator's reset waits for the approval too.
    let (status, body) = srv
        .send(
            Method::POST,
            &format!("/api/vms/{first}/reset"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(error_text(&body).contains("confirm it with PUT"), "{body}");
    let page = srv.page("/").await;
    assert!(
        page.contains("link pending approval"),
        "the dashboard does not say so"
    );
    assert_eq!(fake.action_attempts(), Vec::<String>::new());
    srv.stop().await;
}

/// An SMBIOS uuid match is a proposal by default and a link where auto-approval is on.
async fn uuid_link(auto_approve: Option<&str>) -> (Value, Vec<String>) {
    let uuid = "4c4c4544-0000-1000-8000-000000000108";
    let mut guest = FakeVm::running(108, "pve2");
    guest.smbios_uuid = Some(uuid.into());
    let fake = FakePve::start(vec![guest]).await;
    let env: Vec<(&str, &str)> = auto_approve
        .map(|v| ("LINK_AUTO_APPROVE", v))
        .into_iter()
        .collect();
    let mut srv = start(Backend::Sqlite, &fake, &env).await;
    // The agent also says its VMID: the uuid still decides (and is still looked up).
    let mut r = report_for("by-uuid");
    r["machine_id"] = json!(uuid);
    r["vmid"] = json!(108);
    let (status, body) = srv.report(&r).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    let v = wait_for("the uuid match", Duration::from_secs(10), || async {
        let v = vm(&srv, id).await;
        (v["proxmox_link_source"] == "smbios" && v["status"] == "down").then_some(v)
    })
    .await;
    wait_rounds(&srv, 20).await;
    let attempts = fake.action_attempts();
    srv.stop().await;
    (v, attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_uuid_match_links_only_where_auto_approval_is_on() {
    let (proposed, attempts) = uuid_link(None).await;
    assert_eq!(proposed["link_verified"], false, "{proposed}");
    assert_eq!(attempts, Vec::<String>::new());
    let (linked, attempts) = uuid_link(Some("uuid")).await;
    assert_eq!(linked["link_verified"], true, "{linked}");
    assert_eq!(attempts, vec!["reboot 108"]);
}

/// A new VM's link shows within seconds of its first report, not at the next periodic
/// refresh (here ten minutes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_vm_is_linked_within_seconds_of_its_first_report() {
    let uuid = "4c4c4544-0000-1000-8000-000000000207";
    let mut guest = FakeVm::running(207, "pve1");
    guest.smbios_uuid = Some(uuid.into());
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1"), guest]).await;
    let slow_refresh = [("LINK_REFRESH_MS", "600000"), ("LINK_AUTO_APPROVE", "uuid")];
    let mut srv = start(Backend::Sqlite, &fake, &slow_refresh).await;
    // The first refresh runs at start-up.
    wait_rounds(&srv, 3).await;
    let id = report_plain(&srv, "newcomer", Some(uuid)).await;
    let v = wait_for("the link of the new VM", Duration::from_secs(5), || async {
        let v = vm(&srv, id).await;
        (v["proxmox_vmid"] == 207).then_some(v)
    })
    .await;
    assert_eq!(
        (v["proxmox_link_source"].clone(), v["link_verified"].clone()),
        (json!("smbios"), json!(true))
    );
    srv.stop().await;
}

/// A link that changed after it was read is neither overwritten by a link refresh nor
/// acted on by a reset decided on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_changed_meanwhile_is_neither_overwritten_nor_acted_on() {
    use server::db::incidents::{Expected, LinkAsRead, begin_attempt, replace_link};
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let id = report_plain(&srv, "contested-link", None).await;
    let guest = |vmid: i64| domain::GuestRef {
        node: "pve1".parse().unwrap(),
        vmid: domain::Vmid::try_from(vmid).unwrap(),
        kind: domain::GuestKind::Qemu,
    };
    // A refresh read the VM unlinked; an operator then confirmed guest 100.
    let stale = LinkAsRead {
        guest: None,
        source: None,
        verified: false,
    };
    let (status, _) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{id}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve1", "vmid": 100})),
        )
        .await;
    assert_eq!(status, 200);
    let mut conn = srv.state().db.conn().await.unwrap();
    let proposal = (guest(100), domain::LinkSource::Report);
    let vm_id = domain::VmId(id);
    assert!(
        !replace_link(&mut conn, vm_id, &stale, Some(&proposal), false)
            .await
            .unwrap()
    );
    drop(conn);
    let v = vm(&srv, id).await;
    assert_eq!(
        (v["proxmox_link_source"].clone(), v["link_verified"].clone()),
        (json!("manual"), json!(true))
    );

    // A reset decided for guest 101 (the link before) is refused; for 100 it goes ahead.
    let mut conn = srv.state().db.conn().await.unwrap();
    let expected = |vmid: i64| Expected {
        phase: domain::RemediationPhase::Ok,
        attempts: 0,
        last_reset_ms: None,
        still_down_since: None,
        linked_vmid: Some(vmid),
    };
    let old = begin_attempt(
        &mut conn,
        &expected(101),
        true,
        "old link",
        &attempt_at(id, 1_000, "a"),
    )
    .await
    .unwrap();
    assert_eq!(old, None);
    let current = begin_attempt(
        &mut conn,
        &expected(100),
        true,
        "link",
        &attempt_at(id, 1_001, "b"),
    )
    .await
    .unwrap();
    assert!(current.is_some());
    drop(conn);
    srv.stop().await;
}

/// A guest destroyed and a new one given its VMID: the new guest does not inherit the old
/// one's uuid link, and is not reset when the VM that was linked falls silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reused_vmid_does_not_inherit_a_uuid_link() {
    let uuid = "4c4c4544-0000-1000-8000-000000000109";
    let mut original = FakeVm::running(109, "pve1");
    original.smbios_uuid = Some(uuid.into());
    let fake = FakePve::start(vec![original]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[("LINK_AUTO_APPROVE", "uuid")]).await;
    let id = report_plain(&srv, "old-109", Some(uuid)).await;
    let mut r = report_for("old-109");
    r["machine_id"] = json!(uuid);
    let keeper = {
        let (http, url, r) = (srv.http.clone(), srv.url("/api/health/report"), r.clone());
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&r)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    wait_for("the uuid link", Duration::from_secs(10), || async {
        (vm(&srv, id).await["link_verified"] == true).then_some(())
    })
    .await;
    // VM 109 destroyed; a new guest takes its VMID.
    fake.with_vm(109, |g| {
        g.name = "new-109".into();
        g.smbios_uuid = Some("4c4c4544-0000-1000-8000-0000000009ff".into());
    });
    wait_for("the old link to go", Duration::from_secs(10), || async {
        (vm(&srv, id).await["link_verified"] == false).then_some(())
    })
    .await;
    keeper.abort();
    wait_for("the old VM to go down", Duration::from_secs(10), || async {
        (vm(&srv, id).await["status"] == "down").then_some(())
    })
    .await;
    wait_rounds(&srv, 15).await;
    assert_eq!(fake.action_attempts(), Vec::<String>::new());
    srv.stop().await;
}
