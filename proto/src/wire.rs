//! Hand-framed messages of `Expert.Compute`, the one RPC whose messages are megabytes.
//!
//! The bytes on the wire are ordinary gRPC framing of ordinary `ExpertRequest` /
//! `ExpertResponse` protobuf, so any gRPC client or server interoperates. What differs is
//! where the bytes go: a sender writes a small head (the gRPC length prefix and every field
//! up to the tensor's data) and hands the tensor's own buffer to HTTP/2 as the next frame, and
//! a receiver keeps the HTTP/2 frames it was given and copies the tensor's bytes once, into
//! the f32 buffer the caller computes on. Through tonic's generated codec the same tensor is
//! copied into an encode buffer, accumulated into a decode buffer, and copied out again, each
//! into a freshly allocated buffer of the tensor's size.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use crate::tensor::{TensorError, check, widen};
use crate::v1::{Dtype, ExpertRows, Tensor};

/// The method these messages belong to.
pub const COMPUTE_PATH: &str = "/moe.v1.Expert/Compute";

/// Bytes of the gRPC message prefix: a compression flag and a big-endian u32 length.
pub const PREFIX: usize = 5;

/// Why a received message could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("compressed messages are not accepted")]
    Compressed,
    #[error("message of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge { got: usize, limit: usize },
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

fn malformed(e: impl std::fmt::Display) -> WireError {
    WireError::Malformed(e.to_string())
}

/// The head of a gRPC message whose body ends with a tensor of `data_len` bytes: `fields`
/// (the message's other fields, already encoded), then field `tag` holding the tensor's
/// dtype, shape, and the key and length of its data. The data itself follows on the wire.
fn head(fields: &[u8], tag: u32, dtype: i32, shape: &[u64], data_len: usize) -> Bytes {
    let meta = Tensor {
        dtype,
        shape: shape.to_vec(),
        data: Bytes::new(),
    }
    .encode_to_vec();
    let mut data_key = BytesMut::with_capacity(16);
    encode_key(3, WireType::LengthDelimited, &mut data_key);
    encode_varint(data_len as u64, &mut data_key);
    let tensor_len = meta.len() + data_key.len() + data_len;
    let mut tensor_key = BytesMut::with_capacity(16);
    encode_key(tag, WireType::LengthDelimited, &mut tensor_key);
    encode_varint(tensor_len as u64, &mut tensor_key);
    let body_len = fields.len() + tensor_key.len() + tensor_len;
    let mut out = BytesMut::with_capacity(PREFIX + body_len - data_len);
    out.put_u8(0);
    out.put_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
    out.put_slice(fields);
    out.put_slice(&tensor_key);
    out.put_slice(&meta);
    out.put_slice(&data_key);
    out.freeze()
}

/// The head of an `ExpertRequest` whose `input` tensor's data (`data_len` bytes) follows.
pub fn request_head(
    layer: u32,
    experts: &[ExpertRows],
    dtype: Dtype,
    shape: &[u64],
    data_len: usize,
) -> Bytes {
    let mut fields = BytesMut::new();
    if layer != 0 {
        encode_key(1, WireType::Varint, &mut fields);
        encode_varint(layer.into(), &mut fields);
    }
    for e in experts {
        encode_key(2, WireType::LengthDelimited, &mut fields);
        e.encode_length_delimited(&mut fields)
            .unwrap_or_else(|_| unreachable!("BytesMut grows"));
    }
    head(&fields, 3, dtype as i32, shape, data_len)
}

/// The head of an `ExpertResponse` whose `output` tensor's data (`data_len` bytes) follows.
pub fn response_head(dtype: Dtype, shape: &[u64], data_len: usize) -> Bytes {
    head(&[], 1, dtype as i32, shape, data_len)
}

