//! The alerts page: maintenance windows, snoozes and tags (operators), channels, routing
//! rules and the message log (admins), through the services of `/api/maintenance`,
//! `/api/vms/:id/snooze`, `/api/vms/:id/tags` and `/api/notify/*`.

use super::{Fields, maybe_when, when};
use crate::db::notify as store;
use crate::http::ApiError;
use crate::http::extract::Actor;
use crate::http::notify::{self as api, NewChannelBody, NewRuleBody, NewWindowBody};
use crate::state::AppState;
use domain::panel::{Field, FieldKind, Form, Outcome, Panel, Row, RowAction, Section, Table};
use domain::{ChannelKind, NotifyKind, Tag, UserRole, VmId, WindowScope};

/// Newest messages the page lists.
const MESSAGE_ROWS: i64 = 50;

fn choice<T: Copy + std::fmt::Display>(all: &[T]) -> FieldKind {
    FieldKind::Choice(all.iter().map(ToString::to_string).collect())
}

pub async fn page(state: &AppState, actor: &Actor, query: &Fields) -> Result<Panel, ApiError> {
    let mut conn = state.db.conn().await?;
    let windows = store::windows(&mut conn).await?;
    let now = crate::now_ms();
    let window_rows = windows
        .iter()
        .map(|w| Row {
            key: w.id.to_string(),
            cells: vec![
                w.name.clone(),
                match &w.scope_value {
                    Some(value) => format!("{} {value}", w.scope),
                    None => w.scope.to_string(),
                },
                match (&w.recurrence, w.duration_ms, w.starts_ms, w.ends_ms) {
                    (Some(cron), Some(ms), _, _) => {
                        format!("cron \"{cron}\" (UTC) for {} min", ms / 60_000)
                    }
                    (_, _, Some(starts), Some(ends)) => format!(
                        "{} to {}{}",
                        when(starts),
                        when(ends),
                        if (starts..ends).contains(&now) {
                            " (now)"
                        } else {
                            ""
                        }
                    ),
                    _ => "unreadable".to_owned(),
                },
                w.created_by.clone(),
            ],
        })
        .collect();
    // `?vm=ID`: the VM page's "snooze or tag" link fills in its VM.
    let vm = query.get("vm").to_owned();
    let mut sections = vec![
        Section::new("Maintenance windows")
            .text(
                "During a window its VMs send no notifications and are never reset \
                 automatically; each held action is recorded.",
            )
            .table(Table {
                columns: vec!["Name".into(), "Covers".into(), "When".into(), "By".into()],
                rows: window_rows,
                empty: "No windows planned.".into(),
                actions: vec![RowAction::new(
                    "window-delete",
                    "Delete",
                    "Delete window {}?",
                )],
                bulk: false,
            }),
        Section::new("Plan a window")
            .text(
                "One-off: give its start and end. Recurring: give five cron fields and a \
                 duration. Times are UTC. A window over all VMs or a node, or a recurring \
                 one, needs the admin role.",
            )
            .form(Form {
                action: "window-add".into(),
                submit: "Plan window".into(),
                filter: false,
                fields: vec![
                    Field::new("name", "Name", FieldKind::Text, ""),
                    Field::new("scope", "Covers", choice(WindowScope::ALL), "vm"),
                    Field::new("value", "VM id, tag or node", FieldKind::Text, vm.clone())
                        .help("Empty when it covers all VMs."),
                    Field::new("starts_ms", "Starts (UTC)", FieldKind::Text, "")
                        .help("YYYY-MM-DD HH:MM"),
                    Field::new("ends_ms", "Ends (UTC)", FieldKind::Text, ""),
                    Field::new("cron", "Or every (cron)", FieldKind::Text, "")
                        .help("\"0 2 * * 6\": Saturdays at 02:00."),
                    Field::new("duration_minutes", "For (minutes)", FieldKind::Number, ""),
                ],
            }),
        Section::new("Snooze a VM")
            .text("No notifications and no automatic reset for this VM from now on.")
            .form(Form {
                action: "snooze".into(),
                submit: "Snooze".into(),
                filter: false,
                fields: vec![
                    Field::new("vm", "VM id", FieldKind::Number, vm.clone()),
                    Field::new("hours", "Hours", FieldKind::Number, "4").help("1 to 168."),
                ],
            }),
        Section::new("Tag a VM")
            .text(
                "Tags route notifications, scope windows and filter the fleet (search \
                 \"tag:db\"). These replace the tags operators set on the VM; leave empty to \
                 remove them. Tags read from Proxmox stay until removed there.",
            )
            .form(Form {
                action: "tags".into(),
                submit: "Set tags".into(),
                filter: false,
                fields: vec![
                    Field::new("vm", "VM id", FieldKind::Number, vm),
                    Field::new("tags", "Tags", FieldKind::Text, "")
                        .help("Comma-separated: db, prod, site:paris."),
                ],
            }),
    ];
    if actor.who.role >= UserRole::Admin {
        sections.extend(admin_sections(&mut conn).await?);
    }
    Ok(Panel {
        title: "Alerts".into(),
        sections,
    })
}

