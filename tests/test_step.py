"""The Step API on the numpy backend: calling, forward, grads, params, checkpoints,
input checking, fg.lower, backend errors and fg.check_grads."""

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ferrograd as fg
from ferrograd.ir.ops import lookup

B = 6


@fg.model
def mlp(x: fg.f32["B", 4], y: fg.i32["B"]):
    h = fg.tanh(fg.nn.linear(x, 5))
    logits = fg.nn.linear(h, 3, name="head")
    return {"loss": fg.cross_entropy(logits, y), "logits": logits, "hidden": h}


@fg.model
def mlp_wide(x: fg.f32["B", 4], y: fg.i32["B"]):  # same names as mlp, other shapes
    h = fg.tanh(fg.nn.linear(x, 7))
    logits = fg.nn.linear(h, 3, name="head")
    return {"loss": fg.cross_entropy(logits, y), "logits": logits, "hidden": h}


@fg.model
def bag_of_words(ids: fg.i32["B", 2], y: fg.f32["B"]):
    e = fg.nn.embedding(ids, 5, 3, name="emb")
    return fg.mse(e.sum(-1).sum(-1), y)


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, 4)).astype(np.float32),
            rng.integers(0, 3, B).astype(np.int32))


_LOWERED: dict[tuple, fg.Lowered] = {}


