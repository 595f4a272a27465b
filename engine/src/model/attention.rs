//! Rotary embeddings (default and YaRN, whole or partial, half-split or interleaved), the KV
//! cache, causal grouped-query attention (sliding windows, sinks) and multi-head latent
//! attention over a compressed cache.

use rayon::prelude::*;

use super::Chunk;
use crate::config::{MlaConfig, ModelConfig};
use crate::kernels;

/// Keys and values of one sequence for a model part's layers, position-major
/// (`[position, kv_heads * head_dim]` per layer) so that appending a token is one copy.
/// Latent attention keeps its compressed latent and rotary key in `k` and nothing in `v`.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    k_dim: usize,
    v_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize, k_dim: usize, v_dim: usize, capacity: usize) -> Self {
        Self {
            k: (0..layers)
                .map(|_| Vec::with_capacity(capacity * k_dim))
                .collect(),
            v: (0..layers)
                .map(|_| Vec::with_capacity(capacity * v_dim))
                .collect(),
            k_dim,
            v_dim,
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `positions` positions in every layer.
    pub fn reserve(&mut self, positions: usize) {
        for (buf, dim) in self
            .k
            .iter_mut()
            .map(|b| (b, self.k_dim))
            .chain(self.v.iter_mut().map(|b| (b, self.v_dim)))
        {
            if buf.len() < positions * dim {
                buf.resize(positions * dim, 0.0);
            }
        }
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Counts `n` more positions without computing them (tests of cache bookkeeping, here
    /// and in the stage's KV-cache table).
    #[doc(hidden)]
    pub fn advance_for_test(&mut self, n: usize) {
        self.reserve(self.len + n);
        self.len += n;
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(self.v.iter())
            .map(|b| b.capacity() * 4)
            .sum()
    }
}

/// cos/sin of every batch row's position, computed once per forward pass. Computed as
/// transformers does (f32 inverse frequencies and angles), so long positions round alike.
#[derive(Debug, Default)]
pub(super) struct RopeRows {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    interleaved: bool,
}

/// Inverse frequencies of the rotary dimensions, default or YaRN, as transformers computes
/// them (f32).
fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.arch.rope.rotary_dim;
    let theta = cfg.rope_theta as f32;
    let pos_freqs: Vec<f32> = (0..dim / 2)
        .map(|i| theta.powf((2 * i) as f32 / dim as f32))
        .collect();
    let Some(y) = &cfg.arch.rope.yarn else {
        return pos_freqs.iter().map(|p| 1.0 / p).collect();
    };
    let base = cfg.rope_theta;
    let correction_dim = |rotations: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32);
    if low == high {
        high += 0.001;
    }
    let factor = y.factor as f32;
    pos_freqs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let (inter, extra) = (1.0 / (factor * p), 1.0 / p);
            inter * (1.0 - extrapolation) + extra * extrapolation
        })
        .collect()
}

impl RopeRows {
    pub(super) fn prepare(&mut self, cfg: &ModelConfig, chunks: &[Chunk]) {
        let half = cfg.arch.rope.rotary_dim / 2;
        self.half = half;
        self.interleaved = cfg.arch.rope.interleaved;
        self.cos.clear();
        self.sin.clear();
        let inv = inverse_frequencies(cfg);
        let scale = cfg
            .arch
            .rope
            .yarn
            .as_ref()
            .map_or(1.0, |y| y.attention_factor as f32);
        for c in chunks {
            for p in c.start..c.start + c.len {
                for &f in &inv {
                    let angle = p as f32 * f;
                    self.cos.push((angle as f64).cos() as f32 * scale);
                    self.sin.push((angle as f64).sin() as f32 * scale);
                }
            }
        }
    }

