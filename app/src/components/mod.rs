//! Building blocks the pages are made of; each takes signals so it updates in place.

pub mod chart;
pub mod remediation_banner;
pub mod status_badge;
pub mod summary;
pub mod topbar;
pub mod vm_table;

pub use chart::Chart;
pub use remediation_banner::RemediationBanner;
pub use status_badge::{PhaseBadge, StatusBadge};
pub use summary::SummaryCounts;
pub use topbar::{SignedInAs, TopBar, use_signed_in};
pub use vm_table::VmTable;
