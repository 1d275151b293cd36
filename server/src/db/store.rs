//! Queries over VM rows and their history, written once for both backends.

use super::batch::{OwnedStatusChange, Placeholders, push_values};
use super::schema::{
    credentials, metric_samples, reset_attempts, runtime_config, status_changes, vms,
};
use super::stored::{Stored, inner};
use super::{Conn, DbError};
use crate::{with_conn, write_transaction};
use diesel::BoolExpressionMethods;
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper};
use diesel_async::RunQueryDsl;
use domain::policy::{self, NodeTally};
use domain::settings::RemediationTuning;
use domain::status::{LatestReport, StatusConfig, StatusCounts, Verdict};
use domain::view::{DiskUsage, ResetAttempt, StatusChange, VmView};
use domain::{
    AttemptId, AttemptOutcome, GuestKind, GuestRef, LinkSource, Mode, NodeName, PowerAction,
    RemediationPhase, TriggerSource, VmId, VmStatus, Vmid,
};

const STATUS_CONFIG_KEY: &str = "status_config";
const REMEDIATION_TUNING_KEY: &str = "remediation_tuning";

/// A full `vms` row; stored enums are parsed on read and fail on unknown values.
#[derive(Clone, Debug, diesel::Queryable, diesel::QueryableByName, diesel::Selectable)]
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
    pub proxmox_type: Option<Stored<GuestKind>>,
    pub auto_reset: bool,
    pub status: Stored<VmStatus>,
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
    pub proxmox_link_source: Option<Stored<LinkSource>>,
    pub remediation_phase: Stored<RemediationPhase>,
    pub phase_reason: Option<String>,
    pub incident_attempts: i64,
    pub next_action_ms: Option<i64>,
    pub last_reset_ms: Option<i64>,
    pub link_verified: bool,
}

/// A VM's view and the revision of the row it was read from. Every update of a `vms` row
/// raises its revision (the statement itself, or a trigger), so of two views of one VM the
/// one with the higher revision is the newer, whichever reached the cache first.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisedView {
    pub revision: i64,
    pub view: VmView,
}

impl From<(VmRow, i64)> for RevisedView {
    fn from((row, revision): (VmRow, i64)) -> Self {
        RevisedView {
            revision,
            view: row.into_view(),
        }
    }
}

/// `vms.revision`, read as SQL: `schema::vms` stays within diesel's 32-column build, and
/// nothing sets the column through the query builder (the trigger does).
pub fn revision() -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql::<diesel::sql_types::BigInt>("vms.revision")
}

impl VmRow {
    pub fn vm_id(&self) -> VmId {
        VmId(self.id)
    }

    pub fn status(&self) -> VmStatus {
        self.status.0
    }

    pub fn phase(&self) -> RemediationPhase {
        self.remediation_phase.0
    }

    pub fn link_source(&self) -> Option<LinkSource> {
        self.proxmox_link_source.map(Stored::into_inner)
    }

    /// The linked guest; `None` when unlinked or when a stored part is not a valid id
    /// (an unusable link is never acted on).
    pub fn guest(&self) -> Option<GuestRef> {
        Some(GuestRef {
            node: self.proxmox_node.as_deref()?.parse::<NodeName>().ok()?,
            vmid: Vmid::try_from(self.proxmox_vmid?).ok()?,
            kind: self.proxmox_type?.0,
        })
    }

    /// The guest remediation may act on: linked and verified (see `domain::link`).
    pub fn verified_guest(&self) -> Option<GuestRef> {
        self.guest().filter(|_| self.link_verified)
    }

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
        let guest = self.guest();
        let disks = self
            .disks_json
            .as_deref()
            .and_then(|json| serde_json::from_str::<Vec<DiskUsage>>(json).ok())
            .unwrap_or_default();
        VmView {
            id: VmId(self.id),
            hostname: self.hostname,
            os: self.os,
            machine_id: self.machine_id,
            agent_version: self.agent_version,
            status: self.status.0,
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
            proxmox_node: guest.as_ref().map(|g| g.node.clone()),
            proxmox_vmid: guest.as_ref().map(|g| g.vmid),
            proxmox_type: guest.as_ref().map(|g| g.kind),
            proxmox_link_source: inner(self.proxmox_link_source),
            link_verified: self.link_verified,
            auto_reset: self.auto_reset,
            remediation_phase: self.remediation_phase.0,
            phase_reason: self.phase_reason,
            incident_attempts: self.incident_attempts,
            last_reset_ms: self.last_reset_ms,
            next_action_ms: self.next_action_ms,
        }
    }
}

