//! Proxmox API shapes, deserialised leniently: booleans come as 0/1, numbers sometimes as strings.

use domain::evidence::{IoCounters, StatusSample};
use domain::link::ClusterGuest;
use domain::policy::{GuestPower, GuestState};
use domain::{GuestKind, GuestRef, NodeName, Vmid};
use serde::{Deserialize, Deserializer};

/// One entry of `/cluster/resources?type=vm`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PveResource {
    #[serde(deserialize_with = "lenient_i64")]
    pub vmid: i64,
    pub node: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default)]
    pub hastate: Option<String>,
    /// `prod;web`: the guest's tags as Proxmox keeps them.
    #[serde(default)]
    pub tags: Option<String>,
}

impl PveResource {
    /// Where the guest lives; `None` for a type, node or VMID this client does not know.
    pub fn guest(&self) -> Option<GuestRef> {
        Some(GuestRef {
            node: self.node.parse::<NodeName>().ok()?,
            vmid: Vmid::try_from(self.vmid).ok()?,
            kind: self.kind.parse::<GuestKind>().ok()?,
        })
    }

    /// The core's view of this guest, for link resolution.
    pub fn cluster_guest(&self) -> Option<ClusterGuest> {
        Some(ClusterGuest {
            guest: self.guest()?,
            name: self.name.clone(),
            template: self.template,
            tags: self
                .tags
                .as_deref()
                .map(domain::link::proxmox_tags)
                .unwrap_or_default(),
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HaStatus {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub managed: bool,
}

/// `status/current` of one guest.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PveVmStatus {
    pub status: String,
    #[serde(default)]
    pub qmpstatus: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
    #[serde(default)]
    pub ha: Option<HaStatus>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub uptime: Option<i64>,
    /// QEMU guest agent enabled in the config.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub agent: bool,
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub diskread: Option<i64>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub diskwrite: Option<i64>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub netin: Option<i64>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub netout: Option<i64>,
}

impl PveVmStatus {
    pub fn ha_managed(&self) -> bool {
        self.ha.as_ref().is_some_and(|h| h.managed)
    }

    /// Running and not paused or suspended (QEMU reports those through qmpstatus).
    pub fn is_running(&self) -> bool {
        self.status == "running" && self.qmpstatus.as_deref().is_none_or(|q| q == "running")
    }

    /// The I/O counters, when Proxmox gave all four.
    fn io(&self) -> Option<IoCounters> {
        let count = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok());
        Some(IoCounters {
            diskread: count(self.diskread)?,
            diskwrite: count(self.diskwrite)?,
            netin: count(self.netin)?,
            netout: count(self.netout)?,
        })
    }

    /// The core's view of this status, for the remediation policy; `at_ms` is when it was read.
    pub fn guest_state(&self, at_ms: i64) -> GuestState {
        let fault = self
            .qmpstatus
            .as_deref()
            .filter(|q| matches!(*q, "io-error" | "internal-error"));
        let power = if self.status == "stopped" {
            GuestPower::Stopped
        } else if let Some(q) = fault {
            GuestPower::Fault(q.to_owned())
        } else if let Some(q) = self.qmpstatus.as_deref().filter(|q| *q != "running") {
            GuestPower::Suspended(q.to_owned())
        } else if self.status != "running" {
            GuestPower::Other(self.status.clone())
        } else {
            GuestPower::Running
        };
        GuestState {
            power,
            lock: self.lock.clone(),
            template: self.template,
            ha_managed: self.ha_managed(),
            uptime_seconds: self.uptime,
            agent_configured: self.agent,
            sample: StatusSample {
                at_ms,
                cpu: self.cpu,
                qmpstatus: self.qmpstatus.clone(),
                uptime: self.uptime,
                io: self.io(),
            },
        }
    }
}

/// One entry of a node's task list (`GET /nodes/{node}/tasks`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PveTaskEntry {
    pub upid: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    pub starttime: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PveVmConfig {
    #[serde(default)]
    pub smbios1: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PveTaskStatus {
    pub status: String,
    #[serde(default)]
    pub exitstatus: Option<String>,
}

impl PveTaskStatus {
    pub fn is_finished(&self) -> bool {
        self.status == "stopped"
    }

    /// `OK` and `WARNINGS: N` count as success.
    pub fn succeeded(&self) -> bool {
        self.exitstatus
            .as_deref()
            .is_some_and(|s| s == "OK" || s.starts_with("WARNINGS"))
    }
}

/// The uuid in an `smbios1` property string (`uuid=...,manufacturer=...`), lower-case.
pub fn smbios_uuid(smbios1: &str) -> Option<String> {
    smbios1
        .split(',')
        .find_map(|part| part.trim().strip_prefix("uuid="))
        .map(|u| u.trim().to_ascii_lowercase())
        .filter(|u| !u.is_empty())
}

/// The node named in a UPID (`UPID:node:pid:pstart:starttime:type:id:user:`).
pub fn upid_node(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next()? == "UPID").then_some(())?;
    parts.next().filter(|n| !n.is_empty())
}

/// The user (with its token, `root@pam!monitor`) that started the task named by `upid`.
pub fn upid_user(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next()? == "UPID").then_some(())?;
    parts.nth(6).filter(|u| !u.is_empty())
}

fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => b,
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|v| v != 0.0),
        serde_json::Value::String(s) => matches!(s.as_str(), "1" | "true" | "yes"),
        _ => false,
    })
}

