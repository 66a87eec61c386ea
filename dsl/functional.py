"""The ops users call as ``fg.<name>``. Composites are written here from primitives,
so they need no VJP and no kernel of their own (the scheduler fuses them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ferrograd.ir.builder import Var, apply, user_src
from ferrograd.ir.builder import constant as _constant
from ferrograd.ir.errors import ShapeError, TraceError
from ferrograd.ir.ops.base import normalize_axes

# ---- elementwise primitives -----------------------------------------------------------------


def _unary(op: str, doc: str) -> Any:
    def fn(x: Var) -> Var:
        return apply(op, _tensor(x, op))

    fn.__name__ = fn.__qualname__ = op
    fn.__doc__ = doc
    return fn


relu = _unary("relu", "max(x, 0); its derivative at 0 is 0, as in PyTorch.")
sigmoid = _unary("sigmoid", "1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2.")
tanh = _unary("tanh", "Hyperbolic tangent.")
exp = _unary("exp", "e**x.")
log = _unary("log", "Natural logarithm.")
log1p = _unary("log1p", "log(1 + x), accurate for small x.")
sqrt = _unary("sqrt", "Square root.")
abs = _unary("abs", "Absolute value; its derivative at 0 is 0.")
sign = _unary("sign", "-1, 0 or 1.")
erf = _unary("erf", "The error function.")
sin = _unary("sin", "Sine.")
cos = _unary("cos", "Cosine.")
gelu = _unary("gelu", "x * Phi(x) in the exact erf form (PyTorch's default).")
normal_cdf = _unary("normal_cdf", "Phi(x), the standard normal distribution's CDF.")
softplus = _unary("softplus", "log(1 + exp(x)), stable for large |x|.")
stop_gradient = _unary("stop_gradient", "x, with no gradient flowing back through it.")


def maximum(a: Any, b: Any) -> Var:
    """Elementwise max; at ties the gradient is split evenly."""
    return apply("maximum", a, b)


def minimum(a: Any, b: Any) -> Var:
    """Elementwise min; at ties the gradient is split evenly."""
    return apply("minimum", a, b)


def where(cond: Var, a: Any, b: Any) -> Var:
    """``a`` where the bool mask ``cond`` holds, else ``b`` (broadcasting)."""
    return apply("where", _tensor(cond, "where"), a, b)


def _tensor(x: Any, op: str) -> Var:
    if not isinstance(x, Var):
        raise TraceError(f"{op}: expected a traced tensor, got {type(x).__name__} (wrap "
                         "arrays in fg.constant)", user_src())
    return x


# ---- structure ------------------------------------------------------------------------------


def concat(xs: Sequence[Var], axis: int = 0) -> Var:
    """Join tensors along ``axis``."""
    if not xs:
        raise ShapeError("concat: needs at least one tensor", user_src())
    xs = [_tensor(x, "concat") for x in xs]
    if len(xs) == 1:
        return xs[0]
    (axis,) = normalize_axes("concat", axis, xs[0].ndim)
    return apply("concat", *xs, axis=axis)


def embedding(table: Var, ids: Var) -> Var:
    """Rows of ``table`` at the integer ``ids``: output shape ids.shape + table.shape[1:]."""
    _bound_index_input(ids, table.shape[0])
    return apply("take", table, ids)


def _bound_index_input(ids: Var, bound: int) -> None:
    """Record that an integer input indexes something of size ``bound``; steps check it."""
    node = ids.graph.node(ids.id)
    while node.op in ("reshape", "transpose", "slice", "expand"):  # same values, moved
        node = ids.graph.node(node.args[0])
    if node.op == "input" and node.name is not None:
        old = ids.graph.index_bounds.get(node.name, bound)
        ids.graph.index_bounds[node.name] = min(old, bound)


# ---- softmax family and losses --------------------------------------------------------------


def softmax(x: Var, axis: int = -1) -> Var:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max for stability."""
    e = exp(x - stop_gradient(x.max(axis, keepdims=True)))
    return e / e.sum(axis, keepdims=True)


def log_softmax(x: Var, axis: int = -1) -> Var:
    """x - logsumexp(x) along ``axis``."""
    z = x - stop_gradient(x.max(axis, keepdims=True))
    return z - log(exp(z).sum(axis, keepdims=True))


