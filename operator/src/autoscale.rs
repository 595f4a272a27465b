//! Expert autoscaling: replicas per expert shard from the routed-token load the gateway
//! reports (`GET /v1/stats`), in the spirit of DeepSeek's EPLB redundant experts.
//!
//! The policy is pure ([`allocate`], [`decide`], [`State`]) so that every property is tested
//! without a cluster:
//! - **load**: tokens/s per shard (the sum over its (layer, expert) pairs), from the difference
//!   of two cumulative samples ([`shard_rates`]; the operator never resets the counters),
//!   smoothed by an exponentially weighted moving average with a time constant;
//! - **allocation**: every shard starts at `max(minReplicas, 1)`; each extra replica goes to the
//!   shard with the highest load per replica, until the budget is used or every shard has what
//!   its load needs at the target (`ceil(load / target)`) or its maximum. Without a target the
//!   whole budget is handed out, which minimises the busiest replica's load;
//! - **stability**: a scale-up applies at once; a scale-down applies only to the highest
//!   recommendation seen within the stabilisation window (as the HPA does), so a shard shrinks
//!   only after its load has stayed low for the whole window; a cooldown separates changes;
//!   the budget is re-checked after stabilisation (scale-ups wait for held replicas to go).
//!
//! [`run`] is the operator's side: a background task that samples every deployment's gateways
//! (their serving counters go to [`crate::performance`]), decides for the autoscaled ones, keeps
//! the decision in a [`Store`] keyed by the object's uid, and asks the controller to reconcile
//! when it changed. Reconcile applies it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store as Reader;
use kube::{Client, ResourceExt};
use moe_plan::ExpertShardPlan;
use tracing::{debug, info, warn};

use crate::crd::{AutoscalingDriver, ExpertsSpec, MoEDeployment};
use crate::resources::{HTTP_PORT, LABEL_DEPLOYMENT, LABEL_ROLE, WorkerRole};
use crate::{performance, planning};

/// What one decision is given about one expert shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardLoad {
    /// Smoothed routed tokens per second.
    pub tokens_per_second: f64,
    /// Replicas it has now.
    pub current: i32,
    pub min: i32,
    pub max: i32,
}

/// The knobs of the policy (from `spec.experts`).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Tokens/s one replica should serve; `None`: hand out the whole budget by load.
    pub target_per_replica: Option<f64>,
    /// The most replicas, all shards together.
    pub budget: i32,
    pub stabilization_s: f64,
    pub cooldown_s: f64,
}

impl Params {
    /// From the spec; the budget defaults to every shard at `maxReplicas`.
    pub fn from_spec(e: &ExpertsSpec, shards: usize) -> Self {
        let a = &e.autoscaling;
        let (_, hi) = bounds(e.min_replicas, e.max_replicas);
        let all_max = i32::try_from(shards).unwrap_or(i32::MAX).saturating_mul(hi);
        Self {
            target_per_replica: a
                .target_tokens_per_second_per_replica
                .filter(|t| *t > 0)
                .map(f64::from),
            budget: a.total_replica_budget.unwrap_or(all_max),
            stabilization_s: f64::from(a.scale_down_stabilization_seconds.max(0)),
            cooldown_s: f64::from(a.cooldown_seconds.max(0)),
        }
    }
}

/// A shard's effective (lowest, highest) replicas: at least one, and max never below min.
pub fn bounds(min: i32, max: i32) -> (i32, i32) {
    let lo = min.max(1);
    (lo, max.max(lo))
}

