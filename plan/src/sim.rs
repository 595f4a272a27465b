//! A discrete-event simulator of a deployment's request path: Poisson arrivals queue at the
//! gateway, lanes (micro-batches) admit them continuously up to a batch size, and every step of
//! a lane visits the pipeline's stages in order, each stage serving one micro-batch at a time in
//! arrival order. A stage visit is the stage's own compute, then one call to each expert shard
//! it needs (all its layers' expert work for that shard in one call); the stage waits for all of
//! them before the micro-batch moves on. Each shard has replicas; a call goes to the replica
//! with the fewest outstanding calls (ties in turn, as the data plane's stages pick), and a
//! replica serves its calls one at a time in arrival order. Replicas can change while it runs:
//! a controller looks at each shard's routed rows at a fixed interval, removed replicas take no
//! new calls, added ones serve after a startup delay.
//!
//! Service times come from a [`Deployment`]: the performance model's operator times
//! (`perf::stage_parts`) in deployments, constants in queueing tests.
//!
//! It measures what the closed-form model cannot: queueing delay, its tail, and how lanes
//! contend for the stages and the expert shards.
//!
//! Cost: two events per stage visit (compute done, visit done) whatever the shard count: a
//! call's completion is known when it is dispatched (a FIFO replica with known service times),
//! so calls need no events of their own.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimConfig {
    pub stages: usize,
    /// Micro-batch lanes.
    pub lanes: usize,
    /// Most sequences in one lane.
    pub batch: usize,
    /// Requests per second (Poisson).
    pub arrival_rate: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Simulated seconds of arrivals.
    pub duration: f64,
    /// Simulated time at which to stop even with work left (0: when all work is done).
    pub horizon: f64,
    pub seed: u64,
}

/// The expert shards' replicas and how they may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replicas {
    /// Replicas of each shard at the start (at least one each); empty: no expert shards.
    pub initial: Vec<usize>,
    /// Seconds from a replica being asked for to its serving.
    pub startup: f64,
    /// Seconds between two looks of the controller ([`Deployment::control`]); 0: never.
    pub control_interval: f64,
}

impl Replicas {
    /// No expert shards: the stages compute their experts.
    pub fn none() -> Self {
        Self::fixed(Vec::new())
    }

    /// These replicas throughout.
    pub fn fixed(initial: Vec<usize>) -> Self {
        Self {
            initial,
            startup: 0.0,
            control_interval: 0.0,
        }
    }
}

/// What it measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimReport {
    /// Sequences that got their first token.
    pub started: usize,
    /// Sequences that got all their tokens.
    pub finished: usize,
    /// Arrival to first token, seconds: mean and percentiles.
    pub ttft_mean: f64,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    /// Between tokens of one sequence, seconds (mean over sequences of their mean).
    pub tpot_mean: f64,
    /// Percentiles over finished sequences of their mean time between tokens.
    pub tpot_p50: f64,
    pub tpot_p99: f64,
    pub tokens_per_second: f64,
    /// Busy share of each stage (its compute and its waits for expert calls).
    pub stage_utilization: Vec<f64>,
    /// Per expert shard: busy share of its replicas (busy seconds over serving replica-seconds).
    pub shard_utilization: Vec<f64>,
    /// Per expert shard: mean seconds a call waited for its replica.
    pub shard_wait: Vec<f64>,
    /// Per expert shard: serving replicas, mean over time.
    pub shard_replicas: Vec<f64>,
    /// Per expert shard: calls served.
    pub shard_calls: Vec<u64>,
    /// Times a shard's replica count changed (each replica asked for or removed).
    pub replica_changes: usize,
    /// The most replicas held at once, all shards together (serving and starting: GPUs).
    pub peak_replicas: usize,
}

/// One stage visit of a step: the stage's own seconds, then its calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Visit {
    pub compute: f64,
    pub calls: Vec<Call>,
}

/// One call of a stage visit to an expert shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
    pub shard: usize,
    /// Seconds one replica serves it.
    pub seconds: f64,
    /// Routed rows it carries, summed over its (layer, expert) pairs (what the controller sees).
    pub rows: f64,
}

