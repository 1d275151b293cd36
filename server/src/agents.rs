//! Serves the agent scripts and installers, compiled into the binary so any server can hand
//! them out (`curl -fsSL http://SERVER:3000/agents/install.sh | sudo bash -s -- ...`).

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const FILES: &[(&str, &str, &str)] = &[
    (
        "install.sh",
        include_str!("../../agents/install.sh"),
        "text/x-shellscript; charset=utf-8",
    ),
    (
        "linux-agent.sh",
        include_str!("../../agents/linux-agent.sh"),
        "text/x-shellscript; charset=utf-8",
    ),
    (
        "windows-agent.ps1",
        include_str!("../../agents/windows-agent.ps1"),
        "text/plain; charset=utf-8",
    ),
    (
        "install-windows.ps1",
        include_str!("../../agents/install-windows.ps1"),
        "text/plain; charset=utf-8",
    ),
    (
        "README.md",
        include_str!("../../agents/README.md"),
        "text/markdown; charset=utf-8",
    ),
];

/// SHA-256 (hex) of the Linux agent this server hands out: the install line carries it and
/// `install.sh --sha256` refuses any other script.
pub fn linux_agent_sha256() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::auth::hash_token(include_str!("../../agents/linux-agent.sh")))
}

/// SHA-256 (hex) of the Windows agent this server hands out, for `install-windows.ps1 -Sha256`.
pub fn windows_agent_sha256() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::auth::hash_token(include_str!("../../agents/windows-agent.ps1")))
}

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/agents/{file}", get(agent_file))
}

async fn agent_file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, body, content_type)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such agent file").into_response(),
    }
}
