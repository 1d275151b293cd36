//! One VM's page ("/vms/:id"): its status and why, its Proxmox link, charts over a chosen
//! range, its status changes and reset history with the evidence, and operators' actions.

use crate::components::chart::{self, Chart};
use crate::components::{PhaseBadge, StatusBadge, TopBar, use_signed_in};
use crate::error::AppError;
use crate::format;
use crate::live::use_live;
use crate::rpc::{ActOnVm, get_metrics, get_vm_page};
use domain::history::Tier;
use domain::view::{MetricHistory, ResetAttempt, StatusChange, VmPage, VmView};
use domain::{ChartRange, OperatorAction, RemediationPhase, TriggerSource, VmStatus};
use leptos::prelude::*;
use leptos_router::hooks::{use_params_map, use_query_map};

#[component]
pub fn VmDetailPage() -> impl IntoView {
    let params = use_params_map();
    let query = use_query_map();
    let id = Memo::new(move |_| params.with(|p| p.get("id").and_then(|v| v.parse::<i64>().ok())));
    // The range lives in the URL, so a view can be shared and back/forward work.
    let range = Memo::new(move |_| {
        query.with(|q| {
            q.get("range")
                .and_then(|r| r.parse::<ChartRange>().ok())
                .unwrap_or(ChartRange::Day)
        })
    });
    // Only changes naming this VM concern its page.
    let live = use_live(move |ids| id.get_untracked().is_some_and(|me| ids.contains(&me)));
    let tick = live.tick;
    let (hydrated, set_hydrated) = signal(false);
    let page = Resource::new(
        move || (id.get(), tick.get()),
        |(id, _)| async move {
            match id {
                Some(id) => get_vm_page(id).await,
                None => Err(AppError::NotFound),
            }
        },
    );
    let chart_tick = Memo::new(move |_| {
        if range.get() == ChartRange::Hour {
            tick.get()
        } else {
            tick.get() / 6
        }
    });
    let metrics = Resource::new(
        move || (id.get(), range.get(), chart_tick.get()),
        |(id, range, _)| async move {
            match id {
                Some(id) => get_metrics(id, range).await,
                None => Err(AppError::NotFound),
            }
        },
    );
    let who = use_signed_in();
    let can_operate = who.can_operate();
    Effect::new(move |_| set_hydrated.set(true));
    let refresh = live.refresh;

    view! {
        <div class="page vm-page" data-hydrated=move || hydrated.get().to_string()>
            <TopBar who mode=live.mode/>
            <Transition fallback=|| view! { <p class="empty loading">"Loading..."</p> }>
                <VmBody page metrics range id can_operate refresh/>
            </Transition>
        </div>
    }
}

/// Built once inside the `Transition` (so the server waits for the first answers): every
/// part follows memos of the resources, and the last good answers stay on screen when a
/// refresh fails.
#[component]
fn VmBody(
    page: Resource<Result<VmPage, AppError>>,
    metrics: Resource<Result<MetricHistory, AppError>>,
    range: Memo<ChartRange>,
    id: Memo<Option<i64>>,
    can_operate: Signal<bool>,
    refresh: Callback<()>,
) -> impl IntoView {
    let model = Memo::new(move |prev: Option<&Option<VmPage>>| {
        page.with(|r| match r {
            Some(Ok(p)) => Some(p.clone()),
            _ => prev.cloned().flatten(),
        })
    });
    let error = Memo::new(move |_| {
        page.with(|r| match r {
            Some(Err(err)) => Some(err.to_string()),
            _ => None,
        })
    });
    let history = Memo::new(move |prev: Option<&Option<MetricHistory>>| {
        metrics.with(|r| match r {
            Some(Ok(h)) => Some(h.clone()),
            _ => prev.cloned().flatten(),
        })
    });
    view! {
        {move || error.get().map(|err| view! { <p class="error" role="alert">{err}</p> })}
        <Show when=move || model.with(Option::is_some)>
            <Overview model can_operate refresh/>
            <Charts history range id/>
            <Timeline model/>
            <History model/>
        </Show>
    }
}

fn with_vm<T: Default>(model: Memo<Option<VmPage>>, pick: impl Fn(&VmView) -> T) -> T {
    model.with(|m| m.as_ref().map(|p| pick(&p.vm)).unwrap_or_default())
}

