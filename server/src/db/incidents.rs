//! Queries for remediation: incident state on `vms`, the reset history, fleet events.

use super::schema::{events, reset_attempts, vms};
use super::store::AttemptRow;
use super::stored::Stored;
use super::{Conn, DbError};
use crate::{with_conn, write_transaction};
use diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
use diesel_async::RunQueryDsl;
use domain::view::Event;
use domain::{
    AttemptId, AttemptOutcome, EventKind, GuestRef, LinkSource, Mode, PowerAction,
    RemediationPhase, TriggerSource, VmId, VmStatus,
};

/// A history row about to be written (for a power action: before Proxmox is called).
#[derive(Clone, Debug)]
pub struct NewAttempt {
    pub vm_id: VmId,
    pub action: PowerAction,
    pub trigger_source: TriggerSource,
    pub requested_by: Option<String>,
    pub mode: Mode,
    pub guest: Option<GuestRef>,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
    pub evidence_json: Option<String>,
    pub created_ms: i64,
}

#[derive(diesel::Insertable)]
#[diesel(table_name = reset_attempts)]
struct AttemptInsert<'a> {
    vm_id: i64,
    action: &'static str,
    trigger_source: &'static str,
    requested_by: Option<&'a str>,
    mode: &'static str,
    proxmox_node: Option<&'a str>,
    proxmox_vmid: Option<i64>,
    outcome: &'static str,
    error: Option<&'a str>,
    evidence_json: Option<&'a str>,
    created_ms: i64,
}

impl NewAttempt {
    fn row(&self) -> AttemptInsert<'_> {
        AttemptInsert {
            vm_id: self.vm_id.get(),
            action: self.action.as_str(),
            trigger_source: self.trigger_source.as_str(),
            requested_by: self.requested_by.as_deref(),
            mode: self.mode.as_str(),
            proxmox_node: self.guest.as_ref().map(|g| g.node.as_str()),
            proxmox_vmid: self.guest.as_ref().map(|g| g.vmid.get()),
            outcome: self.outcome.as_str(),
            error: self.error.as_deref(),
            evidence_json: self.evidence_json.as_deref(),
            created_ms: self.created_ms,
        }
    }
}

/// The incident fields of a VM as the engine read them (compare-and-set before acting).
#[derive(Clone, Debug)]
pub struct Expected {
    pub phase: RemediationPhase,
    pub attempts: i64,
    /// The incident's last attempt time: it changes on every attempt, so a state that came
    /// back to the same phase and count is still told apart.
    pub last_reset_ms: Option<i64>,
    /// For an automatic reset: the VM must still be `down` with this last-seen time, so a
    /// heartbeat that arrived while the reset was being decided cancels it.
    pub still_down_since: Option<Option<i64>>,
    /// The guest acted on must still be this VM's verified link: an unlink or a link
    /// replaced while Proxmox was being asked cancels the action.
    pub linked_vmid: Option<i64>,
}

