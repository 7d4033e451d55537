"""Graceful stops: SIGTERM or Ctrl+C save a checkpoint at the next step boundary and mark the run KILLED."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class GracefulStop(Callback):
    """Turn SIGTERM and the first Ctrl+C into a clean stop that loses no finished step.

    Lightning already stops at the next batch boundary on SIGTERM; Ctrl+C would interrupt anywhere
    (even between ``optimizer.step()`` and the scheduler), so the first SIGINT here only sets a flag
    and the stop happens after the step in flight. A second Ctrl+C interrupts at once, writing no
    checkpoint (the last one written stays). On a clean stop the callback writes ``last.ckpt`` next to
    the run's ModelCheckpoint files (or ``dirpath``); either way it ends the MLflow run as KILLED, so
    ``--ckpt_path=last`` resumes it. On several processes all stop at the same step boundary.

    Args:
        dirpath: where to write the checkpoint when no ModelCheckpoint callback gives a folder.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.interrupted = False
        self._at_boundary = False  # our own KeyboardInterrupt, raised between two steps
        self._previous = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _on_sigint(self, signum, frame) -> None:
        rank_zero_info("\nCtrl+C: stopping after the current step (press again to stop at once)")
        self.interrupted = True
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size > 1:
            # A Ctrl+C can reach the processes on either side of a step boundary. One that stopped alone
            # would leave the others waiting in the next step's collectives (and save no shard of its own):
            # all stop, and save, at the first boundary where any of them was interrupted.
            self.interrupted = trainer.strategy.reduce_boolean_decision(self.interrupted, all=False)
        if self.interrupted:
            self._at_boundary = True
            raise KeyboardInterrupt

    def checkpoint_path(self, trainer: pl.Trainer) -> Path | None:
        """``<ModelCheckpoint dirpath>/last.ckpt``, else ``<dirpath>/last.ckpt``, else None."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(self.dirpath) / "last.ckpt" if self.dirpath else None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        path = self.checkpoint_path(trainer)
        at_boundary = self._at_boundary or isinstance(exception, SIGTERMException)
        if path is not None and trainer.state.fn == "fit" and at_boundary:
            # Only at a step boundary (SIGTERM, or our deferred Ctrl+C) is the state consistent to save;
            # a second Ctrl+C lands anywhere (even between optimizer.step() and the scheduler's).
            trainer.save_checkpoint(path)
            rank_zero_info(f"saved {path}; resume with --ckpt_path=last")
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                logger.finalize("KILLED")
                logger.finalize = _already_final  # Lightning calls finalize("failed") right after


def _already_final(status: str = "success") -> None:
    """Stand-in for a logger's finalize once the run's status has been set."""
