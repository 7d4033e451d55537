"""One full BiCoT-GRPO step, phase by phase: the eager rollout loop against the static-cache engine.

Runs ``BiCoTGRPO`` through a Lightning ``Trainer`` (no logger) at a model shape with random weights, for
each rollout engine in turn, in the same process: rollout (plan + CFG image tokens + VQ decode), score
(the colour expert: a tiny, instant expert) and update (policy fwd+bwd, reference forward, Adam). Prints one
JSON line per optimizer step (``time/<phase>_s``, images/s, peak GPU memory per phase) and one summary
line per engine (with ``bicot.memory``'s per-phase estimate for the same recipe beside the measured peak
memory per phase), then the ratio of steady-state step times::

    nice python benchmarks/grpo_step.py --shape toy                     # CPU
    python benchmarks/grpo_step.py --shape 1b                           # GPU: the 1B recipe (4 prompts x G=8)
    python benchmarks/grpo_step.py --shape 1b --eager-steps 1 --steps 3

The 1B recipe is ``configs/janus_pro_1b_1gpu.yaml``'s: fp32 master weights with bf16-mixed compute, the
language model and its text head trainable (the default), a frozen fp32 reference, 4 prompts x 8 samples (64 rows with CFG), plans of up
to 128 tokens, cfg 5, minibatch 8. The language model and generation parts have the real shape
(``benchmarks/rollout.py``); the vision and VQ towers are tiny and the tokenizer is the tiny word-level one,
so plan-token sampling reads the real 102,400-row head but the plans are random words. The first step
of the static engine includes compiling and capturing; ``steady`` is the mean of the later steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import device_name, engine_options, janus_at_shape  # noqa: E402

import modules.policy as policy_module  # noqa: E402
from bicot.grpo import BiCoTGRPO  # noqa: E402
from bicot.loss import GRPOConfig  # noqa: E402
from bicot.memory import plan, recipe_from_module  # noqa: E402
from datamodules.prompts import PromptDataModule  # noqa: E402
from modules.engine import RolloutEngine  # noqa: E402
from modules.policy import JanusPolicy, SamplingConfig  # noqa: E402
from modules.rewards.color import ColorMatchExpert  # noqa: E402
from modules.rewards.ensemble import RewardEnsemble  # noqa: E402
from modules.tiny import TinyJanusSpec, build_tiny_janus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "score", "update")


class StepTimes(pl.Callback):
    """Collects each step's phase times and per-phase peak memory."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.steps: list[dict] = []
        self.plan_gib: dict[str, float] = {}
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        metrics = trainer.callback_metrics
        step = {"step": trainer.global_step, "step_s": round(time.perf_counter() - self._start, 3)}
        for phase in PHASES:
            step[f"{phase}_s"] = round(float(metrics.get(f"time/{phase}_s", float("nan"))), 3)
        step["peak_gib"] = {k: round(v / 2**30, 2) for k, v in pl_module.phase_peak_memory.items()}
        if not self.steps:  # the memory plan of this very recipe, to set beside the measured peaks
            self.plan_gib = {k: round(v, 2) for k, v in plan(recipe_from_module(pl_module)).phases().items()}
        self.steps.append(step)
        # printed as it comes: a run cut short by a time limit still leaves its finished steps
        print(json.dumps(dict(measure="step", engine=self.engine, **step)), flush=True)


def build_policy(shape: str, device: torch.device, sampling: SamplingConfig) -> JanusPolicy:
    """A JanusPolicy through its normal constructor, whose loader returns a random model of ``shape``."""
    if shape == "toy":
        return JanusPolicy(
            tiny=TinyJanusSpec(
                hidden_size=128, num_layers=4, num_heads=4, image_size=64, patch_size=8, codebook_size=256
            ),
            sampling=sampling,
        )
    _, processor = build_tiny_janus(TinyJanusSpec(hidden_size=32, num_layers=1, num_heads=2))
    original = policy_module.load_janus
    policy_module.load_janus = lambda *args, **kwargs: (
        janus_at_shape(shape, device, torch.float32),
        processor,
    )
    try:
        return JanusPolicy(model_name_or_path=f"random-{shape}", sampling=sampling)
    finally:
        policy_module.load_janus = original


