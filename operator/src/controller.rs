//! Reconciliation of one `MoEDeployment`, as a pipeline: read → validate → build → apply →
//! prune → status. Every write is a server-side apply with one field manager, so re-running a
//! reconcile (a restart, a second operator replica taking over) changes nothing that is already
//! right and creates no duplicates.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::crd::{AutoscalingDriver, MoEDeployment, MoEDeploymentStatus};
use crate::metrics::Metrics;
use crate::resources::{self, Children, LABEL_DEPLOYMENT};
use crate::status::{self, Observed, Part};
use crate::{Error, autoscale, inspect, performance, pki, planning};

/// The one field manager of every write.
pub const MANAGER: &str = "moe-operator";

/// How often a settled deployment is looked at again even without a change.
const RESYNC: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: resources::Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Expert-autoscaling decisions by `MoEDeployment` uid (driver `operator`).
    pub autoscale: Arc<autoscale::Store>,
    /// What the gateways measured, by `MoEDeployment` uid (`status.performance`).
    pub performance: Arc<performance::Store>,
    /// What recent reconciles applied, so that the next ones skip what has not changed.
    pub applied: AppliedCache,
    /// Whether the cluster serves the PodMonitor API (looked up again every minute).
    pub monitoring: ServedApi,
}

/// Whether an optional API (the Prometheus Operator's PodMonitor) is served, remembered for a
/// minute: installing its CRD later is noticed without a discovery call per reconcile.
#[derive(Debug, Default)]
pub struct ServedApi(Mutex<Option<(bool, Instant)>>);

impl ServedApi {
    const TTL: Duration = Duration::from_secs(60);

    pub async fn pod_monitors(&self, client: &Client) -> bool {
        if let Some((served, at)) = *self.0.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < Self::TTL
        {
            return served;
        }
        let served = match client
            .list_api_group_resources("monitoring.coreos.com/v1")
            .await
        {
            Ok(list) => list.resources.iter().any(|r| r.name == "podmonitors"),
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(e) => {
                // Unknown: try again on the next reconcile; nothing is applied meanwhile.
                warn!(error = %e, "cannot tell whether the PodMonitor API is served");
                return false;
            }
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((served, Instant::now()));
        served
    }
}

/// What the operator last applied for each `MoEDeployment` (by uid): a hash of every child's
/// desired state, by `Kind/name`. A reconcile (most are triggered by the
/// workloads' status moving) then server-side applies only the workloads, whose live status
/// it needs anyway, and children whose desired state changed, and lists for pruning only when
/// the set of children changed. Every `RESYNC`, and after an error or an operator restart,
/// everything is applied and pruned again, which also undoes hand edits of unwatched children.
#[derive(Debug, Default, Clone)]
pub struct AppliedCache(Arc<Mutex<HashMap<String, AppliedRecord>>>);

#[derive(Debug, Clone)]
struct AppliedRecord {
    hashes: HashMap<String, u64>,
    since: Instant,
    /// Unix seconds until which the workers' certificate is known current (0: unknown).
    tls_until: i64,
}

impl AppliedCache {
    /// The record of `uid` while it is younger than `RESYNC`.
    fn fresh(&self, uid: &str) -> Option<AppliedRecord> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, r| r.since.elapsed() < RESYNC * 2);
        map.get(uid).filter(|r| r.since.elapsed() < RESYNC).cloned()
    }

    fn store(&self, uid: &str, record: AppliedRecord) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(uid.to_string(), record);
    }

    fn forget(&self, uid: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(uid);
    }
}

/// `Kind/name`: a child's key in an [`AppliedRecord`].
fn child_key<K: Child>(obj: &K) -> String {
    format!("{}/{}", short_kind::<K>(), obj.name_any())
}

fn desired_hash<K: Serialize>(obj: &K) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_string(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Why a reconcile failed (the spec being invalid is not a failure: it is reported in status).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{action} {kind} {name}: {source}")]
    Kube {
        action: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Build(#[from] Error),
}

impl ReconcileError {
    /// A short label for metrics: which step failed.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { action, .. } => action,
            Self::Build(_) => "build",
        }
    }
}

