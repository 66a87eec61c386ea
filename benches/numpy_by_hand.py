"""The NumPy anchor: each workload's forward, backward and update written by hand.

This is what a careful user writes without a framework: float32 throughout, one
GEMM per linear layer and per gradient, batched matmuls for attention, im2col
for convolutions, in-place optimizer updates. ``Trainer(arch, opt, params, batch)``
runs one training step per ``step()`` and returns the loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from common import CONTEXT, DIM, HEADS, Batch, Opt, peak_rss_mb

Arrays = dict[str, np.ndarray]
Grads = Callable[..., tuple[float, Arrays]]


# ---- optimizers (PyTorch's formulas, as fg.optim states them) --------------------------


class SGD:
    def __init__(self, opt: Opt, params: Arrays) -> None:
        self.lr = np.float32(opt.lr)

    def update(self, params: Arrays, grads: Arrays) -> None:
        for name, g in grads.items():
            g *= self.lr
            params[name] -= g


class Adam:
    def __init__(self, opt: Opt, params: Arrays) -> None:
        self.opt, self.t = opt, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def update(self, params: Arrays, grads: Arrays) -> None:
        (b1, b2), self.t = self.opt.betas, self.t + 1
        step = np.float32(self.opt.lr / (1 - b1 ** self.t))
        root = np.float32(math.sqrt(1 - b2 ** self.t))
        for name, g in grads.items():
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v)
            denom /= root
            denom += self.opt.eps
            params[name] -= step * m / denom


# ---- shared pieces ---------------------------------------------------------------------


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of integer labels and its gradient w.r.t. the logits (rows = samples)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.log(s[:, 0]).mean() - z[rows, labels].mean())
    e /= s
    e[rows, labels] -= 1
    e /= np.float32(len(labels))
    return loss, e


def dense_grads(x: np.ndarray, dy: np.ndarray, grads: Arrays, name: str) -> None:
    """Weight and bias gradients of y = x @ w + b (2-d x)."""
    grads[f"{name}.weight"] = x.T @ dy
    grads[f"{name}.bias"] = dy.sum(axis=0)


def dense_back(x: np.ndarray, w: np.ndarray, dy: np.ndarray, grads: Arrays, name: str
               ) -> np.ndarray:
    """``dense_grads``, and the gradient w.r.t. x."""
    dense_grads(x, dy, grads, name)
    return dy @ w.T


# ---- W0, W1, W2/W3 ---------------------------------------------------------------------


def linreg(p: Arrays, x: np.ndarray, y: np.ndarray) -> tuple[float, Arrays]:
    d = x @ p["lin.weight"] + p["lin.bias"] - y
    grads: Arrays = {}
    loss = float(np.mean(d * d))
    d *= np.float32(2 / d.size)
    dense_grads(x, d, grads, "lin")
    return loss, grads


def xor(p: Arrays, x: np.ndarray, y: np.ndarray) -> tuple[float, Arrays]:
    h = np.tanh(x @ p["hidden.weight"] + p["hidden.bias"])
    prob = 1 / (1 + np.exp(-(h @ p["out.weight"] + p["out.bias"])))
    loss = -float(np.mean(y * np.maximum(np.log(prob), -100)
                          + (1 - y) * np.maximum(np.log(1 - prob), -100)))
    grads: Arrays = {}
    dz = (prob - y) / np.float32(y.size)  # BCE through the sigmoid
    dh = dense_back(h, p["out.weight"], dz, grads, "out")
    dense_grads(x, dh * (1 - h * h), grads, "hidden")
    return loss, grads


def mlp(p: Arrays, x: np.ndarray, y: np.ndarray) -> tuple[float, Arrays]:
    h1 = np.maximum(x @ p["fc1.weight"] + p["fc1.bias"], 0)
    h2 = np.maximum(h1 @ p["fc2.weight"] + p["fc2.bias"], 0)
    loss, d = cross_entropy(h2 @ p["head.weight"] + p["head.bias"], y)
    grads: Arrays = {}
    d = dense_back(h2, p["head.weight"], d, grads, "head")
    d = dense_back(h1, p["fc2.weight"], d * (h2 > 0), grads, "fc2")
    dense_grads(x, d * (h1 > 0), grads, "fc1")
    return loss, grads


# ---- W4: convolutions by im2col --------------------------------------------------------


def im2col(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N·H·W, C·9) patches of a 3×3, padding-1 convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def col2im(dcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Adjoint of im2col: sum the patch gradients back into an (N, C, H, W) gradient."""
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 3, 3)
    dxp = np.zeros((n, c, h + 2, w + 2), np.float32)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1]


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, _, h, wd = x.shape
    cols = im2col(x)
    out = cols @ w.reshape(len(w), -1).T + b  # (N·H·W, O)
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols


def conv_grads(cols: np.ndarray, w: np.ndarray, dy: np.ndarray, grads: Arrays, name: str
               ) -> np.ndarray:
    """Weight and bias gradients of ``conv``; returns dy as an (N·H·W, O) matrix."""
    dmat = dy.transpose(0, 2, 3, 1).reshape(-1, len(w))
    grads[f"{name}.weight"] = (dmat.T @ cols).reshape(w.shape)
    grads[f"{name}.bias"] = dmat.sum(axis=0)
    return dmat


def conv_back(cols: np.ndarray, w: np.ndarray, dy: np.ndarray, grads: Arrays, name: str,
              x_shape: tuple[int, ...]) -> np.ndarray:
    """``conv_grads``, and the gradient w.r.t. the input."""
    dmat = conv_grads(cols, w, dy, grads, name)
    return col2im(dmat @ w.reshape(len(w), -1), x_shape)


def relu_pool(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """relu then 2×2 max pool; also the mask routing the pooled gradient back."""
    n, c, h, w = x.shape
    r = np.maximum(x, 0).reshape(n, c, h // 2, 2, w // 2, 2)
    out = r.max(axis=(3, 5))
    mask = (r == out[:, :, :, None, :, None]) & (r > 0)
    return out, mask


def relu_pool_back(dy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, c, h2, _, w2, _ = mask.shape
    return (mask * dy[:, :, :, None, :, None]).reshape(n, c, 2 * h2, 2 * w2)


def cnn(p: Arrays, x: np.ndarray, y: np.ndarray) -> tuple[float, Arrays]:
    z1, cols1 = conv(x, p["conv1.weight"], p["conv1.bias"])
    a1, mask1 = relu_pool(z1)
    z2, cols2 = conv(a1, p["conv2.weight"], p["conv2.bias"])
    a2, mask2 = relu_pool(z2)
    flat = a2.reshape(len(x), -1)
    loss, d = cross_entropy(flat @ p["head.weight"] + p["head.bias"], y)
    grads: Arrays = {}
    d = dense_back(flat, p["head.weight"], d, grads, "head")
    d = relu_pool_back(d.reshape(a2.shape), mask2)
    d = conv_back(cols2, p["conv2.weight"], d, grads, "conv2", a1.shape)
    conv_grads(cols1, p["conv1.weight"], relu_pool_back(d, mask1), grads, "conv1")
    return loss, grads


# ---- W5: one transformer block ---------------------------------------------------------


@functools.cache
def _erf() -> Callable[[np.ndarray], np.ndarray]:
    """SciPy's erf, imported on first use (so that only W5 pays for SciPy's memory)."""
    try:
        from scipy.special import erf
    except ImportError:  # slow, but correct
        return np.vectorize(math.erf, otypes=[np.float32])
    return erf


SQRT1_2 = np.float32(1 / math.sqrt(2))
INV_SQRT2PI = np.float32(1 / math.sqrt(2 * math.pi))


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray
               ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    c = x - x.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((c * c).mean(axis=-1, keepdims=True) + np.float32(1e-5))
    xhat = c * rstd
    return xhat * g + b, (xhat, rstd)


def layer_norm_back(dy: np.ndarray, g: np.ndarray, saved: tuple[np.ndarray, np.ndarray],
                    grads: Arrays, name: str) -> np.ndarray:
    xhat, rstd = saved
    grads[f"{name}.weight"] = (dy * xhat).sum(axis=0)
    grads[f"{name}.bias"] = dy.sum(axis=0)
    dx = dy * g
    return rstd * (dx - dx.mean(axis=-1, keepdims=True)
                   - xhat * (dx * xhat).mean(axis=-1, keepdims=True))


def heads(t: np.ndarray, b: int) -> np.ndarray:
    return t.reshape(b, CONTEXT, HEADS, DIM // HEADS).transpose(0, 2, 1, 3)


def merge(t: np.ndarray) -> np.ndarray:
    return t.transpose(0, 2, 1, 3).reshape(-1, DIM)


def transformer(p: Arrays, ids: np.ndarray, targets: np.ndarray) -> tuple[float, Arrays]:
    b = len(ids)
    scale = np.float32(1 / math.sqrt(DIM // HEADS))
    causal = np.tril(np.ones((CONTEXT, CONTEXT), bool))
    x0 = (p["tok_emb.weight"][ids] + p["pos_emb"]).reshape(b * CONTEXT, DIM)
    h1, ln1 = layer_norm(x0, p["ln1.weight"], p["ln1.bias"])
    q, k, v = (heads(h1 @ p[f"attn.{n}.weight"] + p[f"attn.{n}.bias"], b) for n in "qkv")
    s = np.where(causal, (q @ k.transpose(0, 1, 3, 2)) * scale, np.float32(-1e9))
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    att = s / s.sum(axis=-1, keepdims=True)
    a = merge(att @ v)
    x1 = x0 + a @ p["attn.out.weight"] + p["attn.out.bias"]
    h2, ln2 = layer_norm(x1, p["ln2.weight"], p["ln2.bias"])
    u = h2 @ p["mlp.up.weight"] + p["mlp.up.bias"]
    cdf = np.float32(0.5) * (1 + _erf()(u * SQRT1_2))
    gl = u * cdf
    x2 = x1 + gl @ p["mlp.down.weight"] + p["mlp.down.bias"]
    h3, ln3 = layer_norm(x2, p["ln_f.weight"], p["ln_f.bias"])
    loss, d = cross_entropy(h3 @ p["head.weight"] + p["head.bias"], targets.reshape(-1))

    g: Arrays = {}
    d = dense_back(h3, p["head.weight"], d, g, "head")
    dx2 = layer_norm_back(d, p["ln_f.weight"], ln3, g, "ln_f")
    d = dense_back(gl, p["mlp.down.weight"], dx2, g, "mlp.down")
    d = d * (cdf + u * np.exp(np.float32(-0.5) * u * u) * INV_SQRT2PI)  # gelu'
    d = dense_back(h2, p["mlp.up.weight"], d, g, "mlp.up")
    dx1 = dx2 + layer_norm_back(d, p["ln2.weight"], ln2, g, "ln2")
    da = heads(dense_back(a, p["attn.out.weight"], dx1, g, "attn.out"), b)
    datt = da @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ da
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) * scale
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    dh1 = (dense_back(h1, p["attn.q.weight"], merge(dq), g, "attn.q")
           + dense_back(h1, p["attn.k.weight"], merge(dk), g, "attn.k")
           + dense_back(h1, p["attn.v.weight"], merge(dv), g, "attn.v"))
    dx0 = (dx1 + layer_norm_back(dh1, p["ln1.weight"], ln1, g, "ln1")).reshape(b, CONTEXT, DIM)
    g["pos_emb"] = dx0.sum(axis=0)
    g["tok_emb.weight"] = np.zeros_like(p["tok_emb.weight"])
    np.add.at(g["tok_emb.weight"], ids.reshape(-1), dx0.reshape(-1, DIM))
    return loss, g


# ---- the table -------------------------------------------------------------------------


ARCHS: dict[str, Grads] = {"linreg": linreg, "xor": xor, "mlp": mlp, "cnn": cnn,
                           "transformer": transformer}
OPTIMIZERS: dict[str, type[SGD] | type[Adam]] = {"sgd": SGD, "adam": Adam}


class Trainer:
    """Trains on ``batch`` one step per ``step()``; ``reset()`` goes back to ``params``
    and a fresh optimizer state."""

    def __init__(self, arch: str, opt: Opt, params: Arrays, batch: Batch) -> None:
        self.grads_of, self.opt, self.initial, self.batch = ARCHS[arch], opt, params, batch
        self.reset()

    def reset(self) -> None:
        self.p = {k: np.array(v, np.float32) for k, v in self.initial.items()}
        self.optimizer = OPTIMIZERS[self.opt.kind](self.opt, self.p)

    def step(self) -> float:
        loss, grads = self.grads_of(self.p, *self.batch)
        self.optimizer.update(self.p, grads)
        return loss


def _rss_probe(argv: list[str]) -> None:
    """``numpy_by_hand.py ARCH OPT LR STEPS BATCH.npz PARAMS.npz``: train on the batch
    ("b:0", "b:1") and print the peak RSS, as JSON. Used by benches/cpu.py to measure a
    NumPy training process that never imported ferrograd. Like any training script
    (and like ferrograd, which initializes params from a seed) it draws its initial
    params with ``np.random``, in the shapes PARAMS.npz gives; ferrograd's probe reads
    the same batch file."""
    import json

    arch, kind, lr, steps, batch_path, params_path = argv
    with np.load(batch_path) as f:
        batch = tuple(f[f"b:{i}"] for i in range(len(f.files)))
    rng = np.random.default_rng(0)
    with np.load(params_path) as f:
        params = {k: (0.05 * rng.standard_normal(f[k].shape)).astype(np.float32)
                  for k in f.files}
    trainer = Trainer(arch, Opt(kind, float(lr)), params, batch)
    for _ in range(int(steps)):
        trainer.step()
    print(json.dumps({"rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    import sys

    _rss_probe(sys.argv[1:])
