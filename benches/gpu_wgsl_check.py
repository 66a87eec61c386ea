"""The wgsl step on a real GPU through Vulkan, against the NumPy interpreter.

Two phases, because the GPU machine has no Rust toolchain:

1. Here: build the wgsl modules of the example models into a folder that travels::

       python benches/gpu_wgsl_check.py --build .gpu_modules/wgsl

2. On the GPU machine (``run`` tool, ``carry: [".gpu_modules", ".whl", ".gl"]``;
   ``.gl`` holds Debian's libvulkan1, libglvnd0, libegl1, libgl1, libglx0, libgles2 and
   libopengl0 .debs — the Vulkan loader and what NVIDIA's ICD needs, see
   /work/.library/device/README.md — and ``.whl`` ferrograd's Python dependencies)::

       for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig;  # libvulkan1 + the glvnd libs
       export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json \
         __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json;
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
         --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
       PYTHONUNBUFFERED=1 python3 benches/gpu_wgsl_check.py .gpu_modules/wgsl

   Each model: forward outputs, gradients and three training steps (losses, params,
   optimizer state) against the interpreter, then the median time of a training
   step. Exit status 1 on any mismatch. Results also go to ``$OUT/gpu_wgsl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from catalog import MODELS, lowered  # noqa: E402

import ferrograd as fg  # noqa: E402
from ferrograd.codegen.backends.wgsl_crate import render_wgsl_crate  # noqa: E402
from ferrograd.codegen.build import _load, build_module, cache_dir, module_path  # noqa: E402
from ferrograd.codegen.cpu_step import CompiledStep  # noqa: E402
from ferrograd.dsl.init import init_params  # noqa: E402
from ferrograd.ir.optim import init_state  # noqa: E402


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in MODELS:
        low = lowered(name, "wgsl")
        module = render_wgsl_crate(low.graph, low.wgsl).module
        crate_dir = cache_dir() / "crates" / module
        render_wgsl_crate(low.graph, low.wgsl, crate_dir).write(crate_dir)
        build_module(crate_dir, module)
        shutil.copy2(module_path(module), out / module_path(module).name)
        manifest[name] = module
        print(f"{name}: {module}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def feed(graph: fg.Graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        if node.dtype == "i32":
            out[name] = rng.integers(0, graph.index_bounds.get(name, 4), node.shape,
                                     dtype=np.int32)
        else:
            out[name] = rng.normal(size=node.shape).astype(np.float32)
    return out


def worst(got: dict, want: dict) -> float:
    """Worst normwise relative error, with a floor for results that are ~0 exactly."""
    err = 0.0
    for k, w in want.items():
        g = np.asarray(got[k], np.float64)
        w = np.asarray(w, np.float64)
        err = max(err, float(np.linalg.norm(g - w) / (np.linalg.norm(w) + 2e-5 * np.sqrt(w.size))))
    return err


def check(name: str, module_name: str, folder: Path) -> dict:
    low = lowered(name, "wgsl")
    module = _load(module_name, folder / module_path(module_name).name)
    native = module.WgslStep()
    step = CompiledStep(low, module, init_params(low.graph, 0), init_state(low.graph),
                        "wgsl", native)
    model, optimizer, dims = MODELS[name]()
    ref = fg.compile(model, optimizer=optimizer, backend="numpy", **dims)
    rng = np.random.default_rng(7)
    errors = []
    for _ in range(3):
        batch = feed(ref.graph, rng)
        errors.append(worst(step.forward(**batch), ref.forward(**batch)))
        errors.append(worst(step.grads(**batch), ref.grads(**batch)))
        loss, want = step(**batch), ref(**batch)
        errors.append(abs(loss - want) / (abs(want) + 1e-6))
        errors.append(worst(step.params, ref.params))
        errors.append(worst(step.state, ref.state))
    batch = feed(ref.graph, rng)
    args = [batch[k] for k in ref.graph.inputs]
    for _ in range(20):
        step(*args)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - t)
    return {"adapter": native.adapter, "worst_error": max(errors),
            "step_us": float(np.median(times) * 1e6)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--build", action="store_true", help="build the modules (here)")
    args = parser.parse_args(argv)
    if args.build:
        build(args.folder)
        return 0
    manifest = json.loads((args.folder / "manifest.json").read_text())
    results, failed = {}, False
    for name, module_name in manifest.items():
        res = check(name, module_name, args.folder)
        ok = res["worst_error"] < 1e-3
        failed |= not ok
        results[name] = res
        print(f"{name:<12} {'ok ' if ok else 'BAD'} worst error {res['worst_error']:.2e}  "
              f"step {res['step_us']:9.1f} us  on {res['adapter']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_wgsl.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
