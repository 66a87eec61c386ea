"""Window chains on the PTX backend (``ptx_windows.py``): a reduction over a small
window and the elementwise kernel reading it broadcast over the window, one kernel
with a thread per window. No GPU needed.

- The CNN benchmark (cnn256): each max pool's tie count joins its gradient kernel,
  in the grads and train plans; the tie counts are never stored. The forward's pools,
  with no reader to join, run a thread per window alone.
- Run whole in the PTX interpreter (``ptx_sim``), CNNs with 2×2 and 3×3 pooling (ReLU
  before the pool makes ties: windows of zeros) and a softmax over a short middle axis
  give the bits of the same plans without window chains, and NumPy's values. ptxas
  assembles them for sm_80 and sm_90.
- A chain is not taken where it would be wrong: a kernel between the reduction and its
  reader writes what the reduction reads, the reader reads the reduction through
  another view, a store over memory the chain still loads.
"""

import math

import numpy as np
import pytest
import sympy as sp
from test_ptx import _launches, assemble_all, small_cnn
from test_ptx_conv import _run

import ferrograd as fg
from ferrograd.codegen.backends.ptx import render_ptx
from ferrograd.codegen.backends.ptx_windows import WindowChain, fuse_windows
from ferrograd.codegen.kernel_ir import Buffer, Elementwise, Reduce, View, row_major
from ferrograd.codegen.launch_plan import DeviceModule
from ferrograd.codegen.memory import MemoryPlan, Placement
from ferrograd.codegen.schedule import Schedule


def _without_windows(lw: fg.Lowered) -> DeviceModule:
    shapes = {k: lw.graph.node(v).shape for k, v in lw.graph.results().items()}
    return render_ptx(lw.ptx_schedules, lw.ptx_memory_plan, result_shapes=shapes,
                      window_chains=False)


def _windows(module: DeviceModule, entry: str) -> list[str]:
    """The launches of window chains that joined a reduction and its reader."""
    return [s.kernel for s, c in _launches(module, entry)
            if c.startswith("window chain") and ", " in c.split("): ")[1].split(";")[0]]


def _alone(module: DeviceModule, entry: str) -> list[str]:
    """The launches of window reductions with no reader to join."""
    return [s.kernel for s, c in _launches(module, entry)
            if c.startswith("window chain") and s.kernel not in _windows(module, entry)]


# ---- the CNN benchmark ------------------------------------------------------------------


def test_cnn_pool_gradients_are_one_kernel_each() -> None:
    """cnn256: both pools' tie counts run inside their gradient kernels (grads and
    train), two launches fewer per entry; no launch stores a tie count."""
    lw = fg.lower(small_cnn, backend="cpu", optimizer=fg.optim.SGD(0.01), B=256)
    module, before = lw.device_module("ptx"), _without_windows(lw)
    for entry in ("grads", "train"):
        assert len(_windows(module, entry)) == 2
        assert len(module.plans[entry].steps) == len(before.plans[entry].steps) - 2
        comments = [c for s, c in _launches(module, entry) if s.kernel in _windows(module, entry)]
        assert all("a thread per window of 4" in c and "reduce" in c and "div_mul_relu_d0" in c
                   for c in comments), comments
    # the forward's pools have no reader to join: a thread per window all the same
    assert not _windows(module, "forward")
    assert len(_alone(module, "forward")) == len(_alone(before, "forward")) + 2 == 2
    assemble_all(lw)


# ---- run in the interpreter ---------------------------------------------------------------


@fg.model
def pool2_cnn(x: fg.f32["B", 2, 8, 6], y: fg.i32["B"]):
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(x, 3, 3, padding=1, name="conv1")), 2)
    return fg.cross_entropy(fg.nn.linear(h.reshape(h.shape[0], -1), 5, name="head"), y)


@fg.model
def pool3_cnn(x: fg.f32["B", 1, 9, 6], y: fg.i32["B"]):
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(x, 2, 3, padding=1, name="conv1")), 3)
    return fg.cross_entropy(fg.nn.linear(h.reshape(h.shape[0], -1), 4, name="head"), y)


