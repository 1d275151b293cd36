//! The HTTP surface: dashboard rendering through leptos_axum, static front-end files, the API.

use crate::backend::ServerBackend;
use crate::http;
use crate::state::AppState;
use app::backend::BackendHandle;
use app::{App, shell};
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use leptos::prelude::provide_context;
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

/// The front end's file names, as Trunk writes them (see Trunk.toml).
pub const OUTPUT_NAME: &str = "frontend";

pub fn router(state: AppState) -> Router {
    // The dashboard's one way into the server, for rendered pages and `/rpc` server functions
    // alike: leptos_routes_with_context provides it to both.
    let backend = BackendHandle::new(ServerBackend::new(state.clone()));
    let pkg_dir = std::path::Path::new(&*state.leptos_options.site_root)
        .join(&*state.leptos_options.site_pkg_dir);
    let options = state.leptos_options.clone();
    Router::new()
        .merge(http::router())
        .merge(crate::agents::router())
        .leptos_routes_with_context(
            &state,
            generate_route_list(App),
            move || provide_context(backend.clone()),
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
