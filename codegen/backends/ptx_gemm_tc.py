"""Tensor-core SGEMM at float32 accuracy ("3xTF32"): candidates the autotuner times
against cuBLAS when a CUDA step is opened with ``tf32x3=True``.

An H100/H200 multiplies strict fp32 at ~51 TFLOP/s (FFMA), and its tensor cores TF32 —
a 10-bit mantissa — several times faster. Each fp32 operand splits into two TF32 values,
``x = big + small`` with ``big = tf32(x)`` and ``small = tf32(x - big)``; then

    a·b ≈ big_a·big_b + big_a·small_b + small_a·big_b

on the tensor cores, accumulated in fp32. The dropped small_a·small_b and the rounding
of ``small`` are ~2⁻²² of |a·b|, the size of fp32's own rounding of each product-sum,
so results have fp32's accuracy (not its bits: sums run in another order, as between
any two GEMM algorithms). The small terms go first, so they are not lost against the
large partial sums.

The kernel (one per CTA shape in ``SHAPES``; any strides, like ``ptx_gemm``'s):

- a CTA computes a ``bm`` × ``bn`` tile of C, its warps a ``warps_m`` × ``warps_n`` grid
  of warp tiles, each a grid of 16×8 ``mma.sync.m16n8k8`` tiles;
- the inner dimension goes ``BK`` (32) at a time: A's and B's tiles are loaded from
  global memory into registers (the next step's while this one multiplies), stored in
  shared memory in the operand's own orientation (rows padded so that both the stores
  and the fragment loads hit 32 distinct banks), and each warp reads its fragments,
  splits them, and issues three MMAs per 16×8×8 tile;
- rows of A (columns of B) past the operand's edge are read clamped to its last row —
  they only reach rows (columns) of C that are never stored — while k past the range
  reads 0, as it must;
- split-K and the epilogue (alpha, beta, bias, ReLU) are ``ptx_gemm``'s.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

from .ptx_asm import PtxFunction
from .ptx_gemm import (
    MAX_PARTIALS,
    POINTERS,
    Product,
    TiledLaunch,
    gemm_kernel,
    product_of_cta,
    reduce_splits,
    store_outputs,
)

BK = 32  # inner-dimension step
K_PAD = 4  # a k-major row of BK + 4 words: fragment loads (4g + t) hit 32 banks
OUTER_PAD = 8  # an m/n-major row of bm + 8 words: fragment loads (8t + g) hit 32 banks
MIN_FLOPS = 1 << 26  # smaller products are ptx_gemm's and the thin kernels'
TARGET_CTAS = 264  # split-K: enough ranges to put two CTAs on each SM of an H100/200
MAX_SPLITS = 16
MMA = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"


class Shape(NamedTuple):
    """A CTA's tile of C (``bm`` × ``bn``) and its warps' grid."""

    bm: int
    bn: int
    warps_m: int
    warps_n: int

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def m_tiles(self) -> int:  # 16-row MMA tiles per warp
        return self.bm // self.warps_m // 16

    @property
    def n_tiles(self) -> int:  # 8-column MMA tiles per warp
        return self.bn // self.warps_n // 8


SHAPES = (Shape(128, 128, 2, 4), Shape(128, 64, 2, 2), Shape(64, 64, 2, 2))


def kernel_name(shape: Shape, a_k: bool, b_k: bool) -> str:
    """``fg_sgemm_tf32x3_128x128_kn``: the CTA's tile; A loaded along k or m, B along k
    or n."""
    return (f"fg_sgemm_tf32x3_{shape.bm}x{shape.bn}_"
            f"{'k' if a_k else 'm'}{'k' if b_k else 'n'}")


def split_choices(m: int, n: int, k: int, items: int, shape: Shape) -> list[int]:
    """1, and the split count that brings the CTAs to about ``TARGET_CTAS`` when the tiles
    alone are fewer (each range at least two steps long)."""
    tiles = math.ceil(m / shape.bm) * math.ceil(n / shape.bn) * items
    most = min(MAX_SPLITS, max(1, k // (2 * BK)), max(1, MAX_PARTIALS // (items * m * n)))
    splits = min(most, max(1, TARGET_CTAS // tiles))
    return sorted({1, math.ceil(k / _chunk(k, splits))})


def _chunk(k: int, splits: int) -> int:
    """Each split's inner range: a multiple of ``BK`` (the last may be shorter)."""
    return BK * math.ceil(math.ceil(k / max(splits, 1)) / BK)


