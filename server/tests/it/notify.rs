//! Notifications, maintenance windows and tags through the real server: a local webhook
//! receiver that checks each signature, a local SMTP server, and the fake Proxmox.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::proxmox::{report_vm, start, vm, wait_active, wait_rounds};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec-test-0123456789";

/// Fast notifier settings on top of the fake Proxmox's fast rounds.
const QUICK: &[(&str, &str)] = &[
    ("NOTIFY_INTERVAL_MS", "100"),
    ("NOTIFY_RETRY_MS", "200"),
    ("NOTIFY_WARNING_AFTER_MS", "0"),
    ("STORM_PERCENT", "100"),
];

/// How the receiver answers (anything else: 200).
const ANSWER_500: u8 = 1;
const ANSWER_HANG: u8 = 2;

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    mode: Arc<AtomicU8>,
}

impl Receiver {
    /// A webhook receiver on a free loopback port; its URL.
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    /// Messages received so far (every attempt, including failed ones), as JSON.
    fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_str(b).unwrap())
            .collect()
    }

    fn kinds(&self) -> Vec<String> {
        self.bodies()
            .iter()
            .map(|b| b["kind"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    r.got.lock().unwrap().push((headers, body));
    match r.mode.load(Ordering::Acquire) {
        ANSWER_500 => StatusCode::INTERNAL_SERVER_ERROR,
        ANSWER_HANG => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

/// What a receiver does with the signature: recompute it over `timestamp.body`.
fn verify(headers: &HeaderMap, body: &str) -> bool {
    let (Some(ts), Some(sig)) = (
        headers
            .get("x-vmhc-timestamp")
            .and_then(|v| v.to_str().ok()),
        headers
            .get("x-vmhc-signature")
            .and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let Some(hex_sig) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    mac.verify_slice(&hex::decode(hex_sig).unwrap_or_default())
        .is_ok()
}

async fn admin(srv: &TestServer, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, answer) = srv.send(method, path, Some(ADMIN_TOKEN), body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer
}

async fn channel(srv: &TestServer, name: &str, url: &str) -> i64 {
    let c = admin(
        srv,
        Method::POST,
        "/api/notify/channels",
        Some(json!({"name": name, "kind": "webhook", "target": url, "secret": SECRET})),
    )
    .await;
    c["id"].as_i64().unwrap()
}

async fn rule(srv: &TestServer, channel: i64, extra: Value) {
    let mut body = json!({"channel_id": channel});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    admin(srv, Method::POST, "/api/notify/rules", Some(body)).await;
}

async fn wait_kinds(r: &Receiver, n: usize, what: &str) -> Vec<String> {
    wait_for(what, Duration::from_secs(20), || async {
        let kinds = r.kinds();
        (kinds.len() >= n).then_some(kinds)
    })
    .await
}

async fn messages(srv: &TestServer, query: &str) -> Vec<Value> {
    admin(
        srv,
        Method::GET,
        &format!("/api/notify/messages{query}"),
        None,
    )
    .await
    .as_array()
    .unwrap()
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_is_told_once_signed_and_its_recovery_once() {
    let (r, url) = Receiver::start().await;
    let fake = FakePve::start(vec![]).await;
    let mut srv = start(Backend::Sqlite, &fake, QUICK).await;
    let ch = channel(&srv, "ops", &url).await;
    rule(&srv, ch, json!({})).await;
    // A VM that appears healthy says nothing; its down does.
    assert_eq!(srv.report(&report_for("web-01")).await.0, 200);
    let kinds = wait_kinds(&r, 1, "the down").await;
    assert_eq!(kinds, ["vm_down"]);
    let (headers, body) = r.got.lock().unwrap()[0].clone();
    assert!(
        verify(&headers, &body),
        "the signature verifies: {headers:?}"
    );
    assert_eq!(headers["x-vmhc-event"], "vm_down");
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["vm"]["hostname"], "web-01");
    assert!(sent["id"].as_i64().unwrap() > 0);
    // A forged or altered body does not verify.
    assert!(!verify(&headers, &body.replace("web-01", "web-02")));

    assert_eq!(srv.report(&report_for("web-01")).await.0, 200);
    let kinds = wait_kinds(&r, 2, "the recovery").await;
    assert_eq!(kinds, ["vm_down", "vm_recovered"]);
    // Nothing more: no second down, no repeat, no recovery twice.
    wait_rounds(&srv, 10).await;
    assert_eq!(r.kinds().len(), 2, "{:?}", r.kinds());
    let log = messages(&srv, "").await;
    assert!(log.iter().all(|m| m["state"] == "sent"), "{log:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_maintenance_window_silences_and_stops_resets_and_a_tag_routes() {
    let (db_hook, db_url) = Receiver::start().await;
    let (web_hook, web_url) = Receiver::start().await;
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve2"),
    ])
    .await;
    let mut srv = start(Backend::Postgres, &fake, QUICK).await;
    let db_channel = channel(&srv, "dba", &db_url).await;
    let web_channel = channel(&srv, "web team", &web_url).await;
    rule(
        &srv,
        db_channel,
        json!({"tag": "db", "kinds": ["vm_down", "vm_recovered"]}),
    )
    .await;
    rule(&srv, web_channel, json!({"tag": "web"})).await;

    let db = report_vm(&srv, 100, "pve1", 5000).await;
    let patched = report_vm(&srv, 101, "pve2", 5000).await;
    admin(
        &srv,
        Method::PUT,
        &format!("/api/vms/{db}/tags"),
        Some(json!({"tags": ["DB", "prod"]})),
    )
    .await;
    admin(
        &srv,
        Method::PUT,
        &format!("/api/vms/{patched}/tags"),
        Some(json!({"tags": ["web"]})),
    )
    .await;
    let tags = admin(&srv, Method::GET, &format!("/api/vms/{db}/tags"), None).await;
    assert_eq!(tags["tags"], json!(["db", "prod"]));
    // The web VM is in planned work for an hour.
    let now = server::now_ms();
    admin(
        &srv,
        Method::POST,
        "/api/maintenance",
        Some(
            json!({"name": "patch night", "scope": "tag", "value": "web",
                    "starts_ms": now - 1000, "ends_ms": now + 3_600_000}),
        ),
    )
    .await;
    wait_active(&srv).await;

    // Both fall silent: the db VM is told to its channel only (and reset); the web VM is
    // told nowhere and not reset.
    wait_kinds(&db_hook, 1, "the db VM's down").await;
    let v = wait_for("the web VM to be held", Duration::from_secs(20), || async {
        let v = vm(&srv, patched).await;
        v["phase_reason"]
            .as_str()
            .is_some_and(|r| r.contains("maintenance window \"patch night\""))
            .then_some(v)
    })
    .await;
    assert_eq!(v["status"], "down");
    wait_for(
        "the db VM's first rung",
        Duration::from_secs(20),
        || async {
            fake.posts()
                .contains(&"reboot 100".to_owned())
                .then_some(())
        },
    )
    .await;
    wait_rounds(&srv, 15).await;
    assert!(
        !fake.posts().iter().any(|p| p.ends_with(" 101")),
        "a reset during maintenance: {:?}",
        fake.posts()
    );
    assert!(web_hook.kinds().is_empty(), "{:?}", web_hook.kinds());
    let db_kinds = db_hook.kinds();
    assert!(db_kinds.iter().all(|k| k == "vm_down"), "{db_kinds:?}");
    assert!(
        db_hook.bodies().iter().all(|b| b["vm"]["id"] == db),
        "only the db VM on the db channel"
    );
    // The silence is recorded.
    let log = messages(&srv, "?state=dropped").await;
    assert!(
        log.iter().any(|m| m["vm_id"] == patched
            && m["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("patch night")),
        "{log:?}"
    );
    // Both come back: the db VM's recovery is told; the web VM's, whose down was never
    // told, is not.
    report_vm(&srv, 100, "pve1", 1).await;
    report_vm(&srv, 101, "pve2", 1).await;
    wait_for("the db VM's recovery", Duration::from_secs(20), || async {
        db_hook
            .kinds()
            .contains(&"vm_recovered".to_owned())
            .then_some(())
    })
    .await;
    wait_rounds(&srv, 10).await;
    assert!(web_hook.kinds().is_empty(), "{:?}", web_hook.kinds());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_webhook_is_retried_then_kept_and_a_hung_one_delays_nothing() {
    let (r, url) = Receiver::start().await;
    r.mode.store(ANSWER_500, Ordering::Release);
    let fake = FakePve::start(vec![]).await;
    let mut extra = QUICK.to_vec();
    extra.push(("NOTIFY_MAX_ATTEMPTS", "3"));
    extra.push(("NOTIFY_TIMEOUT_MS", "30000"));
    let mut srv = start(Backend::Sqlite, &fake, &extra).await;
    let ch = channel(&srv, "flaky", &url).await;
    rule(&srv, ch, json!({"kinds": ["vm_down"]})).await;
    assert_eq!(srv.report(&report_for("web-01")).await.0, 200);
    // Three attempts, then a dead letter with the last error.
    let dead = wait_for("the dead letter", Duration::from_secs(20), || async {
        let dead = messages(&srv, "?state=dead").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(r.kinds(), ["vm_down", "vm_down", "vm_down"]);
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["last_error"], "answered 500 Internal Server Error");
    let stored: i64 = dead[0]["id"].as_i64().unwrap();
    assert!(
        r.bodies().iter().all(|b| b["id"] == stored),
        "one message, retried"
    );

    // Now the receiver hangs on every delivery: reports and the detection of other VMs
    // go on as before.
    r.mode.store(ANSWER_HANG, Ordering::Release);
    let before = r.got.lock().unwrap().len();
    assert_eq!(srv.report(&report_for("db-01")).await.0, 200);
    wait_for("a delivery to hang", Duration::from_secs(10), || async {
        (r.got.lock().unwrap().len() > before).then_some(())
    })
    .await;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(srv.report(&report_for("app-01")).await.0, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a report waited for the webhook"
        );
    }
    let silent_from = Instant::now();
    let down = wait_for(
        "app-01 to be judged down",
        Duration::from_secs(20),
        || async {
            let (_, vms) = srv.get("/api/vms").await;
            vms.as_array()?
                .iter()
                .any(|v| v["hostname"] == "app-01" && v["status"] == "down")
                .then(Instant::now)
        },
    )
    .await;
    assert!(
        down.duration_since(silent_from) < Duration::from_millis(1500 + 2000),
        "detection was delayed by the hung webhook: {:?}",
        down.duration_since(silent_from)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_down_mail_reaches_the_mail_server() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("mail");
    let mut smtp = std::process::Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "aiosmtpd.handlers.Mailbox", maildir.to_str().unwrap()])
        .spawn()
        .expect("python3 with aiosmtpd (pip: aiosmtpd)");
    let smtp_port = port.to_string();
    let fake = FakePve::start(vec![]).await;
    let mut extra = QUICK.to_vec();
    extra.extend([
        ("SMTP_HOST", "127.0.0.1"),
        ("SMTP_PORT", smtp_port.as_str()),
        ("SMTP_SECURITY", "off"),
        ("SMTP_FROM", "monitor@example.org"),
    ]);
    let mut srv = start(Backend::Sqlite, &fake, &extra).await;
    let c = admin(
        &srv,
        Method::POST,
        "/api/notify/channels",
        Some(json!({"name": "on call", "kind": "email", "target": "oncall@example.org"})),
    )
    .await;
    rule(
        &srv,
        c["id"].as_i64().unwrap(),
        json!({"kinds": ["vm_down"]}),
    )
    .await;
    assert_eq!(srv.report(&report_for("mail-01")).await.0, 200);
    let mail = wait_for("the mail", Duration::from_secs(30), || async {
        let new = maildir.join("new");
        let file = std::fs::read_dir(&new).ok()?.next()?.ok()?;
        std::fs::read_to_string(file.path()).ok()
    })
    .await;
    assert!(mail.contains("Subject: mail-01 is down"), "{mail}");
    assert!(mail.contains("To: oncall@example.org"), "{mail}");
    assert!(mail.contains("From: monitor@example.org"), "{mail}");
    srv.stop().await;
    let _ = smtp.kill();
    let _ = smtp.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notification_settings_are_for_admins_and_bad_ones_change_nothing() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let (status, body) = srv.report(&report_for("web-01")).await;
    assert_eq!(status, 200, "{body}");
    let credential = body["credential"].as_str().unwrap().to_owned();
    let vm_id = body["vm_id"].as_i64().unwrap();
    let good = json!({"name": "x", "kind": "webhook", "target": "https://hooks.example.org/a"});
    // Nobody else: not anonymous, not a guest (fleet token or its own credential).
    for token in [None, Some(AGENT_TOKEN), Some(credential.as_str())] {
        let (status, _) = srv
            .send(
                Method::POST,
                "/api/notify/channels",
                token,
                Some(good.clone()),
            )
            .await;
        assert_eq!(status, 401, "{token:?}");
        let (status, _) = srv
            .send(Method::GET, "/api/notify/messages", token, None)
            .await;
        assert_eq!(status, 401, "{token:?}");
        let path = format!("/api/vms/{vm_id}/tags");
        let (status, _) = srv
            .send(Method::PUT, &path, token, Some(json!({"tags": ["x"]})))
            .await;
        assert_eq!(status, 401, "{token:?}");
        let (status, _) = srv
            .send(Method::POST, "/api/maintenance", token, Some(json!({})))
            .await;
        assert_eq!(status, 401, "{token:?}");
    }
    // Each bad input is named, and nothing is stored.
    let bad = [
        (
            json!({"name": "x", "kind": "webhook", "target": "http://hooks.example.org/a"}),
            "target",
        ),
        (
            json!({"name": "x", "kind": "webhook", "target": "https://u:p@hooks.example.org/"}),
            "target",
        ),
        (
            json!({"name": "x", "kind": "webhook", "target": "ftp://hooks.example.org/"}),
            "target",
        ),
        (
            json!({"name": "x", "kind": "email", "target": "not an address"}),
            "target",
        ),
        (
            json!({"name": "x", "kind": "pager", "target": "https://a.example.org"}),
            "kind",
        ),
        (
            json!({"name": "", "kind": "webhook", "target": "https://a.example.org"}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "webhook", "target": "https://a.example.org", "extra": 1}),
            "extra",
        ),
    ];
    for (body, field) in bad {
        let (status, answer) = srv
            .send(
                Method::POST,
                "/api/notify/channels",
                Some(ADMIN_TOKEN),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.to_string().contains(field), "{body}: {answer}");
    }
    let channels = admin(&srv, Method::GET, "/api/notify/channels", None).await;
    assert_eq!(channels, json!([]));
    // A Slack URL is its own secret: never shown back; a webhook's secret neither.
    let slack = admin(
        &srv,
        Method::POST,
        "/api/notify/channels",
        Some(json!({"name": "chat", "kind": "slack", "target": "https://hooks.slack.com/services/T0/B0/XSECRETX"})),
    )
    .await;
    assert_eq!(slack["target"], "https://hooks.slack.com/…");
    let hook = channel(&srv, "hook", "https://hooks.example.org/a").await;
    let listed = admin(&srv, Method::GET, "/api/notify/channels", None)
        .await
        .to_string();
    assert!(
        !listed.contains("XSECRETX") && !listed.contains(SECRET),
        "{listed}"
    );
    assert!(listed.contains("\"has_secret\":true"), "{listed}");
    let bad_rules = [
        (json!({"channel_id": 999}), "channel_id"),
        (
            json!({"channel_id": hook, "kinds": ["vm_exploded"]}),
            "kinds",
        ),
        (json!({"channel_id": hook, "kinds": ["test"]}), "kinds"),
        (json!({"channel_id": hook, "tag": "a b"}), "tag"),
        (
            json!({"channel_id": hook, "repeat_minutes": 1}),
            "repeat_minutes",
        ),
    ];
    for (body, field) in bad_rules {
        let (status, answer) = srv
            .send(
                Method::POST,
                "/api/notify/rules",
                Some(ADMIN_TOKEN),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.to_string().contains(field), "{body}: {answer}");
    }
    assert_eq!(
        admin(&srv, Method::GET, "/api/notify/rules", None).await,
        json!([])
    );
    let now = server::now_ms();
    let bad_windows = [
        (
            json!({"name": "w", "scope": "all", "starts_ms": now, "ends_ms": now}),
            "ends_ms",
        ),
        (
            json!({"name": "w", "scope": "tag", "starts_ms": now, "ends_ms": now + 1}),
            "value",
        ),
        (
            json!({"name": "w", "scope": "all", "cron": "every night", "duration_minutes": 60}),
            "cron",
        ),
        (
            json!({"name": "w", "scope": "all", "cron": "0 2 * * 6", "duration_minutes": 100000}),
            "duration_minutes",
        ),
        (json!({"name": "w", "scope": "all"}), "starts_ms"),
        (
            json!({"name": "w", "scope": "all", "cron": "0 0 30 2 *", "duration_minutes": 60}),
            "duration_minutes",
        ),
    ];
    for (body, field) in bad_windows {
        let (status, answer) = srv
            .send(
                Method::POST,
                "/api/maintenance",
                Some(ADMIN_TOKEN),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.to_string().contains(field), "{body}: {answer}");
    }
    assert_eq!(
        admin(&srv, Method::GET, "/api/maintenance", None).await,
        json!([])
    );
    // An operator plans one VM or tag at a time: a window over everything, a node, or a
    // recurring one is the auto-reset switch, an admin's.
    let operator = crate::panels::token_for(&srv, "olga", "operator").await;
    let wide = [
        json!({"name": "w", "scope": "all", "starts_ms": now, "ends_ms": now + 60_000}),
        json!({"name": "w", "scope": "node", "value": "pve1", "starts_ms": now, "ends_ms": now + 60_000}),
        json!({"name": "w", "scope": "tag", "value": "db", "cron": "0 2 * * 6", "duration_minutes": 60}),
    ];
    for body in wide {
        let (status, answer) = srv
            .send(
                Method::POST,
                "/api/maintenance",
                Some(&operator),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 403, "{body}: {answer}");
    }
    let one_tag = json!({"name": "w", "scope": "tag", "value": "db", "starts_ms": now, "ends_ms": now + 60_000});
    let (status, answer) = srv
        .send(
            Method::POST,
            "/api/maintenance",
            Some(&operator),
            Some(one_tag),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let path = format!("/api/vms/{vm_id}/tags");
    let (status, _) = srv
        .send(
            Method::PUT,
            &path,
            Some(ADMIN_TOKEN),
            Some(json!({"tags": ["ok", "not ok"]})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        admin(&srv, Method::GET, &path, None).await["tags"],
        json!([])
    );
    let (status, _) = srv
        .send(
            Method::POST,
            &format!("/api/vms/{vm_id}/snooze"),
            Some(ADMIN_TOKEN),
            Some(json!({"hours": 0})),
        )
        .await;
    assert_eq!(status, 400);
    let snoozed = admin(
        &srv,
        Method::POST,
        &format!("/api/vms/{vm_id}/snooze"),
        Some(json!({"hours": 2})),
    )
    .await;
    assert_eq!(snoozed["scope"], "vm");
    assert_eq!(snoozed["scope_value"], vm_id.to_string());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reboot_of_its_own_is_recorded_and_told() {
    let (r, url) = Receiver::start().await;
    let fake = FakePve::start(vec![]).await;
    let mut srv = start(Backend::Sqlite, &fake, QUICK).await;
    let ch = channel(&srv, "ops", &url).await;
    rule(&srv, ch, json!({"kinds": ["unexpected_reboot"]})).await;
    let mut report = report_for("web-01");
    report["uptime_seconds"] = json!(86_400);
    assert_eq!(srv.report(&report).await.0, 200);
    // Its uptime grows: nothing. Then it starts again from zero: a reboot of its own.
    report["uptime_seconds"] = json!(86_401);
    assert_eq!(srv.report(&report).await.0, 200);
    report["uptime_seconds"] = json!(12);
    assert_eq!(srv.report(&report).await.0, 200);
    let kinds = wait_kinds(&r, 1, "the reboot message").await;
    assert_eq!(kinds, ["unexpected_reboot"]);
    assert!(
        r.bodies()[0]["text"]
            .as_str()
            .unwrap()
            .contains("from 86401s to 12s"),
        "{:?}",
        r.bodies()
    );
    // Up and down again at once: one event in ten minutes, not one per report.
    report["uptime_seconds"] = json!(5_000);
    assert_eq!(srv.report(&report).await.0, 200);
    report["uptime_seconds"] = json!(3);
    assert_eq!(srv.report(&report).await.0, 200);
    wait_rounds(&srv, 5).await;
    let events = srv.get("/api/remediation").await.1["events"].clone();
    let reboots = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "unexpected_reboot")
        .count();
    assert_eq!(reboots, 1, "{events}");
    assert_eq!(r.kinds().len(), 1, "{:?}", r.kinds());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warning_is_told_only_once_it_lasts_and_its_end_only_after_it() {
    let (r, url) = Receiver::start().await;
    let fake = FakePve::start(vec![]).await;
    let mut extra = QUICK.to_vec();
    extra.retain(|(k, _)| *k != "NOTIFY_WARNING_AFTER_MS");
    extra.push(("NOTIFY_WARNING_AFTER_MS", "2000"));
    extra.push(("STALE_TIMEOUT_MS", "60000"));
    let mut srv = start(Backend::Sqlite, &fake, &extra).await;
    let ch = channel(&srv, "ops", &url).await;
    rule(
        &srv,
        ch,
        json!({"kinds": ["warning_entered", "warning_left"]}),
    )
    .await;
    let with_cpu = |cpu: f64| {
        let mut r = report_for("busy-01");
        r["cpu_percent"] = json!(cpu);
        r
    };
    assert_eq!(srv.report(&with_cpu(10.0)).await.0, 200);
    // A spike shorter than the minimum: neither its start nor its end is told.
    assert_eq!(srv.report(&with_cpu(99.0)).await.0, 200);
    assert_eq!(srv.report(&with_cpu(10.0)).await.0, 200);
    let dropped = wait_for(
        "the short warning to be dropped",
        Duration::from_secs(20),
        || async {
            let log = messages(&srv, "?state=dropped").await;
            (!log.is_empty()).then_some(log)
        },
    )
    .await;
    assert_eq!(dropped[0]["kind"], "warning_entered");
    assert!(r.kinds().is_empty(), "{:?}", r.kinds());
    assert!(
        messages(&srv, "")
            .await
            .iter()
            .all(|m| m["kind"] != "warning_left"),
        "no end of a warning that was never told"
    );
    // A warning that lasts: told once it has, and its end after it.
    assert_eq!(srv.report(&with_cpu(99.0)).await.0, 200);
    wait_kinds(&r, 1, "the lasting warning").await;
    assert_eq!(srv.report(&with_cpu(10.0)).await.0, 200);
    let kinds = wait_kinds(&r, 2, "its end").await;
    assert_eq!(kinds, ["warning_entered", "warning_left"]);
    srv.stop().await;
}

/// The monitor's own Proxmox connection: failing reads are told once, after a few in a row
/// (a blip is not), and its return once; nothing in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_proxmox_connection_is_told_once_and_its_return_once() {
    let (r, url) = Receiver::start().await;
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut env = QUICK.to_vec();
    env.extend([("LINK_REFRESH_MS", "150"), ("PROXMOX_TIMEOUT_MS", "300")]);
    let mut srv = start(Backend::Sqlite, &fake, &env).await;
    let ch = channel(&srv, "ops", &url).await;
    rule(
        &srv,
        ch,
        json!({"kinds": ["proxmox_unreachable", "proxmox_restored"]}),
    )
    .await;
    let reads = || {
        fake.calls()
            .iter()
            .filter(|c| c.path.contains("cluster/resources"))
            .count()
    };
    // Healthy reads tell nothing.
    let before = reads();
    wait_for("a few cluster reads", Duration::from_secs(20), || async {
        (reads() >= before + 4).then_some(())
    })
    .await;
    wait_rounds(&srv, 5).await;
    assert!(r.kinds().is_empty(), "{:?}", r.kinds());

    // The cluster stops answering: told once, in words, after several failed reads.
    fake.hang_on("cluster/resources");
    let kinds = wait_kinds(&r, 1, "the connection failing").await;
    assert_eq!(kinds, ["proxmox_unreachable"]);
    let told = r.bodies()[0].clone();
    assert!(
        told["title"]
            .as_str()
            .unwrap()
            .contains("Proxmox unreachable"),
        "{told}"
    );
    assert!(told["vm"].is_null(), "a fleet message: {told}");
    wait_rounds(&srv, 10).await;
    assert_eq!(r.kinds().len(), 1, "told once: {:?}", r.kinds());

    // It answers again: its return is told once.
    fake.hang(false);
    let kinds = wait_kinds(&r, 2, "the connection back").await;
    assert_eq!(kinds, ["proxmox_unreachable", "proxmox_restored"]);
    wait_rounds(&srv, 10).await;
    assert_eq!(r.kinds().len(), 2, "{:?}", r.kinds());
    let (_, events) = srv.get("/api/remediation").await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"proxmox_unreachable") && kinds.contains(&"proxmox_restored"),
        "{kinds:?}"
    );
    srv.stop().await;
}

/// With `PROXMOX_IMPORT_TAGS`, a VM whose link is verified carries its guest's Proxmox
/// tags beside the operator's, and follows changes made in Proxmox; an operator's tag stays
/// when Proxmox drops it; a VM whose link is only proposed gets none (its guest's root
/// could otherwise borrow another guest's tags, and with them its maintenance windows).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxmox_tags_follow_verified_links_beside_the_operators() {
    let mut tagged = FakeVm::running(100, "pve1");
    tagged.tags = Some("Prod;web".into());
    let mut claimed = FakeVm::running(101, "pve1");
    claimed.tags = Some("prod".into());
    let fake = FakePve::start(vec![tagged, claimed]).await;
    let env = [("PROXMOX_IMPORT_TAGS", "true"), ("LINK_REFRESH_MS", "150")];
    let mut srv = start(Backend::Postgres, &fake, &env).await;
    let vm = report_vm(&srv, 100, "pve1", 5000).await;
    // A report that only names VMID 101: a proposal, never verified.
    let mut proposal = report_for("claims-101");
    proposal["vmid"] = json!(101);
    let (status, body) = srv.report(&proposal).await;
    assert_eq!(status, 200, "{body}");
    let claimer = body["vm_id"].as_i64().unwrap();
    let tags_of = |id: i64| {
        let srv = &srv;
        async move {
            let (_, body) = srv.get(&format!("/api/vms/{id}/tags")).await;
            (body["tags"].clone(), body["proxmox_tags"].clone())
        }
    };
    wait_for("the guest's tags", Duration::from_secs(20), || async {
        (tags_of(vm).await == (json!([]), json!(["prod", "web"]))).then_some(())
    })
    .await;
    // An operator edits the VM's own tags (read, add, write back): the imported ones stay
    // Proxmox's. One the operator also sets is theirs.
    let (mine, _) = tags_of(vm).await;
    let mut mine: Vec<String> = serde_json::from_value(mine).unwrap();
    mine.extend(["db".to_owned(), "prod".to_owned()]);
    admin(
        &srv,
        Method::PUT,
        &format!("/api/vms/{vm}/tags"),
        Some(json!({ "tags": mine })),
    )
    .await;
    wait_for(
        "the operator's tags kept apart",
        Duration::from_secs(20),
        || async { (tags_of(vm).await == (json!(["db", "prod"]), json!(["web"]))).then_some(()) },
    )
    .await;
    // Proxmox drops "prod" and "web" and adds "backup": the operator's "prod" stays.
    fake.with_vm(100, |v| v.tags = Some("backup".into()));
    wait_for("Proxmox's change", Duration::from_secs(20), || async {
        (tags_of(vm).await == (json!(["db", "prod"]), json!(["backup"]))).then_some(())
    })
    .await;
    // The VM migrates: its tags go with it, never dropped in between.
    fake.with_vm(100, |v| v.node = "pve2".into());
    for _ in 0..10 {
        wait_rounds(&srv, 2).await;
        assert_eq!(
            tags_of(vm).await.1,
            json!(["backup"]),
            "kept across the migration"
        );
    }
    // The operator clears theirs: only Proxmox's remain.
    admin(
        &srv,
        Method::PUT,
        &format!("/api/vms/{vm}/tags"),
        Some(json!({"tags": []})),
    )
    .await;
    assert_eq!(tags_of(vm).await, (json!([]), json!(["backup"])));
    wait_rounds(&srv, 5).await;
    assert_eq!(
        tags_of(claimer).await,
        (json!([]), json!([])),
        "a proposal imports nothing"
    );
    srv.stop().await;

    // Turned off, the imported tags go (they would no longer follow Proxmox).
    let mut srv = crate::proxmox::start_on(srv.db, &fake, &[]).await;
    wait_for(
        "the imported tags removed",
        Duration::from_secs(20),
        || async {
            let (_, body) = srv.get(&format!("/api/vms/{vm}/tags")).await;
            (body["proxmox_tags"] == json!([])).then_some(())
        },
    )
    .await;
    srv.stop().await;
}
