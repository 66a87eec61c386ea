"""The CUDA backend's renderer: kernel IR -> one PTX module and a launch plan per
entry point (``DeviceModule``, see ``launch_plan.py``).

Read it as tables: ``KINDS`` below maps each kernel kind to the function that
writes its ``.entry`` (``ptx_kernels.py``); ``ptx_asm.py`` holds the instruction
tables and the register-based expression emitter; ``legalize.py`` rewrites the
math PTX lacks before anything is printed. Before rendering, ``ptx_rows.fuse_rows``
turns each row chain of a schedule (softmax, layer norm) into one kernel, and
``ptx_horizontal.merge_launches`` runs independent elementwise kernels (the optimizer's
per-parameter updates) as one launch (``device_kernels``). Identical kernels (forward's
are usually train's first ones) are emitted once.

Kernel parameters (the contract with the runtime): one ``.param .u64`` per
distinct buffer the kernel touches — read-only buffers first, in order of first
read, then written ones, in order of first write (as the Rust renderer's
``KernelArgs``) — each the global address of the buffer's first element (arena
base + the buffer's offset in its arena, which is what the plan's ``BufferRef``
says). View offsets inside a buffer and every size are baked into the code.
Gather and scatter kernels take one more ``.u64``, the address of the
``flags_u32`` arena. The shared kernels (``fg_sgemm_16x16``, the register-tiled
``fg_sgemm_32x32_*`` of ``ptx_gemm.py`` and thin ``fg_sgemm_{warp_rows,thread_rows,
short_k}_*`` of ``ptx_gemm_thin.py`` a GEMM step offers the runtime's autotuner,
``fg_fill_zero_b32``) take ``.u32`` scalars after their pointers, given as
``ScalarArg``s. No kernel
uses dynamic shared memory. ``fg_copy_ids_checked`` is not in any plan: the runtime
launches it itself, to copy ids that arrive in device memory into their arena.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ferrograd._version import __version__
from ferrograd.ir.errors import BackendError
from ferrograd.ir.passes import debug_level

from ..kernel_ir import Conv, Elementwise, Gather, Kernel, Matmul, Reduce, View
from ..launch_plan import (
    Access,
    BufferRef,
    DeviceModule,
    DevicePlan,
    Gemm,
    Launch,
    ScalarArg,
    Span,
    everything,
    step_dependencies,
)
from ..memory import ALIGN, MemoryPlan
from ..schedule import Schedule
from .ptx_conv import conv
from .ptx_gemm import SPLIT_COUNTS, SPLIT_PARTIALS
from .ptx_horizontal import Horizontal, horizontal, merge_launches
from .ptx_kernels import (
    FLAGS,
    SCRATCH,
    SGEMM,
    Arg,
    GemmStep,
    KernelLaunch,
    Step,
    copy_ids_text,
    elementwise,
    gather,
    matmul,
    reduce,
)
from .ptx_rows import RowChain, fuse_rows, row_chain
from .ptx_windows import WindowChain, fuse_windows, window_chain

# target -> the PTX ISA version its module declares (the oldest that has the target
# and everything emitted here: max.NaN needs 7.0)
SPLIT_ARENAS = {SPLIT_PARTIALS: "split_f32", SPLIT_COUNTS: "split_u32"}
TARGETS = {"sm_80": "7.0", "sm_86": "7.1", "sm_89": "7.8", "sm_90": "7.8"}

# ---- the module ---------------------------------------------------------------------------

# kernel kind -> renderer: (kernel, buffer dtypes, fast math) -> launches and GEMMs
KINDS: dict[type, Callable[[Any, dict[str, str], bool], list[Step]]] = {
    Elementwise: elementwise,
    Reduce: reduce,
    Matmul: matmul,
    Gather: gather,
    Conv: conv,
    RowChain: row_chain,
    WindowChain: window_chain,
}


def aligned_buffers(schedules: list[Schedule]) -> frozenset[str]:
    """The buffers whose first element is 16-byte aligned on the device: inputs (an
    arena each), params, state and temps (offsets multiples of ``memory.ALIGN``
    elements); not consts, packed end to end."""
    assert ALIGN % 4 == 0
    return frozenset(b.name for s in schedules for b in s.buffers.values()
                     if b.kind in ("input", "param", "state", "temp"))


def render_kernel(k: Kernel, dtypes: dict[str, str], fast_math: bool = False,
                  aligned: frozenset[str] = frozenset()) -> list[Step]:
    """The launches (and GEMMs) of one kernel; ``aligned`` as ``aligned_buffers`` says
    (elementwise kernels over them may use 16-byte accesses)."""
    if isinstance(k, Elementwise):
        return elementwise(k, dtypes, fast_math, aligned)
    if isinstance(k, Matmul):  # its epilogue may be an elementwise kernel
        return matmul(k, dtypes, fast_math, aligned)
    if isinstance(k, Horizontal):
        return horizontal(k, dtypes, fast_math, aligned)
    if isinstance(k, WindowChain):
        return window_chain(k, dtypes, fast_math, aligned)
    render = KINDS.get(type(k))
    if render is None:
        raise BackendError(f"no PTX template for kernel kind {k.kind}")
    return render(k, dtypes, fast_math)


def kernel_source(k: Kernel, dtypes: dict[str, str], fast_math: bool = False,
                  aligned: frozenset[str] = frozenset()) -> str:
    """The PTX of one kernel, for people (``step.kernels``)."""
    parts = []
    for step in render_kernel(k, dtypes, fast_math, aligned):
        launch = step.fallback if isinstance(step, GemmStep) else step
        if isinstance(step, GemmStep):
            parts.append(f"// {gemm_summary(step)}: "
                         f"{'cuBLASLt' if step.bias else 'cuBLAS'}, or {SGEMM} below")
        parts.append(launch.text.replace("ENTRY", launch.name))
    return "\n".join(dict.fromkeys(parts))


def gemm_summary(step: GemmStep) -> str:
    """``GEMM 1x784x256x128, C = -0.01·A·B + C`` (sizes, then what is not a plain C = A·B)."""
    batch = f"{step.outer}x{step.batch}" if step.outer > 1 else f"{step.batch}"
    text = f"GEMM {batch}x{step.m}x{step.n}x{step.k}"
    if step.bias is not None:
        text += " + bias" + (", ReLU" if step.relu else "")
    if (step.alpha, step.beta) != (1.0, 0.0):
        scaled = "A·B" if step.alpha == 1 else f"{step.alpha:g}·A·B"
        kept = "" if step.beta == 0 else " + C" if step.beta == 1 else f" + {step.beta:g}·C"
        text += f", C = {scaled}{kept}"
    return text


def check_private_products(s: Schedule, kernels: list[Kernel]) -> None:
    """A GEMM may write its epilogue's output instead of its product (``matmul`` in
    ``ptx_kernels.py``), leaving the product's temp unwritten: right only when the
    epilogue is the product's one reader, as the scheduler fuses (every user of the
    product in the epilogue, never a result). Checked here, where every kernel is seen."""
    results = set(s.results.values())
    for k in kernels:
        if not isinstance(k, Matmul) or k.epilogue is None:
            continue
        assert k.out is not None
        product = k.out.buffer
        readers = [o.name for o in kernels if o is not k
                   and any(v.buffer == product for v in o.reads())]
        if readers or product in results:
            raise BackendError(f"kernel {k.name}: its product {product} is read outside its "
                               f"epilogue ({', '.join(readers) or 'a result'})")


class _ModuleBuilder:
    """The module's entries, by text: identical kernels are emitted once, under the name
    of the first kernel that has the text."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}  # text with ENTRY -> entry name
        self.texts: list[str] = []

    def entry(self, launch: KernelLaunch) -> str:
        name = self.entries.get(launch.text)
        if name is None:
            name = launch.name
            self.entries[launch.text] = name
            comment = f"// {launch.comment}\n" if launch.comment else ""
            self.texts.append(comment + launch.text.replace("ENTRY", name))
        return name


