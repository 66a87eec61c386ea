"""The step object of compiled backends: the generated module holds everything."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ferrograd.ir.errors import BackendError, InputError

from .step import KernelTime, Profile, Step

if TYPE_CHECKING:
    from .lower import Lowered


class CompiledStep(Step):
    """A step whose params, optimizer state and arenas live in a generated module: its
    CPU ``Step``, or its ``CudaStep`` (``native``; same methods, arenas on the GPU)."""

    def __init__(self, lowered: Lowered, module: ModuleType, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray], backend: str, native: Any = None) -> None:
        super().__init__(lowered)
        self.backend = backend
        # The CUDA step takes CuPy arrays / PyTorch CUDA tensors as they are: checked
        # from their __cuda_array_interface__, copied device to device into its arenas.
        self._device_inputs = backend == "cuda"
        self.module = module
        self._native = module.Step() if native is None else native
        self._arity = len(self.interface.inputs) if self.interface.updates else -1
        self._bools = {k for k, (_, dtype) in self.interface.outputs.items() if dtype == "bool"}
        self._set("param", params)
        self._set("state", state)

    def profile(self, reset: bool = False) -> Profile:
        if not (self.lowered.profile and self.backend == "cpu"):
            return super().profile(reset)
        info = {k.name: (k.kind, tuple(k.ops)) for s in self.lowered.schedules
                for k in s.kernels}
        return Profile(KernelTime(entry, name, *info[name], calls, total_s)
                       for entry, name, calls, total_s in self._native.profile(reset)
                       if calls)

    @property
    def gemm_backend(self) -> str:
        """Who runs the matrix products: "cpu" (the gemm crate), or on CUDA "cublas",
        "kernel" (the generated fallback kernels) or "mixed"."""
        return str(getattr(self._native, "gemm_backend", "cpu"))

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        # Fast path: the module checks shapes, dtypes and index bounds itself (with the
        # same messages); Python binds arguments only for keywords or a wrong count.
        if not kwargs and len(args) == self._arity:
            return float(self._native_call("train", args))
        return super().__call__(*args, **kwargs)

    def _call(self, entry: str, feed: dict[str, np.ndarray]) -> Any:
        return self._native_call(entry, [feed[name] for name in self.interface.inputs])

    def _native_call(self, entry: str, args: Any) -> Any:
        try:
            return getattr(self._native, entry)(*args)
        except ValueError as err:  # bad data the module found (an id out of range)
            raise InputError(str(err)) from None
        except RuntimeError as err:
            raise BackendError(f"{self.interface.name}: {err}") from None

    def _train(self, feed: dict[str, np.ndarray]) -> float:
        return float(self._call("train", feed))

    def _train_steps(self, feed: dict[str, Any], count: int) -> np.ndarray:
        if self.backend != "cuda":  # a call costs little on the host: the loop will do
            return super()._train_steps(feed, count)
        # One native call: K steps queued back to back, one wait, the K losses back.
        args = [count, *(feed[name] for name in self.interface.inputs)]
        return np.asarray(self._native_call("steps", args), np.float32)

    def _forward(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call("forward", feed)
        # Modules store bools as bytes (0/1): hand them back as NumPy bools, no copy.
        return {k: out[k].view(np.bool_) if k in self._bools else out[k]
                for k in self.interface.outputs}

    def _grads(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call("grads", feed)
        return {k: out[k] for k in self.interface.grads}

    def _get(self, kind: str) -> dict[str, np.ndarray]:
        return dict(self._native.get(kind))

    def _set(self, kind: str, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self._native.set(kind, name, np.array(value, dtype=np.float32, order="C"))
