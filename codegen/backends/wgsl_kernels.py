"""Kernel IR -> WGSL compute shaders: one template per kernel kind.

Every shader reads and writes the module's storage buffers through group 0:
``f32s`` (binding 0), ``i32s`` (1), ``bools`` (2, one u32 each) and ``status``
(3, an atomic flag for ids out of range). Where a buffer lives in them is baked
into the shader as element offsets, so there are no uniforms. Launch sizes come
from the kernel's sizes only:

- elementwise, gather, scatter-add, conv: one invocation per output element,
  workgroups of ``FLAT_GROUP``; a grid over 65,535 workgroups goes 2-D.
- reduce: one workgroup per output row (64 to 256 invocations by the length of
  the reduced run), a strided partial per invocation, then a tree in
  ``var<workgroup>`` memory between barriers.
- matmul: ``TILE`` x ``TILE`` output tiles per workgroup, operand tiles staged
  in workgroup memory; batch and tiles are one linear workgroup id, 2-D when
  large. Operands are strided views (a transpose is free).
- scatter-add has no float atomics: each invocation owns one output element and
  scans the ids in order, so the sum is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ferrograd.ir.errors import BackendError

from ..kernel_ir import Conv, Elementwise, Gather, Kernel, Matmul, Reduce, View
from .base import IndentedBuffer, collapse, linear_index, reduce_layout
from .wgsl import cse_body, helpers_for

MAX_GROUPS = 65_535  # WebGPU's default maxComputeWorkgroupsPerDimension
FLAT_GROUP = 256
TILE = 16
ARRAYS = {"f32": "f32s", "i32": "i32s", "bool": "bools"}
BINDINGS = {"f32s": (0, "array<f32>"), "i32s": (1, "array<i32>"), "bools": (2, "array<u32>"),
            "status": (3, "array<atomic<u32>>")}

Place = Callable[[str], int]  # buffer name -> element offset of its start in its array


@dataclass
class ShaderCode:
    """One kernel as a shader: the source and how to launch it."""

    source: str
    workgroup_size: tuple[int, int, int]
    groups: tuple[int, int, int]
    shared_bytes: int = 0
    arrays: list[str] = field(default_factory=list)


def grid(groups: int) -> tuple[int, int, int]:
    """Workgroups as (x, y, 1): 1-D up to 65,535, else the smallest 2-D grid."""
    if groups <= MAX_GROUPS:
        return (groups, 1, 1)
    ny = math.ceil(groups / MAX_GROUPS)
    return (math.ceil(groups / ny), ny, 1)


class _Shader:
    """Builds one shader: the body in an indented buffer, the arrays it touches."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.body = IndentedBuffer()
        self.arrays: set[str] = set()
        self.shared: list[tuple[str, int]] = []  # workgroup arrays of f32: (name, length)

    def at(self, v: View, coords: list[str], strides: list[int]) -> str:
        """``array[index]`` of view ``v`` at the given coordinates (collapsed strides)."""
        array = ARRAYS[v.dtype]
        self.arrays.add(array)
        return f"{array}[{linear_index(self.place(v.buffer) + v.offset, coords, strides)}]"

    def load(self, v: View, coords: list[str], strides: list[int]) -> str:
        ref = self.at(v, coords, strides)
        return f"{ref} != 0u" if v.dtype == "bool" else ref

    def store(self, v: View, coords: list[str], strides: list[int], value: str) -> str:
        value = f"u32({value})" if v.dtype == "bool" else value
        return f"{self.at(v, coords, strides)} = {value};"

    def finish(self, header: str, workgroup: tuple[int, int, int], params: str,
               groups: tuple[int, int, int]) -> ShaderCode:
        out = IndentedBuffer()
        out.extend(header)
        arrays = sorted(self.arrays, key=lambda a: BINDINGS[a][0])
        for a in arrays:
            binding, ty = BINDINGS[a]
            out.line(f"@group(0) @binding({binding}) var<storage, read_write> {a}: {ty};")
        for name, length in self.shared:
            out.line(f"var<workgroup> {name}: array<f32, {length}>;")
        body = self.body.getvalue()
        helpers = helpers_for(body)
        if helpers:
            out.line()
            out.extend(helpers.rstrip("\n"))
        out.line()
        size = ", ".join(str(w) for w in workgroup if w != 1) or "1"
        out.line(f"@compute @workgroup_size({size})")
        out.line(f"fn main({params}) {{")
        out.extend(body.rstrip("\n"))
        out.line("}")
        shared = 4 * sum(length for _, length in self.shared)
        return ShaderCode(out.getvalue(), workgroup, groups, shared, arrays)


