//! Queries for remediation: incident state on `vms`, the reset history, fleet events.

use super::schema::{events, reset_attempts, vms};
use super::store::ResetAttempt;
use super::{Conn, DbError};
use crate::with_conn;
use app::types::RemediationPhase;
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::Serialize;

/// A reset attempt about to be made (written before Proxmox is called).
#[derive(Clone, Debug, diesel::Insertable)]
#[diesel(table_name = reset_attempts)]
pub struct NewAttempt {
    pub vm_id: i64,
    pub action: String,
    pub trigger_source: String,
    pub requested_by: Option<String>,
    pub mode: String,
    pub proxmox_node: Option<String>,
    pub proxmox_vmid: Option<i64>,
    pub upid: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
    pub evidence_json: Option<String>,
    pub created_ms: i64,
    pub sent_ms: Option<i64>,
    pub finished_ms: Option<i64>,
}

/// The incident fields of a VM as the engine expects to find them (compare-and-set).
#[derive(Clone, Debug)]
pub struct Expected {
    pub phase: RemediationPhase,
    pub attempts: i64,
}

/// Moves a VM into `reset_pending` and records the attempt, both or neither. `None` when
/// the VM's incident changed meanwhile (another replica or request acted first).
pub async fn begin_attempt(
    conn: &mut Conn,
    expected: &Expected,
    count_attempt: bool,
    reason: &str,
    attempt: &NewAttempt,
) -> Result<Option<i64>, DbError> {
    let attempts = expected.attempts + i64::from(count_attempt);
    with_conn!(conn, |c| {
        c.transaction::<_, DbError, _>(async |c| {
            let updated = diesel::update(
                vms::table
                    .filter(vms::id.eq(attempt.vm_id))
                    .filter(vms::remediation_phase.eq(expected.phase.as_str()))
                    .filter(vms::incident_attempts.eq(expected.attempts)),
            )
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
                .values(attempt)
                .returning(reset_attempts::id)
                .get_result(c)
                .await?;
            Ok(Some(id))
        })
        .await
    })
}

/// Records an attempt that changes no incident state (shadow mode, left alone).
pub async fn record_attempt(conn: &mut Conn, attempt: &NewAttempt) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| {
        diesel::insert_into(reset_attempts::table)
            .values(attempt)
            .returning(reset_attempts::id)
            .get_result(c)
            .await
    })?)
}

pub async fn mark_sent(
    conn: &mut Conn,
    attempt_id: i64,
    upid: &str,
    now_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(reset_attempts::table.find(attempt_id))
            .set((
                reset_attempts::upid.eq(upid),
                reset_attempts::sent_ms.eq(now_ms),
                reset_attempts::outcome.eq("sent"),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn finish_attempt(
    conn: &mut Conn,
    attempt_id: i64,
    outcome: &str,
    error: Option<&str>,
    now_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(reset_attempts::table.find(attempt_id))
            .set((
                reset_attempts::outcome.eq(outcome),
                reset_attempts::error.eq(error),
                reset_attempts::finished_ms.eq(now_ms),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// Sets a VM's incident state; with `only_if`, only when it is still in that phase.
pub async fn set_phase(
    conn: &mut Conn,
    vm_id: i64,
    only_if: Option<RemediationPhase>,
    phase: RemediationPhase,
    attempts: Option<i64>,
    next_action_ms: Option<i64>,
    reason: &str,
) -> Result<bool, DbError> {
    let updated = with_conn!(conn, |c| {
        let mut query = diesel::update(vms::table)
            .filter(vms::id.eq(vm_id))
            .into_boxed();
        if let Some(expected) = only_if {
            query = query.filter(vms::remediation_phase.eq(expected.as_str()));
        }
        match attempts {
            Some(n) => {
                query
                    .set((
                        vms::remediation_phase.eq(phase.as_str()),
                        vms::incident_attempts.eq(n),
                        vms::next_action_ms.eq(next_action_ms),
                        vms::phase_reason.eq(reason),
                    ))
                    .execute(c)
                    .await
            }
            None => {
                query
                    .set((
                        vms::remediation_phase.eq(phase.as_str()),
                        vms::next_action_ms.eq(next_action_ms),
                        vms::phase_reason.eq(reason),
                    ))
                    .execute(c)
                    .await
            }
        }
    })?;
    Ok(updated == 1)
}

/// Notes why a VM was left alone and when to look again, without touching its phase.
pub async fn defer(
    conn: &mut Conn,
    vm_id: i64,
    next_action_ms: i64,
    reason: &str,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id))
            .set((
                vms::next_action_ms.eq(next_action_ms),
                vms::phase_reason.eq(reason),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn set_auto_reset(conn: &mut Conn, vm_id: i64, enabled: bool) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id))
            .set(vms::auto_reset.eq(enabled))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// Links a VM to a Proxmox guest (or unlinks it with `None`).
pub async fn set_link(
    conn: &mut Conn,
    vm_id: i64,
    link: Option<(&str, i64, &str)>,
    source: Option<&str>,
) -> Result<bool, DbError> {
    let (node, vmid, kind) = match link {
        Some((n, v, k)) => (Some(n), Some(v), Some(k)),
        None => (None, None, None),
    };
    let n = with_conn!(conn, |c| {
        diesel::update(vms::table.find(vm_id))
            .set((
                vms::proxmox_node.eq(node),
                vms::proxmox_vmid.eq(vmid),
                vms::proxmox_type.eq(kind),
                vms::proxmox_link_source.eq(source),
            ))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

/// Attempts whose outcome a crash may have left open.
pub async fn unfinished_attempts(conn: &mut Conn) -> Result<Vec<ResetAttempt>, DbError> {
    Ok(with_conn!(conn, |c| {
        reset_attempts::table
            .filter(reset_attempts::outcome.eq_any(["pending", "sent"]))
            .order(reset_attempts::id.asc())
            .load(c)
            .await
    })?)
}

/// One fleet-level event.
#[derive(Clone, Debug, PartialEq, Serialize, diesel::Queryable)]
pub struct Event {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub vm_id: Option<i64>,
    pub message: String,
}

pub async fn insert_event(
    conn: &mut Conn,
    kind: &str,
    vm_id: Option<i64>,
    message: &str,
    now_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::insert_into(events::table)
            .values((
                events::at_ms.eq(now_ms),
                events::kind.eq(kind),
                events::vm_id.eq(vm_id),
                events::message.eq(message),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn recent_events(conn: &mut Conn, limit: i64) -> Result<Vec<Event>, DbError> {
    Ok(with_conn!(conn, |c| {
        events::table
            .order(events::id.desc())
            .limit(limit)
            .load(c)
            .await
    })?)
}
