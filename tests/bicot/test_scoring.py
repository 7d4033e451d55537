"""Per-category aggregation of expert scores (hand-made numbers), the result files, the benchmark guess."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from bicot.scoring import (
    ALL,
    CategoryMeans,
    FolderData,
    FolderScorer,
    ScoreRow,
    ScoreTable,
    folder_benchmark,
    infer_benchmark,
)
from datamodules.prompts import PromptDataError
from datamodules.records import PromptRecord
from modules.rewards.color import COLORS, MAX_DIST, ColorMatchExpert
from modules.rewards.ensemble import RewardEnsemble


def hand_made() -> CategoryMeans:
    metric = CategoryMeans(["hps", "gdino"], ["spatial", "color", "texture"])
    metric.update(
        {"hps": torch.tensor([0.2, 0.4, 0.9]), "gdino": torch.tensor([1.0, 0.0, 0.5])},
        ["color", "color", "spatial"],
        [True, True, True],
    )
    metric.update({"hps": torch.tensor([0.3]), "gdino": torch.tensor([0.0])}, ["color"], [False])
    return metric


def test_category_means_by_hand():
    metric = hand_made()
    table = ScoreTable.from_state(metric.compute(), metric, run="janus", benchmark="compbench")
    rows = {r.category: r for r in table.rows}
    assert [r.category for r in table.rows] == ["color", "spatial", ALL]  # texture saw no image: no row
    assert rows["color"].images == 3 and rows["color"].unreadable == 1
    assert rows["color"].means["hps"] == pytest.approx((0.2 + 0.4 + 0.3) / 3)
    assert rows["color"].means["gdino"] == pytest.approx(1.0 / 3)
    assert rows["spatial"].means == pytest.approx({"hps": 0.9, "gdino": 0.5})
    # `all` is the mean over images, not the mean of the category means.
    assert rows[ALL].images == 4
    assert rows[ALL].means["hps"] == pytest.approx((0.2 + 0.4 + 0.9 + 0.3) / 4)
    metrics = table.metrics()
    assert metrics["test/hps/spatial"] == pytest.approx(0.9)
    assert metrics["test/gdino/all"] == pytest.approx(1.5 / 4)
    assert len(metrics) == 6


def test_one_category_one_expert_keeps_its_shape():
    metric = CategoryMeans(["orm"], ["color"])
    metric.update({"orm": torch.tensor([1.0, 0.0])}, ["color", "color"], [True, True])
    table = ScoreTable.from_state(metric.compute(), metric, "r", "toy")
    assert [(r.category, r.images, r.means["orm"]) for r in table.rows] == [("color", 2, 0.5), (ALL, 2, 0.5)]


def test_metric_keys_replace_characters_mlflow_rejects():
    # MLflow keys hold letters, digits, _ - . / and spaces only
    metric = CategoryMeans(["hps"], ["color+shape (2d)"])
    metric.update({"hps": torch.tensor([0.5])}, ["color+shape (2d)"], [True])
    table = ScoreTable.from_state(metric.compute(), metric, "r", "toy")
    assert table.metrics() == {"test/hps/color_shape _2d_": 0.5, "test/hps/all": 0.5}


def test_undeclared_category_is_an_error():
    with pytest.raises(ValueError, match=r"categories \['shape'\] were not declared"):
        CategoryMeans(["hps"], ["color"]).update({"hps": torch.tensor([1.0])}, ["shape"], [True])


def test_csv_and_markdown(tmp_path):
    metric = hand_made()
    table = ScoreTable.from_state(metric.compute(), metric, run="janus", benchmark="compbench")
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert list(rows[0]) == ["run", "benchmark", "category", "images", "unreadable", "hps", "gdino"]
    assert [(r["run"], r["benchmark"], r["category"], r["images"]) for r in rows] == [
        ("janus", "compbench", "color", "3"),
        ("janus", "compbench", "spatial", "1"),
        ("janus", "compbench", "all", "4"),
    ]
    assert float(rows[1]["hps"]) == pytest.approx(0.9)
    md = table.to_markdown()
    assert "| spatial | 1 | 0.9000 | 0.5000 |" in md and "1 unreadable image(s) scored 0." in md
    paths = table.write(tmp_path / "scores", [{"prompt": "a", "hps": 0.2}])
    assert [p.name for p in paths] == ["scores.csv", "scores.md", "scores.jsonl"]
    assert (tmp_path / "scores" / "scores.jsonl").read_text() == '{"prompt": "a", "hps": 0.2}\n'


def test_nan_for_missing_scores_is_written_empty():
    table = ScoreTable("r", "toy", ["hps"])
    table.rows.append(ScoreRow("color", 0, 0, {"hps": math.nan}))
    assert table.to_csv().splitlines()[1] == "r,toy,color,0,0,"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (PromptRecord("a cup", extra={"include": [], "exclude": []}, source="m.jsonl:1"), "geneval"),
        # most GenEval records have no "exclude" (only counting ones do)
        (PromptRecord("a cup", extra={"tag": "single_object", "include": []}, source="m.jsonl:1"), "geneval"),
        (PromptRecord("a cup", extra={"prompt_id": 3}, source="cultural.json:1"), "wise"),
        (PromptRecord("a cup", source="/data/t2i_compbench/non_spatial_val.txt:4"), "compbench"),
        (PromptRecord("a cup", source="datamodules/toyworld/data/test.jsonl:9"), "toy"),
        (PromptRecord("a cup", source="my/prompts.jsonl:2"), "prompts"),
        (PromptRecord("a cup", source="eval/run/plans.jsonl:2"), "plain"),
    ],
)
def test_infer_benchmark(record, expected):
    assert infer_benchmark([record]) == expected


def test_infer_benchmark_of_no_records():
    assert infer_benchmark([]) == "prompts"


def test_prediction_json_names_the_benchmark(tmp_path):
    records = [PromptRecord("a cup", source="my/prompts.jsonl:2")]
    assert folder_benchmark(tmp_path, records) == "prompts"  # no manifest: inferred from the prompts
    (tmp_path / "prediction.json").write_text(json.dumps({"seed": 1, "benchmark": "wise"}))
    assert folder_benchmark(tmp_path, records) == "wise"
    (tmp_path / "prediction.json").write_text(json.dumps({"seed": 1, "benchmark": ""}))
    assert folder_benchmark(tmp_path, records) == "prompts"  # an empty name: inferred


def write_image(path, rgb, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def score_folder(folder, expect_unreadable=False, **data_args):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    warns = (
        pytest.warns(UserWarning, match="cannot be read") if expect_unreadable else contextlib.nullcontext()
    )
    with warns:
        scorer = FolderScorer(RewardEnsemble([ColorMatchExpert()]))
        trainer.test(scorer, FolderData(str(folder), **data_args), verbose=False)
    return list(csv.DictReader((folder / "scores.csv").open()))


def test_folder_scorer_by_hand(tmp_path):
    folder = tmp_path / "run_a"
    rows = [
        {"image": "00000_0000.png", "prompt": "a red cup", "task_type": "color"},
        {"image": "00001_0000.png", "prompt": "a blue kite", "task_type": "color"},
        {"image": "00002_0000.png", "prompt": "a green bench", "task_type": "shape"},
    ]
    write_image(folder / rows[0]["image"], COLORS["red"])
    write_image(folder / rows[1]["image"], COLORS["red"], size=(6, 3))  # another size: its own group
    (folder / rows[2]["image"]).write_bytes(b"not a png")  # unreadable: 0, and counted
    (folder / "plans.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {r["category"]: r for r in score_folder(folder, expect_unreadable=True, batch_size=3)}
    red, blue = (torch.tensor(COLORS[c], dtype=torch.float32) for c in ("red", "blue"))
    blue_kite = 1 - float(torch.linalg.vector_norm(red - blue)) / MAX_DIST
    assert float(table["color"]["color"]) == pytest.approx((1.0 + blue_kite) / 2, abs=1e-5)
    assert (table["shape"]["color"], table["shape"]["unreadable"]) == ("0.000000", "1")
    assert table["all"]["run"] == "run_a" and table["all"]["images"] == "3"
    assert table["all"]["benchmark"] == "plain"  # no prediction.json: a plain prediction folder


def test_scores_jsonl_rows_by_hand(tmp_path):
    folder = tmp_path / "run_a"
    rows = [
        {"image": "samples/00000_0000.png", "prompt": "a red cup", "task_type": "color", "plan": "A cup.", "seed": 3},
        {"image": "samples/00001_0000.png", "prompt": "a red kite", "task_type": "color"},
    ]
    write_image(folder / rows[0]["image"], COLORS["red"])
    (folder / rows[1]["image"]).write_bytes(b"not a png")
    (folder / "plans.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_folder(folder, expect_unreadable=True)
    lines = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    # the image relative to the folder, the index's plan and seed, and each expert's score (red on red: 1)
    assert lines == [
        {"prompt": "a red cup", "category": "color", "image": "samples/00000_0000.png", "readable": True,
         "plan": "A cup.", "seed": 3, "color": pytest.approx(1.0)},
        {"prompt": "a red kite", "category": "color", "image": "samples/00001_0000.png", "readable": False,
         "color": 0.0},
    ]


@pytest.mark.parametrize(
    ("images", "world", "shards"),
    [
        (5, 2, [[0, 1, 2], [3, 4]]),
        (7, 3, [[0, 1, 2], [3, 4, 5], [6]]),
        (4, 3, [[0, 1], [2, 3], []]),
    ],
)
def test_folder_is_split_into_contiguous_shards_scoring_each_image_once(tmp_path, images, world, shards):
    folder = tmp_path / "run_a"
    names = [f"{i:05d}_0000.png" for i in range(images)]
    for name in names:
        write_image(folder / name, COLORS["red"])
    write_plans(folder, names)
    data = FolderData(str(folder))
    got = []
    for rank in range(world):
        data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        got.append(list(data.test_dataloader().sampler))
    assert got == shards


def test_an_index_that_does_not_exist_is_an_error(tmp_path):
    folder = tmp_path / "run_a"
    write_image(folder / "a red cup_000000.png", COLORS["red"])
    with pytest.raises(PromptDataError, match="index file not found: '.*missing.jsonl'"):
        FolderData(str(folder), index=str(tmp_path / "missing.jsonl")).setup("test")


def test_folder_without_index_reads_prompts_from_file_names(tmp_path):
    folder = tmp_path / "compbench_run"
    write_image(folder / "samples" / "a red cup_000000.png", (255, 0, 0))
    write_image(folder / "samples" / "a red cup_000001.png", (255, 0, 0))
    table = score_folder(folder)
    assert [(r["category"], r["images"]) for r in table] == [("non", "2"), ("all", "2")]
    assert float(table[-1]["color"]) == pytest.approx(1.0)


def write_plans(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image": name, "prompt": "a red cup", "task_type": "color"} for name in names]
    (folder / "plans.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_index_entry_without_its_image_stops_at_setup(tmp_path):
    folder = tmp_path / "run_a"
    write_image(folder / "00000_0000.png", COLORS["red"])
    write_plans(folder, ["00000_0000.png", "00000_0001.png"])  # the second image was never written (or deleted)
    with pytest.raises(PromptDataError) as info:
        score_folder(folder)
    assert str(info.value) == f"{folder / 'plans.jsonl'}, line 2: image '00000_0001.png' not found in {str(folder)!r}"
    assert not (folder / "scores.csv").exists()


def test_every_image_unreadable_is_an_error_not_a_table_of_zeros(tmp_path):
    folder = tmp_path / "run_a"
    write_plans(folder, ["00000_0000.png", "00001_0000.png"])
    for name in ("00000_0000.png", "00001_0000.png"):
        (folder / name).write_bytes(b"not a png")
    with pytest.raises(PromptDataError) as info:
        score_folder(folder, expect_unreadable=True)
    assert str(info.value) == (
        f"none of the 2 file(s) in {str(folder)!r} can be read as an image (e.g. '00000_0000.png'): nothing to score"
    )
    assert not (folder / "scores.csv").exists()


def test_plans_file_given_as_the_folder_points_to_its_folder(tmp_path):
    folder = tmp_path / "run_a"
    write_image(folder / "00000_0000.png", COLORS["red"])
    write_plans(folder, ["00000_0000.png"])
    with pytest.raises(PromptDataError, match=r"plans.jsonl' is a file, not an image folder; .* holds it: '.*run_a'$"):
        FolderData(str(folder / "plans.jsonl")).setup("test")


@pytest.mark.parametrize(("manifest", "words"), [("{not json", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_a_damaged_prediction_json_stops_before_scoring_naming_the_file(tmp_path, manifest, words):
    folder = tmp_path / "run_a"
    write_image(folder / "00000_0000.png", COLORS["red"])
    write_plans(folder, ["00000_0000.png"])
    (folder / "prediction.json").write_text(manifest)
    scored = []
    scorer = FolderScorer(RewardEnsemble([ColorMatchExpert()]))
    scorer.test_step = lambda batch, batch_idx: scored.append(batch)  # must not run
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(PromptDataError, match=f"prediction.json: {words}"):
        trainer.test(scorer, FolderData(str(folder)), verbose=False)
    assert not scored and not (folder / "scores.csv").exists()


def test_scores_jsonl_is_in_the_places_given_whatever_order_the_images_came_in(tmp_path, capsys):
    # bicot test on 2 processes: process 0 draws prompts 0 and 2 (batches 0 and 1), process 1 prompt 1 (batch 0);
    # one process's rows come first when they are gathered, so the rows say where they belong
    from bicot.scoring import ScoreCollector

    collector = ScoreCollector(["color"], ["color"], torch.device("cpu"))
    for prompt, place in (("p0", (0, 0)), ("p2", (1, 0)), ("p1", (0, 1))):
        collector.add({"color": torch.tensor([0.5])}, [PromptRecord(prompt, "color")], [{"seed": 1}], [place])
    module = SimpleNamespace(trainer=SimpleNamespace(is_global_zero=True), loggers=[], log=lambda *a, **k: None)
    collector.finish(module, tmp_path, "run", "toy")
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["p0", "p1", "p2"]
    assert all("_at" not in row for row in rows)  # the written rows hold the images' fields only
    with pytest.raises(ValueError, match="zip"):
        collector.add({"color": torch.tensor([0.5])}, [PromptRecord("p3", "color")], [{}], [(2, 0), (2, 1)])
