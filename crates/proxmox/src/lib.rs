//! Proxmox VE for vm-healthcheck: the `ProxmoxApi` trait the engine uses, and the real client.
//!
//! The engine sees only the trait and core types (`GuestState`, `ClusterGuest`); the wire
//! shapes stay in `types` and the HTTP details in `client`.

pub mod client;
pub mod tls;
pub mod types;

pub use client::{PveClient, PveError, PveSettings, TlsTrust};

use domain::evidence::AgentPing;
use domain::link::ClusterGuest;
use domain::policy::GuestState;
use domain::{GuestRef, NodeName, PowerAction, Vmid};
use std::future::Future;
use std::pin::Pin;

/// A boxed future of a Proxmox call, so the trait can be used as `dyn ProxmoxApi`.
pub type PveFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PveError>> + Send + 'a>>;

/// How a Proxmox task ended, or that it is still running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Stopped with `OK` or `WARNINGS: N`.
    Succeeded(String),
    /// Stopped with an error text.
    Failed(String),
}

/// Everything the remediation engine asks of Proxmox.
pub trait ProxmoxApi: Send + Sync {
    /// Every QEMU VM and LXC container of the cluster.
    fn cluster_guests(&self) -> PveFuture<'_, Vec<ClusterGuest>>;
    /// A guest's current power state, lock, template and HA flags.
    fn guest_state<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, GuestState>;
    /// The SMBIOS uuid in a QEMU VM's config, lower-case.
    fn smbios_uuid<'a>(&'a self, node: &'a NodeName, vmid: Vmid) -> PveFuture<'a, Option<String>>;
    /// Starts a power action and returns its task's UPID.
    fn power_action<'a>(
        &'a self,
        guest: &'a GuestRef,
        action: PowerAction,
    ) -> PveFuture<'a, String>;
    /// Where a task stands.
    fn task_state<'a>(&'a self, upid: &'a str) -> PveFuture<'a, TaskState>;
    /// An ACPI reboot that Proxmox abandons after `timeout_seconds` without a shutdown.
    fn graceful_reboot<'a>(
        &'a self,
        guest: &'a GuestRef,
        timeout_seconds: u64,
    ) -> PveFuture<'a, String>;
    /// A QEMU guest-agent ping; a failed ping is an answer, not an error.
    fn agent_ping<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, AgentPing>;
    /// Who we are to Proxmox: its release and our privileges on `/vms`, for the settings
    /// page's connection test. Doubles that do not script it answer "not supported".
    fn access(&self) -> PveFuture<'_, Access> {
        Box::pin(async { Err(PveError::BadRequest("not supported by this client".into())) })
    }
}

/// What the connection test learns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub version: String,
    pub privileges: std::collections::BTreeSet<String>,
}

impl ProxmoxApi for PveClient {
    fn cluster_guests(&self) -> PveFuture<'_, Vec<ClusterGuest>> {
        Box::pin(async move {
            let resources = self.cluster_vms().await?;
            Ok(resources
                .iter()
                .filter_map(types::PveResource::cluster_guest)
                .collect())
        })
    }

    fn guest_state<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, GuestState> {
        Box::pin(async move {
            let status = self.vm_status(guest).await?;
            Ok(status.guest_state(unix_ms()))
        })
    }

    fn smbios_uuid<'a>(&'a self, node: &'a NodeName, vmid: Vmid) -> PveFuture<'a, Option<String>> {
        Box::pin(self.vm_smbios_uuid(node, vmid))
    }

    fn power_action<'a>(
        &'a self,
        guest: &'a GuestRef,
        action: PowerAction,
    ) -> PveFuture<'a, String> {
        Box::pin(PveClient::power_action(self, guest, action))
    }

    fn graceful_reboot<'a>(
        &'a self,
        guest: &'a GuestRef,
        timeout_seconds: u64,
    ) -> PveFuture<'a, String> {
        Box::pin(PveClient::graceful_reboot(self, guest, timeout_seconds))
    }

    fn agent_ping<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, AgentPing> {
        Box::pin(PveClient::agent_ping(self, guest))
    }

    fn access(&self) -> PveFuture<'_, Access> {
        Box::pin(async move {
            Ok(Access {
                version: self.version().await?,
                privileges: self.privileges("/vms").await?,
            })
        })
    }

    fn task_state<'a>(&'a self, upid: &'a str) -> PveFuture<'a, TaskState> {
        Box::pin(async move {
            let task = self.task_status(upid).await?;
            Ok(if !task.is_finished() {
                TaskState::Running
            } else if task.succeeded() {
                TaskState::Succeeded(task.exitstatus.unwrap_or_default())
            } else {
                TaskState::Failed(task.exitstatus.unwrap_or_else(|| "no exit status".into()))
            })
        })
    }
}

/// Wall-clock milliseconds, for the time of a status read.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