def device_kernels(s: Schedule, memory_plan: MemoryPlan, row_chains: bool = True,
                   merge: bool = True, window_chains: bool = True) -> list[Kernel]:
    """The kernels the PTX backend runs for ``s``: the schedule's, with each row chain
    (softmax, layer norm: ``ptx_rows.py``) one kernel unless ``row_chains`` is off, each
    window chain (max pooling's gradient: ``ptx_windows.py``) one kernel unless
    ``window_chains`` is off, then runs of independent elementwise kernels one launch
    (``ptx_horizontal.py``) unless ``merge`` is off."""
    kernels, log = fuse_rows(s, memory_plan) if row_chains else (list(s.kernels), [])
    if window_chains:
        kernels, more = fuse_windows(s, memory_plan, kernels)
        log += more
    if merge:
        kernels, more = merge_launches(s, memory_plan, kernels)
        log += more
    if debug_level() >= 1:
        for line in log:
            print(f"[ptx {s.entry}] {line}")
    return kernels


def render_ptx(schedules: list[Schedule], memory_plan: MemoryPlan, *, target: str = "sm_80",
               fast_math: bool = False, result_shapes: Mapping[str, tuple[int, ...]] | None = None,
               model: str = "", row_chains: bool = True, merge_launches: bool = True,
               window_chains: bool = True,
               id_bounds: Mapping[str, int] | None = None) -> DeviceModule:
    """The PTX module of ``schedules`` and the launch plan of each entry point.

    ``result_shapes`` (result key -> shape) shapes the plans' results (default: flat);
    ``row_chains=False`` keeps the schedule's kernels as they are (tests compare);
    ``merge_launches=False`` runs each elementwise kernel as a launch of its own;
    ``window_chains=False`` keeps window reductions and their readers apart (tests);
    ``id_bounds`` (input name as in its arena -> n) are the inputs that hold ids in
    [0, n): the module gets ``fg_copy_ids_checked``, which the runtime copies them with
    when they arrive in device memory (``DeviceModule.id_bounds``).
    """
    if target not in TARGETS:
        raise BackendError(f"unknown PTX target {target!r}; choose from {', '.join(TARGETS)}")
    const_data, const_at, const_sizes = const_layout(schedules)
    dtypes = {b.name: b.dtype for s in schedules for b in s.buffers.values()}
    aligned = aligned_buffers(schedules)
    builder = _ModuleBuilder()
    plans: dict[str, DevicePlan] = {}
    uses_flags = False
    # launches run one after another: the largest need sizes each arena
    scratch = split_partials = split_tiles = 0
    tiled = False
    for s in schedules:
        refs = _Addresses(s, memory_plan, const_at)
        plan = DevicePlan(s.entry)
        kernels = device_kernels(s, memory_plan, row_chains, merge_launches, window_chains)
        check_private_products(s, kernels)
        accesses: list[Access] = []
        for k in kernels:
            steps = render_kernel(k, dtypes, fast_math, aligned)
            rendered = [_plan_step(step, builder, refs) for step in steps]
            plan.steps += rendered
            accesses += [_access(k, step, refs, i > 0) for i, step in enumerate(rendered)]
            uses_flags |= isinstance(k, Gather)
            for step in steps:
                scratch = max(scratch, step.scratch)
                if isinstance(step, GemmStep):
                    split_partials = max(split_partials, step.split_partials)
                    split_tiles = max(split_tiles, step.split_tiles)
                    tiled |= bool(step.tiled)
        plan.after = step_dependencies(accesses)
        for key, buf in s.results.items():
            ref = refs.ref(buf, 0)
            shape = tuple((result_shapes or {}).get(key, (s.buffers[buf].size,)))
            plan.results[key] = (ref.arena, ref.offset, shape)
        plans[s.entry] = plan
    arenas = _arena_sizes(schedules, memory_plan, const_sizes, uses_flags, scratch)
    if tiled:  # every tiled kernel takes both (unsplit ones do not read them)
        arenas.update({"split_f32": max(split_partials, 1), "split_u32": max(split_tiles, 1)})
    bounded = {f"input:{name}": n for name, n in (id_bounds or {}).items()
               if f"input:{name}" in arenas}  # an input no kernel reads has no arena
    if bounded:
        builder.texts.append("// copies ids that arrive in device memory, checking them\n"
                             + copy_ids_text())
    header = [
        "//",
        f"// Generated by ferrograd {__version__}" + (f" for model `{model}`" if model else "")
        + f": {len(builder.texts)} kernels, entry points {', '.join(plans)}.",
        "// Parameters: a .u64 global address per buffer (read-only buffers first), then",
        "// .u32 sizes for the shared kernels; launches are in the plan (launch_plan.py).",
        "//",
        f".version {TARGETS[target]}",
        f".target {target}",
        ".address_size 64",
    ]
    source = "\n".join(header) + "\n\n" + "\n".join(builder.texts)
    return DeviceModule(source, plans, arenas, const_data, bounded)


