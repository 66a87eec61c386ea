"""Reverse-mode autodiff on whole models, second derivatives, and which nodes get gradients.

Gradients are checked with ``fg.check_grads`` (float64 central differences along a
random direction per param); the Hessian-vector product is checked against finite
differences of the gradient itself.
"""

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.ir.builder import Var

RNG = np.random.default_rng(1234)


def normal(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def labels(n: int, classes: int) -> np.ndarray:
    return RNG.integers(0, classes, n).astype(np.int32)


def check(model, *inputs, seeds=(0, 1)) -> None:
    """check_grads at two inits; every param must get a non-trivial gradient."""
    for seed in seeds:
        report = fg.check_grads(model, *inputs, seed=seed)
        for name, (analytic, numeric) in report.items():
            assert abs(analytic) > 1e-7, f"{name}: gradient is ~0, the check would be vacuous"
            assert analytic == pytest.approx(numeric, rel=1e-5), name


# ---- composite models -------------------------------------------------------------------


@fg.model
def mlp(x: fg.f32["B", 6], y: fg.i32["B"]):
    h = fg.relu(fg.nn.linear(x, 8))
    h = fg.gelu(fg.nn.linear(h, 8))
    logits = fg.nn.linear(h, 4, name="head")
    return {"loss": fg.cross_entropy(logits, y), "logits": logits}


def test_mlp_with_cross_entropy():
    check(mlp, normal(5, 6), labels(5, 4))


@fg.model
def convnet(x: fg.f32["B", 2, 8, 8], y: fg.i32["B"]):
    h = fg.relu(fg.nn.conv2d(x, 3, 3, padding=1))              # (B, 3, 8, 8)
    h = fg.max_pool2d(h, 2)                                      # (B, 3, 4, 4): tiles
    h = fg.tanh(fg.nn.conv2d(h, 4, 2, stride=2, padding=1))     # (B, 4, 3, 3)
    h = fg.max_pool2d(h, 2, stride=1)                            # (B, 4, 2, 2): windows
    h = fg.avg_pool2d(h, 2)                                      # (B, 4, 1, 1)
    return fg.cross_entropy(fg.nn.linear(h.reshape(-1, 4), 3), y)


def test_conv_net():
    check(convnet, normal(2, 2, 8, 8), labels(2, 3))


@fg.model
def attention(x: fg.f32["B", 4, 8], target: fg.f32["B", 4, 8]):
    b, t, d, heads = 2, 4, 8, 2

    def split(z):  # (B, T, D) -> (B, heads, T, D / heads)
        return z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)

    # no bias on k: softmax cancels it, so its gradient is exactly zero
    q, k, v = (split(fg.nn.linear(x, d, name=n, bias=n != "k")) for n in ("q", "k", "v"))
    scores = (q @ k.mT) * (1.0 / np.sqrt(d // heads))
    causal = fg.constant(np.tril(np.ones((t, t), bool)))
    weights = fg.softmax(fg.where(causal, scores, -1e9), axis=-1)
    mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    h = fg.nn.layer_norm(x + fg.nn.linear(mixed, d, name="proj"), name="ln")
    return fg.mse(h, target)


def test_attention_block_with_softmax_and_layer_norm():
    check(attention, normal(2, 4, 8), normal(2, 4, 8))


@fg.model
def rnn(x: fg.f32["B", 5, 2], y: fg.i32["B"]):
    w_xh = fg.param("w_xh", (2, 6), init="kaiming")
    w_hh = fg.param("w_hh", (6, 6), init="normal", std=0.4)
    b_h = fg.param("b_h", (6,), init="normal", std=0.1)
    h = fg.tanh(x[:, 0, :] @ w_xh + b_h)
    states = [h]
    for t in range(1, 5):
        h = fg.tanh(x[:, t, :] @ w_xh + h @ w_hh + b_h)
        states.append(h)
    summary = fg.concat([h, fg.concat(states, axis=1)[:, ::6]], axis=1)  # (B, 6 + 5)
    return fg.cross_entropy(fg.nn.linear(summary, 3, name="head"), y)


def test_unrolled_rnn_with_slicing():
    check(rnn, normal(3, 5, 2), labels(3, 3))


@fg.model
def bag_of_words(ids: fg.i32["B", 3], y: fg.f32["B"]):
    e = fg.nn.embedding(ids, 7, 4, name="emb")                  # rows repeat: scatter-add
    score = fg.nn.linear(e.mean(1), 1, name="out").reshape(-1)
    return fg.binary_cross_entropy(fg.sigmoid(score), y)


def test_embedding_with_repeated_ids_and_binary_cross_entropy():
    ids = np.array([[1, 1, 2], [6, 1, 0], [3, 3, 3]], np.int32)
    check(bag_of_words, ids, np.array([1.0, 0.0, 1.0], np.float32))


# ---- second order ------------------------------------------------------------------------


@fg.model
def small(x: fg.f32["B", 3], y: fg.i32["B"]):
    h = fg.tanh(x @ fg.param("w", (3, 4)) + fg.param("b", (4,)))
    logits = fg.gelu(h) @ fg.param("v", (4, 3))
    return fg.cross_entropy(logits, y)


def with_hvp_output(graph: fg.Graph) -> fg.Graph:
    """grad(graph) plus inputs dir_<param> and the output s = sum_p <grad_p, dir_p>."""
    g = fg.grad(graph)
    s = None
    for name, pid in g.params.items():
        nid = g.add("input", (), {"shape": g.node(pid).shape, "dtype": "f32"},
                    name=f"dir_{name}")
        g.inputs[f"dir_{name}"] = nid
        term = (Var(g, g.grads[name]) * Var(g, nid)).sum()
        s = term if s is None else s + term
    g.outputs["s"] = s.id
    return g


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    b = 5
    g = with_hvp_output(fg.trace(small, B=b))
    hvp = fg.grad(g, of="s")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(b, 3)).astype(np.float32), labels(b, 3)
    params = {k: rng.normal(size=g.node(v).shape) for k, v in g.params.items()}
    dirs = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    feed = {"x": x, "y": y, **{f"dir_{k}": v for k, v in dirs.items()}}
    keys = [f"grad:{k}" for k in params]
    got = fg.interpret(hvp, feed, params, dtype="f64", results=keys)

    def gradient(p):
        return fg.interpret(g, feed, p, dtype="f64", results=keys)

    eps = 1e-6
    plus = gradient({k: params[k] + eps * dirs[k].astype(np.float64) for k in params})
    minus = gradient({k: params[k] - eps * dirs[k].astype(np.float64) for k in params})
    for key in keys:
        numeric = (plus[key] - minus[key]) / (2 * eps)
        assert np.abs(numeric).max() > 1e-2
        np.testing.assert_allclose(got[key], numeric, rtol=1e-6, atol=1e-8, err_msg=key)
    # second derivatives of the elementwise ops were derived (d0.d0) along the way
    ops = {hvp.node(n).op for n in hvp.nx.nodes}
    assert {"tanh.d0.d0", "gelu.d0.d0"} <= ops


def test_hessian_is_symmetric():
    b = 4
    g = with_hvp_output(fg.trace(small, B=b))
    hvp = fg.grad(g, of="s")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(b, 3)).astype(np.float32), labels(b, 3)
    params = {k: rng.normal(size=g.node(v).shape) for k, v in g.params.items()}
    d1 = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    d2 = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}

    def h_times(d):
        feed = {"x": x, "y": y, **{f"dir_{k}": v for k, v in d.items()}}
        return fg.interpret(hvp, feed, params, dtype="f64",
                            results=[f"grad:{k}" for k in params])

    h1, h2 = h_times(d1), h_times(d2)
    a = sum(float(np.sum(d2[k] * h1[f"grad:{k}"])) for k in params)
    c = sum(float(np.sum(d1[k] * h2[f"grad:{k}"])) for k in params)
    assert abs(a) > 1e-3
    assert a == pytest.approx(c, rel=1e-9)


