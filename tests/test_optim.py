"""Optimizers against PyTorch's update rules, re-implemented here in float64 NumPy.

The references below are written from the torch.optim documentation (the
pseudo-code of SGD, Adam, AdamW and RMSprop), not from ferrograd's code, so they
are an independent check. The model is a linear regression with an MSE loss,
whose gradient the test also computes by hand; each case trains several steps on
different batches with ``backend="numpy"`` (float32) and compares params, optimizer
state and losses with the float64 reference at float32 tolerances.
"""

from collections.abc import Callable

import numpy as np
import pytest

import ferrograd as fg

B, N_IN, N_OUT = 8, 3, 2
STEPS = 6


@fg.model
def regression(x: fg.f32["B", 3], y: fg.f32["B", 2]):
    w = fg.param("w", (3, 2), init="normal")
    b = fg.param("b", (2,), init="normal")
    return fg.mse(x @ w + b, y)


def batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        x = rng.normal(size=(B, N_IN)).astype(np.float32)
        y = rng.normal(size=(B, N_OUT)).astype(np.float32)
        out.append((x, y))
    return out


def loss_and_grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """mean((x @ w + b - y)**2) and its gradient, by hand, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = x @ p["w"] + p["b"] - y
    d = 2.0 * r / r.size
    return float(np.mean(r * r)), {"w": x.T @ d, "b": d.sum(axis=0)}


# ---- the torch.optim update rules, one function per optimizer -------------------------------
# Each reference gets (param, grad, its state dict, step number t starting at 1) and returns
# the new param, updating the state in place under torch's state names.

Update = Callable[[np.ndarray, np.ndarray, dict, int], np.ndarray]


def ref_sgd(lr: float, momentum: float = 0.0, nesterov: bool = False,
            weight_decay: float = 0.0) -> Update:
    def update(p, g, st, t):
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            # dampening 0: b_1 = g, b_t = mu * b_{t-1} + g
            b = g.copy() if t == 1 else momentum * st["momentum_buffer"] + g
            st["momentum_buffer"] = b
            g = g + momentum * b if nesterov else b
        return p - lr * g
    return update


def ref_adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
             weight_decay: float = 0.0, decoupled: bool = False) -> Update:
    b1, b2 = betas

    def update(p, g, st, t):
        if decoupled:
            p = p - lr * weight_decay * p
        elif weight_decay:
            g = g + weight_decay * p
        m = b1 * st.get("exp_avg", 0.0) + (1 - b1) * g
        v = b2 * st.get("exp_avg_sq", 0.0) + (1 - b2) * g * g
        st["exp_avg"], st["exp_avg_sq"] = m, v
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return update


def ref_rmsprop(lr: float, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                momentum: float = 0.0) -> Update:
    def update(p, g, st, t):
        if weight_decay:
            g = g + weight_decay * p
        v = alpha * st.get("square_avg", 0.0) + (1 - alpha) * g * g
        st["square_avg"] = v
        if momentum > 0:
            b = momentum * st.get("momentum_buffer", 0.0) + g / (np.sqrt(v) + eps)
            st["momentum_buffer"] = b
            return p - lr * b
        return p - lr * g / (np.sqrt(v) + eps)
    return update


CASES = {
    "sgd": (fg.optim.SGD(lr=0.1), ref_sgd(0.1), ()),
    "sgd_momentum": (fg.optim.SGD(lr=0.05, momentum=0.9), ref_sgd(0.05, 0.9),
                     ("momentum_buffer",)),
    "sgd_nesterov": (fg.optim.SGD(lr=0.05, momentum=0.8, nesterov=True),
                     ref_sgd(0.05, 0.8, nesterov=True), ("momentum_buffer",)),
    "sgd_weight_decay": (fg.optim.SGD(lr=0.1, weight_decay=0.3),
                         ref_sgd(0.1, weight_decay=0.3), ()),
    "sgd_everything": (fg.optim.SGD(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2),
                       ref_sgd(0.05, 0.7, True, 0.2), ("momentum_buffer",)),
    # eps large enough that where it sits in the denominator shows in the numbers
    "adam": (fg.optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-3),
             ref_adam(0.05, (0.8, 0.95), 1e-3), ("exp_avg", "exp_avg_sq")),
    "adam_defaults": (fg.optim.Adam(lr=0.01), ref_adam(0.01), ("exp_avg", "exp_avg_sq")),
    "adam_weight_decay": (fg.optim.Adam(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.2),
                          ref_adam(0.05, (0.9, 0.99), 1e-6, 0.2), ("exp_avg", "exp_avg_sq")),
    "adamw": (fg.optim.AdamW(lr=0.05, betas=(0.85, 0.97), eps=1e-4, weight_decay=0.5),
              ref_adam(0.05, (0.85, 0.97), 1e-4, 0.5, decoupled=True),
              ("exp_avg", "exp_avg_sq")),
    "adamw_defaults": (fg.optim.AdamW(lr=0.02), ref_adam(0.02, weight_decay=1e-2,
                                                         decoupled=True),
                       ("exp_avg", "exp_avg_sq")),
    "rmsprop": (fg.optim.RMSprop(lr=0.01, alpha=0.9, eps=1e-3), ref_rmsprop(0.01, 0.9, 1e-3),
                ("square_avg",)),
    "rmsprop_momentum": (fg.optim.RMSprop(lr=0.01, alpha=0.95, eps=1e-6, weight_decay=0.1,
                                          momentum=0.7),
                         ref_rmsprop(0.01, 0.95, 1e-6, 0.1, 0.7),
                         ("square_avg", "momentum_buffer")),
}


def test_hand_gradient_matches_the_step():
    """The reference's gradient is right, so the optimizer comparisons below mean something."""
    step = fg.compile(regression, optimizer=fg.optim.SGD(lr=0.1), backend="numpy", B=B)
    x, y = batches()[0]
    params = {k: v.astype(np.float64) for k, v in step.params.items()}
    loss, want = loss_and_grads(params, x, y)
    got = step.grads(x, y)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert float(step.forward(x, y)["loss"]) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_torch_update_rule(case):
    optimizer, reference, slots = CASES[case]
    step = fg.compile(regression, optimizer=optimizer, backend="numpy", B=B, seed=3)
    params = {k: v.astype(np.float64) for k, v in step.params.items()}
    state: dict[str, dict] = {k: {} for k in params}
    for t, (x, y) in enumerate(batches(), start=1):
        loss, grads = loss_and_grads(params, x, y)
        params = {k: reference(params[k], grads[k], state[k], t) for k in params}
        got_loss = step(x, y)
        assert got_loss == pytest.approx(loss, rel=1e-5), f"loss of step {t}"
        got = step.params
        for k in params:
            assert got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], params[k], rtol=2e-5, atol=2e-6,
                                       err_msg=f"{case}: param {k!r} after step {t}")
    # the state buffers hold torch's values too, under "<slot>:<param>"
    got_state = step.state
    for k in params:
        for slot in slots:
            np.testing.assert_allclose(got_state[f"{slot}:{k}"], state[k][slot], rtol=2e-5,
                                       atol=2e-6, err_msg=f"{case}: {slot}:{k}")


