//! `moe-operator bench-autoscale`: how much the expert-autoscaling policy evens out the load
//! per replica under Zipf routing skew, at the same total replica count as fixed uniform
//! replicas. The throughput figure assumes the busiest replica bounds throughput (every token
//! waits for its slowest expert call), so it is the ratio of the busiest replica's load.

use std::fmt::Write as _;

use moe_plan::SizedPlan;

use crate::autoscale::{allocate, imbalance};

/// A small deterministic generator (splitmix64), enough for sampling routes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n.max(1)
    }
}

/// Zipf(s) weights of ranks 1..=n.
pub fn zipf(n: usize, s: f64) -> Vec<f64> {
    (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect()
}

/// `top_k` distinct experts drawn without replacement with probabilities `weights[perm[i]]`
/// for expert `i` (a token's routing).
fn route(rng: &mut Rng, weights: &[f64], top_k: usize, out: &mut Vec<usize>) {
    out.clear();
    let total: f64 = weights.iter().sum();
    let mut left = total;
    for _ in 0..top_k.min(weights.len()) {
        let mut x = rng.f64() * left;
        let mut pick = None;
        for (e, &w) in weights.iter().enumerate() {
            if out.contains(&e) {
                continue;
            }
            pick = Some(e);
            if x < w {
                break;
            }
            x -= w;
        }
        if let Some(e) = pick {
            left -= weights[e];
            out.push(e);
        }
    }
}

/// Routed tokens per expert shard: `tokens` tokens through every layer, each picking `top_k`
/// experts from Zipf(`s`) weights; `per_layer_ranking` shuffles which expert is hot in each
/// layer (otherwise expert 0 is the hottest everywhere).
pub fn shard_loads(
    plan: &SizedPlan,
    s: f64,
    tokens: usize,
    per_layer_ranking: bool,
    seed: u64,
) -> Vec<f64> {
    let m = &plan.model;
    let mut rng = Rng::new(seed);
    let base = zipf(m.num_experts, s);
    let mut loads = vec![0.0; plan.expert_shards.len()];
    let mut picks = Vec::with_capacity(m.top_k);
    for layer in 0..m.num_layers {
        let mut weights = base.clone();
        if per_layer_ranking {
            for i in (1..weights.len()).rev() {
                let j = rng.below(i + 1);
                weights.swap(i, j);
            }
        }
        // Which shard computes (layer, expert).
        let owner: Vec<Option<usize>> = (0..m.num_experts)
            .map(|e| {
                plan.expert_shards
                    .iter()
                    .position(|s| s.layout.owns(layer, e))
            })
            .collect();
        for _ in 0..tokens {
            route(&mut rng, &weights, m.top_k, &mut picks);
            for &e in &picks {
                if let Some(j) = owner[e] {
                    loads[j] += 1.0;
                }
            }
        }
    }
    loads
}

/// One row of the benchmark.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub allocation: String,
    pub replicas: Vec<i32>,
    pub imbalance: f64,
    pub max_per_replica: f64,
}

/// Uniform replicas (`total` spread evenly, the remainder to the first shards).
pub fn uniform(shards: usize, total: i32) -> Vec<i32> {
    let n = i32::try_from(shards.max(1)).unwrap_or(i32::MAX);
    (0..n)
        .map(|j| total / n + i32::from(j < total % n))
        .collect()
}

fn row(scenario: &str, allocation: &str, loads: &[f64], replicas: Vec<i32>) -> Row {
    let max_per_replica = loads
        .iter()
        .zip(&replicas)
        .map(|(l, &r)| l / f64::from(r.max(1)))
        .fold(0.0, f64::max);
    Row {
        scenario: scenario.into(),
        allocation: allocation.into(),
        imbalance: imbalance(loads, &replicas),
        replicas,
        max_per_replica,
    }
}

/// The benchmark's rows for one scenario: uniform, the policy with no per-shard ceiling but the
/// budget, and the policy within `spec_max` per shard.
pub fn scenario(name: &str, loads: &[f64], total: i32, spec_max: i32) -> Vec<Row> {
    let n = loads.len();
    let lo = vec![1; n];
    vec![
        row(name, "uniform (fixed)", loads, uniform(n, total)),
        row(
            name,
            "policy, max = budget",
            loads,
            allocate(loads, &lo, &vec![total; n], total, None),
        ),
        row(
            name,
            &format!("policy, max = {spec_max}"),
            loads,
            allocate(loads, &lo, &vec![spec_max; n], total, None),
        ),
    ]
}

/// Runs the benchmark and renders its table.
pub fn run(
    plan: &SizedPlan,
    s: f64,
    tokens: usize,
    total: i32,
    spec_max: i32,
    seed: u64,
) -> String {
    let m = &plan.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} layers × {} experts, top-{}, {} expert shards; Zipf({s}) routing, {tokens} tokens per layer; {total} expert replicas in all",
        m.num_layers,
        m.num_experts,
        m.top_k,
        plan.expert_shards.len()
    );
    let _ = writeln!(
        out,
        "throughput vs uniform = busiest replica's load under uniform / under the allocation\n"
    );
    let _ = writeln!(
        out,
        "{:<28} {:<22} {:<28} {:>9} {:>11}",
        "SCENARIO", "ALLOCATION", "REPLICAS PER SHARD", "MAX/MEAN", "THROUGHPUT"
    );
    for (name, per_layer) in [
        ("same hot experts per layer", false),
        ("hot experts vary by layer", true),
    ] {
        let loads = shard_loads(plan, s, tokens, per_layer, seed);
        let rows = scenario(name, &loads, total, spec_max);
        let base = rows[0].max_per_replica;
        for r in &rows {
            let reps: Vec<String> = r.replicas.iter().map(i32::to_string).collect();
            let _ = writeln!(
                out,
                "{:<28} {:<22} {:<28} {:>9.2} {:>10.2}x",
                r.scenario,
                r.allocation,
                reps.join(","),
                r.imbalance,
                base / r.max_per_replica
            );
        }
        let share: Vec<String> = loads
            .iter()
            .map(|l| format!("{:.1}%", 100.0 * l / loads.iter().sum::<f64>()))
            .collect();
        let _ = writeln!(out, "{:<28} load share per shard: {}", "", share.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_distinct_and_follow_the_weights() {
        let mut rng = Rng::new(3);
        let w = zipf(16, 1.2);
        let mut counts = [0usize; 16];
        let mut picks = Vec::new();
        for _ in 0..20_000 {
            route(&mut rng, &w, 2, &mut picks);
            assert_eq!(picks.len(), 2);
            assert_ne!(picks[0], picks[1]);
            for &e in &picks {
                counts[e] += 1;
            }
        }
        assert!(
            counts[0] > counts[1] && counts[1] > counts[15],
            "{counts:?}"
        );
        assert_eq!(uniform(8, 24), vec![3; 8]);
        assert_eq!(uniform(3, 8), vec![3, 3, 2]);
    }
}
