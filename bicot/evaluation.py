"""Validation metrics: per-expert rewards and, where an expert says "every constraint holds", accuracy."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist


class ScoreTally:
    """Running sums and counts of per-image scores under metric names, merged across processes.

    Categories vary by batch and by process, so the tally is gathered as Python objects at the end
    rather than reduced tensor by tensor (which would need every process to log the same keys).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, scores: torch.Tensor, categories: Sequence[str] | None = None) -> None:
        """Add ``scores [N]`` under ``name`` and, with categories, under ``name/<category>`` too."""
        values = scores.detach().float().cpu().tolist()
        self.sums[name] += sum(values)
        self.counts[name] += len(values)
        for value, category in zip(values, categories or (), strict=False):
            self.sums[f"{name}/{category}"] += value
            self.counts[f"{name}/{category}"] += 1

    def compute(self) -> dict[str, float]:
        """Means over every image seen by every process."""
        parts = [(dict(self.sums), dict(self.counts))]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (dict(self.sums), dict(self.counts)))
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for part_sums, part_counts in parts:
            for key, value in part_sums.items():
                sums[key] += value
                counts[key] += part_counts[key]
        return {key: sums[key] / counts[key] for key in sorted(sums) if counts[key]}
