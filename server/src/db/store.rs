//! Queries: every read and write the server makes, written once for both backends.

use super::schema::{
    credentials, metric_samples, reset_attempts, runtime_config, status_changes, vms,
};
use super::{Conn, DbError, SqliteConn};
use crate::status::{self, LatestReport};
use crate::with_conn;
use app::types::{DiskUsage, RemediationPhase, StatusConfig, VmStatus, VmView};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, QueryResult, SelectableHelper};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;

const STATUS_CONFIG_KEY: &str = "status_config";

/// A full `vms` row.
#[derive(Clone, Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = vms)]
pub struct VmRow {
    pub id: i64,
    pub hostname: String,
    pub os: String,
    pub machine_id: Option<String>,
    pub agent_version: Option<String>,
    pub reported_vmid: Option<i64>,
    pub reported_node: Option<String>,
    pub proxmox_node: Option<String>,
    pub proxmox_vmid: Option<i64>,
    pub proxmox_type: Option<String>,
    pub auto_reset: bool,
    pub status: String,
    pub status_since_ms: i64,
    pub status_reason: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: Option<i64>,
    pub observed_at_ms: Option<i64>,
    pub cpu_percent: Option<f64>,
    pub ram_used_bytes: Option<i64>,
    pub ram_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
    pub disk_max_percent: Option<f64>,
    pub disks_json: Option<String>,
    pub uptime_seconds: Option<i64>,
    pub proxmox_link_source: Option<String>,
    pub remediation_phase: String,
    pub phase_reason: Option<String>,
    pub incident_attempts: i64,
    pub next_action_ms: Option<i64>,
    pub last_reset_ms: Option<i64>,
}

impl VmRow {
    /// The status inputs of this row, when it has ever reported.
    pub fn latest_report(&self) -> Option<LatestReport> {
        Some(LatestReport {
            last_seen_ms: self.last_seen_ms?,
            cpu_percent: self.cpu_percent?,
            ram_used_bytes: self.ram_used_bytes?,
            ram_total_bytes: self.ram_total_bytes?,
            disk_max_percent: self.disk_max_percent,
        })
    }

    pub fn into_view(self) -> VmView {
        let disks = self
            .disks_json
            .as_deref()
            .and_then(|json| serde_json::from_str::<Vec<DiskUsage>>(json).ok())
            .unwrap_or_default();
        VmView {
            id: self.id,
            hostname: self.hostname,
            os: self.os,
            machine_id: self.machine_id,
            agent_version: self.agent_version,
            status: VmStatus::parse(&self.status),
            status_since_ms: self.status_since_ms,
            status_reason: self.status_reason,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            observed_at_ms: self.observed_at_ms,
            cpu_percent: self.cpu_percent,
            ram_used_bytes: self.ram_used_bytes,
            ram_total_bytes: self.ram_total_bytes,
            disk_used_bytes: self.disk_used_bytes,
            disk_total_bytes: self.disk_total_bytes,
            disk_max_percent: self.disk_max_percent,
            disks,
            uptime_seconds: self.uptime_seconds,
            proxmox_node: self.proxmox_node,
            proxmox_vmid: self.proxmox_vmid,
            proxmox_type: self.proxmox_type,
            proxmox_link_source: self.proxmox_link_source,
            auto_reset: self.auto_reset,
            remediation_phase: RemediationPhase::parse(&self.remediation_phase),
            phase_reason: self.phase_reason,
            incident_attempts: self.incident_attempts,
            last_reset_ms: self.last_reset_ms,
        }
    }
}

/// A validated heartbeat, ready to store.
#[derive(Clone, Debug)]
pub struct PreparedReport {
    pub hostname: String,
    pub os: String,
    /// Lower-case SMBIOS uuid.
    pub machine_id: Option<String>,
    pub vmid: Option<i64>,
    pub node: Option<String>,
    pub agent_version: Option<String>,
    pub cpu_percent: f64,
    pub ram_used_bytes: i64,
    pub ram_total_bytes: i64,
    pub disks: Vec<DiskUsage>,
    pub disk_used_bytes: i64,
    pub disk_total_bytes: i64,
    pub disk_max_percent: Option<f64>,
    pub uptime_seconds: i64,
    pub observed_ms: i64,
    pub received_ms: i64,
}

/// What storing one report decided.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredReport {
    pub vm_id: i64,
    pub status: VmStatus,
}

