//! `/api/vms`: the fleet, one VM with its history, deleting it, and its per-VM settings.

use super::error::{ApiError, FieldError};
use super::extract::{Actor, Admin, JsonBody, Operator, QueryParams, Viewer, VmPath};
use crate::cache::refresh as refresh_cache;
use crate::db::{incidents, store};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use domain::view::{MetricHistory, ResetAttempt, StatusChange, VmView};
use domain::{GuestKind, GuestRef, LinkSource, NodeName, VmId, Vmid};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// VMs on one page; with it (or `after`) the answer is one page.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The last VM of the previous page, as its `next` link gives it: `HOSTNAME,ID`.
    after: Option<String>,
}

/// Most VMs one page holds.
const MAX_PAGE: i64 = 1000;
/// A page's size when only `after` is given.
const DEFAULT_PAGE: i64 = 500;

/// Every VM sorted by hostname; with `limit` (and then `after`), one page of them and, when
/// more follow, a `Link: <...>; rel="next"` header to the next page.
#[utoipa::path(
    get,
    operation_id = "list_vms",
    path = "/api/vms",
    tag = "vms",
    params(ListQuery),
    responses((status = 200, description = "VMs sorted by hostname; a Link header names the next page", body = [VmView]))
)]
pub async fn list(
    State(state): State<AppState>,
    _viewer: Viewer,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    if query.limit.is_none() && query.after.is_none() {
        return Ok(Json(super::fleet(&state).await?).into_response());
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field("limit", format!("from 1 to {MAX_PAGE}")));
    }
    let after = match &query.after {
        None => None,
        Some(cursor) => {
            let (hostname, id) = cursor
                .rsplit_once(',')
                .and_then(|(h, id)| Some((h, id.parse::<i64>().ok()?)))
                .ok_or_else(|| ApiError::field("after", "the next link's HOSTNAME,ID"))?;
            Some((hostname, id))
        }
    };
    let page = {
        let mut conn = state.db.conn().await?;
        store::vms_page(&mut conn, after, limit).await?
    };
    let next = (i64::try_from(page.len()).ok() == Some(limit))
        .then(|| page.last())
        .flatten()
        .map(|last| {
            let cursor = format!("{},{}", last.hostname, last.id);
            format!(
                "</api/vms?limit={limit}&after={}>; rel=\"next\"",
                urlencoding::encode(&cursor)
            )
        });
    let mut response = Json(page).into_response();
    if let Some(link) = next.and_then(|l| axum::http::HeaderValue::from_str(&l).ok()) {
        response
            .headers_mut()
            .insert(axum::http::header::LINK, link);
    }
    Ok(response)
}

/// One VM as the fleet shows it, plus its status changes.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VmDetail {
    #[serde(flatten)]
    vm: VmView,
    status_changes: Vec<StatusChange>,
}

#[utoipa::path(
    get,
    operation_id = "get_vm",
    path = "/api/vms/{id}",
    tag = "vms",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "The VM and its status changes", body = VmDetail))
)]
pub async fn get(
    State(state): State<AppState>,
    _viewer: Viewer,
    VmPath(id): VmPath,
) -> Result<Json<VmDetail>, ApiError> {
    let mut conn = state.db.conn().await?;
    let vm = store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let status_changes = store::status_changes_for(&mut conn, id).await?;
    Ok(Json(VmDetail { vm, status_changes }))
}