fn clean(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// Greedy proportional allocation: every shard starts at `lo`; each further replica goes to the
/// shard with the highest load per replica that still wants one (below `ceil(load / target)`,
/// or with any load when there is no target) and is below `hi`, until `budget` is reached.
/// Ties go to the lower shard index. When the lows alone exceed the budget, the lows win.
pub fn allocate(
    loads: &[f64],
    lo: &[i32],
    hi: &[i32],
    budget: i32,
    target: Option<f64>,
) -> Vec<i32> {
    let mut r: Vec<i32> = lo.to_vec();
    let cap: Vec<i32> = loads
        .iter()
        .zip(lo.iter().zip(hi))
        .map(|(&l, (&lo, &hi))| match target {
            Some(t) if t > 0.0 => {
                let need = (clean(l) / t).ceil().min(f64::from(i32::MAX)) as i32;
                need.clamp(lo, hi)
            }
            _ => hi,
        })
        .collect();
    let mut total: i64 = r.iter().map(|&x| i64::from(x)).sum();
    while total < i64::from(budget) {
        let mut best: Option<(usize, f64)> = None;
        for (j, &l) in loads.iter().enumerate() {
            let l = clean(l);
            if r[j] >= cap[j] || l <= 0.0 {
                continue;
            }
            let per = l / f64::from(r[j]);
            if best.is_none_or(|(_, b)| per > b) {
                best = Some((j, per));
            }
        }
        let Some((j, _)) = best else { break };
        r[j] += 1;
        total += 1;
    }
    r
}

/// The busiest replica's load over the mean load per replica (1 = perfectly balanced);
/// 1 when there is no load.
pub fn imbalance(loads: &[f64], replicas: &[i32]) -> f64 {
    let total: f64 = loads.iter().copied().map(clean).sum();
    let n: i64 = replicas.iter().map(|&r| i64::from(r.max(1))).sum();
    if total <= 0.0 || n == 0 {
        return 1.0;
    }
    let max = loads
        .iter()
        .zip(replicas)
        .map(|(&l, &r)| clean(l) / f64::from(r.max(1)))
        .fold(0.0, f64::max);
    max / (total / n as f64)
}

/// Whether the autoscaler has no replica left to give: the budget is used, or every shard
/// whose load per replica is above the mean already has `max` replicas (more imbalance then
/// cannot be scaled away).
pub fn at_budget(p: &Params, loads: &[f64], replicas: &[i32], max: i32) -> bool {
    let used: i64 = replicas.iter().map(|&r| i64::from(r)).sum();
    if used >= i64::from(p.budget) {
        return true;
    }
    let total: f64 = loads.iter().copied().map(clean).sum();
    let n: i64 = replicas.iter().map(|&r| i64::from(r.max(1))).sum();
    if total <= 0.0 || n == 0 {
        return false;
    }
    let mean = total / n as f64;
    loads
        .iter()
        .zip(replicas)
        .filter(|&(&l, &r)| clean(l) / f64::from(r.max(1)) > mean)
        .all(|(_, &r)| r >= max)
}

/// What the policy remembers between decisions.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// EWMA of each shard's tokens/s.
    pub smoothed: Vec<f64>,
    last_smoothed: Option<f64>,
    /// When replicas last changed (seconds on the caller's clock).
    pub last_scale: Option<f64>,
    /// Recommendations within the stabilisation window, oldest first.
    history: VecDeque<(f64, Vec<i32>)>,
}

impl State {
    /// Folds one sample of per-shard rates into the moving average with time constant `tau_s`
    /// (the first sample is taken as is); returns the smoothed loads.
    pub fn smooth(&mut self, now: f64, rates: &[f64], tau_s: f64) -> &[f64] {
        let fresh = self.smoothed.len() != rates.len() || self.last_smoothed.is_none();
        if fresh {
            self.smoothed = rates.iter().copied().map(clean).collect();
        } else {
            let dt = (now - self.last_smoothed.unwrap_or(now)).max(0.0);
            let alpha = if tau_s > 0.0 {
                1.0 - (-dt / tau_s).exp()
            } else {
                1.0
            };
            for (s, &r) in self.smoothed.iter_mut().zip(rates) {
                *s += alpha * (clean(r) - *s);
            }
        }
        self.last_smoothed = Some(now);
        &self.smoothed
    }
}

/// One decision: replicas per shard and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: Vec<i32>,
    /// What the load alone asks for, before stabilisation, budget and cooldown.
    pub recommended: Vec<i32>,
    /// (shard, from, to) for every shard whose replicas change.
    pub changes: Vec<(usize, i32, i32)>,
    pub reason: String,
}

