"""The PTX renderer without a GPU: every module ptxas assembles, the launch plans
agree with the kernels they launch, and the legalized math meets its error bounds.

- Every catalog example, the batched op table (as in test_cpu_ops) and a batch of
  random graphs render to PTX that ``ptxas`` assembles for sm_80 and sm_90
  (skipped when no ptxas is found: ``pip install nvidia-cuda-nvcc``, or ``$PTXAS``).
- Each plan's launches name entries of the module with as many arguments, of the
  right kinds, as the entry has parameters, inside the arenas.
- The legalized exp/log/log1p/tanh/erf/sin/cos, evaluated in float32 with NumPy
  (exact ``2**x`` and ``log2`` in place of the hardware's), stay within the ulp
  bounds ``legalize.ERROR_BOUNDS`` states, and special values (inf, NaN, 0) come
  out as NumPy's. The GPU itself is checked by ``benches/gpu_ptx_check.py``.
"""

import itertools
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sympy.codegen.cfunctions import log1p

import ferrograd as fg
from ferrograd.codegen.backends.legalize import ERROR_BOUNDS, emulate, legalize
from ferrograd.codegen.backends.ptx import TARGETS, assemble, find_ptxas, render_ptx
from ferrograd.codegen.backends.ptx_asm import ExprEmitter, PtxFunction, f32_immediate
from ferrograd.codegen.backends.ptx_conv import ConvDims
from ferrograd.codegen.backends.ptx_kernels import (
    BLOCK,
    COLUMN_UNROLL,
    COPY_IDS,
    WARP,
    column_chunks,
    copy_ids_text,
    matrix_strides,
    reduce_mode,
    row_chunks,
)
from ferrograd.codegen.launch_plan import (
    BufferRef,
    DeviceModule,
    DevicePlan,
    Gemm,
    Launch,
    ScalarArg,
)
from ferrograd.ir.builder import apply
from ferrograd.ir.errors import BackendError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from catalog import MODELS, lowered
from ptx_sim import Machine
from test_cpu_ops import all_rows, random_programs
from test_random_graphs import programs

PTXAS = find_ptxas()
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="no ptxas (pip install nvidia-cuda-nvcc)")
CHECK_TARGETS = ("sm_80", "sm_90")


def check_module(module: DeviceModule) -> None:
    """Every launch matches the parameters of the entry it names; arenas exist."""
    params = entry_params(module.source)
    for plan in module.plans.values():
        for step in plan.steps:
            launches = [step.fallback] if isinstance(step, Gemm) else [step]
            if isinstance(step, Gemm):
                assert step.fallback is not None
                for ref in (step.a, step.b, step.c):
                    assert_inside(module, ref)
            for launch in launches:
                assert isinstance(launch, Launch)
                kinds = params[launch.kernel]
                assert len(kinds) == len(launch.args), launch.kernel
                for kind, arg in zip(kinds, launch.args, strict=True):
                    if kind == ".u64":
                        assert isinstance(arg, BufferRef), launch.kernel
                        assert_inside(module, arg)
                    else:
                        assert isinstance(arg, ScalarArg) and f".{arg.kind}" == kind
                assert all(g >= 1 for g in launch.grid) and launch.grid[0] < 2**31
                assert launch.grid[1] <= 65535 and launch.grid[2] <= 65535
                block = launch.block[0] * launch.block[1] * launch.block[2]
                assert 1 <= block <= 1024 and launch.block[0] % 16 == 0
        for arena, offset, _ in plan.results.values():
            assert_inside(module, BufferRef(arena, offset))


def assert_inside(module: DeviceModule, ref: BufferRef) -> None:
    assert ref.arena in module.arena_sizes, ref
    assert 0 <= ref.offset < max(module.arena_sizes[ref.arena], 1), ref


def entry_params(source: str) -> dict[str, list[str]]:
    """entry name -> the PTX types of its parameters."""
    out = {}
    for m in re.finditer(r"\.visible \.entry (\w+)\((.*?)\)", source, re.S):
        out[m.group(1)] = re.findall(r"\.param (\.\w+) ", m.group(2))
    return out


def assemble_all(lw: fg.Lowered) -> None:
    for target in CHECK_TARGETS:
        module = lw.device_module("ptx", target=target)
        check_module(module)
        assert f".target {target}" in module.source
        if PTXAS is not None:
            assert assemble(module.source, target, PTXAS)


# ---- modules -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_example_ptx_assembles(name: str) -> None:
    lw = lowered(name)
    assemble_all(lw)
    module = lw.device_module("ptx")
    assert set(module.plans) == {"forward", "grads", "train"}
    steps = sum(len(p.steps) for p in module.plans.values())
    tiled = {t.kernel for p in module.plans.values() for s in p.steps
             if isinstance(s, Gemm) for t in s.tiled}  # the GEMMs' autotuning candidates
    # forward's kernels are train's too
    assert module.source.count(".entry") - len(tiled) < steps
    assert lw.source("ptx") == module.source


@needs_ptxas
def test_op_table_ptx_assembles() -> None:
    assemble_all(fg.lower(fg.model(all_rows), backend="cpu"))


@needs_ptxas
@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(programs(), min_size=16, max_size=16))
def test_random_graphs_ptx_assembles(batch: list) -> None:
    assemble_all(fg.lower(fg.model(random_programs(batch)), backend="cpu"))


@fg.model
def logic(x: fg.f32["N"], m: fg.bool_["N"], k: fg.i32["N"]):
    pos = (x > 0) & m
    return {"where": fg.where(pos | (x < -1.0), x * 2.0, -x), "mask": ~pos | (x != 0.5),
            "ints": fg.maximum(k * 3 - 7, k) + (x > 1.0).astype("i32"),
            "cast": k.astype("f32") * x + m.astype("f32") - (x * 4).astype("i32").astype("f32"),
            "nonzero": x.astype("bool")}


