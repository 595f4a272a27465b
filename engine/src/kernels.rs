//! CPU kernels for the hot spots: `y = x · Wᵀ` for linear layers stored as Hugging Face
//! writes them (`W` is `[out, in]`, row-major), and the dot products of attention.
//!
//! Weights come in three formats ([`Mat`]): f32, bf16 (as stored in the checkpoint, widened
//! in registers) and 8-bit blocks ([`Q8_BLOCK`] weights of a row share one f32 scale).
//! Activations and accumulation are always f32, so a bf16 or 8-bit product equals the f32
//! product of the widened (dequantised) weights up to summation order.
//!
//! Decode multiplies a handful of rows by large weight matrices, so it is bound by memory
//! bandwidth: the small-batch path streams each weight row once for all input rows, splits
//! the output rows of several matrices (q/k/v, or every active expert's gate/up) over the
//! threads in one parallel region, and prefetches ahead of the loads. Larger batches
//! (prefill) are compute-bound: weight blocks are widened into a per-thread f32 buffer and
//! every input tile passes over them while they sit in L1.
//!
//! The instruction set is chosen once at run time ([`Isa`]): AVX-512, AVX2 with FMA, or a
//! portable fallback; `MOE_KERNELS=avx512|avx2|portable` forces one (for comparisons and
//! tests; a path the CPU lacks is refused and the best available one is used).
#![allow(unsafe_code)]

use std::sync::OnceLock;

use rayon::prelude::*;

/// Weights per 8-bit block (one f32 scale each), along a row.
pub const Q8_BLOCK: usize = 32;

/// Bytes an 8-bit weight takes, its share of the block's f32 scale included.
pub const Q8_BYTES_PER_WEIGHT: f64 = 1.0 + 4.0 / Q8_BLOCK as f64;

/// A weight matrix `[n, k]` (row-major) in one of the formats the kernels read.
#[derive(Debug, Clone, Copy)]
pub enum Mat<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns, as stored in safetensors (little-endian `u16`).
    Bf16(&'a [u16]),
    /// `q[r * k + c] * d[r * (k / Q8_BLOCK) + c / Q8_BLOCK]`.
    Q8 {
        q: &'a [i8],
        d: &'a [f32],
    },
}

impl Mat<'_> {
    /// Whether this matrix holds at least `n × k` weights (and `k` fits the format).
    fn holds(&self, n: usize, k: usize) -> bool {
        match self {
            Mat::F32(w) => w.len() >= n * k,
            Mat::Bf16(w) => w.len() >= n * k,
            Mat::Q8 { q, d } => {
                k.is_multiple_of(Q8_BLOCK) && q.len() >= n * k && d.len() >= n * (k / Q8_BLOCK)
            }
        }
    }

    /// Bytes read per weight (8-bit: the scales included).
    pub fn bytes_per_weight(&self) -> f64 {
        match self {
            Mat::F32(_) => 4.0,
            Mat::Bf16(_) => 2.0,
            Mat::Q8 { .. } => Q8_BYTES_PER_WEIGHT,
        }
    }

    /// Weight `i` (row-major), widened (dequantised).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Mat::F32(v) => v[i],
            Mat::Bf16(v) => from_bf16(v[i]),
            Mat::Q8 { q, d } => q[i] as f32 * d[i / Q8_BLOCK],
        }
    }
}

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2+fma",
            Isa::Portable => "portable",
        }
    }

    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }
}

/// The instruction set in use: the best the CPU has, unless `MOE_KERNELS` (or the older
/// `MOE_NO_AVX512`) asks for a lesser one.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let asked = match std::env::var("MOE_KERNELS").ok().as_deref() {
            Some("avx512") => Some(Isa::Avx512),
            Some("avx2") => Some(Isa::Avx2),
            Some("portable" | "scalar") => Some(Isa::Portable),
            _ if std::env::var_os("MOE_NO_AVX512").is_some() => Some(Isa::Avx2),
            _ => None,
        };
        if let Some(i) = asked.filter(|i| i.available()) {
            return i;
        }
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Portable)
    })
}

/// The CPU's features that matter to the kernels, for benchmark reports.
pub fn cpu_features() -> String {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { out.push($f); }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(" ")
    }
}

/// Rounds a float to the nearest bf16 (ties to even), as PyTorch does.
pub fn to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Widens a bf16 bit pattern.
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Quantises a row-major `[n, k]` matrix (`k` a multiple of [`Q8_BLOCK`]) into 8-bit values
/// and one scale per block: `d = max|w| / 127`, `q = round(w / d)`.
pub fn quantize_q8(w: impl Fn(usize) -> f32, n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    debug_assert_eq!(k % Q8_BLOCK, 0);
    let blocks = n * k / Q8_BLOCK;
    let mut q = vec![0i8; n * k];
    let mut d = vec![0f32; blocks];
    for (b, (qb, db)) in q.chunks_exact_mut(Q8_BLOCK).zip(d.iter_mut()).enumerate() {
        let base = b * Q8_BLOCK;
        let amax = (0..Q8_BLOCK)
            .map(|i| w(base + i).abs())
            .fold(0f32, f32::max);
        let scale = amax / 127.0;
        *db = scale;
        if scale > 0.0 {
            let inv = 1.0 / scale;
            for (i, v) in qb.iter_mut().enumerate() {
                *v = (w(base + i) * inv).round().clamp(-127.0, 127.0) as i8;
            }
        }
    }
    (q, d)
}

/// At or above this many input rows an f32 product goes to the `gemm` crate's packed
/// kernels, on CPUs where this module has no SIMD path (its own blocked kernels beat gemm's
/// by 30% at prefill on AVX2 and more on AVX-512, and gemm's AVX-512 needs a nightly
/// compiler). `MOE_GEMM_MIN_ROWS` overrides.
fn gemm_min_rows() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| {
        if let Some(n) = std::env::var("MOE_GEMM_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return n;
        }
        if isa() == Isa::Portable {
            16
        } else {
            usize::MAX
        }
    })
}

/// One `y[m, n] = x[m, k] · w[n, k]ᵀ`.
#[derive(Debug)]
pub struct MatMul<'a> {
    pub x: &'a [f32],
    pub w: Mat<'a>,
    pub y: &'a mut [f32],
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl<'a> MatMul<'a> {
    pub fn new(x: &'a [f32], w: Mat<'a>, y: &'a mut [f32], m: usize, n: usize, k: usize) -> Self {
        assert!(
            x.len() >= m * k && w.holds(n, k) && y.len() >= m * n,
            "matmul operand sizes"
        );
        Self { x, w, y, m, n, k }
    }
}

/// Weight rows as the kernels read them: the format's pointers and its row length.
#[derive(Clone, Copy)]
enum WPtr {
    F32(*const f32),
    Bf16(*const u16),
    Q8(*const i8, *const f32),
}

