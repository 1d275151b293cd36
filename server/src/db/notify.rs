//! Storage of tags, notification channels and rules, the outbox of notifications, the
//! notifier's read positions, and maintenance windows.

use super::schema::{
    events, maintenance_windows, notifications, notify_channels, notify_cursors, notify_rules,
    reset_attempts, status_changes, vm_tags, vms,
};
use super::stored::Stored;
use super::{Conn, DbError};
use crate::{with_conn, write_transaction};
use diesel::{
    BoolExpressionMethods, ExpressionMethods, OptionalExtension, QueryDsl, Queryable, Selectable,
    SelectableHelper,
};
use diesel_async::RunQueryDsl;
use domain::maintenance::{Recurrence, Scope, When, Window};
use domain::notify::Rule;
use domain::{
    AttemptOutcome, ChannelKind, DeliveryState, EventKind, NodeName, NotifyKind, PowerAction, Tag,
    TriggerSource, VmId, VmStatus, WindowScope,
};
use serde::Serialize;
use std::collections::HashMap;

// ---- tags ----

/// Replaces a VM's tags. `false` when there is no such VM.
pub async fn set_tags(conn: &mut Conn, vm_id: VmId, tags: &[Tag]) -> Result<bool, DbError> {
    let rows: Vec<(i64, String)> = tags
        .iter()
        .map(|t| (vm_id.get(), t.as_str().to_owned()))
        .collect();
    write_transaction!(conn, |c| {
        let exists: i64 = vms::table
            .filter(vms::id.eq(vm_id.get()))
            .count()
            .get_result(c)
            .await?;
        if exists == 0 {
            return Ok(false);
        }
        diesel::delete(
            vm_tags::table
                .filter(vm_tags::vm_id.eq(vm_id.get()))
                .filter(vm_tags::source.eq(OPERATOR)),
        )
        .execute(c)
        .await?;
        // A tag also read from Proxmox becomes the operator's: it stays when Proxmox
        // drops it.
        for (vm, tag) in &rows {
            diesel::insert_into(vm_tags::table)
                .values((
                    vm_tags::vm_id.eq(vm),
                    vm_tags::tag.eq(tag),
                    vm_tags::source.eq(OPERATOR),
                ))
                .on_conflict((vm_tags::vm_id, vm_tags::tag))
                .do_update()
                .set(vm_tags::source.eq(OPERATOR))
                .execute(c)
                .await?;
        }
        Ok(true)
    })
}

/// The tags of these VMs (every VM when `ids` is `None`), sorted.
pub async fn tags_of(
    conn: &mut Conn,
    ids: Option<&[VmId]>,
) -> Result<HashMap<VmId, Vec<Tag>>, DbError> {
    let mut out: HashMap<VmId, Vec<Tag>> = HashMap::new();
    let chunks: Vec<Vec<i64>> = match ids {
        Some(ids) => ids
            .chunks(2_000)
            .map(|c| c.iter().map(|id| id.get()).collect())
            .collect(),
        None => vec![Vec::new()],
    };
    for chunk in chunks {
        let rows: Vec<(i64, String)> = with_conn!(conn, |c| {
            let mut query = vm_tags::table
                .select((vm_tags::vm_id, vm_tags::tag))
                .order((vm_tags::vm_id, vm_tags::tag))
                .into_boxed();
            if ids.is_some() {
                query = query.filter(vm_tags::vm_id.eq_any(&chunk));
            }
            query.load(c).await
        })?;
        for (vm, tag) in rows {
            // Tags are written only through `Tag`; one that no longer parses is left out
            // rather than matching a rule or window by accident.
            if let Ok(tag) = tag.parse::<Tag>() {
                out.entry(VmId(vm)).or_default().push(tag);
            }
        }
    }
    Ok(out)
}

/// Who set a tag: an operator, or the guest's tags in Proxmox.
const OPERATOR: &str = "operator";
const PROXMOX: &str = "proxmox";

/// Each VM's tags by who set them: `(operator's, read from Proxmox)`, each sorted.
pub async fn tags_by_source(
    conn: &mut Conn,
    ids: &[VmId],
) -> Result<HashMap<VmId, (Vec<Tag>, Vec<Tag>)>, DbError> {
    let mut out: HashMap<VmId, (Vec<Tag>, Vec<Tag>)> = HashMap::new();
    for chunk in ids.chunks(2_000) {
        let chunk: Vec<i64> = chunk.iter().map(|id| id.get()).collect();
        let rows: Vec<(i64, String, String)> = with_conn!(conn, |c| {
            vm_tags::table
                .select((vm_tags::vm_id, vm_tags::tag, vm_tags::source))
                .filter(vm_tags::vm_id.eq_any(&chunk))
                .order((vm_tags::vm_id, vm_tags::tag))
                .load(c)
                .await
        })?;
        for (vm, tag, source) in rows {
            let Ok(tag) = tag.parse::<Tag>() else {
                continue;
            };
            let entry = out.entry(VmId(vm)).or_default();
            if source == PROXMOX {
                entry.1.push(tag);
            } else {
                entry.0.push(tag);
            }
        }
    }
    Ok(out)
}