@fg.model
def middle_softmax(x: fg.f32[3, 5, 7]):
    # a softmax over a short axis that is not the last: max, then exp(x - max)
    w = fg.param("w", (3, 5, 7), init="normal")
    return fg.sum(fg.softmax(x * w, axis=1) * w)


CASES = {
    "pool2": (pool2_cnn, {"x": (4, 2, 8, 6), "y": 5}, {"B": 4}),
    "pool3": (pool3_cnn, {"x": (3, 1, 9, 6), "y": 4}, {"B": 3}),
}


def _feed(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shapes["x"]).astype(np.float32)
    return {"x": x, "y": rng.integers(0, shapes["y"], size=x.shape[0]).astype(np.int32)}


@pytest.mark.parametrize("case", list(CASES))
def test_cnn_gradients_keep_their_bits(case: str) -> None:
    """The grads plan in the interpreter: the bits of the plan without window chains
    (the tie count in the same order, the gradient by the same instructions), and
    NumPy's gradients; ties (windows of ReLU zeros) split the gradient."""
    model, shapes, dims = CASES[case]
    feed = _feed(shapes, seed=len(case))
    step = fg.lower(model, backend="numpy", **dims).compile()
    lw = fg.lower(model, backend="cpu", **dims)
    module = lw.device_module("ptx")
    assert len(_windows(module, "grads")) == 1
    got = _run(lw, module, "grads", feed, params=step.params)
    ref = _run(lw, _without_windows(lw), "grads", feed, params=step.params)
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    for key, value in step.grads(**feed).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6)
    assemble_all(lw)


def test_cnn_train_step_keeps_its_bits() -> None:
    """A whole SGD train step (params updated in place after the chain) in the
    interpreter: the bits without window chains, and NumPy's new params."""
    model, shapes, dims = CASES["pool2"]
    feed = _feed(shapes, seed=7)
    step = fg.lower(model, optimizer=fg.optim.SGD(0.1), backend="numpy", **dims).compile()
    params = step.params
    lw = fg.lower(model, optimizer=fg.optim.SGD(0.1), backend="cpu", **dims)
    module = lw.device_module("ptx")
    assert len(_windows(module, "train")) == 1
    got = _run(lw, module, "train", feed, params=params)
    ref = _run(lw, _without_windows(lw), "train", feed, params=params)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    step(**feed)
    for name, value in step.params.items():
        _, offset, size = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        np.testing.assert_allclose(got["param"][offset:offset + size], value.ravel(),
                                   rtol=1e-4, atol=1e-6)


def test_softmax_over_a_middle_axis() -> None:
    """``exp(x - max)`` over axis 1 of [3, 5, 7]: the max and the exp are one kernel (a
    window of 5 with stride 7), forward and grads; in grads, the sum of the backward's
    products and the kernel that reads it are another (exp's derivative reads e, so
    nothing stands between them); values as NumPy's."""
    feed = {"x": (4 * np.random.default_rng(3).normal(size=(3, 5, 7))).astype(np.float32)}
    step = fg.lower(middle_softmax, backend="numpy").compile()
    lw = fg.lower(middle_softmax, backend="cpu")
    module = lw.device_module("ptx")
    assert len(_windows(module, "forward")) == 1 and len(_windows(module, "grads")) == 2
    for entry, want in (("forward", step.forward(**feed)), ("grads", step.grads(**feed))):
        got = _run(lw, module, entry, feed, params=step.params)
        ref = _run(lw, _without_windows(lw), entry, feed, params=step.params)
        assert sorted(got) == sorted(ref) == sorted(want)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got[key], ref[key])
    assemble_all(lw)


# ---- when a chain is not taken --------------------------------------------------------------


SHAPE = (4, 3, 2)  # a window of 3 along axis 1
AXES = (1,)


