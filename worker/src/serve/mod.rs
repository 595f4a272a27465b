//! The long-running roles of a deployment — gateway, pipeline stage, expert shard — and the
//! one-machine launcher that starts them as separate processes.

pub mod bench;
pub mod discovery;
pub mod expert;
pub mod gateway;
pub mod local;
pub mod metrics;
pub mod stage;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Largest gRPC message a worker accepts or sends, unless configured.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Options every gRPC server role shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Exit when standard input closes (the local launcher sets this, so a child never
    /// outlives it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,

    /// After a stop signal, report NOT_SERVING and keep serving this long (milliseconds) before
    /// closing, so peers that discover this process stop sending it work first.
    #[arg(long, env = "MOE_DRAIN_MS", default_value_t = 0)]
    pub drain_ms: u64,

    #[command(flatten)]
    pub tls: tls::TlsArgs,

    /// Also serve `grpc.health.v1` (only) in plaintext on this address, for Kubernetes gRPC
    /// probes, which cannot present a client certificate.
    #[arg(long, env = "MOE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Serve Prometheus `/metrics` in plaintext on this address (port 0 picks one; the address
    /// is printed after the `listening on` line).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// What a stage and an expert shard are both told: the model, where to listen, which layers
/// they own, and their index in the plan.
#[derive(Debug, clap::Args)]
pub struct PartArgs {
    #[command(flatten)]
    pub model: crate::load::ModelArgs,

    #[command(flatten)]
    pub server: ServerArgs,

    /// Owned layers, START..END (end exclusive).
    #[arg(long, env = "MOE_LAYERS", value_parser = parse_range)]
    pub layers: std::ops::Range<usize>,

    /// This stage's or shard's index in the plan (reported by Describe).
    #[arg(long, env = "MOE_INDEX", default_value_t = 0)]
    pub index: u32,

    /// Element type of the activations this process sends (f32, or bf16: half the bytes
    /// per hop, each value rounded to nearest). Receivers read either.
    #[arg(long, env = "MOE_WIRE_DTYPE", default_value_t = moe_proto::WireDtype::F32)]
    pub wire_dtype: moe_proto::WireDtype,
}

/// Parses `START..END`.
pub fn parse_range(s: &str) -> std::result::Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not START..END"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("`{a}` is not a layer index"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("`{b}` is not a layer index"))?;
    if a >= b {
        return Err(format!("`{s}` is an empty range"));
    }
    Ok(a..b)
}

/// Binds `addr` and prints `listening on ADDR` on stdout (the launcher reads it).
pub async fn bind(addr: SocketAddr, role: &str) -> Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::peer(role, format!("cannot listen on {addr}: {e}")))?;
    let local = l
        .local_addr()
        .map_err(|e| Error::peer(role, format!("listener address: {e}")))?;
    println!("{role} listening on {local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(l)
}

/// Accepted connections with Nagle's algorithm off: activations are latency-bound messages,
/// and delayed ACKs would otherwise add tens of milliseconds per hop.
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    })
}

/// HTTP/2 flow-control windows: activations are megabytes, and the 64 KiB default would
/// stall every large tensor on window updates.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame: fewer frames per tensor.
const FRAME: u32 = 1 << 20;

/// A gRPC server with the data plane's transport settings.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(FRAME))
        .tcp_nodelay(true)
}

/// Serves a role's gRPC services (health first) on `listener` until a shutdown signal. On the
/// signal the health service turns NOT_SERVING, the server keeps serving for `--drain-ms`, then
/// stops accepting and gives in-flight calls up to [`CLOSE_GRACE`] to finish.
pub async fn serve_grpc<H>(
    role: &str,
    routes: tonic::service::Routes,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
    listener: TcpListener,
    server_args: &ServerArgs,
    health: tonic_health::server::HealthReporter,
) -> Result<()>
where
    H: tonic_health::pb::health_server::Health,
{
    if let Some(addr) = server_args.health_listen {
        let probes = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::peer(role, format!("cannot listen on {addr} for probes: {e}")))?;
        let routes = tonic::service::Routes::new(health_service);
        tokio::spawn(async move {
            let r = server()
                .add_routes(routes)
                .serve_with_incoming(incoming(probes))
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "health server stopped");
            }
        });
    }
    let (exit_with_stdin, drain) = (
        server_args.exit_with_stdin,
        Duration::from_millis(server_args.drain_ms),
    );
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        shutdown_signal(exit_with_stdin).await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        if !drain.is_zero() {
            tracing::info!(?drain, "stop requested: draining");
            tokio::time::sleep(drain).await;
        }
        let _ = closing_tx.send(true);
    };
    let serve = server()
        .add_routes(routes)
        .serve_with_incoming_shutdown(tls::accept(listener, tls::current()), stop);
    // A long-lived stream (the pipeline's) would hold a graceful shutdown open forever.
    let mut closing = closing_rx;
    let cap = async move {
        let _ = closing.wait_for(|c| *c).await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        r = serve => r.map_err(|e| Error::peer(role, format!("server: {e}"))),
        _ = cap => {
            tracing::info!("in-flight calls did not finish within {CLOSE_GRACE:?}; closing");
            Ok(())
        }
    }
}

