//! Heartbeat ingest throughput through the real HTTP path, on SQLite and PostgreSQL, with
//! group commit (the default) and with one commit per report, to show what grouping buys,
//! beside a reference handler measured in the same run: the same bearer check (a per-VM
//! credential looked up by its hash in memory) and the same report parsing, no storage. Its
//! rate is the ceiling of this machine's HTTP path; the server's share of it is the figure.
//!
//! Run: `scripts/bench.sh` (or `cargo bench -p server --bench ingest`); PostgreSQL from
//! `TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`.
//!
//! `--smoke` (`scripts/bench.sh --smoke`, run by CI): one short run per backend and commit
//! mode that checks the promise behind the figures: every 200 answered is a stored row.
//! Exits non-zero when the count of stored metric rows differs from the count of 200s, or
//! when any request got another answer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::as_conversions,
    clippy::indexing_slicing,
    clippy::string_slice
)]

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const VMS: usize = 1000;
const RUN_FOR: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;
const SMOKE_RUN_FOR: Duration = Duration::from_secs(2);
const PROFILE_RUN_FOR: Duration = Duration::from_secs(20);

fn admin_pg_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn pg_database_name(round: usize) -> String {
    format!("vmhc_bench_{}_{round}", std::process::id())
}

async fn pg_execute(sql: &str) {
    let mut conn = AsyncPgConnection::establish(&admin_pg_url()).await.unwrap();
    conn.batch_execute(sql).await.unwrap();
}

async fn database_url(backend: &str, dir: &tempfile::TempDir, round: usize) -> String {
    if backend == "sqlite" {
        return format!("sqlite://{}/bench-{round}.db", dir.path().display());
    }
    let name = pg_database_name(round);
    pg_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    pg_execute(&format!("CREATE DATABASE {name}")).await;
    format!("{}/{name}", admin_pg_url().rsplit_once('/').unwrap().0)
}

/// What one run measured.
struct Run {
    /// Reports answered 200 per second.
    rate: f64,
    /// Per-request latencies (ms) of the 200s.
    latencies: Vec<f64>,
    answered_200: u64,
    /// Requests answered otherwise, or not at all.
    other: u64,
    stored_rows: i64,
}

/// The report of VM number `n`.
fn report(n: usize) -> serde_json::Value {
    json!({
        "hostname": format!("bench-{n:04}"), "os": "linux", "cpu_percent": 10.0,
        "ram_used_bytes": 1000, "ram_total_bytes": 4000, "uptime_seconds": 100,
        "disks": [{"mount": "/", "used_bytes": 1, "total_bytes": 2}]
    })
}

