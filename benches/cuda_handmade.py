"""A tiny model with a hand-written PTX module and launch plans, to check the CUDA
runtime (arenas, launches with pointer and scalar arguments, GEMMs in cuBLAS and in
the fallback kernel, transposed operands, in-place updates, CUDA graphs) apart from
the PTX renderer: ``device_module(lowered)`` replaces what ``render_ptx`` makes.

    y = x @ w            x: f32[4, 3] (input), w: f32[3, 2] (param)
    loss = sum(y)        grads: dw = xᵀ @ ones(4, 2);  SGD: w -= 0.1 · dw
"""

from __future__ import annotations

import ferrograd as fg
from ferrograd.codegen.launch_plan import (
    BufferRef,
    DeviceModule,
    DevicePlan,
    Gemm,
    Launch,
    ScalarArg,
)


@fg.model
def tiny(x: fg.f32[4, 3]):
    y = x @ fg.param("w", (3, 2), init="normal")
    return {"loss": y.sum(), "y": y}


OPTIMIZER = fg.optim.SGD(lr=0.1)
LR = 0.1

PTX = r"""
.version 7.0
.target sm_80
.address_size 64

// out[i] = value for i < n: a thread per element.
.visible .entry fill_f32(.param .u64 out, .param .f32 value, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [out];
    ld.param.f32 %f1, [value];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra FILL_DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r5, 4;
    add.s64 %rd4, %rd2, %rd3;
    st.global.f32 [%rd4], %f1;
FILL_DONE:
    ret;
}

// out[0] = in[0] + ... + in[n - 1]: one thread.
.visible .entry sum_f32(.param .u64 src, .param .u64 out, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<3>;
    .reg .f32 %f<3>;
    .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    ld.param.u32 %r1, [n];
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mov.f32 %f1, 0f00000000;
    mov.u32 %r2, 0;
SUM_LOOP:
    setp.ge.u32 %p1, %r2, %r1;
    @%p1 bra SUM_END;
    ld.global.f32 %f2, [%rd3];
    add.rn.f32 %f1, %f1, %f2;
    add.s64 %rd3, %rd3, 4;
    add.u32 %r2, %r2, 1;
    bra SUM_LOOP;
SUM_END:
    st.global.f32 [%rd4], %f1;
    ret;
}

// w[i] = w[i] - lr * g[i] for i < n: a thread per element, in place.
.visible .entry sgd_f32(.param .u64 g, .param .u64 w, .param .f32 lr, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<5>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [g];
    ld.param.u64 %rd2, [w];
    ld.param.f32 %f1, [lr];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra SGD_DONE;
    mul.wide.u32 %rd3, %r5, 4;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    add.s64 %rd6, %rd4, %rd3;
    add.s64 %rd7, %rd5, %rd3;
    ld.global.f32 %f2, [%rd6];
    ld.global.f32 %f3, [%rd7];
    mul.rn.f32 %f4, %f2, %f1;
    sub.rn.f32 %f3, %f3, %f4;
    st.global.f32 [%rd7], %f3;
SGD_DONE:
    ret;
}

// C[z] = A[z] @ B[z] with element strides (batch, row, col): a thread per element
// of C (x: column, y: row, z: batch).
.visible .entry gemm_naive(.param .u64 pa, .param .u64 pb, .param .u64 pc,
    .param .u32 m, .param .u32 n, .param .u32 k, .param .u32 batch,
    .param .u32 a_sb, .param .u32 a_sr, .param .u32 a_sc,
    .param .u32 b_sb, .param .u32 b_sr, .param .u32 b_sc,
    .param .u32 c_sb, .param .u32 c_sr, .param .u32 c_sc)
{
    .reg .pred %p<4>;
    .reg .b32 %r<28>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<13>;
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [pc];
    cvta.to.global.u64 %rd10, %rd1;
    cvta.to.global.u64 %rd11, %rd2;
    cvta.to.global.u64 %rd12, %rd3;
    ld.param.u32 %r1, [m];
    ld.param.u32 %r2, [n];
    ld.param.u32 %r3, [k];
    ld.param.u32 %r4, [batch];
    ld.param.u32 %r5, [a_sb];
    ld.param.u32 %r6, [a_sr];
    ld.param.u32 %r7, [a_sc];
    ld.param.u32 %r8, [b_sb];
    ld.param.u32 %r9, [b_sr];
    ld.param.u32 %r10, [b_sc];
    ld.param.u32 %r11, [c_sb];
    ld.param.u32 %r12, [c_sr];
    ld.param.u32 %r13, [c_sc];
    mov.u32 %r14, %ctaid.x;
    mov.u32 %r15, %ntid.x;
    mov.u32 %r16, %tid.x;
    mad.lo.u32 %r17, %r14, %r15, %r16;
    mov.u32 %r18, %ctaid.y;
    mov.u32 %r19, %ntid.y;
    mov.u32 %r20, %tid.y;
    mad.lo.u32 %r21, %r18, %r19, %r20;
    mov.u32 %r22, %ctaid.z;
    setp.ge.u32 %p1, %r17, %r2;
    @%p1 bra GEMM_END;
    setp.ge.u32 %p2, %r21, %r1;
    @%p2 bra GEMM_END;
    setp.ge.u32 %p3, %r22, %r4;
    @%p3 bra GEMM_END;
    mul.lo.u32 %r23, %r22, %r5;
    mad.lo.u32 %r23, %r21, %r6, %r23;
    mul.lo.u32 %r24, %r22, %r8;
    mad.lo.u32 %r24, %r17, %r10, %r24;
    mov.f32 %f1, 0f00000000;
    mov.u32 %r25, 0;
GEMM_LOOP:
    setp.ge.u32 %p1, %r25, %r3;
    @%p1 bra GEMM_STORE;
    mul.wide.u32 %rd4, %r23, 4;
    add.s64 %rd5, %rd10, %rd4;
    ld.global.f32 %f2, [%rd5];
    mul.wide.u32 %rd6, %r24, 4;
    add.s64 %rd7, %rd11, %rd6;
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f1, %f2, %f3, %f1;
    add.u32 %r23, %r23, %r7;
    add.u32 %r24, %r24, %r9;
    add.u32 %r25, %r25, 1;
    bra GEMM_LOOP;
GEMM_STORE:
    mul.lo.u32 %r26, %r22, %r11;
    mad.lo.u32 %r26, %r21, %r12, %r26;
    mad.lo.u32 %r26, %r17, %r13, %r26;
    mul.wide.u32 %rd8, %r26, 4;
    add.s64 %rd9, %rd12, %rd8;
    st.global.f32 [%rd9], %f1;
GEMM_END:
    ret;
}
"""


