//! The settings in force (thresholds and remediation rails), shared by ingest, the scheduler,
//! the engine and the API, and the one way an admin changes them, from either door.

use crate::accounts::audit_quietly;
use crate::db::{DbError, store};
use crate::state::AppState;
use domain::VmId;
use domain::policy::RemediationConfig;
use domain::settings::{FieldError, ProxmoxCheck, RemediationTuning, Settings};
use domain::status::StatusConfig;
use proxmox::{PveError, TlsTrust};
use std::sync::{Arc, RwLock};

/// A value read by many and replaced as a whole when an admin changes it.
pub struct Shared<T>(Arc<RwLock<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Clone> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(RwLock::new(value)))
    }

    pub fn get(&self) -> T {
        match self.0.read() {
            Ok(value) => value.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, value: T) {
        match self.0.write() {
            Ok(mut current) => *current = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

pub type SharedStatusConfig = Shared<StatusConfig>;

/// The remediation configuration in force: the environment's, with the saved rails over it.
#[derive(Clone)]
pub struct SharedRemediation {
    base: Arc<RemediationConfig>,
    current: Shared<RemediationConfig>,
}

impl SharedRemediation {
    pub fn new(base: RemediationConfig) -> Self {
        Self {
            current: Shared::new(base.clone()),
            base: Arc::new(base),
        }
    }

    pub fn get(&self) -> RemediationConfig {
        self.current.get()
    }

    pub fn tuning(&self) -> RemediationTuning {
        RemediationTuning::of(&self.current.get())
    }

    /// Puts `tuning` in force over the environment's configuration.
    pub fn tune(&self, tuning: &RemediationTuning) {
        self.current.set(tuning.apply(&self.base));
    }
}

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

/// Validates, saves and applies `settings` at once, re-judging every VM under the new
/// thresholds; audited under `who` whether it was saved or refused. Returns the VMs whose
/// status changed.
pub async fn save(
    state: &AppState,
    who: &str,
    from: &str,
    settings: Settings,
) -> Result<Vec<VmId>, SettingsError> {
    let result = apply(state, &settings).await;
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

async fn apply(state: &AppState, settings: &Settings) -> Result<Vec<VmId>, SettingsError> {
    settings.validate()?;
    let now = crate::now_ms();
    let changed = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        // Rails are stored only once they differ from what is in force, so saving thresholds
        // alone never pins the environment's rails.
        let tuning =
            (settings.remediation != state.remediation.tuning()).then_some(&settings.remediation);
        store::save_settings(&mut conn, &settings.status, tuning, now).await?;
        state.status_config.set(settings.status.clone());
        state.remediation.tune(&settings.remediation);
        let rows = store::list_rows(&mut conn).await?;
        let verdicts = crate::scheduler::judge(&rows, &settings.status, now);
        store::apply_verdicts(&mut conn, &verdicts, now).await?
    };
    crate::cache::refresh(&state.db, &state.cache, &changed).await;
    Ok(changed)
}

/// Picks up settings saved by another replica (each scheduler round).
pub async fn sync(state: &AppState) -> Result<(), DbError> {
    let mut conn = state.db.conn().await?;
    if let Some(saved) = store::load_status_config(&mut conn).await?
        && saved != state.status_config.get()
    {
        state.status_config.set(saved);
    }
    if let Some(saved) = store::load_remediation_tuning(&mut conn).await?
        && saved != state.remediation.tuning()
    {
        state.remediation.tune(&saved);
    }
    Ok(())
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
    let mut lines = Vec::new();
    let Some(settings) = &state.config.proxmox else {
        return ProxmoxCheck {
            ok: false,
            lines: vec![
                "Proxmox is not configured: set PROXMOX_HOST, PROXMOX_USER, PROXMOX_TOKEN and PROXMOX_SECRET."
                    .into(),
            ],
        };
    };
    let pve = match state.engine.proxmox() {
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
