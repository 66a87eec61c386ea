"""The WGSL renderer's expressions: sympy -> WGSL, and what WGSL lacks, legalized.

Read it as tables over the C-like base printer (``base.CLikePrinter``):
``WgslPrinter.FUNCTIONS`` maps each scalar function to its WGSL form,
``POWERS`` and ``CASTS`` the rest. What WGSL does not have, or leaves to the
implementation, is handled before or while printing:

- **No f64, no i64**: the scheduler already refuses f64 graphs; indices are
  ``u32``, values ``f32``/``i32``; bools are stored as one ``u32`` each.
- **where / Piecewise** print as nested ``select(else, then, cond)`` (both
  sides are evaluated, which is safe: expressions have no side effects).
- **inf and NaN** are implementation-defined in WGSL (a compiler may assume
  they never occur) and a literal infinity does not even parse: ``legalize``
  replaces ±inf by ±``F32_MAX``, the largest finite float32, so masks and
  max-reduction identities are large finite values; a NaN literal is an error.
  No value ever goes through a uniform (offsets are baked into the shaders).
- **erf, tanh, log1p, pow** come from helper functions (``HELPERS``) emitted in
  each shader that uses them: tanh is the float32 polynomial of the PTX backend
  (``legalize.TANH_P``), saturating instead of overflowing; erf is the PTX
  backend's former one (``ERF_P``, ``ERFC_R`` below: a branch, natural exp).
  Emulated in float32 with an exactly rounded ``exp`` and ``fma``, erf is within
  1.07 ulp and tanh 0.95 ulp of the exact value on [-6, 6]; measured on lavapipe
  (its own ``exp``), 1.4 and 1.6 ulp. log1p uses the ``log(u) * x / (u - 1)``
  correction; pow handles a zero or negative base
  (WGSL's ``pow`` is undefined for x < 0); x**2 and x**3 are products and other
  integer powers go by squaring. The device's own exp/log are what they are:
  on lavapipe exp is within 60 ulp up to |x| = 80 and log 510 ulp near 1 (an
  absolute error of 4e-9 there).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import sympy as sp
from sympy.printing.codeprinter import CodePrinter

from ferrograd.ir.errors import BackendError

from .base import CLikePrinter, IndentedBuffer, f32_literal, fold_constant_factors, value_kind
from .legalize import TANH_P, TANH_SMALL

F32_MAX = float(np.finfo(np.float32).max)
WGSL_TYPES = {"f32": "f32", "i32": "i32", "bool": "u32"}  # bools are stored as u32 0/1
KIND_OF_DTYPE = {"f32": "float", "i32": "int", "bool": "bool"}


class WgslPrinter(CLikePrinter, CodePrinter):
    """sympy -> WGSL f32/i32/bool expressions."""

    language = "WGSL"
    known_functions: ClassVar[dict[str, str]] = {}  # everything goes through FUNCTIONS
    FUNCTIONS: ClassVar[dict[str, str]] = {
        "exp": "exp({0})", "log": "log({0})", "log1p": "fg_log1p({0})",
        "tanh": "fg_tanh({0})", "sin": "sin({0})", "cos": "cos({0})", "Abs": "abs({0})",
        "erf": "fg_erf({0})", "sign": "sign({0})",
    }
    POWERS: ClassVar[dict[str, str]] = {
        "recip": "(1.0 / {b})", "sqrt": "sqrt({a})", "rsqrt": "(1.0 / sqrt({a}))",
        "powi": "fg_powi({a}, {n})", "powf": "fg_pow({a}, {e})",
    }
    CASTS: ClassVar[dict[tuple[str, str], str]] = {
        ("bool", "float"): "f32({0})", ("int", "float"): "f32({0})",
        ("bool", "int"): "i32({0})", ("float", "int"): "i32({0})",
        ("float", "bool"): "({0}) != 0.0", ("int", "bool"): "({0}) != 0",
    }

    def float_literal(self, value: float) -> str:
        if np.isnan(value):
            raise BackendError("a NaN constant cannot be written in WGSL (its value is "
                               "implementation-defined there)")
        if np.isinf(value):  # legalize() removes these; a literal inf would not parse
            value = F32_MAX if value > 0 else -F32_MAX
        return f32_literal(value)

    def operand(self, e: Any) -> str:
        """``e`` as an operand of ``*`` or ``/``: parenthesized when it binds looser."""
        return str(self.parenthesize(e, 60))  # PRECEDENCE["Pow"]

    def _format_code(self, lines: list[str]) -> list[str]:
        return lines

    def _print_Pow(self, e: Any) -> str:
        if e.exp in (2, 3):  # x * x: exact, and defined for x < 0 (pow is not)
            b = self.operand(e.base)
            return "(" + " * ".join([b] * int(e.exp)) + ")"
        return super()._print_Pow(e)

    def _print_Heaviside(self, e: Any) -> str:
        z = self._print(e.args[0])
        h0 = self.float_literal(float(e.args[1])) if len(e.args) > 1 else "0.5"
        return f"select(select({h0}, 0.0, {z} < 0.0), 1.0, {z} > 0.0)"

    def _fold(self, e: Any, name: str) -> str:
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"{name}({out}, {self._print(a)})"
        return out

    def _print_Max(self, e: Any) -> str:
        return self._fold(e, "max")

    def _print_Min(self, e: Any) -> str:
        return self._fold(e, "min")

    def _print_Piecewise(self, e: Any) -> str:
        *cases, (last, cond) = e.args
        if cond is not sp.true:
            raise BackendError(f"a Piecewise without a default case cannot be printed: {e}")
        out = self._print(last)
        for value, c in reversed(cases):
            out = f"select({out}, {self._print(value)}, {self._print(c)})"
        return out

    def _print_ITE(self, e: Any) -> str:  # sympy's if-then-else of booleans
        cond, then, other = (self._print(a) for a in e.args)
        return f"select({other}, {then}, {cond})"

    def _print_Not(self, e: Any) -> str:
        return f"!({self._print(e.args[0])})"


# ---- legalization: sympy -> sympy, before printing ------------------------------------------


def _finite(e: Any) -> Any:
    return sp.Float(F32_MAX if e == sp.oo else -F32_MAX, 24)


LEGALIZE: list[tuple[str, Any, Any]] = [
    # (name, what to match, rewrite)
    ("infinity", lambda e: e in (sp.oo, -sp.oo), _finite),
    ("nan", lambda e: e is sp.nan, lambda e: _raise_nan()),
]


def _raise_nan() -> Any:
    raise BackendError("a NaN constant cannot be written in WGSL")


def legalize(expr: Any) -> Any:
    """``expr`` with what WGSL cannot express rewritten (see the module docstring)."""
    for _, query, rewrite in LEGALIZE:
        expr = expr.replace(query, rewrite)
    return expr


# ---- helper functions a shader may call ------------------------------------------------------

# erf(x) = x + x·P(z), z = x², |x| < 1; log(erfc(x)) = R(x) on [1, 4] (fitted in float64
# with mpmath, a reweighted least-squares toward minimax; the PTX backend's erf until it
# moved to one short form for both branches, legalize.erf_).
ERF_P = (0.12837916612625122, -0.37612637877464294, 0.11283781379461288,
         -0.026865391060709953, 0.005220949649810791, -0.0008483186247758567,
         0.00011261222971370444, -9.657682312536053e-06)
ERFC_R = (6.273407052503899e-05, -1.128811001777649, -0.6352888941764832,
          -0.10518985986709595, 0.02198334038257599, -0.0020540489349514246,
          -0.0005262902704998851, 0.0002676689764484763, -5.4857449867995456e-05,
          5.927623988100095e-06, -2.754254921910615e-07)


def _horner(coeffs: tuple[float, ...], z: str) -> str:
    acc = f32_literal(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = f"fma({z}, {acc}, {f32_literal(c)})"
    return acc


HELPERS: dict[str, str] = {
    "fg_erf": f"""\
