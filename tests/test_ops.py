"""The op table test: one row per primitive op and per public composite.

Each row builds its op on traced inputs, gives input shapes with an input domain
(positive for log, away from the kink for relu, no ties for max) and tolerances.
Every row is checked twice:

- forward: ``fg.interpret`` (float32, and float64) against a NumPy formula written
  here, independently of the op's own ``ref``;
- VJP: the loss ``sum(out * c)`` for a random cotangent ``c`` is differentiated
  with ``fg.grad``, and ``<grad, v>`` is compared with float64 central differences
  along a random direction ``v`` of each input in turn (JAX's ``check_vjp`` trick).

Float inputs are params (``fg.param(init=...)``); integer ids and bool masks are
constants. A new op or a new public ``fg.*`` function without a row fails
``test_every_op_has_a_row`` / ``test_every_public_function_has_a_row``.
"""

from __future__ import annotations

import functools
import math
import operator
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.dsl import functional
from ferrograd.ir.builder import Var, apply, constant
from ferrograd.ir.graph import SOURCE_OPS
from ferrograd.ir.ops import OPS

Domain = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]

# ---- input domains ---------------------------------------------------------------------


def normal(scale: float = 1.0) -> Domain:
    return lambda rng, shape: rng.normal(0.0, scale, shape)


def uniform(lo: float, hi: float) -> Domain:
    return lambda rng, shape: rng.uniform(lo, hi, shape)


def away_from_zero(lo: float = 0.2, hi: float = 2.0) -> Domain:
    """|x| in [lo, hi] with a random sign: clear of the kink of relu/abs/sign at 0."""
    return lambda rng, shape: rng.choice([-1.0, 1.0], shape) * rng.uniform(lo, hi, shape)


def lattice(offset: float) -> Domain:
    """Near 0.5 k + offset; lattices with offsets 0 and 0.25 stay >= 0.15 apart (no ties)."""
    return lambda rng, shape: (0.5 * rng.integers(-4, 5, shape) + offset
                               + rng.uniform(-0.05, 0.05, shape))


