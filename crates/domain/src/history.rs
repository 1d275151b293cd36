//! Metric history: how long each tier is kept, which tier answers a chart, and how partial
//! aggregates of the same points combine.

use crate::enums::ChartRange;
use crate::status::InvalidConfig;
use serde::{Deserialize, Serialize};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// How far back a chart of `range` reaches.
pub fn span_ms(range: ChartRange) -> i64 {
    match range {
        ChartRange::Hour => HOUR_MS,
        ChartRange::Day => DAY_MS,
        ChartRange::Week => 7 * DAY_MS,
        ChartRange::Month => 30 * DAY_MS,
        ChartRange::Year => 365 * DAY_MS,
    }
}

/// Where a chart's points come from: the samples as stored, or a rollup of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Tier {
    Raw,
    Minute,
    Hour,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Raw => "raw",
            Tier::Minute => "minute",
            Tier::Hour => "hour",
        }
    }

    /// The width of one stored row of this tier (a raw sample is a point in time).
    pub fn bucket_ms(self) -> i64 {
        match self {
            Tier::Raw => 0,
            Tier::Minute => MINUTE_MS,
            Tier::Hour => HOUR_MS,
        }
    }

    fn coarser(self) -> Tier {
        match self {
            Tier::Raw => Tier::Minute,
            Tier::Minute | Tier::Hour => Tier::Hour,
        }
    }
}

/// How many days each kind of history is kept (`RETENTION_*_DAYS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub raw_days: i64,
    pub minute_days: i64,
    pub hour_days: i64,
    /// Status changes, events and the reset history.
    pub events_days: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            raw_days: 7,
            minute_days: 30,
            hour_days: 400,
            events_days: 400,
        }
    }
}

/// Longest any history is kept: ten years.
const MAX_DAYS: i64 = 3650;

impl Retention {
    /// Each tier keeps at least as long as the finer one before it, so a chart always has
    /// a tier that still holds its start.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let days = |field: &'static str, value: i64, at_least: i64, what: &str| {
            if (at_least..=MAX_DAYS).contains(&value) {
                Ok(())
            } else {
                Err(InvalidConfig {
                    field,
                    message: format!("must be between {at_least} ({what}) and {MAX_DAYS} days"),
                })
            }
        };
        days("retention_raw_days", self.raw_days, 1, "one day")?;
        days(
            "retention_minute_days",
            self.minute_days,
            self.raw_days,
            "the raw retention",
        )?;
        days(
            "retention_hour_days",
            self.hour_days,
            self.minute_days,
            "the minute retention",
        )?;
        days("retention_events_days", self.events_days, 1, "one day")
    }

    /// The oldest time a tier still holds at `now_ms`.
    pub fn oldest_kept(&self, tier: Tier, now_ms: i64) -> i64 {
        let days = match tier {
            Tier::Raw => self.raw_days,
            Tier::Minute => self.minute_days,
            Tier::Hour => self.hour_days,
        };
        now_ms.saturating_sub(days.saturating_mul(DAY_MS))
    }

    /// The oldest status change, event or history row kept at `now_ms`.
    pub fn oldest_event_kept(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.events_days.saturating_mul(DAY_MS))
    }
}

/// The tier that answers a chart of `points` points between `from_ms` and `to_ms`: the
/// coarsest whose rows are no wider than one point, or a coarser one when it no longer
/// holds `from_ms`.
pub fn pick_tier(from_ms: i64, to_ms: i64, points: i64, now_ms: i64, keep: &Retention) -> Tier {
    let point_ms = to_ms.saturating_sub(from_ms) / points.max(1);
    let mut tier = if point_ms >= HOUR_MS {
        Tier::Hour
    } else if point_ms >= MINUTE_MS {
        Tier::Minute
    } else {
        Tier::Raw
    };
    while tier != Tier::Hour && from_ms < keep.oldest_kept(tier, now_ms) {
        tier = tier.coarser();
    }
    tier
}

/// The points of a chart: the first starts at `start_ms`, each covers `point_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub start_ms: i64,
    pub point_ms: i64,
}

/// At most `points` points over `[from_ms, to_ms]`. For a rollup tier the points are whole
/// rollup rows (start aligned, width a multiple), so a rollup row and the raw samples it
/// was made of always land in the same point.
pub fn grid(from_ms: i64, to_ms: i64, points: i64, tier: Tier) -> Grid {
    let points = points.max(1);
    let row = tier.bucket_ms();
    let start_ms = if row > 0 {
        from_ms - from_ms.rem_euclid(row)
    } else {
        from_ms
    };
    // Saturating: the caller bounds the range, but no input may overflow here.
    let span = to_ms.saturating_sub(start_ms).saturating_add(1);
    let mut point_ms = span.saturating_add(points - 1) / points;
    if row > 0 {
        point_ms = point_ms.saturating_add(row - 1) / row * row;
    }
    Grid {
        start_ms,
        point_ms: point_ms.max(1),
    }
}

/// Min, max and sum of one metric over some samples (`count` of them had a value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Spread {
    /// Two spreads of disjoint samples as one.
    pub fn merge(self, other: Spread) -> Spread {
        if self.count == 0 {
            return other;
        }
        if other.count == 0 {
            return self;
        }
        Spread {
            count: self.count + other.count,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
            sum: self.sum + other.sum,
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / crate::status::approx_f64(self.count))
    }
}

