"""SampleGrid: the grids and JSON a fit logs, fixed prompts, real rewards, and no effect on training's randomness."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from toyfit import EVERY_N_STEPS, MAX_STEPS

from bicot.loss import group_advantages
from callbacks.grid import GridLayout
from callbacks.sample_grid import SampleGrid

GRID_STEPS = list(range(0, MAX_STEPS, EVERY_N_STEPS)) + [MAX_STEPS]  # every N steps, then after the last


def sample_json(toy_run, step: int) -> dict:
    return json.loads(toy_run.download(f"samples/step_{step:06d}.json").read_text())


def test_grids_and_json_are_logged_at_every_nth_step_and_at_the_end(toy_run):
    names = {a.path for a in toy_run.client.list_artifacts(toy_run.run_id, "samples")}
    for step in GRID_STEPS:
        assert f"samples/step_{step:06d}.png" in names
        assert f"samples/step_{step:06d}.json" in names
    assert len([n for n in names if n.endswith(".png")]) == len(GRID_STEPS)


def test_png_opens_with_the_grid_size(toy_run):
    summary = sample_json(toy_run, 0)
    prompts, group, experts = (
        len(summary["prompts"]),
        summary["group_size"],
        len(summary["reward_per_expert"]),
    )
    with Image.open(toy_run.download("samples/step_000000.png")) as png:
        assert png.format == "PNG"
        assert png.size == GridLayout().size(prompts, group, experts)
        assert png.width == group * 192 + (group + 1) * 8  # the default cell and padding


def test_prompts_are_the_first_validation_prompts_at_every_step(toy_run):
    first = [r.prompt for r in toy_run.datamodule.records["val"][:4]]  # toy.yaml: num_prompts 4, a val file
    for step in GRID_STEPS:
        summary = sample_json(toy_run, step)
        assert summary["prompts"] == first, step
        assert summary["group_size"] == toy_run.module.algo.num_generations


def test_json_holds_plans_rewards_and_group_advantages(toy_run):
    summary = sample_json(toy_run, EVERY_N_STEPS)
    rows = len(summary["prompts"]) * summary["group_size"]
    assert len(summary["plans"]) == len(summary["rewards"]) == len(summary["advantages"]) == rows
    assert all(isinstance(p, str) for p in summary["plans"])
    rewards = torch.tensor(summary["rewards"])
    # the total is the weighted sum of the experts' scores (toy.yaml weighs toy_orm 2), advantages per group
    weights = toy_run.module.rewards.weights
    assert set(summary["reward_per_expert"]) == set(weights)
    total = sum(weights[name] * torch.tensor(scores) for name, scores in summary["reward_per_expert"].items())
    torch.testing.assert_close(total, rewards)
    algo = toy_run.module.algo
    expected = group_advantages(rewards, summary["group_size"], algo.scale_rewards, algo.adv_eps)
    torch.testing.assert_close(torch.tensor(summary["advantages"]), expected)


def test_last_grid_is_what_the_trained_policy_samples(toy_run):
    """Same prompts, seed and weights: the logged samples are reproduced exactly, and sampling leaves
    torch's global random stream alone (training draws the same with or without the callback)."""
    summary = sample_json(toy_run, MAX_STEPS)
    callback = SampleGrid(prompts=summary["prompts"], seed=summary["seed"])
    trainer = SimpleNamespace(datamodule=toy_run.datamodule)  # the texts get their records' metadata back
    state = torch.random.get_rng_state()
    rollout = callback.sample(trainer, toy_run.module)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rollout.plans == summary["plans"]
    assert rollout.rewards.tolist() == pytest.approx(summary["rewards"], abs=1e-6)
    assert callback.sample(trainer, toy_run.module).image_tokens.equal(rollout.image_tokens)


def test_table_has_one_row_per_sample_and_is_registered_for_the_ui(toy_run):
    table = json.loads(toy_run.download("samples/table.json").read_text())  # pandas "split" orient
    columns = table["columns"]
    for column in ("step", "prompt", "plan", "reward", "advantage", "reward/toy_orm"):
        assert column in columns
    first = sample_json(toy_run, 0)
    per_grid = len(first["plans"])
    assert len(table["data"]) == per_grid * len(GRID_STEPS)
    steps = [row[columns.index("step")] for row in table["data"]]
    assert steps == [s for s in GRID_STEPS for _ in range(per_grid)]
    assert [row[columns.index("plan")] for row in table["data"][:per_grid]] == first["plans"]
    logged = json.loads(toy_run.run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "samples/table.json", "type": "table"} in logged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"split": "test"}, "split"),
        ({"prompts": []}, "at least one prompt"),
        ({"images_per_prompt": 0}, "images_per_prompt"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleGrid(**kwargs)


def test_table_appends_without_a_download_progress_bar(tmp_path, capfd):
    from mlflow import MlflowClient

    from callbacks.sample_grid import log_table_quietly

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    for step in range(2):  # plain MLflow: appending downloads the rows so far, with a progress bar
        client.log_table(run_id, {"step": [step]}, "plain.json")
    assert "Downloading artifacts" in capfd.readouterr().err
    for step in range(3):
        log_table_quietly(client, run_id, {"step": [step], "plan": ["p"]}, "samples/table.json")
    assert "Downloading artifacts" not in capfd.readouterr().err
    table = json.loads(
        Path(client.download_artifacts(run_id, "samples/table.json", str(tmp_path))).read_text()
    )
    assert [row[0] for row in table["data"]] == [0, 1, 2]  # every append kept


class CountingGrid(SampleGrid):
    """A SampleGrid that records the steps it would draw instead of sampling."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drawn: list[int] = []

    def log_samples(self, trainer, pl_module, step: int) -> None:
        self._last_step = step
        self.drawn.append(step)


def trainer_at(logger, step: int) -> SimpleNamespace:
    """The parts of a rank-0 trainer that SampleGrid reads, at logging step ``step``."""
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step))
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    return SimpleNamespace(is_global_zero=True, loggers=[logger], fit_loop=loop, strategy=strategy)


def test_a_resumed_run_does_not_draw_again_the_grid_it_holds(tmp_path):
    """The stretch before a resume drew step 4's grid after its last step, and the resume starts at step 4."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow_store import store_uri, tracking_uri_kept

    with tracking_uri_kept():
        store = store_uri(tmp_path)
        logger = MLFlowLogger("bicot", tracking_uri=store, artifact_location=str(tmp_path / "artifacts"))
        logger.experiment.log_dict(logger.run_id, {"step": 4}, "samples/step_000004.json")
        resumed = CountingGrid(every_n_steps=2)
        for step in (4, 5, 6):
            resumed.on_train_batch_start(trainer_at(logger, step), None, None, step)
        assert resumed.drawn == [6]
        finished = CountingGrid(every_n_steps=2)  # a resume of a run that had reached max_steps
        finished.on_train_end(trainer_at(logger, 4), None)
        assert finished.drawn == []
        fresh = CountingGrid(every_n_steps=2)  # a step the run does not hold is drawn
        fresh.on_train_batch_start(trainer_at(logger, 2), None, None, 2)
        assert fresh.drawn == [2]