def tensor_candidates(batch: int, mnk: tuple[int, int, int],
                      operands: list[tuple[str, int, tuple[int, int, int]]],
                      bias: tuple[str, int] | None, relu: bool, outer: int,
                      outer_strides: tuple[int, int, int], scale: tuple[float, float]
                      ) -> list[TiledLaunch]:
    """One launch per CTA shape and split count for a product of at least ``MIN_FLOPS``
    (empty for a smaller one)."""
    m, n, k = mnk
    items = batch * outer
    if 2 * m * n * k * items < MIN_FLOPS or 0 in (m, n, k):
        return []
    product = Product(batch, mnk, operands, bias, relu, outer, outer_strides, scale)
    (_, _, (_, a_sr, a_sc)), (_, _, (_, b_sr, b_sc)), _ = operands
    a_k, b_k = a_sc == 1 or a_sr != 1, b_sr == 1 and b_sc != 1
    out = []
    for shape in SHAPES:
        grid_xy = (math.ceil(n / shape.bn), math.ceil(m / shape.bm))
        for splits in split_choices(m, n, k, items, shape):
            if items * splits > 65535:
                continue
            name = kernel_name(shape, a_k, b_k)
            out.append(product.launch(name, tf32x3_text(shape, a_k, b_k),
                                      (*grid_xy, items * splits), shape.threads, splits,
                                      _chunk(k, splits)))
    return out


class _Tile(NamedTuple):
    """An operand's tile in shared memory: element (outer, k) at word
    ``outer · pitch + k`` (k-major rows) or ``k · pitch + outer``."""

    name: str
    walk_k: bool
    pitch: int
    words: int

    @staticmethod
    def of(name: str, outer: int, walk_k: bool) -> _Tile:
        pitch = BK + K_PAD if walk_k else outer + OUTER_PAD
        return _Tile(name, walk_k, pitch, pitch * (outer if walk_k else BK))

    def word(self, outer: int, k: int) -> int:
        return outer * self.pitch + k if self.walk_k else k * self.pitch + outer


class _Loader:
    """Moves an operand's ``outer`` × ``BK`` tile from global memory (registers) to
    shared memory. Thread ``tid`` holds the elements at ``tid % W`` along the dim the
    loads walk (W = 32 along k, else ``outer``) and ``tid / W + (threads / W)·q`` along
    the other, so a warp's loads cover consecutive addresses."""

    def __init__(self, f: PtxFunction, ptr: str, base: str, start: str, size: str,
                 outer_stride: str, k_stride: str, tile: _Tile, outer: int, threads: int,
                 tid: str) -> None:
        self.f, self.ptr, self.tile, self.k_stride = f, ptr, tile, k_stride
        walk = BK if tile.walk_k else outer
        self.count = outer * BK // threads
        self.step = threads // walk  # along the other dim, between registers
        self.regs = [f.reg("f32") for _ in range(self.count)]
        lane = f.value("b32", "rem.u32", tid, str(walk))
        rank = f.value("b32", "div.u32", tid, str(walk))
        last = f.value("b32", "sub.u32", size, "1")
        f.comment("an operand's tile: its rows' (columns') offsets, clamped to the edge")
        if tile.walk_k:
            self.k_first = lane
            self.offsets = []
            for q in range(self.count):
                coord = f.value("b32", "add.u32", start,
                                f.value("b32", "add.u32", rank, str(self.step * q)))
                f.ins("min.u32", coord, coord, last)
                self.offsets.append(f.value("b32", "mad.lo.u32", coord, outer_stride, base))
        else:
            self.k_first = rank
            coord = f.value("b32", "add.u32", start, lane)
            f.ins("min.u32", coord, coord, last)
            self.offsets = [f.value("b32", "mad.lo.u32", coord, outer_stride, base)]
        # either way register 0's element sits at word rank·pitch + lane, and register q's
        # step·pitch words further on
        first = f.value("b32", "mad.lo.u32", rank, str(tile.pitch), lane)
        self.slot = f.value("b32", "mad.lo.u32", first, "4",
                            f.value("b32", "mov.u32", tile.name))

    def load(self, t: str, k_end: str) -> None:
        """The step at ``t``'s elements into the registers (0 past ``k_end``)."""
        f = self.f
        kk = f.value("b32", "add.u32", t, self.k_first)
        if self.tile.walk_k:
            ok = f.value("pred", "setp.lt.u32", kk, k_end)
            k_at = f.value("b32", "mul.lo.u32", kk, self.k_stride)
            for reg, offset in zip(self.regs, self.offsets, strict=True):
                f.ins("mov.f32", reg, "0f00000000")
                index = f.value("b32", "add.u32", offset, k_at)
                f.ins("ld.global.nc.f32", reg, f.address(self.ptr, index, 0, 4), guard=ok)
            return
        for q, reg in enumerate(self.regs):
            kq = f.value("b32", "add.u32", kk, str(self.step * q))
            ok = f.value("pred", "setp.lt.u32", kq, k_end)
            index = f.value("b32", "mad.lo.u32", kq, self.k_stride, self.offsets[0])
            f.ins("mov.f32", reg, "0f00000000")
            f.ins("ld.global.nc.f32", reg, f.address(self.ptr, index, 0, 4), guard=ok)

    def to_shared(self) -> None:
        between = self.step * self.tile.pitch  # words between registers' slots
        for q, reg in enumerate(self.regs):
            self.f.ins("st.shared.f32", f"[{self.slot}+{4 * between * q}]", reg)


