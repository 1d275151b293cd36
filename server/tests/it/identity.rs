//! Per-VM credentials: enrolment, the credential as the only identity, claims, rotation,
//! revocation, enrolment tokens, and the move-over of agents that only know the fleet token.

use crate::both_backends;
use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::proxmox::{history, start, vm, wait_active, wait_rounds};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// Enrols `body` with the fleet token: its VM id and its new credential.
async fn enrol(srv: &TestServer, body: &Value) -> (i64, String) {
    let (status, answer) = srv.report(body).await;
    assert_eq!(status, 200, "{answer}");
    let credential = answer["credential"].as_str().unwrap().to_owned();
    assert!(
        credential.starts_with("vmhc_vm_") && credential.len() == "vmhc_vm_".len() + 64,
        "{credential}"
    );
    (answer["vm_id"].as_i64().unwrap(), credential)
}

async fn report_with(srv: &TestServer, body: &Value, credential: &str) -> (u16, Value) {
    srv.report_raw(body.to_string().into_bytes(), Some(credential))
        .await
}

async fn events(srv: &TestServer) -> Vec<Value> {
    let (status, body) = srv
        .send(Method::GET, "/api/remediation", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

fn with_uuid(hostname: &str, uuid: &str) -> Value {
    let mut body = report_for(hostname);
    body["machine_id"] = json!(uuid);
    body
}

const UUID_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const UUID_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

/// The first report with the fleet token enrols; from then on the credential is the VM,
/// and nobody can enrol as it again.
async fn a_credential_is_its_vm_and_its_identity_cannot_be_enrolled_twice(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (id, credential) = enrol(&srv, &with_uuid("web-01", UUID_A)).await;

    // Until its agent uses the credential, another enrolment as web-01 is stored as
    // web-01's (an agent from before credentials keeps reporting) but gets no credential,
    // and the one handed out stays valid: nobody can obtain or replace it.
    let (status, body) = srv.report(&with_uuid("web-01", UUID_A)).await;
    assert_eq!((status, body["vm_id"].as_i64()), (200, Some(id)), "{body}");
    assert!(body.get("credential").is_none(), "{body}");

    let (status, body) = report_with(&srv, &with_uuid("web-01", UUID_A), &credential).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["vm_id"], id);
    assert!(
        body.get("credential").is_none(),
        "a credential is sent once: {body}"
    );

    // Someone else with the fleet token asks to become web-01: refused, nothing stored.
    let rows = srv.metric_rows().await;
    let (status, body) = srv.report(&with_uuid("web-01", UUID_A)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.get("credential").is_none(), "{body}");
    assert_eq!(
        srv.metric_rows().await,
        rows,
        "a refused report stored a sample"
    );
    // Its name alone never reaches a VM that enrolled with a uuid: that is another VM.
    let (status, body) = srv.report(&report_for("web-01")).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["vm_id"], id, "a name alone adopted the VM");
    let (_, web01) = srv.get(&format!("/api/vms/{id}")).await;
    assert_eq!(web01["machine_id"], UUID_A);
    let refused: Vec<Value> = events(&srv)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "enrolment_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused.iter().all(|e| e["vm_id"] == id), "{refused:?}");

    // The VM's own agent still reports with its credential.
    let (status, _) = report_with(&srv, &with_uuid("web-01", UUID_A), &credential).await;
    assert_eq!(status, 200);
    srv.stop().await;
}
both_backends!(a_credential_is_its_vm_and_its_identity_cannot_be_enrolled_twice);

