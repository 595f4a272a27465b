//! `moe-worker stage`: a pipeline stage. It owns a contiguous layer range — attention, norms,
//! routers and the KV caches of its sequences — and sends each MoE layer's rows to the expert
//! shards that own the chosen experts, one request per shard, then passes the hidden states
//! to the next stage. The last stage answers with each sequence's last hidden row.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use moe_proto::compute::ComputeClient;
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::forward_request::Input;
use moe_proto::v1::forward_response::Result as FwdResult;
use moe_proto::v1::stage_client::StageClient;
use moe_proto::v1::stage_server::{Stage, StageServer};
use moe_proto::v1::{
    DescribeRequest, ExpertRequest, ExpertRows, ForwardError, ForwardRequest, ForwardResponse,
    LoadStatsRequest, LoadStatsResponse, ReleaseRequest, ReleaseResponse, Role, ShardInfo,
};
use moe_proto::{decode_f32, encode_f32_owned};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use super::expert::shard_info;
use super::{LoadCounters, PartArgs, bind, channel, discovery, remaining, to_status};
use crate::cli::load_with_progress;
use crate::error::{Error, Result};
use crate::model::{
    Chunk, ExpertCompute, KvCache, LocalExperts, Model, MoeScratch, Routing, Scratch, gather,
    scatter_add,
};
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
}

// ---------------------------------------------------------------------------------------------
// Expert dispatch.

struct Replica {
    addr: String,
    outstanding: AtomicUsize,
}

/// What an expert shard owns: (layer start, layer end, experts).
type Ownership = (u32, u32, Vec<u32>);

/// One expert shard (a layer range × a set of experts) and its live replicas.
struct ShardGroup {
    name: String,
    replicas: Vec<Arc<Replica>>,
    /// Rotates the first choice among equally loaded replicas, so every replica takes
    /// traffic even when calls never overlap.
    turn: AtomicUsize,
}

/// Who computes what, at one moment: replaced whole when the set of expert processes changes.
struct Table {
    groups: Vec<ShardGroup>,
    /// `[layer - layer_start][expert]` → index into `groups`; `usize::MAX`: no live shard.
    owner: Vec<Vec<usize>>,
}

/// Which shard computes each (layer, expert) of this stage's layers, following the expert
/// processes as they come and go (`kube:` peers): a new replica joins the table once it has
/// answered `Describe`; a replica that leaves gets no new calls (calls already sent finish).
pub struct ExpertRouter {
    table: std::sync::RwLock<Arc<Table>>,
    layers: std::ops::Range<usize>,
    num_experts: usize,
    num_layers: usize,
    hidden: usize,
    max_message_bytes: usize,
    /// Every replica that has described itself, by address.
    known: Mutex<BTreeMap<String, (Ownership, Arc<Replica>)>>,
}

impl ExpertRouter {
    /// Waits (up to `timeout`) until the peers in `peers` cover every expert of this stage's
    /// layers, then keeps following `peers` in the background.
    pub async fn connect(
        mut peers: tokio::sync::watch::Receiver<Vec<String>>,
        model: &Model,
        max_message_bytes: usize,
        timeout: Duration,
    ) -> Result<Arc<Self>> {
        let cfg = model.config();
        let router = Arc::new(Self {
            table: std::sync::RwLock::new(Arc::new(Table {
                groups: Vec::new(),
                owner: Vec::new(),
            })),
            layers: model.spec().layers.clone(),
            num_experts: cfg.num_local_experts,
            num_layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            max_message_bytes,
            known: Mutex::default(),
        });
        let start = Instant::now();
        loop {
            let addrs = peers.borrow_and_update().clone();
            let unreachable = router.refresh(&addrs, true).await?;
            let missing = router.table().missing(&router.layers);
            let Some((layer, expert)) = missing else {
                break;
            };
            if start.elapsed() >= timeout {
                let why = if addrs.is_empty() {
                    "no expert shard address resolved".to_string()
                } else if unreachable.is_empty() {
                    format!("no expert shard among {} owns it", addrs.join(", "))
                } else {
                    format!("not answering: {}", unreachable.join(", "))
                };
                return Err(Error::peer(
                    "expert shards",
                    format!("layer {layer} expert {expert} not covered within {timeout:?}: {why}"),
                ));
            }
            tracing::debug!(layer, expert, "waiting for an expert shard to cover");
            let _ = tokio::time::timeout(Duration::from_millis(300), peers.changed()).await;
        }
        tokio::spawn(Self::follow(Arc::downgrade(&router), peers));
        Ok(router)
    }