/// Moves a VM into `reset_pending` and records the attempt, both or neither. `None` when
/// the VM's incident changed meanwhile (another replica or request acted first).
pub async fn begin_attempt(
    conn: &mut Conn,
    expected: &Expected,
    count_attempt: bool,
    reason: &str,
    attempt: &NewAttempt,
) -> Result<Option<AttemptId>, DbError> {
    let attempts = expected.attempts + i64::from(count_attempt);
    write_transaction!(conn, |c| {
        let mut guard = diesel::update(vms::table)
            .filter(vms::id.eq(attempt.vm_id.get()))
            .filter(vms::remediation_phase.eq(expected.phase.as_str()))
            .filter(vms::incident_attempts.eq(expected.attempts))
            .into_boxed();
        guard = match expected.last_reset_ms {
            Some(t) => guard.filter(vms::last_reset_ms.eq(t)),
            None => guard.filter(vms::last_reset_ms.is_null()),
        };
        if let Some(vmid) = expected.linked_vmid {
            guard = guard
                .filter(vms::proxmox_vmid.eq(vmid))
                .filter(vms::link_verified.eq(true));
        }
        if let Some(last_seen) = expected.still_down_since {
            // Automatic: the VM must also still be opted in (an operator may have
            // turned auto-reset off while the evidence was gathered).
            guard = guard
                .filter(vms::status.eq(VmStatus::Down.as_str()))
                .filter(vms::auto_reset.eq(true));
            guard = match last_seen {
                Some(t) => guard.filter(vms::last_seen_ms.eq(t)),
                None => guard.filter(vms::last_seen_ms.is_null()),
            };
        }
        let updated = guard
            .set((
                vms::remediation_phase.eq(RemediationPhase::ResetPending.as_str()),
                vms::incident_attempts.eq(attempts),
                vms::last_reset_ms.eq(attempt.created_ms),
                vms::next_action_ms.eq(None::<i64>),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await?;
        if updated != 1 {
            return Ok(None);
        }
        let id: i64 = diesel::insert_into(reset_attempts::table)
            .values(attempt.row())
            .returning(reset_attempts::id)
            .get_result(c)
            .await?;
        Ok(Some(AttemptId(id)))
    })
}

/// Records an attempt that changes no incident state (shadow mode, left alone).
pub async fn record_attempt(conn: &mut Conn, attempt: &NewAttempt) -> Result<AttemptId, DbError> {
    let id: i64 = with_conn!(conn, |c| {
        diesel::insert_into(reset_attempts::table)
            .values(attempt.row())
            .returning(reset_attempts::id)
            .get_result(c)
            .await
    })?;
    Ok(AttemptId(id))
}

pub async fn mark_sent(
    conn: &mut Conn,
    attempt_id: AttemptId,
    upid: &str,
    now_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(reset_attempts::table.find(attempt_id.get()))
            .set((
                reset_attempts::upid.eq(upid),
                reset_attempts::sent_ms.eq(now_ms),
                reset_attempts::outcome.eq(AttemptOutcome::Sent.as_str()),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// An attempt's end, written together with its incident's next state.
#[derive(Clone, Copy, Debug)]
pub struct Close<'a> {
    pub attempt_id: AttemptId,
    pub outcome: AttemptOutcome,
    pub error: Option<&'a str>,
    pub now_ms: i64,
}

/// Closes an attempt and moves its VM's incident (as `set_phase`) in one transaction. As
/// two statements, a crash between them left the record closed and the VM `reset_pending`
/// with no open attempt: nothing reconciles that; the VM held a reset slot until it
/// reported again. The attempt is closed even when the VM is no longer in `only_if`.
pub async fn finish_attempt_and_set_phase(
    conn: &mut Conn,
    close: &Close<'_>,
    vm_id: VmId,
    only_if: Option<RemediationPhase>,
    phase: RemediationPhase,
    next_action_ms: Option<i64>,
    reason: &str,
) -> Result<bool, DbError> {
    change_phase(
        conn,
        Some(close),
        vm_id,
        only_if,
        phase,
        None,
        next_action_ms,
        reason,
    )
    .await
}

/// Sets a VM's incident state; with `only_if`, only when it is still in that phase.
pub async fn set_phase(
    conn: &mut Conn,
    vm_id: VmId,
    only_if: Option<RemediationPhase>,
    phase: RemediationPhase,
    attempts: Option<i64>,
    next_action_ms: Option<i64>,
    reason: &str,
) -> Result<bool, DbError> {
    change_phase(
        conn,
        None,
        vm_id,
        only_if,
        phase,
        attempts,
        next_action_ms,
        reason,
    )
    .await
}

#[expect(
    clippy::too_many_arguments,
    reason = "set_phase's fields and the attempt it closes"
)]
async fn change_phase(
    conn: &mut Conn,
    close: Option<&Close<'_>>,
    vm_id: VmId,
    only_if: Option<RemediationPhase>,
    phase: RemediationPhase,
    attempts: Option<i64>,
    next_action_ms: Option<i64>,
    reason: &str,
) -> Result<bool, DbError> {
    // A latch is news for a person: its event (which notifications tell) is written in the
    // same transaction, so no crash between the two loses it.
    let latched_at = crate::now_ms();
    let updated = write_transaction!(conn, |c| {
        if let Some(close) = close {
            diesel::update(reset_attempts::table.find(close.attempt_id.get()))
                .set((
                    reset_attempts::outcome.eq(close.outcome.as_str()),
                    reset_attempts::error.eq(close.error),
                    reset_attempts::finished_ms.eq(close.now_ms),
                ))
                .execute(c)
                .await?;
        }
        let mut query = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id.get()))
            .into_boxed();
        if let Some(expected) = only_if {
            query = query.filter(vms::remediation_phase.eq(expected.as_str()));
        }
        let n = match attempts {
            Some(n) => {
                query
                    .set((
                        vms::remediation_phase.eq(phase.as_str()),
                        vms::incident_attempts.eq(n),
                        vms::next_action_ms.eq(next_action_ms),
                        vms::phase_reason.eq(reason),
                    ))
                    .execute(c)
                    .await?
            }
            None => {
                query
                    .set((
                        vms::remediation_phase.eq(phase.as_str()),
                        vms::next_action_ms.eq(next_action_ms),
                        vms::phase_reason.eq(reason),
                    ))
                    .execute(c)
                    .await?
            }
        };
        if n == 1 && phase == RemediationPhase::Manual {
            diesel::insert_into(events::table)
                .values((
                    events::at_ms.eq(latched_at),
                    events::kind.eq(EventKind::LatchedManual.as_str()),
                    events::vm_id.eq(Some(vm_id.get())),
                    events::message.eq(reason),
                ))
                .execute(c)
                .await?;
        }
        Ok(n)
    })?;
    Ok(updated == 1)
}

