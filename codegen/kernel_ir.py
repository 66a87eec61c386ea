"""The kernel IR: what the scheduler hands every backend. No backend's syntax lives here.

A kernel reads and writes ``View``s — strided windows of ``Buffer``s — so
movement ops (reshape, transpose, broadcast, slice) cost nothing: they are index
maps. Elementwise math is a sympy expression per output over named inputs; each
backend prints it with its own printer. The kinds are few on purpose: every
backend renders exactly these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp


@dataclass(frozen=True)
class Buffer:
    """Storage for one tensor. ``kind`` says where it lives: input (fed per call),
    param, state, const (baked into the module), temp (planned in the arena)."""

    name: str
    kind: str
    dtype: str
    size: int
    value: np.ndarray | None = None  # for consts only


@dataclass(frozen=True)
class View:
    """A strided window of a buffer, in elements: element ``idx`` of the view lives
    at ``offset + sum(idx[d] * strides[d])``. Stride 0 is a broadcast."""

    buffer: str
    dtype: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        # A size-1 dim is never stepped over: stride 0 keeps equal views equal.
        strides = tuple(0 if d == 1 else int(s) for d, s in zip(self.shape, self.strides,
                                                                 strict=True))
        object.__setattr__(self, "strides", strides)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def contiguous(self) -> bool:
        return self.strides == row_major(self.shape) or self.size <= 1

    def permute(self, perm: tuple[int, ...]) -> View:
        return View(self.buffer, self.dtype, self.offset, tuple(self.shape[p] for p in perm),
                    tuple(self.strides[p] for p in perm))

    def broadcast_to(self, shape: tuple[int, ...]) -> View:
        lead = len(shape) - len(self.shape)
        strides = [0] * lead + [0 if d == 1 and t != 1 else s for d, t, s in
                                zip(self.shape, shape[lead:], self.strides, strict=True)]
        return View(self.buffer, self.dtype, self.offset, tuple(shape), tuple(strides))

    def reshape(self, shape: tuple[int, ...]) -> View | None:
        """The same elements in ``shape`` (of equal size) without a copy, or None when
        the strides cannot say it (NumPy's no-copy reshape attempt). Splitting an axis
        of stride s into (a, b) always works: strides (b*s, s). Merging axes works
        only when each steps evenly into the next (stride = next stride * next dim)."""
        shape = tuple(shape)
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot view {self.shape} as {shape}: sizes differ")
        if self.size <= 1:
            return View(self.buffer, self.dtype, self.offset, shape, (0,) * len(shape))
        # Unit axes are never stepped over: walk the others as runs of equal size.
        old = [(d, s) for d, s in zip(self.shape, self.strides, strict=True) if d != 1]
        new = [i for i, d in enumerate(shape) if d != 1]
        strides = [0] * len(shape)
        i = j = 0
        while j < len(new):
            i_end, j_end = i + 1, j + 1
            have, want = old[i][0], shape[new[j]]
            while have != want:  # the fewest old and new axes of equal size
                if have < want:
                    have *= old[i_end][0]
                    i_end += 1
                else:
                    want *= shape[new[j_end]]
                    j_end += 1
            if any(old[k][1] != old[k + 1][1] * old[k + 1][0] for k in range(i, i_end - 1)):
                return None  # these old axes are not one evenly strided run
            stride = old[i_end - 1][1]
            for k in reversed(new[j:j_end]):
                strides[k] = stride
                stride *= shape[k]
            i, j = i_end, j_end
        return View(self.buffer, self.dtype, self.offset, shape, tuple(strides))


def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc if d != 1 else 0)
        acc *= d
    return tuple(reversed(strides))


def contiguous_view(buf: Buffer, shape: tuple[int, ...]) -> View:
    return View(buf.name, buf.dtype, 0, shape, row_major(shape))


@dataclass
class Kernel:
    name: str
    ops: list[str] = field(default_factory=list)  # the graph ops it computes, for people

    kind = "?"

    def reads(self) -> list[View]:
        raise NotImplementedError

    def writes(self) -> list[View]:
        raise NotImplementedError


@dataclass
class Elementwise(Kernel):
    """out_j[i] = expr_j(inputs at i) for every index i of ``shape``."""

    shape: tuple[int, ...] = ()
    inputs: dict[str, View] = field(default_factory=dict)  # symbol name -> view over shape
    outputs: list[tuple[View, Any]] = field(default_factory=list)  # (view, sympy expr)

    kind = "elementwise"

    def reads(self) -> list[View]:
        return list(self.inputs.values())

    def writes(self) -> list[View]:
        return [v for v, _ in self.outputs]


@dataclass
class Reduce(Kernel):
    """out[kept index] = combine over reduced indices of value(inputs).

    ``shape`` is the iteration space (the input's shape); ``axes`` are reduced;
    ``out`` is viewed in the keepdims shape. ``combine`` is "sum" or "max".
    """

    shape: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    combine: str = "sum"
    inputs: dict[str, View] = field(default_factory=dict)
    value: Any = None
    out: View | None = None

    kind = "reduce"

    def reads(self) -> list[View]:
        return list(self.inputs.values())

    def writes(self) -> list[View]:
        return [self.out] if self.out else []


@dataclass
class Matmul(Kernel):
    """out[b] = a[b] @ b[b] over batch dims ``batch`` (views broadcast over them).

    An ``epilogue`` is the elementwise kernel that consumes the product: it iterates
    over ``out``'s shape and reads ``out`` at the index it computes. A backend may
    apply it per tile while the product is hot (CPU: per row block; GPU: in
    registers) or run it as a kernel of its own right after (``unfused``).
    """

    batch: tuple[int, ...] = ()
    m: int = 0
    n: int = 0
    k: int = 0
    a: View | None = None
    b: View | None = None
    out: View | None = None
    epilogue: Elementwise | None = None

    kind = "matmul"

    def reads(self) -> list[View]:
        operands = [v for v in (self.a, self.b) if v is not None]
        if self.epilogue is None or self.out is None:
            return operands
        return operands + [v for v in self.epilogue.reads() if v.buffer != self.out.buffer]

    def writes(self) -> list[View]:
        out = [self.out] if self.out else []
        return out + (self.epilogue.writes() if self.epilogue else [])

    def product_symbol(self) -> str | None:
        """The epilogue's name for the product (the input that reads ``out``)."""
        if self.epilogue is None:
            return None
        return next(s for s, v in self.epilogue.inputs.items() if v == self.out)


def unfused(k: Kernel) -> list[Kernel]:
    """``k`` as kernels without epilogues: a matmul with one becomes the bare product
    followed by its epilogue (named ``<matmul>_epilogue``)."""
    if not isinstance(k, Matmul) or k.epilogue is None:
        return [k]
    bare = dataclasses.replace(k, epilogue=None,
                               ops=[op for op in k.ops if op == "matmul"][:1])
    epilogue = dataclasses.replace(k.epilogue, name=f"{k.name}_epilogue")
    return [bare, epilogue]


@dataclass
class Gather(Kernel):
    """out[i, :] = table[ids[i], :] (ids bounds-checked); or, for ``scatter``,
    out = zeros; out[ids[i], :] += vals[i, :]."""

    scatter: bool = False
    rows: int = 0  # rows of the table (the bound on ids)
    row_len: int = 0
    ids: View | None = None
    src: View | None = None  # table (gather) or vals (scatter)
    out: View | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "scatter_add" if self.scatter else "gather"

    def reads(self) -> list[View]:
        return [v for v in (self.ids, self.src) if v is not None]

    def writes(self) -> list[View]:
        return [self.out] if self.out else []


@dataclass
class Conv(Kernel):
    """NCHW convolution family: mode "forward" (x, w), "input_grad" (g, w) or
    "weight_grad" (x, g). ``dims`` = (n, c, h, w, o, kh, kw); all views contiguous.

    ``cols``, when set, are x's column matrices [n, c·kh·kw, oh·ow] (im2col) kept in a
    buffer of their own: a forward conv writes them as a second output, a weight
    gradient reads them instead of x (``lhs`` still says whose columns they are). Only
    a backend that gathers columns sets them (``ptx_conv.keep_columns``)."""

    mode: str = "forward"
    dims: tuple[int, ...] = ()
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    lhs: View | None = None
    rhs: View | None = None
    out: View | None = None
    cols: View | None = None

    kind = "conv"

    def reads(self) -> list[View]:
        lhs = self.cols if self.cols is not None and self.mode == "weight_grad" else self.lhs
        return [v for v in (lhs, self.rhs) if v is not None]

    def writes(self) -> list[View]:
        out = [self.out] if self.out else []
        return out + ([self.cols] if self.cols is not None and self.mode == "forward" else [])


# Casts inside elementwise expressions: sympy has no dtypes, so conversions are
# explicit functions that printers render.
class ToFloat(sp.Function):
    """A bool or int value as a float."""


class ToInt(sp.Function):
    """A float or bool value as an i32 (truncating, as a C cast)."""


class ToBool(sp.logic.boolalg.BooleanFunction):
    """Nonzero as true (a Boolean, so it can sit inside And/Or/Not and Piecewise)."""