    /// Re-reads the peer set on every change, and every few seconds (a replica that did not
    /// answer `Describe` yet is asked again).
    async fn follow(
        router: std::sync::Weak<Self>,
        mut peers: tokio::sync::watch::Receiver<Vec<String>>,
    ) {
        loop {
            let changed = tokio::time::timeout(Duration::from_secs(3), peers.changed()).await;
            if matches!(changed, Ok(Err(_))) {
                // A fixed list never changes: nothing to follow.
                return;
            }
            let Some(router) = router.upgrade() else {
                return;
            };
            let addrs = peers.borrow_and_update().clone();
            if let Err(e) = router.refresh(&addrs, false).await {
                tracing::warn!(error = %e, "expert shard refresh failed");
            }
        }
    }

    fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Brings the table in line with `addrs`: forgets replicas that left, asks new ones what
    /// they own. Returns the addresses that did not answer. At startup (`strict`) a shard of a
    /// different model is an error; later it is logged and ignored.
    async fn refresh(&self, addrs: &[String], strict: bool) -> Result<Vec<String>> {
        let new: Vec<String> = {
            let mut known = self.known.lock().map_err(|_| poisoned())?;
            known.retain(|a, _| addrs.contains(a));
            addrs
                .iter()
                .filter(|a| !known.contains_key(*a))
                .cloned()
                .collect()
        };
        let answers = join_all(new.iter().map(|a| self.describe(a))).await;
        let mut unreachable = Vec::new();
        {
            let mut known = self.known.lock().map_err(|_| poisoned())?;
            for (addr, answer) in new.into_iter().zip(answers) {
                match answer {
                    Ok(Some(entry)) => {
                        tracing::info!(%addr, layers = ?(entry.0.0..entry.0.1), experts = ?entry.0.2, "expert replica joined");
                        known.insert(addr, entry);
                    }
                    Ok(None) => unreachable.push(addr),
                    Err(e) if strict => return Err(e),
                    Err(e) => tracing::warn!(%addr, error = %e, "ignoring expert shard"),
                }
            }
            let table = self.build(&known);
            let mut slot = self.table.write().map_err(|_| poisoned())?;
            *slot = Arc::new(table);
        }
        Ok(unreachable)
    }

