"""Checkpoints in safetensors format: params by name, optimizer state under ``optim.``.

Writes are atomic: the file is written beside the target, flushed to disk, then
renamed over it, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ferrograd.ir.errors import CheckpointError

from .files import atomic_write

STATE_PREFIX = "optim."


def write_checkpoint(path: str | os.PathLike[str], params: dict[str, np.ndarray],
                     state: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    from safetensors.numpy import save as save_bytes  # here: training without it loads less

    tensors = {**params, **{STATE_PREFIX + k: v for k, v in state.items()}}
    data = save_bytes({k: np.array(v, order="C") for k, v in tensors.items()},
                      metadata={k: json.dumps(v) for k, v in metadata.items()})
    with atomic_write(Path(path)) as f:
        f.write(data)


def read_checkpoint(path: str | os.PathLike[str]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(params, optimizer state, metadata) stored in ``path``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            raw_meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    params = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return params, state, meta