def test_logic_and_casts_render_to_predicates_and_conversions() -> None:
    lw = fg.lower(logic, backend="cpu", N=100)
    assemble_all(lw)
    src = lw.source("ptx")
    for instruction in ("and.pred", "or.pred", "not.pred", "setp.neu.f32", "cvt.rn.f32.s32",
                        "cvt.rzi.s32.f32", "max.s32", "mul.lo.s32", "ld.global.u8",
                        "st.global.u8", "selp.f32"):
        assert instruction in src, instruction


def test_gather_checks_ids_with_the_error_flag() -> None:
    module = lowered("transformer").device_module("ptx")
    assert module.arena_sizes["flags_u32"] == 1
    assert "red.global.add.f32" in module.source  # scatter-add in the gradient
    gathers = [s for p in module.plans.values() for s in p.steps
               if isinstance(s, Launch) and BufferRef("flags_u32", 0) in s.args]
    assert gathers


def test_ids_in_device_memory_get_a_checking_copy() -> None:
    for name in ("mlp", "transformer"):
        lw = lowered(name)
        module = lw.device_module("ptx")
        inputs = {k for k in lw.graph.index_bounds if k in lw.graph.inputs}
        assert inputs, name
        assert module.id_bounds == {f"input:{k}": lw.graph.index_bounds[k] for k in inputs}
        assert f".entry {COPY_IDS}(" in module.source
    assert lowered("linreg").device_module("ptx").id_bounds == {}


@pytest.mark.parametrize("bad", [None, -1, 10, 2**31 - 1])
def test_the_checking_copy_copies_every_id_and_flags_one_out_of_range(bad: int | None) -> None:
    n, bound, tag = 1000, 10, 3
    ids = np.random.default_rng(0).integers(0, bound, n).astype(np.int32)
    if bad is not None:
        ids[777] = bad
    module = DeviceModule(".version 7.8\n.target sm_80\n.address_size 64\n"
                          + copy_ids_text(), arena_sizes={"src": n, "dst": n, "flag": 1})
    m = Machine(module, {"src": "i32", "dst": "i32", "flag": "u32"})
    m.array("src")[:] = ids
    # two blocks of 256 threads: the grid-stride loop goes round twice
    m.launch(Launch(COPY_IDS, (2, 1, 1), (256, 1, 1), (
        BufferRef("src", 0), BufferRef("dst", 0), ScalarArg("u32", n),
        ScalarArg("u32", bound), BufferRef("flag", 0), ScalarArg("u32", tag))))
    np.testing.assert_array_equal(m.array("dst"), ids)
    assert m.array("flag")[0] == (0 if bad is None else tag)
    if PTXAS is not None:
        assemble(module.source, "sm_90", PTXAS)


def test_fast_math_uses_the_approximate_instructions() -> None:
    lw = lowered("rnn")
    fast = render_ptx(lw.schedules, lw.memory_plan, fast_math=True)
    exact = lw.device_module("ptx").source
    assert "tanh.approx.f32" in fast.source and "tanh.approx.f32" not in exact
    assert "div.full.f32" in fast.source and "div.rn.f32" in exact
    if PTXAS is not None:
        assemble(fast.source, "sm_80", PTXAS)


def test_targets_and_versions() -> None:
    lw = lowered("linreg")
    for target, version in TARGETS.items():
        src = lw.device_module("ptx", target=target).source
        assert f".version {version}\n.target {target}\n.address_size 64" in src
    with pytest.raises(BackendError, match="unknown PTX target"):
        render_ptx(lw.schedules, lw.memory_plan, target="sm_70")


def test_results_have_the_graph_shapes_and_consts_their_bytes() -> None:
    lw = lowered("mlp")
    module = lw.device_module("ptx")
    arena, _, shape = module.plans["forward"].results["out:logits"]
    assert arena == "temp_f32" and shape == lw.graph.node(lw.graph.outputs["logits"]).shape
    assert module.plans["train"].results["out:loss"][2] == ()
    for name in ("const_f32", "const_i32", "const_bool"):
        itemsize = 1 if name == "const_bool" else 4
        assert len(module.consts[name]) == module.arena_sizes[name] * itemsize


def test_gemm_strides_suit_a_blas() -> None:
    assert matrix_strides(1, 8, 0, 1) == (8, 1)  # a row vector, row-major
    assert matrix_strides(8, 1, 1, 0) == (1, 8)  # a contiguous column: column-major
    assert matrix_strides(8, 1, 5, 0) == (5, 1)
    assert matrix_strides(1, 1, 0, 0) == (1, 1)
    assert matrix_strides(4, 6, 6, 1) == (6, 1)
    module = lowered("transformer").device_module("ptx")
    gemms = [s for p in module.plans.values() for s in p.steps if isinstance(s, Gemm)]
    assert gemms and all(1 in (g.a_strides[1], g.a_strides[2]) for g in gemms)


