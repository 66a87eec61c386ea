"""Build a rendered model crate into a Python extension module, and cache it.

``build_module(crate_dir, name)`` runs ``maturin build --release`` on the crate,
takes the extension (``<name>.abi3.so``) out of the wheel and keeps it in the
user cache, then loads it. The name is a content hash chosen by the caller, so
a module file that exists is the right one: later calls, in this process or
any other, load it in milliseconds without running cargo.

The cache (``FERROGRAD_CACHE``, default ``~/.cache/ferrograd``)::

    target/                 CARGO_TARGET_DIR shared by every build, so the
                            dependencies (pyo3, numpy, rayon, gemm, the runtime)
                            compile once (``CARGO_TARGET_DIR`` overrides it)
    modules/<name>/<name>.abi3.so   built modules
    logs/<name>.log         the full maturin/cargo output of the last build
    locks/<name>.lock       held while <name> builds

Builds are atomic: the module is written under a temporary name in its final
folder and renamed into place, and a file lock makes a second process that
wants the same module wait for the first and then load its result.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
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
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

from ferrograd.ir.errors import BackendError

from .files import atomic_write

__all__ = [
    "RUNTIME_DIR",
    "BuildError",
    "build_module",
    "cache_dir",
    "module_path",
    "runtime_fingerprint",
    "target_dir",
]

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
"""The runtime crate that generated crates depend on (``path = ...``)."""

# Builds slower than this show progress on stderr (unless quiet).
PROGRESS_AFTER_S = 1.5

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMPILING = re.compile(r"^\s*Compiling (\S+) (v\S+)")
_ERROR = re.compile(r"^error(\[E\d+\])?:")


class BuildError(BackendError):
    """Building a generated crate failed; ``log_path`` has the full output."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        self.log_path = log_path
        super().__init__(message)


def cache_dir() -> Path:
    """ferrograd's cache: ``$FERROGRAD_CACHE``, or ``~/.cache/ferrograd``."""
    env = os.environ.get("FERROGRAD_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "ferrograd"
    return path.absolute()  # cargo runs in the crate's folder


def target_dir() -> Path:
    """The cargo target folder every build shares: ``$CARGO_TARGET_DIR`` when set,
    else ``<cache>/target``."""
    env = os.environ.get("CARGO_TARGET_DIR")
    return Path(env).expanduser().absolute() if env else cache_dir() / "target"


def module_path(module_name: str) -> Path:
    """Where the built module ``module_name`` lives (whether or not it exists yet)."""
    return cache_dir() / "modules" / module_name / f"{module_name}{_suffix()}"


def runtime_fingerprint() -> str:
    """A hash of the runtime crate's sources (Cargo.toml, Cargo.lock, src/), for
    callers that fold it into module names so that a changed runtime gives new
    modules."""
    digest = hashlib.sha256()
    files = [RUNTIME_DIR / "Cargo.toml", RUNTIME_DIR / "Cargo.lock",
             *sorted((RUNTIME_DIR / "src").rglob("*.rs"))]
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(RUNTIME_DIR).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_module(crate_dir: Path, module_name: str, *, quiet: bool = False,
                 rustc_flags: tuple[str, ...] = ()) -> ModuleType:
    """Build the crate in ``crate_dir`` (if its module is not cached yet) and load it.

    ``module_name`` must be the crate's ``[lib] name``; the module is imported
    under that name (and put in ``sys.modules``). Progress goes to stderr for a
    build that takes more than ~1.5 s, unless ``quiet``. ``rustc_flags`` compile the
    crate itself (not its dependencies), e.g. for an x86-64 level (``cpu_level.py``).

    Raises ``BackendError`` when cargo or maturin is missing, and ``BuildError``
    (a ``BackendError``) when the build fails; its message names the log file and
    quotes the compiler's first error.
    """
    if not _NAME.fullmatch(module_name):
        raise BackendError(f"{module_name!r} is not a valid Python module name")
    path = module_path(module_name)
    if path.is_file():
        return _load(module_name, path)
    with _lock(module_name, quiet):
        if not path.is_file():  # another process may have built it while we waited
            _build(Path(crate_dir).absolute(), module_name, path, quiet, rustc_flags)
    return _load(module_name, path)


# ---- building --------------------------------------------------------------------------


def _build(crate_dir: Path, name: str, dest: Path, quiet: bool,
           rustc_flags: tuple[str, ...]) -> None:
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


# ---- loading and locking ---------------------------------------------------------------


def _suffix() -> str:
    """The file suffix of a stable-ABI extension on this platform."""
    if sys.platform == "win32":
        return ".pyd"
    return ".abi3.so"


def _load(name: str, path: Path) -> ModuleType:
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")) == path:
        return loaded
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise BackendError(f"cannot load {path}")
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as err:
        raise BackendError(f"cannot load the built module {path}: {err}; delete it to "
                           f"rebuild") from err
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def _lock(name: str, quiet: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache>/locks/<name>.lock`` (blocking)."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+b") as f:
        if not _try_lock(f):
            if not quiet:
                print(f"ferrograd: waiting for another process that is building {name}",
                      file=sys.stderr, flush=True)
            _wait_lock(f)
        try:
            yield
        finally:
            _unlock(f)


if sys.platform == "win32":
    import msvcrt

    def _try_lock(f: IO[bytes]) -> bool:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _wait_lock(f: IO[bytes]) -> None:
        while not _try_lock(f):
            time.sleep(0.2)

    def _unlock(f: IO[bytes]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(f: IO[bytes]) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait_lock(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def _unlock(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
