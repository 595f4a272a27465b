//! `moe-worker bench`: our engine and PyTorch eager (transformers) on the same checkpoint,
//! same thread count, in one run; prints ratios and the batch-1 decode bandwidth ceiling.
//! Each engine runs in its own child process so peak memory is measured per engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Args;
use rayon::prelude::*;
use serde_json::Value;

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::synthetic;
use crate::weights::{Checkpoint, WeightSource};

const TORCH_SCRIPT: &str = include_str!("../../scripts/bench_torch.py");

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Synthetic presets to benchmark (random f32 weights written as checkpoints).
    #[arg(long, value_delimiter = ',', default_value = "mini,base")]
    pub presets: Vec<String>,

    /// Python with torch and transformers (default: $MOE_BENCH_PYTHON, then
    /// ~/.cache/moe-serve/venv/bin/python, then python3).
    #[arg(long)]
    pub python: Option<PathBuf>,

    /// Where checkpoints are written (default: ~/.cache/moe-serve/bench).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    #[command(flatten)]
    pub workload: Workload,

    /// Families beyond Mixtral to benchmark at the `mini` shape (random weights written by
    /// transformers; `none` for none).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qwen2_moe,qwen3_moe,olmoe,deepseek_v2,deepseek_v3,gpt_oss,glm4_moe"
    )]
    pub families: Vec<String>,

    /// Only run our engine.
    #[arg(long)]
    pub skip_torch: bool,

    /// Weight formats the presets are measured in: f32 (f32 checkpoint), bf16 (a bf16
    /// checkpoint used as stored; PyTorch in bf16 beside it), q8 (the bf16 checkpoint with
    /// 8-bit experts).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,q8")]
    pub precisions: Vec<String>,
}

/// One way of running a preset: its checkpoint's format, our engine's options, PyTorch's dtype.
struct Variant {
    label: &'static str,
    /// Our engine's weight formats.
    precision: crate::weights::Precision,
    bf16_checkpoint: bool,
    torch_dtype: Option<&'static str>,
}

impl Variant {
    /// Bytes per weight decode reads: (dense matrices, routed experts).
    fn bytes(&self) -> (f64, f64) {
        use crate::weights::Dtype;
        let stored = if self.bf16_checkpoint {
            Dtype::Bf16
        } else {
            Dtype::F32
        };
        (
            self.precision.matrix(stored, false).bytes_per_weight(),
            self.precision.matrix(stored, true).bytes_per_weight(),
        )
    }
}

/// The folder of preset `name`'s checkpoint (f32, or its bf16 copy), written if missing.
fn preset_checkpoint(root: &Path, name: &str, bf16: bool) -> Result<PathBuf> {
    let dir = root.join(if bf16 {
        format!("{name}-bf16")
    } else {
        name.to_string()
    });
    if !dir.join("config.json").exists() {
        eprintln!("writing {name} checkpoint to {}", dir.display());
        let preset = synthetic::preset(name)?;
        synthetic::export_as(&preset, 0, &dir, 2 << 30, bf16, &mut |_, _| {})?;
    }
    Ok(dir)
}

const PRECISION_AUTO: crate::weights::Precision = crate::weights::Precision {
    weights: crate::weights::DtypeChoice::Auto,
    experts: crate::weights::DtypeChoice::Auto,
};

const VARIANTS: &[Variant] = &[
    Variant {
        label: "f32",
        precision: PRECISION_AUTO,
        bf16_checkpoint: false,
        torch_dtype: Some("float32"),
    },
    Variant {
        label: "bf16",
        precision: PRECISION_AUTO,
        bf16_checkpoint: true,
        torch_dtype: Some("bfloat16"),
    },
    Variant {
        label: "q8",
        precision: crate::weights::Precision {
            weights: crate::weights::DtypeChoice::Auto,
            experts: crate::weights::DtypeChoice::Is(crate::weights::Dtype::Q8),
        },
        bf16_checkpoint: true,
        torch_dtype: None,
    },
];

/// What each engine is asked to do (the same for both).
#[derive(Debug, Clone, Args)]
pub struct Workload {
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prefill_tokens: usize,

