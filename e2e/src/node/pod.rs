//! One pod on a fake node: its network namespace, service-account credentials and volumes, its
//! containers as local processes (restarts, probes), its status, and its deletion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::join_all;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus, Probe,
    Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::Signal;
use tokio::sync::{Notify, watch};

use super::AgentShared;
use super::env::{self, EnvSources, ObjectData};
use super::probe::{self, Counter, Target, Timing};
use super::runtime::CONTAINER_PATH;
use crate::net::PodNetns;
use crate::process::{self, signal_group};

const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the pod worker is told: the pod's latest version, or `None` when it is gone from the API.
pub(super) type PodUpdates = watch::Receiver<Option<Pod>>;

/// When containers must stop: `None` while running; `Some(grace)` once the pod is deleted
/// (SIGTERM, then SIGKILL after `grace`).
type StopSignal = watch::Receiver<Option<Duration>>;

#[derive(Debug, Clone)]
struct ContainerRecord {
    name: String,
    image: String,
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    started: bool,
    restart_count: i32,
    pid: Option<u32>,
    /// `registry/repository@sha256:...` once pulled (runc), else the image as named.
    image_id: Option<String>,
}

impl ContainerRecord {
    fn new(c: &Container) -> Self {
        ContainerRecord {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: waiting("ContainerCreating", None),
            last_state: None,
            ready: false,
            started: false,
            restart_count: 0,
            pid: None,
            image_id: None,
        }
    }

    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self
                .image_id
                .clone()
                .unwrap_or_else(|| format!("local://{}", self.image)),
            container_id: self.pid.map(|p| format!("process://{p}")),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..Default::default()
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct PodState {
    init: Vec<ContainerRecord>,
    containers: Vec<ContainerRecord>,
    initialized: bool,
    /// Set once no container will run again.
    phase: Option<&'static str>,
    pod_ip: Option<String>,
    start_time: Option<Timestamp>,
}

/// Everything a pod's tasks share.
struct PodRun {
    shared: Arc<AgentShared>,
    client: kube::Client,
    pod: Pod,
    name: String,
    namespace: String,
    netns: Option<PodNetns>,
    pod_ip: String,
    /// Per-pod folder: service-account files, volumes.
    dir: PathBuf,
    /// Folder of this pod's container logs.
    log_dir: PathBuf,
    state: Mutex<PodState>,
    changed: Notify,
    stop: StopSignal,
}

impl PodRun {
    fn update(&self, f: impl FnOnce(&mut PodState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.changed.notify_one();
    }

    fn update_container(&self, init: bool, index: usize, f: impl FnOnce(&mut ContainerRecord)) {
        self.update(|s| {
            let list = if init { &mut s.init } else { &mut s.containers };
            if let Some(r) = list.get_mut(index) {
                f(r);
            }
        });
    }

    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }
}

/// Runs the pod until it is deleted (or gone from the API), then deletes it for good.
pub(super) async fn run(shared: Arc<AgentShared>, client: kube::Client, mut updates: PodUpdates) {
    let Some(pod) = updates.borrow().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        delete_for_good(&shared, &client, &namespace, &name, &uid).await;
        return;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network == Some(true);

    let netns = if host_network {
        None
    } else {
        let net = shared.network.clone();
        match tokio::task::spawn_blocking(move || net.add_pod()).await {
            Ok(Ok(ns)) => Some(ns),
            Ok(Err(e)) => {
                shared.log(&format!("{namespace}/{name}: pod network: {e:#}"));
                delete_for_good(&shared, &client, &namespace, &name, &uid).await;
                return;
            }
            Err(e) => {
                shared.log(&format!("{namespace}/{name}: pod network: {e}"));
                return;
            }
        }
    };
    let pod_ip = netns
        .as_ref()
        .map(|n| n.ip.to_string())
        .unwrap_or_else(|| shared.host_ip.to_string());
    let log_dir = shared.run_dir.join("pods").join(&namespace).join(&name);
    let dir = log_dir.join(&uid);

    let (stop_tx, stop_rx) = watch::channel(None);
    let run = Arc::new(PodRun {
        shared: shared.clone(),
        client: client.clone(),
        name: name.clone(),
        namespace: namespace.clone(),
        netns,
        pod_ip: pod_ip.clone(),
        dir,
        log_dir,
        state: Mutex::new(PodState {
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(ContainerRecord::new)
                .collect(),
            containers: spec.containers.iter().map(ContainerRecord::new).collect(),
            pod_ip: Some(pod_ip),
            start_time: Some(Timestamp::now()),
            ..Default::default()
        }),
        changed: Notify::new(),
        stop: stop_rx,
        pod,
    });

    let writer = tokio::spawn(status_writer(run.clone()));
    let containers = tokio::spawn(run_containers(run.clone()));
    tokio::pin!(containers);

    // Wait for deletion; the containers may finish first (a completed pod).
    let mut containers_done = false;
    let gone = loop {
        tokio::select! {
            r = updates.changed() => {
                let latest = if r.is_err() { None } else { updates.borrow().clone() };
                match latest {
                    None => break true,
                    Some(p) if p.metadata.deletion_timestamp.is_some() => {
                        let grace = p.metadata.deletion_grace_period_seconds
                            .or(spec.termination_grace_period_seconds)
                            .unwrap_or(30)
                            .max(0) as u64;
                        let _ = stop_tx.send(Some(Duration::from_secs(grace)));
                        break false;
                    }
                    Some(_) => {}
                }
            }
            _ = &mut containers, if !containers_done => {
                containers_done = true;
                // No process will run again: give the address back now, as a kubelet
                // tears down a finished pod's sandbox.
                release_network(&run).await;
            }
        }
    };
    if gone {
        let _ = stop_tx.send(Some(Duration::ZERO));
    }
    if !containers_done {
        let _ = (&mut containers).await;
    }
    // One last status write with the terminated containers, then the pod is deleted for good.
    run.changed.notify_one();
    writer.abort();
    if !gone {
        write_status(&run).await.ok();
    }
    release_network(&run).await;
    let _ = tokio::fs::remove_dir_all(&run.dir).await;
    if !gone {
        delete_for_good(&shared, &client, &namespace, &name, &uid).await;
    }
}

async fn release_network(run: &Arc<PodRun>) {
    if let Some(ns) = run.netns.clone() {
        let net = run.shared.network.clone();
        let _ = tokio::task::spawn_blocking(move || net.remove_pod(&ns)).await;
    }
}

/// The kubelet's last word on a pod: delete it with grace period 0 (the API server keeps a
/// gracefully deleted pod until its node confirms the containers are gone).
async fn delete_for_good(
    shared: &AgentShared,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    uid: &str,
) {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    shared.log(&format!("{namespace}/{name} deleted"));
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => shared.log(&format!("deleting pod {namespace}/{name}: {e}")),
    }
}

