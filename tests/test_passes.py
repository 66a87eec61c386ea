"""Each rewrite pass alone on small hand-made graphs, then the pipeline and its debug checks.

Every test interprets the graph before and after the pass and requires the same
results: a pass may only change how a graph computes, never what.
"""

from collections import Counter

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.ir import passes
from ferrograd.ir.builder import Var, apply, building, constant
from ferrograd.ir.passes import constant_fold as fold
from ferrograd.ir.passes import cse, dce, simplify


def ops(graph: fg.Graph) -> Counter:
    return Counter(graph.node(n).op for n in graph.nx.nodes)


def feed_for(graph: fg.Graph, seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)

    def draw(nid):
        n = graph.node(nid)
        if n.dtype == "i32":
            return rng.integers(0, graph.index_bounds.get(n.name, 3), n.shape).astype(np.int32)
        return rng.normal(size=n.shape).astype(np.float32)

    return ({k: draw(v) for k, v in graph.inputs.items()},
            {k: draw(v) for k, v in graph.params.items()},
            {k: np.abs(draw(v)) for k, v in graph.state.items()})


def assert_same_results(before: fg.Graph, after: fg.Graph, seed: int = 0) -> None:
    feed = feed_for(before, seed)
    want = fg.interpret(before, *feed)
    got = fg.interpret(after, *feed)
    assert set(want) == set(got)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def run_pass(pass_fn, graph: fg.Graph) -> fg.Graph:
    """Apply a pass; check it validates, keeps results, and leaves its input alone."""
    n_before, ops_before = len(graph), ops(graph)
    out = pass_fn(graph)
    assert out is not graph
    assert len(graph) == n_before and ops(graph) == ops_before
    out.validate()
    assert_same_results(graph, out)
    return out


def input_node(g: fg.Graph, name: str, shape: tuple, dtype: str = "f32") -> Var:
    g.inputs[name] = g.add("input", (), {"shape": shape, "dtype": dtype}, name=name)
    g.input_dims[name] = shape
    return Var(g, g.inputs[name])


def param_node(g: fg.Graph, name: str, shape: tuple) -> Var:
    g.params[name] = g.add("param", (), {"shape": shape, "dtype": "f32", "init": "normal",
                                         "init_args": {}}, name=name)
    return Var(g, g.params[name])


def state_node(g: fg.Graph, name: str, shape: tuple) -> Var:
    g.state[name] = g.add("state", (), {"shape": shape, "dtype": "f32", "init": "zeros",
                                        "init_args": {}}, name=name)
    return Var(g, g.state[name])


# ---- dce -----------------------------------------------------------------------------------


def test_dce_removes_dead_nodes_and_keeps_the_interface():
    g = fg.Graph("dead")
    x = input_node(g, "x", (3,))
    input_node(g, "unused_input", (2,))
    p = param_node(g, "p", (3,))
    param_node(g, "unused_param", (4,))
    s = state_node(g, "s", (3,))
    live = (x * p).sum()
    dead = apply("exp", x) + p                     # a chain nothing reads
    dead_too = (dead * 3.0).sum()
    g.outputs["out"] = live.id
    g.updates["s"] = (s * 0.5 + x).id              # updates are results too
    out = run_pass(dce, g)
    assert dead.id not in out and dead_too.id not in out
    assert "exp" not in ops(out)
    for table in ("inputs", "params", "state"):
        assert getattr(out, table) == getattr(g, table)
        assert all(n in out for n in getattr(out, table).values())
    assert live.id in out and out.updates["s"] in out
    assert len(out) == len(g) - 5                   # exp, add, const 3, mul, sum


def test_dce_keeps_gradients_and_is_idempotent():
    graph = fg.grad(fg.trace(_mlp, B=4))
    once = run_pass(dce, graph)
    twice = dce(once)
    assert len(twice) == len(once)
    assert set(once.grads) == set(graph.grads)


# ---- cse -----------------------------------------------------------------------------------


