//! The vm-healthcheck core: ids, stored states, the heartbeat contract and every pure decision.
//!
//! Nothing here does I/O. The server, the Proxmox client and the dashboard all build on it.

pub mod enums;
pub mod evidence;
pub mod heartbeat;
pub mod history;
pub mod identity;
pub mod ids;
pub mod ingest;
pub mod link;
#[cfg(feature = "schedule")]
pub mod maintenance;
pub mod notify;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod panel;
pub mod policy;
pub mod secret;
pub mod settings;
pub mod status;
pub mod view;

pub use enums::{
    AttemptOutcome, AutoReset, ChannelKind, ChartRange, DeliveryState, EventKind, GuestKind,
    LinkSource, Mode, NotifyKind, OperatorAction, OsKind, PanelName, PowerAction, RemediationPhase,
    TriggerSource, UnknownValue, UserRole, VmStatus, WindowScope,
};
pub use ids::{AttemptId, GuestRef, InvalidId, NodeName, Tag, VmId, Vmid};
pub use secret::Secret;
