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
        let written = write_batch_via(&db, &batch, &cfg, path).await.unwrap();
        assert!(
            written.outcomes.iter().all(Result::is_ok),
            "{:?}",
            written.outcomes
        );
        // What the batch hands the cache is what a read after the commit finds: every VM
        // it changed, as committed, at its row's revision.
        let mut handed = written.views;
        handed.sort_by_key(|v| v.view.id);
        let mut ids: Vec<domain::VmId> = written
            .outcomes
            .iter()
            .map(|o| o.as_ref().unwrap().vm_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut conn = db.conn().await.unwrap();
        let mut read = store::vms_by_ids(&mut conn, &ids).await.unwrap();
        read.sort_by_key(|v| v.view.id);
        assert_eq!(handed, read, "{backend:?} {path:?}: batch {n}");
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

/// A fleet crossing every status, phase and kind of link, stored through the real write
/// path and then set row by row.
async fn mixed_fleet(db: &Db) -> Vec<store::VmRow> {
    use domain::{RemediationPhase, VmStatus};
    let mut batch = Vec::new();
    let mut shapes = Vec::new();
    let mut n = 0;
    for status in VmStatus::ALL {
        for phase in RemediationPhase::ALL {
            // Linked and verified on pve1 or pve2, linked unverified, unlinked, linked to a
            // node name no valid row can hold; auto-reset on and off; a look planned later.
            for (link, auto_reset, later) in [
                ("'pve1', 101, 'qemu', 1", true, false),
                ("'pve2', 102, 'qemu', 1", false, false),
                ("'pve2', 103, 'qemu', 1", true, true),
                ("'pve1', 104, 'qemu', 0", true, false),
                ("NULL, NULL, NULL, 0", true, false),
                ("'not a node!', 105, 'qemu', 1", true, false),
            ] {
                let host = format!("mixed-{n:03}");
                n += 1;
                batch.push(beat(&host, 10.0, T0, T0, json!({})));
                shapes.push((host, *status, *phase, link, auto_reset, later));
            }
        }
    }
    let outcomes = write_batch_via(db, &batch, &StatusConfig::default(), StatePath::SetBased)
        .await
        .unwrap()
        .outcomes;
    assert!(outcomes.iter().all(Result::is_ok));
    let mut sql = String::new();
    for (host, status, phase, link, auto_reset, later) in &shapes {
        let (node, vmid, kind, verified) = {
            let parts: Vec<&str> = link.split(", ").collect();
            (parts[0], parts[1], parts[2], parts[3])
        };
        sql.push_str(&format!(
            "UPDATE vms SET status = '{}', remediation_phase = '{}', proxmox_node = {node}, \
             proxmox_vmid = {vmid}, proxmox_type = {kind}, link_verified = {}, auto_reset = {}, \
             next_action_ms = {} WHERE hostname = '{host}';",
            status.as_str(),
            phase.as_str(),
            if verified == "1" { "TRUE" } else { "FALSE" },
            if *auto_reset { "TRUE" } else { "FALSE" },
            if *later { "9000000000000" } else { "NULL" },
        ));
    }
    let mut conn = db.conn().await.unwrap();
    server::with_conn!(conn, |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(c, &sql).await
    })
    .unwrap();
    store::list_rows(&mut conn).await.unwrap()
}

fn facts(row: &store::VmRow) -> domain::policy::VmFacts {
    let guest = row.verified_guest();
    domain::policy::VmFacts {
        id: row.vm_id(),
        status: row.status(),
        node: guest.as_ref().map(|g| g.node.clone()),
        linked: guest.is_some(),
        auto_reset: row.auto_reset,
        phase: row.phase(),
        attempts: row.incident_attempts,
        next_action_ms: row.next_action_ms,
        last_reset_ms: row.last_reset_ms,
    }
}

