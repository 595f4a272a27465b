//! OCI images without a container engine: deterministic layers ([`layer`]), the image config,
//! manifest and index ([`image`]), written as an OCI image layout folder. The same bytes in
//! give the same digests out, so an image built twice from one commit has one digest.

pub mod image;
pub mod layer;
pub mod registry;
pub mod unpack;

pub use image::{Image, ImageConfig, Layout};
pub use layer::{Layer, LayerBuilder};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// `sha256:<hex>` of `bytes`: how OCI names content.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn digests_are_sha256_in_hex() {
        assert_eq!(
            super::digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
