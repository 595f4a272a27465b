//! Builders: from a `MoEDeployment` and its plan to the Kubernetes objects it owns. Pure
//! functions (no API calls), so every object is unit-tested and the reconciler only applies them.
//!
//! Per deployment `NAME`:
//!
//! | object | name | purpose |
//! | --- | --- | --- |
//! | ConfigMap | `NAME-plan` | the plan as JSON (`plan.json`), for people and tools |
//! | ServiceAccount, Role, RoleBinding | `NAME-worker` | workers read EndpointSlices (discovery) |
//! | Service (headless) | `NAME-stage-S` | one per stage: the StatefulSet's governing Service |
//! | Service (headless) | `NAME-experts` | every expert-shard replica (stages discover them) |
//! | Service | `NAME` | the gateway's HTTP endpoint |
//! | StatefulSet | `NAME-stage-S` | pipeline stage S (layers, attention, KV cache) |
//! | Deployment | `NAME-expert-J` | expert shard J; its replica count is what autoscaling moves |
//! | Deployment | `NAME-gateway` | OpenAI-compatible HTTP, batching, sampling |
//! | PodDisruptionBudget | `NAME-stages`, `NAME-expert-J`, `NAME-gateway` | one voluntary disruption at a time |
//! | NetworkPolicy | `NAME-workers` | only this deployment's pods reach worker gRPC ports |
//!
//! Discovery needs no cluster DNS: workers are given `kube:SERVICE:PORT` addresses and resolve
//! them to the ready pod addresses of that Service's EndpointSlices.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    GRPCAction, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use moe_plan::{PodSizing, SizedPlan};

use crate::crd::{ExpertShardOverride, MoEDeployment};
use crate::error::{Error, Result};
pub use moe_api::workers::{MAX_NAME_LEN, WorkerRole, expert_name, gateway_name, stage_name};

/// How long a terminating expert replica keeps serving (see `moe-worker --drain-ms`): stages
/// stop sending a terminating replica work once its endpoint turns unready, which takes the
/// EndpointSlice a moment.
pub const EXPERT_DRAIN_MS: u32 = 3000;

/// The deployment's name, checked: derived names must be DNS labels.
pub fn checked_name(md: &MoEDeployment) -> Result<String> {
    Ok(moe_api::workers::checked_name(md)?)
}

/// gRPC port of stages and expert shards.
pub const GRPC_PORT: i32 = 50051;
/// HTTP port of the gateway (API, health, metrics).
pub const HTTP_PORT: i32 = 8000;
/// Stages and expert shards serve `grpc.health.v1` alone in plaintext here, for the kubelet's
/// gRPC probes (which cannot present the deployment's client certificate).
pub const HEALTH_PORT: i32 = 50052;
/// Plaintext `/metrics` of stages and expert shards (the gateway's are on its HTTP port).
pub const METRICS_PORT: i32 = 9090;
/// Non-root user the workers run as.
pub const RUN_AS: i64 = 65532;
/// Where a PersistentVolumeClaim's checkpoint is mounted.
const MODEL_MOUNT: &str = "/models";

pub const LABEL_DEPLOYMENT: &str = "serving.moe.dev/deployment";
pub const LABEL_ROLE: &str = "serving.moe.dev/role";
pub const LABEL_STAGE: &str = "serving.moe.dev/stage";
pub const LABEL_SHARD: &str = "serving.moe.dev/expert-shard";
pub const MANAGED_BY: &str = "moe-operator";

/// What the operator is configured with (not per deployment).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Worker image when the spec has none.
    pub worker_image: String,
    /// Secrets (in each MoEDeployment's namespace) the worker pods pull their image with.
    pub image_pull_secrets: Vec<String>,
    /// A PodMonitor per deployment (applied only where the cluster serves the API).
    pub pod_monitor: Option<PodMonitorConfig>,
}

/// What every deployment's PodMonitor carries besides its selector and endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMonitorConfig {
    /// Labels a Prometheus selects PodMonitors by (e.g. `release: kube-prometheus-stack`).
    pub labels: BTreeMap<String, String>,
    /// Scrape interval (`15s`); empty: Prometheus's own.
    pub interval: String,
}

/// The target labels every worker sample gets from its pod, for dashboards and alerts to
/// select one deployment, role, stage or expert shard (besides `namespace` and `pod`).
pub const TARGET_LABELS: [(&str, &str); 4] = [
    (LABEL_DEPLOYMENT, "moe_deployment"),
    (LABEL_ROLE, "moe_role"),
    (LABEL_STAGE, "moe_stage"),
    (LABEL_SHARD, "moe_expert_shard"),
];

