//! A discrete-event simulator of a deployment's request path: Poisson arrivals queue at the
//! gateway, lanes (micro-batches) admit them continuously up to a batch size, and every step of
//! a lane visits the pipeline's stages in order, each stage serving one micro-batch at a time in
//! arrival order. Service times come from a function of (stage, rows, sequences), the
//! performance model's operator times in deployments, a constant in queueing tests.
//!
//! It measures what the closed-form model cannot: queueing delay, its tail, and how lanes
//! contend for the stages.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

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
    pub tokens_per_second: f64,
    /// Busy share of each stage.
    pub stage_utilization: Vec<f64>,
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
    /// Lane finished stage `stage` of its step.
    StageDone {
        lane: usize,
        stage: usize,
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

#[derive(Debug, Default)]
struct Lane {
    seqs: Vec<Seq>,
    /// Rows of the step in flight (prompt rows of new sequences, one per decoding one).
    rows: usize,
    busy: bool,
}

/// Runs the simulation; `service(stage, rows, sequences)` is one stage's seconds for a step.
pub fn simulate(cfg: &SimConfig, service: impl Fn(usize, usize, usize) -> f64) -> SimReport {
    let stages = cfg.stages.max(1);
    let mut rng = Rng(cfg.seed);
    let mut events = BinaryHeap::new();
    let mut next_seq = 0u64;
    let mut push = |events: &mut BinaryHeap<Event>, at: f64, kind: Kind| {
        next_seq += 1;
        events.push(Event {
            at,
            seq: next_seq,
            kind,
        });
    };
    if cfg.arrival_rate > 0.0 {
        let t = rng.exponential(cfg.arrival_rate);
        push(&mut events, t, Kind::Arrival);
    }
    let mut queue: VecDeque<Seq> = VecDeque::new();
    let mut lanes: Vec<Lane> = (0..cfg.lanes.max(1)).map(|_| Lane::default()).collect();
    // Per stage: when it is free, and the lanes waiting for it.
    let mut free_at = vec![0.0f64; stages];
    let mut stage_queue: Vec<VecDeque<usize>> = vec![VecDeque::new(); stages];
    let mut busy = vec![0.0f64; stages];
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut tokens = 0usize;
    let mut finished = 0usize;
    let mut now = 0.0;
    let mut last_token_at = 0.0f64;

    // Starts stage `s` for `lane` now (the stage is free).
    let start = |lane: usize,
                 s: usize,
                 now: f64,
                 lanes: &[Lane],
                 free_at: &mut [f64],
                 busy: &mut [f64]|
     -> f64 {
        let d = service(s, lanes[lane].rows, lanes[lane].seqs.len());
        free_at[s] = now + d;
        busy[s] += d;
        now + d
    };

    while let Some(ev) = events.pop() {
        if cfg.horizon > 0.0 && ev.at > cfg.horizon {
            now = cfg.horizon;
            break;
        }
        now = ev.at;
        match ev.kind {
            Kind::Arrival => {
                queue.push_back(Seq {
                    arrived: now,
                    generated: 0,
                    first_token: None,
                });
                let t = now + rng.exponential(cfg.arrival_rate);
                if t < cfg.duration {
                    push(&mut events, t, Kind::Arrival);
                }
            }
            Kind::StageDone { lane, stage } => {
                // The stage takes the next waiting lane.
                if let Some(next) = stage_queue[stage].pop_front() {
                    let done = start(next, stage, now, &lanes, &mut free_at, &mut busy);
                    push(&mut events, done, Kind::StageDone { lane: next, stage });
                } else {
                    free_at[stage] = now;
                }
                if stage + 1 < stages {
                    let s = stage + 1;
                    if free_at[s] <= now && stage_queue[s].is_empty() {
                        let done = start(lane, s, now, &lanes, &mut free_at, &mut busy);
                        push(&mut events, done, Kind::StageDone { lane, stage: s });
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
            }
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
            lanes[i].rows = rows;
            lanes[i].busy = true;
            if free_at[0] <= now && stage_queue[0].is_empty() {
                let done = start(i, 0, now, &lanes, &mut free_at, &mut busy);
                push(&mut events, done, Kind::StageDone { lane: i, stage: 0 });
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
    ttft.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if ttft.is_empty() {
            0.0
        } else {
            ttft[((ttft.len() - 1) as f64 * p).round() as usize]
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
        ttft_p50: pct(0.5),
        ttft_p99: pct(0.99),
        tpot_mean: mean(&tpot),
        tokens_per_second: tokens as f64 / span,
        stage_utilization: busy.iter().map(|b| b / span).collect(),
    }
}
