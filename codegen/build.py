"""Build a rendered model crate into a Python extension module, and cache it.

``build_module(crate_dir, name)`` runs ``maturin build --release`` on the crate
(``maturin.py``), takes the extension (``<name>.abi3.so``) out of the wheel and keeps
it in the user cache, then loads it. The name is a content hash chosen by the caller, so
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
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

from ferrograd.ir.errors import BackendError

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

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    # Only a build needs maturin.py (and its subprocess, threads and zipfile): a
    # process that loads cached modules never imports it.
    from .maturin import build_crate

    with _lock(module_name, quiet):
        if not path.is_file():  # another process may have built it while we waited
            build_crate(Path(crate_dir).absolute(), module_name, path, quiet, rustc_flags)
    return _load(module_name, path)


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
