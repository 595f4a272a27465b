//! `/metrics` of the gRPC roles (stages and expert shards), served in plaintext on
//! `--metrics-listen`: what each process holds now (KV caches, running calls) and what it has
//! done since it started (micro-batches, rows, busy seconds, failures, routed tokens).
//!
//! Every value is read from the state it describes at scrape time (the KV store's size, the
//! semaphores' permits, the load counters), so a gauge cannot drift from that state; counters
//! only grow for the life of the process (`process_start_time_seconds` marks a restart).
//! Which deployment, role and index a sample belongs to comes from the scrape's target labels
//! (the pod's labels), plus `moe_worker_info`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A Prometheus text exposition (format 0.0.4), one family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// What a process's load counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A stage's micro-batches.
    MicroBatches,
    /// An expert shard's calls.
    Calls,
}

/// A metric family's type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Exposition {
    /// Starts family `name` (for counters, `name` ends in `_total`).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The families every role shares: `moe_worker_info` and the process start time.
pub fn process(e: &mut Exposition, role: &str, index: u32, model: &str) {
    let index = index.to_string();
    e.family(
        "moe_worker_info",
        Kind::Gauge,
        "1, labelled with this process's role, index in the plan, model and version",
    )
    .sample(
        "moe_worker_info",
        &[
            ("role", role),
            ("index", &index),
            ("model", model),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );
    e.single(
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since the Unix epoch, in seconds",
        start_time(),
    );
}

fn start_time() -> f64 {
    static START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

/// Routed tokens per (layer, expert) as `name{layer,expert}`.
pub fn expert_tokens(e: &mut Exposition, name: &str, help: &str, stats: &[(u32, u32, u64)]) {
    e.family(name, Kind::Counter, help);
    for &(layer, expert, tokens) in stats {
        let (l, x) = (layer.to_string(), expert.to_string());
        e.sample(name, &[("layer", &l), ("expert", &x)], tokens as f64);
    }
}

/// What a role renders on each scrape, once its model is loaded.
pub type Render = Box<dyn Fn(&mut Exposition) + Send + Sync>;

/// Set by a role when it is ready to report more than its process families.
pub type Late = Arc<std::sync::OnceLock<Render>>;

/// The process's identity in `moe_worker_info`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub role: &'static str,
    pub index: u32,
    pub model: String,
}

impl Identity {
    /// A stage's or expert shard's, from its arguments.
    pub fn of(role: &'static str, part: &super::PartArgs) -> Self {
        Self {
            role,
            index: part.index,
            model: part.model.model.to_string(),
        }
    }
}

/// Binds `addr` (when given), prints `ROLE metrics on http://ADDR` (after the `listening on`
/// line, which the launcher reads first) and serves `GET /metrics` until the process ends:
/// the process families, `moe_worker_loaded`, and what `late` renders once set. Returns what
/// the role sets when its model is loaded.
pub async fn serve(addr: Option<SocketAddr>, id: Identity) -> Result<Late> {
    use axum::routing::get;
    let late = Late::default();
    let Some(addr) = addr else { return Ok(late) };
    let role = id.role;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::peer(role, format!("cannot listen on {addr} for metrics: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::peer(role, format!("metrics listener address: {e}")))?;
    println!("{role} metrics on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let render = {
        let late = late.clone();
        move || {
            let mut e = Exposition::default();
            process(&mut e, id.role, id.index, &id.model);
            let r = late.get();
            e.single(
                "moe_worker_loaded",
                Kind::Gauge,
                "1 once the process has loaded its weights and serves",
                if r.is_some() { 1.0 } else { 0.0 },
            );
            if let Some(r) = r {
                r(&mut e);
            }
            e.finish()
        }
    };
    let render = Arc::new(render);
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%role, error = %e, "metrics server stopped");
        }
    });
    Ok(late)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut e = Exposition::default();
        e.single("a_total", Kind::Counter, "A thing", 3.0);
        e.family("b", Kind::Gauge, "B")
            .sample("b", &[("x", "q\"uote\\d\n")], 0.5)
            .sample("b", &[("x", "inf")], f64::INFINITY);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP a_total A thing\n# TYPE a_total counter\na_total 3\n\
             # HELP b B\n# TYPE b gauge\nb{x=\"q\\\"uote\\\\d\\n\"} 0.5\nb{x=\"inf\"} +Inf\n"
        );
    }
}
