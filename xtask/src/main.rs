//! `cargo xtask images`: the moe-operator and moe-worker container images, built without a
//! container engine from the workspace's binaries and Debian packages, into an OCI image
//! layout (and pushed to a registry with `--push`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

mod debs;
mod images;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "moe-serve build tasks")]
enum Task {
    /// Build the images (moe-operator, moe-worker) into an OCI image layout.
    Images(images::Args),
    /// Resolve the base's Debian packages to the versions apt offers now and rewrite
    /// images/debian.lock (versions and SHA-256 of each .deb).
    LockDebs {
        /// The lock file to write.
        #[arg(long, default_value = "images/debian.lock")]
        lock: PathBuf,
    },
}

fn main() -> ExitCode {
    let task = Task::parse();
    let result = match task {
        Task::Images(args) => images::run(args),
        Task::LockDebs { lock } => debs::relock(&root().join(lock)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Where downloads are cached, outside the clone and shared by every clone (as `.ci/run` and
/// `e2e/k8s/build.sh` do): `$MOE_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("moe-serve"))
        .unwrap_or_else(|| root().join("target/moe-cache"))
}

/// Runs `cmd`, returning its standard output, or an error naming the command.
pub fn output(cmd: &mut std::process::Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: {e} (is it installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}
