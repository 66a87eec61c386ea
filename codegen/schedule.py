"""Partition a graph into kernels (the kernel IR) for one entry point of a step.

Entry points: "train" (loss + every update, written in place), "forward" (the
outputs) and "grads" (the gradients). The rules, in order of application:

- Movement ops (reshape, transpose, expand, slice) become views: index maps
  over the producer's buffer, never copies, unless a reshape needs a layout
  its input view cannot give (then one copy kernel materializes it).
- Elementwise ops fuse into groups, walking the graph from its results
  backwards: a node joins the group of its users when all of them are in one
  group, read it directly (not through another view) and iterate over its shape.
  A scalar is recomputed inside a bigger group. Each group is one kernel with
  one sympy expression per output.
- A reshape read only by kernels is seen through when it splits or merges axes:
  it keeps the element order, so the kernel iterates the finer shape (both
  shapes split into it) and views everything in it (a split never needs a copy),
  each node evaluated in its own shape, its "frame". Max pooling's window reshape
  [N, C, H, W] -> [N, C, H/2, 2, W/2, 2]: the ReLU becomes the max's prologue and
  the pooling gradient and ReLU' one kernel. A reduction keeps its shape.
- A reduction absorbs the elementwise ops that only feed it (its prologue).
- A cheap elementwise node (a comparison, a cast, an add) read by a few kernels
  is recomputed inside each of them instead of written to memory once (max
  pooling's gradient mask, read by the tie count and by the gradient itself).
- Matmul reads both operands through views (a transpose is just strides). When
  every user of a product is in one elementwise kernel over the product's shape,
  that kernel becomes the matmul's epilogue (bias, activation, an optimizer update
  of the weight whose gradient it is): one kernel, the product consumed while hot.
- An optimizer update is written in place into its param / state buffer when
  ordering allows (every reader of the old value runs first); otherwise into a
  temp that is copied back at the end.
``FERROGRAD_DEBUG=1`` prints the fusion log: what went where, and why not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import sympy as sp

from ferrograd.ir.errors import BackendError
from ferrograd.ir.graph import Graph, Node
from ferrograd.ir.ops import op_def

from .kernel_ir import (
    Buffer,
    Conv,
    Elementwise,
    Gather,
    Kernel,
    Matmul,
    Reduce,
    ToBool,
    ToFloat,
    ToInt,
    View,
    contiguous_view,
    row_major,
)

MOVEMENT = ("reshape", "transpose", "expand", "slice")
RECOMPUTE_LIMIT = 64  # fuse a broadcast producer while it is recomputed at most this often
REDUCE = ("reduce_sum", "reduce_max")
# Elementwise ops cheap enough to compute again in each kernel that reads them,
# rather than once into memory that every reader then loads.
CHEAP = frozenset({"neg", "abs", "sign", "relu", "add", "sub", "mul", "maximum", "minimum",
                   "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or",
                   "logical_not", "where", "cast", "stop_gradient"})
RECOMPUTE_READERS = 3  # kernels a cheap node is recomputed in, at most


@dataclass
class Schedule:
    entry: str
    kernels: list[Kernel]
    buffers: dict[str, Buffer]
    results: dict[str, str]  # result key -> buffer holding it (contiguous, whole)
    log: list[str] = field(default_factory=list)


@dataclass
class _Group:
    kind: str  # "elementwise" | "reduce"
    shape: tuple[int, ...]  # the index space the kernel iterates
    founder: int
    members: set[int] = field(default_factory=set)
    outputs: list[int] = field(default_factory=list)
    # node evaluated in the kernel (members but a reduction, recomputed nodes) -> its
    # frame: the shape it is evaluated in, ``shape`` with axes merged (a node read
    # through a reshape that splits axes), and what its smaller inputs broadcast to
    frame: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def reads_in(self, nid: int) -> tuple[int, ...]:
        """The frame in which member ``nid`` reads its arguments."""
        return self.shape if nid == self.founder and self.kind == "reduce" else self.frame[nid]


def safe_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


class _Scheduler:
    def __init__(self, graph: Graph, keys: list[str], entry: str) -> None:
        self.g = graph
        self.entry = entry
        named = graph.results()
        self.roots = {k: named[k] for k in keys}
        self.plan: list[Node] = graph.plan(self.roots.values())
        self.node = {n.id: n for n in self.plan}
        self.position = {n.id: i for i, n in enumerate(self.plan)}
        self.users: dict[int, list[int]] = {n.id: [] for n in self.plan}
        for n in self.plan:
            for a in n.args:
                self.users[a].append(n.id)
        self.result_ids = set(self.roots.values())
        self.buffers: dict[str, Buffer] = {}
        self.view: dict[int, View] = {}
        self.kernels: list[Kernel] = []
        self.kernel_reads: list[set[int]] = []  # node values each kernel reads
        self.kernel_writes: list[set[int]] = []
        self.log: list[str] = []
        self.epilogues: dict[int, _Group] = {}  # matmul node -> its epilogue's group
        # cheap node -> the groups it is computed inside (those of its readers)
        self.recomputed: dict[int, dict[int, _Group]] = {}
        self.through: set[int] = set()  # reshapes that kernels see through (no view)
        self.pending: dict[int, tuple[Matmul, set[int], set[int]]] = {}  # by id(group)
        # persistent name -> update node, for the updates this entry writes back
        self.updates = {k.split(":", 1)[1]: v for k, v in self.roots.items()
                        if k.startswith("update:")}
        self.update_target = {v: k for k, v in self.updates.items()}

    # ---- pass 1: groups, from the results backwards -------------------------------
    def group(self) -> dict[int, _Group]:
        group_of: dict[int, _Group] = {}
        for n in reversed(self.plan):
            kind = op_def(n.op).kind
            if n.op in REDUCE:
                g = _Group("reduce", self.node[n.args[0]].shape, n.id, {n.id}, [n.id])
                group_of[n.id] = g
            elif kind == "elementwise":
                g_join, frame, why = self._joinable(n, group_of)
                if g_join is not None:
                    g_join.members.add(n.id)
                    g_join.frame[n.id] = frame
                    if n.id in self.result_ids:
                        g_join.outputs.append(n.id)
                    group_of[n.id] = g_join
                    self._see_through(n)
                    self.log.append(f"  {self._desc(n)} fused into the group of "
                                    f"%{g_join.founder}")
                    shape = _refine(g_join.shape, frame)
                    if shape is not None and shape != g_join.shape:
                        g_join.shape = shape
                        self.log.append(f"    (through a reshape: the kernel now iterates "
                                        f"{list(shape)})")
                elif (readers := self._recomputable_in(n, group_of)) is not None:
                    self.recomputed[n.id] = readers
                    for g in readers.values():
                        g.frame[n.id] = n.shape
                    self._see_through(n)
                    self.log.append(f"  {self._desc(n)} recomputed in each of the "
                                    f"{len(readers)} kernels that read it")
                elif (first := self._stored_by(n, group_of)) is not None:
                    first.members.add(n.id)
                    first.outputs.append(n.id)
                    first.frame[n.id] = n.shape
                    group_of[n.id] = first
                    self.log.append(f"  {self._desc(n)} computed in the kernel of "
                                    f"%{first.founder}, which stores it for later readers")
                else:
                    group_of[n.id] = _Group("elementwise", n.shape, n.id, {n.id}, [n.id],
                                            {n.id: n.shape})
                    if why:
                        self.log.append(f"  {self._desc(n)} starts a kernel: {why}")
        return group_of

    def _reads(self, n: Node, group_of: dict[int, _Group]
               ) -> tuple[list[tuple[_Group, tuple[int, ...], bool]], list[int]]:
        """Where kernels read ``n``: a (group, frame, recomputed) triple per read, the
        frame being the shape ``n`` would be evaluated in there; and the users that are
        in no kernel. A reshape read only by kernels, each over the reshape's whole shape,
        is seen through: a reshape keeps the element order, so those kernels can evaluate
        ``n`` in its own shape at the same index (if their index space splits it)."""
        reads: list[tuple[_Group, tuple[int, ...], bool]] = []
        outside = []
        for u in self.users[n.id]:
            un = self.node[u]
            if u in group_of:
                g = group_of[u]
                reads.append((g, g.reads_in(u), False))
            elif u in self.recomputed:
                reads += [(g, g.frame[u], True) for g in self.recomputed[u].values()]
            elif un.op == "reshape" and u not in self.result_ids:
                inner, beyond = self._reads(un, group_of)
                if inner and not beyond and all(f == un.shape for _, f, _ in inner):
                    reads += [(g, n.shape, recomputed) for g, _, recomputed in inner]
                else:
                    outside.append(u)
            else:
                outside.append(u)
        return reads, outside

    def _see_through(self, n: Node) -> None:
        """Mark the reshapes of ``n`` (now evaluated in every kernel that reads them) as
        seen through: no view of their own, since ``n`` has no buffer to view."""
        for u in self.users[n.id]:
            if self.node[u].op == "reshape":
                self.through.add(u)
                self._see_through(self.node[u])

    def _recomputable_in(self, n: Node, group_of: dict[int, _Group]
                         ) -> dict[int, _Group] | None:
        """The kernels that would compute ``n`` (which no single kernel takes in) each
        for itself, if it is cheap enough: its readers' groups, through readers that
        are recomputed too and reshapes seen through, each iterating over ``n``'s
        shape or a split of it. Else None."""
        if n.op not in CHEAP or n.id in self.result_ids or not self.users[n.id]:
            return None
        if any(self.node[a].op == "matmul" for a in n.args):
            return None  # it reads a product: better that product's epilogue
        reads, outside = self._reads(n, group_of)
        groups = {id(g): g for g, _, _ in reads}
        if outside or len(groups) > RECOMPUTE_READERS:
            return None
        if any(f != n.shape or _refine(g.shape, f) != g.shape for g, f, _ in reads):
            return None
        return groups

    def _stored_by(self, n: Node, group_of: dict[int, _Group]) -> _Group | None:
        """The kernel that computes ``n`` as one more output, stored for the other
        kernels that read it: ``n`` is read only by kernels of groups, the first of
        them (in plan order) elementwise over ``n``'s shape. Saves ``n`` a kernel of
        its own (a pass over its inputs, then one over ``n``) — the forward GELU's
        Phi(x), kept for its derivative. The others are emitted after the first, so
        ``n``'s buffer exists by then."""
        users = self.users[n.id]
        if not users or any(u not in group_of for u in users):
            return None
        groups = {id(group_of[u]): group_of[u] for u in users}
        first = min(groups.values(), key=lambda g: self.position[g.founder])
        frames = {first.reads_in(u) for u in users if group_of[u] is first}
        if len(groups) < 2 or first.kind != "elementwise" or frames != {n.shape} or \
                _refine(first.shape, n.shape) != first.shape:
            return None
        return first

    def _joinable(self, n: Node, group_of: dict[int, _Group]
                  ) -> tuple[_Group | None, tuple[int, ...], str]:
        """The group ``n`` joins and the frame it is evaluated in there; or why not."""
        users = self.users[n.id]
        if not users:
            return None, (), ""
        reads, outside = self._reads(n, group_of)
        outside += [u for u in users if u in self.recomputed]
        if outside:
            ops = sorted({self.node[u].op for u in outside})
            return None, (), f"read by {', '.join(ops)} (not fusable)"
        if any(recomputed for _, _, recomputed in reads):
            return None, (), "read through a reshape by nodes recomputed in several kernels"
        groups = {id(g): g for g, _, _ in reads}
        if len(groups) > 1:
            return None, (), f"its users are in {len(groups)} different kernels"
        frames = {f for _, f, _ in reads}
        if len(frames) > 1:
            return None, (), f"read in {len(frames)} shapes"
        (g,), (frame,) = groups.values(), frames
        is_result = n.id in self.result_ids
        # A smaller node that broadcasts into the kernel is recomputed per element:
        # cheaper than a kernel of its own and a round trip through memory.
        if n.shape != frame and (is_result or not _broadcasts(n.shape, frame) or
                                 _size(frame) > RECOMPUTE_LIMIT * max(n.size, 1)):
            return None, (), f"shape {n.shape} differs from the kernel's {frame}"
        if g.kind == "reduce" and is_result:
            return None, (), "a reduction kernel writes only its reduced output"
        # Read through a reshape, n is evaluated in its own shape: the kernel iterates
        # the finer of the two (an elementwise one may switch), so every view splits.
        shape = _refine(g.shape, frame)
        if shape is None:
            return None, (), f"its shape {n.shape} and the kernel's {g.shape} split " \
                "into no common shape"
        if g.kind == "reduce" and shape != g.shape:
            return None, (), f"the reduction's input {g.shape} would need its axes split"
        return g, frame, ""

    def _desc(self, n: Node) -> str:
        return f"%{n.id} {n.op}{list(n.shape)}"

    # ---- pass 2: kernels, in graph order ------------------------------------------
    def build(self, inplace: bool = True) -> Schedule:
        """The schedule; updates written in place into their targets where ``inplace``
        and the kernel order allows, else (retried without) into temps copied back."""
        if any(n.dtype == "f64" for n in self.plan):
            raise BackendError("compiled backends compute in float32; this model uses "
                               "float64 (use backend='numpy' for float64)")
        group_of = self.group()
        self.epilogues = self._epilogues(group_of)
        targets = self._inplace_targets(group_of) if inplace else {}
        for n in self.plan:
            g = group_of.get(n.id)
            if g is not None:
                if g.founder == n.id:
                    self._emit_group(g, targets)
            elif n.id not in self.recomputed and n.id not in self.through:
                self._emit_node(n)
        results = self._results()
        order = self._order()
        if order is None:  # in-place writes cannot be ordered: write to temps, copy back
            assert inplace, "without in-place writes every order is valid"
            return _Scheduler(self.g, list(self.roots), self.entry).build(inplace=False)
        return self._finish(order, results)

    def _finish(self, order: list[int], results: dict[str, str]) -> Schedule:
        kernels = [self.kernels[i] for i in order]
        for i, k in enumerate(kernels):
            k.name = f"{self.entry}_k{i:02d}_{k.name}"
        used = {v.buffer for k in kernels for v in (*k.reads(), *k.writes())}
        used |= set(results.values())
        buffers = {k: b for k, b in self.buffers.items()
                   if k in used or b.kind in ("input", "param", "state")}
        return Schedule(self.entry, kernels, buffers, results, self.log)

    def _epilogues(self, group_of: dict[int, _Group]) -> dict[int, _Group]:
        """Matmul node -> the elementwise group that becomes its epilogue: the group
        holds every user of the product and iterates over the product's shape."""
        fused: dict[int, _Group] = {}
        taken: set[int] = set()
        for n in self.plan:
            if n.op != "matmul" or n.id in self.result_ids or not self.users[n.id]:
                continue
            groups = {id(group_of.get(u)): group_of.get(u) for u in self.users[n.id]}
            if len(groups) != 1:
                continue
            (g,) = groups.values()
            if g is None or g.kind != "elementwise" or g.shape != n.shape or id(g) in taken:
                continue
            fused[n.id] = g
            taken.add(id(g))
            self.log.append(f"  {self._desc(n)} takes the kernel of %{g.founder} as its "
                            "epilogue")
        return fused

    def _inplace_targets(self, group_of: dict[int, _Group]) -> dict[int, str]:
        """Update nodes that an elementwise group can write straight into their target."""
        out = {}
        for name, u in self.updates.items():
            g = group_of.get(u)
            if g is not None and g.kind == "elementwise" and u in g.outputs:
                out[u] = name
        return out

    # ---- buffers and views --------------------------------------------------------
    def _buffer(self, name: str, kind: str, dtype: str, size: int,
                value: np.ndarray | None = None) -> Buffer:
        buf = Buffer(name, kind, dtype, size, value)
        self.buffers[name] = buf
        return buf

    def _temp(self, n: Node) -> View:
        buf = self._buffer(f"t{n.id}", "temp", n.dtype, n.size)
        return contiguous_view(buf, n.shape)

    def _source_view(self, n: Node) -> View:
        name = safe_name(n.name or "")
        if n.op == "input":
            buf = self._buffer(f"input_{name}", "input", n.dtype, n.size)
        elif n.op == "param":
            buf = self._buffer(f"param_{name}", "param", n.dtype, n.size)
        elif n.op == "state":
            buf = self._buffer(f"state_{name}", "state", n.dtype, n.size)
        else:
            buf = self._buffer(f"c{n.id}", "const", n.dtype, n.size, n.attrs["value"])
        return contiguous_view(buf, n.shape)

    def _persistent_view(self, name: str) -> View:
        nid = self.g.persistent()[name]
        n = self.g.node(nid)
        kind = "param" if name in self.g.params else "state"
        buf = self._buffer(f"{kind}_{safe_name(name)}", kind, n.dtype, n.size)
        return contiguous_view(buf, n.shape)

    def _add_kernel(self, k: Kernel, reads: set[int], writes: set[int]) -> None:
        self.kernels.append(k)
        self.kernel_reads.append(reads)
        self.kernel_writes.append(writes)

    def _copy(self, src: View, dst: View, reads: set[int], writes: set[int],
              label: str = "copy") -> None:
        x = sp.Symbol("x0", **_assumptions(src.dtype))
        self._add_kernel(Elementwise(label, [label], dst.shape, {"x0": src}, [(dst, x)]),
                         reads, writes)

    def _contiguous(self, nid: int) -> View:
        v = self.view[nid]
        if v.contiguous:
            return v
        n = self.node[nid]
        out = contiguous_view(self._buffer(f"t{nid}_c", "temp", n.dtype, n.size), n.shape)
        self._copy(v, out, {nid}, {nid})
        self.view[nid] = out
        return out

    # ---- emitting ------------------------------------------------------------------
    def _emit_node(self, n: Node) -> None:
        op = n.op
        if op in ("input", "param", "state", "const"):
            self.view[n.id] = self._source_view(n)
        elif op in MOVEMENT:
            self.view[n.id] = self._movement(n)
        elif op == "matmul":
            self._emit_matmul(n)
        elif op in ("take", "scatter_add"):
            self._emit_gather(n)
        elif op.startswith("conv2d"):
            self._emit_conv(n)
        elif op == "concat":
            self._emit_concat(n)
        elif op == "unslice":
            self._emit_unslice(n)
        else:
            raise BackendError(f"the scheduler has no kernel for op {op!r}", n.src)

    def _movement(self, n: Node) -> View:
        v = self.view[n.args[0]]
        a = n.attrs
        if n.op == "transpose":
            return v.permute(tuple(a["perm"]))
        if n.op == "expand":
            return v.broadcast_to(n.shape)
        if n.op == "slice":
            offset = v.offset + sum(start * s for (start, _, _), s in zip(a["index"], v.strides,
                                                                          strict=True))
            strides = tuple(s * step for (_, _, step), s in zip(a["index"], v.strides,
                                                                strict=True))
            return View(v.buffer, v.dtype, offset, n.shape, strides)
        # reshape: free when the input is laid out row-major, or is one element
        # broadcast (every shape of it is a broadcast too)
        if v.size > 1 and not any(v.strides):
            return View(v.buffer, v.dtype, v.offset, n.shape, (0,) * len(n.shape))
        if not v.contiguous:
            v = self._contiguous(n.args[0])
        return View(v.buffer, v.dtype, v.offset, n.shape, row_major(n.shape))

    def _emit_group(self, g: _Group, inplace: dict[int, str]) -> None:
        symbols: dict[View, sp.Symbol] = {}
        inputs: dict[str, View] = {}
        reads: set[int] = set()
        cache: dict[int, Any] = {}

        def in_kernel(v: View) -> View:
            """A view in a frame (``g.shape`` with axes merged) over ``g.shape``."""
            split = v.reshape(g.shape)
            assert split is not None, "splitting axes never needs a copy"
            return split

        def leaf(nid: int, frame: tuple[int, ...]) -> Any:
            n = self.node[nid]
            if n.op == "const" and n.size == 1:
                return _literal(n.attrs["value"].reshape(()).item(), n.dtype)
            view = in_kernel(self.view[nid].broadcast_to(frame))
            if view not in symbols:
                sym = sp.Symbol(f"x{len(symbols)}", **_assumptions(n.dtype))
                symbols[view] = sym
                inputs[sym.name] = view
            reads.add(nid)
            return symbols[view]

        def arg(nid: int, frame: tuple[int, ...]) -> Any:
            """``nid``'s value at the kernel's index, read by a node evaluated in ``frame``."""
            src = nid
            while src in self.through:  # a reshape seen through: same element, same index
                src = self.node[src].args[0]
            return expr(src) if src in g.frame else leaf(nid, frame)

        def expr(nid: int) -> Any:
            if nid in cache:
                return cache[nid]
            n, frame = self.node[nid], g.frame[nid]
            if n.op == "cast":
                e = _cast(arg(n.args[0], frame), self.node[n.args[0]].dtype, n.dtype)
            else:
                opdef = op_def(n.op)
                e = _fold_ite(opdef.expr.xreplace(  # type: ignore[union-attr]
                    {s: arg(a, frame) for s, a in zip(opdef.symbols, n.args, strict=True)}))
            cache[nid] = e
            return e

        ops = sorted({self.node[m].op for m in g.members})
        if g.kind == "reduce":
            r = self.node[g.founder]
            value = arg(r.args[0], g.shape)
            out = self._temp(r)
            self.view[r.id] = out
            keep = tuple(1 if i in r.attrs["axes"] else d for i, d in enumerate(g.shape))
            kernel: Kernel = Reduce(
                "reduce", ops, g.shape, tuple(r.attrs["axes"]),
                "sum" if r.op == "reduce_sum" else "max", inputs, value,
                View(out.buffer, out.dtype, 0, keep, row_major(keep)))
            self._add_kernel(kernel, reads, {r.id})
            return
        outputs = []
        for o in sorted(g.outputs):
            n = self.node[o]
            dst = self._persistent_view(inplace[o]) if o in inplace else self._temp(n)
            self.view[o] = dst
            outputs.append((in_kernel(dst), expr(o)))  # outputs are evaluated in their shape
        label = safe_name("_".join(ops[:3]) if len(ops) <= 3 else "_".join(ops[:2]) + "_etc")
        kernel = Elementwise(label, ops, g.shape, inputs, outputs)
        if id(g) in self.pending:
            mm, mm_reads, mm_writes = self.pending.pop(id(g))
            mm.epilogue = kernel
            mm.ops = ["matmul", *ops]
            mm.name = safe_name(f"matmul_{label}")
            self._add_kernel(mm, mm_reads | reads, mm_writes | set(g.outputs))
            return
        self._add_kernel(kernel, reads, set(g.outputs))

    def _emit_matmul(self, n: Node) -> None:
        a, b = (self.node[x] for x in n.args)
        batch = n.shape[:-2]
        av = self.view[a.id].broadcast_to((*batch, *a.shape[-2:]))
        bv = self.view[b.id].broadcast_to((*batch, *b.shape[-2:]))
        out = self._product_view(n)
        self.view[n.id] = out
        k = Matmul("matmul", ["matmul"], batch, n.shape[-2], n.shape[-1], a.shape[-1], av, bv,
                   out)
        g = self.epilogues.get(n.id)
        if g is not None:  # emitted with its epilogue, when the group is
            self.pending[id(g)] = (k, {a.id, b.id}, {n.id})
            return
        self._add_kernel(k, {a.id, b.id}, {n.id})

    def _product_view(self, n: Node) -> View:
        """Where a matmul writes its product: a temp in row-major order, unless the
        product is only read through transposes that a reshape then needs row-major —
        attention's heads merging back into the model dimension, forward and backward.
        Then the temp is laid out in the transposed order and the GEMM writes through
        the inverse permutation (strided rows, two batch levels): the reshape is free
        and the transpose's copy kernel never exists."""
        perm = tuple(range(len(n.shape)))
        last = n
        if n.id in self.epilogues:  # its epilogue reads the product row-major
            return self._temp(n)
        while len(self.users[last.id]) == 1 and last.id not in self.result_ids:
            user = self.node[self.users[last.id][0]]
            if user.op != "transpose":
                break
            perm = tuple(perm[p] for p in user.attrs["perm"])
            last = user
        if last is n or last.id in self.result_ids or not any(
                self.node[u].op == "reshape" for u in self.users[last.id]):
            return self._temp(n)
        stored = contiguous_view(self._buffer(f"t{n.id}", "temp", n.dtype, n.size),
                                 last.shape)
        self.log.append(f"  {self._desc(n)} stored in the order of its transpose "
                        f"%{last.id}{list(last.shape)}")
        return stored.permute(tuple(int(i) for i in np.argsort(perm)))

    def _emit_gather(self, n: Node) -> None:
        out = self._temp(n)
        self.view[n.id] = out
        if n.op == "take":
            table, ids = n.args
            row_len = int(np.prod(self.node[table].shape[1:], dtype=np.int64))
            k = Gather("gather", ["take"], False, self.node[table].shape[0], row_len,
                       self._contiguous(ids), self._contiguous(table), out)
        else:
            ids, vals = n.args
            row_len = int(np.prod(n.shape[1:], dtype=np.int64))
            k = Gather("scatter_add", ["scatter_add"], True, n.attrs["size"], row_len,
                       self._contiguous(ids), self._contiguous(vals), out)
        self._add_kernel(k, set(n.args), {n.id})

    def _emit_conv(self, n: Node) -> None:
        lhs, rhs = n.args
        a = n.attrs
        if n.op == "conv2d":
            (bn, c, h, w), (o, _, kh, kw) = self.node[lhs].shape, self.node[rhs].shape
            mode = "forward"
        elif n.op == "conv2d_input_grad":
            (bn, c, h, w), (o, _, kh, kw) = a["x_shape"], self.node[rhs].shape
            mode = "input_grad"
        else:
            (bn, c, h, w), (o, _, kh, kw) = self.node[lhs].shape, a["w_shape"]
            mode = "weight_grad"
        out = self._temp(n)
        self.view[n.id] = out
        self._add_kernel(Conv("conv", [n.op], mode, (bn, c, h, w, o, kh, kw),
                              tuple(a["stride"]), tuple(a["padding"]),
                              self._contiguous(lhs), self._contiguous(rhs), out),
                         {lhs, rhs}, {n.id})

    def _emit_concat(self, n: Node) -> None:
        out = self._temp(n)
        self.view[n.id] = out
        axis, start = n.attrs["axis"], 0
        for x in n.args:
            xs = self.node[x].shape
            dst = View(out.buffer, out.dtype, start * out.strides[axis], xs, out.strides)
            self._copy(self.view[x], dst, {x}, {n.id}, "concat")
            start += xs[axis]

    def _emit_unslice(self, n: Node) -> None:
        out = self._temp(n)
        self.view[n.id] = out
        self._add_kernel(Elementwise("zero", ["unslice"], n.shape, {},
                                     [(out, _literal(0, n.dtype))]), set(), {n.id})
        index = n.attrs["index"]
        offset = sum(start * s for (start, _, _), s in zip(index, out.strides, strict=True))
        strides = tuple(s * step for (_, _, step), s in zip(index, out.strides, strict=True))
        src = self.node[n.args[0]]
        dst = View(out.buffer, out.dtype, offset, src.shape, strides)
        self._copy(self.view[src.id], dst, {src.id}, {n.id}, "unslice")

    # ---- results and order -----------------------------------------------------------
    def _results(self) -> dict[str, str]:
        results = {}
        for key, nid in self.roots.items():
            v = self.view[nid]
            if key.startswith("update:"):
                name = key.split(":", 1)[1]
                dst = self._persistent_view(name)
                if v != dst:  # not written in place: copy back after everything else
                    self._copy(v, dst, {nid}, {-1}, "writeback")
                continue
            whole = v.contiguous and v.offset == 0 and \
                self.buffers[v.buffer].kind == "temp" and self.buffers[v.buffer].size == v.size
            if not whole:
                n = self.node[nid]
                dst = contiguous_view(self._buffer(f"r{nid}", "temp", n.dtype, n.size), n.shape)
                self._copy(v, dst, {nid}, {-2 - nid}, "result")
                v = dst
            results[key] = v.buffer
        return results

    def _order(self) -> list[int] | None:
        """Kernels in an order that respects data flow, and runs every reader of an old
        param/state value before the kernel that overwrites it. None if impossible."""
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(self.kernels)))
        producer: dict[int, int] = {}
        for i, ws in enumerate(self.kernel_writes):
            for w in ws:
                producer.setdefault(w, i)
        for i, rs in enumerate(self.kernel_reads):
            for r in rs:
                if r in producer and producer[r] != i:
                    dag.add_edge(producer[r], i)
        writebacks = [i for i, ws in enumerate(self.kernel_writes) if -1 in ws]
        for name in self.updates:
            old = self.g.persistent()[name]
            target = self._persistent_view(name).buffer
            writers = [i for i, k in enumerate(self.kernels)
                       if any(v.buffer == target for v in k.writes())]
            for w in writers:  # readers of the old value, directly or through a view
                for i, rs in enumerate(self.kernel_reads):
                    if i != w and any(self._root(r) == old for r in rs):
                        dag.add_edge(i, w)
                if self._unsafe_inplace(self.kernels[w], target):
                    return None
        for wb in writebacks:  # copies back run last
            for i in range(len(self.kernels)):
                if i not in writebacks:
                    dag.add_edge(i, wb)
        try:
            return list(nx.lexicographical_topological_sort(dag))
        except nx.NetworkXUnfeasible:
            return None

    def _root(self, nid: int) -> int:
        """The node whose buffer ``nid``'s value is a view of (through movement ops):
        an input-gradient matmul reads a weight as its transpose."""
        n = self.node.get(nid)
        while n is not None and n.op in MOVEMENT and self.view.get(nid) is not None and \
                self.view.get(n.args[0]) is not None and \
                self.view[nid].buffer == self.view[n.args[0]].buffer:
            nid = n.args[0]
            n = self.node.get(nid)
        return nid

    @staticmethod
    def _unsafe_inplace(k: Kernel, target: str) -> bool:
        """Writing ``target`` in place is safe only where each element is read at the
        same index it is written."""
        if isinstance(k, Matmul):
            operands = [v for v in (k.a, k.b) if v is not None]
            if any(v.buffer == target for v in operands):
                return True
            return k.epilogue is not None and _Scheduler._unsafe_inplace(k.epilogue, target)
        if not isinstance(k, Elementwise):
            return False
        written = {v for v, _ in k.outputs if v.buffer == target}
        return any(v.buffer == target and v not in written for v in k.inputs.values())


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _refine(shape: tuple[int, ...], other: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape both ``shape`` and ``other`` (of equal size) become by splitting axes
    only: ``shape`` itself when each axis of ``other`` is a run of its axes, None when
    their axes straddle ((6, 4) and (4, 6)). Splits never need a copy."""
    def cuts(s: tuple[int, ...]) -> set[int]:  # the sizes of s's leading runs of axes
        return {int(c) for c in np.cumprod(s, dtype=np.int64)}

    if 0 in shape or 0 in other:
        return shape if shape == other else None
    if cuts(other) <= cuts(shape):
        return shape
    dims, prev = [], 1
    for c in sorted(cuts(shape) | cuts(other)):
        if c % prev:
            return None
        dims.append(c // prev)
        prev = c
    return tuple(dims)


def _broadcasts(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    try:
        return tuple(np.broadcast_shapes(small, big)) == tuple(big)
    except ValueError:
        return False


def _assumptions(dtype: str) -> dict[str, bool]:
    if dtype == "i32":
        return {"integer": True}
    if dtype == "bool":
        return {}
    return {"real": True}


def _literal(value: Any, dtype: str) -> Any:
    if dtype == "bool":
        return sp.true if value else sp.false
    if dtype == "i32":
        return sp.Integer(int(value))
    return sp.Float(float(value), 24)



def _fold_ite(e: Any) -> Any:
    """``ITE(c, a, False)`` as ``c & a``: what comparing a substituted Piecewise becomes
    (relu'(relu(x)) = [relu(x) > 0] = ``ITE(x > 0, x > 0, False)`` = [x > 0])."""
    if not e.has(sp.ITE):
        return e
    return e.replace(lambda a: isinstance(a, sp.ITE) and a.args[2] == sp.false,
                     lambda a: sp.And(a.args[0], a.args[1]))

def _cast(e: Any, src: str, dst: str) -> Any:
    if src == dst or (src in ("f32", "f64") and dst in ("f32", "f64")):
        return e
    if dst in ("f32", "f64"):
        return ToFloat(e)
    if dst == "i32":
        return ToInt(e)
    return ToBool(e)


def schedule(graph: Graph, keys: list[str], entry: str) -> Schedule:
    """The kernels that compute ``keys`` (result keys as in ``Graph.results``)."""
    return _Scheduler(graph, keys, entry).build()


def entry_points(graph: Graph) -> dict[str, list[str]]:
    """The result keys of each entry point a step offers."""
    entries = {"forward": [f"out:{k}" for k in graph.outputs]}
    if graph.grads:
        entries["grads"] = [f"grad:{k}" for k in graph.grads]
    if graph.updates:
        entries["train"] = ["out:loss", *(f"update:{k}" for k in graph.updates)]
    return entries
