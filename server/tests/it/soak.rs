//! The compressed soak: a simulated fleet hanging and recovering at random while faults
//! fire at random; every reset justified, no incident over its attempts, memory flat,
//! nothing acknowledged missing. Run by scripts/faults.sh (`SOAK_SECONDS`, `SOAK_VMS`).

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::faults::{spawn_server, wait_serving};
use crate::proxmox::env_for;
use crate::redis_cache::PrivateRedis;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The compressed fleet reports every `SOAK_REPORT_MS` (default 2 s, a larger fleet needs
/// longer to stay within what the test build stores per second) and is stale after three
/// intervals, as 30 s reports and a 90 s stale timeout are in real operation.
fn report_every() -> Duration {
    Duration::from_millis(env_number("SOAK_REPORT_MS", 2_000))
}

fn stale_ms() -> i64 {
    3 * i64::try_from(report_every().as_millis()).unwrap()
}

const MAX_ATTEMPTS: usize = 3;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny deterministic generator (xorshift), seeded per VM, so a failing run can be
/// repeated with the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `per_million` / 1,000,000.
    fn chance(&mut self, per_million: u64) -> bool {
        self.next() % 1_000_000 < per_million
    }
}

/// One simulated VM's truth: when it hung and for how long, and what was acknowledged.
#[derive(Default)]
struct Sim {
    /// (start, end) of each silence in real ms; `long` silences end only with a power
    /// action, short ones (shorter than half the stale timeout) by themselves.
    hangs: Vec<Hang>,
    /// When each acknowledged report was sent.
    acked: Vec<i64>,
    booted_ms: i64,
    /// Set when Proxmox received a power action for this guest.
    rebooted: bool,
}

#[derive(Clone, Copy, Debug)]
struct Hang {
    start_ms: i64,
    end_ms: Option<i64>,
    long: bool,
}

/// When a fault held, in real ms, and whether it pauses detection (the amnesty after a
/// restart or a database outage) or only delays the power action.
#[derive(Clone, Copy, Debug)]
struct FaultWindow {
    start_ms: i64,
    end_ms: i64,
    pauses_detection: bool,
}

/// The latest moment a silence whose deadline is `deadline_ms` must have been acted on:
/// `slack_ms` after the first moment no fault covers (a restart's or a database outage's
/// amnesty, a stale timeout after it; a Proxmox fault, its length), unless another fault
/// begins within that slack and holds it further.
fn due_by(deadline_ms: i64, windows: &[FaultWindow], stale_ms: i64, slack_ms: i64) -> i64 {
    let mut clear = clear_of_faults(deadline_ms, windows, stale_ms);
    loop {
        let next = windows
            .iter()
            .map(|w| w.start_ms)
            .filter(|start| *start > clear && *start <= clear + slack_ms)
            .min();
        match next {
            Some(start) => clear = clear_of_faults(start, windows, stale_ms),
            None => return clear + slack_ms,
        }
    }
}

/// The first moment from `from_ms` on that no fault covers.
fn clear_of_faults(from_ms: i64, windows: &[FaultWindow], stale_ms: i64) -> i64 {
    let mut clear = from_ms;
    loop {
        let moved = windows
            .iter()
            .filter(|w| w.start_ms <= clear)
            .map(|w| {
                if w.pauses_detection {
                    w.end_ms + stale_ms
                } else {
                    w.end_ms
                }
            })
            .filter(|until| *until > clear)
            .max();
        match moved {
            Some(until) => clear = until,
            None => return clear,
        }
    }
}

/// The value below which `share` of `sorted` lies.
fn quantile(sorted: &[i64], share: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let last = sorted.len() - 1;
    let at = ((last as f64) * share).round() as usize;
    sorted[at.min(last)]
}

fn uuid_of(vmid: i64) -> String {
    format!("4c4c4544-0000-1000-8000-{vmid:012}")
}

/// The server process under test; replaced when a fault kills it.
struct Proc {
    child: Child,
}

impl Proc {
    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "scripts/faults.sh runs it: two minutes in CI, thirty with --full"]
