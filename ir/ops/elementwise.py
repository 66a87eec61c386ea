"""Elementwise ops, each defined by one sympy expression of its scalar args.

The expression is the op: the NumPy reference evaluates it, backends print it,
and its VJP comes from ``sympy.diff``. A derivative that is neither a constant
nor one of the args becomes an op of its own, named ``<op>.d<i>`` and
registered on first use, so gradients of gradients work the same way.

Adding an activation is one line in ``UNARY`` below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p

from ..errors import DTypeError
from .base import OPS, OpDef, Shape, broadcast_shapes, register, same_dtype

x, y = sp.symbols("x y", real=True)
p, q = sp.symbols("p q")  # boolean operands (masks)

# name -> expression of x. Numerically careful forms: sigmoid through tanh and
# softplus through log1p keep both the value and its derivative finite in f32.
UNARY: dict[str, sp.Expr] = {
    "neg": -x,
    "exp": sp.exp(x),
    "log": sp.log(x),
    "log1p": log1p(x),
    "sqrt": sp.sqrt(x),
    "tanh": sp.tanh(x),
    "erf": sp.erf(x),
    "abs": sp.Abs(x),
    "sign": sp.sign(x),
    "sin": sp.sin(x),
    "cos": sp.cos(x),
    "relu": sp.Piecewise((x, x > 0), (0, True)),  # relu'(0) = 0, as in PyTorch
    "sigmoid": (1 + sp.tanh(x / 2)) / 2,
    "gelu": x * (1 + sp.erf(x / sp.sqrt(2))) / 2,  # exact (erf) form
    "softplus": sp.Max(x, 0) + log1p(sp.exp(-sp.Abs(x))),
}

BINARY: dict[str, sp.Expr] = {
    "add": x + y,
    "sub": x - y,
    "mul": x * y,
    "div": x / y,
    "pow": x**y,
    "maximum": sp.Max(x, y),  # ties split the gradient evenly, as in PyTorch
    "minimum": sp.Min(x, y),
}

# sympy writes d(x**y)/dx as x**y*y/x, which is 0/0 at x = 0.
DERIVATIVE_OVERRIDES: dict[str, dict[int, sp.Expr]] = {
    "pow": {0: y * x ** (y - 1), 1: sp.log(x) * x**y},
}

COMPARE: dict[str, sp.Expr] = {
    "lt": sp.StrictLessThan(x, y),
    "le": sp.LessThan(x, y),
    "gt": sp.StrictGreaterThan(x, y),
    "ge": sp.GreaterThan(x, y),
    "eq": sp.Eq(x, y, evaluate=False),
    "ne": sp.Ne(x, y, evaluate=False),
}

LOGICAL: dict[str, tuple[sp.Expr, tuple[sp.Symbol, ...]]] = {
    "logical_and": (sp.And(p, q), (p, q)),
    "logical_or": (sp.Or(p, q), (p, q)),
    "logical_not": (sp.Not(p), (p,)),
}


# ---- dtype rules ---------------------------------------------------------------------

NUMERIC = ("f32", "f64", "i32")
FLOAT = ("f32", "f64")


def _infer(rule: str) -> Callable[[list[Shape], list[str], dict[str, Any]], tuple[Shape, str]]:
    def infer(shapes: list[Shape], dtypes: list[str], attrs: dict[str, Any]) -> tuple[Shape, str]:
        name = attrs.get("_op", rule)
        shape = broadcast_shapes(name, shapes) if shapes else ()
        if rule == "where":
            if dtypes[0] != "bool":
                raise DTypeError(f"where: the condition must be a bool mask, got {dtypes[0]}")
            return shape, same_dtype("where", dtypes[1:])
        if rule == "cast":
            return shape, attrs["dtype"]
        if rule == "logical":
            if any(d != "bool" for d in dtypes):
                raise DTypeError(f"logical op needs bool masks, got {', '.join(dtypes)}")
            return shape, "bool"
        dtype = same_dtype(name, dtypes)
        allowed = FLOAT if rule == "float" else NUMERIC
        if dtype not in allowed:
            raise DTypeError(f"{name}: needs {' or '.join(allowed)} operands, got {dtype}")
        return shape, "bool" if rule == "compare" else dtype

    return infer


# ---- NumPy evaluation of an expression ----------------------------------------------------


def _erf(a: np.ndarray) -> np.ndarray:
    """erf elementwise: scipy's where installed (vectorized), else math.erf per element."""
    a = np.asarray(a)  # frompyfunc gives a bare Python float for 0-d input
    try:
        from scipy.special import erf
    except ImportError:
        return np.asarray(np.frompyfunc(math.erf, 1, 1)(a), dtype=a.dtype)
    return np.asarray(erf(a), dtype=a.dtype)