def make(optimizer=None, seed: int = 0, model=mlp) -> fg.Step:
    """A fresh step (own params and state); the lowered graph is shared to save time."""
    optimizer = fg.optim.Adam(lr=0.05) if optimizer is None else optimizer
    key = (model.name, repr(optimizer), seed)
    if key not in _LOWERED:
        _LOWERED[key] = fg.lower(model, optimizer=optimizer, backend="numpy", B=B, seed=seed)
    return _LOWERED[key].compile()


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def numpy_forward(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """mlp written out in float64 NumPy."""
    h = np.tanh(x @ p["linear_0.weight"].astype(np.float64) + p["linear_0.bias"])
    logits = h @ p["head.weight"].astype(np.float64) + p["head.bias"]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean(), logits, h


# ---- calling ----------------------------------------------------------------------------------


def test_call_trains_and_returns_the_loss_before_the_update():
    step = make(fg.optim.SGD(lr=0.5))
    x, y = batch()
    want, _, _ = numpy_forward(step.params, x, y)
    before = step.params
    loss = step(x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(want, rel=1e-5)
    after = step.params
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    losses = [step(x, y) for _ in range(20)]
    assert losses[-1] < 0.5 * loss


def test_positional_keyword_and_mixed_inputs_give_the_same_step():
    x, y = batch()
    runs = []
    for call in (lambda s: s(x, y), lambda s: s(y=y, x=x), lambda s: s(x, y=y)):
        step = make()
        losses = [call(step) for _ in range(3)]
        runs.append((losses, step.params))
    for losses, params in runs[1:]:
        assert losses == runs[0][0]
        assert_same(params, runs[0][1])


def test_forward_returns_every_output_and_changes_nothing():
    step = make()
    x, y = batch()
    step(x, y)  # non-zero optimizer state
    params, state = step.params, step.state
    out = step.forward(x, y)
    assert set(out) == {"loss", "logits", "hidden"}
    loss, logits, h = numpy_forward(params, x, y)
    assert out["loss"].shape == () and out["loss"].dtype == np.float32
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["hidden"], h, rtol=1e-5, atol=1e-6)
    assert_same(step.params, params)
    assert_same(step.state, state)
    # forward by keyword is the same
    np.testing.assert_array_equal(step.forward(y=y, x=x)["logits"], out["logits"])


def test_forward_outputs_do_not_alias_the_params():
    @fg.model
    def exposes_param(x: fg.f32["B", 2]):
        w = fg.param("w", (2,), init="ones")
        return {"loss": (x * w).sum(), "w": w}

    step = fg.compile(exposes_param, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=1)
    out = step.forward(np.ones((1, 2), np.float32))
    out["w"][...] = 100.0
    np.testing.assert_array_equal(step.params["w"], [1.0, 1.0])


def test_grads_match_float64_gradients_and_check_grads_and_change_nothing():
    step = make()
    x, y = batch()
    step(x, y)
    params, state = step.params, step.state
    grads = step.grads(x, y)
    assert set(grads) == set(params)
    for k, g in grads.items():
        assert g.shape == params[k].shape and g.dtype == np.float32
    assert_same(step.params, params)
    assert_same(step.state, state)
    # the IR's own gradients in float64, at the step's current params
    graph = fg.grad(fg.trace(mlp, B=B))
    exact = fg.interpret(graph, {"x": x, "y": y}, params, dtype="f64",
                         results=[f"grad:{k}" for k in params])
    for k in params:
        np.testing.assert_allclose(grads[k], exact[f"grad:{k}"], rtol=1e-4, atol=1e-6)
    report = fg.check_grads(step, x, y)
    assert set(report) == set(params)
    for analytic, numeric in report.values():
        assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_params_are_copies():
    step, twin = make(), make()
    x, y = batch()
    p = step.params
    p["head.bias"][...] = 99.0
    p["linear_0.weight"] *= 0.0
    assert not np.any(step.params["head.bias"] == 99.0)
    assert step.params["head.bias"] is not step.params["head.bias"]
    s = step.state
    s["exp_avg:head.bias"][...] = 5.0
    assert not step.state["exp_avg:head.bias"].any()
    assert step(x, y) == twin(x, y)
    assert_same(step.params, twin.params)


# ---- load_params ---------------------------------------------------------------------------


def test_load_params_sets_only_the_given_params():
    step = make()
    x, y = batch()
    before = step.params
    new_bias = np.array([1.0, -2.0, 3.0])  # float64 is accepted and stored as float32
    step.load_params({"head.bias": new_bias})
    after = step.params
    assert after["head.bias"].dtype == np.float32
    np.testing.assert_array_equal(after["head.bias"], new_bias.astype(np.float32))
    for k in before:
        if k != "head.bias":
            np.testing.assert_array_equal(after[k], before[k])
    # the step uses the new value
    _, logits, _ = numpy_forward(after, x, y)
    np.testing.assert_allclose(step.forward(x, y)["logits"], logits, rtol=1e-5, atol=1e-6)
    # and keeps its own copy of it
    new_bias[:] = 0.0
    np.testing.assert_array_equal(step.params["head.bias"], [1.0, -2.0, 3.0])


def test_load_params_of_all_params_makes_twins():
    a, b = make(seed=1), make(seed=2)
    assert not np.array_equal(a.params["head.weight"], b.params["head.weight"])
    b.load_params(a.params)
    x, y = batch()
    assert a(x, y) == b(x, y)
    assert_same(a.params, b.params)


@pytest.mark.parametrize("values, words", [
    ({"head.bias": np.zeros(3), "nope": np.zeros(3)}, ["'nope'", "head.bias"]),
    ({"head.weight": np.zeros((3, 5))}, ["'head.weight'", "(5, 3)", "(3, 5)"]),
    ({"head.bias": np.zeros(3, np.int32)}, ["'head.bias'", "int32", "float"]),
    ({"head.bias": np.zeros(3), "linear_0.bias": np.zeros(4)}, ["'linear_0.bias'", "(5,)"]),
], ids=["unknown_name", "wrong_shape", "int_dtype", "one_bad_of_two"])
def test_load_params_errors_name_the_param_and_change_nothing(values, words):
    step = make()
    before = step.params
    with pytest.raises(fg.CheckpointError) as err:
        step.load_params(values)
    for w in words:
        assert w in str(err.value)
    assert_same(step.params, before)


# ---- checkpoints ---------------------------------------------------------------------------


def test_save_load_round_trip_continues_training_identically(tmp_path):
    data = [batch(s) for s in range(6)]
    uninterrupted = make(fg.optim.Adam(lr=0.05, weight_decay=0.01))
    for xb, yb in data[:3]:
        uninterrupted(xb, yb)
    path = tmp_path / "ckpt.safetensors"
    uninterrupted.save(path)
    saved_params, saved_state = uninterrupted.params, uninterrupted.state
    want = [uninterrupted(xb, yb) for xb, yb in data[3:]]

    resumed = make(fg.optim.Adam(lr=0.05, weight_decay=0.01), seed=7)
    assert not np.array_equal(resumed.params["head.weight"], saved_params["head.weight"])
    resumed.load(path)
    assert_same(resumed.params, saved_params)
    assert_same(resumed.state, saved_state)
    assert float(resumed.state["step"]) == 3.0
    got = [resumed(xb, yb) for xb, yb in data[3:]]
    assert got == want
    assert_same(resumed.params, uninterrupted.params)
    assert_same(resumed.state, uninterrupted.state)


def test_checkpoint_file_is_safetensors_with_state_under_optim(tmp_path):
    step = make(fg.optim.SGD(lr=0.1, momentum=0.9))
    x, y = batch()
    step(x, y)
    path = tmp_path / "deep" / "dir" / "ckpt.safetensors"  # missing folders are created
    step.save(path)
    tensors = load_file(str(path))
    assert set(tensors) == set(step.params) | {f"optim.{k}" for k in step.state}
    np.testing.assert_array_equal(tensors["head.weight"], step.params["head.weight"])
    np.testing.assert_array_equal(tensors["optim.momentum_buffer:head.bias"],
                                  step.state["momentum_buffer:head.bias"])


def test_loaded_state_is_really_used(tmp_path):
    """Edit the step counter in a checkpoint: Adam's bias correction follows it."""
    x, y = batch()
    fresh = make(fg.optim.Adam(lr=0.01))
    path = tmp_path / "c.safetensors"
    fresh.save(path)
    tensors = load_file(str(path))
    tensors["optim.step"] = np.array(1000.0, np.float32)
    save_file(tensors, str(path))
    late = make(fg.optim.Adam(lr=0.01))
    late.load(path)
    p0 = fresh.params
    fresh(x, y)
    late(x, y)
    d_fresh = np.abs(fresh.params["head.bias"] - p0["head.bias"])
    d_late = np.abs(late.params["head.bias"] - p0["head.bias"])
    # step 1: |update| = lr; step 1001: lr * 0.1 / sqrt(0.001 * (1 - 0.999**1001) / 1)
    np.testing.assert_allclose(d_fresh, 0.01, rtol=1e-3)
    np.testing.assert_allclose(d_late, 0.01 * 0.1 / np.sqrt(0.001 / (1 - 0.999**1001)),
                               rtol=1e-3)


def test_loading_another_models_checkpoint_names_what_is_wrong(tmp_path):
    path = tmp_path / "mlp.safetensors"
    make().save(path)
    wide = make(model=mlp_wide)
    before = wide.params
    with pytest.raises(fg.CheckpointError) as err:
        wide.load(path)
    msg = str(err.value)
    assert any(f"'{name}'" in msg for name in ("linear_0.weight", "linear_0.bias",
                                                "head.weight"))
    assert "expected shape" in msg and "got" in msg
    assert_same(wide.params, before)

    @fg.model
    def renamed(x: fg.f32["B", 4], y: fg.i32["B"]):
        return fg.cross_entropy(fg.nn.linear(x, 3, name="out"), y)

    other = fg.compile(renamed, optimizer=fg.optim.Adam(lr=0.05), backend="numpy", B=B)
    with pytest.raises(fg.CheckpointError) as err:
        other.load(path)
    assert "out.weight" in str(err.value) and "out.bias" in str(err.value)
    assert str(path) in str(err.value)


def test_loading_a_checkpoint_of_another_optimizer_names_the_state(tmp_path):
    sgd_path, adam_path = tmp_path / "sgd.safetensors", tmp_path / "adam.safetensors"
    make(fg.optim.SGD(lr=0.1)).save(sgd_path)
    make(fg.optim.Adam()).save(adam_path)
    adam = make(fg.optim.Adam())
    with pytest.raises(fg.CheckpointError, match=r"optim\.step"):
        adam.load(sgd_path)
    sgd = make(fg.optim.SGD(lr=0.1))
    before = sgd.params
    with pytest.raises(fg.CheckpointError, match="exp_avg"):
        sgd.load(adam_path)
    assert_same(sgd.params, before)  # nothing half-loaded


def test_loading_a_missing_or_corrupt_file_is_a_checkpoint_error(tmp_path):
    step = make()
    with pytest.raises(fg.CheckpointError, match="no checkpoint"):
        step.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(fg.CheckpointError, match=r"junk\.safetensors"):
        step.load(junk)


@pytest.mark.parametrize("broken", ["os.replace", "os.fsync", "write"])
def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch, broken):
    step = make()
    path = tmp_path / "ckpt.safetensors"
    step.save(path)
    old = path.read_bytes()
    x, y = batch()
    step(x, y)  # the params change, so a new save would write different bytes

    class Boom(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Boom("disk on fire")

    if broken == "os.replace":
        monkeypatch.setattr(os, "replace", boom)
    elif broken == "os.fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:  # the file fills up half-way through writing
        real_fdopen = os.fdopen

        class HalfFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise Boom("disk full")

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(Boom):
        step.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    # and the old checkpoint still loads
    again = make(seed=5)
    again.load(path)
    assert_same(again.params, make().params)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    step = make()
    path = tmp_path / "ckpt.safetensors"
    step.save(path)
    step(*batch())
    step.save(path)
    again = make(seed=3)
    again.load(path)
    assert_same(again.params, step.params)
    assert_same(again.state, step.state)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


# ---- input checking ------------------------------------------------------------------------


x0, y0 = batch()


@pytest.mark.parametrize("args, kwargs, words", [
    ((x0[:5], y0), {}, ["'x'", "(6, 4)", "B", "(5, 4)"]),
    ((x0[:, None], y0), {}, ["'x'", "(6, 4)", "(6, 1, 4)"]),
    ((x0.astype(np.float64), y0), {}, ["'x'", "float32", "float64"]),
    ((x0, y0.astype(np.int64)), {}, ["'y'", "int32", "int64"]),
    ((x0, y0.astype(np.float32)), {}, ["'y'", "int32", "float32"]),
    ((x0,), {}, ["missing", "'y'", "(x, y)"]),
    ((), {"x": x0}, ["missing", "'y'"]),
    ((x0, y0), {"z": y0}, ["unknown", "'z'", "(x, y)"]),
    ((x0, y0, y0), {}, ["takes 2 inputs", "(x, y)", "got 3"]),
    ((x0,), {"x": x0, "y": y0}, ["'x'", "both"]),
], ids=["short_batch", "extra_axis", "f64_x", "i64_y", "float_labels", "missing",
        "missing_by_name", "extra", "too_many_positional", "twice"])
@pytest.mark.parametrize("method", ["__call__", "forward", "grads"])
def test_bad_inputs_raise_input_error_and_leave_the_step_alone(args, kwargs, words, method):
    step = make()
    step(x0, y0)
    params, state = step.params, step.state
    with pytest.raises(fg.InputError) as err:
        getattr(step, method)(*args, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert_same(step.params, params)
    assert_same(step.state, state)
    step(x0, y0)  # still usable


@pytest.mark.parametrize("bad", [3, 17, -1])
def test_out_of_range_label_is_an_input_error(bad):
    step = make()
    params = step.params
    y = y0.copy()
    y[2] = bad
    with pytest.raises(fg.InputError) as err:
        step(x0, y)
    assert "'y'" in str(err.value) and str(bad) in str(err.value)
    assert "[0, 3)" in str(err.value)
    assert_same(step.params, params)


def test_out_of_range_label_after_a_reshape_is_an_error():
    @fg.model
    def column_labels(x: fg.f32["B", 4], y: fg.i32["B", 1]):
        return fg.cross_entropy(fg.nn.linear(x, 3), y.reshape(-1))

    step = fg.compile(column_labels, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B)
    with pytest.raises(fg.FerrogradError):
        step.forward(x0, np.full((B, 1), 7, np.int32))


@pytest.mark.parametrize("bad", [5, 99, -1])
def test_out_of_range_embedding_id_is_an_input_error(bad):
    step = fg.compile(bag_of_words, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B)
    ids = np.zeros((B, 2), np.int32)
    ids[1, 1] = bad
    y = np.ones(B, np.float32)
    params = step.params
    for method in (step, step.forward, step.grads):
        with pytest.raises(fg.InputError) as err:
            method(ids, y)
        assert "'ids'" in str(err.value) and str(bad) in str(err.value)
    assert_same(step.params, params)
    ids[1, 1] = 4
    step(ids, y)


def test_a_step_without_optimizer_cannot_train_but_runs_forward_and_grads():
    step = fg.compile(mlp, backend="numpy", B=B)
    x, y = batch()
    with pytest.raises(fg.InputError, match="optimizer"):
        step(x, y)
    assert set(step.forward(x, y)) == {"loss", "logits", "hidden"}
    assert set(step.grads(x, y)) == set(step.params)
    assert step.state == {}


# ---- fg.lower and backends -----------------------------------------------------------------


def test_lower_gives_graph_source_and_files(tmp_path):
    lowered = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.1, momentum=0.9), backend="numpy",
                       B=B)
    g = lowered.graph
    assert isinstance(g, fg.Graph)
    assert list(g.inputs) == ["x", "y"]
    assert set(g.params) == {"linear_0.weight", "linear_0.bias", "head.weight", "head.bias"}
    assert set(g.grads) == set(g.params)
    assert set(g.updates) == set(g.params) | {f"momentum_buffer:{k}" for k in g.params}
    g.validate()

    src = lowered.source("numpy")
    assert src == lowered.source()  # the lowered backend by default
    assert src.startswith("graph mlp")
    for needle in ("input 'x'", "param 'head.weight'", "matmul", "tanh",
                   "state 'momentum_buffer:head.bias'", "update:head.bias", "test_step.py"):
        assert needle in src, needle

    out = lowered.write(tmp_path / "ir")
    files = {p.name for p in out.iterdir()}
    assert {"graph.txt", "graph.dot", "graph.json"} <= files
    assert (out / "graph.txt").read_text().strip() == src
    assert (out / "graph.dot").read_text().startswith('digraph "mlp"')
    doc = json.loads((out / "graph.json").read_text())
    assert len(doc["nodes"]) == len(g)
    assert set(doc["params"]) == set(g.params)

    step = lowered.compile()
    assert isinstance(step, fg.Step) and step.backend == "numpy"
    assert step.graph is lowered.graph
    assert step.source() == src
    assert step.kernels == []


