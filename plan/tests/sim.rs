//! The simulator against closed-form results: an M/D/1 queue's mean wait, a saturated
//! pipeline's throughput with fewer and more lanes than stages, expert shards whose replicas
//! serve stages' calls in parallel; driven by the performance model, the hot shard under skew,
//! and replicas that change while it runs.

mod common;

use std::collections::HashMap;
use std::rc::Rc;

use moe_plan::SizedPlan;
use moe_plan::perf::{Hardware, Layout, gpu_profile, stage_parts, stage_seconds, zipf};
use moe_plan::sim::{
    Call, Deployment, Replicas, SimConfig, SimReport, Visit, priced_step, simulate,
    simulate_deployment,
};

fn config(stages: usize, lanes: usize, batch: usize, rate: f64, output: usize) -> SimConfig {
    SimConfig {
        stages,
        lanes,
        batch,
        arrival_rate: rate,
        prompt_tokens: 1,
        output_tokens: output,
        duration: 0.0,
        horizon: 0.0,
        seed: 7,
    }
}

#[test]
fn one_server_with_poisson_arrivals_waits_as_m_d_1_says() {
    let d = 1e-3;
    for rho in [0.5, 0.7, 0.85] {
        let rate = rho / d;
        let mut c = config(1, 1, 1, rate, 1);
        c.duration = 400_000.0 / rate; // about 400k requests
        let r = simulate(&c, |_, _, _| d);
        let wait = rho * d / (2.0 * (1.0 - rho));
        let want = wait + d;
        let err = (r.ttft_mean - want).abs() / want;
        assert!(
            err < 0.05,
            "rho {rho}: mean time to first token {:.4} ms, M/D/1 says {:.4} ms ({:.1}% off)",
            r.ttft_mean * 1e3,
            want * 1e3,
            err * 100.0
        );
        assert!((r.stage_utilization[0] - rho).abs() < 0.02, "{r:?}");
        assert!(r.ttft_p99 > r.ttft_p50);
    }
}

#[test]
fn a_saturated_pipeline_runs_at_the_rate_of_its_lanes_or_its_stages() {
    let d = 2e-3;
    let (stages, batch) = (4, 8);
    for lanes in [1, 2, 4, 8] {
        // Far more arrivals than it can serve: always full.
        let mut c = config(stages, lanes, batch, 1e5, 1_000_000);
        c.duration = 0.001;
        c.horizon = 2.0;
        let r = simulate(&c, |_, _, _| d);
        // Each step takes `stages` × d; lanes overlap until every stage is busy.
        let steps_per_second = (lanes.min(stages) as f64) / (stages as f64 * d);
        let want = steps_per_second * batch as f64;
        let err = (r.tokens_per_second - want).abs() / want;
        assert!(
            err < 0.02,
            "{lanes} lanes: {:.0} tokens/s, want {want:.0}",
            r.tokens_per_second
        );
        let busy = r.stage_utilization.iter().copied().fold(0.0, f64::max);
        let expect_busy = lanes.min(stages) as f64 / stages as f64;
        assert!((busy - expect_busy).abs() < 0.05, "{lanes} lanes: {r:?}");
    }
}

#[test]
fn driven_by_the_model_s_operator_times_a_saturated_deployment_matches_its_estimate() {
    use moe_plan::perf::{Layout, Workload, estimate, gpu_profile, stage_seconds};
    use moe_plan::{SizingRequest, size};
    let model = common::mixtral();
    let plan = size(&SizingRequest {
        model,
        dtype_bytes: 2,
        expert_millibytes: 0,
        stages: 4,
        expert_shards: Some(0),
        tensor: 1,
        gpus_per_pod: 1,
        gpu_memory_bytes: 80 << 30,
        context_tokens: 4096,
        concurrent_sequences: 64,
    })
    .expect("plan");
    let hw = gpu_profile("a100-80gb").expect("profile");
    let layout = Layout {
        expert_replicas: vec![],
        micro_batches: 4,
        wire_bytes: 2,
        across_nodes: true,
        ..Default::default()
    };
    let (batch, prompt, output) = (16, 128, 200);
    let w = Workload {
        batch,
        prompt_tokens: prompt,
        output_tokens: output,
        routing_skew: 0.0,
    };
    let e = estimate(&plan, &hw, &layout, &w);
    let context = prompt + output / 2;
    let mut c = config(4, 4, batch, 1e4, output);
    c.prompt_tokens = prompt;
    // Always more requests waiting than lanes take, until the horizon.
    c.duration = 0.5;
    c.horizon = 30.0;
    let r = simulate(&c, |s, rows, seqs| {
        // Decode steps at the model's mean context; prompt rows at their own.
        let ctx = if rows > seqs { prompt / 2 } else { context };
        stage_seconds(&plan, &hw, &layout, 0.0, rows, seqs, ctx)[s]
    });
    // The closed form leaves out the prompt rows of sequences joining a running lane (here
    // 128 prompt rows per 200 tokens generated): the simulation may be a few percent slower.
    let err = (r.tokens_per_second - e.tokens_per_second).abs() / e.tokens_per_second;
    eprintln!(
        "simulated {:.0} tokens/s, {:.2} ms per token; the model: {:.0}, {:.2}",
        r.tokens_per_second,
        r.tpot_mean * 1e3,
        e.tokens_per_second,
        e.time_per_output_token * 1e3
    );
    assert!(
        err < 0.1,
        "simulated {:.0} tokens/s, the model says {:.0}",
        r.tokens_per_second,
        e.tokens_per_second
    );
    assert!(r.finished >= 64, "{r:?}");
    assert!(
        (r.tpot_mean - e.time_per_output_token).abs() / e.time_per_output_token < 0.1,
        "simulated {:.2} ms per token, the model says {:.2}",
        r.tpot_mean * 1e3,
        e.time_per_output_token * 1e3
    );
}

