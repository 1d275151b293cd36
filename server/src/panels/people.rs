//! The users, tokens and audit pages, through the services of `/api/users`, `/api/tokens`,
//! `/api/enrolment-tokens` and `/api/audit`.

use super::{Fields, maybe_when, when};
use crate::http::ApiError;
use crate::http::enrolment;
use crate::http::extract::Actor;
use crate::http::people::{self as api, AuditQuery, NewApiToken, NewUser};
use crate::state::AppState;
use domain::UserRole;
use domain::panel::{Field, FieldKind, Form, Outcome, Panel, Row, RowAction, Section, Table};

/// Newest audit entries a page shows.
const AUDIT_ROWS: i64 = 200;

fn roles() -> FieldKind {
    FieldKind::Choice(
        UserRole::ALL
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect(),
    )
}

fn role(f: &Fields) -> Result<UserRole, ApiError> {
    f.get("role")
        .parse()
        .map_err(|_unreadable| ApiError::field("role", "must be viewer, operator or admin"))
}

pub async fn users(state: &AppState) -> Result<Panel, ApiError> {
    let users = api::users(state).await?;
    let names: Vec<String> = users.iter().map(|u| u.username.clone()).collect();
    let table = Table {
        columns: vec![
            "Name".into(),
            "Role".into(),
            "Created".into(),
            "Password set".into(),
        ],
        rows: users
            .into_iter()
            .map(|u| Row {
                key: u.username.clone(),
                cells: vec![
                    u.username,
                    u.role.to_string(),
                    when(u.created_ms),
                    when(u.password_changed_ms),
                ],
            })
            .collect(),
        empty: "No users yet.".into(),
        actions: vec![RowAction::new(
            "delete",
            "Delete",
            "Delete user {}? Their sessions and API tokens stop working.",
        )],
        bulk: false,
    };
    Ok(Panel {
        title: "Users".into(),
        sections: vec![
            Section::new("Users").table(table),
            Section::new("Add a user").form(Form {
                action: "add".into(),
                submit: "Add user".into(),
                filter: false,
                fields: vec![
                    Field::new("username", "Name", FieldKind::Text, ""),
                    Field::new("password", "Password", FieldKind::Password, "")
                        .help("At least 12 characters."),
                    Field::new("role", "Role", roles(), "viewer")
                        .help("viewer reads; operator also acts on VMs; admin also manages."),
                ],
            }),
            Section::new("Set a password")
                .text("Every session of that user ends, on every replica.")
                .form(Form {
                    action: "password".into(),
                    submit: "Set password".into(),
                    filter: false,
                    fields: vec![
                        Field::new("username", "User", FieldKind::Choice(names), ""),
                        Field::new("password", "New password", FieldKind::Password, ""),
                    ],
                }),
        ],
    })
}

pub async fn submit_users(
    state: &AppState,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    match action {
        "add" => {
            let user = api::add_user(
                state,
                actor,
                NewUser {
                    username: f.get("username").to_owned(),
                    password: f.raw("password").to_owned(),
                    role: role(f)?,
                },
            )
            .await?;
            Ok(Outcome::done(format!(
                "Added {} ({}).",
                user.username, user.role
            )))
        }
        "password" => {
            let id = user_id(state, f.get("username")).await?;
            api::change_password(state, actor, id, f.raw("password").to_owned()).await?;
            Ok(Outcome::done(format!(
                "Password set for {}; their sessions ended.",
                f.get("username")
            )))
        }
        "delete" => {
            let id = user_id(state, f.get("key")).await?;
            api::remove_user(state, actor, id).await?;
            Ok(Outcome::done(format!("Deleted {}.", f.get("key"))))
        }
        _ => Err(ApiError::field("action", "unknown")),
    }
}

async fn user_id(state: &AppState, name: &str) -> Result<i64, ApiError> {
    api::users(state)
        .await?
        .into_iter()
        .find(|u| u.username == name)
        .map(|u| u.id)
        .ok_or_else(|| ApiError::field("username", "no such user"))
}