/// Writes the pod's status whenever it changes (and every few seconds, in case a write failed).
async fn status_writer(run: Arc<PodRun>) {
    let mut last = String::new();
    loop {
        let status = compute_status(&run);
        let text = serde_json::to_string(&status).unwrap_or_default();
        if text != last {
            match write_status(&run).await {
                Ok(()) => last = text,
                Err(e) => run
                    .shared
                    .log(&format!("{}/{} status: {e:#}", run.namespace, run.name)),
            }
        }
        tokio::select! {
            _ = run.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn write_status(run: &PodRun) -> Result<()> {
    let status = compute_status(run);
    let api: Api<Pod> = Api::namespaced(run.client.clone(), &run.namespace);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&run.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("patching pod status")?;
    Ok(())
}

fn condition(kind: &str, ok: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(String::from),
        last_transition_time: None,
        ..Default::default()
    }
}

fn compute_status(run: &PodRun) -> PodStatus {
    let Ok(s) = run.state.lock() else {
        return PodStatus::default();
    };
    let all_ready = s.initialized && s.containers.iter().all(|c| c.ready);
    let any_ran = s.containers.iter().any(|c| {
        c.state.running.is_some() || c.state.terminated.is_some() || c.last_state.is_some()
    });
    let phase = s
        .phase
        .unwrap_or(if any_ran { "Running" } else { "Pending" });
    let not_ready_reason = (!all_ready).then_some(if phase == "Succeeded" {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    });
    let host_ip = run.shared.host_ip.to_string();
    PodStatus {
        phase: Some(phase.into()),
        host_ip: Some(host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: host_ip }]),
        pod_ip: s.pod_ip.clone(),
        pod_ips: s.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: s.start_time.map(Time),
        conditions: Some(vec![
            condition("PodReadyToStartContainers", true, None),
            condition("Initialized", s.initialized, None),
            condition("Ready", all_ready, not_ready_reason),
            condition("ContainersReady", all_ready, not_ready_reason),
            condition("PodScheduled", true, None),
        ]),
        init_container_statuses: (!s.init.is_empty())
            .then(|| s.init.iter().map(ContainerRecord::status).collect()),
        container_statuses: Some(s.containers.iter().map(ContainerRecord::status).collect()),
        ..Default::default()
    }
}

