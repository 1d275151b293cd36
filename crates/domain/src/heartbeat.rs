//! The heartbeat contract: an agent's report parsed into typed values (pure, no I/O).

use crate::enums::OsKind;
use crate::ids::{NodeName, Vmid};
use crate::status::percent_of;
use crate::view::DiskUsage;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Every field of the heartbeat contract, as agents must spell them.
pub const CONTRACT_FIELDS: &[&str] = &[
    "hostname",
    "os",
    "machine_id",
    "vmid",
    "node",
    "cpu_percent",
    "ram_used_bytes",
    "ram_total_bytes",
    "disks",
    "uptime_seconds",
    "agent_version",
    "observed_at",
];
/// The fields of each entry of `disks`.
pub const DISK_FIELDS: &[&str] = &["mount", "used_bytes", "total_bytes"];

/// Largest accepted request body.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
pub const MAX_DISKS: usize = 64;
const MAX_HOSTNAME_CHARS: usize = 253;
/// Spooled reports older than this are refused rather than stored out of context.
const MAX_REPLAY_AGE_MS: i64 = 7 * 86_400_000;
/// Agent clocks ahead of ours by more than this are not trusted for `observed_at`.
const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

/// Why a report was refused, naming the field when there is one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidReport {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidReport {
    InvalidReport {
        field: field.to_owned(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
struct RawReport {
    hostname: String,
    os: String,
    #[serde(default)]
    machine_id: Option<String>,
    #[serde(default)]
    vmid: Option<i64>,
    #[serde(default)]
    node: Option<String>,
    cpu_percent: f64,
    ram_used_bytes: i64,
    ram_total_bytes: i64,
    #[serde(default)]
    disks: Option<Vec<RawDisk>>,
    uptime_seconds: i64,
    #[serde(default)]
    agent_version: Option<String>,
    #[serde(default)]
    observed_at: Option<String>,
}

#[derive(Deserialize)]
struct RawDisk {
    mount: String,
    used_bytes: i64,
    total_bytes: i64,
}

/// A heartbeat that passed every check, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub hostname: String,
    pub os: OsKind,
    /// Lower-case SMBIOS uuid.
    pub machine_id: Option<String>,
    pub vmid: Option<Vmid>,
    pub node: Option<NodeName>,
    pub agent_version: Option<String>,
    pub cpu_percent: f64,
    pub ram_used_bytes: i64,
    pub ram_total_bytes: i64,
    pub disks: Vec<DiskUsage>,
    pub disk_used_bytes: i64,
    pub disk_total_bytes: i64,
    pub disk_max_percent: Option<f64>,
    pub uptime_seconds: i64,
    /// When the agent took the sample (clamped to the server's clock).
    pub observed_ms: i64,
    /// When the server received it; liveness never trusts the agent's clock.
    pub received_ms: i64,
}

/// Parses and checks a report body received at `received_ms`.
pub fn parse_report(body: &[u8], received_ms: i64) -> Result<Heartbeat, InvalidReport> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let raw: RawReport = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            invalid("body", format!("invalid JSON: {inner}"))
        } else if path == "." {
            // Missing fields are reported at the root; serde names the field in the message.
            let field = missing_field_name(&inner.to_string()).unwrap_or_else(|| "body".into());
            invalid(&field, inner.to_string())
        } else {
            invalid(&path, inner.to_string())
        }
    })?;
    deserializer
        .end()
        .map_err(|e| invalid("body", format!("invalid JSON: {e}")))?;
    validate(raw, received_ms)
}

fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

