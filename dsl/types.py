"""Dtypes as written in annotations: ``fg.f32["B", 784]`` declares an input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferrograd.ir.errors import TraceError


@dataclass(frozen=True)
class DType:
    """A dtype. Subscript it with dims to declare an input: ``fg.f32["B", 784]``."""

    name: str

    def __getitem__(self, dims: Any) -> InputSpec:
        dims = dims if isinstance(dims, tuple) else (dims,)
        for d in dims:
            if not (isinstance(d, str) and d.isidentifier()) and not (
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0):
                raise TraceError(f"input dim {d!r} must be a non-negative int or a "
                                 "symbol name like 'B'")
        return InputSpec(self.name, tuple(dims))

    def __repr__(self) -> str:
        return f"fg.{self.name}"


@dataclass(frozen=True)
class InputSpec:
    dtype: str
    dims: tuple[int | str, ...]

    def bind(self, arg: str, dims: dict[str, int]) -> tuple[int, ...]:
        shape = []
        for d in self.dims:
            if isinstance(d, str):
                if d not in dims:
                    raise TraceError(f"input {arg!r} has dim {d!r}, which is not bound: pass "
                                     f"{d}=<int> to fg.trace / fg.compile / fg.lower")
                shape.append(int(dims[d]))
            else:
                shape.append(d)
        return tuple(shape)

    def __repr__(self) -> str:
        return f"fg.{self.dtype}[{', '.join(map(repr, self.dims))}]"


f32 = DType("f32")
f64 = DType("f64")
i32 = DType("i32")
bool_ = DType("bool")