fn lenient_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        // Whole numbers sent as floats (`12.0`); a fraction is not a count.
        serde_json::Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0)
                .and_then(|f| format!("{f:.0}").parse().ok())
        }),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

fn lenient_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    lenient_opt_i64(d)?.ok_or_else(|| serde::de::Error::custom("expected a number"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;

    #[test]
    fn parses_lenient_shapes() {
        let r: PveResource = serde_json::from_str(
            r#"{"id":"qemu/100","vmid":"100","node":"pve1","type":"qemu","status":"running","template":0,"lock":"backup","hastate":"started"}"#,
        )
        .unwrap();
        assert_eq!(r.vmid, 100);
        assert!(!r.template);
        assert_eq!(r.guest().unwrap().kind, GuestKind::Qemu);
        let s: PveVmStatus = serde_json::from_str(
            r#"{"status":"running","qmpstatus":"paused","ha":{"managed":1},"uptime":"12"}"#,
        )
        .unwrap();
        assert!(s.ha_managed());
        assert!(!s.is_running());
        assert_eq!(
            s.guest_state(0).power,
            GuestPower::Suspended("paused".into())
        );
        assert_eq!(s.uptime, Some(12));
    }

    #[test]
    fn smbios_and_upid() {
        assert_eq!(
            smbios_uuid("manufacturer=QEMU,uuid=7D2A1C3E-4B5F-4A6B-9C8D-1E2F3A4B5C6D").as_deref(),
            Some("7d2a1c3e-4b5f-4a6b-9c8d-1e2f3a4b5c6d")
        );
        assert_eq!(smbios_uuid("manufacturer=QEMU"), None);
        assert_eq!(
            upid_node("UPID:pve2:000A1B2C:0123ABCD:66A1B2C3:qmreset:100:root@pam!ci:"),
            Some("pve2")
        );
        assert_eq!(upid_node("nonsense"), None);
        assert_eq!(
            upid_user("UPID:pve2:000A1B2C:0123ABCD:66A1B2C3:qmreset:100:root@pam!ci:"),
            Some("root@pam!ci")
        );
        assert_eq!(upid_user("UPID:pve2:000A1B2C"), None);
        let t = PveTaskStatus {
            status: "stopped".into(),
            exitstatus: Some("WARNINGS: 2".into()),
        };
        assert!(t.succeeded());
        let t = PveTaskStatus {
            status: "stopped".into(),
            exitstatus: Some("VM is locked (backup)".into()),
        };
        assert!(!t.succeeded());
    }
}
