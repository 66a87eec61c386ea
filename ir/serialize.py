"""A canonical, content-addressed form of a graph: the same graph gives the same text.

Nodes are renumbered in topological order, so two graphs built the same way
serialize identically whatever ids they happened to get. Constant arrays are
represented by their bytes' digest. Later stages name builds by ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .graph import Graph


def _canon(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(value.tobytes()).hexdigest()
        return {"array": str(value.dtype), "shape": list(value.shape), "sha256": digest}
    if isinstance(value, tuple | list):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items())}
    if isinstance(value, np.generic):
        return value.item()
    return value


def canonical(graph: Graph) -> str:
    order = graph.topo_order()
    index = {nid: i for i, nid in enumerate(order)}
    nodes = []
    for nid in order:
        n = graph.node(nid)
        nodes.append({"op": n.op, "args": [index[a] for a in n.args], "shape": list(n.shape),
                      "dtype": n.dtype, "attrs": _canon(n.attrs), "name": n.name})

    def ids(table: dict[str, int]) -> dict[str, int]:
        return {k: index[v] for k, v in table.items()}

    doc = {"name": graph.name, "nodes": nodes, "inputs": ids(graph.inputs),
           "params": ids(graph.params), "state": ids(graph.state),
           "outputs": ids(graph.outputs), "grads": ids(graph.grads),
           "updates": ids(graph.updates), "index_bounds": graph.index_bounds}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def fingerprint(graph: Graph) -> str:
    return hashlib.sha256(canonical(graph).encode()).hexdigest()
