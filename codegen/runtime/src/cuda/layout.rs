//! How a plan's row-major strided GEMM maps onto cuBLAS's column-major
//! `cublasSgemmStridedBatched` (pure arithmetic, tested without a GPU).
//!
//! cuBLAS sees a matrix as column-major: element `(i, j)` at `i + j·ld`, or,
//! with `op = T`, the transpose of such a matrix. A logical `rows × cols`
//! operand with element strides `(rs, cs)` is therefore
//!
//! - column-major when `rs == 1`: `op = N`, `ld = cs`;
//! - row-major when `cs == 1`: it is the transpose of the column-major
//!   `cols × rows` matrix with `ld = rs`, so `op = T`, `ld = rs`;
//! - anything else (a stride-0 broadcast inside the matrix, both strides > 1):
//!   not expressible, and the plan's fallback kernel runs it instead.
//!
//! A size-1 dimension's stride is never used, so it does not constrain the
//! layout. cuBLAS writes C column-major; for a row-major C (`cs == 1`, the
//! usual case) we compute `Cᵀ = Bᵀ·Aᵀ` instead, which swaps the roles of A and
//! B and transposes every operand's strides (`swap` below).

/// A GEMM step's sizes and `(batch, row, col)` element strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// The number of products.
    pub batch: usize,
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Columns of A, rows of B.
    pub k: usize,
    /// A's strides.
    pub a: [usize; 3],
    /// B's strides.
    pub b: [usize; 3],
    /// C's strides.
    pub c: [usize; 3],
}

impl From<&super::plan::Gemm> for GemmShape {
    fn from(g: &super::plan::Gemm) -> Self {
        GemmShape {
            batch: g.batch,
            m: g.m,
            n: g.n,
            k: g.k,
            a: g.a_strides,
            b: g.b_strides,
            c: g.c_strides,
        }
    }
}

/// The arguments of one `cublasSgemmStridedBatched` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CublasGemm {
    /// cuBLAS's A is the plan's B (and cuBLAS's B the plan's A): `Cᵀ = Bᵀ·Aᵀ`.
    pub swap: bool,
    /// `op(A) = Aᵀ`.
    pub transa: bool,
    /// `op(B) = Bᵀ`.
    pub transb: bool,
    /// Rows of op(A) and of C, as cuBLAS sees them.
    pub m: i32,
    /// Columns of op(B) and of C.
    pub n: i32,
    /// The inner dimension.
    pub k: i32,
    /// Leading dimension of A.
    pub lda: i32,
    /// Leading dimension of B.
    pub ldb: i32,
    /// Leading dimension of C.
    pub ldc: i32,
    /// Batch stride of A in elements (0: broadcast).
    pub stride_a: i64,
    /// Batch stride of B.
    pub stride_b: i64,
    /// Batch stride of C.
    pub stride_c: i64,
    /// The number of products.
    pub batch: i32,
}

/// The leading dimension of a `rows × cols` operand with strides `(rs, cs)`
/// stored column-major, or `None` when it is not.
fn column_major(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows > 1 && rs != 1 {
        return None;
    }
    // A single column never steps by its leading dimension: any ld ≥ rows works.
    let ld = if cols <= 1 { rows.max(1) } else { cs };
    (ld >= rows.max(1)).then_some(ld)
}

/// `(op = T?, ld)` for an operand of cuBLAS: column-major as is, or the
/// transpose of a column-major matrix (row-major).
fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(bool, usize)> {
    column_major(rows, cols, rs, cs)
        .map(|ld| (false, ld))
        .or_else(|| column_major(cols, rows, cs, rs).map(|ld| (true, ld)))
}

