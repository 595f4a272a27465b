//! Loading a model part for a role or a command: the `--model`/`--tokenizer` arguments, and
//! weights loaded with progress on a terminal.

use std::io::{IsTerminal, Write};

use clap::Args;

use crate::error::Result;
use crate::model::{LoadProgress, Model};
use crate::source::ModelArg;
use crate::weights::{ShardSpec, WeightSource};

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A checkpoint folder, or synthetic:PRESET[:SEED].
    #[arg(long, env = "MOE_MODEL")]
    pub model: ModelArg,

    /// Tokenizer override: a tokenizer.json path, or cl100k_base.
    #[arg(long)]
    pub tokenizer: Option<String>,
}

/// Loads a whole model, showing progress on a terminal for large ones.
pub fn load_full(src: &dyn WeightSource) -> Result<Model> {
    let spec = ShardSpec::full(src.config());
    load_with_progress(src, spec)
}

pub fn load_with_progress(src: &dyn WeightSource, spec: ShardSpec) -> Result<Model> {
    let show = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut last = 0.0f64;
    let mut shown = false;
    let mut progress = |p: LoadProgress| {
        let elapsed = started.elapsed().as_secs_f64();
        let big = p.bytes_total > 256 << 20;
        if show && big && (elapsed - last > 0.2 || p.tensors_done == p.tensors_total) {
            last = elapsed;
            shown = true;
            eprint!(
                "\rloading weights: {:>5}/{} tensors, {:>7.1}/{:.1} MB",
                p.tensors_done,
                p.tensors_total,
                p.bytes_done as f64 / 1e6,
                p.bytes_total as f64 / 1e6
            );
            let _ = std::io::stderr().flush();
        }
    };
    let model = Model::load(src, spec, &mut progress);
    if shown {
        eprintln!();
    }
    let model = model?;
    tracing::info!(source = %src.describe(), secs = started.elapsed().as_secs_f64(), "weights loaded");
    Ok(model)
}
