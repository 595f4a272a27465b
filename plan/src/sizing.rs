//! Memory sizing on top of the layout: how many parameters each stage and expert shard holds,
//! the KV cache a stage keeps for its layers, and how many GPUs of a given size each pod needs.
//! The automatic expert-shard count is the smallest one whose largest shard fits one pod.

use serde::{Deserialize, Serialize};

use crate::{ExpertShardPlan, ModelShape, Plan, PlanError, StagePlan, invalid, plan};

/// Share of a GPU's memory the plan fills with weights and KV cache. The rest is left to the
/// CUDA context, activations and allocator fragmentation.
pub const USABLE_GPU_MEMORY_FRACTION: f64 = 0.9;

const GIB: u64 = 1 << 30;

/// A set of layer indices below [`crate::MAX_LAYERS`] (fixed size, so dimensions stay `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LayerSet([u64; 16]);

impl LayerSet {
    pub const EMPTY: Self = Self([0; 16]);

    /// The set of `layers`; indices at or past `MAX_LAYERS` are dropped (the planner refuses
    /// such models by their layer count first).
    pub fn of(layers: impl IntoIterator<Item = usize>) -> Self {
        let mut s = Self::EMPTY;
        for l in layers {
            if l < 1024 {
                s.0[l / 64] |= 1 << (l % 64);
            }
        }
        s
    }

    pub fn contains(&self, layer: usize) -> bool {
        layer < 1024 && self.0[layer / 64] & (1 << (layer % 64)) != 0
    }

    pub fn count_in(&self, range: std::ops::Range<usize>) -> usize {
        range.filter(|&l| self.contains(l)).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..1024).filter(|&l| self.contains(l))
    }
}

/// Multi-head latent attention (DeepSeek): its projections and its compressed KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatentDims {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// What distinguishes families beyond the Mixtral shape, for sizing: layers with a dense MLP
/// instead of experts, shared experts that run for every token, latent attention. Dense
/// MLPs and shared experts run on the stage next to attention; routed experts on expert
/// shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    pub dense_layers: LayerSet,
    pub dense_intermediate_size: usize,
    /// Total width of the shared experts of an MoE layer (0: none).
    pub shared_expert_intermediate_size: usize,
    pub latent_attention: Option<LatentDims>,
}

impl Variant {
    /// Every layer routed, no shared experts, grouped-query attention (Mixtral's shape).
    pub const PLAIN: Self = Self {
        dense_layers: LayerSet::EMPTY,
        dense_intermediate_size: 0,
        shared_expert_intermediate_size: 0,
        latent_attention: None,
    };
}

/// The widths of a Mixture-of-Experts decoder: what parameter counts and memory follow from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDims {
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub variant: Variant,
}

