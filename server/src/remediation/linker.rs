//! Keeps each VM's Proxmox link current (see `domain::link`) and follows migrations.

use super::Ctx;
use crate::cache;
use crate::db::incidents;
use crate::db::notify as notify_store;
use crate::db::store::{self, VmRow};
use domain::link::{self, ClusterGuest, LinkSubject};
use domain::notify::{Connection, PROXMOX_FAILURES_TOLD};
use domain::policy::GuestState;
use domain::{EventKind, GuestKind, GuestRef, LinkSource, Tag, VmId, Vmid};
use proxmox::{ProxmoxApi, PveError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Shortest pause between two refreshes brought forward by new VMs.
const NEWCOMER_REFRESH_GAP_MS: i64 = 1_000;
/// VMs read and resolved at a time by a refresh.
const REFRESH_PAGE: i64 = 2_000;

/// A guest's SMBIOS uuid as read, with the name it had then: a VMID that now names a
/// guest of another name was reused by a new guest, whose uuid must be read afresh.
#[derive(Clone)]
struct CachedUuid {
    name: Option<String>,
    uuid: Option<String>,
}

#[derive(Default)]
pub struct Linker {
    /// SMBIOS uuid per VMID (`None`: the guest has none), for zero-configuration linking.
    uuids: Mutex<HashMap<Vmid, CachedUuid>>,
    last_refresh_ms: AtomicI64,
    /// The connection as the refreshes found it: told once when it keeps failing, and
    /// again when it is back.
    connection: Mutex<Connection>,
    /// Whether the tags read from Proxmox were removed since the import is off.
    imported_tags_cleared: AtomicBool,
}

fn subject(row: &VmRow) -> LinkSubject<'_> {
    LinkSubject {
        hostname: &row.hostname,
        machine_id: row.machine_id.as_deref(),
        reported_vmid: row.reported_vmid.and_then(|v| Vmid::try_from(v).ok()),
        current: row.guest().zip(row.link_source()),
        // Stored as a manual source without a guest (see the link endpoint).
        unlinked_by_operator: row.guest().is_none()
            && row.link_source() == Some(LinkSource::Manual),
    }
}

