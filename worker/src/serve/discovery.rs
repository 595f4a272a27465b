//! Peer addresses. A peer list is comma-separated; each entry is either `HOST:PORT` (fixed) or
//! `kube:SERVICE:PORT`: the ready endpoints of that Service's EndpointSlices in the pod's own
//! namespace, kept current by a watch. That is how pods find each other on Kubernetes without
//! cluster DNS or kube-proxy: a replaced pod's new address, a new expert replica and a
//! terminating one all show up here within a watch event.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::{OnceCell, watch};
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// One entry of a peer list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fixed `HOST:PORT` (or URL).
    Fixed(String),
    /// The ready endpoints of a Service, on `port`.
    Kube { service: String, port: u16 },
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix("kube:") else {
            return Ok(Self::Fixed(s.to_string()));
        };
        let bad = |why: &str| Error::invalid("peer address", format!("`{s}`: {why}"));
        let (service, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("expected kube:SERVICE:PORT"))?;
        let valid_name = !service.is_empty()
            && service.len() <= 63
            && service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !service.starts_with('-')
            && !service.ends_with('-');
        if !valid_name {
            return Err(bad("SERVICE is not a valid Service name"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("PORT is not a port number"))?;
        Ok(Self::Kube {
            service: service.to_string(),
            port,
        })
    }
}

/// Parses a comma-separated peer list.
pub fn parse_list(list: &str) -> Result<Vec<Target>> {
    super::parse_addrs(list)
        .iter()
        .map(|s| Target::parse(s))
        .collect()
}

/// Live addresses of a peer list (sorted, deduplicated `HOST:PORT`s). Fixed entries are always
/// there; each `kube:` entry adds its Service's ready endpoints as they change. Must be called
/// inside a tokio runtime.
pub fn resolve(list: &str) -> Result<watch::Receiver<Vec<String>>> {
    let targets = parse_list(list)?;
    let fixed: Vec<String> = targets
        .iter()
        .filter_map(|t| match t {
            Target::Fixed(a) => Some(a.clone()),
            Target::Kube { .. } => None,
        })
        .collect();
    let kube: Vec<(String, u16)> = targets
        .into_iter()
        .filter_map(|t| match t {
            Target::Kube { service, port } => Some((service, port)),
            Target::Fixed(_) => None,
        })
        .collect();
    let (tx, rx) = watch::channel(union(&fixed, &[]));
    if kube.is_empty() {
        return Ok(rx);
    }
    let tx = Arc::new(tx);
    let parts = Arc::new(Mutex::new(vec![Vec::new(); kube.len()]));
    for (i, (service, port)) in kube.into_iter().enumerate() {
        let (tx, parts, fixed) = (tx.clone(), parts.clone(), fixed.clone());
        tokio::spawn(async move {
            watch_service(&service, port, |addrs| {
                let all = {
                    let Ok(mut p) = parts.lock() else { return };
                    p[i] = addrs;
                    union(&fixed, &p)
                };
                tx.send_if_modified(|cur| {
                    if *cur == all {
                        return false;
                    }
                    tracing::info!(%service, peers = ?all, "peer addresses changed");
                    *cur = all;
                    true
                });
            })
            .await;
        });
    }
    Ok(rx)
}

fn union(fixed: &[String], parts: &[Vec<String>]) -> Vec<String> {
    let set: BTreeSet<&String> = fixed.iter().chain(parts.iter().flatten()).collect();
    set.into_iter().cloned().collect()
}

/// A connection to one peer entry. Fixed: one lazily connecting channel. `kube:`: a channel to
/// one of the Service's ready endpoints, replaced when that endpoint goes away (a stage pod
/// that was replaced has a new address). Every channel is made by [`super::channel`], so it
/// speaks the process's transport security (mutual TLS unless --plaintext).
#[derive(Clone)]
pub struct Peer {
    name: String,
    current: Arc<std::sync::RwLock<Option<(String, Channel)>>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({})", self.name)
    }
}