/// How long in-flight calls may run after a server stops accepting new ones.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A lazily connecting channel to a peer worker at a fixed address (`discovery::channel`
/// also takes `kube:SERVICE:PORT`).
pub fn channel(addr: &str) -> Result<Channel> {
    let ep = endpoint(addr)?;
    Ok(match tls::current() {
        Some(t) => ep.connect_with_connector_lazy(tls::Connector::new(t)),
        None => ep.connect_lazy(),
    })
}

/// The data plane's transport settings for a peer at a fixed address.
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| Error::invalid("peer address", format!("`{addr}`: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(FRAME))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Resolves when the process should stop: SIGINT, SIGTERM, or (when asked) standard input
/// closing.
pub async fn shutdown_signal(exit_with_stdin: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let stdin_closed = async move {
        if !exit_with_stdin {
            return std::future::pending::<()>().await;
        }
        // A blocking read on its own thread: EOF or an error means the parent is gone.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        });
        let _ = rx.await;
    };
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = stdin_closed => {}
    }
}

/// 64 random bits from the kernel (names that must differ between processes: a gateway's
/// owner name, the launcher's certificate folder); without /dev/urandom, the clock's
/// nanoseconds, which still differ between instances.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

/// The current time as milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Time left until a deadline in Unix milliseconds (`None`: no deadline; zero: passed).
pub fn remaining(deadline_unix_ms: u64) -> Option<Duration> {
    (deadline_unix_ms != 0)
        .then(|| Duration::from_millis(deadline_unix_ms.saturating_sub(now_unix_ms())))
}

/// Maps an engine error to a gRPC status: bad input is `INVALID_ARGUMENT`.
pub fn to_status(e: Error) -> tonic::Status {
    match e {
        Error::InvalidInput { .. } | Error::Tensor { .. } => {
            tonic::Status::invalid_argument(e.to_string())
        }
        Error::Deadline(_) => tonic::Status::deadline_exceeded(e.to_string()),
        Error::Peer { .. } => tonic::Status::unavailable(e.to_string()),
        Error::Overloaded(_) => tonic::Status::resource_exhausted(e.to_string()),
        _ => tonic::Status::internal(e.to_string()),
    }
}

/// A blocking HTTP/1.1 request to a gateway whose 200 answer is JSON (the launcher's demo
/// prompt and the benchmarks; the worker does not need an HTTP client crate for this).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    use std::io::Read;
    let err = |e: std::io::Error| Error::peer("http", e.to_string());
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = send_request(addr, method, path, &body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(err)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(Error::peer(
            "http",
            format!("{path}: {}", head.lines().next().unwrap_or("")),
        ));
    }
    serde_json::from_str(body).map_err(|e| Error::peer("http", format!("{path}: {e}")))
}

/// Connects to `addr` and sends one HTTP/1.1 request with a JSON `body` (the connection
/// closes after the answer).
fn send_request(addr: &str, method: &str, path: &str, body: &str) -> Result<std::net::TcpStream> {
    use std::io::Write;
    let err = |e: std::io::Error| Error::peer("http", e.to_string());
    let mut s = std::net::TcpStream::connect(addr).map_err(err)?;
    let _ = s.set_nodelay(true);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(err)?;
    Ok(s)
}

/// A blocking streaming completion (`"stream": true` is set on `body`) from a gateway: the
/// seconds after sending at which each generated token arrived.
pub fn http_token_times(addr: &str, path: &str, body: &serde_json::Value) -> Result<Vec<f64>> {
    use std::io::BufRead;
    let err = |e: std::io::Error| Error::peer("http", e.to_string());
    let mut body = body.clone();
    body["stream"] = serde_json::Value::Bool(true);
    let start = std::time::Instant::now();
    let s = send_request(addr, "POST", path, &body.to_string())?;
    let mut lines = std::io::BufReader::new(s).lines();
    let status = lines.next().transpose().map_err(err)?.unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(Error::peer("http", format!("{path}: {status}")));
    }
    let mut times = Vec::new();
    for line in lines {
        let line = line.map_err(err)?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| Error::peer("http", format!("{path}: an event: {e}")))?;
        if let Some(m) = event.get("error") {
            return Err(Error::peer("http", format!("{path}: {m}")));
        }
        let n = event["choices"][0]["token_ids"]
            .as_array()
            .map_or(0, Vec::len);
        let at = start.elapsed().as_secs_f64();
        times.extend(std::iter::repeat_n(at, n));
    }
    Ok(times)
}

