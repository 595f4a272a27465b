//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! acquire when the Lease is free or expired, renew well inside its duration, and stop leading
//! (the process exits) when a renewal cannot land in time. Updates carry the Lease's
//! resourceVersion, so two candidates can never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub retry: Duration,
    /// The holder's own Pod, set as the Lease's owner while it holds it: when that Pod is
    /// deleted (say by `helm uninstall`, which may remove the RBAC that `release` needs
    /// first), the garbage collector removes the Lease with it.
    pub owner: Option<OwnerReference>,
}

/// The owner reference of the Pod this process runs in, from `POD_NAME` and `POD_UID`.
pub fn pod_owner(name: Option<&str>, uid: Option<&str>) -> Option<OwnerReference> {
    let (name, uid) = (
        name.filter(|n| !n.is_empty())?,
        uid.filter(|u| !u.is_empty())?,
    );
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

/// What this replica last saw of the Lease, and when by its own clock. As client-go does, a
/// lease held by another replica expires when its record has not changed for its duration as
/// this replica measures it: the holder's clock (which wrote `renewTime`) never enters the
/// comparison, so skew between nodes cannot make a live lease look expired or a dead one live.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    record: Option<(String, Option<MicroTime>)>,
    since: Option<std::time::Instant>,
}

/// Whether `me` may take `spec`, observed at `now` (this process's monotonic clock): it is
/// free, already mine, or another's record has not changed for its lease duration.
pub fn may_take(spec: &LeaseSpec, me: &str, seen: &mut Observed, now: std::time::Instant) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let record = (holder.to_string(), spec.renew_time.clone());
    if seen.record.as_ref() != Some(&record) {
        seen.record = Some(record);
        seen.since = Some(now);
    }
    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
    seen.since
        .is_some_and(|t| now.saturating_duration_since(t) >= Duration::from_secs(secs))
}

fn spec_for(cfg: &LeaseConfig, prev: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let was_mine = prev.is_some_and(|p| p.holder_identity.as_deref() == Some(&cfg.identity));
    let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: if was_mine {
            prev.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if was_mine || prev.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to acquire or renew. `Ok(true)`: this process leads until `now + duration`.
pub async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    seen: &mut Observed,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    owner_references: cfg.owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(spec_for(cfg, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            if !may_take(&spec, &cfg.identity, seen, std::time::Instant::now()) {
                debug!(holder = ?spec.holder_identity, "lease held by another replica");
                return Ok(false);
            }
            lease.spec = Some(spec_for(cfg, Some(&spec), now));
            // The holder's Pod owns the Lease (a new holder replaces the previous one's).
            lease.metadata.owner_references = cfg.owner.clone().map(|o| vec![o]);
            // resourceVersion from the read: a concurrent writer makes this a 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the Lease up on shutdown: deletes it (only if this process still holds it, by
/// resource version), so the next replica need not wait for it to expire and an uninstalled
/// operator leaves no Lease behind. A standby creates it afresh.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if holder != Some(cfg.identity.as_str()) {
        return;
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.metadata.resource_version.clone(),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&cfg.name, &dp).await {
        Ok(_) => info!(lease = %cfg.name, "released the leader lease"),
        Err(e) => warn!(error = %e, "releasing the leader lease failed"),
    }
}

/// One acquire or renew attempt, bounded by the retry period (a hung API call counts as a
/// failed renewal, so `keep` still gives up before the Lease can expire under it).
async fn bounded(
    cfg: &LeaseConfig,
    attempt: impl std::future::Future<Output = Result<bool, kube::Error>>,
) -> Result<bool, kube::Error> {
    let limit = cfg.retry.max(Duration::from_millis(500));
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("no answer from the API server within {limit:?}").into(),
        )),
    }
}

/// Blocks until this process leads.
pub async fn acquire(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut logged = false;
    let mut seen = Observed::default();
    loop {
        match bounded(cfg, try_acquire(&api, cfg, &mut seen)).await {
            Ok(true) => {
                info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                return;
            }
            Ok(false) if !logged => {
                info!(lease = %cfg.name, "waiting for the leader lease");
                logged = true;
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "reading the leader lease failed"),
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// Renews the Lease until a renewal has failed for longer than its duration; returns then
/// (the caller must stop acting as leader).
pub async fn keep(client: Client, cfg: LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_ok = std::time::Instant::now();
    let mut seen = Observed::default();
    loop {
        tokio::time::sleep(cfg.retry).await;
        match bounded(&cfg, try_acquire(&api, &cfg, &mut seen)).await {
            Ok(true) => last_ok = std::time::Instant::now(),
            Ok(false) => {
                warn!(lease = %cfg.name, "another replica took the leader lease");
                return;
            }
            Err(e) => {
                warn!(error = %e, "renewing the leader lease failed");
                // Stop before the Lease can expire under us, like client-go's renew deadline.
                if last_ok.elapsed() + cfg.retry >= cfg.duration {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn free_own_or_expired_leases_can_be_taken() {
        let t0 = std::time::Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut seen = Observed::default();
        assert!(may_take(&LeaseSpec::default(), "a", &mut seen, s(0)));
        assert!(may_take(&held("a", 99), "a", &mut seen, s(0)));
        // Another's lease: live until its record stops changing for 15 s of our time.
        assert!(!may_take(&held("b", 90), "a", &mut seen, s(0)));
        assert!(!may_take(&held("b", 90), "a", &mut seen, s(14)));
        assert!(may_take(&held("b", 90), "a", &mut seen, s(15)));
        let released = LeaseSpec {
            holder_identity: None,
            ..held("b", 99)
        };
        assert!(may_take(&released, "a", &mut seen, s(15)));
    }

    #[test]
    fn clock_skew_between_nodes_does_not_expire_a_live_lease() {
        let t0 = std::time::Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut seen = Observed::default();
        // The holder's clock runs an hour behind ours: its renewTime looks ancient, but it
        // keeps changing, so the lease is live.
        for (i, renewed) in [-3600, -3598, -3596, -3594].into_iter().enumerate() {
            assert!(!may_take(
                &held("b", renewed),
                "a",
                &mut seen,
                s(10 * i as u64)
            ));
        }
        // An hour ahead: a dead holder's lease still expires after 15 s of our time.
        let mut seen = Observed::default();
        assert!(!may_take(&held("b", 3600), "a", &mut seen, s(0)));
        assert!(may_take(&held("b", 3600), "a", &mut seen, s(16)));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let cfg = LeaseConfig {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            owner: None,
        };
        let mut prev = held("b", 10);
        prev.lease_transitions = Some(4);
        let taken = spec_for(&cfg, Some(&prev), at(50));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(50))));
        let renewed = spec_for(&cfg, Some(&taken), at(52));
        assert_eq!(renewed.lease_transitions, Some(5));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(50))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(52))));
    }

    #[test]
    fn the_pod_owns_the_lease_only_when_name_and_uid_are_known() {
        let o = pod_owner(Some("op-0"), Some("u-1")).expect("owner");
        assert_eq!(
            (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
            ("Pod", "op-0", "u-1")
        );
        assert_eq!(o.controller, Some(false));
        assert!(pod_owner(Some("op-0"), None).is_none());
        assert!(pod_owner(Some(""), Some("u")).is_none());
        assert!(pod_owner(None, Some("u")).is_none());
    }
}