def distinct(gap: float = 0.25) -> Domain:
    """Pairwise distinct values at least ``gap`` apart (less jitter): max has no ties."""
    def draw(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        return ((rng.permutation(n) - n / 2) * gap
                + rng.uniform(-0.02, 0.02, n)).reshape(shape)
    return draw


def integers(lo: int, hi: int) -> Domain:
    """Integer-valued floats, so that comparisons meet ties."""
    return lambda rng, shape: rng.integers(lo, hi + 1, shape).astype(np.float64)


def with_zeros(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values, about a third of them exactly 0 (the edge of x ** y at x = 0)."""
    return np.where(rng.random(shape) < 0.35, 0.0, rng.normal(size=shape))


def ids(n: int) -> Domain:
    return lambda rng, shape: rng.integers(0, n, shape).astype(np.int32)


def fixed(value: Any) -> Domain:
    return lambda rng, shape: np.asarray(value).reshape(shape)


def mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) < 0.5


@dataclass(frozen=True)
class Arg:
    """One input: float arrays become params (differentiated), others constants."""

    shape: tuple[int, ...]
    domain: Domain = field(default=normal())
    const: bool = False  # a float input that is a constant, not a param
    dtype: str = "f32"  # of a float param


@dataclass(frozen=True)
class Row:
    name: str  # the primitive op (``exp``) or the public spelling (``fg.softmax``)
    build: Callable[..., Var]
    ref: Callable[..., np.ndarray]
    args: tuple[Arg, ...]
    rtol: float = 1e-5  # forward, float32
    atol: float = 1e-6
    dtype: type = np.float32  # of a float output
    grad: str = "fd"  # "fd": against finite differences; "zero": no gradient; "none": bool/int out
    grad_rtol: float = 1e-7


def op(name: str, **attrs: Any) -> Callable[..., Var]:
    """Build the primitive ``name`` directly (what a VJP rule or a pass would do)."""
    return lambda *xs: apply(name, *xs, **attrs)


# ---- independent NumPy formulas -------------------------------------------------------

erf = np.vectorize(math.erf, otypes=[np.float64])


def sigmoid_ref(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gelu_ref(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax_ref(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def log_softmax_ref(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def cross_entropy_ref(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    lp = log_softmax_ref(logits)
    return -np.mean([lp[i, labels[i]] for i in range(len(labels))])


def layer_norm_ref(x: np.ndarray, w: Any = 1.0, b: Any = 0.0, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def take_ref(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.empty((*idx.shape, *table.shape[1:]))
    for pos in np.ndindex(*idx.shape):
        out[pos] = table[idx[pos]]
    return out


def scatter_add_ref(idx: np.ndarray, vals: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *vals.shape[idx.ndim:]))
    for pos in np.ndindex(*idx.shape):
        out[idx[pos]] += vals[pos]
    return out


def _padded(x: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    n, c, h, w = x.shape
    ph, pw = padding
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + w] = x
    return xp


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def conv_ref(x: np.ndarray, w: np.ndarray, stride: tuple[int, int] = (1, 1),
             padding: tuple[int, int] = (0, 0)) -> np.ndarray:
    (sh, sw), (kh, kw) = stride, w.shape[2:]
    xp = _padded(x, padding)
    ho = _out_size(x.shape[2], kh, sh, padding[0])
    wo = _out_size(x.shape[3], kw, sw, padding[1])
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return out


def conv_input_grad_ref(g: np.ndarray, w: np.ndarray, x_shape: tuple[int, ...],
                        stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    (sh, sw), (kh, kw), (ph, pw) = stride, w.shape[2:], padding
    n, c, h, wd = x_shape
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            dxp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.tensordot(
                g[:, :, i, j], w, axes=([1], [0]))
    return dxp[:, :, ph:ph + h, pw:pw + wd]


def conv_weight_grad_ref(x: np.ndarray, g: np.ndarray, w_shape: tuple[int, ...],
                         stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    (sh, sw), (kh, kw) = stride, w_shape[2:]
    xp = _padded(x, padding)
    dw = np.zeros(w_shape)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            dw += np.tensordot(g[:, :, i, j], patch, axes=([0], [0]))
    return dw


def pool_ref(x: np.ndarray, k: tuple[int, int], s: tuple[int, int],
             reduce: Callable[..., np.ndarray]) -> np.ndarray:
    n, c, h, w = x.shape
    ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    out = np.empty((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            out[:, :, i, j] = reduce(x[:, :, i * s[0]:i * s[0] + k[0],
                                       j * s[1]:j * s[1] + k[1]], axis=(2, 3))
    return out


# ---- the table ------------------------------------------------------------------------

S, ROW, COL = (3, 4), (4,), (3, 1)
X3 = (2, 3, 4)
POSITIVE = uniform(0.5, 2.0)

# name -> (NumPy formula, domain); each gets a primitive row and an fg.<name> row.
UNARY: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Domain]] = {
    "neg": (lambda x: -x, normal()),
    "exp": (np.exp, normal()),
    "log": (np.log, POSITIVE),
    "log1p": (lambda x: np.log(1.0 + x), uniform(-0.5, 2.0)),
    "sqrt": (lambda x: x ** 0.5, POSITIVE),
    "tanh": (lambda x: (np.exp(2 * x) - 1) / (np.exp(2 * x) + 1), normal(2.0)),
    "erf": (erf, normal()),
    "abs": (lambda x: np.where(x < 0, -x, x), away_from_zero()),
    "sign": (lambda x: np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0)), away_from_zero()),
    "sin": (np.sin, normal(2.0)),
    "cos": (np.cos, normal(2.0)),
    "relu": (lambda x: np.where(x > 0, x, 0.0), away_from_zero()),
    "sigmoid": (sigmoid_ref, normal(3.0)),
    "gelu": (gelu_ref, normal(2.0)),
    "normal_cdf": (lambda x: 0.5 * (1.0 + erf(x / math.sqrt(2.0))), normal(2.0)),
    "softplus": (lambda x: np.logaddexp(0.0, x), normal(6.0)),  # large |x| too: stability
}

UNARY_ROWS = [
    Row(name, op(name), ref, (Arg(S, dom),))
    for name, (ref, dom) in UNARY.items()
] + [
    Row(f"fg.{name}", getattr(fg, name), ref, (Arg(S, dom),))
    for name, (ref, dom) in UNARY.items() if name != "neg"
]

BINARY_ROWS = [
    Row("add", op("add"), lambda a, b: a + b, (Arg(S), Arg(ROW))),
    Row("sub", op("sub"), lambda a, b: a - b, (Arg(COL), Arg(S))),
    Row("mul", op("mul"), lambda a, b: a * b, (Arg(S), Arg(S))),
    Row("div", op("div"), lambda a, b: a / b, (Arg(S), Arg(COL, away_from_zero(0.5, 2.0)))),
    Row("pow", op("pow"), lambda a, b: np.exp(b * np.log(a)),
        (Arg(S, POSITIVE), Arg(ROW))),
    # The exponent is a constant: negative bases are fine, and 0 ** 2 has derivative 0.
    Row("pow/zero-base", op("pow"), lambda a, b: a * a,
        (Arg(S, with_zeros), Arg((), fixed(2.0), const=True))),
    Row("pow/negative-base", op("pow"), lambda a, b: a * a * a,
        (Arg(S), Arg((), fixed(3.0), const=True))),
    Row("maximum", op("maximum"), lambda a, b: np.where(a > b, a, b),
        (Arg(S, lattice(0.0)), Arg(ROW, lattice(0.25)))),
    Row("minimum", op("minimum"), lambda a, b: np.where(a < b, a, b),
        (Arg(COL, lattice(0.0)), Arg(S, lattice(0.25)))),
    Row("mul/scalar", op("mul"), lambda a, b: a * b, (Arg(S), Arg(()))),
    Row("add/i32", op("add"), lambda a, b: a + b, (Arg(S, ids(9)), Arg(ROW, ids(9))),
        grad="none"),
    Row("mul/i32", op("mul"), lambda a, b: a * b, (Arg(COL, ids(9)), Arg(S, ids(9))),
        grad="none"),
]

TIES = (Arg(S, integers(-2, 2)), Arg(ROW, integers(-2, 2)))
COMPARE_ROWS = [
    Row(name, op(name), ref, TIES, grad="none")
    for name, ref in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                      ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]
]

LOGICAL_ROWS = [
    Row("logical_and", op("logical_and"), lambda a, b: a & b, (Arg(S, mask), Arg(ROW, mask)),
        grad="none"),
    Row("logical_or", op("logical_or"), lambda a, b: a | b, (Arg(COL, mask), Arg(S, mask)),
        grad="none"),
    Row("logical_not", op("logical_not"), lambda a: ~a, (Arg(S, mask),), grad="none"),
]

SPECIAL_ROWS = [
    Row("where", op("where"), lambda c, a, b: np.choose(np.broadcast_to(c, S).astype(int),
                                                         [np.broadcast_to(b, S), a]),
        (Arg(COL, mask), Arg(S), Arg(ROW))),
    Row("cast", op("cast", dtype="f64"), lambda x: x, (Arg(S),), dtype=np.float64),
    Row("cast/i32", op("cast", dtype="i32"), lambda x: np.trunc(x).astype(np.int32),
        (Arg(S, normal(3.0)),), grad="none"),
    Row("cast/bool", op("cast", dtype="f32"), lambda m: np.where(m, 1.0, 0.0),
        (Arg(S, mask),), grad="none"),
    Row("stop_gradient", op("stop_gradient"), lambda x: x, (Arg(S),), grad="zero"),
]

# The slice (1:4:2, 0:6:3) of a (4, 6) array picks rows 1, 3 and columns 0, 3.
SLICE = ((1, 4, 2), (0, 6, 3))


def unslice_ref(x: np.ndarray) -> np.ndarray:
    out = np.zeros((4, 6))
    for a, i in enumerate((1, 3)):
        for b, j in enumerate((0, 3)):
            out[i, j] = x[a, b]
    return out


CONV = {"stride": (2, 1), "padding": (1, 2)}
# x (2, 3, 6, 5), w (4, 3, 3, 2): Ho = (6 + 2 - 3) // 2 + 1 = 3 (the last padded row is
# never read), Wo = (5 + 4 - 2) // 1 + 1 = 8.
CONV_X, CONV_W, CONV_G = (2, 3, 6, 5), (4, 3, 3, 2), (2, 4, 3, 8)
EMB_IDS = np.array([[1, 4, 1], [0, 1, 3]], np.int32)  # repeated ids: gradients accumulate

STRUCTURED_ROWS = [
    Row("reduce_sum", op("reduce_sum", axes=(0, 2), keepdims=False),
        lambda x: np.einsum("ijk->j", x), (Arg(X3),)),
    Row("reduce_sum/keepdims", op("reduce_sum", axes=(1,), keepdims=True),
        lambda x: np.einsum("ijk->ik", x)[:, None, :], (Arg(X3),)),
    Row("reduce_max", op("reduce_max", axes=(1,), keepdims=True),
        lambda x: np.sort(x, axis=1)[:, -1:, :], (Arg(X3, distinct()),)),
    Row("reduce_max/all", op("reduce_max", axes=(0, 1, 2), keepdims=False),
        lambda x: np.sort(x.ravel())[-1], (Arg(X3, distinct()),)),
    Row("reshape", op("reshape", shape=(4, 6)),
        lambda x: np.array(x.ravel().tolist()).reshape(4, 6), (Arg(X3),)),
    Row("transpose", op("transpose", perm=(2, 0, 1)),
        lambda x: np.einsum("ijk->kij", x), (Arg(X3),)),
    Row("expand", op("expand", shape=(2, 3, 4)),
        lambda x: x[None] * np.ones((2, 3, 4)), (Arg(COL),)),
    Row("slice", op("slice", index=SLICE), lambda x: x[[1, 3]][:, [0, 3]], (Arg((4, 6)),)),
    Row("unslice", op("unslice", index=SLICE, shape=(4, 6)), unslice_ref, (Arg((2, 2)),)),
    Row("concat", op("concat", axis=1), lambda *xs: np.hstack(xs),
        (Arg((2, 3)), Arg((2, 1)), Arg((2, 2)))),
    Row("matmul", op("matmul"), lambda a, b: np.einsum("ik,kj->ij", a, b),
        (Arg((3, 4)), Arg((4, 2)))),
    Row("matmul/batched", op("matmul"),  # (2, 1, 3, 4) @ (5, 4, 2): both sides broadcast
        lambda a, b: np.einsum("xik,ykj->xyij", a[:, 0], b), (Arg((2, 1, 3, 4)), Arg((5, 4, 2)))),
    Row("take", op("take"), take_ref, (Arg((5, 3)), Arg((2, 3), fixed(EMB_IDS)))),
    Row("scatter_add", op("scatter_add", size=5), lambda i, v: scatter_add_ref(i, v, 5),
        (Arg((4,), fixed([1, 3, 1, 0])), Arg((4, 3)))),
    Row("conv2d", op("conv2d", **CONV), lambda x, w: conv_ref(x, w, **CONV),
        (Arg(CONV_X), Arg(CONV_W)), atol=1e-5),
    Row("conv2d_input_grad", op("conv2d_input_grad", x_shape=CONV_X, **CONV),
        lambda g, w: conv_input_grad_ref(g, w, CONV_X, **CONV),
        (Arg(CONV_G), Arg(CONV_W)), atol=1e-5),
    Row("conv2d_weight_grad", op("conv2d_weight_grad", w_shape=CONV_W, **CONV),
        lambda x, g: conv_weight_grad_ref(x, g, CONV_W, **CONV),
        (Arg(CONV_X), Arg(CONV_G)), atol=1e-5),
]

# Public spellings: fg.* functions, Tensor operators and methods.
COMPOSITE_ROWS = [
    Row("fg.maximum", fg.maximum, np.fmax, (Arg(S, lattice(0.0)), Arg(COL, lattice(0.25)))),
    Row("fg.minimum", fg.minimum, np.fmin, (Arg(ROW, lattice(0.0)), Arg(S, lattice(0.25)))),
    Row("fg.where", lambda m, a: fg.where(m, a, 0.0), lambda m, a: np.where(m, a, 0.0),
        (Arg(S, mask), Arg(S))),
    Row("fg.stop_gradient", fg.stop_gradient, lambda x: x + 0.0, (Arg(S),), grad="zero"),
    Row("fg.softmax", fg.softmax, softmax_ref, (Arg((3, 5), normal(3.0)),)),
    Row("fg.softmax/axis0", lambda x: fg.softmax(x, axis=0), lambda x: softmax_ref(x, 0),
        (Arg((4, 2, 3), normal(3.0)),)),
    Row("fg.log_softmax", fg.log_softmax, log_softmax_ref, (Arg((3, 5), normal(3.0)),)),
    Row("fg.cross_entropy", fg.cross_entropy, cross_entropy_ref,
        (Arg((4, 5), normal(2.0)), Arg((4,), fixed([2, 0, 4, 2])))),
    Row("fg.mse", fg.mse, lambda p, t: np.mean((p - t) ** 2), (Arg((6,)), Arg((6,)))),
    Row("fg.binary_cross_entropy", fg.binary_cross_entropy,
        lambda p, t: -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)),
        (Arg((6,), uniform(0.05, 0.95)), Arg((6,), uniform(0.0, 1.0)))),
    Row("fg.concat", lambda a, b, c: fg.concat([a, b, c], axis=-1),
        lambda a, b, c: np.concatenate([a, b, c], axis=1),
        (Arg((2, 3)), Arg((2, 1)), Arg((2, 2)))),
    Row("fg.embedding", fg.embedding, take_ref, (Arg((5, 3)), Arg((2, 3), fixed(EMB_IDS)))),
    Row("fg.conv2d", lambda x, w: fg.conv2d(x, w, stride=2, padding=1),
        lambda x, w: conv_ref(x, w, (2, 2), (1, 1)), (Arg((2, 2, 5, 6)), Arg((3, 2, 3, 3))),
        atol=1e-5),
    Row("fg.max_pool2d/tiled", lambda x: fg.max_pool2d(x, 2),  # 5 x 7: the edge is cropped
        lambda x: pool_ref(x, (2, 2), (2, 2), np.max), (Arg((2, 3, 5, 7), distinct()),)),
    Row("fg.max_pool2d/overlapping", lambda x: fg.max_pool2d(x, 3, stride=2),
        lambda x: pool_ref(x, (3, 3), (2, 2), np.max), (Arg((1, 2, 7, 6), distinct()),)),
    Row("fg.max_pool2d/rect", lambda x: fg.max_pool2d(x, (2, 3), stride=(1, 2)),
        lambda x: pool_ref(x, (2, 3), (1, 2), np.max), (Arg((1, 2, 4, 7), distinct()),)),
    Row("fg.avg_pool2d/tiled", lambda x: fg.avg_pool2d(x, 2),
        lambda x: pool_ref(x, (2, 2), (2, 2), np.mean), (Arg((2, 3, 5, 7)),)),
    Row("fg.avg_pool2d/overlapping", lambda x: fg.avg_pool2d(x, (3, 2), stride=(2, 1)),
        lambda x: pool_ref(x, (3, 2), (2, 1), np.mean), (Arg((1, 2, 7, 5)),)),
    Row("fg.layer_norm", fg.layer_norm, layer_norm_ref, (Arg((3, 6)), Arg((6,)), Arg((6,)))),
    Row("fg.layer_norm/f64", fg.layer_norm, layer_norm_ref,
        (Arg((3, 6), dtype="f64"), Arg((6,), dtype="f64"), Arg((6,), dtype="f64")),
        rtol=1e-12, atol=1e-12, dtype=np.float64),
    Row("fg.cross_entropy/f64", fg.cross_entropy, cross_entropy_ref,
        (Arg((4, 5), normal(2.0), dtype="f64"), Arg((4,), fixed([2, 0, 4, 2]))),
        rtol=1e-12, atol=1e-12, dtype=np.float64),
    Row("fg.layer_norm/plain", fg.layer_norm, layer_norm_ref, (Arg((2, 3, 6), normal(3.0)),)),
    Row("fg.sum", lambda x: fg.sum(x, axis=(0, 2)), lambda x: np.einsum("ijk->j", x),
        (Arg(X3),)),
    Row("fg.mean", lambda x: fg.mean(x, axis=1, keepdims=True),
        lambda x: np.einsum("ijk->ik", x)[:, None] / 3, (Arg(X3),)),
    Row("fg.reshape", lambda x: fg.reshape(x, -1, 3), lambda x: x.reshape(8, 3), (Arg(X3),)),
    Row("fg.transpose", lambda x: fg.transpose(x, 1, 2, 0),
        lambda x: np.einsum("ijk->jki", x), (Arg(X3),)),
    Row("fg.matmul", fg.matmul, lambda a, b: np.einsum("ik,bkj->bij", a, b),
        (Arg((3, 4)), Arg((2, 4, 5)))),
    Row("Tensor.__getitem__", lambda x: x[:, 1, :], lambda x: x[:, 1, :], (Arg(X3),)),
    Row("Tensor.__getitem__/mixed", lambda x: x[1:, ::2, None, -1],
        lambda x: x[1:, ::2, -1][:, :, None], (Arg((3, 5, 4)),)),
    Row("Tensor.T", lambda x: x.T, lambda x: np.einsum("ijk->kji", x), (Arg(X3),)),
    Row("Tensor.mT", lambda x: x.mT, lambda x: np.einsum("ijk->ikj", x), (Arg(X3),)),
    Row("Tensor.sum", lambda x: x.sum(), lambda x: np.einsum("ijk->", x), (Arg(X3),)),
    Row("Tensor.sum/axis-keepdims", lambda x: x.sum(axis=-1, keepdims=True),
        lambda x: np.einsum("ijk->ij", x)[..., None], (Arg(X3),)),
    Row("Tensor.mean", lambda x: x.mean(), lambda x: np.einsum("ijk->", x) / 24, (Arg(X3),)),
    Row("Tensor.mean/axis", lambda x: x.mean(axis=(0, 2)),
        lambda x: np.einsum("ijk->j", x) / 8, (Arg(X3),)),
    Row("Tensor.max", lambda x: x.max(), lambda x: np.sort(x.ravel())[-1],
        (Arg(X3, distinct()),)),
    Row("Tensor.max/axis-keepdims", lambda x: x.max(axis=(0, 2), keepdims=True),
        lambda x: np.sort(x.transpose(1, 0, 2).reshape(3, 8))[:, -1].reshape(1, 3, 1),
        (Arg(X3, distinct()),)),
    Row("Tensor.min", lambda x: x.min(axis=0), lambda x: np.sort(x, axis=0)[0],
        (Arg(X3, distinct()),)),
    Row("Tensor.reshape", lambda x: x.reshape(4, -1), lambda x: x.reshape(4, 6), (Arg(X3),)),
    Row("Tensor.__pow__", lambda x: x ** 3, lambda x: x * x * x, (Arg(S),)),
    Row("Tensor.__pow__/tensor", lambda a, b: a ** b, lambda a, b: np.exp(b * np.log(a)),
        (Arg(S, POSITIVE), Arg(COL))),
    Row("Tensor.__rpow__", lambda x: 2.0 ** x, lambda x: np.exp(x * math.log(2.0)),
        (Arg(S),)),
    Row("Tensor.__truediv__", lambda a, b: a / b, lambda a, b: a * (1.0 / b),
        (Arg(S), Arg(ROW, away_from_zero(0.5, 2.0)))),
    Row("Tensor.__rtruediv__", lambda x: 1.0 / x, np.reciprocal,
        (Arg(S, away_from_zero(0.5, 2.0)),)),
    Row("Tensor.__matmul__", lambda a, b: a @ b, lambda a, b: np.einsum("ik,kj->ij", a, b),
        (Arg((3, 4)), Arg((4, 2)))),
    Row("Tensor.__neg__", lambda x: -x, lambda x: 0.0 - x, (Arg(S),)),
    Row("Tensor.__add__/scalar", lambda x: 1.5 + x * 2 - 0.5, lambda x: 2 * x + 1.0,
        (Arg(S),)),
    Row("Tensor.__lt__", lambda a, b: (a < b).astype(fg.f32) * a,
        lambda a, b: np.where(a < b, a, 0.0), (Arg(S, lattice(0.0)), Arg(ROW, lattice(0.25)))),
]

ROWS: list[Row] = (UNARY_ROWS + BINARY_ROWS + COMPARE_ROWS + LOGICAL_ROWS + SPECIAL_ROWS
                   + STRUCTURED_ROWS + COMPOSITE_ROWS)


# ---- the checks -----------------------------------------------------------------------


@dataclass
class Case:
    """A row traced once: ``out`` (and ``loss = sum(out * c)`` for float outputs)."""

    row: Row
    values: list[np.ndarray]  # every input, float ones as float64
    graph: fg.Graph
    params: dict[str, np.ndarray]  # float64

    def params_as(self, dtype: Any) -> dict[str, np.ndarray]:
        return {k: v.astype(dtype) for k, v in self.params.items()}


def make_case(row: Row) -> Case:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()))
    values = [a.domain(rng, a.shape) for a in row.args]
    params = {f"x{i}": v for i, (a, v) in enumerate(zip(row.args, values, strict=True))
              if v.dtype == np.float64 and not a.const}

    def model() -> dict[str, Var]:
        xs = [fg.param(f"x{i}", v.shape, init=v, dtype=a.dtype) if f"x{i}" in params else
              fg.constant(v.astype(np.float32) if v.dtype == np.float64 else v)
              for i, (a, v) in enumerate(zip(row.args, values, strict=True))]
        out = row.build(*xs)
        result = {"out": out}
        if out.dtype in ("f32", "f64"):
            c = rng.normal(size=out.shape)
            result["loss"] = (out * fg.constant(c, out.dtype)).sum()
        return result

    model.__name__ = re.sub(r"\W", "_", row.name)
    return Case(row, values, fg.trace(model), params)


def expected(case: Case, dtype: Any) -> np.ndarray:
    """The row's NumPy formula on the inputs as the graph sees them (rounded to ``dtype``)."""
    args = [v.astype(dtype).astype(np.float64) if v.dtype == np.float64 else v
            for v in case.values]
    return np.asarray(case.row.ref(*args))


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_forward(row: Row) -> None:
    case = make_case(row)
    base = row.name.split("/")[0]
    if base in OPS:  # a primitive row must exercise its op
        assert base in {n.op for n in case.graph.nodes()}, f"{row.name} does not use {base}"
    got = fg.interpret(case.graph, {}, case.params_as(np.float32), results=["out"])["out"]
    want = expected(case, np.float32)
    assert got.shape == want.shape
    if want.dtype.kind in "bi":
        assert got.dtype.kind == want.dtype.kind
        np.testing.assert_array_equal(got, want)
        return
    assert got.dtype == row.dtype
    np.testing.assert_allclose(got, want, rtol=row.rtol, atol=row.atol)
    # The float64 mode used by gradient checks computes the same function, more exactly
    # (its constants, such as 1/n in a mean, are still float32 numbers: hence atol).
    got64 = fg.interpret(case.graph, {}, case.params, dtype="f64", results=["out"])["out"]
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected(case, np.float64), rtol=1e-6, atol=1e-7)


def directional_fd(loss: Callable[[dict[str, np.ndarray]], float],
                   params: dict[str, np.ndarray], name: str, v: np.ndarray,
                   h: float = 1e-4) -> float:
    """d/dt loss(params + t v e_name) at 0: central differences, Richardson-extrapolated."""

    def central(step: float) -> float:
        plus = {**params, name: params[name] + step * v}
        minus = {**params, name: params[name] - step * v}
        return (loss(plus) - loss(minus)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


VJP_ROWS = [r for r in ROWS if r.grad != "none"]
FD_ROWS = [r for r in ROWS if r.grad == "fd"]


@pytest.mark.parametrize("row", VJP_ROWS, ids=[r.name for r in VJP_ROWS])
def test_vjp(row: Row) -> None:
    case = make_case(row)
    assert case.params, f"{row.name}: a differentiable row needs a float param"
    g = fg.grad(case.graph)
    grads = fg.interpret(g, {}, case.params, dtype="f64",
                         results=[f"grad:{k}" for k in case.params])
    for name, p in case.params.items():
        assert grads[f"grad:{name}"].shape == p.shape
        assert np.all(np.isfinite(grads[f"grad:{name}"])), name
    if row.grad == "zero":
        for name in case.params:
            np.testing.assert_array_equal(grads[f"grad:{name}"], 0.0)
        return

    def loss(params: dict[str, np.ndarray]) -> float:
        return float(fg.interpret(case.graph, {}, params, dtype="f64", results=["loss"])["loss"])

    rng = np.random.default_rng(1)
    for name, p in case.params.items():
        v = rng.normal(size=p.shape)
        analytic = float(np.sum(grads[f"grad:{name}"] * v))
        numeric = directional_fd(loss, case.params, name, v)
        scale = max(abs(analytic), abs(numeric), 1e-3)
        assert abs(analytic - numeric) <= row.grad_rtol * scale, (
            f"{row.name}: d/d{name} along v: grad gives {analytic!r}, finite "
            f"differences {numeric!r}")


@pytest.mark.parametrize("row", FD_ROWS, ids=[r.name for r in FD_ROWS])
def test_second_order(row: Row) -> None:
    """Gradients are graphs too: differentiate ``<grad, u>`` again (a Hessian-vector
    product), which runs the VJPs of the VJPs and of the derivative ops (``gelu.d0``)."""
    case = make_case(row)
    g = fg.grad(case.graph)
    rng = np.random.default_rng(2)
    terms = [(Var(g, gid) * constant(g, rng.normal(size=g.node(gid).shape), g.node(gid).dtype)
              ).sum() for gid in g.grads.values()]
    g.outputs["hvp"] = functools.reduce(operator.add, terms).id
    gg = fg.grad(g, of="hvp")
    second = fg.interpret(gg, {}, case.params, dtype="f64",
                          results=[f"grad:{k}" for k in case.params])

    def hvp(params: dict[str, np.ndarray]) -> float:
        return float(fg.interpret(g, {}, params, dtype="f64", results=["hvp"])["hvp"])

    for name, p in case.params.items():
        v = rng.normal(size=p.shape)
        analytic = float(np.sum(second[f"grad:{name}"] * v))
        numeric = directional_fd(hvp, case.params, name, v)
        scale = max(abs(analytic), abs(numeric), 1e-3)
        assert abs(analytic - numeric) <= 1e-6 * scale, (
            f"{row.name}: second order d/d{name} along v: {analytic!r} vs finite "
            f"differences {numeric!r}")


# Documented choices at points where the derivative does not exist.
SUBGRADIENTS = [
    ("relu", fg.relu, [[0.0, 1.0, -1.0]], [[0.0, 1.0, 0.0]]),  # relu'(0) = 0
    ("abs", fg.abs, [[0.0, 2.0, -2.0]], [[0.0, 1.0, -1.0]]),  # abs'(0) = 0
    ("maximum", fg.maximum, [[1.0, 2.0], [1.0, 0.0]], [[0.5, 1.0], [0.5, 0.0]]),
    ("minimum", fg.minimum, [[1.0, 2.0], [1.0, 0.0]], [[0.5, 0.0], [0.5, 1.0]]),
    ("reduce_max", lambda x: x.max(), [[3.0, 1.0, 3.0]], [[0.5, 0.0, 0.5]]),
    ("fg.max_pool2d", lambda x: fg.max_pool2d(x.reshape(1, 1, 2, 2), 2),
     [[1.0, 1.0, 0.0, 1.0]], [[1 / 3, 1 / 3, 0.0, 1 / 3]]),
]


@pytest.mark.parametrize("build, inputs, want", [s[1:] for s in SUBGRADIENTS],
                         ids=[s[0] for s in SUBGRADIENTS])
def test_ties_and_kinks_follow_the_documented_subgradient(build: Callable[..., Var],
                                                          inputs: list, want: list) -> None:
    def model() -> Var:
        return build(*(fg.param(f"x{i}", len(v), init=v) for i, v in enumerate(inputs))).sum()

    g = fg.grad(fg.trace(model))
    params = {f"x{i}": np.array(v, np.float32) for i, v in enumerate(inputs)}
    res = fg.interpret(g, {}, params)
    for i, w in enumerate(want):
        np.testing.assert_allclose(res[f"grad:x{i}"], w, rtol=1e-6)


# ---- coverage: a new op or public function without a row fails here ---------------------

DERIVATIVE_OP = re.compile(r"\.d\d+$")


def row_bases() -> set[str]:
    return {r.name.split("/")[0] for r in ROWS}


def test_row_names_are_unique() -> None:
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names))


def test_every_op_has_a_row() -> None:
    ops = {name for name in OPS if name not in SOURCE_OPS and not DERIVATIVE_OP.search(name)}
    assert ops - row_bases() == set(), "ops without a row in tests/test_ops.py"


def public_functions() -> Sequence[str]:
    return sorted(name for name, fn in vars(functional).items()
                  if callable(fn) and not name.startswith("_")
                  and getattr(fn, "__module__", None) == functional.__name__)


def test_every_public_function_has_a_row() -> None:
    assert "softmax" in public_functions()
    missing = {f"fg.{name}" for name in public_functions()} - row_bases()
    assert missing == set(), "fg functions without a row in tests/test_ops.py"
