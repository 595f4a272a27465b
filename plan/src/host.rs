//! A deployment whose parts all run on one host's cores (the `local` deployment on a CPU:
//! [`Layout::shared_device`]), simulated at the grain of its operators.
//!
//! Closed forms bound such a deployment by its critical path and by its total work over the
//! cores, but with few micro-batches in flight neither bound is reached: the work a step
//! offers the cores comes in bursts (two shards computing at once, then only a stage's
//! attention, then a hop's wait), so cores idle while a micro-batch could use two. This
//! simulation follows each micro-batch through its step as the processes run it:
//!
//! - a stage's compute thread is held by one micro-batch for its whole visit (its layers'
//!   attention, and waiting for its expert calls), as a stage serves one at a time;
//! - each layer's tokens are routed (sampled, top-k by popularity) and each expert shard
//!   they reach gets one call; the stage sends and receives each call on its own thread
//!   (half a hop's CPU each way), the calls travel ([`Hardware::network_latency`] less the
//!   hop's CPU, plus their bytes) and compute on the shards at once;
//! - the gateway receives the last stage's rows and runs the LM head;
//! - every computation shares the host: each runs at full speed while at most
//!   [`Hardware::parallel_parts`] run, otherwise all slow down alike (processor sharing).
//!
//! Times per operator come from the same rooflines as [`crate::perf::estimate`].

use std::collections::VecDeque;

use crate::SizedPlan;
use crate::perf::{
    Hardware, Layout, Router, Workload, expert_bytes, head_seconds, layer_seconds, link_bandwidth,
    roofline_rows, zipf,
};

/// What the simulation measured: seconds per step of a micro-batch, and to a burst's first
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostRun {
    /// Mean seconds between a micro-batch's decode steps (its sequences' time per token).
    pub cycle: f64,
    /// Mean over micro-batches of the seconds until the first step (every sequence's prompt)
    /// ends, all micro-batches starting at once.
    pub first_step: f64,
}

#[derive(Debug, Clone, Copy)]
enum Item {
    /// Seconds of one core.
    Cpu(f64),
    /// Seconds of waiting that use no core (a message on its way, a thread waking).
    Delay(f64),
}

/// Part of a step: its branches run at once; the step moves on when all have ended.
/// `stage`: the stage whose compute thread the micro-batch holds meanwhile.
struct Phase {
    stage: Option<usize>,
    branches: Vec<Vec<Item>>,
}

struct Lane {
    program: Vec<Phase>,
    phase: usize,
    /// Next item of each branch of the current phase.
    next: Vec<usize>,
    open: usize,
    holds: Option<usize>,
    steps: usize,
    finished: Vec<f64>,
}

/// Builds one micro-batch's step programs.
struct Steps<'a> {
    plan: &'a SizedPlan,
    hw: &'a Hardware,
    layout: &'a Layout,
    router: Router,
    hits: Vec<usize>,
    /// Per expert: the shard that computes it in each layer (`usize::MAX`: none).
    owner: Vec<Vec<usize>>,
}

impl<'a> Steps<'a> {
    fn new(plan: &'a SizedPlan, hw: &'a Hardware, layout: &'a Layout, popularity: &[f64]) -> Self {
        let m = &plan.model;
        let mut owner = vec![vec![usize::MAX; m.num_experts]; m.num_layers];
        for (j, shard) in plan.expert_shards.iter().enumerate() {
            for layer in shard.layout.layers() {
                for &e in &shard.layout.experts {
                    if let Some(o) = owner.get_mut(layer).and_then(|row| row.get_mut(e))
                        && *o == usize::MAX
                    {
                        *o = j;
                    }
                }
            }
        }
        Self {
            plan,
            hw,
            layout,
            router: Router::new(popularity, m.num_experts, m.top_k),
            hits: vec![0; m.num_experts],
            owner,
        }
    }

    /// One hop's pure wait for a message of `bytes`.
    fn wire(&self, bytes: f64) -> f64 {
        (self.hw.network_latency - self.hw.hop_cpu).max(0.0)
            + bytes / link_bandwidth(self.hw, self.layout).max(1.0)
    }