    /// Asks one address what it owns: `Ok(None)` when it does not answer (yet).
    async fn describe(&self, addr: &str) -> Result<Option<(Ownership, Arc<Replica>)>> {
        let limit = self.max_message_bytes;
        let mut client = ExpertClient::new(channel(addr)?)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let mut req = Request::new(DescribeRequest {});
        req.set_timeout(Duration::from_secs(2));
        let info: ShardInfo =
            match tokio::time::timeout(Duration::from_secs(3), client.describe(req)).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "expert shard not ready yet");
                    return Ok(None);
                }
                Err(_) => return Ok(None),
            };
        if info.hidden_size as usize != self.hidden
            || info.num_experts as usize != self.num_experts
            || info.num_layers as usize != self.num_layers
        {
            return Err(Error::peer(
                format!("expert shard {addr}"),
                format!(
                    "serves a different model ({} layers, {} experts, hidden {})",
                    info.num_layers, info.num_experts, info.hidden_size
                ),
            ));
        }
        Ok(Some((
            (info.layer_start, info.layer_end, info.experts),
            Arc::new(Replica {
                addr: addr.to_string(),
                outstanding: AtomicUsize::new(0),
            }),
        )))
    }

    fn build(&self, known: &BTreeMap<String, (Ownership, Arc<Replica>)>) -> Table {
        let mut by_owner: BTreeMap<&Ownership, Vec<Arc<Replica>>> = BTreeMap::new();
        for (own, r) in known.values() {
            by_owner.entry(own).or_default().push(r.clone());
        }
        let layers = &self.layers;
        let mut groups = Vec::new();
        let mut owner = vec![vec![usize::MAX; self.num_experts]; layers.len()];
        for ((ls, le, experts), replicas) in by_owner {
            let gi = groups.len();
            let mut used = false;
            for l in (*ls as usize)..(*le as usize) {
                let Some(row) = l.checked_sub(layers.start).and_then(|i| owner.get_mut(i)) else {
                    continue;
                };
                for &e in experts {
                    if let Some(slot) = row.get_mut(e as usize)
                        && *slot == usize::MAX
                    {
                        *slot = gi;
                        used = true;
                    }
                }
            }
            if !used {
                continue;
            }
            let list: Vec<String> = experts.iter().map(|e| e.to_string()).collect();
            groups.push(ShardGroup {
                name: format!(
                    "expert shard (layers {ls}..{le}, experts {})",
                    list.join(",")
                ),
                replicas,
                turn: AtomicUsize::new(0),
            });
        }
        Table { groups, owner }
    }

    /// Calls one shard, trying its replicas by least outstanding work, with the calling
    /// thread's `clients`.
    async fn call(
        &self,
        g: &ShardGroup,
        req: ExpertRequest,
        timeout: Duration,
        clients: &HashMap<String, ComputeClient<Channel>>,
    ) -> Result<Vec<f32>> {
        let rows: usize = req.experts.iter().map(|e| e.rows as usize).sum();
        // Least outstanding first; among equals, starting from this call's turn.
        let n = g.replicas.len().max(1);
        let first = g.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<(usize, &Arc<Replica>)> = g.replicas.iter().enumerate().collect();
        order.sort_by_key(|(i, r)| (r.outstanding.load(Ordering::Relaxed), (i + n - first) % n));
        let order = order.into_iter().map(|(_, r)| r);
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        // Each replica gets a second try when the first never reached it (UNAVAILABLE: e.g. a
        // connection its previous process closed while this thread was idle); Compute is
        // stateless, so a repeat is harmless.
        let attempts = order.flat_map(|r| [(r, true), (r, false)]);
        let mut again = false;
        for (r, first_try) in attempts {
            if !first_try && !std::mem::take(&mut again) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(mut client) = clients.get(&r.addr).cloned() else {
                last = format!("{} at {}: no connection", g.name, r.addr);
                continue;
            };
            r.outstanding.fetch_add(1, Ordering::Relaxed);
            let span =
                tracing::info_span!("stage.expert_call", shard = %g.name, replica = %r.addr, rows);
            let mut metadata = MetadataMap::new();
            crate::telemetry::inject_metadata(&span, &mut metadata);
            let input = req.input.clone().unwrap_or_default();
            let call = client.compute(metadata, Some(left), req.layer, &req.experts, input);
            let result = tokio::time::timeout(left, call).await;
            r.outstanding.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Ok(output)) => {
                    return output
                        .to_f32("expert output", Some(rows), self.hidden)
                        .map_err(|e| {
                            Error::peer(format!("{} at {}", g.name, r.addr), e.to_string())
                        });
                }
                // The shard rejected the input: another replica would too.
                Ok(Err(s)) if s.code() == Code::InvalidArgument => {
                    return Err(Error::peer(
                        format!("{} at {}", g.name, r.addr),
                        s.message().to_string(),
                    ));
                }
                Ok(Err(s)) => {
                    last = format!("{} at {}: {}", g.name, r.addr, s.message());
                    again = first_try && s.code() == Code::Unavailable;
                }
                Err(_) => last = format!("{} at {}: no answer within {left:?}", g.name, r.addr),
            }
        }
        if g.replicas.is_empty() {
            return Err(Error::peer(&g.name, "no live replica"));
        }
        if last.is_empty() {
            return Err(Error::Deadline(format!("{}: no time left", g.name)));
        }
        Err(Error::peer("expert call", last))
    }
}

impl Table {
    /// The first (layer, expert) of `layers` that no live shard computes.
    fn missing(&self, layers: &std::ops::Range<usize>) -> Option<(usize, usize)> {
        if self.owner.is_empty() && !layers.is_empty() {
            return Some((layers.start, 0));
        }
        self.owner.iter().enumerate().find_map(|(i, row)| {
            row.iter()
                .position(|&g| g == usize::MAX)
                .map(|e| (layers.start + i, e))
        })
    }
}

fn poisoned() -> Error {
    Error::peer("expert router", "lock poisoned")
}

