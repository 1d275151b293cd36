//! Linking monitored VMs to Proxmox guests, and which links may be acted on.

use crate::enums::{GuestKind, LinkSource};
use crate::ids::{GuestRef, NodeName, Tag, Vmid};
use std::collections::HashMap;

/// One guest of the cluster, as the link resolution needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterGuest {
    pub guest: GuestRef,
    pub name: Option<String>,
    pub template: bool,
    /// The guest's Proxmox tags that are valid tags here.
    pub tags: Vec<Tag>,
}

/// A guest's tags as Proxmox lists them (`prod;web`; older releases also use `,` or
/// spaces), sorted and deduplicated; a tag this monitor cannot hold is left out.
pub fn proxmox_tags(raw: &str) -> Vec<Tag> {
    let mut tags: Vec<Tag> = raw
        .split([';', ',', ' '])
        .filter(|t| !t.trim().is_empty())
        .filter_map(|t| t.to_owned().try_into().ok())
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// What is known about a monitored VM when looking for its guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSubject<'a> {
    pub hostname: &'a str,
    pub machine_id: Option<&'a str>,
    pub reported_vmid: Option<Vmid>,
    /// The link in force and how it was made.
    pub current: Option<(GuestRef, LinkSource)>,
    /// An operator removed the link: nothing is proposed again until one links it.
    pub unlinked_by_operator: bool,
}

/// The guest a VM belongs to and how it was found. A manual link is kept while its VMID
/// exists (its node follows migrations).
pub fn resolve(
    vm: &LinkSubject<'_>,
    guests: &[ClusterGuest],
    uuids: &HashMap<Vmid, String>,
) -> Option<(GuestRef, LinkSource)> {
    let by_vmid = |vmid: Vmid, kind: Option<GuestKind>| {
        guests
            .iter()
            .find(|g| g.guest.vmid == vmid && kind.is_none_or(|k| g.guest.kind == k))
            .map(|g| g.guest.clone())
    };
    if vm.unlinked_by_operator {
        return None;
    }
    if let Some((linked, LinkSource::Manual)) = &vm.current {
        return by_vmid(linked.vmid, Some(linked.kind)).map(|g| (g, LinkSource::Manual));
    }
    if let Some(machine_id) = vm.machine_id {
        let mut matches = uuids.iter().filter(|(_, uuid)| uuid.as_str() == machine_id);
        // A restore without `unique` can duplicate a uuid: ambiguous means no link.
        if let (Some((vmid, _)), None) = (matches.next(), matches.next())
            && let Some(guest) = by_vmid(*vmid, Some(GuestKind::Qemu))
        {
            return Some((guest, LinkSource::Smbios));
        }
    }
    if let Some(guest) = vm.reported_vmid.and_then(|vmid| by_vmid(vmid, None)) {
        return Some((guest, LinkSource::Report));
    }
    let short = vm.hostname.split('.').next().unwrap_or(vm.hostname);
    let mut named = guests.iter().filter(|g| {
        !g.template
            && g.name.as_deref().is_some_and(|n| {
                n.eq_ignore_ascii_case(vm.hostname) || n.eq_ignore_ascii_case(short)
            })
    });
    match (named.next(), named.next()) {
        (Some(g), None) => Some((g.guest.clone(), LinkSource::Name)),
        _ => None,
    }
}

/// Which automatic matches an admin trusts as links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkPolicy {
    /// Single-tenant sites: an unambiguous SMBIOS uuid match links without approval.
    pub auto_approve_uuid: bool,
}

/// Whether a link found this way may be acted on (reset, shut down) without an operator's
/// approval. A VMID or a name is only what the agent claims, so never: root in one guest
/// must not be able to point the monitor at another. A uuid match is trusted only where
/// the admin chose to; an operator's link always is.
pub fn verified(source: LinkSource, policy: LinkPolicy) -> bool {
    match source {
        LinkSource::Manual => true,
        LinkSource::Smbios => policy.auto_approve_uuid,
        LinkSource::Report | LinkSource::Name => false,
    }
}

/// Whether a refresh should store `found` over the current link: only on a change, and a
/// manual link is never dropped just because its guest is not found right now.
pub fn should_replace(
    current: Option<&(GuestRef, LinkSource)>,
    found: Option<&(GuestRef, LinkSource)>,
) -> bool {
    let current_guest = current.map(|(g, _)| g);
    let found_guest = found.map(|(g, _)| g);
    current_guest != found_guest
        && (found.is_some() || !matches!(current, Some((_, LinkSource::Manual))))
}

/// Finds where a guest lives now (after a migration), by VMID and type.
pub fn relocate(guest: &GuestRef, guests: &[ClusterGuest]) -> Option<GuestRef> {
    guests
        .iter()
        .find(|g| g.guest.vmid == guest.vmid && g.guest.kind == guest.kind)
        .map(|g| g.guest.clone())
}

