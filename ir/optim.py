"""Optimizers: each appends its update ops and state to a graph that has grads.

The update of every param (and of each state buffer) becomes ``graph.updates
[name]``; a step computes all of them, then writes them back. Formulas follow
PyTorch's (torch.optim) exactly, as each docstring states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .builder import Var, apply, constant, source_as
from .errors import IRError
from .graph import Graph


class Optimizer:
    """Base: subclasses define ``update(p, g, state) -> new p`` on Vars."""

    #: names of the per-param state buffers, created zero-initialized
    slots: tuple[str, ...] = ()
    uses_step_count = False

    def apply(self, graph: Graph) -> Graph:
        if not graph.grads:
            raise IRError("the optimizer needs gradients: run fg.grad first")
        if graph.updates:
            raise IRError("an optimizer was already applied to this graph")
        g = graph.copy()
        step: Var | None = None
        if self.uses_step_count:
            t = self._state(g, "step", (), "f32", None)
            step = t + 1.0
            g.updates["step"] = step.id
        for name, gid in g.grads.items():
            if _unreached(g, gid):
                continue  # as PyTorch skips a param whose .grad is None: no decay, no state
            pid = g.params[name]
            p = Var(g, pid)
            with source_as(p.src):
                state = {slot: self._state(g, f"{slot}:{name}", p.shape, p.dtype, p.src)
                         for slot in self.slots}
                new_p, new_state = self.update(p, Var(g, gid), state, step)
                g.updates[name] = new_p.id
                for slot, v in new_state.items():
                    g.updates[f"{slot}:{name}"] = v.id
        return g

    @staticmethod
    def _state(g: Graph, name: str, shape: tuple, dtype: str, src: str | None) -> Var:
        nid = g.add("state", (), {"shape": shape, "dtype": dtype, "init": "zeros",
                                  "init_args": {}}, name=name, src=src)
        g.state[name] = nid
        return Var(g, nid)

    def update(self, p: Var, g: Var, state: dict[str, Var], step: Var | None
               ) -> tuple[Var, dict[str, Var]]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, **vars(self)}


@dataclass
class SGD(Optimizer):
    """Stochastic gradient descent, as torch.optim.SGD (dampening 0)::

        g = grad + weight_decay * p
        buf = momentum * buf + g                       (if momentum)
        g = g + momentum * buf if nesterov else buf    (if momentum)
        p = p - lr * g
    """

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        self.slots = ("momentum_buffer",) if self.momentum else ()

    def update(self, p: Var, g: Var, state: dict[str, Var], step: Var | None
               ) -> tuple[Var, dict[str, Var]]:
        if self.weight_decay:
            g = g + self.weight_decay * p
        new: dict[str, Var] = {}
        if self.momentum:
            buf = self.momentum * state["momentum_buffer"] + g
            new["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p - self.lr * g, new


@dataclass
class Adam(Optimizer):
    """Adam, as torch.optim.Adam (L2 weight decay added to the gradient)::

        t = t + 1
        g = grad + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    slots = ("exp_avg", "exp_avg_sq")
    uses_step_count = True
    decoupled = False

    def update(self, p: Var, g: Var, state: dict[str, Var], step: Var | None
               ) -> tuple[Var, dict[str, Var]]:
        assert step is not None
        b1, b2 = self.betas
        if self.weight_decay and self.decoupled:
            p = p * (1.0 - self.lr * self.weight_decay)
        elif self.weight_decay:
            g = g + self.weight_decay * p
        m = b1 * state["exp_avg"] + (1.0 - b1) * g
        v = b2 * state["exp_avg_sq"] + (1.0 - b2) * (g * g)
        bias1 = 1.0 - apply("pow", constant(p.graph, b1, p.dtype), step.astype(p.dtype))
        bias2 = 1.0 - apply("pow", constant(p.graph, b2, p.dtype), step.astype(p.dtype))
        denom = apply("sqrt", v) / apply("sqrt", bias2) + self.eps
        return p - (self.lr / bias1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


@dataclass
class AdamW(Adam):
    """AdamW, as torch.optim.AdamW: decoupled weight decay, then Adam::

        p = p * (1 - lr * weight_decay)
        (then the Adam update above, without weight decay in the gradient)
    """

    weight_decay: float = 1e-2
    decoupled = True


@dataclass
class RMSprop(Optimizer):
    """RMSprop, as torch.optim.RMSprop (not centered)::

        g = grad + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2
        buf = momentum * buf + g / (sqrt(v) + eps); p = p - lr * buf   (if momentum)
        p = p - lr * g / (sqrt(v) + eps)                                (otherwise)
    """

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        self.slots = ("square_avg", "momentum_buffer") if self.momentum else ("square_avg",)

    def update(self, p: Var, g: Var, state: dict[str, Var], step: Var | None
               ) -> tuple[Var, dict[str, Var]]:
        if self.weight_decay:
            g = g + self.weight_decay * p
        v = self.alpha * state["square_avg"] + (1.0 - self.alpha) * (g * g)
        scaled = g / (apply("sqrt", v) + self.eps)
        new = {"square_avg": v}
        if self.momentum:
            buf = self.momentum * state["momentum_buffer"] + scaled
            new["momentum_buffer"] = buf
            scaled = buf
        return p - self.lr * scaled, new


def _unreached(g: Graph, gid: int) -> bool:
    """True for the exact-zero gradient autodiff gives a param that does not reach the loss."""
    node = g.node(gid)
    return node.op == "const" and not node.attrs["value"].any()


def init_state(graph: Graph) -> dict[str, np.ndarray]:
    """Zero initial values of every optimizer state buffer."""
    return {name: np.zeros(graph.node(nid).shape, np.dtype("float32")
                           if graph.node(nid).dtype == "f32" else np.float64)
            for name, nid in graph.state.items()}