/// The remediation round reads only what it may act on, and counts the storm in the
/// database: both must see what a round over the whole fleet saw.
async fn the_round_reads_every_row_it_can_act_on_and_counts_the_storm_like_the_fleet(
    backend: Backend,
) {
    use domain::RemediationPhase;
    use domain::policy::{self, Screen};
    let test_db = fresh_db(backend).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let all = mixed_fleet(&db).await;
    let mut conn = db.conn().await.unwrap();
    let mut read: Vec<i64> = store::open_incident_rows(&mut conn)
        .await
        .unwrap()
        .iter()
        .chain(&store::stale_candidate_rows(&mut conn).await.unwrap())
        .map(|r| r.id)
        .collect();
    read.sort_unstable();
    read.dedup();
    let needed: Vec<i64> = all
        .iter()
        .filter(|r| {
            policy::screen(&facts(r), T0) == Screen::Candidate
                || matches!(
                    r.phase(),
                    RemediationPhase::ResetScheduled
                        | RemediationPhase::ResetPending
                        | RemediationPhase::Recovering
                )
        })
        .map(|r| r.id)
        .collect();
    assert!(!needed.is_empty());
    for id in &needed {
        assert!(read.contains(id), "{backend:?}: VM {id} was not read");
    }
    assert!(
        read.len() < all.len() / 2,
        "{backend:?}: {} of {} rows read; the round is not narrowed",
        read.len(),
        all.len()
    );

    let facts: Vec<_> = all.iter().map(facts).collect();
    let counted = store::storm_tallies(&mut conn).await.unwrap();
    assert_eq!(counted, policy::tally(&facts), "{backend:?}");
    assert_eq!(
        policy::storm_of(&counted, &Default::default()),
        policy::storm(&facts, &Default::default()),
        "{backend:?}"
    );

    // A fleet with one stale VM is not counted at all: it cannot be a storm.
    server::with_conn!(conn, |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(
            c,
            "UPDATE vms SET status = 'healthy' WHERE id <> (SELECT MIN(id) FROM vms WHERE status = 'down' AND link_verified AND proxmox_node = 'pve1' AND remediation_phase <> 'manual')",
        )
        .await
    })
    .unwrap();
    assert_eq!(store::storm_tallies(&mut conn).await.unwrap(), Vec::new());
}
crate::both_backends!(the_round_reads_every_row_it_can_act_on_and_counts_the_storm_like_the_fleet);

/// A whole fleet going silent at once (more VMs than one page of the stale check and one
/// slice of the cache refresh) is marked down in one round, and the dashboard's cache
/// shows every one of them down.
async fn a_whole_fleet_going_silent_at_once_is_all_marked_and_shown_down(backend: Backend) {
    const FLEET: usize = 6_000;
    let mut srv = TestServer::start(backend, &[]).await;
    let state = srv.state().clone();
    // The test's own clock, ahead of the server's: its scheduler never finds these stale.
    let now = T0;
    let batch: Vec<Submission> = (0..FLEET)
        .map(|i| beat(&format!("silent-{i:05}"), 10.0, now, now, json!({})))
        .collect();
    for chunk in batch.chunks(500) {
        let outcomes = write_batch_via(
            &state.db,
            chunk,
            &StatusConfig::default(),
            StatePath::SetBased,
        )
        .await
        .unwrap()
        .outcomes;
        assert!(outcomes.iter().all(Result::is_ok));
    }
    let later = now + StatusConfig::default().stale_timeout_ms + 60_000;
    let changed = server::scheduler::mark_stale(&state, later).await.unwrap();
    assert_eq!(changed.len(), FLEET, "{backend:?}");
    let views = state.cache.local_views().unwrap();
    let down = views
        .iter()
        .filter(|v| v.hostname.starts_with("silent-") && v.status == domain::VmStatus::Down)
        .count();
    assert_eq!(
        down, FLEET,
        "{backend:?}: the cache shows {down} of them down"
    );
    let mut conn = state.db.conn().await.unwrap();
    assert_eq!(
        store::status_counts(&mut conn).await.unwrap().down,
        u64::try_from(FLEET).unwrap()
    );
    srv.stop().await;
}
crate::both_backends!(a_whole_fleet_going_silent_at_once_is_all_marked_and_shown_down);

