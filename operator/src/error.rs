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
    #[error("{0}")]
    Run(String),
    #[error("encoding {what}: {message}")]
    Encode { what: &'static str, message: String },
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

impl From<moe_api::Error> for Error {
    fn from(e: moe_api::Error) -> Self {
        match e {
            moe_api::Error::Invalid { field, message } => Self::Invalid { field, message },
            moe_api::Error::Read { path, source } => Self::Read { path, source },
            moe_api::Error::Manifest { path, message } => Self::Manifest { path, message },
        }
    }
}
