"""``fg.check_grads``: analytic gradients against float64 central differences.

Each param is checked along a random direction v (JAX's trick): the numeric
directional derivative (L(p + h v) - L(p - h v)) / 2h against <grad, v>. Two
loss evaluations per param, whatever its size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrograd.dsl.init import init_params
from ferrograd.dsl.model import Model, trace
from ferrograd.ir.autodiff import grad
from ferrograd.ir.errors import GradCheckError, InputError
from ferrograd.ir.graph import Graph
from ferrograd.ir.interpret import interpret

from .step import Step


def _infer_dims(model: Model, inputs: dict[str, Any]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for name, spec in model.specs.items():
        shape = np.shape(inputs[name])
        if len(shape) != len(spec.dims):
            raise InputError(f"input {name!r}: expected {len(spec.dims)} dims {spec!r}, got "
                             f"shape {shape}")
        for d, n in zip(spec.dims, shape, strict=True):
            if isinstance(d, str) and dims.setdefault(d, n) != n:
                raise InputError(f"dim {d!r} is {dims[d]} in one input and {n} in "
                                 f"{name!r}")
    return dims


def check_grads(model_or_step: Model | Step, *args: Any, params: dict | None = None,
                seed: int = 0, rtol: float | None = None, atol: float = 1e-6,
                eps: float = 1e-4, **kwargs: Any) -> dict[str, tuple[float, float]]:
    """Check gradients against float64 finite differences; raise naming the worst param.

    For a model, the IR's own gradients (in float64) are checked; for a compiled
    step, the step's gradients (on its backend, in its precision). Returns
    {param: (analytic, numeric)} directional derivatives.

    >>> import ferrograd as fg, numpy as np
    >>> @fg.model
    ... def f(x: fg.f32["B", 3]):
    ...     return fg.tanh(fg.nn.linear(x, 2)).sum()
    >>> report = fg.check_grads(f, np.ones((4, 3), np.float32))
    >>> sorted(report)
    ['linear_0.bias', 'linear_0.weight']
    """
    if isinstance(model_or_step, Step):
        step = model_or_step
        if params is not None:
            raise InputError("check_grads: a step is checked at its own params; set them "
                             "first with step.load_params(...)")
        feed = step._bind(args, kwargs)
        graph: Graph = step.graph
        values = step.params
        analytic = step.grads(**feed)
        rtol = 1e-2 if rtol is None else rtol
    else:
        model = model_or_step
        names = list(model.specs)
        feed = dict(zip(names, args, strict=False)) | kwargs
        missing = [n for n in names if n not in feed]
        if missing:
            raise InputError(f"check_grads: missing input {', '.join(map(repr, missing))}")
        graph = grad(trace(model, **_infer_dims(model, feed)))
        values = init_params(graph, seed) if params is None else params
        res = interpret(graph, feed, values, dtype="f64",
                        results=[f"grad:{k}" for k in graph.grads])
        analytic = {k: res[f"grad:{k}"] for k in graph.grads}
        rtol = 1e-5 if rtol is None else rtol

    base = {k: np.asarray(v, np.float64) for k, v in values.items()}
    rng = np.random.default_rng(seed + 1)

    def loss_at(p: dict[str, np.ndarray]) -> float:
        return float(interpret(graph, feed, p, dtype="f64", results=["loss"])["loss"])

    report: dict[str, tuple[float, float]] = {}
    worst: tuple[float, str] = (-1.0, "")
    for name in graph.grads:
        v = rng.normal(size=base[name].shape)
        v /= max(float(np.linalg.norm(v)), 1e-12)
        plus, minus = dict(base), dict(base)
        plus[name] = base[name] + eps * v
        minus[name] = base[name] - eps * v
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        exact = float(np.sum(np.asarray(analytic[name], np.float64) * v))
        report[name] = (exact, numeric)
        err = abs(exact - numeric) / max(abs(numeric), abs(exact), atol / rtol)
        if err > worst[0]:
            worst = (err, name)
    if worst[0] > rtol:
        exact, numeric = report[worst[1]]
        raise GradCheckError(
            f"gradient of {worst[1]!r} disagrees with finite differences: directional "
            f"derivative {exact:.6g} analytic vs {numeric:.6g} numeric (relative error "
            f"{worst[0]:.2e} > {rtol:.0e})")
    return report