def test_reduce_modes() -> None:
    assert reduce_mode(1000, 10, [[1]]) == "thread"
    assert reduce_mode(4096, 100, [[4096]]) == "thread"  # columns: neighbours read neighbours
    assert reduce_mode(10, 100, [[1]]) == "warp"
    assert reduce_mode(1, 100_000, [[1]]) == "block"
    assert reduce_mode(4096, 4096, [[4096]], columns=True) == "split"
    assert reduce_mode(512, 8192, [[512]], columns=True) == "split"
    assert reduce_mode(256, 128, [[256]], columns=True) == "warp"  # small: one launch
    assert reduce_mode(4096, 4096, [[1]], columns=True) == "block"  # rows, not columns
    assert reduce_mode(16, 200_704, [[12544, 1]]) == "split_rows"  # few long rows
    assert reduce_mode(511, 4096, [[1]]) == "split_rows"
    assert reduce_mode(512, 4096, [[1]]) == "block"  # enough blocks
    assert reduce_mode(16, 4096, [[1]]) == "block"  # small: one launch


# ---- column reductions (bias gradients) ----------------------------------------------------


@fg.model
def column_sums(x: fg.f32["R", 300], w: fg.f32["R", 300], z: fg.f32[9, 130, 300]):
    # a plain column sum, one with a fused product, a max, and reduced dims that do not
    # collapse into one (a slice of the middle axis)
    return {"s": x.sum(0), "p": (x * w).sum(0), "m": x.max(0), "z": z[:, :100].sum((0, 1))}


def _launches(module: DeviceModule, entry: str) -> list[tuple[Launch, str]]:
    comments = {name: c for c, name in re.findall(r"// ([^\n]*)\n\.visible \.entry (\w+)\(",
                                                   module.source)}
    return [(s, comments[s.kernel]) for s in module.plans[entry].steps
            if isinstance(s, Launch)]


def _body(module: DeviceModule, kernel: str) -> str:
    return module.source.split(f".entry {kernel}(")[1].split("\n}\n")[0]


@pytest.mark.parametrize("rows, cols", [(4096, 4096), (8192, 512)])
def test_big_column_reductions_fill_the_gpu(rows: int, cols: int) -> None:
    """A bias gradient (sum over the rows of [rows, cols]) is two launches: a thread per
    (column, chunk of rows) — consecutive threads read consecutive columns, blocks over
    columns × chunks, at least 4 per SM of a 132-SM H200 — then a warp per column over
    its chunks' partials in the scratch arena. No float atomics."""

    @fg.model
    def bias(x: fg.f32["B", 16]):
        h = fg.relu(fg.nn.linear(x, cols, name="fc"))
        return (h * h).mean()

    lw = fg.lower(bias, backend="cpu", B=rows)
    assemble_all(lw)
    module = lw.device_module("ptx")
    split = [(s, c) for s, c in _launches(module, "grads") if "per column and chunk" in c]
    assert len(split) == 1  # fc.bias's gradient
    block, chunks, per = column_chunks(cols, rows)
    assert per % COLUMN_UNROLL == 0 and (chunks - 1) * per < rows <= chunks * per
    assert math.ceil(cols / block) * chunks >= 4 * 132 and cols * chunks >= 2**17
    first, _ = split[0]
    assert first.grid == (math.ceil(cols / block), chunks, 1) and first.block == (block, 1, 1)
    assert first.args[-1] == BufferRef("scratch_f32", 0)
    assert module.arena_sizes["scratch_f32"] >= chunks * cols
    steps = module.plans["grads"].steps
    second = steps[steps.index(first) + 1]
    assert isinstance(second, Launch) and second.args[0] == BufferRef("scratch_f32", 0)
    assert second.grid[0] * second.block[0] >= cols * WARP  # a warp per column
    body, combine = _body(module, first.kernel), _body(module, second.kernel)
    assert body.count("ld.global.f32") == COLUMN_UNROLL + 1  # unrolled, plus the tail
    assert "shfl" not in body and "shfl.sync.bfly.b32" in combine
    for text in (body, combine):
        assert "atom." not in text and "red." not in text


def _documented_order(a: np.ndarray, per: int, combine: str) -> np.ndarray:
    """The split column reduction of ``a`` [length, cols] in float32, in the order its
    kernels document: each chunk of ``per`` rows in row order; lane l of a column's warp
    takes chunks l, l + 32, ... in order; then the butterfly over 16, 8, 4, 2, 1."""
    op = np.add if combine == "sum" else np.maximum
    identity = np.float32(0.0 if combine == "sum" else -np.inf)
    chunks = [a[i:i + per] for i in range(0, a.shape[0], per)]
    partial = []
    for c in chunks:
        acc = np.full(a.shape[1], identity, np.float32)
        for row in c:
            acc = op(acc, row)
        partial.append(acc)
    lanes = np.full((WARP, a.shape[1]), identity, np.float32)
    for j, p in enumerate(partial):
        lanes[j % WARP] = op(lanes[j % WARP], p)
    offset = WARP // 2
    while offset:
        lanes = op(lanes, lanes[np.arange(WARP) ^ offset])
        offset //= 2
    return lanes[0]


