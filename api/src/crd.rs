//! The `MoEDeployment` resource (`serving.moe.dev/v1alpha1`). The CRD YAML under `crds/` is
//! generated from these types (`moe-operator crd`); the API server enforces the OpenAPI schema
//! and the CEL rules declared here, so an inconsistent spec never reaches the reconciler.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state: the model, how it is split, where it runs, how it scales and serves.
// Each `printcolumn(...)` repeats `type_`, which the lint reads as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "serving.moe.dev",
    version = "v1alpha1",
    kind = "MoEDeployment",
    validation = Rule::new(
        "self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message("metadata.name must be at most 40 characters, lowercase letters, digits and '-', starting with a letter: the Services and workloads of a MoEDeployment are named after it"),
    plural = "moedeployments",
    shortname = "moe",
    category = "moe",
    namespaced,
    status = "MoEDeploymentStatus",
    doc = "A Mixture-of-Experts model served as pipeline stages, expert shards and a gateway",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Stages",
        type_ = "integer",
        description = "ready pipeline stages",
        json_path = ".status.readyStages"
    ),
    printcolumn(
        name = "ExpertShards",
        type_ = "integer",
        description = "expert shards with at least one ready replica",
        json_path = ".status.readyExpertShards"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "expert-shard replicas, all shards together",
        json_path = ".status.expertReplicas"
    ),
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        description = "GPUs the plan requests",
        json_path = ".status.gpus"
    ),
    printcolumn(
        name = "Tok/s",
        type_ = "number",
        description = "generated tokens per second the gateways measured over the last window with traffic",
        json_path = ".status.performance.measured.tokensPerSecond"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.model.architecture) || self.parallelism.pipeline <= self.model.architecture.numLayers"
).message("spec.parallelism.pipeline must not exceed spec.model.architecture.numLayers").field_path(".parallelism.pipeline"))]
#[x_kube(validation = Rule::new(
    "self.parallelism.tensor <= self.placement.gpusPerPod"
).message("spec.parallelism.tensor must not exceed spec.placement.gpusPerPod").field_path(".parallelism.tensor"))]
#[x_kube(validation = Rule::new(
    "!has(self.replicas) || !has(self.serving) || !has(self.serving.maxConcurrentSequences) || self.replicas <= self.serving.maxConcurrentSequences"
).message("spec.replicas must not exceed spec.serving.maxConcurrentSequences (the gateways share the stages' sequences)").field_path(".replicas"))]
#[serde(rename_all = "camelCase")]
pub struct MoEDeploymentSpec {
    pub model: ModelSpec,
    #[serde(default)]
    pub parallelism: Parallelism,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub experts: ExpertsSpec,
    #[serde(default)]
    pub serving: Serving,
    /// Worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of every worker container; GPUs come from the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Gateway replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub replicas: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Required unless the source supplies it (a synthetic preset; `config.json` of a
    /// checkpoint once the operator reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
    pub source: ModelSource,
    #[serde(default)]
    pub dtype: DType,
    /// The format routed experts are kept in on the workers: as stored when unset, or `q8`
    /// (8-bit blocks of 32 weights with one f32 scale, quantised at load: 1.125 bytes per
    /// weight, counted by the planner), `bf16` or `f32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_dtype: Option<ExpertDType>,
    /// `cl100k_base`, or a `tokenizer.json` path inside the source; defaults to the
    /// checkpoint's own `tokenizer.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// Hugging Face `config.json` fields, camelCase.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.topK <= self.numExperts")
    .message("spec.model.architecture.topK must not exceed numExperts").field_path(".topK"))]
#[x_kube(validation = Rule::new("self.numAttentionHeads % self.numKeyValueHeads == 0")
    .message("spec.model.architecture.numKeyValueHeads must divide numAttentionHeads")
    .field_path(".numKeyValueHeads"))]
#[x_kube(validation = Rule::new("has(self.headDim) || (self.hiddenSize / self.numAttentionHeads >= 2 && (self.hiddenSize / self.numAttentionHeads) % 2 == 0)")
    .message("spec.model.architecture.numAttentionHeads must split hiddenSize into an even head size of at least 2 (hiddenSize / numAttentionHeads), or give headDim")
    .field_path(".numAttentionHeads"))]
#[x_kube(validation = Rule::new("!has(self.headDim) || self.headDim % 2 == 0")
    .message("spec.model.architecture.headDim must be even (rotary embeddings rotate pairs)")
    .field_path(".headDim"))]
