//! The pod network: a Linux bridge with the host's address, and per pod a network namespace
//! joined to it by a veth pair, with an address of its own.
//!
//! Several clusters may run at once (test binaries of several developers on one machine), so
//! each takes a *slot* `N` (an exclusive lock on `/tmp/moe-e2e/slot-N.lock`, held for the
//! cluster's lifetime). Slot `N` owns bridge `moe-e2eN`, subnet `<prefix>.N.0/24` (host
//! `<prefix>.N.1`), network namespaces `moeN-<k>` and host-side veths `mvN-<k>`. Leftovers of a
//! crashed run are removed when the slot is next taken, and a watchdog process removes them as
//! soon as the test process exits, however it exits.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The first two octets of the pod networks; override with `MOE_E2E_POD_NET=a.b`.
pub const DEFAULT_PREFIX: [u8; 2] = [10, 77];

/// How many clusters may run on one machine at once.
const SLOTS: u8 = 32;

/// Root of every cluster's files and slot locks.
pub fn state_root() -> PathBuf {
    std::env::temp_dir().join("moe-e2e")
}

/// An exclusive claim on one slot, released when the process exits.
#[derive(Debug)]
pub struct Slot {
    pub index: u8,
    _lock: File,
    /// The watchdog's stdin: when it closes (this process exits), the watchdog cleans up.
    watchdog: Option<std::process::ChildStdin>,
}

