//! The HTTP surface: dashboard rendering through leptos_axum, static front-end files, the API.

use crate::api;
use crate::state::AppState;
use app::error::AppError;
use app::fleet::FleetSource;
use app::types::{FleetSnapshot, StatusCounts};
use app::{shell, App};
use axum::http::{header, HeaderValue, StatusCode};
use axum::Router;
use leptos::prelude::provide_context;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

/// The front end's file names, as Trunk writes them (see Trunk.toml).
pub const OUTPUT_NAME: &str = "frontend";

pub fn router(state: AppState) -> Router {
    let source_state = state.clone();
    let fleet_source = FleetSource::new(move || {
        let state = source_state.clone();
        async move {
            let vms = api::fleet(&state).await.map_err(|err| {
                tracing::warn!(error = %err, "dashboard could not load the fleet");
                AppError::Unavailable
            })?;
            let now_ms = crate::now_ms();
            Ok(FleetSnapshot {
                now_ms,
                remediation: state.engine.summary(now_ms),
                counts: StatusCounts::from_statuses(vms.iter().map(|v| v.status)),
                vms,
            })
        }
    });
    let pkg_dir = std::path::Path::new(&*state.leptos_options.site_root)
        .join(&*state.leptos_options.site_pkg_dir);
    let options = state.leptos_options.clone();
    Router::new()
        .merge(api::router())
        .merge(crate::agents::router())
        .leptos_routes_with_context(
            &state,
            generate_route_list(App),
            move || provide_context(fleet_source.clone()),
            move || shell(options.clone()),
        )
        .nest_service("/pkg", ServeDir::new(pkg_dir))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
