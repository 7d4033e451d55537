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

The package: :mod:`bicot.memory.shapes` (model shapes and parameter counts), :mod:`bicot.memory.recipe`
(the :class:`Recipe` of a config or a live module), :mod:`bicot.memory.plan` (the byte formulas and the
:class:`MemoryPlan`) and :mod:`bicot.memory.cli` (the table and the command line).
"""

from bicot.memory.cli import format_plan, main, parse_config
from bicot.memory.plan import (
    GIB,
    RUNTIME_GIB,
    VQ_LIVE_MAPS,
    MemoryPlan,
    MemoryPlanWarning,
    Numerics,
    activation_bytes,
    eager_cache_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    logit_elements,
    numerics,
    plan,
    plan_for,
    recipe_numerics,
    rows,
    update_tokens,
    vq_decode_bytes,
    warn_if_too_big,
    weight_cast_bytes,
)
from bicot.memory.recipe import (
    EXPERT_PARAMS,
    ExpertSpec,
    Lengths,
    Recipe,
    recipe_from_config,
    recipe_from_module,
)
from bicot.memory.recipe import _lora as _lora  # private, imported by tests/bicot/test_memory.py
from bicot.memory.shapes import (
    DTYPE_BYTES,
    LORA_TARGETS,
    PRESET_ALIASES,
    PRESETS,
    ModelShape,
    dtype_bytes,
    load_shape,
    lora_params,
    shape_from_model,
)

__all__ = [
    "DTYPE_BYTES",
    "EXPERT_PARAMS",
    "ExpertSpec",
    "GIB",
    "LORA_TARGETS",
    "Lengths",
    "MemoryPlan",
    "MemoryPlanWarning",
    "ModelShape",
    "Numerics",
    "PRESETS",
    "PRESET_ALIASES",
    "RUNTIME_GIB",
    "Recipe",
    "VQ_LIVE_MAPS",
    "activation_bytes",
    "eager_cache_bytes",
    "recipe_numerics",
    "dtype_bytes",
    "format_plan",
    "kv_cache_bytes",
    "layer_activation_bytes",
    "load_shape",
    "logit_elements",
    "lora_params",
    "main",
    "numerics",
    "parse_config",
    "plan",
    "plan_for",
    "recipe_from_config",
    "recipe_from_module",
    "rows",
    "shape_from_model",
    "update_tokens",
    "vq_decode_bytes",
    "warn_if_too_big",
    "weight_cast_bytes",
]