/// The node a guest moved to, if any (for logs).
pub fn moved_to<'a>(from: &GuestRef, to: &'a GuestRef) -> Option<&'a NodeName> {
    (from.node != to.node).then_some(&to.node)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn guest(node: &str, vmid: i64, kind: GuestKind, name: &str) -> ClusterGuest {
        ClusterGuest {
            guest: GuestRef {
                node: node.parse().unwrap(),
                vmid: Vmid::try_from(vmid).unwrap(),
                kind,
            },
            name: Some(name.into()),
            template: false,
            tags: Vec::new(),
        }
    }

    #[test]
    fn proxmox_tag_lists_are_read_leniently() {
        let tags = |raw: &str| -> Vec<String> {
            proxmox_tags(raw)
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect()
        };
        assert_eq!(tags("prod;web"), ["prod", "web"]);
        assert_eq!(tags("Web, prod prod;;"), ["prod", "web"]);
        // One Proxmox allows that this monitor cannot hold is left out, not the list.
        assert_eq!(tags("ok;b@d;x"), ["ok", "x"]);
        assert!(tags("").is_empty());
    }

    fn subject(hostname: &str) -> LinkSubject<'_> {
        LinkSubject {
            hostname,
            machine_id: None,
            reported_vmid: None,
            current: None,
            unlinked_by_operator: false,
        }
    }

    #[test]
    fn resolution_table() {
        let cluster = vec![
            guest("pve1", 100, GuestKind::Qemu, "web"),
            guest("pve2", 101, GuestKind::Qemu, "db"),
            guest("pve2", 102, GuestKind::Lxc, "dup"),
            guest("pve1", 103, GuestKind::Qemu, "dup"),
        ];
        let vmid = |n: i64| Vmid::try_from(n).unwrap();
        let mut uuids = HashMap::new();
        uuids.insert(vmid(101), "u-db".to_owned());
        let by_report = LinkSubject {
            reported_vmid: Some(vmid(100)),
            ..subject("whatever")
        };
        assert_eq!(
            resolve(&by_report, &cluster, &uuids).unwrap().1,
            LinkSource::Report
        );
        let by_uuid = LinkSubject {
            machine_id: Some("u-db"),
            ..subject("other")
        };
        let (g, how) = resolve(&by_uuid, &cluster, &uuids).unwrap();
        assert_eq!((g.vmid, how), (vmid(101), LinkSource::Smbios));
        let by_name = subject("web.example.org");
        assert_eq!(
            resolve(&by_name, &cluster, &uuids).unwrap().1,
            LinkSource::Name
        );
        assert_eq!(
            resolve(&subject("dup"), &cluster, &uuids),
            None,
            "ambiguous name"
        );
        uuids.insert(vmid(100), "u-db".to_owned());
        assert_eq!(resolve(&by_uuid, &cluster, &uuids), None, "ambiguous uuid");
        let manual = LinkSubject {
            current: Some((cluster[3].guest.clone(), LinkSource::Manual)),
            reported_vmid: Some(vmid(100)),
            ..subject("web")
        };
        let (g, how) = resolve(&manual, &cluster, &uuids).unwrap();
        assert_eq!((g.vmid, how), (vmid(103), LinkSource::Manual));
    }

    #[test]
    fn only_an_operator_or_a_trusted_uuid_verifies_a_link() {
        let trusting = LinkPolicy {
            auto_approve_uuid: true,
        };
        let cases = [
            (LinkSource::Manual, LinkPolicy::default(), true),
            (LinkSource::Manual, trusting, true),
            (LinkSource::Smbios, LinkPolicy::default(), false),
            (LinkSource::Smbios, trusting, true),
            (LinkSource::Report, trusting, false),
            (LinkSource::Name, trusting, false),
        ];
        for (source, policy, expected) in cases {
            assert_eq!(verified(source, policy), expected, "{source} {policy:?}");
        }
    }

    #[test]
    fn an_operators_unlink_is_kept() {
        let cluster = vec![guest("pve1", 100, GuestKind::Qemu, "web")];
        let unlinked = LinkSubject {
            reported_vmid: Some(Vmid::try_from(100).unwrap()),
            unlinked_by_operator: true,
            ..subject("web")
        };
        assert_eq!(resolve(&unlinked, &cluster, &HashMap::new()), None);
    }

    #[test]
    fn a_uuid_match_comes_before_a_claimed_vmid() {
        let cluster = vec![
            guest("pve1", 100, GuestKind::Qemu, "web"),
            guest("pve2", 101, GuestKind::Qemu, "db"),
        ];
        let mut uuids = HashMap::new();
        uuids.insert(Vmid::try_from(101).unwrap(), "u-db".to_owned());
        let both = LinkSubject {
            machine_id: Some("u-db"),
            reported_vmid: Some(Vmid::try_from(100).unwrap()),
            ..subject("db")
        };
        let (g, how) = resolve(&both, &cluster, &uuids).unwrap();
        assert_eq!((g.vmid.get(), how), (101, LinkSource::Smbios));
    }

    #[test]
    fn manual_links_are_not_dropped() {
        let g = guest("pve1", 100, GuestKind::Qemu, "web").guest;
        let manual = (g.clone(), LinkSource::Manual);
        assert!(!should_replace(Some(&manual), None));
        let by_name = (g.clone(), LinkSource::Name);
        assert!(should_replace(Some(&by_name), None));
        assert!(!should_replace(
            Some(&by_name),
            Some(&(g, LinkSource::Report))
        ));
    }
}
