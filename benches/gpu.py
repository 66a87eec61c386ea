"""GPU benchmarks: ferrograd's CUDA step against the anchors of ANCHORS.md (H200
table), every system in the same run, interleaved.

Two phases, because the GPU machine has no Rust toolchain (as gpu_cuda_check.py):

1. Here (cargo + maturin): lower every GPU workload (gpu_workloads.py) with
   ``backend=("cpu", "cuda")`` and build its abi3 module into a folder that travels,
   with a manifest::

       python benches/gpu.py --build .gpu_bench

2. On the GPU machine (``run`` tool, ``carry: [".gpu_bench"]``; the folder is listed
   in .git/info/exclude). cuBLAS must be on the loader's path, or the step falls back
   to its generated GEMM kernels (the JSON records ``gemm_backend``)::

       lib=$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib \\
             -name 'libcublas.so.1[23]*' 2>/dev/null | head -1);
       [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname $lib):$LD_LIBRARY_PATH;
       nvidia-smi; set -o pipefail;
       PYTHONUNBUFFERED=1 timeout 580 python3 benches/gpu.py .gpu_bench \\
           --deadline-s 470 --json $OUT/gpu.json 2>&1 | tee $OUT/log.txt

   The whole table takes ~7 minutes there (torch.compile and XLA autotuning included).

   Re-print the tables of a run: ``python benches/gpu.py --report-from FILE [FILE...]``
   (rows of a later file replace the same rows of an earlier one).

What is measured, per workload:

- systems: ferrograd (CUDA step, CUDA graphs on, cuBLASLt/cuBLAS with each GEMM's
  algorithm autotuned when the step is created — ``--no-autotune`` for cuBLASLt's
  heuristic's first choice; the JSON's ``fg_info`` records ``autotune``, the
  ``gemm_report`` and each GEMM's choice, ``gemm_steps`` —, strict fp32) with its batch
  on the device as the anchors keep theirs (torch CUDA tensors made once, which the
  step copies device to device into its input arenas through
  ``__cuda_array_interface__``), torch eager, torch eager with the whole step in one
  CUDA graph, torch.compile(mode="reduce-overhead") of the model + loss with the
  optimizer eager, JAX jit (one executable per step, params and state donated); and,
  like for like with a batch that comes from the host every step: ferrograd fed NumPy
  arrays (a second CUDA step, copied host→device per call), the CUDA-graph step and
  JAX fed from NumPy; and ferrograd with its graph's steps one after another
  (``branches=False``, device batch), to show what the parallel branches gain. All from
  ferrograd's initial params, on the same batch. Without
  torch (or with ``--device cpu``) ferrograd can only be fed NumPy: the run says so
  (log and ``fg_inputs_note`` in the JSON) and its device-input column stays empty;
- correctness: the losses of the first three steps (forward at the initial weights,
  then after one and two updates) of every system, both ferrograd steps included,
  against ferrograd's; for the forward-only ``ew`` row, every system's output against
  a float64 reference;
- "step": one training step with its loss back on the host as a float (ferrograd's
  ``step(x, y)`` always waits for its loss; torch ``loss.item()``; JAX ``float(loss)``),
  timed with the host clock around batches of consecutive steps (each step
  synchronizes, so the clock reads finished work). Systems are interleaved in
  rounds with a rotating order; medians over rounds; ratios are medians of per-round
  ratios (< 1: ferrograd faster);
- "pipelined": the anchors' best case, steps issued back to back with nothing read
  back and one synchronize at the end of the batch; and ferrograd's, "ferrograd
  (steps)": ``step.steps`` over K stacked copies of the device batch (stacked once;
  K steps queued back to back, one wait, the K losses back per call; K from
  ``STEPS_CALL_MS`` at ferrograd's synchronous step time, at most ``STEPS_MAX_K``),
  timed per step like the anchors, on the same step object as "ferrograd";
- device time: a short CUPTI trace (torch.profiler, CUDA activities only, which also
  sees ferrograd's kernels: they run in the same primary context) of a few steps of
  each system: kernel time, kernel count, memcpy time per step;
- the ceilings, measured in the same run: device-to-device copy of 1 GiB (bytes read
  + written) and an 8192³ fp32 GEMM (TF32 off).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from gpu_workloads import GPU_BY_KEY, TSIZE, GpuWorkload, fg_optimizer  # noqa: E402

import ferrograd as fg  # noqa: E402

FG = "ferrograd"  # batch on the device (host inputs when no torch: see fg_inputs)
FG_HOST = "ferrograd, host in"
FG_IN_ORDER = "ferrograd, in order"  # device batch, the graph's steps one after another
FG_STEPS = "ferrograd (steps)"  # step.steps over K stacked copies of the device batch
EAGER = "torch eager"
GRAPH = "eager + CUDA graph"
COMPILE = "torch.compile"
JAX = "JAX jit"
GRAPH_HOST = "CUDA graph, host in"
JAX_HOST = "JAX jit, host in"
DEVICE_ANCHORS = [EAGER, GRAPH, COMPILE, JAX]
HOST_ANCHORS = [GRAPH_HOST, JAX_HOST]
LOSS_STEPS = 3
LOSS_RTOL = 1e-4  # first loss (fp32, sums in other orders)
DELTA_RTOL = 2e-2  # the loss changes after one and two updates
EW_RTOL = 1e-5  # ew outputs against float64
TOP_KERNELS = 60  # kernels kept per system in the JSON's device profile, longest first
SHORT_GAP_US = 20.0  # idle time between two kernels shorter than this is inside a step
STEPS_CALL_MS = 2.0  # FG_STEPS: K fills this at ferrograd's synchronous step time...
STEPS_MAX_K = 64  # ...up to this many steps per call

# ---- phase 1: build --------------------------------------------------------------------


_DATA: dict[str, Any] = {}


def data_of(w: GpuWorkload) -> Any:
    """The workload's batch, drawn once per process (the ew input takes seconds)."""
    if w.key not in _DATA:
        _DATA[w.key] = w.data()
    return _DATA[w.key]


