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

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub failures: Family<KindLabel, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
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
        Self { registry, ..m }
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
    }
}
