//! The cheapest layout that meets latency targets within a GPU budget (`moe-operator plan
//! --optimize`).
//!
//! **The space** is what a MoEDeployment lets a user set: pipeline stages, expert shards (0: the
//! stages compute their own experts), tensor parallelism, replicas of every expert shard (one
//! count for all: the spec has no per-shard count, the autoscaler moves them at run time), and
//! the sequences of one micro-batch (`batch`: the gateways split
//! `serving.maxConcurrentSequences` over their lanes). Micro-batches are not a free choice:
//! each gateway runs one lane per stage, at least two, so a layout has `gateways × max(stages,
//! 2)` of them, and its stages keep the KV cache of `batch ×` that many sequences.
//!
//! **A point** is sized with [`crate::size`] (a pod that does not fit its GPUs is reported with
//! the planner's reason), its GPUs counted as deployed (stages, every replica of every expert
//! shard, every gateway), and estimated with [`perf::estimate`].
//!
//! **Percentiles, at an arrival rate.** The closed form has no queueing: it gives the prompt's
//! unloaded prefill `P` (time to first token when nothing waits) and the cycle `C` between two
//! tokens of a sequence at full micro-batches. The percentiles are derived at `λ` requests/s
//! (Poisson), `n` output tokens each, for the `c = micro-batches × batch` sequence slots:
//! - Joining sequences' prompts run in their lane's steps and hold up the lanes that take turns
//!   at the same stages (`k = min(micro-batches, stages)` of them share the busiest stage):
//!   they take a share `λ·P/k` of its time, so a token's interval is `C' = C / (1 − λ·P/k)`.
//! - A request holds its slot `S = n·C'`; `λ·S ≥ c` means the layout cannot sustain the rate.
//!   Its capacity, `c / (n·C + c·P/k)` requests/s, times `n` is the throughput the cost is
//!   priced at (GPUs × the profile's price per million tokens): every slot busy, prompts
//!   included.
//! - Waiting for a slot is M/D/c: the chance to wait is Erlang C(c, λS) (exact for M/M/c,
//!   close for deterministic service), and its tail `P(W > t) ≈ C·exp(−2(c/S − λ)·t)`: M/M/c's
//!   exponential tail with its rate doubled for deterministic service (the heavy-traffic
//!   `(ca² + cs²)/2 = 1/2`), which gives M/D/1's mean wait exactly.
//! - An admitted sequence then waits for its lane's step in flight: `q·C'` at quantile `q`.
//! - `TTFT_q = P + q·C' + W_q` (quantiles added rather than convolved, which overstates the
//!   tail a little); `TPOT_q = C'` for every `q` (the model has no spread; full micro-batches
//!   are the slowest a token's interval gets at any load).
//!
//! [`simulate`] runs the discrete-event simulator (lanes, prompt rows in steps, stages taking
//! one micro-batch at a time, expert shards' replicas serving calls in turn) on a point to
//! confirm; `plan/tests/search.rs` checks the two agree on moderately loaded layouts.
//!
//! **The search** gives the same winner as evaluating every point (tests check it against
//! exhaustive enumeration), with less work: a point whose GPU count is over the budget however it
//! is sized (every pod has at least `tensor` GPUs) is rejected before sizing; sizing is shared by
//! the replica counts; along increasing batch (same stages, shards, tensor, replicas) a batch
//! that does not fit memory ends the row (the KV cache only grows), and once a batch misses a
//! TPOT target, or its unloaded prefill alone misses a TTFT target, larger batches whose pods
//! have the same GPUs are not estimated (the model's time per token never shortens with batch,
//! an invariant `plan/tests/perf.rs` checks, and the prefill does not depend on it). With shards
//! at 0, replica counts are the same layout and only the first is evaluated. When nothing
//! meets the targets, the skipped points are evaluated too, so the closest miss named is the
//! closest of the whole space.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::perf::{self, Estimate, Hardware, Layout, Workload};
use crate::sizing::{SizedPlan, SizingRequest, size};
use crate::{PlanError, invalid};

/// What a target bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Time to first token: from a request's arrival to its first generated token.
    Ttft,
    /// Time per output token: a sequence's interval between two tokens.
    Tpot,
}

/// A latency target: `metric` at `quantile` at most `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub metric: Metric,
    /// 0.99 for p99.
    pub quantile: f64,
    pub seconds: f64,
}

