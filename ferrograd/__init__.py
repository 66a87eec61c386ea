"""ferrograd: an ahead-of-time compiler for neural-network training steps.

>>> import numpy as np
>>> import ferrograd as fg
>>> @fg.model
... def linreg(x: fg.f32["N", 2], y: fg.f32["N"]):
...     return fg.mse(fg.nn.linear(x, 1).reshape(-1), y)
>>> step = fg.compile(linreg, optimizer=fg.optim.SGD(lr=0.5), backend="numpy", N=8)
>>> # backend="cpu" (the default) builds the same step as a Rust module
>>> x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
>>> y = x @ np.array([1.0, -2.0], np.float32) + 0.5
>>> losses = [step(x, y) for _ in range(100)]
>>> losses[-1] < 1e-6
True
"""

from __future__ import annotations

import os as _os

# In a source checkout the pipeline stages sit beside this package (dsl/, ir/,
# codegen/); let them import as ferrograd.* even before `pip install -e .`.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isdir(_os.path.join(_root, "ir")) and not _os.path.isdir(
        _os.path.join(_os.path.dirname(__file__), "ir")):
    __path__.append(_root)

from . import nn, optim  # noqa: E402
from ._version import __version__  # noqa: E402
from .codegen.gradcheck import check_grads  # noqa: E402
from .codegen.lower import Lowered, compile, lower  # noqa: E402
from .codegen.step import Step  # noqa: E402
from .dsl import (  # noqa: E402
    DType,
    InputSpec,
    Model,
    bool_,
    constant,
    f32,
    f64,
    i32,
    init_params,
    model,
    param,
    trace,
)
from .dsl.functional import (  # noqa: E402
    abs,
    avg_pool2d,
    binary_cross_entropy,
    concat,
    conv2d,
    cos,
    cross_entropy,
    embedding,
    erf,
    exp,
    gelu,
    layer_norm,
    log,
    log1p,
    log_softmax,
    matmul,
    max_pool2d,
    maximum,
    mean,
    minimum,
    mse,
    normal_cdf,
    relu,
    reshape,
    sigmoid,
    sign,
    sin,
    softmax,
    softplus,
    sqrt,
    stop_gradient,
    sum,
    tanh,
    transpose,
    where,
)
from .ir import Graph  # noqa: E402
from .ir import Var as Tensor  # noqa: E402
from .ir.autodiff import grad  # noqa: E402
from .ir.errors import (  # noqa: E402
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
from .ir.interpret import interpret  # noqa: E402

__all__ = [
    "BackendError", "CheckpointError", "DTypeError", "DType", "FerrogradError", "Graph",
    "GradCheckError", "IRError", "InputError", "InputSpec", "Lowered", "Model", "ShapeError",
    "Step", "Tensor", "TraceError", "__version__", "abs", "avg_pool2d",
    "binary_cross_entropy", "bool_", "check_grads", "compile", "concat", "constant",
    "conv2d", "cos", "cross_entropy", "embedding", "erf", "exp", "f32", "f64", "gelu",
    "grad", "i32", "init_params", "interpret", "layer_norm", "log", "log1p", "log_softmax",
    "lower", "matmul", "max_pool2d", "maximum", "mean", "minimum", "model", "mse", "nn",
    "normal_cdf", "optim", "param", "relu", "reshape", "sigmoid", "sign", "sin", "softmax",
    "softplus", "sqrt", "stop_gradient", "sum", "tanh", "trace", "transpose", "where",
]
