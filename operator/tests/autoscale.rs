//! The expert-autoscaling policy, pure: Zipf-skewed loads, noise, bounds and budget, the
//! scale-down window, the cooldown; and reading the gateway's statistics.
#![allow(clippy::unwrap_used)]

use moe_operator::autoscale::{
    Params, Sample, ShardLoad, State, allocate, decide, imbalance, parse_stats, shard_rates,
};
use moe_operator::bench::{Rng, zipf};
use moe_operator::controller::shard_replicas;
use moe_operator::crd::{AutoscalingDriver, ExpertShardStatus, MoEDeployment, MoEDeploymentStatus};
use moe_plan::ExpertShardPlan;
use serde_json::json;

fn params(target: Option<f64>, budget: i32, stab: f64, cool: f64) -> Params {
    Params {
        target_per_replica: target,
        budget,
        stabilization_s: stab,
        cooldown_s: cool,
    }
}

fn shards(loads: &[f64], current: &[i32], min: i32, max: i32) -> Vec<ShardLoad> {
    loads
        .iter()
        .zip(current)
        .map(|(&l, &c)| ShardLoad {
            tokens_per_second: l,
            current: c,
            min,
            max,
        })
        .collect()
}

/// The greedy allocation is min-max optimal: no replica can move from one shard to another
/// and lower the busiest replica's load.
fn assert_min_max(loads: &[f64], r: &[i32], lo: i32) {
    let busiest = loads
        .iter()
        .zip(r)
        .map(|(l, &r)| l / f64::from(r))
        .fold(0.0, f64::max);
    for (j, (&l, &rj)) in loads.iter().zip(r).enumerate() {
        if rj > lo {
            assert!(
                l / f64::from(rj - 1) >= busiest - 1e-9,
                "shard {j} could give a replica away: {r:?} for {loads:?}"
            );
        }
    }
}

#[test]
fn zipf_loads_get_replicas_in_proportion() {
    // 8 shards, Zipf(1.2) over them, 24 replicas, no target: the whole budget by load.
    let loads: Vec<f64> = zipf(8, 1.2).iter().map(|w| w * 1000.0).collect();
    let r = allocate(&loads, &[1; 8], &[24; 8], 24, None);
    assert_eq!(r.iter().sum::<i32>(), 24);
    assert_eq!(r, vec![9, 4, 3, 2, 2, 2, 1, 1]);
    assert!(
        r.windows(2).all(|w| w[0] >= w[1]),
        "hotter shards get more: {r:?}"
    );
    assert_min_max(&loads, &r, 1);
    assert!(imbalance(&loads, &r) <= 1.25, "{}", imbalance(&loads, &r));
    assert!(imbalance(&loads, &[3; 8]) > 2.5);

    // With a target, only what the load needs: ceil(load / target), within max and budget.
    let loads = [900.0, 300.0, 50.0, 0.0];
    assert_eq!(
        allocate(&loads, &[1; 4], &[4; 4], 10, Some(200.0)),
        vec![4, 2, 1, 1]
    );
    assert_eq!(
        allocate(&loads, &[1; 4], &[4; 4], 6, Some(200.0)),
        vec![3, 1, 1, 1]
    );
    // No load: every shard stays at its minimum.
    assert_eq!(
        allocate(&[0.0; 3], &[2, 1, 1], &[5; 3], 15, None),
        vec![2, 1, 1]
    );
}

#[test]
fn a_hot_shard_scales_up_at_once_and_down_after_the_window() {
    let p = params(Some(100.0), 8, 300.0, 0.0);
    let mut st = State::default();
    let mut cur = vec![1, 1];
    let mut t = 0.0;
    // Hot: 350 tok/s on shard 0 needs 4 replicas.
    let d = decide(&p, &shards(&[350.0, 50.0], &cur, 1, 4), &mut st, t);
    assert_eq!(d.desired, vec![4, 1]);
    assert_eq!(d.changes, vec![(0, 1, 4)]);
    assert!(d.reason.contains("shard 0 1→4"), "{}", d.reason);
    cur = d.desired;
    while t < 100.0 {
        t += 5.0;
        cur = decide(&p, &shards(&[350.0, 50.0], &cur, 1, 4), &mut st, t).desired;
    }
    // The load stops at t = 100; the last high recommendation was at t = 100.
    let mut down_at = None;
    while t < 600.0 {
        t += 5.0;
        let d = decide(&p, &shards(&[0.0, 0.0], &cur, 1, 4), &mut st, t);
        if d.desired != cur && down_at.is_none() {
            down_at = Some(t);
            assert_eq!(d.desired, vec![1, 1]);
        } else if down_at.is_none() {
            assert!(d.reason.contains("stabilisation"), "{}", d.reason);
        }
        cur = d.desired;
    }
    let down_at = down_at.unwrap();
    assert!(
        (400.0..=410.0).contains(&down_at),
        "scaled down at {down_at}"
    );
}

