//! One request is one trace across processes: the gateway's request span, the stages' work
//! on its micro-batches, and the expert shards' computations share a trace id, with parent
//! links that cross the process boundaries (W3C trace context in gRPC metadata and in the
//! micro-batch messages).

#[path = "support/deploy.rs"]
mod deploy;
#[path = "support/otlp.rs"]
mod otlp;

use std::collections::HashMap;
use std::time::Duration;

use deploy::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_trace_across_gateway_stages_and_experts() {
    let collector = otlp::Collector::start().await;
    let endpoint = collector.endpoint();
    let d = tokio::task::spawn_blocking(move || {
        Deployment::start_with_env(
            "synthetic:tiny",
            2,
            2,
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
    })
    .await
    .expect("start");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", d.base))
        .json(&serde_json::json!({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    // Stopping flushes every process's spans.
    tokio::task::spawn_blocking(move || d.stop())
        .await
        .expect("stop");
    let spans = collector.spans();
    let by_id: HashMap<&str, &otlp::CollectedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let request = spans
        .iter()
        .find(|s| s.name == "gateway.request")
        .unwrap_or_else(|| panic!("no gateway.request span in {spans:#?}"));
    assert_eq!(request.service, "moe-gateway");
    let trace: Vec<&otlp::CollectedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == request.trace_id)
        .collect();
    for (service, name) in [
        ("moe-gateway", "gateway.step"),
        ("moe-stage", "stage.forward"),
        ("moe-expert", "expert.compute"),
    ] {
        assert!(
            trace.iter().any(|s| s.service == service && s.name == name),
            "no {name} span from {service} in the request's trace: {trace:#?}"
        );
    }
    // Each remote span's parent is a span of the process that called it.
    for s in &trace {
        let parent_service = |s: &otlp::CollectedSpan| {
            by_id
                .get(s.parent_span_id.as_str())
                .map(|p| p.service.clone())
                .unwrap_or_default()
        };
        match s.name.as_str() {
            "expert.compute" => assert_eq!(parent_service(s), "moe-stage", "{s:?}"),
            "stage.forward" => {
                let p = parent_service(s);
                assert!(p == "moe-gateway" || p == "moe-stage", "{s:?} parent {p}");
            }
            _ => {}
        }
    }
    // Both stages took part.
    let stage_spans = trace.iter().filter(|s| s.name == "stage.forward").count();
    assert!(
        stage_spans >= 2 * 3,
        "{stage_spans} stage spans for 3 steps over 2 stages"
    );
}
