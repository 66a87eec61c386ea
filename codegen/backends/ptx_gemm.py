"""Register-tiled SGEMM kernels for small products: the runtime's autotuner times them
against cuBLAS and cuBLASLt and keeps whichever is fastest.

A training step at a small batch is a chain of small GEMMs (an MLP at batch 128:
128×256×784, 256×10×128, ...). cuBLAS runs each as a few dozen 32×32 tiles with the
whole inner dimension in one CTA — a long dependent loop on a fraction of the SMs —
and spends 3–8 µs where the work is a µs. These kernels give the autotuner other
shapes of the same product (``tiled_candidates``):

- a CTA computes a 32×32 tile of C with 64 threads, 4×4 outputs each (rows ``ty + 8i``,
  columns ``tx + 8j``: conflict-free shared-memory reads), stepping through the inner
  dimension 32 at a time; the next step's tile is loaded into registers while this
  one's is multiplied from shared memory;
- with ``splits`` > 1 the inner dimension is cut into that many ranges, one CTA each
  (split-K), so a small C still fills the GPU. Each CTA stores its partial tile in the
  ``split_f32`` arena and counts itself in on the tile's counter in ``split_u32``; the
  last CTA of a tile sums the partials in range order (the same order whichever CTA is
  last: deterministic), applies the epilogue and resets the counter to 0, so counters
  are zero between launches and GEMM steps, which run one after another, share them;
- the epilogue is the fallback kernel's: C = alpha·AB + beta·C (C read only when
  beta ≠ 0), then + bias[col], then ReLU.

Operands take any strides; ``a_k`` / ``b_k`` choose which dim the loads walk along
(the unit-stride one, so a warp's loads coalesce), which only matters for speed.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

from ..launch_plan import ScalarArg
from .ptx_asm import PtxFunction

TILE = 32  # C rows and columns per CTA, and inner-dimension step
BLOCKS = (64, 128, 256)  # threads per CTA: 8 × (8, 16, 32) of (4, 2, 1) × 4 outputs
COLS = 4  # C columns per thread: tx + 8j
SUM_AHEAD = 4  # split-K: partials loaded before any is added (latency, not order)
PAD = TILE + 1  # shared rows of 33 floats: storing a k-major column hits 32 banks
SPLIT_PARTIALS = "__split_partials"  # buffer names of the split-K arenas
SPLIT_COUNTS = "__split_counts"
MAX_FLOPS = 1 << 28  # larger products are cuBLAS's (its large tiles win there)
MAX_PARTIALS = 1 << 22  # f32 elements of partial sums one split GEMM may use
TARGET_CTAS = (132, 264)  # split so that this many CTAs run (one, two per SM of an H100/200)
MAX_SPLITS = 32

SCALARS = ("m", "n", "k", "batch", "outer", "a_so", "b_so", "c_so", "a_sb", "a_sr", "a_sc",
           "b_sb", "b_sr", "b_sc", "c_sb", "c_sr", "c_sc", "epilogue", "splits", "k_chunk")
SCALES = ("alpha", "beta")
POINTERS = ("a", "b", "c", "bias", "partials", "counts")  # C third: timed on a stand-in
SPLIT_FLAG = ".shared .align 4 .b8 last_flag[4];"  # reduce_splits' one word of shared memory


def kernel_name(a_k: bool, b_k: bool, threads: int) -> str:
    """``fg_sgemm_32x32_kn_t64``: A loaded along k (row-major A) or m, B along k or n;
    ``threads`` per CTA."""
    return f"fg_sgemm_32x32_{'k' if a_k else 'm'}{'k' if b_k else 'n'}_t{threads}"


def split_choices(m: int, n: int, k: int, items: int) -> list[int]:
    """The split counts worth timing: 1, and enough to put ``TARGET_CTAS`` CTAs on the
    GPU when the tiles alone are fewer (each range at least one step of 32 long)."""
    tiles = math.ceil(m / TILE) * math.ceil(n / TILE) * items
    most = min(MAX_SPLITS, math.ceil(k / TILE), max(1, MAX_PARTIALS // (items * m * n)))
    choices = {1}
    for target in TARGET_CTAS:
        chunk = _chunk(k, min(most, math.ceil(target / tiles)))
        choices.add(math.ceil(k / chunk))
    return sorted(choices)


def _chunk(k: int, splits: int) -> int:
    """The inner range of each split: a multiple of ``TILE`` (the last may be shorter)."""
    return TILE * math.ceil(math.ceil(k / max(splits, 1)) / TILE)


class TiledLaunch(NamedTuple):
    """One candidate launch; ``partials`` / ``tiles``: the ``split_f32`` / ``split_u32``
    elements it needs (0 unsplit)."""

    name: str
    text: str
    args: list
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    partials: int
    tiles: int


class Product(NamedTuple):
    """A GEMM step's product as its generated kernels see it (``tiled_candidates``'
    arguments), which makes their launches."""

    batch: int
    mnk: tuple[int, int, int]
    operands: list[tuple[str, int, tuple[int, int, int]]]  # A, B, C: (buffer, offset, strides)
    bias: tuple[str, int] | None
    relu: bool
    outer: int
    outer_strides: tuple[int, int, int]
    scale: tuple[float, float]  # alpha, beta

    def launch(self, name: str, text: str, grid: tuple[int, int, int], threads: int,
               splits: int = 1, chunk: int = 0) -> TiledLaunch:
        """Kernel ``name`` (parameters of ``gemm_kernel``) on a ``grid`` of CTAs of
        ``threads``; the inner dimension in ``splits`` ranges of ``chunk`` (0: all)."""
        m, n, k = self.mnk
        items = self.batch * self.outer
        scalars = [ScalarArg("u32", x) for x in (*self.mnk, self.batch, self.outer,
                                                 *self.outer_strides)]
        scalars += [ScalarArg("u32", s) for _, _, st in self.operands for s in st]
        scalars += [ScalarArg("u32", 0 if self.bias is None else 2 if self.relu else 1),
                    ScalarArg("u32", splits), ScalarArg("u32", chunk or k)]
        scalars += [ScalarArg("f32", x) for x in self.scale]
        pointers: list = [(b, off) for b, off, _ in self.operands]
        pointers.append(self.bias or pointers[2])  # unread without a bias
        pointers += [(SPLIT_PARTIALS, 0), (SPLIT_COUNTS, 0)]
        split = splits > 1
        return TiledLaunch(name, text, pointers + scalars, grid, (threads, 1, 1),
                           items * splits * m * n if split else 0,
                           items * grid[0] * grid[1] if split else 0)


def tiled_candidates(batch: int, mnk: tuple[int, int, int],
                     operands: list[tuple[str, int, tuple[int, int, int]]],
                     bias: tuple[str, int] | None, relu: bool, outer: int,
                     outer_strides: tuple[int, int, int], scale: tuple[float, float]
                     ) -> list[TiledLaunch]:
    """For a product small enough (``MAX_FLOPS``), one launch per CTA size in ``BLOCKS``
    and split count in ``split_choices``. Empty for a larger product."""
    m, n, k = mnk
    items = batch * outer
    if 2 * m * n * k * items > MAX_FLOPS or k == 0 or m == 0 or n == 0:
        return []
    product = Product(batch, mnk, operands, bias, relu, outer, outer_strides, scale)
    (_, _, (_, a_sr, a_sc)), (_, _, (_, b_sr, b_sc)), _ = operands
    a_k, b_k = a_sc == 1 or a_sr != 1, b_sr == 1 and b_sc != 1
    grid_xy = (math.ceil(n / TILE), math.ceil(m / TILE))
    out = []
    for threads, splits in itertools.product(BLOCKS, split_choices(m, n, k, items)):
        if items * splits > 65535:
            continue
        out.append(product.launch(kernel_name(a_k, b_k, threads),
                                  tiled_sgemm_text(a_k, b_k, threads),
                                  (*grid_xy, items * splits), threads, splits,
                                  _chunk(k, splits)))
    return out


@functools.cache  # a few variants, asked for by every small GEMM of a model
def tiled_sgemm_text(a_k: bool, b_k: bool, threads: int) -> str:
    """The kernel (entry name ``ENTRY``) for CTAs of ``threads``; see the module
    docstring."""
    rows_per = TILE * 8 // threads  # C rows per thread: ty + (threads / 8)·i
    step = threads // 8
    f, ptr, p, (alpha, beta) = gemm_kernel()
    a, b, c, bias, partials, counts = (ptr[x] for x in POINTERS)
    f.shared += [f".shared .align 4 .b8 tile_a[{4 * TILE * PAD}];",
                 f".shared .align 4 .b8 tile_b[{4 * TILE * PAD}];"]
    tid = f.special("%tid.x")
    lane = f.value("b32", "rem.u32", tid, str(TILE))  # 0..31: the coalesced dim
    rank = f.value("b32", "div.u32", tid, str(TILE))  # the warp: the other dim, + warps·q
    tx = f.value("b32", "rem.u32", tid, "8")
    ty = f.value("b32", "div.u32", tid, "8")
    col0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.x"), str(TILE))
    row0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.y"), str(TILE))

    item, split, base, k_begin, k_end = product_of_cta(f, p)

    # A's tile is 32 (m) × 32 (k), B's 32 (k) × 32 (n); thread `tid` loads 16 elements of
    # each: along `lane` in the dim it walks (k, or m / n) and `rank + 2q` in the other.
    a_tile = _Loader(f, a, base["a"], row0, p["m"], p["a_sr"], p["a_sc"], walk_k=a_k,
                     lane=lane, rank=rank, threads=threads)
    b_tile = _Loader(f, b, base["b"], col0, p["n"], p["b_sc"], p["b_sr"], walk_k=b_k,
                     lane=lane, rank=rank, threads=threads)
    sa = f.value("b32", "mov.u32", "tile_a")
    sb = f.value("b32", "mov.u32", "tile_b")
    store_a, store_b = a_tile.shared_slots(sa), b_tile.shared_slots(sb)
    read_a = f.value("b32", "mad.lo.u32", ty, "4", sa)  # &tile_a[0][ty]
    read_b = f.value("b32", "mad.lo.u32", tx, "4", sb)  # &tile_b[0][tx]
    acc = [[f.value("f32", "mov.f32", "0f00000000") for _ in range(COLS)]
           for _ in range(rows_per)]

    f.comment("the first step's tiles into registers, then: registers -> shared, the")
    f.comment("next step's loads issued, this step multiplied")
    a_tile.load(k_begin, k_end)
    b_tile.load(k_begin, k_end)
    with f.loop(k_begin, k_end, str(TILE), "k_step") as t:
        a_tile.to_shared(store_a)
        b_tile.to_shared(store_b)
        f.ins("bar.sync", "0")
        t_next = f.value("b32", "add.u32", t, str(TILE))
        a_tile.load(t_next, k_end)
        b_tile.load(t_next, k_end)
        for kk in range(TILE):
            xs = [f.value("f32", "ld.shared.f32", f"[{read_a}+{4 * (kk * PAD + step * i)}]")
                  for i in range(rows_per)]
            ys = [f.value("f32", "ld.shared.f32", f"[{read_b}+{4 * (kk * PAD + 8 * j)}]")
                  for j in range(COLS)]
            for i, x in enumerate(xs):
                for j, y in enumerate(ys):
                    f.ins("fma.rn.f32", acc[i][j], x, y, acc[i][j])
        f.ins("bar.sync", "0")

    rows = [f.value("b32", "add.u32", row0, f.value("b32", "add.u32", ty, str(step * i)))
            for i in range(rows_per)]
    cols = [f.value("b32", "add.u32", col0, f.value("b32", "add.u32", tx, str(8 * j)))
            for j in range(COLS)]
    row_ok = [f.value("pred", "setp.lt.u32", r, p["m"]) for r in rows]
    col_ok = [f.value("pred", "setp.lt.u32", cc, p["n"]) for cc in cols]
    inside = [[f.value("pred", "and.pred", ok, col_ok[j]) for j in range(COLS)]
              for ok in row_ok]
    epilogue = f.label("epilogue")
    split_k = f.value("pred", "setp.gt.u32", p["splits"], "1")
    f.ins("bra", epilogue, guard=f"!{split_k}")
    reduce_splits(f, p, partials, counts, item, split, tid, rows, cols, inside, acc)
    f.place(epilogue)
    store_outputs(f, p, c, bias, base["c"], alpha, beta, rows, cols, col_ok, inside, acc)
    return f.text("ENTRY")


class GemmKernel(NamedTuple):
    """A GEMM candidate's entry with its parameters loaded (every candidate takes the
    same, so the runtime launches and times them alike): ``ptr`` the global addresses
    by name (``POINTERS``), ``p`` the u32 scalars (``SCALARS``), ``scales`` (alpha,
    beta)."""

    f: PtxFunction
    ptr: dict[str, str]
    p: dict[str, str]
    scales: tuple[str, str]


def gemm_kernel() -> GemmKernel:
    f = PtxFunction([(".u64", x) for x in POINTERS] + [(".u32", s) for s in SCALARS] +
                    [(".f32", s) for s in SCALES])
    ptr = {x: f.param_pointer(x) for x in POINTERS}
    p = {s: f.param_u32(s) for s in SCALARS}
    alpha, beta = (f.param_f32(s) for s in SCALES)
    return GemmKernel(f, ptr, p, (alpha, beta))


class CtaProduct(NamedTuple):
    """Which product (item) and inner range (split) a CTA computes: its operands' first
    elements (``base``, by "a", "b", "c") and its range of k."""

    item: str
    split: str
    base: dict[str, str]
    k_begin: str
    k_end: str


def product_of_cta(f: PtxFunction, p: dict[str, str]) -> CtaProduct:
    """From ``%ctaid.z`` = item · splits + split, with item = outer index · batch + batch
    index (``p``: the ``SCALARS`` parameters)."""
    f.comment("which product (item) and which inner range (split) this CTA computes")
    z = f.special("%ctaid.z")
    item = f.value("b32", "div.u32", z, p["splits"])
    split = f.value("b32", "rem.u32", z, p["splits"])
    o = f.value("b32", "div.u32", item, p["batch"])
    zb = f.value("b32", "rem.u32", item, p["batch"])
    base = {}
    for x in "abc":
        at = f.value("b32", "mul.lo.u32", o, p[f"{x}_so"])
        base[x] = f.value("b32", "mad.lo.u32", zb, p[f"{x}_sb"], at)
    k_begin = f.value("b32", "mul.lo.u32", split, p["k_chunk"])
    k_end = f.value("b32", "add.u32", k_begin, p["k_chunk"])
    f.ins("min.u32", k_end, k_end, p["k"])
    return CtaProduct(item, split, base, k_begin, k_end)


class _Loader:
    """One operand's 32 × 32 tile: 1024 / threads registers per thread, loaded from
    global memory and stored k-major into shared memory (``tile[k][m or n]``, rows of
    ``PAD``). Register q holds the element at ``lane`` along the dim the loads walk and
    ``rank + warps·q`` along the other."""

    def __init__(self, f: PtxFunction, ptr: str, base: str, start: str, size: str,
                 outer_stride: str, k_stride: str, *, walk_k: bool, lane: str,
                 rank: str, threads: int) -> None:
        """``start`` / ``size`` / ``outer_stride``: the tile's first row of A (column of
        B), A's rows (B's columns) and the stride along them; ``k_stride``: the stride
        along the inner dimension."""
        self.f, self.ptr, self.walk_k = f, ptr, walk_k
        self.regs = [f.reg("f32") for _ in range(TILE * TILE // threads)]
        self.warps = threads // 32
        self.k_stride = k_stride
        self.lane, self.rank = lane, rank
        f.comment("an operand's tile: offsets of its rows (cols) and which are inside")
        # the outer coordinate of each register's element, and whether it is inside
        self.outer_at: list[str] = []
        self.outer_ok: list[str] = []
        for q in range(len(self.regs) if walk_k else 1):
            local = f.value("b32", "add.u32", rank, str(self.warps * q)) if walk_k else lane
            coord = f.value("b32", "add.u32", start, local)
            self.outer_ok.append(f.value("pred", "setp.lt.u32", coord, size))
            self.outer_at.append(f.value("b32", "mad.lo.u32", coord, outer_stride, base))
        if not walk_k:  # every register shares the lane's row (column)
            self.outer_at *= len(self.regs)
            self.outer_ok *= len(self.regs)

    def _k_of(self, t: str, q: int) -> str:
        """The inner index of register ``q``'s element in the step starting at ``t``."""
        f = self.f
        if self.walk_k:
            return f.value("b32", "add.u32", t, self.lane)
        return f.value("b32", "add.u32", t,
                       f.value("b32", "add.u32", self.rank, str(self.warps * q)))

    def load(self, t: str, k_end: str) -> None:
        """The step at ``t``'s elements into the registers (0 outside the operand)."""
        f = self.f
        kk = self._k_of(t, 0) if self.walk_k else None
        k_ok = f.value("pred", "setp.lt.u32", kk, k_end) if kk is not None else None
        k_at = f.value("b32", "mul.lo.u32", kk, self.k_stride) if kk is not None else None
        for q, reg in enumerate(self.regs):
            if not self.walk_k:
                kk = self._k_of(t, q)
                k_ok = f.value("pred", "setp.lt.u32", kk, k_end)
                k_at = f.value("b32", "mul.lo.u32", kk, self.k_stride)
            assert k_ok is not None and k_at is not None
            ok = f.value("pred", "and.pred", self.outer_ok[q], k_ok)
            index = f.value("b32", "add.u32", self.outer_at[q], k_at)
            f.ins("mov.f32", reg, "0f00000000")
            f.ins("ld.global.f32", reg, f.address(self.ptr, index, 0, 4), guard=ok)

    def shared_slots(self, tile: str) -> str:
        """This thread's first slot (``tile[k][outer]`` for register 0) as a byte
        address; register q's is warps·q columns (walking k) or rows further on."""
        f = self.f
        k, outer = (self.lane, self.rank) if self.walk_k else (self.rank, self.lane)
        slot = f.value("b32", "mad.lo.u32", k, str(PAD), outer)
        return f.value("b32", "mad.lo.u32", slot, "4", tile)

    def to_shared(self, slot: str) -> None:
        step = self.warps * (1 if self.walk_k else PAD)  # outer + warps·q, or k + warps·q
        for q, reg in enumerate(self.regs):
            self.f.ins("st.shared.f32", f"[{slot}+{4 * step * q}]", reg)


