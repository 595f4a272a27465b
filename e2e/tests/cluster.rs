//! The test infrastructure itself: a real control plane, fake GPU nodes whose pods run from
//! their images under runc (Debian's busybox here, pushed to the cluster's registry).
//!
//! All tests share one cluster (`Cluster::shared`), each in its own namespace.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use e2e::Cluster;
use e2e::node::container_pid;
use e2e::wait::until;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

fn from_json<T: k8s_openapi::serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    Ok(serde_json::from_value(v)?)
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state is "Z".
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test]
async fn control_plane_is_real() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;

    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, e2e::K8S_VERSION);

    let readyz = cluster.kubectl(&["get", "--raw", "/readyz"])?;
    assert_eq!(readyz.trim(), "ok");
    let client_version = cluster.kubectl(&["version", "-o", "json"])?;
    assert!(
        client_version.contains(e2e::K8S_VERSION),
        "{client_version}"
    );
    let helm = cluster.helm(&["version", "--short"])?;
    assert!(helm.starts_with("v3."), "{helm}");

    // The controller-manager gives a new namespace its default ServiceAccount.
    let ns = cluster.namespace("infra").await?;
    let sa = cluster.kubectl(&["-n", &ns, "get", "serviceaccount", "default", "-o", "name"])?;
    assert_eq!(sa.trim(), "serviceaccount/default");

    // helm installs a chart into it.
    let chart = cluster.dir().join("charts").join(&ns);
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: probe\nversion: 0.1.0\n",
    )?;
    std::fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )?;
    cluster.helm(&[
        "install",
        "probe",
        &chart.to_string_lossy(),
        "-n",
        &ns,
        "--wait",
    ])?;
    let kube = cluster.kubectl(&[
        "-n",
        &ns,
        "get",
        "configmap",
        "probe",
        "-o",
        "jsonpath={.data.kube}",
    ])?;
    assert_eq!(kube, e2e::K8S_VERSION);

    let nodes: Api<Node> = Api::all(client);
    let list = nodes
        .list(&ListParams::default().labels("nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB"))
        .await?;
    assert_eq!(list.items.len(), cluster.nodes().len());
    for n in &list.items {
        let status = n.status.clone().unwrap_or_default();
        let gpus = status
            .allocatable
            .unwrap_or_default()
            .get("nvidia.com/gpu")
            .map(|q| q.0.clone());
        assert_eq!(gpus.as_deref(), Some("8"));
        let ready = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "node {:?} not Ready", n.metadata.name);
    }
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

/// A web server pod: an emptyDir at /tmp, env from the downward API and `$(VAR)` expansion, an
/// httpGet readiness probe and a tcpSocket liveness probe, one GPU on an A100 node.
fn web_deployment(ns: &str, image: &str) -> Result<Deployment> {
    let script = "env > /tmp/env.txt && echo hello > /tmp/hello.txt && \
                  exec httpd -f -vv -p 8080 -h /tmp";
    from_json(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web", "namespace": ns },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "nodeSelector": { "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB" },
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "web",
                        "image": image,
                        "command": ["sh", "-c", script],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                            { "name": "APP", "valueFrom": { "fieldRef": { "fieldPath": "metadata.labels['app']" } } },
                            { "name": "GREETING", "value": "hi-$(POD_NAME)" }
                        ],
                        "ports": [{ "name": "http", "containerPort": 8080 }],
                        "resources": { "limits": { "nvidia.com/gpu": 1 } },
                        "readinessProbe": { "httpGet": { "path": "/hello.txt", "port": "http" }, "periodSeconds": 1 },
                        "livenessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 2 },
                        "volumeMounts": [{ "name": "scratch", "mountPath": "/tmp" }]
                    }],
                    "volumes": [{ "name": "scratch", "emptyDir": {} }]
                }
            }
        }
    }))
}

