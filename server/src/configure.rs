//! The one way an admin changes the settings in force, from either door (`PUT /api/settings`,
//! `PUT /api/status/config`), how replicas pick up each other's changes, and the Proxmox
//! connection check.

use crate::accounts::audit_quietly;
use crate::db::DbError;
use crate::db::store;
use crate::state::AppState;
use domain::VmId;
use domain::settings::{FieldError, ProxmoxCheck, RemediationTuning, Settings};
use domain::status::StatusConfig;
use proxmox::{ProxmoxApi, PveError, PveSettings, TlsTrust};
use std::sync::Arc;

/// Why settings were not saved.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The settings in force.
pub fn current(state: &AppState) -> Settings {
    Settings {
        status: state.status_config.get(),
        remediation: state.remediation.tuning(),
    }
}

/// Checks, saves and applies new thresholds and, when given, new rails at once, then
/// re-judges every VM under the thresholds; audited under `who` whether saved or refused.
/// Rails are stored whenever given, so an explicit "off" is never dropped as "unchanged".
/// Returns the VMs whose status changed.
pub async fn save(
    state: &AppState,
    who: &str,
    from: &str,
    status: StatusConfig,
    tuning: Option<RemediationTuning>,
) -> Result<Vec<VmId>, SettingsError> {
    let settings = Settings {
        status,
        remediation: tuning.clone().unwrap_or_else(|| state.remediation.tuning()),
    };
    let result = apply(state, &settings, tuning.as_ref()).await;
    let outcome = match &result {
        Ok(changed) => format!("saved; {} VMs changed status", changed.len()),
        Err(err) => format!("refused: {err}"),
    };
    let detail = serde_json::to_string(&settings).ok();
    audit_quietly(
        state,
        who,
        "configure",
        Some("settings"),
        from,
        &outcome,
        detail.as_deref(),
    )
    .await;
    if let Ok(changed) = &result {
        tracing::info!(by = %who, changed_vms = changed.len(), settings = ?settings, "settings saved");
    }
    result
}

async fn apply(
    state: &AppState,
    settings: &Settings,
    tuning: Option<&RemediationTuning>,
) -> Result<Vec<VmId>, SettingsError> {
    // Thresholds-only saves still check the rails in force: a Settings document is valid
    // as a whole or not at all.
    if tuning.is_some() {
        settings.validate()?;
    } else {
        domain::status::validate_config(&settings.status).map_err(|e| FieldError {
            field: format!("status.{}", e.field),
            message: e.message,
        })?;
    }
    let now = crate::now_ms();
    let (mut conn, _turn) = state.db.write_conn().await?;
    {
        let _settings_turn = state.remediation.turn().await;
        store::save_settings(&mut conn, &settings.status, tuning, now).await?;
        state.status_config.set(settings.status.clone());
        if let Some(tuning) = tuning {
            state.remediation.tune(tuning);
        }
    }
    // Saved and in force: a failure to re-judge now only delays the new verdicts to the
    // scheduler's next round, so it is logged, not reported as a refusal.
    let rejudged = async {
        let rows = store::list_rows(&mut conn).await?;
        let verdicts = crate::scheduler::judge(&rows, &settings.status, now);
        store::apply_verdicts(&mut conn, &verdicts, now).await
    };
    let changed = match rejudged.await {
        Ok(changed) => changed,
        Err(err) => {
            tracing::warn!(error = %err, "settings saved; re-judging the VMs waits for the next round");
            Vec::new()
        }
    };
    drop(conn);
    crate::cache::refresh(&state.db, &state.cache, &changed).await;
    Ok(changed)
}

/// Privileges the monitor needs on `/vms`, and what each is for.
const NEEDED: &[(&str, &str)] = &[
    ("VM.Audit", "read each guest's state and config"),
    ("VM.PowerMgmt", "reboot, reset, stop and start guests"),
];
/// Privileges that make the second opinion better; either one will do.
const GUEST_AGENT: &[&str] = &[
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.Unrestricted",
    "VM.Monitor",
];

