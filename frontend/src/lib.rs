//! The browser entry point: hydrates the server-rendered dashboard.

// The app's view types are laid out here, where they are instantiated; they nest deeply.
#![recursion_limit = "256"]

use wasm_bindgen::prelude::wasm_bindgen;

/// Called by the hydration script that the server's HTML shell loads.
#[wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
