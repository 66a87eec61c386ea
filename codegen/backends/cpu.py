"""Assemble the CPU crate: kernels.rs (from rust.py), lib.rs and Cargo.toml (from
templates), consts.bin, and pyproject.toml for maturin.

The module is named by a hash of everything rendered, so a change anywhere —
graph, options, or ferrograd's renderer — makes a new module, and an unchanged
model loads the build it already has.

With ``profile=True`` the entry points time every kernel call (``std::time::Instant``
around it) into per-kernel counters of the ``Step`` that Python reads back
(``Step.profile()``); without it no timing code is rendered at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ferrograd._version import __version__
from ferrograd.ir.errors import BackendError
from ferrograd.ir.graph import Graph
from ferrograd.ir.serialize import fingerprint

from ..build import runtime_fingerprint
from ..cpu_level import build_level, rustc_flags
from ..kernel_ir import Buffer, Conv
from ..launch_plan import DeviceModule
from ..memory import MemoryPlan
from ..schedule import Schedule, safe_name
from .base import IndentedBuffer, check_ids
from .cuda import render_cuda_step
from .rust import (
    RUST_TYPES,
    KernelArgs,
    conv_params,
    fallible,
    may_run_parallel,
    render_kernel,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
# An entry point with at least this many kernels that may split over rayon runs on a
# pool thread (rt::threads::on_pool): crossing into the pool costs one wake-up (~4 us)
# per step there, instead of one per parallel kernel from the calling thread.
ON_POOL_MIN_KERNELS = 2


@dataclass
class Crate:
    module: str
    files: dict[str, bytes]
    rustc_flags: tuple[str, ...] = ()  # for the crate itself (maturin build -- FLAGS)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_bytes() != data:
                path.write_bytes(data)
        return directory


def render_crate(graph: Graph, schedules: list[Schedule], plan: MemoryPlan,
                 crate_dir: Path | None = None, device: DeviceModule | None = None,
                 profile: bool = False, cpu_level: str | None = None) -> Crate:
    """Every file of the crate. ``crate_dir`` (where it will live) fixes the relative
    path to the runtime crate; by default the path is absolute. With ``device`` (the
    PTX renderer's module) the crate also holds a ``CudaStep`` (``backends/cuda.py``)
    and enables the runtime's ``cuda`` feature. With ``profile`` the CPU entry points
    time each kernel call (one counter slot per kernel of each entry point).
    ``cpu_level`` (``cpu_level.LEVELS``; default ``build_level()``) is the x86-64
    level the crate compiles for, checked by the module's init."""
    level = build_level() if cpu_level is None else cpu_level
    consts, const_at, const_sizes = _consts(schedules)
    dtypes = {b.name: b.dtype for s in schedules for b in s.buffers.values()}
    kernels_rs, fn_of = _kernels_rs(graph, schedules, dtypes)
    slots = [(s.entry, k.name) for s in schedules for k in s.kernels] if profile else []
    entries = [_entry_fn(graph, s, plan, const_at, fn_of, slots) for s in schedules]
    methods = [_py_method(graph, s, plan) for s in schedules]
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True)
    persistent = [{"name": _persistent_name(graph, buf), "kind": kind, "offset": off,
                   "shape": list(graph.node(graph.persistent()[_persistent_name(graph, buf)]
                                            ).shape)}
                  for buf, (kind, off, _) in plan.persistent.items()]
    sizes = {
        "PARAM_LEN": plan.persistent_size.get("param", 0),
        "STATE_LEN": plan.persistent_size.get("state", 0),
        "TEMP_F32_LEN": plan.arena.get("f32", 0), "TEMP_I32_LEN": plan.arena.get("i32", 0),
        "TEMP_BOOL_LEN": plan.arena.get("bool", 0),
        "CONST_F32_LEN": const_sizes["f32"], "CONST_I32_LEN": const_sizes["i32"],
        "CONST_BOOL_LEN": const_sizes["bool"],
        "CONST_I32_AT": const_sizes["f32"] * 4,
        "CONST_BOOL_AT": const_sizes["f32"] * 4 + const_sizes["i32"] * 4,
    }
    buffer_consts = "\n".join(f"const {k}: usize = {v};" for k, v in sizes.items())
    graph_fingerprint = fingerprint(graph)[:16]
    convs = sorted({conv_params(k) for s in schedules for k in s.kernels
                    if isinstance(k, Conv)})
    context = {"convs": convs, "version": __version__, "model": graph.name,
               "entries": [s.entry for s in schedules], "fingerprint": graph_fingerprint,
               "buffer_consts": buffer_consts, "entry_fns": entries, "py_methods": methods,
               "persistent": persistent, "module": "MODULE", "cuda": device is not None,
               "profile": profile, "profile_slots": slots,
               "cpu_level": level.capitalize()}  # rt::simd::Level's variant
    lib_rs = env.get_template("lib.rs.j2").render(**context)
    body = {"src/lib.rs": lib_rs, "src/kernels.rs": kernels_rs}
    data = {"src/consts.bin": consts}
    if device is not None:
        cuda = render_cuda_step(graph, device, "MODULE")
        body["src/cuda_step.rs"] = cuda.pop("src/cuda_step.rs").decode()
        data.update(cuda)
    body = {k: _rustfmt(v) for k, v in body.items()}
    digest = hashlib.sha256(__version__.encode())
    for k in sorted(body):
        digest.update(k.encode() + body[k].encode())
    for k in sorted(data):
        if k != "src/consts.bin":
            digest.update(k.encode())
        digest.update(data[k])
    digest.update(runtime_fingerprint().encode())
    digest.update(" ".join(rustc_flags(level)).encode())
    module = f"fg_{safe_name(graph.name).lower()}_{digest.hexdigest()[:12]}"
    runtime_path = str(RUNTIME) if crate_dir is None else os.path.relpath(RUNTIME, crate_dir)
    files = {
        "Cargo.toml": env.get_template("Cargo.toml.j2").render(
            version=__version__, model=graph.name, module=module, runtime_path=runtime_path,
            runtime_features=[] if device is None else ["cuda"],
            rustc_flags=" ".join(rustc_flags(level))).encode(),
        "pyproject.toml": env.get_template("pyproject.toml.j2").render(
            version=__version__, module=module).encode(),
        **data,
    }
    for k, v in body.items():
        files[k] = v.replace("MODULE", module).encode()
    return Crate(module, files, rustc_flags(level))


