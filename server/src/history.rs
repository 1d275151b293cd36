//! History upkeep: folds new samples into the minute and hour rollups and deletes what
//! retention no longer keeps, in bounded batches that never hold the writer for long.

use crate::db::{DbError, history, store};
use crate::state::AppState;
use domain::VmId;
use domain::history::{grid, pick_tier};
use domain::view::MetricHistory;
use std::time::{Duration, Instant};

/// How often the job looks for work.
const INTERVAL: Duration = Duration::from_secs(5);
/// Rows one statement folds or deletes: a few tens of milliseconds of the writer's time.
pub const BATCH: i64 = 5_000;
/// Longest one pass keeps working before it waits for the next interval.
const BUDGET: Duration = Duration::from_secs(1);

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub folded: usize,
    pub deleted: usize,
    /// Nothing settled is left to fold and nothing expired is left to delete.
    pub done: bool,
}

/// Runs a pass every few seconds until the task is aborted. Every replica runs it: two
/// folding at once move the position once, and deletes are idempotent.
pub async fn run(state: AppState) {
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = Instant::now();
        match pass(&state, crate::now_ms(), BUDGET).await {
            Ok(done) if done.folded + done.deleted > 0 => tracing::debug!(
                folded = done.folded,
                deleted = done.deleted,
                caught_up = done.done,
                ms = started.elapsed().as_millis(),
                "history upkeep"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "history upkeep failed"),
        }
    }
}

/// Folds, then deletes, one batch at a time until nothing is left or `budget` is spent. The
/// SQLite write turn is taken per batch, so reports wait for at most one batch.
pub async fn pass(state: &AppState, now_ms: i64, budget: Duration) -> Result<Pass, DbError> {
    let started = Instant::now();
    let mut done = Pass::default();
    let settled_before = now_ms.saturating_sub(history::SETTLE_MS);
    loop {
        let folded = {
            let (mut conn, _turn) = state.db.write_conn().await?;
            history::fold(&mut conn, settled_before, BATCH, now_ms).await?
        };
        done.folded += folded.samples;
        if folded.caught_up || started.elapsed() >= budget {
            break;
        }
    }
    loop {
        if started.elapsed() >= budget {
            return Ok(done);
        }
        let deleted = {
            let (mut conn, _turn) = state.db.write_conn().await?;
            history::prune(&mut conn, &state.config.retention, now_ms, BATCH).await?
        };
        done.deleted += deleted;
        if deleted == 0 {
            done.done = true;
            return Ok(done);
        }
    }
}

/// A VM's chart between `from_ms` and `to_ms` (checked by the caller) in at most `points`
/// points, from the tier the range needs; `None` for an unknown VM.
pub async fn chart(
    state: &AppState,
    vm: VmId,
    from_ms: i64,
    to_ms: i64,
    points: i64,
) -> Result<Option<MetricHistory>, DbError> {
    let mut conn = state.db.conn().await?;
    if store::get_vm(&mut conn, vm).await?.is_none() {
        return Ok(None);
    }
    let tier = pick_tier(
        from_ms,
        to_ms,
        points,
        crate::now_ms(),
        &state.config.retention,
    );
    let grid = grid(from_ms, to_ms, points, tier);
    let points = history::metric_history(&mut conn, vm, grid, to_ms, tier).await?;
    Ok(Some(MetricHistory {
        vm_id: vm,
        from_ms: grid.start_ms,
        to_ms,
        tier,
        point_ms: grid.point_ms,
        points,
    }))
}
