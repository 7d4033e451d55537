"""Side concerns of a run, as Lightning callbacks: sample grids, rollout statistics, memory, metadata, HF export."""

from callbacks.hf_export import HFExport
from callbacks.phase_memory import PhaseMemory
from callbacks.rollout_stats import RolloutStatistics
from callbacks.run_metadata import RunMetadata
from callbacks.sample_grid import SampleGrid

__all__ = ["HFExport", "PhaseMemory", "RolloutStatistics", "RunMetadata", "SampleGrid"]
