"""Per-GPU memory plan of a bicot recipe: weights, optimizer, reference, rollout caches, update activations, experts.

``python -m bicot.memory -c CONFIG [-c MORE] [--world-size N] [--gpu-gib 80]`` prints the plan of a config
(parsed like ``bicot fit``, nothing instantiated); :func:`plan_for` is the API and :func:`warn_if_too_big`
the run-start check. The plan is per phase of a step, because the big items are not alive together:

- rollout: the FSDP2 shards are gathered into one full copy (``bicot.parallel.gathered``), the KV cache
  grows to prompt + plan + image tokens (image rows doubled by CFG), then the VQ decoder runs;
- score: experts run (``offload`` ones are moved in), the reference is gathered for its log-probs;
- update: per minibatch, the plan and image forwards keep their activations until one backward.

Everything is an estimate from shapes: allocator fragmentation and expert working memory are not in it.
docs/memory_plan.md shows the plans of the recipes and how the estimate compares with measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

GIB = 2**30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``float32``, ``torch.bfloat16``, ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"memory plan: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]

# Language-model shapes of the two Janus-Pro checkpoints (LLaMA decoders). Checked against deepseek's
# configs: Janus-Pro-1B as converted to transformers' layout (hf-internal-testing/tiny-processor-janus
# carries its full text_config), Janus-Pro-7B from deepseek-ai/Janus-Pro-7B's config.json, where only
# layers and vocab are explicit and hidden 4096 / MLP 11008 / 32 heads are LLaMA's defaults (the same
# values fine-tunes of it spell out). Both have head dim 128, no GQA, 576 image tokens of a 16,384 codebook.
# The LM head is untied: the bf16 files weigh 14.8 GB (7B) and about 4.1 GB (1B), i.e. 7.4 B and 2.1 B
# parameters, which the untied count reproduces. Vision, aligner and VQ towers keep transformers' defaults.
PRESETS: dict[str, dict[str, int]] = {
    "janus-pro-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, head_dim=128, vocab_size=102400),
    "janus-pro-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                         num_key_value_heads=32, head_dim=128, vocab_size=102400),
}
PRESET_ALIASES = {f"{org}/Janus-Pro-{size}".lower(): f"janus-pro-{size.lower()}"
                  for org in ("deepseek-community", "deepseek-ai") for size in ("1B", "7B")}

# Reward experts by class name: (parameters, where the figure comes from). Approximate; weights are never read.
EXPERT_PARAMS: dict[str, tuple[float, str]] = {
    "HPSExpert": (986e6, "ViT-H-14: modules.rewards.hps.OpenClipArch as a CLIPModel counts 986.1 M"),
    "GroundingDinoExpert": (172e6, "Swin-T + BERT-base: transformers' default GroundingDinoConfig counts 172.3 M, "
                            "the paper's 172 M"),
    "GitVQAExpert": (394e6, "GIT-large: microsoft/git-large-vqav2 holds 1.58 GB of float32 weights"),
    "ORMExpert": (8.0e9, "LLaVA-OneVision-7B: Qwen2-7B (7.6 B) + SigLIP so400m (0.4 B) + projector"),
    "CLIPScoreExpert": (428e6, "CLIP ViT-L/14 (openai/clip-vit-large-patch14)"),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VQ_LIVE_MAPS = 4  # full-resolution feature maps alive at once while decoding (CPU profile: 2.6 bf16, 4.1 fp32)
RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspaces and NCCL buffers: an allowance, not measured here


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a Janus model, counted from a model built on the meta device (no weights)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    text_vocab: int
    image_vocab: int
    image_tokens: int
    image_side: int
    """decoded image side in pixels."""
    vq_channels: int
    """channels of the VQ decoder at full resolution."""
    total_params: int
    layer_params: int
    layer_linear_params: int
    head_params: dict[str, int]
    """linear weights of ``lm_head`` (``text``) and of ``generation_head`` (``image``)."""
    part_params: dict[str, int]


def shape_from_model(model: torch.nn.Module, name: str) -> ModelShape:
    """Count a ``JanusForConditionalGeneration`` (on any device, meta included)."""
    cfg = model.config
    text, vq = cfg.text_config, cfg.vq_config
    layer = model.model.language_model.layers[0]

    def linear_numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())

    parts = {n: sum(p.numel() for p in getattr(model.model, n).parameters()) for n in
             ("language_model", "vision_model", "aligner", "generation_embeddings", "generation_aligner",
              "generation_head", "vqmodel")}
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    parts["lm_head"] = 0 if tied else model.lm_head.weight.numel()  # a tied head is counted once, in the LM
    return ModelShape(
        name=name, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        intermediate=text.intermediate_size, text_vocab=text.vocab_size, image_vocab=vq.num_embeddings,
        image_tokens=cfg.vision_config.num_image_tokens,
        image_side=vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1),
        vq_channels=vq.base_channels * vq.channel_multiplier[0],
        total_params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()), layer_linear_params=linear_numel(layer),
        head_params={"text": linear_numel(model.lm_head), "image": linear_numel(model.model.generation_head)},
        part_params=parts,
    )


def load_shape(source: str | None = None, tiny: Any = None) -> ModelShape:
    """The shape of a preset name (``janus-pro-1b``/``-7b`` or their hub ids), a local checkpoint folder
    (its config.json only), a hub id in the local Hugging Face cache, or a tiny spec (``model.policy.tiny``)."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    from modules.tiny import TinyJanusSpec, build_tiny_janus

    if tiny is not None:
        spec = tiny if isinstance(tiny, TinyJanusSpec) else TinyJanusSpec(**dict(tiny))
        with torch.device("meta"):
            return shape_from_model(build_tiny_janus(spec)[0], f"tiny (hidden {spec.hidden_size})")
    key = PRESET_ALIASES.get(str(source).lower(), str(source).lower())
    if key in PRESETS:
        text = dict(model_type="llama", max_position_embeddings=16384, **PRESETS[key])
        h = text["hidden_size"]
        config = JanusConfig(text_config=text, vision_config=dict(projection_dim=h), tie_word_embeddings=False,
                             vq_config=dict(projection_dim=h, image_token_embed_dim=h))
    else:
        try:  # a folder's config.json, or a cached hub id: never weights, never the network
            config = JanusConfig.from_pretrained(Path(source).expanduser() if Path(source).expanduser().is_dir()
                                                 else source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"memory plan: cannot read a Janus config from {source!r} ({err}); give a "
                             f"checkpoint folder or a preset with --shape {sorted(PRESETS)}") from err
        key = str(source)
    with torch.device("meta"):
        return shape_from_model(JanusForConditionalGeneration(config), key)


