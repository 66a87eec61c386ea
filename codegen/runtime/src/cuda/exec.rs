//! The executor: a module's arenas on the device and its plans made ready to
//! run, as plain launches or as CUDA graphs.
//!
//! At creation every [`BufferRef`] becomes a device address (arenas are
//! allocated once and never move), every kernel's parameter block is built,
//! and every GEMM is bound to cuBLASLt (its algorithm chosen by timing, with
//! [`Options::autotune`]: see [`autotune`](super::autotune)), to cuBLAS, or to
//! its fallback kernel. A call then copies the inputs into their fixed input
//! arenas, runs the steps, and waits; [`Executor::run_steps`] does so for K
//! stacked batches in turn, with one wait at the end.
//!
//! Graphs: with [`Options::graphs`], an entry point runs as plain launches on
//! its first call (which also makes the driver and cuBLAS load every kernel
//! they lazily load, something a capture must not trigger), is captured into a
//! CUDA graph on its second, and replays that graph from then on. A graph bakes
//! in the addresses and scalars of every step; all of them are fixed for the
//! executor's life (inputs are copied into fixed arenas, never used in place),
//! so a captured graph never goes stale. [`Executor::reset_graphs`] drops them
//! (the next call captures again) for whoever changes that.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::sys;

use super::autotune::{KernelCandidate, TuneConfig, Tuned, Tuner};
use super::blas::{Blas, Scale};
use super::blaslt::{BlasLt, LtEpilogue, LtGemm, WORKSPACES};
use super::branches::{self, Persistent};
use super::device::{check, Device, DeviceBuffer};
use super::graph::{why_no_branches, Graph};
use super::ids::IdsCheck;
use super::inputs::{InputCopy, InputNode};
use super::layout::{cublas_layout, extent, CublasGemm, GemmShape};
use super::mapped::MappedWords;
use super::module::{Function, Module};
use super::plan::{ArenaSpec, Arg, BufferRef, Elem, Gemm, Launch, Plan, ResultSpec, Step};
use crate::error::Error;
use crate::py::{DeviceArray, ProducerStream};

#[cfg(target_endian = "big")]
compile_error!("kernel parameter slots assume a little-endian host");

/// Who runs the GEMM steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmMode {
    /// cuBLAS when it loads, else the fallback kernels.
    Auto,
    /// cuBLAS, which must load (an error otherwise).
    Cublas,
    /// Always the fallback kernels.
    Kernel,
}

impl GemmMode {
    /// `"auto"`, `"cublas"` or `"kernel"`.
    pub fn parse(text: &str) -> Result<GemmMode, String> {
        match text {
            "auto" => Ok(GemmMode::Auto),
            "cublas" => Ok(GemmMode::Cublas),
            "kernel" => Ok(GemmMode::Kernel),
            _ => Err(format!(
                "gemm must be \"auto\", \"cublas\" or \"kernel\", not {text:?}"
            )),
        }
    }
}

/// How an [`Executor`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The CUDA device ordinal.
    pub device: usize,
    /// Capture each entry point into a CUDA graph on its first call and
    /// replay it (else: one driver call per step, every time).
    pub graphs: bool,
    /// Wait after every step, so an asynchronous failure names its kernel
    /// (debugging; implies no graphs).
    pub sync_each: bool,
    /// Who runs the GEMMs.
    pub gemm: GemmMode,
    /// Let cuBLAS use TF32 tensor cores (not strict fp32).
    pub tf32: bool,
    /// Also capture each graph with the steps that do not wait for each
    /// other (the plan's `after`) as parallel branches, and keep whichever
    /// replays fastest ([`super::branches`]; else one after another only).
    pub branches: bool,
    /// A graph copies the inputs given in device memory itself: its first
    /// nodes, pointed at each call's arrays ([`super::inputs`]; else each
    /// input is copied by a call of its own before the graph's launch).
    pub graph_inputs: bool,
    /// Choose each cuBLASLt GEMM's algorithm by timing candidates on its own
    /// operands when the executor is created (else the heuristic's first).
    pub autotune: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            device: 0,
            graphs: true,
            sync_each: false,
            gemm: GemmMode::Auto,
            tf32: false,
            branches: true,
            graph_inputs: true,
            autotune: true,
        }
    }
}

/// An input's elements on the host, for [`Executor::run`].
#[derive(Debug, Clone, Copy)]
pub enum HostInput<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// i32 elements.
    I32(&'a [i32]),
    /// bools as bytes.
    U8(&'a [u8]),
}

/// An input of [`Executor::run`]: elements on the host (copied to the
/// device), or an array already on the device (CuPy, PyTorch: copied device
/// to device into the input's fixed arena, so a captured CUDA graph keeps
/// its addresses; aliasing the caller's memory instead would need the graph
/// re-instantiated or its nodes updated whenever the address changes).
#[derive(Debug, Clone, Copy)]
pub enum Feed<'a> {
    /// Host elements.
    Host(HostInput<'a>),
    /// A device array of elements of the given type.
    Device(Elem, DeviceArray),
}

impl<'a> From<HostInput<'a>> for Feed<'a> {
    fn from(data: HostInput<'a>) -> Self {
        Feed::Host(data)
    }
}

impl<'a> Feed<'a> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Feed::Host(HostInput::F32(d)) => d.len(),
            Feed::Host(HostInput::I32(d)) => d.len(),
            Feed::Host(HostInput::U8(d)) => d.len(),
            Feed::Device(_, array) => array.len,
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch `k` of the `count` equal batches stacked along the leading axis
    /// (the input of one run of [`Executor::run_steps`]), or `None` when `k`
    /// is not below `count` or the elements do not split into `count` parts.
    /// A device batch keeps the whole array's producer stream.
    pub fn batch(self, k: usize, count: usize) -> Option<Feed<'a>> {
        fn part<T>(data: &[T], k: usize, count: usize) -> Option<&[T]> {
            if k >= count || !data.len().is_multiple_of(count) {
                return None;
            }
            let n = data.len() / count;
            data.get(k * n..(k + 1) * n)
        }
        Some(match self {
            Feed::Host(HostInput::F32(d)) => Feed::Host(HostInput::F32(part(d, k, count)?)),
            Feed::Host(HostInput::I32(d)) => Feed::Host(HostInput::I32(part(d, k, count)?)),
            Feed::Host(HostInput::U8(d)) => Feed::Host(HostInput::U8(part(d, k, count)?)),
            Feed::Device(elem, array) => {
                if k >= count
                    || !array.len.is_multiple_of(count)
                    || !array.bytes.is_multiple_of(count)
                {
                    return None;
                }
                let (len, bytes) = (array.len / count, array.bytes / count);
                Feed::Device(
                    elem,
                    DeviceArray {
                        ptr: array.ptr + (k * bytes) as u64,
                        len,
                        bytes,
                        stream: array.stream,
                    },
                )
            }
        })
    }
}

/// Elements copied back from the device.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// f32 elements.
    F32(Vec<f32>),
    /// i32 elements.
    I32(Vec<i32>),
    /// bools as bytes.
    U8(Vec<u8>),
    /// u32 elements.
    U32(Vec<u32>),
}

struct Arena {
    spec: ArenaSpec,
    buf: DeviceBuffer,
}

/// A kernel launch with its parameter block built.
struct KernelCall {
    function: Function,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    /// One 8-byte slot per parameter (pointers, or scalars in the low bytes).
    slots: Box<[u64]>,
    /// `&slots[i]` for each parameter: what `cuLaunchKernel` reads.
    params: Box<[*mut c_void]>,
}

