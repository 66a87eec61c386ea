"""Convolution columns kept from the forward pass for the weight gradient, on the PTX
backend (``ptx_conv.keep_columns``): no GPU needed.

- A forward conv and a weight gradient of the same x: the forward's im2col writes the
  columns into a planned temp, the weight gradient reads them and gathers nothing; in
  the PTX interpreter (``ptx_sim``) the columns are x's elements and the results are the
  bits of the same kernels with the columns gathered twice, and NumPy's values.
- The budget: columns that do not fit are gathered again, as before, in the weight
  gradient; nothing kept leaves the schedules and memory plan as the CPU's.
- The CNN benchmark (cnn256): two gathers instead of four in a train step, the columns
  live from their forward conv to their weight gradient, and the scratch arena no longer
  holds a column matrix for the weight gradients.
- A small CNN's gradients (stride 2, a non-square kernel) and the example CNN's train
  step (RMSprop), run whole in the interpreter, kept or not: the same bits, and NumPy's
  values. ptxas assembles what is kept for sm_80 and sm_90.
"""

import math

import numpy as np
import pytest
from ptx_sim import Machine
from test_ptx import (  # (test_ptx puts examples/ on the path for the catalog)
    CONVS,
    MODELS,
    _im2col,
    _launches,
    assemble_all,
    check_module,
    small_cnn,
)

import ferrograd as fg
from ferrograd.codegen.backends import ptx_conv
from ferrograd.codegen.backends.ptx_conv import ConvDims
from ferrograd.codegen.kernel_ir import Conv
from ferrograd.codegen.launch_plan import DeviceModule, DevicePlan, Gemm, Launch
from ferrograd.ir.builder import apply


def _conv_and_weight_grad(cfg: tuple) -> tuple[fg.Model, dict[str, np.ndarray]]:
    """y = conv(x, w) and dw = its weight gradient for cotangent g, in one entry point."""
    n, c, h, w, o, kh, kw, stride, padding = cfg
    d = ConvDims(n, c, h, w, o, kh, kw, *stride, *padding)

    @fg.model
    def conv_and_weight_grad(x: fg.f32[n, c, h, w], w: fg.f32[o, c, kh, kw],
                             g: fg.f32[n, o, d.oh, d.ow]):
        return {"y": apply("conv2d", x, w, stride=stride, padding=padding),
                "dw": apply("conv2d_weight_grad", x, g, stride=stride, padding=padding,
                            w_shape=(o, c, kh, kw))}

    rng = np.random.default_rng(sum(cfg[:7]))
    feed = {"x": rng.normal(size=(n, c, h, w)), "w": rng.normal(size=(o, c, kh, kw)),
            "g": rng.normal(size=(n, o, d.oh, d.ow))}
    return conv_and_weight_grad, {k: v.astype(np.float32) for k, v in feed.items()}


def _machine(lw: fg.Lowered, module: DeviceModule, gemm: str = "fallback",
             params: dict[str, np.ndarray] | None = None) -> Machine:
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    if "input:y" in elem:
        elem["input:y"] = "i32"
    machine = Machine(module, elem, gemm=gemm)
    for name, value in (params or {}).items():
        _, offset, size = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        machine.array("param")[offset:offset + size] = value.ravel()
    return machine


def _run(lw: fg.Lowered, module: DeviceModule, entry: str, feed: dict[str, np.ndarray],
         gemm: str = "fallback", params: dict[str, np.ndarray] | None = None,
         check=None) -> dict[str, np.ndarray]:
    """Plan ``entry``'s results in ``ptx_sim`` (arenas start as NaN, optimizer state as
    0), and after a train step the "param" and "state" arenas; ``check(machine, step)``
    after each step."""
    machine = _machine(lw, module, gemm, params)
    for name, value in feed.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    if "state" in module.arena_sizes:
        machine.array("state")[:] = 0
    plan = module.plans[entry]
    for step in plan.steps:
        machine.run_plan(DevicePlan("one", [step]))
        if check is not None:
            check(machine, step)
    out = {key.split(":", 1)[1]: machine.array(arena)[offset:offset + math.prod(shape)]
           .reshape(shape).copy() for key, (arena, offset, shape) in plan.results.items()}
    if entry == "train":
        out |= {a: machine.array(a).copy() for a in ("param", "state")
                if a in module.arena_sizes}
    return out


def _gathers(module: DeviceModule, entry: str) -> list[Launch]:
    return [s for s, c in _launches(module, entry) if " im2col:" in c]


def _kept(lw: fg.Lowered, entry: str) -> list[Conv]:
    (s,) = [s for s in lw.ptx_schedules if s.entry == entry]
    return [k for k in s.kernels if isinstance(k, Conv) and k.cols is not None]


# ---- one conv and its weight gradient ---------------------------------------------------------


