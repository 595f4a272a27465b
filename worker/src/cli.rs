//! Command-line interface of `moe-worker`. Errors end the process with one line that names
//! what is wrong, never a backtrace.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::load::{ModelArgs, load_full};
use crate::sampling::SamplingParams;
use crate::synthetic;

#[derive(Debug, Parser)]
#[command(
    name = "moe-worker",
    version,
    about = "moe-serve worker: Mixture-of-Experts inference"
)]
pub struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "MOE_THREADS")]
    pub threads: Option<usize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion in this process.
    Generate(GenerateArgs),
    /// Write a synthetic model out as a Hugging Face checkpoint.
    Export(ExportArgs),
    /// List the synthetic presets.
    Presets,
    /// Benchmark the engine against PyTorch eager (transformers) on the same checkpoint.
    Bench(crate::bench::BenchArgs),
    #[command(hide = true)]
    BenchEngine(crate::bench::EngineRunArgs),
    /// Benchmark activation transport: our gRPC path vs raw TCP on loopback.
    BenchTransport(crate::serve::bench::TransportArgs),
    /// Benchmark the `local` deployment against single-process generation.
    BenchLocal(crate::serve::bench::LocalBenchArgs),
    /// Measure this machine as a hardware profile of the performance model (the engine's
    /// kernels and the gRPC hop, timed here): JSON for `moe-operator plan --estimate`.
    Profile(crate::hardware::ProfileArgs),
    /// The performance model's predictions for `local` deployments next to their measured
    /// tokens/s and per-token latency, with the error.
    BenchCalibrate(crate::hardware::CalibrateArgs),
    /// Serve the whole deployment on this machine: every role as its own process on loopback.
    Local(crate::serve::local::LocalArgs),
    /// Serve the OpenAI-compatible HTTP API in front of the pipeline.
    Gateway(crate::serve::gateway::GatewayArgs),
    /// Serve a pipeline stage (a layer range).
    Stage(crate::serve::stage::StageArgs),
    /// Serve an expert shard (a set of experts over a layer range).
    Expert(crate::serve::expert::ExpertArgs),
    /// Print what a checkpoint folder's config.json says (spec.model.architecture), after
    /// checking the engine can serve it; the operator runs this in a Job on the volume.
    Inspect(crate::inspect::InspectArgs),
    /// Make a deployment's worker CA and certificates (the operator issues its own).
    #[command(subcommand)]
    Certs(crate::serve::tls::CertsCommand),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt text (tokenized with the model's tokenizer; BOS prepended when the model has one).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,

    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,

    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,

    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    #[arg(long)]
    pub seed: Option<u64>,

    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Print one JSON object: token_ids (generated only), text, and more.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Preset name (see `moe-worker presets`).
    #[arg(long)]
    pub preset: String,

    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,

    /// Largest safetensors shard in bytes; bigger models are sharded with an index.
    #[arg(long, default_value_t = 2 << 30)]
    pub shard_bytes: u64,
}

/// Parses arguments, runs the command, and turns any error into one line on stderr.
pub fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("moe-worker: internal error: {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("moe-worker: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let service = match &cli.command {
        Command::Gateway(_) => "moe-gateway",
        Command::Stage(_) => "moe-stage",
        Command::Expert(_) => "moe-expert",
        Command::Local(_) => "moe-local",
        _ => "moe-worker",
    };
    let telemetry = crate::telemetry::init(service);
    let result = run(cli);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => return Err(Error::invalid("threads", "must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    // A second call (tests) keeps the first pool.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(n)
}

pub fn run(cli: Cli) -> Result<()> {
    let threads = init_threads(cli.threads)?;
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Export(args) => export(args),
        Command::Presets => {
            for p in synthetic::presets() {
                let c = &p.config;
                println!(
                    "{:<10} {:>6.2}B params  {}",
                    p.name,
                    c.total_params() as f64 / 1e9,
                    p.about
                );
            }
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args),
        Command::BenchEngine(args) => crate::bench::run_engine(args),
        Command::BenchTransport(args) => crate::serve::bench::transport(args),
        Command::BenchLocal(args) => crate::serve::bench::local(args),
        Command::Profile(args) => crate::hardware::profile(args, threads),
        Command::BenchCalibrate(args) => crate::hardware::run_calibrate(args),
        Command::Local(args) => serve(crate::serve::local::run(args)),
        Command::Gateway(args) => serve(crate::serve::gateway::run(args)),
        Command::Stage(args) => serve(crate::serve::stage::run(args)),
        Command::Expert(args) => serve(crate::serve::expert::run(args)),
        Command::Certs(c) => crate::serve::tls::certs(c),
        Command::Inspect(args) => crate::inspect::run(args),
    }
}

/// Runs a server role on a multi-threaded tokio runtime.
fn serve(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::peer("runtime", e.to_string()))?;
    rt.block_on(fut)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let src = args.model.model.open()?;
    let cfg = src.config().clone();
    // Tokenize before loading so a bad prompt fails fast.
    let tokenizer = match (&args.prompt, args.model.tokenizer.as_deref()) {
        (Some(_), t) => Some(args.model.model.tokenizer(t)?),
        (None, Some(t)) => Some(args.model.model.tokenizer(Some(t))?),
        (None, None) => args.model.model.tokenizer(None).ok(),
    };
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => tokenizer
            .as_ref()
            .ok_or_else(|| Error::invalid("tokenizer", "none available"))?
            .encode(text, cfg.bos_token_id)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err(Error::invalid("prompt", "give --prompt or --prompt-ids")),
    };
    if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::invalid(
            "--prompt-ids",
            format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                cfg.vocab_size
            ),
        ));
    }
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ignore_eos: args.ignore_eos,
    };
    params.validate().map_err(|e| match e {
        Error::InvalidInput { field, message } => {
            Error::invalid(format!("--{}", field.replace('_', "-")), message)
        }
        other => other,
    })?;
    let model = load_full(src.as_ref(), args.model.precision.precision())?;
    let mut engine = Engine::new(model, EngineOptions::default())?;
    let started = std::time::Instant::now();
    let (ids, finish) = engine.generate(prompt_ids.clone(), params)?;
    let secs = started.elapsed().as_secs_f64();
    let text = tokenizer.as_ref().map(|t| t.decode(&ids));
    if args.json {
        let out = serde_json::json!({
            "token_ids": ids,
            "text": text,
            "prompt_ids": prompt_ids,
            "finish_reason": finish.as_str(),
            "seconds": secs,
        });
        println!("{out}");
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!("{ids:?}"),
        }
        eprintln!(
            "[{} tokens in {:.2}s, finish: {}]",
            ids.len(),
            secs,
            finish.as_str()
        );
    }
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let preset = synthetic::preset(&args.preset)?;
    let show = std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize| {
        if show {
            eprint!("\rwriting tensors: {done}/{total}");
        }
    };
    synthetic::export(
        &preset,
        args.seed,
        &args.out,
        args.shard_bytes,
        &mut progress,
    )?;
    if show {
        eprintln!();
    }
    println!("{}", args.out.display());
    Ok(())
}
