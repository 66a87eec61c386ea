"""Matmul epilogues: the elementwise kernel that consumes a product runs inside the
matmul kernel (CPU: per block of rows, right after the block's product). The
schedule must fuse where it can and refuse where it cannot, and the compiled step
must match the NumPy interpreter on both the one-block path (small products) and
the rayon path (products above the runtime's parallel threshold), including
optimizer updates written in place by the epilogue of a weight-gradient matmul.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
import sympy as sp

import ferrograd as fg
from ferrograd.codegen.backends.base import batch_as_rows
from ferrograd.codegen.kernel_ir import Elementwise, Matmul, unfused

needs_cargo = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")


def mlp(hidden: int):
    @fg.model
    def net(x: fg.f32["B", "N"], y: fg.i32["B"]):
        h = fg.relu(fg.nn.linear(x, hidden))
        h = fg.tanh(fg.nn.linear(h, hidden))
        return fg.cross_entropy(fg.nn.linear(h, 10), y)
    return net


def kernels(lowered: fg.Lowered, entry: str) -> list:
    return next(s for s in lowered.schedules if s.entry == entry).kernels


def test_bias_and_activation_become_the_epilogue() -> None:
    lw = fg.lower(mlp(32), optimizer=fg.optim.SGD(lr=0.1), B=8, N=20)
    fwd = kernels(lw, "forward")
    products = [k for k in fwd if isinstance(k, Matmul)]
    assert [k.ops for k in products] == [["matmul", "add", "relu"], ["matmul", "add", "tanh"],
                                         ["matmul", "add"]]
    for k in products:
        assert k.epilogue is not None and k.product_symbol() is not None
    # No elementwise kernel reads a product any more in the forward pass.
    outs = {k.out.buffer for k in products}
    assert not any(v.buffer in outs for k in fwd if isinstance(k, Elementwise)
                   for v in k.reads())


def test_sgd_update_is_the_epilogue_of_the_weight_gradient() -> None:
    lw = fg.lower(mlp(32), optimizer=fg.optim.SGD(lr=0.1), B=8, N=20)
    train = kernels(lw, "train")
    updates = [k for k in train if isinstance(k, Matmul) and k.epilogue is not None
               and any(v.buffer.startswith("param_") and v.buffer.endswith("weight")
                       for v in k.epilogue.writes())]
    assert len(updates) == 3  # every weight: dW = xᵀ·g and W -= lr·dW in one kernel


def test_no_epilogue_when_the_product_has_users_elsewhere() -> None:
    @fg.model
    def two_users(x: fg.f32[4, 6], w: fg.f32[6, 5]):
        p = fg.matmul(x, w)
        return fg.sum(fg.exp(p)) + fg.sum(p, axis=0).sum()

    lw = fg.lower(two_users, backend="cpu")
    (product,) = [k for k in kernels(lw, "forward") if isinstance(k, Matmul)]
    assert product.epilogue is None


def test_unfused_splits_product_and_epilogue() -> None:
    lw = fg.lower(mlp(32), B=8, N=20)
    k = next(k for k in kernels(lw, "forward") if isinstance(k, Matmul))
    bare, epilogue = unfused(k)
    assert isinstance(bare, Matmul) and bare.epilogue is None and bare.ops == ["matmul"]
    assert isinstance(epilogue, Elementwise) and epilogue.name == f"{k.name}_epilogue"
    assert bare.out in epilogue.reads()


def feed(graph, rng) -> dict[str, np.ndarray]:
    out = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        if node.dtype == "i32":
            out[name] = rng.integers(0, 10, node.shape, dtype=np.int32)
        else:
            out[name] = rng.normal(size=node.shape).astype(np.float32)
    return out


def close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@needs_cargo
@pytest.mark.parametrize("batch,hidden,n_in,optimizer", [
    (8, 32, 20, fg.optim.SGD(lr=0.1, momentum=0.9)),  # one block on the calling thread
    (128, 256, 784, fg.optim.Adam(lr=1e-3)),  # 2·128·784·256 flops: blocks on rayon
    (96, 160, 300, fg.optim.AdamW(lr=1e-3)),  # ragged last block
])
def test_fused_step_matches_interpreter(batch: int, hidden: int, n_in: int, optimizer) -> None:
    model = mlp(hidden)
    cpu = fg.compile(model, optimizer=optimizer, backend="cpu", seed=1, B=batch, N=n_in)
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", seed=1, B=batch, N=n_in)
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = feed(ref.graph, rng)
        close(cpu.forward(**x), ref.forward(**x), 1e-4, 1e-5)
        close(cpu.grads(**x), ref.grads(**x), 2e-4, 2e-5)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-4, abs=1e-5)
        close(cpu.params, ref.params, 2e-4, 2e-5)
        close(cpu.state, ref.state, 2e-4, 2e-5)


@needs_cargo
def test_update_that_the_product_reads_is_not_written_in_place() -> None:
    """dW of sum(W·W) reads W, so its epilogue must not overwrite W block by block."""
    @fg.model
    def square(x: fg.f32[96, 96]):
        w = fg.param("w", (96, 96), "normal", std=0.1)
        return fg.mean(fg.matmul(fg.matmul(x, w), w))

    cpu = fg.compile(square, optimizer=fg.optim.SGD(lr=0.5), backend="cpu")
    ref = fg.compile(square, optimizer=fg.optim.SGD(lr=0.5), backend="numpy")
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = feed(ref.graph, rng)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-4, abs=1e-6)
        close(cpu.params, ref.params, 1e-4, 1e-6)


def test_no_kernel_reads_a_param_after_its_update() -> None:
    """Readers of a param's old value — also through a transpose or reshape view, as
    an input-gradient matmul reads its weight — run before the kernel that updates it
    in place (a fused weight-gradient epilogue has no data edge to them)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from catalog import MODELS

    for name, make in MODELS.items():
        model, optimizer, dims = make()
        lw = fg.lower(model, optimizer=optimizer, backend="cpu", **dims)
        train = kernels(lw, "train")
        # Params only: a train step never reads a param's new value (optimizer state
        # such as Adam's step count is read after its update, legitimately).
        persistent = {b for k in train for v in k.writes() if (b := v.buffer).startswith("param_")}
        for buf in persistent:
            writers = [i for i, k in enumerate(train) if any(v.buffer == buf for v in k.writes())]
            readers = [i for i, k in enumerate(train) if i not in writers
                       and any(v.buffer == buf for v in k.reads())]
            assert not readers or max(readers) < min(writers), (name, buf, readers, writers)