/// Name, status with its reason, figures, the Proxmox link and the actions.
#[component]
fn Overview(
    model: Memo<Option<VmPage>>,
    can_operate: Signal<bool>,
    refresh: Callback<()>,
) -> impl IntoView {
    let status =
        Memo::new(move |_| with_vm(model, |v| Some(v.status)).unwrap_or(VmStatus::Unknown));
    let phase = Memo::new(move |_| {
        with_vm(model, |v| Some(v.remediation_phase)).unwrap_or(RemediationPhase::Ok)
    });
    let phase_reason = Memo::new(move |_| with_vm(model, |v| v.phase_reason.clone()));
    let now_ms = Memo::new(move |_| model.with(|m| m.as_ref().map_or(0, |p| p.now_ms)));
    let text = move |pick: fn(&VmView) -> String| move || with_vm(model, pick);
    view! {
        <header class="vm-head">
            <h1 class="hostname">{text(|v| v.hostname.clone())}</h1>
            <StatusBadge status/>
            <PhaseBadge phase reason=phase_reason/>
            <p class="reason">{text(|v| v.status_reason.clone())}</p>
            <p class="reason phase-reason">{move || phase_reason.get().unwrap_or_default()}</p>
        </header>
        <dl class="figures">
            <div>
                <dt>"CPU"</dt>
                <dd>{text(|v| percent(v.cpu_percent))}</dd>
            </div>
            <div>
                <dt>"RAM"</dt>
                <dd>{text(|v| percent(format::percent_of(v.ram_used_bytes, v.ram_total_bytes)))}</dd>
            </div>
            <div>
                <dt>"Fullest disk"</dt>
                <dd>{text(|v| percent(v.disk_max_percent))}</dd>
            </div>
            <div>
                <dt>"Uptime"</dt>
                <dd>{text(|v| v.uptime_seconds.map(format::duration).unwrap_or_else(|| "-".into()))}</dd>
            </div>
            <div>
                <dt>"Last seen"</dt>
                <dd>
                    {move || {
                        with_vm(model, |v| v.last_seen_ms)
                            .map(|seen| format::age(seen, now_ms.get()))
                            .unwrap_or_else(|| "never".into())
                    }}
                </dd>
            </div>
            <div>
                <dt>"System"</dt>
                <dd>
                    {text(|v| {
                        format!("{} · agent {}", v.os, v.agent_version.as_deref().unwrap_or("?"))
                    })}
                </dd>
            </div>
            <div>
                <dt>"Proxmox"</dt>
                <dd class="link">{text(proxmox_link)}</dd>
            </div>
            <div>
                <dt>"Auto-reset"</dt>
                <dd>{text(|v| if v.auto_reset { "on".into() } else { "off for this VM".into() })}</dd>
            </div>
        </dl>
        <Show when=move || phase.get() == RemediationPhase::ResetScheduled>
            <p class="countdown" role="timer">
                {move || {
                    with_vm(model, |v| v.next_action_ms)
                        .map(|at| format::countdown(at, now_ms.get()))
                        .unwrap_or_default()
                }}
            </p>
        </Show>
        <Show when=move || can_operate.get()>
            <Actions model phase refresh/>
        </Show>
    }
}

fn proxmox_link(v: &VmView) -> String {
    match (&v.proxmox_node, v.proxmox_vmid) {
        (Some(node), Some(vmid)) => {
            let kind = v.proxmox_type.map_or("guest", |k| k.as_str());
            let how = v
                .proxmox_link_source
                .map(|s| format!(", linked by {s}"))
                .unwrap_or_default();
            let state = if v.link_verified {
                ""
            } else {
                " (pending approval)"
            };
            format!("{kind} {vmid} on {node}{how}{state}")
        }
        _ => "not linked".into(),
    }
}

