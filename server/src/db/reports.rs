//! The heartbeat write path's three storage steps: find or create the VMs, insert the
//! metric samples, apply the new state the core planned. The caller holds the transaction.

use super::SqliteConn;
use super::schema::{metric_samples, status_changes, vms};
use super::store::{NewStatusChange, VmRow};
use diesel::{ExpressionMethods, QueryDsl, QueryResult, SelectableHelper};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use domain::heartbeat::Heartbeat;
use domain::ingest::StateUpdate;
use domain::{RemediationPhase, VmId, VmStatus};
use std::future::Future;

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

/// One metric sample row.
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

impl NewMetric {
    pub fn of(vm_id: VmId, r: &Heartbeat) -> Self {
        NewMetric {
            vm_id: vm_id.get(),
            observed_ms: r.observed_ms,
            received_ms: r.received_ms,
            cpu_percent: r.cpu_percent,
            ram_used_bytes: r.ram_used_bytes,
            ram_total_bytes: r.ram_total_bytes,
            disk_used_bytes: r.disk_used_bytes,
            disk_total_bytes: r.disk_total_bytes,
            disk_max_percent: r.disk_max_percent,
            uptime_seconds: r.uptime_seconds,
        }
    }
}

/// One VM's planned update with the report that set it.
pub struct PlannedState<'a> {
    pub vm_id: VmId,
    pub report: &'a Heartbeat,
    /// The uuid to keep: the stored one, or the one the VM now sends if it had none.
    pub machine_id: Option<&'a str>,
    pub update: StateUpdate,
}

/// The heartbeat write path's storage steps, for either backend.
pub trait ReportWriter {
    /// The VMs these reports may belong to: same uuid or same hostname.
    fn candidate_vms(
        &mut self,
        reports: &[&Heartbeat],
    ) -> impl Future<Output = QueryResult<Vec<VmRow>>> + Send;

    /// A new VM for a report that matched none.
    fn create_vm(&mut self, report: &Heartbeat) -> impl Future<Output = QueryResult<VmRow>> + Send;

    fn insert_metrics(
        &mut self,
        rows: Vec<NewMetric>,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    fn apply_latest_state(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> impl Future<Output = QueryResult<()>> + Send;
}

/// Finds the VM an enrolment belongs to: by uuid, else by a hostname that has no uuid. A
/// VM that enrolled with a uuid is never matched by its name alone: names are anyone's to
/// claim, the uuid is not readable from another guest.
pub fn match_vm(known: &[VmRow], report: &Heartbeat) -> Option<usize> {
    let unclaimed_name = |r: &VmRow| r.machine_id.is_none() && r.hostname == report.hostname;
    if let Some(mid) = report.machine_id.as_deref()
        && let Some(i) = known
            .iter()
            .position(|r| r.machine_id.as_deref() == Some(mid))
    {
        return Some(i);
    }
    known.iter().position(unclaimed_name)
}

/// Same body for both connection types: diesel-async's query traits differ per backend.
macro_rules! report_writer {
    ($conn:ty, $insert_metrics:item) => {
        impl ReportWriter for $conn {
            async fn candidate_vms(&mut self, reports: &[&Heartbeat]) -> QueryResult<Vec<VmRow>> {
                let machine_ids: Vec<&str> = reports
                    .iter()
                    .filter_map(|r| r.machine_id.as_deref())
                    .collect();
                let hostnames: Vec<&str> = reports.iter().map(|r| r.hostname.as_str()).collect();
                vms::table
                    .filter(vms::machine_id.eq_any(&machine_ids))
                    .or_filter(vms::hostname.eq_any(&hostnames))
                    .order(vms::id.asc())
                    .select(VmRow::as_select())
                    .load(self)
                    .await
            }

            async fn create_vm(&mut self, report: &Heartbeat) -> QueryResult<VmRow> {
                diesel::insert_into(vms::table)
                    .values(NewVm {
                        hostname: &report.hostname,
                        os: report.os.as_str(),
                        machine_id: report.machine_id.as_deref(),
                        auto_reset: true,
                        status: VmStatus::Unknown.as_str(),
                        status_since_ms: report.received_ms,
                        status_reason: "no report yet",
                        first_seen_ms: report.received_ms,
                    })
                    .returning(VmRow::as_returning())
                    .get_result(self)
                    .await
            }

            $insert_metrics

            async fn apply_latest_state(&mut self, planned: &[PlannedState<'_>]) -> QueryResult<()> {
                for p in planned {
                    let target = vms::table.filter(vms::id.eq(p.vm_id.get()));
                    let u = &p.update;
                    if let Some(reason) = &u.ends_incident {
                        diesel::update(target)
                            .set((
                                vms::remediation_phase.eq(RemediationPhase::Ok.as_str()),
                                vms::incident_attempts.eq(0),
                                vms::next_action_ms.eq(None::<i64>),
                                vms::phase_reason.eq(reason),
                            ))
                            .execute(self)
                            .await?;
                    }
                    let r = p.report;
                    if u.takes_figures {
                        diesel::update(target)
                            .set((
                                vms::hostname.eq(&r.hostname),
                                vms::os.eq(r.os.as_str()),
                                vms::machine_id.eq(p.machine_id),
                                vms::agent_version.eq(&r.agent_version),
                                vms::reported_vmid.eq(r.vmid.map(i64::from)),
                                vms::reported_node.eq(r.node.as_ref().map(|n| n.as_str())),
                                vms::status.eq(u.verdict.status.as_str()),
                                vms::status_since_ms.eq(u.status_since_ms),
                                vms::status_reason.eq(&u.verdict.reason),
                                vms::last_seen_ms.eq(u.last_seen_ms),
                                vms::observed_at_ms.eq(r.observed_ms),
                                vms::cpu_percent.eq(r.cpu_percent),
                                vms::ram_used_bytes.eq(r.ram_used_bytes),
                                vms::ram_total_bytes.eq(r.ram_total_bytes),
                                (
                                    vms::disk_used_bytes.eq(r.disk_used_bytes),
                                    vms::disk_total_bytes.eq(r.disk_total_bytes),
                                    vms::disk_max_percent.eq(r.disk_max_percent),
                                    vms::disks_json.eq(serde_json::to_string(&r.disks).ok()),
                                    vms::uptime_seconds.eq(r.uptime_seconds),
                                ),
                            ))
                            .execute(self)
                            .await?;
                    } else {
                        diesel::update(target)
                            .set((
                                vms::status.eq(u.verdict.status.as_str()),
                                vms::status_since_ms.eq(u.status_since_ms),
                                vms::status_reason.eq(&u.verdict.reason),
                                vms::last_seen_ms.eq(u.last_seen_ms),
                            ))
                            .execute(self)
                            .await?;
                    }
                    if let Some((from, to)) = u.change {
                        diesel::insert_into(status_changes::table)
                            .values(NewStatusChange {
                                vm_id: p.vm_id.get(),
                                from_status: from.as_str(),
                                to_status: to.as_str(),
                                at_ms: u.last_seen_ms,
                                reason: &u.verdict.reason,
                            })
                            .execute(self)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    };
}

report_writer!(
    AsyncPgConnection,
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
);

report_writer!(
    SqliteConn,
    async fn insert_metrics(&mut self, rows: Vec<NewMetric>) -> QueryResult<()> {
        // diesel-async cannot batch-insert on SQLite; the sync connection can.
        self.spawn_blocking(move |c| {
            for chunk in rows.chunks(1000) {
                let insert = diesel::insert_into(metric_samples::table).values(chunk);
                diesel::RunQueryDsl::execute(insert, c)?;
            }
            Ok(())
        })
        .await
    }
);
