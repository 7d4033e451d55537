"""The GroundingDINO reward formulas against hand-computed values, including the public-code defects bicot fixes."""

from __future__ import annotations

import pytest

from datamodules.prompts import load_prompts
from datamodules.records import LOCALITIES, PromptRecord
from modules.rewards.grounding_formulas import (
    BOX_THRESHOLD,
    LOCALITY_BRANCH,
    SPATIAL_MAX,
    Detection,
    Thresholds,
    box_iou,
    grounding_score,
    matching,
    nms,
    numeracy_score,
    object_score,
    phrase_matches,
    position_score,
    query_phrases,
    score_kind,
    spatial_score,
)

SAMPLE = "datamodules/fixtures/t2i_r1_sample.jsonl"


def box(cx: float, cy: float, size: float = 0.1) -> tuple[float, float, float, float]:
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def det(label: str, cx: float, cy: float, score: float = 0.9, size: float = 0.1) -> Detection:
    return Detection(label, score, box(cx, cy, size))


def items(**counts: int) -> list[dict]:
    return [{"obj_name": name, "num": num} for name, num in counts.items()]


# ----------------------------------------------------------------------------- boxes and labels


def test_box_iou():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # Apart along x only, along y only, and along both (two negative extents must not make an overlap).
    assert box_iou((0, 0, 0.2, 1), (0.5, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 1, 0.2), (0, 0.5, 1, 1)) == 0.0
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0


def test_nms_keeps_the_most_confident_of_overlapping_boxes():
    a, b, c = det("cat", 0.5, 0.5, 0.9), det("cat", 0.51, 0.5, 0.8), det("cat", 0.1, 0.1, 0.7)
    assert box_iou(a.box, b.box) == pytest.approx(0.09 / 0.11)  # > 0.5: the same cat
    assert nms([b, c, a]) == [a, c]


def test_a_detection_answers_the_phrase_it_is_labelled_with():
    weak = det("cat", 0.1, 0.1, score=BOX_THRESHOLD - 0.01)
    low, high = det("Teddy  Bear", 0.2, 0.2, 0.5), det("teddy bear", 0.8, 0.8, 0.7)
    found = [weak, low, high, det("bear", 0.5, 0.5)]
    assert matching(found, " teddy bear") == [high, low]  # case and spacing aside, most confident first
    assert matching(found, "bear") == [found[3]]  # a "teddy bear" box is not also a "bear" box
    assert matching(found, "cat") == [] and matching(found, "cat", box_threshold=0.2) == [weak]
    # The word test is for detectors that name what they see, e.g. the toy eye's "red circle".
    assert phrase_matches("red circle", "circle") and phrase_matches("red circle", "Red Circle")
    assert not phrase_matches("red circle", "blue circle")


# ----------------------------------------------------------------------------- position


def test_every_locality_of_the_data_has_a_branch():
    assert set(LOCALITY_BRANCH) == set(LOCALITIES) and len(LOCALITIES) == 12
    for record in load_prompts(SAMPLE):
        if record.spatial_info:
            assert record.spatial_info["locality"] in LOCALITY_BRANCH


# Where obj1 stands, obj2 being at the centre, as each directional locality's words say (written out here,
# not read from LOCALITY_BRANCH, so that a wrong sign in that table fails): (correct, wrong); y grows down.
TO_THE_LEFT, TO_THE_RIGHT = ((0.2, 0.5), (0.8, 0.5)), ((0.8, 0.5), (0.2, 0.5))
HIGHER, LOWER = ((0.5, 0.2), (0.5, 0.8)), ((0.5, 0.8), (0.5, 0.2))
OBJ1_AT = {
    "left of": TO_THE_LEFT,
    "on the left of": TO_THE_LEFT,
    "right of": TO_THE_RIGHT,
    "on the right of": TO_THE_RIGHT,
    "above": HIGHER,
    "on the top of": HIGHER,
    "on top of": HIGHER,
    "below": LOWER,
    "on the bottom of": LOWER,
}
NEAR_LOCALITIES = ("near", "next to", "on side of")


def test_the_directional_and_near_localities_are_all_of_them():
    assert set(OBJ1_AT) | set(NEAR_LOCALITIES) == set(LOCALITIES)


@pytest.mark.parametrize("locality", sorted(OBJ1_AT))
def test_directional_localities_both_sides(locality):
    # Defect 1 of the public code: "above", "on top of" had no branch and never scored.
    correct, wrong = OBJ1_AT[locality]
    assert position_score(box(*correct), box(0.5, 0.5), locality) == 1.0
    assert position_score(box(*wrong), box(0.5, 0.5), locality) == 0.0


