//! The shared-host simulation (`moe_plan::host`): its processor sharing against exact
//! answers where there is one, and the orderings it must keep.

use moe_plan::SizedPlan;
use moe_plan::host::simulate;
use moe_plan::perf::{Hardware, Host, Layout, Workload, estimate, gpu_profile};
mod common;

fn plan(stages: usize, shards: usize) -> SizedPlan {
    common::mixtral_plan(stages, shards)
}

fn shared(shards: usize, micro_batches: usize) -> Layout {
    Layout {
        expert_replicas: vec![1; shards],
        micro_batches,
        wire_bytes: 2,
        across_nodes: true,
        shared_device: true,
    }
}

fn work(batch: usize) -> Workload {
    Workload {
        batch,
        prompt_tokens: 64,
        output_tokens: 64,
        routing_skew: 0.0,
    }
}

/// A CPU-like host of `cores` whose hops are all CPU (no pure wait, bytes free) when
/// `cpu_hops`, or an A100's figures with `cores` of them.
fn host(cores: usize, cpu_hops: bool) -> Hardware {
    let mut hw = gpu_profile("a100-80gb").expect("profile");
    if cpu_hops {
        hw.hop_cpu = 100e-6;
        hw.network_latency = 100e-6;
        hw.network_bandwidth = 1e18;
        hw.nvlink_bandwidth = 1e18;
    }
    hw.host = Some(Host {
        cores,
        memory_bandwidth: hw.memory_bandwidth * cores as f64,
        call_chains: None,
    });
    hw
}

#[test]
fn one_core_runs_micro_batches_one_after_another() {
    // With every item CPU and one core, nothing waits idle: N micro-batches take N times one
    // micro-batch's work per step, exactly (processor sharing conserves work).
    let p = plan(2, 2);
    let hw = host(1, true);
    let one = simulate(&p, &hw, &shared(2, 1), &work(4)).cycle;
    let four = simulate(&p, &hw, &shared(2, 4), &work(4)).cycle;
    assert!(
        (four / (4.0 * one) - 1.0).abs() < 0.01,
        "four micro-batches on one core: {four} vs 4 x {one}"
    );
}

#[test]
fn more_cores_never_slow_a_step_and_stop_helping_at_the_work() {
    let p = plan(2, 4);
    let l = shared(4, 4);
    let cycle = |cores| simulate(&p, &host(cores, true), &l, &work(4)).cycle;
    let (c1, c2, c4, c16) = (cycle(1), cycle(2), cycle(4), cycle(16));
    assert!(c1 >= c2 && c2 >= c4 && c4 >= c16, "{c1} {c2} {c4} {c16}");
    assert!(
        c2 < 0.75 * c1,
        "a second core helps four micro-batches: {c2} vs {c1}"
    );
    // Past the parts that can run at once (4 micro-batches, each at most 4 shard calls or
    // one stage), cores change nothing.
    let c64 = cycle(64);
    assert!((c64 / c16 - 1.0).abs() < 0.01, "{c64} vs {c16}");
}

#[test]
fn ample_cores_give_the_separate_devices_step() {
    // One micro-batch with a core for every part: the critical path of the closed form
    // (attention, the slowest shard per layer, hops, the head), sampled alike.
    let p = plan(2, 4);
    let hw = host(64, false);
    let apart = Layout {
        shared_device: false,
        ..shared(4, 1)
    };
    let closed = estimate(&p, &hw, &apart, &work(2)).time_per_output_token;
    let simulated = simulate(&p, &hw, &shared(4, 1), &work(2)).cycle;
    assert!(
        (simulated / closed - 1.0).abs() < 0.1,
        "simulated {simulated} vs closed form {closed}"
    );
}

#[test]
fn a_burst_prefills_before_it_decodes_and_sharing_is_never_faster() {
    let p = plan(2, 2);
    let hw = host(2, true);
    for mb in [1, 2, 4] {
        let run = simulate(&p, &hw, &shared(2, mb), &work(2));
        assert!(run.first_step > run.cycle, "{mb}: {run:?}");
        assert!(run.cycle.is_finite() && run.cycle > 0.0, "{mb}: {run:?}");
    }
    let one = simulate(&p, &hw, &shared(2, 1), &work(2)).cycle;
    let two = simulate(&p, &hw, &shared(2, 2), &work(2)).cycle;
    // Sharing the host never speeds a micro-batch up, and never more than halves the pair's
    // throughput relative to running alone.
    assert!(
        two >= one * 0.999 && two <= 2.0 * one * 1.001,
        "{two} vs {one}"
    );
}