class _Addresses:
    """Buffer name -> arena address, for one entry point."""

    def __init__(self, s: Schedule, plan: MemoryPlan, const_at: dict[str, int]) -> None:
        self.s, self.plan, self.const_at = s, plan, const_at

    def ref(self, name: str, offset: int) -> BufferRef:
        if name == FLAGS:
            return BufferRef("flags_u32", offset)
        if name == SCRATCH:
            return BufferRef("scratch_f32", offset)
        if name in SPLIT_ARENAS:
            return BufferRef(SPLIT_ARENAS[name], offset)
        buf = self.s.buffers[name]
        if buf.kind == "input":
            return BufferRef(f"input:{name.removeprefix('input_')}", offset)
        if buf.kind in ("param", "state"):
            return BufferRef(buf.kind, self.plan.persistent[name][1] + offset)
        if buf.kind == "const":
            return BufferRef(f"const_{buf.dtype}", self.const_at[name] + offset)
        return BufferRef(f"temp_{buf.dtype}", self.plan.temps[self.s.entry][name].offset + offset)

    def args(self, args: list[Arg]) -> tuple[BufferRef | ScalarArg, ...]:
        return tuple(a if isinstance(a, ScalarArg) else self.ref(*a) for a in args)


def _plan_step(step: Step, builder: _ModuleBuilder, refs: _Addresses) -> Launch | Gemm:
    if isinstance(step, KernelLaunch):
        return _launch(step, builder, refs)
    (a, ao, ast), (b, bo, bst), (c, co, cst) = step.operands
    bias = refs.ref(*step.bias) if step.bias is not None else None
    return Gemm(step.batch, step.m, step.n, step.k, refs.ref(a, ao), ast, refs.ref(b, bo), bst,
                refs.ref(c, co), cst, _launch(step.fallback, builder, refs), bias, step.relu,
                step.outer, step.outer_strides, step.alpha, step.beta,
                tuple(_launch(t, builder, refs) for t in step.tiled))


