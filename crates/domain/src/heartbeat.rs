//! The heartbeat contract: an agent's report parsed into typed values (pure, no I/O).

use crate::enums::OsKind;
use crate::ids::{NodeName, Vmid};
use crate::status::percent_of;
use crate::view::DiskUsage;
use serde::Deserialize;
use serde_json::Value;
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
/// A sample time older than this comes from a wrong clock or a stale spool: the receive
/// time is used instead.
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

/// An optional part of a report that was dropped or replaced: the report is still stored
/// (a bad optional part must never make a live VM look dead), and the agent is told why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Warning {
    pub field: String,
    pub message: String,
}

/// A report that will be stored, and what was dropped from it on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    pub heartbeat: Heartbeat,
    pub warnings: Vec<Warning>,
}

/// Most warnings one answer lists; a report with hundreds of bad disks gets a count.
const MAX_WARNINGS: usize = 16;

/// Collects the warnings of one report.
#[derive(Default)]
struct Warnings {
    listed: Vec<Warning>,
    more: usize,
}

impl Warnings {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        if self.listed.len() < MAX_WARNINGS {
            self.listed.push(Warning {
                field: field.to_owned(),
                message: message.into(),
            });
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<Warning> {
        if self.more > 0 {
            self.listed.push(Warning {
                field: "report".into(),
                message: format!("{} more parts dropped", self.more),
            });
        }
        self.listed
    }
}

#[derive(Deserialize)]
struct RawReport {
    hostname: String,
    os: String,
    // Optional parts are read loosely: a wrong type drops the part with a warning.
    #[serde(default)]
    machine_id: Value,
    #[serde(default)]
    vmid: Value,
    #[serde(default)]
    node: Value,
    cpu_percent: f64,
    ram_used_bytes: i64,
    ram_total_bytes: i64,
    #[serde(default)]
    disks: Value,
    uptime_seconds: i64,
    #[serde(default)]
    agent_version: Value,
    #[serde(default)]
    observed_at: Value,
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

/// Parses and checks a report body received at `received_ms`. Required fields that are
/// wrong refuse the report; optional parts that are wrong are dropped with a warning.
pub fn parse_report(body: &[u8], received_ms: i64) -> Result<Accepted, InvalidReport> {
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

fn validate(raw: RawReport, received_ms: i64) -> Result<Accepted, InvalidReport> {
    let hostname = parse_hostname(&raw.hostname)?;
    let os = raw
        .os
        .trim()
        .to_ascii_lowercase()
        .parse::<OsKind>()
        .map_err(|_unknown| invalid("os", "must be linux, windows or other"))?;
    check_cpu_and_ram(raw.cpu_percent, raw.ram_used_bytes, raw.ram_total_bytes)?;
    if raw.uptime_seconds < 0 {
        return Err(invalid("uptime_seconds", "must not be negative"));
    }
    let mut warnings = Warnings::default();
    let machine_id = parse_machine_id(raw.machine_id, &mut warnings);
    let vmid = parse_vmid(raw.vmid, &mut warnings);
    let node = parse_node(raw.node, &mut warnings);
    let disks = parse_disks(raw.disks, &mut warnings);
    let agent_version = parse_agent_version(raw.agent_version, &mut warnings);
    let observed_ms = parse_observed_at(raw.observed_at, received_ms, &mut warnings);
    let (disk_used_bytes, disk_total_bytes, disk_max_percent) = disk_totals(&disks);
    let heartbeat = Heartbeat {
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
    };
    Ok(Accepted {
        heartbeat,
        warnings: warnings.finish(),
    })
}

/// The text of an optional string field; null, absent or blank is `None`.
fn optional_text(value: Value, field: &str, warnings: &mut Warnings) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
        _ => {
            warnings.add(field, "must be a string; ignored");
            None
        }
    }
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

fn parse_machine_id(value: Value, warnings: &mut Warnings) -> Option<String> {
    let text = optional_text(value, "machine_id", warnings)?.to_ascii_lowercase();
    if is_uuid(&text) {
        Some(text)
    } else {
        warnings.add("machine_id", "must be a UUID; ignored");
        None
    }
}

fn parse_vmid(value: Value, warnings: &mut Warnings) -> Option<Vmid> {
    match value {
        Value::Null => None,
        Value::Number(n) => match n.as_i64().map(Vmid::try_from) {
            Some(Ok(vmid)) => Some(vmid),
            Some(Err(e)) => {
                warnings.add("vmid", format!("{}; ignored", e.0));
                None
            }
            None => {
                warnings.add("vmid", "must be an integer; ignored");
                None
            }
        },
        _ => {
            warnings.add("vmid", "must be an integer; ignored");
            None
        }
    }
}

fn parse_node(value: Value, warnings: &mut Warnings) -> Option<NodeName> {
    let text = optional_text(value, "node", warnings)?;
    NodeName::try_from(text)
        .map_err(|e| warnings.add("node", format!("{}; ignored", e.0)))
        .ok()
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

fn parse_disks(value: Value, warnings: &mut Warnings) -> Vec<DiskUsage> {
    let entries = match value {
        Value::Null => return Vec::new(),
        Value::Array(entries) => entries,
        _ => {
            warnings.add("disks", "must be an array; ignored");
            return Vec::new();
        }
    };
    let count = entries.len();
    let mut disks: Vec<DiskUsage> = entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            parse_disk(entry)
                .map_err(|(field, message)| {
                    warnings.add(&format!("disks[{i}]{field}"), format!("{message}; dropped"));
                })
                .ok()
        })
        .collect();
    if disks.len() > MAX_DISKS {
        // The fullest filesystems are the ones the status and its warnings are about.
        disks.sort_by(|a, b| fullness(b).total_cmp(&fullness(a)));
        disks.truncate(MAX_DISKS);
        warnings.add(
            "disks",
            format!("{count} entries; kept the {MAX_DISKS} fullest"),
        );
    }
    disks
}

fn fullness(disk: &DiskUsage) -> f64 {
    if disk.total_bytes > 0 {
        percent_of(disk.used_bytes, disk.total_bytes)
    } else {
        0.0
    }
}

/// One entry of `disks`, or the sub-field that was wrong and why.
fn parse_disk(entry: Value) -> Result<DiskUsage, (String, String)> {
    let disk: RawDisk =
        serde_json::from_value(entry).map_err(|e| (String::new(), e.to_string()))?;
    if disk.mount.is_empty() || disk.mount.len() > 1024 || disk.mount.chars().any(char::is_control)
    {
        return Err((
            ".mount".into(),
            "must be 1 to 1024 printable characters".into(),
        ));
    }
    if disk.total_bytes < 0 {
        return Err((".total_bytes".into(), "must not be negative".into()));
    }
    if disk.used_bytes < 0 || disk.used_bytes > disk.total_bytes {
        return Err((
            ".used_bytes".into(),
            "must be between 0 and total_bytes".into(),
        ));
    }
    Ok(DiskUsage {
        mount: disk.mount,
        used_bytes: disk.used_bytes,
        total_bytes: disk.total_bytes,
    })
}

fn parse_agent_version(value: Value, warnings: &mut Warnings) -> Option<String> {
    let text = optional_text(value, "agent_version", warnings)?;
    if text.len() > 64 || text.chars().any(char::is_control) {
        warnings.add(
            "agent_version",
            "must be at most 64 printable characters; ignored",
        );
        return None;
    }
    Some(text)
}

/// The sample's time: the agent's when it is plausible, else the receive time.
fn parse_observed_at(value: Value, received_ms: i64, warnings: &mut Warnings) -> i64 {
    let Some(text) = optional_text(value, "observed_at", warnings) else {
        return received_ms;
    };
    let Some(ms) = OffsetDateTime::parse(&text, &Rfc3339)
        .ok()
        .and_then(|at| i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok())
    else {
        warnings.add(
            "observed_at",
            "must be an RFC 3339 time; the receive time was used",
        );
        return received_ms;
    };
    if ms < received_ms.saturating_sub(MAX_REPLAY_AGE_MS) {
        warnings.add(
            "observed_at",
            "is more than 7 days old; the receive time was used",
        );
        return received_ms;
    }
    // A clock running ahead would make a sample look newer than it is.
    if ms > received_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
        warnings.add(
            "observed_at",
            "is ahead of the server's clock; the receive time was used",
        );
        return received_ms;
    }
    ms
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