impl ModelDims {
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            num_layers: self.num_layers,
            num_experts: self.num_experts,
            top_k: self.top_k,
        }
    }

    /// One expert (w1, w3, w2) in one layer.
    pub fn expert_params(&self) -> u64 {
        mul(&[3, self.hidden_size as u64, self.intermediate_size as u64])
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.variant.dense_layers.contains(layer)
    }

    /// Layers with routed experts among `range`.
    pub fn moe_layers_in(&self, range: std::ops::Range<usize>) -> usize {
        range.len() - self.variant.dense_layers.count_in(range)
    }

    /// One layer's attention and two norms.
    pub fn attention_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let heads = self.num_attention_heads as u64;
        let attention = match self.variant.latent_attention {
            Some(m) => {
                let qk = (m.qk_nope_head_dim + m.qk_rope_head_dim) as u64;
                let q = match m.q_lora_rank {
                    Some(r) => add(&[mul(&[h, r as u64]), r as u64, mul(&[r as u64, heads, qk])]),
                    None => mul(&[h, heads, qk]),
                };
                add(&[
                    q,
                    mul(&[h, (m.kv_lora_rank + m.qk_rope_head_dim) as u64]),
                    m.kv_lora_rank as u64,
                    mul(&[
                        m.kv_lora_rank as u64,
                        heads,
                        (m.qk_nope_head_dim + m.v_head_dim) as u64,
                    ]),
                    mul(&[heads, m.v_head_dim as u64, h]),
                ])
            }
            None => {
                let q = mul(&[heads, self.head_dim as u64]);
                let kv = mul(&[self.num_key_value_heads as u64, self.head_dim as u64]);
                add(&[mul(&[h, add(&[q, kv, kv])]), mul(&[q, h])])
            }
        };
        add(&[attention, mul(&[2, h])])
    }

    /// What a stage holds for `layer` besides attention: the router and shared experts of an
    /// MoE layer, or the dense MLP.
    pub fn stage_ffn_params(&self, layer: usize) -> u64 {
        let h = self.hidden_size as u64;
        if !self.is_moe_layer(layer) {
            return mul(&[3, h, self.variant.dense_intermediate_size as u64]);
        }
        add(&[
            mul(&[self.num_experts as u64, h]),
            mul(&[3, h, self.variant.shared_expert_intermediate_size as u64]),
        ])
    }

    /// Everything a stage holds for the layers of `range`.
    pub fn stage_params(&self, range: std::ops::Range<usize>) -> u64 {
        range.fold(0, |acc, l| {
            add(&[acc, self.attention_params(), self.stage_ffn_params(l)])
        })
    }

    /// One layer's attention, two norms and router (an MoE layer's, shared experts included).
    pub fn layer_shared_params(&self) -> u64 {
        let first_moe = (0..self.num_layers)
            .find(|&l| self.is_moe_layer(l))
            .unwrap_or(0);
        add(&[self.attention_params(), self.stage_ffn_params(first_moe)])
    }

    pub fn embedding_params(&self) -> u64 {
        mul(&[self.vocab_size as u64, self.hidden_size as u64])
    }

    /// Final norm and LM head, as a process that holds them loads them (a tied head is a
    /// second copy there).
    pub fn head_params(&self) -> u64 {
        add(&[self.embedding_params(), self.hidden_size as u64])
    }

    pub fn total_params(&self) -> u64 {
        let untied_head = if self.tie_word_embeddings {
            0
        } else {
            self.embedding_params()
        };
        let routed = mul(&[
            self.moe_layers_in(0..self.num_layers) as u64,
            self.num_experts as u64,
            self.expert_params(),
        ]);
        add(&[
            self.embedding_params(),
            untied_head,
            self.hidden_size as u64,
            self.stage_params(0..self.num_layers),
            routed,
        ])
    }

    /// Parameters read to produce one token: shared weights, top-k experts per layer, the whole
    /// LM head (the embedding row read is negligible).
    pub fn active_params_per_token(&self) -> u64 {
        add(&[
            self.head_params(),
            self.stage_params(0..self.num_layers),
            mul(&[
                self.moe_layers_in(0..self.num_layers) as u64,
                self.top_k as u64,
                self.expert_params(),
            ]),
        ])
    }

    /// Bytes of K and V one token keeps in one layer (latent attention: its compressed
    /// latent and rotary key).
    pub fn kv_bytes_per_token_layer(&self, dtype_bytes: u64) -> u64 {
        match self.variant.latent_attention {
            Some(m) => mul(&[(m.kv_lora_rank + m.qk_rope_head_dim) as u64, dtype_bytes]),
            None => mul(&[
                2,
                self.num_key_value_heads as u64,
                self.head_dim as u64,
                dtype_bytes,
            ]),
        }
    }

    fn check(&self) -> Result<(), PlanError> {
        let nonzero = [
            ("model.hiddenSize", self.hidden_size),
            ("model.intermediateSize", self.intermediate_size),
            ("model.numAttentionHeads", self.num_attention_heads),
            ("model.numKeyValueHeads", self.num_key_value_heads),
            ("model.headDim", self.head_dim),
            ("model.vocabSize", self.vocab_size),
            ("model.maxPositionEmbeddings", self.max_position_embeddings),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "model.headDim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "model.numKeyValueHeads",
                format!(
                    "{} does not divide numAttentionHeads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        let v = &self.variant;
        if let Some(l) = v.dense_layers.iter().find(|&l| l >= self.num_layers) {
            return Err(invalid(
                "model.denseLayers",
                format!("layer {l} does not exist (numLayers {})", self.num_layers),
            ));
        }
        if v.dense_layers.iter().next().is_some() && v.dense_intermediate_size == 0 {
            return Err(invalid(
                "model.denseIntermediateSize",
                "must be at least 1 when the model has dense layers",
            ));
        }
        if let Some(m) = v.latent_attention
            && (m.kv_lora_rank == 0 || m.qk_rope_head_dim == 0 || m.v_head_dim == 0)
        {
            return Err(invalid(
                "model.latentAttention",
                "kvLoraRank, qkRopeHeadDim and vHeadDim must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Everything the sizing needs besides the model: parallelism, hardware, serving limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SizingRequest {
    pub model: ModelDims,
    /// Bytes per weight and per KV-cache element.
    pub dtype_bytes: u64,
    /// Thousandths of a byte per routed-expert weight when experts are kept in another
    /// format than `dtype_bytes` (8-bit blocks of 32 with an f32 scale: 1125); 0: the same.
    #[serde(default)]
    pub expert_millibytes: u64,
    pub stages: usize,
    /// `None`: the smallest count whose largest shard fits a pod. `Some(0)`: stages compute
    /// their own experts.
    pub expert_shards: Option<usize>,
    /// GPUs each pod splits its weights over at least (tensor parallelism).
    pub tensor: usize,
    /// The most GPUs one pod may use (one node's worth).
    pub gpus_per_pod: usize,
    pub gpu_memory_bytes: u64,
    /// Tokens of KV cache per sequence.
    pub context_tokens: usize,
    /// Sequences whose KV cache a stage holds at once.
    pub concurrent_sequences: usize,
}

impl SizingRequest {
    /// Bytes of `params` routed-expert weights.
    pub fn expert_bytes(&self, params: u64) -> u64 {
        if self.expert_millibytes == 0 {
            mul(&[params, self.dtype_bytes])
        } else {
            mul(&[params, self.expert_millibytes]).div_ceil(1000)
        }
    }

    /// What one pod can fill: `gpus_per_pod` GPUs at the usable fraction of their memory.
    pub fn pod_capacity_bytes(&self) -> u64 {
        mul(&[self.gpus_per_pod as u64, self.usable_per_gpu()])
    }

    fn usable_per_gpu(&self) -> u64 {
        (self.gpu_memory_bytes as f64 * USABLE_GPU_MEMORY_FRACTION) as u64
    }
}

/// Memory and GPUs of one pod (one replica of a stage, expert shard or the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSizing {
    pub parameters: u64,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Weights plus KV cache.
    pub memory_bytes: u64,
    pub gpus: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SizedStage {
    #[serde(flatten)]
    pub layout: StagePlan,
    #[serde(flatten)]
    pub pod: PodSizing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SizedExpertShard {
    #[serde(flatten)]
    pub layout: ExpertShardPlan,
    #[serde(flatten)]
    pub pod: PodSizing,
}

/// The layout with memory and GPUs per pod and totals (one replica of every part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SizedPlan {
    pub model: ModelDims,
    pub dtype_bytes: u64,
    pub gpu_memory_bytes: u64,
    pub context_tokens: usize,
    pub concurrent_sequences: usize,
    pub stages: Vec<SizedStage>,
    /// Empty when the stages compute their own experts.
    pub expert_shards: Vec<SizedExpertShard>,
    /// Final norm and LM head.
    pub gateway: PodSizing,
    pub total_parameters: u64,
    pub active_parameters_per_token: u64,
    pub total_gpus: usize,
    pub total_memory_bytes: u64,
}

impl SizedPlan {
    /// The layout alone, as the data plane consumes it.
    pub fn layout(&self) -> Plan {
        Plan {
            model: self.model.shape(),
            stages: self.stages.iter().map(|s| s.layout.clone()).collect(),
            expert_shards: self
                .expert_shards
                .iter()
                .map(|s| s.layout.clone())
                .collect(),
        }
    }
}

/// Lays out and sizes a deployment; errors name the spec field to change.
pub fn size(req: &SizingRequest) -> Result<SizedPlan, PlanError> {
    req.model.check()?;
    if req.dtype_bytes == 0 {
        return Err(invalid("model.dtype", "must have a size"));
    }
    if req.tensor == 0 {
        return Err(invalid("parallelism.tensor", "must be at least 1"));
    }
    if req.gpus_per_pod == 0 || req.tensor > req.gpus_per_pod {
        return Err(invalid(
            "placement.gpusPerPod",
            format!(
                "{} must be at least 1 and at least parallelism.tensor {}",
                req.gpus_per_pod, req.tensor
            ),
        ));
    }
    if req.gpu_memory_bytes == 0 {
        return Err(invalid("placement.gpuMemoryGiB", "must be at least 1"));
    }
    let shape = req.model.shape();
    let shards = match req.expert_shards {
        Some(n) => n,
        None => automatic_expert_shards(req)?,
    };
    let layout = plan(shape, req.stages, shards).map_err(|e| match e {
        PlanError::Invalid { field, message } => PlanError::Invalid {
            field: match field {
                "stages" => "parallelism.pipeline",
                "expertShards" => "parallelism.expert",
                f => f,
            },
            message,
        },
    })?;
    let experts_in_stages = layout.expert_shards.is_empty();
    let m = &req.model;

    let mut stages = Vec::with_capacity(layout.stages.len());
    for s in &layout.stages {
        let layers = (s.layer_end - s.layer_start) as u64;
        let mut params = m.stage_params(s.layer_start..s.layer_end);
        let expert_params = if experts_in_stages {
            mul(&[
                m.moe_layers_in(s.layer_start..s.layer_end) as u64,
                m.num_experts as u64,
                m.expert_params(),
            ])
        } else {
            0
        };
        // As the worker loads them: the first stage embeds, the last holds the head too.
        if s.layer_start == 0 {
            params = add(&[params, m.embedding_params()]);
        }
        if s.layer_end == m.num_layers {
            params = add(&[params, m.head_params()]);
        }
        let kv = mul(&[
            layers,
            m.kv_bytes_per_token_layer(req.dtype_bytes),
            req.context_tokens as u64,
            req.concurrent_sequences as u64,
        ]);
        let pod = pod(req, params, expert_params, kv).map_err(|need| {
            invalid(
                "parallelism.pipeline",
                format!(
                    "stage {} (layers {}..{}) needs {} for weights and {} for the KV cache of \
                     {} sequences × {} tokens, more than a pod's {}: add stages, or lower \
                     serving.maxConcurrentSequences",
                    s.index,
                    s.layer_start,
                    s.layer_end,
                    gib(need.saturating_sub(kv)),
                    gib(kv),
                    req.concurrent_sequences,
                    req.context_tokens,
                    capacity(req)
                ),
            )
        })?;
        stages.push(SizedStage {
            layout: s.clone(),
            pod,
        });
    }

    let mut expert_shards = Vec::with_capacity(layout.expert_shards.len());
    for s in &layout.expert_shards {
        let params = shard_params(m, s);
        let pod = pod(req, 0, params, 0).map_err(|need| {
            invalid(
                "parallelism.expert",
                format!(
                    "expert shard {} ({}) needs {}, more than a pod's {}: use more expert \
                     shards, or omit parallelism.expert to choose automatically",
                    s.index,
                    s.describe(),
                    gib(need),
                    capacity(req)
                ),
            )
        })?;
        expert_shards.push(SizedExpertShard {
            layout: s.clone(),
            pod,
        });
    }

    let gateway = pod(req, m.head_params(), 0, 0).map_err(|need| {
        invalid(
            "placement.gpusPerPod",
            format!(
                "the gateway's LM head needs {}, more than a pod's {}",
                gib(need),
                capacity(req)
            ),
        )
    })?;

    let pods = stages
        .iter()
        .map(|s| s.pod)
        .chain(expert_shards.iter().map(|s| s.pod))
        .chain([gateway]);
    let (total_gpus, total_memory_bytes) = pods.fold((0usize, 0u64), |(g, b), p| {
        (g.saturating_add(p.gpus), b.saturating_add(p.memory_bytes))
    });
    Ok(SizedPlan {
        model: *m,
        dtype_bytes: req.dtype_bytes,
        gpu_memory_bytes: req.gpu_memory_bytes,
        context_tokens: req.context_tokens,
        concurrent_sequences: req.concurrent_sequences,
        stages,
        expert_shards,
        gateway,
        total_parameters: m.total_params(),
        active_parameters_per_token: m.active_params_per_token(),
        total_gpus,
        total_memory_bytes,
    })
}

fn shard_params(m: &ModelDims, s: &ExpertShardPlan) -> u64 {
    mul(&[
        m.moe_layers_in(s.layer_start..s.layer_end) as u64,
        s.experts.len() as u64,
        m.expert_params(),
    ])
}

/// The pod for `params` weights (`expert_params` of them routed experts) and `kv` cache
/// bytes, or the bytes it would need when no pod is large enough.
fn pod(req: &SizingRequest, params: u64, expert_params: u64, kv: u64) -> Result<PodSizing, u64> {
    let weight_bytes = add(&[
        mul(&[params, req.dtype_bytes]),
        req.expert_bytes(expert_params),
    ]);
    let params = add(&[params, expert_params]);
    let memory_bytes = add(&[weight_bytes, kv]);
    if memory_bytes > req.pod_capacity_bytes() {
        return Err(memory_bytes);
    }
    let per_gpu = req.usable_per_gpu().max(1);
    let needed = memory_bytes.div_ceil(per_gpu).max(1) as usize;
    // Whole tensor-parallel groups.
    let gpus = needed.div_ceil(req.tensor) * req.tensor;
    Ok(PodSizing {
        parameters: params,
        weight_bytes,
        kv_cache_bytes: kv,
        memory_bytes,
        gpus: gpus.min(req.gpus_per_pod),
    })
}

/// The smallest expert-shard count whose largest shard fits one pod.
///
/// Computed from the tiling's arithmetic, not by building plans: the largest shard of `n`
/// shards holds `ceil(layers / blocks) × ceil(experts / groups)` (layer, expert) cells, and
/// no count below `cells / cells_per_pod` can fit, while `experts × ceil(layers /
/// cells_per_pod)` always does, so at most `experts + 1` counts are tried.
fn automatic_expert_shards(req: &SizingRequest) -> Result<usize, PlanError> {
    let m = &req.model;
    let cell = req.expert_bytes(m.expert_params()).max(1);
    let capacity_bytes = req.pod_capacity_bytes();
    if cell > capacity_bytes {
        return Err(invalid(
            "placement.gpusPerPod",
            format!(
                "one expert of one layer needs {}, more than a pod's {}: no expert sharding fits",
                gib(cell),
                capacity(req)
            ),
        ));
    }
    let (layers, experts) = (m.num_layers, m.num_experts);
    if layers == 0 || experts == 0 || layers > crate::MAX_LAYERS || experts > crate::MAX_EXPERTS {
        // plan() names the field.
        return Ok(1);
    }
    let per_pod = usize::try_from(capacity_bytes / cell).unwrap_or(usize::MAX);
    let cells = layers * experts;
    if per_pod >= cells {
        return Ok(1);
    }
    let first = cells.div_ceil(per_pod).max(1);
    let always = experts * layers.div_ceil(per_pod);
    for n in first..=always.min(crate::MAX_EXPERT_SHARDS) {
        let (groups, blocks) = crate::tiling(experts, n);
        if blocks <= layers && layers.div_ceil(blocks) * experts.div_ceil(groups) <= per_pod {
            return Ok(n);
        }
    }
    if always <= crate::MAX_EXPERT_SHARDS {
        return Ok(always);
    }
    Err(invalid(
        "placement.gpusPerPod",
        format!(
            "a pod ({}) holds {per_pod} of the {cells} expert-layers ({} each), so at least \
             {first} expert shards would be needed, more than the planner's limit {}: use larger \
             pods or a smaller dtype",
            capacity(req),
            gib(cell),
            crate::MAX_EXPERT_SHARDS
        ),
    ))
}

/// Products and sums of sizes saturate: a size past `u64::MAX` bytes fits no pod, and the
/// caller reports that, so no manifest can overflow the arithmetic.
fn mul(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |p, &f| p.saturating_mul(f))
}

fn add(terms: &[u64]) -> u64 {
    terms.iter().fold(0u64, |s, &t| s.saturating_add(t))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

fn capacity(req: &SizingRequest) -> String {
    format!(
        "{} ({} GPUs × {} × {USABLE_GPU_MEMORY_FRACTION})",
        gib(req.pod_capacity_bytes()),
        req.gpus_per_pod,
        gib(req.gpu_memory_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-4 as publicly reported: 120 layers, 16 experts of ~111B each, ~55B shared.
    const GPT4: ModelDims = ModelDims {
        num_layers: 120,
        num_experts: 16,
        top_k: 2,
        hidden_size: 10752,
        intermediate_size: 28672,
        num_attention_heads: 84,
        num_key_value_heads: 84,
        head_dim: 128,
        vocab_size: 100_352,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        variant: Variant::PLAIN,
    };

    fn a100(model: ModelDims) -> SizingRequest {
        SizingRequest {
            model,
            dtype_bytes: 2,
            expert_millibytes: 0,
            stages: 8,
            expert_shards: None,
            tensor: 1,
            gpus_per_pod: 8,
            gpu_memory_bytes: 80 * GIB,
            context_tokens: model.max_position_embeddings,
            concurrent_sequences: 16,
        }
    }

    fn within(actual: u64, expected: f64, tolerance: f64) -> bool {
        ((actual as f64 - expected) / expected).abs() <= tolerance
    }

    #[test]
    fn gpt4_parameter_counts_match_the_reports() {
        // ~111B per expert over all layers, ~55B shared attention.
        let per_expert = GPT4.expert_params() * 120;
        assert!(within(per_expert, 111e9, 0.01), "{per_expert}");
        let shared = GPT4.layer_shared_params() * 120;
        assert!(within(shared, 55e9, 0.02), "{shared}");
        assert!(within(GPT4.total_params(), 1.8e12, 0.03));
        assert!(within(GPT4.active_params_per_token(), 280e9, 0.05));
    }

    #[test]
    fn gpt4_fits_a100_80gb_with_automatic_expert_shards() {
        let req = a100(GPT4);
        let p = size(&req).unwrap();
        // 2 experts × 120 layers × 1.85 GB = 444 GB fits 8 × 72 GiB; 3 experts would not.
        assert_eq!(p.expert_shards.len(), 8);
        assert!(p.expert_shards.iter().all(|s| s.layout.experts.len() == 2));
        for pod in p
            .stages
            .iter()
            .map(|s| s.pod)
            .chain(p.expert_shards.iter().map(|s| s.pod))
        {
            assert!(pod.gpus <= 8);
            assert!(pod.memory_bytes <= pod.gpus as u64 * 80 * GIB);
        }
        assert_eq!(p.total_parameters, GPT4.total_params());
        let layout = p.layout();
        assert_eq!(layout, plan(GPT4.shape(), 8, 8).unwrap());
        // The KV cache: 120 layers × 2 × 10752 × 2 bytes per token.
        let kv: u64 = p.stages.iter().map(|s| s.pod.kv_cache_bytes).sum();
        assert_eq!(kv, 120 * 2 * 10752 * 2 * 8192 * 16);
    }

    #[test]
    fn automatic_shard_count_is_the_smallest_that_fits() {
        let mut req = a100(GPT4);
        req.gpus_per_pod = 4; // 288 GiB: one expert over all layers (207 GiB) fits, two don't.
        let p = size(&req).unwrap();
        assert_eq!(p.expert_shards.len(), 16);
        req.expert_shards = Some(15);
        let e = size(&req).unwrap_err().to_string();
        assert!(e.starts_with("parallelism.expert: expert shard 0"), "{e}");
    }

    /// The old search, by building every plan: the smallest count whose largest shard fits.
    fn brute_force_shards(req: &SizingRequest) -> Option<usize> {
        let m = &req.model;
        (1..=m.num_layers * m.num_experts).find(|&n| {
            plan(m.shape(), req.stages, n).is_ok_and(|p| {
                p.expert_shards
                    .iter()
                    .all(|s| req.expert_bytes(shard_params(m, s)) <= req.pod_capacity_bytes())
            })
        })
    }

    #[test]
    fn automatic_shard_count_equals_the_search_over_every_plan() {
        let mut checked = 0;
        for layers in [1, 2, 3, 5, 7, 12] {
            for experts in [1, 2, 3, 6, 8, 16] {
                let model = ModelDims {
                    num_layers: layers,
                    num_experts: experts,
                    top_k: 1,
                    hidden_size: 64,
                    intermediate_size: 128,
                    num_attention_heads: 4,
                    num_key_value_heads: 4,
                    head_dim: 16,
                    vocab_size: 16,
                    max_position_embeddings: 16,
                    tie_word_embeddings: false,
                    variant: Default::default(),
                };
                let cell = model.expert_params() * 4;
                for cells_per_pod in 1..=(layers * experts + 1) as u64 {
                    let req = SizingRequest {
                        model,
                        dtype_bytes: 4,
                        expert_millibytes: 0,
                        stages: 1,
                        expert_shards: None,
                        tensor: 1,
                        gpus_per_pod: 1,
                        // Exactly `cells_per_pod` cells per pod after the usable fraction.
                        gpu_memory_bytes: ((cells_per_pod * cell) as f64
                            / USABLE_GPU_MEMORY_FRACTION)
                            .ceil() as u64,
                        context_tokens: 1,
                        concurrent_sequences: 1,
                    };
                    assert_eq!(
                        automatic_expert_shards(&req).ok(),
                        brute_force_shards(&req),
                        "{layers} layers, {experts} experts, {cells_per_pod} cells per pod"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn extreme_sizes_are_planned_or_refused_quickly_without_overflow() {
        // Every size at the CRD's maxima, and far past them (a manifest planned from a file
        // skips the API server's schema).
        let huge = ModelDims {
            num_layers: crate::MAX_LAYERS,
            num_experts: crate::MAX_EXPERTS,
            top_k: 2,
            hidden_size: 65536,
            intermediate_size: 1 << 20,
            num_attention_heads: 1024,
            num_key_value_heads: 1024,
            head_dim: 4096,
            vocab_size: 1 << 22,
            max_position_embeddings: 1 << 22,
            tie_word_embeddings: false,
            variant: Default::default(),
        };
        let started = std::time::Instant::now();
        let mut outcomes = Vec::new();
        for model in [
            huge,
            ModelDims {
                hidden_size: 8,
                intermediate_size: 8,
                ..huge
            },
            ModelDims {
                num_layers: usize::MAX,
                num_experts: usize::MAX,
                hidden_size: usize::MAX,
                intermediate_size: usize::MAX,
                num_attention_heads: usize::MAX,
                num_key_value_heads: usize::MAX,
                head_dim: usize::MAX,
                vocab_size: usize::MAX,
                ..huge
            },
        ] {
            for (gpus_per_pod, gib) in [(64, 65536), (1, 1), (64, 1)] {
                for expert_shards in [None, Some(0), Some(65536), Some(usize::MAX)] {
                    let req = SizingRequest {
                        model,
                        dtype_bytes: 4,
                        expert_millibytes: 0,
                        stages: 1024.min(model.num_layers),
                        expert_shards,
                        tensor: 1,
                        gpus_per_pod,
                        gpu_memory_bytes: gib * GIB,
                        context_tokens: model.max_position_embeddings,
                        concurrent_sequences: 1 << 20,
                    };
                    outcomes.push(size(&req).map(|p| p.expert_shards.len()));
                }
            }
        }
        // Tiny experts at the maxima fit one shard per pod once the KV cache is left out.
        let fits = size(&SizingRequest {
            model: ModelDims {
                hidden_size: 8,
                intermediate_size: 8,
                num_attention_heads: 1,
                num_key_value_heads: 1,
                head_dim: 8,
                vocab_size: 8,
                max_position_embeddings: 8,
                ..huge
            },
            dtype_bytes: 4,
            expert_millibytes: 0,
            stages: 1024,
            expert_shards: None,
            tensor: 1,
            gpus_per_pod: 1,
            gpu_memory_bytes: GIB,
            context_tokens: 8,
            concurrent_sequences: 1,
        })
        .expect("plans");
        assert_eq!(fits.expert_shards.len(), 1);
        assert!(outcomes.iter().any(Result::is_err));
        for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            let PlanError::Invalid { field, .. } = e;
            assert!(!field.is_empty());
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "planning took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn gpus_per_pod_follow_memory_and_tensor_groups() {
        let mut req = a100(GPT4);
        let p = size(&req).unwrap();
        // 444 GB of weights over 72 GiB GPUs: 6 GPUs.
        assert_eq!(p.expert_shards[0].pod.gpus, 6);
        req.tensor = 4;
        let p = size(&req).unwrap();
        assert_eq!(p.expert_shards[0].pod.gpus, 8);
        assert!(p.stages.iter().all(|s| s.pod.gpus % 4 == 0));
    }

    #[test]
    fn rejects_what_cannot_fit_with_the_reason() {
        let mut req = a100(GPT4);
        req.gpu_memory_bytes = GIB; // 0.9 GiB per pod of 8... below one expert-layer (1.7 GiB).
        req.gpus_per_pod = 1;
        req.tensor = 1;
        let e = size(&req).unwrap_err().to_string();
        assert!(
            e.starts_with("placement.gpusPerPod: one expert of one layer needs 1.7 GiB"),
            "{e}"
        );

        let mut req = a100(GPT4);
        req.concurrent_sequences = 1000;
        let e = size(&req).unwrap_err().to_string();
        assert!(e.starts_with("parallelism.pipeline: stage 0"), "{e}");
        assert!(e.contains("serving.maxConcurrentSequences"), "{e}");

        let mut req = a100(GPT4);
        req.tensor = 16;
        assert!(
            size(&req)
                .unwrap_err()
                .to_string()
                .starts_with("placement.gpusPerPod")
        );
        let mut req = a100(GPT4);
        req.stages = 121;
        assert!(
            size(&req)
                .unwrap_err()
                .to_string()
                .starts_with("parallelism.pipeline")
        );
        let mut req = a100(GPT4);
        req.model.num_key_value_heads = 5;
        assert!(
            size(&req)
                .unwrap_err()
                .to_string()
                .starts_with("model.numKeyValueHeads")
        );
    }

    #[test]
    fn experts_in_stages_when_asked() {
        let tiny = ModelDims {
            num_layers: 4,
            num_experts: 8,
            top_k: 2,
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            vocab_size: 512,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            variant: Default::default(),
        };
        let mut req = a100(tiny);
        req.stages = 2;
        req.expert_shards = Some(0);
        let p = size(&req).unwrap();
        assert!(p.expert_shards.is_empty());
        let stage_params: u64 = p.stages.iter().map(|s| s.pod.parameters).sum();
        // Every parameter lives in a stage; the gateway holds a second copy of the head.
        assert_eq!(stage_params, tiny.total_params());
        assert_eq!(p.total_gpus, 3);
        // Automatic: everything fits one shard.
        req.expert_shards = None;
        assert_eq!(size(&req).unwrap().expert_shards.len(), 1);
    }

    #[test]
    fn serialises_flat_camel_case() {
        let p = size(&a100(GPT4)).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["stages"][1]["layerStart"], 15);
        assert!(v["stages"][1]["kvCacheBytes"].as_u64().unwrap() > 0);
        assert_eq!(v["expertShards"][0]["experts"][1], 1);
        assert!(v["totalParameters"].as_u64().is_some());
        assert!(v["activeParametersPerToken"].as_u64().is_some());
        let back: SizedPlan = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}
