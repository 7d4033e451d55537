"""Scores of generated images per category: a torchmetrics metric, result tables, FolderScorer (`bicot test`)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from bicot.report import ALL, META_COLUMNS
from datamodules.prompts import PromptDataError, compbench_task_type
from datamodules.records import PromptRecord
from modules.rewards.ensemble import RewardEnsemble
from modules.rewards.folder import ImageFolderPrompts, ImageItem

SCORE_FILES = ("scores.csv", "scores.md", "scores.jsonl")
_BAD_KEY = re.compile(r"[^\w\-./ ]")  # characters an MLflow metric key may not hold


class CategoryMeans(torchmetrics.Metric):
    """Mean score of each expert per category, summed across processes by torchmetrics.

    Categories are fixed at construction (every process must hold the same states to sync), so build
    it from the whole split's categories, not from one process's batches.

    Args:
        experts: expert names, the columns.
        categories: the categories that may occur (any order; duplicates ignored).
    """

    full_state_update = False

    def __init__(self, experts: Sequence[str], categories: Sequence[str]) -> None:
        super().__init__()
        self.experts = list(experts)
        self.categories = sorted(set(categories))
        self._index = {c: i for i, c in enumerate(self.categories)}
        c, e = len(self.categories), len(self.experts)
        self.add_state("sums", torch.zeros(c, e, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unreadable", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, scores: dict[str, torch.Tensor], categories: Sequence[str], readable: Sequence[bool]
    ) -> None:
        """Add ``N`` images: ``scores[expert]`` float ``[N]``, their categories, whether each was readable."""
        unknown = sorted({c for c in categories if c not in self._index})
        if unknown:
            raise ValueError(f"categories {unknown} were not declared; known: {self.categories}")
        idx = torch.tensor([self._index[c] for c in categories], dtype=torch.long, device=self.sums.device)
        values = torch.stack([scores[e].to(self.sums) for e in self.experts], dim=1)  # [N, E]
        self.sums.index_add_(0, idx, values)
        self.counts.index_add_(0, idx, torch.ones_like(idx))
        bad = torch.tensor([not ok for ok in readable], dtype=torch.long, device=idx.device)
        self.unreadable.index_add_(0, idx, bad)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"sums": [C, E], "counts": [C], "unreadable": [C]}`` over every process."""
        return {"sums": self.sums, "counts": self.counts, "unreadable": self.unreadable}


@dataclass
class ScoreRow:
    """One table row: a category (or ``all``), its image count and each expert's mean (NaN if none)."""

    category: str
    images: int
    unreadable: int
    means: dict[str, float]