#[derive(diesel::Insertable)]
#[diesel(table_name = vms)]
struct NewVm<'a> {
    hostname: &'a str,
    os: &'a str,
    machine_id: Option<&'a str>,
    auto_reset: bool,
    status: &'a str,
    status_since_ms: i64,
    status_reason: &'a str,
    first_seen_ms: i64,
}

#[derive(Clone, diesel::Insertable)]
#[diesel(table_name = metric_samples)]
pub struct NewMetric {
    vm_id: i64,
    observed_ms: i64,
    received_ms: i64,
    cpu_percent: f64,
    ram_used_bytes: i64,
    ram_total_bytes: i64,
    disk_used_bytes: i64,
    disk_total_bytes: i64,
    disk_max_percent: Option<f64>,
    uptime_seconds: i64,
}

#[derive(diesel::Insertable)]
#[diesel(table_name = status_changes)]
struct NewStatusChange<'a> {
    vm_id: i64,
    from_status: &'a str,
    to_status: &'a str,
    at_ms: i64,
    reason: &'a str,
}

/// Multi-row inserts differ by backend (diesel-async cannot batch-insert on SQLite).
pub trait MetricWriter {
    fn insert_metrics(
        &mut self,
        rows: Vec<NewMetric>,
    ) -> impl Future<Output = QueryResult<()>> + Send;
}

impl MetricWriter for AsyncPgConnection {
    async fn insert_metrics(&mut self, rows: Vec<NewMetric>) -> QueryResult<()> {
        // Ten columns a row: 1,000 rows stay well under PostgreSQL's 65,535 bind limit.
        for chunk in rows.chunks(1000) {
            diesel::insert_into(metric_samples::table)
                .values(chunk)
                .execute(self)
                .await?;
        }
        Ok(())
    }
}

impl MetricWriter for SqliteConn {
    async fn insert_metrics(&mut self, rows: Vec<NewMetric>) -> QueryResult<()> {
        self.spawn_blocking(move |c| {
            for chunk in rows.chunks(1000) {
                let insert = diesel::insert_into(metric_samples::table).values(chunk);
                diesel::RunQueryDsl::execute(insert, c)?;
            }
            Ok(())
        })
        .await
    }
}