def test_cuda_plan_puts_bias_and_relu_into_the_gemm() -> None:
    """On CUDA a linear layer is one GEMM step (cuBLASLt's bias/ReLU epilogue or the
    fallback kernel's): no elementwise launch is left after it in the forward pass."""
    from ferrograd.codegen.launch_plan import Gemm

    lw = fg.lower(mlp(32), backend="cuda", B=8, N=20)
    steps = lw.device_module().plans["forward"].steps
    gemms = [s for s in steps if isinstance(s, Gemm)]
    assert [(s.bias is not None, s.relu) for s in gemms] == [(True, True), (True, False),
                                                            (True, False)]
    # relu(x·W + b) and tanh(h·W + b) + the logits: 3 GEMMs, one tanh, then the loss.
    after_first = steps[steps.index(gemms[0]) + 1]
    assert after_first is gemms[1]
    for g in gemms:
        assert g.fallback is not None and g.fallback.args[3] == g.bias  # the kernel adds it too


def _weight_offsets(lw: fg.Lowered) -> set[tuple[str, int]]:
    """Where each weight (not bias) lives: ("param", offset)."""
    return {("param", offset) for name, (_, offset, _) in lw.memory_plan.persistent.items()
            if name.startswith("param_") and name.endswith("weight")}


def test_cuda_sgd_update_is_the_gemms_accumulation() -> None:
    """Plain SGD's W -= lr·dW is the weight-gradient GEMM's own accumulation, C = -lr·A·B
    + 1·C with C = W (in cuBLAS and in the fallback kernel's scalars): no update kernel
    runs after it, and the rendered plan says so."""
    from ferrograd.codegen.launch_plan import Gemm, Launch, ScalarArg

    lw = fg.lower(mlp(32), optimizer=fg.optim.SGD(lr=0.01), backend="cuda", B=8, N=20)
    steps = lw.device_module().plans["train"].steps
    assert not [s.kernel for s in steps if isinstance(s, Launch) and "mul_sub" in s.kernel
                and s.kernel.endswith("_epilogue")]
    updates = [s for s in steps if isinstance(s, Gemm) and s.beta != 0]
    alpha = float(np.float32(-0.01))
    assert {(g.c.arena, g.c.offset) for g in updates} == _weight_offsets(lw)
    for g in updates:
        assert (g.alpha, g.beta, g.bias) == (alpha, 1.0, None)
        assert g.fallback is not None
        assert g.fallback.args[-2:] == (ScalarArg("f32", alpha), ScalarArg("f32", 1.0))
        assert g.tiled and all(t.args[-2:] == g.fallback.args[-2:] for t in g.tiled)
    others = [s for s in steps if isinstance(s, Gemm) and s not in updates]
    assert others and all((g.alpha, g.beta) == (1.0, 0.0) for g in others)
    rs = lw.crate.files["src/cuda_step.rs"].decode()
    assert rs.count("alpha: -0.01, beta: 1.0, tiled: &[") == len(updates)


