//! The HTTP client: token auth, TLS trust, the `{"data": ...}` envelope, typed errors, retries.

use crate::tls;
use crate::types::{self, PveResource, PveTaskEntry, PveTaskStatus, PveVmConfig, PveVmStatus};
use domain::evidence::AgentPing;
use domain::{GuestKind, GuestRef, NodeName, PowerAction, Secret, Vmid};
use std::time::Duration;

/// How the client decides to trust the server's certificate.
#[derive(Clone, Debug, PartialEq)]
pub enum TlsTrust {
    /// The system's trust store (a certificate from a public CA, e.g. ACME).
    System,
    /// PEM file with the cluster CA (`/etc/pve/pve-root-ca.pem`) or the node certificate.
    CaFile(std::path::PathBuf),
    /// SHA-256 of the leaf certificate, as `pvenode cert info` prints it.
    Fingerprint([u8; 32]),
    /// No verification at all; logged as a warning at start.
    Insecure,
}

/// Connection settings for one Proxmox cluster.
#[derive(Clone)]
pub struct PveSettings {
    /// e.g. `https://pve1:8006`
    pub host: String,
    pub user: String,
    pub token_id: String,
    pub secret: Secret,
    pub trust: TlsTrust,
    pub timeout: Duration,
}

/// Every way a Proxmox call can fail, split by what the caller should do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PveError {
    #[error("authentication failed: {0}")]
    Unauthorized(String),
    #[error("permission denied: {0}")]
    Forbidden(String),
    #[error("VM not on that node: {0}")]
    VmNotFound(String),
    #[error("VM not running: {0}")]
    NotRunning(String),
    #[error("request rejected: {0}")]
    BadRequest(String),
    #[error("Proxmox error {status}: {message}")]
    Server { status: u16, message: String },
    /// Node offline (595/596), connection failures, timeouts: worth retrying later.
    #[error("Proxmox unreachable: {0}")]
    Transient(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A POST may have reached the node but no answer came back, and no task for it could
    /// be found: the action may or may not run. Never retried blindly.
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// The node's certificate failed verification (wrong pin, unknown CA): a setting to
    /// fix or someone in the middle, not an outage to wait out. Never retried.
    #[error("Proxmox's certificate is not trusted: {0}")]
    Untrusted(String),
}

impl PveError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PveError::Transient(_))
    }
}

/// The client; cheap to clone.
#[derive(Clone)]
pub struct PveClient {
    http: reqwest::Client,
    base: String,
    auth_header: String,
    /// `user!token`, as Proxmox writes it into the UPIDs of tasks this token starts.
    task_owner: String,
}

/// Retries for transient failures of idempotent calls.
const GET_ATTEMPTS: u32 = 3;

