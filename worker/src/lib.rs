//! moe-serve worker: the roles that serve parts of a Mixture-of-Experts model (gateway,
//! pipeline stage, expert shard), the `local` launcher, and the CLI. The inference engine is
//! `moe-engine`, re-exported here under its module names.

pub mod bench;
pub mod cli;
pub mod hardware;
pub mod inspect;
pub mod load;
pub mod serve;
pub use moe_engine::{
    Error, Result, chat, config, engine, error, kernels, model, profile, quality, sampling, source,
    synthetic, tokenizer, weights,
};
pub use moe_telemetry as telemetry;
