//! moe-serve's inference engine: a Mixtral-family Mixture-of-Experts decoder that loads in
//! parts (a stage's layer range, an expert shard's experts), with its kernels, tokenizers,
//! sampling and continuous batching. It has no async runtime and no networking: the worker's
//! roles (`moe-worker`) serve these parts over gRPC.

pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod quality;
pub mod sampling;
pub mod source;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
