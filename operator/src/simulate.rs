//! `moe-operator simulate`: the discrete-event simulator (`moe_plan::sim`) on the performance
//! model's operator times (`perf::stage_parts`): a manifest's plan next to a tensor x pipeline
//! layout at one arrival rate, and with `--autoscale` the plan's expert shards at fixed uniform
//! replicas next to the expert autoscaler's policy (`autoscale::decide`, fed with the simulated
//! routed rows per shard) at the same total replica count, under routing skew whose popular
//! experts change every `--skew-period`.

use std::collections::HashMap;
use std::rc::Rc;

use moe_plan::SizedPlan;
use moe_plan::perf::{self, Hardware, Layout};
use moe_plan::sim::{self, Deployment, Replicas, SimConfig, SimReport, Visit};

use crate::autoscale::{self, Params, ShardLoad, State};
use crate::bench::Rng;
use crate::cli::{EstimateArgs, estimate_for};
use crate::crd::MoEDeployment;
use crate::error::{Error, Result};
use crate::planning;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    #[arg(short = 'f', long = "filename", default_value = "examples/gpt4.yaml")]
    pub file: std::path::PathBuf,
    /// Requests per second (Poisson).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// The other layout, TENSORxPIPELINE (GPUs per stage x stages).
    #[arg(long, default_value = "8x16")]
    pub versus: String,
    /// Also simulate the plan's expert shards with `--replicas` replicas in all: fixed and
    /// uniform, and moved by the expert autoscaler (spec.experts: min/max replicas, target,
    /// stabilisation, cooldown) from the same start.
    #[arg(long)]
    pub autoscale: bool,
    /// Expert replicas in all for --autoscale (default: spec.experts.autoscaling.
    /// totalReplicaBudget, else 3 per shard).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Seconds between changes of which experts are popular: each period the expert shards'
    /// groups of experts trade popularity ranks (a seeded shuffle), the same Zipf skew on other
    /// shards; 0: expert 0 stays the most popular.
    #[arg(long, default_value_t = 3600.0)]
    pub skew_period: f64,
    /// Seconds from the autoscaler asking for an expert replica to its serving.
    #[arg(long, default_value_t = 60.0)]
    pub replica_startup: f64,
    /// Seconds between two decisions of the autoscaler (the operator samples every 5 s).
    #[arg(long, default_value_t = 5.0)]
    pub autoscale_interval: f64,
    /// Seed of the arrivals and of the popularity rankings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub estimate: EstimateArgs,
}

/// What a row of the simulation compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// The plan (at minReplicas per shard) or the tensor x pipeline layout.
    Layout,
    /// The plan's expert shards at fixed uniform replicas (`--autoscale`).
    FixedReplicas,
    /// The same total replicas moved by the autoscaler (`--autoscale`).
    Autoscaled,
}

/// One simulated layout: its name, GPUs, the simulation and the closed form.
pub struct Simulated {
    pub name: String,
    pub kind: RowKind,
    /// Expert replicas per shard at the start.
    pub replicas: Vec<usize>,
    pub gpus: usize,
    pub report: SimReport,
    pub estimate: perf::Estimate,
    pub cost_per_million_tokens: f64,
}

/// The shortest popularity period: each period prices every step shape anew.
const MIN_SKEW_PERIOD: f64 = 60.0;
/// The most micro-batch lanes simulated.
const MAX_LANES: usize = 4096;
/// The most requests one run expects (rate x duration): each is held until it finishes.
const MAX_REQUESTS: f64 = 1e7;
/// The most tokens of one prompt or output, and sequences of one micro-batch.
const MAX_TOKENS: usize = 1 << 20;
const MAX_BATCH: usize = 1 << 16;

/// Experts' popularity over time: the Zipf shares by rank; every period the blocks of
/// `block` experts (one expert shard's group) trade ranks, so the same skew lands on other
/// shards.
struct Skew {
    ranked: Vec<f64>,
    block: usize,
    period: f64,
    seed: u64,
}

