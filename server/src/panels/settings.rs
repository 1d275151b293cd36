//! The settings page: thresholds and rails through `configure::save` (as `PUT /api/settings`),
//! retention as configured, and the Proxmox connection test (as `GET /api/proxmox/check`).

use super::Fields;
use crate::configure::{self, SettingsError};
use crate::http::ApiError;
use crate::http::extract::Actor;
use crate::state::AppState;
use domain::AutoReset;
use domain::panel::{Field, FieldKind, Form, Outcome, Panel, Section};
use domain::settings::{FieldError, RemediationTuning};
use domain::status::StatusConfig;

pub fn page(state: &AppState) -> Panel {
    let now = configure::current(state);
    let (s, r) = (&now.status, &now.remediation);
    let number =
        |name: &str, label: &str, value: String| Field::new(name, label, FieldKind::Number, value);
    let choices = AutoReset::ALL
        .iter()
        .map(|a| a.as_str().to_owned())
        .collect();
    let form = Form {
        action: "save".into(),
        submit: "Save settings".into(),
        filter: false,
        fields: vec![
            number(
                "status.cpu_threshold",
                "CPU warning above (%)",
                s.cpu_threshold.to_string(),
            ),
            number(
                "status.ram_threshold",
                "RAM warning above (%)",
                s.ram_threshold.to_string(),
            ),
            number(
                "status.disk_threshold",
                "Disk warning above (%)",
                s.disk_threshold.to_string(),
            ),
            number(
                "status.stale_timeout_ms",
                "Down after silence (ms)",
                s.stale_timeout_ms.to_string(),
            )
            .help("A VM whose last report is older than this is down."),
            number(
                "status.report_interval_seconds",
                "Agents report every (s)",
                s.report_interval_seconds.to_string(),
            ),
            Field::new(
                "remediation.auto_reset",
                "Automatic reset",
                FieldKind::Choice(choices),
                r.auto_reset.as_str(),
            )
            .help("shadow records what it would do and calls nothing."),
            number(
                "remediation.max_attempts",
                "Attempts per incident",
                r.max_attempts.to_string(),
            )
            .help("Then the VM waits for an operator (manual)."),
            number(
                "remediation.max_concurrent",
                "Power actions at once",
                r.max_concurrent.to_string(),
            ),
            number(
                "remediation.storm_percent",
                "Pause when this share is down (%)",
                r.storm_percent.to_string(),
            )
            .help("More linked VMs down at once than this looks like an outage, not hangs."),
            number(
                "remediation.veto_seconds",
                "Announce each reset for (s)",
                r.veto_seconds.to_string(),
            )
            .help("Operators can hold it meanwhile; 0 acts at once."),
        ],
    };
    let keep = &state.config.retention;
    let proxmox = match &state.config.proxmox {
        Some(pve) => format!("Proxmox: {} as {}.", pve.host, pve.token_id),
        None => "Proxmox is not configured (PROXMOX_HOST and its token).".to_owned(),
    };
    Panel {
        title: "Settings".into(),
        sections: vec![
            Section::new("Thresholds and automatic reset")
                .text("Checked whole before anything is saved; applied to every VM at once.")
                .form(form),
            Section::new("Retention").text(format!(
                "Raw samples {} days (RETENTION_RAW_DAYS), 1-minute rollups {} days \
                 (RETENTION_MINUTE_DAYS), 1-hour rollups {} days (RETENTION_HOUR_DAYS), \
                 status changes, events and reset history {} days (RETENTION_EVENTS_DAYS). \
                 Set in the server's environment.",
                keep.raw_days, keep.minute_days, keep.hour_days, keep.events_days
            )),
            Section::new("Proxmox connection").text(proxmox).form(Form {
                action: "test-proxmox".into(),
                submit: "Test Proxmox connection".into(),
                fields: Vec::new(),
                filter: false,
            }),
        ],
    }
}

pub async fn submit(
    state: &AppState,
    actor: &Actor,
    action: &str,
    fields: &Fields,
) -> Result<Outcome, ApiError> {
    match action {
        "save" => {
            let (status, tuning) = match read(fields) {
                Ok(read) => read,
                Err(err) => return Ok(Outcome::invalid(err)),
            };
            match configure::save(state, &actor.who.name, &actor.from, status, Some(tuning)).await {
                Ok(changed) => Ok(Outcome::done(format!(
                    "Saved. {} VMs changed status.",
                    changed.len()
                ))),
                Err(SettingsError::Invalid(err)) => Ok(Outcome::invalid(err)),
                Err(SettingsError::Db(err)) => Err(err.into()),
            }
        }
        "test-proxmox" => {
            let check = configure::test_proxmox(state).await;
            let head = if check.ok {
                "Every check passed."
            } else {
                "Something needs attention."
            };
            let mut outcome = Outcome::done(format!("{head}\n{}", check.lines.join("\n")));
            outcome.ok = check.ok;
            Ok(outcome)
        }
        _ => Err(ApiError::field("action", "unknown")),
    }
}

/// The form's values as settings; a value that is not a number names its field.
fn read(f: &Fields) -> Result<(StatusConfig, RemediationTuning), FieldError> {
    let status = StatusConfig {
        cpu_threshold: f.number("status.cpu_threshold")?,
        ram_threshold: f.number("status.ram_threshold")?,
        disk_threshold: f.number("status.disk_threshold")?,
        stale_timeout_ms: f.number("status.stale_timeout_ms")?,
        report_interval_seconds: f.number("status.report_interval_seconds")?,
    };
    let tuning = RemediationTuning {
        auto_reset: f
            .get("remediation.auto_reset")
            .parse()
            .map_err(|_unreadable| FieldError {
                field: "remediation.auto_reset".into(),
                message: "must be on, shadow or off".into(),
            })?,
        max_attempts: f.number("remediation.max_attempts")?,
        max_concurrent: f.number("remediation.max_concurrent")?,
        storm_percent: f.number("remediation.storm_percent")?,
        veto_seconds: f.number("remediation.veto_seconds")?,
    };
    Ok((status, tuning))
}