@dataclass
class Lengths:
    """Token counts the config does not fix (sequences are padded to the longest row of a batch)."""

    prompt_tokens: int = 64
    """chat-formatted prompt before the plan, begin-of-image token included."""
    template_tokens: int = 96
    """the reasoning instruction around the prompt in the plan context (the default one is ~70 words)."""


@dataclass
class ExpertSpec:
    """One reward expert: its size, weight dtype and placement (``device``, ``cpu`` or ``offload``)."""

    name: str
    params: float
    dtype: str
    placement: str
    source: str = ""


@dataclass
class Recipe:
    """Everything the plan is computed from, normalised from a config or from a live module."""

    shape: ModelShape
    world_size: int
    sharded: bool
    """FSDP2: weights, gradients and optimizer state are split over ``world_size``."""
    precision: str
    policy_dtype: str
    trainable_params: int
    prompts: int
    """prompts per optimizer step, all processes together (``data.batch_size``)."""
    group_size: int
    minibatch_size: int | None
    beta: float
    train_plan: bool
    train_image: bool
    use_plan: bool
    plan_tokens: int
    cfg: bool
    guided: bool
    lora_rank: int = 0
    lora_params: int = 0
    reference: str = "copy"
    """``copy`` (a second model), ``adapters`` (LoRA: the policy with adapters off) or ``none``."""
    reference_dtype: str = "float32"
    reference_placement: str = "device"
    activation_checkpointing: bool = False
    param_dtype: str | None = None
    """FSDP2 mixed precision (``model.parallel.param_dtype``): gathered copies and compute in this dtype."""
    experts: list[ExpertSpec] = field(default_factory=list)
    lengths: Lengths = field(default_factory=Lengths)


# ---- reading a config ------------------------------------------------------------------------------
def _get(node: Any, *path: str, default: Any = None) -> Any:
    """Walk dicts by key; a ``class_path``/``init_args`` level is stepped through transparently."""
    for key in path:
        if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or node.get(key) is None:
            return default
        node = node[key]
    return node