fn validate(raw: RawReport, received_ms: i64) -> Result<Heartbeat, InvalidReport> {
    let hostname = parse_hostname(&raw.hostname)?;
    let os = raw
        .os
        .trim()
        .to_ascii_lowercase()
        .parse::<OsKind>()
        .map_err(|_unknown| invalid("os", "must be linux, windows or other"))?;
    let machine_id = parse_machine_id(raw.machine_id)?;
    let vmid = raw
        .vmid
        .map(Vmid::try_from)
        .transpose()
        .map_err(|e| invalid("vmid", e.0))?;
    let node = match raw.node.map(|n| n.trim().to_owned()) {
        None => None,
        Some(n) if n.is_empty() => None,
        Some(n) => Some(NodeName::try_from(n).map_err(|e| invalid("node", e.0))?),
    };
    check_cpu_and_ram(raw.cpu_percent, raw.ram_used_bytes, raw.ram_total_bytes)?;
    let disks = parse_disks(raw.disks.unwrap_or_default())?;
    if raw.uptime_seconds < 0 {
        return Err(invalid("uptime_seconds", "must not be negative"));
    }
    let agent_version = parse_agent_version(raw.agent_version)?;
    let observed_ms = parse_observed_at(raw.observed_at, received_ms)?;
    let (disk_used_bytes, disk_total_bytes, disk_max_percent) = disk_totals(&disks);
    Ok(Heartbeat {
        hostname,
        os,
        machine_id,
        vmid,
        node,
        agent_version,
        cpu_percent: raw.cpu_percent,
        ram_used_bytes: raw.ram_used_bytes,
        ram_total_bytes: raw.ram_total_bytes,
        disks,
        disk_used_bytes,
        disk_total_bytes,
        disk_max_percent,
        uptime_seconds: raw.uptime_seconds,
        observed_ms,
        received_ms,
    })
}

fn parse_hostname(raw: &str) -> Result<String, InvalidReport> {
    let hostname = raw.trim().to_owned();
    if hostname.is_empty() || hostname.chars().count() > MAX_HOSTNAME_CHARS {
        return Err(invalid("hostname", "must be 1 to 253 characters"));
    }
    // Letters (any script), digits, dot, hyphen and underscore: what DNS, NetBIOS and
    // systemd hostnames allow. Markup and control characters never get in.
    if !hostname
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(invalid(
            "hostname",
            "may contain only letters, digits, '.', '-' and '_'",
        ));
    }
    Ok(hostname)
}

fn parse_machine_id(raw: Option<String>) -> Result<Option<String>, InvalidReport> {
    match raw.map(|m| m.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(m) if m.is_empty() => Ok(None),
        Some(m) if is_uuid(&m) => Ok(Some(m)),
        Some(_) => Err(invalid("machine_id", "must be a UUID")),
    }
}

fn check_cpu_and_ram(cpu: f64, ram_used: i64, ram_total: i64) -> Result<(), InvalidReport> {
    if !cpu.is_finite() || !(0.0..=100.0).contains(&cpu) {
        return Err(invalid("cpu_percent", "must be between 0 and 100"));
    }
    if ram_total <= 0 {
        return Err(invalid("ram_total_bytes", "must be greater than 0"));
    }
    if ram_used < 0 || ram_used > ram_total {
        return Err(invalid(
            "ram_used_bytes",
            "must be between 0 and ram_total_bytes",
        ));
    }
    Ok(())
}

fn parse_disks(raw_disks: Vec<RawDisk>) -> Result<Vec<DiskUsage>, InvalidReport> {
    if raw_disks.len() > MAX_DISKS {
        return Err(invalid("disks", "at most 64 entries"));
    }
    let mut disks = Vec::with_capacity(raw_disks.len());
    for (i, disk) in raw_disks.into_iter().enumerate() {
        let at = |field: &str| format!("disks[{i}].{field}");
        if disk.mount.is_empty()
            || disk.mount.len() > 1024
            || disk.mount.chars().any(char::is_control)
        {
            return Err(invalid(
                &at("mount"),
                "must be 1 to 1024 printable characters",
            ));
        }
        if disk.total_bytes < 0 {
            return Err(invalid(&at("total_bytes"), "must not be negative"));
        }
        if disk.used_bytes < 0 || disk.used_bytes > disk.total_bytes {
            return Err(invalid(
                &at("used_bytes"),
                "must be between 0 and total_bytes",
            ));
        }
        disks.push(DiskUsage {
            mount: disk.mount,
            used_bytes: disk.used_bytes,
            total_bytes: disk.total_bytes,
        });
    }
    Ok(disks)
}

fn parse_agent_version(raw: Option<String>) -> Result<Option<String>, InvalidReport> {
    match raw {
        Some(v) if v.len() > 64 || v.chars().any(char::is_control) => Err(invalid(
            "agent_version",
            "must be at most 64 printable characters",
        )),
        other => Ok(other.filter(|v| !v.is_empty())),
    }
}

