//! The Linux agent and its installer, run for real against the real server.

use crate::common::*;
use regex_lite::Regex;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn agent_path() -> PathBuf {
    workspace_root().join("agents/linux-agent.sh")
}

/// Runs the agent with `args`, configured only through the environment.
fn run_agent(
    server_url: &str,
    token: &str,
    state_dir: &Path,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(agent_path())
        .args(args)
        .env("VMHC_AGENT_CONF", state_dir.join("no-such.conf"))
        .env("VMHC_STATE_DIR", state_dir)
        .env("SERVER_URL", server_url)
        .env("AGENT_TOKEN", token)
        .env("RETRY_DELAY_SECONDS", "0")
        .env_remove("VMID")
        .env_remove("NODE");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("bash must be installed")
}

fn spool_files(state_dir: &Path) -> usize {
    std::fs::read_dir(state_dir.join("spool"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count()
        })
        .unwrap_or(0)
}

fn meminfo_total_bytes() -> i64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<i64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_reports_sane_values() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--once"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("report accepted"));

    let (_, vms) = srv.get("/api/vms").await;
    let vm = &vms[0];
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(vm["hostname"], hostname.trim());
    assert_eq!(vm["os"], "linux");
    let cpu = vm["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu));
    assert_eq!(
        vm["ram_total_bytes"].as_i64().unwrap(),
        meminfo_total_bytes()
    );
    let used = vm["ram_used_bytes"].as_i64().unwrap();
    assert!(used > 0 && used < meminfo_total_bytes());
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((vm["uptime_seconds"].as_f64().unwrap() - uptime).abs() < 30.0);
    for disk in vm["disks"].as_array().unwrap() {
        assert!(disk["used_bytes"].as_i64().unwrap() <= disk["total_bytes"].as_i64().unwrap());
        assert!(disk["mount"].as_str().unwrap().starts_with('/'));
    }
    assert_eq!(vm["agent_version"], "1.0.0");
    assert_eq!(spool_files(state.path()), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_token_is_reported_clearly_and_not_spooled() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    let out = run_agent(&srv.base, "wrong-token", state.path(), &["--once"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected the agent token"), "{stderr}");
    assert!(
        !stderr.contains("wrong-token"),
        "the token must not be logged"
    );
    assert_eq!(spool_files(state.path()), 0);
    assert_eq!(srv.vm_count().await, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_spool_while_the_server_is_down_and_replay_in_order() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut srv = TestServer::start(Backend::Sqlite, &[("LISTEN_ADDR", &addr)]).await;
    let state = tempfile::tempdir().unwrap();
    let limits = [("SPOOL_MAX", "5"), ("RETRY_ATTEMPTS", "2")];
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
    assert!(out.status.success());
    assert_eq!(srv.metric_rows().await, 1);

    srv.stop().await;
    for _ in 0..8 {
        let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
        assert!(
            out.status.success(),
            "a tick never fails: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
    }
    assert_eq!(
        spool_files(state.path()),
        5,
        "the spool keeps the newest SPOOL_MAX reports"
    );
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--once"], &limits);
    assert!(
        !out.status.success(),
        "--once fails while the server is down"
    );
    assert_eq!(spool_files(state.path()), 5);

    let srv = TestServer::start_on(srv.db, &[("LISTEN_ADDR", &addr)]).await;
    let out = run_agent(&srv.base, AGENT_TOKEN, state.path(), &["--tick"], &limits);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(spool_files(state.path()), 0);
    // 1 before the outage, the 5 kept, the new one: each once.
    assert_eq!(srv.metric_rows().await, 7);
    let observed: Vec<i64> = {
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
    };
    assert!(
        observed.windows(2).all(|w| w[0] < w[1]),
        "replayed in order: {observed:?}"
    );
    let now = server::now_ms();
    assert!(
        observed[1] < now - 50,
        "replayed reports keep their own time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn installer_served_by_the_server_installs_with_cron_and_uninstalls() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let root = tempfile::tempdir().unwrap();
    let script = format!(
        "curl -fsSL {base}/agents/install.sh | bash -s -- --server {base} --token {AGENT_TOKEN} --root {root} --cron --interval 20",
        base = srv.base,
        root = root.path().display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("this VM now reports to"), "{stdout}");

    let conf = root.path().join("etc/vm-healthcheck/agent.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains(&format!("SERVER_URL={}", srv.base)) && text.contains("INTERVAL_SECONDS=20")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bin = root.path().join("usr/local/bin/vm-healthcheck-agent");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(agent_path()).unwrap()
    );
    let cron =
        std::fs::read_to_string(root.path().join("etc/cron.d/vm-healthcheck-agent")).unwrap();
    assert!(cron.contains("/usr/local/bin/vm-healthcheck-agent --tick"));

    // The VM is on the API and on the server-rendered dashboard.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let (_, vms) = srv.get("/api/vms").await;
    assert_eq!(vms[0]["hostname"], hostname.as_str());
    let page = wait_for(
        "the dashboard to list the VM",
        Duration::from_secs(5),
        || async {
            let html = srv
                .http
                .get(&srv.base)
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
    assert!(page.contains("Healthy"));

    // Running it again is harmless; uninstall removes what it wrote.
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(srv.vm_count().await, 1);
    let out = Command::new("bash")
        .arg(workspace_root().join("agents/install.sh"))
        .args(["--uninstall", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!conf.exists() && !bin.exists());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_stays_resident_after_a_timer_tick() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let state = tempfile::tempdir().unwrap();
    // A private copy, so its path identifies exactly this test's agent processes.
    let copy = state.path().join("agent-under-test.sh");
    std::fs::copy(agent_path(), &copy).unwrap();
    let out = Command::new("bash")
        .arg(&copy)
        .arg("--tick")
        .env("VMHC_STATE_DIR", state.path())
        .env("VMHC_AGENT_CONF", state.path().join("none"))
        .env("SERVER_URL", &srv.base)
        .env("AGENT_TOKEN", AGENT_TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success());
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !listing.contains(copy.to_str().unwrap()),
        "agent still running:\n{listing}"
    );
    assert_eq!(srv.metric_rows().await, 1);
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

/// Both agents send exactly the contract's field names.
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
