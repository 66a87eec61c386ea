"""Layers that create their own params: ``fg.nn.linear``, ``conv2d``, ``layer_norm``,
``embedding``. Unnamed layers are named by call order (linear_0, linear_1, ...);
defaults follow PyTorch's initialization."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ferrograd.ir.builder import Var, user_src
from ferrograd.ir.errors import ShapeError

from . import functional as F
from .model import auto_name, param


def linear(x: Var, out_features: int, name: str | None = None, bias: bool = True) -> Var:
    """x @ weight + bias with weight (in, out); PyTorch's default init U(+-1/sqrt(in))."""
    if x.ndim < 1:
        raise ShapeError("linear: x must be at least 1-d", user_src())
    name = name or auto_name("linear")
    fan_in = x.shape[-1]
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    w = param(f"{name}.weight", (fan_in, out_features), "uniform", low=-bound, high=bound)
    y = (x.reshape(1, fan_in) @ w).reshape(out_features) if x.ndim == 1 else x @ w
    if bias:
        y = y + param(f"{name}.bias", (out_features,), "uniform", low=-bound, high=bound)
    return y


def conv2d(x: Var, out_channels: int, kernel_size: int | Sequence[int], stride: int = 1,
           padding: int = 0, name: str | None = None, bias: bool = True) -> Var:
    """Convolution layer, weight (out, in, kh, kw) in NCHW; PyTorch's default init."""
    if x.ndim != 4:
        raise ShapeError(f"conv2d: needs x of shape (N, C, H, W), got {x.shape}", user_src())
    name = name or auto_name("conv2d")
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    fan_in = x.shape[1] * kh * kw
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    w = param(f"{name}.weight", (out_channels, x.shape[1], kh, kw), "uniform",
              low=-bound, high=bound)
    y = F.conv2d(x, w, stride, padding)
    if bias:
        b = param(f"{name}.bias", (out_channels,), "uniform", low=-bound, high=bound)
        y = y + b.reshape(1, out_channels, 1, 1)
    return y


def layer_norm(x: Var, name: str | None = None, eps: float = 1e-5) -> Var:
    """Layer norm over the last axis with learned weight (ones) and bias (zeros)."""
    name = name or auto_name("layer_norm")
    dim = x.shape[-1]
    return F.layer_norm(x, param(f"{name}.weight", (dim,), "ones"),
                        param(f"{name}.bias", (dim,), "zeros"), eps)


def embedding(ids: Var, num_embeddings: int, dim: int, name: str | None = None) -> Var:
    """Lookup table (num_embeddings, dim), initialized N(0, 1) as in PyTorch."""
    name = name or auto_name("embedding")
    return F.embedding(param(f"{name}.weight", (num_embeddings, dim), "normal"), ids)