def test_split_column_reductions_compute_in_their_documented_order() -> None:
    """The kernels, run by a PTX interpreter (``ptx_sim``), give the float32 bits of the
    documented summation order (so no result depends on scheduling), and agree with the
    NumPy interpreter; the scratch arena starts as NaN, so a partial no thread wrote
    would show. 1003 rows: the last chunk is ragged (the scalar tail runs)."""
    rows = 1003
    lw = fg.lower(column_sums, backend="cpu", R=rows)
    assemble_all(lw)
    module = lw.device_module("ptx")
    comments = [c for _, c in _launches(module, "forward")]
    assert sum("per column and chunk" in c for c in comments) == 4
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    machine = Machine(module, elem)
    rng = np.random.default_rng(3)
    feed = {"x": rng.normal(size=(rows, 300)), "w": rng.normal(size=(rows, 300)),
            "z": rng.normal(size=(9, 130, 300))}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    for name, value in feed.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    machine.run_plan(module.plans["forward"])
    got = {key.removeprefix("out:"): machine.array(arena)[offset:offset + math.prod(shape)]
           for key, (arena, offset, shape) in module.plans["forward"].results.items()}
    x, w, z = feed["x"], feed["w"], feed["z"]
    per = {c: int(re.search(r"chunk of (\d+) rows", c).group(1)) for c in comments
           if "chunk of" in c}
    (per_x,) = {p for c, p in per.items() if "[1003, 300]" in c}
    (per_z,) = {p for c, p in per.items() if "[9, 100, 300]" in c}
    want = {"s": _documented_order(x, per_x, "sum"),
            "p": _documented_order(x * w, per_x, "sum"),
            "m": _documented_order(x, per_x, "max"),
            "z": _documented_order(z[:, :100].reshape(-1, 300), per_z, "sum")}
    ref = fg.lower(column_sums, backend="numpy", R=rows).compile().forward(**feed)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("shape", [(5, 4, 120, 111), (256, 16, 28, 28)])
