//! Containers from images under a real OCI runtime (runc): the image is pulled from its
//! registry (honouring `imagePullPolicy`, digests and `imagePullSecrets`), unpacked once per
//! manifest digest (whiteouts applied), given a writable overlay unless the root filesystem is
//! read-only, and run from an OCI bundle made from the pod spec: command and args over the
//! image's entrypoint and cmd, env, user, the pod's network namespace, volumes as bind mounts,
//! capabilities, `noNewPrivileges`, a seccomp profile for `RuntimeDefault`, and memory and CPU
//! limits through cgroups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use moe_oci::registry::{Credentials, Reference, Registry};
use serde_json::{Value, json};

/// The `PATH` a container sees when its image sets none (a typical image's).
pub const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime's binary and folders.
#[derive(Debug, Clone)]
pub struct Runc {
    pub bin: PathBuf,
    /// runc's state (`--root`).
    pub state: PathBuf,
    /// Pulled blobs, references and unpacked root filesystems.
    pub store: PathBuf,
    /// PEM CAs the node trusts for registries (the cluster CA).
    pub registry_ca: Vec<u8>,
    /// The node's own login to `node_registry`, used when no pull secret has one for it.
    pub node_credentials: Option<Credentials>,
    pub node_registry: String,
}

/// A pulled image.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// `registry/repository@sha256:...`.
    pub image_id: String,
    pub rootfs: PathBuf,
    /// The image config's `config` (Entrypoint, Cmd, Env, User, WorkingDir).
    pub config: Value,
}