/// Parses comma-separated peer addresses.
pub fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Per-(layer, expert) routed-token counters and work counters, read by `LoadStats`.
#[derive(Debug, Default)]
pub struct LoadCounters {
    inner: std::sync::Mutex<LoadInner>,
}

#[derive(Debug, Default)]
struct LoadInner {
    experts: std::collections::BTreeMap<(u32, u32), u64>,
    batches: u64,
    rows: u64,
    busy: Duration,
    expert_wait: Duration,
    failures: u64,
    rejected: u64,
}

impl LoadCounters {
    pub fn record_batch(&self, rows: usize, busy: Duration) {
        if let Ok(mut g) = self.inner.lock() {
            g.batches += 1;
            g.rows += rows as u64;
            g.busy += busy;
        }
    }

    /// A micro-batch (stage) or call (expert) that failed after it was accepted.
    pub fn record_failure(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.failures += 1;
        }
    }

    /// A call refused for capacity (RESOURCE_EXHAUSTED).
    pub fn record_rejected(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.rejected += 1;
        }
    }

    /// Writes the counters as `PREFIX_*` families of a stage's micro-batches or an expert
    /// shard's calls.
    pub fn expose(&self, e: &mut metrics::Exposition, prefix: &str, unit: metrics::Unit) {
        use metrics::Kind::Counter;
        let Ok(g) = self.inner.lock() else { return };
        let (name, what) = match unit {
            metrics::Unit::MicroBatches => ("microbatches", "micro-batches"),
            metrics::Unit::Calls => ("calls", "calls"),
        };
        e.single(
            &format!("{prefix}_{name}_total"),
            Counter,
            &format!("{what} served"),
            g.batches as f64,
        );
        e.single(
            &format!("{prefix}_rows_total"),
            Counter,
            &format!("Rows (tokens) in the {what} served"),
            g.rows as f64,
        );
        e.single(
            &format!("{prefix}_busy_seconds_total"),
            Counter,
            &format!("Seconds spent computing {what}"),
            g.busy.as_secs_f64(),
        );
        e.single(
            &format!("{prefix}_failures_total"),
            Counter,
            &format!("{what} that failed after they were accepted"),
            g.failures as f64,
        );
        e.single(
            &format!("{prefix}_rejected_total"),
            Counter,
            &format!("{what} refused for capacity (RESOURCE_EXHAUSTED)"),
            g.rejected as f64,
        );
        if unit == metrics::Unit::MicroBatches {
            e.single(
                &format!("{prefix}_expert_wait_seconds_total"),
                Counter,
                "Of the busy seconds, the time spent waiting for expert shards (their compute and transport)",
                g.expert_wait.as_secs_f64(),
            );
        }
        let tokens: Vec<(u32, u32, u64)> =
            g.experts.iter().map(|(&(l, x), &n)| (l, x, n)).collect();
        drop(g);
        metrics::expert_tokens(
            e,
            &format!("{prefix}_expert_tokens_total"),
            "Tokens routed to each (layer, expert) by this process",
            &tokens,
        );
    }

    pub fn record_expert_wait(&self, d: Duration) {
        if let Ok(mut g) = self.inner.lock() {
            g.expert_wait += d;
        }
    }

    pub fn record_experts(&self, layer: usize, counts: impl Iterator<Item = (usize, usize)>) {
        if let Ok(mut g) = self.inner.lock() {
            for (e, n) in counts {
                if n > 0 {
                    *g.experts.entry((layer as u32, e as u32)).or_default() += n as u64;
                }
            }
        }
    }

    /// The counters now. They only grow: a request to reset them is refused (any peer could
    /// otherwise zero the statistics the autoscaler reads); readers take differences.
    pub fn snapshot(
        &self,
        reset: bool,
        active: u32,
    ) -> Result<moe_proto::v1::LoadStatsResponse, tonic::Status> {
        if reset {
            return Err(tonic::Status::permission_denied(
                "reset: load counters are never reset; read them twice and take the difference",
            ));
        }
        let Ok(g) = self.inner.lock() else {
            return Err(tonic::Status::internal("load counters lock poisoned"));
        };
        let out = moe_proto::v1::LoadStatsResponse {
            experts: g
                .experts
                .iter()
                .map(|(&(layer, expert), &tokens)| moe_proto::v1::ExpertLoad {
                    layer,
                    expert,
                    tokens,
                })
                .collect(),
            batches: g.batches,
            rows: g.rows,
            active_sequences: active,
            busy_seconds: g.busy.as_secs_f64(),
            expert_wait_seconds: g.expert_wait.as_secs_f64(),
        };
        Ok(out)
    }
}
