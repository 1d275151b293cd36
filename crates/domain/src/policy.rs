//! Remediation policy: pure functions of (VM state, Proxmox facts, config, now) that decide
//! what to do about a hung VM. The engine carries the decisions out; nothing here does I/O.

use crate::enums::{GuestKind, Mode, PowerAction, RemediationPhase, UnknownValue, VmStatus};
use crate::evidence::HangEvidence;
use crate::ids::{NodeName, VmId};
use crate::status::percent_of;
use std::fmt;
use std::str::FromStr;

/// What Proxmox says about a guest's power state, reduced to what the policy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestPower {
    Running,
    /// Stopped in Proxmox: intentionally off.
    Stopped,
    /// Running as a process but not executing (QEMU `qmpstatus`: paused, suspended...).
    Suspended(String),
    /// QEMU stopped the guest on a fault (`qmpstatus` io-error or internal-error): a
    /// storage or hypervisor failure that a reset does not cure.
    Fault(String),
    /// Any other status Proxmox reports.
    Other(String),
}

/// A guest's state in Proxmox at the moment a reset is considered.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestState {
    pub power: GuestPower,
    /// A config lock (backup, migrate, snapshot...).
    pub lock: Option<String>,
    pub template: bool,
    pub ha_managed: bool,
    pub uptime_seconds: Option<i64>,
    /// The guest's config enables the QEMU guest agent (`agent: 1`).
    pub agent_configured: bool,
    /// What `status/current` said, kept as evidence.
    pub sample: crate::evidence::StatusSample,
}

impl GuestState {
    /// A plain running guest, the usual case.
    pub fn running() -> Self {
        GuestState {
            power: GuestPower::Running,
            lock: None,
            template: false,
            ha_managed: false,
            uptime_seconds: None,
            agent_configured: false,
            sample: crate::evidence::StatusSample::default(),
        }
    }
}

/// One rung of the escalation ladder; each is one attempt of an incident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rung {
    /// ACPI reboot: a partly alive guest shuts down cleanly, losing less than a reset.
    Reboot,
    /// Hard reset of the virtual machine (QEMU only).
    Reset,
    /// Stop then start: a fresh QEMU process, for a guest a reset does not bring back.
    StopStart,
}

impl Rung {
    pub fn as_str(self) -> &'static str {
        match self {
            Rung::Reboot => "reboot",
            Rung::Reset => "reset",
            Rung::StopStart => "stop-start",
        }
    }

    /// The power action that starts this rung (a stop-start continues with a start).
    pub fn first_action(self) -> PowerAction {
        match self {
            Rung::Reboot => PowerAction::Reboot,
            Rung::Reset => PowerAction::Reset,
            Rung::StopStart => PowerAction::Stop,
        }
    }
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rungs in order [ESCALATION_LADDER], e.g. `reboot,reset,stop-start`: none twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ladder(Vec<Rung>);

impl Default for Ladder {
    fn default() -> Self {
        Ladder(vec![Rung::Reboot, Rung::Reset, Rung::StopStart])
    }
}

impl FromStr for Ladder {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, UnknownValue> {
        let bad = || UnknownValue {
            kind: "escalation ladder",
            value: text.to_owned(),
        };
        let mut rungs = Vec::new();
        for part in text.split(',').map(str::trim) {
            let rung = match part {
                "reboot" => Rung::Reboot,
                "reset" => Rung::Reset,
                "stop-start" => Rung::StopStart,
                _ => return Err(bad()),
            };
            if rungs.contains(&rung) {
                return Err(bad());
            }
            rungs.push(rung);
        }
        Ok(Ladder(rungs))
    }
}

impl Ladder {
    pub fn rungs(&self) -> &[Rung] {
        &self.0
    }

    /// The rung for an incident's next attempt, `attempts_done` attempts in. Containers
    /// have no reset: their ladder skips it. Past the last rung the last one repeats (when
    /// MAX_RESET_ATTEMPTS allows more attempts than there are rungs).
    pub fn rung(&self, kind: GuestKind, attempts_done: i64) -> Rung {
        let rungs: Vec<Rung> = self
            .0
            .iter()
            .copied()
            .filter(|r| kind == GuestKind::Qemu || *r != Rung::Reset)
            .collect();
        let index = usize::try_from(attempts_done.max(0)).unwrap_or(usize::MAX);
        rungs
            .get(index)
            .or(rungs.last())
            .copied()
            // A container under a `reset`-only ladder: its closest action.
            .unwrap_or(Rung::Reboot)
    }
}

