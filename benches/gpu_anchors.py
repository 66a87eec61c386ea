"""The GPU anchors: PyTorch (eager, eager + one CUDA graph per step, torch.compile
with mode="reduce-overhead") and JAX jit, on the GPU workloads of gpu_workloads.py.

Every trainer takes ferrograd's initial params (NumPy, ferrograd's layouts: linear
weights (in, out)) and one batch, keeps params, optimizer state and — unless
``host_inputs`` — the batch on the device, and has

- ``step()``: one training step, the loss back on the host as a float (this
  synchronizes, as ferrograd's ``step(x, y)`` does);
- ``step_async()``: one step, nothing read back (a handle to the loss); ``sync()``
  waits for the device. Back-to-back ``step_async()`` calls are the anchors' best
  case: launches overlap the previous step's kernels.

Strict fp32 everywhere: TF32 off in cuBLAS and cuDNN (torch), matmul/conv precision
"highest" (JAX). Importing sets the environment JAX needs on a GPU (no 75%
preallocation: ferrograd and torch share the card).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from common import Batch, Opt

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cuda")

GELU_A, GELU_B = 1.7, 0.3  # the ew row: y = gelu(x * A - B)


# ---- PyTorch ---------------------------------------------------------------------------


def torch_setup() -> Any:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch


def torch_losses(size: Any) -> dict[str, Callable[..., Any]]:
    """The loss functions (params dict, *inputs) -> loss, by arch."""
    import torch
    import torch.nn.functional as F
    import torch_anchor

    def big_mlp(p: dict, x: Any, y: Any) -> Any:
        h = x
        i = 1
        while f"fc{i}.weight" in p:
            h = F.relu(torch.addmm(p[f"fc{i}.bias"], h, p[f"fc{i}.weight"]))
            i += 1
        return F.cross_entropy(torch.addmm(p["head.bias"], h, p["head.weight"]), y)

    causal = torch.tril(torch.ones(size.context, size.context, dtype=torch.bool,
                                   device="cuda"))

    def transformer(p: dict, ids: Any, targets: Any) -> Any:
        b, hd, t, d = ids.shape[0], size.dim // size.heads, size.context, size.dim

        def dense(name: str, x: Any) -> Any:
            return x @ p[f"{name}.weight"] + p[f"{name}.bias"]

        def ln(name: str, x: Any) -> Any:
            return F.layer_norm(x, (d,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

        def split(x: Any) -> Any:
            return x.view(b, t, size.heads, hd).transpose(1, 2)

        x = F.embedding(ids, p["tok_emb.weight"]) + p["pos_emb"]
        h = ln("ln1", x)
        q, k, v = (split(dense(f"attn.{n}", h)) for n in "qkv")
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        scores = scores.masked_fill(~causal, -1e9)
        att = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + dense("attn.out", att)
        x = x + dense("mlp.down", F.gelu(dense("mlp.up", ln("ln2", x))))
        logits = dense("head", ln("ln_f", x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def ew(p: dict, x: Any) -> Any:
        return F.gelu(x * GELU_A - GELU_B)

    return {"mlp": torch_anchor.mlp, "cnn": torch_anchor.cnn, "big_mlp": big_mlp,
            "transformer": transformer, "ew": ew}


def _torch_module(loss_fn: Callable[..., Any], params: dict[str, np.ndarray]) -> Any:
    """An nn.Module holding the params (so torch.compile treats them as static
    addresses, as for any model) whose forward is ``loss_fn``."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = {k: k.replace(".", "__") for k in params}
            self.p = torch.nn.ParameterDict({
                s: torch.nn.Parameter(torch.tensor(np.array(params[k], np.float32),
                                                   device="cuda"))
                for k, s in self.names.items()})

        def forward(self, *inputs: Any) -> Any:
            return loss_fn({k: self.p[s] for k, s in self.names.items()}, *inputs)

    return LossModule()


def _torch_inputs(batch: Batch) -> list[Any]:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)).to(
        "cuda", dtype=torch.int64 if a.dtype.kind in "iu" else torch.float32) for a in batch]


