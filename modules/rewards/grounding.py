"""GroundingDINO expert: open-vocabulary boxes for the prompt's objects, scored for presence, position and count.

The formulas are pure functions over boxes in normalised ``[0, 1]`` xyxy coordinates (image y grows
downward), so they can be checked by hand and reused with any detector:

* spatial: 0.2 for each of obj1, obj2 detected; with both, plus half a position score on the most
  confident box of each (all twelve ``locality`` values, see :data:`RELATION_OF`);
* numeracy: after NMS at IoU 0.5, each item weighs 1/n; exact count earns its weight, a wrong non-zero
  count 0.2 of it, absent 0;
* anything else: the fraction of ``nouns`` detected; no nouns scores 1.

Two defects of the public code are avoided on purpose: "above", "on top of" and "on the top of" have
a branch, and "near"/"next to"/"on side of" compare centre distances with a threshold that is a
fraction of the image side (:data:`NEAR_THRESHOLD`), not a pixel count applied to normalised boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from datamodules.records import LOCALITIES, PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import (
    check_batch_size,
    chunks,
    freeze,
    load_pretrained,
    resolve_dtype,
    to_pil,
    unique,
)

BOX_THRESHOLD = 0.3
"""A box counts as a detection of a phrase when its score for that phrase is at least this."""
NMS_IOU = 0.5
"""Numeracy: boxes of one object overlapping more than this are one object."""
IOU_THRESHOLD = 0.1
"""Left/right/above/below: overlapping boxes (IoU >= this) earn ``IOU_THRESHOLD / IoU`` instead of 1."""
NEAR_THRESHOLD = 0.3
"""Near: centre offsets under this fraction of the image side count as near. T2I-CompBench used
150 px on 512 px images (0.29)."""

# Each locality of the training data and the relation it asks for between obj1 and obj2.
RELATION_OF: dict[str, str] = {
    "left of": "left",
    "on the left of": "left",
    "right of": "right",
    "on the right of": "right",
    "above": "above",
    "on the top of": "above",
    "on top of": "above",
    "below": "below",
    "on the bottom of": "below",
    "next to": "near",
    "near": "near",
    "on side of": "near",
}
assert set(RELATION_OF) == set(LOCALITIES), "every locality of the data needs a relation"

# Categories scored by position / by count (T2I-R1 names and GenEval's); all others by presence.
SPATIAL_TASKS: tuple[str, ...] = ("spatial", "position")
NUMERACY_TASKS: tuple[str, ...] = ("numeracy", "counting")


@dataclass(frozen=True)
class Box:
    """A detected box in normalised coordinates (0..1, y downward) and its confidence."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