def test_few_long_rows_split_into_warps(shape: tuple[int, ...]) -> None:
    """A conv bias gradient — [n, c, h, w] summed over (0, 2, 3): c rows of n·h·w — is a
    warp per (row, chunk) into the scratch arena, then a warp per row over its chunks: at
    the CNN's size (16 rows of 200 K, a block per row before) 4 warps per SM at least."""
    rows, length = shape[1], math.prod(shape) // shape[1]

    @fg.model
    def bias_grad(g: fg.f32[shape]):
        return {"db": g.sum((0, 2, 3))}

    lw = fg.lower(bias_grad, backend="cpu")
    assemble_all(lw)
    module = lw.device_module("ptx")
    (first, comment), (second, _) = _launches(module, "forward")
    chunks, per = row_chunks(rows, length)
    assert f"a warp per row and chunk of {per} elements" in comment
    assert per % (WARP * COLUMN_UNROLL) == 0 and (chunks - 1) * per < length <= chunks * per
    assert first.grid[0] * first.block[0] >= rows * chunks * WARP
    assert rows * chunks >= min(4 * 132, length // (WARP * COLUMN_UNROLL))
    assert first.args[-1] == second.args[0] == BufferRef("scratch_f32", 0)
    assert module.arena_sizes["scratch_f32"] >= rows * chunks


def _lanes_then_butterfly(values: np.ndarray) -> np.ndarray:
    """Sum [m, cols] over m as a warp does: lane l adds rows l, l + 32, ... in order from
    0, then the butterfly over 16, 8, 4, 2, 1."""
    lanes = np.zeros((WARP, values.shape[1]), np.float32)
    for j, row in enumerate(values):
        lanes[j % WARP] += row
    offset = WARP // 2
    while offset:
        lanes = lanes + lanes[np.arange(WARP) ^ offset]
        offset //= 2
    return lanes[0]


def test_split_rows_compute_in_their_documented_order() -> None:
    """The two kernels in the PTX interpreter give the bits of the documented order —
    each chunk's elements by lanes then the butterfly, the chunks by lanes then the
    butterfly — and agree with NumPy; 5 × 120 × 111 per row: the last chunk is ragged."""
    shape = (5, 4, 120, 111)

    @fg.model
    def bias_grad(g: fg.f32[shape]):
        return {"db": (g * 0.5).sum((0, 2, 3))}

    rng = np.random.default_rng(4)
    feed = {"g": rng.normal(size=shape).astype(np.float32)}
    got = _simulate(fg.lower(bias_grad, backend="cpu").device_module("ptx"), feed)["db"]
    rows = (feed["g"] * np.float32(0.5)).transpose(1, 0, 2, 3).reshape(4, -1)
    chunks, per = row_chunks(4, rows.shape[1])
    partial = np.stack([_lanes_then_butterfly(
        np.pad(rows[:, j * per:(j + 1) * per], ((0, 0), (0, per)))[:, :per].T)
        for j in range(chunks)])  # [chunks, rows]; padding zeros add nothing
    np.testing.assert_array_equal(got, _lanes_then_butterfly(partial))
    ref = fg.lower(bias_grad, backend="numpy").compile().forward(**feed)["db"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def _simulate(module: DeviceModule, feed: dict[str, np.ndarray], gemm: str = "fallback",
              check: Any = None) -> dict[str, np.ndarray]:
    """The forward plan's results, run in ``ptx_sim`` (arenas start as NaN); ``check``
    (machine, step) runs after each step."""
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    machine = Machine(module, elem, gemm=gemm)
    for name, value in feed.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    plan = module.plans["forward"]
    for step in plan.steps:
        machine.run_plan(DevicePlan("one", [step]))
        if check is not None:
            check(machine, step)
    return {key.removeprefix("out:"): machine.array(arena)[offset:offset + math.prod(shape)]
            .reshape(shape).copy() for key, (arena, offset, shape) in plan.results.items()}


# ---- convolutions: gathers and GEMMs -------------------------------------------------------

# (n, c, h, w, o, kh, kw, stride, padding): strides 1 and 2, paddings 0 and 1, non-square
# images, kernels, strides and paddings
CONVS = [(2, 3, 9, 7, 4, 3, 2, (2, 1), (1, 0)),
         (2, 2, 6, 8, 3, 3, 3, (1, 1), (1, 1)),
         (3, 2, 7, 5, 2, 2, 3, (2, 2), (0, 0)),
         (2, 1, 5, 9, 3, 3, 3, (1, 2), (0, 1)),
         (2, 3, 7, 6, 2, 1, 1, (2, 2), (0, 0))]  # 1×1, stride 2: pixels no tap reads
CONV_OPS = {"forward": "conv2d", "input_grad": "conv2d_input_grad",
            "weight_grad": "conv2d_weight_grad"}


def _conv_model(mode: str, cfg: tuple) -> tuple[Any, dict[str, np.ndarray]]:
    """A model computing one conv of ``mode`` from its two inputs, and random inputs."""
    n, c, h, w, o, kh, kw, stride, padding = cfg
    d = ConvDims(n, c, h, w, o, kh, kw, *stride, *padding)
    shapes = {"x": (n, c, h, w), "w": (o, c, kh, kw), "g": (n, o, d.oh, d.ow)}
    names = {"forward": ("x", "w"), "input_grad": ("g", "w"), "weight_grad": ("x", "g")}[mode]
    extra = {"forward": {}, "input_grad": {"x_shape": shapes["x"]},
             "weight_grad": {"w_shape": shapes["w"]}}[mode]
    a, b = names

    @fg.model
    def one_conv(lhs: fg.f32[shapes[a]], rhs: fg.f32[shapes[b]]):
        return {"out": apply(CONV_OPS[mode], lhs, rhs, stride=stride, padding=padding,
                             **extra)}

    rng = np.random.default_rng(sum(cfg[:7]))
    feed = {"lhs": rng.normal(size=shapes[a]), "rhs": rng.normal(size=shapes[b])}
    return one_conv, {k: v.astype(np.float32) for k, v in feed.items()}


def _im2col(x: np.ndarray, d: ConvDims) -> np.ndarray:
    """col[n, (c, ki, kj), (oh, ow)] = x at (oh·sh − ph + ki, ow·sw − pw + kj), 0 outside."""
    xp = np.pad(x, ((0, 0), (0, 0), (d.ph, d.ph + d.sh), (d.pw, d.pw + d.sw)))
    col = np.empty((d.n, d.c, d.kh, d.kw, d.oh, d.ow), np.float32)
    for ki, kj in itertools.product(range(d.kh), range(d.kw)):
        col[:, :, ki, kj] = xp[:, :, ki:ki + d.sh * d.oh:d.sh, kj:kj + d.sw * d.ow:d.sw]
    return col.reshape(d.n, d.k, d.p)


def _col2im(dcol: np.ndarray, d: ConvDims) -> np.ndarray:
    """The documented order in float32: each input pixel adds its taps (ki, kj) in order
    from 0 — a pixel gets one term per tap at most, so adding tap by tap is that order."""
    dxp = np.zeros((d.n, d.c, d.h + 2 * d.ph + d.sh, d.w + 2 * d.pw + d.sw), np.float32)
    dcol = dcol.reshape(d.n, d.c, d.kh, d.kw, d.oh, d.ow)
    for ki, kj in itertools.product(range(d.kh), range(d.kw)):
        dxp[:, :, ki:ki + d.sh * d.oh:d.sh, kj:kj + d.sw * d.ow:d.sw] += dcol[:, :, ki, kj]
    return dxp[:, :, d.ph:d.ph + d.h, d.pw:d.pw + d.w]


@pytest.mark.parametrize("cfg", CONVS)
def test_convs_are_gathers_and_batched_gemms(cfg: tuple) -> None:
    """Per mode, with K = C·kh·kw and P = OH·OW: forward is im2col into the scratch arena
    and out[n] = W · col[n]; input grad dcol[n] = Wᵀ · g[n] into scratch, then col2im;
    weight grad im2col, part[n] = g[n] · col[n]ᵀ after the columns, then a reduce of the
    N partials. GEMMs batch the images; no float atomics."""
    d = ConvDims(*cfg[:7], *cfg[7], *cfg[8])
    scratch = BufferRef("scratch_f32", 0)
    for mode in CONV_OPS:
        model, _ = _conv_model(mode, cfg)
        lw = fg.lower(model, backend="cpu")
        assemble_all(lw)
        module = lw.device_module("ptx")
        steps = module.plans["forward"].steps
        comments = dict(_launches(module, "forward"))
        kinds = [("gemm" if isinstance(s, Gemm) else comments[s].split(":")[0])
                 for s in steps]
        gemms = [s for s in steps if isinstance(s, Gemm)]
        assert len(gemms) == 1 and gemms[0].batch == d.n and gemms[0].fallback is not None
        g = gemms[0]
        gather = next(s for s in steps if isinstance(s, Launch))
        assert gather.grid[0] * gather.block[0] >= (d.h * d.w if mode == "input_grad" else d.p)
        assert gather.grid[1] == d.n * d.c
        if mode == "forward":
            assert kinds == [f"conv ({mode}) im2col", "gemm"]
            assert (g.m, g.n, g.k) == (d.o, d.p, d.k) and g.b == scratch
            assert (g.a_strides, g.b_strides) == ((0, d.k, 1), (d.k * d.p, d.p, 1))
        elif mode == "input_grad":
            assert kinds == ["gemm", f"conv ({mode}) col2im"]
            assert (g.m, g.n, g.k) == (d.k, d.p, d.o) and g.c == scratch
            assert g.a_strides[0] == 0 and g.c_strides == (d.k * d.p, d.p, 1)
        else:
            assert kinds[:2] == [f"conv ({mode}) im2col", "gemm"] and len(kinds) >= 3
            assert all(k.startswith("reduce (sum") for k in kinds[2:])
            assert (g.m, g.n, g.k) == (d.o, d.k, d.p) and g.b == scratch
            assert g.c.arena == "scratch_f32" and g.c.offset >= d.col
            assert g.b_strides == (d.k * d.p, 1, d.p) and g.c_strides == (d.o * d.k, d.k, 1)
        assert module.arena_sizes["scratch_f32"] >= d.col
        # sums in a fixed order: no float atomics (split-K GEMMs count CTAs with a u32 one)
        assert not re.search(r"\s(atom|red)\.[.\w]*f32", module.source)
        assert set(re.findall(r"\s((?:atom|red)\.[.\w]*)", module.source)) <= {
            "atom.global.add.u32"}


@fg.model
def small_cnn(x: fg.f32["B", 1, 28, 28], y: fg.i32["B"]):
    # benches/workloads.py's W4 (the H200 row cnn256)
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(x, 16, 3, padding=1, name="conv1")), 2)
    h = fg.max_pool2d(fg.relu(fg.nn.conv2d(h, 32, 3, padding=1, name="conv2")), 2)
    return fg.cross_entropy(fg.nn.linear(h.reshape(h.shape[0], -1), 10, name="head"), y)