#[derive(Clone, Copy)]
struct Raw {
    x: *const f32,
    /// The input rows packed k-major for the outer-product path, when prepared (null: none).
    xp: *const f32,
    w: WPtr,
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
            xp: std::ptr::null(),
            w: match j.w {
                Mat::F32(w) => WPtr::F32(w.as_ptr()),
                Mat::Bf16(w) => WPtr::Bf16(w.as_ptr()),
                Mat::Q8 { q, d } => WPtr::Q8(q.as_ptr(), d.as_ptr()),
            },
            y: j.y.as_mut_ptr(),
            m: j.m,
            n: j.n,
            k: j.k,
        }
    }

    fn weight_bytes(&self) -> usize {
        let per = match self.w {
            WPtr::F32(_) => 4.0,
            WPtr::Bf16(_) => 2.0,
            WPtr::Q8(..) => Q8_BYTES_PER_WEIGHT,
        };
        (self.n as f64 * self.k as f64 * per) as usize
    }
}

/// `y = x · wᵀ` for one matrix.
pub fn matmul(x: &[f32], w: Mat<'_>, y: &mut [f32], m: usize, n: usize, k: usize) {
    matmul_many(&mut [MatMul::new(x, w, y, m, n, k)]);
}

/// Several independent products in one parallel region (no fork/join between them).
pub fn matmul_many(jobs: &mut [MatMul<'_>]) {
    let _t = crate::profile::time(crate::profile::Part::Matmul);
    let threads = rayon::current_num_threads();
    let (small, large): (Vec<_>, Vec<_>) = jobs
        .iter_mut()
        .map(Raw::of)
        .partition(|j| j.m < gemm_min_rows() || !matches!(j.w, WPtr::F32(_)));
    for j in large {
        let WPtr::F32(w) = j.w else { continue };
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
                w,
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
    // Inputs of the outer-product path are packed once here, not once per task.
    #[cfg(target_arch = "x86_64")]
    let mut small = small;
    #[cfg(target_arch = "x86_64")]
    let _packed: Vec<Vec<f32>> = small
        .iter_mut()
        .filter(|j| x86::uses_outer(j))
        .map(|j| {
            // SAFETY: x holds m rows of k values (checked by `MatMul::new`).
            let p = unsafe { x86::pack_x(j.x, j.m, j.k) };
            j.xp = p.as_ptr();
            p
        })
        .collect();
    let total_rows: usize = small.iter().map(|j| j.n).sum();
    let bytes: usize = small.iter().map(Raw::weight_bytes).sum();
    crate::profile::add_bytes(bytes as u64);
    if threads == 1 || bytes < 64 * 1024 {
        for j in &small {
            rows_kernel(*j, 0, j.n);
        }
        return;
    }
    // Chunks of 4 rows at least, several per thread so an unlucky thread can catch up.
    let tasks = (threads * tasks_per_thread()).min(total_rows.div_ceil(4));
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

/// From this many input rows AVX-512 uses the outer-product kernel for products of 2048+
/// output columns (`MOE_OUTER_MIN_ROWS` tunes; the dot-product tiles below it). In
/// isolation it wins from 32 rows (32x2816x1024: 95 vs 77 GFMA/s), but inside base's prefill
/// at 32 (its experts' ~32-row products) bf16 lost 5% and f32 tied, so 48.
fn outer_min_rows() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MOE_OUTER_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48)
    })
}

/// Tasks per thread a parallel region is split into (`MOE_TASKS_PER_THREAD` tunes).
fn tasks_per_thread() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MOE_TASKS_PER_THREAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(4)
    })
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

/// Whether few input rows over bf16 weights read them in pairs (default; `MOE_BF16_PAIRS=0`
/// widens them one vector at a time, for comparison).
fn bf16_pairs() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var("MOE_BF16_PAIRS").map_or(true, |v| v != "0"))
}

/// Bytes ahead of use that a streamed weight row is prefetched: `default` (the format's
/// best measured distance) unless `MOE_PREFETCH` (in f32 weights, for tuning) says otherwise.
fn prefetch_bytes(default: usize) -> usize {
    static T: OnceLock<Option<usize>> = OnceLock::new();
    T.get_or_init(|| {
        std::env::var("MOE_PREFETCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|n| n * 4)
    })
    .unwrap_or(default)
}

fn rows_kernel(j: Raw, r0: usize, r1: usize) {
    // SAFETY: `j` is valid (see `Raw`), rows r0..r1 lie within 0..n, and `isa()` checked
    // the instruction set.
    unsafe { rows_with(isa(), j, r0, r1) }
}

/// # Safety
/// `j` is valid (see `Raw`), rows `r0..r1` lie within `0..n`, and the CPU has `isa`.
unsafe fn rows_with(isa: Isa, j: Raw, r0: usize, r1: usize) {
    // SAFETY: forwarded.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => match j.w {
                WPtr::F32(p) => x86::rows_avx512(j, x86::F32W(p), r0, r1),
                WPtr::Bf16(p) => x86::rows_avx512(j, x86::Bf16W(p), r0, r1),
                WPtr::Q8(q, d) => x86::rows_avx512(j, x86::Q8W(q, d), r0, r1),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match j.w {
                WPtr::F32(p) => x86::rows_avx2(j, x86::F32W(p), r0, r1),
                WPtr::Bf16(p) => x86::rows_avx2(j, x86::Bf16W(p), r0, r1),
                WPtr::Q8(q, d) => x86::rows_avx2(j, x86::Q8W(q, d), r0, r1),
            },
            _ => rows_portable(j, r0, r1),
        }
    }
}

/// One weight, widened (portable path and tails).
///
/// # Safety
/// `r < n` and `c < k` of the matrix behind `w`.
#[inline(always)]
unsafe fn weight_at(w: WPtr, k: usize, r: usize, c: usize) -> f32 {
    // SAFETY: forwarded caller guarantee.
    unsafe {
        match w {
            WPtr::F32(p) => *p.add(r * k + c),
            WPtr::Bf16(p) => from_bf16(*p.add(r * k + c)),
            WPtr::Q8(q, d) => *q.add(r * k + c) as f32 * *d.add((r * k + c) / Q8_BLOCK),
        }
    }
}

