//! Human-readable formatting of sizes, durations and ages for the dashboard.

/// Formats a byte count with binary units, e.g. `1.5 GiB`.
pub fn bytes(value: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = value.max(0);
    if value < 1024 {
        return format!("{value} B");
    }
    let mut scaled = domain::status::approx_f64(value);
    let mut shown = "B";
    for unit in UNITS {
        if scaled < 1024.0 {
            break;
        }
        scaled /= 1024.0;
        shown = unit;
    }
    format!("{scaled:.1} {shown}")
}

/// Formats a duration in seconds as the two most significant units, e.g. `3d 4h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (days, hours, minutes) = (s / 86_400, (s % 86_400) / 3_600, (s % 3_600) / 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

/// Formats how long ago `then_ms` was, relative to `now_ms`.
pub fn age(then_ms: i64, now_ms: i64) -> String {
    let seconds = (now_ms - then_ms).max(0) / 1000;
    format!("{} ago", duration(seconds))
}

/// The time left until an announced action: "in 23s", or "now" once it is due.
pub fn countdown(at_ms: i64, now_ms: i64) -> String {
    let seconds = (at_ms - now_ms).max(0).saturating_add(999) / 1000;
    if seconds == 0 {
        "action due now".into()
    } else {
        format!("action in {}", duration(seconds))
    }
}

/// Formats `part` of `whole` as a percentage, or a dash when unknown.
pub fn percent_of(part: Option<i64>, whole: Option<i64>) -> Option<f64> {
    match (part, whole) {
        (Some(p), Some(w)) if w > 0 => Some(domain::status::percent_of(p, w)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_bytes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8 * 1024 * 1024 * 1024), "8.0 GiB");
        assert_eq!(bytes(-4), "0 B");
    }

    #[test]
    fn formats_durations_and_ages() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(125), "2m 5s");
        assert_eq!(duration(3 * 3600 + 60), "3h 1m");
        assert_eq!(duration(2 * 86_400 + 5 * 3600), "2d 5h");
        assert_eq!(age(1_000, 61_000), "1m 0s ago");
        assert_eq!(countdown(31_000, 1_000), "action in 30s");
        assert_eq!(countdown(1_500, 1_000), "action in 1s");
        assert_eq!(countdown(1_000, 5_000), "action due now");
    }

    #[test]
    fn percent_needs_a_positive_whole() {
        assert_eq!(percent_of(Some(50), Some(200)), Some(25.0));
        assert_eq!(percent_of(Some(50), Some(0)), None);
        assert_eq!(percent_of(None, Some(10)), None);
    }
}
