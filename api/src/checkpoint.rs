//! What a Hugging Face checkpoint's `config.json` says about the deployment: its
//! `spec.model.architecture`, and a `MoEDeployment` serving the folder.

use std::path::Path;

use serde_json::{Value, json};

use crate::crd::{Architecture, MoEDeployment};
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
    Ok(Architecture {
        num_layers: req(&["num_hidden_layers"])?,
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
