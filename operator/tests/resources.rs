//! The objects the operator builds for the example manifests: names, ownership, hardening,
//! GPU placement, discovery, and pod arguments the worker's own CLI accepts.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap fixtures too

use std::path::PathBuf;

use clap::Parser;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use moe_operator::cli::read_manifest;
use moe_operator::crd::MoEDeployment;
use moe_operator::planning;
use moe_operator::resources::{self, Children, Config};

fn example(name: &str) -> MoEDeployment {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let mut md = read_manifest(&path).unwrap();
    md.metadata.namespace = Some("serving".into());
    md.metadata.uid = Some("0b7d7b0e-6f2a-4d8e-9a55-2f3f4c1c2a10".into());
    md
}

fn build(md: &MoEDeployment) -> Children {
    let plan = planning::plan(&md.spec).unwrap();
    resources::build(
        md,
        &plan,
        &Config {
            worker_image: "ghcr.io/moe-serve/moe-worker:test".into(),
            ..Config::default()
        },
    )
    .unwrap()
}

fn template_args(t: &PodTemplateSpec) -> Vec<String> {
    let c = &t.spec.as_ref().unwrap().containers[0];
    let mut argv = c.command.clone().unwrap();
    argv.extend(c.args.clone().unwrap());
    argv
}

#[test]
fn tiny_children_are_named_owned_and_labelled() {
    let md = example("tiny.yaml");
    let c = build(&md);
    assert_eq!(c.stages.len(), 2);
    assert_eq!(c.expert_shards.len(), 2);
    let stage_names: Vec<_> = c
        .stages
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(stage_names, ["tiny-stage-0", "tiny-stage-1"]);
    let services: Vec<_> = c
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        services,
        ["tiny-stage-0", "tiny-stage-1", "tiny-experts", "tiny"]
    );
    // Discovery Services are headless; the gateway's is not.
    for s in &c.services[..3] {
        assert_eq!(s.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
    }
    let owners = [
        &c.config_map.metadata,
        &c.stages[0].metadata,
        &c.expert_shards[1].metadata,
        &c.gateway.metadata,
        &c.network_policy.metadata,
    ];
    for m in owners {
        let o = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(o.kind, "MoEDeployment");
        assert_eq!(o.name, "tiny");
        assert_eq!(o.controller, Some(true));
        assert_eq!(m.namespace.as_deref(), Some("serving"));
        assert_eq!(
            m.labels.as_ref().unwrap()["serving.moe.dev/deployment"],
            "tiny"
        );
    }
    let pdbs: Vec<_> = c
        .pdbs
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        pdbs,
        [
            "tiny-stages",
            "tiny-expert-0",
            "tiny-expert-1",
            "tiny-gateway"
        ]
    );
    // The plan is published.
    let plan_json = &c.config_map.data.as_ref().unwrap()["plan.json"];
    let plan: serde_json::Value = serde_json::from_str(plan_json).unwrap();
    assert_eq!(plan["stages"].as_array().unwrap().len(), 2);
}

#[test]
fn pods_are_hardened_and_placed_on_a100s() {
    let md = example("tiny.yaml");
    let c = build(&md);
    let templates = c
        .stages
        .iter()
        .map(|s| &s.spec.template)
        .chain(c.expert_shards.iter().map(|d| &d.spec.template))
        .chain([&c.gateway.spec.template]);
    for t in templates {
        let pod = t.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
        assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "250m");
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "1Gi");
        assert_eq!(
            pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
            "NVIDIA-A100-SXM4-80GB"
        );
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
        assert!(c.startup_probe.is_some());
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/moe-serve/moe-worker:test")
        );
        // A writable /tmp under a read-only root.
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/tmp")
        );
    }
    let stage = c.stages[0].spec.template.spec.as_ref().unwrap();
    let probe = stage.containers[0].readiness_probe.as_ref().unwrap();
    // The kubelet cannot present the deployment's certificate: probes use the health port.
    assert_eq!(probe.grpc.as_ref().unwrap().port, resources::HEALTH_PORT);
    assert_eq!(stage.service_account_name.as_deref(), Some("tiny-worker"));
    assert_eq!(stage.automount_service_account_token, Some(true));
    let expert = c.expert_shards[0].spec.template.spec.as_ref().unwrap();
    assert_eq!(
        expert.automount_service_account_token,
        Some(false),
        "experts use no API"
    );
}

