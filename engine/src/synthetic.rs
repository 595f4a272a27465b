//! Deterministic synthetic weights: every tensor is a pure function of (seed, name), so any
//! shard of a huge-shaped model builds exactly its part with no download and no
//! coordination, and two processes that own the same tensor hold identical values.

use std::path::Path;

use rayon::prelude::*;

use crate::config::{Arch, DType, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::TokenizerKind;
use crate::weights::{Weight, WeightSource, names};

/// A named model shape with its tokenizer.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub config: ModelConfig,
    pub tokenizer: TokenizerKind,
    /// Routers favour experts `0..hot_experts` in every layer (0: no skew). See [`Synthetic`].
    pub hot_experts: usize,
}

impl Preset {
    /// The preset's weights with `seed`.
    pub fn synthetic(&self, seed: u64) -> Synthetic {
        Synthetic {
            config: self.config.clone(),
            seed,
            hot_experts: self.hot_experts,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn shape(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    experts: usize,
    top_k: usize,
    max_pos: usize,
) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        num_local_experts: experts,
        num_experts_per_tok: top_k,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        max_position_embeddings: max_pos,
        sliding_window: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: DType::F32,
        arch: Arch::mixtral(hidden / heads, inter),
    }
}

/// Vocabulary of GPT-4's `cl100k_base` (100,256 ranks plus special tokens up to 100,276),
/// padded to a multiple of 128 as serving stacks do.
pub const CL100K_VOCAB: usize = 100_352;

/// The built-in presets.
pub fn presets() -> Vec<Preset> {
    let mut gpt4_mini = shape(CL100K_VOCAB, 128, 256, 120, 8, 2, 16, 2, 8192);
    // cl100k_base's <|endoftext|>; no BOS token.
    gpt4_mini.bos_token_id = None;
    gpt4_mini.eos_token_ids = vec![100_257];
    vec![
        Preset {
            name: "tiny",
            about: "4 layers, 8 experts, top-2, hidden 64: quick checks",
            config: shape(512, 64, 128, 4, 4, 2, 8, 2, 2048),
            tokenizer: TokenizerKind::ByteLevel,
            hot_experts: 0,
        },
        Preset {
            name: "tiny-hot",
            about: "tiny whose routers send most tokens to experts 0-3 (expert shard 0 of 2): autoscaling tests",
            config: shape(512, 64, 128, 4, 4, 2, 8, 2, 2048),
            tokenizer: TokenizerKind::ByteLevel,
            hot_experts: 4,
        },
        Preset {
            name: "mini",
            about: "8 layers, 8 experts, top-2, hidden 512, vocab 32000: the engine benchmark's small model",
            config: shape(32000, 512, 1408, 8, 8, 2, 8, 2, 32768),
            tokenizer: TokenizerKind::ByteLevel,
            hot_experts: 0,
        },
        Preset {
            name: "base",
            about: "8 layers, 8 experts, top-2, hidden 1024, vocab 32000: the engine benchmark's larger model",
            config: shape(32000, 1024, 2816, 8, 16, 4, 8, 2, 32768),
            tokenizer: TokenizerKind::ByteLevel,
            hot_experts: 0,
        },
        Preset {
            name: "gpt4-mini",
            about: "GPT-4's reported topology (120 layers, 16 experts, top-2, 8k context, cl100k_base) at hidden 128",
            config: gpt4_mini,
            tokenizer: TokenizerKind::Cl100kBase,
            hot_experts: 0,
        },
    ]
}

pub fn preset(name: &str) -> Result<Preset> {
    presets()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let known: Vec<_> = presets().iter().map(|p| p.name).collect();
            Error::invalid(
                "model",
                format!(
                    "unknown synthetic preset `{name}` (known: {})",
                    known.join(", ")
                ),
            )
        })
}

/// A synthetic model: config + seed. Tensors are generated on demand.
///
/// With `hot_experts > 0`, routing is skewed towards experts `0..hot_experts`: every token's
/// embedding carries a constant `HOT_OFFSET` in hidden dimension 0, which the residual stream
/// keeps, and every router row has `+HOT_ROUTER` in column 0 for a hot expert and `-HOT_ROUTER`
/// for the others, so that the normalised hidden state's large positive dimension 0 lifts the
/// hot experts' logits well above the cold ones. Which hot experts a token picks still varies.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub config: ModelConfig,
    pub seed: u64,
    pub hot_experts: usize,
}

/// See [`Synthetic`]: the embedding's constant in hidden dimension 0, and the router's weight
/// on it.
pub const HOT_OFFSET: f32 = 8.0;
pub const HOT_ROUTER: f32 = 0.5;

