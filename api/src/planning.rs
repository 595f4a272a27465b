//! From a `MoEDeployment` spec to the sized plan: the same `moe-plan` code the data plane runs.

use moe_plan::{LatentDims, LayerSet, ModelDims, SizedPlan, SizingRequest, Variant};

use crate::crd::{Architecture, MoEDeploymentSpec};
use crate::error::{Error, Result};

const GIB: u64 = 1 << 30;

/// Architectures of `moe-worker`'s synthetic presets, so that a synthetic source needs no
/// `architecture` in the spec. Must match engine/src/synthetic.rs.
fn preset(name: &str) -> Option<ModelDims> {
    // (vocab, hidden, intermediate, layers, heads, kv heads, experts, top-k, context)
    let (v, h, i, l, heads, kv, e, k, ctx) = match name {
        // tiny-hot: tiny's shape, routers skewed towards experts 0-3 (weights differ, not shape).
        "tiny" | "tiny-hot" => (512, 64, 128, 4, 4, 2, 8, 2, 2048),
        "mini" => (32000, 512, 1408, 8, 8, 2, 8, 2, 32768),
        "base" => (32000, 1024, 2816, 8, 16, 4, 8, 2, 32768),
        "gpt4-mini" => (100_352, 128, 256, 120, 8, 2, 16, 2, 8192),
        _ => return None,
    };
    Some(ModelDims {
        num_layers: l,
        num_experts: e,
        top_k: k,
        hidden_size: h,
        intermediate_size: i,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: h / heads,
        vocab_size: v,
        max_position_embeddings: ctx,
        tie_word_embeddings: false,
        variant: Variant::PLAIN,
    })
}

/// Negative numbers cannot pass the schema; reading one as 0 lets the planner name the field.
fn count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// The planner's dimensions of an architecture (a manifest's, or a checkpoint's config.json
/// read by [`crate::checkpoint::architecture`]).
pub fn dims(a: &Architecture) -> ModelDims {
    let heads = count(a.num_attention_heads);
    ModelDims {
        num_layers: count(a.num_layers),
        num_experts: count(a.num_experts),
        top_k: count(a.top_k),
        hidden_size: count(a.hidden_size),
        intermediate_size: count(a.intermediate_size),
        num_attention_heads: heads,
        num_key_value_heads: count(a.num_key_value_heads),
        head_dim: a
            .head_dim
            .map(count)
            .unwrap_or_else(|| count(a.hidden_size) / heads.max(1)),
        vocab_size: count(a.vocab_size),
        max_position_embeddings: count(a.max_position_embeddings),
        tie_word_embeddings: a.tie_word_embeddings,
        variant: Variant {
            // Negative or too-large indices: the schema refuses them; the planner names the
            // field for any that reach it.
            dense_layers: LayerSet::of(
                a.dense_layers
                    .iter()
                    .map(|&l| usize::try_from(l).unwrap_or(usize::MAX)),
            ),
            dense_intermediate_size: a.dense_intermediate_size.map_or(0, count),
            shared_expert_intermediate_size: a.shared_expert_intermediate_size.map_or(0, count),
            latent_attention: a.latent_attention.as_ref().map(|m| LatentDims {
                q_lora_rank: m.q_lora_rank.map(count),
                kv_lora_rank: count(m.kv_lora_rank),
                qk_nope_head_dim: count(m.qk_nope_head_dim),
                qk_rope_head_dim: count(m.qk_rope_head_dim),
                v_head_dim: count(m.v_head_dim),
            }),
        },
    }
}

/// The model's dimensions: from the spec, or from the synthetic preset.
pub fn model_dims(spec: &MoEDeploymentSpec) -> Result<ModelDims> {
    if let Some(a) = &spec.model.architecture {
        if let Some(l) = a.dense_layers.iter().find(|&&l| l < 0 || l >= a.num_layers) {
            return Err(Error::invalid(
                "spec.model.architecture.denseLayers",
                format!("layer {l} does not exist (numLayers {})", a.num_layers),
            ));
        }
        return Ok(dims(a));
    }
    match &spec.model.source.synthetic {
        Some(s) => preset(&s.preset).ok_or_else(|| {
            Error::invalid(
                "spec.model.source.synthetic.preset",
                format!(
                    "unknown preset `{}` (known: tiny, tiny-hot, mini, base, gpt4-mini); \
                     or give spec.model.architecture",
                    s.preset
                ),
            )
        }),
        None => Err(Error::invalid(
            "spec.model.architecture",
            "required to plan a checkpoint on a volume here (`moe-operator plan -f DIR` reads a \
             checkpoint folder's config.json; in a cluster the operator reads it from the volume)",
        )),
    }
}

pub fn sizing_request(spec: &MoEDeploymentSpec) -> Result<SizingRequest> {
    let model = model_dims(spec)?;
    let gib = u64::try_from(spec.placement.gpu_memory_gib).unwrap_or(0);
    Ok(SizingRequest {
        model,
        dtype_bytes: spec.model.dtype.bytes(),
        expert_millibytes: spec.model.expert_dtype.map_or(0, |d| d.millibytes()),
        stages: count(spec.parallelism.pipeline),
        expert_shards: spec.parallelism.expert.map(count),
        tensor: count(spec.parallelism.tensor),
        gpus_per_pod: count(spec.placement.gpus_per_pod),
        gpu_memory_bytes: gib * GIB,
        context_tokens: model.max_position_embeddings,
        concurrent_sequences: count(spec.serving.max_concurrent_sequences),
    })
}

