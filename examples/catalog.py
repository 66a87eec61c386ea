"""The example models at small sizes, in one place: the backend tests, the crates
committed under generated/ and the benchmarks all draw from this table."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import ferrograd as fg

HERE = Path(__file__).resolve().parent


def example(name: str) -> ModuleType:
    """Import examples/<name>.py by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"ferrograd_example_{name}", HERE /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> () -> (model, optimizer, dims)
MODELS: dict[str, Callable[[], tuple[fg.Model, Any, dict[str, int]]]] = {
    "linreg": lambda: (example("linreg").linreg, fg.optim.AdamW(lr=1e-2), {"N": 64, "D": 3}),
    "xor": lambda: (example("xor").xor_net,
                    fg.optim.SGD(lr=0.5, momentum=0.9, nesterov=True), {}),
    "mlp": lambda: (example("mlp_digits").build_model(32), fg.optim.Adam(lr=1e-2), {"B": 16}),
    "cnn": lambda: (example("cnn").build_model(4), fg.optim.RMSprop(lr=1e-3, momentum=0.9),
                    {"B": 4}),
    "rnn": lambda: (example("rnn").build_model(5, 8), fg.optim.SGD(lr=0.1, weight_decay=1e-3),
                    {"B": 4}),
    # Not Adam: the gradient of the key bias is exactly zero (softmax ignores a
    # per-query shift), and Adam would blow its rounding noise up to +-lr.
    "transformer": lambda: (example("transformer_lm").build_model(20, 8, 16, 2),
                            fg.optim.SGD(lr=0.1, momentum=0.9), {"B": 2}),
}


def lowered(name: str, backend: str = "cpu") -> fg.Lowered:
    model, optimizer, dims = MODELS[name]()
    return fg.lower(model, optimizer=optimizer, backend=backend, **dims)
