//! Typed server configuration, loaded once from the environment (and an optional `.env`).
//!
//! Variables read here (defaults in `.env.example`): `LISTEN_ADDR`, `DATABASE_URL`, `DATA_DIR`,
//! `DB_POOL_SIZE`, `REDIS_URL`, `AGENT_TOKEN`, `ADMIN_TOKEN`, `STALE_TIMEOUT_MS`, `CPU_THRESHOLD`,
//! `RAM_THRESHOLD`, `DISK_THRESHOLD`, `REPORT_INTERVAL_SECONDS`, `SCHEDULER_INTERVAL_MS`,
//! `INGEST_BATCH_MAX`, `INGEST_QUEUE_CAPACITY`, `SITE_ROOT`, `LOG_FORMAT`.

use app::types::StatusConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A configuration value that could not be used; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// Everything the server needs to start.
#[derive(Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub database_url: String,
    pub data_dir: PathBuf,
    pub db_pool_size: usize,
    pub redis_url: Option<String>,
    pub agent_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// Defaults for the runtime-editable status configuration.
    pub status_defaults: StatusConfig,
    pub scheduler_interval: Duration,
    pub ingest_batch_max: usize,
    pub ingest_queue_capacity: usize,
    pub site_root: PathBuf,
    pub log_json: bool,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database", &redact_url(&self.database_url))
            .field("data_dir", &self.data_dir)
            .field("redis", &self.redis_url.as_deref().map(redact_url))
            .field("status_defaults", &self.status_defaults)
            .finish_non_exhaustive()
    }
}

/// Drops any password from a connection URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl Config {
    /// Reads the process environment, after loading `.env` if one exists.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is reported by the values it leaves unset.
        let _ = dotenvy::dotenv();
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any variable lookup (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let data_dir = PathBuf::from(get("DATA_DIR").unwrap_or_else(|| "data".into()));
        let database_url = get("DATABASE_URL").unwrap_or_else(|| {
            format!("sqlite://{}", data_dir.join("vm-healthcheck.db").display())
        });
        let defaults = StatusConfig::default();
        let status_defaults = StatusConfig {
            cpu_threshold: parse(&get, "CPU_THRESHOLD", defaults.cpu_threshold)?,
            ram_threshold: parse(&get, "RAM_THRESHOLD", defaults.ram_threshold)?,
            disk_threshold: parse(&get, "DISK_THRESHOLD", defaults.disk_threshold)?,
            stale_timeout_ms: parse(&get, "STALE_TIMEOUT_MS", defaults.stale_timeout_ms)?,
            report_interval_seconds: parse(
                &get,
                "REPORT_INTERVAL_SECONDS",
                defaults.report_interval_seconds,
            )?,
        };
        crate::status::validate_config(&status_defaults).map_err(|e| ConfigError {
            name: e.field,
            reason: e.message,
        })?;
        let scheduler_interval_ms: u64 = parse(&get, "SCHEDULER_INTERVAL_MS", 1000)?;
        if scheduler_interval_ms == 0 {
            return Err(ConfigError {
                name: "SCHEDULER_INTERVAL_MS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            listen_addr: parse(&get, "LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], 3000)))?,
            database_url,
            data_dir,
            db_pool_size: parse(&get, "DB_POOL_SIZE", 8usize)?.max(2),
            redis_url: get("REDIS_URL"),
            agent_token: get("AGENT_TOKEN").map(Secret),
            admin_token: get("ADMIN_TOKEN").map(Secret),
            status_defaults,
            scheduler_interval: Duration::from_millis(scheduler_interval_ms),
            ingest_batch_max: parse(&get, "INGEST_BATCH_MAX", 500usize)?.max(1),
            ingest_queue_capacity: parse(&get, "INGEST_QUEUE_CAPACITY", 20_000usize)?.max(1),
            site_root: PathBuf::from(get("SITE_ROOT").unwrap_or_else(|| "target/site".into())),
            log_json: get("LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("json")),
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
    }
}

fn parse<T: FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match get(name) {
        None => Ok(default),
        Some(raw) => raw.trim().parse().map_err(|e| ConfigError {
            name,
            reason: format!("cannot parse {raw:?}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_use_sqlite_under_data() {
        let cfg = config(&[]).unwrap();
        assert_eq!(cfg.database_url, "sqlite://data/vm-healthcheck.db");
        assert_eq!(cfg.listen_addr.port(), 3000);
        assert_eq!(cfg.status_defaults, StatusConfig::default());
        assert!(!cfg.is_postgres());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = config(&[("CPU_THRESHOLD", "lots")]).err().unwrap();
        assert_eq!(err.name, "CPU_THRESHOLD");
        let err = config(&[("RAM_THRESHOLD", "120")]).err().unwrap();
        assert_eq!(err.name, "ram_threshold");
        let err = config(&[("SCHEDULER_INTERVAL_MS", "0")]).err().unwrap();
        assert_eq!(err.name, "SCHEDULER_INTERVAL_MS");
    }

    #[test]
    fn secrets_and_passwords_do_not_print() {
        let cfg = config(&[
            ("AGENT_TOKEN", "agent-secret"),
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
        ])
        .unwrap();
        let printed = format!("{cfg:?} {:?}", cfg.agent_token);
        assert!(!printed.contains("agent-secret"));
        assert!(!printed.contains("hunter2"));
        assert!(cfg.is_postgres());
    }
}