_NUMPY_FUNCS: dict[type, Callable[..., Any]] = {
    sp.exp: np.exp,
    sp.log: np.log,
    log1p: np.log1p,
    sp.tanh: np.tanh,
    sp.erf: _erf,
    sp.Abs: np.abs,
    sp.sign: np.sign,
    sp.sin: np.sin,
    sp.cos: np.cos,
    sp.StrictLessThan: np.less,
    sp.LessThan: np.less_equal,
    sp.StrictGreaterThan: np.greater,
    sp.GreaterThan: np.greater_equal,
    sp.Eq: np.equal,
    sp.Ne: np.not_equal,
    sp.Not: np.logical_not,
}


def evaluate(expr: sp.Basic, env: dict[sp.Symbol, np.ndarray], dtype: np.dtype) -> Any:
    """Evaluate ``expr`` elementwise over NumPy arrays, keeping ``dtype`` throughout."""

    def ev(e: sp.Basic) -> Any:
        if e.is_Symbol:
            return env[e]
        if e is sp.true or e is sp.false:
            return bool(e)
        if e.is_number:
            return dtype.type(float(e))
        if isinstance(e, sp.Piecewise):
            values = [ev(v) for v, _ in e.args]
            conds = [ev(c) for _, c in e.args]
            out = values[-1]
            for v, c in zip(reversed(values[:-1]), reversed(conds[:-1]), strict=True):
                out = np.where(c, v, out)
            return out
        args = [ev(a) for a in e.args]
        if isinstance(e, sp.Add):
            return _fold(np.add, args)
        if isinstance(e, sp.Mul):
            return _fold(np.multiply, args)
        if isinstance(e, sp.Pow):
            base, ex = args
            if e.exp == -1:
                return dtype.type(1) / base
            if e.exp == sp.Rational(1, 2):
                return np.sqrt(base)
            if e.exp == sp.Rational(-1, 2):
                return dtype.type(1) / np.sqrt(base)
            return np.power(base, ex)
        if isinstance(e, sp.Max):
            return _fold(np.maximum, args)
        if isinstance(e, sp.Min):
            return _fold(np.minimum, args)
        if isinstance(e, sp.Heaviside):
            return np.heaviside(args[0], args[1]).astype(dtype)
        if isinstance(e, sp.And):
            return _fold(np.logical_and, args)
        if isinstance(e, sp.Or):
            return _fold(np.logical_or, args)
        fn = _NUMPY_FUNCS.get(type(e))
        if fn is None:
            raise NotImplementedError(f"no NumPy form for {type(e).__name__} in {expr}")
        return fn(*args)

    return ev(expr)


def _fold(fn: Callable[[Any, Any], Any], args: Sequence[Any]) -> Any:
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out