async fn run_once(
    backend: &'static str,
    batch_max: &str,
    write: &str,
    round: usize,
    run_for: Duration,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert(
        "DATABASE_URL".into(),
        database_url(backend, &dir, round).await,
    );
    vars.insert("DATA_DIR".into(), dir.path().display().to_string());
    vars.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    vars.insert("AGENT_TOKEN".into(), "bench-agent".into());
    vars.insert("ADMIN_TOKEN".into(), "bench-admin".into());
    vars.insert("INGEST_BATCH_MAX".into(), batch_max.into());
    vars.insert("INGEST_WRITE".into(), write.into());
    vars.insert("TLS".into(), "off".into());
    // Every VM enrols from this one address.
    vars.insert("ENROLMENT_RATE_PER_MINUTE".into(), "1000000".into());
    let cfg = server::config::Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let srv = server::start(cfg).await.unwrap();
    let url = format!("http://{}/api/health/report", srv.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    // Every VM enrols once, as agents do, and then reports with its own credential.
    let mut credentials = Vec::with_capacity(VMS);
    for n in 0..VMS {
        let answer: serde_json::Value = http
            .post(&url)
            .bearer_auth("bench-agent")
            .json(&report(n))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        credentials.push(answer["credential"].as_str().unwrap().to_owned());
    }
    let credentials = Arc::new(credentials);
    let enrolled_rows = {
        let mut conn = srv.state.db.conn().await.unwrap();
        server::db::store::count_metric_samples(&mut conn, None)
            .await
            .unwrap()
    };
    let load = load(&http, &url, credentials, run_for, backend).await;
    let Load {
        rate,
        latencies,
        answered_200,
        other,
    } = load;
    // Every client has had its last answer: whatever was answered 200 must be stored now.
    let stored_rows = {
        let mut conn = srv.state.db.conn().await.unwrap();
        server::db::store::count_metric_samples(&mut conn, None)
            .await
            .unwrap()
            - enrolled_rows
    };
    srv.stop().await;
    if backend == "postgres" {
        let name = pg_database_name(round);
        pg_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    }
    Run {
        rate,
        latencies,
        answered_200,
        other,
        stored_rows,
    }
}

/// What one load run saw.
struct Load {
    rate: f64,
    latencies: Vec<f64>,
    answered_200: u64,
    other: u64,
}

/// `CLIENTS` concurrent clients posting reports to `url` for `run_for`, each VM with its
/// own credential.
async fn load(
    http: &reqwest::Client,
    url: &str,
    credentials: Arc<Vec<String>>,
    run_for: Duration,
    label: &'static str,
) -> Load {
    let ok = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (http, url, ok, other) = (http.clone(), url.to_owned(), ok.clone(), other.clone());
        let credentials = credentials.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = client;
            while started.elapsed() < run_for {
                let body = report(n % VMS);
                let credential = &credentials[n % VMS];
                n += CLIENTS;
                let t = Instant::now();
                let resp = http
                    .post(&url)
                    .bearer_auth(credential)
                    .json(&body)
                    .send()
                    .await;
                match resp {
                    Ok(resp) if resp.status().as_u16() == 200 => {
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(resp) => {
                        eprintln!("{label}: answer {}", resp.status());
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("{label}: request failed: {e}");
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let answered_200 = ok.load(Ordering::Relaxed);
    Load {
        rate: answered_200 as f64 / started.elapsed().as_secs_f64(),
        latencies,
        answered_200,
        other: other.load(Ordering::Relaxed),
    }
}

/// The reference: a minimal axum handler with the server's bearer check and report
/// parsing and nothing else. Answers 200 to a known credential and a valid report.
async fn reference_server(credentials: &[String]) -> (String, tokio::task::JoinHandle<()>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode, header};
    let known: Arc<std::collections::HashSet<String>> = Arc::new(
        credentials
            .iter()
            .map(|c| server::auth::hash_token(c))
            .collect(),
    );
    let app = axum::Router::new().route(
        "/api/health/report",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let known = known.clone();
            async move {
                let token = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if !token.is_some_and(|t| known.contains(&server::auth::hash_token(t))) {
                    return (StatusCode::UNAUTHORIZED, "{}");
                }
                match domain::heartbeat::parse_report(&body, server::now_ms()) {
                    Ok(_) => (StatusCode::OK, "{\"status\":\"ok\"}"),
                    Err(_) => (StatusCode::BAD_REQUEST, "{}"),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/health/report",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

/// The reference's rate under the same load.
async fn reference_once(run_for: Duration) -> Load {
    let credentials: Vec<String> = (0..VMS)
        .map(|_| {
            server::auth::generate_secret("vmhc_vm_")
                .expose()
                .to_owned()
        })
        .collect();
    let (url, task) = reference_server(&credentials).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let run = load(&http, &url, Arc::new(credentials), run_for, "reference").await;
    task.abort();
    run
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * p) as usize]
}

/// One short run per backend and commit mode; exits 1 unless stored rows == 200s answered.
async fn smoke() {
    let mut failed = false;
    for backend in ["sqlite", "postgres"] {
        for batch_max in ["500", "1"] {
            let run = run_once(backend, batch_max, "set", 0, SMOKE_RUN_FOR).await;
            let verdict = if run.answered_200 > 0
                && run.other == 0
                && i64::try_from(run.answered_200) == Ok(run.stored_rows)
            {
                "ok"
            } else {
                failed = true;
                "FAIL"
            };
            println!(
                "{verdict}: {backend}, batch max {batch_max}: {} answered 200, {} stored rows, \
                 {} other answers ({:.0} reports/s)",
                run.answered_200, run.stored_rows, run.other, run.rate
            );
        }
    }
    let reference = reference_once(SMOKE_RUN_FOR).await;
    if reference.answered_200 == 0 || reference.other > 0 {
        failed = true;
    }
    println!(
        "reference handler (auth + parse, no storage): {} answered 200, {} other answers \
         ({:.0} reports/s)",
        reference.answered_200, reference.other, reference.rate
    );
    if failed {
        println!("ingest smoke: stored rows must equal the 200s answered, with no other answers");
        std::process::exit(1);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--smoke") {
        smoke().await;
        return;
    }
    // One long run of one backend's default configuration, for a profiler to sample
    // (scripts/profile-ingest.sh).
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--profile") {
        let backend = match args.get(at + 1).map(String::as_str) {
            Some("postgres") => "postgres",
            _ => "sqlite",
        };
        let run = run_once(backend, "500", "set", 0, PROFILE_RUN_FOR).await;
        println!("profile run, {backend}: {:.0} reports/s", run.rate);
        return;
    }
    println!(
        "ingest: {CLIENTS} clients, {VMS} VMs, {}s per run, median of {ROUNDS} runs",
        RUN_FOR.as_secs()
    );
    println!("| backend | commits | reports/s | p50 ms | p99 ms | share of reference |");
    println!("|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for _ in 0..ROUNDS {
        let Load {
            rate,
            latencies: mut lat,
            other,
            ..
        } = reference_once(RUN_FOR).await;
        assert_eq!(other, 0, "reference requests not answered 200");
        rates.push(rate);
        p50s.push(percentile(&mut lat, 0.5));
        p99s.push(percentile(&mut lat, 0.99));
    }
    let reference = median(&mut rates);
    println!(
        "| reference (auth + parse, no storage) | none | {reference:.0} | {:.1} | {:.1} | 100 % |",
        median(&mut p50s),
        median(&mut p99s)
    );
    for backend in ["sqlite", "postgres"] {
        let mut grouped_rate = 0.0;
        for (label, batch_max, write) in [
            ("grouped (up to 500), set-based state", "500", "set"),
            ("grouped (up to 500), state per VM", "500", "per-vm"),
            ("one per report", "1", "set"),
        ] {
            let mut rates = Vec::new();
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for round in 0..ROUNDS {
                let Run {
                    rate,
                    latencies: mut lat,
                    other,
                    ..
                } = run_once(backend, batch_max, write, round, RUN_FOR).await;
                assert_eq!(other, 0, "requests not answered 200");
                rates.push(rate);
                p50s.push(percentile(&mut lat, 0.5));
                p99s.push(percentile(&mut lat, 0.99));
            }
            let rate = median(&mut rates);
            if batch_max == "500" && write == "set" {
                grouped_rate = rate;
            }
            println!(
                "| {backend} | {label} | {rate:.0} | {:.1} | {:.1} | {:.1} % |",
                median(&mut p50s),
                median(&mut p99s),
                rate / reference * 100.0
            );
            if batch_max == "1" {
                println!(
                    "| {backend} | ratio grouped / one per report | {:.1}x | | | |",
                    grouped_rate / rate
                );
            }
        }
    }
}
