//! `moe-worker expert`: an expert shard. Stateless: it owns a set of experts over a layer
//! range and computes their SwiGLU FFNs for whatever rows a stage sends, so it can run as
//! many replicas as load needs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use moe_proto::compute::{ComputeHandler, ComputeServer};
use moe_proto::v1::expert_server::{Expert, ExpertServer};
use moe_proto::v1::{
    DescribeRequest, ExpertRequest, ExpertResponse, ExpertRows, LoadStatsRequest,
    LoadStatsResponse, Role, ShardInfo, Tensor,
};
use moe_proto::wire::ComputeRequest;
use moe_proto::{TensorError, WireDtype, decode_f32, encode};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{LoadCounters, PartArgs, bind, to_status};
use crate::error::{Error, Result};
use crate::load::load_with_progress;
use crate::model::{Model, MoeScratch};
use crate::weights::ShardSpec;

#[derive(Debug, clap::Args)]
pub struct ExpertArgs {
    #[command(flatten)]
    pub part: PartArgs,

    /// Owned experts, comma-separated ids.
    #[arg(long, env = "MOE_EXPERTS", value_delimiter = ',', required = true)]
    pub experts: Vec<usize>,

    /// Which replica of the shard this process is (for logs and process listings).
    #[arg(long, env = "MOE_REPLICA", default_value_t = 0)]
    pub replica: u32,

    /// Computations running at once (each holds its input and output); further calls wait.
    #[arg(long, env = "MOE_MAX_CONCURRENT_CALLS", default_value_t = 4)]
    pub max_concurrent_calls: usize,

    /// Calls waiting for a computation slot; beyond it calls are refused with
    /// RESOURCE_EXHAUSTED (a stage then tries another replica).
    #[arg(long, env = "MOE_MAX_QUEUED_CALLS", default_value_t = 256)]
    pub max_queued_calls: usize,
}

/// How many computations an expert shard runs at once, and how many calls may wait.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub concurrent: usize,
    pub queued: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            concurrent: 4,
            queued: 256,
        }
    }
}

/// Describes a loaded model part.
pub fn shard_info(model: &Model, role: Role, index: u32, name: &str) -> ShardInfo {
    let cfg = model.config();
    let spec = model.spec();
    ShardInfo {
        role: role as i32,
        model: name.to_string(),
        hidden_size: cfg.hidden_size as u32,
        num_layers: cfg.num_hidden_layers as u32,
        num_experts: cfg.num_local_experts as u32,
        vocab_size: cfg.vocab_size as u32,
        layer_start: spec.layers.start as u32,
        layer_end: spec.layers.end as u32,
        experts: spec
            .experts
            .as_ref()
            .map(|s| s.iter().map(|&e| e as u32).collect())
            .unwrap_or_default(),
        index,
        weight_bytes: model.weight_bytes(),
    }
}

pub struct ExpertService {
    model: Arc<Model>,
    info: ShardInfo,
    load: Arc<LoadCounters>,
    max_rows: usize,
    /// Calls of at most this many rows are computed on the server's own worker.
    inline_rows: usize,
    /// A bounded pool: one permit per running computation.
    slots: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    limits: CallLimits,
    /// Element type of the outputs sent back.
    wire: WireDtype,
}

/// Multiply-adds a call may take and still be computed inline (~0.1 ms on one core).
const INLINE_MACS: usize = 1 << 21;

