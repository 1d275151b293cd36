//! The Linux agent and its installer, run for real against the real server (agents/README.md).

use crate::common::*;
use regex_lite::Regex;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn agent_path() -> PathBuf {
    workspace_root().join("agents/linux-agent.sh")
}

/// The agent with `args`, configured only through the environment; variables the agent
/// reads are cleared so the caller's environment cannot leak in. The test servers speak
/// plain http://, which the agent refuses without INSECURE=true; its credential is kept in
/// `state_dir/credential` (beside the config file it is pointed at).
pub(crate) fn agent_cmd(server_url: &str, token: &str, state_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(agent_path())
        .args(args)
        .env("VMHC_AGENT_CONF", state_dir.join("no-such.conf"))
        .env("VMHC_STATE_DIR", state_dir)
        .env("SERVER_URL", server_url)
        .env("AGENT_TOKEN", token)
        .env("INSECURE", "true")
        .env("RETRY_DELAY_SECONDS", "0");
    for var in [
        "VMID",
        "NODE",
        "INTERVAL_SECONDS",
        "SPOOL_MAX",
        "RETRY_ATTEMPTS",
        "VMHC_CRON",
        "VMHC_HTTP_CLIENT",
        "CREDENTIAL_FILE",
        "CA_FILE",
        "PINNED_PUBKEY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run_agent(
    server_url: &str,
    token: &str,
    state_dir: &Path,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Output {
    let mut cmd = agent_cmd(server_url, token, state_dir, args);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("bash must be installed")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A stored sample from boot: the agent then skips its one-second CPU measurement.
pub(crate) fn prime_cpu(state_dir: &Path) {
    std::fs::write(state_dir.join("cpu.prev"), "0 0\n").unwrap();
}

/// A stored sample as busy as now but up to 10^6 jiffies earlier: the agent then reports a
/// CPU close to 0%.
fn quiet_cpu(state_dir: &Path) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap())
        .collect();
    let total: u64 = fields.iter().sum();
    let busy = total - fields[3] - fields[4];
    std::fs::write(
        state_dir.join("cpu.prev"),
        format!("{busy} {}\n", total.saturating_sub(1_000_000)),
    )
    .unwrap();
}

/// Spooled report files, oldest first (the agent's own order).
fn spool_names(state_dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(state_dir.join("spool"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub(crate) fn spool_files(state_dir: &Path) -> usize {
    spool_names(state_dir).len()
}

fn rfc3339_ms(text: &str) -> i64 {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap()
}

fn spooled_report(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

fn spooled_observed_ms(file: &Path) -> i64 {
    rfc3339_ms(spooled_report(file)["observed_at"].as_str().unwrap())
}

fn meminfo_kib(key: &str) -> i64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `(total, used)` bytes of `/` as `df` counts them.
fn df_root() -> (i64, i64) {
    let out = Command::new("df").args(["-P", "-k", "/"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<i64> = text
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .skip(1)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    (fields[0] * 1024, fields[1] * 1024)
}

/// Writes an executable script.
fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The first `name` on PATH.
fn find_in_path(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap();
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed"))
}

/// A `name` in `dir` that appends its arguments (one call a line) to `log` and runs the
/// real program.
fn recording_shim(dir: &Path, name: &str, log: &Path) {
    let real = find_in_path(name);
    write_script(
        &dir.join(name),
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\nexec '{}' \"$@\"\n",
            log.display(),
            real.display()
        ),
    );
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// PATH with `dir` first.
fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap())
}

/// One request as a stand-in server saw it.
#[derive(Clone)]
struct Hit {
    at: Instant,
    request: String,
}

impl Hit {
    /// The request's `Authorization` header, if any.
    fn authorization(&self) -> Option<String> {
        self.request.split("\r\n\r\n").next().and_then(|head| {
            head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
        })
    }
}

#[derive(Clone, Copy)]
enum Answer {
    /// An HTTP status and JSON body.
    Status(u16, &'static str),
    /// Closes the connection without answering (the agent sees no HTTP status).
    HangUp,
}

/// Decides the status and JSON body of an answer from the request.
type Responder = Arc<dyn Fn(&Hit) -> (u16, String) + Send + Sync>;

/// A server that answers every request the same way (or as a responder decides) and
/// records each one.
struct FakeServer {
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl FakeServer {
    fn start(answer: Answer) -> Self {
        match answer {
            Answer::HangUp => Self::serve(None),
            Answer::Status(code, body) => Self::responding(move |_| (code, body.to_owned())),
        }
    }

    fn responding(respond: impl Fn(&Hit) -> (u16, String) + Send + Sync + 'static) -> Self {
        Self::serve(Some(Arc::new(respond)))
    }

    fn serve(responder: Option<Responder>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let at = Instant::now();
                let request = match responder {
                    None => String::new(),
                    Some(_) => read_request(&mut stream),
                };
                let hit = Hit { at, request };
                let answer = responder.as_ref().map(|respond| respond(&hit));
                // Recorded before answering: once the agent has its answer, the hit is here.
                log.lock().unwrap().push(hit);
                if let Some((code, body)) = answer {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {code} Test\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
        Self { base, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The JSON body of every request received.
    fn bodies(&self) -> Vec<Value> {
        self.hits()
            .iter()
            .map(|h| {
                let body = h.request.split("\r\n\r\n").nth(1).unwrap_or_default();
                serde_json::from_str(body).unwrap_or(Value::Null)
            })
            .collect()
    }

    /// The `Authorization` header of every request received ("" when there was none).
    fn authorizations(&self) -> Vec<String> {
        self.hits()
            .iter()
            .map(|h| h.authorization().unwrap_or_default())
            .collect()
    }
}

/// A VM credential as the server hands them out, made of `digit` repeated.
fn test_credential(digit: char) -> String {
    assert!(digit.is_ascii_hexdigit() && !digit.is_ascii_uppercase());
    format!("vmhc_vm_{}", digit.to_string().repeat(64))
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// A stand-in speaking the enrolment protocol: a report with AGENT_TOKEN is accepted and
/// answered with `credential` and a warning; one with `credential` is accepted; anything
/// else is a 401.
fn enrolling_server(credential: &str) -> FakeServer {
    let credential = credential.to_owned();
    FakeServer::responding(move |hit| match hit.authorization() {
        Some(auth) if auth == bearer(AGENT_TOKEN) => (
            200,
            json!({"vm_id": 1, "status": "healthy", "report_interval_seconds": 30,
                   "warnings": ["disks[3]: mount: \"odd\" name, dropped"],
                   "credential": credential})
            .to_string(),
        ),
        Some(auth) if auth == bearer(&credential) => (
            200,
            json!({"vm_id": 1, "status": "healthy", "report_interval_seconds": 30}).to_string(),
        ),
        _ => (401, json!({"error": "unauthorized"}).to_string()),
    })
}

fn read_request(stream: &mut TcpStream) -> String {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return text,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A value no other process on the machine carries in its environment.
fn unique_mark() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// Processes whose environment holds `VMHC_TEST_MARK=<mark>`.
fn processes_marked(mark: &str) -> Vec<u32> {
    let needle = format!("VMHC_TEST_MARK={mark}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            // A process that ended since the listing has nothing left to read.
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// Processes in session `sid`.
fn session_members(sid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the command name: state, ppid, pgrp, session.
            let rest = &stat[stat.rfind(')')? + 1..];
            let session = rest.split_whitespace().nth(3)?.parse::<u32>().ok()?;
            (session == sid).then_some(pid)
        })
        .collect()
}

/// `program args...` followed by `inner`'s program and arguments, with `inner`'s environment.
fn wrapped(program: &str, args: &[&str], inner: &Command) -> Command {
    let mut outer = Command::new(program);
    outer
        .args(args)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => outer.env(k, v),
            None => outer.env_remove(k),
        };
    }
    outer
}

/// `command` run inside a private mount namespace after `setup` (shell) ran there, so
/// files like /proc/stat can be replaced for the agent alone.
fn in_private_mounts(setup: &str, command: &Command) -> Command {
    let script = format!("{setup} && exec \"$@\"");
    wrapped(
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", &script, "sh"],
        command,
    )
}

async fn only_vm_id(srv: &TestServer) -> i64 {
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    vms[0]["id"].as_i64().unwrap()
}

/// `(t_ms, samples)` of each point of the VM's metric history in `[from, to]`.
async fn metric_points(srv: &TestServer, vm: i64, from: i64, to: i64) -> Vec<(i64, i64)> {
    let (status, body) = srv
        .get(&format!(
            "/api/vms/{vm}/metrics?from={from}&to={to}&points=2000"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t_ms"].as_i64().unwrap(), p["samples"].as_i64().unwrap()))
        .collect()
}

/// `observed_ms` of every stored sample in the order the server received them.
async fn observed_in_arrival_order(srv: &TestServer) -> Vec<i64> {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::RunQueryDsl;
    use server::db::schema::metric_samples::dsl::*;
    let mut conn = srv.state().db.conn().await.unwrap();
    server::with_conn!(conn, |c| metric_samples
        .order(id.asc())
        .select(observed_ms)
        .load(c)
        .await)
    .unwrap()
}

/// The VMID and node the only VM reported.
async fn reported_link(srv: &TestServer) -> (Option<i64>, Option<String>) {
    use diesel::QueryDsl;
    use diesel_async::RunQueryDsl;
    use server::db::schema::vms::dsl::*;
    let mut conn = srv.state().db.conn().await.unwrap();
    server::with_conn!(conn, |c| vms
        .select((reported_vmid, reported_node))
        .first::<(Option<i64>, Option<String>)>(c)
        .await)
    .unwrap()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_reports_sane_values() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("report accepted"));

    let (_, vms) = srv.get("/api/vms").await;
    let vm = &vms[0];
    assert_eq!(vm["hostname"], hostname().as_str());
    assert_eq!(vm["os"], "linux");
    let cpu = vm["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu));
    let total = meminfo_kib("MemTotal:") * 1024;
    assert_eq!(vm["ram_total_bytes"].as_i64().unwrap(), total);
    // MemTotal - MemAvailable, give or take what other processes did meanwhile.
    let used = vm["ram_used_bytes"].as_i64().unwrap();
    let expected_used = total - meminfo_kib("MemAvailable:") * 1024;
    assert!(
        used > 0 && (used - expected_used).abs() < total / 10,
        "RAM used {used}, MemTotal - MemAvailable {expected_used}"
    );
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((vm["uptime_seconds"].as_f64().unwrap() - uptime).abs() < 30.0);

    // Local filesystems only: this machine has tmpfs, cgroup and proc mounts to leave out.
    let proc_mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let fstype_of = |mount: &str| {
        proc_mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&mount)).then(|| f[2].to_owned())
            })
            .next_back()
    };
    let disks = vm["disks"].as_array().unwrap();
    assert!(!disks.is_empty(), "no disks reported: {vm}");
    let mut seen = BTreeSet::new();
    for disk in disks {
        let mount = disk["mount"].as_str().unwrap();
        assert!(seen.insert(mount.to_owned()), "{mount} reported twice");
        let used = disk["used_bytes"].as_i64().unwrap();
        let total = disk["total_bytes"].as_i64().unwrap();
        assert!(total > 0 && (0..=total).contains(&used), "{disk}");
        let fstype = fstype_of(mount).unwrap_or_else(|| panic!("{mount} is not mounted"));
        assert!(
            ![
                "tmpfs", "overlay", "squashfs", "nfs", "nfs4", "cifs", "smb3", "9p", "proc",
                "sysfs", "devtmpfs", "cgroup", "cgroup2", "devpts", "fuse",
            ]
            .contains(&fstype.as_str()),
            "{mount} ({fstype}) is not a local filesystem"
        );
    }
    let percent = vm["disk_max_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&percent), "{percent}");
    let root = disks
        .iter()
        .find(|d| d["mount"] == "/")
        .unwrap_or_else(|| panic!("/ not reported: {disks:?}"));
    let (df_total, df_used) = df_root();
    assert_eq!(root["total_bytes"].as_i64().unwrap(), df_total);
    // Other tests and builds write to this disk meanwhile.
    let root_used = root["used_bytes"].as_i64().unwrap();
    assert!(
        (root_used - df_used).abs() < 2_i64 << 30,
        "/ used {root_used}, df says {df_used}"
    );
    assert_eq!(vm["agent_version"], "1.0.0");
    assert_eq!(spool_files(state.path()), 0);
    srv.stop().await;
}

/// CPU is the busy share of /proc/stat time since the stored sample, iowait counted idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_is_the_busy_share_since_the_previous_sample() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    // user nice system idle iowait irq softirq steal: 300 busy of 2000.
    let stat = state.path().join("stat");
    std::fs::write(
        &stat,
        "cpu  250 0 40 1650 50 5 5 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n",
    )
    .unwrap();
    std::fs::write(state.path().join("cpu.prev"), "100 1000\n").unwrap();
    let setup = format!("mount --bind '{}' /proc/stat", stat.display());
    let agent = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &["--once"]);
    let out = in_private_mounts(&setup, &agent).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // (300 - 100) busy of (2000 - 1000) jiffies.
    assert_eq!(fake.bodies()[0]["cpu_percent"], json!(20.0));
    assert_eq!(
        std::fs::read_to_string(state.path().join("cpu.prev")).unwrap(),
        "300 2000\n",
        "the sample is kept for the next report"
    );
}

/// `machine_id` is the SMBIOS uuid in lower case, and absent when that is no uuid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_id_is_the_smbios_uuid_in_lower_case() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let uuid = state.path().join("product_uuid");
    let setup = format!(
        "mount -t tmpfs none /sys/class && mkdir -p /sys/class/dmi/id && \
         cp '{}' /sys/class/dmi/id/product_uuid",
        uuid.display()
    );
    let agent = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &["--once"]);
    for (content, expected) in [
        (
            "4C4C4544-0042-3510-8052-B4C04F4E3632\n",
            json!("4c4c4544-0042-3510-8052-b4c04f4e3632"),
        ),
        ("Not Settable\n", Value::Null),
    ] {
        std::fs::write(&uuid, content).unwrap();
        let out = in_private_mounts(&setup, &agent).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        let body = fake.bodies().pop().unwrap();
        assert_eq!(body["machine_id"], expected, "{content}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_token_is_reported_clearly_and_not_spooled() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let out = run_agent(&srv.base, "wrong-token", state.path(), &["--once"], &[]);
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("the server rejected the agent token (HTTP 401): check AGENT_TOKEN"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong-token"),
        "the token must not be logged"
    );
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.vm_count().await, 0);
    srv.stop().await;
}

/// A 4xx other than 429 is final: one request, a message naming the reason, nothing spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reports_are_logged_and_not_retried() {
    let cases: [(u16, &str, &str); 4] = [
        (
            400,
            r#"{"error":{"code":"bad_request","message":"at most 64","field":"disks"}}"#,
            "report refused (HTTP 400): disks: at most 64",
        ),
        (
            401,
            r#"{"error":"unauthorized"}"#,
            "rejected the agent token",
        ),
        (403, r#"{"error":"forbidden"}"#, "rejected the agent token"),
        (
            404,
            r#"{"error":{"code":"not_found","message":"not found"}}"#,
            "report refused (HTTP 404): not found",
        ),
    ];
    for (code, body, message) in cases {
        // Both HTTP clients: bash's own (first try, empty spool) and curl.
        for client in ["builtin", "external"] {
            let fake = FakeServer::start(Answer::Status(code, body));
            let state = tempfile::tempdir().unwrap();
            prime_cpu(state.path());
            let extra = [("VMHC_HTTP_CLIENT", client)];
            let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &extra);
            let stderr = stderr_of(&out);
            assert!(!out.status.success(), "{code} {client}");
            assert!(stderr.contains(message), "{code} {client}: {stderr}");
            assert_eq!(fake.hits().len(), 1, "{code} {client}: not retried");
            assert_eq!(spool_files(state.path()), 0, "{code} {client}: not spooled");
            // The timer's tick drops it the same way and still succeeds.
            let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--tick"], &extra);
            assert!(out.status.success());
            assert_eq!(fake.hits().len(), 2, "{code} {client}: not retried");
            assert_eq!(spool_files(state.path()), 0, "{code} {client}: not spooled");
        }
    }
}

/// Three tries with a growing pause; then the report waits in the spool (429 included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_reports_are_tried_three_times_with_growing_pauses_then_spooled() {
    let busy = FakeServer::start(Answer::Status(503, r#"{"error":"database busy"}"#));
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let out = run_agent(
        &busy.base,
        AGENT_TOKEN,
        state.path(),
        &["--tick"],
        &[("RETRY_DELAY_SECONDS", "1")],
    );
    assert!(out.status.success(), "a tick never fails");
    assert!(
        stderr_of(&out).contains("server answered HTTP 503: database busy"),
        "{}",
        stderr_of(&out)
    );
    let hits = busy.hits();
    assert_eq!(hits.len(), 3, "three tries");
    let first = hits[1].at - hits[0].at;
    let second = hits[2].at - hits[1].at;
    assert!(
        first >= Duration::from_millis(900) && second >= Duration::from_millis(1900),
        "pauses {first:?} then {second:?}: the second must be about twice the first"
    );
    assert_eq!(spool_files(state.path()), 1);

    for answer in [
        Answer::Status(429, r#"{"error":"slow down"}"#),
        Answer::HangUp,
    ] {
        let fake = FakeServer::start(answer);
        let state = tempfile::tempdir().unwrap();
        prime_cpu(state.path());
        let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--tick"], &[]);
        assert!(out.status.success());
        assert_eq!(fake.hits().len(), 3, "{}", stderr_of(&out));
        assert_eq!(spool_files(state.path()), 1, "kept for later");
        if matches!(answer, Answer::HangUp) {
            assert!(
                stderr_of(&out).contains(&format!("server {} unreachable", fake.base)),
                "{}",
                stderr_of(&out)
            );
            // --once says so and fails.
            let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
            assert!(!out.status.success());
            assert!(
                stderr_of(&out).contains("not accepted"),
                "{}",
                stderr_of(&out)
            );
            assert_eq!(spool_files(state.path()), 2);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_spool_while_the_server_is_down_and_replay_in_order() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut srv = TestServer::start(Backend::Sqlite, &[("LISTEN_ADDR", &addr)]).await;
    let state = tempfile::tempdir().unwrap();
    let limits = [("SPOOL_MAX", "3"), ("RETRY_ATTEMPTS", "2")];
    prime_cpu(state.path());
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
    assert!(out.status.success());
    assert_eq!(srv.metric_rows().await, 1);

    srv.stop().await;
    // The spool file each tick added, and the observed_at it holds.
    let mut taken: Vec<(PathBuf, i64)> = Vec::new();
    for _ in 0..5 {
        prime_cpu(state.path());
        let before = spool_names(state.path());
        let started = server::now_ms();
        let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
        let ended = server::now_ms();
        assert!(
            out.status.success(),
            "a tick never fails: {}",
            stderr_of(&out)
        );
        assert!(
            stderr_of(&out).contains(&format!("server {} unreachable", srv.base)),
            "{}",
            stderr_of(&out)
        );
        let added: Vec<PathBuf> = spool_names(state.path())
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        assert_eq!(added.len(), 1, "one report spooled per tick");
        let observed = spooled_observed_ms(&added[0]);
        assert!(
            (started..=ended).contains(&observed),
            "stamped when observed"
        );
        taken.push((added[0].clone(), observed));
    }
    let kept = spool_names(state.path());
    assert_eq!(
        kept,
        taken[2..]
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>(),
        "the spool keeps the newest SPOOL_MAX reports"
    );
    let spooled: Vec<i64> = kept.iter().map(|n| spooled_observed_ms(n)).collect();
    assert!(spooled.windows(2).all(|w| w[0] < w[1]), "{spooled:?}");

    // A second between the last spooled report and the replay: a server that stored
    // receive times would then store times at least that much later than the spooled ones.
    let last = *spooled.last().unwrap();
    let pause = (last + 1000 - server::now_ms()).max(0);
    tokio::time::sleep(Duration::from_millis(u64::try_from(pause).unwrap())).await;

    let srv = TestServer::start_on(srv.db, &[("LISTEN_ADDR", &addr)]).await;
    prime_cpu(state.path());
    let replay_start = server::now_ms();
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
    let replay_end = server::now_ms();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    // 1 before the outage, the 3 kept, the new one: each once.
    assert_eq!(srv.metric_rows().await, 5);

    let vm = only_vm_id(&srv).await;
    let points = metric_points(&srv, vm, spooled[0], replay_end + 1000).await;
    assert!(points.iter().all(|(_, n)| *n == 1), "{points:?}");
    let stored: Vec<i64> = points.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        stored[..3],
        spooled[..],
        "replayed reports are stored with the observed_at they were spooled with"
    );
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(stored[3] >= replay_start, "the new report is observed now");
    let burst = replay_end - replay_start;
    assert!(
        spooled.iter().all(|t| *t < replay_start - burst),
        "spooled {spooled:?}, replay from {replay_start} for {burst} ms"
    );
    // Received oldest first, the new report last.
    let arrival = observed_in_arrival_order(&srv).await;
    assert_eq!(arrival[1..], stored[..], "arrival order {arrival:?}");
    assert!(arrival.windows(2).all(|w| w[0] < w[1]), "{arrival:?}");
}

/// Without SPOOL_MAX the spool holds the latest 100, in /var/lib/vm-healthcheck/spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_the_latest_100_reports() {
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            "source <(sed -n '/^AGENT_VERSION=/,/^RETRY_DELAY_SECONDS=/p' \"$0\") && \
             printf '%s|%s|%s|%s' \"$CONF_FILE\" \"$SPOOL_DIR\" \"$SPOOL_MAX\" \"$RETRY_ATTEMPTS\"",
        )
        .arg(agent_path())
        .env_remove("VMHC_AGENT_CONF")
        .env_remove("VMHC_STATE_DIR")
        .env_remove("SPOOL_MAX")
        .env_remove("RETRY_ATTEMPTS")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/etc/vm-healthcheck/agent.conf|/var/lib/vm-healthcheck/spool|100|3"
    );

    let state = tempfile::tempdir().unwrap();
    let spool = state.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    // Names as the agent writes them, older than any it writes now.
    for i in 1..=100 {
        std::fs::write(spool.join(format!("{i:020}-1.json")), "{}").unwrap();
    }
    prime_cpu(state.path());
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = run_agent(
        &closed,
        AGENT_TOKEN,
        state.path(),
        &["--tick"],
        &[("RETRY_ATTEMPTS", "1")],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let names = spool_names(state.path());
    assert_eq!(names.len(), 100);
    assert_eq!(
        names[0].file_name().unwrap().to_string_lossy(),
        format!("{:020}-1.json", 2),
        "the oldest is dropped"
    );
    let newest = spooled_report(names.last().unwrap());
    assert_eq!(newest["hostname"], hostname().as_str());
}

/// This machine's report as the agent builds it (taken by a stand-in server).
fn own_report(state_dir: &Path) -> Value {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    prime_cpu(state_dir);
    let out = run_agent(&fake.base, AGENT_TOKEN, state_dir, &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    fake.bodies().pop().unwrap()
}

/// A spooled report the server refuses for good is dropped; the rest still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_report_refused_for_good_is_dropped_and_replay_goes_on() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let spool = state.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    // Reports this VM took earlier: one the server cannot take, one it can.
    let mut refused = own_report(state.path());
    refused["cpu_percent"] = json!(101);
    let mut valid = own_report(state.path());
    let observed = (server::now_ms() - 300_000) / 1000 * 1000;
    let at = time::OffsetDateTime::from_unix_timestamp(observed / 1000).unwrap();
    valid["observed_at"] = json!(
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    std::fs::write(spool.join(format!("{:020}-1.json", 1)), refused.to_string()).unwrap();
    std::fs::write(spool.join(format!("{:020}-1.json", 2)), valid.to_string()).unwrap();
    prime_cpu(state.path());
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &[]);
    assert!(out.status.success());
    assert!(
        stderr_of(&out).contains("report refused (HTTP 400): cpu_percent"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.vm_count().await, 1);
    // The valid spooled one, with the time it was taken, then the new one.
    let stored = observed_in_arrival_order(&srv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0], observed);
    assert!(stored[1] > observed + 200_000, "{stored:?}");
    srv.stop().await;
}

/// Plain http:// while the server answers: bash's /dev/tcp, no curl. https://, retries and
/// replays: curl with timeouts. The token (or the credential the server gave in exchange)
/// is never on curl's command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_only_for_https_retries_and_replays_and_never_with_the_token() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let shims = tempfile::tempdir().unwrap();
    let log = shims.path().join("curl.log");
    recording_shim(shims.path(), "curl", &log);
    let path = path_with(shims.path());
    let run = |url: &str, args: &[&str], attempts: &str| {
        prime_cpu(state.path());
        let extra = [("PATH", path.as_str()), ("RETRY_ATTEMPTS", attempts)];
        run_agent(url, AGENT_TOKEN, state.path(), args, &extra)
    };

    let out = run(&srv.base, &["--once"], "3");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        lines_of(&log),
        Vec::<String>::new(),
        "no curl on the normal path"
    );

    let https = format!("https://127.0.0.1:{}", free_port());
    let out = run(&https, &["--once"], "1");
    assert!(!out.status.success());
    let calls = lines_of(&log);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].contains(&format!("{https}/api/health/report")));
    assert_eq!(spool_files(state.path()), 1);

    // The spooled report is replayed through curl, then the new one goes through bash.
    let out = run(&srv.base, &["--tick"], "3");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let calls = lines_of(&log);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].contains(&format!("{}/api/health/report", srv.base)));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.metric_rows().await, 3);

    // Retries: the first try is bash's, the two others curl's.
    let hangup = FakeServer::start(Answer::HangUp);
    let out = run(&hangup.base, &["--tick"], "3");
    assert!(out.status.success());
    assert_eq!(hangup.hits().len(), 3);
    let calls = lines_of(&log);
    assert_eq!(calls.len(), 4, "{calls:?}");

    for call in &calls {
        assert!(
            call.contains("--connect-timeout 5") && call.contains("--max-time 15"),
            "{call}"
        );
        assert!(
            !call.contains(AGENT_TOKEN) && !call.contains("vmhc_vm_"),
            "token or credential on the command line: {call}"
        );
    }
    srv.stop().await;
}

