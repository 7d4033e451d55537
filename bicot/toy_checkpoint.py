"""Builds the shipped toy checkpoint from nothing: a Janus whose VQ and language model learn the toy world.

One command, deterministic for a seed, about 10-20 minutes on 2 CPU cores::

    python -m bicot.toy_checkpoint --out checkpoints/toy

Stages: (1) a word tokenizer over the toy prompts, plans and the reasoning instruction; (2) the
``JanusVQVAE`` learns to tokenize rendered scenes, one token per grid cell; (3) the language model is
supervised on prompt -> plan and prompt (+ plan) -> image tokens, with sequences built by
``JanusPolicy``'s own methods so that supervised inputs are exactly the inputs of RL; (4) accuracy per
category on the validation prompts is measured and written to ``build_report.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bicot.templates import REASONING_TEMPLATE
from datamodules.prompts import load_prompts
from datamodules.records import PromptRecord
from datamodules.toyworld.grammar import allowed_in_training
from datamodules.toyworld.scene import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    MAX_OBJECTS,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    Placed,
    concrete,
    render,
    sample_layout,
)
from datamodules.toyworld.schema import spec_from_record
from datamodules.toyworld.splits import DATA_DIR
from modules import janus_ops
from modules.policy import JanusPolicy, SamplingConfig
from modules.rewards.toy_orm import ToyORMExpert
from modules.tiny import TinyJanusSpec, build_tiny_janus, words_of

# Cell contents and their VQ codes: 0 is an empty cell, then every colour-shape pair.
CELL_KINDS: tuple[tuple[str, str] | None, ...] = (None, *((c, s) for s in SHAPES for c in COLORS))
SFT_PARTS = ["language_model", "lm_head", "generation_embeddings", "generation_aligner", "generation_head"]


@dataclass
class BuildConfig:
    """Everything that shapes the toy checkpoint (written into ``build_report.json``)."""

    seed: int = 0
    hidden_size: int = 128
    """language-model width."""
    num_layers: int = 4
    num_heads: int = 4
    codebook_size: int = 32
    """VQ codebook entries; the toy world uses 19 (empty + 18 colour-shape pairs), the rest stay unused."""
    vq_steps: int = 1000
    vq_batch: int = 16
    vq_lr: float = 2e-3
    lm_steps: int = 1500
    """supervised steps: few on purpose, so the model draws recognisable scenes but leaves headroom."""
    lm_batch: int = 32
    """image sequences per supervised step."""
    plan_batch: int = 16
    """plan sequences per supervised step."""
    lm_lr: float = 2e-3
    no_plan_rate: float = 0.3
    """share of image sequences conditioned on the prompt alone (so ``use_plan: false`` starts in-distribution)."""
    uncond_rate: float = 0.1
    """share of image sequences conditioned on the unconditional context (so CFG has a branch to subtract)."""
    eval_cfg_scale: float = 3.0
    """guidance of the accuracy report (the same as configs/toy.yaml)."""
    data_dir: str = str(DATA_DIR)


def toy_spec(cfg: BuildConfig, words: Sequence[str]) -> TinyJanusSpec:
    """The model's shape: 32 px images, a 4 x 4 token grid (one token per cell), 3 VQ upsamplings."""
    return TinyJanusSpec(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_SIZE // GRID,
        codebook_size=cfg.codebook_size,
        vq_channels=32,
        vq_upsamples=3,
        vq_res_blocks=0,
        extra_words=list(words),
        seed=cfg.seed,
    )


def vocabulary(splits: dict[str, list[PromptRecord]]) -> list[str]:
    """Every word of the toy prompts (all splits: a vocabulary is not training data), plans and instruction."""
    plan_words = [*NUMBER_WORDS.values(), *PLURALS.values(), *SHAPES, *COLORS, "and", "of", "on", "top"]
    texts = [r.prompt for records in splits.values() for r in records]
    return words_of([*texts, " ".join(plan_words), REASONING_TEMPLATE])


# ---------------------------------------------------------------------------------------------
# Stage 2: the VQ. Codes are tied to cell contents (the renderer knows them), which makes a usable
# tokenizer converge in minutes on a CPU; an unsupervised codebook collapsed colours in that time.
# ---------------------------------------------------------------------------------------------


def random_scene(rng: random.Random) -> list[Placed]:
    """0..8 objects of any colour and shape in random cells (the VQ sees every pair: it is the tokenizer)."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(0, MAX_OBJECTS + 2))
    return [Placed(*reversed(rng.choice(CELL_KINDS[1:])), r, c) for r, c in cells]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1], the VQ's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cell_codes(scenes: Sequence[Sequence[Placed]]) -> torch.Tensor:
    """``[B, GRID * GRID]`` code of each cell, raster order."""
    codes = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for p in scene:
            codes[i, p.row * GRID + p.col] = CELL_KINDS.index((p.color, p.shape))
    return codes


def _object_interiors(codes: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` 1 on the 6 x 6 interior of every occupied cell: where shapes differ from each other."""
    cell = IMAGE_SIZE // GRID
    interior = torch.zeros(cell, cell)
    interior[1:-1, 1:-1] = 1
    occupied = (codes > 0).float().view(-1, 1, GRID, GRID)
    return F.interpolate(occupied, scale_factor=cell) * interior.repeat(GRID, GRID)


