//! `moe-worker stage`: a pipeline stage. It owns a contiguous layer range — attention, norms,
//! routers and the KV caches of its sequences — and sends each MoE layer's rows to the expert
//! shards that own the chosen experts, one request per shard, then passes the hidden states
//! to the next stage. The last stage answers with each sequence's last hidden row.

mod experts;
mod kv;
mod relay;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moe_proto::v1::forward_request::Input;
use moe_proto::v1::forward_response::Result as FwdResult;
use moe_proto::v1::stage_client::StageClient;
use moe_proto::v1::stage_server::{Stage, StageServer};
use moe_proto::v1::{
    DescribeRequest, ForwardError, ForwardRequest, ForwardResponse, LoadStatsRequest,
    LoadStatsResponse, ReleaseRequest, ReleaseResponse, Role, ShardInfo,
};
use moe_proto::{WireDtype, decode_f32, encode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use experts::{Caller, ExpertRouter};
use experts::{CountingExperts, RemoteExperts};
use kv::KvStore;
use relay::Downstream;

use super::expert::shard_info;
use super::{LoadCounters, PartArgs, bind, discovery, remaining, to_status};
use crate::error::{Error, Result};
use crate::load::load_with_progress;
use crate::model::{Chunk, KvCache, LocalExperts, Model, MoeScratch, Scratch};
use crate::weights::ShardSpec;

#[derive(Debug, clap::Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub part: PartArgs,

    /// Address of the next stage; none for the last stage.
    #[arg(long, env = "MOE_NEXT_STAGE")]
    pub next: Option<String>,

    /// Expert shard addresses, comma-separated (replicas of a shard may all be listed).
    /// Empty: this stage computes its own experts.
    #[arg(long, env = "MOE_EXPERT_ADDRS", default_value = "")]
    pub expert_addrs: String,

    /// Deadline of one expert call when the micro-batch carries none, in milliseconds.
    #[arg(long, env = "MOE_EXPERT_TIMEOUT_MS", default_value_t = 30_000)]
    pub expert_timeout_ms: u64,

    /// How long to wait at startup for the expert shards to answer, in seconds.
    #[arg(long, env = "MOE_STARTUP_TIMEOUT_S", default_value_t = 300)]
    pub startup_timeout_s: u64,

    /// Most sequences holding a KV cache at once.
    #[arg(long, env = "MOE_MAX_SEQUENCES", default_value_t = 1024)]
    pub max_sequences: usize,

    /// Seconds a sequence's KV cache may sit unused before it is freed (a gateway that died
    /// never releases its sequences).
    #[arg(long, env = "MOE_CACHE_IDLE_TIMEOUT_S", default_value_t = 600)]
    pub cache_idle_timeout_s: u64,

    /// Most Forward streams open at once (each has a compute thread); more are refused with
    /// RESOURCE_EXHAUSTED. A gateway opens one, and each stage one to the next.
    #[arg(long, env = "MOE_MAX_STREAMS", default_value_t = 64)]
    pub max_streams: usize,

    /// Most rows (tokens) in one micro-batch; larger ones are refused before anything is
    /// allocated for them.
    #[arg(long, env = "MOE_MAX_BATCH_ROWS", default_value_t = 8192)]
    pub max_batch_rows: usize,
}

// ---------------------------------------------------------------------------------------------
// The stage.

struct Core {
    model: Arc<Model>,
    info: ShardInfo,
    kv: KvStore,
    experts: Option<Arc<ExpertRouter>>,
    load: LoadCounters,
    expert_timeout: Duration,
    max_batch_rows: usize,
    /// Forward streams that may still open.
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: usize,
    is_last: bool,
    next: Option<(String, discovery::Peer)>,
    max_message_bytes: usize,
    /// Element type of the activations this stage sends (experts, next stage, gateway).
    wire: WireDtype,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<(Scratch, MoeScratch)> = Default::default();
}

pub(crate) fn fwd_error(id: u64, status: &Status) -> ForwardResponse {
    ForwardResponse {
        micro_batch_id: id,
        result: Some(FwdResult::Error(ForwardError {
            code: status.code() as i32,
            message: status.message().to_string(),
        })),
    }
}

/// A micro-batch for a compute thread, and where its answer goes.
type Job = (
    ForwardRequest,
    tracing::Span,
    tokio::sync::oneshot::Sender<(ForwardRequest, Result<Vec<f32>, Status>)>,
);