/// Where the service times come from, and who changes the replicas.
pub trait Deployment {
    /// The visits, one per stage, of a step of `rows` rows over `sequences` sequences that
    /// starts at `now` (implementations cache them by their inputs; a missing stage's visit
    /// takes no time).
    fn step(&mut self, now: f64, rows: usize, sequences: usize) -> Rc<[Visit]>;
    /// Every control interval: each shard's routed rows so far and its replicas (serving and
    /// starting). Returns the replicas each shard should have, or `None` to keep them.
    fn control(&mut self, _now: f64, _routed: &[f64], _replicas: &[usize]) -> Option<Vec<usize>> {
        None
    }
}

#[derive(Debug, PartialEq)]
struct Event {
    at: f64,
    seq: u64,
    kind: Kind,
}

#[derive(Debug, PartialEq)]
enum Kind {
    Arrival,
    /// Lane finished its own compute at `stage`: its calls go out.
    Computed {
        lane: usize,
        stage: usize,
    },
    /// Lane's visit of `stage` is over (its compute and every call).
    Visited {
        lane: usize,
        stage: usize,
    },
    Control,
    /// A replica asked for at some point may now serve.
    Ready {
        shard: usize,
    },
}

impl Eq for Event {}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest first; ties in insertion order.
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Default)]
struct Events {
    heap: BinaryHeap<Event>,
    seq: u64,
}

impl Events {
    fn push(&mut self, at: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Event {
            at,
            seq: self.seq,
            kind,
        });
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn exponential(&mut self, rate: f64) -> f64 {
        -self.next().ln() / rate
    }
}

#[derive(Debug, Clone)]
struct Seq {
    arrived: f64,
    /// Tokens generated so far (0: its prompt has not run).
    generated: usize,
    first_token: Option<f64>,
}

#[derive(Debug)]
struct Lane {
    seqs: Vec<Seq>,
    /// The visits of the step in flight.
    visits: Rc<[Visit]>,
    busy: bool,
    /// When its current stage visit started.
    started: f64,
}

/// One replica of a shard: when it is free, and when its outstanding calls complete.
#[derive(Debug, Default)]
struct Replica {
    free_at: f64,
    done: VecDeque<f64>,
}

impl Replica {
    fn outstanding(&mut self, now: f64) -> usize {
        while self.done.front().is_some_and(|&t| t <= now) {
            self.done.pop_front();
        }
        self.done.len()
    }
}

#[derive(Debug, Default)]
struct Shard {
    serving: Vec<Replica>,
    /// Ready times of replicas asked for, in the order asked.
    starting: VecDeque<f64>,
    turn: usize,
    busy: f64,
    wait: f64,
    calls: u64,
    routed: f64,
    replica_seconds: f64,
    since: f64,
}

