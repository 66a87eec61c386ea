"""The op table: every op defined once (see base.OpDef)."""

from __future__ import annotations

from . import elementwise, structured  # noqa: F401  (registers the ops)
from .base import OPS, OpDef, register
from .elementwise import derivative


def lookup(name: str) -> OpDef | None:
    """The op called ``name``, registering derivative ops (``gelu.d0.d0``) on demand."""
    if name in OPS:
        return OPS[name]
    base, _, last = name.rpartition(".")
    if not base or not last.startswith("d") or not last[1:].isdigit():
        return None
    parent = lookup(base)
    if parent is None or parent.kind != "elementwise" or parent.expr is None:
        return None
    derivative(parent, int(last[1:]))
    return OPS.get(name)


def op_def(name: str) -> OpDef:
    """The op called ``name``; an IRError if there is none."""
    opdef = lookup(name)
    if opdef is None:
        from ..errors import IRError

        raise IRError(f"unknown op {name!r}")
    return opdef


__all__ = ["OPS", "OpDef", "lookup", "op_def", "register"]
