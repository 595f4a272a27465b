//! Benchmark of the operator on a real control plane (not a test: it prints figures, each
//! next to a baseline measured in the same run).
//!
//! 1. **apply → Ready** of `examples/tiny.yaml`: from `kubectl apply` until the MoEDeployment is
//!    Ready, against the baseline of applying the very same child objects (rendered by the
//!    operator's own builders, without owner) directly and waiting until every workload is
//!    ready. The difference is what the operator adds: watch latency, planning, status.
//! 2. **50 small MoEDeployments at once**: created concurrently, until each has its children
//!    and a status for its generation (pods stay Pending on a node selector nothing matches, so
//!    the operator, not 250 worker processes, is measured); against the baseline of a client
//!    server-side applying the same 50 sets of children, one task per set. Also the
//!    operator's reconciles, their mean duration, and its memory (resident set now and peak)
//!    before and after.
//!
//! `cargo run -p e2e --bin moe-bench-cluster [-- --deployments N --repeats R]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::Cluster;
use e2e::moe::{self, LABEL_DEPLOYMENT};
use e2e::wait::until;
use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use moe_operator::crd::MoEDeployment;
use moe_operator::resources::{self, Children};

const TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    deployments: usize,
    repeats: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        deployments: 50,
        repeats: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} takes a positive integer"))
        };
        match flag.as_str() {
            "--deployments" => a.deployments = value("--deployments")?.max(1),
            "--repeats" => a.repeats = value("--repeats")?.max(1),
            other => bail!("unknown argument {other:?} (known: --deployments N, --repeats R)"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cluster = Cluster::start().await?;
        let result = bench(&cluster, &args).await;
        cluster.stop().await;
        result
    })
}

