//! From what the workloads report to the `MoEDeployment` status: ready counts per role, replicas
//! per expert shard, and the `Ready` / `Progressing` / `Degraded` conditions. Pure, so every
//! transition is unit-tested; the reconciler only observes and writes.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use moe_plan::SizedPlan;

use crate::crd::{AutoscalingStatus, ExpertShardStatus, MoEDeploymentStatus};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// One workload as its controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Part {
    /// Replicas asked for.
    pub desired: i32,
    pub ready: i32,
    /// The workload's controller has seen its latest spec and every replica runs it.
    pub up_to_date: bool,
}

impl Part {
    pub fn from_stateful_set(s: &StatefulSet) -> Self {
        let desired = s.spec.replicas.unwrap_or(1);
        let st = s.status.clone().unwrap_or_default();
        let seen = st.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(0);
        let revision_done =
            st.update_revision.is_none() || st.current_revision == st.update_revision;
        Self {
            desired,
            ready: st.ready_replicas.unwrap_or(0),
            up_to_date: seen && revision_done && st.updated_replicas.unwrap_or(0) >= desired,
        }
    }

    pub fn from_deployment(d: &Deployment) -> Self {
        let desired = d.spec.replicas.unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let seen = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        Self {
            desired,
            ready: st.ready_replicas.unwrap_or(0),
            up_to_date: seen
                && st.updated_replicas.unwrap_or(0) >= desired
                && st.replicas.unwrap_or(0) <= desired,
        }
    }

    fn settled(&self) -> bool {
        self.up_to_date && self.ready >= self.desired
    }
}

/// Every workload of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub stages: Vec<Part>,
    pub expert_shards: Vec<Part>,
    pub gateway: Part,
}

