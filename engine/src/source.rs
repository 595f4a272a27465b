//! `--model` arguments: a checkpoint folder, or `synthetic:PRESET[:SEED]`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::synthetic;
use crate::tokenizer::Tokenizer;
use crate::weights::{Checkpoint, WeightSource};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelArg {
    Dir(PathBuf),
    Synthetic { preset: String, seed: u64 },
}

impl std::str::FromStr for ModelArg {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("synthetic:") {
            Some(rest) => {
                let (preset, seed) = match rest.split_once(':') {
                    Some((p, seed)) => (
                        p,
                        seed.parse().map_err(|_| {
                            Error::invalid("model", format!("seed `{seed}` is not an integer"))
                        })?,
                    ),
                    None => (rest, 0),
                };
                synthetic::preset(preset)?;
                Ok(Self::Synthetic {
                    preset: preset.to_string(),
                    seed,
                })
            }
            None if s.is_empty() => Err(Error::invalid(
                "model",
                "empty (expected a folder or synthetic:PRESET)",
            )),
            None => Ok(Self::Dir(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for ModelArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => write!(f, "{}", d.display()),
            Self::Synthetic { preset, seed } => write!(f, "synthetic:{preset}:{seed}"),
        }
    }
}

impl ModelArg {
    /// Opens the weights (nothing is read until a part loads its tensors).
    pub fn open(&self) -> Result<Arc<dyn WeightSource>> {
        Ok(match self {
            Self::Dir(d) => Arc::new(Checkpoint::open(d)?),
            Self::Synthetic { preset, seed } => {
                Arc::new(synthetic::preset(preset)?.synthetic(*seed))
            }
        })
    }

    /// The model's tokenizer, unless `override_arg` (`cl100k_base` or a tokenizer.json) is given.
    pub fn tokenizer(&self, override_arg: Option<&str>) -> Result<Tokenizer> {
        if let Some(t) = override_arg {
            return Tokenizer::from_arg(t);
        }
        match self {
            Self::Dir(d) => Tokenizer::for_checkpoint(d),
            Self::Synthetic { preset, .. } => {
                Tokenizer::of_kind(synthetic::preset(preset)?.tokenizer)
            }
        }
    }

    /// The checkpoint's chat template, if it has one (synthetic models use the gateway's
    /// built-in template).
    pub fn chat_template(&self) -> Result<Option<crate::chat::ChatTemplate>> {
        match self {
            Self::Dir(d) => crate::chat::ChatTemplate::for_checkpoint(d),
            Self::Synthetic { .. } => Ok(None),
        }
    }
}
