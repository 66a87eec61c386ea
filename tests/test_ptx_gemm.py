"""The register-tiled SGEMM kernels (``ptx_gemm.py``) the autotuner times against
cuBLAS: run in the PTX interpreter on odd shapes, every layout, split counts and
epilogue, against NumPy in float64; and assembled by ptxas for sm_90."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from ptx_sim import Machine

from ferrograd.codegen.backends.ptx import assemble, find_ptxas
from ferrograd.codegen.backends.ptx_gemm import (
    BLOCKS,
    SPLIT_COUNTS,
    SPLIT_PARTIALS,
    TiledLaunch,
    kernel_name,
    split_choices,
    tiled_candidates,
    tiled_sgemm_text,
)
from ferrograd.codegen.backends.ptx_gemm_blocked import (
    SHAPES,
    blocked_candidates,
    blocked_name,
    blocked_sgemm_text,
)
from ferrograd.codegen.launch_plan import BufferRef, DeviceModule, Launch

ARENAS = {"a": "a", "b": "b", "c": "c", "bias": "bias", SPLIT_PARTIALS: "split_f32",
          SPLIT_COUNTS: "split_u32"}


def _strides(rows: int, cols: int, transposed: bool, batch_stride: int
             ) -> tuple[int, int, int]:
    return (batch_stride, 1, rows) if transposed else (batch_stride, cols, 1)


def _run(m: int, n: int, k: int, *, a_t: bool, b_t: bool, batch: int = 1,
         bias: bool = False, relu: bool = False, scale: tuple[float, float] = (1.0, 0.0),
         seed: int = 0, family: Callable[..., list[TiledLaunch]] = tiled_candidates
         ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every candidate's (of ``family``) C and the split counters after it, with NumPy's
    C."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, k, n)).astype(np.float32)
    c0 = rng.standard_normal((batch, m, n)).astype(np.float32)
    vec = rng.standard_normal(n).astype(np.float32)
    ops = [("a", 0, _strides(m, k, a_t, m * k)), ("b", 0, _strides(k, n, b_t, k * n)),
           ("c", 0, (m * n, n, 1))]
    found = family(batch, (m, n, k), ops, ("bias", 0) if bias else None, relu, 1, (0, 0, 0),
                   scale)
    assert found, "a small product has candidates"
    want = scale[0] * np.matmul(a.astype(np.float64), b.astype(np.float64))
    if scale[1] != 0:
        want += scale[1] * c0
    if bias:
        want += vec
        if relu:
            want = np.maximum(want, 0)
    out = []
    for name, text, args, grid, block, partials, tiles in found:  # TiledLaunch
        sizes = {"a": a.size, "b": b.size, "c": c0.size, "bias": n,
                 "split_f32": max(partials, 1), "split_u32": max(tiles, 1)}
        source = ".version 8.0\n.target sm_80\n.address_size 64\n\n" + text.replace("ENTRY", name)
        module = DeviceModule(source, {}, sizes)
        elem = {"a": "f32", "b": "f32", "c": "f32", "bias": "f32", "split_f32": "f32",
                "split_u32": "u32"}
        machine = Machine(module, elem)
        for arena, data in (("a", a), ("b", b), ("bias", vec)):
            machine.array(arena)[:] = data.ravel()
        for arena, data, t in (("a", a, a_t), ("b", b, b_t)):
            if t:  # stored transposed: element (r, c) at c·rows + r
                machine.array(arena)[:] = np.swapaxes(data, 1, 2).ravel()
        c_init = c0 if scale[1] != 0 else np.full_like(c0, np.nan)  # unread with beta 0
        machine.array("c")[:] = c_init.ravel()
        machine.launch(Launch(name, grid, block, _refs(args)))
        c = machine.array("c").reshape(batch, m, n).copy()
        counts = machine.array("split_u32").copy()
        splits = grid[2] // batch
        out.append((splits, c, counts, want))
        assert block[0] in BLOCKS or family is not tiled_candidates
    return out


def _refs(args: list) -> tuple:
    return tuple(BufferRef(ARENAS[a[0]], a[1]) if isinstance(a, tuple) else a for a in args)


@pytest.mark.parametrize(("a_t", "b_t"), [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_tiled_gemm_matches_numpy_in_every_layout_and_split(a_t: bool, b_t: bool) -> None:
    results = _run(37, 45, 70, a_t=a_t, b_t=b_t)
    assert sorted(s for s, *_ in results)[-1] > 1, "a split candidate is timed too"
    for splits, c, counts, want in results:
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")
        assert not counts.any(), "the last CTA of each tile resets its counter"


@pytest.mark.parametrize(("bias", "relu", "scale"), [(True, False, (1.0, 0.0)),
                                                     (True, True, (1.0, 0.0)),
                                                     (False, False, (-0.01, 1.0)),
                                                     (False, False, (0.5, 0.25))])
def test_tiled_gemm_epilogues_and_scaling(bias: bool, relu: bool,
                                          scale: tuple[float, float]) -> None:
    results = _run(33, 64, 100, a_t=True, b_t=False, bias=bias, relu=relu, scale=scale,
                   seed=1)
    for splits, c, counts, want in results:
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")
        assert not counts.any()
    if relu:
        assert (results[0][1] == 0).any() and (results[0][1] > 0).any()


def test_tiled_gemm_batches_and_tiny_products() -> None:
    for m, n, k, batch in ((5, 3, 2, 3), (64, 10, 256, 2), (1, 1, 1, 1)):
        for splits, c, counts, want in _run(m, n, k, a_t=False, b_t=True, batch=batch):
            np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4,
                                       err_msg=f"{m}x{n}x{k} batch {batch} splits {splits}")
            assert not counts.any()


def test_split_choices_fill_the_gpu_without_empty_ranges() -> None:
    # the MLP's first layer at batch 128: 32 tiles of 32×32, k = 784
    choices = split_choices(128, 256, 784, 1)
    assert choices[0] == 1 and len(choices) >= 2
    for s in choices:
        chunk = 32 * math.ceil(math.ceil(784 / s) / 32)
        assert (s - 1) * chunk < 784, "every split has some of k"
    assert split_choices(4096, 4096, 64, 1) == [1], "enough tiles: no split"
    assert tiled_candidates(1, (8192, 256, 784), [("a", 0, (0, 784, 1)), ("b", 0, (0, 256, 1)),
                                                  ("c", 0, (0, 256, 1))], None, False, 1,
                            (0, 0, 0), (1.0, 0.0)) == [], "large products stay cuBLAS's"


@pytest.mark.parametrize(("a_t", "b_t"), [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_blocked_gemm_matches_numpy_in_every_layout_shape_and_split(a_t: bool, b_t: bool
                                                                    ) -> None:
    # 250 × 250: every tile shape, each with a ragged last tile; k = 131: a ragged step
    results = _run(250, 250, 131, a_t=a_t, b_t=b_t, family=blocked_candidates)
    assert len({s for s, *_ in results}) > 1, "split candidates are timed too"
    for splits, c, counts, want in results:
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")
        assert not counts.any(), "the last CTA of each tile resets its counter"


def test_blocked_gemm_epilogue_batches_and_shapes_offered() -> None:
    for splits, c, counts, want in _run(120, 64, 24, a_t=False, b_t=True, batch=2, bias=True,
                                        relu=True, scale=(0.5, 0.0), seed=2,
                                        family=blocked_candidates):
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")
        assert not counts.any()
    for splits, c, _, want in _run(62, 64, 16, a_t=True, b_t=False, scale=(-0.01, 1.0),
                                   family=blocked_candidates):
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")

    def shapes(m: int, n: int) -> set[str]:
        ops = [("a", 0, (0, 784, 1)), ("b", 0, (0, n, 1)), ("c", 0, (0, n, 1))]
        return {t.name.split("_")[2] for t in blocked_candidates(1, (m, n, 784), ops, None,
                                                                  False, 1, (0, 0, 0),
                                                                  (1.0, 0.0))}
    assert shapes(8192, 256) == {"128x128", "128x64", "64x128", "64x64"}
    assert shapes(8192, 10) == set(), "a skinny C is left to the others"
    assert shapes(8192, 160) == {"128x64", "64x64"}, "not tiles that would hang outside C"


def test_a_copy_read_before_its_wait_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # the interpreter lands cp.async copies only at the wait: a kernel without it reads
    # shared memory a copy is still writing, which must fail rather than pass by luck
    import ferrograd.codegen.backends.ptx_gemm_blocked as blocked

    def no_wait(*args: object) -> str:
        return real(*args).replace("\tcp.async.wait_group 2;\n", "")
    real = blocked.blocked_sgemm_text.__wrapped__
    monkeypatch.setattr(blocked, "blocked_sgemm_text", no_wait)
    with pytest.raises(AssertionError, match="in flight"):
        _run(64, 64, 32, a_t=False, b_t=False, family=blocked.blocked_candidates)


PTXAS = find_ptxas()


@pytest.mark.skipif(PTXAS is None, reason="no ptxas (pip install nvidia-cuda-nvcc)")
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_ptxas_assembles_every_tiled_kernel(target: str) -> None:
    version = {"sm_80": "7.0", "sm_90": "7.8"}[target]
    texts = [tiled_sgemm_text(a_k, b_k, t).replace("ENTRY", kernel_name(a_k, b_k, t))
             for a_k in (False, True) for b_k in (False, True) for t in BLOCKS]
    texts += [blocked_sgemm_text(a_k, b_k, bm, bn).replace("ENTRY", blocked_name(a_k, b_k, bm, bn))
              for a_k in (False, True) for b_k in (False, True) for bm, bn in SHAPES]
    source = f".version {version}\n.target {target}\n.address_size 64\n\n" + "\n".join(texts)
    assert assemble(source, target, PTXAS)
