"""Window chains (CUDA only): a reduction over a small window and the elementwise
kernel that reads it broadcast back over that window, fused into one kernel that gives
each window to a thread, after row chains, in the PTX renderer.

Max pooling's gradient is the pattern: the forward takes the max of each 2×2 window
(``reduce_max`` over axes (3, 5) of [n, c, h/2, 2, w/2, 2]); the backward counts the
window's ties (``sum(x == max)``, the same shape and axes) and, much later in the
schedule, spreads the window's gradient over them (``g * (x == max) / count`` over the
whole input). Unfused, the count is a kernel of its own and the spreading kernel reads
x, the max, the count and g once per input element, working out every view's index
from the flat index with six div/mod pairs; on the H200's cnn256 the two passes over
conv1's output take ~28 µs where their bytes need ~9 µs. ``fuse_windows`` rewrites
the kernel list of one schedule: a reduction whose output is next read (after any
kernels it can move past) by an elementwise kernel over the same shape, through the
reduction's own view broadcast over the window, moves down to that kernel and the two
become a ``WindowChain`` (the generic schedule, which the CPU and WGSL backends read,
is unchanged). ``window_chain`` renders it: a thread per window (grid-stride over the
windows), each view's address worked out once per window and its elements at
constant offsets from it; the reduction folds the window's elements in row-major
order (the unfused "thread per row" reduction's order, so the bits are the same),
then the elementwise kernel runs on each element with the reduced value in a register.
A window reduction with no such reader (the forward's max pooling) runs the same way
alone: its index worked out once per window rather than once per element.

A chain is taken only when it is safe, checked against the memory plan (two buffers
are the same when their bytes overlap, as in ``ptx_horizontal``):

- the reduction moves past the kernels between it and the elementwise kernel only
  when it has no dependency on any of them: it writes nothing they read or write and
  reads nothing they write;
- nothing between them touches the reduction's output, and the elementwise kernel
  reads it through the reduction's output view (strides 0 over the window);
- no buffer the chain stores shares memory with one it loads, unless the store is in
  place: the same placement and view, so each element is loaded and then stored by
  the one thread that owns its window.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ..kernel_ir import Elementwise, Kernel, Reduce, View
from ..memory import MemoryPlan
from ..schedule import Schedule
from .base import collapse
from .legalize import legalize
from .ptx_asm import DTYPE_KIND, ITEMSIZE, ExprEmitter, PtxFunction
from .ptx_asm import shared_subexpressions as cse
from .ptx_horizontal import WINDOW, _Access, _Memory, _overlap
from .ptx_kernels import (
    REDUCE_IDENTITY,
    REDUCE_OP,
    Coords,
    KernelLaunch,
    Step,
    _block_for,
    _blocks,
    _check_u32,
    _grid_stride,
    _param_list,
    _pointers,
    kernel_buffers,
)

MAX_WINDOW = 16  # elements of a window a thread holds (a register per element and view)


@dataclass
class WindowChain(Kernel):
    """``kernels``: reductions over ``axes`` of ``shape``, then elementwise kernels over
    ``shape`` reading them; one thread per window. It loads ``loads`` and stores
    ``stores``, the views of the writes that something outside the chain reads."""

    shape: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    kernels: list[Kernel] = field(default_factory=list)
    loads: list[View] = field(default_factory=list)
    stores: list[View] = field(default_factory=list)

    kind = "window_chain"

    def reads(self) -> list[View]:
        return list(self.loads)

    def writes(self) -> list[View]:
        return list(self.stores)


# ---- finding chains ---------------------------------------------------------------------


def _window_reduce(k: Kernel) -> bool:
    """A reduction a thread can hold a window of: f32 out, at most ``MAX_WINDOW``."""
    if not isinstance(k, Reduce) or k.out is None or k.out.dtype != "f32":
        return False
    window = math.prod(k.shape[a] for a in k.axes)
    return k.combine in REDUCE_OP and 2 <= window <= MAX_WINDOW


def _reads_broadcast(e: Elementwise, r: Reduce) -> bool:
    """``e`` reads ``r``'s output, only through ``r``'s own view (the reduction's value
    broadcast over its window)."""
    out = r.out
    assert out is not None
    views = [v for v in e.reads() if v.buffer == out.buffer]
    return bool(views) and all((v.dtype, v.offset, v.strides) == (out.dtype, out.offset,
                                                                   out.strides)
                               for v in views)


def _in_place(mem: _Memory, w: View, r: View) -> bool:
    """A store over a load that is safe: the same memory through the same view, so each
    element is loaded (all loads come first) and stored by the one thread owning it."""
    return (mem.extent(w.buffer)[:2] == mem.extent(r.buffer)[:2]
            and (w.dtype, w.offset, w.shape, w.strides) == (r.dtype, r.offset, r.shape, r.strides))


def fuse_windows(s: Schedule, plan: MemoryPlan, kernels: list[Kernel]
                 ) -> tuple[list[Kernel], list[str]]:
    """``kernels`` (the device kernels of ``s``) with each window chain one
    ``WindowChain`` at its elementwise kernel's position, and a log line per chain
    (``FERROGRAD_DEBUG``)."""
    mem = _Memory(s, plan)
    access = [_Access(mem.extents(k.reads()), mem.extents(k.writes())) for k in kernels]
    touched: dict[str, list[int]] = {}  # buffer -> indices of the kernels reading or writing it
    for i, k in enumerate(kernels):
        for v in [*k.reads(), *k.writes()]:
            touched.setdefault(v.buffer, []).append(i)
    results = set(s.results.values())
    moved: set[int] = set()
    chains: dict[int, WindowChain] = {}
    log: list[str] = []
    for j, e in enumerate(kernels):
        if type(e) is not Elementwise:
            continue
        members: list[int] = []
        for i in range(j - 1, max(-1, j - 1 - WINDOW), -1):
            r = kernels[i]
            if i in moved or not isinstance(r, Reduce) or not _window_reduce(r):
                continue
            assert r.out is not None
            if r.shape != e.shape or (members and r.axes != kernels[members[0]].axes):  # type: ignore[attr-defined]
                continue
            later = [t for t in touched[r.out.buffer] if t > i]
            if not later or later[0] != j or not _reads_broadcast(e, r):
                continue
            if any(access[i].conflicts(access[p]) for p in range(i + 1, j)):
                continue
            members.append(i)
        if not members:
            continue
        chain = _chain(s, mem, [kernels[i] for i in sorted(members)], e, touched,
                       set(members) | {j}, results)
        if chain is None:
            log.append(f"window chain at {e.name}: a store shares memory with a load; "
                       "not fused")
            continue
        moved.update(members)
        chains[j] = chain
        log.append(f"window chain {', '.join(k.name for k in chain.kernels)}: a thread per "
                   f"window of {math.prod(e.shape[a] for a in chain.axes)} -> {chain.name}; "
                   f"stores {', '.join(v.buffer for v in chain.stores) or 'nothing'}")
    for i, r in enumerate(kernels):  # a window reduction with no reader to join: alone
        if i not in moved and isinstance(r, Reduce) and _window_reduce(r):
            assert r.out is not None
            chains[i] = WindowChain(f"{r.name}_window", list(r.ops), r.shape, r.axes, [r],
                                    list(dict.fromkeys(r.reads())), [r.out])
    out = [chains.get(i, k) for i, k in enumerate(kernels) if i not in moved]
    return out, log


def _chain(s: Schedule, mem: _Memory, reduces: list[Kernel], e: Elementwise,
           touched: dict[str, list[int]], inside: set[int], results: set[str]
           ) -> WindowChain | None:
    """The chain of ``reduces`` and ``e``, or None when a store would overwrite memory
    the chain loads (other than in place)."""
    members = [*reduces, e]
    # the reductions' values live in registers; everything else read comes from memory
    # (``e`` may read a buffer it writes: in place, element by element)
    made = {v.buffer for k in reduces for v in k.writes()}
    loads = list(dict.fromkeys(v for k in members for v in k.reads() if v.buffer not in made))

    def needed(buf: str) -> bool:
        return (s.buffers[buf].kind != "temp" or buf in results
                or bool(set(touched.get(buf, [])) - inside))

    stores = list(dict.fromkeys(v for k in members for v in k.writes() if needed(v.buffer)))
    for w in stores:
        for r in loads:
            if (_overlap([mem.extent(w.buffer)], [mem.extent(r.buffer)])
                    and not _in_place(mem, w, r)):
                return None
    first = reduces[0]
    return WindowChain(f"{first.name}_window", [op for k in members for op in k.ops],
                       e.shape, first.axes, members, loads, stores)  # type: ignore[attr-defined]


# ---- rendering --------------------------------------------------------------------------


def window_chain(k: WindowChain, dtypes: dict[str, str], fast_math: bool,
                 aligned: frozenset[str] = frozenset()) -> list[Step]:
    """A thread per window (grid-stride over the windows), the chain's kernels in order
    on the window's elements in registers: see the module's docstring. ``aligned``: the
    buffers whose first element is 16-byte aligned (two neighbours of a window in one
    8-byte access where their index is even)."""
    kept = [d for d in range(len(k.shape)) if d not in k.axes]
    kept_sizes = tuple(k.shape[d] for d in kept)
    positions = list(itertools.product(*(range(k.shape[a]) for a in k.axes)))
    rows = math.prod(kept_sizes)
    views = list(dict.fromkeys([*k.loads, *k.stores]))
    _check_u32(k, rows * len(positions), *(v.offset + v.size for v in views))
    heads = [View(v.buffer, v.dtype, v.offset, kept_sizes, tuple(v.strides[d] for d in kept))
             for v in views]
    lead_sizes, lead_strides = collapse(kept_sizes, heads)
    buffers = kernel_buffers(k)
    f = _param_list(buffers)
    em = ExprEmitter(f, fast_math)
    base = _pointers(f, buffers)
    with _grid_stride(f, rows, "window") as row:
        w = _Window(f, Coords(f, row, lead_sizes), dict(zip(views, lead_strides, strict=True)),
                    base, k.axes, positions, aligned)
        for v in k.loads:  # every load issued before anything uses them
            w.load(v)
        values: dict[str, list[str]] = {}  # a value made in the chain: a register per element
        for kernel in k.kernels:
            inputs = kernel.inputs  # type: ignore[attr-defined]

            def bind(p: int, inputs: dict[str, View] = inputs) -> None:
                for sym, v in inputs.items():
                    regs = values[v.buffer] if v.buffer in values else w.load(v)
                    em.bind(sym, regs[p if len(regs) > 1 else 0], DTYPE_KIND[v.dtype])

            if isinstance(kernel, Reduce):
                assert kernel.out is not None
                shared = cse([legalize(kernel.value, fast_math)])
                acc = f.value("f32", "mov.f32", REDUCE_IDENTITY[kernel.combine])
                for p in range(len(positions)):
                    bind(p)
                    (x,) = em.emit_shared(shared, ["float"])
                    f.ins(REDUCE_OP[kernel.combine], acc, acc, em.register(x, "float"))
                values[kernel.out.buffer] = [acc]
                if kernel.out in k.stores:
                    w.store(kernel.out, [acc])
                continue
            assert isinstance(kernel, Elementwise)
            shared = cse([legalize(expr, fast_math) for _, expr in kernel.outputs])
            kinds = [DTYPE_KIND[v.dtype] for v, _ in kernel.outputs]
            made: dict[View, list[str]] = {v: [] for v, _ in kernel.outputs}
            for p in range(len(positions)):
                bind(p)
                for (v, _), val, kind in zip(kernel.outputs, em.emit_shared(shared, kinds), kinds,
                                             strict=True):
                    made[v].append(em.register(val, kind))
            for v, regs in made.items():  # after all its reads: it may update in place
                values[v.buffer] = regs
                if v in k.stores:
                    w.store(v, regs)
    block = _block_for(rows)
    members = ", ".join(m.name for m in k.kernels)
    comment = (f"window chain (a thread per window of {len(positions)}, axes {list(k.axes)} "
               f"of {list(k.shape)}): {members}; stores "
               f"{', '.join(v.buffer for v in k.stores) or 'nothing'}")
    return [KernelLaunch(k.name, comment, f.text("ENTRY"), [(b, 0) for b in buffers],
                         (_blocks(rows, block), 1, 1), (block, 1, 1))]


class _Window:
    """Loads and stores of one window: a view's address is computed once per window,
    its element p then sits a constant offset on; two neighbouring elements at an even
    index of an f32 view in an aligned buffer move as one ``.v2`` access."""

    def __init__(self, f: PtxFunction, coords: Coords, head_of: dict[View, list[int]],
                 base: dict[str, str], axes: tuple[int, ...],
                 positions: list[tuple[int, ...]], aligned: frozenset[str]) -> None:
        self.f, self.coords, self.head_of, self.base = f, coords, head_of, base
        self.axes, self.positions, self.aligned = axes, positions, aligned
        self.addresses: dict[tuple[str, tuple[int, ...]], str] = {}
        self.loaded: dict[View, list[str]] = {}

    def _elements(self, v: View) -> list[int]:
        """The element offsets (from the window's index) of ``v``'s elements, one per
        position; one only when ``v`` is constant over the window."""
        if not any(v.strides[a] for a in self.axes):
            return [v.offset]
        return [v.offset + sum(c * v.strides[a] for c, a in zip(p, self.axes, strict=True))
                for p in self.positions]

    def _groups(self, v: View) -> list[list[int]]:
        """Positions in accesses: pairs (p, p + 1) where the two are neighbours at an
        even element of an aligned f32 buffer (every index of the window even), else
        single positions."""
        elements = self._elements(v)
        pairs = (v.dtype == "f32" and v.buffer in self.aligned
                 and all(s % 2 == 0 for s in self.head_of[v]))
        groups: list[list[int]] = []
        p = 0
        while p < len(elements):
            if (pairs and p + 1 < len(elements) and elements[p] % 2 == 0
                    and elements[p + 1] == elements[p] + 1):
                groups.append([p, p + 1])
                p += 2
            else:
                groups.append([p])
                p += 1
        return groups

    def _at(self, v: View, p: int) -> str:
        key = (v.buffer, tuple(self.head_of[v]))
        if key not in self.addresses:
            index = self.coords.index(self.head_of[v])
            self.addresses[key] = self.base[v.buffer] if index is None else self.f.value(
                "b64", "add.s64", self.base[v.buffer],
                self.f.value("b64", "mul.wide.u32", index, str(ITEMSIZE[v.dtype])))
        return f"[{self.addresses[key]}+{self._elements(v)[p] * ITEMSIZE[v.dtype]}]"

    def load(self, v: View) -> list[str]:
        """``v``'s elements in this window, a register per position (one when constant
        over the window)."""
        if v not in self.loaded:
            regs: list[str] = []
            for group in self._groups(v):
                if len(group) == 1:
                    regs.append(self.f.load(v.dtype, self._at(v, group[0])))
                else:
                    pair = [self.f.reg("f32") for _ in group]
                    self.f.ins("ld.global.v2.f32", "{" + ", ".join(pair) + "}",
                               self._at(v, group[0]))
                    regs += pair
            self.loaded[v] = regs
        return self.loaded[v]

    def store(self, v: View, regs: list[str]) -> None:
        for group in self._groups(v):
            if len(group) == 1:
                self.f.store(v.dtype, self._at(v, group[0]), regs[group[0]])
            else:
                self.f.ins("st.global.v2.f32", self._at(v, group[0]),
                           "{" + ", ".join(regs[p] for p in group) + "}")
