//! Learning the architecture from the checkpoint. A `MoEDeployment` that names a PVC or a
//! hostPath and no `spec.model.architecture` has its `config.json` read by a short Job that
//! runs `moe-worker inspect` on the volume (the operator itself never mounts volumes); the
//! Job's container reports through its termination message. The result is recorded in
//! `status.model` with the source it was read from, so it is read once per source, and the
//! `ArchitectureKnown` condition says where reading stands, or why it failed.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde::Deserialize;

use crate::controller::{MANAGER, ReconcileError};
use crate::crd::{Architecture, MoEDeployment, ModelStatus};
use crate::resources::{self, RUN_AS};

/// The condition this module reports.
pub const CONDITION: &str = "ArchitectureKnown";

/// How long the Job may run before it counts as failed.
const DEADLINE_SECONDS: i64 = 180;
/// How often a running Job is looked at.
const POLL: Duration = Duration::from_secs(3);
/// How soon a failed read is tried again (the volume may be filled later).
const RETRY: Duration = Duration::from_secs(60);

/// Where the architecture comes from, or why it is not known yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The spec gives it (or the model is synthetic): nothing to read.
    FromSpec,
    /// Read from the checkpoint: plan with it and keep `status.model`.
    Read(ModelStatus),
    /// Not known yet: report `reason` and `message`, look again after `requeue`.
    Pending {
        reason: &'static str,
        message: String,
        requeue: Duration,
    },
}

/// What `moe-worker inspect` writes.
#[derive(Debug, Deserialize)]
struct Inspected {
    architecture: Architecture,
}

/// Identifies what is read: the model source and the image that reads it.
pub fn source_key(md: &MoEDeployment, image: &str) -> String {
    let source = serde_json::to_string(&md.spec.model.source).unwrap_or_default();
    format!("{source} {image}")
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The Job's name: the deployment's, `-inspect-`, and a hash of the source (a new source is a
/// new Job). At most 40 + 16 characters, so its pods' names stay within 63.
pub fn job_name(md: &str, key: &str) -> String {
    format!("{md}-inspect-{:08x}", fnv1a(key) as u32)
}

fn image(md: &MoEDeployment, config: &resources::Config) -> String {
    md.spec
        .image
        .clone()
        .unwrap_or_else(|| config.worker_image.clone())
}

/// Whether the operator must read the architecture from the checkpoint.
pub fn needed(md: &MoEDeployment) -> bool {
    md.spec.model.architecture.is_none() && md.spec.model.source.synthetic.is_none()
}

/// The Job that reads `md`'s checkpoint.
pub fn job(md: &MoEDeployment, config: &resources::Config, name: &str) -> Option<Job> {
    let (model, volume) = resources::model_source(md);
    let (volume, mount) = volume?;
    let owner = md.controller_owner_ref(&())?;
    let mut labels: BTreeMap<String, String> = resources::common_labels(&md.name_any());
    labels.insert("app.kubernetes.io/component".into(), "inspect".into());
    let placement = &md.spec.placement;
    // A hostPath exists on the nodes the workers run on: go where they go, without asking
    // for a GPU.
    let (node_selector, tolerations) =
        resources::gpu_placement(md, md.spec.model.source.host_path.is_some());
    let small = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ])
    };
    Some(Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: md.namespace(),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(DEADLINE_SECONDS),
            ttl_seconds_after_finished: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    image_pull_secrets: resources::pull_secrets(&config.image_pull_secrets),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "inspect".into(),
                        image: Some(image(md, config)),
                        image_pull_policy: Some("IfNotPresent".into()),
                        command: Some(vec!["moe-worker".into()]),
                        args: Some(vec![
                            "inspect".into(),
                            "--model".into(),
                            model,
                            "--termination-log".into(),
                            "/dev/termination-log".into(),
                        ]),
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        resources: Some(ResourceRequirements {
                            requests: Some(small("50m", "64Mi")),
                            limits: Some(small("1", "256Mi")),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(resources::container_security()),
                        volume_mounts: Some(vec![mount]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![volume]),
                    node_selector: (!node_selector.is_empty()).then_some(node_selector),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    affinity: placement.affinity.clone(),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

fn kube_err(action: &'static str, name: &str) -> impl FnOnce(kube::Error) -> ReconcileError {
    let name = name.to_string();
    move |source| ReconcileError::Kube {
        action,
        kind: "Job",
        name,
        source,
    }
}

/// The termination message (or reason) of the Job's pod, if it has ended.
async fn pod_report(
    client: &Client,
    ns: &str,
    job: &str,
) -> Result<Option<String>, ReconcileError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .map_err(kube_err("list pods of", job))?;
    for p in list.items {
        let statuses = p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default();
        for c in statuses {
            if let Some(t) = c.state.and_then(|s| s.terminated) {
                let text = t
                    .message
                    .filter(|m| !m.trim().is_empty())
                    .or(t.reason)
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code));
                return Ok(Some(text.trim().to_string()));
            }
        }
    }
    Ok(None)
}

