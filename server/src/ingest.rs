//! The heartbeat write path: reports queue up and one writer commits them in groups.
//!
//! A report is answered only after the transaction holding it has committed, so every 200
//! is durable; grouping many reports into one commit is what lets the database keep up.

use crate::cache::StateCache;
use crate::db::reports::{NewMetric, PlannedState, ReportWriter};
use crate::db::store::RevisedView;
use crate::db::{Db, DbError};
pub use crate::enrolment::Submission;
use crate::enrolment::{self, Refusal};
use crate::health::{JobHealth, ReportResult};
use crate::settings::SharedStatusConfig;
use crate::write_transaction;
use domain::heartbeat::Heartbeat;
use domain::ingest::{StoredVm, newest_per_vm, plan_batch as plan_reports};
use domain::status::StatusConfig;
use domain::{Secret, VmId, VmStatus};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Why a report could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full")]
    Busy,
    #[error("storage unavailable")]
    Unavailable,
    /// No credential or enrolment token in force.
    #[error("unknown, revoked or expired credential")]
    Unauthorized,
    /// An enrolment asked for an identity another credential holds.
    #[error("identity already enrolled")]
    IdentityTaken,
    /// Storing the report would break a rule the stored rows keep even written alone (a
    /// uuid or host name another VM holds, a VM deleted meanwhile); the rest of its batch
    /// was stored.
    #[error("the report conflicts with stored data")]
    Conflicts,
}

impl From<Refusal> for IngestError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unauthorized => IngestError::Unauthorized,
            Refusal::IdentityTaken => IngestError::IdentityTaken,
        }
    }
}

impl IngestError {
    /// Failures of our own (the report was fine): they must never count against a VM.
    pub fn is_ours(self) -> bool {
        matches!(self, IngestError::Busy | IngestError::Unavailable)
    }
}

/// What storing one report decided.
#[derive(Clone, Debug)]
pub struct StoredReport {
    pub vm_id: VmId,
    pub status: VmStatus,
    /// The VM's new credential, when the report enrolled it: sent to its agent once.
    pub credential: Option<Secret>,
}

/// Passes of a batch that lost a race to another replica's transaction. Each pass finds
/// the rows committed before it, so only a VM created meanwhile can collide again: one
/// retry is not enough when replicas take in a fleet's first reports together.
const RACE_RETRIES: usize = 5;

/// Why a batch's transaction may simply be run again: it was rolled back whole because
/// another writer's transaction got in its way, not because of anything in the reports.
pub fn lost_race(err: &DbError) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind, Error};
    let DbError::Query(Error::DatabaseError(kind, info)) = err else {
        return None;
    };
    match kind {
        // Another replica created one of these VMs first; the next pass finds its row.
        DatabaseErrorKind::UniqueViolation => Some("lost a race to create a VM"),
        DatabaseErrorKind::SerializationFailure => Some("serialization failure"),
        // PostgreSQL's 40P01, which diesel passes on without its code: an enrolment's
        // writes (a hold on the VM whose identity it claimed, a link) come before the
        // batch's rows are locked in id order, so two replicas can wait on each other.
        DatabaseErrorKind::Unknown if info.message().starts_with("deadlock detected") => {
            Some("deadlock with another writer")
        }
        _ => None,
    }
}

/// Whether a batch failed on something in its reports, a rule the stored rows keep (a
/// unique key still taken once the lost-race retries are spent, a VM deleted meanwhile),
/// rather than on the database: then its reports can be written apart. A value the schema
/// refuses (`NOT NULL`, `CHECK`) is not one: reports are validated before they queue, so
/// that is a fault of ours, answered 503 with an amnesty like an outage.
pub fn conflicts(err: &DbError) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        err,
        DbError::Query(Error::DatabaseError(
            DatabaseErrorKind::UniqueViolation | DatabaseErrorKind::ForeignKeyViolation,
            _
        ))
    )
}