def _plain(config: Any) -> dict:
    """A jsonargparse Namespace (a subcommand's, or the top level) or a dict, as a nested dict."""
    config = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    return config[config["subcommand"]] if config.get("subcommand") else config


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Adapter parameters: ``rank * (in + out)`` for each targeted projection of each decoder layer."""
    q, kv, h, i = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.hidden, shape.intermediate
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    chosen = [name for name in sizes if any(str(t).endswith(name) for t in targets)]  # peft matches suffixes
    return shape.layers * sum(rank * sum(sizes[name]) for name in chosen)


def _lora(spec: Any) -> tuple[int, tuple[str, ...]]:
    """``(rank, targets)`` of a LoRA spec: a rank, or a mapping with ``r``/``rank`` and optional targets."""
    if not spec or (isinstance(spec, dict) and spec.get("enabled") is False):
        return 0, LORA_TARGETS
    if isinstance(spec, int):
        return spec, LORA_TARGETS
    rank = spec.get("r") or spec.get("rank") or 0
    targets = spec.get("target_modules") or spec.get("targets") or LORA_TARGETS
    if isinstance(targets, str):  # peft's "all-linear", or one module name
        targets = LORA_TARGETS if targets.startswith("all") else (targets,)
    return int(rank), tuple(targets)


def _experts(config: dict) -> list[ExpertSpec]:
    out = []
    for expert in _get(config, "model", "rewards", "experts", default=[]):
        name = str(expert.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(expert, dict) else str(expert)
        params, source = EXPERT_PARAMS.get(name, (0.0, "not a known expert: counted as 0 (programmatic?)"))
        out.append(ExpertSpec(name, params, _get(expert, "dtype", default="float32"),
                              _get(expert, "placement", default="device"), source))
    return out


def _world_size(trainer: dict) -> int:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes") or 1
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return int(devices) * nodes if str(devices).lstrip("-").isdigit() and int(devices) > 0 else nodes


def recipe_from_config(config: Any, world_size: int | None = None, shape: str | None = None,
                       lengths: Lengths | None = None, activation_checkpointing: bool | None = None) -> Recipe:
    """Normalise a parsed config (``bicot fit`` namespace or the YAML as a dict) into a :class:`Recipe`.

    Args:
        world_size: processes (GPUs); ``None`` takes ``trainer.devices x trainer.num_nodes``.
        shape: a preset or checkpoint that replaces ``model.policy.model_name_or_path`` / ``tiny``.
        activation_checkpointing: overrides ``model.activation_checkpointing`` when not ``None``.
    """
    c = _plain(config)
    policy, trainer, algo = _get(c, "model", "policy", default={}), c.get("trainer") or {}, _get(c, "model", "algo", default={})
    model = load_shape(shape) if shape else load_shape(_get(policy, "model_name_or_path"), _get(policy, "tiny"))
    sampling = _get(policy, "sampling", default={})
    strategy = trainer.get("strategy")
    strategy = str(_get(strategy, "class_path", default=strategy) or "")
    rank, targets = _lora(_get(policy, "lora"))
    levels = _get(algo, "levels", default="both")
    reference = _get(c, "model", "reference")
    recipe = Recipe(
        shape=model, world_size=world_size or _world_size(trainer),
        sharded=any(s in strategy for s in ("FSDP2Strategy", "ModelParallelStrategy", "fsdp")),
        precision=str(trainer.get("precision") or "32-true"), policy_dtype=_get(policy, "dtype", default="float32"),
        trainable_params=_trainable(model, _get(policy, "trainable", default=["language_model"])),
        prompts=int(_get(c, "data", "batch_size", default=1)), group_size=int(_get(algo, "num_generations", default=8)),
        minibatch_size=_get(c, "model", "minibatch_size"), beta=float(_get(algo, "beta", default=0.04)),
        train_plan=levels in ("both", "semantic"), train_image=levels in ("both", "token"),
        use_plan=bool(_get(policy, "use_plan", default=True)), plan_tokens=int(_get(sampling, "plan_max_tokens", default=64)),
        cfg=float(_get(sampling, "cfg_scale", default=5.0)) != 1.0,
        guided=_get(sampling, "image_logprob", default="conditional") == "guided",
        activation_checkpointing=bool(_get(c, "model", "parallel", "activation_checkpointing", default=False)
                                      if activation_checkpointing is None else activation_checkpointing),
        param_dtype=_get(c, "model", "parallel", "param_dtype"),
        experts=_experts(c), lengths=lengths or Lengths(),
    )
    if rank:  # only the adapters train, and the policy with adapters off is the reference
        recipe.lora_rank = rank
        recipe.lora_params = recipe.trainable_params = lora_params(model, rank, targets)
    recipe.reference = "none" if recipe.beta == 0 else "adapters" if rank else "copy"
    if _get(reference, "model_name_or_path"):  # otherwise a copy of the policy, in the policy's dtype
        recipe.reference_dtype = _get(reference, "dtype", default="float32")
    else:
        recipe.reference_dtype = recipe.policy_dtype
    # model.parallel.reference: "shard" (on the GPUs like the policy) or "cpu" (FSDP2 CPU offload)
    recipe.reference_placement = "cpu" if _get(c, "model", "parallel", "reference") == "cpu" else "device"
    return recipe


def _trainable(shape: ModelShape, parts: list[str]) -> int:
    parts = list(shape.part_params) if list(parts) == ["all"] else parts
    return sum(shape.part_params[p] for p in parts)


def recipe_from_module(module: Any, world_size: int | None = None, prompts: int | None = None,
                       lengths: Lengths | None = None) -> Recipe:
    """A :class:`Recipe` from a live ``BiCoTGRPO`` (for its ``setup``): parameters are counted as built.

    Args:
        world_size: processes; ``None`` asks ``module.trainer``.
        prompts: prompts per step, all processes; ``None`` asks ``trainer.datamodule.batch_size``.
    """
    policy, trainer, algo = module.policy, module.trainer, module.algo
    model = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    reference = module.reference.model if module.reference is not None else None
    recipe = Recipe(
        shape=shape_from_model(model, str(policy.source or "tiny")),
        world_size=world_size or trainer.world_size,
        sharded=type(trainer.strategy).__name__ in ("FSDP2Strategy", "ModelParallelStrategy"),
        precision=str(trainer.precision), policy_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        prompts=prompts or getattr(trainer.datamodule, "batch_size", 1), group_size=algo.num_generations,
        minibatch_size=module.minibatch_size, beta=algo.beta, train_plan=algo.train_plan,
        train_image=algo.train_image, use_plan=policy.use_plan, plan_tokens=policy.sampling.plan_max_tokens,
        cfg=policy.sampling.cfg_scale != 1.0, guided=policy.sampling.image_logprob == "guided",
        lora_params=lora, activation_checkpointing=module.parallel.activation_checkpointing,
        param_dtype=module.parallel.param_dtype,
        lengths=lengths or Lengths(),
    )
    recipe.lora_rank = 1 if lora else 0  # rank only refines the activation estimate; presence is what counts
    recipe.reference = "copy" if reference is not None else "adapters" if lora and algo.beta > 0 else "none"
    if reference is not None:
        recipe.reference_dtype = str(next(reference.parameters()).dtype).removeprefix("torch.")
        recipe.reference_placement = "cpu" if module.parallel.reference == "cpu" else "device"
    for expert in module.rewards.experts.values():
        params = list(expert.parameters())
        dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
        recipe.experts.append(ExpertSpec(expert.name, sum(p.numel() for p in params), dtype, expert.placement))
    return recipe


# ---- the components, in bytes ----------------------------------------------------------------------
@dataclass(frozen=True)
class Numerics:
    """Bytes per element of what a precision setting keeps."""

    weight: int
    """a policy weight as held (``-true`` half precision converts the module)."""
    compute: int
    """matmul outputs (autocast's dtype under ``-mixed``)."""
    residual: int
    """the residual stream, RoPE'd keys (so the K cache) and VQ feature maps; fp32 under autocast with fp32
    weights, because embeddings and RMSNorm stay fp32 and RoPE promotes keys to the residual's dtype."""
    casts: bool
    """autocast re-casts fp32 weights for every op; Lightning disables autocast's cache, so each linear's
    bf16 weight copy (and its bf16 input) is held by autograd until the backward."""
    adapter: int
    """a LoRA weight (peft keeps adapters in fp32 unless the whole module is converted)."""


def numerics(precision: str, dtype: str) -> Numerics:
    """The :class:`Numerics` of a ``trainer.precision`` and the policy's weight ``dtype``."""
    p = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}.get(precision, precision)
    w = dtype_bytes(dtype)
    if p in ("16-true", "bf16-true"):
        return Numerics(2, 2, 2, False, 2)
    if p.endswith("-mixed"):
        return Numerics(w, 2, w, w > 2, 4)
    return Numerics(w, w, w, False, max(w, 4))


