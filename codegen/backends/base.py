"""What every renderer shares: an indented text buffer, and the C-like parts of
printing an elementwise expression (literals, casts, the int/float context)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import sympy as sp

from ..kernel_ir import ToBool, ToFloat, ToInt, View


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
        return value_kind(e.args[0][0])
    if e.is_Integer:
        return "int"
    if e.free_symbols and all(value_kind(s) == "int" for s in e.free_symbols) and \
            all(a.is_Integer for a in e.atoms(sp.Number)):
        return "int"
    return "float"


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
