//! Status shows the performance model's estimate next to what the deployment measures
//! (`status.performance`, condition `PerformanceAsPlanned`), so a user sees when reality
//! departs from the plan.
//!
//! - **estimate**: `moe_plan::perf::estimate` for the plan, once per spec generation, on the
//!   hardware profile of `spec.placement.gpuProduct` ([`crate::cli::profile_for_product`]), at
//!   full micro-batches as the gateways run them (each gateway one lane per stage, at least
//!   two; `serving.maxConcurrentSequences` split over the lanes), 512-token prompts and 256
//!   generated tokens (as `plan --estimate`). No profile: a message instead of figures.
//! - **measured**: every ready gateway pod's `/v1/stats` serving counters (generated tokens,
//!   count and sum of the times to first token and per output token), read by the operator's
//!   sampling task; differences over a window ([`Window`]); kept as they were while nothing was
//!   generated or the gateways cannot be read (the read error and since when are shown).
//! - **departure**: measured over estimated; time per output token above `tolerance` × the
//!   estimate in every measurement for `sustain` makes `PerformanceAsPlanned` False with reason
//!   `SlowerThanPlanned` and a Warning Event ([`judge`]); one measurement within it makes it True.
//!
//! Everything but the reads is pure and unit-tested here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use moe_plan::SizedPlan;

use crate::crd::{
    MeasuredPerformance, MoEDeployment, MoEDeploymentStatus, PerformanceDeparture,
    PerformanceEstimate, PerformanceStatus, WireDType,
};

/// The condition's type.
pub const CONDITION: &str = "PerformanceAsPlanned";
/// Its reason when time per output token stayed above the tolerance.
pub const SLOWER: &str = "SlowerThanPlanned";

/// Tokens per request the estimate assumes (the spec does not say): `plan --estimate`'s.
pub const PROMPT_TOKENS: usize = 512;
pub const OUTPUT_TOKENS: usize = 256;

/// How measurements are taken and judged (operator flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The counters' differences are taken over at least this long (once that much history
    /// exists).
    pub window: Duration,
    /// Measured time per output token above this many times the estimate is slower than planned.
    pub tolerance: f64,
    /// ... once every measurement has been above it for this long.
    pub sustain: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            tolerance: 1.5,
            sustain: Duration::from_secs(300),
        }
    }
}

fn finite(x: f64) -> Option<f64> {
    (x.is_finite() && x >= 0.0).then_some(x)
}

/// `x` to `digits` significant digits (status stays readable and does not move on noise).
fn sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

fn int(x: usize) -> i32 {
    i32::try_from(x).unwrap_or(i32::MAX)
}

/// The estimate for `md` planned as `plan`, for its current generation.
pub fn estimate(md: &MoEDeployment, plan: &SizedPlan) -> PerformanceEstimate {
    use moe_plan::perf;
    let spec = &md.spec;
    let gateways = usize::try_from(spec.replicas).unwrap_or(1).max(1);
    let micro_batches = gateways.saturating_mul(plan.stages.len().max(2));
    let sequences = usize::try_from(spec.serving.max_concurrent_sequences).unwrap_or(1);
    let batch = (sequences / micro_batches).max(1);
    // Within the context the KV caches are sized for.
    let context = plan.model.max_position_embeddings.max(2);
    let prompt_tokens = PROMPT_TOKENS.min(context * 2 / 3).max(1);
    let output_tokens = OUTPUT_TOKENS.min(context - prompt_tokens).max(1);
    let mut out = PerformanceEstimate {
        observed_generation: md.metadata.generation.unwrap_or(0),
        hardware_profile: None,
        batch: int(batch),
        micro_batches: int(micro_batches),
        prompt_tokens: int(prompt_tokens),
        output_tokens: int(output_tokens),
        ..PerformanceEstimate::default()
    };
    let Some(hw) = crate::cli::profile_for_product(&spec.placement.gpu_product) else {
        let names: Vec<String> = perf::gpu_profiles().into_iter().map(|p| p.name).collect();
        out.message = Some(format!(
            "no hardware profile for spec.placement.gpuProduct `{}` (profiles: {}): nothing to \
             compare the measurements with",
            spec.placement.gpu_product,
            names.join(", ")
        ));
        return out;
    };
    let layout = perf::Layout {
        expert_replicas: vec![
            usize::try_from(spec.experts.min_replicas.max(1)).unwrap_or(1);
            plan.expert_shards.len()
        ],
        micro_batches,
        wire_bytes: match spec.serving.wire_dtype {
            WireDType::Bf16 => 2,
            WireDType::F32 => 4,
        },
        across_nodes: true,
        ..Default::default()
    };
    let w = perf::Workload {
        batch,
        prompt_tokens,
        output_tokens,
        routing_skew: 0.0,
    };
    let e = perf::estimate(plan, &hw, &layout, &w);
    out.hardware_profile = Some(hw.name);
    let (ttft, tpot, tps) = (
        finite(e.time_to_first_token).filter(|x| *x > 0.0),
        finite(e.time_per_output_token).filter(|x| *x > 0.0),
        finite(e.tokens_per_second).filter(|x| *x > 0.0),
    );
    if ttft.is_none() || tpot.is_none() || tps.is_none() {
        out.message = Some(format!(
            "the performance model gave no usable figures for this plan (TTFT {}, TPOT {}, \
             {} tok/s)",
            e.time_to_first_token, e.time_per_output_token, e.tokens_per_second
        ));
        return out;
    }
    out.ttft_seconds = ttft.map(|x| sig(x, 4));
    out.tpot_seconds = tpot.map(|x| sig(x, 4));
    out.tokens_per_second = tps.map(|x| sig(x, 4));
    out
}

