//! The fleet summary: how many VMs are in each status.

use domain::status::StatusCounts;
use leptos::prelude::*;

#[component]
pub fn SummaryCounts(#[prop(into)] counts: Signal<StatusCounts>) -> impl IntoView {
    let count = move |pick: fn(&StatusCounts) -> u64| Signal::derive(move || counts.with(pick));
    view! {
        <section class="summary" aria-label="Fleet summary">
            <Count label="Total" class="total" value=count(|c| c.total)/>
            <Count label="Healthy" class="healthy" value=count(|c| c.healthy)/>
            <Count label="Warning" class="warning" value=count(|c| c.warning)/>
            <Count label="Down" class="down" value=count(|c| c.down)/>
            <Count label="Unknown" class="unknown" value=count(|c| c.unknown)/>
        </section>
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