/// Forgets every tag read from Proxmox (the import was turned off).
pub async fn clear_proxmox_tags(conn: &mut Conn) -> Result<usize, DbError> {
    Ok(with_conn!(conn, |c| {
        diesel::delete(vm_tags::table.filter(vm_tags::source.eq(PROXMOX)))
            .execute(c)
            .await
    })?)
}

/// Replaces the Proxmox-read tags of each VM given; tags an operator set stay theirs.
pub async fn replace_proxmox_tags(
    conn: &mut Conn,
    tags: &[(VmId, Vec<Tag>)],
) -> Result<(), DbError> {
    write_transaction!(conn, |c| {
        for (vm, tags) in tags {
            diesel::delete(
                vm_tags::table
                    .filter(vm_tags::vm_id.eq(vm.get()))
                    .filter(vm_tags::source.eq(PROXMOX)),
            )
            .execute(c)
            .await?;
            for tag in tags {
                diesel::insert_into(vm_tags::table)
                    .values((
                        vm_tags::vm_id.eq(vm.get()),
                        vm_tags::tag.eq(tag.as_str()),
                        vm_tags::source.eq(PROXMOX),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)
                    .await?;
            }
        }
        Ok(())
    })
}

/// The VMs carrying `tag`.
pub async fn tagged(conn: &mut Conn, tag: &Tag) -> Result<Vec<VmId>, DbError> {
    let ids: Vec<i64> = with_conn!(conn, |c| {
        vm_tags::table
            .select(vm_tags::vm_id)
            .filter(vm_tags::tag.eq(tag.as_str()))
            .load(c)
            .await
    })?;
    Ok(ids.into_iter().map(VmId).collect())
}

// ---- channels and rules ----

/// A channel as stored; the secret is never part of what the API answers.
#[derive(Queryable, Selectable, Clone, Debug)]
#[diesel(table_name = notify_channels)]
pub struct ChannelRow {
    pub id: i64,
    pub name: String,
    pub kind: Stored<ChannelKind>,
    pub target: String,
    pub secret: Option<String>,
    pub created_ms: i64,
}

/// A channel as the API shows it.
#[derive(Serialize, Clone, Debug, utoipa::ToSchema)]
pub struct ChannelView {
    pub id: i64,
    pub name: String,
    pub kind: ChannelKind,
    pub target: String,
    pub has_secret: bool,
    pub created_ms: i64,
}

impl ChannelRow {
    pub fn view(&self) -> ChannelView {
        ChannelView {
            id: self.id,
            name: self.name.clone(),
            kind: self.kind.0,
            target: self.target.clone(),
            has_secret: self.secret.is_some(),
            created_ms: self.created_ms,
        }
    }
}

pub struct NewChannel<'a> {
    pub name: &'a str,
    pub kind: ChannelKind,
    pub target: &'a str,
    pub secret: Option<&'a str>,
}

/// `None` when the name is taken.
pub async fn create_channel(
    conn: &mut Conn,
    new: &NewChannel<'_>,
    now_ms: i64,
) -> Result<Option<i64>, DbError> {
    let result = with_conn!(conn, |c| {
        diesel::insert_into(notify_channels::table)
            .values((
                notify_channels::name.eq(new.name),
                notify_channels::kind.eq(new.kind.as_str()),
                notify_channels::target.eq(new.target),
                notify_channels::secret.eq(new.secret),
                notify_channels::created_ms.eq(now_ms),
            ))
            .returning(notify_channels::id)
            .get_result::<i64>(c)
            .await
    });
    match result {
        Ok(id) => Ok(Some(id)),
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        )) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

pub async fn channels(conn: &mut Conn) -> Result<Vec<ChannelRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        notify_channels::table
            .order(notify_channels::id)
            .select(ChannelRow::as_select())
            .load(c)
            .await
    })?)
}

pub async fn channel(conn: &mut Conn, id: i64) -> Result<Option<ChannelRow>, DbError> {
    Ok(with_conn!(conn, |c| {
        notify_channels::table
            .find(id)
            .select(ChannelRow::as_select())
            .first(c)
            .await
            .optional()
    })?)
}

/// Deletes a channel with its rules and queued messages. `false` when there was none.
pub async fn delete_channel(conn: &mut Conn, id: i64) -> Result<bool, DbError> {
    let n = write_transaction!(conn, |c| {
        diesel::delete(notify_rules::table.filter(notify_rules::channel_id.eq(id)))
            .execute(c)
            .await?;
        diesel::delete(notifications::table.filter(notifications::channel_id.eq(id)))
            .execute(c)
            .await?;
        Ok(diesel::delete(notify_channels::table.find(id))
            .execute(c)
            .await?)
    })?;
    Ok(n == 1)
}

