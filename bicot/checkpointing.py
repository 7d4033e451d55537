"""Checkpoints that survive crashes: atomic writes, weights-only loads, and what a resume must match."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
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

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
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
        fsync_path(path.parent)  # make the rename itself durable

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


DISTRIBUTED_META = "meta.pt"
"""the file of a distributed (FSDP2) checkpoint folder that holds everything but the tensors (Lightning's name)."""


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a checkpoint, file or distributed folder."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def previous_version(path: str | Path) -> Path:
    """Where :func:`swap_into_place` keeps the checkpoint it replaces until the new one is in place."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def swap_into_place(written: Path, path: Path) -> None:
    """Move a completely written checkpoint (file or distributed folder) to ``path``, replacing what is there.

    A folder cannot be renamed over another, so the old checkpoint is first renamed aside
    (:func:`previous_version`) and deleted only once the new one is in place: a crash at any point leaves
    either the old or the new checkpoint complete, and :func:`recover_checkpoint` puts the old one back.
    """
    for item in [written, *(written.rglob("*") if written.is_dir() else [])]:
        if item.is_file():
            fsync_path(item)
    old = previous_version(path)
    if old.exists():  # a leftover of an earlier crash after the new checkpoint was in place
        remove_path(old)
    if path.exists():
        os.replace(path, old)
    os.replace(written, path)
    fsync_path(path.parent)
    if old.exists():
        remove_path(old)


def recover_checkpoint(path: str | Path) -> None:
    """Put back the checkpoint that a crash inside :func:`swap_into_place` left renamed aside."""
    path, old = Path(path), previous_version(path)
    if not path.exists() and old.exists():
        os.replace(old, path)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``bicot`` section of a checkpoint (run id, model fingerprint), read with ``weights_only``, with
    ``trained``: the names of the weights the file holds, where it holds them (not a distributed checkpoint).

    ``path`` is a checkpoint file or a distributed checkpoint folder (its ``meta.pt``)."""
    path = Path(path)
    folder = path.is_dir()
    if folder:
        if not (path / DISTRIBUTED_META).is_file():
            raise CheckpointMismatchError(
                f"{str(path)!r} is a folder but not a distributed checkpoint (no {DISTRIBUTED_META} in it)"
            )
        path = path / DISTRIBUTED_META
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if not zipfile.is_zipfile(path):  # torch.load's own reason would be about mmap or zip internals
        raise CheckpointMismatchError(
            f"{str(path)!r} is not a readable bicot checkpoint: not a complete checkpoint file (torch.save writes a "
            "zip archive; this file is another kind, or was cut short mid-write or mid-copy)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: say which and why
        reason = " ".join(str(err).split())
        raise CheckpointMismatchError(f"{str(path)!r} is not a readable bicot checkpoint: {reason}") from err
    if not isinstance(checkpoint, dict) or not (folder or "pytorch-lightning_version" in checkpoint):
        raise CheckpointMismatchError(
            f"{str(path)!r} is not a Lightning checkpoint (a file `torch.save` wrote, without Lightning's "
            "entries); give a checkpoint a bicot run wrote (ModelCheckpoint's *.ckpt)"
        )
    meta = dict(checkpoint.get("bicot", {}))
    if meta and isinstance(checkpoint.get("state_dict"), dict):
        meta["trained"] = sorted(checkpoint["state_dict"])  # the names only (bicot saves trained weights alone)
    return meta


def model_fingerprint(named_shapes: list[tuple[str, tuple[int, ...]]], source: str | None) -> str:
    """A short hash of the trainable parameters' names and shapes and where the model came from."""
    text = repr((source, sorted(named_shapes)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
