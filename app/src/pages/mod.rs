//! One module per route; `crate::App` maps paths to these pages.

pub mod fleet;
pub mod login;
pub mod vm;

pub use fleet::FleetPage;
pub use login::{LoginPage, SetupPage};
pub use vm::VmDetailPage;
