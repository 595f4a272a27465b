//! moe-serve on the cluster: installing the operator with its Helm chart, applying
//! MoEDeployments, waiting on their status, finding the gateway and talking to it, and
//! listing what the operator created. Shared by the scenario tests and the benchmark.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use moe_operator::crd::MoEDeployment;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::Cluster;
use crate::wait::until;

/// The label every object the operator creates for a MoEDeployment carries.
pub const LABEL_DEPLOYMENT: &str = moe_operator::resources::LABEL_DEPLOYMENT;
/// The operator's name in every test namespace (`fullnameOverride`).
pub const OPERATOR: &str = "moe-operator";

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/moe-operator")
}

pub fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

static CRDS: OnceCell<()> = OnceCell::const_new();

/// Applies the chart's CRD once per cluster (server-side, so parallel tests do not race on
/// creating it) and waits until it is established. `helm install` then finds it present.
pub async fn crds(cluster: &Cluster) -> Result<()> {
    CRDS.get_or_try_init(|| async {
        let crds = chart_dir().join("crds");
        cluster.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=e2e",
            "-f",
            &crds.to_string_lossy(),
        ])?;
        established(cluster, "moedeployments.serving.moe.dev").await?;
        Ok::<(), anyhow::Error>(())
    })
    .await?;
    Ok(())
}

/// Waits until the CRD `name` is established (`kubectl wait` fails outright while the new
/// object has no status yet, so it is retried).
pub async fn established(cluster: &Cluster, name: &str) -> Result<()> {
    let crd = format!("crd/{name}");
    until(
        &format!("CRD {name} to be established"),
        Duration::from_secs(60),
        || async {
            cluster.kubectl(&["wait", "--for=condition=Established", "--timeout=10s", &crd])?;
            Ok(Some(()))
        },
    )
    .await
}

/// Builds the binaries the chart's images map to (no-op when current).
pub fn binaries() -> Result<()> {
    crate::workspace_binary("moe-operator")?;
    crate::workspace_binary("moe-worker")?;
    Ok(())
}

/// The images the scenarios install, pushed to their cluster's registry.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// `host/moe` (the chart's `imageRegistry`).
    pub registry: String,
    pub operator_digest: String,
    pub worker_digest: String,
}

static PUSHED: std::sync::OnceLock<Pushed> = std::sync::OnceLock::new();

/// The cluster of the MoE scenarios, one per test binary: pods run from the images (built
/// from this test build's binaries with `cargo xtask images`, pushed to the cluster's registry)
/// under runc, and [`install_operator`] installs the chart pointing at them by digest.
pub async fn cluster() -> &'static Cluster {
    static C: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
    let c = C
        .get_or_init(|| async {
            let start = async {
                // Worker pods pull with the chart's imagePullSecrets, not a node login.
                let cluster = Cluster::start_with(crate::ClusterConfig {
                    node_registry_login: false,
                    ..crate::ClusterConfig::default()
                })
                .await?;
                let (reg, ca) = (cluster.registry().clone(), cluster.ca_cert().to_path_buf());
                let out = cluster.dir().join("images");
                let built = tokio::task::spawn_blocking(move || {
                    crate::images::build(&out, Some((&reg, "moe", &ca)))
                })
                .await??;
                let digest = |name: &str| -> Result<String> {
                    let r = built
                        .pushed
                        .get(name)
                        .with_context(|| format!("{name} not pushed"))?;
                    Ok(r.split_once('@').context("no digest")?.1.to_string())
                };
                let pushed = Pushed {
                    registry: format!("{}/moe", cluster.registry().host),
                    operator_digest: digest("moe-operator")?,
                    worker_digest: digest("moe-worker")?,
                };
                let _ = PUSHED.set(pushed);
                Ok::<_, anyhow::Error>(cluster)
            };
            start.await.map_err(|e| format!("{e:#}"))
        })
        .await;
    match c {
        Ok(c) => c,
        Err(e) => panic!("the e2e cluster with images did not start: {e}"),
    }
}

