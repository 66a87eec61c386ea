"""The wgsl backend: shaders rendered from the kernel IR, run through wgpu on whatever
adapter exists (in CI, Mesa's lavapipe on the CPU), against the NumPy interpreter.

Render-only tests (manifest, source, CLI, launch sizes) need nothing. The rest build
modules (the first build compiles wgpu, minutes; later ones seconds) and skip
cleanly when the machine has no Rust toolchain or no WebGPU adapter (Debian:
``apt-get install mesa-vulkan-drivers`` gives lavapipe).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cpu_backend import close, feed_for
from test_cpu_ops import CPU_ROWS, all_rows, compare

import ferrograd as fg
from ferrograd.codegen.backends import wgsl_kernels
from ferrograd.codegen.backends.wgsl_crate import render_wgsl_crate
from ferrograd.codegen.backends.wgsl_module import render_wgsl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from catalog import MODELS, lowered  # noqa: E402

# The CPU backend's tolerances: lavapipe's exp and log are a few ulp (exp: up to 60
# near |x| = 80) off NumPy's, well inside them.
RTOL, ATOL = 2e-4, 2e-5


def _no_vulkan_driver() -> bool:
    """On Linux, no Vulkan driver manifest at all: skip before building anything."""
    if not sys.platform.startswith("linux") or os.environ.get("VK_ICD_FILENAMES") or \
            os.environ.get("VK_DRIVER_FILES"):
        return False
    dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"]
    return not any(Path(d).is_dir() and any(Path(d).glob("*.json")) for d in dirs)


@pytest.fixture(scope="module")
def adapter() -> str:
    """The WebGPU adapter's name; skips every test that runs shaders when there is none."""
    if shutil.which("cargo") is None:
        pytest.skip("needs a Rust toolchain")
    if _no_vulkan_driver():
        pytest.skip("no Vulkan driver: apt-get install mesa-vulkan-drivers (lavapipe)")
    model, optimizer, dims = MODELS["linreg"]()
    try:
        step = fg.compile(model, optimizer=optimizer, backend="wgsl", **dims)
    except fg.BackendError as err:
        if "no WebGPU adapter" in str(err):
            pytest.skip(str(err))
        raise
    return str(step._native.adapter)


def check_against_interpreter(model, optimizer, dims, steps=3, rtol=RTOL, atol=ATOL):
    gpu = fg.compile(model, optimizer=optimizer, backend="wgsl", seed=3, **dims)
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", seed=3, **dims)
    close(gpu.params, ref.params, 0, 0, "initial param")
    rng = np.random.default_rng(0)
    for _ in range(steps):
        feed = feed_for(ref.graph, rng)
        close(gpu.forward(**feed), ref.forward(**feed), rtol, atol, "forward")
        close(gpu.grads(**feed), ref.grads(**feed), rtol, atol, "grad")
        assert gpu(**feed) == pytest.approx(ref(**feed), rel=rtol, abs=atol)
        close(gpu.params, ref.params, rtol, atol, "param after a step")
        close(gpu.state, ref.state, rtol, atol, "optimizer state after a step")
    return gpu


# ---- running on the adapter ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_example_matches_interpreter(adapter: str, name: str) -> None:
    model, optimizer, dims = MODELS[name]()
    step = check_against_interpreter(model, optimizer, dims)
    assert step.backend == "wgsl" and step.kernels
    assert all(k.backend == "wgsl" and "@compute" in k.source for k in step.kernels)


def test_every_op_row_matches_the_interpreter(adapter: str) -> None:
    """All op-table rows in one module: forward and VJPs, then SGD steps."""
    model = fg.model(all_rows)
    optimizer = fg.optim.SGD(lr=1e-2)
    gpu = fg.compile(model, optimizer=optimizer, backend="wgsl")
    ref = fg.compile(model, optimizer=optimizer, backend="numpy")
    assert len(CPU_ROWS) > 100
    compare(gpu, ref, {f"r{j}": row.name for j, row in enumerate(CPU_ROWS)},
            rtol=2e-5, atol=2e-6)
    for _ in range(2):
        assert gpu() == pytest.approx(ref(), rel=2e-5, abs=2e-6)
    close(gpu.params, ref.params, 2e-5, 2e-6, "param after SGD steps")


