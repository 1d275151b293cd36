//! Periodic jobs: stale-VM detection, the remediation round and cache recovery.

use crate::cache;
use crate::db::DbError;
use crate::db::store;
use crate::state::AppState;
use domain::VmId;
use domain::status;

/// VMs judged at a time by the stale check.
const STALE_PAGE: i64 = 5_000;

/// Runs the jobs every `SCHEDULER_INTERVAL_MS` until the task is aborted. Heartbeats are
/// judged in a loop of their own: a remediation round waiting on a slow or hung Proxmox
/// never delays finding the next silent VM.
pub async fn run(state: AppState) {
    tokio::join!(judge_heartbeats(&state), remediate(&state));
}

async fn judge_heartbeats(state: &AppState) {
    let mut ticker = tokio::time::interval(state.config.scheduler_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = sync_settings(state).await {
            tracing::warn!(error = %err, "could not reload the settings");
        }
        let now_ms = crate::now_ms();
        if state.engine.note_clock(now_ms) {
            restart_silences(state, now_ms).await;
        }
        if !state.engine.stale_check_paused(now_ms)
            && let Err(err) = mark_stale(state, now_ms).await
        {
            tracing::warn!(error = %err, "stale check failed");
        }
        if state.cache.needs_rebuild().await {
            rebuild_cache(state).await;
        }
    }
}

async fn remediate(state: &AppState) {
    let mut ticker = tokio::time::interval(state.config.scheduler_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = std::time::Instant::now();
        if let Err(err) = state.engine.tick(crate::now_ms()).await {
            // Includes a stored state this version cannot read: nothing is acted on.
            tracing::error!(error = %err, "remediation round failed");
        }
        state
            .health
            .record_round(crate::now_ms(), started.elapsed());
    }
}

/// Picks up settings another replica saved. Under the settings turn, so a save on this
/// replica that commits meanwhile is not overwritten by what was read before it.
pub async fn sync_settings(state: &AppState) -> Result<(), DbError> {
    let mut conn = state.db.conn().await?;
    let _turn = state.remediation.turn().await;
    if let Some(saved) = store::load_status_config(&mut conn).await?
        && saved != state.status_config.get()
    {
        state.status_config.set(saved);
    }
    let stored = store::load_remediation_tuning(&mut conn).await?;
    state.remediation.apply_stored(stored);
    Ok(())
}

/// After the clock was stepped back, heartbeat times stored ahead of it would keep a
/// silent VM looking fresh until the clock caught up (an hour for an hour's step). Bringing
/// them back to now makes every silence count from the step: a hung VM is found at most
/// one stale timeout later than it would have been.
async fn restart_silences(state: &AppState, now_ms: i64) {
    let brought_back = match state.db.write_conn().await {
        Ok((mut conn, _turn)) => store::bring_back_future_heartbeats(&mut conn, now_ms).await,
        Err(err) => Err(err),
    };
    match brought_back {
        Ok(0) => {}
        Ok(vms) => {
            tracing::warn!(
                vms,
                "heartbeat times ahead of the clock brought back to now"
            );
            rebuild_cache(state).await;
        }
        Err(err) => {
            tracing::error!(error = %err, "could not bring heartbeat times back to the clock")
        }
    }
}

/// Turns VMs whose heartbeats went stale `down`, recording each change.
pub async fn mark_stale(state: &AppState, now_ms: i64) -> Result<Vec<VmId>, DbError> {
    let cfg = state.status_config.get();
    let mut changed = Vec::new();
    {
        let (mut conn, _turn) = state.db.write_conn().await?;
        // A page at a time: a whole fleet going silent at once is judged without holding
        // every row in memory.
        let mut after = 0;
        loop {
            let rows =
                store::overdue_page(&mut conn, cfg.stale_timeout_ms, now_ms, after, STALE_PAGE)
                    .await?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let verdicts = judge(&rows, &cfg, now_ms);
            changed.extend(store::apply_verdicts(&mut conn, &verdicts, now_ms).await?);
        }
    }
    if !changed.is_empty() {
        tracing::info!(vms = changed.len(), "heartbeats went stale");
        cache::refresh(&state.db, &state.cache, &changed).await;
    }
    Ok(changed)
}

/// The core's verdict for each row whose status it changes.
pub fn judge(
    rows: &[store::VmRow],
    cfg: &status::StatusConfig,
    now_ms: i64,
) -> Vec<(VmId, domain::VmStatus, status::Verdict)> {
    rows.iter()
        .filter_map(|row| {
            let verdict = status::evaluate(row.latest_report().as_ref(), cfg, now_ms);
            (verdict.status != row.status()).then(|| (row.vm_id(), row.status(), verdict))
        })
        .collect()
}

/// Refills the cache from the database (start-up, and after a Redis outage).
pub async fn rebuild_cache(state: &AppState) {
    state.cache.open_writes();
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