/// The serving counters of one gateway process (`/v1/stats`'s `gateway`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GatewayReading {
    /// The process; a new one counts from zero.
    pub instance: String,
    pub generated_tokens: u64,
    pub ttft_count: u64,
    pub ttft_sum: f64,
    pub tpot_count: u64,
    pub tpot_sum: f64,
}

/// The serving counters of a `/v1/stats` answer, or what is missing.
pub fn parse_gateway(v: &serde_json::Value) -> Result<GatewayReading, String> {
    let g = v
        .get("gateway")
        .ok_or("the statistics have no `gateway` object")?;
    let missing = |what: &str| {
        format!(
            "the gateway's statistics have no `{what}` (a worker image older than the operator?)"
        )
    };
    let count = |path: &[&str]| -> Result<u64, String> {
        let mut x = g;
        for p in path {
            x = x.get(*p).ok_or_else(|| missing(&path.join(".")))?;
        }
        x.as_u64().ok_or_else(|| missing(&path.join(".")))
    };
    let seconds = |path: &[&str]| -> Result<f64, String> {
        let mut x = g;
        for p in path {
            x = x.get(*p).ok_or_else(|| missing(&path.join(".")))?;
        }
        x.as_f64()
            .and_then(finite)
            .ok_or_else(|| missing(&path.join(".")))
    };
    Ok(GatewayReading {
        instance: g
            .get("instance")
            .and_then(|i| i.as_str())
            .ok_or_else(|| missing("instance"))?
            .to_string(),
        generated_tokens: count(&["generatedTokens"])?,
        ttft_count: count(&["timeToFirstToken", "count"])?,
        ttft_sum: seconds(&["timeToFirstToken", "sumSeconds"])?,
        tpot_count: count(&["timePerOutputToken", "count"])?,
        tpot_sum: seconds(&["timePerOutputToken", "sumSeconds"])?,
    })
}

/// What one window of readings gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Numbers {
    pub tokens_per_second: f64,
    pub ttft_seconds: Option<f64>,
    pub tpot_seconds: Option<f64>,
    pub generated_tokens: u64,
    pub window_seconds: f64,
    /// Gateway pods with two readings in the window.
    pub gateways: usize,
}

/// Recent readings of each gateway pod (seconds on the caller's monotonic clock).
#[derive(Debug, Default, Clone)]
pub struct Window {
    pods: BTreeMap<String, VecDeque<(f64, GatewayReading)>>,
}

impl Window {
    /// Adds one round of readings at `at`. Pods not read this round are forgotten; a pod whose
    /// process changed (another instance, or a counter went down) starts its history again.
    /// Each pod keeps the newest reading at least `span_s` old and every later one.
    pub fn record(&mut self, at: f64, readings: &[(String, GatewayReading)], span_s: f64) {
        self.pods
            .retain(|pod, _| readings.iter().any(|(p, _)| p == pod));
        for (pod, r) in readings {
            let h = self.pods.entry(pod.clone()).or_default();
            let restarted = h.back().is_some_and(|(_, last)| {
                last.instance != r.instance
                    || r.generated_tokens < last.generated_tokens
                    || r.ttft_count < last.ttft_count
                    || r.tpot_count < last.tpot_count
            });
            if restarted {
                h.clear();
            }
            if h.back().is_some_and(|(t, _)| at <= *t) {
                continue;
            }
            h.push_back((at, r.clone()));
            while h.len() > 1 && h[1].0 <= at - span_s {
                h.pop_front();
            }
        }
    }

    /// Rates and means from each pod's oldest kept reading to its newest, all pods together;
    /// `None` when no pod has two readings or nothing was generated between them.
    pub fn measure(&self) -> Option<Numbers> {
        let mut n = Numbers {
            tokens_per_second: 0.0,
            ttft_seconds: None,
            tpot_seconds: None,
            generated_tokens: 0,
            window_seconds: 0.0,
            gateways: 0,
        };
        let (mut ttft_n, mut ttft_s, mut tpot_n, mut tpot_s) = (0u64, 0.0, 0u64, 0.0);
        for h in self.pods.values() {
            let (Some((t0, a)), Some((t1, b))) = (h.front(), h.back()) else {
                continue;
            };
            let dt = t1 - t0;
            if dt <= 0.0 {
                continue;
            }
            let tokens = b.generated_tokens.saturating_sub(a.generated_tokens);
            n.generated_tokens += tokens;
            n.tokens_per_second += tokens as f64 / dt;
            n.window_seconds = n.window_seconds.max(dt);
            n.gateways += 1;
            ttft_n += b.ttft_count.saturating_sub(a.ttft_count);
            ttft_s += (b.ttft_sum - a.ttft_sum).max(0.0);
            tpot_n += b.tpot_count.saturating_sub(a.tpot_count);
            tpot_s += (b.tpot_sum - a.tpot_sum).max(0.0);
        }
        if n.gateways == 0 || n.generated_tokens == 0 {
            return None;
        }
        n.ttft_seconds = (ttft_n > 0).then(|| ttft_s / ttft_n as f64);
        n.tpot_seconds = (tpot_n > 0).then(|| tpot_s / tpot_n as f64);
        Some(n)
    }
}