@pytest.mark.parametrize("gemm", ["numpy", "fallback"])
@pytest.mark.parametrize("cfg", CONVS)
def test_weight_grad_reads_the_forward_columns(cfg: tuple, gemm: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward's im2col writes x's columns into a planned temp; the weight gradient's
    GEMM reads them there, with no gather of its own. Its results are the bits of the
    same step gathering twice (budget 0: the columns in the scratch arena, as before)
    and NumPy's values."""
    d = ConvDims(*cfg[:7], *cfg[7], *cfg[8])
    model, feed = _conv_and_weight_grad(cfg)
    lw = fg.lower(model, backend="cpu")
    fwd, wgrad = _kept(lw, "forward")
    assert (fwd.mode, wgrad.mode) == ("forward", "weight_grad") and fwd.cols == wgrad.cols
    assert fwd.cols is not None and fwd.cols.shape == (d.n, d.k, d.p)
    cols = fwd.cols.buffer
    assert fwd.cols in fwd.writes() and fwd.cols in wgrad.reads()
    assert wgrad.lhs not in wgrad.reads()  # x is not read again: it may die earlier
    place = lw.ptx_memory_plan.temps["forward"][cols]
    assert cols not in lw.memory_plan.temps["forward"]  # the CPU's plan has no columns
    module = lw.device_module("ptx")
    assemble_all(lw)
    (gather,) = _gathers(module, "forward")
    at = ("temp_f32", place.offset)
    assert (gather.args[1].arena, gather.args[1].offset) == at
    gemms = [s for s in module.plans["forward"].steps if isinstance(s, Gemm)]
    assert [(g.b.arena, g.b.offset) for g in gemms] == [at, at]  # W·col, g·colᵀ
    assert gemms[1].b_strides == (d.k * d.p, 1, d.p)
    seen = []

    def check(machine: Machine, step: Launch | Gemm) -> None:
        if step is gather:
            got = machine.array("temp_f32")[place.offset:place.offset + d.col]
            np.testing.assert_array_equal(got, _im2col(feed["x"], d).ravel())
            seen.append("im2col")

    got = _run(lw, module, "forward", feed, gemm, check=check)
    assert seen == ["im2col"]

    monkeypatch.setattr(ptx_conv, "KEEP_COLUMNS_BYTES", 0)
    twice = fg.lower(model, backend="cpu")
    assert twice.ptx_schedules is twice.schedules and not _kept(twice, "forward")
    again = twice.device_module("ptx")
    assert len(_gathers(again, "forward")) == 2
    ref = _run(twice, again, "forward", feed, gemm)
    for key in ("y", "dw"):
        np.testing.assert_array_equal(got[key], ref[key])
    want = fg.lower(model, backend="numpy").compile().forward(**feed)
    for key in ("y", "dw"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=5e-5)


def test_columns_are_per_x_and_geometry() -> None:
    """A weight gradient reads the columns of a forward conv of the same x with the same
    kernel size, stride and padding — another w, with other output channels, gathers the
    same columns — and not of another x or another stride."""

    @fg.model
    def three(x: fg.f32[2, 3, 8, 8], z: fg.f32[2, 3, 8, 8], w: fg.f32[4, 3, 3, 3],
              g: fg.f32[2, 5, 8, 8], h: fg.f32[2, 5, 4, 4]):
        w_shape = (5, 3, 3, 3)
        return {"y": apply("conv2d", x, w, stride=(1, 1), padding=(1, 1)),
                "u": apply("conv2d", z, w, stride=(1, 1), padding=(1, 1)),
                "dw": apply("conv2d_weight_grad", x, g, stride=(1, 1), padding=(1, 1),
                            w_shape=w_shape),
                "dz": apply("conv2d_weight_grad", z, h, stride=(2, 2), padding=(1, 1),
                            w_shape=w_shape)}

    lw = fg.lower(three, backend="cpu")
    kept = _kept(lw, "forward")
    assert [k.mode for k in kept] == ["forward", "weight_grad"]
    assert kept[0].lhs == kept[1].lhs and kept[0].dims[4] == 4 and kept[1].dims[4] == 5
    assemble_all(lw)
    check_module(lw.device_module("ptx"))


# ---- the budget and the CNN benchmark --------------------------------------------------------


CNN1 = 256 * 9 * 784  # conv1's columns: 1 channel, 3x3, 28x28 pixels, 256 images
CNN2 = 256 * 144 * 196  # conv2's: 16 channels, 3x3, 14x14


def _cnn() -> fg.Lowered:
    return fg.lower(small_cnn, backend=("cpu", "cuda"), optimizer=fg.optim.SGD(0.01), B=256)


def test_cnn_keeps_its_columns() -> None:
    """The CNN at batch 256 keeps both convs' columns (36 MB): a train step gathers twice,
    not four times; each column matrix lives in the temp arena from its forward conv to
    its weight gradient; the scratch arena holds the input gradient's dcol (conv2's
    column size) and no longer the weight gradient's columns and partials."""
    lw = _cnn()
    module = lw.device_module("ptx")
    check_module(module)
    for entry, gathers in (("train", 2), ("grads", 2), ("forward", 2)):
        assert len(_gathers(module, entry)) == gathers, entry
    for entry in ("train", "grads"):
        (s,) = [s for s in lw.ptx_schedules if s.entry == entry]
        kept = _kept(lw, entry)
        assert [(k.mode, k.cols.size) for k in kept if k.cols is not None] == [
            ("forward", CNN1), ("forward", CNN2), ("weight_grad", CNN2),
            ("weight_grad", CNN1)]
        places = lw.ptx_memory_plan.temps[entry]
        for k in kept:
            assert k.cols is not None
            p, i = places[k.cols.buffer], s.kernels.index(k)
            assert (p.start if k.mode == "forward" else p.end) == i
    assert not any(b.endswith("_cols") for b in lw.memory_plan.temps["train"])  # CPU
    # the columns at most (exactly, today: both are live at the loss, beside the rest)
    assert 0 < module.arena_sizes["temp_f32"] - lw.memory_plan.arena["f32"] <= CNN1 + CNN2
    assert module.arena_sizes["scratch_f32"] == CNN2
    assert "cuda, with conv columns kept: memory plan" in lw.schedule_report()


def test_cnn_columns_over_the_budget_are_gathered_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget with room for conv1's columns only: conv2's weight gradient gathers its
    own, into the scratch arena; with less room than conv1's, nothing is kept and the
    PTX backend works from the CPU's schedules and memory plan."""
    monkeypatch.setattr(ptx_conv, "KEEP_COLUMNS_BYTES", 4 * CNN1)
    lw = _cnn()
    module = lw.device_module("ptx")
    check_module(module)
    assert [k.cols.size for k in _kept(lw, "train") if k.cols is not None] == [CNN1, CNN1]
    assert len(_gathers(module, "train")) == 3
    assert module.arena_sizes["scratch_f32"] >= CNN2 + 256 * 32 * 144

    monkeypatch.setattr(ptx_conv, "KEEP_COLUMNS_BYTES", 4 * CNN1 - 1)
    lw = _cnn()
    assert lw.ptx_schedules is lw.schedules and lw.ptx_memory_plan is lw.memory_plan
    assert len(_gathers(lw.device_module("ptx"), "train")) == 4


# ---- a whole backward pass in the interpreter --------------------------------------------------


@fg.model
def tiny_cnn(x: fg.f32["B", 2, 7, 6], y: fg.i32["B"]):
    h = fg.relu(fg.nn.conv2d(x, 3, 3, padding=1, name="conv1"))
    h = fg.relu(fg.nn.conv2d(h, 4, (2, 3), stride=2, name="conv2"))
    return fg.cross_entropy(fg.nn.linear(h.reshape(h.shape[0], -1), 5, name="head"), y)


def test_small_cnn_gradients_keep_their_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both convs' gradients (stride 1 and 2, a non-square kernel), the whole grads plan
    run in the interpreter: with the columns kept, the bits of the plan that gathers
    them again, and NumPy's gradients."""
    rng = np.random.default_rng(5)
    feed = {"x": rng.normal(size=(3, 2, 7, 6)).astype(np.float32),
            "y": rng.integers(0, 5, size=3).astype(np.int32)}
    step = fg.lower(tiny_cnn, backend="numpy", B=3).compile()
    params = step.params
    lw = fg.lower(tiny_cnn, backend="cpu", B=3)
    assert len(_kept(lw, "grads")) == 4
    module = lw.device_module("ptx")
    assemble_all(lw)
    assert len(_gathers(module, "grads")) == 2
    got = _run(lw, module, "grads", feed, params=params)
    monkeypatch.setattr(ptx_conv, "KEEP_COLUMNS_BYTES", 0)
    twice = fg.lower(tiny_cnn, backend="cpu", B=3)
    again = twice.device_module("ptx")
    assert len(_gathers(again, "grads")) == 4
    ref = _run(twice, again, "grads", feed, params=params)
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    want = step.grads(**feed)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5)


