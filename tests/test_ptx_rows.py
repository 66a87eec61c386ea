"""Row chains on the PTX backend (``ptx_rows.py``): softmax, layer norm and the like,
scheduled as several kernels over the same rows, run as one kernel per chain.

- The transformer benchmark's attention softmax is one launch between its GEMMs,
  forward and backward, and stores what the backward still reads.
- The fused kernels, run by the PTX interpreter (``ptx_sim``), match the NumPy
  interpreter on softmax over rows of several lengths (ragged ones, -inf entries,
  rows of nothing but -inf) and on attention's gradients; where the unfused kernels
  reduce a warp per row (rows over 32), they match those bit for bit.
- A chain is not taken where it would be wrong: a row value read through another
  view, a store over memory the chain still loads (the memory plan's sharing).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import ferrograd as fg
from ferrograd.codegen.backends.ptx import assemble, find_ptxas, render_ptx
from ferrograd.codegen.backends.ptx_rows import RowChain, fuse_rows
from ferrograd.codegen.kernel_ir import Buffer, Elementwise, Reduce, View, row_major
from ferrograd.codegen.launch_plan import DeviceModule, Gemm, Launch
from ferrograd.codegen.memory import MemoryPlan, Placement
from ferrograd.codegen.schedule import Schedule

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benches"), str(ROOT / "examples")]
from gpu_workloads import GPU_BY_KEY, fg_optimizer  # noqa: E402
from ptx_sim import Machine  # noqa: E402

PTXAS = find_ptxas()


def _run(lw: fg.Lowered, module: DeviceModule, entry: str, feed: dict[str, np.ndarray],
         params: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The results of plan ``entry`` run in ``ptx_sim`` (arenas start as NaN)."""
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    machine = Machine(module, elem)
    for name, value in feed.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    for name, value in (params or {}).items():
        _, offset, n = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        machine.array("param")[offset:offset + n] = value.ravel()
    plan = module.plans[entry]
    machine.run_plan(plan)
    return {key.split(":", 1)[1]: machine.array(arena)[offset:offset + math.prod(shape)]
            .reshape(shape).copy() for key, (arena, offset, shape) in plan.results.items()}


def _unfused(lw: fg.Lowered) -> DeviceModule:
    """The module with every kernel of the schedules as it is (no row or window chains)."""
    shapes = {k: lw.graph.node(v).shape for k, v in lw.graph.results().items()}
    return render_ptx(lw.schedules, lw.memory_plan, result_shapes=shapes, row_chains=False,
                      window_chains=False)


def _between_gemms(module: DeviceModule, entry: str, mnk: tuple[int, int, int]
                   ) -> list[list[str]]:
    """The kernels launched after each GEMM of sizes ``mnk``, up to the next GEMM."""
    out: list[list[str]] = []
    steps = module.plans[entry].steps
    for i, step in enumerate(steps):
        if isinstance(step, Gemm) and (step.m, step.n, step.k) == mnk:
            run = []
            for later in steps[i + 1:]:
                if isinstance(later, Gemm):
                    break
                assert isinstance(later, Launch)
                run.append(later.kernel)
            out.append(run)
    return out


# ---- the transformer benchmark ----------------------------------------------------------


@pytest.fixture(scope="module")
def transformer() -> tuple[fg.Lowered, DeviceModule]:
    w = GPU_BY_KEY["transformer"]
    lw = fg.lower(w.model, optimizer=fg_optimizer(w.opt), backend="cuda", **w.dims)
    return lw, lw.device_module("ptx", target="sm_90")


def test_transformer_softmax_is_one_launch(transformer: tuple) -> None:
    """Scores (a GEMM of T × T) to P·V: the five softmax kernels are one launch, forward
    and in training; in training it also stores e and sum, which the backward reads
    (exp's derivative is its output: the scaled scores and the max are not stored); the
    backward's row sum and elementwise kernel are one launch too."""
    lw, module = transformer
    scores, pv = (256, 256, 64), (256, 64, 256)  # Q K^T, and P V or P^T dO
    fwd, train = "forward_k10_matmul_mul_epilogue_rows", "train_k13_matmul_mul_epilogue_rows"

    assert _between_gemms(module, "forward", scores) == [[fwd]]
    # (identical kernels are emitted once: train's are named after grads')
    assert _between_gemms(module, "train", scores) == [["grads_k11_matmul_mul_epilogue_rows"],
                                                       []]
    assert ["grads_k74_reduce_rows"] in _between_gemms(module, "train", pv)  # dP -> dS
    (launch,) = [s for s in module.plans["forward"].steps
                 if isinstance(s, Launch) and s.kernel == fwd]
    assert len(launch.args) == 3  # scores, mask -> p: nothing else is stored
    (chain,) = [k for k in _kernels(lw, "forward") if k.name == fwd]
    assert isinstance(chain, RowChain) and len(chain.kernels) == 6  # the scaling, softmax
    assert [v.buffer for v in chain.stores] == ["t52"]
    (chain,) = [k for k in _kernels(lw, "train") if k.name == train]
    # e and sum: the backward reads them
    assert [v.buffer for v in chain.stores] == ["t50", "t51", "t52"]
    (back,) = [k for k in _kernels(lw, "train") if k.name == "train_k76_reduce_rows"]
    assert [v.buffer for v in back.stores] == ["t255"]
    # layer norms and the loss fuse too
    assert len(_kernels(lw, "train")) < len(lw.schedules[2].kernels) - 30


