"""The CPU workloads of ANCHORS.md (W0..W5), each defined once as an ``@fg.model``,
with its optimizer, its synthetic data and the reference numbers of ANCHORS.md.

The anchors (NumPy by hand, PyTorch, JAX) implement the same architectures under
the same names (``Workload.arch``) and take their initial weights from the
ferrograd step, so every system starts from the same point.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from common import (
    CONTEXT,
    DIM,
    FF,
    HEADS,
    LINREG_FEATURES,
    VOCAB,
    Batch,
    Opt,
    image_data,
    linreg_data,
    token_data,
    xor_data,
)

import ferrograd as fg

# ---- the models -------------------------------------------------------------------------


@fg.model
def linreg(x: fg.f32["N", LINREG_FEATURES], y: fg.f32["N", 1]):
    return fg.mse(fg.nn.linear(x, 1, name="lin"), y)


@fg.model
def xor(x: fg.f32[4, 2], y: fg.f32[4, 1]):
    h = fg.tanh(fg.nn.linear(x, 4, name="hidden"))
    return fg.binary_cross_entropy(fg.sigmoid(fg.nn.linear(h, 1, name="out")), y)


@fg.model
def mlp(x: fg.f32["B", 784], y: fg.i32["B"]):
    h = fg.relu(fg.nn.linear(x, 256, name="fc1"))
    h = fg.relu(fg.nn.linear(h, 256, name="fc2"))
    return fg.cross_entropy(fg.nn.linear(h, 10, name="head"), y)


@fg.model
def cnn(x: fg.f32["B", 1, 28, 28], y: fg.i32["B"]):
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(x, 16, 3, padding=1, name="conv1")), 2)
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(h, 32, 3, padding=1, name="conv2")), 2)
    h = h.reshape(h.shape[0], -1)  # (B, 32, 7, 7) -> (B, 1568), channel-major
    return fg.cross_entropy(fg.nn.linear(h, 10, name="head"), y)


CAUSAL = np.tril(np.ones((CONTEXT, CONTEXT), dtype=bool))


def _heads(t, batch: int):
    """(B, T, D) -> (B, H, T, D/H)."""
    return t.reshape(batch, CONTEXT, HEADS, DIM // HEADS).transpose(0, 2, 1, 3)


@fg.model
def transformer(ids: fg.i32["B", CONTEXT], targets: fg.i32["B", CONTEXT]):
    """One pre-norm block (causal attention + GELU MLP), embeddings and an LM head."""
    B = ids.shape[0]
    x = fg.nn.embedding(ids, VOCAB, DIM, name="tok_emb")
    x = x + fg.param("pos_emb", (CONTEXT, DIM), init="normal")
    h = fg.nn.layer_norm(x, name="ln1")
    q = _heads(fg.nn.linear(h, DIM, name="attn.q"), B)
    k = _heads(fg.nn.linear(h, DIM, name="attn.k"), B)
    v = _heads(fg.nn.linear(h, DIM, name="attn.v"), B)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(DIM // HEADS))
    scores = fg.where(fg.constant(CAUSAL), scores, -1e9)
    att = (fg.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, CONTEXT, DIM)
    x = x + fg.nn.linear(att, DIM, name="attn.out")
    h = fg.gelu(fg.nn.linear(fg.nn.layer_norm(x, name="ln2"), FF, name="mlp.up"))
    x = x + fg.nn.linear(h, DIM, name="mlp.down")
    logits = fg.nn.linear(fg.nn.layer_norm(x, name="ln_f"), VOCAB, name="head")
    return fg.cross_entropy(logits.reshape(B * CONTEXT, VOCAB), targets.reshape(B * CONTEXT))


# ---- optimizers ------------------------------------------------------------------------


def fg_optimizer(opt: Opt, lr_scale: float = 1.0) -> fg.optim.SGD | fg.optim.Adam:
    """The ferrograd optimizer of ``opt`` (``lr_scale`` makes a changed model)."""
    if opt.kind == "sgd":
        return fg.optim.SGD(lr=opt.lr * lr_scale)
    return fg.optim.Adam(lr=opt.lr * lr_scale, betas=opt.betas, eps=opt.eps)


# ---- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """ANCHORS.md's CPU row, per-step µs (None where it gives none)."""

    torch: float
    torch_compile: float
    jax: float
    numpy: float
    goal: float


@dataclass(frozen=True)
class Workload:
    key: str  # command-line name: W0, W2b32, ...
    title: str
    model: fg.Model
    arch: str  # which anchor implementation: linreg, xor, mlp, cnn, transformer
    opt: Opt
    dims: dict[str, int]
    make_data: Callable[[np.random.Generator], Batch]
    ref: Reference
    flops: float | None = field(default=None)  # per training step, where easy to state

    def data(self, seed: int = 0) -> Batch:
        return self.make_data(np.random.default_rng(seed))


def _mlp_flops(b: int) -> float:
    """Multiply-adds ×2 of the GEMMs: forward, weight gradients, and input gradients of
    the second and third layers (nobody needs dx of the first)."""
    macs = 784 * 256 + 256 * 256 + 256 * 10
    return 2 * b * (2 * macs + 256 * 256 + 256 * 10)


WORKLOADS: list[Workload] = [
    Workload("W0", "W0 linreg n=1000, GD", linreg, "linreg", Opt("sgd", 0.1), {"N": 1000},
             lambda r: linreg_data(r, 1000), Reference(197, 324, 17.6, 19.8, 4)),
    Workload("W1", "W1 xor 2-4-1, 4 samples, SGD", xor, "xor", Opt("sgd", 0.5), {},
             lambda r: xor_data(r, 4), Reference(277, 393, 21.3, 36.4, 3)),
    Workload("W2b32", "W2 MLP 784-256-256-10 b32, SGD", mlp, "mlp", Opt("sgd", 0.01),
             {"B": 32}, lambda r: image_data(r, 32, (784,)),
             Reference(1023, 1114, 715, 655, 350), _mlp_flops(32)),
    Workload("W2b128", "W2 MLP b128, SGD", mlp, "mlp", Opt("sgd", 0.01), {"B": 128},
             lambda r: image_data(r, 128, (784,)),
             Reference(2310, 1961, 1481, 1462, 1100), _mlp_flops(128)),
    Workload("W2b1024", "W2 MLP b1024, SGD", mlp, "mlp", Opt("sgd", 0.01), {"B": 1024},
             lambda r: image_data(r, 1024, (784,)),
             Reference(12500, 10200, 10400, 11000, 9000), _mlp_flops(1024)),
    Workload("W3", "W3 MLP b128, Adam", mlp, "mlp", Opt("adam", 1e-3), {"B": 128},
             lambda r: image_data(r, 128, (784,)),
             Reference(2579, 2452, 1629, 2053, 1200), _mlp_flops(128)),
    Workload("W4", "W4 CNN b64, SGD", cnn, "cnn", Opt("sgd", 0.01), {"B": 64},
             lambda r: image_data(r, 64, (1, 28, 28)), Reference(13500, 26700, 35100, 36900, 7000)),
    Workload("W5", "W5 transformer d128 h4 ff512 T64 b16, Adam", transformer, "transformer",
             Opt("adam", 1e-3), {"B": 16}, lambda r: token_data(r, 16),
             Reference(20700, 21400, 18600, 45800, 12000)),
]

BY_KEY = {w.key: w for w in WORKLOADS}
