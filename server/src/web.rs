//! The HTTP surface: dashboard rendering through leptos_axum, static front-end files, the API.

use crate::accounts::{self, sessions::DbSessionStore};
use crate::backend::ServerBackend;
use crate::config::TlsMode;
use crate::db::people;
use crate::http;
use crate::state::AppState;
use app::backend::BackendHandle;
use app::{App, shell};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use leptos::prelude::provide_context;
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, SessionManagerLayer};

/// The largest request body any route reads.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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
        // Leaves connections for the writer, the scheduler and sign-ins.
        .merge(http::router(state.config.db_pool_size.saturating_sub(2)))
        .merge(crate::agents::router())
        .leptos_routes_with_context(
            &state,
            generate_route_list(App),
            move || {
                provide_context(backend.clone());
                // A fresh nonce per page for the inline hydration scripts (see app::shell).
                leptos::nonce::provide_nonce();
            },
            move || shell(options.clone()),
        )
        .nest_service("/pkg", ServeDir::new(pkg_dir))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(state.clone(), sign_in_first))
        // Server functions read their whole body; nothing the pages send comes near this.
        // Far above the REST API's own limit, so its routes answer oversized reports with
        // their JSON error first.
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(session_layer(&state))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.config.limits.request_timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            known_host_and_client,
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        // Failures are logged where they happen, with their cause (`ApiError`, the writer);
        // here a shed report (503 under load) would be one error line each.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The session cookie: HttpOnly, SameSite=Strict, Secure when we serve HTTPS, ended after
/// `SESSION_IDLE_MINUTES` unused (the absolute limit is checked on each use).
fn session_layer(state: &AppState) -> SessionManagerLayer<DbSessionStore> {
    let idle_ms = state.config.accounts.session_idle_ms;
    SessionManagerLayer::new(DbSessionStore::new(state.db.clone()))
        .with_name("vmhc_session")
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        // Behind a TLS proxy (`TLS=off`, an https `PUBLIC_URL`) the cookie is Secure too.
        .with_secure(!matches!(state.config.tls, TlsMode::Off) || state.config.limits.public_https)
        .with_expiry(Expiry::OnInactivity(time::Duration::milliseconds(idle_ms)))
}

/// Pages and server functions need a signed-in session: pages redirect to the sign-in
/// page (or to the first-start setup), server functions answer 401. The API, the agent
/// files and the static bundle check their own credentials.
async fn sign_in_first(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let path = path.as_str();
    // The API and the scrape endpoint answer 401 themselves; pages lead to the sign-in.
    let open = path == "/metrics"
        || ["/api/", "/agents/", "/pkg/", "/auth/"]
            .iter()
            .any(|prefix| path.starts_with(prefix));
    if open {
        return next.run(request).await;
    }
    let public_page = matches!(path, "/login" | "/setup");
    let rpc = path.starts_with("/rpc/");
    let (mut parts, body) = request.into_parts();
    match accounts::principal(&state, &parts).await {
        Ok(Some(who)) => {
            if public_page {
                return Redirect::to("/").into_response();
            }
            if rpc && !accounts::same_origin(&parts.method, &parts.headers) {
                return (StatusCode::FORBIDDEN, "cross-site request refused").into_response();
            }
            parts.extensions.insert(who);
            next.run(Request::from_parts(parts, body)).await
        }
        Ok(None) if rpc => (StatusCode::UNAUTHORIZED, "sign in first").into_response(),
        Ok(None) => {
            let no_user = match state.db.conn().await {
                Ok(mut conn) => people::count_users(&mut conn).await.map(|n| n == 0),
                Err(err) => Err(err),
            };
            match (no_user, path) {
                (Ok(true), "/setup") | (Ok(false), "/login") => {
                    next.run(Request::from_parts(parts, body)).await
                }
                (Ok(true), _) => Redirect::to("/setup").into_response(),
                (Ok(false), _) => Redirect::to("/login").into_response(),
                (Err(err), _) => {
                    tracing::warn!(error = %err, "could not check the session");
                    (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
                }
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not check the session");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// Refuses requests for a host other than `PUBLIC_URL`'s (421), and notes the client's
/// address (through a trusted proxy if there is one) for the audit log and throttles.
async fn known_host_and_client(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let limits = &state.config.limits;
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    // Agents and load balancers may use an address or another name; their routes take
    // bearer credentials only, which a rebound page does not have.
    let path = request.uri().path();
    let bearer_only =
        path == "/api/health" || path == "/api/health/report" || path.starts_with("/agents/");
    if !bearer_only && !accounts::host_allowed(host, limits.public_host.as_deref()) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this server answers only to the host in its PUBLIC_URL",
        )
            .into_response();
    }
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(peer) = peer {
        let client = accounts::client_addr(peer, request.headers(), &limits.trusted_proxies);
        request
            .extensions_mut()
            .insert(accounts::ClientAddr(client));
    }
    next.run(request).await
}
