//! Notifications, maintenance windows and tags over the API: channels and routing rules
//! (admins), the message log with its dead letters, windows and snoozes, and VM tags
//! (operators).

use super::error::ApiError;
use super::extract::{
    Actor, Admin, IdPath, JsonBody, Operator, QueryParams, Viewer, VmPath, label,
};
use crate::db::notify::{
    self as store, ChannelView, NewChannel, NotificationView, RuleView, WindowView,
};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use domain::maintenance::{Recurrence, Scope, When, Window, check_when};
use domain::notify::{MAX_REPEAT_MS, MIN_REPEAT_MS, Message, Rule};
use domain::{ChannelKind, DeliveryState, NotifyKind, Tag, UserRole, VmId, WindowScope};
use serde::{Deserialize, Serialize};

/// Longest snooze: a week.
const MAX_SNOOZE_HOURS: i64 = 7 * 24;
/// Most tags on one VM.
const MAX_TAGS: usize = 32;

// ---- channels ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewChannelBody {
    pub name: String,
    pub kind: ChannelKind,
    /// A URL (webhook, ntfy topic, Gotify server, Slack or Discord webhook) or, for email,
    /// the recipient's address.
    pub target: String,
    /// Webhook: the HMAC key; ntfy: an access token; Gotify: the application token.
    pub secret: Option<String>,
}

/// Where a message may be sent: HTTPS, or plain HTTP to this machine only (a secret or the
/// fleet's names must not cross the network in clear).
fn check_url(raw: &str) -> Result<reqwest::Url, ApiError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| ApiError::field("target", e))?;
    let loopback = matches!(
        url.host(),
        Some(url::Host::Domain("localhost"))
            | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
            | Some(url::Host::Ipv6(std::net::Ipv6Addr::LOCALHOST))
    );
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(ApiError::field(
                "target",
                "must be https (plain http only to this machine)",
            ));
        }
        _ => return Err(ApiError::field("target", "must be an https URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::field(
            "target",
            "must not carry a password; put tokens in secret",
        ));
    }
    Ok(url)
}

/// A URL shown as typed must not hold a token: a query string (`?token=`, `?auth=`) would
/// be drawn back in every channel list.
fn check_shown_url(raw: &str) -> Result<reqwest::Url, ApiError> {
    let url = check_url(raw)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ApiError::field(
            "target",
            "must not carry a query string; put tokens in secret",
        ));
    }
    Ok(url)
}

