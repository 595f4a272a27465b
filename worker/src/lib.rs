//! moe-serve worker: a Mixtral-family Mixture-of-Experts inference engine that loads in
//! parts (layer ranges, expert sets), plus the roles that serve those parts.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod serve;
pub mod source;
pub mod synthetic;
pub use moe_telemetry as telemetry;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
