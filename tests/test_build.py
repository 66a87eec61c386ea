"""Building a crate into a module and caching it (ferrograd.codegen.build).

A tiny hand-written crate stands in for a generated one: it depends on the
runtime by path and exposes a few functions that go through the runtime's NumPy
helpers, GEMM, gather and panic guard. The module cache is per test session;
the cargo target folder is the user's shared one, so the dependencies compile
once across sessions (the first session takes a minute or two, later ones
seconds).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ferrograd.codegen import build, maturin
from ferrograd.codegen.build import (
    RUNTIME_DIR,
    BuildError,
    build_module,
    cache_dir,
    module_path,
    target_dir,
)
from ferrograd.ir.errors import BackendError

HAVE_TOOLCHAIN = shutil.which("cargo") is not None and (
    importlib.util.find_spec("maturin") is not None or shutil.which("maturin") is not None)
needs_toolchain = pytest.mark.skipif(
    not HAVE_TOOLCHAIN,
    reason="building modules needs cargo (https://rustup.rs) and maturin (pip install maturin)")

SESSION = uuid.uuid4().hex[:8]

CARGO_TOML = """\
[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
name = "{name}"
crate-type = ["cdylib"]

[dependencies]
ferrograd-runtime = {{ path = "{runtime}" }}
pyo3 = {{ version = "0.30", features = ["abi3-py310", "extension-module"] }}
numpy = "0.30"
rayon = "1.10"

[profile.release]
opt-level = 3
codegen-units = 16
debug = false
panic = "unwind"
"""

PYPROJECT = """\
[build-system]
requires = ["maturin>=1.5,<2"]
build-backend = "maturin"

[project]
name = "{name}"
version = "0.1.0"
requires-python = ">=3.10"
"""

LIB_RS = """\
use ferrograd_runtime::py::{guard, input_f32, input_i32, to_numpy_f32};
use ferrograd_runtime::{gather, gemm, Error};
use numpy::PyArrayDyn;
use pyo3::prelude::*;

#[pyfunction]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

/// (m, k) @ (k, n) through the runtime's sgemm, without the GIL.
#[pyfunction]
fn matmul<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    m: usize,
    k: usize,
    n: usize,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let a = input_f32(a, "a", &[m, k])?;
    let b = input_f32(b, "b", &[k, n])?;
    let (a, b): (&[f32], &[f32]) = (&a, &b);
    let mut c = vec![0.0f32; m * n];
    py.detach(|| {
        guard("matmul", || {
            let (ka, nb) = (k as isize, n as isize);
            gemm::sgemm(m, n, k, a, (ka, 1), b, (nb, 1), &mut c, (nb, 1), false)
        })
    })?;
    to_numpy_f32(py, &c, &[m, n])
}

/// Rows of a (rows, row_len) table: a bad id is a ValueError naming it.
#[pyfunction]
fn take<'py>(
    py: Python<'py>,
    table: &Bound<'py, PyAny>,
    ids: &Bound<'py, PyAny>,
    rows: usize,
    row_len: usize,
    count: usize,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let table = input_f32(table, "table", &[rows, row_len])?;
    let ids = input_i32(ids, "ids", &[count])?;
    let mut out = vec![0.0f32; count * row_len];
    guard("take", || gather::take_rows(&table, row_len, &ids, &mut out))?;
    to_numpy_f32(py, &out, &[count, row_len])
}

#[pyfunction]
fn boom() -> PyResult<()> {
    guard("boom", || -> Result<(), Error> { panic!("on purpose") })
}

