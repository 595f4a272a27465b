//! The layout search: the same winner and cost as evaluating every point of small spaces
//! (random-ish, with budgets and targets that leave some spaces without an answer), a clear
//! closest miss when nothing meets the targets, the queueing arithmetic, and the closed form's
//! percentiles against the discrete-event simulator.

mod common;

use std::cmp::Ordering;

use moe_plan::search::{
    Evaluation, Metric, Point, Problem, Reason, Space, Target, confirm, erlang_c, evaluate,
    parse_seconds, search, simulate,
};
use moe_plan::{ModelDims, SizingRequest, Variant};

/// A small MoE (8 layers × 8 experts, ~0.7B parameters): its pods outgrow small GPUs.
fn small() -> ModelDims {
    ModelDims {
        num_layers: 8,
        num_experts: 8,
        top_k: 2,
        hidden_size: 1024,
        intermediate_size: 2816,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        head_dim: 64,
        vocab_size: 32000,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        variant: Variant::default(),
    }
}

fn problem(
    model: ModelDims,
    gpu_gib: u64,
    rate: f64,
    targets: Vec<Target>,
    max_gpus: Option<usize>,
) -> Problem {
    Problem {
        request: SizingRequest {
            model,
            dtype_bytes: 2,
            expert_millibytes: 0,
            stages: 1,
            expert_shards: None,
            tensor: 1,
            gpus_per_pod: 4,
            gpu_memory_bytes: gpu_gib << 30,
            context_tokens: model.max_position_embeddings,
            concurrent_sequences: 1,
        },
        hardware: moe_plan::perf::gpu_profile("a100-80gb").expect("profile"),
        prompt_tokens: 512,
        output_tokens: 128,
        routing_skew: 0.8,
        wire_bytes: 2,
        across_nodes: true,
        gateways: 1,
        rate,
        targets,
        max_gpus,
    }
}

fn target(s: &str) -> Target {
    Target::parse(s).expect("target")
}

/// splitmix64: the spaces and targets of the comparison, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform in [lo, hi].
    fn log(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }
    /// A non-empty random subset of `of`.
    fn subset(&mut self, of: &[usize]) -> Vec<usize> {
        let mut v: Vec<usize> = of
            .iter()
            .copied()
            .filter(|_| self.next().is_multiple_of(2))
            .collect();
        if v.is_empty() {
            v.push(of[(self.next() % of.len() as u64) as usize]);
        }
        v
    }
}

/// Every point evaluated on its own: the cheapest that meets the targets (ties: fewer GPUs,
/// then the point), else the one that misses by least (among those estimated, when any was).
fn exhaustive(pr: &Problem, space: &Space) -> (Vec<Evaluation>, Option<Evaluation>) {
    let all: Vec<Evaluation> = space.points().iter().map(|p| evaluate(pr, p)).collect();
    let cost = |e: &Evaluation| e.cost_per_million_tokens.expect("priced");
    let mut feasible: Vec<Evaluation> = all.iter().filter(|e| e.meets()).cloned().collect();
    feasible.sort_by(|a, b| {
        cost(a)
            .total_cmp(&cost(b))
            .then(a.gpus.cmp(&b.gpus))
            .then(a.point.cmp(&b.point))
    });
    let closest = if feasible.is_empty() {
        all.iter()
            .filter(|e| e.shortfall().is_some())
            .min_by(|a, b| {
                // Keeping up with the rate first; among layouts that do not, the most capacity.
                let behind = |e: &Evaluation| {
                    e.reasons.iter().find_map(|r| match r {
                        Reason::Saturated { capacity, rate } => Some(rate / capacity),
                        _ => None,
                    })
                };
                let key = |e: &Evaluation| {
                    (
                        e.latency.is_none(),
                        behind(e).is_some(),
                        behind(e).or(e.shortfall()),
                        e.point,
                    )
                };
                key(a).partial_cmp(&key(b)).expect("shortfalls are numbers")
            })
            .cloned()
    } else {
        None
    };
    (feasible, closest)
}

