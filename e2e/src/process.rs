//! Child processes that cannot outlive the test: each runs in its own process group (so a stop
//! reaches everything it started) and is SIGKILLed by the kernel when its parent dies.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process. So
//! every supervised child is spawned from a task of the cluster's own tokio runtime, whose worker
//! threads live exactly as long as the cluster: never from a test's thread or a blocking-pool
//! thread (those come and go).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Makes `cmd` start in a process group of its own and die with its parent thread.
pub(crate) fn supervise(cmd: &mut Command) {
    cmd.process_group(0).kill_on_drop(true);
    die_with_parent(cmd);
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only async-signal-safe
    // system calls (prctl, getppid); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

/// Opens (truncating) `path` for a child's stdout and stderr.
pub(crate) fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
}

/// Sends `signal` to the process group `pgid` (ignoring a group that is already gone).
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// SIGTERM to the child's group, SIGKILL after `grace`; waits until the child is reaped, then
/// kills whatever is left of the group.
pub(crate) async fn stop_group(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    signal_group(pid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    signal_group(pid, Signal::SIGKILL);
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
