//! The operator's Prometheus metrics: reconciles, their durations, failures by kind, leadership.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// One MoEDeployment. The label names match the workers' target labels (`namespace`,
/// `moe_deployment`), so rules join the two; the chart's ServiceMonitor honours them.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabel {
    pub namespace: String,
    pub moe_deployment: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub namespace: String,
    pub moe_deployment: String,
    pub moe_expert_shard: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabel {
    pub namespace: String,
    pub moe_deployment: String,
    pub direction: &'static str,
}

/// What the operator knows of one deployment's expert shards after a reconcile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardsSeen {
    /// Replicas each shard should have (its Deployment's spec).
    pub desired: Vec<i32>,
    /// Ready replicas each shard has.
    pub ready: Vec<i32>,
    /// With the operator's autoscaler: the busiest shard's load per replica over the mean,
    /// and whether it has no replica left to give (budget used, or the hot shards at max).
    pub autoscaler: Option<(f64, bool)>,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub failures: Family<KindLabel, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    pub shard_replicas: Family<ShardLabel, Gauge>,
    pub shard_ready: Family<ShardLabel, Gauge>,
    pub imbalance: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub at_budget: Family<DeploymentLabel, Gauge>,
    pub scaled: Family<ScaleLabel, Counter>,
    pub last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Shards exported per deployment, to drop the series of removed ones.
    shards: std::sync::Mutex<std::collections::HashMap<(String, String), usize>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moe_operator");
        let m = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            leader: Gauge::default(),
            shard_replicas: Family::default(),
            shard_ready: Family::default(),
            imbalance: Family::default(),
            at_budget: Family::default(),
            scaled: Family::default(),
            last_success: Gauge::default(),
            shards: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles of MoEDeployments, by result",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles, by the step that failed (apply, list, delete, status, build)",
            m.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            m.duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        registry.register(
            "last_successful_reconcile_timestamp_seconds",
            "When a reconcile last succeeded (Unix seconds; 0: never)",
            m.last_success.clone(),
        );
        registry.register(
            "expert_shard_replicas",
            "Replicas each expert shard should have (its Deployment's spec)",
            m.shard_replicas.clone(),
        );
        registry.register(
            "expert_shard_ready_replicas",
            "Ready replicas of each expert shard",
            m.shard_ready.clone(),
        );
        registry.register(
            "expert_load_imbalance",
            "Autoscaled deployments: the busiest expert shard's smoothed load per replica over \
             the mean (1 = balanced)",
            m.imbalance.clone(),
        );
        registry.register(
            "autoscaler_at_budget",
            "Autoscaled deployments: 1 when the autoscaler has no replica left to give (the \
             budget is used, or every shard above the mean load is at maxReplicas)",
            m.at_budget.clone(),
        );
        registry.register(
            "expert_scalings",
            "Replica changes of expert shards the autoscaler made, by direction",
            m.scaled.clone(),
        );
        Self {
            registry,
            shards: Default::default(),
            ..m
        }
    }

    /// Records what a reconcile saw of `namespace/name`'s shards.
    pub fn observe_shards(&self, namespace: &str, name: &str, seen: &ShardsSeen) {
        let shard = |j: usize| ShardLabel {
            namespace: namespace.into(),
            moe_deployment: name.into(),
            moe_expert_shard: j.to_string(),
        };
        let key = (namespace.to_string(), name.to_string());
        let before = {
            let mut map = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(key, seen.desired.len()).unwrap_or(0)
        };
        for j in seen.desired.len()..before {
            self.shard_replicas.remove(&shard(j));
            self.shard_ready.remove(&shard(j));
        }
        for (j, &r) in seen.desired.iter().enumerate() {
            self.shard_replicas
                .get_or_create(&shard(j))
                .set(i64::from(r));
            let ready = seen.ready.get(j).copied().unwrap_or(0);
            self.shard_ready
                .get_or_create(&shard(j))
                .set(i64::from(ready));
        }
        let d = DeploymentLabel {
            namespace: namespace.into(),
            moe_deployment: name.into(),
        };
        match seen.autoscaler {
            Some((imbalance, at_budget)) => {
                self.imbalance.get_or_create(&d).set(imbalance);
                self.at_budget.get_or_create(&d).set(i64::from(at_budget));
            }
            None => {
                self.imbalance.remove(&d);
                self.at_budget.remove(&d);
            }
        }
    }

    /// Counts one shard's replica change.
    pub fn observe_scaling(&self, namespace: &str, name: &str, from: i32, to: i32) {
        if from == to {
            return;
        }
        self.scaled
            .get_or_create(&ScaleLabel {
                namespace: namespace.into(),
                moe_deployment: name.into(),
                direction: if to > from { "up" } else { "down" },
            })
            .inc();
    }

    /// Drops every series of a deleted deployment.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.observe_shards(namespace, name, &ShardsSeen::default());
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_string(), name.to_string()));
        for direction in ["up", "down"] {
            self.scaled.remove(&ScaleLabel {
                namespace: namespace.into(),
                moe_deployment: name.into(),
                direction,
            });
        }
    }

    /// Records one reconcile; `failure` is the failing step's kind.
    pub fn observe_reconcile(&self, took: Duration, failure: Option<&'static str>) {
        self.duration.observe(took.as_secs_f64());
        let result = if failure.is_some() {
            "error"
        } else {
            "success"
        };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        if failure.is_none() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_success.set(now);
        }
        if let Some(kind) = failure {
            self.failures.get_or_create(&KindLabel { kind }).inc();
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_results_and_failure_kinds() {
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(3), None);
        m.observe_reconcile(Duration::from_millis(5), Some("apply"));
        let text = m.encode();
        assert!(
            text.contains("moe_operator_reconciles_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moe_operator_reconciles_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moe_operator_reconcile_failures_total{kind=\"apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moe_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(!text.contains("moe_operator_last_successful_reconcile_timestamp_seconds 0"));
    }

    #[test]
    fn shard_series_follow_the_deployment_and_go_with_it() {
        let m = Metrics::new();
        let seen = ShardsSeen {
            desired: vec![2, 1, 3],
            ready: vec![2, 0],
            autoscaler: Some((1.5, true)),
        };
        m.observe_shards("ns", "big", &seen);
        m.observe_scaling("ns", "big", 1, 3);
        let text = m.encode();
        for want in [
            "moe_operator_expert_shard_replicas{namespace=\"ns\",moe_deployment=\"big\",moe_expert_shard=\"2\"} 3",
            "moe_operator_expert_shard_ready_replicas{namespace=\"ns\",moe_deployment=\"big\",moe_expert_shard=\"1\"} 0",
            "moe_operator_expert_shard_ready_replicas{namespace=\"ns\",moe_deployment=\"big\",moe_expert_shard=\"2\"} 0",
            "moe_operator_expert_load_imbalance{namespace=\"ns\",moe_deployment=\"big\"} 1.5",
            "moe_operator_autoscaler_at_budget{namespace=\"ns\",moe_deployment=\"big\"} 1",
            "moe_operator_expert_scalings_total{namespace=\"ns\",moe_deployment=\"big\",direction=\"up\"} 1",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // One shard fewer, no autoscaler: its series and the autoscaler's go.
        m.observe_shards(
            "ns",
            "big",
            &ShardsSeen {
                desired: vec![2, 1],
                ready: vec![2, 1],
                autoscaler: None,
            },
        );
        let text = m.encode();
        assert!(!text.contains("moe_expert_shard=\"2\""), "{text}");
        assert!(
            !text.contains("moe_operator_autoscaler_at_budget{"),
            "{text}"
        );
        m.forget("ns", "big");
        let text = m.encode();
        assert!(!text.contains("big"), "{text}");
    }
}