/// On PostgreSQL, a batch of reports and the stale check over the same VMs at the same
/// moment never deadlock: both take the rows' locks in id order, whatever order the
/// reports arrived in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_and_the_stale_check_on_the_same_vms_never_deadlock() {
    const FLEET: usize = 400;
    let test_db = fresh_db(Backend::Postgres).await;
    let db = Db::connect(&test_db.url, 4).await.unwrap();
    let cfg = StatusConfig::default();
    // The VMs in a different order each round (173 is prime to the fleet's size, so each
    // order is a permutation), never the order their ids were given in.
    let batch = |at: i64, round: usize| -> Vec<Submission> {
        (0..FLEET)
            .map(|i| (i * 173 + round * 31) % FLEET)
            .map(|i| beat(&format!("busy-{i:03}"), 10.0, at, at, json!({})))
            .collect()
    };
    let first: Vec<Submission> = (0..FLEET)
        .map(|i| beat(&format!("busy-{i:03}"), 10.0, T0, T0, json!({})))
        .collect();
    write_batch_via(&db, &first, &cfg, StatePath::SetBased)
        .await
        .unwrap();
    for round in 0..30 {
        let at = T0 + i64::try_from(round + 1).unwrap() * cfg.stale_timeout_ms * 2;
        let reports = {
            let db = db.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                write_batch_via(&db, &batch(at, round), &cfg, StatePath::SetBased).await
            })
        };
        let stale = {
            let db = db.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let mut conn = db.conn().await?;
                let rows = store::overdue_rows(&mut conn, cfg.stale_timeout_ms, at).await?;
                let verdicts = server::scheduler::judge(&rows, &cfg, at);
                store::apply_verdicts(&mut conn, &verdicts, at).await
            })
        };
        let (reports, stale) = (reports.await.unwrap(), stale.await.unwrap());
        assert!(reports.is_ok(), "round {round}: {:?}", reports.err());
        assert!(stale.is_ok(), "round {round}: {:?}", stale.err());
    }
}

/// The stale check's set-based verdicts (one statement per 2,000 VMs) change exactly what
/// one statement per VM changed: the same rows, the same status changes; and a verdict
/// judged from a status or a heartbeat the VM no longer has is skipped by both (a report
/// that landed between the read and the write, even one that kept the status, wins).
async fn set_based_verdicts_change_what_one_by_one_changed(backend: Backend) {
    use domain::VmStatus;
    let mut results = Vec::new();
    for set_based in [true, false] {
        let test_db = fresh_db(backend).await;
        let db = Db::connect(&test_db.url, 2).await.unwrap();
        let rows = mixed_fleet(&db).await;
        let cfg = StatusConfig::default();
        let later = T0 + cfg.stale_timeout_ms + 60_000;
        let mut verdicts = server::scheduler::judge(&rows, &cfg, later);
        assert!(verdicts.len() > 10, "{}", verdicts.len());
        // A report moved this VM meanwhile: its verdict was judged from another status.
        let moved = verdicts[0].vm_id;
        verdicts[0].from = if verdicts[0].from == VmStatus::Healthy {
            VmStatus::Warning
        } else {
            VmStatus::Healthy
        };
        // This one was judged from an older heartbeat than the one it has now.
        let refreshed = verdicts[1].vm_id;
        verdicts[1].seen_ms = verdicts[1].seen_ms.map(|ms| ms - 1);
        assert!(verdicts[1].seen_ms.is_some());
        let mut conn = db.conn().await.unwrap();
        let mut changed = if set_based {
            store::apply_verdicts(&mut conn, &verdicts, later).await
        } else {
            store::apply_verdicts_one_by_one(&mut conn, &verdicts, later).await
        }
        .unwrap();
        changed.sort_unstable();
        assert!(!changed.contains(&moved), "set-based: {set_based}");
        assert!(!changed.contains(&refreshed), "set-based: {set_based}");
        assert_eq!(changed.len(), verdicts.len() - 2, "set-based: {set_based}");
        let vms = store::list_vms(&mut conn).await.unwrap();
        let mut changes = Vec::new();
        let mut states = Vec::new();
        for vm in &vms {
            states.push(format!(
                "{} {:?} {} {}",
                vm.hostname, vm.status, vm.status_since_ms, vm.status_reason
            ));
            for c in store::status_changes_for(&mut conn, vm.id).await.unwrap() {
                changes.push(format!("{} {c:?}", vm.hostname));
            }
        }
        let changed: Vec<i64> = changed.iter().map(|id| id.get()).collect();
        results.push((changed, states, changes));
    }
    assert_eq!(results[0], results[1]);
}
crate::both_backends!(set_based_verdicts_change_what_one_by_one_changed);