/// Why a pull failed: `ErrImagePull`, or `ErrImageNeverPull` for `imagePullPolicy: Never`.
#[derive(Debug, Clone)]
pub struct PullError {
    pub reason: &'static str,
    pub message: String,
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Runc {
    fn rootfs_of(&self, manifest: &str) -> PathBuf {
        self.store.join("rootfs").join(hex(manifest))
    }

    fn ref_file(&self, image: &str) -> PathBuf {
        self.store.join("refs").join(safe_name(image))
    }

    /// The image as a container of `policy` gets it.
    pub async fn pull(
        &self,
        image: &str,
        policy: &str,
        docker_configs: &[Vec<u8>],
    ) -> Result<Pulled, PullError> {
        let pull_err = |m: String| PullError {
            reason: "ErrImagePull",
            message: m,
        };
        let r = Reference::parse(image)
            .map_err(|e| pull_err(format!("{e}: this node pulls from registries only")))?;
        // What this node already has under that name.
        let cached = match &r.digest {
            Some(d) => Some(d.clone()),
            None => std::fs::read_to_string(self.ref_file(image)).ok(),
        }
        .filter(|d| self.rootfs_of(d).join(".complete").exists());
        let use_cache = match policy {
            "Never" => true,
            "Always" => false,
            // Kubernetes' default: Always for `:latest` or no tag, else IfNotPresent.
            _ => r.digest.is_some() || r.tag.as_deref().is_some_and(|t| t != "latest"),
        };
        if use_cache && let Some(d) = &cached {
            return self.load(&r, d).map_err(pull_err);
        }
        if policy == "Never" {
            return Err(PullError {
                reason: "ErrImageNeverPull",
                message: format!(
                    "container image {image:?} is not present with pull policy of Never"
                ),
            });
        }
        let creds = docker_configs
            .iter()
            .find_map(|json| Credentials::from_docker_config(json, &r.registry))
            .or_else(|| {
                (r.registry == self.node_registry)
                    .then(|| self.node_credentials.clone())
                    .flatten()
            });
        let client = Registry::new(&r.registry, Some(&self.registry_ca), creds)
            .map_err(|e| pull_err(e.to_string()))?;
        let (manifest, digest) = client
            .manifest(&r.repository, r.target())
            .await
            .map_err(|e| pull_err(format!("pulling {image}: {e}")))?;
        if !self.rootfs_of(&digest).join(".complete").exists() {
            let m: Value = serde_json::from_slice(&manifest)
                .map_err(|e| pull_err(format!("{image}: manifest: {e}")))?;
            let config_digest = m["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let config = client
                .blob(&r.repository, &config_digest)
                .await
                .map_err(|e| pull_err(format!("pulling {image}: {e}")))?;
            // One folder per pull: the nodes of a cluster share this store and one process,
            // and two pods may pull the same image at once (the first rename wins).
            static PULLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let tmp = self.store.join("tmp").join(format!(
                "{}-{}-{}",
                hex(&digest),
                std::process::id(),
                PULLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&tmp);
            let rootfs = tmp.join("rootfs");
            std::fs::create_dir_all(&rootfs).map_err(|e| pull_err(e.to_string()))?;
            for l in m["layers"].as_array().into_iter().flatten() {
                let d = l["digest"].as_str().unwrap_or_default();
                let blob = client
                    .blob(&r.repository, d)
                    .await
                    .map_err(|e| pull_err(format!("pulling {image}: {e}")))?;
                let root = rootfs.clone();
                tokio::task::spawn_blocking(move || moe_oci::unpack::apply_layer(&blob, &root))
                    .await
                    .map_err(|e| pull_err(e.to_string()))?
                    .map_err(|e| pull_err(format!("unpacking {image}: {e}")))?;
            }
            std::fs::write(tmp.join("config.json"), &config)
                .map_err(|e| pull_err(e.to_string()))?;
            std::fs::write(tmp.join(".complete"), b"").map_err(|e| pull_err(e.to_string()))?;
            let dest = self.rootfs_of(&digest);
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))
                .map_err(|e| pull_err(e.to_string()))?;
            if std::fs::rename(&tmp, &dest).is_err() {
                // Another container pulled it meanwhile.
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        let refs = self.store.join("refs");
        let _ = std::fs::create_dir_all(&refs);
        let _ = std::fs::write(self.ref_file(image), &digest);
        self.load(&r, &digest).map_err(pull_err)
    }

    fn load(&self, r: &Reference, digest: &str) -> Result<Pulled, String> {
        let dir = self.rootfs_of(digest);
        let config: Value = serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        Ok(Pulled {
            image_id: format!("{}/{}@{digest}", r.registry, r.repository),
            rootfs: dir.join("rootfs"),
            config: config["config"].clone(),
        })
    }
}

/// A container runc runs, and what to clean up after it.
#[derive(Debug, Clone)]
pub struct RuncContainer {
    pub id: String,
    pub dir: PathBuf,
    /// The overlay mounted as its root, if any.
    pub overlay: Option<PathBuf>,
    pub cgroup: String,
}

impl Runc {
    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--root").arg(&self.state);
        cmd
    }

    /// The host pid of the container's first process, once runc has started it.
    pub async fn init_pid(&self, id: &str) -> Option<u32> {
        let out = self.command().args(["state", id]).output().await.ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let pid = v["pid"].as_u64()?;
        (pid > 0 && v["status"] != "stopped").then_some(pid as u32)
    }

    /// After the container ended: whether the kernel OOM-killed it (its memory cgroup's
    /// `oom_kill` count), then the container, its overlay and bundle are removed.
    pub async fn finish(&self, c: &RuncContainer) -> bool {
        let oom = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
            .iter()
            .flat_map(|base| {
                let dir = PathBuf::from(base).join(c.cgroup.trim_start_matches('/'));
                [dir.join("memory.oom_control"), dir.join("memory.events")]
            })
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .any(|text| {
                text.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            });
        let _ = self
            .command()
            .args(["delete", "--force", &c.id])
            .output()
            .await;
        if let Some(root) = &c.overlay {
            let _ = tokio::process::Command::new("umount")
                .arg("-l")
                .arg(root)
                .output()
                .await;
        }
        let _ = std::fs::remove_dir_all(&c.dir);
        oom
    }
}

/// Mounts an overlay of `lower` with a writable layer under `dir` at `dir/rootfs`.
pub fn mount_overlay(lower: &Path, dir: &Path) -> Result<PathBuf, String> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(&merged)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "overlay mount: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(merged)
}

/// A bind mount into the container.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Bytes of a Kubernetes quantity (`512Mi`, `1G`, `1e9`, `100k`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let (num, mult): (&str, f64) = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ]
    .iter()
    .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
    .unwrap_or((q, 1.0));
    let v: f64 = num.parse().ok()?;
    (v >= 0.0).then(|| (v * mult).ceil() as u64)
}

/// Millicores of a CPU quantity (`250m`, `1`, `0.5`).
pub fn quantity_millicores(q: &str) -> Option<u64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64),
    }
}

