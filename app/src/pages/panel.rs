//! The admin pages (settings, add a VM, users, tokens, audit, link approvals): the server
//! draws each as HTML (`domain::panel`), this page shows it and sends its forms back. A new
//! admin page costs the browser bundle nothing; the server escapes everything it draws.

use crate::components::{TopBar, use_signed_in};
use crate::live::use_live;
use crate::rpc::{get_panel, submit_panel};
use domain::PanelName;
use leptos::prelude::*;
use leptos_router::hooks::{use_location, use_navigate};

/// What a submitted form asks for.
// Built only in the browser, from the submit event.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
enum Submission {
    /// A filter: its fields become the page's query, so the view can be shared.
    Filter(String),
    /// An action with its fields, URL-encoded.
    Action { action: String, form: String },
}

#[component]
pub fn PanelPage(name: PanelName) -> impl IntoView {
    let live = use_live(move |_| name.follows_fleet());
    let who = use_signed_in();
    let (hydrated, set_hydrated) = signal(false);
    Effect::new(move |_| set_hydrated.set(true));
    let location = use_location();
    let search = location.search;
    let page = Resource::new(move || search.get(), move |query| get_panel(name, query));
    // The page as the latest submission answered it (with its outcome), until the address
    // changes.
    let answered = RwSignal::new(None::<String>);
    let failed = RwSignal::new(None::<String>);
    Effect::new(move |_| {
        search.track();
        answered.set(None);
    });
    let pending = RwSignal::new(false);
    // When the fleet changes, the live sections (VMs arriving) are drawn again in place.
    Effect::new(move |first: Option<()>| {
        live.tick.track();
        if first.is_some() && name.follows_fleet() {
            let query = search.get_untracked();
            leptos::task::spawn_local(async move {
                if let Ok(html) = get_panel(name, query).await {
                    swap_live_sections(&html);
                }
            });
        }
    });
    let navigate = use_navigate();
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        match read_submission(&ev) {
            Some(Submission::Filter(query)) => {
                let path = location.pathname.get_untracked();
                navigate(&format!("{path}?{query}"), Default::default());
            }
            Some(Submission::Action { action, form }) => {
                failed.set(None);
                pending.set(true);
                // Called directly rather than through a ServerAction: the page needs only
                // the answer, and the bundle stays smaller.
                leptos::task::spawn_local(async move {
                    match submit_panel(name, action, form).await {
                        Ok(html) => answered.set(Some(html)),
                        Err(err) => failed.set(Some(err.to_string())),
                    }
                    pending.set(false);
                });
            }
            None => {}
        }
    };
    view! {
        <div class="page panel" data-hydrated=move || hydrated.get().to_string()>
            <TopBar who mode=live.mode/>
            <Transition fallback=|| view! { <p class="empty loading">"Loading..."</p> }>
                {move || {
                    let html = match answered.get() {
                        Some(html) => Ok(html),
                        None => page.get()?,
                    };
                    Some(match html {
                        Ok(html) => {
                            view! {
                                <div
                                    class="panel-body"
                                    aria-busy=move || pending.get().to_string()
                                    inner_html=html
                                    on:submit=on_submit.clone()
                                    on:click=copy_clicked
                                ></div>
                            }
                                .into_any()
                        }
                        Err(err) => {
                            view! { <p class="error" role="alert">{err.to_string()}</p> }.into_any()
                        }
                    })
                }}
            </Transition>
            <p class="error" role="alert">{move || failed.get()}</p>
        </div>
    }
}

/// The submitted form's request: a filter's query, or an action with its fields (a table's
/// button names its action and row; it may ask first).
#[cfg(feature = "hydrate")]
fn read_submission(ev: &leptos::ev::SubmitEvent) -> Option<Submission> {
    use wasm_bindgen::JsCast;
    let form = ev.target()?.dyn_into::<web_sys::HtmlFormElement>().ok()?;
    let fields = web_sys::FormData::new_with_form(&form)
        .ok()
        .and_then(|data| web_sys::UrlSearchParams::new_with_str_sequence_sequence(&data).ok())
        .map(|params| String::from(params.to_string()))
        .unwrap_or_default();
    match form.get_attribute("data-kind")?.as_str() {
        "filter" => Some(Submission::Filter(fields)),
        "action" => Some(Submission::Action {
            action: form.get_attribute("data-action")?,
            form: fields,
        }),
        "table" => {
            let button = ev
                .submitter()?
                .dyn_into::<web_sys::HtmlButtonElement>()
                .ok()?;
            let question = button.get_attribute("data-confirm").unwrap_or_default();
            if !question.is_empty() && !web_sys::window()?.confirm_with_message(&question).ok()? {
                return None;
            }
            let value = button.value();
            match value.split_once(' ') {
                // One row's button: just that row.
                Some((action, key)) => {
                    let one = web_sys::UrlSearchParams::new().ok()?;
                    one.append("key", key);
                    Some(Submission::Action {
                        action: action.to_owned(),
                        form: one.to_string().into(),
                    })
                }
                // A bulk button: the ticked rows.
                None => Some(Submission::Action {
                    action: value,
                    form: fields,
                }),
            }
        }
        _ => None,
    }
}

#[cfg(not(feature = "hydrate"))]
fn read_submission(_ev: &leptos::ev::SubmitEvent) -> Option<Submission> {
    None
}

/// A copy button (`data-copy`) puts its text on the clipboard.
#[cfg(feature = "hydrate")]
fn copy_clicked(ev: leptos::ev::MouseEvent) {
    use wasm_bindgen::JsCast;
    let Some(button) = ev
        .target()
        .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
    else {
        return;
    };
    let (Some(text), Some(window)) = (button.get_attribute("data-copy"), web_sys::window()) else {
        return;
    };
    // The promise is not awaited: the text also stays selectable on screen.
    let _ = window.navigator().clipboard().write_text(&text);
    button.set_text_content(Some("Copied"));
}

#[cfg(not(feature = "hydrate"))]
fn copy_clicked(_ev: leptos::ev::MouseEvent) {}

/// Replaces each `data-live` section on screen with its counterpart in `html`.
#[cfg(feature = "hydrate")]
fn swap_live_sections(html: &str) {
    use wasm_bindgen::JsCast;
    let Some(document) = web_sys::window().and_then(|w| w.document()) else {
        return;
    };
    let Some(template) = document
        .create_element("template")
        .ok()
        .and_then(|t| t.dyn_into::<web_sys::HtmlTemplateElement>().ok())
    else {
        return;
    };
    template.set_inner_html(html);
    let Ok(fresh) = template.content().query_selector_all("[data-live]") else {
        return;
    };
    for i in 0..fresh.length() {
        let Some(new) = fresh
            .item(i)
            .and_then(|n| n.dyn_into::<web_sys::Element>().ok())
        else {
            continue;
        };
        let Some(id) = new.get_attribute("data-live") else {
            continue;
        };
        if let Ok(Some(old)) = document.query_selector(&format!("[data-live=\"{id}\"]")) {
            let _ = old.replace_with_with_node_1(&new);
        }
    }
}

#[cfg(not(feature = "hydrate"))]
fn swap_live_sections(_html: &str) {}