/// Writes the reports `0..count` as one part with `write`, and when a part fails on a
/// conflict (`conflicts`), each half of it again on its own: a report that can never be
/// stored fails alone and the others in its batch are stored. Answers each part written,
/// in order, with how it ended; a part that failed otherwise (an outage) ends there whole.
async fn write_apart<T, F, Fut>(
    count: usize,
    mut write: F,
) -> Vec<(Range<usize>, Result<T, DbError>)>
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut parts = Vec::new();
    // The parts still to write, as a stack.
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..count);
    while let Some(part) = pending.pop() {
        match write(part.clone()).await {
            Err(err) if part.len() > 1 && conflicts(&err) => {
                tracing::warn!(error = %err, reports = part.len(), "a batch conflicts with stored data; writing its halves apart");
                let middle = part.start + part.len() / 2;
                // Last in, first out: the first half is written first.
                pending.push(middle..part.end);
                pending.push(part.start..middle);
            }
            ended => parts.push((part, ended)),
        }
    }
    parts
}

/// Runs a batch's transaction, and again (up to `RACE_RETRIES` times) while it fails only
/// because it lost a race (`lost_race`): the whole transaction was rolled back, so a new
/// pass starts from what the other writer committed.
async fn retrying_lost_races<T, F, Fut>(retries: usize, mut write: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut result = write().await;
    for _ in 0..retries {
        let Some(race) = result.as_ref().err().and_then(lost_race) else {
            break;
        };
        tracing::debug!(race, "writing the batch again");
        result = write().await;
    }
    result
}

struct Job {
    submission: Submission,
    reply: oneshot::Sender<Result<StoredReport, IngestError>>,
}

/// Handle for submitting reports to the writer.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
    health: JobHealth,
}

/// Everything the writer needs; the receiver is shared so a restarted writer drains the
/// same queue.
#[derive(Clone)]
pub struct Writer {
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    db: Db,
    cache: Arc<StateCache>,
    status_config: SharedStatusConfig,
    batch_max: usize,
    health: JobHealth,
    path: StatePath,
}

impl Ingest {
    /// The submitting handle and the writer that must be run (see `Writer::run`).
    pub fn new(
        db: Db,
        cache: Arc<StateCache>,
        status_config: SharedStatusConfig,
        batch_max: usize,
        queue_capacity: usize,
        health: JobHealth,
        path: StatePath,
    ) -> (Self, Writer) {
        let (tx, rx) = mpsc::channel(queue_capacity);
        let writer = Writer {
            rx: Arc::new(Mutex::new(rx)),
            db,
            cache,
            status_config,
            batch_max,
            health,
            path,
        };
        (
            Self {
                tx,
                health: writer.health.clone(),
            },
            writer,
        )
    }

    /// Queues a report and waits until it is committed.
    pub async fn submit(&self, submission: Submission) -> Result<StoredReport, IngestError> {
        let (reply, answer) = oneshot::channel();
        let queued = self
            .tx
            .try_send(Job { submission, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => IngestError::Busy,
                mpsc::error::TrySendError::Closed(_) => IngestError::Unavailable,
            });
        let result = match queued {
            // The writer dropped the reply: it stopped (or restarted) before committing.
            Ok(()) => answer.await.unwrap_or(Err(IngestError::Unavailable)),
            Err(err) => Err(err),
        };
        if let Err(err) = result
            && err.is_ours()
        {
            // A heartbeat refused for our own reasons must not count against its VM.
            self.health.record_ingest_failure(crate::now_ms());
        }
        self.health.record_report(match result {
            Ok(_) => ReportResult::Stored,
            Err(IngestError::Busy) => ReportResult::Shed,
            Err(IngestError::Unavailable) => ReportResult::Failed,
            Err(
                IngestError::Unauthorized | IngestError::IdentityTaken | IngestError::Conflicts,
            ) => ReportResult::Refused,
        });
        result
    }