Detections = Mapping[str, Sequence[Box]]
"""Phrase -> its boxes (any order). A phrase absent from the mapping has no detection."""


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when both are empty)."""
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def by_confidence(boxes: Sequence[Box]) -> list[Box]:
    """Boxes, most confident first."""
    return sorted(boxes, key=lambda box: box.score, reverse=True)


def nms(boxes: Sequence[Box], iou_threshold: float = NMS_IOU) -> list[Box]:
    """Greedy non-maximum suppression: keep a box unless it overlaps a kept, more confident one by more than the threshold."""
    kept: list[Box] = []
    for box in by_confidence(boxes):
        if all(box_iou(box, other) <= iou_threshold for other in kept):
            kept.append(box)
    return kept


def position_score(
    box1: Box,
    box2: Box,
    locality: str,
    iou_threshold: float = IOU_THRESHOLD,
    near_threshold: float = NEAR_THRESHOLD,
) -> float:
    """How well ``box1`` (obj1) stands in ``locality`` to ``box2`` (obj2), in ``[0, 1]``.

    Directional relations: 1 when obj2's centre lies on the required side of obj1's, mostly along that
    axis (``|along| > |across|``) and the boxes overlap little (IoU < ``iou_threshold``); ``iou_threshold
    / IoU`` when they overlap more; 0 on the wrong side or mostly along the other axis. Near relations:
    1 when ``|dx|`` or ``|dy|`` is under ``near_threshold`` (a fraction of the image side), else
    ``near_threshold / max(|dx|, |dy|)``.

    Raises:
        ValueError: an unknown locality.
    """
    relation = RELATION_OF.get(locality.strip().lower())
    if relation is None:
        raise ValueError(f"unknown locality {locality!r}; expected one of {sorted(RELATION_OF)}")
    dx, dy = box2.cx - box1.cx, box2.cy - box1.cy  # from obj1 to obj2; y grows downward
    if relation == "near":
        if abs(dx) < near_threshold or abs(dy) < near_threshold:
            return 1.0
        return near_threshold / max(abs(dx), abs(dy))
    along, across = (dx, dy) if relation in ("left", "right") else (dy, dx)
    # obj1 left of obj2 means obj2 lies to the right (dx > 0); obj1 above obj2 means obj2 lies lower (dy > 0).
    sign = 1.0 if relation in ("left", "above") else -1.0
    if sign * along <= 0 or abs(along) <= abs(across):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(detections: Detections, info: Mapping[str, str], **thresholds: float) -> float:
    """0.2 per object detected, plus half the position score of the two most confident boxes.

    When obj1 and obj2 name the same object, the two most confident boxes of that object play both
    parts (in the better of the two orders), and a single box counts as one object found.

    Args:
        detections: phrase -> boxes.
        info: ``{"obj1", "obj2", "locality"}``.
        **thresholds: ``iou_threshold`` / ``near_threshold`` for :func:`position_score`.

    Returns:
        A score in ``[0, 0.9]``.
    """
    obj1, obj2 = info["obj1"].strip(), info["obj2"].strip()
    if obj1 == obj2:
        boxes = by_confidence(detections.get(obj1, ()))
        if len(boxes) < 2:
            return 0.2 * len(boxes)
        pos = max(position_score(a, b, info["locality"], **thresholds) for a, b in (boxes[:2], boxes[1::-1]))
        return 0.4 + 0.5 * pos
    first = by_confidence(detections.get(obj1, ()))
    second = by_confidence(detections.get(obj2, ()))
    score = 0.2 * bool(first) + 0.2 * bool(second)
    if first and second:
        score += 0.5 * position_score(first[0], second[0], info["locality"], **thresholds)
    return score


def numeracy_score(
    detections: Detections, items: Sequence[Mapping[str, Any]], nms_iou: float = NMS_IOU
) -> float:
    """Each ``{"obj_name", "num"}`` weighs 1/n: the exact count earns it, a wrong non-zero count 0.2 of it.

    Counts are taken after NMS at ``nms_iou``. An empty list scores 1 (nothing to count).
    """
    if not items:
        return 1.0
    weight = 1.0 / len(items)
    score = 0.0
    for item in items:
        count = len(nms(detections.get(item["obj_name"].strip(), ()), nms_iou))
        if count == item["num"]:
            score += weight
        elif count > 0:
            score += 0.2 * weight
    return score


def object_score(detections: Detections, nouns: Sequence[str]) -> float:
    """The fraction of distinct nouns with at least one box; 1 when there are no nouns."""
    wanted = unique(nouns)
    if not wanted:
        return 1.0
    return sum(bool(detections.get(noun)) for noun in wanted) / len(wanted)


def query_phrases(record: PromptRecord) -> list[str]:
    """The phrases the detector is asked for: the objects the record's formula reads, distinct, in order."""
    task = record.task_type.strip().lower()
    if task in SPATIAL_TASKS and record.spatial_info:
        return unique([record.spatial_info["obj1"], record.spatial_info["obj2"]])
    if task in NUMERACY_TASKS and record.numeracy_info is not None:
        return unique(item["obj_name"] for item in record.numeracy_info)
    return unique(record.nouns)


