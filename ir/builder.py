"""Building graphs: ``Var`` is a handle on one node, with the usual operators.

VJP rules and the DSL build nodes through the same handle, so a gradient is
written with the same ops as a model (and can itself be differentiated).
Every node records the user's file:line: the first stack frame outside
ferrograd, or the source of the forward node a gradient belongs to.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceError
from .graph import Graph, Shape, dtype_of_numpy, numpy_dtype

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Folders whose frames are ferrograd's own: the repository layout (dsl/, ir/ ...
# side by side) and the installed layout (all under ferrograd/).
_INTERNAL = tuple(
    str(_ROOT / d) + "/" for d in ("ferrograd", "dsl", "ir", "codegen")
) + ((str(_ROOT) + "/",) if _ROOT.name == "ferrograd" else ())

_SRC_OVERRIDE: ContextVar[str | None] = ContextVar("ferrograd_src", default=None)
_CURRENT_GRAPH: ContextVar[Graph | None] = ContextVar("ferrograd_graph", default=None)


def user_src() -> str | None:
    """The user's file:line that is creating a node right now."""
    override = _SRC_OVERRIDE.get()
    if override is not None:
        return override
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_INTERNAL) and not filename.startswith("<frozen"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def source_as(src: str | None) -> Iterator[None]:
    """Attribute every node built inside to ``src`` (used for gradient nodes)."""
    token = _SRC_OVERRIDE.set(src)
    try:
        yield
    finally:
        _SRC_OVERRIDE.reset(token)


@contextlib.contextmanager
def building(graph: Graph) -> Iterator[Graph]:
    """Make ``graph`` the one that params and constants are added to."""
    token = _CURRENT_GRAPH.set(graph)
    try:
        yield graph
    finally:
        _CURRENT_GRAPH.reset(token)


def current_graph(what: str) -> Graph:
    graph = _CURRENT_GRAPH.get()
    if graph is None:
        raise TraceError(f"{what} can only be used inside an @fg.model function being traced",
                         user_src())
    return graph


class Var:
    """A traced tensor: a node of a graph. Arithmetic on it adds nodes."""

    __slots__ = ("graph", "id")
    __array_priority__ = 1000  # NumPy defers to our operators: np.float32(2) * v is a Var

    def __init__(self, graph: Graph, nid: int) -> None:
        self.graph = graph
        self.id = nid

    # ---- what the node is ------------------------------------------------------------
    @property
    def shape(self) -> Shape:
        return self.graph.data(self.id)["shape"]

    @property
    def dtype(self) -> str:
        return self.graph.data(self.id)["dtype"]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def src(self) -> str | None:
        return self.graph.data(self.id)["src"]

    def __repr__(self) -> str:
        op = self.graph.data(self.id)["op"]
        return f"Tensor({op}, shape={self.shape}, dtype={self.dtype})"

    # ---- static graphs have no values while tracing ---------------------------------
    def __bool__(self) -> bool:
        raise TraceError(
            "a traced tensor has no value while the model is being traced, so Python "
            "control flow (if/while/and/or) cannot depend on it: the graph is static. "
            "Use fg.where(cond, a, b) to choose between values.", user_src())

    def _no_value(self, *_: Any, **__: Any) -> Any:
        raise TraceError(
            "a traced tensor has no value while the model is being traced; "
            "compute with fg ops instead of converting it to a Python or NumPy value",
            user_src())

    __float__ = __int__ = __index__ = __array__ = _no_value

    def __len__(self) -> int:
        if not self.shape:
            raise TraceError("len() of a 0-d tensor", user_src())
        return self.shape[0]

    def __iter__(self) -> Iterator[Var]:
        for i in range(len(self)):
            yield self[i]

    __hash__ = object.__hash__

    # ---- operators ------------------------------------------------------------------
    def __add__(self, o: Any) -> Var: return apply("add", self, o)
    def __radd__(self, o: Any) -> Var: return apply("add", o, self)
    def __sub__(self, o: Any) -> Var: return apply("sub", self, o)
    def __rsub__(self, o: Any) -> Var: return apply("sub", o, self)
    def __mul__(self, o: Any) -> Var: return apply("mul", self, o)
    def __rmul__(self, o: Any) -> Var: return apply("mul", o, self)
    def __truediv__(self, o: Any) -> Var: return apply("div", self, o)
    def __rtruediv__(self, o: Any) -> Var: return apply("div", o, self)
    def __pow__(self, o: Any) -> Var: return apply("pow", self, o)
    def __rpow__(self, o: Any) -> Var: return apply("pow", o, self)
    def __neg__(self) -> Var: return apply("neg", self)
    def __pos__(self) -> Var: return self
    def __abs__(self) -> Var: return apply("abs", self)
    def __matmul__(self, o: Any) -> Var: return apply("matmul", self, o)
    def __rmatmul__(self, o: Any) -> Var: return apply("matmul", o, self)
    def __lt__(self, o: Any) -> Var: return apply("lt", self, o)
    def __le__(self, o: Any) -> Var: return apply("le", self, o)
    def __gt__(self, o: Any) -> Var: return apply("gt", self, o)
    def __ge__(self, o: Any) -> Var: return apply("ge", self, o)
    def __eq__(self, o: Any) -> Var: return apply("eq", self, o)  # type: ignore[override]
    def __ne__(self, o: Any) -> Var: return apply("ne", self, o)  # type: ignore[override]
    def __and__(self, o: Any) -> Var: return apply("logical_and", self, o)
    def __or__(self, o: Any) -> Var: return apply("logical_or", self, o)
    def __invert__(self) -> Var: return apply("logical_not", self)

    # ---- methods --------------------------------------------------------------------
    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Var:
        return apply("reduce_sum", self, axes=_axes(axis, self.ndim), keepdims=keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Var:
        return apply("reduce_max", self, axes=_axes(axis, self.ndim), keepdims=keepdims)

    def min(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Var:
        return -((-self).max(axis, keepdims))

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Var:
        axes = _axes(axis, self.ndim)
        count = int(np.prod([self.shape[a] for a in axes], dtype=np.int64))
        return self.sum(axis, keepdims) * (1.0 / count)

    def reshape(self, *shape: Any) -> Var:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return apply("reshape", self, shape=_resolve_reshape(self, shape))

    def transpose(self, *perm: Any) -> Var:
        if len(perm) == 1 and isinstance(perm[0], tuple | list):
            perm = tuple(perm[0])
        perm = perm or tuple(reversed(range(self.ndim)))
        return apply("transpose", self, perm=tuple(int(p) % max(self.ndim, 1) for p in perm))

    @property
    def T(self) -> Var:
        return self.transpose()

    @property
    def mT(self) -> Var:
        """Swap the last two axes (the matrix transpose of a batch of matrices)."""
        perm = list(range(self.ndim))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.transpose(perm)

    def astype(self, dtype: Any) -> Var:
        name = getattr(dtype, "name", dtype)
        if name == self.dtype:
            return self
        return apply("cast", self, dtype=name)

    def expand(self, shape: Shape) -> Var:
        if tuple(shape) == self.shape:
            return self
        return apply("expand", self, shape=tuple(int(d) for d in shape))

    def __getitem__(self, index: Any) -> Var:
        from .indexing import getitem

        return getitem(self, index)


def _axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    from .ops.base import normalize_axes

    return normalize_axes("reduce", axis, ndim)


def _resolve_reshape(v: Var, shape: Sequence[Any]) -> Shape:
    from .errors import ShapeError

    dims = [int(d) for d in shape]
    if dims.count(-1) > 1:
        raise ShapeError(f"reshape: at most one -1 in {tuple(dims)}", user_src())
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or v.size % known:
            raise ShapeError(f"reshape: cannot reshape {v.shape} into {tuple(shape)}",
                             user_src())
        dims[dims.index(-1)] = v.size // known
    return tuple(dims)


def constant(graph: Graph, value: Any, dtype: str | None = None) -> Var:
    """Embed a constant array (or scalar) in ``graph``."""
    arr = np.asarray(value)
    if dtype is None:
        if arr.dtype.kind == "f":
            dtype = "f32" if arr.dtype != np.float64 else "f64"
        elif arr.dtype.kind in "iu":
            dtype = "i32"
        else:
            dtype = dtype_of_numpy(arr.dtype)
    arr = np.array(arr, dtype=numpy_dtype(dtype), order="C")
    arr.setflags(write=False)
    return Var(graph, graph.add("const", (), {"value": arr}, src=user_src()))


def apply(op: str, *args: Any, **attrs: Any) -> Var:
    """Add ``op(*args)`` to the graph of the first Var among ``args``."""
    vars_ = [a for a in args if isinstance(a, Var)]
    if not vars_:
        raise TraceError(f"{op}: needs at least one traced tensor argument", user_src())
    graph = vars_[0].graph
    for v in vars_:
        if v.graph is not graph:
            raise TraceError(f"{op}: arguments come from different graphs", user_src())
    # Python scalars take the dtype of the tensor they meet (weak typing, as in JAX).
    like = next((v.dtype for v in vars_ if v.dtype != "bool"), "f32")
    ids = [a.id if isinstance(a, Var) else constant(graph, a, _scalar_dtype(a, like)).id
           for a in args]
    return Var(graph, graph.add(op, ids, attrs, src=user_src()))


def _scalar_dtype(value: Any, like: str) -> str | None:
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | float | np.integer | np.floating):
        if like == "i32" and isinstance(value, float | np.floating):
            return "f32"
        return like
    return None


def sum_to(v: Var, shape: Shape) -> Var:
    """Sum ``v`` down to ``shape`` (undo a broadcast); the autodiff driver uses it."""
    shape = tuple(shape)
    if v.shape == shape:
        return v
    lead = v.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and v.shape[lead + i] != 1)
    out = v.sum(axes, keepdims=True) if axes else v
    return out.reshape(shape) if out.shape != shape else out