/// Remediation settings (environment variables in brackets).
#[derive(Clone, Debug, PartialEq)]
pub struct RemediationConfig {
    /// Global switch [AUTO_RESET_ENABLED].
    pub enabled: bool,
    /// [AUTO_RESET_MODE]: live or shadow.
    pub mode: Mode,
    /// Attempts per incident before `manual` [MAX_RESET_ATTEMPTS].
    pub max_attempts: i64,
    /// Resets in flight at once [MAX_CONCURRENT_RESETS].
    pub max_concurrent: usize,
    /// Time a reset VM has to report again [RECOVERY_TIMEOUT_MS].
    pub recovery_timeout_ms: i64,
    /// First pause between attempts, doubled each time [RESET_BACKOFF_MS].
    pub backoff_base_ms: i64,
    /// Share of linked VMs stale at once that pauses auto-reset [STORM_PERCENT].
    pub storm_percent: f64,
    /// Reset HA-managed VMs too [REMEDIATE_HA_VMS].
    pub remediate_ha: bool,
    /// Wait before looking again at a VM that was locked or left alone [RECHECK_INTERVAL_MS].
    pub recheck_ms: i64,
    /// How much silence it takes to act [HANG_EVIDENCE].
    pub hang_evidence: HangEvidence,
    /// The rungs of each incident [ESCALATION_LADDER].
    pub ladder: Ladder,
    /// How long a guest gets to honour an ACPI reboot [GRACEFUL_REBOOT_TIMEOUT_MS].
    pub graceful_reboot_timeout_ms: i64,
    /// Time between the two `status/current` reads [EVIDENCE_INTERVAL_MS].
    pub evidence_interval_ms: i64,
    /// Longest wait for a guest-agent ping [GUEST_AGENT_TIMEOUT_MS].
    pub guest_agent_timeout_ms: i64,
    /// How long an automatic power action is announced before it is sent, so an operator
    /// can hold it; 0 sends at once [RESET_VETO_SECONDS].
    pub veto_ms: i64,
}

impl Default for RemediationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: Mode::Live,
            max_attempts: 3,
            max_concurrent: 2,
            recovery_timeout_ms: 300_000,
            backoff_base_ms: 60_000,
            storm_percent: 30.0,
            remediate_ha: false,
            recheck_ms: 60_000,
            hang_evidence: HangEvidence::Strict,
            ladder: Ladder::default(),
            graceful_reboot_timeout_ms: 60_000,
            evidence_interval_ms: 5_000,
            guest_agent_timeout_ms: 10_000,
            veto_ms: 30_000,
        }
    }
}

/// What the policy needs to know about one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmFacts {
    pub id: VmId,
    pub status: VmStatus,
    pub node: Option<NodeName>,
    pub linked: bool,
    pub auto_reset: bool,
    pub phase: RemediationPhase,
    pub attempts: i64,
    pub next_action_ms: Option<i64>,
    pub last_reset_ms: Option<i64>,
}

/// Why a VM is not looked at this round, or that it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screen {
    Candidate,
    Skip(&'static str),
}

/// Why a VM with a look planned for later is skipped (an announced action counting down).
pub const WAITING: &str = "waiting before the next look";

/// First stage: is this VM a candidate for a reset at all (before asking Proxmox)?
pub fn screen(vm: &VmFacts, now_ms: i64) -> Screen {
    match vm.phase {
        RemediationPhase::Ok => {}
        RemediationPhase::AgentSilent => {
            return Screen::Skip("the guest is alive; waiting for its agent to report");
        }
        RemediationPhase::GuestFault => {
            return Screen::Skip("a hypervisor fault a reset does not cure");
        }
        // Looked at again once its window ends, through every check below.
        RemediationPhase::ResetScheduled => {}
        _ => return Screen::Skip("an incident is already in progress"),
    }
    if vm.status != VmStatus::Down {
        return Screen::Skip("not stale");
    }
    if !vm.linked {
        return Screen::Skip("not linked to a Proxmox guest");
    }
    if !vm.auto_reset {
        return Screen::Skip("auto-reset is off for this VM");
    }
    if vm.next_action_ms.is_some_and(|t| t > now_ms) {
        return Screen::Skip(WAITING);
    }
    Screen::Candidate
}

