//! Typed server configuration, loaded once from the environment (and an optional `.env`).
//!
//! Variables read here (defaults in `.env.example`): `LISTEN_ADDR`, `DATABASE_URL`, `DATA_DIR`,
//! `DB_POOL_SIZE`, `REDIS_URL`, `AGENT_TOKEN`, `ADMIN_TOKEN`, `STALE_TIMEOUT_MS`, `CPU_THRESHOLD`,
//! `RAM_THRESHOLD`, `DISK_THRESHOLD`, `REPORT_INTERVAL_SECONDS`, `SCHEDULER_INTERVAL_MS`,
//! `INGEST_BATCH_MAX`, `INGEST_QUEUE_CAPACITY`, `INGEST_WRITE`, `RETENTION_RAW_DAYS`, `RETENTION_MINUTE_DAYS`,
//! `RETENTION_HOUR_DAYS`, `RETENTION_EVENTS_DAYS`, `SITE_ROOT`, `LOG_FORMAT`; Proxmox:
//! `PROXMOX_HOST`, `PROXMOX_USER`, `PROXMOX_TOKEN`, `PROXMOX_SECRET`, `PROXMOX_CA_FILE`,
//! `PROXMOX_FINGERPRINT`, `PROXMOX_TLS_INSECURE`, `PROXMOX_TIMEOUT_MS`; remediation:
//! `AUTO_RESET_ENABLED`, `AUTO_RESET_MODE`, `MAX_RESET_ATTEMPTS`, `MAX_CONCURRENT_RESETS`,
//! `RECOVERY_TIMEOUT_MS`, `RESET_BACKOFF_MS`, `STORM_PERCENT`, `REMEDIATE_HA_VMS`,
//! `RECHECK_INTERVAL_MS`, `LINK_REFRESH_MS`, `LINK_AUTO_APPROVE`, `TASK_TIMEOUT_MS`,
//! `TASK_POLL_MS`, `HANG_EVIDENCE`, `ESCALATION_LADDER`, `GRACEFUL_REBOOT_TIMEOUT_MS`,
//! `EVIDENCE_INTERVAL_MS`, `GUEST_AGENT_TIMEOUT_MS`, `RESET_VETO_SECONDS`; serving: `TLS`, `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_SUBJECT_NAMES`;
//! notifications: `NOTIFY_INTERVAL_MS`, `NOTIFY_TIMEOUT_MS`, `NOTIFY_RETRY_MS`,
//! `NOTIFY_MAX_ATTEMPTS`, `NOTIFY_WARNING_AFTER_MS`, `NOTIFY_CONCURRENCY`, `SMTP_HOST`,
//! `SMTP_PORT`, `SMTP_SECURITY`, `SMTP_USERNAME`, `SMTP_PASSWORD`, `SMTP_FROM`.

use domain::Mode;
pub use domain::Secret;
use domain::history::Retention;
use domain::policy::RemediationConfig;
use domain::status::StatusConfig;
use proxmox::{PveSettings, TlsTrust};
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
    /// How long metric history, its rollups and the event history are kept.
    pub retention: Retention,
    pub ingest_batch_max: usize,
    /// `INGEST_WRITE`: the latest state of a batch in one set-based statement (`set`, the
    /// default) or one VM at a time (`per-vm`, the reference; for benchmarks).
    pub ingest_set_based: bool,
    pub ingest_queue_capacity: usize,
    pub site_root: PathBuf,
    pub log_json: bool,
    /// `None` without `PROXMOX_HOST`: the product runs, remediation is off.
    pub proxmox: Option<PveSettings>,
    pub remediation: RemediationConfig,
    /// Which automatic link matches count as verified (`LINK_AUTO_APPROVE`).
    pub link_policy: domain::link::LinkPolicy,
    pub link_refresh: Duration,
    /// Keep each linked VM's Proxmox tags as tags here (`PROXMOX_IMPORT_TAGS`).
    pub import_proxmox_tags: bool,
    pub task_timeout: Duration,
    pub task_poll: Duration,
    /// HTTPS or plain HTTP on `listen_addr` (`TLS`, `TLS_CERT_FILE`, `TLS_KEY_FILE`).
    pub tls: TlsMode,
    /// Names a generated certificate covers besides localhost, the loopback addresses and
    /// the machine's hostname (`TLS_SUBJECT_NAMES`).
    pub tls_subject_names: Vec<String>,
    /// Longest a client may take over its TLS handshake before it is disconnected.
    pub tls_handshake_timeout: Duration,
    /// Session lifetimes and the sign-in throttle.
    pub accounts: AccountSettings,
    /// Abuse limits: report rate per credential, request time, trusted proxies, Host names.
    pub limits: Limits,
    /// The first admin, for unattended installs (`ADMIN_USERNAME`, `ADMIN_PASSWORD`).
    pub admin_username: Option<String>,
    pub admin_password: Option<Secret>,
    /// Notification delivery: pacing, retries, and the mail server for email channels.
    pub notify: NotifyConfig,
}

