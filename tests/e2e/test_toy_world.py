"""The README's main job, shortened: `bicot fit -c configs/toy.yaml` from the shipped checkpoint, end to end."""

from __future__ import annotations

import yaml
from test_cli import REPO, cli_in_process, only_run

from datamodules.toyworld.splits import CATEGORIES

TOY = REPO / "configs" / "toy.yaml"
STEPS = 3


def test_toy_main_job_validates_before_and_after_and_trains(capsys, tmp_path):
    # A 12-prompt validation file (2 per category) keeps the two validation passes short.
    val = tmp_path / "val.jsonl"
    lines = (REPO / "datamodules" / "toyworld" / "data" / "val.jsonl").read_text().splitlines()
    picked = []
    for category in CATEGORIES:
        picked += [line for line in lines if f'"task_type": "{category}"' in line][:2]
    val.write_text("\n".join(picked) + "\n")
    # Checkpoints into the test's folder, not the repository's checkpoints/runs/toy (a user's `--ckpt_path=last`).
    callbacks = yaml.safe_load(TOY.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    # in this process: the console script's own start-up is covered by the other end-to-end tests
    code, _, err = cli_in_process(
        capsys,
        REPO,  # toy.yaml names the checkpoint and the prompt files relative to the repository
        "fit",
        "-c",
        str(TOY),
        f"--trainer.max_steps={STEPS}",
        f"--data.val_file={val}",
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"--trainer.default_root_dir={tmp_path}",
        "-c",
        str(overlay),
        "--trainer.enable_progress_bar=false",
    )
    assert code == 0, err[-3000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    sources = {
        k: v
        for k, v in run.data.params.items()
        if k.startswith("model.policy") and k.endswith("model_name_or_path")
    }
    assert list(sources.values()) == ["checkpoints/toy"], (
        sources
    )  # the shipped checkpoint, not a tiny random model
    for name in ["val/accuracy", *(f"val/accuracy/{c}" for c in CATEGORIES)]:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        # before the first step, and after the last (at the number of steps trained, as the grids)
        assert steps == [0, STEPS], (name, steps)
    rewards = client.get_metric_history(run.info.run_id, "train/reward")
    assert len(rewards) == STEPS
    for expert in ("toy_detector", "toy_attribute", "toy_clean", "toy_orm"):
        assert client.get_metric_history(run.info.run_id, f"train/reward/{expert}"), expert
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