fn kube_err(
    action: &'static str,
    kind: &'static str,
    name: &str,
) -> impl FnOnce(kube::Error) -> ReconcileError {
    let name = name.to_string();
    move |source| ReconcileError::Kube {
        action,
        kind,
        name,
        source,
    }
}

/// What the operator applies: a namespaced object it can send and read back.
pub trait Child:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// Server-side apply of one object in `ns`; the answer carries the object's current status.
async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, ReconcileError>
where
    K: Child,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(kube_err("apply", short_kind::<K>(), &name))
}

fn short_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    // `K::kind` is a Cow of a static str for every k8s-openapi type.
    match K::kind(&()).as_ref() {
        "StatefulSet" => "StatefulSet",
        "Deployment" => "Deployment",
        "Service" => "Service",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "ConfigMap" => "ConfigMap",
        "ServiceAccount" => "ServiceAccount",
        "Role" => "Role",
        "RoleBinding" => "RoleBinding",
        "NetworkPolicy" => "NetworkPolicy",
        "Secret" => "Secret",
        "Job" => "Job",
        _ => "object",
    }
}

/// What apply returned for the workloads: their live status.
struct Applied {
    stages: Vec<StatefulSet>,
    expert_shards: Vec<Deployment>,
    gateway: Deployment,
}

async fn apply_all(
    client: &Client,
    ns: &str,
    c: &Children,
    prev: Option<&AppliedRecord>,
    next: &mut HashMap<String, u64>,
) -> Result<Applied, ReconcileError> {
    /// Applies a child unless `prev` shows this very desired state applied recently.
    async fn put<K>(
        client: &Client,
        ns: &str,
        obj: &K,
        prev: Option<&AppliedRecord>,
        next: &mut HashMap<String, u64>,
    ) -> Result<(), ReconcileError>
    where
        K: Child,
    {
        let key = child_key(obj);
        let hash = desired_hash(obj);
        if prev.and_then(|p| p.hashes.get(&key)) != Some(&hash) {
            apply(client, ns, obj).await?;
        }
        next.insert(key, hash);
        Ok(())
    }
    /// Workloads are always applied: the answer is their live status.
    async fn workload<K>(
        client: &Client,
        ns: &str,
        obj: &K,
        next: &mut HashMap<String, u64>,
    ) -> Result<K, ReconcileError>
    where
        K: Child,
    {
        let live = apply(client, ns, obj).await?;
        next.insert(child_key(obj), desired_hash(obj));
        Ok(live)
    }
    put(client, ns, &c.config_map, prev, next).await?;
    put(client, ns, &c.service_account, prev, next).await?;
    put(client, ns, &c.role, prev, next).await?;
    put(client, ns, &c.role_binding, prev, next).await?;
    for s in &c.services {
        put(client, ns, s, prev, next).await?;
    }
    let mut stages = Vec::with_capacity(c.stages.len());
    for s in &c.stages {
        stages.push(workload(client, ns, s, next).await?);
    }
    let mut expert_shards = Vec::with_capacity(c.expert_shards.len());
    for d in &c.expert_shards {
        expert_shards.push(workload(client, ns, d, next).await?);
    }
    let gateway = workload(client, ns, &c.gateway, next).await?;
    for p in &c.pdbs {
        put(client, ns, p, prev, next).await?;
    }
    put(client, ns, &c.network_policy, prev, next).await?;
    Ok(Applied {
        stages,
        expert_shards,
        gateway,
    })
}

/// Deletes objects of kind `K` this deployment owns that the plan no longer has (a removed
/// stage or expert shard).
async fn prune<K>(
    client: &Client,
    ns: &str,
    md: &MoEDeployment,
    keep: &[String],
) -> Result<(), ReconcileError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = md.name_any();
    let lp = ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={name}"));
    let list = api
        .list_metadata(&lp)
        .await
        .map_err(kube_err("list", short_kind::<K>(), &name))?;
    let uid = md.uid();
    for obj in list.items {
        let owned = obj
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref());
        let child = obj.name_any();
        if owned && !keep.contains(&child) {
            info!(kind = short_kind::<K>(), name = %child, "pruning");
            match api.delete(&child, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kube_err("delete", short_kind::<K>(), &child)(e)),
            }
        }
    }
    Ok(())
}