impl PveClient {
    pub fn new(settings: &PveSettings) -> anyhow::Result<Self> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("vm-healthcheck/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(settings.timeout);
        let builder = match &settings.trust {
            TlsTrust::System => builder,
            TlsTrust::CaFile(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("PROXMOX_CA_FILE {}: {e}", path.display()))?;
                let mut builder = builder.tls_built_in_root_certs(false);
                for cert in reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| anyhow::anyhow!("PROXMOX_CA_FILE {}: {e}", path.display()))?
                {
                    builder = builder.add_root_certificate(cert);
                }
                builder
            }
            TlsTrust::Fingerprint(fp) => builder.use_preconfigured_tls(tls::pinned_config(*fp)?),
            TlsTrust::Insecure => builder.danger_accept_invalid_certs(true),
        };
        Ok(Self {
            http: builder.build()?,
            base: format!("{}/api2/json", settings.host.trim_end_matches('/')),
            auth_header: format!(
                "PVEAPIToken={}!{}={}",
                settings.user,
                settings.token_id,
                settings.secret.expose()
            ),
            task_owner: format!("{}!{}", settings.user, settings.token_id),
        })
    }

    /// All QEMU VMs and LXC containers of the cluster.
    pub async fn cluster_vms(&self) -> Result<Vec<PveResource>, PveError> {
        self.get("/cluster/resources?type=vm").await
    }

    pub async fn vm_status(&self, guest: &GuestRef) -> Result<PveVmStatus, PveError> {
        let path = format!(
            "/nodes/{}/{}/{}/status/current",
            enc(guest.node.as_str()),
            guest.kind.as_str(),
            guest.vmid
        );
        self.get(&path).await
    }

    /// The SMBIOS uuid from a QEMU VM's config, lower-case.
    pub async fn vm_smbios_uuid(
        &self,
        node: &NodeName,
        vmid: Vmid,
    ) -> Result<Option<String>, PveError> {
        let config: PveVmConfig = self
            .get(&format!("/nodes/{}/qemu/{vmid}/config", enc(node.as_str())))
            .await?;
        Ok(config.smbios1.as_deref().and_then(types::smbios_uuid))
    }

    /// Starts a power action; returns the task's UPID at once.
    ///
    /// When the request may have been delivered but no answer came (a 596 from the node
    /// proxy, a timeout), the node's task list decides: the task found is the answer, and
    /// without one the outcome stays unknown. The action is never sent twice.
    pub async fn power_action(
        &self,
        guest: &GuestRef,
        action: PowerAction,
    ) -> Result<String, PveError> {
        self.start_action(guest, action, "").await
    }

    /// An ACPI reboot that Proxmox gives up on after `timeout_seconds` of waiting for the
    /// guest to shut down (the task then fails).
    pub async fn graceful_reboot(
        &self,
        guest: &GuestRef,
        timeout_seconds: u64,
    ) -> Result<String, PveError> {
        let form = format!("timeout={timeout_seconds}");
        self.start_action(guest, PowerAction::Reboot, &form).await
    }

    /// Asks the QEMU guest agent for a ping. Its failures are answers too (not configured,
    /// not running, timed out); only the call's own failures are errors.
    pub async fn agent_ping(&self, guest: &GuestRef) -> Result<AgentPing, PveError> {
        if guest.kind != GuestKind::Qemu {
            return Ok(AgentPing::NotConfigured);
        }
        let path = format!(
            "/nodes/{}/qemu/{}/agent/ping",
            enc(guest.node.as_str()),
            guest.vmid
        );
        match self.post::<serde_json::Value>(&path, "").await {
            Ok(_) => Ok(AgentPing::Answered),
            Err(err) => match PveError::from(err) {
                PveError::Forbidden(_) => Ok(AgentPing::Unavailable("permission".into())),
                PveError::Server { message, .. } | PveError::NotRunning(message) => {
                    Ok(ping_failure(&message))
                }
                other => Err(other),
            },
        }
    }

    async fn start_action(
        &self,
        guest: &GuestRef,
        action: PowerAction,
        form: &str,
    ) -> Result<String, PveError> {
        let path = format!(
            "/nodes/{}/{}/{}/status/{}",
            enc(guest.node.as_str()),
            guest.kind.as_str(),
            guest.vmid,
            action.as_str()
        );
        let sent_at = unix_seconds();
        match self.post(&path, form).await {
            Err(SendError::MaybeDelivered(why)) => {
                tracing::warn!(error = %why, vmid = %guest.vmid, "power action unanswered; looking for its task");
                // Not finding out is as ambiguous as not being answered: never a plain
                // failure that would be retried.
                match self.find_task(guest, action, sent_at).await {
                    Ok(Some(upid)) => Ok(upid),
                    Ok(None) => Err(PveError::Ambiguous(format!(
                        "{why}; no {} task found",
                        action.as_str()
                    ))),
                    Err(err) => Err(PveError::Ambiguous(format!(
                        "{why}; the task list could not be read: {err}"
                    ))),
                }
            }
            other => other.map_err(Into::into),
        }
    }

    /// The newest task of `action` on `guest` started at or after `since` (epoch seconds).
    pub async fn find_task(
        &self,
        guest: &GuestRef,
        action: PowerAction,
        since: i64,
    ) -> Result<Option<String>, PveError> {
        let kind = task_type(guest.kind, action);
        // Node clocks may lag ours a little: allow some slack before the send.
        let since = since.saturating_sub(30);
        let path = format!(
            "/nodes/{}/tasks?vmid={}&typefilter={kind}&since={since}&source=all",
            enc(guest.node.as_str()),
            guest.vmid
        );
        let tasks: Vec<PveTaskEntry> = self.get(&path).await?;
        let vmid = guest.vmid.to_string();
        Ok(tasks
            .into_iter()
            .filter(|t| t.kind.as_deref() == Some(kind))
            .filter(|t| t.id.as_deref().is_none_or(|id| id == vmid))
            .filter(|t| t.starttime.is_none_or(|s| s >= since))
            // A token that may read every task also sees other replicas' and people's
            // resets of this guest: only a task started with our own token is ours.
            .filter(|t| types::upid_user(&t.upid) == Some(self.task_owner.as_str()))
            .max_by_key(|t| t.starttime.unwrap_or(0))
            .map(|t| t.upid))
    }

    /// The release, e.g. `9.1.3` (`GET /version`).
    pub async fn version(&self) -> Result<String, PveError> {
        #[derive(serde::Deserialize)]
        struct Version {
            version: String,
        }
        let v: Version = self.get("/version").await?;
        Ok(v.version)
    }

    /// The privileges this token holds on `acl_path` (`GET /access/permissions?path=`).
    pub async fn privileges(
        &self,
        acl_path: &str,
    ) -> Result<std::collections::BTreeSet<String>, PveError> {
        let answer: std::collections::HashMap<
            String,
            std::collections::HashMap<String, serde_json::Value>,
        > = self
            .get(&format!("/access/permissions?path={}", enc(acl_path)))
            .await?;
        Ok(answer
            .get(acl_path)
            .map(|privileges| privileges.keys().cloned().collect())
            .unwrap_or_default())
    }

    pub async fn task_status(&self, upid: &str) -> Result<PveTaskStatus, PveError> {
        // The task lives on the node named inside the UPID, whichever node we asked.
        let node = types::upid_node(upid)
            .ok_or_else(|| PveError::Decode(format!("not a UPID: {upid}")))?;
        self.get(&format!("/nodes/{}/tasks/{}/status", enc(node), enc(upid)))
            .await
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, PveError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let request = self
                .http
                .get(format!("{}{path}", self.base))
                .header("Authorization", &self.auth_header);
            match self.send(request).await {
                Err(err) if err.is_transient() && attempt < GET_ATTEMPTS => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// POSTs are retried only when the request provably never reached the node (connection
    /// refused, 595 from the node proxy), never after a 596 or a timeout: a reset must not
    /// run twice.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        form: &str,
    ) -> Result<T, SendError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let request = self
                .http
                .post(format!("{}{path}", self.base))
                .header("Authorization", &self.auth_header)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form.to_owned());
            match self.send_inner(request).await {
                Err(SendError::NotDelivered(msg)) if attempt < GET_ATTEMPTS => {
                    tracing::debug!(error = %msg, path, "Proxmox POST not delivered; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                // A 2xx whose body makes no sense: the node accepted the request.
                Err(SendError::Failed(PveError::Decode(why))) => {
                    return Err(SendError::MaybeDelivered(why));
                }
                other => return other,
            }
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, PveError> {
        self.send_inner(request).await.map_err(Into::into)
    }

    async fn send_inner<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, SendError> {
        let response = request.send().await.map_err(|err| {
            // A TLS failure while connecting means nothing was sent; later (reading the
            // answer) the request may have arrived, so it stays "maybe delivered".
            if let Some(why) = tls_rejection(&err).filter(|_| err.is_connect()) {
                SendError::Failed(PveError::Untrusted(why))
            } else if err.is_connect() {
                SendError::NotDelivered(format!("connection failed: {}", root_cause(&err)))
            } else {
                SendError::MaybeDelivered(format!("request failed: {}", root_cause(&err)))
            }
        })?;
        let status = response.status().as_u16();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| response.status().canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let body = response
            .bytes()
            .await
            // The request arrived; only the answer was lost.
            .map_err(|e| SendError::MaybeDelivered(format!("reading answer: {e}")))?;
        if (200..300).contains(&status) {
            let envelope: Envelope<T> = serde_json::from_slice(&body)
                .map_err(|e| SendError::Failed(PveError::Decode(e.to_string())))?;
            return envelope
                .data
                .ok_or_else(|| SendError::Failed(PveError::Decode("answer has no data".into())));
        }
        let message = error_message(&body, &reason);
        // 595: the node proxy could not connect to the target node, so nothing was sent.
        // 596: the connection broke or timed out after the request may have been forwarded.
        if status == 595 {
            return Err(SendError::NotDelivered(format!("{status} {message}")));
        }
        if status == 596 {
            return Err(SendError::MaybeDelivered(format!("{status} {message}")));
        }
        Err(SendError::Failed(classify(status, message)))
    }
}

enum SendError {
    /// The request did not reach the target node; safe to send again.
    NotDelivered(String),
    /// The request may have reached the node; only a GET may be sent again.
    MaybeDelivered(String),
    Failed(PveError),
}

impl From<SendError> for PveError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::NotDelivered(msg) | SendError::MaybeDelivered(msg) => {
                PveError::Transient(msg)
            }
            SendError::Failed(err) => err,
        }
    }
}