/// A rule as the API shows it.
#[derive(Serialize, Clone, Debug, utoipa::ToSchema)]
pub struct RuleView {
    pub id: i64,
    pub channel_id: i64,
    pub kinds: Vec<NotifyKind>,
    #[schema(required)]
    pub tag: Option<Tag>,
    #[schema(required)]
    pub repeat_ms: Option<i64>,
    pub created_ms: i64,
}

impl RuleView {
    pub fn rule(&self) -> Rule {
        Rule {
            id: self.id,
            channel_id: self.channel_id,
            kinds: self.kinds.clone(),
            tag: self.tag.clone(),
            repeat_ms: self.repeat_ms,
        }
    }
}

fn kinds_text(kinds: &[NotifyKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn create_rule(
    conn: &mut Conn,
    rule: &Rule,
    now_ms: i64,
) -> Result<Option<i64>, DbError> {
    let kinds = kinds_text(&rule.kinds);
    let tag = rule.tag.as_ref().map(|t| t.as_str().to_owned());
    write_transaction!(conn, |c| {
        let exists: i64 = notify_channels::table
            .filter(notify_channels::id.eq(rule.channel_id))
            .count()
            .get_result(c)
            .await?;
        if exists == 0 {
            return Ok(None);
        }
        let id = diesel::insert_into(notify_rules::table)
            .values((
                notify_rules::channel_id.eq(rule.channel_id),
                notify_rules::kinds.eq(&kinds),
                notify_rules::tag.eq(&tag),
                notify_rules::repeat_ms.eq(rule.repeat_ms),
                notify_rules::created_ms.eq(now_ms),
            ))
            .returning(notify_rules::id)
            .get_result::<i64>(c)
            .await?;
        Ok(Some(id))
    })
}

/// Every rule. A stored rule naming a kind or tag this release does not know fails the
/// read: a rule must never silently route more (or less) than it says.
pub async fn rules(conn: &mut Conn) -> Result<Vec<RuleView>, DbError> {
    type Raw = (i64, i64, String, Option<String>, Option<i64>, i64);
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        notify_rules::table
            .order(notify_rules::id)
            .select((
                notify_rules::id,
                notify_rules::channel_id,
                notify_rules::kinds,
                notify_rules::tag,
                notify_rules::repeat_ms,
                notify_rules::created_ms,
            ))
            .load(c)
            .await
    })?;
    rows.into_iter()
        .map(|(id, channel_id, kinds, tag, repeat_ms, created_ms)| {
            let kinds = kinds
                .split(',')
                .filter(|k| !k.is_empty())
                .map(|k| k.parse::<NotifyKind>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable(format!("rule {id}: {e}")))?;
            let tag = tag
                .map(|t| t.parse::<Tag>())
                .transpose()
                .map_err(|e| unreadable(format!("rule {id}: tag {e}")))?;
            Ok(RuleView {
                id,
                channel_id,
                kinds,
                tag,
                repeat_ms,
                created_ms,
            })
        })
        .collect()
}

fn unreadable(what: String) -> DbError {
    DbError::Query(diesel::result::Error::DeserializationError(what.into()))
}

pub async fn delete_rule(conn: &mut Conn, id: i64) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::delete(notify_rules::table.find(id))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

// ---- maintenance windows ----

/// A window as the API shows it.
#[derive(Serialize, Clone, Debug, utoipa::ToSchema)]
pub struct WindowView {
    pub id: i64,
    pub name: String,
    pub scope: WindowScope,
    #[schema(required)]
    pub scope_value: Option<String>,
    #[schema(required)]
    pub starts_ms: Option<i64>,
    #[schema(required)]
    pub ends_ms: Option<i64>,
    #[schema(required)]
    pub recurrence: Option<String>,
    #[schema(required)]
    pub duration_ms: Option<i64>,
    pub created_by: String,
    pub created_ms: i64,
}

impl WindowView {
    /// The window the decisions use; an unreadable row is an error.
    pub fn window(&self) -> Result<Window, String> {
        let scope = Scope::parse(self.scope, self.scope_value.as_deref())?;
        let when = match (
            self.starts_ms,
            self.ends_ms,
            &self.recurrence,
            self.duration_ms,
        ) {
            (Some(starts_ms), Some(ends_ms), None, None) => When::Once { starts_ms, ends_ms },
            (None, None, Some(cron), Some(duration_ms)) => When::Every {
                recurrence: Box::new(cron.parse::<Recurrence>()?),
                duration_ms,
            },
            _ => return Err("neither a one-off nor a recurring window".into()),
        };
        Ok(Window {
            name: self.name.clone(),
            scope,
            when,
        })
    }
}

