"""ferrograd.codegen: from the training graph to something that runs.

This version has the NumPy reference backend; the Rust, PTX and WGSL renderers
come next and plug in beside it (see docs/ARCHITECTURE.md).
"""

from .lower import Lowered, compile, lower
from .step import NumpyStep, Step

__all__ = ["Lowered", "NumpyStep", "Step", "compile", "lower"]