/// The first part with no ready replica, as (reason, message).
fn unavailable(plan: &SizedPlan, o: &Observed) -> Option<(&'static str, String)> {
    if let Some((s, _)) = o.stages.iter().enumerate().find(|(_, p)| p.ready < 1) {
        let l = &plan.stages[s].layout;
        return Some((
            "StageUnavailable",
            format!(
                "stage {s} (layers {}..{}) has no ready replica",
                l.layer_start, l.layer_end
            ),
        ));
    }
    if let Some((j, _)) = o
        .expert_shards
        .iter()
        .enumerate()
        .find(|(_, p)| p.ready < 1)
    {
        let l = &plan.expert_shards[j].layout;
        return Some((
            "ExpertShardUnavailable",
            format!(
                "expert shard {j} (layers {}..{}, experts {:?}) has no live replica",
                l.layer_start, l.layer_end, l.experts
            ),
        ));
    }
    if o.gateway.ready < 1 {
        return Some((
            "GatewayUnavailable",
            "the gateway has no ready replica".into(),
        ));
    }
    None
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// Keeps a condition's transition time when its status did not change.
fn carry_transitions(prev: &[Condition], next: &mut [Condition], now: Timestamp) {
    for c in next {
        c.last_transition_time = match prev.iter().find(|p| p.type_ == c.type_) {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => Time(now),
        };
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The status for a deployment whose workloads report `observed`.
pub fn compute(
    prev: &MoEDeploymentStatus,
    generation: i64,
    plan: &SizedPlan,
    observed: &Observed,
    gateway_endpoint: String,
    now: Timestamp,
) -> MoEDeploymentStatus {
    let missing = unavailable(plan, observed);
    let settled = observed.stages.iter().all(Part::settled)
        && observed.expert_shards.iter().all(Part::settled)
        && observed.gateway.settled();
    // Degraded means "was serving, lost a part": a first roll-out is only Progressing.
    let was_serving = is_true(&prev.conditions, READY) || is_true(&prev.conditions, DEGRADED);

    let stages = observed.stages.len();
    let shards = observed.expert_shards.len();
    let replicas: i32 = observed.expert_shards.iter().map(|p| p.desired).sum();
    let ready_msg = format!(
        "{stages} stages, {shards} expert shards ({replicas} replicas) and the gateway are ready"
    );
    let mut conditions = match &missing {
        None => vec![
            condition(READY, true, "AllPartsReady", ready_msg, generation),
            if settled {
                condition(
                    PROGRESSING,
                    false,
                    "Complete",
                    "every workload runs the latest spec".into(),
                    generation,
                )
            } else {
                condition(
                    PROGRESSING,
                    true,
                    "RollingOut",
                    "workloads are being updated or scaled".into(),
                    generation,
                )
            },
            condition(
                DEGRADED,
                false,
                "AllPartsReady",
                "no part is unavailable".into(),
                generation,
            ),
        ],
        Some((reason, message)) => vec![
            condition(READY, false, reason, message.clone(), generation),
            condition(
                PROGRESSING,
                true,
                if was_serving {
                    "Recovering"
                } else {
                    "RollingOut"
                },
                "waiting for every stage, expert shard and the gateway to be ready".into(),
                generation,
            ),
            if was_serving {
                condition(DEGRADED, true, reason, message.clone(), generation)
            } else {
                condition(
                    DEGRADED,
                    false,
                    "Starting",
                    "not serving yet".into(),
                    generation,
                )
            },
        ],
    };
    carry_transitions(&prev.conditions, &mut conditions, now);

    let expert_shard_status = plan
        .expert_shards
        .iter()
        .zip(&observed.expert_shards)
        .map(|(sh, p)| ExpertShardStatus {
            index: sh.layout.index as i32,
            layer_start: sh.layout.layer_start as i32,
            layer_end: sh.layout.layer_end as i32,
            experts: sh.layout.experts.iter().map(|&e| e as i32).collect(),
            replicas: p.desired,
            ready_replicas: p.ready,
            ..ExpertShardStatus::default()
        })
        .collect();
    let gpus = plan.stages.iter().map(|s| s.pod.gpus).sum::<usize>() as i64
        + plan
            .expert_shards
            .iter()
            .zip(&observed.expert_shards)
            .map(|(s, p)| s.pod.gpus as i64 * i64::from(p.desired))
            .sum::<i64>()
        + plan.gateway.gpus as i64 * i64::from(observed.gateway.desired);

    MoEDeploymentStatus {
        observed_generation: Some(generation),
        conditions,
        stages: stages as i32,
        ready_stages: observed.stages.iter().filter(|p| p.ready >= 1).count() as i32,
        expert_shards: shards as i32,
        ready_expert_shards: observed
            .expert_shards
            .iter()
            .filter(|p| p.ready >= 1)
            .count() as i32,
        expert_replicas: replicas,
        expert_shard_status,
        gateway_ready_replicas: observed.gateway.ready,
        gateway_endpoint: Some(gateway_endpoint),
        gpus: i32::try_from(gpus).unwrap_or(i32::MAX),
        total_parameters: i64::try_from(plan.total_parameters).ok(),
        active_parameters_per_token: i64::try_from(plan.active_parameters_per_token).ok(),
        autoscaling: None,
        model: prev.model.clone(),
        performance: prev.performance.clone(),
    }
}

/// The status while the architecture is being read from the checkpoint (`reason`
/// `ReadingCheckpoint`) or could not be (`CheckpointUnreadable`): not ready, and
/// `ArchitectureKnown=False` with the reason.
pub fn architecture_pending(
    prev: &MoEDeploymentStatus,
    generation: i64,
    reason: &str,
    message: String,
    now: Timestamp,
) -> MoEDeploymentStatus {
    let failed = reason != "ReadingCheckpoint";
    let mut conditions = vec![
        condition(READY, false, reason, message.clone(), generation),
        condition(PROGRESSING, !failed, reason, message.clone(), generation),
        condition(DEGRADED, failed, reason, message.clone(), generation),
        condition(
            crate::inspect::CONDITION,
            false,
            reason,
            message,
            generation,
        ),
    ];
    carry_transitions(&prev.conditions, &mut conditions, now);
    MoEDeploymentStatus {
        observed_generation: Some(generation),
        conditions,
        ..prev.clone()
    }
}

/// Records in `status` the architecture read from the checkpoint (`None`: the spec gives it).
pub fn with_model(
    status: &mut MoEDeploymentStatus,
    prev: &MoEDeploymentStatus,
    model: Option<&crate::crd::ModelStatus>,
    generation: i64,
    now: Timestamp,
) {
    status.model = model.cloned();
    status
        .conditions
        .retain(|c| c.type_ != crate::inspect::CONDITION);
    if let Some(m) = model {
        let what = m
            .architecture
            .as_ref()
            .map(|a| {
                format!(
                    "{}{} layers × {} experts, top-{}",
                    a.model_type
                        .as_deref()
                        .map(|t| format!("{t}: "))
                        .unwrap_or_default(),
                    a.num_layers,
                    a.num_experts,
                    a.top_k
                )
            })
            .unwrap_or_default();
        let mut c = vec![condition(
            crate::inspect::CONDITION,
            true,
            "ReadFromCheckpoint",
            format!("read from the checkpoint's config.json: {what}"),
            generation,
        )];
        carry_transitions(&prev.conditions, &mut c, now);
        status.conditions.extend(c);
    }
}

/// Adds the expert autoscaler's inputs and decision to `status` (driver `operator`).
pub fn with_autoscaling(status: &mut MoEDeploymentStatus, d: &crate::autoscale::Published) {
    let replicas: Vec<i32> = status
        .expert_shard_status
        .iter()
        .map(|s| s.replicas)
        .collect();
    for (s, (&load, &want)) in status
        .expert_shard_status
        .iter_mut()
        .zip(d.tokens_per_second.iter().zip(&d.desired))
    {
        s.tokens_per_second = Some(load.round() as i64);
        s.desired_replicas = Some(want);
    }
    let imbalance = crate::autoscale::imbalance(&d.tokens_per_second, &replicas);
    status.autoscaling = Some(AutoscalingStatus {
        tokens_per_second: d.tokens_per_second.iter().sum::<f64>().round() as i64,
        load_imbalance: Some((imbalance * 100.0).round() / 100.0),
        last_decision: Some(d.reason.clone()),
        last_scale_time: d.last_scale_time.map(Time),
        last_scale_reason: d.last_change.clone(),
        source: Some(d.source.clone()),
    });
}

/// Sets `status.performance` and its condition (`PerformanceAsPlanned`), keeping the
/// condition's transition time while its status does not change.
pub fn with_performance(
    status: &mut MoEDeploymentStatus,
    prev: &MoEDeploymentStatus,
    performance: crate::crd::PerformanceStatus,
    verdict: &crate::performance::Verdict,
    generation: i64,
    now: Timestamp,
) {
    status.performance = Some(performance);
    status
        .conditions
        .retain(|c| c.type_ != crate::performance::CONDITION);
    let mut c = vec![Condition {
        type_: crate::performance::CONDITION.into(),
        status: verdict.status.clone(),
        reason: verdict.reason.clone(),
        // The API server holds a condition's message to 32768 bytes.
        message: verdict.message.chars().take(4000).collect(),
        observed_generation: Some(generation),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }];
    carry_transitions(&prev.conditions, &mut c, now);
    status.conditions.extend(c);
}

/// The status of a spec the operator cannot deploy: the error names the field. The workloads
/// already running (from an earlier valid generation) are left as they are.
pub fn invalid(
    prev: &MoEDeploymentStatus,
    generation: i64,
    message: String,
    now: Timestamp,
) -> MoEDeploymentStatus {
    let mut conditions = vec![
        condition(READY, false, "InvalidSpec", message.clone(), generation),
        condition(
            PROGRESSING,
            false,
            "InvalidSpec",
            "fix the spec to continue".into(),
            generation,
        ),
        condition(DEGRADED, true, "InvalidSpec", message, generation),
    ];
    carry_transitions(&prev.conditions, &mut conditions, now);
    MoEDeploymentStatus {
        observed_generation: Some(generation),
        conditions,
        ..prev.clone()
    }
}

/// A change worth an Event: (warning?, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// Events for the condition changes between `prev` and `next`: becoming ready, degraded, or
/// invalid. Unchanged conditions produce none, so a stuck object does not flood Events.
pub fn transitions(prev: &MoEDeploymentStatus, next: &MoEDeploymentStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let changed = |t: &str| {
        let a = find(&prev.conditions, t);
        let b = find(&next.conditions, t);
        match (a, b) {
            (_, None) => None,
            (Some(a), Some(b)) if a.status == b.status && a.reason == b.reason => None,
            (_, Some(b)) => Some(b.clone()),
        }
    };
    if let Some(c) = changed(READY) {
        if c.status == "True" {
            out.push(Transition {
                warning: false,
                reason: "Ready".into(),
                message: c.message,
            });
        } else if c.reason == "InvalidSpec" {
            out.push(Transition {
                warning: true,
                reason: "InvalidSpec".into(),
                message: c.message,
            });
        }
    }
    if let Some(c) = changed(DEGRADED)
        && c.status == "True"
        && c.reason != "InvalidSpec"
    {
        out.push(Transition {
            warning: true,
            reason: c.reason.clone(),
            message: c.message,
        });
    }
    // Slower than the plan (a Warning), and back to it after having been slower.
    let perf = crate::performance::CONDITION;
    if let Some(c) = changed(perf) {
        let was_slower = find(&prev.conditions, perf).is_some_and(|p| p.status == "False");
        if c.status == "False" {
            out.push(Transition {
                warning: true,
                reason: c.reason.clone(),
                message: c.message,
            });
        } else if c.status == "True" && was_slower {
            out.push(Transition {
                warning: false,
                reason: perf.into(),
                message: c.message,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_plan::{ModelDims, SizingRequest};

    fn plan() -> SizedPlan {
        let model = ModelDims {
            num_layers: 4,
            num_experts: 8,
            top_k: 2,
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            vocab_size: 512,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            variant: Default::default(),
        };
        moe_plan::size(&SizingRequest {
            model,
            dtype_bytes: 4,
            expert_millibytes: 0,
            stages: 2,
            expert_shards: Some(2),
            tensor: 1,
            gpus_per_pod: 1,
            gpu_memory_bytes: 80 << 30,
            context_tokens: 2048,
            concurrent_sequences: 4,
        })
        .unwrap()
    }

    fn part(desired: i32, ready: i32) -> Part {
        Part {
            desired,
            ready,
            up_to_date: true,
        }
    }

    fn observed(shard_ready: i32) -> Observed {
        Observed {
            stages: vec![part(1, 1), part(1, 1)],
            expert_shards: vec![part(2, 2), part(1, shard_ready)],
            gateway: part(1, 1),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn status_of<'a>(s: &'a MoEDeploymentStatus, t: &str) -> (&'a str, &'a str) {
        let c = find(&s.conditions, t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn first_rollout_is_progressing_not_degraded() {
        let p = plan();
        let s = compute(
            &MoEDeploymentStatus::default(),
            1,
            &p,
            &observed(0),
            "tiny.default.svc:80".into(),
            at(10),
        );
        assert_eq!(status_of(&s, READY), ("False", "ExpertShardUnavailable"));
        assert_eq!(status_of(&s, PROGRESSING), ("True", "RollingOut"));
        assert_eq!(status_of(&s, DEGRADED), ("False", "Starting"));
        assert_eq!(s.ready_expert_shards, 1);
        assert_eq!(s.expert_replicas, 3);
        assert!(transitions(&MoEDeploymentStatus::default(), &s).is_empty());
    }

    #[test]
    fn losing_an_expert_shard_degrades_then_recovers() {
        let p = plan();
        let ep = || "tiny.default.svc:80".to_string();
        let ready = compute(
            &MoEDeploymentStatus::default(),
            1,
            &p,
            &observed(1),
            ep(),
            at(10),
        );
        assert_eq!(status_of(&ready, READY), ("True", "AllPartsReady"));
        assert_eq!(status_of(&ready, PROGRESSING), ("False", "Complete"));
        let t = transitions(&MoEDeploymentStatus::default(), &ready);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].reason, "Ready");

        let degraded = compute(&ready, 1, &p, &observed(0), ep(), at(20));
        assert_eq!(
            status_of(&degraded, DEGRADED),
            ("True", "ExpertShardUnavailable")
        );
        let msg = &find(&degraded.conditions, DEGRADED).unwrap().message;
        assert!(msg.contains("expert shard 1"), "{msg}");
        let t = transitions(&ready, &degraded);
        assert_eq!(t.len(), 1);
        assert!(t[0].warning);
        // The same observation again: no new Event, transition time kept.
        let again = compute(&degraded, 1, &p, &observed(0), ep(), at(30));
        assert!(transitions(&degraded, &again).is_empty());
        assert_eq!(
            find(&again.conditions, DEGRADED)
                .unwrap()
                .last_transition_time,
            Time(at(20))
        );

        let back = compute(&again, 1, &p, &observed(1), ep(), at(40));
        assert_eq!(status_of(&back, READY), ("True", "AllPartsReady"));
        assert_eq!(status_of(&back, DEGRADED), ("False", "AllPartsReady"));
        assert_eq!(transitions(&again, &back)[0].reason, "Ready");
    }

    #[test]
    fn gpus_count_every_replica() {
        let p = plan();
        let s = compute(
            &MoEDeploymentStatus::default(),
            1,
            &p,
            &observed(1),
            String::new(),
            at(1),
        );
        let per = |x: &moe_plan::PodSizing| x.gpus as i32;
        let want = p.stages.iter().map(|s| per(&s.pod)).sum::<i32>()
            + per(&p.expert_shards[0].pod) * 2
            + per(&p.expert_shards[1].pod)
            + per(&p.gateway);
        assert_eq!(s.gpus, want);
    }

    #[test]
    fn invalid_spec_is_one_warning() {
        let s = invalid(
            &MoEDeploymentStatus::default(),
            3,
            "spec.x: bad".into(),
            at(5),
        );
        assert_eq!(status_of(&s, READY), ("False", "InvalidSpec"));
        assert_eq!(s.observed_generation, Some(3));
        let t = transitions(&MoEDeploymentStatus::default(), &s);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].reason, "InvalidSpec");
        let again = invalid(&s, 3, "spec.x: bad".into(), at(6));
        assert!(transitions(&s, &again).is_empty());
    }

    #[test]
    fn slower_than_planned_is_one_warning_and_back_to_plan_one_normal_event() {
        use crate::performance::{CONDITION, SLOWER, Verdict};
        let p = plan();
        let base = compute(
            &MoEDeploymentStatus::default(),
            1,
            &p,
            &observed(1),
            String::new(),
            at(1),
        );
        let v = |status: &str, reason: &str| Verdict {
            status: status.into(),
            reason: reason.into(),
            message: format!("{status} {reason}"),
        };
        let step = |prev: &MoEDeploymentStatus, verdict: Verdict, t: i64| {
            let mut next = compute(prev, 1, &p, &observed(1), String::new(), at(t));
            with_performance(&mut next, prev, Default::default(), &verdict, 1, at(t));
            next
        };
        let unknown = step(&base, v("Unknown", "NoTraffic"), 2);
        assert!(transitions(&base, &unknown).is_empty());
        let ok = step(&unknown, v("True", "AsPlanned"), 3);
        assert!(transitions(&unknown, &ok).is_empty());
        let slow = step(&ok, v("False", SLOWER), 4);
        let t = transitions(&ok, &slow);
        assert_eq!(t.len(), 1);
        assert!(t[0].warning);
        assert_eq!(t[0].reason, SLOWER);
        assert_eq!(status_of(&slow, CONDITION), ("False", SLOWER));
        assert_eq!(
            find(&slow.conditions, CONDITION)
                .unwrap()
                .last_transition_time,
            Time(at(4))
        );
        // Still slower: no new Event, the transition time kept, one condition of the type.
        let still = step(&slow, v("False", SLOWER), 5);
        assert!(transitions(&slow, &still).is_empty());
        assert_eq!(
            find(&still.conditions, CONDITION)
                .unwrap()
                .last_transition_time,
            Time(at(4))
        );
        assert_eq!(
            still
                .conditions
                .iter()
                .filter(|c| c.type_ == CONDITION)
                .count(),
            1
        );
        let back = step(&still, v("True", "AsPlanned"), 6);
        let t = transitions(&still, &back);
        assert_eq!(t.len(), 1);
        assert!(!t[0].warning);
        assert_eq!(t[0].reason, CONDITION);
    }

    #[test]
    fn a_rollout_in_progress_is_progressing_but_ready() {
        let p = plan();
        let mut o = observed(1);
        o.stages[1].up_to_date = false;
        let s = compute(
            &MoEDeploymentStatus::default(),
            2,
            &p,
            &o,
            String::new(),
            at(1),
        );
        assert_eq!(status_of(&s, READY).0, "True");
        assert_eq!(status_of(&s, PROGRESSING), ("True", "RollingOut"));
    }
}
