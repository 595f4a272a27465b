//! `moe-operator plan --optimize`: the cheapest layout a manifest can express that meets
//! latency targets (TTFT and TPOT percentiles at an arrival rate) within a GPU budget, the
//! layouts that lost and why, and the winner's manifest.
//!
//! The search and its model are `moe_plan::search` (closed-form estimate, M/D/c queueing for
//! the percentiles at `--rate`); the cheapest layouts are then simulated in turn (the
//! discrete-event simulator on the model's operator times, expert shards' replicas queued) and
//! the first the simulation does not reject wins: the closed form leaves out the queues at the
//! shards and behind prompt steps, which the simulation finds at high load. The dimensions searched are the manifest's: `parallelism.pipeline`,
//! `parallelism.expert`, `parallelism.tensor`, `experts.minReplicas` and the sequences per
//! micro-batch (`serving.maxConcurrentSequences` = batch × the gateways' lanes). Gateway
//! replicas (`spec.replicas`), GPUs per pod (a node's size) and the GPU product stay as written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use moe_plan::search::{
    self, Confirmation, Evaluation, Metric, Outcome, Point, Problem, Reason, Space, Target, seconds,
};

use crate::cli::EstimateArgs;
use crate::crd::{MoEDeployment, WireDType};
use crate::error::{Error, Result};

/// `plan --optimize` and its settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OptimizeArgs {
    /// Search the layouts the manifest can express (pipeline stages, expert shards, tensor
    /// parallelism, expert replicas, sequences per micro-batch) for the cheapest per million
    /// tokens that meets the targets within --max-gpus, at --rate.
    #[arg(long)]
    pub optimize: bool,
    /// Time to first token at p99, at most (e.g. 2s, 800ms).
    #[arg(long, value_name = "DURATION")]
    pub ttft_p99: Option<String>,
    /// Time per output token at p99, at most (e.g. 80ms).
    #[arg(long, value_name = "DURATION")]
    pub tpot_p99: Option<String>,
    /// A target as METRIC.pNN=DURATION, METRIC ttft or tpot (e.g. ttft.p50=500ms); repeatable.
    #[arg(long = "target", value_name = "METRIC.pNN=DURATION")]
    pub targets: Vec<String>,
    /// The most GPUs the deployment may use: stages, every expert-shard replica, gateways.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_gpus: Option<usize>,
    /// Requests per second (Poisson arrivals) the percentiles are at; required.
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// The most sequences per micro-batch searched (powers of two up to it).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        allow_negative_numbers = true
    )]
    pub max_batch: usize,
    /// The most replicas per expert shard searched.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        allow_negative_numbers = true
    )]
    pub max_replicas: usize,
    /// Simulate up to N of the cheapest layouts, in turn, until one is not rejected (0: take
    /// the closed form's word).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub confirm: usize,
    /// Write the winner's MoEDeployment here: the input with its parallelism, expert replicas,
    /// maxConcurrentSequences and maxBatchSize changed.
    #[arg(long, value_name = "PATH")]
    pub write_manifest: Option<PathBuf>,
}

/// Requests each confirming simulation runs.
pub const SIMULATED_REQUESTS: usize = 2000;

impl OptimizeArgs {
    /// Refuses a search flag given without `--optimize`, naming it.
    pub fn check_unused(&self) -> Result<()> {
        if self.optimize {
            return Ok(());
        }
        let given = [
            ("--ttft-p99", self.ttft_p99.is_some()),
            ("--tpot-p99", self.tpot_p99.is_some()),
            ("--target", !self.targets.is_empty()),
            ("--max-gpus", self.max_gpus.is_some()),
            ("--rate", self.rate.is_some()),
            ("--write-manifest", self.write_manifest.is_some()),
        ];
        match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(Error::invalid(*flag, "only with --optimize")),
            None => Ok(()),
        }
    }

    /// The targets of `--ttft-p99`, `--tpot-p99` and every `--target`.
    pub fn parsed_targets(&self) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for (flag, metric, value) in [
            ("--ttft-p99", Metric::Ttft, &self.ttft_p99),
            ("--tpot-p99", Metric::Tpot, &self.tpot_p99),
        ] {
            if let Some(v) = value {
                out.push(Target {
                    metric,
                    quantile: 0.99,
                    seconds: search::parse_seconds(v).map_err(|e| Error::invalid(flag, e))?,
                });
            }
        }
        for t in &self.targets {
            out.push(Target::parse(t).map_err(|e| Error::invalid("--target", e))?);
        }
        Ok(out)
    }
}