/// What an operator may do here; the power actions ask first, naming the VM and its node.
#[component]
fn Actions(
    model: Memo<Option<VmPage>>,
    phase: Memo<RemediationPhase>,
    refresh: Callback<()>,
) -> impl IntoView {
    let act = ServerAction::<ActOnVm>::new();
    let asking = RwSignal::new(None::<OperatorAction>);
    let id = move || model.with(|m| m.as_ref().map_or(0, |p| p.vm.id.get()));
    let send = move |action: OperatorAction| {
        asking.set(None);
        act.dispatch(ActOnVm {
            vm_id: id(),
            action,
        });
    };
    // Refresh once an action has been answered, so its effect shows at once.
    Effect::new(move |_| {
        if act.value().with(Option::is_some) {
            refresh.run(());
        }
    });
    let result = move || {
        act.value().get().map(|r| match r {
            Ok(()) => "done".to_owned(),
            Err(err) => err.to_string(),
        })
    };
    let latched = move || {
        matches!(
            phase.get(),
            RemediationPhase::Manual | RemediationPhase::AgentSilent | RemediationPhase::GuestFault
        )
    };
    let auto_reset = move || with_vm(model, |v| v.auto_reset);
    let question = move || {
        let what = match asking.get()? {
            OperatorAction::Reset => "Hard reset",
            OperatorAction::Shutdown => "Shut down",
            _ => return None,
        };
        let (name, place) = model.with(|m| {
            m.as_ref()
                .map(|p| (p.vm.hostname.clone(), proxmox_link(&p.vm)))
                .unwrap_or_default()
        });
        Some(format!("{what} {name} ({place})?"))
    };
    view! {
        <section class="actions" aria-label="Actions">
            <Show when=move || phase.get() == RemediationPhase::ResetScheduled>
                <button class="hold" on:click=move |_| send(OperatorAction::Hold)>
                    "Hold the automatic action"
                </button>
            </Show>
            <button
                class="reset"
                disabled=move || act.pending().get()
                on:click=move |_| asking.set(Some(OperatorAction::Reset))
            >
                "Reset"
            </button>
            <button
                class="shutdown"
                disabled=move || act.pending().get()
                on:click=move |_| asking.set(Some(OperatorAction::Shutdown))
            >
                "Shut down"
            </button>
            <Show when=latched>
                <button class="acknowledge" on:click=move |_| send(OperatorAction::Acknowledge)>
                    "Acknowledge"
                </button>
            </Show>
            <button
                class="auto-reset"
                on:click=move |_| {
                    send(
                        if auto_reset() {
                            OperatorAction::AutoResetOff
                        } else {
                            OperatorAction::AutoResetOn
                        },
                    )
                }
            >
                {move || if auto_reset() { "Turn auto-reset off" } else { "Turn auto-reset on" }}
            </button>
            <a class="edit-link" href=move || format!("/link?vm={}", id())>
                "Proxmox link"
            </a>
            <a class="edit-link snooze-link" href=move || format!("/alerts?vm={}", id())>
                "Snooze or tag"
            </a>
            <span class="action-result" role="status">{result}</span>
            {move || {
                question()
                    .map(|q| {
                        view! {
                            <div class="confirm" role="alertdialog" aria-label="Confirm">
                                <p>{q}</p>
                                <button
                                    class="confirm-yes"
                                    on:click=move |_| {
                                        if let Some(action) = asking.get() {
                                            send(action);
                                        }
                                    }
                                >
                                    "Yes, do it"
                                </button>
                                <button class="confirm-no" on:click=move |_| asking.set(None)>
                                    "Cancel"
                                </button>
                            </div>
                        }
                    })
            }}
        </section>
    }
}

/// The range picker and the three charts.
#[component]
fn Charts(
    history: Memo<Option<MetricHistory>>,
    range: Memo<ChartRange>,
    id: Memo<Option<i64>>,
) -> impl IntoView {
    let as_signal = Signal::derive(move || history.get());
    let source = move || {
        history.with(|h| {
            h.as_ref().map(|h| {
                let tier = match h.tier {
                    Tier::Raw => "raw samples",
                    Tier::Minute => "minute rollups",
                    Tier::Hour => "hour rollups",
                };
                format!(
                    "{tier}, one point per {}; min to max shaded, gaps where the VM was silent",
                    format::duration(h.point_ms / 1000)
                )
            })
        })
    };
    view! {
        <section class="charts" aria-label="History">
            <nav class="ranges">
                {ChartRange::ALL
                    .iter()
                    .map(|r| {
                        let r = *r;
                        view! {
                            <a
                                href=move || format!("/vms/{}?range={r}", id.get().unwrap_or_default())
                                class:active=move || range.get() == r
                                data-range=r.as_str()
                            >
                                {r.as_str()}
                            </a>
                        }
                    })
                    .collect_view()}
            </nav>
            <p class="chart-source" data-tier=move || history.with(|h| h.as_ref().map(|h| h.tier.as_str()))>
                {source}
            </p>
            <Chart title="CPU" metric="cpu" history=as_signal pick=chart::cpu/>
            <Chart title="RAM" metric="ram" history=as_signal pick=chart::ram/>
            <Chart title="Fullest disk" metric="disk" history=as_signal pick=chart::disk/>
        </section>
    }
}

