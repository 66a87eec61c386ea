"""The CUDA step and runtime without a GPU, and with one when the machine has it.

Without a GPU (CI): a module lowered for ("cpu", "cuda") renders its CUDA step
(plans as Rust constants, the PTX, the runtime's "cuda" feature), builds and
imports; its CPU step trains as usual, and creating its CUDA step raises a clear
error. The runtime's own Rust tests (the cuBLAS layout mapping among them) run
with the "cuda" feature on, and clippy checks it.

With a GPU: the hand-written module of benches/cuda_handmade.py is compared with
the interpreter (the examples run on the GPU through benches/gpu_cuda_check.py).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.codegen.backends.cpu import render_crate
from ferrograd.codegen.build import RUNTIME_DIR, target_dir
from ferrograd.ir.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benches"), str(ROOT / "examples")]
import cuda_handmade  # noqa: E402
from catalog import MODELS  # noqa: E402

needs_cargo = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


HAS_DRIVER = _has_driver()


def _handmade_crate(crate_dir: Path | None = None):
    low = cuda_handmade.lower()
    return low, render_crate(low.graph, low.schedules, low.memory_plan, crate_dir,
                             device=cuda_handmade.device_module(low))


def test_cpu_only_crates_have_no_cuda_part():
    model, kwargs = _example("mlp")
    files = fg.lower(model, backend="cpu", **kwargs).crate.files
    assert "src/cuda_step.rs" not in files and "src/kernels.ptx" not in files
    runtime = next(line for line in files["Cargo.toml"].decode().splitlines()
                   if line.startswith("ferrograd-runtime"))
    assert "features" not in runtime
    assert b"CudaStep" not in files["src/lib.rs"]


def test_cuda_crate_renders_plans_ptx_and_the_feature():
    model, kwargs = _example("mlp")
    low = fg.lower(model, backend=("cpu", "cuda"), **kwargs)
    files = low.crate.files
    assert b'features = ["cuda"]' in files["Cargo.toml"]
    assert b"m.add_class::<cuda_step::CudaStep>()?;" in files["src/lib.rs"]
    rs = files["src/cuda_step.rs"].decode()
    assert files["src/kernels.ptx"].decode() == low.device_module("ptx").source
    for entry in ("train", "forward", "grads"):
        assert f'Plan {{ entry: "{entry}"' in rs
    assert "Step::Gemm(Gemm {" in rs and "fallback: Some(Launch {" in rs
    assert 'ArenaSpec { name: "input:x", elem: Elem::F32, len: 1024, id_bound: None }' in rs
    # labels in device memory are copied in by a kernel that checks them
    assert re.search(r'ArenaSpec \{ name: "input:y", elem: Elem::I32, len: \d+, '
                     r'id_bound: Some\(10\) \}', rs)
    assert ('gemm = "auto", tf32 = false, sync = false, autotune = true, branches = true, '
            'graph_inputs = true))]' in rs)
    # each step's waits, all on earlier steps
    after = re.search(r"const TRAIN_AFTER: &\[&\[usize\]\] = &\[(.*?)\n\];", rs, re.S)
    assert after is not None
    waits = [[int(j) for j in re.findall(r"\d+", line)]
             for line in after.group(1).strip().splitlines()]
    assert waits == [list(a) for a in low.device_module("ptx").plans["train"].after]
    assert waits[0] == [] and all(all(j < i for j in w) for i, w in enumerate(waits))
    assert 'steps: TRAIN, after: TRAIN_AFTER, results: &[' in rs
    assert "fn gemm_steps(&self) -> Vec<String>" in rs
    # step.steps: K stacked batches in one call, their losses back after one wait
    assert '#[pyo3(name = "steps")]' in rs
    assert 'rt::cuda::py::feed_f32(x, "x", &[count, 16, 64])?;' in rs
    assert 'rt::cuda::py::feed_i32(y, "y", &[count, 16])?;' in rs
    assert 'exec.run_steps("train", count, &[("x", x), ("y", y)], "out:loss")' in rs
    assert "rt::py::to_numpy_f32(py, &losses, &[count])" in rs
    # Module names hash the CUDA part too: another PTX, another module.
    assert low.crate.module != fg.lower(model, backend="cpu", **kwargs).crate.module


def test_backend_tuples_and_devices_are_checked():
    model, kwargs = _example("xor")
    with pytest.raises(BackendError, match="one module holds 'cpu' and 'cuda'"):
        fg.lower(model, backend=("cpu", "wgsl"), **kwargs)
    low = fg.lower(model, backend="cpu", **kwargs)
    with pytest.raises(BackendError, match=r"lower it with backend=\('cpu', 'cuda'\)"):
        low.compile(device="cuda")
    with pytest.raises(TypeError, match="for device='cuda'"):
        low.compile(gemm="kernel")


def test_cuda_step_options_are_checked(monkeypatch: pytest.MonkeyPatch):
    from ferrograd.codegen.cuda_step import cuda_step_kwargs

    for name in ("FERROGRAD_CUDA_AUTOTUNE", "FERROGRAD_CUDA_GEMM", "FERROGRAD_CUDA_GRAPHS",
                 "FERROGRAD_CUDA_SYNC", "FERROGRAD_CUDA_DEVICE", "FERROGRAD_CUDA_BRANCHES",
                 "FERROGRAD_CUDA_GRAPH_INPUTS"):
        monkeypatch.delenv(name, raising=False)
    assert cuda_step_kwargs() == {"device": 0, "graph": True, "gemm": "auto", "tf32": False,
                                  "sync": False, "autotune": True, "branches": True,
                                  "graph_inputs": True}
    assert cuda_step_kwargs(graph_inputs=False)["graph_inputs"] is False
    monkeypatch.setenv("FERROGRAD_CUDA_GRAPH_INPUTS", "off")
    assert cuda_step_kwargs()["graph_inputs"] is False
    assert cuda_step_kwargs(graph_inputs=True)["graph_inputs"] is True
    monkeypatch.setenv("FERROGRAD_CUDA_GRAPH_INPUTS", "2")
    with pytest.raises(ValueError, match="FERROGRAD_CUDA_GRAPH_INPUTS='2'"):
        cuda_step_kwargs()
    monkeypatch.delenv("FERROGRAD_CUDA_GRAPH_INPUTS")
    assert cuda_step_kwargs(branches=False)["branches"] is False
    monkeypatch.setenv("FERROGRAD_CUDA_BRANCHES", "0")
    assert cuda_step_kwargs()["branches"] is False
    monkeypatch.setenv("FERROGRAD_CUDA_BRANCHES", "nope")
    with pytest.raises(ValueError, match="FERROGRAD_CUDA_BRANCHES='nope'"):
        cuda_step_kwargs()
    monkeypatch.delenv("FERROGRAD_CUDA_BRANCHES")
    assert cuda_step_kwargs(autotune=False)["autotune"] is False
    assert cuda_step_kwargs(autotune=np.True_)["autotune"] is True
    for bad in ("off", None, 2, 0.5):
        with pytest.raises(TypeError, match="autotune must be True or False"):
            cuda_step_kwargs(autotune=bad)
    for text, value in (("0", False), ("off", False), (" No ", False), ("1", True),
                        ("TRUE", True), ("on", True), ("", True)):
        monkeypatch.setenv("FERROGRAD_CUDA_AUTOTUNE", text)
        assert cuda_step_kwargs()["autotune"] is value, text
    # The option wins over the environment.
    monkeypatch.setenv("FERROGRAD_CUDA_AUTOTUNE", "0")
    assert cuda_step_kwargs(autotune=True)["autotune"] is True
    monkeypatch.setenv("FERROGRAD_CUDA_AUTOTUNE", "fasle")
    with pytest.raises(ValueError, match="FERROGRAD_CUDA_AUTOTUNE='fasle': expected 1 or 0"):
        cuda_step_kwargs()
    with pytest.raises(TypeError, match="unknown CUDA step option autotuning; the options "
                                        "are graph, gemm, autotune"):
        cuda_step_kwargs(autotuning=False)


@needs_cargo
def test_module_with_a_cuda_step_builds_and_its_cpu_step_works():
    from ferrograd.codegen.build import build_module, cache_dir

    low, crate = _handmade_crate()
    crate_dir = cache_dir() / "crates" / crate.module
    _handmade_crate(crate_dir)[1].write(crate_dir)
    module = build_module(crate_dir, crate.module, quiet=True)
    assert hasattr(module, "CudaStep")
    for method in ("train", "forward", "grads", "steps", "get", "set"):
        assert hasattr(module.CudaStep, method), method
    from ferrograd.codegen.cpu_step import CompiledStep
    from ferrograd.dsl.init import init_params
    from ferrograd.ir.optim import init_state

    cpu = CompiledStep(low, module, init_params(low.graph, 0), init_state(low.graph), "cpu")
    ref = fg.compile(cuda_handmade.tiny, optimizer=cuda_handmade.OPTIMIZER, backend="numpy")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert cpu(x) == pytest.approx(ref(x), rel=1e-5)
    from ferrograd.codegen.cuda_step import open_cuda_step

    if HAS_DRIVER:
        _check_on_gpu(low, module)
        return
    with pytest.raises(BackendError, match="no CUDA driver found"):
        open_cuda_step(module, low.graph.name)
    with pytest.raises(TypeError, match="unknown CUDA step option"):
        open_cuda_step(module, low.graph.name, precision="tf32")
    with pytest.raises(TypeError, match="autotune must be True or False, not 'off'"):
        open_cuda_step(module, low.graph.name, autotune="off")
    # The module itself takes the keyword (and fails only for want of a driver).
    with pytest.raises(RuntimeError, match="no CUDA driver found"):
        module.CudaStep(autotune=False)


def _check_on_gpu(low, module) -> None:
    from ferrograd.codegen.cpu_step import CompiledStep
    from ferrograd.codegen.cuda_step import open_cuda_step
    from ferrograd.dsl.init import init_params
    from ferrograd.ir.optim import init_state

    for options in ({}, {"autotune": False}, {"gemm": "kernel"}, {"graph": False},
                    {"sync": True}):
        gpu = CompiledStep(low, module, init_params(low.graph, 0), init_state(low.graph),
                           "cuda", open_cuda_step(module, low.graph.name, **options))
        ref = fg.compile(cuda_handmade.tiny, optimizer=cuda_handmade.OPTIMIZER,
                         backend="numpy")
        rng = np.random.default_rng(1)
        for _ in range(3):
            x = rng.normal(size=(4, 3)).astype(np.float32)
            gpu._native.poison_temps()
            for k, v in ref.forward(x).items():
                np.testing.assert_allclose(gpu.forward(x)[k], v, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(gpu.grads(x)["w"], ref.grads(x)["w"], rtol=1e-5)
            assert gpu(x) == pytest.approx(ref(x), rel=1e-5)
            np.testing.assert_allclose(gpu.params["w"], ref.params["w"], rtol=1e-5)
        assert gpu.gemm_backend in (("kernel",) if options.get("gemm") else ("cublas", "kernel"))


@needs_cargo
@pytest.mark.slow
def test_runtime_with_the_cuda_feature():
    """cargo test and clippy of the runtime with `cuda` on (the CPU-only runs are in
    test_runtime.py). Without a driver, creating an executor must say so."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir() / "runtime-tests"),
               CARGO_TERM_COLOR="never", PYO3_PYTHON=sys.executable)
    libdir = __import__("sysconfig").get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get(
            "LD_LIBRARY_PATH")) if p)

    def cargo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["cargo", *args], cwd=RUNTIME_DIR, env=env, capture_output=True,
                              text=True, timeout=1200, check=False)

    res = cargo("test", "--release", "--features", "cuda", "--lib", "cuda::")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "test result: ok" in res.stdout
    if subprocess.run(["cargo", "clippy", "--version"], capture_output=True,
                      check=False).returncode == 0:
        res = cargo("clippy", "--release", "--all-targets", "--features", "cuda", "--", "-D",
                    "warnings")
        assert res.returncode == 0, res.stderr[-3000:]


def _example(name: str):
    model, optimizer, dims = MODELS[name]()
    return model, {"optimizer": optimizer, **dims}
