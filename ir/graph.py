"""The IR: a static dataflow graph over a networkx MultiDiGraph.

Nodes are integer ids. Each node carries ``op`` (a key of the op table),
``shape`` (a tuple of ints), ``dtype`` (one of DTYPES), ``attrs`` (the op's
parameters), ``name`` (optional, for people) and ``src`` (the user's
file:line that created it). An edge ``u -> v`` with key ``k`` says that u is
argument k of v; a multigraph, because ``x * x`` feeds one node twice.

Besides nodes, a graph knows its interface: ordered ``inputs`` (fed per call),
``params`` (trainable, persistent), ``state`` (optimizer buffers, persistent),
and named results: ``outputs`` (forward values), ``grads`` (param name ->
gradient node, after autodiff) and ``updates`` (persistent name -> its next
value, after an optimizer was applied).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DTypeError, IRError, ShapeError

if TYPE_CHECKING:
    import networkx as nx

Shape = tuple[int, ...]

DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "bool": np.bool_}
FLOAT_DTYPES = ("f32", "f64")
SOURCE_OPS = ("input", "param", "state", "const")


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(DTYPES[dtype])


def dtype_of_numpy(dtype: np.dtype) -> str:
    for name, np_type in DTYPES.items():
        if np.dtype(np_type) == dtype:
            return name
    raise IRError(f"unsupported array dtype {dtype}; use float32, float64, int32 or bool")


@dataclass(frozen=True)
class Node:
    """A read-only view of one node, for passes and printers."""

    id: int
    op: str
    args: tuple[int, ...]
    shape: Shape
    dtype: str
    attrs: dict[str, Any]
    name: str | None
    src: str | None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class Graph:
    """A training or forward graph. Build it with ``add``; read it with ``node``."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        # The networkx graph is made on first use (``nx``). Until then nodes are only
        # appended — id -> (node data, args) — which is all tracing does: a model whose
        # module is in the cache is traced and loaded without importing networkx
        # (18 MB of a training process's memory, 0.1 s).
        self._nx: nx.MultiDiGraph | None = None
        self._appended: dict[int, tuple[dict[str, Any], tuple[int, ...]]] | None = {}
        self._next_id = 0
        self.inputs: dict[str, int] = {}
        self.params: dict[str, int] = {}
        self.state: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self.grads: dict[str, int] = {}
        self.updates: dict[str, int] = {}
        # Integer inputs used as indices: input name -> exclusive upper bound.
        self.index_bounds: dict[str, int] = {}
        # Symbolic input dims as written in the annotations: input name -> dims.
        self.input_dims: dict[str, tuple[int | str, ...]] = {}
        # Memoized execution plans (see ``plan``); cleared on every structural edit.
        self._plans: dict[tuple[int, ...], list[Node]] = {}

    @property
    def nx(self) -> nx.MultiDiGraph:
        """The graph as a networkx MultiDiGraph (made from the appended nodes on first
        use; from then on the graph lives there)."""
        if self._nx is None:
            import networkx

            g = networkx.MultiDiGraph()
            for nid, (data, args) in (self._appended or {}).items():
                g.add_node(nid, **data)
                for pos, a in enumerate(args):
                    g.add_edge(a, nid, key=pos)
            self._nx, self._appended = g, None
        return self._nx

    def data(self, nid: int) -> dict[str, Any]:
        """Node ``nid``'s data: op, shape, dtype, attrs, name, src."""
        if self._appended is not None:
            return self._appended[nid][0]
        return self.nx.nodes[nid]

    # ---- building -------------------------------------------------------------

    def add(
        self,
        op: str,
        args: Iterable[int] = (),
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        src: str | None = None,
    ) -> int:
        """Append a node, inferring its shape and dtype from the op table."""
        from .ops import lookup  # the table imports graph helpers; resolve late

        args = tuple(args)
        attrs = dict(attrs or {})
        opdef = lookup(op)
        if opdef is None:
            raise IRError(f"unknown op {op!r}", src)
        for a in args:
            if a not in self:
                raise IRError(f"{op}: argument {a} is not a node of this graph", src)
        shapes = [self.data(a)["shape"] for a in args]
        dtypes = [self.data(a)["dtype"] for a in args]
        try:
            shape, dtype = opdef.infer(shapes, dtypes, attrs)
        except (ShapeError, DTypeError, IRError) as err:
            if err.src is None and src is not None:
                raise type(err)(str(err), src) from None
            raise
        nid = self._next_id
        self._next_id += 1
        self._plans.clear()
        data = {"op": op, "shape": tuple(int(d) for d in shape), "dtype": dtype,
                "attrs": attrs, "name": name, "src": src}
        if self._appended is not None:
            self._appended[nid] = (data, args)
            return nid
        self.nx.add_node(nid, **data)
        for pos, a in enumerate(args):
            self.nx.add_edge(a, nid, key=pos)
        return nid

    # ---- reading --------------------------------------------------------------

    def __contains__(self, nid: object) -> bool:
        return nid in (self._appended if self._appended is not None else self.nx)

    def __len__(self) -> int:
        if self._appended is not None:
            return len(self._appended)
        return self.nx.number_of_nodes()

    def args(self, nid: int) -> tuple[int, ...]:
        if self._appended is not None:
            return self._appended[nid][1]
        # The edge key is the argument's position; the raw predecessor dict is
        # several times faster than in_edges() here, which lowering calls ~10^4 times.
        edges = sorted((k, u) for u, keys in self.nx._pred[nid].items() for k in keys)
        return tuple(u for _, u in edges)

    def node(self, nid: int) -> Node:
        d = self.data(nid)
        return Node(nid, d["op"], self.args(nid), d["shape"], d["dtype"], d["attrs"],
                    d["name"], d["src"])

    def nodes(self) -> Iterator[Node]:
        for nid in self.topo_order():
            yield self.node(nid)

    def users(self, nid: int) -> list[int]:
        return sorted({v for _, v in self.nx.out_edges(nid)})

    def topo_order(self) -> list[int]:
        """Deterministic topological order (ties broken by node id)."""
        if self._appended is not None:
            # Appended nodes only read earlier ones: id order is that order.
            return list(self._appended)
        import networkx

        return list(networkx.lexicographical_topological_sort(self.nx))

    def results(self) -> dict[str, int]:
        """Every named result, prefixed by kind: 'out:loss', 'grad:w', 'update:w'."""
        res = {f"out:{k}": v for k, v in self.outputs.items()}
        res.update({f"grad:{k}": v for k, v in self.grads.items()})
        res.update({f"update:{k}": v for k, v in self.updates.items()})
        return res

    def persistent(self) -> dict[str, int]:
        """Params and optimizer state: everything a step keeps between calls."""
        return {**self.params, **self.state}

    def plan(self, roots: Iterable[int]) -> list[Node]:
        """The nodes ``roots`` depend on, in topological order (memoized)."""
        key = tuple(sorted(set(roots)))
        if key not in self._plans:
            needed = self.ancestors_of(key)
            self._plans[key] = [self.node(n) for n in self.topo_order() if n in needed]
        return self._plans[key]

    def ancestors_of(self, roots: Iterable[int]) -> set[int]:
        """``roots`` and everything they depend on: one walk up from all of them
        (a walk per root revisits shared ancestors: quadratic on a training graph)."""
        keep = set(roots)
        stack = list(keep)
        pred = self.nx.pred if self._appended is None else {
            n: args for n, (_, args) in self._appended.items()}
        while stack:
            for a in pred[stack.pop()]:
                if a not in keep:
                    keep.add(a)
                    stack.append(a)
        return keep

    # ---- editing (for passes) ---------------------------------------------------

    def replace_uses(self, old: int, new: int) -> None:
        """Point every user of ``old`` (and every named result) at ``new``."""
        if old == new:
            return
        self._plans.clear()
        for _, v, k in list(self.nx.out_edges(old, keys=True)):
            self.nx.remove_edge(old, v, key=k)
            self.nx.add_edge(new, v, key=k)
        for table in (self.outputs, self.grads, self.updates):
            for key, val in table.items():
                if val == old:
                    table[key] = new

    def remove(self, nids: Iterable[int]) -> None:
        self._plans.clear()
        self.nx.remove_nodes_from(list(nids))

    def copy(self) -> Graph:
        """An independent graph: editing either never shows in the other.

        Structural, not deep: node records and their attrs dicts are new, while the
        values inside are shared — they are immutable (ints, tuples, strings) or
        read-only arrays (constants, initial values). Passes copy often; a deep
        copy was half the time of lowering a model.
        """
        g = Graph.__new__(Graph)
        g.__dict__.update(self.__dict__)
        if self._appended is not None:
            g._appended = {n: ({**data, "attrs": dict(data["attrs"])}, args)
                           for n, (data, args) in self._appended.items()}
        else:
            g._nx = self.nx.copy()
            for data in g._nx.nodes.values():
                data["attrs"] = dict(data["attrs"])
        for table in ("inputs", "params", "state", "outputs", "grads", "updates",
                      "index_bounds", "input_dims"):
            setattr(g, table, dict(getattr(self, table)))
        g._plans = {}
        return g

    def validate(self) -> None:
        """Check invariants: acyclic, known ops, argument counts, shapes re-infer."""
        import networkx

        from .ops import lookup

        if not networkx.is_directed_acyclic_graph(self.nx):
            raise IRError(f"graph {self.name} has a cycle")
        for nid in self.topo_order():
            n = self.node(nid)
            opdef = lookup(n.op)
            if opdef is None:
                raise IRError(f"node {nid} has unknown op {n.op!r}", n.src)
            shapes = [self.data(a)["shape"] for a in n.args]
            dtypes = [self.data(a)["dtype"] for a in n.args]
            shape, dtype = opdef.infer(shapes, dtypes, n.attrs)
            if tuple(shape) != n.shape or dtype != n.dtype:
                raise IRError(
                    f"node {nid} ({n.op}) records {n.shape}/{n.dtype} but its args give "
                    f"{tuple(shape)}/{dtype}", n.src)
        for kind, table in (("input", self.inputs), ("param", self.params),
                            ("state", self.state)):
            for key, nid in table.items():
                if nid not in self or self.data(nid)["op"] != kind:
                    raise IRError(f"{kind} {key!r} does not point at a {kind} node")
        for key, nid in self.results().items():
            if nid not in self:
                raise IRError(f"result {key!r} points at a removed node {nid}")
        for key, nid in self.updates.items():
            target = self.persistent().get(key)
            if target is None:
                raise IRError(f"update for {key!r}, which is neither a param nor state")
            if self.node(target).shape != self.node(nid).shape:
                raise IRError(f"update for {key!r} changes its shape")

    def __repr__(self) -> str:
        from .printing import format_graph

        return format_graph(self)