/// The task type Proxmox gives a power action (`qmreset`, `vzreboot`...).
fn task_type(kind: GuestKind, action: PowerAction) -> &'static str {
    match (kind, action) {
        (GuestKind::Qemu, PowerAction::Reset) => "qmreset",
        (GuestKind::Qemu, PowerAction::Reboot) => "qmreboot",
        (GuestKind::Qemu, PowerAction::Shutdown) => "qmshutdown",
        (GuestKind::Qemu, PowerAction::Stop) => "qmstop",
        (GuestKind::Qemu, PowerAction::Start) => "qmstart",
        // Containers have no reset; the engine sends a reboot instead.
        (GuestKind::Lxc, PowerAction::Reset | PowerAction::Reboot) => "vzreboot",
        (GuestKind::Lxc, PowerAction::Shutdown) => "vzshutdown",
        (GuestKind::Lxc, PowerAction::Stop) => "vzstop",
        (GuestKind::Lxc, PowerAction::Start) => "vzstart",
    }
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[derive(serde::Deserialize)]
struct Envelope<T> {
    data: Option<T>,
}

/// The `message` of the body (PVE 8.3+), else the reason phrase; `errors` appended.
fn error_message(body: &[u8], reason: &str) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: Option<String>,
        errors: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let mut message = parsed
        .as_ref()
        .and_then(|b| b.message.clone())
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| reason.to_owned())
        .trim()
        .to_owned();
    if let Some(errors) = parsed.and_then(|b| b.errors) {
        let details: Vec<String> = errors
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}: {}",
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                )
            })
            .collect();
        if !details.is_empty() {
            message = format!("{message} ({})", details.join("; "));
        }
    }
    message
}