/// Every kind of write to a VM's row raises its revision, which is how the state cache
/// orders two writers' views of one VM: the batch's own statement, the stale check's
/// verdicts, an operator's switch through the query builder, and plain SQL (the trigger).
async fn every_write_to_a_vm_raises_its_revision(backend: Backend) {
    let test_db = fresh_db(backend).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    let report = |at: i64| vec![beat("revised", 10.0, at, at, json!({}))];
    let first = write_batch_via(&db, &report(T0), &cfg, StatePath::SetBased)
        .await
        .unwrap();
    let id = first.views[0].view.id;
    let mut conn = db.conn().await.unwrap();
    let mut revisions = vec![("first report", first.views[0].revision)];
    async fn revision_of(conn: &mut server::db::Conn, id: domain::VmId) -> i64 {
        store::vms_by_ids(conn, &[id]).await.unwrap()[0].revision
    }

    let t1 = T0 + 30_000;
    write_batch_via(&db, &report(t1), &cfg, StatePath::SetBased)
        .await
        .unwrap();
    revisions.push(("second report", revision_of(&mut conn, id).await));
    write_batch_via(&db, &report(t1 + 1), &cfg, StatePath::OneByOne)
        .await
        .unwrap();
    revisions.push(("one by one", revision_of(&mut conn, id).await));
    assert!(
        server::db::incidents::set_auto_reset(&mut conn, id, false)
            .await
            .unwrap()
    );
    revisions.push(("auto-reset off", revision_of(&mut conn, id).await));
    let later = t1 + cfg.stale_timeout_ms + 1_000;
    let rows = store::overdue_rows(&mut conn, cfg.stale_timeout_ms, later)
        .await
        .unwrap();
    let verdicts = server::scheduler::judge(&rows, &cfg, later);
    assert_eq!(
        store::apply_verdicts(&mut conn, &verdicts, later)
            .await
            .unwrap(),
        vec![id]
    );
    revisions.push(("stale verdict", revision_of(&mut conn, id).await));
    server::with_conn!(conn, |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(
            c,
            "UPDATE vms SET phase_reason = 'by hand'",
        )
        .await
    })
    .unwrap();
    revisions.push(("plain SQL", revision_of(&mut conn, id).await));
    assert!(
        revisions.windows(2).all(|w| w[1].1 > w[0].1),
        "{backend:?}: {revisions:?}"
    );
}
crate::both_backends!(every_write_to_a_vm_raises_its_revision);

