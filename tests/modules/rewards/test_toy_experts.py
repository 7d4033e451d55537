"""Tests for the toy world's programmatic experts: faithful renders score 1, each violation hits the right expert."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from datamodules.prompts import load_prompts
from datamodules.records import PromptRecord
from datamodules.toyworld.grammar import CATEGORIES
from datamodules.toyworld.scene import COLORS, Placed, render, render_spec
from datamodules.toyworld.schema import spec_from_record
from datamodules.toyworld.splits import DATA_DIR
from modules.rewards.ensemble import RewardEnsemble, RewardExpertError
from modules.rewards.toy_attribute import ToyAttributeExpert
from modules.rewards.toy_clean import ToyCleanExpert
from modules.rewards.toy_detector import ToyDetectorExpert
from modules.rewards.toy_orm import ToyORMExpert
from modules.rewards.toy_vision import parse_image

EXPERTS = (ToyDetectorExpert, ToyAttributeExpert, ToyCleanExpert, ToyORMExpert)


def scores(images: list[np.ndarray], records: list[PromptRecord]) -> dict[str, list[float]]:
    batch = torch.from_numpy(np.stack(images))
    return {cls.name: cls()(batch, records).tolist() for cls in EXPERTS}


def record(prompt: str, task_type: str, **meta) -> PromptRecord:
    meta = {k: tuple(v) if k in ("nouns", "attr_nouns", "numeracy_info") else v for k, v in meta.items()}
    return PromptRecord(prompt, task_type, **meta)


RED_CIRCLE = record("a red circle", "color", nouns=["circle"], attr_nouns=["red circle"])
LEFT_OF = record(
    "a red circle left of a blue square",
    "spatial",
    nouns=["circle", "square"],
    attr_nouns=["red circle", "blue square"],
    spatial_info={"obj1": "red circle", "obj2": "blue square", "locality": "left of"},
)
THREE = record(
    "three green triangles",
    "numeracy",
    nouns=["triangle"],
    attr_nouns=["green triangle"],
    numeracy_info=[{"obj_name": "green triangle", "num": 3}],
)


@pytest.mark.parametrize("category", CATEGORIES)
def test_faithful_renders_score_one_on_every_expert(category):
    rng = random.Random(7)
    records = [r for split in ("train", "val") for r in load_prompts(DATA_DIR / f"{split}.jsonl")]
    chosen = [r for r in records if r.task_type == category][::7][:24]
    images = [render_spec(spec_from_record(r), rng)[0] for r in chosen]
    for name, values in scores(images, chosen).items():
        assert values == [1.0] * len(chosen), (category, name)


def test_the_eye_reads_colour_shape_and_box():
    objects = parse_image(render([Placed("triangle", "purple", 1, 2)])).objects
    assert len(objects) == 1
    (o,) = objects
    assert (o.color, o.shape, o.confidence) == ("purple", "triangle", 1.0)
    assert o.centre == pytest.approx((2.5 / 4, 1.5 / 4))


def test_wrong_colour_lowers_attribute_and_orm_only():
    s = scores([render([Placed("circle", "blue", 1, 1)])], [RED_CIRCLE])
    assert s["toy_attribute"] == [0.0] and s["toy_orm"] == [0.0]
    assert s["toy_detector"] == [1.0] and s["toy_clean"] == [1.0]  # nouns are bare shapes, as in T2I-R1


def test_wrong_shape_lowers_detector_attribute_and_orm():
    s = scores([render([Placed("square", "red", 1, 1)])], [RED_CIRCLE])
    assert s["toy_detector"] == [0.0] and s["toy_attribute"] == [0.0] and s["toy_orm"] == [0.0]
    assert s["toy_clean"] == [1.0]


def test_wrong_relation_lowers_detector_and_orm():
    wrong = render([Placed("circle", "red", 1, 3), Placed("square", "blue", 1, 0)])
    s = scores([wrong], [LEFT_OF])
    assert s["toy_detector"][0] == pytest.approx(0.4 / 0.9)
    assert s["toy_orm"] == [0.0]
    assert s["toy_attribute"] == [1.0] and s["toy_clean"] == [1.0]


def test_missing_object_lowers_detector_attribute_and_orm():
    s = scores([render([Placed("circle", "red", 1, 0)])], [LEFT_OF])
    assert s["toy_detector"][0] == pytest.approx(0.2 / 0.9)
    assert s["toy_attribute"] == [0.5] and s["toy_orm"] == [0.0]


def test_wrong_count_lowers_detector_and_orm():
    two = render([Placed("triangle", "green", 0, 0), Placed("triangle", "green", 2, 2)])
    s = scores([two], [THREE])
    assert s["toy_detector"] == [pytest.approx(0.2)] and s["toy_orm"] == [0.0]
    assert s["toy_attribute"] == [1.0]


def test_extra_object_lowers_orm_only():
    extra = render([Placed("circle", "red", 0, 0), Placed("square", "yellow", 3, 3)])
    s = scores([extra], [RED_CIRCLE])
    assert s["toy_orm"] == [0.0]
    assert s["toy_detector"] == [1.0] and s["toy_attribute"] == [1.0] and s["toy_clean"] == [1.0]


def test_noise_and_specks_lower_cleanliness_only():
    image = render([Placed("circle", "red", 1, 1)])
    specks = image.copy()
    specks[30, 2] = specks[2, 30] = COLORS["blue"]  # stray single pixels: not objects
    tinted = image.copy()
    tinted[image.sum(-1) == 765] = (205, 205, 205)  # a grey cast over the background
    s = scores([image, specks, tinted], [RED_CIRCLE] * 3)
    assert s["toy_clean"][0] == 1.0 and s["toy_clean"][1] < 1.0 and s["toy_clean"][2] < 0.5
    assert s["toy_orm"] == [1.0, 1.0, 1.0] and s["toy_detector"] == [1.0, 1.0, 1.0]


def test_a_smudged_shape_is_unrecognised():
    image = render([Placed("circle", "red", 1, 1)])
    image[10:13, 12:22] = COLORS["red"]  # a bar smeared out of the circle into the next cell
    (blob,) = parse_image(image).objects
    assert not blob.recognised
    s = scores([image], [RED_CIRCLE])
    assert s["toy_clean"][0] < 1.0 and s["toy_orm"] == [0.0] and s["toy_attribute"][0] < 1.0


def test_blank_image_scores_zero_where_content_is_asked():
    s = scores([render([])], [RED_CIRCLE])
    assert s["toy_detector"] == [0.0] and s["toy_attribute"] == [0.0] and s["toy_orm"] == [0.0]
    assert s["toy_clean"] == [1.0]


def test_experts_run_in_the_ensemble():
    ensemble = RewardEnsemble([cls() for cls in EXPERTS], weights={"toy_orm": 2.0})
    batch = torch.from_numpy(np.stack([render([Placed("circle", "red", 0, 0)]), render([])]))
    out = ensemble(batch, [RED_CIRCLE, RED_CIRCLE])
    assert out.total.tolist() == pytest.approx([5.0, 1.0])
    assert set(out.per_expert) == {"toy_detector", "toy_attribute", "toy_clean", "toy_orm"}


def test_orm_stops_on_records_that_are_not_toy_scenes():
    ensemble = RewardEnsemble([ToyORMExpert()])
    zebra = PromptRecord("a photo of a zebra", "object", nouns=("zebra",))
    with pytest.raises(RewardExpertError, match="not a toy-world record"):
        ensemble(torch.from_numpy(render([])[None]), [zebra])
