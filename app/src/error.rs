//! The one error type every server function returns to the browser.

use leptos::server_fn::error::{FromServerFnError, ServerFnErrorErr};
use serde::{Deserialize, Serialize};

/// What a server function may tell the browser; never carries internal detail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum AppError {
    #[error("storage is unavailable, try again shortly")]
    Unavailable,
    #[error("not found")]
    NotFound,
    #[error("sign in first")]
    Unauthorized,
    #[error("your role does not allow this")]
    Forbidden,
    /// The request was understood and refused; the reason is for the operator.
    #[error("{0}")]
    Refused(String),
    #[error("request failed: {0}")]
    Transport(String),
}

impl FromServerFnError for AppError {
    type Encoder = crate::codec::JsonTextEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        AppError::Transport(value.to_string())
    }
}
