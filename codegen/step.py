"""The step object: one training step per call, plus forward, grads, params, checkpoints.

``Step`` holds everything a step keeps between calls and implements the public
API once; a backend subclass only says how to run the graph (``_run``). The
NumPy backend runs the reference interpreter.

A CPU step compiled with ``profile=True`` (or ``FERROGRAD_PROFILE=1``) also answers
``step.profile()``: per kernel, how many calls and how much wall time (``Profile``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ferrograd._version import __version__
from ferrograd.ir.errors import BackendError, CheckpointError, InputError
from ferrograd.ir.graph import Graph, numpy_dtype
from ferrograd.ir.interpret import check_feed, check_stacked_feed, interpret

from .checkpoint import read_checkpoint, write_checkpoint
from .interface import Interface, Spec

if TYPE_CHECKING:
    from .lower import Lowered


class Step:
    """A compiled training step. Call it with a batch to train on it.

    >>> import ferrograd as fg, numpy as np
    >>> @fg.model
    ... def f(x: fg.f32["B", 2]):
    ...     return ((x @ fg.param("w", (2, 1), init="ones")) ** 2).mean()
    >>> step = fg.compile(f, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=1)
    >>> step(np.ones((1, 2), np.float32))
    4.0
    >>> step.params["w"].ravel()
    array([0.6, 0.6], dtype=float32)
    """

    backend = "?"
    # Whether inputs may be arrays in GPU memory (``__cuda_array_interface__``), passed
    # through untouched to the backend: the CUDA step.
    _device_inputs = False

    def __init__(self, lowered: Lowered) -> None:
        self.lowered = lowered
        # Names, shapes and dtypes of inputs, outputs, params and state: what the step
        # checks and keeps, known without the training graph when the module is cached.
        self.interface: Interface = lowered.interface

    @property
    def graph(self) -> Graph:
        """The training graph (lowered on first use when the step's module was cached)."""
        return self.lowered.graph

    # ---- running ------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> float:
        """One training step on a batch: forward, loss, backward, update. Returns the loss."""
        self._check_trains()
        return self._train(self._bind(args, kwargs))

    def steps(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """K training steps back to back, on K batches stacked along a new leading axis of
        every input (positional or by name, as ``step(...)`` takes them; the same K ≥ 1 for
        all). Returns the K losses as a float32 array: the same bits, params and optimizer
        state as ``step(xs[k], ys[k])`` for k in order. Every batch is checked, as
        ``step(...)`` checks its inputs, before any step runs.

        On CUDA this is one call into the module and one wait for all K steps, with no
        host round trip in between. If step k fails to launch there, the call raises
        naming k after the steps before it ran: their updates are applied (step k's
        perhaps in part; after a failed launch the CUDA context is best given up). An id
        out of range in device inputs is found only after all K ran: the call raises
        saying so, with every step's update applied, the bad ones wrong.

        >>> import ferrograd as fg, numpy as np
        >>> @fg.model
        ... def f(x: fg.f32["B", 2]):
        ...     return ((x @ fg.param("w", (2, 1), init="ones")) ** 2).mean()
        >>> step = fg.compile(f, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=1)
        >>> step.steps(np.ones((3, 1, 2), np.float32))   # 3 batches of shape (1, 2)
        array([4.    , 1.44  , 0.5184], dtype=float32)
        >>> step.params["w"].ravel()
        array([0.216, 0.216], dtype=float32)
        """
        self._check_trains()
        feed, count = check_stacked_feed(self.interface.graph, self._named(args, kwargs),
                                         device=self._device_inputs)
        return self._train_steps(feed, count)

    def _check_trains(self) -> None:
        if not self.interface.updates:
            raise InputError("this step was compiled without an optimizer, so it cannot "
                             "train: pass optimizer=... to fg.compile, or use .forward/.grads")

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """All outputs of the model on a batch; no update."""
        return self._forward(self._bind(args, kwargs))

    def grads(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Gradient of the loss for every param on a batch; no update."""
        if not self.interface.grads:
            raise InputError("this model has no loss to differentiate")
        return self._grads(self._bind(args, kwargs))

    # What a backend implements: run the three entry points, hold the persistent values.
    def _train(self, feed: dict[str, np.ndarray]) -> float:
        raise NotImplementedError

    def _train_steps(self, feed: dict[str, Any], count: int) -> np.ndarray:
        """``count`` training steps on the checked stacked ``feed``; their losses. A loop
        of ``_train``; a backend that can do better (CUDA: one call) overrides it."""
        return np.array([self._train({k: v[i] for k, v in feed.items()})
                         for i in range(count)], np.float32)

    def _forward(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _grads(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _get(self, kind: str) -> dict[str, np.ndarray]:
        """Copies of the params ("param") or optimizer state ("state")."""
        raise NotImplementedError

    def _set(self, kind: str, values: dict[str, np.ndarray]) -> None:
        """Overwrite some params or state buffers with checked arrays."""
        raise NotImplementedError

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        return check_feed(self.interface.graph, self._named(args, kwargs),
                          device=self._device_inputs)

    def _named(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional and keyword inputs by name (not checked yet)."""
        names = list(self.interface.inputs)
        if len(args) > len(names):
            raise InputError(f"{self.interface.name} takes {len(names)} inputs "
                             f"({', '.join(names)}), got {len(args)}")
        feed = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k in feed:
                raise InputError(f"input {k!r} given both by position and by name")
            feed[k] = v
        return feed

    # ---- params and optimizer state ---------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """Copies of the current params, by name."""
        return self._get("param")

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current optimizer state, by name."""
        return self._get("state")

    def load_params(self, values: Mapping[str, Any]) -> None:
        """Set some or all params. Names, shapes and dtypes are checked first."""
        self._set("param", _checked(self.interface.params, values, "param"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write params and optimizer state to a safetensors file (atomically)."""
        meta = {"ferrograd": __version__, "model": self.interface.name,
                "optimizer": self.lowered.optimizer_config}
        write_checkpoint(path, self._get("param"), self._get("state"), meta)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore params and optimizer state saved by ``save``."""
        params, state, _ = read_checkpoint(path)
        iface = self.interface
        missing = sorted(set(iface.params) - set(params))
        missing += sorted(f"optim.{k}" for k in set(iface.state) - set(state))
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}")
        new_params = _checked(iface.params, params, "param")
        new_state = _checked(iface.state, state, "optimizer state")
        self._set("param", new_params)
        self._set("state", new_state)

    # ---- inspection ---------------------------------------------------------------------
    @property
    def kernels(self) -> list[Any]:
        return self.lowered.kernels

    def source(self, backend: str | None = None) -> str:
        return self.lowered.source(backend or self.backend)

    # ---- profiling ----------------------------------------------------------------------
    def profile(self, reset: bool = False) -> Profile:
        """Per-kernel calls and wall time of every entry point since the step was built
        (or last reset), longest total first; ``str()`` of it is a table. ``reset=True``
        restarts the counters after reading. Only for a CPU step compiled with
        ``profile=True`` (or ``FERROGRAD_PROFILE=1``); others raise ``BackendError``."""
        raise BackendError(
            f"{self.interface.name}: this {self.backend} step was not compiled with profiling; "
            "compile it with fg.compile(..., backend='cpu', profile=True) or with "
            "FERROGRAD_PROFILE=1 set")

    def profile_report(self, reset: bool = False) -> str:
        """``str(self.profile(reset))``: kernel, kind, calls, total ms, mean µs, share."""
        return str(self.profile(reset))

    def __repr__(self) -> str:
        iface = self.interface
        return (f"<fg.Step {iface.name} backend={self.backend} inputs="
                f"({', '.join(iface.inputs)}) params={len(iface.params)}>")


@dataclass(frozen=True)
class KernelTime:
    """One kernel of one entry point in a profile: its calls and their total wall time."""

    entry: str
    name: str
    kind: str
    ops: tuple[str, ...]
    calls: int
    total_s: float

    @property
    def mean_us(self) -> float:
        """Mean wall time of one call, in microseconds."""
        return self.total_s / self.calls * 1e6 if self.calls else 0.0


class Profile(list[KernelTime]):
    """Kernel times (``KernelTime``), longest total first, of the kernels called at
    least once. ``str()`` is the table that ``Step.profile_report()`` prints."""

    def __init__(self, rows: Iterable[KernelTime] = ()) -> None:
        super().__init__(sorted(rows, key=lambda r: (-r.total_s, r.name)))

    @property
    def total_s(self) -> float:
        """Wall time of every kernel call together (not the time between calls)."""
        return sum(r.total_s for r in self)

    def __str__(self) -> str:
        total = self.total_s
        width = max([len("kernel"), *(len(r.name) for r in self)])
        lines = [f"{'kernel':<{width}}  {'kind':<12} {'calls':>7} {'total ms':>10} "
                 f"{'mean µs':>10} {'share':>6}  ops"]
        for r in self:
            share = r.total_s / total if total else 0.0
            ops = ", ".join(r.ops)
            lines.append(f"{r.name:<{width}}  {r.kind:<12} {r.calls:>7} "
                         f"{r.total_s * 1e3:>10.3f} {r.mean_us:>10.2f} {share:>6.1%}  "
                         f"{ops if len(ops) <= 48 else ops[:45] + '...'}")
        lines.append(f"{'total':<{width}}  {'':<12} {sum(r.calls for r in self):>7} "
                     f"{total * 1e3:>10.3f}")
        return "\n".join(lines)


def _checked(specs: dict[str, Spec], values: Mapping[str, Any], what: str
             ) -> dict[str, np.ndarray]:
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise CheckpointError(f"unknown {what} {', '.join(map(repr, unknown))}; the model has "
                              f"{', '.join(sorted(specs)) or 'none'}")
    out = {}
    for name, value in values.items():
        shape, dtype = specs[name]
        arr = np.asarray(value)
        if arr.shape != shape:
            raise CheckpointError(f"{what} {name!r}: expected shape {shape}, got {arr.shape}")
        if arr.dtype.kind != "f":
            raise CheckpointError(f"{what} {name!r}: expected a float array, got {arr.dtype}")
        out[name] = np.array(arr, dtype=numpy_dtype(dtype), order="C", copy=True)
    return out


class NumpyStep(Step):
    """The reference backend: the NumPy interpreter runs the training graph."""

    backend = "numpy"

    def __init__(self, lowered: Lowered, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray]) -> None:
        super().__init__(lowered)
        self._values = {"param": params, "state": state}

    def _run(self, feed: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
        return interpret(self.graph, feed, self._values["param"], self._values["state"],
                         results=keys)

    def _train(self, feed: dict[str, np.ndarray]) -> float:
        res = self._run(feed, ["loss", *(f"update:{k}" for k in self.graph.updates)])
        # Everything was computed before anything is written: a failure leaves the
        # params untouched.
        for name in self.graph.updates:
            kind = "param" if name in self.graph.params else "state"
            self._values[kind][name] = res[f"update:{name}"]
        return float(res["loss"])

    def _forward(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._run(feed, list(self.graph.outputs))
        return {k: res[k] for k in self.graph.outputs}

    def _grads(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._run(feed, [f"grad:{k}" for k in self.graph.grads])
        return {k: res[f"grad:{k}"] for k in self.graph.grads}

    def _get(self, kind: str) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._values[kind].items()}

    def _set(self, kind: str, values: dict[str, np.ndarray]) -> None:
        self._values[kind].update(values)