@dataclass
class ScoreTable:
    """Per-category means of a scored run; rows sorted by category, ``all`` last."""

    run: str
    benchmark: str
    experts: list[str]
    rows: list[ScoreRow] = field(default_factory=list)

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], metric: CategoryMeans, run: str, benchmark: str
    ) -> ScoreTable:
        """Build the table from :meth:`CategoryMeans.compute` (categories without images are left out)."""
        c, e = len(metric.categories), len(metric.experts)
        # torchmetrics squeezes one-element results to scalars: restore the [C, E] / [C] shapes.
        sums = state["sums"].cpu().reshape(c, e)
        counts, bad = state["counts"].cpu().reshape(c), state["unreadable"].cpu().reshape(c)
        table = cls(run, benchmark, list(metric.experts))
        for i, category in enumerate(metric.categories):
            if counts[i] > 0:
                table.rows.append(_row(category, sums[i], int(counts[i]), int(bad[i]), metric.experts))
        table.rows.append(_row(ALL, sums.sum(0), int(counts.sum()), int(bad.sum()), metric.experts))
        return table

    def metrics(self) -> dict[str, float]:
        """``{"test/<expert>/<category>": mean}`` for every row (``all`` included), keys MLflow accepts."""
        return {
            _BAD_KEY.sub("_", f"test/{e}/{row.category}"): row.means[e]
            for row in self.rows
            for e in self.experts
            if row.images
        }

    def to_csv(self) -> str:
        """Columns ``run,benchmark,category,images,unreadable,<expert>...``; NaN written empty."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*META_COLUMNS, *self.experts])
        for row in self.rows:
            means = ["" if math.isnan(row.means[e]) else f"{row.means[e]:.6f}" for e in self.experts]
            writer.writerow([self.run, self.benchmark, row.category, row.images, row.unreadable, *means])
        return out.getvalue()

    def to_markdown(self) -> str:
        """A Markdown table: one row per category, one column per expert (4 decimals)."""
        head = ["category", "images", *self.experts]
        lines = [f"| {' | '.join(head)} |", f"|{'|'.join(['---'] + ['---:'] * (len(head) - 1))}|"]
        for row in self.rows:
            cells = [row.category, str(row.images), *(_fmt(row.means[e]) for e in self.experts)]
            lines.append(f"| {' | '.join(cells)} |")
        note = sum(r.unreadable for r in self.rows if r.category == ALL)
        tail = f"\n\n{note} unreadable image(s) scored 0." if note else ""
        return f"Scores of run `{self.run}` (benchmark `{self.benchmark}`)\n\n" + "\n".join(lines) + tail

    def write(self, directory: Path, per_image: Sequence[dict]) -> list[Path]:
        """Write ``scores.csv``, ``scores.md`` and ``scores.jsonl`` (one row per image) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        csv_path, md_path, jsonl_path = (directory / name for name in SCORE_FILES)
        csv_path.write_text(self.to_csv(), encoding="utf-8")
        md_path.write_text(self.to_markdown() + "\n", encoding="utf-8")
        jsonl_path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_image), encoding="utf-8"
        )
        return [csv_path, md_path, jsonl_path]


def _row(category: str, sums: torch.Tensor, count: int, unreadable: int, experts: Sequence[str]) -> ScoreRow:
    means = {e: float(sums[j]) / count if count else float("nan") for j, e in enumerate(experts)}
    return ScoreRow(category, count, unreadable, means)


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def infer_benchmark(records: Sequence[PromptRecord]) -> str:
    """The benchmark of a prompt set: geneval, wise, compbench, toy, plain (a plans.jsonl), else the file's stem."""
    if not records:
        return "prompts"
    first = records[0]
    if "include" in first.extra:
        return "geneval"
    if "prompt_id" in first.extra:
        return "wise"
    path = Path(first.source.rpartition(":")[0])
    if compbench_task_type(path) != "non":
        return "compbench"
    if "toyworld" in path.parts:
        return "toy"
    if path.name == "plans.jsonl":  # a prediction folder that lost its prediction.json
        return "plain"
    return path.stem or "prompts"


def folder_benchmark(folder: Path, records: Sequence[PromptRecord]) -> str:
    """The benchmark named by ``folder/prediction.json`` (written by BenchmarkWriter), else inferred."""
    manifest = folder / "prediction.json"
    if manifest.is_file():
        try:
            settings = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PromptDataError(f"{manifest}: not valid JSON ({' '.join(str(err).split())})") from None
        if not isinstance(settings, dict):
            raise PromptDataError(f"{manifest}: expected a JSON object, got {type(settings).__name__}")
        if settings.get("benchmark"):
            return str(settings["benchmark"])
    return infer_benchmark(records)


