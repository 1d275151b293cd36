//! The banner saying whether automatic remediation is acting, and why not when it is not.

use domain::view::RemediationSummary;
use leptos::prelude::*;

#[component]
pub fn RemediationBanner(#[prop(into)] summary: Signal<RemediationSummary>) -> impl IntoView {
    view! {
        <p
            class=move || {
                if summary.with(|s| s.active) { "remediation on" } else { "remediation off" }
            }
            data-remediation=move || summary.with(|s| s.mode.clone())
        >
            {move || summary.with(|s| s.reason.clone())}
        </p>
    }
}