#[derive(diesel::Insertable)]
#[diesel(table_name = status_changes)]
pub(super) struct NewStatusChange<'a> {
    pub vm_id: i64,
    pub from_status: &'a str,
    pub to_status: &'a str,
    pub at_ms: i64,
    pub reason: &'a str,
}

/// VMs whose last report is older than the stale timeout and that are not `down` yet.
pub async fn overdue_rows(
    conn: &mut Conn,
    stale_timeout_ms: i64,
    now_ms: i64,
) -> Result<Vec<VmRow>, DbError> {
    overdue_page(conn, stale_timeout_ms, now_ms, 0, i64::MAX).await
}

/// At most `limit` of [`overdue_rows`] after id `after`, in id order.
pub async fn overdue_page(
    conn: &mut Conn,
    stale_timeout_ms: i64,
    now_ms: i64,
    after: i64,
    limit: i64,
) -> Result<Vec<VmRow>, DbError> {
    let cutoff = now_ms.saturating_sub(stale_timeout_ms);
    // Named statuses rather than "not down": one seek per status on the (status,
    // last_seen_ms) index instead of a scan of the fleet.
    let live: Vec<&str> = VmStatus::ALL
        .iter()
        .filter(|s| **s != VmStatus::Down)
        .map(|s| s.as_str())
        .collect();
    Ok(with_conn!(conn, |c| {
        vms::table
            .filter(vms::status.eq_any(&live))
            .filter(vms::last_seen_ms.le(cutoff))
            .filter(vms::id.gt(after))
            .order(vms::id.asc())
            .limit(limit)
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

/// Sets heartbeat times later than `now_ms` (stored before the clock was stepped back) to
/// `now_ms`. Returns how many VMs had one.
pub async fn bring_back_future_heartbeats(conn: &mut Conn, now_ms: i64) -> Result<usize, DbError> {
    Ok(with_conn!(conn, |c| {
        diesel::update(vms::table.filter(vms::last_seen_ms.gt(now_ms)))
            .set(vms::last_seen_ms.eq(now_ms))
            .execute(c)
            .await
    })?)
}

/// A verdict together with what it was judged from.
#[derive(Clone, Debug)]
pub struct Judged {
    pub vm_id: VmId,
    /// The status the VM had when it was judged.
    pub from: VmStatus,
    /// The heartbeat time the verdict was judged from (`None`: never heard from).
    pub seen_ms: Option<i64>,
    pub verdict: Verdict,
}

/// Stands for "never heard from" where a heartbeat time is compared: no real one is negative.
const NEVER_SEEN: i64 = -1;

/// Applies status verdicts the core computed, each only if the VM still has the status
/// and the heartbeat time it was judged from (so two replicas record one change, and a
/// report that landed meanwhile is never overruled by a verdict on the one before it). Returns the VMs changed. One
/// `UPDATE ... FROM (VALUES ...) RETURNING` and one multi-row insert per 2,000 VMs: a whole
/// fleet going silent at once is judged at the database's pace, not a round trip per VM.
pub async fn apply_verdicts(
    conn: &mut Conn,
    verdicts: &[Judged],
    now_ms: i64,
) -> Result<Vec<VmId>, DbError> {
    if verdicts.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<VerdictRow> = verdicts
        .iter()
        .map(|judged| VerdictRow {
            id: judged.vm_id.get(),
            from: judged.from.as_str(),
            seen_ms: judged.seen_ms.unwrap_or(NEVER_SEEN),
            to: judged.verdict.status.as_str(),
            reason: judged.verdict.reason.clone(),
        })
        .collect();
    let changed: Vec<i64> = match conn.as_backend() {
        Conn::Postgres(c) => {
            let c: &mut diesel_async::AsyncPgConnection = c;
            diesel_async::AsyncConnection::transaction::<_, DbError, _>(c, async |c| {
                // Rows locked in id order first, as ingest locks them: one statement over
                // many rows locks them in its join's order, and two can deadlock.
                let mut ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                ids.sort_unstable();
                for chunk in ids.chunks(10_000) {
                    vms::table
                        .filter(vms::id.eq_any(chunk))
                        .order(vms::id.asc())
                        .select(vms::id)
                        // What the guarded UPDATE takes anyway; unlike FOR UPDATE it does not
                        // wait on the key-share locks ingest's metric inserts take.
                        .for_no_key_update()
                        .load::<i64>(c)
                        .await?;
                }
                let mut changed = Vec::new();
                for chunk in rows.chunks(VERDICTS_PER_STATEMENT) {
                    let done: Vec<ChangedId> =
                        verdict_statement::<diesel::pg::Pg>(chunk, now_ms, Placeholders::Numbered)
                            .load(c)
                            .await?;
                    changed.extend(done.into_iter().map(|d| d.id));
                }
                for chunk in verdict_changes(&rows, &changed, now_ms).chunks(1_000) {
                    diesel::insert_into(status_changes::table)
                        .values(chunk)
                        .execute(c)
                        .await?;
                }
                Ok(changed)
            })
            .await?
        }
        Conn::Sqlite(c) => {
            c.spawn_blocking(move |c| {
                // Takes the write lock as it begins, as every write transaction here does.
                c.immediate_transaction(|c| {
                    let mut changed = Vec::new();
                    for chunk in rows.chunks(VERDICTS_PER_STATEMENT) {
                        let statement = verdict_statement::<diesel::sqlite::Sqlite>(
                            chunk,
                            now_ms,
                            Placeholders::Anonymous,
                        );
                        let done: Vec<ChangedId> = diesel::RunQueryDsl::load(statement, c)?;
                        changed.extend(done.into_iter().map(|d| d.id));
                    }
                    for chunk in verdict_changes(&rows, &changed, now_ms).chunks(1_000) {
                        let insert = diesel::insert_into(status_changes::table).values(chunk);
                        diesel::RunQueryDsl::execute(insert, c)?;
                    }
                    Ok(changed)
                })
            })
            .await?
        }
    };
    let mut changed: Vec<VmId> = changed.into_iter().map(VmId).collect();
    changed.sort_unstable();
    Ok(changed)
}

/// VMs per verdict statement: six binds each, well under both backends' limits.
const VERDICTS_PER_STATEMENT: usize = 2_000;

/// One verdict, owned so the statement can cross into the SQLite connection's thread.
struct VerdictRow {
    id: i64,
    from: &'static str,
    seen_ms: i64,
    to: &'static str,
    reason: String,
}

#[derive(diesel::QueryableByName)]
struct ChangedId {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
}

/// `UPDATE vms ... FROM (VALUES (id, from, to, reason, now), ...) RETURNING vms.id`: each
/// row changes only while it still has the status it was judged from.
fn verdict_statement<DB>(
    rows: &[VerdictRow],
    now_ms: i64,
    placeholders: Placeholders,
) -> diesel::query_builder::BoxedSqlQuery<'static, DB, diesel::query_builder::SqlQuery>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<diesel::sql_types::BigInt>
        + diesel::sql_types::HasSqlType<diesel::sql_types::Text>,
    i64: diesel::serialize::ToSql<diesel::sql_types::BigInt, DB>,
    String: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    &'static str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
{
    use diesel::sql_types::{BigInt, Text};
    let mut sql = String::from(
        "UPDATE vms SET status = v.column4, status_reason = v.column5, \
         status_since_ms = v.column6, revision = vms.revision + 1 FROM (VALUES ",
    );
    push_values(&mut sql, rows.len(), 6, placeholders);
    sql.push_str(&format!(
        ") AS v WHERE vms.id = v.column1 AND vms.status = v.column2 \
         AND COALESCE(vms.last_seen_ms, {NEVER_SEEN}) = v.column3 RETURNING vms.id"
    ));
    let mut query = diesel::sql_query(sql).into_boxed::<DB>();
    for r in rows {
        query = query
            .bind::<BigInt, _>(r.id)
            .bind::<Text, _>(r.from)
            .bind::<BigInt, _>(r.seen_ms)
            .bind::<Text, _>(r.to)
            .bind::<Text, _>(r.reason.clone())
            .bind::<BigInt, _>(now_ms);
    }
    query
}

/// The status-change rows of the verdicts that took effect.
fn verdict_changes(rows: &[VerdictRow], changed: &[i64], now_ms: i64) -> Vec<OwnedStatusChange> {
    let changed: std::collections::HashSet<i64> = changed.iter().copied().collect();
    rows.iter()
        .filter(|r| changed.contains(&r.id))
        .map(|r| OwnedStatusChange {
            vm_id: r.id,
            from_status: r.from,
            to_status: r.to,
            at_ms: now_ms,
            reason: r.reason.clone(),
        })
        .collect()
}

/// `apply_verdicts` one VM at a time (two statements each): the reference the set-based
/// statements are tested against (`tests/it/write_path.rs`).
pub async fn apply_verdicts_one_by_one(
    conn: &mut Conn,
    verdicts: &[Judged],
    now_ms: i64,
) -> Result<Vec<VmId>, DbError> {
    if verdicts.is_empty() {
        return Ok(Vec::new());
    }
    write_transaction!(conn, |c| {
        let mut changed = Vec::new();
        for Judged {
            vm_id: id,
            from,
            seen_ms,
            verdict,
        } in verdicts
        {
            let seen = diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
                "COALESCE(last_seen_ms, {NEVER_SEEN}) = "
            ))
            .bind::<diesel::sql_types::BigInt, _>(seen_ms.unwrap_or(NEVER_SEEN));
            let updated = diesel::update(
                vms::table
                    .filter(vms::id.eq(id.get()))
                    .filter(vms::status.eq(from.as_str()))
                    .filter(seen),
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
                        vm_id: id.get(),
                        from_status: from.as_str(),
                        to_status: verdict.status.as_str(),
                        at_ms: now_ms,
                        reason: &verdict.reason,
                    })
                    .execute(c)
                    .await?;
                changed.push(*id);
            }
        }
        Ok(changed)
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

/// How many VMs are in each status, counted by the database (no row is loaded).
pub async fn status_counts(conn: &mut Conn) -> Result<StatusCounts, DbError> {
    let tallies: Vec<(Stored<VmStatus>, i64)> = with_conn!(conn, |c| {
        vms::table
            .group_by(vms::status)
            .select((vms::status, diesel::dsl::count_star()))
            .load(c)
            .await
    })?;
    Ok(StatusCounts::from_tallies(tallies.into_iter().map(
        |(status, n)| (status.0, u64::try_from(n).unwrap_or(0)),
    )))
}

/// At most `limit` VMs in (hostname, id) order, after `after` (keyset paging: each page
/// costs the same however deep it is).
pub async fn vms_page(
    conn: &mut Conn,
    after: Option<(&str, i64)>,
    limit: i64,
) -> Result<Vec<VmView>, DbError> {
    let rows: Vec<VmRow> = with_conn!(conn, |c| {
        let mut query = vms::table.into_boxed();
        if let Some((hostname, id)) = after {
            query = query.filter(
                vms::hostname
                    .gt(hostname)
                    .or(vms::hostname.eq(hostname).and(vms::id.gt(id))),
            );
        }
        query
            .order((vms::hostname.asc(), vms::id.asc()))
            .limit(limit)
            .select(VmRow::as_select())
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(VmRow::into_view).collect())
}

/// Every VM row (re-judging the fleet after a settings change).
pub async fn list_rows(conn: &mut Conn) -> Result<Vec<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .order(vms::id.asc())
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

/// VMs with an incident under way: an announced action, an action in flight, a recovery
/// being waited for. Read every round, through the (phase, status) index.
pub async fn open_incident_rows(conn: &mut Conn) -> Result<Vec<VmRow>, DbError> {
    let open = [
        RemediationPhase::ResetScheduled,
        RemediationPhase::ResetPending,
        RemediationPhase::Recovering,
    ]
    .map(RemediationPhase::as_str);
    Ok(with_conn!(conn, |c| {
        vms::table
            .filter(vms::remediation_phase.eq_any(open))
            .order(vms::id.asc())
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

/// Stale VMs with no incident yet: the candidates for a first look. Read only when no rail
/// stops resets (in a storm, that is most of the fleet).
pub async fn stale_candidate_rows(conn: &mut Conn) -> Result<Vec<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .filter(vms::remediation_phase.eq(RemediationPhase::Ok.as_str()))
            .filter(vms::status.eq(VmStatus::Down.as_str()))
            .order(vms::id.asc())
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

/// What the storm breaker weighs (`domain::policy::storm_of`): per node, the VMs it counts
/// (verified links to a valid guest, not latched manual) and how many of them are stale.
/// The stale ones are counted first, through the status index; the whole fleet only when two
/// or more are, the least that can trip the breaker, and then in one statement so both
/// counts are of one moment. A row holding a value no release writes (an unknown status,
/// phase or kind, a VMID out of range, an invalid node name) is not counted: it can only
/// make the stale share larger, never hide a storm.
pub async fn storm_tallies(conn: &mut Conn) -> Result<Vec<NodeTally>, DbError> {
    let statuses: Vec<&str> = VmStatus::ALL.iter().map(|s| s.as_str()).collect();
    let phases: Vec<&str> = RemediationPhase::ALL
        .iter()
        .filter(|p| **p != RemediationPhase::Manual)
        .map(|p| p.as_str())
        .collect();
    let kinds: Vec<&str> = GuestKind::ALL.iter().map(|k| k.as_str()).collect();
    let (lowest, highest) = (*Vmid::RANGE.start(), *Vmid::RANGE.end());
    macro_rules! counted {
        () => {
            vms::table
                .filter(vms::link_verified.eq(true))
                .filter(vms::proxmox_vmid.between(lowest, highest))
                .filter(vms::proxmox_type.eq_any(&kinds))
                .filter(vms::remediation_phase.eq_any(&phases))
        };
    }
    let stale: i64 = with_conn!(conn, |c| {
        counted!()
            .filter(vms::status.eq(VmStatus::Down.as_str()))
            .count()
            .get_result(c)
            .await
    })?;
    if !policy::storm_possible(u64::try_from(stale).unwrap_or(0)) {
        return Ok(Vec::new());
    }
    let per_node: Vec<(Option<String>, i64, i64)> = with_conn!(conn, |c| {
        counted!()
            .filter(vms::status.eq_any(&statuses))
            .group_by(vms::proxmox_node)
            .select((
                vms::proxmox_node,
                diesel::dsl::count_star(),
                diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "SUM(CASE WHEN status = 'down' THEN 1 ELSE 0 END)",
                ),
            ))
            .load(c)
            .await
    })?;
    Ok(per_node
        .into_iter()
        .filter_map(|(node, linked, stale)| {
            Some(NodeTally {
                node: node?.parse().ok()?,
                linked: u64::try_from(linked).ok()?,
                stale: u64::try_from(stale).ok()?,
            })
        })
        .collect())
}

/// When the most recently created VM was first seen (its id is the highest).
pub async fn newest_first_seen(conn: &mut Conn) -> Result<Option<i64>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .order(vms::id.desc())
            .select(vms::first_seen_ms)
            .first(c)
            .await
            .optional()
    })?)
}

/// At most `limit` rows after id `after`, in id order: the link refresh walks the fleet a
/// page at a time instead of holding it all.
pub async fn rows_after(conn: &mut Conn, after: i64, limit: i64) -> Result<Vec<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .filter(vms::id.gt(after))
            .order(vms::id.asc())
            .limit(limit)
            .select(VmRow::as_select())
            .load(c)
            .await
    })?)
}