/// `helm install` of the operator chart into `ns`, watching `ns` only, and waits until the
/// operator Deployment is available. On the images cluster ([`cluster`]) the chart points at
/// the pushed images by digest, pulled with a `regcred` Secret.
pub async fn install_operator(cluster: &Cluster, ns: &str, extra: &[&str]) -> Result<()> {
    binaries()?;
    crds(cluster).await?;
    let chart = chart_dir();
    let watch = format!("watchNamespace={ns}");
    let mut image_args: Vec<String> = Vec::new();
    if let Some(p) = PUSHED.get() {
        let password = cluster.registry().password.clone();
        crate::images::pull_secret(cluster, ns, &password).await?;
        image_args = [
            format!("imageRegistry={}", p.registry),
            format!("image.digest={}", p.operator_digest),
            format!("workerImage.digest={}", p.worker_digest),
            "imagePullSecrets[0].name=regcred".to_string(),
        ]
        .into_iter()
        .flat_map(|a| ["--set".to_string(), a])
        .collect();
    }
    let mut args = vec![
        "install",
        "moe",
        chart.to_str().context("chart path")?,
        "-n",
        ns,
        "--set",
        "fullnameOverride=moe-operator",
        "--set",
        &watch,
        "--set",
        "logFormat=text",
        "--set",
        "logLevel=info\\,moe_operator=debug",
    ];
    args.extend(image_args.iter().map(String::as_str));
    args.extend_from_slice(extra);
    cluster.helm(&args)?;
    wait_operator(cluster, ns).await
}

/// Waits until the operator Deployment has an available, ready replica.
pub async fn wait_operator(cluster: &Cluster, ns: &str) -> Result<()> {
    let deps: Api<Deployment> = Api::namespaced(cluster.client().await?, ns);
    until(
        "the operator to be available",
        Duration::from_secs(90),
        || {
            let deps = deps.clone();
            async move {
                let d = deps.get(OPERATOR).await?;
                let s = d.status.unwrap_or_default();
                let want = d.spec.replicas.unwrap_or(1);
                Ok((s.available_replicas.unwrap_or(0) >= want
                    && s.updated_replicas.unwrap_or(0) >= want
                    && s.replicas.unwrap_or(0) == want)
                    .then_some(()))
            }
        },
    )
    .await
}

/// The operator's pod (the one running).
pub async fn operator_pod(client: &Client, ns: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=moe-operator"))
        .await?;
    list.items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .context("no ready operator pod")
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A condition of a MoEDeployment: (status, reason, message).
pub fn condition(md: &MoEDeployment, type_: &str) -> Option<(String, String, String)> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until `name` is Ready for its current generation.
pub async fn wait_ready(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<MoEDeployment> {
    let api: Api<MoEDeployment> = Api::namespaced(client.clone(), ns);
    until(
        &format!("MoEDeployment {name} to be Ready"),
        timeout,
        || {
            let api = api.clone();
            async move {
                let md = api.get(name).await?;
                let current = md.status.as_ref().and_then(|s| s.observed_generation)
                    == md.metadata.generation;
                match condition(&md, "Ready") {
                    Some((s, ..)) if s == "True" && current => Ok(Some(md)),
                    c => bail!("Ready: {c:?}, observed generation current: {current}"),
                }
            }
        },
    )
    .await
}

/// Ready addresses (`IP:PORT`) of a Service, from its EndpointSlices: how clients reach
/// pods here (no kube-proxy, no cluster DNS).
pub async fn service_endpoints(client: &Client, ns: &str, service: &str) -> Result<Vec<String>> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let slices = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let mut out = Vec::new();
    for s in &slices.items {
        let port = s
            .ports
            .iter()
            .flatten()
            .find_map(|p| p.port)
            .context("EndpointSlice without a port")?;
        for ep in s.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &ep.addresses {
                out.push(format!("{a}:{port}"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `kubectl apply -f examples/FILE` in `ns`, then waits until the MoEDeployment `name` is
/// Ready (failing with the namespace's pods, EndpointSlices and status).
pub async fn apply_example(
    cluster: &Cluster,
    client: &Client,
    ns: &str,
    file: &str,
    name: &str,
    timeout: Duration,
) -> Result<MoEDeployment> {
    cluster.kubectl(&["-n", ns, "apply", "-f", &example(file).to_string_lossy()])?;
    wait_ready(client, ns, name, timeout)
        .await
        .map_err(|e| e.context(diagnostics(cluster, ns)))
}

/// The deployment's worker certificates (the operator's `NAME-worker-tls` Secret) written to a
/// folder, for a test client that talks to worker ports as a worker does.
pub async fn worker_certs(client: &Client, ns: &str, name: &str) -> Result<PathBuf> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get(&format!("{name}-worker-tls")).await?;
    let dir = std::env::temp_dir().join(format!("moe-e2e-certs-{ns}-{name}"));
    std::fs::create_dir_all(&dir)?;
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v.0)?;
    }
    Ok(dir)
}

/// A gRPC channel to a worker port (`IP:PORT`) over mutual TLS with the certificates in `certs`.
pub fn worker_channel(certs: &std::path::Path, addr: &str) -> Result<tonic::transport::Channel> {
    let tls = moe_worker::serve::tls::Tls::load(certs)?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(moe_worker::serve::tls::Connector::new(tls)),
    )
}

/// The gateway's base URL (`http://IP:PORT`) through its Service's endpoints.
pub async fn gateway_url(client: &Client, ns: &str, name: &str) -> Result<String> {
    until(
        "the gateway Service to have a ready endpoint",
        Duration::from_secs(60),
        || async move {
            Ok(service_endpoints(client, ns, name)
                .await?
                .first()
                .map(|a| format!("http://{a}")))
        },
    )
    .await
}

/// Greedy completion token ids through the gateway. Errors carry the HTTP status and body.
pub async fn complete_ids(base: &str, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
        }))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "HTTP {status}: {v}");
    token_ids(&v["choices"][0]["token_ids"])
}

