//! Closed sets of stored and exchanged values; parsing rejects anything unknown.

use std::fmt;
use std::str::FromStr;

/// A stored or received value that names no variant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind}: {value:?}")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

/// Defines a string enum whose one spelling serves `Display`, `FromStr` and serde.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(value: &str) -> Result<Self, UnknownValue> {
                match value {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue { kind: $kind, value: value.to_owned() }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                crate::openapi::string_enum(&[$($text,)+])
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

string_enum!(
    /// A VM's health as the monitor judges it.
    VmStatus, "status" {
        Unknown = "unknown",
        Healthy = "healthy",
        Warning = "warning",
        Down = "down",
    }
);

string_enum!(
    /// Where a VM stands in the auto-remediation cycle.
    RemediationPhase, "remediation phase" {
        /// Nothing to do, or an incident waiting for its next attempt.
        Ok = "ok",
        /// A reset was decided and sent; its Proxmox task is being followed.
        ResetPending = "reset_pending",
        /// The reset's task finished; waiting for the VM to report with a smaller uptime.
        Recovering = "recovering",
        /// Automatic attempts are exhausted: an operator must look (acknowledge to clear).
        Manual = "manual",
        /// Heartbeats stopped but the guest is alive (its guest agent answers or it does
        /// I/O): no power action until its agent reports again.
        AgentSilent = "agent_silent",
        /// QEMU stopped the guest on a storage or internal fault (`io-error`,
        /// `internal-error`): a reset does not cure it; an operator must look.
        GuestFault = "guest_fault",
        /// The evidence says hung: the next rung is announced and waits out the veto
        /// window (`next_action_ms`), during which an operator may hold it.
        ResetScheduled = "reset_scheduled",
    }
);

string_enum!(
    /// The two kinds of Proxmox guest.
    GuestKind, "guest type" {
        Qemu = "qemu",
        Lxc = "lxc",
    }
);

string_enum!(
    /// A power action Proxmox can run on a guest.
    PowerAction, "action" {
        Reset = "reset",
        Reboot = "reboot",
        Shutdown = "shutdown",
        Stop = "stop",
        Start = "start",
    }
);

string_enum!(
    /// How an attempt in the reset history ended (or that it has not yet).
    AttemptOutcome, "attempt outcome" {
        /// Intent recorded; Proxmox not yet confirmed the request.
        Pending = "pending",
        /// Proxmox answered with a task; the task is being followed.
        Sent = "sent",
        Ok = "ok",
        Failed = "failed",
        /// The server stopped between intent and answer; treated as sent.
        Interrupted = "interrupted",
        /// Shadow mode: what a live monitor would have done.
        WouldReset = "would_reset",
        /// A stale VM that is not ours to reset (stopped, template, HA...).
        LeftAlone = "left_alone",
    }
);

impl AttemptOutcome {
    /// Outcomes a crash may have left open.
    pub fn is_open(self) -> bool {
        matches!(self, AttemptOutcome::Pending | AttemptOutcome::Sent)
    }
}

string_enum!(
    /// What an operator may do to one VM from the dashboard or the API.
    OperatorAction, "operator action" {
        /// A hard reset through Proxmox.
        Reset = "reset",
        /// An ACPI shutdown through Proxmox.
        Shutdown = "shutdown",
        /// Hold the automatic power action announced during its veto window.
        Hold = "hold",
        /// Clear a latched state (manual, agent silent, guest fault).
        Acknowledge = "acknowledge",
        /// Let the scheduler act on this VM again.
        AutoResetOn = "auto_reset_on",
        /// Opt this VM out of automatic power actions.
        AutoResetOff = "auto_reset_off",
    }
);

string_enum!(
    /// The admin pages the server describes as data (`domain::panel`).
    PanelName, "page" {
        Settings = "settings",
        AddVm = "add-vm",
        Users = "users",
        Tokens = "tokens",
        Audit = "audit",
        Links = "links",
        /// One VM's Proxmox link: approve, change or remove it (`?vm=ID`).
        Link = "link",
        /// Maintenance windows, snoozes, tags; channels and rules for admins.
        Alerts = "alerts",
    }
);

impl PanelName {
    /// Whether the page redraws its live sections when the fleet changes: the add-VM page
    /// shows new VMs arriving.
    pub fn follows_fleet(self) -> bool {
        matches!(self, PanelName::AddVm)
    }
}

string_enum!(
    /// The spans a VM page charts.
    ChartRange, "chart range" {
        Hour = "1h",
        Day = "24h",
        Week = "7d",
        Month = "30d",
        Year = "1y",
    }
);

string_enum!(
    /// Who started an attempt, as stored in the history.
    TriggerSource, "trigger" {
        Scheduler = "scheduler",
        Admin = "admin",
    }
);

string_enum!(
    /// Whether remediation acts or only records what it would do.
    Mode, "mode" {
        /// Calls Proxmox.
        Live = "live",
        /// Records "would reset" and calls nothing, for tuning the thresholds.
        Shadow = "shadow",
    }
);

string_enum!(
    /// Automatic remediation as the settings page offers it: one switch over
    /// `AUTO_RESET_ENABLED` and `AUTO_RESET_MODE`.
    AutoReset, "auto-reset setting" {
        /// Never acts.
        Off = "off",
        /// Records what it would do, calls nothing.
        Shadow = "shadow",
        /// Acts.
        On = "on",
    }
);

string_enum!(
    /// How a VM's Proxmox link was found.
    LinkSource, "link source" {
        /// The VMID the agent reported.
        Report = "report",
        /// The SMBIOS uuid in the guest's config.
        Smbios = "smbios",
        /// A unique guest name equal to the hostname.
        Name = "name",
        /// Set by an operator.
        Manual = "manual",
    }
);

string_enum!(
    /// The operating system family an agent reports.
    OsKind, "os" {
        Linux = "linux",
        Windows = "windows",
        Other = "other",
    }
);

string_enum!(
    /// A fleet-level happening recorded in the event log.
    EventKind, "event kind" {
        /// So many VMs went stale at once that auto-reset paused.
        BreakerTripped = "breaker_tripped",
        /// The fleet recovered; auto-reset resumes after one stale timeout.
        BreakerReset = "breaker_reset",
        /// A VM's report said something its credential's VM did not enrol with.
        IdentityClaim = "identity_claim",
        /// An enrolment asked for an identity another credential holds.
        EnrolmentRefused = "enrolment_refused",
        /// A silent VM's guest is alive by Proxmox's evidence: no power action.
        AgentSilent = "agent_silent",
        /// A silent VM's guest is stopped on a hypervisor fault: no power action.
        GuestFault = "guest_fault",
        /// After a power action the guest OS is back, its agent not yet.
        GuestBack = "guest_back",
        /// An operator held an announced automatic power action during its veto window.
        ResetHeld = "reset_held",
        /// A VM used every attempt its incident allows: a person must look.
        LatchedManual = "latched_manual",
        /// A guest restarted with no power action of ours (its uptime went backwards).
        UnexpectedReboot = "unexpected_reboot",
        /// The monitor could not reach Proxmox for a while: no power action can be sent.
        ProxmoxUnreachable = "proxmox_unreachable",
        /// The monitor reaches Proxmox again after it was reported unreachable.
        ProxmoxRestored = "proxmox_restored",
    }
);

string_enum!(
    /// What a notification tells.
    NotifyKind, "notification kind" {
        VmDown = "vm_down",
        /// Only after a down was sent on the same rule.
        VmRecovered = "vm_recovered",
        /// Sent once the VM has stayed in warning for the configured minimum.
        WarningEntered = "warning_entered",
        /// Only after the warning was sent on the same rule.
        WarningLeft = "warning_left",
        PowerActionSent = "power_action_sent",
        PowerActionSucceeded = "power_action_succeeded",
        PowerActionFailed = "power_action_failed",
        LatchedManual = "latched_manual",
        /// A report claimed an identity its credential does not hold, or an enrolment an
        /// identity already enrolled.
        LinkClaimRefused = "link_claim_refused",
        BreakerTripped = "breaker_tripped",
        BreakerCleared = "breaker_cleared",
        /// The second opinion found the guest alive or faulted: no power action.
        AgentSilent = "agent_silent",
        GuestFault = "guest_fault",
        /// A guest restarted with no power action of ours.
        UnexpectedReboot = "unexpected_reboot",
        /// Every VM of one node went down together: one message, not one per VM.
        NodeUnreachable = "node_unreachable",
        /// A VM still down, repeated at the rule's interval.
        StillDown = "still_down",
        /// From the "send a test" button.
        Test = "test",
        /// The monitor's own Proxmox connection is failing.
        ProxmoxUnreachable = "proxmox_unreachable",
        /// Only after its failure was reported.
        ProxmoxRestored = "proxmox_restored",
    }
);

string_enum!(
    /// Where a notification goes.
    ChannelKind, "channel kind" {
        /// JSON, signed with HMAC-SHA256 when the channel has a secret.
        Webhook = "webhook",
        Ntfy = "ntfy",
        Gotify = "gotify",
        /// Slack and anything that takes Slack's incoming-webhook JSON (Mattermost, Teams'
        /// workflows, Rocket.Chat).
        Slack = "slack",
        Discord = "discord",
        Email = "email",
    }
);

string_enum!(
    /// How far a queued notification got.
    DeliveryState, "delivery state" {
        /// Waiting for its (next) attempt.
        Pending = "pending",
        Sent = "sent",
        /// Every attempt failed: kept as a dead letter.
        Dead = "dead",
        /// Told by a node-wide message instead.
        Grouped = "grouped",
        /// No longer true when its time came (a warning that ended within its minimum).
        Dropped = "dropped",
    }
);

string_enum!(
    /// What a maintenance window covers.
    WindowScope, "window scope" {
        All = "all",
        Vm = "vm",
        Tag = "tag",
        Node = "node",
    }
);

string_enum!(
    /// What a person or an API token may do; each role includes the ones before it.
    UserRole, "role" {
        /// Reads everything but secrets.
        Viewer = "viewer",
        /// Resets, shutdowns, acknowledgements, link approvals, per-VM auto-reset.
        Operator = "operator",
        /// Configuration, users, tokens and agent credentials.
        Admin = "admin",
    }
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + fmt::Display + FromStr<Err = UnknownValue> + PartialEq + fmt::Debug,
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        for value in all {
            let text = value.to_string();
            assert_eq!(text.parse::<T>().unwrap(), *value);
            let json = serde_json::to_string(value).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *value);
        }
    }

    #[test]
    fn every_variant_round_trips() {
        round_trips(VmStatus::ALL);
        round_trips(RemediationPhase::ALL);
        round_trips(GuestKind::ALL);
        round_trips(PowerAction::ALL);
        round_trips(AttemptOutcome::ALL);
        round_trips(TriggerSource::ALL);
        round_trips(OperatorAction::ALL);
        round_trips(ChartRange::ALL);
        round_trips(PanelName::ALL);
        round_trips(Mode::ALL);
        round_trips(AutoReset::ALL);
        round_trips(LinkSource::ALL);
        round_trips(OsKind::ALL);
        round_trips(EventKind::ALL);
        round_trips(UserRole::ALL);
        round_trips(NotifyKind::ALL);
        round_trips(ChannelKind::ALL);
        round_trips(DeliveryState::ALL);
        round_trips(WindowScope::ALL);
    }

    #[test]
    fn unknown_values_are_errors_not_defaults() {
        let err = "rebooting".parse::<RemediationPhase>().unwrap_err();
        assert_eq!(err.kind, "remediation phase");
        assert!("OK".parse::<RemediationPhase>().is_err());
        assert!("".parse::<VmStatus>().is_err());
        assert!("destroy".parse::<PowerAction>().is_err());
        assert!(serde_json::from_str::<RemediationPhase>("\"paused\"").is_err());
    }
}
