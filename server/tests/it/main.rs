//! Integration tests: the real server on SQLite and PostgreSQL, Redis, and a real browser.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::as_conversions,
    clippy::indexing_slicing,
    clippy::string_slice
)]

mod agent;
mod api;
mod browser;
mod cli;
mod common;
mod concurrency;
mod failover;
mod fake_pve;
mod fake_pve_contract;
mod faults;
mod history;
mod hostile;
mod http;
mod identity;
mod live;
mod notify;
mod openapi;
mod ops;
mod panels;
mod people;
mod proxmox;
mod qemu;
mod quickstart;
mod redis_cache;
mod safeguards;
mod scale;
mod second_opinion;
mod settings;
mod soak;
mod storage;
mod tls;
mod veto;
mod vm_e2e;
mod write_path;