def test_lower_is_deterministic_and_fingerprints_options():
    a = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B)
    b = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B)
    c = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.2), backend="numpy", B=B)
    d = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B + 1)
    assert a.source() == b.source()
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


@pytest.mark.parametrize("backend", ["tpu", "CPU", "metal"])
def test_unknown_backend_raises_backend_error_listing_the_choices(backend):
    for call in (fg.compile, fg.lower):
        with pytest.raises(fg.BackendError) as err:
            call(mlp, optimizer=fg.optim.SGD(lr=0.1), backend=backend, B=B)
        msg = str(err.value)
        assert f"unknown backend {backend!r}" in msg
        assert all(b in msg for b in ("numpy", "cpu", "cuda", "wgsl"))
    lowered = fg.lower(mlp, backend="numpy", B=B)
    with pytest.raises(fg.BackendError, match="unknown backend"):
        lowered.source(backend)


def test_backend_error_is_a_ferrograd_error():
    assert issubclass(fg.BackendError, fg.FerrogradError)
    assert issubclass(fg.InputError, fg.FerrogradError)
    assert issubclass(fg.CheckpointError, fg.FerrogradError)
    assert issubclass(fg.GradCheckError, fg.FerrogradError)


# ---- fg.check_grads ------------------------------------------------------------------------


