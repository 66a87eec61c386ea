"""The op record and the table that holds every op once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError, ShapeError

if TYPE_CHECKING:
    import sympy

    from ..builder import Var

Shape = tuple[int, ...]
InferRule = Callable[[list[Shape], list[str], dict[str, Any]], tuple[Shape, str]]
# A VJP rule gets the output cotangent, the output and the args (as Vars) plus
# the op's attrs, and returns one cotangent (or None) per argument.
VjpRule = Callable[..., Sequence["Var | None"]]


@dataclass
class OpDef:
    """One op: everything every stage needs to know about it, defined once.

    ``kind`` tells the scheduler which kernel family the op belongs to:
    source, elementwise, reduce, movement, matmul, gather, conv.
    Elementwise ops carry ``expr`` over ``symbols`` (sympy, built on first use
    from ``scalar``): their reference and their VJP are derived from it. Other ops
    carry ``ref`` and ``vjp``. ``vjp=None`` means the op is not differentiable (its
    args get no gradient).
    """

    name: str
    kind: str
    infer: InferRule
    ref: Callable[..., np.ndarray] | None = None
    vjp: VjpRule | None = None
    # Elementwise ops: ``(expr, symbols)``, built on first use so that the table (and
    # tracing) loads without sympy; a process that only loads a cached module never
    # imports it.
    scalar: Callable[[], tuple[sympy.Expr, tuple[sympy.Symbol, ...]]] | None = None
    arity: int | None = None
    doc: str = ""
    derivatives: dict[int, Any] = field(default_factory=dict)

    @functools.cached_property
    def _scalar(self) -> tuple[sympy.Expr | None, tuple[sympy.Symbol, ...]]:
        return (None, ()) if self.scalar is None else self.scalar()

    @property
    def expr(self) -> sympy.Expr | None:
        """The scalar expression of an elementwise op (None for other ops)."""
        return self._scalar[0]

    @property
    def symbols(self) -> tuple[sympy.Symbol, ...]:
        """The free symbols of ``expr``, one per argument, in argument order."""
        return self._scalar[1]


OPS: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise ValueError(f"op {opdef.name!r} registered twice")
    OPS[opdef.name] = opdef
    return opdef


# ---- shape rules shared by several ops --------------------------------------------


def broadcast_shapes(op: str, shapes: Sequence[Shape]) -> Shape:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))
    except ValueError:
        pretty = " and ".join(str(tuple(s)) for s in shapes)
        raise ShapeError(f"{op}: shapes {pretty} do not broadcast") from None


def same_dtype(op: str, dtypes: Sequence[str]) -> str:
    if len(set(dtypes)) > 1:
        raise DTypeError(
            f"{op}: operands have different dtypes {', '.join(dtypes)}; "
            "convert one with .astype(...)")
    return dtypes[0]


def normalize_axes(op: str, axes: Any, ndim: int) -> tuple[int, ...]:
    """Axes as a sorted tuple of non-negative ints (None means all)."""
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, int | np.integer):
        axes = (int(axes),)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{op}: axis {a} is out of range for a {ndim}-d tensor")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: repeated axis in {tuple(axes)}")
    return tuple(sorted(out))
