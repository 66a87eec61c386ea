//! Threads: the global rayon pool, and the grain generated kernels split work by.
//!
//! There is one pool per process: rayon's global pool, sized by
//! `RAYON_NUM_THREADS` or else the number of CPUs. GEMM, conv and gather split
//! their work over it, and generated elementwise / reduction kernels do the
//! same with [`PAR_CHUNK`]:
//!
//! ```
//! use ferrograd_runtime::threads::PAR_CHUNK;
//! use rayon::prelude::*;
//!
//! fn relu(x: &[f32], out: &mut [f32]) {
//!     if out.len() <= PAR_CHUNK {
//!         out.iter_mut().zip(x).for_each(|(o, &x)| *o = x.max(0.0));
//!     } else {
//!         out.par_chunks_mut(PAR_CHUNK)
//!             .zip(x.par_chunks(PAR_CHUNK))
//!             .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = x.max(0.0)));
//!     }
//! }
//! let x = vec![-1.0f32; 100_000];
//! let mut y = vec![1.0f32; 100_000];
//! relu(&x, &mut y);
//! assert!(y.iter().all(|&v| v == 0.0));
//! ```

pub use rayon;

/// Elements per rayon task in elementwise and reduction kernels: a loop over at
/// most this many elements runs serially on the calling thread, a longer one in
/// chunks of this size. 32K `f32` are 128 KiB — a few to a few tens of
/// microseconds of work, well above rayon's per-task cost (about a microsecond)
/// and small enough to balance over the cores.
pub const PAR_CHUNK: usize = 32 * 1024;

/// Build the global pool with workers that flush denormals (see [`crate::fpenv`]).
/// Call once when a module loads; a pool that already exists is kept as it is.
pub fn init() {
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| crate::fpenv::flush_denormals_forever())
        .build_global();
}

/// Runs `f` on a thread of the pool and waits for it. A step is a sequence of
/// short parallel loops: started from a thread outside the pool (Python's), each
/// loop hands its work to the pool and sleeps until it is done, about 4 µs per
/// loop on this class of machine even with one thread; started on a worker, its
/// tasks are queued locally and the loop costs a fraction of a microsecond. So an
/// entry point crosses into the pool once, here, instead of once per kernel.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The number of threads in the pool that kernels run on.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}
