//! One module per route; `crate::App` maps paths to these pages.

pub mod fleet;

pub use fleet::FleetPage;
