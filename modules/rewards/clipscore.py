"""CLIPScore expert (torchmetrics' CLIPScore, T2I-CompBench's non-spatial metric), rescaled to [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from datamodules.records import PromptRecord
from modules.rewards.base import RewardExpert
from modules.rewards.common import check_batch_size, chunks, load_model_and_processor


def _features(output: object) -> torch.Tensor:
    # transformers >= 5 returns an output object from get_*_features; torchmetrics 1.9 expects the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class FeatureTensors(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return plain tensors.

    torchmetrics 1.9's CLIPScore calls ``.norm`` on what these return, which fails on the output objects
    of transformers 5; this adapter hands it the projected embeddings, in the model's dtype on input.
    """

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(
            self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype))
        ).float()

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _features(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        ).float()


class CLIPScoreExpert(RewardExpert):
    """CLIPScore per image, through torchmetrics.

    torchmetrics computes ``100 * cos(image, text)`` per image (its ``CLIPScore.compute`` then averages and
    clips at 0). This expert takes the per-image value and rescales it as ``clamp(value / 100, 0, 1)``, i.e.
    the cosine clipped at 0: real CLIP ViT-L/14 pairs land around 0.2 to 0.35, the scale T2I-CompBench
    reports its non-spatial scores on.

    Args:
        model_name_or_path: a CLIP folder or hub id, loaded with ``CLIPModel``/``CLIPProcessor.from_pretrained``
            (default ``openai/clip-vit-large-patch14``, torchmetrics' default).
        dtype: weight dtype.
        batch_size: images per forward (``None``: all at once).
        placement: ``device``, ``cpu`` or ``offload`` (see :class:`RewardExpert`).
        trust_remote_code: passed to ``from_pretrained``; never on unless set.
    """

    name = "clipscore"

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        dtype: str = "float32",
        batch_size: int | None = 64,
        placement: str = "device",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(placement)
        self.batch_size = check_batch_size(batch_size, self.name)
        model, processor = load_model_and_processor(
            CLIPModel, CLIPProcessor, model_name_or_path, self.name, dtype, trust_remote_code
        )
        adapter = FeatureTensors(model)
        # torchmetrics accepts only a few hub ids by name; a loader callable lets any path through.
        self.metric = CLIPScore(model_name_or_path=lambda: (adapter, processor))

    def score(self, images: torch.Tensor, prompts: Sequence[PromptRecord]) -> torch.Tensor:
        """float32 ``[N]``: ``clamp(CLIPScore / 100, 0, 1)`` per image."""
        n, height, width, _ = images.shape
        if height < 2 or width < 2:
            self.mark_unreadable(n, f"images of shape {tuple(images.shape)} are too small to embed")
            return torch.zeros(n)
        chw = images.to(self.device).permute(0, 3, 1, 2)  # [N, 3, H, W] uint8, as torchmetrics takes them
        scores = torch.empty(n)
        for rows in chunks(n, self.batch_size):
            texts = [record.prompt for record in prompts[rows]]
            value, _ = _clip_score_update(list(chw[rows]), texts, self.metric.model, self.metric.processor)
            scores[rows] = value.float().cpu()
        return (scores / 100.0).clamp(0.0, 1.0)
