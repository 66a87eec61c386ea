"""Ahead-of-time stages, as in JAX: ``lower`` builds the training graph without
building anything; ``Lowered.compile()`` turns it into a step object."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferrograd.dsl.init import init_params
from ferrograd.dsl.model import Model, trace
from ferrograd.ir.autodiff import grad
from ferrograd.ir.errors import BackendError, TraceError
from ferrograd.ir.graph import Graph
from ferrograd.ir.ops import lookup
from ferrograd.ir.optim import Optimizer, init_state
from ferrograd.ir.passes import debug_level, optimize
from ferrograd.ir.printing import format_graph, to_dot
from ferrograd.ir.serialize import canonical, fingerprint

from .backends.cpu import Crate, render_crate
from .backends.rust import render_kernel
from .cpu_step import CompiledStep
from .memory import MemoryPlan, plan_memory
from .schedule import Schedule, entry_points, schedule
from .step import NumpyStep, Step

# Backends named in the design; "numpy" interprets, "cpu" builds a Rust module.
KNOWN_BACKENDS = ("numpy", "cpu", "cuda", "wgsl")
AVAILABLE = ("numpy", "cpu")
SOURCE_NAMES = {"rust": "cpu", "cpu": "cpu"}


@dataclass
class KernelInfo:
    """One generated kernel, for people: ``step.kernels``."""

    name: str
    kind: str
    ops: list[str]
    backend: str
    source: str

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.kind}: {', '.join(self.ops)})>"


class Lowered:
    """A model traced, differentiated, given its optimizer and optimized; not yet built."""

    def __init__(self, model: Model, graph: Graph, backend: str, seed: int,
                 optimizer: Optimizer | None, dims: dict[str, int]) -> None:
        self.model = model
        self.graph = graph
        self.backend = backend
        self.seed = seed
        self.optimizer = optimizer
        self.dims = dims

    @property
    def optimizer_config(self) -> dict[str, Any] | None:
        return None if self.optimizer is None else self.optimizer.config()

    @property
    def fingerprint(self) -> str:
        """Content hash of the training graph and the options that shape the build."""
        return fingerprint(self.graph)

    @functools.cached_property
    def schedules(self) -> list[Schedule]:
        """The kernels of each entry point (train, forward, grads): backend-neutral."""
        return [schedule(self.graph, keys, entry)
                for entry, keys in entry_points(self.graph).items()]

    @functools.cached_property
    def memory_plan(self) -> MemoryPlan:
        """Arena offsets of every intermediate and the peak bytes, known before building."""
        persistent = {b.name: b for s in self.schedules for b in s.buffers.values()
                      if b.kind in ("param", "state")}
        return plan_memory(self.schedules, list(persistent.values()))

    @functools.cached_property
    def crate(self) -> Crate:
        """The Rust crate of the CPU backend (rendered, not built)."""
        return render_crate(self.graph, self.schedules, self.memory_plan)

    @property
    def kernels(self) -> list[KernelInfo]:
        """Generated kernels, with their source. The NumPy backend runs the IR itself."""
        if self.backend == "numpy":
            return []
        dtypes = {b.name: b.dtype for s in self.schedules for b in s.buffers.values()}
        return [KernelInfo(k.name, k.kind, list(k.ops), self.backend, render_kernel(k, dtypes))
                for s in self.schedules for k in s.kernels]

    def source(self, backend: str | None = None) -> str:
        """Generated code for ``backend`` ("rust"/"cpu": the crate's lib.rs and kernels.rs;
        "numpy"/"ir": the IR listing the interpreter runs). Nothing is built."""
        backend = backend or self.backend
        if backend in ("numpy", "ir"):
            return format_graph(self.graph)
        if SOURCE_NAMES.get(backend) == "cpu":
            files = self.crate.files
            return "\n".join(f"// ==== {name}\n{files[name].decode()}"
                             for name in ("src/lib.rs", "src/kernels.rs"))
        raise _unavailable(backend)

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the IR as text, DOT and canonical JSON into ``directory``; for the CPU
        backend also the crate (Cargo.toml, src/), buildable with maturin."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.backend == "cpu":
            render_crate(self.graph, self.schedules, self.memory_plan, out).write(out)
        (out / "graph.txt").write_text(format_graph(self.graph) + "\n")
        (out / "graph.dot").write_text(to_dot(self.graph) + "\n")
        (out / "graph.json").write_text(json.dumps(json.loads(canonical(self.graph)),
                                                   indent=1) + "\n")
        return out

    def summary(self) -> str:
        """One paragraph: nodes by kind, params, optimizer state, inputs and outputs."""
        g = self.graph
        kinds = Counter(lookup(g.node(n).op).kind for n in g.nx.nodes)  # type: ignore[union-attr]
        floats = sum(g.node(n).size for n in g.params.values())
        state = sum(g.node(n).size for n in g.state.values())
        lines = [
            f"model {g.name} for backend {self.backend} (graph {self.fingerprint[:12]})",
            f"  {len(g)} nodes: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
            f"  {len(g.params)} params, {floats:,} values ({floats * 4 / 1e6:.2f} MB as f32); "
            f"{len(g.state)} optimizer buffers, {state:,} values",
            "  inputs: " + ", ".join(f"{k} {g.node(v).dtype}{list(g.node(v).shape)}"
                                     for k, v in g.inputs.items()),
            "  outputs: " + ", ".join(g.outputs) + (f"; {len(g.grads)} grads" if g.grads else "")
            + (f"; {len(g.updates)} updates" if g.updates else ""),
        ]
        return "\n".join(lines)

    def schedule_report(self, fusion_log: bool = False) -> str:
        """Each entry point's kernels (and why fusions were refused), and the memory plan."""
        lines = []
        for s in self.schedules:
            lines.append(f"schedule {s.entry}: {len(s.kernels)} kernels")
            lines += [f"  {k.name:<40} {k.kind:<12} {', '.join(k.ops)}" for k in s.kernels]
            if fusion_log and s.log:
                lines += [f"fusion log ({s.entry}):", *s.log]
        lines.append(self.memory_plan.summary())
        return "\n".join(lines)

    def compile(self) -> Step:
        params, state = init_params(self.graph, self.seed), init_state(self.graph)
        if self.backend == "numpy":
            return NumpyStep(self, params, state)
        if self.backend != "cpu":
            raise _unavailable(self.backend)
        from .build import build_module, cache_dir

        crate_dir = cache_dir() / "crates" / self.crate.module
        render_crate(self.graph, self.schedules, self.memory_plan, crate_dir).write(crate_dir)
        module = build_module(crate_dir, self.crate.module)
        return CompiledStep(self, module, params, state, "cpu")

    def __repr__(self) -> str:
        return (f"<fg.Lowered {self.graph.name} backend={self.backend} "
                f"nodes={len(self.graph)} params={len(self.graph.params)}>")