impl Peer {
    /// Must be called inside a tokio runtime.
    pub fn new(addr: &str) -> Result<Self> {
        let current = Arc::new(std::sync::RwLock::new(None));
        let peer = Self {
            name: addr.to_string(),
            current: current.clone(),
        };
        match Target::parse(addr)? {
            Target::Fixed(a) => {
                let ch = super::channel(&a)?;
                if let Ok(mut c) = current.write() {
                    *c = Some((a, ch));
                }
            }
            Target::Kube { .. } => {
                let mut rx = resolve(addr)?;
                let weak = Arc::downgrade(&current);
                tokio::spawn(async move {
                    loop {
                        let addrs = rx.borrow_and_update().clone();
                        let Some(slot) = weak.upgrade() else { return };
                        if let Ok(mut cur) = slot.write() {
                            let keep = cur.as_ref().is_some_and(|(a, _)| addrs.contains(a));
                            if !keep {
                                *cur = addrs.first().and_then(|a| match super::channel(a) {
                                    Ok(ch) => Some((a.clone(), ch)),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "ignoring peer address");
                                        None
                                    }
                                });
                            }
                        }
                        drop(slot);
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Ok(peer)
    }

    /// The channel to use now; an error while the peer has no ready endpoint.
    pub fn channel(&self) -> Result<Channel> {
        let cur = self
            .current
            .read()
            .map_err(|_| Error::peer(&self.name, "peer lock poisoned"))?;
        cur.as_ref()
            .map(|(_, ch)| ch.clone())
            .ok_or_else(|| Error::peer(&self.name, "no ready endpoint"))
    }

    /// The address the channel goes to now.
    pub fn address(&self) -> Option<String> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(a, _)| a.clone()))
    }
}

static CLIENT: OnceCell<Client> = OnceCell::const_new();

/// The process's Kubernetes client (in-cluster service account, else kubeconfig).
async fn client() -> Result<Client> {
    CLIENT
        .get_or_try_init(|| async {
            Client::try_default()
                .await
                .map_err(|e| Error::peer("kubernetes", format!("no client configuration: {e}")))
        })
        .await
        .cloned()
}

/// The namespace peers are looked up in: `POD_NAMESPACE`, else the client's default (the
/// service account's namespace in a pod).
fn namespace(client: &Client) -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

/// Ready endpoint addresses of a set of EndpointSlices, on `port`.
pub fn ready_addresses<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for s in slices {
        if s.address_type == "FQDN" {
            continue;
        }
        for ep in s.endpoints.iter().flatten() {
            // An unknown readiness counts as ready (the API's own rule); a terminating endpoint
            // is not ready.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &ep.addresses {
                out.insert(if a.contains(':') {
                    format!("[{a}]:{port}")
                } else {
                    format!("{a}:{port}")
                });
            }
        }
    }
    out.into_iter().collect()
}

/// Watches a Service's EndpointSlices and calls `update` with its ready addresses whenever
/// they may have changed. Runs until the process ends; reconnects with back-off.
async fn watch_service(service: &str, port: u16, mut update: impl FnMut(Vec<String>)) {
    let client = loop {
        match client().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(%service, error = %e, "cannot resolve kube: peers; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let ns = namespace(&client);
    let api: Api<EndpointSlice> = Api::namespaced(client, &ns);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let mut events = std::pin::pin!(reflector(writer, watcher(api, cfg)).default_backoff());
    while let Some(ev) = events.next().await {
        match ev {
            // The store is complete after InitDone; partial during a (re)list.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                let state = reader.state();
                update(ready_addresses(state.iter().map(|s| s.as_ref()), port));
            }
            Err(e) => {
                tracing::warn!(%service, namespace = %ns, error = %e, "EndpointSlice watch error");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    #[test]
    fn parses_targets_and_names_what_is_wrong() {
        assert_eq!(
            Target::parse("10.0.0.1:50051").unwrap(),
            Target::Fixed("10.0.0.1:50051".into())
        );
        assert_eq!(
            Target::parse("kube:tiny-stage-1:50051").unwrap(),
            Target::Kube {
                service: "tiny-stage-1".into(),
                port: 50051
            }
        );
        for (bad, why) in [
            ("kube:tiny", "expected kube:SERVICE:PORT"),
            ("kube:Tiny:1", "not a valid Service name"),
            ("kube::1", "not a valid Service name"),
            ("kube:tiny:0", "not a port number"),
            ("kube:tiny:http", "not a port number"),
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    fn slice(addrs: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(
                addrs
                    .iter()
                    .map(|(a, ready)| Endpoint {
                        addresses: vec![a.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_endpoints_are_peers() {
        let a = slice(&[("10.0.0.2", Some(true)), ("10.0.0.3", Some(false))]);
        let b = slice(&[("10.0.0.1", None), ("10.0.0.2", Some(true))]);
        assert_eq!(
            ready_addresses([&a, &b], 50051),
            vec!["10.0.0.1:50051", "10.0.0.2:50051"]
        );
        let v6 = EndpointSlice {
            address_type: "IPv6".into(),
            ..slice(&[("fd00::1", Some(true))])
        };
        assert_eq!(ready_addresses([&v6], 7), vec!["[fd00::1]:7"]);
    }

    #[tokio::test]
    async fn fixed_lists_resolve_at_once() {
        let rx = resolve("b:1, a:2,b:1").unwrap();
        assert_eq!(*rx.borrow(), vec!["a:2".to_string(), "b:1".to_string()]);
        assert!(resolve("a:1,kube:x:").is_err());
    }
}
