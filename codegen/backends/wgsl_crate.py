"""Assemble the WGSL backend's crate and its manifest.

The crate (``render_wgsl_crate``): ``Cargo.toml`` (the runtime with its ``wgsl``
feature), ``src/lib.rs`` (a ``#[pyclass] WgslStep`` with the same methods as the
CPU ``Step``: train, forward, grads, get, set), ``src/consts.bin``,
``shaders/*.wgsl`` and ``manifest.json``. The manifest (``manifest``) describes
the step for any WebGPU host: the storage buffers and where every arena, param,
input and result lives in them, the shaders, and each entry point's dispatches
in order; ``MANIFEST_README`` (written beside it as ``README.md``) says how to
run it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ferrograd._version import __version__
from ferrograd.ir.graph import Graph
from ferrograd.ir.serialize import fingerprint

from ..build import runtime_fingerprint
from ..launch_plan import BufferRef, DevicePlan, Launch
from ..schedule import safe_name
from .base import IndentedBuffer, check_ids
from .cpu import Crate, _rustfmt
from .wgsl_kernels import BINDINGS
from .wgsl_module import WgslModule

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
BINDING_NAMES = {"f32s": "F32", "i32s": "I32", "bools": "Bool"}
INPUT_FN = {"f32": "input_f32", "i32": "input_i32"}
WRITE_FN = {"f32s": "write_f32", "i32s": "write_i32"}
READ_FN = {"f32s": "f32", "i32s": "i32", "bools": "bool"}


def render_wgsl_crate(graph: Graph, module: WgslModule, crate_dir: Path | None = None
                      ) -> Crate:
    """Every file of the WGSL crate. ``crate_dir`` (where it will live) fixes the
    relative path to the runtime crate; by default the path is absolute."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True)
    shader_index = {name: i for i, name in enumerate(module.shaders)}
    plans = []
    for entry, plan in module.plans.items():
        dispatches = [{"shader": shader_index[launch.kernel], "groups": list(launch.grid),
                       "kernel": kernel}
                      for kernel, launch in zip(module.dispatched[entry], _launches(plan),
                                                strict=True)]
        plans.append({"entry": entry, "const": entry.upper(), "dispatches": dispatches})
    storage = module.storage
    consts = {d: (storage.base(f"const_{d}"), storage.regions[f"const_{d}"][2])
              for d in ("f32", "i32", "bool")}
    context = {
        "model": graph.name, "version": __version__, "entries": list(module.plans),
        "fingerprint": fingerprint(graph)[:16], "module": "MODULE",
        "layout": storage.sizes, "consts": consts, "shaders": list(module.shaders),
        "plans": plans, "persistent": _persistent(graph, module),
        "py_methods": [_py_method(graph, module, entry) for entry in module.plans],
    }
    lib_rs = _rustfmt(env.get_template("wgsl_lib.rs.j2").render(**context))
    const_bytes = b"".join(module.consts[f"const_{d}"] for d in ("f32", "i32", "bool"))
    shader_files = {f"shaders/{name}.wgsl": code.source for name, code in module.shaders.items()}
    digest = hashlib.sha256(__version__.encode())
    for rel, text in sorted({"src/lib.rs": lib_rs, **shader_files}.items()):
        digest.update(rel.encode() + text.encode())
    digest.update(const_bytes)
    digest.update(runtime_fingerprint().encode())
    name = f"fg_{safe_name(graph.name).lower()}_wgsl_{digest.hexdigest()[:12]}"
    runtime_path = str(RUNTIME) if crate_dir is None else os.path.relpath(RUNTIME, crate_dir)
    files = {
        "Cargo.toml": env.get_template("wgsl_Cargo.toml.j2").render(
            version=__version__, model=graph.name, module=name,
            runtime_path=runtime_path).encode(),
        "pyproject.toml": env.get_template("pyproject.toml.j2").render(
            version=__version__, module=name).encode(),
        "src/lib.rs": lib_rs.replace("MODULE", name).encode(),
        "src/consts.bin": const_bytes,
        "manifest.json": (json.dumps(manifest(graph, module), indent=1) + "\n").encode(),
        "README.md": MANIFEST_README.encode(),
    }
    files |= {rel: text.encode() for rel, text in shader_files.items()}
    return Crate(name, files)


