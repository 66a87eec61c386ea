"""CPU benchmarks: ferrograd against the anchors of ANCHORS.md, measured in one run.

    python benches/cpu.py                                  # every workload, 7 rounds
    python benches/cpu.py --rows W0,W2b32 --rounds 5 --json out.json
    python benches/cpu.py --quick                          # short rounds, one compile probe

For each workload (benches/workloads.py) the model is compiled once; its initial
params (``step.params``) and one synthetic batch are handed to every system:
ferrograd's compiled step, the NumPy-by-hand step, PyTorch eager, torch.compile and
JAX jit (the last three when importable). The losses of the first three steps must
agree (the first checks the forward pass, the next two the backward and the update); a
row where they do not is marked. Then the systems are timed in interleaved rounds —
each round times a batch of steps of every system, in a rotating order — so that
the noise of a shared machine hits all of them alike. Every batch starts from the
initial params and optimizer state (a reset), so all systems time the same stretch
of training. The tables report medians (and best rounds) of per-step time, and for
ratios the median over rounds of the per-round ratio.

``--threads N`` gives every system N threads (rayon, BLAS, OpenMP, XLA): on a
loaded machine OpenBLAS's default threads can make NumPy ten times slower.
``--skip-timing`` runs only the loss checks and the compile probes;
``--report-from FILE`` re-prints the report of a ``--json`` file.

Compile time and memory are measured in fresh processes per workload: a cold
build (a changed model: new module, empty ``FERROGRAD_CACHE``, dependencies
already compiled in the shared cargo target folder), a warm load of that build
from the cache, the peak RSS of the training process, and for comparison the
peak RSS of a process that trains with NumPy by hand and never imports ferrograd.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy_by_hand
from workloads import BY_KEY, WORKLOADS, Workload, fg_optimizer

import ferrograd as fg

HERE = Path(__file__).resolve().parent
FG = "ferrograd"
NATIVE = "ferrograd (native call)"
NUMPY = "NumPy by hand"
# display name -> (module, its trainer class)
ANCHOR_MODULES = {"PyTorch eager": ("torch_anchor", "Trainer"),
                  "torch.compile": ("torch_anchor", "CompiledTrainer"),
                  "JAX jit": ("jax_anchor", "Trainer")}
ANCHORS = [NUMPY, *ANCHOR_MODULES]
LOSS_STEPS = 3  # losses compared: forward at the initial weights, then after 1 and 2 updates
LOSS_RTOL = 2e-5  # on each loss (float32 sums in different orders)
DELTA_RTOL = 1e-2  # on the loss changes, which the backward pass and the update make


# ---- systems ---------------------------------------------------------------------------


@dataclass
class System:
    name: str
    step: Callable[[], float]  # one training step on the fixed batch; returns the loss
    reset: Callable[[], None]  # back to the initial params and optimizer state


def limit_threads(n: int | None) -> str:
    """Give every system ``n`` threads (None: leave each at its default), before the
    anchors are imported and before ferrograd's thread pool starts."""
    if n is None:
        return "default threads (ferrograd: rayon, one per core; NumPy: OpenBLAS's own)"
    # Pin the process to n cores as well: JAX 0.10's XLA CPU runtime ignores the
    # flags below and runs its own pool with a thread per core (measured: CPU time
    # twice the wall time with "one thread" on 2 cores), so only affinity holds it.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ["RAYON_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)  # for child processes
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return f"{n} thread(s), except NumPy's BLAS (threadpoolctl is not installed)"
    threadpool_limits(n)  # NumPy's BLAS is loaded already
    return (f"{n} thread(s) per system (rayon, BLAS, OpenMP" + (", XLA" if n == 1 else "")
            + f"; the process pinned to {n} core(s))")


def anchor_modules() -> dict[str, ModuleType]:
    """The optional anchors that import here (PyTorch, JAX), by display name."""
    found = {}
    for name, (module, _) in ANCHOR_MODULES.items():
        try:
            found[name] = importlib.import_module(module)
        except ImportError:
            continue
    return found


def make_systems(w: Workload, step: fg.Step, twin: fg.Step, anchors: dict[str, ModuleType],
                 checkpoint: Path) -> list[System]:
    """Every system of a row, all from ``step``'s initial params and the same batch.
    ``twin`` is a second step of the same build, called without the Python API around
    the module (a diagnostic of that API's overhead). ferrograd's steps reset from a
    checkpoint of the initial params and optimizer state, saved to ``checkpoint``."""
    params, batch = step.params, w.data()
    step.save(checkpoint)
    systems = [System(FG, lambda: step(*batch), lambda: step.load(checkpoint))]
    native = getattr(twin, "_native", None)
    if native is not None:
        systems.append(System(NATIVE, lambda: float(native.train(*batch)),
                              lambda: twin.load(checkpoint)))
    trainers = {NUMPY: numpy_by_hand.Trainer(w.arch, w.opt, params, batch)}
    for name, module in anchors.items():
        trainer = getattr(module, ANCHOR_MODULES[name][1])
        trainers[name] = trainer(w.arch, w.opt, params, batch)
    systems += [System(name, t.step, t.reset) for name, t in trainers.items()]
    for s in systems:
        s.reset()
    return systems


