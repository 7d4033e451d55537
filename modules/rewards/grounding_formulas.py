"""The GroundingDINO reward's scoring rules (REWARDS.md) as pure functions of detections and metadata.

Shared by the open-vocabulary detector expert and the toy world's programmatic detector, so both score
object presence, counts and spatial relations the same way. Boxes are ``(x0, y0, x1, y1)`` in
normalised ``[0, 1]`` image coordinates, y growing downward.

Two defects of the public T2I-R1 code are fixed here (REWARDS.md): "above" and "on top of" have a
branch (the vertical twin of left/right), and the "near" distance threshold is a fraction of the image
side, like the boxes, instead of a pixel count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BOX_THRESHOLD = 0.3
"""detections below this confidence are ignored (GroundingDINO's box threshold)."""
NMS_IOU = 0.5
"""numeracy counts boxes after non-maximum suppression at this IoU."""
NEAR_THRESHOLD = 0.3
""""near" when the centres are within this fraction of the image side on one axis."""
OVERLAP_IOU = 0.1
"""left/right/above/below score 1 only when the boxes overlap less than this."""
DETECTED_WEIGHT = 0.2
"""spatial prompts: credit for each of obj1 and obj2 being detected."""
POSITION_WEIGHT = 0.5
"""spatial prompts: the share of the position score added when both objects are detected."""
SPATIAL_MAX = 2 * DETECTED_WEIGHT + POSITION_WEIGHT
"""the best spatial score the rule can give (0.9)."""
WRONG_COUNT_CREDIT = 0.2
"""numeracy: the share of an item's weight earned by a wrong, non-zero count."""

# Each T2I-R1 locality and the branch that scores it: (axis, sign of obj1 - obj2 along it) or "near".
LOCALITY_BRANCH: dict[str, tuple[str, int] | str] = {
    "left of": ("x", -1),
    "on the left of": ("x", -1),
    "right of": ("x", 1),
    "on the right of": ("x", 1),
    "above": ("y", -1),
    "on the top of": ("y", -1),
    "on top of": ("y", -1),
    "below": ("y", 1),
    "on the bottom of": ("y", 1),
    "near": "near",
    "next to": "near",
    "on side of": "near",
}


@dataclass(frozen=True)
class Detection:
    """One box: the phrase it answers (``label``), its confidence and its normalised box."""

    label: str
    score: float
    box: tuple[float, float, float, float]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for empty boxes)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre(box: Sequence[float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def phrase_matches(label: str, phrase: str) -> bool:
    """Whether a detection label answers a noun phrase: every word of the phrase is in the label."""
    return set(phrase.lower().split()) <= set(label.lower().split())


def matching(detections: Sequence[Detection], phrase: str, threshold: float = BOX_THRESHOLD) -> list[Detection]:
    """Detections of ``phrase`` at or above ``threshold``, most confident first."""
    hits = [d for d in detections if d.score >= threshold and phrase_matches(d.label, phrase)]
    return sorted(hits, key=lambda d: -d.score)


def nms(detections: Sequence[Detection], iou: float = NMS_IOU) -> list[Detection]:
    """Greedy non-maximum suppression: keep the most confident box, drop boxes overlapping it > ``iou``."""
    kept: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if all(box_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
    return kept


def position_score(box1: Sequence[float], box2: Sequence[float], locality: str, near: float = NEAR_THRESHOLD) -> float:
    """How well ``box1`` stands ``locality`` of ``box2``, in ``[0, 1]``.

    left/right (above/below on the vertical axis): 0 when the centre offset points the wrong way;
    ``0.1 / IoU`` when the boxes overlap with IoU >= 0.1; 1 when the offset is mostly along the axis;
    otherwise 0. near / next to / on side of: 1 when ``|dx|`` or ``|dy|`` is under ``near`` (a fraction
    of the image side), else ``near / max(|dx|, |dy|)``.

    Raises:
        ValueError: an unknown locality.
    """
    branch = LOCALITY_BRANCH.get(locality.lower())
    if branch is None:
        raise ValueError(f"unknown locality {locality!r}; expected one of {sorted(LOCALITY_BRANCH)}")
    (x1, y1), (x2, y2) = centre(box1), centre(box2)
    dx, dy = x1 - x2, y1 - y2
    if branch == "near":
        if abs(dx) < near or abs(dy) < near:
            return 1.0
        return near / max(abs(dx), abs(dy))
    axis, sign = branch
    along, across = (dx, dy) if axis == "x" else (dy, dx)
    if along * sign <= 0:
        return 0.0
    iou = box_iou(box1, box2)
    if iou >= OVERLAP_IOU:
        return OVERLAP_IOU / iou
    return 1.0 if abs(along) > abs(across) else 0.0


def spatial_score(
    detections: Sequence[Detection], spatial_info: Mapping[str, str], near: float = NEAR_THRESHOLD
) -> float:
    """0.2 for each of obj1 and obj2 detected, plus half the position score of their best boxes (max 0.9)."""
    first = matching(detections, spatial_info["obj1"])
    second = matching(detections, spatial_info["obj2"])
    score = DETECTED_WEIGHT * (bool(first) + bool(second))
    if first and second:
        score += POSITION_WEIGHT * position_score(first[0].box, second[0].box, spatial_info["locality"], near)
    return score


def numeracy_score(detections: Sequence[Detection], numeracy_info: Sequence[Mapping[str, Any]]) -> float:
    """Each of the n items weighs 1/n: the exact count (after NMS) earns it, a wrong non-zero count 0.2 of it."""
    if not numeracy_info:
        return 1.0
    weight = 1.0 / len(numeracy_info)
    score = 0.0
    for item in numeracy_info:
        found = len(nms(matching(detections, item["obj_name"])))
        if found == int(item["num"]):
            score += weight
        elif found > 0:
            score += WRONG_COUNT_CREDIT * weight
    return score


def object_score(detections: Sequence[Detection], nouns: Sequence[str]) -> float:
    """The fraction of ``nouns`` detected; 1 when there are none."""
    if not nouns:
        return 1.0
    return sum(bool(matching(detections, noun)) for noun in nouns) / len(nouns)


def grounding_score(
    detections: Sequence[Detection],
    task_type: str,
    nouns: Sequence[str],
    spatial_info: Mapping[str, str] | None = None,
    numeracy_info: Sequence[Mapping[str, Any]] | None = None,
    near: float = NEAR_THRESHOLD,
) -> float:
    """The GroundingDINO reward of one image, dispatched on ``task_type`` as in T2I-R1.

    ``spatial`` uses :func:`spatial_score`, ``numeracy`` :func:`numeracy_score` (each needs its metadata
    field; without it, the object score applies); every other type :func:`object_score`.
    """
    if task_type == "spatial" and spatial_info is not None:
        return spatial_score(detections, spatial_info, near)
    if task_type == "numeracy" and numeracy_info is not None:
        return numeracy_score(detections, numeracy_info)
    return object_score(detections, nouns)
