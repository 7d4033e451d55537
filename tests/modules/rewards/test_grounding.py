"""Tests for the GroundingDINO expert: hand-checked formulas (no model), box assignment, and a tiny model end to end."""

from __future__ import annotations

import pytest
import torch

from datamodules.prompts import load_prompts
from datamodules.records import LOCALITIES, PromptRecord
from modules.rewards.common import ExpertCheckpointError
from modules.rewards.grounding import (
    RELATION_OF,
    Box,
    GroundingDinoExpert,
    assign_boxes,
    box_iou,
    caption,
    grounding_score,
    nms,
    numeracy_score,
    object_score,
    phrase_spans,
    position_score,
    query_phrases,
    spatial_score,
)
from modules.rewards.tiny import save_tiny_grounding_dino

SAMPLE = "datamodules/fixtures/t2i_r1_sample.jsonl"


def at(cx: float, cy: float, half: float = 0.05, score: float = 0.9) -> Box:
    """A square box of side ``2 * half`` centred at ``(cx, cy)``."""
    return Box(cx - half, cy - half, cx + half, cy + half, score)


# Where obj2 must lie relative to obj1 (which sits at the centre) for each relation.
CORRECT = {"left": (0.8, 0.5), "right": (0.2, 0.5), "above": (0.5, 0.8), "below": (0.5, 0.2)}
WRONG = {"left": (0.2, 0.5), "right": (0.8, 0.5), "above": (0.5, 0.2), "below": (0.5, 0.8)}


# ----------------------------------------------------------------------------- position


def test_every_locality_of_the_data_has_a_relation():
    assert set(RELATION_OF) == set(LOCALITIES) and len(LOCALITIES) == 12
    for record in load_prompts(SAMPLE):
        if record.spatial_info:
            assert record.spatial_info["locality"] in RELATION_OF


@pytest.mark.parametrize("locality", [loc for loc in LOCALITIES if RELATION_OF[loc] != "near"])
def test_directional_localities_both_sides(locality):
    relation = RELATION_OF[locality]
    obj1 = at(0.5, 0.5)
    assert position_score(obj1, at(*CORRECT[relation]), locality) == 1.0
    assert position_score(obj1, at(*WRONG[relation]), locality) == 0.0


@pytest.mark.parametrize("locality", ["above", "on top of", "on the top of"])
def test_above_family_can_earn_full_spatial_score(locality):
    # The public code has no branch for "above"/"on top of": such prompts never passed 0.4.
    detections = {"book": [at(0.5, 0.2)], "tv": [at(0.5, 0.8)]}
    assert spatial_score(detections, {"obj1": "book", "obj2": "tv", "locality": locality}) == pytest.approx(
        0.9
    )


def test_overlapping_boxes_earn_iou_threshold_over_iou():
    box1, box2 = Box(0.2, 0.4, 0.6, 0.6), Box(0.4, 0.4, 0.8, 0.6)  # IoU = 0.04 / 0.12 = 1/3
    assert box_iou(box1, box2) == pytest.approx(1 / 3)
    assert position_score(box1, box2, "left of") == pytest.approx(0.1 / (1 / 3))
    assert position_score(box2, box1, "left of") == 0.0  # overlap does not rescue the wrong side


def test_correct_side_but_mostly_along_the_other_axis_scores_zero():
    assert position_score(at(0.4, 0.1), at(0.5, 0.9), "left of") == 0.0
    assert position_score(at(0.1, 0.4), at(0.9, 0.5), "below") == 0.0


@pytest.mark.parametrize("locality", ["near", "next to", "on side of"])
def test_near_is_relative_to_image_size(locality):
    assert position_score(at(0.4, 0.5), at(0.6, 0.52), locality) == 1.0
    # Far on both axes: the distance threshold (0.3 of the image side) decides, so far boxes score
    # below 1. The public code compared 150 px with normalised offsets, so everything was "near".
    far = position_score(at(0.1, 0.1), at(0.9, 0.9), locality)
    assert far == pytest.approx(0.3 / 0.8)
    assert position_score(at(0.1, 0.1), at(0.9, 0.9), locality, near_threshold=0.1) == pytest.approx(
        0.1 / 0.8
    )


def test_unknown_locality_is_refused():
    with pytest.raises(ValueError, match="unknown locality 'inside'"):
        position_score(at(0.5, 0.5), at(0.5, 0.5), "inside")


