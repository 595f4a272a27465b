//! Model configuration as Hugging Face `config.json` writes it for the Mixtral family.
//!
//! transformers 4.x writes `rope_theta` and `torch_dtype` at the top level; 5.x writes
//! `rope_parameters` and `dtype`. Both parse into the same [`ModelConfig`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Storage dtype of a checkpoint's weights. Compute is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "f32" | "F32" => Some(Self::F32),
            "float16" | "f16" | "F16" | "half" => Some(Self::F16),
            "bfloat16" | "bf16" | "BF16" => Some(Self::Bf16),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// The model families the engine serves, by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
    Glm4Moe,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Self::Mixtral,
        Self::Qwen2Moe,
        Self::Qwen3Moe,
        Self::Olmoe,
        Self::DeepseekV2,
        Self::DeepseekV3,
        Self::GptOss,
        Self::Glm4Moe,
    ];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
            Self::DeepseekV2 => "deepseek_v2",
            Self::DeepseekV3 => "deepseek_v3",
            Self::GptOss => "gpt_oss",
            Self::Glm4Moe => "glm4_moe",
        }
    }

    pub fn parse(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    fn supported() -> String {
        Self::ALL
            .iter()
            .map(|f| format!("`{}`", f.model_type()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How a router turns its logits into (expert, weight) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Softmax over every expert, then top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2).
    Softmax,
    /// Sigmoid per expert; a correction bias may steer the choice (DeepSeek-V3, GLM-4.5).
    Sigmoid,
    /// Top-k of the logits, then softmax over the chosen k (gpt-oss).
    TopKThenSoftmax,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The group's best expert (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// The sum of the group's two best experts (DeepSeek-V3's `noaux_tc`).
    TopTwoSum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    pub scoring: Scoring,
    /// Divide the chosen weights by their sum (`norm_topk_prob`).
    pub renormalize: bool,
    /// The router's linear layer has a bias (gpt-oss).
    pub bias: bool,
    /// `e_score_correction_bias`: added to the scores to choose experts, not to weigh them.
    pub correction_bias: bool,
    /// Expert groups (`n_group`) and how many of them a token may use (`topk_group`); 1 and 1
    /// when routing is not group-limited.
    pub groups: usize,
    pub topk_groups: usize,
    pub group_score: GroupScore,
    /// Multiplies the final weights (`routed_scaling_factor`).
    pub scale: f64,
}

impl RouterConfig {
    /// Mixtral's router: softmax, top-k, renormalised.
    pub fn mixtral() -> Self {
        Self {
            scoring: Scoring::Softmax,
            renormalize: true,
            bias: false,
            correction_bias: false,
            groups: 1,
            topk_groups: 1,
            group_score: GroupScore::Max,
            scale: 1.0,
        }
    }
}

/// RMS normalisation of queries and keys before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    /// Over each head (`head_dim` weights: Qwen3, GLM-4.5).
    PerHead,
    /// Over the whole projection (`q_dim` / `kv_dim` weights: OLMoE).
    Whole,
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are cached as one
/// compressed latent of `kv_lora_rank` plus a shared rotary key of `qk_rope_head_dim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlaConfig {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionConfig {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to ±this (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// A learned per-head logit that joins every softmax and is then dropped (gpt-oss).
    pub sinks: bool,
    /// Per layer, whether `sliding_window` applies (`layer_types`); `None`: every layer.
    pub sliding_layers: Option<Vec<bool>>,
    pub mla: Option<MlaConfig>,
}

impl AttentionConfig {
    pub fn plain() -> Self {
        Self {
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sinks: false,
            sliding_layers: None,
            mla: None,
        }
    }
}

/// YaRN context extension of the rotary embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub original_max_position_embeddings: usize,
    pub truncate: bool,
    /// Multiplies cos and sin (the "attention factor").
    pub attention_factor: f64,
    /// DeepSeek's `mscale_all_dim`: the softmax scale is multiplied by its mscale squared.
    pub mscale_all_dim: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Dimensions of a head that rotate (`partial_rotary_factor` × head_dim); the rest pass.
    pub rotary_dim: usize,
    pub yarn: Option<Yarn>,
    /// Rotate adjacent pairs `(x0, x1), (x2, x3)…` instead of the two halves (DeepSeek).
    pub interleaved: bool,
}

/// The experts' (and dense MLPs') activation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(gate) * up`.
    Silu,
    /// gpt-oss: gate clamped above at `limit`, up to ±`limit`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu { alpha: f64, limit: f64 },
}

/// What distinguishes a family beyond the Mixtral shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    pub family: Family,
    pub router: RouterConfig,
    pub attention: AttentionConfig,
    pub rope: RopeConfig,
    pub activation: Activation,
    /// Experts' projections have biases (gpt-oss).
    pub expert_bias: bool,
    /// Layers `0..first_dense` have a dense MLP instead of experts (`first_k_dense_replace`).
    pub first_dense: usize,
    /// A layer `i` has experts only when `(i + 1) % sparse_step == 0` (`decoder_sparse_step`).
    pub sparse_step: usize,
    /// Layers that always have a dense MLP (`mlp_only_layers`).
    pub mlp_only_layers: Vec<usize>,
    /// Width of a dense layer's MLP (`intermediate_size` where experts use
    /// `moe_intermediate_size`).
    pub dense_intermediate_size: usize,
    /// Width of the shared expert that runs for every token in an MoE layer; 0: none.
    pub shared_intermediate_size: usize,
    /// The shared expert's output is scaled by `sigmoid(x · w)` (Qwen2-MoE).
    pub shared_gate: bool,
}