def rows(r: Recipe) -> tuple[int, int, int]:
    """``(rollout rows per GPU, minibatch rows, image rows per minibatch in the update)``."""
    rollout = math.ceil(r.prompts * r.group_size / r.world_size)
    minibatch = min(r.minibatch_size or rollout, rollout)
    return rollout, minibatch, minibatch * (2 if r.guided and r.cfg else 1)


def update_tokens(r: Recipe) -> tuple[int, int]:
    """Tokens per row of the update's plan forward and image forward (0 when that level is not trained)."""
    plan = r.plan_tokens if r.use_plan else 0
    text = r.lengths.template_tokens + r.lengths.prompt_tokens + plan if r.train_plan and r.use_plan else 0
    image = r.lengths.prompt_tokens + plan + r.shape.image_tokens if r.train_image else 0
    return text, image


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, k_bytes: int, v_bytes: int) -> int:
    """``layers x rows x tokens x kv_heads x head_dim x (K bytes + V bytes)``."""
    return shape.layers * rows * tokens * shape.kv_heads * shape.head_dim * (k_bytes + v_bytes)


def layer_activation_bytes(shape: ModelShape, num: Numerics, lora_rank: int = 0) -> int:
    """Bytes one LLaMA decoder layer keeps for its backward, per token (SDPA/flash attention, no dropout).

    Two RMSNorms keep their fp32 input and normalised output (``4h + r*h`` each); the projections keep
    their inputs (under autocast one bf16 cast per projection: ``5*c*h``; else the norm output, once per
    block); attention keeps q, k, v and its output, ``o_proj`` its input; the SwiGLU MLP keeps gate, its
    activation, up and their product (``4*c*i``). With LoRA each adapter keeps its (cast) input and rank.
    Under bf16-mixed with fp32 weights this is 36h + 8i bytes (~58 x hidden for the Janus-Pro shapes).
    """
    h, i, c, r = shape.hidden, shape.intermediate, num.compute, num.residual
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + r * h)
    inputs = 5 * c * h if num.casts else 2 * r * h
    attention = c * (2 * q + 2 * kv) + c * q
    lora = ((c * (5 * h + q + i) if num.casts else 0) + 7 * c * lora_rank) if lora_rank else 0
    return norms + inputs + attention + 4 * c * i + lora


