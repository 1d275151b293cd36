//! Agent credentials and enrolment tokens: the storage steps of the write path that decide
//! whose a report is, and the admin's operations on credentials and tokens.

use super::incidents::LinkColumns;
use super::schema::{agent_credentials, enrolment_tokens, events, vms};
use super::store::VmRow;
use super::{Conn, DbError, SqliteConn};
use crate::{with_conn, write_transaction};
use diesel::{
    BoolExpressionMethods, ExpressionMethods, NullableExpressionMethods, OptionalExtension,
    QueryDsl, QueryResult,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use domain::identity::CredentialState;
use domain::{EventKind, GuestKind, GuestRef, LinkSource, NodeName, RemediationPhase, VmId, Vmid};
use std::collections::HashMap;
use std::future::Future;

/// A credential in force (not revoked).
#[derive(Clone, Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = agent_credentials)]
pub struct CredentialRow {
    pub id: i64,
    pub vm_id: i64,
    pub token_hash: String,
    pub confirmed_ms: Option<i64>,
}

/// An enrolment token as stored.
#[derive(Clone, Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = enrolment_tokens)]
pub struct TokenRow {
    pub id: i64,
    pub token_hash: String,
    pub label: String,
    pub created_by: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub guest_node: Option<String>,
    pub guest_vmid: Option<i64>,
    pub guest_type: Option<String>,
    pub revoked_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
}

impl TokenRow {
    /// The guest this token links the VM it enrols to, when it is bound to one. A stored
    /// value that does not parse binds nothing and enrols nothing (see the caller).
    pub fn bound_guest(&self) -> Result<Option<GuestRef>, String> {
        match (&self.guest_node, self.guest_vmid, &self.guest_type) {
            (None, None, None) => Ok(None),
            (Some(node), Some(vmid), Some(kind)) => {
                let node: NodeName = node.parse().map_err(|e| format!("{e}"))?;
                let vmid = Vmid::try_from(vmid).map_err(|e| format!("{e}"))?;
                let kind: GuestKind = kind.parse().map_err(|e| format!("{e}"))?;
                Ok(Some(GuestRef { node, vmid, kind }))
            }
            _ => Err("partial guest binding".to_owned()),
        }
    }
}

/// A new enrolment token.
#[derive(diesel::Insertable)]
#[diesel(table_name = enrolment_tokens)]
pub struct NewToken<'a> {
    pub token_hash: &'a str,
    pub label: &'a str,
    pub created_by: &'a str,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub max_uses: Option<i64>,
    pub guest_node: Option<&'a str>,
    pub guest_vmid: Option<i64>,
    pub guest_type: Option<&'a str>,
}

/// Where each VM stands with its credentials, from the credentials in force.
pub fn states(rows: &[(i64, Option<i64>)]) -> HashMap<VmId, CredentialState> {
    let mut states = HashMap::new();
    for &(vm_id, confirmed) in rows {
        let state = if confirmed.is_some() {
            CredentialState::Enrolled
        } else {
            CredentialState::Issued
        };
        let entry = states.entry(VmId(vm_id)).or_insert(state);
        if state == CredentialState::Enrolled {
            *entry = state;
        }
    }
    states
}

/// The identity steps of the heartbeat write path, for either backend.
pub trait IdentityStore {
    /// Credentials in force among these hashes.
    fn credentials_by_hash(
        &mut self,
        hashes: &[&str],
    ) -> impl Future<Output = QueryResult<Vec<CredentialRow>>> + Send;

    fn tokens_by_hash(
        &mut self,
        hashes: &[&str],
    ) -> impl Future<Output = QueryResult<Vec<TokenRow>>> + Send;

    /// VM rows by id.
    fn vms_by_id(&mut self, ids: &[i64]) -> impl Future<Output = QueryResult<Vec<VmRow>>> + Send;