def _flat_index(s: _Shader, total: int) -> tuple[tuple[int, int, int], str]:
    """Start a one-invocation-per-element body: ``i`` is the flat index; returns the
    grid and the entry point's parameters."""
    groups = grid(math.ceil(total / FLAT_GROUP))
    s.body.level = 1
    if groups[1] == 1:
        s.body.line("let i = gid.x;")
    else:
        s.body.line(f"let i = gid.x + gid.y * {groups[0] * FLAT_GROUP}u;")
    with s.body.indent(f"if (i >= {total}u) {{"):
        s.body.line("return;")
    return groups, "@builtin(global_invocation_id) gid: vec3<u32>"


def _unravel(s: _Shader, flat: str, sizes: list[int], prefix: str,
             strides: list[list[int]]) -> list[str]:
    """Coordinates of ``flat`` over ``sizes`` (row-major); ``let``-bound only where some
    view steps along them."""
    if len(sizes) <= 1:
        return [flat] if sizes else []
    names = []
    for d in range(len(sizes)):
        names.append(f"{prefix}{d}")
        if not any(st[d] for st in strides):
            continue
        inner = int(np.prod(sizes[d + 1:]))
        if d == 0:
            expr = f"{flat} / {inner}u"
        elif d == len(sizes) - 1:
            expr = f"{flat} % {sizes[d]}u"
        else:
            expr = f"{flat} / {inner}u % {sizes[d]}u"
        s.body.line(f"let {prefix}{d} = {expr};")
    return names


def _header(k: Kernel, what: str) -> str:
    return f"// {k.kind}: {', '.join(k.ops)}{what}.\n"


# ---- the kinds ------------------------------------------------------------------------------


def elementwise(k: Elementwise, place: Place) -> ShaderCode:
    s = _Shader(place)
    outs = [v for v, _ in k.outputs]
    views = outs + list(k.inputs.values())
    sizes, strides = collapse(k.shape, views)
    total = int(np.prod(sizes)) if sizes else 1
    groups, params = _flat_index(s, total)
    coords = _unravel(s, "i", sizes, "c", strides)
    for (sym, v), st in zip(k.inputs.items(), strides[len(outs):], strict=True):
        s.body.line(f"let {sym} = {s.load(v, coords, st)};")
    values = cse_body(s.body, [e for _, e in k.outputs], [v.dtype for v in outs])
    for v, st, val in zip(outs, strides[:len(outs)], values, strict=True):
        s.body.line(s.store(v, coords, st, val))
    return s.finish(_header(k, f" over {list(k.shape)}"), (FLAT_GROUP, 1, 1), params, groups)


def reduce(k: Reduce, place: Place) -> ShaderCode:
    assert k.out is not None
    if k.out.dtype != "f32":
        raise BackendError(f"{k.name}: reductions compute in f32; this one gives {k.out.dtype}")
    s = _Shader(place)
    lay = reduce_layout(k)
    ksizes, kstrides = lay.kept_sizes, lay.kept_strides
    rsizes, rstrides = lay.reduced_sizes, lay.reduced_strides
    rows, run = lay.rows, lay.length
    lanes = min(256, max(64, 1 << max(run - 1, 0).bit_length()))
    groups = grid(rows)
    total_sum = k.combine == "sum"
    s.shared.append(("partial", lanes))
    b = s.body
    b.level = 1
    b.line("let row = wg.x;" if groups[1] == 1 else f"let row = wg.x + wg.y * {groups[0]}u;")
    with b.indent(f"if (row >= {rows}u) {{"):  # uniform: the whole workgroup leaves
        b.line("return;")
    coords = _unravel(s, "row", ksizes, "r", kstrides)
    b.line(f"var acc = {'0.0' if total_sum else '-3.4028235e+38'};")
    with b.indent(f"for (var j = lane; j < {run}u; j = j + {lanes}u) {{"):
        inner = _unravel(s, "j", rsizes, "q", rstrides)
        for (sym, v), ks, rs in zip(k.inputs.items(), kstrides, rstrides, strict=True):
            b.line(f"let {sym} = {s.load(v, coords + inner, ks + rs)};")
        (value,) = cse_body(b, [k.value], ["f32"])
        b.line(f"acc = acc + {value};" if total_sum else f"acc = max(acc, {value});")
    b.line("partial[lane] = acc;")
    b.line("workgroupBarrier();")
    with b.indent(f"for (var half = {lanes // 2}u; half > 0u; half = half / 2u) {{"):
        with b.indent("if (lane < half) {"):
            combine = "partial[lane] + partial[lane + half]" if total_sum else \
                "max(partial[lane], partial[lane + half])"
            b.line(f"partial[lane] = {combine};")
        b.line("workgroupBarrier();")
    with b.indent("if (lane == 0u) {"):
        b.line(s.store(k.out, ["row"], [1], "partial[0]"))
    params = ("@builtin(workgroup_id) wg: vec3<u32>, "
              "@builtin(local_invocation_index) lane: u32")
    what = f" of {list(k.shape)} over axes {list(k.axes)} ({k.combine})"
    return s.finish(_header(k, what), (lanes, 1, 1), params, groups)


