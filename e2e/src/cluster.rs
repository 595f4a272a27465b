//! A real control plane on this machine: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, and the node agent with fake A100 nodes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::process::Child;

use crate::binaries::k8s_bin_dir;
use crate::net::{PodNetwork, Slot, state_root};
use crate::node::{NodeAgent, NodeAgentConfig};
use crate::pki::{self, PkiFiles};
use crate::process::{self, tail};

/// How the cluster is shaped.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Number of fake GPU nodes (`gpu-node-0`, ...).
    pub nodes: usize,
    /// `nvidia.com/gpu` capacity of each node.
    pub gpus_per_node: u32,
    /// The nodes log in to the cluster's registry themselves (as a kubelet with the node's
    /// `config.json`), so pods without `imagePullSecrets` pull from it too.
    pub node_registry_login: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: 3,
            gpus_per_node: 8,
            node_registry_login: true,
        }
    }
}

/// A running cluster. Dropping it stops everything (pods first); a cluster that is never
/// dropped (a `static`) is cleaned up when the process exits: its processes are SIGKILLed by
/// the kernel (`PR_SET_PDEATHSIG`) and a watchdog removes the pod network.
pub struct Cluster {
    /// Runs the node agent and owns every child process (see `process`).
    runtime: Option<tokio::runtime::Runtime>,
    info: Arc<Info>,
    running: Arc<tokio::sync::Mutex<Option<Running>>>,
    slot: Option<Slot>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Info {
    dir: PathBuf,
    kubeconfig: PathBuf,
    k8s_bin: PathBuf,
    api_url: String,
    api_host: String,
    api_port: u16,
    nodes: Vec<String>,
    network: Arc<PodNetwork>,
    pki: PkiFiles,
    registry: Registry,
}

/// The cluster's image registry: the CNCF distribution registry over TLS (the cluster CA
/// signed its certificate, valid for 127.0.0.1 and the bridge address pods reach), with
/// htpasswd authentication.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `address:port` (the bridge address: the host and pods reach it there).
    pub host: String,
    pub username: String,
    pub password: String,
}

struct Running {
    components: Vec<Component>,
    agent: Option<NodeAgent>,
}

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

