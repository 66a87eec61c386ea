"""One compile probe, in a process of its own (run by benches/cpu.py):

    python benches/compile_probe.py KEY LR_SCALE STEPS BATCH.npz

Times ``fg.compile`` of workload KEY to a ready step — ``fg.lower`` (which traces;
autodiff, passes, scheduling and rendering run in ``compile`` when the module is not
in the cache) and then build or load — trains STEPS steps on the batch in BATCH.npz
(the file the NumPy-by-hand probe reads), and prints, as JSON: the times, the peak
RSS after the imports and at the end, and which heavy packages the process imported.

It imports what a user's training script would — NumPy, ferrograd and the model
definitions (workloads.py) — and nothing of the benchmark runner, so its memory is
comparable with the NumPy probe's (numpy_by_hand.py).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from common import peak_rss_mb
from workloads import BY_KEY, fg_optimizer

import ferrograd as fg

HEAVY_MODULES = ("sympy", "networkx", "jinja2")  # what a cached load should not need


def compile_probe(key: str, lr_scale: float, steps: int, batch_file: str) -> dict:
    rss_import = peak_rss_mb()
    w = BY_KEY[key]
    start = time.perf_counter()
    lowered = fg.lower(w.model, optimizer=fg_optimizer(w.opt, lr_scale), backend="cpu",
                       seed=0, **w.dims)
    lowered_at = time.perf_counter()
    step = lowered.compile()
    done = time.perf_counter()
    with np.load(batch_file) as f:
        batch = tuple(f[f"b:{i}"] for i in range(len(f.files)))
    for _ in range(steps):
        step(*batch)
    return {"compile_s": done - start, "lower_s": lowered_at - start,
            "rss_import_mb": rss_import, "rss_peak_mb": peak_rss_mb(),
            "modules": sorted(m for m in HEAVY_MODULES if m in sys.modules)}


if __name__ == "__main__":
    key, lr_scale, steps, batch_file = sys.argv[1:]
    print(json.dumps(compile_probe(key, float(lr_scale), int(steps), batch_file)))