#[test]
fn search_finds_the_exhaustive_winner_and_cost_on_random_small_spaces() {
    let mut rng = Rng(18);
    let (mut answered, mut unanswered, mut estimated, mut points) = (0, 0, 0, 0);
    for case in 0..24 {
        let (model, gib) = if case % 3 == 2 {
            (common::mixtral(), 80)
        } else {
            (small(), [1, 2, 4][case % 3])
        };
        let space = Space {
            stages: rng.subset(&[1, 2, 3, 4, 8]),
            expert_shards: rng.subset(&[0, 1, 2, 4, 8, 16]),
            tensor: rng.subset(&[1, 2, 4]),
            expert_replicas: rng.subset(&[1, 2, 3]),
            batch: rng.subset(&[1, 2, 4, 8, 16, 32, 64, 128]),
        };
        let mut targets = vec![Target {
            metric: Metric::Ttft,
            quantile: [0.5, 0.9, 0.99][case % 3],
            seconds: rng.log(0.01, 2.0),
        }];
        if case % 4 != 0 {
            targets.push(Target {
                metric: Metric::Tpot,
                quantile: 0.99,
                seconds: rng.log(0.002, 0.2),
            });
        }
        let budget = [None, Some(6), Some(12), Some(24), Some(48)][case % 5];
        let pr = problem(model, gib, rng.log(1.0, 200.0), targets, budget);
        let found = search(&pr, &space).unwrap();
        let (feasible, closest) = exhaustive(&pr, &space);
        let label = format!("case {case}: {space:?} {:?} {budget:?}", pr.targets);
        match (found.winner(), feasible.first()) {
            (Some(w), Some(b)) => {
                assert_eq!(w.point, b.point, "{label}");
                assert_eq!(
                    w.cost_per_million_tokens, b.cost_per_million_tokens,
                    "{label}"
                );
                assert!(budget.is_none_or(|g| w.gpus <= g), "{label}");
                answered += 1;
            }
            (None, None) => {
                let c = found.closest.as_ref().map(|e| (e.point, e.shortfall()));
                assert_eq!(c, closest.map(|e| (e.point, e.shortfall())), "{label}");
                unanswered += 1;
            }
            (w, b) => panic!(
                "{label}: search {:?} exhaustive {:?}",
                w.map(|e| e.point),
                b.map(|e| e.point)
            ),
        }
        // No layout that meets the targets was pruned (replica counts without expert shards
        // are one layout: the first stands for them).
        let first_replicas = space.expert_replicas.iter().min().copied();
        let distinct: Vec<(Point, Option<f64>)> = feasible
            .iter()
            .filter(|e| {
                e.point.expert_shards > 0 || Some(e.point.expert_replicas) == first_replicas
            })
            .map(|e| (e.point, e.cost_per_million_tokens))
            .collect();
        let searched: Vec<(Point, Option<f64>)> = found
            .feasible
            .iter()
            .map(|e| (e.point, e.cost_per_million_tokens))
            .collect();
        assert_eq!(searched, distinct, "{label}");
        assert_eq!(found.stats.points, space.len());
        estimated += found.stats.estimated;
        points += space.len();
    }
    // Both kinds of answer were compared, and the pruning saved estimates.
    assert!(
        answered >= 5 && unanswered >= 5,
        "{answered} answered, {unanswered} not"
    );
    assert!(estimated * 2 < points, "{estimated} of {points} estimated");
}

#[test]
fn without_a_feasible_layout_the_answer_names_the_closest_miss() {
    let space = Space {
        stages: vec![1, 2, 4],
        expert_shards: vec![0, 4, 8],
        tensor: vec![1, 2],
        expert_replicas: vec![1, 2],
        batch: vec![1, 8, 64],
    };
    // A first token in 1 µs: nothing prefills that fast.
    let pr = problem(small(), 4, 5.0, vec![target("ttft.p99=1us")], None);
    let o = search(&pr, &space).unwrap();
    assert!(o.winner().is_none());
    let c = o.closest.as_ref().expect("a closest miss");
    let Reason::Misses {
        target: missed,
        achieved,
    } = &c.reasons[0]
    else {
        panic!("{:?}", c.reasons)
    };
    assert_eq!(missed.metric, Metric::Ttft);
    // The closest has the fastest prefill of all the layouts that were estimated.
    let fastest = o
        .infeasible
        .iter()
        .filter_map(|e| e.latency.as_ref()?.ttft(0.99))
        .fold(f64::INFINITY, f64::min);
    assert_eq!(*achieved, fastest);
    let said = c.reasons[0].describe();
    assert!(said.starts_with("misses TTFT p99 by "), "{said}");

    // A budget below what any layout needs: the closest is the one over it by the least.
    let pr = problem(small(), 1, 5.0, vec![target("ttft.p99=10s")], Some(2));
    let o = search(&pr, &space).unwrap();
    assert!(o.winner().is_none());
    let c = o.closest.as_ref().expect("a closest miss");
    let least = o
        .infeasible
        .iter()
        .filter(|e| matches!(e.reasons[0], Reason::OverBudget { .. }))
        .map(|e| e.gpus)
        .min()
        .unwrap();
    assert!(
        matches!(c.reasons[0], Reason::OverBudget { gpus, .. } if gpus == least),
        "{:?}",
        c.reasons
    );
    assert!(
        c.reasons[0].describe().starts_with("over budget: "),
        "{:?}",
        c.reasons
    );
    assert!(o.stats.over_budget_unsized > 0, "{:?}", o.stats);

    // A rate no layout keeps up with: the closest is the one with the most capacity (every
    // saturated layout also has unbounded percentiles; those must not make them all tie).
    let pr = problem(small(), 4, 1e6, vec![target("ttft.p99=10s")], None);
    let o = search(&pr, &space).unwrap();
    assert!(o.winner().is_none());
    let c = o.closest.as_ref().expect("a closest miss");
    let most = o
        .infeasible
        .iter()
        .filter_map(|e| Some(e.latency.as_ref()?.capacity))
        .fold(0.0, f64::max);
    assert_eq!(c.latency.as_ref().map(|l| l.capacity), Some(most), "{c:?}");
}