def test_cse_merges_duplicate_subexpressions():
    g = fg.Graph("dup")
    x = input_node(g, "x", (2, 3))
    a = apply("exp", x) * 2.0                       # two consts 2.0, two exps, two muls
    b = apply("exp", x) * 2.0
    c = (a + b).sum(0) + (a + b).sum(0)
    g.outputs["out"] = c.sum().id
    assert ops(g)["exp"] == 2 and ops(g)["mul"] == 2
    out = run_pass(cse, g)
    counts = ops(out)
    assert counts["exp"] == 1 and counts["mul"] == 1 and counts["reduce_sum"] == 2
    assert counts["add"] == 2                       # a + b once, then the outer add
    assert counts["const"] == 1


def test_cse_keeps_nodes_that_differ():
    g = fg.Graph("distinct")
    x = input_node(g, "x", (2, 3))
    p = param_node(g, "p", (2, 3))
    q = param_node(g, "q", (2, 3))                 # same shape, but another param
    terms = [x.sum(0).sum(), x.sum(1).sum(),         # other attrs
             (x * 2.0).sum(), (x * 3.0).sum(),       # other constant values
             (x * p).sum(), (x * q).sum(),           # other sources
             (x - p).sum(), (p - x).sum()]           # argument order matters
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    g.outputs["out"] = total.id
    out = run_pass(cse, g)
    assert len(out) == len(g)
    assert set(out.params) == {"p", "q"}


# ---- constant folding ---------------------------------------------------------------------


@fg.model
def _with_constants(x: fg.f32["B", 4]):
    c = fg.constant(np.arange(4.0, dtype=np.float32))
    d = fg.exp(c * 0.5) * 2.0 + 1.0                # constants only: folds to one const
    e = fg.exp(x) * c                              # reads an input: stays
    return {"loss": (x * d).sum() + e.sum(), "d": d}


def test_constant_fold_folds_constant_only_subgraphs():
    g = fg.trace(_with_constants, B=2)
    out = run_pass(fold, g)
    counts = ops(out)
    assert counts["exp"] == 1                      # only exp(x) is left
    d = out.node(out.outputs["d"])
    assert d.op == "const"
    want = (np.exp(np.arange(4.0, dtype=np.float32) * np.float32(0.5)) * np.float32(2)
            + np.float32(1))
    np.testing.assert_allclose(d.attrs["value"], want, rtol=1e-6)
    assert d.attrs["value"].dtype == np.float32
    assert len(out) < len(g) - 4


def test_constant_fold_leaves_large_and_input_dependent_nodes():
    g = fg.Graph("big")
    x = input_node(g, "x", (3,))
    big = apply("exp", constant(g, np.ones(passes.FOLD_LIMIT + 1, np.float32)))
    small = apply("exp", constant(g, np.ones(3, np.float32)))
    g.outputs["out"] = (big.sum() + (x * small).sum()).id
    out = run_pass(fold, g)
    assert ops(out)["exp"] == 1
    assert big.id in out and small.id not in out


def test_constant_fold_handles_int_and_bool_constants():
    g = fg.Graph("ints")
    x = input_node(g, "x", (4,))
    idx = constant(g, np.arange(4, dtype=np.int32))
    mask = idx > 1                                  # bool, constant
    g.outputs["out"] = apply("where", mask, x, x * 0.0).sum().id
    out = run_pass(fold, g)
    folded = [out.node(n) for n in out.nx.nodes if out.node(n).dtype == "bool"]
    assert len(folded) == 1 and folded[0].op == "const"
    np.testing.assert_array_equal(folded[0].attrs["value"], [False, False, True, True])


# ---- simplify ------------------------------------------------------------------------------


def simplify_graph(build, shape=(2, 3)) -> tuple[fg.Graph, fg.Graph]:
    g = fg.Graph("s")
    x = input_node(g, "x", shape)
    g.outputs["out"] = build(x).id
    return g, run_pass(simplify, g)


