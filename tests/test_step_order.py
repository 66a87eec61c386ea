"""Which steps of a launch plan wait for which (``DevicePlan.after``), without a GPU.

The CUDA runtime captures each entry point's steps as a graph in which a step waits
only for the steps ``after`` names, so independent ones run at once. A missing edge
would let a step read memory before it is written, or overwrite it before it is read.

- ``step_dependencies`` on hand-made accesses: read after write, write after read and
  write after write wait, two reads do not; implied edges are dropped; a chained step
  waits for the one before; a step whose memory is unknown waits for all.
- Every catalog example's plans give each step its waits, all on earlier steps, and
  no step of theirs falls back to waiting for everything.
- In ``ptx_sim``, the steps run in the most reordered order ``after`` allows (the
  ready step listed last first) and in a random one, and leave every byte of device
  memory as list order does.
"""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.codegen.launch_plan import (
    Access,
    DeviceModule,
    DevicePlan,
    Gemm,
    Span,
    everything,
    step_dependencies,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples")]
from catalog import MODELS, lowered  # noqa: E402
from ptx_sim import Machine  # noqa: E402
from test_ptx_horizontal import small  # noqa: E402  (linear, layer norm, gelu, softmax)


def span(arena: str, start: int, stop: int) -> list[Span]:
    return [Span(arena, start, stop)]


def test_steps_wait_for_the_memory_they_share() -> None:
    a, b, c = span("temp_f32", 0, 8), span("temp_f32", 8, 16), span("temp_f32", 4, 12)
    steps = [
        Access(writes=a),  # 0
        Access(writes=b),  # 1: elsewhere, so at once
        Access(reads=a, writes=span("param", 0, 4)),  # 2: read after write of 0
        Access(reads=a + b),  # 3: reads both; two reads never wait on each other
        Access(writes=c),  # 4: writes what 2 and 3 read, and 0 and 1 wrote
        Access(reads=span("temp_f32", 16, 20)),  # 5: nothing before touches it
        Access(writes=span("param", 2, 3)),  # 6: write after write of 2 (overlap)
    ]
    assert step_dependencies(steps) == [(), (), (0,), (0, 1), (2, 3), (), (2,)]


def test_implied_edges_are_dropped_and_chains_kept() -> None:
    x = span("temp_f32", 0, 4)
    steps = [Access(writes=x), Access(reads=x, writes=span("t", 0, 1)),
             Access(reads=x + span("t", 0, 1)),  # waits for 1, so for 0 through it
             Access(reads=span("u", 0, 1), chained=True)]  # only the step before
    assert step_dependencies(steps) == [(), (0,), (1,), (2,)]


def test_a_step_of_unknown_memory_waits_for_all_and_all_for_it() -> None:
    steps = [Access(writes=span("a", 0, 1)), Access(writes=span("b", 0, 1)), everything(),
             Access(reads=span("c", 5, 6))]
    assert step_dependencies(steps) == [(), (), (0, 1), (2,)]


def _plans(module: DeviceModule) -> list[DevicePlan]:
    return list(module.plans.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_example_plans_order_every_step_by_its_memory(name: str, monkeypatch) -> None:
    import ferrograd.codegen.backends.ptx as ptx

    unknown = []

    def no_fallback():  # what ``_access`` returns for an address outside its kernel
        unknown.append(1)
        return everything()

    monkeypatch.setattr(ptx, "everything", no_fallback)
    module = lowered(name).device_module("ptx")
    assert not unknown, f"{len(unknown)} steps of {name} touch memory their kernel does not"
    for plan in _plans(module):
        assert len(plan.after) == len(plan.steps)
        assert all(all(j < i for j in waits) for i, waits in enumerate(plan.after))
        assert all(list(waits) == sorted(set(waits)) for waits in plan.after)


def test_an_mlp_step_branches_where_its_gradients_do() -> None:
    """The head's weight update and the bias gradients need not wait for the first
    layer's input gradient; the first layer's weight update does."""
    @fg.model
    def mlp(x: fg.f32["B", 24], y: fg.i32["B"]):
        h = fg.relu(fg.nn.linear(x, 32, name="fc1"))
        h = fg.relu(fg.nn.linear(h, 32, name="fc2"))
        return fg.cross_entropy(fg.nn.linear(h, 5, name="head"), y)

    lw = fg.lower(mlp, optimizer=fg.optim.SGD(lr=0.1), backend="cuda", B=64)
    plan = lw.device_module().plans["train"]
    gemms = {(s.m, s.n, s.k, s.beta): i for i, s in enumerate(plan.steps)
             if isinstance(s, Gemm)}
    ancestors: list[set[int]] = []
    for waits in plan.after:
        ancestors.append(set(waits).union(*(ancestors[j] for j in waits)))
    d_h1 = gemms[(64, 32, 32, 0.0)]  # the one input gradient of that shape: dh1 = dh2 W2ᵀ
    w1_update, head_update = gemms[(24, 32, 64, 1.0)], gemms[(32, 5, 64, 1.0)]
    assert d_h1 in ancestors[w1_update]
    assert d_h1 not in ancestors[head_update]
    longest = [0] * len(plan.after)
    for i, waits in enumerate(plan.after):
        longest[i] = 1 + max((longest[j] for j in waits), default=0)
    assert max(longest) < len(plan.steps)  # some steps run beside others


# ---- reordered runs in the PTX interpreter ----------------------------------------------


def _reordered(after: list[tuple[int, ...]], pick) -> list[int]:
    """A topological order of the steps: ``pick`` chooses among the ready ones."""
    waiting = [set(w) for w in after]
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(after):
        ready = [i for i in range(len(after)) if i not in done and waiting[i] <= done]
        i = pick(ready)
        order.append(i)
        done.add(i)
    return order


@fg.model
def convnet(x: fg.f32[2, 1, 8, 8], y: fg.i32[2]):
    h = fg.relu(fg.nn.conv2d(x, 4, 3, padding=1, name="conv"))
    h = fg.max_pool2d(h, 2)
    return fg.cross_entropy(fg.nn.linear(h.reshape(2, 64), 3, name="head"), y)


def _catalog(name: str, gemm: str) -> tuple:
    model, optimizer, dims = MODELS[name]()
    return model, optimizer, dims, gemm


@pytest.mark.parametrize("model, optimizer, dims, gemm", [
    (small, fg.optim.Adam(lr=1e-2), {}, "fallback"),
    (small, fg.optim.SGD(lr=0.1), {}, "tiled"),
    (convnet, fg.optim.SGD(lr=0.1, momentum=0.9), {}, "numpy"),
    _catalog("rnn", "fallback"),
    _catalog("transformer", "fallback"),  # gathers, scatters, two batch levels
], ids=["small-adam", "small-sgd-tiled", "convnet", "rnn", "transformer"])
def test_reordered_steps_leave_the_same_bytes(model, optimizer, dims, gemm: str) -> None:
    lw = fg.lower(model, optimizer=optimizer, backend="cuda", **dims)
    module = lw.device_module()
    step = fg.lower(model, optimizer=optimizer, backend="numpy", **dims).compile()
    graph = step.graph
    rng = np.random.default_rng(3)
    feed, elem = {}, {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        arena = f"input:{name}"
        if node.dtype == "i32":
            bound = graph.index_bounds.get(name, 3)
            feed[arena] = rng.integers(0, bound, node.shape, dtype=np.int32)
        else:
            feed[arena] = rng.normal(size=node.shape).astype(np.float32)
        elem[arena] = node.dtype
    for a in module.arena_sizes:
        elem.setdefault(a, "f32" if a in ("param", "state") else a.rsplit("_", 1)[-1])

    def run(order_of) -> list[np.ndarray]:
        machine = Machine(module, elem, gemm=gemm)
        for arena, value in feed.items():
            if arena in module.arena_sizes:
                machine.array(arena)[:] = value.ravel()
        if "state" in module.arena_sizes:
            machine.array("state")[:] = 0
        for name, value in step.params.items():
            _, offset, n = lw.memory_plan.persistent["param_" + name.replace(".", "_")]
            machine.array("param")[offset:offset + n] = value.ravel()
        heaps = []
        for entry in ("forward", "grads", "train"):
            plan = module.plans[entry]
            machine.run_plan(plan, order_of(plan))
            heaps.append(machine.heap.copy())
        return heaps

    listed = run(lambda plan: None)
    latest_first = run(lambda plan: _reordered(plan.after, max))
    shuffle = random.Random(5)
    shuffled = run(lambda plan: _reordered(plan.after, shuffle.choice))
    for entry, a, b, c in zip(("forward", "grads", "train"), listed, latest_first, shuffled,
                              strict=True):
        assert a.tobytes() == b.tobytes(), f"{entry}: latest-first order differs"
        assert a.tobytes() == c.tobytes(), f"{entry}: a random order differs"
    plan = module.plans["train"]
    assert _reordered(plan.after, max) != list(range(len(plan.steps)))  # it did reorder