/// The cuBLAS call computing `s`, or why there is none (then the plan's
/// fallback kernel runs it).
pub fn cublas_layout(s: &GemmShape) -> Result<CublasGemm, String> {
    let (m, n, k) = (s.m, s.n, s.k);
    // (rows-of-op, strides) of the operands in cuBLAS's order.
    let (swap, cm, cn, ca, cb, cc) = if column_major(m, n, s.c[1], s.c[2]).is_some() {
        (false, m, n, s.a, s.b, s.c)
    } else if column_major(n, m, s.c[2], s.c[1]).is_some() {
        // Cᵀ (n × m) = Bᵀ (n × k) · Aᵀ (k × m): transposing swaps (row, col) strides.
        let t = |x: [usize; 3]| [x[0], x[2], x[1]];
        (true, n, m, t(s.b), t(s.a), t(s.c))
    } else {
        return Err(format!(
            "C's strides {:?} are neither row- nor column-contiguous",
            s.c
        ));
    };
    // Messages name the plan's operands, whichever side of cuBLAS they are on.
    let unfit = |first: bool| {
        let (name, strides) = if first != swap {
            ("A", s.a)
        } else {
            ("B", s.b)
        };
        format!("{name}'s strides {strides:?} fit no cuBLAS layout")
    };
    let (transa, lda) = operand(cm, k, ca[1], ca[2]).ok_or_else(|| unfit(true))?;
    let (transb, ldb) = operand(k, cn, cb[1], cb[2]).ok_or_else(|| unfit(false))?;
    let ldc = column_major(cm, cn, cc[1], cc[2])
        .ok_or_else(|| format!("C's strides {:?} fit no cuBLAS layout", s.c))?;
    if s.batch > 1 && cc[0] == 0 {
        return Err("C's batch stride is 0: the products would overwrite each other".into());
    }
    let batch_stride = |x: [usize; 3]| if s.batch > 1 { x[0] } else { 0 };
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| format!("{what} = {v} exceeds cuBLAS's 32-bit sizes"))
    };
    let long = |v: usize, what: &str| {
        i64::try_from(v).map_err(|_| format!("{what} = {v} exceeds cuBLAS's 64-bit strides"))
    };
    Ok(CublasGemm {
        swap,
        transa,
        transb,
        m: int(cm, "m")?,
        n: int(cn, "n")?,
        k: int(k, "k")?,
        lda: int(lda, "lda")?,
        ldb: int(ldb, "ldb")?,
        ldc: int(ldc, "ldc")?,
        stride_a: long(batch_stride(ca), "A's batch stride")?,
        stride_b: long(batch_stride(cb), "B's batch stride")?,
        stride_c: long(batch_stride(cc), "C's batch stride")?,
        batch: int(s.batch, "batch")?,
    })
}