    fn accepted(value: &serde_json::Value) -> Accepted {
        parse_report(value.to_string().as_bytes(), NOW).unwrap()
    }

    #[test]
    fn accepts_and_normalises_a_valid_report() {
        let Accepted {
            heartbeat: r,
            warnings,
        } = accepted(&valid());
        assert_eq!(warnings, vec![]);
        assert_eq!(
            r.machine_id.as_deref(),
            Some("7d2a1c9e-0000-4000-8000-00000000abcd")
        );
        assert_eq!((r.disk_used_bytes, r.disk_total_bytes), (60, 200));
        assert_eq!(r.disk_max_percent, Some(50.0));
        assert_eq!(r.observed_ms, NOW);
    }

    #[test]
    fn names_the_offending_required_field() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("cpu_percent", json!(101)),
            ("cpu_percent", json!(-1)),
            ("cpu_percent", json!("high")),
            ("ram_total_bytes", json!(0)),
            ("hostname", json!("<script>alert(1)</script>")),
            ("hostname", json!("x".repeat(10_000))),
            ("os", json!("beos")),
            ("uptime_seconds", json!(-5)),
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
    }

    #[test]
    fn bad_optional_parts_are_dropped_with_a_warning() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("machine_id", json!("not-a-uuid"), "machine_id"),
            ("machine_id", json!(42), "machine_id"),
            ("vmid", json!(5), "vmid"),
            ("vmid", json!("101"), "vmid"),
            ("node", json!("pve1/../x"), "node"),
            ("agent_version", json!("v".repeat(65)), "agent_version"),
            ("observed_at", json!("yesterday"), "observed_at"),
            ("observed_at", json!("2026-08-01T00:00:00Z"), "observed_at"),
            ("disks", json!("all of them"), "disks"),
            (
                "disks",
                json!([{"mount": "/", "used_bytes": 500, "total_bytes": 100}]),
                "disks[0].used_bytes",
            ),
            (
                "disks",
                json!([{"mount": "m".repeat(2000), "used_bytes": 1, "total_bytes": 100}]),
                "disks[0].mount",
            ),
            ("disks", json!([{"mount": "/"}]), "disks[0]"),
        ];
        for (field, value, warned) in cases {
            let mut body = valid();
            body[field] = value.clone();
            let Accepted {
                heartbeat,
                warnings,
            } = accepted(&body);
            let fields: Vec<&str> = warnings.iter().map(|w| w.field.as_str()).collect();
            assert_eq!(fields, vec![warned], "{field} = {value}");
            assert_eq!(heartbeat.observed_ms, NOW, "{field} = {value}");
            match field {
                "machine_id" => assert_eq!(heartbeat.machine_id, None),
                "vmid" => assert_eq!(heartbeat.vmid, None),
                "node" => assert_eq!(heartbeat.node, None),
                "agent_version" => assert_eq!(heartbeat.agent_version, None),
                "disks" => assert_eq!(heartbeat.disks, vec![]),
                _ => {}
            }
        }
    }

    #[test]
    fn more_than_64_disks_keep_the_fullest() {
        let mut body = valid();
        body["disks"] = json!(
            (0..200)
                .map(|i| json!({"mount": format!("/d{i}"), "used_bytes": i, "total_bytes": 200}))
                .collect::<Vec<_>>()
        );
        let Accepted {
            heartbeat,
            warnings,
        } = accepted(&body);
        assert_eq!(heartbeat.disks.len(), MAX_DISKS);
        assert_eq!(heartbeat.disks[0].mount, "/d199");
        assert!(heartbeat.disks.iter().all(|d| d.used_bytes >= 136));
        assert_eq!(heartbeat.disk_max_percent, Some(99.5));
        assert_eq!(
            warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["disks: 200 entries; kept the 64 fullest"]
        );
    }

    #[test]
    fn hundreds_of_bad_parts_are_counted_not_listed() {
        let mut body = valid();
        body["disks"] = json!(vec![json!({"mount": "/"}); 300]);
        let warnings = accepted(&body).warnings;
        assert_eq!(warnings.len(), MAX_WARNINGS + 1);
        assert_eq!(
            warnings[MAX_WARNINGS].to_string(),
            "report: 284 more parts dropped"
        );
    }

    #[test]
    fn replayed_time_is_kept_and_future_time_is_clamped() {
        let mut body = valid();
        body["observed_at"] = json!("2026-09-21T14:13:20Z");
        let r = parse_report(body.to_string().as_bytes(), NOW + 60_000).unwrap();
        assert_eq!((r.heartbeat.observed_ms, r.warnings), (NOW, vec![]));
        let mut body = valid();
        body["observed_at"] = json!("2099-01-01T00:00:00Z");
        let r = accepted(&body);
        assert_eq!(r.heartbeat.observed_ms, NOW);
        assert_eq!(r.warnings[0].field, "observed_at");
    }

    #[test]
    fn bad_json_is_a_body_error() {
        for body in ["", "{", "[]", "{\"cpu_percent\": NaN}", "null"] {
            let err = parse_report(body.as_bytes(), NOW).unwrap_err();
            assert!(!err.field.is_empty(), "{body}: {err}");
        }
    }
}