/// Whether any VM could be linked by its SMBIOS uuid (reports a machine id and was not
/// linked by an operator), which is what makes reading guests' uuids worth it.
pub async fn any_uuid_linkable(conn: &mut Conn) -> Result<bool, DbError> {
    let found: Option<i64> = with_conn!(conn, |c| {
        vms::table
            .filter(vms::machine_id.is_not_null())
            .filter(
                vms::proxmox_link_source
                    .is_null()
                    .or(vms::proxmox_link_source.ne(LinkSource::Manual.as_str())),
            )
            .select(vms::id)
            .first(c)
            .await
            .optional()
    })?;
    Ok(found.is_some())
}

pub async fn get_row(conn: &mut Conn, id: VmId) -> Result<Option<VmRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        vms::table
            .find(id.get())
            .select(VmRow::as_select())
            .first(c)
            .await
            .optional()
    })?)
}

/// These VMs' views with their rows' revisions.
pub async fn vms_by_ids(conn: &mut Conn, ids: &[VmId]) -> Result<Vec<RevisedView>, DbError> {
    let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    let rows: Vec<(VmRow, i64)> = with_conn!(conn, |c| {
        vms::table
            .filter(vms::id.eq_any(&ids))
            .select((VmRow::as_select(), revision()))
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(RevisedView::from).collect())
}

/// Every VM's view with its row's revision, for a rebuild of the state cache.
pub async fn revised_views(conn: &mut Conn) -> Result<Vec<RevisedView>, DbError> {
    let rows: Vec<(VmRow, i64)> = with_conn!(conn, |c| {
        vms::table
            .order(vms::id.asc())
            .select((VmRow::as_select(), revision()))
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(RevisedView::from).collect())
}

pub async fn get_vm(conn: &mut Conn, id: VmId) -> Result<Option<VmView>, DbError> {
    Ok(get_row(conn, id).await?.map(VmRow::into_view))
}

/// Deletes a VM with its history; false when it did not exist.
pub async fn delete_vm(conn: &mut Conn, id: VmId) -> Result<bool, DbError> {
    let id = id.get();
    let deleted = write_transaction!(conn, |c| {
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
    })?;
    Ok(deleted == 1)
}

/// Number of stored metric samples, for one VM or all.
pub async fn count_metric_samples(conn: &mut Conn, vm_id: Option<VmId>) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| {
        let mut query = metric_samples::table.count().into_boxed();
        if let Some(id) = vm_id {
            query = query.filter(metric_samples::vm_id.eq(id.get()));
        }
        query.get_result::<i64>(c).await
    })?)
}

