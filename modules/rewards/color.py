"""A programmatic reward expert: how close the image's pixels are to the colour the prompt names."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert

# Colour words and the RGB value each stands for; saturated values, like a procedural renderer's.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "pink": (255, 192, 203),
    "brown": (139, 69, 19),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}

# The largest RGB distance (black to white), so that 1 - dist / MAX_DIST lies in [0, 1].
MAX_DIST = math.sqrt(3) * 255

_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def first_color(text: str) -> str | None:
    """The first colour word of ``COLORS`` in ``text`` (whole word, any case), or ``None``."""
    match = _COLOR_WORD.search(text)
    return match.group(1).lower() if match else None


class ColorMatchExpert(RewardExpert):
    """Scores each image by the mean closeness of its pixels to the prompt's first colour word.

    Per pixel: ``1 - ||pixel - target|| / (sqrt(3) * 255)``; the score is the mean over pixels, so a
    uniform image of the exact colour scores 1. Meant for tests and the toy config, not for photos.

    Args:
        default_color: the target when a prompt names no colour (a key of ``COLORS``).

    Raises:
        ValueError: ``default_color`` is not in ``COLORS``.
    """

    name = "color"

    def __init__(self, default_color: str = "red") -> None:
        super().__init__()
        color = default_color.strip().lower() if isinstance(default_color, str) else default_color
        if color not in COLORS:
            raise ValueError(f"unknown default_color {default_color!r}; known colours: {sorted(COLORS)}")
        self.default_color = color

    def targets(self, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N, 3]``: the RGB target of each prompt."""
        names = [first_color(record.prompt) or self.default_color for record in prompts]
        return torch.tensor([COLORS[name] for name in names], dtype=torch.float32).reshape(-1, 3)

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]`` for uint8 images ``[N, H, W, 3]``."""
        n, height, width, _ = images.shape
        if height * width == 0:
            # An image without pixels cannot match anything; score it 0 rather than NaN.
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} have no pixels")
            return torch.zeros(n, dtype=torch.float32)
        target = self.targets(prompts).to(images.device)[:, None, None, :]  # [N, 1, 1, 3]
        dist = torch.linalg.vector_norm(images.float() - target, dim=-1)  # [N, H, W]
        closeness = 1.0 - dist / MAX_DIST  # [N, H, W]
        return closeness.mean(dim=(1, 2)).clamp(0.0, 1.0)