/// Prepares credentials and volumes, runs the init containers in order, then the containers
/// side by side, until none will run again; sets the final phase.
async fn run_containers(run: Arc<PodRun>) {
    let spec = run.pod.spec.clone().unwrap_or_default();
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());

    let mounts = loop {
        match prepare_volumes(&run).await {
            Ok(m) => break m,
            Err(e) => {
                let msg = format!("{e:#}");
                run.update(|s| {
                    for c in s.init.iter_mut().chain(s.containers.iter_mut()) {
                        c.state = waiting("ContainerCreating", Some(msg.clone()));
                    }
                });
                if wait_or_stop(&run, Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    };

    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        // Init containers must succeed; with restartPolicy Never one failure fails the pod.
        let init_policy = if policy == "Never" {
            "Never"
        } else {
            "OnFailure"
        };
        let code = run_container(&run, true, i, c, init_policy, &mounts).await;
        if code != Some(0) {
            if !run.stopping() {
                run.update(|s| s.phase = Some("Failed"));
            }
            return;
        }
    }
    run.update(|s| s.initialized = true);

    let tasks = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| run_container(&run, false, i, c, &policy, &mounts));
    let codes = join_all(tasks).await;
    let phase = if codes.iter().all(|c| *c == Some(0)) {
        "Succeeded"
    } else {
        "Failed"
    };
    run.update(|s| s.phase = Some(phase));
}

/// Sleeps `d` unless the pod is stopped first; true when stopped.
async fn wait_or_stop(run: &PodRun, d: Duration) -> bool {
    let mut stop = run.stop.clone();
    if stop.borrow().is_some() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => stop.borrow().is_some(),
        _ = stop.changed() => true,
    }
}

/// A bind mount into the container's mount namespace.
#[derive(Debug, Clone)]
struct Mount {
    source: PathBuf,
    target: String,
    /// Limit to the containers named (volumeMounts are per container); empty = all.
    container: Option<String>,
    read_only: bool,
}