impl Arch {
    /// The Mixtral family's: every layer routed, no shared experts, plain attention.
    pub fn mixtral(head_dim: usize, intermediate_size: usize) -> Self {
        Self {
            family: Family::Mixtral,
            router: RouterConfig::mixtral(),
            attention: AttentionConfig::plain(),
            rope: RopeConfig {
                rotary_dim: head_dim,
                yarn: None,
                interleaved: false,
            },
            activation: Activation::Silu,
            expert_bias: false,
            first_dense: 0,
            sparse_step: 1,
            mlp_only_layers: Vec::new(),
            dense_intermediate_size: intermediate_size,
            shared_intermediate_size: 0,
            shared_gate: false,
        }
    }
}

/// The architecture of a decoder the engine serves, with every optional field resolved.
/// `intermediate_size` is a routed expert's width (`moe_intermediate_size` in families
/// that have dense layers too); `num_local_experts` counts the routed experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub dtype: DType,
    pub arch: Arch,
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn usize_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<usize>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::config(name, format!("expected a non-negative integer, got {v}"))
        }),
    }
}

fn required_usize(obj: &serde_json::Map<String, Value>, name: &str) -> Result<usize> {
    usize_field(obj, name)?.ok_or_else(|| Error::config(name, "missing"))
}

fn f64_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<f64>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::config(name, format!("expected a number, got {v}"))),
    }
}

fn token_ids(v: Option<&Value>, name: &str) -> Result<Vec<u32>> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| Error::config(name, format!("expected token ids, got {i}")))
            })
            .collect(),
        Some(other) => other
            .as_u64()
            .map(|n| vec![n as u32])
            .ok_or_else(|| Error::config(name, format!("expected a token id, got {other}"))),
    }
}

fn bool_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<bool>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::config(name, format!("expected true or false, got {v}"))),
    }
}

fn usize_list(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Vec<usize>> {
    match field(obj, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| Error::config(name, format!("expected layer indices, got {i}")))
            })
            .collect(),
        Some(other) => Err(Error::config(
            name,
            format!("expected a list of layer indices, got {other}"),
        )),
    }
}