#[test]
fn a_looser_budget_or_target_never_costs_more() {
    let space = Space {
        stages: vec![1, 2, 4, 8],
        expert_shards: vec![0, 2, 8],
        tensor: vec![1, 2, 4],
        expert_replicas: vec![1, 2],
        batch: vec![1, 2, 4, 8, 16, 32, 64],
    };
    let cost = |tpot: &str, budget: Option<usize>| {
        let pr = problem(
            common::mixtral(),
            80,
            20.0,
            vec![target("ttft.p99=1s"), target(&format!("tpot.p99={tpot}"))],
            budget,
        );
        let o = search(&pr, &space).unwrap();
        let w = o.winner().cloned();
        if let (Some(w), Some(b)) = (&w, budget) {
            assert!(w.gpus <= b);
        }
        w.map(|w| {
            (
                w.cost_per_million_tokens.unwrap(),
                w.latency.unwrap().tpot(0.99).unwrap(),
            )
        })
    };
    let loose = cost("100ms", None).expect("an answer");
    let tight = cost("20ms", None).expect("an answer");
    assert!(tight.0 >= loose.0, "{tight:?} vs {loose:?}");
    assert!(tight.1 <= 0.020);
    // A budget the loose winner fits in changes nothing; a smaller one costs at least as much.
    let pr = problem(
        common::mixtral(),
        80,
        20.0,
        vec![target("ttft.p99=1s"), target("tpot.p99=100ms")],
        None,
    );
    let gpus = search(&pr, &space).unwrap().winner().unwrap().gpus;
    assert_eq!(cost("100ms", Some(gpus)), Some(loose));
    let less = cost("100ms", Some(gpus - 1)).expect("an answer");
    assert!(less.0 >= loose.0, "{less:?} vs {loose:?}");
}

#[test]
fn targets_and_bad_problems_are_refused_naming_the_field() {
    let t = target("ttft.p99=2s");
    assert_eq!((t.metric, t.quantile, t.seconds), (Metric::Ttft, 0.99, 2.0));
    assert_eq!(t.name(), "TTFT p99");
    let t = target("TPOT.p99.9=80ms");
    assert_eq!(t.metric, Metric::Tpot);
    assert!((t.quantile - 0.999).abs() < 1e-12 && (t.seconds - 0.08).abs() < 1e-12);
    assert_eq!(t.name(), "TPOT p99.9");
    assert!((parse_seconds("250us").unwrap() - 250e-6).abs() < 1e-15);
    for (bad, words) in [
        ("ttft.p99", "METRIC.pNN=DURATION"),
        ("ttft.p99=2", "needs a unit"),
        ("ttft.p99=-2s", "not a positive duration"),
        ("ttft.p99=2h", "unknown unit"),
        ("latency.p99=2s", "unknown metric"),
        ("ttft.p100=2s", "percentile"),
        ("ttft.99=2s", "percentile"),
        ("ttft=2s", "METRIC.pNN"),
    ] {
        let e = Target::parse(bad).unwrap_err();
        assert!(e.contains(words), "{bad}: {e}");
    }
    let space = Space {
        stages: vec![1],
        expert_shards: vec![0],
        tensor: vec![1],
        expert_replicas: vec![1],
        batch: vec![1],
    };
    for (pr, field) in [
        (problem(small(), 4, -1.0, vec![], None), "rate"),
        (problem(small(), 4, f64::NAN, vec![], None), "rate"),
        (problem(small(), 4, 1.0, vec![], Some(0)), "maxGpus"),
        (
            problem(
                small(),
                4,
                1.0,
                vec![Target {
                    metric: Metric::Tpot,
                    quantile: 1.5,
                    seconds: 1.0,
                }],
                None,
            ),
            "targets",
        ),
        (
            problem(
                ModelDims {
                    head_dim: 63,
                    ..small()
                },
                4,
                1.0,
                vec![],
                None,
            ),
            "model.headDim",
        ),
    ] {
        let e = search(&pr, &space).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{field}:")), "{e}");
    }
}