/// Every stage computes `compute` seconds, then calls each shard j for `calls[s][j]` seconds
/// (stage s; the last row for the stages beyond); `control(now)` gives the replicas wanted at
/// `now`, if any.
struct Fixed<C> {
    stages: usize,
    compute: f64,
    calls: Vec<Vec<f64>>,
    control: C,
}

impl<C: FnMut(f64) -> Option<Vec<usize>>> Deployment for Fixed<C> {
    fn step(&mut self, _now: f64, _rows: usize, _sequences: usize) -> Rc<[Visit]> {
        let last = self.calls.len().saturating_sub(1);
        (0..self.stages)
            .map(|s| Visit {
                compute: self.compute,
                calls: self.calls[s.min(last)]
                    .iter()
                    .enumerate()
                    .map(|(shard, &seconds)| Call {
                        shard,
                        seconds,
                        rows: 1.0,
                    })
                    .collect(),
            })
            .collect()
    }

    fn control(&mut self, now: f64, _routed: &[f64], _held: &[usize]) -> Option<Vec<usize>> {
        (self.control)(now)
    }
}

#[test]
fn a_shard_s_replicas_serve_the_stages_calls_in_parallel() {
    // Four stages each call one shard for 1 ms after 0.1 ms of their own; four lanes, always
    // full. One replica serves the four calls of a step one after another (250 steps/s); two
    // serve two at once (500); four never make a call wait, and the stages bound the rate
    // (one visit 1.1 ms: 909 steps/s).
    let (stages, c, d) = (4, 1e-4, 1e-3);
    for (replicas, want) in [
        (1, 1.0 / (4.0 * d)),
        (2, 2.0 / (4.0 * d)),
        (4, 1.0 / (c + d)),
    ] {
        let mut cfg = config(stages, 4, 1, 1e5, 1_000_000);
        cfg.duration = 0.001;
        cfg.horizon = 4.0;
        let mut dep = Fixed {
            stages,
            compute: c,
            calls: vec![vec![d]],
            control: |_| None,
        };
        let r = simulate_deployment(&cfg, &Replicas::fixed(vec![replicas]), &mut dep);
        let err = (r.tokens_per_second - want).abs() / want;
        assert!(
            err < 0.02,
            "{replicas} replicas: {:.0} steps/s, want {want:.0}",
            r.tokens_per_second
        );
        let calls_per_second = r.shard_calls[0] as f64 / cfg.horizon;
        let busy = calls_per_second * d / replicas as f64;
        assert!(
            (r.shard_utilization[0] - busy).abs() < 0.01,
            "{replicas} replicas: {r:?}"
        );
        if replicas == 4 {
            // As many replicas as stages: the fewest-outstanding replica is always idle.
            assert_eq!(r.shard_wait[0], 0.0, "{r:?}");
            assert!(r.shard_utilization[0] < 0.95, "{r:?}");
        } else {
            assert!(r.shard_utilization[0] > 0.98, "{r:?}");
            assert!(r.shard_wait[0] > 0.0, "{r:?}");
        }
    }
}

