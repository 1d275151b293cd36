//! Who a report speaks for: a VM's identity comes from its credential, never from the body.
//!
//! A report carrying a VM's credential is that VM's, whatever its body says; a body that
//! disagrees with what the VM enrolled with is a claim to record, not a change to apply.
//! A report carrying an enrolment token asks to become a VM; these rules say whether it may.

use crate::heartbeat::Heartbeat;
use crate::ids::Vmid;
use std::fmt;

/// What a VM enrolled with, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledIdentity<'a> {
    pub hostname: &'a str,
    pub machine_id: Option<&'a str>,
    pub reported_vmid: Option<Vmid>,
}

/// Something a body said that its credential's VM did not enrol with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Hostname(String),
    MachineId(String),
    Vmid(Vmid),
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Hostname(name) => write!(f, "hostname {name:?}"),
            Claim::MachineId(uuid) => write!(f, "machine_id {uuid}"),
            Claim::Vmid(vmid) => write!(f, "vmid {vmid}"),
        }
    }
}

/// What `report` says that differs from the identity its credential belongs to. A part the
/// report leaves out is no claim (an agent that cannot read its uuid still reports).
pub fn claims(enrolled: &EnrolledIdentity<'_>, report: &Heartbeat) -> Vec<Claim> {
    let mut found = Vec::new();
    // DNS names are case-insensitive; an agent that changes case claims nothing.
    if !report.hostname.eq_ignore_ascii_case(enrolled.hostname) {
        found.push(Claim::Hostname(report.hostname.clone()));
    }
    if let Some(uuid) = report.machine_id.as_deref()
        && enrolled.machine_id != Some(uuid)
    {
        found.push(Claim::MachineId(uuid.to_owned()));
    }
    if let Some(vmid) = report.vmid
        && enrolled.reported_vmid != Some(vmid)
    {
        found.push(Claim::Vmid(vmid));
    }
    found
}

/// Where the VM an enrolment report matches stands with its credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialState {
    /// No credential in force: never enrolled, or its credential was revoked.
    None,
    /// A credential was handed out and never used: its agent has not moved over yet (an
    /// agent from before per-VM credentials ignores it and keeps sending the fleet token).
    Issued,
    /// Its credential is in use (or an admin issued one): the identity is taken.
    Enrolled,
}

/// What an enrolment token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    Expired,
    UsedUp,
    Revoked,
}

/// Whether an enrolment token may enrol one more VM at `now_ms`.
pub fn check_token(
    expires_ms: Option<i64>,
    max_uses: Option<i64>,
    uses: i64,
    revoked: bool,
    now_ms: i64,
) -> TokenCheck {
    if revoked {
        TokenCheck::Revoked
    } else if expires_ms.is_some_and(|at| now_ms >= at) {
        TokenCheck::Expired
    } else if max_uses.is_some_and(|max| uses >= max) {
        TokenCheck::UsedUp
    } else {
        TokenCheck::Valid
    }
}

/// What an enrolment report does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolment {
    /// A VM nobody knows: create it and hand out its credential.
    New,
    /// The matched VM has no credential (from before per-VM credentials, or revoked): store
    /// the report and hand out its credential.
    Existing,
    /// The matched VM's credential was handed out and never used: its agent has not moved
    /// over (or the answer was lost). Store the report, hand out nothing: the credential
    /// already issued stays the only one, so no one else can obtain or replace it.
    Pending,
    /// The matched VM's identity is taken: store nothing and record the attempt.
    Refused,
}

/// Whether a refused enrolment is evidence that the VM's own agent lost its credential, so
/// the VM must be held from auto-reset: only when it carries the uuid the VM enrolled with
/// (not readable from another guest). A name alone holds nothing, or anyone with an
/// enrolment token could keep every VM from ever being reset.
pub fn refusal_holds(enrolled_uuid: Option<&str>, claimed_uuid: Option<&str>) -> bool {
    enrolled_uuid.is_some() && enrolled_uuid == claimed_uuid
}

