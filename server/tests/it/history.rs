//! History storage: the rollups hold exactly the samples, retention deletes in bounded
//! batches while reports keep flowing, and charts read the tier their range needs.

use crate::both_backends;
use crate::common::*;
use diesel::sql_types::{BigInt, Double, Nullable};
use diesel_async::SimpleAsyncConnection;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

async fn exec(srv: &TestServer, sql: &str) {
    let mut conn = srv.state().db.conn().await.unwrap();
    server::with_conn!(conn, |c| c.batch_execute(sql).await).unwrap();
}

async fn count(srv: &TestServer, sql: &str) -> i64 {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = srv.state().db.conn().await.unwrap();
    let row: Count =
        server::with_conn!(conn, |c| diesel::sql_query(sql).get_result(c).await).unwrap();
    row.n
}

#[derive(diesel::QueryableByName, Debug)]
struct RollupRow {
    #[diesel(sql_type = BigInt)]
    vm_id: i64,
    #[diesel(sql_type = BigInt)]
    bucket_ms: i64,
    #[diesel(sql_type = BigInt)]
    samples: i64,
    #[diesel(sql_type = Double)]
    cpu_min: f64,
    #[diesel(sql_type = Double)]
    cpu_max: f64,
    #[diesel(sql_type = Double)]
    cpu_sum: f64,
    #[diesel(sql_type = Double)]
    ram_sum: f64,
    #[diesel(sql_type = BigInt)]
    disk_samples: i64,
    #[diesel(sql_type = Nullable<Double>)]
    disk_max: Option<f64>,
    #[diesel(sql_type = BigInt)]
    uptime_max: i64,
}

async fn rollups(srv: &TestServer, table: &str) -> Vec<RollupRow> {
    use diesel_async::RunQueryDsl;
    let sql = format!(
        "SELECT vm_id, bucket_ms, samples, cpu_min, cpu_max, cpu_sum, ram_sum, disk_samples, \
         disk_max, uptime_max FROM {table}"
    );
    let mut conn = srv.state().db.conn().await.unwrap();
    server::with_conn!(conn, |c| diesel::sql_query(&sql).load(c).await).unwrap()
}

/// The test's own aggregate of one bucket, computed from the generated values.
#[derive(Default, Debug)]
struct Expected {
    samples: i64,
    cpu_min: f64,
    cpu_max: f64,
    cpu_sum: f64,
    ram_sum: f64,
    disk_samples: i64,
    disk_max: Option<f64>,
    uptime_max: i64,
}

impl Expected {
    fn add(&mut self, cpu: f64, ram: f64, disk: Option<f64>, uptime: i64) {
        if self.samples == 0 {
            self.cpu_min = cpu;
            self.cpu_max = cpu;
        }
        self.samples += 1;
        self.cpu_min = self.cpu_min.min(cpu);
        self.cpu_max = self.cpu_max.max(cpu);
        self.cpu_sum += cpu;
        self.ram_sum += ram;
        if let Some(d) = disk {
            self.disk_samples += 1;
            self.disk_max = Some(self.disk_max.map_or(d, |m| m.max(d)));
        }
        self.uptime_max = self.uptime_max.max(uptime);
    }

    fn matches(&self, row: &RollupRow) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
        self.samples == row.samples
            && close(self.cpu_min, row.cpu_min)
            && close(self.cpu_max, row.cpu_max)
            && close(self.cpu_sum, row.cpu_sum)
            && close(self.ram_sum, row.ram_sum)
            && self.disk_samples == row.disk_samples
            && self
                .disk_max
                .zip(row.disk_max)
                .is_none_or(|(a, b)| close(a, b))
            && self.disk_max.is_some() == row.disk_max.is_some()
            && self.uptime_max == row.uptime_max
    }
}