/// Starts a forward stream's compute thread: it runs the stream's micro-batches one after
/// another, driving their expert calls itself ([`Caller`]), and ends with the stream (when
/// the returned sender is dropped).
fn compute_thread(core: Arc<Core>) -> std::io::Result<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("stage-compute".into())
        .spawn(move || {
            let mut caller = None;
            while let Ok((msg, span, done)) = rx.recv() {
                let run =
                    std::panic::AssertUnwindSafe(|| span.in_scope(|| core.run(&msg, &mut caller)));
                let result = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    caller = None;
                    // Whatever the batch held is lost with it.
                    core.kv.finish(&msg.owner, &msg.seqs, None);
                    Err(Status::internal("the stage's computation panicked"))
                });
                match &result {
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        core.load.record_rejected()
                    }
                    Err(_) => core.load.record_failure(),
                    Ok(_) => {}
                }
                let _ = done.send((msg, result));
            }
        })?;
    Ok(tx)
}

impl Core {
    /// The stage's `/metrics`: what it holds now, read from that state, and its counters.
    fn expose(&self, e: &mut super::metrics::Exposition) {
        use super::metrics::Kind::Gauge;
        e.single(
            "moe_stage_kv_sequences",
            Gauge,
            "Sequences holding a KV cache on this stage (including those in a micro-batch now)",
            self.kv.len() as f64,
        );
        e.single(
            "moe_stage_kv_capacity",
            Gauge,
            "Most sequences this stage holds KV caches for",
            self.kv.capacity() as f64,
        );
        e.single(
            "moe_stage_forward_streams",
            Gauge,
            "Forward streams open (one per gateway, or the previous stage)",
            self.max_streams
                .saturating_sub(self.streams.available_permits()) as f64,
        );
        self.load
            .expose(e, "moe_stage", super::metrics::Unit::MicroBatches);
    }