def _split(f: PtxFunction, x: str, how: str = "cvt") -> tuple[str, str]:
    """fp32 ``x`` as two TF32 values (bit patterns in b32 registers): big, small."""
    if how == "cvt":
        big = f.value("b32", "cvt.rna.tf32.f32", x)
        rest = f.value("f32", "sub.rn.f32", x, f.value("f32", "mov.b32", big))
        return big, f.value("b32", "cvt.rna.tf32.f32", rest)
    if how == "int":
        big = f.value("b32", "add.u32", f.value("b32", "mov.b32", x), "4096")
        f.ins("and.b32", big, big, "-8192")
        rest = f.value("f32", "sub.rn.f32", x, f.value("f32", "mov.b32", big))
        return big, f.value("b32", "mov.b32", rest)
    raw = f.value("b32", "mov.b32", x)
    return raw, raw


@functools.cache  # a few variants, asked for by every large GEMM of a model
def tf32x3_text(shape: Shape, a_k: bool, b_k: bool, how: str = "cvt", terms: int = 3
                ) -> str:
    """The kernel (entry name ``ENTRY``) for ``shape``; see the module docstring."""
    f, ptr, p, (alpha, beta) = gemm_kernel()
    a, b, c, bias, partials, counts = (ptr[x] for x in POINTERS)
    tile_a = _Tile.of("tile_a", shape.bm, a_k)
    tile_b = _Tile.of("tile_b", shape.bn, b_k)
    f.shared += [f".shared .align 16 .b8 {t.name}[{4 * t.words}];" for t in (tile_a, tile_b)]
    tid = f.special("%tid.x")
    warp = f.value("b32", "div.u32", tid, "32")
    lane = f.value("b32", "rem.u32", tid, "32")
    group = f.value("b32", "div.u32", lane, "4")  # the MMA fragments' row (column) in 8
    pair = f.value("b32", "rem.u32", lane, "4")  # ... and k in 4 (C: column pair)
    warp_m = f.value("b32", "div.u32", warp, str(shape.warps_n))
    warp_n = f.value("b32", "rem.u32", warp, str(shape.warps_n))
    col0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.x"), str(shape.bn))
    row0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.y"), str(shape.bm))
    item, split, base, k_begin, k_end = product_of_cta(f, p)

    load_a = _Loader(f, a, base["a"], row0, p["m"], p["a_sr"], p["a_sc"], tile_a, shape.bm,
                     shape.threads, tid)
    load_b = _Loader(f, b, base["b"], col0, p["n"], p["b_sc"], p["b_sr"], tile_b, shape.bn,
                     shape.threads, tid)
    wm, wn = shape.bm // shape.warps_m, shape.bn // shape.warps_n
    # this lane's first fragment element: A (warp's first row + group, k = pair), B alike
    frag = {}
    for x, t, w, size in (("a", tile_a, warp_m, wm), ("b", tile_b, warp_n, wn)):
        outer = f.value("b32", "mad.lo.u32", w, str(size), group)
        word = (f.value("b32", "mad.lo.u32", outer, str(t.pitch), pair) if t.walk_k else
                f.value("b32", "mad.lo.u32", pair, str(t.pitch), outer))
        frag[x] = f.value("b32", "mad.lo.u32", word, "4", f.value("b32", "mov.u32", t.name))
    acc = {(i, j): [f.value("f32", "mov.f32", "0f00000000") for _ in range(4)]
           for i in range(shape.m_tiles) for j in range(shape.n_tiles)}

    f.comment("the first step's tiles into registers, then: registers -> shared, the")
    f.comment("next step's loads issued, this step multiplied on the tensor cores")
    load_a.load(k_begin, k_end)
    load_b.load(k_begin, k_end)
    with f.loop(k_begin, k_end, str(BK), "k_step") as t:
        load_a.to_shared()
        load_b.to_shared()
        f.ins("bar.sync", "0")
        t_next = f.value("b32", "add.u32", t, str(BK))
        load_a.load(t_next, k_end)
        load_b.load(t_next, k_end)
        for kk in range(0, BK, 8):
            a_frags = []
            for i in range(shape.m_tiles):  # a0..a3: (g, k), (g + 8, k), (g, k + 4), ...
                words = [tile_a.word(16 * i + 8 * h, kk + 4 * c) for c in (0, 1) for h in (0, 1)]
                xs = [f.value("f32", "ld.shared.f32", f"[{frag['a']}+{4 * w}]") for w in words]
                a_frags.append([_split(f, x, how) for x in xs])
            b_frags = []
            for j in range(shape.n_tiles):  # b0, b1: (k, g), (k + 4, g)
                words = [tile_b.word(8 * j, kk + 4 * c) for c in (0, 1)]
                xs = [f.value("f32", "ld.shared.f32", f"[{frag['b']}+{4 * w}]") for w in words]
                b_frags.append([_split(f, x, how) for x in xs])
            for (i, j), d in acc.items():
                fa, fb = a_frags[i], b_frags[j]
                regs = "{" + ", ".join(d) + "}"
                for ua, ub in ((1, 0), (0, 1), (0, 0))[3 - terms:]:  # small terms first
                    f.ins(MMA, regs, "{" + ", ".join(x[ua] for x in fa) + "}",
                          "{" + ", ".join(x[ub] for x in fb) + "}", regs)
        f.ins("bar.sync", "0")

    f.comment("C's rows g, g + 8 of each 16-row tile; columns 2t, 2t + 1 of each 8")
    m_first = f.value("b32", "mad.lo.u32", warp_m, str(wm), row0)
    m_first = f.value("b32", "add.u32", m_first, group)
    n_first = f.value("b32", "mad.lo.u32", warp_n, str(wn), col0)
    n_first = f.value("b32", "mad.lo.u32", pair, "2", n_first)
    rows = [f.value("b32", "add.u32", m_first, str(16 * i + 8 * h))
            for i in range(shape.m_tiles) for h in (0, 1)]
    cols = [f.value("b32", "add.u32", n_first, str(8 * j + u))
            for j in range(shape.n_tiles) for u in (0, 1)]
    grid = [[acc[i // 2, j // 2][2 * (i % 2) + j % 2] for j in range(len(cols))]
            for i in range(len(rows))]
    row_ok = [f.value("pred", "setp.lt.u32", r, p["m"]) for r in rows]
    col_ok = [f.value("pred", "setp.lt.u32", cc, p["n"]) for cc in cols]
    inside = [[f.value("pred", "and.pred", ok, col_ok[j]) for j in range(len(cols))]
              for ok in row_ok]
    epilogue = f.label("epilogue")
    split_k = f.value("pred", "setp.gt.u32", p["splits"], "1")
    f.ins("bra", epilogue, guard=f"!{split_k}")
    reduce_splits(f, p, partials, counts, item, split, tid, rows, cols, inside, grid, ahead=1)
    f.place(epilogue)
    store_outputs(f, p, c, bias, base["c"], alpha, beta, rows, cols, col_ok, inside, grid)
    return f.text("ENTRY")


def all_variants() -> list[tuple[str, str]]:
    """Every kernel's (name, text): what ptxas checks in the tests."""
    return [(kernel_name(s, a_k, b_k), tf32x3_text(s, a_k, b_k))
            for s, a_k, b_k in itertools.product(SHAPES, (True, False), (True, False))]