/// A PATH with every program of /usr/bin but curl and wget, and `wget` as given.
fn path_without_curl(dir: &Path, wget: &str) -> String {
    for entry in std::fs::read_dir("/usr/bin")
        .unwrap()
        .filter_map(Result::ok)
    {
        let name = entry.file_name();
        if name != "curl" && name != "wget" {
            std::os::unix::fs::symlink(entry.path(), dir.join(&name)).unwrap();
        }
    }
    write_script(&dir.join("wget"), wget);
    dir.display().to_string()
}

/// Without curl, GNU wget carries the token in a temporary wgetrc, never on its command
/// line. busybox wget can only take a header on its command line, so it is never given one:
/// http:// reports go through bash itself (retries and replays too), and an https:// server
/// is refused before anything is sent (agents/README.md). Both learn the HTTP status, so a
/// wrong token is reported and not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_curl_wget_is_used() {
    let real = find_in_path("wget").display().to_string();
    for busybox in [false, true] {
        // A server each: the same host enrols in each case.
        let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
        let mut accepted = 0;
        let bin = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("wget.log").display().to_string();
        let shim = if busybox {
            // GNU wget standing in for busybox's: the same options, and on an HTTP error
            // busybox's only word on the status, "wget: server returned error: HTTP/1.1 401 ...".
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" = --version ]; then echo 'BusyBox v1.36.1 multi-call binary.'; exit 1; fi\n\
                 printf '%s\\n' \"$*\" >>'{log}'\n\
                 err=$('{real}' -S \"$@\" 2>&1) && exit 0\n\
                 code=$(printf '%s\\n' \"$err\" | sed -n 's/^  HTTP\\/[0-9.]* \\([0-9]*\\).*/\\1/p' | tail -n 1)\n\
                 [ -n \"$code\" ] && echo \"wget: server returned error: HTTP/1.1 $code Test\" >&2\n\
                 exit 1\n"
            )
        } else {
            format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{log}'\nexec '{real}' \"$@\"\n")
        };
        let path = path_without_curl(bin.path(), &shim);
        let extra = [
            ("PATH", path.as_str()),
            ("VMHC_HTTP_CLIENT", "external"),
            ("TMPDIR", tmp.path().to_str().unwrap()),
        ];
        let posts = || -> Vec<String> {
            lines_of(Path::new(&log))
                .into_iter()
                .filter(|l| l.contains("--post-file"))
                .collect()
        };
        // A fresh state each time: no credential from an earlier enrolment.
        let state = tempfile::tempdir().unwrap();
        prime_cpu(state.path());
        let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--once"], &extra);
        assert!(
            out.status.success(),
            "busybox {busybox}: {}",
            stderr_of(&out)
        );
        accepted += 1;
        let sent = posts();
        if busybox {
            assert_eq!(
                sent,
                Vec::<String>::new(),
                "busybox wget is never given a report"
            );
        } else {
            assert_eq!(sent.len(), 1, "{sent:?}");
            assert!(
                !sent[0].contains(AGENT_TOKEN),
                "token on wget's command line: {}",
                sent[0]
            );
            assert!(sent[0].contains("--timeout=15"), "{}", sent[0]);
        }
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "the temporary wgetrc is removed"
        );

        // Retries and replays too: a server that hangs up is tried three times, then the
        // report is spooled and replayed once the server answers.
        let hangup = FakeServer::start(Answer::HangUp);
        prime_cpu(state.path());
        let out = run_agent(&hangup.base, AGENT_TOKEN, state.path(), &["--tick"], &extra);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(
            hangup.hits().len(),
            3,
            "busybox {busybox}: {}",
            stderr_of(&out)
        );
        assert_eq!(spool_files(state.path()), 1);
        prime_cpu(state.path());
        let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &extra);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(spool_files(state.path()), 0);
        accepted += 2;
        if busybox {
            assert_eq!(
                posts(),
                Vec::<String>::new(),
                "busybox wget is never given a report"
            );
        }
        assert_eq!(srv.metric_rows().await, accepted);

        let state = tempfile::tempdir().unwrap();
        prime_cpu(state.path());
        let before = posts().len();
        let out = run_agent(&srv.base, "wrong-token", state.path(), &["--once"], &extra);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains("rejected the agent token (HTTP 401)"),
            "busybox {busybox}: {}",
            stderr_of(&out)
        );
        if !busybox {
            assert_eq!(posts().len(), before + 1, "not retried");
        }
        assert_eq!(spool_files(state.path()), 0);

        // https:// cannot go through bash: with busybox wget alone it is refused before
        // anything is sent, saying why.
        let https = format!("https://127.0.0.1:{}", free_port());
        let out = run_agent(&https, AGENT_TOKEN, state.path(), &["--once"], &extra);
        if busybox {
            assert!(!out.status.success());
            assert!(
                stderr_of(&out).contains("https:// without curl needs GNU wget"),
                "{}",
                stderr_of(&out)
            );
            assert_eq!(posts(), Vec::<String>::new());
            assert_eq!(spool_files(state.path()), 0, "nothing taken");
        } else {
            // GNU wget tries (nobody listens there) and keeps the report for later.
            assert!(!out.status.success());
            assert!(posts().last().unwrap().contains(&https), "{:?}", posts());
            assert!(posts().iter().all(|p| !p.contains(AGENT_TOKEN)));
        }
        srv.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_stays_resident_after_a_timer_tick() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();

    // The scans see a marked process in its own session while it runs.
    let control_mark = unique_mark();
    let mut control = Command::new("setsid")
        .args(["sleep", "30"])
        .env("VMHC_TEST_MARK", &control_mark)
        .spawn()
        .unwrap();
    let pid = control.id();
    wait_for(
        "the scans to see a marked process",
        Duration::from_secs(5),
        || {
            let seen = processes_marked(&control_mark) == [pid] && session_members(pid) == [pid];
            async move { seen.then_some(()) }
        },
    )
    .await;
    control.kill().unwrap();
    control.wait().unwrap();

    // Output to files, not pipes: a child left behind would otherwise hold the test up.
    let mark = unique_mark();
    let agent = agent_cmd(&srv.base, AGENT_TOKEN, state.path(), &["--tick"]);
    let mut tick = wrapped("setsid", &[], &agent);
    let log = std::fs::File::create(state.path().join("tick.log")).unwrap();
    let mut child = tick
        .env("VMHC_TEST_MARK", &mark)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let session = child.id();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        processes_marked(&mark),
        Vec::<u32>::new(),
        "processes left with the agent's environment"
    );
    assert_eq!(
        session_members(session),
        Vec::<u32>::new(),
        "processes left in the agent's session"
    );
    assert_eq!(srv.metric_rows().await, 1);
    srv.stop().await;
}