    /// A step of `rows` rows over `sequences` sequences with `context` tokens of KV each.
    fn program(&mut self, rows: usize, sequences: usize, context: usize) -> Vec<Phase> {
        let plan = self.plan;
        let m = &plan.model;
        let half = self.hw.hop_cpu / 2.0;
        let wire_bytes = self.layout.wire_bytes.max(1) as f64;
        let h = m.hidden_size as f64;
        let expert_params = m.expert_params() as f64;
        let expert_bytes = expert_bytes(plan);
        let cpu = |stage: Option<usize>, t: f64| Phase {
            stage,
            branches: vec![vec![Item::Cpu(t)]],
        };
        let mut out = vec![Phase {
            stage: None,
            branches: vec![vec![
                Item::Cpu(half),
                Item::Delay(self.wire(rows as f64 * h * wire_bytes)),
            ]],
        }];
        let mut calls: Vec<(usize, usize, usize)> = Vec::new();
        for (s, stage) in plan.stages.iter().enumerate() {
            let g = stage.pod.gpus.max(1);
            let at = Some(s);
            out.push(cpu(at, half));
            for layer in stage.layout.layers() {
                out.push(cpu(
                    at,
                    layer_seconds(plan, self.hw, layer, g, rows, sequences, context),
                ));
                if !m.is_moe_layer(layer) || !self.router.route(rows, &mut self.hits) {
                    continue;
                }
                // Per shard (or the stage itself): routed rows and experts touched.
                calls.clear();
                for (e, &n) in self.hits.iter().enumerate() {
                    if n == 0 {
                        continue;
                    }
                    let j = if plan.expert_shards.is_empty() {
                        usize::MAX
                    } else {
                        self.owner
                            .get(layer)
                            .and_then(|row| row.get(e))
                            .copied()
                            .unwrap_or(usize::MAX)
                    };
                    match calls.iter_mut().find(|c| c.0 == j) {
                        Some(c) => {
                            c.1 += n;
                            c.2 += 1;
                        }
                        None => calls.push((j, n, 1)),
                    }
                }
                let seconds = |gpus: usize, routed: usize, touched: usize| {
                    roofline_rows(
                        self.hw,
                        gpus,
                        2.0 * expert_params * routed as f64,
                        touched as f64 * expert_bytes,
                        routed as f64,
                    )
                };
                if plan.expert_shards.is_empty() {
                    let t: f64 = calls.iter().map(|c| seconds(g, c.1, c.2)).sum();
                    out.push(cpu(at, t));
                    continue;
                }
                // An expert no shard computes (not in a valid plan) makes no call.
                calls.retain(|c| c.0 != usize::MAX);
                let k = calls.len() as f64;
                out.push(cpu(at, k * half));
                out.push(Phase {
                    stage: at,
                    branches: calls
                        .iter()
                        .map(|&(j, routed, touched)| {
                            let gpus = plan.expert_shards[j].pod.gpus.max(1);
                            let bytes = routed as f64 * h * wire_bytes;
                            vec![
                                Item::Delay(self.wire(bytes)),
                                Item::Cpu(2.0 * half + seconds(gpus, routed, touched)),
                                Item::Delay(self.wire(bytes)),
                            ]
                        })
                        .collect(),
                });
                out.push(cpu(at, k * half));
            }
            // On to the next stage, or the last stage's rows to the gateway.
            out.push(cpu(at, half));
            out.push(Phase {
                stage: None,
                branches: vec![vec![Item::Delay(
                    self.wire(sequences as f64 * h * wire_bytes),
                )]],
            });
        }
        out.push(cpu(None, half + head_seconds(plan, self.hw, sequences)));
        out
    }
}

/// A CPU item running now: (lane, branch, seconds of one core left).
type Running = (usize, usize, f64);

struct Host {
    parallel: f64,
    now: f64,
    running: Vec<Running>,
    /// (ends at, lane, branch).
    waiting: Vec<(f64, usize, usize)>,
    stage_owner: Vec<Option<usize>>,
    stage_queue: Vec<VecDeque<usize>>,
}

impl Host {
    /// Starts branch `b` of lane `l`'s current phase at its next item, or ends the branch:
    /// true when that ended the phase.
    fn advance(&mut self, lanes: &mut [Lane], l: usize, b: usize) -> bool {
        let lane = &mut lanes[l];
        let phase = &lane.program[lane.phase];
        let i = lane.next[b];
        match phase.branches[b].get(i) {
            Some(&Item::Cpu(t)) => {
                lane.next[b] += 1;
                self.running.push((l, b, t.max(0.0)));
                false
            }
            Some(&Item::Delay(t)) => {
                lane.next[b] += 1;
                self.waiting.push((self.now + t.max(0.0), l, b));
                false
            }
            None => {
                lane.open -= 1;
                lane.open == 0
            }
        }
    }

    /// Enters lane `l`'s current phase: takes its stage (or queues for it), starts branches.
    fn enter(&mut self, lanes: &mut [Lane], l: usize) {
        let want = lanes[l].program[lanes[l].phase].stage;
        if lanes[l].holds != want {
            if let Some(s) = lanes[l].holds.take() {
                self.release(lanes, s);
            }
            if let Some(s) = want {
                if self.stage_owner[s].is_some() {
                    self.stage_queue[s].push_back(l);
                    return;
                }
                self.stage_owner[s] = Some(l);
                lanes[l].holds = Some(s);
            }
        }
        self.start(lanes, l);
    }

