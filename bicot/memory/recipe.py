"""The recipe a memory plan is computed from: a parsed ``bicot fit`` config or a live ``BiCoTGRPO``,
normalised into a :class:`Recipe` (model shape, sharding, precision, batch, LoRA, reference, experts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bicot.memory.shapes import (
    LORA_TARGETS,
    ModelShape,
    load_shape,
    lora_params,
    shape_from_model,
    uses_default_system_prompt,
)

# Reward experts by class name: (parameters, where the figure comes from). Approximate; weights are never read.
EXPERT_PARAMS: dict[str, tuple[float, str]] = {
    "HPSExpert": (986e6, "ViT-H-14: modules.rewards.hps.OpenClipArch as a CLIPModel counts 986.1 M"),
    "GroundingDinoExpert": (
        172e6,
        "Swin-T + BERT-base: transformers' default GroundingDinoConfig counts 172.3 M, the paper's 172 M",
    ),
    "GitVQAExpert": (394e6, "GIT-large: microsoft/git-large-vqav2 holds 1.58 GB of float32 weights"),
    "ORMExpert": (8.0e9, "LLaVA-OneVision-7B: Qwen2-7B (7.6 B) + SigLIP so400m (0.4 B) + projector"),
    "CLIPScoreExpert": (428e6, "CLIP ViT-L/14 (openai/clip-vit-large-patch14)"),
}


INSTRUCTION_TOKENS = 96
"""The default reasoning instruction around the prompt in the plan context (~70 words)."""
CHARS_PER_TOKEN = 188 / 36
"""transformers' Janus ``DEFAULT_SYSTEM_PROMPT``: 188 characters, ~36 tokens (35 with cl100k_base, 36 with GPT-2's
byte-level BPE; Janus-Pro's own DeepSeek tokenizer was not at hand)."""


