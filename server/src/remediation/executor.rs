//! Carries out power actions: intent recorded first, then the call, then the task followed
//! to its end; after a restart or a change of leader, open attempts are reconciled.

use super::linker::Linker;
use super::{ActionError, Ctx, Trigger};
use crate::cache;
use crate::db::incidents::{self, Expected, NewAttempt};
use crate::db::store::{self, VmRow};
use crate::db::{Conn, DbError};
use domain::policy;
use domain::{
    AttemptId, AttemptOutcome, GuestKind, GuestRef, Mode, PowerAction, RemediationPhase,
    TriggerSource, VmId,
};
use proxmox::{ProxmoxApi, PveError, TaskState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::task::AbortHandle;

pub struct Executor {
    ctx: Ctx,
    linker: Arc<Linker>,
    /// Tasks this process is following, by attempt.
    followers: Mutex<HashMap<AttemptId, AbortHandle>>,
}

/// What a follower needs to move the incident on when the task ends.
#[derive(Clone, Debug)]
struct Followed {
    attempt_id: AttemptId,
    vm_id: VmId,
    upid: String,
    action: PowerAction,
    /// Attempts of the incident including this one.
    attempts: i64,
    automatic: bool,
}

impl Executor {
    pub fn new(ctx: Ctx, linker: Arc<Linker>) -> Self {
        Self {
            ctx,
            linker,
            followers: Mutex::new(HashMap::new()),
        }
    }

    fn pve(&self) -> Result<&Arc<dyn ProxmoxApi>, ActionError> {
        self.ctx.pve.as_ref().ok_or_else(|| {
            ActionError::Unavailable(self.ctx.unavailable.clone().unwrap_or_default())
        })
    }

    /// Runs a power action on a VM's guest.
    pub async fn execute(
        self: &Arc<Self>,
        row: &VmRow,
        guest: &GuestRef,
        action: PowerAction,
        trigger: &Trigger,
        evidence: Option<String>,
    ) -> Result<AttemptId, ActionError> {
        // Containers have no reset: the closest action is a reboot.
        let action = match (guest.kind, action) {
            (GuestKind::Lxc, PowerAction::Reset) => PowerAction::Reboot,
            (_, action) => action,
        };
        let pve = self.pve()?.clone();
        let automatic = trigger.is_automatic();
        let expected = Expected {
            phase: row.phase(),
            attempts: row.incident_attempts,
            last_reset_ms: row.last_reset_ms,
            // The VM was judged down from this last-seen time; a heartbeat since cancels.
            still_down_since: automatic.then_some(row.last_seen_ms),
            linked_vmid: Some(guest.vmid.get()),
        };
        let intent = NewAttempt {
            vm_id: row.vm_id(),
            action,
            trigger_source: trigger.source(),
            requested_by: trigger.requested_by(),
            mode: Mode::Live,
            guest: Some(guest.clone()),
            outcome: AttemptOutcome::Pending,
            error: None,
            evidence_json: evidence,
            created_ms: self.ctx.clock.now_ms(),
        };
        let reason = format!("{action} requested by {}", trigger.source());
        let attempt_id = {
            let mut conn = self.ctx.db.conn().await?;
            incidents::begin_attempt(&mut conn, &expected, automatic, &reason, &intent)
                .await?
                .ok_or(ActionError::InFlight)?
        };
        let attempts = expected.attempts + i64::from(automatic);
        tracing::warn!(vm_id = %row.id, hostname = %row.hostname, node = %guest.node, vmid = %guest.vmid, %action, trigger = %trigger.source(), "sending power action to Proxmox");
        let sent = match pve.power_action(guest, action).await {
            Err(PveError::VmNotFound(_)) => {
                match self
                    .linker
                    .relocate(&self.ctx, pve.as_ref(), row, guest)
                    .await
                {
                    Ok(moved) => pve.power_action(&moved, action).await,
                    Err(err) => Err(err),
                }
            }
            other => other,
        };
        let followed = Followed {
            attempt_id,
            vm_id: row.vm_id(),
            upid: String::new(),
            action,
            attempts,
            automatic,
        };
        self.after_send(followed, sent).await
    }

    async fn after_send(
        self: &Arc<Self>,
        mut followed: Followed,
        sent: Result<String, PveError>,
    ) -> Result<AttemptId, ActionError> {
        let now_ms = self.ctx.clock.now_ms();
        let mut conn = self.ctx.db.conn().await?;
        let vm_id = followed.vm_id;
        let result = match sent {
            Ok(upid) => {
                incidents::mark_sent(&mut conn, followed.attempt_id, &upid, now_ms).await?;
                followed.upid = upid;
                self.spawn_follower(followed.clone());
                Ok(followed.attempt_id)
            }
            Err(PveError::Ambiguous(why)) => {
                // It may run: treat it as sent, so the recovery window applies before any
                // second attempt.
                tracing::error!(vm_id = %vm_id, error = %why, "power action outcome unknown");
                let note = format!("outcome unknown ({why}); treated as sent");
                let reason = "outcome unknown; waiting for a heartbeat";
                treat_as_sent(&mut conn, followed.attempt_id, vm_id, &note, reason, now_ms).await?;
                Err(ActionError::Proxmox(PveError::Ambiguous(why)))
            }
            Err(err) => {
                tracing::error!(vm_id = %vm_id, error = %err, "Proxmox refused the power action");
                let text = err.to_string();
                incidents::finish_attempt(
                    &mut conn,
                    followed.attempt_id,
                    AttemptOutcome::Failed,
                    Some(&text),
                    now_ms,
                )
                .await?;
                let what = format!("{} failed: {err}", followed.action);
                self.after_failure(&mut conn, &followed, &what).await?;
                Err(ActionError::Proxmox(err))
            }
        };
        drop(conn);
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        result
    }

    async fn after_failure(
        &self,
        conn: &mut Conn,
        followed: &Followed,
        what: &str,
    ) -> Result<(), DbError> {
        let (phase, next_action_ms, reason) = if followed.automatic {
            let step = policy::after_failed_attempt(
                followed.attempts,
                &self.ctx.cfg,
                self.ctx.clock.now_ms(),
                what,
            );
            (step.phase, step.next_action_ms, step.reason)
        } else {
            (RemediationPhase::Ok, None, what.to_owned())
        };
        incidents::set_phase(
            conn,
            followed.vm_id,
            Some(RemediationPhase::ResetPending),
            phase,
            None,
            next_action_ms,
            &reason,
        )
        .await?;
        Ok(())
    }

    fn spawn_follower(self: &Arc<Self>, followed: Followed) {
        let executor = self.clone();
        let attempt_id = followed.attempt_id;
        let handle = tokio::spawn(async move {
            if let Err(err) = executor.follow(&followed).await {
                tracing::error!(attempt_id = %followed.attempt_id, error = %err, "could not record a task's outcome");
            }
            if let Ok(mut followers) = executor.followers.lock() {
                followers.remove(&followed.attempt_id);
            }
        });
        if let Ok(mut followers) = self.followers.lock() {
            followers.retain(|_, h| !h.is_finished());
            followers.insert(attempt_id, handle.abort_handle());
        }
    }

    /// Polls the task until it stops (or the deadline) and moves the incident on.
    async fn follow(&self, followed: &Followed) -> Result<(), DbError> {
        let Some(pve) = &self.ctx.pve else {
            return Ok(());
        };
        let timeout = &self.ctx.timing.task_timeout;
        let deadline = self
            .ctx
            .clock
            .now_ms()
            .saturating_add(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
        let outcome = loop {
            match pve.task_state(&followed.upid).await {
                Ok(TaskState::Succeeded(exit)) => break Ok(exit),
                Ok(TaskState::Failed(exit)) => break Err(exit),
                Ok(TaskState::Running) => {}
                Err(err) if err.is_transient() => {}
                Err(err) => break Err(format!("cannot follow the task: {err}")),
            }
            if self.ctx.clock.now_ms() >= deadline {
                break Err(format!("task still running after {}s", timeout.as_secs()));
            }
            self.ctx.clock.sleep(self.ctx.timing.task_poll).await;
        };
        self.record_outcome(followed, outcome).await
    }

    async fn record_outcome(
        &self,
        followed: &Followed,
        outcome: Result<String, String>,
    ) -> Result<(), DbError> {
        let now_ms = self.ctx.clock.now_ms();
        let mut conn = self.ctx.db.conn().await?;
        let (vm_id, action, upid) = (followed.vm_id, followed.action, &followed.upid);
        match outcome {
            Ok(exit) => {
                incidents::finish_attempt(
                    &mut conn,
                    followed.attempt_id,
                    AttemptOutcome::Ok,
                    None,
                    now_ms,
                )
                .await?;
                let (phase, reason) = match action {
                    PowerAction::Shutdown | PowerAction::Stop => (
                        RemediationPhase::Ok,
                        format!("{action} done by an operator"),
                    ),
                    _ => (
                        RemediationPhase::Recovering,
                        format!("{action} done (task {exit}); waiting for a heartbeat"),
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
                tracing::info!(vm_id = %vm_id, upid, "Proxmox task finished OK");
            }
            Err(error) => {
                incidents::finish_attempt(
                    &mut conn,
                    followed.attempt_id,
                    AttemptOutcome::Failed,
                    Some(&error),
                    now_ms,
                )
                .await?;
                tracing::error!(vm_id = %vm_id, upid, %error, "Proxmox task failed");
                let what = format!("{action} task failed: {error}");
                self.after_failure(&mut conn, followed, &what).await?;
            }
        }
        drop(conn);
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        Ok(())
    }

    /// After a restart or on becoming leader: follow tasks that were sent, and treat intents
    /// without a UPID as possibly sent, so the recovery window applies instead of a second
    /// reset. A stored value this version does not know fails the whole pass (logged by
    /// the caller): nothing is acted on.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), DbError> {
        let open = {
            let mut conn = self.ctx.db.conn().await?;
            incidents::unfinished_attempts(&mut conn).await?
        };
        let now_ms = self.ctx.clock.now_ms();
        for item in open {
            let attempt_id = AttemptId(item.id);
            if self.is_following(attempt_id) {
                continue;
            }
            let vm_id = VmId(item.vm_id);
            match (&item.upid, &self.ctx.pve) {
                (Some(upid), Some(_)) => {
                    tracing::info!(attempt_id = item.id, upid, "resuming to follow a task");
                    let attempts = {
                        let mut conn = self.ctx.db.conn().await?;
                        store::get_row(&mut conn, vm_id)
                            .await?
                            .map_or(1, |v| v.incident_attempts)
                    };
                    self.spawn_follower(Followed {
                        attempt_id,
                        vm_id,
                        upid: upid.clone(),
                        action: item.action.0,
                        attempts,
                        automatic: item.trigger_source.0 == TriggerSource::Scheduler,
                    });
                }
                _ => {
                    let mut conn = self.ctx.db.conn().await?;
                    let note =
                        "the server stopped before Proxmox confirmed the request; treated as sent";
                    let reason = "interrupted by a restart; waiting for a heartbeat";
                    treat_as_sent(&mut conn, attempt_id, vm_id, note, reason, now_ms).await?;
                }
            }
        }
        Ok(())
    }

    pub fn following(&self) -> usize {
        self.followers
            .lock()
            .map(|f| f.values().filter(|h| !h.is_finished()).count())
            .unwrap_or(0)
    }

    fn is_following(&self, attempt_id: AttemptId) -> bool {
        self.followers
            .lock()
            .map(|f| f.get(&attempt_id).is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Ends follower tasks (server shutdown).
    pub fn shutdown(&self) {
        if let Ok(mut followers) = self.followers.lock() {
            for (_, handle) in followers.drain() {
                handle.abort();
            }
        }
    }
}

/// An attempt whose request may have reached Proxmox: closed as interrupted and its VM put in
/// `recovering`, so the recovery window applies before any second attempt.
async fn treat_as_sent(
    conn: &mut Conn,
    attempt_id: AttemptId,
    vm_id: VmId,
    note: &str,
    reason: &str,
    now_ms: i64,
) -> Result<(), DbError> {
    incidents::finish_attempt(
        conn,
        attempt_id,
        AttemptOutcome::Interrupted,
        Some(note),
        now_ms,
    )
    .await?;
    incidents::set_phase(
        conn,
        vm_id,
        Some(RemediationPhase::ResetPending),
        RemediationPhase::Recovering,
        None,
        None,
        reason,
    )
    .await?;
    Ok(())
}
