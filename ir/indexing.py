"""``x[...]``: basic indexing (ints, slices, ``...``, ``None``) as slice + reshape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ShapeError, TraceError

if TYPE_CHECKING:
    from .builder import Var


def getitem(v: Var, index: Any) -> Var:
    from .builder import Var, apply, user_src

    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Var) for i in items):
        raise TraceError("indexing with a traced tensor is not supported; use "
                         "fg.embedding(table, ids) to gather rows", user_src())
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if n_real > v.ndim:
        raise ShapeError(f"too many indices ({n_real}) for a tensor of shape {v.shape}",
                         user_src())
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise ShapeError("at most one ... in an index", user_src())
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (v.ndim - n_real) + items[at + 1:]
    else:
        items = items + (slice(None),) * (v.ndim - n_real)

    spec: list[tuple[int, int, int]] = []
    out_shape: list[int] = []
    axis = 0
    for item in items:
        if item is None:
            out_shape.append(1)
            continue
        size = v.shape[axis]
        if isinstance(item, int | np.integer):
            i = int(item)
            if not -size <= i < size:
                raise ShapeError(f"index {i} is out of range for axis {axis} of size {size} "
                                 f"(shape {v.shape})", user_src())
            i %= size
            spec.append((i, i + 1, 1))
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step <= 0:
                raise ShapeError("negative slice steps are not supported", user_src())
            spec.append((start, max(stop, start), step))
            out_shape.append(len(range(start, max(stop, start), step)))
        else:
            raise TraceError(f"unsupported index {item!r}: use ints, slices, ... or None",
                             user_src())
        axis += 1

    out = v
    if any(s != (0, d, 1) for s, d in zip(spec, v.shape, strict=True)):
        out = apply("slice", v, index=tuple(spec))
    if tuple(out_shape) != out.shape:
        out = out.reshape(tuple(out_shape))
    return out
