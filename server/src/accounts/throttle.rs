//! Slows password guessing: after too many failures for one account or one address within
//! a window, every attempt for it is refused until the window has passed.

use std::collections::HashMap;
use std::sync::Mutex;

/// Failures allowed per key within the window before attempts are refused.
pub const MAX_FAILURES: u32 = 5;

#[derive(Debug)]
pub struct LoginThrottle {
    window_ms: i64,
    failures: Mutex<HashMap<String, (u32, i64)>>,
}

impl LoginThrottle {
    pub fn new(window_ms: i64) -> Self {
        Self {
            window_ms,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Milliseconds to wait when any of `keys` is locked at `now_ms`, else `None`.
    pub fn locked(&self, keys: &[&str], now_ms: i64) -> Option<i64> {
        let failures = self.failures.lock().ok()?;
        keys.iter()
            .filter_map(|key| failures.get(*key))
            .filter(|(count, first)| *count >= MAX_FAILURES && now_ms < first + self.window_ms)
            .map(|(_, first)| first + self.window_ms - now_ms)
            .max()
    }

    pub fn record_failure(&self, keys: &[&str], now_ms: i64) {
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        // Bounded memory under a spray of names: expired entries go first.
        if failures.len() > 100_000 {
            let window = self.window_ms;
            failures.retain(|_, (_, first)| now_ms < *first + window);
        }
        for key in keys {
            let entry = failures.entry((*key).to_owned()).or_insert((0, now_ms));
            if now_ms >= entry.1 + self.window_ms {
                *entry = (0, now_ms);
            }
            entry.0 = entry.0.saturating_add(1);
        }
    }

    /// A successful login clears the account's count (not the address's).
    pub fn record_success(&self, account_key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(account_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_the_limit_and_opens_after_the_window() {
        let t = LoginThrottle::new(1_000);
        for i in 0..MAX_FAILURES {
            assert_eq!(t.locked(&["u:alice", "ip:1"], 10), None, "attempt {i}");
            t.record_failure(&["u:alice", "ip:1"], 10);
        }
        assert_eq!(t.locked(&["u:alice"], 500), Some(510));
        assert_eq!(t.locked(&["ip:1"], 500), Some(510));
        assert_eq!(t.locked(&["u:bob", "ip:2"], 500), None);
        assert_eq!(t.locked(&["u:alice"], 1_010), None);
        t.record_failure(&["u:alice"], 1_010);
        assert_eq!(
            t.locked(&["u:alice"], 1_011),
            None,
            "a new window starts at one"
        );
        t.record_success("u:alice");
        assert_eq!(t.locked(&["ip:1"], 900), Some(110));
    }
}
