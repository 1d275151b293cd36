//! The second opinion before a power action: what Proxmox can tell about a silent guest
//! (guest-agent ping, two `status/current` reads), and the pure verdict drawn from it.

use crate::enums::UnknownValue;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// How the QEMU guest agent answered `agent/ping`. Only `Answered` is evidence of life: a
/// hung guest and a guest without a running agent fail the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum AgentPing {
    /// The guest OS answered.
    Answered,
    /// The guest's config has no `agent: 1`, or the guest is a container: not asked.
    NotConfigured,
    /// QEMU says the agent is not running in the guest.
    NotRunning,
    /// The agent did not answer in time (Proxmox's timeout or ours).
    TimedOut,
    /// The ping could not be made: the token lacks the privilege, or Proxmox failed.
    Unavailable(String),
}

impl fmt::Display for AgentPing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentPing::Answered => f.write_str("answered"),
            AgentPing::NotConfigured => f.write_str("not configured"),
            AgentPing::NotRunning => f.write_str("not running"),
            AgentPing::TimedOut => f.write_str("timed out"),
            AgentPing::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// Cumulative byte counters of `status/current` since the guest started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IoCounters {
    pub diskread: u64,
    pub diskwrite: u64,
    pub netin: u64,
    pub netout: u64,
}

/// One `status/current` read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatusSample {
    pub at_ms: i64,
    /// Share of the guest's cores in use (Proxmox's `cpu`).
    pub cpu: Option<f64>,
    pub qmpstatus: Option<String>,
    pub uptime: Option<i64>,
    /// Absent when Proxmox does not report them for this storage or guest.
    pub io: Option<IoCounters>,
}

/// Bytes moved between two reads. `netin` is kept for the record but is no sign of life:
/// traffic arriving at a guest's NIC is counted on the host whether the guest reads it or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IoDelta {
    pub diskread: u64,
    pub diskwrite: u64,
    pub netin: u64,
    pub netout: u64,
    pub over_ms: i64,
}

impl IoDelta {
    /// I/O the guest itself must have started: disk reads and writes, network sends.
    pub fn guest_initiated(&self) -> bool {
        self.diskread > 0 || self.diskwrite > 0 || self.netout > 0
    }

    fn describe(&self) -> String {
        format!(
            "disk read +{} B, disk write +{} B, net out +{} B in {} ms",
            self.diskread, self.diskwrite, self.netout, self.over_ms
        )
    }
}

/// Everything gathered about one silent guest before deciding, stored with the decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    pub guest_agent: AgentPing,
    pub first: StatusSample,
    /// The second read a few seconds later, or why it failed.
    pub second: Result<StatusSample, String>,
    pub last_heartbeat_ms: Option<i64>,
    pub last_uptime_seconds: Option<i64>,
}

impl Evidence {
    /// Counter deltas between the reads; `None` when either read lacks them or they went
    /// backwards (the guest restarted between the reads).
    pub fn io_delta(&self) -> Option<IoDelta> {
        let second = self.second.as_ref().ok()?;
        let (a, b) = (self.first.io?, second.io?);
        Some(IoDelta {
            diskread: b.diskread.checked_sub(a.diskread)?,
            diskwrite: b.diskwrite.checked_sub(a.diskwrite)?,
            netin: b.netin.checked_sub(a.netin)?,
            netout: b.netout.checked_sub(a.netout)?,
            over_ms: second.at_ms.saturating_sub(self.first.at_ms),
        })
    }

    /// The guest (or its QEMU process) started afresh between the reads: someone acted.
    fn restarted_between(&self) -> Option<String> {
        let second = self.second.as_ref().ok()?;
        if let (Some(a), Some(b)) = (self.first.uptime, second.uptime)
            && b < a
        {
            return Some(format!(
                "the guest restarted between the reads (uptime {a}s, then {b}s)"
            ));
        }
        let (a, b) = (self.first.io?, second.io?);
        (b.diskread < a.diskread
            || b.diskwrite < a.diskwrite
            || b.netin < a.netin
            || b.netout < a.netout)
            .then(|| {
                "the guest's I/O counters went back between the reads (a new QEMU process)"
                    .to_owned()
            })
    }

    /// A `qmpstatus` that says the hypervisor, not the guest, is stuck.
    fn fault(&self) -> Option<&str> {
        let second = self.second.as_ref().ok();
        [
            second.and_then(|s| s.qmpstatus.as_deref()),
            self.first.qmpstatus.as_deref(),
        ]
        .into_iter()
        .flatten()
        .find(|q| matches!(*q, "io-error" | "internal-error"))
    }

