"""The NumPy reference interpreter: the executable spec every backend is checked against."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import InputError
from .graph import FLOAT_DTYPES, SOURCE_OPS, Graph, numpy_dtype
from .ops import op_def


def check_feed(graph: Graph, inputs: Mapping[str, Any], *, cast: bool = False) -> dict:
    """Inputs by name as arrays of the declared shape and dtype, or an InputError."""
    missing = [k for k in graph.inputs if k not in inputs]
    if missing:
        raise InputError(f"missing input {', '.join(map(repr, missing))}; the model takes "
                         f"({', '.join(graph.inputs)})")
    extra = [k for k in inputs if k not in graph.inputs]
    if extra:
        raise InputError(f"unknown input {', '.join(map(repr, extra))}; the model takes "
                         f"({', '.join(graph.inputs)})")
    feed = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        arr = np.asarray(inputs[name])
        want = numpy_dtype(node.dtype)
        dims = graph.input_dims.get(name, node.shape)
        spec = f"{node.dtype}[" + ", ".join(
            f"{d}={n}" if isinstance(d, str) else str(n)
            for d, n in zip(dims, node.shape, strict=False)) + "]"
        if arr.shape != node.shape:
            raise InputError(f"input {name!r}: expected shape {node.shape} ({spec}), got "
                             f"{arr.shape}")
        if arr.dtype != want:
            if not (cast and np.can_cast(arr.dtype, want, "same_kind")):
                raise InputError(f"input {name!r}: expected dtype {want} ({spec}), got "
                                 f"{arr.dtype}; convert it with .astype(np.{want})")
            arr = arr.astype(want)
        bound = graph.index_bounds.get(name)
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            bad = arr[(arr < 0) | (arr >= bound)].flat[0]
            raise InputError(f"input {name!r}: value {bad} is out of range [0, {bound})")
        feed[name] = arr
    return feed


def interpret(
    graph: Graph,
    inputs: Mapping[str, Any],
    params: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    *,
    dtype: str = "f32",
    results: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``graph`` in NumPy and return its results.

    Keys are output names for forward outputs, ``grad:<param>`` for gradients and
    ``update:<name>`` for the next value of a param or optimizer state. With
    ``dtype="f64"`` every float is computed in float64 (for gradient checks).
    Only what the requested ``results`` need is computed.

    >>> import ferrograd as fg, numpy as np
    >>> @fg.model
    ... def f(x: fg.f32["B", 2]):
    ...     return (x * fg.param("w", (2,), init="ones")).sum()
    >>> g = fg.trace(f, B=1)
    >>> float(fg.interpret(g, {"x": np.ones((1, 2), np.float32)}, {"w": np.ones(2)})["loss"])
    2.0
    """
    feed = check_feed(graph, inputs, cast=True)
    wanted = _result_ids(graph)
    if results is not None:
        wanted = {k: wanted[k] for k in results}
    promote = dtype == "f64"
    values: dict[int, np.ndarray] = {}
    for n in graph.plan(wanted.values()):
        out_dtype = "f64" if promote and n.dtype in FLOAT_DTYPES else n.dtype
        if n.op == "input":
            val = feed[n.name]
        elif n.op in ("param", "state"):
            val = _persistent(n.op, n.name, params if n.op == "param" else state or {}, n.shape)
        elif n.op == "const":
            val = n.attrs["value"]
        else:
            attrs = dict(n.attrs)
            if promote and n.op == "cast" and attrs["dtype"] in FLOAT_DTYPES:
                attrs["dtype"] = "f64"
            val = op_def(n.op).ref(*(values[a] for a in n.args), **attrs)  # type: ignore[misc]
        values[n.id] = np.asarray(val, dtype=numpy_dtype(out_dtype))
    # A result that is a source node would alias a param or a read-only constant.
    return {k: values[v].copy() if graph.nx.nodes[v]["op"] in SOURCE_OPS else values[v]
            for k, v in wanted.items()}


def _result_ids(graph: Graph) -> dict[str, int]:
    res = dict(graph.outputs)
    res.update({f"grad:{k}": v for k, v in graph.grads.items()})
    res.update({f"update:{k}": v for k, v in graph.updates.items()})
    return res


def _persistent(kind: str, name: Any, table: Mapping[str, Any], shape: tuple) -> np.ndarray:
    if name not in table:
        raise InputError(f"no value given for {kind} {name!r}")
    arr = np.asarray(table[name])
    if arr.shape != shape:
        raise InputError(f"{kind} {name!r}: expected shape {shape}, got {arr.shape}")
    return arr