@pytest.mark.parametrize("build, gone", [
    (lambda x: x * 1.0, "mul"),
    (lambda x: 1.0 * x, "mul"),
    (lambda x: x / 1.0, "div"),
    (lambda x: x + 0.0, "add"),
    (lambda x: 0.0 + x, "add"),
    (lambda x: x - 0.0, "sub"),
    (lambda x: x ** 1.0, "pow"),
    (lambda x: apply("neg", apply("neg", x)), "neg"),
    (lambda x: x.reshape(2, 3), "reshape"),
    (lambda x: x.transpose(0, 1), "transpose"),
    (lambda x: apply("cast", x, dtype="f32"), "cast"),
], ids=["x*1", "1*x", "x/1", "x+0", "0+x", "x-0", "x**1", "--x", "reshape_noop",
        "transpose_noop", "cast_noop"])
def test_simplify_removes_identities(build, gone):
    g, out = simplify_graph(lambda x: build(fg.tanh(x)))
    assert ops(g)[gone] >= 1
    assert ops(out)[gone] == 0
    # the output is now the tanh itself
    assert out.node(out.outputs["out"]).op == "tanh"


def test_simplify_rewrites_square_as_a_product():
    _, out = simplify_graph(lambda x: fg.exp(x) ** 2.0)
    assert ops(out)["pow"] == 0
    result = out.node(out.outputs["out"])
    assert result.op == "mul" and result.args[0] == result.args[1]
    assert out.node(result.args[0]).op == "exp"


def test_simplify_merges_reshape_chains():
    g, out = simplify_graph(lambda x: x.reshape(3, 2).reshape(6).reshape(1, 6), (2, 3))
    assert ops(g)["reshape"] == 3
    result = out.node(out.outputs["out"])
    assert result.op == "reshape" and result.shape == (1, 6)
    assert out.node(result.args[0]).op == "input"


@pytest.mark.parametrize("p1, p2", [((1, 2, 0), (2, 0, 1)), ((1, 0, 2), (0, 2, 1)),
                                    ((2, 1, 0), (1, 2, 0))])
def test_simplify_composes_transposes(p1, p2):
    g, out = simplify_graph(lambda x: x.transpose(*p1).transpose(*p2), (2, 3, 4))
    again = simplify(out)  # an identity composition disappears on the next round
    assert_same_results(g, again)
    composed = tuple(p1[p] for p in p2)
    if composed == (0, 1, 2):
        assert ops(again)["transpose"] == 0
    else:
        assert ops(out)["transpose"] == 1
        assert out.node(out.outputs["out"]).attrs["perm"] == composed


@pytest.mark.parametrize("build", [
    lambda x: x * 2.0,
    lambda x: x + 1.0,
    lambda x: x * fg.constant(np.array([1.0, 1.0, 2.0], np.float32)),
    lambda x: x ** 3.0,
    lambda x: 0.0 - x,
    lambda x: 1.0 / x,
], ids=["x*2", "x+1", "x*[1,1,2]", "x**3", "0-x", "1/x"])
def test_simplify_leaves_non_identities_alone(build):
    g = fg.Graph("s")
    x = input_node(g, "x", (2, 3))
    with building(g):
        g.outputs["out"] = build(fg.exp(x)).id
    out = run_pass(simplify, g)
    assert ops(out) == ops(g)


def test_simplify_keeps_a_broadcasting_identity():
    """x + zeros((2, 3)) with x of shape (3,) changes the shape: it must stay."""
    g = fg.Graph("bcast")
    x = input_node(g, "x", (3,))
    g.outputs["out"] = (x + constant(g, np.zeros((2, 3), np.float32))).id
    g.outputs["other"] = (constant(g, np.ones((2, 3), np.float32)) * x).id
    out = run_pass(simplify, g)
    assert ops(out)["add"] == 1 and ops(out)["mul"] == 1
    assert out.node(out.outputs["out"]).shape == (2, 3)


