//! The fleet page: summary counts and one row per VM, refreshed in place.

use crate::fleet::get_fleet;
use crate::format;
use crate::types::{FleetSnapshot, RemediationPhase, VmStatus, VmView};
use leptos::prelude::*;

/// How often the page asks for a fresh snapshot.
const REFRESH_MS: u64 = 2_000;

#[component]
pub fn FleetPage() -> impl IntoView {
    let (tick, set_tick) = signal(0u64);
    let (hydrated, set_hydrated) = signal(false);
    let fleet = Resource::new(move || tick.get(), |_| get_fleet());

    // Effects run only in the browser, so this marks the page as live once hydrated.
    Effect::new(move |_| {
        set_hydrated.set(true);
        set_interval(
            move || set_tick.update(|t| *t += 1),
            std::time::Duration::from_millis(REFRESH_MS),
        );
    });

    view! {
        <div class="page" data-hydrated=move || hydrated.get().to_string()>
            <header class="topbar">
                <h1>"vm-healthcheck"</h1>
                <span class="live" title="Refreshes every few seconds">
                    {move || if hydrated.get() { "live" } else { "loading" }}
                </span>
            </header>
            <Transition fallback=|| view! { <p class="empty">"Loading fleet..."</p> }>
                {move || {
                    fleet
                        .get()
                        .map(|result| match result {
                            Ok(snapshot) => view! { <Fleet snapshot/> }.into_any(),
                            Err(err) => {
                                view! { <p class="error" role="alert">{err.to_string()}</p> }
                                    .into_any()
                            }
                        })
                }}
            </Transition>
        </div>
    }
}

#[component]
fn Fleet(snapshot: FleetSnapshot) -> AnyView {
    let counts = snapshot.counts.clone();
    let now_ms = snapshot.now_ms;
    let empty = snapshot.vms.is_empty();
    let remediation = snapshot.remediation.clone();
    let banner_class = if remediation.active {
        "remediation on"
    } else {
        "remediation off"
    };
    view! {
        <p class=banner_class data-remediation=remediation.mode.clone()>{remediation.reason.clone()}</p>
        <section class="summary" aria-label="Fleet summary">
            <Count label="Total" value=counts.total class="total"/>
            <Count label="Healthy" value=counts.healthy class="healthy"/>
            <Count label="Warning" value=counts.warning class="warning"/>
            <Count label="Down" value=counts.down class="down"/>
            <Count label="Unknown" value=counts.unknown class="unknown"/>
        </section>
        <Show
            when=move || !empty
            fallback=|| {
                view! {
                    <p class="empty">
                        "No VM has reported yet. Install the agent on a VM to see it here."
                    </p>
                }
            }
        >
            <table class="vms">
                <thead>
                    <tr>
                        <th>"Status"</th>
                        <th>"Host"</th>
                        <th>"CPU"</th>
                        <th>"RAM"</th>
                        <th>"Disk"</th>
                        <th>"Uptime"</th>
                        <th>"Last seen"</th>
                    </tr>
                </thead>
                <tbody>
                    {snapshot
                        .vms
                        .clone()
                        .into_iter()
                        .map(|vm| view! { <VmRow vm now_ms/> })
                        .collect_view()}
                </tbody>
            </table>
        </Show>
    }
    .into_any()
}

#[component]
fn Count(label: &'static str, value: u64, class: &'static str) -> impl IntoView {
    view! {
        <div class=format!("count {class}") data-count=class>
            <span class="value">{value}</span>
            <span class="label">{label}</span>
        </div>
    }
}

#[component]
fn VmRow(vm: VmView, now_ms: i64) -> AnyView {
    let status = vm.status;
    let ram = format::percent_of(vm.ram_used_bytes, vm.ram_total_bytes);
    let disk = format::percent_of(vm.disk_used_bytes, vm.disk_total_bytes);
    let ram_detail = match (vm.ram_used_bytes, vm.ram_total_bytes) {
        (Some(used), Some(total)) => format!("{} / {}", format::bytes(used), format::bytes(total)),
        _ => String::new(),
    };
    let disk_detail = match (vm.disk_used_bytes, vm.disk_total_bytes) {
        (Some(used), Some(total)) => format!("{} / {}", format::bytes(used), format::bytes(total)),
        _ => String::new(),
    };
    view! {
        <tr class=format!("vm status-{status}") data-vm-id=vm.id>
            <td>
                <span class=format!("badge {status}")>{status_label(status)}</span>
                {phase_label(vm.remediation_phase)
                    .map(|label| {
                        view! {
                            <span
                                class=format!("phase {}", vm.remediation_phase.as_str())
                                title=vm.phase_reason.clone().unwrap_or_default()
                            >
                                {label}
                            </span>
                        }
                    })}
            </td>
            <td class="host">
                <span class="hostname">{vm.hostname.clone()}</span>
                <span class="os">{vm.os.clone()}</span>
            </td>
            <td>{percent(vm.cpu_percent)}</td>
            <td title=ram_detail>{percent(ram)}</td>
            <td title=disk_detail>{percent(disk)}</td>
            <td>{vm.uptime_seconds.map(format::duration).unwrap_or_else(|| "-".into())}</td>
            <td>
                {vm
                    .last_seen_ms
                    .map(|seen| format::age(seen, now_ms))
                    .unwrap_or_else(|| "never".into())}
            </td>
        </tr>
    }
    .into_any()
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.0}%"))
        .unwrap_or_else(|| "-".into())
}

fn phase_label(phase: RemediationPhase) -> Option<&'static str> {
    match phase {
        RemediationPhase::Ok => None,
        RemediationPhase::ResetPending => Some("reset pending"),
        RemediationPhase::Recovering => Some("recovering"),
        RemediationPhase::Manual => Some("manual"),
    }
}

fn status_label(status: VmStatus) -> &'static str {
    match status {
        VmStatus::Healthy => "Healthy",
        VmStatus::Warning => "Warning",
        VmStatus::Down => "Down",
        VmStatus::Unknown => "Unknown",
    }
}