def _reference(opdef: OpDef) -> Callable[..., np.ndarray]:
    def ref(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        shape, dtype = opdef.infer([np.shape(a) for a in arrays],
                                   [_dtype_name(a) for a in arrays], attrs)
        np_dtype = np.dtype({"f32": np.float32, "f64": np.float64,
                             "i32": np.int32, "bool": np.bool_}[dtype])
        work = np_dtype if dtype in FLOAT else np.dtype(np.float64)
        if opdef.name == "cast":
            return np.asarray(arrays[0]).astype(np_dtype)
        env = dict(zip(opdef.symbols, arrays, strict=True))
        with np.errstate(all="ignore"):  # inf/nan propagate as IEEE says, like a kernel
            out = evaluate(opdef.expr, env, work)
        return np.broadcast_to(np.asarray(out), shape).astype(np_dtype)

    return ref


def _dtype_name(a: np.ndarray) -> str:
    return {np.float32: "f32", np.float64: "f64", np.int32: "i32",
            np.bool_: "bool"}[np.asarray(a).dtype.type]


# ---- VJPs from sympy.diff -----------------------------------------------------------------


def derivative(opdef: OpDef, i: int) -> tuple[str, Any] | None:
    """d(op)/d(arg i), as ("const", c), ("arg", j) or ("op", (name, arg indices))."""
    if i in opdef.derivatives:
        return opdef.derivatives[i]
    override = DERIVATIVE_OVERRIDES.get(opdef.name, {})
    d = override[i] if i in override else sp.diff(opdef.expr, opdef.symbols[i])
    # Second derivatives: sympy writes d(x**a)/dx as a*x**a/x, 0/0 at x = 0, so fold
    # it back into x**(a - 1); and Heaviside' (of Max, Abs, sign) is a delta, zero
    # almost everywhere and representable by no kernel, so it is 0, as in PyTorch.
    d = sp.powsimp(d).replace(sp.DiracDelta, lambda *args: sp.S.Zero)
    result: tuple[str, Any] | None
    if d == 0:
        result = None
    elif d.is_number:
        result = ("const", float(d))
    elif d in opdef.symbols:
        result = ("arg", opdef.symbols.index(d))
    else:
        used = tuple(j for j, s in enumerate(opdef.symbols) if s in d.free_symbols)
        name = f"{opdef.name}.d{i}"
        if name not in OPS:
            define(name, d, tuple(opdef.symbols[j] for j in used), "float")
        result = ("op", (name, used))
    opdef.derivatives[i] = result
    return result


def _elementwise_vjp(opdef: OpDef) -> Callable[..., list[Any]]:
    from ..builder import apply

    def vjp(g: Any, out: Any, *args: Any, **attrs: Any) -> list[Any]:
        cts: list[Any] = []
        for i, a in enumerate(args):
            d = derivative(opdef, i) if a.dtype in FLOAT else None
            if d is None:
                cts.append(None)
            elif d[0] == "const":
                cts.append(g if d[1] == 1.0 else -g if d[1] == -1.0 else g * d[1])
            elif d[0] == "arg":
                cts.append(g * args[d[1]])
            else:
                name, used = d[1]
                cts.append(g * apply(name, *(args[j] for j in used)))
        return cts

    return vjp


def define(name: str, expr: sp.Expr, symbols: tuple[sp.Symbol, ...], rule: str,
           differentiable: bool = True) -> OpDef:
    """Register an elementwise op given by ``expr`` over ``symbols``."""
    infer = _infer(rule)
    opdef = OpDef(name=name, kind="elementwise",
                  infer=lambda s, d, a: infer(s, d, {"_op": name, **a}),
                  expr=expr, symbols=symbols, arity=len(symbols))
    opdef.ref = _reference(opdef)
    if differentiable:
        opdef.vjp = _elementwise_vjp(opdef)
    return register(opdef)


def _cast_vjp(g: Any, out: Any, a: Any, dtype: str) -> list[Any]:
    from ..builder import apply

    return [apply("cast", g, dtype=a.dtype) if a.dtype in FLOAT else None]


def _where_vjp(g: Any, out: Any, c: Any, a: Any, b: Any) -> list[Any]:
    from ..builder import apply

    zero = g * 0.0
    return [None, apply("where", c, g, zero), apply("where", c, zero, g)]


for _name, _expr in UNARY.items():
    define(_name, _expr, (x,), "float", differentiable=_name != "sign")
for _name, _expr in BINARY.items():
    define(_name, _expr, (x, y), "float" if _name in ("div", "pow") else "numeric")
for _name, _expr in COMPARE.items():
    define(_name, _expr, (x, y), "compare", differentiable=False)
for _name, (_expr, _syms) in LOGICAL.items():
    define(_name, _expr, _syms, "logical", differentiable=False)

define("where", sp.Piecewise((x, p), (y, True)), (p, x, y), "where").vjp = _where_vjp
define("cast", x, (x,), "cast").vjp = _cast_vjp
# Identity whose gradient is cut: the max-shift inside softmax needs no gradient.
define("stop_gradient", x, (x,), "float", differentiable=False)
