//! Single-precision matrix products over strided operands.
//!
//! Every operand is a slice plus strides in elements: `(row, col)` for a matrix,
//! `(batch, row, col)` for a batch of matrices. Element `(i, j)` of a matrix
//! with strides `(rs, cs)` is `slice[i * rs + j * cs]`, so a transposed operand
//! is the same slice with its strides swapped, and a batch stride of 0
//! broadcasts one matrix over the batch. Strides must be non-negative, the
//! slice must hold every element the strides reach, and the output's elements
//! must not overlap; anything else is an [`Error::Layout`], never a panic.
//!
//! The micro-kernels are those of the `gemm` crate (AVX-512, AVX2+FMA or
//! scalar, chosen at run time; see README.md for why this crate). Products below [`PAR_FLOPS`] run on
//! the calling thread; larger ones are split into row (or column) blocks of the
//! output over the rayon pool, which is the same pool the generated kernels use,
//! so nothing is oversubscribed.

use rayon::prelude::*;

use crate::error::Error;

/// `(row stride, column stride)` of a matrix, in elements.
pub type Strides = (isize, isize);

/// `(batch stride, row stride, column stride)` of a batch of matrices, in elements.
pub type BatchStrides = (isize, isize, isize);

/// Products with fewer floating-point operations (`2 * m * n * k`) than this run
/// on one thread: below it, waking a second thread costs more than it saves.
/// Measured on a 2-core machine; see README.md.
pub const PAR_FLOPS: usize = 1 << 22;

/// Split blocks along M or N are multiples of this (the widest micro-tile), so
/// that no thread ends on a ragged tile.
const BLOCK_ALIGN: usize = 16;

/// `C = A·B` (or `C += A·B` when `accumulate`) with `A` m×k, `B` k×n, `C` m×n.
///
/// When `accumulate` is false, `C` is only written, never read (stale or NaN
/// contents do not matter). `k == 0` gives `C = 0` (or leaves `C` unchanged).
///
/// ```
/// use ferrograd_runtime::gemm::sgemm;
/// let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2×3, row-major
/// let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3×2, row-major
/// let mut c = [0.0; 4];
/// sgemm(2, 2, 3, &a, (3, 1), &b, (2, 1), &mut c, (2, 1), false).unwrap();
/// assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
/// // Aᵀ·A (3×3) is A with swapped strides times A: no copy.
/// let mut ata = [0.0; 9];
/// sgemm(3, 3, 2, &a, (1, 3), &a, (3, 1), &mut ata, (3, 1), false).unwrap();
/// assert_eq!(ata[0], 1.0 * 1.0 + 4.0 * 4.0);
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: Strides,
    b: &[f32],
    b_strides: Strides,
    c: &mut [f32],
    c_strides: Strides,
    accumulate: bool,
) -> Result<(), Error> {
    let (ar, ac) = a_strides;
    let (br, bc) = b_strides;
    let (cr, cc) = c_strides;
    if (n == 1 || m == 1) && m > 0 && n > 0 && k > 0 {
        // A matrix-vector product: run here, in the calling crate, which is
        // compiled for the module's instruction-set level (this crate is built
        // at the x86-64 baseline, and a 1000×8·8×1 product is all loop
        // overhead at SSE2 width).
        check_layout(
            1,
            (m, n, k),
            (a.len(), (0, ar, ac)),
            (b.len(), (0, br, bc)),
            (c.len(), (0, cr, cc)),
        )?;
        let g = Gemm {
            m,
            n,
            k,
            a: a.as_ptr(),
            ar,
            ac,
            b: b.as_ptr(),
            br,
            bc,
            c: c.as_mut_ptr(),
            cr,
            cc,
            accumulate,
        };
        // SAFETY: the spans and C's disjointness were checked just above.
        unsafe { g.run_vector() };
        return Ok(());
    }
    sgemm_batched(
        1,
        m,
        n,
        k,
        a,
        (0, ar, ac),
        b,
        (0, br, bc),
        c,
        (0, cr, cc),
        accumulate,
    )
}