/// Decides an enrolment from the state of the VM its body matches, if any.
pub fn enrol(matched: Option<CredentialState>) -> Enrolment {
    match matched {
        None => Enrolment::New,
        Some(CredentialState::None) => Enrolment::Existing,
        Some(CredentialState::Issued) => Enrolment::Pending,
        Some(CredentialState::Enrolled) => Enrolment::Refused,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::enums::OsKind;

    fn report(hostname: &str, machine_id: Option<&str>, vmid: Option<i64>) -> Heartbeat {
        Heartbeat {
            hostname: hostname.into(),
            os: OsKind::Linux,
            machine_id: machine_id.map(Into::into),
            vmid: vmid.map(|v| Vmid::try_from(v).unwrap()),
            node: None,
            agent_version: None,
            cpu_percent: 1.0,
            ram_used_bytes: 1,
            ram_total_bytes: 2,
            disks: vec![],
            disk_used_bytes: 0,
            disk_total_bytes: 0,
            disk_max_percent: None,
            uptime_seconds: 1,
            observed_ms: 0,
            received_ms: 0,
        }
    }

    #[test]
    fn claims_are_what_differs_from_the_enrolled_identity() {
        let enrolled = EnrolledIdentity {
            hostname: "web-01",
            machine_id: Some("aaaa"),
            reported_vmid: Some(Vmid::try_from(101).unwrap()),
        };
        let cases: &[(Heartbeat, Vec<Claim>)] = &[
            (report("web-01", Some("aaaa"), Some(101)), vec![]),
            (report("WEB-01", None, None), vec![]),
            (
                report("db-01", Some("aaaa"), Some(101)),
                vec![Claim::Hostname("db-01".into())],
            ),
            (
                report("web-01", Some("bbbb"), Some(102)),
                vec![
                    Claim::MachineId("bbbb".into()),
                    Claim::Vmid(Vmid::try_from(102).unwrap()),
                ],
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(&claims(&enrolled, body), expected, "{body:?}");
        }
        // A VM that enrolled without a uuid or VMID does not gain one from its body.
        let bare = EnrolledIdentity {
            hostname: "web-01",
            machine_id: None,
            reported_vmid: None,
        };
        assert_eq!(
            claims(&bare, &report("web-01", Some("bbbb"), Some(108))),
            vec![
                Claim::MachineId("bbbb".into()),
                Claim::Vmid(Vmid::try_from(108).unwrap())
            ]
        );
    }

    #[test]
    fn a_taken_identity_is_refused_and_only_a_taken_one() {
        assert_eq!(enrol(None), Enrolment::New);
        assert_eq!(enrol(Some(CredentialState::None)), Enrolment::Existing);
        assert_eq!(enrol(Some(CredentialState::Issued)), Enrolment::Pending);
        assert_eq!(enrol(Some(CredentialState::Enrolled)), Enrolment::Refused);
    }

    #[test]
    fn only_the_enrolled_uuid_holds_a_vm() {
        assert!(refusal_holds(Some("aaaa"), Some("aaaa")));
        assert!(!refusal_holds(Some("aaaa"), Some("bbbb")));
        assert!(!refusal_holds(Some("aaaa"), None));
        assert!(!refusal_holds(None, None));
    }

    #[test]
    fn tokens_expire_run_out_and_are_revoked() {
        assert_eq!(check_token(None, None, 999, false, 5), TokenCheck::Valid);
        assert_eq!(
            check_token(Some(6), Some(2), 1, false, 5),
            TokenCheck::Valid
        );
        assert_eq!(check_token(Some(5), None, 0, false, 5), TokenCheck::Expired);
        assert_eq!(check_token(None, Some(2), 2, false, 5), TokenCheck::UsedUp);
        assert_eq!(check_token(None, None, 0, true, 5), TokenCheck::Revoked);
    }
}
