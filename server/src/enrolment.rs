//! Whose each report is: a VM credential names its VM; an enrolment token asks to become one.
//!
//! Runs inside the writer's transaction: a revocation or a rotation holds for the next
//! report. Replicas enrolling one VM at once collide on the one-credential-per-VM index;
//! the loser's batch is retried and finds the winner's credential.

use crate::auth;
use crate::db::identity::{CredentialRow, IdentityStore, TokenRow, states};
use crate::db::reports::{ReportWriter, match_vm};
use crate::db::store::VmRow;
use diesel::QueryResult;
use domain::heartbeat::Heartbeat;
use domain::identity::{self, CredentialState, EnrolledIdentity, Enrolment, TokenCheck};
use domain::{EventKind, Secret, VmId, Vmid};
use std::collections::HashMap;

/// Prefix of per-VM credentials, so a bearer says which kind it is without a lookup.
pub const CREDENTIAL_PREFIX: &str = "vmhc_vm_";
/// A repeated claim is recorded once per this window.
const CLAIM_EVENT_WINDOW_MS: i64 = 3_600_000;

/// What a report's sender proved about who it is.
#[derive(Clone, Debug)]
pub enum Presented {
    /// The fleet's shared agent token (`AGENT_TOKEN`): an enrolment token without limits,
    /// kept so that agents installed before per-VM credentials keep reporting.
    FleetToken,
    /// A per-VM credential, by hash.
    Credential { hash: String },
    /// Some other bearer: an admin-created enrolment token if one has this hash.
    EnrolmentToken { hash: String },
}

impl Presented {
    /// Sorts a bearer token (already known not to be the fleet token) by its prefix.
    pub fn of_bearer(token: &str) -> Self {
        let hash = auth::hash_token(token);
        if token.starts_with(CREDENTIAL_PREFIX) {
            Presented::Credential { hash }
        } else {
            Presented::EnrolmentToken { hash }
        }
    }
}

/// Credentials this replica has admitted a report with, by a 64-bit prefix of their hash:
/// 8 bytes a VM, so a large fleet fits in a few MB. Only picks the rate limit a report
/// is counted against (per credential when known, per client address when not: made-up
/// credentials must not each get a fresh allowance); admission itself always checks the
/// database, so a revoked or rotated credential is refused whatever this holds.
#[derive(Debug, Default)]
pub struct KnownCredentials(std::sync::Mutex<std::collections::HashSet<u64>>);

/// Most credentials remembered; past it the set starts over (the cost: a few reports per
/// VM counted per address until each is known again).
const MAX_KNOWN_CREDENTIALS: usize = 1_000_000;

impl KnownCredentials {
    fn key(hash: &str) -> Option<u64> {
        u64::from_str_radix(hash.get(..16)?, 16).ok()
    }

    pub fn contains(&self, hash: &str) -> bool {
        Self::key(hash).is_some_and(|key| self.0.lock().is_ok_and(|set| set.contains(&key)))
    }

    pub fn insert(&self, hash: &str) {
        if let (Some(key), Ok(mut set)) = (Self::key(hash), self.0.lock()) {
            if set.len() >= MAX_KNOWN_CREDENTIALS {
                set.clear();
            }
            set.insert(key);
        }
    }
}

/// A report and what its sender proved about who it is.
#[derive(Clone, Debug)]
pub struct Submission {
    pub report: Heartbeat,
    pub presented: Presented,
}

impl Submission {
    /// A report sent with the fleet's shared agent token.
    pub fn fleet(report: Heartbeat) -> Self {
        Self {
            report,
            presented: Presented::FleetToken,
        }
    }
}

/// Why a report is not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential or enrolment token in force.
    Unauthorized,
    /// An enrolment asked for an identity another credential holds.
    IdentityTaken,
}

/// A report admitted as one VM's, with the identity fields that VM enrolled with.
pub struct Admitted {
    pub vm_id: VmId,
    pub report: Heartbeat,
    pub credential: Option<Secret>,
}