async fn admin_sections(conn: &mut crate::db::Conn) -> Result<Vec<Section>, ApiError> {
    let channels = store::channels(conn).await?;
    let rules = store::rules(conn).await?;
    let messages = store::recent(conn, None, MESSAGE_ROWS).await?;
    let channel_name = |id: i64| {
        channels
            .iter()
            .find(|c| c.id == id)
            .map_or_else(|| id.to_string(), |c| c.name.clone())
    };
    let channel_table = Table {
        columns: vec![
            "Name".into(),
            "Kind".into(),
            "Target".into(),
            "Secret".into(),
        ],
        rows: channels
            .iter()
            .map(|c| {
                let view = c.view();
                Row {
                    key: view.id.to_string(),
                    cells: vec![
                        view.name,
                        view.kind.to_string(),
                        view.target,
                        if view.has_secret { "set" } else { "none" }.into(),
                    ],
                }
            })
            .collect(),
        empty: "No channels: nothing is sent.".into(),
        actions: vec![
            RowAction::new("channel-test", "Send a test", ""),
            RowAction::new(
                "channel-delete",
                "Delete",
                "Delete channel {} and its rules?",
            ),
        ],
        bulk: false,
    };
    let rule_table = Table {
        columns: vec![
            "Channel".into(),
            "Kinds".into(),
            "Tag".into(),
            "Reminders".into(),
        ],
        rows: rules
            .iter()
            .map(|r| Row {
                key: r.id.to_string(),
                cells: vec![
                    channel_name(r.channel_id),
                    if r.kinds.is_empty() {
                        "every kind".to_owned()
                    } else {
                        r.kinds
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    r.tag.as_ref().map_or("any VM", Tag::as_str).to_owned(),
                    r.repeat_ms.map_or_else(
                        || "none".to_owned(),
                        |ms| format!("every {} min", ms / 60_000),
                    ),
                ],
            })
            .collect(),
        empty: "No rules: channels receive nothing but tests.".into(),
        actions: vec![RowAction::new(
            "rule-delete",
            "Delete",
            "Delete this rule for {}?",
        )],
        bulk: false,
    };
    let message_table = Table {
        columns: vec![
            "Created".into(),
            "Kind".into(),
            "VM".into(),
            "Channel".into(),
            "State".into(),
            "Tries".into(),
            "Sent".into(),
            "Last error".into(),
        ],
        rows: messages
            .iter()
            .map(|m| Row {
                key: m.id.to_string(),
                cells: vec![
                    when(m.created_ms),
                    m.kind.to_string(),
                    m.vm_id.map_or_else(String::new, |id| id.to_string()),
                    channel_name(m.channel_id),
                    m.state.to_string(),
                    m.attempts.to_string(),
                    maybe_when(m.sent_ms, ""),
                    m.last_error.clone().unwrap_or_default(),
                ],
            })
            .collect(),
        empty: "Nothing sent yet.".into(),
        actions: Vec::new(),
        bulk: false,
    };
    let channel_names: Vec<String> = channels.iter().map(|c| c.name.clone()).collect();
    let kinds: Vec<&str> = NotifyKind::ALL
        .iter()
        .filter(|k| **k != NotifyKind::Test)
        .map(|k| k.as_str())
        .collect();
    Ok(vec![
        Section::new("Channels")
            .text(
                "Webhooks are signed (HMAC-SHA256 in X-Vmhc-Signature) when a secret is set. \
                 Secrets are never shown again.",
            )
            .table(channel_table),
        Section::new("Add a channel").form(Form {
            action: "channel-add".into(),
            submit: "Add channel".into(),
            filter: false,
            fields: vec![
                Field::new("name", "Name", FieldKind::Text, ""),
                Field::new("kind", "Kind", choice(ChannelKind::ALL), "webhook"),
                Field::new("target", "URL or address", FieldKind::Text, "").help(
                    "https:// (plain http only to this machine); an email address for email.",
                ),
                Field::new("secret", "Secret", FieldKind::Password, "")
                    .help("Webhook: the HMAC key; ntfy: an access token; Gotify: the app token."),
            ],
        }),
        Section::new("Routing rules").table(rule_table),
        Section::new("Add a rule").form(Form {
            action: "rule-add".into(),
            submit: "Add rule".into(),
            filter: false,
            fields: vec![
                Field::new("channel", "Channel", FieldKind::Choice(channel_names), ""),
                Field::new("kinds", "Kinds", FieldKind::Text, "").help(format!(
                    "Comma-separated; empty for every kind. One of: {}.",
                    kinds.join(", ")
                )),
                Field::new("tag", "Only VMs tagged", FieldKind::Text, ""),
                Field::new(
                    "repeat_minutes",
                    "Remind while down (minutes)",
                    FieldKind::Number,
                    "",
                )
                .help("5 to 10080; empty for no reminders."),
            ],
        }),
        Section::new("Recent messages").table(message_table),
    ])
}

/// `YYYY-MM-DD HH:MM` in UTC as epoch ms, or `None` when empty.
fn utc_time(f: &Fields, name: &str) -> Result<Option<i64>, ApiError> {
    let raw = f.get(name);
    if raw.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    let at = time::PrimitiveDateTime::parse(raw, &format)
        .map_err(|_unreadable| ApiError::field(name, "must be YYYY-MM-DD HH:MM (UTC)"))?;
    let ms = at.assume_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms)
        .map(Some)
        .map_err(|_out_of_range| ApiError::field(name, "out of range"))
}

