//! Live updates for a page: change events pushed by the server (`/api/live`), and polling
//! every 5 s, said on screen, while the push channel is down.

use leptos::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// How often a page polls while live push is down (and how often the timer looks).
pub const POLL: Duration = Duration::from_millis(5_000);
/// While push works, a page still refreshes this many polls apart, so ages like "seen 40 s
/// ago" move on and a change lost in transit is corrected.
const POLLS_PER_SAFETY_REFRESH: u32 = 6;

/// Where a page's updates come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveMode {
    /// Before the page is hydrated or the stream has answered.
    Connecting,
    /// Changes arrive as they happen.
    Push,
    /// The push channel is down: the page polls every 5 s.
    Polling,
}

impl LiveMode {
    /// The `data-live` attribute the browser tests read.
    pub fn attr(self) -> &'static str {
        match self {
            LiveMode::Connecting => "connecting",
            LiveMode::Push => "push",
            LiveMode::Polling => "poll",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            LiveMode::Connecting => "connecting",
            LiveMode::Push => "live",
            LiveMode::Polling => "live updates unavailable: refreshing every 5 s",
        }
    }
}

/// Whether a change naming these VM ids matters to a page.
type Concerns = Arc<dyn Fn(&[i64]) -> bool + Send + Sync>;

/// A page's refresh signal: `tick` moves whenever the page should read its data again.
#[derive(Clone, Copy)]
pub struct Live {
    pub tick: ReadSignal<u64>,
    pub mode: ReadSignal<LiveMode>,
    /// Asks for a refresh now (after an action of the page's own).
    pub refresh: Callback<()>,
}

/// Follows `/api/live` for as long as the calling page is mounted. `concerns(ids)` says
/// whether a change naming those VM ids matters to the page; "everything changed" always does.
pub fn use_live(concerns: impl Fn(&[i64]) -> bool + Send + Sync + 'static) -> Live {
    let (tick, set_tick) = signal(0u64);
    let (mode, set_mode) = signal(LiveMode::Connecting);
    let bump = move || set_tick.update(|t| *t += 1);
    let concerns: Concerns = Arc::new(concerns);
    // Effects run only in the browser, once hydrated; cleanups run when the page unmounts.
    Effect::new(move |_| {
        let polls = std::cell::Cell::new(0u32);
        let timer = set_interval_with_handle(
            move || {
                polls.set(polls.get() + 1);
                if mode.get_untracked() != LiveMode::Push || polls.get() >= POLLS_PER_SAFETY_REFRESH
                {
                    polls.set(0);
                    bump();
                }
            },
            POLL,
        );
        match timer {
            Ok(handle) => on_cleanup(move || handle.clear()),
            Err(err) => leptos::logging::error!("could not start the refresh timer: {err:?}"),
        }
        #[cfg(feature = "hydrate")]
        push::follow(set_mode, bump, concerns.clone());
        #[cfg(not(feature = "hydrate"))]
        let _ = (&concerns, set_mode);
    });
    Live {
        tick,
        mode,
        refresh: Callback::new(move |()| bump()),
    }
}

/// Reads a change event's text: `None` for "everything", else the VM ids it names.
pub fn changed_ids(data: &str) -> Option<Vec<i64>> {
    if data == "*" {
        return None;
    }
    data.split(',').map(|id| id.parse().ok()).collect()
}

/// The indicator in a page's top bar.
#[component]
pub fn LiveIndicator(mode: ReadSignal<LiveMode>) -> impl IntoView {
    view! {
        <span class="live" data-live=move || mode.get().attr() role="status">
            {move || mode.get().label()}
        </span>
    }
}

#[cfg(feature = "hydrate")]
mod push {
    use super::{Concerns, LiveMode, changed_ids};
    use leptos::prelude::*;
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;
    use web_sys::{Event, EventSource, MessageEvent};

    fn text(event: &MessageEvent) -> String {
        event.data().as_string().unwrap_or_default()
    }

    /// Opens the event stream; the browser reconnects it by itself after a drop.
    pub fn follow(
        set_mode: WriteSignal<LiveMode>,
        bump: impl Fn() + Copy + 'static,
        concerns: Concerns,
    ) {
        let Ok(source) = EventSource::new("/api/live") else {
            set_mode.set(LiveMode::Polling);
            return;
        };
        let on_mode = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            set_mode.set(if text(&event) == "push" {
                LiveMode::Push
            } else {
                LiveMode::Polling
            });
            // Anything may have changed while the page was not listening.
            bump();
        });
        let on_change = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            match changed_ids(&text(&event)) {
                Some(ids) if !concerns(&ids) => {}
                _ => bump(),
            }
        });
        let on_error =
            Closure::<dyn FnMut(Event)>::new(move |_: Event| set_mode.set(LiveMode::Polling));
        let listening = source
            .add_event_listener_with_callback("mode", on_mode.as_ref().unchecked_ref())
            .and_then(|()| {
                source
                    .add_event_listener_with_callback("change", on_change.as_ref().unchecked_ref())
            });
        if listening.is_err() {
            source.close();
            set_mode.set(LiveMode::Polling);
            return;
        }
        source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let held = send_wrapper::SendWrapper::new((source, on_mode, on_change, on_error));
        on_cleanup(move || held.0.close());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_events_name_ids_or_everything() {
        assert_eq!(changed_ids("*"), None);
        assert_eq!(changed_ids("4,9"), Some(vec![4, 9]));
        // A malformed event reads as "everything": a reload, never a missed change.
        assert_eq!(changed_ids("4,x"), None);
        assert_eq!(changed_ids(""), None);
    }
}
