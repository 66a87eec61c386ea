"""``@fg.model`` and tracing: run the user's function once on proxies, record a Graph."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ferrograd.ir.builder import Var, building, current_graph, user_src
from ferrograd.ir.builder import constant as _constant
from ferrograd.ir.errors import TraceError
from ferrograd.ir.graph import Graph

from .init import check_init
from .types import DType, InputSpec


@dataclass
class _TraceState:
    graph: Graph
    counters: dict[str, int] = field(default_factory=dict)


_TRACE: ContextVar[_TraceState | None] = ContextVar("ferrograd_trace", default=None)


class Model:
    """A traceable model: a function whose parameters are annotated input specs."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name: str = fn.__name__
        self.src = f"{inspect.getsourcefile(fn)}:{fn.__code__.co_firstlineno}"
        self.specs = _input_specs(fn, self.src)

    @property
    def dims(self) -> list[str]:
        """The symbolic dims the inputs use, in order of first appearance."""
        seen: list[str] = []
        for spec in self.specs.values():
            seen += [d for d in spec.dims if isinstance(d, str) and d not in seen]
        return seen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Inside another model's trace a model is just a function of tensors.
        if _TRACE.get() is None:
            raise TraceError(f"model {self.name!r} is not called directly: compile it with "
                             f"fg.compile({self.name}, ...) or trace it with fg.trace")
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v!r}" for k, v in self.specs.items())
        return f"<fg.model {self.name}({inner})>"


def model(fn: Callable[..., Any]) -> Model:
    """Declare a model. Inputs are annotated with their dtype and dims.

    >>> import ferrograd as fg
    >>> @fg.model
    ... def linreg(x: fg.f32["N", 3], y: fg.f32["N"]):
    ...     pred = (x @ fg.param("w", (3, 1))).reshape(-1)
    ...     return fg.mse(pred, y)
    >>> linreg
    <fg.model linreg(x: fg.f32['N', 3], y: fg.f32['N'])>
    """
    return Model(fn)


def _input_specs(fn: Callable[..., Any], src: str) -> dict[str, InputSpec]:
    # String annotations (from __future__ import annotations) may name the variables
    # of an enclosing function, e.g. fg.f32["B", T] in a model built by a function.
    closure = {name: cell.cell_contents for name, cell in
               zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False)}
    try:
        hints = typing.get_type_hints(fn, localns=closure)
    except Exception:  # string annotations that do not evaluate: report below
        hints = getattr(fn, "__annotations__", {})
    specs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(f"model {fn.__name__}: *args/**kwargs cannot be inputs; declare "
                             "each input with an annotation", src)
        spec = hints.get(name)
        if isinstance(spec, DType):
            spec = InputSpec(spec.name, ())
        if not isinstance(spec, InputSpec):
            raise TraceError(f"model {fn.__name__}: input {name!r} needs an annotation such "
                             f"as fg.f32['B', 784], got {spec!r}", src)
        specs[name] = spec
    return specs


def trace(m: Model | Callable[..., Any], **dims: int) -> Graph:
    """Trace ``m`` into a Graph, binding its symbolic dims.

    >>> import ferrograd as fg
    >>> @fg.model
    ... def f(x: fg.f32["B", 2]):
    ...     return fg.relu(x).sum()
    >>> g = fg.trace(f, B=4)
    >>> g.node(g.inputs["x"]).shape
    (4, 2)
    """
    if not isinstance(m, Model):
        m = Model(m)
    unknown = sorted(set(dims) - set(m.dims))
    if unknown:
        raise TraceError(f"model {m.name!r} has no dim {', '.join(map(repr, unknown))} "
                         f"(its dims: {m.dims or 'none'})", m.src)
    for k, v in dims.items():
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise TraceError(f"dim {k}={v!r} must be a positive int", m.src)
    graph = Graph(m.name)
    args = []
    for name, spec in m.specs.items():
        try:
            shape = spec.bind(name, dims)
        except TraceError as err:
            raise TraceError(str(err), m.src) from None
        nid = graph.add("input", (), {"shape": shape, "dtype": spec.dtype}, name=name, src=m.src)
        graph.inputs[name] = nid
        graph.input_dims[name] = spec.dims
        args.append(Var(graph, nid))
    token = _TRACE.set(_TraceState(graph))
    try:
        with building(graph):
            result = m.fn(*args)
    finally:
        _TRACE.reset(token)
    _set_outputs(graph, result, m)
    return graph


def _set_outputs(graph: Graph, result: Any, m: Model) -> None:
    outputs = result if isinstance(result, dict) else {"loss": result}
    if not outputs:
        raise TraceError(f"model {m.name!r} returned an empty dict", m.src)
    for key, val in outputs.items():
        if not isinstance(key, str) or not key or ":" in key:
            raise TraceError(f"model {m.name!r}: output names must be non-empty strings "
                             f"without ':', got {key!r}", m.src)
        if not isinstance(val, Var) or val.graph is not graph:
            raise TraceError(f"model {m.name!r}: output {key!r} is {type(val).__name__}, not "
                             "a tensor computed by the model", m.src)
        graph.outputs[key] = val.id
    if "loss" in outputs:
        loss = outputs["loss"]
        if loss.shape != () or loss.dtype not in ("f32", "f64"):
            raise TraceError(f"model {m.name!r}: the loss must be a float scalar, it has "
                             f"shape {loss.shape} and dtype {loss.dtype} (reduce it with "
                             ".mean() or .sum())", loss.src)


def auto_name(kind: str) -> str:
    """A deterministic name for an unnamed helper: kind_0, kind_1, ... in call order."""
    state = _TRACE.get()
    if state is None:
        raise TraceError(f"fg.nn.{kind} can only be used inside a model being traced",
                         user_src())
    n = state.counters.get(kind, 0)
    state.counters[kind] = n + 1
    return f"{kind}_{n}"


def param(name: str, shape: Any, init: Any = "normal", dtype: DType | str = "f32",
          **init_args: Any) -> Var:
    """Create a trainable parameter. ``init`` names an initializer or gives an array.

    Initializers: zeros, ones, normal(mean, std), uniform(low, high), xavier, kaiming;
    extra keyword arguments go to the initializer (``fg.param("w", (3,), "normal",
    std=0.02)``).
    """
    graph = current_graph("fg.param")
    src = user_src()
    if not isinstance(name, str) or not name:
        raise TraceError(f"param name must be a non-empty string, got {name!r}", src)
    if name in graph.params:
        first = graph.node(graph.params[name]).src
        raise TraceError(f"param {name!r} is created twice (first at {first})", src)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        raise TraceError(f"param {name!r}: shape {shape} must be non-negative ints", src)
    shape = tuple(int(d) for d in shape)
    dtype_name = dtype.name if isinstance(dtype, DType) else str(dtype)
    if dtype_name not in ("f32", "f64"):
        raise TraceError(f"param {name!r}: params are float, got dtype {dtype_name}", src)
    if not isinstance(init, str):
        init = np.asarray(init, dtype=np.float64)
    try:
        check_init(init, init_args, shape)
    except TraceError as err:
        raise TraceError(f"param {name!r}: {err}", src) from None
    nid = graph.add("param", (), {"shape": shape, "dtype": dtype_name, "init": init,
                                  "init_args": dict(sorted(init_args.items()))},
                    name=name, src=src)
    graph.params[name] = nid
    return Var(graph, nid)


def constant(value: Any, dtype: DType | str | None = None) -> Var:
    """Embed a constant array in the model being traced."""
    graph = current_graph("fg.constant")
    name = dtype.name if isinstance(dtype, DType) else dtype
    return _constant(graph, value, name)

