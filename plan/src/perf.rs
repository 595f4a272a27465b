//! A performance model of a planned deployment: pure, closed-form, fast enough to search
//! layouts with.
//!
//! Every operator is a roofline: its time is the larger of its floating-point work over the
//! hardware's dense peak times an efficiency, and its bytes (weights read, KV cache read) over
//! the memory bandwidth times an efficiency. A decode step of one micro-batch runs every layer
//! of every stage in turn: attention on the stage (tensor-parallel over the pod's GPUs, with an
//! all-reduce over NVLink), the dispatch of each token's hidden state to its top-k experts'
//! shards, the experts (each shard reads the weights of the experts its tokens hit, its rows
//! split over its replicas), and the combine; then the hop to the next stage. Micro-batches
//! pipeline over the stages, so the token rate is bounded by the busiest stage or expert shard
//! over all micro-batches, and a token's latency by the whole step. Routing skew (Zipf) makes
//! hot experts' shards the bottleneck unless they have replicas.
//!
//! What is not modelled: overlap of communication with compute (none is assumed, as the data
//! plane does today), kernel launch overheads (folded into the efficiencies), and queueing
//! (the discrete-event simulator adds it).

use serde::{Deserialize, Serialize};

use crate::sizing::SizedPlan;

/// One accelerator (or this machine's CPU, as a profile measured here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hardware {
    pub name: String,
    pub memory_bytes: u64,
    /// Published HBM bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Dense bf16 FLOP/s (no sparsity).
    pub peak_flops: f64,
    /// Share of `peak_flops` large matrix products reach.
    pub compute_efficiency: f64,
    /// Share of `memory_bandwidth` weight streaming reaches.
    pub bandwidth_efficiency: f64,
    /// Between GPUs of one node, bytes/s one way.
    pub nvlink_bandwidth: f64,
    /// Between nodes, per GPU, bytes/s one way.
    pub network_bandwidth: f64,
    /// One message between nodes (or processes), seconds.
    pub network_latency: f64,
    /// Fixed seconds per operator (kernel launches, synchronisation): what keeps a tiny
    /// model's step from taking no time.
    pub op_overhead: f64,
    /// Fixed seconds per row of an operator (per-token bookkeeping the roofline does not
    /// count: a CPU's norms, rotary, attention loops, routing; 0 on a GPU, where a kernel
    /// takes its rows at once).
    #[serde(default)]
    pub row_overhead: f64,
    /// Price of one GPU-hour (USD).
    pub price_per_hour: f64,
    /// Seconds of compute one hop costs its two ends (encoding, encryption, system calls,
    /// wake-ups): on a GPU the copy engines and NICs move the bytes (0); parts sharing one
    /// CPU spend it from the cores they compute with.
    #[serde(default)]
    pub hop_cpu: f64,
    /// For a CPU machine measured by `moe-worker profile`: the figures above are one process's
    /// (its threads); this is the machine the processes share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
}

/// The machine a profile's processes share (see [`Layout::shared_device`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    /// Cores: processes that compute at once.
    pub cores: usize,
    /// Read bandwidth of all cores together, bytes/s.
    pub memory_bandwidth: f64,
    /// Chains of processes handing work to each other that progress at once (measured: one
    /// per core at best; less where waking idle cores and scheduling cost time). Absent: as
    /// many as cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_chains: Option<f64>,
}