/// How notifications are delivered (`NOTIFY_*`, `SMTP_*`).
#[derive(Clone)]
pub struct NotifyConfig {
    /// How often the notifier looks for happenings and due messages.
    pub interval: Duration,
    /// Longest one delivery may take (a hung webhook is abandoned and retried).
    pub timeout: Duration,
    /// First retry after a failed delivery; each further one waits twice as long (at most
    /// an hour).
    pub retry_base_ms: i64,
    /// Attempts before a message becomes a dead letter.
    pub max_attempts: u32,
    /// A warning is told only once the VM has stayed in it this long.
    pub warning_min_ms: i64,
    /// Deliveries running at once.
    pub concurrency: usize,
    pub smtp: Option<SmtpConfig>,
}

/// The mail server email channels send through.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub from: String,
}

/// How the connection to the mail server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (refused if the server cannot): port 587.
    Starttls,
    /// TLS from the first byte: port 465.
    Tls,
    /// No encryption: only for a relay on this machine or a test server.
    Off,
}

/// How the listener speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP, for a deployment behind a reverse proxy that terminates TLS (`TLS=off`).
    Off,
    /// HTTPS with a self-signed certificate made on first start and kept in `data_dir`.
    Generated,
    /// HTTPS with the operator's PEM certificate chain and private key. Only the paths are
    /// held here; the key is read when the server starts and never logged.
    Files { cert: PathBuf, key: PathBuf },
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database", &redact_url(&self.database_url))
            .field("data_dir", &self.data_dir)
            .field("redis", &self.redis_url.as_deref().map(redact_url))
            .field("status_defaults", &self.status_defaults)
            .field(
                "proxmox",
                &self
                    .proxmox
                    .as_ref()
                    .map(|p| (&p.host, &p.user, &p.token_id, &p.trust)),
            )
            .field("remediation", &self.remediation)
            .field("tls", &self.tls)
            .field("tls_subject_names", &self.tls_subject_names)
            .finish_non_exhaustive()
    }
}

