"""Tests for the CLIPScore expert: torchmetrics' per-image CLIPScore on a tiny CLIP, rescaled to [0, 1]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules.records import PromptRecord
from modules.rewards.clipscore import CLIPScoreExpert
from modules.rewards.common import ExpertCheckpointError
from modules.rewards.tiny import save_tiny_clip

PROMPTS = ["a red ball", "a cat", "two dogs near a bench", "a zebra"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def expert(tiny_dir):
    return CLIPScoreExpert(str(tiny_dir))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_scores_are_clipped_cosines(expert):
    scores = expert(images(4), [PromptRecord(p) for p in PROMPTS])
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    # The same number from the CLIP model directly: cosine of the projected embeddings, clipped at 0.
    model, processor = expert.metric.model.model, expert.metric.processor
    pixels = processor(images=list(images(4).permute(0, 3, 1, 2)), return_tensors="pt").pixel_values
    text = processor(text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = model.text_projection(model.text_model(**text).pooler_output)
    cosine = F.cosine_similarity(image_emb, text_emb, dim=-1)
    torch.testing.assert_close(scores, cosine.clamp(0, 1), atol=1e-5, rtol=1e-4)


def test_positive_cosines_are_the_scores(tiny_dir):
    # The tiny CLIP's cosines are all negative (scored 0) for these pairs; with its text projection negated
    # they are positive, so each score is the cosine itself, here from CLIP's own image-text logits.
    flipped = CLIPScoreExpert(str(tiny_dir))
    model, processor = flipped.metric.model.model, flipped.metric.processor
    with torch.no_grad():
        model.text_projection.weight.neg_()
    scores = flipped(images(4), [PromptRecord(p) for p in PROMPTS])
    pixels = processor(images=list(images(4).permute(0, 3, 1, 2)), return_tensors="pt").pixel_values
    text = processor(text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(pixel_values=pixels, **text).logits_per_image  # logit_scale * cosine
    cosine = logits.diagonal() / model.logit_scale.exp()
    assert (cosine > 0.05).all()
    torch.testing.assert_close(scores, cosine, atol=1e-5, rtol=1e-4)


def test_too_small_images_score_zero_and_are_counted(expert):
    before = expert.unreadable
    with pytest.warns(UserWarning, match="too small"):
        scores = expert(torch.zeros(2, 1, 1, 3, dtype=torch.uint8), [PromptRecord("a cat")] * 2)
    assert scores.tolist() == [0.0, 0.0] and expert.unreadable == before + 2


def test_batch_size_does_not_change_scores(tiny_dir, expert):
    records = [PromptRecord(p) for p in PROMPTS]
    torch.testing.assert_close(
        CLIPScoreExpert(str(tiny_dir), batch_size=1)(images(4), records), expert(images(4), records)
    )


def test_bfloat16_and_missing_checkpoint(tiny_dir, tmp_path):
    half = CLIPScoreExpert(str(tiny_dir), dtype="bfloat16")
    assert half.metric.model.model.dtype == torch.bfloat16
    assert half(images(1), [PromptRecord("a cat")]).dtype == torch.float32
    with pytest.raises(ExpertCheckpointError, match=r"'clipscore'.*not found: .*no_clip"):
        CLIPScoreExpert(str(tmp_path / "no_clip"))
