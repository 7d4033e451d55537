"""The byte formulas of the memory plan and the per-phase :class:`MemoryPlan` of a :class:`Recipe`, with
the run-start check :func:`warn_if_too_big`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from bicot.memory.recipe import Recipe, recipe_from_config
from bicot.memory.shapes import ModelShape, dtype_bytes
from modules.engine import DEFAULT_CHUNK, keeps_buffers, round_up

GIB = 2**30
# full-resolution feature maps alive at once while decoding (CPU profile: 2.6 bf16, 4.1 fp32)
VQ_LIVE_MAPS = 4
RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspaces and NCCL buffers: an allowance, not measured here


def engine_holds_buffers(r: Recipe) -> bool:
    """The static engine keeps its buffers between rollouts under ``torch.compile`` modes only."""
    return r.engine == "static" and keeps_buffers(r.engine_compile)


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


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, k_bytes: float, v_bytes: float) -> float:
    """``layers x rows x tokens x kv_heads x head_dim x (K bytes + V bytes)``."""
    return shape.layers * rows * tokens * shape.kv_heads * shape.head_dim * (k_bytes + v_bytes)


def recipe_numerics(r: Recipe) -> Numerics:
    """The :class:`Numerics` a recipe's model runs with: :func:`numerics` of its precision and weights, except
    under FSDP2 with ``param_dtype``. There the gathered copies are already in that dtype, so autocast has
    nothing left to re-cast, and the decoder's residual stream (embeddings, RMSNorm's in- and outputs, so the
    K cache) is in ``param_dtype`` too: dtypes measured on CPU with a gloo group (tests/bicot/test_memory.py).
    """
    num = numerics(r.precision, r.policy_dtype)
    if r.sharded and r.param_dtype is not None:
        num = dataclasses.replace(num, casts=False, residual=dtype_bytes(r.param_dtype))
    return num


def eager_cache_bytes(num: Numerics) -> tuple[int, int]:
    """Bytes per element of the eager loop's ``(K, V)`` cache: K follows the residual stream (RoPE promotes
    it to the embeddings' dtype), V the matmul outputs."""
    return num.residual, num.compute


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
    # the final norm and the heads' input
    final = sum(tokens) * (4 * shape.hidden + (num.residual + num.compute) * shape.hidden)
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
    """KV cache of the longest sampling stage; rollout (eager loop: freed after each stage)."""
    engine_buffers_gib: float
    """the static engine's buffers: the KV buffers of both stages (both in the compute dtype, capacity
    rounded up to 128 slots) and, when autocast would cast fp32 weights, a compute-dtype copy of the linear
    weights; rollout until VQ decoding, or all phases under a ``torch.compile`` mode (0: eager loop)."""
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
    # the VQ decoder's maps keep the precision's count under FSDP2 too: CUDA autocast runs GroupNorm in
    # float32, which a CPU run cannot show
    num, vq_num, shape = recipe_numerics(r), numerics(r.precision, r.policy_dtype), r.shape
    shards = r.world_size if r.sharded else 1
    ref_bytes = 2 if r.precision in ("16-true", "bf16-true") else dtype_bytes(r.reference_dtype)
    full_policy = shape.total_params * num.weight + r.lora_params * num.adapter
    if r.sharded and r.param_dtype is not None:  # the gathered policy / reference weigh param_dtype bytes
        gathered_policy = shape.total_params * dtype_bytes(r.param_dtype) + r.lora_params * num.adapter
        ref_bytes_gathered = dtype_bytes(r.param_dtype)
    else:
        gathered_policy, ref_bytes_gathered = full_policy, ref_bytes
    grad_bytes = r.trainable_params * (num.adapter if r.lora_params else num.weight)
    full_reference = shape.total_params * ref_bytes if r.reference == "copy" else 0
    rollout_rows, _, _ = rows(r)
    plan_kv = r.lengths.template_tokens + r.lengths.prompt_tokens + r.plan_tokens if r.use_plan else 0
    image_kv = r.lengths.prompt_tokens + (r.plan_tokens if r.use_plan else 0) + shape.image_tokens
    kv = max(
        kv_cache_bytes(shape, rollout_rows, plan_kv, *eager_cache_bytes(num)),
        kv_cache_bytes(shape, rollout_rows * (2 if r.cfg else 1), image_kv, *eager_cache_bytes(num)),
    )
    engine_buffers = _engine_buffer_bytes(r, num, rollout_rows, plan_kv, image_kv) if r.engine == "static" else 0
    on_device = r.reference_placement not in ("cpu", "offload")
    score_gather = 0
    if r.reference == "copy" and (r.reference_placement == "offload" or r.sharded):
        score_gather = shape.total_params * ref_bytes_gathered  # FSDP2 gathers even a CPU-offloaded shard
    elif r.reference == "adapters" and r.sharded:
        score_gather = gathered_policy
    text_logits, image_logits = logit_elements(r)
    g = GIB
    p = MemoryPlan(
        recipe=r,
        policy_weights_gib=full_policy / shards / g,
        optimizer_gib=2 * grad_bytes / shards / g,
        reference_gib=(full_reference / shards if on_device else 0) / g,
        experts_resident_gib=sum(
            e.params * dtype_bytes(e.dtype) for e in r.experts if e.placement == "device"
        )
        / g,
        runtime_gib=RUNTIME_GIB,
        rollout_gather_gib=(gathered_policy if r.sharded else 0) / g,
        kv_cache_gib=kv / g,
        engine_buffers_gib=engine_buffers / g,
        vq_decode_gib=vq_decode_bytes(r, vq_num) / g,
        score_gather_gib=score_gather / g,
        experts_offloaded_gib=sum(
            e.params * dtype_bytes(e.dtype) for e in r.experts if e.placement == "offload"
        )
        / g,
        reference_logits_gib=(num.compute + 8) * max(text_logits, image_logits) / g
        if r.reference != "none"
        else 0,
        gradients_gib=grad_bytes / shards / g,
        update_gather_gib=_update_gather_bytes(r, num) / g,
        activations_gib=activation_bytes(r, num, r.activation_checkpointing) / g,
        weight_casts_gib=weight_cast_bytes(r, num, r.activation_checkpointing) / g,
        logits_gib=(4 * (text_logits + image_logits) + (num.compute + 4) * max(text_logits, image_logits))
        / g,
        activations_without_checkpointing_gib=activation_bytes(r, num, False) / g,
        activations_with_checkpointing_gib=activation_bytes(r, num, True) / g,
    )
    resident = (
        p.policy_weights_gib + p.optimizer_gib + p.reference_gib + p.experts_resident_gib + p.runtime_gib
    )
    if engine_holds_buffers(r):  # held through every phase, VQ decoding included
        resident += p.engine_buffers_gib
        p.rollout_gib = resident + p.rollout_gather_gib + p.vq_decode_gib
    elif r.engine == "static":  # freed after sampling, before VQ decoding
        p.rollout_gib = resident + p.rollout_gather_gib + max(p.engine_buffers_gib, p.vq_decode_gib)
    else:
        p.rollout_gib = resident + p.rollout_gather_gib + max(p.kv_cache_gib, p.vq_decode_gib)
    p.score_gib = resident + p.score_gather_gib + p.experts_offloaded_gib + p.reference_logits_gib
    p.update_gib = (
        resident
        + p.gradients_gib
        + p.update_gather_gib
        + p.activations_gib
        + p.weight_casts_gib
        + p.logits_gib
    )
    p.total_gib = max(p.phases().values())
    return p


