//! Property tests of what a peer can send: arbitrary bytes, split into arbitrary frames, never
//! make the wire parser or the tensor codec panic, and nothing they return is larger than what
//! arrived (so no input makes a receiver allocate beyond the message limit it enforces).

use bytes::Bytes;
use moe_proto::v1::{ExpertRequest, ExpertRows, Tensor};
use moe_proto::wire::{Frames, PREFIX, read_request, read_response};
use moe_proto::{decode_f32, encode_f32};
use proptest::prelude::*;
use prost::Message;

/// `bytes` as frames cut at `cuts` (positions taken modulo the length).
fn framed(bytes: &[u8], cuts: &[usize]) -> Frames {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    at.sort_unstable();
    at.dedup();
    let mut f = Frames::default();
    for w in at.windows(2) {
        f.push(Bytes::copy_from_slice(&bytes[w[0]..w[1]]));
    }
    f
}

fn grpc_frame(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_within_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        limit in 0usize..700,
        rows in 0usize..64,
        cols in 0usize..64,
    ) {
        let total = bytes.len();
        let mut frames = framed(&bytes, &cuts);
        if let Ok(Some(msg)) = frames.next_message(limit) {
            let body: usize = msg.runs().map(<[u8]>::len).sum();
            prop_assert!(body <= limit);
            prop_assert!(body + PREFIX <= total);
        }
        // The body readers on the whole input, whatever it is.
        if let Ok(req) = read_request(framed(&bytes, &cuts)) {
            prop_assert!(req.experts.len() <= total);
            if let Some(t) = &req.input {
                prop_assert!(t.data.runs().map(<[u8]>::len).sum::<usize>() <= total);
                prop_assert!(t.shape.len() <= total);
            }
            if let Ok(x) = req.input_f32(rows, cols) {
                prop_assert_eq!(x.len(), rows * cols);
                prop_assert!(x.len() * 2 <= total, "{} values from {} bytes", x.len(), total);
            }
        }
        if let Ok(Some(t)) = read_response(framed(&bytes, &cuts))
            && let Ok(x) = t.to_f32("out", None, cols)
        {
            prop_assert!(x.len() * 2 <= total);
        }
    }

    #[test]
    fn tensors_with_any_header_decode_or_are_refused(
        dtype in -2i32..6,
        shape in proptest::collection::vec(any::<u64>(), 0..4),
        data in proptest::collection::vec(any::<u8>(), 0..256),
        rows in proptest::option::of(0usize..64),
        cols in 0usize..64,
    ) {
        let len = data.len();
        let t = Tensor { dtype, shape, data: data.into() };
        let mut out = Vec::new();
        if decode_f32("t", Some(&t), rows, cols, &mut out).is_ok() {
            prop_assert!(out.len() * 2 <= len);
            prop_assert_eq!(out.len(), t.shape[0] as usize * cols);
        }
    }

    #[test]
    fn any_request_reads_back_from_any_framing(
        layer in any::<u32>(),
        experts in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..6),
        values in proptest::collection::vec(-1e6f32..1e6, 0..48),
        cols in 1usize..8,
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let rows = values.len() / cols;
        let values = &values[..rows * cols];
        let req = ExpertRequest {
            layer,
            experts: experts.iter().map(|&(expert, rows)| ExpertRows { expert, rows }).collect(),
            input: Some(encode_f32(values, &[rows, cols])),
        };
        let wire = grpc_frame(&req.encode_to_vec());
        let mut frames = framed(&wire, &cuts);
        let body = frames
            .next_message(wire.len())
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?;
        let got = read_request(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.layer, layer);
        prop_assert_eq!(&got.experts, &req.experts);
        let x = got.input_f32(rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(x.as_slice(), values);
    }
}
