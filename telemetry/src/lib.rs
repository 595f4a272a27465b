//! Tracing + OpenTelemetry setup for the worker roles and the operator.
//!
//! [`init`] installs the global `tracing` subscriber:
//!
//! * a `fmt` layer writing to stderr, filtered by the `MOE_LOG` env var
//!   (EnvFilter syntax, default `warn`; `RUST_LOG` when `MOE_LOG` is unset);
//! * a `tracing-opentelemetry` layer, filtered independently at INFO and above
//!   (so `MOE_LOG` only controls stderr). Spans are exported over OTLP/gRPC
//!   (tonic) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; otherwise the layer still
//!   assigns trace/span ids (nothing is exported) so W3C `traceparent`
//!   propagation keeps working through roles that do not export.
//!
//! The global text-map propagator is always W3C TraceContext.
//!
//! The exporter's gRPC channel is driven by a small dedicated tokio runtime
//! owned by the [`Telemetry`] guard, not by the application's runtime: the SDK's
//! batch span processor exports from its own OS thread (blocking), so tying the
//! channel to the app runtime would deadlock `shutdown()` when it is called from
//! a (current-thread) runtime worker. With the private runtime, `shutdown()` is
//! safe from anywhere, including inside `async fn main`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Env var holding the stderr log filter (EnvFilter syntax).
pub const LOG_ENV: &str = "MOE_LOG";
const DEFAULT_LOG: &str = "warn";
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Guard returned by [`init`]. Call [`Telemetry::shutdown`] before the process
/// exits to flush buffered spans. Dropping it without calling `shutdown` also
/// shuts down (best effort).
#[derive(Debug, Default)]
pub struct Telemetry {
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: SdkTracerProvider,
    /// Drives the OTLP tonic channel; `None` when no exporter is configured.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are being exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.runtime.is_some())
    }

    /// Flush pending spans and shut the tracer provider down. Blocks (up to
    /// ~10 s) but is safe to call from inside a tokio runtime of any flavour.
    pub fn shutdown(mut self) {
        if let Some(inner) = self.inner.take() {
            inner.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.shutdown();
        }
    }
}

impl Inner {
    fn shutdown(self) {
        // Flush first so a slow/unreachable collector cannot lose the tail
        // silently; errors are reported on stderr only.
        if let Err(e) = self.provider.force_flush() {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("telemetry: tracer provider shutdown failed: {e}");
        }
        if let Some(rt) = self.runtime {
            // Never blocks, so it cannot panic inside an async context.
            rt.shutdown_background();
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Install the global subscriber and propagator, logging text. Returns a no-op guard if
/// called more than once (or if another global subscriber is already set).
pub fn init(service_name: &str) -> Telemetry {
    init_with_format(service_name, LogFormat::Text)
}

/// [`init`] with a choice of log format.
pub fn init_with_format(service_name: &str, format: LogFormat) -> Telemetry {
    if INITIALIZED.swap(true, Ordering::SeqCst) {
        return Telemetry::default();
    }

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    // `MOE_LOG` wins; `RUST_LOG` is honoured too, as Rust users expect.
    let log_env = if env_set(LOG_ENV) {
        LOG_ENV
    } else {
        "RUST_LOG"
    };
    let fmt_filter = EnvFilter::try_from_env(log_env).unwrap_or_else(|e| {
        if std::env::var_os(log_env).is_some() {
            eprintln!("telemetry: invalid {log_env} ({e}); using \"{DEFAULT_LOG}\"");
        }
        EnvFilter::new(DEFAULT_LOG)
    });
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(fmt_filter);

    let exporting =
        env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let (provider, runtime, export_error) = if exporting {
        match build_exporting_provider(service_name) {
            Ok((p, rt)) => (p, Some(rt), None),
            Err(e) => (SdkTracerProvider::builder().build(), None, Some(e)),
        }
    } else {
        (SdkTracerProvider::builder().build(), None, None)
    };

    let otel_filter = Targets::new()
        .with_default(LevelFilter::INFO)
        // Never trace the exporter's own transport (feedback loops).
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF);
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name.to_owned()))
        .with_filter(otel_filter);

    let installed = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if !installed {
        // Someone else owns the global subscriber; ours would never see spans.
        eprintln!(
            "telemetry: a global tracing subscriber was already set; OTel layer not installed"
        );
        let inner = Inner { provider, runtime };
        inner.shutdown();
        return Telemetry::default();
    }
    if let Some(e) = export_error {
        tracing::error!("telemetry: OTLP exporter disabled: {e}");
    }
    let telemetry = Telemetry {
        inner: Some(Inner { provider, runtime }),
    };
    if telemetry.exporting() {
        tracing::debug!(
            service = service_name,
            "telemetry: exporting spans over OTLP/gRPC"
        );
    }
    telemetry
}

fn build_exporting_provider(
    service_name: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()
        .map_err(|e| format!("creating exporter runtime: {e}"))?;
    // tonic's lazy channel spawns its worker onto the current runtime.
    let exporter = {
        let _guard = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    };
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            runtime.shutdown_background();
            return Err(e.to_string());
        }
    };
    // The default resource detectors read OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES; only fall back to our name if unset.
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok((provider, runtime))
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Write `span`'s trace context (`traceparent`/`tracestate`) into gRPC metadata.
pub fn inject_metadata(span: &tracing::Span, md: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(md));
    });
}

/// Read a remote trace context from gRPC metadata (empty context if absent).
pub fn extract_metadata(md: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(md)))
}

/// `span`'s trace context as a string map (e.g. to embed in a JSON message).
pub fn inject_map(span: &tracing::Span) -> HashMap<String, String> {
    let cx = span.context();
    let mut map = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map
}

/// Read a remote trace context from a string map (empty context if absent).
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(map))
}

/// Make `cx` the OTel parent of `span`. Must be called before the span is
/// entered or its context is read (inject/trace_id); later calls are ignored.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    let _ = span.set_parent(cx);
}

/// 32-hex-digit trace id of `span`'s OTel context, `None` if it has none
/// (span disabled, or no OTel layer installed).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format!("{:032x}", sc.trace_id()))
}