/// Writes the service-account files and the volumes' contents; returns the bind mounts.
async fn prepare_volumes(run: &PodRun) -> Result<Vec<Mount>> {
    let spec = run.pod.spec.clone().unwrap_or_default();
    tokio::fs::create_dir_all(&run.dir).await?;
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    let (secrets, config_maps) = fetch_objects(run).await?;
    for v in spec.volumes.iter().flatten() {
        let dir = run.dir.join("volumes").join(&v.name);
        if let Some(h) = &v.host_path {
            volumes.insert(v.name.clone(), PathBuf::from(&h.path));
        } else if v.empty_dir.is_some() {
            tokio::fs::create_dir_all(&dir).await?;
            volumes.insert(v.name.clone(), dir);
        } else if let Some(cm) = &v.config_map {
            let data = config_maps.get(&cm.name).cloned().unwrap_or_default();
            write_items(&dir, &data, cm.items.as_deref()).await?;
            volumes.insert(v.name.clone(), dir);
        } else if let Some(sec) = &v.secret {
            let name = sec.secret_name.clone().unwrap_or_default();
            let data = secrets.get(&name).cloned().unwrap_or_default();
            write_items(&dir, &data, sec.items.as_deref()).await?;
            volumes.insert(v.name.clone(), dir);
        }
    }
    let mut mounts = Vec::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in all {
        for m in c.volume_mounts.iter().flatten() {
            let Some(src) = volumes.get(&m.name) else {
                continue;
            };
            let source = match &m.sub_path {
                Some(sub) if !sub.is_empty() => src.join(sub),
                _ => src.clone(),
            };
            mounts.push(Mount {
                source,
                target: m.mount_path.clone(),
                container: Some(c.name.clone()),
                read_only: m.read_only.unwrap_or(false),
            });
        }
    }
    // Each container's termination message file, as the kubelet mounts it.
    let term_dir = run.dir.join("termination");
    tokio::fs::create_dir_all(&term_dir).await?;
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        let file = term_dir.join(&c.name);
        tokio::fs::write(&file, b"").await?;
        // Written by the container's own user.
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        mounts.push(Mount {
            source: file,
            target: c
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
            container: Some(c.name.clone()),
            read_only: false,
        });
    }
    if spec.automount_service_account_token != Some(false) {
        let sa_dir = run.dir.join("serviceaccount");
        write_service_account(run, &sa_dir).await?;
        mounts.insert(
            0,
            Mount {
                source: sa_dir,
                target: SA_MOUNT.into(),
                container: None,
                read_only: true,
            },
        );
    }
    Ok(mounts)
}

async fn write_items(
    dir: &Path,
    data: &BTreeMap<String, String>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let pairs: Vec<(String, String)> = match items {
        Some(items) => items
            .iter()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, path) in pairs {
        let Some(value) = data.get(&key) else {
            continue;
        };
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(&file, value).await?;
    }
    Ok(())
}

