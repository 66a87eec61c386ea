"""PTX kernels, one function per kernel kind: each writes its ``.entry`` (with the
name ``ENTRY``, filled in when the module is assembled) and says how to launch it.

Kinds:
- elementwise: a grid-stride loop over the flat index of the collapsed
  iteration space; each view's element index from the flat index by u32 div/mod
  only where its strides need it; loads that never move are hoisted. When every moving
  view is contiguous, 4-byte and 16-byte aligned (not consts), 4 elements per
  thread and step with ``ld/st.global.v4`` and a scalar tail for n % 4.
- reduce: a thread, a warp or a block (256 threads) per output row, by row
  length and layout (``reduce_mode``); a warp's or block's lane loads up to
  ``REDUCE_UNROLL`` of its elements before adding them (in order); warps combine with
  ``shfl.sync.bfly``, blocks through shared memory. Big column reductions (bias
  gradients: consecutive outputs read consecutive elements) split the rows into
  chunks: a thread per (column, chunk), partials in the ``scratch_f32`` arena, then a
  warp per column combines them, in an order fixed by the sizes (``_split_columns``). A few long
  rows (a conv's bias gradient, [n, c, h, w] over (0, 2, 3)) split the same way, a
  warp per (row, chunk) (``_split_rows``). Sums accumulate in f32, max starts at
  -inf (NaN propagates).
- matmul: a ``GemmStep`` (cuBLAS in the runtime) whose fallback launches the
  shared 16×16-tile shared-memory kernel ``fg_sgemm_16x16`` over the same
  operands (batch over grid z). A matmul with several non-collapsible batch dims
  becomes one GEMM per index of the outer ones. An epilogue that is a bias (and
  ReLU), or an in-place ``W = b·W + c·product`` (SGD's weight update, b < 1 with
  weight decay), runs inside the GEMM; any other runs as an elementwise kernel after
  it.
- gather / scatter-add: a thread per element; an id outside [0, rows) writes 0
  (gather) or is skipped (scatter), and sets the error flag, which the runtime
  checks after the step. Scatter zero-fills its output first (the shared
  ``fg_fill_zero_b32``) and adds with ``red.global.add.f32``.
- conv: gathers into the scratch arena and batched GEMM steps (``ptx_conv.py``).

Every launch configuration is computed from the kernel's sizes: blocks of 256
threads (fewer for small work), grids capped at 4096 blocks with grid-stride
loops covering the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp

from ferrograd.ir.errors import BackendError

from ..kernel_ir import (
    Elementwise,
    Gather,
    Kernel,
    Matmul,
    Reduce,
    View,
    row_major,
    unfused,
)
from ..launch_plan import ScalarArg
from .base import ReduceLayout, collapse, reduce_layout
from .legalize import legalize
from .ptx_asm import (
    DTYPE_KIND,
    ITEMSIZE,
    KIND_REGISTER,
    ExprEmitter,
    PtxFunction,
    shared_subexpressions,
)
from .ptx_gemm import tiled_candidates
from .ptx_gemm_thin import thin_candidates

BLOCK = 256  # threads per block, unless the work is smaller
MAX_BLOCKS = 4096  # grid-stride loops cover the rest
WARP = 32
FLAGS = "__flags"  # the buffer name of the error-flag arena
SCRATCH = "__scratch"  # the buffer name of the scratch arena (split reductions' partials)
REDUCE_IDENTITY = {"sum": "0f00000000", "max": "0fFF800000"}
REDUCE_OP = {"sum": "add.rn.f32", "max": "max.NaN.f32"}

Arg = tuple[str, int] | ScalarArg  # (buffer, element offset inside it) or a scalar


@dataclass
class KernelLaunch:
    """A kernel's code (entry name ``ENTRY``) and how to launch it."""

    name: str  # the entry name, if this code is the first of its kind
    comment: str
    text: str
    args: list[Arg]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    scratch: int = 0  # f32 elements of the scratch arena it uses (SCRATCH in ``args``)


@dataclass
class GemmStep:
    """C[z] = alpha·(A[z] @ B[z]) + beta·C[z], z < batch: operands as (buffer, element
    offset, (batch, row, col) strides), and the launch of the fallback kernel over the
    same operands. With beta 0, C is only written (whatever it held, NaN too)."""

    batch: int
    m: int
    n: int
    k: int
    operands: list[tuple[str, int, tuple[int, int, int]]]  # a, b, c: buffer, offset, strides
    fallback: KernelLaunch
    bias: tuple[str, int] | None = None  # C[z][i, j] += bias[j] (buffer, offset)
    relu: bool = False  # then C = max(C, 0)
    # A second batch level: ``outer`` groups of ``batch`` products, group o's operands
    # ``o * outer_strides`` elements on (attention's (batch, head) pairs: one step).
    outer: int = 1
    outer_strides: tuple[int, int, int] = (0, 0, 0)
    scratch: int = 0  # f32 elements of the scratch arena its operands reach
    alpha: float = 1.0
    beta: float = 0.0  # 1: accumulate into C (an in-place update)
    # generated kernels for the same product (``ptx_gemm.py``, ``ptx_gemm_thin.py``),
    # which the runtime's autotuner times against cuBLAS; split-K ones use the split
    # arenas' first ``split_partials`` f32 and ``split_tiles`` u32 elements
    tiled: list[KernelLaunch] = field(default_factory=list)
    split_partials: int = 0
    split_tiles: int = 0

    def __post_init__(self) -> None:
        if self.bias is not None and self.beta != 0:
            # cuBLASLt could, but nothing produces it: keep the runtime's paths few
            raise BackendError("a GEMM with a bias epilogue cannot also accumulate into C")


Step = KernelLaunch | GemmStep


def kernel_buffers(k: Kernel) -> list[str]:
    """The kernel's parameters, in order: the distinct buffers it only reads (in order
    of first read), then those it writes (in order of first write). A buffer both read
    and written (an in-place update) is passed once, among the written ones."""
    written = list(dict.fromkeys(v.buffer for v in k.writes()))
    read = [b for b in dict.fromkeys(v.buffer for v in k.reads()) if b not in written]
    return read + written


def _buffer_args(buffers: list[str]) -> list[Arg]:
    """Launch arguments: the address of each buffer's first element."""
    return [(b, 0) for b in buffers]


def _blocks(n: int, block: int) -> int:
    return max(1, min(math.ceil(n / block), MAX_BLOCKS))


def _block_for(n: int) -> int:
    return min(BLOCK, max(WARP, math.ceil(n / WARP) * WARP))


def _check_u32(k: Kernel, *sizes: int) -> None:
    if any(s >= 2**31 for s in sizes):
        raise BackendError(f"kernel {k.name}: more than 2^31 elements; the PTX backend "
                           "indexes with 32-bit integers")


def _param_list(buffers: list[str], extra: int = 0) -> PtxFunction:
    """A function taking a .u64 address per buffer (and ``extra`` more): p0, p1, ..."""
    return PtxFunction([(".u64", f"p{i}") for i in range(len(buffers) + extra)])


# ---- index arithmetic --------------------------------------------------------------------


