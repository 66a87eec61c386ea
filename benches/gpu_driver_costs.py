"""What the CUDA driver calls on a synchronous step's path cost, one at a time (on a GPU
machine; needs only NumPy and the driver).

    python benches/gpu_driver_costs.py [--json out.json]

Host µs per call (median of rounds of N calls) of each driver call a CUDA step makes
around its graph — an event created and destroyed, recorded, waited for, a pointer's
device looked up, a device-to-device copy, a kernel launch, a graph launch, a kernel
node's parameters set in an instantiated graph, a 4-byte copy into pinned memory —
and round trips (queue, then wait) of an empty kernel, a graph of 1 and of 19 empty
kernels, and a kernel that first reads a word of mapped host memory. Loads libcuda
through ctypes and a few lines of PTX: no build, no ferrograd module.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

PTX = b"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry noop() { ret; }
.visible .entry read_word(.param .u64 src, .param .u64 dst) {
    .reg .u64 %a<3>; .reg .u32 %w;
    ld.param.u64 %a1, [src]; ld.param.u64 %a2, [dst];
    ld.global.volatile.u32 %w, [%a1]; st.global.u32 [%a2], %w;
    ret;
}
"""

c_u64 = ctypes.c_uint64
c_void_p = ctypes.c_void_p


class Driver:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def __call__(self, name: str, *args: Any) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name} returned CUDA error {status}")


class KernelParams(ctypes.Structure):
    """CUDA_KERNEL_NODE_PARAMS (v1)."""

    _fields_ = [
        ("func", c_void_p),
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("kernelParams", ctypes.POINTER(c_void_p)),
        ("extra", ctypes.POINTER(c_void_p)),
    ]


def per_call_us(fn: Callable[[], Any], calls: int, rounds: int = 7) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def measure(calls: int) -> dict[str, float]:
    cu = Driver()
    cu("cuInit", 0)
    dev, ctx = ctypes.c_int(), c_void_p()
    cu("cuDeviceGet", ctypes.byref(dev), 0)
    cu("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    cu("cuCtxSetCurrent", ctx)
    stream, other = c_void_p(), c_void_p()
    cu("cuStreamCreate", ctypes.byref(stream), 1)  # non-blocking, like a step's
    cu("cuStreamCreate", ctypes.byref(other), 1)
    module, noop, read_word = c_void_p(), c_void_p(), c_void_p()
    cu("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(PTX))
    cu("cuModuleGetFunction", ctypes.byref(noop), module, b"noop")
    cu("cuModuleGetFunction", ctypes.byref(read_word), module, b"read_word")
    nbytes = 128 * 784 * 4
    a, b = c_u64(), c_u64()
    cu("cuMemAlloc_v2", ctypes.byref(a), nbytes)
    cu("cuMemAlloc_v2", ctypes.byref(b), nbytes)
    host = c_void_p()
    cu("cuMemHostAlloc", ctypes.byref(host), 64, 0x02)  # DEVICEMAP
    mapped = c_u64()
    cu("cuMemHostGetDevicePointer_v2", ctypes.byref(mapped), host, 0)
    event = c_void_p()
    cu("cuEventCreate", ctypes.byref(event), 0x02)  # DISABLE_TIMING

    def launch(func: c_void_p, params: Any = None) -> None:
        cu("cuLaunchKernel", func, 1, 1, 1, 32, 1, 1, 0, stream, params, None)

    def sync() -> None:
        cu("cuStreamSynchronize", stream)

    def capture(kernels: int) -> tuple[c_void_p, c_void_p]:
        graph, exec_ = c_void_p(), c_void_p()
        cu("cuStreamBeginCapture_v2", stream, 2)  # thread-local
        for _ in range(kernels):
            launch(noop)
        cu("cuStreamEndCapture", stream, ctypes.byref(graph))
        cu("cuGraphInstantiateWithFlags", ctypes.byref(exec_), graph, c_u64(0))
        return graph, exec_

    g1, e1 = capture(1)
    _, e19 = capture(19)
    node, count = c_void_p(), ctypes.c_size_t(1)
    cu("cuGraphGetNodes", g1, ctypes.byref(node), ctypes.byref(count))
    node_params = KernelParams(noop, 1, 1, 1, 32, 1, 1, 0, None, None)

    def event_pair() -> None:
        e = c_void_p()
        cu("cuEventCreate", ctypes.byref(e), 0x02)
        cu("cuEventDestroy_v2", e)

    attr = ctypes.c_int()
    src_word, dst_word = c_u64(mapped.value), c_u64(b.value)
    word_args = (c_void_p * 2)(ctypes.cast(ctypes.byref(src_word), c_void_p),
                               ctypes.cast(ctypes.byref(dst_word), c_void_p))

    parts: dict[str, Callable[[], Any]] = {
        "cuEventCreate + cuEventDestroy": event_pair,
        "cuEventRecord (another stream)": lambda: cu("cuEventRecord", event, other),
        "cuStreamWaitEvent": lambda: cu("cuStreamWaitEvent", stream, event, 0),
        "cuPointerGetAttribute (device ordinal)": lambda: cu(
            "cuPointerGetAttribute", ctypes.byref(attr), 9, a),
        "cuMemcpyDtoDAsync, 401 KB (then a sync per 50)": lambda: cu(
            "cuMemcpyDtoDAsync_v2", b, a, nbytes, stream),
        "cuLaunchKernel, empty kernel": lambda: launch(noop),
        "cuGraphLaunch, 1 empty kernel": lambda: cu("cuGraphLaunch", e1, stream),
        "cuGraphExecKernelNodeSetParams": lambda: cu(
            "cuGraphExecKernelNodeSetParams", e1, node, ctypes.byref(node_params)),
        "cuMemcpyDtoHAsync, 4 B into pinned": lambda: cu(
            "cuMemcpyDtoHAsync_v2", host, a, 4, stream),
        "cuStreamSynchronize, idle stream": sync,
        "round trip: empty kernel + sync": lambda: (launch(noop), sync()),
        "round trip: graph of 1 empty kernel + sync": lambda: (
            cu("cuGraphLaunch", e1, stream), sync()),
        "round trip: graph of 19 empty kernels + sync": lambda: (
            cu("cuGraphLaunch", e19, stream), sync()),
        "round trip: kernel reading mapped memory + sync": lambda: (
            launch(read_word, word_args), sync()),
        "round trip: 401 KB copy + empty kernel + sync": lambda: (
            cu("cuMemcpyDtoDAsync_v2", b, a, nbytes, stream), launch(noop), sync()),
    }
    out = {}
    for name, fn in parts.items():
        if "round trip" in name or "Synchronize" in name:
            out[name] = per_call_us(fn, calls)
        else:
            # queued work: wait every 50 calls so queues stay short, and time only the calls
            def batch(fn: Callable[[], Any] = fn) -> None:
                for _ in range(50):
                    fn()
            batch()
            sync()
            samples = []
            for _ in range(7):
                total = 0.0
                for _ in range(max(calls // 50, 1)):
                    start = time.perf_counter()
                    batch()
                    total += time.perf_counter() - start
                    sync()
                samples.append(total / (max(calls // 50, 1) * 50) * 1e6)
            out[name] = statistics.median(samples)
        print(f"  {out[name]:8.2f} µs  {name}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = measure(args.calls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