/// Ten days of samples for 50 VMs (two a few seconds apart every ten minutes, some VMs
/// without disks), written straight to the table the way ingest would have over those days.
async fn rollups_match_the_samples_and_retention_keeps_what_it_should(backend: Backend) {
    let mut srv = TestServer::start(
        backend,
        &[
            ("RETENTION_MINUTE_DAYS", "8"),
            ("RETENTION_HOUR_DAYS", "9"),
            ("RETENTION_EVENTS_DAYS", "8"),
        ],
    )
    .await;
    let mut vm_ids = Vec::new();
    for i in 0..50 {
        let (status, body) = srv.report(&report_for(&format!("hist-{i:02}"))).await;
        assert_eq!(status, 200, "{body}");
        vm_ids.push(body["vm_id"].as_i64().unwrap());
    }
    // Only the generated samples from here on (the first reports are not settled yet, so
    // nothing has folded them).
    exec(&srv, "DELETE FROM metric_samples").await;
    let now = server::now_ms();
    // Samples sit 5 minutes from any retention cutoff (now minus whole days), so the few
    // seconds between this `now` and the job's own never change which side they are on.
    let start = now - 10 * DAY + 5 * MINUTE;
    let mut minutes: BTreeMap<(i64, i64), Expected> = BTreeMap::new();
    let mut hours: BTreeMap<(i64, i64), Expected> = BTreeMap::new();
    let mut values = Vec::new();
    let mut generated = 0i64;
    for slot in 0..(10 * 144) {
        for (n, vm) in vm_ids.iter().enumerate() {
            let n = n as i64;
            for second in [0, 20] {
                let t = start + slot * 10 * MINUTE + second * 1000;
                let cpu = ((n * 7 + slot * 13 + second) % 1000) as f64 / 10.0;
                let used = 1_000_000 * ((n + slot + second) % 100 + 1);
                let ram = used as f64 * 100.0 / 100_000_000.0;
                let disk = (n % 5 != 0).then(|| ((slot * 3 + n + second) % 100) as f64);
                let uptime = slot * 600 + second;
                minutes
                    .entry((*vm, t - t % MINUTE))
                    .or_default()
                    .add(cpu, ram, disk, uptime);
                hours
                    .entry((*vm, t - t % HOUR))
                    .or_default()
                    .add(cpu, ram, disk, uptime);
                let disk_sql = disk.map_or("NULL".to_owned(), |d| d.to_string());
                values.push(format!(
                    "({vm},{t},{t},{cpu},{used},100000000,{used},100000000,{disk_sql},{uptime})"
                ));
                generated += 1;
            }
        }
        if values.len() >= 1000 || slot == 10 * 144 - 1 {
            exec(
                &srv,
                &format!(
                    "INSERT INTO metric_samples (vm_id, observed_ms, received_ms, cpu_percent, \
                     ram_used_bytes, ram_total_bytes, disk_used_bytes, disk_total_bytes, \
                     disk_max_percent, uptime_seconds) VALUES {}",
                    values.join(",")
                ),
            )
            .await;
            values.clear();
        }
    }
    // Old and recent history rows, and an old reset that never finished.
    let (old, recent, vm) = (now - 20 * DAY, now - DAY, vm_ids[0]);
    exec(
        &srv,
        &format!(
            "INSERT INTO events (at_ms, kind, vm_id, message) VALUES \
             ({old}, 'breaker_tripped', NULL, 'old'), ({recent}, 'breaker_tripped', NULL, 'recent');
             INSERT INTO status_changes (vm_id, from_status, to_status, at_ms, reason) VALUES \
             ({vm}, 'healthy', 'down', {old}, 'old'), ({vm}, 'down', 'healthy', {recent}, 'recent');
             INSERT INTO reset_attempts (vm_id, action, trigger_source, mode, outcome, created_ms) VALUES \
             ({vm}, 'reset', 'scheduler', 'live', 'ok', {old}), \
             ({vm}, 'reset', 'scheduler', 'live', 'pending', {old}), \
             ({vm}, 'reset', 'scheduler', 'live', 'ok', {recent});"
        ),
    )
    .await;

    // Reports keep arriving while the job runs; none may wait a second.
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let stop = stop.clone();
        let http = reqwest::Client::new();
        let url = srv.url("/api/health/report");
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let status = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for("live-during-upkeep"))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 200);
                slowest = slowest.max(started.elapsed());
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (slowest, sent)
        })
    };
    let mut passes = 0;
    let mut folded = 0;
    loop {
        let pass = server::history::pass(srv.state(), now + MINUTE, Duration::from_millis(300))
            .await
            .unwrap();
        folded += pass.folded;
        passes += 1;
        if pass.done {
            break;
        }
        assert!(passes < 10_000, "the job never finished");
    }
    stop.store(true, Ordering::Relaxed);
    let (slowest, sent) = reporter.await.unwrap();
    assert!(sent > 0);
    assert!(
        slowest < Duration::from_secs(1),
        "a report waited {slowest:?} during the job"
    );
    // More than one pass: the work was cut into bounded batches. (The background job may
    // have folded some samples too.)
    assert!(passes > 1, "one pass did everything");
    assert!(folded > 0);

    // Raw: nothing older than 7 days, everything newer still there.
    let raw_cutoff = now - 7 * DAY;
    let ids = vm_ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        count(
            &srv,
            &format!("SELECT COUNT(*) AS n FROM metric_samples WHERE observed_ms < {raw_cutoff}")
        )
        .await,
        0
    );
    let kept_raw = (0..(10 * 144))
        .filter(|slot| start + slot * 10 * MINUTE >= raw_cutoff)
        .count() as i64
        * 2
        * 50;
    assert_eq!(
        count(
            &srv,
            &format!("SELECT COUNT(*) AS n FROM metric_samples WHERE vm_id IN ({ids})")
        )
        .await,
        kept_raw
    );
    assert!(kept_raw < generated);

    // Rollups: exactly the buckets retention keeps, each matching the test's aggregate.
    for (table, expected, keep_days, width) in [
        ("metric_minutes", &minutes, 8, MINUTE),
        ("metric_hours", &hours, 9, HOUR),
    ] {
        let cutoff = now - keep_days * DAY;
        let rows: BTreeMap<(i64, i64), RollupRow> = rollups(&srv, table)
            .await
            .into_iter()
            .filter(|r| vm_ids.contains(&r.vm_id))
            .map(|r| ((r.vm_id, r.bucket_ms), r))
            .collect();
        let mut checked = 0;
        for (key, want) in expected.iter() {
            // A bucket that straddles the cutoff may go either way within the test's run.
            if (key.1 - cutoff).abs() < width + MINUTE {
                continue;
            }
            match rows.get(key) {
                Some(row) => {
                    assert!(key.1 >= cutoff, "{table}: {key:?} outlived its retention");
                    assert!(want.matches(row), "{table} {key:?}: {row:?} != {want:?}");
                    checked += 1;
                }
                None => assert!(key.1 < cutoff, "{table}: {key:?} is missing"),
            }
        }
        assert!(
            rows.keys().all(|k| expected.contains_key(k)),
            "{table} holds a bucket no sample made"
        );
        assert!(checked > 1000, "{table}: only {checked} buckets compared");
    }

    // Events, status changes and history rows: the old ones are gone, except a reset that
    // never finished.
    assert_eq!(
        count(
            &srv,
            "SELECT COUNT(*) AS n FROM events WHERE message = 'old'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &srv,
            "SELECT COUNT(*) AS n FROM events WHERE message = 'recent'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &srv,
            &format!(
                "SELECT COUNT(*) AS n FROM status_changes WHERE at_ms < {}",
                now - 8 * DAY
            )
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &srv,
            "SELECT COUNT(*) AS n FROM status_changes WHERE reason = 'recent'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &srv,
            &format!(
                "SELECT COUNT(*) AS n FROM reset_attempts WHERE created_ms = {old} AND outcome = 'ok'"
            )
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &srv,
            "SELECT COUNT(*) AS n FROM reset_attempts WHERE outcome = 'pending'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &srv,
            &format!("SELECT COUNT(*) AS n FROM reset_attempts WHERE created_ms = {recent}")
        )
        .await,
        1
    );
    srv.stop().await;
}
both_backends!(rollups_match_the_samples_and_retention_keeps_what_it_should);

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A day of reports with a known shape: a CPU ramp, a two-hour silence, one spike.
async fn charts_read_the_tier_their_range_needs(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let now = server::now_ms();
    let day_start = now - DAY;
    let spike_at = day_start + 18 * HOUR + 2 * MINUTE;
    let gap = (day_start + 10 * HOUR)..(day_start + 12 * HOUR);
    let mut vm_id = 0;
    let mut sent = 0;
    let mut t = day_start;
    while t < now - 10 * MINUTE {
        if !gap.contains(&t) {
            let mut r = report_for("chart-01");
            let ramp = ((t - day_start) * 50 / DAY) as f64;
            r["cpu_percent"] = json!(if t == spike_at { 100.0 } else { ramp });
            r["observed_at"] = json!(rfc3339(t));
            let (status, body) = srv.report(&r).await;
            assert_eq!(status, 200, "{body}");
            vm_id = body["vm_id"].as_i64().unwrap();
            sent += 1;
        }
        t += if t + 5 * MINUTE > spike_at && t < spike_at {
            spike_at - t
        } else {
            5 * MINUTE
        };
    }
    let chart = |from: i64, points: i64| {
        let srv = &srv;
        async move {
            let (status, body) = srv
                .get(&format!(
                    "/api/vms/{vm_id}/metrics?from={from}&to={now}&points={points}"
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let check_day = |body: &Value| {
        assert_eq!(body["tier"], "minute", "{body}");
        let width = body["point_ms"].as_i64().unwrap();
        let start = body["from_ms"].as_i64().unwrap();
        let points = body["points"].as_array().unwrap();
        let total: i64 = points.iter().map(|p| p["samples"].as_i64().unwrap()).sum();
        assert_eq!(total, sent, "every sample counted once");
        // The spike is the one point whose max is 100, and it sits where the spike was.
        let spikes: Vec<&Value> = points.iter().filter(|p| p["cpu_max"] == 100.0).collect();
        assert_eq!(spikes.len(), 1, "{spikes:?}");
        let k = (spikes[0]["t_ms"].as_i64().unwrap() - start) / width;
        assert_eq!(k, (spike_at - start) / width);
        // The silence is a run of missing points, not zeros: no point starts inside it.
        let first_silent = (gap.start - start) / width + 1;
        let last_silent = (gap.end - start) / width - 1;
        assert!(
            last_silent - first_silent >= 10,
            "{first_silent}..{last_silent}"
        );
        let heard: Vec<i64> = points
            .iter()
            .map(|p| (p["t_ms"].as_i64().unwrap() - start) / width)
            .filter(|k| (first_silent..=last_silent).contains(k))
            .collect();
        assert!(heard.is_empty(), "points {heard:?} inside the silence");
        // The ramp climbs: averages before the gap stay below those after it.
        let avg = |p: &Value| p["cpu_avg"].as_f64().unwrap();
        assert!(avg(&points[0]) < avg(points.last().unwrap()));
        points.clone()
    };
    // Before the job has folded anything, the day reads raw samples past its position...
    let before = check_day(&chart(day_start, 288).await);
    // ...and after it, rollups plus the unfolded rest: the same points.
    let pass = server::history::pass(srv.state(), now + 60 * MINUTE, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(pass.folded > 0, "{pass:?}");
    let after = check_day(&chart(day_start, 288).await);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["samples"], a["samples"]);
        assert_eq!(b["cpu_max"], a["cpu_max"]);
        let (x, y) = (
            b["cpu_avg"].as_f64().unwrap(),
            a["cpu_avg"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-9, "{b} vs {a}");
    }
    // An hour reads raw samples; 30 days and a year read the hour rollups.
    assert_eq!(chart(now - HOUR, 300).await["tier"], "raw");
    for days in [30, 365] {
        let body = chart(now - days * DAY, 300).await;
        assert_eq!(body["tier"], "hour", "{days} days");
        let total: i64 = body["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["samples"].as_i64().unwrap())
            .sum();
        assert_eq!(total, sent, "{days} days");
        assert_eq!(
            body["points"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["cpu_max"] == 100.0)
                .count(),
            1
        );
    }
    srv.stop().await;
}
both_backends!(charts_read_the_tier_their_range_needs);