impl KernelCall {
    /// Queues the kernel on `device`'s stream with the parameter block
    /// `params`.
    ///
    /// # Safety
    /// `params` holds one pointer per kernel parameter, each valid until the
    /// launch is queued, to values the kernel may use (addresses inside live
    /// allocations).
    unsafe fn launch(
        &self,
        device: &Device,
        params: *mut *mut c_void,
    ) -> Result<(), cudarc::driver::DriverError> {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        // SAFETY: a function of our loaded module; the caller's contract.
        unsafe {
            sys::cuLaunchKernel(
                self.function.raw,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                self.shared_bytes,
                device.stream(),
                params,
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

enum Work {
    Kernel(KernelCall),
    Cublas {
        call: CublasGemm,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
    },
    /// Products at the addresses listed in `pointers` (A's, then B's, then
    /// C's: `count` each), for a plan GEMM with an outer batch level.
    CublasPointers {
        call: CublasGemm,
        scale: Scale,
        pointers: DeviceBuffer,
        count: usize,
    },
    /// A GEMM in cuBLASLt, with or without a bias (and ReLU) epilogue
    /// (`bias` 0 without).
    CublasLt {
        call: Box<LtGemm>,
        scale: Scale,
        a: u64,
        b: u64,
        c: u64,
        bias: u64,
        /// Which of cuBLASLt's workspaces it uses.
        workspace: usize,
    },
}

struct Ready {
    /// `kernel `k3`` or `GEMM 64x128x32 (batch 1) in cuBLASLt, algorithm #2
    /// of 8 by timing: …`, for messages and [`Executor::gemm_steps`].
    label: String,
    work: Work,
    /// A generated GEMM kernel that splits k (it uses the split arenas).
    split_k: bool,
    /// It is one of the plan's GEMM steps.
    gemm: bool,
}

impl Ready {
    /// Memory it uses that the plan does not know of.
    fn shares(&self) -> Option<Shared> {
        match &self.work {
            Work::Kernel(_) => self.split_k.then_some(Shared::SplitArenas),
            Work::Cublas { .. } | Work::CublasPointers { .. } => Some(Shared::Cublas),
            Work::CublasLt { workspace, .. } => Some(Shared::Lt(*workspace)),
        }
    }
}

/// Memory outside the plan's arenas, or in arenas its steps share without
/// the plan ordering them: two steps that use the same run one after the
/// other, whatever the plan allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shared {
    /// The `split_f32` / `split_u32` arenas of generated split-K GEMM
    /// kernels (the runtime picks which GEMMs run in those).
    SplitArenas,
    /// cuBLAS's workspace.
    Cublas,
    /// One of cuBLASLt's workspaces.
    Lt(usize),
}

struct Entry {
    plan: &'static Plan,
    steps: Vec<Ready>,
    graph: Option<Graph>,
    /// For each step, the steps it waits for in the entry's graph: the
    /// plan's order and one step after another on [`Shared`] memory (`None`:
    /// the steps in order, as when the plan gives no order or branches are
    /// off).
    after: Option<Vec<Vec<usize>>>,
    /// How its graph runs the steps, once captured with branches allowed
    /// ([`branches::capture_faster`]'s line).
    branches: Option<String>,
    /// Calls so far (the first runs plain launches, the second captures).
    calls: u64,
    /// Some step gets the `flags_u32` arena: zero it before, check it after.
    uses_flags: bool,
}

impl Entry {
    /// Whether its next call runs as a CUDA graph: captured on the second
    /// call, replayed after (the first runs plain launches).
    fn replays_next(&self, options: &Options) -> bool {
        options.graphs && !options.sync_each && self.calls >= 1 && !self.steps.is_empty()
    }
}

/// The arena gather and scatter kernels flag an id out of range in.
const FLAGS: &str = "flags_u32";

/// The largest device input a graph copies itself ([`Options::graph_inputs`]).
/// The driver may run a graph's copy node as a kernel of 4-byte words: on an
/// H200, 1 GiB took 843 µs that way against 507 µs as a copy queued on the
/// stream (`gpu-s14c.json`), so past a few MiB the node's slower copy costs
/// more than the host call it saves (~4.6 µs).
const GRAPH_COPY_MAX_BYTES: usize = 4 << 20;

/// The arenas whose contents outlive a call (`train` updates them).
const PERSISTENT: [&str; 2] = ["param", "state"];

/// A module's device code, arenas and plans, ready to run.
pub struct Executor {
    // Fields drop in this order: graphs, cuBLAS, the ids' flag, module, arenas, device.
    entries: Vec<Entry>,
    blas: Option<Blas>,
    /// cuBLASLt, for GEMMs with a bias epilogue (when cuBLAS is in use and it loads).
    blaslt: Option<BlasLt>,
    /// Why cuBLASLt is not in use, when it is not.
    why_no_blaslt: String,
    /// The checked copy of ids given in device memory, when an input holds ids.
    ids: Option<IdsCheck>,
    /// Where kernels write the `flags_u32` arena (gather/scatter ids out of
    /// range): mapped host memory, zeroed and read by the host between calls.
    flags: Option<MappedWords>,
    /// [`Executor::run_scalar`]'s result, copied here (pinned) before the wait.
    scalar: MappedWords,
    module: Module,
    arenas: Vec<Arena>,
    /// [`Executor::run_steps`]'s results, one f32 per run: kept from call to
    /// call (grown when a call runs more), since allocating and freeing device
    /// memory costs ~100 µs a call, as much as a small model's steps.
    step_results: Option<DeviceBuffer>,
    /// Per arena, the last device-array address found on this device for it
    /// (0 for none): [`Executor::input_arena`] asks the driver only for another.
    checked_inputs: Vec<AtomicU64>,
    options: Options,
    /// Why steps cannot run as parallel branches here, if they cannot.
    why_no_branches: Option<String>,
    gemm_backend: &'static str,
    gemm_report: String,
    device: Device,
}

// SAFETY: the raw pointers inside (kernel parameter blocks) point into heap
// memory the executor owns; CUDA handles are used with the context bound on
// the calling thread. Running steps (kernel parameter blocks, the cuBLAS
// handle, graphs) needs `&mut self`; what `&self` allows from several threads
// at once — copies to and from arenas queued on the stream — the driver API
// makes thread-safe.
unsafe impl Send for Executor {}
unsafe impl Sync for Executor {}

impl Executor {
    /// Opens the device, JIT-compiles `ptx`, allocates every arena (zeroed)
    /// and makes every plan ready.
    ///
    /// # Errors
    /// [`Error::NoDevice`] without a usable GPU; [`Error::Device`] when the
    /// PTX does not compile (with the JIT log) or a kernel is missing;
    /// [`Error::DeviceAlloc`] when the arenas do not fit; [`Error::Layout`]
    /// for a plan that does not fit its arenas (a ferrograd bug).
    pub fn new(
        ptx: &str,
        arenas: &'static [ArenaSpec],
        plans: &'static [Plan],
        options: Options,
    ) -> Result<Executor, Error> {
        let device = Device::new(options.device)?;
        let module = Module::load_ptx(&device, ptx)?;
        let ids = if arenas.iter().any(|a| a.id_bound.is_some()) {
            Some(IdsCheck::new(&module, &device)?)
        } else {
            None
        };
        let flags = arenas
            .iter()
            .find(|a| a.name == FLAGS)
            .map(|a| MappedWords::new(&device, a.len, "the gather/scatter error flags"))
            .transpose()?;
        let scalar = MappedWords::new(&device, 1, "a step's scalar result")?;
        let mut allocated = Vec::with_capacity(arenas.len());
        for spec in arenas {
            let bytes = spec
                .len
                .checked_mul(spec.elem.bytes())
                .ok_or(Error::Alloc { bytes: usize::MAX })?;
            let buf = device.alloc_zeroed(bytes, &format!("arena `{}`", spec.name))?;
            allocated.push(Arena { spec: *spec, buf });
        }
        let (blas, why_not) = match options.gemm {
            GemmMode::Kernel => (None, "gemm=\"kernel\" was asked for".to_string()),
            mode => match Blas::new(&device, options.tf32) {
                Ok(blas) => (Some(blas), String::new()),
                Err(why) if mode == GemmMode::Cublas => {
                    return Err(Error::Device(format!("gemm=\"cublas\": {why}")))
                }
                Err(why) => (None, why),
            },
        };
        let (blaslt, why_no_blaslt) = match &blas {
            None => (None, "cuBLAS is not in use".to_string()),
            Some(_) => match BlasLt::new(&device, options.tf32) {
                Ok(lt) => (Some(lt), String::new()),
                Err(why) => (None, why),
            },
        };
        let mut exec = Executor {
            entries: Vec::new(),
            blas,
            blaslt,
            why_no_blaslt,
            ids,
            flags,
            scalar,
            module,
            arenas: allocated,
            step_results: None,
            checked_inputs: arenas.iter().map(|_| AtomicU64::new(0)).collect(),
            options,
            why_no_branches: why_no_branches(),
            gemm_backend: "none",
            gemm_report: String::new(),
            device,
        };
        exec.prepare(plans, &why_not)?;
        exec.device
            .synchronize(|| "initializing the arenas".into())?;
        Ok(exec)
    }

    /// Makes every step ready. This runs inside [`Executor::new`], before
    /// any entry point has run, so no graph capture is under way: GEMMs are
    /// autotuned here (their candidates run on the stream).
    fn prepare(&mut self, plans: &'static [Plan], why_no_cublas: &str) -> Result<(), Error> {
        let mut functions: HashMap<&'static str, (Function, u32)> = HashMap::new();
        let mut prep = GemmPrep::new(&self.options, self.blaslt.is_some(), &self.device);
        for plan in plans {
            let mut steps = Vec::with_capacity(plan.steps.len());
            for (i, step) in plan.steps.iter().enumerate() {
                let ready = match step {
                    Step::Launch(launch) => self.kernel(launch, &mut functions)?,
                    Step::Gemm(gemm) => {
                        let at = || format!("GEMM step {i} of `{}`", plan.entry);
                        match self.cublas(gemm, &at(), &mut prep, &mut functions)? {
                            Ok(ready) => ready,
                            Err(why) => {
                                let Some(fallback) = &gemm.fallback else {
                                    return Err(Error::layout(format!(
                                        "{}: cuBLAS cannot run it ({why}) and the plan has no \
                                         fallback kernel",
                                        at()
                                    )));
                                };
                                prep.tally.kernel.push(format!("{} ({why})", at()));
                                self.kernel(fallback, &mut functions)?
                            }
                        }
                    }
                };
                steps.push(Ready {
                    gemm: matches!(step, Step::Gemm(_)),
                    ..ready
                });
            }
            let flagged = |args: &[Arg]| {
                args.iter()
                    .any(|a| matches!(a, Arg::Buf(r) if r.arena == FLAGS))
            };
            let uses_flags = plan.steps.iter().any(|s| match s {
                Step::Launch(l) => flagged(l.args),
                Step::Gemm(g) => g.fallback.is_some_and(|l| flagged(l.args)),
            });
            let branches = self.options.branches && self.why_no_branches.is_none();
            let after = step_order(plan, &mut steps, branches)?;
            self.entries.push(Entry {
                plan,
                steps,
                graph: None,
                after,
                branches: None,
                calls: 0,
                uses_flags,
            });
        }
        // Kernels that need more than the default 48 KiB of dynamic shared memory.
        for (name, (function, shared)) in functions {
            if shared > 48 * 1024 {
                use sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX;
                // SAFETY: a live function of our module.
                check(
                    unsafe { sys::cuFuncSetAttribute(function.raw, MAX, shared as i32) }.result(),
                    || format!("kernel `{name}`: allowing {shared} bytes of shared memory"),
                )?;
            }
        }
        let tuning = prep.finish();
        (self.gemm_backend, self.gemm_report) =
            gemm_report(&prep.tally, self.blas.is_some(), why_no_cublas, &tuning);
        Ok(())
    }

    fn arena(&self, name: &str) -> Result<&Arena, Error> {
        self.arenas
            .iter()
            .find(|a| a.spec.name == name)
            .ok_or_else(|| Error::layout(format!("the plan names no arena `{name}`")))
    }

    /// The device address of `r`, checking that `[offset, offset + len)` lies
    /// in its arena (`len` 1 for a kernel argument, whose extent only the
    /// kernel knows; an empty arena gives address 0).
    fn address(&self, r: &BufferRef, len: usize, what: &str) -> Result<u64, Error> {
        let arena = self.arena(r.arena)?;
        let empty = arena.spec.len == 0 && r.offset == 0;
        let fits = r
            .offset
            .checked_add(len)
            .is_some_and(|end| end <= arena.spec.len);
        if !(fits || empty) {
            return Err(Error::layout(format!(
                "{what}: elements [{}, {} + {len}) lie outside arena `{}` of {} elements",
                r.offset, r.offset, r.arena, arena.spec.len
            )));
        }
        match &self.flags {
            // the flags live in mapped host memory (the arena stays unused)
            Some(flags) if r.arena == FLAGS => flags.device_ptr(r.offset, what),
            _ => Ok(arena.buf.ptr() + (r.offset * arena.spec.elem.bytes()) as u64),
        }
    }

    fn kernel(
        &self,
        launch: &Launch,
        functions: &mut HashMap<&'static str, (Function, u32)>,
    ) -> Result<Ready, Error> {
        let function = match functions.get_mut(launch.kernel) {
            Some((f, shared)) => {
                *shared = (*shared).max(launch.shared_bytes);
                *f
            }
            None => {
                let f = self.module.function(launch.kernel)?;
                functions.insert(launch.kernel, (f, launch.shared_bytes));
                f
            }
        };
        let what = format!("kernel `{}`", launch.kernel);
        let mut slots = Vec::with_capacity(launch.args.len());
        for (i, arg) in launch.args.iter().enumerate() {
            slots.push(match *arg {
                Arg::Buf(r) => self.address(&r, 1, &format!("{what}, argument {i}"))?,
                Arg::U32(v) => u64::from(v),
                Arg::S32(v) => u64::from(v as u32),
                Arg::F32(v) => u64::from(v.to_bits()),
            });
        }
        let mut slots = slots.into_boxed_slice();
        let params = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        Ok(Ready {
            label: what,
            work: Work::Kernel(KernelCall {
                function,
                grid: launch.grid,
                block: launch.block,
                shared_bytes: launch.shared_bytes,
                slots,
                params,
            }),
            split_k: false,
            gemm: false,
        })
    }

    /// The cuBLAS or cuBLASLt call for `gemm` (autotuned when `prep` has a
    /// tuner), or (inner `Err`) why neither can run it.
    fn cublas(
        &self,
        gemm: &Gemm,
        what: &str,
        prep: &mut GemmPrep,
        functions: &mut HashMap<&'static str, (Function, u32)>,
    ) -> Result<Result<Ready, String>, Error> {
        if gemm.bias.is_some() && gemm.beta != 0.0 {
            // The plan's contract (launch_plan.py): a bias epilogue only on a
            // C that is written, not accumulated into.
            return Err(Error::layout(format!(
                "{what}: a bias epilogue with beta {} (only 0 is planned)",
                gemm.beta
            )));
        }
        let operands = [
            (&gemm.a, gemm.m, gemm.k, gemm.a_strides, "A"),
            (&gemm.b, gemm.k, gemm.n, gemm.b_strides, "B"),
            (&gemm.c, gemm.m, gemm.n, gemm.c_strides, "C"),
        ];
        let mut addresses = [0u64; 3];
        let mut extents = [0usize; 3];
        for ((slot, span), (r, rows, cols, strides, name)) in
            addresses.iter_mut().zip(&mut extents).zip(operands)
        {
            let arena = self.arena(r.arena)?;
            if arena.spec.elem != Elem::F32 {
                return Err(Error::layout(format!(
                    "{what}: operand {name} is in the {} arena `{}`",
                    arena.spec.elem.name(),
                    r.arena
                )));
            }
            let outer_stride = match name {
                "A" => gemm.outer_strides[0],
                "B" => gemm.outer_strides[1],
                _ => gemm.outer_strides[2],
            };
            let len = extent(gemm.batch, rows, cols, strides)
                .and_then(|len| {
                    let last = gemm
                        .outer
                        .max(1)
                        .checked_sub(1)?
                        .checked_mul(outer_stride)?;
                    len.checked_add(last)
                })
                .ok_or_else(|| {
                    Error::layout(format!("{what}: operand {name}'s extent overflows"))
                })?;
            *slot = self.address(r, len, &format!("{what}, operand {name}"))?;
            *span = len;
        }
        if self.blas.is_none() {
            return Ok(Err("cuBLAS is not in use".into()));
        }
        let call = match cublas_layout(&GemmShape::from(gemm)) {
            Ok(call) => call,
            Err(why) => return Ok(Err(why)),
        };
        let [a, b, c] = addresses;
        let (a, b) = if call.swap { (b, a) } else { (a, b) };
        if gemm.outer > 1 {
            if gemm.bias.is_some() {
                return Ok(Err("a bias epilogue with an outer batch level".into()));
            }
            prep.tally.pointers += 1;
            return self.cublas_pointers(gemm, call, addresses, what).map(Ok);
        }
        let lt = self.cublaslt(gemm, call, [a, b, c], extents[2], what, prep, functions)?;
        match lt {
            Ok(ready) => Ok(Ok(ready)),
            Err(why) if gemm.bias.is_some() => Ok(Err(why)),
            Err(why) => {
                prep.tally.no_lt(why);
                Ok(Ok(self.sgemm(gemm, call, [a, b, c], "")))
            }
        }
    }

    /// `gemm` as one `cublasSgemmStridedBatched` call (`a`, `b` in cuBLAS's
    /// order); `how` ends its label.
    fn sgemm(&self, gemm: &Gemm, call: CublasGemm, [a, b, c]: [u64; 3], how: &str) -> Ready {
        Ready {
            label: format!(
                "GEMM {}x{}x{} (batch {}{}) in cuBLAS{how}",
                gemm.m,
                gemm.n,
                gemm.k,
                gemm.batch,
                scaling(gemm)
            ),
            work: Work::Cublas {
                call,
                scale: Scale::from(gemm),
                a,
                b,
                c,
            },
            split_k: false,
            gemm: false,
        }
    }

    /// A GEMM with an outer batch level as one `cublasSgemmBatched` call: the
    /// address of every product's A, B and C, computed once and kept on the
    /// device (the arenas never move, so a captured graph can replay it).
    fn cublas_pointers(
        &self,
        gemm: &Gemm,
        call: CublasGemm,
        [a, b, c]: [u64; 3],
        what: &str,
    ) -> Result<Ready, Error> {
        let count = gemm.outer * gemm.batch;
        let item = |base: u64, outer: usize, inner: usize, o: usize, p: usize| {
            base + 4 * (o * outer + p * inner) as u64
        };
        let mut pointers = Vec::with_capacity(3 * count);
        for (base, k) in [(a, 0), (b, 1), (c, 2)] {
            let strides = [gemm.a_strides, gemm.b_strides, gemm.c_strides][k];
            for o in 0..gemm.outer {
                for p in 0..gemm.batch {
                    pointers.push(item(base, gemm.outer_strides[k], strides[0], o, p));
                }
            }
        }
        let (a_at, b_at) = if call.swap { (count, 0) } else { (0, count) };
        let reordered: Vec<u64> = [a_at, b_at, 2 * count]
            .iter()
            .flat_map(|&at| pointers[at..at + count].iter().copied())
            .collect();
        let buf = self
            .device
            .alloc_zeroed(8 * reordered.len(), &format!("{what}: its pointer arrays"))?;
        buf.write(0, &reordered, &format!("{what}: its pointer arrays"))?;
        Ok(Ready {
            label: format!(
                "GEMM {}x{}x{}x{} (outer x batch{}) in cuBLAS",
                gemm.outer,
                gemm.batch,
                gemm.m,
                gemm.n,
                scaling(gemm)
            ),
            work: Work::CublasPointers {
                call,
                scale: Scale::from(gemm),
                pointers: buf,
                count,
            },
            split_k: false,
            gemm: false,
        })
    }

    /// The cuBLASLt call for a GEMM without an outer batch level (`a`, `b` in
    /// cuBLAS's order; C's extent `c_len` elements), its algorithm the
    /// heuristic's first or, with a tuner, the fastest candidate — which may
    /// be plain cuBLAS for a GEMM without an epilogue; or (inner `Err`) why
    /// cuBLASLt cannot run it. cuBLASLt adds a bias along the rows of its
    /// column-major D, which are the plan's columns only when the product was
    /// swapped into `Cᵀ = Bᵀ·Aᵀ` (a row-major C, the usual case). With a
    /// tuner, the plan's generated GEMM kernels compete too.
    #[allow(clippy::too_many_arguments)]
    fn cublaslt(
        &self,
        gemm: &Gemm,
        call: CublasGemm,
        [a, b, c]: [u64; 3],
        c_len: usize,
        what: &str,
        prep: &mut GemmPrep,
        functions: &mut HashMap<&'static str, (Function, u32)>,
    ) -> Result<Result<Ready, String>, Error> {
        let bias = match &gemm.bias {
            Some(r) => {
                if self.arena(r.arena)?.spec.elem != Elem::F32 {
                    return Err(Error::layout(format!("{what}: the bias is not f32")));
                }
                Some(self.address(r, gemm.n, &format!("{what}, its bias"))?)
            }
            None => None,
        };
        let Some(lt) = &self.blaslt else {
            return Ok(Err(match bias {
                Some(_) => format!("a bias epilogue needs cuBLASLt: {}", self.why_no_blaslt),
                None => self.why_no_blaslt.clone(),
            }));
        };
        if bias.is_some() && !call.swap {
            return Ok(Err("a bias epilogue on a column-major C".into()));
        }
        let epilogue = match (bias, gemm.relu) {
            (None, _) => LtEpilogue::Plain,
            (Some(_), false) => LtEpilogue::Bias,
            (Some(_), true) => LtEpilogue::ReluBias,
        };
        let mut p = match lt.prepare(&call, epilogue) {
            Ok(p) => p,
            Err(why) => return Ok(Err(why)),
        };
        let (bias, scale) = (bias.unwrap_or(0), Scale::from(gemm));
        let mut tiled = Vec::new();
        if prep.tuner.is_some() {
            for launch in gemm.tiled {
                tiled.push((launch, self.kernel(launch, functions)?));
            }
        }
        let tuned = match &mut prep.tuner {
            Some(tuner) if !p.is_empty() => {
                // Plain cuBLAS competes for a GEMM it can run alone.
                let blas = self.blas.as_ref().filter(|_| epilogue == LtEpilogue::Plain);
                let device = &self.device;
                let mut kernels: Vec<KernelCandidate<'_>> = tiled
                    .iter()
                    .map(|(launch, ready)| KernelCandidate {
                        name: tiled_name(gemm, launch),
                        run: Box::new(move |stand_in| {
                            launch_with_c(ready, device, stand_in).map_err(|e| e.to_string())
                        }),
                    })
                    .collect();
                // SAFETY: every operand's extent was checked against its
                // arena (the bias: n elements); C is replaced by scratch of
                // its extent while timing.
                let tuned = unsafe {
                    tuner.tune(
                        lt,
                        &mut p,
                        &call,
                        blas,
                        scale,
                        [a, b, c, bias],
                        4 * c_len,
                        &mut kernels,
                    )
                }
                .map_err(|e| match e {
                    Error::Device(m) => Error::Device(format!("{what}: autotuning it: {m}")),
                    e => e,
                })?;
                match tuned {
                    Ok(tuned) => Some(tuned),
                    Err(why) => return Ok(Err(why)),
                }
            }
            _ => None,
        };
        if tuned.is_none() && epilogue == LtEpilogue::Plain && self.blas.is_some() {
            // Untimed (autotune off), a GEMM without an epilogue keeps
            // cuBLAS's own choice, as before cuBLASLt ran any.
            prep.tally.untimed_in_cublas();
            return Ok(Ok(self.sgemm(gemm, call, [a, b, c], "")));
        }
        prep.tally.count(epilogue, tuned.as_ref());
        if let Some(k) = tuned.as_ref().and_then(Tuned::kernel) {
            let how = tuned.as_ref().map(Tuned::describe).unwrap_or_default();
            let (launch, ready) = tiled.swap_remove(k);
            return Ok(Ok(Ready {
                label: format!(
                    "GEMM {}x{}x{} (batch {}{}) in a generated kernel {how}",
                    gemm.m,
                    gemm.n,
                    gemm.k,
                    gemm.batch,
                    scaling(gemm)
                ),
                work: ready.work,
                split_k: splits(gemm, launch) > 1,
                gemm: true,
            }));
        }
        let how = match &tuned {
            Some(t) => format!(", {}", t.describe()),
            None if p.is_empty() => String::new(),
            None => ", the heuristic's first algorithm".to_string(),
        };
        if tuned.as_ref().is_some_and(Tuned::is_cublas) {
            return Ok(Ok(self.sgemm(gemm, call, [a, b, c], &how)));
        }
        let epilogue = match epilogue {
            LtEpilogue::Plain => "",
            LtEpilogue::Bias => " with a bias epilogue",
            LtEpilogue::ReluBias => " with a bias + ReLU epilogue",
        };
        Ok(Ok(Ready {
            label: format!(
                "GEMM {}x{}x{} (batch {}{}){epilogue} in cuBLASLt{how}",
                gemm.m,
                gemm.n,
                gemm.k,
                gemm.batch,
                scaling(gemm)
            ),
            work: Work::CublasLt {
                call: Box::new(p),
                scale,
                a,
                b,
                c,
                bias,
                workspace: 0,
            },
            split_k: false,
            gemm: false,
        }))
    }

    fn entry_index(&self, entry: &str) -> Result<usize, Error> {
        self.entries
            .iter()
            .position(|e| e.plan.entry == entry)
            .ok_or_else(|| Error::layout(format!("the module has no entry point `{entry}`")))
    }

    /// Runs `entry`: copies `inputs` (by name, into the arenas `input:<name>`;
    /// from the host, or device to device after waiting for the producer's
    /// stream),
    /// runs the steps (replaying the entry's graph when graphs are on) and
    /// waits for the GPU.
    ///
    /// # Errors
    /// [`Error::Device`] naming the kernel or step that failed to launch, or,
    /// for a failure only seen when waiting (an illegal address, say), the
    /// entry point, with how to find the kernel (`sync_each`). After such a
    /// failure the CUDA context may be unusable (the driver's rule): create
    /// the step again in a new process.
    pub fn run(&mut self, entry: &str, inputs: &[(&str, Feed<'_>)]) -> Result<(), Error> {
        self.run_reading(entry, inputs, None)
    }

    /// [`Executor::run`], returning `entry`'s result `key`, one f32 (`out:loss`
    /// of `train`): copied into pinned memory before the wait, so that no copy
    /// (and no second wait) follows it.
    ///
    /// # Errors
    /// As [`Executor::run`]; [`Error::Layout`] when `key` is not one f32.
    pub fn run_scalar(
        &mut self,
        entry: &str,
        inputs: &[(&str, Feed<'_>)],
        key: &str,
    ) -> Result<f32, Error> {
        let source = self.scalar_result(entry, key)?;
        self.run_reading(entry, inputs, Some(source))?;
        Ok(f32::from_bits(self.scalar.read(0)))
    }

    /// [`Executor::run`], then (queued) a copy of the f32 at `scalar` into
    /// `self.scalar`.
    fn run_reading(
        &mut self,
        entry: &str,
        inputs: &[(&str, Feed<'_>)],
        scalar: Option<u64>,
    ) -> Result<(), Error> {
        self.device.bind()?;
        let index = self.entry_index(entry)?;
        self.clear_ids();
        let queued = self
            .queue_inputs(index, inputs, None)
            .and_then(|captured| {
                let flags = self.zero_flags(index)?;
                self.enqueue_entry(index, &captured).map(|()| flags)
            })
            .and_then(|flags| match scalar {
                Some(source) => self.copy_scalar(source).map(|()| flags),
                None => Ok(flags),
            });
        // Waited for even after a failure: no copy may read the inputs after the call.
        let steps = self.entries[index].steps.len();
        let waited = self
            .device
            .synchronize(|| format!("running `{entry}` ({steps} steps; {UNKNOWN_KERNEL})"));
        let flags = queued?;
        waited?;
        self.check_ids(|| format!("`{entry}`"))?;
        if flags {
            self.check_flags(|| format!("`{entry}`"))?;
        }
        Ok(())
    }

    /// Runs `entry` `count` times back to back, on `count` batches, and
    /// returns the f32 scalar result `result` (`out:loss` of `train`) of each
    /// run, with one wait for all of them.
    ///
    /// Every input holds `count` batches stacked along its leading axis. Run
    /// k copies batch k of each input into its arena (as [`Executor::run`]
    /// does), queues the entry's steps (the launches or graph replay of
    /// `run`), then a device-to-device copy of the result into slot k of a
    /// device buffer of `count` floats that the call owns. After the last
    /// run: one wait, and the results come back in one copy. Before anything
    /// runs, the inputs are checked (each splits into `count` batches that fit
    /// its arena, on this device) and each device input's producer is waited
    /// for, once. The gather/scatter flag is zeroed once before the first run
    /// and checked once after the last.
    ///
    /// # Errors
    /// As [`Executor::run`], and [`Error::Input`] for `count` 0. A failure to
    /// launch run k names it; the runs before it were queued and are waited
    /// for before the error returns (nothing queued outlives the call), so
    /// their updates are applied, and run k's perhaps in part. An id out of
    /// range is found after all runs, and the error says it was in one of
    /// them.
    pub fn run_steps(
        &mut self,
        entry: &str,
        count: usize,
        inputs: &[(&str, Feed<'_>)],
        result: &str,
    ) -> Result<Vec<f32>, Error> {
        if count == 0 {
            return Err(Error::Input(format!(
                "`{entry}` on 0 batches: at least one is needed"
            )));
        }
        self.device.bind()?;
        let index = self.entry_index(entry)?;
        let source = self.scalar_result(entry, result)?;
        for &(name, data) in inputs {
            self.input_arena(name, stacked_batch(name, data, 0, count)?)?;
        }
        let mut stacked = Vec::with_capacity(inputs.len());
        for &(name, data) in inputs {
            stacked.push((name, self.after_producer(name, data)?));
        }
        let what = "the results of run_steps";
        let results = match self.step_results.take() {
            Some(buf) if buf.bytes() >= 4 * count => buf,
            _ => self.device.alloc_zeroed(4 * count, what)?,
        };
        self.clear_ids();
        let flags = self.zero_flags(index)?;
        let queued = (0..count).try_for_each(|k| {
            self.run_batch(index, &stacked, (k, count), &results, source)
                .map_err(|err| in_step(err, k, count))
        });
        // Waited for even after a failure: no copy may read the inputs after the call.
        let steps = self.entries[index].steps.len();
        let waited = self.device.synchronize(|| {
            format!("running `{entry}` {count} times ({steps} steps each; {UNKNOWN_KERNEL})")
        });
        queued?;
        waited?;
        self.check_ids(|| format!("one of the {count} runs of `{entry}`"))?;
        if flags {
            self.check_flags(|| format!("one of the {count} runs of `{entry}`"))?;
        }
        let mut out = vec![0f32; count];
        results.read(0, &mut out, what)?;
        self.step_results = Some(results);
        Ok(out)
    }

    /// Queues run `k` of `count` of [`Executor::run_steps`]: batch k of every
    /// input into its arena, the entry's steps, the result into slot k.
    fn run_batch(
        &mut self,
        index: usize,
        stacked: &[(&str, Feed<'_>)],
        (k, count): (usize, usize),
        results: &DeviceBuffer,
        source: u64,
    ) -> Result<(), Error> {
        let captured = self.queue_inputs(index, stacked, Some((k, count)))?;
        let entry = &self.entries[index];
        if entry.graph.is_none() && entry.replays_next(&self.options) {
            // As between `run`'s first call and its second: the plain launches
            // (which load what the driver and cuBLAS load lazily) finish first.
            self.device
                .synchronize(|| format!("running `{}` before its capture", entry.plan.entry))?;
        }
        self.enqueue_entry(index, &captured)?;
        results.copy_from_device_at_async::<f32>(k, source, 1, "a result")
    }

    /// Queues one call of entry `index`'s steps: plain launches on its first
    /// call; with graphs on, captured into a CUDA graph on its second and
    /// replayed from then on; with `sync_each`, one step at a time, waiting
    /// after each so that a failure names it. A graph captured now starts
    /// with the copies of `captured` (device inputs: their arena's index and
    /// the array), which [`Executor::queue_inputs`] left to it.
    fn enqueue_entry(
        &mut self,
        index: usize,
        captured: &[(usize, DeviceArray)],
    ) -> Result<(), Error> {
        let Executor {
            entries,
            blas,
            blaslt,
            device,
            options,
            arenas,
            ids,
            ..
        } = self;
        let inputs = || {
            captured
                .iter()
                .map(|&(at, array)| {
                    let arena = &arenas[at];
                    let copy = input_copy(ids.as_ref(), at, arena, array)?;
                    InputNode::capture(device, at, copy, array.ptr, arena.spec.name)
                })
                .collect::<Result<Vec<_>, Error>>()
        };
        let entry = &mut entries[index];
        let replay = entry.replays_next(options);
        entry.calls += 1;
        let name = entry.plan.entry;
        let libraries = (blas.as_ref(), blaslt.as_ref());
        if options.sync_each {
            for step in &entry.steps {
                enqueue(step, device, libraries)?;
                device.synchronize(|| format!("running {} of `{name}`", step.label))?;
            }
        } else if replay {
            // built only when a graph is captured: a replay allocates nothing
            let what = || format!("`{name}`");
            let steps = &entry.steps;
            let graph = match (&mut entry.graph, &entry.after) {
                (Some(graph), _) => graph,
                (slot, Some(after)) => {
                    let persistent: Vec<Persistent> = arenas
                        .iter()
                        .filter(|a| PERSISTENT.contains(&a.spec.name))
                        .map(|a| (a.buf.ptr(), a.buf.bytes()))
                        .collect();
                    let schedules = [
                        ("in parallel branches", after.clone()),
                        (
                            "in branches beside the GEMMs in order",
                            gemms_in_order(after, steps),
                        ),
                    ];
                    let (graph, how) = branches::capture_faster(
                        device,
                        &what(),
                        steps.len(),
                        &schedules,
                        &persistent,
                        inputs,
                        |i| enqueue(&steps[i], device, libraries),
                    )?;
                    entry.branches = Some(how);
                    slot.insert(graph)
                }
                (slot, None) => {
                    slot.insert(Graph::capture_inputs(device, &what(), inputs, || {
                        steps.iter().try_for_each(|s| enqueue(s, device, libraries))
                    })?)
                }
            };
            graph.launch(name)?;
        } else {
            for step in &entry.steps {
                enqueue(step, device, libraries)?;
            }
        }
        Ok(())
    }

    /// Sets `flags_u32[0] = 0` (mapped host memory, from the host) when entry
    /// `index` has a gather or scatter step, and says whether it did (the
    /// flag is then checked after the call). Outside the entry's graph, so
    /// that `run_steps` zeroes it once for all its runs.
    fn zero_flags(&self, index: usize) -> Result<bool, Error> {
        let Some(flags) = self
            .flags
            .as_ref()
            .filter(|_| self.entries[index].uses_flags)
        else {
            return Ok(false);
        };
        // From the host: the previous call's kernels were waited for.
        flags.write(0, 0);
        Ok(true)
    }

    /// The device address of `entry`'s result `key`, which must be one f32
    /// (a loss).
    fn scalar_result(&self, entry: &str, key: &str) -> Result<u64, Error> {
        let spec = self.result_spec(entry, key)?;
        let what = format!("`{entry}`'s result `{key}`");
        if spec.len() != 1 || self.arena(spec.arena)?.spec.elem != Elem::F32 {
            return Err(Error::layout(format!("{what} is not one f32")));
        }
        self.address(&BufferRef::new(spec.arena, spec.offset), 1, &what)
    }

    /// `data` after queueing a wait for its producer's stream, when it is a
    /// device array: its batches then need no wait of their own.
    fn after_producer<'a>(&self, name: &str, data: Feed<'a>) -> Result<Feed<'a>, Error> {
        match data {
            Feed::Device(elem, array) if array.len > 0 => {
                self.device
                    .wait_for(array.stream, &format!("input `{name}`"))?;
                let stream = ProducerStream::Ready;
                Ok(Feed::Device(elem, DeviceArray { stream, ..array }))
            }
            other => Ok(other),
        }
    }

    /// Reads the gather/scatter flag after the work of `what` (an entry point).
    /// Raises when a gather or scatter kernel set the error flag; `what` names
    /// the call (formatted only then: a step allocates nothing).
    fn check_flags(&self, what: impl FnOnce() -> String) -> Result<(), Error> {
        if self.flags.as_ref().is_some_and(|f| f.read(0) != 0) {
            return Err(Error::Device(format!(
                "{}: a gather or scatter kernel met an id out of range (it used 0 \
                 instead of reading or writing out of bounds); the results of this call are \
                 wrong",
                what()
            )));
        }
        Ok(())
    }

    /// Queues a copy of the f32 at device address `source` into `self.scalar`.
    fn copy_scalar(&self, source: u64) -> Result<(), Error> {
        // SAFETY: `self.scalar` is 4 bytes of pinned host memory, `source` one
        // f32 inside an arena (`scalar_result` checked it).
        let status = unsafe {
            sys::cuMemcpyDtoHAsync_v2(self.scalar.host_ptr(), source, 4, self.device.stream())
        };
        check(status.result(), || {
            "queueing the copy of a step's result".into()
        })
    }

    /// Forgets ids flagged by an earlier call (whose error was raised).
    fn clear_ids(&self) {
        if let Some(ids) = &self.ids {
            ids.clear();
        }
    }

    /// Raises when a checked copy of ids given in device memory met one out
    /// of range during `what` (formatted only then), after its wait.
    fn check_ids(&self, what: impl FnOnce() -> String) -> Result<(), Error> {
        let Some(tag) = self.ids.as_ref().map(IdsCheck::flagged).filter(|&t| t != 0) else {
            return Ok(());
        };
        let (name, bound) = self
            .arenas
            .get(tag as usize - 1)
            .and_then(|a| Some((a.spec.name.strip_prefix("input:")?, a.spec.id_bound?)))
            .ok_or_else(|| Error::layout(format!("the ids' flag holds {tag}, no input's tag")))?;
        Err(Error::Input(format!(
            "input '{name}': an id outside [0, {bound}) in the device array given for it, \
             found as it was copied in for {}; the step ran with it as it was, so the results \
             of this call are wrong (a training step's update included)",
            what()
        )))
    }

    /// Queues what `inputs` (with `batch` `(k, count)`: batch k of each of
    /// these stacked inputs) need before entry `index`'s steps run, once each
    /// is checked to fit its arena: a wait for each producer stream of a
    /// device array (once per stream), then each input's copy into its arena —
    /// the entry's graph's own copy pointed at it when the graph has one for
    /// that input (disabled for an input from the host, copied here instead),
    /// else a copy queued here. Returns the device inputs the graph captured
    /// next copies itself (their arena's index and the array): none unless
    /// this call captures it, with `graph_inputs` on, and only those of at
    /// most [`GRAPH_COPY_MAX_BYTES`]. Allocates nothing but that list.
    fn queue_inputs(
        &mut self,
        index: usize,
        inputs: &[(&str, Feed<'_>)],
        batch: Option<(usize, usize)>,
    ) -> Result<Vec<(usize, DeviceArray)>, Error> {
        let entry = &self.entries[index];
        let capturing =
            self.options.graph_inputs && entry.graph.is_none() && entry.replays_next(&self.options);
        let mut captured = Vec::new();
        for (i, &(name, data)) in inputs.iter().enumerate() {
            let data = match batch {
                Some((k, count)) => stacked_batch(name, data, k, count)?,
                None => data,
            };
            let (at, arena) = self.input_arena(name, data)?;
            let what = arena.spec.name;
            let array = match data {
                Feed::Device(_, array) if array.len > 0 => Some(array),
                _ => None,
            };
            if let Some(array) = array {
                // A batch keeps its stacked array's stream, so the earlier inputs
                // as given say which streams were waited for.
                let waited = inputs[..i].iter().any(|&(_, d)| {
                    matches!(d, Feed::Device(_, a) if a.len > 0 && a.stream == array.stream)
                });
                if !waited {
                    self.device.wait_for(array.stream, what)?;
                }
            }
            if let Some(graph) = self.entries[index].graph.as_mut() {
                let (nodes, exec) = graph.inputs();
                if let Some(node) = nodes.iter_mut().find(|n| n.arena == at) {
                    match array {
                        Some(array) => {
                            node.feed(exec, &self.device, array.ptr, what)?;
                            continue;
                        }
                        None => node.skip(exec, what)?,
                    }
                }
            } else if let Some(array) =
                array.filter(|a| capturing && a.bytes <= GRAPH_COPY_MAX_BYTES)
            {
                captured.push((at, array));
                continue;
            }
            self.upload_input(at, data)?;
        }
        Ok(captured)
    }

    /// Queues a copy of `data` into input arena `at`: from the host, or
    /// device to device (ids by the checked copy). A device array's producer
    /// was waited for by [`Executor::queue_inputs`].
    fn upload_input(&self, at: usize, data: Feed<'_>) -> Result<(), Error> {
        let arena = &self.arenas[at];
        // the arena's name ("input:<name>") labels a failed copy: no string is
        // built on a step's path
        let what = arena.spec.name;
        match data {
            Feed::Device(_, array) if array.len == 0 => Ok(()),
            Feed::Device(_, array) => input_copy(self.ids.as_ref(), at, arena, array)?.queue(
                &self.device,
                array.ptr,
                what,
            ),
            Feed::Host(HostInput::F32(d)) => arena.buf.write_async(0, d, what),
            Feed::Host(HostInput::I32(d)) => arena.buf.write_async(0, d, what),
            Feed::Host(HostInput::U8(d)) => arena.buf.write_async(0, d, what),
        }
    }

    /// The arena `input:<name>` and its index, once `data` is checked to fit it: its element
    /// type and length, and for a (non-empty) device array, this device.
    fn input_arena(&self, name: &str, data: Feed<'_>) -> Result<(usize, &Arena), Error> {
        let (index, arena) = self
            .arenas
            .iter()
            .enumerate()
            .find(|(_, a)| a.spec.name.strip_prefix("input:") == Some(name))
            .ok_or_else(|| Error::layout(format!("the plan has no input arena for `{name}`")))?;
        let (elem, len, on) = match data {
            Feed::Host(HostInput::F32(d)) => (Elem::F32, d.len(), ""),
            Feed::Host(HostInput::I32(d)) => (Elem::I32, d.len(), ""),
            Feed::Host(HostInput::U8(d)) => (Elem::U8, d.len(), ""),
            Feed::Device(elem, array) => (elem, array.len, " on the device"),
        };
        if elem != arena.spec.elem || len != arena.spec.len {
            return Err(Error::layout(format!(
                "input `{name}`: {len} {} elements{on} for an arena of {} {} elements",
                elem.name(),
                arena.spec.len,
                arena.spec.elem.name()
            )));
        }
        if let Feed::Device(_, array) = data {
            if array.len == 0 {
                return Ok((index, arena));
            }
            // The last address found on this device for this input is not asked
            // again (a µs per input per call): the caller holds the array, so that
            // address still holds device memory of this process.
            let checked = &self.checked_inputs[index];
            if checked.load(Ordering::Relaxed) == array.ptr {
                return Ok((index, arena));
            }
            let ordinal = self.device.ordinal();
            match self.device.pointer_device(array.ptr) {
                Some(d) if d == ordinal => checked.store(array.ptr, Ordering::Relaxed),
                got => {
                    let got = got.map_or_else(
                        || {
                            "memory the CUDA driver does not know (not a device allocation \
                            of this process)"
                                .to_string()
                        },
                        |d| format!("CUDA device {d}"),
                    );
                    return Err(Error::Input(format!(
                        "input '{name}': expected an array on CUDA device {ordinal} (the \
                         step's device), got one in {got}"
                    )));
                }
            }
        }
        Ok((index, arena))
    }

    /// Copies `data` into `arena` at element `offset` (params, optimizer
    /// state, constants) and waits.
    pub fn write(&self, arena: &str, offset: usize, data: HostInput<'_>) -> Result<(), Error> {
        let a = self.arena(arena)?;
        let what = format!("arena `{arena}`");
        match (data, a.spec.elem) {
            (HostInput::F32(d), Elem::F32) => a.buf.write(offset, d, &what),
            (HostInput::I32(d), Elem::I32) => a.buf.write(offset, d, &what),
            (HostInput::U8(d), Elem::U8) => a.buf.write(offset, d, &what),
            _ => Err(Error::layout(format!("{what}: wrong element type"))),
        }
    }

    /// Copies little-endian `bytes` to the start of `arena` (its initial
    /// contents: the constants of a plan) and waits.
    pub fn write_bytes(&self, arena: &str, bytes: &[u8]) -> Result<(), Error> {
        let a = self.arena(arena)?;
        if !bytes.len().is_multiple_of(a.spec.elem.bytes()) {
            return Err(Error::layout(format!(
                "arena `{arena}`: {} bytes are not whole {} elements",
                bytes.len(),
                a.spec.elem.name()
            )));
        }
        // The device is little-endian like the host (asserted at the top).
        a.buf.write(0, bytes, &format!("arena `{arena}`"))
    }

    /// Elements `offset..offset + len` of `arena`, after all queued work.
    pub fn read(&self, arena: &str, offset: usize, len: usize) -> Result<HostData, Error> {
        let a = self.arena(arena)?;
        let what = format!("arena `{arena}`");
        Ok(match a.spec.elem {
            Elem::F32 => {
                let mut out = vec![0f32; len];
                a.buf.read(offset, &mut out, &what)?;
                HostData::F32(out)
            }
            Elem::I32 => {
                let mut out = vec![0i32; len];
                a.buf.read(offset, &mut out, &what)?;
                HostData::I32(out)
            }
            Elem::U8 => {
                let mut out = vec![0u8; len];
                a.buf.read(offset, &mut out, &what)?;
                HostData::U8(out)
            }
            Elem::U32 => {
                let mut out = vec![0u32; len];
                a.buf.read(offset, &mut out, &what)?;
                HostData::U32(out)
            }
        })
    }

    /// Copies f32 elements `offset..offset + out.len()` of `arena` into `out`
    /// (no allocation: the loss of a training step).
    pub fn read_f32(&self, arena: &str, offset: usize, out: &mut [f32]) -> Result<(), Error> {
        let a = self.arena(arena)?;
        if a.spec.elem != Elem::F32 {
            return Err(Error::layout(format!("arena `{arena}` does not hold f32")));
        }
        a.buf.read(offset, out, &format!("arena `{arena}`"))
    }

    /// The results of `entry`'s plan, copied back (after its last run).
    pub fn results(&self, entry: &str) -> Result<Vec<(&'static ResultSpec, HostData)>, Error> {
        let plan = self.entries[self.entry_index(entry)?].plan;
        plan.results
            .iter()
            .map(|r| Ok((r, self.read(r.arena, r.offset, r.len())?)))
            .collect()
    }

    /// The result `key` of `entry`'s plan (e.g. `out:loss` of `train`).
    pub fn result_spec(&self, entry: &str, key: &str) -> Result<&'static ResultSpec, Error> {
        let plan = self.entries[self.entry_index(entry)?].plan;
        plan.results
            .iter()
            .find(|r| r.key == key)
            .ok_or_else(|| Error::layout(format!("`{entry}` has no result `{key}`")))
    }

    /// Fills every `temp_*` arena and `scratch_f32` (split reductions' partials)
    /// with `0xff` bytes (NaN as f32, -1 as i32) and waits: a test that poisons
    /// before a call sees any result no kernel wrote.
    pub fn poison_temps(&self) -> Result<(), Error> {
        self.device.bind()?;
        for a in self
            .arenas
            .iter()
            .filter(|a| a.spec.name.starts_with("temp_") || a.spec.name == "scratch_f32")
        {
            if a.buf.bytes() > 0 {
                // SAFETY: the whole allocation, on our stream.
                let status = unsafe {
                    sys::cuMemsetD8Async(a.buf.ptr(), 0xff, a.buf.bytes(), self.device.stream())
                };
                check(status.result(), || {
                    format!("poisoning arena `{}`", a.spec.name)
                })?;
            }
        }
        self.device
            .synchronize(|| "poisoning the temp arenas".into())
    }

    /// Drops every captured graph; the next call of each entry captures again.
    pub fn reset_graphs(&mut self) {
        for e in &mut self.entries {
            e.graph = None;
        }
    }

    /// Whether `entry` has a captured graph (it has run twice with graphs on).
    pub fn has_graph(&self, entry: &str) -> bool {
        self.entry_index(entry)
            .is_ok_and(|i| self.entries[i].graph.is_some())
    }

    /// How each entry point's graph runs its steps: "`train`: 20 steps in
    /// parallel branches, at most 10 one after another; …", or why they run
    /// one after another.
    pub fn branches_report(&self) -> String {
        let o = &self.options;
        if !o.graphs || o.sync_each {
            return "steps in order: no CUDA graphs (graph=False or sync=True)".into();
        }
        if !o.branches {
            return "steps in order: branches=False".into();
        }
        if let Some(why) = &self.why_no_branches {
            return format!("steps in order: {why}");
        }
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                let name = e.plan.entry;
                let Some(after) = &e.after else {
                    return format!(
                        "`{name}`: {} steps in order (its plan gives none)",
                        e.steps.len()
                    );
                };
                let mut depth: Vec<usize> = Vec::with_capacity(after.len());
                for waits in after {
                    depth.push(1 + waits.iter().map(|&j| depth[j]).max().unwrap_or(0));
                }
                let longest = depth.iter().max().copied().unwrap_or(0);
                let how = e.branches.as_deref().unwrap_or("not captured yet");
                format!(
                    "`{name}`: {} steps, at most {longest} of them one after another; {how}",
                    after.len()
                )
            })
            .collect();
        entries.join("; ")
    }

    /// Who runs the GEMM steps: `"cublas"` (cuBLAS and cuBLASLt), `"kernel"`
    /// (the fallback kernels), or `"mixed"` (cuBLAS, except steps whose
    /// strides it cannot express).
    pub fn gemm_backend(&self) -> &'static str {
        self.gemm_backend
    }

    /// One sentence on who runs which GEMM step and why.
    pub fn gemm_report(&self) -> &str {
        &self.gemm_report
    }

    /// One line per GEMM step, `train[3]: GEMM 8192x256x784 (batch 1) with a
    /// bias + ReLU epilogue in cuBLASLt, algorithm #2 of 8 by timing: …`:
    /// who runs it and, in cuBLASLt, which algorithm and what timing found.
    pub fn gemm_steps(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for entry in &self.entries {
            for (i, (step, ready)) in entry.plan.steps.iter().zip(&entry.steps).enumerate() {
                if matches!(step, Step::Gemm(_)) {
                    lines.push(format!("{}[{i}]: {}", entry.plan.entry, ready.label));
                }
            }
        }
        lines
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The options it runs with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The JIT's info log of the module.
    pub fn jit_log(&self) -> &str {
        self.module.info_log()
    }
}

/// Who runs the GEMM steps, counted as they are prepared, for [`gemm_report`].
#[derive(Debug, Default)]
struct Tally {
    /// In cuBLASLt without an epilogue.
    lt_plain: usize,
    /// In cuBLASLt with a bias (+ ReLU) epilogue.
    lt_bias: usize,
    /// In `cublasSgemmStridedBatched`: cuBLASLt cannot, or was slower.
    cublas: usize,
    /// Of `cublas`, those that timing chose.
    cublas_by_timing: usize,
    /// Of `cublas`, those without an epilogue left untimed (autotune off):
    /// cuBLAS's own choice, as before cuBLASLt.
    cublas_untimed: usize,
    /// Why cuBLASLt cannot run the others (each reason once).
    no_lt: Vec<String>,
    /// In `cublasSgemmBatched` (an outer batch level: pointer arrays).
    pointers: usize,
    /// In fallback kernels: which, and why.
    kernel: Vec<String>,
    /// Autotuned (candidates timed, or an identical GEMM's choice kept).
    tuned: usize,
    /// Of `tuned`, those whose candidates were timed.
    timed: usize,
    /// Of `tuned`, those that keep a cuBLASLt algorithm other than the
    /// heuristic's first.
    not_first: usize,
    /// Of `tuned`, those a generated kernel won.
    tiled: usize,
}

impl Tally {
    /// A GEMM that cuBLASLt prepared, kept there or (by timing) given to cuBLAS.
    fn count(&mut self, epilogue: LtEpilogue, tuned: Option<&Tuned>) {
        match (tuned.is_some_and(Tuned::is_cublas), epilogue) {
            _ if tuned.and_then(Tuned::kernel).is_some() => self.tiled += 1,
            (true, _) => {
                self.cublas += 1;
                self.cublas_by_timing += 1;
            }
            (false, LtEpilogue::Plain) => self.lt_plain += 1,
            (false, _) => self.lt_bias += 1,
        }
        if let Some(t) = tuned {
            self.tuned += 1;
            self.timed += usize::from(!t.reused);
            self.not_first += usize::from(t.not_first());
        }
    }

    /// A GEMM left to cuBLAS because cuBLASLt cannot run it.
    /// A GEMM without an epilogue left untimed, kept in plain cuBLAS.
    fn untimed_in_cublas(&mut self) {
        self.cublas += 1;
        self.cublas_untimed += 1;
    }

    fn no_lt(&mut self, why: String) {
        self.cublas += 1;
        if !self.no_lt.contains(&why) {
            self.no_lt.push(why);
        }
    }
}

/// What preparing the GEMM steps carries from one to the next.
struct GemmPrep {
    /// Times candidates (autotuning on, cuBLASLt loaded, events usable).
    tuner: Option<Tuner>,
    /// Why there is no tuner.
    why_untuned: String,
    tally: Tally,
}

impl GemmPrep {
    fn new(options: &Options, lt_loaded: bool, device: &Device) -> GemmPrep {
        let (tuner, why_untuned) = if !options.autotune {
            (None, "autotune=False".to_string())
        } else if !lt_loaded {
            (None, "cuBLASLt is not in use".to_string())
        } else {
            match Tuner::new(device, TuneConfig::DEFAULT) {
                Ok(tuner) => (Some(tuner), String::new()),
                Err(why) => (None, format!("GEMMs cannot be timed here: {why}")),
            }
        };
        GemmPrep {
            tuner,
            why_untuned,
            tally: Tally::default(),
        }
    }

    /// Frees the tuner (its scratch buffer and events) and says what tuning
    /// did, for the report.
    fn finish(&mut self) -> String {
        let t = &self.tally;
        match self.tuner.take() {
            Some(tuner) => format!(
                "autotuned {} (the fastest of up to {} cuBLASLt algorithms, and of cuBLAS \
                 without an epilogue, timed on their own operands: {} timed in {} ms, the \
                 others the same problem as one of those): {} keep an algorithm other than \
                 the heuristic's first",
                t.tuned,
                TuneConfig::DEFAULT.candidates,
                t.timed,
                tuner.spent().as_millis(),
                t.not_first
            ),
            None => format!(
                "not autotuned ({}): the heuristic's first algorithm",
                self.why_untuned
            ),
        }
    }
}

/// `gemm_backend` and `gemm_report` from the tally: who runs the GEMM steps,
/// why, and what autotuning did (`tuning`).
fn gemm_report(
    t: &Tally,
    cublas_loaded: bool,
    why_no_cublas: &str,
    tuning: &str,
) -> (&'static str, String) {
    let in_libraries = t.lt_plain + t.lt_bias + t.cublas + t.pointers;
    let mut parts = Vec::new();
    if t.tiled > 0 {
        parts.push(format!(
            "{} in generated kernels (faster when timed)",
            t.tiled
        ));
    }
    if t.lt_plain + t.lt_bias > 0 {
        parts.push(format!(
            "{} in cuBLASLt ({} with a bias epilogue)",
            t.lt_plain + t.lt_bias,
            t.lt_bias
        ));
    }
    if t.cublas > 0 {
        let mut why = Vec::new();
        if t.cublas_by_timing > 0 {
            why.push(format!("{} faster there when timed", t.cublas_by_timing));
        }
        if t.cublas_untimed > 0 {
            why.push(format!(
                "{} without an epilogue, not timed",
                t.cublas_untimed
            ));
        }
        if !t.no_lt.is_empty() {
            why.push(format!("cuBLASLt cannot: {}", t.no_lt.join("; ")));
        }
        parts.push(format!(
            "{} in cublasSgemmStridedBatched ({})",
            t.cublas,
            why.join("; ")
        ));
    }
    if t.pointers > 0 {
        parts.push(format!(
            "{} in cublasSgemmBatched (pointer arrays)",
            t.pointers
        ));
    }
    let mut libraries = parts.join(", ");
    if t.lt_plain + t.lt_bias + t.cublas + t.tiled > 0 {
        libraries += &format!("; {tuning}");
    }
    let in_libraries = in_libraries + t.tiled;
    match (cublas_loaded, t.kernel.is_empty()) {
        (true, true) => (
            "cublas",
            format!("cuBLAS runs all {in_libraries} GEMM steps: {libraries}"),
        ),
        (true, false) => (
            "mixed",
            format!(
                "cuBLAS runs {in_libraries} GEMM steps: {libraries}; kernels run {}: {}",
                t.kernel.len(),
                t.kernel.join("; ")
            ),
        ),
        (false, _) => (
            "kernel",
            format!(
                "kernels run all {} GEMM steps: {why_no_cublas}",
                t.kernel.len()
            ),
        ),
    }
}

/// `, C = alpha·A·B + beta·C` for a step label, when the GEMM is not a plain
/// `C = A·B`.
fn scaling(gemm: &Gemm) -> String {
    if (gemm.alpha, gemm.beta) == (1.0, 0.0) {
        String::new()
    } else {
        format!(", C = {}·A·B + {}·C", gemm.alpha, gemm.beta)
    }
}

/// How a failure seen only when waiting is found.
const UNKNOWN_KERNEL: &str = "kernels run asynchronously, so the failing one is not known: \
                              create the step with sync=True, or set FERROGRAD_CUDA_SYNC=1, \
                              to run them one at a time and name it";

/// Batch `k` of `count` of the stacked input `name`.
fn stacked_batch<'a>(
    name: &str,
    data: Feed<'a>,
    k: usize,
    count: usize,
) -> Result<Feed<'a>, Error> {
    let len = data.len();
    data.batch(k, count).ok_or_else(|| {
        Error::layout(format!(
            "input `{name}`: {len} elements do not split into {count} batches"
        ))
    })
}

/// `err` naming run `k` of `count` of [`Executor::run_steps`].
fn in_step(err: Error, k: usize, count: usize) -> Error {
    let at = |msg: String| format!("step {k} (from 0) of {count}: {msg}");
    match err {
        Error::Device(msg) => Error::Device(at(msg)),
        Error::Input(msg) => Error::Input(at(msg)),
        Error::Layout(msg) => Error::Layout(at(msg)),
        other => other,
    }
}

/// What a generated GEMM kernel of `gemm` is, for reports (`32×32 tiles, 128
/// threads, k in 4 splits`), from its entry name (`ptx_gemm.py`'s
/// `fg_sgemm_32x32_kn_t128`, `ptx_gemm_thin.py`'s `fg_sgemm_warp_rows_n10_k256`).
fn tiled_name(gemm: &Gemm, launch: &Launch) -> String {
    let threads = launch.block[0];
    let shape = launch
        .kernel
        .strip_prefix("fg_sgemm_")
        .unwrap_or(launch.kernel);
    let what = if shape.starts_with("warp_rows") {
        format!("a warp per row of C, {threads} threads")
    } else if shape.starts_with("thread_rows") {
        format!("a thread per row of C, {threads} threads")
    } else if shape.starts_with("short_k") {
        format!("rows of C from a short k, {threads} threads")
    } else {
        let tile = shape.split('_').next().unwrap_or(shape).replace('x', "×");
        format!("{tile} tiles, {threads} threads")
    };
    match splits(gemm, launch) {
        0 | 1 => what,
        splits => format!("{what}, k in {splits} splits"),
    }
}

/// The parts k is split into by a generated GEMM kernel of `gemm` (1: not
/// split; split ones use the `split_f32` / `split_u32` arenas): its grid's z
/// covers every product that many times.
fn splits(gemm: &Gemm, launch: &Launch) -> u32 {
    let items = (gemm.batch * gemm.outer.max(1)).max(1) as u32;
    launch.grid[2] / items
}

/// For each of `plan`'s steps, the steps it waits for: the plan's `after`,
/// plus the step before it on the same [`Shared`] memory (cuBLASLt calls
/// take turns on its workspaces, so two in a row may run at once). `None`
/// (the steps in order) without `branches` or when the plan gives no order.
fn step_order(
    plan: &Plan,
    steps: &mut [Ready],
    branches: bool,
) -> Result<Option<Vec<Vec<usize>>>, Error> {
    if !branches || plan.after.len() != plan.steps.len() {
        return Ok(None);
    }
    let mut last: HashMap<Shared, usize> = HashMap::new();
    let mut lt_calls = 0;
    let mut after = Vec::with_capacity(steps.len());
    for (i, (step, waits)) in steps.iter_mut().zip(plan.after).enumerate() {
        if let Some(&j) = waits.iter().find(|&&j| j >= i) {
            return Err(Error::layout(format!(
                "step {i} of `{}` waits for step {j}, which is not before it",
                plan.entry
            )));
        }
        let mut waits = waits.to_vec();
        if let Work::CublasLt { workspace, .. } = &mut step.work {
            *workspace = lt_calls % WORKSPACES;
            lt_calls += 1;
        }
        if let Some(shared) = step.shares() {
            if let Some(j) = last.insert(shared, i) {
                if !waits.contains(&j) {
                    waits.push(j);
                }
            }
        }
        after.push(waits);
    }
    Ok(Some(after))
}

/// `after` with every GEMM step (whoever runs it) also waiting for the GEMM
/// step before it: GEMMs one after another, the other kernels beside them.
fn gemms_in_order(after: &[Vec<usize>], steps: &[Ready]) -> Vec<Vec<usize>> {
    let mut last = None;
    let mut out = after.to_vec();
    for (i, (waits, step)) in out.iter_mut().zip(steps).enumerate() {
        if step.gemm {
            if let Some(j) = last.filter(|j| !waits.contains(j)) {
                waits.push(j);
            }
            last = Some(i);
        }
    }
    out
}

/// Queues the kernel of `step` (a [`Work::Kernel`]) with its third
/// parameter, C, at `c` instead (a GEMM kernel timed on C's stand-in).
fn launch_with_c(step: &Ready, device: &Device, c: u64) -> Result<(), Error> {
    let Work::Kernel(k) = &step.work else {
        return Err(Error::layout(
            "a GEMM kernel candidate that is not a kernel",
        ));
    };
    let mut slots = k.slots.clone();
    if slots.len() < 3 {
        return Err(Error::layout(format!(
            "{}: a GEMM kernel with {} parameters",
            step.label,
            slots.len()
        )));
    }
    slots[2] = c;
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| (s as *mut u64).cast::<c_void>())
        .collect();
    // SAFETY: one pointer per parameter into `slots`, which lives through
    // the call (the driver copies the parameters when the launch is queued);
    // C's stand-in has C's extent.
    let status = unsafe { k.launch(device, params.as_mut_ptr()) };
    check(status, || {
        format!("launching {} on C's stand-in", step.label)
    })
}

/// How device array `array` reaches input arena `at` (`arena`, which it
/// was checked to fit): by a plain copy, or, for ids, by the checked copy.
fn input_copy(
    ids: Option<&IdsCheck>,
    at: usize,
    arena: &Arena,
    array: DeviceArray,
) -> Result<InputCopy, Error> {
    let what = arena.spec.name;
    if array.bytes > arena.buf.bytes() {
        return Err(Error::layout(format!(
            "{what}: {} bytes for an arena of {}",
            array.bytes,
            arena.buf.bytes()
        )));
    }
    match (arena.spec.id_bound, ids) {
        (Some(bound), Some(ids)) => {
            // the tag names the arena to `check_ids`: its index, from 1
            let tag = u32::try_from(at + 1)
                .map_err(|_| Error::layout(format!("{what}: arena {at} as a tag")))?;
            let copy = (array.ptr, arena.buf.ptr(), array.len);
            Ok(InputCopy::Kernel(ids.launch(copy, bound, tag, what)?))
        }
        _ => Ok(InputCopy::Memcpy {
            dst: arena.buf.ptr(),
            bytes: array.bytes,
        }),
    }
}

/// Queues one step on the device's stream.
fn enqueue(
    step: &Ready,
    device: &Device,
    (blas, blaslt): (Option<&Blas>, Option<&BlasLt>),
) -> Result<(), Error> {
    match &step.work {
        Work::Kernel(k) => {
            // SAFETY: `params` holds one pointer per kernel parameter into
            // `slots`, which lives as long as `k`; every address was checked
            // against its arena when the plan was prepared.
            let status = unsafe { k.launch(device, k.params.as_ptr().cast_mut()) };
            check(status, || {
                format!(
                    "launching {} (grid {:?}, block {:?}, {} bytes of shared memory)",
                    step.label, k.grid, k.block, k.shared_bytes
                )
            })
        }
        Work::Cublas {
            call,
            scale,
            a,
            b,
            c,
        } => {
            let blas = blas.ok_or_else(|| Error::layout("a cuBLAS step without cuBLAS"))?;
            // SAFETY: operands checked against their arenas when prepared.
            unsafe { blas.sgemm(call, *scale, *a, *b, *c) }
                .map_err(|e| Error::Device(format!("{}: {e}", step.label)))
        }
        Work::CublasPointers {
            call,
            scale,
            pointers,
            count,
        } => {
            let blas = blas.ok_or_else(|| Error::layout("a cuBLAS step without cuBLAS"))?;
            let (base, n) = (pointers.ptr(), *count as u64);
            // SAFETY: every address was computed from operands checked against
            // their arenas; the arrays live in `pointers`, owned by the step.
            unsafe {
                blas.sgemm_pointers(
                    call,
                    *scale,
                    base,
                    base + 8 * n,
                    base + 16 * n,
                    *count as i32,
                )
            }
            .map_err(|e| Error::Device(format!("{}: {e}", step.label)))
        }
        Work::CublasLt {
            call,
            scale,
            a,
            b,
            c,
            bias,
            workspace,
        } => {
            let lt = blaslt.ok_or_else(|| Error::layout("a cuBLASLt step without cuBLASLt"))?;
            // SAFETY: operands and bias checked against their arenas when prepared.
            unsafe { lt.run(call, *scale, *a, *b, *c, *bias, *workspace) }
                .map_err(|e| Error::Device(format!("{}: {e}", step.label)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::plan::{ArenaSpec, Elem, Plan};

    #[test]
    fn without_a_driver_creating_an_executor_says_so() {
        if crate::cuda::driver_available() {
            return; // a machine with CUDA: tests/test_cuda_runtime.py covers it
        }
        const ARENAS: &[ArenaSpec] = &[ArenaSpec {
            name: "param",
            elem: Elem::F32,
            len: 4,
            id_bound: None,
        }];
        const PLANS: &[Plan] = &[];
        match Executor::new("", ARENAS, PLANS, Options::default()) {
            Err(Error::NoDevice(msg)) => assert!(msg.starts_with("no CUDA driver found"), "{msg}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("an executor without a driver"),
        }
    }

    #[test]
    fn the_report_says_who_runs_what_and_how_it_was_tuned() {
        let mut t = Tally::default();
        let tuned = |chosen: usize| Tuned {
            times: vec![Ok(50.0), Ok(40.0), Ok(45.0)],
            lt: 2,
            kernels: vec![],
            chosen,
            reused: chosen == 0,
        };
        t.count(LtEpilogue::ReluBias, Some(&tuned(1)));
        t.count(LtEpilogue::Plain, Some(&tuned(0)));
        t.count(LtEpilogue::Plain, Some(&tuned(2)));
        t.no_lt("k is 0".into());
        t.no_lt("k is 0".into());
        t.pointers += 1;
        let (backend, report) = gemm_report(&t, true, "", "autotuned 3 (…)");
        assert_eq!(backend, "cublas");
        assert_eq!(
            report,
            "cuBLAS runs all 6 GEMM steps: 2 in cuBLASLt (1 with a bias epilogue), 3 in \
             cublasSgemmStridedBatched (1 faster there when timed; cuBLASLt cannot: k is 0), \
             1 in cublasSgemmBatched (pointer arrays); autotuned 3 (…)"
        );
        assert_eq!((t.tuned, t.timed, t.not_first), (3, 2, 1));
        t.kernel.push("GEMM step 4 of `train` (strides)".into());
        let (backend, report) = gemm_report(&t, true, "", "not autotuned (autotune=False)");
        assert_eq!(backend, "mixed");
        assert!(
            report.ends_with("kernels run 1: GEMM step 4 of `train` (strides)"),
            "{report}"
        );
        let kernels = Tally {
            kernel: vec!["a".into(), "b".into()],
            ..Tally::default()
        };
        let (backend, report) = gemm_report(&kernels, false, "gemm=\"kernel\" was asked for", "");
        assert_eq!(backend, "kernel");
        assert_eq!(
            report,
            "kernels run all 2 GEMM steps: gemm=\"kernel\" was asked for"
        );
    }

    #[test]
    fn host_batches_are_consecutive_equal_slices() {
        let data = [0f32, 1., 2., 3., 4., 5.];
        let feed = Feed::Host(HostInput::F32(&data));
        for (k, want) in [[0f32, 1.], [2., 3.], [4., 5.]].iter().enumerate() {
            match feed.batch(k, 3) {
                Some(Feed::Host(HostInput::F32(got))) => assert_eq!(got, want),
                other => panic!("batch {k}: {other:?}"),
            }
        }
        assert!(feed.batch(3, 3).is_none(), "k past the last batch");
        assert!(feed.batch(0, 4).is_none(), "6 elements are not 4 batches");
        assert!(feed.batch(0, 0).is_none(), "no batches");
        let empty = Feed::Host(HostInput::I32(&[]));
        assert!(matches!(empty.batch(1, 2), Some(f) if f.is_empty()));
    }

    #[test]
    fn device_batches_step_through_the_array_and_keep_its_stream() {
        let array = DeviceArray {
            ptr: 0x1000,
            len: 12,
            bytes: 48,
            stream: ProducerStream::Handle(7),
        };
        let feed = Feed::Device(Elem::F32, array);
        let Some(Feed::Device(Elem::F32, second)) = feed.batch(1, 3) else {
            panic!("no batch 1 of 3");
        };
        let want = DeviceArray {
            ptr: 0x1000 + 16,
            len: 4,
            bytes: 16,
            stream: ProducerStream::Handle(7),
        };
        assert_eq!(second, want);
        assert!(feed.batch(0, 5).is_none());
        assert!(feed.batch(3, 3).is_none());
    }

    #[test]
    fn errors_of_a_run_name_its_step() {
        let err = in_step(Error::Device("launching kernel `k3`".into()), 2, 5);
        assert_eq!(
            err,
            Error::Device("step 2 (from 0) of 5: launching kernel `k3`".into())
        );
        let err = stacked_batch("x", Feed::Host(HostInput::U8(&[1, 2, 3])), 0, 2).unwrap_err();
        assert!(err.to_string().contains("input `x`: 3 elements"), "{err}");
    }

    #[test]
    fn untimed_plain_gemms_are_reported() {
        let t = Tally {
            cublas: 2,
            cublas_untimed: 2,
            ..Tally::default()
        };
        let (_, report) = gemm_report(&t, true, "", "autotuned 0 (…)");
        assert!(
            report.contains("2 in cublasSgemmStridedBatched (2 without an epilogue, not timed)"),
            "{report}"
        );
    }

    #[test]
    fn gemm_modes_parse() {
        assert_eq!(GemmMode::parse("cublas"), Ok(GemmMode::Cublas));
        assert!(GemmMode::parse("tf32").unwrap_err().contains("\"kernel\""));
    }

    fn kernel_step(split_k: bool) -> Ready {
        Ready {
            label: "kernel".into(),
            work: Work::Kernel(KernelCall {
                function: Function {
                    raw: std::ptr::null_mut(),
                },
                grid: [1, 1, 1],
                block: [32, 1, 1],
                shared_bytes: 0,
                slots: Box::new([]),
                params: Box::new([]),
            }),
            split_k,
            gemm: false,
        }
    }

    fn plan_with(after: &'static [&'static [usize]], count: usize) -> Plan {
        const STEP: Step = Step::Launch(Launch {
            kernel: "k",
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared_bytes: 0,
            args: &[],
        });
        const STEPS: [Step; 4] = [STEP; 4];
        Plan {
            entry: "train",
            steps: &STEPS[..count],
            after,
            results: &[],
        }
    }

    #[test]
    fn steps_on_shared_memory_wait_for_each_other_whatever_the_plan_allows() {
        let plan = plan_with(&[&[], &[], &[], &[2]], 4);
        let mut steps = vec![
            kernel_step(true),
            kernel_step(false),
            kernel_step(true),
            kernel_step(true),
        ];
        let order = step_order(&plan, &mut steps, true).unwrap();
        // 2 after 0 (split arenas); 3 after 2 by the plan and on them, listed once
        assert_eq!(order, Some(vec![vec![], vec![], vec![0], vec![2]]));
        // without branches, or a plan that gives no order: the steps in order
        assert_eq!(step_order(&plan, &mut steps, false).unwrap(), None);
        let silent = plan_with(&[], 4);
        assert_eq!(step_order(&silent, &mut steps, true).unwrap(), None);
    }

    #[test]
    fn gemms_in_order_wait_for_the_gemm_before_them_only() {
        let steps: Vec<Ready> = [true, false, true, true]
            .into_iter()
            .map(|gemm| Ready {
                gemm,
                ..kernel_step(false)
            })
            .collect();
        let after = vec![vec![], vec![0], vec![], vec![1, 2]];
        assert_eq!(
            gemms_in_order(&after, &steps),
            vec![vec![], vec![0], vec![0], vec![1, 2]]
        );
    }

    #[test]
    fn a_plan_that_waits_for_a_later_step_is_refused() {
        let plan = plan_with(&[&[], &[1]], 2);
        let mut steps = vec![kernel_step(false), kernel_step(false)];
        let err = step_order(&plan, &mut steps, true).unwrap_err().to_string();
        assert!(err.contains("step 1 of `train` waits for step 1"), "{err}");
    }
}