#[tokio::test]
async fn deployment_pods_run_from_their_image_with_their_own_address() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("web").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &web_deployment(&ns, &e2e::images::busybox(cluster).await?)?,
        )
        .await?;
    let service: Service = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "web", "namespace": ns },
        "spec": { "selector": { "app": "web" }, "ports": [{ "port": 80, "targetPort": "http" }] }
    }))?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await?;

    // Scheduled onto a GPU node, Running and Ready through its own probes.
    let pod = until("the web pod to be Ready", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            Ok(list.items.into_iter().find(|p| {
                let s = p.status.clone().unwrap_or_default();
                s.phase.as_deref() == Some("Running")
                    && s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            }))
        }
    })
    .await
    .with_context(|| {
        format!(
            "pods: {}",
            cluster
                .kubectl(&["-n", &ns, "get", "pods", "-o", "yaml"])
                .unwrap_or_default()
        )
    })?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    assert!(spec.node_name.unwrap_or_default().starts_with("gpu-node-"));
    let status = pod.status.clone().unwrap_or_default();
    let ip: Ipv4Addr = status.pod_ip.clone().unwrap_or_default().parse()?;
    assert!(!ip.is_loopback(), "{ip}");
    let cidr = cluster.pod_cidr();
    let prefix = cidr.trim_end_matches("0/24");
    assert!(ip.to_string().starts_with(prefix), "{ip} not in {cidr}");
    let cs = status.container_statuses.clone().unwrap_or_default();
    assert_eq!(cs.len(), 1);
    assert!(
        cs[0].ready
            && cs[0].started == Some(true)
            && cs[0].state.as_ref().is_some_and(|s| s.running.is_some())
    );
    let pid = container_pid(&cs[0]).context("container pid")?;
    assert!(pid_alive(pid));

    // The pod's address is an endpoint of its Service.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    until(
        "the web Service's EndpointSlice to list the pod",
        Duration::from_secs(30),
        || {
            let slices = slices.clone();
            let ip = ip.to_string();
            async move {
                let list = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                    .await?;
                let found = list
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .any(|e| {
                        e.addresses.contains(&ip)
                            && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
                    });
                Ok(found.then_some(()))
            }
        },
    )
    .await?;

    // The test process reaches the pod at its address; the pod saw its env and its emptyDir.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let hello = http
        .get(format!("http://{ip}:8080/hello.txt"))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(hello.trim(), "hello");
    let env = http
        .get(format!("http://{ip}:8080/env.txt"))
        .send()
        .await?
        .text()
        .await?;
    for want in [
        format!("POD_NAME={name}"),
        format!("POD_IP={ip}"),
        "APP=web".to_string(),
        format!("GREETING=hi-{name}"),
        format!("KUBERNETES_SERVICE_HOST={}", cluster.host_ip()),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in\n{env}");
    }
    assert!(
        !Path::new("/tmp/hello.txt").exists(),
        "emptyDir leaked to the host's /tmp"
    );
    let log = std::fs::read_to_string(cluster.pod_log(&ns, &name, "web"))?;
    assert!(log.contains("/hello.txt"), "{log}");

    // Deleting the Deployment stops the process and the pod disappears.
    deployments
        .delete("web", &DeleteParams::foreground())
        .await?;
    until("the web pod to be gone", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            Ok(pods
                .list(&ListParams::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        }
    })
    .await?;
    until(
        "the web process to exit",
        Duration::from_secs(5),
        || async move { Ok((!pid_alive(pid)).then_some(())) },
    )
    .await?;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test]
async fn pods_reach_the_api_server_with_their_service_account_token() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("token").await?;
    // The pod reaches the API server's address from its environment and prints what it was
    // given; the test then authenticates with that token (busybox has no TLS client that
    // kube-apiserver's ECDSA certificate accepts).
    let script = r#"set -e