def _gather_objects(rows: list[dict]) -> list[dict]:
    """Every process's per-image rows (a collective under torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    parts: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part or []]


class ScoreCollector:
    """A test epoch's scores: :class:`CategoryMeans` for the table and one dict per image for scores.jsonl.

    Args:
        experts: expert names.
        categories: every category of the split.
        device: where the metric's states live (must be the device torch.distributed syncs on).
    """

    def __init__(self, experts: Sequence[str], categories: Sequence[str], device: torch.device) -> None:
        self.metric = CategoryMeans(experts, categories).to(device)
        self.per_image: list[dict] = []

    def add(
        self,
        scores: dict[str, torch.Tensor],
        records: Sequence[PromptRecord],
        info: Sequence[dict],
        places: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Add ``N`` images: each expert's scores ``[N]``, their records, per-image fields (``readable``...) and,
        where processes score parts of each batch, each image's place in the epoch, ``(batch, row of the global
        batch)``: ``scores.jsonl`` is then written in that order, whatever the number of processes."""
        readable = [row.get("readable", True) for row in info]
        self.metric.update(scores, [r.task_type for r in records], readable)
        for i, (record, row, place) in enumerate(zip(records, info, places or [None] * len(records), strict=True)):
            values = {e: float(scores[e][i]) for e in self.metric.experts}
            at = {} if place is None else {"_at": tuple(place)}
            self.per_image.append({"prompt": record.prompt, "category": record.task_type, **row, **values, **at})

    def finish(self, module: pl.LightningModule, results_dir: Path, run: str, benchmark: str) -> ScoreTable:
        """Log ``test/<expert>/<category>``, print the table, write CSV/Markdown/JSONL, attach them to MLflow."""
        table = ScoreTable.from_state(self.metric.compute(), self.metric, run, benchmark)
        for key, value in table.metrics().items():
            # Already summed over processes by the metric: no second reduction.
            module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        rows = _gather_objects(self.per_image)  # process by process
        if all("_at" in row for row in rows):
            rows.sort(key=lambda row: row["_at"])
        rows = [{k: v for k, v in row.items() if k != "_at"} for row in rows]
        if module.trainer.is_global_zero:
            print("\n" + table.to_markdown() + "\n", file=sys.stdout, flush=True)
            paths = table.write(results_dir, rows)
            for logger in module.loggers:
                if isinstance(logger, MLFlowLogger):
                    for path in paths:
                        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="scores")
        return table


def split_records(trainer: pl.Trainer, split: str) -> list[PromptRecord]:
    """The records of ``split`` held by the trainer's prompt datamodule (all of them, not one process's)."""
    records = (
        getattr(trainer.datamodule, "records", {}).get(split) if trainer.datamodule is not None else None
    )
    if not records:
        raise PromptDataError(
            f"scoring needs the {split} prompts from a PromptDataModule: set data.{split}_file"
        )
    return records


# ----------------------------------------------------------------------------- scoring a folder