/// Docker's default capabilities: what a container has unless its securityContext drops them.
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// `RuntimeDefault` here: every system call allowed except those a container has no business
/// making (kernel modules, mounts, namespaces, tracing other processes, keyrings, clocks,
/// reboot): they fail with EPERM.
fn runtime_default_seccomp() -> Value {
    let denied = [
        "acct",
        "add_key",
        "bpf",
        "clock_adjtime",
        "clock_settime",
        "create_module",
        "delete_module",
        "finit_module",
        "get_kernel_syms",
        "init_module",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mount",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "fsopen",
        "fsmount",
        "fsconfig",
        "fspick",
        "perf_event_open",
        "pivot_root",
        "process_vm_readv",
        "process_vm_writev",
        "ptrace",
        "query_module",
        "quotactl",
        "reboot",
        "request_key",
        "setns",
        "settimeofday",
        "swapoff",
        "swapon",
        "sysfs",
        "_sysctl",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
    ];
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": denied.as_slice(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What a bundle needs besides the container spec.
#[derive(Debug)]
pub struct BundleInput<'a> {
    pub pod: &'a PodSpec,
    pub container: &'a Container,
    pub image: &'a Pulled,
    /// The container's command and args with `$(VAR)` expanded (empty: the image's).
    pub command: &'a [String],
    pub args: &'a [String],
    /// The container's environment (the image's is put first).
    pub env: &'a [(String, String)],
    pub hostname: &'a str,
    /// The root the container sees: the image's, or an overlay over it.
    pub root: &'a Path,
    pub read_only_root: bool,
    /// `/var/run/netns/NAME` of the pod, or none for host network.
    pub netns: Option<PathBuf>,
    pub binds: &'a [Bind],
    pub cgroup: &'a str,
}

