"""Readable text and DOT views of a graph. Shared nodes appear once (SSA form)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .graph import Graph


def short_src(src: str | None) -> str:
    if not src:
        return ""
    path, _, line = src.rpartition(":")
    try:
        rel = os.path.relpath(path)
    except ValueError:
        rel = path
    return f"{rel if not rel.startswith('..') else os.path.basename(path)}:{line}"


def _fmt_attr(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return repr(value.reshape(()).item())
        return f"<{value.dtype}{list(value.shape)}>"
    return repr(value)


def format_node(graph: Graph, nid: int) -> str:
    n = graph.node(nid)
    ty = f"{n.dtype}[{', '.join(map(str, n.shape))}]"
    if n.op in ("input", "param", "state"):
        rhs = f"{n.op} {n.name!r}"
    elif n.op == "const":
        rhs = f"const {_fmt_attr(n.attrs['value'])}"
    else:
        args = ", ".join(f"%{a}" for a in n.args)
        attrs = "".join(f", {k}={_fmt_attr(v)}" for k, v in n.attrs.items())
        rhs = f"{n.op}({args}{attrs})"
    line = f"%{nid} = {rhs} : {ty}"
    src = short_src(n.src)
    return f"{line:<72}  # {src}" if src else line


def format_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name} ({len(graph)} nodes)"]
    lines += ["  " + format_node(graph, nid) for nid in graph.topo_order()]
    for key, nid in graph.results().items():
        lines.append(f"  {key} = %{nid}")
    return "\n".join(lines)


def to_dot(graph: Graph) -> str:
    """Graphviz DOT text: one box per node, edges labelled by argument position."""
    out = [f'digraph "{graph.name}" {{', "  node [shape=box, fontname=monospace];"]
    for nid in graph.topo_order():
        n = graph.node(nid)
        label = n.op if n.name is None else f"{n.op} {n.name}"
        label += f"\\n{n.dtype}{list(n.shape)}"
        shape = "ellipse" if n.op in ("input", "param", "state", "const") else "box"
        out.append(f'  n{nid} [label="{label}", shape={shape}];')
        for pos, a in enumerate(n.args):
            out.append(f'  n{a} -> n{nid} [label="{pos}"];')
    for key, nid in graph.results().items():
        out.append(f'  "{key}" [shape=plaintext]; n{nid} -> "{key}" [style=dashed];')
    out.append("}")
    return "\n".join(out)