/// One past the largest element index an operand of `batch × rows × cols` with
/// these strides touches (0 when it has no elements), to check it lies inside
/// its arena before any device code reads it.
pub fn extent(batch: usize, rows: usize, cols: usize, strides: [usize; 3]) -> Option<usize> {
    if batch == 0 || rows == 0 || cols == 0 {
        return Some(0);
    }
    let last = (batch - 1)
        .checked_mul(strides[0])?
        .checked_add((rows - 1).checked_mul(strides[1])?)?
        .checked_add((cols - 1).checked_mul(strides[2])?)?;
    last.checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cublasSgemmStridedBatched` with alpha = 1, beta = 0, as its
    /// documentation defines it (column-major), on host slices.
    fn cublas_reference(g: &CublasGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        for p in 0..g.batch as usize {
            let (oa, ob, oc) = (
                p * g.stride_a as usize,
                p * g.stride_b as usize,
                p * g.stride_c as usize,
            );
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f64;
                    for l in 0..k {
                        let x = if g.transa {
                            a[oa + l + i * lda]
                        } else {
                            a[oa + i + l * lda]
                        };
                        let y = if g.transb {
                            b[ob + j + l * ldb]
                        } else {
                            b[ob + l + j * ldb]
                        };
                        acc += f64::from(x) * f64::from(y);
                    }
                    c[oc + i + j * ldc] = acc as f32;
                }
            }
        }
    }

    /// The plan's definition: row-major strided products.
    fn plan_reference(s: &GemmShape, a: &[f32], b: &[f32], c: &mut [f32]) {
        for p in 0..s.batch {
            for i in 0..s.m {
                for j in 0..s.n {
                    let mut acc = 0.0f64;
                    for l in 0..s.k {
                        let x = a[p * s.a[0] + i * s.a[1] + l * s.a[2]];
                        let y = b[p * s.b[0] + l * s.b[1] + j * s.b[2]];
                        acc += f64::from(x) * f64::from(y);
                    }
                    c[p * s.c[0] + i * s.c[1] + j * s.c[2]] = acc as f32;
                }
            }
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// Strides of a `batch × rows × cols` operand: row- or column-major, with
    /// some padding, batch-broadcast or not.
    fn strides(rng: &mut Rng, rows: usize, cols: usize, broadcast: bool) -> [usize; 3] {
        let pad = rng.below(3);
        let (rs, cs, size) = if rng.below(2) == 0 {
            (cols + pad, 1, rows * (cols + pad))
        } else {
            (1, rows + pad, cols * (rows + pad))
        };
        [if broadcast { 0 } else { size + rng.below(2) }, rs, cs]
    }

    #[test]
    fn every_contiguous_layout_matches_the_plan_semantics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..2000 {
            let (batch, m, n, k) = (
                1 + rng.below(3),
                1 + rng.below(5),
                1 + rng.below(5),
                1 + rng.below(5),
            );
            let (broadcast_a, broadcast_b) = (rng.below(5) == 0, rng.below(7) == 0);
            let s = GemmShape {
                batch,
                m,
                n,
                k,
                a: strides(&mut rng, m, k, broadcast_a),
                b: strides(&mut rng, k, n, broadcast_b),
                c: strides(&mut rng, m, n, false),
            };
            let len = |st: [usize; 3], r, c| extent(batch, r, c, st).unwrap();
            let a: Vec<f32> = (0..len(s.a, m, k))
                .map(|_| rng.below(17) as f32 - 8.0)
                .collect();
            let b: Vec<f32> = (0..len(s.b, k, n))
                .map(|_| rng.below(17) as f32 - 8.0)
                .collect();
            let mut want = vec![f32::NAN; len(s.c, m, n)];
            plan_reference(&s, &a, &b, &mut want);
            let g = cublas_layout(&s).unwrap_or_else(|e| panic!("case {case} {s:?}: {e}"));
            let mut got = vec![f32::NAN; want.len()];
            let (x, y) = if g.swap { (&b, &a) } else { (&a, &b) };
            cublas_reference(&g, x, y, &mut got);
            for (i, (w, g2)) in want.iter().zip(&got).enumerate() {
                assert!(
                    w == g2 || (w.is_nan() && g2.is_nan()),
                    "case {case} {s:?} -> {g:?}: element {i}: {g2} != {w}"
                );
            }
        }
    }

    #[test]
    fn row_major_c_swaps_operands() {
        // C (2×3) = A (2×4) · B (4×3), all row-major: Cᵀ = Bᵀ Aᵀ, no transposes.
        let s = GemmShape {
            batch: 1,
            m: 2,
            n: 3,
            k: 4,
            a: [8, 4, 1],
            b: [12, 3, 1],
            c: [6, 3, 1],
        };
        let g = cublas_layout(&s).unwrap();
        assert!(g.swap && !g.transa && !g.transb);
        assert_eq!((g.m, g.n, g.k, g.lda, g.ldb, g.ldc), (3, 2, 4, 3, 4, 3));
        // Aᵀ·B (A stored k × m row-major): cuBLAS's B is transposed.
        let s = GemmShape { a: [8, 1, 2], ..s };
        let g = cublas_layout(&s).unwrap();
        assert!(g.swap && !g.transa && g.transb);
        assert_eq!(g.ldb, 2);
    }

    #[test]
    fn inexpressible_strides_are_refused_with_a_reason() {
        let s = GemmShape {
            batch: 1,
            m: 2,
            n: 3,
            k: 4,
            a: [0, 0, 1], // every row of A is the same row: stride 0
            b: [12, 3, 1],
            c: [6, 3, 1],
        };
        assert!(cublas_layout(&s).unwrap_err().contains("A's strides"));
        let s = GemmShape {
            c: [12, 6, 2],
            a: [8, 4, 1],
            ..s
        };
        assert!(cublas_layout(&s).unwrap_err().contains("C's strides"));
        let s = GemmShape {
            batch: 2,
            c: [0, 3, 1],
            ..s
        };
        assert!(cublas_layout(&s).unwrap_err().contains("batch stride is 0"));
    }

    #[test]
    fn extents() {
        assert_eq!(extent(2, 3, 4, [12, 4, 1]), Some(24));
        assert_eq!(extent(2, 3, 4, [0, 4, 1]), Some(12));
        assert_eq!(extent(1, 3, 4, [0, 1, 3]), Some(12));
        assert_eq!(extent(0, 3, 4, [12, 4, 1]), Some(0));
        assert_eq!(extent(2, 2, 2, [usize::MAX, 1, 1]), None);
    }
}