class Coords:
    """Coordinates of a flat u32 index over ``sizes`` (row-major), computed once, on
    first need, with div/mod by constants."""

    def __init__(self, f: PtxFunction, flat: str, sizes: list[int]) -> None:
        self.f, self.flat, self.sizes = f, flat, sizes
        self._coords: list[str] | None = None

    def coords(self) -> list[str]:
        if self._coords is None:
            out = [""] * len(self.sizes)
            rest = self.flat
            for d in range(len(self.sizes) - 1, 0, -1):
                out[d] = self.f.value("b32", "rem.u32", rest, str(self.sizes[d]))
                rest = self.f.value("b32", "div.u32", rest, str(self.sizes[d]))
            if self.sizes:
                out[0] = rest
            self._coords = out
        return self._coords

    def index(self, strides: list[int]) -> str | None:
        """The element index ``sum(coord * stride)``; None when it is always 0."""
        if not any(strides):
            return None
        if list(strides) == list(row_major(tuple(self.sizes))):
            return self.flat
        acc: str | None = None
        for c, s in zip(self.coords(), strides, strict=True):
            if s == 0:
                continue
            if acc is None:
                acc = c if s == 1 else self.f.value("b32", "mul.lo.u32", c, str(s))
            else:
                acc = self.f.value("b32", "mad.lo.u32", c, str(s), acc)
        return acc


