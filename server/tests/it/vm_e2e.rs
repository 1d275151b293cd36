//! End to end on a real virtual machine: a Debian guest under QEMU installs the agent from
//! the server, reports, and is watched through the fake Proxmox driving that very guest
//! over QMP and its guest agent: agent stopped, network cut, an in-place upgrade, a reboot
//! of its own, a kernel hang and the reset that brings it back. One guest, one boot, the
//! scenarios in a row; each run's timings are appended to `target/vm-e2e-timings.jsonl`.

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm, GuestAgent};
use crate::proxmox::{env_for, history, vm};
use crate::qemu::{Guest, GuestImage};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const UUID: &str = "3f1c6a52-0c1e-4c57-9d0a-1b2c3d4e5f60";
/// Longer than a reboot of the emulated guest takes (about 45 s), so a reboot of its own
/// never looks like a hang.
const STALE_MS: u64 = 60_000;

/// Runs the scenarios; on failure the guest's console and the server's log are printed.
struct Run {
    srv: TestServer,
    fake: FakePve,
    guest: Arc<Guest>,
    log: std::path::PathBuf,
    start: Instant,
    timings: serde_json::Map<String, Value>,
    /// Set once a failure printed the diagnosis, so the drop does not print it again.
    diagnosed: std::cell::Cell<bool>,
}

/// A failure outside `until` and `check` (an unwrap, a failed QMP command) still prints the
/// guest's console and the server's log.
impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.diagnosed.get() {
            eprintln!("{}", self.diagnose("the scenario failed"));
        }
    }
}

impl Run {
    fn diagnose(&self, what: &str) -> String {
        self.diagnosed.set(true);
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!(
            "{what} (at {:?})\n{}\n--- server log (last 60 lines) ---\n{tail}\n--- Proxmox calls: {:?}",
            self.start.elapsed(),
            self.guest.console_tail(60),
            self.fake.posts()
        )
    }

