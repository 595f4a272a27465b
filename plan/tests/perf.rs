//! Invariants of the performance model: decode at batch 1 is bound by memory bandwidth, at
//! large batch by compute; more batch never lowers throughput nor shortens a token's time;
//! replicas of the hot shard help under skew; micro-batches fill the pipeline.

use moe_plan::perf::{Estimate, Layout, Workload, estimate, gpu_profile, zipf};
mod common;

use common::mixtral;
use moe_plan::{SizedPlan, SizingRequest, size};

fn plan(stages: usize, shards: usize) -> SizedPlan {
    common::mixtral_plan(stages, shards)
}

fn layout(shards: usize, micro_batches: usize) -> Layout {
    Layout {
        expert_replicas: vec![1; shards],
        micro_batches,
        wire_bytes: 2,
        across_nodes: true,
        ..Default::default()
    }
}

fn work(batch: usize) -> Workload {
    Workload {
        batch,
        prompt_tokens: 512,
        output_tokens: 256,
        routing_skew: 0.0,
    }
}

fn run(
    p: &SizedPlan,
    hw_tweak: impl Fn(&mut moe_plan::perf::Hardware),
    l: &Layout,
    w: &Workload,
) -> Estimate {
    let mut hw = gpu_profile("a100-80gb").expect("profile");
    hw_tweak(&mut hw);
    estimate(p, &hw, l, w)
}

#[test]
fn batch_one_is_bound_by_bandwidth_and_a_large_batch_by_compute() {
    let p = plan(2, 4);
    let l = layout(4, 1);
    // Fixed costs per operator apart: the rooflines alone.
    let base = |b| run(&p, |h| h.op_overhead = 0.0, &l, &work(b));
    let more_flops = |b| {
        run(
            &p,
            |h| {
                h.op_overhead = 0.0;
                h.peak_flops *= 2.0
            },
            &l,
            &work(b),
        )
    };
    let more_bw = |b| {
        run(
            &p,
            |h| {
                h.op_overhead = 0.0;
                h.memory_bandwidth *= 2.0
            },
            &l,
            &work(b),
        )
    };
    let (t, f, m) = (base(1), more_flops(1), more_bw(1));
    let compute_part = |e: &Estimate| e.step_attention + e.step_experts;
    assert!(
        (compute_part(&f) - compute_part(&t)).abs() / compute_part(&t) < 0.01,
        "batch 1 does not depend on FLOP/s: {t:?} vs {f:?}"
    );
    assert!(
        compute_part(&m) < 0.55 * compute_part(&t),
        "batch 1 halves with the bandwidth: {t:?} vs {m:?}"
    );
    // Large batch with a short context: the products dominate (long contexts make attention
    // read the KV cache, bandwidth again).
    let short = |b| {
        let mut w = work(b);
        w.prompt_tokens = 16;
        w.output_tokens = 16;
        w
    };
    let (t, f, m) = (
        run(&p, |_| {}, &l, &short(2048)),
        run(&p, |h| h.peak_flops *= 2.0, &l, &short(2048)),
        run(&p, |h| h.memory_bandwidth *= 2.0, &l, &short(2048)),
    );
    assert!(
        compute_part(&f) < 0.6 * compute_part(&t),
        "batch 2048 follows the FLOP/s: {t:?} vs {f:?}"
    );
    assert!(
        compute_part(&m) > 0.85 * compute_part(&t),
        "batch 2048 barely depends on bandwidth: {t:?} vs {m:?}"
    );
}

#[test]
fn more_batch_never_lowers_throughput_nor_shortens_a_token() {
    let p = plan(4, 8);
    let l = layout(8, 4);
    let mut last: Option<Estimate> = None;
    for b in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
        let e = run(&p, |_| {}, &l, &work(b));
        if let Some(prev) = &last {
            assert!(
                e.tokens_per_second >= prev.tokens_per_second * 0.999,
                "batch {b}: {prev:?} -> {e:?}"
            );
            assert!(
                e.time_per_output_token >= prev.time_per_output_token * 0.999,
                "batch {b}"
            );
        }
        assert!(e.stage_utilization <= 1.0 && e.expert_utilization <= 1.0);
        assert!(e.cost_per_million_tokens > 0.0);
        last = Some(e);
    }
}

