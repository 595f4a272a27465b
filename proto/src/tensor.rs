//! Tensor codec. Decoding checks everything a peer could get wrong (dtype, shape, byte count)
//! and says which; it never panics on bad input.

use bytes::Bytes;

use crate::v1::{Dtype, Tensor};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("{what}: missing tensor")]
    Missing { what: &'static str },
    #[error("{what}: unsupported dtype {dtype}")]
    Dtype { what: &'static str, dtype: i32 },
    #[error("{what}: shape {got:?} where {want} was expected")]
    Shape {
        what: &'static str,
        got: Vec<u64>,
        want: String,
    },
    #[error("{what}: {got} bytes of data for shape {shape:?} ({want} expected)")]
    Bytes {
        what: &'static str,
        shape: Vec<u64>,
        got: usize,
        want: u128,
    },
}

/// Encodes `data` (row-major, `shape`) as f32 little-endian.
pub fn encode_f32(data: &[f32], shape: &[usize]) -> Tensor {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    let mut bytes = Vec::with_capacity(data.len() * 4);
    if cfg!(target_endian = "little") {
        bytes.extend_from_slice(bytemuck::cast_slice(data));
    } else {
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    Tensor {
        dtype: Dtype::F32 as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: Bytes::from(bytes),
    }
}

/// Encodes an owned buffer without copying it (little-endian hosts; others copy).
pub fn encode_f32_owned(data: Vec<f32>, shape: &[usize]) -> Tensor {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    if cfg!(target_endian = "big") {
        return encode_f32(&data, shape);
    }
    Tensor {
        dtype: Dtype::F32 as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: Bytes::from_owner(F32Bytes(data)),
    }
}

/// An f32 buffer viewed as its bytes, so `Bytes` can own it.
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Decodes a 2-D tensor of `cols` columns into f32 (f16 and bf16 are widened), returning its
/// row count. `rows`, when given, must match too.
pub fn decode_f32(
    what: &'static str,
    t: Option<&Tensor>,
    rows: Option<usize>,
    cols: usize,
    out: &mut Vec<f32>,
) -> Result<usize, TensorError> {
    let t = t.ok_or(TensorError::Missing { what })?;
    let want = || match rows {
        Some(r) => format!("[{r}, {cols}]"),
        None => format!("[rows, {cols}]"),
    };
    let shape_ok = t.shape.len() == 2
        && t.shape[1] == cols as u64
        && rows.is_none_or(|r| t.shape[0] == r as u64);
    if !shape_ok {
        return Err(TensorError::Shape {
            what,
            got: t.shape.clone(),
            want: want(),
        });
    }
    let width = match Dtype::try_from(t.dtype) {
        Ok(Dtype::F32) => 4,
        Ok(Dtype::F16 | Dtype::Bf16) => 2,
        _ => {
            return Err(TensorError::Dtype {
                what,
                dtype: t.dtype,
            });
        }
    };
    let elems = t.shape[0] as u128 * t.shape[1] as u128;
    if t.data.len() as u128 != elems * width as u128 {
        return Err(TensorError::Bytes {
            what,
            shape: t.shape.clone(),
            got: t.data.len(),
            want: elems * width as u128,
        });
    }
    let n = elems as usize;
    out.clear();
    out.reserve(n);
    match Dtype::try_from(t.dtype) {
        Ok(Dtype::F32) if cfg!(target_endian = "little") => {
            // A straight copy: the bytes need not be 4-aligned, the Vec is.
            out.resize(n, 0.0);
            bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(&t.data);
        }
        Ok(Dtype::F32) => out.extend(
            t.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Ok(Dtype::F16) => out.extend(
            t.data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => out.extend(
            t.data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    Ok(t.shape[0] as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let t = encode_f32(&data, &[3, 4]);
        assert_eq!(encode_f32_owned(data.clone(), &[3, 4]), t);
        let mut out = Vec::new();
        assert_eq!(decode_f32("x", Some(&t), Some(3), 4, &mut out), Ok(3));
        assert_eq!(out, data);
        assert_eq!(decode_f32("x", Some(&t), None, 4, &mut out), Ok(3));
    }

    #[test]
    fn rejects_what_a_peer_gets_wrong() {
        let t = encode_f32(&[0.0; 6], &[2, 3]);
        let mut out = Vec::new();
        let e = decode_f32("hidden", Some(&t), None, 4, &mut out).expect_err("rejected");
        assert_eq!(
            e.to_string(),
            "hidden: shape [2, 3] where [rows, 4] was expected"
        );
        assert!(decode_f32("hidden", Some(&t), Some(3), 3, &mut out).is_err());
        let mut short = t.clone();
        short.data = short.data.slice(..20);
        let e = decode_f32("hidden", Some(&short), None, 3, &mut out).expect_err("rejected");
        assert!(e.to_string().contains("20 bytes"), "{e}");
        let mut bad = t.clone();
        bad.dtype = 9;
        assert!(matches!(
            decode_f32("hidden", Some(&bad), None, 3, &mut out),
            Err(TensorError::Dtype { .. })
        ));
        assert_eq!(
            decode_f32("hidden", None, None, 3, &mut out),
            Err(TensorError::Missing { what: "hidden" })
        );
        // A shape whose element count overflows is a byte-count error, not a panic.
        let mut huge = t;
        huge.shape = vec![u64::MAX, 3];
        assert!(decode_f32("hidden", Some(&huge), None, 3, &mut out).is_err());
    }

    #[test]
    fn widens_half_precision() {
        let vals = [1.5f32, -2.0, 0.25, 8.0];
        let mut bytes = Vec::new();
        for v in vals {
            bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        let t = Tensor {
            dtype: Dtype::Bf16 as i32,
            shape: vec![2, 2],
            data: Bytes::from(bytes),
        };
        let mut out = Vec::new();
        decode_f32("x", Some(&t), None, 2, &mut out).expect("decode");
        assert_eq!(out, vals);
    }
}