#[x_kube(validation = Rule::new("!has(self.denseLayers) || self.denseLayers.all(l, l >= 0 && l < self.numLayers)")
    .message("spec.model.architecture.denseLayers must list layers below numLayers")
    .field_path(".denseLayers"))]
#[x_kube(validation = Rule::new("!has(self.denseLayers) || size(self.denseLayers) == 0 || has(self.denseIntermediateSize)")
    .message("spec.model.architecture.denseIntermediateSize is required with denseLayers")
    .field_path(".denseIntermediateSize"))]
#[serde(rename_all = "camelCase")]
pub struct Architecture {
    #[schemars(range(min = 1, max = 1024))]
    pub num_layers: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub num_experts: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub top_k: i32,
    #[schemars(range(min = 1, max = 65536))]
    pub hidden_size: i32,
    #[schemars(range(min = 1, max = 1048576))]
    pub intermediate_size: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub num_attention_heads: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub num_key_value_heads: i32,
    /// Defaults to hiddenSize / numAttentionHeads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4096))]
    pub head_dim: Option<i32>,
    #[schemars(range(min = 1, max = 4194304))]
    pub vocab_size: i32,
    /// The context length the KV cache is sized for.
    #[schemars(range(min = 1, max = 4194304))]
    pub max_position_embeddings: i32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `config.json`'s `model_type` (informational: the workers read the checkpoint's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Layers with a dense MLP instead of routed experts (DeepSeek's and GLM's first layers,
    /// Qwen's `mlp_only_layers`); they run on the stage, next to attention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub dense_layers: Vec<i32>,
    /// Width of a dense layer's MLP (where experts use `intermediateSize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub dense_intermediate_size: Option<i32>,
    /// Total width of the shared experts every MoE layer runs for every token (Qwen2-MoE,
    /// DeepSeek, GLM); they run on the stage, next to attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub shared_expert_intermediate_size: Option<i32>,
    /// Multi-head latent attention (DeepSeek-V2/V3): sizes its projections and its
    /// compressed KV cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_attention: Option<LatentAttention>,
}

/// Multi-head latent attention's widths, as `config.json` names them.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LatentAttention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub q_lora_rank: Option<i32>,
    #[schemars(range(min = 1, max = 65536))]
    pub kv_lora_rank: i32,
    #[schemars(range(min = 1, max = 4096))]
    pub qk_nope_head_dim: i32,
    #[schemars(range(min = 1, max = 4096))]
    pub qk_rope_head_dim: i32,
    #[schemars(range(min = 1, max = 4096))]
    pub v_head_dim: i32,
}

/// Where the weights come from: exactly one of the fields.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.pvc), has(self.hostPath), has(self.synthetic)].filter(x, x).size() == 1")
    .message("spec.model.source must set exactly one of pvc, hostPath, synthetic"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticSource>,
}

/// A Hugging Face checkpoint folder on a PersistentVolumeClaim, mounted read-only.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.claimName.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
    .message("spec.model.source.pvc.claimName must be a PersistentVolumeClaim name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)")
    .field_path(".claimName"))]
#[x_kube(validation = Rule::new("!has(self.path) || !self.path.matches('(^|/)[.][.](/|$)')")
    .message("spec.model.source.pvc.path must stay inside the volume (no '..')")
    .field_path(".path"))]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Folder inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub path: Option<String>,
}

/// A checkpoint folder on every node, mounted read-only at the same path in the workers.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.path.startsWith('/') && self.path != '/' && !self.path.matches('(^|/)[.][.](/|$)') && !self.path.contains(':') && !self.path.matches('^/etc/moe(/|$)')")
    .message("spec.model.source.hostPath.path must be an absolute folder other than '/', without '..' or ':', outside /etc/moe (the workers mount it at the same path)")
    .field_path(".path"))]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    #[schemars(length(min = 2, max = 4096))]
    pub path: String,
}

/// Deterministic weights: each tensor a pure function of the seed and its name.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticSource {
    /// A preset of `moe-worker` (tiny, tiny-hot, mini, base, gpt4-mini).
    #[schemars(length(min = 1))]
    pub preset: String,
    #[serde(default)]
    pub seed: i64,
}

/// Storage dtype of the weights and the KV cache.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    #[default]
    Bf16,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// The format routed experts are kept in.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExpertDType {
    F32,
    Bf16,
    Q8,
}

impl ExpertDType {
    /// The worker's `--expert-dtype` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        }
    }

    /// Thousandths of a byte per weight.
    pub fn millibytes(self) -> u64 {
        match self {
            Self::F32 => 4000,
            Self::Bf16 => 2000,
            Self::Q8 => 1125,
        }
    }
}