#[derive(diesel::Queryable)]
struct StatusChangeRow {
    id: i64,
    vm_id: i64,
    from_status: Stored<VmStatus>,
    to_status: Stored<VmStatus>,
    at_ms: i64,
    reason: String,
}

pub async fn status_changes_for(
    conn: &mut Conn,
    vm_id: VmId,
) -> Result<Vec<StatusChange>, DbError> {
    let mut changes = recent_status_changes(conn, vm_id, i64::MAX).await?;
    changes.reverse();
    Ok(changes)
}

/// The newest `limit` status changes of a VM, newest first.
pub async fn recent_status_changes(
    conn: &mut Conn,
    vm_id: VmId,
    limit: i64,
) -> Result<Vec<StatusChange>, DbError> {
    let rows: Vec<StatusChangeRow> = with_conn!(conn, |c| {
        status_changes::table
            .filter(status_changes::vm_id.eq(vm_id.get()))
            .order(status_changes::id.desc())
            .limit(limit)
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
    })?;
    Ok(rows
        .into_iter()
        .map(|r| StatusChange {
            id: r.id,
            vm_id: VmId(r.vm_id),
            from_status: r.from_status.0,
            to_status: r.to_status.0,
            at_ms: r.at_ms,
            reason: r.reason,
        })
        .collect())
}