/// Drops any password from a connection URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let mut shown = match rest.rsplit_once('@') {
        Some((_credentials, host)) => format!("{scheme}://***@{host}"),
        None => format!("{scheme}://{rest}"),
    };
    // libpq also takes `?password=` (and `sslpassword=`) in the query.
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
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
        domain::status::validate_config(&status_defaults).map_err(|e| ConfigError {
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
        let keep = Retention::default();
        let retention = Retention {
            raw_days: parse(&get, "RETENTION_RAW_DAYS", keep.raw_days)?,
            minute_days: parse(&get, "RETENTION_MINUTE_DAYS", keep.minute_days)?,
            hour_days: parse(&get, "RETENTION_HOUR_DAYS", keep.hour_days)?,
            events_days: parse(&get, "RETENTION_EVENTS_DAYS", keep.events_days)?,
        };
        retention.validate().map_err(|e| ConfigError {
            name: match e.field {
                "retention_raw_days" => "RETENTION_RAW_DAYS",
                "retention_minute_days" => "RETENTION_MINUTE_DAYS",
                "retention_hour_days" => "RETENTION_HOUR_DAYS",
                _ => "RETENTION_EVENTS_DAYS",
            },
            reason: e.message,
        })?;
        let defaults = RemediationConfig::default();
        let mode = match get("AUTO_RESET_MODE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("live") => Mode::Live,
            Some("shadow") => Mode::Shadow,
            Some(other) => {
                return Err(ConfigError {
                    name: "AUTO_RESET_MODE",
                    reason: format!("{other:?} is neither live nor shadow"),
                });
            }
        };
        let remediation = RemediationConfig {
            enabled: parse_bool(&get, "AUTO_RESET_ENABLED", defaults.enabled)?,
            mode,
            max_attempts: parse(&get, "MAX_RESET_ATTEMPTS", defaults.max_attempts)?.max(1),
            max_concurrent: parse(&get, "MAX_CONCURRENT_RESETS", defaults.max_concurrent)?.max(1),
            recovery_timeout_ms: parse(&get, "RECOVERY_TIMEOUT_MS", defaults.recovery_timeout_ms)?
                .max(1),
            backoff_base_ms: parse(&get, "RESET_BACKOFF_MS", defaults.backoff_base_ms)?.max(0),
            storm_percent: parse(&get, "STORM_PERCENT", defaults.storm_percent)?,
            remediate_ha: parse_bool(&get, "REMEDIATE_HA_VMS", defaults.remediate_ha)?,
            recheck_ms: parse(&get, "RECHECK_INTERVAL_MS", defaults.recheck_ms)?.max(1),
            hang_evidence: parse(&get, "HANG_EVIDENCE", defaults.hang_evidence)?,
            ladder: parse(&get, "ESCALATION_LADDER", defaults.ladder.clone())?,
            graceful_reboot_timeout_ms: parse(
                &get,
                "GRACEFUL_REBOOT_TIMEOUT_MS",
                defaults.graceful_reboot_timeout_ms,
            )?
            .max(1000),
            evidence_interval_ms: parse(
                &get,
                "EVIDENCE_INTERVAL_MS",
                defaults.evidence_interval_ms,
            )?
            .max(1),
            guest_agent_timeout_ms: parse(
                &get,
                "GUEST_AGENT_TIMEOUT_MS",
                defaults.guest_agent_timeout_ms,
            )?
            .max(1),
            veto_ms: parse::<i64>(&get, "RESET_VETO_SECONDS", defaults.veto_ms / 1000)?
                .clamp(0, 3600)
                .saturating_mul(1000),
        };
        if !(0.0..=100.0).contains(&remediation.storm_percent) {
            return Err(ConfigError {
                name: "STORM_PERCENT",
                reason: "must be between 0 and 100".into(),
            });
        }
        let link_policy = match get("LINK_AUTO_APPROVE").as_deref().map(str::trim) {
            None | Some("" | "none") => domain::link::LinkPolicy::default(),
            Some("uuid") => domain::link::LinkPolicy {
                auto_approve_uuid: true,
            },
            Some(other) => {
                return Err(ConfigError {
                    name: "LINK_AUTO_APPROVE",
                    reason: format!("{other:?} is not none or uuid"),
                });
            }
        };
        Ok(Self {
            tls: tls_mode(&get)?,
            tls_subject_names: tls_subject_names(&get)?,
            tls_handshake_timeout: Duration::from_secs(10),
            proxmox: proxmox_settings(&get)?,
            remediation,
            link_policy,
            link_refresh: Duration::from_millis(
                parse(&get, "LINK_REFRESH_MS", 60_000u64)?.max(100),
            ),
            import_proxmox_tags: parse_bool(&get, "PROXMOX_IMPORT_TAGS", false)?,
            task_timeout: Duration::from_millis(
                parse(&get, "TASK_TIMEOUT_MS", 120_000u64)?.max(100),
            ),
            task_poll: Duration::from_millis(parse(&get, "TASK_POLL_MS", 1_000u64)?.max(10)),
            listen_addr: parse(&get, "LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], 3000)))?,
            database_url,
            data_dir,
            db_pool_size: parse(&get, "DB_POOL_SIZE", 8usize)?.max(2),
            redis_url: get("REDIS_URL"),
            accounts: account_settings(&get)?,
            limits: limits(&get)?,
            admin_username: get("ADMIN_USERNAME"),
            admin_password: get("ADMIN_PASSWORD").map(Secret::new),
            agent_token: get("AGENT_TOKEN").map(Secret::new),
            admin_token: get("ADMIN_TOKEN").map(Secret::new),
            status_defaults,
            scheduler_interval: Duration::from_millis(scheduler_interval_ms),
            retention,
            ingest_batch_max: parse(&get, "INGEST_BATCH_MAX", 500usize)?.max(1),
            ingest_set_based: match get("INGEST_WRITE").as_deref().map(str::trim) {
                None | Some("set") => true,
                Some("per-vm") => false,
                Some(other) => {
                    return Err(ConfigError {
                        name: "INGEST_WRITE",
                        reason: format!("{other:?} is not set or per-vm"),
                    });
                }
            },
            ingest_queue_capacity: parse(&get, "INGEST_QUEUE_CAPACITY", 20_000usize)?.max(1),
            site_root: PathBuf::from(get("SITE_ROOT").unwrap_or_else(|| "target/site".into())),
            log_json: get("LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("json")),
            notify: notify_config(&get)?,
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
    }
}

fn notify_config(get: &impl Fn(&str) -> Option<String>) -> Result<NotifyConfig, ConfigError> {
    let smtp = match get("SMTP_HOST") {
        None => None,
        Some(host) => {
            let security = match get("SMTP_SECURITY").as_deref().map(str::trim) {
                None | Some("starttls") => SmtpSecurity::Starttls,
                Some("tls") => SmtpSecurity::Tls,
                Some("off") => SmtpSecurity::Off,
                Some(other) => {
                    return Err(ConfigError {
                        name: "SMTP_SECURITY",
                        reason: format!("{other:?} is not starttls, tls or off"),
                    });
                }
            };
            let default_port = match security {
                SmtpSecurity::Starttls => 587,
                SmtpSecurity::Tls => 465,
                SmtpSecurity::Off => 25,
            };
            let from = get("SMTP_FROM").ok_or(ConfigError {
                name: "SMTP_FROM",
                reason: "is needed with SMTP_HOST (the sender address of the mails)".into(),
            })?;
            let password = get("SMTP_PASSWORD").map(Secret::new);
            let loopback = matches!(host.trim(), "localhost" | "127.0.0.1" | "::1");
            if security == SmtpSecurity::Off && password.is_some() && !loopback {
                return Err(ConfigError {
                    name: "SMTP_SECURITY",
                    reason: "off would send SMTP_PASSWORD in clear: use starttls or tls (off only \
                             for a relay on this machine)"
                        .into(),
                });
            }
            Some(SmtpConfig {
                host: host.trim().to_owned(),
                port: parse(get, "SMTP_PORT", default_port)?,
                security,
                username: get("SMTP_USERNAME"),
                password,
                from,
            })
        }
    };
    Ok(NotifyConfig {
        interval: Duration::from_millis(parse(get, "NOTIFY_INTERVAL_MS", 1_000u64)?.max(50)),
        timeout: Duration::from_millis(parse(get, "NOTIFY_TIMEOUT_MS", 10_000u64)?.max(100)),
        retry_base_ms: parse(get, "NOTIFY_RETRY_MS", 30_000i64)?.max(10),
        max_attempts: parse(get, "NOTIFY_MAX_ATTEMPTS", 8u32)?.clamp(1, 30),
        warning_min_ms: parse(get, "NOTIFY_WARNING_AFTER_MS", 300_000i64)?.max(0),
        concurrency: parse(get, "NOTIFY_CONCURRENCY", 8usize)?.clamp(1, 64),
        smtp,
    })
}

/// Session lifetimes and sign-in limits.
#[derive(Clone, Copy, Debug)]
pub struct AccountSettings {
    /// A session unused this long ends.
    pub session_idle_ms: i64,
    /// A session ends this long after sign-in, used or not.
    pub session_max_ms: i64,
    /// Window of the sign-in throttle.
    pub login_window_ms: i64,
}

impl Default for AccountSettings {
    fn default() -> Self {
        Self {
            session_idle_ms: 30 * 60_000,
            session_max_ms: 12 * 3_600_000,
            login_window_ms: 15 * 60_000,
        }
    }
}

/// What one client may ask of the server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Reports one VM credential may send per minute, sustained (`REPORT_RATE_PER_MINUTE`)…
    pub report_rate_per_minute: u32,
    /// …and at once, e.g. replaying its spool (`REPORT_BURST`).
    pub report_burst: u32,
    /// Reports with an enrolment token (not a VM credential) one address may send per
    /// minute, sustained and at once (`ENROLMENT_RATE_PER_MINUTE`): made-up bearers and
    /// the fleet token cannot flood the writer or create VMs without end.
    pub enrolment_rate_per_minute: u32,
    /// Longest a request may take before it is answered 408 (`REQUEST_TIMEOUT_SECONDS`).
    pub request_timeout: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The host name (and port) the server is reached by (`PUBLIC_URL`): requests naming
    /// another host are refused, against DNS rebinding. `None`: any host.
    pub public_host: Option<String>,
    /// `PUBLIC_URL` is https (a TLS proxy in front): cookies are Secure.
    pub public_https: bool,
}

fn limits(get: &impl Fn(&str) -> Option<String>) -> Result<Limits, ConfigError> {
    let positive = |name: &'static str, default: u32| -> Result<u32, ConfigError> {
        let value: u32 = parse(get, name, default)?;
        if value == 0 {
            return Err(ConfigError {
                name,
                reason: "must be at least 1".into(),
            });
        }
        Ok(value)
    };
    let trusted_proxies = match get("TRUSTED_PROXIES") {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|ip| {
                ip.parse()
                    .map_err(|_err: std::net::AddrParseError| ConfigError {
                        name: "TRUSTED_PROXIES",
                        reason: format!("{ip:?} is not an IP address"),
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let public_host = match get("PUBLIC_URL") {
        None => None,
        Some(url) => Some(public_host(&url).ok_or(ConfigError {
            name: "PUBLIC_URL",
            reason: format!("{url:?} is not an http:// or https:// URL with a host"),
        })?),
    };
    Ok(Limits {
        report_rate_per_minute: positive("REPORT_RATE_PER_MINUTE", 120)?,
        report_burst: positive("REPORT_BURST", 120)?,
        enrolment_rate_per_minute: positive("ENROLMENT_RATE_PER_MINUTE", 600)?,
        request_timeout: Duration::from_secs(u64::from(positive("REQUEST_TIMEOUT_SECONDS", 60)?)),
        trusted_proxies,
        public_host,
        public_https: get("PUBLIC_URL").is_some_and(|url| url.starts_with("https://")),
    })
}

/// `host[:port]` of an http(s) URL, lower-cased.
fn public_host(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let authority = rest.split('/').next()?.rsplit('@').next()?;
    (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
}

fn account_settings(get: &impl Fn(&str) -> Option<String>) -> Result<AccountSettings, ConfigError> {
    let defaults = AccountSettings::default();
    let minutes = |name: &'static str, default_ms: i64| -> Result<i64, ConfigError> {
        let value: i64 = parse(get, name, default_ms / 60_000)?;
        if value < 1 {
            return Err(ConfigError {
                name,
                reason: "must be at least 1".into(),
            });
        }
        Ok(value.saturating_mul(60_000))
    };
    Ok(AccountSettings {
        session_idle_ms: minutes("SESSION_IDLE_MINUTES", defaults.session_idle_ms)?,
        session_max_ms: minutes("SESSION_MAX_MINUTES", defaults.session_max_ms)?,
        login_window_ms: parse(get, "LOGIN_THROTTLE_WINDOW_MS", defaults.login_window_ms)?.max(1),
    })
}

fn parse_bool(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
        Some(v) => Err(ConfigError {
            name,
            reason: format!("{v:?} is not true or false"),
        }),
    }
}

/// `TLS` (auto, files or off; default auto) with `TLS_CERT_FILE` and `TLS_KEY_FILE`: auto
/// serves the given files when both are set and a generated certificate when neither is.
fn tls_mode(get: &impl Fn(&str) -> Option<String>) -> Result<TlsMode, ConfigError> {
    let cert = get("TLS_CERT_FILE").map(PathBuf::from);
    let key = get("TLS_KEY_FILE").map(PathBuf::from);
    let requested = get("TLS").map(|v| v.trim().to_ascii_lowercase());
    match (requested.as_deref(), cert, key) {
        (None | Some("auto" | "files"), Some(cert), Some(key)) => Ok(TlsMode::Files { cert, key }),
        (None | Some("auto"), None, None) => Ok(TlsMode::Generated),
        (None | Some("auto" | "files"), Some(_), None) => Err(ConfigError {
            name: "TLS_KEY_FILE",
            reason: "required when TLS_CERT_FILE is set".into(),
        }),
        (None | Some("auto" | "files"), None, Some(_)) => Err(ConfigError {
            name: "TLS_CERT_FILE",
            reason: "required when TLS_KEY_FILE is set".into(),
        }),
        (Some("files"), None, None) => Err(ConfigError {
            name: "TLS_CERT_FILE",
            reason: "TLS=files needs TLS_CERT_FILE and TLS_KEY_FILE".into(),
        }),
        (Some("off"), None, None) => Ok(TlsMode::Off),
        // Serving plain HTTP while a certificate is configured would be a silent downgrade.
        (Some("off"), _, _) => Err(ConfigError {
            name: "TLS",
            reason: "is off, but TLS_CERT_FILE or TLS_KEY_FILE is set; unset them for plain \
                     HTTP"
                .into(),
        }),
        (Some(other), _, _) => Err(ConfigError {
            name: "TLS",
            reason: format!("{other:?} is not auto, files or off"),
        }),
    }
}

/// `TLS_SUBJECT_NAMES`: comma-separated DNS names or IP addresses.
fn tls_subject_names(get: &impl Fn(&str) -> Option<String>) -> Result<Vec<String>, ConfigError> {
    let mut names: Vec<String> = Vec::new();
    for name in get("TLS_SUBJECT_NAMES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let is_ip = name.parse::<std::net::IpAddr>().is_ok();
        let is_dns = name.len() <= 253
            && name.split('.').enumerate().all(|(i, label)| {
                (i == 0 && label == "*")
                    || (!label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            });
        if !is_ip && !is_dns {
            return Err(ConfigError {
                name: "TLS_SUBJECT_NAMES",
                reason: format!("{name:?} is neither a DNS name nor an IP address"),
            });
        }
        let name = name.to_ascii_lowercase();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

fn proxmox_settings(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<PveSettings>, ConfigError> {
    let Some(host) = get("PROXMOX_HOST") else {
        return Ok(None);
    };
    if !(host.starts_with("https://") || host.starts_with("http://")) {
        return Err(ConfigError {
            name: "PROXMOX_HOST",
            reason: "must be a URL such as https://pve1:8006".into(),
        });
    }
    let required = |name: &'static str| {
        get(name).ok_or(ConfigError {
            name,
            reason: "required when PROXMOX_HOST is set".into(),
        })
    };
    let user = required("PROXMOX_USER")?;
    let token_id = required("PROXMOX_TOKEN")?;
    let secret = Secret::new(required("PROXMOX_SECRET")?);
    let trust = if let Some(fp) = get("PROXMOX_FINGERPRINT") {
        TlsTrust::Fingerprint(proxmox::tls::parse_fingerprint(&fp).ok_or(ConfigError {
            name: "PROXMOX_FINGERPRINT",
            reason: "must be the SHA-256 fingerprint, 32 bytes in hex (AA:BB:...)".into(),
        })?)
    } else if let Some(ca) = get("PROXMOX_CA_FILE") {
        TlsTrust::CaFile(PathBuf::from(ca))
    } else if parse_bool(get, "PROXMOX_TLS_INSECURE", false)? {
        TlsTrust::Insecure
    } else {
        TlsTrust::System
    };
    // The API token travels in a header: over plain HTTP anyone on the path reads it.
    if host.starts_with("http://") && !parse_bool(get, "PROXMOX_TLS_INSECURE", false)? {
        return Err(ConfigError {
            name: "PROXMOX_HOST",
            reason: "is plain http://, which would send the API token in clear; use \
                     https:// (PROXMOX_TLS_INSECURE=true allows it for a test setup)"
                .into(),
        });
    }
    Ok(Some(PveSettings {
        host,
        user,
        token_id,
        secret,
        trust,
        timeout: Duration::from_millis(parse(get, "PROXMOX_TIMEOUT_MS", 15_000u64)?.max(100)),
    }))
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

    #[test]
    fn database_urls_are_shown_without_passwords() {
        assert_eq!(
            redact_url("postgres://u:p@db:5432/x?sslmode=require"),
            "postgres://***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/x?password=pw&sslpassword=k&application_name=a"),
            "postgres://db/x?password=***&sslpassword=***&application_name=a"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
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
    fn mail_settings_never_send_a_password_in_clear() {
        let smtp = |host: &str, security: &str| {
            config(&[
                ("SMTP_HOST", host),
                ("SMTP_SECURITY", security),
                ("SMTP_USERNAME", "monitor"),
                ("SMTP_PASSWORD", "hunter2"),
                ("SMTP_FROM", "monitor@example.org"),
            ])
        };
        assert_eq!(
            smtp("mail.example.org", "off").err().unwrap().name,
            "SMTP_SECURITY"
        );
        assert!(smtp("127.0.0.1", "off").is_ok());
        let cfg = smtp("mail.example.org", "starttls").unwrap();
        let mail = cfg.notify.smtp.unwrap();
        assert_eq!((mail.port, mail.security), (587, SmtpSecurity::Starttls));
        assert_eq!(
            smtp("mail.example.org", "tls")
                .unwrap()
                .notify
                .smtp
                .unwrap()
                .port,
            465
        );
        assert_eq!(
            smtp("mail.example.org", "ssl").err().unwrap().name,
            "SMTP_SECURITY"
        );
        let err = config(&[("SMTP_HOST", "mail.example.org")]).err().unwrap();
        assert_eq!(err.name, "SMTP_FROM");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = config(&[("CPU_THRESHOLD", "lots")]).err().unwrap();
        assert_eq!(err.name, "CPU_THRESHOLD");
        let err = config(&[("RAM_THRESHOLD", "120")]).err().unwrap();
        assert_eq!(err.name, "ram_threshold");
        let err = config(&[("SCHEDULER_INTERVAL_MS", "0")]).err().unwrap();
        assert_eq!(err.name, "SCHEDULER_INTERVAL_MS");
        let err = config(&[("RETENTION_RAW_DAYS", "60")]).err().unwrap();
        assert_eq!(err.name, "RETENTION_MINUTE_DAYS", "{err}");
        let err = config(&[("RETENTION_EVENTS_DAYS", "0")]).err().unwrap();
        assert_eq!(err.name, "RETENTION_EVENTS_DAYS", "{err}");
        let err = config(&[("INGEST_WRITE", "fast")]).err().unwrap();
        assert_eq!(err.name, "INGEST_WRITE", "{err}");
        assert!(config(&[]).unwrap().ingest_set_based);
        assert!(
            !config(&[("INGEST_WRITE", "per-vm")])
                .unwrap()
                .ingest_set_based
        );
    }

    /// Every variable this module reads is documented in `.env.example`.
    #[test]
    fn env_example_lists_every_variable() {
        let source = include_str!("config.rs");
        let example = include_str!("../../.env.example");
        let documented: Vec<&str> = example
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .collect();
        let mut checked = 0;
        for piece in source.split('"').skip(1).step_by(2) {
            let is_var = piece.len() > 3
                && piece.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                && piece.contains('_');
            if is_var {
                checked += 1;
                assert!(
                    documented.contains(&piece),
                    "{piece} is missing from .env.example"
                );
            }
        }
        assert!(checked > 30, "only {checked} variables found");
    }

    #[test]
    fn proxmox_settings_are_checked() {
        assert!(config(&[]).unwrap().proxmox.is_none());
        let err = config(&[("PROXMOX_HOST", "https://pve1:8006")])
            .err()
            .unwrap();
        assert_eq!(err.name, "PROXMOX_USER");
        let full = [
            ("PROXMOX_HOST", "https://pve1:8006"),
            ("PROXMOX_USER", "root@pam"),
            ("PROXMOX_TOKEN", "monitor"),
            ("PROXMOX_SECRET", "s3cret"),
        ];
        let cfg = config(&full).unwrap();
        assert_eq!(cfg.proxmox.as_ref().unwrap().trust, TlsTrust::System);
        let mut plain = full.to_vec();
        plain.push(("PROXMOX_HOST", "http://pve1:8006"));
        let err = config(&plain).err().unwrap();
        assert_eq!(err.name, "PROXMOX_HOST");
        assert!(err.reason.contains("in clear"), "{}", err.reason);
        plain.push(("PROXMOX_TLS_INSECURE", "true"));
        assert_eq!(
            config(&plain).unwrap().proxmox.unwrap().host,
            "http://pve1:8006"
        );
        let mut pinned = full.to_vec();
        pinned.push(("PROXMOX_FINGERPRINT", "nope"));
        assert_eq!(config(&pinned).err().unwrap().name, "PROXMOX_FINGERPRINT");
        assert_eq!(
            config(&[("AUTO_RESET_MODE", "yolo")]).err().unwrap().name,
            "AUTO_RESET_MODE"
        );
        assert_eq!(
            config(&[("AUTO_RESET_MODE", "shadow")])
                .unwrap()
                .remediation
                .mode,
            Mode::Shadow
        );
    }

    #[test]
    fn tls_is_generated_unless_files_are_given_or_it_is_off() {
        assert_eq!(config(&[]).unwrap().tls, TlsMode::Generated);
        assert_eq!(config(&[("TLS", "AUTO")]).unwrap().tls, TlsMode::Generated);
        assert_eq!(config(&[("TLS", "off")]).unwrap().tls, TlsMode::Off);
        let files = [
            ("TLS_CERT_FILE", "/etc/c.pem"),
            ("TLS_KEY_FILE", "/etc/k.pem"),
        ];
        let expected = TlsMode::Files {
            cert: "/etc/c.pem".into(),
            key: "/etc/k.pem".into(),
        };
        assert_eq!(config(&files).unwrap().tls, expected);
        let mut explicit = files.to_vec();
        explicit.push(("TLS", "files"));
        assert_eq!(config(&explicit).unwrap().tls, expected);
        assert_eq!(
            config(&[("TLS_CERT_FILE", "/etc/c.pem")])
                .err()
                .unwrap()
                .name,
            "TLS_KEY_FILE"
        );
        assert_eq!(
            config(&[("TLS_KEY_FILE", "/etc/k.pem")])
                .err()
                .unwrap()
                .name,
            "TLS_CERT_FILE"
        );
        assert_eq!(
            config(&[("TLS", "files")]).err().unwrap().name,
            "TLS_CERT_FILE"
        );
        let mut off_with_files = files.to_vec();
        off_with_files.push(("TLS", "off"));
        assert_eq!(config(&off_with_files).err().unwrap().name, "TLS");
        assert_eq!(config(&[("TLS", "maybe")]).err().unwrap().name, "TLS");
    }

    #[test]
    fn tls_subject_names_are_checked_and_deduplicated() {
        let cfg = config(&[(
            "TLS_SUBJECT_NAMES",
            " Monitor.example.org, 10.0.0.5,,fe80::1 ,monitor.example.org,*.lab.example",
        )])
        .unwrap();
        assert_eq!(
            cfg.tls_subject_names,
            vec![
                "monitor.example.org",
                "10.0.0.5",
                "fe80::1",
                "*.lab.example"
            ]
        );
        for bad in [
            "has space",
            "-lead.example",
            "a..b",
            "x.*.example",
            "ünï.example",
        ] {
            assert_eq!(
                config(&[("TLS_SUBJECT_NAMES", bad)]).err().unwrap().name,
                "TLS_SUBJECT_NAMES",
                "{bad}"
            );
        }
        assert!(config(&[]).unwrap().tls_subject_names.is_empty());
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