def activation_bytes(r: Recipe, num: Numerics, checkpointing: bool) -> int:
    """Activations of one update minibatch: the plan and the image forward, both kept until one backward.

    With per-layer activation checkpointing only each layer's input (the residual, ``r*h`` per token) is
    kept, plus one layer's activations while it is recomputed.
    """
    _, m, m_image = rows(r)
    text, image = update_tokens(r)
    tokens = (m * text, m_image * image)
    shape, per_layer = r.shape, layer_activation_bytes(r.shape, num, r.lora_rank)
    final = sum(tokens) * (4 * shape.hidden + (num.residual + num.compute) * shape.hidden)  # final norm, head input
    if not checkpointing:
        return shape.layers * per_layer * sum(tokens) + final
    return shape.layers * num.residual * shape.hidden * sum(tokens) + per_layer * max(tokens) + final


def weight_cast_bytes(r: Recipe, num: Numerics, checkpointing: bool) -> int:
    """bf16 weight copies held for the backward under autocast with fp32 weights (see :class:`Numerics`).

    Each forward of a minibatch (plan, image) casts every decoder linear it runs; the frozen heads are cast
    too (their input needs a gradient). Checkpointed layers drop theirs and recompute one at a time.
    """
    if not num.casts:
        return 0
    text, image = update_tokens(r)
    forwards = [kind for kind, tokens in (("text", text), ("image", image)) if tokens]
    layers = r.shape.layer_linear_params * (1 if checkpointing else r.shape.layers * len(forwards))
    return 2 * (layers + sum(r.shape.head_params[kind] for kind in forwards))


