"""Reward experts that misbehave on purpose, for the fault tests (fits in the pytest process and CLI processes)."""

from __future__ import annotations

import torch

from modules.rewards.base import RewardExpert


class NaNAtCalls(RewardExpert):
    """Scores like a constant 0.5 + noise, but returns NaN on the listed call numbers (0-based)."""

    name = "nan_at"

    def __init__(self, calls: list[int] | None = None) -> None:
        super().__init__()
        self.calls = set(calls or [])
        self.count = 0

    def score(self, images, prompts):
        call, self.count = self.count, self.count + 1
        scores = images.float().mean(dim=(1, 2, 3)) / 255.0
        return torch.full_like(scores, float("nan")) if call in self.calls else scores


class Exploding(RewardExpert):
    """Raises inside scoring: the run must name this expert and the batch."""

    name = "exploding"

    def score(self, images, prompts):
        raise RuntimeError("simulated expert failure")