# ---- which nodes get gradients -----------------------------------------------------------


def new_nodes(before: fg.Graph, after: fg.Graph) -> set[int]:
    return set(after.nx.nodes) - set(before.nx.nodes)


@fg.model
def main_only(x: fg.f32["B", 3]):
    w = fg.param("w", (3, 2))
    return fg.tanh(x @ w).sum() + x.sum()


@fg.model
def with_side_branches(x: fg.f32["B", 3]):
    w = fg.param("w", (3, 2))
    unused = fg.param("unused", (3,))
    side = fg.exp(fg.sin(x) * 2.0).sum(-1)          # depends on the input only
    aux = fg.cos(x * unused).sum()                   # a param, but not on the loss
    return {"loss": fg.tanh(x @ w).sum() + side.sum(), "aux": aux}


def test_only_nodes_between_params_and_loss_get_gradient_nodes():
    plain = fg.trace(main_only, B=2)
    branchy = fg.trace(with_side_branches, B=2)
    g_plain, g_branchy = fg.grad(plain), fg.grad(branchy)
    added = new_nodes(branchy, g_branchy)
    # the side branches add forward nodes, but not one gradient node
    assert len(branchy) > len(plain) + 6
    assert len(added - {g_branchy.grads["unused"]}) == len(new_nodes(plain, g_plain))
    # no gradient node reads a node of the side branches or of aux
    side_nodes = {n for n in branchy.nx.nodes
                  if branchy.node(n).op in ("sin", "exp", "cos")}
    for n in added:
        assert not set(g_branchy.node(n).args) & side_nodes, g_branchy.node(n)
    ops = {g_branchy.node(n).op for n in added}
    assert not ops & {"cos", "exp.d0", "sin", "neg"}
    # a param off the loss path gets an exact zero gradient
    node = g_branchy.node(g_branchy.grads["unused"])
    assert node.op == "const" and node.shape == (3,)
    assert not node.attrs["value"].any()


