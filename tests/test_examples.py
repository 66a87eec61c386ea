"""Run every example in-process at a small size and check that it learned something.

The examples are scripts, not a package, so each is loaded from its path. Each
`main(argv)` returns a dict of final metrics; these tests assert on it.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ferrograd_examples.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["numpy", "cpu"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu" and shutil.which("cargo") is None:
        pytest.skip("the cpu backend needs a Rust toolchain")
    return str(request.param)


def run(backend: str, name: str, *flags: str) -> dict[str, float]:
    return load(name).main(["--backend", backend, *flags])


def test_linreg_recovers_the_true_weights(backend):
    m = run(backend, "linreg", "--steps", "100", "--samples", "200", "--features", "4")
    assert m["loss"] < 0.05 * m["initial_loss"]
    assert m["max_weight_error"] < 0.05


def test_xor_gets_all_four_points(backend):
    m = run(backend, "xor", "--steps", "300")
    assert m["loss"] < 0.1 < m["initial_loss"]
    assert m["accuracy"] == 1.0


def test_mlp_digits_reaches_95_percent(backend):
    # The full default run: a few seconds on the numpy backend.
    m = run(backend, "mlp_digits")
    assert m["loss"] < 0.1 * m["initial_loss"]
    assert m["test_accuracy"] >= 0.95


def test_mlp_digits_steps_flag_caps_training(backend):
    m = run(backend, "mlp_digits", "--steps", "5", "--hidden", "16")
    assert m["steps"] == 5


def test_cnn_reaches_90_percent(backend):
    m = run(backend, "cnn")
    assert m["loss"] < 0.2 * m["initial_loss"]
    assert m["test_accuracy"] >= 0.9


def test_transformer_lm_loss_falls_below_uniform(backend):
    m = run(backend, "transformer_lm", "--steps", "150", "--context", "16", "--dim", "32",
            "--heads", "2", "--sample", "20")
    assert m["initial_loss"] == pytest.approx(m["uniform_loss"], abs=0.6)
    assert m["loss"] < m["uniform_loss"] - 0.8
    assert math.isfinite(m["loss"])


def test_rnn_learns_majority_vote(backend):
    m = run(backend, "rnn", "--steps", "200", "--length", "7", "--hidden", "8")
    assert m["loss"] < 0.6 * m["initial_loss"]
    assert m["accuracy"] > 0.85