/// Stores a batch of reports in one transaction: VM rows found or created, one metric row
/// per report, latest state and status updated, status changes recorded.
pub async fn store_reports(
    conn: &mut Conn,
    reports: &[PreparedReport],
    cfg: &StatusConfig,
) -> Result<Vec<StoredReport>, DbError> {
    with_conn!(conn, |c| {
        c.transaction::<_, DbError, _>(async |c| {
            let machine_ids: Vec<&str> = reports
                .iter()
                .filter_map(|r| r.machine_id.as_deref())
                .collect();
            let hostnames: Vec<&str> = reports.iter().map(|r| r.hostname.as_str()).collect();
            let mut known: Vec<VmRow> = vms::table
                .filter(vms::machine_id.eq_any(&machine_ids))
                .or_filter(vms::hostname.eq_any(&hostnames))
                .order(vms::id.asc())
                .select(VmRow::as_select())
                .load(c)
                .await?;

            let mut vm_ids = Vec::with_capacity(reports.len());
            for report in reports {
                let found = match_vm(&known, report);
                let id = match found {
                    Some(index) => {
                        // A VM first seen without a uuid adopts the one it now sends.
                        if known[index].machine_id.is_none() && report.machine_id.is_some() {
                            known[index].machine_id = report.machine_id.clone();
                        }
                        known[index].id
                    }
                    None => {
                        let row: VmRow = diesel::insert_into(vms::table)
                            .values(NewVm {
                                hostname: &report.hostname,
                                os: &report.os,
                                machine_id: report.machine_id.as_deref(),
                                auto_reset: true,
                                status: VmStatus::Unknown.as_str(),
                                status_since_ms: report.received_ms,
                                status_reason: "no report yet",
                                first_seen_ms: report.received_ms,
                            })
                            .returning(VmRow::as_returning())
                            .get_result(c)
                            .await?;
                        let id = row.id;
                        known.push(row);
                        id
                    }
                };
                vm_ids.push(id);
            }

            let metrics: Vec<NewMetric> = reports
                .iter()
                .zip(&vm_ids)
                .map(|(r, &vm_id)| NewMetric {
                    vm_id,
                    observed_ms: r.observed_ms,
                    received_ms: r.received_ms,
                    cpu_percent: r.cpu_percent,
                    ram_used_bytes: r.ram_used_bytes,
                    ram_total_bytes: r.ram_total_bytes,
                    disk_used_bytes: r.disk_used_bytes,
                    disk_total_bytes: r.disk_total_bytes,
                    disk_max_percent: r.disk_max_percent,
                    uptime_seconds: r.uptime_seconds,
                })
                .collect();
            c.insert_metrics(metrics).await?;

            // Per VM: the newest observation sets the state; the newest receipt sets liveness.
            let mut newest: HashMap<i64, (&PreparedReport, i64)> = HashMap::new();
            for (report, &id) in reports.iter().zip(&vm_ids) {
                let entry = newest.entry(id).or_insert((report, report.received_ms));
                entry.1 = entry.1.max(report.received_ms);
                if report.observed_ms >= entry.0.observed_ms {
                    entry.0 = report;
                }
            }
            let mut statuses = HashMap::new();
            for (&id, &(report, last_seen)) in &newest {
                let Some(row) = known.iter().find(|row| row.id == id) else {
                    continue;
                };
                let newer = row.observed_at_ms.is_none_or(|t| report.observed_ms >= t);
                // A replayed older report refreshes liveness but not the live figures.
                let latest = if newer {
                    LatestReport {
                        last_seen_ms: last_seen,
                        cpu_percent: report.cpu_percent,
                        ram_used_bytes: report.ram_used_bytes,
                        ram_total_bytes: report.ram_total_bytes,
                        disk_max_percent: report.disk_max_percent,
                    }
                } else {
                    LatestReport {
                        last_seen_ms: last_seen,
                        cpu_percent: row.cpu_percent.unwrap_or(report.cpu_percent),
                        ram_used_bytes: row.ram_used_bytes.unwrap_or(report.ram_used_bytes),
                        ram_total_bytes: row.ram_total_bytes.unwrap_or(report.ram_total_bytes),
                        disk_max_percent: row.disk_max_percent,
                    }
                };
                let verdict = status::evaluate(Some(&latest), cfg, last_seen);
                let previous = VmStatus::parse(&row.status);
                let changed = previous != verdict.status;
                let since = if changed {
                    last_seen
                } else {
                    row.status_since_ms
                };
                let target = vms::table.filter(vms::id.eq(id));
                let phase = RemediationPhase::parse(&row.remediation_phase);
                if crate::remediation::policy::report_ends_incident(
                    phase,
                    row.incident_attempts,
                    row.last_reset_ms,
                    report.observed_ms,
                ) {
                    let reason = match (row.uptime_seconds, row.last_reset_ms) {
                        (_, Some(reset))
                            if report.uptime_seconds * 1000 <= last_seen - reset + 60_000 =>
                        {
                            format!(
                                "recovered: reporting again after the reset (uptime {}s)",
                                report.uptime_seconds
                            )
                        }
                        _ => "recovered: reporting again".to_owned(),
                    };
                    diesel::update(target)
                        .set((
                            vms::remediation_phase.eq(RemediationPhase::Ok.as_str()),
                            vms::incident_attempts.eq(0),
                            vms::next_action_ms.eq(None::<i64>),
                            vms::phase_reason.eq(reason),
                        ))
                        .execute(c)
                        .await?;
                }
                if newer {
                    diesel::update(target)
                        .set((
                            vms::hostname.eq(&report.hostname),
                            vms::os.eq(&report.os),
                            vms::machine_id.eq(&row.machine_id),
                            vms::agent_version.eq(&report.agent_version),
                            vms::reported_vmid.eq(report.vmid),
                            vms::reported_node.eq(&report.node),
                            vms::status.eq(verdict.status.as_str()),
                            vms::status_since_ms.eq(since),
                            vms::status_reason.eq(&verdict.reason),
                            vms::last_seen_ms.eq(last_seen),
                            vms::observed_at_ms.eq(report.observed_ms),
                            vms::cpu_percent.eq(report.cpu_percent),
                            vms::ram_used_bytes.eq(report.ram_used_bytes),
                            vms::ram_total_bytes.eq(report.ram_total_bytes),
                            (
                                vms::disk_used_bytes.eq(report.disk_used_bytes),
                                vms::disk_total_bytes.eq(report.disk_total_bytes),
                                vms::disk_max_percent.eq(report.disk_max_percent),
                                vms::disks_json.eq(serde_json::to_string(&report.disks).ok()),
                                vms::uptime_seconds.eq(report.uptime_seconds),
                            ),
                        ))
                        .execute(c)
                        .await?;
                } else {
                    diesel::update(target)
                        .set((
                            vms::status.eq(verdict.status.as_str()),
                            vms::status_since_ms.eq(since),
                            vms::status_reason.eq(&verdict.reason),
                            vms::last_seen_ms.eq(last_seen),
                        ))
                        .execute(c)
                        .await?;
                }
                if changed {
                    diesel::insert_into(status_changes::table)
                        .values(NewStatusChange {
                            vm_id: id,
                            from_status: previous.as_str(),
                            to_status: verdict.status.as_str(),
                            at_ms: last_seen,
                            reason: &verdict.reason,
                        })
                        .execute(c)
                        .await?;
                }
                statuses.insert(id, verdict.status);
            }
            Ok(vm_ids
                .iter()
                .map(|&vm_id| StoredReport {
                    vm_id,
                    status: statuses.get(&vm_id).copied().unwrap_or(VmStatus::Unknown),
                })
                .collect())
        })
        .await
    })
}

