//! Launch plans as Rust constants: the mirror of `codegen/launch_plan.py`.
//!
//! A GPU renderer hands the runtime, per entry point (train, forward, grads),
//! an ordered list of steps — kernel launches and GEMMs — whose arguments name
//! buffers as `(arena, offset)`. A generated crate writes those plans as
//! `const`s of the types below; [`Executor`](super::Executor) allocates the
//! arenas once, resolves every [`BufferRef`] to a device address, and runs the
//! steps. Nothing here is specific to one model.

/// The element type of an arena (bools are stored as bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// `f32`
    F32,
    /// `i32`
    I32,
    /// `u8` (bool)
    U8,
    /// `u32` (the error flags of gather and scatter kernels)
    U32,
}

impl Elem {
    /// The size of one element in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::U8 => 1,
        }
    }

    /// The name used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::I32 => "i32",
            Elem::U8 => "u8",
            Elem::U32 => "u32",
        }
    }
}

/// One arena: a single zero-initialized device allocation of `len` elements.
///
/// Names follow `launch_plan.py`: `param`, `state`, `temp_f32`, `temp_i32`,
/// `temp_bool`, `const_f32`, `const_i32`, `const_bool`, `input:<name>` for
/// each input of the step (copied there before the steps run), and
/// `flags_u32`, the error flag gather and scatter kernels raise for an id out
/// of range (zeroed before each call, checked after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaSpec {
    /// The arena's name, as [`BufferRef::arena`] refers to it.
    pub name: &'static str,
    /// Its element type.
    pub elem: Elem,
    /// Its size in elements.
    pub len: usize,
    /// `Some(n)` for an input of ids in `[0, n)` (class labels, embedding
    /// ids): given in device memory, it is copied in by the module's
    /// `fg_copy_ids_checked`, which flags ids out of range (host inputs are
    /// checked before the call).
    pub id_bound: Option<u32>,
}

/// An address: `offset` elements into `arena`, i.e. `base + offset * elem_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferRef {
    /// The arena's name.
    pub arena: &'static str,
    /// Elements from the arena's start.
    pub offset: usize,
}

impl BufferRef {
    /// `offset` elements into `arena`.
    pub const fn new(arena: &'static str, offset: usize) -> Self {
        BufferRef { arena, offset }
    }
}

/// One kernel argument: a device address, or a scalar passed by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A pointer (`.u64` parameter).
    Buf(BufferRef),
    /// A `.u32` parameter.
    U32(u32),
    /// A `.s32` parameter.
    S32(i32),
    /// A `.f32` parameter.
    F32(f32),
}

impl Arg {
    /// The address `offset` elements into `arena` (shorthand for generated plans).
    pub const fn buf(arena: &'static str, offset: usize) -> Self {
        Arg::Buf(BufferRef::new(arena, offset))
    }
}

/// One kernel launch: `kernel` is an entry of the module's PTX.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Launch {
    /// The `.entry` name.
    pub kernel: &'static str,
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// The kernel's parameters in order.
    pub args: &'static [Arg],
}

