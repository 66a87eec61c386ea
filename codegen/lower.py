"""Ahead-of-time stages, as in JAX: ``lower`` traces a model and stands for its
training graph without building anything; ``Lowered.compile()`` turns it into a
step object. A model whose module is in the cache compiles after tracing alone
(``cache.py``): autodiff, passes, scheduling and rendering run only when needed."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ferrograd.dsl.init import init_params
from ferrograd.dsl.model import Model, trace
from ferrograd.ir.autodiff import grad
from ferrograd.ir.errors import BackendError, TraceError
from ferrograd.ir.graph import Graph
from ferrograd.ir.ops import lookup
from ferrograd.ir.optim import Optimizer
from ferrograd.ir.passes import debug_level, optimize
from ferrograd.ir.printing import format_graph, to_dot
from ferrograd.ir.serialize import canonical, fingerprint

from .cpu_step import CompiledStep
from .cuda_step import open_cuda_step
from .interface import Interface
from .step import NumpyStep, Step

if TYPE_CHECKING:
    from .backends.cpu import Crate
    from .backends.wgsl_module import WgslModule
    from .kernel_ir import Buffer
    from .launch_plan import DeviceModule
    from .memory import MemoryPlan
    from .schedule import Schedule

# The scheduler, the memory planner and the renderers (sympy, jinja2) are imported
# where they are used: a step whose module is in the cache needs none of them.

# Backends named in the design; "numpy" interprets, "cpu" builds a Rust module, "cuda"
# the same module with a CUDA step (PTX and launch plans) beside the CPU one.
KNOWN_BACKENDS = ("numpy", "cpu", "cuda", "wgsl")
AVAILABLE = ("numpy", "cpu", "cuda", "wgsl")
SOURCE_NAMES = {"rust": "cpu", "cpu": "cpu", "ptx": "cuda", "cuda": "cuda", "wgsl": "wgsl"}


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
    """A model traced, differentiated, given its optimizer and optimized; not yet built.

    Everything after tracing happens on first use: ``compile()`` of a model whose
    module is in the cache loads it after tracing alone (see ``cache.py``), and
    ``graph``, ``schedules``, ``kernels``, ``source()`` lower it when asked."""

    def __init__(self, model: Model, graph: Graph | None, backend: str, seed: int,
                 optimizer: Optimizer | None, dims: dict[str, int],
                 backends: tuple[str, ...] | None = None, profile: bool = False, *,
                 traced: Graph | None = None) -> None:
        if graph is None and traced is None:
            raise TypeError("Lowered needs the training graph or the traced graph")
        self.model = model
        # The graph as traced, before autodiff, optimizer and passes (None when this
        # lowering was made from a training graph): the cache's key.
        self.traced = traced
        if graph is not None:
            self.__dict__["graph"] = graph
        self.backend = backend  # the default device of compile()
        self.backends = backends or (backend,)  # what the module holds
        self.seed = seed
        self.optimizer = optimizer
        self.dims = dims
        # Whether the CPU step's entry points time every kernel call (``Step.profile()``).
        self.profile = profile
        self._device_modules: dict[tuple[str, bool], DeviceModule] = {}

    @functools.cached_property
    def graph(self) -> Graph:
        """The training graph: the traced graph differentiated, with the optimizer's
        updates, through the passes."""
        assert self.traced is not None
        return _training_graph(self.traced, self.optimizer)

    @functools.cached_property
    def interface(self) -> Interface:
        """What a step shows and keeps: inputs, outputs, params, optimizer state."""
        return Interface.of(self.graph if self.traced is None else self.traced, self.graph)

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
        from .schedule import entry_points, schedule

        return [schedule(self.graph, keys, entry)
                for entry, keys in entry_points(self.graph).items()]

    @functools.cached_property
    def memory_plan(self) -> MemoryPlan:
        """Arena offsets of every intermediate and the peak bytes, known before building."""
        from .memory import plan_memory

        return plan_memory(self.schedules, self._persistent())

    @functools.cached_property
    def ptx_schedules(self) -> list[Schedule]:
        """The schedules the PTX backend renders: ``schedules`` with the column matrices
        of forward convs kept for their weight gradients (``ptx_conv.keep_columns``);
        ``schedules`` itself when no conv keeps any."""
        from .backends.ptx_conv import keep_columns

        kept = [keep_columns(s) for s in self.schedules]
        same = all(a is b for a, b in zip(kept, self.schedules, strict=True))
        return self.schedules if same else kept

    @functools.cached_property
    def ptx_memory_plan(self) -> MemoryPlan:
        """The memory plan of ``ptx_schedules`` (params and state laid out as in
        ``memory_plan``, which it is when the schedules are the same)."""
        if self.ptx_schedules is self.schedules:
            return self.memory_plan
        from .memory import plan_memory

        return plan_memory(self.ptx_schedules, self._persistent())

    def _persistent(self) -> list[Buffer]:
        persistent = {b.name: b for s in self.schedules for b in s.buffers.values()
                      if b.kind in ("param", "state")}
        return list(persistent.values())

    @functools.cached_property
    def crate(self) -> Crate:
        """The Rust crate of the CPU backend, with the CUDA step when lowered for "cuda"
        (rendered, not built)."""
        from .backends.cpu import render_crate

        return render_crate(self.graph, self.schedules, self.memory_plan,
                            device=self._cuda_part(), profile=self.profile)

    @functools.cached_property
    def wgsl(self) -> WgslModule:
        """The WGSL shaders and launch plans of the wgsl backend (rendered, not built)."""
        from .backends.wgsl_module import render_wgsl

        return render_wgsl(self.graph, self.schedules, self.memory_plan)

    def _cuda_part(self) -> DeviceModule | None:
        return self.device_module("ptx") if "cuda" in self.backends else None

    @property
    def kernels(self) -> list[KernelInfo]:
        """Generated kernels, with their source. The NumPy backend runs the IR itself."""
        if self.backend == "numpy":
            return []
        if self.backend == "wgsl":
            from .wgsl_step import wgsl_kernels

            return wgsl_kernels(self)
        dtypes = {b.name: b.dtype for s in self.schedules for b in s.buffers.values()}
        if self.backend == "cuda":
            from .backends.ptx import aligned_buffers, device_kernels, kernel_source

            schedules = self.ptx_schedules
            dtypes = {b.name: b.dtype for s in schedules for b in s.buffers.values()}
            aligned = aligned_buffers(schedules)
            return [KernelInfo(k.name, k.kind, list(k.ops), self.backend,
                               kernel_source(k, dtypes, aligned=aligned))
                    for s in schedules for k in device_kernels(s, self.ptx_memory_plan)]
        from .backends.rust import render_kernel

        return [KernelInfo(k.name, k.kind, list(k.ops), self.backend, render_kernel(k, dtypes))
                for s in self.schedules for k in s.kernels]

    def device_module(self, backend: str = "ptx", target: str = "sm_80",
                      fast_math: bool = False) -> DeviceModule:
        """The device code and launch plans of a GPU backend ("ptx"/"cuda": one PTX
        module for ``target``; "wgsl": one shader per kernel), rendered without building
        anything."""
        if SOURCE_NAMES.get(backend) == "wgsl":
            return self.wgsl
        if SOURCE_NAMES.get(backend) != "cuda":
            raise BackendError(f"no device module for backend {backend!r}; 'ptx' has one")
        key = (target, fast_math)
        if key not in self._device_modules:
            from .backends.ptx import render_ptx
            from .schedule import safe_name

            shapes = {k: self.graph.node(v).shape for k, v in self.graph.results().items()}
            bounds = {safe_name(k): n for k, n in self.graph.index_bounds.items()}
            self._device_modules[key] = render_ptx(
                self.ptx_schedules, self.ptx_memory_plan, target=target, fast_math=fast_math,
                result_shapes=shapes, model=self.graph.name, id_bounds=bounds)
        return self._device_modules[key]

    def source(self, backend: str | None = None) -> str:
        """Generated code for ``backend`` ("rust"/"cpu": the crate's lib.rs and kernels.rs;
        "ptx"/"cuda": the PTX module for sm_80; "wgsl": every shader; "numpy"/"ir": the IR
        listing the interpreter runs). Nothing is built."""
        backend = backend or self.backend
        if backend in ("numpy", "ir"):
            return format_graph(self.graph)
        if SOURCE_NAMES.get(backend) == "cuda":
            return self.device_module(backend).source
        if SOURCE_NAMES.get(backend) == "wgsl":
            return self.wgsl.source
        if SOURCE_NAMES.get(backend) == "cpu":
            files = self.crate.files
            return "\n".join(f"// ==== {name}\n{files[name].decode()}"
                             for name in ("src/lib.rs", "src/kernels.rs"))
        raise _unavailable(backend)

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the IR as text, DOT and canonical JSON into ``directory``; for the CPU
        backend also the crate (Cargo.toml, src/), buildable with maturin; for wgsl the
        crate, the shaders and manifest.json (how any WebGPU host runs the step)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if {"cpu", "cuda"} & set(self.backends):
            from .backends.cpu import render_crate

            render_crate(self.graph, self.schedules, self.memory_plan, out,
                         device=self._cuda_part(), profile=self.profile).write(out)
        if "wgsl" in self.backends:
            from .wgsl_step import write_wgsl

            write_wgsl(self, out)
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
        if "cuda" in self.backends and self.ptx_memory_plan is not self.memory_plan:
            lines.append("cuda, with conv columns kept: " + self.ptx_memory_plan.summary())
        return "\n".join(lines)

    def profiled(self, profile: bool = True) -> Lowered:
        """This lowering with (or without) per-kernel timers in its CPU step: the same
        graph and schedules, another crate and module (``source``, ``write``, ``crate``
        show it)."""
        if profile == self.profile:
            return self
        if profile and not {"cpu", "cuda"} & set(self.backends):
            raise BackendError(f"profiling times the kernels of the CPU step; a module for "
                               f"{', '.join(self.backends)} has none (use backend='cpu')")
        other = copy.copy(self)
        other.profile = profile
        other.__dict__.pop("crate", None)  # rendered again, with or without the timers
        return other

    def compile(self, device: str | None = None, *, profile: bool | None = None,
                **options: Any) -> Step:
        """Build (or load from the cache) and return a step running on ``device`` (by
        default the first backend lowered for). ``options`` go to the CUDA step:
        ``graph``, ``gemm``, ``autotune``, ``tf32``, ``sync``, ``device_index`` (see
        ``cuda_step.py``).

        ``profile=True`` (device "cpu") times every kernel call of the step's entry
        points, for ``step.profile()``; a separate module, built once like any other.
        By default it is ``self.profile``, or on for a CPU step when the environment
        has ``FERROGRAD_PROFILE=1``."""
        device = device or self.backend
        if profile is None:
            wanted = os.environ.get("FERROGRAD_PROFILE", "0").strip().lower()
            env = device == "cpu" and wanted not in ("", "0", "false", "no", "off")
            profile = self.profile or env
        elif profile and device != "cpu":
            raise BackendError(f"profiling times the kernels of the CPU step; device "
                               f"{device!r} has no such step (use device='cpu')")
        if profile != self.profile:
            return self.profiled(profile).compile(device, profile=profile, **options)
        if device not in self.backends:
            raise BackendError(f"device {device!r} is not in this module (lowered for "
                               f"{', '.join(self.backends)}); lower it with backend="
                               f"{(*self.backends, device)!r}")
        if options and device != "cuda":
            raise TypeError(f"options {', '.join(options)} are for device='cuda'")
        if device == "numpy":
            return NumpyStep(self, *self._initial_values())
        if device == "wgsl":
            from .wgsl_step import open_wgsl_step

            module = self._module("wgsl")
            return open_wgsl_step(self, module, *self._initial_values())
        if device not in ("cpu", "cuda"):
            raise _unavailable(device)
        module = self._module()
        native = (open_cuda_step(module, self.interface.name, **options) if device == "cuda"
                  else module.Step())
        return CompiledStep(self, module, *self._initial_values(), device, native)

    def _initial_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Initial params (from the seed) and optimizer state (zeros)."""
        return init_params(self.interface.graph, self.seed), self.interface.initial_state()

    def _module(self, kind: str = "native") -> ModuleType:
        """The built module of ``kind`` ("native": cpu/cuda steps; "wgsl"). From the
        cache index when this model was built before: right after tracing when its
        load entry is there (which also gives ``interface``), else after lowering
        without rendering anything. Otherwise rendered once, built and indexed."""
        from . import cache
        from .build import build_module, cache_dir
        from .cpu_level import build_level, check_supported

        level = build_level()
        profile = self.profile and kind == "native"  # a profiled build is another module
        load_key = None
        if self.traced is not None:
            load_key = cache.load_key(kind, self.traced, self.optimizer, self.dims,
                                      self.backends, profile, level)
            hit = None if load_key is None else cache.read_load_entry(load_key, self.traced)
            if hit is not None:
                name, self.__dict__["interface"] = hit
                check_supported(level, name)
                return build_module(Path(), name)
        build_key = cache.build_key(kind, self.graph, self.backends, profile, level)
        indexed = cache.read_build_entry(build_key)
        if indexed is not None:
            name = indexed
            check_supported(level, name)
            module = build_module(Path(), name)
        else:
            if kind == "native":
                crate = self.crate
            else:
                from .backends.wgsl_crate import render_wgsl_crate

                crate = render_wgsl_crate(self.graph, self.wgsl)
            name = crate.module
            check_supported(level, name)
            module = build_module(crate.write(cache_dir() / "crates" / name), name,
                                  rustc_flags=crate.rustc_flags)
            cache.write_build_entry(build_key, name)
        if load_key is not None:
            cache.write_load_entry(load_key, name, self.interface)
        return module

    def __repr__(self) -> str:
        return (f"<fg.Lowered {self.graph.name} backend={self.backend} "
                f"nodes={len(self.graph)} params={len(self.graph.params)}>")


