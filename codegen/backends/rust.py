"""The CPU backend's renderer: kernel IR -> plain Rust functions over slices.

Read it as tables: ``RustPrinter`` maps each scalar function to its Rust form,
``RUST_TYPES`` maps dtypes, and ``render_kernel`` has one method per kernel
kind. Elementwise and reduction kernels run on rayon over rows when they are
big enough, with inner loops over row slices that LLVM can vectorize;
matmul, gather/scatter and conv call the runtime crate (``ferrograd_runtime``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import sympy as sp
from sympy.printing.rust import RustCodePrinter

from ..kernel_ir import (
    Conv,
    Elementwise,
    Gather,
    Kernel,
    Matmul,
    Reduce,
    View,
    row_major,
)
from .base import (
    CLikePrinter,
    IndentedBuffer,
    ReduceLayout,
    batch_as_rows,
    collapse,
    f32_literal,
    fold_constant_factors,
    linear_index,
    reduce_layout,
    value_kind,
)

RUST_TYPES = {"f32": "f32", "i32": "i32", "bool": "u8"}  # bools are stored as bytes
ZEROS = {"f32": "0.0_f32", "i32": "0_i32", "bool": "0_u8"}
PAR_MIN = 1 << 15  # elements: below this a kernel runs on the calling thread
PAR_FLOPS = 1 << 22  # a product with fewer flops runs on the calling thread (= runtime gemm)
GRAIN = 1 << 13  # elements per rayon task, at least
MIN_ROW = 32  # elements: shorter rows take trailing dims in (see _elementwise)
MAX_NESTED_ROW = 4096  # elements: the most a row of several dims takes (stack buffers)
COLUMN_TILE = 512  # outputs per tile of a column reduction's accumulators (4 KiB of f64: L1)
COLUMN_PARTS = 4  # fixed row groups of a one-tile column reduction, combined in order
COLUMN_PARTS_MIN = 1 << 18  # elements: a one-tile column reduction this big splits its rows
LANES_MIN_ROW = 16  # rows at least this long fold into rt::lanes' accumulators
CHUNK = 64  # elements a row reduction maps into its stack buffer per pass (rt::lanes::CHUNK)


# Literals that equal a named constant print as the constant (clippy's approx_constant).
NAMED_F32 = {np.float32(np.pi): "PI", np.float32(np.e): "E",
             np.float32(np.log(2)): "LN_2", np.float32(np.log(10)): "LN_10",
             np.float32(np.sqrt(2)): "SQRT_2", np.float32(1 / np.sqrt(2)): "FRAC_1_SQRT_2",
             np.float32(2 / np.sqrt(np.pi)): "FRAC_2_SQRT_PI", np.float32(1 / np.pi): "FRAC_1_PI",
             np.float32(np.log2(np.e)): "LOG2_E", np.float32(np.log10(np.e)): "LOG10_E",
             np.float32(np.pi / 2): "FRAC_PI_2", np.float32(2 / np.pi): "FRAC_2_PI"}


def rust_f32(value: float) -> str:
    name = NAMED_F32.get(np.float32(value))
    return f"consts::{name}" if name else f32_literal(value)


class RustPrinter(CLikePrinter, RustCodePrinter):
    """sympy -> Rust f32 expressions: the tables below, over the C-like base."""

    FUNCTIONS: ClassVar[dict[str, str]] = {
        # exp, log, tanh, erf: the runtime's branch-free versions vectorize; std's
        # are libm calls, one element at a time.
        "exp": "Math::exp({0})", "log": "Math::ln({0})", "log1p": "{r0}.ln_1p()",
        "tanh": "Math::tanh({0})", "sin": "{r0}.sin()", "cos": "{r0}.cos()",
        "Abs": "{r0}.abs()", "erf": "Math::erf({0})",
        "sign": "(if {r0} == 0.0 {{ 0.0 }} else {{ {r0}.signum() }})",
    }
    POWERS: ClassVar[dict[str, str]] = {
        "recip": "{b}.recip()", "sqrt": "{b}.sqrt()", "rsqrt": "{b}.sqrt().recip()",
        "powi": "{b}.powi({n})", "powf": "{b}.powf({e})",
    }
    CASTS: ClassVar[dict[tuple[str, str], str]] = {
        ("bool", "float"): "f32::from({0})", ("int", "float"): "({0}) as f32",
        ("bool", "int"): "i32::from({0})", ("float", "int"): "({0}) as i32",
        ("float", "bool"): "({0}) != 0.0", ("int", "bool"): "({0}) != 0",
    }

    def float_literal(self, value: float) -> str:
        return rust_f32(value)

    def _cast_to_float(self, e: Any) -> Any:
        return e  # integer-valued parts already print as f32 literals

    def operand(self, e: Any) -> str:
        """``e`` as the receiver of a method call: literals need their type."""
        if e.is_Number or e.is_NumberSymbol:
            lit = rust_f32(float(e))
            if lit[0].isdigit():
                lit += "_f32"
            elif lit.startswith("-") and lit[1].isdigit():
                lit = f"({lit}_f32)"  # -1.0.max(x) would parse as -(1.0.max(x))
            return lit
        return super().operand(e)

    def _print_Heaviside(self, e: Any) -> str:
        z = self.operand(e.args[0])
        h0 = f32_literal(float(e.args[1])) if len(e.args) > 1 else "0.5"
        return f"(if {z} > 0.0 {{ 1.0 }} else if {z} < 0.0 {{ 0.0 }} else {{ {h0} }})"

    def _minmax(self, e: Any, name: str) -> str:
        out = self.operand(e.args[0])
        for a in e.args[1:]:
            out = f"{out}.{name}({self._print(a)})"
        return out

    def _print_Max(self, e: Any) -> str:
        return self._minmax(e, "max")

    def _print_Min(self, e: Any) -> str:
        return self._minmax(e, "min")

    def _print_Piecewise(self, e: Any) -> str:
        parts = []
        for value, cond in e.args:
            v = self._print(value)
            if cond is sp.true:
                parts.append(f"{{ {v} }}")
            else:
                parts.append(f"if {self._print(cond)} {{ {v} }}")
        return "(" + " else ".join(parts) + ")"


# ---- kernels ----------------------------------------------------------------------------


class KernelArgs:
    """The distinct buffers a kernel touches, as Rust parameters (inputs, then outputs).

    A buffer that is both read and written (an in-place optimizer update) is passed
    once, mutably: it is read at the same index it is written.
    """

    def __init__(self, k: Kernel, dtypes: dict[str, str]) -> None:
        self.outputs: list[str] = []
        self.inputs: list[str] = []
        for v in k.writes():
            if v.buffer not in self.outputs:
                self.outputs.append(v.buffer)
        for v in k.reads():
            if v.buffer not in self.outputs and v.buffer not in self.inputs:
                self.inputs.append(v.buffer)
        self.dtypes = dtypes
        self.scratch = isinstance(k, Conv)  # im2col workspace

    def signature(self) -> str:
        ins = [f"{b}: &[{RUST_TYPES[self.dtypes[b]]}]" for b in self.inputs]
        outs = [f"{b}: &mut [{RUST_TYPES[self.dtypes[b]]}]" for b in self.outputs]
        scratch = ["scratch: &mut [f32]"] if self.scratch else []
        return ", ".join(ins + outs + scratch)

    @property
    def order(self) -> list[tuple[str, bool]]:
        return [(b, False) for b in self.inputs] + [(b, True) for b in self.outputs]


def fallible(k: Kernel) -> bool:
    return isinstance(k, Matmul | Gather | Conv)


def may_run_parallel(k: Kernel) -> bool:
    """Whether ``k`` may split its work over rayon (by the thresholds the renderers
    and the runtime use; gathers and convolutions counted as parallel)."""
    if isinstance(k, Matmul):
        return 2 * k.m * k.n * k.k * int(np.prod(k.batch)) >= PAR_FLOPS
    if isinstance(k, Elementwise | Reduce):
        return int(np.prod(k.shape)) >= PAR_MIN
    return isinstance(k, Gather | Conv)


def _unused_row(text: str) -> str:
    """Drop ``.enumerate()`` where the body never uses the row index."""
    head, sep, rest = text.partition(".enumerate().for_each(|(row, ")
    if not sep:
        return text
    inner, _, body = rest.partition(")| {")
    if re.search(r"\brow\b", body):
        return text
    return f"{head}.for_each(|{inner}| {{{body}"


def render_kernel(k: Kernel, dtypes: dict[str, str]) -> str:
    args = KernelArgs(k, dtypes)
    out = IndentedBuffer()
    if isinstance(k, Matmul):  # the product as rendered (a batch may fold into rows)
        f = batch_as_rows(k)
        batches = f"{'×'.join(map(str, f.batch))} batches of " if f.batch else ""
        out.line(f"/// matmul: {', '.join(k.ops)}: {batches}{f.m}×{f.k} · {f.k}×{f.n}.")
    else:
        shape = list(getattr(k, "shape", ()))
        out.line(f"/// {k.kind}: {', '.join(k.ops)}" + (f" over {shape}" if shape else "")
                 + ".")
    ret = " -> Result<(), rt::Error>" if fallible(k) else ""
    with out.indent(f"pub fn {k.name}({args.signature()}){ret} {{"):
        if isinstance(k, Elementwise):
            _elementwise(out, k, args)
        elif isinstance(k, Reduce):
            _reduce(out, k, args)
        elif isinstance(k, Matmul):
            _matmul(out, k, args)
        elif isinstance(k, Gather):
            _gather(out, k)
        elif isinstance(k, Conv):
            _conv(out, k)
        else:
            raise NotImplementedError(f"no Rust template for kernel kind {k.kind}")
    return _unused_row(out.getvalue())


KIND_OF_DTYPE = {"f32": "float", "i32": "int", "bool": "bool"}


def _cse_body(out: IndentedBuffer, exprs: list[Any], dtypes: list[str]) -> list[str]:
    """Print ``let`` bindings for shared subexpressions; return the final expressions,
    each printed as its target dtype (a bare ``0`` is a float where an f32 is stored)."""
    printer = RustPrinter()
    branches: dict[Any, Any] = {}
    exprs = [_hoist_branches(fold_constant_factors(e), branches) for e in exprs]
    values = list(branches)
    subs, reduced = sp.cse(values + exprs, symbols=sp.numbered_symbols("t"),
                           optimizations=None)
    bindings = subs + list(zip(branches.values(), reduced[:len(values)], strict=True))
    for sym, sub in _in_dependency_order(bindings):
        out.line(f"let {sym} = {_bare(printer.expr(sub))};")
    return [_bare(printer.expr(e, KIND_OF_DTYPE[d]))
            for e, d in zip(reduced[len(values):], dtypes, strict=True)]


def _hoist_reciprocals(out: IndentedBuffer, exprs: list[Any], invariant: set[str]) -> list[Any]:
    """``exprs`` with each division by a value that does not change along the loop
    about to open (it reads only the symbols in ``invariant``: a row's mean or sum)
    turned into a product with its reciprocal, bound once before the loop. A divide
    costs ~10x a multiply and does not pipeline; the result may differ from the
    quotient by an ulp."""
    found: dict[Any, Any] = {}

    def visit(e: Any) -> Any:
        if (e.is_Pow and e.exp.is_negative and e.exp.is_number and e.base.free_symbols
                and {s.name for s in e.base.free_symbols} <= invariant
                and value_kind(e.base) == "float"):
            if e not in found:
                found[e] = sp.Symbol(f"recip{len(found)}", real=True)
                out.line(f"let {found[e]} = {_bare(RustPrinter().expr(e))};")
            return found[e]
        if not e.args:
            return e
        args = [visit(a) for a in e.args]
        return e.func(*args) if args != list(e.args) else e

    return [visit(e) for e in exprs]


def _hoist_branches(e: Any, branches: dict[Any, Any]) -> Any:
    """``e`` with each non-trivial value of a float ``Piecewise`` (a ``where``)
    replaced by a symbol bound to it (``branches``: value -> symbol). Computed
    before the ``if``, both sides are plain arithmetic and the ``if`` a select,
    which LLVM vectorizes; a computation inside the ``if`` keeps the loop scalar.
    Floats cannot trap, so computing the side not taken is harmless; values with
    integer division or modulo stay inside their branch."""
    if not e.args:
        return e
    args = [_hoist_branches(a, branches) for a in e.args]
    if not isinstance(e, sp.Piecewise):
        return e.func(*args) if args != list(e.args) else e
    pieces = []
    for value, cond in args:
        if not value.is_Atom and not value.has(sp.Mod, sp.floor, sp.ceiling):
            kind = value_kind(value)
            value = branches.setdefault(value, sp.Symbol(
                f"w{len(branches)}", real=kind == "float", integer=kind == "int"))
        pieces.append((value, cond))
    return sp.Piecewise(*pieces, evaluate=False)


def _in_dependency_order(bindings: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """``let`` bindings ordered so each comes after the bindings it reads (stable)."""
    pending, ordered = list(bindings), []
    bound: set[Any] = set()
    names = {sym for sym, _ in bindings}
    while pending:
        ready = [(s, v) for s, v in pending if (v.free_symbols & names) <= bound]
        assert ready, "cyclic let bindings"
        ordered += ready
        bound |= {s for s, _ in ready}
        pending = [b for b in pending if b[0] not in bound]
    return ordered


def _bare(code: str) -> str:
    """Drop parentheses around a whole statement's value (rustc warns on them)."""
    while code.startswith("(") and code.endswith(")"):
        depth = 0
        for i, c in enumerate(code):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0 and i < len(code) - 1:
                return code
        code = code[1:-1]
    return code


def _elementwise(out: IndentedBuffer, k: Elementwise, args: KernelArgs) -> None:
    outs = [v for v, _ in k.outputs]
    sizes, strides = collapse(k.shape, outs + list(k.inputs.values()))
    n_out = len(outs)
    if not sizes:  # a scalar
        for sym, v in k.inputs.items():
            out.line(f"let {sym} = {_load(v, str(v.offset))};")
        values = _cse_body(out, [e for _, e in k.outputs], [v.dtype for v, _ in k.outputs])
        for v, val in zip(outs, values, strict=True):
            out.line(f"{v.buffer}[{v.offset}] = {_store(v, val)};")
        return
    rows_ok = all(_row_major(st, sizes) for st in strides[:n_out]) and \
        len({v.buffer for v in outs}) == n_out
    if not rows_ok:  # strided writes (concat, unslice, copies back): plain nested loops
        _nested(out, k, sizes, strides)
        return
    total = int(np.prod(sizes))
    if len(sizes) == 1 and total >= PAR_MIN and all(st[-1] in (0, 1) for st in strides):
        outer, row_len = [], GRAIN  # one long run: cut it into tasks of GRAIN elements
    else:
        outer, row_len = sizes[:-1], sizes[-1]
    # Short rows (a 2x2 pooling window: rows of 2) cost their setup per element: take
    # trailing dims into the row until it has some length, and loop over them inside.
    inner = 1
    while inner < len(sizes) - 1 and int(np.prod(sizes[-inner:])) < MIN_ROW and \
            int(np.prod(sizes[-inner - 1:])) <= MAX_NESTED_ROW:
        inner += 1
    if outer and inner > 1:
        outer, row_len = sizes[:-inner], int(np.prod(sizes[-inner:]))
    par = total >= PAR_MIN
    names = [f"o{i}" for i in range(n_out)]
    aliased = {v.buffer: name for v, name in zip(outs, names, strict=True)}
    if outer and inner > 1:  # rows of several dims (pooling windows)

        def render_row(body: IndentedBuffer) -> None:
            _nested_row(body, k, outer, sizes[-inner:], strides[n_out:], names, aliased)

        _rows_fn(out, _read_buffers(k), list(zip(names, outs, strict=True)), row_len, row_len,
                 par, render_row)
        return
    chunks = [f"{v.buffer}[{v.offset}..{v.offset + v.size}]."
              f"{'par_' if par else ''}chunks_mut({row_len})" for v in outs]
    if n_out == 1:
        it, pat = chunks[0], names[0]
    elif par:
        it, pat = f"({', '.join(chunks)}).into_par_iter()", f"({', '.join(names)})"
    else:
        it, pat = _zip_seq(chunks), _zip_pat(names)
    if par:
        it += f".with_min_len({max(1, GRAIN // row_len)})"
    with out.indent(f"{it}.enumerate().for_each(|(row, {pat})| {{", "});"):
        _row(out, k, outer, row_len, strides[n_out:], names, aliased)


def _read_buffers(k: Elementwise | Reduce) -> dict[str, str]:
    """The buffers ``k`` reads and does not write, each with its Rust element type."""
    written = {v.buffer for v in k.writes()}
    return {v.buffer: RUST_TYPES[v.dtype] for v in k.inputs.values() if v.buffer not in written}


def _rows_fn(out: IndentedBuffer, inputs: dict[str, str], outputs: list[tuple[str, View]],
             row_len: int, row_work: int, par: bool,
             render_row: Callable[[IndentedBuffer], None]) -> None:
    """Rows of ``row_len`` output elements walked by a nested function ``rows`` over a
    block of whole rows: one block, or on rayon blocks of about ``GRAIN`` elements read
    (``row_work`` per row). The slices are parameters of ``rows``, so LLVM knows that no
    output aliases an input, and the short loops of a row (a pooling window's) vectorize.
    In a closure that captures the inputs they did not: loads and stores kept their
    order, and a row staged on the stack went through memory, stalling on each load.
    ``inputs``: buffer -> element type; ``outputs``: the name of each output's block in
    ``rows``, and its view; ``render_row`` writes one row, where ``row`` is its index and
    each output's name its elements."""
    body = IndentedBuffer()
    body.level = out.level + 2
    render_row(body)
    uses_row = re.search(r"\brow\b", body.getvalue()) is not None
    names = [name for name, _ in outputs]
    params = ["row0: usize" if uses_row else "_row0: usize",
              *(f"{b}: &[{t}]" for b, t in inputs.items()),
              *(f"{name}: &mut [{RUST_TYPES[v.dtype]}]" for name, v in outputs)]
    with out.indent(f"fn rows({', '.join(params)}) {{"):
        rows = _zip_seq([f"{name}.chunks_exact_mut({row_len})" for name in names])
        if uses_row:
            with out.indent(f"for (i, {_zip_pat(names)}) in {rows}.enumerate() {{"):
                out.line("let row = row0 + i;")
                out.lines += body.lines
        else:
            with out.indent(f"for {_zip_pat(names)} in {rows} {{"):
                out.lines += body.lines
    blocks = [f"{v.buffer}[{v.offset}..{v.offset + v.size}]" for _, v in outputs]
    if not par:
        args = ", ".join(["0", *inputs, *(f"&mut {b}" for b in blocks)])
        out.line(f"rows({args});")
        return
    per_block = max(1, GRAIN // row_work)
    chunks = [f"{b}.par_chunks_mut({row_len * per_block})" for b in blocks]
    if len(outputs) == 1:
        it, pat = chunks[0], names[0]
    else:
        it, pat = f"({', '.join(chunks)}).into_par_iter()", f"({', '.join(names)})"
    args = ", ".join([f"block * {per_block}", *inputs, *names])
    out.line(f"{it}.enumerate().for_each(|(block, {pat})| rows({args}));")


def _nested_row(out: IndentedBuffer, k: Elementwise, outer: list[int], inner: list[int],
                in_strides: list[list[int]], names: list[str], aliased: dict[str, str]) -> None:
    """One row made of several trailing dims (``inner``: pooling windows' [2, Wo, 2]) as
    one loop over its elements in order; the outputs' rows are contiguous. An input that
    the row steps through otherwise (a window's max, the same over the window) is first
    copied into a row on the stack by nested loops over the dims. Every row is an array
    of fixed length, so no access is bounds checked and both loops vectorize; indexing
    the inputs inside the nested loops, LLVM unrolls the short loops into gathers and
    scatters."""
    r = len(inner)
    length = int(np.prod(inner))
    coords = _unravel(out, "row", outer, "r", [st[:-r] for st in in_strides])
    for name, (v, _) in zip(names, k.outputs, strict=True):
        out.line(f"let {name}: &mut [{RUST_TYPES[v.dtype]}; {length}] = "
                 f"{name}.try_into().unwrap();")
    loads = []
    invariant: set[str] = set()
    staged: list[tuple[str, list[int]]] = []  # input, its strides over the row's dims
    for (sym, v), st in zip(k.inputs.items(), in_strides, strict=True):
        nz = " != 0" if v.dtype == "bool" else ""
        if v.buffer in aliased:  # in place: read the element about to be written
            loads.append(f"let {sym} = {aliased[v.buffer]}[j]{nz};")
            continue
        base, steps = linear_index(v.offset, coords, st[:-r]), st[-r:]
        if not any(steps):
            out.line(f"let {sym} = {_load(v, base)};")
            invariant.add(sym)
            continue
        loads.append(f"let {sym} = {sym}_row[j]{nz};")
        if _row_major(steps, inner):
            _bind_fixed(out, f"{sym}_row", v, base, length)
            continue
        span = sum((n - 1) * s for n, s in zip(inner, steps, strict=True)) + 1
        _bind_fixed(out, f"{sym}_src", v, base, span)
        out.line(f"let mut {sym}_row = [{ZEROS[v.dtype]}; {length}];")
        staged.append((sym, steps))
    if staged:
        loops = [f"d{i}" for i in range(r)]
        with _loops(out, loops, inner):
            out.line(f"let j = {linear_index(0, loops, list(row_major(tuple(inner))))};")
            for sym, steps in staged:
                out.line(f"{sym}_row[j] = {sym}_src[{linear_index(0, loops, steps)}];")
    exprs = _hoist_reciprocals(out, [e for _, e in k.outputs], invariant)
    with out.indent(f"for j in 0..{length} {{"):
        for line in loads:
            out.line(line)
        values = _cse_body(out, exprs, [v.dtype for v, _ in k.outputs])
        for name, (v, _), val in zip(names, k.outputs, values, strict=True):
            out.line(f"{name}[j] = {_store(v, val)};")


@contextlib.contextmanager
def _loops(out: IndentedBuffer, names: Sequence[str], ranges: Sequence[int | str]
           ) -> Iterator[None]:
    """Nested ``for`` loops, ``names[i]`` over ``ranges[i]`` (an int n: ``0..n``; a
    string: that range), the last innermost; the body goes inside all of them."""
    with contextlib.ExitStack() as stack:
        for name, r in zip(names, ranges, strict=True):
            span = f"0..{r}" if isinstance(r, int) else r
            stack.enter_context(out.indent(f"for {name} in {span} {{"))
        yield


def _bind_fixed(out: IndentedBuffer, name: str, v: View, base: str, length: int) -> None:
    """Bind ``name`` to ``length`` elements of ``v``'s buffer from ``base`` as an array
    reference: its length is known at compile time, so loops that index it within
    bounds are not bounds checked."""
    out.line(f"let {name}: &[{RUST_TYPES[v.dtype]}; {length}] = "
             f"{v.buffer}[{base}..][..{length}].try_into().unwrap();")


def _row(out: IndentedBuffer, k: Elementwise, outer: list[int], row_len: int,
         in_strides: list[list[int]], names: list[str], aliased: dict[str, str]) -> None:
    """One row of an elementwise kernel: ``row`` is its index over ``outer`` (or, with
    no outer dims, over runs of ``row_len``), ``names`` are the output row slices and
    ``aliased`` maps buffers read through one of those slices (in place) to its name."""
    coords = _unravel(out, "row", outer, "r", [st[:-1] for st in in_strides])
    out.line(f"let n = {names[0]}.len();")
    loads = []
    invariant: set[str] = set()
    for (sym, v), st in zip(k.inputs.items(), in_strides, strict=True):
        inner = st[-1]
        base = (linear_index(v.offset, coords, st[:-1]) if outer
                else linear_index(v.offset, ["row"], [row_len * inner]))
        if v.buffer in aliased:  # in place: read the element about to be written
            nz = " != 0" if v.dtype == "bool" else ""
            loads.append(f"let {sym} = {aliased[v.buffer]}[j]{nz};")
        elif (load := _bind_input(out, sym, v, base, inner, "n")) is not None:
            loads.append(load)
        else:
            invariant.add(sym)
    exprs = _hoist_reciprocals(out, [e for _, e in k.outputs], invariant)
    with out.indent("for j in 0..n {"):
        for line in loads:
            out.line(line)
        values = _cse_body(out, exprs, [v.dtype for v, _ in k.outputs])
        for name, (v, _), val in zip(names, k.outputs, values, strict=True):
            out.line(f"{name}[j] = {_store(v, val)};")


def _bind_input(out: IndentedBuffer, sym: str, v: View, base: str, step: int, length: str,
                shift: str = "") -> str | None:
    """Bind input ``sym`` for a loop over ``j`` that starts at element ``base``: once,
    when the input is broadcast along the loop (``step`` 0); otherwise return the
    load the loop does per ``j``, from a row slice ``[base + shift..][..length]``
    when contiguous, strided when not."""
    nz = " != 0" if v.dtype == "bool" else ""
    if step == 0:
        out.line(f"let {sym} = {v.buffer}[{base}]{nz};")
        return None
    start = base if not shift else shift if base == "0" else f"{base} + {shift}"
    if step == 1:
        out.line(f"let {sym}_row = &{v.buffer}[{start}..][..{length}];")
        return f"let {sym} = {sym}_row[j]{nz};"
    return f"let {sym} = {v.buffer}[{start} + j * {step}]{nz};"


def _store(v: View, value: str) -> str:
    return f"u8::from({value})" if v.dtype == "bool" else value


def _load(v: View, index: str) -> str:
    return f"{v.buffer}[{index}]" + (" != 0" if v.dtype == "bool" else "")


def _row_major(strides: list[int], sizes: list[int]) -> bool:
    return tuple(strides) == row_major(tuple(sizes))


def _zip_seq(chunks: list[str]) -> str:
    it = chunks[0]
    for c in chunks[1:]:
        it = f"{it}.zip({c})"
    return it


def _zip_pat(names: list[str]) -> str:
    pat = names[0]
    for n in names[1:]:
        pat = f"({pat}, {n})"
    return pat


def _nested(out: IndentedBuffer, k: Elementwise, sizes: list[int],
            strides: list[list[int]]) -> None:
    loops = [f"i{d}" for d in range(len(sizes))]
    n_out = len(k.outputs)
    with _loops(out, loops, sizes):
        for (sym, v), s in zip(k.inputs.items(), strides[n_out:], strict=True):
            out.line(f"let {sym} = {_load(v, linear_index(v.offset, loops, s))};")
        values = _cse_body(out, [e for _, e in k.outputs], [v.dtype for v, _ in k.outputs])
        for (v, _), s, val in zip(k.outputs, strides[:n_out], values, strict=True):
            out.line(f"{v.buffer}[{linear_index(v.offset, loops, s)}] = "
                     f"{_store(v, val)};")


def _reduce(out: IndentedBuffer, k: Reduce, args: KernelArgs) -> None:
    assert k.out is not None
    lay = reduce_layout(k)
    if _is_column_reduction(lay):
        _column_reduce(out, k, lay)
        return
    ksizes, kstrides = lay.kept_sizes, lay.kept_strides
    count = lay.rows
    total = count * lay.length
    par = total >= PAR_MIN and count > 1
    o = k.out
    target = f"{o.buffer}[{o.offset}..{o.offset + count}]"
    if _small_windows(lay):  # pooling windows: a row of outputs at a time

        def render_row(body: IndentedBuffer) -> None:
            coords = _unravel(body, "row", ksizes[:-1], "r", [s[:-1] for s in kstrides])
            _window_row(body, k, lay, coords)

        assert o.size == count
        _rows_fn(out, _read_buffers(k), [("outs", o)], ksizes[-1], ksizes[-1] * lay.length,
                 par, render_row)
        return
    it = f"{target}.par_iter_mut()" if par else f"{target}.iter_mut()"
    if par:
        it += f".with_min_len({max(1, GRAIN * count // max(total, 1))})"
    with out.indent(f"{it}.enumerate().for_each(|(row, acc_out)| {{", "});"):
        coords = _unravel(out, "row", ksizes, "r", kstrides)
        if _lanes_fit(lay):
            _row_reduce_in_lanes(out, k, lay, coords)
            return
        _reduce_one(out, k, lay, coords)


def _small_windows(lay: ReduceLayout) -> bool:
    """Few elements per output (a pooling window) and a run of outputs along the
    innermost kept dim: the kernel walks outputs a row at a time."""
    return (not _lanes_fit(lay) and lay.length <= 16 and bool(lay.kept_sizes)
            and lay.kept_sizes[-1] >= 4)


def _window_row(out: IndentedBuffer, k: Reduce, lay: ReduceLayout, coords: list[str]) -> None:
    """A row of window reductions (``outs``, along the innermost kept dim; ``coords`` the
    kept coordinates before it). Each input is bound once per row as an array reference
    covering the windows of the row, so the loops over outputs and over each window
    (constant bounds, unrolled) index it unchecked; what a window does not step through
    is loaded once per output, or once per row. Sums add in f32, in order, as NumPy."""
    sum_ = k.combine == "sum"
    count, rsizes = lay.kept_sizes[-1], lay.reduced_sizes
    out.line(f"let outs: &mut [f32; {count}] = outs.try_into().unwrap();")
    window = [f"i{d}" for d in range(len(rsizes))]
    per_output: list[str] = []  # loads once per output, then once per window element
    per_element: list[str] = []
    for (sym, v), ks, rs in zip(k.inputs.items(), lay.kept_strides, lay.reduced_strides,
                                strict=True):
        base = linear_index(v.offset, coords, ks[:-1])
        steps = [ks[-1], *rs]
        if not any(steps):
            out.line(f"let {sym} = {_load(v, base)};")
            continue
        span = sum((n - 1) * st for n, st in zip([count, *rsizes], steps, strict=True)) + 1
        _bind_fixed(out, f"{sym}_row", v, base, span)
        load = f"let {sym} = {sym}_row[{linear_index(0, ['j', *window], steps)}]" + \
            (" != 0;" if v.dtype == "bool" else ";")
        (per_element if any(rs) else per_output).append(load)
    with out.indent(f"for j in 0..{count} {{"):
        for line in per_output:
            out.line(line)
        out.line(f"let mut acc = {'0.0_f32' if sum_ else 'f32::NEG_INFINITY'};")
        with _loops(out, window, rsizes):
            for line in per_element:
                out.line(line)
            (value,) = _cse_body(out, [k.value], ["f32"])
            out.line(f"acc += {value};" if sum_ else f"acc = acc.max({value});")
        out.line("outs[j] = acc;")


def _reduce_one(out: IndentedBuffer, k: Reduce, lay: ReduceLayout, coords: list[str]) -> None:
    """One output of a reduction, at kept coordinates ``coords``, into ``acc_out``.
    Sums accumulate in f64."""
    sum_ = k.combine == "sum"
    rsizes = lay.reduced_sizes
    out.line(f"let mut acc = {'0.0_f64' if sum_ else 'f32::NEG_INFINITY'};")
    loops = [f"i{d}" for d in range(len(rsizes))]
    with _loops(out, loops, rsizes):
        for (sym, v), ks, rs in zip(k.inputs.items(), lay.kept_strides, lay.reduced_strides,
                                    strict=True):
            index = linear_index(v.offset, coords + loops, ks + rs)
            out.line(f"let {sym} = {_load(v, index)};")
        (value,) = _cse_body(out, [k.value], ["f32"])
        out.line(f"acc += f64::from({value});" if sum_ else f"acc = acc.max({value});")
    out.line("*acc_out = acc as f32;" if sum_ else "*acc_out = acc;")


def _lanes_fit(lay: ReduceLayout) -> bool:
    """The innermost reduced dim is long and contiguous (or broadcast) in every
    input: the row can be mapped a chunk at a time and folded into lanes."""
    return (bool(lay.reduced_sizes) and lay.reduced_sizes[-1] >= LANES_MIN_ROW
            and all(st[-1] in (0, 1) for st in lay.reduced_strides)
            and any(st[-1] == 1 for st in lay.reduced_strides))


def _row_reduce_in_lanes(out: IndentedBuffer, k: Reduce, lay: ReduceLayout,
                         coords: list[str]) -> None:
    """The body of a row reduction (inside the per-output closure): each chunk of
    the innermost reduced dim is mapped into a stack buffer, a loop that
    vectorizes, then folded into ``rt::lanes`` accumulators (see lanes.rs)."""
    sum_ = k.combine == "sum"
    *outer, last = lay.reduced_sizes
    if sum_:
        out.line("let mut lanes = rt::lanes::SUMS;")
    else:
        out.line("let mut lanes = rt::lanes::MAXIMA;")
    out.line("let mut chunk = [0.0_f32; rt::lanes::CHUNK];")
    loops = [f"i{d}" for d in range(len(outer))]
    chunked = last > CHUNK  # then the innermost loop walks the row a chunk at a time
    names, ranges = list(loops), list[int | str](outer)
    if chunked:
        names.append("start")
        ranges.append(f"(0..{last}).step_by(rt::lanes::CHUNK)")
    with _loops(out, names, ranges):
        _lanes_chunk(out, k, lay, coords, loops, last, chunked)
    out.line("*acc_out = rt::lanes::sum(&lanes) as f32;" if sum_
             else "*acc_out = rt::lanes::max_of(&lanes);")


def _lanes_chunk(out: IndentedBuffer, k: Reduce, lay: ReduceLayout, coords: list[str],
                 loops: list[str], last: int, chunked: bool) -> None:
    """The lanes' fold of one innermost row (or chunk ``start`` of it)."""
    if chunked:
        out.line(f"let n = ({last} - start).min(rt::lanes::CHUNK);")
    length = "n" if chunked else str(last)
    loads = []
    invariant: set[str] = set()
    for (sym, v), ks, rs in zip(k.inputs.items(), lay.kept_strides, lay.reduced_strides,
                                strict=True):
        base = linear_index(v.offset, coords + loops, ks + rs[:-1])
        load = _bind_input(out, sym, v, base, rs[-1], length, "start" if chunked else "")
        if load is not None:
            loads.append(load)
        else:
            invariant.add(sym)
    (value,) = _hoist_reciprocals(out, [k.value], invariant)
    with out.indent(f"for (j, c) in chunk[..{length}].iter_mut().enumerate() {{"):
        for line in loads:
            out.line(line)
        (value,) = _cse_body(out, [value], ["f32"])
        out.line(f"*c = {value};")
    fold = "add" if k.combine == "sum" else "max"
    out.line(f"rt::lanes::{fold}(&mut lanes, &chunk[..{length}]);")


def _is_column_reduction(lay: ReduceLayout) -> bool:
    """One kept dim, contiguous (or broadcast) in every input, reduced over outer
    dims: a bias gradient. Walking each output's column would stride through
    memory; accumulating whole rows reads it in order."""
    return (len(lay.kept_sizes) == 1 and lay.kept_sizes[0] >= 8 and lay.length > 1
            and all(st[0] in (0, 1) for st in lay.kept_strides)
            and any(st[0] == 1 for st in lay.kept_strides))


def _column_reduce(out: IndentedBuffer, k: Reduce, lay: ReduceLayout) -> None:
    """Rows of the input added into a tile of accumulators (f64 for sums) on the
    stack, ``COLUMN_TILE`` outputs at a time: each row's segment is read in order
    and the tile stays in L1 (a narrow tile walks memory in a large stride, which
    the prefetchers do not follow: 64 columns ran at ~14 GB/s). Tiles run on rayon
    when there are several; a one-tile reduction big enough splits its rows into
    ``COLUMN_PARTS`` fixed groups instead, combined in order, so the result does not
    depend on the thread count."""
    assert k.out is not None
    o, cols = k.out, lay.kept_sizes[0]
    sum_ = k.combine == "sum"
    init = "0.0_f64" if sum_ else "f32::NEG_INFINITY"
    target = f"{o.buffer}[{o.offset}..{o.offset + cols}]"
    total = cols * lay.length
    parts = min(COLUMN_PARTS, lay.reduced_sizes[0])
    if cols <= COLUMN_TILE and total >= COLUMN_PARTS_MIN and parts > 1:
        out.line(f"let mut parts = [[{init}; {cols}]; {parts}];")
        with out.indent("parts.par_iter_mut().enumerate().for_each(|(part, acc)| {", "});"):
            n0 = lay.reduced_sizes[0]
            out.line(f"let rows = part * {n0} / {parts}..(part + 1) * {n0} / {parts};")
            _accumulate_rows(out, k, lay, "rows", str(cols), "")
        with out.indent(f"for (j, o) in {target}.iter_mut().enumerate() {{"):
            terms = [f"parts[{p}][j]" for p in range(parts)]
            if sum_:
                out.line(f"*o = ({' + '.join(terms)}) as f32;")
            else:
                out.line(f"*o = {terms[0]}" + "".join(f".max({t})" for t in terms[1:]) + ";")
        return
    tile = min(cols, COLUMN_TILE)
    par = total >= PAR_MIN and tile < cols
    it = f"{target}.{'par_' if par else ''}chunks_mut({tile})"
    with out.indent(f"{it}.enumerate().for_each(|(part, out)| {{", "});"):
        out.line(f"let j0 = part * {tile};")
        out.line(f"let mut acc = [{init}; {tile}];")
        out.line("let acc = &mut acc[..out.len()];")
        _accumulate_rows(out, k, lay, f"0..{lay.reduced_sizes[0]}", "out.len()", "j0")
        cast = "*a as f32" if sum_ else "*a"
        with out.indent("for (o, a) in out.iter_mut().zip(acc.iter()) {"):
            out.line(f"*o = {cast};")


def _accumulate_rows(out: IndentedBuffer, k: Reduce, lay: ReduceLayout, first: str,
                     width: str, j0: str) -> None:
    """Loops over the reduced dims (the first over the range ``first``), adding each
    row's ``width`` elements, from column ``j0`` on, into ``acc``."""
    loops = [f"i{d}" for d in range(len(lay.reduced_sizes))]
    with _loops(out, loops, [first, *lay.reduced_sizes[1:]]):
        loads = []
        for (sym, v), ks, rs in zip(k.inputs.items(), lay.kept_strides, lay.reduced_strides,
                                    strict=True):
            base = linear_index(v.offset, loops, rs)
            load = _bind_input(out, sym, v, base, ks[0], width, j0)
            if load is not None:
                loads.append(load)
        with out.indent("for (j, a) in acc.iter_mut().enumerate() {"):
            for line in loads:
                out.line(line)
            (value,) = _cse_body(out, [k.value], ["f32"])
            out.line(f"*a += f64::from({value});" if k.combine == "sum"
                     else f"*a = a.max({value});")


def _head(v: View, n: int) -> View:
    return View(v.buffer, v.dtype, v.offset, v.shape[:n], v.strides[:n])


def _unravel(out: IndentedBuffer, flat: str, sizes: list[int], prefix: str,
             strides: list[list[int]]) -> list[str]:
    """Names of the coordinates of ``flat`` over ``sizes`` (row-major), bound by ``let``
    where some view steps along them (``strides``: per view, one per dim)."""
    if len(sizes) <= 1:
        return [flat] if sizes else []
    names = []
    for d in range(len(sizes)):
        names.append(f"{prefix}{d}")
        if not any(s[d] for s in strides):
            continue
        inner = int(np.prod(sizes[d + 1:]))
        expr = f"{flat} / {inner}" if d == 0 else f"{flat} / {inner} % {sizes[d]}"
        if d == len(sizes) - 1:
            expr = f"{flat} % {sizes[d]}"
        out.line(f"let {prefix}{d} = {expr};")
    return names


def _matmul(out: IndentedBuffer, k: Matmul, args: KernelArgs) -> None:
    k = batch_as_rows(k)
    epilogue = k.epilogue
    if epilogue is None:
        _product(out, k)
    elif _fusable_rows(k):
        _product_with_epilogue(out, k, epilogue)
    else:  # the product, then the epilogue over all of it
        _product(out, k)
        _elementwise(out, epilogue, args)
    out.line("Ok(())")


def _fusable_rows(k: Matmul) -> bool:
    """Whether the epilogue can run per row block of a 2-D product: it writes whole
    rows (row-major outputs in distinct buffers) and the product is contiguous."""
    assert k.out is not None and k.epilogue is not None
    outs = [v for v, _ in k.epilogue.outputs]
    return (not k.batch and k.out.contiguous and k.m > 1
            and all(v.contiguous for v in outs) and len({v.buffer for v in outs}) == len(outs)
            and k.out.buffer not in {v.buffer for v in outs})


def _product_with_epilogue(out: IndentedBuffer, k: Matmul, e: Elementwise) -> None:
    """Each block of rows: the product into ``out``, then the epilogue over those rows
    while they are in cache; the blocks run on rayon when the product is big enough."""
    assert k.a is not None and k.b is not None and k.out is not None
    a, b, c = k.a, k.b, k.out
    views = [c, *(v for v, _ in e.outputs)]
    names = ["c"] + [f"o{i}" for i in range(len(views) - 1)]
    aliased = {v.buffer: n for v, n in zip(views, names, strict=True)}
    # The rows of one block, rendered first: `row` and `i` are bound only when used.
    body = IndentedBuffer()
    body.level = 1
    _row(body, e, [k.m], k.n, [list(v.strides) for v in e.inputs.values()], names[1:], aliased)
    uses_row = re.search(r"\brow\b", body.getvalue()) is not None
    rows = [f"{names[0]}.chunks({k.n})"] + [f"{n}.chunks_mut({k.n})" for n in names[1:]]
    loop = f"for {_zip_pat(names)} in {_zip_seq(rows)} {{"
    if uses_row:
        loop = f"for (i, {_zip_pat(names)}) in {_zip_seq(rows)}.enumerate() {{"
    par = 2 * k.m * k.n * k.k >= PAR_FLOPS
    a_at = linear_index(a.offset, ["r0"] if par else [], [a.strides[0]])
    block_len = "c.len()" if k.n == 1 else f"c.len() / {k.n}"
    gemm = (f"rt::gemm::sgemm({block_len}, {k.n}, {k.k}, &{a.buffer}[{a_at}..], "
            f"({a.strides[0]}, {a.strides[1]}), &{b.buffer}[{b.offset}..], "
            f"({b.strides[0]}, {b.strides[1]}), c, ({k.n}, 1), false)?;")
    needs_r0 = par and (uses_row or "r0" in a_at)

    def block() -> None:
        out.line(gemm)
        with out.indent(loop):
            if uses_row:
                out.line("let row = r0 + i;" if par else "let row = i;")
            out.extend("\n".join(line[len(body.unit):] for line in body.lines))

    if not par:  # one block, on the calling thread
        for name, v in zip(names, views, strict=True):
            out.line(f"let {name} = &mut {v.buffer}[{v.offset}..{v.offset + v.size}];")
        if k.n == 1:  # a column: one loop over it, not a loop over rows of one
            out.line(gemm)
            column = IndentedBuffer()
            column.level = out.level
            _row(column, e, [], 0, [[v.strides[0]] for v in e.inputs.values()], names[1:],
                 aliased)
            out.lines += column.lines
            return
        block()
        return
    out.line(f"let rows = rt::gemm::block_rows({k.m}, {k.n}, {k.k});")
    per_block = "rows" if k.n == 1 else f"rows * {k.n}"
    chunks = [f"{v.buffer}[{v.offset}..{v.offset + v.size}].par_chunks_mut({per_block})"
              for v in views]
    it = f"({', '.join(chunks)}).into_par_iter()"
    block_var = "block" if needs_r0 else "_"
    head = (f"{it}.enumerate().try_for_each(|({block_var}, ({', '.join(names)}))| "
            "-> Result<(), rt::Error> {")
    with out.indent(head, "})?;"):
        if needs_r0:
            out.line("let r0 = block * rows;")
        block()
        out.line("Ok(())")


def _product(out: IndentedBuffer, k: Matmul) -> None:
    assert k.a is not None and k.b is not None and k.out is not None
    views = [k.a, k.b, k.out]
    nb = len(k.batch)
    sizes, strides = collapse(k.batch, [_head(v, nb) for v in views])
    mats = [f"({v.strides[-2]}, {v.strides[-1]})" for v in views]
    # The last batch dim goes to sgemm_batched, the last two to sgemm_batched_outer
    # (all their products share the thread pool); any others are an explicit loop.
    inner = sizes[-1] if sizes else 1
    bstr = [s[-1] if sizes else 0 for s in strides]
    two = len(sizes) >= 2
    loops = [f"b{d}" for d in range(len(sizes) - (2 if two else 1))]
    offs = [linear_index(v.offset, loops, s) for v, s in zip(views, strides, strict=True)]
    a, b, c = (f"({bs}, {m[1:-1]})" for bs, m in zip(bstr, mats, strict=True))
    operands = (f"&{k.a.buffer}[{offs[0]}..], {a}, &{k.b.buffer}[{offs[1]}..], {b}, "
                f"&mut {k.out.buffer}[{offs[2]}..], {c}, false)?;")
    with _loops(out, loops, sizes[:len(loops)]):
        if two:
            outer = f"[{', '.join(str(s[-2]) for s in strides)}]"
            out.line(f"rt::gemm::sgemm_batched_outer({sizes[-2]}, {outer}, {inner}, {k.m}, "
                     f"{k.n}, {k.k}, {operands}")
        else:
            out.line(f"rt::gemm::sgemm_batched({inner}, {k.m}, {k.n}, {k.k}, {operands}")


def _gather(out: IndentedBuffer, k: Gather) -> None:
    assert k.ids is not None and k.src is not None and k.out is not None
    ids = f"&{k.ids.buffer}[{k.ids.offset}..{k.ids.offset + k.ids.size}]"
    src = f"&{k.src.buffer}[{k.src.offset}..{k.src.offset + k.src.size}]"
    dst = f"&mut {k.out.buffer}[{k.out.offset}..{k.out.offset + k.out.size}]"
    if k.scatter:
        out.line(f"rt::gather::scatter_add_rows({ids}, {src}, {k.row_len}, {dst}, {k.rows})?;")
    else:
        out.line(f"rt::gather::take_rows({src}, {k.row_len}, {ids}, {dst})?;")
    out.line("Ok(())")


def conv_params(k: Conv) -> str:
    """The runtime's description of one convolution, as a Rust expression."""
    n, c, h, w, o, kh, kw = k.dims
    return (f"rt::conv::Conv2d {{ n: {n}, c: {c}, h: {h}, w: {w}, o: {o}, kh: {kh}, kw: {kw}, "
            f"stride: ({k.stride[0]}, {k.stride[1]}), padding: ({k.padding[0]}, "
            f"{k.padding[1]}) }}")


def _conv(out: IndentedBuffer, k: Conv) -> None:
    assert k.lhs is not None and k.rhs is not None and k.out is not None
    assert k.cols is None, "kept columns are the PTX backend's (Lowered.ptx_schedules)"
    fn = {"forward": "conv2d_forward", "input_grad": "conv2d_input_grad",
          "weight_grad": "conv2d_weight_grad"}[k.mode]
    out.line(f"let p = {conv_params(k)};")

    def whole(v: View, mut: str = "") -> str:
        return f"&{mut}{v.buffer}[{v.offset}..{v.offset + v.size}]"

    out.line(f"rt::conv::{fn}(&p, {whole(k.lhs)}, {whole(k.rhs)}, {whole(k.out, 'mut ')}, "
             "scratch)")
