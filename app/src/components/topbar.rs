//! The bar on top of every signed-in page: the pages, whether updates are live, who is
//! signed in, and signing out.

use crate::live::{LiveIndicator, LiveMode};
use crate::rpc::get_me;
use domain::UserRole;
use leptos::prelude::*;

/// Who is signed in, and what the role allows. The server checks every action again; this
/// only decides which controls to show.
#[derive(Clone, Copy)]
pub struct SignedInAs {
    role: Signal<Option<UserRole>>,
    name: Signal<Option<(String, UserRole)>>,
}

impl SignedInAs {
    pub fn can_operate(self) -> Signal<bool> {
        let role = self.role;
        Signal::derive(move || role.get().is_some_and(|r| r >= UserRole::Operator))
    }
}

pub fn use_signed_in() -> SignedInAs {
    let me = OnceResource::new(get_me());
    SignedInAs {
        role: Signal::derive(move || me.get().and_then(Result::ok).map(|m| m.role)),
        name: Signal::derive(move || me.get().and_then(Result::ok).map(|m| (m.username, m.role))),
    }
}

#[component]
pub fn TopBar(who: SignedInAs, mode: ReadSignal<LiveMode>) -> impl IntoView {
    view! {
        <header class="topbar">
            <h1>
                <a href="/">"vm-healthcheck"</a>
            </h1>
            <nav class="pages" aria-label="Pages">
                <a href="/">"Fleet"</a>
                // Inside a Transition: the name comes from a resource, which the server must
                // have resolved before rendering, or the hydrated page would differ.
                <Transition fallback=|| ()>
                    {move || {
                        who.name
                            .get()
                            .map(|(name, role)| {
                                // One element type for every link keeps the bundle small.
                                let mut pages = Vec::new();
                                if role >= UserRole::Operator {
                                    pages.extend([
                                        ("/add-vm", "Add a VM"),
                                        ("/links", "Approvals"),
                                        ("/alerts", "Alerts"),
                                    ]);
                                }
                                if role >= UserRole::Admin {
                                    pages.extend([
                                        ("/settings", "Settings"),
                                        ("/users", "Users"),
                                        ("/tokens", "Tokens"),
                                        ("/audit", "Audit"),
                                    ]);
                                }
                                view! {
                                    {pages
                                        .into_iter()
                                        .map(|(href, label)| view! { <a href=href>{label}</a> })
                                        .collect_view()}
                                    <span class="user">
                                        <span class="username">{name}</span>
                                        " ("
                                        {role.to_string()}
                                        ")"
                                    </span>
                                }
                            })
                    }}
                </Transition>
            </nav>
            <LiveIndicator mode/>
            <form class="signout" method="post" action="/auth/logout">
                <button type="submit">"Sign out"</button>
            </form>
        </header>
    }
}