def test_other_updates_keep_their_kernel() -> None:
    """Adam's update, and SGD with momentum (two outputs), are not one accumulation:
    the GEMM writes the product and the update runs as a kernel after it."""
    from ferrograd.codegen.launch_plan import Gemm, Launch

    for optimizer in (fg.optim.Adam(lr=1e-3), fg.optim.SGD(lr=0.01, momentum=0.9)):
        lw = fg.lower(mlp(32), optimizer=optimizer, backend="cuda", B=8, N=20)
        steps = lw.device_module().plans["train"].steps
        assert all((s.alpha, s.beta) == (1.0, 0.0) for s in steps if isinstance(s, Gemm))
        epilogues = [s for s in steps if isinstance(s, Launch) and s.kernel.endswith("_epilogue")]
        assert len(epilogues) >= 3, optimizer  # one per weight (at least)


def _update_kernel(target: str, a: str = "x", scale: float = -0.5) -> Matmul:
    """dW = aᵀ·g [6, 4] with the epilogue ``target = W + scale·dW``."""
    from ferrograd.codegen.kernel_ir import View

    def view(buffer: str, shape: tuple[int, int] = (6, 4)) -> View:
        return View(buffer, "f32", 0, shape, (shape[1], 1))

    product = view("dw")
    x, p = sp.Symbol("x0"), sp.Symbol("x1")
    epilogue = Elementwise("mul_sub", ["mul", "sub"], (6, 4), {"x0": view("w"), "x1": product},
                           [(view(target), scale * p + x)])
    a_t = View(a, "f32", 0, (6, 3), (1, 6))  # a [3, 6] transposed
    return Matmul("matmul_mul_sub", ["matmul", "mul", "sub"], (), 6, 4, 3, a_t,
                  view("g", (3, 4)), product, epilogue)


def test_only_an_in_place_update_becomes_the_accumulation() -> None:
    """W = W + c·dW (either order of the terms) is the GEMM's C = c·A·B + C; written
    elsewhere, or with W an operand of the product itself, it stays a kernel of its own."""
    from ferrograd.codegen.backends.ptx_kernels import GemmStep, accumulate_epilogue, matmul

    k = _update_kernel("w")
    assert k.epilogue is not None and str(k.epilogue.outputs[0][1]) == "x0 - 0.5*x1"
    assert accumulate_epilogue(k) == (k.epilogue.inputs["x0"], -0.5, 1.0)
    (step,) = matmul(k, {}, False)
    assert isinstance(step, GemmStep) and step.operands[2][0] == "w"
    assert (step.alpha, step.beta) == (-0.5, 1.0)
    for refused in (_update_kernel("w_new"), _update_kernel("w", a="w")):
        assert accumulate_epilogue(refused) is None
        gemm, update = matmul(refused, {}, False)
        assert isinstance(gemm, GemmStep) and gemm.operands[2][0] == "dw"
        assert (gemm.alpha, gemm.beta) == (1.0, 0.0) and not isinstance(update, GemmStep)


