//! `cargo xtask images` as the tests run it: from the binaries this test build made, into an
//! OCI layout, optionally pushed to the cluster's registry.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::Registry;
use crate::binaries::{workspace_bin_dir, workspace_binary};

/// What one build printed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Built {
    /// Reference in the layout (`moe-worker:0.1.0`) → (manifest digest, compressed MB).
    pub images: BTreeMap<String, (String, f64)>,
    /// Image name (`moe-worker`) → the pushed reference, `host/path/name:tag@sha256:...`.
    pub pushed: BTreeMap<String, String>,
}

/// Builds both images into `out`; with `push`, pushes them to `registry`/`path` trusting `ca`.
pub fn build(out: &Path, push: Option<(&Registry, &str, &Path)>) -> Result<Built> {
    let xtask = workspace_binary("xtask")?;
    for bin in ["moe-operator", "moe-worker"] {
        workspace_binary(bin)?;
    }
    let mut cmd = Command::new(&xtask);
    cmd.args(["images", "--bin-dir"])
        .arg(workspace_bin_dir())
        .arg("--out")
        .arg(out)
        .env_remove("MOE_REGISTRY_USERNAME")
        .env_remove("MOE_REGISTRY_PASSWORD");
    if let Some((registry, path, ca)) = push {
        cmd.arg("--push")
            .arg(format!("{}/{path}", registry.host))
            .arg("--registry-ca")
            .arg(ca)
            .env("MOE_REGISTRY_USERNAME", &registry.username)
            .env("MOE_REGISTRY_PASSWORD", &registry.password);
    }
    let run = cmd.output().context("running xtask images")?;
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    if !run.status.success() {
        bail!(
            "xtask images failed: {stdout}{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    eprintln!("{stdout}");
    let mut built = Built::default();
    for line in stdout.lines() {
        if let Some(reference) = line.strip_prefix("pushed ") {
            let name = reference
                .split('@')
                .next()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|r| r.split(':').next())
                .unwrap_or_default();
            built.pushed.insert(name.to_string(), reference.to_string());
        } else if line.contains("sha256:") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let mb: f64 = cells[4].trim_end_matches(" MB").parse()?;
            built
                .images
                .insert(cells[2].to_string(), (cells[3].to_string(), mb));
        }
    }
    Ok(built)
}

/// A `kubernetes.io/dockerconfigjson` Secret `regcred` in `ns` for the cluster's registry, with
/// `password` (the registry's, or a wrong one to test refusals). Kept if it exists.
pub async fn pull_secret(cluster: &crate::Cluster, ns: &str, password: &str) -> Result<()> {
    use base64::Engine as _;
    use k8s_openapi::api::core::v1::Secret;
    let reg = cluster.registry();
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", reg.username));
    let config = serde_json::json!({"auths": {reg.host.clone(): {"auth": auth}}}).to_string();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "regcred", "namespace": ns},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config},
    }))?;
    let api: kube::Api<Secret> = kube::Api::namespaced(cluster.client().await?, ns);
    if api.get_opt("regcred").await?.is_none() {
        api.create(&Default::default(), &secret).await?;
    }
    Ok(())
}

/// A busybox image (Debian's `busybox-static`: `/bin/busybox` and a link per applet, `sh`,
/// `sleep`, `httpd`, `wget`, ...) pushed to `cluster`'s registry, by digest: what the harness's
/// own tests run. Built and pushed once per registry (the nodes log in to it themselves).
pub async fn busybox(cluster: &crate::Cluster) -> Result<String> {
    use moe_oci::{Image, ImageConfig, LayerBuilder};
    static PUSHED: tokio::sync::Mutex<BTreeMap<String, String>> =
        tokio::sync::Mutex::const_new(BTreeMap::new());
    let reg = cluster.registry();
    // A later cluster may get the same address: its registry is a new one (new password).
    let key = format!("{}:{}", reg.host, reg.password);
    let mut pushed = PUSHED.lock().await;
    if let Some(r) = pushed.get(&key) {
        return Ok(r.clone());
    }
    let bin = tokio::task::spawn_blocking(crate::binaries::busybox_bin).await??;
    let list = Command::new(&bin).arg("--list").output()?;
    let mut l = LayerBuilder::new();
    let err = |e: moe_oci::Error| anyhow::anyhow!("{e}");
    l.dir("bin", 0o755, 0, 0).map_err(err)?;
    l.dir("tmp", 0o1777, 0, 0).map_err(err)?;
    l.file("bin/busybox", std::fs::read(&bin)?, 0o755)
        .map_err(err)?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            l.symlink(&format!("bin/{applet}"), "busybox")
                .map_err(err)?;
        }
    }
    let layer = l.build(0, "busybox-static").map_err(err)?;
    let image = Image::new(
        &ImageConfig {
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            user: String::new(),
            working_dir: "/".into(),
            labels: BTreeMap::new(),
            created: 0,
        },
        vec![layer],
    )
    .map_err(err)?;
    let client = moe_oci::registry::Registry::new(
        &reg.host,
        Some(&std::fs::read(cluster.ca_cert())?),
        Some(moe_oci::registry::Credentials {
            username: reg.username.clone(),
            password: reg.password.clone(),
        }),
    )
    .map_err(err)?;
    let digest = client.push("e2e/busybox", &image, "1").await.map_err(err)?;
    let reference = format!("{}/e2e/busybox@{digest}", reg.host);
    pushed.insert(key, reference.clone());
    Ok(reference)
}