def train_vq(vq: torch.nn.Module, cfg: BuildConfig, rng: random.Random, log) -> None:
    """Encoder: classify each cell's latent onto its code (cosine logits, as decoding normalises codes).
    Decoder: redraw the scene from the true codes, object interiors weighted 10x (a circle and a square
    differ only in their corners, which are background pixels). The encoder learns fast, so after the
    first third of the steps it trains on every fourth step only."""
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), cfg.vq_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vq_lr, total_steps=cfg.vq_steps, pct_start=0.1)
    for step in tqdm(range(cfg.vq_steps), desc="toy checkpoint 1/3: VQ", unit="step", dynamic_ncols=True):
        scenes = [random_scene(rng) for _ in range(cfg.vq_batch)]
        x = to_pixels(np.stack([render(s) for s in scenes]))  # [B, 3, H, W]
        codes = cell_codes(scenes)  # [B, N]
        book = F.normalize(vq.quantize.embedding.weight, dim=1)  # [K, D]
        ce = torch.zeros(())
        if step < cfg.vq_steps // 3 or step % 4 == 0:
            z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)  # [B, D, g, g]
            logits = torch.einsum("bdhw,kd->bhwk", z, book).reshape(-1, book.shape[0]) / 0.1  # [B*N, K]
            ce = F.cross_entropy(logits, codes.view(-1))
        q = book[codes].view(cfg.vq_batch, GRID, GRID, -1).permute(0, 3, 1, 2)  # [B, D, g, g]
        y = vq.decoder(vq.post_quant_conv(q))  # [B, 3, H, W]
        rec = (((y - x) ** 2 + (y - x).abs()) * (1 + 9 * _object_interiors(codes))).mean()
        opt.zero_grad(set_to_none=True)
        (rec + ce).backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vq_steps - 1:
            log(f"vq step {step}: reconstruction {rec.item():.4f} code ce {ce.item():.4f}")
    with torch.no_grad():
        # Decoding normalises codebook rows; storing them normalised makes Janus's own encode
        # (nearest by Euclidean distance) pick the cosine-nearest code, as trained.
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    vq.eval()


@torch.no_grad()
def vq_round_trip(model, rng: random.Random, n: int = 128) -> dict[str, float]:
    """Token accuracy of Janus's own VQ encode, and the share of decoded scenes the eye reads exactly."""
    from modules.rewards.toy_vision import parse_image

    scenes = [random_scene(rng) for _ in range(n)]
    tokens = model.model.vqmodel.encode(to_pixels(np.stack([render(s) for s in scenes]))).image_tokens.view(
        n, -1
    )
    images = janus_ops.decode_images(model, tokens).numpy()
    exact = 0
    for image, scene in zip(images, scenes, strict=True):
        seen = sorted((o.color, o.shape, o.recognised) for o in parse_image(image).objects)
        exact += seen == sorted((p.color, p.shape, True) for p in scene)
    return {"token_accuracy": float((tokens == cell_codes(scenes)).float().mean()), "scene_exact": exact / n}


# ---------------------------------------------------------------------------------------------
# Stage 3: supervised language model, through the policy's own text handling.
# ---------------------------------------------------------------------------------------------


def draw_examples(records: Sequence[PromptRecord], rng: random.Random):
    """For each record: a concrete scene (colours allowed in training), its plan and its rendering."""
    plans, images = [], []
    for record in records:
        spec = concrete(spec_from_record(record), rng, allowed_in_training)
        plans.append(spec.plan())
        images.append(render(sample_layout(spec, rng, ordered=True)))
    return plans, np.stack(images)


def plan_loss(policy: JanusPolicy, prompts: Sequence[str], plans: Sequence[str]) -> torch.Tensor:
    """Mean negative log-prob of plan tokens (EOS included) after the reasoning context, as RL samples them."""
    ctx_ids, ctx_mask = policy.encode(
        [policy.chat(REASONING_TEMPLATE.replace("{prompt}", p)) for p in prompts]
    )
    rows = [
        policy.tokenizer(plan, add_special_tokens=False).input_ids + [policy.tokenizer.eos_token_id]
        for plan in plans
    ]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), policy.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    logp = janus_ops.text_logprobs(policy.model, ctx_ids, ctx_mask, tokens, mask)  # [B, T]
    return -logp.sum() / mask.sum()


