//! One error type for the engine; every variant names the file, tensor or field at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}config field `{field}`: {message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Config {
        file: Option<PathBuf>,
        field: String,
        message: String,
    },

    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },

    /// Another process of the deployment failed or could not be reached.
    #[error("{peer}: {message}")]
    Peer { peer: String, message: String },

    /// The request ran out of time.
    #[error("deadline exceeded: {0}")]
    Deadline(String),

    /// The deployment is at capacity right now; the same request may succeed later.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// A fault inside the deployment that is not the caller's (e.g. a peer refused what this
    /// process sent it).
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn config(field: &str, message: impl Into<String>) -> Self {
        Self::Config {
            file: None,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn tensor(name: &str, message: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.to_string(),
            message: message.into(),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn peer(peer: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Peer {
            peer: peer.into(),
            message: message.into(),
        }
    }

    /// Attaches the file a config error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Config { field, message, .. } => Self::Config {
                file: Some(path.to_path_buf()),
                field,
                message,
            },
            other => other,
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Config { .. } => "config",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Tensor { .. } => "tensor",
            Self::Tokenizer(_) => "tokenizer",
            Self::InvalidInput { .. } => "invalid_input",
            Self::Peer { .. } => "peer",
            Self::Deadline(_) => "deadline",
            Self::Overloaded(_) => "overloaded",
            Self::Internal(_) => "internal",
        }
    }

    /// The same error again, for each of several requests a failed step served (only the
    /// serving variants keep their kind; the rest become peer errors).
    pub fn for_each_request(&self) -> Self {
        match self {
            Self::Deadline(m) => Self::Deadline(m.clone()),
            Self::InvalidInput { field, message } => Self::invalid(field, message.clone()),
            Self::Overloaded(m) => Self::Overloaded(m.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
            Self::Peer { peer, message } => Self::peer(peer.clone(), message.clone()),
            other => Self::peer("pipeline", other.to_string()),
        }
    }
}