pub async fn create_window(
    conn: &mut Conn,
    window: &Window,
    by: &str,
    now_ms: i64,
) -> Result<i64, DbError> {
    let (starts, ends, cron, duration) = match &window.when {
        When::Once { starts_ms, ends_ms } => (Some(*starts_ms), Some(*ends_ms), None, None),
        When::Every {
            recurrence,
            duration_ms,
        } => (
            None,
            None,
            Some(recurrence.as_str().to_owned()),
            Some(*duration_ms),
        ),
    };
    Ok(with_conn!(conn, |c| {
        diesel::insert_into(maintenance_windows::table)
            .values((
                maintenance_windows::name.eq(&window.name),
                maintenance_windows::scope.eq(window.scope.kind().as_str()),
                maintenance_windows::scope_value.eq(window.scope.value()),
                maintenance_windows::starts_ms.eq(starts),
                maintenance_windows::ends_ms.eq(ends),
                maintenance_windows::recurrence.eq(cron),
                maintenance_windows::duration_ms.eq(duration),
                maintenance_windows::created_by.eq(by),
                maintenance_windows::created_ms.eq(now_ms),
            ))
            .returning(maintenance_windows::id)
            .get_result::<i64>(c)
            .await
    })?)
}

pub async fn windows(conn: &mut Conn) -> Result<Vec<WindowView>, DbError> {
    windows_where(conn, None).await
}

/// One window by id.
pub async fn window(conn: &mut Conn, id: i64) -> Result<Option<WindowView>, DbError> {
    Ok(windows_where(conn, Some(id)).await?.pop())
}

async fn windows_where(conn: &mut Conn, id: Option<i64>) -> Result<Vec<WindowView>, DbError> {
    type Raw = (
        i64,
        String,
        Stored<WindowScope>,
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<i64>,
        String,
        i64,
    );
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        let mut query = maintenance_windows::table
            .order(maintenance_windows::id)
            .into_boxed();
        if let Some(id) = id {
            query = query.filter(maintenance_windows::id.eq(id));
        }
        query
            .select((
                maintenance_windows::id,
                maintenance_windows::name,
                maintenance_windows::scope,
                maintenance_windows::scope_value,
                maintenance_windows::starts_ms,
                maintenance_windows::ends_ms,
                maintenance_windows::recurrence,
                maintenance_windows::duration_ms,
                maintenance_windows::created_by,
                maintenance_windows::created_ms,
            ))
            .load(c)
            .await
    })?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                name,
                scope,
                scope_value,
                starts_ms,
                ends_ms,
                recurrence,
                duration_ms,
                by,
                at,
            )| {
                WindowView {
                    id,
                    name,
                    scope: scope.0,
                    scope_value,
                    starts_ms,
                    ends_ms,
                    recurrence,
                    duration_ms,
                    created_by: by,
                    created_ms: at,
                }
            },
        )
        .collect())
}

/// The windows decisions use. One that does not read fails the read: a window the server
/// cannot understand must stop resets (the caller fails its round), never be ignored.
pub async fn active_windows(conn: &mut Conn) -> Result<Vec<Window>, DbError> {
    windows(conn)
        .await?
        .iter()
        .map(|w| {
            w.window()
                .map_err(|e| unreadable(format!("maintenance window {}: {e}", w.id)))
        })
        .collect()
}

pub async fn delete_window(conn: &mut Conn, id: i64) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::delete(maintenance_windows::table.find(id))
            .execute(c)
            .await
    })?;
    Ok(n == 1)
}

// ---- what the notifier reads ----

pub async fn cursor(conn: &mut Conn, name: &str) -> Result<i64, DbError> {
    let found: Option<i64> = with_conn!(conn, |c| {
        notify_cursors::table
            .find(name)
            .select(notify_cursors::last_id)
            .first(c)
            .await
            .optional()
    })?;
    Ok(found.unwrap_or(0))
}

/// One VM's status change, with what the message needs about the VM.
#[derive(Clone, Debug)]
pub struct ChangeRow {
    pub id: i64,
    pub vm_id: VmId,
    pub from: VmStatus,
    pub to: VmStatus,
    pub at_ms: i64,
    pub reason: String,
    pub hostname: String,
    pub node: Option<NodeName>,
    /// The VM's status and its start now (a warning may have ended since).
    pub status_now: VmStatus,
    pub status_since_ms: i64,
}

pub async fn changes_after(
    conn: &mut Conn,
    after: i64,
    limit: i64,
) -> Result<Vec<ChangeRow>, DbError> {
    type Raw = (
        i64,
        i64,
        Stored<VmStatus>,
        Stored<VmStatus>,
        i64,
        String,
        String,
        Option<String>,
        Stored<VmStatus>,
        i64,
    );
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        status_changes::table
            .inner_join(vms::table)
            .filter(status_changes::id.gt(after))
            .order(status_changes::id)
            .limit(limit)
            .select((
                status_changes::id,
                status_changes::vm_id,
                status_changes::from_status,
                status_changes::to_status,
                status_changes::at_ms,
                status_changes::reason,
                vms::hostname,
                vms::proxmox_node,
                vms::status,
                vms::status_since_ms,
            ))
            .load(c)
            .await
    })?;
    rows.into_iter()
        .map(
            |(id, vm, from, to, at_ms, reason, hostname, node, now, since)| {
                Ok(ChangeRow {
                    id,
                    vm_id: VmId(vm),
                    from: from.0,
                    to: to.0,
                    at_ms,
                    reason,
                    hostname,
                    node: node.and_then(|n| n.parse().ok()),
                    status_now: now.0,
                    status_since_ms: since,
                })
            },
        )
        .collect()
}