/// A `reset_attempts` row; stored enums fail on unknown values.
#[derive(Clone, Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = reset_attempts)]
pub struct AttemptRow {
    pub id: i64,
    pub vm_id: i64,
    pub action: Stored<PowerAction>,
    pub trigger_source: Stored<TriggerSource>,
    pub requested_by: Option<String>,
    pub mode: Stored<Mode>,
    pub proxmox_node: Option<String>,
    pub proxmox_vmid: Option<i64>,
    pub upid: Option<String>,
    pub outcome: Stored<AttemptOutcome>,
    pub error: Option<String>,
    pub evidence_json: Option<String>,
    pub created_ms: i64,
    pub sent_ms: Option<i64>,
    pub finished_ms: Option<i64>,
}

impl From<AttemptRow> for ResetAttempt {
    fn from(r: AttemptRow) -> Self {
        ResetAttempt {
            id: AttemptId(r.id),
            vm_id: VmId(r.vm_id),
            action: r.action.0,
            trigger_source: r.trigger_source.0,
            requested_by: r.requested_by,
            mode: r.mode.0,
            proxmox_node: r.proxmox_node.and_then(|n| n.parse().ok()),
            proxmox_vmid: r.proxmox_vmid.and_then(|v| Vmid::try_from(v).ok()),
            upid: r.upid,
            outcome: r.outcome.0,
            error: r.error,
            evidence_json: r.evidence_json,
            created_ms: r.created_ms,
            sent_ms: r.sent_ms,
            finished_ms: r.finished_ms,
        }
    }
}

