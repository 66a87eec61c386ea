"""Device-resident inputs of the CUDA step (issue 4), on a GPU, in one run.

CuPy arrays and PyTorch CUDA tensors (``__cuda_array_interface__``) are copied
device to device into the step's input arenas; NumPy arrays host to device. This
trains the ``mlp`` example the same steps from each kind of input and compares the
losses and params (they must match exactly: the arena holds the same bytes; the
steps do not autotune, which could give each its own GEMM algorithms), then
times a training step from device inputs against host inputs.

1. Here (cargo): ``python benches/gpu_device_inputs.py --build .gpu_modules``
   (builds only the mlp module; ``gpu_cuda_check.py --build`` builds it too).
2. On the GPU machine (``carry: [".gpu_modules"]``)::

       python3 benches/gpu_device_inputs.py .gpu_modules

   A kind of input whose library (cupy, torch) is not installed there is skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_cuda_check as base

STEPS = 5


def build(folder: Path) -> None:
    import shutil

    from ferrograd.codegen.backends.cpu import render_crate
    from ferrograd.codegen.build import build_module, cache_dir

    # The modules run on the GPU host, whose CPU is not this one: AVX2 at most.
    os.environ.setdefault("FERROGRAD_CPU_LEVEL", "v3")

    folder.mkdir(parents=True, exist_ok=True)
    low = base.lowered_models()["mlp"]
    device = low.device_module("ptx")
    crate = render_crate(low.graph, low.schedules, low.memory_plan, device=device)
    crate_dir = cache_dir() / "crates" / crate.module
    render_crate(low.graph, low.schedules, low.memory_plan, crate_dir,
                 device=device).write(crate_dir)
    module = build_module(crate_dir, crate.module, rustc_flags=crate.rustc_flags)
    shutil.copy2(Path(str(module.__file__)), folder / Path(str(module.__file__)).name)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["mlp"] = crate.module
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"built mlp: {crate.module}")


def check(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    low = base.lowered_models()["mlp"]
    module = base._load(manifest["mlp"], folder / f"{manifest['mlp']}.abi3.so")
    rng = np.random.default_rng(0)
    batches = [base.feed_for(low.graph, rng) for _ in range(STEPS)]
    results, ok = {}, True
    for kind, conv in base.device_converters().items():
        # Each step would autotune on its own and might keep another GEMM algorithm
        # (another summation order): compare inputs, not algorithm choices.
        step = base.cuda_step(low, module, autotune=False)
        dev = [[conv(b[k]) for k in low.graph.inputs] for b in batches]
        losses = [step(*args) for args in dev]
        out = step.forward(*dev[0])  # through _bind: device arrays pass untouched
        sync = (lambda: __import__("torch").cuda.synchronize()) if kind == "torch" else None
        t = time.perf_counter()
        for _ in range(200):
            step(*dev[0])
        if sync:
            sync()
        results[kind] = {"losses": losses, "params": step.params,
                         "forward": {k: np.asarray(v) for k, v in out.items()},
                         "us_per_step": (time.perf_counter() - t) / 200 * 1e6}
        print(f"{kind:6} losses {[round(x, 6) for x in losses]} "
              f"{results[kind]['us_per_step']:.1f} us/step", flush=True)
    ref = results["numpy"]
    for kind, r in results.items():
        dl = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        dp = max(float(np.max(np.abs(r["params"][k] - ref["params"][k]))) for k in ref["params"])
        df = max(float(np.max(np.abs(r["forward"][k] - ref["forward"][k])))
                 for k in ref["forward"])
        good = max(dl, dp, df) <= 1e-6
        ok &= good
        print(f"{kind:6} vs numpy: loss {dl:.1e}, params {dp:.1e}, forward {df:.1e} "
              f"{'PASS' if good else 'FAIL'}")
    # A wrong dtype / shape on the device names the input.
    if "torch" in results:
        import torch

        bad = torch.zeros((3, 3), device="cuda")
        try:
            base.cuda_step(low, module)(*[bad for _ in low.graph.inputs])
            print("bad shape: FAIL (no error)")
            ok = False
        except Exception as err:
            print(f"bad shape: {type(err).__name__}: {err}")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "--build":
        build(Path(sys.argv[2]))
    else:
        sys.exit(check(Path(sys.argv[1])))