/// Portable fallback: output rows `r0..r1` of every input row.
unsafe fn rows_portable(j: Raw, r0: usize, r1: usize) {
    let mut wr = vec![0f32; j.k];
    // SAFETY: the caller guarantees the operand extents.
    let x = unsafe { std::slice::from_raw_parts(j.x, j.m * j.k) };
    for r in r0..r1 {
        for (c, v) in wr.iter_mut().enumerate() {
            // SAFETY: r < n, c < k.
            *v = unsafe { weight_at(j.w, j.k, r, c) };
        }
        for i in 0..j.m {
            let s = dot_portable(&x[i * j.k..(i + 1) * j.k], &wr);
            // SAFETY: i < m and r < n.
            unsafe { *j.y.add(i * j.n + r) = s };
        }
    }
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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
        if isa() != Isa::Portable {
            // SAFETY: AVX2 and FMA are present wherever `isa()` is not portable; slices have
            // equal length.
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Multiply-adds per second this thread sustains with the kernels' instruction set, counted
/// as 2 FLOPs each: many independent register FMAs for `seconds` (the compute peak that a
/// prefill's share is measured against).
pub fn fma_peak_flops(seconds: f64) -> f64 {
    let start = std::time::Instant::now();
    let mut flops = 0f64;
    let mut sink = 0f32;
    while start.elapsed().as_secs_f64() < seconds {
        let n = 1 << 20;
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each path runs only where `isa()` found its features.
            let (s, per) = unsafe {
                match isa() {
                    Isa::Avx512 => (x86::fma_loop_512(n), 16),
                    Isa::Avx2 => (x86::fma_loop_256(n), 8),
                    Isa::Portable => (fma_loop_portable(n), 1),
                }
            };
            sink += s;
            flops += (n * x86::FMA_CHAINS * per * 2) as f64;
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            sink += fma_loop_portable(n);
            flops += (n * 12 * 2) as f64;
        }
    }
    std::hint::black_box(sink);
    flops / start.elapsed().as_secs_f64()
}

fn fma_loop_portable(n: usize) -> f32 {
    let mut acc = [1f32; 12];
    let (a, b) = (
        std::hint::black_box(0.999f32),
        std::hint::black_box(0.001f32),
    );
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().sum()
}

/// `y += alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q8_BLOCK, Raw, from_bf16};
    use std::arch::x86_64::*;

    /// A weight format as the SIMD kernels read it. `at` counts weights from the start of
    /// the matrix (`row * k + column`).
    pub(super) trait WFmt: Copy {
        /// Bytes per weight (prefetch distances).
        const BYTES: usize;
        /// How far ahead streamed rows are prefetched, in bytes (measured: 8 KiB for every
        /// format on `base`; `mini` is flat between 4 and 16 KiB).
        const PREFETCH_BYTES: usize;
        /// 16 weights from `at` (a multiple of 16 for 8-bit blocks), widened.
        unsafe fn v16(self, at: usize) -> __m512;
        /// 8 weights from `at` (a multiple of 8 for 8-bit blocks), widened.
        unsafe fn v8(self, at: usize) -> __m256;
        unsafe fn one(self, at: usize) -> f32;
        fn addr(self, at: usize) -> *const i8;
        /// The bf16 weights, for kernels that read them in pairs.
        fn bf16(self) -> Option<*const u16> {
            None
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct F32W(pub *const f32);
    #[derive(Clone, Copy)]
    pub(super) struct Bf16W(pub *const u16);
    #[derive(Clone, Copy)]
    pub(super) struct Q8W(pub *const i8, pub *const f32);

    impl WFmt for F32W {
        const BYTES: usize = 4;
        const PREFETCH_BYTES: usize = 8192;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn v16(self, at: usize) -> __m512 {
            // SAFETY: caller keeps `at..at + 16` inside the matrix.
            unsafe { _mm512_loadu_ps(self.0.add(at)) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v8(self, at: usize) -> __m256 {
            // SAFETY: as above.
            unsafe { _mm256_loadu_ps(self.0.add(at)) }
        }
        #[inline(always)]
        unsafe fn one(self, at: usize) -> f32 {
            // SAFETY: as above.
            unsafe { *self.0.add(at) }
        }
        #[inline(always)]
        fn addr(self, at: usize) -> *const i8 {
            self.0.wrapping_add(at) as *const i8
        }
    }

    impl WFmt for Bf16W {
        const BYTES: usize = 2;
        const PREFETCH_BYTES: usize = 8192;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn v16(self, at: usize) -> __m512 {
            // SAFETY: caller keeps `at..at + 16` inside the matrix.
            unsafe {
                let h = _mm256_loadu_si256(self.0.add(at) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v8(self, at: usize) -> __m256 {
            // SAFETY: as above.
            unsafe {
                let h = _mm_loadu_si128(self.0.add(at) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn one(self, at: usize) -> f32 {
            // SAFETY: as above.
            from_bf16(unsafe { *self.0.add(at) })
        }
        #[inline(always)]
        fn addr(self, at: usize) -> *const i8 {
            self.0.wrapping_add(at) as *const i8
        }
        fn bf16(self) -> Option<*const u16> {
            Some(self.0)
        }
    }

    impl WFmt for Q8W {
        const BYTES: usize = 1;
        const PREFETCH_BYTES: usize = 8192;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn v16(self, at: usize) -> __m512 {
            // SAFETY: caller keeps `at..at + 16` inside the matrix; its block's scale exists.
            unsafe {
                let q = _mm_loadu_si128(self.0.add(at) as *const __m128i);
                let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                _mm512_mul_ps(v, _mm512_set1_ps(*self.1.add(at / Q8_BLOCK)))
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v8(self, at: usize) -> __m256 {
            // SAFETY: as above.
            unsafe {
                let q = _mm_loadl_epi64(self.0.add(at) as *const __m128i);
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_mul_ps(v, _mm256_set1_ps(*self.1.add(at / Q8_BLOCK)))
            }
        }
        #[inline(always)]
        unsafe fn one(self, at: usize) -> f32 {
            // SAFETY: as above.
            unsafe { *self.0.add(at) as f32 * *self.1.add(at / Q8_BLOCK) }
        }
        #[inline(always)]
        fn addr(self, at: usize) -> *const i8 {
            self.0.wrapping_add(at)
        }
    }

    /// MX input rows by up to 4 weight rows over `klen` columns from `kb`.
    #[derive(Clone, Copy)]
    struct Tile<W> {
        x: *const f32,
        ldx: usize,
        w: W,
        /// Offset (in weights) of the first weight row's column `kb`.
        w0: usize,
        ldw: usize,
        klen: usize,
        rows: usize,
        y: *mut f32,
        ldy: usize,
        /// Add to y (later k blocks) instead of storing.
        add: bool,
    }

    impl<W: Copy> Tile<W> {
        /// Offsets of the (up to) four weight rows; missing rows alias row 0 (results dropped).
        fn rows4(&self) -> [usize; 4] {
            let r = |q: usize| {
                if self.rows > q {
                    self.w0 + q * self.ldw
                } else {
                    self.w0
                }
            };
            [r(0), r(1), r(2), r(3)]
        }

        /// Stores (or adds) the four sums of each input row.
        ///
        /// # Safety
        /// `y` has `i + 1` rows of stride `ldy` with `rows` valid columns.
        unsafe fn put(&self, i: usize, s: [f32; 4]) {
            // SAFETY: forwarded caller guarantee.
            unsafe {
                let yr = self.y.add(i * self.ldy);
                for (q, v) in s.iter().take(self.rows).enumerate() {
                    *yr.add(q) = if self.add { *yr.add(q) + v } else { *v };
                }
            }
        }
    }

    /// One instruction set's tile kernel.
    trait Simd {
        /// Input rows per register tile.
        const X_TILE: usize;
        /// f32 lanes of a vector: [`stream_bf16_pairs`] reads 2 x LANES bf16 weights per load.
        const LANES: usize;
        /// Input rows per tile of [`stream_bf16_pairs`].
        const PAIR_ROWS: usize;
        /// Input rows up to which bf16 weights are read in pairs: decode's sizes, not
        /// prefill's ~32-row expert products (there the 6-row AVX-512 tile, widening each
        /// vector once for more rows, won: mini prefill −8% with pairs). AVX2's 2-row tiles
        /// lost at 8 rows (mini b8 −6%) and won at 1 (base b1 +12%).
        const PAIR_MAX_ROWS: usize;
        /// One tile of [`stream_bf16_pairs`] (`mx` input rows, at most `PAIR_ROWS`).
        unsafe fn pair_tile(mx: usize, t: PairTile<'_>, prefetch: bool);
        unsafe fn tile<W: WFmt>(mx: usize, t: Tile<W>, prefetch: bool);
        /// Widens `dst.len()` weights from `at` into `dst`.
        unsafe fn widen<W: WFmt>(w: W, at: usize, dst: &mut [f32]);
    }

    struct Avx512;
    struct Avx2;

    impl Simd for Avx512 {
        /// 6 x 4 accumulators + 5 operands fit the 32 zmm registers.
        const X_TILE: usize = 6;
        const LANES: usize = 16;
        /// 4 x 4 accumulators, 8 inputs, a pair and its halves, the mask: 31 zmm.
        const PAIR_ROWS: usize = 4;
        const PAIR_MAX_ROWS: usize = 8;
        unsafe fn pair_tile(mx: usize, t: PairTile<'_>, prefetch: bool) {
            // SAFETY: forwarded caller guarantees; `rows_avx512` checked the features.
            unsafe {
                match (mx, prefetch) {
                    (1, true) => pair_tile512::<1, true>(t),
                    (2, true) => pair_tile512::<2, true>(t),
                    (3, true) => pair_tile512::<3, true>(t),
                    (_, true) => pair_tile512::<4, true>(t),
                    (1, false) => pair_tile512::<1, false>(t),
                    (2, false) => pair_tile512::<2, false>(t),
                    (3, false) => pair_tile512::<3, false>(t),
                    (_, false) => pair_tile512::<4, false>(t),
                }
            }
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn widen<W: WFmt>(w: W, at: usize, dst: &mut [f32]) {
            let n = dst.len();
            let mut c = 0;
            // SAFETY: `at..at + n` lies inside the matrix.
            unsafe {
                while c + 16 <= n {
                    _mm512_storeu_ps(dst.as_mut_ptr().add(c), w.v16(at + c));
                    c += 16;
                }
                for (i, v) in dst.iter_mut().enumerate().skip(c) {
                    *v = w.one(at + i);
                }
            }
        }
        unsafe fn tile<W: WFmt>(mx: usize, t: Tile<W>, prefetch: bool) {
            // SAFETY: forwarded caller guarantees; `rows_avx512` checked the features.
            unsafe {
                match (mx, prefetch) {
                    (1, true) => tile512::<1, true, W>(t),
                    (2, true) => tile512::<2, true, W>(t),
                    (3, true) => tile512::<3, true, W>(t),
                    (4, true) => tile512::<4, true, W>(t),
                    (5, true) => tile512::<5, true, W>(t),
                    (_, true) => tile512::<6, true, W>(t),
                    (1, false) => tile512::<1, false, W>(t),
                    (2, false) => tile512::<2, false, W>(t),
                    (3, false) => tile512::<3, false, W>(t),
                    (4, false) => tile512::<4, false, W>(t),
                    (5, false) => tile512::<5, false, W>(t),
                    (_, false) => tile512::<6, false, W>(t),
                }
            }
        }
    }

    impl Simd for Avx2 {
        /// 3 x 4 accumulators, 3 inputs and one weight vector fill the 16 ymm registers.
        const X_TILE: usize = 3;
        const LANES: usize = 8;
        /// 2 x 4 accumulators, 4 inputs, a pair and its halves, the mask: 16 ymm.
        const PAIR_ROWS: usize = 2;
        const PAIR_MAX_ROWS: usize = 2;
        unsafe fn pair_tile(mx: usize, t: PairTile<'_>, prefetch: bool) {
            // SAFETY: forwarded caller guarantees; `rows_avx2` checked the features.
            unsafe {
                match (mx, prefetch) {
                    (1, true) => pair_tile256::<1, true>(t),
                    (_, true) => pair_tile256::<2, true>(t),
                    (1, false) => pair_tile256::<1, false>(t),
                    (_, false) => pair_tile256::<2, false>(t),
                }
            }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn widen<W: WFmt>(w: W, at: usize, dst: &mut [f32]) {
            let n = dst.len();
            let mut c = 0;
            // SAFETY: `at..at + n` lies inside the matrix.
            unsafe {
                while c + 8 <= n {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(c), w.v8(at + c));
                    c += 8;
                }
                for (i, v) in dst.iter_mut().enumerate().skip(c) {
                    *v = w.one(at + i);
                }
            }
        }
        unsafe fn tile<W: WFmt>(mx: usize, t: Tile<W>, prefetch: bool) {
            // SAFETY: forwarded caller guarantees; `rows_avx2` checked the features.
            unsafe {
                match (mx, prefetch) {
                    (1, true) => tile256::<1, true, W>(t),
                    (2, true) => tile256::<2, true, W>(t),
                    (_, true) => tile256::<3, true, W>(t),
                    (1, false) => tile256::<1, false, W>(t),
                    (2, false) => tile256::<2, false, W>(t),
                    (_, false) => tile256::<3, false, W>(t),
                }
            }
        }
    }

    thread_local! {
        /// Per-thread f32 copy of the current weight block (see `rows`).
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// # Safety
    /// `j` is valid (see `Raw`), `w` is its weights, rows `r0..r1` lie within `0..n`, and
    /// the CPU has AVX-512F.
    pub(super) unsafe fn rows_avx512<W: WFmt>(j: Raw, w: W, r0: usize, r1: usize) {
        // SAFETY: forwarded; the outer-product path needs AVX-512F only.
        unsafe {
            if !j.xp.is_null() {
                outer512(j, w, r0, r1)
            } else {
                rows::<Avx512, W>(j, w, r0, r1)
            }
        }
    }

    /// Whether a product goes to the outer-product path (its inputs are then packed first).
    pub(super) fn uses_outer(j: &Raw) -> bool {
        super::isa() == super::Isa::Avx512 && j.m >= super::outer_min_rows() && j.n >= OP_MIN_N
    }

    /// The input rows k-major, per k block of `OP_KC` and panel of 32 rows:
    /// `[block][panel][kk][lane]`, zero past `m`.
    ///
    /// # Safety
    /// `x` holds `m × k` floats.
    pub(super) unsafe fn pack_x(x: *const f32, m: usize, k: usize) -> Vec<f32> {
        let panels = m.div_ceil(OP_NR);
        let blocks = k.div_ceil(OP_KC);
        let mut out = vec![0f32; blocks * panels * OP_KC * OP_NR];
        // SAFETY: forwarded.
        let x = unsafe { std::slice::from_raw_parts(x, m * k) };
        for (i, row) in x.chunks_exact(k).enumerate() {
            let (p, l) = (i / OP_NR, i % OP_NR);
            for (b, part) in row.chunks(OP_KC).enumerate() {
                let base = (b * panels + p) * OP_KC * OP_NR + l;
                for (kk, v) in part.iter().enumerate() {
                    out[base + kk * OP_NR] = *v;
                }
            }
        }
        out
    }

    /// Weight rows per outer-product tile, input rows per panel (two zmm), and the k block:
    /// 12 x 2 accumulators, two input vectors and a broadcast fill 27 of the 32 registers.
    const OP_MR: usize = 12;
    const OP_NR: usize = 32;
    const OP_KC: usize = 256;
    /// Output columns (weight rows) from which the outer-product path pays: its packing and
    /// tile stores are amortised over many weight rows. Measured (2 threads, f32): 128 x
    /// 2816 x 1024 at 118 vs 74 GFMA/s, 128 x 32000 x 512 at 110 vs 76, 64 x 2816 x 1024 at
    /// 105 vs 79; but 128 x 512 x 512 ties, 128 x 128 x 512 loses (37 vs 45), and inside the
    /// presets' prefill (attention products of 128-1024 rows) bf16 lost 10-20%.
    const OP_MIN_N: usize = 2048;

    /// Many input rows (prefill): outer products, BLIS style. The input rows were copied
    /// k-major in panels of 32 once per product (`pack_x`); per k block and 12 weight rows,
    /// the weights are widened row-major into a fixed-stride buffer; then every panel runs the
    /// 12 x 32 micro-kernel — per column two vector loads and 12 broadcasts feed 24 FMAs, no
    /// horizontal sums — and adds its transposed tile into y.
    ///
    /// # Safety
    /// As `rows_avx512`.
    #[target_feature(enable = "avx512f")]
    unsafe fn outer512<W: WFmt>(j: Raw, w: W, r0: usize, r1: usize) {
        let panels = j.m.div_ceil(OP_NR);
        PACKED.with_borrow_mut(|packed| {
            packed.resize(OP_MR * OP_KC + panels * OP_MR * OP_NR, 0.0);
            let (packed, tiles) = packed.split_at_mut(OP_MR * OP_KC);
            // Weight rows outer, k blocks inner: each group of 12 rows streams from memory
            // once, and its output tiles are summed in a contiguous buffer (`tiles`), written
            // to y once at the end — y's rows are often a power of two apart, which maps a
            // tile's 32 rows onto one L1 set.
            let mut r = r0;
            while r < r1 {
                let rows = (r1 - r).min(OP_MR);
                let mut kb = 0;
                while kb < j.k {
                    let klen = OP_KC.min(j.k - kb);
                    for q in 0..rows {
                        let dst = &mut packed[q * OP_KC..q * OP_KC + klen];
                        // SAFETY: row r + q < n; kb + klen <= k.
                        unsafe { Avx512::widen(w, (r + q) * j.k + kb, dst) };
                    }
                    // Fetch what the next block widens (the same rows further on, or the next
                    // rows' start) into L2 while this one computes: these rows come from
                    // memory once, in short runs the hardware prefetcher does not follow.
                    let (nr, nk) = if kb + klen < j.k {
                        (r, kb + klen)
                    } else {
                        (r + rows, 0)
                    };
                    let nrows = (r1.saturating_sub(nr)).min(OP_MR);
                    let nlen = OP_KC.min(j.k - nk);
                    for q in 0..nrows {
                        let mut off = 0;
                        while off < nlen {
                            // Prefetches never fault (a safe intrinsic inside this function).
                            _mm_prefetch::<_MM_HINT_T1>(w.addr((nr + q) * j.k + nk + off));
                            off += 64 / W::BYTES;
                        }
                    }
                    for p in 0..panels {
                        let (xp, tile) = (
                            // SAFETY: block kb / OP_KC, panel p of `pack_x`'s layout.
                            unsafe { j.xp.add((kb / OP_KC * panels + p) * OP_KC * OP_NR) },
                            // SAFETY: tile p of `panels` tiles of 12 x 32.
                            unsafe { tiles.as_mut_ptr().add(p * OP_MR * OP_NR) },
                        );
                        // SAFETY: the panel holds klen x 32 floats, `packed` 12 rows of
                        // OP_KC, the tile 12 x 32. A last panel of at most 16 rows runs the
                        // half-width kernel (the rest would be padding).
                        unsafe {
                            if j.m - p * OP_NR <= OP_NR / 2 {
                                micro12x16(packed.as_ptr(), xp, klen, tile, kb > 0)
                            } else {
                                micro12x32(packed.as_ptr(), xp, klen, tile, kb > 0)
                            }
                        };
                    }
                    kb += klen;
                }
                for p in 0..panels {
                    let lanes = (j.m - p * OP_NR).min(OP_NR);
                    let tile = &tiles[p * OP_MR * OP_NR..(p + 1) * OP_MR * OP_NR];
                    for l in 0..lanes {
                        // SAFETY: y row p*32 + l < m has columns r..r + rows < n.
                        let yr = unsafe { j.y.add((p * OP_NR + l) * j.n + r) };
                        for q in 0..rows {
                            // SAFETY: as above.
                            unsafe { *yr.add(q) = tile[q * OP_NR + l] };
                        }
                    }
                }
                r += rows;
            }
        });
    }

    /// As `micro12x32` for the first 16 input rows of the panel only.
    ///
    /// # Safety
    /// As `micro12x32`.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro12x16(wp: *const f32, xp: *const f32, klen: usize, tile: *mut f32, add: bool) {
        // SAFETY (whole body): see the function's contract.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); OP_MR];
            for kk in 0..klen {
                let b = _mm512_loadu_ps(xp.add(kk * OP_NR));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(q * OP_KC + kk)), b, *a);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                let t = tile.add(q * OP_NR);
                let v = if add {
                    _mm512_add_ps(_mm512_loadu_ps(t), *a)
                } else {
                    *a
                };
                _mm512_storeu_ps(t, v);
            }
        }
    }

    /// `tile[q, l] (+)= Σ_kk xp[kk, l] · wp[q, kk]` for 12 weight rows and 32 input rows.
    ///
    /// # Safety
    /// `wp` holds 12 rows of stride `OP_KC`, `xp` `klen` x 32 floats, `tile` 12 x 32.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro12x32(wp: *const f32, xp: *const f32, klen: usize, tile: *mut f32, add: bool) {
        // SAFETY (whole body): see the function's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; OP_MR];
            for kk in 0..klen {
                let b0 = _mm512_loadu_ps(xp.add(kk * OP_NR));
                let b1 = _mm512_loadu_ps(xp.add(kk * OP_NR + 16));
                for (q, a) in acc.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*wp.add(q * OP_KC + kk));
                    a[0] = _mm512_fmadd_ps(v, b0, a[0]);
                    a[1] = _mm512_fmadd_ps(v, b1, a[1]);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                let t = tile.add(q * OP_NR);
                if add {
                    _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), a[0]));
                    _mm512_storeu_ps(t.add(16), _mm512_add_ps(_mm512_loadu_ps(t.add(16)), a[1]));
                } else {
                    _mm512_storeu_ps(t, a[0]);
                    _mm512_storeu_ps(t.add(16), a[1]);
                }
            }
        }
    }

    /// # Safety
    /// As `rows_avx512`, with AVX2 and FMA.
    pub(super) unsafe fn rows_avx2<W: WFmt>(j: Raw, w: W, r0: usize, r1: usize) {
        // SAFETY: forwarded.
        unsafe { rows::<Avx2, W>(j, w, r0, r1) }
    }

    /// Small batches stream whole weight rows (long sequential reads, bandwidth-bound).
    /// Larger ones are blocked over k: a block of weight rows is widened into a per-thread
    /// f32 buffer, and every input tile passes over it while it stays in L1.
    unsafe fn rows<S: Simd, W: WFmt>(j: Raw, w: W, r0: usize, r1: usize) {
        // Streaming re-reads each input tile from L2 per weight quad: fine for short rows.
        if j.m <= super::stream_max_rows() || (j.m <= 64 && j.k <= 1024) {
            if super::bf16_pairs()
                && j.m <= S::PAIR_MAX_ROWS
                && j.k >= 2 * S::LANES
                && let Some(p) = w.bf16()
            {
                // SAFETY: forwarded caller guarantees.
                unsafe { stream_bf16_pairs::<S>(j, p, r0, r1) };
                return;
            }
            // SAFETY: forwarded caller guarantees.
            unsafe { stream_rows::<S, W>(j, w, r0, r1) };
            return;
        }
        let (kc, wb) = super::tuning();
        let kc = kc.next_multiple_of(Q8_BLOCK);
        PACKED.with_borrow_mut(|packed| {
            packed.resize(kc * wb, 0.0);
            let mut kb = 0;
            while kb < j.k {
                let klen = kc.min(j.k - kb);
                let mut b = r0;
                while b < r1 {
                    let be = (b + wb).min(r1);
                    // Copy the block contiguously (and widened): weight rows are a
                    // power-of-two stride apart in most models, which maps them onto a few
                    // L1 sets and thrashes.
                    for r in b..be {
                        let dst = &mut packed[(r - b) * klen..(r - b + 1) * klen];
                        // SAFETY: r < n and kb + klen <= k.
                        unsafe { S::widen(w, r * j.k + kb, dst) };
                    }
                    // While computing on this block, fetch the next one into L2 a slice per
                    // input tile, so packing it does not wait on memory.
                    let (nb, nbe) = (be, (be + wb).min(r1));
                    let lines_per_row = (klen * W::BYTES).div_ceil(64);
                    let next_lines = (nbe - nb) * lines_per_row;
                    let tiles = j.m.div_ceil(S::X_TILE);
                    let mut i = 0;
                    while i < j.m {
                        let mx = (j.m - i).min(S::X_TILE);
                        let g = i / S::X_TILE;
                        for line in next_lines * g / tiles..next_lines * (g + 1) / tiles {
                            let (row, off) = (
                                nb + line / lines_per_row,
                                (line % lines_per_row) * 64 / W::BYTES,
                            );
                            // SAFETY: prefetches never fault.
                            unsafe { _mm_prefetch::<_MM_HINT_T1>(w.addr(row * j.k + kb + off)) };
                        }
                        let mut r = b;
                        while r < be {
                            let rows = (be - r).min(4);
                            // SAFETY: i + mx <= m, r + rows <= n, kb + klen <= k; see `Raw`.
                            unsafe {
                                let t = Tile {
                                    x: j.x.add(i * j.k + kb),
                                    ldx: j.k,
                                    w: F32W(packed.as_ptr()),
                                    w0: (r - b) * klen,
                                    ldw: klen,
                                    klen,
                                    rows,
                                    y: j.y.add(i * j.n + r),
                                    ldy: j.n,
                                    add: kb > 0,
                                };
                                S::tile(mx, t, false);
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

    thread_local! {
        /// The input rows with each block of 32 split into its even and odd elements.
        static PAIRED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Few input rows over bf16 weights, four weight rows at a time, a vector of pairs per
    /// step (32 weights with AVX-512, 16 with AVX2): a pair's even weight is the pair shifted
    /// left 16 bits, its odd weight the pair with the low half cleared, against each input
    /// row's even and odd elements (split once per call) — no widening shuffle per weight.
    /// Input rows go in tiles over each group of weight rows while it is in L1.
    ///
    /// # Safety
    /// `j` is valid, `w` its bf16 weights, rows `r0..r1` inside `0..n`, `j.k >= 2 * LANES`;
    /// the CPU has S's instruction set.
    unsafe fn stream_bf16_pairs<S: Simd>(j: Raw, w: *const u16, r0: usize, r1: usize) {
        let (m, k) = (j.m, j.k);
        let block = 2 * S::LANES;
        let kv = k / block * block;
        // SAFETY: x holds m rows of k floats.
        let x = unsafe { std::slice::from_raw_parts(j.x, m * k) };
        PAIRED_X.with_borrow_mut(|xp| {
            xp.clear();
            xp.reserve(m * kv);
            for row in x.chunks_exact(k) {
                for b in row[..kv].chunks_exact(block) {
                    xp.extend(b.iter().step_by(2));
                    xp.extend(b.iter().skip(1).step_by(2));
                }
            }
            let tile_rows = m.div_ceil(m.div_ceil(S::PAIR_ROWS));
            let mut r = r0;
            while r < r1 {
                let rows = (r1 - r).min(4);
                let wp: [usize; 4] =
                    std::array::from_fn(|q| if q < rows { (r + q) * k } else { r * k });
                let mut i = 0;
                while i < m {
                    let mx = (m - i).min(tile_rows);
                    let t = PairTile {
                        j: &j,
                        w,
                        wp,
                        rows,
                        r,
                        xp: &xp[i * kv..],
                        i,
                        kv,
                    };
                    // SAFETY: as this function's; i + mx <= m, mx <= PAIR_ROWS.
                    unsafe { S::pair_tile(mx, t, i == 0) };
                    i += mx;
                }
                r += rows;
            }
        });
    }

    /// One tile of [`stream_bf16_pairs`]: input rows `i..i + MX` against four weight rows.
    struct PairTile<'a> {
        j: &'a Raw,
        w: *const u16,
        /// Offsets of the four weight rows (missing rows alias the first; results dropped).
        wp: [usize; 4],
        rows: usize,
        /// The first weight row (output column).
        r: usize,
        /// The tile's input rows split in even and odd, `kv` floats each.
        xp: &'a [f32],
        i: usize,
        kv: usize,
    }

    impl PairTile<'_> {
        /// Adds the tail columns `kv..k` to input row `i`'s four sums and stores them.
        ///
        /// # Safety
        /// As [`stream_bf16_pairs`]; `i` is a row of this tile.
        unsafe fn finish(&self, i: usize, mut s: [f32; 4]) {
            let (j, k) = (self.j, self.j.k);
            let row = self.i + i;
            // SAFETY: forwarded; row < m, r + rows <= n.
            unsafe {
                let x = j.x.add(row * k);
                for c in self.kv..k {
                    for (q, v) in s.iter_mut().enumerate() {
                        *v += from_bf16(*self.w.add(self.wp[q] + c)) * *x.add(c);
                    }
                }
                for (q, v) in s.iter().take(self.rows).enumerate() {
                    *j.y.add(row * j.n + self.r + q) = *v;
                }
            }
        }
    }

    /// # Safety
    /// As [`stream_bf16_pairs`]; `t.xp` holds MX rows of `t.kv` floats.
    #[target_feature(enable = "avx512f")]
    unsafe fn pair_tile512<const MX: usize, const PREFETCH: bool>(t: PairTile<'_>) {
        let (w, wp, kv) = (t.w, t.wp, t.kv);
        let ahead = super::prefetch_bytes(Bf16W::PREFETCH_BYTES) / 2;
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // SAFETY (block): the four rows hold k weights from wp[q]; xp holds MX rows of kv.
        // Prefetches never fault.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; MX];
            let mut c = 0;
            while c < kv {
                if PREFETCH {
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(w.add(p + c + ahead) as *const i8);
                    }
                }
                let x = |i: usize, h: usize| _mm512_loadu_ps(t.xp.as_ptr().add(i * kv + c + h));
                let xe: [__m512; MX] = std::array::from_fn(|i| x(i, 0));
                let xo: [__m512; MX] = std::array::from_fn(|i| x(i, 16));
                for q in 0..4 {
                    let v = _mm512_loadu_si512(w.add(wp[q] + c) as *const __m512i);
                    let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                    let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                    for i in 0..MX {
                        acc[i][q] = _mm512_fmadd_ps(even, xe[i], acc[i][q]);
                        acc[i][q] = _mm512_fmadd_ps(odd, xo[i], acc[i][q]);
                    }
                }
                c += 32;
            }
            for (i, a) in acc.iter().enumerate() {
                t.finish(i, reduce4_512(*a));
            }
        }
    }

    /// The AVX2 tile of [`stream_bf16_pairs`]: 16 weights per load, up to 2 input rows.
    ///
    /// # Safety
    /// As [`pair_tile512`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pair_tile256<const MX: usize, const PREFETCH: bool>(t: PairTile<'_>) {
        let (w, wp, kv) = (t.w, t.wp, t.kv);
        let ahead = super::prefetch_bytes(Bf16W::PREFETCH_BYTES) / 2;
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        // SAFETY (block): as in `pair_tile512`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 4]; MX];
            let mut c = 0;
            while c < kv {
                if PREFETCH && c % 32 == 0 {
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(w.add(p + c + ahead) as *const i8);
                    }
                }
                let x = |i: usize, h: usize| _mm256_loadu_ps(t.xp.as_ptr().add(i * kv + c + h));
                let xe: [__m256; MX] = std::array::from_fn(|i| x(i, 0));
                let xo: [__m256; MX] = std::array::from_fn(|i| x(i, 8));
                for q in 0..4 {
                    let v = _mm256_loadu_si256(w.add(wp[q] + c) as *const __m256i);
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                    for i in 0..MX {
                        acc[i][q] = _mm256_fmadd_ps(even, xe[i], acc[i][q]);
                        acc[i][q] = _mm256_fmadd_ps(odd, xo[i], acc[i][q]);
                    }
                }
                c += 16;
            }
            for (i, a) in acc.iter().enumerate() {
                t.finish(i, reduce4_256(*a));
            }
        }
    }

    /// Few input rows: stream whole weight rows in place, four at a time; every input tile
    /// passes over the four rows while they are in L1, so each weight byte comes from memory
    /// once.
    unsafe fn stream_rows<S: Simd, W: WFmt>(j: Raw, w: W, r0: usize, r1: usize) {
        let mut r = r0;
        while r < r1 {
            let rows = (r1 - r).min(4);
            // Even input tiles (8 rows: 4 + 4, not 6 + 2).
            let tile_rows = j.m.div_ceil(j.m.div_ceil(S::X_TILE));
            let mut i = 0;
            while i < j.m {
                let mx = (j.m - i).min(tile_rows);
                // SAFETY: i + mx <= m, r + rows <= n; see `Raw`.
                unsafe {
                    let t = Tile {
                        x: j.x.add(i * j.k),
                        ldx: j.k,
                        w,
                        w0: r * j.k,
                        ldw: j.k,
                        klen: j.k,
                        rows,
                        y: j.y.add(i * j.n + r),
                        ldy: j.n,
                        add: false,
                    };
                    S::tile(mx, t, i == 0);
                }
                i += mx;
            }
            r += rows;
        }
    }

    /// Sums each of four vectors: returns [Σa0, Σa1, Σa2, Σa3].
    #[target_feature(enable = "avx512f")]
    fn reduce4_512(a: [__m512; 4]) -> [f32; 4] {
        let t0 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[0], a[1]),
            _mm512_unpackhi_ps(a[0], a[1]),
        );
        let t1 = _mm512_add_ps(
            _mm512_unpacklo_ps(a[2], a[3]),
            _mm512_unpackhi_ps(a[2], a[3]),
        );
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(t0, t1),
            _mm512_shuffle_ps::<0xEE>(t0, t1),
        );
        let lo = _mm512_castps512_ps256(u);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u)));
        let s = _mm256_add_ps(lo, hi);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let mut out = [0f32; 4];
        // SAFETY: `out` holds four floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    #[target_feature(enable = "avx2,fma")]
    fn reduce4_256(a: [__m256; 4]) -> [f32; 4] {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let u = _mm256_hadd_ps(t0, t1);
        let s = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u));
        let mut out = [0f32; 4];
        // SAFETY: `out` holds four floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// `y[i, q] (+)= x[i] · w[q]` over `klen` for MX input rows and up to 4 weight rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const MX: usize, const PREFETCH: bool, W: WFmt>(t: Tile<W>) {
        // The same distance in bytes for every format; one prefetch per cache line.
        let ahead = super::prefetch_bytes(W::PREFETCH_BYTES) / W::BYTES;
        let line = 64 / W::BYTES;
        let wp = t.rows4();
        let (x, ldx, w, klen) = (t.x, t.ldx, t.w, t.klen);
        // SAFETY (whole body): rows `0..MX` of x and the four weight rows hold klen values
        // from here; y has MX rows of stride ldy with `rows` valid columns.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; MX];
            let kv = klen / 16 * 16;
            let mut c = 0;
            while c < kv {
                if PREFETCH && c % line == 0 {
                    // Weight rows stream from memory once: fetch ahead of use so the loads
                    // below hit L1 (hardware prefetch alone falls behind with many streams).
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(w.addr(p + c + ahead));
                    }
                }
                let wv = [
                    w.v16(wp[0] + c),
                    w.v16(wp[1] + c),
                    w.v16(wp[2] + c),
                    w.v16(wp[3] + c),
                ];
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * ldx + c));
                    for q in 0..4 {
                        a[q] = _mm512_fmadd_ps(wv[q], xv, a[q]);
                    }
                }
                c += 16;
            }
            for (i, a) in acc.iter().enumerate() {
                let mut s = reduce4_512(*a);
                for c in kv..klen {
                    let xv = *x.add(i * ldx + c);
                    for q in 0..4 {
                        s[q] += w.one(wp[q] + c) * xv;
                    }
                }
                t.put(i, s);
            }
        }
    }

    /// The AVX2 tile: as `tile512`, 8 lanes and up to 3 input rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const MX: usize, const PREFETCH: bool, W: WFmt>(t: Tile<W>) {
        let ahead = super::prefetch_bytes(W::PREFETCH_BYTES) / W::BYTES;
        let line = 64 / W::BYTES;
        let wp = t.rows4();
        let (x, ldx, w, klen) = (t.x, t.ldx, t.w, t.klen);
        // SAFETY (whole body): as in `tile512`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 4]; MX];
            let kv = klen / 8 * 8;
            let mut c = 0;
            while c < kv {
                if PREFETCH && c % line == 0 {
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(w.addr(p + c + ahead));
                    }
                }
                let mut xv = [_mm256_setzero_ps(); MX];
                for (i, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(x.add(i * ldx + c));
                }
                for q in 0..4 {
                    let wv = w.v8(wp[q] + c);
                    for i in 0..MX {
                        acc[i][q] = _mm256_fmadd_ps(wv, xv[i], acc[i][q]);
                    }
                }
                c += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                let mut s = reduce4_256(*a);
                for c in kv..klen {
                    let xv = *x.add(i * ldx + c);
                    for q in 0..4 {
                        s[q] += w.one(wp[q] + c) * xv;
                    }
                }
                t.put(i, s);
            }
        }
    }

    /// Independent FMA chains of the peak loops (enough to cover the FMA latency on two ports).
    pub(super) const FMA_CHAINS: usize = 12;

    #[target_feature(enable = "avx512f")]
    pub(super) fn fma_loop_512(n: usize) -> f32 {
        // Opaque operands, or the compiler folds the chains away.
        let (a, b) = std::hint::black_box((_mm512_set1_ps(0.999), _mm512_set1_ps(0.001)));
        let mut acc = std::hint::black_box([_mm512_set1_ps(0.5); FMA_CHAINS]);
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma_loop_256(n: usize) -> f32 {
        let (a, b) = std::hint::black_box((_mm256_set1_ps(0.999), _mm256_set1_ps(0.001)));
        let mut acc = std::hint::black_box([_mm256_set1_ps(0.5); FMA_CHAINS]);
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        hsum256(s)
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
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

    /// The matrix in each format, with its widened (dequantised) f32 values.
    struct Formats {
        f32: Vec<f32>,
        bf16: Vec<u16>,
        bf16_wide: Vec<f32>,
        q: Vec<i8>,
        d: Vec<f32>,
        q8_wide: Vec<f32>,
    }

    fn formats(w: Vec<f32>, n: usize, k: usize) -> Formats {
        let bf16: Vec<u16> = w.iter().map(|&v| to_bf16(v)).collect();
        let bf16_wide = bf16.iter().map(|&b| from_bf16(b)).collect();
        let (q, d, q8_wide) = if k.is_multiple_of(Q8_BLOCK) {
            let (q, d) = quantize_q8(|i| w[i], n, k);
            let wide = (0..n * k).map(|i| q[i] as f32 * d[i / Q8_BLOCK]).collect();
            (q, d, wide)
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        Formats {
            f32: w,
            bf16,
            bf16_wide,
            q,
            d,
            q8_wide,
        }
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        // Relative to the row's scale: sums of ±1 products cancel, so compare against the
        // magnitude of the terms, not of the (possibly tiny) result.
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}: {a} vs {b}"
            );
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 33),
        (1, 9, 192),
        (3, 130, 100),
        (5, 257, 512),
        (16, 64, 48),
        (40, 33, 17),
        (7, 70, 300),
        (13, 9, 1000),
        (1, 64, 64),
        (2, 37, 96),
        (9, 21, 256),
        (70, 19, 544),
        (33, 25, 300),
        (100, 40, 1100),
        (50, 2100, 300),
        (130, 2049, 70),
        (64, 2048, 64),
    ];

    /// Every format on every instruction set this CPU has, against the f64 product of the
    /// widened weights (the 8-bit kernel must equal dequantise-then-f32 within 1e-4).
    #[test]
    fn every_format_and_path_matches_the_widened_product() {
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| i.available())
            .collect();
        for &(m, n, k) in SHAPES {
            let x = data(m * k, 1);
            let f = formats(data(n * k, 2), n, k);
            let mut cases: Vec<(&str, Mat<'_>, &[f32])> = vec![
                ("f32", Mat::F32(&f.f32), &f.f32),
                ("bf16", Mat::Bf16(&f.bf16), &f.bf16_wide),
            ];
            if k % Q8_BLOCK == 0 {
                cases.push(("q8", Mat::Q8 { q: &f.q, d: &f.d }, &f.q8_wide));
            }
            for (name, mat, wide) in cases {
                let want = naive(&x, wide, m, n, k);
                let mut y = vec![0f32; m * n];
                matmul(&x, mat, &mut y, m, n, k);
                close(&y, &want, &format!("{name} {m}x{n}x{k} default"));
                for &isa in &isas {
                    let mut y = vec![f32::NAN; m * n];
                    let mut job = MatMul::new(&x, mat, &mut y, m, n, k);
                    // SAFETY: extents checked by MatMul::new; `isa` is available.
                    unsafe { rows_with(isa, Raw::of(&mut job), 0, n) };
                    close(&y, &want, &format!("{name} {m}x{n}x{k} {}", isa.name()));
                }
            }
        }
    }

    #[test]
    fn many_jobs_in_one_region_match_separate_calls() {
        let (k, m) = (96, 2);
        let x = data(m * k, 3);
        let (w1, w2) = (data(300 * k, 4), data(45 * k, 5));
        let f2 = formats(w2.clone(), 45, k);
        let (mut y1, mut y2, mut y3) =
            (vec![0f32; m * 300], vec![0f32; m * 45], vec![0f32; m * 45]);
        matmul_many(&mut [
            MatMul::new(&x, Mat::F32(&w1), &mut y1, m, 300, k),
            MatMul::new(&x, Mat::F32(&w2), &mut y2, m, 45, k),
            MatMul::new(&x, Mat::Q8 { q: &f2.q, d: &f2.d }, &mut y3, m, 45, k),
        ]);
        assert_eq!(y1, {
            let mut y = vec![0f32; m * 300];
            matmul(&x, Mat::F32(&w1), &mut y, m, 300, k);
            y
        });
        close(&y2, &naive(&x, &w2, m, 45, k), "f32");
        close(&y3, &naive(&x, &f2.q8_wide, m, 45, k), "q8");
    }

    #[test]
    fn quantisation_is_within_half_a_step_and_keeps_zero_blocks() {
        let (n, k) = (3, 64);
        let mut w = data(n * k, 9);
        w[32..64].fill(0.0);
        let (q, d) = quantize_q8(|i| w[i], n, k);
        assert_eq!(d[1], 0.0);
        for i in 0..n * k {
            let step = d[i / Q8_BLOCK];
            assert!(
                (q[i] as f32 * step - w[i]).abs() <= 0.5 * step + 1e-7,
                "weight {i}"
            );
        }
        assert_eq!(from_bf16(to_bf16(1.5)), 1.5);
        assert_eq!(
            to_bf16(1.0 + 1.0 / 512.0),
            to_bf16(1.0),
            "ties round to even"
        );
    }

    #[test]
    fn dot_matches_portable() {
        let (a, b) = (data(77, 6), data(77, 7));
        assert!((dot(&a, &b) - dot_portable(&a, &b)).abs() < 1e-4);
    }
}
