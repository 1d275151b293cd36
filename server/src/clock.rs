//! Time as the jobs see it: the system clock in production, a manual one in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How far the fault suite stepped this process's wall clock; zero in production.
static WALL_STEP_MS: AtomicI64 = AtomicI64::new(0);

/// Steps the wall clock every part of this process reads by `ms` (negative: back), as a
/// step of the host's clock would, leaving the monotonic timers alone. A test hook: the
/// fault suite proves a stepped clock turns nothing down and hides no hung VM.
#[doc(hidden)]
pub fn step_wall_clock(ms: i64) {
    WALL_STEP_MS.fetch_add(ms, Ordering::AcqRel);
}

pub(crate) fn wall_step_ms() -> i64 {
    WALL_STEP_MS.load(Ordering::Acquire)
}

/// A source of "now" and of waiting, so the engine can be driven without the wall clock.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Waits `duration` of this clock's time.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The operating system's clock and tokio's timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::now_ms()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that moves only when told to; `sleep` advances it instead of waiting.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(now_ms)))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::AcqRel);
    }

    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        self.advance(ms);
        Box::pin(tokio::task::yield_now())
    }
}
