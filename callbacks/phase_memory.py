"""PhaseMemory: peak GPU memory of each phase of a step (rollout, score, update), reset per phase."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities.rank_zero import rank_zero_info

GIB = 2**30


def phase_with_memory(
    original: Callable, device: Callable[[], torch.device], peaks: dict[str, int]
) -> Callable:
    """Wrap a ``_phase(name, times)`` context manager so it also records the phase's peak memory.

    Args:
        original: the module's bound ``_phase``.
        device: returns the module's current device (it moves during set-up).
        peaks: filled with phase name -> peak bytes allocated on the device during the phase.
    """

    @contextmanager
    def phase(name: str, times: dict[str, float]) -> Iterator[None]:
        dev = device()
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        with original(name, times):
            yield
        # the original synchronised the device on exit, so the peak covers the phase's kernels
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated(dev)

    return phase


class PhaseMemory(pl.Callback):
    """Logs ``memory/<phase>_peak_gib`` (``torch.cuda.max_memory_allocated``, reset at each phase's start).

    ``BiCoTGRPO`` times its phases in ``_phase(name, times)``; this callback wraps that method on the
    instance for the duration of ``fit`` (and restores it on teardown). If the module exposes
    ``phase_peak_memory`` (phase -> bytes, filled by the module itself), that is read instead. Off
    CUDA nothing is logged. Values are the maximum over data-parallel ranks.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._wrapped: pl.LightningModule | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or hasattr(pl_module, "phase_peak_memory") or not hasattr(pl_module, "_phase"):
            return
        if not isinstance(trainer.accelerator, CUDAAccelerator):
            rank_zero_info("PhaseMemory: not on CUDA, so no memory/* metrics are logged")
        pl_module._phase = phase_with_memory(pl_module._phase, lambda: pl_module.device, self.peaks)
        self._wrapped = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            # the wrapper lives in the instance's __dict__; deleting it uncovers the class's method
            vars(self._wrapped).pop("_phase", None)
            self._wrapped = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        peaks = getattr(pl_module, "phase_peak_memory", None) or self.peaks
        for phase, used in sorted(peaks.items()):
            # a float: Lightning makes it a tensor on the module's device, as sync_dist needs
            pl_module.log(
                f"memory/{phase}_peak_gib",
                used / GIB,
                on_step=True,
                on_epoch=False,
                sync_dist=True,
                reduce_fx="max",
            )
        self.peaks.clear()
