//! The vm-healthcheck dashboard: routes, pages, components and the server functions behind them.

#[cfg(feature = "ssr")]
pub mod backend;
pub mod components;
pub mod error;
pub mod format;
pub mod model;
pub mod pages;
pub mod rpc;

use leptos::prelude::*;
use leptos_meta::{Link, Meta, Stylesheet, Title, provide_meta_context};
use leptos_router::components::{Route, Router, Routes};
use leptos_router::path;

/// The HTML document the server renders around the app.
#[cfg(feature = "ssr")]
pub fn shell(options: LeptosOptions) -> impl IntoView {
    use leptos_meta::MetaTags;
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// The root component: document metadata and every route, declared here and nowhere else.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="main" href="/pkg/main.css"/>
        <Link rel="icon" href="/pkg/favicon.svg"/>
        <Meta name="description" content="Proxmox VM health at a glance"/>
        <Title text="vm-healthcheck"/>
        <Router>
            <main>
                <Routes fallback=|| view! { <p class="empty">"Page not found."</p> }>
                    <Route path=path!("/") view=pages::FleetPage/>
                    <Route path=path!("/login") view=pages::LoginPage/>
                    <Route path=path!("/setup") view=pages::SetupPage/>
                </Routes>
            </main>
        </Router>
    }
}
