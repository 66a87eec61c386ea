"""What every renderer shares: an indented text buffer, and the C-like parts of
printing an elementwise expression (literals, casts, the int/float context)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import sympy as sp
from sympy.printing.precedence import precedence

from ferrograd.ir.graph import Graph

from ..kernel_ir import Matmul, Reduce, ToBool, ToFloat, ToInt, View


class IndentedBuffer:
    """Lines of code with an indentation level (Inductor's idea)."""

    def __init__(self, indent: str = "    ") -> None:
        self.lines: list[str] = []
        self.level = 0
        self.unit = indent

    def line(self, text: str = "") -> None:
        self.lines.append(self.unit * self.level + text if text else "")

    def extend(self, text: str) -> None:
        for t in text.splitlines():
            self.line(t)

    @contextlib.contextmanager
    def indent(self, opener: str | None = None, closer: str = "}") -> Iterator[None]:
        if opener is not None:
            self.line(opener)
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1
            if opener is not None:
                self.line(closer)

    def getvalue(self) -> str:
        return "\n".join(self.lines) + "\n"


def value_kind(e: Any) -> str:
    """"bool", "int" or "float": the type an expression evaluates to in generated code."""
    if isinstance(e, sp.Symbol):  # before Boolean: a sympy Symbol is also a Boolean
        if e.is_integer:
            return "int"
        return "float" if e.is_real else "bool"
    if isinstance(e, sp.logic.boolalg.Boolean | sp.Rel | ToBool) or e in (sp.true, sp.false):
        return "bool"
    if isinstance(e, ToInt):
        return "int"
    if isinstance(e, ToFloat):
        return "float"
    if isinstance(e, sp.Piecewise):
        # A literal branch says little (sympy folds 0.0 * x to the Integer 0): the
        # first computed branch decides, else whether any literal is a float.
        computed = [v for v, _ in e.args if not v.is_Number]
        if computed:
            return value_kind(computed[0])
        return "float" if any(v.is_Float for v, _ in e.args) else "int"
    if e.is_Integer:
        return "int"
    if e.free_symbols and all(value_kind(s) == "int" for s in e.free_symbols) and \
            all(a.is_Integer for a in e.atoms(sp.Number)):
        return "int"
    return "float"



class CLikePrinter:
    """The C-like half of a kernel expression printer, mixed in front of a sympy code
    printer (``class RustPrinter(CLikePrinter, RustCodePrinter)``). It owns the int/float
    context, literals, comparisons, casts and the shape of powers; a backend fills the
    tables and says how it writes a float literal. Unknown functions raise (strict).
    """

    # sympy function name -> template: {0} the argument as printed, {r0} the argument
    # as an operand (parenthesized as the backend needs, e.g. a method receiver).
    FUNCTIONS: ClassVar[dict[str, str]] = {}
    # "recip", "sqrt", "rsqrt" (x**-1, x**(1/2), x**(-1/2)), "powi" (an integer power),
    # "powf" (any other): templates over {b} (the base as an operand), {a} (the base as
    # printed), {n} (the integer exponent) and {e} (the exponent, as a float).
    POWERS: ClassVar[dict[str, str]] = {}
    # (from kind, to kind) -> template over {0}; a missing pair prints the value as is.
    CASTS: ClassVar[dict[tuple[str, str], str]] = {}

    if TYPE_CHECKING:  # provided by the sympy printer it is mixed into
        def doprint(self, expr: Any) -> str: ...

        def parenthesize(self, item: Any, level: float, strict: bool = False) -> str: ...

    def __init__(self) -> None:
        super().__init__({"strict": True})  # type: ignore[call-arg]
        self._int = False  # printing an i32 subexpression

    def expr(self, e: Any, kind: str | None = None) -> str:
        """``e`` as code; ``kind`` ("float", "int", "bool") when the target type is known."""
        self._int = (kind or value_kind(e)) == "int"
        return str(self.doprint(e))

    def float_literal(self, value: float) -> str:
        raise NotImplementedError

    def operand(self, e: Any) -> str:
        """``e`` as the operand of a method call or operator: parenthesized unless a symbol."""
        text = self._print(e)
        return text if e.is_Symbol else f"({text})"

    def _print(self, e: Any, **kwargs: Any) -> str:
        template = self.FUNCTIONS.get(type(e).__name__)
        if template is None:
            return str(super()._print(e, **kwargs))  # type: ignore[misc]
        # Print only the forms the template uses (nested calls would print twice).
        plain = [self._print(a) if f"{{{i}}}" in template else ""
                 for i, a in enumerate(e.args)]
        operands = {f"r{i}": self.operand(a) for i, a in enumerate(e.args)
                    if f"{{r{i}}}" in template}
        return template.format(*plain, **operands)

    # ---- literals ----------------------------------------------------------------
    def _print_Integer(self, e: Any, _type: bool = False) -> str:
        return str(int(e)) if self._int else self.float_literal(float(e))

    def _print_Float(self, e: Any, _type: bool = False) -> str:
        return self.float_literal(float(e))

    def _print_Rational(self, e: Any) -> str:
        return self.float_literal(float(e))

    def _print_NumberSymbol(self, e: Any) -> str:
        return self.float_literal(float(e))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_BooleanTrue(self, e: Any) -> str:
        return "true"

    def _print_BooleanFalse(self, e: Any) -> str:
        return "false"

    # ---- powers, comparisons, casts ----------------------------------------------
    def _print_Pow(self, e: Any) -> str:
        base, exp = e.base, e.exp
        if exp == -1:
            key = "recip"
        elif exp == sp.Rational(1, 2):
            key = "sqrt"
        elif exp == sp.Rational(-1, 2):
            key = "rsqrt"
        else:
            key = "powi" if exp.is_Integer else "powf"
        template = self.POWERS[key]
        fields = {}
        if "{b}" in template:
            fields["b"] = self.operand(base)
        if "{a}" in template:
            fields["a"] = self._print(base)
        if key == "powi":
            fields["n"] = str(int(exp))
        elif key == "powf":
            fields["e"] = self._with_int(exp, False)
        return template.format(**fields)

    def _print_Relational(self, e: Any) -> str:
        saved = self._int
        self._int = value_kind(e.lhs) == "int" and value_kind(e.rhs) == "int"
        try:
            op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[e.rel_op]
            return f"{self.parenthesize(e.lhs, precedence(e))} {op} " \
                   f"{self.parenthesize(e.rhs, precedence(e))}"
        finally:
            self._int = saved

    def _with_int(self, e: Any, as_int: bool) -> str:
        """``e`` printed in an int (or float) context."""
        saved, self._int = self._int, as_int
        try:
            return self._print(e)
        finally:
            self._int = saved

    def _cast(self, e: Any, to: str) -> str:
        (a,) = e.args
        kind = value_kind(a)
        return self.CASTS.get((kind, to), "{0}").format(self._with_int(a, kind == "int"))

    def _print_ToFloat(self, e: Any) -> str:
        return self._cast(e, "float")

    def _print_ToInt(self, e: Any) -> str:
        return self._cast(e, "int")

    def _print_ToBool(self, e: Any) -> str:
        return self._cast(e, "bool")

def fold_constant_factors(e: Any) -> Any:
    """``e`` with the constant factors of each product that involve an irrational
    (sqrt(2), pi) evaluated into one literal, for the C-like printers: ``x * 0.3989423``
    where sympy's form prints as ``0.5 * sqrt(2) * x / sqrt(pi)``, which rounds three
    times and divides per element."""
    if not e.args:
        return e
    args = [fold_constant_factors(a) for a in e.args]
    if e.is_Mul:
        numbers = [a for a in args if a.is_number]
        if any(not (a.is_Rational or a.is_Float) for a in numbers):
            value = sp.Mul(*numbers).evalf(30)
            if value.is_real and value.is_finite:
                rest = [a for a in args if not a.is_number]
                return sp.Mul(sp.Float(value, 30), *rest, evaluate=False)  # not distributed
    return e.func(*args) if args != list(e.args) else e


def f32_literal(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (no excess precision)."""
    v = np.float32(value)
    if np.isnan(v):
        return "f32::NAN"
    if np.isinf(v):
        return "f32::INFINITY" if v > 0 else "f32::NEG_INFINITY"
    text = np.format_float_positional(v, unique=True, trim="0")
    if "e" not in text and len(text) > 20:
        text = np.format_float_scientific(v, unique=True, trim="0")
    return text if any(c in text for c in ".e") else text + ".0"


def linear_index(offset: int, names: list[str], strides: list[int]) -> str:
    """``offset + i0 * s0 + ...`` with zero strides and zero offsets left out.
    ``names`` may be shorter than ``strides`` (leading dims only)."""
    parts = [str(offset)] if offset else []
    for var, stride in zip(names, strides, strict=False):
        if stride == 1:
            parts.append(var)
        elif stride:
            parts.append(f"{var} * {stride}")
    return " + ".join(parts) or "0"


def collapse(shape: tuple[int, ...], views: list[View]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours every view steps through alike.

    Returns the collapsed shape and, per view, its collapsed strides.
    """
    dims = [d for d, n in enumerate(shape) if n != 1]
    sizes = [shape[d] for d in dims]
    strides = [[v.strides[d] for d in dims] for v in views]
    i = len(sizes) - 2
    while i >= 0:
        if all(s[i] == s[i + 1] * sizes[i + 1] for s in strides):
            sizes[i] *= sizes[i + 1]
            del sizes[i + 1]
            for s in strides:
                s[i] = s[i + 1]
                del s[i + 1]
        i -= 1
    return sizes, strides


def batch_as_rows(k: Matmul) -> Matmul:
    """``k`` with its batch folded into the rows of one product, where that is a
    relabelling: ``b`` is shared by the batch, and ``a``, ``out`` and every view of the
    epilogue step through (batch..., m) as through one dim. A linear layer on
    [B, T, D] rows is then one B·T-row product (a faster GEMM, and a 2-D one whose
    epilogue can run per row block). Otherwise ``k`` unchanged."""
    if not k.batch or k.a is None or k.b is None or k.out is None:
        return k
    nb = len(k.batch)
    if any(k.b.strides[:nb]):
        return k
    rows = int(np.prod(k.batch)) * k.m
    views = [k.a, k.out]
    if k.epilogue is not None:
        views += [*k.epilogue.inputs.values(), *(v for v, _ in k.epilogue.outputs)]
    merged = {}
    for v in views:
        if int(np.prod(v.shape[:-1])) != rows:
            return k
        _, (strides,) = collapse(v.shape[:-1], [View(v.buffer, v.dtype, v.offset, v.shape[:-1],
                                                     v.strides[:-1])])
        if len(strides) > 1:
            return k
        merged[v] = View(v.buffer, v.dtype, v.offset, (rows, v.shape[-1]),
                         (strides[0] if strides else 0, v.strides[-1]))
    epilogue = k.epilogue
    if epilogue is not None:
        epilogue = dataclasses.replace(
            epilogue, shape=(rows, k.n),
            inputs={s: merged[v] for s, v in epilogue.inputs.items()},
            outputs=[(merged[v], e) for v, e in epilogue.outputs])
    return dataclasses.replace(k, batch=(), m=rows, a=merged[k.a], out=merged[k.out],
                               b=View(k.b.buffer, k.b.dtype, k.b.offset, k.b.shape[nb:],
                                      k.b.strides[nb:]),
                               epilogue=epilogue)


@dataclass(frozen=True)
class ReduceLayout:
    """A reduction's iteration space as every backend walks it: kept dims (one output
    element each) and reduced dims, each collapsed; strides per input view, in the
    order of ``Reduce.inputs``."""

    kept_sizes: list[int]
    kept_strides: list[list[int]]
    reduced_sizes: list[int]
    reduced_strides: list[list[int]]

    @property
    def rows(self) -> int:
        return int(np.prod(self.kept_sizes)) if self.kept_sizes else 1

    @property
    def length(self) -> int:
        return int(np.prod(self.reduced_sizes)) if self.reduced_sizes else 1


def reduce_layout(k: Reduce) -> ReduceLayout:
    kept = [d for d in range(len(k.shape)) if d not in k.axes]
    perm = tuple(kept + list(k.axes))
    views = [v.permute(perm) for v in k.inputs.values()]
    shape = tuple(k.shape[p] for p in perm)
    n = len(kept)
    kept_views = [View(v.buffer, v.dtype, v.offset, v.shape[:n], v.strides[:n]) for v in views]
    red_views = [View(v.buffer, v.dtype, v.offset, v.shape[n:], v.strides[n:]) for v in views]
    ksizes, kstrides = collapse(shape[:n], kept_views)
    rsizes, rstrides = collapse(shape[n:], red_views)
    return ReduceLayout(ksizes, kstrides, rsizes, rstrides)


def check_ids(graph: Graph, input_name: str, ids: str) -> str | None:
    """The Rust statement that range-checks class labels / embedding ids held by the
    input ``input_name`` (a ``&[i32]`` expression ``ids``) before anything runs; None
    for an input that indexes nothing. Every backend's module uses this one check."""
    bound = graph.index_bounds.get(input_name)
    if bound is None:
        return None
    return (f"rt::gather::check_ids(\"input '{input_name}'\", {ids}, {bound})"
            ".map_err(rt::Error::from)?;")
