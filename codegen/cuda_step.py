"""Opening the ``CudaStep`` of a built module, with its options.

A module built with ``backend="cuda"`` (or ``("cpu", "cuda")``) imports on any
machine; only creating its ``CudaStep`` needs a GPU. Options (keyword arguments of
``Lowered.compile(device="cuda", ...)``; the environment gives the defaults):

- ``graph`` (``FERROGRAD_CUDA_GRAPHS``, default 1): replay each entry point as a
  CUDA graph captured on its first call; 0 launches kernels one by one every call;
- ``gemm`` (``FERROGRAD_CUDA_GEMM``, default "auto"): "auto" runs matrix products
  in cuBLAS when it loads and in the generated kernels otherwise, "cublas" requires
  cuBLAS, "kernel" never uses it (``step.gemm_backend`` says which ran);
- ``tf32`` (default False): let cuBLAS use TF32 tensor cores (not strict fp32);
- ``sync`` (``FERROGRAD_CUDA_SYNC``, default 0): wait after every kernel, so that
  an asynchronous failure (an illegal address) names its kernel;
- ``device_index`` (``FERROGRAD_CUDA_DEVICE``, default 0): the CUDA device.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from ferrograd.ir.errors import BackendError

OPTIONS = ("graph", "gemm", "tf32", "sync", "device_index")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("", "0", "false", "no")


def open_cuda_step(module: ModuleType, model: str, **options: Any) -> Any:
    """``module.CudaStep(...)``; no GPU, no driver, a PTX the driver rejects: a
    ``BackendError`` naming the model (a ``MemoryError`` when the GPU is full)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown CUDA step option {', '.join(unknown)}; the options are "
                        f"{', '.join(OPTIONS)}")
    if not hasattr(module, "CudaStep"):
        raise BackendError(f"{model}: module {module.__name__} has no CUDA step; lower the "
                           "model with backend='cuda' or ('cpu', 'cuda')")
    kwargs = {
        "device": int(options.get("device_index", os.environ.get("FERROGRAD_CUDA_DEVICE", 0))),
        "graph": bool(options.get("graph", _env_flag("FERROGRAD_CUDA_GRAPHS", True))),
        "gemm": str(options.get("gemm", os.environ.get("FERROGRAD_CUDA_GEMM", "auto"))),
        "tf32": bool(options.get("tf32", False)),
        "sync": bool(options.get("sync", _env_flag("FERROGRAD_CUDA_SYNC", False))),
    }
    try:
        return module.CudaStep(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise BackendError(f"{model}: cannot create the CUDA step: {err}") from None
