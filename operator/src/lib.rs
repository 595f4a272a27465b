//! moe-serve's Kubernetes operator: the `MoEDeployment` resource, its plan (the same
//! `moe-plan` code the data plane runs), and the CLI around them.

#![forbid(unsafe_code)]

pub mod autoscale;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod error;
pub mod inspect;
pub mod leader;
pub mod metrics;
pub mod optimize;
pub mod performance;
pub mod pki;
pub mod resources;
pub mod run;
pub mod simulate;
pub mod status;

pub use error::{Error, Result};
/// The resource and its plan live in `moe-api`, shared with `moe-worker local -f`.
pub use moe_api::{crd, planning};
