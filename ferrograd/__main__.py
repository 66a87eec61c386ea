"""Command line: ``python -m ferrograd inspect path/to/file.py:model --dim B=32``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import __version__, optim
from .codegen.lower import KNOWN_BACKENDS, lower
from .dsl.model import Model
from .ir.errors import FerrogradError
from .ir.printing import to_dot

OPTIMIZERS = {"none": None, "sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW,
              "rmsprop": optim.RMSprop}


def load_model(target: str) -> Model:
    """``path/to/file.py:name`` -> the @fg.model object ``name`` defined in that file."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise SystemExit(f"expected path/to/file.py:model_name, got {target!r}")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"no such file: {file}")
    spec = importlib.util.spec_from_file_location(f"_ferrograd_cli_{file.stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent.resolve()))
    spec.loader.exec_module(module)
    found = getattr(module, name, None)
    if not isinstance(found, Model):
        models = sorted(k for k, v in vars(module).items() if isinstance(v, Model))
        raise SystemExit(f"{file} has no @fg.model called {name!r} at module level "
                         f"(found: {', '.join(models) or 'none'})")
    return found


def _dims(pairs: list[str]) -> dict[str, int]:
    dims = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--dim takes NAME=INT, got {pair!r}")
        dims[key] = int(value)
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrograd",
                                     description="ferrograd " + __version__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print a model's training graph")
    inspect.add_argument("target", help="path/to/file.py:model_name")
    inspect.add_argument("--backend", default="numpy", choices=KNOWN_BACKENDS)
    inspect.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                         help="bind a symbolic dim, e.g. --dim B=32 (repeatable)")
    inspect.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS))
    inspect.add_argument("--lr", type=float, default=1e-2)
    inspect.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)

    if args.command == "version":
        print(__version__)
        return 0
    try:
        model = load_model(args.target)
        opt_cls = OPTIMIZERS[args.optimizer]
        lowered = lower(model, optimizer=opt_cls(lr=args.lr) if opt_cls else None,
                        backend=args.backend, **_dims(args.dim))
        print(lowered.summary())
        if args.backend != "numpy":
            print()
            print(lowered.schedule_report())
        print()
        print(lowered.source(args.backend))
        if args.dot:
            Path(args.dot).write_text(to_dot(lowered.graph) + "\n")
    except FerrogradError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
