"""The run as a reviewer sees it: status and config read back, a real `mlflow server` over REST, failed runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from PIL import Image
from toyfit import default_overlay, fit_args, only_run, quiet_fit_environment, toy_callbacks

from bicot.cli import BiCoTCLI, main
from modules.rewards.ensemble import RewardExpertError


def test_run_finished_and_config_reads_back_as_the_cli_resolved_it(toy_run):
    assert toy_run.run.info.status == "FINISHED"
    config = yaml.safe_load(toy_run.download("config/config.yaml").read_text())
    workdir = toy_run.workdir
    assert config["trainer"]["max_steps"] == 4
    assert config["trainer"]["logger"]["init_args"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert config["model"]["seed"] == config["seed_everything"]  # interpolation resolved before logging
    logged = {cb["class_path"]: cb.get("init_args") or {} for cb in config["trainer"]["callbacks"]}
    for cb in default_overlay(workdir)["trainer"]["callbacks"]:
        assert cb.get("init_args", {}).items() <= logged[cb["class_path"]].items(), cb["class_path"]
    # the same command line parsed afresh resolves to exactly what the run stored
    with quiet_fit_environment():
        # without a subcommand: run=False parses the fit arguments alone
        fresh = BiCoTCLI(args=fit_args(workdir, default_overlay(workdir))[1:], run=False)
    resolved = yaml.safe_load(fresh.parser.dump(fresh.config, skip_none=False))
    assert {k: config[k] for k in resolved} == resolved
    assert set(config) - set(resolved) <= {"ckpt_path", "weights_only"}  # the fit subcommand's own options


# ---------------------------------------------------------------------------------- mlflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@contextlib.contextmanager
def mlflow_server(db: Path, workdir: Path):
    """``mlflow server`` on 127.0.0.1 against ``db``; yields its base URL once it answers, stops it after."""
    port = free_port()
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed in finally
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # its own session, so stopping it also stops the workers it forks, and nothing else
    server = subprocess.Popen(
        command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (workdir / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                if get(f"{base}/health"):
                    break
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_mlflow_server_serves_the_run_and_its_artifacts(toy_run):
    with mlflow_server(toy_run.workdir / "mlflow.db", toy_run.workdir) as base:
        api = f"{base}/api/2.0/mlflow"
        run = json.loads(get(f"{api}/runs/get?run_id={toy_run.run_id}"))["run"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"train/reward", "train/kl", "train/sampled_nll/image"} <= metrics
        query = urllib.parse.urlencode({"run_id": toy_run.run_id, "metric_key": "train/reward"})
        history = json.loads(get(f"{api}/metrics/get-history?{query}"))["metrics"]
        assert sorted(m["step"] for m in history) == [0, 1, 2, 3]
        listing = json.loads(get(f"{api}/artifacts/list?run_id={toy_run.run_id}&path=samples"))
        files = {f["path"] for f in listing["files"]}
        assert {"samples/step_000000.png", "samples/step_000000.json", "samples/table.json"} <= files
        top = {f["path"] for f in json.loads(get(f"{api}/artifacts/list?run_id={toy_run.run_id}"))["files"]}
        assert {"config", "policy", "samples"} <= top
        png = get(f"{base}/get-artifact?path=samples/step_000000.png&run_uuid={toy_run.run_id}")
        assert Image.open(BytesIO(png)).size == Image.open(toy_run.download("samples/step_000000.png")).size


# ---------------------------------------------------------------------------------- failed runs

FAULTS = textwrap.dedent(
    """
    import lightning.pytorch as pl
    from modules.rewards.color import ColorMatchExpert

    class FlakyColor(ColorMatchExpert):
        def __init__(self, fail_on_call: int = 1) -> None:
            super().__init__()
            self.fail_on_call, self.calls = fail_on_call, 0

        def score(self, images, prompts):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise RuntimeError("injected expert failure")
            return super().score(images, prompts)

    class RaiseAt(pl.Callback):
        def __init__(self, step: int = 2) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == self.step:
                raise ValueError("injected callback failure")
    """
)


def faulty_overlay(kind: str) -> dict:
    callbacks = toy_callbacks(SampleGrid={"every_n_steps": 2})
    if kind == "expert":
        # calls: grid@0, step 0, step 1, grid@2, then step 2's scoring raises
        expert = {"class_path": "bicot_test_faults.FlakyColor", "init_args": {"fail_on_call": 5}}
        # the one expert replaces toy.yaml's four, so their weights and the accuracy expert go too
        rewards = {"experts": [expert], "weights": None}
        # no validation pass before training either: it would call the expert too
        model = {"rewards": rewards, "accuracy_expert": None, "validate_before_fit": False}
        return {"trainer": {"callbacks": callbacks}, "model": model}
    return {"trainer": {"callbacks": [*callbacks, {"class_path": "bicot_test_faults.RaiseAt"}]}}


@pytest.mark.parametrize("kind", ["expert", "callback"])
def test_failed_run_is_marked_failed_with_what_it_logged(kind, tmp_path, monkeypatch):
    """Through ``bicot.cli.main``, which turns user-caused errors into one line and exit code 2 (and lets
    others propagate). Either way Lightning's ``MLFlowLogger.finalize("failed")`` ran before that."""
    (tmp_path / "bicot_test_faults.py").write_text(FAULTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = fit_args(tmp_path, faulty_overlay(kind))
    with quiet_fit_environment(), pytest.raises((SystemExit, RewardExpertError)) as raised:
        main(args)
    if isinstance(raised.value, SystemExit):
        assert raised.value.code == 2
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    run_id = run.info.run_id
    for name in ("train/reward", "train/kl", "train/advantage_mean", "time/update_s"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [0, 1], name
    top = {a.path for a in client.list_artifacts(run_id)}
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run_id, "config")}
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/step_000000.png", "samples/step_000002.json"} <= samples
    assert "policy" not in top  # no export of a run that did not finish
    assert run.data.params["trainer.max_steps"] == "4" and "bicot.version" in run.data.tags
