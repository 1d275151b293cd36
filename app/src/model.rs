//! The fleet as the page holds it: the last good snapshot, indexed by VM id for keyed rows.

use domain::status::StatusCounts;
use domain::view::{FleetSnapshot, RemediationSummary, VmView};
use domain::{RemediationPhase, VmId, VmStatus};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

pub use domain::view::PhaseCounts;

/// One snapshot, with its VMs reachable by id so each table row can follow its own VM.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetModel {
    pub now_ms: i64,
    pub counts: StatusCounts,
    pub phases: PhaseCounts,
    pub nodes: Vec<String>,
    pub remediation: RemediationSummary,
    /// How many VMs the filter admits in all, and where this page starts among them.
    pub matching: u64,
    pub offset: u64,
    /// VM ids in display order, each once.
    pub order: Vec<VmId>,
    vms: HashMap<VmId, VmView>,
}

impl FleetModel {
    pub fn vm(&self, id: VmId) -> Option<&VmView> {
        self.vms.get(&id)
    }
}

/// Longest host search kept: a DNS name is at most 253 characters.
pub const MAX_SEARCH_CHARS: usize = 253;

/// The column the fleet is sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Worst first: down, warning, unknown, healthy; then by name.
    #[default]
    Status,
    Name,
    Cpu,
    Ram,
    Disk,
    LastSeen,
}

impl SortKey {
    pub const ALL: [SortKey; 6] = [
        SortKey::Status,
        SortKey::Name,
        SortKey::Cpu,
        SortKey::Ram,
        SortKey::Disk,
        SortKey::LastSeen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Status => "status",
            SortKey::Name => "name",
            SortKey::Cpu => "cpu",
            SortKey::Ram => "ram",
            SortKey::Disk => "disk",
            SortKey::LastSeen => "seen",
        }
    }
}

/// Which VMs the fleet table shows and in what order; kept in the page's URL so a view
/// can be shared, and read back leniently (an unknown value means "no filter").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetQuery {
    pub status: Option<VmStatus>,
    pub node: Option<String>,
    pub os: Option<String>,
    /// Part of the host name, any case.
    pub text: String,
    pub sort: SortKey,
    pub descending: bool,
    /// Which page of the matching VMs, from 0 (`page=1` in the URL).
    pub page: u32,
}

impl FleetQuery {
    pub fn from_url(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        Self {
            status: nonempty("status").and_then(|s| s.parse().ok()),
            node: nonempty("node"),
            os: nonempty("os"),
            // Longer than any host name can be: cut, so a filter costs what a name does.
            text: nonempty("q")
                .map(|q| q.chars().take(MAX_SEARCH_CHARS).collect())
                .unwrap_or_default(),
            sort: nonempty("sort")
                .and_then(|s| SortKey::ALL.into_iter().find(|k| k.as_str() == s))
                .unwrap_or_default(),
            descending: get("desc").as_deref() == Some("1"),
            page: nonempty("page")
                .and_then(|p| p.trim().parse::<u32>().ok())
                .map_or(0, |p| p.saturating_sub(1)),
        }
    }