fn names<K: Resource>(objs: &[K]) -> Vec<String> {
    objs.iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

async fn prune_all(
    client: &Client,
    ns: &str,
    md: &MoEDeployment,
    c: &Children,
) -> Result<(), ReconcileError> {
    prune::<StatefulSet>(client, ns, md, &names(&c.stages)).await?;
    let mut deployments = names(&c.expert_shards);
    deployments.push(c.gateway.name_any());
    prune::<Deployment>(client, ns, md, &deployments).await?;
    prune::<Service>(client, ns, md, &names(&c.services)).await?;
    prune::<PodDisruptionBudget>(client, ns, md, &names(&c.pdbs)).await?;
    Ok(())
}

/// Replicas per expert shard the operator writes; `None` leaves the field to whoever scales
/// the shard (an HPA or KEDA on its scale subresource). With the operator driving, the
/// autoscaler's `decision`; before its first decision, what status last reported (an operator
/// restart must not drop replicas the load needed), within min/max; otherwise `minReplicas`.
pub fn shard_replicas(
    md: &MoEDeployment,
    shards: usize,
    decision: Option<&[i32]>,
) -> Vec<Option<i32>> {
    let e = &md.spec.experts;
    let external = e.autoscaling.enabled
        && matches!(
            e.autoscaling.driver,
            AutoscalingDriver::Hpa | AutoscalingDriver::Keda
        );
    if external {
        return vec![None; shards];
    }
    if autoscale::operator_driven(md) {
        let (lo, hi) = autoscale::bounds(e.min_replicas, e.max_replicas);
        if let Some(d) = decision.filter(|d| d.len() == shards) {
            return d.iter().map(|&r| Some(r.clamp(lo, hi))).collect();
        }
        let prev: Vec<i32> = md
            .status
            .as_ref()
            .map(|s| s.expert_shard_status.iter().map(|x| x.replicas).collect())
            .unwrap_or_default();
        if prev.len() == shards && prev.iter().all(|&r| r > 0) {
            return prev.iter().map(|&r| Some(r.clamp(lo, hi))).collect();
        }
    }
    vec![Some(e.min_replicas); shards]
}

async fn write_status(
    client: &Client,
    md: &MoEDeployment,
    status: &MoEDeploymentStatus,
) -> Result<(), ReconcileError> {
    let ns = md.namespace().unwrap_or_default();
    let api: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": MoEDeployment::api_version(&()),
        "kind": MoEDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &md.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err("status", "MoEDeployment", &md.name_any()))?;
    Ok(())
}

/// Publishes the Events of the move from `prev` to `next` and writes `next` if it differs.
async fn report(
    ctx: &Context,
    md: &MoEDeployment,
    prev: &MoEDeploymentStatus,
    next: &MoEDeploymentStatus,
) -> Result<(), ReconcileError> {
    for t in status::transitions(prev, next) {
        publish(ctx, md, t).await;
    }
    if next != prev {
        write_status(&ctx.client, md, next).await?;
    }
    Ok(())
}

async fn publish(ctx: &Context, md: &MoEDeployment, t: status::Transition) {
    let event = Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: t.reason,
        note: Some(t.message),
        action: "Reconcile".into(),
        secondary: None,
    };
    // An Event that cannot be written is not worth failing the reconcile for.
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        warn!(error = %e, "writing an Event failed");
    }
}