pub async fn tokens(state: &AppState) -> Result<Panel, ApiError> {
    let users = api::users(state).await?;
    let api_tokens = api::api_tokens(state).await?;
    let enrolment = enrolment::enrolment_tokens(state).await?;
    let state_of = |revoked: Option<i64>| {
        revoked.map_or_else(|| "active".to_owned(), |ms| format!("revoked {}", when(ms)))
    };
    let api_table = Table {
        columns: vec![
            "Id".into(),
            "Label".into(),
            "Acts as".into(),
            "Role".into(),
            "Created".into(),
            "Last used".into(),
            "State".into(),
        ],
        rows: api_tokens
            .into_iter()
            .map(|t| Row {
                key: t.id.to_string(),
                cells: vec![
                    t.id.to_string(),
                    t.label,
                    t.username,
                    t.role.0.to_string(),
                    when(t.created_ms),
                    maybe_when(t.last_used_ms, "never"),
                    state_of(t.revoked_ms),
                ],
            })
            .collect(),
        empty: "No API tokens.".into(),
        actions: vec![RowAction::new(
            "revoke-api",
            "Revoke",
            "Revoke API token {}? Scripts using it stop working.",
        )],
        bulk: false,
    };
    let enrolment_table = Table {
        columns: vec![
            "Id".into(),
            "Label".into(),
            "Created by".into(),
            "Uses".into(),
            "Expires".into(),
            "For guest".into(),
            "State".into(),
        ],
        rows: enrolment
            .into_iter()
            .map(|t| Row {
                key: t.id.to_string(),
                cells: vec![
                    t.id.to_string(),
                    t.label,
                    t.created_by,
                    match t.max_uses {
                        Some(max) => format!("{} of {max}", t.uses),
                        None => t.uses.to_string(),
                    },
                    maybe_when(t.expires_ms, "never"),
                    t.guest.map_or_else(
                        || "any".to_owned(),
                        |g| format!("{} {} on {}", g.kind, g.vmid, g.node),
                    ),
                    state_of(t.revoked_ms),
                ],
            })
            .collect(),
        empty: "No enrolment tokens; create one on the Add a VM page.".into(),
        actions: vec![RowAction::new(
            "revoke-enrolment",
            "Revoke",
            "Revoke enrolment token {}? VMs already enrolled keep their own credentials.",
        )],
        bulk: false,
    };
    let names = users.into_iter().map(|u| u.username).collect();
    Ok(Panel {
        title: "Tokens".into(),
        sections: vec![
            Section::new("API tokens")
                .text("For scripts: each acts as a user, with at most that user's role.")
                .table(api_table),
            Section::new("New API token").form(Form {
                action: "create-api".into(),
                submit: "Create token".into(),
                filter: false,
                fields: vec![
                    Field::new("username", "Acts as", FieldKind::Choice(names), ""),
                    Field::new("label", "Label", FieldKind::Text, ""),
                    Field::new("role", "Role", roles(), "viewer"),
                ],
            }),
            Section::new("Enrolment tokens")
                .text("Agents present one once; the server answers with the VM's own credential.")
                .table(enrolment_table),
        ],
    })
}

pub async fn submit_tokens(
    state: &AppState,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    match action {
        "create-api" => {
            let created = api::issue_api_token(
                state,
                actor,
                NewApiToken {
                    username: f.get("username").to_owned(),
                    label: f.get("label").to_owned(),
                    role: role(f)?,
                },
            )
            .await?;
            let mut outcome = Outcome::done(format!(
                "Token {} created. Copy it now: it is shown only once.",
                created.id
            ));
            outcome.code.push(domain::panel::CodeBlock {
                label: "API token (Authorization: Bearer ...)".into(),
                text: created.token,
            });
            Ok(outcome)
        }
        "revoke-api" => {
            let id = token_id(f)?;
            api::withdraw_api_token(state, actor, id).await?;
            Ok(Outcome::done(format!("API token {id} revoked.")))
        }
        "revoke-enrolment" => {
            let id = token_id(f)?;
            enrolment::withdraw_enrolment_token(state, actor, id).await?;
            Ok(Outcome::done(format!("Enrolment token {id} revoked.")))
        }
        _ => Err(ApiError::field("action", "unknown")),
    }
}

fn token_id(f: &Fields) -> Result<i64, ApiError> {
    crate::http::extract::positive_id(f.get("key"))
}

pub async fn audit(state: &AppState, query: &Fields) -> Result<Panel, ApiError> {
    let text = |name: &str| Some(query.get(name).to_owned()).filter(|v| !v.is_empty());
    let before = query
        .optional_number("before")
        .map_err(|e| ApiError::field(&e.field, e.message))?;
    let entries = api::audit_entries(
        state,
        AuditQuery {
            before,
            limit: Some(AUDIT_ROWS),
            actor: text("actor"),
            action: text("action"),
            target: text("target"),
        },
    )
    .await?;
    let oldest = entries.last().map(|e| e.id);
    let table = Table {
        columns: vec![
            "#".into(),
            "When".into(),
            "Who".into(),
            "Action".into(),
            "Target".into(),
            "From".into(),
            "Outcome".into(),
            "Detail".into(),
        ],
        rows: entries
            .into_iter()
            .map(|e| Row {
                key: e.id.to_string(),
                cells: vec![
                    e.id.to_string(),
                    when(e.at_ms),
                    e.actor,
                    e.action,
                    e.target.unwrap_or_default(),
                    e.source.unwrap_or_default(),
                    e.outcome,
                    e.detail.unwrap_or_default(),
                ],
            })
            .collect(),
        empty: "No entries match.".into(),
        actions: Vec::new(),
        bulk: false,
    };
    let value = |name: &str| query.get(name).to_owned();
    let mut entries = Section::new("Entries").table(table);
    if let Some(oldest) = oldest {
        entries = entries.text(format!(
            "Newest first, at most {AUDIT_ROWS}. For older ones, filter with \"older than\" {oldest}."
        ));
    }
    Ok(Panel {
        title: "Audit log".into(),
        sections: vec![
            Section::new("Filter").form(Form {
                action: "filter".into(),
                submit: "Filter".into(),
                filter: true,
                fields: vec![
                    Field::new("actor", "Who", FieldKind::Text, value("actor"))
                        .help("A user name, exactly."),
                    Field::new("action", "Action", FieldKind::Text, value("action"))
                        .help("e.g. reset, configure, create_user."),
                    Field::new(
                        "target",
                        "Target contains",
                        FieldKind::Text,
                        value("target"),
                    )
                    .help("e.g. vm 12."),
                    Field::new("before", "Older than #", FieldKind::Number, value("before")),
                ],
            }),
            entries,
        ],
    })
}
