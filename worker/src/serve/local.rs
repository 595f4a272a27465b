//! `moe-worker local`: the whole deployment on one machine. It plans the shards with the same
//! function the operator uses (from flags, or from a `MoEDeployment` manifest with `-f`, which
//! then starts exactly the workloads the operator would create for it), starts every process
//! on loopback (expert shards, then stages from last to first, then the gateways), waits until
//! the gateways report every stage ready, prints the endpoint, restarts a child that dies (on
//! the same port), and on Ctrl-C or SIGTERM stops every child. Children also exit when the
//! launcher's pipe to their standard input closes, so none outlives it even if it is killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use moe_api::workers::{WorkerRole, Workload};

use crate::error::{Error, Result};
use crate::serve::shutdown_signal;
use crate::source::ModelArg;

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// A MoEDeployment manifest (as given to `kubectl apply`): plan it with the operator's
    /// function and start exactly the stages, expert shards (`minReplicas` each) and gateways
    /// (`replicas`) the operator would create, with the same settings. Its model is read from
    /// `spec.model.source` (synthetic, or a hostPath folder on this machine) unless --model
    /// is given. A checkpoint folder plans as `moe-operator plan -f DIR` does.
    #[arg(
        short = 'f',
        long,
        value_name = "MANIFEST",
        conflicts_with_all = ["stages", "expert_shards", "expert_replicas", "gateways", "max_sequences"]
    )]
    pub file: Option<PathBuf>,

    /// A checkpoint folder, or synthetic:PRESET[:SEED] [default: synthetic:gpt4-mini, or the
    /// manifest's model].
    #[arg(long)]
    pub model: Option<ModelArg>,

    /// Tokenizer override: a tokenizer.json path, or cl100k_base.
    #[arg(long)]
    pub tokenizer: Option<String>,

    /// Pipeline stages.
    #[arg(long, default_value_t = 4)]
    pub stages: usize,

    /// Expert shards (0: each stage computes its own experts).
    #[arg(long, default_value_t = 4)]
    pub expert_shards: usize,

    /// Compute threads per child process. On CPU the processes share the machine's cores, and
    /// a pool's idle threads spin for a while after each call, so one each is usually best.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub child_threads: u16,

    /// Routed experts' format in the stages and expert shards: auto (as stored), f32, bf16
    /// or q8 (a manifest says `spec.model.expertDtype`).
    #[arg(long, conflicts_with = "file")]
    pub expert_dtype: Option<moe_engine::weights::DtypeChoice>,

    /// Element type of activations between the processes: f32 or bf16 (a manifest says
    /// `spec.serving.wireDtype`).
    #[arg(long, conflicts_with = "file", default_value_t = moe_proto::WireDtype::F32)]
    pub wire_dtype: moe_proto::WireDtype,

    /// Processes per expert shard; a stage spreads calls over them and fails over when one dies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub expert_replicas: u16,

    /// HTTP port of the gateway on 127.0.0.1 (0 picks a free port); further gateways take
    /// the ports after it.
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,

    /// Gateways sharing the pipeline (as a MoEDeployment's `replicas`): each is its own
    /// process with its own port, and gets an equal share of --max-sequences.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub gateways: u16,

    /// Micro-batch lanes in flight (default: the number of stages, at least 2).
    #[arg(long)]
    pub micro_batches: Option<usize>,

    /// Most sequences running at once: what each stage holds KV caches for, divided among
    /// the gateways.
    #[arg(long, default_value_t = 64)]
    pub max_sequences: usize,

    /// Requests waiting for a slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,

    /// Deadline of one pipeline step, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub step_timeout_ms: u64,

    /// Restarts of dead children before the launcher gives up and stops everything.
    #[arg(long, default_value_t = 5)]
    pub max_restarts: usize,

    /// Once ready, send this prompt through the gateway and print the completion.
    #[arg(long)]
    pub prompt: Option<String>,

    /// Tokens to generate for --prompt.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,

    /// Stop after answering --prompt instead of serving until Ctrl-C.
    #[arg(long, requires = "prompt")]
    pub exit: bool,

    /// Seconds to wait for every role to become ready.
    #[arg(long, default_value_t = 600)]
    pub startup_timeout_s: u64,

    /// Use this folder's CA and worker certificate (`moe-worker certs init`) instead of a CA
    /// made at start; certificates renewed there are picked up by every process.
    #[arg(long, conflicts_with = "plaintext")]
    pub tls_dir: Option<std::path::PathBuf>,

    /// Plaintext worker traffic (a benchmark opt-out): by default the processes speak mutual TLS
    /// with certificates of a CA the launcher makes at start.
    #[arg(long)]
    pub plaintext: bool,

    /// Print the processes it would start, and exit.
    #[arg(long)]
    pub dry_run: bool,
}

