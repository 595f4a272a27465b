//! What the performance tests share.

use moe_plan::{ModelDims, Variant};

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
