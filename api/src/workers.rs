//! The worker processes a planned `MoEDeployment` runs: one per pipeline stage, `minReplicas`
//! per expert shard, `replicas` gateways, and what each is told apart from where it listens and
//! how it reaches its peers (cluster DNS names in Kubernetes, loopback ports on one machine),
//! where its checkpoint is, and its worker certificates. The operator puts these arguments in
//! its pods and `moe-worker local -f` gives them to its processes, so both run the same thing.

use kube::ResourceExt;
use moe_plan::{ExpertShardPlan, Plan, SizedPlan, StagePlan};

use crate::crd::MoEDeployment;
use crate::error::{Error, Result};

/// Longest `metadata.name` whose derived names (`NAME-expert-NNN`, …) stay valid DNS labels.
pub const MAX_NAME_LEN: usize = 40;

/// The role of a worker process (and pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkerRole {
    Stage,
    Expert,
    Gateway,
}

impl WorkerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Expert => "expert",
            Self::Gateway => "gateway",
        }
    }
}

pub fn stage_name(md: &str, s: usize) -> String {
    format!("{md}-stage-{s}")
}

pub fn expert_name(md: &str, j: usize) -> String {
    format!("{md}-expert-{j}")
}

pub fn gateway_name(md: &str) -> String {
    format!("{md}-gateway")
}

/// The deployment's name, checked: derived names must be DNS labels.
pub fn checked_name(md: &MoEDeployment) -> Result<String> {
    let name = md.name_any();
    if name.is_empty() {
        return Err(Error::invalid("metadata.name", "required"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            "metadata.name",
            format!(
                "`{name}` is {} characters; at most {MAX_NAME_LEN} leave room for the names of \
                 its stages and expert shards",
                name.len()
            ),
        ));
    }
    let dns1035 = name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !dns1035 {
        return Err(Error::invalid(
            "metadata.name",
            format!(
                "`{name}` is not a DNS-1035 label (lowercase letters, digits and '-', starting \
                 with a letter): the gateway Service is named after it"
            ),
        ));
    }
    Ok(name)
}

/// Arguments of a stage: its layers, and the KV caches it holds for every gateway together.
pub fn stage_args(st: &StagePlan, max_sequences: i32) -> Vec<String> {
    vec![
        "stage".to_string(),
        "--layers".into(),
        format!("{}..{}", st.layer_start, st.layer_end),
        "--index".into(),
        st.index.to_string(),
        "--max-sequences".into(),
        max_sequences.to_string(),
    ]
}

/// Arguments of (every replica of) an expert shard.
pub fn expert_args(sh: &ExpertShardPlan) -> Vec<String> {
    let experts: Vec<String> = sh.experts.iter().map(|e| e.to_string()).collect();
    vec![
        "expert".to_string(),
        "--layers".into(),
        format!("{}..{}", sh.layer_start, sh.layer_end),
        "--experts".into(),
        experts.join(","),
        "--index".into(),
        sh.index.to_string(),
    ]
}

/// Arguments of each gateway: the model name it answers to and its share of the sequences.
pub fn gateway_args(served_model_name: Option<&str>, max_sequences: i32) -> Vec<String> {
    let mut args = vec!["gateway".to_string()];
    if let Some(name) = served_model_name {
        args.extend(["--served-model-name".to_string(), name.to_string()]);
    }
    args.extend(["--max-sequences".to_string(), max_sequences.to_string()]);
    args
}

/// Each gateway's share of what every stage holds, so that the gateways together never admit
/// more sequences than a stage has KV caches for.
pub fn gateway_max_sequences(md: &MoEDeployment) -> i32 {
    let total = md.spec.serving.max_concurrent_sequences.max(1) as usize;
    let share = moe_plan::gateway_share(total, md.spec.replicas.max(1) as usize);
    i32::try_from(share).unwrap_or(i32::MAX)
}

/// One kind of worker process: `replicas` identical processes with these arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub role: WorkerRole,
    /// `NAME-stage-S`, `NAME-expert-J` or `NAME-gateway`, as the Kubernetes objects are named.
    pub name: String,
    /// Stage or expert-shard index.
    pub index: Option<usize>,
    pub replicas: i32,
    pub args: Vec<String>,
}

