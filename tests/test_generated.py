"""The crates committed under generated/ are exactly what the compiler emits today
(codegen is deterministic), and they pass rustfmt and clippy with warnings denied."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
CRATES = sorted(p.name for p in GENERATED.iterdir() if (p / "Cargo.toml").exists())

needs_rust = pytest.mark.skipif(shutil.which("cargo") is None or shutil.which("rustfmt") is None,
                                reason="needs cargo and rustfmt")


@needs_rust
def test_committed_crates_are_up_to_date() -> None:
    res = subprocess.run([sys.executable, str(GENERATED / "regenerate.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_example_has_a_committed_crate() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from catalog import MODELS

    assert sorted(MODELS) == CRATES


@needs_rust
@pytest.mark.parametrize("crate", CRATES)
def test_generated_crate_is_clean(crate: str) -> None:
    cwd = GENERATED / crate
    fmt = subprocess.run(["cargo", "fmt", "--check"], cwd=cwd, capture_output=True,
                         text=True, check=False)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    cache = Path(os.environ.get("FERROGRAD_CACHE", Path.home() / ".cache" / "ferrograd"))
    env = {**os.environ, "CARGO_TARGET_DIR": str(cache / "target-check")}
    clippy = subprocess.run(["cargo", "clippy", "--release", "--quiet", "--", "-D", "warnings"],
                            cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert clippy.returncode == 0, clippy.stderr[-4000:]