def lower(w: GpuWorkload) -> fg.Lowered:
    return fg.lower(w.model, optimizer=fg_optimizer(w.opt), backend=("cpu", "cuda"), seed=0,
                    **w.dims)


def build(folder: Path, keys: list[str]) -> None:
    from collections import Counter

    folder.mkdir(parents=True, exist_ok=True)
    # The modules run on the GPU host, whose CPU is not this one: AVX2 at most.
    os.environ.setdefault("FERROGRAD_CPU_LEVEL", "v3")
    manifest = {}
    for key in keys:
        w = GPU_BY_KEY[key]
        t = time.perf_counter()
        low = lower(w)
        module = low._module()  # built, or found in the cache
        path = Path(str(module.__file__))
        shutil.copy2(path, folder / path.name)
        dm = low.device_module("ptx")
        manifest[key] = {
            "module": module.__name__, "file": path.name, "fingerprint": low.fingerprint,
            "arena_bytes": {k: v * 4 for k, v in dm.arena_sizes.items() if v},
            "plan": {e: dict(Counter(type(s).__name__ for s in p.steps))
                     for e, p in dm.plans.items()},
            "build_s": round(time.perf_counter() - t, 1), "git": built_from()}
        print(f"built {key}: {path.name} ({path.stat().st_size / 1e6:.1f} MB, "
              f"{manifest[key]['build_s']} s) plan {manifest[key]['plan']}", flush=True)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---- systems ---------------------------------------------------------------------------


@dataclass
class System:
    name: str
    step: Callable[[], Any]  # one step; returns the loss as a float (synchronizes)
    step_async: Callable[[], Any]  # one step, nothing read back
    sync: Callable[[Any], None]  # wait for the device (after step_async)
    output: Callable[[], Any] | None = None  # ew: the output (device or host array)
    first_s: float = 0.0  # construction + first step (compile, capture, JIT)
    info: dict[str, Any] | None = None
    steps_per_call: int = 1  # training steps one call of step / step_async makes


def _wrap(name: str, t: Any, first_s: float) -> System:
    return System(name, t.step, t.step_async, t.sync, getattr(t, "output", None), first_s)


