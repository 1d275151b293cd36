//! The fleet page ("/"): summary counts and one row per VM, refreshed in place.

use crate::components::{RemediationBanner, SummaryCounts, TopBar, VmTable, use_signed_in};
use crate::error::AppError;
use crate::live::use_live;
use crate::model::{FleetModel, FleetQuery};
use crate::rpc::get_fleet;
use domain::view::FleetSnapshot;
use leptos::prelude::*;
use leptos_router::NavigateOptions;
use leptos_router::hooks::{use_navigate, use_query_map};

#[component]
pub fn FleetPage() -> impl IntoView {
    // Every change concerns the fleet page: a new VM, a status, a figure.
    let live = use_live(|_| true);
    let (hydrated, set_hydrated) = signal(false);
    let url = use_query_map();
    let query = Memo::new(move |_| url.with(|q| FleetQuery::from_url(|k| q.get(k))));
    // The server filters, orders and pages the fleet: a new filter or page fetches afresh.
    let fleet = Resource::new(
        move || (live.tick.get(), query.with(FleetQuery::to_url)),
        |(_, query)| get_fleet(query),
    );
    let who = use_signed_in();
    let can_operate = who.can_operate();
    // Effects run only in the browser: marks the page interactive once hydrated.
    Effect::new(move |_| set_hydrated.set(true));

    view! {
        <div class="page" data-hydrated=move || hydrated.get().to_string()>
            <TopBar who mode=live.mode/>
            <Transition fallback=|| view! { <p class="empty loading">"Loading fleet..."</p> }>
                <Fleet fleet query can_operate/>
            </Transition>
        </div>
    }
}

/// The fleet from the latest snapshot. Built once: every part follows signals derived from the
/// resource, so a refresh updates text in place instead of rebuilding the table. Rendered
/// inside the `Transition` so the server waits for the first snapshot.
#[component]
fn Fleet(
    fleet: Resource<Result<FleetSnapshot, AppError>>,
    query: Memo<FleetQuery>,
    can_operate: Signal<bool>,
) -> impl IntoView {
    // A failed refresh keeps the last good snapshot on screen, under the error.
    let model = Memo::new(move |prev: Option<&FleetModel>| {
        fleet.with(|result| match result {
            Some(Ok(snapshot)) => FleetModel::from(snapshot),
            _ => prev.cloned().unwrap_or_default(),
        })
    });
    let loaded = Memo::new(move |prev: Option<&bool>| {
        prev.copied().unwrap_or(false) || fleet.with(|result| matches!(result, Some(Ok(_))))
    });
    let error = Memo::new(move |_| {
        fleet.with(|result| match result {
            Some(Err(err)) => Some(err.clone()),
            _ => None,
        })
    });
    let remediation = Memo::new(move |_| model.with(|m| m.remediation.clone()));
    let counts = Memo::new(move |_| model.with(|m| m.counts.clone()));
    let phases = Memo::new(move |_| model.with(|m| m.phases.clone()));
    let nodes = Memo::new(move |_| model.with(|m| m.nodes.clone()));

    view! {
        {move || error.get().map(|err| view! { <p class="error" role="alert">{err.to_string()}</p> })}
        <Show when=move || loaded.get()>
            <RemediationBanner summary=remediation/>
            <SummaryCounts counts phases/>
            <Filters query nodes/>
            <VmTable fleet=model query can_operate/>
            <Pager fleet=model query/>
        </Show>
    }
}

/// Where this page sits among the matching VMs, with links to its neighbours.
#[component]
fn Pager(fleet: Memo<FleetModel>, query: Memo<FleetQuery>) -> impl IntoView {
    // (first shown, last shown, matching), counted from 1.
    let span = Memo::new(move |_| {
        fleet.with(|f| {
            let shown = u64::try_from(f.order.len()).unwrap_or(u64::MAX);
            (f.offset, f.offset.saturating_add(shown), f.matching)
        })
    });
    let link = move |page: u32| format!("/?{}", query.with(|q| q.on_page(page).to_url()));
    let page = move || query.with(|q| q.page);
    let more = move || span.with(|(_, last, matching)| last < matching);
    view! {
        <Show when=move || { page() > 0 || more() }>
            <nav class="pager" aria-label="Pages">
                <span>
                    {move || {
                        span.with(|(offset, last, matching)| {
                            format!("VMs {}-{last} of {matching}", offset.saturating_add(1))
                        })
                    }}
                </span>
                <Show when=move || { page() > 0 }>
                    <a rel="prev" href=move || link(page().saturating_sub(1))>"Previous"</a>
                </Show>
                <Show when=more>
                    <a rel="next" href=move || link(page().saturating_add(1))>"Next"</a>
                </Show>
            </nav>
        </Show>
    }
}

/// Status, node, OS and a name search; each change replaces the URL, so the view can be
/// shared and the back button does not step through keystrokes.
#[component]
fn Filters(query: Memo<FleetQuery>, nodes: Memo<Vec<String>>) -> impl IntoView {
    let navigate = use_navigate();
    let go = move |next: FleetQuery| {
        // A new filter starts from its first page.
        let url = next.on_page(0).to_url();
        let path = if url.is_empty() {
            "/".to_owned()
        } else {
            format!("/?{url}")
        };
        navigate(
            &path,
            NavigateOptions {
                replace: true,
                scroll: false,
                ..NavigateOptions::default()
            },
        );
    };
    let go_status = go.clone();
    let go_node = go.clone();
    let go_os = go.clone();
    let current = move || query.get_untracked();
    view! {
        <form class="filters" role="search" on:submit=|ev| ev.prevent_default()>
            <label>
                "Status "
                <select
                    name="status"
                    prop:value=move || query.with(|q| q.status.map(|s| s.to_string()).unwrap_or_default())
                    on:change=move |ev| {
                        go_status(FleetQuery {
                            status: event_target_value(&ev).parse().ok(),
                            ..current()
                        })
                    }
                >
                    <option value="">"all"</option>
                    <option value="down">"down"</option>
                    <option value="warning">"warning"</option>
                    <option value="unknown">"unknown"</option>
                    <option value="healthy">"healthy"</option>
                </select>
            </label>
            <label>
                "Node "
                <select
                    name="node"
                    prop:value=move || query.with(|q| q.node.clone().unwrap_or_default())
                    on:change=move |ev| {
                        let node = event_target_value(&ev);
                        go_node(FleetQuery {
                            node: (!node.is_empty()).then_some(node),
                            ..current()
                        })
                    }
                >
                    <option value="">"all"</option>
                    {move || {
                        nodes
                            .get()
                            .into_iter()
                            .map(|n| {
                                let label = n.clone();
                                view! { <option value=n>{label}</option> }
                            })
                            .collect_view()
                    }}
                </select>
            </label>
            <label>
                "OS "
                <select
                    name="os"
                    prop:value=move || query.with(|q| q.os.clone().unwrap_or_default())
                    on:change=move |ev| {
                        let os = event_target_value(&ev);
                        go_os(FleetQuery {
                            os: (!os.is_empty()).then_some(os),
                            ..current()
                        })
                    }
                >
                    <option value="">"all"</option>
                    <option value="linux">"linux"</option>
                    <option value="windows">"windows"</option>
                    <option value="other">"other"</option>
                </select>
            </label>
            <input
                type="search"
                name="q"
                placeholder="Find a host, or tag:name"
                aria-label="Find a host"
                prop:value=move || query.with(|q| q.text.clone())
                on:input=move |ev| {
                    go(FleetQuery {
                        text: event_target_value(&ev),
                        ..current()
                    })
                }
            />
        </form>
    }
}
