//! Kernel microbenchmark: `cargo run --release -p moe-worker --example matmul_bench -- M N K THREADS`.
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if args.len() != 4 {
        eprintln!("usage: matmul_bench M N K THREADS");
        std::process::exit(2);
    }
    let (m, n, k, threads) = (args[0], args[1], args[2], args[3]);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut y = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        moe_worker::kernels::matmul(&x, &w, &mut y, m, n, k);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "m={m} n={n} k={k} t={threads}: {:.1} GFMA/s, {:.1} GB/s of weights",
        (m * n * k) as f64 / best / 1e9,
        (n * k * 4) as f64 / best / 1e9
    );
}