/// `layer_types` as per-layer "uses the sliding window".
fn layer_types(obj: &serde_json::Map<String, Value>) -> Result<Option<Vec<bool>>> {
    match field(obj, "layer_types") {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(Error::config(
                    "layer_types",
                    format!("unsupported layer type {t} (supported: \"sliding_attention\", \"full_attention\")"),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(Error::config(
            "layer_types",
            format!("expected a list, got {other}"),
        )),
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The rotary embedding: 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling` (+
/// `partial_rotary_factor`); default and YaRN scaling.
fn parse_rope(
    obj: &serde_json::Map<String, Value>,
    family: Family,
    head_dim: usize,
    max_position_embeddings: usize,
) -> Result<(f64, RopeConfig)> {
    let (params, prefix, theta) = match field(obj, "rope_parameters") {
        Some(Value::Object(rp)) => {
            let theta = f64_field(rp, "rope_theta")?
                .ok_or_else(|| Error::config("rope_parameters.rope_theta", "missing"))?;
            (Some(rp), "rope_parameters", theta)
        }
        Some(other) => {
            return Err(Error::config(
                "rope_parameters",
                format!("expected an object, got {other}"),
            ));
        }
        None => {
            let theta = f64_field(obj, "rope_theta")?.unwrap_or(match family {
                Family::Mixtral => 1e6,
                Family::GptOss => 150_000.0,
                _ => 10_000.0,
            });
            match field(obj, "rope_scaling") {
                None => (None, "rope_scaling", theta),
                Some(Value::Object(rs)) => (Some(rs), "rope_scaling", theta),
                Some(other) => {
                    return Err(Error::config(
                        "rope_scaling",
                        format!("expected an object, got {other}"),
                    ));
                }
            }
        }
    };
    let named = |k: &str| format!("{prefix}.{k}");
    let partial = match params.and_then(|p| f64_field(p, "partial_rotary_factor").transpose()) {
        Some(v) => Some(v?),
        None => f64_field(obj, "partial_rotary_factor")?,
    }
    .unwrap_or(if family == Family::Glm4Moe { 0.5 } else { 1.0 });
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(Error::config(
            "partial_rotary_factor",
            format!("{partial} must be in (0, 1]"),
        ));
    }
    let rotary_dim = (head_dim as f64 * partial) as usize;
    let rope_type = params
        .and_then(|p| field(p, "rope_type").or_else(|| field(p, "type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let yarn = match (rope_type, params) {
        ("default", _) => None,
        ("yarn", Some(p)) => {
            let original = match usize_field(p, "original_max_position_embeddings")? {
                Some(n) => n,
                None => max_position_embeddings,
            };
            let factor = match f64_field(p, "factor")? {
                Some(f) => f,
                None => max_position_embeddings as f64 / original as f64,
            };
            if factor.is_nan() || factor <= 0.0 {
                return Err(Error::config(&named("factor"), "must be positive"));
            }
            let mscale = f64_field(p, "mscale")?;
            let mscale_all_dim = f64_field(p, "mscale_all_dim")?;
            let attention_factor = match f64_field(p, "attention_factor")? {
                Some(a) => a,
                None => match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, a)
                    }
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            let beta = |k: &str, d: f64| -> Result<f64> {
                Ok(f64_field(p, k)?.filter(|v| *v != 0.0).unwrap_or(d))
            };
            Some(Yarn {
                factor,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                original_max_position_embeddings: original,
                truncate: bool_field(p, "truncate")?.unwrap_or(true),
                attention_factor,
                // transformers scales DeepSeek's softmax by it; other families ignore it.
                mscale_all_dim: match family {
                    Family::DeepseekV2 | Family::DeepseekV3 => mscale_all_dim.filter(|m| *m != 0.0),
                    _ => None,
                },
            })
        }
        (other, _) => {
            return Err(Error::config(
                &named("rope_type"),
                format!("unsupported rope_type `{other}` (supported: `default`, `yarn`)"),
            ));
        }
    };
    let interleaved = match family {
        Family::DeepseekV2 => true,
        Family::DeepseekV3 => bool_field(obj, "rope_interleave")?.unwrap_or(true),
        _ => false,
    };
    Ok((
        theta,
        RopeConfig {
            rotary_dim,
            yarn,
            interleaved,
        },
    ))
}

fn parse_router(obj: &serde_json::Map<String, Value>, family: Family) -> Result<RouterConfig> {
    use Family::*;
    let norm = |default: bool| -> Result<bool> {
        Ok(bool_field(obj, "norm_topk_prob")?.unwrap_or(default))
    };
    let scale = |default: f64| -> Result<f64> {
        Ok(f64_field(obj, "routed_scaling_factor")?.unwrap_or(default))
    };
    let mut r = RouterConfig::mixtral();
    match family {
        Mixtral => {}
        Qwen2Moe | Qwen3Moe | Olmoe => r.renormalize = norm(false)?,
        DeepseekV2 => {
            r.renormalize = false;
            r.scale = scale(1.0)?;
            let method = field(obj, "topk_method")
                .and_then(Value::as_str)
                .unwrap_or("greedy");
            match method {
                "greedy" => {}
                "group_limited_greedy" => {
                    r.groups = required_usize(obj, "n_group")?;
                    r.topk_groups = required_usize(obj, "topk_group")?;
                    r.group_score = GroupScore::Max;
                }
                other => {
                    return Err(Error::config(
                        "topk_method",
                        format!(
                            "unsupported `{other}` for deepseek_v2 (supported: `greedy`, `group_limited_greedy`)"
                        ),
                    ));
                }
            }
        }
        DeepseekV3 | Glm4Moe => {
            let v3 = family == DeepseekV3;
            r.scoring = Scoring::Sigmoid;
            r.correction_bias = true;
            r.renormalize = norm(true)?;
            r.scale = scale(if v3 { 2.5 } else { 1.0 })?;
            r.groups = usize_field(obj, "n_group")?.unwrap_or(if v3 { 8 } else { 1 });
            r.topk_groups = usize_field(obj, "topk_group")?.unwrap_or(if v3 { 4 } else { 1 });
            r.group_score = GroupScore::TopTwoSum;
        }
        GptOss => {
            r.scoring = Scoring::TopKThenSoftmax;
            r.renormalize = false;
            r.bias = true;
        }
    }
    if r.scale.is_nan() || r.scale <= 0.0 {
        return Err(Error::config("routed_scaling_factor", "must be positive"));
    }
    Ok(r)
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint folder.
    /// Stop tokens also come from `generation_config.json` when there is one (chat models
    /// list their end-of-turn tokens there), after those of `config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg = Self::from_json(&text).map_err(|e| e.in_file(&path))?;
        let gen_path = dir.join("generation_config.json");
        match std::fs::read_to_string(&gen_path) {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    Error::config("generation_config.json", format!("invalid JSON: {e}"))
                        .in_file(&gen_path)
                })?;
                let ids = token_ids(v.get("eos_token_id"), "eos_token_id")
                    .map_err(|e| e.in_file(&gen_path))?;
                for id in ids {
                    if id as usize >= cfg.vocab_size {
                        return Err(Error::config(
                            "eos_token_id",
                            format!("{id} is outside the vocabulary ({})", cfg.vocab_size),
                        )
                        .in_file(&gen_path));
                    }
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&gen_path, e)),
        }
        Ok(cfg)
    }

    /// Parses a Hugging Face `config.json` (transformers 4.x or 5.x style) of any family
    /// the engine serves.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::config("config.json", format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config("config.json", "expected a JSON object"))?;

        let model_type = field(obj, "model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let family = Family::parse(model_type).ok_or_else(|| {
            Error::config(
                "model_type",
                format!(
                    "unsupported model_type `{model_type}` (supported: {})",
                    Family::supported()
                ),
            )
        })?;
        use Family::*;
        if let Some(q) = field(obj, "quantization_config") {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            return Err(Error::config(
                "quantization_config",
                format!(
                    "quantized checkpoints (`{method}`) are not supported yet: use the bf16 or \
                     f32 weights (e.g. dequantized with transformers)"
                ),
            ));
        }
        if let Some(act) = field(obj, "hidden_act").and_then(Value::as_str)
            && act != "silu"
            && act != "swish"
        {
            return Err(Error::config(
                "hidden_act",
                format!("unsupported activation `{act}` (supported: `silu`)"),
            ));
        }

        let hidden_size = required_usize(obj, "hidden_size")?;
        let num_attention_heads = required_usize(obj, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(Error::config("num_attention_heads", "must be at least 1"));
        }
        let num_key_value_heads =
            usize_field(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let mla = match family {
            DeepseekV2 | DeepseekV3 => {
                if bool_field(obj, "attention_bias")?.unwrap_or(false) {
                    return Err(Error::config(
                        "attention_bias",
                        "biases in multi-head latent attention are not supported",
                    ));
                }
                Some(MlaConfig {
                    q_lora_rank: usize_field(obj, "q_lora_rank")?,
                    kv_lora_rank: required_usize(obj, "kv_lora_rank")?,
                    qk_nope_head_dim: required_usize(obj, "qk_nope_head_dim")?,
                    qk_rope_head_dim: required_usize(obj, "qk_rope_head_dim")?,
                    v_head_dim: required_usize(obj, "v_head_dim")?,
                })
            }
            _ => None,
        };
        let head_dim = match (&mla, usize_field(obj, "head_dim")?) {
            (Some(m), _) => m.qk_head_dim(),
            (None, Some(d)) => d,
            (None, None) => hidden_size / num_attention_heads,
        };
        let max_position_embeddings =
            usize_field(obj, "max_position_embeddings")?.unwrap_or(match family {
                Mixtral => 4096 * 32,
                _ => 4096,
            });
        let rope_head_dim = mla.as_ref().map_or(head_dim, |m| m.qk_rope_head_dim);
        let (rope_theta, rope) = parse_rope(obj, family, rope_head_dim, max_position_embeddings)?;

        let dtype_name = field(obj, "dtype")
            .or_else(|| field(obj, "torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32");
        let dtype = DType::parse(dtype_name)
            .ok_or_else(|| Error::config("dtype", format!("unsupported dtype `{dtype_name}`")))?;

        // Routed experts and their width.
        // transformers writes the count under the family's own name or the attribute name.
        const EXPERT_KEYS: [&str; 3] = ["num_local_experts", "num_experts", "n_routed_experts"];
        let experts_key = EXPERT_KEYS
            .into_iter()
            .find(|k| field(obj, k).is_some())
            .unwrap_or(match family {
                Mixtral | GptOss => "num_local_experts",
                Qwen2Moe | Qwen3Moe | Olmoe => "num_experts",
                DeepseekV2 | DeepseekV3 | Glm4Moe => "n_routed_experts",
            });
        let num_local_experts = match family {
            Mixtral => usize_field(obj, experts_key)?.unwrap_or(8),
            _ => required_usize(obj, experts_key)?,
        };
        let dense_intermediate_size = required_usize(obj, "intermediate_size")?;
        let intermediate_size = match family {
            Mixtral | Olmoe | GptOss => dense_intermediate_size,
            _ => required_usize(obj, "moe_intermediate_size")?,
        };
        let num_experts_per_tok = match family {
            Mixtral => usize_field(obj, "num_experts_per_tok")?.unwrap_or(2),
            _ => required_usize(obj, "num_experts_per_tok")?,
        };

        // Where the experts are: dense layers first, a sparse step, layers kept dense.
        let mut first_dense = 0;
        let mut sparse_step = 1;
        let mut mlp_only_layers = Vec::new();
        match family {
            Qwen2Moe | Qwen3Moe => {
                sparse_step = usize_field(obj, "decoder_sparse_step")?.unwrap_or(1);
                mlp_only_layers = usize_list(obj, "mlp_only_layers")?;
            }
            DeepseekV2 | DeepseekV3 | Glm4Moe => {
                first_dense = usize_field(obj, "first_k_dense_replace")?.unwrap_or(match family {
                    DeepseekV3 => 3,
                    Glm4Moe => 1,
                    _ => 0,
                });
                if let Some(f) = usize_field(obj, "moe_layer_freq")?
                    && f != 1
                {
                    return Err(Error::config(
                        "moe_layer_freq",
                        format!(
                            "{f} is not supported (transformers builds every layer from first_k_dense_replace on as MoE)"
                        ),
                    ));
                }
            }
            _ => {}
        }

        // Shared experts.
        let (shared_intermediate_size, shared_gate) = match family {
            Qwen2Moe => (
                required_usize(obj, "shared_expert_intermediate_size")?,
                true,
            ),
            DeepseekV2 | DeepseekV3 | Glm4Moe => (
                intermediate_size
                    * usize_field(obj, "n_shared_experts")?.unwrap_or(match family {
                        DeepseekV2 => 2,
                        _ => 1,
                    }),
                false,
            ),
            _ => (0, false),
        };

        let router = parse_router(obj, family)?;

        // Attention.
        let attention_bias = |default: bool| -> Result<bool> {
            Ok(bool_field(obj, "attention_bias")?.unwrap_or(default))
        };
        let mut sliding_window = usize_field(obj, "sliding_window")?;
        let mut attention = AttentionConfig::plain();
        match family {
            Mixtral => {}
            Qwen2Moe => {
                attention.qkv_bias = bool_field(obj, "qkv_bias")?.unwrap_or(true);
                if bool_field(obj, "use_sliding_window")?.unwrap_or(false) {
                    let max_window_layers = usize_field(obj, "max_window_layers")?.unwrap_or(28);
                    attention.sliding_layers = Some(match layer_types(obj)? {
                        Some(t) => t,
                        None => (0..required_usize(obj, "num_hidden_layers")?)
                            .map(|i| (i + 1) % 2 == 1 && i < max_window_layers)
                            .collect(),
                    });
                } else {
                    sliding_window = None;
                }
            }
            Qwen3Moe => {
                let b = attention_bias(false)?;
                (attention.qkv_bias, attention.o_bias) = (b, b);
                attention.qk_norm = QkNorm::PerHead;
                if !bool_field(obj, "use_sliding_window")?.unwrap_or(false) {
                    sliding_window = None;
                }
            }
            Olmoe => {
                let b = attention_bias(false)?;
                (attention.qkv_bias, attention.o_bias) = (b, b);
                attention.qk_norm = QkNorm::Whole;
                attention.clip_qkv = f64_field(obj, "clip_qkv")?;
                sliding_window = None;
            }
            DeepseekV2 | DeepseekV3 => {
                attention.mla = mla.clone();
                sliding_window = None;
            }
            GptOss => {
                let b = attention_bias(true)?;
                (attention.qkv_bias, attention.o_bias) = (b, b);
                attention.sinks = true;
                attention.sliding_layers = Some(match layer_types(obj)? {
                    Some(t) => t,
                    None => (0..required_usize(obj, "num_hidden_layers")?)
                        .map(|i| (i + 1) % 2 == 1)
                        .collect(),
                });
                if sliding_window.is_none() {
                    sliding_window = Some(128);
                }
            }
            Glm4Moe => {
                attention.qkv_bias = attention_bias(false)?;
                if bool_field(obj, "use_qk_norm")?.unwrap_or(false) {
                    attention.qk_norm = QkNorm::PerHead;
                }
                sliding_window = None;
            }
        }
        let activation = match family {
            GptOss => Activation::ClampedSwiglu {
                alpha: f64_field(obj, "swiglu_alpha")?.unwrap_or(1.702),
                limit: f64_field(obj, "swiglu_limit")?.unwrap_or(7.0),
            },
            _ => Activation::Silu,
        };

        let cfg = Self {
            vocab_size: required_usize(obj, "vocab_size")?,
            hidden_size,
            intermediate_size,
            num_hidden_layers: required_usize(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_local_experts,
            num_experts_per_tok,
            rms_norm_eps: f64_field(obj, "rms_norm_eps")?.unwrap_or(match family {
                Mixtral | Olmoe | GptOss | Glm4Moe => 1e-5,
                _ => 1e-6,
            }),
            rope_theta,
            max_position_embeddings,
            sliding_window,
            tie_word_embeddings: field(obj, "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: token_ids(field(obj, "bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(field(obj, "eos_token_id"), "eos_token_id")?,
            dtype,
            arch: Arch {
                family,
                router,
                attention,
                rope,
                activation,
                expert_bias: family == GptOss,
                first_dense,
                sparse_step,
                mlp_only_layers,
                dense_intermediate_size,
                shared_intermediate_size,
                shared_gate,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between fields; every error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("decoder_sparse_step", self.arch.sparse_step),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(Error::config(name, "must be at least 1"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                format!(
                    "{} exceeds num_local_experts {}",
                    self.num_experts_per_tok, self.num_local_experts
                ),
            ));
        }
        let r = &self.arch.router;
        if r.groups == 0 || !self.num_local_experts.is_multiple_of(r.groups) {
            return Err(Error::config(
                "n_group",
                format!(
                    "{} does not divide the {} routed experts",
                    r.groups, self.num_local_experts
                ),
            ));
        }
        if r.topk_groups == 0 || r.topk_groups > r.groups {
            return Err(Error::config(
                "topk_group",
                format!(
                    "{} must be between 1 and n_group {}",
                    r.topk_groups, r.groups
                ),
            ));
        }
        if r.topk_groups * (self.num_local_experts / r.groups) < self.num_experts_per_tok {
            return Err(Error::config(
                "topk_group",
                format!(
                    "{} groups of {} experts cannot hold num_experts_per_tok {}",
                    r.topk_groups,
                    self.num_local_experts / r.groups,
                    self.num_experts_per_tok
                ),
            ));
        }
        if r.group_score == GroupScore::TopTwoSum
            && r.groups > 1
            && self.num_local_experts / r.groups < 2
        {
            return Err(Error::config(
                "n_group",
                "groups scored by their two best experts need at least 2 experts each",
            ));
        }
        let rope = &self.arch.rope;
        if rope.rotary_dim == 0 || !rope.rotary_dim.is_multiple_of(2) {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "rotary dimension {} must be even and at least 2",
                    rope.rotary_dim
                ),
            ));
        }
        let rope_head = self
            .arch
            .attention
            .mla
            .as_ref()
            .map_or(self.head_dim, |m| m.qk_rope_head_dim);
        if rope.rotary_dim > rope_head {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "rotary dimension {} exceeds the head's {rope_head}",
                    rope.rotary_dim
                ),
            ));
        }
        if let Some(m) = &self.arch.attention.mla {
            for (name, v) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                if v == 0 {
                    return Err(Error::config(name, "must be at least 1"));
                }
            }
        }
        if let Some(layers) = &self.arch.attention.sliding_layers
            && layers.len() != self.num_hidden_layers
        {
            return Err(Error::config(
                "layer_types",
                format!(
                    "lists {} layers but num_hidden_layers is {}",
                    layers.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::config("sliding_window", "must be at least 1"));
        }
        if let Some(&l) = self
            .arch
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return Err(Error::config(
                "mlp_only_layers",
                format!(
                    "layer {l} does not exist ({} layers)",
                    self.num_hidden_layers
                ),
            ));
        }
        if self.arch.dense_intermediate_size == 0 && self.dense_layers() > 0 {
            return Err(Error::config("intermediate_size", "must be at least 1"));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(Error::config("rope_theta", "must be positive"));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return Err(Error::config("rms_norm_eps", "must be non-negative"));
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(Error::config(
                    "eos_token_id",
                    format!(
                        "token id {id} is outside the vocabulary ({})",
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Family {
        self.arch.family
    }

    /// Whether layer `i` routes to experts (otherwise it has a dense MLP).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i < self.num_hidden_layers
            && i >= self.arch.first_dense
            && (i + 1).is_multiple_of(self.arch.sparse_step)
            && !self.arch.mlp_only_layers.contains(&i)
    }

    /// Layers with a dense MLP instead of experts.
    pub fn dense_layers(&self) -> usize {
        (0..self.num_hidden_layers)
            .filter(|&i| !self.is_moe_layer(i))
            .count()
    }

    /// The sliding window of layer `i`, if it has one.
    pub fn window(&self, i: usize) -> Option<usize> {
        let w = self.sliding_window?;
        match &self.arch.attention.sliding_layers {
            None => Some(w),
            Some(layers) => layers.get(i).copied().unwrap_or(false).then_some(w),
        }
    }

    /// Width of the queries (`heads × head_dim`; MLA: heads × (nope + rope)).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the attention output that `o_proj` reads.
    pub fn attn_out_dim(&self) -> usize {
        match &self.arch.attention.mla {
            Some(m) => self.num_attention_heads * m.v_head_dim,
            None => self.q_dim(),
        }
    }

    /// Width of the keys (and values) of one position.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Floats one position holds in the KV cache of one layer, keys and values:
    /// MLA caches its compressed latent and rotary key only.
    pub fn kv_cache_dims(&self) -> (usize, usize) {
        match &self.arch.attention.mla {
            Some(m) => (m.kv_lora_rank + m.qk_rope_head_dim, 0),
            None => (self.kv_dim(), self.kv_dim()),
        }
    }

    /// Parameters of one routed expert (all projections, biases included) in one layer.
    pub fn expert_params(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        3 * h * i + if self.arch.expert_bias { 2 * i + h } else { 0 }
    }

    /// Parameters of one layer's attention and norms.
    pub fn attention_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let a = &self.arch.attention;
        let heads = self.num_attention_heads as u64;
        let attn = match &a.mla {
            Some(m) => {
                let qk = m.qk_head_dim() as u64;
                let q = match m.q_lora_rank {
                    Some(r) => h * r as u64 + r as u64 + r as u64 * heads * qk,
                    None => h * heads * qk,
                };
                let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim) as u64;
                let kv_b =
                    m.kv_lora_rank as u64 * heads * (m.qk_nope_head_dim + m.v_head_dim) as u64;
                q + kv_a + m.kv_lora_rank as u64 + kv_b + heads * m.v_head_dim as u64 * h
            }
            None => {
                let (q, kv) = (self.q_dim() as u64, self.kv_dim() as u64);
                let mut n = h * (q + 2 * kv) + q * h;
                if a.qkv_bias {
                    n += q + 2 * kv;
                }
                if a.o_bias {
                    n += h;
                }
                n += match a.qk_norm {
                    QkNorm::None => 0,
                    QkNorm::PerHead => 2 * self.head_dim as u64,
                    QkNorm::Whole => q + kv,
                };
                if a.sinks {
                    n += heads;
                }
                n
            }
        };
        attn + 2 * h
    }

    /// Parameters a stage holds for layer `i` besides attention: the router and shared
    /// expert of an MoE layer, or the dense MLP.
    pub fn stage_ffn_params(&self, i: usize) -> u64 {
        let h = self.hidden_size as u64;
        if !self.is_moe_layer(i) {
            return 3 * h * self.arch.dense_intermediate_size as u64;
        }
        let e = self.num_local_experts as u64;
        let r = &self.arch.router;
        let mut n = e * h;
        if r.bias {
            n += e;
        }
        if r.correction_bias {
            n += e;
        }
        n += 3 * h * self.arch.shared_intermediate_size as u64;
        if self.arch.shared_gate {
            n += h;
        }
        n
    }

    /// Parameters of one layer's attention, norms and router (the mean over layers of what
    /// a stage holds per layer, dense MLPs and shared experts included).
    pub fn layer_shared_params(&self) -> u64 {
        let n = self.num_hidden_layers.max(1) as u64;
        self.attention_params()
            + (0..self.num_hidden_layers)
                .map(|i| self.stage_ffn_params(i))
                .sum::<u64>()
                / n
    }

    /// Layers with routed experts.
    pub fn moe_layer_count(&self) -> usize {
        self.num_hidden_layers - self.dense_layers()
    }

    /// (layer, expert) pairs of routed experts in the whole model.
    pub fn routed_expert_count(&self) -> usize {
        self.moe_layer_count() * self.num_local_experts
    }

    fn moe_layers(&self) -> u64 {
        self.moe_layer_count() as u64
    }

    fn embedding_params(&self) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        v * h * if self.tie_word_embeddings { 1 } else { 2 } + h
    }

    fn stage_params(&self) -> u64 {
        (0..self.num_hidden_layers)
            .map(|i| self.attention_params() + self.stage_ffn_params(i))
            .sum()
    }

    pub fn total_params(&self) -> u64 {
        self.embedding_params()
            + self.stage_params()
            + self.moe_layers() * self.num_local_experts as u64 * self.expert_params()
    }

    /// Parameters read to produce one token (batch 1): shared weights plus top-k experts.
    pub fn active_params_per_token(&self) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        // The embedding row read is negligible; the LM head is read whole.
        v * h
            + h
            + self.stage_params()
            + self.moe_layers() * self.num_experts_per_tok as u64 * self.expert_params()
    }

    /// The routed experts' share of [`Self::active_params_per_token`].
    pub fn active_expert_params_per_token(&self) -> u64 {
        self.moe_layers() * self.num_experts_per_tok as u64 * self.expert_params()
    }

    /// Bytes read to produce one token (batch 1) with matrices of `dense_bytes` per weight
    /// and routed experts of `expert_bytes` per weight.
    pub fn bytes_read_per_token(&self, dense_bytes: f64, expert_bytes: f64) -> f64 {
        let experts = self.active_expert_params_per_token();
        (self.active_params_per_token() - experts) as f64 * dense_bytes
            + experts as f64 * expert_bytes
    }

    /// Bytes read by one decode step of `batch` sequences (see
    /// [`Self::params_read_per_step`]) at the given bytes per weight.
    pub fn bytes_read_per_step(&self, batch: usize, dense_bytes: f64, expert_bytes: f64) -> f64 {
        let all = self.params_read_per_step(batch);
        let experts = all - self.params_read_per_step(0);
        (all - experts) * dense_bytes + experts * expert_bytes
    }

    /// Parameters read by one decode step of `batch` sequences: shared weights plus the
    /// experts the batch touches, expected under uniform routing (each of `batch` tokens picks
    /// `top_k` of `E`, so an expert is untouched with probability ((E - k) / E)^batch).
    pub fn params_read_per_step(&self, batch: usize) -> f64 {
        let (e, k) = (
            self.num_local_experts as f64,
            self.num_experts_per_tok as f64,
        );
        let touched = e * (1.0 - ((e - k) / e).powi(batch as i32));
        let h = self.hidden_size as f64;
        self.vocab_size as f64 * h
            + h
            + self.stage_params() as f64
            + self.moe_layers() as f64 * touched * self.expert_params() as f64
    }

    /// `config.json` as transformers 5.x writes it, for exported checkpoints (the Mixtral
    /// family only: synthetic models are Mixtral-shaped).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": { "rope_type": "default", "rope_theta": self.rope_theta },
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => Value::from(*one),
                many => Value::from(many.to_vec()),
            },
            "attention_dropout": 0.0,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": false,
            "router_jitter_noise": 0.0,
            "use_cache": true,
            "dtype": self.dtype.hf_name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": "bfloat16", "sliding_window": null,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    }"#;

    #[test]
    fn parses_transformers_4_style() {
        let c = ModelConfig::from_json(V4).expect("parse");
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.dtype, DType::Bf16);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn parses_transformers_5_style_and_round_trips() {
        let c = ModelConfig::from_json(V4).expect("parse");
        let v5 = c.to_hf_json().to_string();
        assert!(v5.contains("rope_parameters") && !v5.contains("torch_dtype"));
        let back = ModelConfig::from_json(&v5).expect("parse 5.x");
        assert_eq!(back, c);
    }

    /// DeepSeek-V3's config.json as published (4.x style, trimmed): every routing and
    /// attention field lands where the model reads it.
    const DEEPSEEK_V3: &str = r#"{
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "norm_topk_prob": true, "scoring_func": "sigmoid",
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
        "type": "yarn"}, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1
    }"#;

    #[test]
    fn parses_the_families_as_published() {
        let c = ModelConfig::from_json(DEEPSEEK_V3).expect("deepseek-v3");
        assert_eq!(c.family(), Family::DeepseekV3);
        assert_eq!((c.num_local_experts, c.intermediate_size), (256, 2048));
        assert_eq!(c.arch.dense_intermediate_size, 18432);
        assert_eq!(c.arch.shared_intermediate_size, 2048);
        assert_eq!((c.dense_layers(), c.moe_layer_count()), (3, 58));
        let r = &c.arch.router;
        assert_eq!(
            (r.scoring, r.groups, r.topk_groups, r.scale, r.renormalize),
            (Scoring::Sigmoid, 8, 4, 2.5, true)
        );
        let m = c.arch.attention.mla.as_ref().expect("mla");
        assert_eq!(
            (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim()),
            (Some(1536), 512, 192)
        );
        assert_eq!(c.kv_cache_dims(), (576, 0));
        let y = c.arch.rope.yarn.as_ref().expect("yarn");
        assert_eq!(
            (y.factor, y.mscale_all_dim, y.attention_factor),
            (40.0, Some(1.0), 1.0)
        );
        assert!(c.arch.rope.interleaved);
        // ~671B parameters, ~37B active, as DeepSeek reports (without the MTP layer).
        let total = c.total_params() as f64;
        assert!((total / 671e9 - 1.0).abs() < 0.02, "{total}");
        let active = c.active_params_per_token() as f64;
        assert!((active / 37.5e9 - 1.0).abs() < 0.06, "{active}");

        // FP8 and MXFP4 checkpoints are refused by name, not failed on later.
        let mut q: Value = serde_json::from_str(DEEPSEEK_V3).expect("json");
        q["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
        let e = ModelConfig::from_json(&q.to_string())
            .expect_err("fp8")
            .to_string();
        assert!(
            e.contains("quantization_config") && e.contains("fp8"),
            "{e}"
        );

        let bad = DEEPSEEK_V3.replace("\"n_group\": 8", "\"n_group\": 7");
        let e = ModelConfig::from_json(&bad)
            .expect_err("groups")
            .to_string();
        assert!(e.contains("n_group"), "{e}");
        let bad = DEEPSEEK_V3.replace("deepseek_v3", "deepseek_v9");
        let e = ModelConfig::from_json(&bad)
            .expect_err("family")
            .to_string();
        assert!(e.contains("deepseek_v9") && e.contains("qwen3_moe"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = V4.replace("\"mixtral\"", "\"llama\"");
        let e = ModelConfig::from_json(&bad).expect_err("llama").to_string();
        assert!(e.contains("model_type") && e.contains("llama"), "{e}");

        let bad = V4.replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 5");
        let e = ModelConfig::from_json(&bad).expect_err("top-k").to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");

        let bad = V4.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        let e = ModelConfig::from_json(&bad)
            .expect_err("kv heads")
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");

        let bad = V4.replace("\"hidden_size\": 32,", "");
        let e = ModelConfig::from_json(&bad)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");
    }

    #[test]
    fn counts_parameters() {
        let c = ModelConfig::from_json(V4).expect("parse");
        // embed + lm_head + final norm + 2 layers x (attn + norms + router + 4 experts)
        let attn = 32 * (32 + 16 + 16) + 32 * 32;
        let layer = attn + 2 * 32 + 4 * 32 + 4 * 3 * 32 * 64;
        assert_eq!(c.total_params(), (2 * 100 * 32 + 32 + 2 * layer) as u64);
    }

    #[test]
    fn generation_config_adds_its_stop_tokens() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg: Value = serde_json::from_str(V4).expect("json");
        cfg["eos_token_id"] = 2.into();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
        assert_eq!(
            ModelConfig::from_dir(dir.path())
                .expect("cfg")
                .eos_token_ids,
            [2]
        );
        let gen_path = dir.path().join("generation_config.json");
        std::fs::write(&gen_path, r#"{"eos_token_id": [7, 2]}"#).expect("write");
        assert_eq!(
            ModelConfig::from_dir(dir.path())
                .expect("cfg")
                .eos_token_ids,
            [2, 7]
        );
        std::fs::write(&gen_path, r#"{"eos_token_id": 999999}"#).expect("write");
        let e = ModelConfig::from_dir(dir.path()).expect_err("outside");
        assert!(e.to_string().contains("generation_config.json"), "{e}");
    }
}