#[test]
fn queueing_arithmetic() {
    // M/M/1: the chance to wait is the utilisation; M/M/2 at ρ 0.5: 1/3.
    assert!((erlang_c(1, 0.5) - 0.5).abs() < 1e-12);
    assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    // Large c stays finite and in [0, 1].
    let c = erlang_c(4096, 4000.0);
    assert!(c > 0.0 && c < 1.0, "{c}");
    // More load: a longer tail, then no sustainable rate.
    let space = Space {
        stages: vec![2],
        expert_shards: vec![4],
        tensor: vec![1],
        expert_replicas: vec![1],
        batch: vec![8],
    };
    let p = space.points()[0];
    let mut last = 0.0;
    let mut saturated = false;
    for rate in [0.5, 2.0, 8.0, 32.0, 128.0, 512.0] {
        let e = evaluate(&problem(small(), 4, rate, vec![], None), &p);
        let l = e.latency.clone().unwrap();
        match l.ttft(0.99) {
            Some(t) => {
                assert!(!saturated, "saturated below {rate}");
                assert!(t >= last && t >= l.prefill, "{rate}: {t} after {last}");
                assert!(l.utilization < 1.0);
                last = t;
            }
            None => {
                saturated = true;
                assert!(rate >= l.capacity, "{rate} vs capacity {}", l.capacity);
                assert!(
                    matches!(e.reasons[0], Reason::Saturated { .. }),
                    "{:?}",
                    e.reasons
                );
            }
        }
    }
    assert!(saturated && last > 0.0);
}

/// With experts on the stages (the simulator queues stages only) and the slots moderately
/// busy, the closed form's percentiles are within a factor of two of the simulated ones, and
/// its time per token is not below the simulated mean (full micro-batches are its worst case).
#[test]
fn closed_form_percentiles_agree_with_the_simulator_at_moderate_load() {
    let pr = |rate| {
        problem(
            common::mixtral(),
            80,
            rate,
            vec![target("ttft.p99=10s"), target("ttft.p50=10s")],
            None,
        )
    };
    let mut checked = 0;
    for (stages, tensor, batch, rate) in [
        (4, 1, 16, 5.0),
        (8, 1, 64, 20.0),
        (4, 2, 32, 20.0),
        (8, 2, 16, 20.0),
    ] {
        let p = Point {
            stages,
            expert_shards: 0,
            tensor,
            expert_replicas: 1,
            batch,
        };
        let pr = pr(rate);
        let e = evaluate(&pr, &p);
        let l = e.latency.as_ref().unwrap();
        assert!(
            l.utilization > 0.05 && l.utilization < 0.75,
            "{p:?}: {}",
            l.utilization
        );
        let s = simulate(&pr, &p, 3000, 7).unwrap();
        let ratio = l.ttft(0.99).unwrap() / s.report.ttft_p99;
        assert!(
            ratio > 0.5 && ratio < 2.0,
            "{p:?}: TTFT p99 {ratio} × simulated"
        );
        let ratio = l.ttft(0.5).unwrap() / s.report.ttft_p50;
        assert!(
            ratio > 0.5 && ratio < 2.0,
            "{p:?}: TTFT p50 {ratio} × simulated"
        );
        assert!(l.tpot(0.5).unwrap() >= 0.95 * s.report.tpot_mean, "{p:?}");
        assert!(s.confirms(), "{:?}", s.misses);
        checked += 1;
    }
    assert_eq!(checked, 4);
    // Where the closed form says the slots cannot keep up, so does the simulation.
    for (stages, tensor, batch, rate) in [(2, 4, 16, 20.0), (2, 1, 8, 10.0)] {
        let p = Point {
            stages,
            expert_shards: 0,
            tensor,
            expert_replicas: 1,
            batch,
        };
        let pr = pr(rate);
        let e = evaluate(&pr, &p);
        assert!(
            matches!(e.reasons[0], Reason::Saturated { .. }),
            "{:?}",
            e.reasons
        );
        let s = simulate(&pr, &p, 3000, 7).unwrap();
        assert!(
            s.misses
                .iter()
                .any(|m| matches!(m, Reason::Saturated { .. })),
            "{p:?}: {:?}",
            s.report
        );
    }
}

