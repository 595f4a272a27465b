//! `moe-worker gateway`: the OpenAI-compatible front door. It tokenizes, batches requests
//! continuously into several micro-batch lanes (so every stage has work while the others
//! run), sends each step down the pipeline, applies the final norm and LM head to the last
//! stage's output, samples, and streams tokens back.

mod http;
mod metrics;
mod pipeline;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use metrics::{ExpertTotals, Metrics};
pub use pipeline::Pipeline;

use crate::engine::{BatchLimits, Batcher, EngineOptions, FinishReason, SeqId};
use crate::error::{Error, Result};
use crate::load::{ModelArgs, load_with_progress};
use crate::model::{Model, Scratch};
use crate::sampling::SamplingParams;
use crate::serve::{DEFAULT_MAX_MESSAGE_BYTES, parse_addrs, shutdown_signal};
use crate::tokenizer::Tokenizer;
use crate::weights::ShardSpec;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// HTTP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, env = "MOE_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Stage addresses in pipeline order, comma-separated.
    #[arg(long, env = "MOE_STAGE_ADDRS")]
    pub stage_addrs: String,

    /// Model name served by /v1/models (default: the --model argument).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// API key the OpenAI routes require as `Authorization: Bearer <key>` (none: open).
    #[arg(long, env = "MOE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Micro-batch lanes in flight at once (default: the number of stages, at least 2).
    #[arg(long, env = "MOE_MICRO_BATCHES")]
    pub micro_batches: Option<usize>,

    /// Most sequences running at once, over all lanes.
    #[arg(long, env = "MOE_MAX_SEQUENCES", default_value_t = 64)]
    pub max_sequences: usize,

    /// Most tokens in one micro-batch (prompt chunks plus decode tokens).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,

    /// Requests waiting for a slot before new ones are refused with 429.
    #[arg(long, env = "MOE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,

    /// Deadline of one pipeline step, in milliseconds.
    #[arg(long, env = "MOE_STEP_TIMEOUT_MS", default_value_t = 60_000)]
    pub step_timeout_ms: u64,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// How often, in milliseconds, the stages' routed-token counters are read into
    /// `moe_expert_tokens_total` and `moe_expert_load_imbalance` (0: never).
    #[arg(long, env = "MOE_STATS_INTERVAL_MS", default_value_t = 2000)]
    pub stats_interval_ms: u64,

    /// How the gateway talks to the stages (mutual TLS, or an explicit --plaintext).
    #[command(flatten)]
    pub tls: crate::serve::tls::TlsArgs,

    /// Seconds a client may take to send a request's headers, counted from the connection
    /// opening or its previous response (so idle keep-alive connections are closed too).
    #[arg(long, env = "MOE_HEADER_READ_TIMEOUT_S", default_value_t = 30)]
    pub header_read_timeout_s: u64,

    /// This gateway's index among the deployment's gateways (for logs and process listings).
    #[arg(long, env = "MOE_INDEX", default_value_t = 0)]
    pub index: u32,

    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
}

/// What a request's stream receives.
#[derive(Debug)]
pub enum GenEvent {
    Token(u32),
    Done(FinishReason),
    Failed(Error),
}

/// A tokenized request waiting for a lane.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub span: tracing::Span,
}

pub struct Shared {
    pub model_name: String,
    pub api_key: Option<String>,
    pub cfg: crate::config::ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    /// The checkpoint's chat template; `None`: the built-in one.
    pub chat_template: Option<moe_engine::chat::ChatTemplate>,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    head: Model,
    pipeline: Pipeline,
    checker: Batcher,
    queue: mpsc::Sender<GenRequest>,
    queue_rx: tokio::sync::Mutex<mpsc::Receiver<GenRequest>>,
    /// One permit per running sequence, over all lanes: the gateway never runs more than
    /// `--max-sequences` (the operator gives each gateway replica its share of the stages'
    /// capacity, so the stages accept every sequence a gateway admits).
    slots: Arc<tokio::sync::Semaphore>,
    /// Sequences each lane runs: a busy lane takes more from the queue only up to its fair
    /// share, so that requests arriving together spread over the lanes and their micro-batches
    /// pipeline through the stages (one lane taking them all leaves the others idle).
    lane_counts: Vec<std::sync::atomic::AtomicUsize>,
    opts: EngineOptions,
    step_timeout: Duration,
    next_seq: AtomicU64,
    /// Microseconds waiting on the pipeline, and in the LM head and sampling.
    pub pipeline_us: AtomicU64,
    pub head_us: AtomicU64,
    pub steps: AtomicU64,
    /// This process's name (host, pid, a random part): a reader of `/v1/stats` that sees it
    /// change knows the counters began again.
    pub instance: String,
}

