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
    // Stored heartbeat times to bring back to the clock: set by a step back, done again
    // when the amnesty it started ends (a batch timed before the step may commit late).
    let mut bring_back = BringBack::Done;
    let mut refusals = Refusals::default();
    loop {
        ticker.tick().await;
        if let Err(err) = sync_settings(state).await {
            tracing::warn!(error = %err, "could not reload the settings");
        }
        let now_ms = crate::now_ms();
        if state.engine.note_clock(now_ms) {
            bring_back = BringBack::Now;
        }
        let paused = state.engine.stale_check_paused(now_ms);
        bring_back = match bring_back {
            BringBack::Now if paused => {
                if restart_silences(state, now_ms).await {
                    BringBack::AfterAmnesty
                } else {
                    BringBack::Now
                }
            }
            BringBack::Now | BringBack::AfterAmnesty if !paused => {
                if restart_silences(state, now_ms).await {
                    BringBack::Done
                } else {
                    bring_back
                }
            }
            other => other,
        };
        let judged_at = if paused {
            // Refused reports prove nothing about VMs that were already overdue when the
            // refusals began: those are still judged, however long the refusals last.
            refusals.note(
                state.health.last_ingest_failure_ms(),
                state.engine.amnesty_from_ms(),
                state.status_config.get().stale_timeout_ms,
                now_ms,
            )
        } else {
            refusals = Refusals::default();
            Some(now_ms)
        };
        if let Some(at) = judged_at
            && let Err(err) = mark_stale(state, at).await
        {
            tracing::warn!(error = %err, "stale check failed");
        }
        if state.cache.needs_rebuild().await {
            rebuild_cache(state).await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BringBack {
    Done,
    Now,
    AfterAmnesty,
}

/// The current run of refused reports, as the stale check sees it during an amnesty.
#[derive(Default)]
struct Refusals {
    /// The first refusal of the run and the latest one seen.
    run: Option<(i64, i64)>,
}

impl Refusals {
    /// The time to judge at during an amnesty at `now_ms`. While start-up, a pause or a
    /// clock jump (at `other_cause_ms`) holds it, `None`: nobody is judged. While only
    /// refused reports hold it, the start of their run: VMs overdue before the refusals
    /// began are still judged, however long the refusals last.
    fn note(
        &mut self,
        latest_failure_ms: i64,
        other_cause_ms: i64,
        stale_timeout_ms: i64,
        now_ms: i64,
    ) -> Option<i64> {
        if other_cause_ms.saturating_add(stale_timeout_ms) > now_ms || latest_failure_ms <= 0 {
            return None;
        }
        let run = match self.run {
            // A quiet stretch longer than a stale timeout between refusals starts a new run.
            Some((first, last)) if latest_failure_ms.saturating_sub(last) <= stale_timeout_ms => {
                (first, latest_failure_ms)
            }
            _ => (latest_failure_ms, latest_failure_ms),
        };
        self.run = Some(run);
        Some(run.0)
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
async fn restart_silences(state: &AppState, now_ms: i64) -> bool {
    let brought_back = match state.db.write_conn().await {
        Ok((mut conn, _turn)) => store::bring_back_future_heartbeats(&mut conn, now_ms).await,
        Err(err) => Err(err),
    };
    match brought_back {
        Ok(0) => true,
        Ok(vms) => {
            tracing::warn!(
                vms,
                "heartbeat times ahead of the clock brought back to now"
            );
            rebuild_cache(state).await;
            true
        }
        Err(err) => {
            // Tried again next round: until then a silent VM may look fresh.
            tracing::error!(error = %err, "could not bring heartbeat times back to the clock");
            false
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
pub fn judge(rows: &[store::VmRow], cfg: &status::StatusConfig, now_ms: i64) -> Vec<store::Judged> {
    rows.iter()
        .filter_map(|row| {
            let verdict = status::evaluate(row.latest_report().as_ref(), cfg, now_ms);
            (verdict.status != row.status()).then(|| store::Judged {
                vm_id: row.vm_id(),
                from: row.status(),
                seen_ms: row.last_seen_ms,
                verdict,
            })
        })
        .collect()
}

/// Refills the cache from the database (start-up, and after a Redis outage).
pub async fn rebuild_cache(state: &AppState) {
    let ticket = state.cache.open_writes().await;
    let views = match state.db.conn().await {
        Ok(mut conn) => store::revised_views(&mut conn).await,
        Err(err) => Err(err),
    };
    match views {
        Ok(views) => {
            if let Err(err) = state.cache.rebuild(views, ticket).await {
                tracing::debug!(error = %err, "cache rebuild failed");
            }
        }
        Err(err) => tracing::warn!(error = %err, "could not read VMs for the cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::Refusals;

    #[test]
    fn only_vms_overdue_before_a_run_of_refusals_are_judged_during_it() {
        const STALE: i64 = 1_000;
        let mut r = Refusals::default();
        // Start-up (or a pause, or a clock jump) still holds the amnesty: nobody.
        assert_eq!(r.note(5_000, 4_500, STALE, 5_200), None);
        // Refusals alone hold it: judged as of the first refusal of the run.
        assert_eq!(r.note(6_000, 4_500, STALE, 6_100), Some(6_000));
        assert_eq!(r.note(6_900, 4_500, STALE, 7_000), Some(6_000));
        assert_eq!(r.note(7_800, 4_500, STALE, 7_900), Some(6_000));
        // A quiet stretch longer than a stale timeout: a new run.
        assert_eq!(r.note(9_000, 4_500, STALE, 9_100), Some(9_000));
        // No refusal at all: nothing to date the run by.
        assert_eq!(Refusals::default().note(0, 0, STALE, 9_000), None);
    }
}
