//! Container probes: `grpc` (grpc.health.v1), `httpGet`, `tcpSocket` and `exec`, each sent to
//! the pod's own address or run inside the container's namespaces.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A probe's timing, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Timing {
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_millis(100)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_millis(100)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Consecutive results folded into a verdict, as the kubelet's prober does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter {
    successes: u32,
    failures: u32,
}

impl Counter {
    /// Records one result; returns `Some(true)` once `success_threshold` successes in a row are
    /// seen, `Some(false)` once `failure_threshold` failures in a row are, else `None`.
    pub fn record(&mut self, ok: bool, t: &Timing) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= t.success_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= t.failure_threshold).then_some(false)
        }
    }
}

/// Where a probe runs: the pod's address, and the container's process (for `exec`).
#[derive(Debug, Clone)]
pub struct Target {
    pub pod_ip: Ipv4Addr,
    pub pid: u32,
    pub env: Vec<(String, String)>,
}

/// Runs one probe attempt with its timeout; `Err` says why it failed.
pub async fn run(
    p: &Probe,
    c: &Container,
    target: &Target,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(p, c, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn attempt(p: &Probe, c: &Container, target: &Target) -> Result<(), String> {
    if let Some(g) = &p.grpc {
        let port = u16::try_from(g.port).map_err(|_| format!("bad grpc port {}", g.port))?;
        return grpc(target.pod_ip, port, g.service.clone().unwrap_or_default()).await;
    }
    if let Some(h) = &p.http_get {
        let port = resolve_port(&h.port, c)?;
        let host = h.host.clone().unwrap_or_else(|| target.pod_ip.to_string());
        let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let url = format!("{scheme}://{host}:{port}{path}");
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.get(&url);
        for hdr in h.http_headers.iter().flatten() {
            req = req.header(&hdr.name, &hdr.value);
        }
        let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        return if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {url}: HTTP {status}"))
        };
    }
    if let Some(t) = &p.tcp_socket {
        let port = resolve_port(&t.port, c)?;
        let host = t.host.clone().unwrap_or_else(|| target.pod_ip.to_string());
        return tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map(drop)
            .map_err(|e| format!("connect {host}:{port}: {e}"));
    }
    if let Some(e) = &p.exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err("exec probe without a command".into());
        }
        // The container's network and mount namespaces, its environment.
        let out = tokio::process::Command::new("nsenter")
            .arg(format!("--target={}", target.pid))
            .args(["--net", "--mount", "--"])
            .args(&cmd)
            .env_clear()
            .envs(target.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("exec {cmd:?}: {e}"))?;
        return if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "exec {cmd:?}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        };
    }
    Err("probe has no handler".into())
}

async fn grpc(ip: Ipv4Addr, port: u16, service: String) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{port}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("grpc connect {ip}:{port}: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .map_err(|e| format!("grpc health check {ip}:{port}: {e}"))?;
    let status = resp.into_inner().status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("grpc health {ip}:{port}: status {status}"))
    }
}

/// A probe port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("container {:?} has no port named {name:?}", c.name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    #[test]
    fn timing_defaults_match_kubernetes() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
    }

    #[test]
    fn counter_needs_consecutive_results() {
        let t = Timing::of(&Probe {
            success_threshold: Some(2),
            failure_threshold: Some(2),
            ..Default::default()
        });
        let mut c = Counter::default();
        assert_eq!(c.record(true, &t), None);
        assert_eq!(c.record(false, &t), None);
        assert_eq!(c.record(true, &t), None);
        assert_eq!(c.record(true, &t), Some(true));
        assert_eq!(c.record(false, &t), None);
        assert_eq!(c.record(false, &t), Some(false));
    }

    #[test]
    fn named_ports_resolve() {
        let c = Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8000,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Ok(8000)
        );
        assert_eq!(resolve_port(&IntOrString::Int(9), &c), Ok(9));
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c).is_err());
    }
}