impl Shared {
    /// Every stage's load statistics (routed tokens per expert, busy time), fetched now.
    pub async fn stage_stats(&self) -> Vec<Result<moe_proto::v1::LoadStatsResponse>> {
        let calls = self.pipeline.stage_channels().map(|(name, ch)| {
            let name = name.to_string();
            async move {
                let mut c = moe_proto::v1::stage_client::StageClient::new(ch?);
                let mut req = tonic::Request::new(moe_proto::v1::LoadStatsRequest { reset: false });
                req.set_timeout(Duration::from_secs(2));
                c.load_stats(req)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| Error::peer(name, s.message().to_string()))
            }
        });
        futures::future::join_all(calls).await
    }

    /// Checks a request as a lane will, so that bad input is refused before it queues.
    pub fn check(&self, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        self.checker.check(prompt, params)
    }

    /// Queues a request; `Err` when the queue is full.
    pub fn submit(&self, req: GenRequest) -> std::result::Result<(), GenRequest> {
        self.queue.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        })?;
        self.metrics.queue_depth.set(self.queued() as i64);
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

struct Running {
    events: mpsc::UnboundedSender<GenEvent>,
    span: tracing::Span,
    started: Instant,
    /// When its last token was sent (`None`: none yet).
    last_token: Option<Instant>,
    /// The sequence's admission slot, given back once the stages have released its KV
    /// caches (so the next sequence admitted always finds room on them).
    slot: tokio::sync::OwnedSemaphorePermit,
}

/// A lane's running sequences. Whichever way the lane ends (a panic included) their KV caches
/// are released on every stage, their clients' channels close (the HTTP side answers with an
/// error), and the lane's gauge returns to zero.
struct LaneSeqs {
    shared: Arc<Shared>,
    index: usize,
    running: HashMap<SeqId, Running>,
}

impl Drop for LaneSeqs {
    fn drop(&mut self) {
        let (ids, slots): (Vec<SeqId>, Vec<_>) =
            self.running.drain().map(|(id, r)| (id, r.slot)).unzip();
        for _ in &ids {
            self.shared.metrics.finished("error");
        }
        set_lane_sequences(&self.shared, self.index, 0);
        if !ids.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            release(&self.shared, ids, slots);
        }
    }
}