impl ExpertService {
    pub fn new(
        model: Arc<Model>,
        info: ShardInfo,
        max_message_bytes: usize,
        limits: CallLimits,
    ) -> Self {
        let h = model.config().hidden_size.max(1);
        let per_row = 3 * h * model.config().intermediate_size.max(1);
        Self {
            model,
            info,
            load: Arc::default(),
            max_rows: max_message_bytes / (h * 4),
            inline_rows: INLINE_MACS / per_row,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.concurrent.max(1))),
            waiting: Default::default(),
            limits,
            wire: WireDtype::F32,
        }
    }

    /// Sends outputs in `wire` (bf16 halves the bytes back to the stage).
    pub fn with_wire(mut self, wire: WireDtype) -> Self {
        self.wire = wire;
        self
    }

    /// A computation slot: at once when one is free, after a wait when fewer than the queue
    /// limit wait already, else RESOURCE_EXHAUSTED.
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.limits.queued {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "expert shard busy: {} computations running and {} calls waiting",
                self.limits.concurrent, self.limits.queued
            )));
        }
        let p = self.slots.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        p.map_err(|_| Status::unavailable("expert shard stopping"))
    }

    fn check(&self, layer: u32, experts: &[ExpertRows]) -> Result<Vec<(usize, usize)>, Status> {
        let spec = self.model.spec();
        let layer = layer as usize;
        if !spec.layers.contains(&layer) {
            return Err(Status::invalid_argument(format!(
                "layer {layer} is not owned by this shard (layers {}..{})",
                spec.layers.start, spec.layers.end
            )));
        }
        let mut groups = Vec::with_capacity(experts.len());
        let mut total = 0usize;
        for g in experts {
            let e = g.expert as usize;
            if !spec.owns_expert(layer, e) {
                return Err(Status::invalid_argument(format!(
                    "expert {e} of layer {layer} is not owned by this shard"
                )));
            }
            if g.rows == 0 {
                return Err(Status::invalid_argument(format!("expert {e}: zero rows")));
            }
            total = total.saturating_add(g.rows as usize);
            groups.push((e, g.rows as usize));
        }
        if total > self.max_rows {
            return Err(Status::invalid_argument(format!(
                "{total} rows exceed the limit of {} per call",
                self.max_rows
            )));
        }
        Ok(groups)
    }

    /// The shard's `/metrics`: calls running and waiting now, and its counters.
    pub fn expose(&self, e: &mut super::metrics::Exposition) {
        use super::metrics::Kind::Gauge;
        use std::sync::atomic::Ordering;
        e.single(
            "moe_expert_shard_running_calls",
            Gauge,
            "Calls computing now",
            self.limits
                .concurrent
                .max(1)
                .saturating_sub(self.slots.available_permits()) as f64,
        );
        e.single(
            "moe_expert_shard_waiting_calls",
            Gauge,
            "Calls waiting for a computation slot",
            self.waiting.load(Ordering::SeqCst) as f64,
        );
        e.single(
            "moe_expert_shard_call_slots",
            Gauge,
            "Calls computed at once (--max-concurrent-calls)",
            self.limits.concurrent.max(1) as f64,
        );
        self.load
            .expose(e, "moe_expert_shard", super::metrics::Unit::Calls);
    }

    /// One call, whichever path it came by (see [`ExpertService::call`]), counted: refusals
    /// for capacity and failures of accepted calls (a bad request is neither).
    async fn run(
        &self,
        metadata: &MetadataMap,
        layer: u32,
        experts: &[ExpertRows],
        input: impl FnOnce(usize, usize) -> Result<Vec<f32>, TensorError>,
    ) -> Result<Tensor, Status> {
        let r = self.call(metadata, layer, experts, input).await;
        match &r {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => self.load.record_rejected(),
            Err(s) if s.code() != tonic::Code::InvalidArgument => self.load.record_failure(),
            _ => {}
        }
        r
    }

    /// Checks a call, decodes its input with `input` (given the row count), computes on a
    /// blocking thread, and returns the output tensor.
    async fn call(
        &self,
        metadata: &MetadataMap,
        layer: u32,
        experts: &[ExpertRows],
        input: impl FnOnce(usize, usize) -> Result<Vec<f32>, TensorError>,
    ) -> Result<Tensor, Status> {
        let span = tracing::info_span!("expert.compute", layer);
        crate::telemetry::set_parent(&span, crate::telemetry::extract_metadata(metadata));
        let groups = self.check(layer, experts)?;
        // Nothing is decoded or allocated for a call until it has a slot.
        let slot = self.slot().await?;
        let total: usize = groups.iter().map(|g| g.1).sum();
        let h = self.model.config().hidden_size;
        let x = input(total, h).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let model = self.model.clone();
        let layer = layer as usize;
        let started = Instant::now();
        let work = move || {
            let _slot = slot;
            let _g = span.enter();
            let mut out = Vec::new();
            SCRATCH
                .with_borrow_mut(|s| model.expert_ffn(layer, &groups, &x, &mut out, s))
                .map(|()| (out, groups))
        };
        // Work smaller than a thread hop runs here; the rest on a blocking thread, so the
        // server's workers stay free for the connections.
        let out = if total <= self.inline_rows {
            work()
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| Status::internal(format!("expert task: {e}")))?
        }
        .map_err(to_status)?;
        let (out, groups) = out;
        self.load.record_batch(total, started.elapsed());
        self.load
            .record_experts(layer, groups.iter().map(|&(e, n)| (e, n)));
        Ok(encode(out, &[total, h], self.wire))
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<MoeScratch> = std::cell::RefCell::new(MoeScratch::default());
}