# ---- checking and timing ---------------------------------------------------------------


def check_losses(losses: dict[str, list[float]]) -> list[str]:
    """Problems with any system's first losses, measured against ferrograd's."""
    ref = losses[FG]
    problems = []
    for name, got in losses.items():
        if name == FG:
            continue
        bad = abs(got[0] - ref[0]) > LOSS_RTOL * abs(ref[0]) + 1e-6
        for i in range(1, len(ref)):
            want_delta, got_delta = ref[0] - ref[i], got[0] - got[i]
            tol = DELTA_RTOL * abs(want_delta) + LOSS_RTOL * abs(ref[0]) + 1e-6
            bad = bad or abs(got_delta - want_delta) > tol
        if bad:
            problems.append(f"{name} losses {fmt_losses(got)} vs ferrograd {fmt_losses(ref)}")
    return problems


def fmt_losses(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.7g}" for v in values) + "]"


def time_batch(step: Callable[[], float], n: int) -> float:
    """Seconds per step over ``n`` consecutive steps (GC paused, as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n
    finally:
        gc.enable()


def calibrate(system: System, target_s: float) -> int:
    """Steps per timed batch so that a batch lasts about ``target_s`` (at least 1)."""
    n, per_step = 1, time_batch(system.step, 1)
    while per_step * n < target_s / 4 and n < 1_000_000:
        n *= 4
        system.reset()
        per_step = time_batch(system.step, n)
    return max(1, round(target_s / per_step))


def time_rounds(systems: list[System], rounds: int, target_s: float) -> dict[str, list[float]]:
    """Per-step µs of every system in each round; systems interleaved, order rotating.

    Each batch starts from the initial params and optimizer state, so every system
    times the same stretch of training: steps 1..n. (Left to run on, thousands of
    steps on one fixed batch drive the optimizer state into denormal floats, which
    slows some systems several-fold and not others; see BENCHMARKS.md.)"""
    counts = {s.name: calibrate(s, target_s) for s in systems}
    times: dict[str, list[float]] = {s.name: [] for s in systems}
    for r in range(rounds):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            s.reset()
            times[s.name].append(time_batch(s.step, counts[s.name]) * 1e6)
    return times


# ---- compile time and memory, in fresh processes ---------------------------------------


def run_child(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """Run a probe; its JSON result (last stdout line) and the process's wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def shared_target_dir() -> str:
    """The cargo target folder ferrograd builds use now (deps compiled there)."""
    from ferrograd.codegen.build import target_dir

    return str(target_dir())


def read_build_logs(logs: Path) -> tuple[int, bool]:
    """From the cold build's log: how many crates cargo compiled (1 when only the model's
    crate was built) and whether it waited for another build's lock on the target."""
    text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    crates = sum(line.lstrip().startswith("Compiling ") for line in text.splitlines())
    return crates, "Blocking waiting for file lock" in text


def probe_row(w: Workload, steps: int, params: dict[str, np.ndarray], arena_mb: float
              ) -> dict[str, Any]:
    """Cold build, warm load and memory of ``w``; NumPy-by-hand memory for comparison.

    The cold build compiles a changed model (its learning rate scaled by 1 + 1e-6, so
    its content hash and module name are new) into an empty FERROGRAD_CACHE, with
    CARGO_TARGET_DIR kept on the shared target folder where dependencies are built.
    The warm load is the same compile in a second process, which finds the module."""
    cache = tempfile.mkdtemp(prefix="fg-bench-cache-")
    env = {**os.environ, "FERROGRAD_CACHE": cache, "CARGO_TARGET_DIR": shared_target_dir()}
    batch = [str(Path(cache) / "batch.npz"), str(Path(cache) / "params.npz")]
    args = [str(HERE / "compile_probe.py"), w.key, str(1 + 1e-6), str(steps), batch[0]]
    try:
        np.savez(batch[0], **{f"b:{i}": a for i, a in enumerate(w.data())})
        np.savez(batch[1], **params)
        cold, cold_wall = run_child(args, env)
        crates, blocked = read_build_logs(Path(cache) / "logs")
        warm, warm_wall = run_child(args, env)
        numpy_rss, _ = run_child([str(HERE / "numpy_by_hand.py"), w.arch, w.opt.kind,
                                  str(w.opt.lr), str(steps), *batch], dict(os.environ))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"cold_build_s": cold["compile_s"], "cold_process_s": cold_wall,
            "cold_crates_compiled": crates, "cold_waited_for_lock": blocked,
            "warm_load_s": warm["compile_s"], "warm_lower_s": warm["lower_s"],
            "warm_process_s": warm_wall,
            "rss_import_mb": warm["rss_import_mb"], "rss_peak_mb": warm["rss_peak_mb"],
            "warm_modules": warm["modules"], "arena_mb": arena_mb,
            "numpy_rss_mb": numpy_rss["rss_mb"],
            "target_dir": env["CARGO_TARGET_DIR"]}