def test_two_dimensional_grids_run(adapter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grids over the per-dimension limit go 2-D: shrink the limit so that the small MLP
    exercises 2-D elementwise, reduce and matmul dispatches."""
    monkeypatch.setattr(wgsl_kernels, "MAX_GROUPS", 2)
    model, optimizer, dims = MODELS["mlp"]()
    step = check_against_interpreter(model, optimizer, dims, steps=1)
    grids = [launch.grid for plan in step.lowered.wgsl.plans.values() for launch in plan.steps]
    assert any(g[1] > 1 for g in grids) and all(g[0] <= 2 for g in grids)


def test_step_api_and_checkpoints(adapter: str, tmp_path: Path) -> None:
    model, optimizer, dims = MODELS["mlp"]()
    gpu = fg.compile(model, optimizer=optimizer, backend="wgsl", **dims)
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", **dims)
    feed = feed_for(gpu.graph, np.random.default_rng(3))
    for _ in range(2):
        gpu(**feed)
    gpu.save(tmp_path / "ckpt.safetensors")
    ref.load(tmp_path / "ckpt.safetensors")
    close(ref.params, gpu.params, 0, 0, "param")
    close(ref.state, gpu.state, 0, 0, "state")
    assert gpu(**feed) == pytest.approx(ref(**feed), rel=1e-4)
    new = {k: np.zeros_like(v) for k, v in gpu.params.items()}
    gpu.load_params(new)
    close(gpu.params, new, 0, 0, "loaded param")
    with pytest.raises(fg.InputError, match=r"'y'.*out of range"):
        gpu(feed["x"], np.full(16, 10, np.int32))
    with pytest.raises(fg.InputError, match=r"'x'.*shape"):
        gpu(np.zeros((15, 64), np.float32), feed["y"])


def test_steps_are_the_single_steps_bit_for_bit(adapter: str) -> None:
    model, optimizer, dims = MODELS["mlp"]()
    a, b = (fg.compile(model, optimizer=optimizer, backend="wgsl", seed=3, **dims)
            for _ in range(2))
    rng = np.random.default_rng(4)
    batches = [feed_for(a.interface.graph, rng) for _ in range(3)]
    losses = a.steps(**{k: np.stack([f[k] for f in batches]) for k in batches[0]})
    want = np.array([b(**f) for f in batches], np.float32)
    np.testing.assert_array_equal(losses, want)
    close(a.params, b.params, 0, 0, "param")
    close(a.state, b.state, 0, 0, "state")
    with pytest.raises(fg.InputError, match="different numbers of batches"):
        a.steps(np.zeros((3, 16, 64), np.float32), np.zeros((2, 16), np.int32))


def test_no_adapter_is_a_clear_error(adapter: str) -> None:
    """Without a Vulkan driver the step cannot be created; the error says what to install."""
    code = ("import sys; sys.path.insert(0, 'examples'); import ferrograd as fg\n"
            "from catalog import MODELS\n"
            "m, o, d = MODELS['linreg']()\n"
            "try:\n"
            "    fg.compile(m, optimizer=o, backend='wgsl', **d)\n"
            "except fg.BackendError as e:\n"
            "    print('ERROR', e)\n")
    env = dict(os.environ, VK_ICD_FILENAMES="/nonexistent.json",
               VK_DRIVER_FILES="/nonexistent.json")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False, timeout=300)
    assert "ERROR" in res.stdout and "no WebGPU adapter" in res.stdout, res.stdout + res.stderr
    assert "mesa-vulkan-drivers" in res.stdout


def test_a_shader_that_fails_validation_is_an_error(adapter: str) -> None:
    low = lowered("linreg", "wgsl")
    module = render_wgsl(low.graph, low.schedules, low.memory_plan)
    name, code = next(iter(module.shaders.items()))
    code.source = code.source.replace("fn main(", "fn main(broken: f32, ")
    from ferrograd.codegen.build import build_module, cache_dir

    crate = render_wgsl_crate(low.graph, module)
    crate_dir = cache_dir() / "crates" / crate.module
    render_wgsl_crate(low.graph, module, crate_dir).write(crate_dir)
    built = build_module(crate_dir, crate.module, quiet=True)
    with pytest.raises(RuntimeError, match=f"shader `{name}` failed validation"):
        built.WgslStep()


# ---- rendering only ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_manifest_describes_every_dispatch(name: str, tmp_path: Path) -> None:
    low = lowered(name, "wgsl")
    low.write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [b["name"] for b in manifest["bindings"]] == ["f32s", "i32s", "bools", "status"]
    sizes = {b["binding"]: b["elements"] for b in manifest["bindings"]}
    for shader in manifest["shaders"].values():
        text = (tmp_path / shader["file"]).read_text()
        assert "@compute" in text and "fn main(" in text
        assert 64 <= np.prod(shader["workgroup_size"]) <= 256
    for entry in manifest["entries"].values():
        for d in entry["dispatches"]:
            assert d["shader"] in manifest["shaders"]
            assert all(0 < n <= 65_535 for n in d["workgroups"])
        for r in entry["results"].values():
            assert r["offset"] + int(np.prod(r["shape"])) <= sizes[r["binding"]]
    for p in manifest["params"] + manifest["state"] + manifest["inputs"]:
        assert p["offset"] + int(np.prod(p["shape"])) <= sizes[p["binding"]]
    assert set(manifest["entries"]) == set(low.wgsl.plans)
    assert (tmp_path / "README.md").read_text().startswith("# A ferrograd training step")


def test_source_kernels_and_cli() -> None:
    low = lowered("xor", "wgsl")
    source = low.source("wgsl")
    assert source.count("@compute") == len(low.wgsl.shaders)
    assert "// ==== shaders/" in source
    kernels = low.kernels
    assert kernels and all(k.backend == "wgsl" and "@compute" in k.source for k in kernels)
    res = subprocess.run([sys.executable, "-m", "ferrograd", "inspect",
                          str(ROOT / "examples" / "xor.py") + ":xor_net", "--backend", "wgsl"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "schedule train:" in res.stdout and "@compute @workgroup_size" in res.stdout


def test_identical_kernels_share_a_shader() -> None:
    module = lowered("transformer", "wgsl").wgsl
    assert len(module.shaders) < len(module.kernels)
    assert set(module.kernels.values()) == set(module.shaders)


def test_large_grids_are_two_dimensional() -> None:
    assert wgsl_kernels.grid(65_535) == (65_535, 1, 1)
    x, y, z = wgsl_kernels.grid(65_536)
    assert x <= 65_535 and y == 2 and z == 1 and x * y >= 65_536
    x, y, _ = wgsl_kernels.grid(10**7)
    assert x <= 65_535 and x * y >= 10**7


def test_printer_legalizes_and_refuses_what_wgsl_lacks() -> None:
    import sympy as sp
    from sympy.printing.codeprinter import PrintMethodNotImplementedError

    from ferrograd.codegen.backends.base import IndentedBuffer
    from ferrograd.codegen.backends.wgsl import WgslPrinter, cse_body

    x, y = sp.symbols("x0 x1", real=True)
    printer = WgslPrinter()
    assert printer.expr(sp.Piecewise((x, x > 0), (0, True))) == "select(0.0, x0, x0 > 0.0)"
    assert printer.expr(x**2) == "(x0 * x0)" and printer.expr(x**5) == "fg_powi(x0, 5)"
    assert printer.expr(sp.Max(x, y)) == "max(x0, x1)"
    (value,) = cse_body(IndentedBuffer(), [sp.Max(x, -sp.oo) + sp.Min(y, sp.oo, evaluate=False)],
                        ["f32"])
    assert "inf" not in value.lower()
    with pytest.raises(PrintMethodNotImplementedError):
        printer.expr(sp.Function("foo")(x))
