"""ferrograd.ir: the graph, the op table, autodiff, passes and the NumPy interpreter."""

from .builder import Var, apply, building, constant
from .errors import (
    BackendError,
    CheckpointError,
    DTypeError,
    FerrogradError,
    GradCheckError,
    InputError,
    IRError,
    ShapeError,
    TraceError,
)
from .graph import Graph, Node
from .ops import OPS, OpDef, lookup

__all__ = [
    "OPS", "BackendError", "CheckpointError", "DTypeError", "FerrogradError", "Graph",
    "GradCheckError", "IRError", "InputError", "Node", "OpDef", "ShapeError", "TraceError",
    "Var", "apply", "building", "constant", "lookup",
]
