//! Expert dispatch: which shard computes each (layer, expert) of a stage's layers, following
//! the expert processes as they come and go; the choice among a shard's replicas; and the
//! calls themselves, driven from a stage's compute thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use moe_proto::compute::ComputeClient;
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::{DescribeRequest, ExpertRequest, ExpertRows, ShardInfo};
use moe_proto::{WireDtype, encode};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::error::{Error, Result};
use crate::model::{ExpertCompute, LocalExperts, Model, Routing, gather, scatter_add};
use crate::serve::{LoadCounters, channel};

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
pub(super) struct RemoteExperts<'a> {
    pub(super) router: &'a ExpertRouter,
    pub(super) caller: &'a mut Option<Caller>,
    pub(super) timeout: Duration,
    pub(super) load: &'a LoadCounters,
    pub(super) wire: WireDtype,
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
                input: Some(encode(gathered, &[rows, h], self.wire)),
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
pub(super) struct CountingExperts<'a> {
    pub(super) inner: LocalExperts<'a>,
    pub(super) load: &'a LoadCounters,
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