impl Hardware {
    /// Why this profile cannot be planned with (a field that names its problem), if so: rates
    /// and efficiencies must be positive, times and prices not negative, a host's figures
    /// positive.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("memoryBandwidth", self.memory_bandwidth),
            ("peakFlops", self.peak_flops),
            ("computeEfficiency", self.compute_efficiency),
            ("bandwidthEfficiency", self.bandwidth_efficiency),
            ("nvlinkBandwidth", self.nvlink_bandwidth),
            ("networkBandwidth", self.network_bandwidth),
        ];
        if let Some((field, v)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(format!("{field} must be a positive number, not {v}"));
        }
        let not_negative = [
            ("networkLatency", self.network_latency),
            ("opOverhead", self.op_overhead),
            ("rowOverhead", self.row_overhead),
            ("hopCpu", self.hop_cpu),
            ("pricePerHour", self.price_per_hour),
        ];
        if let Some((field, v)) = not_negative
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
        {
            return Err(format!("{field} must be a number of at least 0, not {v}"));
        }
        if let Some(h) = &self.host {
            if h.cores == 0 {
                return Err("host.cores must be at least 1".into());
            }
            if !(h.memory_bandwidth.is_finite() && h.memory_bandwidth > 0.0) {
                return Err(format!(
                    "host.memoryBandwidth must be a positive number, not {}",
                    h.memory_bandwidth
                ));
            }
            if let Some(c) = h.call_chains
                && !(c.is_finite() && c > 0.0)
            {
                return Err(format!(
                    "host.callChains must be a positive number, not {c}"
                ));
            }
        }
        Ok(())
    }

    /// How many parts of a deployment on one device of this profile make progress at once:
    /// one for a GPU (its parts take turns); on a CPU host, its cores, or fewer when the
    /// cores together cannot stream more than that many processes' worth of memory, or when
    /// the host runs fewer chains of calls at once than it has cores.
    pub fn parallel_parts(&self) -> f64 {
        self.host.as_ref().map_or(1.0, |h| {
            let by_bandwidth = if self.memory_bandwidth > 0.0 {
                h.memory_bandwidth / self.memory_bandwidth
            } else {
                f64::INFINITY
            };
            (h.cores as f64)
                .min(by_bandwidth)
                .min(h.call_chains.unwrap_or(f64::INFINITY))
                .max(1.0)
        })
    }
}

const GB: f64 = 1e9;
const TB: f64 = 1e12;

/// Published figures of the GPUs the operator plans for. Efficiencies are typical of large
/// bf16 products (cuBLAS) and weight streaming; calibration replaces them.
pub fn gpu_profiles() -> Vec<Hardware> {
    let gpu =
        |name: &str, mem_gib: u64, bw: f64, flops: f64, nvlink: f64, net: f64, price| Hardware {
            name: name.into(),
            memory_bytes: mem_gib << 30,
            memory_bandwidth: bw,
            peak_flops: flops,
            compute_efficiency: 0.7,
            bandwidth_efficiency: 0.8,
            nvlink_bandwidth: nvlink,
            network_bandwidth: net,
            network_latency: 10e-6,
            // One modelled operator is a group of kernels (an attention block: norm, QKV,
            // rotary, attention, output; an expert block: router, top-k, gate/up/down, combine),
            // each with a floor of a few microseconds once launched.
            op_overhead: 20e-6,
            row_overhead: 0.0,
            price_per_hour: price,
            hop_cpu: 0.0,
            host: None,
        };
    vec![
        // SXM4: HBM2 1.555 TB/s, HBM2e 2.039 TB/s; 312 TFLOP/s bf16; NVLink 3 600 GB/s both
        // ways; HDR InfiniBand 200 Gb/s per GPU.
        gpu(
            "a100-40gb",
            40,
            1.555 * TB,
            312e12,
            300.0 * GB,
            25.0 * GB,
            1.5,
        ),
        gpu(
            "a100-80gb",
            80,
            2.039 * TB,
            312e12,
            300.0 * GB,
            25.0 * GB,
            2.0,
        ),
        // SXM5: 3.35 TB/s, 989 TFLOP/s dense bf16; NVLink 4 900 GB/s; NDR 400 Gb/s.
        gpu(
            "h100-80gb",
            80,
            3.35 * TB,
            989e12,
            450.0 * GB,
            50.0 * GB,
            3.0,
        ),
        // H200: the H100 with 141 GB of HBM3e at 4.8 TB/s.
        gpu(
            "h200-141gb",
            141,
            4.8 * TB,
            989e12,
            450.0 * GB,
            50.0 * GB,
            3.8,
        ),
    ]
}

