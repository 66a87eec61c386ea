"""Where a small CUDA step's time goes on the host, part by part (on a GPU machine).

    python benches/gpu.py --build .gpu_bench --rows mlp128     # here: build the module
    python benches/gpu_step_overhead.py .gpu_bench [--rows mlp128]   # there

For each workload, medians over rounds of N calls (µs per call; the parts' rounds
interleaved) of: the whole step as a user calls it (``step(x, y)`` with torch CUDA
tensors), the module's ``train`` without the Python wrapper, the same with
``graph_inputs=False`` (each input copied by a driver call of its own before the
graph), the same fed NumPy arrays (host copies), reading the
tensors' ``__cuda_array_interface__`` (what the module does per input), and
``torch.cuda.synchronize()`` alone. The device's kernel time per step is in the
profile of gpu.py's JSON; the rest of a call is host work and waiting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import FgSystem, device_batch, lower
from gpu_workloads import GPU_BY_KEY


def per_call_us(parts: dict[str, Callable[[], Any]], calls: int,
                rounds: int) -> dict[str, float]:
    """Median µs per call of each part, the parts' rounds interleaved."""
    for fn in parts.values():
        for _ in range(max(calls // 10, 5)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure(key: str, folder: Path, manifest: dict[str, Any], calls: int,
            rounds: int) -> dict[str, float]:
    import torch

    w = GPU_BY_KEY[key]
    host = list(w.data())
    dev, why = device_batch(host)
    assert dev is not None, why
    low = lower(w)
    step = FgSystem(w, low, folder, manifest, "cuda", dev)
    host_step = FgSystem(w, low, folder, manifest, "cuda", host)
    apart = FgSystem(w, low, folder, manifest, "cuda", dev, graph_inputs=False)

    def interface() -> None:
        for t in dev:
            t.__cuda_array_interface__  # noqa: B018

    parts = {
        "step(x, y), torch CUDA tensors": lambda: step.step_obj(*dev),
        "native.train(x, y), torch CUDA tensors": lambda: step.native.train(*dev),
        "native.train(x, y), torch CUDA tensors, graph_inputs=False": lambda: (
            apart.native.train(*dev)),
        "native.train(x, y), NumPy arrays": lambda: host_step.native.train(*host),
        "__cuda_array_interface__ of the inputs": interface,
        "torch.cuda.synchronize()": torch.cuda.synchronize,
        "tensor.data_ptr() of the inputs": lambda: [t.data_ptr() for t in dev],
    }
    out = per_call_us(parts, calls, rounds)
    out.update(driver_calls(lambda: step.step_obj(*dev), 20))
    return out


def driver_calls(fn: Callable[[], Any], calls: int) -> dict[str, float]:
    """µs per call that ``fn`` spends in each CUDA driver / runtime API function, and
    from the call's start to its first kernel's start (CUPTI through torch.profiler)."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            with torch.profiler.record_function("fg_call"):
                fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    api: dict[str, float] = {}
    starts = sorted(float(e["ts"]) for e in events if e.get("name") == "fg_call")
    kernels = sorted(float(e["ts"]) for e in events if e.get("cat") == "kernel")
    for e in events:
        if e.get("cat") in ("cuda_driver", "cuda_runtime"):
            name = f"API {e.get('name', '?')}"
            api[name] = api.get(name, 0.0) + float(e.get("dur", 0.0)) / calls
    first = [next((k for k in kernels if k >= t), t) - t for t in starts]
    if first:
        api["call start to its first kernel"] = statistics.median(first)
    return api


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--rows", default="mlp128")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    manifest = json.loads((args.folder / "manifest.json").read_text())
    out = {}
    for key in args.rows.split(","):
        out[key] = row = measure(key, args.folder, manifest, args.calls, args.rounds)
        print(f"{key}:")
        for name, us in row.items():
            print(f"  {us:8.2f} µs  {name}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
