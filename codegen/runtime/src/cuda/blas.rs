//! cuBLAS (loaded with dlopen when a step is created, if it is there): one
//! handle on the device's stream, with its own workspace so that its calls
//! can be captured into a CUDA graph.

use std::panic::{self, AssertUnwindSafe};

use cudarc::cublas::sys::{self, cublasMath_t, cublasOperation_t, cublasStatus_t};

use super::device::{Device, DeviceBuffer};
use super::layout::CublasGemm;
use super::plan::Gemm;

/// cuBLAS's workspace: 32 MiB is what NVIDIA recommends for Hopper (4 MiB
/// before it); allocating it ourselves keeps cuBLAS from allocating during
/// graph capture.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A GEMM's scalars: `C = alpha·op(A)·op(B) + beta·C` (`beta` 0: C is only
/// written). Passed as host values — the handles keep the default host
/// pointer mode — which cuBLAS reads when the call is queued, so a captured
/// CUDA graph holds them by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// The product's factor.
    pub alpha: f32,
    /// C's factor.
    pub beta: f32,
}

impl From<&Gemm> for Scale {
    fn from(g: &Gemm) -> Self {
        Scale {
            alpha: g.alpha,
            beta: g.beta,
        }
    }
}

/// A cuBLAS handle bound to a device's stream.
pub struct Blas {
    handle: sys::cublasHandle_t,
    tf32: bool,
    device: Device,
    workspace: DeviceBuffer,
}

// SAFETY: a handle may be used from any thread (with its context current,
// which callers bind first), just not from two at once: `&mut` users only.
unsafe impl Send for Blas {}

fn ok(status: cublasStatus_t, what: &str) -> Result<(), String> {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(format!("{what} failed with {s:?}")),
    }
}

impl Blas {
    /// A handle on `device`'s stream, strict fp32 (`CUBLAS_DEFAULT_MATH`)
    /// unless `tf32` allows TF32 tensor cores.
    ///
    /// # Errors
    /// Why cuBLAS cannot be used: the library is not on the library path, a
    /// symbol is missing, or creating the handle failed. Callers decide
    /// whether that is fatal (see `GemmMode`).
    pub fn new(device: &Device, tf32: bool) -> Result<Blas, String> {
        // SAFETY: only tries to dlopen the library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err("cuBLAS (libcublas.so.13 or .12) is not on the library path".into());
        }
        device.bind().map_err(|e| e.to_string())?;
        let workspace = device
            .alloc_zeroed(WORKSPACE_BYTES, "the cuBLAS workspace")
            .map_err(|e| e.to_string())?;
        // cudarc panics when a symbol is missing from the library it loaded
        // (an old cuBLAS): keep that from unwinding into the caller.
        let created = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            let mut handle = std::ptr::null_mut();
            ok(sys::cublasCreate_v2(&mut handle), "cublasCreate")?;
            let blas = Blas {
                handle,
                tf32,
                device: device.clone(),
                workspace,
            };
            // SAFETY (whole block): `handle` is live; the stream and the
            // workspace outlive it (both are owned by or outlive `blas`).
            ok(
                sys::cublasSetStream_v2(blas.handle, device.stream().cast()),
                "cublasSetStream",
            )?;
            ok(
                sys::cublasSetWorkspace_v2(
                    blas.handle,
                    blas.workspace.ptr() as *mut std::ffi::c_void,
                    blas.workspace.bytes(),
                ),
                "cublasSetWorkspace",
            )?;
            let mode = if tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            ok(
                sys::cublasSetMathMode(blas.handle, mode),
                "cublasSetMathMode",
            )?;
            Ok::<_, String>(blas)
        }));
        match created {
            Ok(result) => result.map_err(|e| format!("cuBLAS could not be set up: {e}")),
            Err(_) => Err("cuBLAS is too old (a symbol is missing)".into()),
        }
    }

    /// Whether TF32 tensor cores are allowed.
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// Queues `C = alpha·op(A)·op(B) + beta·C` on the stream.
    ///
    /// # Safety
    /// `a`, `b` and `c` must be device addresses of f32 operands that hold
    /// every element the layout reaches (the executor checks this against the
    /// arenas), and `c` must not overlap `a` or `b`.
    pub unsafe fn sgemm(
        &self,
        g: &CublasGemm,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), String> {
        let Scale { alpha, beta } = scale;
        // SAFETY: the caller's contract; alpha and beta are host scalars (the
        // default pointer mode) that live through the call.
        let status = unsafe {
            sys::cublasSgemmStridedBatched(
                self.handle,
                op(g.transa),
                op(g.transb),
                g.m,
                g.n,
                g.k,
                &alpha,
                a as *const f32,
                g.lda,
                g.stride_a,
                b as *const f32,
                g.ldb,
                g.stride_b,
                &beta,
                c as *mut f32,
                g.ldc,
                g.stride_c,
                g.batch,
            )
        };
        ok(status, "cublasSgemmStridedBatched")
    }
}

impl Blas {
    /// Queues `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]` for the `count`
    /// products whose addresses are in the device arrays `a`, `b`, `c` (one
    /// `u64` each per product): `cublasSgemmBatched`, for batches no single
    /// stride describes.
    /// `g`'s batch strides are ignored.
    ///
    /// # Safety
    /// As [`Blas::sgemm`], for every product; the arrays hold `count` device
    /// addresses each and stay alive until the call has run.
    pub unsafe fn sgemm_pointers(
        &self,
        g: &CublasGemm,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
        count: i32,
    ) -> Result<(), String> {
        let Scale { alpha, beta } = scale;
        // SAFETY: the caller's contract; alpha and beta are host scalars.
        let status = unsafe {
            sys::cublasSgemmBatched(
                self.handle,
                op(g.transa),
                op(g.transb),
                g.m,
                g.n,
                g.k,
                &alpha,
                a as *const *const f32,
                g.lda,
                b as *const *const f32,
                g.ldb,
                &beta,
                c as *const *mut f32,
                g.ldc,
                count,
            )
        };
        ok(status, "cublasSgemmBatched")
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; errors are ignored.
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cublasDestroy_v2(self.handle);
        }
    }
}

/// cuBLAS's operation for an operand read transposed (`t`) or as it is.
fn op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}
