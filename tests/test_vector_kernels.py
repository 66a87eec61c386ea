"""CPU kernels written to vectorize: the runtime's branch-free exp/ln/tanh/erf,
row reductions folded in eight lanes a chunk at a time (``rt::lanes``), and
``where`` values computed before the select. Each layout the generator emits for
them (rows shorter than a chunk, rows of several chunks with a ragged tail, two
reduced dims, broadcast operands, masks) must match the NumPy interpreter,
including extreme inputs where exp overflows and softmax must stay finite."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.codegen import cpu_level
from ferrograd.codegen.cpu_level import LEVELS, rustc_flags, supported_level

pytestmark = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")

ROWS, LONG = 6, 300  # 300 = four 64-element chunks and a ragged 44


@fg.model
def long_rows(x: fg.f32[ROWS, LONG], m: fg.f32[ROWS, LONG], z: fg.f32[4, 3, 100]):
    # Parameters in every path, so the gradients go through each kernel layout.
    x = x * fg.param("a", (LONG,), "normal", mean=1.0, std=0.1)
    z = z + fg.param("b", (100,), "normal", std=0.1)
    mask = m > 0.0
    p = fg.softmax(x * 3.0, -1)  # reduce_max and exp-sum over rows of 300
    ls = fg.log_softmax(x, -1)
    g = fg.gelu(x) + fg.tanh(x) * fg.erf(x * 0.5)
    masked = fg.where(mask, fg.exp(x * 0.1) / (1.0 + m * m), 0.0)  # where with a division
    two_axes = (fg.exp(z * 0.1) * z).sum((1, 2))  # two reduced dims, rows of 100
    peak = fg.where(mask, x, -1e9).max(-1)
    loss = ((p * m).sum() + (ls * m).mean() + (g * g).mean() + masked.sum() * 0.01
            + two_axes.sum() * 0.1 + peak.sum() + fg.log(1.0 + x * x).sum() * 0.1)
    return loss


def feed(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {"x": (rng.normal(size=(ROWS, LONG)) * scale).astype(np.float32),
            "m": rng.normal(size=(ROWS, LONG)).astype(np.float32),
            "z": rng.normal(size=(4, 3, 100)).astype(np.float32)}


def close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


def test_generated_kernels_take_the_vector_paths() -> None:
    code = fg.lower(long_rows).crate.files["src/kernels.rs"].decode()
    assert "rt::lanes::add" in code and "rt::lanes::max" in code
    assert "step_by(rt::lanes::CHUNK)" in code  # rows of 300 go a chunk at a time
    assert 'type Math = rt::math::Math<{ cfg!(target_feature = "fma") }>;' in code
    for f in ("exp", "ln", "tanh", "erf"):
        assert f"Math::{f}(" in code
    assert ".exp()" not in code and ".ln()" not in code and ".tanh()" not in code
    # softmax's division by its row's sum: one reciprocal per row, bound before the loop
    assert re.search(r"let recip0 = x\d+\.recip\(\);\n\s*for \(?j", code)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: exp(3x) overflows f32 without the shift
def test_long_row_kernels_match_the_interpreter(scale: float) -> None:
    cpu = fg.compile(long_rows, backend="cpu", seed=0)
    ref = fg.compile(long_rows, backend="numpy", seed=0)
    rng = np.random.default_rng(7)
    for _ in range(2):
        x = feed(rng, scale)
        close(cpu.forward(**x), ref.forward(**x), 2e-5, 1e-5)
        grads = cpu.grads(**x)
        assert all(np.isfinite(v).all() for v in grads.values())
        close(grads, ref.grads(**x), 1e-4, 1e-5)


@pytest.mark.parametrize("level", ["baseline", "v3"])
def test_every_cpu_level_matches_the_interpreter(level: str, monkeypatch) -> None:
    """The module's own code compiles per x86-64 level (``cpu_level.py``); the
    narrower builds must compute the same on a wider CPU."""
    if LEVELS.index(level) > LEVELS.index(supported_level()):
        pytest.skip(f"this CPU lacks x86-64-{level}")
    monkeypatch.setenv("FERROGRAD_CPU_LEVEL", level)
    assert fg.lower(long_rows).crate.rustc_flags == rustc_flags(level)
    cpu = fg.compile(long_rows, backend="cpu", seed=0)
    ref = fg.compile(long_rows, backend="numpy", seed=0)
    x = feed(np.random.default_rng(3), 2.0)
    close(cpu.forward(**x), ref.forward(**x), 2e-5, 1e-5)
    close(cpu.grads(**x), ref.grads(**x), 1e-4, 1e-5)


def test_unknown_or_unsupported_level_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("FERROGRAD_CPU_LEVEL", "avx9000")
    with pytest.raises(fg.BackendError, match="FERROGRAD_CPU_LEVEL='avx9000'"):
        fg.compile(long_rows)
    monkeypatch.setenv("FERROGRAD_CPU_LEVEL", "v4")
    monkeypatch.setattr(cpu_level, "supported_level", lambda: "baseline")
    with pytest.raises(fg.BackendError, match="built for x86-64-v4"):
        fg.compile(long_rows)


@fg.model
def pooled(x: fg.f32[3, 4, 12, 12], y: fg.i32[3]):
    # ReLU zeros make whole pooling windows tie, so the tie-sharing gradient matters.
    h = fg.relu(fg.nn.conv2d(x, 6, 3, padding=1, name="conv"))
    a = fg.max_pool2d(h, 2)  # windows of 2x2, rows of 6 outputs
    b = fg.max_pool2d(h, 3)  # windows of 3x3, rows of 4 outputs
    feats = fg.concat([a.reshape(3, -1), b.reshape(3, -1)], axis=1)
    return fg.cross_entropy(fg.nn.linear(feats, 5, name="head"), y)


def test_pool_gradient_mask_is_recomputed_not_stored() -> None:
    """Max pooling's gradient mask (x == max, cast to float) is read by the tie count
    and by the gradient: recomputed in both kernels, never written to memory; the
    window reductions walk their outputs a row at a time."""
    lw = fg.lower(pooled, optimizer=fg.optim.SGD(lr=0.1))
    train = next(s for s in lw.schedules if s.entry == "train").kernels
    assert not [k.name for k in train if set(k.ops) <= {"cast", "eq"}]
    code = lw.crate.files["src/kernels.rs"].decode()
    # a row of window outputs at a time: rows of 6 and of 4 outputs
    windows = re.findall(r"let outs: &mut \[f32; (\d+)\] = outs.try_into\(\).unwrap\(\);"
                         r"(.*?)outs\[j\] = acc;", code, re.S)
    assert {"6", "4"} <= {n for n, _ in windows}
    # window sums (the tie count) add their four elements in f32, in order (as NumPy)
    sums = [w for _, w in windows if "acc = acc.max" not in w]
    assert sums and all("let mut acc = 0.0_f32;" in w and "f64" not in w for w in sums)


def test_pooling_kernels_match_the_interpreter() -> None:
    cpu = fg.compile(pooled, optimizer=fg.optim.SGD(lr=0.1), backend="cpu", seed=2)
    ref = fg.compile(pooled, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", seed=2)
    rng = np.random.default_rng(11)
    for _ in range(2):
        x = {"x": rng.normal(size=(3, 4, 12, 12)).astype(np.float32),
             "y": rng.integers(0, 5, 3).astype(np.int32)}
        close(cpu.grads(**x), ref.grads(**x), 1e-4, 1e-6)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-5)
        close(cpu.params, ref.params, 1e-4, 1e-6)


@fg.model
def cnn_pool(x: fg.f32[4, 2, 8, 8], y: fg.i32[4]):
    # W4's layer shape: conv, ReLU, 2x2 max pool (reshape to windows, reduce_max).
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(x, 5, 3, padding=1, name="conv1")), 2)
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(h, 6, 3, padding=1, name="conv2")), 2)
    return fg.cross_entropy(fg.nn.linear(h.reshape(4, -1), 3, name="head"), y)


@fg.model
def pool_odd(x: fg.f32[3, 4, 6], y: fg.f32[3, 6, 4]):
    # After a transpose the reshape needs a copy: the relu stays a kernel of its own.
    a = fg.relu(x * fg.param("a", (6,), "normal", mean=1.0)).transpose(0, 2, 1)
    a = a.reshape(3, 3, 2, 4).max(2)
    # (6, 4) -> (4, 6) straddles axes: no common split, so no fusion through it.
    b = fg.tanh(y * fg.param("b", (4,), "normal", mean=1.0)).reshape(3, 4, 6)
    b = b * fg.param("c", (6,), "normal", mean=1.0)
    # Merging axes, a product with a parameter broadcast over them, splitting them
    # back: all one reduction kernel with its prologue.
    c = fg.exp(x * 0.1).reshape(3, 24) * fg.param("d", (24,), "normal", mean=1.0)
    c = c.reshape(3, 4, 6).max(-1)
    # A reduction over merged axes keeps its own shape: the sin is not its prologue.
    d = fg.sin(x * 0.5).reshape(3, 24).max(-1)
    return (a * a).sum() + (b * b).mean() + c.sum() * 0.1 + d.sum()


def kernel_of(kernels: list, *ops: str):
    return [k for k in kernels if set(ops) <= set(k.ops)]


def test_pooling_fuses_through_the_window_reshape() -> None:
    """The window reshape only splits axes, so the ReLU is the max reduction's prologue
    (recomputed in the tie count and the gradient too, never stored), and the pooling
    gradient and ReLU' are one kernel over the windows' shape."""
    lw = fg.lower(cnn_pool, optimizer=fg.optim.SGD(lr=0.1))
    for s in lw.schedules:
        assert not [k.name for k in s.kernels if k.ops == ["relu"]], s.entry
        maxes = [k for k in s.kernels if k.kind == "reduce" and k.combine == "max"
                 and len(k.shape) == 6]
        assert len(maxes) == 2 and all("Piecewise" in str(k.value) for k in maxes)
    train = next(s for s in lw.schedules if s.entry == "train").kernels
    fused = kernel_of(train, "div", "mul", "relu.d0")
    assert [k.shape for k in fused] == [(4, 6, 2, 2, 2, 2), (4, 5, 4, 2, 4, 2)]
    assert not [k for k in train if k.ops == ["mul", "relu.d0"]]


def test_no_fusion_through_a_reshape_that_needs_a_copy() -> None:
    lw = fg.lower(pool_odd, optimizer=fg.optim.SGD(lr=0.1))
    forward = next(s for s in lw.schedules if s.entry == "forward")
    assert kernel_of(forward.kernels, "relu") and kernel_of(forward.kernels, "copy")
    assert kernel_of(forward.kernels, "tanh") != kernel_of(forward.kernels, "mul")
    assert any("split into no common shape" in line for line in forward.log)
    assert [k.ops for k in kernel_of(forward.kernels, "exp")] == [
        ["exp", "mul", "reduce_max"]]
    assert [k.ops for k in kernel_of(forward.kernels, "sin")] == [["mul", "sin"]]


@pytest.mark.parametrize("model, shapes", [
    (cnn_pool, {"x": (4, 2, 8, 8)}),
    (pool_odd, {"x": (3, 4, 6), "y": (3, 6, 4)}),
])
def test_fusion_through_reshapes_matches_the_interpreter(model, shapes) -> None:
    cpu = fg.compile(model, optimizer=fg.optim.SGD(lr=0.1), backend="cpu", seed=3)
    ref = fg.compile(model, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", seed=3)
    rng = np.random.default_rng(5)
    for _ in range(2):
        x = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        if model is cnn_pool:
            x["y"] = rng.integers(0, 3, 4).astype(np.int32)
        close(cpu.grads(**x), ref.grads(**x), 1e-4, 1e-6)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-5)
        close(cpu.params, ref.params, 1e-4, 1e-6)


@fg.model
def windowed(x: fg.f32["B", 8, 16, 16], k: fg.i32["B", 8, 8, 8], v: fg.f32["B", 8, 8, 8],
             u: fg.f32["B", 8, 16, 16], w: fg.f32[8]):
    # Kernels over 2x2 windows, [B, 8, 8, 2, 8, 2], with every kind of input a row of
    # windows reads: per element, per row, per window (f32, i32 and bool), per column.
    B = x.shape[0]
    shape = (B, 8, 8, 2, 8, 2)
    s = fg.param("s", (8,), "normal", mean=1.0, std=0.1).reshape(1, 8, 1, 1, 1, 1)
    win = fg.relu(x.reshape(shape) * s)
    kf = k.reshape(B, 8, 8, 1, 8, 1).astype("f32")
    ww = w.reshape(1, 1, 1, 1, 8, 1)
    b, bm = v > 0.0, u > 0.0  # results: stored as bool buffers (bytes)
    y1 = win * kf + ww
    y2 = (fg.where(b.reshape(B, 8, 8, 1, 8, 1), y1, -y1) * 0.5
          + fg.where(k.reshape(B, 8, 8, 1, 8, 1) > 2, y1, 0.0))  # with y1: two outputs
    tiled = (ww * 2.0).expand(shape)  # reads nothing that changes from row to row
    peak = win.max((3, 5))
    masked = fg.where(bm.reshape(shape), win, 0.0).sum((3, 5))  # a bool per element
    loss = (peak * kf.reshape(B, 8, 8, 8)).mean() + masked.mean() + (y2 * y2).mean()
    return {"loss": loss, "y1": y1, "y2": y2, "tiled": tiled, "b": b, "bm": bm}


def window_feed(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {"x": rng.normal(size=(batch, 8, 16, 16)).astype(np.float32),
            "k": rng.integers(-1, 5, (batch, 8, 8, 8)).astype(np.int32),
            "v": rng.normal(size=(batch, 8, 8, 8)).astype(np.float32),
            "u": rng.normal(size=(batch, 8, 16, 16)).astype(np.float32),
            "w": rng.normal(size=8).astype(np.float32)}


def test_window_kernels_walk_rows_in_a_function_of_their_own() -> None:
    """Rows of windows (short loops) run in a nested ``rows`` function whose slices are
    parameters (so LLVM knows outputs alias no input), over arrays of known length; an
    input broadcast over the window is first copied into a row of its own."""
    code = fg.lower(windowed, optimizer=fg.optim.SGD(lr=0.1), B=16).crate.files[
        "src/kernels.rs"].decode()
    assert "fn rows(row0: usize," in code and "fn rows(_row0: usize," in code
    assert ".for_each(|(block, (o0, o1))| {" in code  # two outputs, blocks on rayon
    for ty, zero in [("f32", "0.0_f32"), ("i32", "0_i32"), ("u8", "0_u8")]:
        assert re.search(rf"let (x\d+)_src: &\[{ty}; 8\] = [^;]*;\s*let mut \1_row = "
                         rf"\[{zero}; 32\];", code), ty
    assert "let x0 = x0_row[j * 2 + i0 * 16 + i1] != 0;" in code  # bools per element
    small = fg.lower(windowed, optimizer=fg.optim.SGD(lr=0.1), B=2).crate.files[
        "src/kernels.rs"].decode()
    assert "rows(0, " in small and "par_chunks_mut" not in small


@pytest.mark.parametrize("batch", [2, 16])  # on the calling thread, in blocks on rayon
def test_window_kernels_match_the_interpreter(batch: int) -> None:
    cpu = fg.compile(windowed, optimizer=fg.optim.SGD(lr=0.1), backend="cpu", seed=4, B=batch)
    ref = fg.compile(windowed, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", seed=4,
                     B=batch)
    rng = np.random.default_rng(9)
    for _ in range(2):
        x = window_feed(rng, batch)
        close(cpu.forward(**x), ref.forward(**x), 1e-5, 1e-6)
        close(cpu.grads(**x), ref.grads(**x), 1e-4, 1e-5)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-5)
        close(cpu.params, ref.params, 1e-5, 1e-6)


@fg.model
def long_pairs(x: fg.f32[2, 3000, 2], y: fg.f32[2, 3000, 1], p: fg.f32[2, 1, 1]):
    return {"z": x * y * p}  # dims [2, 3000, 2]: the inputs merge none of them


def test_rows_of_several_dims_stay_small_enough_for_the_stack() -> None:
    """A row takes trailing dims while it has fewer than 32 elements, but not beyond
    4096: its staged inputs are arrays on the stack (two of 3000 x 2 would be 48 KB)."""
    code = fg.lower(long_pairs).crate.files["src/kernels.rs"].decode()
    assert "fn rows(" not in code and "; 6000]" not in code
    cpu = fg.compile(long_pairs, backend="cpu")
    rng = np.random.default_rng(1)
    x = {"x": rng.normal(size=(2, 3000, 2)).astype(np.float32),
         "y": rng.normal(size=(2, 3000, 1)).astype(np.float32),
         "p": rng.normal(size=(2, 1, 1)).astype(np.float32)}
    np.testing.assert_array_equal(cpu.forward(**x)["z"], x["x"] * x["y"] * x["p"])
