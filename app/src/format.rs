//! Human-readable formatting of sizes, durations, ages and decimals for the dashboard.

use std::fmt;

/// `.0` with `.1` digits after the point (at most 3), rounded half away from zero; not a
/// finite number prints as 0. Integer arithmetic: the standard library's float formatting
/// would add about 15 KB to the browser bundle.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub f64, pub u8);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decimals = u32::from(self.1.min(3));
        let scale = 10_i64.pow(decimals);
        let scaled = if self.0.is_finite() {
            (self.0 * domain::status::approx_f64(scale)).round()
        } else {
            0.0
        };
        // Clamped first, so the conversion is exact for every value that reaches it.
        #[expect(clippy::as_conversions, reason = "a rounded, clamped f64 to i64")]
        let n = scaled.clamp(-9.0e15, 9.0e15) as i64;
        let sign = if n < 0 { "-" } else { "" };
        let n = n.unsigned_abs();
        let scale = scale.unsigned_abs();
        if decimals == 0 {
            write!(f, "{sign}{n}")
        } else {
            let width = usize::try_from(decimals).unwrap_or(1);
            write!(f, "{sign}{}.{:0width$}", n / scale, n % scale)
        }
    }
}

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
    format!("{} {shown}", Fixed(scaled, 1))
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
    fn fixed_decimals_round_half_away_from_zero() {
        let cases = [
            (0.0, 1, "0.0"),
            (0.04, 1, "0.0"),
            (0.05, 1, "0.1"),
            (0.95, 1, "1.0"),
            (1.25, 1, "1.3"),
            (12.345, 1, "12.3"),
            (99.99, 1, "100.0"),
            (1234.5, 0, "1235"),
            (-2.5, 1, "-2.5"),
            (-0.04, 1, "0.0"),
            (80.0, 0, "80"),
            (1.005, 3, "1.005"),
            (f64::NAN, 1, "0.0"),
            (f64::INFINITY, 0, "0"),
        ];
        for (value, decimals, shown) in cases {
            assert_eq!(Fixed(value, decimals).to_string(), shown, "{value}");
        }
    }

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
