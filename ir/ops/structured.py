"""Structured ops: sources, reductions, movement, matmul, gather/scatter, conv.

Each is one ``OpDef``: a shape/dtype rule, a NumPy reference and a VJP built
from other ops, so a gradient is a graph too. The autodiff driver sums each
returned cotangent back to its argument's shape, so rules may return a
broadcast-shaped cotangent (batched matmul does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import DTypeError, ShapeError
from .base import OpDef, Shape, broadcast_shapes, register, same_dtype

# ---- sources ----------------------------------------------------------------------------


def _source_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    if "value" in attrs:
        return tuple(attrs["value"].shape), _np_name(attrs["value"].dtype)
    return tuple(attrs["shape"]), attrs["dtype"]


def _np_name(dtype: np.dtype) -> str:
    return {np.float32: "f32", np.float64: "f64", np.int32: "i32", np.bool_: "bool"}[dtype.type]


for _src in ("input", "param", "state", "const"):
    register(OpDef(_src, "source", _source_infer, arity=0))


# ---- reductions -------------------------------------------------------------------------


def _reduced_shape(shape: Shape, axes: tuple[int, ...], keepdims: bool) -> Shape:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _reduce_infer(op: str) -> Any:
    def infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
        (shape,), (dtype,) = shapes, dtypes
        if dtype == "bool":
            raise DTypeError(f"{op}: cannot reduce a bool mask; convert it with .astype(fg.f32)")
        for a in attrs["axes"]:
            if not 0 <= a < len(shape):
                raise ShapeError(f"{op}: axis {a} out of range for shape {shape}")
            if op == "reduce_max" and shape[a] == 0:
                raise ShapeError(f"reduce_max: axis {a} of shape {shape} is empty")
        return _reduced_shape(shape, attrs["axes"], attrs["keepdims"]), dtype

    return infer


def _keep(g: Any, x: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    """Re-insert reduced axes so ``g`` broadcasts against ``x``."""
    return g if keepdims else g.reshape(_reduced_shape(x.shape, axes, True))


def _sum_vjp(g: Any, out: Any, x: Any, axes: tuple[int, ...], keepdims: bool) -> list:
    return [_keep(g, x, axes, keepdims).expand(x.shape)]


def _max_vjp(g: Any, out: Any, x: Any, axes: tuple[int, ...], keepdims: bool) -> list:
    from ..builder import apply

    hit = apply("cast", x == _keep(out, x, axes, keepdims), dtype=x.dtype)
    # Ties share the gradient evenly (PyTorch's amax does the same).
    share = hit / hit.sum(axes, keepdims=True)
    return [share * _keep(g, x, axes, keepdims)]


register(OpDef("reduce_sum", "reduce", _reduce_infer("reduce_sum"),
               ref=lambda x, axes, keepdims: np.sum(x, axis=axes, keepdims=keepdims,
                                                    dtype=x.dtype),
               vjp=_sum_vjp, arity=1))
register(OpDef("reduce_max", "reduce", _reduce_infer("reduce_max"),
               ref=lambda x, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims),
               vjp=_max_vjp, arity=1))


# ---- movement ---------------------------------------------------------------------------


def _reshape_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (shape,), (dtype,) = shapes, dtypes
    new = tuple(attrs["shape"])
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(new, dtype=np.int64)) or \
            any(d < 0 for d in new):
        raise ShapeError(f"reshape: cannot reshape {shape} into {new}")
    return new, dtype


def _transpose_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (shape,), (dtype,) = shapes, dtypes
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(len(shape))):
        raise ShapeError(f"transpose: {perm} is not a permutation of the axes of {shape}")
    return tuple(shape[p] for p in perm), dtype


def _expand_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (shape,), (dtype,) = shapes, dtypes
    target = tuple(attrs["shape"])
    if broadcast_shapes("expand", [shape, target]) != target:
        raise ShapeError(f"expand: {shape} does not broadcast to {target}")
    return target, dtype


def _expand_vjp(g: Any, out: Any, x: Any, shape: Shape) -> list:
    from ..builder import sum_to

    return [sum_to(g, x.shape)]


register(OpDef("reshape", "movement", _reshape_infer,
               ref=lambda x, shape: np.reshape(x, shape),
               vjp=lambda g, out, x, shape: [g.reshape(x.shape)], arity=1))
register(OpDef("transpose", "movement", _transpose_infer,
               ref=lambda x, perm: np.transpose(x, perm),
               vjp=lambda g, out, x, perm: [g.transpose(tuple(np.argsort(perm)))], arity=1))
register(OpDef("expand", "movement", _expand_infer,
               ref=lambda x, shape: np.broadcast_to(x, shape).copy(),
               vjp=_expand_vjp, arity=1))


def _slices(index: tuple[tuple[int, int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(a, b, c) for a, b, c in index)


def _slice_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (shape,), (dtype,) = shapes, dtypes
    index = attrs["index"]
    if len(index) != len(shape):
        raise ShapeError(f"slice: index {index} does not match shape {shape}")
    return tuple(len(range(*s.indices(d))) for s, d in zip(_slices(index), shape, strict=True)
                 ), dtype


def _unslice_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (shape,), (dtype,) = shapes, dtypes
    full = tuple(attrs["shape"])
    sliced, _ = _slice_infer([full], [dtype], attrs)
    if sliced != tuple(shape):
        raise ShapeError(f"unslice: {shape} does not fit slice {attrs['index']} of {full}")
    return full, dtype


def _unslice_ref(g: np.ndarray, index: Any, shape: Shape) -> np.ndarray:
    out = np.zeros(shape, g.dtype)
    out[_slices(index)] = g
    return out


register(OpDef("slice", "movement", _slice_infer,
               ref=lambda x, index: x[_slices(index)].copy(),
               vjp=lambda g, out, x, index: [_apply("unslice", g, index=index, shape=x.shape)],
               arity=1, doc="basic slicing: index holds (start, stop, step) per axis"))
register(OpDef("unslice", "movement", _unslice_infer, ref=_unslice_ref,
               vjp=lambda g, out, x, index, shape: [_apply("slice", g, index=index)],
               arity=1, doc="zeros of `shape` with the input placed at `index`"))


def _concat_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    axis = attrs["axis"]
    dtype = same_dtype("concat", dtypes)
    first = shapes[0]
    for s in shapes:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first,
                                                                             strict=True))
                                        if i != axis):
            raise ShapeError(f"concat: shapes {', '.join(map(str, shapes))} differ off "
                             f"axis {axis}")
    return tuple(sum(s[axis] for s in shapes) if i == axis else d
                 for i, d in enumerate(first)), dtype


def _concat_vjp(g: Any, out: Any, *xs: Any, axis: int) -> list:
    cts, start = [], 0
    for x in xs:
        index = tuple((start, start + x.shape[axis], 1) if i == axis else (0, d, 1)
                      for i, d in enumerate(g.shape))
        cts.append(_apply("slice", g, index=index))
        start += x.shape[axis]
    return cts


register(OpDef("concat", "movement", _concat_infer,
               ref=lambda *xs, axis: np.concatenate(xs, axis=axis), vjp=_concat_vjp))


# ---- matmul ----------------------------------------------------------------------------


def _matmul_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    a, b = shapes
    dtype = same_dtype("matmul", dtypes)
    if dtype not in ("f32", "f64"):
        raise DTypeError(f"matmul: needs float operands, got {dtype}")
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul: operands must be at least 2-d, got {a} @ {b}; "
                         "reshape vectors to (1, n) or (n, 1)")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul: inner dimensions differ in {a} @ {b}")
    batch = broadcast_shapes("matmul", [a[:-2], b[:-2]])
    return (*batch, a[-2], b[-1]), dtype


def _matmul_vjp(g: Any, out: Any, a: Any, b: Any) -> list:
    if a.ndim > 2 and b.ndim == 2:
        # A linear layer on batched rows: the weight's cotangent as one product over
        # all rows (K = batch x rows) rather than one per batch element summed after,
        # which would write batch-many weight-sized partials and read them back.
        k, n = b.shape
        return [g @ b.mT, a.reshape(-1, k).mT @ g.reshape(-1, n)]
    return [g @ b.mT, a.mT @ g]


register(OpDef("matmul", "matmul", _matmul_infer, ref=lambda a, b: np.matmul(a, b),
               vjp=_matmul_vjp, arity=2))


# ---- gather / scatter -------------------------------------------------------------------


def _take_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (table, ids), (dtype, id_dtype) = shapes, dtypes
    if id_dtype != "i32":
        raise DTypeError(f"take: indices must be i32, got {id_dtype}")
    if len(table) < 1:
        raise ShapeError("take: the table must be at least 1-d")
    return (*ids, *table[1:]), dtype


def _check_ids(ids: np.ndarray, size: int, op: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        from ..errors import InputError

        bad = ids[(ids < 0) | (ids >= size)].flat[0]
        raise InputError(f"{op}: index {bad} is out of range [0, {size})")


def _take_ref(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    _check_ids(ids, table.shape[0], "take")
    return table[ids]


def _scatter_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (ids, vals), (id_dtype, dtype) = shapes, dtypes
    if id_dtype != "i32":
        raise DTypeError(f"scatter_add: indices must be i32, got {id_dtype}")
    if tuple(vals[: len(ids)]) != tuple(ids):
        raise ShapeError(f"scatter_add: values {vals} do not start with the index shape {ids}")
    return (attrs["size"], *vals[len(ids):]), dtype


def _scatter_ref(ids: np.ndarray, vals: np.ndarray, size: int) -> np.ndarray:
    _check_ids(ids, size, "scatter_add")
    out = np.zeros((size, *vals.shape[ids.ndim:]), vals.dtype)
    np.add.at(out, ids, vals)
    return out


register(OpDef("take", "gather", _take_infer, ref=_take_ref, arity=2,
               vjp=lambda g, out, table, ids: [
                   _apply("scatter_add", ids, g, size=table.shape[0]), None],
               doc="rows of `table` at integer `ids` (embedding lookup)"))
register(OpDef("scatter_add", "gather", _scatter_infer, ref=_scatter_ref, arity=2,
               vjp=lambda g, out, ids, vals, size: [None, _apply("take", g, ids)],
               doc="zeros of (size, ...) with `vals` added at rows `ids`"))


# ---- convolution (NCHW, weight OIHW) ------------------------------------------------------


def _conv_out(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def _conv_infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple:
    (x, w), dtype = shapes, same_dtype("conv2d", dtypes)
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"conv2d: needs x (N, C, H, W) and weight (O, C, kh, kw), got {x} "
                         f"and {w}")
    if x[1] != w[1]:
        raise ShapeError(f"conv2d: x has {x[1]} channels but the weight expects {w[1]} "
                         f"(x {x}, weight {w})")
    (sh, sw), (ph, pw) = attrs["stride"], attrs["padding"]
    ho, wo = _conv_out(x[2], w[2], sh, ph), _conv_out(x[3], w[3], sw, pw)
    if ho < 1 or wo < 1:
        raise ShapeError(f"conv2d: kernel {w[2:]} does not fit the padded input {x[2:]}")
    return (x[0], w[0], ho, wo), dtype


def _windows(x: np.ndarray, kh: int, kw: int, stride: tuple, padding: tuple) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) view of the padded input's receptive fields."""
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _conv_ref(x: np.ndarray, w: np.ndarray, stride: tuple, padding: tuple) -> np.ndarray:
    win = _windows(x, w.shape[2], w.shape[3], stride, padding)
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True).astype(x.dtype)


