//! Badges for a VM's health status and its remediation phase.

use domain::{RemediationPhase, VmStatus};
use leptos::prelude::*;

/// The health status as a coloured pill, e.g. `<span class="badge healthy">Healthy</span>`.
#[component]
pub fn StatusBadge(#[prop(into)] status: Signal<VmStatus>) -> impl IntoView {
    view! {
        <span class=move || format!("badge {}", status.get())>
            {move || status_label(status.get())}
        </span>
    }
}

/// The remediation phase, shown only while a VM is not in the `ok` phase.
#[component]
pub fn PhaseBadge(
    #[prop(into)] phase: Signal<RemediationPhase>,
    /// Why the VM is in this phase, shown as a tooltip.
    #[prop(into)]
    reason: Signal<Option<String>>,
) -> impl IntoView {
    move || {
        let phase = phase.get();
        phase_label(phase).map(|label| {
            view! {
                <span
                    class=format!("phase {}", phase.as_str())
                    title=move || reason.get().unwrap_or_default()
                >
                    {label}
                </span>
            }
        })
    }
}

pub fn status_label(status: VmStatus) -> &'static str {
    match status {
        VmStatus::Healthy => "Healthy",
        VmStatus::Warning => "Warning",
        VmStatus::Down => "Down",
        VmStatus::Unknown => "Unknown",
    }
}

pub fn phase_label(phase: RemediationPhase) -> Option<&'static str> {
    match phase {
        RemediationPhase::Ok => None,
        RemediationPhase::ResetPending => Some("reset pending"),
        RemediationPhase::Recovering => Some("recovering"),
        RemediationPhase::Manual => Some("manual"),
        RemediationPhase::AgentSilent => Some("agent silent"),
        RemediationPhase::GuestFault => Some("guest fault"),
        RemediationPhase::ResetScheduled => Some("reset scheduled"),
    }
}
