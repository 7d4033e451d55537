"""End to end through the `bicot` CLI: fit writes metrics to MLflow, overrides, --print_config, errors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_store import store_uri, tracking_uri_kept

REPO = Path(__file__).resolve().parents[2]
E2E_CONFIGS = REPO / "tests" / "e2e" / "configs"
TINY = E2E_CONFIGS / "tiny.yaml"
PROMPTS = REPO / "datamodules" / "fixtures" / "toy_prompts.jsonl"

TRAIN_METRICS = (
    "train/reward",
    "train/reward/color",
    "train/reward_std",
    "train/kl",
    "train/loss",
    "train/clip_frac",
    "train/plan_tokens",
    "train/zero_std_frac",
)
TIME_METRICS = ("time/rollout_s", "time/score_s", "time/update_s", "perf/images_per_s")


def bicot(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script (falls back to ``python -m bicot.cli``)."""
    cmd = [sys.executable, "-m", "bicot.cli", *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "-c",
        str(TINY),
        f"--data.train_file={PROMPTS}",
        f"--trainer.logger.init_args.tracking_uri={store_uri(tmp_path)}",
        *extra,
    ]


def cli_in_process(capsys, workdir: Path, *argv: str) -> tuple[int, str, str]:
    """Run ``bicot *argv`` in this process, from ``workdir``; return (exit code, stdout, stderr).

    The same entry point as the console script, without an interpreter's start-up (about 15 s of imports on a
    2-core CPU). MLflow's global tracking URI, which ``MLFlowLogger`` sets as a side effect, is put back.
    """
    from bicot.cli import main

    try:
        # from workdir: relative outputs (MLflow's artifacts) land in the test's folder
        with tracking_uri_kept(), contextlib.chdir(workdir):
            main(list(argv))
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_in_process(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    """``bicot fit`` of the tiny config in this process; return (exit code, stderr)."""
    code, _, err = cli_in_process(capsys, tmp_path, "fit", *tiny_args(tmp_path, *args))
    return code, err


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bicot")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_fit_writes_training_and_timing_metrics_to_mlflow(tmp_path):
    result = bicot("fit", *tiny_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    for name in TRAIN_METRICS + TIME_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1], name
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "time/rollout_s"))
    config_dir = client.download_artifacts(run.info.run_id, "config", str(tmp_path / "artifacts"))
    config = yaml.safe_load((Path(config_dir) / "config.yaml").read_text())
    assert config["model"]["algo"]["num_generations"] == 2
    assert config["model"]["seed"] == config["seed_everything"] == 0  # ${seed_everything} resolved


def print_config(capsys, tmp_path: Path, *extra: str) -> dict:
    code, out, err = cli_in_process(capsys, tmp_path, "fit", *tiny_args(tmp_path, *extra), "--print_config")
    assert code == 0, err[-3000:]
    return yaml.safe_load(out)


def test_print_config_applies_overrides_and_interpolation(capsys, tmp_path):
    config = print_config(capsys, tmp_path, "--seed_everything=7", "--model.algo.beta=0.05", "--model.lr=2e-6")
    assert config["seed_everything"] == 7
    assert config["model"]["seed"] == 7  # ${seed_everything} follows the override
    assert config["model"]["algo"]["beta"] == 0.05
    assert config["model"]["lr"] == 2e-6
    assert config["model"]["policy"]["class_path"] == "modules.policy.JanusPolicy"
    assert config["model"]["policy"]["init_args"]["trust_remote_code"] is False


def test_several_config_files_compose_left_to_right(capsys, tmp_path):
    fragment = tmp_path / "more.yaml"
    fragment.write_text("model:\n  algo:\n    num_generations: 4\n    kl_estimator: k2\ntrainer:\n  max_steps: 5\n")
    config = print_config(capsys, tmp_path, "-c", str(fragment))
    assert config["model"]["algo"]["num_generations"] == 4
    assert config["model"]["algo"]["kl_estimator"] == "k2"
    assert config["trainer"]["max_steps"] == 5
    assert config["model"]["policy"]["init_args"]["sampling"]["cfg_scale"] == 3.0  # from the first file


def test_fsdp2_fragment_selects_the_fsdp2_strategy(capsys, tmp_path):
    config = print_config(capsys, tmp_path, "-c", str(REPO / "configs" / "strategy" / "fsdp2.yaml"))
    assert config["trainer"]["strategy"]["class_path"] == "bicot.parallel.FSDP2Strategy"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.algo.num_generations=1", "num_generations"),
        ("--model.policy.init_args.sampling.cfg_scale=0.5", "cfg_scale"),
        ("--model.algo.kl_estimator=k9", "kl_estimator"),
    ],
)
def test_bad_config_values_exit_with_a_clear_message(tmp_path, override, named, capsys):
    """In this process (the values fail while the config is parsed, before anything is built); the command's own
    exit path runs as a process in ``test_bad_input.py::test_a_failing_expert_is_named_and_the_logged_metrics_survive``."""
    code, stderr = run_in_process(capsys, tmp_path, override)
    assert code not in (0, None)
    assert named in stderr
    assert "Traceback" not in stderr


def test_missing_checkpoint_folder_is_named(capsys, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    code, err = run_in_process(
        capsys, tmp_path, "--model.policy.init_args.tiny=null", f"--model.policy.init_args.model_name_or_path={missing}"
    )
    assert code not in (0, None)
    assert str(missing) in err
    assert "Traceback" not in err