    /// `(vm_id, confirmed_ms)` of the credentials in force of these VMs.
    fn credentials_of(
        &mut self,
        vm_ids: &[i64],
    ) -> impl Future<Output = QueryResult<Vec<(i64, Option<i64>)>>> + Send;

    /// Makes `hash` the VM's credential in place of any unused one; `confirmed` for one
    /// an admin issues, which is the VM's identity at once.
    fn issue_credential(
        &mut self,
        vm_id: VmId,
        hash: &str,
        confirmed: bool,
        now_ms: i64,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// Marks first use: from now on the identity is taken.
    fn confirm_credentials(
        &mut self,
        ids: &[i64],
        now_ms: i64,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// Counts one use of a token, only while it is in force and under its limit (checked
    /// by the update itself, so replicas enrolling at once cannot overrun it).
    fn count_token_use(
        &mut self,
        token_id: i64,
        now_ms: i64,
    ) -> impl Future<Output = QueryResult<bool>> + Send;

    /// Links a VM to the guest its enrolment token was bound to (an admin's choice).
    fn link_bound_guest(
        &mut self,
        vm_id: VmId,
        guest: &GuestRef,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// Keeps a VM from being reset until an operator looks or its own agent reports.
    fn hold_for_operator(
        &mut self,
        vm_id: VmId,
        reason: &str,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// Records an event unless the same one was recorded within `window_ms`: a VM that
    /// repeats a claim every report must not flood the log.
    fn insert_event_once(
        &mut self,
        kind: EventKind,
        vm_id: VmId,
        message: &str,
        now_ms: i64,
        window_ms: i64,
    ) -> impl Future<Output = QueryResult<()>> + Send;
}

/// Same body for both connection types: diesel-async's query traits differ per backend.
macro_rules! identity_store {
    ($conn:ty) => {
        impl IdentityStore for $conn {
            async fn credentials_by_hash(
                &mut self,
                hashes: &[&str],
            ) -> QueryResult<Vec<CredentialRow>> {
                agent_credentials::table
                    .filter(agent_credentials::token_hash.eq_any(hashes))
                    .filter(agent_credentials::revoked_ms.is_null())
                    .select((
                        agent_credentials::id,
                        agent_credentials::vm_id,
                        agent_credentials::token_hash,
                        agent_credentials::confirmed_ms,
                    ))
                    .load(self)
                    .await
            }

            async fn tokens_by_hash(&mut self, hashes: &[&str]) -> QueryResult<Vec<TokenRow>> {
                enrolment_tokens::table
                    .filter(enrolment_tokens::token_hash.eq_any(hashes))
                    .select(<TokenRow as diesel::SelectableHelper<_>>::as_select())
                    .load(self)
                    .await
            }

            async fn vms_by_id(&mut self, ids: &[i64]) -> QueryResult<Vec<VmRow>> {
                vms::table
                    .filter(vms::id.eq_any(ids))
                    .select(<VmRow as diesel::SelectableHelper<_>>::as_select())
                    .load(self)
                    .await
            }

            async fn credentials_of(
                &mut self,
                vm_ids: &[i64],
            ) -> QueryResult<Vec<(i64, Option<i64>)>> {
                agent_credentials::table
                    .filter(agent_credentials::vm_id.eq_any(vm_ids))
                    .filter(agent_credentials::revoked_ms.is_null())
                    .select((agent_credentials::vm_id, agent_credentials::confirmed_ms))
                    .load(self)
                    .await
            }

            async fn issue_credential(
                &mut self,
                vm_id: VmId,
                hash: &str,
                confirmed: bool,
                now_ms: i64,
            ) -> QueryResult<()> {
                // An unused credential was never anyone's identity: it is simply replaced.
                diesel::delete(
                    agent_credentials::table
                        .filter(agent_credentials::vm_id.eq(vm_id.get()))
                        .filter(agent_credentials::confirmed_ms.is_null()),
                )
                .execute(self)
                .await?;
                if confirmed {
                    diesel::update(
                        agent_credentials::table
                            .filter(agent_credentials::vm_id.eq(vm_id.get()))
                            .filter(agent_credentials::revoked_ms.is_null()),
                    )
                    .set(agent_credentials::revoked_ms.eq(now_ms))
                    .execute(self)
                    .await?;
                }
                diesel::insert_into(agent_credentials::table)
                    .values((
                        agent_credentials::vm_id.eq(vm_id.get()),
                        agent_credentials::token_hash.eq(hash),
                        agent_credentials::created_ms.eq(now_ms),
                        agent_credentials::confirmed_ms.eq(confirmed.then_some(now_ms)),
                    ))
                    .execute(self)
                    .await?;
                Ok(())
            }

            async fn confirm_credentials(&mut self, ids: &[i64], now_ms: i64) -> QueryResult<()> {
                if ids.is_empty() {
                    return Ok(());
                }
                diesel::update(
                    agent_credentials::table
                        .filter(agent_credentials::id.eq_any(ids))
                        .filter(agent_credentials::confirmed_ms.is_null()),
                )
                .set(agent_credentials::confirmed_ms.eq(now_ms))
                .execute(self)
                .await?;
                Ok(())
            }

            async fn count_token_use(&mut self, token_id: i64, now_ms: i64) -> QueryResult<bool> {
                let n = diesel::update(
                    enrolment_tokens::table
                        .find(token_id)
                        .filter(enrolment_tokens::revoked_ms.is_null())
                        .filter(
                            enrolment_tokens::expires_ms
                                .is_null()
                                .or(enrolment_tokens::expires_ms.gt(now_ms)),
                        )
                        .filter(enrolment_tokens::max_uses.is_null().or(
                            enrolment_tokens::uses.lt(enrolment_tokens::max_uses.assume_not_null()),
                        )),
                )
                .set((
                    enrolment_tokens::uses.eq(enrolment_tokens::uses + 1),
                    enrolment_tokens::last_used_ms.eq(now_ms),
                ))
                .execute(self)
                .await?;
                Ok(n == 1)
            }

            async fn link_bound_guest(&mut self, vm_id: VmId, guest: &GuestRef) -> QueryResult<()> {
                let link = (guest.clone(), LinkSource::Manual);
                diesel::update(vms::table.find(vm_id.get()))
                    .set(&LinkColumns::of(Some(&link), true))
                    .execute(self)
                    .await?;
                Ok(())
            }

            async fn hold_for_operator(&mut self, vm_id: VmId, reason: &str) -> QueryResult<()> {
                // Only a VM at rest: an incident in progress keeps its own course.
                diesel::update(
                    vms::table
                        .find(vm_id.get())
                        .filter(vms::remediation_phase.eq(RemediationPhase::Ok.as_str())),
                )
                .set((
                    vms::remediation_phase.eq(RemediationPhase::Manual.as_str()),
                    vms::phase_reason.eq(reason),
                ))
                .execute(self)
                .await?;
                Ok(())
            }

            async fn insert_event_once(
                &mut self,
                kind: EventKind,
                vm_id: VmId,
                message: &str,
                now_ms: i64,
                window_ms: i64,
            ) -> QueryResult<()> {
                let recent: Option<i64> = events::table
                    .filter(
                        events::vm_id
                            .eq(vm_id.get())
                            .and(events::kind.eq(kind.as_str()))
                            .and(events::message.eq(message))
                            .and(events::at_ms.gt(now_ms.saturating_sub(window_ms))),
                    )
                    .select(events::id)
                    .first(self)
                    .await
                    .optional()?;
                if recent.is_none() {
                    diesel::insert_into(events::table)
                        .values((
                            events::at_ms.eq(now_ms),
                            events::kind.eq(kind.as_str()),
                            events::vm_id.eq(vm_id.get()),
                            events::message.eq(message),
                        ))
                        .execute(self)
                        .await?;
                }
                Ok(())
            }
        }
    };
}

identity_store!(AsyncPgConnection);
identity_store!(SqliteConn);

/// Issues a new credential for a VM (the old one stops working at once); false when the
/// VM does not exist.
pub async fn rotate_credential(
    conn: &mut Conn,
    vm_id: VmId,
    hash: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    write_transaction!(conn, |c| {
        let exists: Option<i64> = vms::table
            .find(vm_id.get())
            .select(vms::id)
            .first(c)
            .await
            .optional()?;
        if exists.is_none() {
            return Ok(false);
        }
        c.issue_credential(vm_id, hash, true, now_ms).await?;
        // Until its agent has the new credential its reports are refused: that silence
        // must not turn into a reset.
        c.hold_for_operator(vm_id, HELD_FOR_CREDENTIAL).await?;
        Ok(true)
    })
}

/// Revokes every credential of a VM; it may enrol again with a valid token. Returns how
/// many were in force. The VM is held from auto-reset: its reports are refused from now on,
/// and a refused report must never turn into a reset.
pub async fn revoke_credentials(
    conn: &mut Conn,
    vm_id: VmId,
    now_ms: i64,
) -> Result<usize, DbError> {
    write_transaction!(conn, |c| {
        let n = diesel::update(
            agent_credentials::table
                .filter(agent_credentials::vm_id.eq(vm_id.get()))
                .filter(agent_credentials::revoked_ms.is_null()),
        )
        .set(agent_credentials::revoked_ms.eq(now_ms))
        .execute(c)
        .await?;
        c.hold_for_operator(vm_id, HELD_FOR_CREDENTIAL).await?;
        Ok(n)
    })
}

const HELD_FOR_CREDENTIAL: &str = "held: its agent credential was rotated or revoked; auto-reset resumes when its agent \
     reports with a valid credential or an operator acknowledges";

/// Where each VM stands with its credentials (VMs absent have none).
pub async fn credential_states(conn: &mut Conn) -> Result<HashMap<VmId, CredentialState>, DbError> {
    let rows: Vec<(i64, Option<i64>)> = with_conn!(conn, |c| {
        agent_credentials::table
            .filter(agent_credentials::revoked_ms.is_null())
            .select((agent_credentials::vm_id, agent_credentials::confirmed_ms))
            .load(c)
            .await
    })?;
    Ok(states(&rows))
}

pub async fn create_token(conn: &mut Conn, token: &NewToken<'_>) -> Result<TokenRow, DbError> {
    let row = with_conn!(conn, |c| {
        diesel::insert_into(enrolment_tokens::table)
            .values(token)
            .returning(<TokenRow as diesel::SelectableHelper<_>>::as_returning())
            .get_result(c)
            .await
    })?;
    Ok(row)
}

pub async fn list_tokens(conn: &mut Conn) -> Result<Vec<TokenRow>, DbError> {
    let rows = with_conn!(conn, |c| {
        enrolment_tokens::table
            .order(enrolment_tokens::id.asc())
            .select(<TokenRow as diesel::SelectableHelper<_>>::as_select())
            .load(c)
            .await
    })?;
    Ok(rows)
}

/// Revokes a token; false when there is no such token in force.
pub async fn revoke_token(conn: &mut Conn, id: i64, now_ms: i64) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(
            enrolment_tokens::table
                .find(id)
                .filter(enrolment_tokens::revoked_ms.is_null()),
        )
        .set(enrolment_tokens::revoked_ms.eq(now_ms))
        .execute(c)
        .await
    })?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmed_credential_makes_the_identity_taken() {
        let s = states(&[(1, None), (2, Some(5)), (3, None), (3, Some(7))]);
        assert_eq!(s.get(&VmId(1)), Some(&CredentialState::Issued));
        assert_eq!(s.get(&VmId(2)), Some(&CredentialState::Enrolled));
        assert_eq!(s.get(&VmId(3)), Some(&CredentialState::Enrolled));
        assert_eq!(s.get(&VmId(4)), None);
    }
}