def test_stop_gradient_blocks_the_gradient():
    @fg.model
    def frozen_path(x: fg.f32["B", 3]):
        w = fg.param("w", (3, 2))
        frozen = fg.param("frozen", (3, 2))
        return (fg.tanh(x @ w) * fg.stop_gradient(fg.exp(x @ frozen))).sum()

    graph = fg.grad(fg.trace(frozen_path, B=2))
    x = normal(2, 3)
    params = fg.init_params(graph, seed=0)
    res = fg.interpret(graph, {"x": x}, params, dtype="f64")
    assert not res["grad:frozen"].any()
    assert np.abs(res["grad:w"]).min() > 0
    # w's gradient uses the frozen factor as a constant
    f64 = {k: v.astype(np.float64) for k, v in params.items()}
    scale = np.exp(x @ f64["frozen"])
    t = np.tanh(x @ f64["w"])
    np.testing.assert_allclose(res["grad:w"], x.T.astype(np.float64) @ (scale * (1 - t * t)),
                               rtol=1e-6)


def test_grad_wrt_a_subset_of_params():
    graph = fg.trace(mlp, B=3)
    full = fg.grad(graph)
    head = fg.grad(graph, wrt=["head.weight", "head.bias"])
    assert set(head.grads) == {"head.weight", "head.bias"}
    assert len(new_nodes(graph, head)) < len(new_nodes(graph, full))
    x, y = normal(3, 6), labels(3, 4)
    params = fg.init_params(graph)
    a = fg.interpret(full, {"x": x, "y": y}, params, dtype="f64")
    b = fg.interpret(head, {"x": x, "y": y}, params, dtype="f64")
    for k in head.grads:
        np.testing.assert_allclose(a[f"grad:{k}"], b[f"grad:{k}"], rtol=1e-12)


def test_gradient_nodes_point_at_the_users_lines():
    g = fg.grad(fg.trace(mlp, B=3))
    this_file = __file__
    added = new_nodes(fg.trace(mlp, B=3), g)
    assert added
    for n in added:
        src = g.node(n).src
        assert src is not None and src.startswith(this_file + ":"), (g.node(n), src)


def test_grad_rejects_bad_requests():
    graph = fg.trace(mlp, B=3)
    with pytest.raises(fg.ShapeError, match="scalar"):
        fg.grad(graph, of="logits")
    with pytest.raises(fg.IRError, match="'nope'"):
        fg.grad(graph, of="nope")
    with pytest.raises(fg.IRError, match="'nope'"):
        fg.grad(graph, wrt=["nope"])


def test_grad_does_not_change_its_argument():
    graph = fg.trace(mlp, B=3)
    n = len(graph)
    fg.grad(graph)
    assert len(graph) == n and not graph.grads


@fg.model
def relu_layer(x: fg.f32["B", 4]):
    return fg.relu(fg.nn.linear(x, 3, name="fc")).sum()


def test_relu_gradient_reads_its_output():
    """relu's VJP is g·relu'(relu(x)), which equals g·relu'(x) everywhere (0, -0, ±inf,
    NaN, subnormals): the backward reads the output, so the pre-activation x @ w + b
    dies in the forward pass (a GEMM can write relu(x @ w + b) directly)."""
    traced = fg.trace(relu_layer, B=2)
    g = fg.grad(traced)
    (relu,) = [n for n in g.nx.nodes if g.node(n).op == "relu"]
    (d,) = [n for n in g.nx.nodes if g.node(n).op == "relu.d0"]
    assert g.node(d).args == (relu,)
    pre = g.node(relu).args[0]
    assert all(pre not in g.node(n).args for n in new_nodes(traced, g))
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45,
                        3.4e38], np.float32)
    from ferrograd.ir.ops import op_def

    relu_ref, d_ref = op_def("relu").ref, op_def("relu.d0").ref
    np.testing.assert_array_equal(d_ref(relu_ref(special)), d_ref(special))
    check(relu_layer, normal(5, 4))