/// Where `md`'s architecture comes from: the spec, `status.model` (read before from the same
/// source), or a Job that reads it now.
pub async fn resolve(
    client: &Client,
    md: &MoEDeployment,
    config: &resources::Config,
) -> Result<Resolution, ReconcileError> {
    if !needed(md) {
        return Ok(Resolution::FromSpec);
    }
    let key = source_key(md, &image(md, config));
    if let Some(m) = md.status.as_ref().and_then(|s| s.model.as_ref())
        && m.source == key
        && m.architecture.is_some()
    {
        return Ok(Resolution::Read(m.clone()));
    }
    let ns = md.namespace().unwrap_or_default();
    let name = job_name(&md.name_any(), &key);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let Some(current) = jobs.get_opt(&name).await.map_err(kube_err("get", &name))? else {
        // The cache may lag a status this operator wrote a moment ago: ask the API before
        // reading again (or a Job made from stale status would be left behind).
        let mds: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
        if let Some(fresh) = mds
            .get_opt(&md.name_any())
            .await
            .map_err(kube_err("get", &md.name_any()))?
            && let Some(m) = fresh.status.and_then(|s| s.model)
            && m.source == key
            && m.architecture.is_some()
        {
            return Ok(Resolution::Read(m));
        }
        let Some(job) = job(md, config, &name) else {
            return Ok(Resolution::FromSpec);
        };
        jobs.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&job),
        )
        .await
        .map_err(kube_err("apply", &name))?;
        return Ok(reading(&name));
    };
    let status = current.status.unwrap_or_default();
    let failed = status.failed.unwrap_or(0) > 0
        || status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Failed" && c.status == "True");
    let succeeded = status.succeeded.unwrap_or(0) > 0;
    if !failed && !succeeded {
        return Ok(reading(&name));
    }
    let report = pod_report(client, &ns, &name).await?;
    if succeeded
        && let Some(text) = &report
        && let Ok(found) = serde_json::from_str::<Inspected>(text)
    {
        delete_job(&jobs, &name).await;
        return Ok(Resolution::Read(ModelStatus {
            source: key,
            architecture: Some(found.architecture),
        }));
    }
    // A failed Job stays as the record of the failure until the retry is due; then it goes
    // and the next pass starts a fresh one.
    let failed_at = status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.type_ == "Failed" || c.type_ == "Complete")
        .filter_map(|c| c.last_transition_time.as_ref())
        .map(|t| t.0)
        .max()
        .or(status.completion_time.as_ref().map(|t| t.0));
    let age = failed_at
        .map(|t| Timestamp::now().duration_since(t))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(RETRY);
    if age >= RETRY {
        delete_job(&jobs, &name).await;
        return Ok(reading(&name));
    }
    let why = report.unwrap_or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed")
            .and_then(|c| c.message.clone())
            .unwrap_or_else(|| "the Job failed without a report".into())
    });
    Ok(Resolution::Pending {
        reason: "CheckpointUnreadable",
        message: format!(
            "spec.model.architecture is not given and the checkpoint's config.json could not \
             be read: {why}; retrying every {}s",
            RETRY.as_secs()
        ),
        requeue: RETRY.saturating_sub(age).max(POLL),
    })
}

/// Waiting for Job `name` (running, or about to be started).
fn reading(name: &str) -> Resolution {
    Resolution::Pending {
        reason: "ReadingCheckpoint",
        message: format!("reading config.json from the model's volume (Job {name})"),
        requeue: POLL,
    }
}

async fn delete_job(jobs: &Api<Job>, name: &str) {
    let _ = jobs
        .delete(
            name,
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(source: &str) -> MoEDeployment {
        let mut md: MoEDeployment = serde_yaml::from_str(&format!(
            "apiVersion: serving.moe.dev/v1alpha1\nkind: MoEDeployment\nmetadata:\n  name: m\n  \
             namespace: ns\n  uid: u-1\nspec:\n  model:\n    source:\n{source}"
        ))
        .expect("manifest");
        md.metadata.uid = Some("u-1".into());
        md
    }

    #[test]
    fn a_volume_without_architecture_is_read_by_a_job_on_it() {
        let config = resources::Config::default();
        let pvc = md("      pvc:\n        claimName: weights\n        path: qwen/v1\n");
        assert!(needed(&pvc));
        let key = source_key(&pvc, "img");
        let name = job_name("m", &key);
        assert!(name.starts_with("m-inspect-") && name.len() <= 63 - 6);
        let built = job(&pvc, &config, &name).expect("job");
        let pod = built.spec.expect("spec").template.spec.expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let c = &pod.containers[0];
        let args = c.args.clone().expect("args");
        assert_eq!(args[..3], ["inspect", "--model", "/models/qwen/v1"]);
        assert_eq!(
            c.volume_mounts.as_ref().expect("mounts")[0].read_only,
            Some(true)
        );
        assert!(
            c.resources
                .as_ref()
                .expect("res")
                .limits
                .as_ref()
                .expect("l")
                .get("nvidia.com/gpu")
                .is_none()
        );
        assert_eq!(
            pod.volumes.expect("volumes")[0]
                .persistent_volume_claim
                .as_ref()
                .expect("pvc")
                .claim_name,
            "weights"
        );
        // Another source, another Job; a synthetic model needs none.
        let other = md("      pvc:\n        claimName: weights\n        path: qwen/v2\n");
        assert_ne!(job_name("m", &source_key(&other, "img")), name);
        let synthetic = md("      synthetic:\n        preset: tiny\n");
        assert!(!needed(&synthetic) && job(&synthetic, &config, "x").is_none());
    }
}