/// `C[p] = A[p]·B[p]` (or `+=`) for `p` in `0..batch`; matrix `p` of an operand
/// starts at `p * batch_stride`. A batch stride of 0 broadcasts that operand
/// (not allowed for `C`, whose matrices must not overlap).
///
/// ```
/// use ferrograd_runtime::gemm::sgemm_batched;
/// // Two 1×2 rows times one shared 2×1 column (batch stride 0).
/// let a = [1.0, 2.0, 3.0, 4.0];
/// let b = [10.0, 1.0];
/// let mut c = [0.0; 2];
/// sgemm_batched(2, 1, 1, 2, &a, (2, 2, 1), &b, (0, 1, 1), &mut c, (1, 1, 1), false).unwrap();
/// assert_eq!(c, [12.0, 34.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sgemm_batched(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: BatchStrides,
    b: &[f32],
    b_strides: BatchStrides,
    c: &mut [f32],
    c_strides: BatchStrides,
    accumulate: bool,
) -> Result<(), Error> {
    let (ab, ar, ac) = a_strides;
    let (bb, br, bc) = b_strides;
    let (cb, cr, cc) = c_strides;
    check_layout(
        batch,
        (m, n, k),
        (a.len(), a_strides),
        (b.len(), b_strides),
        (c.len(), c_strides),
    )?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    // One operand shared by the batch and the other laid out batch after batch:
    // the batch is more rows (or columns) of one larger product, which the
    // micro-kernels run at a higher rate than many small ones (a linear layer on
    // [B, T, D] rows is one B·T-row product, not B products of T rows).
    let (batch, m, n, ab, bb, cb) =
        if batch > 1 && bb == 0 && ab == m as isize * ar && cb == m as isize * cr {
            (1, batch * m, n, 0, 0, 0)
        } else if batch > 1 && ab == 0 && bb == n as isize * bc && cb == n as isize * cc {
            (1, m, batch * n, 0, 0, 0)
        } else {
            (batch, m, n, ab, bb, cb)
        };
    // SAFETY: the spans were checked above, so every element a product's
    // pointers and strides reach lies inside its slice, and C's elements are
    // pairwise distinct (check_disjoint); folding the batch into rows or
    // columns reaches the same elements.
    unsafe {
        run_products(
            (1, [0; 3]),
            (batch, m, n, k),
            (a.as_ptr(), (ab, ar, ac)),
            (b.as_ptr(), (bb, br, bc)),
            (c.as_mut_ptr(), (cb, cr, cc)),
            accumulate,
        )
    };
    Ok(())
}

/// `C[o, p] = A[o, p]·B[o, p]` (or `+=`) for `o` in `0..outer`, `p` in
/// `0..batch`: two batch levels that no single stride describes, such as
/// attention's (sequence, head). Matrix `(o, p)` of an operand starts at
/// `o * outer_stride + p * batch_stride`. The `outer · batch` products share the
/// thread pool as one batch: 64 products of 64×64×32 are worth two threads
/// where 16 calls of 4 each are not.
///
/// ```
/// use ferrograd_runtime::gemm::sgemm_batched_outer;
/// // 2 × 2 products of 1×1·1×1: C[o, p] = A[o, p]·B[o] (B shared by the heads).
/// let a = [1.0, 2.0, 3.0, 4.0];
/// let b = [10.0, 100.0];
/// let mut c = [0.0; 4];
/// sgemm_batched_outer(2, [2, 1, 2], 2, 1, 1, 1, &a, (1, 1, 1), &b, (0, 1, 1), &mut c,
///                     (1, 1, 1), false).unwrap();
/// assert_eq!(c, [10.0, 20.0, 300.0, 400.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sgemm_batched_outer(
    outer: usize,
    [a_so, b_so, c_so]: [isize; 3],
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (ab, ar, ac): BatchStrides,
    b: &[f32],
    (bb, br, bc): BatchStrides,
    c: &mut [f32],
    (cb, cr, cc): BatchStrides,
    accumulate: bool,
) -> Result<(), Error> {
    check_span(
        "A",
        a.len(),
        &[(outer, a_so), (batch, ab), (m, ar), (k, ac)],
    )?;
    check_span(
        "B",
        b.len(),
        &[(outer, b_so), (batch, bb), (k, br), (n, bc)],
    )?;
    let c_dims = [(outer, c_so), (batch, cb), (m, cr), (n, cc)];
    check_span("C", c.len(), &c_dims)?;
    check_disjoint("C", &c_dims)?;
    // SAFETY: both levels' spans and C's disjointness were checked above.
    unsafe {
        run_products(
            (outer, [a_so, b_so, c_so]),
            (batch, m, n, k),
            (a.as_ptr(), (ab, ar, ac)),
            (b.as_ptr(), (bb, br, bc)),
            (c.as_mut_ptr(), (cb, cr, cc)),
            accumulate,
        )
    };
    Ok(())
}