/// A token for the pod's ServiceAccount, bound to the pod (as the kubelet requests it), the
/// cluster CA and the namespace.
async fn write_service_account(run: &PodRun, dir: &Path) -> Result<()> {
    let spec = run.pod.spec.as_ref();
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(run.client.clone(), &run.namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            attestations: None,
            // A day: longer than any test; there is no refresh.
            expiration_seconds: Some(86_400),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: run.pod.metadata.name.clone(),
                uid: run.pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let token = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for serviceaccount {}/{sa}", run.namespace))?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::write(dir.join("token"), token).await?;
    tokio::fs::write(dir.join("ca.crt"), &run.shared.ca_cert_pem).await?;
    tokio::fs::write(dir.join("namespace"), &run.namespace).await?;
    Ok(())
}

/// The Secrets and ConfigMaps the pod refers to (missing ones are left out; the env and volume
/// code decides whether that is an error).
async fn fetch_objects(run: &PodRun) -> Result<(ObjectData, ObjectData)> {
    let (secret_names, cm_names) = env::referenced_objects(&run.pod);
    let mut secrets = ObjectData::new();
    let secret_api: Api<Secret> = Api::namespaced(run.client.clone(), &run.namespace);
    for n in secret_names {
        if let Some(s) = secret_api.get_opt(&n).await? {
            let mut data: BTreeMap<String, String> = s.string_data.unwrap_or_default();
            for (k, v) in s.data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            secrets.insert(n, data);
        }
    }
    let mut config_maps = ObjectData::new();
    let cm_api: Api<ConfigMap> = Api::namespaced(run.client.clone(), &run.namespace);
    for n in cm_names {
        if let Some(cm) = cm_api.get_opt(&n).await? {
            let mut data = cm.data.unwrap_or_default();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            config_maps.insert(n, data);
        }
    }
    Ok((secrets, config_maps))
}

/// Why a container process ended.
enum Ended {
    Exited(ExitStatus),
    /// Killed by us: a failed liveness or startup probe.
    ProbeFailed(String),
    /// Killed by us: the pod is being deleted.
    Stopped(Option<ExitStatus>),
}

/// Runs one container, restarting it per `policy`, until it will not run again; returns its
/// last exit code (None when it never ran or was stopped).
async fn run_container(
    run: &Arc<PodRun>,
    init: bool,
    index: usize,
    c: &Container,
    policy: &str,
    mounts: &[Mount],
) -> Option<i32> {
    let mut backoff = Duration::from_millis(500);
    let mut runs = 0;
    let mut pull_failures = 0u32;
    loop {
        if run.stopping() {
            return None;
        }
        let started = match start_process(run, c, mounts, runs).await {
            Ok(s) => {
                pull_failures = 0;
                s
            }
            Err((reason, msg)) => {
                // As a kubelet does: the first failure is ErrImagePull, then it backs off.
                let reason = if reason == "ErrImagePull" {
                    pull_failures += 1;
                    if pull_failures > 1 {
                        "ImagePullBackOff"
                    } else {
                        reason
                    }
                } else {
                    reason
                };
                run.shared.log(&format!(
                    "{}/{} container {}: {reason}: {msg}",
                    run.namespace, run.name, c.name
                ));
                run.update_container(init, index, |r| r.state = waiting(reason, Some(msg)));
                if wait_or_stop(run, Duration::from_secs(2)).await {
                    return None;
                }
                continue;
            }
        };
        let Started {
            mut child,
            env,
            pid,
            runc,
            image_id,
        } = started;
        let start = Timestamp::now();
        run.shared.log(&format!(
            "{}/{} container {} started, pid {pid}",
            run.namespace, run.name, c.name
        ));
        let has_startup = c.startup_probe.is_some();
        let has_readiness = c.readiness_probe.is_some();
        run.update_container(init, index, |r| {
            r.state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(start)),
                }),
                ..Default::default()
            };
            r.pid = Some(pid);
            r.image_id = image_id.clone();
            r.started = !has_startup;
            r.ready = !init && !has_startup && !has_readiness;
        });
        let target = Target {
            pod_ip: run
                .netns
                .as_ref()
                .map(|n| n.ip)
                .unwrap_or(run.shared.host_ip),
            pid,
            env,
        };
        let probes = probe_container(run.clone(), init, index, c.clone(), target);
        let mut stop = run.stop.clone();
        let ended = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => Ended::Exited(s),
                Err(_) => Ended::Stopped(None),
            },
            why = probes => {
                let grace = run.pod.spec.as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30).clamp(0, 30) as u64;
                process::stop_group(&mut child, Duration::from_secs(grace)).await;
                Ended::ProbeFailed(why)
            }
            grace = wait_stop(&mut stop) => {
                process::stop_group(&mut child, grace).await;
                Ended::Stopped(child.try_wait().ok().flatten())
            }
        };
        // Whatever is left of its process group goes with it.
        signal_group(pid, Signal::SIGKILL);
        if let Some(id) = child.id() {
            signal_group(id, Signal::SIGKILL);
        }
        let (code, signal, mut reason, message) = match &ended {
            Ended::Exited(s) | Ended::Stopped(Some(s)) => exit_info(s),
            Ended::Stopped(None) => (137, Some(9), "Error".into(), None),
            Ended::ProbeFailed(why) => (137, Some(9), "Error".into(), Some(why.clone())),
        };
        let message = message.or_else(|| termination_message(run, c, code));
        if let Some(rc) = &runc {
            let rt = &run.shared.runtime;
            let _ = child.wait().await;
            if rt.finish(rc).await {
                reason = "OOMKilled".into();
            }
        }
        run.shared.log(&format!(
            "{}/{} container {} (pid {pid}) ended: exit code {code}{}",
            run.namespace,
            run.name,
            c.name,
            message
                .as_deref()
                .map(|m| format!(", {m}"))
                .unwrap_or_default()
        ));
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                signal,
                reason: Some(reason),
                message,
                started_at: Some(Time(start)),
                finished_at: Some(Time(Timestamp::now())),
                container_id: Some(format!("process://{pid}")),
            }),
            ..Default::default()
        };
        run.update_container(init, index, |r| {
            r.state = terminated.clone();
            r.ready = false;
            r.pid = None;
        });
        if matches!(ended, Ended::Stopped(_)) || run.stopping() {
            return Some(code);
        }
        let restart = match policy {
            "Always" => true,
            "OnFailure" => code != 0,
            _ => false,
        };
        if !restart {
            return Some(code);
        }
        run.update_container(init, index, |r| {
            r.last_state = Some(terminated.clone());
            r.state = waiting(
                "CrashLoopBackOff",
                Some(format!("back-off {backoff:?} restarting failed container")),
            );
        });
        if wait_or_stop(run, backoff).await {
            return Some(code);
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        runs += 1;
        run.update_container(init, index, |r| r.restart_count += 1);
    }
}