def test_cnn_step_convs_are_gemms() -> None:
    """The CNN's training step at batch 256: its five convolutions are five batched
    GEMMs over 256 images (plus the head's three), with their gathers (the forward
    convs', whose columns the weight gradients read: test_ptx_conv.py); both conv bias
    gradients split into warps; the scratch arena holds conv2's 256 dcol matrices."""
    lw = fg.lower(small_cnn, backend="cpu", optimizer=fg.optim.SGD(0.01), B=256)
    module = lw.device_module("ptx")
    check_module(module)
    steps = module.plans["train"].steps
    convs = sorted((g.m, g.n, g.k) for g in steps if isinstance(g, Gemm) and g.batch == 256)
    assert convs == sorted([(16, 784, 9), (32, 196, 144), (144, 196, 32), (32, 144, 196),
                            (16, 9, 784)])
    assert sum(isinstance(g, Gemm) for g in steps) == 8
    comments = [c.split(":")[0] for _, c in _launches(module, "train")]
    assert comments.count("conv (forward) im2col") == 2
    assert comments.count("conv (input_grad) col2im") == 1
    assert [c for c in comments if "a warp per row and chunk" in c] == [
        "reduce (sum, a warp per row and chunk of 512 elements)",
        "reduce (sum, a warp per row and chunk of 1024 elements)"]
    assert module.arena_sizes["scratch_f32"] >= 256 * 144 * 196


@pytest.mark.parametrize("gemm", ["numpy", "fallback", "tiled"])
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("mode", list(CONV_OPS))
def test_conv_kernels_match_numpy(mode: str, cfg: tuple, gemm: str) -> None:
    """Run in the PTX interpreter — GEMMs as a library would (NumPy), by the fallback
    kernel or by the register-tiled one — each conv matches the NumPy interpreter; the
    gathers give exact bits: the column matrix is x's elements (0 outside), and col2im
    adds each pixel's taps in (ki, kj) order from the GEMM's dcol."""
    d = ConvDims(*cfg[:7], *cfg[7], *cfg[8])
    model, feed = _conv_model(mode, cfg)
    module = fg.lower(model, backend="cpu").device_module("ptx")
    comments = dict(_launches(module, "forward"))
    seen: list[str] = []

    def check(machine: Machine, step: Launch | Gemm) -> None:
        scratch = machine.array("scratch_f32")
        if isinstance(step, Launch) and " im2col:" in comments[step]:
            np.testing.assert_array_equal(scratch[:d.col], _im2col(feed["lhs"], d).ravel())
            seen.append("im2col")
        if isinstance(step, Launch) and " col2im:" in comments[step]:
            arena, offset, shape = module.plans["forward"].results["out:out"]
            dx = machine.array(arena)[offset:offset + d.n * d.c * d.h * d.w]
            np.testing.assert_array_equal(dx.reshape(shape), _col2im(scratch[:d.col], d))
            seen.append("col2im")

    got = _simulate(module, feed, gemm, check)["out"]
    assert seen == {"forward": ["im2col"], "input_grad": ["col2im"],
                    "weight_grad": ["im2col"]}[mode]
    want = fg.lower(model, backend="numpy").compile().forward(**feed)["out"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ---- the expression emitter -------------------------------------------------------------------


def emit(expr: sp.Expr, kinds: dict[str, str], want: str = "float") -> str:
    f = PtxFunction([])
    em = ExprEmitter(f)
    regs = {"float": "f32", "int": "b32", "bool": "pred"}
    for name, kind in kinds.items():
        em.bind(name, f.reg(regs[kind]), kind)
    em.emit_all([expr], [want])
    return "\n".join(f.lines)


def test_emitter_rounds_ieee_and_divides_once() -> None:
    x, y = sp.symbols("x0 x1", real=True)
    code = emit(x / y + x * y - sp.sqrt(x), {"x0": "float", "x1": "float"})
    assert "div.rn.f32" in code and "mul.rn.f32" in code and "sqrt.rn.f32" in code
    assert "rcp" not in code
    code = emit(x**3 * y**-2, {"x0": "float", "x1": "float"})
    assert code.count("mul.rn.f32") == 3 and "div.rn.f32" in code


def test_emitter_refuses_what_it_cannot_render() -> None:
    x, k = sp.Symbol("x0", real=True), sp.Symbol("x1", integer=True)
    with pytest.raises(BackendError, match="no instruction for gamma"):
        emit(sp.gamma(x), {"x0": "float"})
    with pytest.raises(BackendError, match="no instruction for exp"):
        emit(sp.exp(x), {"x0": "float"})  # not legalized
    with pytest.raises(BackendError, match="mixes float and int"):
        emit(x + k, {"x0": "float", "x1": "int"})
    with pytest.raises(BackendError, match="unbound symbol"):
        emit(x + 1, {})


def test_f32_immediates_are_exact() -> None:
    assert f32_immediate(1.0) == "0f3F800000"
    assert f32_immediate(-0.0) == "0f80000000"
    assert f32_immediate(float("inf")) == "0f7F800000"
    assert f32_immediate(0.1) == "0f3DCCCCCD"


# ---- legalization accuracy ----------------------------------------------------------------------

X = sp.Symbol("x0", real=True)
FUNCTIONS = {"exp": sp.exp, "log": sp.log, "log1p": log1p, "tanh": sp.tanh, "erf": sp.erf,
             "sin": sp.sin, "cos": sp.cos}
EXACT = {"exp": np.exp, "log": np.log, "log1p": np.log1p, "tanh": np.tanh,
         "erf": np.vectorize(math.erf), "sin": np.sin, "cos": np.cos}


def sample(name: str, rng: np.random.Generator, n: int = 20_000) -> np.ndarray:
    (lo, hi), _ = ERROR_BOUNDS[name]
    # log-uniform over a wide positive range, else uniform
    xs = np.exp(rng.uniform(np.log(lo), np.log(hi), n)) if lo > 0 else rng.uniform(lo, hi, n)
    near = rng.uniform(max(lo, -3.0), min(hi, 3.0), n)  # where the branches meet
    tiny = rng.normal(0, 1e-4, n // 10)
    xs = np.concatenate([xs, near, tiny[(tiny > lo) & (tiny < hi)]])
    return xs.astype(np.float32)


@pytest.mark.parametrize("name", list(ERROR_BOUNDS))
def test_legalized_math_meets_its_bound(name: str) -> None:
    xs = sample(name, np.random.default_rng(7))
    got = emulate(legalize(FUNCTIONS[name](X)), {X: xs}).astype(np.float64)
    exact = EXACT[name](xs.astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    bound = ERROR_BOUNDS[name][1]
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= bound, f"{name}({xs[worst]!r}): {ulps[worst]:.2f} ulp > {bound}"


SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-42, -1e-42, 1.0, -1.0, 100.0,
                    -100.0, 89.0, -104.0, 3e38], np.float32)


@pytest.mark.parametrize("name", list(ERROR_BOUNDS))
def test_legalized_math_special_values(name: str) -> None:
    with np.errstate(all="ignore"):
        want = EXACT[name](SPECIAL.astype(np.float64)).astype(np.float32)
        got = emulate(legalize(FUNCTIONS[name](X)), {X: SPECIAL})
    if name in ("sin", "cos"):  # no reduction for huge |x| (documented): skip 3e38
        got, want = got[:-1], want[:-1]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-37, err_msg=name)