def test_example_cnn_train_step_keeps_its_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example CNN's train step (RMSprop with momentum): with the columns kept the
    memory plan changes (x need not live until the weight gradient), and the optimizer's
    updates merge into other launches; params, state and loss are the bits of the step
    that gathers twice, and the params NumPy's."""
    model, optimizer, dims = MODELS["cnn"]()
    step = fg.lower(model, optimizer=optimizer, backend="numpy", **dims).compile()
    rng = np.random.default_rng(2)
    feed = {"x": rng.normal(size=(dims["B"], 1, 8, 8)).astype(np.float32),
            "y": rng.integers(0, 10, size=dims["B"]).astype(np.int32)}
    params = step.params
    lw = fg.lower(model, optimizer=optimizer, backend="cpu", **dims)
    assert len(_kept(lw, "train")) == 4
    got = _run(lw, lw.device_module("ptx"), "train", feed, params=params)
    monkeypatch.setattr(ptx_conv, "KEEP_COLUMNS_BYTES", 0)
    twice = fg.lower(model, optimizer=optimizer, backend="cpu", **dims)
    ref = _run(twice, twice.device_module("ptx"), "train", feed, params=params)
    assert sorted(got) == sorted(ref) == ["loss", "param", "state"]
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    step(**feed)
    for name, value in step.params.items():
        _, offset, size = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        np.testing.assert_allclose(got["param"][offset:offset + size], value.ravel(),
                                   rtol=1e-4, atol=1e-5)