def _launches(plan: DevicePlan) -> list[Launch]:
    """A WGSL plan's steps: kernel launches only (no library GEMMs)."""
    launches = [s for s in plan.steps if isinstance(s, Launch)]
    assert len(launches) == len(plan.steps)
    return launches


def _persistent(graph: Graph, module: WgslModule) -> list[dict[str, Any]]:
    """Every param and state buffer: name, kind, first element in ``f32s``, shape."""
    out = []
    for kind, table in (("param", graph.params), ("state", graph.state)):
        base = module.storage.base(kind)
        for name, nid in table.items():
            placed = module.persistent.get(f"{kind}_{safe_name(name)}")
            if placed is not None:
                out.append({"name": name, "kind": kind, "offset": base + placed[1],
                            "shape": list(graph.node(nid).shape)})
    return out


def _region(module: WgslModule, ref: BufferRef) -> tuple[str, int]:
    return module.storage.address(ref)


def _py_method(graph: Graph, module: WgslModule, entry: str) -> str:
    out = IndentedBuffer()
    params, loads, names, writes = [], [], [], []
    for k, v in graph.inputs.items():
        n = graph.node(v)
        name = safe_name(k)
        params.append(f"{name}: &Bound<'py, PyAny>")
        dims = ", ".join(map(str, n.shape))
        loads.append(f'let {name} = rt::py::{INPUT_FN[n.dtype]}({name}, "{k}", &[{dims}])?;')
        if (check := check_ids(graph, k, f"&{name}")) is not None:
            loads.append(check)
        names.append(name)
        array, at = _region(module, BufferRef(f"input:{k}", 0))
        writes.append(f"device.{WRITE_FN[array]}({at}, {name});")
    plan = module.plans[entry]
    reads = []
    for arena, offset, shape in plan.results.values():
        array, at = _region(module, BufferRef(arena, offset))
        size = int(np.prod(shape, dtype=np.int64))
        reads.append(f"Region {{ binding: Binding::{BINDING_NAMES[array]}, offset: {at}, "
                     f"len: {size} }}")
    doc = {"train": "One training step on a batch; returns the loss.",
           "forward": "The model's outputs on a batch, by name; no update.",
           "grads": "The gradient of every param on a batch, by name; no update."}[entry]
    ret = "f32" if entry == "train" else "Bound<'py, PyDict>"
    out.line(f"/// {doc}")
    out.line(f"#[pyo3(name = \"{entry}\")]")
    sig = ", ".join(["&mut self", "py: Python<'py>", *params])
    with out.indent(f"fn py_{entry}<'py>({sig}) -> PyResult<{ret}> {{"):
        for line in loads:
            out.line(line)
        for name in names:  # plain slices can cross into the thread without the GIL
            out.line(f"let {name} = &*{name};")
        out.line("let device = &mut self.device;")
        out.line(f"let reads = [{', '.join(reads)}];")
        with out.indent("let back = py.detach(|| {", "})?;"), \
                out.indent(f"rt::py::guard(\"{entry}\", || {{", "})"):
            for line in writes:
                out.line(line)
            out.line(f"device.run({entry.upper()}, &reads)")
        if entry == "train":
            out.line("Ok(back.f32(0)[0])")
        else:
            out.line("let out = PyDict::new(py);")
            for i, (key, (arena, offset, shape)) in enumerate(plan.results.items()):
                array, _ = _region(module, BufferRef(arena, offset))
                dims = ", ".join(map(str, shape))
                out.line(f"out.set_item(\"{key.split(':', 1)[1]}\", rt::py::to_numpy(py, "
                         f"&back.{READ_FN[array]}({i}), &[{dims}])?)?;")
            out.line("Ok(out)")
    return "\n".join("    " + line if line else line for line in out.lines)


# ---- the manifest -----------------------------------------------------------------------------


