//! Test infrastructure for moe-serve's end-to-end tests on a real Kubernetes control plane.
//!
//! [`Cluster`] starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! the official Go modules by `k8s/build.sh`, cached by version outside the clone) and a node
//! agent ([`node`]) that registers fake A100 nodes and runs each pod's containers as local
//! processes, one network namespace per pod. See `e2e/README.md`.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = e2e::Cluster::shared().await; // one per test binary
//! let ns = cluster.namespace("my-test").await?; // one per test
//! let client = cluster.client().await?;
//! let out = cluster.kubectl(&["get", "nodes", "-o", "name"])?;
//! # Ok(()) }
//! ```

pub mod binaries;
mod cluster;
pub mod images;
pub mod moe;
pub mod net;
pub mod node;
mod pki;
mod process;
pub mod wait;

pub use binaries::{
    K8S_VERSION, k8s_bin_dir, prometheus_bin_dir, workspace_bin_dir, workspace_binary,
};
pub use cluster::{Cluster, ClusterConfig, Registry};