#[test]
fn a_call_goes_to_the_replica_with_the_fewest_outstanding_calls() {
    // Three stages, three lanes, one shard of two replicas: stage 0's call takes 10 ms, the
    // others' 1 ms. At most two calls are out at once (stage 0's and one short one), so the
    // fewest-outstanding replica is always idle: no call waits and stage 0 sets the rate.
    // Taking replicas in turn instead would put every other short call behind a long one.
    let (c, long, short) = (1e-4, 1e-2, 1e-3);
    let mut cfg = config(3, 3, 1, 1e5, 1_000_000);
    cfg.duration = 0.001;
    cfg.horizon = 5.0;
    let mut dep = Fixed {
        stages: 3,
        compute: c,
        calls: vec![vec![long], vec![short]],
        control: |_| None,
    };
    let r = simulate_deployment(&cfg, &Replicas::fixed(vec![2]), &mut dep);
    assert_eq!(r.shard_wait[0], 0.0, "{r:?}");
    let want = 1.0 / (c + long);
    assert!(
        (r.tokens_per_second - want).abs() / want < 0.02,
        "{:.1} steps/s, want {want:.1}",
        r.tokens_per_second
    );
    // One replica: the short calls queue behind the long ones.
    let one = simulate_deployment(&cfg, &Replicas::fixed(vec![1]), &mut dep);
    assert!(one.shard_wait[0] > 1e-3, "{one:?}");
}

#[test]
fn replicas_serve_after_their_startup_and_removed_ones_take_no_calls() {
    // Shard 0: 3 replicas asked for at t=1 (ready at 3.5 s), one of them cancelled at t=2
    // while starting, one removed at t=6; 11 s in all.
    let mut cfg = config(2, 2, 1, 1e4, 1_000_000);
    cfg.duration = 11.0;
    cfg.horizon = 11.0;
    let want = |now: f64| match now {
        t if (t - 1.0).abs() < 1e-9 => Some(vec![3]),
        t if (t - 2.0).abs() < 1e-9 => Some(vec![2]),
        t if (t - 6.0).abs() < 1e-9 => Some(vec![1]),
        _ => None,
    };
    let mut dep = Fixed {
        stages: 2,
        compute: 1e-4,
        calls: vec![vec![1e-3]],
        control: want,
    };
    let replicas = Replicas {
        initial: vec![1],
        startup: 2.5,
        control_interval: 1.0,
    };
    let r = simulate_deployment(&cfg, &replicas, &mut dep);
    // Serving: 1 on [0, 3.5), 2 on [3.5, 6), 1 on [6, 11).
    let mean = (3.5 + 2.0 * 2.5 + 5.0) / 11.0;
    assert!((r.shard_replicas[0] - mean).abs() < 1e-6, "{r:?}");
    assert_eq!(r.replica_changes, 4, "{r:?}");
    assert_eq!(r.peak_replicas, 3, "{r:?}");
    // Two stages, two lanes: with two replicas neither call waits; with one, they queue.
    let one = simulate_deployment(&cfg, &Replicas::fixed(vec![1]), &mut dep);
    assert!(one.shard_wait[0] > r.shard_wait[0], "{one:?} vs {r:?}");
}

fn mixtral_plan(stages: usize, shards: usize) -> SizedPlan {
    common::mixtral_plan(stages, shards)
}

/// The plan on the model's operator times, popularity fixed.
struct Modelled<'a> {
    plan: &'a SizedPlan,
    hw: &'a Hardware,
    layout: Layout,
    popularity: Vec<f64>,
    prompt: usize,
    context: usize,
    steps: HashMap<(usize, usize), Rc<[Visit]>>,
}

impl Deployment for Modelled<'_> {
    fn step(&mut self, _now: f64, rows: usize, sequences: usize) -> Rc<[Visit]> {
        let (plan, hw, layout, popularity) = (self.plan, self.hw, &self.layout, &self.popularity);
        let (prompt, context) = (self.prompt, self.context);
        self.steps
            .entry((rows, sequences))
            .or_insert_with(|| {
                priced_step(
                    plan, hw, layout, popularity, rows, sequences, prompt, context,
                )
            })
            .clone()
    }
}

