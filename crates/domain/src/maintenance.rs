//! Maintenance windows and snoozes: when planned work silences notifications and stops
//! automatic power actions for the VMs it covers.

use crate::enums::WindowScope;
use crate::ids::{NodeName, Tag, VmId};
use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use std::str::FromStr;

/// Longest window: a week (a longer silence is turning auto-reset off, not maintenance).
pub const MAX_DURATION_MS: i64 = 7 * 24 * 3_600_000;

/// A recurring start: a five-field cron expression evaluated in UTC.
#[derive(Clone, Debug)]
pub struct Recurrence {
    cron: Cron,
    text: String,
}

impl Recurrence {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The latest start at or before `now_ms`, looking back at most `within_ms`.
    fn latest_start(&self, now_ms: i64, within_ms: i64) -> Option<i64> {
        let now = utc(now_ms)?;
        let start = self.cron.find_previous_occurrence(&now, true).ok()?;
        let start_ms = start.timestamp_millis();
        (now_ms.saturating_sub(start_ms) < within_ms).then_some(start_ms)
    }
}

impl FromStr for Recurrence {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.split_whitespace().count() != 5 {
            return Err(
                "must be five cron fields: minute hour day-of-month month day-of-week".into(),
            );
        }
        let cron = Cron::from_str(text).map_err(|e| format!("not a cron expression: {e}"))?;
        Ok(Recurrence {
            cron,
            text: text.to_owned(),
        })
    }
}

fn utc(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// What a window applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    All,
    Vm(VmId),
    Tag(Tag),
    Node(NodeName),
}

impl Scope {
    /// From the stored kind and value; `None` when they do not make a scope.
    pub fn parse(kind: WindowScope, value: Option<&str>) -> Result<Scope, String> {
        match (kind, value) {
            (WindowScope::All, _) => Ok(Scope::All),
            (WindowScope::Vm, Some(v)) => {
                v.parse().map(Scope::Vm).map_err(|e| format!("VM id {e}"))
            }
            (WindowScope::Tag, Some(v)) => {
                v.parse().map(Scope::Tag).map_err(|e| format!("tag {e}"))
            }
            (WindowScope::Node, Some(v)) => {
                v.parse().map(Scope::Node).map_err(|e| format!("node {e}"))
            }
            (_, None) => Err("this scope needs a value".into()),
        }
    }

    pub fn kind(&self) -> WindowScope {
        match self {
            Scope::All => WindowScope::All,
            Scope::Vm(_) => WindowScope::Vm,
            Scope::Tag(_) => WindowScope::Tag,
            Scope::Node(_) => WindowScope::Node,
        }
    }

    pub fn value(&self) -> Option<String> {
        match self {
            Scope::All => None,
            Scope::Vm(id) => Some(id.to_string()),
            Scope::Tag(tag) => Some(tag.to_string()),
            Scope::Node(node) => Some(node.to_string()),
        }
    }

    fn covers(&self, vm: &Covered<'_>) -> bool {
        match self {
            Scope::All => true,
            Scope::Vm(id) => *id == vm.id,
            Scope::Tag(tag) => vm.tags.contains(tag),
            Scope::Node(node) => vm.node == Some(node),
        }
    }
}

/// When a window is open: once, or from each recurring start for a duration.
#[derive(Clone, Debug)]
pub enum When {
    Once {
        starts_ms: i64,
        ends_ms: i64,
    },
    Every {
        recurrence: Box<Recurrence>,
        duration_ms: i64,
    },
}

/// One maintenance window (a snooze is a window of one VM from now).
#[derive(Clone, Debug)]
pub struct Window {
    pub name: String,
    pub scope: Scope,
    pub when: When,
}

/// The VM a question is about.
#[derive(Clone, Copy, Debug)]
pub struct Covered<'a> {
    pub id: VmId,
    pub tags: &'a [Tag],
    pub node: Option<&'a NodeName>,
}

impl Window {
    /// When the window now open ends, or `None` when it is not open at `now_ms`.
    pub fn open_until(&self, now_ms: i64) -> Option<i64> {
        match &self.when {
            When::Once { starts_ms, ends_ms } => {
                (*starts_ms <= now_ms && now_ms < *ends_ms).then_some(*ends_ms)
            }
            When::Every {
                recurrence,
                duration_ms,
            } => recurrence
                .latest_start(now_ms, *duration_ms)
                .map(|start| start.saturating_add(*duration_ms)),
        }
    }
}

/// The window that covers `vm` at `now_ms` and ends last (its name and end), if any.
pub fn covering<'w>(
    windows: &'w [Window],
    vm: &Covered<'_>,
    now_ms: i64,
) -> Option<(&'w str, i64)> {
    windows
        .iter()
        .filter(|w| w.scope.covers(vm))
        .filter_map(|w| w.open_until(now_ms).map(|end| (w.name.as_str(), end)))
        .max_by_key(|(_, end)| *end)
}

/// How far a recurring window's next start may be: a schedule that never fires (the 30th
/// of February) would otherwise be searched back through every year at each look.
const MAX_RECURRENCE_GAP_MS: i64 = 366 * 24 * 3_600_000;

