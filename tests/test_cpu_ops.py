"""Every op-table row and many random graphs, compiled on the CPU backend and checked
against the NumPy interpreter.

Building a module costs seconds, so rows (and random programs) are batched: one
model holds all of them side by side, each with its own params, its own output
and its own term in the loss. The loss is a sum of independent terms, so the
gradient of a row's params is that row's VJP.
"""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops import ROWS, Row, make_case
from test_random_graphs import Program, apply_step, programs

import ferrograd as fg
from ferrograd.ir.builder import Var

pytestmark = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")


def _f32_only(row: Row) -> bool:
    """The CPU backend computes in float32: rows that build float64 values are skipped."""
    return all(n.dtype != "f64" for n in make_case(row).graph.nodes())


CPU_ROWS = [r for r in ROWS if _f32_only(r)]


def _row_inputs(row: Row) -> list[np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(row.name.encode()))
    return [a.domain(rng, a.shape) for a in row.args]


def _sum(terms: list[Var]) -> Var:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def all_rows() -> dict[str, Var]:
    outputs: dict[str, Var] = {}
    terms = []
    for j, row in enumerate(CPU_ROWS):
        values = _row_inputs(row)
        xs = [fg.param(f"r{j}.x{i}", v.shape, init=v)
              if v.dtype == np.float64 and not a.const else
              fg.constant(v.astype(np.float32) if v.dtype == np.float64 else v)
              for i, (a, v) in enumerate(zip(row.args, values, strict=True))]
        out = row.build(*xs)
        outputs[f"r{j}"] = out
        if out.dtype == "f32":
            c = np.random.default_rng(j).normal(size=out.shape)
            terms.append((out * fg.constant(c, "f32")).sum())
    outputs["loss"] = _sum(terms)
    return outputs


def compare(cpu: fg.Step, ref: fg.Step, names: dict[str, str], rtol: float,
            atol: float) -> None:
    got, want = cpu.forward(), ref.forward()
    for key, label in names.items():
        if want[key].dtype.kind in "bi":
            np.testing.assert_array_equal(got[key], want[key], err_msg=label)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=label)
    got, want = cpu.grads(), ref.grads()
    for key in want:
        label = names.get(key.split(".")[0], key)
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {key} ({label})")


def test_every_op_row_matches_the_interpreter() -> None:
    model = fg.model(all_rows)
    cpu = fg.compile(model, backend="cpu")
    ref = fg.compile(model, backend="numpy")
    assert len(CPU_ROWS) > 100
    compare(cpu, ref, {f"r{j}": row.name for j, row in enumerate(CPU_ROWS)},
            rtol=2e-5, atol=2e-6)


def random_programs(batch: list[Program]):
    def model() -> Var:
        terms = []
        for j, program in enumerate(batch):
            rng = np.random.default_rng(program.seed)
            vals = [fg.param(f"g{j}.p{i}", s, init=rng.normal(size=s))
                    for i, s in enumerate(program.params)]
            for step in program.steps:
                vals.append(apply_step(step, vals))
            used = {k for s in program.steps for k in s.args}
            terms += [(v * fg.constant(rng.normal(size=v.shape), "f32")).sum()
                      for k, v in enumerate(vals) if k not in used]
        return _sum(terms)

    return model


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(programs(), min_size=24, max_size=24))
def test_random_graphs_match_the_interpreter(batch: list[Program]) -> None:
    model = fg.model(random_programs(batch))
    cpu = fg.compile(model, backend="cpu")
    ref = fg.compile(model, backend="numpy")
    compare(cpu, ref, {"loss": "loss"}, rtol=1e-4, atol=1e-4)