def test_a_product_read_outside_its_epilogue_is_refused() -> None:
    """The GEMM may skip writing its product when the epilogue consumes it; the
    renderer refuses a schedule where anything else reads that product."""
    from ferrograd.codegen.backends.ptx import check_private_products
    from ferrograd.codegen.schedule import Schedule
    from ferrograd.ir.errors import BackendError

    k = _update_kernel("w")
    assert k.out is not None
    other = Elementwise("copy", ["copy"], (6, 4), {"x0": k.out},
                        [(dataclasses.replace(k.out, buffer="t9"), sp.Symbol("x0"))])
    check_private_products(Schedule("train", [k], {}, {}), [k])
    with pytest.raises(BackendError, match="read outside its epilogue \\(copy\\)"):
        check_private_products(Schedule("train", [k, other], {}, {}), [k, other])
    with pytest.raises(BackendError, match="read outside its epilogue \\(a result\\)"):
        check_private_products(Schedule("train", [k], {}, {"out:dw": "dw"}), [k])


def test_a_bias_gemm_does_not_accumulate() -> None:
    from ferrograd.codegen.backends.ptx_kernels import GemmStep, KernelLaunch
    from ferrograd.ir.errors import BackendError

    launch = KernelLaunch("k", "", "", [], (1, 1, 1), (1, 1, 1))
    with pytest.raises(BackendError, match="bias epilogue cannot also accumulate"):
        GemmStep(1, 2, 2, 2, [], launch, bias=("b", 0), beta=1.0)


def test_sgd_weight_decay_is_the_gemms_beta() -> None:
    """SGD with weight decay updates W = (1 - lr·wd)·W - lr·dW: the GEMM's beta is the
    decay factor (as the f32 constant the update kernel would use), alpha -lr."""
    from ferrograd.codegen.launch_plan import Gemm

    lw = fg.lower(mlp(32), optimizer=fg.optim.SGD(lr=0.1, weight_decay=0.05), backend="cuda",
                  B=8, N=20)
    updates = [s for s in lw.device_module().plans["train"].steps
               if isinstance(s, Gemm) and s.beta != 0]
    assert {(g.c.arena, g.c.offset) for g in updates} == _weight_offsets(lw)
    assert {(g.alpha, g.beta) for g in updates} == {(float(np.float32(-0.1)),
                                                     float(np.float32(1 - 0.1 * 0.05)))}


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("gemm", ["fallback", "numpy", "tiled", "thin"])
def test_cuda_sgd_step_in_the_ptx_interpreter_matches_numpy(gemm: str, weight_decay: float
                                                            ) -> None:
    """One SGD step (with and without weight decay: beta 1 or 1 - lr·wd) of the CUDA
    plan in ``ptx_sim``: its GEMMs by the fallback kernel, by the register-tiled kernels
    (split-K where offered), by the thin kernels where offered (the head's products),
    or as a library computes them (alpha·A·B + beta·C); the new params match the NumPy
    interpreter's."""
    import math

    from ptx_sim import Machine

    from ferrograd.codegen.launch_plan import Gemm

    optimizer = fg.optim.SGD(lr=0.1, weight_decay=weight_decay)
    # an inner dim > 32 for the weight gradients: split
    batch = 70 if gemm in ("tiled", "thin") else 8
    lw = fg.lower(mlp(32), optimizer=optimizer, backend="cuda", B=batch, N=20)
    module = lw.device_module()
    elem = {a: "f32" if a.startswith("input:") or a in ("param", "state")
            else a.rsplit("_", 1)[-1] for a in module.arena_sizes}
    elem["input:y"] = "i32"
    machine = Machine(module, elem, gemm=gemm)
    ref = fg.lower(mlp(32), optimizer=optimizer, backend="numpy", seed=1, B=batch,
                   N=20).compile()
    x = feed(ref.graph, np.random.default_rng(7))
    for name, value in x.items():
        machine.array(f"input:{name}")[:] = value.ravel()
    layout = lw.memory_plan.persistent
    for name, value in ref.params.items():
        _, offset, n = layout["param_" + name.replace(".", "_")]
        machine.array("param")[offset:offset + n] = value.ravel()
    plan = module.plans["train"]
    if gemm == "tiled":  # every product has register-tiled kernels; some split
        gemms = [s for s in plan.steps if isinstance(s, Gemm)]
        assert all(g.tiled for g in gemms)
        assert any(t.grid[2] > g.batch * g.outer for g in gemms for t in g.tiled)
    if gemm == "thin":  # the head's three products, each its own kind of thin kernel
        kinds = {t.kernel.split("_")[2] for s in plan.steps if isinstance(s, Gemm)
                 for t in machine.candidates(s)}
        assert kinds == {"warp", "thread", "short"}, kinds
    machine.run_plan(plan)
    arena, offset, shape = plan.results["out:loss"]
    loss = machine.array(arena)[offset:offset + math.prod(shape)]
    assert float(loss[0]) == pytest.approx(ref(**x), rel=1e-5, abs=1e-6)  # one step
    for name, value in ref.params.items():
        _, offset, n = layout["param_" + name.replace(".", "_")]
        np.testing.assert_allclose(machine.array("param")[offset:offset + n], value.ravel(),
                                   rtol=2e-5, atol=2e-6, err_msg=name)