/// What `--optimize` found.
#[derive(Debug, Clone)]
pub struct Optimized {
    pub name: String,
    pub problem: Problem,
    pub space: Space,
    pub outcome: Outcome,
    pub confirmation: Option<Confirmation>,
    /// Index into `outcome.feasible` of the winner: the cheapest the simulation does not
    /// reject, else the closed form's cheapest.
    pub chosen: Option<usize>,
    /// The layout the manifest asks for, judged the same way (when it plans).
    pub as_written: Option<Evaluation>,
    /// The winner's manifest.
    pub manifest: Option<MoEDeployment>,
    /// Where `--write-manifest` wrote it.
    pub written: Option<PathBuf>,
}

impl Optimized {
    pub fn winner(&self) -> Option<&Evaluation> {
        self.outcome.feasible.get(self.chosen?)
    }

    /// Whether the simulation confirmed the winner (`None`: not simulated).
    pub fn confirmed(&self) -> Option<bool> {
        self.confirmation.as_ref().map(|c| c.confirmed.is_some())
    }

    /// An error when nothing met the targets, naming the closest miss (after the report is
    /// printed, so the exit status says it).
    pub fn require_winner(&self) -> Result<()> {
        if self.winner().is_some() {
            return Ok(());
        }
        Err(Error::Run(format!(
            "no layout meets the targets{}; {}",
            self.problem
                .max_gpus
                .map(|g| format!(" within {g} GPUs"))
                .unwrap_or_default(),
            match &self.outcome.closest {
                Some(c) => format!("closest: {} ({})", describe(&c.point), reasons(c)),
                None => "no layout in the space fits memory".into(),
            }
        )))
    }
}

fn bad(flag: &str, message: impl Into<String>) -> Error {
    Error::invalid(flag, message)
}

/// The hardware profile `est` names, or the spec's GPU product's, at `--price`.
fn hardware(moe: &MoEDeployment, est: &EstimateArgs) -> Result<moe_plan::perf::Hardware> {
    let mut hw = crate::cli::hardware(moe, est.hardware.as_deref())?;
    if let Some(p) = est.price {
        if !(p > 0.0 && p.is_finite()) {
            return Err(bad(
                "--price",
                format!("{p} is not a positive USD/GPU-hour"),
            ));
        }
        hw.price_per_hour = p;
    }
    Ok(hw)
}

fn divisors(n: usize) -> impl Iterator<Item = usize> {
    (1..=n).filter(move |d| n.is_multiple_of(*d))
}

fn powers_of_two(up_to: usize) -> impl Iterator<Item = usize> {
    std::iter::successors(Some(1usize), |p| p.checked_mul(2)).take_while(move |&p| p <= up_to)
}