/// Linked VMs (not latched manual) on one node, and how many of them are stale: all the
/// storm breaker needs, so the database can count them instead of loading the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTally {
    pub node: NodeName,
    pub linked: u64,
    pub stale: u64,
}

/// The tallies of `vms` per node (what the database's count gives).
pub fn tally(vms: &[VmFacts]) -> Vec<NodeTally> {
    let mut nodes: std::collections::BTreeMap<&NodeName, (u64, u64)> = Default::default();
    for vm in vms
        .iter()
        .filter(|v| v.linked && v.phase != RemediationPhase::Manual)
    {
        if let Some(node) = vm.node.as_ref() {
            let entry = nodes.entry(node).or_default();
            entry.0 += 1;
            entry.1 += u64::from(vm.status == VmStatus::Down);
        }
    }
    nodes
        .into_iter()
        .map(|(node, (linked, stale))| NodeTally {
            node: node.clone(),
            linked,
            stale,
        })
        .collect()
}

/// The mass-staleness breaker: `Some(reason)` when so many linked VMs are stale that the
/// cause is more likely the network, storage or this monitor than the VMs themselves.
/// A single stale VM never trips it.
pub fn storm(vms: &[VmFacts], cfg: &RemediationConfig) -> Option<String> {
    storm_of(&tally(vms), cfg)
}

/// [`storm`] from per-node tallies.
pub fn storm_of(nodes: &[NodeTally], cfg: &RemediationConfig) -> Option<String> {
    let linked: u64 = nodes.iter().map(|n| n.linked).sum();
    let stale: u64 = nodes.iter().map(|n| n.stale).sum();
    let share = percent_of(
        i64::try_from(stale).unwrap_or(i64::MAX),
        i64::try_from(linked).unwrap_or(i64::MAX),
    );
    if stale >= 2 && share > cfg.storm_percent {
        return Some(format!(
            "{stale} of {linked} linked VMs are stale (more than {}%)",
            cfg.storm_percent
        ));
    }
    nodes
        .iter()
        .find(|n| n.linked >= 2 && n.linked == n.stale)
        .map(|n| format!("all {} VMs on node {} are stale", n.linked, n.node))
}

/// Whether the breaker can trip with `stale` linked VMs stale at all: below two it cannot,
/// so the fleet need not be counted.
pub fn storm_possible(stale: u64) -> bool {
    stale >= 2
}

/// What a "hung" verdict leads to, given the veto window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VetoStep {
    /// Send the power action now.
    Act,
    /// Announce it (a countdown of one window from now); an operator may hold it meanwhile.
    Announce,
}

/// Slack after a window ends within which the round that picked the VM may still act: a
/// round normally comes within one scheduler interval; later than this, the monitor was not
/// watching (breaker, outage) and the window is given again.
pub const VETO_GRACE_MS: i64 = 60_000;

/// A power action is sent only when its announced window was watched to its end by this
/// monitor: no window configured; or the VM is `reset_scheduled`, the round that picked it
/// (`screened_ms`, before any evidence was gathered) came after the window ended and not
/// long after, and the announcement was made since this process started leading
/// (`watching_since_ms`: a restart or a change of leader announces again).
pub fn veto_step(
    phase: RemediationPhase,
    next_action_ms: Option<i64>,
    veto_ms: i64,
    screened_ms: i64,
    watching_since_ms: i64,
) -> VetoStep {
    if veto_ms <= 0 {
        return VetoStep::Act;
    }
    match (phase, next_action_ms) {
        (RemediationPhase::ResetScheduled, Some(until))
            if screened_ms >= until
                && screened_ms <= until.saturating_add(veto_ms.max(VETO_GRACE_MS))
                && until.saturating_sub(veto_ms) >= watching_since_ms =>
        {
            VetoStep::Act
        }
        _ => VetoStep::Announce,
    }
}