/// A no-action state taken by a VM in phase `expected`, with its history row and event in
/// the same transaction: no reader ever sees the state without the record that explains it.
/// With `still_down_since`, only while the VM is still `down` with that last-seen time (a
/// heartbeat since wins). `false` when the VM moved on meanwhile: nothing is written.
#[expect(
    clippy::too_many_arguments,
    reason = "one latch's guard, state, record and event"
)]
pub async fn latch(
    conn: &mut Conn,
    expected: RemediationPhase,
    still_down_since: Option<Option<i64>>,
    phase: RemediationPhase,
    reason: &str,
    note: &NewAttempt,
    kind: EventKind,
    message: &str,
) -> Result<bool, DbError> {
    let vm_id = note.vm_id;
    write_transaction!(conn, |c| {
        let mut query = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id.get()))
            .filter(vms::remediation_phase.eq(expected.as_str()))
            .into_boxed();
        if let Some(last_seen) = still_down_since {
            query = query.filter(vms::status.eq(VmStatus::Down.as_str()));
            query = match last_seen {
                Some(t) => query.filter(vms::last_seen_ms.eq(t)),
                None => query.filter(vms::last_seen_ms.is_null()),
            };
        }
        let updated = query
            .set((
                vms::remediation_phase.eq(phase.as_str()),
                vms::next_action_ms.eq(None::<i64>),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await?;
        if updated != 1 {
            return Ok(false);
        }
        diesel::insert_into(reset_attempts::table)
            .values(note.row())
            .execute(c)
            .await?;
        diesel::insert_into(events::table)
            .values((
                events::at_ms.eq(note.created_ms),
                events::kind.eq(kind.as_str()),
                events::vm_id.eq(vm_id.get()),
                events::message.eq(message),
            ))
            .execute(c)
            .await?;
        Ok(true)
    })
}

