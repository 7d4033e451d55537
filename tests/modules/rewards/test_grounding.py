"""Tests for the GroundingDINO expert: prompting, boxes, a tiny model, and parity with the toy detector.

The scoring formulas themselves are tested in ``test_grounding_formulas.py``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from datamodules.prompts import load_prompts
from datamodules.records import PromptRecord
from datamodules.toyworld.scene import Placed, render
from modules.rewards import toy_detector
from modules.rewards.common import ExpertCheckpointError
from modules.rewards.grounding import GroundingDinoExpert, assign_boxes, caption, phrase_spans
from modules.rewards.grounding_formulas import Thresholds, query_phrases
from modules.rewards.tiny import save_tiny_grounding_dino
from modules.rewards.toy_vision import parse_image

SAMPLE = "datamodules/fixtures/t2i_r1_sample.jsonl"


def test_caption_and_phrase_spans():
    text = caption(["Teddy Bear", "cat"])
    assert text == "teddy bear . cat ."
    assert phrase_spans(text, ["Teddy Bear", "cat"]) == [(0, 10), (13, 16)]
    # A phrase inside an earlier one is found after it, not inside it.
    assert phrase_spans(caption(["teddy bear", "bear"]), ["teddy bear", "bear"]) == [(0, 10), (13, 17)]


def test_assign_boxes_picks_each_querys_best_phrase_above_threshold():
    # tokens: [CLS] teddy bear . cat . [SEP]
    probs = torch.zeros(3, 7)
    probs[0, 2] = 0.9  # query 0: "bear" token -> teddy bear
    probs[1, 4], probs[1, 1] = 0.5, 0.4  # query 1: cat beats teddy
    probs[2, 4] = 0.29  # query 2: under the 0.3 box threshold
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    bear, cat = assign_boxes(probs, boxes, [[1, 2], [4]], ["teddy bear", "cat"], 0.3)
    assert (bear.label, cat.label) == ("teddy bear", "cat")
    assert bear.box == pytest.approx((0.4, 0.3, 0.6, 0.7)) and cat.box == pytest.approx(
        (0.15, 0.25, 0.25, 0.35)
    )
    assert bear.score == pytest.approx(0.9) and cat.score == pytest.approx(0.5)
    # A score that reaches the threshold exactly is kept, like the formulas' box threshold.
    assert len(assign_boxes(torch.tensor([[0.0, 0.5]]), boxes[:1], [[1]], ["cat"], 0.5)) == 1


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
    assert {d.label for d in found[0]} <= {"teddy bear", "cat"} and {d.label for d in found[1]} <= {"zebra"}
    assert sum(len(f) for f in found) > 0
    for d in (d for f in found for d in f):
        x0, y0, x1, y1 = d.box
        assert 0.01 <= d.score <= 1 and x0 <= x1 and y0 <= y1


class TokenDetector(torch.nn.Module):
    """Stands in for the detector: query ``q`` is sure (logit 20) on the text tokens with id ``fires[q]``, and
    sure of nothing elsewhere (-20); its box is ``boxes[q]`` (``cx, cy, w, h``)."""

    dtype = torch.float32

    def __init__(self, fires: list[int], boxes: torch.Tensor) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the expert's device is where its parameters are
        self.fires, self.boxes = fires, boxes

    def forward(self, input_ids, pixel_values, **kwargs):
        logits = torch.full((input_ids.shape[0], len(self.fires), input_ids.shape[1]), -20.0)
        for q, token in enumerate(self.fires):
            logits[:, q][input_ids == token] = 20.0
        return SimpleNamespace(logits=logits, pred_boxes=self.boxes.expand(input_ids.shape[0], -1, -1))


def test_each_phrase_owns_exactly_its_own_tokens(tiny_dir, monkeypatch):
    # "[CLS] teddy bear . cat . [SEP]" and "[CLS] zebra . [SEP] [PAD] ...": a box sure of a phrase's first
    # token answers that phrase; one sure of a separator, [CLS] or padding answers none.
    expert = GroundingDinoExpert(str(tiny_dir))
    fires = expert.processor.tokenizer.convert_tokens_to_ids(["teddy", "cat", ".", "[CLS]", "zebra", "[PAD]"])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1], *[[0.5, 0.5, 0.1, 0.1]] * 2,
                          [0.7, 0.6, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1]])
    monkeypatch.setattr(expert, "model", TokenDetector(fires, boxes))
    found = expert.detect(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [["teddy bear", "cat"], ["zebra"]])
    assert [[d.label for d in f] for f in found] == [["teddy bear", "cat"], ["zebra"]]
    (bear, cat), (zebra,) = found
    assert bear.box == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert cat.box == pytest.approx((0.15, 0.25, 0.25, 0.35))
    assert zebra.box == pytest.approx((0.5, 0.5, 0.9, 0.7)) and zebra.score == pytest.approx(1.0)


def test_each_image_goes_to_the_detector_with_its_own_phrases(tiny_dir, monkeypatch):
    expert = GroundingDinoExpert(
        str(tiny_dir), box_threshold=0.25, near_threshold=0.2, iou_threshold=0.15, batch_size=1
    )
    assert expert.thresholds == Thresholds(box_threshold=0.25, iou_threshold=0.15, near_threshold=0.2)
    seen = []

    def detect(images, phrases):
        seen.extend(zip(images[:, 0, 0, 0].tolist(), phrases, strict=True))
        return [[] for _ in phrases]

    monkeypatch.setattr(expert, "detect", detect)
    images = torch.arange(4, dtype=torch.uint8)[:, None, None, None].expand(4, 8, 8, 3).contiguous()
    records = [PromptRecord("dusk"), PromptRecord("a cat", "object", ("cat",)), PromptRecord("dawn")]
    expert(images, [*records, PromptRecord("a dog", "object", ("dog",))])
    assert seen == [(1, ["cat"]), (3, ["dog"])]


def test_too_small_images_score_zero_and_are_counted(tiny_dir):
    expert = GroundingDinoExpert(str(tiny_dir))
    records = [PromptRecord("a cat", "object", ("cat",)), PromptRecord("a quiet evening")]
    with pytest.warns(UserWarning, match="too small"):
        assert expert(torch.zeros(2, 1, 5, 3, dtype=torch.uint8), records).tolist() == [0.0, 0.0]
    assert expert.unreadable == 2
    with warnings.catch_warnings():  # nothing to detect: the size does not matter
        warnings.simplefilter("error")
        assert expert(torch.zeros(1, 1, 1, 3, dtype=torch.uint8), records[1:]).tolist() == [1.0]
    assert expert.unreadable == 2


def test_bad_arguments_and_missing_checkpoint(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="box_threshold must be in"):
        GroundingDinoExpert(str(tiny_dir), box_threshold=0)
    with pytest.raises(ExpertCheckpointError, match=r"gdino.*not found: .*missing_gdino.*model_name_or_path"):
        GroundingDinoExpert(str(tmp_path / "missing_gdino"))


# ----------------------------------------------------------------------------- parity with the toy detector

# Two red circles stacked in column 1, a purple triangle above-left of a blue square, two green triangles.
SCENE = render(
    [
        Placed("circle", "red", 0, 1),
        Placed("circle", "red", 3, 1),
        Placed("triangle", "purple", 0, 2),
        Placed("square", "blue", 3, 3),
        Placed("triangle", "green", 1, 3),
        Placed("triangle", "green", 2, 0),
    ]
)


def spatial(obj1: str, locality: str, obj2: str, task: str = "spatial") -> PromptRecord:
    info = {"obj1": obj1, "obj2": obj2, "locality": locality}
    return PromptRecord(f"a {obj1} {locality} a {obj2}", task, (obj1, obj2), spatial_info=info)


# Each record with its score, computed by hand from the scene's cells (a cell is 1/4 of the side).
PARITY = [
    (spatial("blue square", "below", "purple triangle"), 0.9),  # dy 0.75 > dx 0.25
    (spatial("purple triangle", "left of", "blue square", "position"), 0.4),  # mostly vertical: 0.4
    (spatial("red circle", "above", "Red Circle"), 0.9),  # the same object twice: two circles, stacked
    (spatial("yellow circle", "left of", "blue square"), 0.2),
    (
        PromptRecord(
            "two green triangles and a red circle",
            "numeracy",
            ("triangle", "circle"),
            numeracy_info=({"obj_name": "green triangle", "num": 2}, {"obj_name": "red circle", "num": 1}),
        ),
        0.5 + 0.5 * 0.2,
    ),
    (PromptRecord("a circle, a square and a star", "shape", ("circle", "square", "star")), 2 / 3),
    (
        PromptRecord(
            "a square by a tree",
            "complex",
            ("square", "tree"),
            spatial_info={"obj1": "square", "obj2": "tree", "locality": "near"},
        ),
        0.5,
    ),
    (PromptRecord("a quiet evening", "non"), 1.0),
]


def test_real_expert_and_toy_detector_score_the_same_detections_alike(tiny_dir, monkeypatch):
    parse = parse_image(SCENE)
    records, expected = zip(*PARITY, strict=True)
    asked = []

    def detect(images, phrases):  # the toy detector's detections stand in for the model's
        asked.extend(phrases)
        return [toy_detector.detections(parse, p) for p in phrases]

    expert = GroundingDinoExpert(str(tiny_dir))
    monkeypatch.setattr(expert, "detect", detect)
    images = torch.from_numpy(SCENE).expand(len(records), *SCENE.shape).contiguous()
    real = expert(images, list(records)).tolist()
    toy = toy_detector.ToyDetectorExpert(normalize_spatial=False)(images, list(records)).tolist()
    assert real == toy
    assert real == pytest.approx(list(expected))
    assert asked == [query_phrases(r) for r in records if query_phrases(r)]