impl Slot {
    /// Takes the first free slot, removes what a crashed previous owner left behind, and starts
    /// the watchdog that cleans up after this process.
    pub fn acquire() -> Result<Slot> {
        let root = state_root();
        std::fs::create_dir_all(&root)?;
        for index in 0..SLOTS {
            let path = root.join(format!("slot-{index}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            if file.try_lock().is_err() {
                continue;
            }
            remove_leftovers(index);
            let watchdog = start_watchdog(index, &path)?;
            return Ok(Slot {
                index,
                _lock: file,
                watchdog: Some(watchdog),
            });
        }
        bail!(
            "all {SLOTS} e2e cluster slots under {} are taken",
            root.display()
        )
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        bridge_name(self.index)
    }

    /// Closes the watchdog's stdin so it cleans up now (after an orderly teardown, there is
    /// nothing left for it to do).
    pub fn release_watchdog(&mut self) {
        self.watchdog = None;
    }
}

fn bridge_name(slot: u8) -> String {
    format!("moe-e2e{slot}")
}

fn netns_prefix(slot: u8) -> String {
    format!("moe{slot}-")
}

/// A shell script that waits for EOF on stdin (this process's exit), then takes the slot's lock
/// (so the next owner waits for it) and deletes the slot's namespaces (killing every process in
/// them) and bridge. It is in a process group of its own, so Ctrl-C does not stop it.
fn start_watchdog(slot: u8, lock: &Path) -> Result<std::process::ChildStdin> {
    let script = r#"
cat >/dev/null
exec 9>>"$1"
flock 9
for ns in $(ip netns list | awk '{print $1}' | grep "^$2"); do
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
    ip netns delete "$ns"
done
ip link delete "$3" 2>/dev/null
# The writable overlays of runc containers (under the slot's folder).
for m in $(awk -v d="${1%.lock}/" 'index($2, d) == 1 {print $2}' /proc/mounts); do umount -l "$m"; done
exit 0
"#;
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new("sh")
        .args(["-c", script, "moe-e2e-watchdog"])
        .arg(lock)
        .arg(netns_prefix(slot))
        .arg(bridge_name(slot))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the cleanup watchdog")?;
    let stdin = child.stdin.take().context("watchdog stdin")?;
    // The watchdog outlives us on purpose; nothing waits for it (init reaps it).
    std::mem::forget(child);
    Ok(stdin)
}

/// Deletes slot `slot`'s namespaces (and the processes in them) and bridge.
fn remove_leftovers(slot: u8) {
    let prefix = netns_prefix(slot);
    for ns in list_netns() {
        if ns.starts_with(&prefix) {
            kill_netns_processes(&ns);
            let _ = ip(&["netns", "delete", &ns]);
        }
    }
    let bridge = bridge_name(slot);
    if Path::new("/sys/class/net").join(&bridge).exists() {
        let _ = ip(&["link", "delete", &bridge]);
    }
}

fn list_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn kill_netns_processes(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One cluster's pod network.
#[derive(Debug)]
pub struct PodNetwork {
    slot: u8,
    prefix: [u8; 2],
    in_use: Mutex<Allocator>,
}

#[derive(Debug, Default)]
struct Allocator {
    used: BTreeSet<u8>,
    last: u8,
}

/// A pod's network namespace.
#[derive(Debug, Clone)]
pub struct PodNetns {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    pub ip: Ipv4Addr,
    host_veth: String,
}

impl PodNetns {
    /// The namespace's file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl PodNetwork {
    /// Creates the slot's bridge with the host address.
    pub fn create(slot: &Slot) -> Result<PodNetwork> {
        let prefix = match std::env::var("MOE_E2E_POD_NET") {
            Ok(p) => parse_prefix(&p)?,
            Err(_) => DEFAULT_PREFIX,
        };
        let net = PodNetwork {
            slot: slot.index,
            prefix,
            in_use: Mutex::new(Allocator::default()),
        };
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(net)
    }

    pub fn bridge(&self) -> String {
        bridge_name(self.slot)
    }

    /// The host's address on the pod network: pods reach the API server here.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.slot, 1)
    }

    /// The subnet in CIDR notation.
    pub fn cidr(&self) -> String {
        format!("{}.{}.{}.0/24", self.prefix[0], self.prefix[1], self.slot)
    }

    /// Creates a namespace with a fresh address, loopback up and a default route via the host.
    pub fn add_pod(&self) -> Result<PodNetns> {
        let host = self.allocate()?;
        let ns = PodNetns {
            name: format!("{}{host}", netns_prefix(self.slot)),
            ip: Ipv4Addr::new(self.prefix[0], self.prefix[1], self.slot, host),
            host_veth: format!("mv{}-{host}", self.slot),
        };
        let setup = || -> Result<()> {
            ip(&["netns", "add", &ns.name])?;
            ip(&[
                "link",
                "add",
                &ns.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ])?;
            ip(&["link", "set", &ns.host_veth, "master", &self.bridge(), "up"])?;
            let n = ns.name.as_str();
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", ns.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", n, "link", "set", "eth0", "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                n,
                "route",
                "add",
                "default",
                "via",
                &self.host_ip().to_string(),
            ])?;
            Ok(())
        };
        if let Err(e) = setup() {
            self.remove_pod(&ns);
            return Err(e);
        }
        Ok(ns)
    }

    /// Kills every process left in the namespace and deletes it (its veth pair goes with it).
    pub fn remove_pod(&self, ns: &PodNetns) {
        kill_netns_processes(&ns.name);
        let _ = ip(&["netns", "delete", &ns.name]);
        let _ = ip(&["link", "delete", &ns.host_veth]);
        let host = ns.ip.octets()[3];
        if let Ok(mut a) = self.in_use.lock() {
            a.used.remove(&host);
        }
    }

    /// Removes what slot `slot` left behind (namespaces, their processes, the bridge).
    pub fn cleanup_slot(slot: u8) {
        remove_leftovers(slot);
    }

    /// Removes every pod namespace and the bridge.
    pub fn teardown(&self) {
        remove_leftovers(self.slot);
    }

    /// Addresses go round-robin over .2-.254, so a deleted pod's address is not reused at once
    /// (EndpointSlices and peers may still name it for a moment).
    fn allocate(&self) -> Result<u8> {
        let mut a = self
            .in_use
            .lock()
            .map_err(|_| anyhow::anyhow!("pod address allocator poisoned"))?;
        let start = u16::from(a.last.saturating_sub(1)); // index after the last, in .2-.254
        for step in 0..253u16 {
            let candidate = ((start + step) % 253 + 2) as u8;
            if !a.used.contains(&candidate) {
                a.used.insert(candidate);
                a.last = candidate;
                return Ok(candidate);
            }
        }
        bail!("no free pod address in {}", self.cidr())
    }
}

fn parse_prefix(s: &str) -> Result<[u8; 2]> {
    let mut parts = s.trim().split('.');
    let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
        bail!("MOE_E2E_POD_NET must be two octets like 10.77, got {s:?}");
    };
    Ok([a.parse()?, b.parse()?])
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(contents)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_parses() {
        assert_eq!(parse_prefix("10.77").ok(), Some([10, 77]));
        assert!(parse_prefix("10.77.0").is_err());
        assert!(parse_prefix("10").is_err());
    }

    #[test]
    fn addresses_go_round_robin() {
        let net = PodNetwork {
            slot: 0,
            prefix: DEFAULT_PREFIX,
            in_use: Mutex::new(Allocator::default()),
        };
        let a = net.allocate().ok();
        let b = net.allocate().ok();
        assert_eq!((a, b), (Some(2), Some(3)));
        net.in_use.lock().map(|mut x| x.used.remove(&2)).ok();
        assert_eq!(net.allocate().ok(), Some(4));
        let mut all = BTreeSet::new();
        while let Ok(h) = net.allocate() {
            all.insert(h);
        }
        assert_eq!(all.len(), 251); // 253 addresses minus the two still taken
        assert!(all.iter().all(|h| (2..=254).contains(h)));
    }
}