impl Shard {
    /// The replica a call dispatched at `now` goes to: the fewest outstanding calls, ties
    /// starting from this call's turn (`None`: no replica serves).
    fn pick(&mut self, now: f64) -> Option<usize> {
        let n = self.serving.len();
        if n == 0 {
            return None;
        }
        let first = self.turn % n;
        self.turn = self.turn.wrapping_add(1);
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (first + k) % n;
            let o = self.serving[i].outstanding(now);
            if best.is_none_or(|(_, b)| o < b) {
                best = Some((i, o));
                if o == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Dispatches a call at `now`: when it completes.
    fn dispatch(&mut self, now: f64, call: &Call) -> f64 {
        let Some(i) = self.pick(now) else {
            return now;
        };
        let r = &mut self.serving[i];
        let start = r.free_at.max(now);
        let done = start + call.seconds.max(0.0);
        r.free_at = done;
        r.done.push_back(done);
        self.wait += start - now;
        self.busy += call.seconds.max(0.0);
        self.calls += 1;
        self.routed += call.rows.max(0.0);
        done
    }

    fn account(&mut self, now: f64) {
        self.replica_seconds += self.serving.len() as f64 * (now - self.since).max(0.0);
        self.since = now;
    }

    fn held(&self) -> usize {
        self.serving.len() + self.starting.len()
    }

    /// Asks for or removes replicas so that `want` are held (at least one serving stays).
    /// Returns how many replicas were asked for or removed.
    fn resize(&mut self, now: f64, want: usize, startup: f64) -> usize {
        let want = want.max(1);
        let held = self.held();
        if want > held {
            for _ in held..want {
                self.starting.push_back(now + startup);
            }
            return want - held;
        }
        let mut changed = 0;
        for _ in want..held {
            if self.starting.pop_back().is_some() {
                changed += 1;
                continue;
            }
            if self.serving.len() <= 1 {
                break;
            }
            self.account(now);
            // The replica with the fewest outstanding calls goes; the ones it has finish.
            let mut gone = 0;
            let mut least = usize::MAX;
            for i in (0..self.serving.len()).rev() {
                let o = self.serving[i].outstanding(now);
                if o < least {
                    least = o;
                    gone = i;
                }
            }
            self.serving.remove(gone);
            changed += 1;
        }
        changed
    }
}

/// A deployment whose stages compute everything: `service(stage, rows, sequences)` seconds.
struct Stages<F> {
    stages: usize,
    service: F,
    steps: HashMap<(usize, usize), Rc<[Visit]>>,
}

impl<F: Fn(usize, usize, usize) -> f64> Deployment for Stages<F> {
    fn step(&mut self, _now: f64, rows: usize, sequences: usize) -> Rc<[Visit]> {
        let (stages, service) = (self.stages, &self.service);
        self.steps
            .entry((rows, sequences))
            .or_insert_with(|| {
                (0..stages)
                    .map(|s| Visit {
                        compute: service(s, rows, sequences),
                        calls: Vec::new(),
                    })
                    .collect()
            })
            .clone()
    }
}

/// Runs the simulation of stages alone; `service(stage, rows, sequences)` is one stage's
/// seconds for a step (a pure function of its inputs).
pub fn simulate(cfg: &SimConfig, service: impl Fn(usize, usize, usize) -> f64) -> SimReport {
    let mut d = Stages {
        stages: cfg.stages.max(1),
        service,
        steps: HashMap::new(),
    };
    simulate_deployment(cfg, &Replicas::none(), &mut d)
}

/// Runs the simulation of a whole deployment: stages, expert shards and their replicas.
pub fn simulate_deployment(
    cfg: &SimConfig,
    replicas: &Replicas,
    dep: &mut impl Deployment,
) -> SimReport {
    let stages = cfg.stages.max(1);
    let mut rng = Rng(cfg.seed);
    let mut events = Events::default();
    if cfg.arrival_rate > 0.0 && cfg.arrival_rate.is_finite() {
        let t = rng.exponential(cfg.arrival_rate);
        events.push(t, Kind::Arrival);
    }
    let interval = if replicas.control_interval.is_finite() && replicas.control_interval > 0.0 {
        replicas.control_interval
    } else {
        0.0
    };
    let startup = if replicas.startup.is_finite() {
        replicas.startup.max(0.0)
    } else {
        0.0
    };
    if interval > 0.0 && !replicas.initial.is_empty() {
        events.push(interval, Kind::Control);
    }
    let mut shards: Vec<Shard> = replicas
        .initial
        .iter()
        .map(|&n| Shard {
            serving: (0..n.max(1)).map(|_| Replica::default()).collect(),
            ..Default::default()
        })
        .collect();
    let mut peak_replicas: usize = shards.iter().map(Shard::held).sum();
    let mut replica_changes = 0usize;
    let mut queue: VecDeque<Seq> = VecDeque::new();
    let mut lanes: Vec<Lane> = (0..cfg.lanes.max(1))
        .map(|_| Lane {
            seqs: Vec::new(),
            visits: Rc::from(Vec::new()),
            busy: false,
            started: 0.0,
        })
        .collect();
    // Per stage: whether a lane is in it, and the lanes waiting for it.
    let mut occupied = vec![false; stages];
    let mut stage_queue: Vec<VecDeque<usize>> = vec![VecDeque::new(); stages];
    let mut busy = vec![0.0f64; stages];
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut tokens = 0usize;
    let mut finished = 0usize;
    let mut now = 0.0;
    let mut last_token_at = 0.0f64;
    let mut routed = vec![0.0f64; shards.len()];
    let mut held = vec![0usize; shards.len()];

    while let Some(ev) = events.heap.pop() {
        if cfg.horizon > 0.0 && ev.at > cfg.horizon {
            now = cfg.horizon;
            break;
        }
        now = ev.at;
        let mut admit = false;
        match ev.kind {
            Kind::Arrival => {
                queue.push_back(Seq {
                    arrived: now,
                    generated: 0,
                    first_token: None,
                });
                let t = now + rng.exponential(cfg.arrival_rate);
                if t < cfg.duration {
                    events.push(t, Kind::Arrival);
                }
                admit = true;
            }
            Kind::Computed { lane, stage } => {
                let mut done = now;
                let calls = lanes[lane].visits.get(stage).map_or(&[][..], |v| &v.calls);
                for c in calls {
                    if let Some(sh) = shards.get_mut(c.shard) {
                        done = done.max(sh.dispatch(now, c));
                    }
                }
                events.push(done, Kind::Visited { lane, stage });
            }
            Kind::Control => {
                for (j, sh) in shards.iter().enumerate() {
                    routed[j] = sh.routed;
                    held[j] = sh.held();
                }
                if let Some(want) = dep.control(now, &routed, &held) {
                    for (j, (sh, &w)) in shards.iter_mut().zip(&want).enumerate() {
                        let before = sh.starting.len();
                        replica_changes += sh.resize(now, w, startup);
                        for k in before..sh.starting.len() {
                            events.push(sh.starting[k], Kind::Ready { shard: j });
                        }
                    }
                    peak_replicas = peak_replicas.max(shards.iter().map(Shard::held).sum());
                }
                let working = !queue.is_empty() || lanes.iter().any(|l| l.busy);
                if now < cfg.duration || working {
                    events.push(now + interval, Kind::Control);
                }
            }
            Kind::Ready { shard } => {
                if let Some(sh) = shards.get_mut(shard)
                    && sh.starting.front().is_some_and(|&t| t <= now)
                {
                    sh.starting.pop_front();
                    sh.account(now);
                    sh.serving.push(Replica {
                        free_at: now,
                        done: VecDeque::new(),
                    });
                }
            }
            Kind::Visited { lane, stage } => {
                busy[stage] += now - lanes[lane].started;
                // The stage takes the next waiting lane.
                if let Some(next) = stage_queue[stage].pop_front() {
                    start(next, stage, now, &mut lanes, &mut events);
                    occupied[stage] = true;
                } else {
                    occupied[stage] = false;
                }
                if stage + 1 < stages {
                    let s = stage + 1;
                    if !occupied[s] && stage_queue[s].is_empty() {
                        start(lane, s, now, &mut lanes, &mut events);
                        occupied[s] = true;
                    } else {
                        stage_queue[s].push_back(lane);
                    }
                    continue;
                }
                // The step is over: every sequence has one more token.
                let l = &mut lanes[lane];
                l.busy = false;
                for s in &mut l.seqs {
                    s.generated += 1;
                    tokens += 1;
                    if s.first_token.is_none() {
                        s.first_token = Some(now);
                        ttft.push(now - s.arrived);
                    }
                }
                last_token_at = now;
                let out = cfg.output_tokens.max(1);
                l.seqs.retain(|s| {
                    if s.generated >= out {
                        finished += 1;
                        if out > 1 {
                            let first = s.first_token.unwrap_or(now);
                            tpot.push((now - first) / (out - 1) as f64);
                        }
                        false
                    } else {
                        true
                    }
                });
                admit = true;
            }
        }
        if !admit {
            continue;
        }
        // Idle lanes admit queued requests and start a step at stage 0.
        for i in 0..lanes.len() {
            if lanes[i].busy {
                continue;
            }
            while lanes[i].seqs.len() < cfg.batch.max(1) {
                let Some(s) = queue.pop_front() else { break };
                lanes[i].seqs.push(s);
            }
            if lanes[i].seqs.is_empty() {
                continue;
            }
            let rows = lanes[i]
                .seqs
                .iter()
                .map(|s| {
                    if s.generated == 0 {
                        cfg.prompt_tokens.max(1)
                    } else {
                        1
                    }
                })
                .sum();
            lanes[i].visits = dep.step(now, rows, lanes[i].seqs.len());
            lanes[i].busy = true;
            if !occupied[0] && stage_queue[0].is_empty() {
                start(i, 0, now, &mut lanes, &mut events);
                occupied[0] = true;
            } else {
                stage_queue[0].push_back(i);
            }
        }
    }
    let span = if cfg.horizon > 0.0 {
        now.max(1e-12)
    } else {
        last_token_at.max(now).max(1e-12)
    };
    for sh in &mut shards {
        sh.account(span);
    }
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * p).round() as usize]
        }
    };
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    SimReport {
        started: ttft.len(),
        finished,
        ttft_mean: mean(&ttft),
        ttft_p50: pct(&ttft, 0.5),
        ttft_p99: pct(&ttft, 0.99),
        tpot_mean: mean(&tpot),
        tpot_p50: pct(&tpot, 0.5),
        tpot_p99: pct(&tpot, 0.99),
        tokens_per_second: tokens as f64 / span,
        stage_utilization: busy.iter().map(|b| b / span).collect(),
        shard_utilization: shards
            .iter()
            .map(|s| s.busy / s.replica_seconds.max(1e-12))
            .collect(),
        shard_wait: shards
            .iter()
            .map(|s| s.wait / (s.calls.max(1) as f64))
            .collect(),
        shard_replicas: shards.iter().map(|s| s.replica_seconds / span).collect(),
        shard_calls: shards.iter().map(|s| s.calls).collect(),
        replica_changes,
        peak_replicas,
    }
}