/// The outcome per submission (in order) and the VM rows as they were before the batch.
pub struct Admission {
    pub outcomes: Vec<Result<Admitted, Refusal>>,
    pub known: Vec<VmRow>,
    /// Whether admitting wrote to rows of `known` (a hold on a VM whose identity was
    /// claimed, a guest link): `known` then no longer says what the database holds.
    pub wrote_vms: bool,
}

/// Decides whose each report is, enrolling and recording claims as it goes.
pub async fn admit<C: ReportWriter + IdentityStore + Send>(
    c: &mut C,
    submissions: &[Submission],
    now_ms: i64,
) -> QueryResult<Admission> {
    let credential_hashes: Vec<&str> = submissions
        .iter()
        .filter_map(|s| match &s.presented {
            Presented::Credential { hash } => Some(hash.as_str()),
            _ => None,
        })
        .collect();
    let token_hashes: Vec<&str> = submissions
        .iter()
        .filter_map(|s| match &s.presented {
            Presented::EnrolmentToken { hash } => Some(hash.as_str()),
            _ => None,
        })
        .collect();
    let credentials: HashMap<String, CredentialRow> = if credential_hashes.is_empty() {
        HashMap::new()
    } else {
        c.credentials_by_hash(&credential_hashes)
            .await?
            .into_iter()
            .map(|row| (row.token_hash.clone(), row))
            .collect()
    };
    let tokens: HashMap<String, TokenRow> = if token_hashes.is_empty() {
        HashMap::new()
    } else {
        c.tokens_by_hash(&token_hashes)
            .await?
            .into_iter()
            .map(|row| (row.token_hash.clone(), row))
            .collect()
    };

    let enrolling: Vec<&Heartbeat> = submissions
        .iter()
        .filter(|s| enrols(&s.presented, &tokens))
        .map(|s| &s.report)
        .collect();
    let mut wrote_vms = false;
    let mut known = if enrolling.is_empty() {
        Vec::new()
    } else {
        c.candidate_vms(&enrolling).await?
    };
    let credential_vms: Vec<i64> = credentials
        .values()
        .map(|row| row.vm_id)
        .filter(|id| !known.iter().any(|r| r.id == *id))
        .collect();
    if !credential_vms.is_empty() {
        known.extend(c.vms_by_id(&credential_vms).await?);
    }
    // Only enrolments decide by the credentials a VM holds; a batch of credentials alone
    // (the steady state) skips the read.
    let mut credential_state = if enrolling.is_empty() {
        HashMap::new()
    } else {
        let known_ids: Vec<i64> = known.iter().map(|r| r.id).collect();
        states(&c.credentials_of(&known_ids).await?)
    };

    let mut outcomes: Vec<Option<Result<Admitted, Refusal>>> =
        submissions.iter().map(|_| None).collect();

    // Credentials first: a VM whose credential is used in this batch is enrolled for any
    // enrolment in the same batch.
    let mut first_uses = Vec::new();
    for (slot, submission) in outcomes.iter_mut().zip(submissions) {
        let Presented::Credential { hash } = &submission.presented else {
            continue;
        };
        let outcome = match credentials.get(hash) {
            None => Err(Refusal::Unauthorized),
            Some(credential) => {
                let vm_id = VmId(credential.vm_id);
                match known.iter().find(|r| r.id == credential.vm_id) {
                    // Deleted meanwhile: the credential went with it.
                    None => Err(Refusal::Unauthorized),
                    Some(row) => {
                        if credential.confirmed_ms.is_none() {
                            first_uses.push(credential.id);
                        }
                        credential_state.insert(vm_id, CredentialState::Enrolled);
                        record_claims(c, row, &submission.report, now_ms).await?;
                        Ok(Admitted {
                            vm_id,
                            report: as_enrolled(row, &submission.report),
                            credential: None,
                        })
                    }
                }
            }
        };
        *slot = Some(outcome);
    }
    c.confirm_credentials(&first_uses, now_ms).await?;

    let mut token_uses: HashMap<i64, i64> = HashMap::new();
    // Enrolments by the key a new VM takes (its uuid, else its host name): replicas
    // creating the same new VMs at once then claim the keys in one order, so one waits
    // for the other instead of both deadlocking. Stable: reports with one key keep the
    // order they arrived in.
    let mut enrolments: Vec<_> = outcomes
        .iter_mut()
        .zip(submissions)
        .filter(|(slot, _)| slot.is_none())
        .collect();
    enrolments.sort_by(|(_, a), (_, b)| creation_key(&a.report).cmp(creation_key(&b.report)));
    for (slot, submission) in enrolments {
        let report = &submission.report;
        let token = match &submission.presented {
            Presented::FleetToken => None,
            Presented::EnrolmentToken { hash } => match tokens.get(hash) {
                Some(token) => Some(token),
                None => {
                    *slot = Some(Err(Refusal::Unauthorized));
                    continue;
                }
            },
            Presented::Credential { .. } => continue,
        };
        let bound = match token {
            None => None,
            Some(token) => {
                let used = token
                    .uses
                    .saturating_add(token_uses.get(&token.id).copied().unwrap_or(0));
                let check = identity::check_token(
                    token.expires_ms,
                    token.max_uses,
                    used,
                    token.revoked_ms.is_some(),
                    now_ms,
                );
                if check != TokenCheck::Valid {
                    tracing::info!(token_id = token.id, ?check, "enrolment token refused");
                    *slot = Some(Err(Refusal::Unauthorized));
                    continue;
                }
                match token.bound_guest() {
                    Ok(bound) => bound,
                    Err(reason) => {
                        tracing::error!(token_id = token.id, %reason, "stored enrolment token binding is not valid; refusing it");
                        *slot = Some(Err(Refusal::Unauthorized));
                        continue;
                    }
                }
            }
        };
        let matched = match_vm(&known, report).and_then(|i| known.get(i));
        let decision = identity::enrol(matched.map(|row| {
            credential_state
                .get(&row.vm_id())
                .copied()
                .unwrap_or(CredentialState::None)
        }));
        // A token bound to one guest never takes a VM linked to another guest.
        let bound_elsewhere = matches!((&bound, matched), (Some(guest), Some(row))
            if row.verified_guest().is_some_and(|linked| linked != *guest));
        let (vm_id, issues) = match (decision, matched) {
            (Enrolment::Refused, Some(row)) => {
                refuse(c, row, report, now_ms).await?;
                wrote_vms = true;
                *slot = Some(Err(Refusal::IdentityTaken));
                continue;
            }
            (_, Some(row)) if bound_elsewhere => {
                refuse(c, row, report, now_ms).await?;
                wrote_vms = true;
                *slot = Some(Err(Refusal::IdentityTaken));
                continue;
            }
            (Enrolment::Existing, Some(row)) => (Some(row.vm_id()), true),
            (Enrolment::Pending, Some(row)) => (Some(row.vm_id()), false),
            _ => (None, true),
        };
        // A use is counted, atomically against the limit, for each credential handed out.
        if issues
            && let Some(token) = token
            && !c.count_token_use(token.id, now_ms).await?
        {
            *slot = Some(Err(Refusal::Unauthorized));
            continue;
        }
        let vm_id = match vm_id {
            Some(id) => id,
            None => {
                let row = c.create_vm(report).await?;
                let vm_id = row.vm_id();
                known.push(row);
                vm_id
            }
        };
        if let Some(guest) = &bound {
            c.link_bound_guest(vm_id, guest).await?;
            wrote_vms = true;
        }
        let credential = if issues {
            let secret = auth::generate_secret(CREDENTIAL_PREFIX);
            c.issue_credential(vm_id, &auth::hash_token(secret.expose()), false, now_ms)
                .await?;
            credential_state.insert(vm_id, CredentialState::Issued);
            if let Some(token) = token {
                *token_uses.entry(token.id).or_insert(0) += 1;
            }
            Some(secret)
        } else {
            None
        };
        *slot = Some(Ok(Admitted {
            vm_id,
            report: report.clone(),
            credential,
        }));
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Err(Refusal::Unauthorized)))
        .collect();
    Ok(Admission {
        outcomes,
        known,
        wrote_vms,
    })
}