/// A Normal `ExpertsScaled` Event per expert shard whose replicas were just changed by the
/// autoscaler (against what status last reported).
async fn scaled_events(
    ctx: &Context,
    md: &MoEDeployment,
    plan: &moe_plan::SizedPlan,
    prev: &MoEDeploymentStatus,
    applied: &[Option<i32>],
    d: &autoscale::Published,
) {
    if prev.expert_shard_status.len() != applied.len() {
        return;
    }
    for (j, (was, now)) in prev.expert_shard_status.iter().zip(applied).enumerate() {
        let Some(now) = *now else { continue };
        if was.replicas == now || was.replicas == 0 {
            continue;
        }
        let l = &plan.expert_shards[j].layout;
        let load = d.tokens_per_second.get(j).copied().unwrap_or(0.0);
        let why = d.last_change.as_deref().unwrap_or(&d.reason);
        let note = format!(
            "expert shard {j} (layers {}..{}, experts {:?}): {} → {} replicas at {load:.0} tok/s: {why}",
            l.layer_start, l.layer_end, l.experts, was.replicas, now
        );
        info!(shard = j, from = was.replicas, to = now, "{note}");
        ctx.metrics.observe_scaling(
            &md.namespace().unwrap_or_default(),
            &md.name_any(),
            was.replicas,
            now,
        );
        // An Event's note holds at most 1 kB.
        let note: String = note.chars().take(1000).collect();
        let event = Event {
            type_: EventType::Normal,
            reason: "ExpertsScaled".into(),
            note: Some(note),
            action: "Scale".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
            warn!(error = %e, "writing an Event failed");
        }
    }
}

/// One reconcile of `md`.
pub async fn reconcile(
    md: Arc<MoEDeployment>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(|e| e.kind()));
    result
}

