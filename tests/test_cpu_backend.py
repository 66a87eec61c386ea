"""The CPU backend against the NumPy interpreter: every example model, compiled to a
Rust module, must compute the same forward outputs, gradients and optimizer steps.

These tests build modules (cargo + maturin); they skip when the toolchain is absent.
Dependencies compile once into the shared cache, so each model costs seconds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrograd as fg

pytestmark = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from catalog import MODELS  # noqa: E402


def feed_for(graph, rng):
    out = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        if node.dtype == "i32":
            out[name] = rng.integers(0, graph.index_bounds.get(name, 4), node.shape,
                                     dtype=np.int32)
        else:
            out[name] = rng.normal(size=node.shape).astype(np.float32)
    return out


def close(a: dict, b: dict, rtol: float, atol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def check_against_interpreter(model, optimizer, dims, steps=3, rtol=2e-4, atol=2e-5):
    cpu = fg.compile(model, optimizer=optimizer, backend="cpu", seed=3, **dims)
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", seed=3, **dims)
    close(cpu.params, ref.params, 0, 0, "initial param")
    rng = np.random.default_rng(0)
    for _ in range(steps):
        feed = feed_for(ref.graph, rng)
        close(cpu.forward(**feed), ref.forward(**feed), rtol, atol, "forward")
        close(cpu.grads(**feed), ref.grads(**feed), rtol, atol, "grad")
        assert cpu(**feed) == pytest.approx(ref(**feed), rel=rtol, abs=atol)
        close(cpu.params, ref.params, rtol, atol, "param after a step")
        close(cpu.state, ref.state, rtol, atol, "optimizer state after a step")
    return cpu


@pytest.mark.parametrize("name", list(MODELS))
def test_example_matches_interpreter(name: str) -> None:
    model, optimizer, dims = MODELS[name]()
    step = check_against_interpreter(model, optimizer, dims)
    assert step.backend == "cpu" and step.kernels
    assert all(k.backend == "cpu" and "fn " in k.source for k in step.kernels)


def test_compiled_step_rejects_bad_inputs_and_keeps_params() -> None:
    model, optimizer, dims = MODELS["mlp"]()
    step = fg.compile(model, optimizer=optimizer, backend="cpu", **dims)
    before = step.params
    x = np.zeros((16, 64), np.float32)
    y = np.zeros(16, np.int32)
    with pytest.raises(fg.InputError, match=r"'x'.*shape"):
        step(np.zeros((15, 64), np.float32), y)
    with pytest.raises(fg.InputError, match=r"'x'.*float32"):
        step(x.astype(np.float64), y)
    with pytest.raises(fg.InputError, match="missing input 'y'"):
        step(x)
    with pytest.raises(fg.InputError, match=r"'y'.*out of range"):
        step(x, np.full(16, 10, np.int32))
    close(step.params, before, 0, 0, "param after a rejected call")
    # A non-contiguous input is accepted (copied), with the same result as a contiguous one.
    wide = np.random.default_rng(1).normal(size=(16, 128)).astype(np.float32)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(step.forward(strided, y)["logits"],
                                  step.forward(np.ascontiguousarray(strided), y)["logits"])


def test_check_grads_on_a_compiled_step() -> None:
    model, optimizer, dims = MODELS["mlp"]()
    step = fg.compile(model, optimizer=optimizer, backend="cpu", **dims)
    rng = np.random.default_rng(2)
    feed = feed_for(step.graph, rng)
    report = fg.check_grads(step, **feed)
    assert set(report) == set(step.graph.params)


def test_checkpoint_round_trip_between_backends(tmp_path: Path) -> None:
    model, optimizer, dims = MODELS["mlp"]()
    cpu = fg.compile(model, optimizer=optimizer, backend="cpu", **dims)
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", **dims)
    feed = feed_for(cpu.graph, np.random.default_rng(3))
    for _ in range(2):
        cpu(**feed)
    cpu.save(tmp_path / "ckpt.safetensors")
    ref.load(tmp_path / "ckpt.safetensors")
    close(ref.params, cpu.params, 0, 0, "param")
    close(ref.state, cpu.state, 0, 0, "state")
    assert cpu(**feed) == pytest.approx(ref(**feed), rel=1e-5)


def test_lowered_cpu_exposes_plan_and_source() -> None:
    model, optimizer, dims = MODELS["mlp"]()
    lowered = fg.lower(model, optimizer=optimizer, backend="cpu", **dims)
    plan = lowered.memory_plan
    assert plan.peak_bytes > 0 and "peak" in plan.summary()
    source = lowered.source("rust")
    assert "pub fn train_k" in source or "pub fn forward_k" in source
    assert "#[pymodule]" in source
    kinds = {k.kind for k in lowered.kernels}
    assert {"matmul", "elementwise", "reduce"} <= kinds


@fg.model
def column_reductions(x: fg.f32[1024, 300], w: fg.f32[300], z: fg.f32[8, 64, 600]):
    # Column sums and a max: [1024, 300] splits its rows into fixed groups; the
    # [512, 600] ones run in tiles of columns; a product fused into the sum.
    return {"sum": x.sum(0), "weighted": (x * w).sum(0), "max": x.max(0),
            "wide": z.sum((0, 1)), "wide_max": z.max((0, 1))}


def test_column_reductions_match_the_interpreter() -> None:
    cpu = fg.compile(column_reductions, backend="cpu")
    ref = fg.compile(column_reductions, backend="numpy")
    source = cpu.source()
    assert "let mut parts = [[0.0_f64; 300]; 4];" in source  # the row-group path is taken
    assert "let mut parts = [[f32::NEG_INFINITY; 300]; 4];" in source
    assert "chunks_mut(512)" in source  # and the tiled one
    rng = np.random.default_rng(1)
    feed = {"x": rng.normal(size=(1024, 300)).astype(np.float32),
            "w": rng.normal(size=300).astype(np.float32),
            "z": rng.normal(size=(8, 64, 600)).astype(np.float32)}
    close(cpu.forward(**feed), ref.forward(**feed), 1e-5, 1e-4, "forward")


def test_entry_points_with_parallel_kernels_run_on_the_pool() -> None:
    """Steps with several parallel kernels cross into rayon's pool once per call;
    a tiny step stays on the calling thread (crossing costs a wake-up)."""
    big = fg.lower(column_reductions, backend="cpu").source("rust")
    assert "rt::threads::on_pool(" in big
    model, optimizer, dims = MODELS["linreg"]()
    tiny = fg.lower(model, optimizer=optimizer, backend="cpu", **dims).source("rust")
    assert "rt::threads::on_pool(" not in tiny and "fn py_train" in tiny
