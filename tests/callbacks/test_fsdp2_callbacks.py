"""The callbacks under FSDP2 on 2 CPU processes: one run written by rank 0, the same grids, the full weights exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from toyfit import REPO, default_overlay, fit_args, only_run


@pytest.mark.slow
def test_fsdp2_run_logs_once_and_exports_the_gathered_weights(toy_run, tmp_path):
    args = fit_args(tmp_path, default_overlay(tmp_path))
    args += ["-c", str(REPO / "configs" / "strategy" / "fsdp2.yaml"), "--trainer.devices=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # warnings shown: some are asserted absent below
    result = subprocess.run(
        [sys.executable, "-m", "bicot.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bicot: MLflow run ") == 1  # printed by rank 0 only
    # the val/* values are already global: Lightning's advice to sync them across processes does not apply
    assert "sync_dist=True" not in result.stderr
    client, run = only_run(tmp_path)  # exactly one run: rank 1 created none
    assert run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    single = {a.path for a in toy_run.client.list_artifacts(toy_run.run_id, "samples")}
    assert names == single
    # the grid samples every prompt on every rank from one stream: the same samples as one process
    target = tmp_path / "downloads"
    ours = json.loads(
        open(client.download_artifacts(run.info.run_id, "samples/step_000000.json", str(target))).read()
    )
    reference = json.loads(toy_run.download("samples/step_000000.json").read_text())
    assert ours["plans"] == reference["plans"]
    assert ours["rewards"] == pytest.approx(reference["rewards"], abs=1e-6)
    # the export holds every weight, gathered from the shards, equal to the one-process run's
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [
        "JanusForConditionalGeneration"
    ]  # not FSDPJanusForConditionalGeneration
    sharded = load_file(tmp_path / "export" / "model.safetensors")
    whole = load_file(toy_run.workdir / "export" / "model.safetensors")
    assert sharded.keys() == whole.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