def grounding_score(record: PromptRecord, detections: Detections, **thresholds: float) -> float:
    """The record's score by category: spatial, numeracy, or the fraction of nouns found."""
    task = record.task_type.strip().lower()
    if task in SPATIAL_TASKS and record.spatial_info:
        return spatial_score(detections, record.spatial_info, **thresholds)
    if task in NUMERACY_TASKS and record.numeracy_info is not None:
        return numeracy_score(detections, record.numeracy_info)
    return object_score(detections, record.nouns)


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
) -> dict[str, list[Box]]:
    """Detections of one image: each query box goes to its best phrase if that score reaches the threshold.

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
    out: dict[str, list[Box]] = {}
    for q in torch.nonzero(best >= threshold).flatten().tolist():
        cx, cy, w, h = boxes[q].tolist()
        box = Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, float(best[q]))
        out.setdefault(phrases[int(which[q])], []).append(box)
    return out


class GroundingDinoExpert(RewardExpert):
    """Open-vocabulary detection with GroundingDINO, scored by the formulas of this module.

    Each image's text is its record's objects (see :func:`query_phrases`) joined as ``"a . b ."``. A
    query box's score for a phrase is the maximum token probability over that phrase's tokens; the box
    goes to its best phrase when that score is at least ``box_threshold``.

    Score range: ``[0, 1]`` (spatial prompts top out at 0.9 by the formula).

    Args:
        model_name_or_path: a local folder or hub id (default ``IDEA-Research/grounding-dino-tiny``, Swin-T OGC).
        box_threshold: see :data:`BOX_THRESHOLD`.
        near_threshold: see :data:`NEAR_THRESHOLD`, a fraction of the image side.
        iou_threshold: see :data:`IOU_THRESHOLD`.
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
        iou_threshold: float = IOU_THRESHOLD,
        dtype: str = "float32",
        batch_size: int | None = 16,
        placement: str = "device",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(placement)
        for key, value in (
            ("box_threshold", box_threshold),
            ("near_threshold", near_threshold),
            ("iou_threshold", iou_threshold),
        ):
            if not 0 < value <= 1:
                raise ValueError(f"reward expert 'gdino': {key} must be in (0, 1], got {value!r}")
        self.box_threshold, self.near_threshold, self.iou_threshold = (
            box_threshold,
            near_threshold,
            iou_threshold,
        )
        self.batch_size = check_batch_size(batch_size, self.name)
        kwargs = {"trust_remote_code": trust_remote_code}
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, model_name_or_path, "model_name_or_path", self.name, **kwargs
        )
        model = load_pretrained(
            GroundingDinoForObjectDetection.from_pretrained,
            model_name_or_path,
            "model_name_or_path",
            self.name,
            dtype=resolve_dtype(dtype, self.name),
            **kwargs,
        )
        self.model = freeze(model)

    def detect(self, images: torch.Tensor, phrases: Sequence[list[str]]) -> list[dict[str, list[Box]]]:
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
                assign_boxes(
                    probs[i], boxes[i], token_sets, [p.lower() for p in phrases[i]], self.box_threshold
                )
            )
        return found

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]`` in ``[0, 1]``."""
        n, height, width, _ = images.shape
        phrases = [query_phrases(record) for record in prompts]
        detections: list[dict[str, list[Box]]] = [{} for _ in range(n)]
        asked = [i for i in range(n) if phrases[i]]  # prompts without objects need no detector
        if asked and (height < 2 or width < 2):
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} are too small to detect in")
            return torch.zeros(n)
        for rows in chunks(len(asked), self.batch_size):
            index = asked[rows]
            found = self.detect(images[index], [phrases[i] for i in index])
            for i, dets in zip(index, found, strict=True):
                # the detector saw lower-case phrases; give the formulas the record's own spelling too
                detections[i] = {**dets, **{p: dets.get(p.lower(), []) for p in phrases[i]}}
        thresholds = {"iou_threshold": self.iou_threshold, "near_threshold": self.near_threshold}
        return torch.tensor(
            [grounding_score(r, d, **thresholds) for r, d in zip(prompts, detections, strict=True)]
        )