/// The OCI runtime config of a container, or a `CreateContainerConfigError` message.
pub fn bundle_config(b: &BundleInput<'_>) -> Result<Value, String> {
    let c = b.container;
    let img = &b.image.config;
    let pod_sc = b.pod.security_context.as_ref();
    let sc = c.security_context.as_ref();
    // Entrypoint and cmd, as Kubernetes combines them.
    let args: Vec<String> = if !b.command.is_empty() {
        b.command.iter().chain(b.args.iter()).cloned().collect()
    } else if !b.args.is_empty() {
        strings(&img["Entrypoint"])
            .into_iter()
            .chain(b.args.iter().cloned())
            .collect()
    } else {
        strings(&img["Entrypoint"])
            .into_iter()
            .chain(strings(&img["Cmd"]))
            .collect()
    };
    if args.is_empty() {
        return Err("the image has no entrypoint and the container no command".into());
    }
    // The user: securityContext over the image's numeric `User`.
    let (img_uid, img_gid) = {
        let u = img["User"].as_str().unwrap_or("");
        let (uid, gid) = u.split_once(':').unwrap_or((u, ""));
        (uid.parse::<i64>().ok(), gid.parse::<i64>().ok())
    };
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user))
        .or(img_uid)
        .unwrap_or(0);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group))
        .or(img_gid)
        .unwrap_or(0);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err("container has runAsNonRoot and image will run as root".into());
    }
    let mut groups: Vec<i64> = pod_sc.and_then(|s| s.fs_group).into_iter().collect();
    groups.extend(
        pod_sc
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default(),
    );
    // Capabilities: the default set, minus drop (ALL drops every one), plus add.
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let drop: Vec<String> = caps.and_then(|c| c.drop.clone()).unwrap_or_default();
    let add: Vec<String> = caps.and_then(|c| c.add.clone()).unwrap_or_default();
    let mut set: Vec<String> = if drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .filter(|c| !drop.iter().any(|d| d == *c))
            .map(|c| c.to_string())
            .collect()
    };
    for a in add {
        if !set.contains(&a) {
            set.push(a);
        }
    }
    let set: Vec<String> = set
        .iter()
        .map(|c| format!("CAP_{}", c.trim_start_matches("CAP_")))
        .collect();
    let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let seccomp = sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(pod_sc.and_then(|s| s.seccomp_profile.as_ref()))
        .map(|p| p.type_.as_str());
    // Environment: the image's, then the container's over it.
    let mut env: BTreeMap<String, String> = strings(&img["Env"])
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let mut order: Vec<String> = env.keys().cloned().collect();
    for (k, v) in b.env {
        if env.insert(k.clone(), v.clone()).is_none() {
            order.push(k.clone());
        }
    }
    let env: Vec<String> = order.iter().map(|k| format!("{k}={}", env[k])).collect();
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| {
            img["WorkingDir"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/".into());
    // Limits.
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = limits
        .and_then(|l| l.get("memory"))
        .and_then(|q| quantity_bytes(&q.0))
    {
        resources["memory"] = json!({"limit": m, "swap": m});
    }
    if let Some(mc) = limits
        .and_then(|l| l.get("cpu"))
        .and_then(|q| quantity_millicores(&q.0))
    {
        resources["cpu"] = json!({"quota": (mc * 100).max(1000), "period": 100_000});
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if let Some(ns) = &b.netns {
        namespaces.push(json!({"type": "network", "path": ns}));
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        // What a kubelet gives every container: the node's resolver and hosts.
        json!({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]}),
    ];
    for m in b.binds {
        let mut options = vec!["rbind", "rprivate"];
        if m.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": m.target, "type": "bind", "source": m.source, "options": options}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": b.cgroup,
        "resources": resources,
        "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware"],
        "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
            "/proc/sysrq-trigger"],
    });
    if seccomp == Some("RuntimeDefault") {
        linux["seccomp"] = runtime_default_seccomp();
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": set, "effective": set, "permitted": set},
            "noNewPrivileges": no_new_privs,
        },
        "root": {"path": b.root, "readonly": b.read_only_root},
        "hostname": b.hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("100"), Some(100));
        assert_eq!(quantity_millicores("250m"), Some(250));
        assert_eq!(quantity_millicores("1.5"), Some(1500));
        assert_eq!(quantity_bytes("x"), None);
    }

    #[test]
    fn the_bundle_follows_the_pod_spec_over_the_image() {
        let pod: PodSpec = serde_json::from_value(json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [],
        }))
        .expect("pod");
        let c: Container = serde_json::from_value(json!({
            "name": "w", "image": "r.io/w:1", "args": ["serve", "--x"],
            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
        }))
        .expect("container");
        let image = Pulled {
            image_id: "r.io/w@sha256:00".into(),
            rootfs: "/img".into(),
            config: json!({"Entrypoint": ["/usr/local/bin/w"], "Cmd": ["--help"], "User": "0:0",
                           "Env": ["PATH=/usr/local/bin", "A=image"]}),
        };
        let env = vec![("A".to_string(), "pod".to_string())];
        let input = BundleInput {
            pod: &pod,
            container: &c,
            image: &image,
            command: &[],
            args: &["serve".to_string(), "--x".to_string()],
            env: &env,
            hostname: "w-0",
            root: Path::new("/img"),
            read_only_root: true,
            netns: Some("/var/run/netns/p".into()),
            binds: &[],
            cgroup: "/moe-e2e/w",
        };
        let cfg = bundle_config(&input).expect("config");
        assert_eq!(
            cfg["process"]["args"],
            json!(["/usr/local/bin/w", "serve", "--x"])
        );
        assert_eq!(cfg["process"]["user"]["uid"], 65532);
        assert_eq!(cfg["process"]["user"]["additionalGids"], json!([65532]));
        assert_eq!(
            cfg["process"]["env"],
            json!(["A=pod", "PATH=/usr/local/bin"])
        );
        assert_eq!(cfg["process"]["capabilities"]["bounding"], json!([]));
        assert_eq!(cfg["process"]["noNewPrivileges"], true);
        assert_eq!(cfg["root"]["readonly"], true);
        assert_eq!(cfg["linux"]["resources"]["memory"]["limit"], 64u64 << 20);
        assert_eq!(cfg["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(cfg["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(
            cfg["linux"]["namespaces"]
                .as_array()
                .expect("ns")
                .iter()
                .any(|n| n["path"] == "/var/run/netns/p")
        );
        // runAsNonRoot with a root user is refused.
        let mut root_pod = pod.clone();
        if let Some(sc) = root_pod.security_context.as_mut() {
            sc.run_as_user = None;
        }
        let e = bundle_config(&BundleInput {
            pod: &root_pod,
            ..input
        })
        .expect_err("root");
        assert!(e.contains("runAsNonRoot"), "{e}");
    }
}