/// `--run` stays and reports every INTERVAL_SECONDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_mode_reports_every_interval() {
    use std::os::unix::process::CommandExt;
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let mut child = agent_cmd(&srv.base, AGENT_TOKEN, state.path(), &["--run"])
        .env("INTERVAL_SECONDS", "2")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let group = child.id();
    wait_for("three reports", Duration::from_secs(20), || async {
        (srv.metric_rows().await >= 3).then_some(())
    })
    .await;
    // The agent and its sleep: its own process group.
    Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status()
        .unwrap();
    child.wait().unwrap();
    let observed = observed_in_arrival_order(&srv).await;
    // Two seconds is past the agent's own one-second CPU measurement, so only the
    // interval can space the reports this far.
    assert!(
        observed
            .windows(2)
            .all(|w| (1950..4000).contains(&(w[1] - w[0]))),
        "one report every two seconds: {observed:?}"
    );
    srv.stop().await;
}

/// Under cron (VMHC_CRON=1) an interval under 60 s means several cycles in the minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cron_ticks_report_several_times_a_minute_for_short_intervals() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let shims = tempfile::tempdir().unwrap();
    // A sleep that returns at once and says how long it was asked to wait.
    let log = shims.path().join("sleep.log");
    write_script(
        &shims.path().join("sleep"),
        &format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\n", log.display()),
    );
    let path = path_with(shims.path());
    let mut rows = 0;
    // (VMHC_CRON, INTERVAL_SECONDS or unset for the default, the interval in force, cycles)
    for (cron, interval, in_force, cycles) in [
        ("1", Some("20"), "20", 3_usize),
        ("1", None, "30", 2),
        ("", Some("20"), "20", 1),
        ("1", Some("60"), "60", 1),
    ] {
        prime_cpu(state.path());
        let _ = std::fs::remove_file(&log);
        let mut tick = agent_cmd(&srv.base, AGENT_TOKEN, state.path(), &["--tick"]);
        tick.env("PATH", &path).env("VMHC_CRON", cron);
        if let Some(interval) = interval {
            tick.env("INTERVAL_SECONDS", interval);
        }
        let out = tick.output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        rows += i64::try_from(cycles).unwrap();
        assert_eq!(
            srv.metric_rows().await,
            rows,
            "VMHC_CRON={cron} interval {interval:?}"
        );
        let waits = lines_of(&log).iter().filter(|l| *l == in_force).count();
        assert_eq!(waits, cycles - 1, "{in_force} s apart");
    }
    srv.stop().await;
}

