//! Notifications: which happenings become which messages, which rules they reach, and what
//! the message says. The server finds the happenings and delivers; the choices are here.

use crate::enums::{EventKind, NotifyKind, VmStatus};
use crate::ids::{NodeName, Tag, VmId};
use serde::{Deserialize, Serialize};

/// Longest repeat interval for still-down reminders: a week.
pub const MAX_REPEAT_MS: i64 = 7 * 24 * 3_600_000;
/// Shortest: five minutes (a reminder every scheduler round would be a flood).
pub const MIN_REPEAT_MS: i64 = 5 * 60_000;

/// Where one kind of happening goes: a channel, filtered by kind and tag.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub id: i64,
    pub channel_id: i64,
    /// Empty: every kind.
    pub kinds: Vec<NotifyKind>,
    /// Only VMs with this tag (fleet-wide happenings then never match).
    pub tag: Option<Tag>,
    /// Reminders while a VM stays down, this often.
    pub repeat_ms: Option<i64>,
}

impl Rule {
    /// Whether a happening of `kind`, about a VM with `vm_tags` (`None`: not about one VM),
    /// goes to this rule's channel.
    pub fn wants(&self, kind: NotifyKind, vm_tags: Option<&[Tag]>) -> bool {
        // A test is addressed to a channel, not routed.
        if kind == NotifyKind::Test {
            return false;
        }
        let kind_ok = self.kinds.is_empty()
            || self.kinds.contains(&kind)
            || (kind == NotifyKind::StillDown && self.kinds.contains(&NotifyKind::VmDown))
            || (kind == NotifyKind::NodeUnreachable && self.kinds.contains(&NotifyKind::VmDown));
        let tag_ok = match (&self.tag, vm_tags) {
            (None, _) => true,
            (Some(tag), Some(tags)) => tags.contains(tag),
            (Some(_), None) => false,
        };
        kind_ok && tag_ok
    }
}

/// What a VM's status change tells, if anything.
pub fn from_status_change(from: VmStatus, to: VmStatus) -> Option<NotifyKind> {
    match (from, to) {
        (f, VmStatus::Down) if f != VmStatus::Down => Some(NotifyKind::VmDown),
        (VmStatus::Down, VmStatus::Healthy | VmStatus::Warning) => Some(NotifyKind::VmRecovered),
        (VmStatus::Healthy | VmStatus::Unknown, VmStatus::Warning) => {
            Some(NotifyKind::WarningEntered)
        }
        (VmStatus::Warning, VmStatus::Healthy) => Some(NotifyKind::WarningLeft),
        _ => None,
    }
}

/// What a recorded event tells, if anything.
pub fn from_event(kind: EventKind) -> Option<NotifyKind> {
    match kind {
        EventKind::BreakerTripped => Some(NotifyKind::BreakerTripped),
        EventKind::BreakerReset => Some(NotifyKind::BreakerCleared),
        EventKind::IdentityClaim | EventKind::EnrolmentRefused => {
            Some(NotifyKind::LinkClaimRefused)
        }
        EventKind::AgentSilent => Some(NotifyKind::AgentSilent),
        EventKind::GuestFault => Some(NotifyKind::GuestFault),
        EventKind::LatchedManual => Some(NotifyKind::LatchedManual),
        EventKind::UnexpectedReboot => Some(NotifyKind::UnexpectedReboot),
        EventKind::ProxmoxUnreachable => Some(NotifyKind::ProxmoxUnreachable),
        EventKind::ProxmoxRestored => Some(NotifyKind::ProxmoxRestored),
        EventKind::GuestBack | EventKind::ResetHeld => None,
    }
}

/// Failed Proxmox reads in a row before the monitor says its connection is failing: one
/// blip (a proxy restarting, a node rebooting) is not worth waking anyone.
pub const PROXMOX_FAILURES_TOLD: u32 = 3;

/// The monitor's own Proxmox connection, as its periodic reads of the cluster found it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// Failed reads in a row.
    pub failures: u32,
    /// Whether its failure was recorded (and so its return must be).
    pub told: bool,
}

impl Connection {
    /// After a read that `succeeded`: the new state, and the event to record if any.
    pub fn after(self, succeeded: bool) -> (Connection, Option<EventKind>) {
        if succeeded {
            let event = self.told.then_some(EventKind::ProxmoxRestored);
            return (Connection::default(), event);
        }
        let failures = self.failures.saturating_add(1);
        let tell = !self.told && failures >= PROXMOX_FAILURES_TOLD;
        let next = Connection {
            failures,
            told: self.told || tell,
        };
        (next, tell.then_some(EventKind::ProxmoxUnreachable))
    }
}

