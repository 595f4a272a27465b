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

/// The architecture of a Mixtral-family decoder, with every optional field resolved.
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

    /// Parses a Hugging Face `config.json` (transformers 4.x or 5.x style).
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::config("config.json", format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config("config.json", "expected a JSON object"))?;

        let model_type = field(obj, "model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if model_type != "mixtral" {
            return Err(Error::config(
                "model_type",
                format!("unsupported model_type `{model_type}` (supported: `mixtral`)"),
            ));
        }
        if let Some(act) = field(obj, "hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(Error::config(
                "hidden_act",
                format!("unsupported activation `{act}` (supported: `silu`)"),
            ));
        }

        let hidden_size = required_usize(obj, "hidden_size")?;
        let num_attention_heads = required_usize(obj, "num_attention_heads")?;
        let num_key_value_heads =
            usize_field(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(Error::config("num_attention_heads", "must be at least 1"));
        }
        let head_dim = match usize_field(obj, "head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };

        // 5.x: rope_parameters { rope_type, rope_theta }; 4.x: rope_theta (+ optional rope_scaling).
        let rope_theta = match field(obj, "rope_parameters") {
            Some(Value::Object(rp)) => {
                let rope_type = field(rp, "rope_type")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if rope_type != "default" {
                    return Err(Error::config(
                        "rope_parameters.rope_type",
                        format!("unsupported rope_type `{rope_type}` (supported: `default`)"),
                    ));
                }
                f64_field(rp, "rope_theta")?
                    .ok_or_else(|| Error::config("rope_parameters.rope_theta", "missing"))?
            }
            Some(other) => {
                return Err(Error::config(
                    "rope_parameters",
                    format!("expected an object, got {other}"),
                ));
            }
            None => {
                if let Some(scaling) = field(obj, "rope_scaling") {
                    return Err(Error::config(
                        "rope_scaling",
                        format!("unsupported rope scaling {scaling}"),
                    ));
                }
                f64_field(obj, "rope_theta")?.unwrap_or(1e6)
            }
        };

        let dtype_name = field(obj, "dtype")
            .or_else(|| field(obj, "torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32");
        let dtype = DType::parse(dtype_name)
            .ok_or_else(|| Error::config("dtype", format!("unsupported dtype `{dtype_name}`")))?;

        let cfg = Self {
            vocab_size: required_usize(obj, "vocab_size")?,
            hidden_size,
            intermediate_size: required_usize(obj, "intermediate_size")?,
            num_hidden_layers: required_usize(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_local_experts: usize_field(obj, "num_local_experts")?.unwrap_or(8),
            num_experts_per_tok: usize_field(obj, "num_experts_per_tok")?.unwrap_or(2),
            rms_norm_eps: f64_field(obj, "rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            max_position_embeddings: usize_field(obj, "max_position_embeddings")?
                .unwrap_or(4096 * 32),
            sliding_window: usize_field(obj, "sliding_window")?,
            tie_word_embeddings: field(obj, "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: token_ids(field(obj, "bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(field(obj, "eos_token_id"), "eos_token_id")?,
            dtype,
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
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
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

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Parameters of one expert (all three projections) in one layer.
    pub fn expert_params(&self) -> u64 {
        3 * self.hidden_size as u64 * self.intermediate_size as u64
    }

    /// Parameters of one layer's attention, norms and router.
    pub fn layer_shared_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let attn = h * (self.q_dim() + 2 * self.kv_dim()) as u64 + self.q_dim() as u64 * h;
        attn + 2 * h + self.num_local_experts as u64 * h
    }

    pub fn total_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let embed = v * h * if self.tie_word_embeddings { 1 } else { 2 };
        let per_layer =
            self.layer_shared_params() + self.num_local_experts as u64 * self.expert_params();
        embed + h + self.num_hidden_layers as u64 * per_layer
    }

    /// Parameters read to produce one token (batch 1): shared weights plus top-k experts.
    pub fn active_params_per_token(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let per_layer =
            self.layer_shared_params() + self.num_experts_per_tok as u64 * self.expert_params();
        // The embedding row read is negligible; the LM head is read whole.
        v * h + h + self.num_hidden_layers as u64 * per_layer
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
        let per_layer = self.layer_shared_params() as f64 + touched * self.expert_params() as f64;
        self.vocab_size as f64 * h + h + self.num_hidden_layers as f64 * per_layer
    }

    /// `config.json` as transformers 5.x writes it, for exported checkpoints.
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
