"""Elementwise ops, each defined by one sympy expression of its scalar args.

The expression is the op: the NumPy reference evaluates it, backends print it,
and its VJP comes from ``sympy.diff``. A derivative that is neither a constant
nor one of the args becomes an op of its own, named ``<op>.d<i>`` and
registered on first use, so gradients of gradients work the same way.

Each table row is a formula ``lambda sp, x: ...``: ``sp`` is sympy (plus ``log1p``
from ``sympy.codegen``) and the other parameters are the op's scalar args in order
(``x``, ``y`` real numbers, ``p``, ``q`` masks). Formulas run the first time an
op's expression is needed (autodiff, passes, codegen), never while tracing, so a
process that only loads a cached module does not import sympy.

Adding an activation is one line in ``UNARY`` below.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError
from .base import OPS, OpDef, Shape, broadcast_shapes, register, same_dtype

if TYPE_CHECKING:
    import sympy

Formula = Callable[..., Any]  # (sp, *args) -> sympy.Expr

# name -> expression of x. Numerically careful forms: sigmoid through tanh and
# softplus through log1p keep both the value and its derivative finite in f32.
UNARY: dict[str, Formula] = {
    "neg": lambda sp, x: -x,
    "exp": lambda sp, x: sp.exp(x),
    "log": lambda sp, x: sp.log(x),
    "log1p": lambda sp, x: sp.log1p(x),
    "sqrt": lambda sp, x: sp.sqrt(x),
    "tanh": lambda sp, x: sp.tanh(x),
    "erf": lambda sp, x: sp.erf(x),
    "abs": lambda sp, x: sp.Abs(x),
    "sign": lambda sp, x: sp.sign(x),
    "sin": lambda sp, x: sp.sin(x),
    "cos": lambda sp, x: sp.cos(x),
    "relu": lambda sp, x: sp.Piecewise((x, x > 0), (0, True)),  # relu'(0) = 0, as PyTorch
    "sigmoid": lambda sp, x: (1 + sp.tanh(x / 2)) / 2,
    "gelu": lambda sp, x: x * (1 + sp.erf(x / sp.sqrt(2))) / 2,  # exact (erf) form
    "normal_cdf": lambda sp, x: (1 + sp.erf(x / sp.sqrt(2))) / 2,  # Phi, gelu(x) = x Phi(x)
    "softplus": lambda sp, x: sp.Max(x, 0) + sp.log1p(sp.exp(-sp.Abs(x))),
}

BINARY: dict[str, Formula] = {
    "add": lambda sp, x, y: x + y,
    "sub": lambda sp, x, y: x - y,
    "mul": lambda sp, x, y: x * y,
    "div": lambda sp, x, y: x / y,
    "pow": lambda sp, x, y: x**y,
    "maximum": lambda sp, x, y: sp.Max(x, y),  # ties split the gradient evenly, as PyTorch
    "minimum": lambda sp, x, y: sp.Min(x, y),
}

# sympy writes d(x**y)/dx as x**y*y/x, which is 0/0 at x = 0.
DERIVATIVE_OVERRIDES: dict[str, dict[int, Formula]] = {
    "pow": {0: lambda sp, x, y: y * x ** (y - 1), 1: lambda sp, x, y: sp.log(x) * x**y},
}

# Ops whose derivative takes the same value at the op's output as at its arg, so the
# VJP reads the output: relu'(x) = [x > 0] = [relu(x) > 0] (0 at 0 and at NaN both
# ways). The pre-activation then dies in the forward pass: a GEMM writes
# relu(x @ w + b) straight away, and nothing keeps x @ w + b for the backward.
# (Ops whose derivative sympy writes in terms of the op itself — exp' = exp,
# tanh' = 1 − tanh², sqrt' = 1/(2·sqrt) — read the output too: ``derivative``.)
DERIVATIVE_AT_OUTPUT = frozenset({"relu"})

COMPARE: dict[str, Formula] = {
    "lt": lambda sp, x, y: sp.StrictLessThan(x, y),
    "le": lambda sp, x, y: sp.LessThan(x, y),
    "gt": lambda sp, x, y: sp.StrictGreaterThan(x, y),
    "ge": lambda sp, x, y: sp.GreaterThan(x, y),
    "eq": lambda sp, x, y: sp.Eq(x, y, evaluate=False),
    "ne": lambda sp, x, y: sp.Ne(x, y, evaluate=False),
}

LOGICAL: dict[str, Formula] = {
    "logical_and": lambda sp, p, q: sp.And(p, q),
    "logical_or": lambda sp, p, q: sp.Or(p, q),
    "logical_not": lambda sp, p: sp.Not(p),
}


@functools.cache
def _sympy() -> Any:
    """sympy, with ``log1p`` beside its functions: the ``sp`` formulas are given."""
    import sympy
    from sympy.codegen.cfunctions import log1p

    return types.SimpleNamespace(**vars(sympy), log1p=log1p)


@functools.cache
def _symbol(name: str) -> sympy.Symbol:
    """The scalar argument ``name``: x, y real; p, q masks (no assumptions)."""
    sp = _sympy()
    return sp.Symbol(name, real=True) if name in ("x", "y") else sp.Symbol(name)


def _args(formula: Formula) -> tuple[str, ...]:
    """The names of a formula's scalar args (its parameters after ``sp``)."""
    code = formula.__code__
    return code.co_varnames[1:code.co_argcount]


def _build(formula: Formula) -> tuple[sympy.Expr, tuple[sympy.Symbol, ...]]:
    symbols = tuple(_symbol(a) for a in _args(formula))
    return formula(_sympy(), *symbols), symbols


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


