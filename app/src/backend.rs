//! The server's side of every server function: one trait the host implements and provides.
//!
//! Server-only (`ssr`): the browser build never sees it. Server functions in [`crate::rpc`]
//! reach the server through [`Backend`] alone, passing a [`RequestInfo`] so the host can see
//! who is calling.

use crate::error::AppError;
use domain::view::{FleetSnapshot, MetricHistory, SignedIn, VmPage};
use domain::{ChartRange, OperatorAction, PanelName, VmId};
use http::request::Parts;
use http::{Extensions, HeaderMap, Method, Uri};
use leptos::prelude::use_context;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;

/// What [`Backend`] methods return: a boxed future, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who is calling: the HTTP request behind a server function call or a server-rendered page.
///
/// Built from the request head leptos_axum provides as context. Anything middleware puts in
/// the request's extensions (a signed-in user, say) is visible through [`Self::extensions`].
#[derive(Clone, Debug)]
pub struct RequestInfo {
    parts: Parts,
}

impl RequestInfo {
    pub fn new(parts: Parts) -> Self {
        Self { parts }
    }

    /// The request being served now, as leptos_axum provides it to pages and server functions.
    pub fn current() -> Option<Self> {
        use_context::<Parts>().map(Self::new)
    }

    pub fn method(&self) -> &Method {
        &self.parts.method
    }

    pub fn uri(&self) -> &Uri {
        &self.parts.uri
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    /// Typed values that server middleware attached to the request.
    pub fn extensions(&self) -> &Extensions {
        &self.parts.extensions
    }

    /// The whole request head.
    pub fn parts(&self) -> &Parts {
        &self.parts
    }
}

/// Everything the pages may ask of the server. Implementations log internal failures and
/// return [`AppError::Unavailable`] rather than sending detail to the browser.
pub trait Backend: Send + Sync + 'static {
    /// One page of the fleet as `query` (the fleet page's address query, see
    /// [`FleetQuery`](crate::model::FleetQuery)) filters and orders it, with the whole
    /// fleet's counts and the remediation summary, as `caller` may see it.
    fn fleet<'a>(
        &'a self,
        caller: &'a RequestInfo,
        query: &'a str,
    ) -> BoxFuture<'a, Result<FleetSnapshot, AppError>>;

    /// Who `caller` is signed in as.
    fn me<'a>(&'a self, caller: &'a RequestInfo) -> BoxFuture<'a, Result<SignedIn, AppError>>;

    /// One admin page (`domain::panel`) as HTML, as `caller` may see it; `query` holds its
    /// filters. The implementation escapes every text it draws.
    fn panel<'a>(
        &'a self,
        caller: &'a RequestInfo,
        name: PanelName,
        query: &'a str,
    ) -> BoxFuture<'a, Result<String, AppError>>;

    /// A form or row action on an admin page (`form`: its fields, URL-encoded). The
    /// implementation checks the role, runs the same service as the REST route, audits it,
    /// and answers the page as HTML with the outcome where it was asked for.
    fn submit<'a>(
        &'a self,
        caller: &'a RequestInfo,
        name: PanelName,
        action: &'a str,
        form: &'a str,
    ) -> BoxFuture<'a, Result<String, AppError>>;

    /// One VM's page: its state, status changes and reset history (viewers).
    fn vm_page<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
    ) -> BoxFuture<'a, Result<VmPage, AppError>>;

    /// One VM's chart over `range`, ending now (viewers).
    fn metrics<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
        range: ChartRange,
    ) -> BoxFuture<'a, Result<MetricHistory, AppError>>;

    /// An operator's action on one VM (reset, shutdown, hold, acknowledge), through the same
    /// service code as its REST route; the implementation checks the role and audits it.
    fn act<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
        action: OperatorAction,
    ) -> BoxFuture<'a, Result<(), AppError>>;
}

/// The [`Backend`] the server provides once as Leptos context, for pages and server functions.
#[derive(Clone)]
pub struct BackendHandle(pub Arc<dyn Backend>);

impl BackendHandle {
    pub fn new(backend: impl Backend) -> Self {
        Self(Arc::new(backend))
    }
}

impl Deref for BackendHandle {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// What every server function starts with: the provided back end and who is calling.
///
/// Either missing means the server was wired wrongly; that is logged, and the browser is told
/// only that the service is unavailable.
pub fn from_context() -> Result<(BackendHandle, RequestInfo), AppError> {
    let Some(backend) = use_context::<BackendHandle>() else {
        tracing::error!("no Backend provided as context; see server/src/web.rs");
        return Err(AppError::Unavailable);
    };
    let Some(caller) = RequestInfo::current() else {
        tracing::error!("no request Parts in context; is this running outside leptos_axum?");
        return Err(AppError::Unavailable);
    };
    Ok((backend, caller))
}

/// Gives a failed server function call its HTTP status (401, 403, 404, 400 for a refusal,
/// 503) instead of a generic 500, so scripts and proxies see what happened.
pub fn answer_status<T>(result: &Result<T, AppError>) {
    let status = match result {
        Err(AppError::Unauthorized) => http::StatusCode::UNAUTHORIZED,
        Err(AppError::Forbidden) => http::StatusCode::FORBIDDEN,
        Err(AppError::NotFound) => http::StatusCode::NOT_FOUND,
        Err(AppError::Refused(_)) => http::StatusCode::BAD_REQUEST,
        Err(AppError::Unavailable) => http::StatusCode::SERVICE_UNAVAILABLE,
        _ => return,
    };
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        response.set_status(status);
    }
}

/// Marks the answer as not to be stored by any cache: it may carry a secret shown once.
pub fn no_store() {
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        response.insert_header(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
    }
}