/// The numbers as status shows them, measured at `now`.
pub fn measured(n: &Numbers, now: Timestamp) -> MeasuredPerformance {
    MeasuredPerformance {
        tokens_per_second: sig(n.tokens_per_second, 4),
        ttft_seconds: n.ttft_seconds.and_then(finite).map(|x| sig(x, 4)),
        tpot_seconds: n.tpot_seconds.and_then(finite).map(|x| sig(x, 4)),
        generated_tokens: i64::try_from(n.generated_tokens).unwrap_or(i64::MAX),
        window_seconds: sig(n.window_seconds, 4),
        gateways: int(n.gateways),
        sampled_at: Time(now),
    }
}

/// The `PerformanceAsPlanned` condition to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    fn new(status: &str, reason: &str, message: String) -> Self {
        Self {
            status: status.into(),
            reason: reason.into(),
            message,
        }
    }
}

/// A measurement judged against an estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub departure: PerformanceDeparture,
    pub verdict: Verdict,
}

/// `0.0123` → `12.3 ms`, `2.5` → `2.50 s`.
pub fn fmt_seconds(s: f64) -> String {
    if s < 1.0 {
        let ms = s * 1e3;
        if ms < 10.0 {
            format!("{ms:.2} ms")
        } else {
            format!("{ms:.1} ms")
        }
    } else {
        format!("{s:.2} s")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else if r >= 0.1 {
        format!("{r:.2}x").replace(".00x", "x")
    } else {
        format!("{r:.3}x")
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_span(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{:.1} h", s as f64 / 3600.0)
    }
}

fn seconds_between(a: Timestamp, b: Timestamp) -> f64 {
    (b.as_millisecond() - a.as_millisecond()) as f64 / 1e3
}

fn ratio(measured: Option<f64>, estimated: Option<f64>) -> Option<f64> {
    let (m, e) = (measured?, estimated?);
    let r = m / e;
    (e > 0.0 && r.is_finite()).then(|| sig(r, 3))
}

/// Judges measurement `m` against estimate `e`. `prev` is the judgement of the previous
/// measurement against the same estimate: it carries since when TPOT has been above the
/// tolerance, and what the condition said (a departure not yet sustained does not change it).
pub fn judge(
    e: &PerformanceEstimate,
    m: &MeasuredPerformance,
    prev: Option<&Judged>,
    cfg: &Config,
) -> Judged {
    let now = m.sampled_at.0;
    let prev_status = prev.map(|p| p.verdict.status.as_str());
    let Some(e_tpot) = e.tpot_seconds else {
        let why = e
            .message
            .clone()
            .unwrap_or_else(|| "the plan has no estimate".into());
        return Judged {
            departure: PerformanceDeparture {
                message: format!(
                    "{} tok/s measured; no estimate to compare with: {why}",
                    fmt_rate(m.tokens_per_second)
                ),
                ..PerformanceDeparture::default()
            },
            verdict: Verdict::new("Unknown", "NoEstimate", why),
        };
    };
    let hw = e.hardware_profile.as_deref().unwrap_or("?");
    let tpot_ratio = ratio(m.tpot_seconds, Some(e_tpot));
    let ttft_ratio = ratio(m.ttft_seconds, e.ttft_seconds);
    let tps_ratio = ratio(Some(m.tokens_per_second), e.tokens_per_second);

    let mut parts = Vec::new();
    if let (Some(r), Some(t)) = (tpot_ratio, m.tpot_seconds) {
        parts.push(format!(
            "TPOT {} the plan's estimate ({} measured vs {})",
            fmt_ratio(r),
            fmt_seconds(t),
            fmt_seconds(e_tpot)
        ));
    }
    if let (Some(r), Some(t), Some(et)) = (ttft_ratio, m.ttft_seconds, e.ttft_seconds) {
        parts.push(format!(
            "TTFT {} ({} vs {} for a {}-token prompt)",
            fmt_ratio(r),
            fmt_seconds(t),
            fmt_seconds(et),
            e.prompt_tokens
        ));
    }
    if let Some(et) = e.tokens_per_second {
        parts.push(format!(
            "{} tok/s, {:.0}% of the {} tok/s estimated at full micro-batches of {} on {hw}",
            fmt_rate(m.tokens_per_second),
            100.0 * m.tokens_per_second / et,
            fmt_rate(et),
            e.batch
        ));
    }
    let mut departure = PerformanceDeparture {
        tpot_ratio,
        ttft_ratio,
        tokens_per_second_ratio: tps_ratio,
        slower_since: None,
        message: parts.join("; "),
    };
    let Some(r) = tpot_ratio else {
        // Only first tokens in the window: nothing to say about TPOT; keep what was said.
        departure.slower_since = prev.and_then(|p| p.departure.slower_since.clone());
        let verdict = prev.map(|p| p.verdict.clone()).unwrap_or_else(|| {
            Verdict::new(
                "Unknown",
                "NoTokenIntervals",
                "no sequence generated a second token in the window".into(),
            )
        });
        return Judged { departure, verdict };
    };
    let tol = cfg.tolerance;
    let verdict = if r > tol {
        let since = prev
            .and_then(|p| p.departure.slower_since.clone())
            .map_or(now, |t| t.0);
        departure.slower_since = Some(Time(since));
        let lasted = seconds_between(since, now);
        let sustain = cfg.sustain.as_secs_f64();
        let head = format!(
            "time per output token {} the plan's estimate ({} measured vs {} on {hw} at batch {}), \
             above the {} tolerance",
            fmt_ratio(r),
            fmt_seconds(m.tpot_seconds.unwrap_or(0.0)),
            fmt_seconds(e_tpot),
            e.batch,
            fmt_ratio(tol)
        );
        // Once reported it stays reported while slower (a changed --performance-sustain-s, or
        // an operator restart continuing from status, does not take it back).
        if lasted >= sustain || prev_status == Some("False") {
            Verdict::new("False", SLOWER, format!("{head} for {}", fmt_span(lasted)))
        } else {
            let note = format!(
                "{head} for {} (reported after {})",
                fmt_span(lasted),
                fmt_span(sustain)
            );
            match prev_status {
                Some("True") => Verdict::new("True", "AsPlanned", note),
                _ => Verdict::new("Unknown", "Measuring", note),
            }
        }
    } else {
        Verdict::new(
            "True",
            "AsPlanned",
            format!(
                "time per output token {} the plan's estimate ({} measured vs {} on {hw}), within \
                 the {} tolerance",
                fmt_ratio(r),
                fmt_seconds(m.tpot_seconds.unwrap_or(0.0)),
                fmt_seconds(e_tpot),
                fmt_ratio(tol)
            ),
        )
    };
    Judged { departure, verdict }
}

/// What the sampling task last found for one deployment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub measured: Option<MeasuredPerformance>,
    /// The latest measurement judged, and the generation of the estimate it was judged against.
    pub judged: Option<(i64, Judged)>,
    /// The read error and since when, while reads fail.
    pub read_error: Option<(String, Timestamp)>,
}

#[derive(Debug, Default)]
struct Entry {
    window: Window,
    snapshot: Snapshot,
    last_trigger: Option<f64>,
}

/// Measurements per `MoEDeployment` uid, shared by the sampling task and reconcile.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<HashMap<String, Entry>>,
}