/// The most workloads (stage and expert-shard Deployments) one MoEDeployment may have.
pub const MAX_WORKLOADS: usize = 4096;
/// The most worker pods one MoEDeployment's minimum replica counts may ask for.
pub const MAX_MIN_WORKER_PODS: u64 = 16384;

/// The plan for `spec`; errors name the spec field. Besides what the planner checks, the plan
/// must stay within what one object may make the operator create: [`MAX_WORKLOADS`]
/// workloads and [`MAX_MIN_WORKER_PODS`] worker pods at the minimum replica counts.
pub fn plan(spec: &MoEDeploymentSpec) -> Result<SizedPlan> {
    let req = sizing_request(spec)?;
    let plan = moe_plan::size(&req).map_err(|e| match e {
        moe_plan::PlanError::Invalid { field, message } => {
            Error::invalid(format!("spec.{field}"), message)
        }
    })?;
    let (stages, shards) = (plan.stages.len(), plan.expert_shards.len());
    if stages + shards > MAX_WORKLOADS {
        return Err(Error::invalid(
            "spec.parallelism.expert",
            format!(
                "the plan has {stages} stages and {shards} expert shards, more than the \
                 {MAX_WORKLOADS} workloads one MoEDeployment may have: use fewer, larger shards"
            ),
        ));
    }
    for (i, o) in spec.experts.shards.iter().enumerate() {
        if usize::try_from(o.shard).map_or(true, |j| j >= shards) {
            return Err(Error::invalid(
                format!("spec.experts.shards[{i}].shard"),
                format!(
                    "the plan has {shards} expert shards (0..{shards}); there is no shard {}",
                    o.shard
                ),
            ));
        }
        if spec.experts.shards[..i].iter().any(|p| p.shard == o.shard) {
            return Err(Error::invalid(
                format!("spec.experts.shards[{i}].shard"),
                format!("shard {} is listed twice", o.shard),
            ));
        }
    }
    let min = u64::try_from(spec.experts.min_replicas.max(1)).unwrap_or(1);
    let pods = stages as u64 + shards as u64 * min;
    if pods > MAX_MIN_WORKER_PODS {
        return Err(Error::invalid(
            "spec.experts.minReplicas",
            format!(
                "{min} replicas of {shards} expert shards plus {stages} stages is {pods} worker \
                 pods, more than the {MAX_MIN_WORKER_PODS} one MoEDeployment may ask for"
            ),
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_overrides_name_a_planned_shard_once() {
        let base = "model:\n  source: {synthetic: {preset: tiny}}\nparallelism: {pipeline: 2, expert: 2}\n";
        let ok = spec(&format!(
            "{base}experts:\n  shards: [{{shard: 1, image: 'x:1'}}, {{shard: 0}}]\n"
        ));
        assert!(plan(&ok).is_ok());
        for (shards, field, words) in [
            ("[{shard: 2}]", "spec.experts.shards[0].shard", "no shard 2"),
            (
                "[{shard: 1}, {shard: 1}]",
                "spec.experts.shards[1].shard",
                "twice",
            ),
        ] {
            let e = plan(&spec(&format!("{base}experts:\n  shards: {shards}\n"))).unwrap_err();
            let Error::Invalid { field: f, message } = &e else {
                panic!("{e}")
            };
            assert_eq!(f, field);
            assert!(message.contains(words), "{message}");
        }
    }

    fn spec(yaml_spec: &str) -> MoEDeploymentSpec {
        serde_yaml::from_str(yaml_spec).expect("spec")
    }

    /// 1024 layers × 1024 tiny experts: every size within the CRD's maxima.
    const WIDE: &str = "model:\n  source: {synthetic: {preset: tiny}}\n  architecture: {numLayers: 1024, \
        numExperts: 1024, topK: 2, hiddenSize: 8, intermediateSize: 8, numAttentionHeads: 1, \
        numKeyValueHeads: 1, vocabSize: 8, maxPositionEmbeddings: 8}\n";

    #[test]
    fn plans_that_would_flood_the_cluster_are_refused_naming_the_field() {
        let e = plan(&spec(&format!(
            "{WIDE}parallelism: {{pipeline: 4, expert: 65536}}\n"
        )))
        .expect_err("65536 shards");
        assert!(
            e.to_string().contains("spec.parallelism.expert") && e.to_string().contains("4096"),
            "{e}"
        );
        let e = plan(&spec(&format!(
            "{WIDE}parallelism: {{pipeline: 4, expert: 4000}}\nexperts: {{minReplicas: 5, maxReplicas: 5}}\n"
        )))
        .expect_err("20000 pods");
        assert!(e.to_string().contains("spec.experts.minReplicas"), "{e}");
        let ok = plan(&spec(&format!(
            "{WIDE}parallelism: {{pipeline: 4, expert: 4000}}\n"
        )))
        .expect("4004 workloads");
        assert_eq!(ok.expert_shards.len(), 4000);
    }

    #[test]
    fn tiny_hot_plans_like_tiny() {
        assert_eq!(preset("tiny-hot"), preset("tiny"));
        assert!(preset("tiny-cold").is_none());
    }
}
