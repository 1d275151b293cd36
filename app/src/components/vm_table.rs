//! The VM table: one row per VM, keyed by VM id, each row following its own VM.

use crate::components::{PhaseBadge, StatusBadge};
use crate::format;
use crate::model::{FleetModel, FleetQuery, SortKey};
use crate::rpc::ActOnVm;
use domain::view::VmView;
use domain::{OperatorAction, RemediationPhase, VmId};
use leptos::prelude::*;

/// Rows keep their DOM nodes across refreshes: a refresh moves, adds or removes rows by id and
/// updates only the cells whose text changed.
#[component]
pub fn VmTable(
    #[prop(into)] fleet: Signal<FleetModel>,
    /// The filter and sort in force (from the page's URL).
    #[prop(into)]
    query: Signal<FleetQuery>,
    /// Whether the signed-in user may reset (operators and admins).
    can_operate: Signal<bool>,
) -> impl IntoView {
    let ids = Memo::new(move |_| query.with(|q| fleet.with(|f| f.select(q))));
    // The whole fleet's count: a filter (or a page) that shows nothing is not an empty fleet.
    let any = Memo::new(move |_| fleet.with(|f| f.counts.total > 0));
    let now_ms = Memo::new(move |_| fleet.with(|f| f.now_ms));
    let header = move |label: &'static str, key: SortKey| {
        let sorted = move || query.with(|q| q.sort == key);
        view! {
            <th aria-sort=move || {
                match (sorted(), query.with(|q| q.descending)) {
                    (false, _) => "none",
                    (true, false) => "ascending",
                    (true, true) => "descending",
                }
            }>
                <a
                    class="sort"
                    data-sort=key.as_str()
                    href=move || format!("/?{}", query.with(|q| q.sorted_by(key).to_url()))
                >
                    {label}
                </a>
            </th>
        }
    };
    view! {
        <Show
            when=move || any.get()
            fallback=|| {
                view! {
                    <p class="empty">
                        "No VM has reported yet. Install the agent on a VM to see it here."
                    </p>
                }
            }
        >
            <Show
                when=move || ids.with(|ids| !ids.is_empty())
                fallback=|| view! { <p class="empty">"No VM matches these filters."</p> }
            >
                <table class="vms">
                    <thead>
                        <tr>
                            {header("Status", SortKey::Status)}
                            {header("Host", SortKey::Name)}
                            {header("CPU", SortKey::Cpu)}
                            {header("RAM", SortKey::Ram)}
                            {header("Fullest disk", SortKey::Disk)}
                            <th>"Uptime"</th>
                            {header("Last seen", SortKey::LastSeen)}
                            <th></th>
                        </tr>
                    </thead>
                    <tbody>
                        <For
                            each=move || ids.get()
                            key=|id| *id
                            children=move |id| {
                                row_for(fleet, id)
                                    .map(|vm| view! { <VmRow vm now_ms can_operate/> })
                            }
                        />
                    </tbody>
                </table>
            </Show>
        </Show>
    }
}

/// The row's own view of its VM: it changes only when this VM's data does. Once the VM leaves
/// the fleet the row keeps its last data until the table drops it.
fn row_for(fleet: Signal<FleetModel>, id: VmId) -> Option<Memo<VmView>> {
    let first = fleet.with_untracked(|f| f.vm(id).cloned())?;
    Some(Memo::new(move |prev: Option<&VmView>| {
        fleet
            .with(|f| f.vm(id).cloned())
            .or_else(|| prev.cloned())
            .unwrap_or_else(|| first.clone())
    }))
}