impl Skew {
    fn epoch(&self, now: f64) -> u64 {
        if self.period > 0.0 {
            (now / self.period).max(0.0) as u64
        } else {
            0
        }
    }

    /// Each expert's share in `epoch`: the first keeps expert e at rank e.
    fn popularity(&self, epoch: u64) -> Vec<f64> {
        let n = self.ranked.len();
        let b = self.block.clamp(1, n.max(1));
        let blocks = n.div_ceil(b);
        let mut order: Vec<usize> = (0..blocks).collect();
        if epoch > 0 {
            let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..blocks).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        // Expert e (block e / b) takes the ranks of block order[e / b], at the same offset.
        (0..n)
            .map(|e| {
                let rank = order[e / b] * b + e % b;
                self.ranked.get(rank).copied().unwrap_or(0.0)
            })
            .collect()
    }
}

/// The expert autoscaler as the operator runs it: smoothed routed rates per shard into
/// [`autoscale::decide`], its last decision as the current replicas.
struct Autoscaler {
    params: Params,
    min: i32,
    max: i32,
    tau: f64,
    state: State,
    desired: Vec<i32>,
    last: Option<(f64, Vec<f64>)>,
}

/// The plan served on the performance model's operator times.
struct Model<'a> {
    plan: &'a SizedPlan,
    hw: &'a Hardware,
    layout: Layout,
    prompt: usize,
    context: usize,
    skew: Skew,
    epoch: u64,
    popularity: Vec<f64>,
    /// Step visits by (rows, sequences), for the current epoch.
    steps: HashMap<(usize, usize), Rc<[Visit]>>,
    autoscaler: Option<Autoscaler>,
}

impl Deployment for Model<'_> {
    fn step(&mut self, now: f64, rows: usize, sequences: usize) -> Rc<[Visit]> {
        let epoch = self.skew.epoch(now);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.popularity = self.skew.popularity(epoch);
            self.steps.clear();
        }
        if let Some(v) = self.steps.get(&(rows, sequences)) {
            return v.clone();
        }
        let visits = moe_plan::sim::priced_step(
            self.plan,
            self.hw,
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

    fn control(&mut self, now: f64, routed: &[f64], _held: &[usize]) -> Option<Vec<usize>> {
        let a = self.autoscaler.as_mut()?;
        let (t0, before) = a.last.replace((now, routed.to_vec()))?;
        let dt = now - t0;
        if dt <= 0.0 || before.len() != routed.len() || a.desired.len() != routed.len() {
            return None;
        }
        let rates: Vec<f64> = routed
            .iter()
            .zip(&before)
            .map(|(r, b)| (r - b).max(0.0) / dt)
            .collect();
        let loads = a.state.smooth(now, &rates, a.tau).to_vec();
        let input: Vec<ShardLoad> = loads
            .iter()
            .zip(&a.desired)
            .map(|(&l, &current)| ShardLoad {
                tokens_per_second: l,
                current,
                min: a.min,
                max: a.max,
            })
            .collect();
        let d = autoscale::decide(&a.params, &input, &mut a.state, now);
        a.desired = d.desired;
        Some(
            a.desired
                .iter()
                .map(|&x| usize::try_from(x).unwrap_or(1).max(1))
                .collect(),
        )
    }
}

fn bad(field: &str, message: impl Into<String>) -> Error {
    Error::Api(moe_api::Error::invalid(field.to_string(), message.into()))
}

/// GPUs of `plan` with `replicas` per expert shard.
fn gpus(plan: &SizedPlan, replicas: &[usize]) -> usize {
    let stages: usize = plan.stages.iter().map(|s| s.pod.gpus.max(1)).sum();
    let shards: usize = plan
        .expert_shards
        .iter()
        .enumerate()
        .map(|(j, s)| s.pod.gpus.max(1) * replicas.get(j).copied().unwrap_or(1).max(1))
        .sum();
    stages + shards + plan.gateway.gpus
}

