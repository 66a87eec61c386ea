"""The memory plan: every temp buffer gets an offset in one arena per dtype.

Offsets come from liveness intervals over the kernel order: a buffer is live from
the first kernel that writes it to the last that reads it (results: to the end),
and buffers whose lifetimes do not overlap share memory (greedy first fit,
largest first). Params and optimizer state have their own contiguous arenas;
inputs are borrowed from the caller. All sizes are known here, so the peak is
reported before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kernel_ir import Buffer
from .schedule import Schedule

ALIGN = 16  # elements: 64 bytes for f32, one cache line


@dataclass
class Placement:
    offset: int
    size: int
    start: int
    end: int


@dataclass
class MemoryPlan:
    """Offsets of temps per schedule, arena sizes (elements) per dtype, persistent layout."""

    temps: dict[str, dict[str, Placement]] = field(default_factory=dict)  # entry -> buffer ->
    arena: dict[str, int] = field(default_factory=dict)  # dtype -> elements (max over entries)
    persistent: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # buf -> kind, off, n
    persistent_size: dict[str, int] = field(default_factory=dict)  # "param"/"state" -> elements
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)  # entry -> (buffers, reused)

    @property
    def peak_bytes(self) -> int:
        """Bytes of every arena together: temps (all dtypes), params and state."""
        temp = sum(n * _itemsize(d) for d, n in self.arena.items())
        return temp + 4 * sum(self.persistent_size.values())

    def summary(self) -> str:
        lines = [f"memory plan: peak {self.peak_bytes / 1e6:.2f} MB "
                 f"(params {self.persistent_size.get('param', 0) * 4 / 1e6:.2f} MB, "
                 f"optimizer state {self.persistent_size.get('state', 0) * 4 / 1e6:.2f} MB, "
                 "temps " + ", ".join(f"{d} {n * _itemsize(d) / 1e6:.2f} MB"
                                      for d, n in sorted(self.arena.items())) + ")"]
        for entry, (count, reused) in self.stats.items():
            lines.append(f"  {entry}: {count} temp buffers, {reused} reuse memory of another")
        return "\n".join(lines)


def _itemsize(dtype: str) -> int:
    return {"f32": 4, "i32": 4, "bool": 1, "f64": 8}[dtype]


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(schedules: list[Schedule], persistent: list[Buffer]) -> MemoryPlan:
    plan = MemoryPlan()
    for kind in ("param", "state"):
        offset = 0
        for buf in persistent:
            if buf.kind == kind:
                plan.persistent[buf.name] = (kind, offset, buf.size)
                offset += _round(buf.size)
        plan.persistent_size[kind] = offset
    for sched in schedules:
        placed = _place(sched)
        plan.temps[sched.entry] = placed
        for buf_name, p in placed.items():
            dtype = sched.buffers[buf_name].dtype
            plan.arena[dtype] = max(plan.arena.get(dtype, 0), p.offset + _round(p.size))
        reused = sum(1 for a in placed.values()
                     if any(b.start < a.start and _overlap(a, b) for b in placed.values()))
        plan.stats[sched.entry] = (len(placed), reused)
    return plan


def _overlap(a: Placement, b: Placement) -> bool:
    return a.offset < b.offset + b.size and b.offset < a.offset + a.size


def _place(sched: Schedule) -> dict[str, Placement]:
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for i, k in enumerate(sched.kernels):
        for v in k.writes():
            start.setdefault(v.buffer, i)
            end[v.buffer] = max(end.get(v.buffer, i), i)
        for v in k.reads():
            end[v.buffer] = max(end.get(v.buffer, i), i)
    for b in sched.results.values():
        end[b] = len(sched.kernels)
    temps = [b for b in sched.buffers.values() if b.kind == "temp" and b.name in start]
    placed: dict[str, Placement] = {}
    by_dtype: dict[str, list[Placement]] = {}
    for buf in sorted(temps, key=lambda b: (-b.size, start[b.name], b.name)):
        live = [p for p in by_dtype.get(buf.dtype, [])
                if p.start <= end[buf.name] and start[buf.name] <= p.end]
        offset = 0
        for p in sorted(live, key=lambda p: p.offset):
            if offset + buf.size <= p.offset:
                break
            offset = max(offset, _round(p.offset + p.size))
        placement = Placement(offset, buf.size, start[buf.name], end[buf.name])
        placed[buf.name] = placement
        by_dtype.setdefault(buf.dtype, []).append(placement)
    return placed
