"""Model shapes for the memory plan: a Janus model's dimensions and parameter counts, counted on the meta
device (presets, checkpoint configs or a tiny spec; never weights), dtype sizes and LoRA adapter counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
# fmt: off
PRESETS: dict[str, dict[str, int]] = {
    "janus-pro-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, head_dim=128, vocab_size=102400),
    "janus-pro-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                         num_key_value_heads=32, head_dim=128, vocab_size=102400),
}
# fmt: on
PRESET_ALIASES = {
    f"{org}/Janus-Pro-{size}".lower(): f"janus-pro-{size.lower()}"
    for org in ("deepseek-community", "deepseek-ai")
    for size in ("1B", "7B")
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    from modules.policy import PARTS  # what ``trainable`` may name; ``lm_head`` is counted below

    cfg = model.config
    text, vq = cfg.text_config, cfg.vq_config
    layer = model.model.language_model.layers[0]

    def linear_numel(module: torch.nn.Module) -> int:
        return sum(
            p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()
        )

    parts = {n: sum(p.numel() for p in getattr(model.model, n).parameters()) for n in PARTS if n != "lm_head"}
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    parts["lm_head"] = 0 if tied else model.lm_head.weight.numel()  # a tied head is counted once, in the LM
    return ModelShape(
        name=name,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        intermediate=text.intermediate_size,
        text_vocab=text.vocab_size,
        image_vocab=vq.num_embeddings,
        image_tokens=cfg.vision_config.num_image_tokens,
        image_side=vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1),
        vq_channels=vq.base_channels * vq.channel_multiplier[0],
        total_params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        layer_linear_params=linear_numel(layer),
        head_params={"text": linear_numel(model.lm_head), "image": linear_numel(model.model.generation_head)},
        part_params=parts,
    )


def load_shape(source: str | None = None, tiny: Any = None) -> ModelShape:
    """The shape of a preset name (``janus-pro-1b``/``-7b`` or their hub ids), a local checkpoint folder
    (its config.json only), a hub id in the local Hugging Face cache, or a tiny spec (``model.policy.tiny``)."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    from modules.hub import local_folder
    from modules.tiny import TinyJanusSpec, build_tiny_janus

    if tiny is not None:
        spec = tiny if isinstance(tiny, TinyJanusSpec) else TinyJanusSpec(**dict(tiny))
        with torch.device("meta"):
            return shape_from_model(build_tiny_janus(spec)[0], f"tiny (hidden {spec.hidden_size})")
    key = PRESET_ALIASES.get(str(source).lower(), str(source).lower())
    if key in PRESETS:
        text = dict(model_type="llama", max_position_embeddings=16384, **PRESETS[key])
        h = text["hidden_size"]
        config = JanusConfig(
            text_config=text,
            vision_config=dict(projection_dim=h),
            tie_word_embeddings=False,
            vq_config=dict(projection_dim=h, image_token_embed_dim=h),
        )
    else:
        folder, hint = local_folder(str(source)), f"give a checkpoint folder or a preset: {', '.join(PRESETS)}"
        if folder is not None and not folder.is_dir():
            raise ValueError(f"memory plan: no checkpoint folder {str(folder)!r}; {hint}")
        if folder is not None and not (folder / "config.json").is_file():  # transformers would plan its defaults
            raise ValueError(f"memory plan: the folder {str(folder)!r} has no config.json; {hint}")
        try:  # a folder's config.json, or a cached hub id: never weights, never the network
            config = JanusConfig.from_pretrained(folder or source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"memory plan: cannot read a Janus config from {source!r} ({err}); {hint}") from err
        key = str(source)
    with torch.device("meta"):
        return shape_from_model(JanusForConditionalGeneration(config), key)


def uses_default_system_prompt(source: str | None = None, tiny: Any = None) -> bool:
    """Whether the checkpoint's processor puts transformers' default system prompt before a plan
    (``use_default_system_prompt`` in its ``processor_config.json``): a folder's or a cached hub id's says; a preset
    or an uncached hub id is taken as Janus-Pro's converted checkpoints, which set it; tiny models do not."""
    import json

    from modules.hub import local_folder

    if tiny is not None:
        return False
    key = PRESET_ALIASES.get(str(source).lower(), str(source).lower())
    if key in PRESETS:
        return True
    folder = local_folder(str(source))
    if folder is not None:
        path = folder / "processor_config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "processor_config.json")
        if not isinstance(cached, str):
            return True
        path = Path(cached)
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("use_default_system_prompt", False))
    except (OSError, ValueError, AttributeError):
        return False


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Adapter parameters: ``rank * (in + out)`` for each targeted projection of each decoder layer."""
    q, kv, h, i = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.hidden,
        shape.intermediate,
    )
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    chosen = [name for name in sizes if any(str(t).endswith(name) for t in targets)]  # peft matches suffixes
    return shape.layers * sum(rank * sum(sizes[name]) for name in chosen)