// erf in float32: x + x P(x^2) below 1, 1 - exp(R(|x|)) up to 4, then +-1.
fn fg_erf(x: f32) -> f32 {{
    let a = abs(x);
    if (a < 1.0) {{
        return fma(x, {_horner(ERF_P, "x * x")}, x);
    }}
    let t = min(a, 4.0);
    let r = 1.0 - exp({_horner(ERFC_R, "t")});
    return select(r, -r, x < 0.0);
}}
""",
    "fg_tanh": f"""\
// tanh in float32: x + x z P(z) (z = x^2) below {TANH_SMALL}, else 1 - 2 / (exp(2|x|) + 1),
// which saturates to +-1 instead of overflowing.
fn fg_tanh(x: f32) -> f32 {{
    let a = abs(x);
    if (a < {f32_literal(TANH_SMALL)}) {{
        let z = x * x;
        return fma(x * z, {_horner(TANH_P, "z")}, x);
    }}
    let r = 1.0 - 2.0 / (exp(min(2.0 * a, 88.0)) + 1.0);
    return select(r, -r, x < 0.0);
}}
""",
    "fg_log1p": """\
// log(1 + x) without losing x when it is small: log(u) * x / (u - 1), u = 1 + x.
fn fg_log1p(x: f32) -> f32 {
    let u = 1.0 + x;
    let d = u - 1.0;
    if (d == 0.0) {
        return x;
    }
    return log(u) * (x / d);
}
""",
    "fg_powi": """\
