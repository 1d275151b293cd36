//! The remediation engine: each round screens stale VMs, asks Proxmox, applies the core's
//! decision through the executor, and keeps the fleet-wide rails (leader, breaker, amnesty).

mod breaker;
mod executor;
mod inspection;
mod leader;
mod linker;

use crate::cache::{self, StateCache};
use crate::clock::Clock;
use crate::config::Config;
use crate::db::incidents::{self, NewAttempt};
use crate::db::notify as notify_store;
use crate::db::store::{self, VmRow};
use crate::db::{Db, DbError};
use crate::health::JobHealth;
use crate::settings::{SharedRemediation, SharedStatusConfig};
use breaker::Guard;
use domain::maintenance;
use domain::policy::{self, Decision, RemediationConfig, Screen, VmFacts};
use domain::view::RemediationSummary;
use domain::{
    AttemptId, AttemptOutcome, EventKind, GuestRef, Mode, PowerAction, RemediationPhase,
    TriggerSource, VmId,
};
use executor::Executor;
pub use leader::Leader;
use linker::Linker;
use proxmox::{ProxmoxApi, PveClient, PveError, TlsTrust};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Why a requested action could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("remediation is unavailable: {0}")]
    Unavailable(String),
    #[error("the VM is not linked to a Proxmox guest")]
    NotLinked,
    #[error("the VM's Proxmox link is a proposal waiting for approval")]
    LinkPending,
    #[error("an action is already in flight for this VM")]
    InFlight,
    #[error("no automatic action is announced for this VM (none was, or it was already sent)")]
    NothingAnnounced,
    #[error("the VM is not waiting for an operator (manual, agent silent or guest fault)")]
    NothingLatched,
    #[error("not found")]
    NotFound,
    /// The proposal differs from what the operator approved (the agent reported another
    /// guest meanwhile), or was already decided.
    #[error("the VM's proposed link is no longer the one shown; look again")]
    LinkChanged,
    /// Another VM claims the same guest: approving either could reset the wrong machine.
    #[error("the guest is also claimed by {0}; link the right VM by hand")]
    LinkContested(String),
    #[error("Proxmox refused: {0}")]
    Proxmox(PveError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Who asked for an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The scheduler's round, on a stale VM.
    Scheduler,
    /// A person or script with operator rights; the text names them in the history.
    Operator(String),
}

impl Trigger {
    pub fn source(&self) -> TriggerSource {
        match self {
            Trigger::Scheduler => TriggerSource::Scheduler,
            Trigger::Operator(_) => TriggerSource::Admin,
        }
    }

    pub fn requested_by(&self) -> Option<String> {
        match self {
            Trigger::Scheduler => None,
            Trigger::Operator(who) => Some(who.clone()),
        }
    }

    /// Automatic attempts count toward the incident's limit and back off.
    pub fn is_automatic(&self) -> bool {
        matches!(self, Trigger::Scheduler)
    }
}

/// How long to follow tasks and how often to refresh links.
#[derive(Clone, Debug)]
pub struct Timing {
    pub task_timeout: Duration,
    pub task_poll: Duration,
    pub link_refresh: Duration,
}

/// What every part of the engine shares.
#[derive(Clone)]
pub struct Ctx {
    pub db: Db,
    pub cache: Arc<StateCache>,
    pub status_config: SharedStatusConfig,
    /// The rails in force; an admin may change them while the server runs.
    pub cfg: SharedRemediation,
    pub pve: Option<Arc<dyn ProxmoxApi>>,
    /// Why there is no Proxmox connection, when there is none.
    pub unavailable: Option<String>,
    /// Whether linked VMs carry their guest's Proxmox tags.
    pub import_tags: bool,
    pub clock: Arc<dyn Clock>,
    pub timing: Timing,
    pub health: JobHealth,
    /// Which automatic link matches may be acted on without an operator's approval.
    pub links: domain::link::LinkPolicy,
}

impl Ctx {
    /// The remediation configuration in force now.
    pub fn cfg(&self) -> RemediationConfig {
        self.cfg.get()
    }
}

pub struct Engine {
    ctx: Ctx,
    leader: tokio::sync::Mutex<Leader>,
    leading: AtomicBool,
    /// When this process last became leader: an action announced before it was not
    /// watched through its window by this process, and is announced again.
    watching_since_ms: AtomicI64,
    guard: Guard,
    linker: Arc<Linker>,
    executor: Arc<Executor>,
    inspections: inspection::Inspections,
    ticks: AtomicU64,
}