/// Second stage: what to do with a candidate, given what Proxmox says about it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Gather the second opinion; act if it finds no sign of life.
    Reset,
    /// Shadow mode: the same, recording what would have been sent.
    WouldReset,
    /// QEMU stopped the guest on a fault a reset does not cure.
    Fault(String),
    /// Not now (locked); look again after the recheck interval.
    Wait(String),
    /// The concurrency limit is reached: taken again as soon as a slot frees (next round).
    Queue(String),
    /// Not ours to reset (off, paused, template, HA-managed).
    Leave(String),
}

pub fn decide(guest: &GuestState, cfg: &RemediationConfig, in_flight: usize) -> Decision {
    if guest.template {
        return Decision::Leave("a template".into());
    }
    match &guest.power {
        GuestPower::Stopped => {
            return Decision::Leave("stopped in Proxmox (intentionally off)".into());
        }
        GuestPower::Suspended(q) => return Decision::Leave(format!("{q} in Proxmox")),
        GuestPower::Fault(q) => {
            return Decision::Fault(format!(
                "Proxmox reports qmpstatus {q}: the hypervisor stopped the guest on a fault a reset does not cure"
            ));
        }
        GuestPower::Other(status) => {
            return Decision::Leave(format!("Proxmox status is {status}"));
        }
        GuestPower::Running => {}
    }
    if let Some(lock) = guest.lock.as_deref() {
        return Decision::Wait(format!("locked ({lock}); waiting for it to end"));
    }
    if guest.ha_managed && !cfg.remediate_ha {
        return Decision::Leave("managed by Proxmox HA; left to HA".into());
    }
    if let Some(reason) = queued(in_flight, cfg) {
        return Decision::Queue(reason);
    }
    match cfg.mode {
        Mode::Shadow => Decision::WouldReset,
        Mode::Live => Decision::Reset,
    }
}

/// `Some(reason)` when `in_flight` power actions fill every slot: a candidate waits for
/// one without asking Proxmox, and is looked at again the round after a slot frees.
pub fn queued(in_flight: usize, cfg: &RemediationConfig) -> Option<String> {
    // The limit, not the count, in the reason: it is written once, not whenever the
    // count moves.
    (in_flight >= cfg.max_concurrent).then(|| {
        format!(
            "all {} reset slots are in use; next when one frees",
            cfg.max_concurrent
        )
    })
}

/// How the wall clock moved between two scheduler rounds that run about a second apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockJump {
    Steady,
    /// Ahead by far more than a round (ms): the process was frozen or the clock was stepped
    /// forward, so every heartbeat looks older than it is.
    Ahead(i64),
    /// Back (ms): the clock was stepped back, so stored heartbeat times lie in the future
    /// and a silent VM would look fresh until the clock caught up with them.
    Back(i64),
}

/// Backward moves smaller than this are left alone: they hide a silent VM for at most
/// this long.
pub const CLOCK_BACK_TOLERANCE_MS: i64 = 1_000;

/// Classifies the wall-clock move from the previous round at `previous_ms` to `now_ms`.
pub fn clock_jump(previous_ms: i64, now_ms: i64, stale_timeout_ms: i64) -> ClockJump {
    let gap = now_ms.saturating_sub(previous_ms);
    if gap > (stale_timeout_ms / 2).max(5_000) {
        ClockJump::Ahead(gap)
    } else if gap < -CLOCK_BACK_TOLERANCE_MS {
        ClockJump::Back(gap.saturating_neg())
    } else {
        ClockJump::Steady
    }
}

/// Pause before attempt `attempts + 1`: base, 2x base, 4x base...
pub fn backoff_ms(cfg: &RemediationConfig, attempts: i64) -> i64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    cfg.backoff_base_ms.saturating_mul(1i64 << exponent)
}

/// Where an incident goes after an attempt failed or its recovery window ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextStep {
    pub phase: RemediationPhase,
    pub next_action_ms: Option<i64>,
    pub reason: String,
}

pub fn after_failed_attempt(
    attempts: i64,
    cfg: &RemediationConfig,
    now_ms: i64,
    what: &str,
) -> NextStep {
    if attempts >= cfg.max_attempts {
        NextStep {
            phase: RemediationPhase::Manual,
            next_action_ms: None,
            reason: format!(
                "{what}; {attempts} of {} attempts used: manual intervention needed",
                cfg.max_attempts
            ),
        }
    } else {
        let wait = backoff_ms(cfg, attempts);
        NextStep {
            phase: RemediationPhase::Ok,
            next_action_ms: Some(now_ms + wait),
            reason: format!(
                "{what}; attempt {} of {} in {}s",
                attempts + 1,
                cfg.max_attempts,
                wait / 1000
            ),
        }
    }
}