def _torch_optimizer(opt: Opt, params: Any, capturable: bool = False) -> Any:
    import torch

    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.lr)
    return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                            capturable=capturable)


class TorchEager:
    """Eager PyTorch: autograd, torch.optim (foreach, the CUDA default)."""

    def __init__(self, loss_fn: Callable[..., Any], opt: Opt, params: dict[str, np.ndarray],
                 batch: Batch, compile_mode: str | None = None) -> None:
        import torch

        self.torch = torch
        self.module = _torch_module(loss_fn, params)
        self.forward = (torch.compile(self.module, mode=compile_mode) if compile_mode
                        else self.module)
        self.optimizer = _torch_optimizer(opt, list(self.module.parameters()))
        self.inputs = _torch_inputs(batch)

    def step_async(self) -> Any:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward(*self.inputs)
        loss.backward()
        self.optimizer.step()
        return loss

    def step(self) -> float:
        return float(self.step_async().item())

    def sync(self, handle: Any = None) -> None:
        self.torch.cuda.synchronize()


class TorchCompiled(TorchEager):
    """torch.compile(mode="reduce-overhead") of the model and loss (forward and its
    AOT-compiled backward, in CUDA graphs); the optimizer eager, as users write it."""

    def __init__(self, loss_fn: Callable[..., Any], opt: Opt, params: dict[str, np.ndarray],
                 batch: Batch) -> None:
        super().__init__(loss_fn, opt, params, batch, compile_mode="reduce-overhead")


class TorchGraph:
    """The whole step (forward, backward, optimizer) captured once in a CUDA graph
    (PyTorch's documented whole-network capture) and replayed. ``host_inputs``: the
    batch is copied from NumPy into the graph's static inputs before each replay."""

    def __init__(self, loss_fn: Callable[..., Any], opt: Opt, params: dict[str, np.ndarray],
                 batch: Batch, host_inputs: bool = False) -> None:
        import torch

        self.torch = torch
        self.module = _torch_module(loss_fn, params)
        weights = list(self.module.parameters())
        self.optimizer = _torch_optimizer(opt, weights, capturable=True)
        self.inputs = _torch_inputs(batch)
        self.host = ([torch.from_numpy(np.ascontiguousarray(a)).to(s.dtype) for a, s in
                      zip(batch, self.inputs, strict=True)] if host_inputs else None)
        initial = [w.detach().clone() for w in weights]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up steps, as the docs ask, then undone
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self.module(*self.inputs).backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for w, w0 in zip(weights, initial, strict=True):
                w.copy_(w0)
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.module(*self.inputs)
            self.loss.backward()
            self.optimizer.step()
        torch.cuda.synchronize()

    def step_async(self) -> Any:
        if self.host is not None:
            for dst, src in zip(self.inputs, self.host, strict=True):
                dst.copy_(src)
        self.graph.replay()
        return self.loss

    def step(self) -> float:
        return float(self.step_async().item())

    def sync(self, handle: Any = None) -> None:
        self.torch.cuda.synchronize()


class TorchForward:
    """Forward only (the ew row): eager, one CUDA graph, or torch.compile."""

    def __init__(self, fn: Callable[..., Any], batch: Batch, how: str) -> None:
        import torch

        self.torch = torch
        self.inputs = _torch_inputs(batch)
        self.out: Any = None
        if how == "eager":
            self.fn = lambda: fn({}, *self.inputs)
        elif how == "compile":
            for x in self.inputs:  # else its CUDA graph copies the 1 GiB input every call
                torch._dynamo.mark_static_address(x)
            compiled = torch.compile(lambda *xs: fn({}, *xs), mode="reduce-overhead")
            self.fn = lambda: compiled(*self.inputs)
        elif how == "graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn({}, *self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = fn({}, *self.inputs)
            self.fn = lambda: (graph.replay(), self.static_out)[1]
        else:
            raise ValueError(how)

    def step_async(self) -> Any:
        self.out = None  # drop the last output first: one 1 GiB result alive at a time
        self.out = self.fn()
        return self.out

    def step(self) -> None:
        self.step_async()
        self.torch.cuda.synchronize()

    def sync(self, handle: Any = None) -> None:
        self.torch.cuda.synchronize()

    def output(self) -> Any:
        self.step()
        return self.out


