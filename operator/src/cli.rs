//! `moe-operator` subcommands.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use moe_plan::{PodSizing, SizedPlan};

use crate::crd::MoEDeployment;
use crate::error::{Error, Result};
use crate::planning;
pub use crate::simulate::{RowKind, SimulateArgs, Simulated, simulate, simulate_table};

#[derive(Debug, Parser)]
#[command(
    name = "moe-operator",
    version,
    about = "Kubernetes operator for moe-serve"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: reconcile MoEDeployments into stages, expert shards and a gateway.
    Run(crate::run::RunArgs),
    /// Print the MoEDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print the plan for a MoEDeployment manifest, or for a checkpoint folder (its
    /// config.json; default parallelism): stages, expert shards, memory, GPUs. With
    /// --optimize, the cheapest layout that meets latency targets within a GPU budget.
    Plan {
        /// The manifest (YAML or JSON), or a Hugging Face checkpoint folder.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        estimate: EstimateArgs,
        #[command(flatten)]
        optimize: crate::optimize::OptimizeArgs,
    },
    /// Simulate serving a manifest's plan (discrete events driven by the performance model's
    /// operator times) next to another layout: tensor x pipeline parallelism with the experts
    /// on the stages, GPT-4's reported layout by default (8-way tensor x 16-way pipeline).
    Simulate(SimulateArgs),
    /// Benchmark the expert-autoscaling policy: load per replica under Zipf routing skew,
    /// fixed uniform replicas vs the policy at the same total replica count.
    BenchAutoscale {
        /// The manifest whose plan gives the expert shards.
        #[arg(short = 'f', long = "filename", default_value = "examples/gpt4.yaml")]
        file: PathBuf,
        /// Zipf exponent of the routing skew.
        #[arg(long, default_value_t = 1.2)]
        zipf: f64,
        /// Tokens routed through each layer.
        #[arg(long, default_value_t = 20_000)]
        tokens: usize,
        /// Expert replicas in all (default: the spec's totalReplicaBudget, else 3 per shard).
        #[arg(long)]
        replicas: Option<i32>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// `plan --estimate`: the performance model's prediction for the plan.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// Also estimate time to first token, time per output token, throughput, utilisation and
    /// cost (moe_plan::perf: rooflines per operator, transport per hop, pipelining).
    #[arg(long)]
    pub estimate: bool,
    /// Hardware profile: a100-40gb, a100-80gb, h100-80gb, h200-141gb, or a profile file
    /// (JSON, as `moe-worker profile -o FILE` writes for the machine it runs on) (default:
    /// from spec.placement.gpuProduct).
    #[arg(long)]
    pub hardware: Option<String>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches in flight (default: one per stage, at least 2, as the gateway runs).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 256)]
    pub output_tokens: usize,
    /// Zipf exponent of the experts' popularity (0: uniform routing).
    #[arg(long, default_value_t = 0.0)]
    pub zipf: f64,
    /// USD per GPU-hour (default: the profile's).
    #[arg(long)]
    pub price: Option<f64>,
}

/// The hardware profile of a GPU product label (`NVIDIA-A100-SXM4-80GB`, ...).
pub fn profile_for_product(product: &str) -> Option<moe_plan::perf::Hardware> {
    let p = product.to_ascii_uppercase();
    let name = if p.contains("H200") {
        "h200-141gb"
    } else if p.contains("H100") {
        "h100-80gb"
    } else if p.contains("A100") && p.contains("40GB") {
        "a100-40gb"
    } else if p.contains("A100") {
        "a100-80gb"
    } else {
        return None;
    };
    moe_plan::perf::gpu_profile(name)
}

/// The hardware profile `hardware` names (a built-in profile, or a profile file as `moe-worker
/// profile -o` writes one), else the one of the spec's `placement.gpuProduct`.
pub fn hardware(moe: &MoEDeployment, hardware: Option<&str>) -> Result<moe_plan::perf::Hardware> {
    use moe_plan::perf;
    let bad = |field: &str, message: String| {
        Error::Api(moe_api::Error::invalid(field.to_string(), message))
    };
    Ok(match hardware {
        Some(h) => match perf::gpu_profile(h) {
            Some(p) => p,
            None if Path::new(h).is_file() => {
                let text = std::fs::read_to_string(h)
                    .map_err(|e| bad("--hardware", format!("reading {h}: {e}")))?;
                let p: perf::Hardware = serde_json::from_str(&text).map_err(|e| {
                    bad(
                        "--hardware",
                        format!("{h} is not a hardware profile (moe-worker profile -o): {e}"),
                    )
                })?;
                p.check()
                    .map_err(|m| bad("--hardware", format!("{h}: {m}")))?;
                p
            }
            None => {
                let names: Vec<String> = perf::gpu_profiles().into_iter().map(|p| p.name).collect();
                return Err(bad(
                    "--hardware",
                    format!(
                        "`{h}` is neither one of {} nor a profile file",
                        names.join(", ")
                    ),
                ));
            }
        },
        None => profile_for_product(&moe.spec.placement.gpu_product).ok_or_else(|| {
            bad(
                "--hardware",
                format!(
                    "no profile for spec.placement.gpuProduct `{}`: name one",
                    moe.spec.placement.gpu_product
                ),
            )
        })?,
    })
}

