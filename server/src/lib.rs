//! vm-healthcheck server: heartbeat ingest, status, REST API and the dashboard's back end.

pub mod agents;
pub mod api;
pub mod auth;
pub mod cache;
pub mod config;
pub mod db;
pub mod error;
pub mod ingest;
pub mod proxmox;
pub mod remediation;
pub mod report;
pub mod scheduler;
pub mod state;
pub mod status;
pub mod web;

use crate::auth::Credentials;
use crate::cache::StateCache;
use crate::config::Config;
use crate::db::{store, Db};
use crate::ingest::Ingest;
use crate::state::{AppState, Inner, SharedStatusConfig};
use leptos::config::{Env, LeptosOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Milliseconds since the Unix epoch, the time unit of the whole schema.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A started server; dropping it leaves it running, `stop` ends it and its jobs.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    serve: JoinHandle<()>,
    jobs: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting requests and ends the background jobs.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.serve).await;
        for job in &self.jobs {
            job.abort();
        }
        self.state.engine.shutdown();
    }

    /// Resolves when the HTTP server ends (on a signal or `stop`).
    pub async fn wait(self) {
        let _ = self.serve.await;
        for job in &self.jobs {
            job.abort();
        }
    }
}

/// Connects storage, loads credentials and configuration, and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let db = Db::connect(&config.database_url, config.db_pool_size).await?;
    let credentials = Credentials::load(&db, &config).await?;
    let cache = Arc::new(StateCache::new(config.redis_url.as_deref())?);
    let saved = {
        let mut conn = db.conn().await?;
        store::load_status_config(&mut conn).await?
    };
    let status_config =
        SharedStatusConfig::new(saved.unwrap_or_else(|| config.status_defaults.clone()));
    let ingest_health = remediation::IngestHealth::default();
    let (ingest, writer) = Ingest::start(
        db.clone(),
        cache.clone(),
        status_config.clone(),
        config.ingest_batch_max,
        config.ingest_queue_capacity,
        ingest_health.clone(),
    );
    let engine = Arc::new(remediation::Engine::new(
        &config,
        db.clone(),
        cache.clone(),
        status_config.clone(),
        ingest_health,
        now_ms(),
    )?);
    let site_root = config.site_root.to_string_lossy().into_owned();
    let wasm = config
        .site_root
        .join("pkg")
        .join(format!("{}_bg.wasm", web::OUTPUT_NAME));
    if !wasm.exists() {
        tracing::warn!(path = %wasm.display(), "front end not built; the dashboard will not refresh itself (run scripts/run.sh)");
    }
    let leptos_options = LeptosOptions::builder()
        .output_name(web::OUTPUT_NAME)
        .site_root(site_root)
        .site_pkg_dir("pkg")
        .env(Env::PROD)
        .build();
    let state = AppState {
        leptos_options,
        inner: Arc::new(Inner {
            config: config.clone(),
            db,
            cache,
            credentials,
            status_config,
            ingest,
            engine,
        }),
    };
    scheduler::rebuild_cache(&state).await;
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    let addr = listener.local_addr()?;
    let app = web::router(state.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = shutdown_rx => {}
                    _ = shutdown_signal() => {}
                }
            })
            .await;
        if let Err(err) = result {
            tracing::error!(error = %err, "HTTP server failed");
        }
    });
    let scheduler = tokio::spawn(scheduler::run(state.clone()));
    tracing::info!(%addr, database = state.db.backend_name(), "vm-healthcheck listening");
    Ok(RunningServer {
        addr,
        state,
        shutdown: Some(shutdown_tx),
        serve,
        jobs: vec![writer, scheduler],
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
