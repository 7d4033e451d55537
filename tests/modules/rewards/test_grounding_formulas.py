"""Tests for the GroundingDINO reward formulas, including the two public-code defects bicot fixes."""

from __future__ import annotations

import pytest

from modules.rewards.grounding_formulas import (
    BOX_THRESHOLD,
    SPATIAL_MAX,
    Detection,
    box_iou,
    grounding_score,
    nms,
    numeracy_score,
    object_score,
    position_score,
    spatial_score,
)


def box(cx: float, cy: float, size: float = 0.1) -> tuple[float, float, float, float]:
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def det(label: str, cx: float, cy: float, score: float = 0.9, size: float = 0.1) -> Detection:
    return Detection(label, score, box(cx, cy, size))


def test_box_iou():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_nms_keeps_the_most_confident_of_overlapping_boxes():
    a, b, c = det("cat", 0.5, 0.5, 0.9), det("cat", 0.51, 0.5, 0.8), det("cat", 0.1, 0.1, 0.7)
    assert nms([b, c, a]) == [a, c]


@pytest.mark.parametrize(
    "locality, first, second, expected",
    [
        ("left of", (0.2, 0.5), (0.8, 0.5), 1.0),
        ("left of", (0.8, 0.5), (0.2, 0.5), 0.0),
        ("on the left of", (0.2, 0.5), (0.8, 0.5), 1.0),
        ("right of", (0.8, 0.5), (0.2, 0.5), 1.0),
        ("right of", (0.6, 0.1), (0.5, 0.9), 0.0),  # right side, but mostly vertical
        ("below", (0.5, 0.9), (0.5, 0.1), 1.0),
        ("on the bottom of", (0.5, 0.1), (0.5, 0.9), 0.0),
    ],
)
def test_directional_positions(locality, first, second, expected):
    assert position_score(box(*first), box(*second), locality) == expected


@pytest.mark.parametrize("locality", ["above", "on top of", "on the top of"])
def test_above_and_on_top_of_have_a_branch(locality):
    # Defect 1 of the public code: these localities had no branch and never scored.
    assert position_score(box(0.5, 0.2), box(0.5, 0.8), locality) == 1.0
    assert position_score(box(0.5, 0.8), box(0.5, 0.2), locality) == 0.0
    assert position_score(box(0.2, 0.45), box(0.8, 0.5), locality) == 0.0  # above by a hair, mostly sideways


def test_overlapping_boxes_score_point_one_over_iou():
    a, b = (0.0, 0.0, 0.5, 0.5), (0.1, 0.0, 0.6, 0.5)
    iou = box_iou(a, b)
    assert iou >= 0.1
    assert position_score(a, b, "left of") == pytest.approx(0.1 / iou)


def test_near_threshold_is_a_fraction_of_the_image():
    # Defect 2 of the public code: a 150-pixel threshold on [0, 1] boxes made every pair "near".
    assert position_score(box(0.1, 0.1), box(0.9, 0.9), "near") == pytest.approx(0.3 / 0.8)
    assert position_score(box(0.3, 0.3), box(0.5, 0.5), "next to") == 1.0
    assert position_score(box(0.1, 0.1), box(0.7, 0.9), "on side of", near=0.2) == pytest.approx(0.2 / 0.8)
    # |dx| or |dy| under the threshold is enough (REWARDS.md), even far apart on the other axis.
    assert position_score(box(0.1, 0.5), box(0.9, 0.5), "near") == 1.0


def test_unknown_locality_raises():
    with pytest.raises(ValueError, match="unknown locality"):
        position_score(box(0.1, 0.1), box(0.5, 0.5), "inside")


def test_spatial_score_parts():
    info = {"obj1": "cat", "obj2": "dog", "locality": "left of"}
    both = [det("cat", 0.2, 0.5), det("dog", 0.8, 0.5)]
    assert spatial_score(both, info) == pytest.approx(SPATIAL_MAX) == pytest.approx(0.9)
    assert spatial_score([det("cat", 0.8, 0.5), det("dog", 0.2, 0.5)], info) == pytest.approx(0.4)
    assert spatial_score([det("cat", 0.2, 0.5)], info) == pytest.approx(0.2)
    assert spatial_score([], info) == 0.0
    # The most confident box of each object decides the position.
    mixed = [det("cat", 0.9, 0.5, 0.5), det("cat", 0.1, 0.5, 0.95), det("dog", 0.5, 0.5)]
    assert spatial_score(mixed, info) == pytest.approx(0.9)


def test_detections_below_the_box_threshold_are_ignored():
    weak = det("cat", 0.2, 0.5, score=BOX_THRESHOLD - 0.01)
    assert object_score([weak], ["cat"]) == 0.0
    assert object_score([det("cat", 0.2, 0.5, score=BOX_THRESHOLD)], ["cat"]) == 1.0


def test_phrases_match_every_word_of_the_label():
    red_circle = det("red circle", 0.5, 0.5)
    assert object_score([red_circle], ["circle"]) == 1.0
    assert object_score([red_circle], ["red circle"]) == 1.0
    assert object_score([red_circle], ["blue circle"]) == 0.0


def test_numeracy_score():
    info = [{"obj_name": "cat", "num": 2}, {"obj_name": "dog", "num": 1}]
    cats = [det("cat", 0.2, 0.2), det("cat", 0.8, 0.8)]
    assert numeracy_score([*cats, det("dog", 0.5, 0.5)], info) == pytest.approx(1.0)
    assert numeracy_score([cats[0], det("dog", 0.5, 0.5)], info) == pytest.approx(0.5 * 0.2 + 0.5)
    assert numeracy_score(cats, info) == pytest.approx(0.5)
    # A duplicate box of the same cat is suppressed before counting.
    assert numeracy_score([*cats, det("cat", 0.21, 0.2, 0.5), det("dog", 0.5, 0.5)], info) == pytest.approx(1.0)


def test_object_score_and_dispatch():
    dets = [det("cat", 0.2, 0.5)]
    assert object_score(dets, ["cat", "dog"]) == 0.5
    assert object_score(dets, []) == 1.0
    spatial = {"obj1": "cat", "obj2": "dog", "locality": "above"}
    assert grounding_score(dets, "spatial", ["cat", "dog"], spatial_info=spatial) == pytest.approx(0.2)
    assert grounding_score(dets, "numeracy", ["cat"], numeracy_info=[{"obj_name": "cat", "num": 2}]) == pytest.approx(0.2)
    assert grounding_score(dets, "color", ["cat", "dog"]) == 0.5
    assert grounding_score(dets, "spatial", ["cat", "dog"]) == 0.5  # no spatial_info: object score