    /// The URL query (without `?`) that gives this view.
    pub fn to_url(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(status) = self.status {
            pairs.push(("status", status.to_string()));
        }
        if let Some(node) = &self.node {
            pairs.push(("node", node.clone()));
        }
        if let Some(os) = &self.os {
            pairs.push(("os", os.clone()));
        }
        if !self.text.is_empty() {
            pairs.push(("q", self.text.clone()));
        }
        if self.sort != SortKey::Status {
            pairs.push(("sort", self.sort.as_str().to_owned()));
        }
        if self.descending {
            pairs.push(("desc", "1".to_owned()));
        }
        if self.page > 0 {
            pairs.push(("page", self.page.saturating_add(1).to_string()));
        }
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={}", encode(&v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Sorted by `key`; the same key again flips the direction. From the first page.
    pub fn sorted_by(&self, key: SortKey) -> Self {
        Self {
            descending: self.sort == key && !self.descending,
            sort: key,
            page: 0,
            ..self.clone()
        }
    }

    /// The same filter and order on page `page`.
    pub fn on_page(&self, page: u32) -> Self {
        Self {
            page,
            ..self.clone()
        }
    }

    /// `needle`: the search text, lower-cased once for the whole fleet.
    fn admits(&self, vm: &VmView, needle: &str) -> bool {
        self.status.is_none_or(|s| vm.status == s)
            && self
                .node
                .as_deref()
                .is_none_or(|n| vm.proxmox_node.as_ref().map(|node| node.as_str()) == Some(n))
            && self.os.as_deref().is_none_or(|os| vm.os == os)
            // Hostnames are ASCII (DNS labels), so ASCII case folding is enough. A tag
            // search is the server's to answer: it sends only the VMs carrying the tag.
            && (needle.is_empty()
                || tag_search(needle).is_some()
                || vm.hostname.to_ascii_lowercase().contains(needle))
    }
}

/// The tag a fleet search names (`tag:db`), if it names one.
pub fn tag_search(text: &str) -> Option<&str> {
    text.trim().strip_prefix("tag:").map(str::trim)
}

/// Percent-encodes what a query value needs (the rest of the URL grammar stays readable).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn severity(status: VmStatus) -> u8 {
    match status {
        VmStatus::Down => 0,
        VmStatus::Warning => 1,
        VmStatus::Unknown => 2,
        VmStatus::Healthy => 3,
    }
}

/// Compares optional figures with unknown ones last whatever the direction.
fn figure(a: Option<f64>, b: Option<f64>) -> Option<Ordering> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.total_cmp(&b)),
        (Some(_), None) | (None, Some(_)) => None,
        (None, None) => Some(Ordering::Equal),
    }
}

impl FleetModel {
    /// The ids the table shows for `query`, in its order (the server sent this page in
    /// that order; filtering here too keeps the table right while a new page loads).
    pub fn select(&self, query: &FleetQuery) -> Vec<VmId> {
        select(self.order.iter().filter_map(|id| self.vms.get(id)), query)
            .into_iter()
            .map(|vm| vm.id)
            .collect()
    }
}

/// The VMs `query` admits, in its order.
pub fn select<'a>(
    vms: impl IntoIterator<Item = &'a VmView>,
    query: &FleetQuery,
) -> Vec<&'a VmView> {
    let needle = query.text.to_ascii_lowercase();
    let mut shown: Vec<&VmView> = vms
        .into_iter()
        .filter(|vm| query.admits(vm, &needle))
        .collect();
    let ram = |v: &VmView| crate::format::percent_of(v.ram_used_bytes, v.ram_total_bytes);
    shown.sort_by(|a, b| {
        // Hostnames are ASCII (DNS labels); compared without allocating.
        let by_name = || {
            a.hostname
                .bytes()
                .map(|c| c.to_ascii_lowercase())
                .cmp(b.hostname.bytes().map(|c| c.to_ascii_lowercase()))
        };
        let order = match query.sort {
            SortKey::Status => Some(severity(a.status).cmp(&severity(b.status))),
            SortKey::Name => Some(by_name()),
            SortKey::Cpu => figure(a.cpu_percent, b.cpu_percent),
            SortKey::Ram => figure(ram(a), ram(b)),
            SortKey::Disk => figure(a.disk_max_percent, b.disk_max_percent),
            SortKey::LastSeen => figure(
                a.last_seen_ms.map(domain::status::approx_f64),
                b.last_seen_ms.map(domain::status::approx_f64),
            ),
        };
        match order {
            // An unknown figure sorts last in either direction.
            None => {
                let a_known = match query.sort {
                    SortKey::Cpu => a.cpu_percent.is_some(),
                    SortKey::Ram => ram(a).is_some(),
                    SortKey::Disk => a.disk_max_percent.is_some(),
                    _ => a.last_seen_ms.is_some(),
                };
                if a_known {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            Some(order) => {
                let order = if query.descending {
                    order.reverse()
                } else {
                    order
                };
                order.then_with(by_name).then(a.id.cmp(&b.id))
            }
        }
    });
    shown
}

/// How many of `vms` are in each remediation state worth a glance.
pub fn phase_counts<'a>(vms: impl IntoIterator<Item = &'a VmView>) -> PhaseCounts {
    let mut counts = PhaseCounts::default();
    for vm in vms {
        match vm.remediation_phase {
            RemediationPhase::ResetScheduled => counts.scheduled += 1,
            RemediationPhase::ResetPending => counts.reset_pending += 1,
            RemediationPhase::Recovering => counts.recovering += 1,
            RemediationPhase::Manual => counts.manual += 1,
            _ => {}
        }
        if vm.proxmox_vmid.is_some() && !vm.link_verified {
            counts.link_pending += 1;
        }
    }
    counts
}