/// The estimate `args` ask for.
pub fn estimate_for(
    moe: &MoEDeployment,
    plan: &SizedPlan,
    args: &EstimateArgs,
) -> Result<(moe_plan::perf::Hardware, moe_plan::perf::Estimate)> {
    use moe_plan::perf;
    let bad = |field: &str, message: String| {
        Error::Api(moe_api::Error::invalid(field.to_string(), message))
    };
    let mut hw = hardware(moe, args.hardware.as_deref())?;
    if let Some(p) = args.price {
        hw.price_per_hour = p;
    }
    if args.batch == 0 {
        return Err(bad("--batch", "must be at least 1".into()));
    }
    let layout = perf::Layout {
        expert_replicas: vec![
            usize::try_from(moe.spec.experts.min_replicas.max(1)).unwrap_or(1);
            plan.expert_shards.len()
        ],
        micro_batches: args
            .micro_batches
            .unwrap_or(plan.stages.len().max(2))
            .max(1),
        wire_bytes: match moe.spec.serving.wire_dtype {
            crate::crd::WireDType::Bf16 => 2,
            _ => 4,
        },
        across_nodes: true,
        ..Default::default()
    };
    let w = perf::Workload {
        batch: args.batch,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        routing_skew: args.zipf,
    };
    let e = perf::estimate(plan, &hw, &layout, &w);
    Ok((hw, e))
}

/// The estimate as lines under the plan's table.
pub fn estimate_table(
    hw: &moe_plan::perf::Hardware,
    args: &EstimateArgs,
    e: &moe_plan::perf::Estimate,
) -> String {
    format!(
        "estimate on {} (batch {} per micro-batch, prompt {}, output {}, zipf {}):\n  \
         time to first token {:.1} ms, time per output token {:.1} ms, {:.0} tokens/s \
         ({:.0} per GPU over {} GPUs)\n  stage GPUs {:.0}% busy, expert GPUs {:.0}% busy; \
         ${:.3} per million tokens at ${:.2}/GPU-hour\n  one decode step: attention {:.1} ms, \
         experts {:.1} ms, activations moved {:.1} ms\n",
        hw.name,
        args.batch,
        args.prompt_tokens,
        args.output_tokens,
        args.zipf,
        e.time_to_first_token * 1e3,
        e.time_per_output_token * 1e3,
        e.tokens_per_second,
        e.tokens_per_second_per_gpu,
        e.gpus,
        e.stage_utilization * 100.0,
        e.expert_utilization * 100.0,
        e.cost_per_million_tokens,
        hw.price_per_hour,
        e.step_attention * 1e3,
        e.step_experts * 1e3,
        e.step_transport * 1e3,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    /// The MoEDeployment that was planned, as YAML (for a checkpoint folder: a manifest to
    /// edit and apply).
    Manifest,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let format = match args.log_format {
                crate::run::LogFormat::Json => moe_telemetry::LogFormat::Json,
                crate::run::LogFormat::Text => moe_telemetry::LogFormat::Text,
            };
            let telemetry = moe_telemetry::init_with_format("moe-operator", format);
            let runtime = tokio::runtime::Runtime::new().map_err(|e| Error::Run(e.to_string()))?;
            let result = runtime.block_on(crate::run::run(args));
            telemetry.shutdown();
            result.map_err(Error::Run)?;
        }
        Command::Crd => print!("{}", crd_yaml()?),
        Command::Simulate(args) => {
            let moe = read_manifest(&args.file)?;
            let rows = simulate(&moe, &args)?;
            print!("{}", simulate_table(&args, &rows));
        }
        Command::BenchAutoscale {
            file,
            zipf,
            tokens,
            replicas,
            seed,
        } => {
            let moe = read_manifest(&file)?;
            let plan = planning::plan(&moe.spec)?;
            let shards = i32::try_from(plan.expert_shards.len()).unwrap_or(i32::MAX);
            let e = &moe.spec.experts;
            let total = replicas
                .or(e.autoscaling.total_replica_budget)
                .unwrap_or(3 * shards)
                .max(shards);
            print!(
                "{}",
                crate::bench::run(&plan, zipf, tokens, total, e.max_replicas, seed)
            );
        }
        Command::Plan {
            file,
            output,
            estimate,
            optimize,
        } => {
            optimize.check_unused()?;
            let moe = moe_api::read_deployment(&file)?;
            if optimize.optimize {
                return crate::optimize::run(&moe, &estimate, &optimize, output);
            }
            let plan = planning::plan(&moe.spec)?;
            let est = if estimate.estimate {
                Some(estimate_for(&moe, &plan, &estimate)?)
            } else {
                None
            };
            match output {
                Output::Manifest => print!(
                    "{}",
                    serde_yaml::to_string(&moe).map_err(|e| Error::Encode {
                        what: "manifest",
                        message: e.to_string(),
                    })?
                ),
                Output::Table => {
                    print!("{}", plan_table(&moe, &plan));
                    if let Some((hw, e)) = &est {
                        print!("{}", estimate_table(hw, &estimate, e));
                    }
                }
                Output::Json => {
                    let v = match &est {
                        Some((hw, e)) => serde_json::json!({
                            "plan": plan, "hardware": hw, "estimate": e,
                        }),
                        None => serde_json::to_value(&plan).unwrap_or_default(),
                    };
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v).map_err(|e| Error::Encode {
                            what: "plan",
                            message: e.to_string(),
                        })?
                    )
                }
            }
        }
    }
    Ok(())
}