def test_erf_is_short_in_both_branches() -> None:
    """Both erf branches run for every element of a warp, so each is a short fma Horner
    with a single ex2 (GELU over 2^28 floats was issue-bound with the long form)."""
    f = PtxFunction([])
    em = ExprEmitter(f)
    em.bind("x0", f.reg("f32"), "float")
    em.emit_all([legalize(sp.erf(X))], ["float"])
    ops = [line.split()[0] for line in f.lines]
    assert ops.count("ex2.approx.f32") == 1 and ops.count("fma.rn.f32") == 13
    assert ops.count("mul.rn.f32") <= 1 and len(ops) <= 30, ops


def test_nested_selects_legalize() -> None:
    """Arithmetic on legalized selects (|·| of a tanh, a quotient of an erf) must not
    trip sympy's assumptions: two nestings random graphs produced, which failed with
    "Invalid comparison of non-real" while Select was not known to be real."""
    x0, x1, x2, x3 = sp.symbols("x0:4", real=True)
    c = sp.Float(-0.96086061000823974609375)
    nested_tanh = c * sp.tanh(sp.tanh(sp.Float(0.5) * (x0**2 + sp.Float(0.5))**sp.tanh(x0))**2
                              / 2) + c
    t = sp.exp(sp.tanh(x2 / x3))
    gelu_grad_of_exp = (1 - sp.tanh(x2 / x3)**2) * t * (x0 + x1 * (
        sp.erf(t / sp.sqrt(2)) / 2 + sp.Rational(1, 2)
        + t * sp.exp(-t**2 / 2) / sp.sqrt(2 * sp.pi)))
    for e in (nested_tanh, gelu_grad_of_exp):
        out = legalize(e)
        assert not out.has(sp.tanh, sp.erf, sp.exp)
        fn = sp.lambdify([x0, x1, x2, x3], e, "numpy")
        env = {x0: np.float32([0.7]), x1: np.float32([-1.3]), x2: np.float32([0.4]),
               x3: np.float32([1.1])}
        assert emulate(out, env)[0] == pytest.approx(fn(0.7, -1.3, 0.4, 1.1), rel=1e-5)


def test_pow_legalization() -> None:
    x, y = sp.symbols("x0 x1", real=True)
    assert legalize(x**3) == x**3 and legalize(x ** sp.Rational(-1, 2)) == x ** sp.Rational(-1, 2)
    e = legalize(x**y)
    xs = np.array([2.0, -2.0, -2.0, -2.0, 0.0, 0.0, 3.0, np.nan], np.float32)
    ys = np.array([0.5, 3.0, 2.0, 0.5, 2.0, 0.0, -1.5, 0.0], np.float32)
    with np.errstate(all="ignore"):
        want = np.power(xs, ys)
    np.testing.assert_allclose(emulate(e, {x: xs, y: ys}), want, rtol=1e-6)
    beta = legalize(sp.Float(0.9) ** y)  # Adam's bias correction: log2 of a constant
    ys = np.arange(1, 50, dtype=np.float32)
    np.testing.assert_allclose(emulate(beta, {y: ys}), np.float32(0.9) ** ys, rtol=2e-6)


