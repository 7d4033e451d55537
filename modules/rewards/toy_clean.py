"""Toy HPS: a preference for clean pictures -- palette pixels only, and every blob a well-drawn shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.toy_vision import WELL_FORMED, Parse, parse_batch


def cleanliness(parse: Parse) -> float:
    """Clean-pixel fraction times the fraction of components (specks included) that are well-drawn shapes."""
    components = len(parse.objects) + parse.specks
    good = sum(o.confidence >= WELL_FORMED for o in parse.objects)
    return parse.clean_fraction * (good / components if components else 1.0)


class ToyCleanExpert(RewardExpert):
    """Scores how clean an image looks, whatever the prompt (as HPS scores aesthetics with the text).

    A rendered scene scores 1; noise, off-palette colours, specks and malformed blobs lower the score.
    """

    name = "toy_clean"

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]`` for uint8 images ``[N, H, W, 3]``."""
        return torch.tensor([cleanliness(p) for p in parse_batch(images)], dtype=torch.float32)
