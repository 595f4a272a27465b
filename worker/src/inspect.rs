//! `moe-worker inspect`: what a checkpoint folder's `config.json` says about the deployment.
//! The operator runs it in a short Job against the model's volume (it never mounts volumes
//! itself) and reads the result from the container's termination message.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Kubernetes keeps at most this much of a termination message.
const TERMINATION_MESSAGE_MAX: usize = 4096;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint folder (config.json and safetensors weights).
    #[arg(long)]
    pub model: PathBuf,

    /// Also write the result, or the error, to this file (a container's
    /// terminationMessagePath).
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
}

/// `{"architecture": {...}, "modelType": ..., "dtype": ...}`: `spec.model.architecture` as
/// the checkpoint defines it, once the engine has checked that it can serve it.
pub fn inspect(dir: &Path) -> Result<Value> {
    // The engine's own reading: a family it serves, a consistent config, weights present.
    let ckpt = moe_engine::weights::Checkpoint::open(dir)?;
    ckpt.check_files()?;
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config("config.json", format!("invalid JSON: {e}")))?;
    let arch = moe_api::checkpoint::architecture(&cfg)
        .map_err(|e| Error::config("config.json", e.to_string()))?;
    use moe_engine::weights::WeightSource;
    Ok(json!({
        "architecture": arch,
        "modelType": ckpt.config().family().model_type(),
        "dtype": ckpt.config().dtype.hf_name(),
    }))
}

pub fn run(args: InspectArgs) -> Result<()> {
    let result = inspect(&args.model);
    if let Some(log) = &args.termination_log {
        let mut text = match &result {
            Ok(v) => v.to_string(),
            Err(e) => format!("{}: {e}", args.model.display()),
        };
        if text.len() > TERMINATION_MESSAGE_MAX {
            let mut cut = TERMINATION_MESSAGE_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        std::fs::write(log, text).map_err(|e| Error::io(log, e))?;
    }
    println!("{}", result?);
    Ok(())
}
