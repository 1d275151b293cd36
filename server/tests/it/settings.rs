//! Runtime settings (`/api/settings` and the settings page's server function share one
//! service): applied at once, refused whole when a field is wrong, admins only, audited, and
//! picked up by other replicas.

use crate::common::*;
use crate::people::add_user;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

async fn token_for(srv: &TestServer, username: &str, role: &str) -> String {
    add_user(srv, username, role).await;
    let (status, created) = srv
        .send(
            Method::POST,
            "/api/tokens",
            Some(ADMIN_TOKEN),
            Some(json!({"username": username, "label": "settings test", "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["token"].as_str().unwrap().to_owned()
}

async fn status_of(srv: &TestServer, id: i64) -> String {
    srv.get(&format!("/api/vms/{id}")).await.1["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn settings_changes_apply_at_once_and_bad_ones_change_nothing(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (status, body) = srv.report(&report_for("busy-12pct")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    assert_eq!(status_of(&srv, id).await, "healthy");
    let (status, before) = srv.get("/api/settings").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["status"]["cpu_threshold"], 80.0);
    assert_eq!(before["remediation"]["auto_reset"], "on");

    // Only admins read or change them.
    let operator = token_for(&srv, "olga", "operator").await;
    assert_eq!(srv.get_as("/api/settings", Some(&operator)).await.0, 403);
    let mut lower = before.clone();
    lower["status"]["cpu_threshold"] = json!(10.0);
    let (status, _) = srv
        .send(
            Method::PUT,
            "/api/settings",
            Some(&operator),
            Some(lower.clone()),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(status_of(&srv, id).await, "healthy");

    // Each bad field is named and nothing is saved, not even the good fields beside it.
    let bad: [(&str, Value); 4] = [
        (
            "status.cpu_threshold",
            json!({"status": {"cpu_threshold": 150.0}}),
        ),
        (
            "status.stale_timeout_ms",
            json!({"status": {"stale_timeout_ms": 10}}),
        ),
        (
            "remediation.max_attempts",
            json!({"remediation": {"max_attempts": 0}}),
        ),
        (
            "remediation.veto_seconds",
            json!({"remediation": {"veto_seconds": -1}}),
        ),
    ];
    for (field, spoil) in bad {
        let mut body = lower.clone();
        for (part, values) in spoil.as_object().unwrap() {
            for (k, v) in values.as_object().unwrap() {
                body[part][k] = v.clone();
            }
        }
        let (status, answer) = srv
            .send(Method::PUT, "/api/settings", Some(ADMIN_TOKEN), Some(body))
            .await;
        assert_eq!(status, 400, "{field}: {answer}");
        assert!(error_text(&answer).starts_with(field), "{answer}");
        assert_eq!(
            srv.get("/api/settings").await.1,
            before,
            "{field} changed nothing"
        );
    }
    let mut unknown = lower.clone();
    unknown["remediation"]["auto_reset"] = json!("sometimes");
    let (status, _) = srv
        .send(
            Method::PUT,
            "/api/settings",
            Some(ADMIN_TOKEN),
            Some(unknown),
        )
        .await;
    assert_eq!(status, 400, "an unknown auto-reset value");
    assert_eq!(status_of(&srv, id).await, "healthy");

    // A good change: the VM at 12.5 % CPU turns warning at once, and remediation goes off.
    lower["remediation"]["auto_reset"] = json!("off");
    let (status, answer) = srv
        .send(
            Method::PUT,
            "/api/settings",
            Some(ADMIN_TOKEN),
            Some(lower.clone()),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed_vms"], 1);
    assert_eq!(status_of(&srv, id).await, "warning");
    assert_eq!(srv.get("/api/settings").await.1, lower);
    let (_, health) = srv.get("/api/health").await;
    assert_eq!(health["remediation"]["mode"], "off", "{health}");

    let (_, audit) = srv.get("/api/audit").await;
    let outcomes: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "configure")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.iter().any(|o| o.starts_with("saved")), "{audit}");
    assert!(
        outcomes.iter().filter(|o| o.starts_with("refused")).count() >= 4,
        "refusals are audited too: {audit}"
    );

    // Saved settings outlive a restart, over the environment's defaults.
    srv.stop().await;
    let TestServer { db, .. } = srv;
    let mut again = TestServer::start_on(db, &[]).await;
    assert_eq!(again.get("/api/settings").await.1, lower);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_apply_at_once_and_bad_ones_change_nothing_sqlite() {
    settings_changes_apply_at_once_and_bad_ones_change_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_apply_at_once_and_bad_ones_change_nothing_postgres() {
    settings_changes_apply_at_once_and_bad_ones_change_nothing(Backend::Postgres).await;
}

/// A change saved through one replica reaches the other within a few scheduler rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_replica_picks_up_saved_settings() {
    let db = fresh_db(Backend::Postgres).await;
    let second_db = TestDb {
        url: db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut a = TestServer::start_on(db, &[]).await;
    let mut b = TestServer::start_on(second_db, &[]).await;
    let (_, mut settings) = a.get("/api/settings").await;
    settings["remediation"]["auto_reset"] = json!("shadow");
    settings["status"]["ram_threshold"] = json!(55.0);
    let (status, answer) = a
        .send(
            Method::PUT,
            "/api/settings",
            Some(ADMIN_TOKEN),
            Some(settings.clone()),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    wait_for(
        "B to pick the settings up",
        Duration::from_secs(10),
        || async { (b.get("/api/settings").await.1 == settings).then_some(()) },
    )
    .await;
    let (_, health) = b.get("/api/health").await;
    assert_eq!(health["remediation"]["mode"], "shadow", "{health}");
    a.stop().await;
    b.stop().await;
}

/// `GET /api/proxmox/check` says in plain words what Proxmox granted: the release, each
/// privilege the monitor needs (MISSING when withheld), and an unverified certificate as a
/// failure; the token's secret never appears. Admins only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxmox_check_names_release_privileges_and_trust() {
    use crate::fake_pve::{FakePve, FakeVm, SECRET};
    let fake = FakePve::start(vec![FakeVm::running(101, "pve1")]).await;
    let env: Vec<(&str, String)> = fake.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut srv = TestServer::start(Backend::Sqlite, &env).await;
    let operator = token_for(&srv, "olga", "operator").await;
    assert_eq!(
        srv.get_as("/api/proxmox/check", Some(&operator)).await.0,
        403
    );

    let (status, check) = srv.get("/api/proxmox/check").await;
    assert_eq!(status, 200, "{check}");
    let text = check["lines"].to_string();
    assert!(text.contains("Proxmox VE 9.1.3"), "{check}");
    assert!(text.contains("VM.Audit on /vms: yes"), "{check}");
    assert!(text.contains("VM.PowerMgmt on /vms: yes"), "{check}");
    assert!(text.contains("TLS: NOT verified"), "{check}");
    assert_eq!(
        check["ok"], false,
        "an unverified certificate is not a pass"
    );
    assert!(
        !check.to_string().contains(SECRET),
        "the secret never leaves the server"
    );

    fake.deny("/vms", "VM.PowerMgmt");
    let (_, check) = srv.get("/api/proxmox/check").await;
    assert!(
        check["lines"]
            .to_string()
            .contains("VM.PowerMgmt on /vms: MISSING"),
        "{check}"
    );
    srv.stop().await;

    // Without Proxmox configured, it says how to configure it.
    let mut bare = TestServer::start(Backend::Sqlite, &[]).await;
    let (status, check) = bare.get("/api/proxmox/check").await;
    assert_eq!(status, 200);
    assert_eq!(check["ok"], false);
    assert!(
        check["lines"].to_string().contains("PROXMOX_HOST"),
        "{check}"
    );
    bare.stop().await;
}

/// Writes `value` as the stored remediation rails, behind the server's back.
async fn store_rails(srv: &TestServer, value: &str) {
    use diesel_async::RunQueryDsl;
    let sql = format!(
        "INSERT INTO runtime_config (key, value, updated_ms) VALUES ('remediation_tuning', '{value}', 1) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    );
    let mut conn = srv.state().db.conn().await.unwrap();
    match &mut conn {
        server::db::Conn::Sqlite(c) => {
            diesel::sql_query(sql).execute(&mut **c).await.unwrap();
        }
        server::db::Conn::Postgres(c) => {
            diesel::sql_query(sql).execute(&mut **c).await.unwrap();
        }
    };
}

/// Stored rails this version cannot read, or that fail their checks (a newer release's,
/// a hand edit, a corrupt row), turn auto-reset off at start-up and when a running server
/// picks them up; they never keep it on or turn it on. Saving valid rails turns it back on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_stored_rails_turn_auto_reset_off() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let mut srv = TestServer::start(backend, &[("AUTO_RESET_ENABLED", "true")]).await;
        let (_, settings) = srv.get("/api/settings").await;
        assert_eq!(settings["remediation"]["auto_reset"], "on", "{settings}");
        let mut valid = settings["remediation"].clone();
        // Picked up by the running server within a few rounds.
        store_rails(&srv, r#"{"auto_reset": "sometimes"}"#).await;
        wait_for(
            "auto-reset to turn off",
            Duration::from_secs(10),
            || async {
                let (_, now) = srv.get("/api/settings").await;
                (now["remediation"]["auto_reset"] == "off").then_some(())
            },
        )
        .await;

        // Readable but out of range (a breaker that could never trip): off, at start-up too.
        valid["storm_percent"] = json!(100.0);
        store_rails(&srv, &valid.to_string()).await;
        srv.stop().await;
        let TestServer { db, .. } = srv;
        let mut srv = TestServer::start_on(db, &[("AUTO_RESET_ENABLED", "true")]).await;
        let (_, now) = srv.get("/api/settings").await;
        assert_eq!(now["remediation"]["auto_reset"], "off", "{now}");

        // An admin's valid save puts it back on.
        let mut fixed = now.clone();
        fixed["remediation"]["auto_reset"] = json!("on");
        fixed["remediation"]["storm_percent"] = json!(30.0);
        let (status, answer) = srv
            .send(Method::PUT, "/api/settings", Some(ADMIN_TOKEN), Some(fixed))
            .await;
        assert_eq!(status, 200, "{answer}");
        let (_, now) = srv.get("/api/settings").await;
        assert_eq!(now["remediation"]["auto_reset"], "on", "{now}");
        srv.stop().await;
    }
}