/// KEY=VALUE lines from the config file; the environment overrides each key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_read_and_the_environment_overrides_it() {
    let fake = FakeServer::responding(|hit| match hit.authorization() {
        Some(auth) if auth == bearer(AGENT_TOKEN) => (200, "{}".to_owned()),
        _ => (401, r#"{"error":"unauthorized"}"#.to_owned()),
    });
    let state = tempfile::tempdir().unwrap();
    let conf = state.path().join("agent.conf");
    let keys = tempfile::tempdir().unwrap();
    let credential_file = keys.path().join("vm-credential");
    std::fs::write(
        &conf,
        format!(
            "# written by hand\nSERVER_URL=\"{}\"\nAGENT_TOKEN=wrong-token\nINTERVAL_SECONDS=30\n\
             VMID=4242\nNODE='pve-a'\nINSECURE=true\nCREDENTIAL_FILE={}\n",
            fake.base,
            credential_file.display()
        ),
    )
    .unwrap();
    let run = |extra: &[(&str, &str)]| {
        prime_cpu(state.path());
        let mut cmd = agent_cmd("", "", state.path(), &["--once"]);
        cmd.env("VMHC_AGENT_CONF", &conf)
            .env_remove("SERVER_URL")
            .env_remove("AGENT_TOKEN")
            .env_remove("INSECURE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains(&format!("check AGENT_TOKEN in {}", conf.display())),
        "{}",
        stderr_of(&out)
    );
    let out = run(&[("AGENT_TOKEN", AGENT_TOKEN)]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = run(&[("AGENT_TOKEN", AGENT_TOKEN), ("NODE", "pve-b")]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let bodies = fake.bodies();
    let links: Vec<(Value, Value)> = bodies
        .iter()
        .map(|b| (b["vmid"].clone(), b["node"].clone()))
        .collect();
    assert_eq!(
        links,
        [
            (json!(4242), json!("pve-a")),
            (json!(4242), json!("pve-a")),
            (json!(4242), json!("pve-b")),
        ]
    );
    assert_eq!(
        fake.authorizations(),
        [
            bearer("wrong-token"),
            bearer(AGENT_TOKEN),
            bearer(AGENT_TOKEN)
        ]
    );

    // CREDENTIAL_FILE says where this VM's credential is; once there, it is what is sent.
    let credential = test_credential('c');
    std::fs::write(&credential_file, format!("{credential}\n")).unwrap();
    let out = run(&[("AGENT_TOKEN", AGENT_TOKEN)]);
    assert!(!out.status.success(), "the stand-in takes only the token");
    assert_eq!(fake.authorizations().last().unwrap(), &bearer(&credential));
    assert!(!state.path().join("credential").exists());
}

/// Milliseconds from bash 5's EPOCHREALTIME; whole seconds without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_times_have_milliseconds_or_whole_seconds() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // bash before 5.0 has no EPOCHREALTIME: the agent sourced by a shell that unset it.
    let agent = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &["--once"]);
    let script = "unset EPOCHREALTIME; agent=$1; shift; . \"$agent\" \"$@\"";
    let mut older = wrapped("bash", &["-c", script], &agent);
    prime_cpu(state.path());
    let out = older.output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let times: Vec<String> = fake
        .bodies()
        .iter()
        .map(|b| b["observed_at"].as_str().unwrap().to_owned())
        .collect();
    let millis = Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$").unwrap();
    let seconds = Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").unwrap();
    assert!(millis.is_match(&times[0]), "{times:?}");
    assert!(seconds.is_match(&times[1]), "{times:?}");
}

/// The server hands out the agent files as they are in the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_hands_out_the_agent_files() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    for file in [
        "install.sh",
        "linux-agent.sh",
        "install-windows.ps1",
        "windows-agent.ps1",
    ] {
        let resp = srv
            .http
            .get(srv.url(&format!("/agents/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{file}");
        let served = resp.bytes().await.unwrap();
        let local = std::fs::read(workspace_root().join("agents").join(file)).unwrap();
        assert!(served[..] == local[..], "{file} differs from agents/{file}");
    }
    srv.stop().await;
}

/// The README's install line (the test server is plain http://, hence --insecure), the
/// token in a file.
fn install(base: &str, token: &str, root: &Path, options: &str) -> Output {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let script = format!(
        "curl -fsSL {base}/agents/install.sh | bash -s -- --server {base} --token-file {file} \
         --insecure --root {root} --cron {options}",
        root = root.display(),
        file = token_file.display()
    );
    Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The cron line the README gives for root's crontab.
fn readme_crontab_line() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("agents/README.md")).unwrap();
    let line = Regex::new(r"`(\* \* \* \* \* VMHC_CRON=1 [^`]+)`").unwrap();
    line.captures(&readme).unwrap()[1].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_served_by_the_server_installs_with_cron_and_uninstalls() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let root = tempfile::tempdir().unwrap();
    // A stored CPU sample far behind in idle time: the first report says the machine is
    // idle whatever a parallel build does meanwhile (this test is about the row's health).
    let state = root.path().join("var/lib/vm-healthcheck");
    std::fs::create_dir_all(&state).unwrap();
    quiet_cpu(&state);
    let options = "--interval 20 --vmid 101 --node pve1";
    let out = install(&srv.base, AGENT_TOKEN, root.path(), options);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", stderr_of(&out));
    assert!(stdout.contains("this VM now reports to"), "{stdout}");

    let conf = root.path().join("etc/vm-healthcheck/agent.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        settings,
        [
            format!("SERVER_URL={}", srv.base).as_str(),
            format!("AGENT_TOKEN={AGENT_TOKEN}").as_str(),
            "INTERVAL_SECONDS=20",
            "VMID=101",
            "NODE=pve1",
            "INSECURE=true",
            "CA_FILE=",
            "PINNED_PUBKEY=",
        ]
    );
    assert_eq!(mode_of(&conf), 0o600);
    let bin = root.path().join("usr/local/bin/vm-healthcheck-agent");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(agent_path()).unwrap()
    );
    assert_eq!(mode_of(&bin), 0o755);
    // The first report enrolled the VM: its credential is beside agent.conf, in the image.
    let credential_file = root.path().join("etc/vm-healthcheck/credential");
    let credential = std::fs::read_to_string(&credential_file).unwrap();
    assert_credential_file(&credential_file, credential.trim());
    let cron_file = root.path().join("etc/cron.d/vm-healthcheck-agent");
    let cron = std::fs::read_to_string(&cron_file).unwrap();
    let jobs: Vec<&str> = cron.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(jobs.len(), 1, "{cron}");
    // Every minute as root, output discarded, and the README's crontab line once the
    // user field and the overlap lock are taken out.
    let job = Regex::new(
        r"^(\* \* \* \* \*) root (VMHC_CRON=1) (?:flock -n /var/lib/vm-healthcheck/lock )?(/usr/local/bin/vm-healthcheck-agent --tick) >/dev/null 2>&1$",
    )
    .unwrap();
    let parts = job
        .captures(jobs[0])
        .unwrap_or_else(|| panic!("cron line: {}", jobs[0]));
    assert_eq!(
        format!("{} {} {}", &parts[1], &parts[2], &parts[3]),
        readme_crontab_line()
    );
    // The first report carried the VMID and node.
    assert_eq!(
        reported_link(&srv).await,
        (Some(101), Some("pve1".to_owned()))
    );

    // The VM is on the API and on the server-rendered dashboard.
    let hostname = hostname();
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms[0]["hostname"], hostname.as_str());
    let page = wait_for(
        "the dashboard to list the VM",
        Duration::from_secs(5),
        || async {
            let html = srv
                .http
                .get(&srv.base)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            html.contains(&format!(">{hostname}<")).then_some(html)
        },
    )
    .await;
    // The VM's own row says healthy (the summary's "Healthy" label is always there).
    let cell = page.find(&format!(">{hostname}<")).unwrap();
    let row = &page[page[..cell].rfind("<tr").unwrap()..cell];
    assert!(row.contains("status-healthy"), "{row}\n{vms}");

    // Running it again changes nothing but sending one more report, with the credential.
    let out = install(&srv.base, AGENT_TOKEN, root.path(), options);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept this VM's credential"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&credential_file).unwrap(),
        credential
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
    assert_eq!(std::fs::read_to_string(&cron_file).unwrap(), cron);
    assert_eq!(srv.vm_count().await, 1);
    assert_eq!(srv.metric_rows().await, 2);

    // With other options it updates in place; the interval defaults to 30 s.
    let out = install(&srv.base, AGENT_TOKEN, root.path(), "");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains("INTERVAL_SECONDS=30\n") && text.contains("VMID=\n"),
        "{text}"
    );
    assert_eq!(mode_of(&conf), 0o600);
    assert_eq!(std::fs::read_to_string(&cron_file).unwrap(), cron);

    let out = Command::new("bash")
        .arg(workspace_root().join("agents/install.sh"))
        .args(["--uninstall", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    for gone in [
        &conf,
        &bin,
        &cron_file,
        &root.path().join("etc/vm-healthcheck"),
        &root.path().join("var/lib/vm-healthcheck"),
    ] {
        assert!(!gone.exists(), "{} is left", gone.display());
    }
    srv.stop().await;
}

/// The installer's first report tells whether the server accepted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_says_when_the_first_report_is_not_accepted() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let root = tempfile::tempdir().unwrap();
    let out = install(&srv.base, "not-the-token", root.path(), "");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(stderr.contains("rejected the agent token"), "{stderr}");
    assert!(
        stderr.contains("the first report was not accepted"),
        "{stderr}"
    );
    assert_eq!(srv.vm_count().await, 0);
    srv.stop().await;
}

