//! Periodic jobs: stale-VM detection and cache recovery, each a plain async fn.

use crate::db::store;
use crate::db::DbError;
use crate::ingest::refresh_cache;
use crate::state::AppState;

/// Runs the jobs every `SCHEDULER_INTERVAL_MS` until the task is aborted.
pub async fn run(state: AppState) {
    let mut ticker = tokio::time::interval(state.config.scheduler_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = sync_status_config(&state).await {
            tracing::warn!(error = %err, "could not reload the status configuration");
        }
        if let Err(err) = mark_stale(&state, crate::now_ms()).await {
            tracing::warn!(error = %err, "stale check failed");
        }
        if let Err(err) = state.engine.tick(crate::now_ms()).await {
            tracing::warn!(error = %err, "remediation round failed");
        }
        if state.cache.needs_rebuild().await {
            rebuild_cache(&state).await;
        }
    }
}

/// Picks up configuration saved by another replica.
pub async fn sync_status_config(state: &AppState) -> Result<(), DbError> {
    let mut conn = state.db.conn().await?;
    if let Some(saved) = store::load_status_config(&mut conn).await? {
        if saved != state.status_config.get() {
            state.status_config.set(saved);
        }
    }
    Ok(())
}

/// Turns VMs whose heartbeats went stale `down`, recording each change.
pub async fn mark_stale(state: &AppState, now_ms: i64) -> Result<Vec<i64>, DbError> {
    let cfg = state.status_config.get();
    let changed = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        store::reevaluate(&mut conn, &cfg, now_ms, true).await?
    };
    if !changed.is_empty() {
        tracing::info!(vms = changed.len(), "heartbeats went stale");
        refresh_cache(&state.db, &state.cache, &changed).await;
    }
    Ok(changed)
}

/// Refills the cache from the database (start-up, and after a Redis outage).
pub async fn rebuild_cache(state: &AppState) {
    let views = match state.db.conn().await {
        Ok(mut conn) => store::list_vms(&mut conn).await,
        Err(err) => Err(err),
    };
    match views {
        Ok(views) => {
            if let Err(err) = state.cache.rebuild(views).await {
                tracing::debug!(error = %err, "cache rebuild failed");
            }
        }
        Err(err) => tracing::warn!(error = %err, "could not read VMs for the cache"),
    }
}
