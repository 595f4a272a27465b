//! The example manifests parse and plan; GPT-4's plan matches the public figures and fits.

use std::path::PathBuf;

use moe_operator::cli::{plan_table, read_manifest};
use moe_operator::planning::plan;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn within(actual: u64, expected: f64, tolerance: f64) -> bool {
    ((actual as f64 - expected) / expected).abs() <= tolerance
}

#[test]
fn gpt4_totals_and_fit() {
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let p = plan(&moe.spec).unwrap();
    assert!(
        within(p.total_parameters, 1.8e12, 0.03),
        "total {}",
        p.total_parameters
    );
    assert!(
        within(p.active_parameters_per_token, 280e9, 0.05),
        "active {}",
        p.active_parameters_per_token
    );
    let gpu = 80u64 << 30;
    assert_eq!(p.gpu_memory_bytes, gpu);
    for pod in p
        .stages
        .iter()
        .map(|s| s.pod)
        .chain(p.expert_shards.iter().map(|s| s.pod))
        .chain([p.gateway])
    {
        assert!(pod.gpus <= 8, "{pod:?}");
        assert!(pod.memory_bytes <= pod.gpus as u64 * gpu, "{pod:?}");
    }
    assert_eq!(p.stages.len(), 8);
    assert_eq!(p.expert_shards.len(), 8);
    // Every (layer, expert) has exactly one shard.
    let layout = p.layout();
    for l in 0..120 {
        for e in 0..16 {
            assert_eq!(layout.shards_for(l, e).count(), 1);
        }
    }
    let json = serde_json::to_value(&p).unwrap();
    assert!(json["totalParameters"].as_u64().is_some());
    assert!(json["activeParametersPerToken"].as_u64().is_some());
    let table = plan_table(&moe, &p);
    assert!(table.contains("1.83T total"), "{table}");
    assert!(table.contains("expert-shard"), "{table}");
}

#[test]
fn tiny_plans_from_its_preset() {
    let moe = read_manifest(&example("tiny.yaml")).unwrap();
    let p = plan(&moe.spec).unwrap();
    assert_eq!(p.model.num_layers, 4);
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.expert_shards.len(), 2);
    assert!(p.stages.iter().all(|s| s.pod.gpus == 1));
    assert_eq!(p.total_gpus, 5);
}

#[test]
fn a_spec_that_cannot_fit_is_rejected_with_the_reason() {
    let mut moe = read_manifest(&example("gpt4.yaml")).unwrap();
    moe.spec.placement.gpus_per_pod = 1;
    moe.spec.placement.gpu_memory_gib = 1;
    let e = plan(&moe.spec).unwrap_err().to_string();
    assert!(
        e.starts_with("spec.placement.gpusPerPod: one expert of one layer needs"),
        "{e}"
    );
    let mut moe = read_manifest(&example("gpt4.yaml")).unwrap();
    moe.spec.parallelism.expert = Some(4);
    let e = plan(&moe.spec).unwrap_err().to_string();
    assert!(
        e.starts_with("spec.parallelism.expert: expert shard 0"),
        "{e}"
    );
    let mut moe = read_manifest(&example("gpt4.yaml")).unwrap();
    moe.spec.model.architecture = None;
    let e = plan(&moe.spec).unwrap_err().to_string();
    assert!(e.starts_with("spec.model.architecture:"), "{e}");
}