/// The estimate status shows for `md`'s current generation, if any.
pub fn current_estimate(md: &MoEDeployment) -> Option<&PerformanceEstimate> {
    let e = md
        .status
        .as_ref()?
        .performance
        .as_ref()?
        .estimate
        .as_ref()?;
    (e.observed_generation == md.metadata.generation.unwrap_or(0)).then_some(e)
}

/// The judgement status shows for `md`'s current generation: an operator that restarts
/// continues from it (since when TPOT has been slower, what the condition said).
pub fn shown_judgement(md: &MoEDeployment) -> Option<Judged> {
    current_estimate(md)?;
    let st = md.status.as_ref()?;
    let departure = st.performance.as_ref()?.departure.clone()?;
    let c = crate::status::find(&st.conditions, CONDITION)?;
    Some(Judged {
        departure,
        verdict: Verdict {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
    })
}

impl Store {
    pub fn snapshot(&self, uid: &str) -> Option<Snapshot> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(uid).map(|e| e.snapshot.clone())
    }

    /// One round of reads of a deployment's gateways at `at` (monotonic seconds) and `now`;
    /// `estimate` is the one status shows for the current generation, `shown` the judgement
    /// status shows against it (used until this store has its own). Returns whether status
    /// should be written: a first measurement, a read error appearing or clearing, a new
    /// verdict, or a fresh measurement after `refresh_s`.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &self,
        uid: &str,
        estimate: Option<&PerformanceEstimate>,
        shown: Option<Judged>,
        reads: Result<Vec<(String, GatewayReading)>, String>,
        at: f64,
        now: Timestamp,
        cfg: &Config,
        refresh_s: f64,
    ) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(uid.to_string()).or_default();
        let snap = &mut entry.snapshot;
        let readings = match reads {
            Err(e) => {
                let first = snap.read_error.is_none();
                let since = snap.read_error.as_ref().map_or(now, |(_, t)| *t);
                snap.read_error = Some((e, since));
                if first {
                    entry.last_trigger = Some(at);
                }
                return first;
            }
            Ok(r) => r,
        };
        let mut trigger = snap.read_error.take().is_some();
        entry.window.record(at, &readings, cfg.window.as_secs_f64());
        let Some(numbers) = entry.window.measure() else {
            if trigger {
                entry.last_trigger = Some(at);
            }
            return trigger;
        };
        let m = measured(&numbers, now);
        let first = snap.measured.is_none();
        let judged = estimate.map(|e| {
            let prev = snap
                .judged
                .as_ref()
                .filter(|(g, _)| *g == e.observed_generation)
                .map(|(_, j)| j.clone())
                .or(shown);
            (e.observed_generation, judge(e, &m, prev.as_ref(), cfg))
        });
        let verdict_moved = judged
            .as_ref()
            .map(|(_, j)| &j.verdict)
            .map(|v| (&v.status, &v.reason))
            != snap
                .judged
                .as_ref()
                .map(|(_, j)| &j.verdict)
                .map(|v| (&v.status, &v.reason));
        snap.measured = Some(m);
        snap.judged = judged;
        let stale = entry.last_trigger.is_none_or(|t| at - t >= refresh_s);
        trigger |= first || verdict_moved || stale;
        if trigger {
            entry.last_trigger = Some(at);
        }
        trigger
    }

    pub fn retain(&self, keep: &[String]) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| keep.contains(k));
    }
}