pub async fn reset_history(conn: &mut Conn, vm_id: VmId) -> Result<Vec<ResetAttempt>, DbError> {
    recent_resets(conn, vm_id, i64::MAX).await
}

/// The newest `limit` rows of a VM's reset history, newest first.
pub async fn recent_resets(
    conn: &mut Conn,
    vm_id: VmId,
    limit: i64,
) -> Result<Vec<ResetAttempt>, DbError> {
    let rows: Vec<AttemptRow> = with_conn!(conn, |c| {
        reset_attempts::table
            .filter(reset_attempts::vm_id.eq(vm_id.get()))
            .order(reset_attempts::id.desc())
            .limit(limit)
            .select(AttemptRow::as_select())
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(ResetAttempt::from).collect())
}

/// The persisted runtime status configuration, if an operator ever saved one.
pub async fn load_status_config(conn: &mut Conn) -> Result<Option<StatusConfig>, DbError> {
    load_runtime(conn, STATUS_CONFIG_KEY).await
}

/// A runtime setting as stored: absent, readable, or present but unreadable by this version.
#[derive(Debug, PartialEq)]
pub enum StoredSetting<T> {
    Absent,
    Readable(T),
    Unreadable,
}

/// The rails saved by an admin. Unlike thresholds, a row that cannot be read is reported as
/// such: the caller turns auto-reset off rather than fall back to the environment's rails.
pub async fn load_remediation_tuning(
    conn: &mut Conn,
) -> Result<StoredSetting<RemediationTuning>, DbError> {
    Ok(
        match load_runtime_text(conn, REMEDIATION_TUNING_KEY).await? {
            None => StoredSetting::Absent,
            Some(json) => match serde_json::from_str(&json) {
                Ok(tuning) => StoredSetting::Readable(tuning),
                Err(_) => StoredSetting::Unreadable,
            },
        },
    )
}

/// One runtime setting; a row this version cannot read is treated as absent, so the
/// configuration from the environment applies.
async fn load_runtime<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
    key: &str,
) -> Result<Option<T>, DbError> {
    let value = load_runtime_text(conn, key).await?;
    Ok(value.and_then(|json| serde_json::from_str(&json).ok()))
}