def system_prompt_tokens(text: str) -> int:
    """Estimated tokens of a system prompt (0 for none)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


@dataclass
class Lengths:
    """Token counts the config does not fix (sequences are padded to the longest row of a batch)."""

    prompt_tokens: int = 64
    """chat-formatted prompt before the plan, begin-of-image token included."""
    template_tokens: int | None = None
    """the plan context beyond the prompt: the reasoning instruction (:data:`INSTRUCTION_TOKENS`) and the plan's
    system prompt. ``None`` derives it from the policy's ``plan_system_prompt``: unset, the checkpoint's default
    (Janus-Pro's converted checkpoints set ``use_default_system_prompt``: ~36 tokens; a live policy knows its
    own), ``""`` none, a text by its length."""


def with_template_tokens(lengths: Lengths | None, system_prompt: str) -> Lengths:
    """``lengths`` with ``template_tokens`` derived from the plan's system prompt where it is ``None``."""
    lengths = lengths or Lengths()
    if lengths.template_tokens is not None:
        return lengths
    return Lengths(lengths.prompt_tokens, INSTRUCTION_TOKENS + system_prompt_tokens(system_prompt))


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
    engine: str = "eager"
    """``sampling.engine``: ``static`` allocates the KV buffers of both stages at once (and, under autocast
    with fp32 weights, a bf16 copy of the linear weights)."""
    engine_compile: str = "auto"
    """``sampling.engine_compile``: ``torch.compile`` modes hold the static engine's buffers through the
    score and update phases; ``auto``/``off``/``cudagraphs``/``fused`` free them before VQ decoding."""
    engine_pack: bool = False
    """``sampling.engine_pack``: with bf16 weights (no autocast copy) the packed q/k/v and gate/up matrices are a
    second copy of those weights while rolling out; under autocast they hold the bf16 copies at no extra cost."""
    engine_weights: str = "model"
    """``sampling.engine_weights``: ``fp8`` holds a float8 copy of the decoder's projections (1 byte a weight, 4 a
    row) while rolling out, instead of their bf16 packs or autocast copies."""
    engine_kv: str = "model"
    """``sampling.engine_kv``: ``fp8`` holds the static engine's KV cache in float8, a float32 scale a vector."""

    def __post_init__(self) -> None:
        # a recipe built by hand: the plan context of a checkpoint with its default system prompt
        if self.lengths.template_tokens is None:
            from modules.policy import plan_system_text

            self.lengths = with_template_tokens(self.lengths, plan_system_text(None, True))


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
        name = (
            str(expert.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(expert, dict) else str(expert)
        )
        params, source = EXPERT_PARAMS.get(name, (0.0, "not a known expert: counted as 0 (programmatic?)"))
        out.append(
            ExpertSpec(
                name,
                params,
                _get(expert, "dtype", default="float32"),
                _get(expert, "placement", default="device"),
                source,
            )
        )
    return out


def _world_size(trainer: dict) -> int:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes") or 1
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return int(devices) * nodes if str(devices).lstrip("-").isdigit() and int(devices) > 0 else nodes


def recipe_from_config(
    config: Any,
    world_size: int | None = None,
    shape: str | None = None,
    lengths: Lengths | None = None,
    activation_checkpointing: bool | None = None,
) -> Recipe:
    """Normalise a parsed config (``bicot fit`` namespace or the YAML as a dict) into a :class:`Recipe`.

    Args:
        world_size: processes (GPUs); ``None`` takes ``trainer.devices x trainer.num_nodes``.
        shape: a preset or checkpoint that replaces ``model.policy.model_name_or_path`` / ``tiny``.
        activation_checkpointing: overrides ``model.activation_checkpointing`` when not ``None``.
    """
    c = _plain(config)
    policy, trainer, algo = (
        _get(c, "model", "policy", default={}),
        c.get("trainer") or {},
        _get(c, "model", "algo", default={}),
    )
    model = (
        load_shape(shape) if shape else load_shape(_get(policy, "model_name_or_path"), _get(policy, "tiny"))
    )
    sampling = _get(policy, "sampling", default={})
    strategy = trainer.get("strategy")
    strategy = str(_get(strategy, "class_path", default=strategy) or "")
    rank, targets = _lora(_get(policy, "lora"))
    levels = _get(algo, "levels", default="both")
    reference = _get(c, "model", "reference")
    recipe = Recipe(
        shape=model,
        world_size=world_size or _world_size(trainer),
        sharded=any(s in strategy for s in ("FSDP2Strategy", "ModelParallelStrategy", "fsdp")),
        precision=str(trainer.get("precision") or "32-true"),
        policy_dtype=_get(policy, "dtype", default="float32"),
        trainable_params=_trainable(model, _get(policy, "trainable", default=["language_model", "lm_head"])),
        prompts=int(_get(c, "data", "batch_size", default=1)),
        group_size=int(_get(algo, "num_generations", default=8)),
        minibatch_size=_get(c, "model", "minibatch_size"),
        beta=float(_get(algo, "beta", default=0.04)),
        train_plan=levels in ("both", "semantic"),
        train_image=levels in ("both", "token"),
        use_plan=bool(_get(policy, "use_plan", default=True)),
        plan_tokens=int(_get(sampling, "plan_max_tokens", default=64)),
        cfg=float(_get(sampling, "cfg_scale", default=5.0)) != 1.0,
        guided=_get(sampling, "image_logprob", default="conditional") == "guided",
        engine=str(_get(sampling, "engine", default="eager")),
        engine_compile=str(_get(sampling, "engine_compile", default="auto")),
        engine_pack=bool(_get(sampling, "engine_pack", default=False)),
        engine_weights=str(_get(sampling, "engine_weights", default="model")),
        engine_kv=str(_get(sampling, "engine_kv", default="model")),
        activation_checkpointing=bool(
            _get(c, "model", "parallel", "activation_checkpointing", default=False)
            if activation_checkpointing is None
            else activation_checkpointing
        ),
        param_dtype=_get(c, "model", "parallel", "param_dtype"),
        experts=_experts(c),
        lengths=with_template_tokens(lengths, _plan_system_prompt(policy, shape)),
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


def _plan_system_prompt(policy: dict, shape: str | None) -> str:
    """The plan's system prompt a config asks for (unset: the checkpoint processor's choice, see
    :func:`~bicot.memory.shapes.uses_default_system_prompt`), by the policy's own rule."""
    from modules.policy import plan_system_text

    source, tiny = (shape, None) if shape else (_get(policy, "model_name_or_path"), _get(policy, "tiny"))
    text = _get(policy, "plan_system_prompt")
    return plan_system_text(text, text is None and uses_default_system_prompt(source, tiny))


def _trainable(shape: ModelShape, parts: list[str]) -> int:
    parts = list(shape.part_params) if list(parts) == ["all"] else parts
    return sum(shape.part_params[p] for p in parts)


def recipe_from_module(
    module: Any, world_size: int | None = None, prompts: int | None = None, lengths: Lengths | None = None
) -> Recipe:
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
        precision=str(trainer.precision),
        policy_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        prompts=prompts or getattr(trainer.datamodule, "batch_size", 1),
        group_size=algo.num_generations,
        minibatch_size=module.minibatch_size,
        beta=algo.beta,
        train_plan=algo.train_plan,
        train_image=algo.train_image,
        use_plan=policy.use_plan,
        plan_tokens=policy.sampling.plan_max_tokens,
        cfg=policy.sampling.cfg_scale != 1.0,
        guided=policy.sampling.image_logprob == "guided",
        engine=policy.sampling.engine,
        engine_compile=policy.sampling.engine_compile,
        engine_pack=policy.sampling.engine_pack,
        engine_weights=policy.sampling.engine_weights,
        engine_kv=policy.sampling.engine_kv,
        lora_params=lora,
        activation_checkpointing=module.parallel.activation_checkpointing,
        param_dtype=module.parallel.param_dtype,
        lengths=with_template_tokens(lengths, policy.system_prompt),
    )
    recipe.lora_rank = 1 if lora else 0  # rank only refines the activation estimate; presence is what counts
    recipe.reference = "copy" if reference is not None else "adapters" if lora and algo.beta > 0 else "none"
    if reference is not None:
        recipe.reference_dtype = str(next(reference.parameters()).dtype).removeprefix("torch.")
        recipe.reference_placement = "cpu" if module.parallel.reference == "cpu" else "device"
    for expert in module.rewards.experts.values():
        params = list(expert.parameters())
        dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
        recipe.experts.append(
            ExpertSpec(expert.name, sum(p.numel() for p in params), dtype, expert.placement)
        )
    return recipe