/// What the kubelet reports as a terminated container's message: its termination message
/// file (at most 4096 bytes), or with `FallbackToLogsOnError` and a failure, its log's tail.
fn termination_message(run: &PodRun, c: &Container, code: i32) -> Option<String> {
    const MAX: usize = 4096;
    let clip = |text: &str| -> Option<String> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let mut start = text.len().saturating_sub(MAX);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        Some(text[start..].to_string())
    };
    let file = run.dir.join("termination").join(&c.name);
    if let Some(m) = std::fs::read_to_string(file).ok().as_deref().and_then(clip) {
        return Some(m);
    }
    if code != 0 && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError") {
        let log = std::fs::read_to_string(run.log_dir.join(format!("{}.log", c.name))).ok()?;
        let lines: Vec<&str> = log.lines().collect();
        return clip(&lines[lines.len().saturating_sub(80)..].join("\n"));
    }
    None
}

async fn wait_stop(stop: &mut StopSignal) -> Duration {
    loop {
        if let Some(grace) = *stop.borrow() {
            return grace;
        }
        if stop.changed().await.is_err() {
            return Duration::ZERO;
        }
    }
}

fn exit_info(s: &ExitStatus) -> (i32, Option<i32>, String, Option<String>) {
    use std::os::unix::process::ExitStatusExt as _;
    match (s.code(), s.signal()) {
        (Some(0), _) => (0, None, "Completed".into(), None),
        (Some(code), _) => (code, None, "Error".into(), None),
        (None, Some(sig)) => (128 + sig, Some(sig), "Error".into(), None),
        (None, None) => (255, None, "Error".into(), None),
    }
}

/// A started container.
struct Started {
    /// The process the agent waits for (the container's, or runc's).
    child: tokio::process::Child,
    env: Vec<(String, String)>,
    /// The container's first process (host pid).
    pid: u32,
    runc: Option<super::runtime::RuncContainer>,
    image_id: Option<String>,
}

