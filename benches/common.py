"""What every system of the benchmarks shares, without importing any of them: the
sizes of the workloads, the optimizer settings and the synthetic data. (The NumPy
anchor runs from this alone, so its memory can be measured in a process that has
not imported ferrograd.)"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LINREG_FEATURES = 8  # ANCHORS.md fixes n=1000 only; 8 features as in examples/linreg.py
IMAGE = (1, 28, 28)  # W4 input: MNIST-like
VOCAB, CONTEXT, DIM, HEADS, FF = 256, 64, 128, 4, 512  # W5

Batch = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Opt:
    """An optimizer every system implements the same way (PyTorch's formulas)."""

    kind: str  # "sgd" or "adam"
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def linreg_data(rng: np.random.Generator, n: int) -> Batch:
    x = rng.normal(size=(n, LINREG_FEATURES)).astype(np.float32)
    w = rng.normal(size=(LINREG_FEATURES, 1)).astype(np.float32)
    y = x @ w + 0.5 + 0.1 * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y.astype(np.float32)


def xor_data(rng: np.random.Generator, n: int) -> Batch:
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    return x, (x[:, :1] != x[:, 1:]).astype(np.float32)


def image_data(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> Batch:
    x = rng.random(size=(n, *shape), dtype=np.float32)
    return x, rng.integers(0, 10, size=n).astype(np.int32)


def token_data(rng: np.random.Generator, n: int) -> Batch:
    ids = rng.integers(0, VOCAB, size=(n, CONTEXT + 1)).astype(np.int32)
    return np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM. (getrusage's ru_maxrss would do,
    but on Linux a child started by fork + exec inherits its parent's peak in it, so
    every probe process would report at least the size of the benchmark process.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