/// Announces a hung VM's next power action: phase `reset_scheduled` until `until_ms`, only
/// while it is still `down` in phase `expected` with the last-seen time it was judged on.
pub async fn announce_while_down(
    conn: &mut Conn,
    vm_id: VmId,
    expected: RemediationPhase,
    last_seen_ms: Option<i64>,
    until_ms: i64,
    reason: &str,
) -> Result<bool, DbError> {
    let updated = with_conn!(conn, |c| {
        let mut query = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id.get()))
            .filter(vms::remediation_phase.eq(expected.as_str()))
            .filter(vms::status.eq(VmStatus::Down.as_str()))
            .filter(vms::auto_reset.eq(true))
            .into_boxed();
        query = match last_seen_ms {
            Some(t) => query.filter(vms::last_seen_ms.eq(t)),
            None => query.filter(vms::last_seen_ms.is_null()),
        };
        query
            .set((
                vms::remediation_phase.eq(RemediationPhase::ResetScheduled.as_str()),
                vms::next_action_ms.eq(until_ms),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(updated == 1)
}

/// Closes one attempt and opens the next in one transaction (a stop-start rung's start):
/// after a crash either the stop is still open or the start's intent is recorded. `None`
/// when the stop was already closed (another follower, another replica, got there first).
pub async fn finish_and_begin(
    conn: &mut Conn,
    finished: AttemptId,
    now_ms: i64,
    next: &NewAttempt,
) -> Result<Option<AttemptId>, DbError> {
    let open = [
        AttemptOutcome::Pending.as_str(),
        AttemptOutcome::Sent.as_str(),
    ];
    write_transaction!(conn, |c| {
        let closed = diesel::update(reset_attempts::table.find(finished.get()))
            .filter(reset_attempts::outcome.eq_any(open))
            .set((
                reset_attempts::outcome.eq(AttemptOutcome::Ok.as_str()),
                reset_attempts::error.eq(None::<&str>),
                reset_attempts::finished_ms.eq(now_ms),
            ))
            .execute(c)
            .await?;
        if closed != 1 {
            return Ok(None);
        }
        let id: i64 = diesel::insert_into(reset_attempts::table)
            .values(next.row())
            .returning(reset_attempts::id)
            .get_result(c)
            .await?;
        Ok(Some(AttemptId(id)))
    })
}

/// `defer` for a decision taken on a silent VM: only while it is still `down` with the
/// last-seen time it was judged on (a heartbeat since wins and keeps its clean state).
pub async fn defer_while_down(
    conn: &mut Conn,
    vm_id: VmId,
    last_seen_ms: Option<i64>,
    next_action_ms: i64,
    reason: &str,
) -> Result<(), DbError> {
    call_off(conn, vm_id, reason).await?;
    with_conn!(conn, |c| {
        let mut query = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id.get()))
            .filter(vms::status.eq(VmStatus::Down.as_str()))
            .into_boxed();
        query = match last_seen_ms {
            Some(t) => query.filter(vms::last_seen_ms.eq(t)),
            None => query.filter(vms::last_seen_ms.is_null()),
        };
        query
            .set((
                vms::next_action_ms.eq(next_action_ms),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// Notes why a VM was left alone and when to look again, without touching its phase.
/// Ends an announced action's countdown (the VM returns to `ok`; a later hung verdict is
/// announced afresh). `false` when the VM was not counting down.
pub async fn call_off(conn: &mut Conn, vm_id: VmId, reason: &str) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .filter(vms::remediation_phase.eq(RemediationPhase::ResetScheduled.as_str()))
            .set((
                vms::remediation_phase.eq(RemediationPhase::Ok.as_str()),
                vms::next_action_ms.eq(None::<i64>),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// Looks again at `next_action_ms`. A deferral also calls off an announced action: the
/// next hung verdict gets a window of its own.
pub async fn defer(
    conn: &mut Conn,
    vm_id: VmId,
    next_action_ms: i64,
    reason: &str,
) -> Result<(), DbError> {
    call_off(conn, vm_id, reason).await?;
    with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .set((
                vms::next_action_ms.eq(next_action_ms),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// Notes that a candidate waits for a free slot: the reason, and no time set for the next
/// look, so the next round takes it again.
pub async fn queue(conn: &mut Conn, vm_id: VmId, reason: &str) -> Result<(), DbError> {
    call_off(conn, vm_id, reason).await?;
    with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .set((
                vms::next_action_ms.eq(None::<i64>),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn set_auto_reset(conn: &mut Conn, vm_id: VmId, enabled: bool) -> Result<bool, DbError> {
    if !enabled {
        call_off(conn, vm_id, "auto-reset turned off for this VM").await?;
    }
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .set(vms::auto_reset.eq(enabled))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// Links a VM to a Proxmox guest (or unlinks it with `None`).
/// Removes a VM's link for good: a manual source with no guest, which link refreshes
/// respect (nothing is proposed again until an operator links the VM).
pub async fn unlink_by_operator(conn: &mut Conn, vm_id: VmId) -> Result<bool, DbError> {
    let columns = LinkColumns {
        proxmox_link_source: Some(LinkSource::Manual.as_str()),
        ..LinkColumns::of(None, false)
    };
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .set(&columns)
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// The link columns of `vms` as one write.
#[derive(diesel::AsChangeset)]
#[diesel(table_name = vms, treat_none_as_null = true)]
pub(crate) struct LinkColumns<'a> {
    proxmox_node: Option<&'a str>,
    proxmox_vmid: Option<i64>,
    proxmox_type: Option<&'static str>,
    proxmox_link_source: Option<&'static str>,
    link_verified: bool,
}

impl<'a> LinkColumns<'a> {
    pub(crate) fn of(link: Option<&'a (GuestRef, LinkSource)>, verified: bool) -> Self {
        Self {
            proxmox_node: link.map(|(g, _)| g.node.as_str()),
            proxmox_vmid: link.map(|(g, _)| g.vmid.get()),
            proxmox_type: link.map(|(g, _)| g.kind.as_str()),
            proxmox_link_source: link.map(|(_, s)| s.as_str()),
            link_verified: verified && link.is_some(),
        }
    }
}

/// Stores a VM's link; `verified` says whether remediation may act on it.
pub async fn set_link(
    conn: &mut Conn,
    vm_id: VmId,
    link: Option<&(GuestRef, LinkSource)>,
    verified: bool,
) -> Result<bool, DbError> {
    let columns = LinkColumns::of(link, verified);
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id.get()))
            .set(&columns)
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// The VMs other than `except` whose link (confirmed or proposed) names `guest`'s VMID
/// (unique in a cluster; the node is left out, as it may be stale after a migration): more
/// than one claimant makes the link ambiguous.
pub async fn other_claimants(
    conn: &mut Conn,
    guest: &GuestRef,
    except: VmId,
) -> Result<Vec<(VmId, bool)>, DbError> {
    let ids: Vec<(i64, bool)> = with_conn!(conn, |c| {
        vms::table
            .filter(vms::proxmox_vmid.eq(guest.vmid.get()))
            .filter(vms::id.ne(except.get()))
            .select((vms::id, vms::link_verified))
            .order(vms::id.asc())
            .load(c)
            .await
    })?;
    Ok(ids
        .into_iter()
        .map(|(id, verified)| (VmId(id), verified))
        .collect())
}

/// The link a VM had when it was read: a refresh writes only if it is still the same, so
/// an operator's confirmation or unlink made meanwhile is never overwritten.
#[derive(Clone, Debug)]
pub struct LinkAsRead {
    pub guest: Option<GuestRef>,
    pub source: Option<LinkSource>,
    pub verified: bool,
}

/// Like `set_link`, only if the VM's link is still `read`; false when it changed.
pub async fn replace_link(
    conn: &mut Conn,
    vm_id: VmId,
    read: &LinkAsRead,
    link: Option<&(GuestRef, LinkSource)>,
    verified: bool,
) -> Result<bool, DbError> {
    let columns = LinkColumns::of(link, verified);
    let n = with_conn!(conn, |c| {
        let mut guard = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id.get()))
            .filter(vms::link_verified.eq(read.verified))
            .into_boxed();
        guard = match &read.guest {
            Some(g) => guard
                .filter(vms::proxmox_node.eq(g.node.as_str()))
                .filter(vms::proxmox_vmid.eq(g.vmid.get()))
                .filter(vms::proxmox_type.eq(g.kind.as_str())),
            None => guard.filter(vms::proxmox_vmid.is_null()),
        };
        guard = match read.source {
            Some(s) => guard.filter(vms::proxmox_link_source.eq(s.as_str())),
            None => guard.filter(vms::proxmox_link_source.is_null()),
        };
        guard.set(&columns).execute(c).await
    })?;
    Ok(n == 1)
}

/// Attempts whose outcome a crash may have left open.
pub async fn unfinished_attempts(conn: &mut Conn) -> Result<Vec<AttemptRow>, DbError> {
    let open = [
        AttemptOutcome::Pending.as_str(),
        AttemptOutcome::Sent.as_str(),
    ];
    Ok(with_conn!(conn, |c| {
        reset_attempts::table
            .filter(reset_attempts::outcome.eq_any(open))
            .order(reset_attempts::id.asc())
            .select(AttemptRow::as_select())
            .load(c)
            .await
    })?)
}

#[derive(diesel::Queryable)]
struct EventRow {
    id: i64,
    at_ms: i64,
    kind: Stored<EventKind>,
    vm_id: Option<i64>,
    message: String,
}

pub async fn insert_event(
    conn: &mut Conn,
    kind: EventKind,
    vm_id: Option<VmId>,
    message: &str,
    now_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::insert_into(events::table)
            .values((
                events::at_ms.eq(now_ms),
                events::kind.eq(kind.as_str()),
                events::vm_id.eq(vm_id.map(VmId::get)),
                events::message.eq(message),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn recent_events(conn: &mut Conn, limit: i64) -> Result<Vec<Event>, DbError> {
    let rows: Vec<EventRow> = with_conn!(conn, |c| {
        events::table
            .order(events::id.desc())
            .limit(limit)
            .load(c)
            .await
    })?;
    Ok(rows
        .into_iter()
        .map(|r| Event {
            id: r.id,
            at_ms: r.at_ms,
            kind: r.kind.0,
            vm_id: r.vm_id.map(VmId),
            message: r.message,
        })
        .collect())
}
