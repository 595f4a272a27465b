#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec the planner or a check rejects (`Invalid`, naming the field), or a manifest or
    /// checkpoint that cannot be read.
    #[error(transparent)]
    Api(#[from] moe_api::Error),
    #[error("{0}")]
    Run(String),
    #[error("encoding {what}: {message}")]
    Encode { what: &'static str, message: String },
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Api(moe_api::Error::invalid(field, message))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