class _Shard(DistributedSampler):
    """Contiguous, unpadded slices per process: every image is scored exactly once (no repeats)."""

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        share = math.ceil(len(dataset) / num_replicas)
        self.indices = list(range(rank * share, min(len(dataset), (rank + 1) * share)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_list(batch: list[ImageItem]) -> list[ImageItem]:
    return list(batch)


class FolderData(pl.LightningDataModule):
    """The images of a generated folder with their prompts, for ``bicot test`` with :class:`FolderScorer`.

    Args:
        folder: a folder written by ``bicot predict`` (any layout), or any folder of images.
        index: JSON Lines naming each image (field ``image``, relative to ``folder``) with its prompt
            metadata; default ``<folder>/plans.jsonl`` when it exists, else prompts come from file names
            (``<prompt>_<index>.png``, in ``folder/samples`` when there is one).
        batch_size: images per test step.
        num_workers: DataLoader workers that read the files.
    """

    def __init__(
        self, folder: str, index: str | None = None, batch_size: int = 16, num_workers: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.folder = Path(folder)
        self.index = index
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset: ImageFolderPrompts | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        index = Path(self.index) if self.index else self.folder / "plans.jsonl"
        if index.is_file():
            self.dataset = ImageFolderPrompts(self.folder, index)
        else:
            if self.index:
                raise PromptDataError(f"index file not found: {str(index)!r}")
            samples = self.folder / "samples"
            self.dataset = ImageFolderPrompts(samples if samples.is_dir() else self.folder)

    @property
    def records(self) -> list[PromptRecord]:
        """Every image's prompt record, in dataset order."""
        self.setup()
        return [record for _, record in self.dataset.items]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Keep image items on the host: each expert moves what it needs to its own device."""
        return batch

    def test_dataloader(self) -> DataLoader:
        self.setup()
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = _Shard(self.dataset, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_as_list,
        )


class FolderScorer(pl.LightningModule):
    """Scores a folder of generated images with reward experts, per category (``bicot test``).

    Needs :class:`FolderData` as the datamodule. Logs ``test/<expert>/<category>`` (and ``.../all``),
    prints the table, and writes ``scores.csv``, ``scores.md`` and ``scores.jsonl``. A file that cannot be
    decoded as an image scores 0 and is counted as unreadable; when no file can be decoded the run stops
    with :class:`PromptDataError` instead of logging zeros. (An index entry naming a file that does not
    exist already stops the run at setup, see :class:`ImageFolderPrompts`.)

    Args:
        rewards: the experts (weights are not used: each expert is its own column).
        results_dir: where the score files go (default: the scored folder).
        benchmark: the name in the score files (default: the folder's prediction.json, else inferred
            from the prompts: geneval, wise, compbench, toy, or the prompt file's stem).
        run_name: the run's label in the score files and reports (default: the folder's name).
    """

    def __init__(
        self,
        rewards: RewardEnsemble,
        results_dir: str | None = None,
        benchmark: str | None = None,
        run_name: str | None = None,
    ) -> None:
        super().__init__()
        self.rewards = rewards
        self.results_dir = results_dir
        self.benchmark = benchmark
        self.run_name = run_name
        self.collector: ScoreCollector | None = None

    def _data(self) -> FolderData:
        data = self.trainer.datamodule
        if not isinstance(data, FolderData):
            raise ValueError("FolderScorer scores a folder: use data.class_path: bicot.scoring.FolderData")
        return data

    def on_test_epoch_start(self) -> None:
        data = self._data()
        self._benchmark = self.benchmark or folder_benchmark(data.folder, data.records)  # a bad manifest: now
        categories = [r.task_type for r in data.records]
        self.collector = ScoreCollector(self.rewards.names, categories, self.device)

    def test_step(self, batch: Sequence[ImageItem], batch_idx: int) -> None:
        """Score a batch of files (grouped by image size); an unreadable file scores 0 on every expert."""
        scores = {name: torch.zeros(len(batch)) for name in self.rewards.names}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(batch):
            if item.image is not None:
                by_shape.setdefault(tuple(item.image.shape), []).append(i)
        bad = [item.path for item in batch if item.image is None]
        if bad:
            rank_zero_warn(f"{len(bad)} file(s) cannot be read as images and score 0: {bad}")
        for rows in by_shape.values():
            out = self.rewards(torch.stack([batch[i].image for i in rows]), [batch[i].record for i in rows])
            for name, values in out.per_expert.items():
                scores[name][rows] = values
        info = [self._info(item) for item in batch]
        self.collector.add(scores, [item.record for item in batch], info)

    def _info(self, item: ImageItem) -> dict:
        folder = self._data().folder
        path = Path(item.path)
        row = {"image": str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)}
        row["readable"] = item.image is not None
        for key in ("plan", "seed"):
            if key in item.record.extra:
                row[key] = item.record.extra[key]
        return row

    def on_test_epoch_end(self) -> None:
        data = self._data()
        self._check_some_readable(data)
        benchmark = self._benchmark
        run = self.run_name or data.folder.resolve().name
        results = Path(self.results_dir) if self.results_dir else data.folder
        self.collector.finish(self, results, run, benchmark)
        self.collector = None

    def _check_some_readable(self, data: FolderData) -> None:
        """Stop when no image could be decoded: an all-zero table would pass for a result.

        The counts are the metric's, summed over every process, so all processes stop together.
        """
        state = self.collector.metric.compute()
        images, unreadable = int(state["counts"].sum()), int(state["unreadable"].sum())
        if images and unreadable == images:
            bad = [row["image"] for row in self.collector.per_image if not row.get("readable", True)]
            example = f" (e.g. {bad[0]!r})" if bad else ""
            raise PromptDataError(
                f"none of the {images} file(s) in {str(data.folder)!r} can be read as an image{example}: "
                "nothing to score"
            )
