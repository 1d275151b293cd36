//! Linking monitored VMs to Proxmox guests: by reported VMID, by SMBIOS uuid, by unique name.

use crate::db::store::VmRow;
use crate::proxmox::{GuestRef, PveResource};
use std::collections::HashMap;

/// The guest a VM belongs to and how it was found. A manual link is kept while its VMID
/// exists (its node follows migrations).
pub fn resolve(
    row: &VmRow,
    resources: &[PveResource],
    uuids: &HashMap<i64, String>,
) -> Option<(GuestRef, &'static str)> {
    let by_vmid = |vmid: i64, kind: Option<&str>| {
        resources
            .iter()
            .find(|r| r.vmid == vmid && kind.is_none_or(|k| r.kind == k))
            .and_then(PveResource::guest)
    };
    if row.proxmox_link_source.as_deref() == Some("manual") {
        let vmid = row.proxmox_vmid?;
        return by_vmid(vmid, row.proxmox_type.as_deref()).map(|g| (g, "manual"));
    }
    if let Some(vmid) = row.reported_vmid {
        if let Some(guest) = by_vmid(vmid, None) {
            return Some((guest, "report"));
        }
    }
    if let Some(machine_id) = row.machine_id.as_deref() {
        let mut matches = uuids.iter().filter(|(_, uuid)| uuid.as_str() == machine_id);
        // A restore without `unique` can duplicate a uuid: ambiguous means no link.
        if let (Some((vmid, _)), None) = (matches.next(), matches.next()) {
            if let Some(guest) = by_vmid(*vmid, Some("qemu")) {
                return Some((guest, "smbios"));
            }
        }
    }
    let short = row.hostname.split('.').next().unwrap_or(&row.hostname);
    let mut named = resources.iter().filter(|r| {
        !r.template
            && r.name.as_deref().is_some_and(|n| {
                n.eq_ignore_ascii_case(&row.hostname) || n.eq_ignore_ascii_case(short)
            })
    });
    match (named.next(), named.next()) {
        (Some(r), None) => r.guest().map(|g| (g, "name")),
        _ => None,
    }
}
