//! The remediation engine: follows the policy's decisions against Proxmox, records every
//! attempt before acting, follows each task to its end, and reconciles after a crash.

pub mod link;
pub mod policy;

use crate::cache::StateCache;
use crate::config::Config;
use crate::db::incidents::{self, Expected, NewAttempt};
use crate::db::store::{self, VmRow};
use crate::db::{Db, DbError};
use crate::ingest::refresh_cache;
use crate::proxmox::{GuestKind, GuestRef, PowerAction, PveClient, PveError, PveVmStatus};
use crate::state::SharedStatusConfig;
use app::types::{RemediationPhase, RemediationSummary, VmStatus};
use policy::{Decision, Mode, RemediationConfig, Screen, VmFacts};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::AbortHandle;

/// PostgreSQL advisory lock key naming the remediation leader.
const LEADER_LOCK_KEY: i64 = 0x0076_6d68_636c_6561;

/// Why a requested action could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("remediation is unavailable: {0}")]
    Unavailable(String),
    #[error("the VM is not linked to a Proxmox guest")]
    NotLinked,
    #[error("an action is already in flight for this VM")]
    InFlight,
    #[error("not found")]
    NotFound,
    #[error("Proxmox refused: {0}")]
    Proxmox(PveError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Shared by the fleet (for the amnesty): when ingest last failed to store reports.
#[derive(Clone, Default)]
pub struct IngestHealth(Arc<AtomicI64>);

impl IngestHealth {
    pub fn record_failure(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::Release);
    }

    pub fn last_failure_ms(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

pub struct Engine {
    db: Db,
    cache: Arc<StateCache>,
    status_config: SharedStatusConfig,
    cfg: RemediationConfig,
    pve: Option<PveClient>,
    unavailable: Option<String>,
    leader: tokio::sync::Mutex<Leader>,
    ingest_health: IngestHealth,
    /// Start of the current amnesty: server start, or the end of our own outage.
    amnesty_from_ms: AtomicI64,
    last_tick_ms: AtomicI64,
    last_link_ms: AtomicI64,
    reconciled: AtomicBool,
    ticks: AtomicU64,
    storm: Mutex<Option<String>>,
    /// SMBIOS uuid per VMID (`None`: the guest has none), for zero-configuration linking.
    uuids: Mutex<std::collections::HashMap<i64, Option<String>>>,
    followers: Mutex<Vec<AbortHandle>>,
    task_timeout: Duration,
    task_poll: Duration,
    link_refresh: Duration,
}

enum Leader {
    /// SQLite: one process by construction.
    Always,
    Postgres {
        url: String,
        conn: Option<Box<diesel_async::AsyncPgConnection>>,
    },
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

impl Leader {
    /// True while this process holds the leader lock; takes it when free.
    async fn check(&mut self) -> bool {
        use diesel_async::{AsyncConnection, RunQueryDsl};
        match self {
            Leader::Always => true,
            Leader::Postgres { url, conn } => {
                if let Some(c) = conn.as_mut() {
                    // The session lock lives as long as this connection does.
                    if diesel::sql_query("SELECT TRUE AS locked")
                        .get_result::<Locked>(c)
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                    tracing::warn!("lost the remediation leader connection");
                    *conn = None;
                }
                let Ok(mut c) = diesel_async::AsyncPgConnection::establish(url).await else {
                    return false;
                };
                let got = diesel::sql_query(format!(
                    "SELECT pg_try_advisory_lock({LEADER_LOCK_KEY}) AS locked"
                ))
                .get_result::<Locked>(&mut c)
                .await
                .map(|l| l.locked)
                .unwrap_or(false);
                if got {
                    tracing::info!("this instance now leads remediation");
                    *conn = Some(Box::new(c));
                }
                got
            }
        }
    }
}

impl Engine {
    pub fn new(
        config: &Config,
        db: Db,
        cache: Arc<StateCache>,
        status_config: SharedStatusConfig,
        ingest_health: IngestHealth,
        now_ms: i64,
    ) -> anyhow::Result<Self> {
        let (pve, unavailable) = match &config.proxmox {
            None => (None, Some("PROXMOX_HOST is not set".to_owned())),
            Some(settings) => {
                if settings.trust == crate::proxmox::TlsTrust::Insecure {
                    tracing::warn!("PROXMOX_TLS_INSECURE: the Proxmox certificate is not verified; set PROXMOX_CA_FILE or PROXMOX_FINGERPRINT");
                }
                (Some(PveClient::new(settings)?), None)
            }
        };
        let leader = if config.is_postgres() {
            Leader::Postgres {
                url: config.database_url.clone(),
                conn: None,
            }
        } else {
            Leader::Always
        };
        Ok(Self {
            db,
            cache,
            status_config,
            cfg: config.remediation.clone(),
            pve,
            unavailable,
            leader: tokio::sync::Mutex::new(leader),
            ingest_health,
            amnesty_from_ms: AtomicI64::new(now_ms),
            last_tick_ms: AtomicI64::new(now_ms),
            last_link_ms: AtomicI64::new(0),
            reconciled: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            storm: Mutex::new(None),
            uuids: Mutex::new(std::collections::HashMap::new()),
            followers: Mutex::new(Vec::new()),
            task_timeout: config.task_timeout,
            task_poll: config.task_poll,
            link_refresh: config.link_refresh,
        })
    }

    /// What the dashboard and `/api/health` say about automatic remediation.
    pub fn summary(&self, now_ms: i64) -> RemediationSummary {
        let mode = match (self.cfg.enabled, self.cfg.mode) {
            (false, _) => "off",
            (true, Mode::Live) => "live",
            (true, Mode::Shadow) => "shadow",
        };
        let inactive = |reason: String| RemediationSummary {
            active: false,
            mode: mode.into(),
            reason,
        };
        if let Some(reason) = &self.unavailable {
            return inactive(format!("auto-reset off: {reason}"));
        }
        if !self.cfg.enabled {
            return inactive("auto-reset off: AUTO_RESET_ENABLED=false".into());
        }
        if let Some(storm) = self.storm.lock().ok().and_then(|s| s.clone()) {
            return inactive(format!("auto-reset paused: {storm}"));
        }
        let until = self.amnesty_until(now_ms);
        if now_ms < until {
            return inactive(format!(
                "auto-reset waits {}s after start-up or an outage",
                (until - now_ms + 999) / 1000
            ));
        }
        RemediationSummary {
            active: true,
            mode: mode.into(),
            reason: if self.cfg.mode == Mode::Shadow {
                "shadow mode: records what it would reset".into()
            } else {
                "auto-reset on".into()
            },
        }
    }

    fn amnesty_until(&self, _now_ms: i64) -> i64 {
        let from = self
            .amnesty_from_ms
            .load(Ordering::Acquire)
            .max(self.ingest_health.last_failure_ms());
        from + self.status_config.get().stale_timeout_ms
    }

    /// Ends follower tasks (server shutdown).
    pub fn shutdown(&self) {
        if let Ok(mut followers) = self.followers.lock() {
            for handle in followers.drain(..) {
                handle.abort();
            }
        }
    }

    /// Completed scheduler rounds, so callers can wait for the engine to have looked.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Acquire)
    }

    /// One scheduler round.
    pub async fn tick(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        let result = self.round(now_ms).await;
        self.ticks.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn round(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        // A frozen process (or a long pause of ours) restarts the amnesty.
        let previous = self.last_tick_ms.swap(now_ms, Ordering::AcqRel);
        let stale_timeout = self.status_config.get().stale_timeout_ms;
        if now_ms - previous > (stale_timeout / 2).max(5_000) {
            self.amnesty_from_ms.store(now_ms, Ordering::Release);
            tracing::warn!(
                gap_ms = now_ms - previous,
                "scheduler was paused; restarting the amnesty"
            );
        }
        if !self.leader.lock().await.check().await {
            return Ok(());
        }
        if !self.reconciled.swap(true, Ordering::AcqRel) {
            self.reconcile(now_ms).await?;
        }
        if self.pve.is_some()
            && now_ms - self.last_link_ms.load(Ordering::Acquire)
                >= self.link_refresh.as_millis() as i64
        {
            self.last_link_ms.store(now_ms, Ordering::Release);
            if let Err(err) = self.refresh_links().await {
                tracing::warn!(error = %err, "could not refresh Proxmox links");
            }
        }

        let rows = {
            let mut conn = self.db.conn().await?;
            store::list_rows(&mut conn).await?
        };
        let mut touched = Vec::new();
        for row in &rows {
            if let Some(step) = policy::recovery_expired(&facts(row), &self.cfg, now_ms) {
                let mut conn = self.db.conn().await?;
                if incidents::set_phase(
                    &mut conn,
                    row.id,
                    Some(RemediationPhase::Recovering),
                    step.phase,
                    None,
                    step.next_action_ms,
                    &step.reason,
                )
                .await?
                {
                    tracing::warn!(vm_id = row.id, hostname = %row.hostname, reason = %step.reason, "reset did not bring the VM back");
                    touched.push(row.id);
                }
            }
        }
        let all: Vec<VmFacts> = rows.iter().map(facts).collect();
        self.update_storm(policy::storm(&all, &self.cfg), now_ms)
            .await?;

        let blocked = self.unavailable.is_some()
            || !self.cfg.enabled
            || now_ms < self.amnesty_until(now_ms)
            || self.storm.lock().map(|s| s.is_some()).unwrap_or(true);
        if !blocked {
            let mut in_flight = all
                .iter()
                .filter(|v| v.phase == RemediationPhase::ResetPending)
                .count();
            for row in &rows {
                if policy::screen(&facts(row), now_ms) != Screen::Candidate {
                    continue;
                }
                if self.consider(row, &mut in_flight, now_ms).await? {
                    touched.push(row.id);
                }
            }
        }
        refresh_cache(&self.db, &self.cache, &touched).await;
        Ok(())
    }

    async fn update_storm(&self, storm: Option<String>, now_ms: i64) -> Result<(), DbError> {
        let previous = self.storm.lock().ok().and_then(|s| s.clone());
        if previous.is_some() == storm.is_some() {
            if let Ok(mut s) = self.storm.lock() {
                *s = storm;
            }
            return Ok(());
        }
        let mut conn = self.db.conn().await?;
        match &storm {
            Some(reason) => {
                tracing::warn!(%reason, "mass staleness: auto-reset paused");
                incidents::insert_event(
                    &mut conn,
                    "breaker_tripped",
                    None,
                    &format!("auto-reset paused: {reason}"),
                    now_ms,
                )
                .await?;
            }
            None => {
                // VMs still catching up after the storm get one stale timeout to report
                // before any of them can be reset: the same grace as after start-up.
                self.amnesty_from_ms.store(now_ms, Ordering::Release);
                tracing::info!("fleet recovered: auto-reset resumes after one stale timeout");
                incidents::insert_event(
                    &mut conn,
                    "breaker_reset",
                    None,
                    "fleet recovered: auto-reset resumes after one stale timeout",
                    now_ms,
                )
                .await?;
            }
        }
        if let Ok(mut s) = self.storm.lock() {
            *s = storm;
        }
        Ok(())
    }

    /// Asks Proxmox about one candidate and acts on the decision; true when state changed.
    async fn consider(
        self: &Arc<Self>,
        row: &VmRow,
        in_flight: &mut usize,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let Some(pve) = &self.pve else {
            return Ok(false);
        };
        let Some(guest) = guest_of(row) else {
            return Ok(false);
        };
        let (guest, status) = match self.status_following_migration(pve, row, guest).await {
            Ok(found) => found,
            Err(err) => {
                let mut conn = self.db.conn().await?;
                incidents::defer(
                    &mut conn,
                    row.id,
                    now_ms + self.cfg.recheck_ms,
                    &format!("cannot check in Proxmox: {err}"),
                )
                .await?;
                return Ok(true);
            }
        };
        let decision = policy::decide(&status, &self.cfg, *in_flight);
        let evidence = evidence_json(row, &status, now_ms);
        let mut conn = self.db.conn().await?;
        match decision {
            Decision::Reset => {
                drop(conn);
                match self
                    .execute(
                        row,
                        &guest,
                        PowerAction::Reset,
                        "scheduler",
                        None,
                        Some(evidence),
                        true,
                    )
                    .await
                {
                    Ok(_) | Err(ActionError::Proxmox(_)) => *in_flight += 1,
                    Err(ActionError::Db(e)) => return Err(e),
                    Err(_) => {}
                }
            }
            Decision::WouldReset => {
                let note =
                    decision_note(row, &guest, "shadow", "would_reset", None, evidence, now_ms);
                incidents::record_attempt(&mut conn, &note).await?;
                incidents::defer(
                    &mut conn,
                    row.id,
                    now_ms + self.cfg.recovery_timeout_ms,
                    "shadow mode: would reset",
                )
                .await?;
                tracing::info!(vm_id = row.id, hostname = %row.hostname, "shadow mode: would reset");
            }
            Decision::Wait(reason) => {
                incidents::defer(&mut conn, row.id, now_ms + self.cfg.recheck_ms, &reason).await?;
            }
            Decision::Leave(reason) => {
                // One history entry per reason, not one per look.
                if row.phase_reason.as_deref() != Some(reason.as_str()) {
                    let mode = mode_name(self.cfg.mode);
                    let note = decision_note(
                        row,
                        &guest,
                        mode,
                        "left_alone",
                        Some(reason.clone()),
                        evidence,
                        now_ms,
                    );
                    incidents::record_attempt(&mut conn, &note).await?;
                    tracing::info!(vm_id = row.id, hostname = %row.hostname, %reason, "stale VM left alone");
                }
                incidents::defer(&mut conn, row.id, now_ms + self.cfg.recheck_ms, &reason).await?;
            }
        }
        Ok(true)
    }

    /// `status/current`, re-resolving the node once if the VM migrated.
    async fn status_following_migration(
        &self,
        pve: &PveClient,
        row: &VmRow,
        guest: GuestRef,
    ) -> Result<(GuestRef, PveVmStatus), PveError> {
        match pve.vm_status(&guest).await {
            Ok(status) => Ok((guest, status)),
            Err(PveError::VmNotFound(_)) => {
                let moved = self.relocate(pve, row, &guest).await?;
                let status = pve.vm_status(&moved).await?;
                Ok((moved, status))
            }
            Err(err) => Err(err),
        }
    }

    /// Finds a guest's current node through the cluster resources and stores the new link.
    async fn relocate(
        &self,
        pve: &PveClient,
        row: &VmRow,
        guest: &GuestRef,
    ) -> Result<GuestRef, PveError> {
        let resources = pve.cluster_vms().await?;
        let found = resources
            .iter()
            .find(|r| r.vmid == guest.vmid && r.kind == guest.kind.as_str())
            .and_then(|r| r.guest())
            .ok_or_else(|| {
                PveError::VmNotFound(format!("VM {} is no longer in the cluster", guest.vmid))
            })?;
        tracing::info!(vm_id = row.id, from = %guest.node, to = %found.node, "VM migrated; link updated");
        if let Ok(mut conn) = self.db.conn().await {
            let source = row
                .proxmox_link_source
                .clone()
                .unwrap_or_else(|| "manual".into());
            let _ = incidents::set_link(
                &mut conn,
                row.id,
                Some((&found.node, found.vmid, found.kind.as_str())),
                Some(&source),
            )
            .await;
        }
        Ok(found)
    }

    /// Runs a power action: intent recorded first, then the call, then the task followed.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site per trigger; a struct would only rename them"
    )]
    async fn execute(
        self: &Arc<Self>,
        row: &VmRow,
        guest: &GuestRef,
        action: PowerAction,
        trigger: &str,
        requested_by: Option<String>,
        evidence: Option<String>,
        automatic: bool,
    ) -> Result<i64, ActionError> {
        // Containers have no reset: the closest action is a reboot.
        let action = match (guest.kind, action) {
            (GuestKind::Lxc, PowerAction::Reset) => PowerAction::Reboot,
            (_, action) => action,
        };
        let pve = self.pve.as_ref().ok_or_else(|| {
            ActionError::Unavailable(self.unavailable.clone().unwrap_or_default())
        })?;
        let now_ms = crate::now_ms();
        let expected = Expected {
            phase: RemediationPhase::parse(&row.remediation_phase),
            attempts: row.incident_attempts,
        };
        let intent = attempt(
            row,
            guest,
            action.as_str(),
            trigger,
            requested_by,
            "live",
            "pending",
            None,
            evidence,
            now_ms,
        );
        let reason = format!("{} requested by {trigger}", action.as_str());
        let attempt_id = {
            let mut conn = self.db.conn().await?;
            incidents::begin_attempt(&mut conn, &expected, automatic, &reason, &intent)
                .await?
                .ok_or(ActionError::InFlight)?
        };
        let attempts = expected.attempts + i64::from(automatic);
        tracing::warn!(vm_id = row.id, hostname = %row.hostname, node = %guest.node, vmid = guest.vmid, action = action.as_str(), trigger, "sending power action to Proxmox");
        let sent = match pve.power_action(guest, action).await {
            Err(PveError::VmNotFound(_)) => match self.relocate(pve, row, guest).await {
                Ok(moved) => pve.power_action(&moved, action).await,
                Err(err) => Err(err),
            },
            other => other,
        };
        match sent {
            Ok(upid) => {
                let mut conn = self.db.conn().await?;
                incidents::mark_sent(&mut conn, attempt_id, &upid, crate::now_ms()).await?;
                drop(conn);
                self.spawn_follower(attempt_id, row.id, upid, action, attempts, automatic);
                refresh_cache(&self.db, &self.cache, &[row.id]).await;
                Ok(attempt_id)
            }
            Err(err) => {
                tracing::error!(vm_id = row.id, error = %err, "Proxmox refused the power action");
                let mut conn = self.db.conn().await?;
                incidents::finish_attempt(
                    &mut conn,
                    attempt_id,
                    "failed",
                    Some(&err.to_string()),
                    crate::now_ms(),
                )
                .await?;
                self.after_failure(
                    &mut conn,
                    row.id,
                    attempts,
                    automatic,
                    &format!("{} failed: {err}", action.as_str()),
                )
                .await?;
                refresh_cache(&self.db, &self.cache, &[row.id]).await;
                Err(ActionError::Proxmox(err))
            }
        }
    }

    async fn after_failure(
        &self,
        conn: &mut crate::db::Conn,
        vm_id: i64,
        attempts: i64,
        automatic: bool,
        what: &str,
    ) -> Result<(), DbError> {
        if automatic {
            let step = policy::after_failed_attempt(attempts, &self.cfg, crate::now_ms(), what);
            incidents::set_phase(
                conn,
                vm_id,
                Some(RemediationPhase::ResetPending),
                step.phase,
                None,
                step.next_action_ms,
                &step.reason,
            )
            .await?;
        } else {
            incidents::set_phase(
                conn,
                vm_id,
                Some(RemediationPhase::ResetPending),
                RemediationPhase::Ok,
                None,
                None,
                what,
            )
            .await?;
        }
        Ok(())
    }

    fn spawn_follower(
        self: &Arc<Self>,
        attempt_id: i64,
        vm_id: i64,
        upid: String,
        action: PowerAction,
        attempts: i64,
        automatic: bool,
    ) {
        let engine = self.clone();
        let handle = tokio::spawn(async move {
            if let Err(err) = engine
                .follow(attempt_id, vm_id, &upid, action, attempts, automatic)
                .await
            {
                tracing::error!(attempt_id, error = %err, "could not record a task's outcome");
            }
        });
        if let Ok(mut followers) = self.followers.lock() {
            followers.retain(|h| !h.is_finished());
            followers.push(handle.abort_handle());
        }
    }

    /// Polls the task until it stops (or the deadline) and moves the incident on.
    async fn follow(
        &self,
        attempt_id: i64,
        vm_id: i64,
        upid: &str,
        action: PowerAction,
        attempts: i64,
        automatic: bool,
    ) -> Result<(), DbError> {
        let Some(pve) = &self.pve else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.task_timeout;
        let outcome = loop {
            match pve.task_status(upid).await {
                Ok(task) if task.is_finished() => {
                    break Ok(task.exitstatus.unwrap_or_default()).and_then(|s| {
                        if s == "OK" || s.starts_with("WARNINGS") {
                            Ok(s)
                        } else {
                            Err(s)
                        }
                    })
                }
                Ok(_) => {}
                Err(err) if err.is_transient() => {}
                Err(err) => break Err(format!("cannot follow the task: {err}")),
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(format!(
                    "task still running after {}s",
                    self.task_timeout.as_secs()
                ));
            }
            tokio::time::sleep(self.task_poll).await;
        };
        let now_ms = crate::now_ms();
        let mut conn = self.db.conn().await?;
        match outcome {
            Ok(exit) => {
                incidents::finish_attempt(&mut conn, attempt_id, "ok", None, now_ms).await?;
                let (phase, reason) = match action {
                    PowerAction::Shutdown | PowerAction::Stop => (
                        RemediationPhase::Ok,
                        format!("{} done by an operator", action.as_str()),
                    ),
                    _ => (
                        RemediationPhase::Recovering,
                        format!(
                            "{} done (task {exit}); waiting for a heartbeat",
                            action.as_str()
                        ),
                    ),
                };
                incidents::set_phase(
                    &mut conn,
                    vm_id,
                    Some(RemediationPhase::ResetPending),
                    phase,
                    None,
                    None,
                    &reason,
                )
                .await?;
                tracing::info!(vm_id, upid, "Proxmox task finished OK");
            }
            Err(error) => {
                incidents::finish_attempt(&mut conn, attempt_id, "failed", Some(&error), now_ms)
                    .await?;
                tracing::error!(vm_id, upid, %error, "Proxmox task failed");
                self.after_failure(
                    &mut conn,
                    vm_id,
                    attempts,
                    automatic,
                    &format!("{} task failed: {error}", action.as_str()),
                )
                .await?;
            }
        }
        drop(conn);
        refresh_cache(&self.db, &self.cache, &[vm_id]).await;
        Ok(())
    }

    /// After a restart: follow tasks that were sent, and treat intents without a UPID as
    /// possibly sent, so the recovery window applies instead of a second reset.
    async fn reconcile(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        let open = {
            let mut conn = self.db.conn().await?;
            incidents::unfinished_attempts(&mut conn).await?
        };
        for item in open {
            let automatic = item.trigger_source == "scheduler";
            let action = match item.action.as_str() {
                "shutdown" => PowerAction::Shutdown,
                "reboot" => PowerAction::Reboot,
                _ => PowerAction::Reset,
            };
            match (&item.upid, &self.pve) {
                (Some(upid), Some(_)) => {
                    tracing::info!(
                        attempt_id = item.id,
                        upid,
                        "resuming to follow a task after restart"
                    );
                    let attempts = {
                        let mut conn = self.db.conn().await?;
                        store::get_vm(&mut conn, item.vm_id)
                            .await?
                            .map(|v| v.incident_attempts)
                            .unwrap_or(1)
                    };
                    self.spawn_follower(
                        item.id,
                        item.vm_id,
                        upid.clone(),
                        action,
                        attempts,
                        automatic,
                    );
                }
                _ => {
                    let mut conn = self.db.conn().await?;
                    incidents::finish_attempt(&mut conn, item.id, "interrupted", Some("the server stopped before Proxmox confirmed the request; treated as sent"), now_ms).await?;
                    incidents::set_phase(
                        &mut conn,
                        item.vm_id,
                        Some(RemediationPhase::ResetPending),
                        RemediationPhase::Recovering,
                        None,
                        None,
                        "interrupted by a restart; waiting for a heartbeat",
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Refreshes every VM's Proxmox link (see `link`).
    async fn refresh_links(&self) -> Result<(), anyhow::Error> {
        let Some(pve) = &self.pve else {
            return Ok(());
        };
        let resources = pve.cluster_vms().await?;
        let rows = {
            let mut conn = self.db.conn().await?;
            store::list_rows(&mut conn).await?
        };
        // SMBIOS uuids rarely change: each guest's config is read once, then kept while the
        // guest exists, so a large cluster costs one config call per new guest.
        let mut uuids = self.uuids.lock().map(|u| u.clone()).unwrap_or_default();
        uuids.retain(|vmid, _| resources.iter().any(|r| r.vmid == *vmid));
        if rows.iter().any(|r| {
            r.machine_id.is_some()
                && r.reported_vmid.is_none()
                && r.proxmox_link_source.as_deref() != Some("manual")
        }) {
            let unknown: Vec<&crate::proxmox::PveResource> = resources
                .iter()
                .filter(|r| r.kind == "qemu" && !r.template && !uuids.contains_key(&r.vmid))
                .collect();
            for res in unknown {
                match pve.vm_smbios_uuid(&res.node, res.vmid).await {
                    Ok(uuid) => {
                        uuids.insert(res.vmid, uuid);
                    }
                    Err(err) => {
                        tracing::debug!(vmid = res.vmid, error = %err, "no config for uuid matching")
                    }
                }
            }
        }
        if let Ok(mut cached) = self.uuids.lock() {
            cached.clone_from(&uuids);
        }
        let uuids: std::collections::HashMap<i64, String> = uuids
            .into_iter()
            .filter_map(|(vmid, uuid)| Some((vmid, uuid?)))
            .collect();
        let mut changed = Vec::new();
        let mut conn = self.db.conn().await?;
        for row in &rows {
            let current = guest_of(row).map(|g| (g.node, g.vmid, g.kind));
            let found = link::resolve(row, &resources, &uuids);
            let wanted = found
                .as_ref()
                .map(|(g, _)| (g.node.clone(), g.vmid, g.kind));
            if wanted != current
                && (found.is_some() || row.proxmox_link_source.as_deref() != Some("manual"))
            {
                let link = found
                    .as_ref()
                    .map(|(g, _)| (g.node.as_str(), g.vmid, g.kind.as_str()));
                incidents::set_link(&mut conn, row.id, link, found.as_ref().map(|(_, s)| *s))
                    .await?;
                changed.push(row.id);
            }
        }
        drop(conn);
        refresh_cache(&self.db, &self.cache, &changed).await;
        Ok(())
    }

    /// An operator's reset or shutdown, through the same path as automatic ones.
    pub async fn manual_action(
        self: &Arc<Self>,
        vm_id: i64,
        action: PowerAction,
        requested_by: &str,
    ) -> Result<i64, ActionError> {
        if let Some(reason) = &self.unavailable {
            return Err(ActionError::Unavailable(reason.clone()));
        }
        let row = {
            let mut conn = self.db.conn().await?;
            store::get_row(&mut conn, vm_id)
                .await?
                .ok_or(ActionError::NotFound)?
        };
        if RemediationPhase::parse(&row.remediation_phase) == RemediationPhase::ResetPending {
            return Err(ActionError::InFlight);
        }
        let guest = guest_of(&row).ok_or(ActionError::NotLinked)?;
        self.execute(
            &row,
            &guest,
            action,
            "admin",
            Some(requested_by.to_owned()),
            None,
            false,
        )
        .await
    }

    /// Clears a latched `manual` state.
    pub async fn acknowledge(&self, vm_id: i64) -> Result<bool, DbError> {
        let mut conn = self.db.conn().await?;
        let cleared = incidents::set_phase(
            &mut conn,
            vm_id,
            Some(RemediationPhase::Manual),
            RemediationPhase::Ok,
            Some(0),
            None,
            "acknowledged by an operator",
        )
        .await?;
        drop(conn);
        refresh_cache(&self.db, &self.cache, &[vm_id]).await;
        Ok(cleared)
    }
}

fn facts(row: &VmRow) -> VmFacts {
    VmFacts {
        id: row.id,
        status: VmStatus::parse(&row.status),
        node: row.proxmox_node.clone(),
        linked: guest_of(row).is_some(),
        auto_reset: row.auto_reset,
        phase: RemediationPhase::parse(&row.remediation_phase),
        attempts: row.incident_attempts,
        next_action_ms: row.next_action_ms,
        last_reset_ms: row.last_reset_ms,
    }
}

fn guest_of(row: &VmRow) -> Option<GuestRef> {
    Some(GuestRef {
        node: row.proxmox_node.clone()?,
        vmid: row.proxmox_vmid?,
        kind: GuestKind::parse(row.proxmox_type.as_deref()?)?,
    })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Live => "live",
        Mode::Shadow => "shadow",
    }
}

fn evidence_json(row: &VmRow, status: &PveVmStatus, now_ms: i64) -> String {
    serde_json::json!({
        "decided_at_ms": now_ms,
        "last_heartbeat_ms": row.last_seen_ms,
        "silent_for_ms": row.last_seen_ms.map(|t| now_ms - t),
        "last_uptime_seconds": row.uptime_seconds,
        "proxmox": {
            "status": status.status,
            "qmpstatus": status.qmpstatus,
            "lock": status.lock,
            "ha_managed": status.ha_managed(),
            "uptime": status.uptime,
        }
    })
    .to_string()
}

/// A history row for what the scheduler decided about a stale VM without acting.
fn decision_note(
    row: &VmRow,
    guest: &GuestRef,
    mode: &str,
    outcome: &str,
    error: Option<String>,
    evidence: String,
    now_ms: i64,
) -> NewAttempt {
    attempt(
        row,
        guest,
        "reset",
        "scheduler",
        None,
        mode,
        outcome,
        error,
        Some(evidence),
        now_ms,
    )
}

#[expect(
    clippy::too_many_arguments,
    reason = "a plain constructor for one history row"
)]
fn attempt(
    row: &VmRow,
    guest: &GuestRef,
    action: &str,
    trigger: &str,
    requested_by: Option<String>,
    mode: &str,
    outcome: &str,
    error: Option<String>,
    evidence: Option<String>,
    now_ms: i64,
) -> NewAttempt {
    NewAttempt {
        vm_id: row.id,
        action: action.into(),
        trigger_source: trigger.into(),
        requested_by,
        mode: mode.into(),
        proxmox_node: Some(guest.node.clone()),
        proxmox_vmid: Some(guest.vmid),
        upid: None,
        outcome: outcome.into(),
        error,
        evidence_json: evidence,
        created_ms: now_ms,
        sent_ms: None,
        finished_ms: None,
    }
}