# ----------------------------------------------------------------------------- spatial score


INFO = {"obj1": "car", "obj2": "zebra", "locality": "below"}


def test_spatial_score_by_what_is_found():
    assert spatial_score({}, INFO) == 0.0
    assert spatial_score({"car": [at(0.5, 0.8)]}, INFO) == pytest.approx(0.2)
    assert spatial_score({"zebra": [at(0.5, 0.2)]}, INFO) == pytest.approx(0.2)
    wrong = {"car": [at(0.5, 0.2)], "zebra": [at(0.5, 0.8)]}
    assert spatial_score(wrong, INFO) == pytest.approx(0.4)
    right = {"car": [at(0.5, 0.8)], "zebra": [at(0.5, 0.2)]}
    assert spatial_score(right, INFO) == pytest.approx(0.9)


def test_spatial_score_uses_the_most_confident_boxes():
    zebra = [at(0.5, 0.2)]
    confident_right = {"car": [at(0.5, 0.1, score=0.35), at(0.5, 0.8, score=0.95)], "zebra": zebra}
    confident_wrong = {"car": [at(0.5, 0.1, score=0.95), at(0.5, 0.8, score=0.35)], "zebra": zebra}
    assert spatial_score(confident_right, INFO) == pytest.approx(0.9)
    assert spatial_score(confident_wrong, INFO) == pytest.approx(0.4)


def test_spatial_score_with_the_same_object_twice():
    info = {"obj1": "cat", "obj2": "cat", "locality": "left of"}
    assert spatial_score({"cat": [at(0.5, 0.5)]}, info) == pytest.approx(0.2)
    assert spatial_score({"cat": [at(0.8, 0.5, score=0.9), at(0.2, 0.5, score=0.8)]}, info) == pytest.approx(
        0.9
    )


# ----------------------------------------------------------------------------- numeracy and objects


def items(**counts):
    return [{"obj_name": name, "num": num} for name, num in counts.items()]


def test_numeracy_exact_wrong_absent():
    two = [at(0.2, 0.5), at(0.8, 0.5)]
    assert numeracy_score({"cup": two}, items(cup=2)) == 1.0
    assert numeracy_score({"cup": two + [at(0.5, 0.2)]}, items(cup=2)) == pytest.approx(0.2)
    assert numeracy_score({}, items(cup=2)) == 0.0
    assert numeracy_score({"cup": two, "dog": [at(0.5, 0.5)]}, items(cup=2, dog=3)) == pytest.approx(
        0.5 + 0.1
    )
    assert numeracy_score({"cup": two}, items(cup=2, dog=1)) == pytest.approx(0.5)
    assert numeracy_score({}, []) == 1.0


def test_numeracy_counts_after_nms():
    duplicate = Box(0.21, 0.41, 0.31, 0.51, 0.5)  # IoU with the first box ~0.68 > 0.5: the same cup
    boxes = [at(0.25, 0.45, score=0.9), duplicate, at(0.75, 0.45, score=0.8)]
    assert len(nms(boxes)) == 2 and nms(boxes)[0].score == 0.9
    assert numeracy_score({"cup": boxes}, items(cup=2)) == 1.0
    assert numeracy_score({"cup": boxes}, items(cup=3)) == pytest.approx(0.2)


def test_object_fraction_and_no_nouns():
    found = {"cat": [at(0.5, 0.5)], "dog": [at(0.2, 0.2)]}
    assert object_score(found, ["cat", "dog", "car"]) == pytest.approx(2 / 3)
    assert object_score(found, ["cat", "cat", "car"]) == pytest.approx(1 / 2)
    assert object_score({}, []) == 1.0


def test_grounding_score_dispatches_on_task_type():
    right = {"car": [at(0.5, 0.8)], "zebra": [at(0.5, 0.2)]}
    spatial = PromptRecord("a car below a zebra", "spatial", ("car", "zebra"), spatial_info=INFO)
    assert grounding_score(spatial, right) == pytest.approx(0.9)
    position = PromptRecord("a car below a zebra", "position", ("car", "zebra"), spatial_info=INFO)
    assert grounding_score(position, right) == pytest.approx(0.9)
    counting = PromptRecord("two cars", "counting", ("car",), numeracy_info=tuple(items(car=2)))
    assert grounding_score(counting, right) == pytest.approx(0.2)
    # "complex" prompts are scored by presence even when they carry spatial_info (REWARDS.md: by task_type).
    complex_ = PromptRecord("a car below a zebra", "complex", ("car", "zebra", "tree"), spatial_info=INFO)
    assert grounding_score(complex_, right) == pytest.approx(2 / 3)
    assert grounding_score(PromptRecord("a sunset", "non"), {}) == 1.0