static NAMESPACES: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Starts a cluster with the default shape (3 nodes × 8 A100s). Builds the Kubernetes
    /// binaries first if they are not in the cache yet.
    pub async fn start() -> Result<Cluster> {
        Cluster::start_with(ClusterConfig::default()).await
    }

    /// One cluster per test binary, started by the first test that asks; give each test its
    /// own namespace ([`Cluster::namespace`]). Panics if it cannot start.
    pub async fn shared() -> &'static Cluster {
        static SHARED: tokio::sync::OnceCell<Result<Cluster, String>> =
            tokio::sync::OnceCell::const_new();
        let cluster = SHARED
            .get_or_init(|| async { Cluster::start().await.map_err(|e| format!("{e:#}")) })
            .await;
        match cluster {
            Ok(c) => c,
            Err(e) => panic!("the e2e cluster did not start: {e}"),
        }
    }

    pub async fn start_with(config: ClusterConfig) -> Result<Cluster> {
        let t0 = Instant::now();
        preflight()?;
        let k8s_bin = tokio::task::spawn_blocking(k8s_bin_dir).await??;
        let slot = Slot::acquire()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moe-e2e-cluster")
            .enable_all()
            .build()?;
        let dir = state_root().join(format!("slot-{}", slot.index));
        let network = match prepare(&dir, &slot) {
            Ok(n) => Arc::new(n),
            Err(e) => {
                crate::net::PodNetwork::cleanup_slot(slot.index);
                return Err(e);
            }
        };
        // Every child process is spawned from the cluster runtime's threads.
        let started = runtime
            .spawn(start_all(config, dir.clone(), k8s_bin, network.clone()))
            .await;
        let (info, running) = match started {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                network.teardown();
                runtime.shutdown_background();
                return Err(e);
            }
            Err(e) => {
                network.teardown();
                runtime.shutdown_background();
                bail!("cluster start panicked: {e}");
            }
        };
        eprintln!(
            "[e2e] cluster up in {:.1}s: {} (kubeconfig {}, logs {})",
            t0.elapsed().as_secs_f64(),
            info.api_url,
            info.kubeconfig.display(),
            info.dir.join("logs").display()
        );
        Ok(Cluster {
            runtime: Some(runtime),
            info: Arc::new(info),
            running: Arc::new(tokio::sync::Mutex::new(Some(running))),
            slot: Some(slot),
        })
    }

    /// A new client (each call connects anew, on the caller's runtime).
    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.info.kubeconfig).await
    }

    /// The admin kubeconfig (group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.info.kubeconfig
    }

    /// This cluster's folder: `kubeconfig`, `pki/`, `logs/<component>.log`, `etcd/`,
    /// `pods/<namespace>/<pod>/<container>.log`. Kept after the run (until the slot is reused).
    pub fn dir(&self) -> &Path {
        &self.info.dir
    }

    /// The log file of a pod's container (appended to across restarts).
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.info
            .dir
            .join("pods")
            .join(namespace)
            .join(pod)
            .join(format!("{container}.log"))
    }

    /// `https://127.0.0.1:<port>` (the API server listens on every address).
    pub fn api_url(&self) -> &str {
        &self.info.api_url
    }

    /// The API server's address as pods see it (`KUBERNETES_SERVICE_HOST` and `_PORT`).
    pub fn api_address_for_pods(&self) -> (&str, u16) {
        (&self.info.api_host, self.info.api_port)
    }

    /// The host's address on the pod network.
    pub fn host_ip(&self) -> std::net::Ipv4Addr {
        self.info.network.host_ip()
    }

    /// The pod network, e.g. `10.77.0.0/24`.
    pub fn pod_cidr(&self) -> String {
        self.info.network.cidr()
    }

    /// The pod network's bridge (`moe-e2eN`).
    pub fn bridge(&self) -> String {
        self.info.network.bridge()
    }

    pub fn nodes(&self) -> &[String] {
        &self.info.nodes
    }

    /// The folder of the built Kubernetes binaries.
    pub fn k8s_bin_dir(&self) -> &Path {
        &self.info.k8s_bin
    }

    /// The cluster CA certificate (PEM file).
    pub fn registry(&self) -> &Registry {
        &self.info.registry
    }

    pub fn ca_cert(&self) -> &Path {
        &self.info.pki.ca_cert
    }

    /// `kubectl` with this cluster's kubeconfig, ready for arguments.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.info.k8s_bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.info.kubeconfig);
        cmd
    }

    /// `helm` with this cluster's kubeconfig and its own cache/config/data folders.
    pub fn helm_command(&self) -> Command {
        let mut cmd = Command::new(self.info.k8s_bin.join("helm"));
        let home = self.info.dir.join("helm");
        cmd.env("KUBECONFIG", &self.info.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run_tool(self.kubectl_command().args(args), "kubectl", args)
    }

    /// Runs helm; its stdout, or an error with its stderr.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        run_tool(self.helm_command().args(args), "helm", args)
    }

    /// Creates a fresh namespace named `<prefix>-<n>` and waits for its `default`
    /// ServiceAccount (pods are rejected until the controller-manager has made it).
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let client = self.client().await?;
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        wait_for_default_service_account(&client, &name).await?;
        Ok(name)
    }

    /// Deletes a namespace (its pods are stopped by the node agent) without waiting.
    pub async fn delete_namespace(&self, name: &str) -> Result<()> {
        let client = self.client().await?;
        Api::<Namespace>::all(client)
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting namespace {name}"))?;
        Ok(())
    }

    /// Stops everything now: pods, scheduler, controller-manager, API server, etcd; removes the
    /// pod network. Also done on drop.
    pub async fn stop(&self) {
        let running = self.running.clone();
        let info = self.info.clone();
        if let Some(rt) = &self.runtime {
            let _ = rt
                .spawn(async move { stop_all(&running, &info).await })
                .await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let running = self.running.clone();
            let info = self.info.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            rt.spawn(async move {
                stop_all(&running, &info).await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(Duration::from_secs(60));
            rt.shutdown_background();
        }
        if let Some(mut slot) = self.slot.take() {
            slot.release_watchdog();
        }
    }
}

/// What the harness needs from the machine, with a message that says so.
fn preflight() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the effective user.
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
        != 0
    {
        bail!("e2e clusters need root (network namespaces, veth pairs, bind mounts)");
    }
    for tool in ["ip", "nsenter", "unshare", "mount", "flock"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("e2e clusters need `{tool}` on PATH (iproute2, util-linux)");
        }
    }
    Ok(())
}