/// Finds the VM a report belongs to: by uuid, else by a hostname that has no other uuid.
fn match_vm(known: &[VmRow], report: &PreparedReport) -> Option<usize> {
    if let Some(mid) = report.machine_id.as_deref() {
        if let Some(i) = known
            .iter()
            .position(|r| r.machine_id.as_deref() == Some(mid))
        {
            return Some(i);
        }
        return known
            .iter()
            .position(|r| r.machine_id.is_none() && r.hostname == report.hostname);
    }
    if let Some(i) = known
        .iter()
        .position(|r| r.machine_id.is_none() && r.hostname == report.hostname)
    {
        return Some(i);
    }
    // An agent that cannot read its uuid (not root) still matches its VM when unambiguous.
    let mut same_name = known
        .iter()
        .enumerate()
        .filter(|(_, r)| r.hostname == report.hostname);
    match (same_name.next(), same_name.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    }
}

/// Re-judges VMs against `cfg` at `now_ms` and records every change. With `only_overdue`,
/// looks only at VMs whose last report is older than the stale timeout (the scheduler's scan).
/// Returns the ids whose status changed.
pub async fn reevaluate(
    conn: &mut Conn,
    cfg: &StatusConfig,
    now_ms: i64,
    only_overdue: bool,
) -> Result<Vec<i64>, DbError> {
    with_conn!(conn, |c| {
        c.transaction::<_, DbError, _>(async |c| {
            let mut query = vms::table.select(VmRow::as_select()).into_boxed();
            if only_overdue {
                query = query
                    .filter(vms::status.ne(VmStatus::Down.as_str()))
                    .filter(vms::last_seen_ms.le(now_ms - cfg.stale_timeout_ms));
            }
            let rows: Vec<VmRow> = query.load(c).await?;
            let mut changed = Vec::new();
            for row in rows {
                let verdict = status::evaluate(row.latest_report().as_ref(), cfg, now_ms);
                if verdict.status.as_str() == row.status {
                    continue;
                }
                // Conditional on the status we read, so two replicas record one change.
                let updated = diesel::update(
                    vms::table
                        .filter(vms::id.eq(row.id))
                        .filter(vms::status.eq(&row.status)),
                )
                .set((
                    vms::status.eq(verdict.status.as_str()),
                    vms::status_since_ms.eq(now_ms),
                    vms::status_reason.eq(&verdict.reason),
                ))
                .execute(c)
                .await?;
                if updated == 1 {
                    diesel::insert_into(status_changes::table)
                        .values(NewStatusChange {
                            vm_id: row.id,
                            from_status: &row.status,
                            to_status: verdict.status.as_str(),
                            at_ms: now_ms,
                            reason: &verdict.reason,
                        })
                        .execute(c)
                        .await?;
                    changed.push(row.id);
                }
            }
            Ok(changed)
        })
        .await
    })
}