impl Decision {
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Decides the replicas of every shard at time `now` (seconds, any monotonic clock).
pub fn decide(p: &Params, shards: &[ShardLoad], state: &mut State, now: f64) -> Decision {
    let n = shards.len();
    let (lo, hi): (Vec<i32>, Vec<i32>) = shards.iter().map(|s| bounds(s.min, s.max)).unzip();
    let loads: Vec<f64> = shards.iter().map(|s| clean(s.tokens_per_second)).collect();
    // Replicas outside the bounds (the spec changed) are brought inside at once.
    let cur: Vec<i32> = shards
        .iter()
        .zip(lo.iter().zip(&hi))
        .map(|(s, (&lo, &hi))| s.current.clamp(lo, hi))
        .collect();
    let rec = allocate(&loads, &lo, &hi, p.budget, p.target_per_replica);

    if state.history.front().is_some_and(|(_, h)| h.len() != n) {
        state.history.clear();
    }
    // Until a whole window has been seen, what runs now counts as a recommendation: a fresh
    // operator does not shrink anything before it has watched the load for the window.
    if state.history.is_empty() {
        state.history.push_back((now, cur.clone()));
    }
    state.history.push_back((now, rec.clone()));
    while state
        .history
        .front()
        .is_some_and(|(t, _)| *t < now - p.stabilization_s)
        && state.history.len() > 1
    {
        state.history.pop_front();
    }

    let mut want: Vec<i32> = (0..n)
        .map(|j| {
            if rec[j] >= cur[j] {
                rec[j]
            } else {
                let held = state
                    .history
                    .iter()
                    .map(|(_, h)| h[j])
                    .max()
                    .unwrap_or(rec[j]);
                held.clamp(rec[j], cur[j])
            }
        })
        .collect();
    // The budget holds after stabilisation: scale-ups give way first, then the shards with the
    // least load per remaining replica.
    let ceiling = i64::from(p.budget).max(lo.iter().map(|&x| i64::from(x)).sum());
    let mut trimmed = false;
    while want.iter().map(|&x| i64::from(x)).sum::<i64>() > ceiling {
        let pick = (0..n).filter(|&j| want[j] > lo[j]).min_by(|&a, &b| {
            let key = |j: usize| (want[j] <= cur[j], loads[j] / f64::from(want[j] - 1));
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
        });
        let Some(j) = pick else { break };
        want[j] -= 1;
        trimmed = true;
    }

    let total_load: f64 = loads.iter().sum();
    let mut why = format!(
        "load {} tok/s; max/mean per replica {:.2}",
        fmt_rate(total_load),
        imbalance(&loads, &cur)
    );
    let bounds_only: Vec<i32> = shards.iter().map(|s| s.current).collect();
    let forced = bounds_only != cur;
    let cooling = state
        .last_scale
        .map(|t| p.cooldown_s - (now - t))
        .filter(|left| *left > 0.0);
    let desired = match cooling {
        Some(left) if want != cur => {
            let _ = write!(
                why,
                "; held {left:.0}s more by the cooldown (wants {want:?})"
            );
            cur.clone()
        }
        _ => want,
    };
    let changes: Vec<(usize, i32, i32)> = (0..n)
        .filter(|&j| desired[j] != shards[j].current)
        .map(|j| (j, shards[j].current, desired[j]))
        .collect();
    if !changes.is_empty() {
        let parts: Vec<String> = changes
            .iter()
            .map(|&(j, from, to)| {
                let per = loads[j] / f64::from(from.max(1));
                format!(
                    "shard {j} {from}→{to} ({} tok/s, {} per replica)",
                    fmt_rate(loads[j]),
                    fmt_rate(per)
                )
            })
            .collect();
        let mut head = parts.join(", ");
        let _ = write!(
            head,
            "; max/mean per replica {:.2}→{:.2}",
            imbalance(&loads, &cur),
            imbalance(&loads, &desired)
        );
        if let Some(t) = p.target_per_replica {
            let _ = write!(head, "; target {} tok/s per replica", fmt_rate(t));
        }
        let _ = write!(head, "; {} tok/s in all", fmt_rate(total_load));
        if forced && changes.iter().all(|&(j, ..)| shards[j].current != cur[j]) {
            head.push_str("; replicas brought within min/max");
        }
        why = head;
        state.last_scale = Some(now);
    } else if rec != cur {
        if rec.iter().zip(&cur).any(|(r, c)| r < c) && cooling.is_none() {
            let _ = write!(
                why,
                "; scale-down held by the {:.0}s stabilisation window",
                p.stabilization_s
            );
        }
        if trimmed {
            why.push_str("; scale-up waits for the replica budget");
        }
    } else {
        why.push_str("; steady");
    }
    Decision {
        desired,
        recommended: rec,
        changes,
        reason: why,
    }
}

/// Cumulative routed tokens per (layer, expert), as `/v1/stats` reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Seconds on the caller's clock.
    pub at: f64,
    pub tokens: BTreeMap<(u32, u32), u64>,
}

