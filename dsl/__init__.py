"""ferrograd.dsl: what a model is written in. Tracing turns it into an IR graph."""

from . import functional, nn
from .init import INITIALIZERS, init_params
from .model import Model, constant, model, param, trace
from .types import DType, InputSpec, bool_, f32, f64, i32

__all__ = [
    "INITIALIZERS", "DType", "InputSpec", "Model", "bool_", "constant", "f32", "f64",
    "functional", "i32", "init_params", "model", "nn", "param", "trace",
]