#[test]
fn a_fresh_autoscaler_does_not_shrink_before_a_window() {
    // An operator restart: replicas 3, no load seen yet.
    let p = params(Some(100.0), 8, 60.0, 0.0);
    let mut st = State::default();
    let mut t = 0.0;
    while t < 55.0 {
        let d = decide(&p, &shards(&[10.0], &[3], 1, 4), &mut st, t);
        assert_eq!(d.desired, vec![3], "t = {t}");
        t += 5.0;
    }
    let d = decide(&p, &shards(&[10.0], &[3], 1, 4), &mut st, 65.0);
    assert_eq!(d.desired, vec![1]);
}

#[test]
fn the_cooldown_separates_changes() {
    let p = params(Some(100.0), 12, 0.0, 60.0);
    let mut st = State::default();
    let d = decide(&p, &shards(&[250.0], &[1], 1, 6), &mut st, 0.0);
    assert_eq!(d.desired, vec![3]);
    let d = decide(&p, &shards(&[550.0], &[3], 1, 6), &mut st, 30.0);
    assert_eq!(d.desired, vec![3]);
    assert!(d.reason.contains("cooldown"), "{}", d.reason);
    let d = decide(&p, &shards(&[550.0], &[3], 1, 6), &mut st, 61.0);
    assert_eq!(d.desired, vec![6]);
}

#[test]
fn scale_ups_wait_for_the_budget_while_a_cold_shard_is_held() {
    let p = params(Some(100.0), 5, 120.0, 0.0);
    let mut st = State::default();
    // Shard 1 was hot and has 3 replicas; shard 0 becomes hot.
    let d = decide(&p, &shards(&[300.0, 10.0], &[2, 3], 1, 4), &mut st, 0.0);
    assert_eq!(d.desired, vec![2, 3], "{}", d.reason);
    assert!(d.reason.contains("budget"), "{}", d.reason);
    let d = decide(&p, &shards(&[300.0, 10.0], &[2, 3], 1, 4), &mut st, 125.0);
    assert_eq!(d.desired, vec![3, 1]);
    assert!(d.desired.iter().sum::<i32>() <= 5);
}

/// Simulates `ticks` decisions 5 s apart on `truth` plus uniform noise of ±`noise`, through the
/// moving average; returns every shard's replica history.
fn simulate(p: &Params, truth: &[f64], noise: f64, ticks: usize, seed: u64) -> Vec<Vec<i32>> {
    let mut rng = Rng::new(seed);
    let mut st = State::default();
    let mut cur = vec![1; truth.len()];
    let mut hist = Vec::new();
    for i in 0..ticks {
        let now = i as f64 * 5.0;
        let sample: Vec<f64> = truth
            .iter()
            .map(|l| l * (1.0 + noise * (2.0 * rng.f64() - 1.0)))
            .collect();
        let smoothed = st.smooth(now, &sample, 20.0).to_vec();
        let d = decide(p, &shards(&smoothed, &cur, 1, 8), &mut st, now);
        cur = d.desired;
        hist.push(cur.clone());
    }
    hist
}

/// A shard flaps when its replicas go up and later down again (or down, then up).
fn reversals(hist: &[Vec<i32>]) -> usize {
    let n = hist[0].len();
    (0..n)
        .map(|j| {
            let mut dirs = Vec::new();
            for w in hist.windows(2) {
                if w[1][j] != w[0][j] {
                    dirs.push(w[1][j] > w[0][j]);
                }
            }
            dirs.windows(2).filter(|d| d[0] != d[1]).count()
        })
        .sum()
}

#[test]
fn noise_around_a_steady_state_does_not_flap() {
    // Loads right at replica boundaries (2.0 and 3.0 × target), ±30% noise every 5 s, for
    // almost 3 hours; and the budget-driven mode with two shards of equal load per replica.
    let with_target = params(Some(100.0), 20, 300.0, 60.0);
    let budget_only = params(None, 9, 300.0, 60.0);
    for seed in 0..5 {
        let h = simulate(&with_target, &[200.0, 300.0, 120.0], 0.3, 2000, seed);
        assert_eq!(reversals(&h), 0, "seed {seed}");
        let changes = h.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 3, "seed {seed}: {changes} changes");

        let h = simulate(&budget_only, &[400.0, 200.0, 200.0], 0.3, 2000, seed);
        assert_eq!(reversals(&h), 0, "seed {seed}");
        assert!(h.iter().all(|r| r.iter().sum::<i32>() <= 9));
        let changes = h.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 3, "seed {seed}: {changes} changes");
    }
}

