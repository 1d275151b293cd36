//! The vm-healthcheck dashboard: shared types, Leptos components and server functions.

pub mod error;
pub mod fleet;
pub mod format;
pub mod types;

mod dashboard;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Link, Meta, Stylesheet, Title};
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

/// The root component: routes and document metadata.
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
                    <Route path=path!("/") view=dashboard::FleetPage/>
                </Routes>
            </main>
        </Router>
    }
}
