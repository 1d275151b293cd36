//! The add-VM page (install commands, enrolment tokens as `POST /api/enrolment-tokens`, VMs
//! that just arrived) and the link approval queue (as `POST /api/vms/:id/proxmox/approve`).

use super::{Fields, maybe_when, when};
use crate::http::ApiError;
use crate::http::enrolment::{self, TokenRequest};
use crate::http::extract::Actor;
use crate::http::vms::{ApproveRequest, LinkRequest};
use crate::state::AppState;
use app::backend::RequestInfo;
use domain::panel::{Field, FieldKind, Form, Outcome, Panel, Row, RowAction, Section, Table};
use domain::view::VmView;
use domain::{GuestRef, UserRole, VmId};
use std::collections::HashMap;

/// How far back "just enrolled" reaches.
const RECENT_MS: i64 = 3_600_000;

/// Where agents reach this server, as the installer must be told.
fn server_url(state: &AppState, caller: &RequestInfo) -> String {
    let limits = &state.config.limits;
    if let Some(host) = &limits.public_host {
        let scheme = if limits.public_https { "https" } else { "http" };
        return format!("{scheme}://{host}");
    }
    let scheme = if matches!(state.config.tls, crate::config::TlsMode::Off) {
        "http"
    } else {
        "https"
    };
    // The Host header passed the server's allow-list before any page was served.
    let host = caller
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("SERVER:3000");
    format!("{scheme}://{host}")
}

/// The Linux and Windows install commands, with the token when there is one.
fn commands(url: &str, token: Option<&str>) -> [(String, String); 2] {
    let linux_sha = crate::agents::linux_agent_sha256();
    let windows_sha = crate::agents::windows_agent_sha256();
    let insecure_sh = if url.starts_with("http://") {
        " --insecure"
    } else {
        ""
    };
    let insecure_ps = if url.starts_with("http://") {
        " -Insecure"
    } else {
        ""
    };
    let linux = match token {
        Some(token) => format!(
            "curl -fsSL --cacert monitor.pem {url}/agents/install.sh -o install.sh\n\
             printf '%s\\n' '{token}' | sudo bash install.sh --server {url} --ca-file monitor.pem \\\n  \
             --sha256 {linux_sha} --token-stdin{insecure_sh}"
        ),
        None => format!(
            "curl -fsSL --cacert monitor.pem {url}/agents/install.sh -o install.sh\n\
             sudo bash install.sh --server {url} --ca-file monitor.pem \\\n  \
             --sha256 {linux_sha} --token-file token.txt{insecure_sh}"
        ),
    };
    let token_line = match token {
        Some(token) => format!("Set-Content -Path token.txt -Value '{token}'\n"),
        None => String::new(),
    };
    let windows = format!(
        "Invoke-WebRequest -UseBasicParsing {url}/agents/install-windows.ps1 -OutFile install-windows.ps1\n\
         {token_line}powershell -ExecutionPolicy Bypass -File install-windows.ps1 -Server {url} `\n  \
         -TokenFile token.txt -Sha256 {windows_sha}{insecure_ps}"
    );
    [
        ("Linux (as root or with sudo)".to_owned(), linux),
        ("Windows (PowerShell as Administrator)".to_owned(), windows),
    ]
}