// x to an integer power by squaring (defined for every x, unlike pow).
fn fg_powi(x: f32, n: i32) -> f32 {
    var result = 1.0;
    var base = x;
    var k = u32(abs(n));
    while (k != 0u) {
        if ((k & 1u) == 1u) {
            result = result * base;
        }
        base = base * base;
        k = k >> 1u;
    }
    return select(result, 1.0 / result, n < 0);
}
""",
    "fg_pow": """\
// x ** y as NumPy: 1 for y = 0; a negative base only with an integer y (else NaN).
fn fg_pow(x: f32, y: f32) -> f32 {
    if (y == 0.0) {
        return 1.0;
    }
    if (x == 0.0) {
        return select(1.0 / x, 0.0, y > 0.0);
    }
    let m = exp2(y * log2(abs(x)));
    if (x > 0.0) {
        return m;
    }
    if (floor(y) != y) {
        return (x - x) / (x - x);
    }
    return select(m, -m, fract(y * 0.5) != 0.0);
}
""",
}


def helpers_for(body: str) -> str:
    """The helper functions ``body`` calls (helpers call no other helper)."""
    used = [name for name in HELPERS if f"{name}(" in body]
    return "\n".join(HELPERS[name] for name in used)


# ---- expression bodies ---------------------------------------------------------------------


def cse_body(out: IndentedBuffer, exprs: list[Any], dtypes: list[str]) -> list[str]:
    """``let`` bindings for shared subexpressions; the final expressions, each printed as
    its target dtype. Each binding's symbol carries its kind (int, float, bool), so a
    later comparison with it prints in the right type."""
    printer = WgslPrinter()
    exprs = [legalize(fold_constant_factors(e)) for e in exprs]
    subs, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("t"), optimizations=None)
    typed: dict[Any, Any] = {}
    for sym, sub in subs:
        sub = sub.xreplace(typed)
        kind = value_kind(sub)
        typed[sym] = sp.Symbol(sym.name, **({"integer": True} if kind == "int" else
                                            {"real": True} if kind == "float" else {}))
        out.line(f"let {sym.name} = {printer.expr(sub, kind)};")
    return [printer.expr(e.xreplace(typed), KIND_OF_DTYPE[d])
            for e, d in zip(reduced, dtypes, strict=True)]