/// `plan -f DIR` plans a checkpoint folder from its config.json: the architecture it reads is
/// the one the engine loads (the local launcher checks the plan against the loaded model),
/// and the manifest it prints runs with `moe-worker local -f`.
#[test]
fn a_checkpoint_folder_plans_from_its_config() {
    use clap::Parser;
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden");
    for name in ["tiny-gqa-top2", "tiny-mha-top3"] {
        let dir = golden.join(name);
        let md = moe_api::checkpoint::deployment(&dir).unwrap();
        assert_eq!(md.metadata.name.as_deref(), Some(name));
        let plan = moe_operator::planning::plan(&md.spec).unwrap();
        let cfg = moe_worker::config::ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(plan.model.num_layers, cfg.num_hidden_layers);
        assert_eq!(plan.model.head_dim, cfg.head_dim);
        assert_eq!(plan.model.num_key_value_heads, cfg.num_key_value_heads);
        assert_eq!(plan.model.intermediate_size, cfg.intermediate_size);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.yaml");
        std::fs::write(&path, serde_yaml::to_string(&md).unwrap()).unwrap();
        let cli = moe_worker::cli::Cli::try_parse_from([
            "moe-worker",
            "local",
            "-f",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let moe_worker::cli::Command::Local(args) = cli.command else {
            panic!("not local");
        };
        let launch = moe_worker::serve::local::Launch::from_manifest(
            &moe_operator::cli::read_manifest(&path).unwrap(),
            &args,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(launch.stages, 1);
    }
}

#[test]
fn plan_estimates_on_the_spec_s_gpu_and_names_an_unknown_profile() {
    use clap::Parser;
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let p = plan(&moe.spec).unwrap();
    let args = |extra: &[&str]| {
        let mut argv = vec!["moe-operator", "plan", "-f", "x", "--estimate"];
        argv.extend(extra);
        match moe_operator::cli::Cli::try_parse_from(argv)
            .unwrap()
            .command
        {
            moe_operator::cli::Command::Plan { estimate, .. } => estimate,
            _ => unreachable!(),
        }
    };
    let (hw, e) = moe_operator::cli::estimate_for(&moe, &p, &args(&[])).unwrap();
    assert_eq!(hw.name, "a100-80gb", "from spec.placement.gpuProduct");
    // Every planned GPU is counted (one replica per shard at minReplicas 1).
    assert_eq!(e.gpus, p.total_gpus);
    assert!(e.time_per_output_token > 0.0 && e.tokens_per_second.is_finite());
    // A larger batch raises throughput and the time per token.
    let (_, big) = moe_operator::cli::estimate_for(&moe, &p, &args(&["--batch", "64"])).unwrap();
    assert!(big.tokens_per_second > e.tokens_per_second);
    assert!(big.time_per_output_token >= e.time_per_output_token);
    // An H100 profile is faster than the A100 for the same plan.
    let (_, h100) =
        moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", "h100-80gb"])).unwrap();
    assert!(h100.time_per_output_token < e.time_per_output_token);
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", "tpu-v5"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--hardware") && err.contains("a100-80gb"),
        "{err}"
    );
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--batch", "0"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--batch"), "{err}");
    // A profile file, as `moe-worker profile -o` writes one: its figures drive the estimate.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("profile.json");
    let mut slow = moe_plan::perf::gpu_profile("a100-80gb").unwrap();
    slow.name = "measured-here".into();
    slow.memory_bandwidth /= 4.0;
    std::fs::write(&file, serde_json::to_string(&slow).unwrap()).unwrap();
    let path = file.to_str().unwrap();
    let (hw, from_file) =
        moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", path])).unwrap();
    assert_eq!(hw.name, "measured-here");
    assert!(from_file.time_per_output_token > 2.0 * e.time_per_output_token);
    slow.peak_flops = 0.0;
    std::fs::write(&file, serde_json::to_string(&slow).unwrap()).unwrap();
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", path]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("peakFlops"), "{err}");
    // A measured CPU host's figures are checked too.
    let mut host = moe_plan::perf::gpu_profile("a100-80gb").unwrap();
    host.hop_cpu = -1e-6;
    std::fs::write(&file, serde_json::to_string(&host).unwrap()).unwrap();
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", path]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("hopCpu"), "{err}");
    host.hop_cpu = 50e-6;
    host.host = Some(moe_plan::perf::Host {
        cores: 2,
        memory_bandwidth: 3e10,
        call_chains: Some(0.0),
    });
    std::fs::write(&file, serde_json::to_string(&host).unwrap()).unwrap();
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", path]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("host.callChains"), "{err}");
    std::fs::write(&file, "{\"name\": 3}").unwrap();
    let err = moe_operator::cli::estimate_for(&moe, &p, &args(&["--hardware", path]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a hardware profile"), "{err}");
    // plan --optimize reads the same profile files.
    std::fs::write(&file, serde_json::to_string(&slow).unwrap()).unwrap();
    let (est, opt, _) = optimize_args(&["--rate", "1", "--hardware", path]);
    let err = moe_operator::optimize::optimize(&moe, &est, &opt)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("peakFlops"), "{err}");
}

