"""Projected wall time of the paper's run (Janus-Pro-7B, 1,600 steps, 8 GPUs) from measured per-phase times.

Reads the JSON lines that ``benchmarks/gpu_checks.sh`` logged on one GPU and writes a markdown table::

    python benchmarks/project_7b.py benchmarks/results/h200_2026-11-27      # -> .../projection_7b.md

What is measured and what is scaled (each row of the table says which):

* Image tokens: ``rollout.py --shape 7b --prompts 16`` samples 32 rows (16 prompts, CFG), exactly the rows one
  GPU samples in ``configs/t2i_r1_janus_pro_7b.yaml`` (16 prompts x G=8 / 8 GPUs = 16 rows, x2 for CFG), at
  the 7B shape: measured, per engine. The recipe's image context is longer (prompt + plan, ~190 tokens,
  against the benchmark's 64), so the KV reads are a little larger than measured.
* Plan tokens (16 rows, up to 128 tokens): not measured at 7B; taken as 128 steps at the image stage's
  per-step time (the same decoder layers; fewer rows, a larger head).
* Score (reference log-probs; the benchmark's colour expert is instant) and update (policy forward and
  backward, AdamW): measured on the 1B recipe (``grpo_step.py --shape 1b``: 32 images per step on one
  GPU), scaled by the decoder's linear parameters (7B / 1B), by the rows per GPU (16 / 32) and, for the
  update, by 4/3 for the 7B recipe's activation checkpointing (one more forward).
* Not counted: the four experts' scoring time (not measured: the GPU machine has no checkpoints), FSDP2's
  all-gathers and reduce-scatters across the 8 GPUs, VQ decoding at 7B (the VQ model is the same size as at
  1B: inside the 1B rollout figure, small), and data loading and logging.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bicot.memory import load_shape

STEPS, GPUS, ROWS_PER_GPU, PLAN_TOKENS = 1600, 8, 16, 128


def engine_label(measure: str) -> str | None:
    """The table's name of a ``rollout.py`` measurement: ``eager``, ``static (MODE)`` per engine mode, else None."""
    if measure == "eager":
        return "eager"
    if measure.startswith("static[") and measure.endswith("]"):
        return f"static ({measure[len('static['):-1]})"
    return None


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def project(folder: Path) -> str:
    # one row per engine the log measured: the eager loop, then each static engine mode
    rollout = {r["measure"]: r for r in json_lines(folder / "rollout7b.log") if engine_label(r["measure"])}
    step = {r["engine"]: r for r in json_lines(folder / "step1b.log") if r["measure"] == "summary"}
    small, big = load_shape("janus-pro-1b"), load_shape("janus-pro-7b")
    params = (big.layers * big.layer_linear_params) / (small.layers * small.layer_linear_params)
    rows = ROWS_PER_GPU / step["static"]["images_per_step"]
    header = [
        f"Projected time of the paper's run: Janus-Pro-7B, {STEPS} steps, {GPUS} GPUs, "
        f"{ROWS_PER_GPU} rollout rows per GPU (see `benchmarks/project_7b.py` for what is scaled).",
        f"Inputs: `{folder}/rollout7b.log` (device {next(iter(rollout.values()))['device']}) and "
        f"`{folder}/step1b.log`; decoder linear parameters 7B / 1B = {params:.2f}, rows 16 / "
        f"{step['static']['images_per_step']}, checkpointing x 4/3.",
        "",
        "| engine | plan tokens (s) | image tokens (s) | score (s) | update (s) | step (s) | 1,600 steps (h) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows_out = []
    for measure in sorted(rollout, key=lambda m: m != "eager"):
        engine = engine_label(measure)
        ms = rollout[measure]["ms_per_step"]
        image_s = ms * rollout[measure]["image_tokens"] / 1e3
        plan_s = ms * PLAN_TOKENS / 1e3
        # the engine changes the rollout only: both rows take the static run's steady score and update
        score_s = step["static"]["steady_score_s"] * params * rows
        update_s = step["static"]["steady_update_s"] * params * rows * 4 / 3
        total = plan_s + image_s + score_s + update_s
        rows_out.append(
            f"| {engine} | {plan_s:.1f} (scaled) | {image_s:.1f} (measured, {ms:.2f} ms/token) | "
            f"{score_s:.1f} (scaled) | {update_s:.1f} (scaled) | {total:.1f} | {total * STEPS / 3600:.1f} |"
        )
    notes = [
        "",
        "Not included: the experts' scoring (HPS, GroundingDINO, GIT, the 7B ORM), FSDP2 communication, data "
        "loading and logging. The paper reports 18 h on 8 GPUs for the whole run, experts included.",
        f"Score and update come from the static run's steps after the first (1B: score "
        f"{step['static']['steady_score_s']} s, update {step['static']['steady_update_s']} s, a mean of few steps; "
        f"the eager run's only step took {step['eager']['steady_score_s']} s and {step['eager']['steady_update_s']} s): "
        "the engine changes the rollout, not these phases.",
    ]
    return "\n".join(header + rows_out + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a gpu_checks.sh output folder with rollout7b.log and step1b.log")
    parser.add_argument("--out", type=Path, default=None, help="default: FOLDER/projection_7b.md")
    args = parser.parse_args()
    for name in ("rollout7b.log", "step1b.log"):
        if not (args.folder / name).is_file():
            parser.error(f"{args.folder / name} is missing: run bash benchmarks/gpu_checks.sh FOLDER rollout7b step1b")
    text = project(args.folder)
    out = args.out or args.folder / "projection_7b.md"
    out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
