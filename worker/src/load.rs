//! Loading a model part for a role or a command: the `--model`/`--tokenizer` arguments, and
//! weights loaded with progress on a terminal.

use std::io::{IsTerminal, Write};

use clap::Args;

use crate::error::Result;
use crate::model::{LoadProgress, Model};
use crate::source::ModelArg;
use crate::weights::{DtypeChoice, Precision, ShardSpec, WeightSource};

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A checkpoint folder, or synthetic:PRESET[:SEED].
    #[arg(long, env = "MOE_MODEL")]
    pub model: ModelArg,

    /// Tokenizer override: a tokenizer.json path, or cl100k_base.
    #[arg(long)]
    pub tokenizer: Option<String>,

    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// The formats weights are kept in (activations and sums are f32 either way).
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct PrecisionArgs {
    /// Attention, router, dense-MLP, embedding and head matrices: auto (as stored: f32
    /// stays f32, bf16 stays bf16), f32, bf16 or q8 (8-bit blocks of 32 with a scale).
    #[arg(long, env = "MOE_WEIGHT_DTYPE", default_value_t = DtypeChoice::Auto)]
    pub weight_dtype: DtypeChoice,

    /// Routed experts: auto (as --weight-dtype), f32, bf16 or q8.
    #[arg(long, env = "MOE_EXPERT_DTYPE", default_value_t = DtypeChoice::Auto)]
    pub expert_dtype: DtypeChoice,
}

impl From<Precision> for PrecisionArgs {
    fn from(p: Precision) -> Self {
        Self {
            weight_dtype: p.weights,
            expert_dtype: p.experts,
        }
    }
}

impl PrecisionArgs {
    pub fn precision(&self) -> Precision {
        Precision {
            weights: self.weight_dtype,
            experts: self.expert_dtype,
        }
    }

    /// The same options as command-line arguments (for child processes).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--weight-dtype={}", self.weight_dtype),
            format!("--expert-dtype={}", self.expert_dtype),
        ]
    }
}

/// Loads a whole model, showing progress on a terminal for large ones.
pub fn load_full(src: &dyn WeightSource, precision: Precision) -> Result<Model> {
    let spec = ShardSpec::full(src.config());
    load_with_progress(src, spec, precision)
}

pub fn load_with_progress(
    src: &dyn WeightSource,
    spec: ShardSpec,
    precision: Precision,
) -> Result<Model> {
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
    let model = Model::load_with(src, spec, precision, &mut progress);
    if shown {
        eprintln!();
    }
    let model = model?;
    tracing::info!(
        source = %src.describe(),
        secs = started.elapsed().as_secs_f64(),
        formats = ?model.bytes_by_dtype(),
        "weights loaded"
    );
    Ok(model)
}