#[test]
fn simulate_compares_the_plan_with_tensor_by_pipeline_at_the_same_rate() {
    use clap::Parser;
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let args = |extra: &[&str]| {
        let mut argv = vec!["moe-operator", "simulate"];
        for (flag, default) in [("--duration", "60"), ("--rate", "0.5")] {
            if !extra.contains(&flag) {
                argv.extend([flag, default]);
            }
        }
        argv.extend(extra);
        match moe_operator::cli::Cli::try_parse_from(argv)
            .unwrap()
            .command
        {
            moe_operator::cli::Command::Simulate(a) => a,
            _ => unreachable!(),
        }
    };
    let a = args(&[]);
    let rows = moe_operator::cli::simulate(&moe, &a).unwrap();
    assert_eq!(rows.len(), 2);
    let p = plan(&moe.spec).unwrap();
    assert_eq!(rows[0].gpus, p.total_gpus);
    // 16 stages of 8 GPUs, and the gateway's pod.
    assert!(rows[1].name.contains("8-way tensor x 16-way pipeline"));
    assert!(rows[1].gpus >= 128, "{}", rows[1].gpus);
    for r in &rows {
        assert!(r.report.finished > 0 && r.report.tokens_per_second > 0.0);
        assert!(r.report.ttft_p99 >= r.report.ttft_p50);
        assert!(r.cost_per_million_tokens.is_finite());
    }
    let table = moe_operator::cli::simulate_table(&a, &rows);
    assert!(
        table.contains("$/M tokens") && table.lines().count() == 4,
        "{table}"
    );
    for (flag, bad) in [
        ("--versus", &["--versus", "8by16"][..]),
        ("--rate", &["--rate", "0"]),
        ("--rate", &["--rate", "1000", "--duration", "86400"]),
        ("--prompt-tokens", &["--prompt-tokens", "99999999999"]),
        ("--batch", &["--batch", "0"]),
        ("--duration", &["--duration", "0"]),
        ("--skew-period", &["--skew-period", "5"]),
        ("--skew-period", &["--skew-period", "inf"]),
        ("--zipf", &["--zipf=-1"]),
        ("--micro-batches", &["--micro-batches", "0"]),
        ("--autoscale-interval", &["--autoscale-interval", "0"]),
        ("--replica-startup", &["--replica-startup=-1"]),
        // 8 shards at 1..4 replicas each (the spec) hold 8..=32.
        ("--replicas", &["--autoscale", "--replicas", "33"]),
        ("--replicas", &["--autoscale", "--replicas", "7"]),
    ] {
        let err = moe_operator::cli::simulate(&moe, &args(bad))
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"))
            .to_string();
        assert!(err.contains(flag), "{bad:?}: {err}");
    }
}

/// Expert shards with replicas, fixed and autoscaled at the same total, on GPT-4's plan under
/// Zipf 1.2 routing (experts 0 and 1, shard 0's, take about half the routed rows).
#[test]
fn simulate_autoscaling_at_the_same_replica_count() {
    use clap::Parser;
    use moe_operator::cli::RowKind;
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let run = |extra: &[&str]| {
        let mut argv = vec![
            "moe-operator",
            "simulate",
            "--autoscale",
            "--zipf",
            "1.2",
            "--replicas",
            "16",
            "--rate",
            "0.8",
            "--duration",
            "3600",
        ];
        argv.extend(extra);
        let a = match moe_operator::cli::Cli::try_parse_from(argv)
            .unwrap()
            .command
        {
            moe_operator::cli::Command::Simulate(a) => a,
            _ => unreachable!(),
        };
        let rows = moe_operator::cli::simulate(&moe, &a).unwrap();
        let table = moe_operator::cli::simulate_table(&a, &rows);
        (rows, table)
    };
    // The popular experts stay where they are.
    let (rows, table) = run(&["--skew-period", "0"]);
    eprintln!("{table}");
    assert_eq!(rows.len(), 4);
    let (fixed, auto) = (&rows[2], &rows[3]);
    assert_eq!(
        (fixed.kind, auto.kind),
        (RowKind::FixedReplicas, RowKind::Autoscaled)
    );
    assert_eq!(fixed.replicas, vec![2; 8]);
    assert_eq!(auto.replicas, fixed.replicas);
    // Same GPUs: the autoscaler never holds more than the 16 replicas.
    assert_eq!(fixed.gpus, auto.gpus);
    assert!(auto.report.peak_replicas <= 16, "{:?}", auto.report);
    let f = &fixed.report;
    // Uniform replicas: the hot experts' shard is the busiest and its calls wait the longest.
    for j in 1..8 {
        assert!(f.shard_utilization[0] > f.shard_utilization[j], "{f:?}");
        assert!(f.shard_wait[0] > f.shard_wait[j], "{f:?}");
    }
    // The autoscaler moves replicas to shard 0 and lowers the tail of the time per token.
    let a = &auto.report;
    assert!(a.replica_changes > 0, "{a:?}");
    assert!(a.shard_replicas[0] > 2.5, "{a:?}");
    assert!(a.shard_utilization[0] < f.shard_utilization[0], "{a:?}");
    assert!(
        a.tpot_p99 < f.tpot_p99 && a.tpot_mean < f.tpot_mean * 0.9,
        "TPOT p99 autoscaled {:.1} ms vs fixed {:.1} ms, mean {:.1} vs {:.1}",
        a.tpot_p99 * 1e3,
        f.tpot_p99 * 1e3,
        a.tpot_mean * 1e3,
        f.tpot_mean * 1e3
    );
    assert!(table.contains("autoscaled from 2,2,2,2,2,2,2,2"), "{table}");
    assert!(table.contains("TPOT p99"), "{table}");
    // The popular experts change every 20 minutes: the autoscaler follows them (more changes,
    // and replicas spread over more shards in time).
    let (moving, table) = run(&["--skew-period", "1200"]);
    eprintln!("{table}");
    let m = &moving[3].report;
    assert!(m.replica_changes > a.replica_changes, "{m:?} vs {a:?}");
    assert!(m.shard_replicas[0] < a.shard_replicas[0], "{m:?} vs {a:?}");
    assert!(m.peak_replicas <= 16, "{m:?}");
}

