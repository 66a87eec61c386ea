"""SGEMM kernels for thin products — C with a few columns, or a short inner dimension —
that the autotuner times against cuBLAS and the 32×32 tiles (``ptx_gemm.py``).

A classifier head makes such products at every batch: logits = h·W (8192×10×256 at
batch 8192), its weight gradient hᵀ·dlogits (256×10×8192) and the gradient flowing back,
dlogits·Wᵀ (8192×256×10). They move megabytes and do almost no arithmetic, so the bound
is memory; tiles of 32×32 waste two thirds of their columns on n = 10, and cuBLAS spends
6–12 µs where reading the operands takes 2–3. Three shapes of kernel, each with the
small operand in shared memory:

- ``warp_rows`` (n ≤ ``THIN``, A loaded along k): a warp per row of C; lane l reads
  A[row, l + 32u] (coalesced) and accumulates the n dot products over its share of k,
  then a butterfly over the warp sums them (``shfl.sync.bfly``, a fixed order) and lane
  j stores column j. Bᵀ sits in shared memory, row j holding B's column j, so the lanes
  of a warp read consecutive words.
- ``thread_rows`` (n ≤ ``THIN``, A loaded along m): a thread per row of C, stepping
  through its range of k with the n products in registers; B's rows for that range in
  shared memory (one broadcast word per step and column). Split-K as ``ptx_gemm``'s
  kernels (partials in ``split_f32``, the last CTA sums them in split order), so a C of
  256 rows still fills the GPU.
- ``short_k`` (k ≤ ``SHORT``): a thread per column of C (a few for a wide C) with that
  column's k words of B in registers; a CTA takes a block of C's rows, whose rows of A
  it reads through shared memory, a row at a time, all threads alike.

The shapes are known when the plan is rendered, so the kernels are specialized to n and
k (loops unrolled, shared arrays sized); the epilogue is ``ptx_gemm``'s (alpha, beta,
bias, ReLU). Every order of additions is fixed: results are deterministic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

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

THIN = 16  # at most this many columns of C: a warp or thread per row
SHORT = 16  # at most this long an inner dimension: short_k
SHARED_FLOATS = 12288  # 48 KB of static shared memory
WARPS = 8  # warps per CTA
THREADS = 32 * WARPS
ROW_CTAS = 264  # warp_rows: CTAs in all (two per SM of an H100/200), rows shared out
ROW_LOADS = 32  # warp_rows: A's loads a lane issues at once (rows × steps of 32)
K_LOADS = 16  # thread_rows: A's loads a thread issues at once (steps of k)
SPLITS = (8, 16, 32, 64)  # thread_rows: split counts timed besides 1
SUM_AHEAD = 8  # thread_rows: splits whose partials are loaded before any is added
FILL_BATCH = 16  # shared-memory fills: loads issued before their stores
CTA_TARGET = 132  # short_k: rows per CTA so that about this many CTAs run
SHORT_COLUMNS = 8  # short_k: at most this many columns per thread (B's words in registers)


def thin_candidates(batch: int, mnk: tuple[int, int, int],
                    operands: list[tuple[str, int, tuple[int, int, int]]],
                    bias: tuple[str, int] | None, relu: bool, outer: int,
                    outer_strides: tuple[int, int, int], scale: tuple[float, float]
                    ) -> list[TiledLaunch]:
    """The launches of the kernels above that fit the product (empty for most)."""
    m, n, k = mnk
    items = batch * outer
    if 0 in (m, n, k) or items > 65535:
        return []
    (_, _, (_, a_sr, a_sc)), _, _ = operands
    product = Product(batch, mnk, operands, bias, relu, outer, outer_strides, scale)
    out = []

    if n <= THIN and a_sc == 1 and n * k + 32 <= SHARED_FLOATS:
        ctas = min(math.ceil(m / WARPS), ROW_CTAS)
        # rows a warp loads together: what its share of C has, as registers allow
        rows = max(1, min(4, ROW_LOADS // math.ceil(k / 32), math.ceil(m / (ctas * WARPS))))
        out.append(product.launch(f"fg_sgemm_warp_rows_n{n}_k{k}_r{rows}",
                                  warp_rows_text(n, k, rows), (ctas, 1, items), THREADS))
    if n <= THIN and a_sr == 1 and a_sc != 1:
        for splits in (1, *SPLITS):
            chunk = 8 * K_LOADS * math.ceil(math.ceil(k / splits) / (8 * K_LOADS))
            splits = math.ceil(k / chunk)
            # Bᵀ's chunk, the warps' sums and the split-K flag
            if n * (chunk + THREADS) + 1 > SHARED_FLOATS or (splits > 1 and (
                    items * splits * m * n > MAX_PARTIALS or items * splits > 65535)):
                continue
            out.append(product.launch(f"fg_sgemm_thread_rows_n{n}_kc{chunk}",
                                      thread_rows_text(n, chunk),
                                      (math.ceil(m / 32), 1, items * splits), THREADS,
                                      splits, chunk))
    if k <= SHORT and THIN < n <= SHORT_COLUMNS * THREADS:
        rows = max(1, min(32, m // CTA_TARGET))
        threads = min(THREADS, 32 * math.ceil(n / 32))
        out.append(product.launch(f"fg_sgemm_short_k_k{k}_n{n}_r{rows}_t{threads}",
                                  short_k_text(k, n, rows, threads),
                                  (math.ceil(m / rows), 1, items), threads))
    return list({t.name + str(t.grid): t for t in out}.values())  # splits that coincide


@functools.cache
def warp_rows_text(n: int, k: int, at_once: int) -> str:
    """A warp per row of C (module docstring), ``at_once`` rows at a time; entry
    ``ENTRY``."""
    steps = math.ceil(k / 32)  # a lane's elements of a row of A
    f, ptr, p, (alpha, beta) = gemm_kernel()
    a, b, c, bias = (ptr[x] for x in ("a", "b", "c", "bias"))
    f.shared.append(f".shared .align 4 .b8 b_t[{4 * (n * k + 32)}];")  # + a warp's overrun
    tid = f.special("%tid.x")
    lane = f.value("b32", "rem.u32", tid, "32")
    cta = product_of_cta(f, p)
    f.comment("B transposed into shared memory: row j is B's column j")
    table = f.value("b32", "mov.u32", "b_t")

    def b_element(idx: str) -> tuple[str, str, None]:
        kk = f.value("b32", "rem.u32", idx, str(k))
        at = f.value("b32", "mad.lo.u32", kk, p["b_sr"], cta.base["b"])
        f.ins("mad.lo.u32", at, f.value("b32", "div.u32", idx, str(k)), p["b_sc"], at)
        return b, at, None

    _fill(f, table, n * k, THREADS, tid, b_element)

    f.comment(f"a warp per row of C, {at_once} rows at a time, over every warp of the grid")
    warp = f.value("b32", "mad.lo.u32", f.special("%ctaid.x"), str(WARPS),
                   f.value("b32", "div.u32", tid, "32"))
    every = f.value("b32", "mul.lo.u32", f.special("%nctaid.x"), str(WARPS))
    first = f.value("b32", "mul.lo.u32", warp, str(at_once))
    stride = f.value("b32", "mul.lo.u32", every, str(at_once))
    my_b = f.value("b32", "mad.lo.u32", lane, "4", table)
    lane_bits = {o: f.value("pred", "setp.ne.u32", f.value("b32", "and.b32", lane, str(o)),
                            "0") for o in OFFSETS}
    column = f.value("b32", "mov.u32", "0")  # the column this lane's sum ends as
    for o, half in _halves(n):
        f.ins("add.u32", column, column, str(half), guard=lane_bits[o])
    # of the lanes that end with a column's sum (they differ only in the bits of the
    # butterfly's stages), the one with those bits clear stores it
    repeats = sum(o for o in OFFSETS if o not in dict(_halves(n)))
    column_ok = f.value("pred", "setp.lt.u32", column, str(n))
    first_copy = f.value("pred", "setp.eq.u32", f.value("b32", "and.b32", lane, str(repeats)),
                         "0")
    f.ins("and.pred", column_ok, column_ok, first_copy)
    last_ok = f.value("pred", "setp.lt.u32", lane, str(k - 32 * (steps - 1)))
    with f.loop(first, p["m"], stride, "rows") as row0:
        rows = [f.value("b32", "add.u32", row0, str(r)) for r in range(at_once)]
        row_ok = [f.value("pred", "setp.lt.u32", r, p["m"]) for r in rows]
        values = []
        for row, ok in zip(rows, row_ok, strict=True):
            a_row = f.value("b32", "mad.lo.u32", row, p["a_sr"], cta.base["a"])
            f.ins("add.u32", a_row, a_row, lane)
            loads = []
            for step in range(steps):
                v = f.value("f32", "mov.f32", "0f00000000")
                load_ok = f.value("pred", "and.pred", ok, last_ok) if step == steps - 1 \
                    and k % 32 else ok
                f.ins("ld.global.f32", v, f.address(a, a_row, 32 * step, 4), guard=load_ok)
                loads.append(v)
            values.append(loads)
        acc = [[f.value("f32", "mov.f32", "0f00000000") for _ in range(n)]
               for _ in range(at_once)]
        for step in range(steps):
            # lanes past k read the next column's (or the pad's) words: no FMA there,
            # so an Inf in one column cannot turn another's sum into NaN
            in_k = last_ok if step == steps - 1 and k % 32 else None
            for j in range(n):
                w = f.value("f32", "ld.shared.f32", f"[{my_b}+{4 * (j * k + 32 * step)}]")
                for i in range(at_once):
                    f.ins("fma.rn.f32", acc[i][j], values[i][step], w, acc[i][j], guard=in_k)
        f.comment("each row's sums over the warp, a column to a lane; that lane stores it")
        for i, row in enumerate(rows):
            total = _sums_to_lanes(f, acc[i], lane_bits)
            ok = f.value("pred", "and.pred", row_ok[i], column_ok)
            store_outputs(f, p, c, bias, cta.base["c"], alpha, beta, [row], [column],
                          [column_ok], [[ok]], [[total]])
    return f.text("ENTRY")


OFFSETS = (16, 8, 4, 2, 1)  # the butterfly's lane distances


def _halves(n: int) -> list[tuple[int, int]]:
    """For ``_sums_to_lanes``: (offset, half) of each stage that splits the columns a
    lane holds — the lanes with the offset's bit set keep the upper half, ``half``
    columns on — for n padded to a power of two, so that the halves are exact and lane
    l's column, Σ half over the stages whose bit l has, names each column (pads: ≥ n)
    for one set of split bits only; the stages after the columns are down to one only
    add."""
    out, count = [], 1 << (n - 1).bit_length()
    for o in OFFSETS:
        if count == 1:
            break
        count //= 2
        out.append((o, count))
    return out


def _sums_to_lanes(f: PtxFunction, values: list[str], lane_bits: dict[int, str]) -> str:
    """The sum over the warp of each of ``values`` (one per column), lane l ending
    with column ``Σ half`` over the stages whose offset bit l has (``_halves``): at
    each stage a lane sends its partner the half of its columns it gives up and adds
    the partner's share of the half it keeps (n sends in all, not 5·n as a butterfly
    per column would); then, one column left, a butterfly. A fixed order of
    additions for every lane and shape."""
    splits = dict(_halves(len(values)))
    zero = f.value("f32", "mov.f32", "0f00000000")  # the pads up to a power of two
    held = list(values) + [zero] * (2 * next(iter(splits.values()), 0) - len(values))
    for o, half in splits.items():
        bit = lane_bits[o]
        kept = []
        for low, high in zip(held[:half], held[half:], strict=True):
            if low == zero and high == zero:  # both pads: still a pad
                kept.append(zero)
                continue
            give = f.value("f32", "selp.f32", low, high, bit)
            keep = f.value("f32", "selp.f32", high, low, bit)
            got = f.value("f32", "shfl.sync.bfly.b32", give, str(o), "0x1f", "0xffffffff")
            kept.append(f.value("f32", "add.rn.f32", keep, got))
        held = kept
    (total,) = held
    f.butterfly(total, "add.rn.f32", min(splits, default=32))  # the offsets left
    return total


def _fill(f: PtxFunction, table: str, count: int, threads: int, tid: str,
          element: Callable[[str], tuple[str, str, str | None]]) -> None:
    """``table[idx]`` (a shared array of f32) = the element ``element(idx)`` names —
    (pointer, index, guard: 0 where false) — for idx < ``count``, shared by the CTA's
    threads, ``FILL_BATCH`` loads issued before their stores; then a barrier."""
    per = math.ceil(count / threads)
    for first in range(0, per, FILL_BATCH):
        batch = []
        for q in range(first, min(per, first + FILL_BATCH)):
            idx = f.value("b32", "add.u32", tid, str(q * threads))
            there = f.value("pred", "setp.lt.u32", idx, str(count)) \
                if (q + 1) * threads > count else None
            ptr, at, guard = element(idx)
            if there and guard:
                guard = f.value("pred", "and.pred", there, guard)
            v = f.load("f32", f.address(ptr, at, 0, 4), guard=guard or there)
            batch.append((idx, there, v))
        for idx, there, v in batch:
            f.ins("st.shared.f32", f"[{f.value('b32', 'mad.lo.u32', idx, '4', table)}]", v,
                  guard=there)
    f.ins("bar.sync", "0")


@functools.cache
def thread_rows_text(n: int, chunk: int) -> str:
    """C's rows over a ``chunk`` of k (module docstring): lane l of every warp takes row
    ``32·ctaid.x + l``, warp w the steps w, w + 8, ... of the chunk; the warps' sums
    meet in shared memory, added in warp order. Entry ``ENTRY``."""
    f, ptr, p, (alpha, beta) = gemm_kernel()
    a, b, c, bias, partials, counts = (ptr[x] for x in POINTERS)
    f.shared += [f".shared .align 4 .b8 b_t[{4 * n * chunk}];",
                 f".shared .align 4 .b8 sums[{4 * n * THREADS}];"]
    tid = f.special("%tid.x")
    lane = f.value("b32", "rem.u32", tid, "32")
    warp = f.value("b32", "div.u32", tid, "32")
    cta = product_of_cta(f, p)
    length = f.value("b32", "sub.u32", cta.k_end, cta.k_begin)

    f.comment("this split's rows of B, transposed into shared memory (0 past its end)")
    table = f.value("b32", "mov.u32", "b_t")

    def b_element(idx: str) -> tuple[str, str, str]:
        t = f.value("b32", "rem.u32", idx, str(chunk))
        at = f.value("b32", "mad.lo.u32", f.value("b32", "add.u32", cta.k_begin, t),
                     p["b_sr"], cta.base["b"])
        f.ins("mad.lo.u32", at, f.value("b32", "div.u32", idx, str(chunk)), p["b_sc"], at)
        return b, at, f.value("pred", "setp.lt.u32", t, length)

    _fill(f, table, n * chunk, THREADS, tid, b_element)

    row = f.value("b32", "mad.lo.u32", f.special("%ctaid.x"), "32", lane)
    row_ok = f.value("pred", "setp.lt.u32", row, p["m"])
    a_at = f.value("b32", "add.u32", cta.k_begin, warp)
    f.ins("mad.lo.u32", a_at, a_at, p["a_sc"], cta.base["a"])
    f.ins("mad.lo.u32", a_at, row, p["a_sr"], a_at)
    step_a = f.value("b32", "mul.lo.u32", p["a_sc"], str(8 * K_LOADS))
    b_here = f.value("b32", "mad.lo.u32", warp, "4", table)
    acc = [f.value("f32", "mov.f32", "0f00000000") for _ in range(n)]
    f.comment(f"the warp's steps of k, {K_LOADS} loads at a time, then their products")
    with f.loop(warp, length, str(8 * K_LOADS), "k_steps") as t:
        values = []
        for u in range(K_LOADS):
            v = f.value("f32", "mov.f32", "0f00000000")
            tu = f.value("b32", "add.u32", t, str(8 * u))
            ok = f.value("pred", "setp.lt.and.u32", tu, length, row_ok)
            f.ins("ld.global.f32", v, f.address(
                a, f.value("b32", "mad.lo.u32", p["a_sc"], str(8 * u), a_at), 0, 4), guard=ok)
            values.append(v)
        for u, v in enumerate(values):  # B's words past the split's end are 0
            for j in range(n):
                w = f.value("f32", "ld.shared.f32", f"[{b_here}+{4 * (j * chunk + 8 * u)}]")
                f.ins("fma.rn.f32", acc[j], v, w, acc[j])
        f.ins("add.u32", a_at, a_at, step_a)
        f.ins("add.u32", b_here, b_here, str(4 * 8 * K_LOADS))

    f.comment("the warps' sums through shared memory, added in warp order by warp 0")
    sums = f.value("b32", "mad.lo.u32", tid, "4", f.value("b32", "mov.u32", "sums"))
    for j in range(n):
        f.ins("st.shared.f32", f"[{sums}+{4 * j * THREADS}]", acc[j])
    f.ins("bar.sync", "0")
    first_warp = f.value("pred", "setp.eq.u32", warp, "0")
    for j in range(n):
        f.ins("mov.f32", acc[j], "0f00000000")
        for other_warp in range(WARPS):
            v = f.value("f32", "mov.f32", "0f00000000")
            f.ins("ld.shared.f32", v, f"[{sums}+{4 * (j * THREADS + 32 * other_warp)}]",
                  guard=first_warp)
            f.ins("add.rn.f32", acc[j], acc[j], v)
    cols = [f.value("b32", "mov.u32", str(j)) for j in range(n)]
    yes = f.value("pred", "setp.eq.u32", tid, tid)
    inside = [[f.value("pred", "and.pred", row_ok, first_warp)] * n]
    done = f.label("epilogue")
    f.ins("bra", done, guard=f"!{f.value('pred', 'setp.gt.u32', p['splits'], '1')}")
    reduce_splits(f, p, partials, counts, cta.item, cta.split, tid, [row], cols, inside,
                  [acc], SUM_AHEAD)
    f.place(done)
    store_outputs(f, p, c, bias, cta.base["c"], alpha, beta, [row], cols, [yes] * n, inside,
                  [acc])
    return f.text("ENTRY")


@functools.cache
def short_k_text(k: int, n: int, rows: int, threads: int) -> str:
    """C's rows, ``rows`` per CTA, from a short inner dimension (module docstring):
    thread t owns columns t, t + threads, ... and holds their k words of B in registers;
    the block's rows of A come through shared memory. Entry ``ENTRY``."""
    f, ptr, p, (alpha, beta) = gemm_kernel()
    a, b, c, bias = (ptr[x] for x in ("a", "b", "c", "bias"))
    f.shared.append(f".shared .align 4 .b8 a_s[{4 * rows * k}];")
    tid = f.special("%tid.x")
    cta = product_of_cta(f, p)
    row0 = f.value("b32", "mul.lo.u32", f.special("%ctaid.x"), str(rows))

    f.comment("this thread's columns of B into registers")
    cols = [f.value("b32", "add.u32", tid, str(threads * u))
            for u in range(math.ceil(n / threads))]
    col_ok = [f.value("pred", "setp.lt.u32", j, str(n)) for j in cols]
    words = []
    for j, ok in zip(cols, col_ok, strict=True):
        at = f.value("b32", "mad.lo.u32", j, p["b_sc"], cta.base["b"])
        words.append([f.load("f32", f.address(b, f.value("b32", "mad.lo.u32", p["b_sr"],
                                                           str(kk), at), 0, 4), guard=ok)
                      for kk in range(k)])

    f.comment("this block's rows of A into shared memory")
    a_s = f.value("b32", "mov.u32", "a_s")

    def a_element(idx: str) -> tuple[str, str, str]:
        r = f.value("b32", "add.u32", row0, f.value("b32", "div.u32", idx, str(k)))
        at = f.value("b32", "mad.lo.u32", r, p["a_sr"], cta.base["a"])
        f.ins("mad.lo.u32", at, f.value("b32", "rem.u32", idx, str(k)), p["a_sc"], at)
        return a, at, f.value("pred", "setp.lt.u32", r, p["m"])

    _fill(f, a_s, rows * k, threads, tid, a_element)

    f.comment("row by row: its k words of A (the same for every thread), then a sum per")
    f.comment("column this thread owns")
    last = f.value("b32", "sub.u32", p["m"], row0)
    f.ins("min.u32", last, last, str(rows))
    with f.loop(f.value("b32", "mov.u32", "0"), last, "1", "rows") as i:
        a_row = f.value("b32", "mad.lo.u32", i, str(4 * k), a_s)
        xs = [f.value("f32", "ld.shared.f32", f"[{a_row}+{4 * kk}]") for kk in range(k)]
        acc = []
        for column in words:
            total = f.value("f32", "mov.f32", "0f00000000")
            for x, y in zip(xs, column, strict=True):
                f.ins("fma.rn.f32", total, x, y, total)
            acc.append(total)
        row = f.value("b32", "add.u32", row0, i)
        store_outputs(f, p, c, bias, cta.base["c"], alpha, beta, [row], cols, col_ok,
                      [col_ok], [acc])
    return f.text("ENTRY")