/// With no rule at all nothing is told: the read positions move to the newest rows and
/// power actions count as told, without reading them (a fleet that has not set up
/// notifications pays a few index look-ups a pass). `None` when nothing moved since.
pub async fn skip_targets(conn: &mut Conn) -> Result<Option<(i64, i64)>, DbError> {
    let changes = last_change_id(conn).await?;
    let events = last_event_id(conn).await?;
    let (at_changes, at_events) = (
        cursor(conn, "status_changes").await?,
        cursor(conn, "events").await?,
    );
    let untold: i64 = with_conn!(conn, |c| {
        reset_attempts::table
            .filter(untold())
            .count()
            .get_result(c)
            .await
    })?;
    let moved = changes != at_changes || events != at_events || untold > 0;
    Ok(moved.then_some((changes, events)))
}

/// Moves the read positions to these ids and counts every power action as told.
pub async fn skip_to(conn: &mut Conn, changes: i64, events: i64) -> Result<(), DbError> {
    write_transaction!(conn, |c| {
        for (name, to) in [("status_changes", changes), ("events", events)] {
            diesel::update(notify_cursors::table.filter(notify_cursors::name.eq(name)))
                .set(notify_cursors::last_id.eq(to))
                .execute(c)
                .await?;
        }
        diesel::update(reset_attempts::table.filter(untold()))
            .set(reset_attempts::notice.eq("ended"))
            .execute(c)
            .await?;
        Ok(())
    })
}

/// The newest change id: where a notifier with no rules skips to.
pub async fn last_change_id(conn: &mut Conn) -> Result<i64, DbError> {
    let id: Option<i64> = with_conn!(conn, |c| {
        status_changes::table
            .select(diesel::dsl::max(status_changes::id))
            .first(c)
            .await
    })?;
    Ok(id.unwrap_or(0))
}

/// One recorded event, with its VM's name and node when it has one.
#[derive(Clone, Debug)]
pub struct EventRow {
    pub id: i64,
    pub kind: EventKind,
    pub vm_id: Option<VmId>,
    pub message: String,
    pub at_ms: i64,
}

pub async fn events_after(
    conn: &mut Conn,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, DbError> {
    type Raw = (i64, Stored<EventKind>, Option<i64>, String, i64);
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        events::table
            .filter(events::id.gt(after))
            .order(events::id)
            .limit(limit)
            .select((
                events::id,
                events::kind,
                events::vm_id,
                events::message,
                events::at_ms,
            ))
            .load(c)
            .await
    })?;
    Ok(rows
        .into_iter()
        .map(|(id, kind, vm, message, at_ms)| EventRow {
            id,
            kind: kind.0,
            vm_id: vm.map(VmId),
            message,
            at_ms,
        })
        .collect())
}

pub async fn last_event_id(conn: &mut Conn) -> Result<i64, DbError> {
    let id: Option<i64> = with_conn!(conn, |c| {
        events::table
            .select(diesel::dsl::max(events::id))
            .first(c)
            .await
    })?;
    Ok(id.unwrap_or(0))
}

/// Power actions with something left to tell: nothing told yet, or told sent and not ended.
fn untold() -> diesel::dsl::Or<
    diesel::dsl::IsNull<reset_attempts::notice>,
    diesel::dsl::Eq<reset_attempts::notice, &'static str>,
> {
    reset_attempts::notice
        .is_null()
        .or(reset_attempts::notice.eq("sent"))
}

/// A power action not yet told (or told as sent, not yet as ended).
#[derive(Clone, Debug)]
pub struct AttemptNotice {
    pub id: i64,
    pub vm_id: VmId,
    pub action: PowerAction,
    pub source: TriggerSource,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
    pub notice: Option<String>,
    pub at_ms: i64,
}

pub async fn untold_attempts(conn: &mut Conn, limit: i64) -> Result<Vec<AttemptNotice>, DbError> {
    type Raw = (
        i64,
        i64,
        Stored<PowerAction>,
        Stored<TriggerSource>,
        Stored<AttemptOutcome>,
        Option<String>,
        Option<String>,
        i64,
    );
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        reset_attempts::table
            .filter(untold())
            .order(reset_attempts::id)
            .limit(limit)
            .select((
                reset_attempts::id,
                reset_attempts::vm_id,
                reset_attempts::action,
                reset_attempts::trigger_source,
                reset_attempts::outcome,
                reset_attempts::error,
                reset_attempts::notice,
                reset_attempts::created_ms,
            ))
            .load(c)
            .await
    })?;
    rows.into_iter()
        .map(|(id, vm, action, source, outcome, error, notice, at_ms)| {
            Ok(AttemptNotice {
                id,
                vm_id: VmId(vm),
                action: action.0,
                source: source.0,
                outcome: outcome.0,
                error,
                notice,
                at_ms,
            })
        })
        .collect()
}