/// Checks a window's times as an operator entered them, at `now_ms`.
pub fn check_when(when: &When, now_ms: i64) -> Result<(), String> {
    if let When::Every { recurrence, .. } = when {
        let next = utc(now_ms)
            .and_then(|now| recurrence.cron.find_next_occurrence(&now, false).ok())
            .map(|t| t.timestamp_millis());
        if next.is_none_or(|t| t.saturating_sub(now_ms) > MAX_RECURRENCE_GAP_MS) {
            return Err("the schedule must start at least once a year".into());
        }
    }
    match when {
        When::Once { starts_ms, ends_ms } => {
            if ends_ms <= starts_ms {
                return Err("must end after it starts".into());
            }
            if ends_ms.saturating_sub(*starts_ms) > MAX_DURATION_MS {
                return Err("may last at most 7 days".into());
            }
        }
        When::Every { duration_ms, .. } => {
            if *duration_ms <= 0 || *duration_ms > MAX_DURATION_MS {
                return Err("duration must be between 1 minute and 7 days".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    /// 2026-11-28 (a Saturday) 02:30 UTC.
    const SAT_0230: i64 = 1_795_833_000_000;
    const HOUR: i64 = 3_600_000;

    fn once(scope: Scope, starts_ms: i64, ends_ms: i64) -> Window {
        Window {
            name: "w".into(),
            scope,
            when: When::Once { starts_ms, ends_ms },
        }
    }

    fn every(cron: &str, duration_ms: i64) -> Window {
        Window {
            name: "patch night".into(),
            scope: Scope::All,
            when: When::Every {
                recurrence: Box::new(cron.parse().unwrap()),
                duration_ms,
            },
        }
    }

    #[test]
    fn the_fixture_time_is_what_it_says() {
        assert_eq!(
            utc(SAT_0230).unwrap().to_rfc3339(),
            "2026-11-28T02:30:00+00:00"
        );
    }

    #[test]
    fn windows_open_and_close() {
        let tags = ["db".parse::<Tag>().unwrap()];
        let node: NodeName = "pve1".parse().unwrap();
        let vm = Covered {
            id: VmId(7),
            tags: &tags,
            node: Some(&node),
        };
        let table: Vec<(&str, Window, i64, Option<i64>)> = vec![
            ("before a one-off", once(Scope::All, 100, 200), 99, None),
            ("at its start", once(Scope::All, 100, 200), 100, Some(200)),
            ("at its end: closed", once(Scope::All, 100, 200), 200, None),
            ("another VM", once(Scope::Vm(VmId(8)), 100, 200), 150, None),
            (
                "this VM",
                once(Scope::Vm(VmId(7)), 100, 200),
                150,
                Some(200),
            ),
            (
                "its tag",
                once(Scope::Tag("db".parse().unwrap()), 100, 200),
                150,
                Some(200),
            ),
            (
                "another tag",
                once(Scope::Tag("web".parse().unwrap()), 100, 200),
                150,
                None,
            ),
            (
                "its node",
                once(Scope::Node("pve1".parse().unwrap()), 100, 200),
                150,
                Some(200),
            ),
            (
                "another node",
                once(Scope::Node("pve2".parse().unwrap()), 100, 200),
                150,
                None,
            ),
            // Saturdays 02:00 for 2 h: open at 02:30, until 04:00.
            (
                "recurring, inside",
                every("0 2 * * 6", 2 * HOUR),
                SAT_0230,
                Some(SAT_0230 + 90 * 60_000),
            ),
            (
                "recurring, at its end",
                every("0 2 * * 6", 2 * HOUR),
                SAT_0230 + 90 * 60_000,
                None,
            ),
            (
                "recurring, before",
                every("0 2 * * 6", 2 * HOUR),
                SAT_0230 - HOUR,
                None,
            ),
            (
                "recurring, another day",
                every("0 2 * * 1", 2 * HOUR),
                SAT_0230,
                None,
            ),
            (
                "recurring, 20 min",
                every("0 2 * * 6", 20 * 60_000),
                SAT_0230,
                None,
            ),
        ];
        for (what, window, now, open) in table {
            let found = covering(std::slice::from_ref(&window), &vm, now).map(|(_, end)| end);
            assert_eq!(found, open, "{what}");
        }
    }

    #[test]
    fn the_window_ending_last_wins() {
        let vm = Covered {
            id: VmId(7),
            tags: &[],
            node: None,
        };
        let windows = [once(Scope::All, 0, 500), once(Scope::Vm(VmId(7)), 0, 900)];
        assert_eq!(covering(&windows, &vm, 10).map(|(_, e)| e), Some(900));
    }

    #[test]
    fn bad_windows_are_refused() {
        for bad in ["", "* * * *", "0 2 * * 6 2026", "61 * * * *", "every night"] {
            assert!(bad.parse::<Recurrence>().is_err(), "{bad:?}");
        }
        let once = |starts_ms, ends_ms| When::Once { starts_ms, ends_ms };
        assert!(check_when(&once(5, 5), SAT_0230).is_err());
        assert!(check_when(&once(0, MAX_DURATION_MS + 1), SAT_0230).is_err());
        assert!(check_when(&once(0, MAX_DURATION_MS), SAT_0230).is_ok());
        assert!(check_when(&every("0 2 * * 6", 0).when, SAT_0230).is_err());
        assert!(check_when(&every("0 2 * * 6", HOUR).when, SAT_0230).is_ok());
        // The 30th of February never comes: refused, not searched for at every look.
        assert!(check_when(&every("0 0 30 2 *", HOUR).when, SAT_0230).is_err());
        assert!(Scope::parse(WindowScope::Tag, Some("a b")).is_err());
        assert!(Scope::parse(WindowScope::Vm, None).is_err());
        assert_eq!(
            Scope::parse(WindowScope::Node, Some("pve1")).unwrap(),
            Scope::Node("pve1".parse().unwrap())
        );
    }
}