impl Synthetic {
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        Self {
            config,
            seed,
            hot_experts: 0,
        }
    }

    /// The routing skew's changes to a freshly drawn tensor.
    fn skew(&self, name: &str, shape: &[usize], out: &mut [f32]) {
        let cols = *shape.last().unwrap_or(&1);
        if self.hot_experts == 0 || shape.len() != 2 || cols == 0 {
            return;
        }
        if name == names::EMBED {
            for row in out.chunks_mut(cols) {
                row[0] = HOT_OFFSET;
            }
        } else if name.ends_with("block_sparse_moe.gate.weight") {
            for (e, row) in out.chunks_mut(cols).enumerate() {
                row[0] = if e < self.hot_experts {
                    HOT_ROUTER
                } else {
                    -HOT_ROUTER
                };
            }
        }
    }

    /// The tensor `name` with `shape`, as a pure function of (seed, name).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let len: usize = shape.iter().product();
        let key = splitmix64(self.seed ^ fnv1a(name.as_bytes()));
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        // Norm weights near 1; linear weights scaled so activations keep their size; the
        // router a little sharper so that routing varies between tokens.
        let (center, spread) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else if name.ends_with("embed_tokens.weight") {
            (0.0, 1.0)
        } else if name.ends_with("gate.weight") {
            (0.0, 2.0 * (3.0 / fan_in).sqrt())
        } else {
            (0.0, (3.0 / fan_in).sqrt())
        };
        let mut out = vec![0f32; len];
        out.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = (c as u64) << 16;
                for (i, v) in chunk.iter_mut().enumerate() {
                    let bits = splitmix64(
                        key.wrapping_add((base + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    );
                    // Uniform in [-1, 1) from the top 24 bits.
                    let u = (bits >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                    *v = center + spread * u;
                }
            });
        self.skew(name, shape, &mut out);
        out
    }
}

impl WeightSource for Synthetic {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        Ok(Weight::owned(self.tensor(name, shape), shape.to_vec()))
    }

    fn contains(&self, name: &str) -> bool {
        // A synthetic model always has its own LM head; everything else is requested by name.
        name != names::LM_HEAD || !self.config.tie_word_embeddings
    }

    fn describe(&self) -> String {
        format!("synthetic (seed {})", self.seed)
    }
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Every tensor name and shape of a full model, in hub layout.
pub fn all_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let spec = crate::weights::ShardSpec::full(cfg);
    let src = Synthetic::new(cfg.clone(), 0);
    crate::model::Model::tensor_plan(cfg, &spec, &src)
        .into_iter()
        .map(|r| (r.name, r.shape))
        .collect()
}

/// Writes a synthetic model as a Hugging Face checkpoint: `config.json`, safetensors
/// (sharded with an index past `shard_bytes`), and the tokenizer.
pub fn export(
    preset: &Preset,
    seed: u64,
    dir: &Path,
    shard_bytes: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    export_as(preset, seed, dir, shard_bytes, false, progress)
}