/// The counters of a `/v1/stats` answer; `None` when a stage did not answer (a partial sum
/// would look like a load drop).
pub fn parse_stats(v: &serde_json::Value, at: f64) -> Option<Sample> {
    let stages = v.get("stages")?.as_array()?;
    if stages.iter().any(|s| s.get("error").is_some()) {
        return None;
    }
    let mut tokens = BTreeMap::new();
    for e in v.get("experts")?.as_array()? {
        let layer = u32::try_from(e.get("layer")?.as_u64()?).ok()?;
        let expert = u32::try_from(e.get("expert")?.as_u64()?).ok()?;
        *tokens.entry((layer, expert)).or_default() += e.get("tokens")?.as_u64()?;
    }
    Some(Sample { at, tokens })
}

/// Tokens/s per shard between two samples. A counter that went down (a stage restarted, or
/// someone read the stats with `reset`) counts from zero.
pub fn shard_rates(shards: &[ExpertShardPlan], prev: &Sample, cur: &Sample) -> Option<Vec<f64>> {
    let dt = cur.at - prev.at;
    if dt <= 0.0 {
        return None;
    }
    let mut out = vec![0.0; shards.len()];
    for (&(layer, expert), &now) in &cur.tokens {
        let before = prev.tokens.get(&(layer, expert)).copied().unwrap_or(0);
        let delta = if now >= before { now - before } else { now };
        if let Some(j) = shards
            .iter()
            .position(|s| s.owns(layer as usize, expert as usize))
        {
            out[j] += delta as f64 / dt;
        }
    }
    Some(out)
}

/// The decision reconcile applies, and what status shows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub desired: Vec<i32>,
    /// Smoothed tokens/s per shard the decision saw.
    pub tokens_per_second: Vec<f64>,
    pub reason: String,
    /// The last change, and why.
    pub last_scale_time: Option<Timestamp>,
    pub last_change: Option<String>,
    /// (shard, from, to) of the last change.
    pub last_changes: Vec<(usize, i32, i32)>,
    /// The gateway pod read.
    pub source: String,
}

#[derive(Debug, Default)]
struct Entry {
    state: State,
    last: Option<Sample>,
    published: Option<Published>,
    last_trigger: Option<f64>,
}

/// Decisions per `MoEDeployment` uid, shared by the sampling task and reconcile.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<HashMap<String, Entry>>,
}

impl Store {
    pub fn decision(&self, uid: &str) -> Option<Published> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(uid).and_then(|e| e.published.clone())
    }

    /// Sets a decision directly (tests, or a caller that computes its own).
    pub fn publish(&self, uid: &str, p: Published) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(uid.to_string()).or_default().published = Some(p);
    }

    fn retain(&self, keep: &[String]) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| keep.contains(k));
    }
}

/// Whether the operator itself moves this deployment's expert replicas.
pub fn operator_driven(md: &MoEDeployment) -> bool {
    let a = &md.spec.experts.autoscaling;
    a.enabled && a.driver == AutoscalingDriver::Operator
}

/// How the sampling task runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub interval: Duration,
    /// Time constant of the load's moving average.
    pub smoothing: Duration,
    /// Timeout of one `/v1/stats` request.
    pub timeout: Duration,
    /// A reconcile is asked for at least this often (to refresh status) even without a change.
    pub refresh: Duration,
    /// How the gateways' serving counters are measured and judged (`status.performance`).
    pub performance: performance::Config,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            smoothing: Duration::from_secs(20),
            timeout: Duration::from_secs(3),
            refresh: Duration::from_secs(60),
            performance: performance::Config::default(),
        }
    }
}

/// The ready, not terminating gateway pods of `md` as (name, IP), by name (so the autoscaler
/// reads the same pod, the first, while it lives).
async fn gateway_pods(
    client: &Client,
    md: &MoEDeployment,
) -> Result<Vec<(String, String)>, String> {
    let ns = md.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels(&format!(
        "{LABEL_DEPLOYMENT}={},{LABEL_ROLE}={}",
        md.name_any(),
        WorkerRole::Gateway.as_str()
    ));
    let mut list = pods
        .list(&lp)
        .await
        .map_err(|e| format!("listing gateway pods: {e}"))?
        .items;
    list.sort_by_key(|p| p.name_any());
    let ready: Vec<(String, String)> = list
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ready = st
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = st.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            ready.then(|| (p.name_any(), ip))
        })
        .collect();
    if ready.is_empty() {
        return Err("no ready gateway pod".to_string());
    }
    Ok(ready)
}

