//! The admin pages (settings, add a VM, users, tokens, audit, link approvals): one view that
//! draws whatever [`Panel`] the server describes, so a new admin page costs the browser
//! bundle nothing.

use crate::components::{TopBar, use_signed_in};
use crate::live::use_live;
use crate::rpc::{SubmitPanel, get_panel};
use domain::PanelName;
use domain::panel::{CodeBlock, Field, FieldKind, Form, Outcome, Panel, Section, Table};
use leptos::prelude::*;
use leptos_router::hooks::{use_location, use_navigate};

/// The answer to the latest submission of each form, by its action: kept outside the
/// sections, so a token shown once survives the page reading itself again.
type Outcomes = RwSignal<Vec<(String, Outcome)>>;

#[derive(Clone, Copy)]
struct PanelContext {
    name: PanelName,
    outcomes: Outcomes,
    submit: ServerAction<SubmitPanel>,
    /// The action of the submission in flight.
    sent: RwSignal<String>,
}

#[component]
pub fn PanelPage(name: PanelName) -> impl IntoView {
    let follows = name.follows_fleet();
    let live = use_live(move |_| follows);
    let who = use_signed_in();
    let (hydrated, set_hydrated) = signal(false);
    Effect::new(move |_| set_hydrated.set(true));
    let search = use_location().search;
    let submit = ServerAction::<SubmitPanel>::new();
    let outcomes: Outcomes = RwSignal::new(Vec::new());
    let sent = RwSignal::new(String::new());
    // File each answer under the action that was sent; the page reads itself again after
    // every answer (the resource follows the action's version).
    Effect::new(move |_| {
        let Some(answer) = submit.value().get() else {
            return;
        };
        let outcome = answer.unwrap_or_else(|err| Outcome::refused(err.to_string()));
        let action = sent.get_untracked();
        outcomes.update(|all| {
            all.retain(|(a, _)| *a != action);
            all.push((action, outcome));
        });
    });
    let panel = Resource::new(
        move || (search.get(), live.tick.get(), submit.version().get()),
        move |(query, _, _)| get_panel(name, query),
    );
    provide_context(PanelContext {
        name,
        outcomes,
        submit,
        sent,
    });
    view! {
        <div class="page panel" data-hydrated=move || hydrated.get().to_string()>
            <TopBar who mode=live.mode/>
            <Transition fallback=|| view! { <p class="empty">"Loading..."</p> }>
                {move || {
                    panel
                        .get()
                        .map(|result| match result {
                            Ok(panel) => panel_view(panel).into_any(),
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

fn panel_view(panel: Panel) -> impl IntoView {
    view! {
        <h2 class="panel-title">{panel.title}</h2>
        // Keyed by content: a section that did not change keeps its DOM, and with it what
        // the user is typing.
        <For each=move || panel.sections.clone() key=Clone::clone children=section_view/>
    }
}

fn section_view(section: Section) -> impl IntoView {
    let Section {
        heading,
        text,
        code,
        form,
        table,
    } = section;
    view! {
        <section class="panel-section">
            <h3>{heading}</h3>
            {text.into_iter().map(|p| view! { <p class="hint">{p}</p> }).collect_view()}
            {code.into_iter().map(code_view).collect_view()}
            {form.map(form_view)}
            {table.map(table_view)}
        </section>
    }
}

fn code_view(block: CodeBlock) -> impl IntoView {
    let (copied, set_copied) = signal(false);
    let text = block.text.clone();
    view! {
        <div class="code-block">
            <div class="code-head">
                <span>{block.label}</span>
                <button
                    type="button"
                    class="copy"
                    on:click=move |_| {
                        copy_to_clipboard(&text);
                        set_copied.set(true);
                    }
                >
                    {move || if copied.get() { "Copied" } else { "Copy" }}
                </button>
            </div>
            <pre class="code">{block.text}</pre>
        </div>
    }
}

fn form_view(form: Form) -> impl IntoView {
    let ctx = expect_context::<PanelContext>();
    let navigate = use_navigate();
    let Form {
        action,
        submit,
        fields,
        filter,
    } = form;
    let mine = action.clone();
    let outcome = Memo::new(move |_| {
        ctx.outcomes
            .with(|all| all.iter().find(|(a, _)| *a == mine).map(|(_, o)| o.clone()))
    });
    let sent = action.clone();
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let (encoded, _) = read_form(&ev);
        if filter {
            let path = use_location_path();
            navigate(&format!("{path}?{encoded}"), Default::default());
        } else {
            send(ctx, sent.clone(), encoded);
        }
    };
    view! {
        <form class="panel-form" data-action=action on:submit=on_submit>
            {fields.into_iter().map(|f| field_view(f, outcome)).collect_view()}
            <div class="form-foot">
                <button type="submit" disabled=move || ctx.submit.pending().get()>
                    {submit}
                </button>
                {move || outcome.get().map(outcome_view)}
            </div>
        </form>
    }
}

fn field_view(field: Field, outcome: Memo<Option<Outcome>>) -> impl IntoView {
    let Field {
        name,
        label,
        kind,
        value,
        help,
    } = field;
    let id = format!("f-{name}");
    let mine = name.clone();
    let error = move || {
        outcome.with(|o| {
            o.as_ref()?
                .errors
                .iter()
                .find(|e| e.field == mine)
                .map(|e| e.message.clone())
        })
    };
    let input = match kind {
        FieldKind::Choice(options) => {
            let current = value.clone();
            view! {
                <select id=id.clone() name=name.clone()>
                    {options
                        .into_iter()
                        .map(|o| {
                            let selected = o == current;
                            let text = o.clone();
                            view! {
                                <option value=o selected=selected>
                                    {text}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
            }
            .into_any()
        }
        other => {
            let kind = match other {
                FieldKind::Number => "text",
                FieldKind::Password => "password",
                _ => "text",
            };
            let mode = if matches!(other, FieldKind::Number) {
                "decimal"
            } else {
                "text"
            };
            view! { <input id=id.clone() name=name.clone() type=kind inputmode=mode value=value/> }
                .into_any()
        }
    };
    view! {
        <div class="field" data-field=name>
            <label for=id>{label}</label>
            {input}
            {(!help.is_empty()).then(|| view! { <small class="help">{help}</small> })}
            {move || error().map(|e| view! { <small class="field-error" role="alert">{e}</small> })}
        </div>
    }
}

fn outcome_view(outcome: Outcome) -> impl IntoView {
    let class = if outcome.ok {
        "outcome ok"
    } else {
        "outcome refused"
    };
    view! {
        <div class=class role="status">
            <p>{outcome.message}</p>
            {outcome.code.into_iter().map(code_view).collect_view()}
        </div>
    }
}

fn table_view(table: Table) -> impl IntoView {
    let ctx = expect_context::<PanelContext>();
    let Table {
        columns,
        rows,
        empty,
        actions,
        bulk,
    } = table;
    if rows.is_empty() {
        return view! { <p class="empty">{empty}</p> }.into_any();
    }
    let row_actions = actions.clone();
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let (encoded, button) = read_form(&ev);
        // Row buttons carry "action key"; bulk buttons only the action (the ticked rows
        // are in the form).
        let Some(button) = button else { return };
        let (action, key) = match button.split_once(' ') {
            Some((action, key)) => (action.to_owned(), Some(key.to_owned())),
            None => (button, None),
        };
        let Some(spec) = row_actions.iter().find(|a| a.action == action) else {
            return;
        };
        let first_cell = key
            .clone()
            .unwrap_or_else(|| "the selected rows".to_owned());
        if !spec.confirm.is_empty() && !confirm(&spec.confirm.replace("{}", &first_cell)) {
            return;
        }
        let form = match key {
            Some(key) => key_field(&key),
            None => encoded,
        };
        send(ctx, action, form);
    };
    let bulk_buttons = bulk.then(|| {
        actions
            .iter()
            .map(|a| {
                view! {
                    <button type="submit" class="bulk" value=a.action.clone()>
                        {format!("{} selected", a.label)}
                    </button>
                }
            })
            .collect_view()
    });
    let per_row = if bulk { Vec::new() } else { actions };
    let outcome_key = per_row
        .first()
        .map(|a| a.action.clone())
        .unwrap_or_default();
    let outcome = Memo::new(move |_| {
        ctx.outcomes.with(|all| {
            all.iter()
                .find(|(a, _)| *a == outcome_key || outcome_key.is_empty())
                .map(|(_, o)| o.clone())
        })
    });
    view! {
        <form class="table-form" on:submit=on_submit>
            <div class="table-wrap">
                <table class="panel-table">
                    <thead>
                        <tr>
                            {bulk.then(|| view! { <th class="pick">"Pick"</th> })}
                            {columns.into_iter().map(|c| view! { <th>{c}</th> }).collect_view()}
                            {(!per_row.is_empty()).then(|| view! { <th>"Actions"</th> })}
                        </tr>
                    </thead>
                    <tbody>
                        {rows
                            .into_iter()
                            .map(|row| {
                                let key = row.key;
                                let buttons = per_row
                                    .iter()
                                    .map(|a| {
                                        view! {
                                            <button
                                                type="submit"
                                                class="row-action"
                                                value=format!("{} {}", a.action, key)
                                            >
                                                {a.label.clone()}
                                            </button>
                                        }
                                    })
                                    .collect_view();
                                view! {
                                    <tr data-key=key.clone()>
                                        {bulk
                                            .then(|| {
                                                view! {
                                                    <td class="pick">
                                                        <input
                                                            type="checkbox"
                                                            name="key"
                                                            value=key.clone()
                                                            aria-label="Select"
                                                        />
                                                    </td>
                                                }
                                            })}
                                        {row
                                            .cells
                                            .into_iter()
                                            .map(|c| view! { <td>{c}</td> })
                                            .collect_view()}
                                        {(!per_row.is_empty()).then(|| view! { <td class="row-actions">{buttons}</td> })}
                                    </tr>
                                }
                            })
                            .collect_view()}
                    </tbody>
                </table>
            </div>
            <div class="form-foot">{bulk_buttons} {move || outcome.get().map(outcome_view)}</div>
        </form>
    }
    .into_any()
}

/// Sends a submission; its answer is filed under `action` when it arrives.
fn send(ctx: PanelContext, action: String, form: String) {
    ctx.sent.set(action.clone());
    ctx.submit.dispatch(SubmitPanel {
        name: ctx.name,
        action,
        form,
    });
}

fn use_location_path() -> String {
    use_location().pathname.get_untracked()
}

/// The submitted form's fields, URL-encoded, and the value of the button that submitted it.
#[cfg(feature = "hydrate")]
fn read_form(ev: &leptos::ev::SubmitEvent) -> (String, Option<String>) {
    use wasm_bindgen::JsCast;
    let button = ev
        .submitter()
        .and_then(|el| el.dyn_into::<web_sys::HtmlButtonElement>().ok())
        .map(|b| b.value())
        .filter(|v| !v.is_empty());
    let encoded = ev
        .target()
        .and_then(|t| t.dyn_into::<web_sys::HtmlFormElement>().ok())
        .and_then(|form| web_sys::FormData::new_with_form(&form).ok())
        .and_then(|data| web_sys::UrlSearchParams::new_with_str_sequence_sequence(&data).ok())
        .map(|params| String::from(params.to_string()))
        .unwrap_or_default();
    (encoded, button)
}

#[cfg(not(feature = "hydrate"))]
fn read_form(_ev: &leptos::ev::SubmitEvent) -> (String, Option<String>) {
    (String::new(), None)
}

/// `key=KEY`, URL-encoded.
#[cfg(feature = "hydrate")]
fn key_field(key: &str) -> String {
    web_sys::UrlSearchParams::new()
        .map(|params| {
            params.append("key", key);
            String::from(params.to_string())
        })
        .unwrap_or_default()
}

#[cfg(not(feature = "hydrate"))]
fn key_field(_key: &str) -> String {
    String::new()
}

#[cfg(feature = "hydrate")]
fn confirm(question: &str) -> bool {
    web_sys::window().is_some_and(|w| w.confirm_with_message(question).unwrap_or(false))
}

#[cfg(not(feature = "hydrate"))]
fn confirm(_question: &str) -> bool {
    false
}

#[cfg(feature = "hydrate")]
fn copy_to_clipboard(text: &str) {
    if let Some(window) = web_sys::window() {
        // A promise we need not wait for: the button says "Copied" either way, and the text
        // stays selectable on screen.
        let _ = window.navigator().clipboard().write_text(text);
    }
}

#[cfg(not(feature = "hydrate"))]
fn copy_to_clipboard(_text: &str) {}
