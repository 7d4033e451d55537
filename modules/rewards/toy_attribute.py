"""Toy GIT: answers "is there a <colour> <shape>?" for each attribute phrase of the prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.grounding_formulas import phrase_matches
from modules.rewards.toy_vision import Parse, parse_batch


def answer(parse: Parse, phrase: str) -> float:
    """P(yes) for "is there a <phrase>?": the best template IoU among objects the phrase describes, or 0."""
    return max((o.confidence for o in parse.objects if phrase_matches(o.label, phrase)), default=0.0)


class ToyAttributeExpert(RewardExpert):
    """The GIT expert's question-per-phrase score, answered from the toy parse.

    One question per attribute phrase ("red circle"), or per noun when there are none; the score is the
    mean answer, 1 without nouns. Unlike the paper's GIT expert, spatial and numeracy prompts are asked
    too (the toy world's metadata always names the objects), so a faithful scene scores 1 in every category.
    """

    name = "toy_attribute"

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]`` for uint8 images ``[N, H, W, 3]``."""
        scores = []
        for parse, record in zip(parse_batch(images), prompts, strict=True):
            phrases = record.attr_nouns or record.nouns
            scores.append(sum(answer(parse, p) for p in phrases) / len(phrases) if phrases else 1.0)
        return torch.tensor(scores, dtype=torch.float32)
