"""Device launch plans: what a GPU backend's renderer hands its runtime.

A GPU renderer (PTX today, WGSL next) turns each entry point's kernel IR into
device code plus a ``DevicePlan``: the ordered list of steps to run, each a
kernel launch or a library GEMM, whose arguments name buffers the same way the
memory plan does. The runtime is generic: it allocates the arenas once, resolves
``BufferRef``s to device addresses, and replays the steps (for CUDA, captured
once into a CUDA graph). Nothing here is specific to one model; everything a
launch needs is computed from the kernel's sizes at render time.

Buffer addressing: ``BufferRef(arena, offset)`` in elements of the arena's
dtype. Arenas are "param", "state" (f32), "temp_f32", "temp_i32", "temp_bool"
(u8), "const_f32", "const_i32", "const_bool", and "input:<name>" for the inputs
of the step (copied to the device per call, or used in place when they already
live there). ``scratch_f32`` holds what the steps of one kernel pass each other —
split reductions' partials, convolutions' column matrices and per-image products —
written and read within those steps, so one arena, sized for the largest, serves
every kernel (columns a forward conv keeps for a later weight gradient are a temp of
the memory plan instead). ``flags_u32`` (one u32) is the error flag of gather / scatter kernels:
the runtime zeroes it before a step and, if it is nonzero after, raises (an id was
out of range; the kernels wrote 0 for it instead of reading out of bounds). The CUDA
runtime keeps it in pinned host memory mapped into the device. ``split_f32`` and
``split_u32`` are the generated GEMM kernels' split-K partial tiles and per-tile
counters (zero between launches: the last CTA of a tile resets its counter).
Const arenas start with ``DeviceModule.consts``.

Order: steps are listed in an order that is correct to run one after another, and
``DevicePlan.after`` says which earlier steps each one really waits for (the memory it
reads or writes, ``step_dependencies``), so that a runtime may run independent steps
at once (CUDA: branches of the step's graph). A runtime that ignores it runs the list
in order, which is always correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BufferRef:
    """An address: ``offset`` elements into ``arena``."""

    arena: str
    offset: int


@dataclass(frozen=True)
class ScalarArg:
    """A by-value kernel argument (``kind`` is "u32", "s32" or "f32")."""

    kind: str
    value: int | float


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel`` is the entry name in the module's device code."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[BufferRef | ScalarArg, ...]
    shared_bytes: int = 0


@dataclass(frozen=True)
class Gemm:
    """C[b] = alpha·(A[b] @ B[b]) + beta·C[b] for b in range(batch), all f32, row-major
    element strides: ``*_strides`` = (batch, row, col) with batch stride 0 for a
    broadcast operand. With beta 0, C is only written (as in BLAS); beta 1 accumulates
    into it (plain SGD's in-place ``W -= lr·dW``: alpha = -lr, C = W). A runtime uses
    a vendor library (cuBLAS; cuBLASLt with its bias epilogue) when present, else the
    fallback kernel ``fallback`` (a Launch over the same operands, epilogue and
    scaling included) that the renderer also emits."""

    batch: int
    m: int
    n: int
    k: int
    a: BufferRef
    a_strides: tuple[int, int, int]
    b: BufferRef
    b_strides: tuple[int, int, int]
    c: BufferRef
    c_strides: tuple[int, int, int]
    fallback: Launch | None = None
    bias: BufferRef | None = None  # C[b][i, j] += bias[j]: a contiguous vector of n
    relu: bool = False  # then C = max(C, 0) (only with a bias)
    # ``outer`` groups of ``batch`` products; group o's operands start o * outer_strides
    # elements on (two batch dims that no single stride describes: one step, not many)
    outer: int = 1
    outer_strides: tuple[int, int, int] = (0, 0, 0)
    alpha: float = 1.0  # f32 values
    beta: float = 0.0  # never nonzero with a bias
    # generated kernels for the same product (``ptx_gemm.py``, ``ptx_gemm_thin.py``)
    # that the runtime's autotuner times against the library's algorithms; split-K
    # ones use the ``split_f32`` (partial tiles) and ``split_u32`` (per-tile counters,
    # zero between launches) arenas
    tiled: tuple[Launch, ...] = ()


@dataclass
class DevicePlan:
    """Everything a GPU runtime needs for one entry point (train, forward or grads)."""

    entry: str
    steps: list[Launch | Gemm] = field(default_factory=list)
    # result key -> (arena, offset, shape): what comes back to the host after the steps
    results: dict[str, tuple[str, int, tuple[int, ...]]] = field(default_factory=dict)
    # per step, the earlier steps it must run after (``step_dependencies``); empty: the
    # renderer says nothing, and steps run in list order
    after: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class DeviceModule:
    """The device code of a model and the plan of each entry point."""

    source: str  # PTX text (or WGSL, one shader per kernel, joined)
    plans: dict[str, DevicePlan] = field(default_factory=dict)
    arena_sizes: dict[str, int] = field(default_factory=dict)  # arena -> elements
    consts: dict[str, bytes] = field(default_factory=dict)  # const arena -> its bytes (LE)
    # input arena -> n for inputs holding ids in [0, n) (class labels, embedding ids):
    # when one arrives in device memory, the runtime copies it in with a kernel that
    # checks them (PTX: ``fg_copy_ids_checked``)
    id_bounds: dict[str, int] = field(default_factory=dict)


# ---- which steps wait for which -----------------------------------------------------------


EVERY_ARENA = "*"  # a Span's arena that stands for all of them


@dataclass(frozen=True)
class Span:
    """Elements ``[start, stop)`` of ``arena`` (``EVERY_ARENA``: of every arena)."""

    arena: str
    start: int
    stop: int

    def overlaps(self, other: Span) -> bool:
        same = EVERY_ARENA in (self.arena, other.arena) or self.arena == other.arena
        return same and self.start < other.stop and other.start < self.stop


@dataclass
class Access:
    """The memory one step reads and writes (a step that reads and writes a span, an
    in-place update, lists it as written); ``chained``: it also waits for the step
    before it (the next of one kernel's steps)."""

    reads: list[Span] = field(default_factory=list)
    writes: list[Span] = field(default_factory=list)
    chained: bool = False


def everything() -> Access:
    """The access of a step whose memory is not known: it waits for every earlier step,
    and every later step waits for it."""
    return Access(writes=[Span(EVERY_ARENA, 0, 2**63)])


def _touch(a: list[Span], b: list[Span]) -> bool:
    return any(x.overlaps(y) for x in a for y in b)


def step_dependencies(accesses: list[Access]) -> list[tuple[int, ...]]:
    """For each step, the earlier steps it must wait for: those that write what it
    reads or writes, or read what it writes (read after write, write after write,
    write after read), and the one before a chained step. Edges implied through
    others are dropped (a transitive reduction): each step lists only its immediate
    predecessors."""
    ancestors: list[int] = []  # bit j of ancestors[i]: step i waits for j, maybe through others
    after: list[tuple[int, ...]] = []
    for i, step in enumerate(accesses):
        conflicts = [j for j in range(i) if _touch(accesses[j].writes, step.reads)
                     or _touch(accesses[j].writes, step.writes)
                     or _touch(accesses[j].reads, step.writes)
                     or (step.chained and j == i - 1)]
        covered, direct, reach = 0, [], 0
        for j in reversed(conflicts):  # a later step's ancestors cover earlier ones
            if not covered >> j & 1:
                direct.append(j)
                reach |= ancestors[j] | 1 << j
            covered |= ancestors[j]
        ancestors.append(reach)
        after.append(tuple(sorted(direct)))
    return after