/// A message that may only follow another on the same rule and VM: a recovery only after
/// its down was told (no "recovered" out of the blue), a warning's end only after its start.
pub fn requires(kind: NotifyKind) -> Option<NotifyKind> {
    match kind {
        NotifyKind::VmRecovered => Some(NotifyKind::VmDown),
        NotifyKind::WarningLeft => Some(NotifyKind::WarningEntered),
        _ => None,
    }
}

/// The pair a kind belongs to, for `requires`: the newest of these on a rule and VM decides.
pub fn pair_of(kind: NotifyKind) -> &'static [NotifyKind] {
    match kind {
        NotifyKind::VmDown | NotifyKind::VmRecovered => {
            &[NotifyKind::VmDown, NotifyKind::VmRecovered]
        }
        NotifyKind::WarningEntered | NotifyKind::WarningLeft => {
            &[NotifyKind::WarningEntered, NotifyKind::WarningLeft]
        }
        _ => &[],
    }
}

/// The VM a message is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AboutVm {
    pub id: VmId,
    pub hostname: String,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub node: Option<NodeName>,
    pub status: VmStatus,
}

/// One message as every channel renders it; the webhook sends it as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Message {
    pub kind: NotifyKind,
    pub title: String,
    pub text: String,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub vm: Option<AboutVm>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub node: Option<NodeName>,
    /// When it happened (epoch ms).
    pub at_ms: i64,
}

impl Message {
    /// A message about `vm`; `detail` is what the server recorded (a reason, an error).
    pub fn about_vm(kind: NotifyKind, vm: AboutVm, detail: &str, at_ms: i64) -> Message {
        let host = &vm.hostname;
        let title = match kind {
            NotifyKind::VmDown => format!("{host} is down"),
            NotifyKind::VmRecovered => format!("{host} recovered"),
            NotifyKind::WarningEntered => format!("{host} is in warning"),
            NotifyKind::WarningLeft => format!("{host} is no longer in warning"),
            NotifyKind::PowerActionSent => format!("{host}: power action sent"),
            NotifyKind::PowerActionSucceeded => format!("{host}: power action done"),
            NotifyKind::PowerActionFailed => format!("{host}: power action failed"),
            NotifyKind::LatchedManual => format!("{host} needs a person"),
            NotifyKind::UnexpectedReboot => format!("{host} rebooted unexpectedly"),
            NotifyKind::LinkClaimRefused => format!("{host}: identity claim refused"),
            NotifyKind::AgentSilent => format!("{host}: agent silent, guest alive"),
            NotifyKind::GuestFault => format!("{host}: guest fault"),
            NotifyKind::StillDown => format!("{host} is still down"),
            NotifyKind::BreakerTripped
            | NotifyKind::BreakerCleared
            | NotifyKind::NodeUnreachable
            | NotifyKind::ProxmoxUnreachable
            | NotifyKind::ProxmoxRestored
            | NotifyKind::Test => format!("{host}: {kind}"),
        };
        Message {
            kind,
            title,
            text: detail.to_owned(),
            node: vm.node.clone(),
            vm: Some(vm),
            at_ms,
        }
    }

    /// A fleet-wide message (breaker, a test).
    pub fn fleet(kind: NotifyKind, detail: &str, at_ms: i64) -> Message {
        let title = match kind {
            NotifyKind::BreakerTripped => "Automatic resets paused: too many VMs stale at once",
            NotifyKind::BreakerCleared => "Automatic resets resume",
            NotifyKind::Test => "Test notification from vm-healthcheck",
            NotifyKind::ProxmoxUnreachable => "Proxmox unreachable: no power action can be sent",
            NotifyKind::ProxmoxRestored => "Proxmox reachable again",
            _ => "vm-healthcheck",
        };
        Message {
            kind,
            title: title.to_owned(),
            text: detail.to_owned(),
            vm: None,
            node: None,
            at_ms,
        }
    }

    /// One message for a node whose VMs all went down together.
    pub fn node_unreachable(node: &NodeName, hosts: &[String], at_ms: i64) -> Message {
        let shown: Vec<&str> = hosts.iter().take(20).map(String::as_str).collect();
        let more = hosts.len().saturating_sub(shown.len());
        let mut text = format!(
            "All {} VMs of node {node} went down: {}",
            hosts.len(),
            shown.join(", ")
        );
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        Message {
            kind: NotifyKind::NodeUnreachable,
            title: format!("Node {node} unreachable"),
            text,
            vm: None,
            node: Some(node.clone()),
            at_ms,
        }
    }
}