/// `plan --optimize` arguments (the estimate's and the search's) as the CLI parses them.
fn optimize_args(
    extra: &[&str],
) -> (
    moe_operator::cli::EstimateArgs,
    moe_operator::optimize::OptimizeArgs,
    moe_operator::cli::Output,
) {
    use clap::Parser;
    let mut argv = vec!["moe-operator", "plan", "-f", "x", "--optimize"];
    argv.extend(extra);
    match moe_operator::cli::Cli::try_parse_from(argv)
        .expect("arguments")
        .command
    {
        moe_operator::cli::Command::Plan {
            estimate,
            optimize,
            output,
            ..
        } => (estimate, optimize, output),
        _ => unreachable!(),
    }
}

#[test]
fn plan_optimize_meets_the_targets_within_the_budget_and_writes_a_manifest_that_plans_back() {
    use moe_operator::optimize::{manifest_yaml, optimize, table, write_manifest};
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let flags = [
        "--rate",
        "1",
        "--ttft-p99",
        "2s",
        "--tpot-p99",
        "150ms",
        "--max-gpus",
        "256",
    ];
    let (est, args, _) = optimize_args(&flags);
    let mut o = optimize(&moe, &est, &args).unwrap();
    let w = o.winner().expect("a layout meets the targets").clone();
    assert!(w.gpus <= 256, "{}", w.gpus);
    assert_eq!(o.problem.targets.len(), 2);
    for (t, v) in o.problem.targets.iter().zip(&w.values) {
        assert!(v.unwrap() <= t.seconds, "{} {v:?}", t.name());
    }
    // Nothing the search estimated is cheaper and meets the targets.
    let cost = w.cost_per_million_tokens.unwrap();
    assert!(
        o.outcome
            .feasible
            .iter()
            .all(|e| e.cost_per_million_tokens.unwrap() >= cost)
            || o.confirmed() == Some(true)
    );
    // The table names the winner, each target's column and what the search skipped.
    let text = table(&o);
    assert!(
        text.contains("TTFT p99") && text.contains("TPOT p99"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("winner")), "{text}");
    assert!(text.contains("over the budget before sizing"), "{text}");
    assert!(text.contains("as written:"), "{text}");

    // The winner's manifest parses back and plans to the searched layout.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt4-optimized.yaml");
    write_manifest(&mut o, &path).unwrap();
    assert!(table(&o).contains("wrote the winner's manifest"));
    let back = read_manifest(&path).unwrap();
    assert_eq!(
        manifest_yaml(&back).unwrap(),
        manifest_yaml(o.manifest.as_ref().unwrap()).unwrap()
    );
    let p = plan(&back.spec).unwrap();
    assert_eq!(p.stages.len(), w.point.stages);
    assert_eq!(p.expert_shards.len(), w.point.expert_shards);
    assert_eq!(back.spec.parallelism.tensor as usize, w.point.tensor);
    assert_eq!(
        back.spec.serving.max_concurrent_sequences as usize,
        w.point.batch * w.micro_batches
    );
    assert_eq!(
        moe_plan::search::deployment_gpus(&p, w.point.expert_replicas, back.spec.replicas as usize),
        w.gpus
    );
    // What is not layout is untouched.
    assert_eq!(back.spec.model, moe.spec.model);
    assert_eq!(back.spec.placement, moe.spec.placement);
    assert_eq!(back.metadata.name, moe.metadata.name);
    // Optimising the written manifest finds the same layout at the same cost.
    let again = optimize(&back, &est, &args).unwrap();
    let w2 = again.winner().unwrap();
    assert_eq!(w2.point, w.point);
    assert_eq!(w2.cost_per_million_tokens, w.cost_per_million_tokens);
    let written = again.as_written.as_ref().unwrap();
    assert_eq!(written.point, w.point);
    assert!(written.meets());

    // JSON: the winner, the rows and the counts.
    let (est, args, output) = optimize_args(&[&flags[..], &["-o", "json"]].concat());
    assert_eq!(output, moe_operator::cli::Output::Json);
    let o = optimize(&moe, &est, &args).unwrap();
    let v = moe_operator::optimize::json(&o);
    assert_eq!(v["winner"]["point"]["stages"], w.point.stages);
    assert!(v["winner"]["costPerMillionTokens"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["rows"][o.chosen.unwrap()]["label"],
        format!("#{}", o.chosen.unwrap() + 1)
    );
    assert!(v["stats"]["estimated"].as_u64().unwrap() > 0);
    assert_eq!(v["problem"]["maxGpus"], 256);
}

#[test]
fn plan_optimize_without_an_answer_names_the_closest_miss() {
    use moe_operator::optimize::{optimize, table};
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    let (est, args, _) = optimize_args(&["--rate", "1", "--ttft-p99", "1ms", "--max-gpus", "256"]);
    let o = optimize(&moe, &est, &args).unwrap();
    assert!(o.winner().is_none() && o.manifest.is_none());
    let e = o.require_winner().unwrap_err().to_string();
    assert!(
        e.starts_with("no layout meets the targets within 256 GPUs; closest: ")
            && e.contains("misses TTFT p99 by"),
        "{e}"
    );
    assert!(
        table(&o).contains("closest miss: misses TTFT p99"),
        "{}",
        table(&o)
    );
    let mut o = o;
    let err =
        moe_operator::optimize::write_manifest(&mut o, std::path::Path::new("/nonexistent/x"))
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("--write-manifest:"), "{err}");
    // A budget nothing fits in: the closest is over it by the least.
    let (est, args, _) = optimize_args(&["--rate", "1", "--max-gpus", "8"]);
    let e = optimize(&moe, &est, &args)
        .unwrap()
        .require_winner()
        .unwrap_err()
        .to_string();
    assert!(e.contains("over budget"), "{e}");
}