def _conv_input_grad_ref(g: np.ndarray, w: np.ndarray, x_shape: Shape, stride: tuple,
                         padding: tuple) -> np.ndarray:
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x_shape
    kh, kw = w.shape[2:]
    ho, wo = g.shape[2:]
    out = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), g.dtype)
    contrib = np.einsum("nohw,ocij->ncijhw", g, w, optimize=True)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += contrib[:, :, i, j]
    return out[:, :, ph:ph + h, pw:pw + wd]


def _conv_weight_grad_ref(x: np.ndarray, g: np.ndarray, w_shape: Shape, stride: tuple,
                          padding: tuple) -> np.ndarray:
    win = _windows(x, w_shape[2], w_shape[3], stride, padding)
    return np.einsum("nchwij,nohw->ocij", win, g, optimize=True).astype(x.dtype)


def _conv_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"stride": attrs["stride"], "padding": attrs["padding"]}


# conv2d is bilinear, and so are its two gradients; their VJPs close over the
# three ops (each one's VJP is built from the other two).
register(OpDef(
    "conv2d", "conv", _conv_infer, ref=_conv_ref, arity=2,
    vjp=lambda g, out, x, w, **a: [
        _apply("conv2d_input_grad", g, w, x_shape=x.shape, **a),
        _apply("conv2d_weight_grad", x, g, w_shape=w.shape, **a)]))
register(OpDef(
    "conv2d_input_grad", "conv",
    lambda s, d, a: (tuple(a["x_shape"]), same_dtype("conv2d", d)),
    ref=_conv_input_grad_ref, arity=2,
    vjp=lambda u, out, g, w, x_shape, **a: [
        _apply("conv2d", u, w, **a),
        _apply("conv2d_weight_grad", u, g, w_shape=w.shape, **a)]))
register(OpDef(
    "conv2d_weight_grad", "conv",
    lambda s, d, a: (tuple(a["w_shape"]), same_dtype("conv2d", d)),
    ref=_conv_weight_grad_ref, arity=2,
    vjp=lambda v, out, x, g, w_shape, **a: [
        _apply("conv2d_input_grad", g, v, x_shape=x.shape, **a),
        _apply("conv2d", x, v, **a)]))


def _apply(op: str, *args: Any, **attrs: Any) -> Any:
    from ..builder import apply

    return apply(op, *args, **attrs)