    /// Reports waiting for the writer now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }
}

impl Writer {
    /// Commits queued reports until every `Ingest` handle is dropped.
    pub async fn run(self) {
        let mut rx = self.rx.lock().await;
        let mut jobs = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.recv().await {
            jobs.push(first);
            // Everything that queued while the previous commit ran goes into this one.
            while jobs.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit(&mut jobs).await;
        }
    }

    async fn commit(&self, jobs: &mut Vec<Job>) {
        let submissions: Vec<Submission> = jobs.iter().map(|j| j.submission.clone()).collect();
        let cfg = self.status_config.get();
        let started = std::time::Instant::now();
        let (db, path, cfg) = (&self.db, self.path, &cfg);
        // Only PostgreSQL has other writers to lose a race to: on SQLite this process's
        // write turn is the only one, and a unique key taken is taken for good.
        let retries = match db {
            Db::Postgres(_) => RACE_RETRIES,
            Db::Sqlite(..) => 0,
        };
        let parts = write_apart(submissions.len(), |part| {
            let part = submissions.get(part).unwrap_or_default();
            retrying_lost_races(retries, move || write_batch_via(db, part, cfg, path))
        })
        .await;
        let mut replies: Vec<_> = jobs.drain(..).map(|job| Some(job.reply)).collect();
        let mut stored = 0;
        let mut failed = false;
        for (part, ended) in parts {
            let size = part.len();
            let part_replies = replies
                .get_mut(part)
                .unwrap_or_default()
                .iter_mut()
                .filter_map(Option::take);
            match ended {
                Ok(Written { outcomes, views }) => {
                    self.health.record_commit(crate::now_ms());
                    stored += size;
                    // The rows as the transaction left them, with their revisions: the
                    // cache keeps them only where no newer write got there first.
                    self.cache.put(&views).await;
                    for (reply, outcome) in part_replies.zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                }
                // One report the stored rows refuse: its own failure, not the monitor's, so
                // it neither holds back the others nor pauses judging (a guest could send
                // such a report on purpose).
                Err(err) if size == 1 && conflicts(&err) => {
                    tracing::warn!(error = %err, "a report conflicts with stored data; refused");
                    for reply in part_replies {
                        let _ = reply.send(Err(IngestError::Conflicts));
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, reports = size, "could not store reports");
                    failed = true;
                    for reply in part_replies {
                        let _ = reply.send(Err(IngestError::Unavailable));
                    }
                }
            }
        }
        if failed {
            // Heartbeats we could not store must not count against the VMs.
            self.health.record_ingest_failure(crate::now_ms());
        }
        if stored > 0 {
            self.health.record_batch(stored, started.elapsed());
        }
    }
}

/// One transaction: whose each report is (credential or enrolment), a metric row per
/// admitted report, then the state the core planned for each VM applied. The outcomes are
/// in the order of `submissions`; a refused report stores nothing.
pub async fn write_batch(
    db: &Db,
    submissions: &[Submission],
    cfg: &StatusConfig,
) -> Result<Vec<Result<StoredReport, IngestError>>, DbError> {
    Ok(write_batch_via(db, submissions, cfg, StatePath::SetBased)
        .await?
        .outcomes)
}

/// What a committed batch stored.
#[derive(Debug)]
pub struct Written {
    /// One per submission, in order.
    pub outcomes: Vec<Result<StoredReport, IngestError>>,
    /// Every VM the batch changed, as committed.
    pub views: Vec<RevisedView>,
}

/// How the batch's latest state is written: the set-based statement the server uses, or the
/// one-VM-at-a-time reference the tests hold it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatePath {
    SetBased,
    OneByOne,
}