def device_batch(batch: Any) -> tuple[list[Any] | None, str | None]:
    """The batch as torch CUDA tensors (dtypes kept: ferrograd's ids are int32), made
    once like the anchors' batch; or None and why not (no torch, no CUDA device)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
        return [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in batch], None
    except Exception as err:  # torch missing or broken: NumPy inputs, said aloud
        return None, f"torch unavailable ({type(err).__name__}: {err})"


class FgSystem:
    """A ferrograd step for one workload from the carried module, fed ``batch`` (device
    tensors or NumPy arrays) every step; each FgSystem has its own CUDA step (arenas,
    params, optimizer state), so two of them train independently from the same start."""

    def __init__(self, w: GpuWorkload, low: fg.Lowered, folder: Path, manifest: dict[str, Any],
                 device: str, batch: list[Any], autotune: bool = True,
                 branches: bool = True, graph_inputs: bool = True) -> None:
        from ferrograd.codegen.build import _load
        from ferrograd.codegen.cpu_step import CompiledStep
        from ferrograd.codegen.cuda_step import open_cuda_step
        from ferrograd.dsl.init import init_params
        from ferrograd.ir.optim import init_state

        entry = manifest[w.key]
        self.low = low
        self.info: dict[str, Any] = {"module": entry["module"],
                                     "arena_bytes": sum(entry["arena_bytes"].values()),
                                     "plan": entry["plan"],
                                     "inputs": "host" if isinstance(batch[0], np.ndarray)
                                     else "device"}
        if self.low.fingerprint != entry["fingerprint"]:
            self.info["warning"] = "graph fingerprint differs from the build's"
        module = _load(entry["module"], folder / entry["file"])
        if device == "cuda":
            self.native = open_cuda_step(module, self.low.graph.name, graph=True,
                                         autotune=autotune, branches=branches,
                                         graph_inputs=graph_inputs)
            self.info.update(autotune=autotune, branches=self.native.branches,
                             gemm_backend=self.native.gemm_backend,
                             gemm_report=self.native.gemm_report,
                             gemm_steps=list(self.native.gemm_steps),
                             device_name=self.native.device_name)
        else:  # a dry run of this script on a machine without a GPU
            self.native = module.Step()
        self.step_obj = CompiledStep(self.low, module, init_params(self.low.graph, 0),
                                     init_state(self.low.graph), device, self.native)
        self.batch = batch
        self.forward_only = w.opt is None
        self.out: Any = None

    def step(self) -> Any:
        if self.forward_only:
            self.out = None
            self.out = self.native.forward(*self.batch)["y"]
            return None
        return self.step_obj(*self.batch)

    step_async = step

    def sync(self, handle: Any = None) -> None:
        pass

    def output(self) -> Any:
        self.step()
        return self.out

    def system(self, name: str, first_s: float) -> System:
        return System(name, self.step, self.step_async, self.sync, self.output, first_s,
                      self.info)

    def steps_system(self, name: str, k: int) -> System:
        """``step.steps`` over ``k`` stacked copies of the (device) batch, made once: each
        call is k training steps queued back to back with one wait, its k losses back."""
        import torch

        stacked = [torch.stack([t] * k) for t in self.batch]

        def call() -> float:
            return float(self.step_obj.steps(*stacked)[-1])

        return System(name, call, call, self.sync, None, 0.0,
                      {**self.info, "steps_per_call": k}, steps_per_call=k)


def make_systems(w: GpuWorkload, fg_systems: list[System], params: dict[str, np.ndarray],
                 anchors: dict[str, Any], errors: dict) -> list[System]:
    """ferrograd's steps first, then every anchor that builds (a failure is noted in
    ``errors`` and the row goes on without it)."""
    systems = list(fg_systems)
    batch = data_of(w)
    makers: dict[str, Callable[[], Any]] = {}
    ga = anchors.get("module")
    if ga is None:
        return systems
    if "torch" in anchors:
        loss = anchors["torch_losses"][w.arch]
        if w.opt is None:
            makers[EAGER] = lambda: ga.TorchForward(loss, batch, "eager")
            makers[GRAPH] = lambda: ga.TorchForward(loss, batch, "graph")
            makers[COMPILE] = lambda: ga.TorchForward(loss, batch, "compile")
        else:
            makers[EAGER] = lambda: ga.TorchEager(loss, w.opt, params, batch)
            makers[GRAPH] = lambda: ga.TorchGraph(loss, w.opt, params, batch)
            makers[COMPILE] = lambda: ga.TorchCompiled(loss, w.opt, params, batch)
            makers[GRAPH_HOST] = lambda: ga.TorchGraph(loss, w.opt, params, batch,
                                                       host_inputs=True)
    if "jax" in anchors:
        jloss = anchors["jax_losses"][w.arch]
        if w.opt is None:
            makers[JAX] = lambda: ga.JaxForward(jloss, batch)
        else:
            makers[JAX] = lambda: ga.JaxTrainer(jloss, w.opt, params, batch)
            makers[JAX_HOST] = lambda: ga.JaxTrainer(jloss, w.opt, params, batch,
                                                     host_inputs=True)
    for name, make in makers.items():
        try:
            t = time.perf_counter()
            trainer = make()
            systems.append(_wrap(name, trainer, time.perf_counter() - t))
        except Exception as err:  # noted; the row goes on
            errors[name] = f"{type(err).__name__}: {err}"
            log(f"  {name} failed to build: {errors[name][:300]}")
            log(traceback.format_exc()[-2000:])
    return systems


# ---- checking --------------------------------------------------------------------------


def first_losses(systems: list[System], errors: dict) -> dict[str, list[float]]:
    """LOSS_STEPS steps of every system from the initial state; a system that fails
    is dropped (and noted)."""
    losses = {}
    for s in list(systems):
        try:
            t = time.perf_counter()
            values = [float(s.step())]
            s.first_s += time.perf_counter() - t
            values += [float(s.step()) for _ in range(LOSS_STEPS - 1)]
            losses[s.name] = values
        except Exception as err:
            errors[s.name] = f"{type(err).__name__}: {err}"
            log(f"  {s.name} failed: {errors[s.name][:300]}")
            log(traceback.format_exc()[-2000:])
            systems.remove(s)
    return losses


def check_losses(losses: dict[str, list[float]]) -> dict[str, bool]:
    ref = losses.get(FG)
    ok = {}
    for name, got in losses.items():
        if ref is None or name == FG:
            ok[name] = bool(np.all(np.isfinite(got)))
            continue
        bad = not np.all(np.isfinite(got))
        bad = bad or abs(got[0] - ref[0]) > LOSS_RTOL * abs(ref[0]) + 1e-6
        for i in range(1, len(ref)):
            want, have = ref[0] - ref[i], got[0] - got[i]
            bad = bad or abs(have - want) > DELTA_RTOL * abs(want) + LOSS_RTOL * abs(ref[0])
        ok[name] = not bad
    return ok


def check_ew(systems: list[System], w: GpuWorkload, errors: dict) -> dict[str, float]:
    """Relative L2 error of every system's output against gelu in float64 (on the GPU,
    through torch); ferrograd's output comes back to the host and is copied up."""
    import torch

    (x,) = data_of(w)
    xd = torch.from_numpy(x).to("cuda", torch.float64)
    z = xd * 1.7 - 0.3
    ref = 0.5 * z * (1.0 + torch.special.erf(z / np.sqrt(2.0)))
    del xd, z
    refn = float(torch.linalg.vector_norm(ref))
    out = {}
    for s in list(systems):
        try:
            assert s.output is not None
            y = s.output()
            if isinstance(y, np.ndarray):
                yd = torch.from_numpy(y).to("cuda")
            elif isinstance(y, torch.Tensor):
                yd = y
            else:  # a JAX array
                try:
                    yd = torch.from_dlpack(y)
                except Exception:
                    yd = torch.from_numpy(np.asarray(y)).to("cuda")
            out[s.name] = float(torch.linalg.vector_norm(yd.double() - ref)) / refn
            del yd, y
        except Exception as err:  # noted; still timed
            errors[f"{s.name} (check)"] = f"{type(err).__name__}: {err}"
            log(f"  {s.name}: output check failed: {err}")
    del ref
    torch.cuda.empty_cache()
    return out


# ---- timing ----------------------------------------------------------------------------


