"""Checkpoints that are never half-written and load safely.

- ``save_atomic``: write to a temporary file in the same folder, flush + fsync, then
  ``os.replace`` onto the target (atomic on POSIX): a crash while saving leaves the previous good
  checkpoint in place.
- ``load_checkpoint``: ``torch.load(weights_only=True)`` only, so a pickle that tries to run code
  is refused; a truncated or corrupt file gives an error that names it.
- ``load_state_checked``: loads a state dict and lists the differing keys and shapes when a
  checkpoint comes from another preset or class count.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_atomic(obj, path: str | Path, before_replace=None) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename).

    ``before_replace``: called once the temporary file is complete, just before the rename (the
    runner's fault-injection hook pauses there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}") from e
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, code-executing pickle ...
        raise CheckpointError(
            f"could not load checkpoint {path}: it is truncated, corrupt, or not a confeti "
            f"checkpoint (only tensors and plain containers are accepted). Cause: {e}"
        ) from e


def load_state_checked(module: nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with a readable list of mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        lines = [
            f"the checkpoint's {what} does not fit this model (another preset or class count?)"
        ]
        if shapes:
            lines.append("shape mismatches:\n  " + "\n  ".join(shapes[:20]))
        if missing:
            lines.append(f"missing keys: {missing[:20]}")
        if unexpected:
            lines.append(f"unexpected keys: {unexpected[:20]}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state)
