//! What a Hugging Face checkpoint's `config.json` says about the deployment: its
//! `spec.model.architecture`, and a `MoEDeployment` serving the folder.

use std::path::Path;

use serde_json::{Value, json};

use crate::crd::{Architecture, LatentAttention, MoEDeployment};
use crate::error::{Error, Result};

/// The first of `names` present (and not null) in `cfg`, as a positive count.
fn count(cfg: &Value, names: &[&str], required: bool) -> Result<Option<i32>> {
    let Some((name, v)) = names
        .iter()
        .find_map(|n| cfg.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
    else {
        return if required {
            Err(Error::invalid(
                format!("config.json {}", names.join(" or ")),
                "is required",
            ))
        } else {
            Ok(None)
        };
    };
    v.as_u64()
        .filter(|n| *n >= 1)
        .and_then(|n| i32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            Error::invalid(
                format!("config.json {name}"),
                format!("expected a positive integer, got {v}"),
            )
        })
}

/// `spec.model.architecture` from a `config.json`: the routed experts' sizes for families
/// that also have dense layers or shared experts (`moe_intermediate_size`,
/// `n_routed_experts`). A multimodal config's `text_config` is read when the top level has no
/// layers.
pub fn architecture(cfg: &Value) -> Result<Architecture> {
    let cfg = match cfg.get("text_config") {
        Some(t) if cfg.get("num_hidden_layers").is_none() => t,
        _ => cfg,
    };
    let req =
        |names: &[&str]| -> Result<i32> { count(cfg, names, true).map(|v| v.unwrap_or_default()) };
    let heads = req(&["num_attention_heads"])?;
    let num_layers = req(&["num_hidden_layers"])?;
    Ok(Architecture {
        num_layers,
        num_experts: req(&["num_local_experts", "num_experts", "n_routed_experts"])?,
        top_k: req(&["num_experts_per_tok", "moe_topk"])?,
        hidden_size: req(&["hidden_size"])?,
        intermediate_size: req(&["moe_intermediate_size", "intermediate_size"])?,
        num_attention_heads: heads,
        num_key_value_heads: count(cfg, &["num_key_value_heads"], false)?.unwrap_or(heads),
        head_dim: count(cfg, &["head_dim"], false)?,
        vocab_size: req(&["vocab_size"])?,
        max_position_embeddings: req(&["max_position_embeddings"])?,
        tie_word_embeddings: cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        model_type: cfg
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        dense_layers: dense_layers(cfg, num_layers)?,
        dense_intermediate_size: match cfg.get("moe_intermediate_size") {
            Some(_) => count(cfg, &["intermediate_size"], false)?,
            None => None,
        },
        shared_expert_intermediate_size: shared_width(cfg)?,
        latent_attention: match count(cfg, &["kv_lora_rank"], false)? {
            None => None,
            Some(kv_lora_rank) => Some(LatentAttention {
                q_lora_rank: count(cfg, &["q_lora_rank"], false)?,
                kv_lora_rank,
                qk_nope_head_dim: req(&["qk_nope_head_dim"])?,
                qk_rope_head_dim: req(&["qk_rope_head_dim"])?,
                v_head_dim: req(&["v_head_dim"])?,
            }),
        },
    })
}

/// Layers that have a dense MLP instead of experts, as transformers builds them:
/// `first_k_dense_replace` (DeepSeek, GLM), or `decoder_sparse_step` and `mlp_only_layers`
/// (Qwen).
fn dense_layers(cfg: &Value, num_layers: i32) -> Result<Vec<i32>> {
    let first = count(cfg, &["first_k_dense_replace"], false)?.unwrap_or(0);
    let step = count(cfg, &["decoder_sparse_step"], false)?.unwrap_or(1);
    let only: Vec<i64> = match cfg.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    Error::invalid(
                        "config.json mlp_only_layers",
                        format!("expected layer indices, got {v}"),
                    )
                })
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::invalid(
                "config.json mlp_only_layers",
                format!("expected a list of layer indices, got {other}"),
            ));
        }
    };
    Ok((0..num_layers)
        .filter(|&l| l < first || (l + 1) % step != 0 || only.contains(&(l as i64)))
        .collect())
}

/// The shared experts' total width: Qwen2-MoE's `shared_expert_intermediate_size`, or
/// DeepSeek's and GLM's `n_shared_experts × moe_intermediate_size`.
fn shared_width(cfg: &Value) -> Result<Option<i32>> {
    if let Some(w) = count(cfg, &["shared_expert_intermediate_size"], false)? {
        return Ok(Some(w));
    }
    let n = count(cfg, &["n_shared_experts"], false)?;
    let w = count(cfg, &["moe_intermediate_size"], false)?;
    Ok(match (n, w) {
        (Some(n), Some(w)) => Some(n.saturating_mul(w)),
        _ => None,
    })
}

/// A DNS-1035 name for a folder name: lowercase, `-` for anything else, at most 40.
fn name_for(folder: &str) -> String {
    let mut n: String = folder
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_lowercase()) {
        n.insert_str(0, "m-");
    }
    n.truncate(crate::workers::MAX_NAME_LEN);
    let n = n.trim_end_matches('-').to_string();
    if n.is_empty() { "model".into() } else { n }
}