def time_batch(s: System, n: int, pipelined: bool) -> float:
    """Seconds per training step over ``n`` consecutive calls (GC paused)."""
    gc.collect()
    gc.disable()
    try:
        if pipelined:
            s.sync(None)
            start = time.perf_counter()
            handle = None
            for _ in range(n):
                handle = s.step_async()
            s.sync(handle)
        else:
            start = time.perf_counter()
            for _ in range(n):
                s.step()
        return (time.perf_counter() - start) / (n * s.steps_per_call)
    finally:
        gc.enable()


def calibrate(s: System, target_s: float, pipelined: bool) -> int:
    """Calls that take about ``target_s``."""
    n, per = 1, time_batch(s, 1, pipelined) * s.steps_per_call
    while per * n < target_s / 4 and n < 100_000:
        n *= 4
        per = time_batch(s, n, pipelined) * s.steps_per_call
    return max(1, round(target_s / per))


def steps_per_call(sync_ms: list[float] | None) -> int:
    """K for FG_STEPS: steps that fill STEPS_CALL_MS at ferrograd's synchronous step time
    (longer than its pipelined one), 1 to STEPS_MAX_K."""
    if not sync_ms:
        return 1
    return max(1, min(STEPS_MAX_K, math.ceil(STEPS_CALL_MS / statistics.median(sync_ms))))


def time_rounds(systems: list[System], rounds: int, target_s: float, pipelined: bool,
                errors: dict) -> dict[str, list[float]]:
    """ms per step of every system in each round; interleaved, order rotating."""
    counts = {}
    for s in list(systems):
        try:
            counts[s.name] = calibrate(s, target_s, pipelined)
        except Exception as err:
            errors[s.name] = f"{type(err).__name__}: {err}"
            systems.remove(s)
    times: dict[str, list[float]] = {s.name: [] for s in systems}
    for r in range(rounds):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            times[s.name].append(time_batch(s, counts[s.name], pipelined) * 1e3)
    return times