def reduce_splits(f: PtxFunction, p: dict[str, str], partials: str, counts: str,
                  item: str, split: str, tid: str, rows: list[str], cols: list[str],
                  inside: list[list[str]], acc: list[list[str]], ahead: int = SUM_AHEAD
                  ) -> None:
    """Split-K: store this CTA's partial tile (the thread's outputs ``acc`` at C's
    ``rows`` × ``cols``, those ``inside`` C); the last CTA of the tile to arrive sums
    every split's partial in split order into ``acc`` (``ahead`` splits' loads issued
    before any is added); the others leave."""
    f.comment("split-K: partial tile out, then count in; the last CTA of the tile sums")
    f.shared.append(SPLIT_FLAG)  # tells the CTA's threads whether theirs was last
    m, n = p["m"], p["n"]
    plane = f.value("b32", "mad.lo.u32", item, p["splits"], split)  # partials[item][split]
    outputs = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    for i, j in outputs:
        at = _partial_index(f, plane, m, n, rows[i], cols[j])
        f.ins("st.global.cg.f32", f.address(partials, at, 0, 4), acc[i][j], guard=inside[i][j])
    f.ins("membar.gl")
    f.ins("bar.sync", "0")
    tile = f.value("b32", "mad.lo.u32", item, f.special("%nctaid.y"), f.special("%ctaid.y"))
    tile = f.value("b32", "mad.lo.u32", tile, f.special("%nctaid.x"), f.special("%ctaid.x"))
    leader = f.value("pred", "setp.eq.u32", tid, "0")
    counter = f.address(counts, tile, 0, 4)
    arrived = f.value("b32", "mov.u32", "0")
    f.ins("atom.global.add.u32", arrived, counter, "1", guard=leader)
    last_arrival = f.value("b32", "sub.u32", p["splits"], "1")
    is_last = f.value("pred", "setp.eq.and.u32", arrived, last_arrival, leader)
    f.ins("st.global.u32", counter, "0", guard=is_last)  # ready for the next launch
    f.ins("st.shared.u32", "[last_flag]", f.value("b32", "selp.b32", "1", "0", is_last),
          guard=leader)
    f.ins("bar.sync", "0")
    flag = f.value("b32", "ld.shared.u32", "[last_flag]")
    done = f.label("not_last")
    f.ins("bra", done, guard=f.value("pred", "setp.eq.u32", flag, "0"))
    f.ins("membar.gl")
    for row in acc:
        for r in row:
            f.ins("mov.f32", r, "0f00000000")
    first = f.value("b32", "mul.lo.u32", item, p["splits"])
    last = f.value("b32", "add.u32", first, p["splits"])
    f.comment(f"partials in split order, {ahead} loaded before any is added")
    with f.loop(first, last, str(ahead), "sum_splits") as s:
        loaded = []
        for u in range(ahead):
            plane_u = f.value("b32", "add.u32", s, str(u))
            there = f.value("pred", "setp.lt.u32", plane_u, last)
            loads = {}
            for i, j in outputs:
                at = _partial_index(f, plane_u, m, n, rows[i], cols[j])
                v = f.value("f32", "mov.f32", "0f00000000")
                ok = f.value("pred", "and.pred", there, inside[i][j])
                f.ins("ld.global.cg.f32", v, f.address(partials, at, 0, 4), guard=ok)
                loads[i, j] = (v, there)
            loaded.append(loads)
        for loads in loaded:
            for (i, j), (v, there) in loads.items():
                f.ins("add.rn.f32", acc[i][j], acc[i][j], v, guard=there)
    after = f.label("summed")
    f.ins("bra", after)
    f.place(done)
    f.ins("ret")
    f.place(after)