def seq_mlp(width: int, out: int):
    """Linear layers on [B, T, D] rows, one of them on a transposed (strided) input."""
    @fg.model
    def seq(x: fg.f32["B", "T", "D"]):
        h = fg.gelu(fg.nn.linear(x, width, name="up"))
        h = fg.nn.linear(h, out, name="down")
        mixed = fg.nn.linear(h.transpose(0, 2, 1), 5, name="mix")  # rows not batch-major
        return fg.mean(h * h) + fg.mean(mixed * mixed)
    return seq


def test_weight_gradient_of_a_batched_linear_is_one_product_over_all_rows() -> None:
    """dW of x[B, T, D] @ W is x viewed as [B·T, D], transposed, times g as [B·T, F]:
    one product with K = B·T, never B weight-sized partials summed afterwards."""
    lw = fg.lower(seq_mlp(24, 16), optimizer=fg.optim.SGD(lr=0.1), B=3, T=7, D=10)
    weight_grads = [k for k in kernels(lw, "train")
                    if isinstance(k, Matmul) and (k.m, k.n) in {(10, 24), (24, 16)}]
    assert len(weight_grads) == 2
    for k in weight_grads:
        assert k.batch == () and k.k == 3 * 7, (k.name, k.batch, k.k)


@needs_cargo
@pytest.mark.parametrize("batch,seq", [(3, 7), (16, 64)])  # one block; rayon blocks
def test_batched_linear_runs_as_one_product_and_matches_interpreter(batch: int, seq: int) -> None:
    """A linear layer on [B, T, D] rows with a shared weight is one B·T-row product
    (its epilogue per row block); a transposed input keeps its batched form."""
    model = seq_mlp(96, 64)
    dims = {"B": batch, "T": seq, "D": 40}
    lw = fg.lower(model, optimizer=fg.optim.Adam(lr=1e-2), backend="cpu", **dims)
    products = [k for k in kernels(lw, "train") if isinstance(k, Matmul) and k.batch]
    still_batched = [k.a.strides for k in products if batch_as_rows(k).batch]
    assert still_batched == [(dims["T"] * 64, 1, 64)]  # the mix layer's transposed rows
    source = lw.crate.files["src/kernels.rs"].decode()
    up = source[source.index("pub fn forward_k00_matmul_add_"):]  # + the GELU
    assert up.index("rt::gemm::sgemm(") < up.index("\n}\n")  # one product, not a batch
    cpu = fg.compile(model, optimizer=fg.optim.Adam(lr=1e-2), backend="cpu", seed=3, **dims)
    ref = fg.compile(model, optimizer=fg.optim.Adam(lr=1e-2), backend="numpy", seed=3, **dims)
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = feed(ref.graph, rng)
        close(cpu.grads(**x), ref.grads(**x), 2e-4, 2e-5)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-4, abs=1e-6)
        close(cpu.params, ref.params, 2e-4, 2e-5)


