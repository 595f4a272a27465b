//! What the performance tests share.

use moe_plan::{ModelDims, SizedPlan, SizingRequest, Variant, size};

/// Mixtral-8x7B's shape (its config.json).
pub fn mixtral() -> ModelDims {
    ModelDims {
        num_layers: 32,
        num_experts: 8,
        top_k: 2,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        vocab_size: 32000,
        max_position_embeddings: 32768,
        tie_word_embeddings: false,
        variant: Variant::default(),
    }
}

/// Mixtral-8x7B in bf16 over `stages` stages and `shards` expert shards on 80 GB GPUs (one per
/// pod), 4k-token contexts, 64 sequences.
#[allow(dead_code)] // not every test file plans
pub fn mixtral_plan(stages: usize, shards: usize) -> SizedPlan {
    size(&SizingRequest {
        model: mixtral(),
        dtype_bytes: 2,
        expert_millibytes: 0,
        stages,
        expert_shards: Some(shards),
        tensor: 1,
        gpus_per_pod: 1,
        gpu_memory_bytes: 80 << 30,
        context_tokens: 4096,
        concurrent_sequences: 64,
    })
    .expect("plan")
}