/// The simulation walks down the cheapest layouts: every one it rejects misses something,
/// and the one it confirms is the cheapest it did not reject.
#[test]
fn confirmation_takes_the_cheapest_layout_the_simulation_does_not_reject() {
    let space = Space {
        stages: vec![1, 2, 4, 8],
        expert_shards: vec![0, 8],
        tensor: vec![1, 2],
        expert_replicas: vec![1],
        batch: vec![4, 16, 64],
    };
    let pr = problem(
        common::mixtral(),
        80,
        40.0,
        vec![target("ttft.p99=400ms")],
        Some(64),
    );
    let o = search(&pr, &space).unwrap();
    assert!(o.feasible.len() >= 3);
    let c = confirm(&pr, &o, 10, 2000, 1).unwrap();
    let n = c.simulated.len();
    assert!((1..=10).contains(&n));
    for (i, s) in c.simulated.iter().enumerate() {
        assert_eq!(s.point, o.feasible[i].point);
        assert_eq!(s.confirms(), Some(i) == c.confirmed, "{i}: {:?}", s.misses);
    }
    if c.confirmed.is_none() {
        assert_eq!(n, 10.min(o.feasible.len()));
    }
    // A simulated miss is described like the model's.
    for s in &c.simulated {
        for m in &s.misses {
            assert!(
                m.describe().starts_with("misses") || m.describe().starts_with("cannot sustain")
            );
        }
    }
}

#[test]
fn runners_up_show_the_next_cheapest_and_each_way_of_losing() {
    let space = Space {
        stages: vec![1, 2, 4, 8],
        expert_shards: vec![0, 2, 8],
        tensor: vec![1, 2, 4],
        expert_replicas: vec![1, 2],
        batch: vec![1, 4, 16, 64, 256],
    };
    let pr = problem(
        common::mixtral(),
        80,
        20.0,
        vec![target("ttft.p99=300ms"), target("tpot.p99=25ms")],
        Some(24),
    );
    let o = search(&pr, &space).unwrap();
    let w = o.winner().expect("a winner").clone();
    let shown = o.runners_up(2);
    let feasible: Vec<&Evaluation> = shown.iter().copied().filter(|e| e.meets()).collect();
    assert_eq!(feasible.len(), 2.min(o.feasible.len() - 1));
    for e in &feasible {
        assert_eq!(
            e.cost_per_million_tokens
                .unwrap()
                .total_cmp(&w.cost_per_million_tokens.unwrap()),
            Ordering::Greater
        );
    }
    let kinds: Vec<&str> = shown
        .iter()
        .filter_map(|e| match e.reasons.first()? {
            Reason::OverBudget { .. } => Some("budget"),
            Reason::DoesNotFit { .. } => Some("memory"),
            Reason::Saturated { .. } => Some("rate"),
            Reason::Misses { target, .. } if target.metric == Metric::Ttft => Some("ttft"),
            Reason::Misses { .. } => Some("tpot"),
            Reason::Invalid { .. } | Reason::TpotMean { .. } | Reason::Unbounded { .. } => None,
        })
        .collect();
    for k in ["budget", "memory", "ttft", "tpot"] {
        assert_eq!(
            kinds.iter().filter(|&&x| x == k).count(),
            1,
            "{k} in {kinds:?}"
        );
    }
    // Each way's representative is the cheapest estimated layout that lost that way.
    for e in shown
        .iter()
        .filter(|e| matches!(e.reasons.first(), Some(Reason::Misses { .. })))
    {
        let same = |o: &&Evaluation| {
            std::mem::discriminant(&o.reasons[0]) == std::mem::discriminant(&e.reasons[0])
                && matches!((&o.reasons[0], &e.reasons[0]), (Reason::Misses { target: a, .. }, Reason::Misses { target: b, .. }) if a == b)
        };
        let cheapest = o
            .infeasible
            .iter()
            .filter(|x| !x.reasons.is_empty())
            .filter(same)
            .filter_map(|x| x.cost_per_million_tokens)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(e.cost_per_million_tokens, Some(cheapest));
    }
}
