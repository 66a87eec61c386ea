"""The generated SGEMM kernels the autotuner times against cuBLAS — register-tiled
(``ptx_gemm.py``) and thin (``ptx_gemm_thin.py``): run in the PTX interpreter on odd
shapes, every layout, split counts and epilogue, against NumPy in float64; and
assembled by ptxas for sm_80 and sm_90."""

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
from ferrograd.codegen.backends.ptx_gemm_thin import thin_candidates
from ferrograd.codegen.launch_plan import BufferRef, DeviceModule, Launch

ARENAS = {"a": "a", "b": "b", "c": "c", "bias": "bias", SPLIT_PARTIALS: "split_f32",
          SPLIT_COUNTS: "split_u32"}


def _strides(rows: int, cols: int, transposed: bool, batch_stride: int
             ) -> tuple[int, int, int]:
    return (batch_stride, 1, rows) if transposed else (batch_stride, cols, 1)


def _run(m: int, n: int, k: int, *, a_t: bool, b_t: bool, batch: int = 1,
         bias: bool = False, relu: bool = False, scale: tuple[float, float] = (1.0, 0.0),
         seed: int = 0, family: Callable[..., list[TiledLaunch]] = tiled_candidates,
         inf_column: int | None = None
         ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every candidate's (of ``family``) C and the split counters after it, with NumPy's
    C; ``inf_column``: that column of B is all Inf."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, k, n)).astype(np.float32)
    if inf_column is not None:
        b[:, :, inf_column] = np.inf
    c0 = rng.standard_normal((batch, m, n)).astype(np.float32)
    vec = rng.standard_normal(n).astype(np.float32)
    ops = [("a", 0, _strides(m, k, a_t, m * k)), ("b", 0, _strides(k, n, b_t, k * n)),
           ("c", 0, (m * n, n, 1))]
    found = family(batch, (m, n, k), ops, ("bias", 0) if bias else None, relu, 1, (0, 0, 0),
                   scale)
    assert found, "a small product has candidates"
    with np.errstate(invalid="ignore"):  # Inf · 0 in an inf_column
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


def _kinds(found: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for splits, c, counts, want in found:
        np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4, err_msg=f"splits {splits}")
        assert not counts.any(), "the last CTA of each tile resets its counter"


def _names(m: int, n: int, k: int, a_t: bool) -> set[str]:
    ops = [("a", 0, _strides(m, k, a_t, 0)), ("b", 0, _strides(k, n, False, 0)),
           ("c", 0, (0, n, 1))]
    return {"_".join(t.name.split("_")[2:4]) for t in
            thin_candidates(1, (m, n, k), ops, None, False, 1, (0, 0, 0), (1.0, 0.0))}


def test_thin_kernels_are_offered_for_thin_products_only() -> None:
    assert _names(8192, 10, 256, a_t=False) == {"warp_rows"}  # logits = h·W
    assert _names(256, 10, 8192, a_t=True) == {"thread_rows"}  # its weight gradient
    assert _names(8192, 256, 10, a_t=False) == {"short_k"}  # dlogits·Wᵀ
    assert _names(128, 256, 784, a_t=False) == set()
    assert _names(8192, 10, 2048, a_t=False) == set(), "Bᵀ would not fit in shared memory"


@pytest.mark.parametrize(("b_t", "bias", "relu", "scale", "batch"),
                         [(False, False, False, (1.0, 0.0), 1),
                          (True, True, True, (1.0, 0.0), 2),
                          (False, False, False, (-0.01, 1.0), 1)])
def test_warp_rows_and_short_k_match_numpy(b_t: bool, bias: bool, relu: bool,
                                           scale: tuple[float, float], batch: int) -> None:
    # k = 75: two full warps' steps and a partial one; n = 10: a warp's lanes per column
    found = _run(70, 10, 75, a_t=False, b_t=b_t, bias=bias, relu=relu, scale=scale,
                 batch=batch, family=thin_candidates)
    assert len(found) == 1
    _kinds(found)
    found = _run(70, 45, 5, a_t=b_t, b_t=not b_t, bias=bias, relu=relu, scale=scale,
                 batch=batch, family=thin_candidates)
    assert len(found) == 1
    _kinds(found)


@pytest.mark.parametrize(("bias", "scale"), [(False, (1.0, 0.0)), (True, (0.5, 0.25))])
def test_thread_rows_match_numpy_with_and_without_splits(bias: bool,
                                                         scale: tuple[float, float]) -> None:
    found = _run(300, 7, 200, a_t=True, b_t=False, bias=bias, scale=scale, seed=3,
                 family=thin_candidates)
    assert {s for s, *_ in found} == {1, 2}, "unsplit, and 128 steps of k per split"
    _kinds(found)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_warp_rows_sum_every_column_count_to_its_lane(n: int) -> None:
    # the warp's sums end a column to a lane, by halving the columns at each offset:
    # every count from 1 (a plain butterfly) to 16 (four halvings) lands where it should
    _kinds(_run(9, n, 33, a_t=False, b_t=False, bias=True, scale=(0.5, 0.25), seed=n,
                family=thin_candidates))


def test_thin_kernels_fit_in_static_shared_memory() -> None:
    # a kernel declaring more than 48 KB of static shared memory does not assemble: the
    # shapes at each kernel's limits must stay under it (or not be offered)
    import re

    limit = 48 * 1024
    for n in (1, 3, 10, 16):
        for k in {1, 16, 17, 256, 512, 640, 768, 2048, 12288 // n - 32, 12288 // n - 31,
                  8192}:
            for a_t in (False, True):
                ops = [("a", 0, _strides(64, k, a_t, 0)), ("b", 0, _strides(k, n, False, 0)),
                       ("c", 0, (0, n, 1))]
                for t in thin_candidates(1, (64, n, k), ops, None, False, 1, (0, 0, 0),
                                         (1.0, 0.0)):
                    used = sum(int(b) for b in re.findall(r"\.shared .*\[(\d+)\];", t.text))
                    assert used <= limit, f"{t.name}: {used} bytes of shared memory"


def test_short_k_with_several_columns_per_thread() -> None:
    # 600 columns over 256 threads: three columns a thread, the last one partly outside
    found = _run(40, 600, 7, a_t=True, b_t=False, bias=True, relu=True, seed=6,
                 family=thin_candidates)
    assert len(found) == 1
    _kinds(found)


def test_warp_rows_two_rows_at_a_time() -> None:
    # more rows than the grid's warps: each warp loads two rows' elements together
    ops = [("a", 0, (0, 40, 1)), ("b", 0, (0, 3, 1)), ("c", 0, (0, 3, 1))]
    (t,) = thin_candidates(1, (2200, 3, 40), ops, None, False, 1, (0, 0, 0), (1.0, 0.0))
    assert t.name.endswith("_r2")
    _kinds(_run(2200, 3, 40, a_t=False, b_t=True, bias=True, seed=5, family=thin_candidates))


def test_warp_rows_keep_an_inf_in_one_column_out_of_the_others() -> None:
    # the lanes past k (37 = 32 + 5) read the next column of Bᵀ: with column 1 all Inf,
    # column 0 must still be its finite sum
    (_, c, _, want), = _run(40, 3, 37, a_t=False, b_t=False, seed=4, inf_column=1,
                            family=thin_candidates)
    assert np.isfinite(c[..., 0]).all() and not np.isfinite(c[..., 1]).any()
    np.testing.assert_allclose(c[..., ::2], want[..., ::2], rtol=1e-5, atol=1e-4)


PTXAS = find_ptxas()


@pytest.mark.skipif(PTXAS is None, reason="no ptxas (pip install nvidia-cuda-nvcc)")
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_ptxas_assembles_every_tiled_kernel(target: str) -> None:
    version = {"sm_80": "7.0", "sm_90": "7.8"}[target]
    texts = [tiled_sgemm_text(a_k, b_k, t).replace("ENTRY", kernel_name(a_k, b_k, t))
             for a_k in (False, True) for b_k in (False, True) for t in BLOCKS]
    ops = [("a", 0, (0, 256, 1)), ("b", 0, (0, 10, 1)), ("c", 0, (0, 10, 1))]
    thin = [*thin_candidates(1, (8192, 10, 256), ops, None, False, 1, (0, 0, 0), (1.0, 0.0)),
            *thin_candidates(1, (256, 10, 8192), [("a", 0, (0, 1, 256)), *ops[1:]], None,
                             False, 1, (0, 0, 0), (1.0, 0.0)),
            *thin_candidates(1, (8192, 256, 10), [("a", 0, (0, 10, 1)),
                                                  ("b", 0, (0, 1, 10)), ("c", 0, (0, 256, 1))],
                             None, False, 1, (0, 0, 0), (1.0, 0.0))]
    texts += list({t.name: t.text.replace("ENTRY", t.name) for t in thin}.values())
    source = f".version {version}\n.target {target}\n.address_size 64\n\n" + "\n".join(texts)
    assert assemble(source, target, PTXAS)