/// Two replicas on one database get the first reports of the same new VMs at the same
/// moment: each VM is created once (the batch that loses the race on the unique index is
/// retried and finds the winner's row), every report is answered 200 and stored once.
async fn replicas_creating_the_same_vms_at_once_create_each_once(backend: Backend) {
    const HOSTS: usize = 120;
    let db = fresh_db(backend).await;
    let second = TestDb {
        url: db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut a = TestServer::start_on(db, &[]).await;
    let mut b = TestServer::start_on(second, &[]).await;
    // Half the VMs send a uuid (matched by it), half only a name.
    let bodies: Vec<Value> = (0..HOSTS)
        .map(|i| {
            let mut body = crate::common::report_for(&format!("twin-{i:03}"));
            if i % 2 == 0 {
                body["machine_id"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
            }
            body
        })
        .collect();
    let mut sends = Vec::new();
    for body in &bodies {
        for srv in [&a, &b] {
            let (http, url, body) = (
                srv.http.clone(),
                srv.url("/api/health/report"),
                body.clone(),
            );
            sends.push(tokio::spawn(async move {
                let resp = http
                    .post(url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
            }));
        }
    }
    let mut ids = std::collections::HashMap::new();
    for send in sends {
        let (status, answer) = send.await.unwrap();
        assert_eq!(status, 200, "{backend:?}: {answer}");
        ids.entry(answer["vm_id"].as_i64().unwrap())
            .and_modify(|n| *n += 1)
            .or_insert(1);
    }
    assert_eq!(
        ids.len(),
        HOSTS,
        "{backend:?}: both replicas answered with one VM per host"
    );
    assert!(ids.values().all(|n| *n == 2), "{backend:?}: {ids:?}");
    let mut conn = a.state().db.conn().await.unwrap();
    let vms = store::list_vms(&mut conn).await.unwrap();
    assert_eq!(vms.len(), HOSTS, "{backend:?}: a VM was created twice");
    assert_eq!(a.metric_rows().await, i64::try_from(2 * HOSTS).unwrap());
    drop(conn);
    b.stop().await;
    a.stop().await;
}
crate::both_backends!(replicas_creating_the_same_vms_at_once_create_each_once);

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Waits until a session of this database waits for a row lock.
async fn until_a_session_waits_for_a_lock(url: &str) {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let watcher = std::sync::Arc::new(tokio::sync::Mutex::new(
        diesel_async::AsyncPgConnection::establish(url)
            .await
            .unwrap(),
    ));
    wait_for(
        "a session to wait for a row lock",
        std::time::Duration::from_secs(10),
        || {
            let watcher = watcher.clone();
            async move {
                let mut watcher = watcher.lock().await;
                let waiting: Count = diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .get_result(&mut *watcher)
                .await
                .unwrap();
                (waiting.n >= 1).then_some(())
            }
        },
    )
    .await;
}

/// On PostgreSQL a batch reads its VMs before it locks them: a writer that commits in
/// between (here the stale check's verdict, held open until the batch waits for the row)
/// is what the batch plans from, so the VM's way back from down is recorded and dated by
/// the report, not written over from the row as it was before the verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_plans_from_its_rows_as_locked_not_as_first_read() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let test_db = fresh_db(Backend::Postgres).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    let first = write_batch_via(
        &db,
        &[beat("raced", 10.0, T0, T0, json!({}))],
        &cfg,
        StatePath::SetBased,
    )
    .await
    .unwrap();
    let id = first.views[0].view.id;
    let verdict_at = T0 + cfg.stale_timeout_ms + 1_000;
    let mut verdict = diesel_async::AsyncPgConnection::establish(&test_db.url)
        .await
        .unwrap();
    verdict
        .batch_execute(&format!(
            "BEGIN; UPDATE vms SET status = 'down', status_since_ms = {verdict_at}, \
             status_reason = 'no heartbeat' WHERE id = {}",
            id.get()
        ))
        .await
        .unwrap();
    let back_at = verdict_at + 5_000;
    let batch = {
        let (db, cfg) = (db.clone(), cfg.clone());
        tokio::spawn(async move {
            let report = [beat("raced", 10.0, back_at, back_at, json!({}))];
            write_batch_via(&db, &report, &cfg, StatePath::SetBased).await
        })
    };
    until_a_session_waits_for_a_lock(&test_db.url).await;
    verdict.batch_execute("COMMIT").await.unwrap();
    let written = batch.await.unwrap().unwrap();
    assert_eq!(written.views[0].view.status, domain::VmStatus::Healthy);
    assert_eq!(
        written.views[0].view.status_since_ms, back_at,
        "healthy again since the report, not since before the verdict"
    );
    let mut conn = db.conn().await.unwrap();
    let changes: Vec<(domain::VmStatus, domain::VmStatus)> =
        store::status_changes_for(&mut conn, id)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.from_status, c.to_status))
            .collect();
    assert!(
        changes.contains(&(domain::VmStatus::Down, domain::VmStatus::Healthy)),
        "the way back from down is recorded: {changes:?}"
    );
}

