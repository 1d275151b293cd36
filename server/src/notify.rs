//! The notifier: turns stored happenings (status changes, events, power actions) into
//! queued messages by the rules, and delivers the queue. It reads what the ingest writer and
//! the scheduler already stored, so a slow channel never delays either of them.

use crate::db::notify::{
    self as store, ChangeRow, EventRow, NewNotification, NotifierCommit, VmBrief,
};
use crate::db::{Conn, DbError};
use crate::state::AppState;
use domain::maintenance::{self, Covered, Window};
use domain::notify::{self, AboutVm, Message, Rule};
use domain::{AttemptOutcome, DeliveryState, NodeName, NotifyKind, Tag, VmId, VmStatus};
use std::collections::HashMap;

/// Happenings read per pass and source.
const BATCH: i64 = 500;
/// How often reminders and downs a window hid are looked for.
const REMINDER_EVERY_MS: i64 = 10_000;

/// Runs the notifier and the deliverer until the process stops.
pub async fn run(state: AppState) {
    let deliverer = state.deliverer.clone();
    let mut tick = tokio::time::interval(state.config.notify.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reminders = 0i64;
    let mut last_prune = 0i64;
    loop {
        tick.tick().await;
        let now_ms = crate::now_ms();
        if now_ms.saturating_sub(last_prune) >= PRUNE_EVERY_MS {
            last_prune = now_ms;
            if let Err(err) = prune(&state, now_ms).await {
                tracing::warn!(error = %err, "could not prune old notifications");
            }
        }
        let reminders = now_ms.saturating_sub(last_reminders) >= REMINDER_EVERY_MS;
        match pass(&state, now_ms, reminders).await {
            Ok(()) => {
                state.health.record_notifier_pass(now_ms);
                if reminders {
                    last_reminders = now_ms;
                }
            }
            Err(err) => tracing::warn!(error = %err, "notifier pass failed; retrying"),
        }
        if let Err(err) = deliverer.deliver_due(now_ms).await {
            tracing::warn!(error = %err, "notification delivery failed; retrying");
        }
    }
}

/// How often old messages and ended windows are deleted.
const PRUNE_EVERY_MS: i64 = 3_600_000;

/// Settled messages older than the event retention, and one-off windows that ended a day
/// ago (kept that long to explain a VM's reason), in bounded steps.
async fn prune(state: &AppState, now_ms: i64) -> Result<(), DbError> {
    let days = state.config.retention.events_days;
    let before = now_ms.saturating_sub(days.saturating_mul(24 * 3_600_000));
    loop {
        let (mut conn, _turn) = state.db.write_conn().await?;
        if store::prune(&mut conn, before, 5_000).await? < 5_000 {
            break;
        }
    }
    let (mut conn, _turn) = state.db.write_conn().await?;
    store::prune_windows(&mut conn, now_ms.saturating_sub(24 * 3_600_000)).await?;
    Ok(())
}

/// What the rules and windows need about the VMs of one pass.
struct Context {
    rules: Vec<Rule>,
    windows: Vec<Window>,
    tags: HashMap<VmId, Vec<Tag>>,
    now_ms: i64,
}

impl Context {
    fn tags(&self, vm: VmId) -> &[Tag] {
        self.tags.get(&vm).map_or(&[], Vec::as_slice)
    }

    /// The open window covering this VM, named for the record.
    fn window(&self, vm: VmId, node: Option<&NodeName>) -> Option<String> {
        let covered = Covered {
            id: vm,
            tags: self.tags(vm),
            node,
        };
        maintenance::covering(&self.windows, &covered, self.now_ms)
            .map(|(name, _)| format!("maintenance window {name:?}"))
    }
}

/// The newest message of a pair, per rule and VM, as this pass leaves it (stored or queued
/// earlier in the same pass).
#[derive(Default)]
struct Pairs(HashMap<(i64, VmId, NotifyKind), Option<(NotifyKind, DeliveryState)>>);

impl Pairs {
    async fn newest(
        &mut self,
        conn: &mut Conn,
        rule: i64,
        vm: VmId,
        kind: NotifyKind,
    ) -> Result<Option<(NotifyKind, DeliveryState)>, DbError> {
        let pair = notify::pair_of(kind);
        let key = (rule, vm, pair.first().copied().unwrap_or(kind));
        if let Some(known) = self.0.get(&key) {
            return Ok(*known);
        }
        let found = store::newest_of(conn, rule, vm, pair)
            .await?
            .map(|(k, s, _)| (k, s));
        self.0.insert(key, found);
        Ok(found)
    }

    fn record(&mut self, rule: i64, vm: VmId, kind: NotifyKind, state: DeliveryState) {
        if let Some(first) = notify::pair_of(kind).first() {
            self.0.insert((rule, vm, *first), Some((kind, state)));
        }
    }
}

/// Told, or about to be: a down queued or told by its node counts as told for its recovery.
fn told(state: DeliveryState) -> bool {
    matches!(
        state,
        DeliveryState::Pending | DeliveryState::Sent | DeliveryState::Grouped
    )
}

fn message_json(message: &Message) -> String {
    serde_json::to_string(message).unwrap_or_else(|_| "{}".into())
}

/// One pass: reads what happened since the last, queues its messages and moves the read
/// positions in one transaction (a replica that raced this one commits nothing).
pub async fn pass(state: &AppState, now_ms: i64, reminders: bool) -> Result<(), DbError> {
    let cfg = &state.config.notify;
    let mut conn = state.db.conn().await?;
    // Read before the rules: a rule created meanwhile then sees every change after it.
    let skip = store::skip_targets(&mut conn).await?;
    let rules: Vec<Rule> = store::rules(&mut conn)
        .await?
        .iter()
        .map(store::RuleView::rule)
        .collect();
    if rules.is_empty() {
        if let Some((changes, events)) = skip {
            drop(conn);
            let (mut conn, _turn) = state.db.write_conn().await?;
            store::skip_to(&mut conn, changes, events).await?;
        }
        return Ok(());
    }
    // A window that cannot be read stops automatic resets (the round fails), but it must
    // not silence every alert: the notifier then tells everything, and says why.
    let windows = match store::active_windows(&mut conn).await {
        Ok(windows) => windows,
        Err(err) => {
            tracing::error!(error = %err, "a maintenance window cannot be read; notifying as if none were open");
            Vec::new()
        }
    };
    let from_changes = store::cursor(&mut conn, "status_changes").await?;
    let from_events = store::cursor(&mut conn, "events").await?;
    let mut changes = store::changes_after(&mut conn, from_changes, BATCH).await?;
    let mut events = store::events_after(&mut conn, from_events, BATCH).await?;
    // Rows of transactions still open may hold lower ids: stop before a fresh gap.
    let read: Vec<(i64, i64)> = changes.iter().map(|c| (c.id, c.at_ms)).collect();
    changes.truncate(notify::consumable(from_changes, &read, now_ms));
    let read: Vec<(i64, i64)> = events.iter().map(|e| (e.id, e.at_ms)).collect();
    events.truncate(notify::consumable(from_events, &read, now_ms));
    let attempts = store::untold_attempts(&mut conn, BATCH).await?;

    let mut ids: Vec<VmId> = changes.iter().map(|c| c.vm_id).collect();
    ids.extend(events.iter().filter_map(|e| e.vm_id));
    ids.extend(attempts.iter().map(|a| a.vm_id));
    ids.sort_unstable();
    ids.dedup();
    let briefs = store::vm_briefs(&mut conn, &ids).await?;
    let ctx = Context {
        tags: store::tags_of(&mut conn, Some(&ids)).await?,
        rules,
        windows,
        now_ms,
    };
    let mut batch = NotifierCommit::default();
    let mut pairs = Pairs::default();

    // Downs of one pass whose node went down whole are told once, as the node.
    let downs: Vec<(VmId, Option<NodeName>)> = changes
        .iter()
        .filter(|c| notify::from_status_change(c.from, c.to) == Some(NotifyKind::VmDown))
        .map(|c| (c.vm_id, c.node.clone()))
        .collect();
    let mut nodes: Vec<NodeName> = downs.iter().filter_map(|(_, n)| n.clone()).collect();
    nodes.sort();
    nodes.dedup();
    let tallies = store::node_tallies(&mut conn, &nodes).await?;
    // A node in planned work is not news: its downs are dropped one by one instead.
    let unreachable: Vec<NodeName> = notify::unreachable_nodes(&downs, &tallies)
        .into_iter()
        .filter(|node| {
            !downs
                .iter()
                .any(|(vm, n)| n.as_ref() == Some(*node) && ctx.window(*vm, Some(*node)).is_some())
        })
        .cloned()
        .collect();
    for node in &unreachable {
        let hosts: Vec<String> = changes
            .iter()
            .filter(|c| c.node.as_ref() == Some(node) && c.to == VmStatus::Down)
            .map(|c| c.hostname.clone())
            .collect();
        let message = Message::node_unreachable(node, &hosts, now_ms);
        for rule in ctx
            .rules
            .iter()
            .filter(|r| r.wants(NotifyKind::NodeUnreachable, None))
        {
            batch
                .messages
                .push(queued(rule, None, &message, now_ms, None));
        }
    }

    for change in &changes {
        on_change(
            &mut conn,
            &ctx,
            &mut pairs,
            &mut batch,
            change,
            &unreachable,
            cfg,
        )
        .await?;
    }
    for event in &events {
        on_event(&ctx, &mut batch, event, &briefs);
    }
    for attempt in &attempts {
        let Some(kind_and_notice) = attempt_notice(attempt.outcome, attempt.notice.as_deref())
        else {
            continue;
        };
        let (kind, gets) = kind_and_notice;
        batch
            .attempts
            .push((attempt.id, attempt.notice.clone(), gets));
        let (Some(kind), Some(brief)) = (kind, briefs.get(&attempt.vm_id)) else {
            continue;
        };
        let detail = match (&attempt.error, kind) {
            (Some(error), NotifyKind::PowerActionFailed) => {
                format!("{} ({}): {error}", attempt.action, attempt.source)
            }
            _ => format!("{} ({})", attempt.action, attempt.source),
        };
        let message = Message::about_vm(kind, about(attempt.vm_id, brief), &detail, attempt.at_ms);
        for rule in ctx
            .rules
            .iter()
            .filter(|r| r.wants(kind, Some(ctx.tags(attempt.vm_id))))
        {
            batch
                .messages
                .push(queued(rule, Some(attempt.vm_id), &message, now_ms, None));
        }
    }

    if let Some(last) = changes.last() {
        batch
            .cursors
            .push(("status_changes", from_changes, last.id));
    }
    if let Some(last) = events.last() {
        batch.cursors.push(("events", from_events, last.id));
    }
    if reminders {
        // A cursor too: two replicas never both send one reminder.
        let from = store::cursor(&mut conn, "reminders").await?;
        remind(&mut conn, &ctx, &mut batch, now_ms).await?;
        batch.cursors.push(("reminders", from, now_ms));
    }
    if batch.cursors.is_empty() && batch.attempts.is_empty() && batch.messages.is_empty() {
        return Ok(());
    }
    let queued = batch.messages.len();
    drop(conn);
    // On SQLite every write transaction takes the one writer's turn (see `Db::write_conn`).
    let (mut conn, _turn) = state.db.write_conn().await?;
    if store::commit_notifier(&mut conn, &batch, now_ms).await? {
        if queued > 0 {
            tracing::debug!(queued, "notifications queued");
        }
    } else {
        tracing::debug!("another replica took this notifier pass");
    }
    Ok(())
}

fn about(id: VmId, brief: &VmBrief) -> AboutVm {
    AboutVm {
        id,
        hostname: brief.hostname.clone(),
        node: brief.node.clone(),
        status: brief.status,
    }
}

fn queued(
    rule: &Rule,
    vm: Option<VmId>,
    message: &Message,
    next_attempt_ms: i64,
    held: Option<(DeliveryState, String)>,
) -> NewNotification {
    let (state, note) = match held {
        Some((state, note)) => (state, Some(note)),
        None => (DeliveryState::Pending, None),
    };
    NewNotification {
        channel_id: rule.channel_id,
        rule_id: Some(rule.id),
        kind: message.kind,
        vm_id: vm,
        message_json: message_json(message),
        state,
        next_attempt_ms,
        note,
    }
}

/// What to tell of a power action now, and the notice it then carries: `None` when it has
/// nothing new to tell yet (still pending).
fn attempt_notice(
    outcome: AttemptOutcome,
    notice: Option<&str>,
) -> Option<(Option<NotifyKind>, &'static str)> {
    let ended = match outcome {
        AttemptOutcome::Ok => Some(NotifyKind::PowerActionSucceeded),
        AttemptOutcome::Failed | AttemptOutcome::Interrupted => Some(NotifyKind::PowerActionFailed),
        _ => None,
    };
    match (outcome, notice, ended) {
        (_, _, Some(kind)) => Some((Some(kind), "ended")),
        (AttemptOutcome::Sent, None, None) => Some((Some(NotifyKind::PowerActionSent), "sent")),
        (AttemptOutcome::Pending | AttemptOutcome::Sent, _, None) => None,
        // Shadow decisions and VMs left alone are in the history, not in anyone's inbox.
        (_, _, None) => Some((None, "ended")),
    }
}

async fn on_change(
    conn: &mut Conn,
    ctx: &Context,
    pairs: &mut Pairs,
    batch: &mut NotifierCommit,
    change: &ChangeRow,
    unreachable: &[NodeName],
    cfg: &crate::config::NotifyConfig,
) -> Result<(), DbError> {
    let Some(kind) = notify::from_status_change(change.from, change.to) else {
        return Ok(());
    };
    let vm = change.vm_id;
    let message = Message::about_vm(
        kind,
        AboutVm {
            id: vm,
            hostname: change.hostname.clone(),
            node: change.node.clone(),
            status: change.to,
        },
        &change.reason,
        change.at_ms,
    );
    let window = ctx.window(vm, change.node.as_ref());
    for rule in ctx
        .rules
        .iter()
        .filter(|r| r.wants(kind, Some(ctx.tags(vm))))
    {
        if let Some(needed) = notify::requires(kind) {
            let newest = pairs.newest(conn, rule.id, vm, kind).await?;
            // A warning still waiting out its minimum was not told: neither is its end
            // (the deliverer drops the waiting one, the VM having left the warning).
            let told_yet = |state| match kind {
                NotifyKind::WarningLeft => state == DeliveryState::Sent,
                _ => told(state),
            };
            if !matches!(newest, Some((k, s)) if k == needed && told_yet(s)) {
                continue;
            }
        }
        let held = if let Some(window) = &window {
            Some((DeliveryState::Dropped, window.clone()))
        } else if kind == NotifyKind::VmDown
            && rule.tag.is_none()
            && change
                .node
                .as_ref()
                .is_some_and(|n| unreachable.contains(n))
        {
            Some((DeliveryState::Grouped, "told as its node".to_owned()))
        } else {
            None
        };
        let state = held.as_ref().map_or(DeliveryState::Pending, |(s, _)| *s);
        // A warning waits its minimum; the deliverer drops it if the VM left it meanwhile.
        let due = if kind == NotifyKind::WarningEntered {
            change.at_ms.saturating_add(cfg.warning_min_ms)
        } else {
            ctx.now_ms
        };
        pairs.record(rule.id, vm, kind, state);
        batch
            .messages
            .push(queued(rule, Some(vm), &message, due, held));
    }
    Ok(())
}

fn on_event(
    ctx: &Context,
    batch: &mut NotifierCommit,
    event: &EventRow,
    briefs: &HashMap<VmId, VmBrief>,
) {
    let Some(kind) = notify::from_event(event.kind) else {
        return;
    };
    let (message, tags, window) = match event.vm_id.and_then(|id| Some((id, briefs.get(&id)?))) {
        Some((id, brief)) => (
            Message::about_vm(kind, about(id, brief), &event.message, event.at_ms),
            Some(ctx.tags(id)),
            ctx.window(id, brief.node.as_ref()),
        ),
        None => (
            Message::fleet(kind, &event.message, event.at_ms),
            None,
            None,
        ),
    };
    // A refused identity claim is a security alert: planned work does not silence it.
    let window = window.filter(|_| kind != NotifyKind::LinkClaimRefused);
    for rule in ctx.rules.iter().filter(|r| r.wants(kind, tags)) {
        let held = window.clone().map(|w| (DeliveryState::Dropped, w));
        batch
            .messages
            .push(queued(rule, event.vm_id, &message, ctx.now_ms, held));
    }
}

/// Reminders for VMs still down (each rule at its own interval), and the down owed for a
/// VM whose down a maintenance window hid and that is still down after it.
async fn remind(
    conn: &mut Conn,
    ctx: &Context,
    batch: &mut NotifierCommit,
    now_ms: i64,
) -> Result<(), DbError> {
    let pair = [
        NotifyKind::VmDown,
        NotifyKind::StillDown,
        NotifyKind::VmRecovered,
    ];
    for rule in &ctx.rules {
        let heads = store::pair_heads(conn, rule.id, &pair, now_ms).await?;
        let candidates: Vec<VmId> = heads
            .iter()
            .filter(|(_, kind, ..)| *kind != NotifyKind::VmRecovered)
            .map(|(vm, ..)| *vm)
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let briefs = store::vm_briefs(conn, &candidates).await?;
        let tags = store::tags_of(conn, Some(&candidates)).await?;
        for (vm, kind, state, at_ms) in heads {
            let Some(brief) = briefs.get(&vm).filter(|b| b.status == VmStatus::Down) else {
                continue;
            };
            let vm_tags = tags.get(&vm).map_or(&[][..], Vec::as_slice);
            let covered = Covered {
                id: vm,
                tags: vm_tags,
                node: brief.node.as_ref(),
            };
            if maintenance::covering(&ctx.windows, &covered, now_ms).is_some()
                || !rule.wants(NotifyKind::VmDown, Some(vm_tags))
            {
                continue;
            }
            let owed = kind == NotifyKind::VmDown && state == DeliveryState::Dropped;
            let reminder_due = told(state)
                && rule
                    .repeat_ms
                    .is_some_and(|every| now_ms.saturating_sub(at_ms) >= every);
            let (kind, detail) = if owed {
                (
                    NotifyKind::VmDown,
                    "still down after the maintenance window ended".to_owned(),
                )
            } else if reminder_due {
                let minutes = now_ms.saturating_sub(brief.status_since_ms) / 60_000;
                (NotifyKind::StillDown, format!("down for {minutes} min"))
            } else {
                continue;
            };
            let message = Message::about_vm(kind, about(vm, brief), &detail, now_ms);
            batch
                .messages
                .push(queued(rule, Some(vm), &message, now_ms, None));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn power_actions_are_told_once_sent_and_once_ended() {
        use AttemptOutcome as O;
        let table = [
            (O::Pending, None, None),
            (
                O::Sent,
                None,
                Some((Some(NotifyKind::PowerActionSent), "sent")),
            ),
            (O::Sent, Some("sent"), None),
            (
                O::Ok,
                None,
                Some((Some(NotifyKind::PowerActionSucceeded), "ended")),
            ),
            (
                O::Ok,
                Some("sent"),
                Some((Some(NotifyKind::PowerActionSucceeded), "ended")),
            ),
            (
                O::Failed,
                Some("sent"),
                Some((Some(NotifyKind::PowerActionFailed), "ended")),
            ),
            (
                O::Interrupted,
                None,
                Some((Some(NotifyKind::PowerActionFailed), "ended")),
            ),
            (O::WouldReset, None, Some((None, "ended"))),
            (O::LeftAlone, None, Some((None, "ended"))),
        ];
        for (outcome, notice, expected) in table {
            assert_eq!(
                attempt_notice(outcome, notice),
                expected,
                "{outcome} {notice:?}"
            );
        }
    }
}
