//! Kernel microbenchmark:
//! `cargo run --release -p moe-worker --example matmul_bench -- M N K THREADS [f32|bf16|q8]`.
use std::time::Instant;

use moe_worker::kernels::{self, Mat};

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let format = raw
        .iter()
        .find(|a| a.parse::<usize>().is_err())
        .map_or("f32", String::as_str);
    if args.len() != 4 || !["f32", "bf16", "q8"].contains(&format) {
        eprintln!("usage: matmul_bench M N K THREADS [f32|bf16|q8]");
        std::process::exit(2);
    }
    let (m, n, k, threads) = (args[0], args[1], args[2], args[3]);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let bf16: Vec<u16> = w.iter().map(|&v| kernels::to_bf16(v)).collect();
    let (q, d) = if k % kernels::Q8_BLOCK == 0 {
        kernels::quantize_q8(|i| w[i], n, k)
    } else {
        (Vec::new(), Vec::new())
    };
    let mat = match format {
        "bf16" => Mat::Bf16(&bf16),
        "q8" if !q.is_empty() => Mat::Q8 { q: &q, d: &d },
        "q8" => {
            eprintln!("q8 needs K to be a multiple of {}", kernels::Q8_BLOCK);
            std::process::exit(2);
        }
        _ => Mat::F32(&w),
    };
    let mut y = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        kernels::matmul(&x, mat, &mut y, m, n, k);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "m={m} n={n} k={k} t={threads} {format} ({}): {:.1} GFMA/s, {:.1} GB/s of weights",
        kernels::isa().name(),
        (m * n * k) as f64 / best / 1e9,
        (n * k) as f64 * mat.bytes_per_weight() / best / 1e9
    );
}