#[tracing::instrument(skip_all, fields(name = %md.name_any(), namespace = md.namespace().unwrap_or_default(), generation = md.metadata.generation.unwrap_or(0)))]
async fn reconcile_inner(md: &MoEDeployment, ctx: &Context) -> Result<Action, ReconcileError> {
    // Being deleted: owner references let the garbage collector remove every child.
    if md.metadata.deletion_timestamp.is_some() {
        if let Some(uid) = md.uid() {
            ctx.applied.forget(&uid);
        }
        ctx.metrics
            .forget(&md.namespace().unwrap_or_default(), &md.name_any());
        return Ok(Action::await_change());
    }
    let ns = md.namespace().unwrap_or_default();
    let generation = md.metadata.generation.unwrap_or(0);
    let prev = md.status.clone().unwrap_or_default();

    // The architecture: from the spec, or read from the checkpoint by a Job.
    let read = match inspect::resolve(&ctx.client, md, &ctx.config).await? {
        inspect::Resolution::FromSpec => None,
        inspect::Resolution::Read(m) => Some(m),
        inspect::Resolution::Pending {
            reason,
            message,
            requeue,
        } => {
            let next =
                status::architecture_pending(&prev, generation, reason, message, Timestamp::now());
            report(ctx, md, &prev, &next).await?;
            return Ok(Action::requeue(requeue));
        }
    };
    let with_read;
    let md = match &read {
        Some(m) => {
            let mut copy = md.clone();
            copy.spec.model.architecture = m.architecture.clone();
            with_read = copy;
            &with_read
        }
        None => md,
    };

    // Validate: the API server's schema and CEL rules catch most mistakes; what needs the
    // planner (memory, GPU fit, presets) is caught here and reported, without retrying until
    // the spec changes.
    let plan = match resources::checked_name(md).and_then(|_| Ok(planning::plan(&md.spec)?)) {
        Ok(plan) => plan,
        Err(e @ Error::Api(moe_api::Error::Invalid { .. })) => {
            let mut next = status::invalid(&prev, generation, e.to_string(), Timestamp::now());
            // The workloads of the last valid generation keep serving: so does their measure.
            next.conditions.extend(
                status::find(&prev.conditions, performance::CONDITION)
                    .cloned()
                    .filter(|_| next.performance.is_some()),
            );
            status::with_model(
                &mut next,
                &prev,
                read.as_ref(),
                generation,
                Timestamp::now(),
            );
            report(ctx, md, &prev, &next).await?;
            warn!(error = %e, "invalid spec");
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e.into()),
    };

    // Build.
    let mut children = resources::build(md, &plan, &ctx.config)?;
    let decision = autoscale::operator_driven(md)
        .then(|| md.uid().and_then(|uid| ctx.autoscale.decision(&uid)))
        .flatten()
        .filter(|d| d.desired.len() == plan.expert_shards.len());
    let replicas = shard_replicas(
        md,
        plan.expert_shards.len(),
        decision.as_ref().map(|d| d.desired.as_slice()),
    );
    for (d, r) in children
        .expert_shards
        .iter_mut()
        .zip(replicas.iter().copied())
    {
        d.spec.replicas = r;
    }

    // Apply, then prune what the plan no longer has (only needed when the set of children
    // changed, or for the periodic full pass).
    let uid = md.uid().unwrap_or_default();
    let prev_applied = ctx.applied.fresh(&uid);
    // The workers' certificates first: pods mount them. Checked on a full pass and when due.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let tls_until = match prev_applied.as_ref().map(|p| p.tls_until) {
        _ if md.spec.serving.plaintext => 0,
        Some(until) if now < until => until,
        _ => ensure_worker_tls(&ctx.client, &ns, md, now).await?,
    };
    // Until this pass has applied everything, nothing may be skipped (an error midway).
    ctx.applied.forget(&uid);
    let mut hashes = HashMap::new();
    let applied = apply_all(
        &ctx.client,
        &ns,
        &children,
        prev_applied.as_ref(),
        &mut hashes,
    )
    .await?;
    // Only asked when the operator creates PodMonitors at all.
    let monitors = children.pod_monitor.is_some() && ctx.monitoring.pod_monitors(&ctx.client).await;
    if monitors && let Some(pm) = &children.pod_monitor {
        let key = format!("PodMonitor/{}", pm.name_any());
        let hash = desired_hash(pm);
        if prev_applied.as_ref().and_then(|p| p.hashes.get(&key)) != Some(&hash) {
            let api: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &ns, &resources::pod_monitor_api());
            api.patch(
                &pm.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(pm),
            )
            .await
            .map_err(kube_err("apply", "PodMonitor", &pm.name_any()))?;
        }
        hashes.insert(key, hash);
    }
    let same_children = prev_applied.as_ref().is_some_and(|p| {
        p.hashes.keys().collect::<BTreeSet<_>>() == hashes.keys().collect::<BTreeSet<_>>()
    });
    if !same_children {
        prune_all(&ctx.client, &ns, md, &children).await?;
    }
    ctx.applied.store(
        &uid,
        AppliedRecord {
            hashes,
            since: prev_applied.map_or_else(Instant::now, |p| p.since),
            tls_until,
        },
    );

    // Status from what the workloads report.
    let observed = Observed {
        stages: applied.stages.iter().map(Part::from_stateful_set).collect(),
        expert_shards: applied
            .expert_shards
            .iter()
            .map(Part::from_deployment)
            .collect(),
        gateway: Part::from_deployment(&applied.gateway),
    };
    if let Some(d) = &decision {
        scaled_events(ctx, md, &plan, &prev, &replicas, d).await;
    }
    ctx.metrics.observe_shards(
        &ns,
        &md.name_any(),
        &crate::metrics::ShardsSeen {
            desired: applied
                .expert_shards
                .iter()
                .map(|d| d.spec.replicas.unwrap_or(1))
                .collect(),
            ready: applied
                .expert_shards
                .iter()
                .map(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.ready_replicas)
                        .unwrap_or(0)
                })
                .collect(),
            autoscaler: decision.as_ref().map(|d| {
                let p = autoscale::Params::from_spec(&md.spec.experts, d.desired.len());
                let (_, max) =
                    autoscale::bounds(md.spec.experts.min_replicas, md.spec.experts.max_replicas);
                (
                    autoscale::imbalance(&d.tokens_per_second, &d.desired),
                    autoscale::at_budget(&p, &d.tokens_per_second, &d.desired, max),
                )
            }),
        },
    );
    let endpoint = format!("{}.{ns}.svc:80", md.name_any());
    let mut next = status::compute(
        &prev,
        generation,
        &plan,
        &observed,
        endpoint,
        Timestamp::now(),
    );
    match &decision {
        Some(d) => status::with_autoscaling(&mut next, d),
        // Until the autoscaler has sampled (an operator restart), keep what status showed.
        None if autoscale::operator_driven(md) => {
            next.autoscaling = prev.autoscaling.clone();
        }
        None => {}
    }
    status::with_model(
        &mut next,
        &prev,
        read.as_ref(),
        generation,
        Timestamp::now(),
    );
    // The plan's estimate next to what the gateways measured (never fails the reconcile).
    let (perf, verdict) =
        performance::status(&prev, md, &plan, ctx.performance.snapshot(&uid).as_ref());
    status::with_performance(
        &mut next,
        &prev,
        perf,
        &verdict,
        generation,
        Timestamp::now(),
    );
    report(ctx, md, &prev, &next).await?;
    Ok(Action::requeue(RESYNC))
}