def profile(s: System, steps: int) -> dict[str, Any]:
    """Device activity of ``steps`` steps (CUPTI through torch.profiler): kernel time,
    count, memcpy and memset time, per step; the kernels that took longest."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    s.step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            s.step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    kern: dict[str, list[float]] = {}
    memcpy: dict[str, float] = {}
    memset = 0.0
    starts, ends = [], []
    for e in events:
        cat, dur = e.get("cat", ""), float(e.get("dur", 0.0))
        if cat == "kernel":
            kern.setdefault(e.get("name", "?"), []).append(dur)
            starts.append(float(e.get("ts", 0.0)))
            ends.append(float(e.get("ts", 0.0)) + dur)
        elif cat == "gpu_memcpy":
            kind = e.get("name", "memcpy")
            memcpy[kind] = memcpy.get(kind, 0.0) + dur
        elif cat == "gpu_memset":
            memset += dur
    total = sum(sum(v) for v in kern.values())
    top = sorted(kern.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    # idle time between one kernel's end and the next one's start, when under
    # SHORT_GAP_US: inside a step (the launch latency of graph nodes, library calls);
    # longer gaps are the host's round trips between steps
    spans = sorted(zip(starts, ends, strict=True))
    busy, gaps, reach = 0.0, [], None  # kernels may overlap (a graph's parallel branches)
    for a, b in spans:
        if reach is None or a > reach:  # an idle stretch before this kernel
            if reach is not None:
                gaps.append(a - reach)
            busy += b - a
            reach = b
        elif b > reach:
            busy += b - reach
            reach = b
    short = [g for g in gaps if g < SHORT_GAP_US]
    return {
        "steps": steps,
        "kernels_per_step": sum(len(v) for v in kern.values()) / steps,
        "kernel_us_per_step": total / steps,
        # time with at least one kernel running: below kernel_us when kernels overlap
        "busy_us_per_step": busy / steps,
        "memcpy_us_per_step": {k: v / steps for k, v in memcpy.items()},
        "memset_us_per_step": memset / steps,
        "span_us_per_step": (max(ends) - min(starts)) / steps if starts else None,
        "short_gaps_us_per_step": sum(short) / steps,
        "top_kernels": [{"name": n[:120], "calls_per_step": len(v) / steps,
                         "us_per_step": sum(v) / steps} for n, v in top],
    }


# ---- one row ---------------------------------------------------------------------------


def run_row(w: GpuWorkload, args: argparse.Namespace, folder: Path, manifest: dict,
            anchors: dict[str, Any], ceilings: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"key": w.key, "title": w.title, "ref": vars(w.ref),
                           "flops": w.flops, "bytes_min": w.bytes_min, "errors": {}}
    errors = row["errors"]
    torch = anchors.get("torch")
    t0 = time.perf_counter()
    host = list(data_of(w))
    dev, why = device_batch(host) if args.device == "cuda" else (None, "--device cpu")
    if torch is not None:  # after the device batch: fg_device_bytes is the step's own
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free0 = torch.cuda.mem_get_info()[0]
    t_fg = time.perf_counter()
    low = lower(w)
    fgs = FgSystem(w, low, folder, manifest, args.device, host if dev is None else dev,
                   args.autotune)
    t_fg = time.perf_counter() - t_fg  # lowering, loading, CudaStep (PTX JIT), params up
    if torch is not None:
        torch.cuda.synchronize()
        row["fg_device_bytes"] = free0 - torch.cuda.mem_get_info()[0]
    fg_systems = [fgs.system(FG, t_fg)]
    if dev is None:  # never silently: the row says ferrograd had host inputs only
        row["fg_inputs"], row["fg_inputs_note"] = "host", f"NumPy inputs only: {why}"
        log(f"{w.key}: ferrograd fed from NumPy only ({why})")
    else:  # the like-for-like partner: a second step, fed NumPy every step
        row["fg_inputs"] = "device"
        t = time.perf_counter()
        fg_host = FgSystem(w, low, folder, manifest, args.device, host, args.autotune)
        fg_systems.append(fg_host.system(FG_HOST, time.perf_counter() - t))
        del fg_host  # alive through fg_systems and systems only
        if w.opt is not None:  # what the graph's parallel branches gain, side by side
            t = time.perf_counter()
            fg_order = FgSystem(w, low, folder, manifest, args.device, dev, args.autotune,
                                branches=False)
            fg_systems.append(fg_order.system(FG_IN_ORDER, time.perf_counter() - t))
            del fg_order
    systems = make_systems(w, fg_systems, fgs.step_obj.params, anchors, errors)
    log(f"{w.key}: systems {', '.join(s.name for s in systems)} "
        f"({time.perf_counter() - t0:.1f} s)")
    if w.opt is None:
        if torch is not None:
            row["output_rel_err"] = check_ew(systems, w, errors)
            row["ok"] = {n: e <= EW_RTOL for n, e in row["output_rel_err"].items()}
        else:
            row["ok"] = {}
        for s in list(systems):  # the first call (compile, capture) ran in output()
            try:
                t = time.perf_counter()
                s.step()
                s.first_s += time.perf_counter() - t
            except Exception as err:
                errors[s.name] = f"{type(err).__name__}: {err}"
                systems.remove(s)
    else:
        row["losses"] = first_losses(systems, errors)
        row["ok"] = check_losses(row["losses"])
    row["first_call_s"] = {s.name: s.first_s for s in systems}
    for s in systems:  # warm-up
        for _ in range(args.warmup):
            s.step()
    log(f"{w.key}: checked ({time.perf_counter() - t0:.1f} s): ok {row['ok']}")
    target = args.target_ms / 1e3
    with ClockSampler() as clocks:
        row["sync_ms"] = time_rounds(systems, args.rounds, target, False, errors)
    row["gpu_clocks"] = clocks.summary()
    if args.device == "cuda":  # captured by now: how each graph runs its steps
        row["fg_branches"] = fgs.native.branches
    log(f"{w.key}: timed ({time.perf_counter() - t0:.1f} s); GPU while timing: "
        f"{row['gpu_clocks']}")
    pipelined = [s for s in systems if s.name not in (FG, FG_HOST, FG_IN_ORDER)]
    if dev is not None and w.opt is not None and FG in row["sync_ms"]:
        k = row["fg_steps_k"] = steps_per_call(row["sync_ms"][FG])
        try:
            pipelined.append(fgs.steps_system(FG_STEPS, k))
        except Exception as err:  # noted; the anchors are still timed
            errors[FG_STEPS] = f"{type(err).__name__}: {err}"
    if pipelined and args.pipelined_rounds:
        row["pipelined_ms"] = time_rounds(pipelined, args.pipelined_rounds, target, True,
                                          errors)
    if torch is not None and args.profile_steps:
        row["profile"] = {}
        for s in systems:
            try:
                row["profile"][s.name] = profile(
                    s, 2 if w.opt is None else args.profile_steps)
            except Exception as err:
                row["profile"][s.name] = {"error": f"{type(err).__name__}: {err}"}
    if torch is not None:
        row["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
    if "jax" in anchors:
        try:
            stats = anchors["jax"].devices()[0].memory_stats() or {}
            row["jax_peak_bytes"] = stats.get("peak_bytes_in_use")
        except Exception:
            pass
    row["fg_info"] = fgs.info
    row["seconds"] = time.perf_counter() - t0
    summarize(row, ceilings)
    log(f"{w.key}: done ({row['seconds']:.1f} s)")
    del systems, fg_systems, fgs, dev
    gc.collect()
    return row


def med(v: list[float] | None) -> float | None:
    return statistics.median(v) if v else None


def summarize(row: dict[str, Any], ceilings: dict[str, Any]) -> None:
    """Medians, ratios (median of per-round ratios), goal verdicts."""
    sync = row.get("sync_ms", {})
    row["median_ms"] = {k: med(v) for k, v in sync.items()}
    row["best_ms"] = {k: min(v) for k, v in sync.items() if v}
    row["pipelined_median_ms"] = {k: med(v) for k, v in row.get("pipelined_ms", {}).items()}
    def ratios(mine: list[float] | None, skip: tuple[str, ...]) -> dict[str, float]:
        return {k: statistics.median(a / b for a, b in zip(mine, v, strict=True))
                for k, v in sync.items() if mine and v and k not in skip}

    fgt = sync.get(FG)
    row["ratio"] = ratios(fgt, (FG,))
    row["ratio_host"] = ratios(sync.get(FG_HOST), (FG, FG_HOST))
    if fgt:
        fgm = med(fgt)
        row["ratio_vs_pipelined"] = {k: fgm / v for k, v in row["pipelined_median_ms"].items()
                                     if v}
    piped = row.get("pipelined_ms", {})
    if piped.get(FG_STEPS):  # median of per-round ratios, as for the synchronous table
        row["ratio_steps_vs_pipelined"] = {
            k: statistics.median(a / b for a, b in zip(piped[FG_STEPS], v, strict=True))
            for k, v in piped.items() if v and k != FG_STEPS}
    prof = row.get("profile", {})
    if row["key"] == "ew":
        copy = ceilings.get("copy_GBps")
        row["bandwidth"] = {}
        for name, p in prof.items():
            us = p.get("kernel_us_per_step")
            if us:
                gbps = row["bytes_min"] / (us * 1e-6) / 1e9
                row["bandwidth"][name] = {"kernel_us": us, "GBps": gbps,
                                          "of_copy": gbps / copy if copy else None}
        fg_bw = row["bandwidth"].get(FG, {}).get("of_copy")
        row["goal_met"] = None if fg_bw is None else fg_bw >= 0.9
    else:
        goal = row["ref"]["goal"]
        fgm = row["median_ms"].get(FG)
        row["goal_met"] = None if fgm is None or goal is None else fgm <= goal
        if row.get("flops"):
            row["tflops"] = {k: row["flops"] / (v * 1e-3) / 1e12
                             for k, v in row["median_ms"].items() if v}


# ---- machine and ceilings ----------------------------------------------------------------


class ClockSampler:
    """The GPU's SM clock, power and temperature every 0.5 s while the block runs (one
    ``nvidia-smi -lms`` process), to tell a throttled run from a slow system."""

    QUERY = "clocks.sm,power.draw,temperature.gpu"

    def __enter__(self) -> ClockSampler:
        self.out = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=self.out, stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self) -> dict[str, Any]:
        """min / median / max of each quantity over the samples (empty without any)."""
        self.out.seek(0)
        rows = []
        for line in self.out.read().splitlines():
            try:
                rows.append([float(v) for v in line.split(",")])
            except ValueError:
                continue
        self.out.close()
        out: dict[str, Any] = {"samples": len(rows)}
        for i, name in enumerate(("sm_mhz", "watts", "celsius")):
            vals = [r[i] for r in rows if len(r) > i]
            if vals:
                out[name] = [min(vals), statistics.median(vals), max(vals)]
        return out


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60,
                              check=False).stdout.strip()
    except Exception as err:
        return f"({err})"


def built_from() -> str:
    """The commit the modules are built from, "+dirty" with uncommitted changes to
    tracked files (the GPU host's copy of the tree may not carry an up-to-date .git)."""
    dirty = sh(f"git -C {ROOT} status --porcelain --untracked-files=no")
    return sh(f"git -C {ROOT} rev-parse --short HEAD") + ("+dirty" if dirty else "")


def machine_info(anchors: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(), "numpy": np.__version__,
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo"), "cores": os.cpu_count(),
        "nvidia_smi_L": sh("nvidia-smi -L"),
        "nvidia_smi": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,"
                         "clocks.max.sm,clocks.max.mem,power.limit,pstate,temperature.gpu,"
                         "utilization.gpu --format=csv"),
        "nvidia_smi_full": sh("nvidia-smi"),
        "ferrograd": fg.__version__, "git": sh(f"git -C {ROOT} rev-parse --short HEAD"),
    }
    if "torch" in anchors:
        t = anchors["torch"]
        info["torch"] = t.__version__
        info["torch_cuda"] = t.version.cuda
        info["cudnn"] = t.backends.cudnn.version()
    if "jax" in anchors:
        info["jax"] = anchors["jax"].__version__
        info["jax_devices"] = [str(d) for d in anchors["jax"].devices()]
    info["anchor_errors"] = anchors.get("errors", {})
    return info


