"""Side concerns of a run, as Lightning callbacks: sample grids, rollout statistics, memory, metadata, HF export.

Each callback is imported on first use (``callbacks.SampleGrid`` or ``from callbacks import SampleGrid``), so
code that needs one of them (``callbacks.phase_memory`` on a GPU machine without MLflow, say) does not
import the others' dependencies.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "HFExport": "callbacks.hf_export",
    "PhaseMemory": "callbacks.phase_memory",
    "RolloutStatistics": "callbacks.rollout_stats",
    "RunMetadata": "callbacks.run_metadata",
    "SampleGrid": "callbacks.sample_grid",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