def gelu_mlp():
    @fg.model
    def net(x: fg.f32["B", 24], y: fg.i32["B"]):
        h = fg.gelu(fg.nn.linear(x, 48, name="up"))
        return fg.cross_entropy(fg.nn.linear(h, 10, name="down"), y)
    return net


def test_gelu_stores_its_cdf_for_the_backward() -> None:
    """Training computes Phi(x) once: the forward product's epilogue writes the
    pre-activation, Phi and gelu = x·Phi (three outputs, one kernel); the backward
    epilogue reads Phi and evaluates only Phi' (an exp), never erf again."""
    lw = fg.lower(gelu_mlp(), optimizer=fg.optim.SGD(lr=0.1), B=8)
    ops = {n.op for n in lw.graph.nodes()}
    assert "normal_cdf" in ops and "gelu" not in ops and "gelu.d0" not in ops
    train = kernels(lw, "train")
    up = next(k for k in train if isinstance(k, Matmul) and "normal_cdf" in k.ops)
    assert up.epilogue is not None and len(up.epilogue.outputs) == 3
    stored = {v.buffer for v in up.epilogue.writes()}
    readers = [k for k in train if "normal_cdf.d0" in k.ops]
    assert len(readers) == 1 and stored & {v.buffer for v in readers[0].reads()}
    elementwise = [k.epilogue if isinstance(k, Matmul) else k for k in train]
    erfs = [k for k in elementwise if isinstance(k, Elementwise)
            and any(e.has(sp.erf) for _, e in k.outputs)]
    assert len(erfs) == 1  # the forward's, only

    @fg.model
    def inference(x: fg.f32["B", 24]):
        return {"y": fg.gelu(fg.nn.linear(x, 48, name="up"))}
    # No derivative: gelu stays one op.
    assert "gelu" in {n.op for n in fg.lower(inference, B=8).graph.nodes()}


@needs_cargo
def test_gelu_step_with_a_stored_cdf_matches_interpreter() -> None:
    model = gelu_mlp()
    cpu = fg.compile(model, optimizer=fg.optim.Adam(lr=1e-2), backend="cpu", seed=2, B=64)
    ref = fg.compile(model, optimizer=fg.optim.Adam(lr=1e-2), backend="numpy", seed=2, B=64)
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = feed(ref.graph, rng)
        close(cpu.grads(**x), ref.grads(**x), 2e-4, 2e-5)
        assert cpu(**x) == pytest.approx(ref(**x), rel=1e-4, abs=1e-5)
        close(cpu.params, ref.params, 2e-4, 2e-5)


def test_irrational_constant_factors_print_as_one_literal() -> None:
    """Phi'(x) = exp(-x²/2)/sqrt(2·pi): the C-like renderers (Rust, WGSL) fold the
    constants into one f32 literal rather than dividing by sqrt(pi) per element."""
    lw = fg.lower(gelu_mlp(), optimizer=fg.optim.SGD(lr=0.1), backend="cpu", B=8)
    source = lw.crate.files["src/kernels.rs"].decode()
    assert "0.3989423 * " in source
    assert not re.search(r"(_f32|consts::\w+)\.sqrt\(\)", source)  # no constant roots
    wgsl = fg.lower(gelu_mlp(), optimizer=fg.optim.SGD(lr=0.1), backend="wgsl", B=8)
    shaders = wgsl.source("wgsl")
    assert "0.3989423*" in shaders and not re.search(r"sqrt\([\d.]+\)", shaders)
