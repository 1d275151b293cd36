//! The fault suite: the whole server while the world misbehaves (killed mid-batch, its
//! database or Redis gone, a full disk, a stepped clock). Nothing acknowledged is lost and
//! nothing harmful is done. `FAULTS_FULL=1` (scripts/faults.sh --full) runs the long forms.

use crate::agent::{agent_cmd, prime_cpu, spool_files};
use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::live::Events;
use crate::proxmox::{env_for, history, report_vm, start, start_on, vm, wait_active, wait_rounds};
use crate::redis_cache::PrivateRedis;
use crate::safeguards::keep_reporting;
use diesel::sql_types::BigInt;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Whether the long forms were asked for.
fn full() -> bool {
    std::env::var("FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// The stale timeout every scenario here runs with (`proxmox::FAST`).
const STALE_MS: i64 = 1_500;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(srv: &TestServer, sql: &str) -> i64 {
    use diesel_async::RunQueryDsl;
    let mut conn = srv.state().db.conn().await.unwrap();
    let row: Count = server::with_conn!(&mut conn, |c| {
        diesel::sql_query(sql).get_result(c).await
    })
    .unwrap();
    row.n
}

/// Status changes into `down` the VM went through.
async fn times_down(srv: &TestServer, id: i64) -> usize {
    vm(srv, id).await["status_changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["to_status"] == "down")
        .count()
}

/// Every answer a flood got: status and Retry-After.
type Answers = Arc<Mutex<Vec<(u16, Option<String>)>>>;

/// Sends a report for a new host name at a time from each of `clients` tasks until
/// `stop`; the names answered 200 go into `acked`, every answer into `answers`.
fn flood(
    base: String,
    prefix: &'static str,
    clients: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    answers: Answers,
) -> Vec<JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    (0..clients)
        .map(|client| {
            let (http, url, stop, acked, answers) = (
                http.clone(),
                format!("{base}/api/health/report"),
                stop.clone(),
                acked.clone(),
                answers.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let host = format!("{prefix}-{client}-{n}");
                    let sent = http
                        .post(&url)
                        .bearer_auth(AGENT_TOKEN)
                        .json(&report_for(&host))
                        .send()
                        .await;
                    match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let retry = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            if status == 200 {
                                acked.lock().unwrap().push(host);
                            }
                            answers.lock().unwrap().push((status, retry));
                        }
                        // The server is gone (killed): try again shortly, as agents do.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        })
        .collect()
}

/// Every host in `acked` is stored, and each of the flood's hosts (sent once) has exactly
/// one metric row.
async fn assert_each_acknowledged_report_stored_once(
    srv: &TestServer,
    prefix: &str,
    acked: &[String],
) {
    let mut conn = srv.state().db.conn().await.unwrap();
    let stored: HashSet<String> = server::db::store::list_vms(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.hostname)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|h| !stored.contains(*h)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged reports lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    let flood_vms = count(
        srv,
        &format!("SELECT count(*) AS n FROM vms WHERE hostname LIKE '{prefix}-%'"),
    )
    .await;
    let flood_rows = count(
        srv,
        &format!(
            "SELECT count(*) AS n FROM metric_samples m JOIN vms v ON v.id = m.vm_id \
             WHERE v.hostname LIKE '{prefix}-%'"
        ),
    )
    .await;
    assert_eq!(flood_rows, flood_vms, "a report stored twice");
}

// ---------------------------------------------------------------------------------------
// 1. kill -9 under load

/// The server binary on `port`, configured like the suite's servers plus `vars`.
pub(crate) fn spawn_server(db: &TestDb, port: u16, vars: &[(String, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("DATA_DIR", db.dir.path())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("AGENT_TOKEN", AGENT_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "error")
        .env("TLS", "off")
        .env("ENROLMENT_RATE_PER_MINUTE", "1000000")
        .env("SITE_ROOT", workspace_root().join("target/site"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub(crate) async fn wait_serving(http: &reqwest::Client, base: &str) {
    wait_for("the server to answer", Duration::from_secs(60), || async {
        http.get(format!("{base}/api/health"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
}

/// The server killed with SIGKILL under full ingest load, five times (twenty with
/// `FAULTS_FULL`), restarted on the same database each time, while two linked guests keep
/// reporting through it all. Every report answered 200 is stored, none twice, and no
/// restart resets a guest whose heartbeats stopped only because the server was gone: each
/// restart waits out its amnesty before the next kill, with the guests silent for longer
/// than the stale timeout at every restart.
async fn kill_9_under_load_loses_nothing_and_resets_nothing(backend: Backend) {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve1"),
    ])
    .await;
    let db = fresh_db(backend).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let vars = env_for(&fake, &[]);
    let http = reqwest::Client::new();
    let (stop, acked, answers) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut flooders = Vec::new();
    let mut guests = None;
    let kills = if full() { 20 } else { 5 };
    for round in 0..kills {
        let mut child = spawn_server(&db, port, &vars);
        wait_serving(&http, &base).await;
        if round == 0 {
            // Link the two guests once; the links are stored and outlive every kill.
            for vmid in [100, 101] {
                let mut r = report_for(&format!("guest-{vmid}"));
                r["vmid"] = json!(vmid);
                r["node"] = json!("pve1");
                let body: Value = http
                    .post(format!("{base}/api/health/report"))
                    .bearer_auth(AGENT_TOKEN)
                    .json(&r)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let id = body["vm_id"].as_i64().unwrap();
                let linked = http
                    .put(format!("{base}/api/vms/{id}/proxmox"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"node": "pve1", "vmid": vmid, "type": "qemu"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(linked.status(), 200);
            }
            guests = Some(keep_reporting_to(&base, &["guest-100", "guest-101"]));
            flooders = flood(
                base.clone(),
                "crash",
                16,
                stop.clone(),
                acked.clone(),
                answers.clone(),
            );
        }
        let before = acked.lock().unwrap().len();
        wait_for("acknowledged reports", Duration::from_secs(60), || async {
            (acked.lock().unwrap().len() >= before + 200).then_some(())
        })
        .await;
        // Past the amnesty: a restart that resets anything has done it by now.
        wait_for("the amnesty to end", Duration::from_secs(60), || async {
            let h: Value = http
                .get(format!("{base}/api/health"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (h["remediation"]["active"] == true).then_some(())
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        // Down for longer than the stale timeout: the guests look hung at the restart.
        tokio::time::sleep(Duration::from_millis(
            u64::try_from(STALE_MS + 500).unwrap(),
        ))
        .await;
    }
    stop.store(true, Ordering::Release);
    let mut srv = start_on(db, &fake, &[]).await;
    for f in flooders {
        f.await.unwrap();
    }
    if let Some(g) = guests {
        g.abort();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200 * kills, "{}", acked.len());
    assert_each_acknowledged_report_stored_once(&srv, "crash", &acked).await;
    assert_eq!(
        fake.posts(),
        Vec::<String>::new(),
        "a restart reset a guest"
    );
    srv.stop().await;
}
crate::both_backends!(kill_9_under_load_loses_nothing_and_resets_nothing);

/// Reports for `hosts` (each linked to the VMID in its name) every 200 ms to a server that
/// may be down, until aborted.
fn keep_reporting_to(base: &str, hosts: &[&str]) -> JoinHandle<()> {
    let url = format!("{base}/api/health/report");
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    tokio::spawn(async move {
        loop {
            for host in &hosts {
                let mut body = report_for(host);
                if let Some(vmid) = host.strip_prefix("guest-") {
                    body["vmid"] = json!(vmid.parse::<i64>().unwrap());
                    body["node"] = json!("pve1");
                }
                let _ = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

// ---------------------------------------------------------------------------------------
// 2. PostgreSQL stopped under load

/// A private PostgreSQL cluster on its own port, run as the `postgres` user; the shared
/// one is never touched.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    fn bin_dir() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("pg_ctl").exists())
            .collect();
        found.sort();
        found.pop().expect("pg_ctl")
    }

    fn as_postgres(&self, program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres", &dir.path().display().to_string()])
            .status()
            .unwrap();
        assert!(chown.success());
        let pg = Self {
            dir,
            port: free_port(),
            bin: Self::bin_dir(),
        };
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.start();
        pg
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    /// Stops it the hard way, as a crash or a pulled cable would.
    fn stop(&self) {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Runs the real Linux agent once per `every` until `stop`, as its timer would, pointed at
/// `base` and told it runs as VMID 101 on pve1. Returns the number of completed runs (each
/// takes exactly one sample, sent or spooled).
fn agent_loop(base: String, state: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    tokio::task::spawn_blocking(move || {
        let mut runs = 0;
        while !stop.load(Ordering::Acquire) {
            prime_cpu(&state);
            let out = agent_cmd(&base, AGENT_TOKEN, &state, &["--tick"])
                .env("VMID", "101")
                .env("NODE", "pve1")
                .env("SPOOL_MAX", "10000")
                .env("RETRY_ATTEMPTS", "1")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            runs += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        runs
    })
}

/// PostgreSQL stopped for ten seconds (a minute with `FAULTS_FULL`) under load and started
/// again: meanwhile every report is answered 503 with a Retry-After, never a 200 that is
/// then lost; the real agent spools and replays every sample; no VM is judged down for
/// the outage and nothing is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_under_load_loses_nothing_and_judges_no_one() {
    let pg = PrivatePostgres::init();
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve1"),
    ])
    .await;
    let db = TestDb {
        url: pg.url(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut srv = start_on(db, &fake, &[]).await;
    let guest = report_vm(&srv, 100, "pve1", 5000).await;
    let reporting = keep_reporting(&srv, vec![("guest-100".into(), Some(100))], None);

    let state = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let agent = agent_loop(srv.base.clone(), state.path().to_owned(), stop.clone());
    let this_host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let agent_vm = wait_for(
        "the agent's first report",
        Duration::from_secs(30),
        || async {
            let mut conn = srv.state().db.conn().await.ok()?;
            server::db::store::list_vms(&mut conn)
                .await
                .ok()?
                .into_iter()
                .find(|v| v.hostname == this_host)
                .map(|v| v.id.get())
        },
    )
    .await;
    let (status, body) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{agent_vm}/proxmox"),
            Some(ADMIN_TOKEN),
            Some(json!({"node": "pve1", "vmid": 101, "type": "qemu"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_active(&srv).await;

    let (flood_stop, acked, answers) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let flooders = flood(
        srv.base.clone(),
        "load",
        8,
        flood_stop.clone(),
        acked.clone(),
        answers.clone(),
    );
    wait_for(
        "load before the outage",
        Duration::from_secs(30),
        || async { (acked.lock().unwrap().len() >= 100).then_some(()) },
    )
    .await;

    pg.stop();
    let refused_before = answers.lock().unwrap().len();
    wait_for("reports refused", Duration::from_secs(30), || async {
        let answers = answers.lock().unwrap();
        (answers
            .iter()
            .skip(refused_before)
            .filter(|a| a.0 == 503)
            .count()
            >= 20)
            .then_some(())
    })
    .await;
    // The outage lasts several stale timeouts: without its pause the stale check would
    // judge every VM down the moment the database returned.
    let outage = if full() { 60 } else { 10 };
    tokio::time::sleep(Duration::from_secs(outage)).await;
    let spooled = spool_files(state.path());
    assert!(spooled >= 2, "the agent spooled {spooled} reports");
    pg.start();

    wait_for(
        "the agent's spool to drain",
        Duration::from_secs(60),
        || async { (spool_files(state.path()) == 0).then_some(()) },
    )
    .await;
    let after = acked.lock().unwrap().len();
    wait_for("load after the outage", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= after + 100).then_some(())
    })
    .await;
    // One more stale timeout of normal service: a VM the outage got judged would be now.
    wait_rounds(&srv, 3).await;
    let settled = Instant::now();
    wait_for(
        "a stale timeout after the outage",
        Duration::from_secs(30),
        || async {
            (settled.elapsed() > Duration::from_millis(u64::try_from(2 * STALE_MS).unwrap()))
                .then_some(())
        },
    )
    .await;
    flood_stop.store(true, Ordering::Release);
    stop.store(true, Ordering::Release);
    for f in flooders {
        f.await.unwrap();
    }
    let runs = agent.await.unwrap();
    reporting.abort();

    let answers = answers.lock().unwrap().clone();
    let odd: Vec<_> = answers
        .iter()
        .filter(|(status, retry)| !(*status == 200 || (*status == 503 && retry.is_some())))
        .collect();
    assert!(
        odd.is_empty(),
        "answers other than 200 or 503 with Retry-After: {odd:?}"
    );
    let acked = acked.lock().unwrap().clone();
    assert_each_acknowledged_report_stored_once(&srv, "load", &acked).await;
    let agent_rows = count(
        &srv,
        &format!("SELECT count(*) AS n FROM metric_samples WHERE vm_id = {agent_vm}"),
    )
    .await;
    assert_eq!(
        agent_rows,
        i64::try_from(runs).unwrap(),
        "every sample the agent took is stored once"
    );
    for id in [guest, agent_vm] {
        assert_eq!(
            times_down(&srv, id).await,
            0,
            "VM {id} judged down for our outage"
        );
    }
    assert_eq!(fake.posts(), Vec::<String>::new());
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Redis flapping

/// Redis stopped and started again and again under load, with two replicas sharing it:
/// every report is stored (Redis is a cache, never in the write path), the cache is rebuilt
/// after each return, and the live push between the replicas comes back every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flapping_under_load_fails_nothing() {
    let port = free_port();
    let mut redis = Some(PrivateRedis::start(port));
    redis.as_ref().unwrap().wait_ready().await;
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let extra = [("REDIS_URL", redis_url.as_str())];
    let mut a = TestServer::start(Backend::Postgres, &extra).await;
    let db_b = TestDb {
        url: a.db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut b = TestServer::start_on(db_b, &extra).await;
    let mut events = Events::open(&b).await;
    events
        .until("push", Duration::from_secs(15), |name, data| {
            name == "mode" && data == "push"
        })
        .await;

    let (stop, acked, answers) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let flooders = flood(
        a.base.clone(),
        "flap",
        4,
        stop.clone(),
        acked.clone(),
        answers.clone(),
    );
    let flaps = if full() { 20 } else { 4 };
    for flap in 0..flaps {
        let before = acked.lock().unwrap().len();
        drop(redis.take());
        events
            .until(
                "the fall-back to polling",
                Duration::from_secs(30),
                |name, data| name == "mode" && data == "poll",
            )
            .await;
        wait_for(
            "reports while Redis is down",
            Duration::from_secs(30),
            || async { (acked.lock().unwrap().len() >= before + 50).then_some(()) },
        )
        .await;
        redis = Some(PrivateRedis::start(port));
        redis.as_ref().unwrap().wait_ready().await;
        events
            .until("push again", Duration::from_secs(30), |name, data| {
                name == "mode" && data == "push"
            })
            .await;
        // The flood reports to A only: a change on B's stream came through Redis.
        events
            .until(
                &format!("a change from the other replica after flap {flap}"),
                Duration::from_secs(30),
                |name, _| name == "change",
            )
            .await;
    }
    stop.store(true, Ordering::Release);
    for f in flooders {
        f.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let failed: Vec<_> = answers.iter().filter(|a| a.0 != 200).collect();
    assert!(
        failed.is_empty(),
        "reports failed while Redis flapped: {failed:?}"
    );
    let acked = acked.lock().unwrap().clone();
    assert_each_acknowledged_report_stored_once(&a, "flap", &acked).await;
    let redis = redis.unwrap();
    let mut conn = a.state().db.conn().await.unwrap();
    let mut stored: Vec<(i64, String, Option<i64>)> = server::db::store::list_vms(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.id.get(), format!("{:?}", v.status), v.last_seen_ms))
        .collect();
    stored.sort_unstable();
    drop(conn);
    // Every VM in the shared cache, as the database has it.
    wait_for(
        "the cache to be rebuilt",
        Duration::from_secs(30),
        || async {
            let mut cached: Vec<(i64, String, Option<i64>)> = redis
                .views()
                .await
                .into_iter()
                .map(|v| (v.id.get(), format!("{:?}", v.status), v.last_seen_ms))
                .collect();
            cached.sort_unstable();
            (cached == stored).then_some(())
        },
    )
    .await;
    b.stop().await;
    a.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. SQLite on a full filesystem

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(megabytes: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with one file, so the next write finds no space.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = vec![0u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The SQLite database on a filesystem that fills up: reports are answered 503 with a
/// Retry-After (never 200, never 500), the file stays intact, and once space returns the
/// server stores again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_on_a_full_disk_answers_503_and_recovers() {
    let fs = SmallFs::mount(16);
    let db = TestDb {
        url: format!("sqlite://{}", fs.path().join("vmhc.db").display()),
        dir: tempfile::tempdir().unwrap(),
    };
    let mut srv = TestServer::start_on(db, &[]).await;
    let mut stored = Vec::new();
    for n in 0..50 {
        let host = format!("before-{n}");
        assert_eq!(srv.report(&report_for(&host)).await.0, 200);
        stored.push(host);
    }
    let filler = fs.fill();

    let mut refused = 0;
    for n in 0..50 {
        let host = format!("full-{n}");
        let mut body = report_for(&host);
        // Large reports, so each needs new pages.
        body["disks"] = json!(
            (0..64)
                .map(|d| json!({"mount": format!("/mnt/{d}"), "used_bytes": 1, "total_bytes": 2}))
                .collect::<Vec<_>>()
        );
        let resp = srv
            .http
            .post(srv.url("/api/health/report"))
            .bearer_auth(AGENT_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        match status {
            200 => stored.push(host),
            503 => {
                assert!(resp.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("a full disk answered {other}"),
        }
    }
    assert!(refused > 0, "the disk never filled");
    // An operator's change fails the same way: unavailable for now, not an internal error.
    let (_, mut settings) = srv.get("/api/settings").await;
    settings["status"]["cpu_threshold"] = json!(91.0);
    let (status, body) = srv
        .send(
            Method::PUT,
            "/api/settings",
            Some(ADMIN_TOKEN),
            Some(settings),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(is_error_body(&body), "{body}");

    std::fs::remove_file(filler).unwrap();
    for n in 0..20 {
        let host = format!("after-{n}");
        let (status, body) = srv.report(&report_for(&host)).await;
        assert_eq!(status, 200, "{body}");
        stored.push(host);
    }
    let mut conn = srv.state().db.conn().await.unwrap();
    let names: HashSet<String> = server::db::store::list_vms(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.hostname)
        .collect();
    drop(conn);
    let lost: Vec<&String> = stored.iter().filter(|h| !names.contains(*h)).collect();
    assert!(lost.is_empty(), "acknowledged reports lost: {lost:?}");
    srv.stop().await;
    assert_eq!(integrity_check(&fs.path().join("vmhc.db")), ["ok"]);
}

#[derive(diesel::QueryableByName)]
struct IntegrityLine {
    #[diesel(sql_type = diesel::sql_types::Text)]
    integrity_check: String,
}

/// SQLite's own check of every page and index of the file.
fn integrity_check(path: &Path) -> Vec<String> {
    use diesel::{Connection, RunQueryDsl};
    let mut conn = diesel::SqliteConnection::establish(&path.display().to_string()).unwrap();
    diesel::sql_query("PRAGMA integrity_check")
        .load::<IntegrityLine>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|l| l.integrity_check)
        .collect()
}

// ---------------------------------------------------------------------------------------
// 7. A stepped clock

/// The wall clock stepped forward by an hour while every VM reports: nobody is judged down
/// and nothing is reset, in the rounds right after the step and after the amnesty it
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_stepped_ahead_turns_nothing_down_and_resets_nothing() {
    let fake = FakePve::start(vec![
        FakeVm::running(100, "pve1"),
        FakeVm::running(101, "pve1"),
    ])
    .await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let ids = [
        report_vm(&srv, 100, "pve1", 5000).await,
        report_vm(&srv, 101, "pve1", 5000).await,
    ];
    let reporting = keep_reporting(
        &srv,
        vec![
            ("guest-100".into(), Some(100)),
            ("guest-101".into(), Some(101)),
        ],
        None,
    );
    wait_active(&srv).await;

    server::clock::step_wall_clock(3_600_000);
    let stepped = Instant::now();
    // A VM that reports once after the step and then falls silent: judging resumes, so it
    // is found down.
    let (status, body) = srv.report(&report_for("silent-after-the-step")).await;
    assert_eq!(status, 200, "{body}");
    let silent = body["vm_id"].as_i64().unwrap();
    // Three stale timeouts of real time: the amnesty the step started has ended and the
    // stale check has judged the fleet by the new clock many times.
    wait_for("three stale timeouts", Duration::from_secs(30), || async {
        (stepped.elapsed() > Duration::from_millis(u64::try_from(3 * STALE_MS).unwrap()))
            .then_some(())
    })
    .await;
    wait_rounds(&srv, 3).await;
    reporting.abort();
    for id in ids {
        assert_eq!(
            times_down(&srv, id).await,
            0,
            "VM {id} turned down by the step"
        );
    }
    wait_for(
        "the silent VM judged down",
        Duration::from_secs(30),
        || async { (vm(&srv, silent).await["status"] == "down").then_some(()) },
    )
    .await;
    assert_eq!(fake.posts(), Vec::<String>::new());
    srv.stop().await;
}

/// The wall clock stepped back by an hour just after a VM's last heartbeat: its silence
/// counts from the step, so it is judged down and reset about one stale timeout later,
/// not an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_stepped_back_hides_a_hung_vm_no_longer_than_the_stale_timeout() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Postgres, &fake, &[]).await;
    let id = report_vm(&srv, 100, "pve1", 5000).await;
    wait_active(&srv).await;
    let hung = report_vm(&srv, 100, "pve1", 5000).await;
    assert_eq!(hung, id);

    server::clock::step_wall_clock(-3_600_000);
    let stepped_ms = server::now_ms();
    let down = wait_for(
        "the hung VM judged down",
        Duration::from_secs(30),
        || async {
            let v = vm(&srv, id).await;
            (v["status"] == "down").then(|| v["status_since_ms"].as_i64().unwrap())
        },
    )
    .await;
    // One stale timeout of amnesty after the step, then the silence (from the step) is
    // past the stale timeout; rounds on a loaded machine may add a few seconds.
    assert!(
        down - stepped_ms <= 2 * STALE_MS + 5_000,
        "down {} ms after the step",
        down - stepped_ms
    );
    let reset = wait_for("the reset", Duration::from_secs(30), || async {
        history(&srv, id).await.first().cloned()
    })
    .await;
    assert!(reset["created_ms"].as_i64().unwrap() >= stepped_ms);
    assert_eq!(fake.posts().len(), 1, "{:?}", fake.posts());
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Proxmox misbehaving

#[derive(Clone, Copy, Debug)]
enum PveFault {
    /// Every power action answered 500.
    ServerErrors,
    /// The hung guest's node is unreachable behind the cluster proxy: 595.
    NodeUnreachable,
    /// The monitor's token rotated in Proxmox: 401 for everything.
    TokenRotated,
    /// Proxmox stops answering anything for 30 s (a minute with `FAULTS_FULL`).
    Hang,
    /// The reset's task never ends.
    EndlessTask,
}

/// Settings for the Proxmox scenarios: two attempts per incident, short Proxmox timeouts.
const PVE_FAULT_ENV: &[(&str, &str)] = &[
    ("MAX_RESET_ATTEMPTS", "2"),
    ("PROXMOX_TIMEOUT_MS", "1500"),
    ("TASK_TIMEOUT_MS", "2000"),
    ("GRACEFUL_REBOOT_TIMEOUT_MS", "1000"),
];

/// One Proxmox fault while a linked guest hangs: whatever happens is recorded, no attempt
/// is sent twice, no incident gets more than MAX_RESET_ATTEMPTS, and a second VM that goes
/// silent meanwhile is judged down on time, not after the fault.
async fn proxmox_fault(fault: PveFault) {
    let node = match fault {
        PveFault::NodeUnreachable => "pve2",
        _ => "pve1",
    };
    let fake = FakePve::start(vec![FakeVm::running(100, node)]).await;
    // A hang is met with the shipped Proxmox timeout (15 s): the round waits that long.
    let env: Vec<(&str, &str)> = PVE_FAULT_ENV
        .iter()
        .copied()
        .filter(|(k, _)| !matches!(fault, PveFault::Hang) || *k != "PROXMOX_TIMEOUT_MS")
        .collect();
    let mut srv = start(Backend::Sqlite, &fake, &env).await;
    let hung = report_vm(&srv, 100, node, 5000).await;
    let watcher_last_ms = Arc::new(Mutex::new(0));
    let watcher = {
        let (http, url, last) = (
            srv.http.clone(),
            srv.url("/api/health/report"),
            watcher_last_ms.clone(),
        );
        tokio::spawn(async move {
            loop {
                let sent = epoch_ms();
                let ok = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for("watcher"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ok {
                    *last.lock().unwrap() = sent;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let fault_started = Instant::now();
    match fault {
        PveFault::ServerErrors => {
            fake.gate_actions(Arc::new(|_| Box::pin(async { false })));
        }
        PveFault::NodeUnreachable => {
            fake.state
                .lock()
                .unwrap()
                .offline_nodes
                .insert("pve2".into());
        }
        PveFault::TokenRotated => fake.revoke_token(crate::fake_pve::TOKEN_ID),
        PveFault::Hang => fake.hang(true),
        PveFault::EndlessTask => {
            fake.state.lock().unwrap().task_duration = Duration::from_secs(3600);
        }
    }

    // The fault is met: what the server made of it is on record.
    let seen = match fault {
        PveFault::ServerErrors | PveFault::EndlessTask => {
            wait_for(
                "both attempts recorded",
                Duration::from_secs(60),
                || async {
                    let h = history(&srv, hung).await;
                    (h.len() == 2 && h.iter().all(|a| !a["outcome"].is_null())).then_some(())
                },
            )
            .await;
            "attempts"
        }
        // Nothing can be asked or done while it hangs: the remediation round is stuck in
        // a request when the other VM falls silent.
        PveFault::Hang => {
            wait_for(
                "a request stuck in Proxmox",
                Duration::from_secs(30),
                || async { fake.calls().iter().any(|c| c.status == 0).then_some(()) },
            )
            .await;
            "hang"
        }
        PveFault::NodeUnreachable | PveFault::TokenRotated => {
            wait_for("the failure recorded", Duration::from_secs(60), || async {
                let v = vm(&srv, hung).await;
                let reason = v["phase_reason"].as_str().unwrap_or_default().to_owned();
                (v["status"] == "down" && !reason.is_empty()).then_some(())
            })
            .await;
            "reason"
        }
    };

    // Meanwhile another VM goes silent: it is judged down on time.
    wait_for("the watcher's reports", Duration::from_secs(30), || async {
        (*watcher_last_ms.lock().unwrap() > 0).then_some(())
    })
    .await;
    watcher.abort();
    let last = *watcher_last_ms.lock().unwrap();
    let (_, list) = srv.get("/api/vms").await;
    let watcher_vm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostname"] == "watcher")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let down_at = wait_for(
        "the watcher judged down",
        Duration::from_secs(30),
        || async {
            let v = vm(&srv, watcher_vm).await;
            (v["status"] == "down").then(|| v["status_since_ms"].as_i64().unwrap())
        },
    )
    .await;
    assert!(
        down_at - last <= STALE_MS + 3_000,
        "{fault:?}: the watcher was judged down {} ms after its last report",
        down_at - last
    );

    if let PveFault::Hang = fault {
        let hold = Duration::from_secs(if full() { 60 } else { 30 });
        tokio::time::sleep(hold.saturating_sub(fault_started.elapsed())).await;
        assert_eq!(
            fake.posts(),
            Vec::<String>::new(),
            "a reset through a hung Proxmox"
        );
        fake.hang(false);
        // Once it answers, the hung guest is reset, once.
        wait_for(
            "the reset after the hang",
            Duration::from_secs(60),
            || async {
                let h = history(&srv, hung).await;
                (h.first()?["outcome"] == "ok").then_some(())
            },
        )
        .await;
    }
    wait_rounds(&srv, 10).await;
    let posts = fake.posts();
    let attempts = history(&srv, hung).await;
    assert!(attempts.len() <= 2, "{fault:?}: {attempts:?}");
    assert!(
        posts.len() <= attempts.len(),
        "{fault:?}: more power actions reached Proxmox than were recorded: {posts:?}"
    );
    assert!(
        attempts
            .iter()
            .all(|a| !a["outcome"].is_null() || seen == "attempts"),
        "{fault:?}: an attempt left open: {attempts:?}"
    );
    match fault {
        PveFault::NodeUnreachable | PveFault::TokenRotated => {
            assert_eq!(posts, Vec::<String>::new(), "{fault:?}");
        }
        PveFault::Hang => assert_eq!(posts.len(), 1, "{posts:?}"),
        PveFault::ServerErrors | PveFault::EndlessTask => {}
    }
    if let PveFault::TokenRotated = fault {
        let (_, r) = srv.get("/api/remediation").await;
        let kinds: Vec<&str> = r["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"proxmox_unreachable"), "{kinds:?}");
    }
    srv.stop().await;
}

/// Milliseconds since the epoch by the host's clock (not the server's, which a scenario
/// may step).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxmox_answering_500_is_recorded_and_retried_within_the_cap() {
    proxmox_fault(PveFault::ServerErrors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_answering_595_is_recorded_and_never_reset() {
    proxmox_fault(PveFault::NodeUnreachable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_token_answering_401_is_told_and_resets_nothing() {
    proxmox_fault(PveFault::TokenRotated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_proxmox_delays_no_detection_and_resets_once_it_answers() {
    proxmox_fault(PveFault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_never_ends_is_given_up_within_the_cap() {
    proxmox_fault(PveFault::EndlessTask).await;
}