def _unavailable(backend: str) -> BackendError:
    if backend in KNOWN_BACKENDS and backend not in AVAILABLE:
        return BackendError(
            f"the {backend!r} backend is not part of this version of ferrograd yet; "
            f"backend='numpy' (the reference interpreter) runs every model")
    return BackendError(f"unknown backend {backend!r}; choose from {', '.join(KNOWN_BACKENDS)}")


def training_graph(model: Model, optimizer: Optimizer | None, dims: dict[str, int]) -> Graph:
    """Trace ``model``, add gradients (if it has a loss) and the optimizer's updates."""
    graph = trace(model, **dims)
    if optimizer is not None:
        if "loss" not in graph.outputs:
            raise TraceError(f"model {model.name!r} returns no 'loss', so an optimizer has "
                             "nothing to minimize", model.src)
        if not graph.params:
            raise TraceError(f"model {model.name!r} has no params to train", model.src)
    if "loss" in graph.outputs and graph.params:
        graph = grad(graph)
        if optimizer is not None:
            graph = optimizer.apply(graph)
    return optimize(graph)


def lower(model: Model, optimizer: Optimizer | None = None, backend: str = "cpu",
          seed: int = 0, **dims: int) -> Lowered:
    """Trace, differentiate and optimize ``model`` for ``backend`` without building.

    >>> import ferrograd as fg
    >>> @fg.model
    ... def f(x: fg.f32["B", 3]):
    ...     return fg.relu(fg.nn.linear(x, 2)).sum()
    >>> lowered = fg.lower(f, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=4)
    >>> sorted(lowered.graph.updates)
    ['linear_0.bias', 'linear_0.weight']
    """
    if not isinstance(model, Model):
        raise TraceError(f"expected a function decorated with @fg.model, got {model!r}")
    if backend not in KNOWN_BACKENDS:
        raise _unavailable(backend)
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an fg.optim optimizer, got {optimizer!r}")
    lowered = Lowered(model, training_graph(model, optimizer, dims), backend, seed, optimizer,
                      dims)
    level = debug_level()
    if level >= 1:
        print(lowered.summary(), file=sys.stderr)
        if backend != "numpy":
            print(lowered.schedule_report(fusion_log=True), file=sys.stderr)
    if level >= 2:
        print(lowered.source("ir" if backend == "numpy" else "rust"), file=sys.stderr)
    return lowered


def compile(model: Model, optimizer: Optimizer | None = None, backend: str = "cpu",
            seed: int = 0, **dims: int) -> Step:
    """``lower(...).compile()``: a step object that trains ``model`` one batch per call."""
    return lower(model, optimizer, backend, seed, **dims).compile()