#[utoipa::path(
    post,
    path = "/api/notify/channels",
    tag = "notify",
    request_body = NewChannelBody,
    responses((status = 201, description = "Created", body = ChannelView))
)]
pub async fn create_channel(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(body): JsonBody<NewChannelBody>,
) -> Result<(StatusCode, Json<ChannelView>), ApiError> {
    let view = add_channel(&state, &actor, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Both doors of `POST /api/notify/channels`: the API and the alerts page.
pub async fn add_channel(
    state: &AppState,
    actor: &Actor,
    body: NewChannelBody,
) -> Result<ChannelView, ApiError> {
    let name = label(&body.name).map_err(|e| ApiError::field("name", e))?;
    let secret = body
        .secret
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if secret.is_some_and(|s| s.len() > 1_000) {
        return Err(ApiError::field("secret", "at most 1,000 characters"));
    }
    // Slack's and Discord's webhook URLs are their own secret: kept as the secret, shown
    // by their host only.
    let (target, secret) = match body.kind {
        ChannelKind::Email => {
            body.target
                .trim()
                .parse::<lettre::Address>()
                .map_err(|e| ApiError::field("target", format!("not an email address ({e})")))?;
            (body.target.trim().to_owned(), None)
        }
        ChannelKind::Slack | ChannelKind::Discord => {
            let url = check_url(&body.target)?;
            let shown = format!("{}://{}/…", url.scheme(), url.host_str().unwrap_or(""));
            (shown, Some(url.to_string()))
        }
        ChannelKind::Webhook | ChannelKind::Ntfy | ChannelKind::Gotify => {
            let url = check_shown_url(&body.target)?;
            (url.to_string(), secret.map(str::to_owned))
        }
    };
    let (mut conn, _turn) = state.db.write_conn().await?;
    let new = NewChannel {
        name,
        kind: body.kind,
        target: &target,
        secret: secret.as_deref(),
    };
    let id = store::create_channel(&mut conn, &new, crate::now_ms())
        .await?
        .ok_or_else(|| ApiError::Conflict("a channel with this name exists".into()))?;
    let row = store::channel(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    actor
        .audit(
            state,
            "notify.channel.create",
            Some(name),
            Some(body.kind.as_str()),
        )
        .await;
    Ok(row.view())
}

#[utoipa::path(
    get,
    path = "/api/notify/channels",
    tag = "notify",
    responses((status = 200, description = "Every channel (never a secret)", body = [ChannelView]))
)]
pub async fn list_channels(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<ChannelView>>, ApiError> {
    let mut conn = state.db.conn().await?;
    let rows = store::channels(&mut conn).await?;
    Ok(Json(rows.iter().map(store::ChannelRow::view).collect()))
}

#[utoipa::path(
    delete,
    path = "/api/notify/channels/{id}",
    tag = "notify",
    params(("id" = i64, Path, description = "The channel's id", minimum = 1)),
    responses((status = 204, description = "Deleted with its rules"))
)]
pub async fn delete_channel(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    remove_channel(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/notify/channels/:id`.
pub async fn remove_channel(state: &AppState, actor: &Actor, id: i64) -> Result<(), ApiError> {
    let (mut conn, _turn) = state.db.write_conn().await?;
    if !store::delete_channel(&mut conn, id).await? {
        return Err(ApiError::NotFound);
    }
    actor
        .audit(state, "notify.channel.delete", Some(&id.to_string()), None)
        .await;
    Ok(())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TestResult {
    pub delivered: bool,
    #[schema(required)]
    pub error: Option<String>,
}

/// Sends a test message to the channel now and says how it went.
#[utoipa::path(
    post,
    path = "/api/notify/channels/{id}/test",
    tag = "notify",
    params(("id" = i64, Path, description = "The channel's id", minimum = 1)),
    responses((status = 200, description = "Whether the test message was delivered", body = TestResult))
)]
pub async fn test_channel(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<Json<TestResult>, ApiError> {
    Ok(Json(send_test(&state, &actor, id).await?))
}

/// Both doors of `POST /api/notify/channels/:id/test`.
pub async fn send_test(state: &AppState, actor: &Actor, id: i64) -> Result<TestResult, ApiError> {
    let channel = {
        let mut conn = state.db.conn().await?;
        store::channel(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound)?
    };
    let message = Message::fleet(
        NotifyKind::Test,
        &format!(
            "Sent by {} to check the channel {:?}.",
            actor.who.name, channel.name
        ),
        crate::now_ms(),
    );
    let result = state.deliverer.send(&channel, &message, 0).await;
    state.health.record_notification(result.is_ok());
    actor
        .audit(
            state,
            "notify.channel.test",
            Some(&channel.name),
            result.as_ref().err().map(String::as_str),
        )
        .await;
    Ok(TestResult {
        delivered: result.is_ok(),
        error: result.err(),
    })
}

// ---- rules ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRuleBody {
    pub channel_id: i64,
    /// Kinds to send; empty or absent: every kind.
    #[serde(default)]
    pub kinds: Vec<NotifyKind>,
    /// Only VMs with this tag.
    pub tag: Option<Tag>,
    /// Remind while a VM stays down, this often (5 to 10,080 minutes).
    #[schema(minimum = 5, maximum = 10_080)]
    pub repeat_minutes: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/api/notify/rules",
    tag = "notify",
    request_body = NewRuleBody,
    responses((status = 201, description = "Created", body = RuleView))
)]
pub async fn create_rule(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(body): JsonBody<NewRuleBody>,
) -> Result<(StatusCode, Json<RuleView>), ApiError> {
    let rule = add_rule(&state, &actor, body).await?;
    Ok((StatusCode::CREATED, Json(rule)))
}

/// Both doors of `POST /api/notify/rules`.
pub async fn add_rule(
    state: &AppState,
    actor: &Actor,
    body: NewRuleBody,
) -> Result<RuleView, ApiError> {
    if body.kinds.contains(&NotifyKind::Test) {
        return Err(ApiError::field(
            "kinds",
            "test messages are sent by the test button, not routed",
        ));
    }
    let repeat_ms = body
        .repeat_minutes
        .map(|m| m.saturating_mul(60_000))
        .map(|ms| {
            (MIN_REPEAT_MS..=MAX_REPEAT_MS)
                .contains(&ms)
                .then_some(ms)
                .ok_or_else(|| ApiError::field("repeat_minutes", "must be 5 to 10080"))
        })
        .transpose()?;
    let mut kinds = body.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let rule = Rule {
        id: 0,
        channel_id: body.channel_id,
        kinds,
        tag: body.tag.clone(),
        repeat_ms,
    };
    let (mut conn, _turn) = state.db.write_conn().await?;
    let id = store::create_rule(&mut conn, &rule, crate::now_ms())
        .await?
        .ok_or_else(|| ApiError::field("channel_id", "no such channel"))?;
    let created = store::rules(&mut conn)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or(ApiError::NotFound)?;
    actor
        .audit(state, "notify.rule.create", Some(&id.to_string()), None)
        .await;
    Ok(created)
}

#[utoipa::path(
    get,
    path = "/api/notify/rules",
    tag = "notify",
    responses((status = 200, description = "Every routing rule", body = [RuleView]))
)]
pub async fn list_rules(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<RuleView>>, ApiError> {
    let mut conn = state.db.conn().await?;
    Ok(Json(store::rules(&mut conn).await?))
}

#[utoipa::path(
    delete,
    path = "/api/notify/rules/{id}",
    tag = "notify",
    params(("id" = i64, Path, description = "The rule's id", minimum = 1)),
    responses((status = 204, description = "Deleted"))
)]
pub async fn delete_rule(
    State(state): State<AppState>,
    Admin(actor): Admin,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    remove_rule(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/notify/rules/:id`.
pub async fn remove_rule(state: &AppState, actor: &Actor, id: i64) -> Result<(), ApiError> {
    let (mut conn, _turn) = state.db.write_conn().await?;
    if !store::delete_rule(&mut conn, id).await? {
        return Err(ApiError::NotFound);
    }
    actor
        .audit(state, "notify.rule.delete", Some(&id.to_string()), None)
        .await;
    Ok(())
}

// ---- the message log ----

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    state: Option<DeliveryState>,
    /// Messages on one page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The newest messages (`?state=dead` for the dead letters), newest first.
#[utoipa::path(
    get,
    operation_id = "notification_messages",
    path = "/api/notify/messages",
    tag = "notify",
    params(MessagesQuery),
    responses((status = 200, description = "Messages, newest first", body = [NotificationView]))
)]
pub async fn messages(
    State(state): State<AppState>,
    _admin: Admin,
    QueryParams(q): QueryParams<MessagesQuery>,
) -> Result<Json<Vec<NotificationView>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 1000"));
    }
    let mut conn = state.db.conn().await?;
    Ok(Json(store::recent(&mut conn, q.state, limit).await?))
}