/// Forgets a VM and its whole history (a decommissioned host).
#[utoipa::path(
    delete,
    operation_id = "delete_vm",
    path = "/api/vms/{id}",
    tag = "vms",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 204, description = "Forgotten"))
)]
pub async fn delete(
    State(state): State<AppState>,
    Admin(actor): Admin,
    VmPath(id): VmPath,
) -> Result<StatusCode, ApiError> {
    let deleted = {
        let (mut conn, _turn) = state.db.write_conn().await?;
        store::delete_vm(&mut conn, id).await?
    };
    if !deleted {
        return Err(ApiError::NotFound);
    }
    state.cache.remove(id).await;
    tracing::info!(vm_id = %id, by = %actor.who.name, "VM deleted");
    actor
        .audit(&state, "delete_vm", Some(&format!("vm {id}")), None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Longest history one request may cover, and most points it may ask for.
const MAX_RANGE_MS: i64 = 400 * 86_400_000;
const MAX_POINTS: i64 = 2_000;
/// The times RFC 3339 can write (years 0000 to 9999); beyond them a bound is a mistake, and
/// keeping within them keeps the database's bucket arithmetic far from overflow.
const EARLIEST_MS: i64 = -62_167_219_200_000;
const LATEST_MS: i64 = 253_402_300_799_999;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Epoch milliseconds or an RFC 3339 time (default: a day before `to`).
    from: Option<String>,
    /// Epoch milliseconds or an RFC 3339 time (default: now).
    to: Option<String>,
    /// How many points (default 300).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 2000)]
    points: Option<String>,
}

/// Downsampled metrics between `from` and `to` (default: the last day), `points` buckets.
#[utoipa::path(
    get,
    operation_id = "vm_metrics",
    path = "/api/vms/{id}/metrics",
    tag = "vms",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1), MetricsQuery),
    responses((status = 200, description = "Downsampled metric history", body = MetricHistory))
)]
pub async fn metrics(
    State(state): State<AppState>,
    _viewer: Viewer,
    VmPath(id): VmPath,
    QueryParams(query): QueryParams<MetricsQuery>,
) -> Result<Json<MetricHistory>, ApiError> {
    let now = crate::now_ms();
    let to_ms = time_param(query.to.as_deref(), "to")?.unwrap_or(now);
    let from_ms =
        time_param(query.from.as_deref(), "from")?.unwrap_or(to_ms.saturating_sub(86_400_000));
    if from_ms >= to_ms {
        return Err(ApiError::field("from", "must be before to"));
    }
    // Checked: extreme bounds must be refused, not wrap around in a release build.
    if to_ms
        .checked_sub(from_ms)
        .is_none_or(|span| span > MAX_RANGE_MS)
    {
        return Err(ApiError::field("from", "range longer than 400 days"));
    }
    let points = match query.points.as_deref() {
        None => 300,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=MAX_POINTS).contains(p))
            .ok_or_else(|| ApiError::field("points", "must be between 1 and 2000"))?,
    };
    let chart = crate::history::chart(&state, id, from_ms, to_ms, points).await?;
    Ok(Json(chart.ok_or(ApiError::NotFound)?))
}

/// Accepts epoch milliseconds or an RFC 3339 time, within years 0000 to 9999.
fn time_param(raw: Option<&str>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let ms = match raw.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
            .ok_or_else(|| ApiError::field(name, "must be epoch milliseconds or RFC 3339"))?,
    };
    if !(EARLIEST_MS..=LATEST_MS).contains(&ms) {
        return Err(ApiError::field(
            name,
            "must be between the years 0000 and 9999",
        ));
    }
    Ok(Some(ms))
}

#[utoipa::path(
    get,
    path = "/api/vms/{id}/reset-history",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    responses((status = 200, description = "Every power action on the VM, newest first", body = [ResetAttempt]))
)]
pub async fn reset_history(
    State(state): State<AppState>,
    _viewer: Viewer,
    VmPath(id): VmPath,
) -> Result<Json<Vec<ResetAttempt>>, ApiError> {
    let mut conn = state.db.conn().await?;
    store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(store::reset_history(&mut conn, id).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    pub node: Option<String>,
    pub vmid: Option<i64>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

/// Links a VM to a Proxmox guest by hand; `{"node": null, "vmid": null}` unlinks it.
#[utoipa::path(
    put,
    path = "/api/vms/{id}/proxmox",
    tag = "vms",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    request_body = LinkRequest,
    responses((status = 200, description = "The VM as now linked", body = VmView))
)]
pub async fn link(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
    JsonBody(request): JsonBody<LinkRequest>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(set_link(&state, &actor, id, request).await?))
}

