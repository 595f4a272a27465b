//! CPU kernels for the hot spots: `y = x · Wᵀ` for linear layers stored as Hugging Face
//! writes them (`W` is `[out, in]`, row-major), and the dot products of attention.
//!
//! Decode multiplies a handful of rows by large weight matrices, so it is bound by memory
//! bandwidth: the small-batch path streams each weight row once for all input rows, splits
//! the output rows of several matrices (q/k/v, or every active expert's gate/up) over the
//! threads in one parallel region, and uses AVX-512 or AVX2 when the CPU has them. Larger
//! batches (prefill) are compute-bound and go to the `gemm` crate's packed kernels.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use rayon::prelude::*;

/// At or above this many input rows a matrix goes to `gemm` (packed, compute-bound path),
/// unless the CPU has AVX-512, whose register-tiled kernel here beats gemm's AVX2 one
/// (gemm's AVX-512 kernels need a nightly compiler). `MOE_GEMM_MIN_ROWS` overrides.
fn gemm_min_rows() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| {
        if let Some(n) = std::env::var("MOE_GEMM_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return n;
        }
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("MOE_NO_AVX512").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return usize::MAX;
        }
        16
    })
}

/// One `y[m, n] = x[m, k] · w[n, k]ᵀ`.
#[derive(Debug)]
pub struct MatMul<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub y: &'a mut [f32],
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl<'a> MatMul<'a> {
    pub fn new(x: &'a [f32], w: &'a [f32], y: &'a mut [f32], m: usize, n: usize, k: usize) -> Self {
        assert!(
            x.len() >= m * k && w.len() >= n * k && y.len() >= m * n,
            "matmul operand sizes"
        );
        Self { x, w, y, m, n, k }
    }
}

#[derive(Clone, Copy)]
struct Raw {
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    m: usize,
    n: usize,
    k: usize,
}

// SAFETY: a `Raw` is made from a `MatMul` whose borrows outlive the parallel region; threads
// write disjoint output columns (distinct weight rows) of `y`.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

impl Raw {
    fn of(j: &mut MatMul<'_>) -> Self {
        Self {
            x: j.x.as_ptr(),
            w: j.w.as_ptr(),
            y: j.y.as_mut_ptr(),
            m: j.m,
            n: j.n,
            k: j.k,
        }
    }
}

/// `y = x · wᵀ` for one matrix.
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    matmul_many(&mut [MatMul::new(x, w, y, m, n, k)]);
}

/// Several independent products in one parallel region (no fork/join between them).
pub fn matmul_many(jobs: &mut [MatMul<'_>]) {
    let threads = rayon::current_num_threads();
    let (small, large): (Vec<_>, Vec<_>) = jobs
        .iter_mut()
        .map(Raw::of)
        .partition(|j| j.m < gemm_min_rows());
    for j in large {
        // SAFETY: pointers and sizes come from checked slices (see `MatMul::new`).
        unsafe {
            gemm::gemm(
                j.m,
                j.n,
                j.k,
                j.y,
                1,
                j.n as isize,
                false,
                j.x,
                1,
                j.k as isize,
                j.w,
                j.k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
    }
    if small.is_empty() {
        return;
    }
    let total_rows: usize = small.iter().map(|j| j.n).sum();
    let bytes: usize = small.iter().map(|j| j.n * j.k * 4).sum();
    if threads == 1 || bytes < 64 * 1024 {
        for j in &small {
            rows_kernel(*j, 0, j.n);
        }
        return;
    }
    // Chunks of 4 rows at least, several per thread so an unlucky thread can catch up.
    let tasks = (threads * 4).min(total_rows.div_ceil(4));
    let per_task = total_rows.div_ceil(tasks).next_multiple_of(4);
    let tasks = total_rows.div_ceil(per_task);
    (0..tasks).into_par_iter().for_each(|t| {
        let (start, end) = (t * per_task, ((t + 1) * per_task).min(total_rows));
        let mut offset = 0;
        for j in &small {
            let (a, b) = (start.max(offset), end.min(offset + j.n));
            if a < b {
                rows_kernel(*j, a - offset, b - offset);
            }
            offset += j.n;
            if offset >= end {
                break;
            }
        }
    });
}

/// (k block, weight rows per block) of the blocked path; `MOE_KC`/`MOE_WB` override for tuning.
fn tuning() -> (usize, usize) {
    static T: OnceLock<(usize, usize)> = OnceLock::new();
    *T.get_or_init(|| {
        let get = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        (get("MOE_KC", 256), get("MOE_WB", 16))
    })
}

/// Up to this many input rows the product is bandwidth-bound: stream weight rows in place
/// (`MOE_STREAM_MAX_ROWS` tunes).
fn stream_max_rows() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MOE_STREAM_MAX_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(12)
    })
}

