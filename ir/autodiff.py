"""Graph-to-graph reverse mode: gradients become nodes of the same graph.

The driver owns the shared work so each VJP rule stays one line: reverse
topological order, only over nodes that lie on a path from a parameter to the
output, cotangent accumulation, and summing cotangents back over broadcast axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .builder import Var, constant, source_as, sum_to
from .errors import IRError, ShapeError
from .graph import FLOAT_DTYPES, Graph
from .ops import lookup


def grad(graph: Graph, of: str = "loss", wrt: Sequence[str] | None = None) -> Graph:
    """Return a copy of ``graph`` whose ``grads`` map each param to d(of)/d(param).

    ``of`` names a scalar float output. ``wrt`` lists param names (default: all).
    The result can be differentiated again: gradients are ordinary nodes.

    >>> import ferrograd as fg
    >>> @fg.model
    ... def f(x: fg.f32[3]):
    ...     return (fg.param("w", (3,), init="ones") * x).sum()
    >>> sorted(fg.grad(fg.trace(f)).grads)
    ['w']
    """
    g = graph.copy()
    if of not in g.outputs:
        raise IRError(f"grad: the graph has no output {of!r} (it has {sorted(g.outputs)})")
    out = g.outputs[of]
    out_node = g.node(out)
    if out_node.shape != () or out_node.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"grad: output {of!r} must be a float scalar, it is "
                         f"{out_node.dtype}{list(out_node.shape)}", out_node.src)
    names = list(g.params) if wrt is None else list(wrt)
    for name in names:
        if name not in g.params:
            raise IRError(f"grad: no param {name!r} (params: {sorted(g.params)})")
    targets = [g.params[n] for n in names]

    import networkx as nx  # here: a model loaded from the cache never differentiates

    # Only nodes on a path from a target to the output need a cotangent.
    upstream = nx.ancestors(g.nx, out) | {out}
    downstream = set(targets).union(*(nx.descendants(g.nx, t) for t in targets))
    active = upstream & downstream
    order = [n for n in g.topo_order() if n in active]

    with source_as(out_node.src):
        cotangent: dict[int, Var] = {out: constant(g, np.ones((), np.float32), out_node.dtype)}
    for nid in reversed(order):
        node = g.node(nid)
        if nid not in cotangent or node.op in ("input", "param", "state", "const"):
            continue
        opdef = lookup(node.op)
        if opdef is None or opdef.vjp is None:
            continue
        with source_as(node.src):
            cts = opdef.vjp(cotangent[nid], Var(g, nid), *(Var(g, a) for a in node.args),
                            **node.attrs)
            if len(cts) != len(node.args):
                raise IRError(f"VJP of {node.op} returned {len(cts)} cotangents for "
                              f"{len(node.args)} args")
            for arg, ct in zip(node.args, cts, strict=True):
                if ct is None or arg not in active:
                    continue
                arg_node = g.node(arg)
                ct = sum_to(ct, arg_node.shape)
                if ct.shape != arg_node.shape or ct.dtype != arg_node.dtype:
                    raise IRError(f"VJP of {node.op} gave {ct.dtype}{list(ct.shape)} for an "
                                  f"arg of {arg_node.dtype}{list(arg_node.shape)}")
                cotangent[arg] = cotangent[arg] + ct if arg in cotangent else ct

    for name, pid in zip(names, targets, strict=True):
        if pid in cotangent:
            g.grads[name] = cotangent[pid].id
        else:  # the param does not reach the output: its gradient is exactly zero
            p = g.node(pid)
            with source_as(p.src):
                g.grads[name] = constant(g, np.zeros(p.shape), p.dtype).id
    return g
