//! Metric history queries: chart points from raw samples and rollups, folding new samples
//! into the minute and hour rollups, and deleting what retention no longer keeps.

use super::{Conn, DbError};
use crate::{with_conn, write_transaction};
use diesel::sql_types::{BigInt, Double, Nullable};
use diesel_async::RunQueryDsl;
use domain::VmId;
use domain::history::{Grid, PointAggregate, Retention, Spread, Tier};
use domain::view::MetricPoint;
use std::collections::BTreeMap;

/// Samples must be this old before they are folded: a write transaction that took its row
/// id earlier may still be committing, and folding past it would skip it.
pub const SETTLE_MS: i64 = 30_000;

/// One chart point's aggregates as a query returns them.
#[derive(diesel::QueryableByName)]
struct PointRow {
    #[diesel(sql_type = BigInt)]
    k: i64,
    #[diesel(sql_type = BigInt)]
    t_ms: i64,
    #[diesel(sql_type = BigInt)]
    samples: i64,
    #[diesel(sql_type = Double)]
    cpu_min: f64,
    #[diesel(sql_type = Double)]
    cpu_max: f64,
    #[diesel(sql_type = Double)]
    cpu_sum: f64,
    #[diesel(sql_type = Double)]
    ram_min: f64,
    #[diesel(sql_type = Double)]
    ram_max: f64,
    #[diesel(sql_type = Double)]
    ram_sum: f64,
    #[diesel(sql_type = BigInt)]
    disk_samples: i64,
    #[diesel(sql_type = Nullable<Double>)]
    disk_min: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    disk_max: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    disk_sum: Option<f64>,
    #[diesel(sql_type = BigInt)]
    uptime_max: i64,
}

