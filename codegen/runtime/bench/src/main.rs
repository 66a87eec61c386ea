//! GFLOP/s of `gemm` and `matrixmultiply` on the shapes ferrograd's examples
//! use. Each figure is the best of 30 rounds of ~10 ms, interleaved between
//! the variants, which is robust to other processes on a shared machine.
//!
//! Columns: `gemm 1t` / `gemm rayon` (gemm's own Parallelism::None / Rayon),
//! `mm 1t` (matrixmultiply, one thread), `mm split` (matrixmultiply on row or
//! column blocks over rayon: what ferrograd_runtime::gemm::sgemm does above
//! its PAR_FLOPS threshold), `gemm split` (gemm, one thread per block, on the
//! same blocks).

use std::time::Instant;

/// Seconds per call: the best of 5 rounds of ~10 ms.
fn best_time(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut iters = 1usize;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        if t.elapsed().as_secs_f64() > 0.01 {
            break;
        }
        iters *= 2;
    }
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

/// GFLOP/s of each variant: rounds interleave the variants, so that a burst of
/// load from other processes does not favour one; best time over the rounds.
fn compare(flops: f64, variants: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; variants.len()];
    for _ in 0..6 {
        for (b, f) in best.iter_mut().zip(variants.iter_mut()) {
            *b = b.min(best_time(*f));
        }
    }
    best.iter().map(|t| flops / t / 1e9).collect()
}

#[derive(Clone, Copy)]
struct P(*const f32);
#[derive(Clone, Copy)]
struct Pm(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}
unsafe impl Send for Pm {}
unsafe impl Sync for Pm {}
impl P {
    fn get(self) -> *const f32 {
        self.0
    }
}
impl Pm {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// matrixmultiply over `parts` row (or column) blocks on rayon, as the runtime does.
#[allow(clippy::too_many_arguments)]
unsafe fn mm_split(m: usize, k: usize, n: usize, a: P, ars: isize, acs: isize, b: P, brs: isize,
                   bcs: isize, c: Pm, crs: isize, ccs: isize, parts: usize) {
    use rayon::prelude::*;
    let rows = m >= n;
    let len = if rows { m } else { n };
    let block = len.div_ceil(parts).next_multiple_of(16);
    (0..len.div_ceil(block)).into_par_iter().for_each(|i| {
        let s = i * block;
        let size = block.min(len - s);
        let so = s as isize;
        unsafe {
            if rows {
                matrixmultiply::sgemm(size, k, n, 1.0, a.get().offset(so * ars), ars, acs, b.get(),
                                      brs, bcs, 0.0, c.get().offset(so * crs), crs, ccs);
            } else {
                matrixmultiply::sgemm(m, k, size, 1.0, a.get(), ars, acs, b.get().offset(so * bcs),
                                      brs, bcs, 0.0, c.get().offset(so * ccs), crs, ccs);
            }
        }
    });
}

/// gemm (one thread per block) over the same blocks as `mm_split`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_split(m: usize, k: usize, n: usize, a: P, ars: isize, acs: isize, b: P, brs: isize,
                     bcs: isize, c: Pm, crs: isize, ccs: isize, parts: usize) {
    use rayon::prelude::*;
    let rows = m >= n;
    let len = if rows { m } else { n };
    let block = len.div_ceil(parts).next_multiple_of(16);
    let none = gemm::Parallelism::None;
    (0..len.div_ceil(block)).into_par_iter().for_each(|i| {
        let s = i * block;
        let size = block.min(len - s);
        let so = s as isize;
        unsafe {
            if rows {
                gemm::gemm(size, n, k, c.get().offset(so * crs), ccs, crs, false,
                           a.get().offset(so * ars), acs, ars, b.get(), bcs, brs, 0.0, 1.0,
                           false, false, false, none);
            } else {
                gemm::gemm(m, size, k, c.get().offset(so * ccs), ccs, crs, false, a.get(), acs,
                           ars, b.get().offset(so * bcs), bcs, brs, 0.0, 1.0, false, false, false,
                           none);
            }
        }
    });
}

fn main() {
    // (label, M, K, N, A transposed in memory, B transposed in memory)
    let shapes: &[(&str, usize, usize, usize, bool, bool)] = &[
        ("32x784x256", 32, 784, 256, false, false),
        ("128x784x256", 128, 784, 256, false, false),
        ("1024x784x256", 1024, 784, 256, false, false),
        ("128x256x256", 128, 256, 256, false, false),
        ("128x256x10", 128, 256, 10, false, false),
        ("A^T.B 784x128x256", 784, 128, 256, true, false),
        ("A.B^T 128x256x784", 128, 256, 784, false, true),
        ("A.B^T 128x10x256", 128, 10, 256, false, true),
        // Around the runtime's PAR_FLOPS threshold (2^22 = 4.2 MFLOP).
        ("32x256x128 (2.1M)", 32, 256, 128, false, false),
        ("64x256x128 (4.2M)", 64, 256, 128, false, false),
        ("64x512x128 (8.4M)", 64, 512, 128, false, false),
    ];
    let threads = rayon::current_num_threads();
    let mm_threading = cfg!(feature = "mm-threading");
    println!("rayon threads: {threads}; AVX-512 kernels: {}; matrixmultiply threading: \
              {mm_threading}", cfg!(feature = "avx512"));
    println!("{:<20} {:>8} {:>10} {:>8} {:>8} {:>10}", "M x K x N", "gemm 1t", "gemm rayon",
             if mm_threading { "mm thr" } else { "mm 1t" }, "mm split", "gemm split");
    for &(name, m, k, n, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        // A (m×k) stored k×m when transposed; B (k×n) stored n×k when transposed.
        let (ars, acs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (brs, bcs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let flops = 2.0 * (m * n * k) as f64;
        let (ap, bp, cp) = (P(a.as_ptr()), P(b.as_ptr()), Pm(c.as_mut_ptr()));
        let par = gemm::Parallelism::Rayon(threads);
        let r = compare(flops, &mut [
            &mut || unsafe {
                gemm::gemm(m, n, k, cp.get(), 1, n as isize, false, ap.get(), acs, ars, bp.get(),
                           bcs, brs, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
            },
            &mut || unsafe {
                gemm::gemm(m, n, k, cp.get(), 1, n as isize, false, ap.get(), acs, ars, bp.get(),
                           bcs, brs, 0.0, 1.0, false, false, false, par)
            },
            &mut || unsafe {
                matrixmultiply::sgemm(m, k, n, 1.0, ap.get(), ars, acs, bp.get(), brs, bcs, 0.0,
                                      cp.get(), n as isize, 1)
            },
            &mut || unsafe {
                mm_split(m, k, n, ap, ars, acs, bp, brs, bcs, cp, n as isize, 1, threads)
            },
            &mut || unsafe {
                gemm_split(m, k, n, ap, ars, acs, bp, brs, bcs, cp, n as isize, 1, threads)
            },
        ]);
        let (g1, gr, mm1, mms, gs) = (r[0], r[1], r[2], r[3], r[4]);
        println!("{name:<20} {g1:>8.1} {gr:>10.1} {mm1:>8.1} {mms:>8.1} {gs:>10.1}");
        std::hint::black_box(&c);
    }
}
