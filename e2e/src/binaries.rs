//! Where the binaries come from: the Kubernetes components (built from Go modules by
//! `k8s/build.sh` into a per-version cache) and this workspace's own binaries (cargo's target
//! folder, which pods use in place of container images).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The Kubernetes release the control plane is built from.
pub const K8S_VERSION: &str = "v1.37.2";

/// The folder holding `etcd`, `kube-apiserver`, `kube-controller-manager`, `kube-scheduler`,
/// `kubectl` and `helm`, building them first when they are missing (the first time takes many
/// minutes; progress goes to stderr). Built once per process.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_build_script().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn run_build_script() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    // stderr is inherited, so the build's progress shows even when the test's output is captured.
    let out = Command::new("bash")
        .arg(&script)
        .env("MOE_K8S_VERSION", K8S_VERSION)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().map(str::trim).unwrap_or_default();
    if dir.is_empty() {
        bail!("{} printed no bin folder", script.display());
    }
    Ok(PathBuf::from(dir))
}

/// Cargo's output folder for this build profile (`target/debug` or `target/release`), where the
/// workspace's binaries (`moe-worker`, `moe-operator`) are. Found from the running test binary,
/// which lives in its `deps/` subfolder.
pub fn workspace_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}