async fn load_runtime_text(conn: &mut Conn, key: &str) -> Result<Option<String>, DbError> {
    let value: Option<String> = with_conn!(conn, |c| {
        runtime_config::table
            .find(key)
            .select(runtime_config::value)
            .first(c)
            .await
            .optional()
    })?;
    Ok(value)
}

pub async fn save_status_config(
    conn: &mut Conn,
    cfg: &StatusConfig,
    now_ms: i64,
) -> Result<(), DbError> {
    save_runtime(conn, &[(STATUS_CONFIG_KEY, to_json(cfg)?)], now_ms).await
}

/// Thresholds and, when given, remediation rails, in one transaction.
pub async fn save_settings(
    conn: &mut Conn,
    status: &StatusConfig,
    tuning: Option<&RemediationTuning>,
    now_ms: i64,
) -> Result<(), DbError> {
    let mut values = vec![(STATUS_CONFIG_KEY, to_json(status)?)];
    if let Some(tuning) = tuning {
        values.push((REMEDIATION_TUNING_KEY, to_json(tuning)?));
    }
    save_runtime(conn, &values, now_ms).await
}

fn to_json(value: &impl serde::Serialize) -> Result<String, DbError> {
    serde_json::to_string(value)
        .map_err(|e| DbError::Query(diesel::result::Error::SerializationError(Box::new(e))))
}

async fn save_runtime(
    conn: &mut Conn,
    values: &[(&str, String)],
    now_ms: i64,
) -> Result<(), DbError> {
    write_transaction!(conn, |c| {
        for (key, json) in values {
            diesel::insert_into(runtime_config::table)
                .values((
                    runtime_config::key.eq(*key),
                    runtime_config::value.eq(json),
                    runtime_config::updated_ms.eq(now_ms),
                ))
                .on_conflict(runtime_config::key)
                .do_update()
                .set((
                    runtime_config::value.eq(json),
                    runtime_config::updated_ms.eq(now_ms),
                ))
                .execute(c)
                .await?;
        }
        Ok(())
    })
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
        .ok_or(DbError::Query(diesel::result::Error::NotFound))
}

pub async fn delete_credential(conn: &mut Conn, name: &str) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::delete(credentials::table.find(name))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// A cheap round trip, for readiness.
pub async fn ping(conn: &mut Conn) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(c, "SELECT 1").await
    })?;
    Ok(())
}
