//! Operator actions on one VM, shared by the REST routes and the dashboard's server
//! functions: one implementation each, audited the same way whichever door it came through.

use crate::accounts::audit_quietly;
use crate::db::{incidents, store};
use crate::remediation::ActionError;
use crate::state::AppState;
use domain::{AttemptId, GuestRef, LinkSource, PowerAction, VmId};

/// A reset or shutdown through Proxmox, recorded in the VM's history under `who`.
pub async fn power(
    state: &AppState,
    who: &str,
    from: &str,
    vm: VmId,
    action: PowerAction,
) -> Result<AttemptId, ActionError> {
    let result = state.engine.manual_action(vm, action, who).await;
    let outcome = match &result {
        Ok(_) => "accepted".to_owned(),
        Err(err) => format!("refused: {err}"),
    };
    let target = format!("vm {vm}");
    audit_quietly(
        state,
        who,
        action.as_str(),
        Some(&target),
        from,
        &outcome,
        None,
    )
    .await;
    result
}

/// Holds the automatic power action announced for `vm` during its veto window.
pub async fn hold(state: &AppState, who: &str, from: &str, vm: VmId) -> Result<(), ActionError> {
    known(state, vm).await?;
    let result = match state.engine.hold_announced(vm, who).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ActionError::NothingAnnounced),
        Err(err) => Err(ActionError::Db(err)),
    };
    let outcome = match &result {
        Ok(()) => "held".to_owned(),
        Err(err) => format!("refused: {err}"),
    };
    let target = format!("vm {vm}");
    audit_quietly(state, who, "hold", Some(&target), from, &outcome, None).await;
    result
}

/// Clears a VM's latched state (manual, agent silent, guest fault) so automatic remediation
/// looks at it afresh.
pub async fn acknowledge(
    state: &AppState,
    who: &str,
    from: &str,
    vm: VmId,
) -> Result<(), ActionError> {
    known(state, vm).await?;
    let result = match state.engine.acknowledge(vm).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ActionError::NothingLatched),
        Err(err) => Err(ActionError::Db(err)),
    };
    if result.is_ok() {
        tracing::info!(vm_id = %vm, by = who, "latched state acknowledged");
    }
    let outcome = match &result {
        Ok(()) => "acknowledged".to_owned(),
        Err(err) => format!("refused: {err}"),
    };
    let target = format!("vm {vm}");
    audit_quietly(
        state,
        who,
        "acknowledge",
        Some(&target),
        from,
        &outcome,
        None,
    )
    .await;
    result
}

/// Opts one VM in or out of automatic power actions.
pub async fn set_auto_reset(
    state: &AppState,
    who: &str,
    from: &str,
    vm: VmId,
    enabled: bool,
) -> Result<(), ActionError> {
    let found = {
        let mut conn = state.db.conn().await?;
        incidents::set_auto_reset(&mut conn, vm, enabled).await?
    };
    if !found {
        return Err(ActionError::NotFound);
    }
    let target = format!("vm {vm}");
    let detail = if enabled { "on" } else { "off" };
    audit_quietly(
        state,
        who,
        "auto_reset",
        Some(&target),
        from,
        "success",
        Some(detail),
    )
    .await;
    crate::cache::refresh(&state.db, &state.cache, &[vm]).await;
    Ok(())
}

/// Confirms the Proxmox link an agent's report (or a name or uuid match) proposed for `vm`,
/// only if it is still exactly the guest the operator was shown and no other VM claims it.
pub async fn approve_link(
    state: &AppState,
    who: &str,
    from: &str,
    vm: VmId,
    seen: &GuestRef,
) -> Result<(), ActionError> {
    let result = approve(state, vm, seen).await;
    if matches!(result, Err(ActionError::NotFound)) {
        return result;
    }
    let outcome = match &result {
        Ok(()) => "approved".to_owned(),
        Err(err) => format!("refused: {err}"),
    };
    let target = format!("vm {vm}");
    let detail = format!("{} {} on {}", seen.kind, seen.vmid, seen.node);
    audit_quietly(
        state,
        who,
        "approve_link",
        Some(&target),
        from,
        &outcome,
        Some(&detail),
    )
    .await;
    if result.is_ok() {
        tracing::info!(vm_id = %vm, by = who, link = %detail, "proposed link approved");
        crate::cache::refresh(&state.db, &state.cache, &[vm]).await;
    }
    result
}

async fn approve(state: &AppState, vm: VmId, seen: &GuestRef) -> Result<(), ActionError> {
    let mut conn = state.db.conn().await?;
    let view = store::get_vm(&mut conn, vm)
        .await?
        .ok_or(ActionError::NotFound)?;
    let current = match (view.proxmox_node, view.proxmox_vmid, view.proxmox_type) {
        (Some(node), Some(vmid), Some(kind)) => GuestRef { node, vmid, kind },
        _ => return Err(ActionError::LinkChanged),
    };
    if view.link_verified || current != *seen {
        return Err(ActionError::LinkChanged);
    }
    let others = incidents::other_claimants(&mut conn, &current, vm).await?;
    if !others.is_empty() {
        let names: Vec<String> = others.iter().map(|(id, _)| format!("vm {id}")).collect();
        return Err(ActionError::LinkContested(names.join(", ")));
    }
    let read = incidents::LinkAsRead {
        guest: Some(current.clone()),
        source: view.proxmox_link_source,
        verified: false,
    };
    // Stored as an operator's link: the refresh keeps those approved, while a proposal's
    // own source (a reported VMID, a name) would be demoted again on its next round.
    // Written only if the link is still the one just read: a report that changed the
    // proposal in between makes this a refusal, not an approval of something unseen.
    let approved = (current, LinkSource::Manual);
    if incidents::replace_link(&mut conn, vm, &read, Some(&approved), true).await? {
        Ok(())
    } else {
        Err(ActionError::LinkChanged)
    }
}

/// `NotFound` for a VM the store does not hold, before anything is changed or audited.
async fn known(state: &AppState, vm: VmId) -> Result<(), ActionError> {
    let mut conn = state.db.conn().await?;
    store::get_vm(&mut conn, vm)
        .await?
        .map(|_| ())
        .ok_or(ActionError::NotFound)
}
