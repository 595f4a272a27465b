//! Reconcile against a mocked API server: the requests made, in order, and what they carry.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap fixtures too

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use moe_operator::cli::read_manifest;
use moe_operator::controller::{self, AppliedCache, Context};
use moe_operator::crd::MoEDeployment;
use moe_operator::metrics::Metrics;
use moe_operator::resources::Config;
use serde_json::{Value, json};

const UID: &str = "0b7d7b0e-6f2a-4d8e-9a55-2f3f4c1c2a10";

fn tiny() -> MoEDeployment {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.yaml");
    let mut md = read_manifest(&path).unwrap();
    md.metadata.namespace = Some("serving".into());
    md.metadata.uid = Some(UID.into());
    md.metadata.generation = Some(1);
    md.metadata.resource_version = Some("100".into());
    md
}

/// One request as the fake API server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

impl Seen {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// How the fake API server answers.
#[derive(Clone, Copy)]
struct World {
    /// Workloads report every replica ready.
    ready: bool,
    /// An expert shard from an earlier, larger plan still exists.
    stale_shard: bool,
    /// The operator creates PodMonitors, and the cluster serves their API.
    monitoring: bool,
}

fn workload_status(obj: &Value) -> Value {
    let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    json!({
        "observedGeneration": 1,
        "replicas": replicas,
        "readyReplicas": replicas,
        "updatedReplicas": replicas,
        "availableReplicas": replicas,
        "currentRevision": "r1",
        "updateRevision": "r1",
    })
}

fn answer(world: World, seen: &Seen) -> (u16, Value) {
    let m = &seen.method;
    if *m == Method::PATCH {
        let mut obj = seen.body.clone();
        obj["metadata"]["uid"] = json!("child-uid");
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["resourceVersion"] = json!("7");
        if world.ready && matches!(obj["kind"].as_str(), Some("StatefulSet" | "Deployment")) {
            obj["status"] = workload_status(&obj);
        }
        if seen.path.ends_with("/status") {
            obj["metadata"]["name"] = json!("tiny");
            obj["metadata"]["namespace"] = json!("serving");
            obj["spec"] = serde_json::to_value(&tiny().spec).unwrap();
        }
        return (200, obj);
    }
    if *m == Method::GET && seen.path == "/apis/monitoring.coreos.com/v1" {
        return (
            200,
            json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "monitoring.coreos.com/v1",
                "resources": [{
                    "name": "podmonitors", "singularName": "podmonitor", "namespaced": true,
                    "kind": "PodMonitor", "verbs": ["get", "list", "watch", "create", "patch"],
                }],
            }),
        );
    }
    if *m == Method::GET && seen.path.contains("/secrets/") {
        // No certificates yet: the operator issues them.
        return (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
        );
    }
    if *m == Method::GET {
        let mut items = Vec::new();
        if world.stale_shard && seen.path.ends_with("/deployments") {
            for name in ["tiny-expert-0", "tiny-expert-2"] {
                items.push(json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": {
                        "name": name,
                        "namespace": "serving",
                        "ownerReferences": [{
                            "apiVersion": "serving.moe.dev/v1alpha1",
                            "kind": "MoEDeployment",
                            "name": "tiny",
                            "uid": UID,
                            "controller": true,
                        }],
                    },
                }));
            }
            // Someone else's object with our label is never touched.
            items.push(json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": {"name": "tiny-expert-9", "namespace": "serving"},
            }));
        }
        return (
            200,
            json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadataList",
                "metadata": {"resourceVersion": "9"},
                "items": items,
            }),
        );
    }
    if *m == Method::DELETE {
        return (
            200,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}),
        );
    }
    if *m == Method::POST {
        let mut obj = seen.body.clone();
        obj["metadata"]["resourceVersion"] = json!("1");
        return (201, obj);
    }
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
    )
}