fn payload_keys(text: &str, begin: &str, end: &str, pattern: &Regex) -> BTreeSet<String> {
    let start = text
        .find(begin)
        .unwrap_or_else(|| panic!("{begin} marker missing"));
    let stop = text[start..]
        .find(end)
        .unwrap_or_else(|| panic!("{end} marker missing"))
        + start;
    pattern
        .captures_iter(&text[start..stop])
        .map(|c| c[1].to_owned())
        .collect()
}

/// Both agents send exactly the contract's field names (the Windows agent cannot run here:
/// this and the PowerShell grammar check in scripts/test.sh are what covers it).
#[test]
fn agents_send_the_contract_fields() {
    let contract: BTreeSet<String> = domain::heartbeat::CONTRACT_FIELDS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let disk_contract: BTreeSet<String> = domain::heartbeat::DISK_FIELDS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let bash = std::fs::read_to_string(agent_path()).unwrap();
    let bash_key = Regex::new(r#"\\?"([a-z_]+)\\?":"#).unwrap();
    assert_eq!(
        payload_keys(&bash, "# payload:begin", "# payload:end", &bash_key),
        contract
    );
    assert_eq!(
        payload_keys(
            &bash,
            "# payload:disk:begin",
            "# payload:disk:end",
            &bash_key
        ),
        disk_contract
    );
    let ps = std::fs::read_to_string(workspace_root().join("agents/windows-agent.ps1")).unwrap();
    let ps_key = Regex::new(r"(?m)^\s*([a-z_]+)\s*=").unwrap();
    assert_eq!(
        payload_keys(&ps, "# payload:begin", "# payload:end", &ps_key),
        contract
    );
    assert_eq!(
        payload_keys(&ps, "# payload:disk:begin", "# payload:disk:end", &ps_key),
        disk_contract
    );
}

/// A guest with more filesystems than the server keeps (ZFS mounts every dataset) sends the
/// fullest 64, not a report the server would have to trim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_filesystems_send_the_fullest_64() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    // A df stand-in listing 100 datasets, dataset i holding i of 1000 blocks.
    let bin = tempfile::tempdir().unwrap();
    let mut listing = String::from("Filesystem 1024-blocks Used Available Capacity Mounted on\n");
    for i in 0..100 {
        listing.push_str(&format!(
            "tank/ds{i} 1000 {i} {} 1% /tank/ds{i}\n",
            1000 - i
        ));
    }
    std::fs::write(state.path().join("df.out"), listing).unwrap();
    let df = bin.path().join("df");
    std::fs::write(
        &df,
        format!(
            "#!/bin/sh\ncat '{}'\n",
            state.path().join("df.out").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&df, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut agent = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &["--once"]);
    agent.env("PATH", path_with(bin.path()));
    let out = agent.output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let body = fake.bodies().pop().unwrap();
    let disks = body["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 64, "{body}");
    assert!(
        disks
            .iter()
            .all(|d| d["used_bytes"].as_i64().unwrap() >= 36 * 1024),
        "not the fullest: {body}"
    );
    assert_eq!(disks[0]["mount"], "/tank/ds99");
}

/// The agent refuses a plain http:// server unless INSECURE=true: the token and the VM's
/// credential would cross the network in clear. Nothing is sent or spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_servers_are_refused_without_insecure_and_nothing_is_sent() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    for mode in ["--once", "--tick", "--run", "--enrol"] {
        for insecure in [None, Some("false"), Some("yes")] {
            prime_cpu(state.path());
            let mut cmd = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &[mode]);
            match insecure {
                None => cmd.env_remove("INSECURE"),
                Some(value) => cmd.env("INSECURE", value),
            };
            let out = cmd.stdin(Stdio::null()).output().unwrap();
            let stderr = stderr_of(&out);
            assert!(!out.status.success(), "{mode} INSECURE={insecure:?}");
            assert!(
                stderr.contains(&format!("refusing to report to {}", fake.base))
                    && stderr.contains("cross the network in clear")
                    && stderr.contains("INSECURE=true"),
                "{mode} INSECURE={insecure:?}: {stderr}"
            );
        }
    }
    for url in ["ftp://127.0.0.1/", "127.0.0.1:3000"] {
        let out = run_agent(url, AGENT_TOKEN, state.path(), &["--once"], &[]);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains("must start with https://"),
            "{}",
            stderr_of(&out)
        );
    }
    assert_eq!(fake.hits().len(), 0, "nothing sent");
    assert_eq!(spool_files(state.path()), 0, "nothing spooled");

    // INSECURE=true in agent.conf is the operator saying so.
    let conf = state.path().join("agent.conf");
    std::fs::write(&conf, "INSECURE=true\n").unwrap();
    prime_cpu(state.path());
    let out = agent_cmd(&fake.base, AGENT_TOKEN, state.path(), &["--once"])
        .env("VMHC_AGENT_CONF", &conf)
        .env_remove("INSECURE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(fake.hits().len(), 1);
}

