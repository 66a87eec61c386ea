"""The one exception hierarchy. Every error a user can cause is a FerrogradError.

Errors raised while tracing carry the user's file:line (``src``) so the message
points at the model code, not at ferrograd's internals.
"""

from __future__ import annotations


class FerrogradError(Exception):
    """Base class of every error ferrograd raises on purpose."""

    def __init__(self, message: str, src: str | None = None) -> None:
        self.src = src
        super().__init__(f"{src}: {message}" if src else message)


class TraceError(FerrogradError):
    """The model function cannot be traced into a static graph."""


class ShapeError(FerrogradError):
    """Operand shapes do not fit the op."""


class DTypeError(FerrogradError):
    """Operand dtypes do not fit the op."""


class InputError(FerrogradError):
    """A compiled step was called with a missing or ill-shaped input."""


class CheckpointError(FerrogradError):
    """A checkpoint or a set of parameters does not match the model."""


class GradCheckError(FerrogradError):
    """Analytic gradients disagree with finite differences."""


class BackendError(FerrogradError):
    """A backend is unknown, unavailable on this machine, or failed."""


class IRError(FerrogradError):
    """The IR broke one of its invariants (a bug in ferrograd or in a pass)."""