/// [`write_batch`] with the state written along `path`.
pub async fn write_batch_via(
    db: &Db,
    submissions: &[Submission],
    cfg: &StatusConfig,
    path: StatePath,
) -> Result<Written, DbError> {
    let (mut conn, _turn) = db.write_conn().await?;
    let now_ms = crate::now_ms();
    write_transaction!(conn, |c| {
        let admitted = enrolment::admit(c, submissions, now_ms).await?;
        let (ids, reports): (Vec<VmId>, Vec<Heartbeat>) = admitted
            .outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().map(|a| (a.vm_id, a.report.clone())))
            .unzip();
        let metrics = ids
            .iter()
            .zip(&reports)
            .map(|(&id, r)| NewMetric::of(id, r))
            .collect();
        let rows = c.lock_vms(&ids, admitted.known, admitted.wrote_vms).await?;
        c.insert_metrics(metrics).await?;
        let planned = plan_batch(&ids, &reports, &rows, cfg);
        let views = match path {
            StatePath::SetBased => c.apply_latest_state(&planned).await?,
            StatePath::OneByOne => c.apply_latest_state_one_by_one(&planned).await?,
        };
        c.insert_reboots(&planned).await?;
        let statuses: BTreeMap<VmId, VmStatus> = planned
            .iter()
            .map(|p| (p.vm_id, p.update.verdict.status))
            .collect();
        let outcomes = admitted
            .outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map_err(IngestError::from).map(|a| StoredReport {
                    vm_id: a.vm_id,
                    status: statuses.get(&a.vm_id).copied().unwrap_or(VmStatus::Unknown),
                    credential: a.credential,
                })
            })
            .collect();
        Ok(Written { outcomes, views })
    })
}