/// What a failed `agent/ping` says, by Proxmox's message.
fn ping_failure(message: &str) -> AgentPing {
    if message.contains("No QEMU guest agent configured") {
        AgentPing::NotConfigured
    } else if message.contains("guest agent is not running") {
        AgentPing::NotRunning
    } else if message.contains("got timeout") {
        AgentPing::TimedOut
    } else {
        AgentPing::Unavailable(message.to_owned())
    }
}

fn classify(status: u16, message: String) -> PveError {
    match status {
        401 => PveError::Unauthorized(message),
        403 => PveError::Forbidden(message),
        400 => PveError::BadRequest(message),
        500 if message.contains("does not exist")
            || message.contains("unable to find configuration file") =>
        {
            PveError::VmNotFound(message)
        }
        500 if message.contains("not running") => PveError::NotRunning(message),
        // pveproxy has few workers; an overloaded or restarting proxy is temporary.
        502..=504 => PveError::Transient(format!("{status} {message}")),
        _ => PveError::Server { status, message },
    }
}

/// The TLS verifier's refusal somewhere in `err`'s chain, if that is why it failed.
fn tls_rejection(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // io::Error's own source() skips the error it wraps, so step inside it instead.
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(as_source),
            None => current.source(),
        };
    }
    None
}

fn as_source<'a>(
    inner: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    inner
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn enc(segment: &str) -> String {
    urlencoding::encode(segment).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;

    #[test]
    fn error_text_comes_from_body_or_reason() {
        let body = br#"{"data":null,"message":"VM 100 not running\n"}"#;
        assert_eq!(
            classify(500, error_message(body, "VM 100 not running")),
            PveError::NotRunning("VM 100 not running".into())
        );
        // Older servers: {"data":null}, the text only in the reason phrase.
        let old = classify(
            500,
            error_message(
                br#"{"data":null}"#,
                "unable to find configuration file for VM 999 on node 'pve1'",
            ),
        );
        assert!(matches!(old, PveError::VmNotFound(_)));
        let bad = error_message(
            br#"{"data":null,"errors":{"upid":"no such task"},"message":"Parameter verification failed.\n"}"#,
            "Parameter verification failed.",
        );
        assert_eq!(bad, "Parameter verification failed. (upid: no such task)");
        assert_eq!(
            classify(401, error_message(b"", "Authentication failed!")),
            PveError::Unauthorized("Authentication failed!".into())
        );
        assert!(classify(503, "busy".into()).is_transient());
    }
}
