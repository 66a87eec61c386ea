"""Running maturin on a rendered crate: the half of ``build.py`` that only a build needs.

``build_crate`` runs ``maturin build --release`` (through ``python -m maturin`` when
the package is installed, else the ``maturin`` executable) with the shared
``CARGO_TARGET_DIR``, streams cargo's output to the build's log (and a one-line
progress report to stderr for a build slower than ``PROGRESS_AFTER_S``), and
extracts the extension from the wheel into the cache. ``build.build_module`` imports
this module only when a module is not cached, so a process that loads cached modules
never pays for subprocess, threads and zipfile.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import IO

from ferrograd.ir.errors import BackendError

from .build import RUNTIME_DIR, BuildError, cache_dir, target_dir
from .files import atomic_write

# Builds slower than this show progress on stderr (unless quiet).
PROGRESS_AFTER_S = 1.5

_COMPILING = re.compile(r"^\s*Compiling (\S+) (v\S+)")
_ERROR = re.compile(r"^error(\[E\d+\])?:")


def build_crate(crate_dir: Path, name: str, dest: Path, quiet: bool,
                rustc_flags: tuple[str, ...]) -> None:
    """Build the crate in ``crate_dir`` with maturin and put its extension module at
    ``dest`` (atomically); the caller holds ``name``'s build lock."""
    manifest = crate_dir / "Cargo.toml"
    if not manifest.is_file():
        raise BuildError(f"cannot build {name}: {manifest} does not exist")
    maturin, env = _toolchain()
    _seed_lockfile(crate_dir)
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dest.parent) as out:
        cmd = [*maturin, "build", "--release", "--manifest-path", str(manifest),
               "--out", out, "--interpreter", sys.executable, "--auditwheel", "skip",
               "--color", "never"]
        if rustc_flags:
            cmd += ["--", *rustc_flags]
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}\n(cwd {crate_dir}, CARGO_TARGET_DIR "
                      f"{env['CARGO_TARGET_DIR']})\n\n")
            log.flush()
            code = _run(cmd, crate_dir, env, log, name, quiet)
        if code != 0:
            raise BuildError(_failure_message(name, code, log_path), log_path)
        wheels = sorted(Path(out).glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"building {name}: maturin made {len(wheels)} wheels in {out}, "
                             f"expected one; full log: {log_path}", log_path)
        _extract(wheels[0], name, dest, log_path)


def _toolchain() -> tuple[list[str], dict[str, str]]:
    """The maturin command, and the environment to run it in."""
    env = dict(os.environ)
    cargo = shutil.which("cargo")
    if cargo is None:
        # rustup installs into ~/.cargo/bin, which a non-login shell may lack.
        home_cargo = Path.home() / ".cargo" / "bin" / "cargo"
        if not home_cargo.is_file():
            raise BackendError(
                "the cpu backend builds a Rust extension module and needs cargo, which "
                "is not on PATH. Install the Rust toolchain with rustup "
                "(https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf "
                "https://sh.rustup.rs | sh), then `pip install maturin`.")
        env["PATH"] = f"{home_cargo.parent}{os.pathsep}{env.get('PATH', '')}"
    # The maturin binary beside this interpreter, else on PATH, else `python -m maturin`
    # (which cannot find its binary in a venv made with --system-site-packages).
    beside = Path(sys.executable).parent / "maturin"
    if beside.is_file():
        maturin = [str(beside)]
    elif (exe := shutil.which("maturin")) is not None:
        maturin = [exe]
    elif importlib.util.find_spec("maturin") is not None:
        maturin = [sys.executable, "-m", "maturin"]
    else:
        raise BackendError(
            "the cpu backend builds a Rust extension module with maturin, which is not "
            "installed: `pip install maturin` (cargo is there already).")
    env["CARGO_TARGET_DIR"] = str(target_dir())
    env["CARGO_TERM_COLOR"] = "never"
    env["CARGO_TERM_PROGRESS_WHEN"] = "never"
    return maturin, env