/// Runs one reconcile of `md` against a fake API server; returns the result and the requests.
async fn reconcile(
    md: MoEDeployment,
    world: World,
) -> (
    Result<kube::runtime::controller::Action, controller::ReconcileError>,
    Vec<Seen>,
) {
    reconcile_with(md, world, AppliedCache::default()).await
}

/// As [`reconcile`], with the operator's memory of what it applied before.
async fn reconcile_with(
    md: MoEDeployment,
    world: World,
    applied: AppliedCache,
) -> (
    Result<kube::runtime::controller::Action, controller::ReconcileError>,
    Vec<Seen>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let s = Seen {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or("").to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, body) = answer(world, &s);
            log.lock().unwrap().push(s);
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(service, "serving");
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: Config {
            worker_image: "ghcr.io/moe-serve/moe-worker:test".into(),
            pod_monitor: world
                .monitoring
                .then(moe_operator::resources::PodMonitorConfig::default),
            ..Config::default()
        },
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "moe-operator".into(),
                instance: Some("test".into()),
            },
        ),
        metrics: Arc::new(Metrics::new()),
        autoscale: Default::default(),
        performance: Default::default(),
        applied,
        monitoring: Default::default(),
    });
    let result = controller::reconcile(Arc::new(md), ctx).await;
    // Dropping the last client ends the fake server.
    server.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

const NS: &str = "/namespaces/serving";

fn expected_applies() -> Vec<String> {
    let core = format!("/api/v1{NS}");
    let apps = format!("/apis/apps/v1{NS}");
    let mut v = vec![
        // The workers' CA and certificate, before any pod that mounts them.
        format!("GET {core}/secrets/tiny-worker-ca"),
        format!("PATCH {core}/secrets/tiny-worker-ca"),
        format!("GET {core}/secrets/tiny-worker-tls"),
        format!("PATCH {core}/secrets/tiny-worker-tls"),
        format!("PATCH {core}/configmaps/tiny-plan"),
        format!("PATCH {core}/serviceaccounts/tiny-worker"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1{NS}/roles/tiny-worker"),
        format!("PATCH /apis/rbac.authorization.k8s.io/v1{NS}/rolebindings/tiny-worker"),
        format!("PATCH {core}/services/tiny-stage-0"),
        format!("PATCH {core}/services/tiny-stage-1"),
        format!("PATCH {core}/services/tiny-experts"),
        format!("PATCH {core}/services/tiny"),
        format!("PATCH {apps}/statefulsets/tiny-stage-0"),
        format!("PATCH {apps}/statefulsets/tiny-stage-1"),
        format!("PATCH {apps}/deployments/tiny-expert-0"),
        format!("PATCH {apps}/deployments/tiny-expert-1"),
        format!("PATCH {apps}/deployments/tiny-gateway"),
    ];
    for pdb in [
        "tiny-stages",
        "tiny-expert-0",
        "tiny-expert-1",
        "tiny-gateway",
    ] {
        v.push(format!(
            "PATCH /apis/policy/v1{NS}/poddisruptionbudgets/{pdb}"
        ));
    }
    v.push(format!(
        "PATCH /apis/networking.k8s.io/v1{NS}/networkpolicies/tiny-workers"
    ));
    v
}

fn expected_lists() -> Vec<String> {
    vec![
        format!("GET /apis/apps/v1{NS}/statefulsets"),
        format!("GET /apis/apps/v1{NS}/deployments"),
        format!("GET /api/v1{NS}/services"),
        format!("GET /apis/policy/v1{NS}/poddisruptionbudgets"),
    ]
}

fn lines(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(Seen::line).collect()
}

#[tokio::test]
async fn first_reconcile_applies_children_in_order_then_writes_status() {
    let (result, seen) = reconcile(
        tiny(),
        World {
            ready: false,
            stale_shard: false,
            monitoring: false,
        },
    )
    .await;
    result.unwrap();
    let mut want = expected_applies();
    want.extend(expected_lists());
    want.push(format!(
        "PATCH /apis/serving.moe.dev/v1alpha1{NS}/moedeployments/tiny/status"
    ));
    assert_eq!(lines(&seen), want);

    // Every write is a forced server-side apply by the one field manager.
    for s in seen.iter().filter(|s| s.method == Method::PATCH) {
        assert!(s.query.contains("fieldManager=moe-operator"), "{}", s.query);
        assert!(s.query.contains("force=true"), "{}", s.query);
    }
    // Pruning lists only this deployment's objects.
    for s in seen
        .iter()
        .filter(|s| s.method == Method::GET && !s.path.contains("/secrets/"))
    {
        assert!(
            s.query
                .contains("labelSelector=serving.moe.dev%2Fdeployment%3Dtiny"),
            "{}",
            s.query
        );
    }
    let shard = &seen[15].body;
    assert_eq!(shard["kind"], "Deployment");
    assert_eq!(shard["spec"]["replicas"], 1);
    let status = &seen.last().unwrap().body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["stages"], 2);
    assert_eq!(status["readyStages"], 0);
    assert_eq!(status["gatewayEndpoint"], "tiny.serving.svc:80");
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "StageUnavailable");
    // The plan's estimate on the spec's GPU (the default A100 80GB), nothing measured yet.
    let est = &status["performance"]["estimate"];
    assert_eq!(est["observedGeneration"], 1);
    assert_eq!(est["hardwareProfile"], "a100-80gb");
    assert_eq!(
        (est["batch"].as_i64(), est["microBatches"].as_i64()),
        (Some(2), Some(2))
    );
    for f in ["ttftSeconds", "tpotSeconds", "tokensPerSecond"] {
        assert!(est[f].as_f64().is_some_and(|x| x > 0.0), "{f}: {est}");
    }
    assert!(status["performance"].get("measured").is_none(), "{status}");
    let perf = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PerformanceAsPlanned")
        .unwrap();
    assert_eq!(
        (perf["status"].as_str(), perf["reason"].as_str()),
        (Some("Unknown"), Some("NoTraffic"))
    );
}

