"""Convolutions on the CUDA backend: gathers into the scratch arena and batched GEMMs.

The scheduler's ``Conv`` kernels (NCHW, contiguous views) become, with
K = C·kh·kw and P = OH·OW, one GEMM per image batched in one step (cuBLAS in the
runtime, or the plan's fallback kernel):

- forward: im2col, then ``out[n] (O×P) = W (O×K) · col[n] (K×P)``;
- input_grad: ``dcol[n] (K×P) = Wᵀ (K×O) · g[n] (O×P)``, then col2im as a gather:
  each input pixel adds its valid taps in (ki, kj) order;
- weight_grad: im2col, ``part[n] (O×K) = g[n] (O×P) · col[n]ᵀ (P×K)``, then the N
  partials summed by the reduce kernels of a column sum over [N, O·K].

where ``col[n][(c, ki, kj)][(oh, ow)] = x[n, c, oh·sh − ph + ki, ow·sw − pw + kj]``
(0 outside the image). Per image, because g is laid out [N, O, P]: its (n, p) pairs
are not one stride apart, so one GEMM with K = N·P would first need g transposed;
per image every operand is a plain strided matrix, and the sum over images is an
explicit reduction in a fixed order. No float atomics anywhere: every f32 sum has an
order fixed by the sizes (cuBLAS's by the library version and the GPU).

The columns live in the scratch arena, except those ``keep_columns`` keeps: a weight
gradient whose forward conv (same x, same geometry) ran earlier in the step reads that
conv's columns, written by its im2col into a temp the memory plan places (live from
the forward conv to its last weight gradient), instead of gathering them again. The
rule, ``KEEP_COLUMNS_BYTES``: the forward writes the columns anyway, so keeping them
costs no time, only memory held across the step, and saves a gather per conv (x read,
the columns written: about 1.1× their bytes of traffic); the saving per byte held is
the same for every conv, so no size makes one worth more than another. What bounds it
is memory: every kept matrix is live at the turn from forward to backward, so their
sum is what the peak can grow by, and the device's size is unknown when the plan is
made. So each entry point keeps columns, in the order its forward convs run, while
their sum stays within 1 GiB (under 2 % of an 80 GB GPU, an eighth of an 8 GB one;
the CNN at batch 256 keeps 36 MB); a conv whose columns do not fit gathers them again
in its weight gradient, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from ferrograd.ir.errors import BackendError
from ferrograd.ir.passes import debug_level

from ..kernel_ir import Buffer, Conv, Kernel, Reduce, View, contiguous_view
from ..schedule import Schedule
from .ptx_asm import PtxFunction
from .ptx_kernels import (
    SCRATCH,
    KernelLaunch,
    Step,
    _block_for,
    _check_u32,
    _param_list,
    gemm_step,
    reduce,
)

MAX_GRID_Y = 65535  # planes beyond it: a stride loop (pixels use grid x, up to 2^31)
# Column matrices kept from forward convs for their weight gradients, per entry point
# at most (bytes): see the module's docstring.
KEEP_COLUMNS_BYTES = 1 << 30


@dataclass
class ConvDims:
    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    oh: int = field(init=False)
    ow: int = field(init=False)

    def __post_init__(self) -> None:
        self.oh = (self.h + 2 * self.ph - self.kh) // self.sh + 1
        self.ow = (self.w + 2 * self.pw - self.kw) // self.sw + 1

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def k(self) -> int:  # the GEMMs' C·kh·kw
        return self.c * self.taps

    @property
    def p(self) -> int:  # output pixels per plane
        return self.oh * self.ow

    @property
    def col(self) -> int:  # elements of the column matrices of all images
        return self.n * self.k * self.p


def conv_dims(k: Conv) -> ConvDims:
    n, c, h, w, o, kh, kw = k.dims
    return ConvDims(n, c, h, w, o, kh, kw, *k.stride, *k.padding)


def conv(k: Conv, dtypes: dict[str, str], fast_math: bool) -> list[Step]:
    views = [k.lhs, k.rhs, k.out]
    if any(v is None or v.dtype != "f32" or not v.contiguous for v in views):
        raise BackendError(f"kernel {k.name}: convolutions read and write contiguous f32")
    d = conv_dims(k)
    if k.cols is not None and (k.mode == "input_grad" or k.cols.dtype != "f32" or
                               not k.cols.contiguous or k.cols.size != d.col):
        raise BackendError(f"kernel {k.name}: kept columns are x's [{d.n}, {d.k}, {d.p}] "
                           "of a forward conv or a weight gradient")
    _check_u32(k, d.col + d.n * d.o * d.k + 64,
               *(v.offset + v.size for v in (*views, k.cols) if v))
    return CONV_MODES[k.mode](k, d)


def _columns(k: Conv) -> tuple[str, int]:
    """Where the conv's column matrices are: the kept ones' buffer, or the scratch arena."""
    return (k.cols.buffer, k.cols.offset) if k.cols is not None else (SCRATCH, 0)


def _forward(k: Conv, d: ConvDims) -> list[Step]:
    assert k.lhs is not None and k.rhs is not None and k.out is not None
    w, out = k.rhs, k.out
    col, at = _columns(k)
    gemm = gemm_step(d.n, d.o, d.p, d.k, [(w.buffer, w.offset, (0, d.k, 1)),
                                          (col, at, (d.k * d.p, d.p, 1)),
                                          (out.buffer, out.offset, (d.o * d.p, d.p, 1))],
                     d.col if col == SCRATCH else 0)
    return [_im2col(k, d, k.lhs, (col, at)), gemm]


def _input_grad(k: Conv, d: ConvDims) -> list[Step]:
    assert k.lhs is not None and k.rhs is not None and k.out is not None
    g, w = k.lhs, k.rhs
    gemm = gemm_step(d.n, d.k, d.p, d.o, [(w.buffer, w.offset, (0, 1, d.k)),  # Wᵀ
                                          (g.buffer, g.offset, (d.o * d.p, d.p, 1)),
                                          (SCRATCH, 0, (d.k * d.p, d.p, 1))], d.col)
    return [gemm, _col2im(k, d, k.out)]


def _weight_grad(k: Conv, d: ConvDims) -> list[Step]:
    """The columns: kept by the forward conv, or gathered into the scratch arena here.
    The per-image products go after what the sum's own kernels use of the scratch arena
    (it depends on the sizes only, so a first rendering measures it) and after the
    columns when those are there (the GEMM reads them)."""
    assert k.lhs is not None and k.rhs is not None and k.out is not None
    g = k.rhs
    col, col_at = _columns(k)
    gather = [_im2col(k, d, k.lhs, (col, col_at))] if k.cols is None else []
    own = max((s.scratch for s in _sum_images(k, d, 0) if isinstance(s, KernelLaunch)),
              default=0)
    # 256-byte aligned, as cuBLAS likes its operands
    at = -(-max(d.col if col == SCRATCH else 0, own) // 64) * 64
    parts = d.o * d.k
    gemm = gemm_step(d.n, d.o, d.k, d.p, [(g.buffer, g.offset, (d.o * d.p, d.p, 1)),
                                          (col, col_at, (d.k * d.p, 1, d.p)),  # col[n]ᵀ
                                          (SCRATCH, at, (parts, d.k, 1))], at + d.n * parts)
    return [*gather, gemm, *_sum_images(k, d, at)]


def _sum_images(k: Conv, d: ConvDims, at: int) -> list[Step]:
    """dw = Σₙ part[n], the partials [N, O·K] at ``at`` in the scratch arena: the
    reduce kernels of that column sum (each output's sum in an order fixed by sizes)."""
    assert k.out is not None
    parts = d.o * d.k
    x = sp.Symbol("x0", real=True)
    total = Reduce(f"{k.name}_sum", ["reduce_sum"], shape=(d.n, parts), axes=(0,),
                   combine="sum", inputs={"x0": View(SCRATCH, "f32", at, (d.n, parts),
                                                     (parts, 1))},
                   value=x, out=View(k.out.buffer, "f32", k.out.offset, (1, parts), (0, 1)))
    return reduce(total, {SCRATCH: "f32", k.out.buffer: "f32"}, False)


# ---- the gathers -------------------------------------------------------------------------------


def _pixel_grid(f: PtxFunction, pixels: int, done: str) -> str:
    """This thread's pixel (x: pixels); threads past the last branch to ``done``."""
    ctaid, ntid, tid = (f.special(s) for s in ("%ctaid.x", "%ntid.x", "%tid.x"))
    q = f.value("b32", "mad.lo.u32", ctaid, ntid, tid)
    f.ins("bra", done, guard=f.value("pred", "setp.ge.u32", q, str(pixels)))
    return q


def _plane_launch(k: Conv, what: str, text: str, args: list[tuple[str, int]], pixels: int,
                  planes: int, scratch: int) -> KernelLaunch:
    """A thread per pixel (grid x) and image plane (grid y, a stride loop past 65535)."""
    block = _block_for(pixels)
    grid = (-(-pixels // block), min(planes, MAX_GRID_Y), 1)
    return KernelLaunch(f"{k.name}_{what}", _comment(k, what), text, list(args), grid,
                        (block, 1, 1), scratch)


def _comment(k: Conv, what: str) -> str:
    n, c, h, w, o, kh, kw = k.dims
    return (f"conv ({k.mode}) {what}: n={n} c={c} {h}x{w} o={o} k={kh}x{kw} "
            f"stride={k.stride} padding={k.padding}")


def _im2col(k: Conv, d: ConvDims, x: View, to: tuple[str, int]) -> KernelLaunch:
    """col[n][(c, ki, kj)][p] = x[n, c, ih, iw] or 0, for plane (n, c) and output pixel p,
    into ``to`` (buffer, offset): the kh·kw taps' offsets and bounds are computed once
    per thread; per plane, every tap's load is in flight before the stores (neighbouring
    threads write neighbouring elements)."""
    f = _param_list([x.buffer, to[0]])
    src, col = f.param_pointer("p0"), f.param_pointer("p1")
    done = f.label("done")
    p = _pixel_grid(f, d.p, done)
    oh = f.value("b32", "div.u32", p, str(d.ow))
    ow = f.value("b32", "rem.u32", p, str(d.ow))
    h0 = f.value("b32", "mul.lo.u32", oh, str(d.sh))
    w0 = f.value("b32", "mul.lo.u32", ow, str(d.sw))
    taps = []  # (inside the image, offset in the plane)
    for ki in range(d.kh):
        ih = f.value("b32", "add.u32", h0, _u32(ki - d.ph))
        row_ok = f.value("pred", "setp.lt.u32", ih, str(d.h))  # negatives are huge
        for kj in range(d.kw):
            iw = f.value("b32", "add.u32", w0, _u32(kj - d.pw))
            ok = f.value("pred", "setp.lt.and.u32", iw, str(d.w), row_ok)
            taps.append((ok, f.value("b32", "mad.lo.u32", ih, str(d.w), iw)))
    planes = d.n * d.c
    with f.loop(f.special("%ctaid.y"), str(planes), f.special("%nctaid.y"), "plane") as pl:
        plane = f.value("b32", "mul.lo.u32", pl, str(d.h * d.w))
        values = []
        for ok, off in taps:
            v = f.value("f32", "mov.f32", "0f00000000")
            at = f.value("b32", "add.u32", plane, off)
            f.ins("ld.global.f32", v, f.address(src, at, x.offset, 4), guard=ok)
            values.append(v)
        # plane (n, c)'s rows of col[n] start at row n·K + c·kh·kw = (n·C + c)·kh·kw
        out = f.value("b32", "mad.lo.u32", pl, str(d.taps * d.p), p)
        addr = f.value("b64", "add.s64", col, f.value("b64", "mul.wide.u32", out, "4"))
        for t, v in enumerate(values):  # tap t's row is P elements after tap t - 1's
            f.ins("st.global.f32", f"[{addr}+{4 * t * d.p}]", v)
    f.place(done)
    return _plane_launch(k, "im2col", f.text("ENTRY"), [(x.buffer, 0), to], d.p, planes,
                         d.col if to[0] == SCRATCH else 0)


def _col2im(k: Conv, d: ConvDims, dx: View) -> KernelLaunch:
    """dx[n, c, ih, iw] = Σ over the taps (ki, kj), in that order, that some output
    pixel (oh, ow) reads it from — oh·sh = ih + ph − ki exactly, 0 ≤ oh < OH, the same
    for w — of dcol[n][(c, ki, kj)][(oh, ow)]: a gather, so each sum has one order and
    no float atomics. Bounds and offsets once per thread; per plane, the loads in
    flight, then the adds."""
    f = _param_list([SCRATCH, dx.buffer])
    dcol, out = f.param_pointer("p0"), f.param_pointer("p1")
    done = f.label("done")
    pixels = d.h * d.w
    q = _pixel_grid(f, pixels, done)
    ih = f.value("b32", "div.u32", q, str(d.w))
    iw = f.value("b32", "rem.u32", q, str(d.w))
    rows = [_tap_source(f, ih, d.ph - ki, d.sh, d.oh) for ki in range(d.kh)]
    cols = [_tap_source(f, iw, d.pw - kj, d.sw, d.ow) for kj in range(d.kw)]
    taps = []  # (read, offset in the plane's dcol rows)
    for ki, (row_ok, oh) in enumerate(rows):
        for kj, (col_ok, ow) in enumerate(cols):
            ok = f.value("pred", "and.pred", row_ok, col_ok)
            pixel = f.value("b32", "mad.lo.u32", oh, str(d.ow), ow)
            taps.append((ok, f.value("b32", "add.u32", pixel, str((ki * d.kw + kj) * d.p))))
    planes = d.n * d.c
    with f.loop(f.special("%ctaid.y"), str(planes), f.special("%nctaid.y"), "plane") as pl:
        plane = f.value("b32", "mul.lo.u32", pl, str(d.taps * d.p))
        values = []
        for ok, off in taps:
            v = f.value("f32", "mov.f32", "0f00000000")
            at = f.value("b32", "add.u32", plane, off)
            f.ins("ld.global.f32", v, f.address(dcol, at, 0, 4), guard=ok)
            values.append(v)
        acc = f.value("f32", "mov.f32", "0f00000000")
        for (ok, _), v in zip(taps, values, strict=True):
            f.ins("add.rn.f32", acc, acc, v, guard=ok)
        at = f.value("b32", "mad.lo.u32", pl, str(pixels), q)
        f.ins("st.global.f32", f.address(out, at, dx.offset, 4), acc)
    f.place(done)
    return _plane_launch(k, "col2im", f.text("ENTRY"), [(SCRATCH, 0), (dx.buffer, 0)], pixels,
                         planes, d.col)


def _tap_source(f: PtxFunction, i: str, shift: int, stride: int, bound: int
                ) -> tuple[str, str]:
    """(whether, which) output index o has o·stride = i + shift, 0 ≤ o < bound: the
    predicate and o (meaningless where the predicate is false)."""
    t = f.value("b32", "add.u32", i, _u32(shift))  # i + shift < 0 is huge
    ok = f.value("pred", "setp.lt.u32", t, str(bound * stride))
    if stride == 1:
        return ok, t
    rest = f.value("b32", "rem.u32", t, str(stride))
    ok = f.value("pred", "setp.eq.and.u32", rest, "0", ok)
    return ok, f.value("b32", "div.u32", t, str(stride))


def _u32(value: int) -> str:
    """A u32 immediate: a negative value wraps (added to an index, it subtracts)."""
    return f"0x{value & 0xFFFFFFFF:08X}" if value < 0 else str(value)


CONV_MODES = {"forward": _forward, "input_grad": _input_grad, "weight_grad": _weight_grad}


# ---- columns kept for the weight gradients -----------------------------------------------


def keep_columns(s: Schedule, budget: int | None = None) -> Schedule:
    """``s`` with the column matrices of forward convs kept for the weight gradients that
    would gather the same ones later in the step (same x view, same geometry: the
    columns do not depend on w), within ``budget`` bytes (default ``KEEP_COLUMNS_BYTES``;
    the module's docstring says why); ``s`` itself when nothing is kept. The kept
    columns are a temp, ``<forward's output>_cols``, that the forward conv writes and
    those weight gradients read: the memory plan of the new schedule places it."""
    budget = KEEP_COLUMNS_BYTES if budget is None else budget
    gathered: dict[tuple[object, ...], int] = {}  # the columns -> a forward conv with them
    readers: dict[int, list[int]] = {}  # that forward conv -> the weight gradients
    for i, k in enumerate(s.kernels):
        if not isinstance(k, Conv) or k.mode == "input_grad" or k.lhs is None:
            continue
        key = (k.lhs, k.dims[:4], k.dims[5:], k.stride, k.padding)
        fresh = key in gathered and not _writes(s.kernels[gathered[key] + 1:i], k.lhs.buffer)
        if k.mode == "forward" and not fresh:
            gathered[key] = i
        elif k.mode == "weight_grad" and fresh:
            readers.setdefault(gathered[key], []).append(i)
    kernels, buffers, log, left = list(s.kernels), dict(s.buffers), [], budget
    kept = False
    for i in sorted(readers):  # in the order the forward convs run
        fwd = s.kernels[i]
        assert isinstance(fwd, Conv) and fwd.out is not None
        d = conv_dims(fwd)
        names = ", ".join(s.kernels[j].name for j in readers[i])
        if 4 * d.col > left:
            log.append(f"{fwd.name}: columns ({4 * d.col / 1e6:.2f} MB) gathered again by "
                       f"{names}: over the {left / 1e6:.2f} MB left of the budget")
            continue
        left, kept = left - 4 * d.col, True
        buf = Buffer(f"{fwd.out.buffer}_cols", "temp", "f32", d.col)
        buffers[buf.name] = buf
        cols = contiguous_view(buf, (d.n, d.k, d.p))
        for j in (i, *readers[i]):
            k = s.kernels[j]
            assert isinstance(k, Conv)
            kernels[j] = dataclasses.replace(k, cols=cols)
        log.append(f"{fwd.name}: columns kept in {buf.name} ({4 * d.col / 1e6:.2f} MB) "
                   f"for {names}")
    if debug_level() >= 1:
        for line in log:
            print(f"[ptx {s.entry}] {line}")
    return dataclasses.replace(s, kernels=kernels, buffers=buffers) if kept else s


def _writes(kernels: list[Kernel], buffer: str) -> bool:
    return any(v.buffer == buffer for k in kernels for v in k.writes())