/// Received bytes as the frames they arrived in: reading never copies a frame whole.
#[derive(Debug, Default, Clone)]
pub struct Frames {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Frames {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    /// Splits off the first `n` bytes without copying.
    fn split(&mut self, mut n: usize) -> Frames {
        let mut out = Frames::default();
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            if front.len() <= n {
                let b = self.parts.pop_front().unwrap_or_default();
                n -= b.len();
                self.len -= b.len();
                out.push(b);
            } else {
                let b = front.split_to(n);
                self.len -= n;
                out.push(b);
                n = 0;
            }
        }
        out
    }

    /// The byte runs, in order.
    pub fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|b| &b[..])
    }

    /// Takes the next whole gRPC message's body once all of it has arrived: `Ok(None)` until
    /// then. Messages over `limit` bytes are refused as soon as their prefix is read.
    pub fn next_message(&mut self, limit: usize) -> Result<Option<Frames>, WireError> {
        if self.len < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut at = 0;
        for run in self.runs() {
            let n = (PREFIX - at).min(run.len());
            prefix[at..at + n].copy_from_slice(&run[..n]);
            at += n;
            if at == PREFIX {
                break;
            }
        }
        if prefix[0] != 0 {
            return Err(WireError::Compressed);
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > limit {
            return Err(WireError::TooLarge { got: len, limit });
        }
        if self.len < PREFIX + len {
            return Ok(None);
        }
        self.advance(PREFIX);
        Ok(Some(self.split(len)))
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            let n = cnt.min(front.len());
            front.advance(n);
            self.len -= n;
            cnt -= n;
            if front.is_empty() {
                self.parts.pop_front();
            }
        }
    }
}

/// A received tensor whose data still lies in the frames it arrived in.
#[derive(Debug, Default)]
pub struct TensorFrames {
    pub dtype: i32,
    pub shape: Vec<u64>,
    pub data: Frames,
}

impl TensorFrames {
    /// Checks it as [`crate::decode_f32`] does and copies it, once, into f32s.
    pub fn to_f32(
        &self,
        what: &'static str,
        rows: Option<usize>,
        cols: usize,
    ) -> Result<Vec<f32>, TensorError> {
        let (dtype, n) = check(what, self.dtype, &self.shape, self.data.len, rows, cols)?;
        let mut out = Vec::with_capacity(n);
        widen(dtype, self.data.runs(), &mut out);
        Ok(out)
    }
}

/// A received `ExpertRequest`.
#[derive(Debug, Default)]
pub struct ComputeRequest {
    pub layer: u32,
    pub experts: Vec<ExpertRows>,
    pub input: Option<TensorFrames>,
}

impl ComputeRequest {
    /// The input as f32 rows (`rows` × `cols`), checked as [`crate::decode_f32`] checks.
    pub fn input_f32(&self, rows: usize, cols: usize) -> Result<Vec<f32>, TensorError> {
        self.input
            .as_ref()
            .ok_or(TensorError::Missing { what: "input" })?
            .to_f32("input", Some(rows), cols)
    }
}

/// Reads the length of a length-delimited field and checks it is all there.
fn field_len(buf: &mut Frames) -> Result<usize, WireError> {
    let len = decode_varint(buf).map_err(malformed)?;
    if len > buf.remaining() as u64 {
        return Err(malformed(format!(
            "field of {len} bytes where {} remain",
            buf.remaining()
        )));
    }
    Ok(len as usize)
}

