//! A real Debian guest under QEMU (TCG) for the end-to-end scenarios: one forwarded address
//! to the server under test, an SMBIOS uuid, QMP and guest-agent sockets, and the console
//! kept for diagnosis. The guest image comes from `scripts/vm-e2e.sh`.

use crate::fake_pve::{GuestBackend, GuestReading};
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Where `scripts/vm-e2e.sh --print-env` put the kernel, initrd and pristine disk.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

impl GuestImage {
    /// `None` when the image was not prepared (the scenarios are then skipped loudly).
    pub fn from_env() -> Option<Self> {
        let get = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let image = Self {
            kernel: get("VMHC_GUEST_KERNEL")?,
            initrd: get("VMHC_GUEST_INITRD")?,
            disk: get("VMHC_GUEST_DISK")?,
        };
        (image.kernel.exists() && image.initrd.exists() && image.disk.exists()).then_some(image)
    }
}

/// One running guest; QEMU is killed when it is dropped.
pub struct Guest {
    dir: tempfile::TempDir,
    child: Mutex<Option<std::process::Child>>,
    /// One QMP conversation at a time (QEMU serves one client per socket).
    qmp_lock: tokio::sync::Mutex<()>,
    qga_lock: tokio::sync::Mutex<()>,
    /// Set by a stop, cleared by a start: Proxmox then shows the guest as stopped.
    stopped: Mutex<bool>,
    /// When the guest last started (power-on, reset, start), for `uptime`.
    booted: Mutex<Instant>,
}