async fn bench(cluster: &Cluster, args: &Args) -> Result<()> {
    let client = cluster.client().await?;
    let ns = cluster.namespace("moe-bench").await?;
    moe::install_operator(cluster, &ns, &[]).await?;
    let op = moe::operator_pod(&client, &ns).await?;
    let op_pid = moe::pid(&op).context("operator pid")?;
    let op_ip = op
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("operator ip")?;
    let idle = memory(op_pid)?;
    let tiny = moe_operator::cli::read_manifest(&moe::example("tiny.yaml"))?;

    // 1. apply → Ready, operator vs the same children applied directly.
    let mut operator_s = Vec::new();
    let mut direct_s = Vec::new();
    for i in 0..args.repeats {
        let name = format!("tiny-{i}");
        operator_s.push(apply_to_ready(cluster, &client, &ns, &tiny, &name).await?);
        let name = format!("direct-{i}");
        direct_s.push(children_to_ready(&client, &ns, &tiny, &name).await?);
    }
    let (op_med, direct_med) = (median(&operator_s), median(&direct_s));
    println!(
        "apply → Ready, tiny example ({} runs, median):",
        args.repeats
    );
    println!("  operator (kubectl apply of the MoEDeployment)   {op_med:6.2} s   {operator_s:.2?}");
    println!(
        "  baseline (kubectl apply of its children)        {direct_med:6.2} s   {direct_s:.2?}"
    );
    println!(
        "  ratio operator/baseline                          {:6.2}x",
        op_med / direct_med
    );

    // 2. Many deployments at once.
    let n = args.deployments;
    let before = reconcile_stats(&op_ip).await?;
    let small = unschedulable(&tiny);
    let per_set = count(&render(&small, "probe", &ns)?);
    let t0 = Instant::now();
    let mds: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
    try_join_all((0..n).map(|i| {
        let (mds, mut md) = (mds.clone(), small.clone());
        async move {
            md.metadata.name = Some(format!("small-{i}"));
            mds.create(&PostParams::default(), &md).await
        }
    }))
    .await?;
    until(
        "every small MoEDeployment to be reconciled",
        TIMEOUT,
        || {
            let (mds, client, ns) = (mds.clone(), client.clone(), ns.clone());
            async move { all_reconciled(&mds, &client, &ns, n, per_set).await }
        },
    )
    .await?;
    let operator_many = t0.elapsed().as_secs_f64();
    let after = reconcile_stats(&op_ip).await?;
    let loaded = memory(op_pid)?;
    // The baseline starts from the same quiet cluster: the operator's 50 are deleted and their
    // Pending pods gone first.
    cluster.kubectl(&["-n", &ns, "delete", "moe", "--all", "--wait=true"])?;
    pods_gone(&client, &ns, LABEL_DEPLOYMENT).await?;

    let t0 = Instant::now();
    try_join_all((0..n).map(|i| {
        let (client, ns, small) = (client.clone(), ns.clone(), small.clone());
        async move {
            let children = render(&small, &format!("direct-small-{i}"), &ns)?;
            apply_children(&client, &ns, children).await
        }
    }))
    .await?;
    let direct_many = t0.elapsed().as_secs_f64();

    let reconciles = after.0 - before.0;
    let mean_ms = if reconciles > 0.0 {
        (after.1 - before.1) / reconciles * 1e3
    } else {
        f64::NAN
    };
    println!(
        "{n} small MoEDeployments created at once ({per_set} children each, {} objects):",
        n * per_set
    );
    println!(
        "  operator: all reconciled in {operator_many:6.2} s  ({:.1} deployments/s, {:.0} objects/s)",
        n as f64 / operator_many,
        (n * per_set) as f64 / operator_many
    );
    println!(
        "  baseline: same children applied by a client {direct_many:6.2} s  ({:.0} objects/s)",
        (n * per_set) as f64 / direct_many
    );
    println!(
        "  ratio operator/baseline                       {:6.2}x",
        operator_many / direct_many
    );
    println!(
        "  reconciles: {reconciles:.0} ({:.1} per deployment), mean {mean_ms:.1} ms",
        reconciles / n as f64
    );
    println!(
        "  operator memory: idle RSS {:.1} MiB; with {n} (+{} tiny) RSS {:.1} MiB, peak {:.1} MiB; ratio {:.2}x",
        idle.0,
        args.repeats,
        loaded.0,
        loaded.1,
        loaded.0 / idle.0
    );

    // Clean up: the namespace takes the directly applied children with it.
    cluster.helm(&["uninstall", "moe", "-n", &ns, "--wait"])?;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Resident set now and at its peak, MiB, of a process.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// (reconciles, total reconcile seconds) from the operator's /metrics.
async fn reconcile_stats(ip: &str) -> Result<(f64, f64)> {
    let text = reqwest::get(format!("http://{ip}:8080/metrics"))
        .await?
        .text()
        .await?;
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok((
        sum("moe_operator_reconciles_total"),
        sum("moe_operator_reconcile_duration_seconds_sum"),
    ))
}

/// `tiny` whose pods no node accepts: the operator's work without 5 processes each.
fn unschedulable(tiny: &MoEDeployment) -> MoEDeployment {
    let mut md = tiny.clone();
    md.spec.experts.autoscaling.enabled = false;
    md.spec.placement.node_selector = BTreeMap::from([("moe.dev/bench".into(), "nowhere".into())]);
    md
}

/// The children the operator would make for `md` named `name`, with no owner (nothing would
/// own them) and the label that the operator's own children carry.
fn render(md: &MoEDeployment, name: &str, ns: &str) -> Result<Children> {
    let mut md = md.clone();
    md.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(format!("bench-{name}")),
        ..ObjectMeta::default()
    };
    let plan = moe_operator::planning::plan(&md.spec)?;
    let config = resources::Config {
        worker_image: concat!("ghcr.io/moe-serve/moe-worker:", env!("CARGO_PKG_VERSION")).into(),
        ..resources::Config::default()
    };
    let mut c = resources::build(&md, &plan, &config)?;
    fn strip(m: &mut ObjectMeta) {
        m.owner_references = None;
    }
    strip(&mut c.config_map.metadata);
    strip(&mut c.service_account.metadata);
    strip(&mut c.role.metadata);
    strip(&mut c.role_binding.metadata);
    c.services.iter_mut().for_each(|o| strip(&mut o.metadata));
    c.stages.iter_mut().for_each(|o| strip(&mut o.metadata));
    c.expert_shards
        .iter_mut()
        .for_each(|o| strip(&mut o.metadata));
    strip(&mut c.gateway.metadata);
    c.pdbs.iter_mut().for_each(|o| strip(&mut o.metadata));
    strip(&mut c.network_policy.metadata);
    Ok(c)
}

fn count(c: &Children) -> usize {
    4 + c.services.len() + c.stages.len() + c.expert_shards.len() + 1 + c.pdbs.len() + 1
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<()>
where
    K: moe_operator::controller::Child,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply("moe-bench").force();
    api.patch(&obj.name_any(), &pp, &Patch::Apply(obj)).await?;
    Ok(())
}