async fn compressed_soak() {
    let seconds = env_number("SOAK_SECONDS", 120);
    let fleet = i64::try_from(env_number("SOAK_VMS", 300)).unwrap();
    let seed = env_number("SOAK_SEED", epoch_ms().unsigned_abs());
    println!("soak: {seconds} s, {fleet} VMs, seed {seed}");
    let nodes = ["pve1", "pve2", "pve3", "pve4"];
    let guests: Vec<FakeVm> = (0..fleet)
        .map(|i| {
            let vmid = 1000 + i;
            let node = nodes[usize::try_from(i).unwrap() % nodes.len()];
            let mut vm = FakeVm::running(vmid, node);
            vm.smbios_uuid = Some(uuid_of(vmid));
            vm
        })
        .collect();
    let fake = FakePve::start(guests).await;
    let db = fresh_db(Backend::Postgres).await;
    let db_name = db.url.rsplit('/').next().unwrap().to_owned();
    let redis_port = free_port();
    let mut redis = Some(PrivateRedis::start(redis_port));
    redis.as_ref().unwrap().wait_ready().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let report_every = report_every();
    let stale_ms = stale_ms();
    let stale = stale_ms.to_string();
    let interval_s = report_every.as_secs().max(1).to_string();
    // A reset guest reports again within an interval: five give it room on a busy machine.
    let recovery = (5 * report_every.as_millis()).to_string();
    let backoff = report_every.as_millis().to_string();
    let mut vars = env_for(
        &fake,
        &[
            ("STALE_TIMEOUT_MS", stale.as_str()),
            ("REPORT_INTERVAL_SECONDS", interval_s.as_str()),
            ("SCHEDULER_INTERVAL_MS", "200"),
            ("LINK_REFRESH_MS", "1000"),
            ("LINK_AUTO_APPROVE", "uuid"),
            ("RECOVERY_TIMEOUT_MS", recovery.as_str()),
            ("RESET_BACKOFF_MS", backoff.as_str()),
            ("RECHECK_INTERVAL_MS", "1000"),
            ("EVIDENCE_INTERVAL_MS", "300"),
            ("MAX_RESET_ATTEMPTS", "3"),
            ("MAX_CONCURRENT_RESETS", "4"),
            ("PROXMOX_TIMEOUT_MS", "3000"),
            ("TASK_TIMEOUT_MS", "5000"),
        ],
    );
    vars.push((
        "REDIS_URL".into(),
        format!("redis://127.0.0.1:{redis_port}/"),
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let start_server = |db: &TestDb| Proc {
        child: spawn_server(db, port, &vars),
    };
    let mut server = start_server(&db);
    wait_serving(&http, &base).await;

    // The fleet.
    let sims: Arc<Vec<Mutex<Sim>>> =
        Arc::new((0..fleet).map(|_| Mutex::new(Sim::default())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for i in 0..fleet {
        let (http, url, sims, stop) = (
            http.clone(),
            format!("{base}/api/health/report"),
            sims.clone(),
            stop.clone(),
        );
        let mut rng =
            Rng(seed ^ (u64::try_from(i).unwrap() + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        agents.push(tokio::spawn(async move {
            let idx = usize::try_from(i).unwrap();
            let vmid = 1000 + i;
            let host = format!("soak-{vmid}");
            sims[idx].lock().unwrap().booted_ms = epoch_ms() - 86_400_000;
            // Spread the fleet over the interval.
            let jitter = rng.next() % u64::try_from(report_every.as_millis()).unwrap();
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            // No hangs in the first stale timeouts: the fleet links first.
            let calm_until = epoch_ms() + 3 * stale_ms;
            while !stop.load(Ordering::Acquire) {
                let now = epoch_ms();
                let send = {
                    let mut sim = sims[idx].lock().unwrap();
                    let open = sim.hangs.last().copied().filter(|h| h.end_ms.is_none());
                    match open {
                        Some(h) if h.long && sim.rebooted => {
                            sim.rebooted = false;
                            sim.booted_ms = now;
                            sim.hangs.last_mut().unwrap().end_ms = Some(now);
                            true
                        }
                        Some(h) if !h.long && now - h.start_ms >= stale_ms / 3 => {
                            sim.hangs.last_mut().unwrap().end_ms = Some(now);
                            true
                        }
                        Some(_) => false,
                        None if now > calm_until && rng.chance(1_500) => {
                            sim.hangs.push(Hang {
                                start_ms: now,
                                end_ms: None,
                                long: true,
                            });
                            false
                        }
                        None if now > calm_until && rng.chance(4_000) => {
                            sim.hangs.push(Hang {
                                start_ms: now,
                                end_ms: None,
                                long: false,
                            });
                            false
                        }
                        None => true,
                    }
                };
                if send {
                    let booted = sims[idx].lock().unwrap().booted_ms;
                    let mut r = report_for(&host);
                    r["machine_id"] = json!(uuid_of(vmid));
                    r["uptime_seconds"] = json!((now - booted) / 1000);
                    let ok = http
                        .post(&url)
                        .bearer_auth(AGENT_TOKEN)
                        .json(&r)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if ok {
                        sims[idx].lock().unwrap().acked.push(now);
                    }
                }
                tokio::time::sleep(report_every).await;
            }
        }));
    }
    // Power actions reaching Proxmox end long silences: the guest boots again.
    let watcher = {
        let (fake, sims, stop) = (fake.clone(), sims.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = 0;
            while !stop.load(Ordering::Acquire) {
                let posts = fake.posts();
                for post in posts.iter().skip(seen) {
                    let (action, vmid) = post.split_once(' ').unwrap();
                    // The stop-start rung's guest comes back with its start.
                    if action != "stop" {
                        let vmid: i64 = vmid.parse().unwrap();
                        let idx = usize::try_from(vmid - 1000).unwrap();
                        sims[idx].lock().unwrap().rebooted = true;
                    }
                }
                seen = posts.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Faults at random, and the server's memory once a (compressed) minute.
    let started = Instant::now();
    let total = Duration::from_secs(seconds);
    let minute = total / 30;
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_fault = Duration::from_millis(u64::try_from(4 * stale_ms).unwrap());
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    let mut faults: Vec<String> = Vec::new();
    let mut windows: Vec<FaultWindow> = Vec::new();
    let mut admin = AsyncPgConnection::establish(&admin_pg_url()).await.unwrap();
    while started.elapsed() < total {
        let now = started.elapsed();
        if now >= next_sample {
            if let Some(kib) = server.rss_kib() {
                rss.push((now.as_secs_f64(), kib));
            }
            next_sample += minute;
        }
        if now >= next_fault {
            // Crashes only in the first 40 %: memory is judged over one process's life.
            let crash_allowed = now < total * 2 / 5;
            let pick = rng.next() % if crash_allowed { 5 } else { 4 };
            let hold = Duration::from_millis(1_000 + rng.next() % 4_000);
            let fault_start_ms = epoch_ms();
            match pick {
                0 => {
                    faults.push(format!("{:.0}s proxmox hangs {hold:?}", now.as_secs_f64()));
                    fake.hang(true);
                    tokio::time::sleep(hold).await;
                    fake.hang(false);
                }
                1 => {
                    faults.push(format!("{:.0}s proxmox 500s {hold:?}", now.as_secs_f64()));
                    fake.gate_actions(Arc::new(|_| Box::pin(async { false })));
                    tokio::time::sleep(hold).await;
                    fake.ungate_actions();
                }
                2 => {
                    faults.push(format!("{:.0}s redis down {hold:?}", now.as_secs_f64()));
                    drop(redis.take());
                    tokio::time::sleep(hold).await;
                    redis = Some(PrivateRedis::start(redis_port));
                    redis.as_ref().unwrap().wait_ready().await;
                }
                3 => {
                    faults.push(format!(
                        "{:.0}s database refuses {hold:?}",
                        now.as_secs_f64()
                    ));
                    admin
                        .batch_execute(&format!(
                            "ALTER DATABASE \"{db_name}\" ALLOW_CONNECTIONS false; \
                             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db_name}'"
                        ))
                        .await
                        .unwrap();
                    tokio::time::sleep(hold).await;
                    admin
                        .batch_execute(&format!(
                            "ALTER DATABASE \"{db_name}\" ALLOW_CONNECTIONS true"
                        ))
                        .await
                        .unwrap();
                }
                _ => {
                    faults.push(format!("{:.0}s kill -9", now.as_secs_f64()));
                    server.child.kill().unwrap();
                    server.child.wait().unwrap();
                    kills += 1;
                    server = start_server(&db);
                    wait_serving(&http, &base).await;
                }
            }
            // Redis being down holds neither detection nor a power action.
            if pick != 2 {
                windows.push(FaultWindow {
                    start_ms: fault_start_ms,
                    end_ms: epoch_ms(),
                    pauses_detection: pick >= 3,
                });
            }
            next_fault = started.elapsed() + Duration::from_millis(2_000 + rng.next() % 8_000);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_ms = epoch_ms();
    stop.store(true, Ordering::Release);
    for a in agents {
        a.await.unwrap();
    }
    watcher.await.unwrap();
    println!("soak: faults {faults:?}");

    // The verdicts, from the server's own records.
    let srv = TestServer::start_on(db, &[]).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut conn = srv.state().db.conn().await.unwrap();
    let views = server::db::store::list_vms(&mut conn).await.unwrap();
    drop(conn);
    let by_host: HashMap<String, i64> = views
        .iter()
        .map(|v| (v.hostname.clone(), v.id.get()))
        .collect();
    let long_hangs: usize = sims
        .iter()
        .map(|s| s.lock().unwrap().hangs.iter().filter(|h| h.long).count())
        .sum();
    let mut resets = 0;
    let mut justified_checked = 0;
    // Detection: from a long silence's deadline (its last acknowledged report plus the
    // stale timeout) to the incident's first power action, and the same counted from the
    // moment no fault's amnesty or Proxmox fault covered it any more.
    let detection_slack_ms = stale_ms + 15_000;
    let mut from_deadline: Vec<i64> = Vec::new();
    let mut from_clear: Vec<i64> = Vec::new();
    for i in 0..fleet {
        let vmid = 1000 + i;
        let sim = std::mem::take(&mut *sims[usize::try_from(i).unwrap()].lock().unwrap());
        let Some(&id) = by_host.get(&format!("soak-{vmid}")) else {
            assert!(
                sim.acked.is_empty(),
                "VM {vmid}: acknowledged reports and no VM"
            );
            continue;
        };
        let rows = metric_rows_of(&srv, id).await;
        let acked = i64::try_from(sim.acked.len()).unwrap();
        assert!(
            rows >= acked,
            "VM {vmid}: {acked} reports acknowledged, {rows} stored"
        );
        let (_, history) = srv.get(&format!("/api/vms/{id}/reset-history")).await;
        let attempts: Vec<Value> = history
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["trigger_source"] == "scheduler" && a["mode"] == "live")
            .cloned()
            .collect();
        for a in &attempts {
            resets += 1;
            let at = a["created_ms"].as_i64().unwrap();
            // The guest really hung (a silence only a power action ends) when the attempt
            // was made, and nothing it sent was acknowledged for a stale timeout before.
            let hung = sim
                .hangs
                .iter()
                .any(|h| h.long && h.start_ms <= at && h.end_ms.is_none_or(|e| at <= e));
            let heard = sim.acked.iter().copied().filter(|t| *t <= at).max();
            assert!(
                hung && heard.is_none_or(|t| t + stale_ms <= at),
                "VM {vmid}: an attempt at {at}, last acknowledged report {heard:?}, silences {:?} (seed {seed})",
                sim.hangs
            );
            // And the evidence recorded with it says so; the stop-start rung's start is
            // the second half of the stop, whose evidence stands for both.
            if a["action"] == "start" {
                assert!(
                    attempts
                        .iter()
                        .any(|b| b["action"] == "stop" && b["created_ms"].as_i64().unwrap() <= at),
                    "VM {vmid}: a start without its stop: {a}"
                );
                justified_checked += 1;
                continue;
            }
            let evidence: Value =
                serde_json::from_str(a["evidence_json"].as_str().unwrap_or("null")).unwrap();
            let silent = evidence["silent_for_ms"].as_i64().unwrap_or(0);
            assert!(silent >= stale_ms, "VM {vmid}: attempt {a}");
            justified_checked += 1;
        }
        for h in sim.hangs.iter().filter(|h| h.long) {
            let silent_from = sim
                .acked
                .iter()
                .copied()
                .filter(|t| *t <= h.start_ms)
                .max()
                .unwrap_or(h.start_ms);
            let deadline = silent_from + stale_ms;
            let clear = clear_of_faults(deadline, &windows, stale_ms);
            let due = due_by(deadline, &windows, stale_ms, detection_slack_ms);
            let first = attempts
                .iter()
                .filter(|a| a["action"] != "start")
                .map(|a| a["created_ms"].as_i64().unwrap())
                .filter(|at| *at >= h.start_ms && h.end_ms.is_none_or(|e| *at <= e))
                .min();
            match first {
                Some(at) => {
                    from_deadline.push(at - deadline);
                    from_clear.push((at - clear).max(0));
                    assert!(
                        at <= due,
                        "VM {vmid}: silent from {silent_from}, first action {} ms after its \
                         deadline, {} ms after faults cleared, {} ms after it was due \
                         (seed {seed})",
                        at - deadline,
                        at - clear,
                        at - due
                    );
                }
                None => assert!(
                    due > stopped_ms,
                    "VM {vmid}: silent from {silent_from}, never acted on, due {} ms before \
                     the end (seed {seed})",
                    stopped_ms - due
                ),
            }
            let in_incident = attempts
                .iter()
                .filter(|a| {
                    let at = a["created_ms"].as_i64().unwrap();
                    a["action"] != "start" && h.start_ms <= at && h.end_ms.is_none_or(|e| at <= e)
                })
                .count();
            assert!(
                in_incident <= MAX_ATTEMPTS,
                "VM {vmid}: {in_incident} attempts in one incident"
            );
        }
    }
    println!(
        "soak: {long_hangs} long hangs, {resets} resets (each justified: {justified_checked}), {kills} kills"
    );
    from_deadline.sort_unstable();
    from_clear.sort_unstable();
    println!(
        "soak: first action after the deadline ms: median {}, p99 {}, max {}; after faults \
         cleared: median {}, p99 {}, max {} (bound {detection_slack_ms})",
        quantile(&from_deadline, 0.5),
        quantile(&from_deadline, 0.99),
        from_deadline.last().copied().unwrap_or(0),
        quantile(&from_clear, 0.5),
        quantile(&from_clear, 0.99),
        from_clear.last().copied().unwrap_or(0),
    );
    println!("soak: RSS (s, KiB) {rss:?}");
    assert!(
        resets > 0,
        "the soak reset nothing: the scenario proves nothing"
    );
    // Memory, over the single process life after the last possible crash.
    let late: Vec<u64> = rss
        .iter()
        .filter(|(t, _)| *t >= total.as_secs_f64() * 0.5)
        .map(|(_, k)| *k)
        .collect();
    if late.len() >= 4 {
        let half = late.len() / 2;
        let first = late[..half].iter().copied().max().unwrap();
        let last = late[half..].iter().copied().max().unwrap();
        assert!(
            last <= first + first / 5 + 16 * 1024,
            "RSS grew from {first} KiB to {last} KiB: {rss:?}"
        );
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn metric_rows_of(srv: &TestServer, id: i64) -> i64 {
    use diesel_async::RunQueryDsl;
    let mut conn = srv.state().db.conn().await.unwrap();
    let row: Count = server::with_conn!(&mut conn, |c| {
        diesel::sql_query(format!(
            "SELECT count(*) AS n FROM metric_samples WHERE vm_id = {id}"
        ))
        .get_result(c)
        .await
    })
    .unwrap();
    row.n
}
