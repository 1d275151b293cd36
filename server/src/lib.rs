//! vm-healthcheck server: heartbeat ingest, status, REST API and the dashboard's back end.

pub mod config;
pub mod db;
pub mod status;
