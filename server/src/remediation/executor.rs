//! Carries out power actions: intent recorded first, then the call, then the task followed
//! to its end; after a restart or a change of leader, open attempts are reconciled.

use super::linker::Linker;
use super::{ActionError, Ctx, Trigger};
use crate::cache;
use crate::db::incidents::{self, Close, Expected, NewAttempt};
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
    /// Where a stop-start rung's start goes; `None` when the link went away meanwhile.
    guest: Option<GuestRef>,
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
        // The guest acted on, wherever it turned out to be (a stop-start's start follows it).
        let mut acted_on = guest.clone();
        let sent = match self.send(pve.as_ref(), guest, action, automatic).await {
            Err(PveError::VmNotFound(_)) => {
                match self
                    .linker
                    .relocate(&self.ctx, pve.as_ref(), row, guest)
                    .await
                {
                    Ok(moved) => {
                        acted_on = moved.clone();
                        self.send(pve.as_ref(), &moved, action, automatic).await
                    }
                    Err(err) => Err(err),
                }
            }
            other => other,
        };
        let followed = Followed {
            attempt_id,
            vm_id: row.vm_id(),
            guest: Some(acted_on),
            upid: String::new(),
            action,
            attempts,
            automatic,
        };
        self.after_send(followed, sent).await
    }

    /// The ladder's reboot rung is an ACPI reboot Proxmox abandons after the graceful
    /// timeout; everything else is the plain action.
    async fn send(
        &self,
        pve: &dyn ProxmoxApi,
        guest: &GuestRef,
        action: PowerAction,
        automatic: bool,
    ) -> Result<String, PveError> {
        if automatic && action == PowerAction::Reboot {
            let seconds = self.ctx.cfg().graceful_reboot_timeout_ms / 1000;
            pve.graceful_reboot(guest, u64::try_from(seconds).unwrap_or(60))
                .await
        } else {
            pve.power_action(guest, action).await
        }
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
                self.ctx
                    .health
                    .record_power_action(followed.action, AttemptOutcome::Interrupted);
                let note = format!("outcome unknown ({why}); treated as sent");
                let reason = "outcome unknown; waiting for a heartbeat";
                treat_as_sent(&mut conn, followed.attempt_id, vm_id, &note, reason, now_ms).await?;
                Err(ActionError::Proxmox(PveError::Ambiguous(why)))
            }
            Err(err) => {
                tracing::error!(vm_id = %vm_id, error = %err, "Proxmox refused the power action");
                self.ctx
                    .health
                    .record_power_action(followed.action, AttemptOutcome::Failed);
                let text = err.to_string();
                let close = Close {
                    attempt_id: followed.attempt_id,
                    outcome: AttemptOutcome::Failed,
                    error: Some(&text),
                    now_ms,
                };
                let what = format!("{} failed: {err}", followed.action);
                self.after_failure(&mut conn, &followed, &close, &what)
                    .await?;
                Err(ActionError::Proxmox(err))
            }
        };
        drop(conn);
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        result
    }

    /// Closes the failed attempt and moves the incident on, in one transaction.
    async fn after_failure(
        &self,
        conn: &mut Conn,
        followed: &Followed,
        close: &Close<'_>,
        what: &str,
    ) -> Result<(), DbError> {
        let start_failed = followed.automatic && followed.action == PowerAction::Start;
        let (phase, next_action_ms, reason) = if start_failed {
            // The ladder stopped this guest and could not start it again: never leave it
            // for the next round, which would take "stopped" for intentionally off.
            (
                RemediationPhase::Manual,
                None,
                format!(
                    "{what}; the guest was stopped by the stop-start rung and is off: manual intervention needed"
                ),
            )
        } else if followed.automatic {
            let step = policy::after_failed_attempt(
                followed.attempts,
                &self.ctx.cfg(),
                self.ctx.clock.now_ms(),
                what,
            );
            (step.phase, step.next_action_ms, step.reason)
        } else {
            (RemediationPhase::Ok, None, what.to_owned())
        };
        incidents::finish_attempt_and_set_phase(
            conn,
            close,
            followed.vm_id,
            // A stopped guest that could not be started latches whatever happened
            // meanwhile (even a report that ended the incident during the stop).
            if start_failed {
                None
            } else {
                Some(RemediationPhase::ResetPending)
            },
            phase,
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
    async fn follow(self: &Arc<Self>, followed: &Followed) -> Result<(), DbError> {
        let Some(pve) = &self.ctx.pve else {
            return Ok(());
        };
        let mut timeout = self.ctx.timing.task_timeout;
        if followed.automatic && followed.action == PowerAction::Reboot {
            // Proxmox waits up to the graceful timeout for the shutdown, then starts it.
            let graceful = u64::try_from(self.ctx.cfg().graceful_reboot_timeout_ms).unwrap_or(0);
            timeout += std::time::Duration::from_millis(graceful);
        }
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
        self: &Arc<Self>,
        followed: &Followed,
        outcome: Result<String, String>,
    ) -> Result<(), DbError> {
        let now_ms = self.ctx.clock.now_ms();
        let mut conn = self.ctx.db.conn().await?;
        let (vm_id, action, upid) = (followed.vm_id, followed.action, &followed.upid);
        let ended = match outcome {
            Ok(_) => AttemptOutcome::Ok,
            Err(_) => AttemptOutcome::Failed,
        };
        self.ctx.health.record_power_action(action, ended);
        match outcome {
            Ok(_) if followed.automatic && action == PowerAction::Stop => {
                drop(conn);
                return self.start_after_stop(followed).await;
            }
            Ok(exit) => {
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
                let close = Close {
                    attempt_id: followed.attempt_id,
                    outcome: AttemptOutcome::Ok,
                    error: None,
                    now_ms,
                };
                incidents::finish_attempt_and_set_phase(
                    &mut conn,
                    &close,
                    vm_id,
                    Some(RemediationPhase::ResetPending),
                    phase,
                    None,
                    &reason,
                )
                .await?;
                tracing::info!(vm_id = %vm_id, upid, "Proxmox task finished OK");
            }
            Err(error) => {
                tracing::error!(vm_id = %vm_id, upid, %error, "Proxmox task failed");
                let close = Close {
                    attempt_id: followed.attempt_id,
                    outcome: AttemptOutcome::Failed,
                    error: Some(&error),
                    now_ms,
                };
                let what = format!("{action} task failed: {error}");
                self.after_failure(&mut conn, followed, &close, &what)
                    .await?;
            }
        }
        drop(conn);
        cache::refresh(&self.ctx.db, &self.ctx.cache, &[vm_id]).await;
        Ok(())
    }

    /// The stop-start rung's second half: the start's intent is recorded with the stop's
    /// end in one transaction, then the start is sent and followed. Its attempt does not
    /// count: the rung is one attempt.
    async fn start_after_stop(self: &Arc<Self>, stop: &Followed) -> Result<(), DbError> {
        let now_ms = self.ctx.clock.now_ms();
        let intent = NewAttempt {
            vm_id: stop.vm_id,
            action: PowerAction::Start,
            trigger_source: TriggerSource::Scheduler,
            requested_by: None,
            mode: Mode::Live,
            guest: stop.guest.clone(),
            outcome: AttemptOutcome::Pending,
            error: None,
            evidence_json: None,
            created_ms: now_ms,
        };
        let attempt_id = {
            let mut conn = self.ctx.db.conn().await?;
            match incidents::finish_and_begin(&mut conn, stop.attempt_id, now_ms, &intent).await? {
                Some(id) => id,
                // Someone else closed the stop and owns the start.
                None => return Ok(()),
            }
        };
        self.send_start(Followed {
            attempt_id,
            action: PowerAction::Start,
            upid: String::new(),
            ..stop.clone()
        })
        .await
    }

    /// Sends a recorded start intent. A start is safe to send again after a crash: a
    /// guest already running refuses it.
    async fn send_start(self: &Arc<Self>, start: Followed) -> Result<(), DbError> {
        let Some(pve) = self.ctx.pve.clone() else {
            return Ok(());
        };
        let sent = match &start.guest {
            Some(guest) => {
                tracing::warn!(vm_id = %start.vm_id, vmid = %guest.vmid, "starting the guest the stop-start rung stopped");
                pve.power_action(guest, PowerAction::Start).await
            }
            None => Err(PveError::VmNotFound(
                "the VM lost its verified link before its guest was started again".into(),
            )),
        };
        match self.after_send(start, sent).await {
            Err(ActionError::Db(err)) => Err(err),
            _ => Ok(()),
        }
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
            let automatic = item.trigger_source.0 == TriggerSource::Scheduler;
            match (&item.upid, &self.ctx.pve) {
                (None, Some(_)) if automatic && item.action.0 == PowerAction::Start => {
                    let (attempts, guest) = self.incident_of(vm_id).await?;
                    let age = now_ms.saturating_sub(item.created_ms);
                    let limit =
                        i64::try_from(self.ctx.timing.task_timeout.as_millis()).unwrap_or(i64::MAX);
                    if age > limit {
                        // Long ago: what the guest's state is now is anyone's guess (an
                        // operator may have acted). A person decides, not a blind start.
                        let mut conn = self.ctx.db.conn().await?;
                        let note = "the stop-start rung's start was interrupted long ago; not sent";
                        let close = Close {
                            attempt_id,
                            outcome: AttemptOutcome::Interrupted,
                            error: Some(note),
                            now_ms,
                        };
                        incidents::finish_attempt_and_set_phase(
                            &mut conn,
                            &close,
                            vm_id,
                            None,
                            RemediationPhase::Manual,
                            None,
                            "the stop-start rung stopped the guest and its start was interrupted: check the guest, then acknowledge",
                        )
                        .await?;
                        continue;
                    }
                    tracing::info!(
                        attempt_id = item.id,
                        "sending the start a restart interrupted"
                    );
                    self.send_start(Followed {
                        attempt_id,
                        vm_id,
                        guest,
                        upid: String::new(),
                        action: PowerAction::Start,
                        attempts,
                        automatic,
                    })
                    .await?;
                }
                (Some(upid), Some(_)) => {
                    tracing::info!(attempt_id = item.id, upid, "resuming to follow a task");
                    let (attempts, guest) = self.incident_of(vm_id).await?;
                    self.spawn_follower(Followed {
                        attempt_id,
                        vm_id,
                        guest,
                        upid: upid.clone(),
                        action: item.action.0,
                        attempts,
                        automatic,
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

    /// The incident's attempt count and the VM's verified guest, for resuming its work.
    async fn incident_of(&self, vm_id: VmId) -> Result<(i64, Option<GuestRef>), DbError> {
        let mut conn = self.ctx.db.conn().await?;
        Ok(store::get_row(&mut conn, vm_id)
            .await?
            .map_or((1, None), |v| (v.incident_attempts, v.verified_guest())))
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
    let close = Close {
        attempt_id,
        outcome: AttemptOutcome::Interrupted,
        error: Some(note),
        now_ms,
    };
    incidents::finish_attempt_and_set_phase(
        conn,
        &close,
        vm_id,
        Some(RemediationPhase::ResetPending),
        RemediationPhase::Recovering,
        None,
        reason,
    )
    .await?;
    Ok(())
}