def measure_ceilings(torch: Any) -> dict[str, Any]:
    """Device copy of 1 GiB (read + write) and an 8192³ fp32 GEMM, median of events."""
    def timed(fn: Callable[[], Any], reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times)

    n = 1 << 28
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), 20)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda")
    b = torch.randn(m, m, device="cuda")
    t_gemm = timed(lambda: a @ b, 10)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * 4 * n / t_copy / 1e9, "copy_ms": t_copy * 1e3,
            "gemm_fp32_TFLOPs": 2 * m ** 3 / t_gemm / 1e12, "gemm_ms": t_gemm * 1e3}


def load_anchors(skip: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": {}}
    try:
        import gpu_anchors

        out["module"] = gpu_anchors
    except Exception as err:
        out["errors"]["gpu_anchors"] = repr(err)
        return out
    if "torch" not in skip:
        try:
            out["torch"] = gpu_anchors.torch_setup()
            out["torch_losses"] = gpu_anchors.torch_losses(TSIZE)
        except Exception as err:
            out.pop("torch", None)
            out["errors"]["torch"] = repr(err)
    if "jax" not in skip:
        try:
            out["jax"] = gpu_anchors.jax_setup()
            out["jax_losses"] = gpu_anchors.jax_losses(TSIZE)
        except Exception as err:
            out.pop("jax", None)
            out["errors"]["jax"] = repr(err)
    return out


# ---- report ------------------------------------------------------------------------------


def ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def xr(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def fg_columns(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """ferrograd's figures of a row as (device inputs, host inputs), each {"ms": median,
    "ratio": fg / anchor}. Rows without ``fg_inputs`` come from runs that fed ferrograd
    NumPy only: their one ferrograd figure is the host-input one."""
    m = r["median_ms"]
    if r.get("fg_inputs", "host") == "device":
        return ({"ms": m.get(FG), "ratio": r["ratio"]},
                {"ms": m.get(FG_HOST), "ratio": r.get("ratio_host", {})})
    return {"ms": None, "ratio": {}}, {"ms": m.get(FG), "ratio": r["ratio"]}


def report(result: dict[str, Any]) -> str:
    rows = [r for r in result["rows"] if "median_ms" in r]
    ceil = result.get("ceilings", {})
    lines = [f"machine: {result['info'].get('nvidia_smi_L', '?')}",
             f"ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s, fp32 GEMM 8192³ "
             f"{ceil.get('gemm_fp32_TFLOPs', 0):.1f} TFLOP/s", ""]
    lines += ["Step with the loss back on the host, every system's batch on the device "
              "(medians of interleaved rounds); ratios fg / anchor (< 1: ferrograd faster):",
              ""]
    head = [f"{FG} (device inputs)", *DEVICE_ANCHORS]
    lines.append("| workload | " + " | ".join(head) + " | " +
                 " | ".join(f"fg / {a}" for a in DEVICE_ANCHORS) +
                 " | goal | goal met | agree |")
    lines.append("|---" * (2 + len(head) + len(DEVICE_ANCHORS) + 2) + "|")
    for r in rows:
        m = r["median_ms"]
        dev, _ = fg_columns(r)
        agree = all(r.get("ok", {}).values()) if r.get("ok") else None
        bad = [k for k, v in r.get("ok", {}).items() if not v]
        goal = r["ref"]["goal_text"]
        if r["key"] == "ew":
            bw = r.get("bandwidth", {}).get(FG, {})
            goal += f" (fg kernel: {bw.get('of_copy', 0) * 100:.0f}%)" if bw else ""
        lines.append(f"| {r['title']} | {ms(dev['ms'])} | " +
                     " | ".join(ms(m.get(k)) for k in DEVICE_ANCHORS) + " | " +
                     " | ".join(xr(dev["ratio"].get(a)) for a in DEVICE_ANCHORS) +
                     f" | {goal} | {'yes' if r.get('goal_met') else 'no'} | "
                     f"{'yes' if agree else 'NO: ' + ', '.join(bad)} |")
    for r in rows:  # what the graph's parallel branches gain (same run, interleaved)
        in_order = r["median_ms"].get(FG_IN_ORDER)
        if in_order is not None and r["median_ms"].get(FG) is not None:
            lines.append(f"- {r['title']}: ferrograd {ms(r['median_ms'][FG])} with its "
                         f"graph's steps in parallel branches, {ms(in_order)} one after "
                         f"another ({FG_IN_ORDER!r}): {xr(r['ratio'].get(FG_IN_ORDER))}; "
                         f"{r.get('fg_branches', '')}")
    notes = sorted({r["fg_inputs_note"] for r in rows if r.get("fg_inputs_note")})
    lines += [f"- ferrograd: {n}" for n in notes]
    if any("fg_inputs" not in r for r in rows):
        lines.append("- –: a run that fed ferrograd NumPy arrays only (before device "
                     "inputs were timed); its figures are in the next table")
    lines += ["", "Like for like with a batch from the host (NumPy arrays copied to the "
              "device every step):", ""]
    lines.append(f"| workload | {FG_HOST} | " + " | ".join(HOST_ANCHORS) + " | " +
                 " | ".join(f"fg / {a}" for a in HOST_ANCHORS) + " |")
    lines.append("|---" * (2 + 2 * len(HOST_ANCHORS)) + "|")
    for r in rows:
        if r["key"] == "ew":
            continue
        m = r["median_ms"]
        _, host = fg_columns(r)
        lines.append(f"| {r['title']} | {ms(host['ms'])} | " +
                     " | ".join(ms(m.get(a)) for a in HOST_ANCHORS) + " | " +
                     " | ".join(xr(host["ratio"].get(a)) for a in HOST_ANCHORS) + " |")
    lines += ["", "Anchors pipelined (steps back to back, one synchronize per batch), and "
              f"{FG_STEPS}: step.steps over K stacked batches per call (K steps back to back, "
              "one wait, K losses back); ms per step:", ""]
    lines.append("| workload | " + " | ".join(DEVICE_ANCHORS) + f" | {FG_STEPS} | K | "
                 "fg (synchronous) / best pipelined anchor | fg (steps) / best pipelined "
                 "anchor |")
    lines.append("|---" * (5 + len(DEVICE_ANCHORS)) + "|")
    for r in rows:
        p = r.get("pipelined_median_ms", {})
        best = min((v for k, v in p.items() if k in DEVICE_ANCHORS and v), default=None)
        fgm = fg_columns(r)[0]["ms"]
        fgs = p.get(FG_STEPS)
        lines.append(f"| {r['title']} | " + " | ".join(ms(p.get(a)) for a in DEVICE_ANCHORS)
                     + f" | {ms(fgs)} | {r.get('fg_steps_k', '–')} | "
                     f"{xr(fgm / best) if fgm and best else '–'} | "
                     f"{xr(fgs / best) if fgs and best else '–'} |")
    lines += ["", "Device activity per step (CUPTI): kernel time / kernels; "
              "memcpy time (ferrograd: inputs into its arenas — device to device, or host "
              "to device where it had host inputs only — and the loss back):", ""]
    names = [FG, *DEVICE_ANCHORS]
    lines.append("| workload | " + " | ".join(names) + " | fg memcpy | fg rest of the step "
                 "(host, launch, sync) | fg idle between kernels (gaps < 20 µs) |")
    lines.append("|---" * (4 + len(names)) + "|")
    for r in rows:
        prof = r.get("profile", {})
        cells = []
        for n in names:
            p = prof.get(n, {})
            busy = p.get("busy_us_per_step", p.get("kernel_us_per_step", 0))
            overlap = (f" ({busy:.0f} µs busy)" if busy < 0.98 * p.get("kernel_us_per_step", 0)
                       else "")
            cells.append(f"{p['kernel_us_per_step']:.0f} µs / {p['kernels_per_step']:.0f}"
                         f"{overlap}" if "kernel_us_per_step" in p else "–")
        mc = sum(prof.get(FG, {}).get("memcpy_us_per_step", {}).values())
        kt = prof.get(FG, {}).get("busy_us_per_step", prof.get(FG, {}).get("kernel_us_per_step"))
        wall = r["median_ms"].get(FG)
        rest = (f"{wall * 1e3 - kt - mc:.0f} µs" if wall is not None and kt is not None
                else "–")
        gaps = prof.get(FG, {}).get("short_gaps_us_per_step")
        idle = "–" if gaps is None else f"{gaps:.0f} µs"
        lines.append(f"| {r['title']} | " + " | ".join(cells)
                     + f" | {mc:.0f} µs | {rest} | {idle} |")
    ew = next((r for r in rows if r["key"] == "ew"), None)
    if ew and ew.get("bandwidth"):
        lines += ["", "ew: kernel time and bandwidth (2 × 1 GiB per call) vs the copy ceiling:",
                  ""]
        for n, b in ew["bandwidth"].items():
            err = ew.get("output_rel_err", {}).get(n)
            lines.append(f"- {n}: {b['kernel_us']:.0f} µs, {b['GBps']:.0f} GB/s = "
                         f"{b['of_copy'] * 100:.0f}% of copy; rel. error vs float64 "
                         f"{err if err is None else f'{err:.1e}'}")
    lines += ["", "Achieved fp32 rate (FLOPs of the GEMMs per step over the step time; "
              "ferrograd also over its kernel time):", ""]
    for r in rows:
        if not r.get("flops"):
            continue
        kt = r.get("profile", {}).get(FG, {}).get("kernel_us_per_step")
        rates = ", ".join(f"{k} {v:.1f}" for k, v in r.get("tflops", {}).items())
        fk = f"; ferrograd kernels {r['flops'] / (kt * 1e-6) / 1e12:.1f}" if kt else ""
        lines.append(f"- {r['key']}: {r['flops'] / 1e9:.1f} GFLOP; TFLOP/s {rates}{fk}")
    lines += ["", "ferrograd's GEMMs (autotune: each algorithm timed when the step is "
              "created; fg_info.gemm_steps in the JSON has each GEMM's choice):", ""]
    for r in rows:
        info = r.get("fg_info", {})
        if info.get("gemm_report"):
            lines.append(f"- {r['key']}: autotune {info.get('autotune', '?')}: "
                         f"{info['gemm_report']}")
    lines += ["", "First call (construction + first step: compile, capture, JIT), s:", ""]
    for r in rows:
        f = r.get("first_call_s", {})
        lines.append(f"- {r['key']}: " + ", ".join(f"{k} {v:.2f}" for k, v in f.items()))
    for r in result["rows"]:
        if r.get("errors"):
            lines.append(f"- errors in {r['key']}: {r['errors']}")
        if r.get("fatal"):
            lines.append(f"- {r['key']} FAILED: {r['fatal'][:500]}")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?", help="where the built modules are (or go)")
    p.add_argument("--build", action="store_true", help="build the modules (needs cargo)")
    p.add_argument("--rows", default=",".join(GPU_BY_KEY))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pipelined-rounds", type=int, default=5)
    p.add_argument("--target-ms", type=float, default=100.0, help="length of a timed batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--skip", default="", help="anchors to leave out: torch,jax")
    p.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="ferrograd's GEMMs use cuBLASLt's heuristic's first algorithm instead "
                        "of the fastest of its candidates timed when the step is created")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of the runner with ferrograd's CPU step")
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="start no new row after this many seconds")
    p.add_argument("--json", type=Path, help="write the raw results here (after every row)")
    p.add_argument("--report-from", type=Path, nargs="+",
                   help="print the report of --json files (later rows replace earlier)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:  # several files: a later file's rows replace earlier ones
        merged = json.loads(args.report_from[0].read_text())
        for extra in args.report_from[1:]:
            rows = {r["key"]: r for r in json.loads(extra.read_text())["rows"]}
            merged["rows"] = [rows.pop(r["key"], r) for r in merged["rows"]] + list(rows.values())
        print(report(merged))
        return 0
    keys = [k for k in args.rows.split(",") if k]
    if args.build:
        build(args.folder, keys)
        return 0
    start = time.perf_counter()
    manifest = json.loads((args.folder / "manifest.json").read_text())
    anchors = load_anchors({s for s in args.skip.split(",") if s})
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "info": machine_info(anchors), "rows": []}
    result["info"]["built_from"] = sorted({e.get("git", "?") for e in manifest.values()})
    log(f"anchors: {sorted(k for k in anchors if k in ('torch', 'jax'))}, "
        f"errors {anchors['errors']}")
    if "torch" in anchors:
        result["ceilings"] = measure_ceilings(anchors["torch"])
        log(f"ceilings {result['ceilings']}")
    for key in keys:
        if time.perf_counter() - start > args.deadline_s:
            result["rows"].append({"key": key, "fatal": "skipped: out of time"})
            continue
        try:
            row = run_row(GPU_BY_KEY[key], args, args.folder, manifest, anchors,
                          result.get("ceilings", {}))
        except Exception as err:
            row = {"key": key, "fatal": f"{type(err).__name__}: {err}",
                   "trace": traceback.format_exc()}
            log(f"{key} FAILED: {row['trace']}")
        result["rows"].append(row)
        result["wall_s"] = time.perf_counter() - start
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
