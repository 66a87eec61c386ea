"""Per-kernel profile of one CPU workload's training step.

    python benches/kernel_profile.py W5 --steps 50
    python benches/kernel_profile.py W2b128 --steps 20 --warmup 5 --threads 1

(Not named profile.py: benches/ is on sys.path when the runners run, and a
profile.py there shadows the standard library module that torch imports.)

Compiles the workload of benches/workloads.py with ``profile=True`` (its own module:
every kernel call of every entry point is timed in Rust), runs ``--warmup`` steps,
clears the counters, runs ``--steps`` steps on the workload's batch and prints
``step.profile_report()``: per kernel, the calls, total and mean wall time and the
share of all kernel time. The last lines compare the kernels' time with the wall time
of the steps as Python sees it (the rest is the call, input checks, thread hand-offs
and the timers themselves).
"""

from __future__ import annotations

import argparse
import time

from cpu import limit_threads
from workloads import BY_KEY, fg_optimizer

import ferrograd as fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=list(BY_KEY), help="a key of benches/workloads.py")
    parser.add_argument("--steps", type=int, default=50, help="profiled steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps run before the counters are cleared (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="rayon threads (default: one per core)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    threads = limit_threads(args.threads)
    w = BY_KEY[args.workload]
    step = fg.compile(w.model, optimizer=fg_optimizer(w.opt), backend="cpu", seed=0,
                      profile=True, **w.dims)
    batch = w.data()
    for _ in range(args.warmup):
        step(*batch)
    step.profile(reset=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*batch)
    wall = time.perf_counter() - start
    table = step.profile()
    print(f"{w.title}: {args.steps} steps after {args.warmup} warm-up, {threads}; "
          f"final loss {loss:.5f}")
    print(table)
    print(f"kernels {table.total_s / args.steps * 1e6:.1f} µs per step of "
          f"{wall / args.steps * 1e6:.1f} µs wall ({table.total_s / wall:.1%} in kernels)")


if __name__ == "__main__":
    main()