fn run_tool(cmd: &mut Command, tool: &str, args: &[&str]) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A fresh folder for the slot and its bridge.
fn prepare(dir: &Path, slot: &Slot) -> Result<PodNetwork> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    PodNetwork::create(slot).context("creating the pod network bridge")
}

/// A port that is free now on every address (the kernel picks it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?
        .local_addr()?
        .port())
}

async fn start_all(
    config: ClusterConfig,
    dir: PathBuf,
    k8s_bin: PathBuf,
    network: Arc<PodNetwork>,
) -> Result<(Info, Running)> {
    // Free ports are picked before the components bind them, so another cluster starting at the
    // same moment may take one first: then start again with new ports.
    let mut attempt = 1;
    loop {
        let mut running = Running {
            components: Vec::new(),
            agent: None,
        };
        let result = start_components(&config, &dir, &k8s_bin, &network, &mut running).await;
        let e = match result {
            Ok(info) => return Ok((info, running)),
            Err(e) => e,
        };
        let m = tokio::sync::Mutex::new(Some(running));
        stop_running(&m).await;
        let logs = dir.join("logs");
        if attempt < 3 && logs_mention(&logs, "address already in use") {
            eprintln!("[e2e] a port was taken during startup; starting again");
            attempt += 1;
            let _ = std::fs::remove_dir_all(dir.join("etcd"));
            let _ = std::fs::remove_dir_all(&logs);
            std::fs::create_dir_all(&logs)?;
            continue;
        }
        eprintln!("[e2e] cluster start failed: {e:#}");
        print_log_tails(&logs);
        return Err(e);
    }
}

fn logs_mention(logs: &Path, text: &str) -> bool {
    std::fs::read_dir(logs)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(text)))
        })
        .unwrap_or(false)
}

fn print_log_tails(logs: &Path) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        eprintln!(
            "----- {} (last 30 lines) -----\n{}",
            p.display(),
            tail(&p, 30)
        );
    }
}