/// Runs lane `index`, starting it again if it fails, so queued requests never wait on a lane
/// that is gone. Returns when the lane ends normally (the queue closed).
async fn supervise_lane(shared: Arc<Shared>, index: usize) {
    loop {
        match tokio::spawn(lane(shared.clone(), index)).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(lane = index, error = %e, "lane failed; its requests failed, restarting it");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One lane: its own sequences, one micro-batch in flight at a time.
async fn lane(shared: Arc<Shared>, index: usize) {
    let Ok(mut batcher) = Batcher::new(BatchLimits::of(&shared.cfg), shared.opts.clone()) else {
        return;
    };
    let mut seqs = LaneSeqs {
        shared: shared.clone(),
        index,
        running: HashMap::new(),
    };
    let running = &mut seqs.running;
    let mut scratch = Scratch::default();
    loop {
        if batcher.is_empty() {
            // An idle lane waits for a slot, then for a request.
            let Ok(slot) = shared.slots.clone().acquire_owned().await else {
                return;
            };
            let next = {
                let mut rx = shared.queue_rx.lock().await;
                rx.recv().await
            };
            let Some(r) = next else { return };
            admit(&shared, &mut batcher, running, r, slot);
        }
        // A busy lane takes more between steps while slots are free, up to its fair share of
        // what runs and waits.
        set_lane_sequences(&shared, index, batcher.len());
        loop {
            if batcher.len() >= fair_share(&shared) {
                break;
            }
            let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
                break;
            };
            let Ok(mut rx) = shared.queue_rx.try_lock() else {
                break;
            };
            let Ok(r) = rx.try_recv() else { break };
            drop(rx);
            admit(&shared, &mut batcher, running, r, slot);
            set_lane_sequences(&shared, index, batcher.len());
        }
        shared.metrics.queue_depth.set(shared.queued() as i64);
        // Clients that went away.
        let gone: Vec<SeqId> = running
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            let mut slots = Vec::with_capacity(gone.len());
            for id in &gone {
                batcher.remove(*id);
                slots.extend(running.remove(id).map(|r| r.slot));
                shared.metrics.finished("cancelled");
            }
            release(&shared, gone, slots);
        }
        set_lane_sequences(&shared, index, batcher.len());
        let Some(step) = batcher.schedule() else {
            continue;
        };
        let span = tracing::info_span!(
            "gateway.step",
            lane = index,
            seqs = step.seqs.len(),
            tokens = step.ids.len()
        );
        // The step belongs to the trace of its first request; the others are linked.
        for (i, id) in step.seqs.iter().enumerate() {
            let Some(r) = running.get(id) else { continue };
            if i == 0 {
                crate::telemetry::set_parent(&span, r.span.context());
            } else {
                span.add_link(r.span.context().span().span_context().clone());
            }
        }
        let trace_context = crate::telemetry::inject_map(&span);
        let started = Instant::now();
        let result = shared
            .pipeline
            .forward(&step, shared.step_timeout, trace_context)
            .instrument(span.clone())
            .await;
        shared
            .metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        shared
            .pipeline_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        shared.steps.fetch_add(1, Ordering::Relaxed);
        let head_started = Instant::now();
        let result = match result {
            Ok(last) => {
                let rows: Vec<usize> = step.sampled.clone();
                let (sh, s) = (shared.clone(), std::mem::take(&mut scratch));
                let joined = tokio::task::spawn_blocking(move || {
                    let mut s = s;
                    let mut logits = Vec::new();
                    let r = sh.head.logits(&last, &rows, &mut logits, &mut s);
                    (r.map(|()| logits), s)
                })
                .await;
                match joined {
                    Ok((r, s)) => {
                        scratch = s;
                        r
                    }
                    Err(e) => Err(Error::peer("gateway", format!("LM head task: {e}"))),
                }
            }
            Err(e) => Err(e),
        };
        shared
            .head_us
            .fetch_add(head_started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut done = Vec::new();
        match result {
            Ok(mut logits) => {
                for ev in batcher.commit(&step, &mut logits) {
                    let Some(r) = running.get_mut(&ev.seq) else {
                        continue;
                    };
                    let now = Instant::now();
                    match r.last_token {
                        None => shared.metrics.first_token((now - r.started).as_secs_f64()),
                        Some(t) => shared.metrics.next_token((now - t).as_secs_f64()),
                    }
                    r.last_token = Some(now);
                    shared.metrics.generated_tokens.inc();
                    let _ = r.events.send(GenEvent::Token(ev.token));
                    if let Some(f) = ev.finish {
                        let _ = r.events.send(GenEvent::Done(f));
                        done.push(ev.seq);
                        shared.metrics.finished(f.as_str());
                        shared
                            .metrics
                            .sequence_duration
                            .observe(r.started.elapsed().as_secs_f64());
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, seqs = step.seqs.len(), "step failed");
                for id in &step.seqs {
                    if let Some(r) = running.get(id) {
                        let _ = r.events.send(GenEvent::Failed(e.for_each_request()));
                        shared.metrics.finished("error");
                    }
                    done.push(*id);
                }
            }
        }
        let mut slots = Vec::with_capacity(done.len());
        for id in &done {
            batcher.remove(*id);
            slots.extend(running.remove(id).map(|r| r.slot));
        }
        release(&shared, done, slots);
        // Set after every change, so an idle lane (which waits above without looping) reads 0.
        set_lane_sequences(&shared, index, batcher.len());
    }
}

/// A lane's share of the sequences running on all lanes and those queued, rounded up.
fn fair_share(shared: &Shared) -> usize {
    let lanes = shared.lane_counts.len().max(1);
    let running: usize = shared
        .lane_counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    (running + shared.queued()).div_ceil(lanes).max(1)
}

fn set_lane_sequences(shared: &Shared, index: usize, n: usize) {
    if let Some(c) = shared.lane_counts.get(index) {
        c.store(n, Ordering::Relaxed);
    }
    shared
        .metrics
        .lane_sequences
        .get_or_create(&metrics::LaneLabel { lane: index as u32 })
        .set(n as i64);
}

fn admit(
    shared: &Shared,
    batcher: &mut Batcher,
    running: &mut HashMap<SeqId, Running>,
    r: GenRequest,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    if r.events.is_closed() {
        // Its client went away while it queued: nothing runs for it.
        shared.metrics.admitted.inc();
        shared.metrics.finished("cancelled");
        return;
    }
    let id = SeqId(shared.next_seq.fetch_add(1, Ordering::Relaxed));
    shared.metrics.prompt_tokens.inc_by(r.prompt.len() as u64);
    match batcher.add(id, r.prompt, r.params) {
        Ok(()) => {
            shared.metrics.admitted.inc();
            running.insert(
                id,
                Running {
                    events: r.events,
                    span: r.span,
                    started: Instant::now(),
                    last_token: None,
                    slot,
                },
            );
        }
        Err(e) => {
            let _ = r.events.send(GenEvent::Failed(e));
        }
    }
}

/// Frees the sequences' KV caches on every stage, then gives their admission slots back.
fn release(shared: &Arc<Shared>, ids: Vec<SeqId>, slots: Vec<tokio::sync::OwnedSemaphorePermit>) {
    if ids.is_empty() {
        return;
    }
    let sh = shared.clone();
    tokio::spawn(async move {
        let raw: Vec<u64> = ids.iter().map(|s| s.0).collect();
        sh.pipeline.release(&raw).await;
        drop(slots);
    });
}

/// Reads every stage's routed-token counters (without resetting them) into the Prometheus
/// metrics, every `every`. The imbalance gauge is updated only when every stage answered.
async fn poll_expert_stats(shared: Arc<Shared>, every: Duration) {
    let pairs = shared.cfg.routed_expert_count();
    let mut totals = ExpertTotals::default();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let replies = shared.stage_stats().await;
        let complete = replies.iter().all(|r| r.is_ok());
        let mut reading: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
        for e in replies.iter().flatten().flat_map(|s| &s.experts) {
            *reading.entry((e.layer, e.expert)).or_default() += e.tokens;
        }
        let deltas = totals.fold(reading);
        if complete {
            shared.metrics.record_expert_window(&deltas, pairs);
        } else {
            for &((layer, expert), d) in &deltas {
                shared
                    .metrics
                    .expert_tokens
                    .get_or_create(&metrics::ExpertLabel { layer, expert })
                    .inc_by(d);
            }
        }
    }
}

/// Polls every stage's gRPC health; the gateway is ready when all serve.
async fn watch_readiness(shared: Arc<Shared>) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    loop {
        let mut all = true;
        for (name, client) in shared.pipeline.stage_channels() {
            let Ok(client) = client else {
                tracing::debug!(%name, "stage has no ready endpoint");
                all = false;
                continue;
            };
            let mut h = HealthClient::new(client);
            let mut req = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            req.set_timeout(Duration::from_secs(1));
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(1), h.check(req)).await,
                Ok(Ok(r)) if r.get_ref().status == 1
            );
            if !ok {
                tracing::debug!(%name, "stage not serving");
                all = false;
            }
        }
        if shared.ready.swap(all, Ordering::SeqCst) != all {
            tracing::info!(ready = all, "gateway readiness changed");
        }
        shared.metrics.ready.set(i64::from(all));
        tokio::time::sleep(Duration::from_millis(if all { 2000 } else { 250 })).await;
    }
}