def logit_elements(r: Recipe) -> tuple[int, int]:
    """Logit elements of one minibatch: plan tokens x text vocab, image tokens x image vocab."""
    _, m, m_image = rows(r)
    text, image = update_tokens(r)
    plan = m * r.plan_tokens * r.shape.text_vocab if text else 0
    return plan, (m_image * r.shape.image_tokens * r.shape.image_vocab if image else 0)


def vq_decode_bytes(r: Recipe, num: Numerics) -> int:
    """The VQ decoder on all rollout rows at once: a few full-resolution feature maps (fp32 GroupNorm)."""
    side = r.shape.image_side
    return rows(r)[0] * side * side * r.shape.vq_channels * VQ_LIVE_MAPS * num.residual


# ---- the plan ----------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Per-GPU memory of one recipe, in GiB. Each component lives in the phases named in its docstring."""

    recipe: Recipe
    policy_weights_gib: float
    """policy weights (the local shard under FSDP2); all phases."""
    optimizer_gib: float
    """AdamW exp_avg + exp_avg_sq of the trainable weights (in their dtype: fp32 here); all phases."""
    reference_gib: float
    """the reference's resident weights (shard); 0 without beta, with LoRA, or off the GPU; all phases."""
    experts_resident_gib: float
    """experts with ``placement: device``; all phases."""
    runtime_gib: float
    """CUDA context, workspaces, NCCL; all phases."""
    rollout_gather_gib: float
    """the full policy copy FSDP2 gathers for the rollout; rollout."""
    kv_cache_gib: float
    """KV cache of the longest sampling stage; rollout."""
    vq_decode_gib: float
    """VQ decoding of the rollout's images, after the KV cache is freed; rollout (the larger of the two)."""
    score_gather_gib: float
    """the full reference (or LoRA policy) copy for reference log-probs; score."""
    experts_offloaded_gib: float
    """experts with ``placement: offload``, moved in for scoring; score."""
    reference_logits_gib: float
    """the reference's logits of one minibatch; score."""
    gradients_gib: float
    """gradients of the trainable weights (sharded); update."""
    update_gather_gib: float
    """FSDP2 during the update: the root unit (embeddings, heads, towers) unsharded, two layers, unsharded
    gradients of the root and of one layer; update."""
    activations_gib: float
    """activations of one minibatch (plan + image forward), with checkpointing if the recipe turns it on."""
    weight_casts_gib: float
    """bf16 weight copies autocast holds for the backward; update."""
    logits_gib: float
    """fp32 log-softmax of plan and image logits kept for the backward, plus the working copies of one; update."""
    activations_without_checkpointing_gib: float
    """what ``activations_gib`` is without per-layer activation checkpointing, whatever the recipe says."""
    activations_with_checkpointing_gib: float
    """... and with it."""
    rollout_gib: float = 0.0
    score_gib: float = 0.0
    update_gib: float = 0.0
    total_gib: float = 0.0
    """the peak over the three phases: what one GPU must hold."""

    def phases(self) -> dict[str, float]:
        """Phase name -> GiB per GPU."""
        return {"rollout": self.rollout_gib, "score": self.score_gib, "update": self.update_gib}


