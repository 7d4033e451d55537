"""The interface every reward expert implements: images and prompt records in, scores in [0, 1] out."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.records import PromptRecord
from modules.rewards.folder import ImageItem

# Where an expert's weights live. "device": wherever the root module goes (the training device).
# "cpu": always on CPU, scoring there too. "offload": on CPU between score phases, moved to the
# training device only while scoring (costs one host-to-device copy of the weights per score phase).
PLACEMENTS: tuple[str, ...] = ("device", "cpu", "offload")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Run an expert in its own dtype: the root's mixed precision (autocast) must not recast it."""
    if device.type not in ("cuda", "cpu"):
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class RewardExpert(pl.LightningModule):
    """One vision expert that scores generated images against their prompts.

    Subclasses implement :meth:`score`. Experts are frozen, always in eval mode, run under
    ``torch.no_grad()``, and never raise on a bad image: such an image scores 0, a warning is issued
    and ``self.unreadable`` counts it (see :meth:`mark_unreadable`).

    Placement: Lightning moves every submodule of the root module to the training device. An expert
    with ``placement="cpu"`` or ``"offload"`` intercepts that move (see :meth:`_apply`): its weights stay
    on CPU, and for ``"offload"`` the target device is remembered and used only inside :meth:`forward`.
    Dtype casts still apply. ``self.device`` reports where the weights actually are. Scoring runs
    with autocast off, so each expert computes in its own ``dtype`` whatever the trainer's precision.

    Scoring a folder of images on its own: every expert has a ``test_step`` over
    :class:`modules.rewards.folder.ImageItem` batches, so ``modules.rewards.folder.score_folder(expert,
    "out/")`` (or ``Trainer.test(expert, dataloaders=image_folder_loader(...))``) scores a folder and
    returns one ``{"image", "prompt", "score", "readable"}`` dict per file.

    Attributes:
        name: the key used in metrics (``train/reward/<name>``) and in the ensemble's weights.
        placement: one of :data:`PLACEMENTS`.
        unreadable: images scored 0 because they could not be read, since construction.
        test_scores: per-image results of the last test epoch.

    Args:
        placement: ``device`` (default), ``cpu`` or ``offload``.
    """

    name: str = "expert"

    def __init__(self, placement: str = "device") -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(
                f"reward expert {self.name!r}: placement must be one of {PLACEMENTS}, got {placement!r}"
            )
        self.placement = placement
        self.unreadable = 0
        self.test_scores: list[dict[str, Any]] = []
        self._score_device = torch.device("cpu")  # where "offload" scores: the last device the root moved to
        self._placing = False  # set while this class moves itself, so _apply lets the move through

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """Score images against their prompts.

        Args:
            images: uint8 ``[N, H, W, 3]`` RGB images.
            prompts: ``N`` prompt records, one per image (a prompt repeats across its group).

        Returns:
            float32 ``[N]`` scores in ``[0, 1]``, on any device.
        """
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """Check the inputs, score on the placement's device, and return float32 ``[N]`` on CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expert {self.name!r} expects uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"expert {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        with self.placed_for_scoring(), _no_autocast(self.device):
            scores = self.score(images, prompts).detach().float().cpu()
        if scores.shape != (images.shape[0],):
            raise RuntimeError(
                f"expert {self.name!r} returned shape {tuple(scores.shape)}, expected [{images.shape[0]}]"
            )
        return scores

    def mark_unreadable(self, count: int, reason: str) -> None:
        """Count ``count`` images that score 0 because they cannot be read, and warn once per call."""
        if count <= 0:
            return
        self.unreadable += count
        rank_zero_warn(
            f"reward expert {self.name!r}: {count} image(s) score 0: {reason}", category=UserWarning
        )

    # ---- placement -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are now (with ``placement`` ``cpu``/``offload`` not where the root is)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return super().device

    def train(self, mode: bool = True) -> RewardExpert:
        # Always eval: dropout in an expert would make rewards noisy, whatever Lightning toggles.
        return super().train(False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RewardExpert:
        """Let a move to another device through only with ``placement="device"``.

        ``Module.to``/``cuda`` reach submodules only through ``_apply(fn)``, so this is the one place
        where a root-level move can be kept off an expert. ``fn`` is probed on one-element CPU tensors:
        if the result lands on another device it is a move (remembered for ``offload``); a pure move
        is skipped, a move combined with a cast applies only the cast, on CPU.
        """
        if self.placement == "device" or self._placing:
            return super()._apply(fn, recurse)
        probe = torch.zeros(1)
        moved = fn(probe)
        if moved.device == probe.device:
            return super()._apply(fn, recurse)  # a cast, share_memory, ...: not a move
        self._score_device = moved.device
        # Keep whatever cast the move carries (nn.Module.to casts floating tensors only), on CPU.
        casts = {dt: fn(torch.zeros(1, dtype=dt)).dtype for dt in _FLOAT_DTYPES}
        if all(src == dst for src, dst in casts.items()):
            return self

        def cast_only(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=casts[t.dtype]) if t.dtype in casts else t

        return super()._apply(cast_only, recurse)

    def _slots(self) -> list[tuple[torch.nn.Module, str, str, torch.Tensor, torch.Tensor]]:
        """Every parameter and buffer as ``(module, "_parameters"|"_buffers", name, object, its data)``."""
        slots = []
        for module in self.modules():
            for kind in ("_parameters", "_buffers"):
                for key, value in getattr(module, kind).items():
                    if value is not None:
                        slots.append((module, kind, key, value, value.data))
        return slots

    @contextmanager
    def placed_for_scoring(self) -> Iterator[None]:
        """With ``placement="offload"``, hold the weights on the score device for the block.

        On exit the CPU tensors are put back as they were (experts are frozen, so nothing is copied
        back and the device copies are freed).
        """
        if self.placement != "offload" or self._score_device.type == "cpu":
            yield
            return
        saved = self._slots()
        self._placing = True
        try:
            super().to(self._score_device)
            yield
        finally:
            # A move either swaps a parameter's data in place or, between incompatible tensor types,
            # replaces the parameter object: put back the original object holding its CPU data.
            for module, kind, key, obj, data in saved:
                getattr(module, kind)[key] = obj
                obj.data = data
            self._placing = False

    # ---- scoring a folder on its own (Trainer.test) --------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Keep image items on the host: each expert moves what it needs to its own device."""
        return batch

    def on_test_epoch_start(self) -> None:
        self.test_scores = []

    def test_step(self, batch: Sequence[ImageItem], batch_idx: int) -> torch.Tensor:
        """Score a batch of files (images of any size); unreadable files score 0.

        Logs ``test/reward/<name>`` (mean) and ``test/unreadable/<name>`` (count) per epoch.

        Returns:
            float32 ``[B]`` scores.
        """
        scores = torch.zeros(len(batch))
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(batch):
            if item.image is not None:
                by_shape.setdefault(tuple(item.image.shape), []).append(i)
        bad = [item.path for item in batch if item.image is None]
        self.mark_unreadable(len(bad), f"cannot be opened as images: {bad}")
        for rows in by_shape.values():
            images = torch.stack([batch[i].image for i in rows])  # [n, H, W, 3]
            scores[rows] = self(images, [batch[i].record for i in rows])
        for item, value in zip(batch, scores.tolist(), strict=True):
            readable = item.image is not None
            self.test_scores.append(
                {"image": item.path, "prompt": item.record.prompt, "score": value, "readable": readable}
            )
        self.log(f"test/reward/{self.name}", scores.mean(), batch_size=len(batch), on_epoch=True)
        self.log(
            f"test/unreadable/{self.name}", float(len(bad)), batch_size=1, on_epoch=True, reduce_fx="sum"
        )
        return scores