/// Two PostgreSQL transactions that lock two VMs in the other order deadlock, and the one
/// the database rolls back is a race the writer runs its batch again for (an enrolment's
/// hold on another VM comes before a batch's locks in id order, so replicas can meet so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadlock_victim_is_a_lost_race_the_batch_is_written_again_for() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
    let test_db = fresh_db(Backend::Postgres).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    let batch = [
        beat("first", 10.0, T0, T0, json!({})),
        beat("second", 10.0, T0, T0, json!({})),
    ];
    let written = write_batch_via(&db, &batch, &cfg, StatePath::SetBased)
        .await
        .unwrap();
    let ids: Vec<i64> = written.views.iter().map(|v| v.view.id.get()).collect();
    let touch = |id: i64| format!("UPDATE vms SET phase_reason = 'locked' WHERE id = {id}");
    let mut one = AsyncPgConnection::establish(&test_db.url).await.unwrap();
    let mut two = AsyncPgConnection::establish(&test_db.url).await.unwrap();
    one.batch_execute(&format!("BEGIN; {}", touch(ids[0])))
        .await
        .unwrap();
    two.batch_execute(&format!("BEGIN; {}", touch(ids[1])))
        .await
        .unwrap();
    let waiting = {
        let sql = touch(ids[1]);
        tokio::spawn(async move {
            let result = diesel::sql_query(sql).execute(&mut one).await;
            (result, one)
        })
    };
    until_a_session_waits_for_a_lock(&test_db.url).await;
    let closing = diesel::sql_query(touch(ids[0])).execute(&mut two).await;
    let (waited, _one) = waiting.await.unwrap();
    let victim = match (waited, closing) {
        (Err(err), Ok(_)) | (Ok(_), Err(err)) => err,
        other => panic!("expected exactly one deadlock victim: {other:?}"),
    };
    assert_eq!(
        server::ingest::lost_race(&server::db::DbError::Query(victim)),
        Some("deadlock with another writer")
    );
    // A report that is simply refused is no race.
    let refused = diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::CheckViolation,
        Box::new(String::from("new row violates check constraint")),
    );
    assert_eq!(
        server::ingest::lost_race(&server::db::DbError::Query(refused)),
        None
    );
}

/// A batch that holds a VM (an enrolment refused for carrying its uuid) and carries that
/// VM's own report with its credential plans from the row as held, on both backends: the
/// report releases the hold, as it would one batch later. Planned from the row as first
/// read, SQLite kept the hold and PostgreSQL released it.
async fn a_hold_written_in_a_batch_is_what_the_batch_plans_from(backend: Backend) {
    use server::enrolment::Presented;
    let test_db = fresh_db(backend).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    let uuid = json!({"machine_id": "00000000-0000-4000-8000-000000000042"});
    let enrolled = write_batch_via(
        &db,
        &[beat("claimed", 10.0, T0, T0, uuid.clone())],
        &cfg,
        StatePath::SetBased,
    )
    .await
    .unwrap();
    let admitted = enrolled.outcomes[0].as_ref().unwrap();
    let (id, secret) = (admitted.vm_id, admitted.credential.clone().unwrap());
    let with_credential = |at: i64| {
        let mut submission = beat("claimed", 10.0, at, at, uuid.clone());
        submission.presented = Presented::Credential {
            hash: server::auth::hash_token(secret.expose()),
        };
        submission
    };
    // The credential's first use confirms it: the VM's identity is taken from now on.
    write_batch_via(
        &db,
        &[with_credential(T0 + 1_000)],
        &cfg,
        StatePath::SetBased,
    )
    .await
    .unwrap();
    let t = T0 + 2_000;
    let batch = [
        beat("claimed", 10.0, t, t, uuid.clone()),
        with_credential(t + 1),
    ];
    let written = write_batch_via(&db, &batch, &cfg, StatePath::SetBased)
        .await
        .unwrap();
    assert!(
        written.outcomes[0].is_err(),
        "{backend:?}: the claim is refused"
    );
    assert!(
        written.outcomes[1].is_ok(),
        "{backend:?}: {:?}",
        written.outcomes[1]
    );
    let mut conn = db.conn().await.unwrap();
    let row = &store::vms_by_ids(&mut conn, &[id]).await.unwrap()[0];
    assert_eq!(
        row.view.remediation_phase,
        domain::RemediationPhase::Ok,
        "{backend:?}: released by the VM's own report in the same batch"
    );
    let events = server::db::incidents::recent_events(&mut conn, 50)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == domain::EventKind::EnrolmentRefused && e.vm_id == Some(id)),
        "{backend:?}: the refused claim is on record: {events:?}"
    );
}
crate::both_backends!(a_hold_written_in_a_batch_is_what_the_batch_plans_from);

