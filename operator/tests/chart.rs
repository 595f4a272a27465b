//! The Helm chart (`charts/moe-operator`) ships the current CRD and tags its images with this
//! crate's version.

use std::path::PathBuf;

use moe_operator::cli::crd_yaml;

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/moe-operator")
}

#[test]
fn chart_crd_is_current() {
    let generated = crd_yaml().unwrap();
    let path = chart_dir().join("crds/moedeployments.serving.moe.dev.yaml");
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: copy it from crds/ with\n  cp crds/moedeployments.serving.moe.dev.yaml charts/moe-operator/crds/\n\
         or regenerate both with\n  UPDATE_CRDS=1 cargo test -p moe-operator --test crd --test chart",
        path.display()
    );
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let chart: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(chart["name"].as_str(), Some("moe-operator"));
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion is the default tag of the operator and worker images; \
         keep it at the operator crate's version"
    );
}