fn count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// The search's problem, its space, and the manifest's own point (when it has one).
pub fn problem_and_space(
    moe: &MoEDeployment,
    est: &EstimateArgs,
    args: &OptimizeArgs,
) -> Result<(Problem, Space, Option<Point>)> {
    let rate = args.rate.ok_or_else(|| {
        bad(
            "--rate",
            "required with --optimize: the requests per second the percentiles are at",
        )
    })?;
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(bad(
            "--rate",
            format!("{rate} is not a positive number of requests per second"),
        ));
    }
    if args.max_gpus == Some(0) {
        return Err(bad("--max-gpus", "must be at least 1"));
    }
    if !(1..=65536).contains(&args.max_batch) {
        return Err(bad("--max-batch", "must be within 1..=65536"));
    }
    if !(1..=1024).contains(&args.max_replicas) {
        return Err(bad("--max-replicas", "must be within 1..=1024"));
    }
    if est.estimate {
        return Err(bad(
            "--estimate",
            "not with --optimize (it estimates every layout)",
        ));
    }
    if est.micro_batches.is_some() {
        return Err(bad(
            "--micro-batches",
            "not with --optimize: micro-batches follow from the stages and the gateway \
             replicas (each gateway runs one lane per stage, at least two)",
        ));
    }
    let targets = args.parsed_targets()?;
    let hw = hardware(moe, est)?;
    let request = moe_api::planning::sizing_request(&moe.spec)?;
    let spec = &moe.spec;
    let gateways = count(spec.replicas).max(1);
    let problem = Problem {
        request,
        hardware: hw,
        prompt_tokens: est.prompt_tokens,
        output_tokens: est.output_tokens,
        routing_skew: est.zipf,
        wire_bytes: match spec.serving.wire_dtype {
            WireDType::Bf16 => 2,
            WireDType::F32 => 4,
        },
        across_nodes: true,
        gateways,
        rate,
        targets,
        max_gpus: args.max_gpus,
    };
    if !(est.zipf >= 0.0 && est.zipf.is_finite()) {
        return Err(bad(
            "--zipf",
            format!("{} is not a non-negative exponent", est.zipf),
        ));
    }
    if est.output_tokens == 0 {
        return Err(bad("--output-tokens", "must be at least 1"));
    }
    problem
        .check()
        .map_err(|moe_plan::PlanError::Invalid { field, message }| {
            let flag = match field {
                "rate" => "--rate",
                "maxGpus" => "--max-gpus",
                "targets" => "--target",
                "outputTokens" => "--output-tokens",
                model => return Error::invalid(format!("spec.{model}"), message),
            };
            bad(flag, message)
        })?;

    let model = &problem.request.model;
    let (layers, experts) = (model.num_layers, model.num_experts);
    // Each part has at least one GPU: no more stages or shard pods than the budget leaves.
    let cap = args
        .max_gpus
        .unwrap_or(usize::MAX)
        .saturating_sub(gateways)
        .max(1);
    // Shards named by per-shard overrides must stay in the plan.
    let least_shards = spec
        .experts
        .shards
        .iter()
        .map(|o| count(o.shard) + 1)
        .max()
        .unwrap_or(0);
    let as_written = crate::planning::plan(spec).ok().map(|plan| Point {
        stages: plan.stages.len(),
        expert_shards: plan.expert_shards.len(),
        tensor: count(spec.parallelism.tensor).max(1),
        expert_replicas: count(spec.experts.min_replicas).max(1),
        batch: count(spec.serving.max_concurrent_sequences) / (gateways * plan.stages.len().max(2)),
    });
    let mut stages: Vec<usize> = divisors(layers).chain(powers_of_two(layers)).collect();
    let mut shards: Vec<usize> = std::iter::once(0)
        .chain(divisors(experts))
        .chain(divisors(layers).filter(|&k| k > 1).map(|k| k * experts))
        .collect();
    let gpus_per_pod = problem.request.gpus_per_pod;
    let mut tensor: Vec<usize> = powers_of_two(gpus_per_pod).collect();
    let mut replicas: Vec<usize> = (1..=args.max_replicas).collect();
    let mut batch: Vec<usize> = powers_of_two(args.max_batch)
        .chain([args.max_batch])
        .collect();
    if let Some(p) = as_written {
        stages.push(p.stages);
        shards.push(p.expert_shards);
        tensor.push(p.tensor);
        replicas.push(p.expert_replicas);
        batch.push(p.batch);
    }
    stages.retain(|&s| s <= layers && s <= cap && s <= moe_plan::MAX_STAGES);
    shards.retain(|&e| e <= cap && e < moe_api::planning::MAX_WORKLOADS && e >= least_shards);
    tensor.retain(|&t| t >= 1 && t <= gpus_per_pod);
    batch.retain(|&b| b >= 1);
    let space = Space {
        stages,
        expert_shards: shards,
        tensor,
        expert_replicas: replicas,
        batch,
    }
    .normalised();
    Ok((problem, space, as_written.filter(|p| p.batch >= 1)))
}

/// Searches, confirms by simulation, and builds the winner's manifest.
pub fn optimize(moe: &MoEDeployment, est: &EstimateArgs, args: &OptimizeArgs) -> Result<Optimized> {
    let (problem, space, as_written) = problem_and_space(moe, est, args)?;
    let plan_error = |e: moe_plan::PlanError| Error::Run(e.to_string());
    let outcome = search::search(&problem, &space).map_err(plan_error)?;
    let confirmation = if args.confirm > 0 && !outcome.feasible.is_empty() {
        Some(
            search::confirm(&problem, &outcome, args.confirm, SIMULATED_REQUESTS, 1)
                .map_err(plan_error)?,
        )
    } else {
        None
    };
    let chosen = match &confirmation {
        Some(Confirmation {
            confirmed: Some(i), ..
        }) => Some(*i),
        _ => (!outcome.feasible.is_empty()).then_some(0),
    };
    let mut out = Optimized {
        name: moe.metadata.name.clone().unwrap_or_else(|| "-".into()),
        as_written: as_written.map(|p| search::evaluate(&problem, &p)),
        problem,
        space,
        outcome,
        confirmation,
        chosen,
        manifest: None,
        written: None,
    };
    if let Some(w) = out.winner() {
        let m = manifest_for(moe, &w.point, out.problem.gateways);
        check_manifest(&m, w, &out.problem)?;
        out.manifest = Some(m);
    }
    Ok(out)
}

