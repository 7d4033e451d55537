"""Toy GroundingDINO: programmatic detections scored with the GroundingDINO reward's own formulas."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from datamodules.toyworld.scene import NEAR
from modules.rewards.base import RewardExpert
from modules.rewards.grounding_formulas import (
    SPATIAL_MAX,
    Detection,
    Thresholds,
    grounding_score,
    phrase_matches,
    query_phrases,
    score_kind,
)
from modules.rewards.toy_vision import Parse, parse_batch


def detections(parse: Parse, phrases: Sequence[str]) -> list[Detection]:
    """The parse's objects as an open-vocabulary detector asked for ``phrases`` reports them.

    Like GroundingDINO, each object is labelled with one asked phrase: the most specific (most words)
    of those that describe its ``"<colour> <shape>"`` (first on a tie); an object no phrase describes
    is not reported.
    """
    found = []
    for o in parse.objects:
        fitting = [p for p in phrases if phrase_matches(o.label, p)]
        if fitting:
            found.append(Detection(max(fitting, key=lambda p: len(p.split())), o.confidence, o.box))
    return found


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
        try:
            self.thresholds = Thresholds(near_threshold=near_threshold)
        except ValueError as err:
            raise ValueError(f"reward expert {self.name!r}: {err} (a fraction of the image side)") from None
        self.normalize_spatial = normalize_spatial

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]`` for uint8 images ``[N, H, W, 3]``."""
        scores = []
        for parse, record in zip(parse_batch(images), prompts, strict=True):
            value = grounding_score(record, detections(parse, query_phrases(record)), self.thresholds)
            if self.normalize_spatial and score_kind(record) == "spatial":
                value /= SPATIAL_MAX
            scores.append(min(1.0, value))
        return torch.tensor(scores, dtype=torch.float32)