def test_sign_and_heaviside_pass_nan_through() -> None:
    xs = np.array([-2.0, 0.0, 3.0, np.nan], np.float32)
    np.testing.assert_array_equal(emulate(legalize(sp.sign(X)), {X: xs}), np.sign(xs))
    np.testing.assert_array_equal(emulate(legalize(sp.Heaviside(X, 0.5)), {X: xs}),
                                  np.heaviside(xs, 0.5))


def _entries(source: str) -> dict[str, str]:
    """Entry name -> body, elementwise kernels only."""
    return {name: body for name, body in re.findall(
        r"// elementwise[^\n]*\n\.visible \.entry (\w+)\((.*?\n)\}\n", source, re.S)}


def _unmerged(lw: fg.Lowered) -> DeviceModule:
    """The PTX module with every elementwise kernel a launch of its own."""
    return render_ptx(lw.schedules, lw.memory_plan, merge_launches=False)


def test_contiguous_elementwise_loads_16_bytes_per_thread() -> None:
    """A big contiguous elementwise kernel moves 4 elements per thread and step with v4
    loads and stores, grid from n/4, and a scalar tail for n % 4."""

    @fg.model
    def fused(x: fg.f32["N"], k: fg.i32["N"]):
        return {"y": fg.gelu(x * 1.7 - 0.3), "j": k * 3 + 1}

    n = 1_000_003
    lw = fg.lower(fused, backend="cpu", N=n)
    assemble_all(lw)
    module = _unmerged(lw)  # each kernel a launch (``ptx_horizontal`` would merge them)
    entries = _entries(module.source)
    launches = [s for s in module.plans["forward"].steps if isinstance(s, Launch)]
    bodies = "".join(entries[s.kernel] for s in launches)
    for op in ("ld.global.v4.f32", "st.global.v4.f32", "ld.global.v4.b32", "st.global.v4.b32",
               "ld.global.f32", "st.global.f32", f"setp.lt.u32 %p1, %r7, {n // 4};"):
        assert op in bodies, op  # scalar loads: the tail
    for launch in launches:
        threads = launch.grid[0] * launch.block[0]
        assert launch.block == (256, 1, 1)
        assert threads == min(4096 * 256, math.ceil(n / 4 / 256) * 256)
    kernels = fg.lower(fused, backend="cuda", N=n).kernels  # what step.kernels shows
    assert all("ld.global.v4" in k.source for k in kernels)


def test_broadcast_and_strided_elementwise_stay_scalar() -> None:
    """Views that are not contiguous over the iteration space (a transpose, a broadcast
    row) and bools keep the scalar loop; a broadcast scalar alone does not stop v4."""

    @fg.model
    def mixed(a: fg.f32["N", "M"], b: fg.f32["M"], c: fg.f32["N", "M"], s: fg.f32[1],
              m: fg.bool_["N", "M"]):
        return {"t": a.transpose(1, 0) * 2.0, "row": a + b, "scalar": c * s + 1.0,
                "mask": fg.where(m, c, a)}

    lw = fg.lower(mixed, backend="cpu", N=64, M=48)
    assemble_all(lw)
    src = _unmerged(lw).source
    entries = _entries(src)
    assert entries
    vector = [name for name, body in entries.items() if "v4" in body]
    scalar = [name for name, body in entries.items() if "v4" not in body]
    assert scalar, "strided and broadcast kernels keep the scalar loop"
    for body in (entries[n] for n in vector):
        assert "ld.global.u8" not in body  # never bools
    comments = re.findall(r"// (elementwise[^\n]*)", src)
    assert any("4 per thread" not in c for c in comments)


def _block_then_butterfly(values: np.ndarray) -> np.ndarray:
    """Sum [m, cols] over m as a block of 256 threads does: thread t adds rows t, t + 256,
    ... in order, each warp its butterfly, then the butterfly of the 8 warps' sums."""
    threads = np.zeros((BLOCK, values.shape[1]), np.float32)
    for j, row in enumerate(values):
        threads[j % BLOCK] += row
    warps = [_lanes_then_butterfly(threads[w:w + WARP]) for w in range(0, BLOCK, WARP)]
    return _lanes_then_butterfly(np.stack(warps))


@pytest.mark.parametrize("rows, length, mode", [(5, 33, "warp"), (3, 300, "warp"),
                                                (2, 2049, "block"), (1, 8192 + 5, "block")])
def test_long_rows_sum_in_the_documented_order(rows: int, length: int, mode: str) -> None:
    """A warp or block per row loads several of a lane's elements before adding any; the
    sums keep the one-by-one order (the bits of lane order, then the butterflies), ragged
    ends included, and agree with NumPy."""

    @fg.model
    def row_sums(x: fg.f32[rows, length]):
        return {"s": x.sum(1)}

    lw = fg.lower(row_sums, backend="cpu")
    module = lw.device_module("ptx")
    ((_, comment),) = _launches(module, "forward")
    assert f"a {mode} per row" in comment
    x = np.random.default_rng(length).normal(size=(rows, length)).astype(np.float32)
    got = _simulate(module, {"x": x})["s"]
    order = _lanes_then_butterfly if mode == "warp" else _block_then_butterfly
    np.testing.assert_array_equal(got, order(x.T))
    np.testing.assert_allclose(got, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)
    if PTXAS is not None:
        assert assemble(module.source, "sm_90", PTXAS)
