"""BenchmarkWriter: each benchmark's layout (names, counts, index order), plans.jsonl, merging, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.prediction_writer import BenchmarkWriter, PredictionLayoutError
from datamodules.prompts import PromptDataModule, load_prompts
from modules.rewards.folder import ImageFolderPrompts
from modules.seeding import image_seed, prompt_line


class Painter(pl.LightningModule):
    """Draws image ``sample`` of the prompt on ``line`` as a flat grey of value ``line * 20 + sample``,
    so that every written file can be traced back to the prediction row it came from."""

    def __init__(self, per_prompt: int, plans: bool = True) -> None:
        super().__init__()
        self.per_prompt, self.plans = per_prompt, plans

    def predict_step(self, batch, batch_idx):
        rows = [(r, i) for r in batch for i in range(self.per_prompt)]
        shade = [prompt_line(r) * 20 + i for r, i in rows]
        return {
            "images": torch.stack([torch.full((4, 6, 3), v, dtype=torch.uint8) for v in shade]),
            "image_tokens": None,
            "plans": [f"plan of {r.prompt} #{i}" for r, i in rows] if self.plans else None,
            "prompts": [r.prompt for r, _ in rows],
            "seeds": [image_seed(7, prompt_line(r), i) for r, i in rows],
        }


def predict(
    tmp_path: Path,
    prompt_file: Path,
    writer: BenchmarkWriter,
    per_prompt: int,
    plans: bool = True,
    max_prompts=None,
):
    data = PromptDataModule(predict_file=str(prompt_file), val_batch_size=2, max_prompts=max_prompts)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=tmp_path,
    )
    return trainer.predict(Painter(per_prompt, plans), datamodule=data)


def shade(path: Path) -> int:
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (4, 6, 3) and (pixels == pixels.flat[0]).all()
    return int(pixels.flat[0])


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "plans.jsonl").read_text().splitlines()]


COMPBENCH_PROMPTS = ["a red book and a blue cup", "a green bench", "a yellow kite"]


@pytest.fixture
def compbench_file(tmp_path) -> Path:
    path = tmp_path / "color_val.txt"
    path.write_text("\n".join(COMPBENCH_PROMPTS) + "\n")
    return path


def test_compbench_names_counts_and_running_index(tmp_path, compbench_file):
    out = tmp_path / "out"
    predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "compbench", images_per_prompt=3), 3)
    names = sorted(p.name for p in (out / "samples").iterdir())
    expected = [f"{p}_{line * 3 + i:06d}.png" for line, p in enumerate(COMPBENCH_PROMPTS) for i in range(3)]
    assert names == sorted(expected)
    # One running index over the file, in prompt order: what T2I-CompBench sorts and splits on.
    by_index = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]))
    assert [n.split("_")[0] for n in by_index] == [p for p in COMPBENCH_PROMPTS for _ in range(3)]
    for line, prompt in enumerate(COMPBENCH_PROMPTS):
        for i in range(3):
            assert shade(out / "samples" / f"{prompt}_{line * 3 + i:06d}.png") == line * 20 + i
    assert sorted(p.name for p in out.iterdir()) == ["plans.jsonl", "prediction.json", "samples"]


def test_compbench_protocol_is_ten_images_per_prompt(tmp_path, compbench_file):
    writer = BenchmarkWriter(str(tmp_path / "out"), "compbench")
    assert writer.images_per_prompt == 10
    with pytest.raises(PredictionLayoutError, match="expects 10 images per prompt but the model drew 2"):
        predict(tmp_path, compbench_file, writer, 2)


def test_compbench_refuses_underscores_naming_the_line(tmp_path):
    path = tmp_path / "color_val.txt"
    path.write_text("a red cup\na snake_case banner\n")
    writer = BenchmarkWriter(str(tmp_path / "out"), "compbench", images_per_prompt=1)
    with pytest.raises(
        PredictionLayoutError, match=r"color_val.txt:2: prompt 'a snake_case banner' contains '_'"
    ):
        predict(tmp_path, path, writer, 1)


def test_plans_jsonl_matches_the_images_and_reads_back(tmp_path, compbench_file):
    out = tmp_path / "out"
    predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "compbench", images_per_prompt=2), 2)
    rows = read_rows(out)
    files = sorted(str(p.relative_to(out)) for p in (out / "samples").iterdir())
    assert sorted(r["image"] for r in rows) == files  # one row per image, no more
    assert [(r["line"], r["sample"]) for r in rows] == [(line, i) for line in range(3) for i in range(2)]
    for row in rows:
        assert shade(out / row["image"]) == row["line"] * 20 + row["sample"]
        assert row["prompt"] == COMPBENCH_PROMPTS[row["line"]]
        assert row["plan"] == f"plan of {row['prompt']} #{row['sample']}"
        assert row["seed"] == image_seed(7, row["line"], row["sample"])
        assert row["task_type"] == "color"  # the file's T2I-CompBench category travels with the image
    records = load_prompts(out / "plans.jsonl")
    assert [r.task_type for r in records] == ["color"] * 6
    items = ImageFolderPrompts(out, out / "plans.jsonl")
    assert [Path(p).name for p, _ in items.items] == [Path(r["image"]).name for r in rows]
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest | {"model": None} == {
        "layout": "compbench",
        "benchmark": "compbench",
        "images": 6,
        "prompts": 3,
        "images_per_prompt": 2,
        "with_plans": True,
        "model": None,
    }


GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "color_attr",
        "include": [
            {"class": "cup", "count": 1, "color": "red"},
            {"class": "kite", "count": 1, "color": "blue"},
        ],
        "exclude": [{"class": "cup", "count": 2}],
        "prompt": "a photo of a red cup and a blue kite",
    },
]


def test_geneval_folders_metadata_and_samples(tmp_path):
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    out = tmp_path / "out"
    predict(tmp_path, prompts, BenchmarkWriter(str(out), "geneval"), 4, plans=False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001"]
    for line, record in enumerate(GENEVAL):
        folder = out / f"{line:05d}"
        with (folder / "metadata.jsonl").open() as f:
            assert json.load(f) == record  # GenEval's scorer json.load()s exactly its own record
        # ... and copies json.dumps() of it into results.jsonl, where prompts are grouped by that string:
        # the file is the prompt file's line, keys in GenEval's order (tag, include, exclude, prompt).
        assert (folder / "metadata.jsonl").read_text() == json.dumps(record) + "\n"
        assert sorted(p.name for p in (folder / "samples").iterdir()) == [f"{i:04d}.png" for i in range(4)]
        assert [shade(folder / "samples" / f"{i:04d}.png") for i in range(4)] == [
            line * 20 + i for i in range(4)
        ]
    rows = read_rows(out)
    assert all(r["plan"] is None for r in rows) and len(rows) == 8
    assert [r.task_type for r in load_prompts(out / "plans.jsonl")] == ["single_object"] * 4 + [
        "color_attr"
    ] * 4


def test_geneval_metadata_is_the_shipped_prompt_line_byte_for_byte(tmp_path):
    source = Path(__file__).resolve().parents[2] / "data" / "geneval" / "evaluation_metadata.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines()
    records = load_prompts(source)
    assert len(records) == len(lines) == 553  # GenEval's evaluation prompts, one folder each
    out = tmp_path / "out"
    writer = BenchmarkWriter(str(out), "geneval", images_per_prompt=1)
    writer.setup(fake_trainer(0, 1), None, "test")
    prediction = {
        "images": torch.zeros((len(records), 2, 2, 3), dtype=torch.uint8),
        "prompts": [r.prompt for r in records],
        "plans": None,
        "seeds": list(range(len(records))),
    }
    writer.write_batch(fake_trainer(0, 1), prediction, records)
    for n, line in enumerate(lines):
        assert (out / f"{n:05d}" / "metadata.jsonl").read_text(encoding="utf-8") == line + "\n"
        assert (out / f"{n:05d}" / "samples" / "0000.png").is_file()


def test_geneval_layout_needs_geneval_records(tmp_path, compbench_file):
    with pytest.raises(PredictionLayoutError, match="layout geneval needs GenEval metadata records"):
        predict(tmp_path, compbench_file, BenchmarkWriter(str(tmp_path / "out"), "geneval", 1), 1)


def test_wise_files_are_named_by_prompt_id(tmp_path):
    # Invented records in WISE's format (WISE's own prompts are never shipped).
    wise = [
        {
            "prompt_id": 41,
            "Prompt": "the fruit a famous physicist saw falling",
            "Explanation": "an apple",
            "Subcategory": "Physics",
            "Category": "Natural science",
        },
        {
            "prompt_id": 7,
            "Prompt": "the flower on a country's tulip fields",
            "Explanation": "a tulip",
            "Subcategory": "Festival",
        },
    ]
    prompts = tmp_path / "my_wise.json"
    prompts.write_text(json.dumps(wise, indent=2))
    out = tmp_path / "out"
    predict(tmp_path, prompts, BenchmarkWriter(str(out), "wise"), 1, plans=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["41.png", "7.png"]
    assert shade(out / "41.png") == 0 and shade(out / "7.png") == 20
    rows = read_rows(out)
    assert [(r["prompt_id"], r["task_type"]) for r in rows] == [(41, "Natural science"), (7, "my_wise")]
    with pytest.raises(ValueError, match="layout wise stores one image per prompt"):
        BenchmarkWriter(str(out), "wise", images_per_prompt=2)


def test_plain_layout_takes_any_count(tmp_path):
    prompts = Path(__file__).resolve().parents[2] / "datamodules" / "fixtures" / "toy_prompts.jsonl"
    out = tmp_path / "out"
    predict(tmp_path, prompts, BenchmarkWriter(str(out), "plain", benchmark="toy"), 3, max_prompts=5)
    count = 5
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"{n:05d}_{i:04d}.png" for n in range(count) for i in range(3)
    ]
    assert json.loads((out / "prediction.json").read_text())["benchmark"] == "toy"


def test_folders_are_never_mixed(tmp_path, compbench_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PredictionLayoutError, match="not empty and holds no plans.jsonl"):
        predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "plain"), 1)
    (out / "notes.txt").unlink()
    predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "plain"), 2)
    with pytest.raises(PredictionLayoutError, match="earlier prediction run; set overwrite: true"):
        predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "plain"), 1)
    predict(tmp_path, compbench_file, BenchmarkWriter(str(out), "plain", overwrite=True), 1)
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_0000.png", "00001_0000.png", "00002_0000.png"]


def fake_trainer(rank: int, world: int = 2) -> SimpleNamespace:
    barrier = SimpleNamespace(barrier=lambda *a, **k: None)
    return SimpleNamespace(
        global_rank=rank, is_global_zero=rank == 0, strategy=barrier, world_size=world, datamodule=None
    )


def test_rows_from_several_processes_merge_sorted_and_once(tmp_path, compbench_file):
    records = load_prompts(compbench_file)
    out = tmp_path / "out"
    writer = BenchmarkWriter(str(out), "plain")
    writer.setup(fake_trainer(0), None, "test")
    painter = Painter(2)
    # Process 1 draws the last prompt, process 0 the first two and (a module that does not split the
    # global batch) the last one again: each image must be listed once, in (line, sample) order.
    writer.write_batch(fake_trainer(1), painter.predict_step(records[2:], 0), records[2:])
    writer.write_batch(fake_trainer(0), painter.predict_step(records, 0), records)
    writer.finish(fake_trainer(1), painter)
    assert not (out / "plans.jsonl").exists()  # only process 0 merges
    writer.finish(fake_trainer(0), painter)
    rows = read_rows(out)
    assert [(r["line"], r["sample"]) for r in rows] == [(line, i) for line in range(3) for i in range(2)]
    assert not list(out.glob(".plans.rank*.jsonl"))


def test_prediction_rows_must_match_the_prompts(tmp_path, compbench_file):
    records = load_prompts(compbench_file)
    writer = BenchmarkWriter(str(tmp_path / "out"), "plain")
    writer.setup(fake_trainer(0, 1), None, "test")
    bad = Painter(1).predict_step(records, 0)
    bad["prompts"] = bad["prompts"][::-1]
    with pytest.raises(PredictionLayoutError, match="prediction row 0 is for prompt 'a yellow kite'"):
        writer.write_batch(fake_trainer(0, 1), bad, records)
    short = Painter(1).predict_step(records, 0)
    short["images"] = short["images"][:2]
    with pytest.raises(PredictionLayoutError, match="2 images but 3"):
        writer.write_batch(fake_trainer(0, 1), short, records)


def test_never_writes_over_the_folder_being_scored(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "plans.jsonl").write_text("")
    trainer = fake_trainer(0, 1)
    trainer.datamodule = SimpleNamespace(folder=str(out))
    with pytest.raises(PredictionLayoutError, match="is the folder being scored"):
        BenchmarkWriter(str(out), "plain", overwrite=True).setup(trainer, None, "test")
    assert (out / "plans.jsonl").exists()