/// Simulates the manifest's plan and the `versus` layout at the same arrival rate, and with
/// `--autoscale` the plan's expert shards at fixed uniform replicas and autoscaled.
pub fn simulate(moe: &MoEDeployment, args: &SimulateArgs) -> Result<Vec<Simulated>> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(bad("--rate", "must be a positive number"));
    }
    if !(args.duration > 0.0 && args.duration <= 86_400.0 * 7.0) {
        return Err(bad("--duration", "must be within (0, 604800] seconds"));
    }
    if args.rate * args.duration > MAX_REQUESTS {
        return Err(bad(
            "--rate",
            format!(
                "{} requests/s for {} s is more than {MAX_REQUESTS:e} requests",
                args.rate, args.duration
            ),
        ));
    }
    for (flag, n, max) in [
        ("--prompt-tokens", args.estimate.prompt_tokens, MAX_TOKENS),
        ("--output-tokens", args.estimate.output_tokens, MAX_TOKENS),
        ("--batch", args.estimate.batch, MAX_BATCH),
    ] {
        if n > max {
            return Err(bad(flag, format!("must be at most {max}")));
        }
    }
    let p = args.skew_period;
    if !(p == 0.0 || (p.is_finite() && p >= MIN_SKEW_PERIOD)) {
        return Err(bad(
            "--skew-period",
            format!("must be 0 (never) or at least {MIN_SKEW_PERIOD} seconds"),
        ));
    }
    if !(args.replica_startup >= 0.0 && args.replica_startup.is_finite()) {
        return Err(bad("--replica-startup", "must be 0 or more seconds"));
    }
    if !(args.autoscale_interval >= 1.0 && args.autoscale_interval.is_finite()) {
        return Err(bad("--autoscale-interval", "must be at least 1 second"));
    }
    let z = args.estimate.zipf;
    if !(z >= 0.0 && z.is_finite()) {
        return Err(bad("--zipf", "must be 0 or more"));
    }
    if args
        .estimate
        .micro_batches
        .is_some_and(|m| m == 0 || m > MAX_LANES)
    {
        return Err(bad(
            "--micro-batches",
            format!("must be within 1..={MAX_LANES}"),
        ));
    }
    let (tensor, stages) = args
        .versus
        .split_once('x')
        .and_then(|(t, p)| Some((t.parse::<usize>().ok()?, p.parse::<usize>().ok()?)))
        .filter(|&(t, p)| t > 0 && p > 0)
        .ok_or_else(|| {
            bad(
                "--versus",
                format!("`{}` is not TENSORxPIPELINE", args.versus),
            )
        })?;
    let ours = planning::plan(&moe.spec)?;
    let mut req = moe_api::planning::sizing_request(&moe.spec)?;
    req.stages = stages;
    req.expert_shards = Some(0);
    req.tensor = tensor;
    req.gpus_per_pod = tensor;
    let other = moe_plan::size(&req).map_err(|e| bad("--versus", e.to_string()))?;
    let experts = &moe.spec.experts;
    let (lo, hi) = autoscale::bounds(experts.min_replicas, experts.max_replicas);
    let shards = ours.expert_shards.len();
    let lo_n = usize::try_from(lo).unwrap_or(1);
    let hi_n = usize::try_from(hi).unwrap_or(1);
    let total = if args.autoscale {
        if shards == 0 {
            return Err(bad(
                "--autoscale",
                "the plan has no expert shards (the stages compute the experts)",
            ));
        }
        let t = args
            .replicas
            .or_else(|| {
                let b = experts.autoscaling.total_replica_budget?;
                usize::try_from(b).ok()
            })
            .unwrap_or(3 * shards);
        let (min_t, max_t) = (shards * lo_n, shards * hi_n);
        if t < min_t || t > max_t {
            return Err(bad(
                "--replicas",
                format!(
                    "{t} replicas in all: {shards} expert shards at {lo}..{hi} each \
                     (spec.experts minReplicas..maxReplicas) need {min_t}..={max_t}"
                ),
            ));
        }
        t
    } else {
        0
    };

    let ours_name = format!(
        "planned ({} stages, {} expert shards)",
        ours.stages.len(),
        ours.expert_shards.len()
    );
    let mut runs: Vec<(String, RowKind, &SizedPlan, Replicas, bool)> = vec![
        (
            ours_name,
            RowKind::Layout,
            &ours,
            Replicas::fixed(vec![lo_n; shards]),
            false,
        ),
        (
            format!("{tensor}-way tensor x {stages}-way pipeline"),
            RowKind::Layout,
            &other,
            Replicas::none(),
            false,
        ),
    ];
    if args.autoscale {
        let total_i = i32::try_from(total).unwrap_or(i32::MAX);
        let uniform: Vec<usize> = crate::bench::uniform(shards, total_i)
            .into_iter()
            .map(|r| usize::try_from(r).unwrap_or(1))
            .collect();
        let list = |r: &[usize]| {
            r.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        runs.push((
            format!("fixed {}", list(&uniform)),
            RowKind::FixedReplicas,
            &ours,
            Replicas::fixed(uniform.clone()),
            false,
        ));
        runs.push((
            format!("autoscaled from {}", list(&uniform)),
            RowKind::Autoscaled,
            &ours,
            Replicas {
                initial: uniform,
                startup: args.replica_startup,
                control_interval: args.autoscale_interval,
            },
            true,
        ));
    }

    let wire_bytes = match moe.spec.serving.wire_dtype {
        crate::crd::WireDType::Bf16 => 2,
        _ => 4,
    };
    let mut out = Vec::new();
    for (name, kind, plan, replicas, autoscaled) in runs {
        let mut est = args.estimate.clone();
        let micro_batches = est.micro_batches.unwrap_or(plan.stages.len().max(2));
        est.micro_batches = Some(micro_batches);
        let (hw, mut e) = estimate_for(moe, plan, &est)?;
        let layout = Layout {
            expert_replicas: replicas.initial.clone(),
            micro_batches,
            wire_bytes,
            across_nodes: true,
            ..Default::default()
        };
        if kind != RowKind::Layout {
            let w = perf::Workload {
                batch: est.batch,
                prompt_tokens: est.prompt_tokens,
                output_tokens: est.output_tokens,
                routing_skew: z,
            };
            e = perf::estimate(plan, &hw, &layout, &w);
        }
        let cfg = SimConfig {
            stages: plan.stages.len(),
            lanes: micro_batches,
            batch: est.batch,
            arrival_rate: args.rate,
            prompt_tokens: est.prompt_tokens,
            output_tokens: est.output_tokens,
            duration: args.duration,
            horizon: args.duration * 2.0,
            seed: args.seed,
        };
        let skew = Skew {
            ranked: perf::zipf(plan.model.num_experts, z),
            block: plan
                .expert_shards
                .first()
                .map_or(1, |s| s.layout.experts.len()),
            period: args.skew_period,
            seed: args.seed,
        };
        let autoscaler = autoscaled.then(|| Autoscaler {
            params: Params {
                budget: i32::try_from(total).unwrap_or(i32::MAX),
                ..Params::from_spec(experts, shards)
            },
            min: lo,
            max: hi,
            tau: autoscale::LoopConfig::default().smoothing.as_secs_f64(),
            state: State::default(),
            desired: replicas
                .initial
                .iter()
                .map(|&r| i32::try_from(r).unwrap_or(i32::MAX))
                .collect(),
            last: None,
        });
        let mut model = Model {
            plan,
            hw: &hw,
            layout: layout.clone(),
            prompt: est.prompt_tokens,
            context: est.prompt_tokens + est.output_tokens / 2,
            popularity: skew.popularity(0),
            skew,
            epoch: 0,
            steps: HashMap::new(),
            autoscaler,
        };
        let report = sim::simulate_deployment(&cfg, &replicas, &mut model);
        let gpus = if replicas.initial.is_empty() {
            e.gpus
        } else {
            gpus(plan, &replicas.initial)
        };
        let cost =
            gpus as f64 * hw.price_per_hour / 3600.0 / report.tokens_per_second.max(1e-9) * 1e6;
        out.push(Simulated {
            name,
            kind,
            replicas: replicas.initial,
            gpus,
            report,
            estimate: e,
            cost_per_million_tokens: cost,
        });
    }
    Ok(out)
}

