//! The gateway's Prometheus metrics: `moe_gateway_*` for requests and steps, and the expert
//! load the stages report (`moe_expert_tokens_total{layer,expert}`,
//! `moe_expert_load_imbalance`), refreshed by polling the stages' `LoadStats` (never reset).
//!
//! Every gateway replica polls the same stages, so each exports the deployment's whole count:
//! aggregate replicas with `max by (layer, expert)`, not `sum`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabel {
    pub layer: u32,
    pub expert: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    pub lane: u32,
}

pub struct Metrics {
    registry: Registry,
    /// Unprefixed: `moe_expert_*`.
    experts: Registry,
    pub expert_tokens: Family<ExpertLabel, Counter>,
    pub expert_load_imbalance: Gauge<f64, AtomicU64>,
    pub requests: Family<RequestLabel, Counter>,
    pub finish: Family<FinishLabel, Counter>,
    pub admitted: Counter,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub queue_depth: Gauge,
    pub queue_capacity: Gauge,
    pub max_sequences: Gauge,
    pub lane_sequences: Family<LaneLabel, Gauge>,
    pub ready: Gauge,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    /// The count and sum of the two histograms above, for `/v1/stats` (prometheus-client
    /// keeps its own private).
    pub first_token_totals: Totals,
    pub output_token_totals: Totals,
    pub sequence_duration: Histogram,
    pub step_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moe_gateway");
        let m = Self {
            requests: Family::default(),
            finish: Family::default(),
            admitted: Counter::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            max_sequences: Gauge::default(),
            lane_sequences: Family::default(),
            ready: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            time_per_output_token: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            first_token_totals: Totals::default(),
            output_token_totals: Totals::default(),
            sequence_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            registry: Registry::default(),
            experts: Registry::default(),
            expert_tokens: Family::default(),
            expert_load_imbalance: Gauge::default(),
        };
        let mut experts = Registry::default();
        experts.register(
            "moe_expert_tokens",
            "Tokens routed to each (layer, expert), all stages together (cumulative)",
            m.expert_tokens.clone(),
        );
        experts.register(
            "moe_expert_load_imbalance",
            "Busiest (layer, expert) over the mean of all the model's (layer, expert) pairs, \
             in routed tokens over the last poll window (1 = balanced, 0 = no traffic)",
            m.expert_load_imbalance.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "sequences_admitted",
            "Sequences a lane took from the queue (running = admitted - finished)",
            m.admitted.clone(),
        );
        registry.register(
            "sequences_finished",
            "Sequences finished, by reason (stop, length, cancelled: the client went away, \
             error: failed or timed out)",
            m.finish.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens admitted",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a lane",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_capacity",
            "Requests that may wait for a lane before new ones are refused with 429",
            m.queue_capacity.clone(),
        );
        registry.register(
            "max_sequences",
            "Most sequences running at once, over all lanes",
            m.max_sequences.clone(),
        );
        registry.register(
            "lane_sequences",
            "Sequences running per lane",
            m.lane_sequences.clone(),
        );
        registry.register("ready", "1 when every stage is serving", m.ready.clone());
        registry.register(
            "time_to_first_token_seconds",
            "Time from admission to the first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Time between two tokens of one sequence (after its first)",
            m.time_per_output_token.clone(),
        );
        registry.register(
            "sequence_duration_seconds",
            "Time from admission to the last token, of sequences that finished normally",
            m.sequence_duration.clone(),
        );
        registry.register(
            "step_seconds",
            "Round trip of one micro-batch through the pipeline",
            m.step_seconds.clone(),
        );
        Self {
            registry,
            experts,
            ..m
        }
    }

    /// Adds one window's routed tokens per (layer, expert) and sets the imbalance gauge over
    /// the model's `pairs` (layers × experts).
    pub fn record_expert_window(&self, deltas: &[((u32, u32), u64)], pairs: usize) {
        for &((layer, expert), d) in deltas {
            self.expert_tokens
                .get_or_create(&ExpertLabel { layer, expert })
                .inc_by(d);
        }
        self.expert_load_imbalance.set(imbalance(deltas, pairs));
    }

    /// A sequence's first token, `seconds` after its admission.
    pub fn first_token(&self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
        self.first_token_totals.add(seconds);
    }

    /// A further token of a sequence, `seconds` after its previous one.
    pub fn next_token(&self, seconds: f64) {
        self.time_per_output_token.observe(seconds);
        self.output_token_totals.add(seconds);
    }

    pub fn finished(&self, reason: &str) {
        self.finish
            .get_or_create(&FinishLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabel {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.experts);
        let _ = encode_eof(&mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How many observations and their sum, both only growing.
#[derive(Debug, Default)]
pub struct Totals {
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Totals {
    pub fn add(&self, seconds: f64) {
        let ns = if seconds.is_finite() && seconds > 0.0 {
            (seconds * 1e9).min(u64::MAX as f64) as u64
        } else {
            0
        };
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// The last cumulative reading of every (layer, expert) counter, to turn readings into
/// increments.
#[derive(Debug, Default)]
pub struct ExpertTotals {
    last: HashMap<(u32, u32), u64>,
}

impl ExpertTotals {
    /// Tokens routed to each (layer, expert) since the previous reading. A counter that went
    /// down was reset (a stage restarted, or `/v1/stats?reset=true`): it counts from zero.
    pub fn fold(
        &mut self,
        reading: impl IntoIterator<Item = ((u32, u32), u64)>,
    ) -> Vec<((u32, u32), u64)> {
        let mut out: Vec<((u32, u32), u64)> = reading
            .into_iter()
            .map(|(k, now)| {
                let before = self.last.insert(k, now).unwrap_or(0);
                (k, if now >= before { now - before } else { now })
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// max / mean routed tokens per (layer, expert) over `pairs` pairs (the unseen ones count as
/// zero); 0 when nothing was routed.
pub fn imbalance(deltas: &[((u32, u32), u64)], pairs: usize) -> f64 {
    let total: u64 = deltas.iter().map(|(_, d)| d).sum();
    let max = deltas.iter().map(|&(_, d)| d).max().unwrap_or(0);
    let pairs = pairs.max(deltas.len()).max(1);
    if total == 0 {
        return 0.0;
    }
    max as f64 / (total as f64 / pairs as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_increments_and_the_imbalance() {
        let mut t = ExpertTotals::default();
        assert_eq!(
            t.fold([((0, 1), 10), ((0, 0), 30)]),
            vec![((0, 0), 30), ((0, 1), 10)]
        );
        // Counters keep growing; one was reset to 4.
        let d = t.fold([((0, 0), 50), ((0, 1), 4)]);
        assert_eq!(d, vec![((0, 0), 20), ((0, 1), 4)]);
        // Four pairs, two idle: mean 6, max 20.
        assert!((imbalance(&d, 4) - 20.0 / 6.0).abs() < 1e-12);
        assert_eq!(imbalance(&[((0, 0), 0)], 4), 0.0);

        let m = Metrics::new();
        m.record_expert_window(&d, 4);
        m.record_expert_window(&[((0, 0), 5)], 4);
        let text = m.render();
        assert!(
            text.contains("moe_expert_tokens_total{layer=\"0\",expert=\"0\"} 25"),
            "{text}"
        );
        assert!(text.contains("moe_expert_load_imbalance 4.0"), "{text}");
        assert!(text.contains("moe_gateway_ready"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn latency_totals_follow_the_histograms() {
        let m = Metrics::new();
        m.first_token(0.5);
        m.next_token(0.25);
        m.next_token(0.125);
        // A clock that went backwards counts the observation, not the negative time.
        m.next_token(-1.0);
        assert_eq!(m.first_token_totals.count(), 1);
        assert!((m.first_token_totals.sum_seconds() - 0.5).abs() < 1e-9);
        assert_eq!(m.output_token_totals.count(), 3);
        assert!((m.output_token_totals.sum_seconds() - 0.375).abs() < 1e-9);
        let text = m.render();
        assert!(
            text.contains("moe_gateway_time_per_output_token_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("moe_gateway_time_to_first_token_seconds_count 1"),
            "{text}"
        );
    }
}
