"""Horizontal merging (CUDA only): independent elementwise kernels run as one launch,
after scheduling and row chains, in the PTX renderer.

A training step ends with the optimizer's update, an elementwise kernel per parameter
(Adam: ``m``, ``v`` and the parameter, a few hundred to a few thousand floats for
biases and layer norms). Each is a launch of its own in the CUDA graph: about a
microsecond of gap and a tail where one block runs on one SM. ``merge_launches``
rewrites the kernel list of one schedule, replacing runs of independent elementwise
kernels by a ``Horizontal`` kernel (the generic schedule, which the CPU and WGSL
backends read, is unchanged), and ``horizontal`` renders it: one grid, the
concatenation of the members' grids — block b runs member i when b falls in member
i's range of blocks, with its block index taken from the start of that range and its
block count as the grid — each member keeping its own body, indexing, vectorization
and number of blocks; the block size is the largest any member would pick alone.
Every element is computed by the same instructions as unmerged (grid-stride loops do
not depend on how many threads there are), so the bits are the unmerged kernels'.

A run is taken only when it is safe, checked against the memory plan, where two
buffers are the same when their bytes overlap (temps that share arena memory, or one
name):

- no member writes a buffer another member reads or writes (within a member an
  in-place update is as it was);
- the run sits at its last member's position in the schedule and earlier members move
  down to it (``WINDOW`` kernels at most): a member joins only when it has no
  dependency on any kernel it moves past — it writes nothing that kernel reads or
  writes, and reads nothing that kernel writes. The plan's liveness is the old order's:
  a temp a moved kernel reads may be given, after its old position, to a kernel it
  moves past; the overlap check is what catches that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kernel_ir import Elementwise, Kernel, View
from ..memory import MemoryPlan
from ..schedule import Schedule
from .ptx_kernels import (
    KernelLaunch,
    Step,
    _block_for,
    _blocks,
    _param_list,
    _pointers,
    elementwise_body,
    elementwise_work,
    kernel_buffers,
)

WINDOW = 64  # kernels a member may move up past, at most
MAX_MEMBERS = 64  # members of one launch, at most (a compare and a branch each)


@dataclass
class Horizontal(Kernel):
    """Independent elementwise ``kernels``, run as one launch (blocks concatenated)."""

    kernels: list[Elementwise] = field(default_factory=list)

    kind = "horizontal"

    def reads(self) -> list[View]:
        return [v for k in self.kernels for v in k.reads()]

    def writes(self) -> list[View]:
        return [v for k in self.kernels for v in k.writes()]


# ---- finding runs -----------------------------------------------------------------------

Extent = tuple[str, int, float]  # (memory: an arena or a buffer's name, first, end)


class _Memory:
    """Where each buffer of a schedule lives, to tell whether two buffers overlap."""

    def __init__(self, s: Schedule, plan: MemoryPlan) -> None:
        self.s, self.plan = s, plan
        self.temps = plan.temps.get(s.entry, {})
        self.cache: dict[str, Extent] = {}

    def extent(self, name: str) -> Extent:
        if name not in self.cache:
            buf = self.s.buffers.get(name)
            at = self.temps.get(name)
            if buf is not None and at is not None:
                self.cache[name] = (f"temp_{buf.dtype}", at.offset, at.offset + at.size)
            elif name in self.plan.persistent:
                kind, offset, n = self.plan.persistent[name]
                self.cache[name] = (kind, offset, offset + n)
            else:  # inputs, consts, anything else: only the same name is the same memory
                self.cache[name] = (name, 0, math.inf)
        return self.cache[name]

    def extents(self, views: list[View]) -> list[Extent]:
        return list(dict.fromkeys(self.extent(v.buffer) for v in views))


def _overlap(xs: list[Extent], ys: list[Extent]) -> bool:
    return any(a == c and b < f and e < d for a, b, d in xs for c, e, f in ys)


@dataclass
class _Access:
    reads: list[Extent]
    writes: list[Extent]

    def conflicts(self, other: _Access) -> bool:
        """Whether the two cannot run in either order, or at once."""
        return (_overlap(self.writes, other.reads) or _overlap(self.writes, other.writes)
                or _overlap(self.reads, other.writes))


def _mergeable(k: Kernel) -> bool:
    return type(k) is Elementwise and bool(k.outputs)


def merge_launches(s: Schedule, plan: MemoryPlan, kernels: list[Kernel]
                   ) -> tuple[list[Kernel], list[str]]:
    """``kernels`` (the device kernels of ``s``) with runs of independent elementwise
    kernels one ``Horizontal`` each, and a log line per run (``FERROGRAD_DEBUG``).

    Runs grow from the end: a run sits where its last member was and earlier members
    move down to it, so the optimizer's updates (the last kernels, each ready as soon
    as its gradient is) gather into the run of the last update rather than being
    pulled up into some unrelated kernel's run in the middle of the backward pass."""
    mem = _Memory(s, plan)
    access = [_Access(mem.extents(k.reads()), mem.extents(k.writes())) for k in kernels]
    taken = [False] * len(kernels)
    out: list[Kernel] = []  # in reverse
    log: list[str] = []
    for i in range(len(kernels) - 1, -1, -1):
        k = kernels[i]
        if taken[i]:
            continue
        taken[i] = True
        if not _mergeable(k):
            out.append(k)
            continue
        members = [i]
        passed: list[int] = []  # kernels staying where they are, that members move past
        for j in range(i - 1, max(-1, i - 1 - WINDOW), -1):
            if taken[j]:
                continue
            if (len(members) < MAX_MEMBERS and _mergeable(kernels[j])
                    and not any(access[j].conflicts(access[m]) for m in members)
                    and not any(access[j].conflicts(access[p]) for p in passed)):
                members.append(j)
                taken[j] = True
            else:
                passed.append(j)
        if len(members) == 1:
            out.append(k)
            continue
        group = [kernels[m] for m in sorted(members)]
        assert all(isinstance(g, Elementwise) for g in group)
        moved = sum(1 for p in passed if p > min(members))
        out.append(Horizontal(f"{group[0].name}_x{len(group)}",
                              [op for g in group for op in g.ops], group))  # type: ignore[arg-type]
        log.append(f"one launch for {len(group)} elementwise kernels: "
                   f"{', '.join(g.name for g in group)}"
                   + (f" (moved past {moved} kernels)" if moved else ""))
    return out[::-1], log[::-1]