fn skip(wire: WireType, buf: &mut Frames) -> Result<(), WireError> {
    let n = match wire {
        WireType::Varint => {
            decode_varint(buf).map_err(malformed)?;
            0
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => field_len(buf)?,
        WireType::StartGroup | WireType::EndGroup => {
            return Err(malformed("groups are not used by moe.v1"));
        }
    };
    if n > buf.remaining() {
        return Err(malformed("truncated field"));
    }
    buf.advance(n);
    Ok(())
}

fn expect(wire: WireType, want: WireType, field: &str) -> Result<(), WireError> {
    if wire == want {
        Ok(())
    } else {
        Err(malformed(format!(
            "field {field} has wire type {wire:?}, not {want:?}"
        )))
    }
}

/// Merges one `Tensor` message (`buf` holds exactly its bytes) into `t`.
fn read_tensor(mut buf: Frames, t: &mut TensorFrames) -> Result<(), WireError> {
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).map_err(malformed)?;
        match tag {
            1 => {
                expect(wire, WireType::Varint, "dtype")?;
                t.dtype = decode_varint(&mut buf).map_err(malformed)? as i32;
            }
            2 if wire == WireType::LengthDelimited => {
                let n = field_len(&mut buf)?;
                let mut packed = buf.split(n);
                while packed.has_remaining() {
                    t.shape.push(decode_varint(&mut packed).map_err(malformed)?);
                }
            }
            2 => {
                expect(wire, WireType::Varint, "shape")?;
                t.shape.push(decode_varint(&mut buf).map_err(malformed)?);
            }
            3 => {
                expect(wire, WireType::LengthDelimited, "data")?;
                let n = field_len(&mut buf)?;
                t.data = buf.split(n);
            }
            _ => skip(wire, &mut buf)?,
        }
    }
    Ok(())
}

/// Reads an `ExpertRequest` (`buf` holds exactly its bytes) without copying its tensor.
pub fn read_request(mut buf: Frames) -> Result<ComputeRequest, WireError> {
    let mut req = ComputeRequest::default();
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).map_err(malformed)?;
        match tag {
            1 => {
                expect(wire, WireType::Varint, "layer")?;
                req.layer = decode_varint(&mut buf).map_err(malformed)? as u32;
            }
            2 => {
                expect(wire, WireType::LengthDelimited, "experts")?;
                let n = field_len(&mut buf)?;
                let rows = ExpertRows::decode(buf.split(n)).map_err(malformed)?;
                req.experts.push(rows);
            }
            3 => {
                expect(wire, WireType::LengthDelimited, "input")?;
                let n = field_len(&mut buf)?;
                read_tensor(buf.split(n), req.input.get_or_insert_default())?;
            }
            _ => skip(wire, &mut buf)?,
        }
    }
    Ok(req)
}

