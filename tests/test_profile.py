"""Per-kernel profiling of the CPU step (``profile=True`` / ``FERROGRAD_PROFILE=1``):
every kernel call is counted and timed, the numbers are unchanged, and an unprofiled
module has no timing code at all."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.codegen.step import KernelTime, Profile

needs_rust = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")

STEPS = 4


@fg.model
def mlp(x: fg.f32["B", 6], y: fg.i32["B"]):
    h = fg.relu(fg.nn.linear(x, 8, name="fc1"))
    return fg.cross_entropy(fg.nn.linear(h, 3, name="head"), y)


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 6)).astype(np.float32), rng.integers(0, 3, 5, dtype=np.int32)


def compile_mlp(profile: bool | None) -> fg.Step:
    return fg.compile(mlp, optimizer=fg.optim.Adam(lr=1e-2), backend="cpu", seed=1,
                      profile=profile, B=5)


@pytest.fixture(scope="module")
def steps() -> tuple[fg.Step, fg.Step]:
    return compile_mlp(True), compile_mlp(False)


def test_unprofiled_source_has_no_timing_code() -> None:
    plain = fg.lower(mlp, optimizer=fg.optim.Adam(lr=1e-2), B=5)
    profiled = plain.profiled()
    assert profiled.profile and not plain.profile and plain.profiled(False) is plain
    assert plain.crate.files["src/kernels.rs"] == profiled.crate.files["src/kernels.rs"]
    source = plain.source("rust")
    for word in ("Instant", "profile", "PROFILE"):
        assert word not in source
    assert "std::time::Instant::now()" in profiled.source("rust")
    assert plain.crate.module != profiled.crate.module
    assert profiled.profiled(False).crate.files == plain.crate.files


@needs_rust
def test_every_train_kernel_is_counted_and_timed(steps: tuple[fg.Step, fg.Step]) -> None:
    step, _ = steps
    step.profile(reset=True)
    x, y = batch()
    for _ in range(STEPS):
        step(x, y)
    table = step.profile()
    assert isinstance(table, Profile) and all(isinstance(r, KernelTime) for r in table)
    train = [k for k in step.kernels if k.name.startswith("train_")]
    rows = {r.name: r for r in table}
    assert set(rows) == {k.name for k in train}  # forward/grads were never called
    for k in train:
        r = rows[k.name]
        assert (r.entry, r.kind, list(r.ops)) == ("train", k.kind, k.ops)
        assert r.calls == STEPS and r.total_s > 0 and r.mean_us > 0
    assert [r.total_s for r in table] == sorted((r.total_s for r in table), reverse=True)
    report = step.profile_report()
    assert table[0].name in report and "mean µs" in report and "share" in report

    step.forward(x, y)
    forward = {r.name: r.calls for r in step.profile(reset=True) if r.entry == "forward"}
    assert forward and set(forward.values()) == {1}
    assert step.profile() == []


@needs_rust
def test_profiling_changes_no_number(steps: tuple[fg.Step, fg.Step], tmp_path) -> None:
    profiled, plain = steps
    plain.save(tmp_path / "start.safetensors")  # the other test trained `profiled`
    profiled.load(tmp_path / "start.safetensors")
    x, y = batch()
    for _ in range(3):
        assert profiled(x, y) == plain(x, y)
    for name, value in plain.params.items():
        np.testing.assert_array_equal(profiled.params[name], value)
    assert profiled.module.__name__ != plain.module.__name__


@needs_rust
def test_unprofiled_steps_refuse(steps: tuple[fg.Step, fg.Step]) -> None:
    _, plain = steps
    with pytest.raises(fg.BackendError, match="not compiled with profiling"):
        plain.profile()
    ref = fg.compile(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=5)
    with pytest.raises(fg.BackendError, match="profiling"):
        ref.profile_report()
    with pytest.raises(fg.BackendError, match="CPU step"):
        fg.compile(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", profile=True, B=5)


@needs_rust
def test_environment_variable_turns_profiling_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERROGRAD_PROFILE", "1")
    step = compile_mlp(None)  # the profiled module, already built by the fixture
    x, y = batch()
    step(x, y)
    assert {r.calls for r in step.profile()} == {1}
    ref = fg.compile(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=5)
    assert not ref.lowered.profile  # backends without a CPU step ignore it
    monkeypatch.setenv("FERROGRAD_PROFILE", "0")
    with pytest.raises(fg.BackendError):
        compile_mlp(None).profile()
