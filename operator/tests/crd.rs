//! The committed CRD matches the Rust types; its schema carries the rules the issue asks for.

use std::path::PathBuf;

use moe_operator::cli::crd_yaml;

/// `crds/` and the chart's `crds/` (Helm installs the CRD from there).
fn committed_paths() -> [PathBuf; 2] {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        root.join("crds/moedeployments.serving.moe.dev.yaml"),
        root.join("charts/moe-operator/crds/moedeployments.serving.moe.dev.yaml"),
    ]
}

#[test]
fn committed_crd_is_current() {
    let generated = crd_yaml().unwrap();
    for path in committed_paths() {
        if std::env::var_os("UPDATE_CRDS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is stale: regenerate both copies with\n  UPDATE_CRDS=1 cargo test -p moe-operator --test crd",
            path.display()
        );
    }
}

#[test]
fn crd_names_printer_columns_and_rules() {
    let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml().unwrap()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "serving.moe.dev");
    assert_eq!(spec["names"]["kind"], "MoEDeployment");
    assert_eq!(spec["names"]["shortNames"][0], "moe");
    assert_eq!(spec["scope"], "Namespaced");
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Stages",
            "ExpertShards",
            "Replicas",
            "GPUs",
            "Tok/s",
            "Age"
        ]
    );
    let text = serde_json::to_string(&crd).unwrap();
    for message in [
        "spec.model.architecture.topK must not exceed numExperts",
        "spec.parallelism.pipeline must not exceed spec.model.architecture.numLayers",
        "spec.experts.minReplicas must not exceed maxReplicas",
        "spec.model.architecture.headDim must be even",
        "spec.model.architecture.numAttentionHeads must split hiddenSize",
        "spec.model.source must set exactly one of pvc, hostPath, synthetic",
    ] {
        assert!(text.contains(message), "missing rule: {message}");
    }
    let spec_schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(
        spec_schema["placement"]["properties"]["gpuProduct"]["default"],
        "NVIDIA-A100-SXM4-80GB"
    );
    assert_eq!(
        spec_schema["model"]["properties"]["dtype"]["default"],
        "bf16"
    );
}