/// What a message needs about a VM, now.
#[derive(Clone, Debug)]
pub struct VmBrief {
    pub hostname: String,
    pub node: Option<NodeName>,
    pub status: VmStatus,
    pub status_since_ms: i64,
}

pub async fn vm_briefs(conn: &mut Conn, ids: &[VmId]) -> Result<HashMap<VmId, VmBrief>, DbError> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(2_000) {
        let ids: Vec<i64> = chunk.iter().map(|v| v.get()).collect();
        type Raw = (i64, String, Option<String>, Stored<VmStatus>, i64);
        let rows: Vec<Raw> = with_conn!(conn, |c| {
            vms::table
                .filter(vms::id.eq_any(&ids))
                .select((
                    vms::id,
                    vms::hostname,
                    vms::proxmox_node,
                    vms::status,
                    vms::status_since_ms,
                ))
                .load(c)
                .await
        })?;
        for (id, hostname, node, status, since) in rows {
            {
                out.insert(
                    VmId(id),
                    VmBrief {
                        hostname,
                        node: node.and_then(|n| n.parse().ok()),
                        status: status.0,
                        status_since_ms: since,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// Per node: its VMs, and how many are down now (for "node unreachable").
pub async fn node_tallies(
    conn: &mut Conn,
    nodes: &[NodeName],
) -> Result<Vec<(NodeName, u64, u64)>, DbError> {
    let mut out = Vec::new();
    for node in nodes {
        let (total, down): (i64, i64) = with_conn!(conn, |c| {
            let total: i64 = vms::table
                .filter(vms::proxmox_node.eq(node.as_str()))
                .count()
                .get_result(c)
                .await?;
            let down: i64 = vms::table
                .filter(vms::proxmox_node.eq(node.as_str()))
                .filter(vms::status.eq(VmStatus::Down.as_str()))
                .count()
                .get_result(c)
                .await?;
            Ok::<_, diesel::result::Error>((total, down))
        })?;
        out.push((
            node.clone(),
            u64::try_from(total).unwrap_or(0),
            u64::try_from(down).unwrap_or(0),
        ));
    }
    Ok(out)
}

// ---- the outbox ----

/// One message to queue.
#[derive(Clone, Debug)]
pub struct NewNotification {
    pub channel_id: i64,
    pub rule_id: Option<i64>,
    pub kind: NotifyKind,
    pub vm_id: Option<VmId>,
    pub message_json: String,
    pub state: DeliveryState,
    pub next_attempt_ms: i64,
    /// Why it is not sent (a maintenance window, a node message that told it).
    pub note: Option<String>,
}

/// What a batch of the notifier's work commits at once: the messages, the read positions
/// moved from what was read to what was processed (compare-and-set, so two replicas never
/// both queue one happening), and the attempts marked told.
#[derive(Default)]
pub struct NotifierCommit {
    pub messages: Vec<NewNotification>,
    /// (cursor, read from, processed up to).
    pub cursors: Vec<(&'static str, i64, i64)>,
    /// (attempt, notice it had, notice it gets).
    pub attempts: Vec<(i64, Option<String>, &'static str)>,
}

/// Commits a batch; `false` when another replica moved a cursor or told an attempt first
/// (nothing is written; the next pass reads again).
pub async fn commit_notifier(
    conn: &mut Conn,
    batch: &NotifierCommit,
    now_ms: i64,
) -> Result<bool, DbError> {
    write_transaction!(conn, |c| {
        for (name, from, to) in &batch.cursors {
            let moved = diesel::update(
                notify_cursors::table
                    .filter(notify_cursors::name.eq(*name))
                    .filter(notify_cursors::last_id.eq(*from)),
            )
            .set(notify_cursors::last_id.eq(*to))
            .execute(c)
            .await?;
            if moved != 1 {
                return Err(DbError::Query(diesel::result::Error::RollbackTransaction));
            }
        }
        for (id, had, gets) in &batch.attempts {
            let mut q = diesel::update(reset_attempts::table.find(*id)).into_boxed();
            q = match had {
                Some(n) => q.filter(reset_attempts::notice.eq(n.clone())),
                None => q.filter(reset_attempts::notice.is_null()),
            };
            if q.set(reset_attempts::notice.eq(*gets)).execute(c).await? != 1 {
                return Err(DbError::Query(diesel::result::Error::RollbackTransaction));
            }
        }
        for m in &batch.messages {
            diesel::insert_into(notifications::table)
                .values((
                    notifications::channel_id.eq(m.channel_id),
                    notifications::rule_id.eq(m.rule_id),
                    notifications::kind.eq(m.kind.as_str()),
                    notifications::vm_id.eq(m.vm_id.map(|v| v.get())),
                    notifications::message_json.eq(&m.message_json),
                    notifications::state.eq(m.state.as_str()),
                    notifications::next_attempt_ms.eq(m.next_attempt_ms),
                    notifications::last_error.eq(&m.note),
                    notifications::created_ms.eq(now_ms),
                ))
                .execute(c)
                .await?;
        }
        Ok(())
    })
    .map(|()| true)
    .or_else(|err| match err {
        DbError::Query(diesel::result::Error::RollbackTransaction) => Ok(false),
        other => Err(other),
    })
}

/// The newest message of `kinds` on a rule about a VM, and its state.
pub async fn newest_of(
    conn: &mut Conn,
    rule_id: i64,
    vm_id: VmId,
    kinds: &[NotifyKind],
) -> Result<Option<(NotifyKind, DeliveryState, i64)>, DbError> {
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let row: Option<(Stored<NotifyKind>, Stored<DeliveryState>, i64)> = with_conn!(conn, |c| {
        notifications::table
            .filter(notifications::rule_id.eq(rule_id))
            .filter(notifications::vm_id.eq(vm_id.get()))
            .filter(notifications::kind.eq_any(&kinds))
            .order(notifications::id.desc())
            .select((
                notifications::kind,
                notifications::state,
                notifications::created_ms,
            ))
            .first(c)
            .await
            .optional()
    })?;
    Ok(row.map(|(k, s, at)| (k.0, s.0, at)))
}

/// VMs a rule told down (sent or grouped) and told nothing newer of their pair: who gets
/// reminders, and who is owed a down after a window hid it.
/// Only the last `PAIR_LOOKBACK_MS` of messages are read (a reminder keeps a down VM's row
/// fresh; a down told once and never since is older news than that).
pub async fn pair_heads(
    conn: &mut Conn,
    rule_id: i64,
    kinds: &[NotifyKind],
    now_ms: i64,
) -> Result<Vec<(VmId, NotifyKind, DeliveryState, i64)>, DbError> {
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let since = now_ms.saturating_sub(PAIR_LOOKBACK_MS);
    type Raw = (
        i64,
        Option<i64>,
        Stored<NotifyKind>,
        Stored<DeliveryState>,
        i64,
    );
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        notifications::table
            .filter(notifications::rule_id.eq(rule_id))
            .filter(notifications::kind.eq_any(&kinds))
            .filter(notifications::created_ms.gt(since))
            .order((notifications::vm_id, notifications::id.desc()))
            .select((
                notifications::id,
                notifications::vm_id,
                notifications::kind,
                notifications::state,
                notifications::created_ms,
            ))
            .load(c)
            .await
    })?;
    let mut out: Vec<(VmId, NotifyKind, DeliveryState, i64)> = Vec::new();
    for (_, vm, kind, state, at) in rows {
        let Some(vm) = vm.map(VmId) else {
            continue;
        };
        if out.last().is_some_and(|(last, ..)| *last == vm) {
            continue;
        }
        out.push((vm, kind.0, state.0, at));
    }
    Ok(out)
}

/// How far back reminders and owed downs look.
const PAIR_LOOKBACK_MS: i64 = 30 * 24 * 3_600_000;

/// Deletes settled messages (sent, dropped, grouped, dead) older than `before_ms`, at most
/// `limit` at a time; how many went.
pub async fn prune(conn: &mut Conn, before_ms: i64, limit: i64) -> Result<usize, DbError> {
    let settled = [
        DeliveryState::Sent.as_str(),
        DeliveryState::Dropped.as_str(),
        DeliveryState::Grouped.as_str(),
        DeliveryState::Dead.as_str(),
    ];
    Ok(with_conn!(conn, |c| {
        let ids: Vec<i64> = notifications::table
            .filter(notifications::created_ms.lt(before_ms))
            .filter(notifications::state.eq_any(settled))
            .order(notifications::id)
            .limit(limit)
            .select(notifications::id)
            .load(c)
            .await?;
        diesel::delete(notifications::table.filter(notifications::id.eq_any(&ids)))
            .execute(c)
            .await
    })?)
}

/// Deletes one-off windows that ended before `before_ms`; how many went.
pub async fn prune_windows(conn: &mut Conn, before_ms: i64) -> Result<usize, DbError> {
    Ok(with_conn!(conn, |c| {
        diesel::delete(
            maintenance_windows::table
                .filter(maintenance_windows::ends_ms.is_not_null())
                .filter(maintenance_windows::ends_ms.lt(before_ms)),
        )
        .execute(c)
        .await
    })?)
}

/// A queued message as the deliverer takes it.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub id: i64,
    pub channel_id: i64,
    pub kind: NotifyKind,
    pub vm_id: Option<VmId>,
    pub message_json: String,
    pub attempts: i32,
    pub next_attempt_ms: i64,
}

/// Messages whose (next) attempt is due, oldest first.
pub async fn due(conn: &mut Conn, now_ms: i64, limit: i64) -> Result<Vec<Outgoing>, DbError> {
    type Raw = (i64, i64, Stored<NotifyKind>, Option<i64>, String, i32, i64);
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        notifications::table
            .filter(notifications::state.eq(DeliveryState::Pending.as_str()))
            .filter(notifications::next_attempt_ms.le(now_ms))
            .order(notifications::id)
            .limit(limit)
            .select((
                notifications::id,
                notifications::channel_id,
                notifications::kind,
                notifications::vm_id,
                notifications::message_json,
                notifications::attempts,
                notifications::next_attempt_ms,
            ))
            .load(c)
            .await
    })?;
    Ok(rows
        .into_iter()
        .map(
            |(id, channel_id, kind, vm, json, attempts, next)| Outgoing {
                id,
                channel_id,
                kind: kind.0,
                vm_id: vm.map(VmId),
                message_json: json,
                attempts,
                next_attempt_ms: next,
            },
        )
        .collect())
}

/// Takes a message for one attempt: counts the attempt and pushes its next time to
/// `lease_until`, only if nobody took it since it was read. `false`: someone else has it.
pub async fn claim(conn: &mut Conn, m: &Outgoing, lease_until: i64) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(
            notifications::table
                .find(m.id)
                .filter(notifications::state.eq(DeliveryState::Pending.as_str()))
                .filter(notifications::attempts.eq(m.attempts))
                .filter(notifications::next_attempt_ms.eq(m.next_attempt_ms)),
        )
        .set((
            notifications::attempts.eq(m.attempts.saturating_add(1)),
            notifications::next_attempt_ms.eq(lease_until),
        ))
        .execute(c)
        .await
    })?;
    Ok(n == 1)
}