/// Server-side applies every child, in the operator's order, one after another.
async fn apply_children(client: &Client, ns: &str, c: Children) -> Result<()> {
    apply(client, ns, &c.config_map).await?;
    apply(client, ns, &c.service_account).await?;
    apply(client, ns, &c.role).await?;
    apply(client, ns, &c.role_binding).await?;
    for o in &c.services {
        apply(client, ns, o).await?;
    }
    for o in &c.stages {
        apply(client, ns, o).await?;
    }
    for o in &c.expert_shards {
        apply(client, ns, o).await?;
    }
    apply(client, ns, &c.gateway).await?;
    for o in &c.pdbs {
        apply(client, ns, o).await?;
    }
    apply(client, ns, &c.network_policy).await
}

/// Seconds from `kubectl apply` of `md` as `name` until it is Ready; then deletes it and waits
/// until its pods are gone.
async fn apply_to_ready(
    cluster: &Cluster,
    client: &Client,
    ns: &str,
    md: &MoEDeployment,
    name: &str,
) -> Result<f64> {
    let mut md = md.clone();
    md.metadata.name = Some(name.into());
    let path = cluster.dir().join(format!("bench-{name}.json"));
    std::fs::write(&path, serde_json::to_vec(&md)?)?;
    let t0 = Instant::now();
    cluster.kubectl(&["-n", ns, "apply", "-f", &path.to_string_lossy()])?;
    moe::wait_ready(client, ns, name, TIMEOUT).await?;
    let took = t0.elapsed().as_secs_f64();
    cluster.kubectl(&["-n", ns, "delete", "moe", name, "--wait=true"])?;
    pods_gone(client, ns, &format!("{LABEL_DEPLOYMENT}={name}")).await?;
    Ok(took)
}

/// Seconds from applying the children of `md` (as `name`) directly until every workload has
/// all its replicas ready; then deletes them and waits until their pods are gone.
async fn children_to_ready(
    client: &Client,
    ns: &str,
    md: &MoEDeployment,
    name: &str,
) -> Result<f64> {
    let children = render(md, name, ns)?;
    let sets: Vec<String> = children.stages.iter().map(|s| s.name_any()).collect();
    let mut deps: Vec<String> = children
        .expert_shards
        .iter()
        .map(|d| d.name_any())
        .collect();
    deps.push(children.gateway.name_any());
    let t0 = Instant::now();
    apply_children(client, ns, children.clone()).await?;
    let ss: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let ds: Api<Deployment> = Api::namespaced(client.clone(), ns);
    until(
        "the directly applied workloads to be ready",
        TIMEOUT,
        || {
            let (ss, ds, sets, deps) = (ss.clone(), ds.clone(), sets.clone(), deps.clone());
            async move {
                for s in &sets {
                    let s = ss.get(s).await?;
                    let want = s.spec.replicas.unwrap_or(1);
                    if s.status.and_then(|x| x.ready_replicas).unwrap_or(0) < want {
                        return Ok(None);
                    }
                }
                for d in &deps {
                    let d = ds.get(d).await?;
                    let want = d.spec.replicas.unwrap_or(1);
                    if d.status.and_then(|x| x.ready_replicas).unwrap_or(0) < want {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await?;
    let took = t0.elapsed().as_secs_f64();
    let dp = DeleteParams::foreground();
    for s in &sets {
        ss.delete(s, &dp).await?;
    }
    for d in &deps {
        ds.delete(d, &dp).await?;
    }
    pods_gone(client, ns, &format!("{LABEL_DEPLOYMENT}={name}")).await?;
    Ok(took)
}

/// Waits until no pod in `ns` matches `selector`.
async fn pods_gone(client: &Client, ns: &str, selector: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(selector);
    until("the pods to be gone", TIMEOUT, || {
        let (pods, lp) = (pods.clone(), lp.clone());
        async move { Ok(pods.list(&lp).await?.items.is_empty().then_some(())) }
    })
    .await
}

/// `Some` once all `n` MoEDeployments have a status for their generation and every child.
/// One list per kind for the whole namespace, so that polling costs the API server little.
async fn all_reconciled(
    mds: &Api<MoEDeployment>,
    client: &Client,
    ns: &str,
    n: usize,
    per_set: usize,
) -> Result<Option<()>> {
    let list = mds.list(&ListParams::default()).await?.items;
    let seen = list
        .iter()
        .filter(|m| m.name_any().starts_with("small-"))
        .filter(|m| m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation)
        .count();
    if seen < n {
        return Ok(None);
    }
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, deployment) in moe::child_objects(client, ns, LABEL_DEPLOYMENT).await? {
        *per.entry(deployment).or_default() += 1;
    }
    let done = (0..n)
        .filter(|i| per.get(&format!("small-{i}")).copied().unwrap_or(0) >= per_set)
        .count();
    Ok((done == n).then_some(()))
}
