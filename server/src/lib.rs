//! vm-healthcheck server: heartbeat ingest, status, REST API and the dashboard's back end.

// Leptos view types nest deeply; the compiler needs room to lay them out.
#![recursion_limit = "256"]

pub mod accounts;
pub mod actions;
pub mod agents;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod configure;
pub mod db;
pub mod delivery;
pub mod enrolment;
pub mod health;
pub mod history;
pub mod http;
pub mod ingest;
pub mod live;
pub mod notify;
pub mod panels;
pub mod remediation;
pub mod scheduler;
pub mod settings;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod web;

use crate::auth::Credentials;
use crate::cache::StateCache;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::db::{Db, store};
use crate::health::JobHealth;
use crate::ingest::Ingest;
use crate::settings::{SharedRemediation, SharedStatusConfig};
use crate::state::{AppState, Inner};
use leptos::config::{Env, LeptosOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Milliseconds since the Unix epoch, the time unit of the whole schema.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .saturating_add(clock::wall_step_ms())
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
        self.begin_shutdown();
        let _ = (&mut self.serve).await;
        self.end_jobs();
    }

    /// Asks the HTTP server to stop, as a signal would; `wait` then returns.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Resolves when the HTTP server ends (on a signal or `stop`), then ends the jobs the
    /// same way `stop` does.
    pub async fn wait(mut self) {
        let _ = (&mut self.serve).await;
        self.end_jobs();
    }

    fn end_jobs(&self) {
        for job in &self.jobs {
            job.abort();
        }
        self.state.engine.shutdown();
    }
}

/// Connects storage, loads credentials and configuration, and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let (db, migrations) = Db::connect_migrated(&config.database_url, config.db_pool_size).await?;
    for migration in migrations {
        tracing::info!(%migration, "applied a database migration");
    }
    let credentials = Credentials::load(&db, &config).await?;
    accounts::bootstrap(&db, &config).await?;
    let (live, fanout) = live::LiveBus::new(config.redis_url.as_deref());
    let cache = Arc::new(StateCache::new(config.redis_url.as_deref(), live.clone())?);
    let saved = {
        let mut conn = db.conn().await?;
        store::load_status_config(&mut conn).await?
    };
    let status_config =
        SharedStatusConfig::new(saved.unwrap_or_else(|| config.status_defaults.clone()));
    let remediation = SharedRemediation::new(config.remediation.clone());
    {
        let mut conn = db.conn().await?;
        let stored = store::load_remediation_tuning(&mut conn).await?;
        if let store::StoredSetting::Readable(tuning) = &stored {
            tracing::info!(
                ?tuning,
                "remediation settings saved by an admin apply over the environment"
            );
        }
        remediation.apply_stored(stored);
    }
    let health = JobHealth::default();
    let (ingest, writer) = Ingest::new(
        db.clone(),
        cache.clone(),
        status_config.clone(),
        config.ingest_batch_max,
        config.ingest_queue_capacity,
        health.clone(),
        if config.ingest_set_based {
            ingest::StatePath::SetBased
        } else {
            ingest::StatePath::OneByOne
        },
    );
    let engine = Arc::new(remediation::Engine::from_config(
        &config,
        db.clone(),
        cache.clone(),
        status_config.clone(),
        remediation.clone(),
        health.clone(),
        Arc::new(SystemClock),
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
    let deliverer = Arc::new(delivery::Deliverer::new(
        &config.notify,
        db.clone(),
        health.clone(),
    ));
    let state = AppState {
        inner: Arc::new(Inner {
            leptos_options,
            config: config.clone(),
            db,
            cache,
            credentials,
            status_config,
            remediation,
            ingest,
            engine,
            health: health.clone(),
            deliverer,
            started_ms: now_ms(),
            login_throttle: throttle::LoginThrottle::new(config.accounts.login_window_ms),
            report_limiter: limiter(
                config.limits.report_rate_per_minute,
                config.limits.report_burst,
            ),
            enrolment_limiter: limiter(
                config.limits.enrolment_rate_per_minute,
                config.limits.enrolment_rate_per_minute,
            ),
            known_credentials: enrolment::KnownCredentials::default(),
        }),
    };
    scheduler::rebuild_cache(&state).await;
    let tls = tls::prepare(&config)?;
    let https = tls.is_some();
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    let addr = listener.local_addr()?;
    let app = web::router(state.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let handshake_timeout = config.tls_handshake_timeout;
    let live_to_close = live.clone();
    let serve = tokio::spawn(async move {
        let stop = async move {
            tokio::select! {
                _ = shutdown_rx => {}
                _ = shutdown_signal() => {}
            }
            // Open live streams would otherwise hold the graceful shutdown open.
            live_to_close.close();
        };
        let result = match tls {
            Some(acceptor) => tls::serve(listener, app, acceptor, handshake_timeout, stop).await,
            None => {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(stop)
                .await
            }
        };
        if let Err(err) = result {
            tracing::error!(error = %err, "HTTP server failed");
        }
    });
    let writer = supervise("ingest writer", health.clone(), move || {
        writer.clone().run()
    });
    let scheduler_state = state.clone();
    let health_for_upkeep = health.clone();
    let scheduler = supervise("scheduler", health, move || {
        scheduler::run(scheduler_state.clone())
    });
    let history_state = state.clone();
    let upkeep = supervise("history upkeep", health_for_upkeep, move || {
        history::run(history_state.clone())
    });
    let notify_state = state.clone();
    let notifier = supervise("notifier", state.health.clone(), move || {
        notify::run(notify_state.clone())
    });
    let mut jobs = vec![writer, scheduler, upkeep, notifier];
    if let Some(link) = fanout {
        jobs.push(tokio::spawn(live::run_fanout(live, link)));
    }
    tracing::info!(%addr, https, database = state.db.backend_name(), "vm-healthcheck listening");
    Ok(RunningServer {
        addr,
        state,
        shutdown: Some(shutdown_tx),
        serve,
        jobs,
    })
}

/// A keyed rate limit: `per_minute` sustained, `burst` at once.
fn limiter(per_minute: u32, burst: u32) -> governor::DefaultKeyedRateLimiter<String> {
    let per_minute = std::num::NonZeroU32::new(per_minute).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute).allow_burst(burst))
}

/// Runs a background job and starts it again if it panics: a dead writer would refuse every
/// heartbeat and a dead scheduler would stop detection, while the API still answered.
fn supervise<F, Fut>(name: &'static str, health: JobHealth, job: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        // A job that keeps panicking is restarted at most every 30 s, not in a hot loop.
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            // Aborting the supervisor drops this guard, which ends the job too.
            let mut running = AbortOnDrop(tokio::spawn(job()));
            match (&mut running.0).await {
                Ok(()) => return,
                Err(err) if err.is_cancelled() => return,
                Err(err) => {
                    health.record_restart();
                    // Heartbeats refused meanwhile must not count against the VMs.
                    health.record_ingest_failure(now_ms());
                    tracing::error!(job = name, error = %err, pause_ms = pause.as_millis(), "background job panicked; restarting it");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_job_is_started_again() {
        let health = JobHealth::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let supervisor = supervise("test job", health.clone(), move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::AcqRel) == 0 {
                    panic!("first run fails");
                }
            }
        });
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::Acquire), 2);
        assert_eq!(health.restarts(), 1);
    }
}