/// `Compute` as the generated server decodes it: the same checks and computation as the
/// direct path ([`ComputeHandler`]), which serves it in deployments.
#[tonic::async_trait]
impl Expert for ExpertService {
    async fn compute(
        &self,
        request: Request<ExpertRequest>,
    ) -> Result<Response<ExpertResponse>, Status> {
        let req = request.get_ref();
        let output = self
            .run(request.metadata(), req.layer, &req.experts, |rows, h| {
                let mut x = Vec::new();
                decode_f32("input", req.input.as_ref(), Some(rows), h, &mut x).map(|_| x)
            })
            .await?;
        Ok(Response::new(ExpertResponse {
            output: Some(output),
        }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<ShardInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load_stats(
        &self,
        request: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        Ok(Response::new(
            self.load.snapshot(request.get_ref().reset, 0)?,
        ))
    }
}

#[tonic::async_trait]
impl ComputeHandler for ExpertService {
    async fn compute(&self, req: ComputeRequest, metadata: MetadataMap) -> Result<Tensor, Status> {
        self.run(&metadata, req.layer, &req.experts, |rows, h| {
            req.input_f32(rows, h)
        })
        .await
    }
}

pub async fn run(args: ExpertArgs) -> Result<()> {
    super::tls::init(&args.part.server.tls)?;
    let listener = bind(args.part.server.listen, "expert").await?;
    let late = super::metrics::serve(
        args.part.server.metrics_listen,
        super::metrics::Identity::of("expert", &args.part),
    )
    .await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let src = args.part.model.model.open()?;
    let experts: BTreeSet<usize> = args.experts.iter().copied().collect();
    let spec = ShardSpec::experts(args.part.layers.clone(), experts);
    let name = args.part.model.model.to_string();
    let precision = args.part.model.precision.precision();
    let model =
        tokio::task::spawn_blocking(move || load_with_progress(src.as_ref(), spec, precision))
            .await
            .map_err(|e| Error::peer("expert", format!("load task: {e}")))??;
    let model = Arc::new(model);
    let info = shard_info(&model, Role::Expert, args.part.index, &name);
    let limit = args.part.server.max_message_bytes;
    let limits = CallLimits {
        concurrent: args.max_concurrent_calls.max(1),
        queued: args.max_queued_calls,
    };
    let handler =
        Arc::new(ExpertService::new(model, info, limit, limits).with_wire(args.part.wire_dtype));
    {
        let handler = handler.clone();
        let _ = late.set(Box::new(move |e| handler.expose(e)));
    }
    let generated = ExpertServer::from_arc(handler.clone())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let service = ComputeServer::new(handler, generated, limit);
    reporter.set_serving::<ExpertServer<ExpertService>>().await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(layers = ?args.part.layers, experts = ?args.experts, replica = args.replica, "expert shard serving");
    let routes = tonic::service::Routes::new(health.clone()).add_service(service);
    super::serve_grpc(
        "expert",
        routes,
        health,
        listener,
        &args.part.server,
        reporter,
    )
    .await
}
