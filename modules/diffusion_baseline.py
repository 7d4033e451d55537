"""DiffusionBaseline: any diffusers text-to-image pipeline behind bicot's predict interface (baselines)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from datamodules.records import PromptRecord
from modules.hub import load_cache_first, local_folder
from modules.seeding import image_seeds, rank_share

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BaselineLoadError(ValueError):
    """A path or id that cannot be loaded as a diffusers pipeline."""


def load_pipeline(source: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """``DiffusionPipeline.from_pretrained(source)`` with a clear error for a missing or foreign folder."""
    from diffusers import DiffusionPipeline  # optional dependency: imported only when a baseline is used

    path = local_folder(source)
    if path is not None:
        if not path.is_dir():
            raise BaselineLoadError(f"diffusers pipeline folder not found: {str(path)!r}")
        if not (path / "model_index.json").is_file():
            raise BaselineLoadError(
                f"{str(path)!r} is not a diffusers pipeline folder: it has no model_index.json "
                "(write one with pipeline.save_pretrained)"
            )
    try:
        return load_cache_first(
            DiffusionPipeline.from_pretrained, source, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, json.JSONDecodeError) as err:
        raise BaselineLoadError(f"could not load a diffusers pipeline from {source!r}: {err}") from err


def to_uint8(images: Any) -> torch.Tensor:
    """Pipeline images (``output_type="np"``: float ``[B, H, W, 3]`` in [0, 1], or PIL) -> uint8 ``[B, H, W, 3]``."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])
        return torch.from_numpy(images)
    array = np.asarray(images)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"the pipeline returned images of shape {array.shape}, expected [B, H, W, 3]")
    return torch.from_numpy(np.ascontiguousarray(array))


class DiffusionBaseline(pl.LightningModule):
    """A diffusers text-to-image pipeline (FLUX.1, SD3.5, SDXL, ...) that predicts like bicot's policy.

    ``predict_step`` returns the same dict as ``BiCoTGRPO.predict_step`` with ``plans`` ``None``, so
    ``bicot predict`` with ``callbacks.prediction_writer.BenchmarkWriter`` writes a baseline's folder
    in any benchmark layout and ``bicot test`` scores it like any other.

    Each image has its own generator, seeded by ``modules.seeding.image_seed(seed, line, sample)``
    on the CPU (diffusers' advice for reproducible noise across devices), so reruns and sharded runs
    start from the same noise.

    Args:
        model_name_or_path: a ``save_pretrained`` pipeline folder (or a hub id already in the local cache).
        images_per_prompt: images per prompt.
        seed: base seed.
        num_inference_steps: denoising steps (``None``: the pipeline's default).
        guidance_scale: CFG scale (``None``: the pipeline's default).
        height, width: image size (``None``: the pipeline's default).
        max_batch_size: most images per pipeline call (memory); ``None``: the whole batch at once.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: let diffusers run code shipped with the pipeline; never on unless set.
        pipeline_kwargs: further arguments of the pipeline's ``__call__`` (e.g. ``negative_prompt``,
            ``max_sequence_length``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        images_per_prompt: int = 1,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        max_batch_size: int | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        pipeline_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (
            ("images_per_prompt", images_per_prompt),
            ("max_batch_size", max_batch_size or 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        reserved = {"prompt", "generator", "num_images_per_prompt", "output_type"} & set(
            pipeline_kwargs or {}
        )
        if reserved:
            raise ValueError(
                f"pipeline_kwargs may not set {sorted(reserved)}: the baseline sets them per image"
            )
        self.source = model_name_or_path
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.max_batch_size = max_batch_size
        call = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        call.update(height=height, width=width)
        self.call_kwargs = {k: v for k, v in call.items() if v is not None} | dict(pipeline_kwargs or {})
        self.pipeline = load_pipeline(model_name_or_path, DTYPES[dtype], trust_remote_code)
        self.pipeline.set_progress_bar_config(disable=True)  # Lightning's bar counts batches
        # Registered as submodules so that Lightning's device moves reach the pipeline's own modules.
        self.parts = nn.ModuleDict(
            {name: m for name, m in self.pipeline.components.items() if isinstance(m, nn.Module)}
        )
        self.parts.requires_grad_(False)
        self.parts.eval()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """One image per (prompt, seed) row, ``max_batch_size`` rows a call. Returns uint8 ``[R, H, W, 3]``."""
        chunk = self.max_batch_size or len(prompts)
        images = []
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[part]]
            out = self.pipeline(
                prompt=list(prompts[part]),
                generator=generators,
                num_images_per_prompt=1,
                output_type="np",
                **self.call_kwargs,
            )
            images.append(to_uint8(out.images))
        return torch.cat(images)

    def predict_step(self, batch: Sequence[PromptRecord], batch_idx: int = 0) -> dict:
        """``images_per_prompt`` images for each prompt of this process's share of the global batch.

        Returns:
            ``{"images": uint8 [R, H, W, 3], "image_tokens": None, "plans": None, "prompts": list[str],
            "seeds": list[int], "records": list[PromptRecord]}``, rows prompt-major.
        """
        records = list(batch)
        trainer = self._trainer  # None when called outside a Trainer (the property would raise)
        if trainer is not None and trainer.world_size > 1:
            # PromptDataModule hands every process the same global batch; each draws its own prompts.
            records = rank_share(batch, trainer.global_rank, trainer.world_size)
        n = self.images_per_prompt
        prompts = [r.prompt for r in records for _ in range(n)]
        seeds = image_seeds(records, n, self.seed)
        images = self.generate(prompts, seeds) if prompts else torch.zeros(0, 1, 1, 3, dtype=torch.uint8)
        out = {"images": images, "image_tokens": None, "plans": None, "prompts": prompts, "seeds": seeds}
        return out | {"records": list(records)}
