"""The JAX anchor: each workload's loss in jax.numpy, ``jax.value_and_grad`` for the
backward and the optimizer update (PyTorch's formulas, as fg.optim states them)
written in JAX, all in one ``jax.jit`` with params and optimizer state donated.
Importing this module raises ImportError where JAX is not installed; the runner
then skips it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, even on a GPU machine
import jax
import jax.numpy as jnp
import numpy as np
from common import CONTEXT, DIM, HEADS, Batch, Opt

Tree = dict[str, Any]


def _dense(p: Tree, name: str, x: jax.Array) -> jax.Array:
    return x @ p[f"{name}.weight"] + p[f"{name}.bias"]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()


def linreg(p: Tree, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((_dense(p, "lin", x) - y) ** 2)


def xor(p: Tree, x: jax.Array, y: jax.Array) -> jax.Array:
    prob = jax.nn.sigmoid(_dense(p, "out", jnp.tanh(_dense(p, "hidden", x))))
    log_p = jnp.maximum(jnp.log(prob), -100.0)
    log_q = jnp.maximum(jnp.log(1.0 - prob), -100.0)
    return -jnp.mean(y * log_p + (1.0 - y) * log_q)


def mlp(p: Tree, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(_dense(p, "fc1", x))
    h = jax.nn.relu(_dense(p, "fc2", h))
    return _cross_entropy(_dense(p, "head", h), y)


def _conv_relu_pool(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = jax.nn.relu(y + b[None, :, None, None])
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def cnn(p: Tree, x: jax.Array, y: jax.Array) -> jax.Array:
    h = _conv_relu_pool(x, p["conv1.weight"], p["conv1.bias"])
    h = _conv_relu_pool(h, p["conv2.weight"], p["conv2.bias"])
    return _cross_entropy(_dense(p, "head", h.reshape(h.shape[0], -1)), y)


CAUSAL = np.tril(np.ones((CONTEXT, CONTEXT), dtype=bool))


def _layer_norm(p: Tree, name: str, x: jax.Array) -> jax.Array:
    c = x - x.mean(-1, keepdims=True)
    y = c / jnp.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)
    return y * p[f"{name}.weight"] + p[f"{name}.bias"]


def transformer(p: Tree, ids: jax.Array, targets: jax.Array) -> jax.Array:
    b, hd = ids.shape[0], DIM // HEADS

    def split(t: jax.Array) -> jax.Array:
        return t.reshape(b, CONTEXT, HEADS, hd).transpose(0, 2, 1, 3)

    x = p["tok_emb.weight"][ids] + p["pos_emb"]
    h = _layer_norm(p, "ln1", x)
    q, k, v = (split(_dense(p, f"attn.{n}", h)) for n in "qkv")
    scores = jnp.where(CAUSAL, (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd)), -1e9)
    att = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, CONTEXT, DIM)
    x = x + _dense(p, "attn.out", att)
    up = _dense(p, "mlp.up", _layer_norm(p, "ln2", x))
    x = x + _dense(p, "mlp.down", jax.nn.gelu(up, approximate=False))
    logits = _dense(p, "head", _layer_norm(p, "ln_f", x))
    return _cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "linreg": linreg, "xor": xor, "mlp": mlp, "cnn": cnn, "transformer": transformer}


# ---- optimizers: (init, update) on pytrees ---------------------------------------------


def _sgd(opt: Opt) -> tuple[Callable[[Tree], Any], Callable[..., tuple[Tree, Any]]]:
    def update(p: Tree, state: Any, g: Tree) -> tuple[Tree, Any]:
        return jax.tree_util.tree_map(lambda w, d: w - opt.lr * d, p, g), state

    return lambda p: (), update


def _adam(opt: Opt) -> tuple[Callable[[Tree], Any], Callable[..., tuple[Tree, Any]]]:
    b1, b2 = opt.betas

    def init(p: Tree) -> Any:
        def zeros() -> Tree:  # two trees: donated buffers must not alias
            return jax.tree_util.tree_map(jnp.zeros_like, p)

        return jnp.zeros((), jnp.float32), zeros(), zeros()

    def update(p: Tree, state: Any, g: Tree) -> tuple[Tree, Any]:
        t, m, v = state
        t = t + 1.0
        m = jax.tree_util.tree_map(lambda a, d: b1 * a + (1 - b1) * d, m, g)
        v = jax.tree_util.tree_map(lambda a, d: b2 * a + (1 - b2) * d * d, v, g)
        step = opt.lr / (1 - b1 ** t)
        root = jnp.sqrt(1 - b2 ** t)
        p = jax.tree_util.tree_map(lambda w, a, s: w - step * a / (jnp.sqrt(s) / root + opt.eps),
                                   p, m, v)
        return p, (t, m, v)

    return init, update


OPTIMIZERS = {"sgd": _sgd, "adam": _adam}


class Trainer:
    """One jitted training step per ``step()`` on ``batch``, the loss back as a float
    every step as ferrograd's; ``reset()`` goes back to ``params`` and a fresh
    optimizer state (the compiled step is kept)."""

    def __init__(self, arch: str, opt: Opt, params: dict[str, np.ndarray], batch: Batch
                 ) -> None:
        self.init_state, update = OPTIMIZERS[opt.kind](opt)
        loss_of = LOSSES[arch]

        def train(p: Tree, state: Any, *inputs: jax.Array) -> tuple[Tree, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_of)(p, *inputs)
            p, state = update(p, state, grads)
            return p, state, loss

        self.train = jax.jit(train, donate_argnums=(0, 1))
        self.initial = params
        self.inputs = [jnp.asarray(a) for a in batch]
        self.reset()

    def reset(self) -> None:
        # From fresh copies: JAX may alias a NumPy buffer, and donation writes in place.
        self.p = {k: jnp.asarray(np.array(v, np.float32)) for k, v in self.initial.items()}
        self.state = self.init_state(self.p)

    def step(self) -> float:
        self.p, self.state, loss = self.train(self.p, self.state, *self.inputs)
        return float(loss)


def version() -> str:
    return f"JAX {jax.__version__} ({jax.default_backend()})"
