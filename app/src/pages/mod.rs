//! One module per route; `crate::App` maps paths to these pages.

pub mod fleet;
pub mod login;
pub mod panel;
pub mod vm;

pub use fleet::FleetPage;
pub use login::{LoginPage, SetupPage};
pub use panel::PanelPage;
pub use vm::VmDetailPage;