@functools.cache
def _numpy_funcs() -> dict[type, Callable[..., Any]]:
    sp = _sympy()
    return {
        sp.exp: np.exp,
        sp.log: np.log,
        sp.log1p: np.log1p,
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


def evaluate(expr: sympy.Basic, env: dict[sympy.Symbol, np.ndarray], dtype: np.dtype) -> Any:
    """Evaluate ``expr`` elementwise over NumPy arrays, keeping ``dtype`` throughout."""
    sp = _sympy()
    funcs = _numpy_funcs()

    def ev(e: sympy.Basic) -> Any:
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
        fn = funcs.get(type(e))
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
    """d(op)/d(arg i), as ("const", c), ("arg", j), ("op", (name, arg indices)) or, for
    a derivative that is a function of the op's value alone, ("output", None) (the
    value itself: exp) or ("output", name) (an op of the value: tanh, sqrt, relu)."""
    if i in opdef.derivatives:
        return opdef.derivatives[i]
    sp = _sympy()
    override = DERIVATIVE_OVERRIDES.get(opdef.name, {})
    d = _build(override[i])[0] if i in override else sp.diff(opdef.expr, opdef.symbols[i])
    # Second derivatives: sympy writes d(x**a)/dx as a*x**a/x, 0/0 at x = 0, so fold
    # it back into x**(a - 1); and Heaviside' (of Max, Abs, sign) is a delta, zero
    # almost everywhere and representable by no kernel, so it is 0, as in PyTorch.
    d = sp.powsimp(d).replace(sp.DiracDelta, lambda *args: sp.S.Zero)
    name = f"{opdef.name}.d{i}"
    at_output = _at_output(opdef, d)
    result: tuple[str, Any] | None
    if d == 0:
        result = None
    elif d.is_number:
        result = ("const", float(d))
    elif d in opdef.symbols:
        result = ("arg", opdef.symbols.index(d))
    elif at_output is not None:
        # The VJP reads the op's value, which the forward computed anyway (the same
        # bits as computing it again), and the arg need not live until the backward.
        y, expr = at_output
        if expr == y:
            result = ("output", None)
        else:
            if name not in OPS:
                define(name, lambda: (expr, (y,)), 1, "float")
            result = ("output", name)
    else:
        used = tuple(j for j, s in enumerate(opdef.symbols) if s in d.free_symbols)
        if name not in OPS:
            symbols = tuple(opdef.symbols[j] for j in used)
            define(name, lambda: (d, symbols), len(used), "float")
        result = ("output", name) if opdef.name in DERIVATIVE_AT_OUTPUT else ("op", (name, used))
    opdef.derivatives[i] = result
    return result


def _at_output(opdef: OpDef, d: Any) -> tuple[Any, Any] | None:
    """``(y, d as an expression of y alone)``, where y stands for the op's value, when
    sympy writes ``d`` in terms of the op itself (exp' = exp, tanh' = 1 − tanh²); else
    None."""
    sp = _sympy()
    if opdef.expr in opdef.symbols or opdef.name in DERIVATIVE_AT_OUTPUT:
        return None
    y = sp.Symbol("out")  # the name of no table op's args (a derivative op's own, once)
    if y in opdef.symbols:
        return None
    expr = d.subs(opdef.expr, y)
    if expr.free_symbols != {y} or expr.has(sp.Derivative):
        return None
    return y, expr


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
            elif d[0] == "output":
                cts.append(g * (out if d[1] is None else apply(d[1], out)))
            else:
                name, used = d[1]
                cts.append(g * apply(name, *(args[j] for j in used)))
        return cts

    return vjp


def define(name: str, scalar: Callable[[], tuple[sympy.Expr, tuple[sympy.Symbol, ...]]],
           arity: int, rule: str, differentiable: bool = True) -> OpDef:
    """Register an elementwise op of ``arity`` args; ``scalar()`` gives its expression
    and symbols (called on first use)."""
    infer = _infer(rule)
    opdef = OpDef(name=name, kind="elementwise",
                  infer=lambda s, d, a: infer(s, d, {"_op": name, **a}),
                  scalar=scalar, arity=arity)
    opdef.ref = _reference(opdef)
    if differentiable:
        opdef.vjp = _elementwise_vjp(opdef)
    return register(opdef)


def _define(name: str, formula: Formula, rule: str, differentiable: bool = True) -> OpDef:
    """Register the op of one table row."""
    return define(name, functools.partial(_build, formula), len(_args(formula)), rule,
                  differentiable)


def _cast_vjp(g: Any, out: Any, a: Any, dtype: str) -> list[Any]:
    from ..builder import apply

    return [apply("cast", g, dtype=a.dtype) if a.dtype in FLOAT else None]


def _where_vjp(g: Any, out: Any, c: Any, a: Any, b: Any) -> list[Any]:
    from ..builder import apply

    zero = g * 0.0
    return [None, apply("where", c, g, zero), apply("where", c, zero, g)]


for _name, _formula in UNARY.items():
    _define(_name, _formula, "float", differentiable=_name != "sign")
for _name, _formula in BINARY.items():
    _define(_name, _formula, "float" if _name in ("div", "pow") else "numeric")
for _name, _formula in COMPARE.items():
    _define(_name, _formula, "compare", differentiable=False)
for _name, _formula in LOGICAL.items():
    _define(_name, _formula, "logical", differentiable=False)

_define("where", lambda sp, p, x, y: sp.Piecewise((x, p), (y, True)), "where").vjp = _where_vjp
_define("cast", lambda sp, x: x, "cast").vjp = _cast_vjp
# Identity whose gradient is cut: the max-shift inside softmax needs no gradient.
_define("stop_gradient", lambda sp, x: x, "float", differentiable=False)
