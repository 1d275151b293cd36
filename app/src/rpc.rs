//! Server functions (under `/rpc`): the pages' only calls to the server, each served through
//! the provided [`Backend`](crate::backend::Backend).

use crate::codec::JsonText;
use crate::error::AppError;
use domain::view::{FleetSnapshot, MetricHistory, SignedIn, VmPage};
use domain::{ChartRange, OperatorAction, PanelName};
use leptos::prelude::*;

/// One page of the fleet as the page's address query (`status=down&page=2`) filters and
/// orders it, with the whole fleet's counts.
#[server(prefix = "/rpc", endpoint = "fleet", output = JsonText)]
pub async fn get_fleet(query: String) -> Result<FleetSnapshot, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    backend.fleet(&caller, &query).await
}

/// Who is signed in (the pages show the name and offer what the role allows).
#[server(prefix = "/rpc", endpoint = "me", output = JsonText)]
pub async fn get_me() -> Result<SignedIn, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    backend.me(&caller).await
}

/// One admin page, drawn by the server as HTML; `query` is the page's address query (its
/// filters).
#[server(prefix = "/rpc", endpoint = "panel", output = JsonText)]
pub async fn get_panel(name: PanelName, query: String) -> Result<String, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    let result = backend.panel(&caller, name, &query).await;
    crate::backend::answer_status(&result);
    result
}

/// A form or row action on an admin page: `form` is the form's fields, URL-encoded. Goes
/// through the same service code as the REST route for it; checked, audited. Answers the
/// page drawn again, with the outcome under the form it came from.
#[server(prefix = "/rpc", endpoint = "panel-submit", output = JsonText)]
pub async fn submit_panel(
    name: PanelName,
    action: String,
    form: String,
) -> Result<String, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    let result = backend.submit(&caller, name, &action, &form).await;
    crate::backend::answer_status(&result);
    crate::backend::no_store();
    result
}

/// One VM's page: state, status changes, reset history.
#[server(prefix = "/rpc", endpoint = "vm", output = JsonText)]
pub async fn get_vm_page(vm_id: i64) -> Result<VmPage, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    let result = backend.vm_page(&caller, domain::VmId(vm_id)).await;
    crate::backend::answer_status(&result);
    result
}

/// One VM's chart over a range ending now.
#[server(prefix = "/rpc", endpoint = "metrics", output = JsonText)]
pub async fn get_metrics(vm_id: i64, range: ChartRange) -> Result<MetricHistory, AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    let result = backend.metrics(&caller, domain::VmId(vm_id), range).await;
    crate::backend::answer_status(&result);
    result
}

/// An operator's action on one VM: reset, shutdown, hold an announced automatic action, or
/// acknowledge a latched state. Recorded in its history and the audit log.
#[server(prefix = "/rpc", endpoint = "act", output = JsonText)]
pub async fn act_on_vm(vm_id: i64, action: OperatorAction) -> Result<(), AppError> {
    let (backend, caller) = crate::backend::from_context()?;
    let result = backend.act(&caller, domain::VmId(vm_id), action).await;
    crate::backend::answer_status(&result);
    result
}

#[cfg(all(test, feature = "ssr"))]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendHandle, BoxFuture, RequestInfo};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    /// Records who called and answers with an empty fleet.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Backend for Arc<Recorder> {
        fn fleet<'a>(
            &'a self,
            caller: &'a RequestInfo,
            query: &'a str,
        ) -> BoxFuture<'a, Result<FleetSnapshot, AppError>> {
            Box::pin(async move {
                let who = caller
                    .headers()
                    .get("x-caller")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("anonymous");
                if let Ok(mut calls) = self.0.lock() {
                    calls.push(format!("{} {who} {query}", caller.uri()));
                }
                Ok(FleetSnapshot::default())
            })
        }

        fn me<'a>(&'a self, _caller: &'a RequestInfo) -> BoxFuture<'a, Result<SignedIn, AppError>> {
            Box::pin(async { Err(AppError::Unauthorized) })
        }

        fn vm_page<'a>(
            &'a self,
            _caller: &'a RequestInfo,
            _vm: domain::VmId,
        ) -> BoxFuture<'a, Result<VmPage, AppError>> {
            Box::pin(async { Err(AppError::NotFound) })
        }

        fn metrics<'a>(
            &'a self,
            _caller: &'a RequestInfo,
            _vm: domain::VmId,
            _range: ChartRange,
        ) -> BoxFuture<'a, Result<MetricHistory, AppError>> {
            Box::pin(async { Err(AppError::NotFound) })
        }

        fn act<'a>(
            &'a self,
            _caller: &'a RequestInfo,
            _vm: domain::VmId,
            _action: OperatorAction,
        ) -> BoxFuture<'a, Result<(), AppError>> {
            Box::pin(async { Err(AppError::Forbidden) })
        }

        fn panel<'a>(
            &'a self,
            _caller: &'a RequestInfo,
            _name: PanelName,
            _query: &'a str,
        ) -> BoxFuture<'a, Result<String, AppError>> {
            Box::pin(async { Err(AppError::Forbidden) })
        }

        fn submit<'a>(
            &'a self,
            _caller: &'a RequestInfo,
            _name: PanelName,
            _action: &'a str,
            _form: &'a str,
        ) -> BoxFuture<'a, Result<String, AppError>> {
            Box::pin(async { Err(AppError::Forbidden) })
        }
    }

    fn ready<T>(fut: impl std::future::Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => value,
            Poll::Pending => panic!("the test back end never waits"),
        }
    }

    #[test]
    fn get_fleet_goes_through_the_backend_with_the_caller() {
        let recorder = Arc::new(Recorder::default());
        let owner = Owner::new();
        let result = owner.with(|| {
            provide_context(BackendHandle::new(recorder.clone()));
            let (parts, ()) = http::Request::builder()
                .uri("/rpc/fleet")
                .header("x-caller", "alice")
                .body(())
                .unwrap()
                .into_parts();
            provide_context(parts);
            ready(get_fleet("status=down".into()))
        });
        assert_eq!(result, Ok(FleetSnapshot::default()));
        assert_eq!(
            *recorder.0.lock().unwrap(),
            vec!["/rpc/fleet alice status=down"]
        );
    }

    #[test]
    fn get_fleet_without_a_backend_is_unavailable() {
        let owner = Owner::new();
        let result = owner.with(|| ready(get_fleet(String::new())));
        assert_eq!(result, Err(AppError::Unavailable));
    }
}
