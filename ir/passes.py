"""Graph -> Graph passes and the one visible pipeline that runs them.

Each pass is a small function that returns a new graph and never changes what
the graph computes (up to float rounding of folded constants). Under
``FERROGRAD_DEBUG`` >= 1 the IR invariants are checked after every pass; at 3
the graph is printed after each; at 4 the graph is also interpreted on random
inputs before and after each pass and the results compared.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .builder import Var, apply, source_as
from .graph import Graph, numpy_dtype
from .ops import op_def
from .serialize import _canon

Pass = Callable[[Graph], Graph]
FOLD_LIMIT = 4096  # fold constant subgraphs only while their result stays this small


def dce(graph: Graph) -> Graph:
    """Drop nodes no result depends on. Inputs, params and state always stay."""
    g = graph.copy()
    keep = g.ancestors_of(g.results().values())
    keep |= set(g.inputs.values()) | set(g.params.values()) | set(g.state.values())
    g.remove(n for n in list(g.nx.nodes) if n not in keep)
    return g


def _key(g: Graph, nid: int) -> Any:
    n = g.node(nid)
    return (n.op, n.args, n.dtype, n.shape, repr(_canon(n.attrs)))


def cse(graph: Graph) -> Graph:
    """Merge nodes that compute the same op on the same args (and equal constants)."""
    g = graph.copy()
    seen: dict[Any, int] = {}
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op in ("input", "param", "state"):
            continue
        key = _key(g, nid)
        if key in seen:
            g.replace_uses(nid, seen[key])
        else:
            seen[key] = nid
    return dce(g)


def _const_value(g: Graph, nid: int) -> np.ndarray | None:
    n = g.node(nid)
    return n.attrs["value"] if n.op == "const" else None


def constant_fold(graph: Graph) -> Graph:
    """Evaluate small subgraphs whose args are all constants."""
    g = graph.copy()
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op in ("input", "param", "state", "const") or not n.args:
            continue
        values = [_const_value(g, a) for a in n.args]
        if any(v is None for v in values) or n.size > FOLD_LIMIT:
            continue
        if n.size > 16 and n.size > max(v.size for v in values):  # type: ignore[union-attr]
            continue  # a broadcast would turn a small constant into a big one
        out = np.asarray(op_def(n.op).ref(*values, **n.attrs))  # type: ignore[misc]
        out = np.array(out, dtype=numpy_dtype(n.dtype), order="C")
        out.setflags(write=False)
        new = g.add("const", (), {"value": out}, src=n.src)
        g.replace_uses(nid, new)
    return dce(g)


# ---- algebraic simplification: (pattern -> replacement) rules --------------------------------


def _is_const(g: Graph, nid: int, c: float) -> bool:
    v = _const_value(g, nid)
    return v is not None and v.size > 0 and bool(np.all(v == c))


def _same_shape(g: Graph, a: int, out: int) -> bool:
    return g.node(a).shape == g.node(out).shape


def _rule(g: Graph, nid: int) -> int | None:
    """The node that can replace ``nid``, or None."""
    n = g.node(nid)
    a = n.args
    op = n.op
    if op in ("add", "sub") and _is_const(g, a[1], 0) and _same_shape(g, a[0], nid):
        return a[0]                                                       # x + 0, x - 0
    if op == "add" and _is_const(g, a[0], 0) and _same_shape(g, a[1], nid):
        return a[1]                                                       # 0 + x
    if op in ("mul", "div") and _is_const(g, a[1], 1) and _same_shape(g, a[0], nid):
        return a[0]                                                       # x * 1, x / 1
    if op == "mul" and _is_const(g, a[0], 1) and _same_shape(g, a[1], nid):
        return a[1]                                                       # 1 * x
    if op == "pow" and _is_const(g, a[1], 1) and _same_shape(g, a[0], nid):
        return a[0]                                                       # x ** 1
    if op == "pow" and _is_const(g, a[1], 2) and _same_shape(g, a[0], nid):
        x = Var(g, a[0])
        return (x * x).id                                                 # x ** 2 -> x * x
    if op == "neg" and g.node(a[0]).op == "neg":
        return g.node(a[0]).args[0]                                       # -(-x)
    if op in ("reshape", "expand") and _same_shape(g, a[0], nid):
        return a[0]                                                       # no-op reshape
    if op == "cast" and g.node(a[0]).dtype == n.dtype:
        return a[0]
    if op == "transpose" and tuple(n.attrs["perm"]) == tuple(range(len(n.shape))):
        return a[0]
    inner = g.node(a[0]) if a else None
    if op == "reshape" and inner is not None and inner.op == "reshape":
        return apply("reshape", Var(g, inner.args[0]), shape=n.attrs["shape"]).id
    if op == "transpose" and inner is not None and inner.op == "transpose":
        perm = tuple(inner.attrs["perm"][p] for p in n.attrs["perm"])
        return apply("transpose", Var(g, inner.args[0]), perm=perm).id
    return None


def simplify(graph: Graph) -> Graph:
    """Local algebraic rewrites (x*1, x+0, -(-x), x**2 -> x*x, reshape chains, ...)."""
    g = graph.copy()
    for nid in g.topo_order():
        if nid not in g:
            continue
        with source_as(g.node(nid).src):
            new = _rule(g, nid)
        if new is not None and new != nid:
            g.replace_uses(nid, new)
    return dce(g)


def share_gelu_cdf(graph: Graph) -> Graph:
    """gelu(x) = x Phi(x), and its derivative Phi(x) + x Phi'(x) needs Phi again: an
    erf per element, the costliest part of both. Where a graph has both (a training
    step), write them over one ``normal_cdf`` node, which the forward kernel then
    stores for the backward one (the scheduler's stored outputs); the backward is
    left with Phi'(x), one exp."""
    g = graph.copy()
    derivative = {n.args[0]: n.id for n in g.nodes() if n.op == "gelu.d0"}
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op != "gelu" or n.args[0] not in derivative:
            continue
        with source_as(n.src):
            x = Var(g, n.args[0])
            cdf = apply("normal_cdf", x)
            g.replace_uses(nid, (x * cdf).id)
            g.replace_uses(derivative[n.args[0]], (cdf + x * apply("normal_cdf.d0", x)).id)
    return dce(g)


PIPELINE: list[tuple[str, Pass]] = [
    ("share_gelu_cdf", share_gelu_cdf),
    ("simplify", simplify),
    ("constant_fold", constant_fold),
    ("cse", cse),
    ("dce", dce),
]


def debug_level() -> int:
    try:
        return int(os.environ.get("FERROGRAD_DEBUG", "0"))
    except ValueError:
        return 0


def optimize(graph: Graph, rounds: int = 3) -> Graph:
    """Run PIPELINE until the graph stops shrinking (at most ``rounds`` times)."""
    level = debug_level()
    for _ in range(rounds):
        before = len(graph)
        for name, fn in PIPELINE:
            new = fn(graph)
            if level >= 1:
                new.validate()
            if level >= 4:
                compare_on_random_inputs(graph, new, name)
            if level >= 3:
                print(f"--- after {name}\n{new!r}", file=sys.stderr)
            graph = new
        if len(graph) >= before:
            break
    return graph


def random_feed(graph: Graph, seed: int = 0) -> tuple[dict, dict, dict]:
    """Random inputs, params and state for ``graph`` (ints within their index bounds)."""
    rng = np.random.default_rng(seed)

    def draw(nid: int, bound: int | None = None) -> np.ndarray:
        n = graph.node(nid)
        if n.dtype == "i32":
            return rng.integers(0, bound or 4, n.shape).astype(np.int32)
        if n.dtype == "bool":
            return rng.random(n.shape) < 0.5
        return rng.normal(size=n.shape).astype(np.float32 if n.dtype == "f32" else np.float64)

    inputs = {k: draw(v, graph.index_bounds.get(k)) for k, v in graph.inputs.items()}
    params = {k: draw(v) for k, v in graph.params.items()}
    state = {k: np.abs(draw(v)) for k, v in graph.state.items()}
    return inputs, params, state


def compare_on_random_inputs(before: Graph, after: Graph, name: str) -> None:
    from .errors import IRError
    from .interpret import interpret

    feed = random_feed(before)
    want = interpret(before, *feed, dtype="f64")
    got = interpret(after, *feed, dtype="f64")
    for key, value in want.items():
        if not np.allclose(value, got[key], rtol=1e-6, atol=1e-9, equal_nan=True):
            raise IRError(f"pass {name} changed result {key!r}")