/// What the launcher starts: the workloads of a plan, and the model they all load.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `local`, or the manifest's name.
    pub name: String,
    pub model: ModelArg,
    pub tokenizer: Option<String>,
    pub plaintext: bool,
    pub stages: usize,
    pub expert_shards: usize,
    /// Expert shards, then stages, then the gateways (the order they start in, but stages
    /// start from the last).
    pub workloads: Vec<Workload>,
    /// Expert shards whose manifest entry reads another source, by shard index.
    pub shard_models: std::collections::BTreeMap<usize, ModelArg>,
    /// What the launcher cannot reproduce of a manifest, said once at start.
    pub notes: Vec<String>,
}

/// A manifest's model source as this machine reads it (`field` names it in errors).
fn local_source(source: &moe_api::crd::ModelSource, field: &str) -> Result<ModelArg> {
    if let Some(s) = &source.synthetic {
        return Ok(ModelArg::Synthetic {
            preset: s.preset.clone(),
            seed: u64::try_from(s.seed).map_err(|_| {
                Error::invalid(format!("{field}.synthetic.seed"), "must not be negative")
            })?,
        });
    }
    if let Some(h) = &source.host_path {
        return Ok(ModelArg::Dir(PathBuf::from(&h.path)));
    }
    Err(Error::invalid(
        field,
        match &source.pvc {
            Some(p) => format!(
                "the PersistentVolumeClaim `{}` cannot be read outside the cluster: \
                 pass --model with a folder holding the same checkpoint",
                p.claim_name
            ),
            None => "no source: give synthetic, hostPath or pvc".to_string(),
        },
    ))
}

/// The model must have the plan's shape; `field` names the spec field for a mismatched key.
fn check_shape(
    model: &ModelArg,
    plan: &moe_plan::SizedPlan,
    field: impl Fn(&str) -> String,
) -> Result<()> {
    let cfg = model.open()?.config().clone();
    let m = &plan.model;
    for (name, planned, has, key) in [
        (
            "numLayers",
            m.num_layers,
            cfg.num_hidden_layers,
            "num_hidden_layers",
        ),
        (
            "numExperts",
            m.num_experts,
            cfg.num_local_experts,
            "num_local_experts",
        ),
        (
            "topK",
            m.top_k,
            cfg.num_experts_per_tok,
            "num_experts_per_tok",
        ),
        ("hiddenSize", m.hidden_size, cfg.hidden_size, "hidden_size"),
        ("vocabSize", m.vocab_size, cfg.vocab_size, "vocab_size"),
        (
            "denseLayers",
            m.variant.dense_layers.iter().count(),
            cfg.dense_layers(),
            "dense layers (first_k_dense_replace, decoder_sparse_step, mlp_only_layers)",
        ),
    ] {
        if planned != has {
            return Err(Error::invalid(
                field(name),
                format!("the plan has {planned}, but the model `{model}` has {key} = {has}"),
            ));
        }
    }
    Ok(())
}

/// One process of a [`Launch`]: a workload's arguments, the model's, and its replica number.
/// Addresses (`--listen`, `--next`, `--expert-addrs`, `--stage-addrs`) come at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub name: String,
    pub role: WorkerRole,
    pub replica: usize,
    pub args: Vec<String>,
}

const DEFAULT_MODEL: &str = "synthetic:gpt4-mini";