fn parse_observed_at(raw: Option<String>, received_ms: i64) -> Result<i64, InvalidReport> {
    let Some(text) = raw else {
        return Ok(received_ms);
    };
    let at = OffsetDateTime::parse(&text, &Rfc3339)
        .map_err(|_unparsable| invalid("observed_at", "must be an RFC 3339 time"))?;
    let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_overflow| invalid("observed_at", "is out of range"))?;
    if ms < received_ms.saturating_sub(MAX_REPLAY_AGE_MS) {
        return Err(invalid("observed_at", "is more than 7 days old"));
    }
    // A clock running ahead would make a sample look newer than it is.
    Ok(if ms > received_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
        received_ms
    } else {
        ms
    })
}

/// Used and total bytes over all filesystems, and the fullest one's usage in percent.
fn disk_totals(disks: &[DiskUsage]) -> (i64, i64, Option<f64>) {
    let used = disks
        .iter()
        .map(|d| d.used_bytes)
        .fold(0i64, i64::saturating_add);
    let total = disks
        .iter()
        .map(|d| d.total_bytes)
        .fold(0i64, i64::saturating_add);
    let max_percent = disks
        .iter()
        .filter(|d| d.total_bytes > 0)
        .map(|d| percent_of(d.used_bytes, d.total_bytes))
        .reduce(f64::max);
    (used, total, max_percent)
}

fn is_uuid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_790_000_000_000;

    fn valid() -> serde_json::Value {
        json!({
            "hostname": "web-01", "os": "linux", "cpu_percent": 12.5,
            "ram_used_bytes": 1000, "ram_total_bytes": 4000, "uptime_seconds": 60,
            "disks": [{"mount": "/", "used_bytes": 50, "total_bytes": 100},
                      {"mount": "/var", "used_bytes": 10, "total_bytes": 100}],
            "machine_id": "7D2A1C9E-0000-4000-8000-00000000ABCD", "extra": true
        })
    }

    fn field_of(value: serde_json::Value) -> String {
        parse_report(value.to_string().as_bytes(), NOW)
            .unwrap_err()
            .field
    }

    #[test]
    fn accepts_and_normalises_a_valid_report() {
        let r = parse_report(valid().to_string().as_bytes(), NOW).unwrap();
        assert_eq!(
            r.machine_id.as_deref(),
            Some("7d2a1c9e-0000-4000-8000-00000000abcd")
        );
        assert_eq!((r.disk_used_bytes, r.disk_total_bytes), (60, 200));
        assert_eq!(r.disk_max_percent, Some(50.0));
        assert_eq!(r.observed_ms, NOW);
    }

    #[test]
    fn names_the_offending_field() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("cpu_percent", json!(101)),
            ("cpu_percent", json!(-1)),
            ("cpu_percent", json!("high")),
            ("ram_total_bytes", json!(0)),
            ("hostname", json!("<script>alert(1)</script>")),
            ("hostname", json!("x".repeat(10_000))),
            ("os", json!("beos")),
            ("machine_id", json!("not-a-uuid")),
            ("vmid", json!(5)),
            ("uptime_seconds", json!(-5)),
            ("observed_at", json!("yesterday")),
        ];
        for (field, value) in cases {
            let mut body = valid();
            body[field] = value;
            assert_eq!(field_of(body), field);
        }
        let mut body = valid();
        body["ram_used_bytes"] = json!(5000);
        assert_eq!(field_of(body), "ram_used_bytes");
        let mut body = valid();
        body.as_object_mut().unwrap().remove("uptime_seconds");
        assert_eq!(field_of(body), "uptime_seconds");
        let mut body = valid();
        body["disks"][1]["used_bytes"] = json!(500);
        assert_eq!(field_of(body), "disks[1].used_bytes");
    }

    #[test]
    fn replayed_time_is_kept_and_future_time_is_clamped() {
        let mut body = valid();
        body["observed_at"] = json!("2026-09-21T14:13:20Z");
        let r = parse_report(body.to_string().as_bytes(), NOW + 60_000).unwrap();
        assert_eq!(r.observed_ms, NOW);
        let mut body = valid();
        body["observed_at"] = json!("2099-01-01T00:00:00Z");
        assert_eq!(
            parse_report(body.to_string().as_bytes(), NOW)
                .unwrap()
                .observed_ms,
            NOW
        );
    }

    #[test]
    fn bad_json_is_a_body_error() {
        for body in ["", "{", "[]", "{\"cpu_percent\": NaN}", "null"] {
            let err = parse_report(body.as_bytes(), NOW).unwrap_err();
            assert!(!err.field.is_empty(), "{body}: {err}");
        }
    }
}