/// Floats ahead of use that streamed weight rows are prefetched (`MOE_PREFETCH` tunes). Rows
/// of a quad are adjacent, so running past a row's end fetches the next quad's rows.
fn prefetch_ahead() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MOE_PREFETCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
    })
}

type RowsFn = unsafe fn(Raw, usize, usize);

fn rows_fn() -> RowsFn {
    static CHOICE: OnceLock<RowsFn> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("MOE_NO_AVX512").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
            {
                return x86::rows_avx512 as RowsFn;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return x86::rows_avx2 as RowsFn;
            }
        }
        rows_scalar as RowsFn
    })
}

fn rows_kernel(j: Raw, r0: usize, r1: usize) {
    // SAFETY: `j` is valid (see `Raw`), and rows r0..r1 lie within 0..n.
    unsafe { rows_fn()(j, r0, r1) }
}

/// Portable fallback: output rows `r0..r1` of every input row.
unsafe fn rows_scalar(j: Raw, r0: usize, r1: usize) {
    // SAFETY: the caller guarantees the operand extents.
    let (x, w) = unsafe {
        (
            std::slice::from_raw_parts(j.x, j.m * j.k),
            std::slice::from_raw_parts(j.w, j.n * j.k),
        )
    };
    for r in r0..r1 {
        let wr = &w[r * j.k..(r + 1) * j.k];
        for i in 0..j.m {
            let xi = &x[i * j.k..(i + 1) * j.k];
            let s = dot_scalar(xi, wr);
            // SAFETY: i < m and r < n.
            unsafe { *j.y.add(i * j.n + r) = s };
        }
    }
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Dot product of two equal-length slices, vectorised where the CPU allows.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: feature checked above; slices have equal length.
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_scalar(a, b)
}

