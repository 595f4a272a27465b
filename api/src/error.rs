use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec the planner or a check rejects; `field` is its path in the manifest.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Manifest { path: PathBuf, message: String },
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