def test_correct_side_but_mostly_along_the_other_axis_scores_zero():
    assert position_score(box(0.4, 0.1), box(0.5, 0.9), "left of") == 0.0
    assert position_score(box(0.2, 0.45), box(0.8, 0.5), "on top of") == 0.0
    # Overlapping boxes too: the overlap rule only applies to offsets mostly along the axis.
    a, b = (0.3, 0.2, 0.7, 0.6), (0.35, 0.3, 0.75, 0.7)  # centres (0.5, 0.4), (0.55, 0.5)
    iou = 0.35 * 0.3 / (0.16 + 0.16 - 0.35 * 0.3)
    assert box_iou(a, b) == pytest.approx(iou)
    assert position_score(a, b, "left of") == 0.0
    assert position_score(a, b, "above") == pytest.approx(0.1 / iou)


def test_overlapping_boxes_earn_iou_threshold_over_iou():
    a, b = (0.2, 0.4, 0.6, 0.6), (0.4, 0.4, 0.8, 0.6)  # IoU = 0.04 / 0.12 = 1/3
    assert position_score(a, b, "left of") == pytest.approx(0.3)
    assert position_score(a, b, "left of", iou_threshold=0.2) == pytest.approx(0.6)
    assert position_score(b, a, "left of") == 0.0  # overlap does not rescue the wrong side


@pytest.mark.parametrize("locality", NEAR_LOCALITIES)
def test_near_is_relative_to_image_size(locality):
    # Defect 2 of the public code: a 150-pixel threshold on [0, 1] boxes made every pair "near".
    assert position_score(box(0.4, 0.5), box(0.6, 0.52), locality) == 1.0
    assert position_score(box(0.1, 0.1), box(0.9, 0.9), locality) == pytest.approx(0.3 / 0.8)
    assert position_score(box(0.1, 0.1), box(0.7, 0.9), locality, near_threshold=0.2) == pytest.approx(
        0.2 / 0.8
    )
    # |dx| or |dy| under the threshold is enough, even far apart on the other axis.
    assert position_score(box(0.1, 0.5), box(0.9, 0.5), locality) == 1.0


def test_localities_are_compared_normalised_and_unknown_ones_refused():
    assert position_score(box(0.2, 0.5), box(0.8, 0.5), " Left  Of ") == 1.0
    with pytest.raises(ValueError, match="unknown locality 'inside'"):
        position_score(box(0.5, 0.5), box(0.5, 0.5), "inside")


def test_boundaries_are_where_the_docstrings_put_them():
    # A detection exactly at the box threshold counts ("at or above").
    assert len(matching([det("cat", 0.5, 0.5, score=0.5)], "cat", box_threshold=0.5)) == 1
    # NMS drops boxes overlapping a kept one by more than nms_iou; exactly nms_iou is kept.
    halves = [Detection("cat", 0.9, (0, 0, 1, 1)), Detection("cat", 0.8, (0, 0, 0.5, 1))]
    assert box_iou(halves[0].box, halves[1].box) == 0.5 and nms(halves, 0.5) == halves
    # "near" needs |dx| or |dy| under the threshold: centres (0.25, 0.25) and (0.5, 0.75), |dx| = 0.25 is not.
    assert position_score((0, 0, 0.5, 0.5), (0.25, 0.5, 0.75, 1), "near", near_threshold=0.25) == 0.5
    # An exactly diagonal offset is not mostly along either axis.
    assert position_score(box(0.2, 0.2), box(0.6, 0.6), "left of") == 0.0
    assert position_score(box(0.2, 0.2), box(0.6, 0.6), "above") == 0.0


# ----------------------------------------------------------------------------- spatial


def test_spatial_score_parts():
    info = {"obj1": "cat", "obj2": "dog", "locality": "left of"}
    assert spatial_score([det("cat", 0.2, 0.5), det("dog", 0.8, 0.5)], info) == pytest.approx(SPATIAL_MAX)
    assert SPATIAL_MAX == pytest.approx(0.9)
    assert spatial_score([det("cat", 0.8, 0.5), det("dog", 0.2, 0.5)], info) == pytest.approx(0.4)
    assert spatial_score([det("cat", 0.2, 0.5)], info) == pytest.approx(0.2)
    assert spatial_score([det("dog", 0.2, 0.5)], info) == pytest.approx(0.2)
    assert spatial_score([], info) == 0.0
    # The most confident box of each object decides the position.
    right = [det("cat", 0.9, 0.5, 0.5), det("cat", 0.1, 0.5, 0.95), det("dog", 0.5, 0.5)]
    wrong = [det("cat", 0.9, 0.5, 0.95), det("cat", 0.1, 0.5, 0.5), det("dog", 0.5, 0.5)]
    assert spatial_score(right, info) == pytest.approx(0.9)
    assert spatial_score(wrong, info) == pytest.approx(0.4)
    # "above": the public code never scored more than 0.4 here.
    above = {"obj1": "book", "obj2": "tv", "locality": "on top of"}
    assert spatial_score([det("book", 0.5, 0.2), det("tv", 0.5, 0.8)], above) == pytest.approx(0.9)