    /// Runs a micro-batch through this stage's layers; returns the hidden states of every
    /// row, or (last stage) of each sequence's last row.
    fn run(&self, req: &ForwardRequest, caller: &mut Option<Caller>) -> Result<Vec<f32>, Status> {
        let cfg = self.model.config();
        let h = cfg.hidden_size;
        kv::check_owner(&req.owner)?;
        if req.seqs.is_empty() {
            return Err(Status::invalid_argument("seqs: empty micro-batch"));
        }
        if req.seqs.len() > self.max_batch_rows {
            return Err(Status::invalid_argument(format!(
                "seqs: {} sequences in one micro-batch; at most {}",
                req.seqs.len(),
                self.max_batch_rows
            )));
        }
        // Every size is checked before anything is allocated for it.
        let max_pos = cfg.max_position_embeddings;
        let mut chunks = Vec::with_capacity(req.seqs.len());
        let mut seen = HashSet::with_capacity(req.seqs.len());
        let mut rows = 0usize;
        for s in &req.seqs {
            if s.len == 0 {
                return Err(Status::invalid_argument(format!(
                    "seqs: sequence {} has len 0",
                    s.seq_id
                )));
            }
            let end = s.start as usize + s.len as usize;
            if end > max_pos {
                return Err(Status::invalid_argument(format!(
                    "seqs: sequence {} reaches position {end}; the model's context is {max_pos}",
                    s.seq_id
                )));
            }
            if !seen.insert(s.seq_id) {
                return Err(Status::invalid_argument(format!(
                    "seqs: sequence {} appears twice",
                    s.seq_id
                )));
            }
            rows += s.len as usize;
            if rows > self.max_batch_rows {
                return Err(Status::invalid_argument(format!(
                    "seqs: more than {} rows in one micro-batch",
                    self.max_batch_rows
                )));
            }
            chunks.push(Chunk {
                start: s.start as usize,
                len: s.len as usize,
            });
        }
        let mut hidden = Vec::new();
        match &req.input {
            Some(Input::Tokens(t)) => {
                if !self.model.owns_embeddings() {
                    return Err(Status::invalid_argument(
                        "input: token ids go to the first stage; this stage takes hidden states",
                    ));
                }
                if t.ids.len() != rows {
                    return Err(Status::invalid_argument(format!(
                        "input: {} token ids for {rows} rows",
                        t.ids.len()
                    )));
                }
                self.model.embed(&t.ids, &mut hidden).map_err(to_status)?;
            }
            Some(Input::Hidden(t)) => {
                if self.model.owns_embeddings() {
                    return Err(Status::invalid_argument(
                        "input: the first stage takes token ids, not hidden states",
                    ));
                }
                decode_f32("input hidden", Some(t), Some(rows), h, &mut hidden)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            None => return Err(Status::invalid_argument("input: missing")),
        }
        // Take the sequences' caches out while the batch runs.
        let mut caches = self.kv.take(&req.owner, &req.seqs, self.info.index, |s| {
            let cap = (s.capacity as usize)
                .max(s.start as usize + s.len as usize)
                .min(max_pos);
            self.model.new_cache(cap)
        })?;
        let started = Instant::now();
        let timeout = remaining(req.deadline_unix_ms).unwrap_or(self.expert_timeout);
        let result = BUFFERS.with_borrow_mut(|(scratch, moe)| {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            match &self.experts {
                Some(router) => {
                    let mut ex = RemoteExperts {
                        router,
                        caller,
                        timeout,
                        load: &self.load,
                        wire: self.wire,
                    };
                    self.model
                        .forward_layers(&mut hidden, &chunks, &mut refs, &mut ex, scratch)
                }
                None => {
                    let mut ex = CountingExperts {
                        inner: LocalExperts {
                            model: &self.model,
                            scratch: moe,
                        },
                        load: &self.load,
                    };
                    self.model
                        .forward_layers(&mut hidden, &chunks, &mut refs, &mut ex, scratch)
                }
            }
        });
        if let Err(e) = result {
            // The sequences' caches are now inconsistent across stages: drop them.
            self.kv.finish(&req.owner, &req.seqs, None);
            return Err(to_status(e));
        }
        self.load.record_batch(rows, started.elapsed());
        self.kv.finish(&req.owner, &req.seqs, Some(caches));
        if !self.is_last {
            return Ok(hidden);
        }
        let mut last = Vec::with_capacity(chunks.len() * h);
        let mut end = 0;
        for c in &chunks {
            end += c.len;
            last.extend_from_slice(&hidden[(end - 1) * h..end * h]);
        }
        Ok(last)
    }
}

pub struct StageService {
    core: Arc<Core>,
}

#[tonic::async_trait]
impl Stage for StageService {
    type ForwardStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let Ok(permit) = self.core.streams.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "stage {} has {} Forward streams open, its limit",
                self.core.info.index, self.core.max_streams
            )));
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let core = self.core.clone();
        tokio::spawn(async move {
            // Held while the stream lives.
            let _permit = permit;
            let mut down: Option<Downstream> = None;
            let mut jobs: Option<std::sync::mpsc::Sender<Job>> = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                };
                let id = msg.micro_batch_id;
                let span =
                    tracing::info_span!("stage.forward", stage = core.info.index, micro_batch = id);
                crate::telemetry::set_parent(
                    &span,
                    crate::telemetry::extract_map(&msg.trace_context),
                );
                let downstream_context = crate::telemetry::inject_map(&span);
                if remaining(msg.deadline_unix_ms).is_some_and(|d| d.is_zero()) {
                    let s = Status::deadline_exceeded(format!(
                        "micro-batch {id} reached stage {} after its deadline",
                        core.info.index
                    ));
                    let _ = tx.send(Ok(fwd_error(id, &s))).await;
                    continue;
                }
                // The stream's micro-batches run in order on its own compute thread.
                let thread = match &jobs {
                    Some(j) => Ok(j.clone()),
                    None => compute_thread(core.clone()),
                };
                let (done, answer) = tokio::sync::oneshot::channel();
                match thread {
                    Ok(j) => {
                        let _ = j.send((msg, span, done));
                        jobs = Some(j);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start a compute thread"),
                }
                let Ok((msg, result)) = answer.await else {
                    jobs = None;
                    let s = Status::internal("the stage's compute thread stopped");
                    let _ = tx.send(Ok(fwd_error(id, &s))).await;
                    continue;
                };
                let hidden = match result {
                    Ok(h) => h,
                    Err(s) => {
                        let _ = tx.send(Ok(fwd_error(id, &s))).await;
                        continue;
                    }
                };
                let h = core.model.config().hidden_size;
                let rows = hidden.len() / h.max(1);
                let tensor = encode(hidden, &[rows, h], core.wire);
                let Some((next_name, peer)) = &core.next else {
                    let resp = ForwardResponse {
                        micro_batch_id: id,
                        result: Some(FwdResult::LastHidden(tensor)),
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                    continue;
                };
                if down
                    .as_ref()
                    .is_none_or(|d| !d.alive.load(Ordering::SeqCst))
                {
                    let client = peer.channel().map(|ch| {
                        StageClient::new(ch)
                            .max_decoding_message_size(core.max_message_bytes)
                            .max_encoding_message_size(core.max_message_bytes)
                    });
                    let opened = match client {
                        Ok(c) => Downstream::open(next_name, &c, tx.clone()).await,
                        Err(e) => Err(Status::unavailable(e.to_string())),
                    };
                    match opened {
                        Ok(d) => down = Some(d),
                        Err(s) => {
                            down = None;
                            let _ = tx.send(Ok(fwd_error(id, &s))).await;
                            continue;
                        }
                    }
                }
                let Some(d) = &down else { continue };
                if let Ok(mut p) = d.pending.lock() {
                    p.insert(id);
                }
                let next = ForwardRequest {
                    micro_batch_id: id,
                    seqs: msg.seqs,
                    input: Some(Input::Hidden(tensor)),
                    deadline_unix_ms: msg.deadline_unix_ms,
                    trace_context: downstream_context,
                    owner: msg.owner,
                };
                if d.tx.send(next).await.is_err() {
                    if let Ok(mut p) = d.pending.lock() {
                        p.remove(&id);
                    }
                    let s = Status::unavailable(format!("{next_name}: stream closed"));
                    let _ = tx.send(Ok(fwd_error(id, &s))).await;
                    down = None;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let req = request.get_ref();
        kv::check_owner(&req.owner)?;
        let released = self.core.kv.release(&req.owner, &req.seq_ids);
        Ok(Response::new(ReleaseResponse { released }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<ShardInfo>, Status> {
        Ok(Response::new(self.core.info.clone()))
    }

    async fn load_stats(
        &self,
        request: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        let active = self.core.kv.len() as u32;
        Ok(Response::new(
            self.core.load.snapshot(request.get_ref().reset, active)?,
        ))
    }
}

/// Frees KV caches that no micro-batch has used for `idle` (sequences in a micro-batch are
/// never evicted).
async fn evict_idle(core: Arc<Core>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        let evicted = core.kv.evict_idle(idle);
        if evicted > 0 {
            tracing::info!(evicted, "freed idle KV caches");
        }
    }
}

pub async fn run(args: StageArgs) -> Result<()> {
    super::tls::init(&args.part.server.tls)?;
    let listener = bind(args.part.server.listen, "stage").await?;
    let late = super::metrics::serve(
        args.part.server.metrics_listen,
        super::metrics::Identity::of("stage", &args.part),
    )
    .await?;
    let src = args.part.model.model.open()?;
    let cfg = src.config().clone();
    let expert_addrs = discovery::parse_list(&args.expert_addrs)?;
    let spec = ShardSpec::stage(&cfg, args.part.layers.clone(), expert_addrs.is_empty());
    spec.check(&cfg)?;
    let is_last = args.part.layers.end == cfg.num_hidden_layers;
    if is_last && args.next.is_some() {
        return Err(Error::invalid("next", "the last stage has no next stage"));
    }
    if !is_last && args.next.is_none() {
        return Err(Error::invalid(
            "next",
            format!(
                "stage ends at layer {} of {}: the next stage's address is required",
                args.part.layers.end, cfg.num_hidden_layers
            ),
        ));
    }
    let name = args.part.model.model.to_string();
    let precision = args.part.model.precision.precision();
    let model =
        tokio::task::spawn_blocking(move || load_with_progress(src.as_ref(), spec, precision))
            .await
            .map_err(|e| Error::peer("stage", format!("load task: {e}")))??;
    let limit = args.part.server.max_message_bytes;
    let experts = if expert_addrs.is_empty() {
        None
    } else {
        Some(
            ExpertRouter::connect(
                discovery::resolve(&args.expert_addrs)?,
                &model,
                limit,
                Duration::from_secs(args.startup_timeout_s),
            )
            .await?,
        )
    };
    let next = match &args.next {
        Some(addr) => Some((
            format!("stage {} at {addr}", args.part.index + 1),
            discovery::Peer::new(addr)?,
        )),
        None => None,
    };
    let model = Arc::new(model);
    let info = shard_info(&model, Role::Stage, args.part.index, &name);
    let core = Arc::new(Core {
        model,
        info,
        kv: KvStore::new(args.max_sequences),
        experts,
        load: LoadCounters::default(),
        expert_timeout: Duration::from_millis(args.expert_timeout_ms),
        max_batch_rows: args.max_batch_rows.max(1),
        streams: Arc::new(tokio::sync::Semaphore::new(args.max_streams)),
        max_streams: args.max_streams,
        is_last,
        next,
        max_message_bytes: limit,
        wire: args.part.wire_dtype,
    });
    {
        let core = core.clone();
        let _ = late.set(Box::new(move |e| core.expose(e)));
    }
    tokio::spawn(evict_idle(
        core.clone(),
        Duration::from_secs(args.cache_idle_timeout_s),
    ));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<StageServer<StageService>>().await;
    let service = StageServer::new(StageService { core })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    tracing::info!(layers = ?args.part.layers, "stage serving");
    let routes = tonic::service::Routes::new(health.clone()).add_service(service);
    super::serve_grpc(
        "stage",
        routes,
        health,
        listener,
        &args.part.server,
        reporter,
    )
    .await
}