#[component]
fn VmRow(vm: Memo<VmView>, now_ms: Memo<i64>, can_operate: Signal<bool>) -> impl IntoView {
    let id = vm.with_untracked(|v| v.id.get());
    let status = Memo::new(move |_| vm.with(|v| v.status));
    let phase = Memo::new(move |_| vm.with(|v| v.remediation_phase));
    let phase_reason = Memo::new(move |_| vm.with(|v| v.phase_reason.clone()));
    // A link the agent's report suggested is never acted on until an operator confirms it.
    let link_pending =
        Memo::new(move |_| vm.with(|v| v.proxmox_vmid.is_some() && !v.link_verified));
    let text = move |pick: fn(&VmView) -> String| move || vm.with(pick);
    view! {
        <tr class=move || format!("vm status-{}", status.get()) data-vm-id=id>
            <td>
                <StatusBadge status/>
                <PhaseBadge phase reason=phase_reason/>
                <Show when=move || link_pending.get()>
                    <span
                        class="phase link-pending"
                        title="auto-reset waits until an operator confirms this VM's Proxmox guest"
                    >
                        "link pending approval"
                    </span>
                </Show>
            </td>
            <td class="host">
                <a class="hostname" href=format!("/vms/{id}")>
                    {text(|v| v.hostname.clone())}
                </a>
                <span class="os">{text(|v| v.os.clone())}</span>
            </td>
            <td class="figure" data-label="CPU">
                <Usage value=Signal::derive(move || vm.with(|v| v.cpu_percent))/>
            </td>
            <td
                class="figure"
                data-label="RAM"
                title=text(|v| usage_detail(v.ram_used_bytes, v.ram_total_bytes))
            >
                <Usage value=Signal::derive(move || {
                    vm.with(|v| format::percent_of(v.ram_used_bytes, v.ram_total_bytes))
                })/>
            </td>
            <td
                class="figure"
                data-label="Disk"
                title=text(|v| usage_detail(v.disk_used_bytes, v.disk_total_bytes))
            >
                <Usage value=Signal::derive(move || vm.with(|v| v.disk_max_percent))/>
            </td>
            <td>{text(|v| v.uptime_seconds.map(format::duration).unwrap_or_else(|| "-".into()))}</td>
            <td>
                {move || {
                    vm.with(|v| v.last_seen_ms)
                        .map(|seen| format::age(seen, now_ms.get()))
                        .unwrap_or_else(|| "never".into())
                }}
            </td>
            <td class="actions">
                <RowActions vm id now_ms can_operate phase/>
            </td>
        </tr>
    }
}

/// The countdown of an announced automatic action with its Hold button, and Reset.
#[component]
fn RowActions(
    vm: Memo<VmView>,
    id: i64,
    now_ms: Memo<i64>,
    can_operate: Signal<bool>,
    phase: Memo<RemediationPhase>,
) -> impl IntoView {
    // Owned here, not by the button: a hold changes the phase, which removes the button, and
    // its answer must stay on screen.
    let hold = ServerAction::<ActOnVm>::new();
    let held = move || {
        hold.value().get().map(|r| match r {
            Ok(()) => "held".to_owned(),
            Err(err) => err.to_string(),
        })
    };
    view! {
        <Show when=move || phase.get() == RemediationPhase::ResetScheduled>
            <span class="countdown" role="timer">
                {move || {
                    vm.with(|v| v.next_action_ms)
                        .map(|at| format::countdown(at, now_ms.get()))
                        .unwrap_or_default()
                }}
            </span>
            <Show when=move || can_operate.get()>
                <HoldButton id hold/>
            </Show>
        </Show>
        <span class="action-result" role="status">{held}</span>
        <Show when=move || can_operate.get()>
            <ResetButton id/>
        </Show>
    }
}

/// Reset in two clicks: the first arms the button, the second sends the reset.
#[component]
fn ResetButton(id: i64) -> impl IntoView {
    let armed = RwSignal::new(false);
    let reset = ServerAction::<ActOnVm>::new();
    let result = move || {
        reset.value().get().map(|r| match r {
            Ok(()) => "reset sent".to_owned(),
            Err(err) => err.to_string(),
        })
    };
    view! {
        <button
            class="reset"
            class:armed=move || armed.get()
            disabled=move || reset.pending().get()
            on:click=move |_| {
                if armed.get() {
                    armed.set(false);
                    reset.dispatch(ActOnVm {
                        vm_id: id,
                        action: OperatorAction::Reset,
                    });
                } else {
                    armed.set(true);
                }
            }
        >
            {move || if armed.get() { "Confirm reset" } else { "Reset" }}
        </button>
        <span class="action-result" role="status">{result}</span>
    }
}

/// A percentage as a bar and its number (the number says it; the bar shows it at a glance).
#[component]
fn Usage(value: Signal<Option<f64>>) -> impl IntoView {
    view! {
        <meter min="0" max="100" value=move || crate::format::Fixed(value.get().unwrap_or(0.0), 1).to_string()></meter>
        <span class="number">{move || percent(value.get())}</span>
    }
}

/// Holds the automatic power action announced for this VM: one click, since holding is
/// the safe side (the VM then waits for an operator).
#[component]
fn HoldButton(id: i64, hold: ServerAction<ActOnVm>) -> impl IntoView {
    view! {
        <button
            class="hold"
            title="Do not send this automatic action; the VM waits for an operator"
            disabled=move || hold.pending().get()
            on:click=move |_| {
                hold.dispatch(ActOnVm {
                    vm_id: id,
                    action: OperatorAction::Hold,
                });
            }
        >
            "Hold"
        </button>
    }
}

fn usage_detail(used: Option<i64>, total: Option<i64>) -> String {
    match (used, total) {
        (Some(used), Some(total)) => format!("{} / {}", format::bytes(used), format::bytes(total)),
        _ => String::new(),
    }
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|v| format!("{}%", crate::format::Fixed(v, 0)))
        .unwrap_or_else(|| "-".into())
}