def _part(v: View, lo: int, hi: int) -> View:
    return View(v.buffer, v.dtype, v.offset, v.shape[lo:hi], v.strides[lo:hi])


def matmul(k: Matmul, place: Place) -> ShaderCode:
    assert k.a is not None and k.b is not None and k.out is not None
    s = _Shader(place)
    views = [k.a, k.b, k.out]
    nb = len(k.batch)
    bsizes, bstrides = collapse(k.batch, [_part(v, 0, nb) for v in views])
    batch = int(np.prod(bsizes)) if bsizes else 1
    tm, tn = math.ceil(k.m / TILE), math.ceil(k.n / TILE)
    total = batch * tm * tn
    groups = grid(total)
    s.shared += [("tile_a", TILE * TILE), ("tile_b", TILE * TILE)]
    b = s.body
    b.level = 1
    b.line("let g = wg.x;" if groups[1] == 1 else f"let g = wg.x + wg.y * {groups[0]}u;")
    with b.indent(f"if (g >= {total}u) {{"):  # uniform: the whole workgroup leaves
        b.line("return;")
    tile_row = "" if tm == 1 else f"g / {tn}u" if batch == 1 else f"g / {tn}u % {tm}u"
    tile_col = "" if tn == 1 else f"g % {tn}u"
    b.line(f"let row = {tile_row} * {TILE}u + lid.y;" if tile_row else "let row = lid.y;")
    b.line(f"let col = {tile_col} * {TILE}u + lid.x;" if tile_col else "let col = lid.x;")
    flat_batch = "g" if tm * tn == 1 else f"(g / {tm * tn}u)"
    bcoords = _unravel(s, flat_batch, bsizes, "b", bstrides) if bsizes else []
    a_s, b_s, c_s = ([st for st in bstrides[i]] if bsizes else [] for i in range(3))
    a_at = s.at(k.a, [*bcoords, "row", "ka"], [*a_s, *k.a.strides[-2:]])
    b_at = s.at(k.b, [*bcoords, "kb", "col"], [*b_s, *k.b.strides[-2:]])
    c_at = s.at(k.out, [*bcoords, "row", "col"], [*c_s, *k.out.strides[-2:]])
    b.line("var acc = 0.0;")
    with b.indent(f"for (var k0 = 0u; k0 < {k.k}u; k0 = k0 + {TILE}u) {{"):
        b.line("let ka = k0 + lid.x;")
        b.line("let kb = k0 + lid.y;")
        b.line("var va = 0.0;")
        b.line("var vb = 0.0;")
        with b.indent(f"if (row < {k.m}u && ka < {k.k}u) {{"):
            b.line(f"va = {a_at};")
        with b.indent(f"if (kb < {k.k}u && col < {k.n}u) {{"):
            b.line(f"vb = {b_at};")
        b.line(f"tile_a[lid.y * {TILE}u + lid.x] = va;")
        b.line(f"tile_b[lid.y * {TILE}u + lid.x] = vb;")
        b.line("workgroupBarrier();")
        with b.indent(f"for (var t = 0u; t < {TILE}u; t = t + 1u) {{"):
            b.line(f"acc = fma(tile_a[lid.y * {TILE}u + t], tile_b[t * {TILE}u + lid.x], acc);")
        b.line("workgroupBarrier();")
    with b.indent(f"if (row < {k.m}u && col < {k.n}u) {{"):
        b.line(f"{c_at} = acc;")
    params = "@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>"
    what = (f" over batch {list(k.batch)}," if k.batch else "") + \
        f" ({k.m} x {k.k}) @ ({k.k} x {k.n})"
    return s.finish(_header(k, what), (TILE, TILE, 1), params, groups)


