"""The generated crate's CUDA step: ``src/cuda_step.rs`` (a ``#[pyclass] CudaStep``
over ``ferrograd_runtime::cuda``), ``src/kernels.ptx`` and ``src/device_consts.bin``,
written from a ``DeviceModule`` (``launch_plan.py``) — the PTX renderer's output.

The plans become Rust constants that mirror ``launch_plan.py`` one to one (a
``Launch`` per kernel launch, a ``Gemm`` with its fallback launch per matrix
product); the runtime allocates the arenas, resolves every ``BufferRef`` and runs
them. ``CudaStep`` has the Python methods of the CPU ``Step`` (``train``,
``forward``, ``grads``, ``get``, ``set``), so ``CompiledStep`` drives either, plus
``steps`` (K training steps on stacked batches with one wait: ``Step.steps``).
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ferrograd._version import __version__
from ferrograd.ir.errors import BackendError
from ferrograd.ir.graph import Graph

from ..launch_plan import BufferRef, DeviceModule, Gemm, Launch, ScalarArg
from ..schedule import safe_name
from .base import IndentedBuffer, check_ids, f32_literal

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# element type of an arena, by the suffix of its name (inputs: by the input's dtype)
ARENA_ELEMS = {"param": "F32", "state": "F32", "f32": "F32", "i32": "I32", "bool": "U8",
               "u32": "U32"}
INPUT_TYPES = {"f32": ("f32", "F32"), "i32": ("i32", "I32")}  # dtype -> (rt::py, HostInput)
DOCS = {"train": "One training step on a batch; returns the loss.",
        "forward": "The model's outputs on a batch, by name; no update.",
        "grads": "The gradient of every param on a batch, by name; no update."}


def render_cuda_step(graph: Graph, device: DeviceModule, module: str) -> dict[str, bytes]:
    """The CUDA step's files (``cuda_step.rs`` not yet rustfmt-ed; ``module`` is the
    Python module name, or a placeholder the caller replaces)."""
    arenas = [{"name": name, "elem": _elem(graph, name), "len": size,
               "id_bound": device.id_bounds.get(name)}
              for name, size in device.arena_sizes.items()]
    consts, ranges = b"", []
    for name in sorted(device.consts):
        data = device.consts[name]
        if data:
            if name not in device.arena_sizes:
                raise BackendError(f"the device module has constants for arena {name!r}, "
                                   "which it does not size")
            ranges.append({"arena": name, "start": len(consts), "end": len(consts) + len(data)})
            consts += data
    plans = []
    for entry, plan in device.plans.items():
        results = [{"key": key, "arena": arena, "offset": offset, "shape": list(shape)}
                   for key, (arena, offset, shape) in plan.results.items()]
        plans.append({"entry": entry, "const": entry.upper(), "results": results,
                      "steps": [_step(s) for s in plan.steps],
                      "after": [list(a) for a in plan.after]})
    methods = [_py_method(graph, device, entry) for entry in device.plans]
    if "train" in device.plans:
        methods.append(_py_steps(graph, device))
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True)
    text = env.get_template("cuda_step.rs.j2").render(
        model=graph.name, version=__version__, module=module, entries=list(device.plans),
        const_ranges=ranges, arenas=arenas, plans=plans, py_methods=methods)
    return {"src/cuda_step.rs": text.encode(), "src/kernels.ptx": device.source.encode(),
            "src/device_consts.bin": consts}


def _elem(graph: Graph, arena: str) -> str:
    if arena.startswith("input:"):
        name = arena.removeprefix("input:")
        for k, v in graph.inputs.items():
            if safe_name(k) == name:
                return INPUT_TYPES[graph.node(v).dtype][1]
        raise BackendError(f"the device module has an arena for unknown input {name!r}")
    elem = ARENA_ELEMS.get(arena.rsplit("_", 1)[-1])
    if elem is None:
        raise BackendError(f"the device module has an arena {arena!r} of unknown type")
    return elem


# ---- plans as Rust constants -----------------------------------------------------------


def _ref(r: BufferRef) -> str:
    return f'BufferRef::new("{r.arena}", {r.offset})'


def _arg(a: BufferRef | ScalarArg) -> str:
    if isinstance(a, BufferRef):
        return f'Arg::buf("{a.arena}", {a.offset})'
    if a.kind == "f32":
        return f"Arg::F32({f32_literal(float(a.value))})"
    kind = {"u32": "U32", "s32": "S32"}.get(a.kind)
    if kind is None:
        raise BackendError(f"unknown scalar kind {a.kind!r} in a launch plan")
    return f"Arg::{kind}({int(a.value)})"


def _triple(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _launch(launch: Launch) -> str:
    return (f'Launch {{ kernel: "{launch.kernel}", grid: {_triple(launch.grid)}, '
            f"block: {_triple(launch.block)}, shared_bytes: {launch.shared_bytes}, "
            f"args: &[{', '.join(_arg(a) for a in launch.args)}] }}")


def _step(step: Launch | Gemm) -> str:
    if isinstance(step, Launch):
        return f"Step::Launch({_launch(step)})"
    fallback = "None" if step.fallback is None else f"Some({_launch(step.fallback)})"
    bias = "None" if step.bias is None else f"Some({_ref(step.bias)})"
    return (f"Step::Gemm(Gemm {{ batch: {step.batch}, m: {step.m}, n: {step.n}, "
            f"k: {step.k}, a: {_ref(step.a)}, a_strides: {_triple(step.a_strides)}, "
            f"b: {_ref(step.b)}, b_strides: {_triple(step.b_strides)}, "
            f"c: {_ref(step.c)}, c_strides: {_triple(step.c_strides)}, "
            f"fallback: {fallback}, bias: {bias}, relu: {str(step.relu).lower()}, "
            f"outer: {step.outer}, outer_strides: {_triple(step.outer_strides)}, "
            f"alpha: {f32_literal(step.alpha)}, beta: {f32_literal(step.beta)}, "
            f"tiled: &[{', '.join(_launch(t) for t in step.tiled)}] }})")


# ---- the Python methods ------------------------------------------------------------------


def _py_method(graph: Graph, device: DeviceModule, entry: str) -> str:
    """``train`` / ``forward`` / ``grads``: check and borrow the inputs (NumPy
    arrays, or device arrays through ``__cuda_array_interface__``), copy them into
    the input arenas (host to device, or device to device), run the plan, bring
    back the loss or the results."""
    out = IndentedBuffer()
    params, loads, feeds = _inputs(graph, device, lead="")
    ret = "f32" if entry == "train" else "Bound<'py, PyDict>"
    out.line(f"/// {DOCS[entry]}")
    out.line(f'#[pyo3(name = "{entry}")]')
    sig = ", ".join(["&mut self", "py: Python<'py>", *params])
    with out.indent(f"fn py_{entry}<'py>({sig}) -> PyResult<{ret}> {{"):
        for line in loads:
            out.line(line)
        out.line("let exec = &mut self.exec;")
        # train returns the loss itself (the closure's value is the method's); the others
        # turn the results into a dict after leaving the GIL-free section
        opening = "py.detach(|| {" if entry == "train" else "let result = py.detach(|| {"
        with out.indent(opening, "})" if entry == "train" else "});"), \
                out.indent(f'rt::py::guard("{entry}", || {{', "})"):
            if entry == "train":
                # the loss comes back in pinned memory, copied before the wait
                _loss(device)  # the runtime finds it by key: a plan without it fails here
                out.line(f'exec.run_scalar("train", &[{", ".join(feeds)}], "out:loss")')
            else:
                out.line(f'exec.run("{entry}", &[{", ".join(feeds)}])?;')
                out.line(f'exec.results("{entry}")')
        if entry != "train":
            out.line("rt::cuda::py::results_dict(py, result?)")
    return _indented(out)


def _py_steps(graph: Graph, device: DeviceModule) -> str:
    """``steps``: ``count`` training steps back to back on batches stacked along a new
    leading axis of every input (checked and borrowed as ``train`` does), queued
    without waiting; their losses come back together, after one wait."""
    out = IndentedBuffer()
    _loss(device)  # the runtime finds it by key: a plan without it fails here, not later
    params, loads, feeds = _inputs(graph, device, lead="count, ")
    out.line("/// `count` training steps back to back, step k on batch k of every input")
    out.line("/// (stacked along a new leading axis), with one wait at the end; returns")
    out.line("/// the `count` losses.")
    out.line('#[pyo3(name = "steps")]')
    sig = ", ".join(["&mut self", "py: Python<'py>", "count: usize", *params])
    with out.indent(f"fn py_steps<'py>({sig}) -> PyResult<Bound<'py, numpy::PyArrayDyn<f32>>> {{"):
        for line in loads:
            out.line(line)
        out.line("let exec = &mut self.exec;")
        with out.indent("let losses = py.detach(|| {", "})?;"), \
                out.indent('rt::py::guard("steps", || {', "})"):
            out.line(f'exec.run_steps("train", count, &[{", ".join(feeds)}], "out:loss")')
        out.line("rt::py::to_numpy_f32(py, &losses, &[count])")
    return _indented(out)


def _inputs(graph: Graph, device: DeviceModule, lead: str
            ) -> tuple[list[str], list[str], list[str]]:
    """Per input of the model: its parameter, the lines that check and borrow it as an
    array of its shape after the dims ``lead`` (e.g. ``"count, "``), and its feed."""
    params, loads, feeds = [], [], []
    for k, v in graph.inputs.items():
        n = graph.node(v)
        name = safe_name(k)
        if n.dtype not in INPUT_TYPES:
            raise BackendError(f"input {k!r}: the CUDA step takes f32 and i32 inputs, "
                               f"not {n.dtype}")
        rust_type, _ = INPUT_TYPES[n.dtype]
        params.append(f"{name}: &Bound<'py, PyAny>")
        shape = lead + ", ".join(map(str, n.shape))
        # A NumPy array, or a device array (__cuda_array_interface__: CuPy, PyTorch)
        loads.append(f'let {name} = rt::cuda::py::feed_{rust_type}({name}, "{k}", &[{shape}])?;')
        if (check := check_ids(graph, k, "ids")) is not None:
            # Ids on the host are checked before anything runs; ids on the device, as
            # the runtime copies them into their arena (ArenaSpec::id_bound).
            loads.append(f"if let Some(ids) = {name}.host() {{ {check} }}")
        loads.append(f"let {name} = {name}.feed();")
        if f"input:{name}" in device.arena_sizes:  # an input no kernel reads has no arena
            feeds.append(f'("{name}", {name})')
    return params, loads, feeds


def _loss(device: DeviceModule) -> tuple[str, int, tuple[int, ...]]:
    """Where the train plan leaves the loss: (arena, offset, shape)."""
    results = device.plans["train"].results
    if "out:loss" not in results:
        raise BackendError("the train plan does not bring back out:loss")
    return results["out:loss"]


def _indented(out: IndentedBuffer) -> str:
    """A method's lines, indented into the ``impl`` block."""
    return "\n".join("    " + line if line else line for line in out.lines)
