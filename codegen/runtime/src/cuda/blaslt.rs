//! cuBLASLt (loaded with dlopen when a step is created, if it is there): every
//! GEMM without an outer batch level, so that its algorithm can be chosen
//! (the heuristic's first, or the fastest of several by timing: see
//! [`autotune`](super::autotune)), and the GEMMs whose epilogue adds a bias
//! (and applies ReLU), so a linear layer is one kernel instead of a GEMM and
//! an elementwise pass over its output. One handle with its own workspace,
//! like [`Blas`](super::Blas), so that its calls can be captured into a CUDA
//! graph.

use std::ffi::c_void;
use std::mem::size_of;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use cudarc::cublaslt::sys::{
    self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulHeuristicResult_t,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr,
    cublasLtMatrixLayoutAttribute_t as LayoutAttr, cublasStatus_t, cudaDataType,
};

use super::blas::Scale;
use super::device::{Device, DeviceBuffer};
use super::layout::CublasGemm;

/// cuBLASLt's workspace: 32 MiB, as for cuBLAS (NVIDIA's advice for Hopper);
/// allocating it ourselves keeps cuBLASLt from allocating during graph
/// capture.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Workspaces per handle: GEMMs on different ones may run at once (parallel
/// branches of a step's graph); each call names its own.
pub const WORKSPACES: usize = 2;

/// The pointer alignments (bytes) an algorithm is chosen for at plan time,
/// strictest first. The heuristic assumes 256-byte aligned operands unless
/// told otherwise, and an algorithm chosen for that rejects (or misreads)
/// less aligned ones; operands at arena offsets are often only 16- or 4-byte
/// aligned, so [`BlasLt::run`] picks the strictest one its addresses meet.
const ALIGNMENTS: [u64; 3] = [256, 16, 4];

/// What the epilogue does after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtEpilogue {
    /// None: `D = alpha·op(A)·op(B) + beta·C`.
    Plain,
    /// `D = op(A)·op(B) + bias`.
    Bias,
    /// `D = max(op(A)·op(B) + bias, 0)`.
    ReluBias,
}

/// A cuBLASLt handle for a device (the stream is given with each call).
pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    tf32: bool,
    device: Device,
    /// [`WORKSPACES`] of them, [`WORKSPACE_BYTES`] each.
    workspaces: Vec<DeviceBuffer>,
}

// SAFETY: a handle may be used from any thread (with its context current,
// which callers bind first), just not from two at once: `&mut` users only.
unsafe impl Send for BlasLt {}

/// One GEMM's descriptors and algorithms, built once by [`BlasLt::prepare`].
pub struct LtGemm {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    /// C's and D's layout (C == D).
    c: sys::cublasLtMatrixLayout_t,
    /// The algorithm for each of [`ALIGNMENTS`], if the heuristic has one.
    algos: [Option<cublasLtMatmulAlgo_t>; ALIGNMENTS.len()],
    /// The batch strides in bytes, OR-ed: a batch item's address is only as
    /// aligned as the first one's and these.
    stride_bits: u64,
    /// What follows the product.
    epilogue: LtEpilogue,
    /// The epilogue reads a bias.
    bias: bool,
    /// An empty product (m, n or batch is 0): nothing to queue.
    empty: bool,
    device: Device,
}

// SAFETY: the descriptors are host memory owned by this value; `run` writes
// the bias pointer into `desc` through `&self`, which is sound because
// `LtGemm` is not `Sync` (one thread at a time).
unsafe impl Send for LtGemm {}

fn ok(status: cublasStatus_t, what: impl FnOnce() -> String) -> Result<(), String> {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(format!("{} failed with {s:?}", what())),
    }
}

/// Calls into cuBLASLt. cudarc panics when a symbol is missing from the
/// library it loaded (an old cuBLASLt): that becomes an error here instead
/// of unwinding into the caller.
fn call(f: impl FnOnce() -> cublasStatus_t, what: impl FnOnce() -> String) -> Result<(), String> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(status) => ok(status, what),
        Err(_) => Err(format!(
            "{} is missing from cuBLASLt (the library is too old)",
            what()
        )),
    }
}

/// Sets a matmul descriptor attribute to `value` (its C type is `T`).
///
/// # Safety
/// `desc` is live and `T` is the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: DescAttr,
    value: &T,
) -> Result<(), String> {
    call(
        // SAFETY: the caller's contract; `value` lives through the call.
        || unsafe {
            sys::cublasLtMatmulDescSetAttribute(
                desc,
                attr,
                ptr::from_ref(value).cast(),
                size_of::<T>(),
            )
        },
        || format!("cublasLtMatmulDescSetAttribute({attr:?})"),
    )
}

