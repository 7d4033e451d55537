"""Where the callbacks log: the trainer's MLflow run (client, ids, store) and the step its metrics use."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient


@dataclass
class MlflowRun:
    """The MLflow run a trainer logs to.

    Attributes:
        client: the logger's ``MlflowClient`` (its tracking URI already set).
        run_id: the run's id.
        experiment_id: the run's experiment.
        tracking_uri: the backend store, e.g. ``sqlite:///mlflow.db``.
    """

    client: MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str


def find_run(trainer: pl.Trainer) -> MlflowRun | None:
    """The first ``MLFlowLogger``'s run, or ``None`` without one or on a rank other than 0.

    Only rank 0 may ask: ``MLFlowLogger.experiment`` is a dummy elsewhere, so no other rank could log.
    """
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            client = logger.experiment
            return MlflowRun(client, logger.run_id, logger.experiment_id, client.tracking_uri)
    return None


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers give this batch's metrics (batches that stepped, not optimizer steps).

    ``trainer.global_step`` counts optimizer steps, ``mu`` per batch with manual optimization, so it
    would not line up with ``train/*`` curves; Lightning's own ``LearningRateMonitor`` reads this counter.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)

