"""What a step needs to know about its training graph, without the training graph.

A step is called with the model's inputs, returns its outputs and keeps params and
optimizer state. The traced forward graph knows the inputs, outputs and params;
autodiff and the optimizer add three things: the optimizer's state buffers, the
params that get a gradient and the names a training step updates. ``Interface``
holds the forward graph and those three, so a step whose module comes from the
cache (``cache.py`` stores them beside it) runs without differentiating, optimizing
or scheduling the model again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferrograd.ir.graph import DTYPES, Graph, numpy_dtype

Spec = tuple[tuple[int, ...], str]
"""(shape, dtype) of one tensor."""


@dataclass(frozen=True)
class Interface:
    """A step's inputs, outputs, params and optimizer state, by name."""

    graph: Graph
    """Has the model's inputs, params and outputs (with index bounds and declared
    dims): the graph as traced, or the training graph itself."""
    state: dict[str, Spec]
    grads: tuple[str, ...]
    updates: tuple[str, ...]

    @classmethod
    def of(cls, graph: Graph, train: Graph) -> Interface:
        """The interface of training graph ``train``, whose model ``graph`` traces."""
        return cls(graph, _specs(train, train.state), tuple(train.grads), tuple(train.updates))

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def inputs(self) -> dict[str, int]:
        """Input name -> its node in ``graph``, in call order."""
        return self.graph.inputs

    @functools.cached_property
    def outputs(self) -> dict[str, Spec]:
        return _specs(self.graph, self.graph.outputs)

    @functools.cached_property
    def params(self) -> dict[str, Spec]:
        return _specs(self.graph, self.graph.params)

    def initial_state(self) -> dict[str, np.ndarray]:
        """Zero initial values of every optimizer state buffer."""
        return {k: np.zeros(shape, numpy_dtype(dtype)) for k, (shape, dtype) in self.state.items()}

    def to_json(self) -> dict[str, Any]:
        """Everything but the graph, as JSON values (with the graph's inputs, outputs and
        params, which ``from_json`` checks against the graph it is given)."""
        def table(specs: dict[str, Spec]) -> list[list[Any]]:
            return [[k, list(shape), dtype] for k, (shape, dtype) in specs.items()]

        return {"model": self.name,
                "inputs": table(_specs(self.graph, self.graph.inputs)),
                "outputs": table(self.outputs), "params": table(self.params),
                "state": table(self.state), "grads": list(self.grads),
                "updates": list(self.updates)}

    @classmethod
    def from_json(cls, graph: Graph, data: dict[str, Any]) -> Interface:
        """The interface ``to_json`` wrote, for a model traced as ``graph``. Raises
        ``ValueError`` (or ``KeyError``, ``TypeError``) when ``data`` is malformed or
        describes another model."""
        def table(rows: Any) -> dict[str, Spec]:
            specs = {}
            for name, shape, dtype in rows:
                dims = tuple(int(d) for d in shape)
                if not isinstance(name, str) or dtype not in DTYPES or min(dims, default=0) < 0:
                    raise ValueError(f"bad entry {name!r}: {shape!r} {dtype!r}")
                specs[name] = (dims, str(dtype))
            return specs

        for key, ids in (("inputs", graph.inputs), ("outputs", graph.outputs),
                         ("params", graph.params)):
            if list(table(data[key]).items()) != list(_specs(graph, ids).items()):
                raise ValueError(f"the entry's {key} are not the model's")
        if data["model"] != graph.name:
            raise ValueError("the entry describes another model")
        state = table(data["state"])
        grads = tuple(str(k) for k in data["grads"])
        updates = tuple(str(k) for k in data["updates"])
        if not set(grads) <= set(graph.params) or not set(updates) <= {*graph.params, *state}:
            raise ValueError("grads or updates name unknown params")
        return cls(graph, state, grads, updates)


def _specs(graph: Graph, table: dict[str, int]) -> dict[str, Spec]:
    return {k: (graph.node(v).shape, graph.node(v).dtype) for k, v in table.items()}