/// Runs the `outer · batch` products, product `(o, p)` of an operand starting
/// `o * outer_stride + p * batch_stride` elements on: on the calling thread
/// when small (below [`PAR_FLOPS`] in all), one product per task when there are
/// enough, else each split over the pool.
///
/// # Safety
/// Every element a product's pointers and strides reach must lie inside its
/// operand, and no two products (nor two elements of one) may write the same
/// element of C.
unsafe fn run_products(
    (outer, [a_so, b_so, c_so]): (usize, [isize; 3]),
    (batch, m, n, k): (usize, usize, usize, usize),
    (a, (ab, ar, ac)): (*const f32, BatchStrides),
    (b, (bb, br, bc)): (*const f32, BatchStrides),
    (c, (cb, cr, cc)): (*mut f32, BatchStrides),
    accumulate: bool,
) {
    let items = outer.saturating_mul(batch);
    if items == 0 || m == 0 || n == 0 {
        return;
    }
    let flops = 2usize
        .saturating_mul(items)
        .saturating_mul(m)
        .saturating_mul(n)
        .saturating_mul(k);
    let (a, b, c) = (ConstPtr(a), ConstPtr(b), MutPtr(c));
    // Product `q` as raw parts (wrapping_offset: plain arithmetic, valid even
    // where a zero extent makes an operand empty).
    let item = move |q: usize| {
        let (o, p) = ((q / batch) as isize, (q % batch) as isize);
        Gemm {
            m,
            n,
            k,
            a: a.get().wrapping_offset(o * a_so + p * ab),
            ar,
            ac,
            b: b.get().wrapping_offset(o * b_so + p * bb),
            br,
            bc,
            c: c.get().wrapping_offset(o * c_so + p * cb),
            cr,
            cc,
            accumulate,
        }
    };
    let threads = rayon::current_num_threads();
    // SAFETY (all three): the caller's contract.
    if flops < PAR_FLOPS || threads == 1 {
        (0..items).for_each(|q| unsafe { item(q).run_serial() });
    } else if items >= threads {
        (0..items)
            .into_par_iter()
            .for_each(|q| unsafe { item(q).run_serial() });
    } else {
        (0..items).for_each(|q| unsafe { item(q).run_split(threads) });
    }
}

/// Rows per block when an `m×n` product with inner dimension `k` is split for a
/// fused epilogue: the generated kernel computes each block with [`sgemm`] and
/// applies its epilogue to the block's rows while they are in cache. One block
/// (all `m` rows) below [`PAR_FLOPS`] or on one thread; otherwise one block per
/// thread, a multiple of the widest micro-tile. Never 0.
///
/// ```
/// use ferrograd_runtime::gemm::block_rows;
/// assert_eq!(block_rows(4, 4, 4), 4); // tiny: one block
/// assert!(block_rows(1024, 1024, 1024) >= 1);
/// ```
pub fn block_rows(m: usize, n: usize, k: usize) -> usize {
    let flops = 2usize.saturating_mul(m).saturating_mul(n).saturating_mul(k);
    let threads = rayon::current_num_threads();
    if flops < PAR_FLOPS || threads == 1 {
        return m.max(1);
    }
    m.div_ceil(threads).next_multiple_of(BLOCK_ALIGN).max(1)
}

/// The widest row (or narrowest output) that [`rows_dot`] and
/// [`columns_axpy`] specialize for.
const SMALL: usize = 16;

/// Calls `$f::<N>(args)` with `N` the run-time `$n` in `1..=SMALL`.
macro_rules! by_size {
    ($n:expr, $f:ident, $($arg:expr),*) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            13 => $f::<13>($($arg),*),
            14 => $f::<14>($($arg),*),
            15 => $f::<15>($($arg),*),
            16 => $f::<16>($($arg),*),
            _ => unreachable!("by_size! takes 1..=SMALL"),
        }
    };
}

/// `c[i] (+)= a[i·K..][..K] · b` for rows of a compile-time length `K`:
/// the sum runs in index order, and LLVM unrolls it.
#[inline]
fn rows_dot<const K: usize>(a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    let b: &[f32; K] = b[..K].try_into().expect("b holds K elements");
    for (row, out) in a.chunks_exact(K).zip(c.iter_mut()) {
        let mut sum = 0.0f32;
        for p in 0..K {
            sum += row[p] * b[p];
        }
        *out = if accumulate { *out + sum } else { sum };
    }
}