/// `status.performance` and the condition for `md` planned as `plan`: the estimate kept from
/// `prev` while the generation is the same (else computed); measurement, departure and
/// verdict from the sampling task's `snap`, or as `prev` showed them (an operator restart).
pub fn status(
    prev: &MoEDeploymentStatus,
    md: &MoEDeployment,
    plan: &SizedPlan,
    snap: Option<&Snapshot>,
) -> (PerformanceStatus, Verdict) {
    let generation = md.metadata.generation.unwrap_or(0);
    let before = prev.performance.clone().unwrap_or_default();
    let same_estimate = before
        .estimate
        .as_ref()
        .is_some_and(|e| e.observed_generation == generation);
    let estimate = match before.estimate.clone() {
        Some(e) if same_estimate => e,
        _ => estimate(md, plan),
    };
    let prev_verdict = crate::status::find(&prev.conditions, CONDITION).map(|c| Verdict {
        status: c.status.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
    });
    let (measured, departure, verdict, read_error) = match snap {
        Some(s) => {
            let judged = s
                .judged
                .as_ref()
                .filter(|(g, _)| *g == generation)
                .map(|(_, j)| j.clone());
            (
                s.measured.clone().or(before.measured),
                judged.as_ref().map(|j| j.departure.clone()),
                judged.map(|j| j.verdict),
                s.read_error.clone(),
            )
        }
        // Nothing sampled since the operator started: what status showed, unless the spec
        // changed (a new estimate is not judged by the old departure).
        None => (
            before.measured,
            before.departure.filter(|_| same_estimate),
            prev_verdict.filter(|_| same_estimate),
            None,
        ),
    };
    let verdict = verdict.unwrap_or_else(|| match (&estimate.tpot_seconds, &measured) {
        (None, _) => Verdict::new(
            "Unknown",
            "NoEstimate",
            estimate
                .message
                .clone()
                .unwrap_or_else(|| "the plan has no estimate".into()),
        ),
        (Some(_), None) => Verdict::new(
            "Unknown",
            "NoTraffic",
            "no generated tokens measured yet".into(),
        ),
        (Some(_), Some(_)) => Verdict::new(
            "Unknown",
            "Measuring",
            "waiting for a measurement against this generation's estimate".into(),
        ),
    });
    let (read_error, read_error_since) = match read_error {
        Some((e, t)) => (Some(e), Some(Time(t))),
        None if snap.is_none() => (before.read_error, before.read_error_since),
        None => (None, None),
    };
    (
        PerformanceStatus {
            estimate: Some(estimate),
            measured,
            departure,
            read_error,
            read_error_since,
        },
        verdict,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(instance: &str, tokens: u64, first: (u64, f64), next: (u64, f64)) -> GatewayReading {
        GatewayReading {
            instance: instance.into(),
            generated_tokens: tokens,
            ttft_count: first.0,
            ttft_sum: first.1,
            tpot_count: next.0,
            tpot_sum: next.1,
        }
    }

    fn est(tpot: f64) -> PerformanceEstimate {
        PerformanceEstimate {
            observed_generation: 1,
            hardware_profile: Some("a100-80gb".into()),
            batch: 8,
            micro_batches: 2,
            prompt_tokens: 512,
            output_tokens: 256,
            ttft_seconds: Some(0.2),
            tpot_seconds: Some(tpot),
            tokens_per_second: Some(1000.0),
            message: None,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn meas(tpot: Option<f64>, t: i64) -> MeasuredPerformance {
        MeasuredPerformance {
            tokens_per_second: 50.0,
            ttft_seconds: Some(0.1),
            tpot_seconds: tpot,
            generated_tokens: 500,
            window_seconds: 10.0,
            gateways: 1,
            sampled_at: Time(at(t)),
        }
    }

    fn cfg() -> Config {
        Config {
            window: Duration::from_secs(60),
            tolerance: 1.5,
            sustain: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_window_takes_differences_per_gateway_and_adds_them_up() {
        let mut w = Window::default();
        let a0 = reading("a/1", 100, (10, 1.0), (90, 9.0));
        let b0 = reading("b/1", 0, (0, 0.0), (0, 0.0));
        w.record(0.0, &[("a".into(), a0), ("b".into(), b0)], 60.0);
        assert_eq!(w.measure(), None, "one reading each");
        // 10 s later: a generated 200 tokens (4 sequences, 196 intervals), b 50 (1, 49).
        let a1 = reading("a/1", 300, (14, 1.0 + 4.0 * 0.5), (286, 9.0 + 196.0 * 0.02));
        let b1 = reading("b/1", 50, (1, 0.3), (49, 49.0 * 0.04));
        w.record(10.0, &[("a".into(), a1), ("b".into(), b1)], 60.0);
        let n = w.measure().unwrap();
        assert_eq!(n.generated_tokens, 250);
        assert_eq!(n.gateways, 2);
        assert!((n.tokens_per_second - 25.0).abs() < 1e-9, "{n:?}");
        assert!((n.window_seconds - 10.0).abs() < 1e-9);
        // Means over all sequences and intervals, not a mean of the gateways' means.
        let ttft = (4.0 * 0.5 + 0.3) / 5.0;
        let tpot = (196.0 * 0.02 + 49.0 * 0.04) / 245.0;
        assert!((n.ttft_seconds.unwrap() - ttft).abs() < 1e-9, "{n:?}");
        assert!((n.tpot_seconds.unwrap() - tpot).abs() < 1e-9, "{n:?}");
    }

    #[test]
    fn the_window_slides_and_idle_gives_nothing() {
        let mut w = Window::default();
        let r = |t: u64| {
            reading(
                "a/1",
                t,
                (t / 10, 0.1 * (t / 10) as f64),
                (t, 0.01 * t as f64),
            )
        };
        for (i, tokens) in [0u64, 100, 200, 300, 300, 300].into_iter().enumerate() {
            w.record(i as f64 * 10.0, &[("a".into(), r(tokens))], 20.0);
        }
        // At 50 s the window reaches back to 30 s (the newest reading at least 20 s old):
        // 300 → 300, nothing generated: no measurement (status keeps the last one).
        assert_eq!(w.measure(), None);
        w.record(60.0, &[("a".into(), r(360))], 20.0);
        let n = w.measure().unwrap();
        // From 40 s (300) to 60 s (360).
        assert_eq!(n.generated_tokens, 60);
        assert!((n.tokens_per_second - 3.0).abs() < 1e-9, "{n:?}");
        assert!((n.window_seconds - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_gateway_starts_again_and_a_gone_one_is_forgotten() {
        let mut w = Window::default();
        w.record(
            0.0,
            &[("a".into(), reading("a/1", 1000, (10, 1.0), (990, 9.9)))],
            60.0,
        );
        w.record(
            5.0,
            &[("a".into(), reading("a/1", 1100, (11, 1.1), (1089, 10.9)))],
            60.0,
        );
        assert_eq!(w.measure().unwrap().generated_tokens, 100);
        // A new process whose counters already passed the old ones: not a difference.
        w.record(
            10.0,
            &[("a".into(), reading("a/2", 5000, (50, 5.0), (4950, 49.5)))],
            60.0,
        );
        assert_eq!(w.measure(), None);
        w.record(
            15.0,
            &[("a".into(), reading("a/2", 5010, (51, 5.1), (4959, 49.6)))],
            60.0,
        );
        assert_eq!(w.measure().unwrap().generated_tokens, 10);
        // The same instance with a counter that went down also starts again.
        w.record(
            20.0,
            &[("a".into(), reading("a/2", 3, (1, 0.1), (2, 0.02)))],
            60.0,
        );
        assert_eq!(w.measure(), None);
        // The pod is gone from the next round: its history goes with it.
        w.record(
            25.0,
            &[("b".into(), reading("b/1", 7, (1, 0.1), (6, 0.06)))],
            60.0,
        );
        assert_eq!(w.measure(), None);
        // A reading at the same time as the last adds nothing.
        w.record(
            25.0,
            &[("b".into(), reading("b/1", 9, (1, 0.1), (8, 0.08)))],
            60.0,
        );
        assert_eq!(w.measure(), None);
    }

    #[test]
    fn stats_without_serving_counters_are_named() {
        let v = serde_json::json!({"gateway": {"steps": 3}, "stages": [], "experts": []});
        let e = parse_gateway(&v).unwrap_err();
        assert!(e.contains("instance") && e.contains("older"), "{e}");
        let v = serde_json::json!({"gateway": {
            "instance": "gw/1/ab", "generatedTokens": 12,
            "timeToFirstToken": {"count": 2, "sumSeconds": 0.5},
            "timePerOutputToken": {"count": 10, "sumSeconds": -1.0},
        }});
        let e = parse_gateway(&v).unwrap_err();
        assert!(e.contains("timePerOutputToken.sumSeconds"), "{e}");
        let v = serde_json::json!({"gateway": {
            "instance": "gw/1/ab", "generatedTokens": 12,
            "timeToFirstToken": {"count": 2, "sumSeconds": 0.5},
            "timePerOutputToken": {"count": 10, "sumSeconds": 0.25},
        }});
        assert_eq!(
            parse_gateway(&v).unwrap(),
            reading("gw/1/ab", 12, (2, 0.5), (10, 0.25))
        );
        assert!(parse_gateway(&serde_json::json!([])).is_err());
    }

    #[test]
    fn within_the_tolerance_is_as_planned() {
        let j = judge(&est(0.020), &meas(Some(0.025), 0), None, &cfg());
        assert_eq!(
            (j.verdict.status.as_str(), j.verdict.reason.as_str()),
            ("True", "AsPlanned")
        );
        assert_eq!(j.departure.tpot_ratio, Some(1.25));
        assert_eq!(j.departure.ttft_ratio, Some(0.5));
        assert_eq!(j.departure.tokens_per_second_ratio, Some(0.05));
        assert_eq!(j.departure.slower_since, None);
        assert!(
            j.departure
                .message
                .starts_with("TPOT 1.25x the plan's estimate (25.0 ms measured vs 20.0 ms)"),
            "{}",
            j.departure.message
        );
        assert!(
            j.departure.message.contains("5% of the 1000 tok/s"),
            "{}",
            j.departure.message
        );
    }

    #[test]
    fn slower_than_planned_only_once_sustained_and_back_at_once() {
        let c = cfg();
        let e = est(0.020);
        // As planned first.
        let ok = judge(&e, &meas(Some(0.021), 0), None, &c);
        assert_eq!(ok.verdict.status, "True");
        // 2.3x from 10 s on: still True (not yet sustained), with the time noted.
        let s1 = judge(&e, &meas(Some(0.046), 10), Some(&ok), &c);
        assert_eq!(
            (s1.verdict.status.as_str(), s1.verdict.reason.as_str()),
            ("True", "AsPlanned")
        );
        assert_eq!(s1.departure.slower_since, Some(Time(at(10))));
        assert!(
            s1.verdict.message.contains("2.30x")
                && s1.verdict.message.contains("reported after 5 min"),
            "{}",
            s1.verdict.message
        );
        let s2 = judge(&e, &meas(Some(0.050), 200), Some(&s1), &c);
        assert_eq!(s2.verdict.status, "True");
        assert_eq!(s2.departure.slower_since, Some(Time(at(10))));
        // 300 s after it began: False, SlowerThanPlanned.
        let s3 = judge(&e, &meas(Some(0.046), 310), Some(&s2), &c);
        assert_eq!(
            (s3.verdict.status.as_str(), s3.verdict.reason.as_str()),
            ("False", SLOWER)
        );
        assert!(
            s3.verdict.message.contains("for 5 min"),
            "{}",
            s3.verdict.message
        );
        assert!(
            s3.departure
                .message
                .starts_with("TPOT 2.30x the plan's estimate (46.0 ms measured vs 20.0 ms)"),
            "{}",
            s3.departure.message
        );
        // Stays False while slower.
        let s4 = judge(&e, &meas(Some(0.040), 320), Some(&s3), &c);
        assert_eq!(s4.verdict.status, "False");
        // One measurement within the tolerance: True again, and the clock restarts.
        let back = judge(&e, &meas(Some(0.029), 330), Some(&s4), &c);
        assert_eq!(back.verdict.status, "True");
        assert_eq!(back.departure.slower_since, None);
        let again = judge(&e, &meas(Some(0.040), 340), Some(&back), &c);
        assert_eq!(again.verdict.status, "True");
        assert_eq!(again.departure.slower_since, Some(Time(at(340))));
        // Exactly at the tolerance is within it.
        assert_eq!(
            judge(&e, &meas(Some(0.030), 0), None, &c).verdict.status,
            "True"
        );
    }

    #[test]
    fn a_first_slow_measurement_is_unknown_until_sustained_and_zero_sustain_reports_at_once() {
        let e = est(0.010);
        let j = judge(&e, &meas(Some(0.5), 0), None, &cfg());
        assert_eq!(
            (j.verdict.status.as_str(), j.verdict.reason.as_str()),
            ("Unknown", "Measuring")
        );
        assert_eq!(j.departure.tpot_ratio, Some(50.0));
        let now = Config {
            sustain: Duration::ZERO,
            ..cfg()
        };
        let j = judge(&e, &meas(Some(0.5), 0), None, &now);
        assert_eq!(
            (j.verdict.status.as_str(), j.verdict.reason.as_str()),
            ("False", SLOWER)
        );
        assert!(j.verdict.message.contains("50x"), "{}", j.verdict.message);
    }

    #[test]
    fn no_estimate_or_no_intervals_say_so() {
        let mut e = est(0.02);
        e.tpot_seconds = None;
        e.message = Some("no hardware profile for spec.placement.gpuProduct `TPU`".into());
        let j = judge(&e, &meas(Some(0.5), 0), None, &cfg());
        assert_eq!(
            (j.verdict.status.as_str(), j.verdict.reason.as_str()),
            ("Unknown", "NoEstimate")
        );
        assert!(
            j.departure.message.contains("TPU"),
            "{}",
            j.departure.message
        );
        assert_eq!(j.departure.tpot_ratio, None);
        // Only first tokens in the window: the previous verdict and clock stand.
        let e = est(0.02);
        let slow = judge(&e, &meas(Some(0.2), 0), None, &cfg());
        let j = judge(&e, &meas(None, 10), Some(&slow), &cfg());
        assert_eq!(j.verdict, slow.verdict);
        assert_eq!(j.departure.slower_since, slow.departure.slower_since);
        assert_eq!(j.departure.tpot_ratio, None);
        let j = judge(&e, &meas(None, 10), None, &cfg());
        assert_eq!(j.verdict.reason, "NoTokenIntervals");
    }

    fn tiny() -> MoEDeployment {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.yaml");
        let mut md = crate::cli::read_manifest(&path).unwrap();
        md.metadata.generation = Some(1);
        md
    }

    #[test]
    fn the_estimate_follows_the_spec_and_names_a_missing_profile() {
        let md = tiny();
        let plan = crate::planning::plan(&md.spec).unwrap();
        let e = estimate(&md, &plan);
        assert_eq!(e.observed_generation, 1);
        assert_eq!(e.hardware_profile.as_deref(), Some("a100-80gb"));
        // One gateway, two stages: two lanes of maxConcurrentSequences 4 / 2.
        assert_eq!((e.micro_batches, e.batch), (2, 2));
        let (ttft, tpot, tps) = (
            e.ttft_seconds.unwrap(),
            e.tpot_seconds.unwrap(),
            e.tokens_per_second.unwrap(),
        );
        assert!(ttft > 0.0 && tpot > 0.0 && tps > 0.0, "{e:?}");
        // Full micro-batches: tokens/s = micro-batches x batch / TPOT.
        assert!((tps - 4.0 / tpot).abs() / tps < 0.01, "{e:?}");
        assert_eq!(e.message, None);

        let mut other = md.clone();
        other.spec.placement.gpu_product = "Acme-TPU-9".into();
        let e = estimate(&other, &plan);
        assert_eq!(e.tpot_seconds, None);
        assert_eq!(e.hardware_profile, None);
        let msg = e.message.unwrap();
        assert!(
            msg.contains("Acme-TPU-9") && msg.contains("h100-80gb"),
            "{msg}"
        );

        let mut two = md.clone();
        two.spec.replicas = 2;
        two.spec.serving.max_concurrent_sequences = 16;
        let e = estimate(&two, &plan);
        assert_eq!((e.micro_batches, e.batch), (4, 4));
    }

    #[test]
    fn status_keeps_the_estimate_per_generation_and_the_last_measurement() {
        let md = tiny();
        let plan = crate::planning::plan(&md.spec).unwrap();
        // Nothing measured yet.
        let (p, v) = status(&MoEDeploymentStatus::default(), &md, &plan, None);
        assert!(p.estimate.as_ref().unwrap().tpot_seconds.is_some());
        assert_eq!(p.measured, None);
        assert_eq!(
            (v.status.as_str(), v.reason.as_str()),
            ("Unknown", "NoTraffic")
        );

        // The sampling task measured and judged against generation 1's estimate.
        let store = Store::default();
        let mut prev = MoEDeploymentStatus {
            performance: Some(p.clone()),
            ..Default::default()
        };
        let mut with_status = md.clone();
        with_status.status = Some(prev.clone());
        let e = current_estimate(&with_status).cloned();
        assert!(e.is_some());
        let r = |t: u64| {
            vec![(
                "gw-0".to_string(),
                reading(
                    "g/1",
                    t,
                    (t / 8, 0.01 * (t / 8) as f64),
                    (t - t / 8, 10.0 * (t - t / 8) as f64),
                ),
            )]
        };
        let c = Config {
            sustain: Duration::ZERO,
            ..cfg()
        };
        assert!(
            !store.observe("u", e.as_ref(), None, Ok(r(0)), 0.0, at(0), &c, 60.0),
            "one reading"
        );
        assert!(
            store.observe("u", e.as_ref(), None, Ok(r(80)), 5.0, at(5), &c, 60.0),
            "first measurement"
        );
        let snap = store.snapshot("u").unwrap();
        let (p2, v2) = status(&prev, &md, &plan, Some(&snap));
        assert_eq!(p2.estimate, p.estimate, "same generation: kept");
        let m = p2.measured.clone().unwrap();
        assert_eq!(m.tokens_per_second, 16.0);
        assert_eq!(m.tpot_seconds, Some(10.0));
        // 10 s per token on CPU-less arithmetic: far slower than any GPU estimate.
        assert_eq!((v2.status.as_str(), v2.reason.as_str()), ("False", SLOWER));
        assert!(p2.departure.as_ref().unwrap().tpot_ratio.unwrap() > 100.0);
        // Same verdict again a little later: no new trigger before the refresh.
        assert!(!store.observe("u", e.as_ref(), None, Ok(r(160)), 10.0, at(10), &c, 60.0));
        // The gateway cannot be read: the measurement stays, the error and its time show.
        assert!(store.observe(
            "u",
            e.as_ref(),
            None,
            Err("no ready gateway pod".into()),
            15.0,
            at(15),
            &c,
            60.0
        ));
        assert!(!store.observe(
            "u",
            e.as_ref(),
            None,
            Err("GET x: timed out".into()),
            20.0,
            at(20),
            &c,
            60.0
        ));
        let snap = store.snapshot("u").unwrap();
        let (p3, v3) = status(&prev, &md, &plan, Some(&snap));
        assert_eq!(p3.measured.as_ref().unwrap().sampled_at, Time(at(10)));
        assert_eq!(p3.read_error.as_deref(), Some("GET x: timed out"));
        assert_eq!(p3.read_error_since, Some(Time(at(15))));
        assert_eq!(v3.status, "False");

        // An operator restart (empty store): status keeps what it showed.
        prev.performance = Some(p3.clone());
        prev.conditions = vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: CONDITION.into(),
            status: v3.status.clone(),
            reason: v3.reason.clone(),
            message: v3.message.clone(),
            observed_generation: Some(1),
            last_transition_time: Time(at(5)),
        }];
        let (p4, v4) = status(&prev, &md, &plan, None);
        assert_eq!(p4, p3);
        assert_eq!(v4, v3);

        // The restarted operator's sampling continues from status: still slower, so still
        // False (not back to Unknown while a new sustain period runs), since the same time.
        let mut shown_md = md.clone();
        shown_md.status = Some(prev.clone());
        let shown = shown_judgement(&shown_md).unwrap();
        assert_eq!(shown.verdict, v3);
        let fresh = Store::default();
        let slow = Config {
            sustain: Duration::from_secs(300),
            ..cfg()
        };
        let est1 = current_estimate(&shown_md).cloned();
        for (i, t) in [(0, 0u64), (1, 80)] {
            fresh.observe(
                "u",
                est1.as_ref(),
                shown_judgement(&shown_md),
                Ok(r(t)),
                100.0 + f64::from(i) * 5.0,
                at(100 + i64::from(i) * 5),
                &slow,
                60.0,
            );
        }
        let (p6, v6) = status(&prev, &md, &plan, fresh.snapshot("u").as_ref());
        assert_eq!((v6.status.as_str(), v6.reason.as_str()), ("False", SLOWER));
        assert_eq!(
            p6.departure.unwrap().slower_since,
            p3.departure.as_ref().unwrap().slower_since
        );

        // A new generation: a new estimate, the old departure and verdict dropped.
        let mut next = md.clone();
        next.metadata.generation = Some(2);
        let (p5, v5) = status(&prev, &next, &plan, None);
        assert_eq!(p5.estimate.unwrap().observed_generation, 2);
        assert_eq!(p5.departure, None);
        assert_eq!(p5.measured, p3.measured);
        assert_eq!(
            (v5.status.as_str(), v5.reason.as_str()),
            ("Unknown", "Measuring")
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_seconds(0.0123), "12.3 ms");
        assert_eq!(fmt_seconds(0.00123), "1.23 ms");
        assert_eq!(fmt_seconds(2.5), "2.50 s");
        assert_eq!(fmt_ratio(2.3), "2.30x");
        assert_eq!(fmt_ratio(2.0), "2x");
        assert_eq!(fmt_ratio(1.5), "1.50x");
        assert_eq!(fmt_ratio(23.4), "23x");
        assert_eq!(fmt_span(300.0), "5 min");
        assert_eq!(fmt_span(45.0), "45 s");
        assert_eq!(sig(1234.5678, 4), 1235.0);
        assert_eq!(sig(0.00123456, 3), 0.00123);
    }
}