/// `C[b] = alpha·(A[b] @ B[b]) + beta·C[b]` for `b` in `0..batch`, all f32,
/// row-major element strides `(batch, row, col)` (batch stride 0 for a
/// broadcast operand). With `beta` 0, C is only written, never read (as in
/// BLAS); `beta` 1 accumulates into it (plain SGD's in-place weight update,
/// `alpha` = -lr).
///
/// Run by cuBLAS when it is loaded and the strides fit its layouts (see
/// [`super::layout`]), else by `fallback`, a kernel over the same operands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// The number of products.
    pub batch: usize,
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Columns of A, rows of B.
    pub k: usize,
    /// A, `m × k`.
    pub a: BufferRef,
    /// A's (batch, row, col) strides in elements.
    pub a_strides: [usize; 3],
    /// B, `k × n`.
    pub b: BufferRef,
    /// B's strides.
    pub b_strides: [usize; 3],
    /// C, `m × n`: written, or accumulated into when `beta` is not 0.
    pub c: BufferRef,
    /// C's strides.
    pub c_strides: [usize; 3],
    /// The renderer's kernel for the same product (epilogue included), used
    /// without cuBLAS.
    pub fallback: Option<Launch>,
    /// An epilogue: `C[b][i, j] += bias[j]`, a contiguous vector of `n` (run by
    /// cuBLASLt, or by the fallback kernel).
    pub bias: Option<BufferRef>,
    /// Then `C = max(C, 0)` (only with a bias).
    pub relu: bool,
    /// A second batch level: `outer` groups of `batch` products, group `o`'s
    /// operands starting `o * outer_strides` elements on (`1`: none). Two
    /// batch dims no single stride describes, e.g. attention's (batch, head).
    pub outer: usize,
    /// `(A, B, C)` strides of the outer level, in elements.
    pub outer_strides: [usize; 3],
    /// The product's factor (`1`: the plain product).
    pub alpha: f32,
    /// C's factor (`0`: C is not read; never anything else with a bias).
    pub beta: f32,
    /// Generated kernels for the same product (epilogue and
    /// scaling included), which autotuning times with the libraries'
    /// algorithms; split-K ones use the `split_f32` and `split_u32` arenas.
    pub tiled: &'static [Launch],
}

/// One step of a plan.
// Plans are `static` tables read by reference: the size difference between
// variants costs nothing, and boxing would make them non-`const`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// A generated kernel.
    Launch(Launch),
    /// A matrix product (cuBLAS or the fallback kernel).
    Gemm(Gemm),
}

/// What comes back to the host after an entry point's steps: the result
/// `key` (e.g. `out:loss`, `grad:linear_0.weight`) at `offset` in `arena`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultSpec {
    /// The result's key.
    pub key: &'static str,
    /// The arena holding it.
    pub arena: &'static str,
    /// Its offset in elements.
    pub offset: usize,
    /// Its shape (C order).
    pub shape: &'static [usize],
}

impl ResultSpec {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the result has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name without its kind prefix: `loss` for `out:loss`.
    pub fn name(&self) -> &'static str {
        self.key.split_once(':').map_or(self.key, |(_, name)| name)
    }
}

/// Everything the runtime needs for one entry point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// `train`, `forward` or `grads`.
    pub entry: &'static str,
    /// The steps, in an order that is correct to run one after another.
    pub steps: &'static [Step],
    /// For each step, the earlier steps it must run after (those that write
    /// what it reads or writes, or read what it writes: `launch_plan.py`'s
    /// `step_dependencies`); the others may run at the same time. Empty: the
    /// renderer says nothing, and the steps run in order.
    pub after: &'static [&'static [usize]],
    /// What the host reads back.
    pub results: &'static [ResultSpec],
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: Plan = Plan {
        entry: "forward",
        steps: &[Step::Launch(Launch {
            kernel: "k0",
            grid: [1, 1, 1],
            block: [128, 1, 1],
            shared_bytes: 0,
            args: &[Arg::buf("temp_f32", 16), Arg::U32(7), Arg::F32(0.5)],
        })],
        after: &[&[]],
        results: &[ResultSpec {
            key: "out:logits",
            arena: "temp_f32",
            offset: 16,
            shape: &[2, 3],
        }],
    };

    #[test]
    fn plans_are_constants() {
        assert_eq!(PLAN.steps.len(), 1);
        let r = PLAN.results[0];
        assert_eq!((r.name(), r.len(), r.is_empty()), ("logits", 6, false));
        assert_eq!(Elem::U8.bytes() + Elem::F32.bytes(), 5);
        let Step::Launch(launch) = PLAN.steps[0] else {
            unreachable!()
        };
        assert_eq!(
            launch.args[0],
            Arg::Buf(BufferRef {
                arena: "temp_f32",
                offset: 16
            })
        );
    }
}