def _view(name: str, shape: tuple[int, ...] = SHAPE, strides: tuple[int, ...] | None = None
          ) -> View:
    return View(name, "f32", 0, shape, strides or row_major(shape))


def _count(src: str = "a", out: str = "m") -> Reduce:
    x = sp.Symbol("x0")
    return Reduce(f"count_{out}", ["reduce_sum"], SHAPE, AXES, "sum", {"x0": _view(src)},
                  x, _view(out, (4, 1, 2), (2, 0, 1)))


def _spread(count_view: View, out: str = "g", src: str = "a") -> Elementwise:
    x0, x1 = sp.symbols("x0 x1")
    return Elementwise("spread", ["div"], SHAPE, {"x0": _view(src), "x1": count_view},
                       [(_view(out), x0 / x1)])


def _write(out: str) -> Elementwise:
    x0 = sp.Symbol("x0")
    return Elementwise(f"write_{out}", ["neg"], SHAPE, {"x0": _view("b")},
                       [(_view(out), -x0)])


BROADCAST = _view("m", SHAPE, (2, 0, 1))


def _joined(kernels: list) -> list[WindowChain]:
    return [k for k in kernels if isinstance(k, WindowChain) and len(k.kernels) > 1]


def _fuse(kernels: list, placements: dict[str, Placement] | None = None,
          result: str = "g") -> list:
    names = {v.buffer for k in kernels for v in [*k.reads(), *k.writes()]}
    buffers = {n: Buffer(n, "temp", "f32", math.prod(SHAPE)) for n in names}
    s = Schedule("grads", kernels, buffers, {"out:r": result})
    plan = MemoryPlan(temps={"grads": placements or {}})
    out, _ = fuse_windows(s, plan, kernels)
    return out


def test_chain_moves_the_reduction_down_to_its_reader() -> None:
    out = _fuse([_count(), _write("c"), _spread(BROADCAST)])
    assert [type(k) for k in out] == [Elementwise, WindowChain]
    (chain,) = _joined(out)
    assert [k.name for k in chain.kernels] == ["count_m", "spread"]
    assert [v.buffer for v in chain.stores] == ["g"]  # the count stays in a register


def test_no_chain_past_a_writer_of_its_input() -> None:
    out = _fuse([_count(), _write("a"), _spread(BROADCAST, src="c")])
    assert not _joined(out)
    assert [k.kernels for k in out if isinstance(k, WindowChain)] == [[_count()]]  # alone


def test_no_chain_through_another_view() -> None:
    other = _view("m", SHAPE, (1, 0, 0))  # the count of another window
    assert not _joined(_fuse([_count(), _spread(other)]))


def test_no_chain_storing_over_a_load() -> None:
    """The plan places g over a (a's last reader is the chain): a thread storing its
    window of g through another view than a's would overwrite elements of a that other
    threads still load. Through the same view (in place) each element is its own."""
    x0, x1 = sp.symbols("x0 x1")
    flipped = Elementwise("spread", ["div"], SHAPE, {"x0": _view("a"), "x1": BROADCAST},
                          [(_view("g", SHAPE, (1, 8, 4)), x0 / x1)])
    at = Placement(0, 24, 0, 3)
    assert not _joined(_fuse([_count(), flipped], {"a": at, "g": at}))
    # the same view in place is fine
    assert _joined(_fuse([_count(), _spread(BROADCAST)], {"a": at, "g": at}))
    # the elementwise kernel writing the reduction's own input, through another view
    over_a = Elementwise("spread", ["div"], SHAPE, {"x0": _view("a"), "x1": BROADCAST},
                         [(_view("a", SHAPE, (1, 8, 4)), x0 / x1)])
    assert not _joined(_fuse([_count(), over_a], result="a"))
    in_place = Elementwise("spread", ["div"], SHAPE, {"x0": _view("a"), "x1": BROADCAST},
                           [(_view("a"), x0 / x1)])
    assert _joined(_fuse([_count(), in_place], result="a"))
