//! The second opinion: before each automatic power action, and when a recovery window ends,
//! gathers evidence from Proxmox on its own task (a slow guest agent never holds up the
//! round) and applies `domain::evidence::judge`.

use super::{Ctx, Trigger};
use crate::cache;
use crate::db::DbError;
use crate::db::incidents::{self, NewAttempt};
use crate::db::store::VmRow;
use domain::evidence::{self, AgentPing, Evidence, Verdict};
use domain::policy::{self, GuestPower, GuestState, NextStep, Rung, VetoStep};
use domain::{
    AttemptOutcome, EventKind, GuestRef, Mode, PowerAction, RemediationPhase, TriggerSource, VmId,
};
use proxmox::ProxmoxApi;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Inspections running, one at most per VM.
#[derive(Default)]
pub struct Inspections(Mutex<HashMap<VmId, JoinHandle<()>>>);

impl Inspections {
    pub fn running(&self) -> usize {
        self.0
            .lock()
            .map(|m| m.values().filter(|h| !h.is_finished()).count())
            .unwrap_or(0)
    }

    pub fn contains(&self, vm_id: VmId) -> bool {
        self.0
            .lock()
            .map(|m| m.get(&vm_id).is_some_and(|h| !h.is_finished()))
            // A poisoned map: claim it is running, so nothing starts twice.
            .unwrap_or(true)
    }

    /// Starts `work` for `vm_id` unless one is already running for it.
    pub fn start(
        &self,
        vm_id: VmId,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        let Ok(mut map) = self.0.lock() else {
            return false;
        };
        map.retain(|_, h| !h.is_finished());
        if map.contains_key(&vm_id) {
            return false;
        }
        map.insert(vm_id, tokio::spawn(work));
        true
    }

    /// Waits for every running inspection (tests, and shutdown).
    pub async fn settle(&self) {
        loop {
            let handles: Vec<JoinHandle<()>> = match self.0.lock() {
                Ok(mut map) => map.drain().map(|(_, h)| h).collect(),
                Err(_) => return,
            };
            if handles.is_empty() {
                return;
            }
            for handle in handles {
                let _ = handle.await;
            }
        }
    }

    pub fn abort_all(&self) {
        if let Ok(mut map) = self.0.lock() {
            for (_, handle) in map.drain() {
                handle.abort();
            }
        }
    }
}

/// Gathers the evidence: a guest-agent ping (bounded) alongside a second status read,
/// whose whole state is returned too (it may show the guest stopped, paused or locked).
pub async fn gather(
    ctx: &Ctx,
    pve: &dyn ProxmoxApi,
    row: &VmRow,
    guest: &GuestRef,
    first: &GuestState,
) -> (Evidence, Option<GuestState>) {
    let cfg = &ctx.cfg();
    let ping = async {
        if !first.agent_configured {
            return AgentPing::NotConfigured;
        }
        let limit = Duration::from_millis(u64::try_from(cfg.guest_agent_timeout_ms).unwrap_or(0));
        match tokio::time::timeout(limit, pve.agent_ping(guest)).await {
            Err(_) => AgentPing::TimedOut,
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => AgentPing::Unavailable(err.to_string()),
        }
    };
    let second = async {
        let gap = Duration::from_millis(u64::try_from(cfg.evidence_interval_ms).unwrap_or(0));
        ctx.clock.sleep(gap).await;
        pve.guest_state(guest)
            .await
            .map(|state| stamped(state, ctx.clock.now_ms()))
            .map_err(|err| err.to_string())
    };
    let (guest_agent, second) = tokio::join!(ping, second);
    let evidence = Evidence {
        guest_agent,
        first: first.sample.clone(),
        second: second
            .as_ref()
            .map(|s| s.sample.clone())
            .map_err(Clone::clone),
        last_heartbeat_ms: row.last_seen_ms,
        last_uptime_seconds: row.uptime_seconds,
    };
    (evidence, second.ok())
}