/// Unknown and revoked credentials are 401 and store nothing; a rotated credential works
/// at once and the old one stops; a revoked VM enrols again only with a valid token.
async fn unknown_revoked_and_rotated_credentials(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let body = with_uuid("db-01", UUID_A);
    let (id, old) = enrol(&srv, &body).await;
    assert_eq!(report_with(&srv, &body, &old).await.0, 200);
    let (rows, vms) = (srv.metric_rows().await, srv.vm_count().await);

    let forged = format!("vmhc_vm_{}", "0".repeat(64));
    for bearer in [forged.as_str(), "vmhc_enrol_nothing", ADMIN_TOKEN, ""] {
        let (status, answer) = report_with(&srv, &body, bearer).await;
        assert_eq!(status, 401, "{bearer:?}: {answer}");
    }
    let (status, _) = srv.report_raw(body.to_string().into_bytes(), None).await;
    assert_eq!(status, 401);
    assert_eq!(
        (srv.metric_rows().await, srv.vm_count().await),
        (rows, vms),
        "a refused report stored something"
    );

    // Rotation: only an admin; the new credential at once, the old one never again.
    let path = format!("/api/vms/{id}/credential");
    let (status, _) = srv.send(Method::POST, &path, Some(&old), None).await;
    assert_eq!(status, 401, "an agent credential rotated itself");
    let (status, rotated) = srv.send(Method::POST, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["credential"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(report_with(&srv, &body, &new).await.0, 200);
    assert_eq!(report_with(&srv, &body, &old).await.0, 401);
    // A rotated credential is the VM's identity at once: the fleet token cannot take it.
    assert_eq!(srv.report(&body).await.0, 409);
    let (status, _) = srv
        .send(
            Method::POST,
            "/api/vms/999/credential",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 404);

    // Revocation: 401 from then on; enrolling again needs a token in force.
    let (status, answer) = srv
        .send(Method::DELETE, &path, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(
        (status, answer["revoked"].clone()),
        (200, json!(1)),
        "{answer}"
    );
    let rows = srv.metric_rows().await;
    assert_eq!(report_with(&srv, &body, &new).await.0, 401);
    assert_eq!(srv.metric_rows().await, rows);
    // Its agent's reports are refused from now on: the VM is held, never reset for it.
    let (_, held) = srv.get(&format!("/api/vms/{id}")).await;
    assert_eq!(held["remediation_phase"], "manual", "{held}");
    let (again, fresh) = enrol(&srv, &body).await;
    assert_eq!(again, id, "re-enrolment keeps the VM and its history");
    assert_eq!(report_with(&srv, &body, &fresh).await.0, 200);
    srv.stop().await;
}
both_backends!(unknown_revoked_and_rotated_credentials);

/// Admin-created tokens: a use count, an expiry, revocation, and a token bound to one
/// guest, which links the VM it enrols to that guest (a verified link).
async fn enrolment_tokens_limit_who_may_enrol(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let create = |body: Value| {
        let srv = &srv;
        async move {
            srv.send(
                Method::POST,
                "/api/enrolment-tokens",
                Some(ADMIN_TOKEN),
                Some(body),
            )
            .await
        }
    };
    let (status, two) = create(json!({"label": "web tier", "max_uses": 2})).await;
    assert_eq!(status, 201, "{two}");
    let token = two["token"].as_str().unwrap().to_owned();
    for host in ["w1", "w2"] {
        let (status, body) = report_with(&srv, &report_for(host), &token).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["credential"].is_string(), "{body}");
    }
    let vms = srv.vm_count().await;
    let (status, _) = report_with(&srv, &report_for("w3"), &token).await;
    assert_eq!(status, 401, "a used-up token enrolled a third VM");
    assert_eq!(srv.vm_count().await, vms);

    // Revoked: refused.
    let (_, other) = create(json!({"label": "spare"})).await;
    let (status, _) = srv
        .send(
            Method::DELETE,
            &format!("/api/enrolment-tokens/{}", other["id"]),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = report_with(&srv, &report_for("w4"), other["token"].as_str().unwrap()).await;
    assert_eq!(status, 401);

    // The list shows uses and never a token or its hash.
    let (status, list) = srv
        .send(
            Method::GET,
            "/api/enrolment-tokens",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["uses"], 2, "{list}");
    assert!(!list.to_string().contains(&token), "{list}");
    assert!(!list.to_string().contains("hash"), "{list}");
    let (status, _) = srv
        .send(Method::GET, "/api/enrolment-tokens", Some(&token), None)
        .await;
    assert_eq!(status, 401);

    // Bad requests name the field and create nothing.
    for (bad, field) in [
        (json!({"label": ""}), "label"),
        (json!({"label": "x", "max_uses": 0}), "max_uses"),
        (
            json!({"label": "x", "expires_in_hours": 0}),
            "expires_in_hours",
        ),
        (
            json!({"label": "x", "guest": {"node": "pve1", "vmid": 101}, "max_uses": 5}),
            "max_uses",
        ),
        (
            json!({"label": "x", "guest": {"node": "bad node", "vmid": 101}}),
            "guest.node",
        ),
    ] {
        let (status, body) = create(bad).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }

    // Bound to guest 101 on pve1: the VM it enrols is linked there, verified.
    let (_, bound) =
        create(json!({"label": "vm 101", "guest": {"node": "pve1", "vmid": 101}})).await;
    assert_eq!(bound["max_uses"], 1, "{bound}");
    let (status, body) = report_with(
        &srv,
        &report_for("app-101"),
        bound["token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, v) = srv.get(&format!("/api/vms/{}", body["vm_id"])).await;
    assert_eq!(
        (
            v["proxmox_vmid"].clone(),
            v["proxmox_node"].clone(),
            v["link_verified"].clone()
        ),
        (json!(101), json!("pve1"), json!(true)),
        "{v}"
    );
    srv.stop().await;
}
both_backends!(enrolment_tokens_limit_who_may_enrol);

/// An expired token enrols nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_enrolment_token_is_refused() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let (status, created) = srv
        .send(
            Method::POST,
            "/api/enrolment-tokens",
            Some(ADMIN_TOKEN),
            Some(json!({"label": "short", "expires_in_hours": 1})),
        )
        .await;
    assert_eq!(status, 201);
    // Expire it in storage: the clock is not the test's to move.
    {
        use diesel::ExpressionMethods;
        use diesel_async::RunQueryDsl;
        use server::db::schema::enrolment_tokens;
        let mut conn = srv.state().db.conn().await.unwrap();
        let server::db::Conn::Sqlite(c) = &mut conn else {
            unreachable!()
        };
        diesel::update(enrolment_tokens::table)
            .set(enrolment_tokens::expires_ms.eq(1))
            .execute(&mut **c)
            .await
            .unwrap();
    }
    let (status, _) = report_with(
        &srv,
        &report_for("late"),
        created["token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(srv.vm_count().await, 0);
    srv.stop().await;
}

/// Acceptance: VM A, enrolled, reports with B's hostname, B's machine_id, or the VMID of a
/// guest it does not own, then goes silent. B's liveness is never refreshed by it, the
/// claims are events, a fresh hostname each time changes nothing, and the guest A named
/// is never reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_cannot_act_for_another() {
    let fake = FakePve::start(vec![
        FakeVm::running(107, "pve1"),
        FakeVm::running(108, "pve2"),
    ])
    .await;
    // The forgeries happen within the start-up pause (one stale timeout), so B's own
    // silence while they are checked cannot get it reset.
    let mut srv = start(Backend::Sqlite, &fake, &[("STALE_TIMEOUT_MS", "8000")]).await;
    // B enrols as guest 108 (an operator confirmed the link) and keeps reporting.
    let mut b_body = with_uuid("db-b", UUID_B);
    b_body["vmid"] = json!(108);
    b_body["node"] = json!("pve2");
    let (b, b_credential) = enrol(&srv, &b_body).await;
    let (status, _) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{b}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve2", "vmid": 108})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(report_with(&srv, &b_body, &b_credential).await.0, 200);
    // A enrols as itself, without any Proxmox hint.
    let (a, a_credential) = enrol(&srv, &with_uuid("app-a", UUID_A)).await;
    assert_eq!(
        report_with(&srv, &with_uuid("app-a", UUID_A), &a_credential)
            .await
            .0,
        200
    );
    // All of this happens inside the start-up pause, when nothing is reset.
    let b_seen = vm(&srv, b).await["last_seen_ms"].clone();

    // A's forgeries, each stored as A's own report with A's identity.
    let mut as_b = b_body.clone();
    as_b["uptime_seconds"] = json!(1);
    let mut vmid_only = with_uuid("app-a", UUID_A);
    vmid_only["vmid"] = json!(108);
    vmid_only["node"] = json!("pve2");
    let forgeries = [
        as_b,
        report_for("db-b"),
        with_uuid("app-a", UUID_B),
        vmid_only,
        report_for("fresh-1"),
        report_for("fresh-2"),
        report_for("fresh-3"),
    ];
    for forged in &forgeries {
        let (status, body) = report_with(&srv, forged, &a_credential).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["vm_id"], a,
            "a forged body moved the report to another VM"
        );
    }
    assert_eq!(srv.vm_count().await, 2, "a fresh hostname made a VM");
    let a_now = vm(&srv, a).await;
    assert_eq!(
        (
            a_now["hostname"].clone(),
            a_now["machine_id"].clone(),
            a_now["proxmox_vmid"].clone()
        ),
        (json!("app-a"), json!(UUID_A), Value::Null),
        "a claim was applied: {a_now}"
    );
    assert_eq!(
        vm(&srv, b).await["last_seen_ms"],
        b_seen,
        "A's reports refreshed B"
    );
    let claims: Vec<String> = events(&srv)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "identity_claim" && e["vm_id"] == a)
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    for expected in [
        "hostname \"db-b\"",
        &format!("machine_id {UUID_B}"),
        "vmid 108",
        "hostname \"fresh-3\"",
    ] {
        assert!(
            claims.iter().any(|m| m.contains(expected)),
            "no event for {expected}: {claims:?}"
        );
    }

    // Then A goes silent while B keeps reporting: B (guest 108) is never reset.
    let keep_b = {
        let (http, url, body, credential) = (
            srv.http.clone(),
            srv.url("/api/health/report"),
            b_body.clone(),
            b_credential.clone(),
        );
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .bearer_auth(&credential)
                    .json(&body)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    wait_active(&srv).await;
    wait_for("A to go down", Duration::from_secs(30), || async {
        (vm(&srv, a).await["status"] == "down").then_some(())
    })
    .await;
    wait_rounds(&srv, 15).await;
    keep_b.abort();
    assert_eq!(fake.action_attempts(), Vec::<String>::new());
    assert!(history(&srv, b).await.is_empty());
    srv.stop().await;
}

/// B goes stale even while A reports as B with A's credential: no VM keeps another
/// looking alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_vm_reporting_as_b_does_not_keep_b_alive() {
    let fake = FakePve::start(vec![FakeVm::running(108, "pve2")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let mut b_body = with_uuid("db-b", UUID_B);
    b_body["vmid"] = json!(108);
    let (b, b_credential) = enrol(&srv, &b_body).await;
    assert_eq!(report_with(&srv, &b_body, &b_credential).await.0, 200);
    let (_, a_credential) = enrol(&srv, &with_uuid("app-a", UUID_A)).await;
    let keep_forging = {
        let (http, url, body) = (
            srv.http.clone(),
            srv.url("/api/health/report"),
            b_body.clone(),
        );
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .bearer_auth(&a_credential)
                    .json(&body)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let b_now = wait_for("B to go down", Duration::from_secs(15), || async {
        let v = vm(&srv, b).await;
        (v["status"] == "down").then_some(v)
    })
    .await;
    keep_forging.abort();
    assert_eq!(b_now["hostname"], "db-b");
    srv.stop().await;
}

/// An enrolment refused for a taken identity holds that VM from auto-reset: it may be its
/// own agent that lost its credential, and a refused report must never become a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_enrolment_never_turns_into_a_reset() {
    let fake = FakePve::start(vec![FakeVm::running(108, "pve2")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let b_body = with_uuid("db-b", UUID_B);
    let (b, b_credential) = enrol(&srv, &b_body).await;
    assert_eq!(report_with(&srv, &b_body, &b_credential).await.0, 200);
    let (status, _) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{b}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve2", "vmid": 108})),
        )
        .await;
    assert_eq!(status, 200);
    wait_active(&srv).await;
    // B's agent lost its credential and can only try to enrol again, every 200 ms.
    let retry = {
        let (http, url, body) = (
            srv.http.clone(),
            srv.url("/api/health/report"),
            b_body.clone(),
        );
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let held = wait_for("B to go down, held", Duration::from_secs(15), || async {
        let v = vm(&srv, b).await;
        (v["status"] == "down").then_some(v)
    })
    .await;
    wait_rounds(&srv, 15).await;
    retry.abort();
    assert_eq!(fake.action_attempts(), Vec::<String>::new(), "{held}");
    assert_eq!(vm(&srv, b).await["remediation_phase"], "manual");
    // Its agent reporting with its credential again releases the hold.
    assert_eq!(report_with(&srv, &b_body, &b_credential).await.0, 200);
    assert_eq!(vm(&srv, b).await["remediation_phase"], "ok");
    srv.stop().await;
}

/// Acceptance: data from before per-VM credentials, agents that know only the fleet
/// token. Every old agent keeps reporting (the answer carries a credential it may ignore),
/// an agent that takes its credential ends up holding the VM, and nothing is lost.
async fn agents_with_the_old_shared_token_move_over(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    // The previous release: VMs created by reports with the shared token, no credentials.
    let bodies: Vec<Value> = (1..=3)
        .map(|i| {
            with_uuid(
                &format!("old-{i}"),
                &format!("cccccccc-0000-4000-8000-00000000000{i}"),
            )
        })
        .collect();
    let mut ids = Vec::new();
    for body in &bodies {
        let (status, answer) = srv.report(body).await;
        assert_eq!(status, 200);
        ids.push(answer["vm_id"].as_i64().unwrap());
    }
    {
        // As the previous release stored them: no credential rows at all.
        use diesel_async::RunQueryDsl;
        let mut conn = srv.state().db.conn().await.unwrap();
        match &mut conn {
            server::db::Conn::Sqlite(c) => {
                diesel::sql_query("DELETE FROM agent_credentials")
                    .execute(&mut **c)
                    .await
                    .unwrap();
            }
            server::db::Conn::Postgres(c) => {
                diesel::sql_query("DELETE FROM agent_credentials")
                    .execute(&mut **c)
                    .await
                    .unwrap();
            }
        }
    }
    let rows = srv.metric_rows().await;
    // An old agent (ignores `credential`) reports again and again with the shared token.
    for _ in 0..3 {
        let (status, answer) = srv.report(&bodies[0]).await;
        assert_eq!(
            (status, answer["vm_id"].as_i64()),
            (200, Some(ids[0])),
            "{answer}"
        );
    }
    // New agents take their credential and report with it; the shared token then no
    // longer speaks for them.
    let mut credentials = Vec::new();
    for (body, id) in bodies.iter().zip(&ids).skip(1) {
        let (again, credential) = enrol(&srv, body).await;
        assert_eq!(again, *id, "the VM and its history were kept");
        let (status, answer) = report_with(&srv, body, &credential).await;
        assert_eq!((status, answer["vm_id"].as_i64()), (200, Some(*id)));
        assert_eq!(srv.report(body).await.0, 409);
        credentials.push(credential);
    }
    assert_eq!(srv.vm_count().await, 3);
    assert_eq!(
        srv.metric_rows().await,
        rows + 3 + 2 * 2,
        "a sample was lost"
    );
    srv.stop().await;
}
both_backends!(agents_with_the_old_shared_token_move_over);

/// A refused enrolment that names a VM without carrying its uuid holds nothing: otherwise
/// anyone with an enrolment token could keep every VM from ever being reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_alone_cannot_hold_a_vm_from_reset() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    // A VM whose agent cannot read its uuid (not root): matched by name.
    let (id, credential) = enrol(&srv, &report_for("db-b")).await;
    assert_eq!(
        report_with(&srv, &report_for("db-b"), &credential).await.0,
        200
    );
    let (status, _) = srv.report(&report_for("db-b")).await;
    assert_eq!(status, 409);
    let (_, vm) = srv.get(&format!("/api/vms/{id}")).await;
    assert_eq!(vm["remediation_phase"], "ok", "{vm}");
    let (_, overview) = srv.get("/api/remediation").await;
    assert!(
        overview["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "enrolment_refused" && e["vm_id"] == id),
        "{overview}"
    );
    srv.stop().await;
}