def plan(r: Recipe) -> MemoryPlan:
    """Compute the per-GPU :class:`MemoryPlan` of a :class:`Recipe`."""
    num, shape = numerics(r.precision, r.policy_dtype), r.shape
    shards = r.world_size if r.sharded else 1
    ref_bytes = 2 if r.precision in ("16-true", "bf16-true") else dtype_bytes(r.reference_dtype)
    full_policy = shape.total_params * num.weight + r.lora_params * num.adapter
    if r.sharded and r.param_dtype is not None:
        # FSDP2 gathers copies already in param_dtype: autocast has nothing left to re-cast, and the
        # gathered policy / reference weigh param_dtype bytes per parameter.
        num = dataclasses.replace(num, casts=False)
        gathered_policy = shape.total_params * dtype_bytes(r.param_dtype) + r.lora_params * num.adapter
        ref_bytes_gathered = dtype_bytes(r.param_dtype)
    else:
        gathered_policy, ref_bytes_gathered = full_policy, ref_bytes
    grad_bytes = r.trainable_params * (num.adapter if r.lora_params else num.weight)
    full_reference = shape.total_params * ref_bytes if r.reference == "copy" else 0
    rollout_rows, _, _ = rows(r)
    plan_kv = r.lengths.template_tokens + r.lengths.prompt_tokens + r.plan_tokens if r.use_plan else 0
    image_kv = r.lengths.prompt_tokens + (r.plan_tokens if r.use_plan else 0) + shape.image_tokens
    kv = max(kv_cache_bytes(shape, rollout_rows, plan_kv, num.residual, num.compute),
             kv_cache_bytes(shape, rollout_rows * (2 if r.cfg else 1), image_kv, num.residual, num.compute))
    on_device = r.reference_placement not in ("cpu", "offload")
    score_gather = 0
    if r.reference == "copy" and (r.reference_placement == "offload" or r.sharded):
        score_gather = shape.total_params * ref_bytes_gathered  # FSDP2 gathers even a CPU-offloaded shard
    elif r.reference == "adapters" and r.sharded:
        score_gather = gathered_policy
    text_logits, image_logits = logit_elements(r)
    g = GIB
    p = MemoryPlan(
        recipe=r, policy_weights_gib=full_policy / shards / g, optimizer_gib=2 * grad_bytes / shards / g,
        reference_gib=(full_reference / shards if on_device else 0) / g,
        experts_resident_gib=sum(e.params * dtype_bytes(e.dtype) for e in r.experts if e.placement == "device") / g,
        runtime_gib=RUNTIME_GIB, rollout_gather_gib=(gathered_policy if r.sharded else 0) / g, kv_cache_gib=kv / g,
        vq_decode_gib=vq_decode_bytes(r, num) / g, score_gather_gib=score_gather / g,
        experts_offloaded_gib=sum(e.params * dtype_bytes(e.dtype) for e in r.experts if e.placement == "offload") / g,
        reference_logits_gib=(num.compute + 8) * max(text_logits, image_logits) / g if r.reference != "none" else 0,
        gradients_gib=grad_bytes / shards / g, update_gather_gib=_update_gather_bytes(r, num) / g,
        activations_gib=activation_bytes(r, num, r.activation_checkpointing) / g,
        weight_casts_gib=weight_cast_bytes(r, num, r.activation_checkpointing) / g,
        logits_gib=(4 * (text_logits + image_logits) + (num.compute + 4) * max(text_logits, image_logits)) / g,
        activations_without_checkpointing_gib=activation_bytes(r, num, False) / g,
        activations_with_checkpointing_gib=activation_bytes(r, num, True) / g,
    )
    resident = p.policy_weights_gib + p.optimizer_gib + p.reference_gib + p.experts_resident_gib + p.runtime_gib
    p.rollout_gib = resident + p.rollout_gather_gib + max(p.kv_cache_gib, p.vq_decode_gib)
    p.score_gib = resident + p.score_gather_gib + p.experts_offloaded_gib + p.reference_logits_gib
    p.update_gib = resident + p.gradients_gib + p.update_gather_gib + p.activations_gib + p.weight_casts_gib \
        + p.logits_gib
    p.total_gib = max(p.phases().values())
    return p


def _update_gather_bytes(r: Recipe, num: Numerics) -> int:
    """FSDP2 buffers of the update (0 unsharded): the root unit stays gathered from forward to backward."""
    if not r.sharded:
        return 0
    shape, grad = r.shape, num.adapter if r.lora_params else num.weight
    root = shape.total_params - shape.layers * shape.layer_params
    layer_trainable = r.lora_params // shape.layers if r.lora_params else min(
        shape.layer_params, r.trainable_params // shape.layers)
    root_trainable = 0 if r.lora_params else max(0, r.trainable_params - shape.layers * layer_trainable)
    return (root + 2 * shape.layer_params) * num.weight + (root_trainable + layer_trainable) * grad


def plan_for(config: Any, world_size: int | None = None, **options: Any) -> MemoryPlan:
    """The per-GPU plan of a config: a ``bicot fit`` namespace (see :func:`parse_config`) or a dict of the
    YAML; ``options`` go to :func:`recipe_from_config` (``shape``, ``lengths``, ``activation_checkpointing``)."""
    return plan(recipe_from_config(config, world_size, **options))


class MemoryPlanWarning(UserWarning):
    """The memory plan of a run exceeds the GPU."""