#[pymodule]
fn {name}(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(add, m)?)?;
    m.add_function(wrap_pyfunction!(matmul, m)?)?;
    m.add_function(wrap_pyfunction!(take, m)?)?;
    m.add_function(wrap_pyfunction!(boom, m)?)?;
    Ok(())
}
"""


def write_crate(root: Path, name: str, lib_rs: str = LIB_RS) -> Path:
    crate = root / name
    (crate / "src").mkdir(parents=True)
    runtime = RUNTIME_DIR.as_posix()
    (crate / "Cargo.toml").write_text(CARGO_TOML.format(name=name, runtime=runtime))
    (crate / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    # str.replace, not format: the Rust source is full of braces.
    (crate / "src" / "lib.rs").write_text(lib_rs.replace("{name}", name))
    return crate


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """FERROGRAD_CACHE in a fresh folder; CARGO_TARGET_DIR stays the shared one."""
    shared_target = target_dir()  # computed before FERROGRAD_CACHE moves
    root = tmp_path_factory.mktemp("ferrograd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERROGRAD_CACHE", str(root))
        mp.setenv("CARGO_TARGET_DIR", str(shared_target))
        yield root


@pytest.fixture(scope="session")
def built(session_cache, tmp_path_factory):
    """The test crate, built once per session: (module, crate dir, seconds)."""
    name = f"fg_test_{SESSION}"
    crate = write_crate(tmp_path_factory.mktemp("crates"), name)
    start = time.perf_counter()
    module = build_module(crate, name)
    return module, crate, time.perf_counter() - start


# ---- without a toolchain ------------------------------------------------------------------


def test_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FERROGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("CARGO_TARGET_DIR", raising=False)
    assert cache_dir() == tmp_path
    assert target_dir() == tmp_path / "target"
    assert module_path("fg_x") == tmp_path / "modules" / "fg_x" / f"fg_x{build._suffix()}"
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path / "elsewhere"))
    assert target_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("FERROGRAD_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "ferrograd"
    # Relative paths are made absolute: cargo runs in the crate's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FERROGRAD_CACHE", "rel")
    monkeypatch.delenv("CARGO_TARGET_DIR")
    assert target_dir() == tmp_path / "rel" / "target"


def test_missing_cargo_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FERROGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(maturin.shutil, "which", lambda name: None)
    monkeypatch.setattr(build.Path, "home", staticmethod(lambda: tmp_path))
    crate = write_crate(tmp_path, "fg_no_cargo")
    with pytest.raises(BackendError, match=r"needs cargo.*rustup.*pip install maturin"):
        build_module(crate, "fg_no_cargo")


def test_missing_maturin_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FERROGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(maturin.shutil, "which",
                        lambda name: "/usr/bin/cargo" if name == "cargo" else None)
    monkeypatch.setattr(maturin.sys, "executable", str(tmp_path / "bin" / "python"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(maturin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "maturin" else real_find_spec(name, *a))
    crate = write_crate(tmp_path, "fg_no_maturin")
    with pytest.raises(BackendError, match="pip install maturin"):
        build_module(crate, "fg_no_maturin")


def test_module_names_are_checked(tmp_path):
    with pytest.raises(BackendError, match="not a valid Python module name"):
        build_module(tmp_path, "fg-bad name")


def test_runtime_fingerprint_is_stable():
    assert build.runtime_fingerprint() == build.runtime_fingerprint()
    assert len(build.runtime_fingerprint()) == 64


# ---- building ------------------------------------------------------------------------------


@needs_toolchain
def test_cold_build_loads_and_runs(built):
    module, _, seconds = built
    print(f"build: {seconds:.1f} s")
    assert module.add(2, 3) == 5
    assert Path(module.__file__) == module_path(module.__name__)
    assert sys.modules[module.__name__] is module
    rng = np.random.default_rng(0)
    a = rng.normal(size=(33, 70)).astype(np.float32)
    b = rng.normal(size=(70, 20)).astype(np.float32)
    np.testing.assert_allclose(module.matmul(a, b, 33, 70, 20), a @ b, rtol=1e-5, atol=1e-5)
    # A transposed (non-contiguous) input is copied, with the same result.
    np.testing.assert_allclose(module.matmul(np.ascontiguousarray(a.T).T, b, 33, 70, 20),
                               a @ b, rtol=1e-5, atol=1e-5)


@needs_toolchain
def test_module_errors_become_python_exceptions(built):
    module = built[0]
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(
        module.take(table, np.array([3, 0], np.int32), 4, 3, 2), table[[3, 0]])
    with pytest.raises(ValueError, match=r"take: index 4 \(at position 1\) is out of range "
                                         r"\[0, 4\)"):
        module.take(table, np.array([0, 4], np.int32), 4, 3, 2)
    with pytest.raises(ValueError, match=r"input 'ids': expected a int32 array of shape \(2,\), "
                                         r"got a int64 array of shape \(2,\)"):
        module.take(table, np.array([0, 1]), 4, 3, 2)
    with pytest.raises(ValueError, match=r"input 'a': expected a float32 array of shape "
                                         r"\(2, 2\), got an object of type list"):
        module.matmul([[1.0, 2.0], [3.0, 4.0]], np.eye(2, dtype=np.float32), 2, 2, 2)
    with pytest.raises(RuntimeError, match="ferrograd internal error in boom: on purpose"):
        module.boom()


@needs_toolchain
def test_cache_hit_loads_without_cargo(built, monkeypatch):
    module, crate, _ = built
    name = module.__name__

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cache hit must not run cargo or maturin")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.delitem(sys.modules, name)  # load from the file, not from sys.modules
    start = time.perf_counter()
    again = build_module(crate, name)
    seconds = time.perf_counter() - start
    print(f"cache hit: {seconds * 1000:.1f} ms")
    assert again.add(1, 2) == 3
    assert seconds < 0.5
    # The crate is not needed for a hit at all.
    assert build_module(crate.parent / "gone", name).add(1, 1) == 2


@needs_toolchain
def test_compile_error_names_the_log_and_quotes_the_error(session_cache, tmp_path,
                                                          monkeypatch):
    name = f"fg_broken_{SESSION}"
    broken = LIB_RS.replace("a + b\n", 'a + "not a number"\n', 1)
    write_crate(tmp_path, name, broken)
    monkeypatch.chdir(tmp_path)  # and a relative crate path works
    with pytest.raises(BuildError) as info:
        build_module(Path(name), name, quiet=True)
    message = str(info.value)
    log = session_cache / "logs" / f"{name}.log"
    assert info.value.log_path == log
    assert f"full log: {log}" in message
    assert "error[E0277]: cannot add `&str` to `f64`" in message
    assert "src/lib.rs" in message  # the quoted block includes the location
    assert "Compiling" in log.read_text()
    assert not module_path(name).exists()  # nothing half-built is left to load
    assert isinstance(info.value, BackendError)


@needs_toolchain
def test_concurrent_builds_of_one_module_both_succeed(session_cache, tmp_path, built):
    # `built` first, so that the dependencies are compiled and this test times
    # only the model crate.
    name = f"fg_twice_{SESSION}"
    crate = write_crate(tmp_path, name)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from ferrograd.codegen.build import build_module
        module = build_module(Path({str(crate)!r}), {name!r})
        print("result", module.add(20, 22))
    """)
    env = dict(os.environ)  # carries the session's FERROGRAD_CACHE and CARGO_TARGET_DIR
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "result 42" in out
    assert module_path(name).is_file()
    leftovers = [p.name for p in module_path(name).parent.iterdir() if p != module_path(name)]
    assert leftovers == []  # no temporary files or wheels left behind