def _access(k: Kernel, step: Launch | Gemm, refs: _Addresses, chained: bool) -> Access:
    """What ``step``, one of kernel ``k``'s, reads and writes, as spans of arenas: each
    buffer of ``k``'s views whole, if the step addresses it (kernels reach memory only
    through their buffer arguments, the module's parameter contract; a product the
    step's GEMM fuses away, as into an in-place update, is never written); the scratch
    arena, whole, when the step uses it (it passes data between the steps of one
    kernel, and every kernel reuses it). The flag of gathers is left out (kernels only
    ever set it), and so are the split-K arenas (the runtime orders the GEMM kernels it
    picks that use them). ``chained``: a later step of ``k``, which waits for the one
    before. A step with an address outside all of these (a renderer bug this guards
    against) waits for every earlier step, and every later one for it."""
    addresses = _addresses(step)

    def spans(views: list[View]) -> list[Span]:
        out = []
        for name in dict.fromkeys(v.buffer for v in views):
            ref = refs.ref(name, 0)
            span = Span(ref.arena, ref.offset, ref.offset + refs.s.buffers[name].size)
            if any(_inside(r, span) for r in addresses):
                out.append(span)
        return out

    access = Access(spans(k.reads()), spans(k.writes()), chained)
    known = access.reads + access.writes
    for ref in addresses:
        if ref.arena == "scratch_f32":
            if not any(w.arena == ref.arena for w in access.writes):
                access.writes.append(Span(ref.arena, 0, 2**63))
        elif ref.arena not in ("flags_u32", *SPLIT_ARENAS.values()) and not any(
                _inside(ref, s) for s in known):
            return everything()
    return access


