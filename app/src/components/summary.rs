//! The fleet summary: how many VMs are in each status.

use crate::model::PhaseCounts;
use domain::status::StatusCounts;
use leptos::prelude::*;

#[component]
pub fn SummaryCounts(
    #[prop(into)] counts: Signal<StatusCounts>,
    /// Remediation states; a zero count is not shown.
    #[prop(into)]
    phases: Signal<PhaseCounts>,
) -> impl IntoView {
    let count = move |pick: fn(&StatusCounts) -> u64| Signal::derive(move || counts.with(pick));
    let phase = move |pick: fn(&PhaseCounts) -> u64| Signal::derive(move || phases.with(pick));
    view! {
        <section class="summary" aria-label="Fleet summary">
            <Count label="Total" class="total" value=count(|c| c.total)/>
            <Count label="Healthy" class="healthy" value=count(|c| c.healthy)/>
            <Count label="Warning" class="warning" value=count(|c| c.warning)/>
            <Count label="Down" class="down" value=count(|c| c.down)/>
            <Count label="Unknown" class="unknown" value=count(|c| c.unknown)/>
        </section>
        <ul class="phase-counts" aria-label="Remediation">
            <PhaseCount label="reset scheduled" value=phase(|p| p.scheduled)/>
            <PhaseCount label="reset pending" value=phase(|p| p.reset_pending)/>
            <PhaseCount label="recovering" value=phase(|p| p.recovering)/>
            <PhaseCount label="manual" value=phase(|p| p.manual)/>
            <PhaseCount label="link pending" value=phase(|p| p.link_pending)/>
        </ul>
    }
}

#[component]
fn PhaseCount(label: &'static str, value: Signal<u64>) -> impl IntoView {
    view! {
        <Show when=move || { value.get() > 0 }>
            <li data-phase-count=label>
                <span class="value">{move || value.get()}</span>
                " "
                {label}
            </li>
        </Show>
    }
}

#[component]
fn Count(label: &'static str, class: &'static str, value: Signal<u64>) -> impl IntoView {
    view! {
        <div class=format!("count {class}") data-count=class>
            <span class="value">{move || value.get()}</span>
            <span class="label">{label}</span>
        </div>
    }
}