#[test]
fn bounds_and_budget_always_hold() {
    let mut rng = Rng::new(42);
    for case in 0..400 {
        let n = 1 + rng.below(10);
        let min = 1 + rng.below(3) as i32;
        let max = min + rng.below(6) as i32;
        let sum_lo = n as i32 * min;
        let budget = sum_lo + rng.below(3 * n + 1) as i32;
        let target = (rng.below(3) > 0).then(|| 1.0 + 500.0 * rng.f64());
        let p = params(target, budget, 60.0 * rng.f64(), 30.0 * rng.f64());
        let mut st = State::default();
        // Start within bounds and budget.
        let mut cur = vec![min; n];
        for t in 0..60 {
            let loads: Vec<f64> = (0..n)
                .map(|_| match rng.below(5) {
                    0 => 0.0,
                    _ => 2000.0 * rng.f64().powi(3),
                })
                .collect();
            let d = decide(&p, &shards(&loads, &cur, min, max), &mut st, t as f64 * 5.0);
            for &r in &d.desired {
                assert!(
                    (min..=max).contains(&r),
                    "case {case}: {r} outside {min}..={max}"
                );
            }
            assert!(
                d.desired.iter().sum::<i32>() <= budget,
                "case {case}: {:?} over budget {budget}",
                d.desired
            );
            let rec = allocate(&loads, &vec![min; n], &vec![max; n], budget, target);
            if target.is_none() && rec.iter().sum::<i32>() < budget {
                // Every shard with load is at its maximum when budget is left over.
                assert!(loads.iter().zip(&rec).all(|(&l, &r)| l == 0.0 || r == max));
            }
            cur = d.desired;
        }
    }
}

fn shard(index: usize, layers: std::ops::Range<usize>, experts: &[usize]) -> ExpertShardPlan {
    ExpertShardPlan {
        index,
        layer_start: layers.start,
        layer_end: layers.end,
        experts: experts.to_vec(),
    }
}

#[test]
fn statistics_become_tokens_per_second_per_shard() {
    let layout = [shard(0, 0..4, &[0, 1, 2, 3]), shard(1, 0..4, &[4, 5, 6, 7])];
    let body = |t0: u64, t5: u64| {
        json!({
            "gateway": {"steps": 1},
            "stages": [{"index": 0, "batches": 1}, {"index": 1, "batches": 1}],
            "experts": [
                {"layer": 0, "expert": 0, "tokens": t0},
                {"layer": 3, "expert": 1, "tokens": 10},
                {"layer": 2, "expert": 5, "tokens": t5},
            ],
        })
    };
    let a = parse_stats(&body(100, 40), 10.0).unwrap();
    let b = parse_stats(&body(300, 60), 12.0).unwrap();
    assert_eq!(a.tokens.len(), 3);
    assert_eq!(shard_rates(&layout, &a, &b).unwrap(), vec![100.0, 10.0]);
    // A counter that went down was reset: it counts from zero.
    let c = parse_stats(&body(50, 70), 14.0).unwrap();
    assert_eq!(shard_rates(&layout, &b, &c).unwrap(), vec![25.0, 5.0]);
    assert!(shard_rates(&layout, &b, &b).is_none());
    // A stage that did not answer: no sample.
    let partial = json!({"stages": [{"index": 0, "error": "unavailable"}], "experts": []});
    assert!(parse_stats(&partial, 1.0).is_none());
    let empty = Sample::default();
    assert_eq!(
        shard_rates(&layout, &empty, &Sample { at: 1.0, ..b }).unwrap(),
        vec![310.0, 60.0]
    );
}

#[test]
fn the_moving_average_follows_with_its_time_constant() {
    let mut st = State::default();
    assert_eq!(st.smooth(0.0, &[100.0], 20.0), &[100.0]);
    let after = st.smooth(20.0, &[0.0], 20.0)[0];
    assert!((after - 100.0 * (-1f64).exp()).abs() < 1e-9, "{after}");
}

fn tiny() -> MoEDeployment {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.yaml");
    moe_operator::cli::read_manifest(&path).unwrap()
}

#[test]
fn reconcile_writes_the_decision_or_leaves_replicas_to_the_hpa() {
    let mut md = tiny();
    assert_eq!(
        md.spec.experts.autoscaling.driver,
        AutoscalingDriver::Operator
    );
    // No decision, no status: minReplicas.
    assert_eq!(shard_replicas(&md, 2, None), vec![Some(1), Some(1)]);
    // A decision, kept within min/max (tiny: 1..=3).
    assert_eq!(
        shard_replicas(&md, 2, Some(&[3, 5])),
        vec![Some(3), Some(3)]
    );
    // Before the first decision after a restart: what status showed.
    md.status = Some(MoEDeploymentStatus {
        expert_shard_status: vec![
            ExpertShardStatus {
                replicas: 2,
                ..Default::default()
            },
            ExpertShardStatus {
                replicas: 1,
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    assert_eq!(shard_replicas(&md, 2, None), vec![Some(2), Some(1)]);
    // HPA or KEDA own the scale subresource: the operator leaves replicas unset.
    md.spec.experts.autoscaling.driver = AutoscalingDriver::Hpa;
    assert_eq!(shard_replicas(&md, 2, Some(&[3, 3])), vec![None, None]);
    // Autoscaling off: minReplicas.
    md.spec.experts.autoscaling.enabled = false;
    assert_eq!(
        shard_replicas(&md, 2, Some(&[3, 3])),
        vec![Some(1), Some(1)]
    );
}

#[test]
fn the_default_budget_is_every_shard_at_its_maximum() {
    let md = tiny();
    let p = Params::from_spec(&md.spec.experts, 2);
    assert_eq!(p.budget, 6);
    assert_eq!(p.target_per_replica, Some(200.0));
    assert_eq!((p.stabilization_s, p.cooldown_s), (300.0, 60.0));
}
