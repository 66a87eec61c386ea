"""Experiment (session 15): where a 3xTF32 kernel's time goes — the split done with cvt or
integer ops, three MMAs or one (TF32), or raw fp32 bits into one MMA (the kernel's
data-movement ceiling). On the H200: python benches/tf32x3_variants.py."""
import ctypes, sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import gemm_kernels as gk
from ferrograd.codegen.backends import ptx_gemm_tc as tc
from ferrograd.codegen.backends.ptx_gemm import SPLIT_COUNTS, SPLIT_PARTIALS
from ferrograd.codegen.launch_plan import ScalarArg

torch.backends.cuda.matmul.allow_tf32 = False
drv = gk.Driver()
out = {}
for m, n, k, a_k, b_k in [(8192, 256, 784, True, False), (8192, 512, 2048, True, False),
                          (784, 256, 8192, False, False)]:
    a_store = torch.randn((m, k) if a_k else (k, m), device="cuda")
    b_store = torch.randn((n, k) if b_k else (k, n), device="cuda")
    a, b = (a_store if a_k else a_store.t()), (b_store.t() if b_k else b_store)
    want = (a.double() @ b.double())
    c = torch.empty((m, n), device="cuda")
    ops = [("a", 0, (0, *a.stride())), ("b", 0, (0, *b.stride())), ("c", 0, (0, n, 1))]
    found = tc.tensor_candidates(1, (m, n, k), ops, None, False, 1, (0, 0, 0), (1.0, 0.0))
    partials = torch.empty(max([t.partials for t in found] + [1]), device="cuda")
    counts = torch.zeros(max([t.tiles for t in found] + [1]), dtype=torch.int32, device="cuda")
    where = {"a": a_store.data_ptr(), "b": b_store.data_ptr(), "c": c.data_ptr(),
             SPLIT_PARTIALS: partials.data_ptr(), SPLIT_COUNTS: counts.data_ptr()}
    print(f"{m}x{n}x{k}", flush=True)
    c.fill_(0); torch.matmul(a, b, out=c); torch.cuda.synchronize()
    e = float(((c.double() - want).abs().max() / want.abs().max()))
    us = gk.per_launch_us(lambda: torch.matmul(a, b, out=c))
    print(f"  {us:8.2f} µs {2*m*n*k/us/1e6:6.1f} TF  err {e:.1e} cuBLAS")
    for t in found:
        for how, terms in (("cvt", 3), ("int", 3), ("cvt", 1), ("raw", 1)):
            shape = next(s for s in tc.SHAPES if tc.kernel_name(s, a_k, b_k) == t.name)
            text = tc.tf32x3_text(shape, a_k, b_k, how, terms)
            fn = drv.function(".version 7.8\n.target sm_90\n.address_size 64\n\n" +
                              text.replace("ENTRY", t.name), t.name)
            args = [(ctypes.c_float(x.value) if x.kind == "f32" else ctypes.c_uint32(x.value))
                    if isinstance(x, ScalarArg) else where[x[0]] + 4 * x[1] for x in t.args]
            run = lambda fn=fn, t=t, args=args: drv.launch(fn, t.grid, t.block, args, torch.cuda.current_stream().cuda_stream)
            c.fill_(float("nan")); run(); torch.cuda.synchronize()
            e = float(((c.double() - want).abs().max() / want.abs().max()))
            us = gk.per_launch_us(run)
            label = f"{t.name} splits {t.grid[2]} {how}x{terms}"
            print(f"  {us:8.2f} µs {2*m*n*k/us/1e6:6.1f} TF  err {e:.1e} {label}", flush=True)
