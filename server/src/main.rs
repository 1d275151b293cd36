//! Entry point: with no command, load configuration, set up logging and run the server until
//! a signal; with one, run it from the admin command line (`server::cli`).

use server::config::Config;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Rendering a dashboard page polls one deeply nested future; 16 MiB per worker (address
/// space, not memory, until used) leaves room for it in any build, as the tests run it
/// (`.cargo/config.toml`).
const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if !args.is_empty() {
        return server::cli::run(args);
    }
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:?}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()?;
    runtime.block_on(run())
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
