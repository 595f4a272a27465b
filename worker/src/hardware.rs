//! This machine as the performance model sees hardware (`moe_plan::perf::Hardware`), measured
//! by timing the engine's real kernels and the real gRPC hop (`moe-worker profile`), and the
//! model's predictions for `moe-worker local` deployments next to what they measure
//! (`moe-worker bench-calibrate`).
//!
//! On a CPU the deployment's parts are processes of a few threads each sharing the machine:
//! a profile describes one such process (its threads' bandwidth and FMA peak, the engine's
//! efficiency at weight streaming and at large products, its fixed cost per operator) and the
//! host they share (cores, all cores' bandwidth).

use std::path::PathBuf;
use std::time::Instant;

use moe_plan::perf::{self, Hardware, Host};
use serde_json::json;

use crate::error::{Error, Result};
use crate::kernels::{Mat, matmul};
use crate::sampling::SamplingParams;
use crate::serve::bench::cores;
use crate::source::ModelArg;

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// Threads of the profiled process (the local deployment's children run one each:
    /// `--child-threads`). Default: the pool's (`--threads`, else all cores).
    #[arg(long)]
    pub process_threads: Option<usize>,
    /// Also write the profile (JSON) to this file; `moe-operator plan --estimate
    /// --hardware-file` and `moe-worker bench-calibrate --profile` read it.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// The profile's name.
    #[arg(long, default_value = "this-machine")]
    pub name: String,
    /// USD per hour of one process's share of this machine (cost figures use it).
    #[arg(long, default_value_t = 0.0)]
    pub price: f64,
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::peer("threads", e.to_string()))
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `count` expert-sized f32 matrices ([n, k]; more of them together than the caches hold).
fn expert_matrices(n: usize, k: usize, count: usize) -> Vec<Vec<f32>> {
    (0..count)
        .map(|i| (0..n * k).map(|j| ((i + j) % 13) as f32 * 0.01).collect())
        .collect()
}

