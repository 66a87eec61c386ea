"""One launch for independent elementwise kernels on the PTX backend
(``ptx_horizontal.py``): the optimizer's per-parameter updates.

- The transformer and MLP benchmarks' train plans run their elementwise updates in one
  or two launches.
- Kernels that depend on each other (one reads what another writes, or writes memory
  the plan lets another's temp share, or a kernel in between that a member would move
  past) do not merge.
- In the PTX interpreter (``ptx_sim``) a train step (Adam and SGD) gives the bits of the
  unmerged kernels, and NumPy's values.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import ferrograd as fg
from ferrograd.codegen.backends.ptx import assemble, find_ptxas, render_ptx
from ferrograd.codegen.backends.ptx_horizontal import Horizontal, merge_launches
from ferrograd.codegen.backends.ptx_rows import fuse_rows
from ferrograd.codegen.kernel_ir import Buffer, Elementwise, Reduce, View, row_major
from ferrograd.codegen.launch_plan import DeviceModule, Launch
from ferrograd.codegen.memory import MemoryPlan, Placement
from ferrograd.codegen.schedule import Schedule

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benches"), str(ROOT / "examples")]
from gpu_workloads import GPU_BY_KEY, fg_optimizer  # noqa: E402
from ptx_sim import Machine  # noqa: E402

PTXAS = find_ptxas()


def _lower(key: str) -> fg.Lowered:
    w = GPU_BY_KEY[key]
    return fg.lower(w.model, optimizer=fg_optimizer(w.opt), backend="cuda", **w.dims)


def _module(lw: fg.Lowered, merge: bool = True) -> DeviceModule:
    shapes = {k: lw.graph.node(v).shape for k, v in lw.graph.results().items()}
    return render_ptx(lw.schedules, lw.memory_plan, target="sm_90", result_shapes=shapes,
                      merge_launches=merge)


def _launches(module: DeviceModule, entry: str) -> list[str]:
    return [s.kernel for s in module.plans[entry].steps if isinstance(s, Launch)]


def _updates(lw: fg.Lowered, entry: str = "train") -> list[str]:
    """The schedule's elementwise kernels that write a param (the optimizer's updates)."""
    (s,) = [s for s in lw.schedules if s.entry == entry]
    return [k.name for k in s.kernels if isinstance(k, Elementwise)
            and any(s.buffers[v.buffer].kind == "param" for v in k.writes())]


def _device(lw: fg.Lowered, entry: str) -> list:
    (s,) = [s for s in lw.schedules if s.entry == entry]
    kernels, _ = fuse_rows(s, lw.memory_plan)
    return merge_launches(s, lw.memory_plan, kernels)[0]


# ---- the benchmarks' plans ---------------------------------------------------------------


def test_transformer_updates_are_two_launches() -> None:
    """Adam's 15 elementwise updates (biases, layer norms, embeddings) were 15 launches:
    now 2 (the GEMM steps' epilogues, the weights' updates, stay with their GEMMs)."""
    lw = _lower("transformer")
    updates = _updates(lw)
    assert len(updates) == 15
    merged = [k for k in _device(lw, "train") if isinstance(k, Horizontal)
              and any(m.name in updates for m in k.kernels)]
    assert sorted(m.name for k in merged for m in k.kernels) == sorted(updates)
    assert len(merged) <= 2
    plain, module = _launches(_module(lw, False), "train"), _launches(_module(lw), "train")
    assert len(module) <= len(plain) - 13
    if PTXAS is not None:
        assemble(_module(lw).source, "sm_90", PTXAS)


def test_mlp_updates_are_one_launch() -> None:
    """SGD on the MLP: the three bias updates are one launch, after the last GEMM."""
    lw = _lower("mlp128")
    updates = _updates(lw)
    assert len(updates) == 3
    kernels = _device(lw, "train")
    (merged,) = [k for k in kernels if isinstance(k, Horizontal)
                 and any(m.name in updates for m in k.kernels)]
    assert [m.name for m in merged.kernels] == updates
    assert kernels[-1] is merged
    assert len(_launches(_module(lw), "train")) == len(_launches(_module(lw, False),
                                                                 "train")) - 3


# ---- what must not merge -----------------------------------------------------------------

N = 64


def _view(buf: str) -> View:
    return View(buf, "f32", 0, (N,), row_major((N,)))


def _ew(name: str, reads: list[str], write: str) -> Elementwise:
    syms = sp.symbols(f"x0:{len(reads)}")
    inputs = {str(s): _view(b) for s, b in zip(syms, reads, strict=True)}
    return Elementwise(name, ["add"], (N,), inputs, [(_view(write), sum(syms, sp.Integer(1)))])


def _schedule(kernels: list, temps: dict[str, int]) -> tuple[Schedule, MemoryPlan]:
    """Kernels over [N] f32 buffers: ``p*`` params, ``c`` a const, the others temps at the
    given offsets of one arena."""
    names = {v.buffer for k in kernels for v in [*k.reads(), *k.writes()]}
    buffers = {n: Buffer(n, "param" if n.startswith("p") else "temp", "f32", N)
               for n in names}
    plan = MemoryPlan(temps={"train": {n: Placement(at, N, 0, 1) for n, at in temps.items()}},
                      persistent={n: ("param", N * i, N) for i, n in
                                  enumerate(sorted(n for n in names if n.startswith("p")))})
    return Schedule("train", kernels, buffers, {}), plan


def _merged(kernels: list, temps: dict[str, int]) -> list[list[str]]:
    s, plan = _schedule(kernels, temps)
    out, _ = merge_launches(s, plan, list(s.kernels))
    return [[m.name for m in k.kernels] if isinstance(k, Horizontal) else [k.name]
            for k in out]


def test_independent_updates_merge() -> None:
    ks = [_ew("a", ["pa", "ga"], "pa"), _ew("b", ["pb", "gb"], "pb"), _ew("c", ["pc", "ga"], "pc")]
    assert _merged(ks, {"ga": 0, "gb": 64}) == [["a", "b", "c"]]


def test_read_after_write_does_not_merge() -> None:
    """b reads what a writes (a temp; a param): two launches."""
    ks = [_ew("a", ["pa", "ga"], "t"), _ew("b", ["t", "gb"], "pb")]
    assert _merged(ks, {"ga": 0, "gb": 64, "t": 128}) == [["a"], ["b"]]
    ks = [_ew("a", ["pa", "ga"], "pa"), _ew("b", ["pa", "gb"], "pb")]
    assert _merged(ks, {"ga": 0, "gb": 64}) == [["a"], ["b"]]


def test_write_after_read_does_not_merge() -> None:
    """b overwrites what a reads: with one launch a block of b may run first."""
    ks = [_ew("a", ["pa", "ga"], "pa"), _ew("b", ["pb", "gb"], "ga")]
    assert _merged(ks, {"ga": 0, "gb": 64}) == [["a"], ["b"]]


def test_shared_memory_does_not_merge() -> None:
    """The plan gives b's output the bytes of a's input (a is its last reader): merged,
    b could store over what a has yet to load. Apart (or the other way round: b's
    output over a's output... overlapping too), they would merge."""
    ks = [_ew("a", ["pa", "ga"], "pa"), _ew("b", ["pb", "gb"], "tb")]
    assert _merged(ks, {"ga": 0, "gb": 64, "tb": 0}) == [["a"], ["b"]]
    assert _merged(ks, {"ga": 0, "gb": 64, "tb": 32}) == [["a"], ["b"]]  # partly
    assert _merged(ks, {"ga": 0, "gb": 64, "tb": 128}) == [["a", "b"]]


def test_no_move_past_a_dependency() -> None:
    """a would move down past r to b's position: r reads what a writes, or writes what a
    reads, or writes memory that a's input shares — a stays a launch of its own."""
    r = Reduce("r", ["reduce_sum"], (N,), (0,), "sum", {"x0": _view("ta")}, sp.Symbol("x0"),
               View("s", "f32", 0, (1,), (1,)))
    ks = [_ew("a", ["pa", "ga"], "ta"), r, _ew("b", ["pb", "gb"], "pb")]
    assert _merged(ks, {"ga": 0, "gb": 64, "ta": 128, "s": 256}) == [["a"], ["r"], ["b"]]
    r2 = Reduce("r", ["reduce_sum"], (N,), (0,), "sum", {"x0": _view("gb")}, sp.Symbol("x0"),
                View("s", "f32", 0, (1,), (1,)))
    ks = [_ew("a", ["pa", "ga"], "pa"), r2, _ew("b", ["pb", "gb"], "pb")]
    assert _merged(ks, {"ga": 0, "gb": 64, "s": 256}) == [["a", "b"], ["r"]] or \
        _merged(ks, {"ga": 0, "gb": 64, "s": 256}) == [["r"], ["a", "b"]]
    # r's output s shares the bytes of a's input ga (a its last reader in the old order)
    assert _merged(ks, {"ga": 0, "gb": 64, "s": 0}) == [["a"], ["r"], ["b"]]


# ---- numbers, in the PTX interpreter -----------------------------------------------------


@fg.model
def small(x: fg.f32[6, 12], y: fg.i32[6]):
    h = fg.relu(fg.nn.linear(x, 16, name="fc1"))
    h = fg.nn.layer_norm(h, name="ln")
    h = fg.gelu(fg.nn.linear(h, 40, name="fc2"))
    return fg.cross_entropy(fg.nn.linear(h, 5, name="head"), y)


def _train(lw: fg.Lowered, module: DeviceModule, feed: dict[str, np.ndarray],
           params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                   np.ndarray]:
    """Results, the param arena and the state arena after one train step in ptx_sim
    (state starts at 0, as the runtime's zeroed arena)."""
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    if "input:y" in elem:
        elem["input:y"] = "i32"
    machine = Machine(module, elem)
    for name, value in feed.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    if "state" in module.arena_sizes:
        machine.array("state")[:] = 0
    for name, value in params.items():
        _, offset, n = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        machine.array("param")[offset:offset + n] = value.ravel()
    plan = module.plans["train"]
    machine.run_plan(plan)
    results = {key: machine.array(arena)[offset:offset + math.prod(shape)].copy()
               for key, (arena, offset, shape) in plan.results.items()}
    state = machine.array("state").copy() if "state" in module.arena_sizes else np.zeros(0)
    return results, machine.array("param").copy(), state


@pytest.mark.parametrize("optimizer", [fg.optim.Adam(lr=1e-2), fg.optim.SGD(lr=0.1)])
def test_train_step_bits(optimizer) -> None:
    """A train step with the updates merged: the bits of the unmerged kernels (params,
    optimizer state, results), and NumPy's params."""
    lw = fg.lower(small, optimizer=optimizer, backend="cuda")
    module = _module(lw)
    assert any(isinstance(k, Horizontal) and len(k.kernels) >= 3
               for k in _device(lw, "train"))
    rng = np.random.default_rng(11)
    feed = {"x": rng.normal(size=(6, 12)).astype(np.float32),
            "y": rng.integers(0, 5, size=6).astype(np.int32)}
    step = fg.lower(small, optimizer=optimizer, backend="numpy").compile()
    params = step.params
    got, got_params, got_state = _train(lw, module, feed, params)
    ref, ref_params, ref_state = _train(lw, _module(lw, merge=False), feed, params)
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    np.testing.assert_array_equal(got_params, ref_params)
    np.testing.assert_array_equal(got_state, ref_state)
    step(**feed)  # one train step
    for name, value in step.params.items():
        _, offset, n = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
        np.testing.assert_allclose(got_params[offset:offset + n], value.ravel(),
                                   rtol=2e-5, atol=2e-6)
    if PTXAS is not None:
        assemble(module.source, "sm_90", PTXAS)