/// Starts the container's process in the pod's namespaces; returns it and its environment.
/// The error is a waiting reason and message.
async fn start_process(
    run: &PodRun,
    c: &Container,
    mounts: &[Mount],
    restarts: u32,
) -> Result<Started, (&'static str, String)> {
    let (secrets, config_maps) = fetch_objects(run)
        .await
        .map_err(|e| ("CreateContainerConfigError", format!("{e:#}")))?;
    let shared = &run.shared;
    let base = vec![
        ("PATH".to_string(), CONTAINER_PATH.to_string()),
        ("HOSTNAME".to_string(), run.name.clone()),
        ("HOME".to_string(), "/root".to_string()),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            shared.api_host.clone(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_string(),
            shared.api_port.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
            shared.api_port.to_string(),
        ),
        (
            "KUBERNETES_PORT".to_string(),
            format!("tcp://{}:{}", shared.api_host, shared.api_port),
        ),
    ];
    let src = EnvSources {
        pod: &run.pod,
        pod_ip: run.pod_ip.clone(),
        host_ip: shared.host_ip.to_string(),
        secrets: &secrets,
        config_maps: &config_maps,
        base,
    };
    let env = env::container_env(&src, c).map_err(|e| ("CreateContainerConfigError", e))?;
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|a| env::expand(a, &env))
        .collect();
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| env::expand(a, &env))
        .collect();
    let image = c.image.clone().unwrap_or_default();
    start_runc(
        run,
        &shared.runtime,
        c,
        mounts,
        restarts,
        env.vars(),
        &command,
        &args,
        &image,
    )
    .await
}

/// The Docker configs of the pod's `imagePullSecrets` (`kubernetes.io/dockerconfigjson`).
async fn pull_configs(run: &PodRun) -> Vec<Vec<u8>> {
    let api: Api<Secret> = Api::namespaced(run.client.clone(), &run.namespace);
    let mut out = Vec::new();
    let names = run
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default();
    for r in names {
        if let Ok(Some(s)) = api.get_opt(&r.name).await
            && let Some(d) = s.data.as_ref().and_then(|d| d.get(".dockerconfigjson"))
        {
            out.push(d.0.clone());
        }
    }
    out
}

/// Pulls the image and starts the container under runc, from a bundle made from the spec.
#[allow(clippy::too_many_arguments)]
async fn start_runc(
    run: &PodRun,
    rt: &super::runtime::Runc,
    c: &Container,
    mounts: &[Mount],
    restarts: u32,
    env: &[(String, String)],
    command: &[String],
    args: &[String],
    image: &str,
) -> Result<Started, (&'static str, String)> {
    use super::runtime::{Bind, BundleInput, RuncContainer, bundle_config, mount_overlay};
    let policy = c.image_pull_policy.as_deref().unwrap_or("");
    let configs = pull_configs(run).await;
    let pulled = rt
        .pull(image, policy, &configs)
        .await
        .map_err(|e| (e.reason, e.message))?;
    let uid = run.pod.metadata.uid.as_deref().unwrap_or("pod");
    let id = format!("{}-{}-{restarts}", &uid[..uid.len().min(13)], c.name);
    let dir = run.dir.join("runc").join(format!("{}-{restarts}", c.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| ("RunContainerError", e.to_string()))?;
    let read_only = c
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        == Some(true);
    let (root, overlay) = if read_only {
        (pulled.rootfs.clone(), None)
    } else {
        let merged = mount_overlay(&pulled.rootfs, &dir).map_err(|e| ("RunContainerError", e))?;
        (merged.clone(), Some(merged))
    };
    let binds: Vec<Bind> = mounts
        .iter()
        .filter(|m| m.container.as_ref().is_none_or(|n| *n == c.name))
        .map(|m| Bind {
            source: m.source.clone(),
            target: m.target.clone(),
            read_only: m.read_only,
        })
        .collect();
    let cgroup = format!("/moe-e2e/{id}");
    let spec = run.pod.spec.clone().unwrap_or_default();
    let cfg = bundle_config(&BundleInput {
        pod: &spec,
        container: c,
        image: &pulled,
        command,
        args,
        env,
        hostname: &run.name,
        root: &root,
        read_only_root: read_only,
        netns: run
            .netns
            .as_ref()
            .map(|n| PathBuf::from("/var/run/netns").join(&n.name)),
        binds: &binds,
        cgroup: &cgroup,
    });
    let rc = RuncContainer {
        id: id.clone(),
        dir: dir.clone(),
        overlay,
        cgroup,
    };
    let cfg = match cfg {
        Ok(cfg) => cfg,
        Err(e) => {
            rt.finish(&rc).await;
            return Err(("CreateContainerConfigError", e));
        }
    };
    std::fs::write(dir.join("config.json"), cfg.to_string())
        .map_err(|e| ("RunContainerError", e.to_string()))?;
    tokio::fs::create_dir_all(&run.log_dir)
        .await
        .map_err(|e| ("RunContainerError", e.to_string()))?;
    let log = run.log_dir.join(format!("{}.log", c.name));
    append(
        &log,
        &format!(
            "=== {} start {} (restart {restarts}, pod uid {uid}): runc {id}, image {}\n",
            Timestamp::now(),
            c.name,
            pulled.image_id
        ),
    );
    let (out, err) =
        process::log_file(&log).map_err(|e| ("RunContainerError", format!("{e:#}")))?;
    let mut cmd = rt.command();
    cmd.args(["run", "--keep", "--bundle"])
        .arg(&dir)
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    process::supervise(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            rt.finish(&rc).await;
            return Err(("RunContainerError", format!("runc: {e}")));
        }
    };
    // The container's first process, as soon as runc has made it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut pid = child.id().unwrap_or_default();
    while std::time::Instant::now() < deadline {
        if let Some(p) = rt.init_pid(&id).await {
            pid = p;
            break;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Started {
        child,
        env: env.to_vec(),
        pid,
        runc: Some(rc),
        image_id: Some(pulled.image_id),
    })
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(text.as_bytes());
    }
}

