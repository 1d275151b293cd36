//! Slows password guessing: after too many failed sign-ins for one account or one address
//! within a window, every attempt for it is refused until the window has passed.
//!
//! An attempt is counted when it starts (check and count are one step), so parallel
//! guesses cannot all slip past the check; a success gives its count back.

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

    /// Counts an attempt for every key, unless one of them is locked: then the wait in ms.
    pub fn begin(&self, keys: &[&str], now_ms: i64) -> Result<(), i64> {
        let Ok(mut failures) = self.failures.lock() else {
            return Err(self.window_ms);
        };
        let window = self.window_ms;
        let locked = keys
            .iter()
            .filter_map(|key| failures.get(*key))
            .filter(|(count, first)| *count >= MAX_FAILURES && now_ms < first + window)
            .map(|(_, first)| first + window - now_ms)
            .max();
        if let Some(wait) = locked {
            return Err(wait);
        }
        if failures.len() > 100_000 {
            failures.retain(|_, (_, first)| now_ms < *first + window);
        }
        for key in keys {
            let entry = failures.entry((*key).to_owned()).or_insert((0, now_ms));
            if now_ms >= entry.1 + window {
                *entry = (0, now_ms);
            }
            entry.0 = entry.0.saturating_add(1);
        }
        Ok(())
    }

    /// A sign-in that succeeded: the account starts afresh, the address gets its count back.
    pub fn succeeded(&self, account_key: &str, address_key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(account_key);
            if let Some(entry) = failures.get_mut(address_key) {
                entry.0 = entry.0.saturating_sub(1);
            }
        }
    }

    /// True the first time `key` is seen in a window (for one log entry per window).
    pub fn first_refusal(&self, key: &str, now_ms: i64) -> bool {
        let Ok(mut failures) = self.failures.lock() else {
            return false;
        };
        let window = self.window_ms;
        match failures.get_mut(key) {
            Some(entry) if now_ms < entry.1 + window => false,
            _ => {
                failures.insert(key.to_owned(), (0, now_ms));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_when_they_start() {
        let t = LoginThrottle::new(1_000);
        // Five attempts in flight at once: the sixth is refused before any has finished.
        for _ in 0..MAX_FAILURES {
            assert_eq!(t.begin(&["u:a", "ip:1"], 0), Ok(()));
        }
        assert_eq!(t.begin(&["u:a", "ip:1"], 1), Err(999));
        // A success gives the address its attempt back and clears the account.
        let t = LoginThrottle::new(1_000);
        for _ in 0..MAX_FAILURES {
            assert_eq!(t.begin(&["u:a", "ip:1"], 0), Ok(()));
            t.succeeded("u:a", "ip:1");
        }
        assert_eq!(t.begin(&["u:a", "ip:1"], 1), Ok(()));
    }

    #[test]
    fn locks_after_the_limit_and_opens_after_the_window() {
        let t = LoginThrottle::new(1_000);
        for i in 0..MAX_FAILURES {
            assert_eq!(t.begin(&["u:alice", "ip:1"], 10), Ok(()), "attempt {i}");
        }
        assert_eq!(t.begin(&["u:alice"], 500), Err(510));
        assert_eq!(t.begin(&["ip:1"], 500), Err(510));
        assert_eq!(t.begin(&["u:bob", "ip:2"], 500), Ok(()));
        assert_eq!(
            t.begin(&["u:alice"], 1_010),
            Ok(()),
            "a new window starts at one"
        );
        assert!(t.first_refusal("audit:x", 0));
        assert!(!t.first_refusal("audit:x", 999));
        assert!(t.first_refusal("audit:x", 1_000));
    }
}