/// Every object one `MoEDeployment` owns, in the order they are applied: what others refer to
/// comes first (identity, discovery Services), then the workloads, then policy.
#[derive(Debug, Clone, Default)]
pub struct Children {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub services: Vec<Service>,
    pub stages: Vec<StatefulSet>,
    /// One per expert shard, in shard order.
    pub expert_shards: Vec<Deployment>,
    pub gateway: Deployment,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub network_policy: NetworkPolicy,
    /// `monitoring.coreos.com/v1` PodMonitor of every worker pod, when configured.
    pub pod_monitor: Option<kube::api::DynamicObject>,
}

pub fn experts_service(md: &str) -> String {
    format!("{md}-experts")
}

pub fn worker_account(md: &str) -> String {
    format!("{md}-worker")
}

pub fn plan_config_map(md: &str) -> String {
    format!("{md}-plan")
}

/// Labels every owned object carries; `LABEL_DEPLOYMENT` is what pruning selects on.
pub fn common_labels(md: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "moe-serve".into()),
        ("app.kubernetes.io/instance".into(), md.into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
        (LABEL_DEPLOYMENT.into(), md.into()),
    ])
}

/// The selector of one role's pods (plus the stage or shard index).
fn selector(md: &str, role: WorkerRole, index: Option<(&str, usize)>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([
        (LABEL_DEPLOYMENT.to_string(), md.to_string()),
        (LABEL_ROLE.to_string(), role.as_str().to_string()),
    ]);
    if let Some((key, i)) = index {
        m.insert(key.to_string(), i.to_string());
    }
    m
}

fn labels(md: &str, role: WorkerRole, index: Option<(&str, usize)>) -> BTreeMap<String, String> {
    let mut m = common_labels(md);
    m.insert("app.kubernetes.io/component".into(), role.as_str().into());
    m.extend(selector(md, role, index));
    m
}

struct Ctx<'a> {
    md: &'a MoEDeployment,
    name: String,
    namespace: String,
    owner: OwnerReference,
    plan: &'a SizedPlan,
    image: String,
    image_pull_secrets: &'a [String],
}

impl Ctx<'_> {
    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Builds every child of `md` for `plan`.
pub fn build(md: &MoEDeployment, plan: &SizedPlan, config: &Config) -> Result<Children> {
    let name = checked_name(md)?;
    let namespace = md
        .namespace()
        .ok_or_else(|| Error::invalid("metadata.namespace", "a MoEDeployment is namespaced"))?;
    let owner = md
        .controller_owner_ref(&())
        .ok_or_else(|| Error::invalid("metadata.uid", "the object has no uid yet"))?;
    let image = md
        .spec
        .image
        .clone()
        .unwrap_or_else(|| config.worker_image.clone());
    let cx = Ctx {
        md,
        name,
        namespace,
        owner,
        plan,
        image,
        image_pull_secrets: &config.image_pull_secrets,
    };
    let n = &cx.name;
    let has_shards = !plan.expert_shards.is_empty();

    let mut services: Vec<Service> = (0..plan.stages.len())
        .map(|s| {
            headless_service(
                &cx,
                stage_name(n, s),
                WorkerRole::Stage,
                Some((LABEL_STAGE, s)),
            )
        })
        .collect();
    if has_shards {
        services.push(headless_service(
            &cx,
            experts_service(n),
            WorkerRole::Expert,
            None,
        ));
    }
    services.push(gateway_service(&cx));

    let stages = (0..plan.stages.len()).map(|s| stage(&cx, s)).collect();
    let expert_shards = (0..plan.expert_shards.len())
        .map(|j| expert_shard(&cx, j))
        .collect();

    let mut pdbs = vec![pdb(
        &cx,
        format!("{n}-stages"),
        selector(n, WorkerRole::Stage, None),
    )];
    pdbs.extend((0..plan.expert_shards.len()).map(|j| {
        pdb(
            &cx,
            expert_name(n, j),
            selector(n, WorkerRole::Expert, Some((LABEL_SHARD, j))),
        )
    }));
    pdbs.push(pdb(
        &cx,
        gateway_name(n),
        selector(n, WorkerRole::Gateway, None),
    ));

    Ok(Children {
        config_map: config_map(&cx)?,
        service_account: ServiceAccount {
            metadata: cx.meta(worker_account(n), common_labels(n)),
            ..ServiceAccount::default()
        },
        role: worker_role(&cx),
        role_binding: worker_role_binding(&cx),
        services,
        stages,
        expert_shards,
        gateway: gateway(&cx),
        pdbs,
        network_policy: network_policy(&cx),
        pod_monitor: config
            .pod_monitor
            .as_ref()
            .map(|c| pod_monitor(&cx, c))
            .transpose()?,
    })
}

