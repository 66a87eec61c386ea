"""The WGSL backend's side of ``Lowered``: its kernels, sources, files and step.

``fg.compile(model, backend="wgsl")`` renders the shaders and the crate
(``backends/wgsl_*.py``), builds it like the CPU crate (one shared cargo target
folder, so wgpu compiles once), and creates its ``WgslStep`` on a WebGPU
adapter: the step API is the CPU step's, through ``CompiledStep``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from ferrograd.ir.errors import BackendError

from .backends.wgsl_crate import render_wgsl_crate
from .cpu_step import CompiledStep
from .kernel_ir import unfused

if TYPE_CHECKING:
    from .lower import KernelInfo, Lowered


def wgsl_kernels(lowered: Lowered) -> list[KernelInfo]:
    """Every kernel of every entry point with the source of its shader."""
    from .lower import KernelInfo

    module = lowered.wgsl
    return [KernelInfo(k.name, k.kind, list(k.ops), "wgsl",
                       module.shaders[module.kernels[k.name]].source)
            for s in lowered.schedules for kk in s.kernels for k in unfused(kk)]


def write_wgsl(lowered: Lowered, directory: Path) -> None:
    """The crate (Cargo.toml, src/), the shaders and manifest.json into ``directory``."""
    render_wgsl_crate(lowered.graph, lowered.wgsl, directory).write(directory)


def open_wgsl_step(lowered: Lowered, module: ModuleType, params: dict[str, np.ndarray],
                   state: dict[str, np.ndarray]) -> CompiledStep:
    """Create the built module's step on a WebGPU adapter."""
    try:
        native = module.WgslStep()
    except RuntimeError as err:  # no adapter, or a shader the device rejects
        raise BackendError(f"{lowered.interface.name}: {err}") from None
    return CompiledStep(lowered, module, params, state, "wgsl", native)
