"""The interface every reward expert implements: images and prompt records in, scores in [0, 1] out."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from datamodules.records import PromptRecord


class RewardExpert(pl.LightningModule):
    """One vision expert that scores generated images against their prompts.

    Subclasses implement :meth:`score`. Experts are frozen, run under ``torch.no_grad()``, and never
    raise on a bad image: such an image scores 0 (the subclass counts it in ``self.unreadable``).

    Attributes:
        name: the key used in metrics (``train/reward/<name>``) and in the ensemble's weights.
    """

    name: str = "expert"

    def __init__(self) -> None:
        super().__init__()
        self.unreadable = 0

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """Score images against their prompts.

        Args:
            images: uint8 ``[N, H, W, 3]`` RGB images.
            prompts: ``N`` prompt records, one per image (a prompt repeats across its group).

        Returns:
            float32 ``[N]`` scores in ``[0, 1]``, on CPU.
        """
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expert {self.name!r} expects uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"expert {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        scores = self.score(images, prompts).detach().float().cpu()
        if scores.shape != (images.shape[0],):
            raise RuntimeError(f"expert {self.name!r} returned shape {tuple(scores.shape)}, expected [{images.shape[0]}]")
        return scores
