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
    let fleet = Resource::new(move || live.tick.get(), |_| get_fleet());
    let who = use_signed_in();
    let can_operate = who.can_operate();
    // Effects run only in the browser: marks the page interactive once hydrated.
    Effect::new(move |_| set_hydrated.set(true));

    view! {
        <div class="page" data-hydrated=move || hydrated.get().to_string()>
            <TopBar who mode=live.mode/>
            <Transition fallback=|| view! { <p class="empty">"Loading fleet..."</p> }>
                <Fleet fleet can_operate/>
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
    let phases = Memo::new(move |_| model.with(FleetModel::phases));
    let nodes = Memo::new(move |_| model.with(FleetModel::nodes));
    let url = use_query_map();
    let query = Memo::new(move |_| url.with(|q| FleetQuery::from_url(|k| q.get(k))));

    view! {
        {move || error.get().map(|err| view! { <p class="error" role="alert">{err.to_string()}</p> })}
        <Show when=move || loaded.get()>
            <RemediationBanner summary=remediation/>
            <SummaryCounts counts phases/>
            <Filters query nodes/>
            <VmTable fleet=model query can_operate/>
        </Show>
    }
}

/// Status, node, OS and a name search; each change replaces the URL, so the view can be
/// shared and the back button does not step through keystrokes.
#[component]
fn Filters(query: Memo<FleetQuery>, nodes: Memo<Vec<String>>) -> impl IntoView {
    let navigate = use_navigate();
    let go = move |next: FleetQuery| {
        let url = next.to_url();
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
                placeholder="Find a host"
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
