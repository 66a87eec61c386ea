//! GFLOP/s of `ferrograd_runtime::gemm::sgemm` on the shapes of ferrograd's
//! examples: `cargo run --release --example gemm_shapes` (set
//! `RAYON_NUM_THREADS=1` for one thread). The crate comparison behind the
//! choice of GEMM is in `bench/`; see README.md.

use std::time::Instant;

use ferrograd_runtime::gemm::sgemm;

fn main() {
    // (label, M, K, N, A stored transposed, B stored transposed)
    let shapes = [
        ("32x784x256", 32, 784, 256, false, false),
        ("128x784x256", 128, 784, 256, false, false),
        ("1024x784x256", 1024, 784, 256, false, false),
        ("128x256x256", 128, 256, 256, false, false),
        ("128x256x10", 128, 256, 10, false, false),
        ("A^T.B 784x128x256", 784, 128, 256, true, false),
        ("A.B^T 128x256x784", 128, 256, 784, false, true),
        ("A.B^T 128x10x256", 128, 10, 256, false, true),
    ];
    println!("threads: {}", rayon::current_num_threads());
    for (name, m, k, n, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let sa = if ta { (1, m as isize) } else { (k as isize, 1) };
        let sb = if tb { (1, k as isize) } else { (n as isize, 1) };
        let mut run = || sgemm(m, n, k, &a, sa, &b, sb, &mut c, (n as isize, 1), false).unwrap();
        run();
        let mut iters = 1;
        while {
            let t = Instant::now();
            (0..iters).for_each(|_| run());
            t.elapsed().as_secs_f64() < 0.01
        } {
            iters *= 2;
        }
        let best = (0..30)
            .map(|_| {
                let t = Instant::now();
                (0..iters).for_each(|_| run());
                t.elapsed().as_secs_f64() / iters as f64
            })
            .fold(f64::INFINITY, f64::min);
        let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
        println!("{name:<20} {gflops:>7.1} GFLOP/s  {:>8.1} us", best * 1e6);
    }
}
