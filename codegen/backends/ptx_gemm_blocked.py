"""Block-tiled SGEMM kernels for large products: 8×8 outputs per thread, the autotuner's
candidates against cuBLAS where ``ptx_gemm.py``'s 32×32 tiles are too small.

A thread of a 32×32-tile kernel multiplies 4×4 values per shared-memory step and waits
on shared loads for a quarter of its instructions; large products need more arithmetic
per load. Here a CTA computes a BM × BN tile of C (``SHAPES``: 128×128 with 256 threads
down to 64×64 with 64) and each thread an 8×8 block of it, as four 4×4 quads (rows
``4·ty + i`` and ``BM/2 + 4·ty + i``, columns likewise with ``tx``), so every inner step
is four 16-byte shared loads (``ld.shared.v4``) for 64 FMAs; the eight threads of a
quarter warp read one A vector (broadcast) and eight consecutive B vectors (no bank
conflict). The inner dimension goes 8 at a time through two shared buffers: while one
is multiplied, the next step's tiles come from global memory into registers and then
into the other buffer, one ``bar.sync`` per step.

Tiles are stored k-major (``tile[k][m or n]``, rows of BM + 4 floats: 16-byte aligned,
and the k-major stores of an operand loaded along k spread over all 32 banks). Operands
take any strides; ``a_k`` / ``b_k`` choose the dim the loads walk, as in ``ptx_gemm``.
Split-K and the epilogue are ``ptx_gemm``'s (``finish_tile``), deterministic alike.
"""

from __future__ import annotations

import functools
import math

from ..launch_plan import ScalarArg
from .ptx_asm import PtxFunction
from .ptx_gemm import (
    MAX_PARTIALS,
    MAX_SPLITS,
    SCALARS,
    SCALES,
    SPLIT_COUNTS,
    SPLIT_PARTIALS,
    TARGET_CTAS,
    TiledLaunch,
    finish_tile,
    product_of_cta,
)

BK = 8  # inner-dimension step
QUAD = 4  # a thread's outputs are 2 × 2 quads of 4 × 4
SHAPES = ((128, 128), (128, 64), (64, 128), (64, 64))  # (BM, BN); threads = BM·BN / 64
PAD = 4  # floats after each shared row
STAGES = 4  # shared buffers: the step multiplied and the copies of the next 3 in flight
MIN_STEPS_PER_SPLIT = 8  # each split's range is at least this many steps of BK
MAX_WASTE = 1.34  # a shape is a candidate when its tiles cover at most this × C


def blocked_name(a_k: bool, b_k: bool, bm: int, bn: int) -> str:
    """``fg_sgemm_128x64_kn_t128``: as ``ptx_gemm.kernel_name``, for a BM × BN tile."""
    return f"fg_sgemm_{bm}x{bn}_{'k' if a_k else 'm'}{'k' if b_k else 'n'}_t{bm * bn // 64}"


def _chunk(k: int, splits: int) -> int:
    return BK * math.ceil(math.ceil(k / max(splits, 1)) / BK)


