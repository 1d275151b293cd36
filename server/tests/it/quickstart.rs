//! QUICKSTART.md, run as written: its `sh` blocks in order, in one bash, in an empty folder,
//! as a person at a terminal would (typing the admin's password when asked); then the
//! admin signs in and sees the machine the agent enrolled.

use crate::common::*;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "quickstart password 1";
/// The whole guide, server start and agent included, takes a few seconds.
const DEADLINE: Duration = Duration::from_secs(90);

/// The `sh` blocks of a Markdown text, in order; panics on a fence of another kind, so that
/// no command can leave the test by changing its fence.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut open: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some("sh")) => open = Some(Vec::new()),
            (None, Some(other)) => {
                panic!("QUICKSTART.md has a ```{other} block: every block must be ```sh and run")
            }
            (Some(lines), Some("")) => {
                blocks.push(lines.join("\n"));
                open = None;
            }
            (Some(lines), _) => lines.push(line),
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "QUICKSTART.md ends inside a code block");
    blocks
}

/// Ends every process the guide started (the server it leaves running in the background),
/// whatever the test's outcome: they share the process group of the bash that ran it.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_runs_as_written() {
    let guide = std::fs::read_to_string(workspace_root().join("QUICKSTART.md")).unwrap();
    let blocks = sh_blocks(&guide);
    let script = blocks.join("\n");
    // What the guide promises, so that it cannot lose a step and still pass.
    for step in [
        "user add admin --role admin",
        "healthcheck",
        "install.sh",
        "agent-token",
    ] {
        assert!(
            script.contains(step),
            "QUICKSTART.md no longer runs {step:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("quickstart.sh"),
        format!("set -euo pipefail\n{script}\n"),
    )
    .unwrap();
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .arg("quickstart.sh")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("VMHC", env!("CARGO_BIN_EXE_vm-healthcheck"))
            .env("VMHC_PORT", port.to_string())
            .current_dir(dir.path())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(log("stdout"))
            .stderr(log("stderr"))
            .spawn()
            .unwrap()
    };
    let _group = Group(child.id());
    // The person at the terminal types the admin's password when asked.
    // (A guide that ended before reading it fails below with what it printed.)
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let said = || {
        format!(
            "--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
            read("stdout"),
            read("stderr"),
            read("quickstart-data/server.log")
        )
    };
    match status {
        Some(status) => assert!(
            status.success(),
            "QUICKSTART.md failed ({status}):\n{}",
            said()
        ),
        None => panic!(
            "QUICKSTART.md still running after {DEADLINE:?}:\n{}",
            said()
        ),
    }
    assert!(!read("stdout").contains(PASSWORD) && !read("stderr").contains(PASSWORD));

    // The server it started answers over HTTPS with the certificate it made.
    let cert = std::fs::read(dir.path().join("quickstart-data/tls-cert.pem")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let login = http
        .post(format!("{base}/api/login"))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"username": "admin", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        login.status().as_u16(),
        200,
        "the admin cannot sign in:\n{}",
        said()
    );
    let cookie = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("vmhc_session="))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    let vms: Value = http
        .get(format!("{base}/api/vms"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    // Reporting: healthy, or warning while this machine is busy (a build, the other tests).
    assert!(
        vms[0]["status"] == "healthy" || vms[0]["status"] == "warning",
        "{vms:?}"
    );
    let hostname = vms[0]["hostname"].as_str().unwrap();
    let dashboard = http
        .get(format!("{base}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = format!(
        "href=\"/vms/{}\" class=\"hostname\">{hostname}</a>",
        vms[0]["id"]
    );
    assert!(dashboard.contains(&row), "{row} is not on the dashboard");
    // The setup code the first start made went with the first admin.
    assert!(!dir.path().join("quickstart-data/setup-code").exists());
}