# ---- JAX -------------------------------------------------------------------------------


def jax_setup() -> Any:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    return jax


def jax_losses(size: Any) -> dict[str, Callable[..., Any]]:
    import jax
    import jax.numpy as jnp
    import jax_anchor as ja

    def big_mlp(p: dict, x: Any, y: Any) -> Any:
        h = x
        i = 1
        while f"fc{i}.weight" in p:
            h = jax.nn.relu(ja._dense(p, f"fc{i}", h))
            i += 1
        return ja._cross_entropy(ja._dense(p, "head", h), y)

    causal = np.tril(np.ones((size.context, size.context), dtype=bool))

    def transformer(p: dict, ids: Any, targets: Any) -> Any:
        b, hd, t, d = ids.shape[0], size.dim // size.heads, size.context, size.dim

        def split(x: Any) -> Any:
            return x.reshape(b, t, size.heads, hd).transpose(0, 2, 1, 3)

        x = p["tok_emb.weight"][ids] + p["pos_emb"]
        h = ja._layer_norm(p, "ln1", x)
        q, k, v = (split(ja._dense(p, f"attn.{n}", h)) for n in "qkv")
        scores = jnp.where(causal, (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd)), -1e9)
        att = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + ja._dense(p, "attn.out", att)
        up = ja._dense(p, "mlp.up", ja._layer_norm(p, "ln2", x))
        x = x + ja._dense(p, "mlp.down", jax.nn.gelu(up, approximate=False))
        logits = ja._dense(p, "head", ja._layer_norm(p, "ln_f", x))
        return ja._cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def ew(p: dict, x: Any) -> Any:
        return jax.nn.gelu(x * GELU_A - GELU_B, approximate=False)

    return {"mlp": ja.mlp, "cnn": ja.cnn, "big_mlp": big_mlp, "transformer": transformer,
            "ew": ew}


class JaxTrainer:
    """One jitted step (value_and_grad + the update, params and state donated), as
    jax_anchor.Trainer, on the GPU. ``host_inputs``: the batch is passed as NumPy
    arrays, so every call copies it to the device."""

    def __init__(self, loss_fn: Callable[..., Any], opt: Opt, params: dict[str, np.ndarray],
                 batch: Batch, host_inputs: bool = False) -> None:
        import jax
        import jax.numpy as jnp
        import jax_anchor as ja

        init_state, update = ja.OPTIMIZERS[opt.kind](opt)

        def train(p: Any, state: Any, *inputs: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(p, *inputs)
            p, state = update(p, state, grads)
            return p, state, loss

        self.train = jax.jit(train, donate_argnums=(0, 1))
        self.inputs = ([np.ascontiguousarray(a) for a in batch] if host_inputs
                       else [jax.device_put(jnp.asarray(a)) for a in batch])
        self.p = {k: jnp.asarray(np.array(v, np.float32)) for k, v in params.items()}
        self.state = init_state(self.p)

    def step_async(self) -> Any:
        self.p, self.state, loss = self.train(self.p, self.state, *self.inputs)
        return loss

    def step(self) -> float:
        return float(self.step_async())

    def sync(self, handle: Any = None) -> None:
        import jax

        jax.block_until_ready(self.p if handle is None else handle)


class JaxForward:
    def __init__(self, fn: Callable[..., Any], batch: Batch) -> None:
        import jax
        import jax.numpy as jnp

        self.fn = jax.jit(lambda *xs: fn({}, *xs))
        self.inputs = [jax.device_put(jnp.asarray(a)) for a in batch]
        self.out: Any = None

    def step_async(self) -> Any:
        self.out = None
        self.out = self.fn(*self.inputs)
        return self.out

    def step(self) -> None:
        self.step_async().block_until_ready()

    def sync(self, handle: Any = None) -> None:
        if self.out is not None:
            self.out.block_until_ready()

    def output(self) -> Any:
        self.step()
        return self.out