#[test]
fn workers_speak_mutual_tls_unless_the_spec_opts_out() {
    let mut md = example("tiny.yaml");
    let c = build(&md);
    let templates = c
        .stages
        .iter()
        .map(|s| &s.spec.template)
        .chain(c.expert_shards.iter().map(|d| &d.spec.template))
        .chain([&c.gateway.spec.template]);
    for t in templates {
        let args = template_args(t);
        let at = args
            .iter()
            .position(|a| a == "--tls-dir")
            .expect("--tls-dir");
        assert_eq!(args[at + 1], moe_operator::pki::TLS_MOUNT);
        let pod = t.spec.as_ref().unwrap();
        let secret = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find_map(|v| v.secret.as_ref())
            .expect("the TLS Secret is mounted");
        assert_eq!(secret.secret_name.as_deref(), Some("tiny-worker-tls"));
        assert!(!args.contains(&"--plaintext".to_string()));
    }
    // Egress too: worker ports of its own pods and the API server, nothing else.
    let np = c.network_policy.spec.as_ref().unwrap();
    assert_eq!(
        np.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".to_string()][..])
    );
    let egress = np.egress.as_ref().unwrap();
    assert_eq!(egress.len(), 2);
    assert!(
        egress[0].to.is_some(),
        "worker traffic only to the deployment's pods"
    );
    md.spec.serving.plaintext = true;
    let c = build(&md);
    let args = template_args(&c.stages[0].spec.template);
    assert!(args.contains(&"--plaintext".to_string()) && !args.contains(&"--tls-dir".to_string()));
}

#[test]
fn expert_and_wire_formats_reach_the_worker_processes() {
    let mut md = example("tiny.yaml");
    md.spec.model.expert_dtype = Some(moe_api::crd::ExpertDType::Q8);
    md.spec.serving.wire_dtype = moe_api::crd::WireDType::Bf16;
    let c = build(&md);
    let q8 = moe_worker::weights::DtypeChoice::Is(moe_worker::weights::Dtype::Q8);
    for template in [
        &c.stages[0].spec.template,
        &c.expert_shards[0].spec.template,
    ] {
        let args = template_args(template);
        let part = match moe_worker::cli::Cli::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("{e}"))
            .command
        {
            moe_worker::cli::Command::Stage(s) => s.part,
            moe_worker::cli::Command::Expert(e) => e.part,
            _ => panic!("neither a stage nor an expert shard: {args:?}"),
        };
        assert_eq!(part.model.precision.expert_dtype, q8, "{args:?}");
        assert_eq!(
            part.wire_dtype,
            "bf16".parse().expect("wire dtype"),
            "{args:?}"
        );
    }
}