/// Drives a compute thread's expert calls on that thread: a current-thread runtime and the
/// connections made on it. Through the server's multi-threaded runtime, every call would
/// cross threads twice more (to the connection's task and back), which costs more than the
/// bytes of a small batch take to travel.
pub struct Caller {
    rt: tokio::runtime::Runtime,
    clients: HashMap<String, ComputeClient<Channel>>,
    /// The table `clients` were made for.
    followed: Option<Arc<Table>>,
}

impl Caller {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::peer("expert caller", e.to_string()))?;
        Ok(Self {
            rt,
            clients: HashMap::new(),
            followed: None,
        })
    }

    /// Connects (lazily) to every replica of `table` not yet known, and forgets those gone;
    /// nothing to do while the table is the one last followed.
    fn follow(&mut self, table: &Arc<Table>, limit: usize) -> Result<()> {
        if self
            .followed
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, table))
        {
            return Ok(());
        }
        let live: HashSet<&str> = table
            .groups
            .iter()
            .flat_map(|g| g.replicas.iter().map(|r| r.addr.as_str()))
            .collect();
        self.clients.retain(|a, _| live.contains(a.as_str()));
        let _on = self.rt.enter();
        for addr in live {
            if !self.clients.contains_key(addr) {
                let client = ComputeClient::new(channel(addr)?, limit);
                self.clients.insert(addr.to_string(), client);
            }
        }
        self.followed = Some(table.clone());
        Ok(())
    }
}

/// Computes a layer's experts on the remote shards, from a compute thread.
struct RemoteExperts<'a> {
    router: &'a ExpertRouter,
    caller: &'a mut Option<Caller>,
    timeout: Duration,
    load: &'a LoadCounters,
}

impl ExpertCompute for RemoteExperts<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let r = self.router;
        let h = r.hidden;
        let table = r.table();
        let owners = layer
            .checked_sub(r.layers.start)
            .and_then(|i| table.owner.get(i))
            .ok_or_else(|| {
                Error::invalid("layer", format!("{layer} is not owned by this stage"))
            })?;
        self.load
            .record_experts(layer, routing.counts().enumerate());
        if let Some(e) = (0..routing.num_experts())
            .find(|&e| !routing.for_expert(e).is_empty() && owners[e] == usize::MAX)
        {
            return Err(Error::peer(
                format!("layer {layer}"),
                format!("no live expert shard computes expert {e}"),
            ));
        }
        let mut calls = Vec::new();
        for (gi, group) in table.groups.iter().enumerate() {
            let (mut gathered, mut groups) = (Vec::new(), Vec::new());
            gather(
                routing,
                |e| owners[e] == gi,
                x,
                h,
                &mut gathered,
                &mut groups,
            );
            if groups.is_empty() {
                continue;
            }
            let rows: usize = groups.iter().map(|g| g.1).sum();
            let req = ExpertRequest {
                layer: layer as u32,
                experts: groups
                    .iter()
                    .map(|&(e, n)| ExpertRows {
                        expert: e as u32,
                        rows: n as u32,
                    })
                    .collect(),
                input: Some(encode_f32_owned(gathered, &[rows, h])),
            };
            calls.push((gi, groups, group, req));
        }
        if self.caller.is_none() {
            *self.caller = Some(Caller::new()?);
        }
        let Some(caller) = self.caller.as_mut() else {
            return Err(Error::peer("expert caller", "not started"));
        };
        caller.follow(&table, r.max_message_bytes)?;
        let clients = &caller.clients;
        let (meta, futs): (Vec<_>, Vec<_>) = calls
            .into_iter()
            .map(|(gi, groups, group, req)| {
                ((gi, groups), r.call(group, req, self.timeout, clients))
            })
            .unzip();
        let waited = Instant::now();
        let results = caller.rt.block_on(join_all(futs));
        self.load.record_expert_wait(waited.elapsed());
        // Where each expert's rows are: (result, first row).
        let mut at = vec![None; routing.num_experts()];
        for (ri, ((_, groups), res)) in meta.iter().zip(&results).enumerate() {
            if let Err(e) = res {
                return Err(Error::peer(format!("layer {layer}"), e.to_string()));
            }
            let mut row = 0;
            for &(e, n) in groups {
                at[e] = Some((ri, row));
                row += n;
            }
        }
        out.fill(0.0);
        for (e, place) in at.iter().enumerate() {
            if let Some((ri, row)) = *place {
                let n = routing.for_expert(e).len();
                if let Ok(down) = &results[ri] {
                    scatter_add(routing, e, &down[row * h..(row + n) * h], h, out);
                }
            }
        }
        Ok(())
    }
}

