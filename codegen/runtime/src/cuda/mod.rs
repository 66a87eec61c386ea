//! The CUDA runtime (feature `cuda`): runs a GPU renderer's launch plans.
//!
//! A generated crate with a CUDA step embeds its PTX and writes its plans as
//! constants ([`plan`], the mirror of `codegen/launch_plan.py`); an
//! [`Executor`] does the rest:
//!
//! - [`Device`]: the CUDA driver, loaded with dlopen when a step is created
//!   (so a module builds and imports without CUDA, and only creating a CUDA
//!   step there fails, with [`Error::NoDevice`](crate::Error::NoDevice)), the
//!   device's primary context and one stream;
//! - [`Module::load_ptx`]: the driver's JIT compiles the PTX for the GPU at
//!   hand (its log comes with any error);
//! - arenas: one zeroed device allocation per [`ArenaSpec`]; a
//!   [`BufferRef`] `(arena, offset)` is `base + offset · elem_size`;
//! - steps: kernel launches, and GEMMs by cuBLASLt or cuBLAS ([`layout`]
//!   maps the plan's row-major strided operands onto their column-major
//!   calls; with an outer batch level, `cublasSgemmBatched` over pointer
//!   arrays) or by the plan's fallback kernel when cuBLAS is absent or cannot
//!   express the strides; each cuBLASLt GEMM's algorithm timed among the
//!   heuristic's candidates when the executor is created (`autotune`);
//! - CUDA graphs: each entry point captured on its first call and replayed
//!   after (or plain launches, or one step at a time for debugging); steps
//!   that do not wait for each other (the plan's `after`) become parallel
//!   branches where that replays faster ([`branches`]).
//!
//! Every failure is an [`Error`](crate::Error) naming the kernel or step,
//! never a panic.

mod autotune;
mod blas;
mod blaslt;
mod branches;
mod device;
mod exec;
mod graph;
mod ids;
mod inputs;
pub mod layout;
mod mapped;
mod module;
pub mod plan;
pub mod py;

pub use autotune::{Timer, TuneConfig, Tuned, Tuner};
pub use blas::{Blas, Scale};
pub use blaslt::{BlasLt, Candidates, LtEpilogue, LtGemm};
pub use device::{driver_available, Device, DeviceBuffer, NO_DRIVER};
pub use exec::{Executor, Feed, GemmMode, HostData, HostInput, Options};
pub use graph::Graph;
pub use module::{Function, Module};
pub use plan::{ArenaSpec, Arg, BufferRef, Elem, Gemm, Launch, Plan, ResultSpec, Step};
