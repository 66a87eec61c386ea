"""Opening the ``CudaStep`` of a built module, with its options.

A module built with ``backend="cuda"`` (or ``("cpu", "cuda")``) imports on any
machine; only creating its ``CudaStep`` needs a GPU. Options (keyword arguments of
``Lowered.compile(device="cuda", ...)``; the environment gives the defaults):

- ``graph`` (``FERROGRAD_CUDA_GRAPHS``, default 1): replay each entry point as a
  CUDA graph captured on its first call; 0 launches kernels one by one every call;
- ``gemm`` (``FERROGRAD_CUDA_GEMM``, default "auto"): "auto" runs matrix products
  in cuBLAS when it loads and in the generated kernels otherwise, "cublas" requires
  cuBLAS, "kernel" never uses it (``step.gemm_backend`` says which ran);
- ``autotune`` (``FERROGRAD_CUDA_AUTOTUNE``, default 1): when the step is created,
  time each matrix product's candidate algorithms on its own operands — up to 8 that
  cuBLASLt's heuristic proposes, plain cuBLAS for a product without an epilogue, and
  for a small product ferrograd's own register-tiled kernels (split-K among them) —
  and keep the fastest (a few ms per product; nothing the step holds is written). Each
  candidate is timed inside a CUDA graph, as the step runs it; 0 keeps the heuristic's
  first choice (plain cuBLAS's own without an epilogue). Strict fp32 either way, but
  algorithms may sum
  in different orders, so results differ by rounding. ``step.gemm_report`` says what
  was tuned, ``step.gemm_steps`` each product's choice and timings (printed to stderr
  at ``FERROGRAD_DEBUG>=1``). Products with two batch levels (attention's) always run
  in ``cublasSgemmBatched``;
- ``branches`` (``FERROGRAD_CUDA_BRANCHES``, default 1): when an entry point's graph
  is captured, it is captured twice — steps that do not wait for each other (the
  plan's ``after``: neither writes what the other reads or writes) as parallel
  branches, and all steps one after another — each replayed a few times on the call's
  inputs (params and optimizer state saved and put back), and the faster kept; 0
  captures them one after another only. ``step.branches`` says which each entry point
  runs, with both timings;
- ``graph_inputs`` (``FERROGRAD_CUDA_GRAPH_INPUTS``, default 1): a graph copies the
  inputs given in device memory (PyTorch, CuPy arrays) into their arenas itself, as
  its first nodes, pointed at each call's arrays (a node update only when an
  address changes), those of at most 4 MiB; 0 copies each with a driver call of its
  own before the graph's launch (~4–5 µs of host time apiece on an H200 host);
- ``tf32`` (default False): let cuBLAS use TF32 tensor cores (not strict fp32);
- ``sync`` (``FERROGRAD_CUDA_SYNC``, default 0): wait after every kernel, so that
  an asynchronous failure (an illegal address) names its kernel;
- ``device_index`` (``FERROGRAD_CUDA_DEVICE``, default 0): the CUDA device.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import numpy as np

from ferrograd.ir.errors import BackendError
from ferrograd.ir.passes import debug_level

OPTIONS = ("graph", "gemm", "autotune", "branches", "graph_inputs", "tf32", "sync",
           "device_index")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("", "0", "false", "no")


def _strict_env_flag(name: str, default: bool) -> bool:
    """``name`` as a boolean: unset or empty is ``default``; anything but 1/0,
    true/false, yes/no, on/off is an error (a typo must not flip the option)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE + _FALSE:
        return value in _TRUE
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1 or 0 (also true/false, "
                     "yes/no, on/off)")


def _strict_flag(options: dict[str, Any], key: str, env: str, default: bool) -> bool:
    """The boolean option ``key``, else the environment's ``env``, else ``default``."""
    if key not in options:
        return _strict_env_flag(env, default)
    value = options[key]
    exact = isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1))
    if not exact:
        raise TypeError(f"CUDA step option {key} must be True or False, not {value!r}")
    return bool(value)


def cuda_step_kwargs(**options: Any) -> dict[str, Any]:
    """The keyword arguments of ``CudaStep(...)`` for ``options`` (names as in
    ``OPTIONS``) and the environment: a ``TypeError`` for an unknown option or a
    non-boolean ``autotune``, ``branches`` or ``graph_inputs``, a ``ValueError`` for a
    bad ``FERROGRAD_CUDA_AUTOTUNE``, ``FERROGRAD_CUDA_BRANCHES`` or
    ``FERROGRAD_CUDA_GRAPH_INPUTS``
    (``gemm`` is checked by the step itself)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown CUDA step option {', '.join(unknown)}; the options are "
                        f"{', '.join(OPTIONS)}")
    return {
        "device": int(options.get("device_index", os.environ.get("FERROGRAD_CUDA_DEVICE", 0))),
        "graph": bool(options.get("graph", _env_flag("FERROGRAD_CUDA_GRAPHS", True))),
        "gemm": str(options.get("gemm", os.environ.get("FERROGRAD_CUDA_GEMM", "auto"))),
        "tf32": bool(options.get("tf32", False)),
        "sync": bool(options.get("sync", _env_flag("FERROGRAD_CUDA_SYNC", False))),
        "autotune": _strict_flag(options, "autotune", "FERROGRAD_CUDA_AUTOTUNE", True),
        "branches": _strict_flag(options, "branches", "FERROGRAD_CUDA_BRANCHES", True),
        "graph_inputs": _strict_flag(options, "graph_inputs", "FERROGRAD_CUDA_GRAPH_INPUTS",
                                     True),
    }


def open_cuda_step(module: ModuleType, model: str, **options: Any) -> Any:
    """``module.CudaStep(...)``; no GPU, no driver, a PTX the driver rejects: a
    ``BackendError`` naming the model (a ``MemoryError`` when the GPU is full)."""
    kwargs = cuda_step_kwargs(**options)
    if not hasattr(module, "CudaStep"):
        raise BackendError(f"{model}: module {module.__name__} has no CUDA step; lower the "
                           "model with backend='cuda' or ('cpu', 'cuda')")
    try:
        step = module.CudaStep(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise BackendError(f"{model}: cannot create the CUDA step: {err}") from None
    if debug_level() >= 1:
        print(f"{model}: {step.gemm_report}", file=sys.stderr)
        for line in step.gemm_steps:
            print(f"  {line}", file=sys.stderr)
    return step