    fn release(&mut self, lanes: &mut [Lane], s: usize) {
        self.stage_owner[s] = None;
        if let Some(q) = self.stage_queue[s].pop_front() {
            self.stage_owner[s] = Some(q);
            lanes[q].holds = Some(s);
            self.start(lanes, q);
        }
    }

    fn start(&mut self, lanes: &mut [Lane], l: usize) {
        let n = lanes[l].program[lanes[l].phase].branches.len();
        lanes[l].next = vec![0; n];
        lanes[l].open = n;
        let mut done = n == 0;
        for b in 0..n {
            done |= self.advance(lanes, l, b);
        }
        if done {
            self.finish_phase(lanes, l);
        }
    }

    fn finish_phase(&mut self, lanes: &mut [Lane], l: usize) {
        lanes[l].phase += 1;
        if lanes[l].phase == lanes[l].program.len() {
            lanes[l].steps += 1;
            lanes[l].finished.push(self.now);
            lanes[l].program.clear();
            return;
        }
        self.enter(lanes, l);
    }
}

/// Simulates `layout.micro_batches` micro-batches of `w.batch` sequences each on one host:
/// all start at once with their prompts, then decode.
pub fn simulate(plan: &SizedPlan, hw: &Hardware, layout: &Layout, w: &Workload) -> HostRun {
    const WARM_STEPS: usize = 3;
    const MEASURED_STEPS: usize = 24;
    let popularity = zipf(plan.model.num_experts, w.routing_skew);
    let b = w.batch.max(1);
    let mb = layout.micro_batches.max(1);
    let context = w.prompt_tokens + w.output_tokens / 2;
    let mut steps = Steps::new(plan, hw, layout, &popularity);
    let mut host = Host {
        parallel: hw.parallel_parts().max(1e-9),
        now: 0.0,
        running: Vec::new(),
        waiting: Vec::new(),
        stage_owner: vec![None; plan.stages.len()],
        stage_queue: vec![VecDeque::new(); plan.stages.len()],
    };
    let prompt = w.prompt_tokens.max(1);
    let mut lanes: Vec<Lane> = (0..mb)
        .map(|_| Lane {
            program: steps.program(b * prompt, b, prompt / 2),
            phase: 0,
            next: Vec::new(),
            open: 0,
            holds: None,
            steps: 0,
            finished: Vec::new(),
        })
        .collect();
    for l in 0..mb {
        host.enter(&mut lanes, l);
    }
    let total = 1 + WARM_STEPS + MEASURED_STEPS;
    while lanes.iter().any(|l| l.steps < total) {
        // Lanes between steps begin their next one.
        for l in 0..mb {
            if lanes[l].program.is_empty() && lanes[l].steps < total {
                lanes[l].program = steps.program(b, b, context);
                lanes[l].phase = 0;
                host.enter(&mut lanes, l);
            }
        }
        let rate = if host.running.len() as f64 <= host.parallel {
            1.0
        } else {
            host.parallel / host.running.len() as f64
        };
        let next_cpu = host
            .running
            .iter()
            .map(|r| r.2 / rate)
            .fold(f64::INFINITY, f64::min);
        let next_wait = host
            .waiting
            .iter()
            .map(|w| w.0 - host.now)
            .fold(f64::INFINITY, f64::min);
        let dt = next_cpu.min(next_wait).max(0.0);
        if !dt.is_finite() {
            // Nothing runs or waits: every lane is queued (cannot happen with free stages).
            break;
        }
        host.now += dt;
        let mut ended = Vec::new();
        host.running.retain_mut(|r| {
            r.2 -= rate * dt;
            if r.2 <= 1e-12 {
                ended.push((r.0, r.1));
                false
            } else {
                true
            }
        });
        let now = host.now;
        host.waiting.retain(|w| {
            if w.0 <= now + 1e-12 {
                ended.push((w.1, w.2));
                false
            } else {
                true
            }
        });
        for (l, b) in ended {
            if host.advance(&mut lanes, l, b) {
                host.finish_phase(&mut lanes, l);
            }
        }
    }
    let first_step = lanes
        .iter()
        .map(|l| l.finished.first().copied().unwrap_or(host.now))
        .sum::<f64>()
        / mb as f64;
    let cycles: Vec<f64> = lanes
        .iter()
        .filter(|l| l.finished.len() > WARM_STEPS + 1)
        .map(|l| {
            let f = &l.finished;
            (f[f.len() - 1] - f[WARM_STEPS]) / (f.len() - 1 - WARM_STEPS) as f64
        })
        .collect();
    HostRun {
        cycle: cycles.iter().sum::<f64>() / cycles.len().max(1) as f64,
        first_step,
    }
}