# ---- one row ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    title: str
    goal_us: float
    ref: dict[str, float]
    times_us: dict[str, list[float]] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    compile_in_process_s: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def median(self, name: str) -> float | None:
        t = self.times_us.get(name)
        return statistics.median(t) if t else None

    def best(self, name: str) -> float | None:
        t = self.times_us.get(name)
        return min(t) if t else None

    def overhead(self) -> float | None:
        """Median over rounds of ferrograd's step(x, y) minus the module's own call."""
        a, b = self.times_us.get(FG), self.times_us.get(NATIVE)
        if not a or not b:
            return None
        return statistics.median(x - y for x, y in zip(a, b, strict=True))

    def ratio(self, name: str) -> float | None:
        """Median over rounds of ferrograd's time / ``name``'s time in that round."""
        a, b = self.times_us.get(FG), self.times_us.get(name)
        if not a or not b:
            return None
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    def best_anchor(self) -> str | None:
        medians = {n: self.median(n) for n in ANCHORS if self.median(n) is not None}
        return min(medians, key=lambda n: medians[n] or 0.0) if medians else None


def run_row(w: Workload, args: argparse.Namespace, anchors: dict[str, ModuleType]) -> Row:
    row = Row(w.key, w.title, w.ref.goal, {k: v for k, v in asdict(w.ref).items()
                                            if k != "goal"})
    log(f"{w.key}: compiling")
    try:
        start = time.perf_counter()
        step = fg.compile(w.model, optimizer=fg_optimizer(w.opt), backend=args.backend,
                          seed=0, **w.dims)
        row.compile_in_process_s = time.perf_counter() - start
        twin = fg.compile(w.model, optimizer=fg_optimizer(w.opt), backend=args.backend,
                          seed=0, **w.dims)
        systems = make_systems(w, step, twin, anchors, args.scratch / f"{w.key}.safetensors")
        row.losses = {s.name: [s.step() for _ in range(LOSS_STEPS)] for s in systems}
    except Exception:
        row.error = traceback.format_exc()
        log(f"{w.key}: FAILED\n{row.error}")
        return row
    row.problems = check_losses(row.losses)
    for s in systems:  # a reset must give the first loss again
        s.reset()
        first, again = row.losses[s.name][0], s.step()
        if abs(again - first) > LOSS_RTOL * abs(first) + 1e-6:
            row.problems.append(f"{s.name}: after a reset the loss is {again:.7g}, "
                                f"not {first:.7g}")
    for p in row.problems:
        log(f"WARNING {w.key}: losses disagree: {p}")
    log(f"{w.key}: timing {', '.join(s.name for s in systems)}")
    if not args.skip_timing:
        row.times_us = time_rounds(systems, args.rounds, args.target_ms / 1e3)
    if w.key in args.probe_rows and args.backend == "cpu":
        log(f"{w.key}: compile probes (cold build, warm load, memory)")
        try:
            row.probe = probe_row(w, args.probe_steps, step.params,
                                  step.lowered.memory_plan.peak_bytes / 1e6)
        except Exception as err:
            row.probe = {"error": str(err)}
            log(f"{w.key}: probe failed: {err}")
    return row


# ---- the report ------------------------------------------------------------------------


def us(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1e3:.2f} ms" if v >= 10_000 else f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"