#[test]
fn pod_arguments_parse_with_the_worker_cli() {
    let md = example("tiny.yaml");
    let c = build(&md);
    let stage0 = template_args(&c.stages[0].spec.template);
    let parsed = moe_worker::cli::Cli::try_parse_from(&stage0).unwrap_or_else(|e| panic!("{e}"));
    let moe_worker::cli::Command::Stage(s) = parsed.command else {
        panic!("not a stage: {stage0:?}");
    };
    assert_eq!(s.part.layers, 0..2);
    assert_eq!(s.next.as_deref(), Some("kube:tiny-stage-1:50051"));
    assert_eq!(s.expert_addrs, "kube:tiny-experts:50051");
    assert_eq!(s.part.model.model.to_string(), "synthetic:tiny:7");

    let stage1 = template_args(&c.stages[1].spec.template);
    let moe_worker::cli::Command::Stage(s) = moe_worker::cli::Cli::try_parse_from(&stage1)
        .unwrap()
        .command
    else {
        panic!("not a stage");
    };
    assert_eq!(s.part.layers, 2..4);
    assert_eq!(s.next, None, "the last stage has no next");

    let expert1 = template_args(&c.expert_shards[1].spec.template);
    let moe_worker::cli::Command::Expert(e) = moe_worker::cli::Cli::try_parse_from(&expert1)
        .unwrap()
        .command
    else {
        panic!("not an expert shard");
    };
    let plan = planning::plan(&md.spec).unwrap();
    assert_eq!(e.experts, plan.expert_shards[1].layout.experts);
    assert_eq!(e.part.layers, plan.expert_shards[1].layout.layers());

    let gw = template_args(&c.gateway.spec.template);
    let moe_worker::cli::Command::Gateway(g) =
        moe_worker::cli::Cli::try_parse_from(&gw).unwrap().command
    else {
        panic!("not a gateway");
    };
    assert_eq!(
        g.stage_addrs,
        "kube:tiny-stage-0:50051,kube:tiny-stage-1:50051"
    );
    assert_eq!(g.max_sequences, 4);
}

#[test]
fn gateway_replicas_share_what_a_stage_holds() {
    let mut md = example("tiny.yaml");
    md.spec.serving.max_concurrent_sequences = 10;
    for (replicas, share) in [(1, 10), (2, 5), (3, 3), (10, 1)] {
        md.spec.replicas = replicas;
        let c = build(&md);
        let gw = template_args(&c.gateway.spec.template);
        let moe_worker::cli::Command::Gateway(g) =
            moe_worker::cli::Cli::try_parse_from(&gw).unwrap().command
        else {
            panic!("not a gateway");
        };
        assert_eq!(g.max_sequences, share, "{replicas} replicas");
        assert!(g.max_sequences * replicas as usize <= 10);
        let st = template_args(&c.stages[0].spec.template);
        let moe_worker::cli::Command::Stage(s) =
            moe_worker::cli::Cli::try_parse_from(&st).unwrap().command
        else {
            panic!("not a stage");
        };
        assert_eq!(
            s.max_sequences, 10,
            "every stage holds the whole deployment's sequences"
        );
    }
}

#[test]
fn expert_replicas_and_spec_changes_flow_into_children() {
    let mut md = example("tiny.yaml");
    md.spec.experts.min_replicas = 2;
    md.spec.parallelism.expert = Some(4);
    let c = build(&md);
    assert_eq!(c.expert_shards.len(), 4);
    assert!(c.expert_shards.iter().all(|d| d.spec.replicas == Some(2)));
    assert_eq!(c.pdbs.len(), 2 + 4);
}

#[test]
fn gpt4_pods_ask_for_whole_a100_nodes() {
    let md = example("gpt4.yaml");
    let c = build(&md);
    let plan = planning::plan(&md.spec).unwrap();
    assert_eq!(c.stages.len(), plan.stages.len());
    for (d, sh) in c.expert_shards.iter().zip(&plan.expert_shards) {
        let res = d.spec.template.spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        assert_eq!(
            res.limits.unwrap()["nvidia.com/gpu"].0,
            sh.pod.gpus.to_string()
        );
    }
}