#[tokio::test]
async fn ready_workloads_give_a_ready_status_and_one_event() {
    let (result, seen) = reconcile(
        tiny(),
        World {
            ready: true,
            stale_shard: false,
            monitoring: false,
        },
    )
    .await;
    result.unwrap();
    let l = lines(&seen);
    let n = l.len();
    assert_eq!(
        l[n - 2],
        format!("POST /apis/events.k8s.io/v1{NS}/events"),
        "{l:#?}"
    );
    let event = &seen[n - 2].body;
    assert_eq!(event["reason"], "Ready");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["regarding"]["name"], "tiny");
    let status = &seen[n - 1].body["status"];
    assert_eq!(status["readyStages"], 2);
    assert_eq!(status["readyExpertShards"], 2);
    assert_eq!(status["expertReplicas"], 2);
    assert_eq!(status["gpus"], 5);
    let conds = status["conditions"].as_array().unwrap();
    let get = |t: &str| conds.iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(get("Ready")["status"], "True");
    assert_eq!(get("Progressing")["status"], "False");
    assert_eq!(get("Degraded")["status"], "False");
}

#[tokio::test]
async fn a_removed_expert_shard_loses_its_deployment() {
    let (result, seen) = reconcile(
        tiny(),
        World {
            ready: false,
            stale_shard: true,
            monitoring: false,
        },
    )
    .await;
    result.unwrap();
    let deletes: Vec<_> = seen
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(Seen::line)
        .collect();
    assert_eq!(
        deletes,
        [format!(
            "DELETE /apis/apps/v1{NS}/deployments/tiny-expert-2"
        )]
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_not_retried() {
    let mut md = tiny();
    md.spec.model.source.synthetic.as_mut().unwrap().preset = "huge".into();
    let (result, seen) = reconcile(
        md,
        World {
            ready: false,
            stale_shard: false,
            monitoring: false,
        },
    )
    .await;
    let action = result.unwrap();
    // No requeue: only a spec change brings the object back.
    assert_eq!(
        format!("{action:?}"),
        format!("{:?}", kube::runtime::controller::Action::await_change())
    );
    assert_eq!(
        lines(&seen),
        [
            format!("POST /apis/events.k8s.io/v1{NS}/events"),
            format!("PATCH /apis/serving.moe.dev/v1alpha1{NS}/moedeployments/tiny/status"),
        ]
    );
    assert_eq!(seen[0].body["type"], "Warning");
    assert_eq!(seen[0].body["reason"], "InvalidSpec");
    let note = seen[0].body["note"].as_str().unwrap();
    assert!(
        note.contains("spec.model.source.synthetic.preset"),
        "{note}"
    );
}

#[tokio::test]
async fn a_settled_deployment_writes_nothing_new() {
    // First pass: learn the status the operator writes.
    let world = World {
        ready: true,
        stale_shard: false,
        monitoring: false,
    };
    let (_, seen) = reconcile(tiny(), world).await;
    let status: moe_operator::crd::MoEDeploymentStatus =
        serde_json::from_value(seen.last().unwrap().body["status"].clone()).unwrap();
    // Second pass with that status: applies and prune lists only; no Event, no status write.
    let mut md = tiny();
    md.status = Some(status);
    let (result, seen) = reconcile(md, world).await;
    result.unwrap();
    let mut want = expected_applies();
    want.extend(expected_lists());
    assert_eq!(lines(&seen), want);
}

#[tokio::test]
async fn a_later_reconcile_applies_only_the_workloads_and_lists_nothing() {
    let world = World {
        ready: true,
        stale_shard: false,
        monitoring: false,
    };
    let cache = AppliedCache::default();
    let (result, _) = reconcile_with(tiny(), world, cache.clone()).await;
    result.unwrap();
    // Same spec: the workloads are applied (their answer is the live status); the rest, and
    // the prune lists, are skipped.
    let (result, seen) = reconcile_with(tiny(), world, cache.clone()).await;
    result.unwrap();
    let workloads: Vec<String> = expected_applies()
        .into_iter()
        .filter(|l| l.contains("/statefulsets/") || l.contains("/deployments/"))
        .collect();
    let got: Vec<String> = lines(&seen)
        .into_iter()
        .filter(|l| !l.ends_with("/status") && !l.contains("/events"))
        .collect();
    assert_eq!(got, workloads);
    // A spec change that alters one child re-applies that child.
    let mut md = tiny();
    md.spec.model.dtype = moe_operator::crd::DType::Bf16;
    let (result, seen) = reconcile_with(md, world, cache).await;
    result.unwrap();
    let got = lines(&seen);
    assert!(
        got.iter().any(|l| l.ends_with("/configmaps/tiny-plan")),
        "{got:?}"
    );
    assert!(!got.iter().any(|l| l.contains("/roles/")), "{got:?}");
}

#[tokio::test]
async fn a_pod_monitor_is_applied_where_its_api_is_served_and_not_asked_for_otherwise() {
    let world = World {
        ready: true,
        stale_shard: false,
        monitoring: true,
    };
    let (result, seen) = reconcile(tiny(), world).await;
    result.unwrap();
    let lines = lines(&seen);
    let discovery = "GET /apis/monitoring.coreos.com/v1".to_string();
    let apply = format!("PATCH /apis/monitoring.coreos.com/v1{NS}/podmonitors/tiny-workers");
    assert!(lines.contains(&discovery), "{lines:#?}");
    let at = lines.iter().position(|l| *l == apply).expect("applied");
    let body = &seen[at].body;
    assert_eq!(body["kind"], "PodMonitor");
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], UID);
    assert!(seen[at].query.contains("fieldManager=moe-operator"));

    // Not configured: no discovery call and no PodMonitor.
    let (result, seen) = reconcile(
        tiny(),
        World {
            monitoring: false,
            ..world
        },
    )
    .await;
    result.unwrap();
    let lines = self::lines(&seen);
    assert!(
        !lines.iter().any(|l| l.contains("monitoring.coreos.com")),
        "{lines:#?}"
    );
}