// ---- maintenance windows ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWindowBody {
    pub name: String,
    pub scope: WindowScope,
    /// The VM id, tag or node name the scope names (none for `all`).
    pub value: Option<String>,
    /// A one-off window: both times (epoch ms).
    pub starts_ms: Option<i64>,
    pub ends_ms: Option<i64>,
    /// A recurring one: five cron fields in UTC ("0 2 * * 6": Saturdays 02:00) and how long.
    pub cron: Option<String>,
    pub duration_minutes: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/api/maintenance",
    tag = "notify",
    request_body = NewWindowBody,
    responses((status = 201, description = "Created", body = WindowView))
)]
pub async fn create_window(
    State(state): State<AppState>,
    Operator(actor): Operator,
    JsonBody(body): JsonBody<NewWindowBody>,
) -> Result<(StatusCode, Json<WindowView>), ApiError> {
    let view = add_window(&state, &actor, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Both doors of `POST /api/maintenance`: the API and the alerts page.
pub async fn add_window(
    state: &AppState,
    actor: &Actor,
    body: NewWindowBody,
) -> Result<WindowView, ApiError> {
    let name = label(&body.name).map_err(|e| ApiError::field("name", e))?;
    let scope =
        Scope::parse(body.scope, body.value.as_deref()).map_err(|e| ApiError::field("value", e))?;
    let when = match (
        body.starts_ms,
        body.ends_ms,
        &body.cron,
        body.duration_minutes,
    ) {
        (Some(starts_ms), Some(ends_ms), None, None) => When::Once { starts_ms, ends_ms },
        (None, None, Some(cron), Some(minutes)) => When::Every {
            recurrence: Box::new(
                cron.parse::<Recurrence>()
                    .map_err(|e| ApiError::field("cron", e))?,
            ),
            duration_ms: minutes.saturating_mul(60_000),
        },
        _ => {
            return Err(ApiError::field(
                "starts_ms",
                "give starts_ms and ends_ms (one-off), or cron and duration_minutes (recurring)",
            ));
        }
    };
    let field = match when {
        When::Once { .. } => "ends_ms",
        When::Every { .. } => "duration_minutes",
    };
    check_when(&when, crate::now_ms()).map_err(|e| ApiError::field(field, e))?;
    // A window over the whole fleet or a node, or one that comes back every week, is in
    // effect the auto-reset switch, which is an admin's: an operator plans one VM or tag
    // at a time.
    let wide = matches!(scope, Scope::All | Scope::Node(_)) || matches!(when, When::Every { .. });
    if wide && actor.who.role < UserRole::Admin {
        return Err(ApiError::Forbidden(
            "a window over all VMs, a node, or a recurring one needs the admin role".into(),
        ));
    }
    let detail = format!(
        "scope {} {}, {}",
        scope.kind(),
        scope.value().unwrap_or_default(),
        match &when {
            When::Once { starts_ms, ends_ms } =>
                format!("from {starts_ms} to {ends_ms} (epoch ms)"),
            When::Every {
                recurrence,
                duration_ms,
            } => {
                format!(
                    "cron {:?} for {} min",
                    recurrence.as_str(),
                    duration_ms / 60_000
                )
            }
        }
    );
    let window = Window {
        name: name.to_owned(),
        scope,
        when,
    };
    let view = insert_window(state, &window, &actor.who.name).await?;
    actor
        .audit(state, "maintenance.create", Some(name), Some(&detail))
        .await;
    Ok(view)
}

async fn insert_window(
    state: &AppState,
    window: &Window,
    by: &str,
) -> Result<WindowView, ApiError> {
    let (mut conn, _turn) = state.db.write_conn().await?;
    let id = store::create_window(&mut conn, window, by, crate::now_ms()).await?;
    store::window(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)
}

#[utoipa::path(
    get,
    path = "/api/maintenance",
    tag = "notify",
    responses((status = 200, description = "Every maintenance window", body = [WindowView]))
)]
pub async fn list_windows(
    State(state): State<AppState>,
    _viewer: Viewer,
) -> Result<Json<Vec<WindowView>>, ApiError> {
    let mut conn = state.db.conn().await?;
    Ok(Json(store::windows(&mut conn).await?))
}