/// The gateway's API key, when the spec names one (the gateway then wants it for /v1/stats).
async fn api_key(client: &Client, md: &MoEDeployment) -> Result<Option<String>, String> {
    let Some(r) = &md.spec.serving.api_key_secret else {
        return Ok(None);
    };
    let ns = md.namespace().unwrap_or_default();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let s = secrets
        .get(&r.name)
        .await
        .map_err(|e| format!("reading the API key Secret {}: {e}", r.name))?;
    let key = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .or_else(|| s.string_data.as_ref().and_then(|d| d.get(&r.key)).cloned())
        .ok_or_else(|| format!("Secret {} has no key {}", r.name, r.key))?;
    Ok(Some(key))
}

fn host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// `/v1/stats` of every ready gateway pod of `md`, by pod name: each answer or why it failed.
async fn read_gateways(
    client: &Client,
    http: &reqwest::Client,
    md: &MoEDeployment,
    cfg: &LoopConfig,
) -> Result<Vec<(String, Result<serde_json::Value, String>)>, String> {
    let pods = gateway_pods(client, md).await?;
    let key = api_key(client, md).await?;
    let mut out = Vec::with_capacity(pods.len());
    for (pod, ip) in pods {
        let url = format!("http://{}:{HTTP_PORT}/v1/stats", host(&ip));
        let mut get = http.get(&url).timeout(cfg.timeout);
        if let Some(key) = &key {
            get = get.bearer_auth(key);
        }
        let body = async {
            get.send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| format!("GET {url}: {e}"))?
                .json::<serde_json::Value>()
                .await
                .map_err(|e| format!("GET {url}: {e}"))
        }
        .await;
        out.push((pod, body));
    }
    Ok(out)
}

/// One sample and decision for `md` from `body`, pod `pod`'s `/v1/stats`; returns whether
/// reconcile should run.
fn tick(
    store: &Store,
    md: &MoEDeployment,
    cfg: &LoopConfig,
    now: f64,
    pod: String,
    body: &serde_json::Value,
) -> Result<bool, String> {
    let uid = md.uid().ok_or("no uid")?;
    let plan = planning::plan(&md.spec).map_err(|e| e.to_string())?;
    let n = plan.expert_shards.len();
    if n == 0 {
        return Ok(false);
    }
    let layouts: Vec<ExpertShardPlan> = plan
        .expert_shards
        .iter()
        .map(|s| s.layout.clone())
        .collect();
    let sample = parse_stats(body, now)
        .ok_or_else(|| format!("{pod}'s /v1/stats: incomplete statistics"))?;

    let e = &md.spec.experts;
    let params = Params::from_spec(e, n);
    let status_replicas: Vec<i32> = md
        .status
        .as_ref()
        .map(|s| s.expert_shard_status.iter().map(|x| x.replicas).collect())
        .unwrap_or_default();

    let mut map = store.inner.lock().unwrap_or_else(|e| e.into_inner());
    let entry = map.entry(uid).or_default();
    let prev = entry.last.replace(sample.clone());
    let Some(prev) = prev else { return Ok(false) };
    let Some(rates) = shard_rates(&layouts, &prev, &sample) else {
        return Ok(false);
    };
    let loads = entry
        .state
        .smooth(now, &rates, cfg.smoothing.as_secs_f64())
        .to_vec();
    let current: Vec<i32> = match &entry.published {
        Some(p) if p.desired.len() == n => p.desired.clone(),
        _ if status_replicas.len() == n => status_replicas,
        _ => vec![e.min_replicas; n],
    };
    let input: Vec<ShardLoad> = (0..n)
        .map(|j| ShardLoad {
            tokens_per_second: loads[j],
            current: current[j],
            min: e.min_replicas,
            max: e.max_replicas,
        })
        .collect();
    let d = decide(&params, &input, &mut entry.state, now);
    let old = entry.published.take();
    let changed = d.changed();
    if changed {
        info!(name = %md.name_any(), reason = %d.reason, "expert replicas change");
    } else {
        debug!(name = %md.name_any(), reason = %d.reason, "expert replicas kept");
    }
    let (last_scale_time, last_change, last_changes) = match (&old, changed) {
        (_, true) => (
            Some(Timestamp::now()),
            Some(d.reason.clone()),
            d.changes.clone(),
        ),
        (Some(o), false) => (
            o.last_scale_time,
            o.last_change.clone(),
            o.last_changes.clone(),
        ),
        (None, false) => (None, None, Vec::new()),
    };
    entry.published = Some(Published {
        desired: d.desired,
        tokens_per_second: loads,
        reason: d.reason,
        last_scale_time,
        last_change,
        last_changes,
        source: pod,
    });
    let stale = entry
        .last_trigger
        .is_none_or(|t| now - t >= cfg.refresh.as_secs_f64());
    let first = old.is_none();
    let trigger = changed || stale || first;
    if trigger {
        entry.last_trigger = Some(now);
    }
    Ok(trigger)
}

