"""DiffusionBaseline on a tiny random diffusers pipeline built here: loading, seeds, and predict -> test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from bicot.scoring import FolderData, FolderScorer  # noqa: E402
from callbacks.prediction_writer import BenchmarkWriter  # noqa: E402
from datamodules.prompts import PromptDataModule  # noqa: E402
from datamodules.records import PromptRecord  # noqa: E402
from modules.diffusion_baseline import BaselineLoadError, DiffusionBaseline  # noqa: E402
from modules.rewards.color import ColorMatchExpert  # noqa: E402
from modules.rewards.ensemble import RewardEnsemble  # noqa: E402
from modules.seeding import image_seeds  # noqa: E402

SIZE = 16  # pixels; the VAE halves it once, so the UNet sees 8 x 8 latents


def tiny_pipeline_dir(folder: Path) -> Path:
    """A random Stable Diffusion pipeline (~1.6 MB) assembled from configs and saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    # A character-level CLIP vocabulary: printable ASCII, alone and word-final, no merges.
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny_sd"))


def baseline(path: Path, **kwargs) -> DiffusionBaseline:
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=2.0) | kwargs
    return DiffusionBaseline(str(path), **args)


def records(*prompts: str) -> list[PromptRecord]:
    return [
        PromptRecord(prompt=p, task_type="color", source=f"color_val.txt:{i + 1}")
        for i, p in enumerate(prompts)
    ]


def test_predict_step_gives_the_policy_dict_with_per_image_seeds(pipeline_dir):
    model = baseline(pipeline_dir, images_per_prompt=2, seed=3)
    batch = records("a red cup", "a blue kite")
    out = model.predict_step(batch, 0)
    assert out["images"].dtype == torch.uint8 and out["images"].shape == (4, SIZE, SIZE, 3)
    assert out["plans"] is None and out["image_tokens"] is None
    assert out["prompts"] == ["a red cup", "a red cup", "a blue kite", "a blue kite"]
    assert out["seeds"] == image_seeds(batch, 2, 3) and out["records"] == batch
    assert not torch.equal(out["images"][0], out["images"][1])  # two samples of a prompt differ
    # The second prompt alone, in a batch of one: the same noise, so the same image (up to float
    # differences of batched kernels, hence one grey level).
    alone = model.predict_step(batch[1:], 0)
    assert (alone["images"].int() - out["images"][2:].int()).abs().max() <= 1
    other = baseline(pipeline_dir, images_per_prompt=2, seed=4).predict_step(batch, 0)
    assert (other["images"].int() - out["images"].int()).abs().max() > 8


def test_chunks_give_the_same_images(pipeline_dir):
    batch = records("a red cup", "a blue kite", "a green bench")
    whole = baseline(pipeline_dir).predict_step(batch, 0)["images"]
    chunked = baseline(pipeline_dir, max_batch_size=1).predict_step(batch, 0)["images"]
    assert (whole.int() - chunked.int()).abs().max() <= 1


def test_bad_sources_and_arguments(tmp_path, pipeline_dir):
    with pytest.raises(BaselineLoadError, match="pipeline folder not found"):
        DiffusionBaseline(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaselineLoadError, match="has no model_index.json"):
        DiffusionBaseline(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"may not set \['generator'\]"):
        DiffusionBaseline(str(pipeline_dir), pipeline_kwargs={"generator": None})
    with pytest.raises(ValueError, match="images_per_prompt must be an integer >= 1"):
        DiffusionBaseline(str(pipeline_dir), images_per_prompt=0)


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    args = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return pl.Trainer(default_root_dir=tmp_path, **(args | kwargs))


def test_baseline_folder_goes_through_predict_and_test(tmp_path, pipeline_dir):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red cup\na blue kite\na green bench\n")
    out = tmp_path / "eval" / "color_sd"
    writer = BenchmarkWriter(str(out), "compbench", images_per_prompt=2)
    data = PromptDataModule(predict_file=str(prompts), val_batch_size=2)
    trainer(tmp_path, callbacks=[writer]).predict(
        baseline(pipeline_dir, images_per_prompt=2), datamodule=data
    )
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [
        f"{p}_{i:06d}.png"
        for p, i in [
            ("a blue kite", 2),
            ("a blue kite", 3),
            ("a green bench", 4),
            ("a green bench", 5),
            ("a red cup", 0),
            ("a red cup", 1),
        ]
    ]
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest["model"] == "modules.diffusion_baseline.DiffusionBaseline" and not manifest["with_plans"]

    scorer = FolderScorer(RewardEnsemble([ColorMatchExpert()]))
    trainer(tmp_path).test(scorer, datamodule=FolderData(str(out), batch_size=4), verbose=False)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [(r["run"], r["benchmark"], r["category"], r["images"]) for r in rows] == [
        ("color_sd", "compbench", "color", "6"),
        ("color_sd", "compbench", "all", "6"),
    ]
    per_image = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(per_image) == 6 and all(0.0 <= r["color"] <= 1.0 and r["readable"] for r in per_image)
    assert sorted(r["image"] for r in per_image) == sorted(f"samples/{n}" for n in names)