pub async fn list_vms(conn: &mut Conn) -> Result<Vec<VmView>, DbError> {
    let mut views: Vec<VmView> = list_rows(conn)
        .await?
        .into_iter()
        .map(VmRow::into_view)
        .collect();
    views.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
    Ok(views)
}

/// Every VM row, for the remediation engine.
pub async fn list_rows(conn: &mut Conn) -> Result<Vec<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .order(vms::id.asc())
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

pub async fn get_row(conn: &mut Conn, id: i64) -> Result<Option<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .find(id)
            .select(VmRow::as_select())
            .first(c)
            .await
            .optional()
    })?)
}

pub async fn vms_by_ids(conn: &mut Conn, ids: &[i64]) -> Result<Vec<VmView>, DbError> {
    let rows: Vec<VmRow> = with_conn!(conn, |c| {
        vms::table
            .filter(vms::id.eq_any(ids))
            .select(VmRow::as_select())
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(VmRow::into_view).collect())
}

pub async fn get_vm(conn: &mut Conn, id: i64) -> Result<Option<VmView>, DbError> {
    Ok(get_row(conn, id).await?.map(VmRow::into_view))
}

/// Deletes a VM with its history; false when it did not exist.
pub async fn delete_vm(conn: &mut Conn, id: i64) -> Result<bool, DbError> {
    let deleted = with_conn!(conn, |c| {
        c.transaction::<_, DbError, _>(async |c| {
            // Explicit deletes keep PostgreSQL and SQLite alike even without cascading FKs.
            diesel::delete(metric_samples::table.filter(metric_samples::vm_id.eq(id)))
                .execute(c)
                .await?;
            diesel::delete(status_changes::table.filter(status_changes::vm_id.eq(id)))
                .execute(c)
                .await?;
            diesel::delete(reset_attempts::table.filter(reset_attempts::vm_id.eq(id)))
                .execute(c)
                .await?;
            Ok(diesel::delete(vms::table.find(id)).execute(c).await?)
        })
        .await
    })?;
    Ok(deleted == 1)
}

/// One downsampled point of a VM's metric history.
#[derive(Clone, Debug, PartialEq, Serialize, diesel::QueryableByName)]
pub struct MetricPoint {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub t_ms: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub samples: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub cpu_avg: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub cpu_max: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub ram_percent_avg: f64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    pub disk_percent_avg: Option<f64>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub uptime_max: i64,
}

/// Averages a VM's samples in `[from_ms, to_ms]` into at most `points` buckets.
pub async fn metric_history(
    conn: &mut Conn,
    vm_id: i64,
    from_ms: i64,
    to_ms: i64,
    points: i64,
) -> Result<Vec<MetricPoint>, DbError> {
    use diesel::sql_types::BigInt;
    let bucket_ms = ((to_ms - from_ms + 1) + points - 1) / points.max(1);
    // Placeholders appear in ascending order of first use, which both backends accept.
    let sql = "SELECT MIN(observed_ms) AS t_ms, COUNT(*) AS samples, \
        AVG(cpu_percent) AS cpu_avg, MAX(cpu_percent) AS cpu_max, \
        AVG(CAST(ram_used_bytes AS DOUBLE PRECISION) * 100 / ram_total_bytes) AS ram_percent_avg, \
        AVG(CASE WHEN disk_total_bytes > 0 \
            THEN CAST(disk_used_bytes AS DOUBLE PRECISION) * 100 / disk_total_bytes END) \
            AS disk_percent_avg, \
        MAX(uptime_seconds) AS uptime_max \
        FROM metric_samples \
        WHERE (observed_ms - $1) / $2 >= 0 AND vm_id = $3 AND observed_ms >= $1 AND observed_ms <= $4 \
        GROUP BY (observed_ms - $1) / $2 ORDER BY t_ms";
    let rows = with_conn!(conn, |c| {
        diesel::sql_query(sql)
            .bind::<BigInt, _>(from_ms)
            .bind::<BigInt, _>(bucket_ms.max(1))
            .bind::<BigInt, _>(vm_id)
            .bind::<BigInt, _>(to_ms)
            .load::<MetricPoint>(c)
            .await
    })?;
    Ok(rows)
}

/// Number of stored metric samples, for one VM or all.
pub async fn count_metric_samples(conn: &mut Conn, vm_id: Option<i64>) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| {
        let mut query = metric_samples::table.count().into_boxed();
        if let Some(id) = vm_id {
            query = query.filter(metric_samples::vm_id.eq(id));
        }
        query.get_result::<i64>(c).await
    })?)
}

