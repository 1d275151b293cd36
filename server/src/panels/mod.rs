//! The admin pages (`domain::panel`): what each shows, and each form through the same
//! service function as its REST route, so both doors check, change and audit alike.

mod alerts;
mod fleet;
pub mod html;
mod people;
mod settings;

use crate::accounts::{self, Principal, audit_quietly};
use crate::http::ApiError;
use crate::http::extract::Actor;
use crate::state::AppState;
use app::backend::RequestInfo;
use app::error::AppError;
use domain::panel::{Outcome, Panel};
use domain::settings::FieldError;
use domain::{PanelName, UserRole};

/// The submitted fields of a form, decoded.
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(encoded: &str) -> Self {
        Self(
            form_urlencoded::parse(encoded.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The first value under `name`, trimmed; "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.raw(name).trim()
    }

    /// The first value under `name` exactly as typed (a password: spaces are part of it).
    pub fn raw(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Every value under `name` (the ticked rows of a table).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `name` as a number, or an error naming the field.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<T, FieldError> {
        self.get(name).parse().map_err(|_unreadable| FieldError {
            field: name.to_owned(),
            message: "must be a number".to_owned(),
        })
    }

    /// `name` as a number, `None` when left empty.
    pub fn optional_number(&self, name: &str) -> Result<Option<i64>, FieldError> {
        if self.get(name).is_empty() {
            Ok(None)
        } else {
            self.number(name).map(Some)
        }
    }
}

/// The role a page needs to be seen.
fn page_role(name: PanelName) -> UserRole {
    match name {
        PanelName::AddVm | PanelName::Links | PanelName::Link | PanelName::Alerts => {
            UserRole::Operator
        }
        PanelName::Settings | PanelName::Users | PanelName::Tokens | PanelName::Audit => {
            UserRole::Admin
        }
    }
}

/// The role an action needs, the same as its REST route's; `None` for an action the page
/// does not have.
fn action_role(name: PanelName, action: &str) -> Option<UserRole> {
    match (name, action) {
        (PanelName::Links, "approve")
        | (PanelName::Link, "approve" | "set" | "unlink")
        | (PanelName::Alerts, "window-add" | "window-delete" | "snooze" | "tags") => {
            Some(UserRole::Operator)
        }
        // Enrolment tokens, users, API tokens and settings are admin business.
        (PanelName::AddVm, "enrol")
        | (PanelName::Settings, "save" | "test-proxmox")
        | (PanelName::Users, "add" | "password" | "delete")
        | (PanelName::Tokens, "create-api" | "revoke-api" | "revoke-enrolment")
        | (
            PanelName::Alerts,
            "channel-add" | "channel-test" | "channel-delete" | "rule-add" | "rule-delete",
        ) => Some(UserRole::Admin),
        _ => None,
    }
}

/// One page as `caller` may see it, drawn as HTML.
pub async fn show(
    state: &AppState,
    caller: &RequestInfo,
    name: PanelName,
    query: &str,
) -> Result<String, AppError> {
    let actor = signed_in(caller, page_role(name))?;
    let query = Fields::parse(query.trim_start_matches('?'));
    let panel = build(state, caller, &actor, name, &query)
        .await
        .map_err(|err| app_error(name, "show", err))?;
    Ok(html::page(&panel, None))
}

async fn build(
    state: &AppState,
    caller: &RequestInfo,
    actor: &Actor,
    name: PanelName,
    query: &Fields,
) -> Result<Panel, ApiError> {
    match name {
        PanelName::Settings => Ok(settings::page(state)),
        PanelName::AddVm => fleet::add_vm(state, caller, actor).await,
        PanelName::Links => fleet::links(state).await,
        PanelName::Link => fleet::link(state, query).await,
        PanelName::Users => people::users(state).await,
        PanelName::Tokens => people::tokens(state).await,
        PanelName::Audit => people::audit(state, query).await,
        PanelName::Alerts => alerts::page(state, actor, query).await,
    }
}

/// A form or row action on one page, by `caller`: the page drawn again, with the answer
/// under the form or table it came from.
pub async fn submit(
    state: &AppState,
    caller: &RequestInfo,
    name: PanelName,
    action: &str,
    form: &str,
) -> Result<String, AppError> {
    // An unknown action is refused before anything, the audit log included: the action's
    // text is the client's.
    let Some(role) = action_role(name, action) else {
        return Err(AppError::Refused(format!(
            "{name} has no action {action:?}"
        )));
    };
    let actor = match signed_in(caller, role) {
        Ok(actor) => actor,
        Err(err) => {
            // A signed-in caller trying what the role does not allow is worth a record.
            if let Some(who) = caller.extensions().get::<Principal>() {
                audit_quietly(
                    state,
                    &who.name,
                    &format!("{name}:{action}"),
                    None,
                    &accounts::source(caller.extensions()),
                    "forbidden",
                    None,
                )
                .await;
            }
            return Err(err);
        }
    };
    let fields = Fields::parse(form);
    let outcome = act(state, caller, &actor, name, action, &fields).await?;
    // The page drawn again for what was submitted (a VM's link page names its VM).
    let panel = build(state, caller, &actor, name, &fields)
        .await
        .map_err(|err| app_error(name, "show", err))?;
    let answer = html::Answer {
        action,
        outcome: &outcome,
        // After a refusal the form keeps what was typed; after success it shows what is now.
        // A channel's form is cleared either way: a Slack or Discord URL is a secret.
        typed: (!outcome.ok && !clears_on_refusal(name, action)).then_some(&fields),
    };
    Ok(html::page(&panel, Some(&answer)))
}

/// Forms whose typed values are never drawn back: a Slack or Discord URL is a secret.
fn clears_on_refusal(name: PanelName, action: &str) -> bool {
    name == PanelName::Alerts && action == "channel-add"
}

/// Runs one action; what the service refused becomes the answer, not an error.
async fn act(
    state: &AppState,
    caller: &RequestInfo,
    actor: &Actor,
    name: PanelName,
    action: &str,
    fields: &Fields,
) -> Result<Outcome, AppError> {
    let result = match name {
        PanelName::Settings => settings::submit(state, actor, action, fields).await,
        PanelName::AddVm => fleet::submit_add_vm(state, caller, actor, action, fields).await,
        PanelName::Links => fleet::submit_links(state, actor, action, fields).await,
        PanelName::Link => fleet::submit_link(state, actor, action, fields).await,
        PanelName::Users => people::submit_users(state, actor, action, fields).await,
        PanelName::Tokens => people::submit_tokens(state, actor, action, fields).await,
        PanelName::Alerts => alerts::submit(state, actor, action, fields).await,
        PanelName::Audit => Err(ApiError::field("action", "the audit page only reads")),
    };
    match result {
        Ok(outcome) => Ok(outcome),
        // A field the service refused: shown next to it; nothing was changed.
        Err(ApiError::BadRequest { field, message }) => Ok(Outcome::invalid(FieldError {
            field: field.unwrap_or_default(),
            message,
        })),
        Err(err @ (ApiError::Unauthorized | ApiError::Forbidden(_))) => {
            Err(app_error(name, action, err))
        }
        Err(err @ (ApiError::Unavailable | ApiError::Internal(_))) => {
            Err(app_error(name, action, err))
        }
        // Not found, a conflict, Proxmox's refusal: the operator's to read.
        Err(other) => Ok(Outcome::refused(other.public_message())),
    }
}

impl From<FieldError> for ApiError {
    fn from(err: FieldError) -> Self {
        ApiError::field(&err.field, err.message)
    }
}

/// The caller as an [`Actor`] holding `role`.
fn signed_in(caller: &RequestInfo, role: UserRole) -> Result<Actor, AppError> {
    let who = caller
        .extensions()
        .get::<Principal>()
        .ok_or(AppError::Unauthorized)?;
    if who.role < role {
        return Err(AppError::Forbidden);
    }
    Ok(Actor {
        who: who.clone(),
        from: accounts::source(caller.extensions()),
    })
}

/// What the browser is told. Failures inside are logged; it learns only that the service
/// is unavailable.
fn app_error(name: PanelName, action: &str, err: ApiError) -> AppError {
    match err {
        ApiError::Unauthorized => AppError::Unauthorized,
        ApiError::Forbidden(_) => AppError::Forbidden,
        ApiError::NotFound => AppError::NotFound,
        ApiError::Unavailable => AppError::Unavailable,
        ApiError::Internal(_) => {
            tracing::warn!(error = %err, page = %name, action, "admin page failed");
            AppError::Unavailable
        }
        other => AppError::Refused(other.public_message()),
    }
}

/// A time as the pages print it: UTC, to the second.
pub fn when(ms: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .map_or_else(|| ms.to_string(), |t| format!("{t} UTC"))
}

/// An optional time, or `none`.
pub fn maybe_when(ms: Option<i64>, none: &str) -> String {
    ms.map_or_else(|| none.to_owned(), when)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode_and_trim() {
        let f = Fields::parse("a=+1+&b=x%26y&key=1&key=2");
        assert_eq!(f.get("a"), "1");
        assert_eq!(f.get("b"), "x&y");
        assert_eq!(f.get("missing"), "");
        assert_eq!(f.all("key"), vec!["1", "2"]);
        assert_eq!(f.number::<i64>("a"), Ok(1));
        assert_eq!(f.number::<i64>("b").unwrap_err().field, "b");
        assert_eq!(f.optional_number("missing"), Ok(None));
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(maybe_when(None, "never"), "never");
    }
}