pub async fn add_vm(
    state: &AppState,
    caller: &RequestInfo,
    actor: &Actor,
) -> Result<Panel, ApiError> {
    let url = server_url(state, caller);
    let mut install = Section::new("Install the agent").text(
        "On the new guest, with the server's certificate saved as monitor.pem (data/tls-cert.pem \
         on the server) and an enrolment token in token.txt. The installer refuses any agent \
         script but this server's (its SHA-256 is in the command).",
    );
    for (label, text) in commands(&url, None) {
        install = install.code(label, text);
    }
    let token = if actor.who.role >= UserRole::Admin {
        Section::new("Enrolment token")
            .text("Creates a token and fills it into the commands. It is shown once.")
            .form(Form {
                action: "enrol".into(),
                submit: "Create token and fill in the commands".into(),
                filter: false,
                fields: vec![
                    Field::new("label", "Label", FieldKind::Text, "")
                        .help("What it is for, e.g. web servers."),
                    Field::new(
                        "expires_in_hours",
                        "Valid for (hours)",
                        FieldKind::Number,
                        "24",
                    ),
                    Field::new("max_uses", "VMs it may enrol", FieldKind::Number, "1")
                        .help("Empty for no limit until it expires."),
                ],
            })
    } else {
        Section::new("Enrolment token")
            .text("An admin creates enrolment tokens (this page, or POST /api/enrolment-tokens).")
    };
    let now = crate::now_ms();
    let mut recent: Vec<VmView> = crate::http::fleet(state)
        .await?
        .into_iter()
        .filter(|v| v.first_seen_ms >= now - RECENT_MS)
        .collect();
    recent.sort_by_key(|v| std::cmp::Reverse(v.first_seen_ms));
    let arrived = Table {
        columns: vec![
            "Host".into(),
            "OS".into(),
            "First report".into(),
            "Status".into(),
            "Proxmox".into(),
        ],
        rows: recent
            .into_iter()
            .map(|v| Row {
                key: v.id.to_string(),
                cells: vec![
                    v.hostname.clone(),
                    v.os.clone(),
                    when(v.first_seen_ms),
                    v.status.to_string(),
                    link_text(&v),
                ],
            })
            .collect(),
        empty: "None yet. This list updates as VMs arrive.".into(),
        actions: Vec::new(),
        bulk: false,
    };
    Ok(Panel {
        title: "Add a VM".into(),
        sections: vec![
            install,
            token,
            Section::new("Enrolled in the last hour")
                .table(arrived)
                .live(),
        ],
    })
}

pub async fn submit_add_vm(
    state: &AppState,
    caller: &RequestInfo,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    if action != "enrol" {
        return Err(ApiError::field("action", "unknown"));
    }
    let request = TokenRequest {
        label: f.get("label").to_owned(),
        expires_in_hours: f.optional_number("expires_in_hours")?,
        max_uses: f.optional_number("max_uses")?,
        guest: None,
    };
    let created = enrolment::issue_enrolment_token(state, actor, request).await?;
    let mut outcome = Outcome::done(format!(
        "Token {} created. Copy the commands now: the token is shown only once.",
        created.view.id
    ));
    for (label, text) in commands(&server_url(state, caller), Some(&created.token)) {
        outcome.code.push(domain::panel::CodeBlock { label, text });
    }
    Ok(outcome)
}

fn link_text(v: &VmView) -> String {
    match (&v.proxmox_node, v.proxmox_vmid, v.proxmox_type) {
        (Some(node), Some(vmid), Some(kind)) => {
            let pending = if v.link_verified { "" } else { " (pending)" };
            format!("{kind} {vmid} on {node}{pending}")
        }
        _ => "not linked".to_owned(),
    }
}

/// The row key of a proposal: the VM and exactly the guest shown, so an approval can never
/// confirm a proposal the operator did not see.
fn proposal_key(id: VmId, guest: &GuestRef) -> String {
    format!("{id}:{}:{}:{}", guest.node, guest.vmid, guest.kind)
}

fn parse_key(key: &str) -> Result<(VmId, GuestRef), ApiError> {
    let mut parts = key.split(':');
    let (Some(id), Some(node), Some(vmid), Some(kind), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ApiError::field("key", "not a proposal on this page"));
    };
    let id = crate::http::extract::positive_id(id)?;
    let vmid = vmid
        .parse()
        .map_err(|_unreadable| ApiError::field("vmid", "must be a number"))?;
    let guest = ApproveRequest::guest(node.to_owned(), vmid, Some(kind))?;
    Ok((VmId(id), guest))
}

fn guest_of(v: &VmView) -> Option<GuestRef> {
    Some(GuestRef {
        node: v.proxmox_node.clone()?,
        vmid: v.proxmox_vmid?,
        kind: v.proxmox_type?,
    })
}

