//! The fleet-wide rails: the mass-staleness breaker and the amnesty after start-up or an
//! outage of our own, during which no VM is reset.

use super::Ctx;
use crate::db::DbError;
use crate::db::incidents;
use crate::health::JobHealth;
use domain::EventKind;
use domain::policy::{self, ClockJump};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

pub struct Guard {
    /// Start of the current amnesty: server start, a pause of ours, or a breaker clearing.
    amnesty_from_ms: AtomicI64,
    last_tick_ms: AtomicI64,
    /// Set when a round saw the clock stepped back, until the stale check takes it.
    stepped_back: AtomicBool,
    storm: Mutex<Option<String>>,
    health: JobHealth,
}

impl Guard {
    pub fn new(now_ms: i64, health: JobHealth) -> Self {
        Self {
            amnesty_from_ms: AtomicI64::new(now_ms),
            last_tick_ms: AtomicI64::new(now_ms),
            stepped_back: AtomicBool::new(false),
            storm: Mutex::new(None),
            health,
        }
    }

    /// A frozen process, a long pause of ours, or the wall clock stepped either way
    /// restarts the amnesty: heartbeat ages measured across the jump mean nothing.
    pub fn note_round(&self, now_ms: i64, stale_timeout_ms: i64) -> ClockJump {
        let previous = self.last_tick_ms.swap(now_ms, Ordering::AcqRel);
        let jump = policy::clock_jump(previous, now_ms, stale_timeout_ms);
        match jump {
            ClockJump::Steady => {}
            ClockJump::Ahead(gap_ms) => {
                self.amnesty_from_ms.store(now_ms, Ordering::Release);
                tracing::warn!(
                    gap_ms,
                    "scheduler was paused or the clock jumped ahead; restarting the amnesty"
                );
            }
            ClockJump::Back(back_ms) => {
                self.amnesty_from_ms.store(now_ms, Ordering::Release);
                self.stepped_back.store(true, Ordering::Release);
                tracing::warn!(
                    back_ms,
                    "the clock was stepped back; restarting the amnesty"
                );
            }
        }
        jump
    }

    pub fn amnesty_from_ms(&self) -> i64 {
        self.amnesty_from_ms.load(Ordering::Acquire)
    }

    /// Whether the clock was stepped back since the last call: whichever loop noticed
    /// first, the stale check brings stored heartbeat times back to the clock.
    pub fn take_step_back(&self) -> bool {
        self.stepped_back.swap(false, Ordering::AcqRel)
    }

    /// No reset before this time: one stale timeout after the latest of start-up, a pause
    /// of ours, a breaker clearing, or a failure to store heartbeats.
    pub fn amnesty_until(&self, stale_timeout_ms: i64) -> i64 {
        self.amnesty_from_ms
            .load(Ordering::Acquire)
            .max(self.health.last_ingest_failure_ms())
            .saturating_add(stale_timeout_ms)
    }

    /// The breaker's reason while it is tripped. A poisoned lock reads as tripped.
    pub fn storm(&self) -> Result<Option<String>, ()> {
        self.storm.lock().map(|s| s.clone()).map_err(|_poisoned| ())
    }

    /// Records the breaker's new state; an event marks each trip and each clearing.
    pub async fn update_storm(
        &self,
        ctx: &Ctx,
        storm: Option<String>,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let previous = self.storm().unwrap_or(None);
        if previous.is_some() != storm.is_some() {
            let mut conn = ctx.db.conn().await?;
            match &storm {
                Some(reason) => {
                    tracing::warn!(%reason, "mass staleness: auto-reset paused");
                    let message = format!("auto-reset paused: {reason}");
                    incidents::insert_event(
                        &mut conn,
                        EventKind::BreakerTripped,
                        None,
                        &message,
                        now_ms,
                    )
                    .await?;
                }
                None => {
                    // VMs still catching up after the storm get one stale timeout to report
                    // before any of them can be reset: the same grace as after start-up.
                    self.amnesty_from_ms.store(now_ms, Ordering::Release);
                    let message = "fleet recovered: auto-reset resumes after one stale timeout";
                    tracing::info!("{message}");
                    incidents::insert_event(
                        &mut conn,
                        EventKind::BreakerReset,
                        None,
                        message,
                        now_ms,
                    )
                    .await?;
                }
            }
        }
        if let Ok(mut s) = self.storm.lock() {
            *s = storm;
        }
        Ok(())
    }
}