/// Gives each VM of `rows` whose link is verified its guest's Proxmox tags, writing only
/// those that changed (a refresh of a large fleet mostly finds none).
async fn import_tags(ctx: &Ctx, rows: &[VmRow], guests: &[ClusterGuest]) -> anyhow::Result<()> {
    // By VMID and type: they are unique in a cluster and survive a migration, which the
    // rows (read before this refresh's relinking) may not show yet.
    let by_guest: HashMap<(Vmid, GuestKind), &ClusterGuest> = guests
        .iter()
        .map(|g| ((g.guest.vmid, g.guest.kind), g))
        .collect();
    let ids: Vec<VmId> = rows.iter().map(VmRow::vm_id).collect();
    let current = {
        let mut conn = ctx.db.conn().await?;
        notify_store::tags_by_source(&mut conn, &ids).await?
    };
    let mut changed: Vec<(VmId, Vec<Tag>)> = Vec::new();
    for row in rows {
        let wanted = match row.guest() {
            // A VM whose link is not verified is not known to be that guest: none of its
            // tags (it could otherwise borrow another guest's, and its windows).
            Some(guest) if row.link_verified => match by_guest.get(&(guest.vmid, guest.kind)) {
                Some(found) => found.tags.clone(),
                // Not in this listing (a node briefly missing): keep what it has.
                None => continue,
            },
            _ => Vec::new(),
        };
        let (operators, imported) = current.get(&row.vm_id()).cloned().unwrap_or_default();
        // A tag an operator also set is theirs: it is not imported again.
        let wanted: Vec<Tag> = wanted
            .into_iter()
            .filter(|t| !operators.contains(t))
            .collect();
        if wanted != imported {
            changed.push((row.vm_id(), wanted));
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    let (mut conn, _turn) = ctx.db.write_conn().await?;
    notify_store::replace_proxmox_tags(&mut conn, &changed).await?;
    tracing::debug!(vms = changed.len(), "Proxmox tags updated");
    Ok(())
}

impl Linker {
    /// Refreshes every link when the refresh interval has passed, or soon after a VM
    /// first reported, so a new VM's link (or proposal) shows within seconds.
    pub async fn refresh_if_due(&self, ctx: &Ctx, pve: &dyn ProxmoxApi, now_ms: i64) {
        let every = i64::try_from(ctx.timing.link_refresh.as_millis()).unwrap_or(i64::MAX);
        let last = self.last_refresh_ms.load(Ordering::Acquire);
        let since = now_ms.saturating_sub(last);
        if since < every {
            // At most one early refresh a second, however fast new VMs appear.
            if since < NEWCOMER_REFRESH_GAP_MS {
                return;
            }
            let newest = match ctx.db.conn().await {
                Ok(mut conn) => store::newest_first_seen(&mut conn).await,
                Err(err) => Err(err),
            };
            match newest {
                Ok(Some(first_seen)) if first_seen >= last => {}
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "could not look for new VMs to link");
                    return;
                }
            }
        }
        self.last_refresh_ms.store(now_ms, Ordering::Release);
        match self.refresh(ctx, pve).await {
            Ok(()) => self.connection_was(ctx, true, "", now_ms).await,
            Err(err) => {
                tracing::warn!(error = %err, "could not refresh Proxmox links");
                // Only Proxmox's own failures say the connection is failing; our storage
                // failing is told by the health endpoint.
                if let Some(pve_err) = err.downcast_ref::<PveError>() {
                    let reason = pve_err.to_string();
                    self.connection_was(ctx, false, &reason, now_ms).await;
                }
            }
        }
    }

    /// Records the connection's failure after several reads in a row, and its return.
    async fn connection_was(&self, ctx: &Ctx, succeeded: bool, reason: &str, now_ms: i64) {
        let event = {
            let Ok(mut connection) = self.connection.lock() else {
                return;
            };
            let (next, event) = connection.after(succeeded);
            *connection = next;
            event
        };
        let Some(kind) = event else { return };
        let message = match kind {
            EventKind::ProxmoxUnreachable => format!(
                "{PROXMOX_FAILURES_TOLD} reads of the cluster in a row failed; no power action \
                 can be sent until it answers. Last error: {reason}"
            ),
            _ => "the cluster answers again".to_owned(),
        };
        tracing::warn!(event = %kind, %message, "Proxmox connection");
        let written = match ctx.db.write_conn().await {
            Ok((mut conn, _turn)) => {
                incidents::insert_event(&mut conn, kind, None, &message, now_ms).await
            }
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "could not record the Proxmox connection's state");
        }
    }

    /// Resolves every VM's link against the cluster's guests, a page of VMs at a time.
    async fn refresh(&self, ctx: &Ctx, pve: &dyn ProxmoxApi) -> anyhow::Result<()> {
        let guests = pve.cluster_guests().await?;
        if !ctx.import_tags && !self.imported_tags_cleared.load(Ordering::Acquire) {
            // Imported tags no longer kept current would go on scoping windows and routing.
            let (mut conn, _turn) = ctx.db.write_conn().await?;
            let removed = notify_store::clear_proxmox_tags(&mut conn).await?;
            self.imported_tags_cleared.store(true, Ordering::Release);
            if removed > 0 {
                tracing::info!(
                    tags = removed,
                    "PROXMOX_IMPORT_TAGS is off: the tags read from Proxmox were removed"
                );
            }
        }
        let wanted = {
            let mut conn = ctx.db.conn().await?;
            store::any_uuid_linkable(&mut conn).await?
        };
        let uuids = self.known_uuids(pve, &guests, wanted).await;
        let mut after = 0;
        loop {
            let rows = {
                let mut conn = ctx.db.conn().await?;
                store::rows_after(&mut conn, after, REFRESH_PAGE).await?
            };
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.id;
            let changed = self.relink(ctx, &rows, &guests, &uuids).await?;
            cache::refresh(&ctx.db, &ctx.cache, &changed).await;
            if ctx.import_tags {
                import_tags(ctx, &rows, &guests).await?;
            }
        }
    }

    /// Stores the links of `rows` that the cluster's guests now resolve differently;
    /// returns the VMs whose link changed.
    async fn relink(
        &self,
        ctx: &Ctx,
        rows: &[VmRow],
        guests: &[ClusterGuest],
        uuids: &HashMap<Vmid, String>,
    ) -> anyhow::Result<Vec<VmId>> {
        let mut changed = Vec::new();
        let mut conn = ctx.db.conn().await?;
        for row in rows {
            let subject = subject(row);
            let found = link::resolve(&subject, guests, uuids);
            let verified = found
                .as_ref()
                .is_some_and(|(_, how)| link::verified(*how, ctx.links));
            if link::should_replace(subject.current.as_ref(), found.as_ref())
                || (found.is_some() && verified != row.link_verified)
            {
                let read = incidents::LinkAsRead {
                    guest: row.guest(),
                    source: row.link_source(),
                    verified: row.link_verified,
                };
                if incidents::replace_link(&mut conn, row.vm_id(), &read, found.as_ref(), verified)
                    .await?
                {
                    changed.push(row.vm_id());
                }
            }
        }
        Ok(changed)
    }

    /// SMBIOS uuids rarely change: each guest's config is read once, then kept while a
    /// guest of that VMID and name exists, so a large cluster costs one config call per
    /// new guest.
    async fn known_uuids(
        &self,
        pve: &dyn ProxmoxApi,
        guests: &[ClusterGuest],
        wanted: bool,
    ) -> HashMap<Vmid, String> {
        let mut uuids = self.uuids.lock().map(|u| u.clone()).unwrap_or_default();
        uuids.retain(|vmid, cached| {
            guests
                .iter()
                .any(|g| g.guest.vmid == *vmid && g.name == cached.name)
        });
        if wanted {
            let unknown: Vec<&ClusterGuest> = guests
                .iter()
                .filter(|g| {
                    g.guest.kind == GuestKind::Qemu
                        && !g.template
                        && !uuids.contains_key(&g.guest.vmid)
                })
                .collect();
            for g in unknown {
                match pve.smbios_uuid(&g.guest.node, g.guest.vmid).await {
                    Ok(uuid) => {
                        let name = g.name.clone();
                        uuids.insert(g.guest.vmid, CachedUuid { name, uuid });
                    }
                    Err(err) => {
                        tracing::debug!(vmid = %g.guest.vmid, error = %err, "no config for uuid matching");
                    }
                }
            }
        }
        if let Ok(mut cached) = self.uuids.lock() {
            cached.clone_from(&uuids);
        }
        uuids
            .into_iter()
            .filter_map(|(vmid, cached)| Some((vmid, cached.uuid?)))
            .collect()
    }

    /// `status/current`, re-resolving the node once if the VM migrated.
    pub async fn state_following_migration(
        &self,
        ctx: &Ctx,
        pve: &dyn ProxmoxApi,
        row: &VmRow,
        guest: GuestRef,
    ) -> Result<(GuestRef, GuestState), PveError> {
        match pve.guest_state(&guest).await {
            Ok(state) => Ok((guest, state)),
            Err(PveError::VmNotFound(_)) => {
                let moved = self.relocate(ctx, pve, row, &guest).await?;
                let state = pve.guest_state(&moved).await?;
                Ok((moved, state))
            }
            Err(err) => Err(err),
        }
    }

    /// Finds a guest's current node through the cluster list and stores the new link.
    pub async fn relocate(
        &self,
        ctx: &Ctx,
        pve: &dyn ProxmoxApi,
        row: &VmRow,
        guest: &GuestRef,
    ) -> Result<GuestRef, PveError> {
        let guests = pve.cluster_guests().await?;
        let found = link::relocate(guest, &guests).ok_or_else(|| {
            PveError::VmNotFound(format!("VM {} is no longer in the cluster", guest.vmid))
        })?;
        tracing::info!(vm_id = %row.id, from = %guest.node, to = %found.node, "VM migrated; link updated");
        let source = row.link_source().unwrap_or(LinkSource::Manual);
        match ctx.db.conn().await {
            Ok(mut conn) => {
                let stored = (found.clone(), source);
                let verified = row.link_verified;
                if let Err(err) =
                    incidents::set_link(&mut conn, row.vm_id(), Some(&stored), verified).await
                {
                    tracing::warn!(error = %err, "could not store the new link");
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not store the new link"),
        }
        Ok(found)
    }
}
