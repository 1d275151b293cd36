//! The dashboard's back end: app's server-only `Backend` trait, served from the shared state.

use crate::accounts::{self, Principal, audit_quietly};
use crate::actions;
use crate::db::store;
use crate::remediation::ActionError;
use crate::state::AppState;
use app::backend::{Backend, BoxFuture, RequestInfo};
use app::error::AppError;
use app::model::{self, FleetQuery};
use domain::status::StatusCounts;
use domain::view::{FLEET_PAGE, FleetSnapshot, MetricHistory, SignedIn, VmPage, VmView};
use domain::{ChartRange, OperatorAction, PanelName, PowerAction, UserRole, VmId};
use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::sync::Arc;

/// Answers the dashboard's server functions from [`AppState`]; web.rs provides it as context.
pub struct ServerBackend {
    state: AppState,
}

/// The longest fleet page query taken (a filter, an order and a page number fit in far less).
const MAX_FLEET_QUERY_BYTES: usize = 2_048;
/// Newest status changes and reset-history rows a VM page shows.
const PAGE_ROWS: i64 = 200;
/// Points per chart: about one per two pixels of a wide chart.
const CHART_POINTS: i64 = 360;

impl ServerBackend {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// The page of `views` that `query` shows, with the counts of them all; `tagged`, when
/// the search names a tag (`tag:db`), holds the VMs carrying it.
fn fleet_snapshot(
    views: &[&VmView],
    query: &FleetQuery,
    tagged: Option<&HashSet<VmId>>,
) -> FleetSnapshot {
    let candidates = views
        .iter()
        .copied()
        .filter(|vm| tagged.is_none_or(|ids| ids.contains(&vm.id)));
    let matching = model::select(candidates, query);
    let offset = usize::try_from(query.page)
        .unwrap_or(usize::MAX)
        .saturating_mul(FLEET_PAGE)
        .min(matching.len());
    FleetSnapshot {
        counts: StatusCounts::from_statuses(views.iter().map(|v| v.status)),
        phases: model::phase_counts(views.iter().copied()),
        nodes: model::nodes(views.iter().copied()),
        matching: u64::try_from(matching.len()).unwrap_or(u64::MAX),
        offset: u64::try_from(offset).unwrap_or(u64::MAX),
        vms: matching
            .iter()
            .skip(offset)
            .take(FLEET_PAGE)
            .map(|vm| (*vm).clone())
            .collect(),
        ..FleetSnapshot::default()
    }
}

impl Backend for ServerBackend {
    fn fleet<'a>(
        &'a self,
        caller: &'a RequestInfo,
        query: &'a str,
    ) -> BoxFuture<'a, Result<FleetSnapshot, AppError>> {
        Box::pin(async move {
            signed_in(caller, UserRole::Viewer)?;
            if query.len() > MAX_FLEET_QUERY_BYTES {
                return Err(AppError::Refused("this filter is too long".into()));
            }
            let pairs: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            let query = FleetQuery::from_url(|k| pairs.get(k).cloned());
            // The page lower-cases the search before it reads `tag:`; so does this.
            let search = query.text.to_ascii_lowercase();
            let tagged = match model::tag_search(&search) {
                None => None,
                Some(raw) => {
                    // A search for a tag no VM can carry matches nothing.
                    let ids = match raw.to_owned().parse::<domain::Tag>() {
                        Ok(tag) => {
                            let mut conn = self
                                .state
                                .db
                                .conn()
                                .await
                                .map_err(|err| unavailable("fleet", caller, err))?;
                            crate::db::notify::tagged(&mut conn, &tag)
                                .await
                                .map_err(|err| unavailable("fleet", caller, err))?
                        }
                        Err(_) => Vec::new(),
                    };
                    Some(ids.into_iter().collect::<HashSet<VmId>>())
                }
            };
            // In process, the page is cut from the cache's shared views without copying the
            // fleet; filtering and sorting a large one runs off the async workers.
            let views = match self.state.cache.local_views() {
                Some(views) => views,
                None => crate::http::fleet(&self.state)
                    .await
                    .map_err(|err| unavailable("fleet", caller, err))?
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
            };
            let mut snapshot = tokio::task::spawn_blocking(move || {
                let views: Vec<&VmView> = views.iter().map(AsRef::as_ref).collect();
                fleet_snapshot(&views, &query, tagged.as_ref())
            })
            .await
            .map_err(|err| unavailable("fleet", caller, err))?;
            let now_ms = crate::now_ms();
            let remediation = self.state.engine.summary(now_ms);
            snapshot.now_ms = now_ms;
            snapshot.remediation = remediation;
            Ok(snapshot)
        })
    }

    fn me<'a>(&'a self, caller: &'a RequestInfo) -> BoxFuture<'a, Result<SignedIn, AppError>> {
        Box::pin(async move {
            let who = signed_in(caller, UserRole::Viewer)?;
            Ok(SignedIn {
                username: who.name.clone(),
                role: who.role,
            })
        })
    }

    fn panel<'a>(
        &'a self,
        caller: &'a RequestInfo,
        name: PanelName,
        query: &'a str,
    ) -> BoxFuture<'a, Result<String, AppError>> {
        Box::pin(crate::panels::show(&self.state, caller, name, query))
    }

    fn submit<'a>(
        &'a self,
        caller: &'a RequestInfo,
        name: PanelName,
        action: &'a str,
        form: &'a str,
    ) -> BoxFuture<'a, Result<String, AppError>> {
        Box::pin(crate::panels::submit(
            &self.state,
            caller,
            name,
            action,
            form,
        ))
    }

    fn vm_page<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
    ) -> BoxFuture<'a, Result<VmPage, AppError>> {
        Box::pin(async move {
            signed_in(caller, UserRole::Viewer)?;
            let page = async {
                let mut conn = self.state.db.conn().await?;
                let Some(view) = store::get_vm(&mut conn, vm).await? else {
                    return Ok(None);
                };
                let status_changes = store::recent_status_changes(&mut conn, vm, PAGE_ROWS).await?;
                let history = store::recent_resets(&mut conn, vm, PAGE_ROWS).await?;
                Ok::<_, crate::db::DbError>(Some(VmPage {
                    now_ms: crate::now_ms(),
                    vm: view,
                    status_changes,
                    history,
                }))
            };
            page.await
                .map_err(|err| unavailable("vm page", caller, err))?
                .ok_or(AppError::NotFound)
        })
    }

    fn metrics<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
        range: ChartRange,
    ) -> BoxFuture<'a, Result<MetricHistory, AppError>> {
        Box::pin(async move {
            signed_in(caller, UserRole::Viewer)?;
            let to_ms = crate::now_ms();
            let from_ms = to_ms - domain::history::span_ms(range);
            crate::history::chart(&self.state, vm, from_ms, to_ms, CHART_POINTS)
                .await
                .map_err(|err| unavailable("metrics", caller, err))?
                .ok_or(AppError::NotFound)
        })
    }

    fn act<'a>(
        &'a self,
        caller: &'a RequestInfo,
        vm: VmId,
        action: OperatorAction,
    ) -> BoxFuture<'a, Result<(), AppError>> {
        Box::pin(async move {
            let from = accounts::source(caller.extensions());
            let who = match signed_in(caller, UserRole::Operator) {
                Ok(who) => who,
                Err(err) => {
                    if let Some(who) = caller.extensions().get::<Principal>() {
                        audit_quietly(
                            &self.state,
                            &who.name,
                            action.as_str(),
                            Some(&format!("vm {vm}")),
                            &from,
                            "forbidden",
                            None,
                        )
                        .await;
                    }
                    return Err(err);
                }
            };
            let state = &self.state;
            let result = match action {
                OperatorAction::Reset => {
                    actions::power(state, &who.name, &from, vm, PowerAction::Reset)
                        .await
                        .map(|_| ())
                }
                OperatorAction::Shutdown => {
                    actions::power(state, &who.name, &from, vm, PowerAction::Shutdown)
                        .await
                        .map(|_| ())
                }
                OperatorAction::Hold => actions::hold(state, &who.name, &from, vm).await,
                OperatorAction::Acknowledge => {
                    actions::acknowledge(state, &who.name, &from, vm).await
                }
                OperatorAction::AutoResetOn => {
                    actions::set_auto_reset(state, &who.name, &from, vm, true).await
                }
                OperatorAction::AutoResetOff => {
                    actions::set_auto_reset(state, &who.name, &from, vm, false).await
                }
            };
            match result {
                Ok(()) => Ok(()),
                Err(ActionError::NotFound) => Err(AppError::NotFound),
                Err(ActionError::Db(err)) => Err(unavailable(action.as_str(), caller, err)),
                // What stopped it (not linked, in flight, Proxmox refused) is the operator's to read.
                Err(other) => Err(AppError::Refused(other.to_string())),
            }
        })
    }
}

/// The signed-in caller (the session check put it on the request), holding `role`.
fn signed_in(caller: &RequestInfo, role: UserRole) -> Result<&Principal, AppError> {
    let who = caller
        .extensions()
        .get::<Principal>()
        .ok_or(AppError::Unauthorized)?;
    if who.role < role {
        return Err(AppError::Forbidden);
    }
    Ok(who)
}

/// Logs an internal failure with what was asked and by which request; the browser only learns
/// that the service is unavailable.
fn unavailable(what: &'static str, caller: &RequestInfo, err: impl Display) -> AppError {
    tracing::warn!(
        error = %err,
        call = what,
        method = %caller.method(),
        path = caller.uri().path(),
        "dashboard request failed"
    );
    AppError::Unavailable
}