fn token_ids(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("no token_ids")?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .context("bad id")
        })
        .collect()
}

/// Greedy tokens from single-process `moe-worker generate`: the reference.
pub fn generate_ids(model: &str, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    let bin = crate::workspace_binary("moe-worker")?;
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let out = std::process::Command::new(bin)
        .args(["--threads", "1", "generate", "--model", model, "--json"])
        .args(["--ignore-eos", "--prompt-ids", &ids.join(",")])
        .args(["--max-new-tokens", &max_new.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    token_ids(&v["token_ids"])
}

/// Every object the operator makes (of the kinds it makes) in `ns` matching `selector`, not
/// being deleted: (`kind/name`, uid, the MoEDeployment it belongs to).
pub async fn child_objects(
    client: &Client,
    ns: &str,
    selector: &str,
) -> Result<Vec<(String, String, String)>> {
    let lp = ListParams::default().labels(selector);
    let mut out = Vec::new();
    macro_rules! collect {
        ($($kind:ty => $label:literal),*) => {$(
            for o in Api::<$kind>::namespaced(client.clone(), ns).list_metadata(&lp).await?.items {
                if o.metadata.deletion_timestamp.is_none() {
                    out.push((
                        format!("{}/{}", $label, o.name_any()),
                        o.uid().unwrap_or_default(),
                        o.labels().get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                    ));
                }
            }
        )*};
    }
    collect!(
        StatefulSet => "statefulset", Deployment => "deployment", Service => "service",
        ConfigMap => "configmap", PodDisruptionBudget => "poddisruptionbudget",
        NetworkPolicy => "networkpolicy", ServiceAccount => "serviceaccount",
        Role => "role", RoleBinding => "rolebinding"
    );
    Ok(out)
}

/// Names (kind/name → uid) of every object the operator made for `name`.
pub async fn children(client: &Client, ns: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let selector = format!("{LABEL_DEPLOYMENT}={name}");
    Ok(child_objects(client, ns, &selector)
        .await?
        .into_iter()
        .map(|(kind_name, uid, _)| (kind_name, uid))
        .collect())
}

/// The pods of a MoEDeployment (not terminating), by name.
pub async fn pods(client: &Client, ns: &str, selector: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pods: Vec<Pod> = api
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    pods.sort_by_key(|p| p.name_any());
    Ok(pods)
}

/// The host pid of a pod's first container, when it runs.
pub fn pid(p: &Pod) -> Option<u32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()
        .and_then(crate::node::container_pid)
}

/// Whether a process is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

/// What a failed wait should show: pods, EndpointSlices and the MoEDeployment's status.
pub fn diagnostics(cluster: &Cluster, ns: &str) -> String {
    let mut out = String::new();
    for args in [
        &["get", "pods,endpointslices", "-o", "wide"][..],
        &["get", "moe", "-o", "jsonpath={.items[*].status}"][..],
    ] {
        let mut a = vec!["-n", ns];
        a.extend_from_slice(args);
        match cluster.kubectl(&a) {
            Ok(s) => out.push_str(&s),
            Err(e) => out.push_str(&format!("{e:#}")),
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "pod logs: {}",
        cluster.dir().join("pods").join(ns).display()
    ));
    out
}