def test_spatial_score_with_the_same_object_twice():
    # The public code crashed here (no box of obj2 once obj1 took them) and scored 0.
    info = {"obj1": "cat", "obj2": "Cat", "locality": "left of"}
    assert spatial_score([], info) == 0.0
    assert spatial_score([det("cat", 0.5, 0.5)], info) == pytest.approx(0.2)  # one cat is one object
    duplicate = [det("cat", 0.5, 0.5, 0.9), det("cat", 0.51, 0.5, 0.8)]  # IoU 0.82: still one cat
    assert spatial_score(duplicate, info) == pytest.approx(0.2)
    side_by_side = [det("cat", 0.8, 0.5, 0.9), det("cat", 0.2, 0.5, 0.8)]  # either may be obj1
    assert spatial_score(side_by_side, info) == pytest.approx(0.9)
    stacked = [det("cat", 0.5, 0.2, 0.9), det("cat", 0.5, 0.8, 0.8)]
    assert spatial_score(stacked, info) == pytest.approx(0.4)
    far = {"obj1": "cat", "obj2": "cat", "locality": "near"}
    assert spatial_score([det("cat", 0.1, 0.1), det("cat", 0.9, 0.9)], far) == pytest.approx(
        0.4 + 0.5 * 0.3 / 0.8
    )


# ----------------------------------------------------------------------------- numeracy and objects


def test_numeracy_score():
    cats = [det("cat", 0.2, 0.2), det("cat", 0.8, 0.8)]
    dog = det("dog", 0.5, 0.5)
    assert numeracy_score([*cats, dog], items(cat=2, dog=1)) == pytest.approx(1.0)
    assert numeracy_score([cats[0], dog], items(cat=2, dog=1)) == pytest.approx(0.5 * 0.2 + 0.5)
    assert numeracy_score(cats, items(cat=2, dog=1)) == pytest.approx(0.5)  # absent earns nothing
    assert numeracy_score([*cats, dog], items(cat=3)) == pytest.approx(0.2)
    assert numeracy_score([], items(cat=2)) == 0.0
    assert numeracy_score([], []) == 1.0
    # A duplicate box of the same cat is suppressed before counting (NMS at IoU 0.5).
    assert numeracy_score([*cats, det("cat", 0.21, 0.2, 0.5), dog], items(cat=2, dog=1)) == pytest.approx(1.0)
    kept = Thresholds(nms_iou=1.0)  # nothing is suppressed: three cats
    assert numeracy_score(
        [*cats, det("cat", 0.21, 0.2, 0.5), dog], items(cat=2, dog=1), kept
    ) == pytest.approx(0.6)


def test_object_score():
    found = [det("cat", 0.5, 0.5), det("dog", 0.2, 0.2), det("car", 0.8, 0.8, score=0.2)]
    assert object_score(found, ["cat", "dog", "car"]) == pytest.approx(2 / 3)  # the car is under 0.3
    assert object_score(found, ["cat", "dog", "car"], Thresholds(box_threshold=0.1)) == 1.0
    # "fraction of nouns detected" (REWARDS.md): every entry counts, a repeated one too.
    assert object_score(found, ["cat", "cat", "tree"]) == pytest.approx(2 / 3)
    assert object_score([], []) == 1.0
    assert object_score(found, ["cat", "", "  "]) == 1.0  # blank entries are no objects to find
    assert object_score([], ["", " "]) == 1.0


