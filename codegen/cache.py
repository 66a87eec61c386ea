"""The build cache's index: which built module a lowering resolves to.

``<cache>/index`` holds one small file per key, written atomically (a temporary
file in the same folder, fsynced, renamed into place). An entry that cannot be
read, does not parse or does not fit the model is a miss, never an error.

- ``<load key>.json``: the model as traced (its forward graph, before autodiff)
  and everything else that decides the generated code — optimizer config, dims,
  backends, profiling, the CPU level, ferrograd's version and the fingerprints of
  its compiler (the ``ir``, ``dsl`` and ``codegen`` sources and templates) and of
  the runtime crate. It names the module and stores the step's ``Interface``
  (optimizer state, grads, updates), so a hit loads the module right after
  tracing: no autodiff, passes, scheduling or rendering (a "cached load"). Params
  are not stored; a step initializes them from the seed, on a hit as on a miss.
- ``<build key>.txt``: the training graph (after passes) and the same options ->
  the module name, found after lowering: a model edited in a way that lowers to
  the same training graph reuses its module without rendering it again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ferrograd._version import __version__
from ferrograd.ir.graph import Graph
from ferrograd.ir.optim import Optimizer
from ferrograd.ir.serialize import fingerprint

from .build import cache_dir, module_path, runtime_fingerprint
from .files import atomic_write
from .interface import Interface

FORMAT = 1  # of load entries; a new layout is a new key, never a misread entry
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.cache
def compiler_digest() -> str:
    """A digest of the compiler itself — the Python and templates of ``ir``, ``dsl``
    and ``codegen`` (the runtime crate has ``runtime_fingerprint``): a changed
    ferrograd never reuses a module indexed by another."""
    import ferrograd.dsl
    import ferrograd.ir

    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for root in (Path(ferrograd.ir.__file__).parent, Path(ferrograd.dsl.__file__).parent, here):
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.j2")]):
            if "runtime" not in path.relative_to(root).parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _digest(parts: dict[str, Any]) -> str:
    common = {"version": __version__, "runtime": runtime_fingerprint(),
              "compiler": compiler_digest()}
    text = json.dumps({**parts, **common}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_key(kind: str, traced: Graph, optimizer: Optimizer | None, dims: dict[str, int],
             backends: tuple[str, ...], profile: bool, level: str) -> str | None:
    """The key of a model as traced with these options; None when the traced graph and
    the optimizer's config do not determine the build (an optimizer defined outside
    ferrograd: its update rule is code no config shows)."""
    if optimizer is not None and type(optimizer).__module__ != Optimizer.__module__:
        return None
    try:
        return _digest({"entry": "load", "format": FORMAT, "kind": kind, "level": level,
                        "graph": fingerprint(traced),
                        "dims": {k: int(v) for k, v in dims.items()},
                        "optimizer": None if optimizer is None else optimizer.config(),
                        "backends": list(backends), "profile": profile})
    except (TypeError, ValueError):  # a config JSON cannot hold
        return None


def build_key(kind: str, graph: Graph, backends: tuple[str, ...], profile: bool,
              level: str) -> str:
    """The key of a training graph (after passes) with these options."""
    return _digest({"entry": "build", "kind": kind, "level": level,
                    "graph": fingerprint(graph), "backends": list(backends),
                    "profile": profile})


def read_load_entry(key: str, traced: Graph) -> tuple[str, Interface] | None:
    """(module name, step interface) of a built module for ``key``, or None."""
    try:
        data = json.loads((cache_dir() / "index" / f"{key}.json").read_text())
        if data["format"] != FORMAT:
            return None
        name = _built(data["module"])
        return None if name is None else (name, Interface.from_json(traced, data["interface"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_load_entry(key: str, module: str, interface: Interface) -> None:
    text = json.dumps({"format": FORMAT, "module": module, "interface": interface.to_json()},
                      separators=(",", ":"))
    write_atomic(cache_dir() / "index" / f"{key}.json", text + "\n")


def read_build_entry(key: str) -> str | None:
    """The name of a built module for ``key``, or None."""
    try:
        return _built((cache_dir() / "index" / f"{key}.txt").read_text().strip())
    except (OSError, ValueError):
        return None


def write_build_entry(key: str, module: str) -> None:
    write_atomic(cache_dir() / "index" / f"{key}.txt", module + "\n")


def _built(name: Any) -> str | None:
    """``name`` if it names a module that is built, else None."""
    if isinstance(name, str) and _NAME.fullmatch(name) and module_path(name).is_file():
        return name
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_write(path) as f:
        f.write(text.encode())