#[component]
fn Timeline(model: Memo<Option<VmPage>>) -> impl IntoView {
    let changes = move || {
        model.with(|m| {
            m.as_ref()
                .map(|p| (p.now_ms, p.status_changes.clone()))
                .unwrap_or_default()
        })
    };
    view! {
        <section class="timeline" aria-label="Status changes">
            <h2>"Status changes"</h2>
            {move || {
                let (now_ms, changes) = changes();
                if changes.is_empty() {
                    return view! { <p class="empty">"No change recorded."</p> }.into_any();
                }
                view! {
                    <ol>
                        {changes
                            .into_iter()
                            .map(|c: StatusChange| {
                                view! {
                                    <li class=format!("to-{}", c.to_status)>
                                        <span class="when">{format::age(c.at_ms, now_ms)}</span>
                                        <span class="change">
                                            {format!("{} → {}", c.from_status, c.to_status)}
                                        </span>
                                        <span class="why">{c.reason}</span>
                                    </li>
                                }
                            })
                            .collect_view()}
                    </ol>
                }
                    .into_any()
            }}
        </section>
    }
}

#[component]
fn History(model: Memo<Option<VmPage>>) -> impl IntoView {
    let rows = move || {
        model.with(|m| {
            m.as_ref()
                .map(|p| (p.now_ms, p.history.clone()))
                .unwrap_or_default()
        })
    };
    view! {
        <section class="reset-history" aria-label="Reset history">
            <h2>"Power actions"</h2>
            {move || {
                let (now_ms, rows) = rows();
                if rows.is_empty() {
                    return view! { <p class="empty">"None yet."</p> }.into_any();
                }
                view! {
                    <table class="history">
                        <thead>
                            <tr>
                                <th>"When"</th>
                                <th>"Who"</th>
                                <th>"Action"</th>
                                <th>"Outcome"</th>
                                <th>"Took"</th>
                                <th>"Why / evidence"</th>
                            </tr>
                        </thead>
                        <tbody>
                            {rows.into_iter().map(|a| history_row(a, now_ms)).collect_view()}
                        </tbody>
                    </table>
                }
                    .into_any()
            }}
        </section>
    }
}

fn history_row(a: ResetAttempt, now_ms: i64) -> impl IntoView {
    let who = match (a.trigger_source, &a.requested_by) {
        (TriggerSource::Scheduler, _) => "scheduler".to_owned(),
        (_, Some(name)) => name.clone(),
        (_, None) => "operator".to_owned(),
    };
    let took = a
        .finished_ms
        .map(|end| format::duration((end - a.created_ms).max(0) / 1000))
        .unwrap_or_else(|| "-".into());
    let evidence = a.evidence_json.clone();
    view! {
        <tr class=format!("outcome-{}", a.outcome)>
            <td>{format::age(a.created_ms, now_ms)}</td>
            <td class="who">{who}</td>
            <td>{a.action.to_string()}</td>
            <td class="outcome">
                {a.outcome.to_string()}
                <span class="upid">{a.upid.unwrap_or_default()}</span>
            </td>
            <td>{took}</td>
            <td class="why">
                {a.error.unwrap_or_default()}
                {evidence
                    .map(|json| {
                        view! {
                            <details>
                                <summary>"evidence"</summary>
                                <pre>{json}</pre>
                            </details>
                        }
                    })}
            </td>
        </tr>
    }
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|v| format!("{}%", crate::format::Fixed(v, 0)))
        .unwrap_or_else(|| "-".into())
}