/// A `MoEDeployment` serving the checkpoint folder `dir` from a hostPath at its absolute
/// path, with the architecture and dtype of its `config.json` and the defaults elsewhere
/// (as if a manifest gave only the model): what `moe-operator plan -f DIR` plans.
pub fn deployment(dir: &Path) -> Result<MoEDeployment> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let arch = architecture(&cfg).map_err(|e| match e {
        Error::Invalid { field, message } => Error::Manifest {
            path: path.clone(),
            message: format!("{field}: {message}"),
        },
        other => other,
    })?;
    let abs = std::fs::canonicalize(dir).map_err(|source| Error::Read {
        path: dir.to_owned(),
        source,
    })?;
    let dtype = match cfg
        .get("torch_dtype")
        .or_else(|| cfg.get("dtype"))
        .and_then(Value::as_str)
    {
        Some("float32") => "f32",
        Some("float16") => "f16",
        _ => "bf16",
    };
    let folder = abs
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let md = json!({
        "apiVersion": "serving.moe.dev/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name_for(&folder)},
        "spec": {
            "model": {
                "source": {"hostPath": {"path": abs.to_string_lossy()}},
                "architecture": arch,
                "dtype": dtype,
            },
        },
    });
    serde_json::from_value(md).map_err(|e| Error::Manifest {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_of_the_families_people_run() {
        let mixtral = json!({"num_hidden_layers": 32, "num_local_experts": 8,
            "num_experts_per_tok": 2, "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
            "max_position_embeddings": 32768, "head_dim": null});
        let a = architecture(&mixtral).expect("mixtral");
        assert_eq!(
            (a.num_experts, a.intermediate_size, a.head_dim),
            (8, 14336, None)
        );
        // Qwen-MoE and DeepSeek: the routed experts' size and count.
        let deepseek = json!({"num_hidden_layers": 61, "n_routed_experts": 256,
            "num_experts_per_tok": 8, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_attention_heads": 128, "vocab_size": 129280,
            "max_position_embeddings": 163840});
        let a = architecture(&deepseek).expect("deepseek");
        assert_eq!((a.num_experts, a.intermediate_size), (256, 2048));
        assert_eq!(a.num_key_value_heads, 128, "defaults to the heads");
        let e = architecture(&json!({"num_hidden_layers": 2, "num_attention_heads": 4}))
            .expect_err("no experts");
        assert!(e.to_string().contains("num_local_experts"), "{e}");
        let mut bad = mixtral.clone();
        bad["num_hidden_layers"] = json!(-1);
        let e = architecture(&bad).expect_err("negative");
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    }

    /// Elements of every tensor in a folder's safetensors files (from their headers).
    fn stored_parameters(dir: &Path) -> u64 {
        let mut total = 0;
        for entry in std::fs::read_dir(dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let bytes = std::fs::read(&path).expect("read");
            let n = u64::from_le_bytes(bytes[..8].try_into().expect("len")) as usize;
            let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
            for (name, t) in header.as_object().expect("object") {
                if name != "__metadata__" {
                    total += t["shape"]
                        .as_array()
                        .expect("shape")
                        .iter()
                        .map(|d| d.as_u64().expect("dim"))
                        .product::<u64>();
                }
            }
        }
        total
    }

    /// Every golden checkpoint (one per family): the plan sized from its config.json counts
    /// what the checkpoint stores (within the biases and norms it leaves out), and says which
    /// layers are dense and how wide the shared experts are.
    #[test]
    fn plans_from_every_family_count_the_stored_parameters() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden");
        let mut seen = 0;
        for entry in std::fs::read_dir(&root).expect("golden") {
            let dir = entry.expect("entry").path();
            if !dir.join("config.json").exists() {
                continue;
            }
            seen += 1;
            let md = deployment(&dir).expect("deployment");
            let dims = crate::planning::model_dims(&md.spec).expect("dims");
            let (planned, stored) = (dims.total_params() as f64, stored_parameters(&dir) as f64);
            assert!(
                (planned - stored).abs() / stored < 0.03,
                "{}: plan counts {planned}, the checkpoint stores {stored}",
                dir.display()
            );
            let cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("config.json")).expect("cfg"),
            )
            .expect("json");
            let a = md.spec.model.architecture.expect("architecture");
            match cfg["model_type"].as_str().expect("model_type") {
                "deepseek_v2" | "deepseek_v3" | "glm4_moe" => {
                    assert_eq!(a.dense_layers, [0], "{}", dir.display());
                    assert!(a.shared_expert_intermediate_size.is_some());
                }
                "qwen2_moe" => {
                    assert_eq!(a.dense_layers, [1], "mlp_only_layers");
                    assert_eq!(a.shared_expert_intermediate_size, Some(48));
                }
                "qwen3_moe" => assert_eq!(a.dense_layers, [0, 2], "decoder_sparse_step 2"),
                _ => assert!(
                    a.dense_layers.is_empty() && a.shared_expert_intermediate_size.is_none()
                ),
            }
            assert_eq!(
                a.latent_attention.is_some(),
                cfg.get("kv_lora_rank").is_some(),
                "{}",
                dir.display()
            );
        }
        assert!(seen >= 9, "golden checkpoints: {seen}");
    }

    #[test]
    fn folder_names_become_object_names() {
        assert_eq!(
            name_for("Mixtral-8x7B-Instruct-v0.1"),
            "mixtral-8x7b-instruct-v0-1"
        );
        assert_eq!(name_for("7b_model"), "m-7b-model");
        assert_eq!(name_for(&"x".repeat(60)).len(), 40);
    }
}
