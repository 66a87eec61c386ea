"""Row chains (CUDA only): consecutive kernels over the same rows fused into one kernel
that gives each row to a warp, after scheduling, in the PTX renderer.

Softmax, layer norm and cross-entropy schedule as a few kernels over one row space
(leading dims ``lead``, a trailing axis of ``length``): reductions over the trailing
axis (row max, row sum), elementwise kernels over whole rows (``exp(x - max)``,
``e / sum``) and elementwise kernels over the rows' values (``1 / sum``). Unfused,
each kernel reads its rows from memory and writes its result back; attention's
softmax moves its [32, 8, 256, 256] scores five times. ``fuse_rows`` rewrites the
kernel list of one schedule, replacing each such run of kernels by a ``RowChain``
(the generic schedule, which the CPU and WGSL backends read, is unchanged), and
``row_chain`` renders it: a warp per row, lane l holding elements l, l + 32, ... of
every whole-row value in registers (``ceil(length / 32)`` each), every value a
reduction or a row kernel gives in one register of every lane. A row is loaded
once per input view; only what something outside the chain still reads is stored
(a temp no kernel outside the chain reads or writes and no result is, is not).

A chain is taken only when it is safe, checked over the whole schedule and the
memory plan (``_Chain.accept`` and ``fuse_rows``):

- every kernel iterates ``lead + (length,)`` (a reduction over the last axis, or a
  whole-row elementwise kernel) or ``lead + (1,)`` (a row kernel; ``()`` after a
  reduction of everything, as a mean loss's scaling), 2 <= length <=
  ``MAX_LENGTH``, and the chain holds a reduction and a kernel after it;
- a value made in the chain is read in the chain through the view it was written
  with (a row value: broadcast along the row), else the chain stops before the
  reader; no buffer is written twice, or written after the chain read it from
  memory;
- no buffer the kernel stores shares memory (memory plan) with one it loads: the
  plan lets a temp whose last reader is in the chain share memory with a temp
  written later in the chain, which one kernel over all rows at once would race on;
- the whole-row values fit a register budget (``REGISTERS`` per lane).

Reductions combine in a fixed order (no atomics): lane l folds its elements l,
l + 32, ... in increasing order from the identity (0, or -inf for max), then the
warp's butterfly (xor 16, 8, 4, 2, 1) — the order of the unfused "warp per row"
reduction (``ptx_kernels.reduce``, rows of 33 to 2048), so for those the bits are
the unfused kernels' bits; rows of 32 or fewer, which the unfused kernel reduces a
thread per row in element order, may differ in the last bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kernel_ir import Elementwise, Kernel, Matmul, Reduce, View, unfused
from ..memory import MemoryPlan, Placement
from ..schedule import Schedule
from .base import collapse
from .legalize import legalize
from .ptx_asm import DTYPE_KIND, ITEMSIZE, ExprEmitter, PtxFunction
from .ptx_asm import shared_subexpressions as cse
from .ptx_kernels import (
    BLOCK,
    REDUCE_IDENTITY,
    REDUCE_OP,
    WARP,
    Coords,
    KernelLaunch,
    Step,
    _blocks,
    _check_u32,
    _param_list,
    _pointers,
    _warp_combine,
    bias_epilogue,
    kernel_buffers,
)

MAX_LENGTH = 4096  # longest row a chain takes (then 128 registers per whole-row value)
REGISTERS = 128  # registers per lane for whole-row values (loads and results), summed


@dataclass
class RowChain(Kernel):
    """``kernels`` (consecutive in the schedule) over rows ``lead`` × ``length``, run as
    one kernel: it loads ``loads`` and stores ``stores``, the views of the writes that
    something outside the chain reads."""

    lead: tuple[int, ...] = ()
    length: int = 0
    kernels: list[Kernel] = field(default_factory=list)
    loads: list[View] = field(default_factory=list)
    stores: list[View] = field(default_factory=list)

    kind = "row_chain"

    def reads(self) -> list[View]:
        return list(self.loads)

    def writes(self) -> list[View]:
        return list(self.stores)


# ---- finding chains ---------------------------------------------------------------------


def _is_row(v: View) -> bool:
    """A view constant along the row (a row value, or a broadcast one)."""
    return not v.shape or v.strides[-1] == 0


@dataclass
class _Chain:
    """A chain being grown: what it wrote (buffer -> view) and loaded from memory."""

    lead: tuple[int, ...]
    length: int
    kernels: list[Kernel] = field(default_factory=list)
    written: dict[str, View] = field(default_factory=dict)
    loads: dict[View, None] = field(default_factory=dict)  # an ordered set
    registers: int = 0

    @property
    def full(self) -> tuple[int, ...]:
        return (*self.lead, self.length)

    def accept(self, k: Kernel) -> bool:
        """Add ``k`` if it can join the chain (see the module's docstring)."""
        if isinstance(k, Reduce):
            ok = (k.shape == self.full and k.axes == (len(k.shape) - 1,)
                  and k.combine in REDUCE_OP and k.out is not None and k.out.dtype == "f32")
            whole = True
        elif isinstance(k, Elementwise):
            whole = k.shape == self.full
            # a row kernel: over the rows' values (a scalar, when the row is everything)
            ok = whole or k.shape in ((*self.lead, 1), () if not self.lead else None)
        else:
            return False
        if not ok:
            return False
        slots = math.ceil(self.length / WARP)
        loads, registers = dict(self.loads), self.registers
        for v in k.reads():
            w = self.written.get(v.buffer)
            if w is None:
                if v not in loads and not _is_row(v):
                    registers += slots
                loads[v] = None
            elif _is_row(w):  # a row value: read as it is, or broadcast along the row
                if (v.offset, v.strides[:-1]) != (w.offset, w.strides[:-1]) or not _is_row(v):
                    return False
            elif v != w:  # a whole-row value: the same elements, in the same order
                return False
        read = {v.buffer for v in loads}
        for v in k.writes():
            if v.buffer in self.written or v.buffer in read:
                return False
            if not _is_row(v):
                registers += slots
        if registers > REGISTERS:
            return False
        self.kernels.append(k)
        self.loads, self.registers = loads, registers
        for v in k.writes():
            self.written[v.buffer] = v
        return True

    def useful(self) -> bool:
        """A reduction with something after it to fuse."""
        first = next((i for i, k in enumerate(self.kernels) if isinstance(k, Reduce)), None)
        return first is not None and first < len(self.kernels) - 1


def _grow(kernels: list[Kernel], limit: int) -> _Chain | None:
    """The longest chain of at most ``limit`` kernels at the start of ``kernels``: a
    reduction over the last axis or a whole-row kernel first."""
    k = kernels[0]
    if not isinstance(k, Reduce | Elementwise) or not k.shape:
        return None
    if not 2 <= k.shape[-1] <= MAX_LENGTH:
        return None
    chain = _Chain(tuple(k.shape[:-1]), k.shape[-1])
    for k in kernels[:limit]:
        if not chain.accept(k):
            break
    return chain if chain.kernels else None


def fuse_rows(s: Schedule, plan: MemoryPlan) -> tuple[list[Kernel], list[str]]:
    """The kernels of ``s`` with every row chain one ``RowChain``, and a log line per
    chain (for ``FERROGRAD_DEBUG``). A matmul's epilogue that the GEMM cannot take
    (``ptx_kernels.bias_epilogue``) runs as a kernel after it anyway, so it may start a
    chain (attention's scores scaled by 1/sqrt(d), then softmax)."""
    kernels: list[Kernel] = []
    whole: dict[int, Matmul] = {}  # index of a bare product -> the matmul it came from
    for k in s.kernels:
        if isinstance(k, Matmul) and k.epilogue is not None and bias_epilogue(k) is None:
            whole[len(kernels)] = k
            kernels += unfused(k)
        else:
            kernels.append(k)
    readers: dict[str, set[int]] = {}
    writers: dict[str, set[int]] = {}
    for i, k in enumerate(kernels):
        for v in k.reads():
            readers.setdefault(v.buffer, set()).add(i)
        for v in k.writes():
            writers.setdefault(v.buffer, set()).add(i)
    results = set(s.results.values())
    temps = plan.temps.get(s.entry, {})
    out: list[Kernel] = []
    log: list[str] = []
    i = 0
    while i < len(kernels):
        at = i + 1 if i in whole else i  # a bare product starts no chain; its epilogue may
        fused, why = _fuse_at(s, kernels, at, readers, writers, results, temps)
        log += why
        if fused is None:
            out.append(whole.get(i, kernels[i]))  # an epilogue not taken stays with its GEMM
            i += 2 if i in whole else 1
            continue
        if i in whole:
            out.append(kernels[i])
        out.append(fused)
        i = at + len(fused.kernels)
    return out, log


def _fuse_at(s: Schedule, kernels: list[Kernel], i: int, readers: dict[str, set[int]],
             writers: dict[str, set[int]], results: set[str], temps: dict[str, Placement]
             ) -> tuple[RowChain | None, list[str]]:
    """The row chain starting at kernel ``i``, if any, and the log: a chain whose stores
    would overwrite memory it still loads ends before the kernel writing that store."""
    log: list[str] = []
    limit = len(kernels) - i
    while True:
        chain = _grow(kernels[i:], limit)
        if chain is None or not chain.useful():
            return None, log
        inside = set(range(i, i + len(chain.kernels)))

        def needed(buf: str, inside: set[int] = inside) -> bool:
            return (s.buffers[buf].kind != "temp" or buf in results
                    or bool(readers.get(buf, set()) - inside)
                    or bool(writers.get(buf, set()) - inside))

        stores = [v for v in chain.written.values() if needed(v.buffer)]
        clash = _clash(stores, list(chain.loads), temps)
        if clash is None:
            break
        w, r = clash
        limit = next(n for n, k in enumerate(chain.kernels) if w in k.writes())
        log.append(f"row chain at {kernels[i].name}: {w.buffer} (stored) shares memory "
                   f"with {r.buffer} (loaded); the chain ends before its writer")
    first, last = chain.kernels[0], chain.kernels[-1]
    fused = RowChain(f"{first.name}_rows", [op for k in chain.kernels for op in k.ops],
                     chain.lead, chain.length, chain.kernels, list(chain.loads), stores)
    kept = sorted(b for b in chain.written if not needed(b))
    log.append(f"row chain {first.name} .. {last.name}: {len(chain.kernels)} kernels over "
               f"rows of {chain.length} -> {fused.name}; stores "
               f"{', '.join(v.buffer for v in stores) or 'nothing'}, keeps "
               f"{', '.join(kept) or 'nothing'} in registers only")
    return fused, log


def _clash(stores: list[View], loads: list[View], temps: dict[str, Placement]
           ) -> tuple[View, View] | None:
    """A stored view and a loaded one whose temps share memory in the plan (the plan
    lets a temp whose last reader is in the chain share memory with one written later
    in it), unless the store is in place: the same placement and the same whole-row
    view, so every element is loaded and then stored by one lane, in that order."""
    for w in stores:
        for r in loads:
            a, b = temps.get(w.buffer), temps.get(r.buffer)
            if a is None or b is None or w.dtype != r.dtype:
                continue
            if not (a.offset < b.offset + b.size and b.offset < a.offset + a.size):
                continue
            in_place = (a.offset == b.offset and not _is_row(w)
                        and (w.offset, w.shape, w.strides) == (r.offset, r.shape, r.strides))
            if not in_place:
                return w, r
    return None


# ---- rendering --------------------------------------------------------------------------


def row_chain(k: RowChain, dtypes: dict[str, str], fast_math: bool) -> list[Step]:
    """A warp per row (grid-stride over the rows), every kernel of the chain in order on
    the row's values in registers: see the module's docstring."""
    rows = math.prod(k.lead)
    length = k.length
    slots = math.ceil(length / WARP)
    views = list(dict.fromkeys([*k.loads, *k.stores]))
    _check_u32(k, rows * length, *(v.offset + v.size for v in views))
    buffers = kernel_buffers(k)
    f = _param_list(buffers)
    base = _pointers(f, buffers)
    em = ExprEmitter(f, fast_math)
    n = len(k.lead)
    heads = [View(v.buffer, v.dtype, v.offset, v.shape[:n], v.strides[:n]) for v in views]
    lead_sizes, lead_strides = collapse(k.lead, heads)
    head_of = dict(zip(views, lead_strides, strict=True))
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    warp = f.value("b32", "shr.u32", f.value("b32", "mad.lo.u32", ctaid, ntid, tid), "5")
    warps = f.value("b32", "shr.u32", f.value("b32", "mul.lo.u32", f.special("%nctaid.x"),
                                              ntid), "5")
    lane = f.value("b32", "and.b32", tid, "31")
    # the ragged last slot: lanes past the row's end load and store nothing, add nothing
    ragged = (f.value("pred", "setp.lt.u32", lane, str(length - (slots - 1) * WARP))
              if length % WARP else None)
    steps = {v.strides[-1] for v in views if not _is_row(v)}
    lane_at = {s: lane if s == 1 else f.value("b32", "mul.lo.u32", lane, str(s))
               for s in sorted(steps)}
    first = f.value("pred", "setp.eq.u32", lane, "0")  # stores the row values
    with f.loop(warp, str(rows), warps, "row") as row:
        r = _Row(f, row, lead_sizes, head_of, base, lane_at, slots, ragged, first)
        full: dict[str, list[str]] = {}  # a whole-row value: a register per slot
        one: dict[str, str] = {}  # a row value
        for kernel in k.kernels:
            inputs = kernel.inputs  # type: ignore[attr-defined]

            def bind(j: int | None, inputs: dict[str, View] = inputs) -> None:
                for sym, v in inputs.items():
                    kind = DTYPE_KIND[v.dtype]
                    if v.buffer in one:
                        em.bind(sym, one[v.buffer], kind)
                    elif v.buffer in full:
                        assert j is not None
                        em.bind(sym, full[v.buffer][j], kind)
                    elif _is_row(v):
                        em.bind(sym, r.load_row(v), kind)
                    else:
                        assert j is not None
                        em.bind(sym, r.load(v)[j], kind)

            if isinstance(kernel, Reduce):
                assert kernel.out is not None
                shared = cse([legalize(kernel.value, fast_math)])
                acc = f.value("f32", "mov.f32", REDUCE_IDENTITY[kernel.combine])
                for j in range(slots):
                    bind(j)
                    (x,) = em.emit_shared(shared, ["float"])
                    f.ins(REDUCE_OP[kernel.combine], acc, acc, em.register(x, "float"),
                          guard=r.guard(j))
                _warp_combine(f, acc, kernel.combine, WARP)
                one[kernel.out.buffer] = acc
                if kernel.out in k.stores:
                    r.store_row(kernel.out, acc)
                continue
            assert isinstance(kernel, Elementwise)
            shared = cse([legalize(e, fast_math) for _, e in kernel.outputs])
            out_kinds = [DTYPE_KIND[v.dtype] for v, _ in kernel.outputs]
            if not kernel.shape or (kernel.shape[-1] == 1 and length != 1):  # a row kernel
                bind(None)
                for (v, _), val, kind in zip(kernel.outputs, em.emit_shared(shared, out_kinds),
                                             out_kinds, strict=True):
                    reg = em.register(val, kind)
                    one[v.buffer] = reg
                    if v in k.stores:
                        r.store_row(v, reg)
                continue
            for v, _ in kernel.outputs:
                full[v.buffer] = []
            for j in range(slots):
                bind(j)
                values = em.emit_shared(shared, out_kinds)
                for (v, _), val, kind in zip(kernel.outputs, values, out_kinds, strict=True):
                    reg = em.register(val, kind)
                    full[v.buffer].append(reg)
                    if v in k.stores:
                        r.store(v, j, reg)
    block = min(BLOCK, WARP * rows)
    members = ", ".join(m.name for m in k.kernels)
    comment = (f"row chain (a warp per row of {length}, {slots} per lane): {members}; "
               f"stores {', '.join(v.buffer for v in k.stores) or 'nothing'}")
    return [KernelLaunch(k.name, comment, f.text("ENTRY"), [(b, 0) for b in buffers],
                         (_blocks(rows, block // WARP), 1, 1), (block, 1, 1))]


class _Row:
    """Loads and stores of one row: a view's address is computed once per row (its
    row's first element + this lane's), slot j then sits 32·j elements on."""

    def __init__(self, f: PtxFunction, row: str, lead_sizes: list[int],
                 head_of: dict[View, list[int]], base: dict[str, str], lane_at: dict[int, str],
                 slots: int, ragged: str | None, first: str) -> None:
        self.f, self.head_of, self.base, self.lane_at = f, head_of, base, lane_at
        self.slots, self.ragged, self.first = slots, ragged, first
        self.coords = Coords(f, row, lead_sizes)
        self.addresses: dict[tuple[View, bool], str] = {}
        self.loaded: dict[View, list[str]] = {}
        self.rows: dict[View, str] = {}

    def guard(self, j: int) -> str | None:
        return self.ragged if j == self.slots - 1 else None

    def _address(self, v: View, lane: bool) -> str:
        key = (v, lane)
        if key not in self.addresses:
            index = self.coords.index(self.head_of[v])
            if lane:
                at = self.lane_at[v.strides[-1]]
                index = at if index is None else self.f.value("b32", "add.u32", index, at)
            if index is None:
                self.addresses[key] = self.base[v.buffer]
            else:
                wide = self.f.value("b64", "mul.wide.u32", index, str(ITEMSIZE[v.dtype]))
                self.addresses[key] = self.f.value("b64", "add.s64", self.base[v.buffer], wide)
        return self.addresses[key]

    def _slot(self, v: View, j: int) -> str:
        offset = (v.offset + WARP * j * v.strides[-1]) * ITEMSIZE[v.dtype]
        return f"[{self._address(v, True)}+{offset}]"

    def load(self, v: View) -> list[str]:
        """The lane's elements of ``v`` in this row, a register per slot (all loads are
        issued before anything uses them)."""
        if v not in self.loaded:
            self.loaded[v] = [self.f.load(v.dtype, self._slot(v, j), self.guard(j))
                              for j in range(self.slots)]
        return self.loaded[v]

    def load_row(self, v: View) -> str:
        if v not in self.rows:
            addr = f"[{self._address(v, False)}+{v.offset * ITEMSIZE[v.dtype]}]"
            self.rows[v] = self.f.load(v.dtype, addr)
        return self.rows[v]

    def store(self, v: View, j: int, reg: str) -> None:
        self.f.store(v.dtype, self._slot(v, j), reg, self.guard(j))

    def store_row(self, v: View, reg: str) -> None:
        addr = f"[{self._address(v, False)}+{v.offset * ITEMSIZE[v.dtype]}]"
        self.f.store(v.dtype, addr, reg, self.first)
