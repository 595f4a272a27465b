//! Pods from images under a real OCI runtime: a cluster whose node agent pulls each container's
//! image from the cluster registry (TLS, credentials from `imagePullSecrets`) and runs it with
//! runc from a bundle made from the pod spec.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::node::container_pid;
use e2e::wait::until;
use e2e::{Cluster, ClusterConfig};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

/// This file's cluster (runc, one node) and the worker image pushed to its registry by digest.
async fn cluster() -> &'static (Cluster, String) {
    static C: OnceCell<(Cluster, String)> = OnceCell::const_new();
    C.get_or_init(|| async {
        let cluster = Cluster::start_with(ClusterConfig {
            nodes: 1,
            node_registry_login: false,
            ..ClusterConfig::default()
        })
        .await
        .expect("cluster");
        let (reg, ca) = (cluster.registry().clone(), cluster.ca_cert().to_path_buf());
        let out = cluster.dir().join("images");
        let built =
            tokio::task::spawn_blocking(move || e2e::images::build(&out, Some((&reg, "moe", &ca))))
                .await
                .expect("join")
                .expect("images");
        let worker = built
            .pushed
            .get("moe-worker")
            .cloned()
            .expect("pushed worker");
        // By digest only, as the chart is installed.
        let (repo, digest) = worker.split_once('@').expect("digest");
        let repo = repo.rsplit_once(':').map(|(r, _)| r).unwrap_or(repo);
        (cluster, format!("{repo}@{digest}"))
    })
    .await
}

/// A pod of the worker image, as the operator's pods are secured.
fn worker_pod(
    name: &str,
    image: &str,
    args: &[&str],
    read_only: bool,
    memory: &str,
    restart: &str,
) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "imagePullSecrets": [{"name": "regcred"}],
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "w", "image": image, "args": args, "imagePullPolicy": "IfNotPresent",
                "securityContext": {"readOnlyRootFilesystem": read_only, "allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"limits": {"memory": memory, "cpu": "1"}},
            }],
        },
    }))?)
}

async fn wait_pod<T>(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    f: impl Fn(&Pod) -> Option<T>,
) -> Result<T> {
    let f = &f;
    until(what, Duration::from_secs(120), || {
        let pods = pods.clone();
        let name = name.to_string();
        async move { Ok(f(&pods.get(&name).await?)) }
    })
    .await
}

fn log_of(cluster: &Cluster, ns: &str, pod: &str) -> String {
    std::fs::read_to_string(cluster.pod_log(ns, pod, "w")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_from_their_images_under_runc_with_the_security_context_enforced() -> Result<()> {
    let (cluster, image) = cluster().await;
    let ns = cluster.namespace("runc").await?;
    e2e::images::pull_secret(cluster, &ns, &cluster.registry().password).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client().await?, &ns);
    // A long-running expert shard: its process runs as 65532, without capabilities or new
    // privileges, under seccomp, with its memory limit, in the pod's network namespace.
    let serve = worker_pod(
        "expert",
        image,
        &[
            "expert",
            "--model",
            "synthetic:tiny",
            "--layers",
            "0..4",
            "--experts",
            "0,1",
            "--listen",
            "0.0.0.0:50051",
            "--plaintext",
        ],
        true,
        "512Mi",
        "Always",
    )?;
    pods.create(&PostParams::default(), &serve).await?;
    let status = wait_pod(&pods, "expert", "the expert to run", |p| {
        let s = p.status.clone()?;
        let c = s.container_statuses.clone()?.into_iter().next()?;
        (s.phase.as_deref() == Some("Running") && container_pid(&c).is_some()).then_some((s, c))
    })
    .await
    .with_context(|| log_of(cluster, &ns, "expert"))?;
    let (s, c) = status;
    let digest = image.split('@').nth(1).context("digest")?;
    assert!(c.image_id.ends_with(digest), "{}", c.image_id);
    let pid = container_pid(&c).context("pid")?;
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    assert!(field("Uid:").starts_with("65532"), "{proc_status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // The pod's own address answers on the port.
    let ip = s.pod_ip.context("pod ip")?;
    until("the expert port to accept", Duration::from_secs(60), || {
        let ip = ip.clone();
        async move {
            Ok(tokio::net::TcpStream::connect((ip.as_str(), 50051))
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;

    // A read-only root filesystem refuses writes, as on a real node; a writable one takes them.
    for (name, read_only) in [("ro", true), ("rw", false)] {
        let p = worker_pod(
            name,
            image,
            &["certs", "init", "--dir", "/tmp/certs"],
            read_only,
            "256Mi",
            "Never",
        )?;
        pods.create(&PostParams::default(), &p).await?;
        let phase = wait_pod(&pods, name, "the writer to finish", |p| {
            p.status
                .clone()?
                .phase
                .filter(|ph| ph == "Succeeded" || ph == "Failed")
        })
        .await?;
        let log = log_of(cluster, &ns, name);
        if read_only {
            assert_eq!(phase, "Failed", "{log}");
            assert!(log.contains("Read-only file system"), "{log}");
        } else {
            assert_eq!(phase, "Succeeded", "{log}");
        }
    }

    // Over its memory limit: OOM-killed, restarted, the reason in status.
    let hog = worker_pod(
        "hog",
        image,
        &[
            "generate",
            "--model",
            "synthetic:mini",
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
        ],
        true,
        "48Mi",
        "Always",
    )?;
    pods.create(&PostParams::default(), &hog).await?;
    let last = wait_pod(
        &pods,
        "hog",
        "the hog to be OOM-killed and restarted",
        |p| {
            let c = p.status.clone()?.container_statuses?.into_iter().next()?;
            let t = c.last_state?.terminated?;
            (c.restart_count >= 1).then_some(t)
        },
    )
    .await
    .with_context(|| log_of(cluster, &ns, "hog"))?;
    assert_eq!(last.reason.as_deref(), Some("OOMKilled"), "{last:?}");
    assert_eq!(last.exit_code, 137);
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_images_and_bad_credentials_are_reported_as_pull_errors() -> Result<()> {
    let (cluster, image) = cluster().await;
    let missing = image.replace("moe/moe-worker@", "moe/no-such-image@");
    let right = cluster.registry().password.clone();
    for (name, img, password) in [
        (
            "bad-credentials",
            image.clone(),
            "not-the-password".to_string(),
        ),
        ("missing", missing, right),
    ] {
        let ns = cluster.namespace(name).await?;
        e2e::images::pull_secret(cluster, &ns, &password).await?;
        let pods: Api<Pod> = Api::namespaced(cluster.client().await?, &ns);
        let mut pod = worker_pod(name, &img, &["--version"], true, "64Mi", "Never")?;
        // Always asks the registry (the node may hold the image from another pod already).
        if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            c.image_pull_policy = Some("Always".into());
        }
        pods.create(&PostParams::default(), &pod).await?;
        let (reason, message) = wait_pod(&pods, name, "a pull error", |p| {
            let c = p.status.clone()?.container_statuses?.into_iter().next()?;
            let w = c.state?.waiting?;
            let r = w.reason?;
            (r == "ImagePullBackOff").then(|| (r, w.message.unwrap_or_default()))
        })
        .await?;
        eprintln!("[runtime] {name}: {reason}: {message}");
        ensure!(!message.is_empty(), "{name}: no message");
        if name == "bad-credentials" {
            assert!(message.contains("401"), "{message}");
        } else {
            assert!(message.contains("404"), "{message}");
        }
        cluster.delete_namespace(&ns).await?;
    }
    Ok(())
}
