//! `GET /api/live`: server-sent events telling an open page which VMs changed.
//!
//! Events: `mode` (`push` while changes from every replica arrive here, `poll` while the
//! Redis fan-out is down and the page must poll as well) and `change` (`*` or VM ids). A
//! stream ends after [`STREAM_LIFETIME`] and the browser reconnects, so a session that was
//! signed out or expired stops hearing anything within that time.

use super::ApiError;
use super::extract::Viewer;
use crate::live::{Change, Fanout, StreamSlot};
use crate::state::AppState;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

/// Changes closer together than this are sent as one event: under a steady stream of
/// reports a page reads the fleet at most twice a second.
const MIN_GAP: Duration = Duration::from_millis(500);
/// How long one stream lasts before the browser must reconnect (and show its session again).
pub const STREAM_LIFETIME: Duration = Duration::from_secs(300);
/// How soon the browser reconnects after a stream ends.
const RETRY: Duration = Duration::from_secs(1);

// `Conventions` puts the events' own schema in place of `String`.
#[utoipa::path(
    get,
    operation_id = "live_stream",
    path = "/api/live",
    tag = "vms",
    responses((status = 200, description = "Server-sent events: `mode` first and when it changes, then `change` whenever VMs change", body = String, content_type = "text/event-stream"))
)]
pub async fn stream(State(state): State<AppState>, _viewer: Viewer) -> Response {
    let bus = state.cache.live();
    let Some(slot) = bus.open_stream() else {
        // The page falls back to polling and the browser retries later.
        return ApiError::TooManyRequests(30).into_response();
    };
    let feed = Feed {
        _slot: slot,
        changes: bus.subscribe(),
        fanout: bus.fanout(),
        closed: bus.closed(),
        ends: Instant::now() + STREAM_LIFETIME,
        last_sent: None,
        greeted: false,
    };
    let events = futures_util::stream::unfold(feed, |feed| async move {
        feed.next()
            .await
            .map(|(event, feed)| (Ok::<_, Infallible>(event), feed))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Tells a buffering reverse proxy (nginx) to pass events on at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

struct Feed {
    _slot: StreamSlot,
    changes: broadcast::Receiver<Change>,
    fanout: watch::Receiver<Fanout>,
    closed: watch::Receiver<bool>,
    ends: Instant,
    last_sent: Option<Instant>,
    greeted: bool,
}

fn mode_event(fanout: Fanout) -> Event {
    let mode = match fanout {
        Fanout::InProcess | Fanout::Redis => "push",
        Fanout::RedisDown => "poll",
    };
    Event::default().event("mode").data(mode)
}

impl Feed {
    /// The next event, or `None` when the stream ends.
    async fn next(mut self) -> Option<(Event, Feed)> {
        if !self.greeted {
            self.greeted = true;
            let fanout = *self.fanout.borrow_and_update();
            return Some((mode_event(fanout).retry(RETRY), self));
        }
        if *self.closed.borrow() {
            return None;
        }
        let first = tokio::select! {
            _ = self.closed.changed() => return None,
            () = tokio::time::sleep_until(self.ends) => return None,
            changed = self.fanout.changed() => {
                changed.ok()?;
                let fanout = *self.fanout.borrow_and_update();
                return Some((mode_event(fanout), self));
            }
            received = self.changes.recv() => match received {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => Change::All,
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        if let Some(last) = self.last_sent {
            tokio::time::sleep_until(last + MIN_GAP).await;
        }
        let mut change = first;
        loop {
            match self.changes.try_recv() {
                Ok(more) => change = change.merge(more),
                Err(broadcast::error::TryRecvError::Lagged(_)) => change = Change::All,
                Err(_) => break,
            }
        }
        self.last_sent = Some(Instant::now());
        Some((Event::default().event("change").data(change.encode()), self))
    }
}
