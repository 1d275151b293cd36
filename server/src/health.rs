//! Liveness of the background jobs, shared between them and reported by `/api/health`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// When each job last did its work (epoch ms, 0 = never).
#[derive(Clone, Default)]
pub struct JobHealth(Arc<Marks>);

#[derive(Default)]
struct Marks {
    ingest_failure_ms: AtomicI64,
    writer_commit_ms: AtomicI64,
    scheduler_round_ms: AtomicI64,
    scheduler_round_took_ms: AtomicI64,
    restarts: AtomicI64,
}

impl JobHealth {
    /// Heartbeats could not be stored: they must not count against the VMs (amnesty).
    pub fn record_ingest_failure(&self, now_ms: i64) {
        self.0.ingest_failure_ms.store(now_ms, Ordering::Release);
    }

    pub fn last_ingest_failure_ms(&self) -> i64 {
        self.0.ingest_failure_ms.load(Ordering::Acquire)
    }

    pub fn record_commit(&self, now_ms: i64) {
        self.0.writer_commit_ms.store(now_ms, Ordering::Release);
    }

    pub fn last_commit_ms(&self) -> i64 {
        self.0.writer_commit_ms.load(Ordering::Acquire)
    }

    /// A scheduler round ended at `now_ms` after `took` (stale check, remediation, cache).
    pub fn record_round(&self, now_ms: i64, took: std::time::Duration) {
        let took_ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
        self.0
            .scheduler_round_took_ms
            .store(took_ms, Ordering::Release);
        self.0.scheduler_round_ms.store(now_ms, Ordering::Release);
    }

    /// How long the last scheduler round took, in milliseconds.
    pub fn last_round_took_ms(&self) -> i64 {
        self.0.scheduler_round_took_ms.load(Ordering::Acquire)
    }

    pub fn last_round_ms(&self) -> i64 {
        self.0.scheduler_round_ms.load(Ordering::Acquire)
    }

    /// A supervised job panicked and was started again.
    pub fn record_restart(&self) {
        self.0.restarts.fetch_add(1, Ordering::AcqRel);
    }

    pub fn restarts(&self) -> i64 {
        self.0.restarts.load(Ordering::Acquire)
    }
}