def test_check_grads_passes_on_a_correct_model():
    x, y = batch()
    report = fg.check_grads(mlp, x, y)
    assert set(report) == {"linear_0.weight", "linear_0.bias", "head.weight", "head.bias"}
    for analytic, numeric in report.values():
        assert abs(analytic) > 1e-6
        assert analytic == pytest.approx(numeric, rel=1e-6)
    # by keyword too, and with explicit params
    assert fg.check_grads(mlp, y=y, x=x).keys() == report.keys()
    assert fg.check_grads(mlp, x, y, params=make(seed=4).params).keys() == report.keys()


def test_check_grads_on_a_step_names_the_worst_param(monkeypatch):
    step = make()
    x, y = batch()
    fg.check_grads(step, x, y)  # honest gradients pass
    real = step.grads

    def wrong(*args, **kwargs):
        g = real(*args, **kwargs)
        g["linear_0.bias"] = g["linear_0.bias"] * 1.001  # slightly off
        g["head.weight"] = g["head.weight"] * -1.0       # badly off
        return g

    monkeypatch.setattr(step, "grads", wrong)
    with pytest.raises(fg.GradCheckError) as err:
        fg.check_grads(step, x, y)
    msg = str(err.value)
    assert "'head.weight'" in msg
    assert "linear_0.bias" not in msg
    assert "analytic" in msg and "numeric" in msg