#[test]
fn plan_optimize_refuses_bad_flags_naming_them() {
    use clap::Parser;
    let moe = read_manifest(&example("gpt4.yaml")).unwrap();
    for (flags, flag) in [
        (&["--rate", "1", "--max-gpus", "0"][..], "--max-gpus"),
        (&["--max-gpus", "64"][..], "--rate"),
        (&["--rate", "-1"][..], "--rate"),
        (&["--rate", "0"][..], "--rate"),
        (&["--rate", "1", "--ttft-p99", "2"][..], "--ttft-p99"),
        (&["--rate", "1", "--tpot-p99", "fast"][..], "--tpot-p99"),
        (&["--rate", "1", "--target", "ttft.p99"][..], "--target"),
        (&["--rate", "1", "--target", "ttft.p100=1s"][..], "--target"),
        (&["--rate", "1", "--target", "itl.p99=1s"][..], "--target"),
        (&["--rate", "1", "--max-batch", "0"][..], "--max-batch"),
        (
            &["--rate", "1", "--micro-batches", "4"][..],
            "--micro-batches",
        ),
        (&["--rate", "1", "--hardware", "tpu"][..], "--hardware"),
        (&["--rate", "1", "--price", "0"][..], "--price"),
    ] {
        let (est, args, _) = optimize_args(flags);
        let e = moe_operator::optimize::optimize(&moe, &est, &args)
            .err()
            .unwrap_or_else(|| panic!("{flags:?} accepted"))
            .to_string();
        assert!(e.starts_with(&format!("{flag}:")), "{flags:?}: {e}");
    }
    // Not a number: clap names the flag.
    let e = moe_operator::cli::Cli::try_parse_from([
        "moe-operator",
        "plan",
        "-f",
        "x",
        "--optimize",
        "--max-gpus",
        "-3",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("--max-gpus"), "{e}");
    // Search flags without --optimize.
    let cli = moe_operator::cli::Cli::try_parse_from([
        "moe-operator",
        "plan",
        "-f",
        "x",
        "--max-gpus",
        "8",
    ])
    .unwrap();
    let moe_operator::cli::Command::Plan { optimize, .. } = cli.command else {
        unreachable!()
    };
    let e = optimize.check_unused().unwrap_err().to_string();
    assert!(e.starts_with("--max-gpus: only with --optimize"), "{e}");
}