impl Engine {
    /// Builds the engine from configuration, with the real Proxmox client when configured.
    pub fn from_config(
        config: &Config,
        db: Db,
        cache: Arc<StateCache>,
        status_config: SharedStatusConfig,
        remediation: SharedRemediation,
        health: JobHealth,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let (pve, unavailable): (Option<Arc<dyn ProxmoxApi>>, _) = match &config.proxmox {
            None => (None, Some("PROXMOX_HOST is not set".to_owned())),
            Some(settings) => {
                if settings.trust == TlsTrust::Insecure {
                    tracing::warn!(
                        "PROXMOX_TLS_INSECURE: the Proxmox certificate is not verified; set PROXMOX_CA_FILE or PROXMOX_FINGERPRINT"
                    );
                }
                (Some(Arc::new(PveClient::new(settings)?)), None)
            }
        };
        let ctx = Ctx {
            db,
            cache,
            status_config,
            cfg: remediation,
            pve,
            unavailable,
            import_tags: config.import_proxmox_tags,
            clock,
            timing: Timing {
                task_timeout: config.task_timeout,
                task_poll: config.task_poll,
                link_refresh: config.link_refresh,
            },
            health,
            links: config.link_policy,
        };
        Ok(Self::new(
            ctx,
            Leader::for_database(config.is_postgres(), &config.database_url),
        ))
    }

    /// Builds the engine from its parts (tests pass a scripted `ProxmoxApi` and clock).
    pub fn new(ctx: Ctx, leader: Leader) -> Self {
        let linker = Arc::new(Linker::default());
        Self {
            guard: Guard::new(ctx.clock.now_ms(), ctx.health.clone()),
            executor: Arc::new(Executor::new(ctx.clone(), linker.clone())),
            linker,
            leader: tokio::sync::Mutex::new(leader),
            leading: AtomicBool::new(false),
            watching_since_ms: AtomicI64::new(i64::MAX),
            inspections: inspection::Inspections::default(),
            ticks: AtomicU64::new(0),
            ctx,
        }
    }

    /// The Proxmox connection, or why there is none.
    pub fn proxmox(&self) -> Result<Arc<dyn ProxmoxApi>, String> {
        match (&self.ctx.pve, &self.ctx.unavailable) {
            (Some(pve), _) => Ok(pve.clone()),
            (None, reason) => Err(reason.clone().unwrap_or_else(|| "not configured".into())),
        }
    }

    /// What the dashboard and `/api/health` say about automatic remediation.
    pub fn summary(&self, now_ms: i64) -> RemediationSummary {
        let cfg = &self.ctx.cfg();
        let mode = match (cfg.enabled, cfg.mode) {
            (false, _) => "off",
            (true, Mode::Live) => "live",
            (true, Mode::Shadow) => "shadow",
        };
        let inactive = |reason: String| RemediationSummary {
            active: false,
            mode: mode.into(),
            reason,
        };
        if let Some(reason) = &self.ctx.unavailable {
            return inactive(format!("auto-reset off: {reason}"));
        }
        if !cfg.enabled {
            return inactive("auto-reset off (settings page or AUTO_RESET_ENABLED)".into());
        }
        match self.guard.storm() {
            Ok(Some(storm)) => return inactive(format!("auto-reset paused: {storm}")),
            Err(()) => return inactive("auto-reset paused: breaker state unreadable".into()),
            Ok(None) => {}
        }
        let until = self.amnesty_until();
        if now_ms < until {
            return inactive(format!(
                "auto-reset waits {}s after start-up or an outage",
                (until - now_ms + 999) / 1000
            ));
        }
        RemediationSummary {
            active: true,
            mode: mode.into(),
            reason: if cfg.mode == Mode::Shadow {
                "shadow mode: records what it would reset".into()
            } else {
                "auto-reset on".into()
            },
        }
    }

    /// Notes the wall clock before the stale check, so a jump is seen before any
    /// heartbeat is judged across it. True when the clock was stepped back since the last
    /// call (noticed here or by a remediation round).
    pub fn note_clock(&self, now_ms: i64) -> bool {
        self.guard
            .note_round(now_ms, self.ctx.status_config.get().stale_timeout_ms);
        self.guard.take_step_back()
    }