impl PointRow {
    fn aggregate(&self) -> PointAggregate {
        let spread = |count, min, max, sum| Spread {
            count,
            min,
            max,
            sum,
        };
        PointAggregate {
            t_ms: self.t_ms,
            cpu: spread(self.samples, self.cpu_min, self.cpu_max, self.cpu_sum),
            ram: spread(self.samples, self.ram_min, self.ram_max, self.ram_sum),
            disk: spread(
                self.disk_samples,
                self.disk_min.unwrap_or_default(),
                self.disk_max.unwrap_or_default(),
                self.disk_sum.unwrap_or_default(),
            ),
            uptime_max: self.uptime_max,
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Position {
    #[diesel(sql_type = BigInt)]
    position: i64,
}

#[derive(diesel::QueryableByName)]
struct SampleStamp {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    received_ms: i64,
}

/// The per-sample values every aggregate is built from: RAM and the fullest disk in percent.
const SAMPLE_VALUES: &str = "SELECT id, vm_id, observed_ms, cpu_percent, \
    CAST(ram_used_bytes AS DOUBLE PRECISION) * 100 / ram_total_bytes AS ram, \
    disk_max_percent AS disk, uptime_seconds FROM metric_samples";

/// Aggregates of raw samples, grouped by `key`.
fn raw_aggregates(key: &str) -> String {
    format!(
        "COUNT(*) AS samples, MIN(cpu_percent) AS cpu_min, MAX(cpu_percent) AS cpu_max, \
         SUM(cpu_percent) AS cpu_sum, MIN(ram) AS ram_min, MAX(ram) AS ram_max, \
         SUM(ram) AS ram_sum, COUNT(disk) AS disk_samples, MIN(disk) AS disk_min, \
         MAX(disk) AS disk_max, SUM(disk) AS disk_sum, MAX(uptime_seconds) AS uptime_max \
         FROM ({SAMPLE_VALUES}) s WHERE {key} >= 0"
    )
}

/// A VM's history on `grid` up to `to_ms`, from `tier`.
/// A rollup holds every sample up to the job's position; the samples after it are read raw,
/// so the newest minutes are in the chart before they are folded, and none is counted twice.
pub async fn metric_history(
    conn: &mut Conn,
    vm_id: VmId,
    grid: Grid,
    to_ms: i64,
    tier: Tier,
) -> Result<Vec<MetricPoint>, DbError> {
    let (from_ms, width) = (grid.start_ms, grid.point_ms);
    let mut merged: BTreeMap<i64, PointAggregate> = BTreeMap::new();
    let mut add = |rows: Vec<PointRow>| {
        for row in rows {
            let point = row.aggregate();
            merged
                .entry(row.k)
                .and_modify(|p| *p = p.merge(point))
                .or_insert(point);
        }
    };
    let raw_after = match tier {
        Tier::Raw => None,
        Tier::Minute | Tier::Hour => {
            // The position read on both sides of the rollup read: a fold in between would
            // count its samples in the rollup and again as raw.
            let mut before = position(conn).await?;
            let mut rows = Vec::new();
            for _ in 0..3 {
                rows = rollup_points(conn, tier, vm_id, from_ms, to_ms, width).await?;
                let after = position(conn).await?;
                if after == before {
                    break;
                }
                before = after;
            }
            add(rows);
            Some(before)
        }
    };
    let sql = format!(
        "SELECT (observed_ms - $1) / $2 AS k, MIN(observed_ms) AS t_ms, {} \
         AND vm_id = $3 AND observed_ms >= $1 AND observed_ms <= $4 AND id > $5 \
         GROUP BY (observed_ms - $1) / $2",
        raw_aggregates("(observed_ms - $1) / $2")
    );
    let rows = with_conn!(conn, |c| {
        diesel::sql_query(&sql)
            .bind::<BigInt, _>(from_ms)
            .bind::<BigInt, _>(width)
            .bind::<BigInt, _>(vm_id.get())
            .bind::<BigInt, _>(to_ms)
            .bind::<BigInt, _>(raw_after.unwrap_or(0))
            .load::<PointRow>(c)
            .await
    })?;
    add(rows);
    Ok(merged.into_values().map(MetricPoint::from).collect())
}

async fn rollup_points(
    conn: &mut Conn,
    tier: Tier,
    vm_id: VmId,
    from_ms: i64,
    to_ms: i64,
    width: i64,
) -> Result<Vec<PointRow>, DbError> {
    let table = rollup_table(tier);
    let sql = format!(
        "SELECT (bucket_ms - $1) / $2 AS k, MIN(bucket_ms) AS t_ms, \
         CAST(SUM(samples) AS BIGINT) AS samples, MIN(cpu_min) AS cpu_min, MAX(cpu_max) AS cpu_max, \
         SUM(cpu_sum) AS cpu_sum, MIN(ram_min) AS ram_min, MAX(ram_max) AS ram_max, \
         SUM(ram_sum) AS ram_sum, CAST(SUM(disk_samples) AS BIGINT) AS disk_samples, \
         MIN(disk_min) AS disk_min, MAX(disk_max) AS disk_max, SUM(disk_sum) AS disk_sum, \
         MAX(uptime_max) AS uptime_max FROM {table} \
         WHERE (bucket_ms - $1) / $2 >= 0 AND vm_id = $3 AND bucket_ms >= $1 AND bucket_ms <= $4 \
         GROUP BY (bucket_ms - $1) / $2"
    );
    Ok(with_conn!(conn, |c| {
        diesel::sql_query(&sql)
            .bind::<BigInt, _>(from_ms)
            .bind::<BigInt, _>(width)
            .bind::<BigInt, _>(vm_id.get())
            .bind::<BigInt, _>(to_ms)
            .load::<PointRow>(c)
            .await
    })?)
}

fn rollup_table(tier: Tier) -> &'static str {
    match tier {
        Tier::Raw => "metric_samples",
        Tier::Minute => "metric_minutes",
        Tier::Hour => "metric_hours",
    }
}

/// The id of the last sample the rollups hold.
pub async fn position(conn: &mut Conn) -> Result<i64, DbError> {
    let row: Position = with_conn!(conn, |c| {
        diesel::sql_query("SELECT position FROM history_jobs WHERE name = 'rollup'")
            .get_result(c)
            .await
    })?;
    Ok(row.position)
}

/// What one fold did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub samples: usize,
    /// No settled sample is left unfolded.
    pub caught_up: bool,
}

/// Folds up to `limit` samples received before `settled_before_ms`, in id order, into the
/// minute and hour rollups, and moves the position past them, in one transaction. Another
/// replica folding the same samples at once makes this one a no-op (the position moves once).
pub async fn fold(
    conn: &mut Conn,
    settled_before_ms: i64,
    limit: i64,
    now_ms: i64,
) -> Result<Folded, DbError> {
    let postgres = matches!(conn, Conn::Postgres(_));
    let upserts = [Tier::Minute, Tier::Hour].map(|tier| fold_sql(tier, postgres));
    write_transaction!(conn, |c| {
        // With several replicas writing, ids are not committed in id order. A sample
        // received before the settle time whose insert is still uncommitted belongs to a
        // write transaction open longer than that: while one is, nothing is folded (the
        // position must never pass a sample not yet committed). Ingest is never blocked.
        if postgres {
            let open: Position = diesel::sql_query(
                "SELECT COUNT(*) AS position FROM pg_stat_activity \
                     WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                     AND xact_start < now() - make_interval(secs => $1)",
            )
            .bind::<diesel::sql_types::Double, _>(domain::status::approx_f64(SETTLE_MS) / 1000.0)
            .get_result(c)
            .await?;
            if open.position > 0 {
                return Ok(Folded {
                    samples: 0,
                    caught_up: true,
                });
            }
        }
        let from: Position =
            diesel::sql_query("SELECT position FROM history_jobs WHERE name = 'rollup'")
                .get_result(c)
                .await?;
        let stamps: Vec<SampleStamp> = diesel::sql_query(
            "SELECT id, received_ms FROM metric_samples WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind::<BigInt, _>(from.position)
        .bind::<BigInt, _>(limit)
        .load(c)
        .await?;
        let settled = stamps
            .iter()
            .take_while(|s| s.received_ms < settled_before_ms)
            .count();
        let caught_up =
            settled < stamps.len() || stamps.len() < usize::try_from(limit).unwrap_or(0);
        let Some(to) = settled.checked_sub(1).and_then(|i| stamps.get(i)) else {
            return Ok(Folded {
                samples: 0,
                caught_up: true,
            });
        };
        let moved = diesel::sql_query(
            "UPDATE history_jobs SET position = $1, updated_ms = $2 \
                 WHERE name = 'rollup' AND position = $3",
        )
        .bind::<BigInt, _>(to.id)
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(from.position)
        .execute(c)
        .await?;
        if moved != 1 {
            return Ok(Folded {
                samples: 0,
                caught_up: false,
            });
        }
        for sql in &upserts {
            diesel::sql_query(sql)
                .bind::<BigInt, _>(from.position)
                .bind::<BigInt, _>(to.id)
                .execute(c)
                .await?;
        }
        Ok(Folded {
            samples: settled,
            caught_up,
        })
    })
}

/// Adds the samples with ids in `($1, $2]` to a rollup tier: sums add, minima and maxima
/// combine, so a bucket folded in several passes ends as if folded once.
fn fold_sql(tier: Tier, postgres: bool) -> String {
    let table = rollup_table(tier);
    let width = tier.bucket_ms();
    let (least, greatest) = if postgres {
        ("LEAST", "GREATEST")
    } else {
        ("MIN", "MAX")
    };
    let add = |col: &str| format!("{col} = {table}.{col} + excluded.{col}");
    let low = |col: &str| format!("{col} = {least}({table}.{col}, excluded.{col})");
    let high = |col: &str| format!("{col} = {greatest}({table}.{col}, excluded.{col})");
    // Disk columns may be NULL on either side; SQLite's two-argument MIN would return NULL.
    let low_nullable = |col: &str| {
        format!(
            "{col} = {least}(COALESCE({table}.{col}, excluded.{col}), \
             COALESCE(excluded.{col}, {table}.{col}))"
        )
    };
    let high_nullable = |col: &str| {
        format!(
            "{col} = {greatest}(COALESCE({table}.{col}, excluded.{col}), \
             COALESCE(excluded.{col}, {table}.{col}))"
        )
    };
    let sum_nullable = |col: &str| {
        format!(
            "{col} = CASE WHEN {table}.{col} IS NULL THEN excluded.{col} \
             WHEN excluded.{col} IS NULL THEN {table}.{col} \
             ELSE {table}.{col} + excluded.{col} END"
        )
    };
    let updates = [
        add("samples"),
        low("cpu_min"),
        high("cpu_max"),
        add("cpu_sum"),
        low("ram_min"),
        high("ram_max"),
        add("ram_sum"),
        add("disk_samples"),
        low_nullable("disk_min"),
        high_nullable("disk_max"),
        sum_nullable("disk_sum"),
        high("uptime_max"),
    ]
    .join(", ");
    let bucket = format!("observed_ms - observed_ms % {width}");
    format!(
        "INSERT INTO {table} (vm_id, bucket_ms, samples, cpu_min, cpu_max, cpu_sum, ram_min, \
         ram_max, ram_sum, disk_samples, disk_min, disk_max, disk_sum, uptime_max) \
         SELECT vm_id, {bucket}, {} AND id > $1 AND id <= $2 GROUP BY vm_id, {bucket} \
         ON CONFLICT (vm_id, bucket_ms) DO UPDATE SET {updates}",
        raw_aggregates("id")
    )
}

/// Deletes one bounded batch of each kind of history retention no longer keeps; the number
/// of rows deleted (0: nothing left to delete).
pub async fn prune(
    conn: &mut Conn,
    keep: &Retention,
    now_ms: i64,
    limit: i64,
) -> Result<usize, DbError> {
    let postgres = matches!(conn, Conn::Postgres(_));
    let raw_before = keep.oldest_kept(Tier::Raw, now_ms);
    let event_before = keep.oldest_event_kept(now_ms);
    let rollups = [Tier::Minute, Tier::Hour].map(|tier| {
        let table = rollup_table(tier);
        (
            format!(
                "DELETE FROM {table} WHERE (vm_id, bucket_ms) IN \
                 (SELECT vm_id, bucket_ms FROM {table} WHERE bucket_ms < $1 ORDER BY bucket_ms LIMIT $2)"
            ),
            keep.oldest_kept(tier, now_ms),
        )
    });
    // (SQLite numbers placeholders in order of first use: each statement uses $1 first.)
    // Events have an index on their time; status changes and history rows are taken from
    // the front by id, and a reset that is still open is never deleted.
    let event_sql = [
        "DELETE FROM events WHERE id IN \
         (SELECT id FROM events WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
        "DELETE FROM status_changes WHERE at_ms < $1 AND id IN \
         (SELECT id FROM status_changes ORDER BY id LIMIT $2)",
        "DELETE FROM reset_attempts WHERE created_ms < $1 \
         AND outcome NOT IN ('pending', 'sent') AND id IN \
         (SELECT id FROM reset_attempts ORDER BY id LIMIT $2)",
    ];
    write_transaction!(conn, |c| {
        // One batch at a time across replicas (the job's row is the turn): two replicas
        // deleting the same front would each see the other's rows gone and take "none
        // deleted" for "nothing left".
        let lock = if postgres {
            "SELECT position FROM history_jobs WHERE name = 'rollup' FOR UPDATE"
        } else {
            "SELECT position FROM history_jobs WHERE name = 'rollup'"
        };
        let folded_to: Position = diesel::sql_query(lock).get_result(c).await?;
        // Raw samples: only folded ones, and from the front of the table (the oldest
        // ids), so a batch never scans the whole table looking for old rows.
        let mut deleted = diesel::sql_query(
            "DELETE FROM metric_samples WHERE id IN \
                 (SELECT id FROM metric_samples WHERE id <= $1 ORDER BY id LIMIT $2) \
                 AND observed_ms < $3",
        )
        .bind::<BigInt, _>(folded_to.position)
        .bind::<BigInt, _>(limit)
        .bind::<BigInt, _>(raw_before)
        .execute(c)
        .await?;
        for (sql, before) in &rollups {
            deleted += diesel::sql_query(sql)
                .bind::<BigInt, _>(*before)
                .bind::<BigInt, _>(limit)
                .execute(c)
                .await?;
        }
        for sql in event_sql {
            deleted += diesel::sql_query(sql)
                .bind::<BigInt, _>(event_before)
                .bind::<BigInt, _>(limit)
                .execute(c)
                .await?;
        }
        Ok(deleted)
    })
}