/// The first status read, stamped with the engine's clock.
pub fn stamped(mut state: GuestState, now_ms: i64) -> GuestState {
    state.sample.at_ms = now_ms;
    state
}

/// What a decision rested on, kept with its history row for the operator.
pub fn record(
    row: &VmRow,
    state: &GuestState,
    evidence: Option<&Evidence>,
    decision: &str,
    now_ms: i64,
) -> String {
    let status = match &state.power {
        GuestPower::Running | GuestPower::Suspended(_) | GuestPower::Fault(_) => "running",
        GuestPower::Stopped => "stopped",
        GuestPower::Other(status) => status.as_str(),
    };
    serde_json::json!({
        "decided_at_ms": now_ms,
        "decision": decision,
        "last_heartbeat_ms": row.last_seen_ms,
        "silent_for_ms": row.last_seen_ms.map(|t| now_ms.saturating_sub(t)),
        "last_uptime_seconds": row.uptime_seconds,
        "proxmox": {
            "status": status,
            "qmpstatus": state.sample.qmpstatus,
            "lock": state.lock,
            "ha_managed": state.ha_managed,
            "uptime": state.uptime_seconds,
            "agent_configured": state.agent_configured,
        },
        "evidence": evidence,
    })
    .to_string()
}

impl super::Engine {
    /// A candidate Proxmox says is running: look closer on its own task, then act.
    pub(super) fn start_inspection(
        self: &Arc<Self>,
        row: VmRow,
        guest: GuestRef,
        state: GuestState,
        mode: Mode,
        screened_ms: i64,
    ) -> bool {
        let engine = self.clone();
        let vm_id = row.vm_id();
        self.inspections.start(vm_id, async move {
            if let Err(err) = engine
                .inspect(&row, &guest, &state, mode, screened_ms)
                .await
            {
                tracing::error!(vm_id = %vm_id, error = %err, "could not record an inspection");
            }
        })
    }