/// One recorded status change.
#[derive(Clone, Debug, PartialEq, Serialize, diesel::Queryable)]
pub struct StatusChange {
    pub id: i64,
    pub vm_id: i64,
    pub from_status: String,
    pub to_status: String,
    pub at_ms: i64,
    pub reason: String,
}

pub async fn status_changes_for(conn: &mut Conn, vm_id: i64) -> Result<Vec<StatusChange>, DbError> {
    Ok(with_conn!(conn, |c| {
        status_changes::table
            .filter(status_changes::vm_id.eq(vm_id))
            .order(status_changes::id.asc())
            .select((
                status_changes::id,
                status_changes::vm_id,
                status_changes::from_status,
                status_changes::to_status,
                status_changes::at_ms,
                status_changes::reason,
            ))
            .load(c)
            .await
    })?)
}

/// One reset or shutdown attempt, as the history shows it.
#[derive(Clone, Debug, PartialEq, Serialize, diesel::Queryable)]
pub struct ResetAttempt {
    pub id: i64,
    pub vm_id: i64,
    pub action: String,
    pub trigger_source: String,
    pub requested_by: Option<String>,
    pub mode: String,
    pub proxmox_node: Option<String>,
    pub proxmox_vmid: Option<i64>,
    pub upid: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
    pub evidence_json: Option<String>,
    pub created_ms: i64,
    pub sent_ms: Option<i64>,
    pub finished_ms: Option<i64>,
}

pub async fn reset_history(conn: &mut Conn, vm_id: i64) -> Result<Vec<ResetAttempt>, DbError> {
    Ok(with_conn!(conn, |c| {
        reset_attempts::table
            .filter(reset_attempts::vm_id.eq(vm_id))
            .order(reset_attempts::id.desc())
            .load(c)
            .await
    })?)
}

/// The persisted runtime status configuration, if an operator ever saved one.
pub async fn load_status_config(conn: &mut Conn) -> Result<Option<StatusConfig>, DbError> {
    let value: Option<String> = with_conn!(conn, |c| {
        runtime_config::table
            .find(STATUS_CONFIG_KEY)
            .select(runtime_config::value)
            .first(c)
            .await
            .optional()
    })?;
    // A row this version cannot read is treated as absent; the defaults then apply.
    Ok(value.and_then(|json| serde_json::from_str(&json).ok()))
}

pub async fn save_status_config(
    conn: &mut Conn,
    cfg: &StatusConfig,
    now_ms: i64,
) -> Result<(), DbError> {
    let json = serde_json::to_string(cfg).map_err(|e| DbError::Unavailable(e.to_string()))?;
    with_conn!(conn, |c| {
        diesel::insert_into(runtime_config::table)
            .values((
                runtime_config::key.eq(STATUS_CONFIG_KEY),
                runtime_config::value.eq(&json),
                runtime_config::updated_ms.eq(now_ms),
            ))
            .on_conflict(runtime_config::key)
            .do_update()
            .set((
                runtime_config::value.eq(&json),
                runtime_config::updated_ms.eq(now_ms),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// The stored hash of a named credential.
pub async fn credential_hash(conn: &mut Conn, name: &str) -> Result<Option<String>, DbError> {
    Ok(with_conn!(conn, |c| {
        credentials::table
            .find(name)
            .select(credentials::token_hash)
            .first(c)
            .await
            .optional()
    })?)
}

/// Stores a credential hash unless one exists; returns the hash now in force.
pub async fn insert_credential_if_absent(
    conn: &mut Conn,
    name: &str,
    hash: &str,
    now_ms: i64,
) -> Result<String, DbError> {
    with_conn!(conn, |c| {
        diesel::insert_into(credentials::table)
            .values((
                credentials::name.eq(name),
                credentials::token_hash.eq(hash),
                credentials::created_ms.eq(now_ms),
            ))
            .on_conflict_do_nothing()
            .execute(c)
            .await
    })?;
    credential_hash(conn, name)
        .await?
        .ok_or_else(|| DbError::Unavailable("credential vanished after insert".into()))
}

/// A cheap round trip, for readiness.
pub async fn ping(conn: &mut Conn) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(c, "SELECT 1").await
    })?;
    Ok(())
}