/// The credential file: this VM's credential and a newline, mode 0600, and no temporary
/// file left beside it.
fn assert_credential_file(file: &Path, credential: &str) {
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        format!("{credential}\n")
    );
    assert_eq!(mode_of(file), 0o600, "{}", file.display());
    let dir = file.parent().unwrap();
    let leftovers: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".credential"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new(), "temporary files left");
}

/// The answer to the first report accepted with the token carries this VM's credential: the
/// agent keeps it (0600, atomically, nowhere else) and sends it instead of the token from
/// then on, through bash's own HTTP and through curl alike. The answer's warnings are logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_from_enrolment_is_kept_and_replaces_the_token() {
    for client in ["builtin", "external"] {
        let credential = test_credential('a');
        let fake = enrolling_server(&credential);
        let state = tempfile::tempdir().unwrap();
        let extra = [("VMHC_HTTP_CLIENT", client)];
        prime_cpu(state.path());
        let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &extra);
        let stderr = stderr_of(&out);
        assert!(out.status.success(), "{client}: {stderr}");
        assert!(
            stderr.contains(r#"warning from the server: disks[3]: mount: "odd" name, dropped"#),
            "{client}: {stderr}"
        );
        assert!(stderr.contains("enrolled"), "{client}: {stderr}");
        assert!(
            !stderr.contains(&credential),
            "the credential must not be logged"
        );
        let file = state.path().join("credential");
        assert_credential_file(&file, &credential);
        // Not left in the agent's scratch copy of the answer either.
        for entry in std::fs::read_dir(state.path())
            .unwrap()
            .filter_map(Result::ok)
        {
            if entry.path() != file && entry.path().is_file() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                assert!(!text.contains(&credential), "{}", entry.path().display());
            }
        }

        // The token is not sent again: a wrong one, or none at all, changes nothing.
        for token in ["garbage-token", ""] {
            prime_cpu(state.path());
            let out = run_agent(&fake.base, token, state.path(), &["--once"], &extra);
            assert!(
                out.status.success(),
                "{client} {token:?}: {}",
                stderr_of(&out)
            );
        }
        assert_eq!(
            fake.authorizations(),
            [
                bearer(AGENT_TOKEN),
                bearer(&credential),
                bearer(&credential)
            ],
            "{client}"
        );
        assert_credential_file(&file, &credential);
    }
}

/// The real server: the first report enrols the VM and gives it its credential, which alone
/// reports from then on. Once that credential is in use, the token cannot enrol the same
/// identity again (409): the agent says so and fails, keeping the report; given its
/// credential back (--set-credential, from standard input), it replays it with the credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolment_with_the_real_server() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    prime_cpu(state.path());
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let file = state.path().join("credential");
    assert!(
        file.exists(),
        "the server's answer carried no credential: {}",
        stderr_of(&out)
    );
    let credential = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert!(
        Regex::new("^vmhc_vm_[0-9a-f]{64}$")
            .unwrap()
            .is_match(&credential),
        "{credential}"
    );
    assert_credential_file(&file, &credential);

    prime_cpu(state.path());
    let out = run_agent(&srv.base, "garbage-token", state.path(), &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(srv.vm_count().await, 1);
    assert_eq!(srv.metric_rows().await, 2);

    // The credential file is lost; the identity is enrolled by that credential.
    std::fs::remove_file(&file).unwrap();
    prime_cpu(state.path());
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &[]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("already enrolled by another credential (HTTP 409)"),
        "{stderr}"
    );
    assert!(!file.exists());
    assert_eq!(srv.metric_rows().await, 2);
    assert_eq!(spool_files(state.path()), 1, "kept for later");

    let mut set = agent_cmd(&srv.base, "", state.path(), &["--set-credential"]);
    let out = with_stdin(&mut set, &format!("{credential}\n"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_credential_file(&file, &credential);
    prime_cpu(state.path());
    let out = run_agent(&srv.base, "garbage-token", state.path(), &["--tick"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(
        srv.metric_rows().await,
        4,
        "the spooled report and the new one"
    );
    assert_eq!(srv.vm_count().await, 1);
    srv.stop().await;
}

/// `cmd` run with `input` on its standard input.
fn with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A program that exits without reading all of it closes the pipe early.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

/// A credential the server rejects (revoked, or rotated by an admin) stops the agent with a
/// clear message and a failure, in every mode; the token is never tried instead (the real
/// server would have taken it), the credential stays, and the report waits in the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_credential_fails_and_never_falls_back_to_the_token() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let stand_in = FakeServer::start(Answer::Status(401, r#"{"error":"unauthorized"}"#));
    let revoked = test_credential('d');
    for (base, client) in [
        (&srv.base, "builtin"),
        (&srv.base, "external"),
        (&stand_in.base, "builtin"),
    ] {
        let state = tempfile::tempdir().unwrap();
        let file = state.path().join("credential");
        std::fs::write(&file, format!("{revoked}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (i, mode) in ["--once", "--tick"].into_iter().enumerate() {
            prime_cpu(state.path());
            let extra = [("VMHC_HTTP_CLIENT", client)];
            let out = run_agent(base, AGENT_TOKEN, state.path(), &[mode], &extra);
            let stderr = stderr_of(&out);
            assert!(!out.status.success(), "{mode} {client}: {stderr}");
            assert!(
                stderr.contains(
                    "the server rejected this VM's credential (revoked or rotated; HTTP 401)"
                ) && stderr.contains("vm-healthcheck-agent --enrol"),
                "{mode} {client}: {stderr}"
            );
            assert!(
                !stderr.contains(&revoked),
                "the credential must not be logged"
            );
            assert_credential_file(&file, &revoked);
            assert_eq!(spool_files(state.path()), i + 1, "{mode} {client}");
        }
    }
    assert_eq!(srv.vm_count().await, 0, "the token was used");
    assert_eq!(srv.metric_rows().await, 0);
    // One request per run, not retried, and always with the credential.
    assert_eq!(
        stand_in.authorizations(),
        [bearer(&revoked), bearer(&revoked)]
    );

    // A long-running agent stops too (its unit's Restart= decides what happens next).
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("credential"), format!("{revoked}\n")).unwrap();
    prime_cpu(state.path());
    let mut run = agent_cmd(&stand_in.base, AGENT_TOKEN, state.path(), &["--run"]);
    let mut child = run
        .env("INTERVAL_SECONDS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_for("--run to stop", Duration::from_secs(20), || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(!status.success());
    assert_eq!(stand_in.hits().len(), 3);
    srv.stop().await;
}

/// 409 to the token: another credential holds this identity. Said, not retried, failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_enrolled_by_another_credential_fails_clearly() {
    let fake = FakeServer::start(Answer::Status(
        409,
        r#"{"error":"this VM's identity is already enrolled with another credential"}"#,
    ));
    let state = tempfile::tempdir().unwrap();
    for mode in ["--once", "--tick"] {
        prime_cpu(state.path());
        let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &[mode], &[]);
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains("this identity is already enrolled by another credential (HTTP 409)"),
            "{mode}: {stderr}"
        );
    }
    assert_eq!(fake.hits().len(), 2, "not retried");
    assert!(!state.path().join("credential").exists());
}