def gather(k: Gather, place: Place) -> ShaderCode:
    assert k.ids is not None and k.src is not None and k.out is not None
    s = _Shader(place)
    s.arrays.add("status")
    b = s.body
    if not k.scatter:  # out[i, j] = src[ids[i], j]
        groups, params = _flat_index(s, k.out.size)
        b.line(f"let j = i % {k.row_len}u;")
        b.line(f"let id = {s.at(k.ids, [f'i / {k.row_len}u'], [1])};")
        with b.indent(f"if (id < 0 || id >= {k.rows}) {{"):
            b.line("atomicMax(&status[0], 1u);")
            b.line(s.store(k.out, ["i"], [1], _zero(k.out.dtype)))
            b.line("return;")
        b.line(s.store(k.out, ["i"], [1], s.load(k.src, [f"u32(id) * {k.row_len}u", "j"],
                                                  [1, 1])))
        return s.finish(_header(k, f" of {k.out.size // max(k.row_len, 1)} rows of "
                                f"{k.row_len}"), (FLAT_GROUP, 1, 1), params, groups)
    # scatter-add: out[r, j] = sum of vals[i, j] over the i with ids[i] == r, in order
    groups, params = _flat_index(s, k.out.size)
    n = k.ids.size
    b.line(f"let r = i32(i / {k.row_len}u);")
    b.line(f"let j = i % {k.row_len}u;")
    b.line(f"var acc = {_zero(k.out.dtype)};")
    with b.indent(f"for (var n = 0u; n < {n}u; n = n + 1u) {{"):
        b.line(f"let id = {s.at(k.ids, ['n'], [1])};")
        with b.indent("if (id == r) {"):
            b.line(f"acc = acc + {s.load(k.src, [f'n * {k.row_len}u', 'j'], [1, 1])};")
        with b.indent(f"if (id < 0 || id >= {k.rows}) {{"):
            b.line("atomicMax(&status[0], 1u);")
    b.line(s.store(k.out, ["i"], [1], "acc"))
    return s.finish(_header(k, f" of {n} rows into {k.rows} rows of {k.row_len}"),
                    (FLAT_GROUP, 1, 1), params, groups)


def _zero(dtype: str) -> str:
    return {"f32": "0.0", "i32": "0", "bool": "false"}[dtype]


@dataclass
class _ConvLoop:
    """One mode of the direct convolution: the output element's coordinates, the two
    outer loops, then the row (``y``) and column (``x``) of the inner loop nest, each
    a ``let`` and the condition under which the term exists."""

    coords: list[tuple[str, int]]  # output coordinates, outermost first
    outer: list[tuple[str, int]]
    y: tuple[str, str]
    inner: tuple[str, int]
    x: tuple[str, str]