def manifest(graph: Graph, module: WgslModule) -> dict[str, Any]:
    """Everything another WebGPU host needs to run the step (see ``MANIFEST_README``)."""
    storage = module.storage
    bindings = [{"binding": BINDINGS[a][0], "name": a, "type": BINDINGS[a][1],
                 "elements": max(storage.sizes.get(a, 1), 1)} for a in BINDINGS]
    consts, at = {}, 0
    for d, elem in (("f32", 4), ("i32", 4), ("bool", 1)):
        array, base, n = storage.regions[f"const_{d}"]
        consts[d] = {"binding": BINDINGS[array][0], "offset": base, "elements": n,
                     "bytes": [at, at + n * elem]}
        at += n * elem
    inputs = []
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        array, base = storage.address(BufferRef(f"input:{name}", 0))
        inputs.append({"name": name, "dtype": node.dtype, "shape": list(node.shape),
                       "binding": BINDINGS[array][0], "offset": base,
                       "bound": graph.index_bounds.get(name)})
    entries = {}
    for entry, plan in module.plans.items():
        results = {}
        for key, (arena, offset, shape) in plan.results.items():
            array, base = storage.address(BufferRef(arena, offset))
            results[key] = {"binding": BINDINGS[array][0], "offset": base,
                            "shape": list(shape), "dtype": _dtype(array)}
        entries[entry] = {
            "dispatches": [{"shader": launch.kernel, "workgroups": list(launch.grid),
                            "kernel": kernel} for kernel, launch in
                           zip(module.dispatched[entry], _launches(plan), strict=True)],
            "results": results}
    return {
        "format": "ferrograd-wgsl/1", "ferrograd": __version__, "model": graph.name,
        "graph": fingerprint(graph)[:16],
        "bindings": bindings,
        "arenas": {a: {"binding": BINDINGS[arr][0], "offset": base, "elements": n}
                   for a, (arr, base, n) in storage.regions.items()},
        "constants": {"file": "src/consts.bin", **consts},
        "params": [{"binding": 0, **p} for p in _persistent(graph, module)
                   if p["kind"] == "param"],
        "state": [{"binding": 0, **p} for p in _persistent(graph, module)
                  if p["kind"] == "state"],
        "inputs": inputs,
        "shaders": {name: {"file": f"shaders/{name}.wgsl", "entry_point": "main",
                           "workgroup_size": list(code.workgroup_size),
                           "workgroup_bytes": code.shared_bytes}
                    for name, code in module.shaders.items()},
        "entries": entries,
    }


def _dtype(array: str) -> str:
    return {"f32s": "f32", "i32s": "i32", "bools": "bool"}[array]


MANIFEST_README = """\
# A ferrograd training step for WebGPU

`manifest.json` and `shaders/*.wgsl` are a complete description of the step;
`src/` is the Rust module ferrograd builds from them (wgpu), and any other
WebGPU host (a browser, Dawn) can run the same step:

1. **Buffers.** Create the storage buffers of `bindings` (4-byte elements:
   `f32s` of f32, `i32s` of i32, `bools` of u32 holding 0 or 1, `status` one
   u32), usage STORAGE | COPY_SRC | COPY_DST, zero-filled. One bind group
   layout (group 0) holds the four as read-write storage buffers, visible to
   compute; one bind group binds them whole. Every shader uses this layout
   (a shader declares only the bindings it touches).
2. **Pipelines.** One compute pipeline per entry of `shaders` (entry point
   `main`) with that layout. A shader that fails validation is an error.
3. **Constants.** Copy `constants.f32` / `.i32` / `.bool` from
   `src/consts.bin` (the byte range `bytes`: little-endian f32 and i32, one
   byte per bool, to be widened to u32) to `offset` (in elements) of their
   binding, once.
4. **Params and optimizer state** live in `f32s` at each entry's `offset`
   (elements, row-major `shape`). Write initial values there (ferrograd's own
   initializers, or a checkpoint), and read them back the same way.
5. **A step** (`entries.train`, or `forward` / `grads`): write each input
   (row-major; ids checked against `bound` on the host: `0 <= id < bound`) to
   its `offset` in its binding; clear `status`; in one compute pass, dispatch
   each of `dispatches` in order with its `workgroups` (x, y, z) and the bind
   group (the pass orders dispatches, no barriers are needed); then copy each of
   `results` (`offset`, `shape`, `dtype`) and `status` into a MAP_READ buffer
   and map it. `status` nonzero means an id was out of range inside the model.
   `train` returns the loss and updates params and state in place.

Offsets are baked into the shaders, so nothing else is passed: no uniforms,
no push constants. Arenas (`arenas`) are regions of the bindings; temps of
different entry points share them, so run one entry point at a time.
"""
