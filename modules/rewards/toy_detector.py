"""Toy GroundingDINO: programmatic detections scored with the GroundingDINO reward's own formulas."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from datamodules.toyworld.scene import NEAR
from modules.rewards.base import RewardExpert
from modules.rewards.grounding_formulas import SPATIAL_MAX, Detection, grounding_score
from modules.rewards.toy_vision import Parse, parse_batch


def detections(parse: Parse) -> list[Detection]:
    """The parse's objects as detections labelled ``"<colour> <shape>"`` (they answer either word)."""
    return [Detection(o.label, o.confidence, o.box) for o in parse.objects]


class ToyDetectorExpert(RewardExpert):
    """Object, count and spatial scores of :mod:`modules.rewards.grounding_formulas` on toy detections.

    A detection's confidence is its shape-template IoU, so GroundingDINO's box threshold (0.3) drops
    unrecognisable blobs.

    Args:
        near_threshold: "near" distance as a fraction of the image side (the toy world's own).
        normalize_spatial: divide spatial scores by their maximum (0.9), so that a scene that meets its
            prompt scores 1 in every category; off, the number is GroundingDINO's exactly.
    """

    name = "toy_detector"

    def __init__(self, near_threshold: float = NEAR, normalize_spatial: bool = True) -> None:
        super().__init__()
        if not 0 < near_threshold <= 1:
            raise ValueError(f"near_threshold is a fraction of the image side in (0, 1], got {near_threshold}")
        self.near_threshold = near_threshold
        self.normalize_spatial = normalize_spatial

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]`` for uint8 images ``[N, H, W, 3]``."""
        scores = []
        for parse, record in zip(parse_batch(images), prompts, strict=True):
            value = grounding_score(
                detections(parse),
                record.task_type,
                record.nouns,
                record.spatial_info,
                record.numeracy_info,
                self.near_threshold,
            )
            if self.normalize_spatial and record.task_type == "spatial" and record.spatial_info is not None:
                value /= SPATIAL_MAX
            scores.append(min(1.0, value))
        return torch.tensor(scores, dtype=torch.float32)