/// Reports spooled before the VM had its credential are replayed with it as soon as it has
/// one: the first replayed report enrols, everything after it carries the credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_reports_are_replayed_with_the_credential() {
    let credential = test_credential('b');
    let fake = enrolling_server(&credential);
    let state = tempfile::tempdir().unwrap();
    let report = own_report(state.path());
    let spool = state.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    for i in 1..=3 {
        std::fs::write(spool.join(format!("{i:020}-1.json")), report.to_string()).unwrap();
    }
    let before = fake.hits().len();
    prime_cpu(state.path());
    let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--tick"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(
        fake.authorizations()[before..],
        [
            bearer(AGENT_TOKEN),
            bearer(&credential),
            bearer(&credential),
            bearer(&credential),
        ]
    );

    // A server that was down while the VM had its credential: replayed with it too.
    let hangup = FakeServer::start(Answer::HangUp);
    prime_cpu(state.path());
    let out = run_agent(&hangup.base, AGENT_TOKEN, state.path(), &["--tick"], &[]);
    assert!(out.status.success());
    assert_eq!(spool_files(state.path()), 1);
    let before = fake.hits().len();
    prime_cpu(state.path());
    let out = run_agent(&fake.base, "garbage-token", state.path(), &["--tick"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(
        fake.authorizations()[before..],
        [bearer(&credential), bearer(&credential)]
    );
}

/// An admin's rotation: `--set-credential` takes the new credential from standard input,
/// never from the command line, and writes it as enrolment does. Nothing else is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_credential_reads_standard_input_only() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("credential");
    let set = |input: &str, args: &[&str]| {
        let mut all = vec!["--set-credential"];
        all.extend_from_slice(args);
        // Needs neither the server's address nor the token.
        let mut cmd = agent_cmd("", "", state.path(), &all);
        cmd.env_remove("SERVER_URL").env_remove("AGENT_TOKEN");
        with_stdin(&mut cmd, input)
    };
    let first = test_credential('1');
    let out = set(&format!("{first}\n"), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stored this VM's new credential"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_credential_file(&file, &first);
    // Replaced, without a trailing newline too.
    let second = test_credential('2');
    let out = set(&second, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_credential_file(&file, &second);

    let third = test_credential('3');
    for (input, args, message) in [
        ("", vec![third.as_str()], "never from the command line"),
        (
            "not-a-credential\n",
            vec![],
            "standard input holds no credential",
        ),
        ("", vec![], "standard input holds no credential"),
        (
            &format!("{}\n", third.to_uppercase())[..],
            vec![],
            "standard input holds no credential",
        ),
    ] {
        let out = set(input, &args);
        assert!(!out.status.success(), "{input:?} {args:?}");
        assert!(stderr_of(&out).contains(message), "{}", stderr_of(&out));
        assert_credential_file(&file, &second);
    }

    prime_cpu(state.path());
    let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(fake.authorizations(), [bearer(&second)]);

    // A file that holds no credential is not silently replaced by the token.
    std::fs::write(&file, "garbage\n").unwrap();
    let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("holds no credential"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(fake.hits().len(), 1, "nothing sent");
}

/// `--enrol` forgets the credential and enrols again with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_forgets_the_credential_and_enrols_with_the_token() {
    let fresh = test_credential('e');
    let fake = enrolling_server(&fresh);
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("credential");
    let old = test_credential('0');
    std::fs::write(&file, format!("{old}\n")).unwrap();
    // Without a token it cannot, and keeps what it has.
    let out = run_agent(&fake.base, "", state.path(), &["--enrol"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("--enrol needs AGENT_TOKEN"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{old}\n"));

    prime_cpu(state.path());
    let out = run_agent(&fake.base, AGENT_TOKEN, state.path(), &["--enrol"], &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_credential_file(&file, &fresh);
    assert_eq!(fake.authorizations(), [bearer(AGENT_TOKEN)]);
}

/// Runs agents/install.sh from the repository with `args` and `stdin`.
fn run_installer(args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("agents/install.sh"))
        .args(args);
    with_stdin(&mut cmd, stdin)
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// The installer takes the token from a file or from standard input; `--token` still works
/// but warns that the token shows in `ps` and shell history. Piped into bash, it refuses
/// `--token-stdin` (its standard input is the script itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_takes_the_token_from_a_file_or_standard_input() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{AGENT_TOKEN}\n")).unwrap();
    let token_file = token_file.display().to_string();
    for (how, stdin, warned) in [
        (vec!["--token-file", token_file.as_str()], "", false),
        (
            vec!["--token-stdin"],
            &format!("{AGENT_TOKEN}\n")[..],
            false,
        ),
        (vec!["--token", AGENT_TOKEN], "", true),
    ] {
        // A server each: every install is a first enrolment of this host.
        let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
        let root = tempfile::tempdir().unwrap();
        let root_arg = root.path().display().to_string();
        let mut args = vec![
            "--server",
            &srv.base,
            "--insecure",
            "--cron",
            "--root",
            &root_arg,
        ];
        args.extend_from_slice(&how);
        let out = run_installer(&args, stdin);
        let stderr = stderr_of(&out);
        assert!(out.status.success(), "{how:?}: {stderr}");
        assert_eq!(
            stderr.contains("--token puts the token on the command line"),
            warned,
            "{how:?}: {stderr}"
        );
        let conf =
            std::fs::read_to_string(root.path().join("etc/vm-healthcheck/agent.conf")).unwrap();
        assert!(
            conf.contains(&format!("\nAGENT_TOKEN={AGENT_TOKEN}\n")),
            "{conf}"
        );
        assert_eq!(srv.metric_rows().await, 1, "{how:?}");
        srv.stop().await;
    }

    let root = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str, &str); 4] = [
        (&[], "", "the agent token is required"),
        (
            &["--token-file", "/nonexistent/token"],
            "",
            "cannot read the token file",
        ),
        (&["--token-stdin"], "", "no token on standard input"),
        (
            &["--token-stdin", "--token-file", &token_file],
            "",
            "give the token once",
        ),
    ];
    let root_arg = root.path().display().to_string();
    for (how, stdin, message) in cases {
        let mut args = vec![
            "--server",
            "http://127.0.0.1:9",
            "--insecure",
            "--cron",
            "--root",
            &root_arg,
        ];
        args.extend_from_slice(how);
        let out = run_installer(&args, stdin);
        assert!(!out.status.success(), "{how:?}");
        assert!(
            stderr_of(&out).contains(message),
            "{how:?}: {}",
            stderr_of(&out)
        );
    }
    // Piped into bash, standard input is the rest of the script.
    let script = std::fs::read_to_string(workspace_root().join("agents/install.sh")).unwrap();
    let mut piped = Command::new("bash");
    piped.args([
        "-s",
        "--",
        "--server",
        "http://127.0.0.1:9",
        "--insecure",
        "--token-stdin",
        "--root",
        &root_arg,
    ]);
    let out = with_stdin(&mut piped, &script);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("--token-stdin needs this script saved to a file"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
}

/// The installer refuses an http:// server without --insecure: nothing is downloaded,
/// installed or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installer_refuses_http_without_insecure() {
    let fake = FakeServer::start(Answer::Status(200, "{}"));
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().display().to_string();
    let out = run_installer(
        &[
            "--server",
            &fake.base,
            "--token-stdin",
            "--cron",
            "--root",
            &root_arg,
        ],
        &format!("{AGENT_TOKEN}\n"),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("refusing the http:// server {}", fake.base))
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert_eq!(fake.hits().len(), 0);
    assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
}

/// `--sha256 HEX`: the downloaded agent must have that SHA-256, else nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_refuses_an_agent_with_another_sha256() {
    use sha2::{Digest, Sha256};
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let agent = std::fs::read(agent_path()).unwrap();
    let right = hex::encode(Sha256::digest(&agent));
    let wrong = hex::encode(Sha256::digest(b"something else"));
    let root = tempfile::tempdir().unwrap();
    let out = install(
        &srv.base,
        AGENT_TOKEN,
        root.path(),
        &format!("--sha256 {wrong}"),
    );
    let stderr = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("SHA-256 is {right}, not {wrong}")),
        "{stderr}"
    );
    assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
    assert_eq!(srv.vm_count().await, 0);

    let out = install(&srv.base, AGENT_TOKEN, root.path(), "--sha256 nothex");
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("--sha256 must be 64 hex digits"));
    assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());

    // The right one (in either case) installs.
    let out = install(
        &srv.base,
        AGENT_TOKEN,
        root.path(),
        &format!("--sha256 {}", right.to_uppercase()),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        std::fs::read(root.path().join("usr/local/bin/vm-healthcheck-agent")).unwrap(),
        agent
    );
    assert_eq!(srv.metric_rows().await, 1);
    srv.stop().await;
}