/// The sampling task: every `cfg.interval`, the ready gateway pods of each deployment in `mds`
/// are read (`/v1/stats`): their serving counters measure it (`status.performance`, all
/// gateways), and for operator-driven expert autoscaling the first pod's routed-token counters
/// are decided on. `trigger` gets one message per round in which some deployment needs a
/// reconcile (kube-runtime's per-object `reconcile_on` is still behind an unstable feature, so
/// the controller reconciles every object then; unchanged ones apply nothing new).
pub async fn run(
    client: Client,
    mds: Reader<MoEDeployment>,
    store: Arc<Store>,
    measured: Arc<performance::Store>,
    trigger: futures::channel::mpsc::UnboundedSender<()>,
    cfg: LoopConfig,
) {
    let http = match reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "expert autoscaling and performance measurement disabled: no HTTP client");
            return;
        }
    };
    let epoch = Instant::now();
    let mut warned: HashMap<String, String> = HashMap::new();
    let mut unread: HashMap<String, String> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let all = mds.state();
        let mut keep = Vec::new();
        let mut driven = Vec::new();
        let mut wanted = false;
        for md in all.iter() {
            let Some(uid) = md.uid() else { continue };
            keep.push(uid.clone());
            if md.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let now = epoch.elapsed().as_secs_f64();
            let reads = read_gateways(&client, &http, md, &cfg).await;

            // What the gateways measure: every pod that answered.
            let readings = match &reads {
                Err(e) => Err(e.clone()),
                Ok(answers) => {
                    let (mut ok, mut errors) = (Vec::new(), Vec::new());
                    for (pod, body) in answers {
                        match body
                            .as_ref()
                            .map_err(Clone::clone)
                            .and_then(performance::parse_gateway)
                        {
                            Ok(r) => ok.push((pod.clone(), r)),
                            Err(e) => errors.push(format!("{pod}: {e}")),
                        }
                    }
                    if ok.is_empty() {
                        Err(errors.join("; "))
                    } else {
                        if !errors.is_empty() {
                            debug!(name = %md.name_any(), errors = %errors.join("; "), "some gateways not read");
                        }
                        Ok(ok)
                    }
                }
            };
            match &readings {
                Err(e) if unread.get(&uid) != Some(e) => {
                    info!(name = %md.name_any(), error = %e, "gateway statistics not read");
                    unread.insert(uid.clone(), e.clone());
                }
                Err(_) => {}
                Ok(_) => {
                    unread.remove(&uid);
                }
            }
            if measured.observe(
                &uid,
                performance::current_estimate(md),
                performance::shown_judgement(md),
                readings,
                now,
                Timestamp::now(),
                &cfg.performance,
                cfg.refresh.as_secs_f64(),
            ) {
                wanted = true;
            }

            if !operator_driven(md) {
                continue;
            }
            driven.push(uid.clone());
            let decided = reads.and_then(|mut answers| {
                if answers.is_empty() {
                    return Err("no ready gateway pod".to_string());
                }
                let (pod, body) = answers.swap_remove(0);
                tick(&store, md, &cfg, now, pod, &body?)
            });
            match decided {
                Ok(true) => {
                    warned.remove(&uid);
                    wanted = true;
                }
                Ok(false) => {
                    warned.remove(&uid);
                }
                Err(e) => {
                    // Once per distinct error, so an unready deployment does not flood logs.
                    if warned.get(&uid) != Some(&e) {
                        warn!(name = %md.name_any(), error = %e, "expert autoscaling: no sample");
                        warned.insert(uid.clone(), e);
                    }
                }
            }
        }
        if wanted {
            let _ = trigger.unbounded_send(());
        }
        store.retain(&driven);
        measured.retain(&keep);
        warned.retain(|k, _| driven.contains(k));
        unread.retain(|k, _| keep.contains(k));
    }
}