/// Runs the container's probes for as long as it runs: the startup probe first, then
/// readiness (which sets `ready`) and liveness side by side. Returns only when a startup or
/// liveness probe fails for good (the container must be killed).
async fn probe_container(
    run: Arc<PodRun>,
    init: bool,
    index: usize,
    c: Container,
    target: Target,
) -> String {
    if let Some(p) = &c.startup_probe {
        if let Err(why) = probe_until(&p.clone(), &c, &target, true).await {
            return format!("startup probe failed: {why}");
        }
        run.update_container(init, index, |r| {
            r.started = true;
            r.ready = !init && c.readiness_probe.is_none();
        });
    }
    let readiness = async {
        let Some(p) = &c.readiness_probe else {
            return std::future::pending::<()>().await;
        };
        let t = Timing::of(p);
        tokio::time::sleep(t.initial_delay).await;
        let mut counter = Counter::default();
        loop {
            let ok = probe::run(p, &c, &target, t.timeout).await.is_ok();
            if let Some(ready) = counter.record(ok, &t) {
                run.update_container(init, index, |r| {
                    if r.ready != ready {
                        r.ready = ready;
                    }
                });
            }
            tokio::time::sleep(t.period).await;
        }
    };
    let liveness = async {
        match &c.liveness_probe {
            Some(p) => probe_until(p, &c, &target, false).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = readiness => String::new(),
        r = liveness => match r {
            Err(why) => format!("liveness probe failed: {why}"),
            Ok(()) => String::new(),
        },
    }
}

/// Probes until the verdict: `until_success` returns Ok on success (startup probe); otherwise
/// it returns only on failure (liveness).
async fn probe_until(
    p: &Probe,
    c: &Container,
    target: &Target,
    until_success: bool,
) -> Result<(), String> {
    let t = Timing::of(p);
    tokio::time::sleep(t.initial_delay).await;
    let mut counter = Counter::default();
    loop {
        let result = probe::run(p, c, target, t.timeout).await;
        let why = result.as_ref().err().cloned().unwrap_or_default();
        match counter.record(result.is_ok(), &t) {
            Some(true) if until_success => return Ok(()),
            Some(false) => return Err(why),
            _ => {}
        }
        tokio::time::sleep(t.period).await;
    }
}
