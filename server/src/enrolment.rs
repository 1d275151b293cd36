//! Whose each report is: a VM credential names its VM; an enrolment token asks to become one.
//!
//! Runs inside the writer's transaction, so a revocation, a rotation or a concurrent
//! enrolment on another replica is seen exactly as committed.

use crate::auth;
use crate::db::identity::{CredentialRow, IdentityStore, TokenRow, states};
use crate::db::reports::{ReportWriter, match_vm};
use crate::db::store::VmRow;
use crate::ingest::{IngestError, Submission};
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

/// A report admitted as one VM's, with the identity fields that VM enrolled with.
pub struct Admitted {
    pub vm_id: VmId,
    pub report: Heartbeat,
    pub credential: Option<Secret>,
}

/// The outcome per submission (in order) and the VM rows as they were before the batch.
pub struct Admission {
    pub outcomes: Vec<Result<Admitted, IngestError>>,
    pub known: Vec<VmRow>,
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
    let known_ids: Vec<i64> = known.iter().map(|r| r.id).collect();
    let mut credential_state = states(&c.credentials_of(&known_ids).await?);

    let mut outcomes: Vec<Option<Result<Admitted, IngestError>>> =
        submissions.iter().map(|_| None).collect();

    // Credentials first: a VM whose credential is used in this batch is enrolled for any
    // enrolment in the same batch.
    let mut first_uses = Vec::new();
    for (slot, submission) in outcomes.iter_mut().zip(submissions) {
        let Presented::Credential { hash } = &submission.presented else {
            continue;
        };
        let outcome = match credentials.get(hash) {
            None => Err(IngestError::Unauthorized),
            Some(credential) => {
                let vm_id = VmId(credential.vm_id);
                match known.iter().find(|r| r.id == credential.vm_id) {
                    // Deleted meanwhile: the credential went with it.
                    None => Err(IngestError::Unauthorized),
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

    let mut issued: HashMap<VmId, Secret> = HashMap::new();
    let mut token_uses: HashMap<i64, i64> = HashMap::new();
    for (slot, submission) in outcomes.iter_mut().zip(submissions) {
        if slot.is_some() {
            continue;
        }
        let report = &submission.report;
        let token = match &submission.presented {
            Presented::FleetToken => None,
            Presented::EnrolmentToken { hash } => match tokens.get(hash) {
                Some(token) => Some(token),
                None => {
                    *slot = Some(Err(IngestError::Unauthorized));
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
                    *slot = Some(Err(IngestError::Unauthorized));
                    continue;
                }
                match token.bound_guest() {
                    Ok(bound) => bound,
                    Err(reason) => {
                        tracing::error!(token_id = token.id, %reason, "stored enrolment token binding is not valid; refusing it");
                        *slot = Some(Err(IngestError::Unauthorized));
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
        let vm_id = match (decision, matched) {
            (Enrolment::Refused, Some(row)) => {
                let vm_id = row.vm_id();
                refuse(c, vm_id, report, now_ms).await?;
                *slot = Some(Err(IngestError::IdentityTaken));
                continue;
            }
            (Enrolment::Existing, Some(row)) => row.vm_id(),
            _ => {
                let row = c.create_vm(report).await?;
                let vm_id = row.vm_id();
                known.push(row);
                vm_id
            }
        };
        if let Some(guest) = &bound {
            c.link_bound_guest(vm_id, guest).await?;
        }
        if let Some(token) = token {
            c.count_token_use(token.id, now_ms).await?;
            *token_uses.entry(token.id).or_insert(0) += 1;
        }
        // Two enrolments of one VM in a batch get the same credential: only one can be kept.
        let credential = match issued.get(&vm_id) {
            Some(secret) => secret.clone(),
            None => {
                let secret = auth::generate_secret(CREDENTIAL_PREFIX);
                c.issue_credential(vm_id, &auth::hash_token(secret.expose()), false, now_ms)
                    .await?;
                issued.insert(vm_id, secret.clone());
                credential_state.insert(vm_id, CredentialState::Issued);
                secret
            }
        };
        *slot = Some(Ok(Admitted {
            vm_id,
            report: report.clone(),
            credential: Some(credential),
        }));
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Err(IngestError::Unauthorized)))
        .collect();
    Ok(Admission { outcomes, known })
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
    vm_id: VmId,
    report: &Heartbeat,
    now_ms: i64,
) -> QueryResult<()> {
    tracing::warn!(%vm_id, hostname = %report.hostname, "enrolment refused: the identity is already enrolled");
    let message = format!(
        "an agent asked to enrol as {:?}{}, which another credential holds; refused, and \
         auto-reset is held until an operator looks or the VM reports with its credential",
        report.hostname,
        report
            .machine_id
            .as_deref()
            .map(|m| format!(" (machine_id {m})"))
            .unwrap_or_default()
    );
    c.insert_event_once(
        EventKind::EnrolmentRefused,
        vm_id,
        &message,
        now_ms,
        CLAIM_EVENT_WINDOW_MS,
    )
    .await?;
    c.hold_for_operator(
        vm_id,
        "held: an enrolment claimed this VM's identity (see events)",
    )
    .await
}
