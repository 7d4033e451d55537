"""The MLflow store of a test's fit: ``sqlite:///<folder>/mlflow.db``, started from a copy of a store whose tables
MLflow has already made.

A new SQLite store costs each fit MLflow's table creation and its schema migrations (about 3.5 of a tiny fit's
26 s on a 2-core CPU). The copy is what MLflow itself wrote for an empty store (its tables and the Default
experiment), made once per test session with the installed MLflow, so a fit that starts from it sees a store
as MLflow leaves a new one; it still creates the ``bicot`` experiment and its run. The toy main job's test
(``tests/e2e/test_toy_world.py``) keeps starting from no store at all.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from pathlib import Path


@functools.cache
def _template() -> Path:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="bicot-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    db = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # makes the tables and the Default experiment
    return db


def store_uri(folder: Path) -> str:
    """The tracking URI of ``folder/mlflow.db``, the empty store copied there first where there is none yet (a
    resumed fit keeps its store)."""
    db = Path(folder) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), db)
    return f"sqlite:///{db}"


@contextlib.contextmanager
def tracking_uri_kept():
    """Put back MLflow's global tracking URI on the way out: ``MLFlowLogger`` sets it as a side effect of a fit run
    in the pytest process."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri)
