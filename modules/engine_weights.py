"""The weights the rollout engine's decode step reads: which linear layers it copies to the autocast dtype, which
projections it packs into one matrix, which it quantizes to float8, and the buffers that hold them at fixed
addresses (see ``RolloutEngine.step_weights``).
"""

from __future__ import annotations

import torch

from modules import fp8
from modules.decode_step import plain_linear


def packable(model) -> list[list[torch.nn.Linear]]:
    """Per decoder layer, its q/k/v and its gate/up projections (two groups, in that order; an empty group where
    they cannot be packed: a LoRA-wrapped projection, a bias, or dtypes that differ)."""
    lm = model.model.language_model
    groups = []
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
            plain = all(type(m) is torch.nn.Linear and m.bias is None for m in group)
            same = plain and len({(m.weight.dtype, m.weight.shape[1]) for m in group}) == 1
            groups.append(group if same else [])
    return groups


def weight_buffers(copied: list, groups: list, dtype, signature) -> dict:
    """The buffers of :meth:`modules.engine.RolloutEngine.step_weights`.

    ``copies``: one per copied linear (for a packed one, a view of its pack). ``pack_views``/``pack_modules``: the
    views of packed weights that are not copied anyway, and their modules (the weights are read at every
    refresh: FSDP2 may gather them elsewhere). ``packed``: per layer ``(qkv, gate_up)``, a matrix or None.
    ``signature``: the weights' shapes and dtypes they were made for.
    """
    copy_of = {id(m): i for i, m in enumerate(copied)}
    copies: list = [None] * len(copied)
    pack_views, pack_modules, packs = [], [], []
    for group in groups:
        if not group:
            packs.append(None)
            continue
        # the autocast dtype where the weights are copied for autocast, else the weights' own
        target = dtype if id(group[0]) in copy_of else group[0].weight.dtype
        pack = torch.empty(sum(m.weight.shape[0] for m in group), group[0].weight.shape[1], dtype=target,
                           device=group[0].weight.device)
        views = pack.split([m.weight.shape[0] for m in group])
        for module, view in zip(group, views, strict=True):
            if id(module) in copy_of:
                copies[copy_of[id(module)]] = view
            else:
                pack_views.append(view)
                pack_modules.append(module)
        packs.append(pack)
    for i, m in enumerate(copied):
        if copies[i] is None:
            copies[i] = torch.empty_like(m._parameters["weight"], dtype=dtype)
    packed = [(packs[i], packs[i + 1]) for i in range(0, len(packs), 2)] if packs else None
    return dict(copies=copies, pack_views=pack_views, pack_modules=pack_modules, packed=packed, signature=signature)


def base_linear(module):
    """The linear layer a LoRA adapter wraps, or ``module`` itself."""
    from modules.lora import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def live_weight(module) -> torch.Tensor:
    """The weight ``module`` applies (a LoRA layer's merged with its adapters: :func:`modules.lora.merged_weight`)."""
    from modules.lora import BaseTunerLayer, merged_weight

    return merged_weight(module) if isinstance(module, BaseTunerLayer) else module.weight


def quantizable(model) -> list[tuple[list[torch.nn.Module], ...]]:
    """Per decoder layer its ``([q, k, v], [gate, up], [o], [down])`` projections, for ``weights="fp8"``: bias-free
    ``nn.Linear`` layers, LoRA-adapted or not (an adapted one is quantized with its adapters merged); a
    ``ValueError`` that names the first one that is neither."""
    lm = model.model.language_model
    layers = []
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj], [attn.o_proj], [mlp.down_proj])
        for name, module in zip(("q", "k", "v", "gate", "up", "o", "down"), [m for g in groups for m in g], strict=True):
            base = base_linear(module)
            if not plain_linear(base):
                raise ValueError(
                    f"engine weights 'fp8' quantizes bias-free nn.Linear projections (LoRA-adapted or not); layer "
                    f"{i}'s {name}_proj is a {type(base).__name__}"
                    f"{' with a bias' if getattr(base, 'bias', None) is not None else ''}: sample with engine weights "
                    "'model'"
                )
        layers.append(groups)
    return layers


def fp8_buffers(layers: list, signature) -> dict:
    """The buffers of ``weights="fp8"``: per layer ``packed`` ``((q, scale) of qkv, of gate_up, of o, of down)``,
    float8 ``[rows, K]`` and float32 ``[rows]`` each; ``targets``: ``(module, q view, scale view)`` to quantize."""
    packed, targets = [], []
    for groups in layers:
        pairs = []
        for group in groups:
            weight = base_linear(group[0]).weight
            sizes = [base_linear(m).weight.shape[0] for m in group]
            q = torch.empty(sum(sizes), weight.shape[1], dtype=fp8.FP8, device=weight.device)
            scale = torch.empty(sum(sizes), dtype=torch.float32, device=weight.device)
            for module, q_view, scale_view in zip(group, q.split(sizes), scale.split(sizes), strict=True):
                targets.append((module, q_view, scale_view))
            pairs.append((q, scale))
        packed.append(tuple(pairs))
    return dict(packed=packed, targets=targets, signature=signature)


def nested_tensors(value) -> list[torch.Tensor]:
    """The tensors in nested tuples (a layer's packed weights)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value or () for t in nested_tensors(item)]


def step_linears(model, dtype: torch.dtype) -> list[torch.nn.Linear]:
    """The linear layers a decode step runs (LoRA's included) whose weights autocast would cast to ``dtype``."""
    parts = [model.model.language_model, model.model.generation_head, model.model.generation_aligner, model.lm_head]
    return [
        m
        for part in parts
        for m in part.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point() and m.weight.dtype != dtype
    ]
