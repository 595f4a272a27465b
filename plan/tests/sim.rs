//! The simulator against closed-form results: an M/D/1 queue's mean wait, and a saturated
//! pipeline's throughput with fewer and more lanes than stages.

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