def _inside(ref: BufferRef, span: Span) -> bool:
    return ref.arena == span.arena and span.start <= ref.offset < span.stop


def _addresses(step: Launch | Gemm) -> list[BufferRef]:
    """Every buffer address of a step (a GEMM's operands and those of its kernels)."""
    launches = [step] if isinstance(step, Launch) else [
        *([step.fallback] if step.fallback else []), *step.tiled]
    refs = [a for launch in launches for a in launch.args if isinstance(a, BufferRef)]
    if isinstance(step, Gemm):
        refs += [step.a, step.b, step.c, *([step.bias] if step.bias else [])]
    return refs


def _launch(k: KernelLaunch, builder: _ModuleBuilder, refs: _Addresses) -> Launch:
    return Launch(builder.entry(k), k.grid, k.block, refs.args(k.args))


def _arena_sizes(schedules: list[Schedule], plan: MemoryPlan, const_sizes: dict[str, int],
                 flags: bool, scratch: int) -> dict[str, int]:
    sizes = {"param": plan.persistent_size.get("param", 0),
             "state": plan.persistent_size.get("state", 0)}
    for dtype in ("f32", "i32", "bool"):
        sizes[f"temp_{dtype}"] = plan.arena.get(dtype, 0)
        sizes[f"const_{dtype}"] = const_sizes[dtype]
    for s in schedules:
        for b in s.buffers.values():
            if b.kind == "input":
                sizes[f"input:{b.name.removeprefix('input_')}"] = b.size
    if flags:
        sizes["flags_u32"] = 1
    if scratch:
        sizes["scratch_f32"] = scratch
    return sizes


def const_layout(schedules: list[Schedule]
                 ) -> tuple[dict[str, bytes], dict[str, int], dict[str, int]]:
    """Every const buffer packed into its dtype's arena, in order of node id: the bytes
    of each arena (little-endian; bools one byte), offsets, and sizes (elements)."""
    seen = {b.name: b for s in schedules for b in s.buffers.values() if b.kind == "const"}
    blocks: dict[str, list[bytes]] = {"f32": [], "i32": [], "bool": []}
    at: dict[str, int] = {}
    sizes = {"f32": 0, "i32": 0, "bool": 0}
    for name in sorted(seen, key=lambda n: int(n[1:])):
        b = seen[name]
        assert b.value is not None
        at[name] = sizes[b.dtype]
        arr = np.asarray(b.value).reshape(-1)
        blocks[b.dtype].append(arr.astype({"f32": "<f4", "i32": "<i4", "bool": "u1"}[b.dtype])
                               .tobytes())
        sizes[b.dtype] += arr.size
    return {f"const_{d}": b"".join(v) for d, v in blocks.items()}, at, sizes


# ---- validation with ptxas (CI; no GPU needed) -------------------------------------------


def find_ptxas() -> str | None:
    """The ptxas to validate modules with: ``$PTXAS``, else the one in the installed
    ``nvidia-cuda-nvcc`` wheel (``nvidia/cu*/bin/ptxas``), else the first on PATH."""
    explicit = os.environ.get("PTXAS")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    try:
        import nvidia  # the namespace package of NVIDIA's wheels
    except ImportError:
        pass
    else:
        found = sorted(p for d in nvidia.__path__ for p in Path(d).glob("cu*/bin/ptxas"))
        if found:
            return str(found[-1])  # the newest CUDA
    return shutil.which("ptxas")


def assemble(source: str, target: str = "sm_80", ptxas: str | None = None) -> bytes:
    """Assemble ``source`` for ``target`` with ptxas; the cubin, or a BackendError with
    ptxas's messages."""
    exe = ptxas or find_ptxas()
    if exe is None:
        raise BackendError("ptxas not found: pip install nvidia-cuda-nvcc, or set $PTXAS")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "module.ptx", Path(tmp) / "module.cubin"
        src.write_text(source)
        res = subprocess.run([exe, f"-arch={target}", str(src), "-o", str(out)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BackendError(f"ptxas -arch={target} rejected the module:\n"
                               f"{res.stderr[:4000]}")
        return out.read_bytes()
