//! The node agent: fake A100 nodes whose pods run as local processes.
//!
//! It registers nodes labelled `nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB` with
//! `nvidia.com/gpu` capacity, keeps their leases and Ready condition fresh, and does a kubelet's
//! job for every pod bound to them (see [`pod`]): a network namespace with its own address,
//! service-account credentials, volumes, each container's command run as a process (the image
//! or `command[0]` names a locally built binary, see [`image`]), probes, restarts, status, and
//! deletion with SIGTERM then SIGKILL after the grace period.
//!
//! Not done (test infrastructure, not a kubelet): `runAsUser`, `readOnlyRootFilesystem` and
//! resource limits are ignored (processes run as root, unconfined); no image pulls, no
//! `kubectl logs`/`exec` (logs are files under the cluster folder), no preStop hooks, no service
//! links env vars, no projected/downwardAPI volumes; tokens are not refreshed (they last a day).

pub mod env;
mod pod;
pub mod probe;
pub mod runtime;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::net::PodNetwork;

/// The GPU product label every fake node carries.
pub const GPU_PRODUCT: &str = "NVIDIA-A100-SXM4-80GB";

/// What the agent needs to know.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// Node names (`gpu-node-0`, ...).
    pub nodes: Vec<String>,
    pub gpus_per_node: u32,
    pub network: Arc<PodNetwork>,
    /// The API server as pods reach it (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_host: String,
    pub api_port: u16,
    /// The cluster CA, written into each pod's service-account folder.
    pub ca_cert_pem: String,
    /// Pod files live under `<run_dir>/pods/<namespace>/<pod>/`: `<container>.log`, and per pod
    /// uid the service-account folder and volumes.
    pub run_dir: PathBuf,
    /// Runs containers from their images.
    pub runtime: runtime::Runc,
}

/// What every pod task shares.
#[derive(Debug)]
struct AgentShared {
    network: Arc<PodNetwork>,
    host_ip: Ipv4Addr,
    api_host: String,
    api_port: u16,
    ca_cert_pem: String,
    run_dir: PathBuf,
    runtime: runtime::Runc,
    /// `<run_dir>/logs/node-agent.log`.
    log: std::sync::Mutex<Option<std::fs::File>>,
}

impl AgentShared {
    fn log(&self, msg: &str) {
        use std::io::Write as _;
        if let Ok(mut f) = self.log.lock()
            && let Some(f) = f.as_mut()
        {
            let _ = writeln!(f, "{} {msg}", Timestamp::now());
        }
    }
}

/// A running agent; [`NodeAgent::stop`] kills every pod process.
#[derive(Debug)]
pub struct NodeAgent {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NodeAgent {
    /// Registers the nodes (Ready, with leases) and starts serving their pods. Must be called on
    /// the runtime whose threads live as long as the pods (see `process`).
    pub async fn start(client: kube::Client, config: NodeAgentConfig) -> Result<NodeAgent> {
        let host_ip = config.network.host_ip();
        for name in &config.nodes {
            register_node(&client, name, &config, host_ip).await?;
        }
        let shared = Arc::new(AgentShared {
            network: config.network.clone(),
            host_ip,
            api_host: config.api_host.clone(),
            api_port: config.api_port,
            ca_cert_pem: config.ca_cert_pem.clone(),
            run_dir: config.run_dir.clone(),
            runtime: config.runtime.clone(),
            log: std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(config.run_dir.join("logs").join("node-agent.log"))
                    .ok(),
            ),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(client, config, shared, stop_rx));
        Ok(NodeAgent { stop, task })
    }

    /// Kills every pod's processes (no grace), removes their namespaces, and stops.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The host process id of a running container, from its status (`containerID` is
/// `process://<pid>`).
pub fn container_pid(status: &k8s_openapi::api::core::v1::ContainerStatus) -> Option<u32> {
    status
        .container_id
        .as_deref()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_string())
}

fn node_status(config: &NodeAgentConfig, name: &str, host_ip: Ipv4Addr) -> NodeStatus {
    let now = Time(Timestamp::now());
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", "64".to_string()),
        ("memory", "512Gi".to_string()),
        ("pods", "110".to_string()),
        ("ephemeral-storage", "1Ti".to_string()),
        ("nvidia.com/gpu", config.gpus_per_node.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), quantity(&v)))
    .collect();
    let cond = |kind: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "ok",
            ),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "moe-serve e2e node agent is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: name.into(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint { port: 10250 }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            operating_system: "linux".into(),
            os_image: "moe-serve e2e".into(),
            kernel_version: "local".into(),
            container_runtime_version: "process://moe-e2e".into(),
            kubelet_version: crate::K8S_VERSION.into(),
            kube_proxy_version: String::new(),
            machine_id: name.into(),
            system_uuid: name.into(),
            boot_id: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn register_node(
    client: &kube::Client,
    name: &str,
    config: &NodeAgentConfig,
    host_ip: Ipv4Addr,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<String, String> = [
        ("nvidia.com/gpu.product", GPU_PRODUCT),
        ("nvidia.com/gpu.present", "true"),
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("registering node {name}")),
    }
    let patch = serde_json::json!({ "status": node_status(config, name, host_ip) });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("node {name} status"))?;
    renew_lease(client, name).await
}