    /// Polls `check` every 500 ms until it yields, or fails with the diagnosis.
    async fn until<T, F, Fut>(&self, what: &str, deadline: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let until = Instant::now() + deadline;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > until {
                panic!(
                    "{}",
                    self.diagnose(&format!("timed out waiting for {what}"))
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn check(&self, ok: bool, what: &str) {
        if !ok {
            panic!("{}", self.diagnose(what));
        }
    }

    fn time(&mut self, name: &str, d: Duration) {
        eprintln!("vm-e2e: {name}: {:.1} s", d.as_secs_f64());
        self.timings.insert(name.into(), json!(d.as_secs_f64()));
    }

    async fn the_vm(&self) -> Option<Value> {
        let (_, list) = self.srv.get("/api/vms").await;
        list.as_array()?.first().cloned()
    }

    async fn phase_is(&self, id: i64, phase: &str) -> Option<Value> {
        let v = vm(&self.srv, id).await;
        (v["remediation_phase"] == phase).then_some(v)
    }

    async fn healthy_with_uptime_below(&self, id: i64, uptime: i64) -> Option<Value> {
        let v = vm(&self.srv, id).await;
        (v["status"] == "healthy" && v["uptime_seconds"].as_i64()? < uptime).then_some(v)
    }

    /// How often the VM was judged down so far.
    async fn downs(&self, id: i64) -> usize {
        let v = vm(&self.srv, id).await;
        v["status_changes"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["to_status"] == "down").count())
    }
}

/// Writes the server's tracing output to a file the diagnosis can show.
fn log_to_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("vm-e2e-server-{}.log", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("info")
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_guest_installs_hangs_is_reset_and_recovers() {
    let image = GuestImage::from_env().expect(
        "the guest image: run the suite through scripts/test.sh, which prepares it with scripts/vm-e2e.sh",
    );
    let log = log_to_file();
    let mut vm100 = FakeVm::running(100, "pve1");
    vm100.name = "e2e-guest".into();
    vm100.smbios_uuid = Some(UUID.into());
    vm100.guest_agent = GuestAgent::NotRunning;
    let fake = FakePve::start(vec![vm100]).await;
    let stale = STALE_MS.to_string();
    let vars = env_for(
        &fake,
        &[
            ("STALE_TIMEOUT_MS", stale.as_str()),
            // An emulated CPU runs the guest's boot and installer at 100 %: not a warning here.
            ("CPU_THRESHOLD", "100"),
            ("REPORT_INTERVAL_SECONDS", "5"),
            ("SCHEDULER_INTERVAL_MS", "500"),
            ("LINK_AUTO_APPROVE", "uuid"),
            ("LINK_REFRESH_MS", "1000"),
            ("RECOVERY_TIMEOUT_MS", "180000"),
            ("RESET_BACKOFF_MS", "1000"),
            ("GRACEFUL_REBOOT_TIMEOUT_MS", "5000"),
            ("EVIDENCE_INTERVAL_MS", "3000"),
            ("GUEST_AGENT_TIMEOUT_MS", "10000"),
            ("RESET_VETO_SECONDS", "0"),
            ("TASK_TIMEOUT_MS", "60000"),
            ("LISTEN_ADDR", "127.0.0.1:0"),
        ],
    );
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let srv = TestServer::start(Backend::Postgres, &refs).await;
    let port: u16 = srv.base.rsplit(':').next().unwrap().parse().unwrap();
    let started = Instant::now();
    let guest = Arc::new(Guest::boot(
        &image,
        UUID,
        port,
        &format!("vmhc.server=http://10.0.2.100:3000 vmhc.token={AGENT_TOKEN} vmhc.interval=5"),
    ));
    fake.attach(100, guest.clone());
    let mut run = Run {
        srv,
        fake,
        guest,
        log,
        start: started,
        timings: serde_json::Map::new(),
        diagnosed: std::cell::Cell::new(false),
    };

    // 1. Power-on: the guest installs the agent from the server and enrols; the SMBIOS
    //    uuid links it to its guest.
    let first = run
        .until(
            "the guest's first report",
            Duration::from_secs(240),
            || async { run.the_vm().await.filter(|v| v["status"] == "healthy") },
        )
        .await;
    run.time("power_on_to_first_report", started.elapsed());
    let id = first["id"].as_i64().unwrap();
    let linked = run
        .until(
            "the link by SMBIOS uuid",
            Duration::from_secs(30),
            || async {
                let v = vm(&run.srv, id).await;
                (v["link_verified"] == true).then_some(v)
            },
        )
        .await;
    run.check(
        linked["proxmox_link_source"] == "smbios" && linked["proxmox_vmid"] == 100,
        &format!("linked by its SMBIOS uuid: {linked}"),
    );
    run.check(first["hostname"] == "e2e-guest", &format!("{first}"));

    // Restricted networking: the forwarded address is the guest's only way out. A listener
    // on the host (reachable as 10.0.2.2 without the restriction) gets no connection, and
    // the outside world (DNS, a public address) is unreachable.
    let bait = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let bait_port = bait.local_addr().unwrap().port();
    let tries = [
        (
            "curl -fsS -m 5 http://10.0.2.100:3000/api/health >/dev/null".to_owned(),
            true,
        ),
        (format!("curl -sS -m 5 http://10.0.2.2:{bait_port}/"), false),
        (
            format!("curl -sS -m 5 http://10.0.2.2:{port}/api/health"),
            false,
        ),
        ("curl -sS -m 5 http://deb.debian.org/".to_owned(), false),
        ("curl -sS -m 5 http://151.101.2.132/".to_owned(), false),
    ];
    for (script, reachable) in &tries {
        let code = run.guest.run(script, Duration::from_secs(30)).await;
        run.check(
            (code == Ok(0)) == *reachable,
            &format!("`{script}` from the guest: {code:?}, expected reachable={reachable}"),
        );
    }
    let touched = tokio::time::timeout(Duration::from_millis(200), bait.accept()).await;
    run.check(
        touched.is_err(),
        "the guest reached a host port it was not given",
    );

    // 6 (early, while all is well). The agent upgraded in place while it reports: no gap,
    //    no second VM.
    let reinstall = format!(
        "cd /root && umask 077 && printf '%s\\n' '{AGENT_TOKEN}' >token \
         && curl -fsS http://10.0.2.100:3000/agents/install.sh -o install.sh \
         && bash install.sh --server http://10.0.2.100:3000 --insecure --interval 5 --token-file token"
    );
    // Every second while the installer runs and for 15 s after it: still healthy, and the
    // longest wait between two reports stays near the 5 s interval (a gap would show long
    // before the 60 s stale timeout turned it down).
    let before = vm(&run.srv, id).await["last_seen_ms"].as_i64().unwrap();
    let installing = run.guest.run(&reinstall, Duration::from_secs(120));
    let installed = std::cell::Cell::new(false);
    let sampling = async {
        let (mut seen, mut longest, mut unhealthy) = (vec![before], 0, None);
        let mut upgraded_at: Option<Instant> = None;
        loop {
            let v = vm(&run.srv, id).await;
            if v["status"] != "healthy" && unhealthy.is_none() {
                unhealthy = Some(v.clone());
            }
            let last = v["last_seen_ms"].as_i64().unwrap_or_default();
            if seen.last().is_some_and(|prev| last > *prev) {
                longest = longest.max(last - seen.last().copied().unwrap_or(last));
                seen.push(last);
            }
            if upgraded_at.is_some_and(|at| at.elapsed() > Duration::from_secs(15)) {
                return (seen, longest, unhealthy);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if upgraded_at.is_none() && installed.get() {
                upgraded_at = Some(Instant::now());
            }
        }
    };
    let installing = async {
        let code = installing.await;
        installed.set(true);
        code
    };
    let (code, (seen, longest, unhealthy)) = tokio::join!(installing, sampling);
    run.check(code == Ok(0), &format!("the installer ran again: {code:?}"));
    run.check(
        unhealthy.is_none(),
        &format!("no gap during the upgrade: {unhealthy:?}"),
    );
    run.check(
        seen.len() >= 3 && longest <= 20_000,
        &format!("reports continue through the upgrade, at most 20 s apart: {seen:?}"),
    );
    run.time(
        "upgrade_longest_report_gap",
        Duration::from_millis(u64::try_from(longest).unwrap_or(0)),
    );
    run.check(
        run.srv.vm_count().await == 1,
        "no duplicate VM after the upgrade",
    );

    // 3. The agent's timer stopped inside a live guest: agent silent, guest alive.
    let stopped_at = Instant::now();
    let code = run
        .guest
        .run(
            "systemctl stop vm-healthcheck-agent.timer",
            Duration::from_secs(60),
        )
        .await;
    run.check(code == Ok(0), &format!("timer stopped: {code:?}"));
    let silent = run
        .until(
            "agent silent",
            Duration::from_millis(STALE_MS + 60_000),
            || async { run.phase_is(id, "agent_silent").await },
        )
        .await;
    run.time("agent_stopped_to_agent_silent", stopped_at.elapsed());
    run.check(
        silent["phase_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("guest agent answered"),
        &format!("the reason names the evidence: {silent}"),
    );
    run.check(
        run.fake.posts().is_empty(),
        "no power action on a live guest",
    );
    let code = run
        .guest
        .run(
            "systemctl start vm-healthcheck-agent.timer",
            Duration::from_secs(60),
        )
        .await;
    run.check(code == Ok(0), &format!("timer started: {code:?}"));
    run.until("healthy again", Duration::from_secs(60), || async {
        let v = vm(&run.srv, id).await;
        (v["status"] == "healthy" && v["remediation_phase"] == "ok").then_some(())
    })
    .await;

    // 4. The guest's link cut: down for the monitor, its guest agent still answers: no
    //    reset (a reset does not fix a network).
    let cut_at = Instant::now();
    run.guest
        .qmp("set_link", json!({"name": "nic0", "up": false}))
        .await
        .unwrap();
    let cut = run
        .until(
            "agent silent after the cut",
            Duration::from_millis(STALE_MS + 60_000),
            || async { run.phase_is(id, "agent_silent").await },
        )
        .await;
    run.time("link_cut_to_agent_silent", cut_at.elapsed());
    run.check(cut["status"] == "down", &format!("{cut}"));
    run.check(
        run.fake.posts().is_empty(),
        "no power action for a cut network",
    );
    let events = run.srv.get("/api/remediation").await.1["events"].clone();
    run.check(
        events
            .as_array()
            .is_some_and(|e| e.iter().filter(|e| e["kind"] == "agent_silent").count() == 2),
        &format!("an agent_silent event for each: {events}"),
    );
    run.guest
        .qmp("set_link", json!({"name": "nic0", "up": true}))
        .await
        .unwrap();
    run.until(
        "healthy after the link is back",
        Duration::from_secs(90),
        || async {
            let v = vm(&run.srv, id).await;
            (v["status"] == "healthy" && v["remediation_phase"] == "ok").then_some(())
        },
    )
    .await;

    // 5. The guest reboots by itself: it reports again with a smaller uptime, and no
    //    incident is opened.
    let uptime = vm(&run.srv, id).await["uptime_seconds"].as_i64().unwrap();
    let downs = run.downs(id).await;
    let rebooted_at = Instant::now();
    let _ = run.guest.exec("systemctl reboot").await;
    run.until(
        "the report after its own reboot",
        Duration::from_secs(180),
        || async { run.healthy_with_uptime_below(id, uptime).await },
    )
    .await;
    run.time("own_reboot_to_report", rebooted_at.elapsed());
    let v = vm(&run.srv, id).await;
    run.check(
        v["remediation_phase"] == "ok" && run.downs(id).await == downs,
        &format!("not judged down, no incident: {v}"),
    );
    run.check(
        run.fake.posts().is_empty(),
        "no power action for a reboot of its own",
    );
    let events = run.srv.get("/api/remediation").await.1["events"].clone();
    run.check(
        events.as_array().is_some_and(|e| {
            e.iter()
                .filter(|e| e["kind"] == "unexpected_reboot" && e["vm_id"] == id)
                .count()
                == 1
        }),
        &format!("the reboot of its own is recorded once: {events}"),
    );
    let before_hang = history(&run.srv, id).await.len();

    // 2. A kernel hang: down within the stale timeout, the evidence says hung, the ladder's
    //    ACPI reboot is ignored by the dead kernel, one reset, and the guest reports again.
    let hung_at = Instant::now();
    let _ = run.guest.exec("echo c > /proc/sysrq-trigger").await;
    // Down within the stale timeout of its last report (at most one 5 s interval before
    // the hang), plus a scheduler round and a poll.
    run.until("down", Duration::from_millis(STALE_MS + 8_000), || async {
        (vm(&run.srv, id).await["status"] == "down").then_some(())
    })
    .await;
    run.time("hang_to_down", hung_at.elapsed());
    run.until("the reset call", Duration::from_secs(120), || async {
        run.fake
            .posts()
            .contains(&"reset 100".to_owned())
            .then_some(())
    })
    .await;
    run.time("hang_to_reset_call", hung_at.elapsed());
    let reset_at = Instant::now();
    // The guest's clock may be behind after a hard reset: its uptime, not its sample
    // time, tells the server it restarted.
    let back = run
        .until(
            "the report that ends the incident",
            Duration::from_secs(180),
            || async {
                let v = vm(&run.srv, id).await;
                (v["status"] != "down" && v["remediation_phase"] == "ok").then_some(v)
            },
        )
        .await;
    run.time("reset_to_first_report", reset_at.elapsed());
    run.time("hang_to_healthy", hung_at.elapsed());
    run.check(
        run.fake.posts() == vec!["reboot 100", "reset 100"],
        "the ignored ACPI reboot, then exactly one reset",
    );
    run.check(
        back["phase_reason"]
            .as_str()
            .is_some_and(|r| r.contains("after the reset")),
        &format!("ended by the restarted guest's report: {back}"),
    );
    let uptime_after = back["uptime_seconds"].as_i64().unwrap_or(i64::MAX);
    run.check(
        u64::try_from(uptime_after).is_ok_and(|u| u <= reset_at.elapsed().as_secs() + 5),
        &format!("the report after the reset has the restarted guest's uptime: {back}"),
    );
    let h = history(&run.srv, id).await;
    let rows = &h[..h.len() - before_hang];
    run.check(
        rows.len() == 2,
        &format!("two rows for the hang, the reboot and the reset: {rows:?}"),
    );
    let reset = rows.iter().find(|r| r["action"] == "reset").cloned();
    let reboot = rows.iter().find(|r| r["action"] == "reboot").cloned();
    run.check(
        reboot.as_ref().is_some_and(|r| r["outcome"] == "failed")
            && reset.as_ref().is_some_and(|r| r["outcome"] == "ok"),
        &format!("history complete: {rows:?}"),
    );
    let evidence: Value =
        serde_json::from_str(reset.unwrap()["evidence_json"].as_str().unwrap()).unwrap();
    run.check(
        evidence["decision"]
            .as_str()
            .is_some_and(|d| d.contains("no sign of life")),
        &format!("the evidence says hung: {evidence}"),
    );
    run.check(run.srv.vm_count().await == 1, "still one VM");

    // One line per run: the runs kept on this machine give BENCHMARKS.md its medians.
    let out = workspace_root().join("target/vm-e2e-timings.jsonl");
    let mut line = Value::Object(run.timings.clone()).to_string();
    line.push('\n');
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .unwrap();
    run.srv.stop().await;
}