#[test]
fn stage_parts_add_up_to_the_stage_s_seconds_and_route_every_row() {
    // Four shards of two experts over all layers: every layer's slowest shard is the same.
    let plan = mixtral_plan(2, 4);
    let hw = gpu_profile("a100-80gb").expect("profile");
    let layout = Layout::default();
    for skew in [0.0, 1.2] {
        let popularity = zipf(8, skew);
        // Prompt rows (the model samples routings only for a few rows).
        let (rows, seqs, ctx) = (512, 1, 256);
        let parts = stage_parts(&plan, &hw, &layout, &popularity, rows, seqs, ctx);
        let whole = stage_seconds(&plan, &hw, &layout, skew, rows, seqs, ctx);
        assert_eq!(parts.len(), whole.len());
        for (p, w) in parts.iter().zip(&whole) {
            let slowest = p.shard_seconds.iter().copied().fold(0.0, f64::max);
            assert!(
                ((p.compute + slowest) - w).abs() / w < 1e-9,
                "zipf {skew}: {p:?} vs {w}"
            );
            assert!(p.compute > 0.0 && slowest > 0.0, "{p:?}");
            // Every routed row of the stage's 16 layers lands on some shard.
            let routed: f64 = p.shard_rows.iter().sum();
            let want = (rows * 2 * 16) as f64;
            assert!((routed - want).abs() / want < 1e-9, "{routed} vs {want}");
        }
        if skew > 0.0 {
            // Experts 0 and 1 (shard 0) take the most rows, and the longest call.
            let p = &parts[0];
            assert!(p.shard_rows[0] > 2.0 * p.shard_rows[1], "{p:?}");
            assert!(p.shard_seconds[0] > p.shard_seconds[3], "{p:?}");
        }
    }
    // Without expert shards the stage computes everything: no calls.
    let alone = mixtral_plan(2, 0);
    let parts = stage_parts(&alone, &hw, &layout, &zipf(8, 0.0), 8, 8, 600);
    let whole = stage_seconds(&alone, &hw, &layout, 0.0, 8, 8, 600);
    for (p, w) in parts.iter().zip(&whole) {
        assert!(p.shard_seconds.is_empty() && (p.compute - w).abs() < 1e-12);
    }
}

fn run_modelled(plan: &SizedPlan, skew: f64, replicas: Vec<usize>) -> SimReport {
    let hw = gpu_profile("a100-80gb").expect("profile");
    let (batch, prompt, output) = (16, 128, 200);
    let mut dep = Modelled {
        plan,
        hw: &hw,
        layout: Layout::default(),
        popularity: zipf(plan.model.num_experts, skew),
        prompt,
        context: prompt + output / 2,
        steps: HashMap::new(),
    };
    let mut c = config(plan.stages.len(), 4, batch, 1e4, output);
    c.prompt_tokens = prompt;
    c.duration = 0.5;
    c.horizon = 30.0;
    simulate_deployment(&c, &Replicas::fixed(replicas), &mut dep)
}

#[test]
fn under_skew_the_hot_experts_shard_queues_and_a_replica_there_helps() {
    let plan = mixtral_plan(4, 4);
    let uniform = run_modelled(&plan, 0.0, vec![1; 4]);
    let skewed = run_modelled(&plan, 1.2, vec![1; 4]);
    eprintln!("uniform routing: {uniform:?}\nzipf 1.2: {skewed:?}");
    // Uniform routing: the shards are alike.
    let (lo, hi) = uniform
        .shard_utilization
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &u| (lo.min(u), hi.max(u)));
    assert!(hi - lo < 0.02, "{uniform:?}");
    // Skewed: shard 0 holds experts 0 and 1; the shards are busy in the order of their
    // experts' popularity, and shard 0's calls wait the longest by far.
    for j in 1..4 {
        assert!(
            skewed.shard_utilization[j - 1] > skewed.shard_utilization[j] + 0.02,
            "{skewed:?}"
        );
        assert!(
            skewed.shard_wait[0] > 3.0 * skewed.shard_wait[j],
            "{skewed:?}"
        );
    }
    let e = moe_plan::perf::estimate(
        &plan,
        &gpu_profile("a100-80gb").expect("profile"),
        &Layout {
            micro_batches: 4,
            ..Layout::default()
        },
        &moe_plan::perf::Workload {
            batch: 16,
            prompt_tokens: 128,
            output_tokens: 200,
            routing_skew: 0.0,
        },
    );
    // Uniform routing, the shards saturated: the closed form's bound (the busiest shard's
    // seconds per micro-batch) holds within a few percent.
    let err = (uniform.tokens_per_second - e.tokens_per_second).abs() / e.tokens_per_second;
    assert!(
        err < 0.05,
        "simulated {:.0} tokens/s, the closed form {:.0}",
        uniform.tokens_per_second,
        e.tokens_per_second
    );
    // A second replica of shard 0 halves its busy share (its calls rise a little with the
    // rate), its calls stop waiting, and the rate rises until shard 1 bounds it.
    let helped = run_modelled(&plan, 1.2, vec![2, 1, 1, 1]);
    eprintln!("two replicas of shard 0: {helped:?}");
    let ratio = helped.shard_utilization[0] / skewed.shard_utilization[0];
    let calls = helped.shard_calls[0] as f64 / skewed.shard_calls[0] as f64;
    assert!(
        (ratio - calls / 2.0).abs() < 0.03,
        "busy share {ratio:.3} of one replica's, calls {calls:.3}: {helped:?}"
    );
    assert!(
        helped.shard_wait[0] < skewed.shard_wait[0] / 10.0,
        "{helped:?}"
    );
    assert!(helped.tokens_per_second > skewed.tokens_per_second * 1.03);
}