def _add_index(f: PtxFunction, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a if b is None else b
    return f.value("b32", "add.u32", a, b)


@contextlib.contextmanager
def _grid_stride(f: PtxFunction, n: int | str, hint: str = "elem") -> Iterator[str]:
    """Each thread visits flat indices tid, tid + threads, ... below ``n`` (a size, or
    the register of a ``.u32`` parameter)."""
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    start = f.value("b32", "mad.lo.u32", ctaid, ntid, tid)
    stride = f.value("b32", "mul.lo.u32", f.special("%nctaid.x"), ntid)
    with f.loop(start, str(n), stride, hint) as i:
        yield i


def _pointers(f: PtxFunction, buffers: list[str]) -> dict[str, str]:
    return {b: f.param_pointer(f"p{i}") for i, b in enumerate(buffers)}


# ---- elementwise ------------------------------------------------------------------------------


VECTOR = 4  # elements per thread and step of the vectorized elementwise loop (16 bytes)
VECTOR_DTYPES = {"f32": "f32", "i32": "b32"}  # 4-byte dtypes -> the type of their v4 access


def elementwise(k: Elementwise, dtypes: dict[str, str], fast_math: bool,
                aligned: frozenset[str] = frozenset()) -> list[Step]:
    """``aligned``: the buffers whose first element is 16-byte aligned on the device
    (params, state, temps, inputs; not consts). When every view the loop moves through
    is contiguous, 4-byte and 16-byte aligned in such a buffer, each thread handles 4
    consecutive elements per step with ``ld/st.global.v4`` (a scalar tail covers n % 4)."""
    buffers = kernel_buffers(k)
    f = _param_list(buffers)
    work, vector = elementwise_body(k, f, _pointers(f, buffers), fast_math, aligned)
    block = _block_for(work)
    return [KernelLaunch(k.name, elementwise_comment(k, vector), f.text("ENTRY"),
                         _buffer_args(buffers), (_blocks(work, block), 1, 1), (block, 1, 1))]


def elementwise_comment(k: Elementwise, vector: bool) -> str:
    return (f"elementwise{' (4 per thread, v4 loads)' if vector else ''}: "
            f"{', '.join(k.ops)} over {list(k.shape)}")


def _elementwise_layout(k: Elementwise, aligned: frozenset[str]
                        ) -> tuple[list[int], list[list[int]], int, bool]:
    """The collapsed sizes and strides (outputs first, then inputs), the element count
    and whether the loop runs 4 elements per step (see ``elementwise``)."""
    outs = [v for v, _ in k.outputs]
    sizes, strides = collapse(k.shape, outs + list(k.inputs.values()))
    n = int(np.prod(sizes)) if sizes else 1
    contiguous = list(row_major(tuple(sizes)))
    views = [(v, st) for v, st in zip(list(k.inputs.values()), strides[len(outs):], strict=True)
             if any(st)] + list(zip(outs, strides[:len(outs)], strict=True))
    vector = n >= VECTOR and all(
        v.dtype in VECTOR_DTYPES and list(st) == contiguous and v.offset % VECTOR == 0
        and v.buffer in aligned for v, st in views)
    return sizes, strides, n, vector


def elementwise_work(k: Elementwise, aligned: frozenset[str] = frozenset()) -> int:
    """What the threads of ``k``'s grid-stride loop share out: elements, or groups of 4."""
    _, _, n, vector = _elementwise_layout(k, aligned)
    return n // VECTOR if vector else n


def elementwise_body(k: Elementwise, f: PtxFunction, base: dict[str, str], fast_math: bool,
                     aligned: frozenset[str] = frozenset(), block: str | None = None,
                     blocks: str | None = None) -> tuple[int, bool]:
    """Emit ``k``'s grid-stride loop into ``f`` (``base``: buffer -> address register);
    the block index and the block count are ``%ctaid.x`` and ``%nctaid.x`` unless
    ``block`` and ``blocks`` (registers) say otherwise (``ptx_horizontal``: one launch
    running several kernels, each on a range of its blocks). The work (elements, or
    groups of 4) and whether it is vectorized."""
    outs = [v for v, _ in k.outputs]
    sizes, strides, n, vector = _elementwise_layout(k, aligned)
    _check_u32(k, n, *(b for b in (max(v.offset + v.size, 1) for v in outs)))
    em = ExprEmitter(f, fast_math)
    in_strides = strides[len(outs):]
    moving = []
    for (sym, v), st in zip(k.inputs.items(), in_strides, strict=True):
        if any(st):
            moving.append((sym, v, st))
        else:  # the same element for every index: load it once
            em.bind(sym, f.load(v.dtype, f.address(base[v.buffer], None, v.offset,
                                                   ITEMSIZE[v.dtype])), DTYPE_KIND[v.dtype])
    exprs = [legalize(e, fast_math) for _, e in k.outputs]
    kinds = [DTYPE_KIND[v.dtype] for v in outs]
    out_strides = strides[:len(outs)]
    ctaid = block if block is not None else f.special("%ctaid.x")
    ntid, tid = (f.special(s) for s in ("%ntid.x", "%tid.x"))
    start = f.value("b32", "mad.lo.u32", ctaid, ntid, tid)
    step = f.value("b32", "mul.lo.u32", blocks if blocks is not None else
                   f.special("%nctaid.x"), ntid)
    quads = n // VECTOR if vector else 0
    if vector:
        _vector_loop(f, em, base, quads, moving, outs, exprs, kinds, start, step)
        if n % VECTOR:
            start = f.value("b32", "add.u32", start, str(quads * VECTOR))
    if n > quads * VECTOR:
        with f.loop(start, str(n), step, "elem") as i:
            coords = Coords(f, i, sizes)
            for sym, v, st in moving:
                addr = f.address(base[v.buffer], coords.index(st), v.offset, ITEMSIZE[v.dtype])
                em.bind(sym, f.load(v.dtype, addr), DTYPE_KIND[v.dtype])
            values = em.emit_all(exprs, kinds)
            for v, st, val, kind in zip(outs, out_strides, values, kinds, strict=True):
                addr = f.address(base[v.buffer], coords.index(st), v.offset, ITEMSIZE[v.dtype])
                f.store(v.dtype, addr, em.register(val, kind))
    return (quads if vector else n), vector


def _vector_loop(f: PtxFunction, em: ExprEmitter, base: dict[str, str], quads: int,
                 moving: list[tuple[Any, View, list[int]]], outs: list[View], exprs: list[Any],
                 kinds: list[str], start: str, step: str) -> None:
    """Grid-stride over ``quads`` groups of 4 contiguous elements: one v4 load per moving
    input, the expressions 4 times over (registers unrolled), one v4 store per output."""
    shared = shared_subexpressions(exprs)
    with f.loop(start, str(quads), step, "quad") as q:
        wide = f.value("b64", "mul.wide.u32", q, str(VECTOR * 4))
        addrs: dict[str, str] = {}

        def address(v: View) -> str:
            if v.buffer not in addrs:
                addrs[v.buffer] = f.value("b64", "add.s64", base[v.buffer], wide)
            return f"[{addrs[v.buffer]}+{v.offset * 4}]"

        lanes: dict[Any, list[str]] = {}
        for sym, v, _ in moving:
            kind = DTYPE_KIND[v.dtype]
            regs = [f.reg(KIND_REGISTER[kind]) for _ in range(VECTOR)]
            f.ins(f"ld.global.v4.{VECTOR_DTYPES[v.dtype]}", "{" + ", ".join(regs) + "}",
                  address(v))
            lanes[sym] = regs
        results: list[list[str]] = [[] for _ in outs]
        for lane in range(VECTOR):
            for sym, v, _ in moving:
                em.bind(sym, lanes[sym][lane], DTYPE_KIND[v.dtype])
            values = em.emit_shared(shared, kinds)
            for out, val, kind in zip(results, values, kinds, strict=True):
                reg = em.register(val, kind)
                if reg in out:  # a vector's registers must differ
                    reg = f.value(KIND_REGISTER[kind], "mov.b32", reg)
                out.append(reg)
        for v, regs in zip(outs, results, strict=True):
            f.ins(f"st.global.v4.{VECTOR_DTYPES[v.dtype]}", address(v),
                  "{" + ", ".join(regs) + "}")


# ---- reduce ---------------------------------------------------------------------------------


def _head(v: View, n: int) -> View:
    return View(v.buffer, v.dtype, v.offset, v.shape[:n], v.strides[:n])


# Column reductions (sum over the rows of a [length, rows] matrix: bias gradients) split
# into chunks of rows once the matrix holds this many elements (1 MiB of f32; below it a
# second launch costs more than the bytes); chunks of at least COLUMN_CHUNK rows, enough of
# them for about COLUMN_BLOCKS blocks of up to COLUMN_BLOCK threads (8 blocks, ~1000
# threads per SM of an H200's 132), each with COLUMN_UNROLL loads in flight: ~4 MB in
# flight over the chip, what HBM3e's bandwidth × latency asks for.
COLUMN_SPLIT = 1 << 18
COLUMN_CHUNK = 32
COLUMN_BLOCK = 128
COLUMN_BLOCKS = 1024
COLUMN_UNROLL = 8
REDUCE_UNROLL = 8  # elements a lane loads before adding them (warp and block rows)
# Long rows (> 2048 elements), fewer than ROW_SPLIT_ROWS of them (a block per row would
# leave SMs idle: the CNN's conv bias gradients are 16 and 32 rows of 200 K and 50 K),
# split the same way once they hold COLUMN_SPLIT elements: a warp per (row, chunk),
# about ROW_WARPS warps in all (31 per SM), COLUMN_UNROLL loads in flight per lane.
ROW_SPLIT_ROWS = 512
ROW_WARPS = 4096


def reduce_mode(rows: int, length: int, strides: list[list[int]], columns: bool = False) -> str:
    """Who reduces one row: a "thread" (short rows, or many rows whose elements are
    not adjacent: neighbouring threads then read neighbouring rows), a "warp"
    (rows up to 2048), or a "block" of 256 threads. ``columns``: neighbouring rows'
    elements are adjacent in memory (a column reduction, ``column_layout``); a big one
    is "split": a thread per row over a chunk of its elements, then a combine pass.
    A few long rows are "split_rows": a warp per chunk of a row, then the same combine."""
    adjacent = all(not s or s[-1] in (0, 1) for s in strides)
    if (columns and not adjacent and length >= 2 * COLUMN_CHUNK
            and rows * length >= COLUMN_SPLIT):
        return "split"
    if length <= WARP or (rows >= 2048 and not adjacent):
        return "thread"
    if length <= 2048:
        return "warp"
    return "split_rows" if rows < ROW_SPLIT_ROWS and rows * length >= COLUMN_SPLIT else "block"


def column_layout(ksizes: list[int], kstrides: list[list[int]], rstrides: list[list[int]]
                  ) -> bool:
    """Whether consecutive output rows read consecutive elements: every input that moves
    along the reduction is row-major over the kept dims (or the same for all of them),
    and one at least is not the same for all."""
    contiguous = list(row_major(tuple(ksizes)))
    moving = [ks for ks, rs in zip(kstrides, rstrides, strict=True) if any(rs)]
    return (bool(moving) and all(list(ks) == contiguous or not any(ks) for ks in moving)
            and any(any(ks) for ks in moving))


def column_chunks(rows: int, length: int) -> tuple[int, int, int]:
    """(threads per block, chunks, rows per chunk) of a split column reduction: a thread
    per column, blocks over the columns (x) and the chunks (y); a chunk's length is a
    multiple of the unroll, so only the last chunk has a ragged end."""
    block = min(COLUMN_BLOCK, _block_for(rows))
    across = math.ceil(rows / block)
    chunks = max(1, min(math.ceil(COLUMN_BLOCKS / across), length // COLUMN_CHUNK))
    per = math.ceil(math.ceil(length / chunks) / COLUMN_UNROLL) * COLUMN_UNROLL
    return block, math.ceil(length / per), per


def row_chunks(rows: int, length: int) -> tuple[int, int]:
    """(chunks per row, elements per chunk) of a split row reduction: about ROW_WARPS
    warps in all; a chunk is a multiple of WARP·COLUMN_UNROLL elements, so only the last
    chunk of a row has a ragged end."""
    group = WARP * COLUMN_UNROLL
    chunks = max(1, min(math.ceil(ROW_WARPS / rows), length // group))
    per = math.ceil(math.ceil(length / chunks) / group) * group
    return math.ceil(length / per), per


def reduce(k: Reduce, dtypes: dict[str, str], fast_math: bool) -> list[Step]:
    assert k.out is not None
    if k.out.dtype != "f32" or not k.out.contiguous:
        raise BackendError(f"kernel {k.name}: reductions write contiguous f32")
    lay = reduce_layout(k)
    ksizes, kstrides = lay.kept_sizes, lay.kept_strides
    rsizes, rstrides = lay.reduced_sizes, lay.reduced_strides
    rows, length = lay.rows, lay.length
    _check_u32(k, rows * length)
    mode = reduce_mode(rows, length, rstrides, column_layout(ksizes, kstrides, rstrides))
    if mode == "split":
        return _split_columns(k, fast_math)
    if mode == "split_rows":
        return _split_rows(k, fast_math)
    buffers = kernel_buffers(k)
    f = _param_list(buffers)
    base = _pointers(f, buffers)
    em = ExprEmitter(f, fast_math)
    value = legalize(k.value, fast_math)
    tid, ntid = f.special("%tid.x"), f.special("%ntid.x")
    ctaid, nctaid = f.special("%ctaid.x"), f.special("%nctaid.x")
    if mode == "block":
        first_row, row_step, lane, lanes = ctaid, nctaid, tid, ntid
        f.shared.append(f".shared .align 4 .b8 partial[{4 * BLOCK // WARP}];")
    else:
        thread = f.value("b32", "mad.lo.u32", ctaid, ntid, tid)
        threads = f.value("b32", "mul.lo.u32", nctaid, ntid)
        if mode == "thread":
            first_row, row_step, lane, lanes = thread, threads, "0", "1"
        else:
            first_row = f.value("b32", "shr.u32", thread, "5")
            row_step = f.value("b32", "shr.u32", threads, "5")
            lane, lanes = f.value("b32", "and.b32", tid, "31"), str(WARP)
    items = list(zip(k.inputs.items(), kstrides, rstrides, strict=True))
    with f.loop(first_row, str(rows), row_step, "row") as row:
        kc = Coords(f, row, ksizes)
        row_index = {sym: kc.index(ks) for (sym, _), ks, _ in items}
        for (sym, v), _, rs in items:
            if not any(rs):  # constant along the row: load once per row
                em.bind(sym, f.load(v.dtype, f.address(base[v.buffer], row_index[sym], v.offset,
                                                       ITEMSIZE[v.dtype])), DTYPE_KIND[v.dtype])
        acc = f.value("f32", "mov.f32", REDUCE_IDENTITY[k.combine])
        # A lane's elements r, r + lanes, ...: ``unroll`` of them loaded before any is
        # added (the loads in flight together), added in the same order as one by one.
        per_lane = math.ceil(length / (BLOCK if mode == "block" else WARP))
        unroll = 1 if mode == "thread" else min(REDUCE_UNROLL, per_lane)
        if unroll == 1:
            stride = lanes
        elif mode == "warp":
            stride = str(WARP * unroll)
        else:
            stride = f.value("b32", "mul.lo.u32", lanes, str(unroll))
        with f.loop(lane, str(length), stride, "red") as r:
            loaded = []
            for u in range(unroll):
                at = r if u == 0 else (f.value("b32", "add.u32", r, str(WARP * u))
                                       if mode == "warp"
                                       else f.value("b32", "mad.lo.u32", lanes, str(u), r))
                inside = None if u == 0 else f.value("pred", "setp.lt.u32", at, str(length))
                rc = Coords(f, at, rsizes)
                loaded.append((inside, {sym: f.load(v.dtype, f.address(
                    base[v.buffer], _add_index(f, row_index[sym], rc.index(rs)), v.offset,
                    ITEMSIZE[v.dtype]), inside) for (sym, v), _, rs in items if any(rs)}))
            for inside, regs in loaded:
                for (sym, v), _, _ in items:
                    if sym in regs:
                        em.bind(sym, regs[sym], DTYPE_KIND[v.dtype])
                (x,) = em.emit_all([value], ["float"])
                f.ins(REDUCE_OP[k.combine], acc, acc, em.register(x, "float"), guard=inside)
        if mode != "thread":
            _warp_combine(f, acc, k.combine, WARP)
        if mode == "block":
            acc = _block_combine(f, acc, k.combine, tid)
        out = k.out
        addr = f.address(base[out.buffer], row, out.offset, 4)
        if mode == "thread":
            f.ins("st.global.f32", addr, acc)
        else:
            first = f.value("pred", "setp.eq.u32", lane, "0")
            f.ins("st.global.f32", addr, acc, guard=first)
        if mode == "block":
            f.ins("bar.sync", "0")  # the next row reuses the shared partials
    if mode == "block":
        block, grid = BLOCK, max(1, min(rows, MAX_BLOCKS))
    elif mode == "warp":
        block = min(BLOCK, WARP * rows)
        grid = _blocks(rows, block // WARP)
    else:
        block = _block_for(rows)
        grid = _blocks(rows, block)
    comment = (f"reduce ({k.combine}, a {mode} per row): {', '.join(k.ops)} over "
               f"{list(k.shape)}, axes {list(k.axes)}")
    return [KernelLaunch(k.name, comment, f.text("ENTRY"), _buffer_args(buffers),
                         (grid, 1, 1), (block, 1, 1))]


Loads = dict[Any, str]  # input symbol -> register holding its loaded value


def _accumulator(f: PtxFunction, em: ExprEmitter, k: Reduce, lay: ReduceLayout,
                 base: dict[str, str], shared: Any, kept: Coords
                 ) -> tuple[str, Callable[[str], Loads], Callable[[Loads], None]]:
    """One output's accumulator in a split reduction, at kept coordinates ``kept``:
    inputs constant along the reduced dims are loaded once here; ``loads(r)`` issues
    the other inputs' loads at reduced index ``r`` (so several can be in flight) and
    ``accumulate(regs)`` folds one element into ``acc``, in call order."""
    items = list(zip(k.inputs.items(), lay.kept_strides, lay.reduced_strides, strict=True))
    kept_index = {sym: kept.index(ks) for (sym, _), ks, _ in items}
    for (sym, v), _, rs in items:
        if not any(rs):
            em.bind(sym, f.load(v.dtype, f.address(base[v.buffer], kept_index[sym], v.offset,
                                                   ITEMSIZE[v.dtype])), DTYPE_KIND[v.dtype])
    moving = [(sym, v, rs) for (sym, v), _, rs in items if any(rs)]
    acc = f.value("f32", "mov.f32", REDUCE_IDENTITY[k.combine])

    def loads(r: str) -> dict[Any, str]:
        rc = Coords(f, r, lay.reduced_sizes)
        return {sym: f.load(v.dtype, f.address(base[v.buffer], _add_index(
            f, kept_index[sym], rc.index(rs)), v.offset, ITEMSIZE[v.dtype]))
            for sym, v, rs in moving}

    def accumulate(regs: dict[Any, str]) -> None:
        for sym, v, _ in moving:
            em.bind(sym, regs[sym], DTYPE_KIND[v.dtype])
        (x,) = em.emit_shared(shared, ["float"])
        f.ins(REDUCE_OP[k.combine], acc, acc, em.register(x, "float"))

    return acc, loads, accumulate


def _split_columns(k: Reduce, fast_math: bool) -> list[Step]:
    """A column reduction (``reduce_mode`` "split") in two launches, so that a few
    thousand columns still fill the GPU and every load is coalesced.

    1. Thread (column c, chunk j) — blocks over the columns in x, the chunks in y —
       reduces rows [j·per, min((j+1)·per, length)) of column c in row order into
       ``partial[j·cols + c]`` of the scratch arena: consecutive threads read and write
       consecutive elements; COLUMN_UNROLL loads are issued before their (in-order) adds.
    2. A warp per column combines its chunks: lane l takes chunks l, l + 32, ... in
       order, then the warp's butterfly; lane 0 writes.

    The order of every f32 operation follows from the sizes alone, never from
    scheduling: the same inputs give the same bits on every run (no float atomics)."""
    assert k.out is not None
    lay = reduce_layout(k)
    ksizes, cols, length = lay.kept_sizes, lay.rows, lay.length
    block, chunks, per = column_chunks(cols, length)
    _check_u32(k, chunks * cols, chunks * per)
    split = chunks > 1  # else one launch, straight into the output
    buffers = kernel_buffers(k)
    f = _param_list(buffers, extra=int(split))  # then the scratch arena
    base = _pointers(f, buffers)
    em = ExprEmitter(f, fast_math)
    shared = shared_subexpressions([legalize(k.value, fast_math)])
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    col = f.value("b32", "mad.lo.u32", ctaid, ntid, tid)
    done = f.label("done")
    f.ins("bra", done, guard=f.value("pred", "setp.ge.u32", col, str(cols)))
    chunk = f.special("%ctaid.y")
    first = f.value("b32", "mul.lo.u32", chunk, str(per))
    end = f.value("b32", "min.u32", f.value("b32", "add.u32", first, str(per)), str(length))
    whole = f.value("b32", "and.b32", f.value("b32", "sub.u32", end, first),
                    f"0x{-COLUMN_UNROLL & 0xFFFFFFFF:08X}")
    unrolled_end = f.value("b32", "add.u32", first, whole)
    acc, loads, accumulate = _accumulator(f, em, k, lay, base, shared, Coords(f, col, ksizes))

    with f.loop(first, unrolled_end, str(COLUMN_UNROLL), "rows") as r:
        group = [loads(r if j == 0 else f.value("b32", "add.u32", r, str(j)))
                 for j in range(COLUMN_UNROLL)]  # all loads in flight, then the adds in order
        for regs in group:
            accumulate(regs)
    with f.loop(unrolled_end, end, "1", "tail") as r:
        accumulate(loads(r))
    out = k.out
    if split:
        scratch = f.param_pointer(f"p{len(buffers)}")
        at = f.value("b32", "mad.lo.u32", chunk, str(cols), col)
        f.ins("st.global.f32", f.address(scratch, at, 0, 4), acc)
    else:
        f.ins("st.global.f32", f.address(base[out.buffer], col, out.offset, 4), acc)
    f.place(done)
    what = f"{', '.join(k.ops)} over {list(k.shape)}, axes {list(k.axes)}"
    first_pass = KernelLaunch(
        k.name, f"reduce ({k.combine}, a thread per column and chunk of {per} rows): {what}",
        f.text("ENTRY"), _buffer_args(buffers) + ([(SCRATCH, 0)] if split else []),
        (math.ceil(cols / block), chunks, 1), (block, 1, 1), chunks * cols if split else 0)
    return [first_pass, _combine_chunks(k, cols, chunks)] if split else [first_pass]


def _split_rows(k: Reduce, fast_math: bool) -> list[Step]:
    """A few long rows (``reduce_mode`` "split_rows") in two launches: warp w reduces
    chunk j = w mod chunks of row w div chunks — lane l elements l, l + 32, ... of the
    chunk in order, COLUMN_UNROLL loads issued before their adds, then the butterfly —
    into ``partial[j·rows + row]`` of the scratch arena; then ``_combine_chunks``. As
    for columns, the order of every f32 operation follows from the sizes alone."""
    assert k.out is not None
    lay = reduce_layout(k)
    rows, length = lay.rows, lay.length
    chunks, per = row_chunks(rows, length)
    assert chunks > 1
    warps = rows * chunks
    _check_u32(k, warps * WARP, chunks * per)
    buffers = kernel_buffers(k)
    f = _param_list(buffers, extra=1)  # then the scratch arena
    base = _pointers(f, buffers)
    em = ExprEmitter(f, fast_math)
    shared = shared_subexpressions([legalize(k.value, fast_math)])
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    warp = f.value("b32", "shr.u32", f.value("b32", "mad.lo.u32", ctaid, ntid, tid), "5")
    lane = f.value("b32", "and.b32", tid, "31")
    done = f.label("done")
    f.ins("bra", done, guard=f.value("pred", "setp.ge.u32", warp, str(warps)))  # whole warps
    row = f.value("b32", "div.u32", warp, str(chunks))
    chunk = f.value("b32", "rem.u32", warp, str(chunks))
    first = f.value("b32", "mul.lo.u32", chunk, str(per))
    end = f.value("b32", "min.u32", f.value("b32", "add.u32", first, str(per)), str(length))
    group = WARP * COLUMN_UNROLL
    whole = f.value("b32", "and.b32", f.value("b32", "sub.u32", end, first),
                    f"0x{-group & 0xFFFFFFFF:08X}")
    unrolled_end = f.value("b32", "add.u32", first, whole)
    acc, loads, accumulate = _accumulator(f, em, k, lay, base, shared,
                                          Coords(f, row, lay.kept_sizes))

    start = f.value("b32", "add.u32", first, lane)
    with f.loop(start, unrolled_end, str(group), "elems") as r:
        batch = [loads(r if j == 0 else f.value("b32", "add.u32", r, str(WARP * j)))
                 for j in range(COLUMN_UNROLL)]  # all loads in flight, then the adds in order
        for regs in batch:
            accumulate(regs)
    with f.loop(f.value("b32", "add.u32", unrolled_end, lane), end, str(WARP), "tail") as r:
        accumulate(loads(r))
    _warp_combine(f, acc, k.combine, WARP)
    scratch = f.param_pointer(f"p{len(buffers)}")
    at = f.value("b32", "mad.lo.u32", chunk, str(rows), row)
    f.ins("st.global.f32", f.address(scratch, at, 0, 4), acc,
          guard=f.value("pred", "setp.eq.u32", lane, "0"))
    f.place(done)
    what = f"{', '.join(k.ops)} over {list(k.shape)}, axes {list(k.axes)}"
    block = COLUMN_BLOCK
    first_pass = KernelLaunch(
        k.name, f"reduce ({k.combine}, a warp per row and chunk of {per} elements): {what}",
        f.text("ENTRY"), [*_buffer_args(buffers), (SCRATCH, 0)],
        (math.ceil(warps * WARP / block), 1, 1), (block, 1, 1), warps)
    return [first_pass, _combine_chunks(k, rows, chunks)]


def _combine_chunks(k: Reduce, cols: int, chunks: int) -> KernelLaunch:
    """The second launch of ``_split_columns``: a warp per column over its chunks'
    partials (lane l: chunks l, l + 32, ... in order), then the butterfly."""
    assert k.out is not None
    f = _param_list([SCRATCH, k.out.buffer])
    scratch, out = f.param_pointer("p0"), f.param_pointer("p1")
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    warp = f.value("b32", "shr.u32", f.value("b32", "mad.lo.u32", ctaid, ntid, tid), "5")
    warps = f.value("b32", "shr.u32", f.value("b32", "mul.lo.u32", f.special("%nctaid.x"),
                                              ntid), "5")
    lane = f.value("b32", "and.b32", tid, "31")
    with f.loop(warp, str(cols), warps, "col") as c:
        acc = f.value("f32", "mov.f32", REDUCE_IDENTITY[k.combine])
        with f.loop(lane, str(chunks), str(WARP), "chunk") as j:
            at = f.value("b32", "mad.lo.u32", j, str(cols), c)
            f.ins(REDUCE_OP[k.combine], acc, acc, f.load("f32", f.address(scratch, at, 0, 4)))
        _warp_combine(f, acc, k.combine, WARP)
        f.ins("st.global.f32", f.address(out, c, k.out.offset, 4), acc,
              guard=f.value("pred", "setp.eq.u32", lane, "0"))
    block = min(BLOCK, WARP * cols)
    return KernelLaunch(f"{k.name}_combine",
                        f"reduce ({k.combine}): combine {chunks} chunks of {cols} columns",
                        f.text("ENTRY"), [(SCRATCH, 0), (k.out.buffer, 0)],
                        (_blocks(cols, block // WARP), 1, 1), (block, 1, 1), chunks * cols)


def _warp_combine(f: PtxFunction, acc: str, combine: str, width: int) -> None:
    """Butterfly over ``width`` lanes: every lane ends with the combined value."""
    f.butterfly(acc, REDUCE_OP[combine], width)


def _block_combine(f: PtxFunction, acc: str, combine: str, tid: str) -> str:
    """Combine the warps' values through shared memory; thread 0 ends with the total."""
    warps = BLOCK // WARP
    lane = f.value("b32", "and.b32", tid, "31")
    warp = f.value("b32", "shr.u32", tid, "5")
    smem = f.value("b32", "mov.u32", "partial")
    first = f.value("pred", "setp.eq.u32", lane, "0")
    f.ins("st.shared.f32", f"[{f.value('b32', 'mad.lo.u32', warp, '4', smem)}]", acc,
          guard=first)
    f.ins("bar.sync", "0")
    total = f.value("f32", "mov.f32", REDUCE_IDENTITY[combine])
    has = f.value("pred", "setp.lt.u32", tid, str(warps))
    f.ins("ld.shared.f32", total, f"[{f.value('b32', 'mad.lo.u32', tid, '4', smem)}]",
          guard=has)
    _warp_combine(f, total, combine, warps)
    return total


# ---- matmul -----------------------------------------------------------------------------------

SGEMM = "fg_sgemm_16x16"
TILE = 16


def matrix_strides(rows: int, cols: int, rs: int, cs: int) -> tuple[int, int]:
    """Strides a BLAS accepts for a matrix whose size-1 dims have stride 0 in the IR
    (any value is right for them): a unit stride in one dim, a leading dim >= 1."""
    if cols == 1:
        cs = rows if rs == 1 else 1
    if rows == 1:
        rs = cols if cs == 1 else 1
    return rs, cs


def matmul(k: Matmul, dtypes: dict[str, str], fast_math: bool,
           aligned: frozenset[str] = frozenset()) -> list[Step]:
    """The GEMM steps of a product; with an epilogue, a bias (and ReLU) it starts with
    goes into the GEMM itself (cuBLASLt's epilogue, or the fallback kernel's), and
    what is left runs as an elementwise kernel after it — or not at all when the
    GEMM can write the epilogue's one output directly. An in-place update
    ``X = X + c·product`` is the GEMM's accumulation: C = c·(A @ B) + 1·X."""
    if k.epilogue is None:
        return _gemm_steps(k, k.out)
    update = accumulate_epilogue(k)
    if update is not None:  # the product never goes through memory
        target, alpha, beta = update
        return _gemm_steps(k, target, alpha=alpha, beta=beta)
    split = bias_epilogue(k)
    if split is None:
        bare, rest = unfused(k)
        assert isinstance(bare, Matmul) and isinstance(rest, Elementwise)
        return _gemm_steps(bare, bare.out) + elementwise(rest, dtypes, fast_math, aligned)
    bias, rest = split
    direct = _direct_output(rest, k)
    if direct is not None:  # the GEMM writes the epilogue's output: nothing is left
        return _gemm_steps(k, direct, bias, _is_relu(rest))
    return _gemm_steps(k, k.out, bias) + elementwise(rest, dtypes, fast_math, aligned)


def bias_epilogue(k: Matmul) -> tuple[tuple[str, int], Elementwise] | None:
    """Whether the epilogue adds a per-column bias to the product everywhere it reads
    it: ``e(p) = e'(p + bias[j])``. Returns the bias (buffer, offset) and the epilogue
    ``e'`` over the biased product; None when no input fits."""
    e, p = k.epilogue, k.product_symbol()
    assert e is not None and p is not None
    product = next((s for out in e.outputs for s in out[1].free_symbols if s.name == p), None)
    if product is None:  # the product is not read after all (a test of its shape, say)
        return None
    for name, v in e.inputs.items():
        if name == p or v.dtype != "f32" or any(v.strides[:-1]) or v.strides[-1] not in (0, 1):
            continue
        if v.strides[-1] == 0 and e.shape[-1] != 1:
            continue  # a scalar broadcast, not a vector along columns
        bias = next((s for out in e.outputs for s in out[1].free_symbols if s.name == name),
                    None)
        if bias is None:
            continue
        rest = [(o, expr.xreplace({product: product - bias})) for o, expr in e.outputs]
        if any(bias in expr.free_symbols for _, expr in rest):
            continue
        inputs = {s: w for s, w in e.inputs.items() if s != name}
        return ((v.buffer, v.offset),
                dataclasses.replace(e, name=f"{k.name}_epilogue", inputs=inputs, outputs=rest))
    return None


def accumulate_epilogue(k: Matmul) -> tuple[View, float, float] | None:
    """Whether the epilogue is ``X = b·X + c·p`` in place (p the product, b and c
    numbers: plain SGD's ``W -= lr·dW``, b = 1; with weight decay b = 1 - lr·wd), which
    a GEMM computes as C = c·(A @ B) + b·C with C = X. Returns X's view, c (alpha)
    and b (beta); None when the epilogue is anything else, X is not laid out like the
    product, or the GEMM would read X through A or B while it writes it."""
    e, p = k.epilogue, k.product_symbol()
    assert e is not None and p is not None and k.out is not None
    assert k.a is not None and k.b is not None
    if len(e.outputs) != 1 or len(e.inputs) != 2:
        return None
    (view, expr), = e.outputs
    x = next(name for name in e.inputs if name != p)
    scales = _update_scales(expr, x, p)
    in_place = e.inputs[x] == view and view.dtype == "f32" and view.strides == k.out.strides
    if scales is None or not in_place or view.buffer in (k.a.buffer, k.b.buffer):
        return None
    return view, *scales


def _update_scales(expr: sp.Expr, x: str, p: str) -> tuple[float, float] | None:
    """(c, b) when ``expr`` is ``b·x + c·p`` (either order, b and c finite numbers,
    b = 1 when absent), else None; as the f32 constants the epilogue would use."""
    if not expr.is_Add or len(expr.args) != 2:
        return None
    for kept, scaled in (expr.args, expr.args[::-1]):
        b, kept_rest = kept.as_coeff_Mul()
        c, rest = scaled.as_coeff_Mul()
        if (kept_rest.is_Symbol and kept_rest.name == x and rest.is_Symbol and rest.name == p
                and c.is_Number and c.is_finite and b.is_Number and b.is_finite and b != 0):
            return float(np.float32(c)), float(np.float32(b))
    return None


def _is_relu(e: Elementwise) -> bool:
    (_, expr), = e.outputs
    x = next(iter(expr.free_symbols), None)
    return x is not None and expr == sp.Piecewise((x, x > 0), (0, True))


def _direct_output(e: Elementwise, k: Matmul) -> View | None:
    """The view the GEMM can write instead of the product, when the epilogue left is
    just "store it" (or "store its ReLU"): one f32 output laid out like the product."""
    assert k.out is not None
    if len(e.outputs) != 1 or len(e.inputs) != 1:
        return None  # the one input is then the product
    (view, expr), = e.outputs
    stores_product = expr.is_Symbol or _is_relu(e)
    if not stores_product or view.dtype != "f32" or view.strides != k.out.strides:
        return None
    return view


def _gemm_steps(k: Matmul, out: View | None, bias: tuple[str, int] | None = None,
                relu: bool = False, alpha: float = 1.0, beta: float = 0.0) -> list[Step]:
    """C = alpha·(A @ B) + beta·C into ``out``, then the bias (and ReLU)."""
    assert k.a is not None and k.b is not None and out is not None
    views = [k.a, k.b, out]
    if any(v.dtype != "f32" for v in views):
        raise BackendError(f"kernel {k.name}: matmul is f32 only on the PTX backend")
    nb = len(k.batch)
    sizes, strides = collapse(k.batch, [_head(v, nb) for v in views])
    inner = sizes[-1] if sizes else 1
    batch_strides = [s[-1] if sizes else 0 for s in strides]
    # The next batch dim becomes the step's outer level; any further ones, steps.
    outer = sizes[-2] if len(sizes) >= 2 else 1
    a_so, b_so, c_so = (s[-2] if len(sizes) >= 2 else 0 for s in strides)
    dims = [(k.m, k.k), (k.k, k.n), (k.m, k.n)]
    _check_u32(k, *(v.offset + v.size for v in views))
    steps: list[Step] = []
    for index in itertools.product(*(range(s) for s in sizes[:-2])):
        operands = []
        for v, st, bs, (rows, cols) in zip(views, strides, batch_strides, dims, strict=True):
            offset = v.offset + sum(i * s for i, s in zip(index, st, strict=False))
            rs, cs = matrix_strides(rows, cols, v.strides[-2], v.strides[-1])
            operands.append((v.buffer, offset, (bs, rs, cs)))
        launch = _sgemm_launch(inner, (k.m, k.n, k.k), operands, bias, relu, outer,
                               (a_so, b_so, c_so), (alpha, beta))
        tiled, partials, tiles = _tiled(inner, (k.m, k.n, k.k), operands, bias, relu, outer,
                                        (a_so, b_so, c_so), (alpha, beta))
        steps.append(GemmStep(inner, k.m, k.n, k.k, operands, launch, bias, relu, outer,
                              (a_so, b_so, c_so), alpha=alpha, beta=beta, tiled=tiled,
                              split_partials=partials, split_tiles=tiles))
    return steps


def gemm_step(batch: int, m: int, n: int, k: int,
              operands: list[tuple[str, int, tuple[int, int, int]]], scratch: int = 0
              ) -> GemmStep:
    """A plain GEMM step (no epilogue) over operands (buffer, offset, (batch, row, col)
    strides), size-1 dims' strides made BLAS-friendly; ``scratch``: the f32 elements of
    the scratch arena its operands reach (when they live there)."""
    dims = [(m, k), (k, n), (m, n)]
    fixed = [(b, off, (bs, *matrix_strides(rows, cols, rs, cs)))
             for (b, off, (bs, rs, cs)), (rows, cols) in zip(operands, dims, strict=True)]
    tiled, partials, tiles = _tiled(batch, (m, n, k), fixed, None, False)
    return GemmStep(batch, m, n, k, fixed, _sgemm_launch(batch, (m, n, k), fixed, None, False),
                    scratch=scratch, tiled=tiled, split_partials=partials, split_tiles=tiles)


def _tiled(batch: int, mnk: tuple[int, int, int],
           operands: list[tuple[str, int, tuple[int, int, int]]],
           bias: tuple[str, int] | None, relu: bool, outer: int = 1,
           outer_strides: tuple[int, int, int] = (0, 0, 0),
           scale: tuple[float, float] = (1.0, 0.0)) -> tuple[list[KernelLaunch], int, int]:
    """The generated kernels for a product — register-tiled (``ptx_gemm``) and, for a thin
    one, ``ptx_gemm_thin``'s — as launches, and the split arenas' elements they need."""
    found = tiled_candidates(batch, mnk, operands, bias, relu, outer, outer_strides, scale)
    thin = thin_candidates(batch, mnk, operands, bias, relu, outer, outer_strides, scale)
    launches = [KernelLaunch(t.name, "register-tiled SGEMM (ptx_gemm.py)", t.text, t.args,
                             t.grid, t.block) for t in found]
    launches += [KernelLaunch(t.name, "thin SGEMM (ptx_gemm_thin.py)", t.text, t.args,
                              t.grid, t.block) for t in thin]
    found += thin
    return (launches, max((t.partials for t in found), default=0),
            max((t.tiles for t in found), default=0))


def _sgemm_launch(batch: int, mnk: tuple[int, int, int],
                  operands: list[tuple[str, int, tuple[int, int, int]]],
                  bias: tuple[str, int] | None, relu: bool, outer: int = 1,
                  outer_strides: tuple[int, int, int] = (0, 0, 0),
                  scale: tuple[float, float] = (1.0, 0.0)) -> KernelLaunch:
    """The fallback kernel's launch; ``scale``: (alpha, beta)."""
    m, n, _ = mnk
    scalars: list[Arg] = [ScalarArg("u32", x) for x in (*mnk, batch, outer)]
    scalars += [ScalarArg("u32", s) for s in outer_strides]
    scalars += [ScalarArg("u32", s) for _, _, st in operands for s in st]
    scalars.append(ScalarArg("u32", 0 if bias is None else 2 if relu else 1))
    scalars += [ScalarArg("f32", x) for x in scale]
    pointers: list[Arg] = [(b, off) for b, off, _ in operands]
    pointers.append(bias or pointers[2])  # unread without a bias
    grid = (math.ceil(n / TILE), math.ceil(m / TILE), min(batch * outer, 65535))
    return KernelLaunch(SGEMM, "", sgemm_text(), pointers + scalars, grid, (TILE, TILE, 1))


SGEMM_SCALARS = ("m", "n", "k", "batch", "outer", "a_so", "b_so", "c_so", "a_sb", "a_sr",
                 "a_sc", "b_sb", "b_sr", "b_sc", "c_sb", "c_sr", "c_sc", "epilogue")
SGEMM_SCALES = ("alpha", "beta")  # .f32, after the .u32 scalars


def sgemm_text() -> str:
    """C[o, z] = alpha·(A[o, z] @ B[o, z]) + beta·C[o, z] for z < batch, o < outer, with
    16×16 tiles staged in shared memory; any strides. C is read only when beta is not 0
    (as in BLAS: it may hold anything then). The ``epilogue`` scalar: 0 none, 1 adds
    ``bias[col]`` (contiguous), 2 also takes ReLU."""
    f = PtxFunction([(".u64", "a"), (".u64", "b"), (".u64", "c"), (".u64", "bias")] +
                    [(".u32", s) for s in SGEMM_SCALARS] + [(".f32", s) for s in SGEMM_SCALES])
    a, b, c, bias = (f.param_pointer(x) for x in ("a", "b", "c", "bias"))
    p = {s: f.param_u32(s) for s in SGEMM_SCALARS}
    alpha, beta = (f.param_f32(s) for s in SGEMM_SCALES)
    f.shared += [f".shared .align 4 .b8 tile_a[{4 * TILE * TILE}];",
                 f".shared .align 4 .b8 tile_b[{4 * TILE * TILE}];"]
    tx, ty = f.special("%tid.x"), f.special("%tid.y")
    col = f.value("b32", "mad.lo.u32", f.special("%ctaid.x"), str(TILE), tx)
    row = f.value("b32", "mad.lo.u32", f.special("%ctaid.y"), str(TILE), ty)
    sa, sb = f.value("b32", "mov.u32", "tile_a"), f.value("b32", "mov.u32", "tile_b")
    slot = f.value("b32", "mad.lo.u32", ty, str(TILE), tx)
    slot_a = f.value("b32", "mad.lo.u32", slot, "4", sa)  # tile_a[ty][tx]
    slot_b = f.value("b32", "mad.lo.u32", slot, "4", sb)
    row_a = f.value("b32", "mad.lo.u32", ty, str(4 * TILE), sa)  # &tile_a[ty][0]
    col_b = f.value("b32", "mad.lo.u32", tx, "4", sb)  # &tile_b[0][tx]
    row_ok = f.value("pred", "setp.lt.u32", row, p["m"])
    col_ok = f.value("pred", "setp.lt.u32", col, p["n"])
    items = f.value("b32", "mul.lo.u32", p["batch"], p["outer"])
    with f.loop(f.special("%ctaid.z"), items, f.special("%nctaid.z"), "batch") as zo:
        o = f.value("b32", "div.u32", zo, p["batch"])
        z = f.value("b32", "rem.u32", zo, p["batch"])
        base_a = f.value("b32", "mul.lo.u32", o, p["a_so"])
        base_a = f.value("b32", "mad.lo.u32", z, p["a_sb"], base_a)
        base_a = f.value("b32", "mad.lo.u32", row, p["a_sr"], base_a)
        base_b = f.value("b32", "mul.lo.u32", o, p["b_so"])
        base_b = f.value("b32", "mad.lo.u32", z, p["b_sb"], base_b)
        base_b = f.value("b32", "mad.lo.u32", col, p["b_sc"], base_b)
        acc = f.value("f32", "mov.f32", "0f00000000")
        with f.loop("0", p["k"], str(TILE), "tile") as t:
            ka = f.value("b32", "add.u32", t, tx)
            kb = f.value("b32", "add.u32", t, ty)
            _tile_load(f, a, f.value("b32", "mad.lo.u32", ka, p["a_sc"], base_a), row_ok, ka,
                       p["k"], slot_a)
            _tile_load(f, b, f.value("b32", "mad.lo.u32", kb, p["b_sr"], base_b), col_ok, kb,
                       p["k"], slot_b)
            f.ins("bar.sync", "0")
            for kk in range(TILE):
                x = f.value("f32", "ld.shared.f32", f"[{row_a}+{4 * kk}]")
                y = f.value("f32", "ld.shared.f32", f"[{col_b}+{4 * TILE * kk}]")
                f.ins("fma.rn.f32", acc, x, y, acc)
            f.ins("bar.sync", "0")
        out = f.value("b32", "mul.lo.u32", o, p["c_so"])
        out = f.value("b32", "mad.lo.u32", z, p["c_sb"], out)
        out = f.value("b32", "mad.lo.u32", row, p["c_sr"], out)
        out = f.value("b32", "mad.lo.u32", col, p["c_sc"], out)
        inside = f.value("pred", "and.pred", row_ok, col_ok)
        c_at = f.address(c, out, 0, 4)
        f.comment("C = alpha * acc + beta * C, reading C only when beta != 0")
        reads_c = f.value("pred", "setp.ne.and.f32", beta, "0f00000000", inside)
        old = f.value("f32", "mov.f32", "0f00000000")
        f.ins("ld.global.f32", old, c_at, guard=reads_c)
        f.ins("mul.rn.f32", old, old, beta)
        f.ins("fma.rn.f32", acc, acc, alpha, old)  # alpha·acc + beta·C, rounded once
        f.comment("then + bias[col] (epilogue 1, 2), then ReLU (epilogue 2)")
        has_bias = f.value("pred", "setp.ne.and.u32", p["epilogue"], "0", inside)
        bias_value = f.value("f32", "mov.f32", "0f00000000")
        f.ins("ld.global.f32", bias_value, f.address(bias, col, 0, 4), guard=has_bias)
        f.ins("add.rn.f32", acc, acc, bias_value)
        relu = f.value("pred", "setp.eq.u32", p["epilogue"], "2")
        f.ins("max.f32", acc, acc, "0f00000000", guard=relu)
        f.ins("st.global.f32", c_at, acc, guard=inside)
    return f.text(SGEMM)


def _tile_load(f: PtxFunction, base: str, index: str, ok: str, kk: str, k: str,
               slot: str) -> None:
    """slot = the element at ``index`` if it is inside the matrix, else 0."""
    in_k = f.value("pred", "setp.lt.u32", kk, k)
    inside = f.value("pred", "and.pred", ok, in_k)
    v = f.value("f32", "mov.f32", "0f00000000")
    f.ins("ld.global.f32", v, f.address(base, index, 0, 4), guard=inside)
    f.ins("st.shared.f32", f"[{slot}]", v)


# ---- gather / scatter-add ----------------------------------------------------------------------

ZERO_FILL = "fg_fill_zero_b32"


def zero_fill_text() -> str:
    """p[0..n) = 0 (4-byte elements), grid-stride."""
    f = PtxFunction([(".u64", "p"), (".u32", "n")])
    ptr, n = f.param_pointer("p"), f.param_u32("n")
    with _grid_stride(f, n, "fill") as i:
        f.ins("st.global.b32", f.address(ptr, i, 0, 4), "0")
    return f.text(ZERO_FILL)


COPY_IDS = "fg_copy_ids_checked"


def copy_ids_text() -> str:
    """dst[0..n) = src[0..n) (i32 ids: class labels, embedding ids), grid-stride; an id
    outside [0, bound) is copied as it is and stores ``tag`` at ``flag``. The runtime
    copies an input that arrives in device memory into its arena with this kernel
    instead of a plain copy: ids on the host are checked before anything runs, but
    these would have to come back to be, and a label compared against an arange (a
    one-hot) would otherwise go wrong without a sign. ``flag`` is host memory mapped
    into the device, read after the wait the step ends with (no copy back)."""
    f = PtxFunction([(".u64", "src"), (".u64", "dst"), (".u32", "n"), (".u32", "bound"),
                     (".u64", "flag"), (".u32", "tag")])
    src, dst, flag = (f.param_pointer(p) for p in ("src", "dst", "flag"))
    n, bound, tag = (f.param_u32(p) for p in ("n", "bound", "tag"))
    with _grid_stride(f, n, "copy") as i:
        v = f.value("b32", "ld.global.b32", f.address(src, i, 0, 4))
        f.ins("st.global.b32", f.address(dst, i, 0, 4), v)
        ok = f.value("pred", "setp.lt.u32", v, bound)  # negative ids are huge
        f.ins("st.global.u32", f"[{flag}]", tag, guard=f"!{ok}")
    return f.text(COPY_IDS)


def gather(k: Gather, dtypes: dict[str, str], fast_math: bool) -> list[Step]:
    assert k.ids is not None and k.src is not None and k.out is not None
    buffers = kernel_buffers(k)
    n_ids = k.ids.size
    n = n_ids * k.row_len
    _check_u32(k, n, k.rows * k.row_len, k.out.offset + k.out.size)
    f = _param_list(buffers, 1)
    base = _pointers(f, buffers)
    flags = f.param_pointer(f"p{len(buffers)}")
    src, out, ids = k.src, k.out, k.ids
    if k.scatter and (src.dtype != "f32" or out.dtype != "f32"):
        raise BackendError(f"kernel {k.name}: scatter-add is f32 only on the PTX backend")
    with _grid_stride(f, n) as e:
        i = e if k.row_len == 1 else f.value("b32", "div.u32", e, str(k.row_len))
        row = f.value("b32", "ld.global.b32", f.address(base[ids.buffer], i, ids.offset, 4))
        ok = f.value("pred", "setp.lt.u32", row, str(k.rows))  # negative ids are huge
        f.ins("st.global.u32", f"[{flags}]", "1", guard=f"!{ok}")
        slot = row
        if k.row_len > 1:  # element j of row ``row``
            j = f.value("b32", "rem.u32", e, str(k.row_len))
            slot = f.value("b32", "mad.lo.u32", row, str(k.row_len), j)
        if k.scatter:
            x = f.load("f32", f.address(base[src.buffer], e, src.offset, 4))
            f.ins("red.global.add.f32", f.address(base[out.buffer], slot, out.offset, 4), x,
                  guard=ok)
        else:
            kind = DTYPE_KIND[src.dtype]
            cls = {"float": "f32", "int": "b32", "bool": "b32"}[kind]
            x = f.value(cls, "mov.b32", "0")
            load = {"f32": "ld.global.f32", "i32": "ld.global.b32", "bool": "ld.global.u8"}
            f.ins(load[src.dtype], x, f.address(base[src.buffer], slot, src.offset,
                                                ITEMSIZE[src.dtype]), guard=ok)
            store = {"f32": "st.global.f32", "i32": "st.global.b32", "bool": "st.global.u8"}
            f.ins(store[out.dtype], f.address(base[out.buffer], e, out.offset,
                                              ITEMSIZE[out.dtype]), x)
    block = _block_for(n)
    steps: list[Step] = []
    if k.scatter:
        steps.append(KernelLaunch(ZERO_FILL, "", zero_fill_text(),
                                  [(out.buffer, out.offset), ScalarArg("u32", out.size)],
                                  (_blocks(out.size, BLOCK), 1, 1), (BLOCK, 1, 1)))
    comment = f"{k.kind}: {k.rows} rows of {k.row_len}, {n_ids} ids"
    steps.append(KernelLaunch(k.name, comment, f.text("ENTRY"),
                              [*_buffer_args(buffers), (FLAGS, 0)],
                              (_blocks(n, block), 1, 1), (block, 1, 1)))
    return steps