/// Bytes/s the kernel streams at batch 1 over `mats`, one after another as a decode step
/// reads its experts (best of 5 passes; each pass starts at `barrier` when given): the
/// weight-streaming rate the model's `bandwidth_efficiency` describes.
fn expert_streaming(mats: &[Vec<f32>], barrier: Option<&std::sync::Barrier>) -> f64 {
    let (n, k) = (1408, mats.first().map_or(0, |m| m.len() / 1408));
    let x = vec![1f32; k];
    let mut y = vec![0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        if let Some(b) = barrier {
            b.wait();
        }
        let t = Instant::now();
        for m in mats {
            matmul(&x, Mat::F32(m), &mut y, 1, n, k);
        }
        std::hint::black_box(&y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    mats.iter().map(|m| m.len() * 4).sum::<usize>() as f64 / best
}

/// Bytes/s that `processes` one-thread streams read together, each over its own expert-sized
/// matrices (as expert shards' processes do at once): what the machine's parts share.
fn concurrent_streaming(processes: usize) -> Result<f64> {
    let pools: Vec<rayon::ThreadPool> = (0..processes.max(1))
        .map(|_| pool(1))
        .collect::<Result<_>>()?;
    let barrier = std::sync::Barrier::new(pools.len());
    let rates: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = pools
            .iter()
            .map(|p| {
                let barrier = &barrier;
                s.spawn(move || {
                    p.install(|| {
                        let mats = expert_matrices(1408, 512, 64);
                        expert_streaming(&mats, Some(barrier))
                    })
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    Ok(rates.iter().sum())
}

/// FLOP/s of the kernel on a prefill-sized product ([m, k] x [n, k]^T).
fn product_rate(m: usize, n: usize, k: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        matmul(&x, Mat::F32(&w), &mut y, m, n, k);
        std::hint::black_box(&y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best
}

/// Seconds the roofline does not account for, per operator and per row of an operator:
/// decode steps of the `tiny` preset (4 layers, hidden 64: its weights sit in cache, so its
/// time is almost all fixed costs: norms, rotary, attention bookkeeping, routing, sampling)
/// with one sequence and with eight, over the operators the model charges (attention and
/// experts per layer, and the LM head).
fn op_overhead() -> Result<(f64, f64)> {
    let src = "synthetic:tiny".parse::<ModelArg>()?.open()?;
    let layers = src.config().num_hidden_layers;
    let model = crate::load::load_full(src.as_ref(), Default::default())?;
    let mut engine = crate::engine::Engine::new(model, Default::default())?;
    let steps = 48;
    // Seconds per decode step of `n` sequences (best of 5 runs).
    let mut step = |n: usize| -> Result<f64> {
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(steps + 1)
        };
        let mut best = f64::MAX;
        for run in 0..6 {
            let ids = (0..n)
                .map(|i| engine.add(vec![5u32, 9, 12, 40 + i as u32], params.clone()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            // The prompts' step, then decode steps only.
            engine.step()?;
            let t = Instant::now();
            for _ in 0..steps {
                engine.step()?;
            }
            if run > 0 {
                best = best.min(t.elapsed().as_secs_f64() / steps as f64);
            }
            while engine.has_work() {
                engine.step()?;
            }
            for id in ids {
                engine.remove(id);
            }
        }
        Ok(best)
    };
    let (one, eight) = (step(1)?, step(8)?);
    let ops = (2 * layers + 1) as f64;
    Ok((one / ops, ((eight - one) / 7.0 / ops).max(0.0)))
}

/// Measures this machine (see the module's description); prints progress to stderr.
pub fn measure(name: &str, process_threads: usize, price: f64) -> Result<Hardware> {
    let process = pool(process_threads)?;
    eprintln!(
        "profiling one process of {process_threads} thread(s) on {} cores",
        cores()
    );
    let (bandwidth, streaming, peak, product, overhead) = process.install(|| {
        let bandwidth = crate::bench::memory_bandwidth();
        // Mixtral-like expert matrices scaled down: 2.9 MB each, 96 of them (277 MB).
        let streaming = expert_streaming(&expert_matrices(1408, 512, 96), None);
        let peak = crate::bench::fma_peak();
        let product = product_rate(128, 2816, 1024);
        let overhead = op_overhead();
        (bandwidth, streaming, peak, product, overhead)
    });
    let overhead = overhead?;
    let host_bandwidth = concurrent_streaming(cores())?;
    // As many real call chains (caller and expert shard process) as cores at once, over one.
    let chains = crate::serve::bench::call_chains("mini", cores())?;
    eprintln!(
        "{} chains of expert calls at once run {chains:.2}x one chain",
        cores()
    );
    eprintln!("timing the gRPC hop (mutual TLS, loopback)");
    let hop = crate::serve::bench::grpc_hop(1024)?;
    // A real expert shard of the `mini` preset (the engine benchmark's small model, all its
    // layers and experts) called as decode steps call it: a layer at a time, two experts of
    // one row each (top-2 at batch 1). Its own busy counter gives the experts' compute as the
    // shard runs them (weights streamed from memory, the FFN's activation and bookkeeping
    // included); the rest of each call is what a round trip costs.
    let calls = crate::serve::bench::expert_call("mini", 2)?;
    let shard_streaming =
        calls.experts_per_call as f64 * calls.expert_bytes / calls.compute.max(1e-9);
    let (call, call_cpu) = (
        (calls.wall - calls.compute).max(0.0),
        (calls.cpu - calls.compute).max(0.0),
    );
    eprintln!(
        "real expert calls (mini, a layer at a time, two experts of one row): {:.0} us, {:.0} us \
         of CPU; the shard computed {:.0} us ({:.1} GB/s of expert weights); the call around \
         it: {:.0} us, {:.0} us of CPU",
        calls.wall * 1e6,
        calls.cpu * 1e6,
        calls.compute * 1e6,
        shard_streaming / 1e9,
        call * 1e6,
        call_cpu * 1e6
    );
    Ok(Hardware {
        name: name.to_string(),
        memory_bytes: memory_bytes(),
        memory_bandwidth: bandwidth,
        peak_flops: peak,
        compute_efficiency: (product / peak).min(1.0),
        bandwidth_efficiency: (streaming.min(shard_streaming) / bandwidth).min(1.0),
        nvlink_bandwidth: hop.bandwidth,
        network_bandwidth: hop.bandwidth,
        // A hop as the deployment makes it: half a real expert call after idle (its gRPC,
        // TLS, and the threads that wake for it; the echo's bare hop is printed above).
        network_latency: (call / 2.0).max(hop.latency),
        hop_cpu: (call_cpu / 2.0).max(hop.cpu),
        op_overhead: overhead.0,
        row_overhead: overhead.1,
        price_per_hour: price,
        host: Some(Host {
            cores: cores(),
            memory_bandwidth: host_bandwidth.max(bandwidth),
            call_chains: Some(chains),
        }),
    })
}

fn describe(hw: &Hardware) -> String {
    let host = hw.host.as_ref().map_or(String::new(), |h| {
        format!(
            "; host: {} cores, {:.1} GB/s together, {} chains of calls at once ({:.2} parts \
             progress at once)",
            h.cores,
            h.memory_bandwidth / 1e9,
            h.call_chains
                .map_or("as many".to_string(), |c| format!("{c:.2}")),
            hw.parallel_parts()
        )
    });
    format!(
        "{}: {:.1} GB/s read ({:.0}% streaming experts), {:.0} GFLOP/s FMA peak ({:.0}% in a \
         128x2816x1024 product), {:.1} us per operator + {:.2} us per row, gRPC hop {:.0} us + {:.2} GB/s{host}; \
         kernels: {}",
        hw.name,
        hw.memory_bandwidth / 1e9,
        hw.bandwidth_efficiency * 100.0,
        hw.peak_flops / 1e9,
        hw.compute_efficiency * 100.0,
        hw.op_overhead * 1e6,
        hw.row_overhead * 1e6,
        hw.network_latency * 1e6,
        hw.network_bandwidth / 1e9,
        crate::kernels::isa().name(),
    )
}

pub fn profile(args: ProfileArgs, threads: usize) -> Result<()> {
    if args.process_threads == Some(0) {
        return Err(Error::invalid("process-threads", "must be at least 1"));
    }
    if !(args.price >= 0.0 && args.price.is_finite()) {
        return Err(Error::invalid("price", "must be a number >= 0"));
    }
    let hw = measure(
        &args.name,
        args.process_threads.unwrap_or(threads),
        args.price,
    )?;
    eprintln!("{}", describe(&hw));
    let text = serde_json::to_string_pretty(&hw).map_err(|e| Error::peer("json", e.to_string()))?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{text}\n")).map_err(|e| Error::io(path, e))?;
    }
    println!("{text}");
    Ok(())
}

/// Reads a profile written by `moe-worker profile`.
pub fn read_profile(path: &std::path::Path) -> Result<Hardware> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let hw: Hardware = serde_json::from_str(&text).map_err(|e| {
        Error::invalid(
            "profile",
            format!("{} is not a hardware profile: {e}", path.display()),
        )
    })?;
    hw.check()
        .map_err(|m| Error::invalid("profile", format!("{}: {m}", path.display())))?;
    Ok(hw)
}

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    #[arg(long, default_value = "synthetic:mini")]
    pub model: ModelArg,
    /// Layouts, STAGESxEXPERT_SHARDS, comma-separated.
    #[arg(long, default_value = "1x1,2x2,4x4")]
    pub layouts: String,
    /// Concurrent requests of the batched measurement (the other is batch 1).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Measurements of each (layout, batch); the median is compared.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// The profile to predict with (from `moe-worker profile --process-threads 1`); default:
    /// measure this machine now.
    #[arg(long)]
    pub profile: Option<PathBuf>,
}

/// One (layout, batch) side by side. Per request, from its stream of tokens: time to the
/// first token, and time per output token after it (steady decode); the batch's tokens/s is
/// the sum of its requests' decode rates.
#[derive(Debug, Clone)]
pub struct Calibrated {
    pub stages: usize,
    pub shards: usize,
    pub batch: usize,
    pub measured_tokens_per_second: f64,
    pub predicted_tokens_per_second: f64,
    /// Seconds per output token of one request after its first.
    pub measured_token_latency: f64,
    pub predicted_token_latency: f64,
    /// Seconds to a request's first token, the batch sent at once.
    pub measured_first_token: f64,
    pub predicted_first_token: f64,
}

/// The model's prediction for one (layout, batch) of a local deployment.
#[derive(Debug, Clone, Copy)]
pub struct Predicted {
    pub tokens_per_second: f64,
    pub token_latency: f64,
    pub first_token: f64,
}

fn parse_layouts(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|l| {
            l.trim()
                .split_once('x')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .filter(|&(a, _): &(usize, usize)| a > 0)
                .ok_or_else(|| {
                    Error::invalid(
                        "layouts",
                        format!("`{l}` is not STAGESxEXPERT_SHARDS (stages at least 1)"),
                    )
                })
        })
        .collect()
}

/// The model's prediction for a local deployment of `cfg` with `stages` and `shards` serving
/// `batch` concurrent requests sent at once.
pub fn predict(
    cfg: &moe_engine::config::ModelConfig,
    hw: &Hardware,
    stages: usize,
    shards: usize,
    batch: usize,
    prompt_tokens: usize,
    tokens: usize,
) -> Result<Predicted> {
    let arch = moe_api::checkpoint::architecture(&cfg.to_hf_json())
        .map_err(|e| Error::config("config", e.to_string()))?;
    let plan = moe_plan::size(&moe_plan::SizingRequest {
        model: moe_api::planning::dims(&arch),
        dtype_bytes: cfg.dtype.size() as u64,
        expert_millibytes: 0,
        stages,
        expert_shards: Some(shards),
        tensor: 1,
        gpus_per_pod: 1,
        gpu_memory_bytes: hw.memory_bytes.max(1 << 30),
        context_tokens: prompt_tokens + tokens,
        concurrent_sequences: batch.max(1),
    })
    .map_err(|e| Error::invalid("layouts", e.to_string()))?;
    // The gateway's lanes (one per stage, at least 2) share the concurrent requests; a lane
    // with nothing to run is not a micro-batch in flight.
    let lanes = stages.max(2).min(batch.max(1));
    let layout = perf::Layout {
        expert_replicas: vec![1; shards],
        micro_batches: lanes,
        wire_bytes: 4,
        across_nodes: true,
        shared_device: true,
    };
    let w = perf::Workload {
        batch: batch.max(1).div_ceil(lanes),
        prompt_tokens,
        output_tokens: tokens,
        routing_skew: 0.0,
    };
    // The parts share this host: `perf::estimate` simulates it for the cycle; one run here
    // gives the cycle and the first step of a batch sent at once (prompts prefill together).
    let run = moe_plan::host::simulate(&plan, hw, &layout, &w);
    Ok(Predicted {
        // Every request gets a token each cycle (lanes may hold one sequence fewer than the
        // model's even split).
        tokens_per_second: batch.max(1) as f64 / run.cycle,
        token_latency: run.cycle,
        first_token: run.first_step,
    })
}

/// Runs every (layout, batch) against a real local deployment and the model.
pub fn calibrate(args: &CalibrateArgs) -> Result<(Hardware, Vec<Calibrated>)> {
    let layouts = parse_layouts(&args.layouts)?;
    if args.batch == 0 || args.tokens < 2 || args.repeats == 0 {
        return Err(Error::invalid(
            "batch/tokens/repeats",
            "batch and repeats must be at least 1, tokens at least 2",
        ));
    }
    let hw = match &args.profile {
        Some(p) => read_profile(p)?,
        None => measure("this-machine", 1, 0.0)?,
    };
    eprintln!("{}", describe(&hw));
    let src = args.model.open()?;
    let cfg = src.config().clone();
    drop(src);
    let vocab = cfg.vocab_size;
    let mut out = Vec::new();
    for (stages, shards) in layouts {
        eprintln!("{stages} stages x {shards} expert shards: starting");
        let d = crate::serve::bench::LocalDeployment::start(&args.model, stages, shards, None)?;
        let request = |i: usize| {
            let prompt = crate::serve::bench::prompt(args.prompt_tokens, i as u64 + 7, vocab);
            json!({"prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": true})
        };
        // Warm every lane and connection.
        crate::serve::http_json(&d.addr, "POST", "/v1/completions", Some(&request(0)))?;
        for batch in [1, args.batch] {
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                let handles: Vec<_> = (0..batch)
                    .map(|i| {
                        let (addr, body) = (d.addr.clone(), request(i));
                        std::thread::spawn(move || {
                            crate::serve::http_token_times(&addr, "/v1/completions", &body)
                        })
                    })
                    .collect();
                let (mut rate, mut latency, mut first) = (0.0, 0.0, 0.0);
                for h in handles {
                    let times = h
                        .join()
                        .map_err(|_| Error::peer("bench", "request thread"))??;
                    if times.len() != args.tokens {
                        return Err(Error::peer(
                            "bench",
                            format!(
                                "a request produced {} tokens, not {}",
                                times.len(),
                                args.tokens
                            ),
                        ));
                    }
                    let (t0, t1) = (times[0], times[times.len() - 1]);
                    let per_token = (t1 - t0) / (times.len() - 1) as f64;
                    rate += 1.0 / per_token.max(1e-9);
                    latency += per_token;
                    first += t0;
                }
                let n = batch as f64;
                runs.push((rate, latency / n, first / n));
            }
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (tps, lat, first) = runs[runs.len() / 2];
            let p = predict(
                &cfg,
                &hw,
                stages,
                shards,
                batch,
                args.prompt_tokens,
                args.tokens,
            )?;
            out.push(Calibrated {
                stages,
                shards,
                batch,
                measured_tokens_per_second: tps,
                predicted_tokens_per_second: p.tokens_per_second,
                measured_token_latency: lat,
                predicted_token_latency: p.token_latency,
                measured_first_token: first,
                predicted_first_token: p.first_token,
            });
        }
    }
    Ok((hw, out))
}

pub fn run_calibrate(args: CalibrateArgs) -> Result<()> {
    let (_, rows) = calibrate(&args)?;
    println!(
        "{}: the performance model (with this machine's profile) vs the local deployment; {} prompt tokens, {} generated per request; cpu features: {}",
        args.model,
        args.prompt_tokens,
        args.tokens,
        crate::kernels::cpu_features(),
    );
    println!(
        "| stages x shards | batch | measured tok/s | model tok/s | error | measured ms/token | model ms/token | error | measured TTFT ms | model TTFT ms | error |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for r in &rows {
        let e1 = r.predicted_tokens_per_second / r.measured_tokens_per_second - 1.0;
        let e2 = r.predicted_token_latency / r.measured_token_latency - 1.0;
        let e3 = r.predicted_first_token / r.measured_first_token - 1.0;
        worst = worst.max(e1.abs()).max(e2.abs());
        println!(
            "| {}x{} | {} | {:.1} | {:.1} | {:+.0}% | {:.2} | {:.2} | {:+.0}% | {:.1} | {:.1} | {:+.0}% |",
            r.stages,
            r.shards,
            r.batch,
            r.measured_tokens_per_second,
            r.predicted_tokens_per_second,
            e1 * 100.0,
            r.measured_token_latency * 1e3,
            r.predicted_token_latency * 1e3,
            e2 * 100.0,
            r.measured_first_token * 1e3,
            r.predicted_first_token * 1e3,
            e3 * 100.0,
        );
    }
    println!(
        "largest error of tokens/s and time per token {:.0}% (target: within 20%); time to \
         first token is shown, not held to it",
        worst * 100.0
    );
    Ok(())
}
