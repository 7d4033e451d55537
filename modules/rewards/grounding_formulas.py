"""The GroundingDINO reward's scoring rules (REWARDS.md) as pure functions of detections and prompt metadata.

The one home of these formulas: the open-vocabulary detector expert (:mod:`modules.rewards.grounding`)
and the toy world's programmatic detector (:mod:`modules.rewards.toy_detector`) both turn their output
into :class:`Detection` lists and call :func:`grounding_score`, so they score object presence, counts and
spatial relations identically. Boxes are ``(x0, y0, x1, y1)`` in normalised ``[0, 1]`` image
coordinates, y growing downward.

* spatial (``spatial``, GenEval ``position``): 0.2 for each of obj1, obj2 detected; with both, plus
  half the position score of the most confident box of each (:func:`position_score`);
* numeracy (``numeracy``, GenEval ``counting``): after NMS at IoU 0.5, each item weighs 1/n; the exact
  count earns the weight, a wrong non-zero count 0.2 of it, absent 0;
* anything else: the fraction of ``nouns`` detected; no nouns scores 1.

A detection answers a phrase when its label is that phrase (case and spacing aside): the detector, not
the formulas, decides which asked phrase a box shows, one phrase per box.

Defects of the public T2I-R1 code fixed here (REWARDS.md): "above", "on top of" and "on the top of"
have a branch (the vertical twin of left/right); the "near" distance threshold is a fraction of the
image side, like the boxes, not a pixel count; and a relation between two objects of the same name
("a cat left of a cat") is scored on two distinct boxes of that name instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from datamodules.records import LOCALITIES, PromptRecord

BOX_THRESHOLD = 0.3
"""detections below this confidence are ignored (GroundingDINO's box threshold)."""
NMS_IOU = 0.5
"""boxes of one phrase overlapping more than this are one object (numeracy counts after this NMS)."""
NEAR_THRESHOLD = 0.3
""""near" when the centres are within this fraction of the image side on one axis (T2I-CompBench:
150 px on 512 px images, 0.29)."""
OVERLAP_IOU = 0.1
"""left/right/above/below: boxes overlapping with IoU >= this earn ``OVERLAP_IOU / IoU`` instead of 1."""
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
assert set(LOCALITY_BRANCH) == set(LOCALITIES), "every locality of the data needs a branch"

# task_type values scored by position / by count (T2I-R1's names and GenEval's tags); all others by presence.
SPATIAL_TASKS: tuple[str, ...] = ("spatial", "position")
NUMERACY_TASKS: tuple[str, ...] = ("numeracy", "counting")


@dataclass(frozen=True)
class Detection:
    """One box: the phrase it answers (``label``), its confidence and its normalised ``(x0, y0, x1, y1)``."""

    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Thresholds:
    """The formulas' thresholds, each in ``(0, 1]`` (see the module constants)."""

    box_threshold: float = BOX_THRESHOLD
    iou_threshold: float = OVERLAP_IOU
    near_threshold: float = NEAR_THRESHOLD
    nms_iou: float = NMS_IOU

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{f.name} must be in (0, 1], got {value!r}")


def normalise(text: str) -> str:
    """Lower case, single spaces, no outer spaces: how phrases, labels, task types and localities compare."""
    return " ".join(text.lower().split())


def distinct(phrases: Iterable[str]) -> list[str]:
    """Stripped, non-empty phrases, one per :func:`normalise` form (the first spelling), in order."""
    seen: dict[str, str] = {}
    for phrase in phrases:
        if normalise(phrase):
            seen.setdefault(normalise(phrase), phrase.strip())
    return list(seen.values())


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
    """Whether ``phrase`` describes a thing called ``label``: every word of the phrase is in the label.

    For detectors that name what they see ("red circle") and must say which asked phrase ("circle") a
    box answers; the formulas themselves compare labels with phrases exactly (:func:`matching`).
    """
    return set(phrase.lower().split()) <= set(label.lower().split())


def matching(
    detections: Sequence[Detection], phrase: str, box_threshold: float = BOX_THRESHOLD
) -> list[Detection]:
    """Detections labelled ``phrase`` (see :func:`normalise`) at or above ``box_threshold``, most confident first."""
    wanted = normalise(phrase)
    hits = [d for d in detections if d.score >= box_threshold and normalise(d.label) == wanted]
    return sorted(hits, key=lambda d: -d.score)


def nms(detections: Sequence[Detection], iou: float = NMS_IOU) -> list[Detection]:
    """Greedy non-maximum suppression: keep the most confident box, drop boxes overlapping a kept one by > ``iou``."""
    kept: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if all(box_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
    return kept


def position_score(
    box1: Sequence[float],
    box2: Sequence[float],
    locality: str,
    iou_threshold: float = OVERLAP_IOU,
    near_threshold: float = NEAR_THRESHOLD,
) -> float:
    """How well ``box1`` (obj1) stands ``locality`` of ``box2`` (obj2), in ``[0, 1]``.

    left/right (above/below on the vertical axis): 0 when the centre offset points the wrong way or
    is not mostly along the axis (``|along| <= |across|``); otherwise 1 when the boxes overlap little
    (IoU < ``iou_threshold``), else ``iou_threshold / IoU``. near / next to / on side of: 1 when
    ``|dx|`` or ``|dy|`` is under ``near_threshold`` (a fraction of the image side), else
    ``near_threshold / max(|dx|, |dy|)``.

    Raises:
        ValueError: an unknown locality.
    """
    branch = LOCALITY_BRANCH.get(normalise(locality))
    if branch is None:
        raise ValueError(f"unknown locality {locality!r}; expected one of {sorted(LOCALITY_BRANCH)}")
    (x1, y1), (x2, y2) = centre(box1), centre(box2)
    dx, dy = x1 - x2, y1 - y2
    if branch == "near":
        if abs(dx) < near_threshold or abs(dy) < near_threshold:
            return 1.0
        return near_threshold / max(abs(dx), abs(dy))
    axis, sign = branch
    along, across = (dx, dy) if axis == "x" else (dy, dx)
    if along * sign <= 0 or abs(along) <= abs(across):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(
    detections: Sequence[Detection], spatial_info: Mapping[str, str], thresholds: Thresholds = Thresholds()
) -> float:
    """0.2 for each of obj1 and obj2 detected, plus half the position score of their best boxes (max 0.9).

    When obj1 and obj2 have the same name, they must be two objects: the two most confident boxes of
    that name left after NMS play both parts (in the better of the two orders), and one box is one
    object found (0.2).
    """
    t = thresholds
    locality = spatial_info["locality"]
    first = matching(detections, spatial_info["obj1"], t.box_threshold)
    if normalise(spatial_info["obj1"]) == normalise(spatial_info["obj2"]):
        objects = nms(first, t.nms_iou)[:2]
        if len(objects) < 2:
            return DETECTED_WEIGHT * len(objects)
        a, b = (o.box for o in objects)
        pos = max(
            position_score(p, q, locality, t.iou_threshold, t.near_threshold) for p, q in ((a, b), (b, a))
        )
        return 2 * DETECTED_WEIGHT + POSITION_WEIGHT * pos
    second = matching(detections, spatial_info["obj2"], t.box_threshold)
    score = DETECTED_WEIGHT * (bool(first) + bool(second))
    if first and second:
        pos = position_score(first[0].box, second[0].box, locality, t.iou_threshold, t.near_threshold)
        score += POSITION_WEIGHT * pos
    return score


def numeracy_score(
    detections: Sequence[Detection],
    numeracy_info: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = Thresholds(),
) -> float:
    """Each of the n items weighs 1/n: the exact count (after NMS) earns it, a wrong non-zero count 0.2 of it.

    An empty list scores 1 (nothing to count).
    """
    if not numeracy_info:
        return 1.0
    weight = 1.0 / len(numeracy_info)
    score = 0.0
    for item in numeracy_info:
        found = len(nms(matching(detections, item["obj_name"], thresholds.box_threshold), thresholds.nms_iou))
        if found == int(item["num"]):
            score += weight
        elif found > 0:
            score += WRONG_COUNT_CREDIT * weight
    return score


def object_score(
    detections: Sequence[Detection], nouns: Sequence[str], thresholds: Thresholds = Thresholds()
) -> float:
    """The fraction of ``nouns`` (each entry, repeats included) detected; 1 when there are none."""
    wanted = [noun for noun in nouns if normalise(noun)]
    if not wanted:
        return 1.0
    return sum(bool(matching(detections, noun, thresholds.box_threshold)) for noun in wanted) / len(wanted)


def score_kind(record: PromptRecord) -> str:
    """Which formula scores ``record``: ``spatial``, ``numeracy`` (each needs its metadata) or ``object``."""
    task = normalise(record.task_type)
    if task in SPATIAL_TASKS and record.spatial_info:
        return "spatial"
    if task in NUMERACY_TASKS and record.numeracy_info is not None:
        return "numeracy"
    return "object"


def query_phrases(record: PromptRecord) -> list[str]:
    """The phrases a detector is asked for: the objects the record's formula reads, distinct, in order."""
    kind = score_kind(record)
    if kind == "spatial":
        return distinct([record.spatial_info["obj1"], record.spatial_info["obj2"]])
    if kind == "numeracy":
        return distinct(item["obj_name"] for item in record.numeracy_info)
    return distinct(record.nouns)


def grounding_score(
    record: PromptRecord, detections: Sequence[Detection], thresholds: Thresholds = Thresholds()
) -> float:
    """The GroundingDINO reward of one image, by :func:`score_kind`: spatial, numeracy or object presence."""
    kind = score_kind(record)
    if kind == "spatial":
        return spatial_score(detections, record.spatial_info, thresholds)
    if kind == "numeracy":
        return numeracy_score(detections, record.numeracy_info, thresholds)
    return object_score(detections, record.nouns, thresholds)