/// Nodes of this batch's downs whose every VM is down (and that hold at least two): their
/// downs are told as one node message. `downs` are (VM, node) of this batch; `fleet` is,
/// per node, (VMs, VMs down now).
pub fn unreachable_nodes<'a>(
    downs: &'a [(VmId, Option<NodeName>)],
    fleet: &[(NodeName, u64, u64)],
) -> Vec<&'a NodeName> {
    let mut nodes: Vec<&NodeName> = downs.iter().filter_map(|(_, n)| n.as_ref()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
        .into_iter()
        .filter(|node| {
            fleet
                .iter()
                .any(|(n, total, down)| n == *node && *total >= 2 && down >= total)
        })
        .collect()
}

/// How long a gap in ids may wait for the transaction that holds it.
pub const GAP_WAIT_MS: i64 = 30_000;

/// How many of `rows` (id and time, read in id order after `cursor`) may be consumed now.
/// An id is taken when a row is inserted but seen only when its transaction commits, so a
/// gap may be a row still to come: reading stops before a gap younger than `GAP_WAIT_MS`
/// (an older one is a rolled-back transaction, and is passed).
pub fn consumable(cursor: i64, rows: &[(i64, i64)], now_ms: i64) -> usize {
    let mut expected = cursor.saturating_add(1);
    for (taken, (id, at_ms)) in rows.iter().enumerate() {
        if *id != expected && now_ms.saturating_sub(*at_ms) < GAP_WAIT_MS {
            return taken;
        }
        expected = id.saturating_add(1);
    }
    rows.len()
}