impl Target {
    /// `ttft.p99=2s`, `tpot.p50=80ms`, `ttft.p99.9=3s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, limit) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not METRIC.pNN=DURATION (e.g. ttft.p99=2s)"))?;
        let (metric, pct) = name
            .trim()
            .split_once('.')
            .ok_or_else(|| format!("`{name}` is not METRIC.pNN (e.g. ttft.p99, tpot.p50)"))?;
        let metric = match metric.to_ascii_lowercase().as_str() {
            "ttft" => Metric::Ttft,
            "tpot" => Metric::Tpot,
            m => return Err(format!("unknown metric `{m}` (ttft or tpot)")),
        };
        Ok(Self {
            metric,
            quantile: parse_percentile(pct)?,
            seconds: parse_seconds(limit)?,
        })
    }

    /// `TTFT p99`.
    pub fn name(&self) -> String {
        let m = match self.metric {
            Metric::Ttft => "TTFT",
            Metric::Tpot => "TPOT",
        };
        let p = format!("{:.3}", self.quantile * 100.0);
        format!("{m} p{}", p.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// `p99` → 0.99, `p99.9` → 0.999, `p50` → 0.5.
pub fn parse_percentile(s: &str) -> Result<f64, String> {
    let digits = s
        .trim()
        .strip_prefix(['p', 'P'])
        .ok_or_else(|| format!("`{s}` is not a percentile such as p50, p99 or p99.9"))?;
    match digits.parse::<f64>() {
        Ok(p) if p > 0.0 && p < 100.0 => Ok(p / 100.0),
        _ => Err(format!(
            "`{s}` is not a percentile such as p50, p99 or p99.9 (between p0 and p100)"
        )),
    }
}

/// `2s`, `80ms`, `1.5s`, `250us` → seconds (positive and finite; a unit is required).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let split = t.find(char::is_alphabetic).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "" => return Err(format!("`{s}` needs a unit: s, ms or us (e.g. 2s, 80ms)")),
        u => return Err(format!("`{s}`: unknown unit `{u}` (s, ms or us)")),
    };
    match number.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v * scale),
        _ => Err(format!("`{s}` is not a positive duration (e.g. 2s, 80ms)")),
    }
}

/// Seconds for people: `2.00 s`, `80.0 ms`, `250 µs`.
pub fn seconds(t: f64) -> String {
    if !t.is_finite() {
        "-".into()
    } else if t >= 1.0 {
        format!("{t:.2} s")
    } else if t >= 1e-3 {
        format!("{:.1} ms", t * 1e3)
    } else {
        format!("{:.0} µs", t * 1e6)
    }
}

/// What is fixed while the layout varies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The model, its dtypes, the GPUs' memory, GPUs per pod and context tokens; its stages,
    /// expert shards, tensor and concurrent sequences are each point's.
    pub request: SizingRequest,
    pub hardware: Hardware,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Zipf exponent of the experts' popularity.
    pub routing_skew: f64,
    /// Bytes per activation element on the wire.
    pub wire_bytes: u64,
    pub across_nodes: bool,
    /// Gateway replicas: each runs `max(stages, 2)` lanes and has its own pod for the LM head.
    pub gateways: usize,
    /// Requests per second (Poisson) the percentiles are at.
    pub rate: f64,
    pub targets: Vec<Target>,
    /// The most GPUs the deployment may use (`None`: no budget).
    pub max_gpus: Option<usize>,
}

impl Problem {
    /// Refuses what the search cannot answer, naming the field.
    pub fn check(&self) -> Result<(), PlanError> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(invalid(
                "rate",
                format!("{} must be a positive number of requests/s", self.rate),
            ));
        }
        if self.max_gpus == Some(0) {
            return Err(invalid("maxGpus", "must be at least 1"));
        }
        if self.gateways == 0 {
            return Err(invalid("gateways", "must be at least 1"));
        }
        if self.output_tokens == 0 {
            return Err(invalid("outputTokens", "must be at least 1"));
        }
        for t in &self.targets {
            if !(t.quantile > 0.0 && t.quantile < 1.0) {
                return Err(invalid(
                    "targets",
                    format!("quantile {} is not within (0, 1)", t.quantile),
                ));
            }
            if !(t.seconds > 0.0 && t.seconds.is_finite()) {
                return Err(invalid(
                    "targets",
                    format!("{}: {} s is not a positive time", t.name(), t.seconds),
                ));
            }
        }
        // The model itself (every point would fail alike): sized where memory cannot run out.
        size(&SizingRequest {
            stages: 1,
            expert_shards: Some(0),
            tensor: 1,
            gpus_per_pod: 1,
            gpu_memory_bytes: u64::MAX / 4,
            concurrent_sequences: 1,
            ..self.request
        })?;
        Ok(())
    }
}

/// The values each dimension may take.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Space {
    pub stages: Vec<usize>,
    pub expert_shards: Vec<usize>,
    pub tensor: Vec<usize>,
    pub expert_replicas: Vec<usize>,
    pub batch: Vec<usize>,
}

