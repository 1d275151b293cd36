//! The sign-in page ("/login") and the first-start setup page ("/setup").
//!
//! Plain HTML forms posted to `/auth/*`: they work before (and without) the WASM bundle,
//! and the server answers with a redirect and the session cookie.

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

/// What went wrong on the last try, from `?error=`.
fn error_text(page: &'static str) -> impl Fn() -> Option<&'static str> {
    let query = use_query_map();
    move || {
        let code = query.with(|q| q.get("error"))?;
        Some(match (page, code.as_str()) {
            (_, "throttled") => "Too many failed attempts. Wait a few minutes and try again.",
            (_, "unavailable") => "The server cannot reach its database. Try again shortly.",
            ("setup", "code") => {
                "That setup code is not right. It is in data/setup-code and in the server log."
            }
            ("setup", _) => {
                "Choose a user name (letters, digits, . _ - @) and a password of at least 12 characters."
            }
            _ => "Wrong user name or password.",
        })
    }
}

#[component]
pub fn LoginPage() -> impl IntoView {
    let error = error_text("login");
    view! {
        <div class="page narrow">
            <h1>"vm-healthcheck"</h1>
            <form class="auth" method="post" action="/auth/login">
                <h2>"Sign in"</h2>
                {move || error().map(|e| view! { <p class="error" role="alert">{e}</p> })}
                <label>"User name" <input name="username" autocomplete="username" required/></label>
                <label>
                    "Password"
                    <input name="password" type="password" autocomplete="current-password" required/>
                </label>
                <button type="submit">"Sign in"</button>
            </form>
        </div>
    }
}

#[component]
pub fn SetupPage() -> impl IntoView {
    let error = error_text("setup");
    view! {
        <div class="page narrow">
            <h1>"vm-healthcheck"</h1>
            <form class="auth" method="post" action="/auth/setup">
                <h2>"Create the first admin"</h2>
                <p class="hint">
                    "The one-time setup code is in the server's data/setup-code file and in its log."
                </p>
                {move || error().map(|e| view! { <p class="error" role="alert">{e}</p> })}
                <label>"Setup code" <input name="setup_code" autocomplete="off" required/></label>
                <label>"User name" <input name="username" autocomplete="username" required/></label>
                <label>
                    "Password (12 characters or more)"
                    <input name="password" type="password" autocomplete="new-password" minlength="12" required/>
                </label>
                <button type="submit">"Create and sign in"</button>
            </form>
        </div>
    }
}