def _kernels(lw: fg.Lowered, entry: str) -> list:
    (s,) = [s for s in lw.schedules if s.entry == entry]
    return fuse_rows(s, lw.memory_plan)[0]


@pytest.mark.skipif(PTXAS is None, reason="no ptxas (pip install nvidia-cuda-nvcc)")
def test_transformer_ptx_assembles(transformer: tuple) -> None:
    assemble(transformer[1].source, "sm_90", PTXAS)


# ---- numbers, in the PTX interpreter ----------------------------------------------------


@pytest.mark.parametrize("length", [7, 32, 45, 256, 300])
def test_softmax_rows_match_numpy(length: int) -> None:
    """Softmax over [3, 5, length] with -inf entries (a third of a row; a whole row:
    NaN, as NumPy) is one launch and gives NumPy's values; rows over 32 the bits of the
    unfused kernels (the same order of additions: lanes, then the butterfly)."""

    @fg.model
    def softmax(x: fg.f32[3, 5, length]):
        return {"p": fg.softmax(x, axis=-1)}

    rng = np.random.default_rng(length)
    x = (rng.normal(size=(3, 5, length)) * 3).astype(np.float32)
    x[0, 1, ::3] = -np.inf
    x[1, 2, :] = -np.inf
    lw = fg.lower(softmax, backend="cuda")
    module = lw.device_module("ptx")
    assert [step.kernel for step in module.plans["forward"].steps] == ["forward_k00_reduce_rows"]
    got = _run(lw, module, "forward", {"x": x})["p"]
    ref = fg.lower(softmax, backend="numpy").compile().forward(x=x)["p"]
    masked = np.isnan(got).all(-1)
    assert masked[1, 2] and masked.sum() == 1 and not np.isnan(got[~masked]).any()
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    unfused = _unfused(lw)
    assert len(unfused.plans["forward"].steps) >= 4
    if length > 32:
        np.testing.assert_array_equal(got, _run(lw, unfused, "forward", {"x": x})["p"])


@pytest.mark.parametrize("n", [128, 1000])
def test_mean_loss_is_one_launch(n: int) -> None:
    """A loss that reduces everything and then scales the scalar (``-mean``) is one row
    chain, the whole vector its row: one launch instead of two, the unfused bits."""

    @fg.model
    def mean_loss(x: fg.f32[n]):
        return -fg.mean(x * x)

    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    lw = fg.lower(mean_loss, backend="cuda")
    module = lw.device_module("ptx")
    assert [step.kernel for step in module.plans["forward"].steps] == ["forward_k00_reduce_rows"]
    (got,) = _run(lw, module, "forward", {"x": x}).values()
    np.testing.assert_allclose(got, -np.mean(x.astype(np.float64) ** 2), rtol=1e-6)
    unfused = _unfused(lw)
    assert len(unfused.plans["forward"].steps) == 2
    (ref,) = _run(lw, unfused, "forward", {"x": x}).values()
    np.testing.assert_array_equal(got, ref)


T = 40
CAUSAL = np.tril(np.ones((T, T), dtype=bool))


@fg.model
def attention(x: fg.f32[2, T, 16]):
    def heads(t: fg.Tensor) -> fg.Tensor:
        return t.reshape(2, T, 2, 8).transpose(0, 2, 1, 3)

    q, k, v = (heads(fg.nn.linear(x, 16, name=n)) for n in "qkv")
    scores = fg.where(fg.constant(CAUSAL), (q @ k.transpose(0, 1, 3, 2)) * 0.35, -1e9)
    return ((fg.softmax(scores, axis=-1) @ v) ** 2).sum()


def test_attention_grads_match_numpy() -> None:
    """Attention as the benchmark has it (causal mask, softmax between GEMMs): the
    gradients' plan fuses the forward softmax (storing what the backward reads) and the
    backward's row sum with its elementwise kernel, and gives NumPy's gradients."""
    lw = fg.lower(attention, optimizer=fg.optim.SGD(lr=0.1), backend="cuda")
    module = lw.device_module("ptx")
    fused = [k for k in _kernels(lw, "grads") if isinstance(k, RowChain)]
    # scaling + softmax (the max's stop_gradient fused into exp: exp's derivative reads
    # e, so nothing else needs the max); dP -> dS
    assert [len(k.kernels) for k in fused] == [5, 2]
    assert len(fused[0].stores) == 3  # e, its sum and p
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, T, 16)).astype(np.float32)
    step = fg.lower(attention, optimizer=fg.optim.SGD(lr=0.1), backend="numpy").compile()
    ref = step.grads(x=x)
    got = _run(lw, module, "grads", {"x": x}, step.params)
    assert sorted(got) == sorted(ref)
    scale = max(float(np.abs(v).max()) for v in ref.values())  # the q bias's are ~0
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5 * scale)
    unfused = _run(lw, _unfused(lw), "grads", {"x": x}, step.params)
    for name in ref:
        np.testing.assert_array_equal(got[name], unfused[name])


