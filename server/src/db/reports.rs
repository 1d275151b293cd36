//! The heartbeat write path's three storage steps: find or create the VMs, insert the
//! metric samples, apply the new state the core planned. The caller holds the transaction.

use super::SqliteConn;
use super::batch::{OwnedStatusChange, Placeholders, batch_rows, push_values};
use super::schema::{events, metric_samples, status_changes, vms};
use super::store::{NewStatusChange, RevisedView, VmRow, revision};
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{BigInt, Bool, Double, Nullable, Text};
use diesel::sqlite::Sqlite;
use diesel::{ExpressionMethods, QueryDsl, QueryResult, QueryableByName, SelectableHelper};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use domain::heartbeat::Heartbeat;
use domain::ingest::StateUpdate;
use domain::{EventKind, RemediationPhase, VmId, VmStatus};
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

batch_rows! {
    /// One metric sample row.
    #[derive(Clone, diesel::Insertable)]
    #[diesel(table_name = metric_samples)]
    pub struct NewMetric / MetricColumns {
        vm_id: i64 => BigInt as "bigint",
        observed_ms: i64 => BigInt as "bigint",
        received_ms: i64 => BigInt as "bigint",
        cpu_percent: f64 => Double as "float8",
        ram_used_bytes: i64 => BigInt as "bigint",
        ram_total_bytes: i64 => BigInt as "bigint",
        disk_used_bytes: i64 => BigInt as "bigint",
        disk_total_bytes: i64 => BigInt as "bigint",
        disk_max_percent: Option<f64> => Nullable<Double> as "float8",
        uptime_seconds: i64 => BigInt as "bigint",
    }
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

    /// Locks these VMs' rows for the rest of the transaction, in id order, before the
    /// batch's update, whose join would take them in whatever order it runs. `FOR NO KEY
    /// UPDATE`, as the update itself takes: it does not wait on the share locks that other
    /// transactions' foreign keys (metric rows, events) take. A no-op on SQLite, where the
    /// write turn already runs one writer at a time.
    ///
    /// Answers the rows to plan the batch from: on PostgreSQL the rows as locked, so a
    /// writer (the engine, an operator) that committed after `known` was read is seen and
    /// not written over with a plan made from the row before it; on SQLite, where no other
    /// writer runs during the write turn, `known` itself unless `known_stale` (this
    /// transaction wrote to those rows since), else the rows read again.
    fn lock_vms(
        &mut self,
        ids: &[VmId],
        known: Vec<VmRow>,
        known_stale: bool,
    ) -> impl Future<Output = QueryResult<Vec<VmRow>>> + Send;

    fn insert_metrics(
        &mut self,
        rows: Vec<NewMetric>,
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// The planned state of every VM of the batch: one `UPDATE ... FROM` for the VMs (a
    /// `VALUES` list on SQLite, `UNNEST` of one array a column on PostgreSQL) and one insert
    /// for their status changes, whatever the batch size. Answers
    /// the rows as the update left them, for the state cache.
    fn apply_latest_state(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> impl Future<Output = QueryResult<Vec<RevisedView>>> + Send;

    /// An `unexpected_reboot` event for each VM of the batch that restarted by itself.
    fn insert_reboots(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// The same, one VM at a time (up to three statements each): the reference the
    /// set-based statement is tested against (`tests/it/storage.rs`).
    fn apply_latest_state_one_by_one(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> impl Future<Output = QueryResult<Vec<RevisedView>>> + Send;
}

/// A row as the set-based update returns it (`RETURNING vms.*`).
#[derive(QueryableByName)]
struct UpdatedRow {
    #[diesel(embed)]
    vm: VmRow,
    #[diesel(sql_type = BigInt)]
    revision: i64,
}

impl From<UpdatedRow> for RevisedView {
    fn from(updated: UpdatedRow) -> Self {
        RevisedView::from((updated.vm, updated.revision))
    }
}

/// Ids bound in one `IN (...)` list: under SQLite's limit on bound values.
const ID_CHUNK: usize = 10_000;

/// A batch's VM ids once each, in id order (the order rows are locked in).
fn sorted_ids(ids: &[VmId]) -> Vec<i64> {
    let mut ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One unexpected-reboot event per VM in this long, at most.
const REBOOT_EVENT_QUIET_MS: i64 = 10 * 60_000;

batch_rows! {
    /// One VM's row of the set-based update, owned so the statement can cross into the
    /// SQLite connection's blocking thread. Its fields are the update's source columns;
    /// those after `takes_figures` are the report's figures, named as `vms` names them.
    struct StateRow / StateColumns {
        id: i64 => BigInt as "bigint",
        ends_incident: bool => Bool as "boolean",
        phase_reason: Option<String> => Nullable<Text> as "text",
        status: &'static str => Text as "text",
        status_since_ms: i64 => BigInt as "bigint",
        status_reason: String => Text as "text",
        last_seen_ms: i64 => BigInt as "bigint",
        takes_figures: bool => Bool as "boolean",
        hostname: String => Text as "text",
        os: &'static str => Text as "text",
        machine_id: Option<String> => Nullable<Text> as "text",
        agent_version: Option<String> => Nullable<Text> as "text",
        reported_vmid: Option<i64> => Nullable<BigInt> as "bigint",
        reported_node: Option<String> => Nullable<Text> as "text",
        observed_at_ms: i64 => BigInt as "bigint",
        cpu_percent: f64 => Double as "float8",
        ram_used_bytes: i64 => BigInt as "bigint",
        ram_total_bytes: i64 => BigInt as "bigint",
        disk_used_bytes: i64 => BigInt as "bigint",
        disk_total_bytes: i64 => BigInt as "bigint",
        disk_max_percent: Option<f64> => Nullable<Double> as "float8",
        disks_json: Option<String> => Nullable<Text> as "text",
        uptime_seconds: i64 => BigInt as "bigint",
    }
}

impl StateRow {
    fn of(p: &PlannedState<'_>) -> Self {
        let (u, r) = (&p.update, p.report);
        StateRow {
            id: p.vm_id.get(),
            ends_incident: u.ends_incident.is_some(),
            phase_reason: u.ends_incident.clone(),
            status: u.verdict.status.as_str(),
            status_since_ms: u.status_since_ms,
            status_reason: u.verdict.reason.clone(),
            last_seen_ms: u.last_seen_ms,
            takes_figures: u.takes_figures,
            hostname: r.hostname.clone(),
            os: r.os.as_str(),
            machine_id: p.machine_id.map(str::to_owned),
            agent_version: r.agent_version.clone(),
            reported_vmid: r.vmid.map(i64::from),
            reported_node: r.node.as_ref().map(|n| n.as_str().to_owned()),
            observed_at_ms: r.observed_ms,
            cpu_percent: r.cpu_percent,
            ram_used_bytes: r.ram_used_bytes,
            ram_total_bytes: r.ram_total_bytes,
            disk_used_bytes: r.disk_used_bytes,
            disk_total_bytes: r.disk_total_bytes,
            disk_max_percent: r.disk_max_percent,
            disks_json: serde_json::to_string(&r.disks).ok(),
            uptime_seconds: r.uptime_seconds,
        }
    }
}

/// VMs per SQLite statement: 23 binds each stays under its limit of 32,766.
const STATE_ROWS_PER_STATEMENT: usize = 1000;

/// `UPDATE vms ... FROM <source> WHERE vms.id = v.<id> RETURNING <returning>`, over a row
/// source `v` whose columns are named `column1`... in `StateRow`'s order (the name both
/// backends give a `VALUES` list's columns). A figure column changes only where the VM's
/// newest report carries figures (a replayed older one refreshes liveness only); the
/// incident columns only where the batch ends an incident. The returned rows feed the
/// state cache: no read after the commit.
fn state_update_sql(source: &str, returning: &str) -> String {
    // `StateRow`'s field by name, as the source names it: the statement follows the
    // struct's order whatever it is. An unknown name is left as a column the source lacks,
    // which the database refuses at once (every write test would fail).
    let v = |field: &str| match StateColumns::NAMES.iter().position(|name| *name == field) {
        Some(at) => format!("v.column{}", at + 1),
        None => format!("v.{field}"),
    };
    let (ends, takes_figures) = (v("ends_incident"), v("takes_figures"));
    let mut set = vec![
        format!("remediation_phase = CASE WHEN {ends} THEN 'ok' ELSE vms.remediation_phase END"),
        format!("incident_attempts = CASE WHEN {ends} THEN 0 ELSE vms.incident_attempts END"),
        format!("next_action_ms = CASE WHEN {ends} THEN NULL ELSE vms.next_action_ms END"),
        format!(
            "phase_reason = CASE WHEN {ends} THEN {} ELSE vms.phase_reason END",
            v("phase_reason")
        ),
    ];
    for column in ["status", "status_since_ms", "status_reason", "last_seen_ms"] {
        set.push(format!("{column} = {}", v(column)));
    }
    set.push("revision = vms.revision + 1".to_owned());
    // The rest of the row: the report's own figures, named as the table names them.
    let figures = StateColumns::NAMES
        .iter()
        .skip_while(|name| **name != "takes_figures")
        .skip(1);
    for column in figures {
        set.push(format!(
            "{column} = CASE WHEN {takes_figures} THEN {} ELSE vms.{column} END",
            v(column)
        ));
    }
    format!(
        "UPDATE vms SET {} FROM {source} WHERE vms.id = {} RETURNING {returning}",
        set.join(", "),
        v("id")
    )
}

/// SQLite: `rows` VMs as a `VALUES` list with anonymous parameters; `*` is the updated
/// table's columns only (it refuses `vms.*` in `RETURNING`).
fn sqlite_state_update_sql(rows: usize) -> String {
    let mut source = String::from("(VALUES ");
    push_values(
        &mut source,
        rows,
        StateColumns::NAMES.len(),
        Placeholders::Anonymous,
    );
    source.push_str(") AS v");
    state_update_sql(&source, "*")
}

/// PostgreSQL: the whole batch as one array a column; `vms.*`, as its `*` would add the
/// source's columns.
fn postgres_state_update_sql() -> String {
    let names: Vec<String> = (1..=StateColumns::NAMES.len())
        .map(|n| format!("column{n}"))
        .collect();
    let source = format!("{} AS v({})", StateColumns::unnest(), names.join(", "));
    state_update_sql(&source, "vms.*")
}

/// PostgreSQL's metric insert: one statement of the same text for any number of rows.
fn postgres_metric_insert_sql() -> String {
    format!(
        "INSERT INTO metric_samples ({}) SELECT * FROM {}",
        MetricColumns::NAMES.join(", "),
        MetricColumns::unnest()
    )
}

fn status_change_rows(planned: &[PlannedState<'_>]) -> Vec<OwnedStatusChange> {
    planned
        .iter()
        .filter_map(|p| {
            let (from, to) = p.update.change?;
            Some(OwnedStatusChange {
                vm_id: p.vm_id.get(),
                from_status: from.as_str(),
                to_status: to.as_str(),
                at_ms: p.update.last_seen_ms,
                reason: p.update.verdict.reason.clone(),
            })
        })
        .collect()
}

/// SQLite's set-based statements as SQL with their binds, built before the statements
/// cross into the connection's blocking thread.
fn sqlite_state_statements(
    planned: &[PlannedState<'_>],
) -> Vec<BoxedSqlQuery<'static, Sqlite, SqlQuery>> {
    planned
        .chunks(STATE_ROWS_PER_STATEMENT)
        .map(|chunk| {
            let mut query = diesel::sql_query(sqlite_state_update_sql(chunk.len())).into_boxed();
            for row in chunk.iter().map(StateRow::of) {
                query = row.bind_values(query);
            }
            query
        })
        .collect()
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
    ($conn:ty, $lock_vms:item, $insert_metrics:item, $apply_latest_state:item) => {
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

            $lock_vms

            $insert_metrics

            $apply_latest_state

            async fn apply_latest_state_one_by_one(
                &mut self,
                planned: &[PlannedState<'_>],
            ) -> QueryResult<Vec<RevisedView>> {
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
                let ids: Vec<i64> = planned.iter().map(|p| p.vm_id.get()).collect();
                let rows: Vec<(VmRow, i64)> = vms::table
                    .filter(vms::id.eq_any(&ids))
                    .select((VmRow::as_select(), revision()))
                    .load(self)
                    .await?;
                Ok(rows.into_iter().map(RevisedView::from).collect())
            }

            async fn insert_reboots(&mut self, planned: &[PlannedState<'_>]) -> QueryResult<()> {
                // Rare (a guest restarting by itself): one row each, and at most one per VM
                // in `REBOOT_EVENT_QUIET_MS` (a guest sending uptimes up and down at will
                // must not flood the event log and everyone's inbox).
                for p in planned {
                    if let Some(what) = &p.update.rebooted {
                        let since = p.update.last_seen_ms.saturating_sub(REBOOT_EVENT_QUIET_MS);
                        let recent: i64 = events::table
                            .filter(events::vm_id.eq(p.vm_id.get()))
                            .filter(events::kind.eq(EventKind::UnexpectedReboot.as_str()))
                            .filter(events::at_ms.gt(since))
                            .count()
                            .get_result(self)
                            .await?;
                        if recent > 0 {
                            continue;
                        }
                        diesel::insert_into(events::table)
                            .values((
                                events::at_ms.eq(p.update.last_seen_ms),
                                events::kind.eq(EventKind::UnexpectedReboot.as_str()),
                                events::vm_id.eq(Some(p.vm_id.get())),
                                events::message.eq(format!("{}: {what}", p.report.hostname)),
                            ))
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
    async fn lock_vms(
        &mut self,
        ids: &[VmId],
        _known: Vec<VmRow>,
        _known_stale: bool,
    ) -> QueryResult<Vec<VmRow>> {
        // One statement over many rows would lock them in whatever order its plan takes.
        let ids = sorted_ids(ids);
        let mut locked = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let rows = vms::table
                .filter(vms::id.eq_any(chunk))
                .order(vms::id.asc())
                .select(VmRow::as_select())
                .for_no_key_update()
                .load::<VmRow>(self)
                .await?;
            locked.extend(rows);
        }
        Ok(locked)
    },
    async fn insert_metrics(&mut self, rows: Vec<NewMetric>) -> QueryResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let insert = diesel::sql_query(postgres_metric_insert_sql()).into_boxed();
        MetricColumns::of(rows)
            .bind_to(insert)
            .execute(self)
            .await?;
        Ok(())
    },
    async fn apply_latest_state(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> QueryResult<Vec<RevisedView>> {
        // The rows are locked already (`lock_vms`): the update's join would take them in
        // whatever order it runs, and two such transactions could deadlock.
        let update = diesel::sql_query(postgres_state_update_sql()).into_boxed();
        let rows: Vec<UpdatedRow> = StateColumns::of(planned.iter().map(StateRow::of))
            .bind_to(update)
            .load(self)
            .await?;
        let updated: Vec<RevisedView> = rows.into_iter().map(RevisedView::from).collect();
        let changes = status_change_rows(planned);
        for chunk in changes.chunks(1000) {
            diesel::insert_into(status_changes::table)
                .values(chunk)
                .execute(self)
                .await?;
        }
        Ok(updated)
    }
);

report_writer!(
    SqliteConn,
    async fn lock_vms(
        &mut self,
        ids: &[VmId],
        known: Vec<VmRow>,
        known_stale: bool,
    ) -> QueryResult<Vec<VmRow>> {
        if !known_stale {
            return Ok(known);
        }
        let ids = sorted_ids(ids);
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let read = vms::table
                .filter(vms::id.eq_any(chunk))
                .select(VmRow::as_select())
                .load::<VmRow>(self)
                .await?;
            rows.extend(read);
        }
        Ok(rows)
    },
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
    },
    async fn apply_latest_state(
        &mut self,
        planned: &[PlannedState<'_>],
    ) -> QueryResult<Vec<RevisedView>> {
        let statements = sqlite_state_statements(planned);
        let changes = status_change_rows(planned);
        let rows: Vec<UpdatedRow> = self
            .spawn_blocking(move |c| {
                let mut updated = Vec::new();
                for statement in statements {
                    updated.extend(diesel::RunQueryDsl::load::<UpdatedRow>(statement, c)?);
                }
                for chunk in changes.chunks(1000) {
                    let insert = diesel::insert_into(status_changes::table).values(chunk);
                    diesel::RunQueryDsl::execute(insert, c)?;
                }
                Ok(updated)
            })
            .await?;
        // Views are built here, off SQLite's blocking thread.
        Ok(rows.into_iter().map(RevisedView::from).collect())
    }
);