/// Sets a matrix layout attribute (see [`set_desc`]).
///
/// # Safety
/// `layout` is live and `T` is the attribute's type.
unsafe fn set_layout<T>(
    layout: sys::cublasLtMatrixLayout_t,
    attr: LayoutAttr,
    value: &T,
) -> Result<(), String> {
    call(
        // SAFETY: the caller's contract; `value` lives through the call.
        || unsafe {
            sys::cublasLtMatrixLayoutSetAttribute(
                layout,
                attr,
                ptr::from_ref(value).cast(),
                size_of::<T>(),
            )
        },
        || format!("cublasLtMatrixLayoutSetAttribute({attr:?})"),
    )
}

/// Sets a heuristic preference (see [`set_desc`]).
///
/// # Safety
/// `pref` is live and `T` is the attribute's type.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: PrefAttr,
    value: &T,
) -> Result<(), String> {
    call(
        // SAFETY: the caller's contract; `value` lives through the call.
        || unsafe {
            sys::cublasLtMatmulPreferenceSetAttribute(
                pref,
                attr,
                ptr::from_ref(value).cast(),
                size_of::<T>(),
            )
        },
        || format!("cublasLtMatmulPreferenceSetAttribute({attr:?})"),
    )
}

/// The largest power of two dividing every one of `bits`' set bits' values,
/// i.e. the alignment of addresses whose OR is `bits` (`u64::MAX` for 0).
fn alignment(bits: u64) -> u64 {
    if bits == 0 {
        u64::MAX
    } else {
        1 << bits.trailing_zeros()
    }
}

/// The index in [`ALIGNMENTS`] of the strictest alignment that addresses
/// aligned to `align` meet and that has an algorithm.
fn pick(algos: &[Option<cublasLtMatmulAlgo_t>], align: u64) -> Option<usize> {
    ALIGNMENTS
        .iter()
        .zip(algos)
        .position(|(&need, algo)| align >= need && algo.is_some())
}

/// A heuristic preference descriptor, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

/// Algorithms the heuristic proposes for one GEMM at one pointer alignment,
/// in its order (estimated fastest first), from [`BlasLt::candidates`].
pub struct Candidates {
    /// The index in [`ALIGNMENTS`] they were asked for.
    slot: usize,
    algos: Vec<cublasLtMatmulAlgo_t>,
}

impl Candidates {
    /// How many there are.
    pub fn len(&self) -> usize {
        self.algos.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.algos.is_empty()
    }

    /// The operand alignment (bytes) they were asked for.
    pub fn alignment(&self) -> u64 {
        ALIGNMENTS[self.slot]
    }
}

impl LtGemm {
    /// An empty product (m, n or batch is 0): nothing to queue, nothing to tune.
    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// What follows the product.
    pub fn epilogue(&self) -> LtEpilogue {
        self.epilogue
    }

    /// Runs candidate `i` of `found` (from [`BlasLt::candidates`] for this
    /// GEMM) from now on, for the addresses it was asked for.
    pub fn keep(&mut self, found: &Candidates, i: usize) {
        self.algos[found.slot] = Some(found.algos[i]);
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; errors are ignored.
        let _ = panic::catch_unwind(|| unsafe { sys::cublasLtMatmulPreferenceDestroy(self.0) });
    }
}