/// Every workload of `md` planned as `plan`: expert shards, then stages, then the gateway.
/// Replicas are what the operator creates: `minReplicas` per expert shard (the autoscaler
/// moves them within their bounds later), one per stage, `replicas` gateways.
pub fn workloads(md: &MoEDeployment, plan: &SizedPlan) -> Result<Vec<Workload>> {
    let name = checked_name(md)?;
    let gateways = md.spec.replicas.max(1);
    let mut out = layout_workloads(
        &name,
        &plan.layout(),
        md.spec.experts.min_replicas.max(1),
        gateways,
        md.spec.serving.max_concurrent_sequences,
        gateway_max_sequences(md),
        Some(&name),
    );
    add_worker_args(&mut out, &spec_precision_args(md));
    Ok(out)
}

/// What a MoEDeployment tells its stages and expert shards about formats (see
/// [`precision_args`]).
pub fn spec_precision_args(md: &MoEDeployment) -> Vec<String> {
    precision_args(
        md.spec.model.expert_dtype.map(|d| d.as_arg()),
        md.spec.serving.wire_dtype,
    )
}

/// The arguments that tell a stage or expert shard the experts' format and the wire's
/// element type (none when both are the defaults, so older workers keep working).
pub fn precision_args(expert_dtype: Option<&str>, wire: crate::crd::WireDType) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(d) = expert_dtype {
        args.extend(["--expert-dtype".to_string(), d.to_string()]);
    }
    if wire == crate::crd::WireDType::Bf16 {
        args.extend(["--wire-dtype".to_string(), "bf16".to_string()]);
    }
    args
}

/// Adds `args` to the stages and expert shards of `workloads` (the gateway computes
/// neither experts nor activations it sends).
pub fn add_worker_args(workloads: &mut [Workload], args: &[String]) {
    for w in workloads
        .iter_mut()
        .filter(|w| w.role != WorkerRole::Gateway)
    {
        w.args.extend(args.iter().cloned());
    }
}