def test_intermediate_read_outside_is_stored() -> None:
    """The row max is also a result: the chain still fuses, and stores it."""

    @fg.model
    def both(x: fg.f32[6, 50]):
        return {"p": fg.softmax(x, axis=-1), "m": x.max(axis=-1)}

    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    lw = fg.lower(both, backend="cuda")
    (chain,) = [k for k in _kernels(lw, "forward") if isinstance(k, RowChain)]
    assert len(chain.stores) == 2
    got = _run(lw, lw.device_module("ptx"), "forward", {"x": x})
    ref = fg.lower(both, backend="numpy").compile().forward(x=x)
    for key in ("p", "m"):
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-6, atol=1e-7)


def test_row_value_read_through_another_view_is_not_fused() -> None:
    """y[a, b] = exp(x[a, b] - m[b, a]) reads another row's max (a row value, but not
    this row's): no chain; nor w = exp(z - m) over [6, 6], not the rows' iteration space."""

    @fg.model
    def crossed(x: fg.f32[6, 6, 40], z: fg.f32[6, 6]):
        m = x.max(axis=-1, keepdims=True)
        return {"y": fg.exp(x - m.transpose(1, 0, 2)), "w": fg.exp(z - m.reshape(6, 6))}

    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 6, 40)).astype(np.float32)
    z = rng.normal(size=(6, 6)).astype(np.float32)
    lw = fg.lower(crossed, backend="cuda")
    assert not any(isinstance(k, RowChain) for k in _kernels(lw, "forward"))
    got = _run(lw, lw.device_module("ptx"), "forward", {"x": x, "z": z})
    ref = fg.lower(crossed, backend="numpy").compile().forward(x=x, z=z)
    for key in ("y", "w"):
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-6)


# ---- the memory plan ---------------------------------------------------------------------


def _view(buf: str, shape: tuple[int, ...], strides: tuple[int, ...] | None = None) -> View:
    return View(buf, "f32", 0, shape, strides if strides is not None else row_major(shape))


def _chain_schedule(out_shape: tuple[int, ...]) -> Schedule:
    """s = sum(x, -1); y = x / s over [4, 64], y (or a row value) read after the chain."""
    rows, full = (4, 1), (4, 64)
    x0, x1 = sp.symbols("x0 x1")
    reduce = Reduce("k0_reduce", ["reduce_sum"], full, (1,), "sum", {"x0": _view("t0", full)},
                    x0, _view("t1", rows))
    if out_shape == full:
        div = Elementwise("k1_div", ["div"], full, {"x0": _view("t0", full),
                                                    "x1": _view("t1", full, (1, 0))},
                          [(_view("t2", full), x0 / x1)])
    else:
        div = Elementwise("k1_inv", ["div"], rows, {"x1": _view("t1", rows)},
                          [(_view("t2", rows), 1 / x1)])
    buffers = {n: Buffer(n, "temp", "f32", size) for n, size in
               [("t0", 256), ("t1", 4), ("t2", math.prod(out_shape))]}
    return Schedule("forward", [reduce, div], buffers, {"out:y": "t2"})


@pytest.mark.parametrize(("out_shape", "t2_at", "fused"), [
    ((4, 64), 0, True),  # y in place of x, element for element: each lane loads, then stores
    ((4, 64), 16, False),  # y over x shifted: a warp would overwrite another's row
    ((4, 1), 0, False),  # a row value over x's first elements
    ((4, 1), 256, True),  # apart
])
def test_stores_over_loaded_memory(out_shape: tuple, t2_at: int, fused: bool) -> None:
    """The memory plan lets a temp whose last reader is in the chain share memory with
    one the chain writes later; one kernel over all rows may then store over elements
    another warp has yet to load. Only an in-place whole-row store is safe."""
    s = _chain_schedule(out_shape)
    plan = MemoryPlan(temps={"forward": {"t0": Placement(0, 256, 0, 1), "t1": Placement(
        512, 4, 0, 1), "t2": Placement(t2_at, math.prod(out_shape), 1, 2)}})
    kernels, log = fuse_rows(s, plan)
    assert any(isinstance(k, RowChain) for k in kernels) == fused, log
    if not fused:
        assert "shares memory" in log[0]