/// Both doors of `PUT /api/vms/:id/proxmox`: the API and the VM's link page.
pub async fn set_link(
    state: &AppState,
    actor: &Actor,
    id: VmId,
    request: LinkRequest,
) -> Result<VmView, ApiError> {
    let link = match (request.node, request.vmid) {
        (None, None) => None,
        (Some(node), Some(vmid)) => Some((
            ApproveRequest::guest(node, vmid, request.kind.as_deref())?,
            LinkSource::Manual,
        )),
        _ => {
            return Err(ApiError::field(
                "node",
                "give node and vmid together, or both null to unlink",
            ));
        }
    };
    let mut conn = state.db.conn().await?;
    // Two approved links to one guest would let either VM's silence reset it: the other
    // one is unlinked first. Proposals elsewhere stay proposals (never acted on).
    if let Some((guest, _)) = &link {
        let holders: Vec<String> = incidents::other_claimants(&mut conn, guest, id)
            .await?
            .into_iter()
            .filter(|(_, verified)| *verified)
            .map(|(other, _)| format!("vm {other}"))
            .collect();
        if !holders.is_empty() {
            return Err(ApiError::Conflict(format!(
                "guest {} is already linked to {}; unlink it there first",
                guest.vmid,
                holders.join(", ")
            )));
        }
    }
    // An operator's link is verified: it is the approval. An unlink stays until relinked.
    let stored = match &link {
        Some(link) => incidents::set_link(&mut conn, id, Some(link), true).await?,
        None => incidents::unlink_by_operator(&mut conn, id).await?,
    };
    if !stored {
        return Err(ApiError::NotFound);
    }
    let detail = match &link {
        Some((guest, _)) => format!("linked to {} {} on {}", guest.kind, guest.vmid, guest.node),
        None => "unlinked".to_owned(),
    };
    let vm = store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    drop(conn);
    actor
        .audit(state, "link", Some(&format!("vm {id}")), Some(&detail))
        .await;
    refresh_cache(&state.db, &state.cache, &[id]).await;
    Ok(vm)
}

/// The guest an operator was shown as a VM's proposed link, and approves.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    node: String,
    vmid: i64,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

impl ApproveRequest {
    /// The guest named, each part checked.
    pub fn guest(node: String, vmid: i64, kind: Option<&str>) -> Result<GuestRef, ApiError> {
        Ok(GuestRef {
            node: NodeName::try_from(node).field("node")?,
            vmid: Vmid::try_from(vmid).field("vmid")?,
            kind: kind
                .unwrap_or("qemu")
                .parse::<GuestKind>()
                .ok()
                .ok_or_else(|| ApiError::field("type", "must be qemu or lxc"))?,
        })
    }
}

/// Approves the link a VM's agent proposed, naming the guest the operator saw: refused
/// (409) when the proposal has changed since or another VM claims the same guest.
#[utoipa::path(
    post,
    path = "/api/vms/{id}/proxmox/approve",
    tag = "vms",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    request_body = ApproveRequest,
    responses((status = 200, description = "The VM as now linked", body = VmView))
)]
pub async fn approve_link(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
    JsonBody(request): JsonBody<ApproveRequest>,
) -> Result<Json<VmView>, ApiError> {
    let guest = ApproveRequest::guest(request.node, request.vmid, request.kind.as_deref())?;
    crate::actions::approve_link(&state, &actor.who.name, &actor.from, id, &guest).await?;
    let mut conn = state.db.conn().await?;
    let vm = store::get_vm(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(vm))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoResetRequest {
    enabled: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AutoResetSet {
    vm_id: VmId,
    auto_reset: bool,
}

/// Turns automatic remediation on or off for one VM.
#[utoipa::path(
    put,
    path = "/api/vms/{id}/auto-reset",
    tag = "remediation",
    params(("id" = i64, Path, description = "The VM's id", minimum = 1)),
    request_body = AutoResetRequest,
    responses((status = 200, description = "Set", body = AutoResetSet))
)]
pub async fn set_auto_reset(
    State(state): State<AppState>,
    Operator(actor): Operator,
    VmPath(id): VmPath,
    JsonBody(request): JsonBody<AutoResetRequest>,
) -> Result<Json<AutoResetSet>, ApiError> {
    crate::actions::set_auto_reset(&state, &actor.who.name, &actor.from, id, request.enabled)
        .await?;
    Ok(Json(AutoResetSet {
        vm_id: id,
        auto_reset: request.enabled,
    }))
}
