//! Liveness of the background jobs and their measurements, shared between them and
//! reported by `/api/health` and `/metrics`.

use domain::enums::{AttemptOutcome, PowerAction};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// When each job last did its work (epoch ms, 0 = never), and how it went.
#[derive(Clone, Default)]
pub struct JobHealth(Arc<Marks>);

#[derive(Default)]
struct Marks {
    ingest_failure_ms: AtomicI64,
    writer_commit_ms: AtomicI64,
    scheduler_round_ms: AtomicI64,
    scheduler_round_took_ms: AtomicI64,
    notifier_pass_ms: AtomicI64,
    restarts: AtomicI64,
    measured: Measured,
}

/// What happened to a report handed to the writer.
#[derive(Clone, Copy, Debug)]
pub enum ReportResult {
    Stored,
    /// The queue was full: answered 503 with Retry-After.
    Shed,
    /// Refused for the report's own reasons (unknown credential, a claimed identity...).
    Refused,
    /// Storage failed: answered 503.
    Failed,
}

impl ReportResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Shed => "shed",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// Counters and histograms of this process, in Prometheus' terms (per replica; sum them).
struct Measured {
    reports: Family<Labels, Counter>,
    stored: Counter,
    shed: Counter,
    refused: Counter,
    failed: Counter,
    batch_reports: Histogram,
    commit_seconds: Histogram,
    round_seconds: Histogram,
    power_actions: Family<Labels, Counter>,
    notifications: Family<Labels, Counter>,
}

impl Default for Measured {
    fn default() -> Self {
        let reports: Family<Labels, Counter> = Family::default();
        let of = |result: ReportResult| {
            reports
                .get_or_create(&vec![("result", result.as_str())])
                .clone()
        };
        Self {
            stored: of(ReportResult::Stored),
            shed: of(ReportResult::Shed),
            refused: of(ReportResult::Refused),
            failed: of(ReportResult::Failed),
            reports,
            // 1, 2, 4 ... 4,096 reports.
            batch_reports: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 0.5 ms ... about 8 s.
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            round_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            power_actions: Family::default(),
            notifications: Family::default(),
        }
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl JobHealth {
    /// A report handed to the writer ended so.
    pub fn record_report(&self, result: ReportResult) {
        // On the heartbeat path: the counters are looked up once, not per report.
        let m = &self.0.measured;
        let counter = match result {
            ReportResult::Stored => &m.stored,
            ReportResult::Shed => &m.shed,
            ReportResult::Refused => &m.refused,
            ReportResult::Failed => &m.failed,
        };
        counter.inc();
    }

    /// The writer committed a batch of `reports` in `took`.
    pub fn record_batch(&self, reports: usize, took: Duration) {
        let m = &self.0.measured;
        m.batch_reports
            .observe(f64::from(u32::try_from(reports).unwrap_or(u32::MAX)));
        m.commit_seconds.observe(seconds(took));
    }

    /// A power action's attempt ended with `outcome` (sent, then followed to its end).
    pub fn record_power_action(&self, action: PowerAction, outcome: AttemptOutcome) {
        self.0
            .measured
            .power_actions
            .get_or_create(&vec![
                ("action", action.as_str()),
                ("outcome", outcome.as_str()),
            ])
            .inc();
    }

    /// A notification delivery attempt ended.
    pub fn record_notification(&self, delivered: bool) {
        let result = if delivered { "delivered" } else { "failed" };
        self.0
            .measured
            .notifications
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// Registers this process's counters and histograms (shared, not copied) for one scrape.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.0.measured;
        registry.register(
            "vmhc_reports",
            "Reports handed to the ingest writer, by result",
            m.reports.clone(),
        );
        registry.register(
            "vmhc_ingest_batch_reports",
            "Reports per committed batch",
            m.batch_reports.clone(),
        );
        registry.register(
            "vmhc_ingest_commit_seconds",
            "Time to commit one batch of reports",
            m.commit_seconds.clone(),
        );
        registry.register(
            "vmhc_scheduler_round_seconds",
            "Time one scheduler round took (stale check, remediation, cache)",
            m.round_seconds.clone(),
        );
        registry.register(
            "vmhc_power_actions",
            "Power actions this process sent and followed to their end, by action and outcome",
            m.power_actions.clone(),
        );
        registry.register(
            "vmhc_notification_deliveries",
            "Notification delivery attempts, by result",
            m.notifications.clone(),
        );
    }

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
        self.0.measured.round_seconds.observe(seconds(took));
    }

    /// How long the last scheduler round took, in milliseconds.
    pub fn last_round_took_ms(&self) -> i64 {
        self.0.scheduler_round_took_ms.load(Ordering::Acquire)
    }

    pub fn last_round_ms(&self) -> i64 {
        self.0.scheduler_round_ms.load(Ordering::Acquire)
    }

    /// The notifier finished a pass (read, queued, committed) at `now_ms`.
    pub fn record_notifier_pass(&self, now_ms: i64) {
        self.0.notifier_pass_ms.store(now_ms, Ordering::Release);
    }

    pub fn last_notifier_pass_ms(&self) -> i64 {
        self.0.notifier_pass_ms.load(Ordering::Acquire)
    }

    /// A supervised job panicked and was started again.
    pub fn record_restart(&self) {
        self.0.restarts.fetch_add(1, Ordering::AcqRel);
    }

    pub fn restarts(&self) -> i64 {
        self.0.restarts.load(Ordering::Acquire)
    }
}