/// `y += alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Raw;
    use std::arch::x86_64::*;

    /// Input rows per register tile (6 x 4 accumulators + 5 operands fit the 32 zmm registers).
    const X_TILE: usize = 6;

    thread_local! {
        /// Per-thread copy of the current weight block (see `rows_avx512`).
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Small batches stream whole weight rows (long sequential reads, bandwidth-bound).
    /// Larger ones are blocked over k so that a block of weight rows and a tile of input
    /// rows both stay in L1 while every input tile passes over the weight block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512(j: Raw, r0: usize, r1: usize) {
        // Streaming re-reads each input tile from L2 per weight quad: fine for short rows.
        if j.m <= super::stream_max_rows() || (j.m <= 64 && j.k <= 1024) {
            // SAFETY: forwarded caller guarantees.
            unsafe { stream_rows(j, r0, r1) };
            return;
        }
        let (kc, wb) = super::tuning();
        PACKED.with_borrow_mut(|packed| {
            packed.resize(kc * wb, 0.0);
            let mut kb = 0;
            while kb < j.k {
                let klen = kc.min(j.k - kb);
                let mut b = r0;
                while b < r1 {
                    let be = (b + wb).min(r1);
                    // Copy the block contiguously: weight rows are a power-of-two stride
                    // apart in most models, which maps them onto a few L1 sets and thrashes.
                    for r in b..be {
                        // SAFETY: r < n and kb + klen <= k.
                        let src =
                            unsafe { std::slice::from_raw_parts(j.w.add(r * j.k + kb), klen) };
                        packed[(r - b) * klen..(r - b + 1) * klen].copy_from_slice(src);
                    }
                    // While computing on this block, fetch the next one into L2 a slice per
                    // input tile, so packing it does not wait on memory.
                    let (nb, nbe) = (be, (be + wb).min(r1));
                    let lines_per_row = (klen * 4).div_ceil(64);
                    let next_lines = (nbe - nb) * lines_per_row;
                    let tiles = j.m.div_ceil(X_TILE);
                    let mut i = 0;
                    while i < j.m {
                        let mx = (j.m - i).min(X_TILE);
                        let g = i / X_TILE;
                        for line in next_lines * g / tiles..next_lines * (g + 1) / tiles {
                            let (row, off) =
                                (nb + line / lines_per_row, (line % lines_per_row) * 16);
                            // SAFETY: prefetch of an address inside w (row < n, off < klen).
                            unsafe {
                                _mm_prefetch::<_MM_HINT_T1>(
                                    j.w.add(row * j.k + kb + off) as *const i8
                                )
                            };
                        }
                        let mut r = b;
                        while r < be {
                            let rows = (be - r).min(4);
                            // SAFETY: i + mx <= m, r + rows <= n, kb + klen <= k; see `Raw`.
                            unsafe {
                                let t = Tile {
                                    x: j.x.add(i * j.k + kb),
                                    ldx: j.k,
                                    w: packed.as_ptr().add((r - b) * klen),
                                    ldw: klen,
                                    klen,
                                    rows,
                                    y: j.y.add(i * j.n + r),
                                    ldy: j.n,
                                    add: kb > 0,
                                };
                                dispatch(mx, t);
                            }
                            r += rows;
                        }
                        i += mx;
                    }
                    b = be;
                }
                kb += klen;
            }
        });
    }

    /// Few input rows: stream whole weight rows in place, four at a time; every input tile
    /// passes over the four rows while they are in L1, so each weight byte comes from memory once.
    #[target_feature(enable = "avx512f")]
    unsafe fn stream_rows(j: Raw, r0: usize, r1: usize) {
        let mut r = r0;
        while r < r1 {
            let rows = (r1 - r).min(4);
            // Even input tiles (8 rows: 4 + 4, not 6 + 2).
            let tile_rows = j.m.div_ceil(j.m.div_ceil(X_TILE));
            let mut i = 0;
            while i < j.m {
                let mx = (j.m - i).min(tile_rows);
                // SAFETY: i + mx <= m, r + rows <= n; see `Raw`.
                unsafe {
                    let t = Tile {
                        x: j.x.add(i * j.k),
                        ldx: j.k,
                        w: j.w.add(r * j.k),
                        ldw: j.k,
                        klen: j.k,
                        rows,
                        y: j.y.add(i * j.n + r),
                        ldy: j.n,
                        add: false,
                    };
                    if i == 0 {
                        dispatch_streaming(mx, t)
                    } else {
                        dispatch(mx, t)
                    }
                }
                i += mx;
            }
            r += rows;
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch(mx: usize, t: Tile) {
        // SAFETY: forwarded caller guarantees.
        unsafe {
            match mx {
                1 => tile::<1, false>(t),
                2 => tile::<2, false>(t),
                3 => tile::<3, false>(t),
                4 => tile::<4, false>(t),
                5 => tile::<5, false>(t),
                _ => tile::<6, false>(t),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch_streaming(mx: usize, t: Tile) {
        // SAFETY: forwarded caller guarantees; prefetches never fault.
        unsafe {
            match mx {
                1 => tile::<1, true>(t),
                2 => tile::<2, true>(t),
                3 => tile::<3, true>(t),
                4 => tile::<4, true>(t),
                5 => tile::<5, true>(t),
                _ => tile::<6, true>(t),
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Tile {
        x: *const f32,
        ldx: usize,
        w: *const f32,
        ldw: usize,
        klen: usize,
        rows: usize,
        y: *mut f32,
        ldy: usize,
        /// Add to y (later k blocks) instead of storing.
        add: bool,
    }

    /// Sums each of four vectors: returns [Σa0, Σa1, Σa2, Σa3].
    #[target_feature(enable = "avx512f")]
    fn reduce4(a0: __m512, a1: __m512, a2: __m512, a3: __m512) -> __m128 {
        let t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
        let t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(t0, t1),
            _mm512_shuffle_ps::<0xEE>(t0, t1),
        );
        let lo = _mm512_castps512_ps256(u);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u)));
        let s = _mm256_add_ps(lo, hi);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// `y[i, q] (+)= x[i] · w[q]` over `klen` for MX input rows and up to 4 weight rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const MX: usize, const PREFETCH: bool>(t: Tile) {
        let Tile {
            x,
            ldx,
            w,
            ldw,
            klen,
            rows,
            y,
            ldy,
            add,
        } = t;
        let ahead = super::prefetch_ahead();
        // SAFETY (whole body): rows `0..MX` of x and `0..rows` of w hold klen floats from
        // here; y has MX rows of stride ldy with `rows` valid columns. Missing weight rows
        // alias row 0 and their results are dropped.
        unsafe {
            let wp = [
                w,
                w.add(if rows > 1 { ldw } else { 0 }),
                w.add(if rows > 2 { 2 * ldw } else { 0 }),
                w.add(if rows > 3 { 3 * ldw } else { 0 }),
            ];
            let mut acc = [[_mm512_setzero_ps(); 4]; MX];
            let kv = klen / 16 * 16;
            let mut c = 0;
            while c < kv {
                if PREFETCH {
                    // Weight rows stream from memory once: fetch ahead of use so the loads
                    // below hit L1 (hardware prefetch alone falls behind with many streams).
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c + ahead) as *const i8);
                    }
                }
                let wv = [
                    _mm512_loadu_ps(wp[0].add(c)),
                    _mm512_loadu_ps(wp[1].add(c)),
                    _mm512_loadu_ps(wp[2].add(c)),
                    _mm512_loadu_ps(wp[3].add(c)),
                ];
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * ldx + c));
                    for q in 0..4 {
                        a[q] = _mm512_fmadd_ps(wv[q], xv, a[q]);
                    }
                }
                c += 16;
            }
            if kv < klen {
                let mask: __mmask16 = ((1u32 << (klen - kv)) - 1) as u16;
                let wv = [
                    _mm512_maskz_loadu_ps(mask, wp[0].add(kv)),
                    _mm512_maskz_loadu_ps(mask, wp[1].add(kv)),
                    _mm512_maskz_loadu_ps(mask, wp[2].add(kv)),
                    _mm512_maskz_loadu_ps(mask, wp[3].add(kv)),
                ];
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * ldx + kv));
                    for q in 0..4 {
                        a[q] = _mm512_fmadd_ps(wv[q], xv, a[q]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let sums = reduce4(a[0], a[1], a[2], a[3]);
                let yr = y.add(i * ldy);
                if rows == 4 {
                    let v = if add {
                        _mm_add_ps(_mm_loadu_ps(yr), sums)
                    } else {
                        sums
                    };
                    _mm_storeu_ps(yr, v);
                } else {
                    let mut s = [0f32; 4];
                    _mm_storeu_ps(s.as_mut_ptr(), sums);
                    for (q, v) in s.iter().take(rows).enumerate() {
                        *yr.add(q) = if add { *yr.add(q) + v } else { *v };
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(j: Raw, r0: usize, r1: usize) {
        let k = j.k;
        let kv = k / 8 * 8;
        let mut r = r0;
        while r < r1 {
            let rows = (r1 - r).min(4);
            // SAFETY (whole block): as in `rows_avx512`.
            unsafe {
                let w0 = j.w.add(r * k);
                let w1 = if rows > 1 { j.w.add((r + 1) * k) } else { w0 };
                let w2 = if rows > 2 { j.w.add((r + 2) * k) } else { w0 };
                let w3 = if rows > 3 { j.w.add((r + 3) * k) } else { w0 };
                for i in 0..j.m {
                    let x = j.x.add(i * k);
                    let (mut a0, mut a1, mut a2, mut a3) = (
                        _mm256_setzero_ps(),
                        _mm256_setzero_ps(),
                        _mm256_setzero_ps(),
                        _mm256_setzero_ps(),
                    );
                    let mut c = 0;
                    while c < kv {
                        let xv = _mm256_loadu_ps(x.add(c));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(c)), xv, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(c)), xv, a1);
                        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(c)), xv, a2);
                        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3.add(c)), xv, a3);
                        c += 8;
                    }
                    let mut s = [hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)];
                    for t in kv..k {
                        let xt = *x.add(t);
                        s[0] += *w0.add(t) * xt;
                        s[1] += *w1.add(t) * xt;
                        s[2] += *w2.add(t) * xt;
                        s[3] += *w3.add(t) * xt;
                    }
                    let y = j.y.add(i * j.n + r);
                    for (q, v) in s.iter().take(rows).enumerate() {
                        *y.add(q) = *v;
                    }
                }
            }
            r += rows;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let nv = n / 16 * 16;
        // SAFETY: all offsets are below n.
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c < nv {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(c)),
                    _mm256_loadu_ps(b.as_ptr().add(c)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(c + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(c + 8)),
                    s1,
                );
                c += 16;
            }
            let mut s = hsum256(_mm256_add_ps(s0, s1));
            for t in nv..n {
                s += a[t] * b[t];
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for r in 0..n {
                y[i * n + r] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[r * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_naive_over_shapes() {
        // Odd shapes exercise the row, k and input-row tails; m >= 16 reaches gemm where it is used.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 33),
            (3, 130, 100),
            (5, 257, 512),
            (16, 64, 48),
            (40, 33, 17),
            (7, 70, 300),
            (13, 9, 1000),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let mut y = vec![0f32; m * n];
            matmul(&x, &w, &mut y, m, n, k);
            let want = naive(&x, &w, m, n, k);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{n}x{k}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn many_jobs_in_one_region_match_separate_calls() {
        let (k, m) = (96, 2);
        let x = data(m * k, 3);
        let (w1, w2) = (data(300 * k, 4), data(45 * k, 5));
        let (mut y1, mut y2) = (vec![0f32; m * 300], vec![0f32; m * 45]);
        matmul_many(&mut [
            MatMul::new(&x, &w1, &mut y1, m, 300, k),
            MatMul::new(&x, &w2, &mut y2, m, 45, k),
        ]);
        assert_eq!(y1, {
            let mut y = vec![0f32; m * 300];
            matmul(&x, &w1, &mut y, m, 300, k);
            y
        });
        let want = naive(&x, &w2, m, 45, k);
        for (a, b) in y2.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn scalar_and_simd_paths_agree() {
        let (m, n, k) = (2, 9, 77);
        let (x, w) = (data(m * k, 6), data(n * k, 7));
        let mut y = vec![0f32; m * n];
        let mut y_scalar = vec![0f32; m * n];
        let mut job = MatMul::new(&x, &w, &mut y_scalar, m, n, k);
        // SAFETY: extents checked by MatMul::new.
        unsafe { rows_scalar(Raw::of(&mut job), 0, n) };
        matmul(&x, &w, &mut y, m, n, k);
        for (a, b) in y.iter().zip(&y_scalar) {
            assert!((a - b).abs() < 1e-4);
        }
        assert!((dot(&x[..k], &w[..k]) - dot_scalar(&x[..k], &w[..k])).abs() < 1e-4);
    }
}