/// Standard base64 with padding (what `curl --pinnedpubkey sha256//` takes).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An HTTPS front for a plain-HTTP server, with a fresh self-signed certificate for
/// localhost: the server as it looks serving TLS itself or behind a TLS reverse proxy.
struct TlsFront {
    base: String,
    cert_pem: String,
    /// `sha256//` and the base64 SHA-256 of the certificate's public key.
    pin: String,
    /// Connections that sent anything after the handshake.
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsFront {
    async fn start(backend: &str) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use sha2::Digest;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let pin = format!(
            "sha256//{}",
            base64(&sha2::Sha256::digest(certified.key_pair.public_key_der()))
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        let backend = backend.to_owned();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted, backend) =
                    (acceptor.clone(), Arc::clone(&counted), backend.clone());
                tokio::spawn(async move {
                    // Clients that refuse the certificate are the point of some checks.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut first = [0u8; 1];
                    if !matches!(tls.read(&mut first).await, Ok(1)) {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut up = tokio::net::TcpStream::connect(&backend).await.unwrap();
                    up.write_all(&first).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        Self {
            base: format!("https://localhost:{port}"),
            cert_pem: certified.cert.pem(),
            pin,
            requests,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// https:// with a self-signed certificate: trusted through CA_FILE, or through
/// PINNED_PUBKEY alone; without either, or with another key pinned, nothing is sent (the
/// report waits in the spool, not retried in vain) and the agent says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_is_trusted_through_the_ca_file_or_the_pinned_key() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let front = TlsFront::start(srv.base.trim_start_matches("http://")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("server.pem");
    std::fs::write(&ca, &front.cert_pem).unwrap();
    let ca = ca.display().to_string();
    let other_pin = format!("sha256//{}", base64(&[7u8; 32]));
    let bare_pin = front.pin.trim_start_matches("sha256//").to_owned();
    let state = tempfile::tempdir().unwrap();
    let run = |extra: &[(&str, &str)]| {
        prime_cpu(state.path());
        let mut cmd = agent_cmd(&front.base, AGENT_TOKEN, state.path(), &["--once"]);
        cmd.env_remove("INSECURE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    let untrusted: [&[(&str, &str)]; 3] = [
        &[],
        &[("PINNED_PUBKEY", &other_pin)],
        &[("PINNED_PUBKEY", &other_pin), ("CA_FILE", &ca)],
    ];
    for (i, extra) in untrusted.into_iter().enumerate() {
        let out = run(extra);
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{extra:?}");
        assert!(
            stderr.contains("the server's certificate is not trusted")
                && stderr.contains("set CA_FILE or PINNED_PUBKEY"),
            "{extra:?}: {stderr}"
        );
        assert_eq!(
            spool_files(state.path()),
            i + 1,
            "{extra:?}: kept for later"
        );
    }
    assert_eq!(
        front.requests(),
        0,
        "nothing sent past an untrusted handshake"
    );
    assert_eq!(srv.metric_rows().await, 0);

    // Trusted: the spooled reports go out first, then the new one.
    let out = run(&[("CA_FILE", &ca)]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.metric_rows().await, 4);
    for extra in [
        &[("PINNED_PUBKEY", front.pin.as_str())][..],
        &[("PINNED_PUBKEY", bare_pin.as_str())][..],
        &[("PINNED_PUBKEY", front.pin.as_str()), ("CA_FILE", &ca)][..],
    ] {
        let out = run(extra);
        assert!(out.status.success(), "{extra:?}: {}", stderr_of(&out));
    }
    assert_eq!(srv.metric_rows().await, 7);
    let out = run(&[("PINNED_PUBKEY", "sha256//not-a-hash")]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("PINNED_PUBKEY must be"),
        "{}",
        stderr_of(&out)
    );

    // GNU wget (no curl) verifies with CA_FILE too; it cannot pin a key, and says so.
    let bin = tempfile::tempdir().unwrap();
    let real = find_in_path("wget").display().to_string();
    let path = path_without_curl(bin.path(), &format!("#!/bin/sh\nexec '{real}' \"$@\"\n"));
    let out = run(&[("PATH", &path), ("CA_FILE", &ca)]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(srv.metric_rows().await, 8);
    let out = run(&[("PATH", &path)]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("the server's certificate is not trusted (wget"),
        "{}",
        stderr_of(&out)
    );
    let out = run(&[("PATH", &path), ("PINNED_PUBKEY", &front.pin)]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("PINNED_PUBKEY needs curl"),
        "{}",
        stderr_of(&out)
    );
    srv.stop().await;
}

/// The installer over https: it downloads the agent trusting --ca-file or --pinned-pubkey
/// (and writes them to agent.conf for the agent); without either it installs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_over_https_trusts_the_ca_file_or_the_pinned_key() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    let token_file = token_file.display().to_string();
    for case in ["neither", "--ca-file", "--pinned-pubkey"] {
        // Each case its own server: a first enrolment of this host each time.
        let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
        let front = TlsFront::start(srv.base.trim_start_matches("http://")).await;
        let ca = dir.path().join("server.pem");
        std::fs::write(&ca, &front.cert_pem).unwrap();
        let ca = ca.display().to_string();
        let (trust, line) = match case {
            "--ca-file" => (vec![case, ca.as_str()], format!("CA_FILE={ca}")),
            "--pinned-pubkey" => (
                vec![case, front.pin.as_str()],
                format!("PINNED_PUBKEY={}", front.pin),
            ),
            _ => (vec![], String::new()),
        };
        let root = tempfile::tempdir().unwrap();
        let root_arg = root.path().display().to_string();
        let mut args = vec![
            "--server",
            &front.base,
            "--token-file",
            &token_file,
            "--cron",
            "--root",
            &root_arg,
        ];
        args.extend_from_slice(&trust);
        let out = run_installer(&args, "");
        if case == "neither" {
            assert!(!out.status.success());
            assert!(
                stderr_of(&out).contains("could not download"),
                "{}",
                stderr_of(&out)
            );
            assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
            assert_eq!(front.requests(), 0);
        } else {
            assert!(out.status.success(), "{case}: {}", stderr_of(&out));
            let conf =
                std::fs::read_to_string(root.path().join("etc/vm-healthcheck/agent.conf")).unwrap();
            assert!(conf.contains(&format!("\n{line}\n")), "{conf}");
            assert!(conf.contains("\nINSECURE=false\n"), "{conf}");
            // The download and the first report, both through the front.
            assert_eq!(front.requests(), 2);
            assert_eq!(srv.metric_rows().await, 1);
        }
        srv.stop().await;
    }
}

/// The admin's side with the real server: a rotated credential is refused (401), and the
/// agent says so and fails without trying the token; given the new one on standard input it
/// reports again, what it kept meanwhile first. After a revocation, `--enrol` with the token
/// gives the VM a fresh credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_and_revocation_by_an_admin() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("credential");
    let run = |token: &str, mode: &str| {
        prime_cpu(state.path());
        run_agent(&srv.base, token, state.path(), &[mode], &[])
    };
    for _ in 0..2 {
        let out = run(AGENT_TOKEN, "--once");
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let enrolled = std::fs::read_to_string(&file).unwrap();
    let vm = only_vm_id(&srv).await;
    let path = format!("/api/vms/{vm}/credential");

    let (status, body) = srv
        .send(reqwest::Method::POST, &path, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let rotated = body["credential"].as_str().unwrap().to_owned();
    let out = run(AGENT_TOKEN, "--tick");
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rejected this VM's credential (revoked or rotated"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), enrolled);
    assert_eq!(srv.metric_rows().await, 2, "the token was not used");
    assert_eq!(spool_files(state.path()), 1);

    let mut set = agent_cmd(&srv.base, "", state.path(), &["--set-credential"]);
    let out = with_stdin(&mut set, &format!("{rotated}\n"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_credential_file(&file, &rotated);
    let out = run("garbage-token", "--tick");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.metric_rows().await, 4);

    let (status, body) = srv
        .send(reqwest::Method::DELETE, &path, Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let out = run(AGENT_TOKEN, "--once");
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("rejected this VM's credential (revoked or rotated"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(srv.metric_rows().await, 4, "the token was not used");
    let out = run(AGENT_TOKEN, "--enrol");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let fresh = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_ne!(fresh, rotated);
    assert_credential_file(&file, &fresh);
    assert_eq!(
        srv.metric_rows().await,
        6,
        "the kept report and the new one"
    );
    assert_eq!(srv.vm_count().await, 1);
    srv.stop().await;
}

/// The server's own HTTPS (the certificate it generated): the agent pinned to the key in
/// `data/tls-fingerprint` reports; pinned to another key it refuses and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_pins_the_servers_own_certificate() {
    let mut srv = TestServer::start(Backend::Sqlite, &[("TLS", "auto")]).await;
    let port = srv.base.rsplit(':').next().unwrap().to_owned();
    let base = format!("https://localhost:{port}");
    let fingerprint = std::fs::read_to_string(srv.db.dir.path().join("tls-fingerprint")).unwrap();
    let pin = fingerprint
        .lines()
        .find_map(|line| line.strip_prefix("pinned_pubkey="))
        .unwrap()
        .trim()
        .to_owned();
    let state = tempfile::tempdir().unwrap();
    let run = |pin: &str| {
        prime_cpu(state.path());
        let mut cmd = agent_cmd(&base, AGENT_TOKEN, state.path(), &["--once"]);
        cmd.env_remove("INSECURE");
        cmd.env("PINNED_PUBKEY", pin);
        cmd.output().unwrap()
    };
    let other = format!("sha256//{}", base64(&[7u8; 32]));
    let out = run(&other);
    assert!(!out.status.success(), "a wrong pin was accepted");
    assert!(
        stderr_of(&out).contains("the server's certificate is not trusted"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(srv.metric_rows().await, 0, "sent past a wrong pin");
    let out = run(&pin);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        srv.metric_rows().await >= 1,
        "the pinned report was not stored"
    );
    srv.stop().await;
}