pub async fn links(state: &AppState) -> Result<Panel, ApiError> {
    let fleet = crate::http::fleet(state).await?;
    // Who claims each guest (by VMID, unique in a cluster): a second claimant makes a
    // proposal contested.
    let mut claims: HashMap<i64, Vec<VmId>> = HashMap::new();
    for v in &fleet {
        if let Some(g) = guest_of(v) {
            claims.entry(g.vmid.get()).or_default().push(v.id);
        }
    }
    let rows = fleet
        .iter()
        .filter(|v| !v.link_verified)
        .filter_map(|v| {
            let guest = guest_of(v)?;
            let others: Vec<String> = claims
                .get(&guest.vmid.get())
                .into_iter()
                .flatten()
                .filter(|id| **id != v.id)
                .map(|id| format!("vm {id}"))
                .collect();
            Some(Row {
                key: proposal_key(v.id, &guest),
                cells: vec![
                    v.hostname.clone(),
                    format!("{} {} on {}", guest.kind, guest.vmid, guest.node),
                    v.proxmox_link_source
                        .map_or_else(|| "unknown".to_owned(), |s| s.to_string()),
                    v.status.to_string(),
                    maybe_when(v.last_seen_ms, "never"),
                    if others.is_empty() {
                        "no".to_owned()
                    } else {
                        format!("yes: {}", others.join(", "))
                    },
                ],
            })
        })
        .collect();
    let table = Table {
        columns: vec![
            "Host".into(),
            "Proposed guest".into(),
            "Found by".into(),
            "Status".into(),
            "Last report".into(),
            "Also claimed".into(),
        ],
        rows,
        empty: "Nothing waits for approval.".into(),
        actions: vec![RowAction::new(
            "approve",
            "Approve",
            "Approve the ticked links? Auto-reset may then power-cycle those guests.",
        )],
        bulk: true,
    };
    Ok(Panel {
        title: "Link approvals".into(),
        sections: vec![
            Section::new("Proposed Proxmox links")
                .text(
                    "Each VM below reported, or was matched to, a Proxmox guest; until an operator \
                     approves the link, the monitor never powers that guest. A guest claimed by \
                     two VMs cannot be approved here: link the right VM by hand on its page or \
                     with PUT /api/vms/:id/proxmox.",
                )
                .table(table),
        ],
    })
}