def _partial_index(f: PtxFunction, plane: str, m: str, n: str, row: str, col: str) -> str:
    """(plane · m + row) · n + col."""
    at = f.value("b32", "mad.lo.u32", plane, m, row)
    return f.value("b32", "mad.lo.u32", at, n, col)


def store_outputs(f: PtxFunction, p: dict[str, str], c: str, bias: str, base_c: str,
                  alpha: str, beta: str, rows: list[str], cols: list[str], col_ok: list[str],
                  inside: list[list[str]], acc: list[list[str]]) -> None:
    """C = alpha·acc + beta·C (C read only when beta ≠ 0), + bias[col], ReLU."""
    f.comment("C = alpha * acc + beta * C, then + bias[col] (epilogue 1, 2), ReLU (2)")
    reads_c = f.value("pred", "setp.ne.f32", beta, "0f00000000")
    has_bias = f.value("pred", "setp.ne.u32", p["epilogue"], "0")
    relu = f.value("pred", "setp.eq.u32", p["epilogue"], "2")
    biases = []
    for j, col in enumerate(cols):
        v = f.value("f32", "mov.f32", "0f00000000")
        ok = f.value("pred", "and.pred", has_bias, col_ok[j])
        f.ins("ld.global.f32", v, f.address(bias, col, 0, 4), guard=ok)
        biases.append(v)
    row_at = [f.value("b32", "mad.lo.u32", r, p["c_sr"], base_c) for r in rows]
    for i in range(len(rows)):
        for j in range(len(cols)):
            at = f.address(c, f.value("b32", "mad.lo.u32", cols[j], p["c_sc"], row_at[i]), 0, 4)
            old = f.value("f32", "mov.f32", "0f00000000")
            f.ins("ld.global.f32", old, at,
                  guard=f.value("pred", "and.pred", reads_c, inside[i][j]))
            f.ins("mul.rn.f32", old, old, beta)
            v = acc[i][j]
            f.ins("fma.rn.f32", v, v, alpha, old)  # alpha·acc + beta·C, rounded once
            f.ins("add.rn.f32", v, v, biases[j])
            f.ins("max.f32", v, v, "0f00000000", guard=relu)
            f.ins("st.global.f32", at, v, guard=inside[i][j])