/// Makes sure the deployment's CA exists, takes the CA rotation step that is due (if any), and
/// keeps the worker certificate current (issued by the signing CA, with the CA set's bundle,
/// not yet due for renewal); applies what changed. Returns when the certificate or the CA is
/// next due (Unix seconds).
async fn ensure_worker_tls(
    client: &Client,
    ns: &str,
    md: &MoEDeployment,
    now: i64,
) -> Result<i64, ReconcileError> {
    use k8s_openapi::api::core::v1::Secret;
    let name = md.name_any();
    let owner = md
        .controller_owner_ref(&())
        .ok_or_else(|| Error::invalid("metadata.uid", "the object has no uid yet"))?;
    let labels = std::collections::BTreeMap::from([
        (resources::LABEL_DEPLOYMENT.to_string(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            resources::MANAGED_BY.to_string(),
        ),
    ]);
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let ca_name = pki::ca_secret_name(&name);
    let stored = api
        .get_opt(&ca_name)
        .await
        .map_err(kube_err("get", "Secret", &ca_name))?;
    let certs_err =
        |what: &'static str| move |e: moe_certs::Error| Error::invalid(what, e.to_string());
    let (mut state, mut changed) = match stored.as_ref().and_then(|s| pki::stored_ca(s, now)) {
        // A Secret from before CA rotations gets its rotation clock written.
        Some(state) => {
            let annotated = stored
                .as_ref()
                .and_then(|s| s.metadata.annotations.as_ref())
                .is_some_and(|a| a.contains_key(pki::CA_ROTATE_AFTER));
            (state, !annotated)
        }
        None => {
            info!(%name, "issuing the deployment's worker CA");
            (
                pki::CaState::generate(now).map_err(certs_err("worker CA"))?,
                true,
            )
        }
    };
    if let Some(step) = state.advance(now).map_err(certs_err("worker CA"))? {
        info!(%name, ?step, "worker CA rotation step");
        changed = true;
    }
    if changed {
        apply(
            client,
            ns,
            &pki::ca_secret(&name, ns, &labels, &owner, &state),
        )
        .await?;
    }
    let bundle = state.set.bundle();
    let tls_name = pki::tls_secret_name(&name);
    let current = api
        .get_opt(&tls_name)
        .await
        .map_err(kube_err("get", "Secret", &tls_name))?;
    let renews_at = if pki::tls_due(current.as_ref(), &bundle, now) {
        let ca = state.set.authority().map_err(certs_err("worker CA"))?;
        let (cert, key) = ca
            .issue(&name, pki::WORKER_CERT_HOURS)
            .map_err(certs_err("worker certificate"))?;
        let at = pki::renew_after(now, pki::WORKER_CERT_HOURS);
        let secret = pki::tls_secret(&name, ns, &labels, &owner, &bundle, (&cert, &key), at);
        apply(client, ns, &secret).await?;
        info!(%name, "issued the workers' certificate");
        at
    } else {
        current.as_ref().and_then(pki::renews_at).unwrap_or(now)
    };
    Ok(renews_at.min(state.next_step_at()))
}

/// After a failed reconcile: retry soon, without hot-looping.
pub fn error_policy(md: Arc<MoEDeployment>, e: &ReconcileError, _ctx: Arc<Context>) -> Action {
    warn!(name = %md.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
