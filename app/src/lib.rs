//! The vm-healthcheck dashboard: routes, pages, components and the server functions behind them.

// Leptos view types nest deeply; the compiler needs room to lay them out.
#![recursion_limit = "256"]

#[cfg(feature = "ssr")]
pub mod backend;
pub mod codec;
pub mod components;
pub mod error;
pub mod format;
pub mod live;
pub mod model;
pub mod pages;
pub mod rpc;

use domain::PanelName;
use leptos::prelude::*;
use leptos_router::components::{Route, Router, Routes};
use leptos_router::path;

/// The HTML document the server renders around the app.
///
/// The head is static and rendered only here, so none of it is in the browser bundle.
#[cfg(feature = "ssr")]
pub fn shell(options: LeptosOptions) -> impl IntoView {
    set_content_security_policy();
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <meta name="description" content="Proxmox VM health at a glance"/>
                <title>"vm-healthcheck"</title>
                <link rel="stylesheet" href="/pkg/main.css"/>
                <link rel="icon" href="/pkg/favicon.svg"/>
                <HydrationScripts options/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// Only our own files, the inline hydration scripts carrying this response's nonce, and
/// WASM compilation run; no framing, no plugins, forms post only to us.
#[cfg(feature = "ssr")]
fn set_content_security_policy() {
    let (Some(nonce), Some(response)) = (
        leptos::nonce::use_nonce(),
        use_context::<leptos_axum::ResponseOptions>(),
    ) else {
        return;
    };
    let policy = format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; \
         style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    if let Ok(value) = http::HeaderValue::from_str(&policy) {
        response.insert_header(http::header::CONTENT_SECURITY_POLICY, value);
    }
}

/// The root component: every route, declared here and nowhere else.
#[component]
pub fn App() -> impl IntoView {
    view! {
        <Router>
            <main>
                <Routes fallback=|| view! { <p class="empty">"Page not found."</p> }>
                    <Route path=path!("/") view=pages::FleetPage/>
                    <Route path=path!("/vms/:id") view=pages::VmDetailPage/>
                    <Route path=path!("/settings") view=|| view! { <pages::PanelPage name=PanelName::Settings/> }/>
                    <Route path=path!("/add-vm") view=|| view! { <pages::PanelPage name=PanelName::AddVm/> }/>
                    <Route path=path!("/users") view=|| view! { <pages::PanelPage name=PanelName::Users/> }/>
                    <Route path=path!("/tokens") view=|| view! { <pages::PanelPage name=PanelName::Tokens/> }/>
                    <Route path=path!("/audit") view=|| view! { <pages::PanelPage name=PanelName::Audit/> }/>
                    <Route path=path!("/links") view=|| view! { <pages::PanelPage name=PanelName::Links/> }/>
                    <Route path=path!("/link") view=|| view! { <pages::PanelPage name=PanelName::Link/> }/>
                    <Route path=path!("/alerts") view=|| view! { <pages::PanelPage name=PanelName::Alerts/> }/>
                    <Route path=path!("/login") view=pages::LoginPage/>
                    <Route path=path!("/setup") view=pages::SetupPage/>
                </Routes>
            </main>
        </Router>
    }
}