/// Reports that break a unique key together fail no one else, on both backends. Two
/// enrolments with the fleet token carry one new uuid: the first names a VM stored without
/// a uuid (which would adopt it), the second a new host (created with it), so the batch's
/// update breaks `vms_machine_id`. Any guest holding the fleet token can send such a pair.
/// In one batch with eight others, every report is stored (written apart, each of the
/// pair finds the other's uuid committed), and the monitor counts no failure of its own,
/// which would refuse the whole batch and pause judging every VM for a stale timeout.
async fn reports_that_break_a_unique_key_together_fail_no_one_else(backend: Backend) {
    use server::ingest::Ingest;
    let test_db = fresh_db(backend).await;
    let db = Db::connect(&test_db.url, 2).await.unwrap();
    let cfg = StatusConfig::default();
    write_batch_via(
        &db,
        &[beat("no-uuid", 10.0, T0, T0, json!({}))],
        &cfg,
        StatePath::SetBased,
    )
    .await
    .unwrap();
    let uuid = json!({"machine_id": "00000000-0000-4000-8000-0000000000aa"});
    let t = T0 + 1_000;
    let mut batch: Vec<Submission> = (0..8)
        .map(|i| beat(&format!("bystander-{i}"), 10.0, t, t, json!({})))
        .collect();
    batch.insert(4, beat("no-uuid", 10.0, t, t, uuid.clone()));
    batch.insert(5, beat("newcomer", 10.0, t, t, uuid));
    // The pair alone, as one transaction, does break the key.
    let together = write_batch_via(&db, &batch[4..6], &cfg, StatePath::SetBased).await;
    assert!(
        together.as_ref().is_err_and(server::ingest::conflicts),
        "{backend:?}: {:?}",
        together.map(|w| w.outcomes)
    );

    let (live, _) = server::live::LiveBus::new(None);
    let cache = std::sync::Arc::new(server::cache::StateCache::new(None, live).unwrap());
    let health = server::health::JobHealth::default();
    let (ingest, writer) = Ingest::new(
        db.clone(),
        cache,
        server::settings::Shared::new(cfg),
        500,
        100,
        health.clone(),
        StatePath::SetBased,
    );
    // Everything queued before the writer starts goes into its first batch, in the order
    // queued: each report is queued before the next is sent.
    let mut answers = Vec::new();
    for (n, submission) in batch.into_iter().enumerate() {
        let queuing = ingest.clone();
        answers.push(tokio::spawn(
            async move { queuing.submit(submission).await },
        ));
        wait_for(
            "the report queued",
            std::time::Duration::from_secs(10),
            || async { (ingest.queued() == n + 1).then_some(()) },
        )
        .await;
    }
    tokio::spawn(writer.run());
    let mut outcomes = Vec::new();
    for answer in answers {
        outcomes.push(answer.await.unwrap().map(|stored| stored.vm_id));
    }
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{backend:?}: every report is stored: {outcomes:?}"
    );
    assert_eq!(
        health.last_ingest_failure_ms(),
        0,
        "{backend:?}: reports breaking a key counted as the monitor's own failure"
    );
    let mut conn = db.conn().await.unwrap();
    let vms = store::list_vms(&mut conn).await.unwrap();
    assert_eq!(vms.len(), 9, "{backend:?}: no VM created twice");
    let with_uuid = vms.iter().filter(|vm| vm.machine_id.is_some()).count();
    assert_eq!(with_uuid, 1, "{backend:?}: the uuid is held once");
}
crate::both_backends!(reports_that_break_a_unique_key_together_fail_no_one_else);
