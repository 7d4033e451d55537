"""Tests for the toy world: renderer, grammar, metadata round trip and the shipped disjoint splits."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from datamodules.prompts import PromptDataModule, load_prompts
from datamodules.records import PromptRecord
from datamodules.toyworld.grammar import (
    CATEGORIES,
    COLOR_REFS,
    COUNT_REFS,
    SHAPE_REFS,
    UNSEEN_COMBOS,
    all_items,
)
from datamodules.toyworld.scene import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    RELATIONS,
    Group,
    Placed,
    Relation,
    SceneSpec,
    relation_holds,
    render,
    render_spec,
)
from datamodules.toyworld.schema import spec_from_record, to_metadata
from datamodules.toyworld.splits import DATA_DIR, SPLIT_BY_PROMPT, SPLITS, scene_key, split_items


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[PromptRecord]]:
    return {split: load_prompts(DATA_DIR / f"{split}.jsonl") for split in SPLITS}


def test_shipped_files_are_what_the_generator_writes(shipped):
    generated = split_items()
    for split in SPLITS:
        assert [r.prompt for r in shipped[split]] == [item.prompt for item in generated[split]], split
        for record, item in zip(shipped[split], generated[split], strict=True):
            assert record.to_dict() | {"source": ""} == PromptRecord(
                **{k: v for k, v in to_metadata(item.prompt, item.category, item.spec).items()}
            ).to_dict() | {"source": "", "extra": record.extra}


def test_splits_are_disjoint_by_prompt_and_by_scene(shipped):
    prompts = {split: {r.prompt for r in records} for split, records in shipped.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    train_scenes = {scene_key(spec_from_record(r)) for r in shipped["train"]}
    for split in ("val", "test"):
        held = {
            scene_key(spec)
            for spec, r in ((spec_from_record(r), r) for r in shipped[split])
            if r.task_type not in SPLIT_BY_PROMPT and len(spec.groups) > 1
        }
        assert len(held) > 60 and not held & train_scenes, split


def test_held_out_colour_shape_pairs_never_reach_training(shipped):
    def pairs(records):
        return {(g.color, g.shape) for r in records for g in spec_from_record(r).groups if g.color}

    assert not pairs(shipped["train"]) & UNSEEN_COMBOS
    assert pairs(shipped["val"]) >= UNSEEN_COMBOS and pairs(shipped["test"]) >= UNSEEN_COMBOS
    for split in ("val", "test"):
        flagged = [r for r in shipped[split] if r.extra.get("unseen_combo")]
        assert 0 < len(flagged) < len(shipped[split]) / 2


def test_every_category_in_every_split(shipped):
    for split, records in shipped.items():
        counts = {c: sum(r.task_type == c for r in records) for c in CATEGORIES}
        assert all(n > 0 for n in counts.values()), (split, counts)
    assert all(sum(r.task_type == c for r in shipped["val"]) == 30 for c in CATEGORIES)


def test_reasoning_prompts_use_at_least_twenty_indirect_references(shipped):
    refs = [*COLOR_REFS, *SHAPE_REFS, *COUNT_REFS]
    assert len(set(refs)) >= 20
    reasoning = [r.prompt for records in shipped.values() for r in records if r.task_type == "reasoning"]
    used = {ref for ref in refs if any(ref in p for p in reasoning)}
    assert used == set(refs)
    for prompt in reasoning:
        if "painted" not in prompt and not re.search(r"as many \w+ \w+s as", prompt):
            # Colours are named only through references (except the explicit "painted"/counted variants).
            assert not set(prompt.replace(",", "").split()) & set(COLORS), prompt


def test_metadata_round_trips_to_the_same_scene():
    for category, items in all_items().items():
        for item in items[:: max(1, len(items) // 40)]:
            meta = to_metadata(item.prompt, category, item.spec)
            record = PromptRecord(**meta)
            # Coloured groups are read before colour-free ones: the same scene, maybe in another order.
            assert scene_key(spec_from_record(record)) == scene_key(item.spec), item.prompt


def test_spec_from_record_rejects_non_toy_metadata():
    with pytest.raises(ValueError, match="not a toy-world record"):
        spec_from_record(PromptRecord("a photo of a zebra", nouns=("zebra",)))


def test_render_draws_each_object_in_its_cell_on_white():
    image = render([Placed("square", "red", 0, 0), Placed("circle", "blue", 3, 3)])
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    red = np.all(image == COLORS["red"], axis=-1)
    blue = np.all(image == COLORS["blue"], axis=-1)
    assert red.sum() == 36 and red[:8, :8].sum() == 36
    assert blue.sum() == 24 and blue[24:, 24:].sum() == 24
    assert np.all(image[8:24, 8:24] == BACKGROUND)


@pytest.mark.parametrize("locality", ["left of", "right of", "above", "below", "on top of", "next to", "near"])
def test_sampled_layouts_satisfy_the_relation(locality):
    rng = random.Random(3)
    spec = SceneSpec((Group("circle", "red", 2), Group("square", "blue")), Relation(0, 1, locality))
    for _ in range(20):
        _, concrete_spec, placed = render_spec(spec, rng)
        a = [p.centre for p in placed if p.shape == "circle"]
        b = [p.centre for p in placed if p.shape == "square"]
        assert len(a) == 2 and len(b) == 1
        kind = RELATIONS[locality]
        assert all(relation_holds(kind, p, q) for p in a for q in b)


def test_colour_free_groups_get_allowed_colours():
    rng = random.Random(0)
    spec = SceneSpec((Group("triangle"),))
    colours = {render_spec(spec, rng, lambda c, s: c != "purple")[1].groups[0].color for _ in range(60)}
    assert "purple" not in colours and len(colours) == 5


def test_datamodule_reads_the_shipped_files():
    dm = PromptDataModule(
        train_file=str(DATA_DIR / "train.jsonl"), val_file=str(DATA_DIR / "val.jsonl"), batch_size=4, shuffle=False
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and all(isinstance(r, PromptRecord) for r in batch)
    first = json.loads((DATA_DIR / "train.jsonl").read_text().splitlines()[0])
    assert batch[0].prompt == first["prompt"] and batch[0].task_type == first["task_type"]