#[test]
fn worker_pods_pull_with_the_configured_secrets() {
    let md = example("tiny.yaml");
    let plan = planning::plan(&md.spec).unwrap();
    let children = resources::build(
        &md,
        &plan,
        &Config {
            worker_image: "registry.example.com/moe/moe-worker@sha256:abc".into(),
            image_pull_secrets: vec!["regcred".into()],
            ..Config::default()
        },
    )
    .unwrap();
    let templates = children
        .stages
        .iter()
        .map(|s| s.spec.template.clone())
        .chain(
            children
                .expert_shards
                .iter()
                .map(|d| d.spec.template.clone()),
        )
        .chain([children.gateway.spec.template.clone()]);
    let mut n = 0;
    for t in templates {
        let spec = t.spec.unwrap();
        let secrets: Vec<String> = spec
            .image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(secrets, ["regcred"]);
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some("registry.example.com/moe/moe-worker@sha256:abc")
        );
        n += 1;
    }
    assert_eq!(n, 5, "2 stages, 2 expert shards, the gateway");
    // None configured: no field at all.
    let plain = build(&md);
    let spec = plain.gateway.spec.template.spec.unwrap();
    assert!(spec.image_pull_secrets.is_none());
}

#[test]
fn a_long_name_is_rejected_with_the_field() {
    let mut md = example("tiny.yaml");
    md.metadata.name = Some("x".repeat(41));
    let plan = planning::plan(&md.spec).unwrap();
    let err = resources::build(
        &md,
        &plan,
        &Config {
            worker_image: "w".into(),
            ..Config::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("metadata.name:"), "{err}");
}

/// The operator knows the worker's synthetic presets without linking the engine; this keeps
/// the two in step.
#[test]
fn synthetic_presets_match_the_worker() {
    for p in moe_worker::synthetic::presets() {
        let mut md = example("tiny.yaml");
        md.spec.model.source.synthetic.as_mut().unwrap().preset = p.name.into();
        let dims = planning::model_dims(&md.spec).unwrap();
        let c = &p.config;
        assert_eq!(dims.num_layers, c.num_hidden_layers, "{}", p.name);
        assert_eq!(dims.num_experts, c.num_local_experts, "{}", p.name);
        assert_eq!(dims.top_k, c.num_experts_per_tok, "{}", p.name);
        assert_eq!(dims.hidden_size, c.hidden_size, "{}", p.name);
        assert_eq!(dims.intermediate_size, c.intermediate_size, "{}", p.name);
        assert_eq!(
            dims.num_attention_heads, c.num_attention_heads,
            "{}",
            p.name
        );
        assert_eq!(
            dims.num_key_value_heads, c.num_key_value_heads,
            "{}",
            p.name
        );
        assert_eq!(dims.head_dim, c.head_dim, "{}", p.name);
        assert_eq!(dims.vocab_size, c.vocab_size, "{}", p.name);
        assert_eq!(
            dims.max_position_embeddings, c.max_position_embeddings,
            "{}",
            p.name
        );
    }
}

/// Arguments that say where a process runs rather than what it computes: addresses, the
/// certificate folder, the health port, the drain that cluster endpoints need, and the
/// per-process replica numbers `moe-worker local` hands out. The rest as sorted flag-value
/// pairs (the order of flags means nothing to the CLI).
fn what_it_runs(args: &[String], role: &str) -> Vec<(String, String)> {
    const PLACE: [&str; 10] = [
        "--listen",
        "--metrics-listen",
        "--next",
        "--expert-addrs",
        "--stage-addrs",
        "--tls-dir",
        "--health-listen",
        "--drain-ms",
        "--replica",
        "--startup-timeout-s",
    ];
    let mut out = Vec::new();
    let mut it = args.iter().skip_while(|a| *a != role).skip(1);
    while let Some(a) = it.next() {
        if a == "--plaintext" {
            continue;
        }
        let value = it.next().cloned().unwrap_or_default();
        if !(PLACE.contains(&a.as_str()) || (role == "gateway" && a == "--index")) {
            out.push((a.clone(), value));
        }
    }
    out.sort();
    out
}

#[test]
fn moe_worker_local_runs_the_processes_the_operator_creates() {
    let mut cases = Vec::new();
    for file in ["tiny.yaml", "tiny-hot.yaml"] {
        cases.push(example(file));
    }
    let mut md = example("tiny.yaml");
    md.spec.replicas = 3;
    md.spec.experts.min_replicas = 2;
    md.spec.serving.max_concurrent_sequences = 7;
    md.spec.model.tokenizer = Some("cl100k_base".into());
    md.spec.serving.plaintext = true;
    cases.push(md.clone());
    md.spec.parallelism.pipeline = 4;
    md.spec.parallelism.expert = Some(0);
    cases.push(md.clone());
    md.spec.parallelism.pipeline = 1;
    md.spec.parallelism.expert = None;
    cases.push(md);
    // One shard reads another revision of the weights.
    let mut md = example("tiny.yaml");
    md.spec.experts.shards = serde_yaml::from_str(
        "[{shard: 1, source: {synthetic: {preset: tiny, seed: 8}}, image: 'example.com/w:2'}]",
    )
    .unwrap();
    cases.push(md);
    for md in cases {
        let children = build(&md);
        let mut operator: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let mut add = |role: &str, t: &PodTemplateSpec, replicas: i32| {
            for _ in 0..replicas {
                operator.push((role.into(), what_it_runs(&template_args(t), role)));
            }
        };
        for s in &children.stages {
            add("stage", &s.spec.template, 1);
        }
        for d in &children.expert_shards {
            let spec = &d.spec;
            add("expert", &spec.template, spec.replicas.unwrap());
        }
        let gw = &children.gateway.spec;
        add("gateway", &gw.template, gw.replicas.unwrap());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("md.yaml");
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
        let md_read = moe_operator::cli::read_manifest(&path).unwrap();
        let launch = moe_worker::serve::local::Launch::from_manifest(&md_read, &args).unwrap();
        assert_eq!(launch.plaintext, md.spec.serving.plaintext);
        let mut local: Vec<(String, Vec<(String, String)>)> = launch
            .processes()
            .iter()
            .map(|p| {
                let role = p.role.as_str();
                (role.to_string(), what_it_runs(&p.args, role))
            })
            .collect();
        operator.sort();
        local.sort();
        assert_eq!(local, operator, "{:?}", md.spec);
    }
}

#[test]
fn the_pod_monitor_scrapes_every_worker_pod_on_a_port_it_serves_metrics_on() {
    let md = example("tiny.yaml");
    let plan = planning::plan(&md.spec).unwrap();
    let children = resources::build(
        &md,
        &plan,
        &Config {
            worker_image: "ghcr.io/moe-serve/moe-worker:test".into(),
            pod_monitor: Some(resources::PodMonitorConfig {
                labels: [("release".to_string(), "kps".to_string())].into(),
                interval: "15s".into(),
            }),
            ..Config::default()
        },
    )
    .unwrap();
    let pm = children.pod_monitor.expect("configured");
    assert_eq!(pm.metadata.name.as_deref(), Some("tiny-workers"));
    assert_eq!(pm.metadata.namespace.as_deref(), Some("serving"));
    assert_eq!(pm.metadata.labels.as_ref().unwrap()["release"], "kps");
    let owner = &pm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "MoEDeployment");
    let v = serde_json::to_value(&pm).unwrap();
    assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(v["kind"], "PodMonitor");
    let selector = v["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let endpoints = v["spec"]["podMetricsEndpoints"].as_array().unwrap();
    let ports: Vec<&str> = endpoints
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert!(
        endpoints
            .iter()
            .all(|e| e["interval"] == "15s" && e["path"] == "/metrics")
    );

    // Every worker pod is selected and has exactly one of the endpoints' ports, and the worker
    // process listens for /metrics on it.
    let templates = children
        .stages
        .iter()
        .map(|s| ("stage", s.spec.template.clone()))
        .chain(
            children
                .expert_shards
                .iter()
                .map(|d| ("expert", d.spec.template.clone())),
        )
        .chain([("gateway", children.gateway.spec.template.clone())]);
    for (role, t) in templates {
        let labels = t.metadata.as_ref().unwrap().labels.clone().unwrap();
        for (k, want) in selector {
            assert_eq!(
                Some(&labels[k]),
                want.as_str().map(String::from).as_ref(),
                "{role}"
            );
        }
        let c = &t.spec.as_ref().unwrap().containers[0];
        let named: Vec<_> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .filter(|p| ports.contains(&p.name.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(named.len(), 1, "{role}: {ports:?}");
        let port = named[0].container_port;
        let args = template_args(&t);
        let listens = match role {
            "gateway" => args.iter().any(|a| a.ends_with(&format!(":{port}"))),
            _ => args
                .windows(2)
                .any(|w| w[0] == "--metrics-listen" && w[1] == format!("0.0.0.0:{port}")),
        };
        assert!(
            listens,
            "{role} does not serve /metrics on {port}: {args:?}"
        );
        // The target labels come from labels the pod has.
        for e in endpoints {
            for r in e["relabelings"].as_array().unwrap() {
                let src = r["sourceLabels"][0].as_str().unwrap();
                let pod_label = resources::TARGET_LABELS
                    .iter()
                    .find(|(_, t)| *t == r["targetLabel"])
                    .unwrap()
                    .0;
                assert_eq!(
                    src,
                    format!(
                        "__meta_kubernetes_pod_label_{}",
                        resources::sanitize(pod_label)
                    )
                );
            }
        }
        assert!(labels.contains_key(resources::LABEL_ROLE), "{role}");
    }

    // Without the option there is none.
    assert!(build(&md).pod_monitor.is_none());
}

#[test]
fn one_shards_own_settings_change_only_that_shard_and_it_rolls_one_replica_at_a_time() {
    let md = example("tiny.yaml");
    let mut changed = md.clone();
    changed.spec.experts.shards = serde_yaml::from_str(
        "[{shard: 1, image: 'registry.example.com/moe-worker:canary', \
           source: {hostPath: {path: /models/tiny-rev2}}, \
           resources: {requests: {cpu: '2', memory: 3Gi}, limits: {memory: 6Gi}}}]",
    )
    .unwrap();
    let (a, b) = (build(&md), build(&changed));
    let json = |v: &dyn erased::Ser| v.json();
    // Everything but expert shard 1 is the same object.
    assert_eq!(json(&a.stages), json(&b.stages));
    assert_eq!(json(&a.gateway), json(&b.gateway));
    assert_eq!(json(&a.services), json(&b.services));
    assert_eq!(json(&a.config_map), json(&b.config_map));
    assert_eq!(json(&a.expert_shards[0]), json(&b.expert_shards[0]));
    assert_ne!(json(&a.expert_shards[1]), json(&b.expert_shards[1]));

    let t = b.expert_shards[1].spec.template.spec.clone().unwrap();
    let c = &t.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/moe-worker:canary")
    );
    let args = template_args(&b.expert_shards[1].spec.template);
    let model = args.windows(2).find(|w| w[0] == "--model").unwrap()[1].clone();
    assert_eq!(model, "/models/tiny-rev2");
    let volume = t
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "model")
        .unwrap();
    assert_eq!(volume.host_path.unwrap().path, "/models/tiny-rev2");
    let r = c.resources.clone().unwrap();
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "6Gi");
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "2");
    // The plan's GPUs stay.
    assert!(r.limits.unwrap().contains_key("nvidia.com/gpu"));

    // Every shard rolls with a surge of one and nothing unavailable.
    for d in &b.expert_shards {
        let s = d.spec.strategy.clone().unwrap();
        assert_eq!(s.type_.as_deref(), Some("RollingUpdate"));
        let ru = s.rolling_update.unwrap();
        assert_eq!(
            ru.max_surge,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        assert_eq!(
            ru.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        );
    }
}

/// Serialising the children for comparison.
mod erased {
    pub trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap()
        }
    }
}