def test_simplify_runs_all_rules_on_one_chain():
    def chain(x):
        y = apply("neg", apply("neg", fg.exp(x) * 1.0 + 0.0)) ** 2.0
        return y.reshape(3, 2).reshape(6).transpose(0)

    g, out = simplify_graph(chain)
    final = out
    for _ in range(3):
        final = simplify(final)
    assert_same_results(g, final)
    counts = ops(final)
    assert counts["neg"] == 0 and counts["pow"] == 0 and counts["add"] == 0
    assert counts["mul"] == 1 and counts["reshape"] == 1 and counts["transpose"] == 0


# ---- the pipeline ---------------------------------------------------------------------------


@fg.model
def _mlp(x: fg.f32["B", 5], y: fg.i32["B"]):
    h = fg.tanh(fg.nn.linear(x, 6))
    return fg.cross_entropy(fg.nn.linear(h, 3, name="head"), y)


def test_pipeline_lists_the_passes():
    names = [name for name, _ in passes.PIPELINE]
    assert {"dce", "cse", "constant_fold", "simplify"} <= set(names)
    assert len(set(names)) == len(names)


def test_optimize_shrinks_a_training_graph_and_keeps_its_results():
    graph = fg.optim.Adam(lr=0.1).apply(fg.grad(fg.trace(_mlp, B=4)))
    out = passes.optimize(graph)
    out.validate()
    assert len(out) < len(graph)
    for seed in range(3):
        assert_same_results(graph, out, seed)


def test_debug_level_4_compares_every_pass_on_random_inputs(monkeypatch):
    calls = []
    real = passes.compare_on_random_inputs

    def spy(before, after, name):
        calls.append(name)
        real(before, after, name)

    monkeypatch.setattr(passes, "compare_on_random_inputs", spy)
    monkeypatch.setenv("FERROGRAD_DEBUG", "4")
    lowered = fg.lower(_mlp, optimizer=fg.optim.Adam(lr=0.1), backend="numpy", B=4)
    assert set(calls) == {name for name, _ in passes.PIPELINE}
    step = lowered.compile()
    x = np.ones((4, 5), np.float32)
    assert np.isfinite(step(x, np.array([0, 1, 2, 0], np.int32)))


def test_debug_level_4_catches_a_pass_that_changes_results(monkeypatch):
    def broken(graph):
        """Turn every tanh into a sigmoid: a valid graph that computes something else."""
        g = graph.copy()
        for nid in g.topo_order():
            n = g.node(nid)
            if n.op == "tanh":
                g.replace_uses(nid, apply("sigmoid", Var(g, n.args[0])).id)
        return dce(g)

    monkeypatch.setattr(passes, "PIPELINE", [*passes.PIPELINE, ("broken", broken)])
    monkeypatch.setenv("FERROGRAD_DEBUG", "0")
    fg.lower(_mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=4)  # unnoticed
    monkeypatch.setenv("FERROGRAD_DEBUG", "4")
    with pytest.raises(fg.IRError, match="broken"):
        fg.lower(_mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=4)


def test_debug_level_1_validates_after_every_pass(monkeypatch):
    def corrupt(graph):
        g = graph.copy()
        nid = next(n for n in g.topo_order() if g.node(n).op == "tanh")
        g.nx.nodes[nid]["shape"] = (1, 1)            # the recorded shape is now a lie
        return g

    monkeypatch.setattr(passes, "PIPELINE", [*passes.PIPELINE, ("corrupt", corrupt)])
    monkeypatch.setenv("FERROGRAD_DEBUG", "1")
    with pytest.raises(fg.IRError, match="tanh"):
        fg.lower(_mlp, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=4)


def test_debug_level_3_prints_the_graph_after_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("FERROGRAD_DEBUG", "3")
    fg.lower(_mlp, backend="numpy", B=4)
    err = capsys.readouterr().err
    for name, _ in passes.PIPELINE:
        assert f"--- after {name}" in err
    assert "graph _mlp" in err
