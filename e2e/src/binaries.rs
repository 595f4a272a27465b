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
    // stderr is inherited, so the build's progress shows even when the test's output is captured.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    script_output_dir(&script, &[("MOE_K8S_VERSION", K8S_VERSION)])
}

/// The folder holding `prometheus` and `promtool`, built by `prometheus/build.sh` from the
/// committed wrapper module when missing (about two minutes the first time). Built once per
/// process.
pub fn prometheus_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/build.sh");
        script_output_dir(&script, &[]).map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Runs a build script (stderr shown) and returns the folder it prints last.
fn script_output_dir(script: &Path, env: &[(&str, &str)]) -> Result<PathBuf> {
    let mut cmd = Command::new("bash");
    cmd.arg(script).stderr(std::process::Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
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

/// The path of this workspace's binary `name` (`moe-worker`, `moe-operator`), so pods run the
/// current code. `cargo test --workspace` has just built it; under `cargo test -p e2e` it may be
/// missing or older than the sources, and then it is built here with `cargo build --bin NAME` in
/// the running test's profile and target folder (cargo holds no lock while tests run). A fresh
/// binary is not rebuilt: a plain `cargo build` resolves features differently from `cargo test`
/// and would recompile dependencies for nothing. Checked once per process and name.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = workspace_bin_dir();
    let path = dir.join(name);
    let mut checked = CHECKED
        .lock()
        .map_err(|_| anyhow::anyhow!("binary build lock poisoned"))?;
    if checked.iter().any(|b| b == name) {
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = path.metadata().and_then(|m| m.modified()).ok();
    let fresh = built.is_some_and(|b| newest_source(&workspace).is_none_or(|s| s <= b));
    if !fresh {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace).args(["build", "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.arg("--target-dir").arg(target);
        }
        eprintln!("[e2e] {name} is missing or older than the sources: cargo build --bin {name}");
        let status = cmd
            .stderr(std::process::Stdio::inherit())
            .status()
            .with_context(|| format!("running cargo build --bin {name}"))?;
        if !status.success() || !path.exists() {
            bail!("cargo build --bin {name} failed ({status})");
        }
    }
    checked.push(name.to_string());
    Ok(path)
}

/// The newest modification time of the workspace's Rust sources, manifests and protos (not
/// `e2e/`, whose changes do not touch the product's binaries).
fn newest_source(workspace: &Path) -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" || name == "e2e" || name == "node_modules"
            {
                continue;
            }
            if p.is_dir() {
                walk(&p, newest);
            } else if ["rs", "toml", "proto"]
                .iter()
                .any(|ext| p.extension().is_some_and(|x| x == *ext))
                && let Ok(t) = e.metadata().and_then(|m| m.modified())
                && newest.is_none_or(|n| t > n)
            {
                *newest = Some(t);
            }
        }
    }
    let mut newest = None;
    walk(workspace, &mut newest);
    newest
}

/// runc, the OCI runtime pods run under with `ClusterConfig::oci_runtime`: the Debian
/// package's binary (what `apt-get install runc` would put in /usr/sbin), downloaded with
/// `apt-get download` and cached by version outside the clone; the host is not changed.
pub fn runc_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        debian_binary("runc", &["usr/sbin/runc", "usr/bin/runc"]).map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Debian's statically linked busybox (`busybox-static`), the harness's own test image.
pub fn busybox_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        debian_binary("busybox-static", &["bin/busybox", "usr/bin/busybox"])
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The file at the first of `paths` that `package` (the version apt offers) holds, cached
/// under `moe-serve/<package>/<version>/` outside the clone.
fn debian_binary(package: &str, paths: &[&str]) -> Result<PathBuf> {
    let policy = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .with_context(|| format!("apt-cache policy {package}"))?;
    let policy = String::from_utf8_lossy(&policy.stdout);
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .with_context(|| format!("apt offers no {package} (apt-get update?)"))?
        .to_string();
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("no cache folder")?;
    // runc's cache kept its historical folder (`moe-serve/runc/<version>`).
    let dir = home
        .join("moe-serve")
        .join(package)
        .join(version.replace(':', "_"));
    let name = Path::new(paths[0])
        .file_name()
        .context("a path names a file")?;
    let bin = dir.join(name);
    if bin.exists() {
        return Ok(bin);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    run(Command::new("apt-get")
        .current_dir(&tmp)
        .args(["download", &format!("{package}={version}")]))?;
    let deb = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tmp.join("x")))?;
    std::fs::create_dir_all(&dir)?;
    let found = paths
        .iter()
        .find(|p| std::fs::rename(tmp.join("x").join(p), &bin).is_ok());
    let _ = std::fs::remove_dir_all(&tmp);
    found.with_context(|| format!("the {package} package holds none of {paths:?}"))?;
    Ok(bin)
}
