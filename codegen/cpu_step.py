"""The step object of compiled backends: the generated module holds everything."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ferrograd.ir.errors import BackendError, InputError

from .step import Step

if TYPE_CHECKING:
    from .lower import Lowered


class CompiledStep(Step):
    """A step whose params, optimizer state and arenas live in a generated module."""

    def __init__(self, lowered: Lowered, module: ModuleType, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray], backend: str) -> None:
        super().__init__(lowered)
        self.backend = backend
        self.module = module
        self._native = module.Step()
        self._set("param", params)
        self._set("state", state)

    def _call(self, entry: str, feed: dict[str, np.ndarray]) -> Any:
        args = [feed[name] for name in self.graph.inputs]
        try:
            return getattr(self._native, entry)(*args)
        except ValueError as err:  # bad data the module found (an id out of range)
            raise InputError(str(err)) from None
        except RuntimeError as err:
            raise BackendError(f"{self.graph.name}: {err}") from None

    def _train(self, feed: dict[str, np.ndarray]) -> float:
        return float(self._call("train", feed))

    def _forward(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call("forward", feed)
        return {k: out[k] for k in self.graph.outputs}

    def _grads(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call("grads", feed)
        return {k: out[k] for k in self.graph.grads}

    def _get(self, kind: str) -> dict[str, np.ndarray]:
        return dict(self._native.get(kind))

    def _set(self, kind: str, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self._native.set(kind, name, np.array(value, dtype=np.float32, order="C"))
