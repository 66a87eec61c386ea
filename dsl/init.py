"""Parameter initializers, deterministic from (seed, param name).

Fans follow ferrograd's layouts: a 2-d weight is (in, out) as in ``fg.nn.linear``;
a weight of 3 or more dims is (out, in, *kernel) as in ``fg.nn.conv2d``.
Each param draws from its own stream seeded by the seed and its name, so adding
a layer does not change the initial values of the others.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ferrograd.ir.errors import TraceError
from ferrograd.ir.graph import Graph, numpy_dtype


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def _xavier(rng: np.random.Generator, shape: tuple, gain: float = 1.0) -> np.ndarray:
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return rng.uniform(-bound, bound, shape)


def _kaiming(rng: np.random.Generator, shape: tuple, gain: float = math.sqrt(2.0)) -> np.ndarray:
    fan_in, _ = fans(shape)
    bound = gain * math.sqrt(3.0 / max(fan_in, 1))
    return rng.uniform(-bound, bound, shape)


INITIALIZERS: dict[str, Callable[..., np.ndarray]] = {
    "zeros": lambda rng, shape: np.zeros(shape),
    "ones": lambda rng, shape: np.ones(shape),
    "normal": lambda rng, shape, mean=0.0, std=1.0: rng.normal(mean, std, shape),
    "uniform": lambda rng, shape, low=0.0, high=1.0: rng.uniform(low, high, shape),
    "xavier": _xavier,  # Glorot uniform
    "kaiming": _kaiming,  # He uniform, for ReLU
}


def check_init(init: Any, args: dict[str, Any], shape: tuple[int, ...]) -> None:
    if isinstance(init, np.ndarray):
        if init.shape != shape:
            raise TraceError(f"initial value has shape {init.shape}, the param {shape}")
        return
    if init not in INITIALIZERS:
        raise TraceError(f"unknown initializer {init!r}; use one of {sorted(INITIALIZERS)} "
                         "or an array")
    try:
        inspect.signature(INITIALIZERS[init]).bind(None, shape, **args)
    except TypeError as err:
        raise TraceError(f"initializer {init!r}: {err}") from None


def init_params(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial values of every param of ``graph``.

    >>> import ferrograd as fg
    >>> @fg.model
    ... def f(x: fg.f32[2]):
    ...     return (x * fg.param("w", (2,), init="ones")).sum()
    >>> fg.init_params(fg.trace(f))["w"]
    array([1., 1.], dtype=float32)
    """
    out = {}
    for name, nid in graph.params.items():
        node = graph.node(nid)
        init = node.attrs["init"]
        if isinstance(init, np.ndarray):
            value = init
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            value = INITIALIZERS[init](rng, node.shape, **node.attrs["init_args"])
        out[name] = np.array(value, dtype=numpy_dtype(node.dtype), order="C")
    return out