/// The core's plan for every VM of the batch, from the rows as they were before it.
fn plan_batch<'a>(
    ids: &[VmId],
    reports: &'a [Heartbeat],
    known: &'a [crate::db::store::VmRow],
    cfg: &StatusConfig,
) -> Vec<PlannedState<'a>> {
    let batch: Vec<(VmId, &Heartbeat)> = ids.iter().copied().zip(reports).collect();
    // Looked up by id: a batch holds up to hundreds of VMs.
    let rows: HashMap<VmId, &crate::db::store::VmRow> =
        known.iter().map(|row| (row.vm_id(), row)).collect();
    let mut of_vm: HashMap<VmId, Vec<&Heartbeat>> = HashMap::new();
    for (vm_id, report) in &batch {
        of_vm.entry(*vm_id).or_default().push(*report);
    }
    newest_per_vm(&batch)
        .into_iter()
        .filter_map(|(vm_id, (report, last_seen))| {
            let row = rows.get(&vm_id)?;
            let of_vm = of_vm.get(&vm_id)?;
            let stored = StoredVm {
                status: row.status(),
                status_since_ms: row.status_since_ms,
                observed_at_ms: row.observed_at_ms,
                cpu_percent: row.cpu_percent,
                ram_used_bytes: row.ram_used_bytes,
                ram_total_bytes: row.ram_total_bytes,
                disk_max_percent: row.disk_max_percent,
                uptime_seconds: row.uptime_seconds,
                phase: row.phase(),
                attempts: row.incident_attempts,
                last_reset_ms: row.last_reset_ms,
            };
            // A VM first seen without a uuid adopts the one it now sends.
            let machine_id = row
                .machine_id
                .as_deref()
                .or_else(|| of_vm.iter().find_map(|r| r.machine_id.as_deref()));
            Some(PlannedState {
                vm_id,
                report,
                machine_id,
                update: plan_reports(&stored, report, of_vm, last_seen, cfg),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{DbError, RACE_RETRIES, conflicts, retrying_lost_races, write_apart};
    use diesel::result::{DatabaseErrorKind, Error};
    use std::cell::Cell;

    fn failure(kind: DatabaseErrorKind, message: &str) -> DbError {
        DbError::Query(Error::DatabaseError(kind, Box::new(message.to_owned())))
    }

    /// Passes of a write that fails `failures` times with `make`, then succeeds.
    async fn passes(failures: usize, make: fn() -> DbError) -> (usize, bool) {
        let calls = Cell::new(0);
        let result = retrying_lost_races(RACE_RETRIES, || {
            calls.set(calls.get() + 1);
            let failed = calls.get() <= failures;
            async move { if failed { Err(make()) } else { Ok(()) } }
        })
        .await;
        (calls.get(), result.is_ok())
    }

    #[tokio::test]
    async fn a_lost_race_is_written_again_and_anything_else_is_not() {
        let deadlock = || failure(DatabaseErrorKind::Unknown, "deadlock detected");
        let taken = || failure(DatabaseErrorKind::UniqueViolation, "duplicate key value");
        let refused = || failure(DatabaseErrorKind::CheckViolation, "violates check");
        let down = || DbError::Unavailable("connection refused".into());
        assert_eq!(passes(0, deadlock).await, (1, true));
        assert_eq!(passes(1, deadlock).await, (2, true));
        assert_eq!(passes(2, taken).await, (3, true));
        // A race lost every time gives up after the retries, failed.
        assert_eq!(
            passes(RACE_RETRIES + 1, deadlock).await,
            (RACE_RETRIES + 1, false)
        );
        assert_eq!(passes(1, refused).await, (1, false));
        assert_eq!(passes(1, down).await, (1, false));
    }

    /// How a batch of `count` is written apart when the reports at `conflicting` can never
    /// be stored, or, with `outage`, when the database is down: each part as
    /// `(start, end, stored)`, and how many writes it took.
    async fn written_apart(
        count: usize,
        conflicting: &[usize],
        outage: bool,
    ) -> (Vec<(usize, usize, bool)>, usize) {
        let writes = Cell::new(0);
        let parts = write_apart(count, |part: std::ops::Range<usize>| {
            writes.set(writes.get() + 1);
            let result = if outage {
                Err(DbError::Unavailable("connection refused".into()))
            } else if conflicting.iter().any(|i| part.contains(i)) {
                Err(failure(DatabaseErrorKind::UniqueViolation, "duplicate key"))
            } else {
                Ok(())
            };
            async move { result }
        })
        .await;
        let parts = parts
            .into_iter()
            .map(|(part, result)| (part.start, part.end, result.is_ok()))
            .collect();
        (parts, writes.get())
    }

    #[tokio::test]
    async fn a_report_that_conflicts_is_written_apart_and_an_outage_is_not() {
        assert_eq!(written_apart(8, &[], false).await, (vec![(0, 8, true)], 1));
        // Halves until the conflicting report stands alone; the rest stored in order.
        assert_eq!(
            written_apart(8, &[3], false).await,
            (
                vec![(0, 2, true), (2, 3, true), (3, 4, false), (4, 8, true)],
                7
            )
        );
        let (parts, _) = written_apart(9, &[0, 8], false).await;
        let failed: Vec<_> = parts.iter().filter(|p| !p.2).map(|p| (p.0, p.1)).collect();
        assert_eq!(failed, vec![(0, 1), (8, 9)]);
        let covered: Vec<usize> = parts.iter().flat_map(|p| p.0..p.1).collect();
        assert_eq!(
            covered,
            (0..9).collect::<Vec<_>>(),
            "each report once, in order"
        );
        // An outage is no report's fault: the batch fails whole, written once.
        assert_eq!(written_apart(8, &[], true).await, (vec![(0, 8, false)], 1));
        // Nor is a value the schema refuses: reports are validated before they queue.
        assert!(!conflicts(&failure(
            DatabaseErrorKind::CheckViolation,
            "check"
        )));
        assert!(!conflicts(&failure(
            DatabaseErrorKind::NotNullViolation,
            "null"
        )));
        assert!(conflicts(&failure(
            DatabaseErrorKind::ForeignKeyViolation,
            "deleted"
        )));
        assert_eq!(
            written_apart(1, &[0], false).await,
            (vec![(0, 1, false)], 1)
        );
    }
}