    async fn inspect(
        self: &Arc<Self>,
        row: &VmRow,
        guest: &GuestRef,
        state: &GuestState,
        mode: Mode,
        screened_ms: i64,
    ) -> Result<(), DbError> {
        let Some(pve) = self.ctx.pve.clone() else {
            return Ok(());
        };
        let (evidence, second) = gather(&self.ctx, pve.as_ref(), row, guest, state).await;
        let now_ms = self.ctx.clock.now_ms();
        let mut verdict = evidence::judge(&evidence, self.ctx.cfg().hang_evidence);
        // The second read must still show a guest the policy would act on: stopped, paused
        // or locked meanwhile (someone is at work on it) makes the first read stale.
        if let (Verdict::Hung(_), Some(second)) = (&verdict, &second)
            && let policy::Decision::Wait(why)
            | policy::Decision::Queue(why)
            | policy::Decision::Leave(why)
            | policy::Decision::Fault(why) = policy::decide(second, &self.ctx.cfg(), 0)
        {
            verdict = Verdict::Unsure(format!("changed in Proxmox between the reads: {why}"));
        }
        tracing::info!(vm_id = %row.id, hostname = %row.hostname, verdict = ?verdict, "second opinion");
        match verdict {
            Verdict::Hung(why) => {
                let rung = self
                    .ctx
                    .cfg()
                    .ladder
                    .rung(guest.kind, row.incident_attempts);
                let json = record(row, state, Some(&evidence), &why, now_ms);
                if mode == Mode::Shadow {
                    self.note(
                        row,
                        guest,
                        Mode::Shadow,
                        AttemptOutcome::WouldReset,
                        Some(format!("would {rung}: {why}")),
                        json,
                        now_ms,
                    )
                    .await?;
                    let mut conn = self.ctx.db.conn().await?;
                    let next = now_ms.saturating_add(self.ctx.cfg().recovery_timeout_ms);
                    let reason = format!("shadow mode: would {rung}");
                    incidents::defer_while_down(
                        &mut conn,
                        row.vm_id(),
                        row.last_seen_ms,
                        next,
                        &reason,
                    )
                    .await?;
                    tracing::info!(vm_id = %row.id, hostname = %row.hostname, %rung, "shadow mode: would act");
                    return Ok(());
                }
                // The rails may have closed, or the mode turned to shadow, while the evidence
                // was gathered.
                if self.blocked(now_ms)
                    || self.ctx.cfg().mode != domain::Mode::Live
                    || !self.leading.load(std::sync::atomic::Ordering::Acquire)
                {
                    tracing::info!(vm_id = %row.id, "auto-reset paused while the evidence was gathered; nothing sent");
                    return Ok(());
                }
                // A maintenance window opened while the evidence was gathered.
                let planned = self.planned_work(&[row]).await?;
                if let Some(reason) = planned.holds(row, now_ms) {
                    tracing::info!(vm_id = %row.id, %reason, "a maintenance window opened while the evidence was gathered; nothing sent");
                    return Ok(());
                }
                let watching_since = self.watching_since_ms.load(Ordering::Acquire);
                let step = policy::veto_step(
                    row.phase(),
                    row.next_action_ms,
                    self.ctx.cfg().veto_ms,
                    screened_ms,
                    watching_since,
                );
                if step == VetoStep::Announce {
                    let until_ms = now_ms.saturating_add(self.ctx.cfg().veto_ms);
                    return self.announce(row, rung, &why, until_ms, now_ms).await;
                }
                let sent = self
                    .executor
                    .execute(
                        row,
                        guest,
                        rung.first_action(),
                        &Trigger::Scheduler,
                        Some(json),
                    )
                    .await;
                match sent {
                    Err(super::ActionError::Db(err)) => return Err(err),
                    Err(other) => {
                        tracing::info!(vm_id = %row.id, reason = %other, "power action not started");
                    }
                    Ok(_) => {}
                }
                Ok(())
            }
            Verdict::AgentSilent(why) => {
                let json = record(row, state, Some(&evidence), &why, now_ms);
                let reason = format!("agent silent, guest alive: {why}");
                self.hold(
                    row,
                    guest,
                    RemediationPhase::AgentSilent,
                    EventKind::AgentSilent,
                    &reason,
                    json,
                    now_ms,
                )
                .await
            }
            Verdict::GuestFault(why) => {
                let json = record(row, state, Some(&evidence), &why, now_ms);
                self.hold(
                    row,
                    guest,
                    RemediationPhase::GuestFault,
                    EventKind::GuestFault,
                    &why,
                    json,
                    now_ms,
                )
                .await
            }
            Verdict::Unsure(why) => {
                let mut conn = self.ctx.db.conn().await?;
                let next = now_ms.saturating_add(self.ctx.cfg().recheck_ms);
                let reason = format!("cannot tell hung from alive: {why}");
                incidents::defer_while_down(
                    &mut conn,
                    row.vm_id(),
                    row.last_seen_ms,
                    next,
                    &reason,
                )
                .await?;
                drop(conn);
                cache::refresh(&self.ctx.db, &self.ctx.cache, &[row.vm_id()]).await;
                Ok(())
            }
        }
    }

