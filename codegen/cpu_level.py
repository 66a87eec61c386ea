"""The x86-64 instruction-set level a model's crate is compiled for.

A module's own code (its kernels and entry points) is built for the best level
the building machine supports: x86-64-v3 (AVX2 + FMA) or x86-64-v4 (AVX-512).
Its loops then run 8 floats per instruction instead of SSE2's 4: GELU, softmax
and their gradients run 1.5-3x faster than at the baseline (W5: 18.6 -> 15.7 ms
per step). The dependencies stay at the baseline (one shared build) and the
GEMM crate dispatches at run time; what the kernels inline from the runtime
(its `math` functions, matrix-vector products) compiles at the module's level.

At v4 LLVM would still prefer 256-bit vectors (its tuning for Intel server
cores); ``-prefer-256-bit`` lets the kernels use all 16 lanes. The transcendental
kernels gain most (GELU 1.08 -> 0.73 ns per element in W5); rustc notes in the
build log that it does not know this LLVM tuning flag, and passes it on.

``FERROGRAD_CPU_LEVEL=baseline`` builds a module that runs on any x86-64 CPU (to
ship it to older machines); ``v3`` one for any AVX2 machine. The level is part of
the module's identity, and a module is never loaded on a CPU that lacks its
level: the check runs here before loading and again in the module's init.
"""

from __future__ import annotations

import functools
import os
import platform

from ferrograd.ir.errors import BackendError

__all__ = ["LEVELS", "build_level", "check_supported", "rustc_flags", "supported_level"]

LEVELS = ("baseline", "v3", "v4")
"""Levels in increasing order."""

_RUSTC_FLAGS = {"baseline": (), "v3": ("-C", "target-cpu=x86-64-v3"),
                "v4": ("-C", "target-cpu=x86-64-v4", "-C", "target-feature=-prefer-256-bit")}
# /proc/cpuinfo flags of x86-64-v3 beyond v2 (lzcnt shows as abm).
_V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
_V4_FLAGS = _V3_FLAGS | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}


@functools.cache
def supported_level() -> str:
    """The best level this CPU runs."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    flags = _cpu_flags() or set()
    return "v4" if flags >= _V4_FLAGS else "v3" if flags >= _V3_FLAGS else "baseline"


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or (elsewhere) NumPy's runtime
    dispatch table, which covers AVX2/FMA/F16C; None when neither is available."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        return None
    if all(feats.get(k) for k in ("AVX2", "FMA3", "F16C")):
        return set(_V3_FLAGS)  # the BMI/MOVBE/LZCNT parts came with AVX2 on every CPU
    return set()


def build_level() -> str:
    """The level new modules are built for: ``$FERROGRAD_CPU_LEVEL``, else the best
    this CPU supports. Raises ``BackendError`` for a level ferrograd does not know."""
    value = os.environ.get("FERROGRAD_CPU_LEVEL", "").strip()
    if not value:
        return supported_level()
    if value not in LEVELS:
        raise BackendError(f"FERROGRAD_CPU_LEVEL={value!r}: expected one of {', '.join(LEVELS)}")
    return value


def check_supported(level: str, module: str) -> None:
    """Raise ``BackendError`` if this CPU cannot run code built for ``level``."""
    if LEVELS.index(level) > LEVELS.index(supported_level()):
        raise BackendError(
            f"{module} is built for x86-64-{level} (AVX2, FMA), which this CPU lacks; "
            f"set FERROGRAD_CPU_LEVEL=baseline to build a module that runs here")


def rustc_flags(level: str) -> tuple[str, ...]:
    """The flags that compile a model crate (not its dependencies) for ``level``."""
    return _RUSTC_FLAGS[level]
