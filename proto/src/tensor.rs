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

/// The element type activations travel in between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    /// Exact: what the sender computed.
    #[default]
    F32,
    /// Half the bytes per hop: each value rounded to the nearest bf16 (ties to even).
    Bf16,
}

impl std::str::FromStr for WireDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("`{other}` is not a wire dtype (f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl WireDtype {
    /// What a value becomes after a hop in this dtype (the single-process reference of a
    /// deployment rounds where the deployment sends).
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::Bf16 => f32::from_bits((bf16_bits(v) as u32) << 16),
        }
    }
}

/// Encodes an owned buffer in `wire` (f32 without copying on little-endian hosts).
pub fn encode(data: Vec<f32>, shape: &[usize], wire: WireDtype) -> Tensor {
    match wire {
        WireDtype::F32 => encode_f32_owned(data, shape),
        WireDtype::Bf16 => encode_bf16(&data, shape),
    }
}

/// The bf16 nearest to `v` (ties to even; NaN stays NaN), as bits. Branch-free apart from
/// NaN, so loops over it vectorise.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Encodes `data` (row-major, `shape`) as bf16 little-endian, rounding to nearest even.
pub fn encode_bf16(data: &[f32], shape: &[usize]) -> Tensor {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    let mut bytes = vec![0u8; data.len() * 2];
    for (o, &v) in bytes.chunks_exact_mut(2).zip(data) {
        o.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
    Tensor {
        dtype: Dtype::Bf16 as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: Bytes::from(bytes),
    }
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
    let (dtype, n) = check(what, t.dtype, &t.shape, t.data.len(), rows, cols)?;
    out.clear();
    out.reserve(n);
    widen(dtype, std::iter::once(&t.data[..]), out);
    Ok(t.shape[0] as usize)
}

/// Checks a tensor's header against the 2-D shape a reader expects (`rows` when known, `cols`
/// columns) and its byte count against its shape; returns the dtype and element count.
pub(crate) fn check(
    what: &'static str,
    dtype: i32,
    shape: &[u64],
    data_len: usize,
    rows: Option<usize>,
    cols: usize,
) -> Result<(Dtype, usize), TensorError> {
    let want = || match rows {
        Some(r) => format!("[{r}, {cols}]"),
        None => format!("[rows, {cols}]"),
    };
    let shape_ok =
        shape.len() == 2 && shape[1] == cols as u64 && rows.is_none_or(|r| shape[0] == r as u64);
    if !shape_ok {
        return Err(TensorError::Shape {
            what,
            got: shape.to_vec(),
            want: want(),
        });
    }
    let (dt, width) = match Dtype::try_from(dtype) {
        Ok(d @ Dtype::F32) => (d, 4),
        Ok(d @ (Dtype::F16 | Dtype::Bf16)) => (d, 2),
        _ => return Err(TensorError::Dtype { what, dtype }),
    };
    let elems = shape[0] as u128 * shape[1] as u128;
    if data_len as u128 != elems * width {
        return Err(TensorError::Bytes {
            what,
            shape: shape.to_vec(),
            got: data_len,
            want: elems * width,
        });
    }
    Ok((dt, elems as usize))
}

/// Appends checked tensor data, given as consecutive byte runs (split anywhere, even inside
/// an element), to `out` as f32. One pass: no zero-fill first.
pub(crate) fn widen<'a>(dtype: Dtype, runs: impl Iterator<Item = &'a [u8]>, out: &mut Vec<f32>) {
    let width = if dtype == Dtype::F32 { 4 } else { 2 };
    let convert = |b: &[u8]| match dtype {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    };
    // An element split between two runs waits here for its other bytes.
    let (mut carry, mut held) = ([0u8; 4], 0);
    for mut run in runs {
        if held > 0 {
            let k = (width - held).min(run.len());
            carry[held..held + k].copy_from_slice(&run[..k]);
            held += k;
            run = &run[k..];
            if held < width {
                continue;
            }
            out.push(convert(&carry));
        }
        let whole = run.len() / width * width;
        let at = out.len();
        out.resize(at + whole / width, 0.0);
        let dst = &mut out[at..];
        match dtype {
            // Plain loops over exact chunks, so the compiler vectorises the widening.
            Dtype::F32 => {
                for (o, b) in dst.iter_mut().zip(run[..whole].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::Bf16 => {
                for (o, b) in dst.iter_mut().zip(run[..whole].chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            _ => {
                for (o, b) in dst.iter_mut().zip(run[..whole].chunks_exact(width)) {
                    *o = convert(b);
                }
            }
        }
        held = run.len() - whole;
        carry[..held].copy_from_slice(&run[whole..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_on_the_wire_halves_the_bytes_and_decodes_to_the_rounded_values() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.3137 - 1.7).collect();
        let t = encode(data.clone(), &[3, 4], WireDtype::Bf16);
        assert_eq!(t.data.len(), 24);
        let mut out = Vec::new();
        assert_eq!(decode_f32("x", Some(&t), Some(3), 4, &mut out), Ok(3));
        for (o, v) in out.iter().zip(&data) {
            assert_eq!(*o, WireDtype::Bf16.round(*v));
            assert!((o - v).abs() <= v.abs() / 256.0, "{o} vs {v}");
        }
        assert_eq!(
            encode(data.clone(), &[3, 4], WireDtype::F32),
            encode_f32(&data, &[3, 4])
        );
        assert_eq!("BF16".parse::<WireDtype>(), Ok(WireDtype::Bf16));
        // Rounding agrees with the half crate's, NaN and infinities included.
        for v in [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.7e-39,
            3.4e38,
            f32::INFINITY,
        ] {
            assert_eq!(
                WireDtype::Bf16.round(v),
                half::bf16::from_f32(v).to_f32(),
                "{v}"
            );
        }
        assert!(WireDtype::Bf16.round(f32::NAN).is_nan());
        assert!("fp8".parse::<WireDtype>().is_err());
    }

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
    fn widens_runs_split_inside_elements() {
        let vals = [1.5f32, -2.0, 0.25, 8.0, 3.0];
        let f32s: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16s: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        for (dtype, bytes) in [(Dtype::F32, &f32s), (Dtype::Bf16, &bf16s)] {
            for step in 1..=5 {
                let mut out = Vec::new();
                widen(dtype, bytes.chunks(step), &mut out);
                assert_eq!(out, vals, "{dtype:?} in runs of {step}");
            }
        }
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