/// The Proxmox nodes of `vms`, each once, in order.
pub fn nodes<'a>(vms: impl IntoIterator<Item = &'a VmView>) -> Vec<String> {
    let mut nodes: Vec<String> = vms
        .into_iter()
        .filter_map(|vm| vm.proxmox_node.as_ref().map(|n| n.as_str().to_owned()))
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

impl From<&FleetSnapshot> for FleetModel {
    fn from(snapshot: &FleetSnapshot) -> Self {
        let mut order = Vec::with_capacity(snapshot.vms.len());
        let mut vms = HashMap::with_capacity(snapshot.vms.len());
        for vm in &snapshot.vms {
            // Keyed rows need unique keys: the first VM with an id wins.
            if let Entry::Vacant(slot) = vms.entry(vm.id) {
                order.push(vm.id);
                slot.insert(vm.clone());
            }
        }
        Self {
            now_ms: snapshot.now_ms,
            counts: snapshot.counts.clone(),
            phases: snapshot.phases.clone(),
            nodes: snapshot.nodes.clone(),
            remediation: snapshot.remediation.clone(),
            matching: snapshot.matching,
            offset: snapshot.offset,
            order,
            vms,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vm(id: i64, hostname: &str) -> VmView {
        VmView {
            id: VmId(id),
            hostname: hostname.into(),
            os: "linux".into(),
            machine_id: None,
            agent_version: None,
            status: VmStatus::Healthy,
            status_since_ms: 0,
            status_reason: String::new(),
            first_seen_ms: 0,
            last_seen_ms: None,
            observed_at_ms: None,
            cpu_percent: None,
            ram_used_bytes: None,
            ram_total_bytes: None,
            disk_used_bytes: None,
            disk_total_bytes: None,
            disk_max_percent: None,
            disks: Vec::new(),
            uptime_seconds: None,
            proxmox_node: None,
            proxmox_vmid: None,
            proxmox_type: None,
            proxmox_link_source: None,
            link_verified: false,
            auto_reset: true,
            remediation_phase: RemediationPhase::Ok,
            phase_reason: None,
            incident_attempts: 0,
            last_reset_ms: None,
            next_action_ms: None,
        }
    }

    #[test]
    fn keeps_the_server_order_and_one_row_per_id() {
        let snapshot = FleetSnapshot {
            now_ms: 5,
            vms: vec![vm(2, "b"), vm(1, "a"), vm(2, "duplicate")],
            ..FleetSnapshot::default()
        };
        let model = FleetModel::from(&snapshot);
        assert_eq!(model.now_ms, 5);
        assert_eq!(model.order, vec![VmId(2), VmId(1)]);
        assert_eq!(model.vm(VmId(2)).map(|v| v.hostname.as_str()), Some("b"));
        assert!(model.vm(VmId(3)).is_none());
    }

    fn fleet() -> FleetModel {
        let mut web = vm(1, "web-01");
        web.status = VmStatus::Down;
        web.cpu_percent = Some(10.0);
        let mut db = vm(2, "DB-01");
        db.status = VmStatus::Warning;
        db.cpu_percent = Some(95.0);
        db.proxmox_node = Some("pve2".parse().unwrap());
        db.proxmox_vmid = Some(domain::Vmid::try_from(200).unwrap());
        db.remediation_phase = RemediationPhase::Manual;
        let mut win = vm(3, "win-app");
        win.os = "windows".into();
        win.proxmox_node = Some("pve1".parse().unwrap());
        win.proxmox_vmid = Some(domain::Vmid::try_from(300).unwrap());
        win.link_verified = true;
        let quiet = vm(4, "quiet");
        FleetModel::from(&FleetSnapshot {
            vms: vec![win, quiet, db, web],
            ..FleetSnapshot::default()
        })
    }

    #[test]
    fn filters_and_sorts_table() {
        let model = fleet();
        let ids = |q: FleetQuery| {
            model
                .select(&q)
                .into_iter()
                .map(|id| id.get())
                .collect::<Vec<_>>()
        };
        let cases = [
            // Worst first, then by name.
            (FleetQuery::default(), vec![1, 2, 4, 3]),
            (
                FleetQuery {
                    status: Some(VmStatus::Healthy),
                    ..FleetQuery::default()
                },
                vec![4, 3],
            ),
            (
                FleetQuery {
                    node: Some("pve2".into()),
                    ..FleetQuery::default()
                },
                vec![2],
            ),
            (
                FleetQuery {
                    os: Some("windows".into()),
                    ..FleetQuery::default()
                },
                vec![3],
            ),
            (
                FleetQuery {
                    text: "db".into(),
                    ..FleetQuery::default()
                },
                vec![2],
            ),
            (
                FleetQuery {
                    sort: SortKey::Name,
                    ..FleetQuery::default()
                },
                vec![2, 4, 1, 3],
            ),
            // Unknown figures last, in both directions.
            (
                FleetQuery {
                    sort: SortKey::Cpu,
                    ..FleetQuery::default()
                },
                vec![1, 2, 4, 3],
            ),
            (
                FleetQuery {
                    sort: SortKey::Cpu,
                    descending: true,
                    ..FleetQuery::default()
                },
                vec![2, 1, 4, 3],
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(ids(query.clone()), expected, "{query:?}");
        }
        let phases = phase_counts(model.vms.values());
        assert_eq!((phases.manual, phases.link_pending), (1, 1));
        assert_eq!(nodes(model.vms.values()), vec!["pve1", "pve2"]);
    }

    #[test]
    fn queries_round_trip_through_the_url() {
        let query = FleetQuery {
            status: Some(VmStatus::Down),
            node: Some("pve 1".into()),
            os: None,
            text: "web&co".into(),
            sort: SortKey::Cpu,
            descending: true,
            page: 2,
        };
        let url = query.to_url();
        assert_eq!(
            url,
            "status=down&node=pve%201&q=web%26co&sort=cpu&desc=1&page=3"
        );
        let decoded: std::collections::HashMap<&str, String> = [
            ("status", "down"),
            ("node", "pve 1"),
            ("q", "web&co"),
            ("sort", "cpu"),
            ("desc", "1"),
            ("page", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        assert_eq!(FleetQuery::from_url(|k| decoded.get(k).cloned()), query);
        // Nonsense in a shared link means no filter, not an error.
        let odd = FleetQuery::from_url(|k| {
            matches!(k, "status" | "sort" | "page").then(|| "bogus".into())
        });
        assert_eq!(odd, FleetQuery::default());
        assert_eq!(
            FleetQuery::from_url(|k| (k == "page").then(|| "0".into())).page,
            0
        );
        assert_eq!(
            query.sorted_by(SortKey::Name).page,
            0,
            "a new order starts at page 1"
        );
        assert!(!query.sorted_by(SortKey::Cpu).descending);
        assert!(!query.sorted_by(SortKey::Name).descending);
        assert!(FleetQuery::default().sorted_by(SortKey::Status).descending);
    }
}
