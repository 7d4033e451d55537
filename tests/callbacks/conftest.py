"""Shared by the callback tests: one short fit of configs/toy.yaml through the bicot CLI, read back from MLflow."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from toyfit import default_overlay, fit_args, only_run, quiet_fit_environment


@dataclass
class ToyRun:
    """A finished toy fit: where it wrote, the run as MLflow reads it back, the trained module, its stdout."""

    workdir: Path
    client: MlflowClient
    run: Run
    module: torch.nn.Module
    datamodule: object
    stdout: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def download(self, path: str) -> Path:
        """An artifact (file or folder) copied into the work folder."""
        target = self.workdir / "downloads"
        target.mkdir(exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, path, str(target)))


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> ToyRun:
    """``bicot fit -c configs/toy.yaml`` for 4 steps with toy.yaml's callbacks (grids every 2 steps)."""
    from bicot.cli import BiCoTCLI

    workdir = tmp_path_factory.mktemp("toy_run")
    out = io.StringIO()
    with quiet_fit_environment(), contextlib.redirect_stdout(out):
        cli = BiCoTCLI(args=fit_args(workdir, default_overlay(workdir)))
    client, run = only_run(workdir)
    return ToyRun(workdir, client, run, cli.model, cli.datamodule, out.getvalue())
