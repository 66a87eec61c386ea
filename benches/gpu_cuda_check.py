"""The CUDA step on a GPU against the NumPy interpreter, in one run.

Two phases, because the GPU machine has no Rust toolchain:

1. Here (cargo + maturin): build the abi3 modules (``backend=("cpu", "cuda")``) of
   a hand-written test module (``cuda_handmade.py``: the runtime apart from the PTX
   renderer) and of every example model, into a folder that travels::

       python benches/gpu_cuda_check.py --build .gpu_modules

2. On the GPU machine: load them and compare each model's CUDA step with the
   interpreter — forward outputs, gradients, then a few training steps (losses,
    params, optimizer state) — in several modes: the default (cuBLASLt/cuBLAS with
    each GEMM's algorithm autotuned, CUDA graphs), the same with ``autotune=False``
    (cuBLASLt's heuristic's first choice), the generated GEMM kernels
    (``gemm="kernel"``), the graph's steps one after another instead of in parallel
    branches (``branches=False``), plain launches (``graph=False``) and one kernel at a
    time (``sync=True``). The temp arenas are poisoned with NaN before each call and the
    inputs drawn fresh. Then, for every model that trains, ``step.steps`` over 5
    stacked batches against 5 single steps from the same start (losses, params and
    optimizer state bit for bit — to rounding for a model that scatter-adds, whose atomic
    adds change order from run to run), from NumPy arrays and from CuPy arrays and torch CUDA
    tensors where installed, alone and between single steps, and against 5 steps with
    ``branches=False`` (branches change when kernels run, never what they compute); for
    each device kind, 5 steps with ``graph_inputs=False`` (inputs copied apart from the
    graph), 5 with NumPy and device inputs in turn (the graph's input copies turned off
    and on and pointed at each call's arrays), and with torch, 5 from one buffer per
    input refilled before each step (same address, new contents), all bit for bit; a
    device id out of range in one of the batches (labels or embedding ids) must raise an
    InputError naming it, after steps or a single step, and the next step run clean.
    Then host time per training step: graphs autotuned, graphs not autotuned, plain
    launches; and what autotuning chose
    for each GEMM of each model (``gemm_steps``). The table comes last; the full numbers
    go to ``$OUT/gpu_cuda_check.json``. The exact device command (``run`` tool,
   ``carry: [".gpu_modules", ".whl"]``; both folders listed in .git/info/exclude)::

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
       lib=$(find /usr/local/cuda*/ /usr/lib /opt -name 'libcublas.so.1[23]*' 2>/dev/null |
         head -1); echo "cublas: $lib";
       [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname $lib):$LD_LIBRARY_PATH;
       nvidia-smi -L; set -o pipefail;
       PYTHONUNBUFFERED=1 python3 benches/gpu_cuda_check.py .gpu_modules 2>&1 | tee $OUT/log.txt

   It takes ~40–110 s there. Last runs (session 14: s14b, s14d in
   benches/results/2026-11-21/): all 48 (model, mode) checks, 8 of 8 step.steps checks
   (each model's device ids out of range raising an InputError in steps and in a single
   step, and the steps bit for bit with ``branches=False``, included) and the 4 error
   cases pass. A model that scatter-adds is compared to
   rounding: its atomic adds change order from run to run (session 9 saw the
   transformer fed torch tensors differ in the last bits of its embedding).

   (``.whl`` holds sympy, mpmath, networkx, jinja2, markupsafe and safetensors for
   CPython 3.12, downloaded as /work/.library/device/README.md says; the image has
   them too, so the step may be skipped.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benches")]

import cuda_handmade  # noqa: E402
from catalog import MODELS  # noqa: E402

import ferrograd as fg  # noqa: E402
from ferrograd.codegen.build import _load  # noqa: E402
from ferrograd.codegen.cpu_step import CompiledStep  # noqa: E402
from ferrograd.codegen.cuda_step import open_cuda_step  # noqa: E402
from ferrograd.dsl.init import init_params  # noqa: E402
from ferrograd.ir.errors import InputError  # noqa: E402
from ferrograd.ir.optim import init_state  # noqa: E402

SEED = 3
STEPS = 3  # training steps compared per mode
STACKED = 5  # batches of the step.steps check (one call) against as many single steps
TOL = 2e-4  # error that passes (strict fp32; sums run in another order)
ATOL = 2e-5  # absolute floor per element: some exact-zero gradients are rounding noise
MODES = {  # name -> CudaStep options
    "autotuned+graph": {},  # the default: autotune on
    "autotune-off": {"autotune": False},
    "kernel-gemm": {"gemm": "kernel"},
    "branches-off": {"branches": False},
    "no-graph": {"graph": False},
    "sync-each": {"sync": True},
}


def lowered_models() -> dict[str, fg.Lowered]:
    out = {"handmade": cuda_handmade.lower()}
    for name, make in MODELS.items():
        model, optimizer, dims = make()
        out[name] = fg.lower(model, optimizer=optimizer, backend=("cpu", "cuda"), seed=SEED,
                             **dims)
    # Plain SGD, which no catalog model uses: the weight updates are the weight-gradient
    # GEMMs' own accumulation (alpha = -lr, beta = 1, C = the weight)
    model, _, dims = MODELS["mlp"]()
    out["mlp_sgd"] = fg.lower(model, optimizer=fg.optim.SGD(lr=0.1), backend=("cpu", "cuda"),
                              seed=SEED, **dims)
    return out


def _device_module(name: str, low: fg.Lowered) -> Any:
    return cuda_handmade.device_module(low) if name == "handmade" else low.device_module("ptx")


# ---- phase 1: build --------------------------------------------------------------------


def build(folder: Path) -> None:
    from ferrograd.codegen.backends.cpu import render_crate
    from ferrograd.codegen.build import build_module, cache_dir

    # The modules run on the GPU host, whose CPU is not this one: AVX2 at most.
    os.environ.setdefault("FERROGRAD_CPU_LEVEL", "v3")

    folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    lows = lowered_models()
    devices = {name: _device_module(name, low) for name, low in lows.items()}
    for case in cuda_handmade.ERROR_CASES:
        lows[f"error:{case}"] = lows["handmade"]
        devices[f"error:{case}"] = cuda_handmade.error_module(lows["handmade"], case)
    for name, low in lows.items():
        device = devices[name]
        crate = render_crate(low.graph, low.schedules, low.memory_plan, device=device)
        crate_dir = cache_dir() / "crates" / crate.module
        render_crate(low.graph, low.schedules, low.memory_plan, crate_dir,
                     device=device).write(crate_dir)
        module = build_module(crate_dir, crate.module, rustc_flags=crate.rustc_flags)
        path = Path(str(module.__file__))
        shutil.copy2(path, folder / path.name)
        manifest[name] = crate.module
        print(f"built {name}: {path.name}", flush=True)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---- phase 2: check on the GPU -----------------------------------------------------------


def rel_err(got: Any, want: Any) -> float:
    """‖got − want‖ / (‖want‖ + ATOL·√n): relative, except for arrays that are zero up
    to rounding noise (the transformer's key-bias gradient is exactly 0 in theory)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.all(np.isfinite(got)) and np.all(np.isfinite(want)):
        return float("inf")
    den = np.linalg.norm(want) + ATOL * np.sqrt(want.size)
    return float(np.linalg.norm(got - want) / den)


def worst(got: dict, want: dict) -> tuple[float, str]:
    if got.keys() != want.keys():
        return float("inf"), f"keys {sorted(got)} != {sorted(want)}"
    errs = [(rel_err(got[k], want[k]), k) for k in want]
    return max(errs) if errs else (0.0, "")





def feed_for(graph: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        if node.dtype == "i32":
            out[name] = rng.integers(0, graph.index_bounds.get(name, 4), node.shape,
                                     dtype=np.int32)
        else:
            out[name] = rng.normal(size=node.shape).astype(np.float32)
    return out


def cuda_step(low: fg.Lowered, module: Any, **options: Any) -> CompiledStep:
    native = open_cuda_step(module, low.graph.name, **options)
    return CompiledStep(low, module, init_params(low.graph, low.seed), init_state(low.graph),
                        "cuda", native)


def check_mode(low: fg.Lowered, module: Any, options: dict) -> dict[str, Any]:
    """forward, grads and STEPS training steps against the interpreter."""
    ref = fg.lower(low.model, optimizer=low.optimizer, backend="numpy", seed=low.seed,
                   **low.dims).compile()
    gpu = cuda_step(low, module, **options)
    native = gpu._native
    res: dict[str, Any] = {"gemm_backend": native.gemm_backend,
                           "gemm_report": native.gemm_report, "graphs": native.graphs,
                           "gemm_steps": list(native.gemm_steps), "tuned": tuned(native)}
    errs: dict[str, tuple[float, str]] = {}
    errs["init params"] = worst(gpu.params, ref.params)
    rng = np.random.default_rng(0)
    g = low.graph
    for i in range(STEPS):
        feed = feed_for(g, rng)
        native.poison_temps()
        errs[f"forward {i}"] = worst(gpu.forward(**feed), ref.forward(**feed))
        if g.grads:
            native.poison_temps()
            errs[f"grads {i}"] = worst(gpu.grads(**feed), ref.grads(**feed))
        if g.updates:
            native.poison_temps()
            errs[f"loss {i}"] = (rel_err(gpu(**feed), ref(**feed)), "loss")
            errs[f"params {i}"] = worst(gpu.params, ref.params)
            errs[f"state {i}"] = worst(gpu.state, ref.state)
    res["captured"] = [e for e in ("train", "forward", "grads") if native.has_graph(e)]
    res["branches"] = native.branches  # once captured: which schedule each graph kept
    key = max(errs, key=lambda k: errs[k][0])
    res["worst"] = {"where": key, "item": errs[key][1], "rel_err": errs[key][0]}
    res["errors"] = {k: v[0] for k, v in errs.items()}
    res["ok"] = errs[key][0] <= TOL
    bad_ids = [k for k, b in g.index_bounds.items() if k in g.inputs]
    if bad_ids:  # an id out of range is the user's error, before anything runs
        feed = feed_for(g, rng)
        feed[bad_ids[0]] = feed[bad_ids[0]].copy()
        feed[bad_ids[0]].flat[0] = g.index_bounds[bad_ids[0]]
        try:
            gpu.forward(**feed)
            res["bad_id"] = "not caught"
            res["ok"] = False
        except InputError as err:
            res["bad_id"] = f"InputError: {err}"
    return res


def tuned(native: Any) -> str:
    """"yes" when the step autotuned its GEMMs, "no" when it says why not, "-" when
    no GEMM is in cuBLAS(Lt)."""
    report = native.gemm_report
    if "not autotuned" in report:
        return "no"
    return "yes" if "autotuned" in report else "-"


def device_converters() -> dict[str, Any]:
    """NumPy array -> the same array as each kind of input the CUDA step takes: "numpy"
    itself, and "cupy" / "torch" device arrays where the library is installed (a missing
    one is said and skipped)."""
    out: dict[str, Any] = {"numpy": lambda a: a}
    try:
        import cupy

        out["cupy"] = cupy.asarray
    except Exception as err:
        print(f"cupy: skipped ({type(err).__name__}: {err})")
    try:
        import torch

        if torch.cuda.is_available():
            out["torch"] = lambda a: torch.from_numpy(a).cuda()
    except Exception as err:
        print(f"torch: skipped ({type(err).__name__}: {err})")
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], exact: bool) -> bool:
    """The same arrays: bit for bit, or (``exact`` False) to the last few bits."""
    if a.keys() != b.keys():
        return False
    if exact:
        return all(np.array_equal(a[k], b[k]) for k in a)
    return all(np.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def _atomic_sums(graph: Any) -> bool:
    """Whether the model scatter-adds (an embedding's gradient): its kernel adds with
    atomics, in an order that changes from run to run, so two runs (of any kind) agree
    only to rounding."""
    return any(graph.node(n).op == "scatter_add" for n in graph.nx.nodes)


def _id_inputs(graph: Any) -> list[str]:
    """Inputs holding ids (class labels, embedding ids): given in device memory, each is
    copied in by a kernel that checks its ids."""
    return [k for k in graph.index_bounds if k in graph.inputs]


def _raised(fn: Any, *needles: str) -> dict[str, Any]:
    """Whether ``fn()`` raised an InputError saying every one of ``needles``."""
    try:
        fn()
        return {"ok": False, "raised": "not caught"}
    except InputError as err:
        return {"ok": all(n in str(err) for n in needles), "raised": f"InputError: {err}"}
    except Exception as err:
        return {"ok": False, "raised": f"{type(err).__name__}: {err}"}


def check_steps(low: fg.Lowered, module: Any, kinds: dict[str, Any]) -> dict[str, Any]:
    """``step.steps`` over STACKED stacked batches against STACKED single steps from the
    same start: losses, params and optimizer state bit for bit (to rounding where the
    model scatter-adds: ``_atomic_sums``), for each kind of input.
    Two orders: "fresh" (steps first: plain launches, capture, replays all in one call)
    and "mixed" (a single step, steps of the middle batches, a single step)."""
    g = low.graph
    rng = np.random.default_rng(4)
    batches = [feed_for(g, rng) for _ in range(STACKED)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in g.inputs}
    # bit for bit between two steps needs the same GEMM algorithms: each step would
    # autotune on its own and might keep another (another summation order)
    ref = cuda_step(low, module, autotune=False)
    want = np.array([ref(**b) for b in batches], np.float32)
    res: dict[str, Any] = {"want": want.tolist()}
    ok = True
    for kind, conv in kinds.items():
        for order in ("fresh", "mixed"):
            step = cuda_step(low, module, autotune=False)
            if order == "fresh":
                got = step.steps(**{k: conv(v) for k, v in stacked.items()})
            else:
                middle = {k: conv(np.ascontiguousarray(v[1:-1])) for k, v in stacked.items()}
                got = np.array([step(**{k: conv(v) for k, v in batches[0].items()}),
                                *step.steps(**middle),
                                step(**{k: conv(v) for k, v in batches[-1].items()})],
                               np.float32)
            exact = not _atomic_sums(g)
            same = (got.dtype == np.float32 and _same({"loss": got}, {"loss": want}, exact)
                    and _same(step.params, ref.params, exact)
                    and _same(step.state, ref.state, exact))
            res[f"{kind} {order}"] = {"ok": same, "losses": got.tolist()}
            ok &= same
    for kind in [k for k in kinds if k != "numpy"]:
        conv = kinds[kind]
        # each input copied by a driver call of its own, not by the graph's nodes
        step = cuda_step(low, module, autotune=False, graph_inputs=False)
        got = np.array([step(**{k: conv(v) for k, v in b.items()}) for b in batches],
                       np.float32)
        res[f"{kind}, graph inputs off"] = _steps_agree(step, got, want, ref, g)
        # host and device inputs in turn: the graph's copies turned off and on, and
        # pointed at each call's arrays
        step = cuda_step(low, module, autotune=False)
        got = np.array([step(**{k: (conv(v) if i % 2 else v) for k, v in b.items()})
                        for i, b in enumerate(batches)], np.float32)
        res[f"numpy and {kind} in turn"] = _steps_agree(step, got, want, ref, g)
    if "torch" in kinds:
        # one device buffer per input, refilled before each step: the graph's copies keep
        # their source address and must read what it holds now
        import torch

        step = cuda_step(low, module, autotune=False)
        buffers = {k: torch.empty(v.shape, dtype=getattr(torch, str(v.dtype)), device="cuda")
                   for k, v in batches[0].items()}
        losses = []
        for b in batches:
            for k, v in b.items():
                buffers[k].copy_(torch.from_numpy(v))
            losses.append(step(**buffers))
        res["torch buffers refilled"] = _steps_agree(step, np.array(losses, np.float32),
                                                     want, ref, g)
    ok &= all(v["ok"] for v in res.values() if isinstance(v, dict))
    # the graph's steps one after another: the same bits as its parallel branches
    step = cuda_step(low, module, autotune=False, branches=False)
    got = np.array([step(**b) for b in batches], np.float32)
    exact = not _atomic_sums(g)
    same = (_same({"loss": got}, {"loss": want}, exact) and _same(step.params, ref.params, exact)
            and _same(step.state, ref.state, exact))
    res["numpy, branches off"] = {"ok": same, "losses": got.tolist()}
    ok &= same
    for name in _id_inputs(g):  # ids out of range on the device: found as copied in
        bound = g.index_bounds[name]
        bad = {k: v.copy() for k, v in stacked.items()}
        bad[name][STACKED - 2].flat[-1] = bound
        said = (f"input '{name}'", f"outside [0, {bound})")
        for kind in [k for k in kinds if k != "numpy"]:
            step = cuda_step(low, module, autotune=False)
            r = _raised(partial(step.steps, **{k: kinds[kind](v) for k, v in bad.items()}),
                        *said, f"one of the {STACKED} runs of `train`")
            one = {k: kinds[kind](np.ascontiguousarray(v[STACKED - 2])) for k, v in bad.items()}
            r1 = _raised(partial(step, **one), *said, "`train`")
            # the flag is cleared: the next good step runs without an error
            r2 = _raised(partial(step, **{k: kinds[kind](v) for k, v in batches[0].items()}))
            r2["ok"] = r2["raised"] == "not caught"
            res[f"{kind} bad id in steps"] = r
            res[f"{kind} bad id in a step"] = r1
            res[f"{kind} good step after"] = r2
            ok &= r["ok"] and r1["ok"] and r2["ok"]
    res["ok"] = ok
    return res


def _steps_agree(step: Any, got: np.ndarray, want: np.ndarray, ref: Any,
                 graph: Any) -> dict[str, Any]:
    """Losses ``got`` against ``want``, and ``step``'s params and state against
    ``ref``'s: bit for bit (to rounding where the model scatter-adds)."""
    exact = not _atomic_sums(graph)
    same = (got.dtype == np.float32 and _same({"loss": got}, {"loss": want}, exact)
            and _same(step.params, ref.params, exact) and _same(step.state, ref.state, exact))
    return {"ok": same, "losses": got.tolist()}


def time_steps(low: fg.Lowered, module: Any, n: int = 300, **options: Any) -> float:
    """Median host microseconds per training step (inputs copied in, loss back)."""
    step = cuda_step(low, module, **options)
    feed = feed_for(low.graph, np.random.default_rng(1))
    args = [feed[k] for k in low.graph.inputs]
    for _ in range(10):
        step(*args)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def error_case(folder: Path, case: str) -> None:
    """One broken module (``cuda_handmade.error_module``), in its own process (an
    illegal address leaves the CUDA context unusable): what each call raised, as JSON."""
    manifest = json.loads((folder / "manifest.json").read_text())
    low = cuda_handmade.lower()
    name = manifest[f"error:{case.removesuffix('_sync')}"]
    module = _load(name, folder / f"{name}.abi3.so")
    feed = feed_for(low.graph, np.random.default_rng(2))
    seen: list[dict[str, str]] = []

    def attempt(what: str, fn: Any) -> Any:
        try:
            value = fn()
            seen.append({"call": what, "result": repr(value)[:200]})
            return value
        except Exception as err:  # the point is to see what comes
            seen.append({"call": what, "raised": type(err).__name__, "message": str(err)})
            return None

    step = attempt("create", lambda: cuda_step(low, module, sync=case.endswith("_sync")))
    if step is not None:
        attempt("forward (bad launch)", lambda: step.forward(**feed)["loss"])
        attempt("train (right)", lambda: step(**feed))
        attempt("grads (illegal address)", lambda: step.grads(**feed))
        attempt("train (after the fault)", lambda: step(**feed))
    print(json.dumps(seen))


EXPECTED = {  # case -> (call, exception type, substrings of its message)
    "faults": [("forward (bad launch)", "BackendError", ["kernel `fill_f32`", "block [2048"]),
               ("train (right)", None, []),
               ("grads (illegal address)", "BackendError",
                ["running `grads`", "ILLEGAL_ADDRESS", "sync=True"])],
    "faults_sync": [("grads (illegal address)", "BackendError",
                     ["kernel `fill_f32` of `grads`", "ILLEGAL_ADDRESS"])],
    "bad_ptx": [("create", "BackendError", ["could not compile", "JIT log", "%f9"])],
    "oom": [("create", "MemoryError", ["GPU memory", "arena `temp_f32`"])],
}


def check_errors(folder: Path) -> dict[str, Any]:
    import subprocess

    out = {}
    for case, expected in EXPECTED.items():
        proc = subprocess.run([sys.executable, __file__, "--error-case", case, str(folder)],
                              capture_output=True, text=True, timeout=120, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
        seen = json.loads(lines[-1]) if lines else []
        by_call = {s["call"]: s for s in seen}
        ok = proc.returncode == 0 and bool(seen)
        for call, kind, parts in expected:
            got = by_call.get(call, {})
            ok &= got.get("raised") == kind and all(p in got.get("message", "") for p in parts)
        out[case] = {"ok": ok, "exit": proc.returncode, "seen": seen,
                     "stderr": proc.stderr[-2000:]}
    return out


def check(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    results: dict[str, Any] = {}
    lows = lowered_models()
    rows = []
    kinds = device_converters()
    steps_rows: list[tuple[str, dict[str, Any]]] = []
    for name, low in lows.items():
        module_name = manifest[name]
        module = _load(module_name, folder / f"{module_name}.abi3.so")
        results[name] = {}
        for mode, options in MODES.items():
            t = time.perf_counter()
            try:
                r = check_mode(low, module, options)
            except Exception as err:  # report every model, then fail
                r = {"ok": False, "error": f"{type(err).__name__}: {err}",
                     "trace": traceback.format_exc()}
            r["seconds"] = round(time.perf_counter() - t, 2)
            # The default mode must have autotuned whatever runs in cuBLAS(Lt).
            untuned = not options and r.get("tuned") == "no"
            if untuned:
                r["ok"] = False
            results[name][mode] = r
            worst_txt = (f"{r['worst']['rel_err']:.1e} ({r['worst']['where']}: "
                         f"{r['worst']['item']})" if "worst" in r else r["error"][:90])
            worst_txt += " — NOT AUTOTUNED: " + r["gemm_report"][-200:] if untuned else ""
            rows.append((name, mode, "PASS" if r["ok"] else "FAIL", r.get("gemm_backend", "-"),
                         r.get("tuned", "-"), worst_txt))
            print(f"{name:12} {mode:15} {rows[-1][2]} {worst_txt}", flush=True)
        if low.graph.updates:
            # step.steps: one call for STACKED steps
            try:
                r = check_steps(low, module, kinds)
            except Exception as err:  # report every model, then fail
                r = {"ok": False, "error": f"{type(err).__name__}: {err}",
                     "trace": traceback.format_exc()}
            results[name]["steps"] = r
            steps_rows.append((name, r))
            print(f"{name:12} {'steps':13} {'PASS' if r['ok'] else 'FAIL'} "
                  f"{r.get('error', '')[:90]}", flush=True)
        if low.graph.updates:
            try:
                results[name]["us_per_step"] = {
                    "graph": time_steps(low, module, graph=True),
                    "graph_untuned": time_steps(low, module, graph=True, autotune=False),
                    "launches": time_steps(low, module, graph=False)}
            except Exception as err:  # noted, not fatal
                results[name]["us_per_step"] = {"error": str(err)}
    errors = check_errors(folder)
    results["errors"] = errors
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu_cuda_check.json").write_text(json.dumps(results, indent=1, default=str))
    print("\nerrors (each in its own process): case: result; what each call raised")
    for case, e in errors.items():
        print(f"  {case:12} {'PASS' if e['ok'] else 'FAIL'} (exit {e['exit']})")
        for s in e["seen"]:
            text = f"{s['raised']}: {s['message']}" if "raised" in s else f"-> {s['result']}"
            print(f"      {s['call']}: {text[:300]}")
    print("\nwhat the default mode chose for each GEMM (gemm_report, then gemm_steps)")
    for name in lows:
        r = results[name].get(next(iter(MODES)), {})
        if r.get("gemm_steps"):
            print(f"  {name}: {r['gemm_report']}")
            print(f"      branches: {r.get('branches')}")
            for line in r["gemm_steps"]:
                print(f"      {line}")
    print("\nmodel        mode            result gemm     tuned worst relative error (where)")
    for row in rows:
        print(f"{row[0]:12} {row[1]:15} {row[2]:6} {row[3]:8} {row[4]:5} {row[5]}")
    print(f"\nstep.steps over {STACKED} stacked batches vs {STACKED} single steps (losses, "
          f"params, state bit for bit), by kind of input ({', '.join(kinds)}) and order:")
    for name, r in steps_rows:
        cases = ", ".join(f"{k} {'ok' if v['ok'] else 'FAIL'}" for k, v in r.items()
                          if isinstance(v, dict))
        print(f"  {name:12} {'PASS' if r['ok'] else 'FAIL'}  {cases or r.get('error', '')}")
        for k, v in r.items():
            if isinstance(v, dict) and not v["ok"]:
                print(f"      {k}: {v.get('raised') or v.get('losses')} (want {r['want']})")
    print("\nhost time per training step (median, µs): model: CUDA graph autotuned / "
          "CUDA graph, autotune off / plain launches")
    for name in lows:
        t = results[name].get("us_per_step", {})
        if "graph" in t:
            print(f"  {name:12} {t['graph']:8.1f} / {t['graph_untuned']:8.1f} / "
                  f"{t['launches']:8.1f}")
        elif t:
            print(f"  {name:12} {t}")
    failed = sum(row[2] == "FAIL" for row in rows)
    steps_failed = sum(not r["ok"] for _, r in steps_rows)
    print(f"\n{len(rows) - failed} of {len(rows)} (model, mode) checks passed; "
          f"{len(steps_rows) - steps_failed} of {len(steps_rows)} step.steps checks; "
          f"{sum(e['ok'] for e in errors.values())} of {len(errors)} error cases")
    return 1 if failed or steps_failed or not all(e["ok"] for e in errors.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the built modules are (or go)")
    parser.add_argument("--build", action="store_true", help="build the modules (needs cargo)")
    parser.add_argument("--error-case", choices=sorted(EXPECTED), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.error_case:
        error_case(args.folder, args.error_case)
        return 0
    if args.build:
        build(args.folder)
        return 0
    return check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
