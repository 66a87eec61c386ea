"""The generated GEMM kernels, one by one, against cuBLAS (on a GPU machine with torch).

    python benches/gemm_kernels.py [--shapes mlp8192,mlp128] [--json out.json]

For each product of the chosen workloads' train steps (m, n, k and the operands'
layouts as the step has them), every candidate ``ptx_gemm`` and ``ptx_gemm_thin``
render for it is loaded through the driver (ctypes, no build), checked against a float64
product, and timed as the autotuner times it: 20 launches captured in a CUDA graph, the
median of 5 replays, per launch. ``torch.matmul`` on the same views (cuBLAS) is timed
the same way, in strict fp32 and, for scale, with TF32 allowed (the tensor cores'
ceiling, at TF32's error). Prints µs and TFLOP/s per product, fastest first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ferrograd.codegen.backends.ptx_gemm import (
    SPLIT_COUNTS,
    SPLIT_PARTIALS,
    tiled_candidates,
)
from ferrograd.codegen.backends.ptx_gemm_thin import thin_candidates
from ferrograd.codegen.launch_plan import ScalarArg

# (m, n, k, A walks k, B walks k): the products of each workload's train step
SHAPES: dict[str, list[tuple[int, int, int, bool, bool]]] = {
    "mlp8192": [(8192, 256, 784, True, False), (8192, 256, 256, True, False),
                (8192, 256, 256, True, True), (256, 256, 8192, False, False),
                (784, 256, 8192, False, False), (8192, 10, 256, True, False),
                (256, 10, 8192, False, False), (8192, 256, 10, True, True)],
    "mlp128": [(128, 256, 784, True, False), (128, 256, 256, True, True),
               (784, 256, 128, False, False), (256, 256, 128, False, False),
               (128, 10, 256, True, False), (256, 10, 128, False, False),
               (128, 256, 10, True, True)],
    "transformer": [(8192, 1536, 512, True, False), (8192, 2048, 512, True, False),
                    (8192, 512, 2048, True, False), (8192, 512, 2048, True, True),
                    (2048, 512, 8192, False, False), (512, 2048, 8192, False, False)],
}
LAUNCHES, REPLAYS = 20, 5


class Driver:
    """The few libcuda calls a kernel launch needs, in torch's context."""

    def __init__(self) -> None:
        self.cu = ctypes.CDLL("libcuda.so.1")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: CUDA driver error {status}")

    def function(self, ptx: str, name: str) -> ctypes.c_void_p:
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.cu.cuModuleLoadData(ctypes.byref(module), ptx.encode() + b"\0"),
                   f"loading {name}")
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                   name)
        return fn

    def launch(self, fn: ctypes.c_void_p, grid: tuple[int, int, int],
               block: tuple[int, int, int], args: list[Any], stream: int) -> None:
        values = [ctypes.c_uint64(a) if isinstance(a, int) else a for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        self.check(self.cu.cuLaunchKernel(fn, *grid, *block, 0, ctypes.c_void_p(stream),
                                          pointers, None), "launch")


def per_launch_us(run: Callable[[], None]) -> float:
    """``run`` captured ``LAUNCHES`` times in a CUDA graph: median µs per launch."""
    import torch

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            run()
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / LAUNCHES)
    return statistics.median(samples)


def product(driver: Driver, m: int, n: int, k: int, a_k: bool, b_k: bool
            ) -> list[dict[str, Any]]:
    """Every candidate's and cuBLAS's row, fastest first."""
    import torch

    a_store = torch.randn((m, k) if a_k else (k, m), device="cuda")
    b_store = torch.randn((n, k) if b_k else (k, n), device="cuda")
    a, b = (a_store if a_k else a_store.t()), (b_store.t() if b_k else b_store)
    want = (a.double() @ b.double()).float()
    c = torch.empty((m, n), device="cuda")
    ops = [("a", 0, (0, *a.stride())), ("b", 0, (0, *b.stride())), ("c", 0, (0, n, 1))]
    found = [*tiled_candidates(1, (m, n, k), ops, None, False, 1, (0, 0, 0), (1.0, 0.0)),
             *thin_candidates(1, (m, n, k), ops, None, False, 1, (0, 0, 0), (1.0, 0.0))]
    partials = torch.empty(max([t.partials for t in found] + [1]), device="cuda")
    counts = torch.zeros(max([t.tiles for t in found] + [1]), dtype=torch.int32, device="cuda")
    where = {"a": a_store.data_ptr(), "b": b_store.data_ptr(), "c": c.data_ptr(),
             SPLIT_PARTIALS: partials.data_ptr(), SPLIT_COUNTS: counts.data_ptr()}
    flops = 2 * m * n * k
    rows = []

    def timed(name: str, run: Callable[[], None]) -> None:
        c.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        err = float(((c - want).abs().max() / want.abs().max()).item())
        us = per_launch_us(run)
        rows.append({"kernel": name, "us": us, "tflops": flops / us / 1e6, "rel_err": err})

    timed("cuBLAS (torch.matmul)", lambda: torch.matmul(a, b, out=c))
    torch.backends.cuda.matmul.allow_tf32 = True  # the tensor cores' ceiling, for scale
    timed("cuBLAS TF32 (not fp32 accuracy)", lambda: torch.matmul(a, b, out=c))
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = [(t, t.name, t.text) for t in found]
    for t, label, text in variants:
        fn = driver.function(".version 7.8\n.target sm_90\n.address_size 64\n\n" +
                             text.replace("ENTRY", t.name), t.name)
        args = [(ctypes.c_float(x.value) if x.kind == "f32" else ctypes.c_uint32(x.value))
                if isinstance(x, ScalarArg) else where[x[0]] + 4 * x[1] for x in t.args]
        splits = t.grid[2]

        def run(fn: ctypes.c_void_p = fn, t: Any = t, args: list[Any] = args) -> None:
            driver.launch(fn, t.grid, t.block, args, torch.cuda.current_stream().cuda_stream)

        timed(label + (f", k in {splits} splits" if splits > 1 else ""), run)
    return sorted(rows, key=lambda r: r["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mlp8192,mlp128,transformer")
    ap.add_argument("--top", type=int, default=6, help="rows printed per product")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.zeros(1, device="cuda")
    driver = Driver()
    out = {}
    for key in args.shapes.split(","):
        for m, n, k, a_k, b_k in SHAPES[key]:
            label = f"{key} {m}x{n}x{k} {'k' if a_k else 'm'}{'k' if b_k else 'n'}"
            rows = product(driver, m, n, k, a_k, b_k)
            out[label] = rows
            print(label, flush=True)
            blas = next(r["us"] for r in rows if r["kernel"].startswith("cuBLAS (torch"))
            for r in rows[:args.top]:
                print(f"  {r['us']:8.2f} µs {r['tflops']:6.1f} TFLOP/s  x{blas / r['us']:.2f}"
                      f"  err {r['rel_err']:.1e}  {r['kernel']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