    /// Whether heartbeats go unjudged: during the amnesty they may have been refused by
    /// us, missed while we were down, or timed by a clock that jumped, so silence proves
    /// nothing yet.
    pub fn stale_check_paused(&self, now_ms: i64) -> bool {
        now_ms < self.amnesty_until()
    }

    /// When the latest amnesty not caused by refused reports began (start-up, a pause of
    /// ours, a clock jump, a breaker clearing).
    pub fn amnesty_from_ms(&self) -> i64 {
        self.guard.amnesty_from_ms()
    }

    fn amnesty_until(&self) -> i64 {
        self.guard
            .amnesty_until(self.ctx.status_config.get().stale_timeout_ms)
    }

    /// Ends follower and inspection tasks (server shutdown).
    pub fn shutdown(&self) {
        self.inspections.abort_all();
        self.executor.shutdown();
    }

    /// Waits until every inspection started so far has decided (tests).
    pub async fn settle_inspections(&self) {
        self.inspections.settle().await;
    }

    /// Proxmox tasks this process is still following.
    pub fn following(&self) -> usize {
        self.executor.following()
    }

    /// Completed scheduler rounds, so callers can wait for the engine to have looked.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Acquire)
    }

    /// One scheduler round at `now_ms`.
    pub async fn tick(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        let result = self.round(now_ms).await;
        self.ticks.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn round(self: &Arc<Self>, now_ms: i64) -> Result<(), DbError> {
        self.guard
            .note_round(now_ms, self.ctx.status_config.get().stale_timeout_ms);
        let leading = self.leader.lock().await.check().await;
        let was_leading = self.leading.swap(leading, Ordering::AcqRel);
        if !leading {
            return Ok(());
        }
        if !was_leading {
            self.watching_since_ms.store(now_ms, Ordering::Release);
            // Every time this process becomes leader, not only at start: another replica
            // may have left attempts open when it stopped leading.
            if let Err(err) = self.executor.reconcile().await {
                // Try again next round rather than lead with attempts left open.
                self.leading.store(false, Ordering::Release);
                return Err(err);
            }
        }
        if let Some(pve) = &self.ctx.pve {
            self.linker
                .refresh_if_due(&self.ctx, pve.as_ref(), now_ms)
                .await;
        }
        // Counted before the rows are read: an inspection that ends in between has its VM
        // `reset_pending` in the rows and is counted twice, never not at all.
        let inspecting = self.inspections.running();
        // Only what this round may act on is read, and the storm breaker's counts are the
        // database's: the cost of a round follows the number of stale VMs, not the fleet.
        let (open, tallies) = {
            let mut conn = self.ctx.db.conn().await?;
            let open = store::open_incident_rows(&mut conn).await?;
            (open, store::storm_tallies(&mut conn).await?)
        };
        let mut touched = self.expire_recoveries(&open, now_ms).await?;
        let storm = policy::storm_of(&tallies, &self.ctx.cfg());
        self.guard.update_storm(&self.ctx, storm, now_ms).await?;
        if !self.blocked(now_ms) {
            // Inspections under way count: each may end in a power action.
            let mut in_flight = open
                .iter()
                .filter(|row| row.phase() == RemediationPhase::ResetPending)
                .count()
                + inspecting;
            let stale = {
                let mut conn = self.ctx.db.conn().await?;
                store::stale_candidate_rows(&mut conn).await?
            };
            let mut rows: Vec<&VmRow> = open.iter().chain(&stale).collect();
            rows.sort_by_key(|row| row.id);
            let planned = self.planned_work(&rows).await?;
            for row in rows {
                let screen = policy::screen(&facts(row), now_ms);
                if screen == Screen::Candidate
                    && let Some(reason) = planned.holds(row, now_ms)
                {
                    // Recorded once on the VM (its reason), not every round.
                    if row.phase_reason.as_deref() != Some(reason.as_str()) {
                        tracing::info!(vm_id = %row.id, hostname = %row.hostname, %reason, "no automatic action during maintenance");
                        let mut conn = self.ctx.db.conn().await?;
                        let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                        incidents::defer(&mut conn, row.vm_id(), next, &reason).await?;
                        touched.push(row.vm_id());
                    }
                    continue;
                }
                match screen {
                    Screen::Candidate => {
                        if !self.inspections.contains(row.vm_id())
                            && self.consider(row, &mut in_flight, now_ms).await?
                        {
                            touched.push(row.vm_id());
                        }
                    }
                    // An announced action whose VM left the candidates (opted out, unlinked,
                    // link pending) is called off, not left counting down.
                    Screen::Skip(why)
                        if row.phase() == RemediationPhase::ResetScheduled
                            && why != policy::WAITING =>
                    {
                        let mut conn = self.ctx.db.conn().await?;
                        let reason = format!("announced action called off: {why}");
                        if incidents::call_off(&mut conn, row.vm_id(), &reason).await? {
                            touched.push(row.vm_id());
                        }
                    }
                    Screen::Skip(_) => {}
                }
            }
        }
        cache::refresh(&self.ctx.db, &self.ctx.cache, &touched).await;
        Ok(())
    }

    /// The maintenance windows, and the tags of this round's VMs when any window exists.
    /// A window that cannot be read fails the round: no action is better than one taken
    /// in planned work.
    async fn planned_work(&self, rows: &[&VmRow]) -> Result<PlannedWork, DbError> {
        if rows.is_empty() {
            return Ok(PlannedWork::default());
        }
        let mut conn = self.ctx.db.conn().await?;
        let windows = notify_store::active_windows(&mut conn).await?;
        let tags = if windows.is_empty() {
            HashMap::new()
        } else {
            let ids: Vec<VmId> = rows.iter().map(|r| r.vm_id()).collect();
            notify_store::tags_of(&mut conn, Some(&ids)).await?
        };
        Ok(PlannedWork { windows, tags })
    }

    /// Any rail that stops automatic resets this round.
    fn blocked(&self, now_ms: i64) -> bool {
        self.ctx.unavailable.is_some()
            || !self.ctx.cfg().enabled
            || now_ms < self.amnesty_until()
            || !matches!(self.guard.storm(), Ok(None))
    }

    /// Recoveries whose window passed without a heartbeat: the guest may be back without
    /// its agent (checked on its own task), or the attempt failed.
    async fn expire_recoveries(
        self: &Arc<Self>,
        rows: &[VmRow],
        now_ms: i64,
    ) -> Result<Vec<VmId>, DbError> {
        let mut touched = Vec::new();
        for row in rows {
            let Some(step) = policy::recovery_expired(&facts(row), &self.ctx.cfg(), now_ms) else {
                continue;
            };
            if self.inspections.contains(row.vm_id()) {
                continue;
            }
            if self.ctx.pve.is_some() && row.verified_guest().is_some() {
                self.start_recovery_check(row.clone(), step);
            } else {
                self.apply_expired(row, &step).await?;
                touched.push(row.vm_id());
            }
        }
        Ok(touched)
    }

    /// Asks Proxmox about one candidate and acts on the decision; true when state changed.
    async fn consider(
        self: &Arc<Self>,
        row: &VmRow,
        in_flight: &mut usize,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let (Some(pve), Some(guest)) = (&self.ctx.pve, row.verified_guest()) else {
            return Ok(false);
        };
        // Every slot taken: wait for one without asking Proxmox or the database, and without
        // a recheck delay, so the VM is taken the round after a slot frees.
        if let Some(reason) = policy::queued(*in_flight, &self.ctx.cfg()) {
            return self.queue(row, &reason).await;
        }
        // Two VMs linked to one guest: either one's silence could reset it. Neither is acted
        // on until an operator unlinks one (the link routes refuse to make such a pair; a
        // store edited by hand or an older release may still hold one).
        {
            let mut conn = self.ctx.db.conn().await?;
            let holders: Vec<String> = incidents::other_claimants(&mut conn, &guest, row.vm_id())
                .await?
                .into_iter()
                .filter(|(_, verified)| *verified)
                .map(|(other, _)| format!("vm {other}"))
                .collect();
            if !holders.is_empty() {
                let reason = format!(
                    "guest {} is also linked to {}: unlink the wrong one",
                    guest.vmid,
                    holders.join(", ")
                );
                if row.phase_reason.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(vm_id = %row.vm_id(), %reason, "not acting on a doubly linked guest");
                }
                let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                incidents::defer(&mut conn, row.vm_id(), next, &reason).await?;
                return Ok(true);
            }
        }
        let found = self
            .linker
            .state_following_migration(&self.ctx, pve.as_ref(), row, guest)
            .await;
        let (guest, state) = match found {
            Ok(found) => found,
            Err(err) => {
                let mut conn = self.ctx.db.conn().await?;
                let reason = format!("cannot check in Proxmox: {err}");
                let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                incidents::defer(&mut conn, row.vm_id(), next, &reason).await?;
                return Ok(true);
            }
        };
        let state = inspection::stamped(state, now_ms);
        match policy::decide(&state, &self.ctx.cfg(), *in_flight) {
            Decision::Reset | Decision::WouldReset if self.ctx.cfg().mode == Mode::Shadow => {
                if self.start_inspection(row.clone(), guest, state, Mode::Shadow, now_ms) {
                    *in_flight += 1;
                }
                return Ok(false);
            }
            Decision::Reset | Decision::WouldReset => {
                if self.start_inspection(row.clone(), guest, state, Mode::Live, now_ms) {
                    *in_flight += 1;
                }
                return Ok(false);
            }
            Decision::Fault(reason) => {
                let json = inspection::record(row, &state, None, &reason, now_ms);
                self.hold(
                    row,
                    &guest,
                    RemediationPhase::GuestFault,
                    domain::EventKind::GuestFault,
                    &reason,
                    json,
                    now_ms,
                )
                .await?;
            }
            Decision::Wait(reason) => {
                let mut conn = self.ctx.db.conn().await?;
                let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                incidents::defer(&mut conn, row.vm_id(), next, &reason).await?;
            }
            Decision::Queue(reason) => return self.queue(row, &reason).await,
            Decision::Leave(reason) => {
                // One history entry per reason, not one per look.
                if row.phase_reason.as_deref() != Some(reason.as_str()) {
                    let mode = self.ctx.cfg().mode;
                    let json = inspection::record(row, &state, None, &reason, now_ms);
                    self.note(
                        row,
                        &guest,
                        mode,
                        AttemptOutcome::LeftAlone,
                        Some(reason.clone()),
                        json,
                        now_ms,
                    )
                    .await?;
                    tracing::info!(vm_id = %row.id, hostname = %row.hostname, %reason, "stale VM left alone");
                }
                let mut conn = self.ctx.db.conn().await?;
                let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                incidents::defer(&mut conn, row.vm_id(), next, &reason).await?;
            }
        }
        Ok(true)
    }

    /// Notes that a candidate waits for a free slot; it stays a candidate (no recheck
    /// delay). Written once per reason, not every round.
    async fn queue(&self, row: &VmRow, reason: &str) -> Result<bool, DbError> {
        if row.phase_reason.as_deref() == Some(reason) && row.next_action_ms.is_none() {
            return Ok(false);
        }
        let mut conn = self.ctx.db.conn().await?;
        incidents::queue(&mut conn, row.vm_id(), reason).await?;
        tracing::debug!(vm_id = %row.id, %reason, "waiting for a free slot");
        Ok(true)
    }

    /// A history row for what the scheduler decided about a stale VM without acting.
    #[expect(clippy::too_many_arguments, reason = "one history row's fields")]
    async fn note(
        &self,
        row: &VmRow,
        guest: &GuestRef,
        mode: Mode,
        outcome: AttemptOutcome,
        error: Option<String>,
        evidence: String,
        now_ms: i64,
    ) -> Result<AttemptId, DbError> {
        let note = NewAttempt {
            vm_id: row.vm_id(),
            action: PowerAction::Reset,
            trigger_source: TriggerSource::Scheduler,
            requested_by: None,
            mode,
            guest: Some(guest.clone()),
            outcome,
            error,
            evidence_json: Some(evidence),
            created_ms: now_ms,
        };
        let mut conn = self.ctx.db.conn().await?;
        incidents::record_attempt(&mut conn, &note).await
    }

    /// An operator's reset or shutdown, through the same path as automatic ones.
    pub async fn manual_action(
        self: &Arc<Self>,
        vm_id: VmId,
        action: PowerAction,
        requested_by: &str,
    ) -> Result<AttemptId, ActionError> {
        if let Some(reason) = &self.ctx.unavailable {
            return Err(ActionError::Unavailable(reason.clone()));
        }
        let row = {
            let mut conn = self.ctx.db.conn().await?;
            store::get_row(&mut conn, vm_id)
                .await?
                .ok_or(ActionError::NotFound)?
        };
        if row.phase() == RemediationPhase::ResetPending {
            return Err(ActionError::InFlight);
        }
        let guest = row.guest().ok_or(ActionError::NotLinked)?;
        if !row.link_verified {
            return Err(ActionError::LinkPending);
        }
        let trigger = Trigger::Operator(requested_by.to_owned());
        self.executor
            .execute(&row, &guest, action, &trigger, None)
            .await
    }

    /// An operator holds the power action announced for `vm_id`: nothing is sent, and the
    /// VM is latched `manual` (down until someone acts or it recovers), with a history row
    /// naming them and a `reset_held` event. `false` when no action is announced (none was,
    /// or it was already sent).
    pub async fn hold_announced(&self, vm_id: VmId, by: &str) -> Result<bool, DbError> {
        let now_ms = self.ctx.clock.now_ms();
        let mut conn = self.ctx.db.conn().await?;
        let Some(row) = store::get_row(&mut conn, vm_id).await? else {
            return Ok(false);
        };
        let reason = format!("held by {by} during the veto window; an operator decides");
        let note = NewAttempt {
            vm_id,
            action: PowerAction::Reset,
            trigger_source: Trigger::Operator(by.to_owned()).source(),
            requested_by: Some(by.to_owned()),
            mode: self.ctx.cfg().mode,
            guest: row.guest(),
            outcome: AttemptOutcome::LeftAlone,
            error: Some(reason.clone()),
            evidence_json: None,
            created_ms: now_ms,
        };
        let message = format!("{}: {reason}", row.hostname);
        let held = incidents::latch(
            &mut conn,
            RemediationPhase::ResetScheduled,
            None,
            RemediationPhase::Manual,
            &reason,
            &note,
            EventKind::ResetHeld,
            &message,
        )
        .await?;
        drop(conn);
        if held {
            tracing::warn!(vm_id = %vm_id, by, "announced power action held");
            cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        }
        Ok(held)
    }

    /// Clears a latched state: `manual`, or a hold (agent silent, guest fault), which
    /// makes the next round look at the VM afresh.
    pub async fn acknowledge(&self, vm_id: VmId) -> Result<bool, DbError> {
        let mut conn = self.ctx.db.conn().await?;
        let mut cleared = false;
        for latched in [
            RemediationPhase::Manual,
            RemediationPhase::AgentSilent,
            RemediationPhase::GuestFault,
        ] {
            cleared = incidents::set_phase(
                &mut conn,
                vm_id,
                Some(latched),
                RemediationPhase::Ok,
                Some(0),
                None,
                "acknowledged by an operator",
            )
            .await?;
            if cleared {
                break;
            }
        }
        drop(conn);
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        Ok(cleared)
    }
}