# ---- rendering --------------------------------------------------------------------------


def horizontal(k: Horizontal, dtypes: dict[str, str], fast_math: bool,
               aligned: frozenset[str] = frozenset()) -> list[Step]:
    """One kernel: member i on blocks [lo_i, lo_i + blocks_i), as unmerged on its own
    grid of ``blocks_i`` blocks (see the module's docstring)."""
    works = [elementwise_work(m, aligned) for m in k.kernels]
    block = max(_block_for(w) for w in works)
    counts = [_blocks(w, block) for w in works]
    buffers = kernel_buffers(k)
    f = _param_list(buffers)
    base = _pointers(f, buffers)
    ctaid = f.special("%ctaid.x")
    lo = 0
    parts = []
    for m, count in zip(k.kernels, counts, strict=True):
        skip = f.label("next")
        local = f.value("b32", "sub.u32", ctaid, str(lo)) if lo else ctaid
        p = f.reg("pred")
        f.ins("setp.ge.u32", p, local, str(count))  # below lo: wraps round, so >= too
        f.ins("bra", skip, guard=p)
        f.comment(f"{m.name}: blocks {lo} .. {lo + count - 1}")
        _, vector = elementwise_body(m, f, base, fast_math, aligned, local,
                                     f.value("b32", "mov.u32", str(count)))
        f.ins("ret")
        f.place(skip)
        parts.append(f"{m.name} ({count}{', v4' if vector else ''})")
        lo += count
    comment = f"{len(k.kernels)} elementwise kernels, one launch (blocks each): " + \
        ", ".join(parts)
    return [KernelLaunch(k.name, comment, f.text("ENTRY"), [(b, 0) for b in buffers],
                         (lo, 1, 1), (block, 1, 1))]
