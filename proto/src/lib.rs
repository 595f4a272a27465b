//! The moe-serve gRPC protocol (package `moe.v1`) and the tensor codec: a tensor travels as
//! dtype + shape + raw little-endian bytes in one field.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

pub mod compute;
pub mod tensor;
pub mod wire;

pub use tensor::{
    TensorError, WireDtype, decode_f32, encode, encode_bf16, encode_f32, encode_f32_owned,
};