/// One chart point's aggregates, from raw samples, a rollup, or both.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PointAggregate {
    /// Earliest time the point covers that held a sample.
    pub t_ms: i64,
    pub cpu: Spread,
    pub ram: Spread,
    /// The fullest disk; counts only samples that reported disks.
    pub disk: Spread,
    pub uptime_max: i64,
}

impl PointAggregate {
    pub fn merge(self, other: PointAggregate) -> PointAggregate {
        PointAggregate {
            t_ms: self.t_ms.min(other.t_ms),
            cpu: self.cpu.merge(other.cpu),
            ram: self.ram.merge(other.ram),
            disk: self.disk.merge(other.disk),
            uptime_max: self.uptime_max.max(other.uptime_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn pick_tier_table() {
        let keep = Retention::default();
        let cases = [
            ("1 hour", HOUR_MS, 300, Tier::Raw),
            ("24 hours", DAY_MS, 300, Tier::Minute),
            ("24 hours at 10 points", DAY_MS, 10, Tier::Hour),
            ("7 days", 7 * DAY_MS, 300, Tier::Minute),
            ("30 days", 30 * DAY_MS, 300, Tier::Hour),
            ("1 year", 365 * DAY_MS, 300, Tier::Hour),
            // Raw samples are gone after 7 days: an hour-long chart from 8 days ago reads minutes.
            ("1 hour, 8 days ago", HOUR_MS, 300, Tier::Minute),
            // Minute rollups are gone after 30 days.
            ("1 hour, 40 days ago", HOUR_MS, 300, Tier::Hour),
        ];
        for (name, span, points, expected) in cases {
            let to = match name {
                n if n.ends_with("8 days ago") => NOW - 8 * DAY_MS,
                n if n.ends_with("40 days ago") => NOW - 40 * DAY_MS,
                _ => NOW,
            };
            let tier = pick_tier(to - span, to, points, NOW, &keep);
            assert_eq!(tier, expected, "{name}");
        }
    }

    #[test]
    fn grids_align_to_the_tier_and_never_exceed_the_points() {
        let cases = [
            (NOW - DAY_MS, NOW, 288, Tier::Raw),
            (NOW - DAY_MS + 12_345, NOW, 288, Tier::Minute),
            (NOW - 30 * DAY_MS + 7, NOW, 300, Tier::Hour),
            (NOW - 365 * DAY_MS, NOW, 2000, Tier::Hour),
            (NOW - HOUR_MS, NOW, 1, Tier::Minute),
            (NOW - 10, NOW, 2000, Tier::Raw),
        ];
        for (from, to, points, tier) in cases {
            let g = grid(from, to, points, tier);
            assert!(g.start_ms <= from, "{g:?}");
            let needed = (to - g.start_ms) / g.point_ms + 1;
            assert!(needed <= points, "{tier:?} {points}: {g:?} needs {needed}");
            if tier != Tier::Raw {
                assert_eq!(g.start_ms % tier.bucket_ms(), 0, "{g:?}");
                assert_eq!(g.point_ms % tier.bucket_ms(), 0, "{g:?}");
            }
        }
        assert_eq!(
            grid(NOW - DAY_MS, NOW, 288, Tier::Raw).start_ms,
            NOW - DAY_MS
        );
    }

    #[test]
    fn retention_is_checked() {
        assert_eq!(Retention::default().validate(), Ok(()));
        let bad = [
            (
                Retention {
                    raw_days: 0,
                    ..Retention::default()
                },
                "retention_raw_days",
            ),
            (
                Retention {
                    raw_days: 40,
                    ..Retention::default()
                },
                "retention_minute_days",
            ),
            (
                Retention {
                    hour_days: 10,
                    ..Retention::default()
                },
                "retention_hour_days",
            ),
            (
                Retention {
                    hour_days: 4000,
                    ..Retention::default()
                },
                "retention_hour_days",
            ),
            (
                Retention {
                    events_days: 0,
                    ..Retention::default()
                },
                "retention_events_days",
            ),
        ];
        for (keep, field) in bad {
            assert_eq!(keep.validate().map_err(|e| e.field), Err(field), "{keep:?}");
        }
        let keep = Retention::default();
        assert_eq!(keep.oldest_kept(Tier::Raw, NOW), NOW - 7 * DAY_MS);
        assert_eq!(keep.oldest_event_kept(NOW), NOW - 400 * DAY_MS);
    }

    #[test]
    fn partial_aggregates_merge_exactly() {
        let a = Spread {
            count: 2,
            min: 1.0,
            max: 5.0,
            sum: 6.0,
        };
        let b = Spread {
            count: 1,
            min: 9.0,
            max: 9.0,
            sum: 9.0,
        };
        let empty = Spread {
            count: 0,
            min: 0.0,
            max: 0.0,
            sum: 0.0,
        };
        let both = a.merge(b);
        assert_eq!((both.count, both.min, both.max), (3, 1.0, 9.0));
        assert_eq!(both.avg(), Some(5.0));
        // An empty spread's placeholder values never win a min or max.
        assert_eq!(empty.merge(b), b);
        assert_eq!(a.merge(empty), a);
        assert_eq!(empty.avg(), None);
    }
}
