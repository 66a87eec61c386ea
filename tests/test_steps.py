"""``step.steps(xs, ys)``: K training steps on K stacked batches, the same bits as K calls
of ``step(xs[k], ys[k])``, on the numpy and cpu backends; input checking of stacked
batches; and the CUDA step's Python side (one native call), with a stand-in module."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.ir.interpret import check_stacked_feed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from catalog import MODELS

K = 4
BACKENDS = ["numpy", pytest.param("cpu", marks=pytest.mark.skipif(
    shutil.which("cargo") is None, reason="needs a Rust toolchain"))]


def fresh(backend: str) -> fg.Step:
    """The catalog's mlp (Adam: params and two state buffers per param), from seed 3."""
    model, optimizer, dims = MODELS["mlp"]()
    return fg.compile(model, optimizer=optimizer, backend=backend, seed=3, **dims)


def stacked_batches(step: fg.Step, count: int = K, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = step.interface.graph
    out = {}
    for name, nid in g.inputs.items():
        node = g.node(nid)
        shape = (count, *node.shape)
        if node.dtype == "i32":
            out[name] = rng.integers(0, g.index_bounds[name], shape, dtype=np.int32)
        else:
            out[name] = rng.normal(size=shape).astype(np.float32)
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def one_by_one(step: fg.Step, feed: dict[str, np.ndarray]) -> np.ndarray:
    count = len(next(iter(feed.values())))
    return np.array([step(**{k: v[i] for k, v in feed.items()}) for i in range(count)],
                    np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_are_the_single_steps_bit_for_bit(backend):
    a, b = fresh(backend), fresh(backend)
    feed = stacked_batches(a)
    losses = a.steps(feed["x"], feed["y"])
    want = one_by_one(b, feed)
    assert losses.dtype == np.float32 and losses.shape == (K,)
    np.testing.assert_array_equal(losses, want)
    assert len(set(losses.tolist())) == K  # it trained: every loss differs
    assert_same(a.params, b.params)
    assert_same(a.state, b.state)
    assert set(a.state) and any(np.any(v != 0) for v in a.state.values())  # Adam's moments
    # and again, from where both are now
    feed = stacked_batches(a, 2, seed=1)
    np.testing.assert_array_equal(a.steps(**feed), one_by_one(b, feed))
    assert_same(a.params, b.params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_by_position_by_name_or_both_give_the_same_steps(backend):
    feed = stacked_batches(fresh("numpy"))
    calls = [lambda s: s.steps(feed["x"], feed["y"]),
             lambda s: s.steps(y=feed["y"], x=feed["x"]),
             lambda s: s.steps(feed["x"], y=feed["y"])]
    results = []
    for call in calls:
        step = fresh(backend)
        results.append((call(step), step.params))
    for losses, params in results[1:]:
        np.testing.assert_array_equal(losses, results[0][0])
        assert_same(params, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_and_strided_batches(backend):
    a, b = fresh(backend), fresh(backend)
    feed = stacked_batches(a, 3)
    # Every other batch of a wider stack: strided along the leading axis
    wide = {k: np.repeat(v, 2, axis=0) for k, v in feed.items()}
    strided = {k: v[::2] for k, v in wide.items()}
    assert not strided["x"].flags.c_contiguous
    np.testing.assert_array_equal(a.steps(**strided), one_by_one(b, feed))
    one = {k: v[:1] for k, v in feed.items()}
    np.testing.assert_array_equal(a.steps(**one), one_by_one(b, one))
    assert_same(a.params, b.params)


X = np.zeros((K, 16, 64), np.float32)
Y = np.zeros((K, 16), np.int32)


@pytest.mark.parametrize("args, kwargs, words", [
    ((X, Y[:3]), {}, ["different numbers of batches", "'x' 4", "(4, 16, 64)", "'y' 3",
                      "(3, 16)"]),
    ((X[:0], Y[:0]), {}, ["no batches", "(0, 16, 64)", "K ≥ 1"]),
    ((X[:, :15], Y), {}, ["'x'", "expected shape (4, 16, 64)", "4 batches of f32[B=16, 64]",
                          "got (4, 15, 64)"]),
    ((X, Y[:, None]), {}, ["'y'", "expected shape (4, 16)", "got (4, 1, 16)"]),
    ((X[0], Y[0]), {}, ["'x'", "expected shape (16, 16, 64)", "got (16, 64)",
                        "one more (leading) axis"]),
    ((X.astype(np.float64), Y), {}, ["'x'", "float32", "float64"]),
    ((X, np.int32(0)), {}, ["'y'", "scalar", "one extra leading axis"]),
    ((X,), {}, ["missing", "'y'"]),
    ((X, Y), {"z": Y}, ["unknown", "'z'"]),
    ((X, Y, Y), {}, ["takes 2 inputs", "got 3"]),
    ((X,), {"x": X, "y": Y}, ["'x'", "both"]),
], ids=["mismatched_k", "zero_k", "per_step_shape", "per_step_rank", "unstacked",
        "dtype", "scalar", "missing", "unknown", "too_many", "twice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_stacked_inputs_raise_naming_the_input_and_run_nothing(backend, args, kwargs,
                                                                    words):
    step = fresh(backend)
    params, state = step.params, step.state
    with pytest.raises(fg.InputError) as err:
        step.steps(*args, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert_same(step.params, params)
    assert_same(step.state, state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_label_out_of_range_in_any_batch_is_found_before_any_step(backend):
    step = fresh(backend)
    params = step.params
    feed = stacked_batches(step)
    feed["y"][2, 5] = 10
    with pytest.raises(fg.InputError) as err:
        step.steps(**feed)
    assert all(w in str(err.value) for w in ("'y'", "value 10", "[0, 10)", "batch 2"))
    assert_same(step.params, params)


def test_a_step_without_an_optimizer_has_no_steps():
    model, _, dims = MODELS["mlp"]()
    step = fg.compile(model, backend="numpy", **dims)
    with pytest.raises(fg.InputError, match="without an optimizer"):
        step.steps(X, Y)


class _FakeCudaArray:
    """Only a __cuda_array_interface__, as CuPy arrays and PyTorch CUDA tensors have."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f4") -> None:
        self.__cuda_array_interface__ = {"version": 3, "shape": shape, "typestr": typestr,
                                         "data": (4096, False), "strides": None,
                                         "stream": 1}


def test_stacked_device_arrays_are_checked_from_their_interface_and_passed_through():
    g = fresh("numpy").interface.graph
    x, y = _FakeCudaArray((3, 16, 64)), _FakeCudaArray((3, 16), "<i4")
    feed, count = check_stacked_feed(g, {"x": x, "y": y}, device=True)
    assert count == 3 and feed["x"] is x and feed["y"] is y
    host_y = np.zeros((3, 16), np.int32)  # one of each kind
    assert check_stacked_feed(g, {"x": x, "y": host_y}, device=True)[1] == 3
    with pytest.raises(fg.InputError, match=r"'x' 3 \(shape \(3, 16, 64\)\), 'y' 2"):
        check_stacked_feed(g, {"x": x, "y": _FakeCudaArray((2, 16), "<i4")}, device=True)
    with pytest.raises(fg.InputError, match=r"'y': expected dtype int32 \(3 batches of"):
        check_stacked_feed(g, {"x": x, "y": _FakeCudaArray((3, 16))}, device=True)
    with pytest.raises(fg.InputError, match="in GPU memory"):
        check_stacked_feed(g, {"x": x, "y": host_y})


class _FakeCudaStep:
    """Stands in for a module's ``CudaStep`` (no GPU here): records ``steps`` calls."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, np.ndarray]] = {"param": {}, "state": {}}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: Exception | None = None  # what the next call raises

    def set(self, kind: str, name: str, value: np.ndarray) -> None:
        self.values[kind][name] = value

    def get(self, kind: str) -> dict[str, np.ndarray]:
        return dict(self.values[kind])

    def steps(self, count: int, *inputs: Any) -> np.ndarray:
        self.calls.append((count, *inputs))
        if self.fail is not None:
            raise self.fail
        return np.arange(count, dtype=np.float32)


def test_the_cuda_step_runs_all_batches_in_one_native_call():
    from ferrograd.codegen.cpu_step import CompiledStep

    ref = fresh("numpy")
    native = _FakeCudaStep()
    step = CompiledStep(ref.lowered, None, ref.params, ref.state, "cuda", native)  # type: ignore[arg-type]
    x, y = _FakeCudaArray((5, 16, 64)), np.zeros((5, 16), np.int32)
    losses = step.steps(y=y, x=x)
    np.testing.assert_array_equal(losses, np.arange(5, dtype=np.float32))
    assert len(native.calls) == 1
    count, got_x, got_y = native.calls[0]
    assert count == 5 and got_x is x and got_y is y  # in input order, untouched
    with pytest.raises(fg.InputError, match="different numbers of batches"):
        step.steps(x, y[:4])
    assert len(native.calls) == 1
    with pytest.raises(fg.InputError, match="out of range"):
        step.steps(x, np.full((5, 16), -1, np.int32))  # host ids: found by Python first
    assert len(native.calls) == 1
    # What the module raises: bad data (ValueError) and a GPU failure (RuntimeError)
    native.fail = ValueError("input 'y': index 10 (at position 3) is out of range [0, 10)")
    with pytest.raises(fg.InputError, match="index 10"):
        step.steps(x, y)
    native.fail = RuntimeError("step 3 (from 0) of 5: launching kernel `k7`")
    with pytest.raises(fg.BackendError, match=r"mlp.*: step 3 \(from 0\) of 5"):
        step.steps(x, y)