/// Reads an `ExpertResponse` (`buf` holds exactly its bytes): its `output` tensor, if any.
pub fn read_response(mut buf: Frames) -> Result<Option<TensorFrames>, WireError> {
    let mut output = None;
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).map_err(malformed)?;
        if tag == 1 {
            expect(wire, WireType::LengthDelimited, "output")?;
            let n = field_len(&mut buf)?;
            read_tensor(buf.split(n), output.get_or_insert_default())?;
        } else {
            skip(wire, &mut buf)?;
        }
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_f32;
    use crate::v1::{ExpertRequest, ExpertResponse};

    /// Frames of `bytes` cut at every `step` bytes, as HTTP/2 might deliver them.
    fn frames(bytes: &[u8], step: usize) -> Frames {
        let mut f = Frames::default();
        for c in bytes.chunks(step.max(1)) {
            f.push(Bytes::copy_from_slice(c));
        }
        f
    }

    fn grpc_frame(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn sample() -> (Vec<f32>, ExpertRequest) {
        let x: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.0).collect();
        let req = ExpertRequest {
            layer: 7,
            experts: vec![
                ExpertRows { expert: 1, rows: 2 },
                ExpertRows { expert: 4, rows: 1 },
            ],
            input: Some(encode_f32(&x, &[3, 5])),
        };
        (x, req)
    }

    #[test]
    fn heads_plus_data_are_the_messages_prost_encodes() {
        let (x, req) = sample();
        let data = req
            .input
            .as_ref()
            .map(|t| t.data.clone())
            .unwrap_or_default();
        let mut ours = request_head(7, &req.experts, Dtype::F32, &[3, 5], data.len()).to_vec();
        ours.extend_from_slice(&data);
        assert_eq!(ours, grpc_frame(&req));

        let resp = ExpertResponse {
            output: Some(encode_f32(&x, &[3, 5])),
        };
        let mut ours = response_head(Dtype::F32, &[3, 5], data.len()).to_vec();
        ours.extend_from_slice(&data);
        assert_eq!(ours, grpc_frame(&resp));
    }

    #[test]
    fn reads_what_prost_encodes_however_it_is_split() {
        let (x, req) = sample();
        let wire = grpc_frame(&req);
        for step in [1, 2, 3, 7, 16, 1000] {
            let mut f = frames(&wire, step);
            let body = f.next_message(1 << 20).expect("ok").expect("whole");
            assert_eq!(f.remaining(), 0);
            let got = read_request(body).expect("read");
            assert_eq!((got.layer, &got.experts), (7, &req.experts), "step {step}");
            let t = got.input.expect("input");
            assert_eq!(
                t.to_f32("input", Some(3), 5).expect("f32"),
                x,
                "step {step}"
            );
        }
        let resp = ExpertResponse {
            output: Some(encode_f32(&x, &[3, 5])),
        };
        let mut f = frames(&grpc_frame(&resp), 5);
        let body = f.next_message(1 << 20).expect("ok").expect("whole");
        let t = read_response(body).expect("read").expect("output");
        assert_eq!(t.to_f32("output", None, 5).expect("f32"), x);
    }

    #[test]
    fn unpacked_shapes_and_unknown_fields_are_read() {
        let (x, _) = sample();
        // Tensor with an unknown varint field 9, shape unpacked, data before dtype.
        let mut t = BytesMut::new();
        encode_key(9, WireType::Varint, &mut t);
        encode_varint(42, &mut t);
        for d in [3u64, 5] {
            encode_key(2, WireType::Varint, &mut t);
            encode_varint(d, &mut t);
        }
        let data: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        encode_key(3, WireType::LengthDelimited, &mut t);
        encode_varint(data.len() as u64, &mut t);
        t.put_slice(&data);
        encode_key(1, WireType::Varint, &mut t);
        encode_varint(Dtype::F32 as u64, &mut t);
        let mut body = BytesMut::new();
        encode_key(3, WireType::LengthDelimited, &mut body);
        encode_varint(t.len() as u64, &mut body);
        body.put_slice(&t);
        let got = read_request(frames(&body, 4)).expect("read");
        let t = got.input.expect("input");
        assert_eq!(t.to_f32("input", Some(3), 5).expect("f32"), x);
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        let (_, req) = sample();
        let wire = grpc_frame(&req);
        // Incomplete: not yet a message.
        let mut f = frames(&wire[..wire.len() - 1], 8);
        assert!(matches!(f.next_message(1 << 20), Ok(None)));
        // Over the limit, refused from its prefix alone.
        let mut f = frames(&wire[..PREFIX], 8);
        assert!(matches!(
            f.next_message(10),
            Err(WireError::TooLarge { limit: 10, .. })
        ));
        // Compressed.
        let mut c = wire.clone();
        c[0] = 1;
        assert!(matches!(
            frames(&c, 8).next_message(1 << 20),
            Err(WireError::Compressed)
        ));
        // Every truncation of the body is an error or a short tensor, never a panic.
        let body = &wire[PREFIX..];
        for cut in 0..body.len() {
            if let Ok(r) = read_request(frames(&body[..cut], 3))
                && let Some(t) = r.input
            {
                assert!(t.to_f32("input", Some(3), 5).is_err(), "cut {cut}");
            }
        }
        // A data length past the end.
        let mut long = body.to_vec();
        long.truncate(long.len() - 4);
        assert!(read_request(frames(&long, 3)).is_err());
        // Wrong wire type for a known field.
        let mut w = BytesMut::new();
        encode_key(1, WireType::LengthDelimited, &mut w);
        encode_varint(0, &mut w);
        let e = read_request(frames(&w, 3)).expect_err("rejected");
        assert!(e.to_string().contains("layer"), "{e}");
    }
}
