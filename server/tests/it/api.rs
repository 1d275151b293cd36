//! REST API behaviour on both backends: ingest, status, configuration, auth, history.

use crate::both_backends;
use crate::common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

async fn report_shows_up_in_vm_list(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (status, body) = srv.report(&report_for("web-01")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["report_interval_seconds"], 30);
    let vm_id = body["vm_id"].as_i64().unwrap();

    let (status, vms) = srv.get("/api/vms").await;
    assert_eq!(status, 200);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["id"], vm_id);
    assert_eq!(vms[0]["hostname"], "web-01");
    assert_eq!(vms[0]["cpu_percent"], 12.5);
    assert_eq!(vms[0]["disks"][0]["mount"], "/");

    // The same host reporting again is the same VM.
    let (_, again) = srv.report(&report_for("web-01")).await;
    assert_eq!(again["vm_id"], vm_id);
    assert_eq!(srv.metric_rows().await, 2);

    let (status, detail) = srv.get(&format!("/api/vms/{vm_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(detail["hostname"], "web-01");
    assert_eq!(detail["status_changes"][0]["to_status"], "healthy");
    assert_eq!(srv.get("/api/vms/999999").await.0, 404);
    assert_eq!(srv.get("/api/vms/abc").await.0, 400);

    let (status, summary) = srv.get("/api/status").await;
    assert_eq!(status, 200);
    assert_eq!(summary["counts"]["total"], 1);
    assert_eq!(summary["counts"]["healthy"], 1);
    srv.stop().await;
}
both_backends!(report_shows_up_in_vm_list);

/// Unknown fields are ignored; a replayed sample keeps its time while liveness uses the
/// receive time; a time ahead of the server's clock is replaced by the receive time.
async fn sample_time_and_liveness_follow_the_contract(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut replayed = report_for("replayer");
    replayed["observed_at"] = json!(
        hour_ago
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    replayed["future_field"] = json!({"nested": [1, 2, 3]});
    let before = server::now_ms();
    let (status, body) = srv.report(&replayed).await;
    assert_eq!(status, 200, "unknown fields are ignored: {body}");
    assert_eq!(body["status"], "healthy", "liveness uses the receive time");
    let id = body["vm_id"].as_i64().unwrap();
    let (_, v) = srv.get(&format!("/api/vms/{id}")).await;
    let hour_ago_ms = i64::try_from(hour_ago.unix_timestamp_nanos() / 1_000_000).unwrap();
    assert_eq!(v["observed_at_ms"], hour_ago_ms, "{v}");
    assert!(v["last_seen_ms"].as_i64().unwrap() >= before, "{v}");
    // Stored at its own time: found in a window around an hour ago.
    let (_, hist) = srv
        .get(&format!(
            "/api/vms/{id}/metrics?from={}&to={}&points=1",
            hour_ago_ms - 1000,
            hour_ago_ms + 1000
        ))
        .await;
    assert_eq!(hist["points"][0]["samples"], 1, "{hist}");

    let mut ahead = report_for("replayer");
    ahead["observed_at"] = json!("2999-01-01T00:00:00Z");
    let before = server::now_ms();
    assert_eq!(srv.report(&ahead).await.0, 200);
    let (_, v) = srv.get(&format!("/api/vms/{id}")).await;
    let observed = v["observed_at_ms"].as_i64().unwrap();
    assert!(observed >= before && observed <= server::now_ms(), "{v}");
    srv.stop().await;
}
both_backends!(sample_time_and_liveness_follow_the_contract);

async fn machine_id_identifies_a_vm_across_renames(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let mut first = report_for("old-name");
    first["machine_id"] = json!("7D2A1C9E-0000-4000-8000-00000000ABCD");
    let (_, a) = srv.report(&first).await;
    let mut renamed = report_for("new-name");
    renamed["machine_id"] = json!("7d2a1c9e-0000-4000-8000-00000000abcd");
    let (_, b) = srv.report(&renamed).await;
    assert_eq!(a["vm_id"], b["vm_id"]);
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms.as_array().unwrap().len(), 1);
    assert_eq!(vms[0]["hostname"], "new-name");
    // A different uuid with the same hostname is a different VM (a clone).
    let mut clone = report_for("new-name");
    clone["machine_id"] = json!("11111111-2222-4333-8444-555555555555");
    let (_, c) = srv.report(&clone).await;
    assert_ne!(c["vm_id"], a["vm_id"]);
    srv.stop().await;
}
both_backends!(machine_id_identifies_a_vm_across_renames);

async fn silent_vm_goes_down_in_time(backend: Backend) {
    let stale_ms = 1500;
    let mut srv = TestServer::start(
        backend,
        &[
            ("STALE_TIMEOUT_MS", "1500"),
            ("REPORT_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    let (status, body) = srv.report(&report_for("quiet-01")).await;
    assert_eq!(status, 200);
    let vm_id = body["vm_id"].as_i64().unwrap();
    wait_for(
        "the VM to go down",
        Duration::from_millis(stale_ms + 2000),
        || async {
            let (_, vm) = srv.get(&format!("/api/vms/{vm_id}")).await;
            (vm["status"] == "down").then_some(())
        },
    )
    .await;
    let (_, vm) = srv.get(&format!("/api/vms/{vm_id}")).await;
    let changes = vm["status_changes"].as_array().unwrap();
    let down = changes.last().unwrap();
    assert_eq!(down["from_status"], "healthy");
    assert_eq!(down["to_status"], "down");
    // Both times are the server's own: the heartbeat's receive time and the verdict's.
    let silent_for = down["at_ms"].as_i64().unwrap() - vm["last_seen_ms"].as_i64().unwrap();
    assert!(
        silent_for >= i64::try_from(stale_ms).unwrap(),
        "down after {silent_for} ms of silence, before the {stale_ms} ms timeout"
    );

    // A new heartbeat brings it back, and that is recorded too.
    let (_, back) = srv.report(&report_for("quiet-01")).await;
    assert_eq!(back["status"], "healthy");
    let (_, vm) = srv.get(&format!("/api/vms/{vm_id}")).await;
    assert_eq!(vm["status_changes"].as_array().unwrap().len(), 3);
    srv.stop().await;
}
both_backends!(silent_vm_goes_down_in_time);

async fn config_change_applies_at_once_and_bad_values_change_nothing(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let mut hot = report_for("busy-01");
    hot["cpu_percent"] = json!(50.0);
    let (_, body) = srv.report(&hot).await;
    assert_eq!(body["status"], "healthy");

    let (status, updated) = srv
        .send(
            Method::PUT,
            "/api/status/config",
            Some(ADMIN_TOKEN),
            Some(json!({"cpu_threshold": 40})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["config"]["cpu_threshold"], 40.0);
    assert_eq!(updated["changed_vms"], 1);
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms[0]["status"], "warning");
    assert!(vms[0]["status_reason"].as_str().unwrap().contains("CPU"));

    let (_, before) = srv.get("/api/status/config").await;
    for bad in [
        json!({"cpu_threshold": 150}),
        json!({"ram_threshold": -1}),
        json!({"stale_timeout_ms": "soon"}),
        json!({"stale_timeout_ms": 10}),
        json!({"cpu_treshold": 50}),
        json!({"cpu_threshold": 10, "disk_threshold": 101}),
    ] {
        let (status, err) = srv
            .send(
                Method::PUT,
                "/api/status/config",
                Some(ADMIN_TOKEN),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(status, 400, "{bad} -> {err}");
        assert!(is_error_body(&err), "{err}");
    }
    let (_, after) = srv.get("/api/status/config").await;
    assert_eq!(before, after);
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms[0]["status"], "warning");

    // The saved configuration outlives a restart.
    srv.stop().await;
    let mut srv = TestServer::start_on(srv.db, &[]).await;
    let (_, cfg) = srv.get("/api/status/config").await;
    assert_eq!(cfg["cpu_threshold"], 40.0);
    srv.stop().await;
}
both_backends!(config_change_applies_at_once_and_bad_values_change_nothing);

async fn writes_need_the_admin_token(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (_, body) = srv.report(&report_for("keep-me")).await;
    let vm_id = body["vm_id"].as_i64().unwrap();
    let (_, config_before) = srv.get("/api/status/config").await;
    for token in [None, Some("wrong"), Some(AGENT_TOKEN)] {
        let (status, err) = srv
            .send(Method::DELETE, &format!("/api/vms/{vm_id}"), token, None)
            .await;
        assert_eq!(status, 401, "{err}");
        assert_eq!(err["error"]["message"], "missing or invalid token");
        assert_eq!(err["error"]["code"], "unauthorized");
        let (status, _) = srv
            .send(
                Method::PUT,
                "/api/status/config",
                token,
                Some(json!({"cpu_threshold": 1})),
            )
            .await;
        assert_eq!(status, 401);
    }
    assert_eq!(srv.vm_count().await, 1);
    assert_eq!(srv.metric_rows().await, 1);
    assert_eq!(srv.get("/api/status/config").await.1, config_before);

    let (status, _) = srv
        .send(
            Method::DELETE,
            &format!("/api/vms/{vm_id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(srv.vm_count().await, 0);
    assert_eq!(srv.metric_rows().await, 0);
    assert_eq!(srv.get("/api/vms").await.1, json!([]));
    let (status, _) = srv
        .send(
            Method::DELETE,
            &format!("/api/vms/{vm_id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 404);
    srv.stop().await;
}
both_backends!(writes_need_the_admin_token);

/// Every hostile report gets its documented 4xx and stores nothing.
async fn hostile_reports_are_refused(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let with = |field: &str, value: Value| {
        let mut r = report_for("victim");
        r[field] = value;
        r.to_string().into_bytes()
    };
    let without = |field: &str| {
        let mut r = report_for("victim");
        r.as_object_mut().unwrap().remove(field);
        r.to_string().into_bytes()
    };
    let valid = report_for("victim").to_string().into_bytes();
    let many_disks: Vec<Value> = (0..200)
        .map(|i| json!({"mount": format!("/d{i}"), "used_bytes": 1, "total_bytes": 2}))
        .collect();
    let mut huge = report_for("victim");
    huge["agent_version"] = json!("x".repeat(1024 * 1024));
    let cases: Vec<(&str, Vec<u8>, Option<&str>, u16)> = vec![
        (
            "truncated JSON",
            b"{\"hostname\":".to_vec(),
            Some(AGENT_TOKEN),
            400,
        ),
        ("empty body", Vec::new(), Some(AGENT_TOKEN), 400),
        ("JSON array", b"[1,2]".to_vec(), Some(AGENT_TOKEN), 400),
        ("JSON null", b"null".to_vec(), Some(AGENT_TOKEN), 400),
        ("not JSON", b"hostname=web".to_vec(), Some(AGENT_TOKEN), 400),
        (
            "NaN literal",
            String::from_utf8(valid.clone())
                .unwrap()
                .replace("12.5", "NaN")
                .into_bytes(),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "cpu as string",
            with("cpu_percent", json!("12")),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "cpu negative",
            with("cpu_percent", json!(-0.1)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "cpu over 100",
            with("cpu_percent", json!(100.1)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "cpu overflow",
            String::from_utf8(valid.clone())
                .unwrap()
                .replace("12.5", "1e400")
                .into_bytes(),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "ram used over total",
            with("ram_used_bytes", json!(5_000_000_000i64)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "ram total zero",
            with("ram_total_bytes", json!(0)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "ram negative",
            with("ram_used_bytes", json!(-1)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "ram fractional",
            with("ram_used_bytes", json!(1.5)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "missing hostname",
            without("hostname"),
            Some(AGENT_TOKEN),
            400,
        ),
        ("missing os", without("os"), Some(AGENT_TOKEN), 400),
        (
            "missing cpu",
            without("cpu_percent"),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "missing uptime",
            without("uptime_seconds"),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "empty hostname",
            with("hostname", json!("  ")),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "hostname of 10,000 characters",
            with("hostname", json!("a".repeat(10_000))),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "script tags in hostname",
            with("hostname", json!("<script>alert(1)</script>")),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "control character in hostname",
            with("hostname", json!("web\u{0}01")),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "hostname as number",
            with("hostname", json!(42)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "unknown os",
            with("os", json!("plan9")),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "negative uptime",
            with("uptime_seconds", json!(-1)),
            Some(AGENT_TOKEN),
            400,
        ),
        (
            "1 MB body",
            huge.to_string().into_bytes(),
            Some(AGENT_TOKEN),
            413,
        ),
        ("missing token", valid.clone(), None, 401),
        ("wrong token", valid.clone(), Some("not-the-token"), 401),
        (
            "admin token is not an agent token",
            valid.clone(),
            Some(ADMIN_TOKEN),
            401,
        ),
    ];
    let mut refused_fields = std::collections::BTreeSet::new();
    for (name, body, token, expected) in cases {
        let mut answered = None;
        // The 413 may be sent before the body is read, and the connection reset under a
        // client still sending (the next request may find that pooled connection closed):
        // try again until the answer itself is seen.
        for _ in 0..5 {
            if let Ok(answer) = srv.try_report_raw(body.clone(), token).await {
                answered = Some(answer);
                break;
            }
        }
        let (status, answer) = answered.unwrap_or_else(|| panic!("{name}: never answered"));
        assert_eq!(status, expected, "{name}: {answer}");
        assert!(is_error_body(&answer), "{name}: error body {answer}");
        if status == 400 {
            let error = error_text(&answer);
            refused_fields.extend(domain::heartbeat::CONTRACT_FIELDS.iter().filter(|f| {
                error
                    .strip_prefix(**f)
                    .is_some_and(|rest| rest.starts_with([':', '[', '.']))
            }));
        }
        assert_eq!(srv.metric_rows().await, 0, "{name} stored a sample");
        assert_eq!(srv.vm_count().await, 0, "{name} created a VM");
    }
    // Bad optional parts are dropped with a warning naming them: the report still counts
    // as a sign of life, so a buggy agent never makes a live VM look dead.
    let optional_cases: Vec<(&str, Value, &str)> = vec![
        ("disks", json!(many_disks), "disks"),
        (
            "disks",
            json!([{"mount": "/", "used_bytes": 3, "total_bytes": 2}]),
            "disks[0].used_bytes",
        ),
        ("machine_id", json!("../../etc/passwd"), "machine_id"),
        ("vmid", json!(7), "vmid"),
        ("node", json!("pve1/../../cluster"), "node"),
        ("agent_version", json!("v".repeat(65)), "agent_version"),
        ("observed_at", json!("last tuesday"), "observed_at"),
        ("observed_at", json!("2020-01-01T00:00:00Z"), "observed_at"),
    ];
    for (i, (field, value, warned)) in optional_cases.into_iter().enumerate() {
        let mut r = report_for(&format!("sloppy-{i}"));
        r[field] = value;
        let (status, answer) = srv.report(&r).await;
        assert_eq!(status, 200, "{field}: {answer}");
        assert_eq!(answer["status"], "healthy", "{field}: {answer}");
        let warning = answer["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            warning.starts_with(&format!("{warned}: ")),
            "{field}: {answer}"
        );
        refused_fields.extend(
            domain::heartbeat::CONTRACT_FIELDS
                .iter()
                .filter(|f| **f == field),
        );
        let id = answer["vm_id"].as_i64().unwrap();
        let (_, v) = srv.get(&format!("/api/vms/{id}")).await;
        match field {
            "disks" if warned == "disks" => assert_eq!(v["disks"].as_array().unwrap().len(), 64),
            "disks" => assert_eq!(v["disks"], json!([])),
            "observed_at" => assert_eq!(v["observed_at_ms"], v["last_seen_ms"]),
            "vmid" | "node" => {}
            other => assert_eq!(v[other], Value::Null, "{other} was stored: {v}"),
        }
    }
    // Every field of the contract has at least one hostile value above.
    let all: std::collections::BTreeSet<&&str> =
        domain::heartbeat::CONTRACT_FIELDS.iter().collect();
    let untested: Vec<_> = all.difference(&refused_fields).collect();
    assert!(untested.is_empty(), "no hostile case for {untested:?}");
    // Errors name the field that was wrong.
    let (_, answer) = srv
        .report_raw(with("cpu_percent", json!(101)), Some(AGENT_TOKEN))
        .await;
    assert!(answer["error"]["field"] == "cpu_percent", "{answer}");
    let (_, answer) = srv
        .report_raw(without("uptime_seconds"), Some(AGENT_TOKEN))
        .await;
    assert!(answer["error"]["field"] == "uptime_seconds", "{answer}");
    srv.stop().await;
}
both_backends!(hostile_reports_are_refused);

async fn metric_history_is_downsampled(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let now = server::now_ms();
    let base = now - 60 * 60_000;
    let mut vm_id = 0;
    for i in 0..60i64 {
        let mut r = report_for("hist-01");
        r["cpu_percent"] = json!(i as f64);
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(
            ((base + i * 60_000) as i128) * 1_000_000,
        )
        .unwrap();
        r["observed_at"] = json!(
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        );
        let (status, body) = srv.report(&r).await;
        assert_eq!(status, 200, "{body}");
        vm_id = body["vm_id"].as_i64().unwrap();
    }
    let (status, hist) = srv
        .get(&format!(
            "/api/vms/{vm_id}/metrics?from={}&to={}&points=6",
            base,
            base + 60 * 60_000 - 1
        ))
        .await;
    assert_eq!(status, 200, "{hist}");
    let points = hist["points"].as_array().unwrap();
    assert!(points.len() <= 6, "{hist}");
    let samples: i64 = points.iter().map(|p| p["samples"].as_i64().unwrap()).sum();
    assert_eq!(samples, 60);
    // Points are whole minutes (the tier's rows): the first holds the samples before its end.
    let first_end = hist["from_ms"].as_i64().unwrap() + hist["point_ms"].as_i64().unwrap();
    let in_first = (0..60i64).filter(|i| base + i * 60_000 < first_end).count() as f64;
    assert_eq!(hist["tier"], "minute");
    assert_eq!(points[0]["cpu_avg"], (in_first - 1.0) / 2.0);
    assert_eq!(points.last().unwrap()["cpu_max"], 59.0);
    assert_eq!(points[0]["ram_percent_avg"], 25.0);
    assert_eq!(points[0]["disk_percent_avg"], 25.0);
    // Replayed samples do not roll the live state back.
    let (_, vm) = srv.get(&format!("/api/vms/{vm_id}")).await;
    assert_eq!(vm["cpu_percent"], 59.0);

    for bad in [
        "points=0",
        "points=100000",
        "from=10&to=5",
        "from=yesterday",
    ] {
        let (status, _) = srv.get(&format!("/api/vms/{vm_id}/metrics?{bad}")).await;
        assert_eq!(status, 400, "{bad}");
    }
    assert_eq!(srv.get("/api/vms/424242/metrics").await.0, 404);
    let (status, history) = srv.get(&format!("/api/vms/{vm_id}/reset-history")).await;
    assert_eq!(status, 200);
    assert_eq!(history, json!([]));
    srv.stop().await;
}
both_backends!(metric_history_is_downsampled);

async fn health_reports_storage(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (status, health) = srv.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"]["ok"], true);
    assert_eq!(
        health["database"]["backend"],
        if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgresql"
        }
    );
    assert_eq!(health["redis"], "not configured");
    assert_eq!(srv.get("/api/nope").await.0, 404);
    srv.stop().await;
}
both_backends!(health_reports_storage);

/// Without configured tokens the server makes its own, keeps them across restarts, and
/// stores only hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_tokens_are_kept_and_only_hashed() {
    let db = fresh_db(Backend::Sqlite).await;
    let mut cfg = test_config(&db, &[]);
    cfg.agent_token = None;
    cfg.admin_token = None;
    let first = server::start(cfg.clone()).await.unwrap();
    first.stop().await;
    let token_path = server::auth::token_file(db.dir.path(), server::auth::Role::Agent);
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("vmhc_agent_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let second = server::start(cfg).await.unwrap();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{}/api/health/report", second.addr))
        .bearer_auth(&token)
        .json(&report_for("gen-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut conn = second.state.db.conn().await.unwrap();
    let stored = server::db::store::credential_hash(&mut conn, "agent")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(stored, token);
    assert_eq!(stored, server::auth::hash_token(&token));
    drop(conn);
    second.stop().await;
}

/// When storage goes away, reports get 503 with Retry-After and nothing is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_outage_answers_503_with_retry_after() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let mut srv = TestServer::start(Backend::Postgres, &[]).await;
    assert_eq!(srv.report(&report_for("before")).await.0, 200);
    let name = srv.db.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = diesel_async::AsyncPgConnection::establish(&admin_pg_url())
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    let resp = srv
        .http
        .post(srv.url("/api/health/report"))
        .bearer_auth(AGENT_TOKEN)
        .json(&report_for("during"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "storage unavailable, retry later");
    assert_eq!(body["error"]["code"], "unavailable");
    let (status, health) = srv.get("/api/health").await;
    assert_eq!(status, 503);
    assert_eq!(health["database"]["ok"], false);
    srv.stop().await;
}

/// `GET /api/vms?limit=N` pages through the fleet in hostname order, each page naming the
/// next in a `Link` header, until the last; together the pages are exactly the full list.
async fn the_fleet_pages_with_a_cursor(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    // Two VMs share a hostname (different uuids): the cursor must not skip or repeat one.
    for i in 0..23 {
        let (status, body) = srv
            .report(&report_for(&format!("host-{:02}", i % 21)))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for uuid in [
        "4c4c4544-0000-1000-8000-000000000001",
        "4c4c4544-0000-1000-8000-000000000002",
    ] {
        let mut r = report_for("host-05");
        r["machine_id"] = json!(uuid);
        let (status, body) = srv.report(&r).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, all) = srv.get("/api/vms").await;
    let all: Vec<Value> = all.as_array().unwrap().clone();
    assert!(all.len() > 21, "{all:?}");
    let mut paged = Vec::new();
    let mut next = Some("/api/vms?limit=5".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let resp = srv
            .http
            .get(srv.url(&path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        next = resp
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned())
            .map(|l| {
                l.strip_prefix('<')
                    .and_then(|l| l.split_once(">; rel=\"next\""))
                    .unwrap()
                    .0
                    .to_owned()
            });
        let page: Vec<Value> = resp.json().await.unwrap();
        assert!(page.len() <= 5);
        paged.extend(page);
        pages += 1;
        assert!(pages < 20, "the pages never end");
    }
    let ids = |vms: &[Value]| {
        vms.iter()
            .map(|v| v["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&paged), ids(&all), "the pages are the list, in order");
    // The summary counts what the list holds, status by status (counted by the database).
    let (_, summary) = srv.get("/api/status").await;
    assert_eq!(summary["counts"]["total"], all.len());
    for status in ["healthy", "warning", "down", "unknown"] {
        let n = all.iter().filter(|v| v["status"] == status).count();
        assert_eq!(summary["counts"][status], n, "{status}: {summary}");
    }
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=5&after=nocomma",
        "limit=5&after=x,abc",
        "page=2",
    ] {
        let (status, body) = srv.get(&format!("/api/vms?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(srv.get_as("/api/vms?limit=5", None).await.0, 401);
    srv.stop().await;
}

both_backends!(the_fleet_pages_with_a_cursor);
