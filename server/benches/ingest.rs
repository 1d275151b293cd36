//! Heartbeat ingest throughput through the real HTTP path, on SQLite and PostgreSQL, with
//! group commit (the default) and with one commit per report, to show what grouping buys.
//!
//! Run: `scripts/bench.sh` (or `cargo bench -p server --bench ingest`); PostgreSQL from
//! `TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`.

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

async fn database_url(backend: &str, dir: &tempfile::TempDir, round: usize) -> String {
    if backend == "sqlite" {
        return format!("sqlite://{}/bench-{round}.db", dir.path().display());
    }
    let admin = std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut conn = AsyncPgConnection::establish(&admin).await.unwrap();
    let name = format!("vmhc_bench_{}_{round}", std::process::id());
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

/// Reports per second and per-request latencies (ms) for one run.
async fn run_once(backend: &str, batch_max: &str, round: usize) -> (f64, Vec<f64>) {
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
    let cfg = server::config::Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let srv = server::start(cfg).await.unwrap();
    let url = format!("http://{}/api/health/report", srv.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (http, url, ok) = (http.clone(), url.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = client;
            while started.elapsed() < RUN_FOR {
                let body = json!({
                    "hostname": format!("bench-{:04}", n % VMS), "os": "linux", "cpu_percent": 10.0,
                    "ram_used_bytes": 1000, "ram_total_bytes": 4000, "uptime_seconds": 100,
                    "disks": [{"mount": "/", "used_bytes": 1, "total_bytes": 2}]
                });
                n += CLIENTS;
                let t = Instant::now();
                let resp = http
                    .post(&url)
                    .bearer_auth("bench-agent")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                ok.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    srv.stop().await;
    (rate, latencies)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!(
        "ingest: {CLIENTS} clients, {VMS} VMs, {}s per run, median of {ROUNDS} runs",
        RUN_FOR.as_secs()
    );
    println!("| backend | commits | reports/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for backend in ["sqlite", "postgres"] {
        let mut grouped_rate = 0.0;
        for (label, batch_max) in [("grouped (up to 500)", "500"), ("one per report", "1")] {
            let mut rates = Vec::new();
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for round in 0..ROUNDS {
                let (rate, mut lat) = run_once(backend, batch_max, round).await;
                rates.push(rate);
                p50s.push(percentile(&mut lat, 0.5));
                p99s.push(percentile(&mut lat, 0.99));
            }
            let rate = median(&mut rates);
            if batch_max == "500" {
                grouped_rate = rate;
            }
            println!(
                "| {backend} | {label} | {rate:.0} | {:.1} | {:.1} |",
                median(&mut p50s),
                median(&mut p99s)
            );
            if batch_max == "1" {
                println!(
                    "| {backend} | ratio grouped / one per report | {:.1}x | | |",
                    grouped_rate / rate
                );
            }
        }
    }
}