/// `c[..M] (+)= Σ_p a[p·M..][..M] · b[p]` for a compile-time `M`: four
/// interleaved partial sums of `M` lanes each, so that the adds do not wait
/// on each other.
#[inline]
fn columns_axpy<const M: usize>(a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    let mut acc = [[0.0f32; M]; 4];
    let mut columns = a.chunks_exact(4 * M);
    let mut scales = b.chunks_exact(4);
    for (four, x) in (&mut columns).zip(&mut scales) {
        for (q, lanes) in acc.iter_mut().enumerate() {
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane += four[q * M + i] * x[q];
            }
        }
    }
    let mut sum = [0.0f32; M];
    for (i, s) in sum.iter_mut().enumerate() {
        *s = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
    }
    for (column, x) in columns.remainder().chunks_exact(M).zip(scales.remainder()) {
        for (s, v) in sum.iter_mut().zip(column) {
            *s += v * x;
        }
    }
    for (out, s) in c[..M].iter_mut().zip(sum) {
        *out = if accumulate { *out + s } else { s };
    }
}

/// `Σ a[p]·b[p]` in eight interleaved partial sums (a fixed order, so results
/// do not depend on the machine), which vectorizes without reassociation.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Checks a batch of products' operands, each given as (slice length,
/// strides): every element reached lies inside its slice, and C's elements
/// are pairwise distinct.
fn check_layout(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    (a_len, (ab, ar, ac)): (usize, BatchStrides),
    (b_len, (bb, br, bc)): (usize, BatchStrides),
    (c_len, (cb, cr, cc)): (usize, BatchStrides),
) -> Result<(), Error> {
    check_span("A", a_len, &[(batch, ab), (m, ar), (k, ac)])?;
    check_span("B", b_len, &[(batch, bb), (k, br), (n, bc)])?;
    check_span("C", c_len, &[(batch, cb), (m, cr), (n, cc)])?;
    check_disjoint("C", &[(batch, cb), (m, cr), (n, cc)])
}

/// Checks that a slice of `len` elements holds every element reached by the
/// given `(extent, stride)` dimensions, starting at offset 0.
pub(crate) fn check_span(what: &str, len: usize, dims: &[(usize, isize)]) -> Result<(), Error> {
    if dims.iter().any(|&(extent, _)| extent == 0) {
        return Ok(());
    }
    let mut last: usize = 0;
    for &(extent, stride) in dims {
        if extent > 1 && stride < 0 {
            return Err(Error::layout(format!(
                "{what}: negative stride {stride} (dimensions {dims:?})"
            )));
        }
        let reach = (extent - 1)
            .checked_mul(stride.unsigned_abs())
            .and_then(|r| r.checked_add(last));
        last = reach.ok_or_else(|| {
            Error::layout(format!("{what}: extents and strides {dims:?} overflow"))
        })?;
    }
    if last >= len {
        return Err(Error::layout(format!(
            "{what}: (extent, stride) {dims:?} reach element {last}, but the slice has {len}"
        )));
    }
    Ok(())
}

/// Checks that distinct indices of an output address distinct elements: with
/// the dimensions of extent > 1 sorted by stride, each stride must exceed the
/// furthest reach of the smaller ones (the usual sufficient condition).
pub(crate) fn check_disjoint(what: &str, dims: &[(usize, isize)]) -> Result<(), Error> {
    let mut live: Vec<(usize, usize)> = dims
        .iter()
        .filter(|&&(extent, _)| extent > 1)
        .map(|&(extent, stride)| (stride.unsigned_abs(), extent))
        .collect();
    live.sort_unstable();
    let mut reach: usize = 0;
    for (stride, extent) in live {
        if stride <= reach || stride == 0 {
            return Err(Error::layout(format!(
                "{what}: (extent, stride) {dims:?} make output elements overlap"
            )));
        }
        // No overflow: check_span bounded the total reach by the slice length.
        reach += stride * (extent - 1);
    }
    Ok(())
}

/// Raw operand pointers that may cross to rayon workers.
///
/// (Accessed through `get()`, so that closures capture the wrapper and not,
/// by edition-2021 disjoint capture, the bare pointer field.)
#[derive(Clone, Copy)]
struct ConstPtr(*const f32);
#[derive(Clone, Copy)]
struct MutPtr(*mut f32);

impl ConstPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}