/// The simulated layouts side by side, then the replica comparison when there is one.
pub fn simulate_table(args: &SimulateArgs, rows: &[Simulated]) -> String {
    let skew = if args.estimate.zipf > 0.0 && args.skew_period > 0.0 {
        format!(", popular experts change every {:.0} s", args.skew_period)
    } else {
        String::new()
    };
    let mut out = format!(
        "{:.1} requests/s for {:.0} s, prompt {} / output {} tokens, batch {} per micro-batch, zipf {}{skew}\n",
        args.rate,
        args.duration,
        args.estimate.prompt_tokens,
        args.estimate.output_tokens,
        args.estimate.batch,
        args.estimate.zipf
    );
    out.push_str(&format!(
        "{:<44} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>11} {:>12} {:>8} {:>12}\n",
        "layout",
        "GPUs",
        "tokens/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT",
        "TPOT p99",
        "stage busy",
        "expert busy",
        "done",
        "$/M tokens"
    ));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for r in rows.iter().filter(|r| r.kind == RowKind::Layout) {
        let experts = if r.report.shard_utilization.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}%", mean(&r.report.shard_utilization) * 100.0)
        };
        out.push_str(&format!(
            "{:<44} {:>5} {:>10.0} {:>8.0}ms {:>8.0}ms {:>7.1}ms {:>7.1}ms {:>10.0}% {:>12} {:>8} {:>12.3}\n",
            r.name,
            r.gpus,
            r.report.tokens_per_second,
            r.report.ttft_p50 * 1e3,
            r.report.ttft_p99 * 1e3,
            r.report.tpot_mean * 1e3,
            r.report.tpot_p99 * 1e3,
            mean(&r.report.stage_utilization) * 100.0,
            experts,
            r.report.finished,
            r.cost_per_million_tokens
        ));
    }
    let replicas: Vec<&Simulated> = rows.iter().filter(|r| r.kind != RowKind::Layout).collect();
    let Some(first) = replicas.first() else {
        return out;
    };
    let total: usize = first.replicas.iter().sum();
    out.push_str(&format!(
        "\nexpert replicas of the planned layout, {total} in all over {} shards; a new replica \
         serves {:.0} s after it is asked for; the autoscaler decides every {:.0} s\n",
        first.replicas.len(),
        args.replica_startup,
        args.autoscale_interval
    ));
    out.push_str(&format!(
        "{:<36} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8}\n",
        "replicas",
        "GPUs",
        "tokens/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT mean",
        "TPOT p99",
        "busiest shard",
        "its wait",
        "changes"
    ));
    for r in replicas {
        let (busiest, wait) = r
            .report
            .shard_utilization
            .iter()
            .zip(&r.report.shard_wait)
            .fold(
                (0.0f64, 0.0f64),
                |(b, w), (&u, &wt)| {
                    if u > b { (u, wt) } else { (b, w) }
                },
            );
        out.push_str(&format!(
            "{:<36} {:>5} {:>10.0} {:>8.0}ms {:>8.0}ms {:>8.1}ms {:>8.1}ms {:>12.0}% {:>8.1}ms {:>8}\n",
            r.name,
            r.gpus,
            r.report.tokens_per_second,
            r.report.ttft_p50 * 1e3,
            r.report.ttft_p99 * 1e3,
            r.report.tpot_mean * 1e3,
            r.report.tpot_p99 * 1e3,
            busiest * 100.0,
            wait * 1e3,
            r.report.replica_changes
        ));
    }
    out
}