/// The PodMonitor API, for applying with a dynamic client.
pub fn pod_monitor_api() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "PodMonitor".into(),
        plural: "podmonitors".into(),
    }
}

pub fn pod_monitor_name(md: &str) -> String {
    format!("{md}-workers")
}

/// One PodMonitor for every worker pod of the deployment: the gateways' `http` port and the
/// stages' and expert shards' `metrics` port, with the pods' deployment, role, stage and shard
/// labels as target labels (see [`TARGET_LABELS`]).
fn pod_monitor(cx: &Ctx, c: &PodMonitorConfig) -> Result<kube::api::DynamicObject> {
    let n = &cx.name;
    let mut labels = common_labels(n);
    labels.extend(c.labels.clone());
    let relabelings: Vec<serde_json::Value> = TARGET_LABELS
        .iter()
        .map(|(pod_label, target)| {
            serde_json::json!({
                "action": "replace",
                "sourceLabels": [format!("__meta_kubernetes_pod_label_{}", sanitize(pod_label))],
                "targetLabel": target,
            })
        })
        .collect();
    let endpoint = |port: &str| {
        let mut e = serde_json::json!({
            "port": port,
            "path": "/metrics",
            "scheme": "http",
            "relabelings": relabelings,
        });
        if !c.interval.is_empty() {
            e["interval"] = c.interval.clone().into();
        }
        e
    };
    let mut obj = kube::api::DynamicObject::new(&pod_monitor_name(n), &pod_monitor_api())
        .within(&cx.namespace);
    obj.metadata = cx.meta(pod_monitor_name(n), labels);
    obj.data = serde_json::json!({
        "spec": {
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: n}},
            "podMetricsEndpoints": [endpoint("http"), endpoint("metrics")],
        }
    });
    Ok(obj)
}

/// A label name as Prometheus's Kubernetes discovery spells it in `__meta_*` labels.
pub fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn config_map(cx: &Ctx) -> Result<ConfigMap> {
    let json = serde_json::to_string_pretty(cx.plan).map_err(|e| Error::Encode {
        what: "plan",
        message: e.to_string(),
    })?;
    Ok(ConfigMap {
        metadata: cx.meta(plan_config_map(&cx.name), common_labels(&cx.name)),
        data: Some(BTreeMap::from([("plan.json".to_string(), json)])),
        ..ConfigMap::default()
    })
}