def _seed_lockfile(crate_dir: Path) -> None:
    """Start a new crate from the runtime's Cargo.lock: every model then resolves to
    the same dependency versions (compiled once in the shared target folder), and a
    build needs the network only when a dependency is not downloaded yet."""
    lock, seed = crate_dir / "Cargo.lock", RUNTIME_DIR / "Cargo.lock"
    if not lock.exists() and seed.is_file():
        shutil.copyfile(seed, lock)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: IO[str], name: str,
         quiet: bool) -> int:
    """Run the build, copying its output to ``log`` and showing progress on stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace", bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    progress = _Progress(name, quiet)
    try:
        while True:
            try:
                line = lines.get(timeout=0.25)
            except queue.Empty:
                progress.tick()
                continue
            if line is None:
                break
            log.write(line)
            log.flush()
            progress.line(line)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): do not leave cargo running
            proc.kill()
    reader.join()
    code = proc.wait()
    progress.done(code == 0)
    return code


class _Progress:
    """One stderr line per crate cargo compiles, once the build has run ~1.5 s."""

    def __init__(self, name: str, quiet: bool) -> None:
        self.name, self.quiet = name, quiet
        self.start = time.monotonic()
        self.count = 0
        self.stage = "starting cargo"
        self.shown: str | None = None

    def line(self, text: str) -> None:
        if m := _COMPILING.match(text):
            self.count += 1
            self.stage = f"compiling {m.group(1)} {m.group(2)} ({self.count})"
        elif text.lstrip().startswith("Blocking waiting for file lock"):
            self.stage = "waiting for another cargo build in the shared target folder"
        elif text.lstrip().startswith("Finished"):
            self.stage = "packaging the module"
        self.tick()

    def tick(self) -> None:
        elapsed = time.monotonic() - self.start
        if self.quiet or elapsed < PROGRESS_AFTER_S or self.shown == self.stage:
            return
        self.shown = self.stage
        print(f"ferrograd: building {self.name} — {self.stage} [{elapsed:.0f} s]",
              file=sys.stderr, flush=True)

    def done(self, ok: bool) -> None:
        if self.shown is not None:
            elapsed = time.monotonic() - self.start
            what = "built" if ok else "failed to build"
            print(f"ferrograd: {what} {self.name} in {elapsed:.1f} s", file=sys.stderr,
                  flush=True)


def _failure_message(name: str, code: int, log_path: Path) -> str:
    text = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    block: list[str] = []
    for i, line in enumerate(text):
        if _ERROR.match(line):
            block = [line]
            for more in text[i + 1:]:
                if not more.strip() or _ERROR.match(more) or more.startswith("warning"):
                    break
                block.append(more)
            break
    if not block:  # no rustc error: maturin's or cargo's own complaint, at the end
        block = [line for line in text if line.strip()][-15:]
    if len(block) > 40:
        block = [*block[:40], "    ..."]
    total = re.search(r"due to (\d+) previous errors", "\n".join(text))
    if total:
        block.append(f"({total.group(1)} errors in all: see the log)")
    quoted = "\n".join(f"    {line}" for line in block)
    return (f"building {name} failed (maturin exited with {code}); full log: {log_path}\n"
            f"{quoted}")


def _extract(wheel: Path, name: str, dest: Path, log_path: Path) -> None:
    """Copy the extension out of the wheel to ``dest``, atomically."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == dest.name]
        if len(members) != 1:
            found = [m for m in zf.namelist() if not m.endswith((".py", ".json", "RECORD",
                                                                 "METADATA", "WHEEL"))]
            raise BuildError(
                f"building {name}: the wheel has no module {dest.name} (it has "
                f"{', '.join(found) or 'nothing'}); the crate's [lib] name must be "
                f"{name!r}. Full log: {log_path}", log_path)
        with atomic_write(dest, mode=0o755) as f, zf.open(members[0]) as src:
            shutil.copyfileobj(src, f)
