//! `moe-operator run`: the controller, with leader election, an HTTP endpoint for metrics and
//! probes, structured logs, OpenTelemetry traces when configured, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::autoscale;
use crate::controller::{self, Context};
use crate::crd::MoEDeployment;
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::resources::{self, MANAGED_BY};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Image of the worker pods when a MoEDeployment names none.
    #[arg(long, env = "MOE_WORKER_IMAGE", default_value = concat!("ghcr.io/moe-serve/moe-worker:", env!("CARGO_PKG_VERSION")))]
    pub worker_image: String,

    /// A Secret the worker pods pull their image with (repeat, or separate with commas); it
    /// must exist in each MoEDeployment's namespace.
    #[arg(
        long = "image-pull-secret",
        env = "MOE_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub image_pull_secrets: Vec<String>,

    /// HTTP address of /metrics, /healthz and /readyz.
    #[arg(long, env = "MOE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "MOE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Run only while holding the leader Lease (`--leader-elect=false` to disable).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub leader_elect: bool,

    /// Name of the leader Lease.
    #[arg(long, default_value = "moe-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: this pod's, else the client's default).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// UID of this replica's Pod (downward API): the Pod owns the Lease while it leads.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// Seconds a Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_s: u64,

    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// MoEDeployments reconciled at the same time (0: no limit).
    #[arg(long, env = "MOE_RECONCILE_CONCURRENCY", default_value_t = 8)]
    pub reconcile_concurrency: u16,

    /// Milliseconds a reconcile waits for further changes of the same deployment (its
    /// workloads' status moves in bursts), so one reconcile covers them all.
    #[arg(long, env = "MOE_RECONCILE_DEBOUNCE_MS", default_value_t = 250)]
    pub reconcile_debounce_ms: u64,

    /// Seconds between two reads of each autoscaled deployment's gateway statistics.
    #[arg(long, env = "MOE_AUTOSCALE_INTERVAL_S", default_value_t = 5)]
    pub autoscale_interval_s: u64,

    /// Time constant, in seconds, of the moving average of each expert shard's load.
    #[arg(long, env = "MOE_AUTOSCALE_SMOOTHING_S", default_value_t = 20)]
    pub autoscale_smoothing_s: u64,

    /// Seconds of gateway counters each measurement in `status.performance.measured` covers
    /// (read every --autoscale-interval-s; the first ones cover what has been read so far).
    #[arg(long, env = "MOE_PERFORMANCE_WINDOW_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub performance_window_s: u64,

    /// Measured time per output token above this many times the plan's estimate is slower than
    /// planned (condition PerformanceAsPlanned False, reason SlowerThanPlanned, and a Warning
    /// Event) once it lasts --performance-sustain-s.
    #[arg(long, env = "MOE_PERFORMANCE_TOLERANCE", default_value_t = 1.5, value_parser = parse_tolerance)]
    pub performance_tolerance: f64,

    /// Seconds every measurement must stay above the tolerance before it is reported.
    #[arg(long, env = "MOE_PERFORMANCE_SUSTAIN_S", default_value_t = 300)]
    pub performance_sustain_s: u64,

    /// Create a Prometheus Operator PodMonitor for each MoEDeployment's worker pods (only
    /// where the cluster serves `monitoring.coreos.com/v1` PodMonitor).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub pod_monitors: bool,

    /// A label every PodMonitor carries, KEY=VALUE (repeat, or separate with commas), e.g.
    /// `release=kube-prometheus-stack` for the Prometheus that selects by it.
    #[arg(long = "pod-monitor-label", env = "MOE_POD_MONITOR_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub pod_monitor_labels: Vec<(String, String)>,

    /// Scrape interval of the PodMonitors (empty: Prometheus's own).
    #[arg(long, env = "MOE_POD_MONITOR_INTERVAL", default_value = "15s")]
    pub pod_monitor_interval: String,
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number (a factor such as 1.5)"))?;
    if !(x.is_finite() && x >= 1.0) {
        return Err(format!(
            "`{s}`: the tolerance is a factor of at least 1 (1.5: 50% slower than the estimate)"
        ));
    }
    Ok(x)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: the label name is empty"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn metrics(State(s): State<Http>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<Http>) -> StatusCode {
    if s.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Runs the operator until SIGTERM/SIGINT, or until leadership is lost (then it fails, so
/// that the pod restarts as a candidate).
pub async fn run(args: RunArgs) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("connecting to the Kubernetes API: {e}"))?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("reaching the Kubernetes API: {e}"))?;
    info!(server = %version.git_version, "connected to the API server");

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let http = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Http {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    info!(addr = %args.listen, "serving /metrics, /healthz, /readyz");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        let stopped = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, http)
            .with_graceful_shutdown(stopped)
            .await
        {
            error!(error = %e, "metrics server failed");
        }
    });
    // A standby replica is healthy and ready: it is where the next leader comes from.
    ready.store(true, Ordering::Relaxed);

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("moe-operator-{}", std::process::id()));
    let lease = LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string()),
        identity: identity.clone(),
        duration: Duration::from_secs(args.lease_duration_s.max(2)),
        retry: Duration::from_secs((args.lease_duration_s / 5).clamp(1, 5)),
        owner: leader::pod_owner(args.identity.as_deref(), args.pod_uid.as_deref()),
    };

    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut lost_leadership = false;
    if args.leader_elect {
        tokio::select! {
            _ = leader::acquire(client.clone(), &lease) => {}
            _ = &mut signal => {
                let _ = stop_tx.send(true);
                let _ = http_task.await;
                return Ok(());
            }
        }
        metrics.leader.set(1);
    }

    let autoscale_store = Arc::new(autoscale::Store::default());
    let performance_store = Arc::new(crate::performance::Store::default());
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: resources::Config {
            worker_image: args.worker_image.clone(),
            image_pull_secrets: args.image_pull_secrets.clone(),
            pod_monitor: args.pod_monitors.then(|| resources::PodMonitorConfig {
                labels: args.pod_monitor_labels.iter().cloned().collect(),
                interval: args.pod_monitor_interval.clone(),
            }),
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "moe-operator".into(),
                instance: Some(identity),
            },
        ),
        metrics: metrics.clone(),
        autoscale: autoscale_store.clone(),
        performance: performance_store.clone(),
        applied: Default::default(),
        monitoring: Default::default(),
    });
    let (mds, sts, deps): (Api<MoEDeployment>, Api<StatefulSet>, Api<Deployment>) =
        match &args.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));

    let (ctl_stop_tx, mut ctl_stop_rx) = watch::channel(false);
    // Expert autoscaling and performance measurement sample the gateways outside reconcile and
    // ask for a reconcile when a decision or what status shows changes.
    let (scale_tx, scale_rx) = futures::channel::mpsc::unbounded();
    let controller = Controller::new(mds, watcher::Config::default().any_semantic());
    let autoscaler = tokio::spawn(autoscale::run(
        client.clone(),
        controller.store(),
        autoscale_store,
        performance_store,
        scale_tx,
        autoscale::LoopConfig {
            interval: Duration::from_secs(args.autoscale_interval_s.max(1)),
            smoothing: Duration::from_secs(args.autoscale_smoothing_s),
            performance: crate::performance::Config {
                window: Duration::from_secs(args.performance_window_s),
                tolerance: args.performance_tolerance,
                sustain: Duration::from_secs(args.performance_sustain_s),
            },
            ..autoscale::LoopConfig::default()
        },
    ));
    let controller = controller
        .owns(sts, owned.clone())
        .owns(deps, owned)
        .reconcile_all_on(scale_rx)
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(args.reconcile_concurrency)
                .debounce(Duration::from_millis(args.reconcile_debounce_ms)),
        )
        .graceful_shutdown_on(async move {
            let _ = ctl_stop_rx.wait_for(|s| *s).await;
        })
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                // Reconcile errors are logged by the error policy; these are watch errors.
                if !matches!(e, kube::runtime::controller::Error::ReconcilerFailed(..)) {
                    warn!(error = %e, "controller");
                }
            }
        });
    tokio::pin!(controller);

    let keep = async {
        if args.leader_elect {
            leader::keep(client.clone(), lease.clone()).await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        _ = &mut controller => {}
        _ = &mut signal => info!("shutting down"),
        _ = keep => {
            error!("lost the leader lease; stopping");
            lost_leadership = true;
        }
    }
    autoscaler.abort();
    // Let in-flight reconciles finish, then stop serving and hand the Lease over.
    let _ = ctl_stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(20), &mut controller)
        .await
        .is_err()
    {
        warn!("reconciles did not finish within 20s");
    }
    metrics.leader.set(0);
    if args.leader_elect && !lost_leadership {
        leader::release(&Api::namespaced(client.clone(), &lease.namespace), &lease).await;
    }
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    if lost_leadership {
        return Err("lost the leader lease".into());
    }
    Ok(())
}

async fn metrics_handler(state: State<Http>) -> impl IntoResponse {
    metrics(state).await
}