async fn spawn_component(
    running: &mut Running,
    name: &'static str,
    bin: &Path,
    args: &[String],
    logs: &Path,
) -> Result<()> {
    let log = logs.join(format!("{name}.log"));
    let (out, err) = process::log_file(&log)?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    process::supervise(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    running.components.push(Component { name, child, log });
    Ok(())
}

/// Polls `ready` until it succeeds, failing early if the component exits.
async fn wait_ready<F, Fut>(
    running: &mut Running,
    name: &str,
    timeout: Duration,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = anyhow::anyhow!("not checked yet");
    loop {
        if let Some(c) = running.components.iter_mut().find(|c| c.name == name)
            && let Ok(Some(status)) = c.child.try_wait()
        {
            bail!(
                "{name} exited during startup ({status}); see {}",
                c.log.display()
            );
        }
        match ready().await {
            Ok(()) => return Ok(()),
            Err(e) => last_err = e,
        }
        if Instant::now() > deadline {
            return Err(last_err.context(format!("{name} not ready after {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_components(
    config: &ClusterConfig,
    dir: &Path,
    k8s_bin: &Path,
    network: &Arc<PodNetwork>,
    running: &mut Running,
) -> Result<Info> {
    let logs = dir.join("logs");
    let host_ip = network.host_ip();
    let pki = pki::write(
        &dir.join("pki"),
        &[
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::from(host_ip),
            std::net::IpAddr::from([10, 96, 0, 1]),
        ],
    )?;
    let p = |path: &Path| path.display().to_string();

    // etcd
    let (etcd_port, peer_port) = (free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    spawn_component(
        running,
        "etcd",
        &k8s_bin.join("etcd"),
        &[
            "--name=default".into(),
            format!("--data-dir={}", p(&dir.join("etcd"))),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ],
        &logs,
    )
    .await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let health = format!("{etcd_url}/health");
    wait_ready(running, "etcd", Duration::from_secs(30), || {
        let (http, health) = (http.clone(), health.clone());
        async move {
            let body = http.get(&health).send().await?.text().await?;
            if body.contains("\"true\"") {
                Ok(())
            } else {
                bail!("etcd health: {body}")
            }
        }
    })
    .await?;

    // kube-apiserver: on every address, so pods reach it at the bridge address.
    let api_port = free_port()?;
    spawn_component(
        running,
        "kube-apiserver",
        &k8s_bin.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={api_port}"),
            format!("--advertise-address={host_ip}"),
            format!("--tls-cert-file={}", p(&pki.server_cert)),
            format!("--tls-private-key-file={}", p(&pki.server_key)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            format!("--service-account-key-file={}", p(&pki.service_account_pub)),
            format!(
                "--service-account-signing-key-file={}",
                p(&pki.service_account_key)
            ),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=10.96.0.0/12".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", p(&dir.join("pki"))),
        ],
        &logs,
    )
    .await?;

    let kubeconfig = dir.join("kubeconfig");
    let api_url = format!("https://127.0.0.1:{api_port}");
    let kubeconfig_text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: moe-e2e
  cluster:
    server: {api_url}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: moe-e2e
  context:
    cluster: moe-e2e
    user: admin
    namespace: default
current-context: moe-e2e
",
        ca = p(&pki.ca_cert),
        cert = p(&pki.admin_cert),
        key = p(&pki.admin_key),
    );
    crate::net::write_atomic(&kubeconfig, kubeconfig_text.as_bytes())?;
    let client = client_for(&kubeconfig).await?;
    wait_ready(running, "kube-apiserver", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            let body = client.request_text(req).await?;
            if body.trim() == "ok" {
                Ok(())
            } else {
                bail!("readyz: {body}")
            }
        }
    })
    .await?;

    // kube-controller-manager and kube-scheduler, with the admin credentials.
    let kc = p(&kubeconfig);
    let kcm_port = free_port()?;
    spawn_component(
        running,
        "kube-controller-manager",
        &k8s_bin.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            format!(
                "--service-account-private-key-file={}",
                p(&pki.service_account_key)
            ),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-cert-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-key-file={}", p(&pki.ca_key)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            "--profiling=false".into(),
        ],
        &logs,
    )
    .await?;
    let sched_port = free_port()?;
    spawn_component(
        running,
        "kube-scheduler",
        &k8s_bin.join("kube-scheduler"),
        &[
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            "--profiling=false".into(),
        ],
        &logs,
    )
    .await?;
    for (name, port) in [
        ("kube-controller-manager", kcm_port),
        ("kube-scheduler", sched_port),
    ] {
        let health = insecure_client(port)?;
        wait_ready(running, name, Duration::from_secs(60), || {
            let health = health.clone();
            async move {
                let req = http::Request::get("/healthz").body(Vec::new())?;
                let body = health.request_text(req).await?;
                if body.trim() == "ok" {
                    Ok(())
                } else {
                    bail!("healthz: {body}")
                }
            }
        })
        .await?;
    }
    wait_for_default_service_account(&client, "default").await?;

    // The nodes.
    let registry = start_registry(running, dir, k8s_bin, &pki, host_ip).await?;

    let nodes: Vec<String> = (0..config.nodes).map(|i| format!("gpu-node-{i}")).collect();
    let ca_cert_pem = std::fs::read_to_string(&pki.ca_cert)?;
    let agent_log = logs.join("node-agent.log");
    std::fs::write(&agent_log, "")?;
    let agent = NodeAgent::start(
        client.clone(),
        NodeAgentConfig {
            nodes: nodes.clone(),
            gpus_per_node: config.gpus_per_node,
            network: network.clone(),
            api_host: host_ip.to_string(),
            api_port,
            runtime: crate::node::runtime::Runc {
                bin: tokio::task::spawn_blocking(crate::binaries::runc_bin).await??,
                state: dir.join("runc-state"),
                store: dir.join("images"),
                registry_ca: ca_cert_pem.clone().into_bytes(),
                node_credentials: config.node_registry_login.then(|| {
                    moe_oci::registry::Credentials {
                        username: registry.username.clone(),
                        password: registry.password.clone(),
                    }
                }),
                node_registry: registry.host.clone(),
            },
            ca_cert_pem,
            run_dir: dir.to_path_buf(),
        },
    )
    .await
    .context("starting the node agent")?;
    running.agent = Some(agent);

    Ok(Info {
        dir: dir.to_path_buf(),
        kubeconfig,
        k8s_bin: k8s_bin.to_path_buf(),
        api_url,
        api_host: host_ip.to_string(),
        api_port,
        nodes,
        network: network.clone(),
        pki,
        registry,
    })
}

/// Starts the registry with a fresh user and password; waits until it answers `/v2/`.
async fn start_registry(
    running: &mut Running,
    dir: &Path,
    k8s_bin: &Path,
    pki: &PkiFiles,
    host_ip: std::net::Ipv4Addr,
) -> Result<Registry> {
    let home = dir.join("registry");
    std::fs::create_dir_all(home.join("storage"))?;
    let mut secret = [0u8; 16];
    getrandom(&mut secret)?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let password = hex(&secret);
    let username = "moe-e2e".to_string();
    let hash = bcrypt::hash(&password, 5).context("hashing the registry password")?;
    std::fs::write(home.join("htpasswd"), format!("{username}:{hash}\n"))?;
    let port = free_port()?;
    getrandom(&mut secret)?;
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n  \
         delete:\n    enabled: true\nhttp:\n  addr: 0.0.0.0:{port}\n  secret: {secret}\n  tls:\n    \
         certificate: {cert}\n    key: {key}\nauth:\n  htpasswd:\n    realm: moe-e2e\n    path: {htpasswd}\n",
        storage = home.join("storage").display(),
        secret = hex(&secret),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        htpasswd = home.join("htpasswd").display(),
    );
    let config_path = home.join("config.yml");
    std::fs::write(&config_path, config)?;
    spawn_component(
        running,
        "registry",
        &k8s_bin.join("registry"),
        &["serve".into(), config_path.display().to_string()],
        &dir.join("logs"),
    )
    .await?;
    let host = format!("{host_ip}:{port}");
    let client =
        moe_oci::registry::Registry::new(&host, Some(&std::fs::read(&pki.ca_cert)?), None)?;
    wait_ready(running, "registry", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let status = client.ping().await?;
            // Unauthenticated: 401 is the answer of a registry that is up.
            ensure!(status == 401, "registry /v2/: {status}");
            Ok(())
        }
    })
    .await?;
    Ok(Registry {
        host,
        username,
        password,
    })
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}

/// A client for a component's own HTTPS endpoint (self-signed; anonymous /healthz).
fn insecure_client(port: u16) -> Result<kube::Client> {
    let mut config = kube::Config::new(format!("https://127.0.0.1:{port}").parse()?);
    config.accept_invalid_certs = true;
    Ok(kube::Client::try_from(config)?)
}

async fn wait_for_default_service_account(client: &kube::Client, namespace: &str) -> Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if api.get_opt("default").await?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "namespace {namespace} got no default ServiceAccount in 60s (is kube-controller-manager running?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_running(running: &tokio::sync::Mutex<Option<Running>>) {
    let Some(mut r) = running.lock().await.take() else {
        return;
    };
    if let Some(agent) = r.agent.take() {
        agent.stop().await;
    }
    // Reverse start order: scheduler, controller-manager, API server, etcd.
    while let Some(mut c) = r.components.pop() {
        process::stop_group(&mut c.child, Duration::from_secs(5)).await;
    }
}

async fn stop_all(running: &tokio::sync::Mutex<Option<Running>>, info: &Info) {
    stop_running(running).await;
    let net = info.network.clone();
    let _ = tokio::task::spawn_blocking(move || net.teardown()).await;
}
