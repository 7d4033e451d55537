"""RunMetadata: the resolved config as flat MLflow params, version and git tags, and how to open the run."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from mlflow.entities import Param

from callbacks._run import MlflowRun, find_run

try:  # the store's limits; older MLflow allowed 500 characters per value
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - depends on the MLflow release
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 250, 500, 100

ELLIPSIS = "..."
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
REPO_ROOT = Path(__file__).resolve().parent.parent


def flatten_config(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists of dicts as ``{"a.b.0.c": "value"}``; lists of scalars stay one JSON value.

    Scalars are written as ``str(value)`` (``None`` -> ``"None"``), the way Lightning logs hyperparameters.
    """
    if isinstance(tree, dict):
        out: dict[str, str] = {} if tree or not prefix else {prefix: "{}"}
        for key, value in tree.items():
            out.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and any(isinstance(item, (dict, list)) for item in tree):
        out = {}
        for i, item in enumerate(tree):
            out.update(flatten_config(item, f"{prefix}.{i}"))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, list) else str(tree)}


def safe_key(key: str) -> str:
    """A key MLflow accepts: odd characters become ``_``; keys past the limit keep a hash of the whole."""
    key = _BAD_KEY_CHARS.sub("_", key)
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")
    if len(key) > MAX_ENTITY_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        key = f"{key[: MAX_ENTITY_KEY_LENGTH - len(digest) - 1]}-{digest}"
    return key


def safe_value(value: str, limit: int = MAX_PARAM_VAL_LENGTH) -> str:
    """``value`` cut to the store's limit (ending in ``...`` when cut); the full text is in config.yaml."""
    return value if len(value) <= limit else value[: limit - len(ELLIPSIS)] + ELLIPSIS


def resolved_config(trainer: pl.Trainer) -> dict | None:
    """The CLI's fully resolved config as a dict (``None`` when the run was not started by LightningCLI)."""
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return yaml.safe_load(cb.parser.dump(cb.config, skip_none=False))
    return None


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the checkout bicot runs from, or ``None`` outside a git checkout of bicot."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        # an installed copy inside some other repository must not report that repository's commit
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def version_tags() -> dict[str, str]:
    """Tags naming the code that ran: bicot's version and git commit, and the main libraries' versions."""
    tags = {}
    for package in ("bicot", "torch", "transformers", "lightning", "mlflow"):
        try:
            tags[f"bicot.version.{package}" if package != "bicot" else "bicot.version"] = (
                importlib.metadata.version(package)
            )
        except importlib.metadata.PackageNotFoundError:
            continue
    commit = git_commit()
    if commit is not None:
        tags["bicot.git_commit"], dirty = commit[0], commit[1]
        tags["bicot.git_dirty"] = str(dirty).lower()
        tags["mlflow.source.git.commit"] = commit[0]  # the run page shows this one
    return tags


def command_tags() -> dict[str, str]:
    """The command line that started this process and the folder it ran in: with the config, what reruns it
    (the config's relative paths, ``checkpoints/toy`` and the prompt files, are relative to that folder)."""
    return {"bicot.command": shlex.join(sys.argv), "bicot.cwd": os.getcwd()}


def ui_command(tracking_uri: str) -> str:
    """The ``mlflow ui`` command for a store; relative SQLite paths become absolute (any cwd works)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri.startswith(prefix + "/"):
        tracking_uri = prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class RunMetadata(pl.Callback):
    """At set-up (rank 0): log the resolved config as flat params, tag the code and command, print the run.

    The config text itself is ``config/config.yaml`` (written by the CLI's ``SaveConfigToRun``); the
    params make runs comparable in the MLflow UI's table. Keys are dotted paths of the YAML
    (``model.algo.beta``, ``trainer.callbacks.0.class_path``); values longer than the store allows are
    cut and end in ``...``. A key already in the run with another value (a resumed run) is left alone.

    Args:
        tags: extra tags for the run.
        print_run: print the run id and the ``mlflow ui`` command that opens it.
        ui_port: the port named in the printed link.
    """

    def __init__(
        self, tags: dict[str, str] | None = None, print_run: bool = True, ui_port: int = 5000
    ) -> None:
        self.tags = dict(tags or {})
        self.print_run, self.ui_port = print_run, ui_port
        self._done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._done or not trainer.is_global_zero:
            return
        self._done = True
        run = find_run(trainer)
        if run is None:
            rank_zero_warn("RunMetadata: no MLFlowLogger on the trainer, so no params or tags are logged")
            return
        if self.print_run:
            print(self.announcement(run), flush=True)
        for key, value in {**version_tags(), **command_tags(), **self.tags}.items():
            run.client.set_tag(run.run_id, key, safe_value(str(value)))
        config = resolved_config(trainer)
        if config is None:
            rank_zero_warn(
                "RunMetadata: not started by the bicot CLI, so no resolved config to log as params"
            )
            return
        self.log_params(run, flatten_config(config))

    def announcement(self, run: MlflowRun) -> str:
        """Two lines: the run id, and the command plus link that open it."""
        url = f"http://127.0.0.1:{self.ui_port}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
        return f"bicot: MLflow run {run.run_id}\nbicot: review it: {ui_command(run.tracking_uri)}  then open {url}"

    @staticmethod
    def log_params(run: MlflowRun, flat: dict[str, str]) -> None:
        """Log ``flat`` as params in batches, skipping keys the run already holds with another value."""
        existing = run.client.get_run(run.run_id).data.params
        wanted: dict[str, str] = {}
        for key, value in flat.items():
            # two keys may clean to one; a batch holding both would be refused
            wanted.setdefault(safe_key(key), safe_value(value))
        params, clashes = [], []
        for key, value in wanted.items():
            if key in existing and existing[key] != value:
                clashes.append(key)  # MLflow params are immutable: logging it again would raise
            elif key not in existing:
                params.append(Param(key, value))
        if clashes:
            rank_zero_warn(
                f"RunMetadata: {len(clashes)} params already logged with other values kept: {clashes[:5]}"
            )
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            run.client.log_batch(run.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