def blocked_splits(m: int, n: int, k: int, items: int, bm: int, bn: int) -> list[int]:
    """1, and the split counts that put ``TARGET_CTAS`` CTAs on the GPU when the tiles
    alone are fewer, each split at least ``MIN_STEPS_PER_SPLIT`` steps long."""
    tiles = math.ceil(m / bm) * math.ceil(n / bn) * items
    most = min(MAX_SPLITS, max(1, math.ceil(k / BK) // MIN_STEPS_PER_SPLIT),
               max(1, MAX_PARTIALS // (items * m * n)))
    choices = {1}
    for target in TARGET_CTAS:
        choices.add(math.ceil(k / _chunk(k, min(most, math.ceil(target / tiles)))))
    return sorted(choices)


def blocked_candidates(batch: int, mnk: tuple[int, int, int],
                       operands: list[tuple[str, int, tuple[int, int, int]]],
                       bias: tuple[str, int] | None, relu: bool, outer: int,
                       outer_strides: tuple[int, int, int], scale: tuple[float, float]
                       ) -> list[TiledLaunch]:
    """One launch per tile shape whose tiles cover C with little waste (``MAX_WASTE``)
    and per split count in ``blocked_splits``; arguments as ``ptx_gemm``'s kernels."""
    m, n, k = mnk
    items = batch * outer
    if k == 0:
        return []
    (_, _, (_, a_sr, a_sc)), (_, _, (_, b_sr, b_sc)), _ = operands
    a_k, b_k = a_sc == 1 or a_sr != 1, b_sr == 1 and b_sc != 1
    out = []
    for bm, bn in SHAPES:
        covered = math.ceil(m / bm) * bm * math.ceil(n / bn) * bn
        if covered > MAX_WASTE * m * n:
            continue
        for splits in blocked_splits(m, n, k, items, bm, bn):
            if items * splits > 65535:
                continue
            scalars = [ScalarArg("u32", x) for x in (*mnk, batch, outer, *outer_strides)]
            scalars += [ScalarArg("u32", s) for _, _, st in operands for s in st]
            scalars += [ScalarArg("u32", 0 if bias is None else 2 if relu else 1),
                        ScalarArg("u32", splits), ScalarArg("u32", _chunk(k, splits))]
            scalars += [ScalarArg("f32", x) for x in scale]
            pointers: list = [(b, off) for b, off, _ in operands]
            pointers.append(bias or pointers[2])  # unread without a bias
            pointers += [(SPLIT_PARTIALS, 0), (SPLIT_COUNTS, 0)]
            grid = (math.ceil(n / bn), math.ceil(m / bm), items * splits)
            split = splits > 1
            out.append(TiledLaunch(
                blocked_name(a_k, b_k, bm, bn), blocked_sgemm_text(a_k, b_k, bm, bn),
                pointers + scalars, grid, (bm * bn // 64, 1, 1),
                items * splits * m * n if split else 0,
                items * grid[0] * grid[1] if split else 0))
    return out


@functools.cache  # a few variants, asked for by every large GEMM of a model
def blocked_sgemm_text(a_k: bool, b_k: bool, bm: int, bn: int, warp_4x8: bool = False) -> str:
    """The kernel (entry name ``ENTRY``) for BM × BN tiles; see the module docstring.
    ``warp_4x8``: a warp's threads cover 4 (ty) × 8 (tx) instead of a row of BN / 8."""
    threads = bm * bn // 64
    row_a, row_b = bm + PAD, bn + PAD  # floats per shared row
    b_at = 4 * BK * row_a  # B's tile after A's, in each stage
    stage = b_at + 4 * BK * row_b  # bytes per stage
    f = PtxFunction([(".u64", x) for x in ("a", "b", "c", "bias", "partials", "counts")] +
                    [(".u32", s) for s in SCALARS] + [(".f32", s) for s in SCALES])
    a, b, c, bias, partials, counts = (f.param_pointer(x) for x in
                                       ("a", "b", "c", "bias", "partials", "counts"))
    p = {s: f.param_u32(s) for s in SCALARS}
    alpha, beta = (f.param_f32(s) for s in SCALES)
    f.shared += [f".shared .align 16 .b8 tiles[{STAGES * stage}];",
                 ".shared .align 4 .b8 last_flag[4];"]
    tid = f.special("%tid.x")
    if warp_4x8:
        lane = f.value("b32", "rem.u32", tid, "32")
        warp = f.value("b32", "div.u32", tid, "32")
        tx = f.value("b32", "rem.u32", warp, str(bn // 64))
        f.ins("mad.lo.u32", tx, tx, "8", f.value("b32", "rem.u32", lane, "8"))
        ty = f.value("b32", "div.u32", warp, str(bn // 64))
        f.ins("mad.lo.u32", ty, ty, "4", f.value("b32", "div.u32", lane, "8"))
    else:
        tx = f.value("b32", "rem.u32", tid, str(bn // 8))
        ty = f.value("b32", "div.u32", tid, str(bn // 8))
    col0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.x"), str(bn))
    row0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.y"), str(bm))
    cta = product_of_cta(f, p)

    tiles = f.value("b32", "mov.u32", "tiles")
    a_tile = _Loader(f, a, cta.base["a"], cta.k_begin, row0, p["m"], p["a_sr"], p["a_sc"],
                     walk_k=a_k, tid=tid, threads=threads, width=bm, row=row_a, shared=tiles)
    b_tile = _Loader(f, b, cta.base["b"], cta.k_begin, col0, p["n"], p["b_sc"], p["b_sr"],
                     walk_k=b_k, tid=tid, threads=threads, width=bn, row=row_b,
                     shared=f.value("b32", "add.u32", tiles, str(b_at)))
    read_a = f.value("b32", "mad.lo.u32", ty, str(4 * QUAD), tiles)  # &A[0][4·ty]
    read_b = f.value("b32", "mad.lo.u32", tx, str(4 * QUAD), tiles)
    f.ins("add.u32", read_b, read_b, str(b_at))  # &B[0][4·tx]
    acc = [[f.value("f32", "mov.f32", "0f00000000") for _ in range(2 * QUAD)]
           for _ in range(2 * QUAD)]

    f.comment(f"the first {STAGES - 1} steps' copies in flight, one group each")
    for s in range(STAGES - 1):
        a_tile.copy(cta.k_end, str(s * stage))
        b_tile.copy(cta.k_end, str(s * stage))
        f.ins("cp.async.commit_group")
    step = f.value("b32", "mov.u32", "0")  # steps done
    with f.loop(cta.k_begin, cta.k_end, str(BK), "k_step"):
        f.comment("this step's group landed (for every thread: the barrier), and every")
        f.comment("thread is done with the stage the next copies overwrite")
        f.ins("cp.async.wait_group", str(STAGES - 2))
        f.ins("bar.sync", "0")
        ahead_stage = f.value("b32", "add.u32", step, str(STAGES - 1))
        f.ins("rem.u32", ahead_stage, ahead_stage, str(STAGES))
        ahead_at = f.value("b32", "mul.lo.u32", ahead_stage, str(stage))
        a_tile.copy(cta.k_end, ahead_at)
        b_tile.copy(cta.k_end, ahead_at)
        f.ins("cp.async.commit_group")
        now = f.value("b32", "rem.u32", step, str(STAGES))
        f.ins("mul.lo.u32", now, now, str(stage))
        ra = f.value("b32", "add.u32", read_a, now)
        rb = f.value("b32", "add.u32", read_b, now)
        for kk in range(BK):
            xs = _vector(f, ra, 4 * kk * row_a, 4 * (kk * row_a + bm // 2))
            ys = _vector(f, rb, 4 * kk * row_b, 4 * (kk * row_b + bn // 2))
            for i, x in enumerate(xs):
                for j, y in enumerate(ys):
                    f.ins("fma.rn.f32", acc[i][j], x, y, acc[i][j])
        f.ins("add.u32", step, step, "1")
    f.ins("cp.async.wait_all")  # the copies past k_end (zero-filled) before the CTA exits

    def coords(start: str, t: str, half: int) -> list[str]:
        first = f.value("b32", "mad.lo.u32", t, str(QUAD), start)
        return [f.value("b32", "add.u32", first, str(h * half + i))
                for h in range(2) for i in range(QUAD)]

    finish_tile(f, p, (c, bias, partials, counts), cta, tid, coords(row0, ty, bm // 2),
                coords(col0, tx, bn // 2), acc, (alpha, beta))
    return f.text("ENTRY")


def _vector(f: PtxFunction, base: str, *offsets: int) -> list[str]:
    """The 4-float vectors at ``base`` + each byte offset, as one list of registers."""
    out = []
    for offset in offsets:
        regs = [f.reg("f32") for _ in range(QUAD)]
        f.ins("ld.shared.v4.f32", "{" + ", ".join(regs) + "}", f"[{base}+{offset}]")
        out += regs
    return out


class _Loader:
    """One operand's ``width`` × BK tile per step, ``width`` · BK / threads elements per
    thread, copied straight into shared memory k-major (``cp.async``, 4 bytes each,
    zero-filled outside the operand). Element e = tid + threads·q lies at (k, outer) =
    (e mod 8, e div 8) when the copies walk k, else (e div width, e mod width). Each
    ``copy`` is of the step after the previous one's, from ``k_begin`` on."""

    def __init__(self, f: PtxFunction, ptr: str, base: str, k_begin: str, start: str,
                 size: str, outer_stride: str, k_stride: str, *, walk_k: bool, tid: str,
                 threads: int, width: int, row: int, shared: str) -> None:
        """``base``: the operand's first element; ``start`` / ``size`` /
        ``outer_stride``: the tile's first row of A (column of B), A's rows (B's
        columns) and their stride; ``k_stride``: the inner one; ``row``: floats per
        shared row; ``shared``: the tile's byte address in stage 0."""
        # walking k, a thread's elements share its k; else they share its outer coord
        assert threads % (BK if walk_k else width) == 0
        self.f = f
        self.count = width * BK // threads
        if walk_k:
            k0 = f.value("b32", "rem.u32", tid, str(BK))
            outer0 = f.value("b32", "div.u32", tid, str(BK))
            self.q_step = (0, threads // BK)  # (k, outer) from one element to the next
        else:
            k0 = f.value("b32", "div.u32", tid, str(width))
            outer0 = f.value("b32", "rem.u32", tid, str(width))
            self.q_step = (threads // width, 0)
        slot = f.value("b32", "mad.lo.u32", k0, str(row), outer0)
        self.slot = f.value("b32", "mad.lo.u32", slot, "4", shared)
        self.slot_step = 4 * (self.q_step[0] * row + self.q_step[1])
        f.comment("an operand's elements: their addresses at the first step, and which")
        f.comment("lie inside it; then per copy, the k of the thread's first element")
        self.k = f.value("b32", "add.u32", k_begin, k0)
        self.advance = f.value("b64", "mul.wide.u32", k_stride, str(4 * BK))
        self.at: list[str] = []
        self.outer_ok: list[str] = []
        for q in range(self.count):
            coord = f.value("b32", "add.u32", start,
                            f.value("b32", "add.u32", outer0, str(self.q_step[1] * q)))
            self.outer_ok.append(f.value("pred", "setp.lt.u32", coord, size))
            index = f.value("b32", "mad.lo.u32", coord, outer_stride, base)
            kq = f.value("b32", "add.u32", self.k, str(self.q_step[0] * q))
            f.ins("mad.lo.u32", index, kq, k_stride, index)
            wide = f.value("b64", "mul.wide.u32", index, "4")
            self.at.append(f.value("b64", "add.s64", ptr, wide))

    def copy(self, k_end: str, stage_at: str) -> None:
        """This step's elements into the stage at byte offset ``stage_at``; then the
        addresses and k move on a step."""
        f = self.f
        dst = f.value("b32", "add.u32", self.slot, stage_at)
        for q, at in enumerate(self.at):
            kq = f.value("b32", "add.u32", self.k, str(self.q_step[0] * q)) if q and \
                self.q_step[0] else self.k
            ok = f.value("pred", "setp.lt.and.u32", kq, k_end, self.outer_ok[q])
            nbytes = f.value("b32", "selp.b32", "4", "0", ok)
            f.ins("cp.async.ca.shared.global", f"[{dst}+{self.slot_step * q}]", f"[{at}]",
                  "4", nbytes)
            f.ins("add.s64", at, at, self.advance)
        f.ins("add.u32", self.k, self.k, str(BK))