/// Asks Proxmox for its release and our privileges, and says what it found in plain words.
/// The token's secret never appears: only the host and the token's name.
pub async fn test_proxmox(state: &AppState) -> ProxmoxCheck {
    check_proxmox(state.config.proxmox.as_ref(), state.engine.proxmox()).await
}

/// [`test_proxmox`] over given settings and client (`vm-healthcheck check-proxmox` has no
/// running server).
pub async fn check_proxmox(
    settings: Option<&PveSettings>,
    client: Result<Arc<dyn ProxmoxApi>, String>,
) -> ProxmoxCheck {
    let mut lines = Vec::new();
    let Some(settings) = settings else {
        return ProxmoxCheck {
            ok: false,
            lines: vec![
                "Proxmox is not configured: set PROXMOX_HOST, PROXMOX_USER, PROXMOX_TOKEN and PROXMOX_SECRET."
                    .into(),
            ],
        };
    };
    let pve = match client {
        Ok(pve) => pve,
        Err(reason) => {
            return ProxmoxCheck {
                ok: false,
                lines: vec![format!("No Proxmox connection: {reason}.")],
            };
        }
    };
    let trusted = !matches!(settings.trust, TlsTrust::Insecure);
    lines.push(match &settings.trust {
        TlsTrust::System => "TLS: the certificate is checked against the system's trusted CAs.".into(),
        TlsTrust::CaFile(path) => format!(
            "TLS: the certificate is checked against the CA in {}.",
            path.display()
        ),
        TlsTrust::Fingerprint(_) => "TLS: the certificate is pinned by its SHA-256 fingerprint.".into(),
        TlsTrust::Insecure => "TLS: NOT verified (PROXMOX_TLS_INSECURE). Anyone on the network path could pose as Proxmox; set PROXMOX_FINGERPRINT or PROXMOX_CA_FILE.".into(),
    });
    let access = pve.access().await;
    let ok = match access {
        Ok(access) => {
            lines.push(format!(
                "Connected to {} as {}: Proxmox VE {}.",
                settings.host, settings.token_id, access.version
            ));
            let mut all = true;
            for (privilege, why) in NEEDED {
                if access.privileges.contains(*privilege) {
                    lines.push(format!("{privilege} on /vms: yes (to {why})."));
                } else {
                    all = false;
                    lines.push(format!(
                        "{privilege} on /vms: MISSING. The monitor cannot {why}; grant it to the token."
                    ));
                }
            }
            if GUEST_AGENT.iter().any(|p| access.privileges.contains(*p)) {
                lines.push(
                    "Guest-agent ping: allowed (the second opinion can ask the guest).".into(),
                );
            } else {
                lines.push("Guest-agent ping: not allowed (VM.GuestAgent.Audit on PVE 9, VM.Monitor on PVE 8); the second opinion falls back to I/O counters.".into());
            }
            all && trusted
        }
        Err(err) => {
            lines.push(match &err {
                PveError::Untrusted(why) => format!(
                    "TLS: {}'s certificate was NOT trusted ({why}). Check PROXMOX_FINGERPRINT or PROXMOX_CA_FILE; if the certificate changed, someone may be in the middle.",
                    settings.host
                ),
                PveError::Unauthorized(_) => format!(
                    "{} refused the token {} (401): check PROXMOX_USER, PROXMOX_TOKEN and PROXMOX_SECRET, and that the token is not expired.",
                    settings.host, settings.token_id
                ),
                PveError::Forbidden(why) => format!("Proxmox refused a read ({why}): grant the token VM.Audit on /vms."),
                PveError::Transient(why) => format!("Could not reach {}: {why}.", settings.host),
                other => format!("Proxmox answered unexpectedly: {other}."),
            });
            false
        }
    };
    ProxmoxCheck { ok, lines }
}