def conv(k: Conv, place: Place) -> ShaderCode:
    """Direct convolution, one invocation per output element (NCHW, OIHW)."""
    assert k.lhs is not None and k.rhs is not None and k.out is not None
    if k.cols is not None:
        raise BackendError(f"{k.name}: kept columns are the PTX backend's; WGSL convolves x")
    n, c, h, w, o, kh, kw = k.dims
    (sh, sw), (ph, pw) = k.stride, k.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    s = _Shader(place)
    x_at = ["bn", "ci", "u32(iy)", "u32(ix)"], [c * h * w, h * w, w, 1]
    w_at = ["oc", "ci", "ky", "kx"], [c * kh * kw, kh * kw, kw, 1]
    if k.mode == "forward":  # out[b, o, y, x] = sum x[b, c, y s + ky - p, ...] w[o, c, ky, kx]
        loop = _ConvLoop([("bn", n), ("oc", o), ("oy", oh), ("ox", ow)], [("ci", c), ("ky", kh)],
                         (f"let iy = i32(oy * {sh}u + ky) - {ph};", f"iy >= 0 && iy < {h}"),
                         ("kx", kw),
                         (f"let ix = i32(ox * {sw}u + kx) - {pw};", f"ix >= 0 && ix < {w}"))
        terms = [x_at, w_at]
    elif k.mode == "input_grad":  # dx[b, c, y, x] = sum g[b, o, oy, ox] w[o, c, ky, kx]
        # output row oy = (y + p - ky) / s where that divides exactly
        loop = _ConvLoop([("bn", n), ("ci", c), ("y", h), ("x", w)], [("oc", o), ("ky", kh)],
                         (f"let ty = i32(y) + {ph} - i32(ky);", _tap("ty", sh, oh)),
                         ("kx", kw),
                         (f"let tx = i32(x) + {pw} - i32(kx);", _tap("tx", sw, ow)))
        g_at = (["bn", "oc", _quotient("ty", sh), _quotient("tx", sw)],
                [o * oh * ow, oh * ow, ow, 1])
        terms = [g_at, w_at]
    elif k.mode == "weight_grad":  # dw[o, c, ky, kx] = sum g[b, o, oy, ox] x[b, c, ...]
        loop = _ConvLoop([("oc", o), ("ci", c), ("ky", kh), ("kx", kw)], [("bn", n), ("oy", oh)],
                         (f"let iy = i32(oy * {sh}u + ky) - {ph};", f"iy >= 0 && iy < {h}"),
                         ("ox", ow),
                         (f"let ix = i32(ox * {sw}u + kx) - {pw};", f"ix >= 0 && ix < {w}"))
        g_at = ["bn", "oc", "oy", "ox"], [o * oh * ow, oh * ow, ow, 1]
        terms = [x_at, g_at]
    else:
        raise BackendError(f"no WGSL template for convolution mode {k.mode!r}")
    groups, params = _flat_index(s, k.out.size)
    b = s.body
    sizes = [size for _, size in loop.coords]
    for d, (name, size) in enumerate(loop.coords):
        inner = int(np.prod(sizes[d + 1:]))
        if d == 0:
            b.line(f"let {name} = i / {inner}u;")
        else:
            b.line(f"let {name} = i / {inner}u % {size}u;" if inner > 1 else
                   f"let {name} = i % {size}u;")
    lhs = s.at(k.lhs, *terms[0])
    rhs = s.at(k.rhs, *terms[1])
    b.line("var acc = 0.0;")
    _open(b, [_for(var, count) for var, count in loop.outer])
    b.line(loop.y[0])
    _open(b, [f"if ({loop.y[1]}) {{", _for(*loop.inner)])
    b.line(loop.x[0])
    with b.indent(f"if ({loop.x[1]}) {{"):
        b.line(f"acc = fma({lhs}, {rhs}, acc);")
    _close(b, 4)
    b.line(s.store(k.out, ["i"], [1], "acc"))
    what = (f" ({k.mode}) n={n} c={c} {h}x{w} o={o} k={kh}x{kw} stride={k.stride} "
            f"padding={k.padding}")
    return s.finish(_header(k, what), (FLAT_GROUP, 1, 1), params, groups)


def _tap(t: str, stride: int, size: int) -> str:
    """Whether ``t / stride`` is an output coordinate: exact, and in [0, size)."""
    if stride == 1:
        return f"{t} >= 0 && {t} < {size}"
    return f"{t} >= 0 && {t} % {stride} == 0 && {t} / {stride} < {size}"


def _quotient(t: str, stride: int) -> str:
    return f"u32({t})" if stride == 1 else f"u32({t} / {stride})"


def _for(var: str, count: int) -> str:
    return f"for (var {var} = 0u; {var} < {count}u; {var} = {var} + 1u) {{"


def _open(b: IndentedBuffer, openers: list[str]) -> None:
    for line in openers:
        b.line(line)
        b.level += 1


def _close(b: IndentedBuffer, count: int) -> None:
    for _ in range(count):
        b.level -= 1
        b.line("}")


TEMPLATES: dict[type, Callable[..., ShaderCode]] = {
    Elementwise: elementwise, Reduce: reduce, Matmul: matmul, Gather: gather, Conv: conv,
}


def render_kernel(k: Kernel, place: Place) -> ShaderCode:
    """One kernel as a WGSL compute shader (entry point ``main``)."""
    template = TEMPLATES.get(type(k))
    if template is None:
        raise BackendError(f"no WGSL template for kernel kind {k.kind}")
    return template(k, place)
