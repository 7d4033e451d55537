"""GroundingDINO expert: open-vocabulary boxes for the prompt's objects, scored for presence, position and count.

This module runs the detector (prompting, box post-processing) and turns its output into the
:class:`~modules.rewards.grounding_formulas.Detection` lists that the scoring rules of
:mod:`modules.rewards.grounding_formulas` read; the toy world's detector uses the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import check_batch_size, chunks, load_model_and_processor, to_pil
from modules.rewards.grounding_formulas import (
    BOX_THRESHOLD,
    NEAR_THRESHOLD,
    OVERLAP_IOU,
    Detection,
    Thresholds,
    grounding_score,
    query_phrases,
)


def caption(phrases: Sequence[str]) -> str:
    """GroundingDINO's text: lower-case phrases joined by ``" . "`` and ending ``" ."``."""
    return " . ".join(p.strip().lower() for p in phrases) + " ."


def phrase_spans(text: str, phrases: Sequence[str]) -> list[tuple[int, int]]:
    """Character ``[start, end)`` of each phrase in :func:`caption`'s text, in order."""
    spans, start = [], 0
    for phrase in phrases:
        low = phrase.strip().lower()
        begin = text.index(low, start)
        spans.append((begin, begin + len(low)))
        start = begin + len(low)
    return spans


def assign_boxes(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    token_sets: Sequence[Sequence[int]],
    phrases: Sequence[str],
    threshold: float,
) -> list[Detection]:
    """Detections of one image: each query box, labelled with its best phrase, if that score reaches the threshold.

    Args:
        probs: ``[Q, T]`` sigmoid of the query-token logits.
        boxes: ``[Q, 4]`` normalised ``cx, cy, w, h``.
        token_sets: token positions of each phrase.
        phrases: the phrases, aligned with ``token_sets``.
        threshold: the box threshold.
    """
    per_phrase = torch.stack(
        [probs[:, list(t)].max(dim=1).values if t else torch.zeros(probs.shape[0]) for t in token_sets], 1
    )
    best, which = per_phrase.max(dim=1)  # [Q], [Q]
    found = []
    for q in torch.nonzero(best >= threshold).flatten().tolist():
        cx, cy, w, h = boxes[q].tolist()
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        found.append(Detection(phrases[int(which[q])], float(best[q]), box))
    return found


class GroundingDinoExpert(RewardExpert):
    """Open-vocabulary detection with GroundingDINO, scored by :mod:`modules.rewards.grounding_formulas`.

    Each image's text is its record's objects (see :func:`~modules.rewards.grounding_formulas.query_phrases`)
    joined as ``"a . b ."``. A query box's score for a phrase is the maximum token probability over that
    phrase's tokens; the box goes to its best phrase when that score is at least ``box_threshold``.

    Score range: ``[0, 1]`` (spatial prompts top out at 0.9 by the formula).

    Args:
        model_name_or_path: a local folder or hub id (default ``IDEA-Research/grounding-dino-tiny``, Swin-T OGC).
        box_threshold: see :data:`~modules.rewards.grounding_formulas.BOX_THRESHOLD`.
        near_threshold: see :data:`~modules.rewards.grounding_formulas.NEAR_THRESHOLD`, a fraction of the image side.
        iou_threshold: see :data:`~modules.rewards.grounding_formulas.OVERLAP_IOU`.
        dtype: weight dtype.
        batch_size: images per forward (``None``: all at once).
        placement: ``device``, ``cpu`` or ``offload`` (see :class:`RewardExpert`).
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
    """

    name = "gdino"

    def __init__(
        self,
        model_name_or_path: str = "IDEA-Research/grounding-dino-tiny",
        box_threshold: float = BOX_THRESHOLD,
        near_threshold: float = NEAR_THRESHOLD,
        iou_threshold: float = OVERLAP_IOU,
        dtype: str = "float32",
        batch_size: int | None = 16,
        placement: str = "device",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(placement)
        try:
            self.thresholds = Thresholds(box_threshold, iou_threshold, near_threshold)
        except ValueError as err:
            raise ValueError(f"reward expert {self.name!r}: {err}") from None
        self.batch_size = check_batch_size(batch_size, self.name)
        self.model, self.processor = load_model_and_processor(
            GroundingDinoForObjectDetection,
            AutoProcessor,
            model_name_or_path,
            self.name,
            dtype,
            trust_remote_code,
        )

    def detect(self, images: torch.Tensor, phrases: Sequence[list[str]]) -> list[list[Detection]]:
        """Detections for uint8 images ``[n, H, W, 3]``, each image asked for its own phrases (non-empty)."""
        texts = [caption(p) for p in phrases]
        tokens = self.processor.tokenizer(
            texts, padding=True, return_offsets_mapping=True, return_tensors="pt"
        )
        offsets = tokens.pop("offset_mapping")  # [n, T, 2]
        pixels = self.processor.image_processor(images=to_pil(images), return_tensors="pt")
        inputs = {**tokens, **pixels}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu()  # [n, Q, max_text_len]
        boxes = out.pred_boxes.float().cpu()  # [n, Q, 4] normalised cx, cy, w, h
        found = []
        for i, text in enumerate(texts):
            token_sets = []
            for begin, end in phrase_spans(text, phrases[i]):
                token_sets.append(
                    [t for t, (a, b) in enumerate(offsets[i].tolist()) if b > a and a >= begin and b <= end]
                )
            found.append(
                assign_boxes(probs[i], boxes[i], token_sets, phrases[i], self.thresholds.box_threshold)
            )
        return found

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]``."""
        n, height, width, _ = images.shape
        phrases = [query_phrases(record) for record in prompts]
        detections: list[list[Detection]] = [[] for _ in range(n)]
        asked = [i for i in range(n) if phrases[i]]  # prompts without objects need no detector
        if asked and (height < 2 or width < 2):
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} are too small to detect in")
            return torch.zeros(n)
        for rows in chunks(len(asked), self.batch_size):
            index = asked[rows]
            found = self.detect(images[index], [phrases[i] for i in index])
            for i, dets in zip(index, found, strict=True):
                detections[i] = dets
        return torch.tensor(
            [grounding_score(r, d, self.thresholds) for r, d in zip(prompts, detections, strict=True)],
            dtype=torch.float32,
        )