impl Launch {
    /// From the flags: a layout of `--stages` and `--expert-shards`, the other flags as given.
    pub fn from_flags(args: &LocalArgs) -> Result<Self> {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => DEFAULT_MODEL.parse()?,
        };
        let cfg = model.open()?.config().clone();
        let shape = moe_plan::ModelShape {
            num_layers: cfg.num_hidden_layers,
            num_experts: cfg.num_local_experts,
            top_k: cfg.num_experts_per_tok,
        };
        let plan = moe_plan::plan(shape, args.stages, args.expert_shards).map_err(|e| match e {
            moe_plan::PlanError::Invalid { field, message } => {
                let flag = match field {
                    "stages" => "--stages",
                    "expertShards" => "--expert-shards",
                    f => f,
                };
                Error::invalid(flag, message)
            }
        })?;
        let gateways = usize::from(args.gateways);
        if args.max_sequences < gateways {
            return Err(Error::invalid(
                "--max-sequences",
                format!(
                    "{} cannot be shared among {gateways} gateways (each needs at least 1)",
                    args.max_sequences
                ),
            ));
        }
        let count = |n: usize, flag: &str| {
            i32::try_from(n).map_err(|_| Error::invalid(flag, format!("{n} is too large")))
        };
        let max = count(args.max_sequences, "--max-sequences")?;
        let share = moe_plan::gateway_share(args.max_sequences, gateways) as i32;
        let mut workloads = moe_api::workers::layout_workloads(
            "local",
            &plan,
            i32::from(args.expert_replicas),
            i32::from(args.gateways),
            max,
            share,
            None,
        );
        let expert_dtype = args.expert_dtype.map(|d| d.to_string());
        let wire = match args.wire_dtype {
            moe_proto::WireDtype::F32 => moe_api::crd::WireDType::F32,
            moe_proto::WireDtype::Bf16 => moe_api::crd::WireDType::Bf16,
        };
        moe_api::workers::add_worker_args(
            &mut workloads,
            &moe_api::workers::precision_args(expert_dtype.as_deref(), wire),
        );
        Ok(Self {
            name: "local".into(),
            model,
            tokenizer: args.tokenizer.clone(),
            plaintext: args.plaintext,
            stages: plan.stages.len(),
            expert_shards: plan.expert_shards.len(),
            workloads,
            shard_models: Default::default(),
            notes: Vec::new(),
        })
    }

    /// From a manifest: planned by the operator's function, with the operator's workloads.
    pub fn from_manifest(md: &moe_api::MoEDeployment, args: &LocalArgs) -> Result<Self> {
        let spec = &md.spec;
        let plan = moe_api::planning::plan(spec).map_err(api_error)?;
        let workloads = moe_api::workers::workloads(md, &plan).map_err(api_error)?;
        let name = moe_api::workers::checked_name(md).map_err(api_error)?;
        let model = match &args.model {
            Some(m) => m.clone(),
            None => local_source(&spec.model.source, "spec.model.source")?,
        };
        // The plan is made from the spec's architecture (or the preset's); the model must
        // have that shape, or the stages would load layers it does not have.
        check_shape(&model, &plan, |f| format!("spec.model.architecture.{f}"))?;
        // Shards that read another revision of the weights (of the same shape).
        let mut shard_models = std::collections::BTreeMap::new();
        for (i, o) in spec.experts.shards.iter().enumerate() {
            if let Some(src) = &o.source {
                let field = format!("spec.experts.shards[{i}].source");
                let m = local_source(src, &field)?;
                check_shape(&m, &plan, |_| field.clone())?;
                shard_models.insert(usize::try_from(o.shard).unwrap_or(usize::MAX), m);
            }
        }
        let mut notes = Vec::new();
        let a = &spec.experts;
        if a.max_replicas > a.min_replicas {
            notes.push(format!(
                "expert shards run their {} minReplicas; the autoscaler (up to {}) runs in the \
                 operator",
                a.min_replicas, a.max_replicas
            ));
        }
        if let Some(k) = &spec.serving.api_key_secret {
            notes.push(format!(
                "serving.apiKeySecret `{}` is a Secret in the cluster: the gateways require the \
                 key in MOE_API_KEY here{}",
                k.name,
                if std::env::var_os("MOE_API_KEY").is_some() {
                    ""
                } else {
                    ", which is unset, so they are open"
                }
            ));
        }
        notes.push(format!(
            "placement ({} × {} per pod) and resources are the cluster's; here every process \
             computes on this machine's CPU",
            spec.placement.gpus_per_pod, spec.placement.gpu_product
        ));
        Ok(Self {
            name,
            model,
            tokenizer: args
                .tokenizer
                .clone()
                .or_else(|| spec.model.tokenizer.clone()),
            plaintext: args.plaintext || spec.serving.plaintext,
            stages: plan.stages.len(),
            expert_shards: plan.expert_shards.len(),
            workloads,
            shard_models,
            notes,
        })
    }

    /// Every process, in the order they start: expert-shard replicas, stages from the last,
    /// gateways.
    pub fn processes(&self) -> Vec<Process> {
        let mut model = vec!["--model".to_string(), self.model.to_string()];
        if let Some(t) = &self.tokenizer {
            model.extend(["--tokenizer".to_string(), t.clone()]);
        }
        let mut out = Vec::new();
        let by_role = |role: WorkerRole| self.workloads.iter().filter(move |w| w.role == role);
        let stages: Vec<&Workload> = by_role(WorkerRole::Stage).collect();
        let ordered = by_role(WorkerRole::Expert)
            .chain(stages.into_iter().rev())
            .chain(by_role(WorkerRole::Gateway));
        for w in ordered {
            let n = usize::try_from(w.replicas.max(1)).unwrap_or(1);
            for r in 0..n {
                let mut args = w.args.clone();
                match (w.role, w.index.and_then(|j| self.shard_models.get(&j))) {
                    (WorkerRole::Expert, Some(m)) => {
                        let mut own = model.clone();
                        own[1] = m.to_string();
                        args.splice(1..1, own);
                    }
                    _ => {
                        args.splice(1..1, model.iter().cloned());
                    }
                }
                let name = match (w.role, n) {
                    (WorkerRole::Stage, _) | (_, 1) => w.name.clone(),
                    _ => format!("{} replica {r}", w.name),
                };
                match w.role {
                    WorkerRole::Expert => args.extend(["--replica".to_string(), r.to_string()]),
                    WorkerRole::Gateway => args.extend(["--index".to_string(), r.to_string()]),
                    WorkerRole::Stage => {}
                }
                out.push(Process {
                    name,
                    role: w.role,
                    replica: r,
                    args,
                });
            }
        }
        out
    }
}