/// The workloads of a layout: `expert_replicas` processes per expert shard, one per stage
/// holding `max_sequences` sequences, and `gateways` gateways admitting `gateway_sequences`
/// each.
pub fn layout_workloads(
    name: &str,
    plan: &Plan,
    expert_replicas: i32,
    gateways: i32,
    max_sequences: i32,
    gateway_sequences: i32,
    served_model_name: Option<&str>,
) -> Vec<Workload> {
    let mut out: Vec<Workload> = plan
        .expert_shards
        .iter()
        .map(|sh| Workload {
            role: WorkerRole::Expert,
            name: expert_name(name, sh.index),
            index: Some(sh.index),
            replicas: expert_replicas,
            args: expert_args(sh),
        })
        .collect();
    out.extend(plan.stages.iter().map(|st| Workload {
        role: WorkerRole::Stage,
        name: stage_name(name, st.index),
        index: Some(st.index),
        replicas: 1,
        args: stage_args(st, max_sequences),
    }));
    out.push(Workload {
        role: WorkerRole::Gateway,
        name: gateway_name(name),
        index: None,
        replicas: gateways,
        args: gateway_args(served_model_name, gateway_sequences),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(yaml: &str) -> MoEDeployment {
        crate::parse_manifest(yaml).expect("manifest")
    }

    const TINY: &str = "apiVersion: serving.moe.dev/v1alpha1\nkind: MoEDeployment\n\
        metadata: {name: tiny}\nspec:\n  model: {source: {synthetic: {preset: tiny}}}\n  \
        parallelism: {pipeline: 2, expert: 3}\n  replicas: 3\n  \
        experts: {minReplicas: 2, maxReplicas: 4}\n  serving: {maxConcurrentSequences: 10}\n";

    #[test]
    fn expert_and_wire_formats_reach_the_stages_and_shards_and_the_plan_counts_them() {
        let plain = md(TINY);
        let q8 = md(&TINY
            .replace(
                "model: {source: {synthetic: {preset: tiny}}}",
                "model: {source: {synthetic: {preset: tiny}}, dtype: f32, expertDtype: q8}",
            )
            .replace("serving: {", "serving: {wireDtype: bf16, "));
        let (p0, p1) = (
            crate::planning::plan(&plain.spec).expect("plan"),
            crate::planning::plan(&q8.spec).expect("plan"),
        );
        // The default (bf16) keeps 2 bytes per expert weight; 8-bit blocks 1.125.
        let (a, b) = (p0.expert_shards[0].pod, p1.expert_shards[0].pod);
        assert_eq!(a.parameters, b.parameters);
        assert_eq!(b.weight_bytes, (a.parameters * 1125).div_ceil(1000));
        assert_eq!(a.weight_bytes, a.parameters * 2);
        // Stages keep their dense weights at spec.model.dtype (f32 here).
        assert_eq!(
            p1.stages[0].pod.weight_bytes,
            p1.stages[0].pod.parameters * 4
        );
        for w in workloads(&q8, &p1).expect("workloads") {
            let has = |flag: &str, v: &str| w.args.windows(2).any(|p| p[0] == flag && p[1] == v);
            let worker = w.role != WorkerRole::Gateway;
            assert_eq!(has("--expert-dtype", "q8"), worker, "{w:?}");
            assert_eq!(has("--wire-dtype", "bf16"), worker, "{w:?}");
        }
        for w in workloads(&plain, &p0).expect("workloads") {
            assert!(
                !w.args
                    .iter()
                    .any(|a| a == "--expert-dtype" || a == "--wire-dtype"),
                "{w:?}"
            );
        }
        assert!(
            crate::parse_manifest(&TINY.replace(
                "model: {source: {synthetic: {preset: tiny}}}",
                "model: {source: {synthetic: {preset: tiny}}, expertDtype: q4}"
            ))
            .is_err()
        );
    }

    #[test]
    fn workloads_follow_the_plan_and_the_replica_counts() {
        let md = md(TINY);
        let plan = crate::planning::plan(&md.spec).expect("plan");
        let w = workloads(&md, &plan).expect("workloads");
        let roles: Vec<_> = w.iter().map(|w| (w.role, w.replicas)).collect();
        assert_eq!(
            roles,
            [
                (WorkerRole::Expert, 2),
                (WorkerRole::Expert, 2),
                (WorkerRole::Expert, 2),
                (WorkerRole::Stage, 1),
                (WorkerRole::Stage, 1),
                (WorkerRole::Gateway, 3)
            ]
        );
        // Every expert of every layer is served by exactly one shard.
        let mut served = vec![0; 4 * 8];
        for (j, s) in plan.expert_shards.iter().enumerate() {
            assert_eq!(w[j].name, format!("tiny-expert-{j}"));
            for l in s.layout.layer_start..s.layout.layer_end {
                for e in &s.layout.experts {
                    served[l * 8 + e] += 1;
                }
            }
        }
        assert!(served.iter().all(|n| *n == 1), "{served:?}");
        // The stages hold every sequence; three gateways admit 3 each, never more than 10.
        assert!(
            w[3].args
                .ends_with(&["--max-sequences".into(), "10".into()])
        );
        assert_eq!(gateway_max_sequences(&md), 3);
        assert_eq!(w[5].args[1..3], ["--served-model-name", "tiny"]);
    }

    #[test]
    fn names_that_cannot_name_kubernetes_objects_are_refused() {
        for bad in ["Tiny", "9tiny", "tiny-", "a_b", &"x".repeat(41)] {
            let m = md(&TINY.replace("name: tiny", &format!("name: '{bad}'")));
            let e = workloads(&m, &crate::planning::plan(&m.spec).expect("plan")).expect_err(bad);
            assert!(e.to_string().starts_with("metadata.name"), "{e}");
        }
    }

    #[test]
    fn manifests_name_what_is_wrong() {
        let e = crate::parse_manifest("kind: Service\napiVersion: v1\n").expect_err("service");
        assert!(
            e.contains("no MoEDeployment") && e.contains("Service"),
            "{e}"
        );
        let two = format!("{TINY}---\n{TINY}");
        assert!(
            crate::parse_manifest(&two)
                .expect_err("two")
                .contains("2 MoEDeployments")
        );
        let with_ns =
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---\n{TINY}");
        assert_eq!(
            crate::parse_manifest(&with_ns)
                .expect("namespace first")
                .name_any(),
            "tiny"
        );
        let e = crate::parse_manifest(&TINY.replace("pipeline: 2", "pipeline: two"))
            .expect_err("string");
        assert!(e.contains("spec.parallelism.pipeline"), "{e}");
        let e = crate::parse_manifest(&TINY.replace("v1alpha1", "v1")).expect_err("version");
        assert!(e.contains("apiVersion"), "{e}");
    }
}