pub async fn submit_links(
    state: &AppState,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    if action != "approve" {
        return Err(ApiError::field("action", "unknown"));
    }
    let keys = f.all("key");
    if keys.is_empty() {
        return Ok(Outcome::refused("Tick the links to approve first."));
    }
    // Every key is checked before anything is approved.
    let proposals = keys
        .iter()
        .map(|k| parse_key(k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut approved = 0;
    let mut refused = Vec::new();
    for (vm, guest) in proposals {
        match crate::actions::approve_link(state, &actor.who.name, &actor.from, vm, &guest).await {
            Ok(()) => approved += 1,
            Err(crate::remediation::ActionError::Db(err)) => return Err(err.into()),
            Err(err) => refused.push(format!("vm {vm}: {err}")),
        }
    }
    let mut message = format!("Approved {approved}.");
    if !refused.is_empty() {
        message.push_str(&format!(
            " Refused {}: {}",
            refused.len(),
            refused.join("; ")
        ));
    }
    Ok(Outcome {
        ok: refused.is_empty(),
        message,
        ..Outcome::default()
    })
}

/// One VM's link page (`/link?vm=ID`): approve what it proposes, link it by hand, unlink it.
pub async fn link(state: &AppState, query: &Fields) -> Result<Panel, ApiError> {
    let id = VmId(
        crate::http::extract::positive_id(query.get("vm"))
            .map_err(|_unreadable| ApiError::field("vm", "name the VM: /link?vm=ID"))?,
    );
    let vm = {
        let mut conn = state.db.conn().await?;
        crate::db::store::get_vm(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound)?
    };
    let this = || Field::new("vm", "", FieldKind::Hidden, id.to_string());
    let source = match (guest_of(&vm), vm.proxmox_link_source) {
        (Some(_), Some(s)) => format!(", found by {s}"),
        _ => String::new(),
    };
    let mut sections = vec![
        Section::new(format!("{} (vm {id})", vm.hostname)).text(format!(
            "Proxmox: {}{source}. Automatic power actions need an approved link.",
            link_text(&vm)
        )),
    ];
    if let (Some(guest), false) = (guest_of(&vm), vm.link_verified) {
        let others = {
            let mut conn = state.db.conn().await?;
            crate::db::incidents::other_claimants(&mut conn, &guest, id).await?
        };
        let mut approve = Section::new("Approve the proposed link").text(format!(
            "Approve only if {} {} on {} is this VM: once approved, auto-reset may power-cycle \
             that guest when this VM stops reporting.",
            guest.kind, guest.vmid, guest.node
        ));
        if others.is_empty() {
            approve = approve.form(Form {
                action: "approve".into(),
                submit: "Approve this link".into(),
                filter: false,
                fields: vec![
                    this(),
                    Field::new("node", "", FieldKind::Hidden, guest.node.to_string()),
                    Field::new("vmid", "", FieldKind::Hidden, guest.vmid.to_string()),
                    Field::new("type", "", FieldKind::Hidden, guest.kind.as_str()),
                ],
            });
        } else {
            let names: Vec<String> = others.iter().map(|(o, _)| format!("vm {o}")).collect();
            approve = approve.text(format!(
                "The same guest is also claimed by {}: link the right VM by hand below.",
                names.join(", ")
            ));
        }
        sections.push(approve);
    }
    // The form starts from an approved link only: a proposal is what the guest claims, and
    // one click must not turn it into an approved link.
    let current = guest_of(&vm).filter(|_| vm.link_verified);
    sections.push(
        Section::new("Link by hand")
            .text("An operator's link is approved as it is made.")
            .form(Form {
                action: "set".into(),
                submit: "Link".into(),
                filter: false,
                fields: vec![
                    this(),
                    Field::new(
                        "node",
                        "Node",
                        FieldKind::Text,
                        current
                            .as_ref()
                            .map_or_else(String::new, |g| g.node.to_string()),
                    ),
                    Field::new(
                        "vmid",
                        "VMID",
                        FieldKind::Number,
                        current
                            .as_ref()
                            .map_or_else(String::new, |g| g.vmid.to_string()),
                    ),
                    Field::new(
                        "type",
                        "Type",
                        FieldKind::Choice(vec!["qemu".into(), "lxc".into()]),
                        current.as_ref().map_or("qemu", |g| g.kind.as_str()),
                    ),
                ],
            }),
    );
    if guest_of(&vm).is_some() {
        sections.push(
            Section::new("Unlink")
                .text("The VM then stays unlinked, with nothing proposed, until linked again.")
                .form(Form {
                    action: "unlink".into(),
                    submit: "Unlink".into(),
                    filter: false,
                    fields: vec![this()],
                }),
        );
    }
    Ok(Panel {
        title: "Proxmox link".into(),
        sections,
    })
}

pub async fn submit_link(
    state: &AppState,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    let id = VmId(crate::http::extract::positive_id(f.get("vm"))?);
    let vmid = || {
        f.get("vmid")
            .parse::<i64>()
            .map_err(|_unreadable| ApiError::field("vmid", "must be a number"))
    };
    match action {
        "approve" => {
            let guest =
                ApproveRequest::guest(f.get("node").to_owned(), vmid()?, Some(f.get("type")))?;
            crate::actions::approve_link(state, &actor.who.name, &actor.from, id, &guest).await?;
            Ok(Outcome::done(format!(
                "Approved: {} {} on {}.",
                guest.kind, guest.vmid, guest.node
            )))
        }
        "set" => {
            let request = LinkRequest {
                node: Some(f.get("node").to_owned()),
                vmid: Some(vmid()?),
                kind: Some(f.get("type").to_owned()),
            };
            let vm = crate::http::vms::set_link(state, actor, id, request).await?;
            Ok(Outcome::done(format!("Linked: {}.", link_text(&vm))))
        }
        "unlink" => {
            let request = LinkRequest {
                node: None,
                vmid: None,
                kind: None,
            };
            crate::http::vms::set_link(state, actor, id, request).await?;
            Ok(Outcome::done("Unlinked."))
        }
        _ => Err(ApiError::field("action", "unknown")),
    }
}
