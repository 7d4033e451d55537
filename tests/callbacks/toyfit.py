"""Helpers of the callback tests: configs/toy.yaml fits with every output in a temp folder, read back from MLflow."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow_store import store_uri, tracking_uri_kept

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "configs" / "toy.yaml"
MAX_STEPS = 4
EVERY_N_STEPS = 2
REGISTERED = "bicot-toy-policy"


def toy_callbacks(**init_args_by_class: dict) -> list[dict]:
    """configs/toy.yaml's ``trainer.callbacks``, with ``init_args`` updated per class name."""
    callbacks = yaml.safe_load(TOY.read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name in init_args_by_class:
            cb.setdefault("init_args", {}).update(init_args_by_class[name])
    return callbacks


def fit_args(workdir: Path, overlay: dict | None = None, *extra: str) -> list[str]:
    """``bicot fit`` arguments for configs/toy.yaml with every output inside ``workdir``.

    Args:
        overlay: a config fragment composed after toy.yaml (lists in it replace toy.yaml's lists).
    """
    args = ["fit", "-c", str(TOY)]
    # Checkpoints go to the test's folder, never the repository's checkpoints/runs/toy.
    overlay = dict(overlay or {})
    trainer = overlay["trainer"] = dict(overlay.get("trainer", {}))
    trainer.setdefault("callbacks", toy_callbacks())
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(workdir / "checkpoints")
    path = workdir / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    args += ["-c", str(path)]
    return [
        *args,
        f"--trainer.max_steps={MAX_STEPS}",
        f"--trainer.logger.init_args.tracking_uri={store_uri(workdir)}",
        f"--trainer.logger.init_args.artifact_location={workdir / 'artifacts'}",
        f"--trainer.default_root_dir={workdir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def default_overlay(workdir: Path) -> dict:
    """Grids every 2 steps, the export into ``workdir/export`` and registered."""
    callbacks = toy_callbacks(
        SampleGrid={"every_n_steps": EVERY_N_STEPS},
        HFExport={"dirpath": str(workdir / "export"), "register_name": REGISTERED},
        ModelCheckpoint={"dirpath": str(workdir / "checkpoints")},
    )
    return {"trainer": {"callbacks": callbacks}}


@contextlib.contextmanager
def quiet_fit_environment():
    """Run from the repository (toy.yaml names its prompt file relative to it), on one thread, and put
    back MLflow's global tracking URI, which ``MLFlowLogger`` sets as a side effect."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on a busy 2-core machine
    try:
        with tracking_uri_kept(), contextlib.chdir(REPO):
            yield
    finally:
        torch.set_num_threads(threads)


def only_run(workdir: Path) -> tuple[MlflowClient, Run]:
    """The single run in ``workdir``'s store (there must be exactly one)."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]