/// The element type of activations between workers.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    #[default]
    F32,
    Bf16,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Parallelism {
    /// Pipeline stages; each owns a contiguous layer range.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub pipeline: i32,
    /// Expert shards. Omit to let the planner pick the fewest that fit a pod; 0 makes the
    /// stages compute their own experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65536))]
    pub expert: Option<i32>,
    /// GPUs each pod splits its weights over at least.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub tensor: i32,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            pipeline: 1,
            expert: None,
            tensor: 1,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// `nvidia.com/gpu.product` label value GPU pods select.
    #[serde(default = "default_gpu_product")]
    pub gpu_product: String,
    #[serde(default = "default_gpu_memory_gib", rename = "gpuMemoryGiB")]
    #[schemars(range(min = 1, max = 65536))]
    pub gpu_memory_gib: i32,
    /// The most GPUs one pod may use (one node's worth).
    #[serde(default = "default_gpus_per_pod")]
    #[schemars(range(min = 1, max = 64))]
    pub gpus_per_pod: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            gpu_product: default_gpu_product(),
            gpu_memory_gib: default_gpu_memory_gib(),
            gpus_per_pod: default_gpus_per_pod(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
        }
    }
}

/// Replicas of each expert shard.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("spec.experts.minReplicas must not exceed maxReplicas").field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct ExpertsSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_replicas: i32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// Settings of single expert shards that differ from the deployment's (image, weights,
    /// resources). Changing one shard's entry rolls only that shard's replicas, one at a time,
    /// each drained before it stops; the other shards and the stages are untouched. At most
    /// 256 entries (the API server bounds the cost of the sources' validation rules by it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["shard"])
    )]
    pub shards: Vec<ExpertShardOverride>,
}

impl Default for ExpertsSpec {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 1,
            autoscaling: Autoscaling::default(),
            shards: Vec::new(),
        }
    }
}

/// One expert shard's own settings.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExpertShardOverride {
    /// The shard's index in the plan (`moe-operator plan` lists them; status.expertShardStatus).
    #[schemars(range(min = 0, max = 65535))]
    pub shard: i32,
    /// Image of this shard's pods, in place of `spec.image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Where this shard's pods read their weights, in place of `spec.model.source`: another
    /// revision of the same checkpoint (same architecture; only this shard's experts are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ModelSource>,
    /// CPU and memory of this shard's containers, in place of `spec.resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Replicas per expert shard from the routed-token load.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    #[serde(default)]
    pub enabled: bool,
    /// Who moves the replica counts: the operator itself, an HPA or KEDA on each expert
    /// shard's scale subresource, or nobody.
    #[serde(default)]
    pub driver: AutoscalingDriver,
    /// Routed tokens per second one replica should serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub target_tokens_per_second_per_replica: Option<i32>,
    /// The most expert-shard replicas, all shards together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub total_replica_budget: Option<i32>,
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0))]
    pub scale_down_stabilization_seconds: i32,
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0))]
    pub cooldown_seconds: i32,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            enabled: false,
            driver: AutoscalingDriver::default(),
            target_tokens_per_second_per_replica: None,
            total_replica_budget: None,
            scale_down_stabilization_seconds: default_scale_down_stabilization(),
            cooldown_seconds: default_cooldown(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingDriver {
    #[default]
    Operator,
    Hpa,
    Keda,
    None,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Serving {
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_batch_size: i32,
    /// Sequences in flight; each stage keeps their KV cache, so this sizes stage memory.
    #[serde(default = "default_max_concurrent_sequences")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_concurrent_sequences: i32,
    /// Bearer key the gateway requires; open when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Worker-to-worker traffic in plaintext: neither encrypted nor authenticated. An explicit
    /// opt-out for benchmarks; by default workers speak mutual TLS with certificates the
    /// operator issues from the deployment's own CA.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
    /// Element type of the activations workers send each other: `f32` (exact), or `bf16`
    /// (half the bytes per hop; every value rounded to nearest, as bf16 engines compute).
    #[serde(default, skip_serializing_if = "is_default")]
    pub wire_dtype: WireDType,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            max_concurrent_sequences: default_max_concurrent_sequences(),
            api_key_secret: None,
            plaintext: false,
            wire_dtype: WireDType::F32,
        }
    }
}