fn vm_id(f: &Fields) -> Result<VmId, ApiError> {
    f.get("vm").parse().map_err(|e| ApiError::field("vm", e))
}

fn key_id(f: &Fields) -> Result<i64, ApiError> {
    crate::http::extract::positive_id(f.get("key"))
}

pub async fn submit(
    state: &AppState,
    actor: &Actor,
    action: &str,
    f: &Fields,
) -> Result<Outcome, ApiError> {
    match action {
        "window-add" => {
            let value = f.get("value");
            let body = NewWindowBody {
                name: f.get("name").to_owned(),
                scope: f
                    .get("scope")
                    .parse()
                    .map_err(|e| ApiError::field("scope", e))?,
                value: (!value.is_empty()).then(|| value.to_owned()),
                starts_ms: utc_time(f, "starts_ms")?,
                ends_ms: utc_time(f, "ends_ms")?,
                cron: Some(f.get("cron").to_owned()).filter(|c| !c.is_empty()),
                duration_minutes: f.optional_number("duration_minutes")?,
            };
            let window = api::add_window(state, actor, body).await?;
            Ok(Outcome::done(format!("Planned {}.", window.name)))
        }
        "window-delete" => {
            api::remove_window(state, actor, key_id(f)?).await?;
            Ok(Outcome::done("Window deleted."))
        }
        "snooze" => {
            let vm = vm_id(f)?;
            let window = api::snooze_vm(state, actor, vm, f.number("hours")?).await?;
            Ok(Outcome::done(format!(
                "VM {vm} snoozed until {}.",
                maybe_when(window.ends_ms, "?")
            )))
        }
        "tags" => {
            let vm = vm_id(f)?;
            let tags = f
                .get("tags")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| t.to_owned().try_into())
                .collect::<Result<Vec<Tag>, _>>()
                .map_err(|e| ApiError::field("tags", e))?;
            let tags = api::set_tags(state, actor, vm, tags).await?;
            let shown: Vec<&str> = tags.iter().map(Tag::as_str).collect();
            Ok(Outcome::done(if shown.is_empty() {
                format!("VM {vm} has no operator tags now.")
            } else {
                format!("VM {vm} is tagged {}.", shown.join(", "))
            }))
        }
        "channel-add" => {
            let secret = f.raw("secret");
            let body = NewChannelBody {
                name: f.get("name").to_owned(),
                kind: f
                    .get("kind")
                    .parse()
                    .map_err(|e| ApiError::field("kind", e))?,
                target: f.get("target").to_owned(),
                secret: (!secret.is_empty()).then(|| secret.to_owned()),
            };
            let channel = api::add_channel(state, actor, body).await?;
            Ok(Outcome::done(format!("Added channel {}.", channel.name)))
        }
        "channel-test" => {
            let result = api::send_test(state, actor, key_id(f)?).await?;
            Ok(match result.error {
                None => Outcome::done("Test message delivered."),
                Some(error) => Outcome::refused(format!("The test message failed: {error}")),
            })
        }
        "channel-delete" => {
            api::remove_channel(state, actor, key_id(f)?).await?;
            Ok(Outcome::done("Channel deleted with its rules."))
        }
        "rule-add" => {
            let channel_id = {
                let mut conn = state.db.conn().await?;
                store::channels(&mut conn)
                    .await?
                    .into_iter()
                    .find(|c| c.name == f.get("channel"))
                    .map(|c| c.id)
                    .ok_or_else(|| ApiError::field("channel", "no such channel"))?
            };
            let kinds = f
                .get("kinds")
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::parse)
                .collect::<Result<Vec<NotifyKind>, _>>()
                .map_err(|e| ApiError::field("kinds", e))?;
            let tag = match f.get("tag") {
                "" => None,
                raw => Some(Tag::try_from(raw.to_owned()).map_err(|e| ApiError::field("tag", e))?),
            };
            let body = NewRuleBody {
                channel_id,
                kinds,
                tag,
                repeat_minutes: f.optional_number("repeat_minutes")?,
            };
            api::add_rule(state, actor, body).await?;
            Ok(Outcome::done(format!(
                "Added a rule for {}.",
                f.get("channel")
            )))
        }
        "rule-delete" => {
            api::remove_rule(state, actor, key_id(f)?).await?;
            Ok(Outcome::done("Rule deleted."))
        }
        _ => Err(ApiError::field("action", "unknown")),
    }
}
