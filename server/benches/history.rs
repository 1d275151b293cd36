//! Chart reads against a large history: 30 days of hour rollups and a day of minute
//! rollups for every VM of a fleet, then the VM page's 30-day and 24-hour charts of random
//! VMs through the real HTTP path, on SQLite and PostgreSQL.
//!
//! Run: `scripts/bench.sh` (or `cargo bench -p server --bench history`); 10,000 VMs.
//! `--smoke` (`scripts/bench.sh --smoke`): 200 VMs, and it fails unless every chart answers
//! 200 from the tier it should, with one point per stored hour.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::as_conversions,
    clippy::indexing_slicing
)]

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use std::collections::HashMap;
use std::time::Instant;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const REQUESTS: usize = 200;

fn admin_pg_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn pg_execute(sql: &str) {
    let mut conn = AsyncPgConnection::establish(&admin_pg_url()).await.unwrap();
    conn.batch_execute(sql).await.unwrap();
}

async fn database_url(backend: &str, dir: &tempfile::TempDir) -> String {
    if backend == "sqlite" {
        return format!("sqlite://{}/history.db", dir.path().display());
    }
    let name = format!("vmhc_bench_history_{}", std::process::id());
    pg_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    pg_execute(&format!("CREATE DATABASE {name}")).await;
    format!("{}/{name}", admin_pg_url().rsplit_once('/').unwrap().0)
}

/// VMs and their rollups, written straight into the tables by the database itself.
fn fill_sql(backend: &str, vms: i64, now: i64) -> String {
    let hour_end = now - now % HOUR;
    let hour_start = hour_end - 30 * DAY;
    let minute_end = now - now % 60_000;
    let minute_start = minute_end - DAY;
    // Columns every rollup row gets, from its VM id `v` and bucket `b`.
    let values = |samples: i64| {
        format!(
            "{samples}, (v % 50) * 1.0, 50 + (v % 50), {samples} * 50.0, 20.0, 40.0, \
             {samples} * 30.0, {samples}, 10.0, 60.0, {samples} * 35.0, b / 1000"
        )
    };
    let columns = "vm_id, bucket_ms, samples, cpu_min, cpu_max, cpu_sum, ram_min, ram_max, \
                   ram_sum, disk_samples, disk_min, disk_max, disk_sum, uptime_max";
    if backend == "postgres" {
        let vm_ids = format!("generate_series(1, {vms})");
        let hours =
            format!("generate_series({hour_start}::bigint, {hour_end}::bigint - 1, {HOUR})");
        let minutes =
            format!("generate_series({minute_start}::bigint, {minute_end}::bigint - 1, 60000)");
        return format!(
            "INSERT INTO vms (hostname, os, status, status_since_ms, status_reason, first_seen_ms) \
             SELECT 'bench-' || v, 'linux', 'healthy', {now}, 'bench', {now} FROM {vm_ids} AS v;
             INSERT INTO metric_hours ({columns}) SELECT v, b, {} FROM {vm_ids} AS v, {hours} AS b;
             INSERT INTO metric_minutes ({columns}) SELECT v, b, {} FROM {vm_ids} AS v, {minutes} AS b;
             ANALYZE;",
            values(120),
            values(2)
        );
    }
    format!(
        "WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < {vms}) \
         INSERT INTO vms (hostname, os, status, status_since_ms, status_reason, first_seen_ms) \
         SELECT 'bench-' || v, 'linux', 'healthy', {now}, 'bench', {now} FROM n;
         WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < {vms}), \
         t(b) AS (SELECT {hour_start} UNION ALL SELECT b + {HOUR} FROM t WHERE b + {HOUR} < {hour_end}) \
         INSERT INTO metric_hours ({columns}) SELECT v, b, {} FROM n, t;
         WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < {vms}), \
         t(b) AS (SELECT {minute_start} UNION ALL SELECT b + 60000 FROM t WHERE b + 60000 < {minute_end}) \
         INSERT INTO metric_minutes ({columns}) SELECT v, b, {} FROM n, t;
         ANALYZE;",
        values(120),
        values(2)
    )
}

struct Measured {
    p50_ms: f64,
    p95_ms: f64,
    tier: String,
    points: usize,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * p) as usize]
}

async fn charts(base: &str, vms: i64, span_ms: i64, requests: usize) -> Measured {
    let http = reqwest::Client::new();
    let mut took = Vec::with_capacity(requests);
    let mut tier = String::new();
    let mut points = 0;
    for i in 0..requests {
        // Spread over the fleet, not the same few pages of the index every time.
        let vm = (i as i64 * 7919) % vms + 1;
        let now = server::now_ms();
        let url = format!(
            "{base}/api/vms/{vm}/metrics?from={}&to={now}&points=360",
            now - span_ms
        );
        let started = Instant::now();
        let answer = http
            .get(&url)
            .bearer_auth("bench-admin")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json().await.unwrap();
        took.push(started.elapsed().as_secs_f64() * 1000.0);
        tier = body["tier"].as_str().unwrap_or_default().to_owned();
        points = body["points"].as_array().map_or(0, Vec::len);
    }
    Measured {
        p50_ms: percentile(&mut took, 0.5),
        p95_ms: percentile(&mut took, 0.95),
        tier,
        points,
    }
}

async fn run(backend: &'static str, vms: i64, requests: usize) -> (Measured, Measured, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url(backend, &dir).await);
    vars.insert("DATA_DIR".into(), dir.path().display().to_string());
    vars.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    vars.insert("AGENT_TOKEN".into(), "bench-agent".into());
    vars.insert("ADMIN_TOKEN".into(), "bench-admin".into());
    vars.insert("TLS".into(), "off".into());
    let cfg = server::config::Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let srv = server::start(cfg).await.unwrap();
    let fill = Instant::now();
    {
        let mut conn = srv.state.db.conn().await.unwrap();
        let sql = fill_sql(backend, vms, server::now_ms());
        server::with_conn!(conn, |c| c.batch_execute(&sql).await).unwrap();
    }
    let fill_s = fill.elapsed().as_secs_f64();
    let base = format!("http://{}", srv.addr);
    let month = charts(&base, vms, 30 * DAY, requests).await;
    let day = charts(&base, vms, DAY, requests).await;
    srv.stop().await;
    if backend == "postgres" {
        let name = format!("vmhc_bench_history_{}", std::process::id());
        pg_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    }
    (month, day, fill_s)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (vms, requests) = if smoke { (200, 20) } else { (10_000, REQUESTS) };
    println!(
        "chart reads: {vms} VMs with 30 days of hour rollups and a day of minute rollups, \
         {requests} charts of random VMs per range"
    );
    println!("| backend | chart | tier | points | p50 ms | p95 ms |");
    println!("|---|---|---|---|---|---|");
    let mut failed = false;
    for backend in ["sqlite", "postgres"] {
        let (month, day, fill_s) = run(backend, vms, requests).await;
        for (label, m, want) in [("30 d", &month, "hour"), ("24 h", &day, "minute")] {
            println!(
                "| {backend} | {label} | {} | {} | {:.1} | {:.1} |",
                m.tier, m.points, m.p50_ms, m.p95_ms
            );
            if m.tier != want || m.points == 0 {
                failed = true;
            }
        }
        println!("({backend}: history written in {fill_s:.0} s)");
    }
    if failed {
        println!("FAIL: a chart did not read the tier its range needs, or came back empty");
        std::process::exit(1);
    }
}