def warn_if_too_big(memory_plan: MemoryPlan, device_gib: float) -> str | None:
    """Warn (once, rank zero) when the plan's peak exceeds ``device_gib``; return the message, or ``None``."""
    if memory_plan.total_gib <= device_gib:
        return None
    phase = max(memory_plan.phases(), key=memory_plan.phases().get)
    hints = {
        "update": "turn on activation checkpointing, lower model.minibatch_size, or shard over more GPUs",
        "rollout": "lower data.batch_size or algo.num_generations per GPU, or shard over more GPUs",
        "score": "offload large experts (placement: offload) or lower model.minibatch_size",
    }
    message = (f"memory plan: the {phase} phase needs about {memory_plan.total_gib:.1f} GiB per GPU, more than "
               f"the {device_gib:.1f} GiB available; {hints[phase]} (python -m bicot.memory shows the plan)")
    rank_zero_warn(message, category=MemoryPlanWarning)
    return message


# ---- printing and the command line -------------------------------------------------------------------
_ALL = ("rollout", "score", "update")


def _table_rows(p: MemoryPlan) -> list[tuple[str, float, tuple[str, ...]]]:
    r = p.recipe
    shard = f"1/{r.world_size} shard" if r.sharded and r.world_size > 1 else "not sharded"
    reference = {"none": "none: beta = 0", "adapters": "none: LoRA, adapters off"}.get(
        r.reference, f"{r.reference_dtype}, {shard if r.reference_placement == 'device' else r.reference_placement}")
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
        (f"KV cache ({rollout_rows} rows{', x2 for CFG' if r.cfg else ''})", p.kv_cache_gib, ("rollout",)),
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
            lines.append(f"{label:<{width}}" + "".join(f"{value:9.2f}" if ph in phases else f"{'':9}" for ph in _ALL))
    lines.append(f"{'phase total':<{width}}" + "".join(f"{v:9.2f}" for v in p.phases().values()))
    phase = max(p.phases(), key=p.phases().get)
    lines += [
        "",
        f"peak per GPU: {p.total_gib:.1f} GiB ({phase} phase)" + (f" of {device_gib:.1f} GiB" if device_gib else ""),
        f"update activations: {p.activations_without_checkpointing_gib:.1f} GiB without activation checkpointing, "
        f"{p.activations_with_checkpointing_gib:.1f} GiB with (this recipe: "
        f"{'with' if r.activation_checkpointing else 'without'})",
        "not counted: allocator fragmentation, the experts' working memory, Python-side rollout tensors",
    ]
    lines += [f"expert {e.name}: ~{e.params / 1e9:.2f} B parameters ({e.source})" for e in r.experts if e.source]
    if device_gib is not None and p.total_gib > device_gib:
        lines.append(f"WARNING: {p.total_gib:.1f} GiB per GPU exceeds the {device_gib:.1f} GiB GPU: this run will not fit")
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


def main(argv: list[str] | None = None) -> int:
    """``python -m bicot.memory -c CONFIG [-c MORE] [--world-size N] [--gpu-gib 80] [--dotted.overrides]``."""
    parser = argparse.ArgumentParser(prog="python -m bicot.memory", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="a bicot config (repeatable)")
    parser.add_argument("--world-size", type=int, help="GPUs in all (default: trainer.devices x num_nodes)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    parser.add_argument("--shape", help=f"replace the config's model: {' or '.join(PRESETS)} or a checkpoint folder")
    parser.add_argument("--prompt-tokens", type=int, default=Lengths.prompt_tokens)
    parser.add_argument("--template-tokens", type=int, default=Lengths.template_tokens)
    parser.add_argument("--activation-checkpointing", choices=("on", "off"), help="override the config")
    parser.add_argument("--json", action="store_true", help="print the plan's numbers as JSON")
    args, overrides = parser.parse_known_args(argv)
    config = parse_config([a for path in args.config for a in ("-c", path)] + overrides)
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
    memory_plan = plan_for(config, args.world_size, shape=args.shape, activation_checkpointing=checkpointing,
                           lengths=Lengths(args.prompt_tokens, args.template_tokens))
    if args.json:
        numbers = {k: round(v, 3) for k, v in vars(memory_plan).items() if isinstance(v, float)}
        print(json.dumps(numbers | {"world_size": memory_plan.recipe.world_size, "gpu_gib": args.gpu_gib}))
    else:
        print(format_plan(memory_plan, args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