/// Workers resolve `kube:SERVICE:PORT` addresses from EndpointSlices: read-only, in their own
/// namespace, nothing else.
fn worker_role(cx: &Ctx) -> Role {
    Role {
        metadata: cx.meta(worker_account(&cx.name), common_labels(&cx.name)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".into()]),
            resources: Some(vec!["endpointslices".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

fn worker_role_binding(cx: &Ctx) -> RoleBinding {
    let account = worker_account(&cx.name);
    RoleBinding {
        metadata: cx.meta(account.clone(), common_labels(&cx.name)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account,
            namespace: Some(cx.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// A headless Service: EndpointSlices of ready pods, no virtual IP. Not-ready pods are left out,
/// so a worker only ever dials peers whose health probe passes.
fn headless_service(
    cx: &Ctx,
    name: String,
    role: WorkerRole,
    index: Option<(&str, usize)>,
) -> Service {
    Service {
        metadata: cx.meta(name, labels(&cx.name, role, index)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(&cx.name, role, index)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: GRPC_PORT,
                target_port: Some(IntOrString::String("grpc".into())),
                app_protocol: Some("kubernetes.io/h2c".into()),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(false),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn gateway_service(cx: &Ctx) -> Service {
    Service {
        metadata: cx.meta(cx.name.clone(), labels(&cx.name, WorkerRole::Gateway, None)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector(&cx.name, WorkerRole::Gateway, None)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The pull secrets of a pod, by name (`None` when there are none).
pub fn pull_secrets(
    names: &[String],
) -> Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>> {
    (!names.is_empty()).then(|| {
        names
            .iter()
            .map(|name| k8s_openapi::api::core::v1::LocalObjectReference { name: name.clone() })
            .collect()
    })
}

/// Every container of the operator's pods: non-root, read-only root, no privilege, no
/// capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Node selector and tolerations of `md`'s pods: the spec's placement, plus, for pods that go
/// to GPU nodes, the GPU product label and a toleration of the GPU taint (GPU nodes are
/// commonly tainted so that only GPU workloads land there).
pub fn gpu_placement(
    md: &MoEDeployment,
    on_gpu_nodes: bool,
) -> (BTreeMap<String, String>, Vec<Toleration>) {
    let placement = &md.spec.placement;
    let mut node_selector = placement.node_selector.clone();
    let mut tolerations = placement.tolerations.clone();
    if on_gpu_nodes {
        node_selector
            .entry("nvidia.com/gpu.product".into())
            .or_insert_with(|| placement.gpu_product.clone());
        if !tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
        {
            tolerations.push(Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            });
        }
    }
    (node_selector, tolerations)
}

/// `--model` for a worker of `md`, and the volume that holds the checkpoint (none for a
/// synthetic model).
pub fn model_source(md: &MoEDeployment) -> (String, Option<(Volume, VolumeMount)>) {
    source_arg(&md.spec.model.source)
}

/// `--model` for a worker reading `source`, and its volume.
fn source_arg(source: &crate::crd::ModelSource) -> (String, Option<(Volume, VolumeMount)>) {
    if let Some(s) = &source.synthetic {
        return (format!("synthetic:{}:{}", s.preset, s.seed), None);
    }
    if let Some(h) = &source.host_path {
        let volume = Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: h.path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        };
        let mount = VolumeMount {
            name: "model".into(),
            mount_path: h.path.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        };
        return (h.path.clone(), Some((volume, mount)));
    }
    let pvc = source.pvc.clone().unwrap_or_else(|| crate::crd::PvcSource {
        claim_name: String::new(),
        path: None,
    });
    let dir = match pvc.path.as_deref().map(|p| p.trim_matches('/')) {
        Some(p) if !p.is_empty() => format!("{MODEL_MOUNT}/{p}"),
        _ => MODEL_MOUNT.to_string(),
    };
    let volume = Volume {
        name: "model".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.claim_name,
            read_only: Some(true),
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "model".into(),
        mount_path: MODEL_MOUNT.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (dir, Some((volume, mount)))
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn grpc_probe(period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: HEALTH_PORT,
            service: None,
            mode: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Requests and limits: CPU and memory from the spec (or modest defaults), GPUs from the plan.
fn resources(cx: &Ctx, pod: &PodSizing, own: Option<&ExpertShardOverride>) -> ResourceRequirements {
    let base = own
        .and_then(|o| o.resources.as_ref())
        .or(cx.md.spec.resources.as_ref());
    let mut r = base.cloned().unwrap_or_else(|| {
        let q = |s: &str| Quantity(s.into());
        ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), q("1")),
                ("memory".into(), q("2Gi")),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), q("8Gi"))])),
            ..ResourceRequirements::default()
        }
    });
    if pod.gpus > 0 {
        let gpus = Quantity(pod.gpus.to_string());
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus.clone());
        r.requests
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus);
    }
    r
}

/// The pod template every worker shares; `role` decides ports and probes.
fn pod_template(
    cx: &Ctx,
    role: WorkerRole,
    index: Option<(&str, usize)>,
    args: Vec<String>,
    pod: &PodSizing,
    own: Option<&ExpertShardOverride>,
) -> PodTemplateSpec {
    let (model, model_volume) = source_arg(
        own.and_then(|o| o.source.as_ref())
            .unwrap_or(&cx.md.spec.model.source),
    );
    let mut args = args;
    args.splice(1..1, ["--model".to_string(), model]);
    if let Some(t) = &cx.md.spec.model.tokenizer {
        args.extend(["--tokenizer".to_string(), t.clone()]);
    }

    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    if let Some((v, m)) = model_volume {
        volumes.push(v);
        mounts.push(m);
    }
    if cx.md.spec.serving.plaintext {
        args.push("--plaintext".into());
    } else {
        volumes.push(Volume {
            name: "worker-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(crate::pki::tls_secret_name(&cx.name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "worker-tls".into(),
            mount_path: crate::pki::TLS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        args.extend(["--tls-dir".to_string(), crate::pki::TLS_MOUNT.into()]);
    }
    if role != WorkerRole::Gateway {
        args.extend([
            "--health-listen".to_string(),
            format!("0.0.0.0:{HEALTH_PORT}"),
            "--metrics-listen".to_string(),
            format!("0.0.0.0:{METRICS_PORT}"),
        ]);
    }

    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        EnvVar {
            name: "MOE_LOG".into(),
            value: Some("info".into()),
            ..EnvVar::default()
        },
    ];
    let (ports, readiness, liveness, startup) = match role {
        WorkerRole::Gateway => {
            if let Some(key) = &cx.md.spec.serving.api_key_secret {
                env.push(EnvVar {
                    name: "MOE_API_KEY".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: key.name.clone(),
                            key: key.key.clone(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                });
            }
            (
                vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: HTTP_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }],
                http_probe("/readyz", 5, 3),
                http_probe("/healthz", 10, 3),
                http_probe("/healthz", 5, 120),
            )
        }
        WorkerRole::Stage | WorkerRole::Expert => (
            vec![
                ContainerPort {
                    name: Some("grpc".into()),
                    container_port: GRPC_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("health".into()),
                    container_port: HEALTH_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    container_port: METRICS_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
            ],
            grpc_probe(5, 3),
            grpc_probe(10, 3),
            // Loading weights takes a while: up to ten minutes before liveness applies.
            grpc_probe(5, 120),
        ),
    };

    let placement = &cx.md.spec.placement;
    let (node_selector, tolerations) = gpu_placement(cx.md, pod.gpus > 0);

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&cx.name, role, index)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            image_pull_secrets: pull_secrets(cx.image_pull_secrets),
            service_account_name: Some(worker_account(&cx.name)),
            // Stages and gateways watch EndpointSlices to find their peers; expert shards talk
            // to nobody and get no token.
            automount_service_account_token: Some(role != WorkerRole::Expert),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(30),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: role.as_str().into(),
                image: Some(
                    own.and_then(|o| o.image.clone())
                        .unwrap_or_else(|| cx.image.clone()),
                ),
                image_pull_policy: Some("IfNotPresent".into()),
                command: Some(vec!["moe-worker".into()]),
                args: Some(args),
                env: Some(env),
                ports: Some(ports),
                readiness_probe: Some(readiness),
                liveness_probe: Some(liveness),
                startup_probe: Some(startup),
                resources: Some(resources(cx, pod, own)),
                security_context: Some(container_security()),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            affinity: placement.affinity.clone(),
            ..PodSpec::default()
        }),
    }
}

fn kube_addr(service: &str, port: i32) -> String {
    format!("kube:{service}:{port}")
}

/// Arguments of stage `s` (the model is added by `pod_template`): the shared ones, where it
/// listens, and its peers by their Services.
pub fn stage_args(md: &str, plan: &SizedPlan, s: usize, max_sequences: i32) -> Vec<String> {
    let mut args = moe_api::workers::stage_args(&plan.stages[s].layout, max_sequences);
    args.extend(["--listen".to_string(), format!("0.0.0.0:{GRPC_PORT}")]);
    if s + 1 < plan.stages.len() {
        args.extend([
            "--next".to_string(),
            kube_addr(&stage_name(md, s + 1), GRPC_PORT),
        ]);
    }
    if !plan.expert_shards.is_empty() {
        args.extend([
            "--expert-addrs".to_string(),
            kube_addr(&experts_service(md), GRPC_PORT),
        ]);
    }
    args
}

/// Arguments of expert shard `j`.
pub fn expert_args(plan: &SizedPlan, j: usize) -> Vec<String> {
    let mut args = moe_api::workers::expert_args(&plan.expert_shards[j].layout);
    args.extend([
        "--listen".to_string(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--drain-ms".into(),
        EXPERT_DRAIN_MS.to_string(),
    ]);
    args
}

/// Arguments of the gateway.
pub fn gateway_args(md: &str, plan: &SizedPlan, max_sequences: i32) -> Vec<String> {
    let stages: Vec<String> = (0..plan.stages.len())
        .map(|s| kube_addr(&stage_name(md, s), GRPC_PORT))
        .collect();
    let mut args = moe_api::workers::gateway_args(Some(md), max_sequences);
    args.extend([
        "--listen".to_string(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--stage-addrs".into(),
        stages.join(","),
    ]);
    args
}

fn stage(cx: &Ctx, s: usize) -> StatefulSet {
    let name = stage_name(&cx.name, s);
    let index = Some((LABEL_STAGE, s));
    let mut args = stage_args(
        &cx.name,
        cx.plan,
        s,
        cx.md.spec.serving.max_concurrent_sequences,
    );
    args.extend(moe_api::workers::spec_precision_args(cx.md));
    StatefulSet {
        metadata: cx.meta(name.clone(), labels(&cx.name, WorkerRole::Stage, index)),
        spec: StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name),
            // Stages do not depend on each other's start order.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(&cx.name, WorkerRole::Stage, index)),
                ..LabelSelector::default()
            },
            template: pod_template(
                cx,
                WorkerRole::Stage,
                index,
                args,
                &cx.plan.stages[s].pod,
                None,
            ),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

fn expert_shard(cx: &Ctx, j: usize) -> Deployment {
    let index = Some((LABEL_SHARD, j));
    let own = cx
        .md
        .spec
        .experts
        .shards
        .iter()
        .find(|o| usize::try_from(o.shard) == Ok(j));
    let mut args = expert_args(cx.plan, j);
    args.extend(moe_api::workers::spec_precision_args(cx.md));
    Deployment {
        metadata: cx.meta(
            expert_name(&cx.name, j),
            labels(&cx.name, WorkerRole::Expert, index),
        ),
        spec: DeploymentSpec {
            replicas: Some(cx.md.spec.experts.min_replicas),
            selector: LabelSelector {
                match_labels: Some(selector(&cx.name, WorkerRole::Expert, index)),
                ..LabelSelector::default()
            },
            template: pod_template(
                cx,
                WorkerRole::Expert,
                index,
                args,
                &cx.plan.expert_shards[j].pod,
                own,
            ),
            // One replica at a time, a new one ready before an old one stops (and drains):
            // a shard never has fewer ready replicas than it should during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn gateway(cx: &Ctx) -> Deployment {
    // Each gateway replica admits its share of what every stage holds, so the stages accept
    // whatever the gateways admit (during a rolling update old and new replicas overlap: the
    // stages then refuse the excess with a retryable code, and the gateway answers 503).
    let args = gateway_args(
        &cx.name,
        cx.plan,
        moe_api::workers::gateway_max_sequences(cx.md),
    );
    Deployment {
        metadata: cx.meta(
            gateway_name(&cx.name),
            labels(&cx.name, WorkerRole::Gateway, None),
        ),
        spec: DeploymentSpec {
            replicas: Some(cx.md.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(&cx.name, WorkerRole::Gateway, None)),
                ..LabelSelector::default()
            },
            template: pod_template(cx, WorkerRole::Gateway, None, args, &cx.plan.gateway, None),
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn pdb(cx: &Ctx, name: String, match_labels: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cx.meta(name, common_labels(&cx.name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(match_labels),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Worker gRPC ports admit only this deployment's pods; the gateway's HTTP port is open.
fn network_policy(cx: &Ctx) -> NetworkPolicy {
    let n = &cx.name;
    let own_pods = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(LABEL_DEPLOYMENT.into(), n.clone())])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    NetworkPolicy {
        metadata: cx.meta(format!("{n}-workers"), common_labels(n)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(LABEL_DEPLOYMENT.into(), n.clone())])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            // Out: the deployment's own worker ports, and the Kubernetes API (stages and
            // gateways watch EndpointSlices to find their peers; the API server is not a pod,
            // so it is admitted by port). Nothing else: no DNS is needed, peers are dialled by
            // pod address.
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![own_pods.clone()]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(GRPC_PORT)),
                        protocol: Some("TCP".into()),
                        ..NetworkPolicyPort::default()
                    }]),
                },
                NetworkPolicyEgressRule {
                    to: None,
                    ports: Some(
                        [443, 6443]
                            .map(|p| NetworkPolicyPort {
                                port: Some(IntOrString::Int(p)),
                                protocol: Some("TCP".into()),
                                ..NetworkPolicyPort::default()
                            })
                            .to_vec(),
                    ),
                },
            ]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![own_pods]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(GRPC_PORT)),
                        protocol: Some("TCP".into()),
                        ..NetworkPolicyPort::default()
                    }]),
                },
                // From anywhere: the gateways' HTTP (API and /metrics) and the others'
                // /metrics (Prometheus runs in another namespace).
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(
                        [HTTP_PORT, METRICS_PORT]
                            .map(|p| NetworkPolicyPort {
                                port: Some(IntOrString::Int(p)),
                                protocol: Some("TCP".into()),
                                ..NetworkPolicyPort::default()
                            })
                            .to_vec(),
                    ),
                },
            ]),
        }),
    }
}
