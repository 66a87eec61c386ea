"""Random well-formed graphs: gradients against finite differences, passes against the
interpreter.

hypothesis draws a small program over 1-3 float params (elementwise ops with
broadcasting, reductions with axes and keepdims, matmul, reshape, transpose,
slicing, concat, and the patterns the passes rewrite: x*1, 0-x, x**2, constant
subexpressions, duplicates...), ending in a scalar loss. For each program:

- ``fg.grad`` agrees with float64 central differences along a random direction;
- ``optimize`` changes no result, of the forward graph or of its gradient graph.

Param values come from a NumPy generator seeded by hypothesis (not from hypothesis
floats, which like exact zeros: kinks of relu/abs), and the ops are chosen to stay
finite: exp only of a tanh, log and sqrt only of positive values, division only by
1 + b*b.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferrograd as fg
from ferrograd.ir.builder import Var, apply
from ferrograd.ir.passes import optimize

Shape = tuple[int, ...]

UNARY: dict[str, Callable[[Var], Var]] = {
    "neg": lambda a: -a,
    "tanh": fg.tanh,
    "sigmoid": fg.sigmoid,
    "sin": fg.sin,
    "cos": fg.cos,
    "erf": fg.erf,
    "gelu": fg.gelu,
    "softplus": fg.softplus,
    "relu": fg.relu,
    "abs": fg.abs,
    "square": lambda a: a * a,
    "cube": lambda a: a ** 3,
    "affine": lambda a: a * 0.5 + 1.0,
    "exp_tanh": lambda a: fg.exp(fg.tanh(a)),
    "log1p_square": lambda a: fg.log1p(a * a),
    "sqrt_1p_square": lambda a: fg.sqrt(1.0 + a * a),
    # Composites that shift by a stop_gradient(max) inside.
    "softmax": lambda a: fg.softmax(a) if a.ndim else fg.softmax(a.reshape(1)).reshape(()),
    "log_softmax": lambda a: fg.log_softmax(a, 0) if a.ndim else a,
}

BINARY: dict[str, Callable[[Var, Var], Var]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "maximum": fg.maximum,
    "minimum": fg.minimum,
    "div": lambda a, b: a / (1.0 + b * b),
    "pow": lambda a, b: (a * a + 0.5) ** fg.tanh(b),
    "where": lambda a, b: fg.where(a > b, a * b, b - a),
}

REDUCE = ("sum", "mean", "max")


def _c(value: float, like: Var, widen: bool) -> Var:
    """A constant: 0-d, or of shape (2, *like.shape) so that it broadcasts ``like`` up."""
    return fg.constant(np.full((2, *like.shape) if widen else (), value, np.float32))


# Patterns the simplifier and the folder rewrite, so that passes meet them in context.
# Each gets a flag: widen its constants (the result gains a leading axis of 2).
REWRITES: dict[str, Callable[[Var, bool], Var]] = {
    "x+0": lambda a, w: a + _c(0.0, a, w),
    "0+x": lambda a, w: _c(0.0, a, w) + a,
    "x-0": lambda a, w: a - _c(0.0, a, w),
    "0-x": lambda a, w: _c(0.0, a, w) - a,
    "x*1": lambda a, w: a * _c(1.0, a, w),
    "1*x": lambda a, w: _c(1.0, a, w) * a,
    "x/1": lambda a, w: a / _c(1.0, a, w),
    "x**1": lambda a, w: a ** _c(1.0, a, w),
    "x**2": lambda a, w: a ** _c(2.0, a, w),
    "folded": lambda a, w: a * (fg.exp(_c(0.5, a, w)) - _c(1.5, a, w) * _c(0.25, a, w)),
    "twice": lambda a, w: fg.tanh(a * 0.5) * fg.tanh(a * 0.5),
    "--x": lambda a, w: apply("neg", apply("neg", a)),
    "cast": lambda a, w: apply("cast", a, dtype=a.dtype),
    "reshape": lambda a, w: apply("reshape", a, shape=a.shape),
    "expand": lambda a, w: apply("expand", a, shape=a.shape),
    "transpose": lambda a, w: apply("transpose", a, perm=tuple(range(a.ndim))),
    # Chains the simplifier composes; each chain is the identity overall.
    "transposes": lambda a, w: (a.transpose(1, 2, 0).transpose(0, 2, 1).transpose(1, 0, 2)
                                if a.ndim == 3 else a.T.T),
    "reshapes": lambda a, w: a.reshape(-1).reshape(a.size, 1).reshape(a.shape),
}
WIDENING = ("x+0", "0+x", "x-0", "0-x", "x*1", "1*x", "x/1", "x**1", "x**2", "folded")


def broadcast(a: Shape, b: Shape) -> Shape | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def reshapes(shape: Shape) -> list[Shape]:
    size = math.prod(shape)
    out = [(size,), (1, size), (*shape, 1), (1, *shape)]
    out += [(d, size // d) for d in range(2, size) if size % d == 0]
    return out + ([()] if size == 1 else [])


@dataclass(frozen=True)
class Step:
    kind: str  # unary, binary, rewrite, reduce, reshape, transpose, matmul, slice, concat
    name: str
    args: tuple[int, ...]  # indices into the values so far; -1 (matmul) means arg0.mT
    attrs: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Program:
    params: tuple[Shape, ...]
    steps: tuple[Step, ...]
    seed: int


@st.composite
def programs(draw: st.DrawFn) -> Program:
    shape = st.lists(st.integers(1, 3), max_size=3).map(tuple)
    params = draw(st.lists(shape, min_size=1, max_size=3))
    shapes: list[Shape] = list(params)
    steps = []
    for _ in range(draw(st.integers(2, 8))):
        # Half the time the newest value: chains (transpose of transpose...) get deeper.
        i = draw(st.just(len(shapes) - 1) | st.integers(0, len(shapes) - 1))
        a = shapes[i]
        kinds = ["unary", "binary", "reduce", "reshape", "concat", "rewrite", "rewrite"]
        kinds += ["transpose", "matmul"] if len(a) >= 2 else []
        kinds += ["slice"] if any(d > 1 for d in a) else []
        kind = draw(st.sampled_from(kinds))
        if kind == "unary":
            step, out = Step(kind, draw(st.sampled_from(sorted(UNARY))), (i,)), a
        elif kind == "binary":
            j = draw(st.sampled_from([j for j, b in enumerate(shapes)
                                      if broadcast(a, b) is not None]))
            step = Step(kind, draw(st.sampled_from(sorted(BINARY))), (i, j))
            out = broadcast(a, shapes[j])  # type: ignore[assignment]
        elif kind == "rewrite":
            name = draw(st.sampled_from(sorted(REWRITES)))
            widen = name in WIDENING and draw(st.booleans())
            step, out = Step(kind, name, (i,), (widen,)), (2, *a) if widen else a
        elif kind == "reduce":
            axes = draw(st.none() | st.sets(st.integers(0, max(len(a) - 1, 0)),
                                            max_size=len(a)).map(sorted).map(tuple))
            keepdims = draw(st.booleans())
            step = Step(kind, draw(st.sampled_from(REDUCE)), (i,), (axes, keepdims))
            reduced = range(len(a)) if axes is None else axes
            out = tuple(1 if k in reduced else d for k, d in enumerate(a) if keepdims
                        or k not in reduced)
        elif kind == "reshape":
            out = draw(st.sampled_from(reshapes(a)))
            step = Step(kind, "reshape", (i,), (out,))
        elif kind == "transpose":
            perm = tuple(draw(st.permutations(range(len(a)))))
            step, out = Step(kind, "transpose", (i,), (perm,)), tuple(a[p] for p in perm)
        elif kind == "matmul":
            partners = [j for j, b in enumerate(shapes) if len(b) >= 2 and b[-2] == a[-1]
                        and broadcast(a[:-2], b[:-2]) is not None]
            j = draw(st.sampled_from([-1, *partners]))  # -1: a @ a.mT always fits
            b = (*a[:-2], a[-1], a[-2]) if j == -1 else shapes[j]
            step = Step(kind, "matmul", (i, j))
            out = (*broadcast(a[:-2], b[:-2]), a[-2], b[-1])  # type: ignore[misc]
        elif kind == "slice":
            axis = draw(st.sampled_from([k for k, d in enumerate(a) if d > 1]))
            start = draw(st.integers(0, a[axis] - 1))
            stop = draw(st.integers(start + 1, a[axis]))
            stride = draw(st.integers(1, 2))
            step = Step(kind, "slice", (i,), (axis, start, stop, stride))
            out = tuple(len(range(start, stop, stride)) if k == axis else d
                        for k, d in enumerate(a))
        else:  # concat along an axis where the other dims agree (a itself always does)
            if not a:
                step, out = Step("unary", "neg", (i,)), a
            else:
                axis = draw(st.integers(0, len(a) - 1))
                j = draw(st.sampled_from([
                    j for j, b in enumerate(shapes) if len(b) == len(a)
                    and all(x == y for k, (x, y) in enumerate(zip(a, b, strict=True))
                            if k != axis)]))
                step = Step(kind, "concat", (i, j), (axis,))
                out = tuple(d + shapes[j][axis] if k == axis else d for k, d in enumerate(a))
        steps.append(step)
        shapes.append(out)
    return Program(tuple(params), tuple(steps), draw(st.integers(0, 2**32 - 1)))


def apply_step(step: Step, vals: list[Var]) -> Var:
    a = vals[step.args[0]]
    if step.kind == "unary":
        return UNARY[step.name](a)
    if step.kind == "binary":
        return BINARY[step.name](a, vals[step.args[1]])
    if step.kind == "rewrite":
        return REWRITES[step.name](a, *step.attrs)
    if step.kind == "reduce":
        axes, keepdims = step.attrs
        return getattr(a, step.name)(axes, keepdims)
    if step.kind == "reshape":
        return a.reshape(step.attrs[0])
    if step.kind == "transpose":
        return a.transpose(step.attrs[0])
    if step.kind == "matmul":
        j = step.args[1]
        return a @ (a.mT if j == -1 else vals[j])
    if step.kind == "slice":
        axis, start, stop, stride = step.attrs
        return a[(slice(None),) * axis + (slice(start, stop, stride),)]
    assert step.kind == "concat"
    return fg.concat([a, vals[step.args[1]]], axis=step.attrs[0])


def build(program: Program) -> tuple[fg.Graph, dict[str, np.ndarray]]:
    """The traced program, its loss summing every unused value against a random
    cotangent, and float64 param values."""
    rng = np.random.default_rng(program.seed)
    params = {f"p{i}": rng.normal(size=s) for i, s in enumerate(program.params)}

    def model() -> Var:
        vals = [fg.param(name, v.shape) for name, v in params.items()]
        for step in program.steps:
            vals.append(apply_step(step, vals))
        used = {j for s in program.steps for j in s.args}
        leaves = [v for k, v in enumerate(vals) if k not in used]
        terms = [(v * fg.constant(rng.normal(size=v.shape), "f32")).sum() for v in leaves]
        loss = terms[0]
        for t in terms[1:]:
            loss = loss + t
        return loss

    return fg.trace(model), params


def close(got: float, want: float, rtol: float, atol: float) -> bool:
    return abs(got - want) <= atol + rtol * max(abs(got), abs(want))


SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(programs())
def test_gradients_match_finite_differences(program: Program) -> None:
    graph, params = build(program)

    def loss(p: dict[str, np.ndarray]) -> float:
        return float(fg.interpret(graph, {}, p, dtype="f64", results=["loss"])["loss"])

    g = fg.grad(graph)
    grads = fg.interpret(g, {}, params, dtype="f64")
    rng = np.random.default_rng(program.seed + 1)
    v = {k: rng.normal(size=p.shape) for k, p in params.items()}
    analytic = sum(float(np.sum(grads[f"grad:{k}"] * v[k])) for k in params)
    h = 1e-6  # small: a random value lands within h of a relu/max kink with p ~ 1e-6
    numeric = (loss({k: p + h * v[k] for k, p in params.items()})
               - loss({k: p - h * v[k] for k, p in params.items()})) / (2 * h)
    # Rounding of the loss itself bounds how well a difference quotient can do.
    atol = 1e-8 * (1.0 + abs(float(grads["loss"])))
    assert close(analytic, numeric, rtol=1e-5, atol=atol), (analytic, numeric)


def assert_same_results(before: fg.Graph, after: fg.Graph, params: dict[str, np.ndarray],
                        dtype: str, rtol: float) -> None:
    feed = {k: v.astype(np.float32) for k, v in params.items()} if dtype == "f32" else params
    want = fg.interpret(before, {}, feed, dtype=dtype)
    got = fg.interpret(after, {}, feed, dtype=dtype)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        scale = 1.0 + float(np.max(np.abs(value), initial=0.0))
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=rtol * scale, err_msg=key)


def check_optimize(program: Program) -> None:
    graph, params = build(program)
    for g in (graph, fg.grad(graph)):
        opt = optimize(g)
        opt.validate()
        # float32 is what a step computes; float64 sees through the rounding of f32
        # constants that constant folding performs.
        assert_same_results(g, opt, params, "f32", rtol=1e-5)
        assert_same_results(g, opt, params, "f64", rtol=1e-6)


@SETTINGS
@given(programs())
def test_optimize_changes_no_result(program: Program) -> None:
    check_optimize(program)


# Every rewrite, every run (the random programs meet each one only now and then):
# after a tanh of a 3-d param, before a product with a second param.
REWRITE_CASES = [(name, widen) for name in sorted(REWRITES)
                 for widen in ((False, True) if name in WIDENING else (False,))]


@pytest.mark.parametrize("name, widen", REWRITE_CASES,
                         ids=[f"{n}{'-widened' if w else ''}" for n, w in REWRITE_CASES])
def test_optimize_keeps_each_rewrite_in_context(name: str, widen: bool) -> None:
    steps = (Step("unary", "tanh", (0,)), Step("rewrite", name, (2,), (widen,)),
             Step("binary", "mul", (3, 1)))
    check_optimize(Program(((2, 3, 2), (3, 1)), steps, seed=7))
