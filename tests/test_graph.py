"""The graph before and after it moves into networkx: a traced graph keeps appended
nodes in a dict until something needs networkx, and must read the same either way."""

import networkx as nx
import numpy as np

import ferrograd as fg


@fg.model
def net(x: fg.f32["B", 4], y: fg.i32["B"]):
    h = fg.relu(fg.nn.linear(x, 8))
    h = h * h + fg.tanh(h)  # a node read twice by one user: a multigraph edge pair
    return fg.cross_entropy(fg.nn.linear(h, 3), y)


def snapshot(g: fg.Graph) -> list:
    return [(n.id, n.op, n.args, n.shape, n.dtype, n.name) for n in g.nodes()]


def test_appended_nodes_read_as_networkx_reads_them():
    g = fg.trace(net, B=5)
    assert g._nx is None  # tracing never needed networkx
    before = snapshot(g)
    order = g.topo_order()
    size = len(g)
    copied = g.copy()
    roots = list(g.outputs.values())
    plan = [n.id for n in g.plan(roots)]

    assert isinstance(g.nx, nx.MultiDiGraph)  # now it moves
    assert g._appended is None
    assert snapshot(g) == before and len(g) == size
    assert g.topo_order() == order == list(nx.lexicographical_topological_sort(g.nx))
    assert [n.id for n in g.plan(roots)] == plan
    g.validate()
    # The copy made before the move is independent of the graph and still appended.
    assert copied._nx is None and snapshot(copied) == before
    init = g.node(g.params["linear_0.weight"]).attrs["init"]
    copied.node(copied.params["linear_0.weight"]).attrs["init"] = "zeros"
    assert g.node(g.params["linear_0.weight"]).attrs["init"] == init != "zeros"


def test_a_graph_that_moved_computes_what_the_appended_one_does():
    g = fg.trace(net, B=5)
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(5, 4)).astype(np.float32),
            "y": rng.integers(0, 3, 5).astype(np.int32)}
    params = fg.init_params(g, 0)
    appended = fg.interpret(g, feed, params, {})["loss"]
    moved = g.copy()
    moved.nx  # noqa: B018  (the move is the point)
    np.testing.assert_array_equal(fg.interpret(moved, feed, params, {})["loss"], appended)
    grads = fg.grad(g)  # autodiff moves its own copy
    assert grads.grads.keys() == g.params.keys()