/// The unique key a VM created for this report takes: `vms_machine_id`, else
/// `vms_hostname_without_machine_id`.
fn creation_key(report: &Heartbeat) -> &str {
    report.machine_id.as_deref().unwrap_or(&report.hostname)
}

/// Whether a submission asks to enrol (as opposed to naming its VM by credential).
fn enrols(presented: &Presented, tokens: &HashMap<String, TokenRow>) -> bool {
    match presented {
        Presented::FleetToken => true,
        Presented::EnrolmentToken { hash } => tokens.contains_key(hash),
        Presented::Credential { .. } => false,
    }
}

/// The report with the identity its VM enrolled with: whatever the body says about who
/// it is stays a claim.
fn as_enrolled(row: &VmRow, report: &Heartbeat) -> Heartbeat {
    Heartbeat {
        hostname: row.hostname.clone(),
        machine_id: row.machine_id.clone(),
        vmid: row.reported_vmid.and_then(|v| Vmid::try_from(v).ok()),
        node: row.reported_node.as_deref().and_then(|n| n.parse().ok()),
        ..report.clone()
    }
}

async fn record_claims<C: IdentityStore + Send>(
    c: &mut C,
    row: &VmRow,
    report: &Heartbeat,
    now_ms: i64,
) -> QueryResult<()> {
    let enrolled = EnrolledIdentity {
        hostname: &row.hostname,
        machine_id: row.machine_id.as_deref(),
        reported_vmid: row.reported_vmid.and_then(|v| Vmid::try_from(v).ok()),
    };
    for claim in identity::claims(&enrolled, report) {
        tracing::warn!(vm_id = row.id, %claim, "a VM's report claims an identity it did not enrol with; not applied");
        let message = format!("reported {claim}, which it did not enrol with; not applied");
        c.insert_event_once(
            EventKind::IdentityClaim,
            row.vm_id(),
            &message,
            now_ms,
            CLAIM_EVENT_WINDOW_MS,
        )
        .await?;
    }
    Ok(())
}

async fn refuse<C: IdentityStore + Send>(
    c: &mut C,
    row: &VmRow,
    report: &Heartbeat,
    now_ms: i64,
) -> QueryResult<()> {
    let vm_id = row.vm_id();
    let holds = identity::refusal_holds(row.machine_id.as_deref(), report.machine_id.as_deref());
    tracing::warn!(%vm_id, hostname = %report.hostname, "enrolment refused: the identity is already enrolled");
    let message = format!(
        "an agent asked to enrol as {:?}{}, which another credential holds; refused{}",
        report.hostname,
        report
            .machine_id
            .as_deref()
            .map(|m| format!(" (machine_id {m})"))
            .unwrap_or_default(),
        if holds {
            ", and auto-reset is held until an operator looks or the VM reports with its \
             credential (it carried this VM's uuid: its own agent may have lost the credential)"
        } else {
            ""
        }
    );
    c.insert_event_once(
        EventKind::EnrolmentRefused,
        vm_id,
        &message,
        now_ms,
        CLAIM_EVENT_WINDOW_MS,
    )
    .await?;
    if holds {
        c.hold_for_operator(
            vm_id,
            "held: an enrolment with this VM's uuid was refused (see events)",
        )
        .await?;
    }
    Ok(())
}
