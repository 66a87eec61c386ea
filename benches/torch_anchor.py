"""The PyTorch anchors: each workload's forward in torch, autograd for the backward,
``torch.optim`` for the update — eager (``Trainer``), or with the model and loss under
``torch.compile`` (``CompiledTrainer``: Inductor's C++/OpenMP kernels on the CPU, the
backward compiled by AOTAutograd, the optimizer eager, as users write it). Importing
this module raises ImportError where torch is not installed; the runner then skips
both."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from common import CONTEXT, DIM, HEADS, Batch, Opt

Tensors = dict[str, torch.Tensor]


def _dense(p: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias with ferrograd's (in, out) weight layout."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    return torch.addmm(b, x, w) if x.dim() == 2 else x @ w + b


def linreg(p: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(_dense(p, "lin", x), y)


def xor(p: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(_dense(p, "hidden", x))
    return F.binary_cross_entropy(torch.sigmoid(_dense(p, "out", h)), y)


def mlp(p: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = F.relu(_dense(p, "fc1", x))
    h = F.relu(_dense(p, "fc2", h))
    return F.cross_entropy(_dense(p, "head", h), y)


def cnn(p: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)), 2)
    return F.cross_entropy(_dense(p, "head", h.flatten(1)), y)


CAUSAL = torch.tril(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool))


def transformer(p: Tensors, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b, hd = ids.shape[0], DIM // HEADS

    def ln(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (DIM,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, CONTEXT, HEADS, hd).transpose(1, 2)

    x = F.embedding(ids, p["tok_emb.weight"]) + p["pos_emb"]
    h = ln("ln1", x)
    q, k, v = (split(_dense(p, f"attn.{n}", h)) for n in "qkv")
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    scores = scores.masked_fill(~CAUSAL, -1e9)
    att = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, CONTEXT, DIM)
    x = x + _dense(p, "attn.out", att)
    x = x + _dense(p, "mlp.down", F.gelu(_dense(p, "mlp.up", ln("ln2", x))))
    logits = _dense(p, "head", ln("ln_f", x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "linreg": linreg, "xor": xor, "mlp": mlp, "cnn": cnn, "transformer": transformer}


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Integer inputs become int64 (torch's index dtype), once, outside the step."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.long() if a.dtype.kind in "iu" else t


class Trainer:
    """One eager training step per ``step()`` on ``batch``; ``reset()`` goes back to
    ``params`` and a fresh optimizer."""

    def __init__(self, arch: str, opt: Opt, params: dict[str, np.ndarray], batch: Batch
                 ) -> None:
        self.loss_of, self.opt, self.initial = LOSSES[arch], opt, params
        self.inputs = [_tensor(a) for a in batch]
        self.reset()

    def reset(self) -> None:
        self.p = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True)
                  for k, v in self.initial.items()}
        opt, weights = self.opt, list(self.p.values())
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(weights, lr=opt.lr) if opt.kind == "sgd" else
            torch.optim.Adam(weights, lr=opt.lr, betas=opt.betas, eps=opt.eps))

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(self.p, *self.inputs)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


class CompiledTrainer(Trainer):
    """``Trainer`` with the loss function compiled once (default mode: on the CPU,
    "reduce-overhead" would only add CUDA graphs). The params are arguments, so a reset's
    fresh tensors reuse the compiled code (same shapes, dtypes, requires_grad)."""

    def __init__(self, arch: str, opt: Opt, params: dict[str, np.ndarray], batch: Batch
                 ) -> None:
        super().__init__(arch, opt, params, batch)
        self.loss_of = torch.compile(LOSSES[arch], dynamic=False)


def version() -> str:
    return f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"
