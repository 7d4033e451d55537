"""RunMetadata: flat params that MLflow accepts, version and commit tags, and the printed way to open the run."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from callbacks._run import MlflowRun
from callbacks.run_metadata import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    REPO_ROOT,
    RunMetadata,
    flatten_config,
    safe_key,
    safe_value,
    ui_command,
)


def test_flatten_config_paths_and_values():
    config = {
        "a": {"b": 1, "c": None, "d": [1, 2], "e": {}},
        "cbs": [{"class_path": "x.Y", "init_args": {"n": 2}}, {"class_path": "x.Z"}],
        "flag": True,
    }
    assert flatten_config(config) == {
        "a.b": "1",
        "a.c": "None",
        "a.d": "[1, 2]",
        "a.e": "{}",
        "cbs.0.class_path": "x.Y",
        "cbs.0.init_args.n": "2",
        "cbs.1.class_path": "x.Z",
        "flag": "True",
    }


def test_safe_key_and_value_respect_the_store_limits():
    assert safe_key("model.rewards.weights.color") == "model.rewards.weights.color"
    assert safe_key("a.b{c}=d") == "a.b_c__d"
    long_key = safe_key("k" * 400)
    assert len(long_key) == MAX_ENTITY_KEY_LENGTH and long_key != safe_key("k" * 401)  # hashed, distinct
    cut = safe_value("v" * (MAX_PARAM_VAL_LENGTH + 10))
    assert len(cut) == MAX_PARAM_VAL_LENGTH and cut.endswith("...")
    assert safe_value("short") == "short"


def test_long_and_odd_params_are_accepted_by_a_real_store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    run = MlflowRun(client, run_id, "0", client.tracking_uri)
    flat = {"x" * 300: "1", "model.prompt": "p" * 20_000, "odd{key}": "2", "odd(key)": "3"}
    RunMetadata.log_params(run, flat)
    params = client.get_run(run_id).data.params
    assert params["model.prompt"] == "p" * (MAX_PARAM_VAL_LENGTH - 3) + "..."
    assert params["odd_key_"] == "2"  # two keys that clean to one: the first wins, the batch is not refused
    assert len(params) == 3
    RunMetadata.log_params(run, {"model.prompt": "changed", "new": "4"})  # a resumed run: no raise
    params = client.get_run(run_id).data.params
    assert params["new"] == "4" and params["model.prompt"].startswith("ppp")


def test_ui_command_makes_relative_sqlite_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        ui_command("sqlite:///mlflow.db") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    )
    assert ui_command("sqlite:////abs/m.db") == "mlflow ui --backend-store-uri sqlite:////abs/m.db"
    assert ui_command("http://host:5000") == "mlflow ui --backend-store-uri http://host:5000"


def test_params_are_the_flattened_config_artifact(toy_run):
    config = yaml.safe_load(toy_run.download("config/config.yaml").read_text())
    flat = {safe_key(k): safe_value(v) for k, v in flatten_config(config).items()}
    params = toy_run.run.data.params
    missing = {k for k in flat if k not in params}
    assert not missing
    assert {k: params[k] for k in flat} == flat
    assert params["trainer.max_steps"] == "4"
    assert params["model.algo.num_generations"] == str(toy_run.module.algo.num_generations)


def test_tags_name_the_version_and_the_commit(toy_run):
    tags = toy_run.run.data.tags
    assert tags["bicot.version"] == importlib.metadata.version("bicot")
    assert tags["bicot.version.torch"] == importlib.metadata.version("torch")
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["bicot.git_commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["bicot.git_dirty"] in ("true", "false")


def test_run_id_and_ui_command_are_printed_at_start(toy_run):
    db = toy_run.workdir / "mlflow.db"
    assert f"bicot: MLflow run {toy_run.run_id}" in toy_run.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in toy_run.stdout
    assert f"/runs/{toy_run.run_id}" in toy_run.stdout


def test_tags_name_the_command_line_and_its_folder(tmp_path, monkeypatch):
    """The config names files relative to the folder bicot ran in: the run says which folder, and the command."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow_store import store_uri, tracking_uri_kept

    argv = ["/venv/bin/bicot", "fit", "-c", "configs/toy.yaml", "--model.algo.beta=0.02", "--a= b"]
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.chdir(tmp_path)
    with tracking_uri_kept():
        logger = MLFlowLogger("bicot", tracking_uri=store_uri(tmp_path), artifact_location=str(tmp_path / "art"))
        trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], callbacks=[])
        with pytest.warns(UserWarning, match="not started by the bicot CLI"):
            RunMetadata(print_run=False).setup(trainer, None, "fit")
        tags = logger.experiment.get_run(logger.run_id).data.tags
    assert tags["bicot.command"] == "/venv/bin/bicot fit -c configs/toy.yaml --model.algo.beta=0.02 '--a= b'"
    assert tags["bicot.cwd"] == str(tmp_path)