/// Records how the attempt numbered `attempts` ended: sent, dead, dropped, or pending again
/// at `next_attempt_ms`. Only while that attempt still holds the message: one that outlived
/// its lease (another replica took the message since) changes nothing.
pub async fn settle(
    conn: &mut Conn,
    id: i64,
    attempts: i32,
    state: DeliveryState,
    error: Option<&str>,
    next_attempt_ms: i64,
    now_ms: i64,
) -> Result<(), DbError> {
    let sent = (state == DeliveryState::Sent).then_some(now_ms);
    with_conn!(conn, |c| {
        diesel::update(
            notifications::table
                .find(id)
                .filter(notifications::attempts.eq(attempts))
                .filter(notifications::state.eq(DeliveryState::Pending.as_str())),
        )
        .set((
            notifications::state.eq(state.as_str()),
            notifications::last_error.eq(error),
            notifications::next_attempt_ms.eq(next_attempt_ms),
            notifications::sent_ms.eq(sent),
        ))
        .execute(c)
        .await
    })?;
    Ok(())
}

/// A queued, sent or dead message as the API shows it.
#[derive(Serialize, Clone, Debug, utoipa::ToSchema)]
pub struct NotificationView {
    pub id: i64,
    pub channel_id: i64,
    #[schema(required)]
    pub rule_id: Option<i64>,
    pub kind: NotifyKind,
    #[schema(required)]
    pub vm_id: Option<i64>,
    pub state: DeliveryState,
    pub attempts: i32,
    pub next_attempt_ms: i64,
    #[schema(required)]
    pub last_error: Option<String>,
    pub created_ms: i64,
    #[schema(required)]
    pub sent_ms: Option<i64>,
    /// The message as it was queued; null only for a stored one this version cannot read.
    #[schema(value_type = Option<domain::notify::Message>, required)]
    pub message: serde_json::Value,
}

