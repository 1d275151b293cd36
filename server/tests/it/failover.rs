//! A replica killed mid-reset: the other takes over, reconciles and finishes the record.
//!
//! Two server processes share one PostgreSQL database; the leader is killed with SIGKILL at
//! three points of a power action (once, the replica that took over is killed as well),
//! and Proxmox must see at most the one POST. The agents
//! report through a small TCP proxy that hands each connection to whichever replica
//! accepts it. Each replica reaches the fake Proxmox through its own link, which notes the
//! requests it carries (so the test knows who leads) and, like a real node whose worker
//! does not depend on its client, keeps a request it delivered going after the replica
//! died.

use crate::common::*;
use crate::fake_pve::{ActionCall, FakePve, FakeVm, Gate};
use crate::proxmox::{FAST, history, report_vm, vm};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the leader is killed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum KillPoint {
    /// The intent is recorded; the POST is stopped on the wire and never reaches Proxmox.
    BeforePost,
    /// The POST reached Proxmox and waits there; Proxmox acts after the leader died.
    PostInFlight,
    /// Proxmox answered the POST (task started, UPID stored); the task's status reads wait.
    TaskStarted,
    /// As `TaskStarted`; then the replica that took over is killed too, while it writes
    /// the task's end (its write held by a row lock), and a third one finishes the record.
    WhileRecording,
}

/// Everything that matters for takeover is short: rounds, link refreshes, staleness. The
/// recovery window is long, so any second power action inside the test would be a duplicate.
const SETTINGS: &[(&str, &str)] = &[
    ("ESCALATION_LADDER", "reset"),
    // Few connections each: these processes share the database server with the whole suite.
    ("DB_POOL_SIZE", "3"),
    ("RECOVERY_TIMEOUT_MS", "120000"),
    ("RUST_LOG", "info,tower_http=warn,leptos=warn"),
    ("NO_COLOR", "1"),
];

/// One replica's way to Proxmox.
#[derive(Clone, Default)]
struct PveLink(Arc<Mutex<LinkState>>);

#[derive(Default)]
struct LinkState {
    /// The request line of every request carried, in order.
    lines: Vec<String>,
    /// Armed: a power-action POST is kept here and never forwarded.
    hold_posts: bool,
    /// Power-action POSTs kept.
    held: usize,
}

impl PveLink {
    /// Listens on a free port and forwards every connection to `upstream`.
    async fn start(upstream: SocketAddr) -> (Self, String) {
        let link = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serving = link.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serving.clone().carry(client, upstream));
            }
        });
        (link, base)
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().lines.clone()
    }

    fn carried(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    fn held(&self) -> usize {
        self.0.lock().unwrap().held
    }

    /// Notes the request starting in `chunk`; true when it is to be kept back.
    fn note(&self, chunk: &[u8]) -> bool {
        let text = String::from_utf8_lossy(chunk);
        let Some(line) = text.split("\r\n").next() else {
            return false;
        };
        if !["GET ", "POST ", "PUT ", "DELETE "]
            .iter()
            .any(|m| line.starts_with(m))
        {
            return false;
        }
        let mut st = self.0.lock().unwrap();
        st.lines.push(line.to_owned());
        let action = line.starts_with("POST ") && line.contains("/status/reset ");
        if action && st.hold_posts {
            st.held += 1;
            return true;
        }
        false
    }

    async fn carry(self, client: TcpStream, upstream: SocketAddr) {
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                if self.note(chunk) || to_server.write_all(chunk).await.is_err() {
                    break;
                }
            }
            // The client is gone (or its request kept back): the connection to Proxmox
            // stays open, so a request already delivered is not cancelled by its closing.
            std::future::pending::<()>().await;
            drop(to_server);
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut client_gone = false;
            loop {
                let n = match from_server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if !client_gone && to_client.write_all(&buf[..n]).await.is_err() {
                    client_gone = true;
                }
            }
        };
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    }
}