impl MutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointers are only dereferenced inside `Gemm::run_*`, during the
// call that borrowed the slices they point into; writes go to pairwise-disjoint
// elements of C (checked), so sharing them between threads is race-free.
unsafe impl Send for ConstPtr {}
unsafe impl Sync for ConstPtr {}
unsafe impl Send for MutPtr {}
unsafe impl Sync for MutPtr {}
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

/// One checked product, as raw parts.
#[derive(Clone, Copy)]
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    ar: isize,
    ac: isize,
    b: *const f32,
    br: isize,
    bc: isize,
    c: *mut f32,
    cr: isize,
    cc: isize,
    accumulate: bool,
}

impl Gemm {
    /// # Safety
    /// Every element the pointers, extents and strides reach must be valid
    /// (reads for A and B, writes for C), and C's elements pairwise distinct.
    unsafe fn run_serial(&self) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        if self.k == 0 {
            if !self.accumulate {
                for i in 0..self.m as isize {
                    for j in 0..self.n as isize {
                        // SAFETY: (i, j) is inside C (the contract above).
                        unsafe { *self.c.offset(i * self.cr + j * self.cc) = 0.0 };
                    }
                }
            }
            return;
        }
        if self.n == 1 || self.m == 1 {
            // SAFETY: the same contract.
            unsafe { self.run_vector() };
            return;
        }
        // SAFETY: the contract above is gemm's. With read_dst = false it only
        // writes C (C = 1·A·B); with true, C = 1·C + 1·A·B. Note gemm's
        // argument order: column stride before row stride.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                self.c,
                self.cc,
                self.cr,
                self.accumulate,
                self.a,
                self.ac,
                self.ar,
                self.b,
                self.bc,
                self.br,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    }

    /// Splits the output into up to `parts` blocks of rows (or of columns, when
    /// there are fewer rows than columns) and runs them on the rayon pool.
    ///
    /// # Safety
    /// As [`Gemm::run_serial`].
    /// A matrix-vector product (`n == 1` or `m == 1`). The GEMM crate packs
    /// its operands first, which for a 1000×8·8×1 product costs several times
    /// the arithmetic. Dot products when the vector's partner runs contiguously
    /// along `k` (four partial sums, so the adds do not wait on each other);
    /// otherwise `C += a_p · B_p` row by row, the inner loop along C.
    ///
    /// # Safety
    /// As [`Gemm::run_serial`], with `k > 0`.
    #[inline]
    unsafe fn run_vector(&self) {
        // A row of C (m == 1) is the transposed problem: Cᵀ = Bᵀ·Aᵀ, n == 1.
        let g = if self.n == 1 {
            *self
        } else {
            Gemm {
                m: self.n,
                n: 1,
                a: self.b,
                ar: self.bc,
                ac: self.br,
                b: self.a,
                br: self.ac,
                bc: self.ar,
                cr: self.cc,
                cc: self.cr,
                ..*self
            }
        };
        // SAFETY (every access below): the indices stay inside the extents the
        // contract of run_serial covers (the transposed view reaches the same).
        unsafe {
            let out = |i: isize| g.c.offset(i * g.cr);
            let (m, k) = (g.m as isize, g.k as isize);
            if g.ac == 1 && g.br == 1 && g.ar == k && g.cr == 1 && g.k <= SMALL {
                // Dense rows of a few elements each: one product per row with
                // its length a constant.
                let a = std::slice::from_raw_parts(g.a, g.m * g.k);
                let b = std::slice::from_raw_parts(g.b, g.k);
                let c = std::slice::from_raw_parts_mut(g.c, g.m);
                by_size!(g.k, rows_dot, a, b, c, g.accumulate);
                return;
            }
            if g.ac == 1 && g.br == 1 {
                // Both along k in memory: slices, eight partial sums the
                // compiler keeps in SIMD registers.
                let b = std::slice::from_raw_parts(g.b, g.k);
                for i in 0..m {
                    let row = std::slice::from_raw_parts(g.a.offset(i * g.ar), g.k);
                    let sum = dot(row, b);
                    *out(i) = if g.accumulate { *out(i) + sum } else { sum };
                }
                return;
            }
            if g.ac.abs() <= g.ar.abs() {
                for i in 0..m {
                    let row = g.a.offset(i * g.ar);
                    let term = |p: isize| *row.offset(p * g.ac) * *g.b.offset(p * g.br);
                    let mut acc = [0.0f32; 4];
                    let whole = k / 4 * 4;
                    for p in (0..whole).step_by(4) {
                        for (lane, slot) in acc.iter_mut().enumerate() {
                            *slot += term(p + lane as isize);
                        }
                    }
                    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                    for p in whole..k {
                        sum += term(p);
                    }
                    *out(i) = if g.accumulate { *out(i) + sum } else { sum };
                }
                return;
            }
            if g.ar == 1 && g.ac == m && g.cr == 1 && g.br == 1 && g.m <= SMALL {
                // A few dense columns (Aᵀ·v with A tall and narrow): the
                // whole output stays in registers while A streams past.
                let a = std::slice::from_raw_parts(g.a, g.m * g.k);
                let b = std::slice::from_raw_parts(g.b, g.k);
                let c = std::slice::from_raw_parts_mut(g.c, g.m);
                by_size!(g.m, columns_axpy, a, b, c, g.accumulate);
                return;
            }
            if !g.accumulate {
                for i in 0..m {
                    *out(i) = 0.0;
                }
            }
            if g.ar == 1 && g.cr == 1 {
                // Columns of A and C contiguous: slice axpys, which vectorize.
                let c = std::slice::from_raw_parts_mut(g.c, g.m);
                for p in 0..k {
                    let x = *g.b.offset(p * g.br);
                    let col = std::slice::from_raw_parts(g.a.offset(p * g.ac), g.m);
                    for (ci, ai) in c.iter_mut().zip(col) {
                        *ci += ai * x;
                    }
                }
                return;
            }
            for p in 0..k {
                let x = *g.b.offset(p * g.br);
                let col = g.a.offset(p * g.ac);
                for i in 0..m {
                    *out(i) += *col.offset(i * g.ar) * x;
                }
            }
        }
    }

    unsafe fn run_split(&self, parts: usize) {
        let split_rows = self.m >= self.n;
        let len = if split_rows { self.m } else { self.n };
        let block = len.div_ceil(parts).next_multiple_of(BLOCK_ALIGN);
        let blocks = len.div_ceil(block);
        (0..blocks).into_par_iter().for_each(|i| {
            let start = i * block;
            let size = block.min(len - start);
            let s = start as isize;
            // SAFETY: each block is a sub-range of the rows (columns) of this
            // product, so it reaches a subset of its elements, and blocks of
            // C are disjoint.
            unsafe {
                let sub = if split_rows {
                    Gemm {
                        m: size,
                        a: self.a.wrapping_offset(s * self.ar),
                        c: self.c.wrapping_offset(s * self.cr),
                        ..*self
                    }
                } else {
                    Gemm {
                        n: size,
                        b: self.b.wrapping_offset(s * self.bc),
                        c: self.c.wrapping_offset(s * self.cc),
                        ..*self
                    }
                };
                sub.run_serial();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The naive triple loop, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        (ar, ac): Strides,
        b: &[f32],
        (br, bc): Strides,
        c: &mut [f32],
        (cr, cc): Strides,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    s += a[i * ar as usize + l * ac as usize] as f64
                        * b[l * br as usize + j * bc as usize] as f64;
                }
                let dst = &mut c[i * cr as usize + j * cc as usize];
                *dst = if accumulate {
                    *dst + s as f32
                } else {
                    s as f32
                };
            }
        }
    }

    fn assert_close(got: &[f32], want: &[f32], k: usize) {
        let tol = 1e-5 * (k as f32).max(1.0) + 1e-6;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn all_transpose_combinations_and_sizes() {
        // Small, ragged, above PAR_FLOPS (both splits: m >= n and m < n), and
        // matrix-vector products (n == 1 or m == 1: their own loops).
        let sizes = [
            (1, 1, 1),
            (1000, 1, 8),
            (1, 300, 1000),
            (1, 1, 50),
            (3, 5, 7),
            (17, 33, 9),
            (128, 256, 70),
            (40, 300, 200),
            (300, 40, 200),
        ];
        // Every length the small matrix-vector loops specialize for, and one
        // past: short rows (m × k·k × 1), narrow columns (Aᵀ·v) and both as
        // a row of C (m == 1).
        let small = (1..=17).flat_map(|s| [(37, 1, s), (s, 1, 1003), (1, s, 29), (1, 41, s)]);
        for (m, n, k) in sizes.into_iter().chain(small) {
            for &(ta, tb, tc) in &[
                (false, false, false),
                (true, false, false),
                (false, true, false),
                (true, true, true),
                (false, false, true),
            ] {
                let a = fill(m * k, 1);
                let b = fill(k * n, 2);
                let sa = if ta { (1, m as isize) } else { (k as isize, 1) };
                let sb = if tb { (1, k as isize) } else { (n as isize, 1) };
                let sc = if tc { (1, m as isize) } else { (n as isize, 1) };
                for accumulate in [false, true] {
                    let init = fill(m * n, 3);
                    let mut want = init.clone();
                    naive(m, n, k, &a, sa, &b, sb, &mut want, sc, accumulate);
                    let mut got = if accumulate {
                        init.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    sgemm(m, n, k, &a, sa, &b, sb, &mut got, sc, accumulate).unwrap();
                    assert_close(&got, &want, k);
                }
            }
        }
    }

    #[test]
    fn padded_strides_leave_gaps_untouched() {
        let (m, n, k) = (5, 4, 3);
        let a = fill(m * 8, 4); // row stride 8
        let b = fill(k * 6, 5); // row stride 6
        let mut c = vec![7.0f32; m * 10]; // row stride 10
        let mut want = c.clone();
        naive(m, n, k, &a, (8, 1), &b, (6, 1), &mut want, (10, 1), false);
        sgemm(m, n, k, &a, (8, 1), &b, (6, 1), &mut c, (10, 1), false).unwrap();
        assert_close(&c, &want, k);
        assert_eq!(c[4], 7.0);
    }

    #[test]
    fn empty_matrix_vector_products_do_nothing() {
        // m == 0 or n == 0 beside a unit dim: no work whatever the strides.
        let b = fill(5, 1);
        sgemm(0, 1, 5, &[], (1, 0), &b, (1, 1), &mut [], (1, 1), false).unwrap();
        sgemm(1, 0, 5, &b, (5, 1), &[], (1, 0), &mut [], (1, 1), false).unwrap();
    }

    #[test]
    fn zero_k_zeroes_or_keeps() {
        let mut c = vec![5.0f32; 6];
        sgemm(2, 3, 0, &[], (0, 1), &[], (3, 1), &mut c, (3, 1), true).unwrap();
        assert_eq!(c, [5.0; 6]);
        sgemm(2, 3, 0, &[], (0, 1), &[], (3, 1), &mut c, (3, 1), false).unwrap();
        assert_eq!(c, [0.0; 6]);
        sgemm(
            0,
            3,
            4,
            &[],
            (4, 1),
            &fill(12, 1),
            (3, 1),
            &mut [],
            (3, 1),
            false,
        )
        .unwrap();
    }

    #[test]
    fn batched_with_broadcast_operands() {
        for &(batch, m, n, k) in &[(3, 4, 5, 6), (2, 130, 120, 100), (8, 64, 64, 64)] {
            let a = fill(batch * m * k, 6);
            let w = fill(k * n, 7); // one B for every batch item
            let mut got = vec![0.0f32; batch * m * n];
            sgemm_batched(
                batch,
                m,
                n,
                k,
                &a,
                ((m * k) as isize, k as isize, 1),
                &w,
                (0, n as isize, 1),
                &mut got,
                ((m * n) as isize, n as isize, 1),
                false,
            )
            .unwrap();
            for p in 0..batch {
                let mut want = vec![0.0f32; m * n];
                naive(
                    m,
                    n,
                    k,
                    &a[p * m * k..],
                    (k as isize, 1),
                    &w,
                    (n as isize, 1),
                    &mut want,
                    (n as isize, 1),
                    false,
                );
                assert_close(&got[p * m * n..(p + 1) * m * n], &want, k);
            }
        }
    }

    #[test]
    fn outer_batches_laid_out_like_attention_heads() {
        // (sequence, head) items: head h of sequence o at columns h·d of a
        // [t, heads·d] row block; both levels' products in one call, on the pool
        // (16·4 products of 64×32×64 are above PAR_FLOPS) and serially.
        for &(outer, heads, t, d) in &[(16, 4, 64, 32), (2, 3, 5, 4)] {
            let width = heads * d;
            let a = fill(outer * t * t * heads, 11); // scores [o, h, t, t]
            let v = fill(outer * t * width, 12); // values [o, t, heads·d]
            let mut got = vec![f32::NAN; outer * t * width];
            sgemm_batched_outer(
                outer,
                [
                    (heads * t * t) as isize,
                    (t * width) as isize,
                    (t * width) as isize,
                ],
                heads,
                t,
                d,
                t,
                &a,
                ((t * t) as isize, t as isize, 1),
                &v,
                (d as isize, width as isize, 1),
                &mut got,
                (d as isize, width as isize, 1),
                false,
            )
            .unwrap();
            for o in 0..outer {
                for h in 0..heads {
                    let mut want = vec![0.0f32; t * d];
                    naive(
                        t,
                        d,
                        t,
                        &a[(o * heads + h) * t * t..],
                        (t as isize, 1),
                        &v[o * t * width + h * d..],
                        (width as isize, 1),
                        &mut want,
                        (d as isize, 1),
                        false,
                    );
                    for i in 0..t {
                        let row = o * t * width + i * width + h * d;
                        assert_close(&got[row..row + d], &want[i * d..(i + 1) * d], t);
                    }
                }
            }
        }
    }

    #[test]
    fn outer_batches_that_overlap_in_c_or_overrun_it_are_layout_errors() {
        let (a, b) = (fill(8, 1), fill(8, 2));
        let mut c = vec![0.0f32; 8];
        // outer items of 2 products of 2×2 (C 8 elements): one element apart
        // (they overlap), then three of them 8 apart (past C's end)
        for (outer, c_so, batch) in [(2, 1, 2), (3, 8, 1)] {
            let err = sgemm_batched_outer(
                outer,
                [0, 0, c_so],
                batch,
                2,
                2,
                1,
                &a,
                (0, 1, 0),
                &b,
                (0, 0, 1),
                &mut c,
                (4, 2, 1),
                false,
            );
            assert!(
                matches!(err, Err(Error::Layout(_))),
                "{outer} x {c_so}: {err:?}"
            );
        }
    }

    #[test]
    fn shared_a_with_batches_side_by_side_in_columns() {
        // B and C hold their batch items side by side along the columns
        // (k × batch·n), so the batch folds into one product's columns.
        for &(batch, m, n, k) in &[(3, 4, 5, 6), (4, 96, 40, 70)] {
            let a = fill(m * k, 8);
            let b = fill(k * batch * n, 9);
            let wide = (batch * n) as isize;
            let mut got = vec![0.0f32; m * batch * n];
            sgemm_batched(
                batch,
                m,
                n,
                k,
                &a,
                (0, k as isize, 1),
                &b,
                (n as isize, wide, 1),
                &mut got,
                (n as isize, wide, 1),
                false,
            )
            .unwrap();
            let mut want = vec![0.0f32; m * batch * n];
            naive(
                m,
                batch * n,
                k,
                &a,
                (k as isize, 1),
                &b,
                (wide, 1),
                &mut want,
                (wide, 1),
                false,
            );
            assert_close(&got, &want, k);
        }
    }

    #[test]
    fn bad_layouts_are_errors_not_panics() {
        let a = fill(12, 1);
        let mut c = vec![0.0f32; 9];
        // A too short for 3×4 row-major.
        assert!(matches!(
            sgemm(3, 3, 4, &a[..11], (4, 1), &a, (3, 1), &mut c, (3, 1), false),
            Err(Error::Layout(_))
        ));
        // C too short.
        assert!(sgemm(3, 3, 4, &a, (4, 1), &a, (3, 1), &mut c[..8], (3, 1), false).is_err());
        // Negative stride.
        assert!(sgemm(3, 3, 4, &a, (-4, 1), &a, (3, 1), &mut c, (3, 1), false).is_err());
        // Overlapping output elements (column stride 0, rows aliasing columns).
        assert!(sgemm(3, 3, 4, &a, (4, 1), &a, (3, 1), &mut c, (3, 0), false).is_err());
        assert!(sgemm(3, 3, 4, &a, (4, 1), &a, (3, 1), &mut c, (1, 1), false).is_err());
        // Broadcast output over a batch.
        assert!(sgemm_batched(
            2,
            1,
            1,
            1,
            &a,
            (1, 1, 1),
            &a,
            (1, 1, 1),
            &mut c,
            (0, 1, 1),
            false
        )
        .is_err());
        // Overflowing strides.
        assert!(sgemm(
            3,
            3,
            4,
            &a,
            (isize::MAX, 1),
            &a,
            (3, 1),
            &mut c,
            (3, 1),
            false
        )
        .is_err());
        // Broadcast input operands (stride 0) are fine.
        sgemm(3, 3, 4, &a, (0, 1), &a, (0, 1), &mut c, (3, 1), false).unwrap();
    }
}