/// The node heartbeat the node lifecycle controller watches (as a kubelet renews it).
async fn renew_lease(client: &kube::Client, name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = MicroTime(Timestamp::now());
    let patch = serde_json::json!({ "spec": { "renewTime": now, "holderIdentity": name } });
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => return Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).with_context(|| format!("lease of node {name}")),
    }
    let node: Node = Api::<Node>::all(client.clone()).get(name).await?;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.into(),
                uid: node.metadata.uid.unwrap_or_default(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("lease of node {name}")),
    }
}

async fn heartbeat(client: &kube::Client, config: &NodeAgentConfig, shared: &AgentShared) {
    let host_ip = shared.host_ip;
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &config.nodes {
        if let Err(e) = renew_lease(client, name).await {
            shared.log(&format!("{e:#}"));
        }
        let patch = serde_json::json!({ "status": node_status(config, name, host_ip) });
        if let Err(e) = nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            shared.log(&format!("node {name} status: {e}"));
        }
    }
}

struct PodWorker {
    updates: watch::Sender<Option<Pod>>,
    task: JoinHandle<()>,
}

/// The agent's loop: heartbeats, and one worker task per pod bound to our nodes.
async fn serve(
    client: kube::Client,
    config: NodeAgentConfig,
    shared: Arc<AgentShared>,
    mut stop: watch::Receiver<bool>,
) {
    let ours: HashSet<String> = config.nodes.iter().cloned().collect();
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    let mut workers: HashMap<String, PodWorker> = HashMap::new();
    // Pods whose worker has deleted them: a late event for them must not start them again.
    let mut finished: HashSet<String> = HashSet::new();
    let mut listed: HashSet<String> = HashSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticker.tick() => heartbeat(&client, &config, &shared).await,
            ev = events.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let Some(uid) = pod.metadata.uid.clone() {
                            listed.insert(uid);
                        }
                        apply(&client, &shared, &ours, &mut workers, &finished, pod);
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down.
                        for (uid, w) in &workers {
                            if !listed.contains(uid) {
                                let _ = w.updates.send(None);
                            }
                        }
                    }
                    Ok(watcher::Event::Apply(pod)) => apply(&client, &shared, &ours, &mut workers, &finished, pod),
                    Ok(watcher::Event::Delete(pod)) => {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        if let Some(w) = workers.get(&uid) {
                            let _ = w.updates.send(None);
                        }
                        finished.remove(&uid);
                    }
                    Err(e) => {
                        shared.log(&format!("pod watch: {e}"));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
        workers.retain(|uid, w| {
            let done = w.task.is_finished();
            if done {
                finished.insert(uid.clone());
            }
            !done
        });
    }
    // Shutdown: every pod's processes are killed at once.
    for w in workers.values() {
        let _ = w.updates.send(None);
    }
    for (_, w) in workers.drain() {
        let _ = w.task.await;
    }
}

fn apply(
    client: &kube::Client,
    shared: &Arc<AgentShared>,
    ours: &HashSet<String>,
    workers: &mut HashMap<String, PodWorker>,
    finished: &HashSet<String>,
    pod: Pod,
) {
    let on_our_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some_and(|n| ours.contains(n));
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if !on_our_node || finished.contains(&uid) {
        return;
    }
    if let Some(w) = workers.get(&uid) {
        let _ = w.updates.send(Some(pod));
        return;
    }
    let (tx, rx) = watch::channel(Some(pod));
    let task = tokio::spawn(pod::run(shared.clone(), client.clone(), rx));
    workers.insert(uid, PodWorker { updates: tx, task });
}