/// The agents' way in: each connection goes to the first replica that accepts it, starting
/// with the next one in turn; a dead replica refuses and the next one takes it.
async fn front_proxy(replicas: Arc<Mutex<Vec<SocketAddr>>>) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut turn = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            turn += 1;
            let order: Vec<SocketAddr> = {
                let replicas = replicas.lock().unwrap();
                (0..replicas.len())
                    .map(|i| replicas[(turn + i) % replicas.len()])
                    .collect()
            };
            tokio::spawn(async move {
                for replica in order {
                    if let Ok(mut server) = TcpStream::connect(replica).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            });
        }
    });
    (base, task)
}

/// One `vm-healthcheck` process; killed when dropped, its log printed if the test failed.
struct Replica {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    link: PveLink,
    _data: tempfile::TempDir,
}

impl Replica {
    async fn spawn(db_url: &str, fake: &FakePve, name: &str, point: KillPoint) -> Self {
        let upstream: SocketAddr = fake.base.trim_start_matches("http://").parse().unwrap();
        let (link, link_base) = PveLink::start(upstream).await;
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join(format!("{name}.log"));
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            vars.insert(k.to_owned(), v);
        };
        for (k, v) in FAST.iter().chain(SETTINGS) {
            set(k, (*v).to_owned());
        }
        for (k, v) in fake.env() {
            set(k, v);
        }
        if point == KillPoint::BeforePost {
            // Nothing reached Proxmox: the incident's next attempt, after the recovery
            // window, is the one reset.
            set("RECOVERY_TIMEOUT_MS", "8000".to_owned());
        }
        set("PROXMOX_HOST", link_base);
        set("DATABASE_URL", db_url.to_owned());
        set("DATA_DIR", data.path().display().to_string());
        // Port 0, read back from the log: no other test's server can take it meanwhile.
        set("LISTEN_ADDR", "127.0.0.1:0".to_owned());
        set("AGENT_TOKEN", AGENT_TOKEN.to_owned());
        set("ADMIN_TOKEN", ADMIN_TOKEN.to_owned());
        set("TLS", "off".to_owned());
        set("ENROLMENT_RATE_PER_MINUTE", "1000000".to_owned());
        set(
            "SITE_ROOT",
            workspace_root().join("target/site").display().to_string(),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&vars)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Polled like `wait_for`, which cannot borrow the child mutably.
        let start = Instant::now();
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = listening_addr(&text) {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited with {status}:\n{text}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} not listening after 30 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let replica = Self {
            child,
            addr,
            log,
            link,
            _data: data,
        };
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/api/health");
        wait_for(
            &format!("{name} to answer"),
            Duration::from_secs(30),
            || async {
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
        replica
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed or closed by the process.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The address in the server's "vm-healthcheck listening addr=..." line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let line = log
        .lines()
        .find(|l| l.contains("vm-healthcheck listening"))?;
    let (_, rest) = line.split_once("addr=")?;
    rest.split_whitespace().next()?.parse().ok()
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.addr, self.log_text());
        }
    }
}

