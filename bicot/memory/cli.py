"""Printing a memory plan and the command line ``python -m bicot.memory -c CONFIG [...]``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from argparse import ArgumentError
from collections.abc import Callable
from typing import Any, NoReturn

from bicot.memory.plan import MemoryPlan, engine_holds_buffers, plan_for, rows, update_tokens
from bicot.memory.recipe import Lengths
from bicot.memory.shapes import PRESETS

_ALL = ("rollout", "score", "update")


def _table_rows(p: MemoryPlan) -> list[tuple[str, float, tuple[str, ...]]]:
    r = p.recipe
    shard = f"1/{r.world_size} shard" if r.sharded and r.world_size > 1 else "not sharded"
    reference = {"none": "none: beta = 0", "adapters": "none: LoRA, adapters off"}.get(
        r.reference,
        f"{r.reference_dtype}, {shard if r.reference_placement == 'device' else r.reference_placement}",
    )
    rollout_rows, m, m_image = rows(r)
    device = [e.name.removesuffix("Expert") for e in r.experts if e.placement == "device"]
    offload = [e.name.removesuffix("Expert") for e in r.experts if e.placement == "offload"]
    ckpt = "with" if r.activation_checkpointing else "without"
    return [
        (f"policy weights ({r.policy_dtype}, {shard})", p.policy_weights_gib, _ALL),
        (f"AdamW state ({r.trainable_params / 1e9:.2f} B trainable)", p.optimizer_gib, _ALL),
        (f"reference ({reference})", p.reference_gib, _ALL),
        (f"experts on the GPU ({', '.join(device) or 'none'})", p.experts_resident_gib, _ALL),
        ("CUDA context, NCCL (allowance)", p.runtime_gib, _ALL),
        ("full policy copy gathered for sampling", p.rollout_gather_gib, ("rollout",)),
        (
            f"static engine buffers ({'held' if engine_holds_buffers(r) else 'freed before VQ decode'})",
            p.engine_buffers_gib,
            _ALL if engine_holds_buffers(r) else ("rollout",),
        ),
        (f"KV cache ({rollout_rows} rows{', x2 for CFG' if r.cfg else ''})", 0.0 if r.engine == "static" else p.kv_cache_gib,
         ("rollout",)),
        ("VQ decode (after the KV cache; larger counts)", p.vq_decode_gib, ("rollout",)),
        ("reference gathered for its log-probs", p.score_gather_gib, ("score",)),
        (f"experts moved in to score ({', '.join(offload) or 'none'})", p.experts_offloaded_gib, ("score",)),
        ("reference logits (one minibatch)", p.reference_logits_gib, ("score",)),
        ("gradients", p.gradients_gib, ("update",)),
        ("FSDP2 gathered root + layers (update)", p.update_gather_gib, ("update",)),
        (f"activations ({m} rows, {ckpt} checkpointing)", p.activations_gib, ("update",)),
        ("bf16 weight copies held by autocast", p.weight_casts_gib, ("update",)),
        (f"logits ({m} plan rows, {m_image} image rows)", p.logits_gib, ("update",)),
    ]


def format_plan(p: MemoryPlan, device_gib: float | None = None) -> str:
    """The plan as a table (GiB per GPU, per phase), with a WARNING line when it exceeds ``device_gib``."""
    r, width = p.recipe, 50
    text, image = update_tokens(r)
    lines = [
        f"bicot memory plan: {r.shape.name} ({r.shape.total_params / 1e9:.2f} B parameters), {r.world_size} "
        f"GPU(s), {'FSDP2' if r.sharded else 'no sharding'}, precision {r.precision}",
        f"step: {r.prompts} prompts x {r.group_size} samples; per GPU {rows(r)[0]} rollout rows, minibatch "
        f"{rows(r)[1]}; tokens: prompt {r.lengths.prompt_tokens}, template {r.lengths.template_tokens}, plan "
        f"<= {r.plan_tokens}, image {r.shape.image_tokens}; update forwards {text} (plan) + {image} (image) tokens a row",
        "",
        f"{'GiB per GPU':<{width}}" + "".join(f"{phase:>9}" for phase in _ALL),
    ]
    for label, value, phases in _table_rows(p):
        if value > 0 or label.startswith("reference ("):
            lines.append(
                f"{label:<{width}}" + "".join(f"{value:9.2f}" if ph in phases else f"{'':9}" for ph in _ALL)
            )
    lines.append(f"{'phase total':<{width}}" + "".join(f"{v:9.2f}" for v in p.phases().values()))
    phase = max(p.phases(), key=p.phases().get)
    lines += [
        "",
        f"peak per GPU: {p.total_gib:.1f} GiB ({phase} phase)"
        + (f" of {device_gib:.1f} GiB" if device_gib else ""),
        f"update activations: {p.activations_without_checkpointing_gib:.1f} GiB without activation checkpointing, "
        f"{p.activations_with_checkpointing_gib:.1f} GiB with (this recipe: "
        f"{'with' if r.activation_checkpointing else 'without'})",
        "not counted: allocator fragmentation, the experts' working memory, Python-side rollout tensors",
    ]
    lines += [
        f"expert {e.name}: ~{e.params / 1e9:.2f} B parameters ({e.source})" for e in r.experts if e.source
    ]
    if device_gib is not None and p.total_gib > device_gib:
        lines.append(
            f"WARNING: {p.total_gib:.1f} GiB per GPU exceeds the {device_gib:.1f} GiB GPU: this run will not fit"
        )
    return "\n".join(line.rstrip() for line in lines)


def parse_config(args: list[str]) -> Any:
    """Parse ``-c CONFIG ...`` exactly as ``bicot fit`` does, without instantiating anything."""
    import logging

    from bicot.cli import BiCoTCLI

    class ParseOnly(BiCoTCLI):
        def before_instantiate_classes(self) -> None:  # resolving --ckpt_path reads a checkpoint: not here
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level, seed_log.level = seed_log.level, logging.WARNING  # LightningCLI seeds while parsing: keep it quiet
    argv, sys.argv = sys.argv, sys.argv[:1]  # our own options are not LightningCLI's (it warns on both)
    try:
        return ParseOnly(args=args, run=False).config
    finally:
        seed_log.setLevel(level)
        sys.argv = argv


def _at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` no less than ``low`` (``float``: finite and above ``low``)."""

    def number(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if kind is float and not (math.isfinite(value) and value > low):
            raise argparse.ArgumentTypeError(f"must be a number above {low:g}, got {text}")
        if kind is int and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return number


def main(argv: list[str] | None = None) -> int:
    """``python -m bicot.memory -c CONFIG [-c MORE] [--world-size N] [--gpu-gib 80] [--dotted.overrides]``."""
    from bicot import memory  # the package's docstring describes the command

    parser = argparse.ArgumentParser(
        prog="python -m bicot.memory", description=memory.__doc__.splitlines()[0]
    )
    parser.add_argument("-c", "--config", action="append", required=True, help="a bicot config (repeatable)")
    parser.add_argument(
        "--world-size", type=_at_least(1), help="GPUs in all (default: trainer.devices x num_nodes)"
    )
    parser.add_argument("--gpu-gib", type=_at_least(0, float), default=80.0, help="memory of one GPU in GiB")
    parser.add_argument(
        "--shape", help=f"replace the config's model: {' or '.join(PRESETS)} or a checkpoint folder"
    )
    parser.add_argument("--prompt-tokens", type=_at_least(1), default=Lengths.prompt_tokens)
    parser.add_argument(
        "--template-tokens", type=_at_least(0), help="the plan context beyond the prompt (default: 96 for the "
        "reasoning instruction and the plan's system prompt by its length, ~36 for the checkpoint's default)"
    )
    parser.add_argument("--activation-checkpointing", choices=("on", "off"), help="override the config")
    parser.add_argument("--json", action="store_true", help="print the plan's numbers as JSON")
    args, overrides = parser.parse_known_args(argv)

    def fail(message: str) -> NoReturn:  # one line, no usage: the flags parsed, the value is wrong
        parser.exit(2, f"{parser.prog}: error: {' '.join(message.split())}\n")

    try:
        config = parse_config([a for path in args.config for a in ("-c", path)] + overrides)
    except (ArgumentError, ValueError) as err:  # a config bicot fit would refuse: its one line
        from bicot.cli import user_message

        fail(user_message(err))
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
    try:
        memory_plan = plan_for(
            config,
            args.world_size,
            shape=args.shape,
            activation_checkpointing=checkpointing,
            lengths=Lengths(args.prompt_tokens, args.template_tokens),
        )
    except ValueError as err:  # the plan's own messages name what to change; anything else is a bug
        if not str(err).startswith("memory plan: "):
            raise
        fail(str(err).removeprefix("memory plan: "))
    if args.json:
        numbers = {k: round(v, 3) for k, v in vars(memory_plan).items() if isinstance(v, float)}
        print(json.dumps(numbers | {"world_size": memory_plan.recipe.world_size, "gpu_gib": args.gpu_gib}))
    else:
        print(format_plan(memory_plan, args.gpu_gib))
    return 0