def test_check_grads_on_a_model_with_a_wrong_vjp_names_the_param(monkeypatch):
    @fg.model
    def two_paths(x: fg.f32["B", 3]):
        a = fg.param("a", (3, 2), init="normal")
        b = fg.param("b", (3, 2), init="normal")
        return fg.sin(x @ a).sum() + ((x @ b) ** 2).mean()

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    fg.check_grads(two_paths, x)
    # sin's VJP now forgets the cos(x) factor: only 'a' sits behind a sin
    monkeypatch.setattr(lookup("sin"), "vjp", lambda g, out, x: [g])
    with pytest.raises(fg.GradCheckError) as err:
        fg.check_grads(two_paths, x)
    assert "'a'" in str(err.value) and "'b'" not in str(err.value)


def test_check_grads_on_a_step_at_given_params():
    # A step is checked at its own params: params= is refused, load_params is the way.
    step = make()
    x, y = batch()
    other = make(seed=9).params
    with pytest.raises(fg.InputError, match="load_params"):
        fg.check_grads(step, x, y, params=other)
    step.load_params(other)
    report = fg.check_grads(step, x, y)
    want = fg.check_grads(mlp, x, y, params=other)
    for k, (analytic, numeric) in report.items():
        assert numeric == pytest.approx(want[k][1], rel=1e-9)
        assert analytic == pytest.approx(want[k][0], rel=1e-3)