    /// No power action: the VM takes `phase` and `kind` is recorded (until a heartbeat or an operator clears it),
    /// with a history row holding the evidence and an event. Nothing changes when a
    /// heartbeat arrived or another replica acted meanwhile.
    #[expect(
        clippy::too_many_arguments,
        reason = "one hold's state, record and event"
    )]
    pub(super) async fn hold(
        &self,
        row: &VmRow,
        guest: &GuestRef,
        phase: RemediationPhase,
        kind: EventKind,
        reason: &str,
        evidence_json: String,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let note = NewAttempt {
            vm_id: row.vm_id(),
            action: PowerAction::Reset,
            trigger_source: TriggerSource::Scheduler,
            requested_by: None,
            mode: self.ctx.cfg().mode,
            guest: Some(guest.clone()),
            outcome: AttemptOutcome::LeftAlone,
            error: Some(reason.to_owned()),
            evidence_json: Some(evidence_json),
            created_ms: now_ms,
        };
        let message = format!("{}: {reason}", row.hostname);
        let mut conn = self.ctx.db.conn().await?;
        let held = incidents::latch(
            &mut conn,
            row.phase(),
            Some(row.last_seen_ms),
            phase,
            reason,
            &note,
            kind,
            &message,
        )
        .await?;
        if !held {
            return Ok(());
        }
        drop(conn);
        tracing::warn!(vm_id = %row.id, hostname = %row.hostname, %phase, %reason, "no power action");
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[row.vm_id()]).await;
        Ok(())
    }

    /// Shows the next power action with its countdown; the round looks again (a fresh
    /// second opinion) when the window ends, unless an operator held it or a heartbeat came.
    async fn announce(
        &self,
        row: &VmRow,
        rung: Rung,
        why: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let seconds = until_ms.saturating_sub(now_ms).saturating_add(999) / 1000;
        let reason = format!("{rung} in {seconds} s unless held: {why}");
        let mut conn = self.ctx.db.conn().await?;
        let announced = incidents::announce_while_down(
            &mut conn,
            row.vm_id(),
            row.phase(),
            row.last_seen_ms,
            until_ms,
            &reason,
        )
        .await?;
        drop(conn);
        if announced {
            tracing::warn!(vm_id = %row.id, hostname = %row.hostname, %rung, until_ms, "power action announced; operators may hold it");
            cache::refresh(&self.ctx.db, &self.ctx.cache, &[row.vm_id()]).await;
        }
        Ok(())
    }

    /// A recovery window ended without a heartbeat: if the guest OS is back (guest agent
    /// and I/O), the incident ends as "guest back, agent not yet"; otherwise the attempt
    /// counts as failed and the next rung follows after the backoff.
    pub(super) fn start_recovery_check(self: &Arc<Self>, row: VmRow, step: NextStep) -> bool {
        let engine = self.clone();
        let vm_id = row.vm_id();
        self.inspections.start(vm_id, async move {
            if let Err(err) = engine.recovery_check(&row, step).await {
                tracing::error!(vm_id = %vm_id, error = %err, "could not record a recovery check");
            }
        })
    }

    async fn recovery_check(&self, row: &VmRow, step: NextStep) -> Result<(), DbError> {
        if let (Some(pve), Some(guest)) = (self.ctx.pve.clone(), row.verified_guest())
            && let Ok(state) = pve.guest_state(&guest).await
        {
            let state = stamped(state, self.ctx.clock.now_ms());
            let (evidence, _) = gather(&self.ctx, pve.as_ref(), row, &guest, &state).await;
            if evidence.guest_back() {
                let now_ms = self.ctx.clock.now_ms();
                let why = "guest back, agent not yet: the guest agent answers and the guest does I/O, but no heartbeat came";
                let json = record(row, &state, Some(&evidence), why, now_ms);
                let phase = RemediationPhase::AgentSilent;
                return self
                    .hold(row, &guest, phase, EventKind::GuestBack, why, json, now_ms)
                    .await;
            }
        }
        self.apply_expired(row, &step).await
    }

    /// The recovery window's failure, as `policy::recovery_expired` decided it.
    pub(super) async fn apply_expired(&self, row: &VmRow, step: &NextStep) -> Result<(), DbError> {
        let mut conn = self.ctx.db.conn().await?;
        let moved = incidents::set_phase(
            &mut conn,
            row.vm_id(),
            Some(RemediationPhase::Recovering),
            step.phase,
            None,
            step.next_action_ms,
            &step.reason,
        )
        .await?;
        drop(conn);
        if moved {
            tracing::warn!(vm_id = %row.id, hostname = %row.hostname, reason = %step.reason, "the power action did not bring the VM back");
            cache::refresh(&self.ctx.db, &self.ctx.cache, &[row.vm_id()]).await;
        }
        Ok(())
    }
}