#[utoipa::path(
    delete,
    path = "/api/maintenance/{id}",
    tag = "notify",
    params(("id" = i64, Path, description = "The window's id", minimum = 1)),
    responses((status = 204, description = "Deleted"))
)]
pub async fn delete_window(
    State(state): State<AppState>,
    Operator(actor): Operator,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    remove_window(&state, &actor, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both doors of `DELETE /api/maintenance/:id`. Ending a window an operator could not
/// have planned (all VMs, a node, recurring) is an admin's too: it turns resets back on.
pub async fn remove_window(state: &AppState, actor: &Actor, id: i64) -> Result<(), ApiError> {
    let (mut conn, _turn) = state.db.write_conn().await?;
    let window = store::window(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let wide =
        matches!(window.scope, WindowScope::All | WindowScope::Node) || window.recurrence.is_some();
    if wide && actor.who.role < UserRole::Admin {
        return Err(ApiError::Forbidden(
            "a window over all VMs, a node, or a recurring one is ended by an admin".into(),
        ));
    }
    if !store::delete_window(&mut conn, id).await? {
        return Err(ApiError::NotFound);
    }
    actor
        .audit(state, "maintenance.delete", Some(&id.to_string()), None)
        .await;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnoozeBody {
    #[schema(minimum = 1, maximum = 168)]
    pub hours: i64,
}

/// Silences one VM for some hours from now: a maintenance window of that VM.
#[utoipa::path(
    post,
    path = "/api/vms/{id}/snooze",
    tag = "notify",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    request_body = SnoozeBody,
    responses((status = 201, description = "A maintenance window over the VM from now", body = WindowView))
)]
pub async fn snooze(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(vm): VmPath,
    JsonBody(body): JsonBody<SnoozeBody>,
) -> Result<(StatusCode, Json<WindowView>), ApiError> {
    let view = snooze_vm(&state, &actor, vm, body.hours).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Both doors of `POST /api/vms/:id/snooze`.
pub async fn snooze_vm(
    state: &AppState,
    actor: &Actor,
    vm: VmId,
    hours: i64,
) -> Result<WindowView, ApiError> {
    if !(1..=MAX_SNOOZE_HOURS).contains(&hours) {
        return Err(ApiError::field("hours", "must be 1 to 168"));
    }
    {
        let mut conn = state.db.conn().await?;
        if crate::db::store::get_vm(&mut conn, vm).await?.is_none() {
            return Err(ApiError::NotFound);
        }
    }
    let now = crate::now_ms();
    let window = Window {
        name: format!("snooze of VM {vm}"),
        scope: Scope::Vm(vm),
        when: When::Once {
            starts_ms: now,
            ends_ms: now.saturating_add(hours.saturating_mul(3_600_000)),
        },
    };
    let view = insert_window(state, &window, &actor.who.name).await?;
    actor
        .audit(
            state,
            "vm.snooze",
            Some(&vm.to_string()),
            Some(&format!("{} h", hours)),
        )
        .await;
    Ok(view)
}

// ---- tags ----

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    pub tags: Vec<Tag>,
}

#[utoipa::path(
    get,
    path = "/api/vms/{id}/tags",
    tag = "notify",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "The VM's tags, by who set them", body = VmTags))
)]
pub async fn get_tags(
    State(state): State<AppState>,
    _viewer: Viewer,
    VmPath(vm): VmPath,
) -> Result<Json<VmTags>, ApiError> {
    let mut conn = state.db.conn().await?;
    if crate::db::store::get_vm(&mut conn, vm).await?.is_none() {
        return Err(ApiError::NotFound);
    }
    let (tags, proxmox_tags) = store::tags_by_source(&mut conn, &[vm])
        .await?
        .remove(&vm)
        .unwrap_or_default();
    Ok(Json(VmTags { tags, proxmox_tags }))
}

