"""The runtime crate (codegen/runtime): `cargo test --release`, rustfmt and clippy.

The Rust tests compare GEMM, conv and gather with naive loops, and check the
arena, the error conversions and the NumPy helpers (in an embedded Python).

They build in their own folder of the shared target directory: cargo test links
pyo3 against libpython while maturin builds modules without it, and sharing one
build of pyo3 between the two would rebuild pyo3 and its dependents at every
switch.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ferrograd.codegen.build import RUNTIME_DIR, target_dir

pytestmark = pytest.mark.skipif(
    shutil.which("cargo") is None,
    reason="cargo (the Rust toolchain) is not installed: see https://rustup.rs")


def _cargo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["CARGO_TARGET_DIR"] = str(target_dir() / "runtime-tests")
    env["CARGO_TERM_COLOR"] = "never"
    # The test binary embeds Python: make it this interpreter, with this
    # environment's packages (numpy) importable, and fail rather than skip the
    # NumPy tests when they are not.
    env["PYO3_PYTHON"] = sys.executable
    env["FERROGRAD_REQUIRE_NUMPY"] = "1"
    paths = [str(Path(np.__file__).resolve().parent.parent), *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        var = "DYLD_FALLBACK_LIBRARY_PATH" if sys.platform == "darwin" else "LD_LIBRARY_PATH"
        env[var] = os.pathsep.join(p for p in (libdir, env.get(var)) if p)
    return subprocess.run(["cargo", *args], cwd=RUNTIME_DIR, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tail(res: subprocess.CompletedProcess[str], lines: int = 80) -> str:
    return "\n".join((res.stdout + res.stderr).splitlines()[-lines:])


def test_cargo_test_release():
    res = _cargo("test", "--release")
    assert res.returncode == 0, _tail(res)
    assert "test result: ok" in res.stdout


def test_rustfmt_clean():
    if shutil.which("rustfmt") is None and shutil.which("cargo-fmt") is None:
        pytest.skip("rustfmt is not installed (rustup component add rustfmt)")
    res = _cargo("fmt", "--check")
    assert res.returncode == 0, _tail(res)


@pytest.mark.slow
def test_clippy_clean():
    if subprocess.run(["cargo", "clippy", "--version"], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("clippy is not installed (rustup component add clippy)")
    res = _cargo("clippy", "--release", "--all-targets", "--", "-D", "warnings")
    assert res.returncode == 0, _tail(res)
