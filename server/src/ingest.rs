//! The heartbeat write path: reports queue up and one writer commits them in groups.
//!
//! A report is answered only after the transaction holding it has committed, so every 200
//! is durable; grouping many reports into one commit is what lets the database keep up.

use crate::cache::{self, StateCache};
use crate::db::reports::{NewMetric, PlannedState, ReportWriter};
use crate::db::{Db, DbError};
use crate::health::JobHealth;
use crate::settings::SharedStatusConfig;
use crate::with_conn;
use diesel_async::AsyncConnection;
use domain::heartbeat::Heartbeat;
use domain::ingest::{StoredVm, newest_per_vm, plan};
use domain::status::StatusConfig;
use domain::{VmId, VmStatus};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Why a report could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full")]
    Busy,
    #[error("storage unavailable")]
    Unavailable,
}

/// What storing one report decided.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredReport {
    pub vm_id: VmId,
    pub status: VmStatus,
}

struct Job {
    report: Heartbeat,
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
    ) -> (Self, Writer) {
        let (tx, rx) = mpsc::channel(queue_capacity);
        let writer = Writer {
            rx: Arc::new(Mutex::new(rx)),
            db,
            cache,
            status_config,
            batch_max,
            health,
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
    pub async fn submit(&self, report: Heartbeat) -> Result<StoredReport, IngestError> {
        let (reply, answer) = oneshot::channel();
        let queued = self
            .tx
            .try_send(Job { report, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => IngestError::Busy,
                mpsc::error::TrySendError::Closed(_) => IngestError::Unavailable,
            });
        let result = match queued {
            // The writer dropped the reply: it stopped (or restarted) before committing.
            Ok(()) => answer.await.unwrap_or(Err(IngestError::Unavailable)),
            Err(err) => Err(err),
        };
        if result.is_err() {
            // A heartbeat refused for our own reasons must not count against its VM.
            self.health.record_ingest_failure(crate::now_ms());
        }
        result
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
        let reports: Vec<Heartbeat> = jobs.iter().map(|j| j.report.clone()).collect();
        let cfg = self.status_config.get();
        let mut result = write_batch(&self.db, &reports, &cfg).await;
        if let Err(DbError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        ))) = &result
        {
            // A concurrent replica may have created the same VM; a second pass finds it.
            result = write_batch(&self.db, &reports, &cfg).await;
        }
        match result {
            Ok(stored) => {
                self.health.record_commit(crate::now_ms());
                let mut ids: Vec<VmId> = stored.iter().map(|s| s.vm_id).collect();
                ids.sort_unstable();
                ids.dedup();
                cache::refresh(&self.db, &self.cache, &ids).await;
                for (job, outcome) in jobs.drain(..).zip(stored) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, reports = jobs.len(), "could not store reports");
                // Heartbeats we could not store must not count against the VMs.
                self.health.record_ingest_failure(crate::now_ms());
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(IngestError::Unavailable));
                }
            }
        }
    }
}

/// One transaction: VMs found or created, a metric row per report, then the state the
/// core planned for each VM applied.
pub async fn write_batch(
    db: &Db,
    reports: &[Heartbeat],
    cfg: &StatusConfig,
) -> Result<Vec<StoredReport>, DbError> {
    let (mut conn, _turn) = db.write_conn().await?;
    with_conn!(conn, |c| {
        c.transaction::<_, DbError, _>(async |c| {
            let (ids, known) = c.find_or_create_vms(reports).await?;
            let metrics = ids
                .iter()
                .zip(reports)
                .map(|(&id, r)| NewMetric::of(id, r))
                .collect();
            c.insert_metrics(metrics).await?;
            let planned = plan_batch(&ids, reports, &known, cfg);
            c.apply_latest_state(&planned).await?;
            let statuses: BTreeMap<VmId, VmStatus> = planned
                .iter()
                .map(|p| (p.vm_id, p.update.verdict.status))
                .collect();
            Ok(ids
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

/// The core's plan for every VM of the batch, from the rows as they were before it.
fn plan_batch<'a>(
    ids: &[VmId],
    reports: &'a [Heartbeat],
    known: &'a [crate::db::store::VmRow],
    cfg: &StatusConfig,
) -> Vec<PlannedState<'a>> {
    let batch: Vec<(VmId, &Heartbeat)> = ids.iter().copied().zip(reports).collect();
    newest_per_vm(&batch)
        .into_iter()
        .filter_map(|(vm_id, (report, last_seen))| {
            let row = known.iter().find(|row| row.vm_id() == vm_id)?;
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
                .or_else(|| batch_uuid(&batch, vm_id));
            Some(PlannedState {
                vm_id,
                report,
                machine_id,
                update: plan(&stored, report, last_seen, cfg),
            })
        })
        .collect()
}

fn batch_uuid<'a>(batch: &[(VmId, &'a Heartbeat)], vm_id: VmId) -> Option<&'a str> {
    batch
        .iter()
        .filter(|(id, _)| *id == vm_id)
        .find_map(|(_, r)| r.machine_id.as_deref())
}