/// As [`export`], in bf16 (each weight rounded to nearest even) when `bf16` is set: the
/// format real checkpoints are published in.
pub fn export_as(
    preset: &Preset,
    seed: u64,
    dir: &Path,
    shard_bytes: u64,
    bf16: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let (elem, dtype) = if bf16 {
        (2u64, safetensors::Dtype::BF16)
    } else {
        (4u64, safetensors::Dtype::F32)
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = &preset.config;
    let synth = preset.synthetic(seed);
    let tensors = all_tensors(cfg);

    // Group tensors into shards of at most `shard_bytes` each.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let bytes = t.1.iter().product::<usize>() as u64 * elem;
        if current > 0 && current + bytes > shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let n = shards.len();
    let total: usize = shards.iter().map(Vec::len).sum();
    let mut done = 0;
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (si, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|(name, shape)| {
                let values = synth.tensor(name, shape);
                let bytes: Vec<u8> = if bf16 {
                    values
                        .iter()
                        .flat_map(|&v| crate::kernels::to_bf16(v).to_le_bytes())
                        .collect()
                } else {
                    values.iter().flat_map(|v| v.to_le_bytes()).collect()
                };
                done += 1;
                progress(done, total);
                (name.clone(), shape.clone(), bytes)
            })
            .collect();
        let views = data
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::tensor(name, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(&file_name);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| Error::checkpoint(&path, format!("writing safetensors: {e}")))?;
        for (name, shape, _) in &data {
            total_size += shape.iter().product::<usize>() as u64 * elem;
            weight_map.insert(name.clone(), serde_json::Value::from(file_name.clone()));
        }
    }
    if n > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    let mut config = cfg.to_hf_json();
    if let Some(obj) = config.as_object_mut() {
        obj.remove("torch_dtype");
        obj.insert(
            "dtype".into(),
            if bf16 { "bfloat16" } else { "float32" }.into(),
        );
    }
    if preset.tokenizer == TokenizerKind::Cl100kBase
        && let Some(obj) = config.as_object_mut()
    {
        obj.insert("moe_serve_tokenizer".into(), "cl100k_base".into());
    }
    write_json(&dir.join("config.json"), &config)?;
    crate::tokenizer::write_files(preset.tokenizer, cfg, dir)?;
    Ok(())
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_pure_functions_of_seed_and_name() {
        let cfg = preset("tiny").expect("tiny").config;
        let a = Synthetic::new(cfg.clone(), 7);
        let b = Synthetic::new(cfg, 7);
        let name = names::expert(3, 5, "w2");
        assert_eq!(a.tensor(&name, &[64, 128]), b.tensor(&name, &[64, 128]));
        assert_ne!(
            a.tensor(&name, &[64, 128]),
            a.tensor(&names::expert(3, 4, "w2"), &[64, 128])
        );
        let c = Synthetic::new(a.config.clone(), 8);
        assert_ne!(a.tensor(&name, &[64, 128]), c.tensor(&name, &[64, 128]));
        // Scale: uniform with variance 1/fan_in.
        let t = a.tensor(&name, &[64, 128]);
        let var = t.iter().map(|v| v * v).sum::<f32>() / t.len() as f32;
        assert!((var * 128.0 - 1.0).abs() < 0.1, "variance {var}");
    }

    #[test]
    fn presets_are_valid_and_gpt4_mini_has_gpt4_topology() {
        for p in presets() {
            p.config.validate().expect(p.name);
        }
        let g = preset("gpt4-mini").expect("preset").config;
        assert_eq!(
            (
                g.num_hidden_layers,
                g.num_local_experts,
                g.num_experts_per_tok
            ),
            (120, 16, 2)
        );
        assert_eq!(g.max_position_embeddings, 8192);
        assert!(preset("gpt5").is_err());
    }

    /// Share of routed picks that go to experts `0..4`, over every layer, for 64 prompt tokens.
    fn hot_share(preset_name: &str) -> (f64, [usize; 8]) {
        use crate::model::{
            Chunk, ExpertCompute, LocalExperts, Model, MoeScratch, Routing, Scratch,
        };
        use crate::weights::ShardSpec;

        struct Counting<'a> {
            inner: LocalExperts<'a>,
            picks: [usize; 8],
        }
        impl ExpertCompute for Counting<'_> {
            fn compute(
                &mut self,
                layer: usize,
                routing: &Routing,
                x: &[f32],
                out: &mut [f32],
            ) -> Result<()> {
                for &e in &routing.experts {
                    self.picks[e as usize] += 1;
                }
                self.inner.compute(layer, routing, x, out)
            }
        }

        let synth = preset(preset_name).expect("preset").synthetic(7);
        let cfg = synth.config.clone();
        let model = Model::load(&synth, ShardSpec::full(&cfg), &mut |_| {}).expect("load");
        let prompt: Vec<u32> = (0..64)
            .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
            .collect();
        let (mut hidden, mut s, mut moe) = (Vec::new(), Scratch::default(), MoeScratch::default());
        let mut cache = model.new_cache(prompt.len());
        model.embed(&prompt, &mut hidden).expect("embed");
        let mut counting = Counting {
            inner: LocalExperts {
                model: &model,
                scratch: &mut moe,
            },
            picks: [0; 8],
        };
        let chunk = Chunk {
            start: 0,
            len: prompt.len(),
        };
        model
            .forward_layers(
                &mut hidden,
                &[chunk],
                &mut [&mut cache],
                &mut counting,
                &mut s,
            )
            .expect("forward");
        let p = counting.picks;
        let hot: usize = p[..4].iter().sum();
        (hot as f64 / p.iter().sum::<usize>() as f64, p)
    }

    #[test]
    fn tiny_hot_routes_most_tokens_to_the_first_expert_shard() {
        let (share, picks) = hot_share("tiny-hot");
        assert!(
            share > 0.9,
            "experts 0-3 got {share:.2} of picks: {picks:?}"
        );
        // Spread over all four hot experts, not one.
        assert!(picks[..4].iter().all(|&n| n > 0), "{picks:?}");
        let (share, picks) = hot_share("tiny");
        assert!((0.25..0.75).contains(&share), "tiny: {share:.2}: {picks:?}");
        let hot = preset("tiny-hot").expect("preset").config;
        let tiny = preset("tiny").expect("preset").config;
        assert_eq!(
            (
                hot.num_hidden_layers,
                hot.num_local_experts,
                hot.hidden_size
            ),
            (
                tiny.num_hidden_layers,
                tiny.num_local_experts,
                tiny.hidden_size
            )
        );
    }
}