/// `moe` with the layout settings of `p`.
pub fn manifest_for(moe: &MoEDeployment, p: &Point, gateways: usize) -> MoEDeployment {
    let mut m = moe.clone();
    let int = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let spec = &mut m.spec;
    spec.parallelism.pipeline = int(p.stages);
    spec.parallelism.expert = Some(int(p.expert_shards));
    spec.parallelism.tensor = int(p.tensor);
    spec.experts.min_replicas = int(p.expert_replicas);
    spec.experts.max_replicas = spec.experts.max_replicas.max(int(p.expert_replicas));
    if let Some(budget) = &mut spec.experts.autoscaling.total_replica_budget {
        *budget = (*budget).max(int(p.expert_shards.saturating_mul(p.expert_replicas)));
    }
    spec.serving.max_concurrent_sequences = int(p.concurrent_sequences(gateways));
    spec.serving.max_batch_size = int(p.batch);
    m
}

/// The manifest plans to the layout the search judged: the same stages, shards and GPUs.
fn check_manifest(m: &MoEDeployment, w: &Evaluation, problem: &Problem) -> Result<()> {
    let plan = crate::planning::plan(&m.spec)
        .map_err(|e| Error::Run(format!("the winner's manifest does not plan: {e}")))?;
    let gpus = search::deployment_gpus(&plan, w.point.expert_replicas, problem.gateways);
    if plan.stages.len() != w.point.stages
        || plan.expert_shards.len() != w.point.expert_shards
        || gpus != w.gpus
    {
        return Err(Error::Run(format!(
            "the winner's manifest plans {} stages, {} expert shards, {gpus} GPUs, not the \
             searched {}",
            plan.stages.len(),
            plan.expert_shards.len(),
            describe(&w.point)
        )));
    }
    Ok(())
}

/// Writes the winner's manifest to `path`.
pub fn write_manifest(o: &mut Optimized, path: &Path) -> Result<()> {
    let Some(m) = &o.manifest else {
        return Err(bad(
            "--write-manifest",
            "no layout meets the targets: nothing to write",
        ));
    };
    let yaml = manifest_yaml(m)?;
    std::fs::write(path, yaml).map_err(|e| {
        bad(
            "--write-manifest",
            format!("writing {}: {e}", path.display()),
        )
    })?;
    o.written = Some(path.to_path_buf());
    Ok(())
}

pub fn manifest_yaml(m: &MoEDeployment) -> Result<String> {
    let yaml = serde_yaml::to_string(m).map_err(|e| Error::Encode {
        what: "manifest",
        message: e.to_string(),
    })?;
    Ok(format!(
        "# Written by `moe-operator plan --optimize`: the input manifest with the winning layout.\n{yaml}"
    ))
}

/// `8 stages, 16 shards x2, tensor 1, batch 4`.
pub fn describe(p: &Point) -> String {
    let shards = match p.expert_shards {
        0 => "experts on stages".to_string(),
        n => format!("{n} shards x{}", p.expert_replicas),
    };
    format!(
        "{} stages, {shards}, tensor {}, batch {}",
        p.stages, p.tensor, p.batch
    )
}

fn reasons(e: &Evaluation) -> String {
    let v: Vec<String> = e.reasons.iter().map(Reason::describe).collect();
    v.join("; ")
}

/// One row of the report: a label, the layout and why it is there.
pub struct Row<'a> {
    pub label: String,
    pub eval: &'a Evaluation,
    pub verdict: String,
}