    /// Rotates the first `rotary_dim` values of every `width`-wide head of `x`.
    fn apply(&self, row: usize, x: &mut [f32], width: usize) {
        let half = self.half;
        let (cos, sin) = (
            &self.cos[row * half..(row + 1) * half],
            &self.sin[row * half..(row + 1) * half],
        );
        for head in x.chunks_exact_mut(width) {
            if self.interleaved {
                for i in 0..half {
                    let (x1, x2) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = x1 * cos[i] - x2 * sin[i];
                    head[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
                }
            } else {
                let (a, b) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

/// Where each batch row's sequence starts in the batch.
fn row_starts(chunks: &[Chunk]) -> Vec<usize> {
    chunks
        .iter()
        .scan(0, |acc, c| {
            let s = *acc;
            *acc += c.len;
            Some(s)
        })
        .collect()
}

/// Softmax of `scores` in place (with a sink logit that joins the normalisation and is then
/// dropped); returns the normaliser.
fn softmax(scores: &mut [f32], sink: Option<f32>) -> f32 {
    let mut max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if let Some(s) = sink {
        max = max.max(s);
    }
    let mut sum = sink.map_or(0.0, |s| (s - max).exp());
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// Rotates q and k, appends k and v to the caches, and writes each row's attention output
/// (`rows × q_dim`) to `out`. Causal within a chunk; a chunk also sees its sequence's cached
/// positions; a sliding window limits how far back a query looks. `li` is the layer's index
/// in the caches, `layer` in the model.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    cfg: &ModelConfig,
    li: usize,
    layer: usize,
    chunks: &[Chunk],
    caches: &mut [&mut KvCache],
    row_chunk: &[usize],
    rope: &RopeRows,
    sinks: Option<&[f32]>,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    out: &mut [f32],
) {
    let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    for (row, qr) in q.chunks_exact_mut(qd).enumerate() {
        rope.apply(row, qr, hd);
    }
    for (row, kr) in k.chunks_exact_mut(kvd).enumerate() {
        rope.apply(row, kr, hd);
    }
    let mut row = 0;
    for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
        let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
        let dst = c.start * kvd..(c.start + c.len) * kvd;
        kc[dst.clone()].copy_from_slice(&k[row * kvd..(row + c.len) * kvd]);
        vc[dst].copy_from_slice(&v[row * kvd..(row + c.len) * kvd]);
        row += c.len;
    }

    let caches: &[&mut KvCache] = caches;
    let group = cfg.num_attention_heads / cfg.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let window = cfg.window(layer);
    let row_start = row_starts(chunks);
    let one_row = |scores: &mut Vec<f32>, (row, o): (usize, &mut [f32])| {
        let ci = row_chunk[row];
        let c = chunks[ci];
        let pos = c.start + (row - row_start[ci]);
        // transformers' sliding window: a query at `pos` sees keys in (pos - window, pos].
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let (kc, vc) = (&caches[ci].k[li], &caches[ci].v[li]);
        let qr = &q[row * qd..(row + 1) * qd];
        for head in 0..cfg.num_attention_heads {
            let kvh = head / group;
            let qh = &qr[head * hd..(head + 1) * hd];
            scores.clear();
            for p in first..=pos {
                scores.push(
                    kernels::dot(qh, &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale,
                );
            }
            let sum = softmax(scores, sinks.map(|s| s[head]));
            let oh = &mut o[head * hd..(head + 1) * hd];
            oh.fill(0.0);
            for (p, s) in (first..=pos).zip(scores.iter()) {
                kernels::axpy(
                    s / sum,
                    &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd],
                    oh,
                );
            }
        }
    };
    let work: usize = chunks
        .iter()
        .map(|c| c.len * (c.start + c.len))
        .sum::<usize>()
        * qd;
    if work > 1 << 18 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(qd)
            .enumerate()
            .for_each_init(Vec::new, one_row);
    } else {
        let mut scores = Vec::new();
        out.chunks_mut(qd)
            .enumerate()
            .for_each(|r| one_row(&mut scores, r));
    }
}

/// Multi-head latent attention over the compressed cache. `q` is `rows × heads × (nope +
/// rope)`; `ckv` is `rows × (kv_lora_rank + rope)` with the latent already normalised. The
/// rotary parts are rotated, `ckv` is appended to the cache, and each head's query is
/// absorbed into the latent space (`W_uk[h]ᵀ q_nope`) so that keys and values are never
/// decompressed: score = q_lat · c + q_rot · k_rot, and the output is `W_uv[h] Σ p c`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_latent(
    cfg: &ModelConfig,
    m: &MlaConfig,
    li: usize,
    chunks: &[Chunk],
    caches: &mut [&mut KvCache],
    row_chunk: &[usize],
    rope: &RopeRows,
    kv_b: &[f32],
    q: &mut [f32],
    ckv: &mut [f32],
    out: &mut [f32],
) {
    let heads = cfg.num_attention_heads;
    let (nope, rot, rank, vd) = (
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.kv_lora_rank,
        m.v_head_dim,
    );
    let (qk, cw) = (nope + rot, rank + rot);
    for (row, qr) in q.chunks_exact_mut(heads * qk).enumerate() {
        for head in qr.chunks_exact_mut(qk) {
            rope.apply(row, &mut head[nope..], rot);
        }
    }
    for (row, cr) in ckv.chunks_exact_mut(cw).enumerate() {
        rope.apply(row, &mut cr[rank..], rot);
    }
    let mut row = 0;
    for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
        let kc = &mut cache.k[li];
        kc[c.start * cw..(c.start + c.len) * cw]
            .copy_from_slice(&ckv[row * cw..(row + c.len) * cw]);
        row += c.len;
    }
    let caches: &[&mut KvCache] = caches;
    let mut scale = 1.0 / (qk as f32).sqrt();
    if let Some(y) = &cfg.arch.rope.yarn
        && let Some(all) = y.mscale_all_dim
    {
        let ms = if y.factor <= 1.0 {
            1.0
        } else {
            0.1 * all * y.factor.ln() + 1.0
        } as f32;
        scale *= ms * ms;
    }
    let row_start = row_starts(chunks);
    let per_head = nope + vd;
    let one_row = |buf: &mut (Vec<f32>, Vec<f32>, Vec<f32>), (row, o): (usize, &mut [f32])| {
        let (scores, q_lat, o_lat) = buf;
        let ci = row_chunk[row];
        let c = chunks[ci];
        let pos = c.start + (row - row_start[ci]);
        let kc = &caches[ci].k[li];
        let qr = &q[row * heads * qk..(row + 1) * heads * qk];
        q_lat.resize(rank, 0.0);
        o_lat.resize(rank, 0.0);
        for head in 0..heads {
            let (q_nope, q_rot) = qr[head * qk..(head + 1) * qk].split_at(nope);
            let w = &kv_b[head * per_head * rank..(head + 1) * per_head * rank];
            // q_lat = W_ukᵀ q_nope (W_uk: nope × rank rows of kv_b).
            q_lat.fill(0.0);
            for (d, &qv) in q_nope.iter().enumerate() {
                kernels::axpy(qv, &w[d * rank..(d + 1) * rank], q_lat);
            }
            scores.clear();
            for p in 0..=pos {
                let cp = &kc[p * cw..(p + 1) * cw];
                let s = kernels::dot(q_lat, &cp[..rank]) + kernels::dot(q_rot, &cp[rank..]);
                scores.push(s * scale);
            }
            let sum = softmax(scores, None);
            o_lat.fill(0.0);
            for (p, s) in scores.iter().enumerate() {
                kernels::axpy(s / sum, &kc[p * cw..p * cw + rank], o_lat);
            }
            // out = W_uv o_lat (W_uv: the v_head_dim rows after W_uk).
            let oh = &mut o[head * vd..(head + 1) * vd];
            for (d, ov) in oh.iter_mut().enumerate() {
                *ov = kernels::dot(&w[(nope + d) * rank..(nope + d + 1) * rank], o_lat);
            }
        }
    };
    let od = heads * vd;
    let work: usize = chunks
        .iter()
        .map(|c| c.len * (c.start + c.len))
        .sum::<usize>()
        * heads
        * cw;
    if work > 1 << 18 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(od)
            .enumerate()
            .for_each_init(Default::default, one_row);
    } else {
        let mut buf = Default::default();
        out.chunks_mut(od)
            .enumerate()
            .for_each(|r| one_row(&mut buf, r));
    }
}
