"""The NumPy reference interpreter: the executable spec every backend is checked against."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import InputError
from .graph import FLOAT_DTYPES, SOURCE_OPS, Graph, numpy_dtype
from .ops import op_def

# __cuda_array_interface__ typestr of each input dtype (little-endian, as on every GPU)
CUDA_TYPESTR = {"f32": "<f4", "i32": "<i4", "bool": "|b1"}
_TYPESTR_NAME = {"<f4": "float32", "<i4": "int32", "|b1": "bool", "<f8": "float64",
                 "<i8": "int64", "<f2": "float16", "<u1": "uint8", "|u1": "uint8"}


def cuda_array_info(value: Any) -> tuple[tuple[int, ...], str] | None:
    """``(shape, typestr)`` of an array in GPU memory (CuPy, PyTorch CUDA tensors,
    Numba: anything with a ``__cuda_array_interface__``), None for anything else.
    Nothing is copied or synchronized; a layout that is not C order raises."""
    iface = getattr(value, "__cuda_array_interface__", None)
    if not isinstance(iface, dict):
        return None
    shape = tuple(int(n) for n in iface.get("shape", ()))
    typestr = str(iface.get("typestr", "?"))
    strides = iface.get("strides")
    if strides is not None and 0 not in shape:
        want = int(typestr[2:]) if typestr[2:].isdigit() else 1
        for n, s in reversed(list(zip(shape, strides, strict=False))):
            if n != 1 and s != want:
                raise InputError(f"a CUDA array with strides {tuple(strides)} (bytes) is not "
                                 "C-contiguous: make it contiguous first (.contiguous() in "
                                 "PyTorch, cupy.ascontiguousarray)")
            want *= n
    return shape, typestr


def check_feed(graph: Graph, inputs: Mapping[str, Any], *, cast: bool = False,
               device: bool = False) -> dict:
    """Inputs by name as arrays of the declared shape and dtype, or an InputError.

    With ``device=True`` (the CUDA step) an array already in GPU memory (see
    ``cuda_array_info``) is checked from its interface and passed through untouched:
    no host copy; its ids are not range-checked here (the step's kernels flag them).
    """
    return _checked_feed(graph, inputs, cast=cast, device=device, stacked=False)[0]


def check_stacked_feed(graph: Graph, inputs: Mapping[str, Any], *,
                       device: bool = False) -> tuple[dict, int]:
    """``(feed, K)`` for inputs that each hold K ≥ 1 batches stacked along one extra
    leading axis, the same K for all (``Step.steps``): each batch gets the checks of
    ``check_feed`` (shape, dtype, and the ids of every batch), else an InputError."""
    return _checked_feed(graph, inputs, cast=False, device=device, stacked=True)


def _checked_feed(graph: Graph, inputs: Mapping[str, Any], *, cast: bool, device: bool,
                  stacked: bool) -> tuple[dict, int]:
    """The checks of ``check_feed``; with ``stacked``, of each of K batches (K is 1
    otherwise)."""
    missing = [k for k in graph.inputs if k not in inputs]
    if missing:
        raise InputError(f"missing input {', '.join(map(repr, missing))}; the model takes "
                         f"({', '.join(graph.inputs)})")
    extra = [k for k in inputs if k not in graph.inputs]
    if extra:
        raise InputError(f"unknown input {', '.join(map(repr, extra))}; the model takes "
                         f"({', '.join(graph.inputs)})")
    # A device array as (shape, typestr) from its interface; anything else as an ndarray
    given: dict[str, tuple[tuple[int, ...], str] | np.ndarray] = {}
    for name in graph.inputs:
        try:
            info = cuda_array_info(inputs[name])
        except InputError as err:
            raise InputError(f"input {name!r}: {err}") from None
        if info is not None and not device:
            raise InputError(f"input {name!r} is in GPU memory, and this step runs on "
                             "the host: pass a NumPy array (.get() in CuPy, .cpu().numpy() "
                             "in PyTorch), or compile for device='cuda'")
        given[name] = np.asarray(inputs[name]) if info is None else info
    shapes = {k: v.shape if isinstance(v, np.ndarray) else v[0] for k, v in given.items()}
    count = _stack_count(shapes) if stacked else 1
    lead = (count,) if stacked else ()
    feed = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        want = numpy_dtype(node.dtype)
        dims = graph.input_dims.get(name, node.shape)
        spec = f"{node.dtype}[" + ", ".join(
            f"{d}={n}" if isinstance(d, str) else str(n)
            for d, n in zip(dims, node.shape, strict=False)) + "]"
        if stacked:
            spec = f"{count} batches of {spec}"
        value = given[name]
        if shapes[name] != (*lead, *node.shape):
            hint = ("; steps takes each input with one more (leading) axis than a step: "
                    "K batches stacked" if stacked and len(shapes[name]) == len(node.shape)
                    else "")
            raise InputError(f"input {name!r}: expected shape {(*lead, *node.shape)} ({spec}), "
                             f"got {shapes[name]}{hint}")
        if not isinstance(value, np.ndarray):
            typestr = value[1]
            if typestr != CUDA_TYPESTR.get(node.dtype):
                got = _TYPESTR_NAME.get(typestr, typestr)
                raise InputError(f"input {name!r}: expected dtype {want} ({spec}), got {got}")
            feed[name] = inputs[name]
            continue
        arr = value
        if arr.dtype != want:
            if not (cast and np.can_cast(arr.dtype, want, "same_kind")):
                raise InputError(f"input {name!r}: expected dtype {want} ({spec}), got "
                                 f"{arr.dtype}; convert it with .astype(np.{want})")
            arr = arr.astype(want)
        bound = graph.index_bounds.get(name)
        if bound is not None and arr.size and (arr.min() < 0 or arr.max() >= bound):
            first = tuple(np.argwhere((arr < 0) | (arr >= bound))[0])
            batch = f" in batch {first[0]}" if stacked else ""
            raise InputError(f"input {name!r}: value {arr[first]} is out of range "
                             f"[0, {bound}){batch}")
        feed[name] = arr
    return feed, count


def _stack_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """K of inputs that each stack K ≥ 1 batches along a new leading axis."""
    if not shapes:
        raise InputError("a model without inputs has no batches to count: call the step "
                         "once per step instead")
    for name, shape in shapes.items():
        if not shape:
            raise InputError(f"input {name!r} is a scalar: steps takes every input with "
                             "one extra leading axis, K batches stacked")
    counts = {shape[0] for shape in shapes.values()}
    if len(counts) > 1:
        listed = ", ".join(f"{k!r} {shape[0]} (shape {shape})" for k, shape in shapes.items())
        raise InputError(f"inputs stack different numbers of batches along their leading "
                         f"axis: {listed}; each input needs the same K")
    (count,) = counts
    if count == 0:
        listed = ", ".join(f"{k!r} {shape}" for k, shape in shapes.items())
        raise InputError(f"no batches: the inputs' leading axis has length 0 ({listed}); "
                         "steps needs K ≥ 1")
    return count


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
    return {k: values[v].copy() if graph.data(v)["op"] in SOURCE_OPS else values[v]
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