impl Guest {
    /// Boots the guest with its kernel command line carrying `cmdline_extra`, and one
    /// address (10.0.2.100:3000) forwarded to `server_port` on the host's loopback.
    pub fn boot(image: &GuestImage, uuid: &str, server_port: u16, cmdline_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let copied = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&image.disk)
            .arg(&disk)
            .status()
            .unwrap();
        assert!(copied.success(), "copying the guest disk");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let append = format!("root=/dev/vda rw console=ttyS0 panic=0 quiet {cmdline_extra}");
        let netdev = format!(
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:3000-cmd:socat - TCP:127.0.0.1:{server_port}"
        );
        // setpriv: QEMU dies with the test process, even one the runner kills on timeout.
        let child = std::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-m", "1024", "-smp", "1", "-no-shutdown"])
            .args(["-display", "none", "-nodefaults"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &append])
            .args([
                "-drive",
                &format!("file={},if=virtio,format=raw,id=disk0", disk.display()),
            ])
            .args(["-uuid", uuid])
            .args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=net0,id=nic0"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", path("qmp.sock")),
            ])
            .args([
                "-chardev",
                &format!(
                    "socket,path={},server=on,wait=off,id=qga0",
                    path("qga.sock")
                ),
            ])
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .args(["-serial", &format!("file:{}", path("console.log"))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.err")).unwrap())
            .spawn()
            .expect("setpriv and qemu-system-x86_64 run (scripts/vm-e2e.sh installs QEMU)");
        Self {
            dir,
            child: Mutex::new(Some(child)),
            qmp_lock: tokio::sync::Mutex::new(()),
            qga_lock: tokio::sync::Mutex::new(()),
            stopped: Mutex::new(false),
            booted: Mutex::new(Instant::now()),
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The last lines of the guest's serial console and of QEMU's own errors.
    pub fn console_tail(&self, lines: usize) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        format!(
            "--- guest console (last {lines} lines) ---\n{}\n--- qemu stderr ---\n{}",
            tail(&self.socket("console.log")),
            tail(&self.socket("qemu.err"))
        )
    }

    /// One QMP command (a fresh connection: greeting, capabilities, the command).
    pub async fn qmp(&self, execute: &str, arguments: Value) -> Result<Value, String> {
        let _one = self.qmp_lock.lock().await;
        let stream = UnixStream::connect(self.socket("qmp.sock"))
            .await
            .map_err(|e| format!("QMP socket: {e}"))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut next = async || -> Result<Value, String> {
            loop {
                let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                    .await
                    .map_err(|_elapsed| "QMP did not answer".to_owned())?
                    .map_err(|e| e.to_string())?
                    .ok_or("QMP closed")?;
                let value: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                // Events (`{"event": ...}`) may come at any time; skip them.
                if value.get("event").is_none() {
                    return Ok(value);
                }
            }
        };
        next().await?; // greeting
        for command in [
            json!({"execute": "qmp_capabilities"}),
            json!({"execute": execute, "arguments": arguments}),
        ] {
            let mut text = command.to_string();
            text.push('\n');
            write
                .write_all(text.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let answer = next().await?;
            if let Some(err) = answer.get("error") {
                return Err(err["desc"].as_str().unwrap_or("QMP error").to_owned());
            }
            if command["execute"] == execute {
                return Ok(answer["return"].clone());
            }
        }
        unreachable!("the loop returns on the command's answer")
    }

    /// One guest-agent command within `deadline`: `guest-sync` first, so an answer left over
    /// from an abandoned earlier call is not taken for this one.
    pub async fn qga(
        &self,
        execute: &str,
        arguments: Value,
        deadline: Duration,
    ) -> Result<Value, String> {
        let _one = self.qga_lock.lock().await;
        let talk = async {
            let stream = UnixStream::connect(self.socket("qga.sock"))
                .await
                .map_err(|e| format!("guest-agent socket: {e}"))?;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let id: u64 = rand_id();
            let sync = json!({"execute": "guest-sync", "arguments": {"id": id}});
            write
                .write_all(format!("{sync}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("guest agent closed")?;
                let value: Value =
                    serde_json::from_str(line.trim_start_matches('\u{ff}')).unwrap_or(Value::Null);
                if value["return"] == json!(id) {
                    break;
                }
            }
            let command = json!({"execute": execute, "arguments": arguments});
            write
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let line = lines
                .next_line()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("guest agent closed")?;
            let value: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            match value.get("error") {
                Some(err) => Err(err["desc"]
                    .as_str()
                    .unwrap_or("guest-agent error")
                    .to_owned()),
                None => Ok(value["return"].clone()),
            }
        };
        tokio::time::timeout(deadline, talk)
            .await
            .map_err(|_elapsed| "got timeout".to_owned())?
    }

    /// Runs a shell command in the guest through its agent (not waiting for it to end).
    pub async fn exec(&self, script: &str) -> Result<(), String> {
        self.qga(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", script]}),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    /// Runs a shell command in the guest and waits for it (bounded); its exit code.
    pub async fn run(&self, script: &str, deadline: Duration) -> Result<i64, String> {
        let started = self
            .qga(
                "guest-exec",
                json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}),
                Duration::from_secs(30),
            )
            .await?;
        let pid = started["pid"].clone();
        let until = Instant::now() + deadline;
        loop {
            let status = self
                .qga(
                    "guest-exec-status",
                    json!({"pid": pid}),
                    Duration::from_secs(30),
                )
                .await?;
            if status["exited"] == true {
                return Ok(status["exitcode"].as_i64().unwrap_or(-1));
            }
            if Instant::now() > until {
                return Err(format!("`{script}` still running after {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn qmp_status(&self) -> Result<String, String> {
        let status = self.qmp("query-status", json!({})).await?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Waits for QMP to say `status` (or `deadline`).
    async fn wait_status(&self, status: &str, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.qmp_status().await.as_deref() == Ok(status) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    fn mark_booted(&self, stopped: bool) {
        *self.booted.lock().unwrap() = Instant::now();
        *self.stopped.lock().unwrap() = stopped;
    }

    async fn power(&self, action: &str, timeout_seconds: Option<u64>) -> Result<(), String> {
        match action {
            "reset" => {
                self.qmp("system_reset", json!({})).await?;
                self.mark_booted(false);
            }
            "reboot" | "shutdown" => {
                // ACPI power button; a guest that does not honour it keeps running.
                self.qmp("system_powerdown", json!({})).await?;
                let wait = Duration::from_secs(timeout_seconds.unwrap_or(60));
                if !self.wait_status("shutdown", wait).await {
                    return Err("VM quit/powerdown failed - got timeout".into());
                }
                if action == "reboot" {
                    self.qmp("system_reset", json!({})).await?;
                    self.qmp("cont", json!({})).await?;
                    self.mark_booted(false);
                } else {
                    *self.stopped.lock().unwrap() = true;
                }
            }
            // Proxmox ends the QEMU process; here the vCPUs stop and a start boots afresh.
            "stop" => {
                self.qmp("stop", json!({})).await?;
                *self.stopped.lock().unwrap() = true;
            }
            "start" => {
                self.qmp("system_reset", json!({})).await?;
                self.qmp("cont", json!({})).await?;
                self.mark_booted(false);
            }
            other => return Err(format!("unknown action {other}")),
        }
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() & 0x7fff_ffff
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl GuestBackend for Guest {
    fn reading(&self) -> Boxed<'_, Result<GuestReading, String>> {
        Box::pin(async move {
            let qmp_status = self.qmp_status().await?;
            let stopped = *self.stopped.lock().unwrap() || qmp_status == "shutdown";
            let blocks = self.qmp("query-blockstats", json!({})).await?;
            let (mut read, mut written) = (0u64, 0u64);
            for device in blocks.as_array().cloned().unwrap_or_default() {
                read += device["stats"]["rd_bytes"].as_u64().unwrap_or(0);
                written += device["stats"]["wr_bytes"].as_u64().unwrap_or(0);
            }
            Ok(GuestReading {
                running: !stopped,
                qmpstatus: if stopped {
                    "stopped".into()
                } else {
                    qmp_status
                },
                uptime: self.booted.lock().unwrap().elapsed().as_secs(),
                diskread: read,
                diskwrite: written,
            })
        })
    }

    fn ping(&self) -> Boxed<'_, Result<(), String>> {
        Box::pin(async move {
            self.qga("guest-ping", json!({}), Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|e| format!("qmp command 'guest-ping' failed - {e}"))
        })
    }

    fn act<'a>(
        &'a self,
        action: &'a str,
        timeout_seconds: Option<u64>,
    ) -> Boxed<'a, Result<(), String>> {
        Box::pin(self.power(action, timeout_seconds))
    }
}
