//! The heartbeat write path: reports queue up and one writer commits them in groups.
//!
//! A report is answered only after the transaction holding it has committed, so every 200
//! is durable; grouping many reports into one commit is what lets the database keep up.

use crate::cache::StateCache;
use crate::db::store::{self, PreparedReport, StoredReport};
use crate::db::{Db, DbError};
use crate::remediation::IngestHealth;
use crate::state::SharedStatusConfig;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Why a report could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full")]
    Busy,
    #[error("storage unavailable")]
    Unavailable,
}

struct Job {
    report: PreparedReport,
    reply: oneshot::Sender<Result<StoredReport, IngestError>>,
}

/// Handle for submitting reports to the writer.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
}

impl Ingest {
    /// Starts the writer task; it ends when every handle is dropped.
    pub fn start(
        db: Db,
        cache: Arc<StateCache>,
        status_config: SharedStatusConfig,
        batch_max: usize,
        queue_capacity: usize,
        health: IngestHealth,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue_capacity);
        let task = tokio::spawn(run_writer(rx, db, cache, status_config, batch_max, health));
        (Self { tx }, task)
    }

    /// Queues a report and waits until it is committed.
    pub async fn submit(&self, report: PreparedReport) -> Result<StoredReport, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job { report, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => IngestError::Busy,
                mpsc::error::TrySendError::Closed(_) => IngestError::Unavailable,
            })?;
        answer.await.map_err(|_| IngestError::Unavailable)?
    }
}

async fn run_writer(
    mut rx: mpsc::Receiver<Job>,
    db: Db,
    cache: Arc<StateCache>,
    status_config: SharedStatusConfig,
    batch_max: usize,
    health: IngestHealth,
) {
    let mut jobs = Vec::with_capacity(batch_max);
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        // Everything that queued while the previous commit ran goes into this one.
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let reports: Vec<PreparedReport> = jobs.iter().map(|j| j.report.clone()).collect();
        let cfg = status_config.get();
        let mut result = write_batch(&db, &reports, &cfg).await;
        if let Err(err) = &result {
            // A concurrent replica may have created the same VM; a second pass finds it.
            if matches!(
                err,
                DbError::Query(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _
                ))
            ) {
                result = write_batch(&db, &reports, &cfg).await;
            }
        }
        match result {
            Ok(stored) => {
                let mut ids: Vec<i64> = stored.iter().map(|s| s.vm_id).collect();
                ids.sort_unstable();
                ids.dedup();
                refresh_cache(&db, &cache, &ids).await;
                for (job, outcome) in jobs.drain(..).zip(stored) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, reports = jobs.len(), "could not store reports");
                // Heartbeats we could not store must not count against the VMs.
                health.record_failure(crate::now_ms());
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(IngestError::Unavailable));
                }
            }
        }
    }
}

async fn write_batch(
    db: &Db,
    reports: &[PreparedReport],
    cfg: &app::types::StatusConfig,
) -> Result<Vec<StoredReport>, DbError> {
    let (mut conn, _turn) = db.write_conn().await?;
    store::store_reports(&mut conn, reports, cfg).await
}

/// Re-reads the given VMs and writes them to the cache; failures only cost freshness.
pub async fn refresh_cache(db: &Db, cache: &StateCache, ids: &[i64]) {
    if ids.is_empty() {
        return;
    }
    let views = match db.conn().await {
        Ok(mut conn) => store::vms_by_ids(&mut conn, ids).await,
        Err(err) => Err(err),
    };
    match views {
        Ok(views) => cache.put(&views).await,
        Err(err) => tracing::warn!(error = %err, "could not refresh the state cache"),
    }
}