impl Space {
    /// Sorted, without repeats, and without zeros where zero means nothing (all but expert
    /// shards).
    pub fn normalised(&self) -> Self {
        let clean = |v: &[usize], zero_ok: bool| {
            let mut v: Vec<usize> = v.iter().copied().filter(|&x| zero_ok || x > 0).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        Self {
            stages: clean(&self.stages, false),
            expert_shards: clean(&self.expert_shards, true),
            tensor: clean(&self.tensor, false),
            expert_replicas: clean(&self.expert_replicas, false),
            batch: clean(&self.batch, false),
        }
    }

    /// Every point, in the order the search visits them.
    pub fn points(&self) -> Vec<Point> {
        let s = self.normalised();
        let mut out = Vec::with_capacity(s.len());
        for &stages in &s.stages {
            for &expert_shards in &s.expert_shards {
                for &tensor in &s.tensor {
                    for &expert_replicas in &s.expert_replicas {
                        for &batch in &s.batch {
                            out.push(Point {
                                stages,
                                expert_shards,
                                tensor,
                                expert_replicas,
                                batch,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        let s = self.normalised();
        [
            s.stages.len(),
            s.expert_shards.len(),
            s.tensor.len(),
            s.expert_replicas.len(),
            s.batch.len(),
        ]
        .iter()
        .fold(1usize, |a, &n| a.saturating_mul(n))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub stages: usize,
    pub expert_shards: usize,
    pub tensor: usize,
    /// Replicas of every expert shard.
    pub expert_replicas: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
}

impl Point {
    /// Micro-batches in flight: each gateway's lanes, one per stage and at least two.
    pub fn micro_batches(&self, gateways: usize) -> usize {
        gateways.max(1).saturating_mul(self.stages.max(2))
    }

    /// Sequences running at once (`serving.maxConcurrentSequences`), the stages' KV caches.
    pub fn concurrent_sequences(&self, gateways: usize) -> usize {
        self.batch.saturating_mul(self.micro_batches(gateways))
    }
}

/// Why a point is not the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Reason {
    /// More GPUs than the budget; `atLeast`: a bound known before sizing (every pod has at
    /// least `tensor` GPUs).
    #[serde(rename_all = "camelCase")]
    OverBudget {
        gpus: usize,
        budget: usize,
        at_least: bool,
    },
    /// The planner refuses the shape (a shard count that cannot tile the model, tensor above
    /// GPUs per pod, more stages than layers).
    Invalid { message: String },
    /// A pod does not fit its GPUs' memory: the planner's reason.
    DoesNotFit { message: String },
    /// Its sequence slots serve fewer requests per second than arrive.
    Saturated { capacity: f64, rate: f64 },
    /// A target missed: `achieved` seconds at its quantile.
    Misses { target: Target, achieved: f64 },
    /// A time-to-first-token target missed without bound: the queue grows (with `Saturated`).
    Unbounded { target: Target },
    /// A simulated mean time per token above a TPOT target at a quantile the simulator does
    /// not report (p50 and p99 it does): a mean above the limit is a miss at any quantile
    /// above the median, near enough.
    TpotMean { target: Target, mean: f64 },
}

impl Reason {
    pub fn describe(&self) -> String {
        match self {
            Self::OverBudget {
                gpus,
                budget,
                at_least,
            } => format!(
                "over budget: {}{gpus} GPUs > {budget}",
                if *at_least { "at least " } else { "" }
            ),
            Self::Invalid { message } => format!("not a valid layout: {message}"),
            Self::DoesNotFit { message } => format!("does not fit memory: {message}"),
            Self::Saturated { capacity, rate } => {
                format!("cannot sustain {rate:.3} requests/s (at most {capacity:.3})")
            }
            Self::Misses { target, achieved } => format!(
                "misses {} by {} ({} > {})",
                target.name(),
                seconds(achieved - target.seconds),
                seconds(*achieved),
                seconds(target.seconds)
            ),
            Self::Unbounded { target } => {
                format!("misses {}: the queue grows without bound", target.name())
            }
            Self::TpotMean { target, mean } => format!(
                "misses {}: the mean alone is {} > {}",
                target.name(),
                seconds(*mean),
                seconds(target.seconds)
            ),
        }
    }

    /// How far from meeting it, relative (0.1: 10% over); `None` where no amount says it (the
    /// layout is invalid or does not fit).
    pub fn shortfall(&self) -> Option<f64> {
        match self {
            Self::OverBudget { gpus, budget, .. } => {
                Some(*gpus as f64 / (*budget).max(1) as f64 - 1.0)
            }
            Self::Saturated { capacity, rate } => Some(if *capacity > 0.0 {
                rate / capacity - 1.0
            } else {
                f64::INFINITY
            }),
            Self::Misses { target, achieved } => Some(achieved / target.seconds - 1.0),
            Self::TpotMean { target, mean } => Some(mean / target.seconds - 1.0),
            Self::Unbounded { .. } => Some(f64::INFINITY),
            Self::Invalid { .. } | Self::DoesNotFit { .. } => None,
        }
    }
}

/// The queueing view of one estimated layout (see the module's doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Unloaded time to first token (the closed form's prefill), seconds.
    pub prefill: f64,
    /// Between two tokens of a sequence at full micro-batches, prompts left out, seconds.
    pub cycle: f64,
    /// Share of a lane's time (of the busiest stage's, when lanes share stages) spent on the
    /// prompts of joining sequences at the rate: `λ·P / min(micro-batches, stages)`.
    pub prompt_share: f64,
    /// Sequences served at once.
    pub slots: usize,
    /// Requests per second the slots serve at most, prompts included.
    pub capacity: f64,
    pub rate: f64,
    /// Busy share of the slots at `rate` (at least 1: the queue grows without bound).
    pub utilization: f64,
    /// Chance that a request waits for a slot.
    pub wait_probability: f64,
    /// Generated tokens per second with every slot busy, prompts included.
    pub tokens_per_second: f64,
}

impl Latency {
    fn of(e: &Estimate, p: &Point, gateways: usize, output_tokens: usize, rate: f64) -> Self {
        let n = output_tokens.max(1) as f64;
        let slots = p.concurrent_sequences(gateways);
        let c = slots as f64;
        let (prefill, cycle) = (e.time_to_first_token, e.time_per_output_token);
        // Lanes that take turns at the busiest stage: a prompt there delays each of them.
        let sharing = p.micro_batches(gateways).min(p.stages).max(1) as f64;
        let prompt_share = rate * prefill / sharing;
        // A slot's seconds per request: n tokens at the cycle stretched by the prompts.
        let per_request = n * cycle + c * prefill / sharing;
        let capacity = if per_request > 0.0 && per_request.is_finite() {
            c / per_request
        } else {
            0.0
        };
        let utilization = if prompt_share < 1.0 && capacity > 0.0 {
            rate * n * cycle / (1.0 - prompt_share) / c
        } else {
            f64::INFINITY
        };
        let wait_probability = if utilization < 1.0 {
            erlang_c(slots, utilization * c)
        } else {
            1.0
        };
        Self {
            prefill,
            cycle,
            prompt_share,
            slots,
            capacity,
            rate,
            utilization,
            wait_probability,
            tokens_per_second: capacity * n,
        }
    }

    /// Seconds a request holds its slot (`None`: prompts alone fill the lanes).
    pub fn service(&self, output_tokens: usize) -> Option<f64> {
        Some(output_tokens.max(1) as f64 * self.tpot(0.5)?)
    }

    /// Seconds a request waits for a slot, at quantile `q` (`None`: the queue grows without
    /// bound).
    pub fn wait(&self, q: f64) -> Option<f64> {
        if self.utilization.is_nan() || self.utilization >= 1.0 {
            return None;
        }
        let tail = 1.0 - q;
        if self.wait_probability <= tail {
            return Some(0.0);
        }
        // c/S - λ, with S = c·utilization/λ.
        let spare = self.rate * (1.0 / self.utilization - 1.0);
        Some((self.wait_probability / tail).ln() / (2.0 * spare))
    }

    /// Time to first token at quantile `q` (`None` when saturated).
    pub fn ttft(&self, q: f64) -> Option<f64> {
        Some(self.prefill + q * self.tpot(q)? + self.wait(q)?)
    }

    /// Time per output token at quantile `q`: the cycle stretched by joining prompts (the
    /// model has no spread; `None` when prompts alone fill the lanes).
    pub fn tpot(&self, _q: f64) -> Option<f64> {
        (self.prompt_share < 1.0).then(|| self.cycle / (1.0 - self.prompt_share))
    }

    /// `target`'s value (`None`: unbounded, the layout is saturated).
    pub fn value(&self, target: &Target) -> Option<f64> {
        match target.metric {
            Metric::Ttft => self.ttft(target.quantile),
            Metric::Tpot => self.tpot(target.quantile),
        }
    }
}

/// Erlang's C formula: the chance an arrival waits in an M/M/c queue with `c` servers and
/// offered load `a` (< c), from Erlang B's stable recurrence.
pub fn erlang_c(c: usize, a: f64) -> f64 {
    if c == 0 || a <= 0.0 {
        return 0.0;
    }
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (k as f64 + a * b);
    }
    let rho = a / c as f64;
    if rho >= 1.0 {
        return 1.0;
    }
    (b / (1.0 - rho * (1.0 - b))).clamp(0.0, 1.0)
}

/// One point judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    pub point: Point,
    pub micro_batches: usize,
    /// GPUs as deployed (a lower bound when the point was refused before sizing); 0 when it
    /// could not be sized.
    pub gpus: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Each target's value, in the problem's order (`None`: unbounded, or not estimated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_million_tokens: Option<f64>,
    /// Empty: it meets every target within the budget.
    pub reasons: Vec<Reason>,
}

impl Evaluation {
    fn refused(point: Point, micro_batches: usize, gpus: usize, reason: Reason) -> Self {
        Self {
            point,
            micro_batches,
            gpus,
            estimate: None,
            latency: None,
            values: Vec::new(),
            cost_per_million_tokens: None,
            reasons: vec![reason],
        }
    }

    pub fn meets(&self) -> bool {
        self.reasons.is_empty() && self.cost_per_million_tokens.is_some()
    }

    /// How far the furthest of its reasons is from being met (see [`Reason::shortfall`]);
    /// `None` when it meets them, or cannot be planned.
    pub fn shortfall(&self) -> Option<f64> {
        if self.reasons.is_empty() {
            return None;
        }
        self.reasons
            .iter()
            .map(Reason::shortfall)
            .try_fold(f64::NEG_INFINITY, |m, s| s.map(|s| m.max(s)))
    }

    /// Generated tokens per second with every slot busy, prompts included.
    pub fn tokens_per_second(&self) -> Option<f64> {
        self.latency.as_ref().map(|l| l.tokens_per_second)
    }
}

/// The order among layouts that meet the targets: cheaper, then fewer GPUs, then the point.
pub fn cheaper(a: &Evaluation, b: &Evaluation) -> Ordering {
    let cost = |e: &Evaluation| e.cost_per_million_tokens.unwrap_or(f64::INFINITY);
    cost(a)
        .total_cmp(&cost(b))
        .then(a.gpus.cmp(&b.gpus))
        .then(a.point.cmp(&b.point))
}

/// The order among layouts that miss: estimated ones first (within the budget: all their
/// misses are known; one over the budget was not estimated, so its latency is unknown), then
/// the smaller shortfall, then the point.
pub fn closer(a: &Evaluation, b: &Evaluation) -> Ordering {
    // A layout that keeps up with the rate comes before one that does not (whose percentiles
    // are all unbounded); among those that do not, the nearer to keeping up (rate over
    // capacity) comes first, so that they do not all tie at an infinite shortfall.
    let key = |e: &Evaluation| {
        let saturation = e.reasons.iter().find_map(|r| match r {
            Reason::Saturated { .. } => r.shortfall(),
            _ => None,
        });
        match saturation {
            Some(x) => (1, x),
            None => (0, e.shortfall().unwrap_or(f64::INFINITY)),
        }
    };
    let (ka, kb) = (key(a), key(b));
    (a.estimate.is_none())
        .cmp(&b.estimate.is_none())
        .then(ka.0.cmp(&kb.0))
        .then(ka.1.total_cmp(&kb.1))
        .then(a.point.cmp(&b.point))
}

/// GPUs of the deployment: every stage, `replicas` of each expert shard, `gateways` gateways.
pub fn deployment_gpus(plan: &SizedPlan, replicas: usize, gateways: usize) -> usize {
    let stages: usize = plan.stages.iter().map(|s| s.pod.gpus.max(1)).sum();
    let shards: usize = plan.expert_shards.iter().map(|s| s.pod.gpus.max(1)).sum();
    stages + shards * replicas.max(1) + plan.gateway.gpus.max(1) * gateways.max(1)
}

fn pods_gpus(plan: &SizedPlan) -> Vec<usize> {
    plan.stages
        .iter()
        .map(|s| s.pod.gpus)
        .chain(plan.expert_shards.iter().map(|s| s.pod.gpus))
        .chain([plan.gateway.gpus])
        .collect()
}

/// The budget check that needs no sizing: every pod has at least `tensor` GPUs.
fn over_budget_unsized(problem: &Problem, p: &Point) -> Option<Evaluation> {
    let budget = problem.max_gpus?;
    let pods = p
        .stages
        .saturating_add(p.expert_shards.saturating_mul(p.expert_replicas))
        .saturating_add(problem.gateways.max(1));
    let least = pods.saturating_mul(p.tensor.max(1));
    (least > budget).then(|| {
        Evaluation::refused(
            *p,
            p.micro_batches(problem.gateways),
            least,
            Reason::OverBudget {
                gpus: least,
                budget,
                at_least: true,
            },
        )
    })
}

fn size_point(problem: &Problem, p: &Point) -> Result<SizedPlan, Reason> {
    let req = SizingRequest {
        stages: p.stages,
        expert_shards: Some(p.expert_shards),
        tensor: p.tensor,
        concurrent_sequences: p.concurrent_sequences(problem.gateways),
        ..problem.request
    };
    if p.tensor > req.gpus_per_pod {
        return Err(Reason::Invalid {
            message: format!(
                "tensor {} is more than the {} GPUs a pod may use",
                p.tensor, req.gpus_per_pod
            ),
        });
    }
    crate::plan(req.model.shape(), p.stages, p.expert_shards).map_err(|e| Reason::Invalid {
        message: e.to_string(),
    })?;
    size(&req).map_err(|e| Reason::DoesNotFit {
        message: e.to_string(),
    })
}

fn evaluate_sized(problem: &Problem, p: &Point, plan: &SizedPlan) -> Evaluation {
    let mb = p.micro_batches(problem.gateways);
    let gpus = deployment_gpus(plan, p.expert_replicas, problem.gateways);
    if let Some(budget) = problem.max_gpus
        && gpus > budget
    {
        return Evaluation::refused(
            *p,
            mb,
            gpus,
            Reason::OverBudget {
                gpus,
                budget,
                at_least: false,
            },
        );
    }
    let layout = Layout {
        expert_replicas: vec![p.expert_replicas.max(1); plan.expert_shards.len()],
        micro_batches: mb,
        wire_bytes: problem.wire_bytes,
        across_nodes: problem.across_nodes,
        ..Default::default()
    };
    let w = Workload {
        batch: p.batch,
        prompt_tokens: problem.prompt_tokens,
        output_tokens: problem.output_tokens,
        routing_skew: problem.routing_skew,
    };
    let e = perf::estimate(plan, &problem.hardware, &layout, &w);
    let lat = Latency::of(&e, p, problem.gateways, w.output_tokens, problem.rate);
    let tps = lat.tokens_per_second;
    let cost = (tps > 0.0 && tps.is_finite())
        .then(|| gpus as f64 * problem.hardware.price_per_hour / 3600.0 / tps * 1e6);
    let mut reasons = Vec::new();
    if lat.utilization.is_nan() || lat.utilization >= 1.0 || cost.is_none() {
        reasons.push(Reason::Saturated {
            capacity: lat.capacity,
            rate: problem.rate,
        });
    }
    let values: Vec<Option<f64>> = problem.targets.iter().map(|t| lat.value(t)).collect();
    for (t, v) in problem.targets.iter().zip(&values) {
        match *v {
            Some(v) if v > t.seconds => reasons.push(Reason::Misses {
                target: *t,
                achieved: v,
            }),
            Some(_) => {}
            None => reasons.push(Reason::Unbounded { target: *t }),
        }
    }
    Evaluation {
        point: *p,
        micro_batches: mb,
        gpus,
        estimate: Some(e),
        latency: Some(lat),
        values,
        cost_per_million_tokens: cost,
        reasons,
    }
}

/// One point judged on its own: what exhaustive search does for every point.
pub fn evaluate(problem: &Problem, p: &Point) -> Evaluation {
    if let Some(over) = over_budget_unsized(problem, p) {
        return over;
    }
    match size_point(problem, p) {
        Ok(plan) => evaluate_sized(problem, p, &plan),
        Err(reason) => Evaluation::refused(*p, p.micro_batches(problem.gateways), 0, reason),
    }
}

/// How much work the search did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Points in the space.
    pub points: usize,
    /// Refused before sizing: over the budget whatever their pods' sizes.
    pub over_budget_unsized: usize,
    /// Sized and over the budget (not estimated).
    pub over_budget: usize,
    pub invalid: usize,
    pub does_not_fit: usize,
    /// Not evaluated: a smaller batch of the same layout already did not fit, or missed a
    /// target that a larger batch cannot meet.
    pub pruned: usize,
    /// Not evaluated: the same layout as another point (replicas without expert shards).
    pub duplicates: usize,
    /// Estimated with the performance model.
    pub estimated: usize,
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Every point that meets the targets, cheapest first (the winner is the first).
    pub feasible: Vec<Evaluation>,
    /// Every point judged that does not (in search order; points refused before sizing
    /// included).
    pub infeasible: Vec<Evaluation>,
    /// When nothing meets the targets: the point of the whole space that misses by least
    /// (see [`closer`]).
    pub closest: Option<Evaluation>,
    pub stats: Stats,
}

impl Outcome {
    pub fn winner(&self) -> Option<&Evaluation> {
        self.feasible.first()
    }

    /// Points worth showing next to the winner: the `next` cheapest others that meet the
    /// targets, then, for every way of losing, the point that lost that way and came nearest
    /// to winning (the cheapest of those estimated; the fewest GPUs over the budget; the first
    /// that does not fit).
    pub fn runners_up(&self, next: usize) -> Vec<&Evaluation> {
        let mut out: Vec<&Evaluation> = self.feasible.iter().skip(1).take(next).collect();
        // Ways of losing, by the first reason: its kind, and the target it misses.
        let way = |e: &Evaluation| match e.reasons.first() {
            Some(Reason::OverBudget { .. }) => Some((0, None)),
            Some(Reason::DoesNotFit { .. }) => Some((1, None)),
            Some(Reason::Saturated { .. }) => Some((2, None)),
            Some(Reason::Misses { target, .. }) => Some((
                3,
                Some((target.metric as u8, (target.quantile * 1e6) as u64)),
            )),
            Some(Reason::Invalid { .. } | Reason::TpotMean { .. } | Reason::Unbounded { .. })
            | None => None,
        };
        let mut best: Vec<(_, &Evaluation)> = Vec::new();
        for e in &self.infeasible {
            let Some(w) = way(e) else { continue };
            let better =
                |old: &Evaluation| match (e.cost_per_million_tokens, old.cost_per_million_tokens) {
                    (Some(a), Some(b)) => a < b,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => {
                        matches!(e.reasons[0], Reason::OverBudget { .. }) && e.gpus < old.gpus
                    }
                };
            match best.iter_mut().find(|(k, _)| *k == w) {
                Some((_, old)) => {
                    if better(old) {
                        *old = e;
                    }
                }
                None => best.push((w, e)),
            }
        }
        best.sort_by_key(|(k, _)| *k);
        out.extend(best.into_iter().map(|(_, e)| e));
        out
    }
}

/// The cheapest point of `space` that meets `problem`'s targets within its budget, and what
/// else was judged (see the module's doc for the model and the pruning).
pub fn search(problem: &Problem, space: &Space) -> Result<Outcome, PlanError> {
    problem.check()?;
    let space = space.normalised();
    let mut stats = Stats {
        points: space.len(),
        ..Stats::default()
    };
    let mut judged: Vec<Evaluation> = Vec::new();
    let mut skipped: Vec<Point> = Vec::new();
    for &stages in &space.stages {
        for &expert_shards in &space.expert_shards {
            for &tensor in &space.tensor {
                // Sizing does not depend on replicas: once per batch.
                let mut sized: Vec<Option<Result<SizedPlan, Reason>>> =
                    vec![None; space.batch.len()];
                for (ri, &expert_replicas) in space.expert_replicas.iter().enumerate() {
                    if expert_shards == 0 && ri > 0 {
                        stats.duplicates += space.batch.len();
                        continue;
                    }
                    let mut unfit = false;
                    // Pods' GPUs for which a smaller batch missed a target no larger one meets.
                    let mut hopeless: Option<Vec<usize>> = None;
                    for (bi, &batch) in space.batch.iter().enumerate() {
                        let p = Point {
                            stages,
                            expert_shards,
                            tensor,
                            expert_replicas,
                            batch,
                        };
                        if let Some(over) = over_budget_unsized(problem, &p) {
                            stats.over_budget_unsized += 1;
                            judged.push(over);
                            continue;
                        }
                        if unfit {
                            stats.pruned += 1;
                            continue;
                        }
                        let plan = sized[bi].get_or_insert_with(|| size_point(problem, &p));
                        let plan = match plan {
                            Ok(plan) => plan,
                            Err(reason) => {
                                match reason {
                                    Reason::DoesNotFit { .. } => {
                                        stats.does_not_fit += 1;
                                        unfit = true;
                                    }
                                    _ => stats.invalid += 1,
                                }
                                judged.push(Evaluation::refused(
                                    p,
                                    p.micro_batches(problem.gateways),
                                    0,
                                    reason.clone(),
                                ));
                                continue;
                            }
                        };
                        let pods = pods_gpus(plan);
                        if hopeless.as_ref() == Some(&pods) {
                            stats.pruned += 1;
                            skipped.push(p);
                            continue;
                        }
                        let e = evaluate_sized(problem, &p, plan);
                        match &e.latency {
                            None => stats.over_budget += 1,
                            Some(lat) => {
                                stats.estimated += 1;
                                let no_larger_batch =
                                    problem.targets.iter().any(|t| match t.metric {
                                        Metric::Tpot => {
                                            lat.tpot(t.quantile).is_none_or(|v| v > t.seconds)
                                        }
                                        Metric::Ttft => lat.prefill > t.seconds,
                                    });
                                if no_larger_batch {
                                    hopeless = Some(pods);
                                }
                            }
                        }
                        judged.push(e);
                    }
                }
            }
        }
    }
    let (mut feasible, infeasible): (Vec<_>, Vec<_>) =
        judged.into_iter().partition(Evaluation::meets);
    feasible.sort_by(cheaper);
    let closest = if feasible.is_empty() {
        // Exact over the whole space: the points skipped for a missed target miss it by at
        // least as much, but may miss the others by less.
        let extra: Vec<Evaluation> = skipped.iter().map(|p| evaluate(problem, p)).collect();
        infeasible
            .iter()
            .chain(&extra)
            .filter(|e| e.shortfall().is_some())
            .min_by(|a, b| closer(a, b))
            .cloned()
    } else {
        None
    };
    Ok(Outcome {
        feasible,
        infeasible,
        closest,
        stats,
    })
}

/// The discrete-event simulator's view of a point at the problem's rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Simulated {
    pub point: Point,
    /// Simulated seconds of arrivals.
    pub duration: f64,
    pub report: crate::sim::SimReport,
    /// Targets (and the rate) the simulation says it misses.
    pub misses: Vec<Reason>,
    /// Targets it cannot judge: quantiles other than p50 and p99 (for TPOT, unless the mean
    /// alone is over the limit).
    pub unchecked: Vec<Target>,
}

impl Simulated {
    pub fn confirms(&self) -> bool {
        self.misses.is_empty()
    }
}

/// The plan served on the performance model's operator times (`perf::stage_parts`): each stage
/// visit its own compute, then one call per expert shard it needs.
struct Served<'a> {
    plan: &'a SizedPlan,
    hardware: &'a Hardware,
    layout: Layout,
    popularity: Vec<f64>,
    prompt: usize,
    context: usize,
    steps: std::collections::HashMap<(usize, usize), std::rc::Rc<[crate::sim::Visit]>>,
}

impl crate::sim::Deployment for Served<'_> {
    fn step(
        &mut self,
        _now: f64,
        rows: usize,
        sequences: usize,
    ) -> std::rc::Rc<[crate::sim::Visit]> {
        if let Some(v) = self.steps.get(&(rows, sequences)) {
            return v.clone();
        }
        let visits = crate::sim::priced_step(
            self.plan,
            self.hardware,
            &self.layout,
            &self.popularity,
            rows,
            sequences,
            self.prompt,
            self.context,
        );
        self.steps.insert((rows, sequences), visits.clone());
        visits
    }
}

/// Simulates `p` for about `requests` arrivals at the problem's rate (lanes of `batch`
/// sequences over the stages, each stage visit calling the expert shards' replicas, service
/// times from [`perf::stage_parts`]) and judges the targets it measures.
pub fn simulate(
    problem: &Problem,
    p: &Point,
    requests: usize,
    seed: u64,
) -> Result<Simulated, PlanError> {
    problem.check()?;
    let plan = size_point(problem, p).map_err(|r| invalid("point", r.describe()))?;
    let mb = p.micro_batches(problem.gateways);
    let replicas = vec![p.expert_replicas.max(1); plan.expert_shards.len()];
    let layout = Layout {
        expert_replicas: replicas.clone(),
        micro_batches: mb,
        wire_bytes: problem.wire_bytes,
        across_nodes: problem.across_nodes,
        ..Default::default()
    };
    let duration = requests.max(1) as f64 / problem.rate;
    let cfg = crate::sim::SimConfig {
        stages: plan.stages.len(),
        lanes: mb,
        batch: p.batch,
        arrival_rate: problem.rate,
        prompt_tokens: problem.prompt_tokens,
        output_tokens: problem.output_tokens,
        duration,
        horizon: duration * 2.0,
        seed,
    };
    let mut served = Served {
        plan: &plan,
        hardware: &problem.hardware,
        layout,
        popularity: perf::zipf(plan.model.num_experts, problem.routing_skew),
        prompt: problem.prompt_tokens,
        context: problem.prompt_tokens + problem.output_tokens / 2,
        steps: Default::default(),
    };
    let report =
        crate::sim::simulate_deployment(&cfg, &crate::sim::Replicas::fixed(replicas), &mut served);
    let mut misses = Vec::new();
    let mut unchecked = Vec::new();
    // The run lasts until the last request finishes: a queue that grew shows as a throughput
    // well short of the arriving requests' tokens (a stable one falls short only by the last
    // requests' time to finish and the Poisson count's noise, within 10% in the tests).
    let arriving = problem.rate * problem.output_tokens.max(1) as f64;
    if report.tokens_per_second < 0.85 * arriving {
        misses.push(Reason::Saturated {
            capacity: report.tokens_per_second / problem.output_tokens.max(1) as f64,
            rate: problem.rate,
        });
    }
    for t in &problem.targets {
        let at = |q: f64| (t.quantile - q).abs() < 1e-9;
        let measured = match t.metric {
            Metric::Ttft if at(0.5) => Some(report.ttft_p50),
            Metric::Ttft if at(0.99) => Some(report.ttft_p99),
            Metric::Tpot if at(0.5) => Some(report.tpot_p50),
            Metric::Tpot if at(0.99) => Some(report.tpot_p99),
            Metric::Tpot if report.tpot_mean > t.seconds => {
                misses.push(Reason::TpotMean {
                    target: *t,
                    mean: report.tpot_mean,
                });
                continue;
            }
            _ => None,
        };
        match measured {
            Some(v) if v > t.seconds => misses.push(Reason::Misses {
                target: *t,
                achieved: v,
            }),
            Some(_) => {}
            None => unchecked.push(*t),
        }
    }
    Ok(Simulated {
        point: *p,
        duration,
        report,
        misses,
        unchecked,
    })
}

/// The simulator's word on the cheapest layouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Confirmation {
    /// The layouts simulated, cheapest first: those the simulation rejected, then the one it
    /// confirmed (if any).
    pub simulated: Vec<Simulated>,
    /// Index into [`Outcome::feasible`] of the cheapest layout the simulation confirms.
    pub confirmed: Option<usize>,
}

/// Simulates the layouts that meet the targets, cheapest first, until one confirms or `tries`
/// were simulated.
pub fn confirm(
    problem: &Problem,
    outcome: &Outcome,
    tries: usize,
    requests: usize,
    seed: u64,
) -> Result<Confirmation, PlanError> {
    let mut simulated = Vec::new();
    for (i, e) in outcome.feasible.iter().take(tries).enumerate() {
        let s = simulate(problem, &e.point, requests, seed)?;
        let ok = s.confirms();
        simulated.push(s);
        if ok {
            return Ok(Confirmation {
                simulated,
                confirmed: Some(i),
            });
        }
    }
    Ok(Confirmation {
        simulated,
        confirmed: None,
    })
}
