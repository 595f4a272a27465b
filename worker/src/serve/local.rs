//! `moe-worker local`: the whole deployment on one machine. It plans the shards with the same
//! function the operator uses, starts every role as its own OS process on loopback (expert
//! shards, then stages from last to first, then the gateway), waits until the gateway reports
//! every stage ready, prints the endpoint, restarts a child that dies (on the same port), and
//! on Ctrl-C or SIGTERM stops every child. Children also exit when the launcher's pipe to
//! their standard input closes, so none outlives it even if it is killed.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::error::{Error, Result};
use crate::serve::shutdown_signal;

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// A checkpoint folder, or synthetic:PRESET[:SEED].
    #[arg(long, env = "MOE_MODEL", default_value = "synthetic:gpt4-mini")]
    pub model: crate::source::ModelArg,

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
}

/// A role's command line; `--listen` is appended per start.
#[derive(Debug, Clone)]
struct RoleSpec {
    name: String,
    args: Vec<String>,
    /// The address it listens on once known (reused on restart).
    addr: Option<String>,
    threads: u16,
}

struct Running {
    spec: RoleSpec,
    child: Child,
}

fn model_args(m: &LocalArgs) -> Vec<String> {
    let mut v = vec!["--model".to_string(), m.model.to_string()];
    if let Some(t) = &m.tokenizer {
        v.push("--tokenizer".into());
        v.push(t.clone());
    }
    v
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
    let src = args.model.open()?;
    let cfg = src.config().clone();
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
    // Mutual TLS unless asked otherwise: a CA of this launcher's own, in a folder that goes
    // when it stops.
    let made = match (&args.tls_dir, args.plaintext) {
        (None, false) => Some(crate::serve::tls::TempCerts::new()?),
        _ => None,
    };
    let tls = crate::serve::tls::TlsArgs {
        tls_dir: args
            .tls_dir
            .clone()
            .or_else(|| made.as_ref().map(|m| m.dir.clone())),
        plaintext: args.plaintext,
    };
    let mut children: Vec<Running> = Vec::new();
    let result = start_and_serve(&args, &plan, &tls, &mut children).await;
    stop_all(&mut children).await;
    drop(made);
    result
}

async fn start_and_serve(
    args: &LocalArgs,
    plan: &moe_plan::Plan,
    tls: &crate::serve::tls::TlsArgs,
    children: &mut Vec<Running>,
) -> Result<()> {
    let model = [model_args(args), crate::serve::tls::child_args(tls)].concat();
    let started = Instant::now();
    let mut expert_addrs = Vec::new();
    for (s, replica) in plan
        .expert_shards
        .iter()
        .flat_map(|s| (0..args.expert_replicas).map(move |r| (s, r)))
    {
        let experts: Vec<String> = s.experts.iter().map(|e| e.to_string()).collect();
        let mut spec = RoleSpec {
            name: format!(
                "expert shard {} replica {replica} ({})",
                s.index,
                s.describe()
            ),
            args: [
                vec!["expert".to_string()],
                model.clone(),
                vec![
                    "--layers".into(),
                    format!("{}..{}", s.layer_start, s.layer_end),
                    "--experts".into(),
                    experts.join(","),
                    "--index".into(),
                    s.index.to_string(),
                    "--replica".into(),
                    replica.to_string(),
                ],
            ]
            .concat(),
            addr: None,
            threads: args.child_threads,
        };
        let child = spawn(&mut spec, "127.0.0.1:0").await?;
        expert_addrs.push(spec.addr.clone().unwrap_or_default());
        children.push(Running { spec, child });
    }
    let mut next: Option<String> = None;
    let mut stage_addrs = vec![String::new(); plan.stages.len()];
    for s in plan.stages.iter().rev() {
        let mut a = [
            vec!["stage".to_string()],
            model.clone(),
            vec![
                "--layers".into(),
                format!("{}..{}", s.layer_start, s.layer_end),
                "--index".into(),
                s.index.to_string(),
                "--expert-addrs".into(),
                expert_addrs.join(","),
                "--startup-timeout-s".into(),
                args.startup_timeout_s.to_string(),
                "--max-sequences".into(),
                args.max_sequences.to_string(),
            ],
        ]
        .concat();
        if let Some(n) = &next {
            a.push("--next".into());
            a.push(n.clone());
        }
        let mut spec = RoleSpec {
            name: format!(
                "stage {} (layers {}..{})",
                s.index, s.layer_start, s.layer_end
            ),
            args: a,
            addr: None,
            threads: args.child_threads,
        };
        let child = spawn(&mut spec, "127.0.0.1:0").await?;
        next = spec.addr.clone();
        stage_addrs[s.index] = spec.addr.clone().unwrap_or_default();
        children.push(Running { spec, child });
    }
    // Each gateway's share of the stages' capacity: together they never admit more sequences
    // than a stage holds.
    let gateways = usize::from(args.gateways);
    let share = moe_plan::gateway_share(args.max_sequences, gateways);
    let mut endpoints = Vec::new();
    for i in 0..gateways {
        let mut g = [
            vec!["gateway".to_string()],
            model.clone(),
            vec![
                "--stage-addrs".into(),
                stage_addrs.join(","),
                "--max-sequences".into(),
                share.to_string(),
                "--max-queue".into(),
                args.max_queue.to_string(),
                "--step-timeout-ms".into(),
                args.step_timeout_ms.to_string(),
                "--index".into(),
                i.to_string(),
            ],
        ]
        .concat();
        if let Some(m) = args.micro_batches {
            g.push("--micro-batches".into());
            g.push(m.to_string());
        }
        let mut spec = RoleSpec {
            name: if gateways == 1 {
                "gateway".into()
            } else {
                format!("gateway {i}")
            },
            args: g,
            addr: None,
            threads: args.child_threads,
        };
        let port = match args.http_port {
            0 => 0,
            p => p.checked_add(i as u16).ok_or_else(|| {
                Error::invalid("--http-port", format!("{p} + {i} is past the last port"))
            })?,
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], port)).to_string();
        let child = spawn(&mut spec, &listen).await?;
        endpoints.push(spec.addr.clone().unwrap_or_default());
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
        "moe-serve ready: {} over {} stages and {} expert shards ({} processes) in {:.1}s",
        args.model,
        plan.stages.len(),
        plan.expert_shards.len(),
        children.len(),
        started.elapsed().as_secs_f64()
    );
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
            plan.stages.len(),
            plan.expert_shards.len(),
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
