//! Entry point: load configuration, set up logging, run the server until a signal; or,
//! with `healthcheck`, ask the running server on this machine whether it is healthy.

use server::config::{Config, TlsMode};
use tracing_subscriber::EnvFilter;

/// Rendering a dashboard page polls one deeply nested future; 16 MiB per worker (address
/// space, not memory, until used) leaves room for it in any build, as the tests run it
/// (`.cargo/config.toml`).
const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

const USAGE: &str = "usage: vm-healthcheck [healthcheck]
  (no command)  run the server (settings from the environment and .env; see .env.example)
  healthcheck   exit 0 when the server on this machine answers /api/health with 200";

fn main() -> anyhow::Result<()> {
    let command = std::env::args().nth(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()?;
    match command.as_deref() {
        None => runtime.block_on(run()),
        Some("healthcheck") => runtime.block_on(healthcheck()),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// For container and service-manager health checks: the server on this machine, at the
/// address it listens on. The certificate is not checked (it is this machine's own server,
/// often self-signed); nothing secret is sent.
async fn healthcheck() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let scheme = match config.tls {
        TlsMode::Off => "http",
        TlsMode::Generated | TlsMode::Files { .. } => "https",
    };
    // The listening address itself, or loopback when the server listens on every address.
    let ip = config.listen_addr.ip();
    let target = if ip.is_unspecified() {
        std::net::SocketAddr::new(
            if ip.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            config.listen_addr.port(),
        )
    } else {
        config.listen_addr
    };
    let url = format!("{scheme}://{target}/api/health");
    let answer = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await?;
    anyhow::ensure!(
        answer.status().is_success(),
        "{url} answered {}",
        answer.status()
    );
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn,leptos=warn"));
    if config.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    tracing::info!(config = ?config, "starting");
    let server = server::start(config).await?;
    server.wait().await;
    tracing::info!("stopped");
    Ok(())
}