/// A profile by name (`a100-80gb`, ...).
pub fn gpu_profile(name: &str) -> Option<Hardware> {
    gpu_profiles().into_iter().find(|h| h.name == name)
}

/// How the planned parts run: replicas, micro-batches, and where the hops go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// Replicas of each expert shard (missing: 1).
    pub expert_replicas: Vec<usize>,
    /// Micro-batches in flight through the pipeline.
    pub micro_batches: usize,
    /// Bytes per activation element on the wire (4: f32, 2: bf16).
    pub wire_bytes: u64,
    /// Hops between pods cross the network (else NVLink: parts on one node).
    pub across_nodes: bool,
    /// Every part runs on the one device the profile describes (the `moe-worker local`
    /// deployment on one machine): their compute shares it instead of overlapping.
    #[serde(default)]
    pub shared_device: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            expert_replicas: Vec::new(),
            micro_batches: 1,
            wire_bytes: 2,
            across_nodes: true,
            shared_device: false,
        }
    }
}

/// What the deployment serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Sequences decoding together in one micro-batch.
    pub batch: usize,
    /// Mean prompt tokens.
    pub prompt_tokens: usize,
    /// Mean generated tokens.
    pub output_tokens: usize,
    /// Zipf exponent of the experts' popularity (0: uniform routing).
    pub routing_skew: f64,
}

/// What the model predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// Prefill of one prompt through the pipeline, seconds (no queueing).
    pub time_to_first_token: f64,
    /// Between two tokens of one sequence, seconds.
    pub time_per_output_token: f64,
    /// Generated tokens per second, the whole deployment.
    pub tokens_per_second: f64,
    pub gpus: usize,
    pub tokens_per_second_per_gpu: f64,
    /// Busy share of each role's GPUs (0..1) at the modelled rate.
    pub stage_utilization: f64,
    pub expert_utilization: f64,
    /// USD per million generated tokens at the profile's price.
    pub cost_per_million_tokens: f64,
    /// Of one decode step: seconds in attention, experts, and moving activations.
    pub step_attention: f64,
    pub step_experts: f64,
    pub step_transport: f64,
}

/// One roofline: seconds for `flops` and `bytes` on `gpus` GPUs of `hw`, plus its fixed
/// overhead.
pub fn roofline(hw: &Hardware, gpus: usize, flops: f64, bytes: f64) -> f64 {
    let g = gpus.max(1) as f64;
    let compute = flops / (g * hw.peak_flops * hw.compute_efficiency);
    let memory = bytes / (g * hw.memory_bandwidth * hw.bandwidth_efficiency);
    hw.op_overhead + compute.max(memory)
}

/// [`roofline`] for an operator over `rows` rows, with their fixed costs.
pub fn roofline_rows(hw: &Hardware, gpus: usize, flops: f64, bytes: f64, rows: f64) -> f64 {
    roofline(hw, gpus, flops, bytes) + hw.row_overhead * rows.max(0.0)
}

/// Expert popularity under a Zipf law of exponent `s` (sums to 1; uniform at 0).
pub fn zipf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n.max(1))
        .map(|r| (r as f64).powf(-s.max(0.0)))
        .collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
}

/// Bytes/s of the link a hop of `layout` takes: the network between nodes, else NVLink.
pub(crate) fn link_bandwidth(hw: &Hardware, layout: &Layout) -> f64 {
    if layout.across_nodes {
        hw.network_bandwidth
    } else {
        hw.nvlink_bandwidth
    }
}

/// One message of `bytes` over the hop the layout says.
fn hop(hw: &Hardware, layout: &Layout, bytes: f64) -> f64 {
    hw.network_latency + bytes / link_bandwidth(hw, layout)
}