/// Reports every 200 ms for `hosts` through the proxy, until aborted.
fn keep_reporting(http: reqwest::Client, base: String, hosts: &[&str]) -> JoinHandle<()> {
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    tokio::spawn(async move {
        loop {
            for host in &hosts {
                // A connection to the replica being killed may fail; the next one goes on.
                let _ = http
                    .post(format!("{base}/api/health/report"))
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for(host))
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The API as the agents and operators reach it: through the proxy.
fn through(base: &str, db_url: &str) -> TestServer {
    TestServer {
        server: None,
        base: base.to_owned(),
        // A new connection for every request: one kept open to a replica that was
        // killed would fail the next request instead of reaching the one alive.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        db: TestDb {
            url: db_url.to_owned(),
            dir: tempfile::tempdir().unwrap(),
        },
    }
}

/// Holds every power-action POST at the fake until `open` turns true; counts them in `held`.
fn gate(held: watch::Sender<usize>, open: watch::Sender<bool>) -> Gate {
    Arc::new(move |_call: ActionCall| {
        held.send_modify(|n| *n += 1);
        let mut open = open.subscribe();
        Box::pin(async move {
            let _ = open.wait_for(|o| *o).await;
            true
        })
    })
}

/// The VM's single history row once `check` accepts it.
async fn the_row(api: &TestServer, id: i64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(30), || async {
        let rows = history(api, id).await;
        match rows.as_slice() {
            [row] if check(row) => Some(row.clone()),
            _ => None,
        }
    })
    .await
}

/// Waits for `replica` to say it leads remediation.
async fn wait_leadership(replica: &Replica) {
    wait_for(
        "a surviving replica to take the leadership",
        Duration::from_secs(30),
        || async {
            replica
                .log_text()
                .contains("this instance now leads remediation")
                .then_some(())
        },
    )
    .await;
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Sessions of this database waiting for a lock.
async fn lock_waiters(conn: &tokio::sync::Mutex<AsyncPgConnection>) -> i64 {
    use diesel_async::RunQueryDsl;
    let mut conn = conn.lock().await;
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .get_result::<Count>(&mut *conn)
    .await
    .unwrap()
    .n
}

/// Holds the VM's row locked while `replica`'s follower (held at the fake until now) writes
/// the task's end, and kills the replica while that write waits: PostgreSQL abandons it
/// (the database checks for the lost client every 100 ms), as if the process had died in
/// the middle of it.
async fn killed_while_recording(
    db_url: &str,
    vm_id: i64,
    fake: &FakePve,
    replica: &mut Replica,
) -> Stored {
    let mut holder = AsyncPgConnection::establish(db_url).await.unwrap();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT id FROM vms WHERE id = {vm_id} FOR UPDATE"
        ))
        .await
        .unwrap();
    let watcher = tokio::sync::Mutex::new(AsyncPgConnection::establish(db_url).await.unwrap());
    fake.hang(false);
    wait_for(
        "the task's end to be written, held by the row lock",
        Duration::from_secs(30),
        || async { (lock_waiters(&watcher).await > 0).then_some(()) },
    )
    .await;
    replica.kill();
    wait_for(
        "the dead replica's write to be abandoned",
        Duration::from_secs(30),
        || async { (lock_waiters(&watcher).await == 0).then_some(()) },
    )
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    state_of(&mut holder, vm_id).await
}

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Stored {
    #[diesel(sql_type = diesel::sql_types::Text)]
    outcome: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    phase: String,
}

/// The VM's last attempt's outcome and its incident phase, read in one snapshot (no
/// replica is alive to answer the API).
async fn state_of(conn: &mut AsyncPgConnection, vm_id: i64) -> Stored {
    use diesel_async::RunQueryDsl;
    diesel::sql_query(format!(
        "SELECT a.outcome, v.remediation_phase AS phase FROM reset_attempts a \
         JOIN vms v ON v.id = a.vm_id WHERE a.vm_id = {vm_id} ORDER BY a.id DESC LIMIT 1"
    ))
    .get_result::<Stored>(conn)
    .await
    .unwrap()
}

async fn scenario(point: KillPoint) {
    let started = Instant::now();
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let db = fresh_db(Backend::Postgres).await;
    if point == KillPoint::WhileRecording {
        // A session waiting for a lock notices its client died only with this check.
        let name = db.url.rsplit('/').next().unwrap();
        AsyncPgConnection::establish(&admin_pg_url())
            .await
            .unwrap()
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET client_connection_check_interval = '100ms'"
            ))
            .await
            .unwrap();
    }
    let mut replicas = vec![
        Replica::spawn(&db.url, &fake, "replica-a", point).await,
        Replica::spawn(&db.url, &fake, "replica-b", point).await,
    ];
    let addrs = Arc::new(Mutex::new(replicas.iter().map(|r| r.addr).collect()));
    let (base, proxy) = front_proxy(addrs.clone()).await;
    let api = through(&base, &db.url);

    let (held_tx, held) = watch::channel(0usize);
    let (open, _) = watch::channel(false);
    match point {
        KillPoint::BeforePost => {
            for r in &replicas {
                r.link.0.lock().unwrap().hold_posts = true;
            }
        }
        KillPoint::PostInFlight => fake.gate_actions(gate(held_tx, open.clone())),
        KillPoint::TaskStarted | KillPoint::WhileRecording => fake.hang_on("/tasks/UPID:"),
    }

    // The hung VM reports once (its link confirmed) and then falls silent; two others
    // go on reporting through the proxy, to whichever replica is alive.
    let id = report_vm(&api, 100, "pve1", 5000).await;
    let reporter = keep_reporting(api.http.clone(), base.clone(), &["web-1", "web-2"]);

    // The leader reaches the kill point; the link that carried its request names it.
    let leader = match point {
        KillPoint::BeforePost => {
            wait_for(
                "the POST to be kept back",
                Duration::from_secs(30),
                || async { replicas.iter().position(|r| r.link.held() > 0) },
            )
            .await
        }
        KillPoint::PostInFlight => {
            let mut held = held.clone();
            tokio::time::timeout(Duration::from_secs(30), held.wait_for(|n| *n > 0))
                .await
                .expect("the POST to reach the fake")
                .unwrap();
            replicas
                .iter()
                .position(|r| r.link.carried("/status/reset ") > 0)
                .unwrap()
        }
        KillPoint::TaskStarted | KillPoint::WhileRecording => {
            wait_for(
                "the task's status read to be held",
                Duration::from_secs(30),
                || async {
                    let waiting = fake
                        .calls()
                        .iter()
                        .any(|c| c.path.contains("/tasks/UPID:") && c.status == 0);
                    let row = history(&api, id).await;
                    let stored = row.first().is_some_and(|r| r["upid"].is_string());
                    (waiting && stored).then_some(())?;
                    replicas
                        .iter()
                        .position(|r| r.link.carried("/tasks/UPID") > 0)
                },
            )
            .await
        }
    };
    let before = history(&api, id).await;
    assert_eq!(before.len(), 1, "one intent: {before:?}");
    let expected_outcome = match point {
        KillPoint::BeforePost | KillPoint::PostInFlight => "pending",
        KillPoint::TaskStarted | KillPoint::WhileRecording => "sent",
    };
    assert_eq!(before[0]["outcome"], expected_outcome, "{before:?}");
    let upid = before[0]["upid"].clone();
    if point == KillPoint::BeforePost {
        assert!(fake.action_attempts().is_empty(), "{:?}", fake.calls());
    }

    replicas[leader].kill();
    let mut survivor = 1 - leader;
    replicas[survivor].link.0.lock().unwrap().hold_posts = false;
    wait_leadership(&replicas[survivor]).await;

    let row = match point {
        KillPoint::BeforePost => {
            the_row(&api, id, "the intent to be closed as interrupted", |r| {
                r["outcome"] == "interrupted"
            })
            .await
        }
        KillPoint::PostInFlight => {
            let row = the_row(&api, id, "the intent to be closed as interrupted", |r| {
                r["outcome"] == "interrupted"
            })
            .await;
            // Proxmox carries out the request the dead leader delivered.
            open.send_replace(true);
            wait_for("the held reset to run", Duration::from_secs(10), || async {
                (!fake.posts().is_empty()).then_some(())
            })
            .await;
            row
        }
        KillPoint::TaskStarted => {
            wait_for(
                "the survivor to follow the stored task",
                Duration::from_secs(30),
                || async { (replicas[survivor].link.carried("/tasks/UPID") > 0).then_some(()) },
            )
            .await;
            fake.hang(false);
            the_row(&api, id, "the task to be followed to its end", |r| {
                r["outcome"] == "ok"
            })
            .await
        }
        KillPoint::WhileRecording => {
            wait_for(
                "the survivor to follow the stored task",
                Duration::from_secs(30),
                || async { (replicas[survivor].link.carried("/tasks/UPID") > 0).then_some(()) },
            )
            .await;
            let stored = killed_while_recording(&db.url, id, &fake, &mut replicas[survivor]).await;
            // Both or neither: an attempt closed with its VM still in flight is reconciled
            // by nobody.
            let open = Stored {
                outcome: "sent".into(),
                phase: "reset_pending".into(),
            };
            assert_eq!(stored, open, "the record closed without the incident moved");
            replicas.push(Replica::spawn(&db.url, &fake, "replica-c", point).await);
            survivor = replicas.len() - 1;
            addrs.lock().unwrap().push(replicas[survivor].addr);
            wait_leadership(&replicas[survivor]).await;
            the_row(&api, id, "the task to be followed to its end", |r| {
                r["outcome"] == "ok"
            })
            .await
        }
    };
    let survivor = &replicas[survivor];
    assert!(row["finished_ms"].is_i64(), "{row}");
    assert_eq!(row["upid"], upid, "the stored task is the one followed");
    if matches!(point, KillPoint::BeforePost | KillPoint::PostInFlight) {
        let error = row["error"].as_str().unwrap_or_default();
        assert!(error.contains("treated as sent"), "{row}");
    }
    assert_eq!(vm(&api, id).await["remediation_phase"], "recovering");

    let mut back = None;
    let attempts = if point == KillPoint::BeforePost {
        // The VM stays silent past the recovery window: the survivor's next attempt is the
        // one reset that reaches Proxmox, and the VM coming back ends the incident.
        let second = wait_for(
            "the next attempt after the recovery window",
            Duration::from_secs(40),
            || async {
                let rows = history(&api, id).await;
                rows.iter()
                    .find(|r| r["outcome"] == "ok" && r["upid"] != upid)
                    .cloned()
            },
        )
        .await;
        assert_eq!(second["action"], "reset", "{second}");
        // The guest boots and reports again (a small uptime), through the proxy.
        let (http, base) = (api.http.clone(), base.clone());
        let booted = Instant::now();
        back = Some(tokio::spawn(async move {
            loop {
                let mut r = report_for("guest-100");
                r["vmid"] = json!(100);
                r["node"] = json!("pve1");
                r["uptime_seconds"] = json!(booted.elapsed().as_secs() + 1);
                let _ = http
                    .post(format!("{base}/api/health/report"))
                    .bearer_auth(AGENT_TOKEN)
                    .json(&r)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
        wait_for("the incident to end", Duration::from_secs(20), || async {
            (vm(&api, id).await["remediation_phase"] == "ok").then_some(())
        })
        .await;
        2
    } else {
        1
    };

    // Many survivor rounds later (each refreshes the links through its own link): still
    // one attempt, and at most one power action ever reached Proxmox.
    let refreshes = survivor.link.carried("/cluster/resources");
    wait_for("survivor rounds", Duration::from_secs(30), || async {
        (survivor.link.carried("/cluster/resources") >= refreshes + 10).then_some(())
    })
    .await;
    let rows = history(&api, id).await;
    assert_eq!(
        rows.len(),
        attempts,
        "no other attempt for the incident: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["outcome"] == row["outcome"]),
        "{rows:?}"
    );
    // Exactly one power action ever reached Proxmox.
    let sent = vec!["reset 100".to_owned()];
    assert_eq!(fake.posts(), sent, "{:?}", fake.calls());
    assert_eq!(fake.action_attempts(), sent, "{:?}", fake.calls());
    let by_survivor = usize::from(point == KillPoint::BeforePost);
    assert_eq!(
        survivor.link.carried("/status/reset "),
        by_survivor,
        "the survivor sent only what the dead leader had not"
    );

    reporter.abort();
    if let Some(back) = back {
        back.abort();
    }
    proxy.abort();
    drop(replicas);
    eprintln!("{point:?}: {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_and_then_survivor_killed_while_the_outcome_is_written() {
    scenario(KillPoint::WhileRecording).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_after_the_intent_before_the_post() {
    scenario(KillPoint::BeforePost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_while_the_post_is_in_flight() {
    scenario(KillPoint::PostInFlight).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_after_the_task_started_before_the_record_is_finished() {
    scenario(KillPoint::TaskStarted).await;
}