/// A key of a Secret in the deployment's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MoEDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub stages: i32,
    #[serde(default)]
    pub ready_stages: i32,
    #[serde(default)]
    pub expert_shards: i32,
    #[serde(default)]
    pub ready_expert_shards: i32,
    /// Replicas of all expert shards together.
    #[serde(default)]
    pub expert_replicas: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_shard_status: Vec<ExpertShardStatus>,
    #[serde(default)]
    pub gateway_ready_replicas: i32,
    /// `host:port` of the gateway Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_endpoint: Option<String>,
    #[serde(default)]
    pub gpus: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_parameters: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_parameters_per_token: Option<i64>,
    /// What the operator's expert autoscaler last saw and decided (driver `operator`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The architecture the operator read from the checkpoint's `config.json` (when the spec
    /// names a volume and no `model.architecture`), and the source it was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    /// The performance model's estimate for the plan next to what the gateways measure, and
    /// how far they are apart (condition `PerformanceAsPlanned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<PerformanceStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceStatus {
    /// What the performance model predicts for this spec generation's plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<PerformanceEstimate>,
    /// What the gateways measured over the last window that had traffic (kept while there is
    /// none, or while the gateways cannot be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<MeasuredPerformance>,
    /// The measurement against the estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<PerformanceDeparture>,
    /// Why the gateways' statistics could not be read, while no read has succeeded since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_error: Option<String>,
    /// When reading them began to fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_error_since: Option<Time>,
}

/// The performance model's prediction (`moe-operator plan --estimate`) for the plan on the
/// hardware profile of `spec.placement.gpuProduct`, at full micro-batches.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceEstimate {
    /// The spec generation it was computed for.
    pub observed_generation: i64,
    /// The hardware profile used; absent when the GPU product has none (see `message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_profile: Option<String>,
    /// Sequences per micro-batch assumed (`serving.maxConcurrentSequences` over the
    /// micro-batches).
    pub batch: i32,
    /// Micro-batches in flight: each gateway's lanes, one per stage and at least two.
    pub micro_batches: i32,
    /// Prompt and generated tokens per request assumed.
    pub prompt_tokens: i32,
    pub output_tokens: i32,
    /// Time to first token of one prompt, no queueing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_seconds: Option<f64>,
    /// Time per output token at full micro-batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_seconds: Option<f64>,
    /// Generated tokens per second, the whole deployment at full micro-batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Why there are no figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the gateways measured: every ready gateway pod's counters, differences over the window.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeasuredPerformance {
    /// Generated tokens per second, all gateways together.
    pub tokens_per_second: f64,
    /// Mean time from admission to the first token of the sequences that got one in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_seconds: Option<f64>,
    /// Mean time between two tokens of one sequence in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_seconds: Option<f64>,
    /// Tokens generated in the window.
    pub generated_tokens: i64,
    /// Length of the window.
    pub window_seconds: f64,
    /// Gateway pods read.
    pub gateways: i32,
    /// When the window ended.
    pub sampled_at: Time,
}

/// Measured over estimated, and what it means.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceDeparture {
    /// Measured time per output token over the estimate (above the operator's tolerance for
    /// long enough: `PerformanceAsPlanned` False, reason `SlowerThanPlanned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ratio: Option<f64>,
    /// Measured tokens per second over the estimate at full micro-batches (below 1 at light
    /// load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second_ratio: Option<f64>,
    /// Since when every measurement had time per output token above the tolerance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slower_since: Option<Time>,
    /// E.g. "TPOT 2.3x the plan's estimate (41 ms vs 18 ms)".
    pub message: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Which `spec.model.source` (and worker image) this was read from.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Smoothed routed tokens per second, all expert shards together.
    #[serde(default)]
    pub tokens_per_second: i64,
    /// The busiest replica's load over the mean load per replica, at the current replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_imbalance: Option<f64>,
    /// The latest decision and its inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,
    /// When replicas last changed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// The gateway pod whose statistics were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExpertShardStatus {
    pub index: i32,
    pub layer_start: i32,
    pub layer_end: i32,
    pub experts: Vec<i32>,
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Smoothed routed tokens per second over this shard's (layer, expert) pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<i64>,
    /// Replicas the autoscaler wants (equal to `replicas` once applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
}

fn one() -> i32 {
    1
}

fn default_gpu_product() -> String {
    "NVIDIA-A100-SXM4-80GB".to_string()
}

fn default_gpu_memory_gib() -> i32 {
    80
}

fn default_gpus_per_pod() -> i32 {
    8
}

fn default_scale_down_stabilization() -> i32 {
    300
}

fn default_cooldown() -> i32 {
    60
}

fn default_max_batch_size() -> i32 {
    32
}

fn default_max_concurrent_sequences() -> i32 {
    16
}