def _persistent_name(graph: Graph, buf: str) -> str:
    for name in graph.persistent():
        kind = "param" if name in graph.params else "state"
        if f"{kind}_{safe_name(name)}" == buf:
            return name
    raise KeyError(buf)


def _rustfmt(code: str) -> str:
    """Format like a person would (rustfmt, when the toolchain has it)."""
    exe = shutil.which("rustfmt")
    if exe is None:
        return code
    res = subprocess.run([exe, "--edition", "2021", "--emit", "stdout"], input=code,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:  # generated code that does not parse is a ferrograd bug
        raise BackendError(f"rustfmt rejected the generated code:\n{res.stderr[:2000]}")
    return res.stdout


def _consts(schedules: list[Schedule]) -> tuple[bytes, dict[str, int], dict[str, int]]:
    """Pack every const buffer: f32 block, then i32, then bool (one byte each)."""
    blocks: dict[str, list[np.ndarray]] = {"f32": [], "i32": [], "bool": []}
    at: dict[str, int] = {}
    sizes = {"f32": 0, "i32": 0, "bool": 0}
    seen: dict[str, Buffer] = {}
    for s in schedules:
        for b in s.buffers.values():
            if b.kind == "const" and b.name not in seen:
                seen[b.name] = b
    for name in sorted(seen, key=lambda n: int(n[1:])):
        b = seen[name]
        assert b.value is not None
        at[name] = sizes[b.dtype]
        arr = np.asarray(b.value).reshape(-1)
        blocks[b.dtype].append(arr.astype({"f32": "<f4", "i32": "<i4", "bool": "u1"}[b.dtype]))
        sizes[b.dtype] += arr.size
    data = b"".join(a.tobytes() for d in ("f32", "i32", "bool") for a in blocks[d])
    return data, at, sizes


def _kernels_rs(graph: Graph, schedules: list[Schedule], dtypes: dict[str, str]
                ) -> tuple[str, dict[str, str]]:
    """kernels.rs, and the function each kernel calls (identical kernels are shared:
    forward's kernels are usually the first kernels of train)."""
    out = IndentedBuffer()
    out.line(f"//! Kernels of model `{graph.name}`, generated by ferrograd {__version__}.")
    out.line("//!")
    out.line("//! Plain functions over slices, called in order by the entry points in lib.rs.")
    out.line("//! Loops index several row slices in lockstep, hence the range loops.")
    out.line("#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]")
    out.line("#![allow(unused_imports)]")
    out.line()
    out.line("use ferrograd_runtime as rt;")
    out.line("use rayon::prelude::*;")
    out.line("use std::f32::consts;")
    out.line()
    out.line("/// The runtime's exp, ln, tanh and erf, with fused multiply-adds where this")
    out.line("/// build's CPU level has them (a `cfg!` in the runtime would see its own).")
    out.line("#[allow(dead_code)]")
    out.line('type Math = rt::math::Math<{ cfg!(target_feature = "fma") }>;')
    by_body: dict[str, str] = {}
    fn_of: dict[str, str] = {}
    for s in schedules:
        for k in s.kernels:
            text = render_kernel(k, dtypes)
            body = text.replace(f"fn {k.name}(", "fn KERNEL(")
            if body not in by_body:
                by_body[body] = k.name
                out.line()
                out.extend(text)
            fn_of[k.name] = by_body[body]
    return out.getvalue(), fn_of


def _slice_expr(buf: Buffer, mutable: bool, plan: MemoryPlan, entry: str,
                const_at: dict[str, int]) -> str:
    method = "slice_mut" if mutable else "slice"
    if buf.kind == "input":
        return buf.name
    if buf.kind in ("param", "state"):
        _, off, size = plan.persistent[buf.name]
        return f"a.{buf.kind}.{method}({off}, {size})"
    if buf.kind == "const":
        return f"a.const_{buf.dtype}.{method}({const_at[buf.name]}, {buf.size})"
    p = plan.temps[entry][buf.name]
    return f"a.temp_{buf.dtype}.{method}({p.offset}, {buf.size})"


def _entry_fn(graph: Graph, s: Schedule, plan: MemoryPlan, const_at: dict[str, int],
              fn_of: dict[str, str], slots: list[tuple[str, str]]) -> str:
    """The entry point's function on ``Arenas``: every kernel call in order. With profile
    ``slots`` (entry, kernel) each call is timed into its slot of ``a.profile``."""
    out = IndentedBuffer()
    inputs = ", ".join(f"input_{safe_name(k)}: &[{RUST_TYPES[graph.node(v).dtype]}]"
                       for k, v in graph.inputs.items())
    out.line(f"/// `{s.entry}`: {len(s.kernels)} kernels.")
    with out.indent(f"fn {s.entry}(&mut self, {inputs}) -> Result<(), rt::Error> {{"):
        out.line("let a = &*self;")
        out.line("// SAFETY: the memory plan gives buffers that are live at the same time")
        out.line("// disjoint ranges of their arena, and a kernel writing a buffer in place")
        out.line("// reads it only through that same mutable slice.")
        with out.indent("unsafe {"):
            for k in s.kernels:
                args = KernelArgs(k, {b.name: b.dtype for b in s.buffers.values()})
                exprs = [_slice_expr(s.buffers[b], mut, plan, s.entry, const_at)
                         for b, mut in args.order]
                if args.scratch:
                    exprs.append("a.scratch.slice_mut(0, a.scratch.len())")
                call = f"kernels::{fn_of[k.name]}({', '.join(exprs)})"
                if slots:
                    out.line("let t = std::time::Instant::now();")
                out.line(call + ("?;" if fallible(k) else ";"))
                if slots:
                    out.line(f"a.profile.record({slots.index((s.entry, k.name))}, t);")
        out.line("Ok(())")
    return "\n".join("    " + line if line else line for line in out.lines)


def _py_method(graph: Graph, s: Schedule, plan: MemoryPlan) -> str:
    out = IndentedBuffer()
    params = []
    loads = []
    names = []
    for k, v in graph.inputs.items():
        n = graph.node(v)
        name = safe_name(k)
        params.append(f"{name}: &Bound<'py, PyAny>")
        loads.append(f"let {name} = rt::py::input_{RUST_TYPES[n.dtype]}({name}, {k!r:}, "
                     f"&[{', '.join(map(str, n.shape))}])?;".replace("'", '"'))
        if (check := check_ids(graph, k, f"&{name}")) is not None:
            loads.append(check)
        names.append(name)
    doc = {"train": "One training step on a batch; returns the loss.",
           "forward": "The model's outputs on a batch, by name; no update.",
           "grads": "The gradient of every param on a batch, by name; no update."}[s.entry]
    ret = "f32" if s.entry == "train" else "Bound<'py, PyDict>"
    out.line(f"/// {doc}")
    out.line(f"#[pyo3(name = \"{s.entry}\")]")
    sig = ", ".join(["&mut self", "py: Python<'py>", *params])
    with out.indent(f"fn py_{s.entry}<'py>({sig}) -> PyResult<{ret}> {{"):
        for line in loads:
            out.line(line)
        for name in names:  # plain slices can cross into the thread without the GIL
            out.line(f"let {name} = &*{name};")
        slices = ", ".join(names)
        out.line("let arenas = &mut self.arenas;")
        run = f"{{ let _ftz = rt::fpenv::FlushDenormals::new(); arenas.{s.entry}({slices}) }}"
        if sum(map(may_run_parallel, s.kernels)) >= ON_POOL_MIN_KERNELS:
            run = f"rt::threads::on_pool(|| {run})"
        out.line(f"py.detach(|| rt::py::guard(\"{s.entry}\", || {run}))?;")
        if s.entry == "train":
            p = plan.temps["train"][s.results["out:loss"]]
            out.line(f"Ok(self.arenas.temp_f32.slice({p.offset}, 1)[0])")
        else:
            out.line("let out = PyDict::new(py);")
            for key, buf in s.results.items():
                b = s.buffers[buf]
                p = plan.temps[s.entry][buf]
                shape = graph.node(graph.results()[key]).shape
                name = key.split(":", 1)[1]
                out.line(f"let values = self.arenas.temp_{b.dtype}.slice({p.offset}, {b.size});")
                out.line(f"out.set_item(\"{name}\", rt::py::to_numpy(py, values, "
                         f"&[{', '.join(map(str, shape))}])?)?;")
            out.line("Ok(out)")
    return "\n".join("    " + line if line else line for line in out.lines)