/// Seconds of one forward pass of `rows` tokens of one micro-batch (decode: one row per
/// sequence, `context` tokens of KV each; prefill: the prompt's rows) through the whole
/// pipeline, split as (attention, experts, transport), and the busiest stage's and expert
/// shard's share of it.
struct Pass {
    attention: f64,
    experts: f64,
    transport: f64,
    /// Per stage: seconds it is occupied by the micro-batch (its compute, and waiting for
    /// its experts: a stage runs one micro-batch at a time).
    stage_busy: Vec<f64>,
    /// Per stage: seconds its GPUs compute.
    stage_compute: Vec<f64>,
    /// Per expert shard: busy seconds of its busiest replica.
    shard_busy: Vec<f64>,
    head: f64,
    /// Hops between processes (each costs `Hardware::hop_cpu` of compute).
    hops: f64,
}

impl Pass {
    /// Seconds of one micro-batch's pass through the pipeline when nothing else runs.
    fn step(&self) -> f64 {
        self.attention + self.experts + self.transport + self.head
    }

    /// The busiest part's seconds: how often a micro-batch can enter.
    fn bottleneck(&self) -> f64 {
        let stage = self.stage_busy.iter().copied().fold(0.0, f64::max);
        let shard = self.shard_busy.iter().copied().fold(0.0, f64::max);
        stage.max(shard).max(self.head)
    }
}

fn pass(
    plan: &SizedPlan,
    hw: &Hardware,
    layout: &Layout,
    rows: usize,
    sequences: usize,
    context: usize,
    popularity: &[f64],
) -> Pass {
    let m = &plan.model;
    let h = m.hidden_size as f64;
    let rows_f = rows as f64;
    let expert_params = m.expert_params() as f64;
    let expert_bytes = expert_bytes(plan);
    let mut out = Pass {
        attention: 0.0,
        experts: 0.0,
        transport: 0.0,
        stage_busy: vec![0.0; plan.stages.len()],
        stage_compute: vec![0.0; plan.stages.len()],
        shard_busy: vec![0.0; plan.expert_shards.len()],
        head: 0.0,
        hops: 0.0,
    };
    let routed = rows_f * m.top_k as f64;
    let mut sampled: std::collections::HashMap<Vec<usize>, f64> = Default::default();
    for (s, stage) in plan.stages.iter().enumerate() {
        let g = stage.pod.gpus.max(1);
        for layer in stage.layout.layers() {
            let t = layer_seconds(plan, hw, layer, g, rows, sequences, context);
            out.attention += t;
            out.stage_busy[s] += t;
            out.stage_compute[s] += t;
            if !m.is_moe_layer(layer) {
                continue;
            }
            if plan.expert_shards.is_empty() {
                // The stage computes its own experts.
                let (flops, bytes) = expert_work(
                    m.num_experts,
                    popularity,
                    routed,
                    expert_params,
                    expert_bytes,
                    1,
                );
                let t = roofline_rows(hw, g, flops, bytes, routed);
                out.experts += t;
                out.stage_busy[s] += t;
                out.stage_compute[s] += t;
                continue;
            }
            // Dispatch and combine: each routed row's hidden state out and back.
            let wire = layout.wire_bytes.max(1) as f64;
            let moved = 2.0 * hop(hw, layout, routed * h * wire);
            out.transport += moved;
            out.stage_busy[s] += moved;
            // The layer's shards work in parallel; the step waits for the slowest.
            let mut slowest: f64 = 0.0;
            let mut summed = 0.0;
            let mut present = Vec::new();
            for (j, shard) in plan.expert_shards.iter().enumerate() {
                if !shard.layout.layers().contains(&layer) {
                    continue;
                }
                let share: Vec<f64> = shard
                    .layout
                    .experts
                    .iter()
                    .map(|&e| popularity.get(e).copied().unwrap_or(0.0))
                    .collect();
                // Each shard a row lands on is one call: two hops.
                out.hops += 2.0 * (1.0 - (-routed * share.iter().sum::<f64>()).exp());
                let replicas = layout.expert_replicas.get(j).copied().unwrap_or(1).max(1);
                let (flops, bytes) = expert_work(
                    share.len(),
                    &share,
                    routed,
                    expert_params,
                    expert_bytes,
                    replicas,
                );
                let rows = flops / (2.0 * expert_params).max(1.0);
                let t = roofline_rows(hw, shard.pod.gpus.max(1), flops, bytes, rows);
                out.shard_busy[j] += t;
                slowest = slowest.max(t);
                summed += t;
                present.push(j);
            }
            if layout.shared_device {
                // More shards at work than the device runs at once take turns.
                slowest = slowest.max(summed / hw.parallel_parts());
            }
            if routed <= SAMPLED_ROUTED_ROWS {
                // Few rows: each shard's mean time understates the wait (two tokens' experts
                // often land on one shard), so take the mean of the slowest over routings.
                let key = present.clone();
                slowest = *sampled.entry(key).or_insert_with(|| {
                    sampled_slowest(plan, hw, layout, &present, popularity, rows, expert_bytes)
                });
            }
            out.experts += slowest;
            out.stage_busy[s] += slowest;
        }
        // To the next stage, or the last stage's rows to the gateway.
        let t = hop(
            hw,
            layout,
            sequences as f64 * h * layout.wire_bytes.max(1) as f64,
        );
        out.transport += t;
        out.hops += 1.0;
    }
    out.head = head_seconds(plan, hw, sequences);
    out
}

