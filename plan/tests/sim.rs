//! The simulator against closed-form results: an M/D/1 queue's mean wait, and a saturated
//! pipeline's throughput with fewer and more lanes than stages.

mod common;

use moe_plan::sim::{SimConfig, simulate};

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