def cross_entropy(logits: Var, labels: Var) -> Var:
    """Mean negative log-likelihood of integer ``labels`` (shape logits.shape[:-1])."""
    if labels.dtype != "i32":
        raise TraceError(f"cross_entropy: labels must be i32 class indices, got {labels.dtype}",
                         user_src())
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(f"cross_entropy: logits {logits.shape} need labels of shape "
                         f"{logits.shape[:-1]}, got {labels.shape}", user_src())
    classes = logits.shape[-1]
    _bound_index_input(labels, classes)
    onehot = labels.reshape(*labels.shape, 1) == _constant(
        labels.graph, np.arange(classes, dtype=np.int32))
    picked = where(onehot, log_softmax(logits, -1), 0.0).sum(-1)
    return -picked.mean()


def mse(pred: Var, target: Any) -> Var:
    """Mean squared error."""
    d = pred - target
    if d.shape != pred.shape:
        raise ShapeError(f"mse: prediction {pred.shape} and target {d.shape} differ",
                         user_src())
    return (d * d).mean()


def binary_cross_entropy(probs: Var, targets: Any) -> Var:
    """Mean BCE of probabilities; logs clamped at -100 as PyTorch does."""
    log_p = maximum(log(probs), -100.0)
    log_q = maximum(log(1.0 - probs), -100.0)
    return -(targets * log_p + (1.0 - targets) * log_q).mean()


# ---- convolution and pooling (NCHW) ----------------------------------------------------------


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    if len(pair) != 2 or any(int(p) < 0 for p in pair):
        raise ShapeError(f"{what} must be an int or a pair of non-negative ints, got {v!r}",
                         user_src())
    return int(pair[0]), int(pair[1])


def conv2d(x: Var, w: Var, stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0) -> Var:
    """2-d cross-correlation: x (N, C, H, W), w (O, C, kh, kw) -> (N, O, Ho, Wo)."""
    s = _pair(stride, "stride")
    if 0 in s:
        raise ShapeError("conv2d: stride must be positive", user_src())
    return apply("conv2d", x, w, stride=s, padding=_pair(padding, "padding"))


def _pool(x: Var, kernel: Any, stride: Any, combine: str) -> Var:
    if x.ndim != 4:
        raise ShapeError(f"{combine}_pool2d: needs x of shape (N, C, H, W), got {x.shape}",
                         user_src())
    k = _pair(kernel, "kernel")
    s = k if stride is None else _pair(stride, "stride")
    n, c, h, w = x.shape
    ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    if min(k + s) < 1 or ho < 1 or wo < 1:
        raise ShapeError(f"{combine}_pool2d: kernel {k}, stride {s} do not fit {x.shape}",
                         user_src())
    if s == k:  # windows tile the input: crop, reshape, reduce
        tiles = x[:, :, : ho * k[0], : wo * k[1]].reshape(n, c, ho, k[0], wo, k[1])
        return tiles.max((3, 5)) if combine == "max" else tiles.mean((3, 5))
    windows = [x[:, :, i: i + s[0] * (ho - 1) + 1: s[0], j: j + s[1] * (wo - 1) + 1: s[1]]
               for i in range(k[0]) for j in range(k[1])]
    out = windows[0]
    for win in windows[1:]:
        out = maximum(out, win) if combine == "max" else out + win
    return out if combine == "max" else out * (1.0 / (k[0] * k[1]))


def max_pool2d(x: Var, kernel: int | Sequence[int], stride: Any = None) -> Var:
    """Max over (kernel) windows; stride defaults to the kernel size (no padding)."""
    return _pool(x, kernel, stride, "max")


def avg_pool2d(x: Var, kernel: int | Sequence[int], stride: Any = None) -> Var:
    """Mean over (kernel) windows; stride defaults to the kernel size (no padding)."""
    return _pool(x, kernel, stride, "avg")


def layer_norm(x: Var, weight: Var | None = None, bias: Var | None = None,
               eps: float = 1e-5) -> Var:
    """Normalize over the last axis, then scale and shift (PyTorch's formula)."""
    centered = x - x.mean(-1, keepdims=True)
    var = (centered * centered).mean(-1, keepdims=True)
    y = centered / sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ---- tensor functions mirroring the methods ------------------------------------------------


def sum(x: Var, axis: Any = None, keepdims: bool = False) -> Var:
    return x.sum(axis, keepdims)


def mean(x: Var, axis: Any = None, keepdims: bool = False) -> Var:
    return x.mean(axis, keepdims)


def reshape(x: Var, *shape: Any) -> Var:
    return x.reshape(*shape)


def transpose(x: Var, *perm: Any) -> Var:
    return x.transpose(*perm)


def matmul(a: Var, b: Var) -> Var:
    return apply("matmul", a, b)