def test_check_grads_reports_missing_and_ill_shaped_inputs():
    x, y = batch()
    with pytest.raises(fg.InputError, match="'y'"):
        fg.check_grads(mlp, x)
    with pytest.raises(fg.InputError, match="'x'"):
        fg.check_grads(mlp, x[:, :2], y)
    with pytest.raises(fg.InputError, match="'B'"):
        fg.check_grads(mlp, x, y[:4])


def test_repr_names_the_model_and_backend():
    r = repr(make())
    assert "mlp" in r and "numpy" in r and "x, y" in r


class _FakeCudaArray:
    """Only a __cuda_array_interface__, as CuPy arrays and PyTorch CUDA tensors have."""

    def __init__(self, shape, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = {"version": 3, "shape": shape, "typestr": typestr,
                                         "data": (4096, False), "strides": strides,
                                         "stream": 1}


def test_check_feed_passes_device_arrays_through_for_the_cuda_step():
    import ferrograd as fg
    from ferrograd.ir.errors import InputError as FgInputError
    from ferrograd.ir.interpret import check_feed, cuda_array_info

    @fg.model
    def f(x: fg.f32["B", 3]):
        return (x * fg.param("w", (3,), init="ones")).sum()

    g = fg.trace(f, B=2)
    dev = _FakeCudaArray((2, 3))
    assert cuda_array_info(dev) == ((2, 3), "<f4")
    assert cuda_array_info(np.zeros((2, 3), np.float32)) is None
    assert check_feed(g, {"x": dev}, device=True)["x"] is dev  # untouched, no copy
    assert check_feed(g, {"x": _FakeCudaArray((2, 3), strides=(12, 4))}, device=True)
    bad = [(_FakeCudaArray((3, 2)), "expected shape (2, 3)"),
           (_FakeCudaArray((2, 3), "<f8"), "expected dtype float32 (f32[B=2, 3]), got float64"),
           (_FakeCudaArray((2, 3), strides=(4, 8)), "is not C-contiguous")]
    for value, msg in bad:
        with pytest.raises(FgInputError, match=re.escape(msg)):
            check_feed(g, {"x": value}, device=True)
    with pytest.raises(FgInputError, match="in GPU memory"):
        check_feed(g, {"x": dev})