    /// After a reset: the guest OS is back (its agent answers and it does I/O) while our
    /// own agent has not reported yet.
    pub fn guest_back(&self) -> bool {
        self.guest_agent == AgentPing::Answered
            && self.io_delta().is_some_and(|d| d.guest_initiated())
    }
}

/// How much silence it takes [HANG_EVIDENCE].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HangEvidence {
    /// Reset only when no sign of life is left: no guest-agent answer and no guest I/O.
    #[default]
    Strict,
    /// Reset on silent heartbeats alone (a guest-agent answer or a storage fault still stop it).
    Lenient,
}

impl FromStr for HangEvidence {
    type Err = UnknownValue;

    fn from_str(value: &str) -> Result<Self, UnknownValue> {
        match value {
            "strict" => Ok(HangEvidence::Strict),
            "lenient" => Ok(HangEvidence::Lenient),
            _ => Err(UnknownValue {
                kind: "hang evidence",
                value: value.to_owned(),
            }),
        }
    }
}

/// What the evidence says about a silent guest; the text names the evidence that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No sign of life: a power action may follow.
    Hung(String),
    /// The guest is alive, only our agent is silent: no power action.
    AgentSilent(String),
    /// QEMU stopped the guest on a storage or internal fault; a reset does not cure it.
    GuestFault(String),
    /// Not enough to decide (a read failed under `strict`): look again later.
    Unsure(String),
}