def test_query_phrases_and_caption():
    spatial = PromptRecord("x", "spatial", ("car", "zebra", "road"), spatial_info=INFO)
    assert query_phrases(spatial) == ["car", "zebra"]
    counting = PromptRecord("x", "numeracy", ("cup",), numeracy_info=tuple(items(cup=2, dog=1)))
    assert query_phrases(counting) == ["cup", "dog"]
    assert query_phrases(PromptRecord("x", "color", ("Teddy Bear", "cat", "cat"))) == ["Teddy Bear", "cat"]
    text = caption(["Teddy Bear", "cat"])
    assert text == "teddy bear . cat ."
    assert phrase_spans(text, ["Teddy Bear", "cat"]) == [(0, 10), (13, 16)]


def test_assign_boxes_picks_each_querys_best_phrase_above_threshold():
    # tokens: [CLS] teddy bear . cat . [SEP]
    probs = torch.zeros(3, 7)
    probs[0, 2] = 0.9  # query 0: "bear" token -> teddy bear
    probs[1, 4], probs[1, 1] = 0.5, 0.4  # query 1: cat beats teddy
    probs[2, 4] = 0.29  # query 2: under the 0.3 box threshold
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    found = assign_boxes(probs, boxes, [[1, 2], [4]], ["teddy bear", "cat"], 0.3)
    assert set(found) == {"teddy bear", "cat"}
    (bear,) = found["teddy bear"]
    assert (bear.x0, bear.y0, bear.x1, bear.y1) == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert bear.score == pytest.approx(0.9) and found["cat"][0].score == pytest.approx(0.5)


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"))


@pytest.fixture(scope="module")
def records():
    return load_prompts(SAMPLE)[::8]  # one record of each of the eight categories


def test_tiny_model_scores_every_category(tiny_dir, records):
    expert = GroundingDinoExpert(str(tiny_dir))
    images = torch.randint(
        0, 256, (len(records), 24, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    scores = expert(images, records)
    assert scores.shape == (len(records),) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()


def test_tiny_model_with_nothing_detected(tiny_dir, records):
    # No probability reaches 1: every object-bearing prompt scores 0 (numeracy asks for >= 1 object).
    expert = GroundingDinoExpert(str(tiny_dir), box_threshold=1.0, batch_size=5)
    images = torch.randint(0, 256, (len(records), 16, 16, 3), dtype=torch.uint8)
    no_nouns = PromptRecord("a quiet evening", "non")
    scores = expert(torch.cat([images, images[:1]]), [*records, no_nouns])
    assert scores[:-1].tolist() == [0.0] * len(records) and scores[-1] == 1.0


def test_no_noun_prompts_skip_the_detector(tiny_dir, monkeypatch):
    expert = GroundingDinoExpert(str(tiny_dir))
    monkeypatch.setattr(expert, "detect", lambda *a: pytest.fail("the detector ran without objects to find"))
    assert expert(
        torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [PromptRecord("a quiet evening")] * 2
    ).tolist() == [1.0, 1.0]


def test_detected_boxes_are_normalised_and_belong_to_asked_phrases(tiny_dir):
    expert = GroundingDinoExpert(str(tiny_dir), box_threshold=0.01)
    found = expert.detect(
        torch.randint(0, 256, (2, 20, 30, 3), dtype=torch.uint8), [["teddy bear", "cat"], ["zebra"]]
    )
    assert set(found[0]) <= {"teddy bear", "cat"} and set(found[1]) <= {"zebra"}
    assert sum(len(b) for f in found for b in f.values()) > 0
    for boxes in (b for f in found for b in f.values()):
        assert all(0.01 <= box.score <= 1 and box.x0 <= box.x1 and box.y0 <= box.y1 for box in boxes)


def test_bad_arguments_and_missing_checkpoint(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="box_threshold must be in"):
        GroundingDinoExpert(str(tiny_dir), box_threshold=0)
    with pytest.raises(ExpertCheckpointError, match=r"gdino.*not found: .*missing_gdino.*model_name_or_path"):
        GroundingDinoExpert(str(tmp_path / "missing_gdino"))