fn api_error(e: moe_api::Error) -> Error {
    match e {
        moe_api::Error::Invalid { field, message } => Error::invalid(field, message),
        other => Error::invalid("--file", other.to_string()),
    }
}

/// A role's command line; `--listen` is appended per start.
#[derive(Debug, Clone)]
struct RoleSpec {
    name: String,
    args: Vec<String>,
    /// The address it listens on once known (reused on restart).
    addr: Option<String>,
    /// Stages and expert shards serve `/metrics`: `Some(address once known)`.
    metrics: Option<Option<String>>,
    threads: u16,
}

struct Running {
    spec: RoleSpec,
    child: Child,
}

/// Starts one child and waits for the `listening on ADDR` line it prints once bound.
async fn spawn(spec: &mut RoleSpec, listen: &str) -> Result<Child> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::peer("local", format!("own executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--threads", &spec.threads.to_string()])
        .args(&spec.args)
        .arg("--listen")
        .arg(listen)
        .arg("--exit-with-stdin")
        .args(
            spec.metrics
                .as_ref()
                .map(|m| {
                    let at = m.clone().unwrap_or_else(|| "127.0.0.1:0".into());
                    ["--metrics-listen".to_string(), at]
                })
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::peer(spec.name.clone(), format!("cannot start: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::peer(spec.name.clone(), "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    let addr = match line {
        Ok(Ok(Some(l))) => l
            .rsplit_once("listening on ")
            .map(|(_, a)| a.trim().trim_start_matches("http://").to_string())
            .ok_or_else(|| {
                Error::peer(spec.name.clone(), format!("unexpected first line `{l}`"))
            })?,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            return Err(Error::peer(
                spec.name.clone(),
                format!(
                    "exited during startup ({})",
                    status.map(|s| s.to_string()).unwrap_or_default()
                ),
            ));
        }
        Err(_) => {
            return Err(Error::peer(
                spec.name.clone(),
                "did not start listening within 60s",
            ));
        }
    };
    if spec.metrics.is_some() {
        // Printed right after the `listening on` line, before the weights load.
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let at = match line {
            Ok(Ok(Some(l))) => l
                .rsplit_once("metrics on http://")
                .map(|(_, a)| a.trim().to_string()),
            _ => None,
        };
        let at =
            at.ok_or_else(|| Error::peer(spec.name.clone(), "did not print its metrics address"))?;
        spec.metrics = Some(Some(at));
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    spec.addr = Some(addr);
    Ok(child)
}

/// Stops every child: SIGTERM, then SIGKILL after a grace period.
async fn stop_all(children: &mut [Running]) {
    for r in children.iter() {
        if let Some(pid) = r.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in children.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, r.child.wait()).await.is_err() {
            let _ = r.child.kill().await;
        }
    }
}

/// Asks the gateway's /readyz until it answers 200.
async fn gateway_ready(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
    matches!(n, Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

pub async fn run(args: LocalArgs) -> Result<()> {
    let launch = match &args.file {
        Some(path) => {
            // A checkpoint folder plans as `moe-operator plan -f DIR` does.
            let md = moe_api::read_deployment(path).map_err(api_error)?;
            Launch::from_manifest(&md, &args)?
        }
        None => Launch::from_flags(&args)?,
    };
    if args.dry_run {
        println!(
            "{}: {} stages, {} expert shards, model {}",
            launch.name, launch.stages, launch.expert_shards, launch.model
        );
        for p in launch.processes() {
            println!("{}: moe-worker {}", p.name, p.args.join(" "));
        }
        for n in &launch.notes {
            println!("note: {n}");
        }
        return Ok(());
    }
    for n in &launch.notes {
        eprintln!("moe-serve: {n}");
    }
    // Mutual TLS unless asked otherwise: a CA of this launcher's own, in a folder that goes
    // when it stops.
    let made = match (&args.tls_dir, launch.plaintext) {
        (None, false) => Some(crate::serve::tls::TempCerts::new()?),
        _ => None,
    };
    let tls = crate::serve::tls::TlsArgs {
        tls_dir: args
            .tls_dir
            .clone()
            .or_else(|| made.as_ref().map(|m| m.dir.clone())),
        plaintext: launch.plaintext,
    };
    let mut children: Vec<Running> = Vec::new();
    let result = start_and_serve(&args, &launch, &tls, &mut children).await;
    stop_all(&mut children).await;
    drop(made);
    result
}

async fn start_and_serve(
    args: &LocalArgs,
    launch: &Launch,
    tls: &crate::serve::tls::TlsArgs,
    children: &mut Vec<Running>,
) -> Result<()> {
    let tls_args = crate::serve::tls::child_args(tls);
    let started = Instant::now();
    let mut expert_addrs = Vec::new();
    // Stages start from the last, so each knows the address of the next.
    let mut next: Option<String> = None;
    let mut stage_addrs: Vec<String> = Vec::new();
    let mut endpoints = Vec::new();
    for p in launch.processes() {
        let mut a = [p.args.clone(), tls_args.clone()].concat();
        let listen = match p.role {
            WorkerRole::Expert => "127.0.0.1:0".to_string(),
            WorkerRole::Stage => {
                if !expert_addrs.is_empty() {
                    a.extend(["--expert-addrs".to_string(), expert_addrs.join(",")]);
                }
                if let Some(n) = &next {
                    a.extend(["--next".to_string(), n.clone()]);
                }
                a.extend([
                    "--startup-timeout-s".to_string(),
                    args.startup_timeout_s.to_string(),
                ]);
                "127.0.0.1:0".to_string()
            }
            WorkerRole::Gateway => {
                a.extend([
                    "--stage-addrs".to_string(),
                    stage_addrs.join(","),
                    "--max-queue".into(),
                    args.max_queue.to_string(),
                    "--step-timeout-ms".into(),
                    args.step_timeout_ms.to_string(),
                ]);
                if let Some(m) = args.micro_batches {
                    a.extend(["--micro-batches".to_string(), m.to_string()]);
                }
                let i = p.replica;
                let port = match args.http_port {
                    0 => 0,
                    port => u16::try_from(i)
                        .ok()
                        .and_then(|i| port.checked_add(i))
                        .ok_or_else(|| {
                            Error::invalid(
                                "--http-port",
                                format!("{port} + {i} is past the last port"),
                            )
                        })?,
                };
                SocketAddr::from(([127, 0, 0, 1], port)).to_string()
            }
        };
        let mut spec = RoleSpec {
            name: p.name.clone(),
            args: a,
            addr: None,
            metrics: (p.role != WorkerRole::Gateway).then_some(None),
            threads: args.child_threads,
        };
        let child = spawn(&mut spec, &listen).await?;
        let addr = spec.addr.clone().unwrap_or_default();
        match p.role {
            WorkerRole::Expert => expert_addrs.push(addr),
            WorkerRole::Stage => {
                stage_addrs.insert(0, addr.clone());
                next = Some(addr);
            }
            WorkerRole::Gateway => endpoints.push(addr),
        }
        children.push(Running { spec, child });
    }
    let http = endpoints.first().cloned().unwrap_or_default();

    // Wait for readiness, failing fast if a child dies.
    let limit = Duration::from_secs(args.startup_timeout_s);
    let mut ready = vec![false; endpoints.len()];
    loop {
        for r in children.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(Error::peer(
                    r.spec.name.clone(),
                    format!("exited during startup ({status})"),
                ));
            }
        }
        for (e, ok) in endpoints.iter().zip(ready.iter_mut()) {
            if !*ok {
                *ok = gateway_ready(e).await;
            }
        }
        if ready.iter().all(|r| *r) {
            break;
        }
        if started.elapsed() > limit {
            return Err(Error::peer("local", format!("not ready within {limit:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "moe-serve ready: {} ({}) over {} stages and {} expert shards ({} processes) in {:.1}s",
        launch.name,
        launch.model,
        launch.stages,
        launch.expert_shards,
        children.len(),
        started.elapsed().as_secs_f64()
    );
    // Prometheus targets: every gateway's HTTP port and every other process's metrics port.
    let targets: Vec<String> = children
        .iter()
        .filter_map(|r| {
            let at = r
                .spec
                .metrics
                .clone()
                .flatten()
                .or_else(|| r.spec.addr.clone())?;
            Some(format!("{}=http://{at}/metrics", r.spec.name))
        })
        .collect();
    println!("metrics: {}", targets.join(" "));
    println!("OpenAI endpoint: http://{http}/v1");
    if endpoints.len() > 1 {
        let all: Vec<String> = endpoints.iter().map(|e| format!("http://{e}/v1")).collect();
        println!("gateway endpoints: {}", all.join(" "));
    }
    println!(
        "try: curl -s http://{http}/v1/completions -H 'content-type: application/json' \\\n  -d '{{\"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}}'"
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Some(prompt) = &args.prompt {
        let body =
            serde_json::json!({"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0});
        let addr = http.clone();
        let t = Instant::now();
        let v = tokio::task::spawn_blocking(move || {
            crate::serve::http_json(&addr, "POST", "/v1/completions", Some(&body))
        })
        .await
        .map_err(|e| Error::peer("local", e.to_string()))??;
        println!(
            "{prompt}{}\n[{} tokens through the gateway, {} stages and {} expert shards in {:.2}s]",
            v["choices"][0]["text"].as_str().unwrap_or(""),
            v["usage"]["completion_tokens"],
            launch.stages,
            launch.expert_shards,
            t.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        if args.exit {
            return Ok(());
        }
    }

    // Supervise: restart dead children on their address, until a signal.
    let mut restarts = 0;
    let stop = shutdown_signal(false);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => {
                eprintln!("moe-serve: stopping {} processes", children.len());
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for r in children.iter_mut() {
            let Ok(Some(status)) = r.child.try_wait() else {
                continue;
            };
            restarts += 1;
            if restarts > args.max_restarts {
                return Err(Error::peer(
                    r.spec.name.clone(),
                    format!(
                        "exited ({status}); {} restarts used, giving up",
                        args.max_restarts
                    ),
                ));
            }
            eprintln!("moe-serve: {} exited ({status}); restarting", r.spec.name);
            let addr = r.spec.addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
            // The port may take a moment to free up.
            let mut tries = 0;
            r.child = loop {
                match spawn(&mut r.spec, &addr).await {
                    Ok(c) => break c,
                    Err(e) if tries < 20 => {
                        tries += 1;
                        tracing::debug!(error = %e, "restart failed; retrying");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
        }
    }
}