/// Starts `lane`'s visit of stage `s` at `now` (the stage is free).
fn start(lane: usize, s: usize, now: f64, lanes: &mut [Lane], events: &mut Events) {
    let l = &mut lanes[lane];
    l.started = now;
    let (compute, calls) = l
        .visits
        .get(s)
        .map_or((0.0, false), |v| (v.compute, !v.calls.is_empty()));
    let kind = if calls {
        Kind::Computed { lane, stage: s }
    } else {
        Kind::Visited { lane, stage: s }
    };
    events.push(now + compute.max(0.0), kind);
}

/// One step of `rows` rows over `sequences` sequences as the performance model prices it:
/// each stage's visit (its own seconds, then one call per expert shard it routes rows to).
/// Steps with prompt rows read the KV cache of half a prompt (`prompt` tokens); decode steps
/// that of `context` tokens.
#[allow(clippy::too_many_arguments)]
pub fn priced_step(
    plan: &crate::SizedPlan,
    hw: &crate::perf::Hardware,
    layout: &crate::perf::Layout,
    popularity: &[f64],
    rows: usize,
    sequences: usize,
    prompt: usize,
    context: usize,
) -> Rc<[Visit]> {
    let ctx = if rows > sequences {
        prompt / 2
    } else {
        context
    };
    crate::perf::stage_parts(plan, hw, layout, popularity, rows, sequences, ctx)
        .into_iter()
        .map(|p| Visit {
            compute: p.compute,
            calls: p
                .shard_seconds
                .iter()
                .zip(&p.shard_rows)
                .enumerate()
                .filter(|(_, (t, _))| **t > 0.0)
                .map(|(shard, (&seconds, &rows))| Call {
                    shard,
                    seconds,
                    rows,
                })
                .collect(),
        })
        .collect()
}