def _unavailable(backend: str) -> BackendError:
    if backend in KNOWN_BACKENDS and backend not in AVAILABLE:
        return BackendError(
            f"the {backend!r} backend is not part of this version of ferrograd yet; "
            f"backend='numpy' (the reference interpreter) runs every model")
    return BackendError(f"unknown backend {backend!r}; choose from {', '.join(KNOWN_BACKENDS)}")


def _check_trainable(model: Model, graph: Graph, optimizer: Optimizer | None) -> None:
    """An optimizer needs a loss and params to train."""
    if optimizer is None:
        return
    if "loss" not in graph.outputs:
        raise TraceError(f"model {model.name!r} returns no 'loss', so an optimizer has "
                         "nothing to minimize", model.src)
    if not graph.params:
        raise TraceError(f"model {model.name!r} has no params to train", model.src)


def _training_graph(traced: Graph, optimizer: Optimizer | None) -> Graph:
    """Add gradients (if the model has a loss and params) and the optimizer's updates
    to the traced graph, then run the passes."""
    graph = traced
    if "loss" in graph.outputs and graph.params:
        graph = grad(graph)
        if optimizer is not None:
            graph = optimizer.apply(graph)
    return optimize(graph)


def lower(model: Model, optimizer: Optimizer | None = None,
          backend: str | tuple[str, ...] = "cpu", seed: int = 0, **dims: int) -> Lowered:
    """Trace ``model`` for ``backend`` without building. Differentiating, adding the
    optimizer and optimizing happen on first use of ``graph`` (or of what needs it), so
    that ``compile()`` of a model whose module is cached skips them; at
    ``FERROGRAD_DEBUG>=1`` they happen here, to print the summary.

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
    backends = (backend,) if isinstance(backend, str) else tuple(backend)
    for b in backends:
        if b not in KNOWN_BACKENDS:
            raise _unavailable(b)
    if len(backends) > 1 and not set(backends) <= {"cpu", "cuda"}:
        raise BackendError(f"backend={backends!r}: one module holds 'cpu' and 'cuda' "
                           "steps; other backends stand alone")
    backend = backends[0] if backends else "cpu"
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an fg.optim optimizer, got {optimizer!r}")
    traced = trace(model, **dims)
    _check_trainable(model, traced, optimizer)
    # The optimizer as it is now: the lazily built graph and the cache key must agree.
    optimizer = copy.deepcopy(optimizer)
    lowered = Lowered(model, None, backend, seed, optimizer, dims, backends, traced=traced)
    level = debug_level()
    if level >= 1:
        print(lowered.summary(), file=sys.stderr)
        if backend != "numpy":
            print(lowered.schedule_report(fusion_log=True), file=sys.stderr)
    if level >= 2:
        shown = {"numpy": "ir", "cuda": "ptx", "wgsl": "wgsl"}.get(backend, "rust")
        print(lowered.source(shown), file=sys.stderr)
    return lowered


def compile(model: Model, optimizer: Optimizer | None = None,
            backend: str | tuple[str, ...] = "cpu", seed: int = 0, device: str | None = None,
            profile: bool | None = None, **dims: int) -> Step:
    """``lower(...).compile(device)``: a step object that trains ``model`` one batch per
    call. ``backend=("cpu", "cuda")`` builds one module holding both steps; ``device``
    picks the one this step runs on (default: the first).

    ``profile=True`` builds the CPU step with per-kernel timers (``step.profile()``);
    by default a CPU step has them when ``FERROGRAD_PROFILE=1`` (see ``Lowered.compile``)."""
    return lower(model, optimizer, backend, seed, **dims).compile(device, profile=profile)
