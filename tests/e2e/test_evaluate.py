"""End to end: `bicot predict` writes benchmark folders; `bicot test` generates and scores, or scores a folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from mlflow import MlflowClient
from mlflow_store import store_uri

from bicot.cli import main
from bicot.scoring import FolderData, FolderScorer
from modules.rewards.ensemble import RewardEnsemble
from modules.rewards.toy_attribute import ToyAttributeExpert
from modules.rewards.toy_clean import ToyCleanExpert
from modules.rewards.toy_detector import ToyDetectorExpert
from modules.rewards.toy_orm import ToyORMExpert
from modules.seeding import image_seed

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "e2e" / "configs" / "tiny.yaml"
EVAL = REPO / "configs" / "eval"
TOY_TEST = REPO / "datamodules" / "toyworld" / "data" / "test.jsonl"
TOY_EXPERTS = ("toy_detector", "toy_attribute", "toy_clean", "toy_orm")
COMPBENCH_PROMPTS = ("a red book and a blue cup", "a green bench", "a yellow kite")


def bicot(*args: str) -> None:
    """The `bicot` console script in this process; a non-zero exit fails the test with its message."""
    try:
        main(list(args))
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), f"bicot {args[0]} exited with {exit_info.code}"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def compbench_prompts(tmp_path) -> Path:
    path = tmp_path / "color_val.txt"
    path.write_text("\n".join(COMPBENCH_PROMPTS) + "\n")
    return path


@pytest.mark.parametrize("with_plan", [True, False])
def test_predict_writes_the_compbench_layout(tmp_path, compbench_prompts, with_plan):
    out = tmp_path / "color"
    extra = ["-c", str(EVAL / "no_plan.yaml")] if not with_plan else []
    bicot(
        "predict",
        "-c",
        str(TINY),
        "-c",
        str(EVAL / "compbench.yaml"),
        *extra,
        f"--data.predict_file={compbench_prompts}",
        "--model.policy.init_args.predict_images_per_prompt=2",
        f"--trainer.callbacks.init_args.output_dir={out}",
        "--trainer.callbacks.init_args.images_per_prompt=2",
    )
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == sorted(
        f"{p}_{line * 2 + i:06d}.png" for line, p in enumerate(COMPBENCH_PROMPTS) for i in range(2)
    )
    rows = rows_of(out / "plans.jsonl")
    assert [r["image"] for r in rows] == [
        f"samples/{p}_{n:06d}.png" for n, p in enumerate(p for p in COMPBENCH_PROMPTS for _ in range(2))
    ]
    if with_plan:
        assert all(isinstance(r["plan"], str) for r in rows)
    else:
        assert all(r["plan"] is None for r in rows)
    assert json.loads((out / "prediction.json").read_text())["with_plans"] is with_plan


@pytest.fixture
def toy_prompts(tmp_path) -> Path:
    """Two held-out toy prompts of each of three categories."""
    lines = TOY_TEST.read_text().splitlines()
    path = tmp_path / "toy_subset.jsonl"
    path.write_text("\n".join(lines[0:2] + lines[60:62] + lines[150:152]) + "\n")
    return path


def generate_and_score(tmp_path: Path, prompts: Path, root: Path, batch: int) -> None:
    bicot(
        "test",
        "-c",
        str(TINY),
        "-c",
        str(EVAL / "toy.yaml"),
        f"--data.test_file={prompts}",
        f"--data.val_batch_size={batch}",
        "--model.policy.init_args.predict_images_per_prompt=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.tracking_uri={store_uri(tmp_path)}",
    )


def test_generate_then_score_writes_images_tables_and_mlflow_metrics(tmp_path, toy_prompts):
    root = tmp_path / "toy_start"
    generate_and_score(tmp_path, toy_prompts, root, batch=4)
    table = list(csv.DictReader((root / "test_scores" / "scores.csv").open()))
    assert [r["category"] for r in table] == ["color", "numeracy", "reasoning", "all"]
    assert [int(r["images"]) for r in table] == [4, 4, 4, 12]
    assert all(r["run"] == "toy_start" and r["benchmark"] == "toy" for r in table)
    assert "| reasoning | 4 |" in (root / "test_scores" / "scores.md").read_text()
    # The images were written too (the writer in configs/eval/toy.yaml), with their seeds.
    rows = rows_of(root / "plans.jsonl")
    assert [r["image"] for r in rows] == [f"{line:05d}_{i:04d}.png" for line in range(6) for i in range(2)]
    assert all(r["seed"] == image_seed(0, r["line"], r["sample"]) and r["plan"] for r in rows)
    assert all((root / r["image"]).is_file() for r in rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    for expert in TOY_EXPERTS:
        for category in ("color", "numeracy", "reasoning", "all"):
            assert f"test/{expert}/{category}" in run.data.metrics
    assert run.data.metrics["test/toy_orm/all"] == pytest.approx(float(table[-1]["toy_orm"]), abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "scores")}
    assert artifacts == {"scores/scores.csv", "scores/scores.md", "scores/scores.jsonl"}
    # the run says what it evaluated (RunMetadata in configs/eval/toy.yaml): the config, the code, the command
    assert run.data.params["model.policy.init_args.predict_images_per_prompt"] == "2"
    assert {"bicot.command", "bicot.cwd", "bicot.version"} <= set(run.data.tags)

    # Another batch size draws the very same images (per-image seeds) and so the same scores.
    again = tmp_path / "toy_again"
    generate_and_score(tmp_path, toy_prompts, again, batch=1)
    for row in rows:
        assert (again / row["image"]).read_bytes() == (root / row["image"]).read_bytes(), row["image"]
    same = list(csv.DictReader((again / "test_scores" / "scores.csv").open()))
    assert [{k: v for k, v in r.items() if k != "run"} for r in same] == [
        {k: v for k, v in r.items() if k != "run"} for r in table
    ]

    # Scoring the written folder on its own gives the generate-then-score numbers (PNG is lossless).
    experts = [ToyDetectorExpert(), ToyAttributeExpert(), ToyCleanExpert(), ToyORMExpert()]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(
        FolderScorer(RewardEnsemble(experts), results_dir=str(tmp_path / "rescored")),
        datamodule=FolderData(str(root)),
        verbose=False,
    )
    rescored = list(csv.DictReader((tmp_path / "rescored" / "scores.csv").open()))
    for a, b in zip(rescored, table, strict=True):
        assert (a["category"], a["images"], a["benchmark"]) == (b["category"], b["images"], "toy")
        for expert in TOY_EXPERTS:
            assert float(a[expert]) == pytest.approx(float(b[expert]), abs=1e-5)


def cli_accepts_other_roots(tmp_path: Path) -> bool:
    """Whether `bicot` parses a config whose root module is not BiCoTGRPO (`model.class_path`)."""
    try:
        main(
            [
                "test",
                "-c",
                str(EVAL / "score_folder.yaml"),
                f"--data.init_args.folder={tmp_path}",
                "--print_config",
            ]
        )
    except SystemExit as exit_info:
        return exit_info.code in (0, None)
    return True


def test_score_folder_config_through_bicot_test(tmp_path, toy_prompts, capsys):
    # FolderScorer is the root module here: the CLI switches to subclass mode when a config names it.
    assert cli_accepts_other_roots(tmp_path)
    capsys.readouterr()
    root = tmp_path / "toy_start"
    generate_and_score(tmp_path, toy_prompts, root, batch=6)
    bicot(
        "test",
        "-c",
        str(EVAL / "score_folder.yaml"),
        "-c",
        str(EVAL / "score_folder_toy.yaml"),
        f"--data.init_args.folder={root}",
        f"--model.init_args.results_dir={tmp_path / 'scored'}",
        f"--trainer.logger.init_args.tracking_uri={store_uri(tmp_path)}",
    )
    scored = list(csv.DictReader((tmp_path / "scored" / "scores.csv").open()))
    original = list(csv.DictReader((root / "test_scores" / "scores.csv").open()))
    assert [(r["category"], r["images"]) for r in scored] == [(r["category"], r["images"]) for r in original]
    assert [float(r["toy_orm"]) for r in scored] == pytest.approx([float(r["toy_orm"]) for r in original])