pub fn judge(evidence: &Evidence, mode: HangEvidence) -> Verdict {
    if let Some(fault) = evidence.fault() {
        return Verdict::GuestFault(format!(
            "Proxmox reports qmpstatus {fault}: the hypervisor stopped the guest on a fault a reset does not cure"
        ));
    }
    if evidence.guest_agent == AgentPing::Answered {
        return Verdict::AgentSilent(
            "the QEMU guest agent answered: the guest OS is alive, only its heartbeats stopped"
                .into(),
        );
    }
    let ping = &evidence.guest_agent;
    if let Err(why) = &evidence.second {
        return Verdict::Unsure(format!("the second status read failed ({why})"));
    }
    if let Some(why) = evidence.restarted_between() {
        return Verdict::Unsure(why);
    }
    if mode == HangEvidence::Lenient {
        return Verdict::Hung(format!(
            "heartbeats stopped (HANG_EVIDENCE=lenient); guest agent {ping}"
        ));
    }
    match evidence.io_delta() {
        Some(delta) if delta.guest_initiated() => Verdict::AgentSilent(format!(
            "the guest still does I/O ({}): alive, only its heartbeats stopped",
            delta.describe()
        )),
        Some(delta) => Verdict::Hung(format!(
            "no sign of life: guest agent {ping}, no guest I/O ({})",
            delta.describe()
        )),
        None => Verdict::Hung(format!(
            "no sign of life: guest agent {ping}, I/O counters unavailable"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn sample(at_ms: i64, io: Option<(u64, u64, u64, u64)>, qmp: &str) -> StatusSample {
        StatusSample {
            at_ms,
            cpu: Some(1.0),
            qmpstatus: Some(qmp.into()),
            uptime: Some(1000),
            io: io.map(|(diskread, diskwrite, netin, netout)| IoCounters {
                diskread,
                diskwrite,
                netin,
                netout,
            }),
        }
    }

    fn evidence(ping: AgentPing, second: Result<StatusSample, String>) -> Evidence {
        Evidence {
            guest_agent: ping,
            first: sample(0, Some((10, 10, 10, 10)), "running"),
            second,
            last_heartbeat_ms: Some(-60_000),
            last_uptime_seconds: Some(990),
        }
    }

    type Case = (
        &'static str,
        AgentPing,
        Result<StatusSample, String>,
        HangEvidence,
        &'static str,
    );

    fn kind(v: &Verdict) -> &'static str {
        match v {
            Verdict::Hung(_) => "hung",
            Verdict::AgentSilent(_) => "agent silent",
            Verdict::GuestFault(_) => "fault",
            Verdict::Unsure(_) => "unsure",
        }
    }

    #[test]
    fn verdict_table() {
        use AgentPing::*;
        use HangEvidence::*;
        let still = || Ok(sample(3000, Some((10, 10, 10, 10)), "running"));
        let only_netin = || Ok(sample(3000, Some((10, 10, 99, 10)), "running"));
        let writing = || Ok(sample(3000, Some((10, 50, 10, 10)), "running"));
        let sending = || Ok(sample(3000, Some((10, 10, 10, 11)), "running"));
        let restarted = || Ok(sample(3000, Some((1, 1, 1, 1)), "running"));
        let no_counters = || Ok(sample(3000, None, "running"));
        let io_error = || Ok(sample(3000, Some((10, 10, 10, 10)), "io-error"));
        let internal = || Ok(sample(3000, None, "internal-error"));
        let failed = || Err::<StatusSample, _>("Proxmox unreachable".to_owned());
        let rebooted = || {
            Ok(StatusSample {
                uptime: Some(3),
                ..sample(3000, Some((10, 10, 10, 10)), "running")
            })
        };
        let cases: Vec<Case> = vec![
            ("agent answers", Answered, still(), Strict, "agent silent"),
            (
                "agent answers, lenient",
                Answered,
                still(),
                Lenient,
                "agent silent",
            ),
            ("hung: timeout, no io", TimedOut, still(), Strict, "hung"),
            (
                "hung: agent not running",
                NotRunning,
                still(),
                Strict,
                "hung",
            ),
            ("hung: no agent", NotConfigured, still(), Strict, "hung"),
            (
                "netin alone is not life",
                TimedOut,
                only_netin(),
                Strict,
                "hung",
            ),
            (
                "disk writes under strict",
                TimedOut,
                writing(),
                Strict,
                "agent silent",
            ),
            (
                "net sends under strict",
                NotConfigured,
                sending(),
                Strict,
                "agent silent",
            ),
            (
                "disk writes under lenient",
                TimedOut,
                writing(),
                Lenient,
                "hung",
            ),
            (
                "no permission, io moving",
                Unavailable("permission".into()),
                writing(),
                Strict,
                "agent silent",
            ),
            (
                "no permission, still",
                Unavailable("permission".into()),
                still(),
                Strict,
                "hung",
            ),
            (
                "counters went back",
                TimedOut,
                restarted(),
                Strict,
                "unsure",
            ),
            (
                "counters went back, lenient",
                TimedOut,
                restarted(),
                Lenient,
                "unsure",
            ),
            ("no counters", TimedOut, no_counters(), Strict, "hung"),
            ("io-error", TimedOut, io_error(), Strict, "fault"),
            (
                "io-error beats an agent answer",
                Answered,
                io_error(),
                Lenient,
                "fault",
            ),
            ("internal-error", NotRunning, internal(), Strict, "fault"),
            (
                "second read failed, strict",
                TimedOut,
                failed(),
                Strict,
                "unsure",
            ),
            (
                "second read failed, lenient",
                TimedOut,
                failed(),
                Lenient,
                "unsure",
            ),
            (
                "restarted between the reads",
                TimedOut,
                rebooted(),
                Strict,
                "unsure",
            ),
        ];
        for (name, ping, second, mode, expected) in cases {
            let verdict = judge(&evidence(ping, second), mode);
            assert_eq!(kind(&verdict), expected, "{name}: {verdict:?}");
        }
    }

    #[test]
    fn every_verdict_names_its_evidence() {
        let hung = judge(
            &evidence(
                AgentPing::Unavailable("permission".into()),
                Ok(sample(3000, Some((10, 10, 10, 10)), "running")),
            ),
            HangEvidence::Strict,
        );
        let Verdict::Hung(text) = hung else {
            panic!("{hung:?}")
        };
        assert!(text.contains("unavailable: permission"), "{text}");
        assert!(text.contains("in 3000 ms"), "{text}");
        let alive = judge(
            &evidence(
                AgentPing::TimedOut,
                Ok(sample(3000, Some((10, 50, 10, 10)), "running")),
            ),
            HangEvidence::Strict,
        );
        assert!(
            format!("{alive:?}").contains("disk write +40 B"),
            "{alive:?}"
        );
    }

    #[test]
    fn guest_back_needs_the_agent_and_io() {
        let moving = || Ok(sample(3000, Some((10, 50, 10, 10)), "running"));
        let still = || Ok(sample(3000, Some((10, 10, 10, 10)), "running"));
        assert!(evidence(AgentPing::Answered, moving()).guest_back());
        assert!(!evidence(AgentPing::Answered, still()).guest_back());
        assert!(!evidence(AgentPing::TimedOut, moving()).guest_back());
    }

    #[test]
    fn hang_evidence_parses_strictly() {
        assert_eq!("strict".parse(), Ok(HangEvidence::Strict));
        assert_eq!("lenient".parse(), Ok(HangEvidence::Lenient));
        assert!("Strict".parse::<HangEvidence>().is_err());
        assert!("".parse::<HangEvidence>().is_err());
    }

    #[test]
    fn evidence_serialises_for_the_history() {
        let json = serde_json::to_value(evidence(
            AgentPing::Unavailable("permission".into()),
            Err("timeout".into()),
        ))
        .unwrap();
        assert_eq!(json["guest_agent"]["result"], "unavailable");
        assert_eq!(json["guest_agent"]["detail"], "permission");
        assert_eq!(json["second"]["Err"], "timeout");
        assert_eq!(json["first"]["io"]["diskwrite"], 10);
    }
}