def test_custom_thresholds_reach_every_formula():
    t = Thresholds(box_threshold=0.2, iou_threshold=0.15, near_threshold=0.2, nms_iou=0.9)
    weak = 0.25  # under the default box threshold (0.3), over t's
    cat, dog = det("cat", 0.1, 0.1, weak), det("dog", 0.9, 0.9, weak)  # centres 0.8 apart on both axes
    near = {"obj1": "cat", "obj2": "dog", "locality": "near"}
    assert spatial_score([cat, dog], near) == 0.0
    assert spatial_score([cat, dog], near, t) == pytest.approx(0.4 + 0.5 * 0.2 / 0.8)
    left = {"obj1": "cat", "obj2": "dog", "locality": "left of"}
    overlapping = [Detection("cat", 0.9, (0.2, 0.4, 0.6, 0.6)), Detection("dog", 0.9, (0.4, 0.4, 0.8, 0.6))]
    assert spatial_score(overlapping, left, t) == pytest.approx(0.4 + 0.5 * 0.15 * 3)  # IoU 1/3
    # The same name twice: t's box threshold, near threshold, overlap threshold and NMS IoU.
    cats = [cat, det("cat", 0.9, 0.9, weak)]
    assert spatial_score(cats, {**near, "obj2": "cat"}, t) == pytest.approx(0.4 + 0.5 * 0.2 / 0.8)
    twins = [det("cat", 0.5, 0.5, 0.9), det("cat", 0.51, 0.5, 0.8)]  # IoU 0.09 / 0.11: one cat at NMS 0.5
    assert spatial_score(twins, {**left, "obj2": "cat"}) == pytest.approx(0.2)
    assert spatial_score(twins, {**left, "obj2": "cat"}, t) == pytest.approx(0.4 + 0.5 * 0.15 / (0.09 / 0.11))
    # Counting and presence: t's box threshold.
    assert numeracy_score(cats, items(cat=2)) == 0.0 and numeracy_score(cats, items(cat=2), t) == 1.0
    assert object_score([cat], ["cat"]) == 0.0 and object_score([cat], ["cat"], t) == 1.0


# ----------------------------------------------------------------------------- dispatch


INFO = {"obj1": "car", "obj2": "zebra", "locality": "below"}
RIGHT = [det("car", 0.5, 0.8), det("zebra", 0.5, 0.2)]


def test_grounding_score_dispatches_on_task_type():
    spatial = PromptRecord("a car below a zebra", "spatial", ("car", "zebra"), spatial_info=INFO)
    assert score_kind(spatial) == "spatial" and grounding_score(spatial, RIGHT) == pytest.approx(0.9)
    counting = PromptRecord("two cars", "numeracy", ("car",), numeracy_info=tuple(items(car=2)))
    assert score_kind(counting) == "numeracy" and grounding_score(counting, RIGHT) == pytest.approx(0.2)
    # "complex" prompts are scored by presence even when they carry spatial_info.
    complex_ = PromptRecord("a car below a zebra", "complex", ("car", "zebra", "tree"), spatial_info=INFO)
    assert score_kind(complex_) == "object" and grounding_score(complex_, RIGHT) == pytest.approx(2 / 3)
    # Without its metadata a spatial / numeracy record falls back to presence.
    assert grounding_score(PromptRecord("x", "spatial", ("car", "cow")), RIGHT) == pytest.approx(0.5)
    assert grounding_score(PromptRecord("x", "numeracy", ("car",), numeracy_info=()), []) == 1.0
    assert grounding_score(PromptRecord("a sunset", "non"), []) == 1.0


def test_geneval_tags_are_scored_as_their_t2i_r1_categories():
    position = PromptRecord("a car below a zebra", "position", ("car", "zebra"), spatial_info=INFO)
    assert score_kind(position) == "spatial" and grounding_score(position, RIGHT) == pytest.approx(0.9)
    counting = PromptRecord("two cars", "counting", ("car",), numeracy_info=tuple(items(car=2)))
    assert score_kind(counting) == "numeracy" and grounding_score(counting, RIGHT) == pytest.approx(0.2)
    assert score_kind(PromptRecord("x", " Spatial ", ("car",), spatial_info=INFO)) == "spatial"
    assert score_kind(PromptRecord("x", "two_object", ("car", "zebra"))) == "object"


def test_query_phrases_are_the_objects_the_formula_reads():
    assert query_phrases(PromptRecord("x", "spatial", ("car", "zebra", "road"), spatial_info=INFO)) == [
        "car",
        "zebra",
    ]
    same = {"obj1": "cat", "obj2": "cat", "locality": "left of"}
    assert query_phrases(PromptRecord("x", "spatial", ("cat",), spatial_info=same)) == ["cat"]
    counting = PromptRecord("x", "counting", ("cup",), numeracy_info=tuple(items(cup=2, dog=1)))
    assert query_phrases(counting) == ["cup", "dog"]
    nouns = PromptRecord("x", "color", ("Teddy Bear", "cat", " teddy bear", ""))
    assert query_phrases(nouns) == ["Teddy Bear", "cat"]


def test_thresholds_are_fractions():
    assert Thresholds() == Thresholds(0.3, 0.1, 0.3, 0.5)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="near_threshold must be in"):
            Thresholds(near_threshold=bad)
