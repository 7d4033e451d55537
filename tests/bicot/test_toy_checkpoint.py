"""The shipped toy checkpoint and its builder: loadable like any Janus checkpoint, small, and able to draw."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, JanusForConditionalGeneration

from bicot.toy_checkpoint import BuildConfig, accuracy_by_category, build
from datamodules.prompts import load_prompts
from modules.policy import JanusPolicy, SamplingConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "checkpoints" / "toy"
VAL = REPO / "datamodules" / "toyworld" / "data" / "val.jsonl"


def test_shipped_checkpoint_is_small_safetensors_with_a_build_report():
    files = {p.name for p in SHIPPED.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 20 * 2**20
    report = json.loads((SHIPPED / "build_report.json").read_text())
    categories = {"color", "shape", "numeracy", "spatial", "complex", "reasoning"}
    assert categories <= set(report["val_accuracy"])
    # imperfect on purpose: headroom left for the RL run to show
    assert 0 < report["val_accuracy"]["all"] < 0.8


def test_shipped_checkpoint_loads_in_plain_transformers():
    model = JanusForConditionalGeneration.from_pretrained(SHIPPED)
    processor = AutoProcessor.from_pretrained(SHIPPED)
    assert model.config.vision_config.num_image_tokens == 16  # one code per cell of the 4 x 4 scene grid
    assert processor.tokenizer.boi_token is not None


def test_shipped_checkpoint_draws_recognisable_scenes_through_the_policy():
    """Loaded by the policy's normal path, the checkpoint draws colour prompts that the toy ORM accepts."""
    policy = JanusPolicy(str(SHIPPED), sampling=SamplingConfig(cfg_scale=3.0, plan_max_tokens=16))
    colour = [r for r in load_prompts(VAL) if r.task_type == "color"][:12]
    accuracy = accuracy_by_category(policy, colour, seed=0)
    assert accuracy["color"] >= 0.5  # the build report measured 0.8 on all 30 colour prompts


def test_builder_writes_a_checkpoint_the_policy_loads(tmp_path):
    """The builder end to end at a tiny budget: VQ, tokenizer, supervised LM, report, save_pretrained."""
    cfg = BuildConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        vq_steps=3,
        vq_batch=4,
        lm_steps=3,
        lm_batch=4,
        plan_batch=4,
    )
    report = build(tmp_path, cfg, log=lambda *_: None)
    assert {"vq", "val_accuracy", "parameters", "build_seconds"} <= set(report)
    assert json.loads((tmp_path / "build_report.json").read_text())["config"]["lm_steps"] == 3
    policy = JanusPolicy(str(tmp_path))
    assert policy.model.config.text_config.hidden_size == 32
    assert (tmp_path / "model.safetensors").exists()