/// Maintenance windows and the tags they may name, for one round.
#[derive(Default)]
struct PlannedWork {
    windows: Vec<maintenance::Window>,
    tags: HashMap<VmId, Vec<domain::Tag>>,
}

impl PlannedWork {
    /// Why a VM is left alone now, when a window covers it.
    fn holds(&self, row: &VmRow, now_ms: i64) -> Option<String> {
        let node: Option<domain::NodeName> =
            row.proxmox_node.as_deref().and_then(|n| n.parse().ok());
        let covered = maintenance::Covered {
            id: row.vm_id(),
            tags: self.tags.get(&row.vm_id()).map_or(&[], Vec::as_slice),
            node: node.as_ref(),
        };
        maintenance::covering(&self.windows, &covered, now_ms).map(|(name, until)| {
            format!(
                "in maintenance window {name:?} until {}: no automatic power action",
                utc(until)
            )
        })
    }
}

/// A time for a reason text: `2026-11-28 04:00 UTC`.
fn utc(ms: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn facts(row: &VmRow) -> VmFacts {
    let guest = row.verified_guest();
    VmFacts {
        id: row.vm_id(),
        status: row.status(),
        node: guest.as_ref().map(|g| g.node.clone()),
        linked: guest.is_some(),
        auto_reset: row.auto_reset,
        phase: row.phase(),
        attempts: row.incident_attempts,
        next_action_ms: row.next_action_ms,
        last_reset_ms: row.last_reset_ms,
    }
}

#[cfg(test)]
mod tests;