/// Counts routed tokens for the local path too.
struct CountingExperts<'a> {
    inner: LocalExperts<'a>,
    load: &'a LoadCounters,
}

impl ExpertCompute for CountingExperts<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        self.load
            .record_experts(layer, routing.counts().enumerate());
        self.inner.compute(layer, routing, x, out)
    }
}

// ---------------------------------------------------------------------------------------------
// The stage.

struct Core {
    model: Arc<Model>,
    info: ShardInfo,
    caches: Mutex<HashMap<u64, KvCache>>,
    /// When each cached sequence last finished a micro-batch.
    last_used: Mutex<HashMap<u64, Instant>>,
    experts: Option<Arc<ExpertRouter>>,
    load: LoadCounters,
    expert_timeout: Duration,
    max_sequences: usize,
    is_last: bool,
    next: Option<(String, StageClient<Channel>)>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<(Scratch, MoeScratch)> = Default::default();
}

fn fwd_error(id: u64, status: &Status) -> ForwardResponse {
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
                    Err(Status::internal("the stage's computation panicked"))
                });
                let _ = done.send((msg, result));
            }
        })?;
    Ok(tx)
}

impl Core {
    /// Runs a micro-batch through this stage's layers; returns the hidden states of every
    /// row, or (last stage) of each sequence's last row.
    fn run(&self, req: &ForwardRequest, caller: &mut Option<Caller>) -> Result<Vec<f32>, Status> {
        let cfg = self.model.config();
        let h = cfg.hidden_size;
        if req.seqs.is_empty() {
            return Err(Status::invalid_argument("seqs: empty micro-batch"));
        }
        let mut chunks = Vec::with_capacity(req.seqs.len());
        let mut seen = HashSet::new();
        for s in &req.seqs {
            if s.len == 0 {
                return Err(Status::invalid_argument(format!(
                    "seqs: sequence {} has len 0",
                    s.seq_id
                )));
            }
            if !seen.insert(s.seq_id) {
                return Err(Status::invalid_argument(format!(
                    "seqs: sequence {} appears twice",
                    s.seq_id
                )));
            }
            chunks.push(Chunk {
                start: s.start as usize,
                len: s.len as usize,
            });
        }
        let rows: usize = chunks.iter().map(|c| c.len).sum();
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
        let mut caches = Vec::with_capacity(req.seqs.len());
        {
            let mut map = self
                .caches
                .lock()
                .map_err(|_| Status::internal("cache lock poisoned"))?;
            let new = req
                .seqs
                .iter()
                .filter(|s| s.start == 0 && !map.contains_key(&s.seq_id))
                .count();
            if map.len() + new > self.max_sequences {
                return Err(Status::resource_exhausted(format!(
                    "{} sequences hold KV caches; the limit is {}",
                    map.len(),
                    self.max_sequences
                )));
            }
            for s in &req.seqs {
                let cache = if s.start == 0 {
                    let cap = (s.capacity as usize)
                        .max(s.len as usize)
                        .min(cfg.max_position_embeddings);
                    map.remove(&s.seq_id);
                    Some(self.model.new_cache(cap))
                } else {
                    map.remove(&s.seq_id)
                };
                match cache {
                    Some(c) if c.len() == s.start as usize => caches.push((s.seq_id, c)),
                    Some(c) => {
                        // Put back what was taken; this batch does not run.
                        map.insert(s.seq_id, c);
                        for (id, c) in caches.drain(..) {
                            map.insert(id, c);
                        }
                        return Err(Status::failed_precondition(format!(
                            "sequence {} starts at {} but this stage has {} positions cached",
                            s.seq_id,
                            s.start,
                            map.get(&s.seq_id).map_or(0, KvCache::len)
                        )));
                    }
                    None => {
                        for (id, c) in caches.drain(..) {
                            map.insert(id, c);
                        }
                        return Err(Status::failed_precondition(format!(
                            "sequence {} has no KV cache on stage {} (released, or the stage restarted)",
                            s.seq_id, self.info.index
                        )));
                    }
                }
            }
        }
        let started = Instant::now();
        let timeout = remaining(req.deadline_unix_ms).unwrap_or(self.expert_timeout);
        let result = BUFFERS.with_borrow_mut(|(scratch, moe)| {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().map(|(_, c)| c).collect();
            match &self.experts {
                Some(router) => {
                    let mut ex = RemoteExperts {
                        router,
                        caller,
                        timeout,
                        load: &self.load,
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
            return Err(to_status(e));
        }
        self.load.record_batch(rows, started.elapsed());
        if let (Ok(mut map), Ok(mut used)) = (self.caches.lock(), self.last_used.lock()) {
            let now = Instant::now();
            for (id, c) in caches {
                map.insert(id, c);
                used.insert(id, now);
            }
        }
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

/// The open stream to the next stage, and the micro-batches awaiting its answer.
struct Downstream {
    tx: mpsc::Sender<ForwardRequest>,
    pending: Arc<Mutex<HashSet<u64>>>,
    alive: Arc<AtomicBool>,
}

impl Downstream {
    async fn open(
        name: &str,
        client: &StageClient<Channel>,
        upstream: mpsc::Sender<Result<ForwardResponse, Status>>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let mut client = client.clone();
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            client.forward(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| Status::unavailable(format!("{name}: no answer when opening the stream")))?
        .map_err(|s| Status::unavailable(format!("{name}: {}", s.message())))?;
        let mut inbound = opened.into_inner();
        let pending: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (p, a, name) = (pending.clone(), alive.clone(), name.to_string());
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        if let Ok(mut p) = p.lock() {
                            p.remove(&resp.micro_batch_id);
                        }
                        if upstream.send(Ok(resp)).await.is_err() {
                            break "upstream closed".to_string();
                        }
                    }
                    Ok(None) => break "stream ended".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            a.store(false, Ordering::SeqCst);
            let lost: Vec<u64> = p
                .lock()
                .map(|mut p| p.drain().collect())
                .unwrap_or_default();
            for id in lost {
                let status = Status::unavailable(format!("{name}: {why}"));
                let _ = upstream.send(Ok(fwd_error(id, &status))).await;
            }
        });
        Ok(Self { tx, pending, alive })
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let core = self.core.clone();
        tokio::spawn(async move {
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
                let tensor = encode_f32_owned(hidden, &[rows, h]);
                let Some((next_name, client)) = &core.next else {
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
                    match Downstream::open(next_name, client, tx.clone()).await {
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
        let mut released = 0;
        if let (Ok(mut map), Ok(mut used)) = (self.core.caches.lock(), self.core.last_used.lock()) {
            for id in &request.get_ref().seq_ids {
                used.remove(id);
                released += u32::from(map.remove(id).is_some());
            }
        }
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
        let active = self.core.caches.lock().map(|m| m.len() as u32).unwrap_or(0);
        Ok(Response::new(
            self.core.load.snapshot(request.get_ref().reset, active),
        ))
    }
}

/// Frees KV caches that no micro-batch has used for `idle` (sequences in flight are not in
/// the map, so they are never evicted mid-batch).
async fn evict_idle(core: Arc<Core>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        let (Ok(mut map), Ok(mut used)) = (core.caches.lock(), core.last_used.lock()) else {
            continue;
        };
        let stale: Vec<u64> = used
            .iter()
            .filter(|(_, t)| t.elapsed() >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            used.remove(id);
            map.remove(id);
        }
        if !stale.is_empty() {
            tracing::info!(evicted = stale.len(), "freed idle KV caches");
        }
    }
}

pub async fn run(args: StageArgs) -> Result<()> {
    let listener = bind(args.part.server.listen, "stage").await?;
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
    let model = tokio::task::spawn_blocking(move || load_with_progress(src.as_ref(), spec))
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
            StageClient::new(discovery::channel(addr)?)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )),
        None => None,
    };
    let model = Arc::new(model);
    let info = shard_info(&model, Role::Stage, args.part.index, &name);
    let core = Arc::new(Core {
        model,
        info,
        caches: Mutex::default(),
        last_used: Mutex::default(),
        experts,
        load: LoadCounters::default(),
        expert_timeout: Duration::from_millis(args.expert_timeout_ms),
        max_sequences: args.max_sequences,
        is_last,
        next,
    });
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
    let routes = tonic::service::Routes::new(health).add_service(service);
    super::serve_grpc("stage", routes, listener, &args.part.server, reporter).await
}
