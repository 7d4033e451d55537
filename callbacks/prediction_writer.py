"""BenchmarkWriter: writes predicted images in each benchmark's folder layout, with plans.jsonl beside them."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image

from datamodules.records import PromptRecord
from modules.seeding import prompt_line

# Lightning cannot infer batch indices from the iterable prompt loaders; the writer does not need them.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")

LAYOUTS: tuple[str, ...] = ("compbench", "geneval", "wise", "plain")
# Images per prompt each benchmark's protocol uses (T2I-CompBench 10, GenEval 4, WISE one file per id).
PROTOCOL_IMAGES: dict[str, int | None] = {"compbench": 10, "geneval": 4, "wise": 1, "plain": None}
PLANS_FILE, MANIFEST_FILE = "plans.jsonl", "prediction.json"
_PART_GLOB = ".plans.rank*.jsonl"
# Keys the writer sets in every plans.jsonl row; a record's own fields of the same name are replaced.
_ROW_KEYS = ("image", "prompt", "plan", "seed", "line", "sample")
_T2I_FIELDS = ("task_type", "nouns", "attr_nouns", "spatial_info", "numeracy_info")


class PredictionLayoutError(ValueError):
    """A prompt or prediction cannot be written in the requested layout; the message names the prompt."""


def relative_path(layout: str, record: PromptRecord, line: int, sample: int, per_prompt: int) -> str:
    """Where image ``sample`` of the prompt on 0-based ``line`` goes, relative to the output folder.

    * ``compbench``: ``samples/{prompt}_{idx:06d}.png``, ``idx = line * per_prompt + sample`` (one running
      index over the file; T2I-CompBench's scorers read the prompt before the first ``_``).
    * ``geneval``: ``{line:05d}/samples/{sample:04d}.png``.
    * ``wise``: ``{prompt_id}.png``.
    * ``plain``: ``{line:05d}_{sample:04d}.png``.
    """
    if layout == "compbench":
        return f"samples/{record.prompt}_{line * per_prompt + sample:06d}.png"
    if layout == "geneval":
        return f"{line:05d}/samples/{sample:04d}.png"
    if layout == "wise":
        return f"{record.extra['prompt_id']}.png"
    return f"{line:05d}_{sample:04d}.png"


def check_record(layout: str, record: PromptRecord) -> None:
    """Refuse a prompt that the layout cannot represent faithfully (the scorer would misread it)."""
    where = record.source or repr(record.prompt)
    if layout == "compbench":
        bad = [c for c in ("_", "/", "\\") if c in record.prompt]
        if bad:
            raise PredictionLayoutError(
                f"{where}: prompt {record.prompt!r} contains {bad[0]!r}; T2I-CompBench file names are "
                "'{prompt}_{index}.png' and its scorers take the prompt as the text before the first '_' "
                "(and a path separator cannot be in a file name): edit the prompt or use layout: plain"
            )
        if len(f"{record.prompt}_000000.png".encode()) > 255:
            raise PredictionLayoutError(f"{where}: prompt is too long for a file name (255 bytes)")
    elif layout == "geneval" and "include" not in record.extra:
        raise PredictionLayoutError(
            f"{where}: layout geneval needs GenEval metadata records (with 'tag' and 'include', as in "
            "evaluation_metadata.jsonl) so that each folder's metadata.jsonl is what GenEval's scorer reads"
        )
    elif layout == "wise":
        pid = record.extra.get("prompt_id")
        if pid is None or not str(pid).replace("-", "").replace("_", "").isalnum():
            raise PredictionLayoutError(
                f"{where}: layout wise needs records from a WISE JSON file with a 'prompt_id' usable as a "
                f"file name, got {pid!r}"
            )


def source_fields(record: PromptRecord) -> dict[str, Any]:
    """The record in its own schema (GenEval metadata or T2I-R1), so ``load_prompts`` reads it back."""
    if "include" in record.extra:  # GenEval: tag/include/exclude verbatim, what its scorer reads
        return {"prompt": record.prompt, "tag": record.task_type, **record.extra}
    data = record.to_dict()
    fields = {key: data[key] for key in _T2I_FIELDS if data[key] not in (None, [], ())}
    return {"prompt": record.prompt, **fields, **record.extra}


def _images_array(prediction: dict, rows: int) -> np.ndarray:
    images = prediction.get("images")
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
    ):
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise PredictionLayoutError(f"prediction 'images' must be uint8 [R, H, W, 3], got {got}")
    if images.shape[0] != rows:
        raise PredictionLayoutError(f"prediction has {images.shape[0]} images but {rows} prompt rows")
    return images.detach().cpu().numpy()


def _per_row(prediction: dict, key: str, rows: int) -> list:
    values = prediction.get(key)
    if values is None:
        return [None] * rows
    values = list(values)
    if len(values) != rows:
        raise PredictionLayoutError(f"prediction {key!r} has {len(values)} entries for {rows} images")
    return values


class BenchmarkWriter(BasePredictionWriter):
    """Writes every predicted image in a benchmark's layout, and ``plans.jsonl`` with one row per image.

    ``plans.jsonl`` rows hold ``image`` (path relative to ``output_dir``), ``prompt``, ``plan``, ``seed``,
    ``line`` (0-based line of the prompt file), ``sample``, and the prompt's own metadata in its schema,
    so the file is also an index that ``datamodules.prompts.load_prompts`` and
    ``modules.rewards.folder.ImageFolderPrompts(index=...)`` read back. ``prediction.json`` records the
    layout, the benchmark name and the counts. Rows are sorted by (line, sample) whatever the sharding.

    It writes the predictions of ``bicot predict`` and, when the module's ``test_step`` returns the same
    dict (``BiCoTGRPO`` does), those of ``bicot test`` too.

    Args:
        output_dir: the folder to fill (created; must be empty or a previous prediction folder).
        layout: ``compbench``, ``geneval``, ``wise`` or ``plain`` (see :func:`relative_path`).
        images_per_prompt: images each prompt must have; ``None`` uses the benchmark's protocol
            (T2I-CompBench 10, GenEval 4, WISE 1, plain any). The model decides how many it draws
            (``model.policy.init_args.predict_images_per_prompt`` for bicot); a mismatch stops the run.
        benchmark: the name scores and reports use (default: the layout; e.g. ``toy`` for the toy world).
        overwrite: replace a previous prediction folder (one holding plans.jsonl) instead of stopping.
        keep_predictions: let Lightning also keep every prediction in memory (off: the images are on
            disk, and a benchmark's worth of them would not fit in memory).
    """

    def __init__(
        self,
        output_dir: str,
        layout: str = "plain",
        images_per_prompt: int | None = None,
        benchmark: str | None = None,
        overwrite: bool = False,
        keep_predictions: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        expected = PROTOCOL_IMAGES[layout] if images_per_prompt is None else images_per_prompt
        if expected is not None and (
            isinstance(expected, bool) or not isinstance(expected, int) or expected < 1
        ):
            raise ValueError(f"images_per_prompt must be an integer >= 1 or null, got {images_per_prompt!r}")
        if layout == "wise" and expected != 1:
            raise ValueError(f"layout wise stores one image per prompt ({{prompt_id}}.png), got {expected}")
        self.output_dir = Path(output_dir)
        self.layout = layout
        self.images_per_prompt = expected
        self.benchmark = benchmark or layout
        self.overwrite = overwrite
        self.keep_predictions = keep_predictions
        self._warned_seeds = False

    # ---- folder life cycle ---------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("predict", "test"):
            return
        if stage == "predict" and not self.keep_predictions:
            trainer.predict_loop.return_predictions = False
        scored = getattr(trainer.datamodule, "folder", None)
        if scored is not None and Path(scored).resolve() == self.output_dir.resolve():
            raise PredictionLayoutError(
                f"the writer's output_dir {str(self.output_dir)!r} is the folder being scored: remove the "
                "writer from a folder-scoring run"
            )
        if trainer.is_global_zero:
            self._prepare_folder()
        trainer.strategy.barrier("prediction_writer_setup")

    def _prepare_folder(self) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise PredictionLayoutError(f"output_dir {str(out)!r} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            ours = (out / PLANS_FILE).exists() or (out / MANIFEST_FILE).exists() or any(out.glob(_PART_GLOB))
            if not ours:
                raise PredictionLayoutError(
                    f"output_dir {str(out)!r} is not empty and holds no {PLANS_FILE}: choose a new folder"
                )
            if not self.overwrite:
                raise PredictionLayoutError(
                    f"output_dir {str(out)!r} holds an earlier prediction run; set overwrite: true on the "
                    "writer to replace it, or choose a new folder"
                )
            shutil.rmtree(out)  # stale images would be scored with the new ones
        out.mkdir(parents=True, exist_ok=True)

    # ---- writing -------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self.write_batch(trainer, prediction, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Generate-then-score runs: write what ``test_step`` drew (outputs without images are skipped)."""
        if isinstance(outputs, dict) and outputs.get("images") is not None:
            self.write_batch(trainer, outputs, batch)

    def write_batch(
        self, trainer: pl.Trainer, prediction: dict | None, batch: Sequence[PromptRecord]
    ) -> None:
        """Write one batch: rows are prompt-major, ``R = len(records) * images per prompt``.

        The records are ``prediction["records"]`` when the module says which prompts it drew (each
        process draws its share of a global batch), else the whole ``batch``.
        """
        if prediction is None:  # a process whose share of the global batch was empty
            return
        if not isinstance(prediction, dict) or "prompts" not in prediction:
            raise PredictionLayoutError(
                "predict_step must return a dict with 'images', 'prompts' and 'plans' (and optionally "
                "'seeds' and 'records')"
            )
        records = prediction.get("records")
        records = list(batch) if records is None else list(records)
        if not records:
            return
        rows = len(prediction["prompts"])
        per_prompt, rest = divmod(rows, len(records))
        if rest or per_prompt < 1:
            raise PredictionLayoutError(
                f"{rows} images for {len(records)} prompts: not a whole number per prompt"
            )
        self._check_count(per_prompt)
        images = _images_array(prediction, rows)
        plans, seeds = _per_row(prediction, "plans", rows), _per_row(prediction, "seeds", rows)
        if seeds[0] is None and not self._warned_seeds:
            self._warned_seeds = True
            rank_zero_warn(
                "the model's predict_step returned no per-image 'seeds'; plans.jsonl records seed null"
            )
        lines = []
        for p, record in enumerate(records):
            check_record(self.layout, record)
            line = prompt_line(record)
            for i in range(per_prompt):
                r = p * per_prompt + i
                if prediction["prompts"][r] != record.prompt:
                    raise PredictionLayoutError(
                        f"prediction row {r} is for prompt {prediction['prompts'][r]!r}, "
                        f"expected {record.prompt!r}"
                    )
                rel = relative_path(self.layout, record, line, i, per_prompt)
                self._save(images[r], rel)
                row = {
                    "image": rel,
                    "prompt": record.prompt,
                    "plan": plans[r],
                    "seed": seeds[r],
                    "line": line,
                }
                row["sample"] = i
                extra = {k: v for k, v in source_fields(record).items() if k not in _ROW_KEYS}
                lines.append(json.dumps({**row, **extra}, ensure_ascii=False))
            if self.layout == "geneval":
                self._write_geneval_metadata(record, line)
        part = self.output_dir / f".plans.rank{trainer.global_rank}.jsonl"
        with part.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def _check_count(self, per_prompt: int) -> None:
        expected = self.images_per_prompt
        if expected is not None and per_prompt != expected:
            raise PredictionLayoutError(
                f"layout {self.layout} expects {expected} images per prompt but the model drew {per_prompt}: "
                f"set model.policy.init_args.predict_images_per_prompt={expected} (bicot) or "
                f"model.init_args.images_per_prompt={expected} (diffusion baseline), or the writer's "
                "images_per_prompt"
            )

    def _save(self, image: np.ndarray, rel: str) -> None:
        path = self.output_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)  # uint8 [H, W, 3] is RGB

    def _write_geneval_metadata(self, record: PromptRecord, line: int) -> None:
        # GenEval's scorer json.load()s each folder's metadata.jsonl and copies json.dumps() of it into
        # every result row (summary_scores.py groups prompts by that string). Its prompt files and
        # generation script keep the key order tag, include, [exclude], prompt, so writing the record in
        # that order makes the file the prompt's line of evaluation_metadata.jsonl, byte for byte.
        rest = {k: v for k, v in record.extra.items() if k not in _ROW_KEYS and k != "tag"}
        meta = {"tag": record.task_type, **rest, "prompt": record.prompt}
        (self.output_dir / f"{line:05d}" / "metadata.jsonl").write_text(
            json.dumps(meta) + "\n", encoding="utf-8"
        )

    # ---- merging -------------------------------------------------------------------------------
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        self.finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish(trainer, pl_module)

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge every process's rows into plans.jsonl (sorted by line, sample) and write prediction.json."""
        trainer.strategy.barrier("prediction_writer_finish")
        if not trainer.is_global_zero:
            return
        parts = sorted(self.output_dir.glob(_PART_GLOB))
        unique: dict[tuple[int, int], dict] = {}
        for part in parts:
            for text in part.read_text(encoding="utf-8").splitlines():
                row = json.loads(text)
                # A prompt drawn by two processes (a module that does not split the batch) counts once.
                unique.setdefault((row["line"], row["sample"]), row)
        rows = [unique[key] for key in sorted(unique)]
        with (self.output_dir / PLANS_FILE).open("w", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for part in parts:
            part.unlink()
        manifest = {
            "layout": self.layout,
            "benchmark": self.benchmark,
            "images": len(rows),
            "prompts": len({row["line"] for row in rows}),
            "images_per_prompt": max((row["sample"] + 1 for row in rows), default=0),
            "with_plans": any(row["plan"] is not None for row in rows),
            "model": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        }
        (self.output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