def _engine_buffer_bytes(r: Recipe, num: Numerics, rollout_rows: int, plan_kv: int, image_kv: int) -> float:
    """What the static rollout engine holds: both stages' KV buffers (``plan_kv``/``image_kv`` slots before rounding
    up to the CUDA chunk), the float8 weights, the autocast weight copies or the packed projections."""
    shape = r.shape
    slots = [round_up(n, DEFAULT_CHUNK["cuda"]) for n in (plan_kv, image_kv)]
    # kv "fp8": 1 byte an entry and a float32 scale per vector of head_dim entries
    cache = num.compute if r.engine_kv == "model" else 1 + 4 / shape.head_dim
    total = kv_cache_bytes(shape, rollout_rows, slots[0], cache, cache)
    total += kv_cache_bytes(shape, rollout_rows * (2 if r.cfg else 1), slots[1], cache, cache)
    fp8 = r.engine_weights == "fp8"
    if fp8:  # RolloutEngine(weights="fp8"): the decoder's projections in float8, a float32 scale per row
        out_rows = (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 2 * shape.hidden + 2 * shape.intermediate
        total += shape.layers * (shape.layer_linear_params + 4 * out_rows)
    if num.casts:  # the engine's weight_copy: the decoder's (but fp8's), both heads' and the aligner's linears
        linear = (0 if fp8 else shape.layers * shape.layer_linear_params) + sum(shape.head_params.values())
        linear += shape.part_params["generation_aligner"]  # biases counted too: < 0.1 % over
        total += linear * num.compute
    elif r.engine_pack and not fp8:  # RolloutEngine(pack=True) without the autocast copy: q/k/v, gate/up packed
        packed = shape.hidden * ((shape.heads + 2 * shape.kv_heads) * shape.head_dim + 2 * shape.intermediate)
        total += shape.layers * packed * num.compute
    return total


def _update_gather_bytes(r: Recipe, num: Numerics) -> int:
    """FSDP2 buffers of the update (0 unsharded): the root unit stays gathered from forward to backward."""
    if not r.sharded:
        return 0
    shape, grad = r.shape, num.adapter if r.lora_params else num.weight
    root = shape.total_params - shape.layers * shape.layer_params
    layer_trainable = (
        r.lora_params // shape.layers
        if r.lora_params
        else min(shape.layer_params, r.trainable_params // shape.layers)
    )
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
    message = (
        f"memory plan: the {phase} phase needs about {memory_plan.total_gib:.1f} GiB per GPU, more than "
        f"the {device_gib:.1f} GiB available; {hints[phase]} (python -m bicot.memory shows the plan)"
    )
    rank_zero_warn(message, category=MemoryPlanWarning)
    return message