def test_reference_updates_differ_between_cases():
    """Guard against a vacuous comparison: the cases really train differently."""
    finals = {}
    for case in ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw", "rmsprop"):
        step = fg.compile(regression, optimizer=CASES[case][0], backend="numpy", B=B, seed=3)
        for x, y in batches():
            step(x, y)
        finals[case] = step.params["w"]
    names = sorted(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-4), (a, b)


@pytest.mark.parametrize("optimizer, names", [
    (fg.optim.SGD(lr=0.1), set()),
    (fg.optim.SGD(lr=0.1, momentum=0.9), {"momentum_buffer:w", "momentum_buffer:b"}),
    (fg.optim.Adam(), {"step", "exp_avg:w", "exp_avg_sq:w", "exp_avg:b", "exp_avg_sq:b"}),
    (fg.optim.AdamW(), {"step", "exp_avg:w", "exp_avg_sq:w", "exp_avg:b", "exp_avg_sq:b"}),
    (fg.optim.RMSprop(), {"square_avg:w", "square_avg:b"}),
    (fg.optim.RMSprop(momentum=0.5),
     {"square_avg:w", "square_avg:b", "momentum_buffer:w", "momentum_buffer:b"}),
], ids=["sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "rmsprop_momentum"])
def test_state_buffers_have_the_expected_names_and_start_at_zero(optimizer, names):
    step = fg.compile(regression, optimizer=optimizer, backend="numpy", B=B)
    state = step.state
    assert set(state) == names
    shapes = {"w": (3, 2), "b": (2,)}
    for key, value in state.items():
        assert value.dtype == np.float32
        assert value.shape == (() if key == "step" else shapes[key.split(":")[1]])
        assert not value.any()


def test_adam_step_counter_advances_and_drives_bias_correction():
    lr = 0.01
    step = fg.compile(regression, optimizer=fg.optim.Adam(lr=lr), backend="numpy", B=B)
    data = batches()
    before = step.params
    step(*data[0])
    assert float(step.state["step"]) == 1.0
    # With bias correction, the first Adam update is lr * g / (|g| + eps'): every element
    # moves by (almost exactly) lr. Without it, it would move by lr * 0.1 / sqrt(0.001).
    for k, v in step.params.items():
        np.testing.assert_allclose(np.abs(v.astype(np.float64) - before[k]), lr, rtol=1e-3)
    for t, batch in enumerate(data[1:4], start=2):
        step(*batch)
        assert float(step.state["step"]) == float(t)
    # forward and grads run no update, so the counter stays put
    step.forward(*data[0])
    step.grads(*data[0])
    assert float(step.state["step"]) == 4.0


@fg.model
def with_unused(x: fg.f32["B", 3], y: fg.f32["B", 2]):
    w = fg.param("w", (3, 2), init="normal")
    unused = fg.param("unused", (4,), init="normal")  # only feeds an extra output
    return {"loss": fg.mse(x @ w, y), "aux": unused * 2.0}


@pytest.mark.parametrize("optimizer", [
    fg.optim.SGD(lr=0.1, momentum=0.9), fg.optim.Adam(lr=0.1), fg.optim.RMSprop(lr=0.1),
], ids=["sgd", "adam", "rmsprop"])
def test_param_that_does_not_reach_the_loss_gets_a_zero_gradient(optimizer):
    step = fg.compile(with_unused, optimizer=optimizer, backend="numpy", B=B)
    x, y = batches()[0]
    grads = step.grads(x, y)
    assert grads["unused"].shape == (4,) and grads["unused"].dtype == np.float32
    assert not grads["unused"].any()
    assert np.abs(grads["w"]).sum() > 0
    before = step.params
    for batch in batches():
        step(*batch)
    after = step.params
    np.testing.assert_array_equal(after["unused"], before["unused"])
    assert not np.allclose(after["w"], before["w"])
    np.testing.assert_allclose(step.forward(x, y)["aux"], 2 * before["unused"], rtol=1e-6)


def test_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match="nesterov"):
        fg.optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="optimizer"):
        fg.lower(regression, optimizer="adam", backend="numpy", B=B)
    with pytest.raises(fg.IRError, match=r"fg\.grad"):
        fg.optim.SGD().apply(fg.trace(regression, B=B))


def test_optimizer_on_a_model_without_loss_or_params_is_a_trace_error():
    @fg.model
    def no_loss(x: fg.f32["B", 3]):
        return {"out": x @ fg.param("w", (3, 2))}

    @fg.model
    def no_params(x: fg.f32["B", 3]):
        return (x * x).sum()

    with pytest.raises(fg.TraceError, match="no 'loss'"):
        fg.compile(no_loss, optimizer=fg.optim.SGD(), backend="numpy", B=2)
    with pytest.raises(fg.TraceError, match="no params"):
        fg.compile(no_params, optimizer=fg.optim.SGD(), backend="numpy", B=2)