def image_loss(
    policy: JanusPolicy,
    prompts: Sequence[str],
    plans: Sequence[str],
    tokens: torch.Tensor,
    cfg: BuildConfig,
    rng,
) -> torch.Tensor:
    """Mean negative log-prob of image tokens ``[B, N]`` after ``policy.image_context``.

    Some rows drop the plan (prompt-only context) and some use the unconditional context, so the same
    checkpoint serves ``use_plan: false`` and classifier-free guidance.
    """
    draws = [rng.random() for _ in prompts]
    with_plan = [plan if d >= cfg.no_plan_rate else "" for plan, d in zip(plans, draws, strict=True)]
    context = policy.image_context(prompts, with_plan)
    uncond = torch.tensor([d >= 1 - cfg.uncond_rate for d in draws])[:, None]  # [B, 1]
    ids = torch.where(uncond, context.uncond_ids, context.cond_ids)
    logp = janus_ops.image_logprobs(policy.model, ids, context.cond_mask, tokens)  # [B, N]
    return -logp.mean()


def train_lm(
    policy: JanusPolicy, records: list[PromptRecord], cfg: BuildConfig, rng: random.Random, log
) -> None:
    """Supervised steps on fresh random renderings of training prompts (AdamW, warm-up then cosine)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, cfg.lm_lr, weight_decay=0.01)
    warmup = max(1, cfg.lm_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.lm_steps))))
    )
    policy.model.train()
    vq = policy.model.model.vqmodel
    for step in tqdm(
        range(cfg.lm_steps), desc="toy checkpoint 2/3: language model", unit="step", dynamic_ncols=True
    ):
        batch = rng.sample(records, cfg.lm_batch)
        prompts = [r.prompt for r in batch]
        plans, images = draw_examples(batch, rng)
        with torch.no_grad():
            tokens = vq.encode(to_pixels(images)).image_tokens.view(len(batch), -1)  # [B, N]
        loss_image = image_loss(policy, prompts, plans, tokens, cfg, rng)
        k = cfg.plan_batch
        loss_plan = plan_loss(policy, prompts[:k], plans[:k])
        opt.zero_grad(set_to_none=True)
        (loss_image + loss_plan).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.lm_steps - 1:
            log(f"lm step {step}: image nll {loss_image.item():.3f} plan nll {loss_plan.item():.3f}")
    policy.model.eval()


# ---------------------------------------------------------------------------------------------
# Stage 4: how good is it (the starting point of RL), and the build itself.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy_by_category(
    policy: JanusPolicy, records: list[PromptRecord], seed: int, batch: int = 60
) -> dict:
    """Share of prompts whose one sampled image (with a sampled plan) meets every constraint."""
    orm = ToyORMExpert()
    hits: dict[str, list[float]] = defaultdict(list)
    for start in tqdm(
        range(0, len(records), batch), desc="toy checkpoint 3/3: accuracy", unit="batch", leave=False
    ):
        chunk = records[start : start + batch]
        out = policy.generate([r.prompt for r in chunk], 1, REASONING_TEMPLATE, seed + start)
        for record, ok in zip(chunk, orm(out["images"], chunk).tolist(), strict=True):
            hits[record.task_type].append(ok)
            hits["all"].append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}


def build(out: str | Path, cfg: BuildConfig, log=print) -> dict:
    """Build, train and save the toy checkpoint into ``out``; returns the build report."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(out)
    splits = {s: load_prompts(Path(cfg.data_dir) / f"{s}.jsonl") for s in ("train", "val")}
    model, processor = build_tiny_janus(toy_spec(cfg, vocabulary(splits)))
    train_vq(model.model.vqmodel, cfg, rng, log)
    config = asdict(cfg)
    if Path(cfg.data_dir).resolve() == DATA_DIR.resolve():
        config["data_dir"] = "datamodules/toyworld/data"  # the shipped splits: no machine-specific path
    report: dict = {"config": config, "vq": vq_round_trip(model, random.Random(cfg.seed + 1))}
    log(f"vq round trip: {report['vq']}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # From here on the model is handled like any checkpoint: loaded by the policy, trained through it.
    policy = JanusPolicy(str(out), trainable=SFT_PARTS, sampling=SamplingConfig(cfg_scale=cfg.eval_cfg_scale))
    train_lm(policy, splits["train"], cfg, rng, log)
    report["val_accuracy"] = accuracy_by_category(policy, splits["val"], cfg.seed)
    log(f"validation accuracy: {report['val_accuracy']}")
    policy.model.save_pretrained(out)
    policy.processor.save_pretrained(out)
    report["parameters"] = sum(p.numel() for p in policy.model.parameters())
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the toy Janus checkpoint from scratch.")
    parser.add_argument("--out", default="checkpoints/toy", help="folder for the save_pretrained files")
    for name, value in asdict(BuildConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    report = build(out, BuildConfig(**args))
    print(json.dumps({k: report[k] for k in ("vq", "val_accuracy", "parameters", "build_seconds")}))


if __name__ == "__main__":
    main()