def run_engine(args, engine: str, steps: int, device: torch.device) -> dict:
    pl.seed_everything(0, verbose=False)
    options = engine_options(args.compile)
    sampling = SamplingConfig(
        plan_max_tokens=args.plan_tokens, cfg_scale=5.0, engine=engine, engine_compile=options["compile"]
    )
    policy = build_policy(args.shape, device, sampling)
    if engine == "static":  # with the engine arguments that are not config keys (yet): attention, pack
        policy._engine = RolloutEngine(**options)
    module = BiCoTGRPO(
        policy=policy,
        rewards=RewardEnsemble([ColorMatchExpert()]),
        algo=GRPOConfig(num_generations=args.group, beta=0.01),
        lr=1e-6,
        minibatch_size=args.minibatch,
    )
    data = PromptDataModule(
        train_file=str(REPO / "datamodules/fixtures/t2i_r1_sample.jsonl"), batch_size=args.prompts
    )
    timer = StepTimes(engine)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    images = args.prompts * args.group
    later = timer.steps[1:] or timer.steps
    summary = dict(
        measure="summary",
        engine=engine,
        shape=args.shape,
        images_per_step=images,
        first_step_s=timer.steps[0]["step_s"],
        steady_step_s=round(statistics.fmean(s["step_s"] for s in later), 3),
        **{f"steady_{p}_s": round(statistics.fmean(s[f"{p}_s"] for s in later), 3) for p in PHASES},
        device=device_name(device),
    )
    if engine == "static":
        summary["engine_compile"] = policy._engine.mode(device)
        summary["engine_options"] = args.compile
        summary["engine_capture_s"] = round(policy._engine.stats.compile_s, 2)
        summary["engine_captures"] = policy._engine.stats.captures
    summary["steady_images_per_s"] = round(images / summary["steady_step_s"], 3)
    # bicot.memory's estimate against the measured per-phase peaks (torch.cuda.max_memory_allocated; GPU only)
    summary["memory_plan_gib"] = timer.plan_gib
    summary["measured_peak_gib"] = (
        {phase: max((s["peak_gib"].get(phase, 0.0) for s in timer.steps), default=0.0) for phase in PHASES}
        if device.type == "cuda"
        else None
    )
    print(json.dumps(summary), flush=True)
    del trainer, module, policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["toy", "1b", "7b"], default="toy")
    parser.add_argument("--engines", default="eager,static", help="comma-separated: eager, static")
    parser.add_argument("--compile", default="auto", help="the static engine's sampling.engine_compile, "
                        "optionally with engine options as benchmarks/rollout.py takes them (fused+pack)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the static engine")
    parser.add_argument("--eager-steps", type=int, default=2, help="optimizer steps of the eager loop")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--plan-tokens", type=int, default=None, help="default: 16 toy, 128 otherwise")
    args = parser.parse_args()
    try:
        engine_options(args.compile)
    except ValueError as error:
        parser.error(f"--compile: {error}")
    if args.shape != "toy" and not torch.cuda.is_available():
        parser.error(f"--shape {args.shape} needs a CUDA device")
    args.plan_tokens = args.plan_tokens or (16 if args.shape == "toy" else 128)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summaries = {}
    for engine in args.engines.split(","):
        summaries[engine] = run_engine(
            args, engine, args.eager_steps if engine == "eager" else args.steps, device
        )
    if "eager" in summaries and "static" in summaries:
        e, s = summaries["eager"], summaries["static"]
        print(
            json.dumps(
                dict(
                    measure="ratio",
                    shape=args.shape,
                    steady_step_speedup=round(e["steady_step_s"] / s["steady_step_s"], 2),
                    rollout_speedup=round(e["steady_rollout_s"] / s["steady_rollout_s"], 2),
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
