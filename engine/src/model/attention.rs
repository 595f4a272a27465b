//! Rotary embeddings, the KV cache and causal grouped-query attention.

use rayon::prelude::*;

use super::Chunk;
use crate::config::ModelConfig;
use crate::kernels;

/// Keys and values of one sequence for a model part's layers, position-major
/// (`[position, kv_heads * head_dim]` per layer) so that appending a token is one copy.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            k: (0..layers)
                .map(|_| Vec::with_capacity(capacity * kv_dim))
                .collect(),
            v: (0..layers)
                .map(|_| Vec::with_capacity(capacity * kv_dim))
                .collect(),
            kv_dim,
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
        let want = positions * self.kv_dim;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            if buf.len() < want {
                buf.resize(want, 0.0);
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
}

impl RopeRows {
    pub(super) fn prepare(&mut self, cfg: &ModelConfig, chunks: &[Chunk]) {
        let half = cfg.head_dim / 2;
        self.half = half;
        self.cos.clear();
        self.sin.clear();
        let theta = cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        for c in chunks {
            for p in c.start..c.start + c.len {
                for &f in &inv {
                    let angle = p as f32 * f;
                    self.cos.push((angle as f64).cos() as f32);
                    self.sin.push((angle as f64).sin() as f32);
                }
            }
        }
    }

    fn apply(&self, row: usize, x: &mut [f32]) {
        let half = self.half;
        let (cos, sin) = (
            &self.cos[row * half..(row + 1) * half],
            &self.sin[row * half..(row + 1) * half],
        );
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// Rotates q and k, appends k and v to the caches, and writes each row's attention output
/// (`rows × q_dim`) to `out`. Causal within a chunk; a chunk also sees its sequence's cached
/// positions; a sliding window limits how far back a query looks.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    cfg: &ModelConfig,
    layer: usize,
    chunks: &[Chunk],
    caches: &mut [&mut KvCache],
    row_chunk: &[usize],
    rope: &RopeRows,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    out: &mut [f32],
) {
    let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    for (row, qr) in q.chunks_exact_mut(qd).enumerate() {
        rope.apply(row, qr);
    }
    for (row, kr) in k.chunks_exact_mut(kvd).enumerate() {
        rope.apply(row, kr);
    }
    let mut row = 0;
    for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
        let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
        let dst = c.start * kvd..(c.start + c.len) * kvd;
        kc[dst.clone()].copy_from_slice(&k[row * kvd..(row + c.len) * kvd]);
        vc[dst].copy_from_slice(&v[row * kvd..(row + c.len) * kvd]);
        row += c.len;
    }

    let caches: &[&mut KvCache] = caches;
    let group = cfg.num_attention_heads / cfg.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let window = cfg.sliding_window;
    let row_start: Vec<usize> = chunks
        .iter()
        .scan(0, |acc, c| {
            let s = *acc;
            *acc += c.len;
            Some(s)
        })
        .collect();
    let one_row = |scores: &mut Vec<f32>, (row, o): (usize, &mut [f32])| {
        let ci = row_chunk[row];
        let c = chunks[ci];
        let pos = c.start + (row - row_start[ci]);
        // transformers' sliding window: a query at `pos` sees keys in (pos - window, pos].
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let (kc, vc) = (&caches[ci].k[layer], &caches[ci].v[layer]);
        let qr = &q[row * qd..(row + 1) * qd];
        for head in 0..cfg.num_attention_heads {
            let kvh = head / group;
            let qh = &qr[head * hd..(head + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for p in first..=pos {
                let s = kernels::dot(qh, &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
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