/// Bytes of one expert's weights as its shard stores them (the plan's expert format).
pub(crate) fn expert_bytes(plan: &SizedPlan) -> f64 {
    match plan.expert_shards.first() {
        None => plan.model.expert_params() as f64 * plan.dtype_bytes as f64,
        Some(shard) => {
            shard.pod.weight_bytes as f64
                / (shard.layout.layers().len() * shard.layout.experts.len()).max(1) as f64
        }
    }
}

/// Seconds of one layer's work on a stage of `gpus` GPUs for `rows` rows of `sequences`
/// sequences with `context` tokens of KV each: attention, norms, router, shared experts and
/// dense MLPs (not the routed experts), and tensor-parallel all-reduces.
pub(crate) fn layer_seconds(
    plan: &SizedPlan,
    hw: &Hardware,
    layer: usize,
    gpus: usize,
    rows: usize,
    sequences: usize,
    context: usize,
) -> f64 {
    let m = &plan.model;
    let dtype = plan.dtype_bytes as f64;
    let rows_f = rows as f64;
    let params = (m.attention_params() + m.stage_ffn_params(layer)) as f64;
    let kv =
        sequences as f64 * context as f64 * m.kv_bytes_per_token_layer(plan.dtype_bytes) as f64;
    let score_flops = 4.0
        * sequences as f64
        * context as f64
        * m.num_attention_heads as f64
        * m.head_dim as f64
        * (rows_f / sequences.max(1) as f64);
    let mut t = roofline_rows(
        hw,
        gpus,
        2.0 * params * rows_f + score_flops,
        params * dtype + kv,
        rows_f,
    );
    if gpus > 1 {
        // Tensor parallel: two all-reduces of the rows' hidden states per layer.
        t += 2.0
            * (hw.network_latency + rows_f * m.hidden_size as f64 * dtype / hw.nvlink_bandwidth);
    }
    t
}

/// Seconds of the LM head on the gateway for each sequence's last row.
pub(crate) fn head_seconds(plan: &SizedPlan, hw: &Hardware, sequences: usize) -> f64 {
    let head = plan.model.head_params() as f64;
    roofline_rows(
        hw,
        plan.gateway.gpus.max(1),
        2.0 * head * sequences as f64,
        head * plan.dtype_bytes as f64,
        sequences as f64,
    )
}