/// For a VM in `recovering`: `Some` once its window passed without a fresh report.
pub fn recovery_expired(vm: &VmFacts, cfg: &RemediationConfig, now_ms: i64) -> Option<NextStep> {
    if vm.phase != RemediationPhase::Recovering {
        return None;
    }
    let reset_at = vm.last_reset_ms?;
    (now_ms >= reset_at + cfg.recovery_timeout_ms)
        .then(|| after_failed_attempt(vm.attempts, cfg, now_ms, "no heartbeat after the reset"))
}

/// The report that may end an incident: when it was taken (by the guest's clock), when it
/// arrived (ours), and the uptime it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreshReport {
    pub observed_ms: i64,
    pub received_ms: i64,
    pub uptime_seconds: i64,
}

/// Whether a freshly stored report ends the VM's incident: it must have been taken after
/// the last power action (replayed older reports prove nothing), or its uptime must say the
/// guest booted after it: a guest's clock is often wrong right after a hard reset, its
/// uptime is not.
pub fn report_ends_incident(
    phase: RemediationPhase,
    attempts: i64,
    last_reset_ms: Option<i64>,
    report: FreshReport,
) -> bool {
    let in_incident = phase != RemediationPhase::Ok || attempts > 0;
    let Some(reset_ms) = last_reset_ms else {
        return in_incident;
    };
    // Uptime is whole seconds: allow one for the rounding.
    let booted_after = report.uptime_seconds.saturating_mul(1000)
        <= report
            .received_ms
            .saturating_sub(reset_ms)
            .saturating_add(1000);
    in_incident && (report.observed_ms > reset_ms || booted_after)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;
    #[test]
    fn clock_jumps_are_told_from_rounds_running_late() {
        let stale = 90_000;
        let cases = [
            (1_000, ClockJump::Steady),
            (5_000, ClockJump::Steady),
            // A round that ran long is not a jump until it takes half a stale timeout.
            (45_000, ClockJump::Steady),
            (45_001, ClockJump::Ahead(45_001)),
            (3_600_000, ClockJump::Ahead(3_600_000)),
            (0, ClockJump::Steady),
            (-1_000, ClockJump::Steady),
            (-1_001, ClockJump::Back(1_001)),
            (-3_600_000, ClockJump::Back(3_600_000)),
        ];
        for (gap, expected) in cases {
            assert_eq!(
                clock_jump(10_000_000, 10_000_000 + gap, stale),
                expected,
                "{gap}"
            );
        }
        // Short stale timeouts still allow five seconds between rounds.
        assert_eq!(clock_jump(0, 5_000, 2_000), ClockJump::Steady);
        assert_eq!(clock_jump(0, 5_001, 2_000), ClockJump::Ahead(5_001));
    }

    const NOW: i64 = 1_000_000;

    fn vm(status: VmStatus) -> VmFacts {
        VmFacts {
            id: VmId(1),
            status,
            node: Some(node("pve1")),
            linked: true,
            auto_reset: true,
            phase: RemediationPhase::Ok,
            attempts: 0,
            next_action_ms: None,
            last_reset_ms: None,
        }
    }

    fn node(name: &str) -> NodeName {
        name.parse().unwrap()
    }

    fn guest(power: GuestPower) -> GuestState {
        GuestState {
            power,
            uptime_seconds: Some(100),
            ..GuestState::running()
        }
    }

    #[test]
    fn screen_table() {
        let cases: Vec<(&str, VmFacts, Screen)> = vec![
            ("stale and linked", vm(VmStatus::Down), Screen::Candidate),
            ("healthy", vm(VmStatus::Healthy), Screen::Skip("not stale")),
            ("warning", vm(VmStatus::Warning), Screen::Skip("not stale")),
            (
                "unlinked",
                VmFacts {
                    linked: false,
                    ..vm(VmStatus::Down)
                },
                Screen::Skip("not linked to a Proxmox guest"),
            ),
            (
                "opted out",
                VmFacts {
                    auto_reset: false,
                    ..vm(VmStatus::Down)
                },
                Screen::Skip("auto-reset is off for this VM"),
            ),
            (
                "manual",
                VmFacts {
                    phase: RemediationPhase::Manual,
                    ..vm(VmStatus::Down)
                },
                Screen::Skip("an incident is already in progress"),
            ),
            (
                "recovering",
                VmFacts {
                    phase: RemediationPhase::Recovering,
                    ..vm(VmStatus::Down)
                },
                Screen::Skip("an incident is already in progress"),
            ),
            (
                "backing off",
                VmFacts {
                    next_action_ms: Some(NOW + 1),
                    ..vm(VmStatus::Down)
                },
                Screen::Skip("waiting before the next look"),
            ),
            (
                "backoff over",
                VmFacts {
                    next_action_ms: Some(NOW),
                    ..vm(VmStatus::Down)
                },
                Screen::Candidate,
            ),
        ];
        for (name, facts, expected) in cases {
            assert_eq!(screen(&facts, NOW), expected, "{name}");
        }
    }

    #[test]
    fn decide_table() {
        let cfg = RemediationConfig::default();
        let running = || guest(GuestPower::Running);
        let locked = GuestState {
            lock: Some("backup".into()),
            ..running()
        };
        let template = GuestState {
            template: true,
            ..running()
        };
        let ha = GuestState {
            ha_managed: true,
            ..running()
        };
        let paused = guest(GuestPower::Suspended("paused".into()));
        let cases: Vec<(&str, GuestState, &RemediationConfig, usize, &str)> = vec![
            ("running", running(), &cfg, 0, "reset"),
            ("stopped", guest(GuestPower::Stopped), &cfg, 0, "leave"),
            (
                "other",
                guest(GuestPower::Other("prelaunch".into())),
                &cfg,
                0,
                "leave",
            ),
            ("paused", paused, &cfg, 0, "leave"),
            (
                "io-error",
                guest(GuestPower::Fault("io-error".into())),
                &cfg,
                0,
                "fault",
            ),
            (
                "internal-error, even locked",
                GuestState {
                    lock: Some("backup".into()),
                    ..guest(GuestPower::Fault("internal-error".into()))
                },
                &cfg,
                0,
                "fault",
            ),
            ("template", template, &cfg, 0, "leave"),
            ("locked", locked.clone(), &cfg, 0, "wait"),
            ("ha", ha.clone(), &cfg, 0, "leave"),
            ("limit reached", running(), &cfg, 2, "queue"),
            ("locked at the limit", locked, &cfg, 2, "wait"),
        ];
        let kind = |d: Decision| match d {
            Decision::Reset => "reset",
            Decision::WouldReset => "would",
            Decision::Wait(_) => "wait",
            Decision::Queue(_) => "queue",
            Decision::Leave(_) => "leave",
            Decision::Fault(_) => "fault",
        };
        for (name, status, cfg, in_flight, expected) in cases {
            assert_eq!(kind(decide(&status, cfg, in_flight)), expected, "{name}");
        }
        let ha_allowed = RemediationConfig {
            remediate_ha: true,
            ..cfg.clone()
        };
        assert_eq!(decide(&ha, &ha_allowed, 0), Decision::Reset);
        let shadow = RemediationConfig {
            mode: Mode::Shadow,
            ..cfg.clone()
        };
        assert_eq!(decide(&running(), &shadow, 0), Decision::WouldReset);
    }

    #[test]
    fn storm_table() {
        let cfg = RemediationConfig::default();
        let fleet = |down: usize, total: usize| -> Vec<VmFacts> {
            (0..total)
                .map(|i| VmFacts {
                    id: VmId(i64::try_from(i).unwrap()),
                    node: Some(node(&format!("pve{}", i % 3))),
                    ..vm(if i < down {
                        VmStatus::Down
                    } else {
                        VmStatus::Healthy
                    })
                })
                .collect()
        };
        assert_eq!(
            storm(&fleet(1, 10), &cfg),
            None,
            "one stale VM is an incident, not a storm"
        );
        assert_eq!(storm(&fleet(3, 10), &cfg), None, "30% is not more than 30%");
        assert!(storm(&fleet(4, 10), &cfg).is_some(), "40% trips it");
        assert_eq!(
            storm(&fleet(1, 2), &cfg),
            None,
            "small fleets: one VM never trips it"
        );
        // Every VM of one node stale (pve0 holds VMs 0 and 3 of 6).
        let mut by_node = fleet(0, 6);
        by_node[0].status = VmStatus::Down;
        by_node[3].status = VmStatus::Down;
        let reason = storm(
            &by_node,
            &RemediationConfig {
                storm_percent: 50.0,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert!(reason.contains("pve0"), "{reason}");
        // Unlinked and manual VMs do not count.
        let mut mixed = fleet(4, 10);
        for v in mixed.iter_mut().take(3) {
            v.linked = false;
        }
        assert_eq!(storm(&mixed, &cfg), None);
    }

    #[test]
    fn veto_table() {
        use RemediationPhase::{Ok, ResetScheduled};
        use VetoStep::{Act, Announce};
        const WINDOW: i64 = 30_000;
        // (name, phase, next_action_ms, veto, screened at, watching since, expected)
        let cases = [
            ("no window", Ok, None, 0, NOW, NOW, Act),
            ("first hung verdict", Ok, None, WINDOW, NOW, 0, Announce),
            (
                "a backoff time is no window",
                Ok,
                Some(NOW - 1),
                WINDOW,
                NOW,
                0,
                Announce,
            ),
            (
                "window running",
                ResetScheduled,
                Some(NOW + 1),
                WINDOW,
                NOW,
                0,
                Announce,
            ),
            (
                "window just ended",
                ResetScheduled,
                Some(NOW),
                WINDOW,
                NOW,
                0,
                Act,
            ),
            // A one-second window with slow evidence still acts: the round's time counts.
            (
                "short window",
                ResetScheduled,
                Some(NOW - 900),
                1_000,
                NOW,
                0,
                Act,
            ),
            (
                "ended within the grace",
                ResetScheduled,
                Some(NOW - 59_000),
                WINDOW,
                NOW,
                0,
                Act,
            ),
            (
                "ended long ago",
                ResetScheduled,
                Some(NOW - 61_000),
                WINDOW,
                NOW,
                0,
                Announce,
            ),
            // Announced before this process was leading (a restart inside the window).
            (
                "announced before a restart",
                ResetScheduled,
                Some(NOW),
                WINDOW,
                NOW,
                NOW - WINDOW + 1,
                Announce,
            ),
            (
                "scheduled without a time",
                ResetScheduled,
                None,
                WINDOW,
                NOW,
                0,
                Announce,
            ),
        ];
        for (name, phase, next, veto, screened, since, expected) in cases {
            assert_eq!(
                veto_step(phase, next, veto, screened, since),
                expected,
                "{name}"
            );
        }
        // The screen lets a scheduled VM through only once its window is over.
        let mut scheduled = vm(VmStatus::Down);
        scheduled.phase = ResetScheduled;
        scheduled.next_action_ms = Some(NOW + 1);
        assert_eq!(screen(&scheduled, NOW), Screen::Skip(WAITING));
        scheduled.next_action_ms = Some(NOW);
        assert_eq!(screen(&scheduled, NOW), Screen::Candidate);
    }

    #[test]
    fn ladder_table() {
        let default = Ladder::default();
        let cases: Vec<(&Ladder, GuestKind, i64, Rung)> = vec![
            (&default, GuestKind::Qemu, 0, Rung::Reboot),
            (&default, GuestKind::Qemu, 1, Rung::Reset),
            (&default, GuestKind::Qemu, 2, Rung::StopStart),
            (&default, GuestKind::Qemu, 5, Rung::StopStart),
            (&default, GuestKind::Lxc, 0, Rung::Reboot),
            (&default, GuestKind::Lxc, 1, Rung::StopStart),
            (&default, GuestKind::Qemu, -1, Rung::Reboot),
        ];
        for (ladder, kind, done, expected) in cases {
            assert_eq!(ladder.rung(kind, done), expected, "{kind} after {done}");
        }
        let reset_only: Ladder = "reset".parse().unwrap();
        assert_eq!(reset_only.rung(GuestKind::Qemu, 0), Rung::Reset);
        assert_eq!(
            reset_only.rung(GuestKind::Lxc, 0),
            Rung::Reboot,
            "containers have no reset"
        );
        assert_eq!(
            "reset, stop-start".parse::<Ladder>().unwrap().rungs(),
            &[Rung::Reset, Rung::StopStart]
        );
        for bad in ["", "reset,reset", "reboot,destroy", "Reset", "reset,"] {
            assert!(bad.parse::<Ladder>().is_err(), "{bad:?}");
        }
        assert_eq!(Rung::StopStart.first_action(), PowerAction::Stop);
    }

    #[test]
    fn held_phases_are_not_candidates() {
        for phase in [RemediationPhase::AgentSilent, RemediationPhase::GuestFault] {
            let held = VmFacts {
                phase,
                ..vm(VmStatus::Down)
            };
            assert!(matches!(screen(&held, NOW), Screen::Skip(_)), "{phase}");
        }
    }

    #[test]
    fn attempts_back_off_then_latch_manual() {
        let cfg = RemediationConfig {
            backoff_base_ms: 1000,
            max_attempts: 3,
            ..Default::default()
        };
        assert_eq!(backoff_ms(&cfg, 1), 1000);
        assert_eq!(backoff_ms(&cfg, 2), 2000);
        assert_eq!(backoff_ms(&cfg, 3), 4000);
        let first = after_failed_attempt(1, &cfg, NOW, "task failed");
        assert_eq!(
            (first.phase, first.next_action_ms),
            (RemediationPhase::Ok, Some(NOW + 1000))
        );
        let second = after_failed_attempt(2, &cfg, NOW, "task failed");
        assert_eq!(second.next_action_ms, Some(NOW + 2000));
        let last = after_failed_attempt(3, &cfg, NOW, "task failed");
        assert_eq!(
            (last.phase, last.next_action_ms),
            (RemediationPhase::Manual, None)
        );
    }

    #[test]
    fn recovery_window() {
        let cfg = RemediationConfig {
            recovery_timeout_ms: 500,
            ..Default::default()
        };
        let recovering = VmFacts {
            phase: RemediationPhase::Recovering,
            attempts: 1,
            last_reset_ms: Some(NOW - 499),
            ..vm(VmStatus::Down)
        };
        assert_eq!(recovery_expired(&recovering, &cfg, NOW), None);
        let expired = recovery_expired(&recovering, &cfg, NOW + 1).unwrap();
        assert_eq!(expired.phase, RemediationPhase::Ok);
        let report = |observed_ms: i64, received_ms: i64, uptime_seconds: i64| FreshReport {
            observed_ms,
            received_ms,
            uptime_seconds,
        };
        let recovering = RemediationPhase::Recovering;
        // (phase, attempts, last reset, report, ends)
        let cases = [
            (
                "taken after the reset",
                recovering,
                1,
                Some(NOW),
                report(NOW + 1, NOW + 1, 9_999),
                true,
            ),
            (
                "a replayed old report",
                recovering,
                1,
                Some(NOW),
                report(NOW - 5, NOW + 30_000, 9_999),
                false,
            ),
            (
                "guest clock behind, booted after the reset",
                recovering,
                1,
                Some(NOW),
                report(NOW - 100_000, NOW + 30_000, 25),
                true,
            ),
            (
                "guest clock behind, uptime from before the reset",
                recovering,
                1,
                Some(NOW),
                report(NOW - 100_000, NOW + 30_000, 32),
                false,
            ),
            (
                "manual, fresh",
                RemediationPhase::Manual,
                3,
                Some(NOW),
                report(NOW + 1, NOW + 1, 5),
                true,
            ),
            (
                "agent silent, never reset",
                RemediationPhase::AgentSilent,
                0,
                None,
                report(NOW, NOW, 9_999),
                true,
            ),
            (
                "no incident",
                RemediationPhase::Ok,
                0,
                None,
                report(NOW, NOW, 5),
                false,
            ),
            (
                "no incident after an old reset",
                RemediationPhase::Ok,
                0,
                Some(NOW - 1),
                report(NOW, NOW, 0),
                false,
            ),
        ];
        for (name, phase, attempts, reset, fresh, ends) in cases {
            assert_eq!(
                report_ends_incident(phase, attempts, reset, fresh),
                ends,
                "{name}"
            );
        }
    }
}
