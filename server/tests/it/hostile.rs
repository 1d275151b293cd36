//! Hostile input to the HTTP API: schemathesis generates requests from the OpenAPI document
//! and every answer must be no server error and exactly what the document says.
//!
//! The suite runs a short form; `FAULTS_FULL=1` runs at least 10,000 requests.

use crate::common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Test cases per operation in the fuzzing phase; the coverage phase adds its own.
const SHORT_EXAMPLES: &str = "12";
const FULL_EXAMPLES: &str = "200";
/// The short form's seed: the suite replays the same inputs each run (the full form draws a
/// new seed each time and prints it).
const SHORT_SEED: &str = "20261129";
/// Fewest requests each form must have made: a run that silently generates nothing fails.
const SHORT_FLOOR: u64 = 1_000;
const FULL_FLOOR: u64 = 10_000;

/// The checks every answer must pass.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance";

/// The server binary as a child process, killed when dropped (also when the test fails).
struct Server {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A stand-in proxy that takes every connection and closes it: the server's outbound HTTP
/// (notification channels the run creates with made-up URLs) ends here, never elsewhere.
async fn black_hole() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, taken)
}

/// The server binary, not an in-process server: its environment sends all outbound HTTP to
/// `proxy_port` (a test may not change its own process's environment).
async fn start_server(db: &TestDb, proxy_port: u16) -> Server {
    let port = free_port();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let log = db.dir.path().join("server.log");
    let child = Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("DATA_DIR", db.dir.path())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("AGENT_TOKEN", AGENT_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .env("TLS", "off")
        .env("ENROLMENT_RATE_PER_MINUTE", "1000000")
        .env("SITE_ROOT", workspace_root().join("target/site"))
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env("ALL_PROXY", &proxy)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    let http = reqwest::Client::new();
    let url = format!("{}/api/health", server.base);
    wait_for("the server to answer", Duration::from_secs(30), || async {
        http.get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    server
}

/// Sends `body` as the admin and expects a success.
async fn admin(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Value {
    let answer = http
        .request(method.clone(), format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let text = answer.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Something of every kind on file, so lists and reads answer real rows to check.
async fn seed_data(base: &str, proxy_taken: &AtomicUsize) {
    let http = reqwest::Client::new();
    for host in ["hostile-01", "hostile-02", "hostile-03"] {
        let answer = http
            .post(format!("{base}/api/health/report"))
            .bearer_auth(AGENT_TOKEN)
            .json(&report_for(host))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{host}");
    }
    use reqwest::Method;
    admin(
        &http,
        base,
        Method::POST,
        "/api/users",
        json!({"username": "oper", "password": "correct horse battery", "role": "operator"}),
    )
    .await;
    admin(
        &http,
        base,
        Method::POST,
        "/api/tokens",
        json!({"username": "oper", "label": "scripts", "role": "viewer"}),
    )
    .await;
    admin(
        &http,
        base,
        Method::POST,
        "/api/enrolment-tokens",
        json!({"label": "new hosts", "max_uses": 5}),
    )
    .await;
    admin(
        &http,
        base,
        Method::PUT,
        "/api/vms/2/proxmox",
        json!({"node": "pve1", "vmid": 102}),
    )
    .await;
    admin(
        &http,
        base,
        Method::PUT,
        "/api/vms/1/tags",
        json!({"tags": ["db", "prod"]}),
    )
    .await;
    admin(
        &http,
        base,
        Method::POST,
        "/api/vms/3/snooze",
        json!({"hours": 2}),
    )
    .await;
    admin(
        &http,
        base,
        Method::POST,
        "/api/maintenance",
        json!({"name": "patching", "scope": "all", "cron": "0 2 * * 6", "duration_minutes": 60}),
    )
    .await;
    // `.invalid` never resolves; the channel's test message must reach the stand-in proxy,
    // which proves the run's made-up channel URLs cannot reach anything else either.
    let channel = admin(
        &http,
        base,
        Method::POST,
        "/api/notify/channels",
        json!({"name": "hook", "kind": "webhook", "target": "https://notify.invalid/hook"}),
    )
    .await;
    let id = channel["id"].as_i64().unwrap();
    admin(
        &http,
        base,
        Method::POST,
        "/api/notify/rules",
        json!({"channel_id": id, "kinds": ["vm_down"]}),
    )
    .await;
    let test = admin(
        &http,
        base,
        Method::POST,
        &format!("/api/notify/channels/{id}/test"),
        json!({}),
    )
    .await;
    assert_eq!(test["delivered"], false, "{test}");
    assert!(
        proxy_taken.load(Ordering::SeqCst) > 0,
        "the test message did not go through the stand-in proxy"
    );
}

/// What one schemathesis run reported.
struct Outcome {
    requests: u64,
    report: Value,
    output: String,
    took: Duration,
}

/// Runs schemathesis over every operation of `schema` against `base`.
fn schemathesis(
    dir: &Path,
    schema: &Path,
    base: &str,
    examples: &str,
    seed: Option<&str>,
) -> Outcome {
    // The bootstrap admin token comes from the server's environment: no API call can revoke
    // it, so the run keeps its access whatever it deletes (users, API tokens, sessions) and
    // every operation stays in the run. Reports carry the agents' credential instead.
    // Every request says it comes from the dashboard's own site, as a browser's would, so
    // sign-in, setup and sign-out get past their cross-site check and are exercised.
    // The live stream never ends by itself: one event read is its answer.
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "headers = {{ Authorization = \"Bearer {ADMIN_TOKEN}\", \
                          Sec-Fetch-Site = \"same-origin\" }}\n\
             \n\
             [[operations]]\n\
             include-path = \"/api/health/report\"\n\
             headers = {{ Authorization = \"Bearer {AGENT_TOKEN}\" }}\n\
             \n\
             [[operations]]\n\
             include-path = \"/api/live\"\n\
             max-stream-events = 1\n"
        ),
    )
    .unwrap();
    let report = dir.join("report.json");
    let started = Instant::now();
    let mut command = Command::new("python3");
    command
        .current_dir(dir)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .arg("run")
        .arg(schema)
        .args([
            "--url",
            base,
            "--checks",
            CHECKS,
            "--max-examples",
            examples,
        ])
        .args(["--phases", "examples,coverage,fuzzing", "--workers", "2"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report)
        .args(["--no-color", "--output-truncate", "false"]);
    if let Some(seed) = seed {
        command.args(["--seed", seed]);
    }
    let out = command
        .output()
        .expect("python3 with schemathesis (pip: schemathesis, see scripts/test.sh)");
    let took = started.elapsed();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = std::fs::read_to_string(&report)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| panic!("schemathesis wrote no report:\n{output}"));
    let requests = report["test_cases"]["generated"].as_u64().unwrap_or(0);
    Outcome {
        requests,
        report,
        output,
        took,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_only_documented_answers() {
    let full = std::env::var("FAULTS_FULL").is_ok_and(|v| v == "1");
    let (examples, floor, seed) = if full {
        (FULL_EXAMPLES, FULL_FLOOR, None)
    } else {
        (SHORT_EXAMPLES, SHORT_FLOOR, Some(SHORT_SEED))
    };
    let (proxy_port, proxy_taken) = black_hole().await;
    let db = fresh_db(Backend::Sqlite).await;
    let server = start_server(&db, proxy_port).await;
    seed_data(&server.base, &proxy_taken).await;

    // The document exactly as the server serves it.
    let http = reqwest::Client::new();
    let doc: Value = http
        .get(format!("{}/api/openapi.json", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    let schema = db.dir.path().join("openapi.json");
    std::fs::write(&schema, doc.to_string()).unwrap();

    let dir = db.dir.path().to_owned();
    let base = server.base.clone();
    let examples = examples.to_owned();
    let outcome =
        tokio::task::spawn_blocking(move || schemathesis(&dir, &schema, &base, &examples, seed))
            .await
            .unwrap();
    let report = &outcome.report;
    eprintln!(
        "schemathesis: {} requests over {} operations in {:.1} s ({})",
        outcome.requests,
        report["operations"]["tested"],
        outcome.took.as_secs_f64(),
        if full { "full form" } else { "short form" }
    );
    let explain = || {
        format!(
            "{}\n--- report\n{report:#}\n--- server log (tail)\n{}",
            outcome.output,
            server.log_tail()
        )
    };
    assert_eq!(report["complete"], true, "{}", explain());
    assert_eq!(
        report["failures"],
        json!([]),
        "answers outside the document or server errors:\n{}",
        explain()
    );
    assert_eq!(report["errors"], json!([]), "{}", explain());
    assert_eq!(
        report["operations"]["tested"].as_u64(),
        u64::try_from(operations).ok(),
        "every operation is tested: {}",
        explain()
    );
    assert!(
        outcome.requests >= floor,
        "only {} requests (at least {floor} expected):\n{}",
        outcome.requests,
        explain()
    );
    assert_eq!(report["exit_code"], 0, "{}", explain());
}

/// Sends `body` (of `content_type`, if any) and returns the status, the content type and
/// the body as JSON (`null` when it is not JSON).
async fn raw(
    srv: &TestServer,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, String, Value) {
    let mut req = srv
        .http
        .request(method, srv.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("sec-fetch-site", "same-origin")
        .body(body.to_owned());
    if let Some(kind) = content_type {
        req = req.header("content-type", kind);
    }
    let answer = req.send().await.unwrap();
    let status = answer.status().as_u16();
    let kind = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = answer.json::<Value>().await.unwrap_or(Value::Null);
    (status, kind, body)
}

/// Found by schemathesis: a bad `state` on the message log was refused in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_message_filter_is_refused_in_json() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    for query in ["state=bogus", "limit=x", "color=blue"] {
        let path = format!("/api/notify/messages?{query}");
        let (status, kind, body) = raw(&srv, reqwest::Method::GET, &path, None, "").await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(kind, "application/json", "{query}");
        assert_eq!(body["error"]["field"], "query", "{query}: {body}");
    }
    srv.stop().await;
}

/// Found by schemathesis: a sign-in or setup form that does not fit was refused in plain
/// text (422, 415) instead of the API's JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_that_does_not_fit_is_refused_in_json() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let form = Some("application/x-www-form-urlencoded");
    for (path, content_type, body) in [
        ("/auth/login", form, "username=a"),
        (
            "/auth/login",
            Some("application/json"),
            r#"{"username":"a","password":"b"}"#,
        ),
        ("/auth/login", None, "username=a&password=b"),
        ("/auth/setup", form, "setup_code=x&username=a"),
    ] {
        let (status, kind, answer) =
            raw(&srv, reqwest::Method::POST, path, content_type, body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(kind, "application/json", "{path} {body}");
        assert_eq!(answer["error"]["field"], "body", "{path} {body}: {answer}");
    }
    // A form that fits is still answered by a redirect to the page, as before.
    let answer = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(srv.url("/auth/login"))
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("username=nobody&password=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 303);
    assert_eq!(answer.headers()["location"], "/login?error=invalid");
    srv.stop().await;
}

/// Found by review while fixing the above: an id segment that is not UTF-8 was refused in
/// plain text on the routes of users, tokens, channels, rules and windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_id_is_refused_in_json() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    use reqwest::Method;
    for (method, path) in [
        (Method::DELETE, "/api/users/%FF"),
        (Method::PUT, "/api/users/%FF/password"),
        (Method::DELETE, "/api/tokens/%FF"),
        (Method::DELETE, "/api/enrolment-tokens/%FF"),
        (Method::DELETE, "/api/notify/channels/%FF"),
        (Method::POST, "/api/notify/channels/%FF/test"),
        (Method::DELETE, "/api/notify/rules/%FF"),
        (Method::DELETE, "/api/maintenance/%FF"),
        (Method::DELETE, "/api/maintenance/0"),
        (Method::GET, "/api/vms/%FF"),
    ] {
        let (status, kind, body) = raw(&srv, method.clone(), path, None, "{}").await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_eq!(kind, "application/json", "{method} {path}");
        assert_eq!(body["error"]["field"], "id", "{method} {path}: {body}");
    }
    srv.stop().await;
}

/// Found by schemathesis: on SQLite a credential rotation answered 503 ("storage
/// unavailable") when another request's write (its audit entry) landed between the
/// rotation's read and its write. Eight admins rotating at once must all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_write_transactions_do_not_fail_on_sqlite() {
    let srv = TestServer::start(Backend::Sqlite, &[]).await;
    for host in ["rotate-01", "rotate-02"] {
        assert_eq!(srv.report(&report_for(host)).await.0, 200);
    }
    let srv = Arc::new(srv);
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let srv = srv.clone();
            tokio::spawn(async move {
                let mut refused = Vec::new();
                for n in 0..40 {
                    let vm = (worker + n) % 2 + 1;
                    let (status, body) = srv
                        .send(
                            reqwest::Method::POST,
                            &format!("/api/vms/{vm}/credential"),
                            Some(ADMIN_TOKEN),
                            None,
                        )
                        .await;
                    if status != 200 {
                        refused.push(format!("{status} {body}"));
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = Vec::new();
    for worker in workers {
        refused.extend(worker.await.unwrap());
    }
    assert!(
        refused.is_empty(),
        "{} of 320 refused: {refused:?}",
        refused.len()
    );
    Arc::into_inner(srv).unwrap().stop().await;
}