d=/var/run/secrets/kubernetes.io/serviceaccount
nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT" -e true </dev/null
echo "api=reachable"
echo "ca=$(sha256sum $d/ca.crt | cut -d' ' -f1)"
echo "namespace=$(cat $d/namespace)"
echo "token=$(cat $d/token)"
"#;
    let image = e2e::images::busybox(cluster).await?;
    let pod: Pod = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "whoami", "namespace": ns },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "main", "image": image, "command": ["sh", "-c", script] }]
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let phase = until("the whoami pod to finish", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("whoami").await?;
            let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        }
    })
    .await?;
    let log = std::fs::read_to_string(cluster.pod_log(&ns, "whoami", "main"))?;
    assert_eq!(phase, "Succeeded", "{log}");
    assert!(log.contains("api=reachable"), "{log}");
    assert!(log.contains(&format!("namespace={ns}")), "{log}");
    let token = log
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .context("no token in the log")?
        .to_string();
    let kc = kube::config::Kubeconfig::read_from(cluster.kubeconfig())?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    cfg.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(kube::Client::try_from(cfg)?)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    assert_eq!(user, format!("system:serviceaccount:{ns}:default"));
    let ca = moe_oci::digest(&std::fs::read(cluster.ca_cert())?);
    assert!(
        log.contains(&format!("ca={}", ca.trim_start_matches("sha256:"))),
        "{log}"
    );
    // The token is only in the pod's own mount namespace.
    assert!(!Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists());

    // A completed pod is deleted by the agent when asked.
    pods.delete("whoami", &DeleteParams::default()).await?;
    until("the whoami pod to be gone", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("whoami").await?.is_none().then_some(())) }
    })
    .await?;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("liveness").await?;
    let image = e2e::images::busybox(cluster).await?;
    // Alive for two seconds, then the exec probe fails and the agent restarts the container.
    let pod: Pod = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "flaky", "namespace": ns },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": image,
                "command": ["sh", "-c", "touch /tmp/alive; sleep 2; rm /tmp/alive; exec sleep 600"],
                "livenessProbe": {
                    "exec": { "command": ["test", "-f", "/tmp/alive"] },
                    "initialDelaySeconds": 1, "periodSeconds": 1, "failureThreshold": 2
                },
                "volumeMounts": [{ "name": "t", "mountPath": "/tmp" }]
            }],
            "volumes": [{ "name": "t", "emptyDir": {} }]
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let restarted = until(
        "the flaky container to be restarted",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("flaky").await?;
                let cs = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default();
                Ok(cs.into_iter().find(|c| c.restart_count >= 1))
            }
        },
    )
    .await?;
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .context("last state")?;
    assert!(
        last.message
            .clone()
            .unwrap_or_default()
            .contains("liveness probe failed"),
        "{last:?}"
    );
    // It ran until the file was gone (2 s) and two probes had failed, not less.
    let ran = last
        .finished_at
        .clone()
        .context("finishedAt")?
        .0
        .duration_since(last.started_at.clone().context("startedAt")?.0);
    assert!(ran.as_secs_f64() >= 2.5, "{last:?}");
    pods.delete("flaky", &DeleteParams::default()).await?;
    until("the flaky pod to be gone", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("flaky").await?.is_none().then_some(())) }
    })
    .await?;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test]
async fn gpu_requests_beyond_a_node_stay_pending() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("gpus").await?;
    let image = e2e::images::busybox(cluster).await?;
    let pod: Pod = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "too-big", "namespace": ns },
        "spec": {
            "containers": [{
                "name": "main", "image": image, "command": ["sleep", "600"],
                "resources": { "limits": { "nvidia.com/gpu": 9 } }
            }]
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let message = until(
        "the scheduler to report the pod unschedulable",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("too-big").await?;
                if p.spec.and_then(|s| s.node_name).is_some() {
                    bail!("a pod asking for 9 GPUs was scheduled");
                }
                let conds = p.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conds
                    .into_iter()
                    .find(|c| {
                        c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                    })
                    .and_then(|c| c.message))
            }
        },
    )
    .await?;
    assert!(message.contains("nvidia.com/gpu"), "{message}");
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test]
async fn a_cluster_of_its_own_stops_everything_on_drop() -> Result<()> {
    let cluster = Cluster::start_with(e2e::ClusterConfig {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    let client = cluster.client().await?;
    let ns = cluster.namespace("own").await?;
    let image = e2e::images::busybox(&cluster).await?;
    let objects = serde_json::json!([
        { "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "cfg" },
          "data": { "greeting": "hello from a configmap" } },
        { "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "sec" },
          "stringData": { "password": "s3cret" } },
    ]);
    for o in objects.as_array().into_iter().flatten() {
        let path = cluster.dir().join("object.json");
        std::fs::write(&path, o.to_string())?;
        cluster.kubectl(&["-n", &ns, "apply", "-f", &path.to_string_lossy()])?;
    }
    let pod: Pod = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "reader", "namespace": ns },
        "spec": {
            "initContainers": [{
                "name": "init", "image": image,
                "command": ["sh", "-c", "echo from-init > /tmp/moe-e2e-work/x"],
                "volumeMounts": [{ "name": "work", "mountPath": "/tmp/moe-e2e-work" }]
            }],
            "containers": [{
                "name": "main", "image": image,
                "command": ["sh", "-c", "cat /tmp/moe-e2e-cfg/greeting; echo; echo password=$PASSWORD; \
                                         cat /tmp/moe-e2e-work/x; exec sleep 600"],
                "env": [{ "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": "sec", "key": "password" } } }],
                "volumeMounts": [
                    { "name": "cfg", "mountPath": "/tmp/moe-e2e-cfg" },
                    { "name": "work", "mountPath": "/tmp/moe-e2e-work" }
                ]
            }],
            "volumes": [{ "name": "cfg", "configMap": { "name": "cfg" } }, { "name": "work", "emptyDir": {} }]
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let log_path = cluster.pod_log(&ns, "reader", "main");
    until(
        "the reader pod to print its config",
        Duration::from_secs(60),
        || {
            let log_path = log_path.clone();
            async move {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                Ok(
                    (log.contains("hello from a configmap") && log.contains("password=s3cret"))
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    // The container writes its log as soon as runc starts it; its status (with the pid) is
    // posted a moment later.
    let pid = until(
        "the reader's status to show its process",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("reader").await?;
                let cs = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default();
                Ok(cs.first().and_then(container_pid))
            }
        },
    )
    .await?;
    assert!(pid_alive(pid));

    let bridge = cluster.bridge();
    assert!(Path::new("/sys/class/net").join(&bridge).exists());
    drop(cluster);
    assert!(!pid_alive(pid), "pod process {pid} outlived its cluster");
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "{bridge} outlived its cluster"
    );
    Ok(())
}

#[tokio::test]
async fn host_network_pods_get_the_host_address() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    let ns = cluster.namespace("hostnet").await?;
    let image = e2e::images::busybox(cluster).await?;
    let pod: Pod = from_json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "hostnet", "namespace": ns },
        "spec": {
            "hostNetwork": true,
            "containers": [{ "name": "main", "image": image, "command": ["sleep", "600"] }]
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    let ip = until(
        "the hostNetwork pod to run",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let s = pods.get("hostnet").await?.status.unwrap_or_default();
                Ok((s.phase.as_deref() == Some("Running")).then_some(s.pod_ip.unwrap_or_default()))
            }
        },
    )
    .await?;
    assert_eq!(ip, cluster.host_ip().to_string());
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