/// The rows of the report: the layouts the simulation rejected before the winner, the
/// winner, the next cheapest three, the layout that came nearest to winning for each way of
/// losing, and the manifest as written.
pub fn rows(o: &Optimized) -> Vec<Row<'_>> {
    let mut out = Vec::new();
    let feasible = &o.outcome.feasible;
    let winner_cost = o.winner().and_then(|w| w.cost_per_million_tokens);
    let more = |e: &Evaluation| match (e.cost_per_million_tokens, winner_cost) {
        (Some(c), Some(w)) if w > 0.0 && c >= w => {
            format!("{:.1}% more expensive", (c / w - 1.0) * 100.0)
        }
        (Some(c), Some(w)) if w > 0.0 => format!("{:.1}% cheaper", (1.0 - c / w) * 100.0),
        _ => String::new(),
    };
    let simulated = |i: usize| o.confirmation.as_ref().and_then(|c| c.simulated.get(i));
    let last = o.chosen.map_or(0, |c| c + 3);
    for (i, e) in feasible.iter().enumerate().take(last + 1) {
        let verdict = if Some(i) == o.chosen {
            match (o.confirmed(), simulated(i)) {
                (Some(true), _) => "winner (the simulation agrees)".to_string(),
                (Some(false), Some(s)) => format!(
                    "winner by the model; the simulation says: {}",
                    s.misses
                        .iter()
                        .map(Reason::describe)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                _ => "winner".to_string(),
            }
        } else if o.chosen.is_some_and(|c| i < c) {
            let said = simulated(i).map_or_else(String::new, |s| {
                s.misses
                    .iter()
                    .map(Reason::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            format!("meets the targets in the model, but simulated: {said}")
        } else {
            format!("meets the targets; {}", more(e))
        };
        out.push(Row {
            label: format!("#{}", i + 1),
            eval: e,
            verdict,
        });
    }
    let losers = if o.winner().is_some() {
        o.outcome.runners_up(0)
    } else {
        o.outcome.closest.iter().collect()
    };
    for e in losers {
        let mut verdict = reasons(e);
        let m = more(e);
        if o.winner().is_none() {
            verdict = format!("closest miss: {verdict}");
        } else if !m.is_empty() {
            verdict = format!("{verdict}; {m}");
        }
        out.push(Row {
            label: "-".into(),
            eval: e,
            verdict,
        });
    }
    if let Some(e) = &o.as_written {
        let verdict = match (e.meets(), more(e)) {
            (true, m) => format!("as written: meets the targets; {m}"),
            (false, m) if m.is_empty() => format!("as written: {}", reasons(e)),
            (false, m) => format!("as written: {}; {m}", reasons(e)),
        };
        out.push(Row {
            label: "manifest".into(),
            eval: e,
            verdict,
        });
    }
    out
}

/// The report as a table.
pub fn table(o: &Optimized) -> String {
    let p = &o.problem;
    let mut out = String::new();
    let targets: Vec<String> = p
        .targets
        .iter()
        .map(|t| format!("{} <= {}", t.name(), seconds(t.seconds)))
        .collect();
    let _ = writeln!(
        out,
        "{}: cheapest layout for {} at {} requests/s (prompt {}, output {} tokens, zipf {}) on \
         {} at ${:.2}/GPU-hour{}",
        o.name,
        if targets.is_empty() {
            "no latency target".to_string()
        } else {
            targets.join(", ")
        },
        p.rate,
        p.prompt_tokens,
        p.output_tokens,
        p.routing_skew,
        p.hardware.name,
        p.hardware.price_per_hour,
        p.max_gpus
            .map(|g| format!(", at most {g} GPUs"))
            .unwrap_or_default()
    );
    let _ = write!(
        out,
        "\n{:<9} {:>6} {:>6} {:>8} {:>6} {:>5} {:>5} {:>5}",
        "", "STAGES", "SHARDS", "REPLICAS", "TENSOR", "BATCH", "MICRO", "GPUS"
    );
    for t in &p.targets {
        let _ = write!(out, " {:>10}", t.name());
    }
    let _ = writeln!(out, " {:>9} {:>10}  VERDICT", "TOKENS/S", "$/M TOKENS");
    for r in rows(o) {
        let e = r.eval;
        let pt = &e.point;
        let gpus = match e.reasons.first() {
            Some(Reason::OverBudget { at_least: true, .. }) => format!(">={}", e.gpus),
            _ if e.gpus == 0 => "-".into(),
            _ => e.gpus.to_string(),
        };
        let _ = write!(
            out,
            "{:<9} {:>6} {:>6} {:>8} {:>6} {:>5} {:>5} {:>5}",
            r.label,
            pt.stages,
            pt.expert_shards,
            if pt.expert_shards == 0 {
                "-".to_string()
            } else {
                pt.expert_replicas.to_string()
            },
            pt.tensor,
            pt.batch,
            e.micro_batches,
            gpus
        );
        for i in 0..p.targets.len() {
            let v = e.values.get(i).copied().flatten();
            let _ = write!(out, " {:>10}", v.map_or_else(|| "-".to_string(), seconds));
        }
        let _ = writeln!(
            out,
            " {:>9} {:>10}  {}",
            e.tokens_per_second()
                .map_or_else(|| "-".to_string(), |t| format!("{t:.0}")),
            e.cost_per_million_tokens
                .map_or_else(|| "-".to_string(), |c| format!("{c:.3}")),
            r.verdict
        );
    }
    let s = &o.outcome.stats;
    let _ = writeln!(
        out,
        "\nsearched {} layouts: {} over the budget before sizing, {} when sized, {} do not fit \
         memory, {} invalid, {} skipped (a smaller batch of the same layout already missed), \
         {} repeats (replicas without shards); {} estimated",
        s.points,
        s.over_budget_unsized,
        s.over_budget,
        s.does_not_fit,
        s.invalid,
        s.pruned,
        s.duplicates,
        s.estimated
    );
    let _ = writeln!(
        out,
        "percentiles: closed form + M/D/c queueing at {} requests/s; throughput and cost with \
         every sequence slot busy, prompts included",
        p.rate
    );
    if let Some(c) = &o.confirmation {
        let _ = write!(
            out,
            "simulated ({SIMULATED_REQUESTS} requests each: lanes, prompt rows, stages and \
             expert-shard replicas queued), cheapest first:"
        );
        for s in &c.simulated {
            let _ = write!(
                out,
                "\n  {}: TTFT p50 {}, p99 {}, TPOT mean {}, {:.0} tokens/s: {}",
                describe(&s.point),
                seconds(s.report.ttft_p50),
                seconds(s.report.ttft_p99),
                seconds(s.report.tpot_mean),
                s.report.tokens_per_second,
                if s.confirms() {
                    "not rejected".to_string()
                } else {
                    s.misses
                        .iter()
                        .map(Reason::describe)
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            );
        }
        let _ = writeln!(out);
        if c.confirmed.is_none() {
            let _ = writeln!(
                out,
                "none of the {} cheapest layouts the model accepts met the targets in \
                 simulation: the winner is the closed form's, unconfirmed (loosen the targets, \
                 lower --rate, raise --max-gpus or --confirm)",
                c.simulated.len()
            );
        }
    }
    match (o.winner(), &o.written) {
        (Some(w), Some(path)) => {
            let _ = writeln!(
                out,
                "wrote the winner's manifest ({}) to {}",
                describe(&w.point),
                path.display()
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "no layout meets the targets{}",
                o.outcome
                    .closest
                    .as_ref()
                    .map(|c| format!("; closest: {} ({})", describe(&c.point), reasons(c)))
                    .unwrap_or_default()
            );
        }
        _ => {}
    }
    out
}

/// The report as JSON.
pub fn json(o: &Optimized) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows(o)
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "label": r.label,
                "verdict": r.verdict,
                "layout": r.eval,
                "tokensPerSecond": r.eval.tokens_per_second(),
            })
        })
        .collect();
    serde_json::json!({
        "name": o.name,
        "problem": {
            "hardware": o.problem.hardware,
            "rate": o.problem.rate,
            "promptTokens": o.problem.prompt_tokens,
            "outputTokens": o.problem.output_tokens,
            "routingSkew": o.problem.routing_skew,
            "gateways": o.problem.gateways,
            "targets": o.problem.targets,
            "maxGpus": o.problem.max_gpus,
        },
        "space": o.space,
        "winner": o.winner(),
        "confirmed": o.confirmed(),
        "closest": o.outcome.closest,
        "rows": rows,
        "stats": o.outcome.stats,
        "simulated": o.confirmation.as_ref().map(|c| &c.simulated),
        "manifestWritten": o.written,
    })
}

/// `plan --optimize`: search, write the manifest if asked, print the report as `output` asks;
/// an error (after the report) when nothing meets the targets.
pub fn run(
    moe: &MoEDeployment,
    est: &EstimateArgs,
    args: &OptimizeArgs,
    output: crate::cli::Output,
) -> Result<()> {
    use crate::cli::Output;
    let mut o = optimize(moe, est, args)?;
    if let Some(path) = &args.write_manifest {
        write_manifest(&mut o, path)?;
    }
    match output {
        Output::Table => print!("{}", table(&o)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json(&o)).map_err(|e| Error::Encode {
                what: "optimization",
                message: e.to_string(),
            })?
        ),
        Output::Manifest => {
            if let Some(m) = &o.manifest {
                print!("{}", manifest_yaml(m)?);
            }
        }
    }
    o.require_winner()
}
