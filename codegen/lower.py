"""Ahead-of-time stages, as in JAX: ``lower`` builds the training graph without
building anything; ``Lowered.compile()`` turns it into a step object."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ferrograd._version import __version__
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
from .backends.ptx import aligned_buffers, kernel_source, render_ptx
from .backends.rust import render_kernel
from .backends.wgsl_crate import render_wgsl_crate
from .backends.wgsl_module import WgslModule, render_wgsl
from .cpu_step import CompiledStep
from .cuda_step import open_cuda_step
from .launch_plan import DeviceModule
from .memory import MemoryPlan, plan_memory
from .schedule import Schedule, entry_points, schedule
from .step import NumpyStep, Step
from .wgsl_step import open_wgsl_step, wgsl_kernels, write_wgsl

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
    """A model traced, differentiated, given its optimizer and optimized; not yet built."""

    def __init__(self, model: Model, graph: Graph, backend: str, seed: int,
                 optimizer: Optimizer | None, dims: dict[str, int],
                 backends: tuple[str, ...] | None = None, profile: bool = False) -> None:
        self.model = model
        self.graph = graph
        self.backend = backend  # the default device of compile()
        self.backends = backends or (backend,)  # what the module holds
        self.seed = seed
        self.optimizer = optimizer
        self.dims = dims
        # Whether the CPU step's entry points time every kernel call (``Step.profile()``).
        self.profile = profile
        self._device_modules: dict[tuple[str, bool], DeviceModule] = {}

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
        """The Rust crate of the CPU backend, with the CUDA step when lowered for "cuda"
        (rendered, not built)."""
        return render_crate(self.graph, self.schedules, self.memory_plan,
                            device=self._cuda_part(), profile=self.profile)

    @functools.cached_property
    def wgsl(self) -> WgslModule:
        """The WGSL shaders and launch plans of the wgsl backend (rendered, not built)."""
        return render_wgsl(self.graph, self.schedules, self.memory_plan)

    def _cuda_part(self) -> DeviceModule | None:
        return self.device_module("ptx") if "cuda" in self.backends else None

    @property
    def kernels(self) -> list[KernelInfo]:
        """Generated kernels, with their source. The NumPy backend runs the IR itself."""
        if self.backend == "numpy":
            return []
        if self.backend == "wgsl":
            return wgsl_kernels(self)
        dtypes = {b.name: b.dtype for s in self.schedules for b in s.buffers.values()}
        if self.backend == "cuda":
            aligned = aligned_buffers(self.schedules)
            return [KernelInfo(k.name, k.kind, list(k.ops), self.backend,
                               kernel_source(k, dtypes, aligned=aligned))
                    for s in self.schedules for k in s.kernels]
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
            shapes = {k: self.graph.node(v).shape for k, v in self.graph.results().items()}
            self._device_modules[key] = render_ptx(
                self.schedules, self.memory_plan, target=target, fast_math=fast_math,
                result_shapes=shapes, model=self.graph.name)
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
            render_crate(self.graph, self.schedules, self.memory_plan, out,
                         device=self._cuda_part(), profile=self.profile).write(out)
        if "wgsl" in self.backends:
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
        ``graph``, ``gemm``, ``tf32``, ``sync``, ``device_index`` (see ``cuda_step.py``).

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
        params, state = init_params(self.graph, self.seed), init_state(self.graph)
        if device == "numpy":
            return NumpyStep(self, params, state)
        if device == "wgsl":
            return open_wgsl_step(self, self._module("wgsl"), params, state)
        if device not in ("cpu", "cuda"):
            raise _unavailable(device)
        module = self._module()
        native = (open_cuda_step(module, self.graph.name, **options) if device == "cuda"
                  else module.Step())
        return CompiledStep(self, module, params, state, device, native)

    def _module(self, kind: str = "native") -> ModuleType:
        """The built module of ``kind`` ("native": cpu/cuda steps; "wgsl"): from the
        cache index without rendering anything when this exact model was built
        before, else rendered once, built and indexed."""
        from .build import build_module, cache_dir, module_path, runtime_fingerprint
        from .cpu_level import build_level, check_supported

        level = build_level()
        digest = hashlib.sha256(level.encode())
        for part in (kind, fingerprint(self.graph), repr(self.backends), __version__,
                     runtime_fingerprint(), _codegen_digest()):
            digest.update(part.encode())
        if self.profile and kind == "native":  # a profiled build is another module
            digest.update(b"profile")
        index = cache_dir() / "index" / f"{digest.hexdigest()[:32]}.txt"
        if index.exists():
            name = index.read_text().strip()
            if module_path(name).exists():
                check_supported(level, name)
                return build_module(Path(), name)
        crate = self.crate if kind == "native" else render_wgsl_crate(self.graph, self.wgsl)
        crate_dir = cache_dir() / "crates" / crate.module
        check_supported(level, crate.module)
        module = build_module(crate.write(crate_dir), crate.module,
                              rustc_flags=crate.rustc_flags)
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(crate.module + "\n")
        os.replace(tmp, index)
        return module

    def __repr__(self) -> str:
        return (f"<fg.Lowered {self.graph.name} backend={self.backend} "
                f"nodes={len(self.graph)} params={len(self.graph.params)}>")


@functools.cache
def _codegen_digest() -> str:
    """A digest of the code generator itself (its Python and templates): a new
    ferrograd never reuses a module indexed by an older one."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted([*here.rglob("*.py"), *here.rglob("*.j2")]):
        if "runtime" not in path.parts:
            digest.update(path.read_bytes())
    return digest.hexdigest()


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


def lower(model: Model, optimizer: Optimizer | None = None,
          backend: str | tuple[str, ...] = "cpu", seed: int = 0, **dims: int) -> Lowered:
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
    lowered = Lowered(model, training_graph(model, optimizer, dims), backend, seed, optimizer,
                      dims, backends)
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