impl BlasLt {
    /// A handle on `device`, with strict fp32 (`CUBLAS_COMPUTE_32F`) unless
    /// `tf32` allows TF32 tensor cores (`CUBLAS_COMPUTE_32F_FAST_TF32`).
    ///
    /// # Errors
    /// Why cuBLASLt cannot be used: the library is not on the library path,
    /// a symbol is missing, or creating the handle failed. Callers decide
    /// whether that is fatal (plain cuBLAS and a bias kernel can do the same).
    pub fn new(device: &Device, tf32: bool) -> Result<BlasLt, String> {
        // SAFETY: only tries to dlopen the library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err("cuBLASLt (libcublasLt.so.13 or .12) is not on the library path".into());
        }
        device.bind().map_err(|e| e.to_string())?;
        let workspaces = (0..WORKSPACES)
            .map(|_| device.alloc_zeroed(WORKSPACE_BYTES, "a cuBLASLt workspace"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut handle = ptr::null_mut();
        // SAFETY: writes the new handle to `handle`.
        call(
            || unsafe { sys::cublasLtCreate(&mut handle) },
            || "cublasLtCreate".into(),
        )
        .map_err(|e| format!("cuBLASLt could not be set up: {e}"))?;
        Ok(BlasLt {
            handle,
            tf32,
            device: device.clone(),
            workspaces,
        })
    }

    /// Whether TF32 tensor cores are allowed.
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// Descriptors, layouts and the heuristic's algorithm for one GEMM, built
    /// once (plan time), reused every call. `g` means what it means to
    /// [`Blas::sgemm`](super::Blas::sgemm) (its `swap` already applied by
    /// whoever passes the operands); the bias has `g.m` elements, one per row
    /// of the column-major D, shared by every batch item.
    ///
    /// One algorithm is chosen per pointer alignment in [`ALIGNMENTS`] (the
    /// heuristic's first; autotuning may replace the one for the step's
    /// addresses: [`LtGemm::keep`]), so that [`run`](Self::run) needs no
    /// heuristic query (none may happen during graph capture) whatever its
    /// addresses.
    ///
    /// # Errors
    /// A failed cuBLASLt call, or no algorithm for 4-byte aligned operands
    /// (the case `run` must always be able to fall back on).
    pub fn prepare(&self, g: &CublasGemm, epilogue: LtEpilogue) -> Result<LtGemm, String> {
        let mut p = LtGemm {
            desc: ptr::null_mut(),
            a: ptr::null_mut(),
            b: ptr::null_mut(),
            c: ptr::null_mut(),
            algos: [None; ALIGNMENTS.len()],
            stride_bits: 0,
            epilogue,
            bias: epilogue != LtEpilogue::Plain,
            empty: g.m == 0 || g.n == 0 || g.batch == 0,
            device: self.device.clone(),
        };
        if p.empty {
            return Ok(p);
        }
        let shape = || format!("{}x{}x{} (batch {}, {epilogue:?})", g.m, g.n, g.k, g.batch);
        if g.k == 0 {
            return Err(format!(
                "cuBLASLt is not used for the empty inner dimension of {}",
                shape()
            ));
        }
        self.device.bind().map_err(|e| e.to_string())?;
        let dim = |v: i32| u64::try_from(v).map_err(|_| format!("negative size in {}", shape()));
        let (m, n, k) = (dim(g.m)?, dim(g.n)?, dim(g.k)?);
        let compute = if self.tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let f32_type = cudaDataType::CUDA_R_32F;
        // SAFETY (whole block): every descriptor is created before it is
        // used and lives in `p` (destroyed by its Drop, on error too), and
        // every attribute is given its C type.
        unsafe {
            call(
                || sys::cublasLtMatmulDescCreate(&mut p.desc, compute, f32_type),
                || "cublasLtMatmulDescCreate".into(),
            )?;
            // cublasOperation_t: 0 is N, 1 is T.
            let op = |t: bool| i32::from(t);
            set_desc(p.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.transa))?;
            set_desc(p.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.transb))?;
            let epi = match epilogue {
                LtEpilogue::Plain => None,
                LtEpilogue::Bias => Some(cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
                LtEpilogue::ReluBias => Some(cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS),
            };
            if let Some(epi) = epi {
                set_desc(
                    p.desc,
                    DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &(epi as u32),
                )?;
                set_desc(
                    p.desc,
                    DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &(f32_type as i32),
                )?;
                // One bias vector for every batch item.
                set_desc(
                    p.desc,
                    DescAttr::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                    &0i64,
                )?;
            }

            // Stored shapes: op(A) is m × k, so A is k × m when transposed.
            let (a_rows, a_cols) = if g.transa { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if g.transb { (n, k) } else { (k, n) };
            let layouts = [
                (&mut p.a, a_rows, a_cols, g.lda, g.stride_a),
                (&mut p.b, b_rows, b_cols, g.ldb, g.stride_b),
                (&mut p.c, m, n, g.ldc, g.stride_c),
            ];
            for (layout, rows, cols, ld, stride) in layouts {
                call(
                    || {
                        sys::cublasLtMatrixLayoutCreate(
                            &mut *layout,
                            f32_type,
                            rows,
                            cols,
                            i64::from(ld),
                        )
                    },
                    || "cublasLtMatrixLayoutCreate".into(),
                )?;
                set_layout(
                    *layout,
                    LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &g.batch,
                )?;
                set_layout(
                    *layout,
                    LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride,
                )?;
                if g.batch > 1 {
                    p.stride_bits |= stride.unsigned_abs().wrapping_mul(size_of::<f32>() as u64);
                }
            }
        }
        let pref = self.preference()?;
        for (slot, &align) in ALIGNMENTS.iter().enumerate() {
            p.algos[slot] = self.heuristics(&p, &pref, align, 1)?.first().copied();
        }
        if p.algos[ALIGNMENTS.len() - 1].is_none() {
            return Err(format!(
                "cuBLASLt has no algorithm for {} with 4-byte aligned operands",
                shape()
            ));
        }
        Ok(p)
    }

    /// A heuristic preference allowing this handle's whole workspace.
    fn preference(&self) -> Result<Pref, String> {
        let mut raw = ptr::null_mut();
        // SAFETY: writes the new descriptor to `raw`; `Pref` destroys it.
        call(
            || unsafe { sys::cublasLtMatmulPreferenceCreate(&mut raw) },
            || "cublasLtMatmulPreferenceCreate".into(),
        )?;
        let pref = Pref(raw);
        // SAFETY: a live preference; the attribute is a u64.
        unsafe {
            set_pref(
                pref.0,
                PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(WORKSPACE_BYTES as u64),
            )?;
        }
        Ok(pref)
    }

    /// Up to `max` algorithms the heuristic proposes for `p` with operands
    /// aligned to `align` bytes, estimated fastest first (those it reports
    /// as unusable left out).
    fn heuristics(
        &self,
        p: &LtGemm,
        pref: &Pref,
        align: u64,
        max: usize,
    ) -> Result<Vec<cublasLtMatmulAlgo_t>, String> {
        let shape = || format!("a GEMM with operands aligned to {align} bytes");
        let bytes = align as u32;
        let mut results =
            // SAFETY: plain data (an opaque byte array, integers, a float).
            vec![unsafe { std::mem::zeroed::<cublasLtMatmulHeuristicResult_t>() }; max];
        let mut count = 0;
        // SAFETY (whole block): `p`'s descriptors and `pref` are live, every
        // attribute gets its C type, and `results` holds `max` entries.
        unsafe {
            for attr in [
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set_pref(pref.0, attr, &bytes)?;
            }
            if p.bias {
                // The bias has no alignment preference; in case the heuristic
                // looks at its pointer, show it one exactly this aligned (a
                // real device address: the workspace is at least 256-aligned).
                let base = self.workspaces[0].ptr();
                let bias = if align >= 256 { base } else { base + align };
                set_desc(p.desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            call(
                || {
                    sys::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        p.desc,
                        p.a,
                        p.b,
                        p.c,
                        p.c,
                        pref.0,
                        i32::try_from(max).unwrap_or(i32::MAX),
                        results.as_mut_ptr(),
                        &mut count,
                    )
                },
                || format!("cublasLtMatmulAlgoGetHeuristic for {}", shape()),
            )?;
        }
        let count = usize::try_from(count).unwrap_or(0).min(max);
        Ok(results[..count]
            .iter()
            .filter(|r| r.state == cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// Up to `max` algorithms for `p` at the alignment [`run`](Self::run)
    /// picks for operand addresses whose OR is `bits` (its candidates for
    /// autotuning; [`LtGemm::keep`] makes one of them the one `run` uses).
    ///
    /// # Errors
    /// A failed cuBLASLt call, or no algorithm for such addresses.
    pub fn candidates(&self, p: &LtGemm, bits: u64, max: usize) -> Result<Candidates, String> {
        let align = alignment(bits | p.stride_bits);
        let Some(slot) = pick(&p.algos, align) else {
            return Err(format!(
                "cuBLASLt has no algorithm for operands aligned to {align} bytes"
            ));
        };
        self.device.bind().map_err(|e| e.to_string())?;
        let algos = self.heuristics(p, &self.preference()?, ALIGNMENTS[slot], max)?;
        if algos.is_empty() {
            return Err(format!(
                "cuBLASLt proposes no algorithm for operands aligned to {} bytes",
                ALIGNMENTS[slot]
            ));
        }
        Ok(Candidates { slot, algos })
    }

    /// [`run`](Self::run) with candidate `i` of `found` (from
    /// [`candidates`](Self::candidates) for `p`), for timing it.
    ///
    /// # Safety
    /// As [`run`](Self::run); the addresses meet the alignment `found` was
    /// asked for.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_candidate(
        &self,
        p: &LtGemm,
        found: &Candidates,
        i: usize,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
        bias: u64,
    ) -> Result<(), String> {
        // SAFETY: the caller's contract.
        unsafe { self.run_algo(p, &found.algos[i], scale, [a, b, c, bias], 0) }
    }

    /// Queues `D = alpha·op(A)·op(B) + beta·C + bias` (bias[i] added to row i
    /// of the column-major D, for every column and batch item), then ReLU for
    /// [`LtEpilogue::ReluBias`], on the device's stream (C == D; plans give
    /// beta 0 with a bias; no bias nor ReLU for [`LtEpilogue::Plain`], whose
    /// `bias` is ignored), with workspace number `workspace` (below
    /// [`WORKSPACES`]; calls that may run at once need different ones).
    /// Allocates nothing, waits for nothing and queries no heuristic, so it
    /// may be captured into a CUDA graph.
    ///
    /// # Safety
    /// `a`, `b`, `c` and `bias` must be device addresses of f32 operands
    /// that hold every element the layout reaches (`bias`: `g.m` elements),
    /// and `c` must not overlap `a`, `b` or `bias`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        p: &LtGemm,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
        bias: u64,
        workspace: usize,
    ) -> Result<(), String> {
        if p.empty {
            return Ok(());
        }
        let align = alignment(a | b | c | bias | p.stride_bits);
        let Some(algo) = pick(&p.algos, align).and_then(|i| p.algos[i].as_ref()) else {
            return Err(format!(
                "cuBLASLt has no algorithm for operands aligned to {align} bytes"
            ));
        };
        // SAFETY: the caller's contract; `algo` was chosen for these addresses.
        unsafe { self.run_algo(p, algo, scale, [a, b, c, bias], workspace) }
    }

    /// [`run`](Self::run) with algorithm `algo`.
    ///
    /// # Safety
    /// As [`run`](Self::run); `algo` is one the heuristic proposed for `p`
    /// at an alignment the addresses meet.
    unsafe fn run_algo(
        &self,
        p: &LtGemm,
        algo: &cublasLtMatmulAlgo_t,
        scale: Scale,
        [a, b, c, bias]: [u64; 4],
        workspace: usize,
    ) -> Result<(), String> {
        if p.empty {
            return Ok(());
        }
        let Some(workspace) = self.workspaces.get(workspace) else {
            return Err(format!("no cuBLASLt workspace {workspace}"));
        };
        let Scale { alpha, beta } = scale;
        // SAFETY: the caller's contract; `p`'s descriptors are live and its
        // algorithm was chosen for them with this handle's workspace limit;
        // alpha and beta are host scalars (the default pointer mode) that
        // live through the call; the workspace lives as long as `self`.
        unsafe {
            if p.bias {
                set_desc(p.desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            call(
                || {
                    sys::cublasLtMatmul(
                        self.handle,
                        p.desc,
                        ptr::from_ref(&alpha).cast(),
                        a as *const c_void,
                        p.a,
                        b as *const c_void,
                        p.b,
                        ptr::from_ref(&beta).cast(),
                        c as *const c_void,
                        p.c,
                        c as *mut c_void,
                        p.c,
                        algo,
                        workspace.ptr() as *mut c_void,
                        workspace.bytes(),
                        self.device.stream().cast(),
                    )
                },
                || "cublasLtMatmul".into(),
            )
        }
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; errors are ignored.
        let _ = self.device.bind();
        let _ = panic::catch_unwind(|| unsafe { sys::cublasLtDestroy(self.handle) });
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once (or is still null) and is
        // destroyed once; errors are ignored.
        let _ = self.device.bind();
        let _ = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = sys::cublasLtMatrixLayoutDestroy(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = sys::cublasLtMatmulDescDestroy(self.desc);
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_lowest_set_bit() {
        assert_eq!(alignment(0x1000), 0x1000);
        assert_eq!(alignment(0x1000 | 0x104), 4);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
        assert_eq!(alignment(0), u64::MAX);
    }

    #[test]
    fn pick_takes_the_strictest_alignment_met_that_has_an_algorithm() {
        // Plain data: zeroes stand in for a real algorithm.
        let algo = cublasLtMatmulAlgo_t { data: [0; 8] };
        let all = [Some(algo); 3];
        assert_eq!(pick(&all, u64::MAX), Some(0));
        assert_eq!(pick(&all, 512), Some(0));
        assert_eq!(pick(&all, 256), Some(0));
        assert_eq!(pick(&all, 128), Some(1));
        assert_eq!(pick(&all, 16), Some(1));
        assert_eq!(pick(&all, 8), Some(2));
        assert_eq!(pick(&all, 4), Some(2));
        assert_eq!(pick(&all, 2), None);
        assert_eq!(pick(&[None, Some(algo), Some(algo)], 256), Some(1));
        assert_eq!(pick(&[Some(algo), None, Some(algo)], 64), Some(2));
    }
}
