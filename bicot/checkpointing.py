"""Checkpoints that survive crashes: atomic writes, weights-only loads, and what a resume must match."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run whose model does not match this one."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, flushes it to disk, then renames it into place.

    A process killed while saving leaves the previous checkpoint intact: a rename is atomic on POSIX,
    so a reader sees either the old file or the complete new one. Loads use ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        # Make the rename itself durable.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``bicot`` section of a checkpoint (run id, model fingerprint), read with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: say which and why
        raise CheckpointMismatchError(f"{str(path)!r} is not a readable bicot checkpoint: {err}") from err
    return checkpoint.get("bicot", {})


def model_fingerprint(named_shapes: list[tuple[str, tuple[int, ...]]], source: str | None) -> str:
    """A short hash of the trainable parameters' names and shapes and where the model came from."""
    text = repr((source, sorted(named_shapes)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