/// Sampled routings (fixed seed): each row picks top-k distinct experts, each drawn by its
/// weight among those not yet chosen.
pub(crate) struct Router {
    weights: Vec<f64>,
    total: f64,
    k: usize,
    state: u64,
}

impl Router {
    pub(crate) fn new(popularity: &[f64], num_experts: usize, top_k: usize) -> Self {
        let weights: Vec<f64> = (0..num_experts)
            .map(|e| popularity.get(e).copied().unwrap_or(0.0).max(0.0))
            .collect();
        Self {
            total: weights.iter().sum(),
            weights,
            k: top_k.min(num_experts).clamp(1, 16),
            state: 0x243F_6A88_85A3_08D3,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Rows each expert gets from `rows` tokens, into `hits` (one count per expert); false
    /// when no expert has weight.
    pub(crate) fn route(&mut self, rows: usize, hits: &mut [usize]) -> bool {
        hits.iter_mut().for_each(|h| *h = 0);
        if self.total <= 0.0 {
            return false;
        }
        for _ in 0..rows {
            let mut chosen = [usize::MAX; 16];
            let mut left = self.total;
            for c in 0..self.k {
                let mut r = self.uniform() * left;
                let mut pick = usize::MAX;
                for (e, &w) in self.weights.iter().enumerate() {
                    if chosen[..c].contains(&e) || w <= 0.0 {
                        continue;
                    }
                    pick = e;
                    if r < w {
                        break;
                    }
                    r -= w;
                }
                if pick == usize::MAX {
                    break;
                }
                chosen[c] = pick;
                left -= self.weights[pick];
                if let Some(h) = hits.get_mut(pick) {
                    *h += 1;
                }
            }
        }
        true
    }
}

/// Routed rows (rows x top-k) up to which a layer's wait for its shards is sampled.
const SAMPLED_ROUTED_ROWS: f64 = 256.0;

/// The mean over sampled routings (fixed seed) of a layer's wait for the slowest of the expert
/// shards `present`: each of `rows` tokens picks top-k distinct experts by `popularity`; a
/// shard's call carries all its rows to one replica and reads each expert it hit once. Where
/// the layout shares one device, shards beyond its parallel parts take turns.
fn sampled_slowest(
    plan: &SizedPlan,
    hw: &Hardware,
    layout: &Layout,
    present: &[usize],
    popularity: &[f64],
    rows: usize,
    expert_bytes: f64,
) -> f64 {
    const SAMPLES: usize = 64;
    let m = &plan.model;
    // Which shard among `present` holds each expert (its layers hold the layer).
    let mut owner = vec![usize::MAX; m.num_experts];
    for (i, &j) in present.iter().enumerate() {
        for &e in &plan.expert_shards[j].layout.experts {
            if let Some(o) = owner.get_mut(e) {
                *o = i;
            }
        }
    }
    let mut router = Router::new(popularity, m.num_experts, m.top_k);
    let expert_params = m.expert_params() as f64;
    let mut hits = vec![0usize; m.num_experts];
    let mut acc = 0.0;
    for _ in 0..SAMPLES {
        if !router.route(rows, &mut hits) {
            return 0.0;
        }
        let mut slowest: f64 = 0.0;
        let mut summed = 0.0;
        for (i, &j) in present.iter().enumerate() {
            let (mut routed, mut touched) = (0usize, 0usize);
            for (e, &h) in hits.iter().enumerate() {
                if owner[e] == i && h > 0 {
                    routed += h;
                    touched += 1;
                }
            }
            if routed == 0 {
                continue;
            }
            let t = roofline_rows(
                hw,
                plan.expert_shards[j].pod.gpus.max(1),
                2.0 * expert_params * routed as f64,
                touched as f64 * expert_bytes,
                routed as f64,
            );
            slowest = slowest.max(t);
            summed += t;
        }
        if layout.shared_device {
            slowest = slowest.max(summed / hw.parallel_parts());
        }
        acc += slowest;
    }
    acc / SAMPLES as f64
}

/// FLOPs and bytes of one replica of a group of experts (`share[i]`: the fraction of routed
/// rows expert i gets) for `routed` rows split over `replicas`: it reads the weights of every
/// expert at least one of its rows hits.
fn expert_work(
    n: usize,
    share: &[f64],
    routed: f64,
    expert_params: f64,
    expert_bytes: f64,
    replicas: usize,
) -> (f64, f64) {
    let r = replicas as f64;
    let mut flops = 0.0;
    let mut touched = 0.0;
    for &p in share.iter().take(n) {
        let rows = routed * p / r;
        flops += 2.0 * expert_params * rows;
        // Chance that at least one of its rows lands on this expert (rows Poisson-ish).
        touched += 1.0 - (-rows).exp();
    }
    (flops, touched * expert_bytes)
}

/// Seconds each stage is occupied by one step of `rows` rows over `sequences` sequences with
/// `context` tokens of KV each (its layers, their experts and hops; the last stage also the
/// LM head): the service times the simulator runs on.
pub fn stage_seconds(
    plan: &SizedPlan,
    hw: &Hardware,
    layout: &Layout,
    routing_skew: f64,
    rows: usize,
    sequences: usize,
    context: usize,
) -> Vec<f64> {
    let popularity = zipf(plan.model.num_experts, routing_skew);
    let p = pass(
        plan,
        hw,
        layout,
        rows.max(1),
        sequences.max(1),
        context,
        &popularity,
    );
    let mut out = p.stage_busy;
    if let Some(last) = out.last_mut() {
        *last += p.head;
    }
    out
}

/// The model's estimate for `plan` on `hw` with `layout`, serving `w`.
pub fn estimate(plan: &SizedPlan, hw: &Hardware, layout: &Layout, w: &Workload) -> Estimate {
    let popularity = zipf(plan.model.num_experts, w.routing_skew);
    let b = w.batch.max(1);
    let context = w.prompt_tokens + w.output_tokens / 2;
    let decode = pass(plan, hw, layout, b, b, context, &popularity);
    let step = decode.step();
    let mb = layout.micro_batches.max(1) as f64;
    // The busiest part's seconds per micro-batch bound how often a micro-batch can start.
    let bottleneck = decode.bottleneck();
    // A sequence's next token waits for its micro-batch to come round again.
    let cycle = if layout.shared_device {
        // Every part's work of every micro-batch shares the one device: simulated, as the
        // bounds (the critical path, all work over the parallel parts) are far apart there.
        crate::host::simulate(plan, hw, layout, w).cycle
    } else {
        step.max(mb * bottleneck)
    };
    let tokens_per_second = mb * b as f64 / cycle;
    let prefill = pass(
        plan,
        hw,
        layout,
        w.prompt_tokens.max(1),
        1,
        w.prompt_tokens / 2,
        &popularity,
    );
    let ttft = prefill.attention + prefill.experts + prefill.transport + prefill.head;
    let stage_gpus: usize = plan.stages.iter().map(|s| s.pod.gpus.max(1)).sum();
    let expert_gpus: usize = plan
        .expert_shards
        .iter()
        .enumerate()
        .map(|(j, s)| {
            s.pod.gpus.max(1) * layout.expert_replicas.get(j).copied().unwrap_or(1).max(1)
        })
        .sum();
    let gpus = stage_gpus + expert_gpus + plan.gateway.gpus;
    let stage_busy: f64 = decode.stage_compute.iter().sum();
    let shard_busy: f64 = decode
        .shard_busy
        .iter()
        .enumerate()
        .map(|(j, t)| t * layout.expert_replicas.get(j).copied().unwrap_or(1).max(1) as f64)
        .sum();
    let per_cycle = |busy: f64, parts: usize| {
        if parts == 0 {
            0.0
        } else {
            (mb * busy / (cycle * parts as f64)).min(1.0)
        }
    };
    let replicas: usize = (0..plan.expert_shards.len())
        .map(|j| layout.expert_replicas.get(j).copied().unwrap_or(1).max(1))
        .sum();
    Estimate {
        time_to_first_token: ttft,
        time_per_output_token: cycle,
        tokens_per_second,
        gpus,
        tokens_per_second_per_gpu: tokens_per_second / gpus.max(1) as f64,
        stage_utilization: per_cycle(stage_busy, plan.stages.len()),
        expert_utilization: per_cycle(shard_busy, replicas),
        cost_per_million_tokens: gpus as f64 * hw.price_per_hour / 3600.0 / tokens_per_second * 1e6,
        step_attention: decode.attention,
        step_experts: decode.experts,
        step_transport: decode.transport,
    }
}

/// One stage's visit by a step, split the way the discrete-event simulator serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageParts {
    /// Seconds the stage works on its own: its layers' attention, norms, router, shared and
    /// dense MLPs, the dispatch and combine of routed rows (and the experts, when the plan has
    /// no expert shards); on the last stage also the LM head.
    pub compute: f64,
    /// Per expert shard: seconds one replica takes for one call carrying every layer of this
    /// stage the shard holds and all the step's rows routed to it (0: it holds none of them).
    pub shard_seconds: Vec<f64>,
    /// Per expert shard: rows routed to it over those layers, summed over (layer, expert) as the
    /// gateway's counters count them.
    pub shard_rows: Vec<f64>,
}

/// Per stage, its own seconds and its calls to the expert shards for one step of `rows` rows
/// over `sequences` sequences with `context` tokens of KV each, experts chosen with
/// `popularity` (one share per expert, e.g. [`zipf`] in any order). With every shard's slowest
/// call added, `compute` is [`stage_seconds`] at one replica per shard when every layer's
/// slowest shard is the same one (shards that split experts and hold whole stages).
pub fn stage_parts(
    plan: &SizedPlan,
    hw: &Hardware,
    layout: &Layout,
    popularity: &[f64],
    rows: usize,
    sequences: usize,
    context: usize,
) -> Vec<StageParts> {
    let (rows, sequences) = (rows.max(1), sequences.max(1));
    // A call goes to one replica with all its rows: price it at one replica.
    let one = Layout {
        expert_replicas: Vec::new(),
        ..layout.clone()
    };
    let m = &plan.model;
    let routed = (rows * m.top_k) as f64;
    let last = plan.stages.len().saturating_sub(1);
    let mut alone = plan.clone();
    plan.stages
        .iter()
        .enumerate()
        .map(|(s, stage)| {
            alone.stages = vec![stage.clone()];
            let p = pass(&alone, hw, &one, rows, sequences, context, popularity);
            // The stage's occupancy less its waits for the slowest shard of each layer.
            let mut compute = if plan.expert_shards.is_empty() {
                p.stage_busy[0]
            } else {
                (p.stage_busy[0] - p.experts).max(0.0)
            };
            if s == last {
                compute += p.head;
            }
            let shard_rows = plan
                .expert_shards
                .iter()
                .map(|shard| {
                    let layers = stage
                        .layout
                        .layers()
                        .filter(|&l| shard.layout.layers().contains(&l) && m.is_moe_layer(l))
                        .count();
                    let share: f64 = shard
                        .layout
                        .experts
                        .iter()
                        .map(|&e| popularity.get(e).copied().unwrap_or(0.0))
                        .sum();
                    routed * share * layers as f64
                })
                .collect();
            StageParts {
                compute,
                shard_seconds: p.shard_busy,
                shard_rows,
            }
        })
        .collect()
}
