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

/// At or above this many input rows a matrix goes to `gemm` (packed, compute-bound path).
pub const GEMM_MIN_ROWS: usize = 16;

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
        assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n, "matmul operand sizes");
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
        Self { x: j.x.as_ptr(), w: j.w.as_ptr(), y: j.y.as_mut_ptr(), m: j.m, n: j.n, k: j.k }
    }
}

/// `y = x · wᵀ` for one matrix.
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    matmul_many(&mut [MatMul::new(x, w, y, m, n, k)]);
}

/// Several independent products in one parallel region (no fork/join between them).
pub fn matmul_many(jobs: &mut [MatMul<'_>]) {
    let threads = rayon::current_num_threads();
    let (small, large): (Vec<_>, Vec<_>) = jobs.iter_mut().map(Raw::of).partition(|j| j.m < GEMM_MIN_ROWS);
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
                if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
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

type RowsFn = unsafe fn(Raw, usize, usize);

fn rows_fn() -> RowsFn {
    static CHOICE: OnceLock<RowsFn> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("MOE_NO_AVX512").is_none() && std::arch::is_x86_feature_detected!("avx512f") {
                return x86::rows_avx512 as RowsFn;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
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
    let (x, w) = unsafe { (std::slice::from_raw_parts(j.x, j.m * j.k), std::slice::from_raw_parts(j.w, j.n * j.k)) };
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
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
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

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512(j: Raw, r0: usize, r1: usize) {
        let k = j.k;
        let kv = k / 16 * 16;
        let mut r = r0;
        while r < r1 {
            let rows = (r1 - r).min(4);
            // SAFETY (whole block): r + rows <= n, i < m, offsets < k; see `Raw`.
            unsafe {
                let w0 = j.w.add(r * k);
                let w1 = if rows > 1 { j.w.add((r + 1) * k) } else { w0 };
                let w2 = if rows > 2 { j.w.add((r + 2) * k) } else { w0 };
                let w3 = if rows > 3 { j.w.add((r + 3) * k) } else { w0 };
                for i in 0..j.m {
                    let x = j.x.add(i * k);
                    let (mut a0, mut a1, mut a2, mut a3) =
                        (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
                    let mut c = 0;
                    while c < kv {
                        let xv = _mm512_loadu_ps(x.add(c));
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0.add(c)), xv, a0);
                        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1.add(c)), xv, a1);
                        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2.add(c)), xv, a2);
                        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3.add(c)), xv, a3);
                        c += 16;
                    }
                    let mut s = [
                        _mm512_reduce_add_ps(a0),
                        _mm512_reduce_add_ps(a1),
                        _mm512_reduce_add_ps(a2),
                        _mm512_reduce_add_ps(a3),
                    ];
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
                    let (mut a0, mut a1, mut a2, mut a3) =
                        (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
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
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(c)), _mm256_loadu_ps(b.as_ptr().add(c)), s0);
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
                y[i * n + r] = (0..k).map(|t| x[i * k + t] as f64 * w[r * k + t] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn matches_naive_over_shapes() {
        // Odd shapes exercise the row and k tails; m >= GEMM_MIN_ROWS exercises gemm.
        for &(m, n, k) in &[(1, 1, 1), (1, 7, 33), (3, 130, 100), (5, 257, 512), (16, 64, 48), (40, 33, 17)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let mut y = vec![0f32; m * n];
            matmul(&x, &w, &mut y, m, n, k);
            let want = naive(&x, &w, m, n, k);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{m}x{n}x{k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn many_jobs_in_one_region_match_separate_calls() {
        let (k, m) = (96, 2);
        let x = data(m * k, 3);
        let (w1, w2) = (data(300 * k, 4), data(45 * k, 5));
        let (mut y1, mut y2) = (vec![0f32; m * 300], vec![0f32; m * 45]);
        matmul_many(&mut [MatMul::new(&x, &w1, &mut y1, m, 300, k), MatMul::new(&x, &w2, &mut y2, m, 45, k)]);
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