/// The newest messages, optionally only those in `state`.
pub async fn recent(
    conn: &mut Conn,
    state: Option<DeliveryState>,
    limit: i64,
) -> Result<Vec<NotificationView>, DbError> {
    type Raw = (
        i64,
        i64,
        Option<i64>,
        Stored<NotifyKind>,
        Option<i64>,
        Stored<DeliveryState>,
        i32,
        i64,
        Option<String>,
        i64,
        Option<i64>,
        String,
    );
    let rows: Vec<Raw> = with_conn!(conn, |c| {
        let mut q = notifications::table
            .order(notifications::id.desc())
            .limit(limit)
            .select((
                notifications::id,
                notifications::channel_id,
                notifications::rule_id,
                notifications::kind,
                notifications::vm_id,
                notifications::state,
                notifications::attempts,
                notifications::next_attempt_ms,
                notifications::last_error,
                notifications::created_ms,
                notifications::sent_ms,
                notifications::message_json,
            ))
            .into_boxed();
        if let Some(state) = state {
            q = q.filter(notifications::state.eq(state.as_str()));
        }
        q.load(c).await
    })?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                channel_id,
                rule_id,
                kind,
                vm_id,
                state,
                attempts,
                next,
                error,
                at,
                sent,
                json,
            )| {
                NotificationView {
                    id,
                    channel_id,
                    rule_id,
                    kind: kind.0,
                    vm_id,
                    state: state.0,
                    attempts,
                    next_attempt_ms: next,
                    last_error: error,
                    created_ms: at,
                    sent_ms: sent,
                    message: serde_json::from_str(&json).unwrap_or(serde_json::Value::Null),
                }
            },
        )
        .collect())
}