def x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def timing_table(rows: list[Row], anchors: list[str]) -> list[str]:
    head = ["workload", FG, *anchors, *(f"fg / {a}" for a in anchors), "goal", "goal met",
            "losses agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.title} | **error** (see below) |" + " |" * (len(head) - 2))
            continue
        fg_us = r.median(FG)
        met = "–" if fg_us is None else "yes" if fg_us <= r.goal_us else "no"
        agree = "yes" if not r.problems else "**NO**"
        cells = [r.title, us(fg_us), *(us(r.median(a)) for a in anchors),
                 *(x(r.ratio(a)) for a in anchors), f"≤ {us(r.goal_us)}", met, agree]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def best_table(rows: list[Row], anchors: list[str]) -> list[str]:
    """The least disturbed round of each system: on a loaded machine, closer to what
    each can do (ANCHORS.md reports the best of three passes)."""
    head = ["workload", FG, *anchors, "fg / best anchor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error or r.best(FG) is None:
            continue
        bests = [b for a in anchors if (b := r.best(a)) is not None]
        ratio = (r.best(FG) or 0.0) / min(bests) if bests else None
        cells = [r.title, us(r.best(FG)), *(us(r.best(a)) for a in anchors), x(ratio)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


REF_KEYS = {NUMPY: "numpy", "PyTorch eager": "torch", "torch.compile": "torch_compile",
            "JAX jit": "jax"}


def reference_table(rows: list[Row]) -> list[str]:
    """ferrograd beside ANCHORS.md's numbers. Machines differ, so the goal is also put
    as a ratio: goal / what the best anchor of this run took in ANCHORS.md, to set
    beside ferrograd / that anchor measured here."""
    head = ["workload", "ferrograd (this run)", "best anchor (this run)", "fg / it",
            "goal / it in ANCHORS.md", "ratio goal met", "ANCHORS.md: PyTorch",
            "torch.compile", "JAX", "NumPy", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            continue
        best = r.best_anchor()
        ratio = r.ratio(best) if best else None
        goal_ratio = r.goal_us / r.ref[REF_KEYS[best]] if best else None
        met = "–"
        if ratio is not None and goal_ratio is not None:
            met = "yes" if ratio <= goal_ratio else "no"
        cells = [r.title, us(r.median(FG)), f"{best}: {us(r.median(best))}" if best else "–",
                 x(ratio), x(goal_ratio), met, us(r.ref["torch"]), us(r.ref["torch_compile"]),
                 us(r.ref["jax"]), us(r.ref["numpy"]), us(r.goal_us)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compile_table(rows: list[Row]) -> list[str]:
    head = ["workload", "first compile in the run", "cold build (changed model)",
            "warm load (cached)", "warm process, start to trained", "peak RSS (fg)",
            "RSS after import", "imported (warm)", "peak RSS (NumPy by hand)", "arena",
            "RSS goal (NumPy + arena)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r.probe
        first = "–" if r.compile_in_process_s is None else f"{r.compile_in_process_s:.2f} s"
        if not p or "error" in p:
            note = p.get("error", "not probed").splitlines()[0] if p else "not probed"
            lines.append(f"| {r.title} | {first} | {note} |" + " |" * (len(head) - 3))
            continue
        goal = p["numpy_rss_mb"] + p["arena_mb"]
        warm = f"{p['warm_load_s'] * 1e3:.0f} ms ({p['warm_lower_s'] * 1e3:.0f} ms in fg.lower)"
        cold = f"{p['cold_build_s']:.1f} s"
        notes = []
        if p["cold_crates_compiled"] != 1:
            notes.append(f"{p['cold_crates_compiled']} crates compiled")
        if p["cold_waited_for_lock"]:
            notes.append("waited for another build's lock")
        cold += f" ({', '.join(notes)})" if notes else ""
        cells = [r.title, first, cold, warm,
                 f"{p['warm_process_s']:.2f} s", f"{p['rss_peak_mb']:.0f} MB",
                 f"{p['rss_import_mb']:.0f} MB", ", ".join(p.get("warm_modules", ["?"])) or "–",
                 f"{p['numpy_rss_mb']:.0f} MB",
                 f"{p['arena_mb']:.1f} MB", f"{goal:.0f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def overhead_table(rows: list[Row]) -> list[str]:
    """step(x, y) against the generated module's own entry point, called directly (a
    second step of the same build): the cost of the Python API around the module.
    Where the step takes milliseconds the difference is below the noise."""
    lines = ["| workload | step(x, y) | module's train(x, y) | difference (median of rounds) |",
             "|---|---|---|---|"]
    for r in rows:
        a, b, d = r.median(FG), r.median(NATIVE), r.overhead()
        if a is not None and b is not None and d is not None:
            sign = "−" if d < 0 else ""
            lines.append(f"| {r.title} | {us(a)} | {us(b)} | {sign}{us(abs(d))} |")
    return lines


def report(rows: list[Row], info: dict[str, Any], anchors: list[str]) -> str:
    out = [f"## CPU benchmarks — {info['date']}", "",
           f"- machine: {info['cpu']}; {info['cores']} cores; {info['simd']}",
           f"- load average at start / end: {info['load_start']} / {info['load_end']}",
           f"- {info['versions']}", f"- threads: {info['threads']}",
           *([f"- **the ferrograd column is the {info['backend']!r} backend**, not the "
              "compiled CPU module (and not NumPy by hand)"]
             if info.get("backend", "cpu") != "cpu" else []),
           f"- command: `{info['command']}`",
           f"- {info['rounds']} interleaved rounds, ≈{info['target_ms']:g} ms of steps per "
           "system per round; medians of per-step time; ratios are medians of per-round "
           "ratios (< 1: ferrograd faster)", "",
           *timing_table(rows, anchors), "", "### Best round of each system", "",
           *best_table(rows, anchors), "", "### Against ANCHORS.md", "",
           *reference_table(rows), "", "### Compile time and memory", "",
           *compile_table(rows), "", "### ferrograd's Python call overhead", "",
           *overhead_table(rows)]
    problems = [(r.key, p) for r in rows for p in r.problems]
    if problems:
        out += ["", "### Losses that disagree", ""] + [f"- {k}: {p}" for k, p in problems]
    errors = [r for r in rows if r.error]
    if errors:
        out += ["", "### Errors", ""]
        for r in errors:
            out += [f"{r.key}:", "```", (r.error or "").rstrip(), "```"]
    return "\n".join(out) + "\n"


# ---- the machine -----------------------------------------------------------------------


def machine_info(args: argparse.Namespace, anchors: dict[str, ModuleType]) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in text.splitlines()
                   if ln.startswith("model name"))
        flags = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    simd = ", ".join(f for f in ("avx2", "fma", "avx512f") if f in flags) or "unknown SIMD"
    versions = [f"ferrograd {fg.__version__} ({git_revision()})",
                f"NumPy {np.__version__}", f"Python {platform.python_version()}"]
    versions += list(dict.fromkeys(m.version() for m in anchors.values()))
    missing = [n for n in ANCHOR_MODULES if n not in anchors]
    if missing:
        versions.append(f"not installed, skipped: {', '.join(missing)}")
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "simd": simd, "load_start": load(), "versions": "; ".join(versions),
            "command": " ".join(["python", *sys.argv]), "rounds": args.rounds,
            "target_ms": args.target_ms}


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    return rev + (" + local changes" if dirty.strip() else "")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(BY_KEY),
                   help=f"comma-separated workloads (default: all of {', '.join(BY_KEY)})")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=200.0,
                   help="time of one batch of steps per system per round")
    p.add_argument("--quick", action="store_true",
                   help="3 rounds of 50 ms; compile probes only for the first row")
    p.add_argument("--probe-rows", default=None,
                   help="workloads to probe for compile time and memory (default: all rows; "
                        "'none' for none)")
    p.add_argument("--probe-steps", type=int, default=20,
                   help="training steps before reading peak RSS")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every system (rayon, BLAS, OpenMP, XLA); default: each "
                        "system's own default")
    p.add_argument("--skip-timing", action="store_true",
                   help="check losses and run the compile probes only")
    p.add_argument("--backend", default="cpu",
                   help="ferrograd backend ('numpy' runs the interpreter: only useful to "
                        "check the anchors where no Rust toolchain is installed)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--report-from", type=Path,
                   help="print the report of an earlier run's --json file; measure nothing")
    args = p.parse_args(argv)
    args.rows = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in BY_KEY]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(BY_KEY)}")
    if args.quick:
        args.rounds, args.target_ms = 3, 50.0
    if args.probe_rows is None:
        args.probe_rows = args.rows[:1] if args.quick else args.rows
    elif args.probe_rows == "none":
        args.probe_rows = []
    else:
        args.probe_rows = args.probe_rows.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        rows = [Row(**r) for r in saved["rows"]]
        anchors = [n for n in ANCHORS if any(n in r.times_us for r in rows)]
        print(report(rows, saved["info"], anchors))
        return
    threads = limit_threads(args.threads)
    anchors = anchor_modules()
    info = machine_info(args, anchors)
    info["threads"], info["backend"] = threads, args.backend
    log(f"systems: {FG}, {NUMPY}, {', '.join(anchors) or '(no PyTorch, no JAX)'}")
    with tempfile.TemporaryDirectory(prefix="fg-bench-") as scratch:
        args.scratch = Path(scratch)
        rows = [run_row(w, args, anchors) for w in WORKLOADS if w.key in args.rows]
    info["load_end"] = load()
    print(report(rows, info, [NUMPY, *anchors]))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]},
                                        indent=1))


if __name__ == "__main__":
    main()