def _u32(*values: int) -> tuple[ScalarArg, ...]:
    return tuple(ScalarArg("u32", v) for v in values)


def _gemm(m: int, n: int, k: int, a: BufferRef, a_strides: tuple[int, int, int],
          b: BufferRef, b_strides: tuple[int, int, int], c: BufferRef,
          c_strides: tuple[int, int, int]) -> Gemm:
    fallback = Launch("gemm_naive", ((n + 15) // 16, (m + 15) // 16, 1), (16, 16, 1),
                      (a, b, c, *_u32(m, n, k, 1, *a_strides, *b_strides, *c_strides)))
    return Gemm(1, m, n, k, a, a_strides, b, b_strides, c, c_strides, fallback)


def device_module(lowered: fg.Lowered) -> DeviceModule:
    """The hand-written stand-in for ``render_ptx`` (same arenas and results)."""
    plan = lowered.memory_plan
    w = BufferRef("param", plan.persistent["param_w"][1])
    x = BufferRef("input:x", 0)

    def t(offset: int) -> BufferRef:
        return BufferRef("temp_f32", offset)

    y, loss, ones, dw = t(0), t(8), t(16), t(24)
    forward = [_gemm(4, 2, 3, x, (0, 3, 1), w, (0, 2, 1), y, (0, 2, 1)),
               Launch("sum_f32", (1, 1, 1), (1, 1, 1), (y, loss, *_u32(8)))]
    fill = Launch("fill_f32", (1, 1, 1), (32, 1, 1), (ones, ScalarArg("f32", 1.0), *_u32(8)))
    grad = _gemm(3, 2, 4, x, (0, 1, 3), ones, (0, 2, 1), dw, (0, 2, 1))  # xᵀ: strides (1, 3)
    sgd = Launch("sgd_f32", (1, 1, 1), (32, 1, 1), (dw, w, ScalarArg("f32", LR), *_u32(6)))
    plans = {
        "forward": DevicePlan("forward", forward,
                              {"out:loss": ("temp_f32", 8, ()), "out:y": ("temp_f32", 0, (4, 2))}),
        "grads": DevicePlan("grads", [fill, grad], {"grad:w": ("temp_f32", 24, (3, 2))}),
        "train": DevicePlan("train", [*forward, fill, grad, sgd],
                            {"out:loss": ("temp_f32", 8, ())}),
    }
    arenas = {"param": plan.persistent_size["param"], "state": 0, "temp_f32": 32,
              "input:x": 12}
    return DeviceModule(PTX, plans, arenas, {})


def lower() -> fg.Lowered:
    return fg.lower(tiny, optimizer=OPTIMIZER, backend=("cpu", "cuda"))


# ---- modules that fail on purpose, to check the runtime's errors ------------------------

ERROR_CASES = ("faults", "bad_ptx", "oom")


def error_module(lowered: fg.Lowered, case: str) -> DeviceModule:
    """``device_module`` broken on purpose:

    - "faults": ``forward`` launches with 2048 threads a block (the launch fails at
      once: invalid configuration), ``grads`` writes 4 GiB past its arena (an illegal
      address, seen only when the stream is waited for); ``train`` is right;
    - "bad_ptx": PTX the driver's JIT rejects (an undefined register);
    - "oom": a temp arena of 2⁴⁰ floats (4 TiB), more than any GPU has.
    """
    good = device_module(lowered)
    ones = BufferRef("temp_f32", 16)
    if case == "faults":
        bad_launch = Launch("fill_f32", (1, 1, 1), (2048, 1, 1),
                            (ones, ScalarArg("f32", 1.0), *_u32(8)))
        n = 1 << 30  # a thread per element: 2^22 blocks of 256
        wild = Launch("fill_f32", (n // 256, 1, 1), (256, 1, 1),
                      (ones, ScalarArg("f32", 1.0), *_u32(n)))
        plans = dict(good.plans)
        plans["forward"] = DevicePlan("forward", [bad_launch], good.plans["forward"].results)
        plans["grads"] = DevicePlan("grads", [wild], good.plans["grads"].results)
        return DeviceModule(PTX, plans, good.arena_sizes, {})
    if case == "bad_ptx":
        broken = PTX.replace("st.global.f32 [%rd4], %f1;", "st.global.f32 [%rd4], %f9;")
        return DeviceModule(broken, good.plans, good.arena_sizes, {})
    if case == "oom":
        return DeviceModule(PTX, good.plans, {**good.arena_sizes, "temp_f32": 1 << 40}, {})
    raise ValueError(case)