/// The CRD as committed under `crds/`.
pub fn crd_yaml() -> Result<String> {
    let yaml = serde_yaml::to_string(&MoEDeployment::crd()).map_err(|e| Error::Encode {
        what: "CRD",
        message: e.to_string(),
    })?;
    Ok(format!(
        "# Generated by `moe-operator crd` from api/src/crd.rs; do not edit.\n{yaml}"
    ))
}

/// The `MoEDeployment` in a manifest file (one of its documents).
pub fn read_manifest(path: &Path) -> Result<MoEDeployment> {
    Ok(moe_api::read_manifest(path)?)
}

fn params(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000_000 => format!("{:.2}T", n as f64 / 1e12),
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        b30 if b30 >= 1 << 30 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        b20 if b20 >= 1 << 20 => format!("{:.2} MiB", b / (1u64 << 20) as f64),
        0 => "-".to_string(),
        _ => format!("{:.2} KiB", b / 1024.0),
    }
}

/// `0-3,8` for experts 0,1,2,3,8.
fn ranges(ids: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            let _ = write!(out, "{}", ids[i]);
        } else {
            let _ = write!(out, "{}-{}", ids[i], ids[j]);
        }
        i = j + 1;
    }
    out
}

pub fn plan_table(moe: &MoEDeployment, plan: &SizedPlan) -> String {
    let m = &plan.model;
    let mut out = String::new();
    let name = moe.metadata.name.as_deref().unwrap_or("-");
    let _ = writeln!(
        out,
        "{name}: {} layers × {} experts, top-{}, hidden {}, {} bytes/weight; KV cache for {} sequences × {} tokens",
        m.num_layers,
        m.num_experts,
        m.top_k,
        m.hidden_size,
        plan.dtype_bytes,
        plan.concurrent_sequences,
        plan.context_tokens
    );
    let _ = writeln!(
        out,
        "parameters: {} total, {} active per token",
        params(plan.total_parameters),
        params(plan.active_parameters_per_token)
    );
    let v = &m.variant;
    let dense: Vec<usize> = v.dense_layers.iter().collect();
    if !dense.is_empty() {
        let _ = writeln!(
            out,
            "dense layers {} (MLP {} wide) run on their stages, next to attention",
            ranges(&dense),
            v.dense_intermediate_size
        );
    }
    if v.shared_expert_intermediate_size > 0 {
        let _ = writeln!(
            out,
            "shared experts ({} wide per MoE layer) run on the stages for every token; routed experts on {}",
            v.shared_expert_intermediate_size,
            if plan.expert_shards.is_empty() {
                "the stages"
            } else {
                "the expert shards"
            }
        );
    }
    if let Some(la) = v.latent_attention {
        let _ = writeln!(
            out,
            "latent attention: the KV cache holds {} values per token and layer (latent {} + rotary key {})",
            la.kv_lora_rank + la.qk_rope_head_dim,
            la.kv_lora_rank,
            la.qk_rope_head_dim
        );
    }
    let _ = writeln!(
        out,
        "\n{:<13} {:>5} {:>9} {:>9} {:>9} {:>12} {:>12} {:>5}",
        "ROLE", "INDEX", "LAYERS", "EXPERTS", "PARAMS", "WEIGHTS", "KV CACHE", "GPUS"
    );
    let mut row = |role: &str, index: String, layers: String, experts: String, p: &PodSizing| {
        let _ = writeln!(
            out,
            "{role:<13} {index:>5} {layers:>9} {experts:>9} {:>9} {:>12} {:>12} {:>5}",
            params(p.parameters),
            gib(p.weight_bytes),
            gib(p.kv_cache_bytes),
            p.gpus
        );
    };
    let all_experts = if plan.expert_shards.is_empty() {
        "all"
    } else {
        "-"
    };
    for s in &plan.stages {
        let l = &s.layout;
        row(
            "stage",
            l.index.to_string(),
            format!("{}..{}", l.layer_start, l.layer_end),
            all_experts.to_string(),
            &s.pod,
        );
    }
    for s in &plan.expert_shards {
        let l = &s.layout;
        row(
            "expert-shard",
            l.index.to_string(),
            format!("{}..{}", l.layer_start, l.layer_end),
            ranges(&l.experts),
            &s.pod,
        );
    }
    row("gateway", "-".into(), "-".into(), "-".into(), &plan.gateway);
    let _ = writeln!(
        out,
        "\n{} GPUs of {} ({} GiB) for one replica of each part, {} in use",
        plan.total_gpus,
        moe.spec.placement.gpu_product,
        plan.gpu_memory_bytes >> 30,
        gib(plan.total_memory_bytes)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "");
    }
}