/// The cluster's registry (CNCF distribution, TLS with the cluster CA, htpasswd): `cargo
/// xtask images --push` puts both images there; pulled back by digest they are byte for byte
/// what was built; without credentials, or with wrong ones, a pull is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_push_to_the_cluster_registry_and_pull_back_by_digest() -> Result<()> {
    use moe_oci::registry::{Credentials, Reference, Registry};
    let cluster = Cluster::shared().await;
    let reg = cluster.registry().clone();
    let out = cluster.dir().join("images-pushed");
    let ca = cluster.ca_cert().to_path_buf();
    let built = tokio::task::spawn_blocking({
        let (out, reg, ca) = (out.clone(), reg.clone(), ca.clone());
        move || e2e::images::build(&out, Some((&reg, "moe", &ca)))
    })
    .await??;
    let layout = moe_oci::Layout::open(&out)?;
    let ca_pem = std::fs::read(&ca)?;
    let creds = Credentials {
        username: reg.username.clone(),
        password: reg.password.clone(),
    };
    let client = Registry::new(&reg.host, Some(&ca_pem), Some(creds))?;
    for name in ["moe-operator", "moe-worker"] {
        let pushed = built.pushed.get(name).context("pushed")?;
        let r = Reference::parse(pushed)?;
        assert_eq!(r.repository, format!("moe/{name}"));
        let local = layout
            .resolve(&format!("{name}:{}", env!("CARGO_PKG_VERSION")))?
            .context("in the layout")?;
        assert_eq!(r.digest.as_deref(), Some(local.as_str()));
        // By digest and by tag: the same manifest.
        let (manifest, digest) = client.manifest(&r.repository, r.target()).await?;
        assert_eq!(digest, local);
        let (_, by_tag) = client
            .manifest(&r.repository, r.tag.as_deref().context("tag")?)
            .await?;
        assert_eq!(by_tag, local);
        let m: serde_json::Value = serde_json::from_slice(&manifest)?;
        let mut digests = vec![
            m["config"]["digest"]
                .as_str()
                .context("config")?
                .to_string(),
        ];
        for l in m["layers"].as_array().context("layers")? {
            digests.push(l["digest"].as_str().context("layer")?.to_string());
        }
        for d in digests {
            assert_eq!(client.blob(&r.repository, &d).await?, layout.read_blob(&d)?);
        }
        eprintln!("[registry] {pushed}");
    }
    // No credentials, or wrong ones: refused, with a message that says so.
    let worker = Reference::parse(built.pushed.get("moe-worker").context("worker")?)?;
    let anonymous = Registry::new(&reg.host, Some(&ca_pem), None)?;
    let e = anonymous
        .manifest(&worker.repository, worker.target())
        .await
        .expect_err("anonymous pull");
    assert!(e.to_string().contains("credentials"), "{e}");
    let wrong = Registry::new(
        &reg.host,
        Some(&ca_pem),
        Some(Credentials {
            username: reg.username.clone(),
            password: "not-the-password".into(),
        }),
    )?;
    let e = wrong
        .manifest(&worker.repository, worker.target())
        .await
        .expect_err("wrong password");
    assert!(e.to_string().contains("401"), "{e}");
    Ok(())
}
