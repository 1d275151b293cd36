//! A benchmark, not a test the suite runs (`#[ignore]`; `scripts/bench.sh` runs it): one VM
//! of a 100,000-VM fleet falls silent while the rest keep reporting; how long after its
//! deadline it is marked down, and how long after that Proxmox is first asked about it and
//! sent the first power action. The release server runs as its own process against the
//! in-suite fake Proxmox, so the figures are a release build's.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use reqwest::Method;
use serde_json::{Value, json};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FLEET: usize = 100_000;
/// The stale timeout (`BENCH_STALE_MS`, default 300 s): the rest of the fleet must keep
/// reporting inside it, 100,000 reports per two thirds of it (500/s at 300 s).
fn stale_ms() -> i64 {
    std::env::var("BENCH_STALE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000)
}
const CLIENTS: usize = 48;
const TARGET_VMID: i64 = 100;

fn wall_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn host(i: usize) -> String {
    format!("scale-{i:06}")
}

async fn post_report(http: &reqwest::Client, base: &str, body: &Value) {
    loop {
        let r = http
            .post(format!("{base}/api/health/report"))
            .bearer_auth(AGENT_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => return,
            429 | 503 => tokio::time::sleep(Duration::from_secs(1)).await,
            other => panic!("report: HTTP {other}: {}", r.text().await.unwrap()),
        }
    }
}

/// Every VM but the target reports once, from `CLIENTS` clients; paced over `period` when
/// given, else as fast as the server takes them.
async fn fleet_reports(http: &reqwest::Client, base: &str, period: Option<Duration>) {
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CLIENTS {
        let (http, base) = (http.clone(), base.to_owned());
        workers.spawn(async move {
            let start = tokio::time::Instant::now();
            let mine: Vec<usize> = (w..FLEET).step_by(CLIENTS).collect();
            let step = period.map(|p| p / u32::try_from(mine.len()).unwrap());
            for (k, i) in mine.into_iter().enumerate() {
                if let Some(step) = step {
                    tokio::time::sleep_until(start + step * u32::try_from(k).unwrap()).await;
                }
                post_report(&http, &base, &report_for(&host(i))).await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
}

async fn one_backend(backend: Backend) {
    let binary = workspace_root().join("target/release/vm-healthcheck");
    assert!(
        binary.exists(),
        "build the release server first: cargo build --release -p server"
    );
    let mut hung = FakeVm::running(TARGET_VMID, "pve1");
    // No guest agent and no I/O: the second opinion finds no sign of life.
    hung.agent = false;
    let fake = FakePve::start(vec![hung]).await;
    let db = fresh_db(backend).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(db.dir.path().join("server.log")).unwrap();
    let server = std::process::Command::new(&binary)
        .envs(fake.env())
        .envs([
            ("DATABASE_URL", db.url.clone()),
            ("DATA_DIR", db.dir.path().display().to_string()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("AGENT_TOKEN", AGENT_TOKEN.into()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.into()),
            ("TLS", "off".into()),
            ("RUST_LOG", "warn".into()),
            ("STALE_TIMEOUT_MS", stale_ms().to_string()),
            ("RESET_VETO_SECONDS", "0".into()),
            ("ENROLMENT_RATE_PER_MINUTE", "100000000".into()),
            ("REPORT_RATE_PER_MINUTE", "100000000".into()),
            ("REPORT_BURST", "100000000".into()),
            (
                "SITE_ROOT",
                workspace_root().join("target/site").display().to_string(),
            ),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    wait_for("the server to answer", Duration::from_secs(60), || async {
        let r = http.get(format!("{base}/api/health")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    let started = std::time::Instant::now();
    fleet_reports(&http, &base, None).await;
    println!(
        "{backend:?}: {FLEET} VMs created in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The target: a linked guest, which keeps reporting until the amnesty ends.
    let mut target = report_for("scale-target");
    target["vmid"] = json!(TARGET_VMID);
    target["node"] = json!("pve1");
    let admin = |method: Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let id = {
        let r = http
            .post(format!("{base}/api/health/report"))
            .bearer_auth(AGENT_TOKEN)
            .json(&target)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["vm_id"].as_i64().unwrap()
    };
    let (status, body) = admin(
        Method::PUT,
        &format!("/api/vms/{id}/proxmox"),
        Some(json!({"node": "pve1", "vmid": TARGET_VMID, "type": "qemu"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // The rest of the fleet keeps reporting, paced, until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let keep_alive = {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let period = Duration::from_millis(u64::try_from(stale_ms() * 2 / 3).unwrap());
                fleet_reports(&http, &base, Some(period)).await;
            }
        })
    };
    wait_for(
        "the start-up amnesty to end",
        Duration::from_millis(u64::try_from(stale_ms()).unwrap() + 60_000),
        || async {
            post_report(&http, &base, &target).await;
            let (_, h) = admin(Method::GET, "/api/health", None).await;
            (h["remediation"]["active"] == true).then_some(())
        },
    )
    .await;
    post_report(&http, &base, &target).await;

    // The target falls silent: note when Proxmox is first read about it and first sent an
    // action, polling the fake every few milliseconds.
    let (first_read, first_action) = wait_for(
        "the first power action",
        Duration::from_millis(u64::try_from(stale_ms()).unwrap() + 120_000),
        {
            let mut first_read = None;
            let fake = &fake;
            move || {
                let read_path = format!("/nodes/pve1/qemu/{TARGET_VMID}/status/current");
                let reads = fake.calls().iter().any(|c| c.path == read_path);
                if reads && first_read.is_none() {
                    first_read = Some(wall_ms());
                }
                let acted = !fake.posts().is_empty();
                async move {
                    if acted {
                        Some((first_read, wall_ms()))
                    } else {
                        None
                    }
                }
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (_, vm) = admin(Method::GET, &format!("/api/vms/{id}"), None).await;
    let deadline = vm["last_seen_ms"].as_i64().unwrap() + stale_ms();
    let down = vm["status_since_ms"].as_i64().unwrap();
    let (_, health) = admin(Method::GET, "/api/health", None).await;
    println!(
        "{backend:?}: down {} ms after its deadline; Proxmox first read {} ms and first power \
         action ({}) {} ms after it was marked down (the second opinion's two reads are \
         EVIDENCE_INTERVAL_MS = 5,000 ms apart; no veto window); last scheduler round {} ms",
        down - deadline,
        first_read.map_or("?".to_owned(), |t| (t - down).to_string()),
        fake.posts().join(", "),
        first_action - down,
        health["jobs"]["scheduler_round_took_ms"],
    );
    keep_alive.abort();
    server.0.kill().unwrap();
    let _ = server.0.wait();
}

/// The server process ends with the benchmark, whichever way it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of several minutes; scripts/bench.sh runs it"]
async fn one_silent_vm_among_100000_is_down_and_acted_on_promptly() {
    // `BENCH_BACKENDS=sqlite` (or `postgres`) runs one.
    let which = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    if which.contains("sqlite") {
        one_backend(Backend::Sqlite).await;
    }
    if which.contains("postgres") {
        one_backend(Backend::Postgres).await;
    }
}
