//! The fleet data source: a server function in the browser, a provided callback on the server.

use crate::error::AppError;
use crate::types::FleetSnapshot;
use leptos::prelude::*;

#[cfg(feature = "ssr")]
pub use source::FleetSource;

#[cfg(feature = "ssr")]
mod source {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    type FleetFuture = Pin<Box<dyn Future<Output = Result<FleetSnapshot, AppError>> + Send>>;

    /// Provided by the server as context so `app` needs no storage code.
    #[derive(Clone)]
    pub struct FleetSource(Arc<dyn Fn() -> FleetFuture + Send + Sync>);

    impl FleetSource {
        pub fn new<F, Fut>(load: F) -> Self
        where
            F: Fn() -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<FleetSnapshot, AppError>> + Send + 'static,
        {
            Self(Arc::new(move || Box::pin(load())))
        }

        pub async fn load(&self) -> Result<FleetSnapshot, AppError> {
            (self.0)().await
        }
    }
}

/// The whole fleet with per-status counts, as the dashboard shows it.
#[server(prefix = "/rpc", endpoint = "fleet")]
pub async fn get_fleet() -> Result<FleetSnapshot, AppError> {
    let source = use_context::<FleetSource>().ok_or(AppError::Unavailable)?;
    source.load().await
}