/// A VM's tags: the operators' (what `PUT` replaces) and those read from its guest in
/// Proxmox (`PROXMOX_IMPORT_TAGS`; changed there, not here). Rules, windows and the fleet's
/// `tag:` search use both.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VmTags {
    pub tags: Vec<Tag>,
    pub proxmox_tags: Vec<Tag>,
}

/// Replaces a VM's tags.
#[utoipa::path(
    put,
    path = "/api/vms/{id}/tags",
    tag = "notify",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    request_body = TagsBody,
    responses((status = 200, description = "The VM's tags as now set", body = TagsBody))
)]
pub async fn put_tags(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(vm): VmPath,
    JsonBody(body): JsonBody<TagsBody>,
) -> Result<Json<TagsBody>, ApiError> {
    Ok(Json(TagsBody {
        tags: set_tags(&state, &actor, vm, body.tags).await?,
    }))
}

/// Both doors of `PUT /api/vms/:id/tags`.
pub async fn set_tags(
    state: &AppState,
    actor: &Actor,
    vm: VmId,
    mut tags: Vec<Tag>,
) -> Result<Vec<Tag>, ApiError> {
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(ApiError::field("tags", format!("at most {MAX_TAGS}")));
    }
    let (mut conn, _turn) = state.db.write_conn().await?;
    if !store::set_tags(&mut conn, vm, &tags).await? {
        return Err(ApiError::NotFound);
    }
    let shown: Vec<&str> = tags.iter().map(Tag::as_str).collect();
    actor
        .audit(
            state,
            "vm.tags",
            Some(&vm.to_string()),
            Some(&shown.join(",")),
        )
        .await;
    Ok(tags)
}
