//! The gateway's Prometheus metrics.

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
pub struct LaneLabel {
    pub lane: u32,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabel, Counter>,
    pub finish: Family<FinishLabel, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub queue_depth: Gauge,
    pub lane_sequences: Family<LaneLabel, Gauge>,
    pub ready: Gauge,
    pub time_to_first_token: Histogram,
    pub step_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moe_gateway");
        let m = Self {
            requests: Family::default(),
            finish: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            lane_sequences: Family::default(),
            ready: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "sequences_finished",
            "Sequences finished, by reason",
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
            "step_seconds",
            "Round trip of one micro-batch through the pipeline",
            m.step_seconds.clone(),
        );
        Self { registry, ..m }
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
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