    /// Tokens timed per decode measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,

    /// Sequences of the batched decode measurement.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,

    /// Repetitions of each measurement (the best is kept).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

#[derive(Debug, Args)]
pub struct EngineRunArgs {
    #[arg(long)]
    pub model: PathBuf,

    #[command(flatten)]
    pub precision: crate::load::PrecisionArgs,

    #[command(flatten)]
    pub workload: Workload,
}

fn cache_root() -> PathBuf {
    std::env::var_os("MOE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moe-serve")))
        .unwrap_or_else(|| std::env::temp_dir().join("moe-serve"))
}

/// Read bandwidth of this machine with the pool's threads: the best of several passes over a
/// 1 GiB buffer (larger than the caches), read the way weights are read at their fastest (four
/// interleaved streams per thread with software prefetch, one multiply-add per float), so the
/// ceiling derived from it is not a naive single-stream figure.
pub fn memory_bandwidth() -> f64 {
    let k = 4096;
    let n = (256 << 20) / k; // 1 GiB of f32
    let buf: Vec<f32> = (0..n * k).into_par_iter().map(|i| (i % 7) as f32).collect();
    let x = vec![1f32; k];
    let mut y = vec![0f32; n];
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        crate::kernels::matmul(&x, crate::kernels::Mat::F32(&buf), &mut y, 1, n, k);
        std::hint::black_box(&y);
        best = best.max((n * k * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// The engine side of the benchmark, in this process.
pub fn run_engine(args: EngineRunArgs) -> Result<()> {
    let a = &args.workload;
    let t0 = Instant::now();
    let src = Checkpoint::open(&args.model)?;
    let vocab = src.config().vocab_size as u64;
    let model = crate::load::load_full(&src, args.precision.precision())?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut engine = Engine::new(
        model,
        EngineOptions {
            max_batch_tokens: 4096,
        },
    )?;
    let mut rng = 1234u64;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                rng = synthetic::splitmix64(rng);
                (3 + rng % (vocab - 3)) as u32
            })
            .collect()
    };
    let params = |n| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    };

    let mut best = f64::INFINITY;
    for _ in 0..a.repeats {
        let id = engine.add(ids(a.prefill_tokens), params(1))?;
        let t = Instant::now();
        engine.step()?;
        best = best.min(t.elapsed().as_secs_f64());
        engine.remove(id);
    }
    let prefill = a.prefill_tokens as f64 / best;

    let mut decode = |batch: usize| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..a.repeats.saturating_sub(1).max(1) {
            let seqs: Vec<_> = (0..batch)
                .map(|_| engine.add(ids(16), params(a.decode_tokens + 1)))
                .collect::<Result<_>>()?;
            engine.step()?; // prefill
            let t = Instant::now();
            for _ in 0..a.decode_tokens {
                engine.step()?;
            }
            best = best.min(t.elapsed().as_secs_f64());
            for s in seqs {
                engine.remove(s);
            }
        }
        Ok((batch * a.decode_tokens) as f64 / best)
    };
    let d1 = decode(1)?;
    let db = decode(a.batch)?;
    // One more batch-1 pass with the probes on: where a token's time goes.
    let breakdown = {
        let seq = engine.add(ids(16), params(a.decode_tokens + 1))?;
        engine.step()?;
        crate::profile::enable(true);
        let t = Instant::now();
        for _ in 0..a.decode_tokens {
            engine.step()?;
        }
        let total = t.elapsed().as_secs_f64();
        crate::profile::enable(false);
        engine.remove(seq);
        let ([matmul, attention, routing], bytes) = crate::profile::report();
        let per = |s: f64| 1e3 * s / a.decode_tokens as f64;
        serde_json::json!({
            "token_ms": per(total),
            "matmul_ms": per(matmul),
            "matmul_gb_s": bytes as f64 / matmul.max(1e-9) / 1e9,
            "attention_ms": per(attention),
            "routing_ms": per(routing),
            "other_ms": per(total - matmul - attention - routing),
        })
    };
    let formats = engine.model().bytes_by_dtype();
    let out = serde_json::json!({
        "engine": "moe-serve",
        "kernels": crate::kernels::isa().name(),
        "formats": formats,
        "load_s": load_s,
        "prefill_tok_s": prefill,
        "decode_b1_tok_s": d1,
        "decode_batch_tok_s": db,
        "breakdown_b1": breakdown,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    Ok(())
}

fn run_json(mut cmd: Command, what: &str) -> Result<Value> {
    let out = cmd
        .output()
        .map_err(|e| Error::invalid(what, format!("could not start: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(Error::invalid(
            what,
            format!("failed ({}): {}", out.status, tail.join(" | ")),
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line)
        .map_err(|e| Error::invalid(what, format!("unreadable result `{line}`: {e}")))
}

fn python(a: &BenchArgs) -> PathBuf {
    if let Some(p) = &a.python {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("MOE_BENCH_PYTHON") {
        return p.into();
    }
    let venv = cache_root().join("venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn checkpoint_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

const QUALITY_PROMPTS: usize = 8;
const QUALITY_PROMPT_TOKENS: usize = 24;
const QUALITY_CONTINUE: usize = 16;

/// One benchmarked model and format.
struct Row {
    name: String,
    /// A Mixtral preset (the targets are stated for these).
    preset: bool,
    size: u64,
    ceiling: f64,
    ceiling_batch: f64,
    ours: Value,
    torch: Option<Value>,
    /// Bytes read per token at batch 1.
    read: f64,
    prefill_flops: f64,
}

/// The FMA peak of the pool's threads together (each timing the instruction set in use).
pub fn fma_peak() -> f64 {
    rayon::broadcast(|_| crate::kernels::fma_peak_flops(0.3))
        .into_iter()
        .sum()
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let exe =
        std::env::current_exe().map_err(|e| Error::invalid("bench", format!("own path: {e}")))?;
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(|| cache_root().join("bench"));
    let script = std::env::temp_dir().join(format!("moe-bench-torch-{}.py", std::process::id()));
    std::fs::write(&script, TORCH_SCRIPT).map_err(|e| Error::io(&script, e))?;

    let bw = memory_bandwidth();
    let peak = fma_peak();
    println!(
        "threads: {threads}; kernels: {}; cpu features: {}",
        crate::kernels::isa().name(),
        crate::kernels::cpu_features()
    );
    println!(
        "measured read bandwidth: {:.1} GB/s; measured FMA peak: {:.1} GFLOP/s",
        bw / 1e9,
        peak / 1e9
    );
    let variants: Vec<&Variant> = a
        .precisions
        .iter()
        .map(|p| {
            VARIANTS.iter().find(|v| v.label == p).ok_or_else(|| {
                Error::invalid("--precisions", format!("`{p}` is not one of f32, bf16, q8"))
            })
        })
        .collect::<Result<_>>()?;
    // (label, checkpoint folder, config, variant) of every run.
    let mut models = Vec::new();
    for name in &a.presets {
        let preset = synthetic::preset(name)?;
        for v in &variants {
            let dir = preset_checkpoint(&root, name, v.bf16_checkpoint)?;
            models.push((
                format!("{name} {}", v.label),
                dir,
                preset.config.clone(),
                *v,
                true,
            ));
        }
    }
    for family in a.families.iter().filter(|f| f.as_str() != "none") {
        if crate::config::Family::parse(family).is_none() {
            return Err(Error::invalid(
                "--families",
                format!("unknown family `{family}`"),
            ));
        }
        let dir = root.join(format!("family-{family}"));
        if !dir.join("config.json").exists() {
            eprintln!("writing a {family} checkpoint to {}", dir.display());
            let mut make = Command::new(python(&a));
            make.arg(&script)
                .arg("--make-family")
                .arg(family)
                .arg("--out")
                .arg(&dir);
            run_json(make, "writing a family checkpoint")?;
        }
        let cfg = crate::config::ModelConfig::from_dir(&dir)?;
        models.push((family.clone(), dir, cfg, &VARIANTS[0], false));
    }
    let mut rows = Vec::new();
    for (name, dir, cfg, v, preset) in models {
        let batch = a.workload.batch;
        let (dense, expert) = v.bytes();
        let read = cfg.bytes_read_per_token(dense, expert);
        let ceiling = bw / read;
        let ceiling_batch = bw / cfg.bytes_read_per_step(batch, dense, expert) * batch as f64;
        let common = |c: &mut Command| {
            let w = &a.workload;
            c.arg("--prefill-tokens").arg(w.prefill_tokens.to_string());
            c.arg("--decode-tokens").arg(w.decode_tokens.to_string());
            c.arg("--batch").arg(w.batch.to_string());
            c.arg("--repeats").arg(w.repeats.to_string());
        };
        let mut ours = Command::new(&exe);
        ours.arg("--threads")
            .arg(threads.to_string())
            .arg("bench-engine")
            .arg("--model")
            .arg(&dir)
            .args(crate::load::PrecisionArgs::from(v.precision).to_args());
        common(&mut ours);
        eprintln!("{name}: moe-serve");
        let ours = run_json(ours, "engine benchmark")?;
        let torch = match v.torch_dtype {
            Some(dtype) if !a.skip_torch => {
                let mut t = Command::new(python(&a));
                t.arg(&script)
                    .arg("--model")
                    .arg(&dir)
                    .arg("--threads")
                    .arg(threads.to_string())
                    .arg("--dtype")
                    .arg(dtype);
                t.env("OMP_NUM_THREADS", threads.to_string());
                common(&mut t);
                eprintln!("{name}: pytorch ({dtype})");
                Some(run_json(t, "pytorch benchmark")?)
            }
            _ => None,
        };
        // FLOPs per prompt token: two per weight read (the LM head runs for the last token
        // only), plus attention's scores and weighted sums at the mean position.
        let h = cfg.hidden_size as f64;
        let mean_pos = a.workload.prefill_tokens as f64 / 2.0;
        let attn = 4.0 * cfg.num_hidden_layers as f64 * mean_pos * cfg.q_dim() as f64;
        let flops = 2.0 * (cfg.active_params_per_token() as f64 - cfg.vocab_size as f64 * h) + attn;
        rows.push(Row {
            name,
            preset,
            size: checkpoint_size(&dir),
            ceiling,
            ceiling_batch,
            ours,
            torch,
            read,
            prefill_flops: flops,
        });
    }
    let _ = std::fs::remove_file(&script);

    // Quality of each cheaper format against the f32 checkpoint, on the same prompts.
    let mut quality = Vec::new();
    for name in &a.presets {
        let tests: Vec<&&Variant> = variants.iter().filter(|v| v.label != "f32").collect();
        if tests.is_empty() {
            continue;
        }
        let reference_src = Checkpoint::open(&preset_checkpoint(&root, name, false)?)?;
        let reference = crate::load::load_full(&reference_src, PRECISION_AUTO)?;
        let vocab = reference.config().vocab_size as u64;
        let mut rng = 99u64;
        let prompts: Vec<Vec<u32>> = (0..QUALITY_PROMPTS)
            .map(|_| {
                (0..QUALITY_PROMPT_TOKENS)
                    .map(|_| {
                        rng = synthetic::splitmix64(rng);
                        (3 + rng % (vocab - 3)) as u32
                    })
                    .collect()
            })
            .collect();
        for v in tests {
            let src = Checkpoint::open(&preset_checkpoint(&root, name, v.bf16_checkpoint)?)?;
            let test = crate::load::load_full(&src, v.precision)?;
            eprintln!("{name} {}: quality against f32", v.label);
            let q = crate::quality::compare(&reference, &test, &prompts, QUALITY_CONTINUE)?;
            quality.push((format!("{name} {}", v.label), q));
        }
    }

    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    if !quality.is_empty() {
        println!();
        println!(
            "quality against the f32 checkpoint: {QUALITY_PROMPTS} random prompts of \
             {QUALITY_PROMPT_TOKENS} tokens, each continued {QUALITY_CONTINUE} tokens greedily \
             (teacher-forced on the f32 model's tokens)"
        );
        println!(
            "{:<14} {:>10} {:>14} {:>14} {:>14} {:>16}",
            "model", "positions", "top-1 agree", "mean KL", "max KL", "greedy agree"
        );
        for (name, q) in &quality {
            println!(
                "{name:<14} {:>10} {:>13.1}% {:>14.2e} {:>14.2e} {:>15.1}%",
                q.positions,
                100.0 * q.top1_agreement,
                q.mean_kl,
                q.max_kl,
                100.0 * q.greedy_agreement
            );
        }
    }
    println!();
    println!(
        "{:<14} {:<28} {:>12} {:>12} {:>12} {:>12}",
        "model", "metric", "moe-serve", "pytorch", "ratio", "target"
    );
    for r in &rows {
        let name = &r.name;
        let t = |k: &str| r.torch.as_ref().map_or(f64::NAN, |t| f(t, k));
        // The targets are the Mixtral presets'; other families are reported beside them.
        let target = |t: &'static str| if r.preset { t } else { "" };
        let line = |metric: &str, o: f64, p: f64, ratio: f64, target: &str| {
            println!("{name:<14} {metric:<28} {o:>12.1} {p:>12.1} {ratio:>11.2}x {target:>12}");
        };
        for (metric, key, goal) in [
            ("prefill tok/s (128)", "prefill_tok_s", ""),
            ("decode tok/s batch 1", "decode_b1_tok_s", ""),
            ("decode tok/s batch 8", "decode_batch_tok_s", ">= 2.0x"),
        ] {
            let (o, p) = (f(&r.ours, key), t(key));
            line(metric, o, p, o / p, target(goal));
        }
        let (om, pm) = (
            f(&r.ours, "peak_rss_bytes") / r.size as f64,
            t("peak_rss_bytes") / r.size as f64,
        );
        println!(
            "{name:<14} {:<28} {:>11.2}x {:>11.2}x {:>12} {:>12}",
            "peak memory / checkpoint",
            om,
            pm,
            "",
            target("<= 1.1x")
        );
        let gflops = f(&r.ours, "prefill_tok_s") * r.prefill_flops / 1e9;
        println!(
            "{name:<14} {:<28} {:>12.1} {:>12.1} {:>11.0}% {:>12}",
            "prefill GFLOP/s vs FMA peak",
            gflops,
            peak / 1e9,
            100.0 * gflops * 1e9 / peak,
            target(">= 60%")
        );
        let d1 = f(&r.ours, "decode_b1_tok_s");
        let goal = if r.name.starts_with("base") {
            ">= 80%"
        } else {
            ">= 70%"
        };
        println!(
            "{name:<14} {:<28} {:>12.1} {:>12.1} {:>11.0}% {:>12}",
            "b1 decode vs ceiling",
            d1,
            r.ceiling,
            100.0 * d1 / r.ceiling,
            target(goal)
        );
        println!(
            "{name:<14} checkpoint {:.0} MB; ceiling = bandwidth / {:.0} MB read per token at this precision; pytorch b1 = {:.0}% of it",
            r.size as f64 / 1e6,
            r.read / 1e6,
            100.0 * t("decode_b1_tok_s") / r.ceiling
        );
        let db = f(&r.ours, "decode_batch_tok_s");
        println!(
            "{name:<14} {:<28} {:>12.1} {:>12.1} {:>11.0}% {:>12}",
            format!("b{} decode vs ceiling", a.workload.batch),
            db,
            r.ceiling_batch,
            100.0 * db / r.ceiling_batch,
            ""
        );
        if let Some(b) = r.ours.get("breakdown_b1") {
            let g = |k: &str| f(b, k);
            println!(
                "{name:<14} b1 token {:.2} ms = weights streamed {:.2} ms (at {:.1} GB/s, threads' \
                 fork/join included) + attention {:.2} + routing {:.2} + other {:.2} (norms, \
                 activations, gathers, sampling)",
                g("token_ms"),
                g("matmul_ms"),
                g("matmul_gb_s"),
                g("attention_ms"),
                g("routing_ms"),
                g("other_ms")
            );
        }
        if let Some(kernels) = r.ours.get("kernels").and_then(Value::as_str) {
            println!(
                "{name:<14} kernels: {kernels}; formats held: {}",
                r.ours
                    .get("formats")
                    .map(Value::to_string)
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