/// The next try after `attempts` failed ones: doubling from `base_ms`, at most an hour;
/// `None` once `max_attempts` are used (the message is then a dead letter).
pub fn retry_after(attempts: u32, base_ms: i64, max_attempts: u32) -> Option<i64> {
    if attempts >= max_attempts {
        return None;
    }
    let factor = 1i64
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(i64::MAX);
    Some(base_ms.saturating_mul(factor).min(3_600_000))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn rule(kinds: &[NotifyKind], tag: Option<&str>) -> Rule {
        Rule {
            id: 1,
            channel_id: 1,
            kinds: kinds.to_vec(),
            tag: tag.map(|t| t.parse().unwrap()),
            repeat_ms: None,
        }
    }

    #[test]
    fn proxmox_connection_table() {
        let fresh = Connection::default();
        let told = Connection {
            failures: PROXMOX_FAILURES_TOLD,
            told: true,
        };
        // (state, read succeeded) -> (failures after, told after, event)
        let cases = [
            (fresh, true, 0, false, None),
            (fresh, false, 1, false, None),
            (
                Connection {
                    failures: PROXMOX_FAILURES_TOLD - 1,
                    told: false,
                },
                false,
                PROXMOX_FAILURES_TOLD,
                true,
                Some(EventKind::ProxmoxUnreachable),
            ),
            // Told once, however long it lasts.
            (told, false, PROXMOX_FAILURES_TOLD + 1, true, None),
            (told, true, 0, false, Some(EventKind::ProxmoxRestored)),
            // A blip that was never told ends silently: no "restored" out of the blue.
            (
                Connection {
                    failures: 2,
                    told: false,
                },
                true,
                0,
                false,
                None,
            ),
        ];
        for (state, ok, failures, now_told, event) in cases {
            let (next, got) = state.after(ok);
            assert_eq!(
                (next.failures, next.told, got),
                (failures, now_told, event),
                "{state:?} after ok={ok}"
            );
        }
        let mut state = fresh;
        let mut events = Vec::new();
        for ok in [false, false, false, false, true, false] {
            let (next, event) = state.after(ok);
            state = next;
            events.extend(event);
        }
        assert_eq!(
            events,
            [EventKind::ProxmoxUnreachable, EventKind::ProxmoxRestored]
        );
    }

    #[test]
    fn routing_table() {
        let db: Vec<Tag> = vec!["db".parse().unwrap()];
        let web: Vec<Tag> = vec!["web".parse().unwrap()];
        use NotifyKind::*;
        type Case<'a> = (&'a str, Rule, NotifyKind, Option<&'a [Tag]>, bool);
        let table: Vec<Case> = vec![
            ("everything", rule(&[], None), VmDown, Some(&web), true),
            (
                "fleet-wide to an unfiltered rule",
                rule(&[], None),
                BreakerTripped,
                None,
                true,
            ),
            ("its kind", rule(&[VmDown], None), VmDown, Some(&web), true),
            (
                "another kind",
                rule(&[VmDown], None),
                WarningEntered,
                Some(&web),
                false,
            ),
            (
                "reminders follow downs",
                rule(&[VmDown], None),
                StillDown,
                Some(&web),
                true,
            ),
            (
                "node messages follow downs",
                rule(&[VmDown], None),
                NodeUnreachable,
                None,
                true,
            ),
            ("its tag", rule(&[], Some("db")), VmDown, Some(&db), true),
            (
                "another tag",
                rule(&[], Some("db")),
                VmDown,
                Some(&web),
                false,
            ),
            (
                "a tag rule gets no fleet-wide",
                rule(&[], Some("db")),
                BreakerTripped,
                None,
                false,
            ),
            ("tests are never routed", rule(&[], None), Test, None, false),
        ];
        for (what, rule, kind, tags, expected) in table {
            assert_eq!(rule.wants(kind, tags), expected, "{what}");
        }
    }

    #[test]
    fn status_changes_table() {
        use NotifyKind::*;
        use VmStatus as S;
        let table = [
            (S::Healthy, S::Down, Some(VmDown)),
            (S::Warning, S::Down, Some(VmDown)),
            (S::Unknown, S::Down, Some(VmDown)),
            (S::Down, S::Down, None),
            (S::Down, S::Healthy, Some(VmRecovered)),
            (S::Down, S::Warning, Some(VmRecovered)),
            (S::Healthy, S::Warning, Some(WarningEntered)),
            (S::Unknown, S::Warning, Some(WarningEntered)),
            (S::Warning, S::Healthy, Some(WarningLeft)),
            (S::Unknown, S::Healthy, None),
            (S::Healthy, S::Healthy, None),
        ];
        for (from, to, kind) in table {
            assert_eq!(from_status_change(from, to), kind, "{from} -> {to}");
        }
    }

    #[test]
    fn pairs_and_events() {
        assert_eq!(requires(NotifyKind::VmRecovered), Some(NotifyKind::VmDown));
        assert_eq!(requires(NotifyKind::VmDown), None);
        assert!(pair_of(NotifyKind::VmRecovered).contains(&NotifyKind::VmDown));
        assert_eq!(from_event(EventKind::ResetHeld), None);
        assert_eq!(
            from_event(EventKind::EnrolmentRefused),
            Some(NotifyKind::LinkClaimRefused)
        );
    }

    #[test]
    fn a_node_whose_every_vm_is_down_is_one_message() {
        let pve1: NodeName = "pve1".parse().unwrap();
        let pve2: NodeName = "pve2".parse().unwrap();
        let downs = vec![
            (VmId(1), Some(pve1.clone())),
            (VmId(2), Some(pve1.clone())),
            (VmId(3), Some(pve2.clone())),
            (VmId(4), None),
        ];
        let fleet = vec![(pve1.clone(), 2, 2), (pve2.clone(), 3, 1)];
        assert_eq!(unreachable_nodes(&downs, &fleet), vec![&pve1]);
        // A node of one VM is that VM's own down.
        let lone = vec![(pve2.clone(), 1, 1)];
        assert!(unreachable_nodes(&downs, &lone).is_empty());
        let m = Message::node_unreachable(&pve1, &["a".into(), "b".into()], 5);
        assert_eq!(m.title, "Node pve1 unreachable");
        assert!(m.text.contains("All 2 VMs"), "{}", m.text);
    }

    #[test]
    fn reading_stops_before_a_gap_until_it_is_old() {
        let now = 100_000;
        let fresh = now - 1_000;
        let old = now - GAP_WAIT_MS;
        type Case = (&'static str, i64, Vec<(i64, i64)>, usize);
        let table: Vec<Case> = vec![
            ("nothing", 5, vec![], 0),
            ("in a row", 5, vec![(6, fresh), (7, fresh)], 2),
            ("a fresh gap first", 5, vec![(7, fresh)], 0),
            (
                "a fresh gap later",
                5,
                vec![(6, fresh), (8, fresh), (9, fresh)],
                1,
            ),
            (
                "an old gap is passed",
                5,
                vec![(6, old), (8, old), (9, fresh)],
                3,
            ),
            ("then a fresh one stops", 5, vec![(8, old), (10, fresh)], 1),
        ];
        for (what, cursor, rows, expected) in table {
            assert_eq!(consumable(cursor, &rows, now), expected, "{what}");
        }
    }

    #[test]
    fn retries_double_then_stop() {
        assert_eq!(retry_after(1, 1000, 5), Some(1000));
        assert_eq!(retry_after(2, 1000, 5), Some(2000));
        assert_eq!(retry_after(4, 1000, 5), Some(8000));
        assert_eq!(retry_after(5, 1000, 5), None);
        assert_eq!(retry_after(3, 3_000_000, 9), Some(3_600_000));
    }
}