pub async fn run(args: GatewayArgs) -> Result<()> {
    crate::serve::tls::init(&args.tls)?;
    let addrs = parse_addrs(&args.stage_addrs);
    let src = args.model.model.open()?;
    let cfg = src.config().clone();
    let tokenizer = match args.model.model.tokenizer(args.model.tokenizer.as_deref()) {
        Ok(t) => Some(t),
        Err(e) if args.model.tokenizer.is_none() => {
            tracing::warn!(error = %e, "no tokenizer: prompts must be token ids");
            None
        }
        Err(e) => return Err(e),
    };
    if args.max_sequences == 0 {
        return Err(Error::invalid("max-sequences", "must be at least 1"));
    }
    // A template that does not compile stops the gateway here, naming its file.
    let chat_template = args.model.model.chat_template()?;
    tracing::info!(
        template = if chat_template.is_some() {
            "checkpoint"
        } else {
            "built-in"
        },
        "chat template"
    );
    let spec = ShardSpec::head(&cfg);
    let precision = args.model.precision.precision();
    let head =
        tokio::task::spawn_blocking(move || load_with_progress(src.as_ref(), spec, precision))
            .await
            .map_err(|e| Error::peer("gateway", format!("load task: {e}")))??;
    let lanes = args.micro_batches.unwrap_or(addrs.len().max(2)).max(1);
    let owner = pipeline::instance_name();
    tracing::info!(%owner, index = args.index, "gateway instance");
    let opts = EngineOptions {
        max_batch_tokens: args.max_batch_tokens,
    };
    let (queue, queue_rx) = mpsc::channel(args.max_queue.max(1));
    let shared = Arc::new(Shared {
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.model.to_string()),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        checker: Batcher::new(BatchLimits::of(&cfg), opts.clone())?,
        pipeline: Pipeline::new(
            &addrs,
            cfg.hidden_size,
            args.max_message_bytes,
            owner.clone(),
        )?,
        cfg,
        tokenizer,
        chat_template,
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        head,
        queue,
        queue_rx: tokio::sync::Mutex::new(queue_rx),
        slots: Arc::new(tokio::sync::Semaphore::new(args.max_sequences)),
        lane_counts: (0..lanes)
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
        opts,
        step_timeout: Duration::from_millis(args.step_timeout_ms),
        next_seq: AtomicU64::new(1),
        pipeline_us: AtomicU64::new(0),
        head_us: AtomicU64::new(0),
        steps: AtomicU64::new(0),
        instance: owner,
    });
    shared
        .metrics
        .queue_capacity
        .set(args.max_queue.max(1) as i64);
    shared.metrics.max_sequences.set(args.max_sequences as i64);
    for i in 0..lanes {
        tokio::spawn(supervise_lane(shared.clone(), i));
    }
    tokio::spawn(watch_readiness(shared.clone()));
    if args.stats_interval_ms > 0 {
        tokio::spawn(poll_expert_stats(
            shared.clone(),
            Duration::from_millis(args.stats_interval_ms),
        ));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Error::peer("gateway", format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::peer("gateway", e.to_string()))?;
    println!("gateway listening on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    serve_http(
        listener,
        http::router(shared),
        Duration::from_secs(args.header_read_timeout_s.max(1)),
        shutdown_signal(args.exit_with_stdin),
    )
    .await;
    Ok(())
}

/// Serves `app` on `listener` until `stop`, then lets requests in flight finish (up to
/// [`crate::serve::CLOSE_GRACE`]). Unlike `axum::serve`, with a header-read (and keep-alive
/// idle) timeout on HTTP/1 and keep-alive pings on HTTP/2.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let (builder, mut closing) = (builder.clone(), closing_rx.clone());
        conns.spawn(async move {
            // The protocol is sniffed from the first bytes before hyper's header timer runs:
            // a client that sends nothing at all is cut off here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let closed = async move {
                let _ = closing.wait_for(|c| *c).await;
            };
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = closed => {
                    // Finish the request in flight, take no new one.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(crate::serve::CLOSE_GRACE, drained)
        .await
        .is_err()
    {
        tracing::info!("HTTP requests still running after the grace period; closing");
    }
}