#[test]
fn micro_batches_fill_the_pipeline_up_to_its_depth() {
    // Stages computing their own experts: four equal stages.
    let p = plan(4, 0);
    let one = run(&p, |_| {}, &layout(0, 1), &work(16));
    let four = run(&p, |_| {}, &layout(0, 4), &work(16));
    let eight = run(&p, |_| {}, &layout(0, 8), &work(16));
    assert!(
        four.tokens_per_second > 2.5 * one.tokens_per_second,
        "{one:?} {four:?}"
    );
    // Past the depth, more micro-batches only wait on the busiest part.
    assert!(
        eight.tokens_per_second < 1.5 * four.tokens_per_second,
        "{four:?} {eight:?}"
    );
    assert!(eight.time_per_output_token > four.time_per_output_token);

    // Expert shards that each hold every layer (experts split, not layers) work in every
    // layer of every micro-batch: they bound the pipeline, whatever its depth.
    let p = plan(4, 4);
    assert!(p.expert_shards.iter().all(|s| s.layout.layers() == (0..32)));
    let one = run(&p, |_| {}, &layout(4, 1), &work(16));
    let four = run(&p, |_| {}, &layout(4, 4), &work(16));
    assert!(
        four.tokens_per_second < 2.0 * one.tokens_per_second,
        "{one:?} {four:?}"
    );
    assert!(four.expert_utilization > 0.99, "{four:?}");
}

#[test]
fn under_skew_a_replica_of_the_hot_shard_helps_and_one_of_a_cold_shard_does_not() {
    let p = plan(1, 4);
    let mut w = work(256);
    w.routing_skew = 1.2;
    let pop = zipf(8, 1.2);
    assert!(pop[0] > 3.0 * pop[7]);
    let base = run(&p, |_| {}, &layout(4, 1), &w);
    let hot_shard = p
        .expert_shards
        .iter()
        .position(|s| s.layout.experts.contains(&0))
        .expect("expert 0's shard");
    let cold_shard = p
        .expert_shards
        .iter()
        .position(|s| s.layout.experts.contains(&7))
        .expect("expert 7's shard");
    assert_ne!(hot_shard, cold_shard);
    let mut hot = layout(4, 1);
    hot.expert_replicas[hot_shard] = 2;
    let mut cold = layout(4, 1);
    cold.expert_replicas[cold_shard] = 2;
    let hot = run(&p, |_| {}, &hot, &w);
    let cold = run(&p, |_| {}, &cold, &w);
    assert!(
        hot.tokens_per_second > 1.05 * base.tokens_per_second,
        "{base:?} {hot:?}"
    );
    assert!(
        cold.tokens_per_second < 1.01 * base.tokens_per_second,
        "{base:?} {cold:?}"
    );
    assert_eq!(hot.gpus, base.gpus + 1);
}

#[test]
fn a_few_tokens_wait_for_their_slowest_shard() {
    // Batch 1, top-2 of 8 experts: on one shard a layer reads both experts; on two shards of
    // four the two land on one shard 3 times in 7, so the wait is 1 + 3/7 experts, not the
    // 0.88 experts each shard reads on average.
    let w = work(1);
    let roomy = |shards| {
        size(&SizingRequest {
            model: mixtral(),
            dtype_bytes: 2,
            expert_millibytes: 0,
            stages: 1,
            expert_shards: Some(shards),
            tensor: 1,
            gpus_per_pod: 1,
            gpu_memory_bytes: 160 << 30,
            context_tokens: 4096,
            concurrent_sequences: 64,
        })
        .expect("plan")
    };
    let one = run(&roomy(1), |_| {}, &layout(1, 1), &w);
    let two = run(&roomy(2), |_| {}, &layout(2, 1), &w);
    let ratio = two.step_experts / one.step_experts;
    assert!(
        (0.64..0.79).contains(&ratio),
        "two shards wait {ratio:.2} of one shard's expert time (expected ~0.71)"
    );
}

#[test]
fn parts_sharing_one_device_take_turns() {
    use moe_plan::perf::Host;
    let p = plan(4, 4);
    let shared = Layout {
        shared_device: true,
        ..layout(4, 4)
    };
    let w = work(8);
    let chained = |n: usize, bw: f64, chains: Option<f64>| {
        move |h: &mut moe_plan::perf::Hardware| {
            h.host = Some(Host {
                cores: n,
                memory_bandwidth: h.memory_bandwidth * bw,
                call_chains: chains,
            })
        }
    };
    let cores = |n: usize, bw: f64| chained(n, bw, None);
    let apart = run(&p, |_| {}, &layout(4, 4), &w);
    let one = run(&p, cores(1, 1.0), &shared, &w);
    let four = run(&p, cores(4, 4.0), &shared, &w);
    let starved = run(&p, cores(4, 1.5), &shared, &w);
    let handing_off = run(&p, chained(4, 4.0, Some(1.5)), &shared, &w);
    assert!(
        one.tokens_per_second < 0.6 * apart.tokens_per_second,
        "one device for all parts is slower than a device each: {one:?} vs {apart:?}"
    );
    assert!(
        four.tokens_per_second > 1.5 * one.tokens_per_second,
        "four cores run parts at once: {four:?} vs {one:?}"
    );
    assert!(
        starved.tokens_per_second < 0.7 * four.tokens_per_second,
        "cores that share too little bandwidth do not help: {starved:?} vs {four:?}"
    );
    assert!(
        handing_off.tokens_per_second < 0.7 * four.tokens_per_second,
        "a host that runs fewer chains of calls than cores is held to them: {handing_off:?} vs {four:?}"
    );
}
