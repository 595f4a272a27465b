//! The `MoEDeployment` resource, the plan made from it (the same `moe-plan` code the data plane
//! runs), and the worker processes that plan runs. The operator turns them into Kubernetes
//! objects; `moe-worker local -f` starts the same processes on one machine.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod crd;
pub mod error;
pub mod planning;
pub mod workers;

pub use crd::MoEDeployment;
pub use error::{Error, Result};

use std::path::Path;

/// The `MoEDeployment` in a YAML file. A file of several documents (`---`) may hold other
/// objects next to it, as files given to `kubectl apply` do; exactly one must be a
/// `MoEDeployment`.
pub fn read_manifest(path: &Path) -> Result<MoEDeployment> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_manifest(&text).map_err(|message| Error::Manifest {
        path: path.to_owned(),
        message,
    })
}

/// The `MoEDeployment` of `path`: a manifest file ([`read_manifest`]), or a checkpoint folder
/// ([`checkpoint::deployment`]: its `config.json`, default parallelism).
pub fn read_deployment(path: &Path) -> Result<MoEDeployment> {
    if path.is_dir() {
        checkpoint::deployment(path)
    } else {
        read_manifest(path)
    }
}

/// [`read_manifest`] on text; the error says what is wrong without the path.
pub fn parse_manifest(text: &str) -> std::result::Result<MoEDeployment, String> {
    use serde::Deserialize;
    let mut found = Vec::new();
    let mut kinds = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        if kind == "MoEDeployment" {
            found.push((i, value));
        } else {
            kinds.push(if kind.is_empty() {
                "(no kind)".to_string()
            } else {
                kind
            });
        }
    }
    let (i, value) = match found.len() {
        1 => found.remove(0),
        0 if kinds.is_empty() => return Err("no document in the file".into()),
        0 => {
            return Err(format!(
                "no MoEDeployment in the file (found {})",
                kinds.join(", ")
            ));
        }
        n => return Err(format!("{n} MoEDeployments in the file; give one")),
    };
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if api_version != "serving.moe.dev/v1alpha1" {
        return Err(format!(
            "document {}: apiVersion `{api_version}` is not serving.moe.dev/v1alpha1",
            i + 1
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("document {}: {}", i + 1, e.inner())
        } else {
            format!("document {}: {path}: {}", i + 1, e.inner())
        }
    })
}
