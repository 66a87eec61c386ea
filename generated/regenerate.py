"""Regenerate the crates of the example models committed in this folder.

    python generated/regenerate.py          # rewrite generated/<example>/
    python generated/regenerate.py --check  # exit 1 if anything would change

Only sources are committed (Cargo.toml, pyproject.toml, src/), plus the model's
PTX under ptx/ (what the cuda backend's step loads) and its WebGPU shaders and
manifest under wgsl/ (the wgsl backend's crate is the same shaders with a thin
lib.rs); builds go to the user cache. The folders have
stable names so that a change to the code generator shows up as a reviewable
diff; each crate's module name carries the content hash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from catalog import MODELS, lowered  # noqa: E402

from ferrograd.codegen.backends.cpu import render_crate  # noqa: E402
from ferrograd.codegen.backends.wgsl_crate import render_wgsl_crate  # noqa: E402

WGSL_FILES = ("manifest.json", "README.md", "src/consts.bin")


def _build_output(rel: Path) -> bool:
    """Files a build leaves beside the sources (ignored by git, not compared)."""
    return rel.name == "Cargo.lock" or rel.parts[0] == "target"


def render(name: str) -> dict[str, bytes]:
    low = lowered(name)
    # The level of the machine class ferrograd is developed on, whatever this one has.
    crate = render_crate(low.graph, low.schedules, low.memory_plan, HERE / name,
                         cpu_level="v3")
    wgsl = render_wgsl_crate(low.graph, low.wgsl, HERE / name / "wgsl").files
    ptx = {"ptx/kernels.ptx": low.source("ptx").encode()}  # what the CUDA step JITs
    return {**crate.files, **ptx, **{f"wgsl/{rel}": data for rel, data in wgsl.items()
                                     if rel.startswith("shaders/") or rel in WGSL_FILES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare")
    args = parser.parse_args(argv)
    stale = []
    for name in MODELS:
        files = render(name)
        folder = HERE / name
        on_disk = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                   if p.is_file() and not _build_output(p.relative_to(folder))
                   } if folder.exists() else {}
        if on_disk != files:
            stale.append(name)
            if not args.check:
                for rel in on_disk.keys() - files.keys():
                    (folder / rel).unlink()
                for rel, data in files.items():
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    (folder / rel).write_bytes(data)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python generated/regenerate.py)")
        return 1
    print(("would update: " if args.check else "updated: ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
